//! Runs of the tracing programs that the kernel skipped.
//!
//! A tracepoint, kprobe or fentry program does not run while another BPF tracing program
//! runs on the same CPU: a softirq that fires `sock:inet_sock_set_state` while one of
//! our tracepoint programs runs in process context loses that event. The kernel counts
//! each such skip in the program's `recursion_misses` (`bpf_prog_info`; fentry since 5.12,
//! tracepoints and kprobes since 6.7). Each is a lost event, like a full ring buffer's, and
//! the agent treats it as one. Older kernels skip without counting.
//!
//! The packet programs (cgroup_skb) have no such guard, and the iterator runs only at the
//! start; neither is read.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use aya::{Ebpf, programs::ProgramFd};
use aya_obj::generated::bpf_prog_info;

use crate::probes::{ProgramStatus, Status};

/// `bpf(2)` command number.
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// The program kinds the kernel's recursion guard applies to.
const GUARDED: [&str; 3] = ["tracepoint", "kprobe", "fentry"];

/// The attached tracing programs, each by a descriptor of its own.
#[derive(Default)]
pub struct Skipped {
    programs: Vec<(&'static str, ProgramFd)>,
}

impl Skipped {
    /// The attached tracing programs of `ebpf`, as `programs` reports them. A program
    /// whose descriptor cannot be duplicated is left out (logged): the count then misses
    /// its skips, which only older kernels would not have counted anyway.
    pub fn of(ebpf: &Ebpf, programs: &[ProgramStatus]) -> Self {
        let mut out = Vec::new();
        for p in programs {
            if p.status != Status::Attached || !GUARDED.contains(&p.kind) {
                continue;
            }
            let fd = ebpf
                .program(p.program)
                .ok_or_else(|| io::Error::other("not in the object"))
                .and_then(|prog| prog.fd().map_err(io::Error::other))
                .and_then(|fd| fd.try_clone());
            match fd {
                Ok(fd) => out.push((p.program, fd)),
                Err(e) => log::warn!("{}: its skipped runs will not be counted: {e}", p.program),
            }
        }
        Skipped { programs: out }
    }

    /// Skipped runs of all these programs since they loaded.
    pub fn total(&self) -> io::Result<u64> {
        self.programs.iter().try_fold(0u64, |sum, (name, fd)| {
            let n = recursion_misses(fd.as_fd())
                .map_err(|e| io::Error::new(e.kind(), format!("{name}: {e}")))?;
            Ok(sum.saturating_add(n))
        })
    }
}

/// Whether a kernel of this release (`uname -r`) counts the skipped runs of tracepoint
/// and kprobe programs (6.7 and later). Unparsable: assumed not.
pub fn counted_by(release: &str) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (6, 7),
        _ => false,
    }
}

/// `recursion_misses` of the program behind `fd`; 0 on a kernel whose `bpf_prog_info`
/// ends before that field (it then counts nothing).
pub fn recursion_misses(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // Only as much of the struct as this needs: the kernel fills `min(len, its own size)`
    // bytes and leaves the rest of ours zero.
    let len = std::mem::offset_of!(bpf_prog_info, recursion_misses) + 8;
    // SAFETY: bpf_prog_info is a plain C struct; all zeroes is its "ask for nothing" value.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let fd = u32::try_from(fd.as_raw_fd()).map_err(io::Error::other)?;
    let len = u32::try_from(len).map_err(io::Error::other)?;
    // bpf_attr.info: bpf_fd, info_len, info (a pointer); the kernel writes at most `len`
    // bytes into `info`, which is larger.
    let [lo, hi] = crate::bpfsys::ptr_words(std::ptr::addr_of_mut!(info));
    crate::bpfsys::bpf(BPF_OBJ_GET_INFO_BY_FD, &[fd, len, lo, hi])?;
    Ok(info.recursion_misses)
}

#[cfg(test)]
mod tests {
    use super::counted_by;

    #[test]
    fn kernels_from_6_7_count_skipped_runs() {
        for (release, want) in [
            ("6.18.44-fc-v657", true),
            ("6.7.0", true),
            ("7.3.4+deb13-cloud-amd64", true),
            ("6.6.58-generic", false),
            ("6.1.0-50-cloud-amd64", false),
            ("5.10.0-32-cloud-amd64", false),
            ("unknown", false),
            ("", false),
        ] {
            assert_eq!(counted_by(release), want, "{release}");
        }
    }
}
