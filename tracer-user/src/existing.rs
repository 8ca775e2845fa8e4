//! The connections open before the agent started: the kernel's `iter/tcp` walk over the
//! TCP sockets, one walk per network namespace.
//!
//! A TCP iterator lists the sockets of the network namespace its reader was in when the
//! iterator was created (as `/proc/net/tcp` does), so the agent creates one per namespace
//! that has a process: it enters each (`setns`, on a thread of its own), creates the
//! iterator there and comes back. The program (`tcp_existing` in the kernel object) writes
//! an `EXISTING` record per connection into the ring buffer, in order with the hooks'
//! records, and a byte into the iterator's output; [`crate::trace`] reads that output a
//! chunk at a time and drains the ring buffer in between.

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

// `enum bpf_cmd` and `enum bpf_attach_type` values (stable kernel ABI).
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_TRACE_ITER: u32 = 28;

/// A `bpf(2)` command that returns a new file descriptor.
fn bpf_fd(cmd: libc::c_long, words: &[u32]) -> io::Result<OwnedFd> {
    let fd = crate::bpfsys::bpf(cmd, words)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf(2) returned no descriptor"))?;
    // SAFETY: a descriptor bpf(2) just created for us, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The `iter/tcp` program, linked: each [`ExistingWalk::open`] is a new walk.
pub struct ExistingWalk {
    link: OwnedFd,
}

impl ExistingWalk {
    /// Links the loaded iterator program `prog`.
    pub fn link(prog: std::os::fd::BorrowedFd<'_>) -> io::Result<Self> {
        let prog = u32::try_from(prog.as_raw_fd()).map_err(io::Error::other)?;
        // link_create: prog_fd, target_fd (none), attach_type, flags.
        let link = bpf_fd(BPF_LINK_CREATE, &[prog, 0, BPF_TRACE_ITER, 0])?;
        Ok(Self { link })
    }

    /// Links the loaded map iterator program `prog` (`sk_storage_existing`) with the socket
    /// storage map `map`: each [`ExistingWalk::open`] then lists the sockets holding that
    /// map's state, in every network namespace.
    pub fn link_over_map(
        prog: std::os::fd::BorrowedFd<'_>,
        map: std::os::fd::BorrowedFd<'_>,
    ) -> io::Result<Self> {
        let prog = u32::try_from(prog.as_raw_fd()).map_err(io::Error::other)?;
        // `union bpf_iter_link_info`: `map.map_fd` first. Its size grew with later kernels;
        // the 4 bytes of `map` are what every kernel since 5.9 reads.
        let mut info = [u32::try_from(map.as_raw_fd()).map_err(io::Error::other)?];
        let [lo, hi] = crate::bpfsys::ptr_words(info.as_mut_ptr());
        // link_create: prog_fd, target_fd (none), attach_type, flags, iter_info, its length.
        let link = bpf_fd(BPF_LINK_CREATE, &[prog, 0, BPF_TRACE_ITER, 0, lo, hi, 4])?;
        Ok(Self { link })
    }

    /// A walk: over the TCP sockets of the calling thread's network namespace (`iter/tcp`),
    /// or over a map's sockets ([`ExistingWalk::link_over_map`]).
    pub fn open(&self) -> io::Result<File> {
        let link = u32::try_from(self.link.as_raw_fd()).map_err(io::Error::other)?;
        // iter_create: link_fd, flags.
        Ok(File::from(bpf_fd(BPF_ITER_CREATE, &[link, 0])?))
    }

    /// One walk per network namespace that has a process under `proc_root`, the agent's
    /// own first, each with its namespace's inode. Namespaces that went away meanwhile are
    /// skipped; the other failures are returned with the namespace they concern.
    pub fn open_all(&self, proc_root: &Path) -> (Vec<(u64, File)>, Vec<String>) {
        let mut walks = Vec::new();
        let mut errors = Vec::new();
        let own = ns_inode(Path::new("/proc/thread-self/ns/net"));
        match self.open() {
            Ok(f) => walks.push((own.unwrap_or(0), f)),
            Err(e) => errors.push(format!("own network namespace: {e}")),
        }
        let ns = namespaces(proc_root);
        if let Some(e) = &ns.first_error {
            let what = format!(
                "the network namespaces of {} processes, unreadable ({e})",
                ns.unreadable
            );
            if can_ptrace() {
                // Refused even with CAP_SYS_PTRACE: a process an LSM or its sandbox guards
                // (this project's CI VM refuses its init's). Not this agent's setting to
                // fix, and its namespace is most likely one walked anyway: a note.
                log::info!("not walked: {what}");
            } else {
                errors.push(what);
            }
        }
        let others: Vec<(u64, std::path::PathBuf)> = ns
            .found
            .into_iter()
            .filter(|(ino, _)| Some(*ino) != own)
            .collect();
        if others.is_empty() {
            return (walks, errors);
        }
        // setns(2) moves only the calling thread: a thread of its own, so the runtime's
        // threads never change namespace, and the thread ends where it started or not at all.
        let res = std::thread::scope(|s| {
            s.spawn(|| self.open_in(&others))
                .join()
                .unwrap_or_else(|_| (Vec::new(), vec!["the namespace walker panicked".into()]))
        });
        walks.extend(res.0);
        errors.extend(res.1);
        (walks, errors)
    }

    fn open_in(&self, others: &[(u64, std::path::PathBuf)]) -> (Vec<(u64, File)>, Vec<String>) {
        let mut walks = Vec::new();
        let mut errors = Vec::new();
        let home = match File::open("/proc/thread-self/ns/net") {
            Ok(f) => f,
            Err(e) => return (walks, vec![format!("own network namespace: {e}")]),
        };
        for (ino, path) in others {
            let ns = match File::open(path) {
                Ok(f) => f,
                // Its last process exited since the listing: nothing left to walk.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    errors.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            // SAFETY: setns(2) with a namespace descriptor we hold open.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                errors.push(format!(
                    "entering {}: {}",
                    path.display(),
                    io::Error::last_os_error()
                ));
                continue;
            }
            let walk = self.open();
            // SAFETY: as above, back to the namespace the thread started in.
            if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                // Stuck in another namespace: stop here; the thread ends with the scope.
                errors.push(format!(
                    "returning from {}: {}",
                    path.display(),
                    io::Error::last_os_error()
                ));
                if let Ok(f) = walk {
                    walks.push((*ino, f));
                }
                break;
            }
            match walk {
                Ok(f) => walks.push((*ino, f)),
                Err(e) => errors.push(format!("network namespace {ino}: {e}")),
            }
        }
        (walks, errors)
    }
}

