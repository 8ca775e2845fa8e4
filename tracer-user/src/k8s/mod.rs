//! Which pod a process belongs to, from the node's own files.
//!
//! The pod UID and the container ID come from the process's cgroup path
//! (`<proc root>/<pid>/cgroup`, see [`cgroup`]) or, for a socket no event of whose owner was
//! seen, from the path of the socket's own cgroup (its id, from the packet records, looked
//! up in the cgroup v2 mount); the namespace, pod and container names come
//! from the kubelet's log layout under `<host root>/var/log` (see [`kubelet`]). Neither needs
//! the API server. The node name is given (`--node-name`, `NODE_NAME` from the downward API)
//! or read from the host's `/etc/hostname`.
//!
//! `/proc` has its own root because the two sources live in different places: in the
//! DaemonSet the host's root is mounted read-only at `--host-root` and, with `hostPID`, the
//! pod's own `/proc` already shows the host's pids; tests point the log layout at a temporary
//! directory while reading the real `/proc`.

pub mod cgroup;
pub mod kubelet;

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// The pod and container that own a socket, as a future `conn.k8s` / `peer.k8s`.
///
/// `pod_uid` is always known (it is what makes a process a pod's). Names are `null` when the
/// kubelet's log layout does not (yet) list them: a container that is starting, a runtime
/// that logs elsewhere, or the pod's sandbox (`pause`) container, which has no log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodIdentity {
    pub node: Option<String>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
    pub pod_uid: String,
    pub container_id: Option<String>,
}

impl PodIdentity {
    /// Every name is known: nothing more can be learnt by rescanning the log layout.
    fn complete(&self) -> bool {
        self.namespace.is_some()
            && self.pod.is_some()
            && (self.container_id.is_none() || self.container.is_some())
    }
}

/// The pods of a connection's two ends, as written in `conn.k8s` and `peer.k8s`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct K8sEnds {
    /// The socket's owner.
    pub conn: Option<PodIdentity>,
    /// The other end's owner, when that socket is on this node too.
    pub peer: Option<PodIdentity>,
}

impl K8sEnds {
    pub fn is_empty(&self) -> bool {
        self.conn.is_none() && self.peer.is_none()
    }
}

/// Looks up the owner's pod while the process is certainly alive: on the events that run
/// in its context (connect, close, shutdown), so that a verdict made after the linger still
/// names the pod of a process that has exited since.
pub fn note_owner(r: &mut Resolver, ev: &crate::event::Event) {
    use crate::event::{EventKind, TcpState};
    let owner_context = matches!(
        ev.kind,
        EventKind::State {
            new: TcpState::SynSent | TcpState::FinWait1 | TcpState::LastAck,
            ..
        } | EventKind::CloseCall { .. }
    );
    if owner_context && ev.pid != 0 {
        r.resolve(ev.pid);
    }
    // The same for a socket's cgroup, while it exists: a pod's cgroup goes soon after its
    // processes, which can be before the verdict.
    if let EventKind::Packet(p) = &ev.kind
        && p.cgroup_id != 0
    {
        r.note_cgroup(p.cgroup_id);
    }
}

/// The pods of a judged socket's owner and of its peer's: from the owning process when one
/// is known, else from the socket's cgroup.
pub fn ends_of(r: &mut Resolver, c: &crate::conn::Closed) -> K8sEnds {
    K8sEnds {
        conn: r.of_socket(c.owner.as_ref().map(|o| o.0), c.conn.cgroup_id),
        peer: c
            .peer
            .as_ref()
            .and_then(|p| r.of_socket(p.pid, p.cgroup_id)),
    }
}

/// Where the node's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roots {
    /// The host's root filesystem (`/` on the node, e.g. `/host` in the DaemonSet).
    pub host_root: PathBuf,
    /// The procfs whose pids the kernel events carry (host pids).
    pub proc_root: PathBuf,
    /// The cgroup v2 mount whose directories the sockets' cgroup ids name; `None`: sockets
    /// are named only through their owner's pid.
    pub cgroup_root: Option<PathBuf>,
}

impl Roots {
    /// `host_root`, with `/proc` under it.
    pub fn new(host_root: impl Into<PathBuf>) -> Self {
        let host_root = host_root.into();
        let proc_root = host_root.join("proc");
        Self {
            host_root,
            proc_root,
            cgroup_root: None,
        }
    }

    /// `host_root` for the node's files, `proc_root` for pids.
    pub fn with_proc_root(host_root: impl Into<PathBuf>, proc_root: impl Into<PathBuf>) -> Self {
        Self {
            host_root: host_root.into(),
            proc_root: proc_root.into(),
            cgroup_root: None,
        }
    }

