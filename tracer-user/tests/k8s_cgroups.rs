//! Pod identity from real cgroups (root): processes are moved into cgroup v2 directories named
//! the way the kubelet and the runtimes name them, make a real TCP connection on loopback, and
//! the resolver must name their pods from a kubelet log layout built in a temporary host root
//! (while pids are read from the real `/proc`).
//!
//! Skips with a reason when not root or without a cgroup2 mount, unless `WHOCLOSED_E2E=require`
//! (set by `cargo xtask test`), where that is a failure.
// Test code: a failed expectation is meant to stop the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
};

use tracer_user::k8s::{Limits, PodIdentity, Resolver, Roots};

const UID_A: &str = "3f0c6a52-1d2e-4b7f-9a8c-0e1d2c3b4a59";
const CID_A: &str = "5b1f3e7a9c0d2e4f6a8b0c1d3e5f7a9b1c3d5e7f9a0b2c4d6e8f0a1b3c5d7e9f";
const UID_B: &str = "9e8d7c6b-5a49-4838-a271-605f4e3d2c1b";
const CID_B: &str = "e1d2c3b4a5968778695a4b3c2d1e0f1e2d3c4b5a69788796a5b4c3d2e1f0a1b2";

fn skip_or_fail(why: &str) {
    if std::env::var("WHOCLOSED_E2E").as_deref() == Ok("require") {
        panic!("pod identity test cannot run: {why}");
    }
    eprintln!("SKIP k8s_cgroups: {why}");
}

/// The cgroup2 mount point, from `/proc/self/mountinfo`.
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2")
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// Removes the cgroup directories it created (deepest first) and the temporary host root,
/// after the children are gone.
struct Cleanup {
    children: Vec<Child>,
    cgroups: Vec<PathBuf>,
    host_root: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for dir in self.cgroups.iter().rev() {
            if let Err(e) = std::fs::remove_dir(dir) {
                eprintln!("k8s_cgroups: cannot remove {}: {e}", dir.display());
            }
        }
        let _ = std::fs::remove_dir_all(&self.host_root);
    }
}

impl Cleanup {
    /// Creates `rel` under `base` one directory at a time, remembering each for removal.
    fn mkdirs(&mut self, base: &Path, rel: &str) -> PathBuf {
        let mut dir = base.to_path_buf();
        for seg in rel.split('/').filter(|s| !s.is_empty()) {
            dir.push(seg);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
                self.cgroups.push(dir.clone());
            }
        }
        dir
    }
}

/// A shell that waits for a line, connects to `port` on loopback, says so, and holds the
/// connection until killed.
fn spawn_connector(port: u16) -> (Child, ChildStdin, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "read go; exec 3<>/dev/tcp/127.0.0.1/{port}; echo connected; read done"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn bash");
    let stdin = child.stdin.take().expect("stdin piped");
    let stdout = BufReader::new(child.stdout.take().expect("stdout piped"));
    (child, stdin, stdout)
}

/// The pid owning the TCP socket `127.0.0.1:local_port -> 127.0.0.1:remote_port`, found the
/// way a user would check it: `/proc/net/tcp` for the inode, then every process's fds.
fn socket_owner(local_port: u16, remote_port: u16) -> Option<u32> {
    let tcp = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let want_local = format!("0100007F:{local_port:04X}");
    let want_remote = format!("0100007F:{remote_port:04X}");
    let inode = tcp.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&want_local.as_str()) && f.get(2) == Some(&want_remote.as_str()))
            .then(|| f.get(9).map(|s| s.to_string()))?
    })?;
    let target = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == target) {
                return Some(pid);
            }
        }
    }
    None
}

fn kubelet_layout(host_root: &Path, ns: &str, pod: &str, uid: &str, container: &str, cid: &str) {
    let cdir = host_root
        .join("var/log/pods")
        .join(format!("{ns}_{pod}_{uid}"))
        .join(container);
    std::fs::create_dir_all(&cdir).expect("mkdir pods");
    std::fs::write(cdir.join("0.log"), b"").expect("write log");
    let links = host_root.join("var/log/containers");
    std::fs::create_dir_all(&links).expect("mkdir containers");
    std::os::unix::fs::symlink(
        cdir.join("0.log"),
        links.join(format!("{pod}_{ns}_{container}-{cid}.log")),
    )
    .expect("symlink");
}

