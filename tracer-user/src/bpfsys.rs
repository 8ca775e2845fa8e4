//! `bpf(2)` itself, for the few commands aya 0.14 does not offer the way the agent needs
//! them (an iterator per namespace, a program's skipped runs).

use std::io;

/// A `bpf(2)` call whose attribute is the first `words` of `union bpf_attr` (the rest zero:
/// the kernel reads `size` bytes and treats what it does not get as zero). Pointers go in
/// as two words, low half first. Returns what the call returned (a descriptor, or 0).
pub(crate) fn bpf(cmd: libc::c_long, words: &[u32]) -> io::Result<libc::c_long> {
    let mut attr = [0u32; 16];
    let n = words.len().min(attr.len());
    attr[..n].copy_from_slice(&words[..n]);
    // SAFETY: bpf(2) reads `size_of_val(&attr)` bytes of the attribute, which lives across
    // the call; any pointer in it is the caller's, valid for what the command writes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr) as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// `ptr` as the two attribute words of a 64-bit pointer field.
pub(crate) fn ptr_words<T>(ptr: *mut T) -> [u32; 2] {
    let p = ptr as u64;
    [p as u32, (p >> 32) as u32]
}