    fn log_root(&self) -> PathBuf {
        self.host_root.join("var/log")
    }
}

/// The node's name: `explicit` (a `--node-name` flag or `NODE_NAME`) when non-empty, else
/// the host's `/etc/hostname`, else the kernel's hostname under the proc root.
pub fn node_name(explicit: Option<&str>, roots: &Roots) -> Option<String> {
    let non_empty = |s: &str| {
        let s = s.trim();
        (!s.is_empty()).then(|| s.to_string())
    };
    explicit.and_then(non_empty).or_else(|| {
        [
            roots.host_root.join("etc/hostname"),
            roots.proc_root.join("sys/kernel/hostname"),
        ]
        .iter()
        .find_map(|p| {
            std::fs::read_to_string(p)
                .ok()
                .as_deref()
                .and_then(non_empty)
        })
    })
}

/// Cache and rescan limits of a [`Resolver`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Pids remembered at most (oldest evicted first).
    pub capacity: usize,
    /// How long an answer with every name known (or "not in a pod") is reused. Bounds how
    /// long a reused pid can keep a dead process's identity when its exit was not reported
    /// through [`Resolver::forget`].
    pub ttl: Duration,
    /// How long an answer with missing names is reused before asking again.
    pub incomplete_ttl: Duration,
    /// Minimum time between two scans of the log layout, and between two walks of the
    /// cgroup mount (each happens on a miss).
    pub rescan_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            capacity: 4096,
            ttl: Duration::from_secs(30),
            incomplete_ttl: Duration::from_secs(2),
            rescan_interval: Duration::from_secs(1),
        }
    }
}

struct Entry {
    identity: Option<PodIdentity>,
    expires: Instant,
    inserted: Instant,
}

/// pid → [`PodIdentity`], with a bounded cache.
pub struct Resolver {
    roots: Roots,
    node: Option<String>,
    limits: Limits,
    cache: HashMap<u32, Entry>,
    index: kubelet::Index,
    last_scan: Option<Instant>,
    /// Cgroup directories by id, from the walks of `roots.cgroup_root` (an id is never
    /// reused, so what a walk found stays true after the directory goes).
    cgroups: HashMap<u64, Option<cgroup::CgroupIds>>,
    /// Identities of cgroup ids with every name known, kept after the pod's log layout goes.
    named: HashMap<u64, PodIdentity>,
    /// The last cgroup id found to be in no pod: most packet records come from a few host
    /// cgroups, asked about once per record (`note_owner`), answered here without a lookup.
    last_not_pod: u64,
    last_walk: Option<Instant>,
}

/// Cgroup directories read at most per walk of the mount.
const MAX_CGROUP_DIRS: usize = 65_536;

impl Resolver {
    /// The resolver `trace` and `agent` use: the node named by `node` (a `--node-name`
    /// flag) or found under `roots`, default limits.
    pub fn for_node(roots: Roots, node: Option<&str>) -> Self {
        let node = node_name(node, &roots);
        Self::new(roots, node, Limits::default())
    }

    pub fn new(roots: Roots, node: Option<String>, limits: Limits) -> Self {
        Self {
            roots,
            node,
            limits: Limits {
                capacity: limits.capacity.max(1),
                ..limits
            },
            cache: HashMap::new(),
            index: kubelet::Index::default(),
            last_scan: None,
            cgroups: HashMap::new(),
            named: HashMap::new(),
            last_not_pod: 0,
            last_walk: None,
        }
    }

    /// The pod of a socket: its owner's when the owner is known and in a pod, else the one
    /// its cgroup names.
    pub fn of_socket(
        &mut self,
        pid: Option<u32>,
        cgroup: Option<std::num::NonZeroU64>,
    ) -> Option<PodIdentity> {
        pid.and_then(|p| self.resolve(p))
            .or_else(|| cgroup.and_then(|id| self.resolve_cgroup(id.get())))
    }

    /// Names cgroup `id` now unless that is done: [`Self::resolve_cgroup`] without building
    /// the answer, for a call per packet record.
    pub fn note_cgroup(&mut self, id: u64) {
        if id != self.last_not_pod && !self.named.contains_key(&id) {
            self.resolve_cgroup(id);
        }
    }

    /// The pod a socket's cgroup (its `bpf_skb_cgroup_id`) belongs to: `None` outside any
    /// pod, without a cgroup root, or for an id not found (a cgroup removed since).
    pub fn resolve_cgroup(&mut self, id: u64) -> Option<PodIdentity> {
        self.resolve_cgroup_at(id, Instant::now())
    }