/// Whether this process has `CAP_SYS_PTRACE` in its effective set (without it, another
/// process's namespace is readable only when its capabilities are a subset of ours).
fn can_ptrace() -> bool {
    const CAP_SYS_PTRACE: u32 = 19;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| crate::privilege::cap_eff(&s))
        .is_some_and(|eff| eff & (1 << CAP_SYS_PTRACE) != 0)
}

/// The inode of the namespace at `path` (a `/proc/<pid>/ns/net` link).
fn ns_inode(path: &Path) -> Option<u64> {
    ns_inode_or(path).ok()
}

fn ns_inode_or(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).map(|m| m.ino())
}

/// The network namespaces with a process under a procfs.
#[derive(Debug, Default)]
pub struct Namespaces {
    /// Each namespace's inode and one `/proc/<pid>/ns/net` path to enter it by, in inode
    /// order.
    pub found: Vec<(u64, std::path::PathBuf)>,
    /// Processes whose namespace could not be read (not gone: refused, typically without
    /// `CAP_SYS_PTRACE`), and the first such error.
    pub unreadable: usize,
    pub first_error: Option<String>,
}

/// Every network namespace with a process under `proc_root`.
pub fn namespaces(proc_root: &Path) -> Namespaces {
    let mut found: BTreeMap<u64, std::path::PathBuf> = BTreeMap::new();
    let mut out = Namespaces::default();
    let dir = match std::fs::read_dir(proc_root) {
        Ok(d) => d,
        Err(e) => {
            out.unreadable = 1;
            out.first_error = Some(format!("{}: {e}", proc_root.display()));
            return out;
        }
    };
    for e in dir.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = e.path().join("ns/net");
        match ns_inode_or(&path) {
            Ok(ino) => {
                found.entry(ino).or_insert(path);
            }
            // The process exited since the listing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                out.unreadable += 1;
                if out.first_error.is_none() {
                    out.first_error = Some(format!("{}: {e}", path.display()));
                }
            }
        }
    }
    out.found = found.into_iter().collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_listed_once_each() {
        let ns = namespaces(Path::new("/proc"));
        let all = &ns.found;
        let own = ns_inode(Path::new("/proc/self/ns/net")).expect("own netns");
        assert!(all.iter().any(|(i, _)| *i == own), "{all:?}");
        let mut inodes: Vec<u64> = all.iter().map(|(i, _)| *i).collect();
        inodes.dedup();
        assert_eq!(inodes.len(), all.len(), "{all:?}");
        let none = namespaces(Path::new("/nonexistent"));
        assert!(none.found.is_empty());
        assert_eq!(
            none.unreadable, 1,
            "an unreadable procfs is not an empty one"
        );
        assert!(none.first_error.is_some_and(|e| e.contains("/nonexistent")));
    }
}
