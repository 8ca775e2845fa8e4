//! Pod UID and container ID from a cgroup path, the way the kubelet and the container
//! runtimes name their cgroups.
//!
//! The path is read segment by segment instead of by prefix, so that it does not matter where
//! the kubelet's cgroup root sits (`/kubepods`, `/kubelet/kubepods`, `/kubelet.slice/...`,
//! a node that itself runs in a container) nor whether the reader's cgroup namespace turns
//! the head of the path into `/..`. The *last* segment that names a pod wins (a kind node's
//! own docker scope comes earlier), and the container is the segment right below it.

/// What a cgroup path says about its processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupIds {
    /// Pod UID, always with dashes (`systemd` cgroup names carry underscores).
    pub pod_uid: String,
    /// The 64-hex container ID, when the process sits in a container's cgroup (not in the
    /// pod's own cgroup or in CRI-O's `conmon` scope).
    pub container_id: Option<String>,
    /// Which naming the container segment used.
    pub runtime: Option<Runtime>,
}

/// Container runtime naming recognised in the container segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// `cri-containerd-<id>.scope` (systemd driver).
    Containerd,
    /// `crio-<id>.scope` (systemd driver).
    CriO,
    /// `docker-<id>.scope` (systemd driver, dockershim / cri-dockerd).
    Docker,
    /// A bare `<id>` segment (cgroupfs driver, any runtime).
    Cgroupfs,
}

/// Parses the path of one `/proc/<pid>/cgroup` line (the part after the second `:`).
pub fn parse_path(path: &str) -> Option<CgroupIds> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (at, pod_uid) = segments
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, s)| pod_segment(s).map(|uid| (i, uid)))?;
    let (container_id, runtime) = match segments.get(at + 1).and_then(|s| container_segment(s)) {
        Some((id, rt)) => (Some(id), Some(rt)),
        None => (None, None),
    };
    Some(CgroupIds {
        pod_uid,
        container_id,
        runtime,
    })
}

/// Parses a whole `/proc/<pid>/cgroup` file: the cgroup v2 line (`0::`) is preferred, then
/// any v1 hierarchy whose path names a pod (hybrid and v1-only nodes).
pub fn parse_proc_cgroup(text: &str) -> Option<CgroupIds> {
    let paths: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let id = parts.next()?;
            let _controllers = parts.next()?;
            Some((id, parts.next()?))
        })
        .collect();
    let v2 = paths
        .iter()
        .filter(|(id, _)| *id == "0")
        .filter_map(|(_, p)| parse_path(p));
    let v1 = paths
        .iter()
        .filter(|(id, _)| *id != "0")
        .filter_map(|(_, p)| parse_path(p));
    let mut all = v2.chain(v1);
    let first = all.next()?;
    // A v1 hierarchy (e.g. `name=systemd` or `memory`) may name the container where the
    // v2 line only reaches the pod; prefer a candidate for the same pod that has one.
    if first.container_id.is_some() {
        return Some(first);
    }
    Some(
        all.find(|c| c.pod_uid == first.pod_uid && c.container_id.is_some())
            .unwrap_or(first),
    )
}

/// `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid_with_underscores>.slice` (systemd),
/// also under a kubelet cgroup root prefix (`kubelet-kubepods-...`).
fn pod_segment(seg: &str) -> Option<String> {
    let raw = if let Some(slice) = seg.strip_suffix(".slice") {
        let at = slice.rfind("-pod")?;
        let head = &slice[..at];
        if !(head == "kubepods" || head.ends_with("-kubepods") || head.contains("kubepods-")) {
            return None;
        }
        &slice[at + 4..]
    } else {
        seg.strip_prefix("pod")?
    };
    normalise_uid(raw)
}

