//! Pod and container names from the kubelet's log layout on the node — the node-local source
//! log shippers use, which needs no API server access:
//!
//! - `/var/log/pods/<namespace>_<pod>_<uid>/<container>/<restart>.log`
//! - `/var/log/containers/<pod>_<namespace>_<container>-<container id>.log` (a symlink into
//!   the directory above)
//!
//! Namespaces, pod names and container names are DNS labels or subdomains, so they never
//! contain `_`; the UID and the container ID have fixed shapes. Anything else is ignored.

use std::{collections::HashMap, io, path::Path};

/// Namespace and name of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodName {
    pub namespace: String,
    pub pod: String,
}

/// One container, from its `/var/log/containers` link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerName {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// Everything the log layout tells, indexed the way the resolver asks.
#[derive(Debug, Default, Clone)]
pub struct Index {
    /// Pod UID (dashed, lower case) → names.
    pub pods: HashMap<String, PodName>,
    /// Container ID (64 hex, lower case) → names.
    pub containers: HashMap<String, ContainerName>,
}

/// Parses a `/var/log/pods` directory name: `<namespace>_<pod>_<uid>`.
pub fn parse_pod_dir(name: &str) -> Option<(String, PodName)> {
    let mut parts = name.split('_');
    let (namespace, pod, uid) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !is_dns_name(namespace) || !is_dns_name(pod) {
        return None;
    }
    let uid = uid.to_ascii_lowercase();
    let hex = uid.bytes().filter(u8::is_ascii_hexdigit).count();
    if hex != 32 || uid.bytes().any(|b| !(b.is_ascii_hexdigit() || b == b'-')) {
        return None;
    }
    Some((
        uid,
        PodName {
            namespace: namespace.to_string(),
            pod: pod.to_string(),
        },
    ))
}

/// Parses a `/var/log/containers` file name: `<pod>_<namespace>_<container>-<id>.log`.
pub fn parse_container_link(name: &str) -> Option<(String, ContainerName)> {
    let stem = name.strip_suffix(".log")?;
    let (names, id) = stem.rsplit_once('-')?;
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut parts = names.split('_');
    let (pod, namespace, container) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || ![pod, namespace, container].into_iter().all(is_dns_name) {
        return None;
    }
    Some((
        id.to_ascii_lowercase(),
        ContainerName {
            namespace: namespace.to_string(),
            pod: pod.to_string(),
            container: container.to_string(),
        },
    ))
}

/// Lower-case letters, digits, `-` and `.` (DNS-1123 label or subdomain), not empty.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Reads both directories under `log_root` (normally `<host root>/var/log`). A missing
/// directory is an empty source (a node without pods, or a runtime logging elsewhere); other
/// I/O errors are returned.
pub fn scan(log_root: &Path) -> io::Result<Index> {
    let mut index = Index::default();
    for name in dir_names(&log_root.join("pods"))? {
        if let Some((uid, pod)) = parse_pod_dir(&name) {
            index.pods.insert(uid, pod);
        }
    }
    for name in dir_names(&log_root.join("containers"))? {
        if let Some((id, c)) = parse_container_link(&name) {
            index.containers.insert(id, c);
        }
    }
    Ok(index)
}

fn dir_names(dir: &Path) -> io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in entries {
        if let Some(name) = entry?.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

    #[test]
    fn pod_dirs() {
        type Want<'a> = Option<(&'a str, &'a str, &'a str)>;
        let table: &[(&str, Want)] = &[
            (
                "kube-system_coredns-5d78c9869d-8x2kq_2c7a1f3e-9b1d-4c55-8e0f-1a2b3c4d5e6f",
                Some((
                    "2c7a1f3e-9b1d-4c55-8e0f-1a2b3c4d5e6f",
                    "kube-system",
                    "coredns-5d78c9869d-8x2kq",
                )),
            ),
            (
                "kube-system_etcd-node1.example.com_6d6e2b1f0a9c4e3d8b7a6f5e4d3c2b1a",
                Some((
                    "6d6e2b1f0a9c4e3d8b7a6f5e4d3c2b1a",
                    "kube-system",
                    "etcd-node1.example.com",
                )),
            ),
            ("default_web_not-a-uid", None),
            ("default_web", None),
            ("a_b_c_2c7a1f3e-9b1d-4c55-8e0f-1a2b3c4d5e6f", None),
            ("Default_web_2c7a1f3e-9b1d-4c55-8e0f-1a2b3c4d5e6f", None),
        ];
        for (name, want) in table {
            let got = parse_pod_dir(name);
            let got = got
                .as_ref()
                .map(|(u, p)| (u.as_str(), p.namespace.as_str(), p.pod.as_str()));
            assert_eq!(got, *want, "{name}");
        }
    }

    #[test]
    fn container_links() {
        let ok = format!("coredns-5d78c9869d-8x2kq_kube-system_coredns-{CID}.log");
        let got = parse_container_link(&ok).expect("valid link name");
        assert_eq!(got.0, CID);
        assert_eq!(got.1.pod, "coredns-5d78c9869d-8x2kq");
        assert_eq!(got.1.namespace, "kube-system");
        assert_eq!(got.1.container, "coredns");
        // Container names with dashes: the id is split off at the last dash.
        let dashed = format!("web-0_shop_istio-proxy-{CID}.log");
        let got = parse_container_link(&dashed).expect("valid link name");
        assert_eq!(got.1.container, "istio-proxy");
        for bad in [
            format!("web-0_shop_app-{CID}"),
            format!("web-0_shop_app-{}.log", &CID[..63]),
            format!("web-0_app-{CID}.log"),
            format!("web-0_shop_app_x-{CID}.log"),
            "web-0_shop_app-zz.log".to_string(),
        ] {
            assert_eq!(parse_container_link(&bad), None, "{bad}");
        }
    }

    #[test]
    fn scan_reads_both_directories_and_tolerates_missing_ones() {
        let dir =
            std::env::temp_dir().join(format!("whoclosed-kubelet-scan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pods = dir.join("pods/shop_web-0_2c7a1f3e-9b1d-4c55-8e0f-1a2b3c4d5e6f/app");
        std::fs::create_dir_all(&pods).expect("mkdir");
        std::fs::write(pods.join("0.log"), b"").expect("write");
        std::fs::create_dir_all(dir.join("containers")).expect("mkdir");
        std::os::unix::fs::symlink(
            pods.join("0.log"),
            dir.join(format!("containers/web-0_shop_app-{CID}.log")),
        )
        .expect("symlink");
        std::fs::write(dir.join("containers/unrelated.log"), b"").expect("write");
        let index = scan(&dir).expect("scan");
        assert_eq!(index.pods.len(), 1);
        assert_eq!(
            index.pods["2c7a1f3e-9b1d-4c55-8e0f-1a2b3c4d5e6f"].pod,
            "web-0"
        );
        assert_eq!(index.containers.len(), 1);
        assert_eq!(index.containers[CID].container, "app");
        let empty = scan(&dir.join("nothing-here")).expect("missing dirs are empty");
        assert!(empty.pods.is_empty() && empty.containers.is_empty());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