#[test]
fn pod_identity_from_real_cgroups() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return skip_or_fail("needs root to create cgroups");
    }
    let Some(cg2) = cgroup2_mount() else {
        return skip_or_fail("no cgroup2 mount in /proc/self/mountinfo");
    };
    let test_dir = format!("whoclosed-test-{}", std::process::id());
    let base = cg2.join(&test_dir);
    let host_root = std::env::temp_dir().join(format!("whoclosed-hostroot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&host_root);
    let mut cleanup = Cleanup {
        children: Vec::new(),
        cgroups: Vec::new(),
        host_root: host_root.clone(),
    };
    // cgroupfs driver (any runtime) and systemd driver with containerd naming.
    let leaf_a = cleanup.mkdirs(
        &cg2,
        &format!("{test_dir}/kubepods/burstable/pod{UID_A}/{CID_A}"),
    );
    let uid_b_escaped = UID_B.replace('-', "_");
    let leaf_b = cleanup.mkdirs(
        &cg2,
        &format!(
            "{test_dir}/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_b_escaped}.slice/cri-containerd-{CID_B}.scope"
        ),
    );
    kubelet_layout(&host_root, "shop", "web-7f9c-abcde", UID_A, "app", CID_A);
    kubelet_layout(&host_root, "batch", "etl-0", UID_B, "worker", CID_B);
    std::fs::create_dir_all(host_root.join("etc")).expect("mkdir etc");
    std::fs::write(host_root.join("etc/hostname"), "test-node\n").expect("hostname");

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let roots = Roots::with_proc_root(&host_root, "/proc");
    let node = tracer_user::k8s::node_name(None, &roots);
    assert_eq!(node.as_deref(), Some("test-node"));
    let mut resolver = Resolver::new(roots, node, Limits::default());

    let mut owners = Vec::new();
    for leaf in [&leaf_a, &leaf_b] {
        let (child, mut stdin, mut stdout) = spawn_connector(port);
        let pid = child.id();
        cleanup.children.push(child);
        std::fs::write(leaf.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", leaf.display()));
        writeln!(stdin, "go").expect("signal child");
        let mut line = String::new();
        stdout.read_line(&mut line).expect("child output");
        assert_eq!(line.trim(), "connected", "child {pid} did not connect");
        let (_conn, peer) = listener.accept().expect("accept");
        let owner = socket_owner(peer.port(), port)
            .unwrap_or_else(|| panic!("no owner found for 127.0.0.1:{}", peer.port()));
        assert_eq!(owner, pid, "the connection belongs to the child we placed");
        owners.push((owner, stdin, _conn));
    }

    let a = resolver.resolve(owners[0].0).expect("child A is in a pod");
    assert_eq!(
        a,
        PodIdentity {
            node: Some("test-node".into()),
            namespace: Some("shop".into()),
            pod: Some("web-7f9c-abcde".into()),
            container: Some("app".into()),
            pod_uid: UID_A.into(),
            container_id: Some(CID_A.into()),
        }
    );
    let b = resolver.resolve(owners[1].0).expect("child B is in a pod");
    assert_eq!(b.namespace.as_deref(), Some("batch"));
    assert_eq!(b.pod.as_deref(), Some("etl-0"));
    assert_eq!(b.container.as_deref(), Some("worker"));
    assert_eq!(b.pod_uid, UID_B);
    assert_eq!(b.container_id.as_deref(), Some(CID_B));
    // This test process itself is not in a pod.
    assert_eq!(resolver.resolve(std::process::id()), None);

    // Move child A back to the test's own cgroup: after forget, it is no longer a pod's.
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("own cgroup");
    let own_v2 = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line");
    std::fs::write(
        cg2.join(own_v2.trim_start_matches('/'))
            .join("cgroup.procs"),
        owners[0].0.to_string(),
    )
    .expect("move child A out");
    resolver.forget(owners[0].0);
    assert_eq!(resolver.resolve(owners[0].0), None);
    drop(owners);
    drop(cleanup);
    assert!(!base.exists(), "cgroups removed");
}