    /// [`Self::resolve_cgroup`] at a given instant (tests drive the clock).
    pub fn resolve_cgroup_at(&mut self, id: u64, now: Instant) -> Option<PodIdentity> {
        if id == self.last_not_pod {
            return None;
        }
        if let Some(known) = self.named.get(&id) {
            return Some(known.clone());
        }
        let root = self.roots.cgroup_root.as_ref()?;
        let due = self
            .last_walk
            .is_none_or(|t| now.saturating_duration_since(t) >= self.limits.rescan_interval);
        if !self.cgroups.contains_key(&id) && due {
            self.last_walk = Some(now);
            match cgroup::dirs_by_id(root, MAX_CGROUP_DIRS) {
                Ok(dirs) => {
                    if self.cgroups.len() + dirs.len() > 2 * MAX_CGROUP_DIRS {
                        self.cgroups.clear();
                    }
                    self.cgroups.extend(dirs);
                }
                Err(e) => log::warn!(
                    "pod names: cannot read the cgroup mount {}: {e}",
                    root.display()
                ),
            }
        }
        let Some(ids) = self.cgroups.get(&id)?.clone() else {
            self.last_not_pod = id;
            return None;
        };
        let identity = self.name(ids, now);
        if identity.complete() {
            if self.named.len() >= self.limits.capacity {
                self.named.clear();
            }
            self.named.insert(id, identity.clone());
        }
        Some(identity)
    }

    /// The pod that `pid` (a pid of the proc root) runs in, or `None` for a process outside
    /// any pod or one that is gone.
    pub fn resolve(&mut self, pid: u32) -> Option<PodIdentity> {
        self.resolve_at(pid, Instant::now())
    }

    /// [`Self::resolve`] at a given instant (tests drive the clock).
    pub fn resolve_at(&mut self, pid: u32, now: Instant) -> Option<PodIdentity> {
        if let Some(e) = self.cache.get(&pid)
            && e.expires > now
        {
            return e.identity.clone();
        }
        let path = self.roots.proc_root.join(pid.to_string()).join("cgroup");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            // The process is gone (or never was): nothing to cache.
            Err(_) => {
                self.cache.remove(&pid);
                return None;
            }
        };
        let identity = cgroup::parse_proc_cgroup(&text).map(|ids| self.name(ids, now));
        let ttl = match &identity {
            Some(id) if !id.complete() => self.limits.incomplete_ttl,
            _ => self.limits.ttl,
        };
        self.insert(pid, identity.clone(), now, ttl);
        identity
    }

    /// Drops what is known about `pid` (call when its process exits).
    pub fn forget(&mut self, pid: u32) {
        self.cache.remove(&pid);
    }

    /// Pids currently cached.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    fn name(&mut self, ids: cgroup::CgroupIds, now: Instant) -> PodIdentity {
        let mut identity = self.lookup(&ids);
        let due = self
            .last_scan
            .is_none_or(|t| now.saturating_duration_since(t) >= self.limits.rescan_interval);
        if !identity.complete() && due {
            self.last_scan = Some(now);
            match kubelet::scan(&self.roots.log_root()) {
                Ok(index) => self.index = index,
                Err(e) => log::warn!(
                    "pod names: cannot read the kubelet log layout under {}: {e}",
                    self.roots.log_root().display()
                ),
            }
            identity = self.lookup(&ids);
        }
        identity
    }

    fn lookup(&self, ids: &cgroup::CgroupIds) -> PodIdentity {
        let container = ids
            .container_id
            .as_ref()
            .and_then(|c| self.index.containers.get(c));
        let pod = self.index.pods.get(&ids.pod_uid);
        PodIdentity {
            node: self.node.clone(),
            namespace: container
                .map(|c| c.namespace.clone())
                .or_else(|| pod.map(|p| p.namespace.clone())),
            pod: container
                .map(|c| c.pod.clone())
                .or_else(|| pod.map(|p| p.pod.clone())),
            container: container.map(|c| c.container.clone()),
            pod_uid: ids.pod_uid.clone(),
            container_id: ids.container_id.clone(),
        }
    }

    fn insert(&mut self, pid: u32, identity: Option<PodIdentity>, now: Instant, ttl: Duration) {
        if self.cache.len() >= self.limits.capacity && !self.cache.contains_key(&pid) {
            self.cache.retain(|_, e| e.expires > now);
            if self.cache.len() >= self.limits.capacity
                && let Some(oldest) = self
                    .cache
                    .iter()
                    .min_by_key(|(_, e)| e.inserted)
                    .map(|(p, _)| *p)
            {
                self.cache.remove(&oldest);
            }
        }
        self.cache.insert(
            pid,
            Entry {
                identity,
                expires: now + ttl,
                inserted: now,
            },
        );
    }

    /// The roots this resolver reads.
    pub fn roots(&self) -> &Roots {
        &self.roots
    }
}

#[cfg(test)]
mod tests;
