//! Pod identity from real cgroups (root): processes are moved into cgroup v2 directories named
//! the way the kubelet and the runtimes name them, make a real TCP connection on loopback, and
//! the resolver must name their pods from a kubelet log layout built in a temporary host root
//! (while pids are read from the real `/proc`).
//!
//! `whoclosed trace` must name them too, in `conn.k8s` and `peer.k8s`, like the agent.
//!
//! Skips with a reason when not root or without a cgroup2 mount, unless `WHOCLOSED_E2E=require`
//! (set by `cargo xtask test`), where that is a failure.
// Test code: a failed expectation is meant to stop the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    io::{BufRead, Read, Write},
    net::TcpListener,
    time::Duration,
};

use tracer_user::k8s::{Limits, PodIdentity, Resolver, Roots};

mod support;
use support::{
    Cleanup, WhoclosedProc, cgroup2_mount, kubelet_layout, one_pod, socket_owner, spawn_connector,
};

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

/// `whoclosed trace` (not only the agent) names the pod of each end: a client in a pod's
/// cgroup connects to a server outside any pod, and the server closes.
#[test]
fn trace_names_the_pods_of_both_ends() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return skip_or_fail("needs root to load eBPF and create cgroups");
    }
    let Some(cg2) = cgroup2_mount() else {
        return skip_or_fail("no cgroup2 mount in /proc/self/mountinfo");
    };
    let pid = std::process::id();
    let host_root = std::env::temp_dir().join(format!("whoclosed-trace-hostroot-{pid}"));
    let (mut cleanup, leaf) = one_pod(
        &cg2,
        &format!("whoclosed-trace-test-{pid}"),
        &host_root,
        UID_A,
        CID_A,
    );

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let args: Vec<String> = [
        "trace",
        "--linger-ms",
        "200",
        "--port",
        &port.to_string(),
        "--host-root",
        host_root.to_str().expect("utf-8 path"),
        "--proc-root",
        "/proc",
        "--node-name",
        "test-node",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut trace = WhoclosedProc::start(env!("CARGO_BIN_EXE_whoclosed"), &args);

    let (child, mut stdin, mut stdout) = spawn_connector(port);
    let child_pid = child.id();
    cleanup.children.push(child);
    std::fs::write(leaf.join("cgroup.procs"), child_pid.to_string()).expect("into the pod");
    writeln!(stdin, "go").expect("go");
    let mut line = String::new();
    stdout.read_line(&mut line).expect("child output");
    assert_eq!(line.trim(), "connected");
    let (mut server, peer) = listener.accept().expect("accept");
    // The server closes; the client reads EOF and exits (closing its end).
    server
        .shutdown(std::net::Shutdown::Both)
        .expect("server shutdown");
    writeln!(stdin, "done").expect("done");
    let _ = server.read_to_end(&mut Vec::new());
    drop(server);

    let pod = serde_json::json!({"node": "test-node", "namespace": "shop",
        "pod": "web-7f9c-abcde", "container": "app", "pod_uid": UID_A, "container_id": CID_A});
    let local_port = |v: &serde_json::Value, key: &str| {
        v["conn"][key]
            .as_str()
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse::<u16>().ok())
    };
    let is_close = |v: &serde_json::Value| v["type"] == "close";
    let client = trace
        .wait_for(Duration::from_secs(15), |v| {
            is_close(v) && local_port(v, "local") == Some(peer.port())
        })
        .unwrap_or_else(|| panic!("no close object for the client: {:#?}", trace.seen));
    assert_eq!(client["conn"]["pid"], child_pid, "{client}");
    assert_eq!(client["conn"]["k8s"], pod, "{client}");
    let server = trace
        .wait_for(Duration::from_secs(15), |v| {
            is_close(v) && local_port(v, "remote") == Some(peer.port())
        })
        .unwrap_or_else(|| panic!("no close object for the server: {:#?}", trace.seen));
    assert_eq!(server["peer"]["k8s"], pod, "{server}");
    assert!(server["conn"].get("k8s").is_none(), "{server}");
    assert_eq!(server["verdict"]["closed_by"], "server", "{server}");
    drop(trace);
    drop(cleanup);
}