/// A pod UID: a dashed UUID, or 32 hex digits (static pods' config hash). Underscores (the
/// systemd driver's escaping of `-`) become dashes.
fn normalise_uid(raw: &str) -> Option<String> {
    let uid: String = raw
        .chars()
        .map(|c| {
            if c == '_' {
                '-'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect();
    let hex = uid.chars().filter(char::is_ascii_hexdigit).count();
    let dashes = uid.chars().filter(|&c| c == '-').count();
    let shape_ok = match dashes {
        0 => true,
        4 => {
            let groups: Vec<usize> = uid.split('-').map(str::len).collect();
            groups == [8, 4, 4, 4, 12]
        }
        _ => false,
    };
    (hex == 32 && hex + dashes == uid.len() && shape_ok).then_some(uid)
}

fn container_segment(seg: &str) -> Option<(String, Runtime)> {
    if let Some(scope) = seg.strip_suffix(".scope") {
        for (prefix, rt) in [
            ("cri-containerd-", Runtime::Containerd),
            ("crio-", Runtime::CriO),
            ("docker-", Runtime::Docker),
        ] {
            if let Some(id) = scope.strip_prefix(prefix) {
                // `crio-conmon-<id>.scope` holds CRI-O's monitor, not the container.
                return is_container_id(id).then(|| (id.to_ascii_lowercase(), rt));
            }
        }
        return None;
    }
    is_container_id(seg).then(|| (seg.to_ascii_lowercase(), Runtime::Cgroupfs))
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The directories of a cgroup v2 mount by id: a cgroup's id (what `bpf_skb_cgroup_id`
/// returns for a socket) is its directory's inode number on 64-bit kernels (5.5 and later).
/// Each maps to what its path says ([`parse_path`], `None` outside any pod). At most `cap`
/// directories are read (a node has a few thousand); `Err` only when the mount itself cannot
/// be read. Directories that vanish during the walk are skipped.
pub fn dirs_by_id(
    root: &std::path::Path,
    cap: usize,
) -> std::io::Result<std::collections::HashMap<u64, Option<CgroupIds>>> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::HashMap::new();
    out.insert(std::fs::metadata(root)?.ino(), None);
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            // `file_type` does not follow symbolic links: only real cgroup directories.
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(meta) = e.metadata() else { continue };
            if out.len() >= cap {
                return Ok(out);
            }
            let rel = format!("{rel}/{}", e.file_name().to_string_lossy());
            out.insert(meta.ino(), parse_path(&rel));
            stack.push((e.path(), rel));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "2c7a1f3e-9b1d-4c55-8e0f-1a2b3c4d5e6f";
    const UID_US: &str = "2c7a1f3e_9b1d_4c55_8e0f_1a2b3c4d5e6f";
    const CID: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

    /// (case, path, expected pod uid, expected container id, runtime)
    type Case = (
        &'static str,
        String,
        Option<String>,
        Option<String>,
        Option<Runtime>,
    );

    fn cases() -> Vec<Case> {
        let uid = Some(UID.to_string());
        let cid = Some(CID.to_string());
        let static_uid = "6d6e2b1f0a9c4e3d8b7a6f5e4d3c2b1a";
        vec![
            (
                "cgroupfs guaranteed",
                format!("/kubepods/pod{UID}/{CID}"),
                uid.clone(),
                cid.clone(),
                Some(Runtime::Cgroupfs),
            ),
            (
                "cgroupfs burstable",
                format!("/kubepods/burstable/pod{UID}/{CID}"),
                uid.clone(),
                cid.clone(),
                Some(Runtime::Cgroupfs),
            ),
            (
                "cgroupfs besteffort",
                format!("/kubepods/besteffort/pod{UID}/{CID}"),
                uid.clone(),
                cid.clone(),
                Some(Runtime::Cgroupfs),
            ),
            (
                "cgroupfs under a kubelet cgroup root",
                format!("/kubelet/kubepods/burstable/pod{UID}/{CID}"),
                uid.clone(),
                cid.clone(),
                Some(Runtime::Cgroupfs),
            ),
            (
                "cgroupfs seen from inside a cgroup namespace",
                format!("/../../kubepods/besteffort/pod{UID}/{CID}"),
                uid.clone(),
                cid.clone(),
                Some(Runtime::Cgroupfs),
            ),
            (
                "systemd containerd guaranteed",
                format!("/kubepods.slice/kubepods-pod{UID_US}.slice/cri-containerd-{CID}.scope"),
                uid.clone(),
                cid.clone(),
                Some(Runtime::Containerd),
            ),
            (
                "systemd containerd burstable",
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice/cri-containerd-{CID}.scope"
                ),
                uid.clone(),
                cid.clone(),
                Some(Runtime::Containerd),
            ),
            (
                "systemd cri-o besteffort",
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_US}.slice/crio-{CID}.scope"
                ),
                uid.clone(),
                cid.clone(),
                Some(Runtime::CriO),
            ),
            (
                "systemd cri-o with a nested container cgroup",
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice/crio-{CID}.scope/container"
                ),
                uid.clone(),
                cid.clone(),
                Some(Runtime::CriO),
            ),
            (
                "systemd cri-o conmon is not the container",
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice/crio-conmon-{CID}.scope"
                ),
                uid.clone(),
                None,
                None,
            ),
            (
                "systemd docker (cri-dockerd)",
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice/docker-{CID}.scope"
                ),
                uid.clone(),
                cid.clone(),
                Some(Runtime::Docker),
            ),
            (
                "kind node: kubelet.slice root inside the node container's scope",
                format!(
                    "/system.slice/docker-{CID}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_US}.slice/cri-containerd-{}.scope",
                    CID.replace('0', "a")
                ),
                uid.clone(),
                Some(CID.replace('0', "a")),
                Some(Runtime::Containerd),
            ),
            (
                "static pod uid (config hash, no dashes)",
                format!("/kubepods/burstable/pod{static_uid}/{CID}"),
                Some(static_uid.to_string()),
                cid.clone(),
                Some(Runtime::Cgroupfs),
            ),
            (
                "upper-case hex is normalised",
                format!("/kubepods/pod{}/{}", UID.to_uppercase(), CID.to_uppercase()),
                uid.clone(),
                cid.clone(),
                Some(Runtime::Cgroupfs),
            ),
            (
                "process in the pod cgroup itself",
                format!("/kubepods/burstable/pod{UID}"),
                uid.clone(),
                None,
                None,
            ),
            (
                "deeper cgroups inside the container",
                format!("/kubepods/pod{UID}/{CID}/init.scope/child"),
                uid.clone(),
                cid.clone(),
                Some(Runtime::Cgroupfs),
            ),
            ("host root", "/".to_string(), None, None, None),
            (
                "systemd service",
                "/system.slice/ssh.service".to_string(),
                None,
                None,
                None,
            ),
            (
                "plain docker container, not a pod",
                format!("/system.slice/docker-{CID}.scope"),
                None,
                None,
                None,
            ),
            (
                "cgroupfs docker, not a pod",
                format!("/docker/{CID}"),
                None,
                None,
                None,
            ),
            (
                "qos slice alone",
                "/kubepods.slice/kubepods-burstable.slice".to_string(),
                None,
                None,
                None,
            ),
            (
                "a user slice named like a pod is not a pod",
                format!("/user.slice/user-pod{UID_US}.slice"),
                None,
                None,
                None,
            ),
            (
                "short uid",
                "/kubepods/burstable/pod1234/abc".to_string(),
                None,
                None,
                None,
            ),
            (
                "uid with a misplaced dash",
                format!(
                    "/kubepods/pod{}/{CID}",
                    "2c7a1f3e9-b1d-4c55-8e0f-1a2b3c4d5e6f"
                ),
                None,
                None,
                None,
            ),
            (
                "short container id",
                format!("/kubepods/pod{UID}/{}", &CID[..12]),
                uid.clone(),
                None,
                None,
            ),
        ]
    }

    #[test]
    fn parses_real_world_path_shapes() {
        for (case, path, want_uid, want_cid, want_rt) in cases() {
            let got = parse_path(&path);
            assert_eq!(
                got.as_ref().map(|g| g.pod_uid.clone()),
                want_uid,
                "{case}: pod uid of {path}"
            );
            assert_eq!(
                got.as_ref().and_then(|g| g.container_id.clone()),
                want_cid,
                "{case}: container id of {path}"
            );
            assert_eq!(
                got.as_ref().and_then(|g| g.runtime),
                want_rt,
                "{case}: runtime of {path}"
            );
        }
    }

    #[test]
    fn proc_cgroup_prefers_v2_then_v1_with_a_container() {
        let v2_only = format!("0::/kubepods/burstable/pod{UID}/{CID}\n");
        assert_eq!(
            parse_proc_cgroup(&v2_only).and_then(|c| c.container_id),
            Some(CID.to_string())
        );
        // Hybrid node where the unified hierarchy is unused: only v1 lines name the pod.
        let hybrid = format!(
            "12:memory:/kubepods/burstable/pod{UID}/{CID}\n1:name=systemd:/kubepods/burstable/pod{UID}/{CID}\n0::/\n"
        );
        let got = parse_proc_cgroup(&hybrid).expect("v1 line names the pod");
        assert_eq!(got.pod_uid, UID);
        assert_eq!(got.container_id.as_deref(), Some(CID));
        // v2 reaches only the pod; a v1 line for the same pod names the container.
        let split = format!("4:cpu:/kubepods/pod{UID}/{CID}\n0::/kubepods/pod{UID}\n");
        assert_eq!(
            parse_proc_cgroup(&split).and_then(|c| c.container_id),
            Some(CID.to_string())
        );
        // Not in a pod anywhere.
        assert_eq!(parse_proc_cgroup("0::/system.slice/ssh.service\n"), None);
        assert_eq!(parse_proc_cgroup(""), None);
    }
}
