//! Resolver behaviour over a fake proc root and kubelet layout (no privileges needed); the
//! real-cgroup test is `tracer-user/tests/k8s_cgroups.rs`.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::*;

const UID_A: &str = "2c7a1f3e-9b1d-4c55-8e0f-1a2b3c4d5e6f";
const UID_B: &str = "7d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6";
const CID_A: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
const CID_B: &str = "aaaa2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2bbbb";

struct Fake {
    dir: PathBuf,
}

impl Fake {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("whoclosed-k8s-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("host/var/log/pods")).expect("mkdir");
        std::fs::create_dir_all(dir.join("host/var/log/containers")).expect("mkdir");
        std::fs::create_dir_all(dir.join("proc")).expect("mkdir");
        Self { dir }
    }

    fn roots(&self) -> Roots {
        Roots::with_proc_root(self.dir.join("host"), self.dir.join("proc"))
    }

    fn process(&self, pid: u32, cgroup: &str) {
        let d = self.dir.join("proc").join(pid.to_string());
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("cgroup"), format!("0::{cgroup}\n")).expect("write");
    }

    fn exit(&self, pid: u32) {
        std::fs::remove_dir_all(self.dir.join("proc").join(pid.to_string())).expect("rm");
    }

    fn pod(&self, ns: &str, pod: &str, uid: &str, containers: &[(&str, &str)]) {
        let pod_dir = self
            .dir
            .join("host/var/log/pods")
            .join(format!("{ns}_{pod}_{uid}"));
        for (name, id) in containers {
            let cdir = pod_dir.join(name);
            std::fs::create_dir_all(&cdir).expect("mkdir");
            std::fs::write(cdir.join("0.log"), b"").expect("write");
            let link = self
                .dir
                .join("host/var/log/containers")
                .join(format!("{pod}_{ns}_{name}-{id}.log"));
            std::os::unix::fs::symlink(cdir.join("0.log"), link).expect("symlink");
        }
        std::fs::create_dir_all(&pod_dir).expect("mkdir");
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn limits() -> Limits {
    Limits {
        capacity: 3,
        ttl: Duration::from_secs(30),
        incomplete_ttl: Duration::from_secs(2),
        rescan_interval: Duration::from_secs(1),
    }
}

#[test]
fn names_a_container_process_and_leaves_host_processes_alone() {
    let f = Fake::new("names");
    f.pod("shop", "web-0", UID_A, &[("app", CID_A)]);
    f.process(100, &format!("/kubepods/burstable/pod{UID_A}/{CID_A}"));
    f.process(101, "/system.slice/ssh.service");
    let mut r = Resolver::new(f.roots(), Some("node-1".into()), limits());
    let got = r.resolve(100).expect("pid 100 is in a pod");
    assert_eq!(
        got,
        PodIdentity {
            node: Some("node-1".into()),
            namespace: Some("shop".into()),
            pod: Some("web-0".into()),
            container: Some("app".into()),
            pod_uid: UID_A.into(),
            container_id: Some(CID_A.into()),
        }
    );
    assert_eq!(r.resolve(101), None);
    assert_eq!(r.resolve(999), None, "a pid that does not exist");
    let json = serde_json::to_value(&got).expect("serialises");
    assert_eq!(json["namespace"], "shop");
    assert_eq!(json["pod_uid"], UID_A);
}

#[test]
fn sandbox_container_gets_pod_names_without_a_container_name() {
    let f = Fake::new("sandbox");
    f.pod("shop", "web-0", UID_A, &[("app", CID_A)]);
    // The pause container has its own id but no log link.
    f.process(200, &format!("/kubepods/pod{UID_A}/{CID_B}"));
    let mut r = Resolver::new(f.roots(), None, limits());
    let got = r.resolve(200).expect("in a pod");
    assert_eq!(got.namespace.as_deref(), Some("shop"));
    assert_eq!(got.pod.as_deref(), Some("web-0"));
    assert_eq!(got.container, None);
    assert_eq!(got.container_id.as_deref(), Some(CID_B));
}

#[test]
fn cached_answers_expire_and_names_appear_after_a_rescan() {
    let f = Fake::new("rescan");
    f.process(300, &format!("/kubepods/pod{UID_B}/{CID_B}"));
    let mut r = Resolver::new(f.roots(), None, limits());
    let t0 = Instant::now();
    let first = r.resolve_at(300, t0).expect("uid from the cgroup alone");
    assert_eq!(first.pod_uid, UID_B);
    assert_eq!(first.pod, None, "no log layout yet");
    // The kubelet writes the layout a moment later.
    f.pod("batch", "job-x", UID_B, &[("worker", CID_B)]);
    let cached = r.resolve_at(300, t0 + Duration::from_millis(500));
    assert_eq!(
        cached.and_then(|i| i.pod),
        None,
        "within incomplete_ttl: cached"
    );
    let later = r
        .resolve_at(300, t0 + Duration::from_secs(3))
        .expect("in a pod");
    assert_eq!(later.pod.as_deref(), Some("job-x"));
    assert_eq!(later.container.as_deref(), Some("worker"));
}

#[test]
fn complete_answers_are_reused_until_forgotten_or_expired() {
    let f = Fake::new("reuse");
    f.pod("shop", "web-0", UID_A, &[("app", CID_A)]);
    f.process(400, &format!("/kubepods/pod{UID_A}/{CID_A}"));
    let mut r = Resolver::new(f.roots(), None, limits());
    let t0 = Instant::now();
    assert!(r.resolve_at(400, t0).is_some());
    // The process exits and its pid is reused by a host process.
    f.exit(400);
    f.process(400, "/user.slice/user-0.slice/session-1.scope");
    assert!(
        r.resolve_at(400, t0 + Duration::from_secs(1)).is_some(),
        "cached until ttl or forget"
    );
    r.forget(400);
    assert_eq!(r.resolve_at(400, t0 + Duration::from_secs(1)), None);
    // Expiry without forget.
    f.exit(400);
    r.forget(400);
    f.process(400, &format!("/kubepods/pod{UID_A}/{CID_A}"));
    assert!(r.resolve_at(400, t0 + Duration::from_secs(2)).is_some());
    f.exit(400);
    assert_eq!(
        r.resolve_at(400, t0 + Duration::from_secs(40)),
        None,
        "expired and the process is gone"
    );
    assert_eq!(r.cached(), 0, "a gone process is not cached");
}

#[test]
fn cache_is_bounded() {
    let f = Fake::new("bounded");
    f.pod("shop", "web-0", UID_A, &[("app", CID_A)]);
    for pid in 500..510 {
        f.process(pid, &format!("/kubepods/pod{UID_A}/{CID_A}"));
    }
    let mut r = Resolver::new(f.roots(), None, limits());
    let t0 = Instant::now();
    for (i, pid) in (500..510).enumerate() {
        assert!(
            r.resolve_at(pid, t0 + Duration::from_millis(i as u64))
                .is_some()
        );
        assert!(r.cached() <= 3, "capacity 3, have {}", r.cached());
    }
    assert_eq!(r.cached(), 3);
}

#[test]
fn node_name_sources_in_order() {
    let f = Fake::new("node");
    let roots = f.roots();
    assert_eq!(node_name(Some(" given "), &roots).as_deref(), Some("given"));
    assert_eq!(
        node_name(Some(""), &roots),
        None,
        "nothing else to read yet"
    );
    std::fs::create_dir_all(f.path("proc/sys/kernel")).expect("mkdir");
    std::fs::write(f.path("proc/sys/kernel/hostname"), "kernel-name\n").expect("write");
    assert_eq!(node_name(None, &roots).as_deref(), Some("kernel-name"));
    std::fs::create_dir_all(f.path("host/etc")).expect("mkdir");
    std::fs::write(f.path("host/etc/hostname"), "node-7\n").expect("write");
    assert_eq!(node_name(None, &roots).as_deref(), Some("node-7"));
    assert_eq!(Roots::new("/host").proc_root, Path::new("/host/proc"));
}

/// A socket's cgroup id (its directory's inode number) names the pod its path names: found
/// by a walk of the mount, walked again for an unknown id at most every `rescan_interval`;
/// the owner's pid, when known and in a pod, comes first.
#[test]
fn a_sockets_cgroup_id_names_its_pod() {
    use std::os::unix::fs::MetadataExt;
    let f = Fake::new("cgid");
    f.pod("shop", "web-0", UID_A, &[("app", CID_A)]);
    let cg = f.path("cg");
    let leaf = cg.join(format!("kubepods/burstable/pod{UID_A}/{CID_A}"));
    std::fs::create_dir_all(&leaf).expect("mkdir");
    std::fs::create_dir_all(cg.join("system.slice/ssh.service")).expect("mkdir");
    let ino = |p: &Path| std::fs::metadata(p).expect("stat").ino();
    let mut roots = f.roots();
    let mut r = Resolver::new(roots.clone(), None, limits());
    assert_eq!(r.resolve_cgroup(ino(&leaf)), None, "no cgroup root given");
    roots.cgroup_root = Some(cg.clone());
    let mut r = Resolver::new(roots, None, limits());
    let t0 = Instant::now();
    let got = r
        .resolve_cgroup_at(ino(&leaf), t0)
        .expect("the container's cgroup");
    assert_eq!(got.pod.as_deref(), Some("web-0"));
    assert_eq!(got.container.as_deref(), Some("app"));
    assert_eq!(got.container_id.as_deref(), Some(CID_A));
    let pod_dir = cg.join(format!("kubepods/burstable/pod{UID_A}"));
    let pod_level = r
        .resolve_cgroup_at(ino(&pod_dir), t0)
        .expect("the pod's cgroup");
    assert_eq!(
        (pod_level.pod.as_deref(), pod_level.container_id),
        (Some("web-0"), None)
    );
    let host = cg.join("system.slice/ssh.service");
    assert_eq!(r.resolve_cgroup_at(ino(&host), t0), None, "not a pod");
    assert_eq!(r.resolve_cgroup_at(ino(&cg), t0), None, "the root");

    // A pod started after the walk: unknown until the next walk is due.
    f.pod("batch", "job-x", UID_B, &[("worker", CID_B)]);
    let late = cg.join(format!("kubepods/pod{UID_B}/{CID_B}"));
    std::fs::create_dir_all(&late).expect("mkdir");
    assert_eq!(
        r.resolve_cgroup_at(ino(&late), t0 + Duration::from_millis(500)),
        None,
        "walked again before rescan_interval"
    );
    let found = r.resolve_cgroup_at(ino(&late), t0 + Duration::from_secs(2));
    assert_eq!(found.and_then(|i| i.pod).as_deref(), Some("job-x"));

    // The owner's pid first; the cgroup when the pid is unknown or outside any pod.
    f.process(400, &format!("/kubepods/pod{UID_B}/{CID_B}"));
    f.process(401, "/system.slice/ssh.service");
    let id = std::num::NonZeroU64::new(ino(&leaf));
    let pod = |i: Option<PodIdentity>| i.and_then(|i| i.pod);
    assert_eq!(pod(r.of_socket(Some(400), id)).as_deref(), Some("job-x"));
    assert_eq!(pod(r.of_socket(Some(401), id)).as_deref(), Some("web-0"));
    assert_eq!(pod(r.of_socket(None, id)).as_deref(), Some("web-0"));
    assert_eq!(r.of_socket(None, None), None);
}

/// A socket's pod, once named, outlives its cgroup and its log layout (the pod's processes
/// and files can go before the verdict); a host cgroup stays no pod.
#[test]
fn a_cgroup_named_once_stays_named_after_the_pod_goes() {
    use std::os::unix::fs::MetadataExt;
    let f = Fake::new("cggone");
    f.pod("shop", "web-0", UID_A, &[("app", CID_A)]);
    let cg = f.path("cg");
    let leaf = cg.join(format!("kubepods/pod{UID_A}/{CID_A}"));
    let host = cg.join("system.slice");
    std::fs::create_dir_all(&leaf).expect("mkdir");
    std::fs::create_dir_all(&host).expect("mkdir");
    let (id, host_id) = (
        std::fs::metadata(&leaf).expect("stat").ino(),
        std::fs::metadata(&host).expect("stat").ino(),
    );
    let mut roots = f.roots();
    roots.cgroup_root = Some(cg.clone());
    let mut r = Resolver::new(roots, None, limits());
    let t0 = Instant::now();
    // What the pipeline does at each packet record.
    r.note_cgroup(id);
    r.note_cgroup(host_id);
    // Another pod starts, not yet in the log layout. Made before the first pod's directory
    // goes: a plain filesystem reuses a freed inode number at once (the kernel never reuses
    // a cgroup id), and this test once failed in CI when the new directory got the old one's.
    let other = cg.join(format!("kubepods/pod{UID_B}/{CID_B}"));
    std::fs::create_dir_all(&other).expect("mkdir");
    let other_id = std::fs::metadata(&other).expect("stat").ino();
    assert_ne!(other_id, id);
    std::fs::remove_dir_all(cg.join(format!("kubepods/pod{UID_A}")))
        .expect("the pod's cgroup goes");
    for d in ["host/var/log/pods", "host/var/log/containers"] {
        std::fs::remove_dir_all(f.path(d)).expect("its logs go");
        std::fs::create_dir_all(f.path(d)).expect("mkdir");
    }
    let later = t0 + Duration::from_secs(60);
    // The mount is walked and the layout scanned again for the new pod, neither of which
    // holds the first pod any more.
    let b = r.resolve_cgroup_at(other_id, later).expect("a pod");
    assert_eq!((b.pod_uid.as_str(), b.pod), (UID_B, None));
    let got = r.resolve_cgroup_at(id, later).expect("still named");
    assert_eq!(got.pod.as_deref(), Some("web-0"));
    assert_eq!(r.resolve_cgroup_at(host_id, later), None);
    assert_eq!(
        r.resolve_cgroup_at(id, later).and_then(|i| i.container),
        Some("app".into())
    );
}
