//! Workarounds for BPF verifiers, in one place. Each says which kernels need it; the VM
//! matrix (`cargo xtask vm ci`: 5.10, 6.1, 7.3) is what proves they are still enough.
//!
//! Rules the rest of the crate follows because of these verifiers (not code, so listed):
//! - **No `memset` / `memcmp` / `memcpy` calls** (5.10, 6.1): LLVM turns a zeroed array, an
//!   array comparison or a large copy into a call, a BPF-to-BPF call with a stack frame of
//!   its own counted against the 512-byte budget of the whole call chain. Records are
//!   zeroed in place ([`zero_in_place`]), the preface is compared as three words
//!   (`tracer_common::h2sniff::is_preface_words`), headers are built by value.
//! - **No `Option` pairs carried across helper calls** (5.10, 6.1): their discriminants are
//!   spilled to the stack and these verifiers lose track of them, then reject a path that
//!   cannot be taken (the tcp_close handler writes straight into the record instead).
//! - **Variable offsets only into map values or ring-buffer records, not the stack** (5.10:
//!   helpers get no variable-offset stack pointers before 5.12): split frame headers are
//!   buffered in the per-socket map value.
//! - **Packet offsets masked to 20 bits** before `bpf_skb_load_bytes` ([`pkt_off`]), so
//!   the offset argument is a bounded scalar whatever LLVM did to the arithmetic before it.

use core::ptr::read_volatile;

/// A helper length older verifiers (5.10, 6.1) can prove is in `[1, mask + 1]`: they do not
/// carry an earlier `n != 0` test into the size argument once LLVM has rewritten the
/// comparisons. The volatile round trip stops LLVM from folding the masking away again.
/// `mask + 1` must be a power of two; callers guarantee `1 <= n <= mask + 1` (otherwise the
/// result is still in range, just not `n`).
#[inline(always)]
pub fn verifier_len(n: u32, mask: u32) -> u32 {
    // SAFETY: reads a local.
    let n = unsafe { read_volatile(&n) };
    (n.wrapping_sub(1) & mask) + 1
}

/// An offset into the packet, masked to 20 bits: a GSO packet can be larger than 64 KiB
/// (BIG TCP allows 512 KiB, and loopback builds such packets), so 16 bits would wrap an
/// offset and read the wrong bytes.
#[inline(always)]
pub fn pkt_off(off: u32) -> u32 {
    off & 0xf_ffff
}

/// Zeroes a `T` in place with volatile 8-byte stores. Volatile keeps LLVM from turning the
/// loop into a `memset` call or from building the value on the stack first (a 112-byte
/// record would take a fifth of the 512-byte stack; 5.10 and 6.1 count the memset frame on
/// top).
///
/// # Safety
///
/// `p` must be valid for writes of `size_of::<T>()` bytes and 8-byte aligned (ring-buffer
/// reservations are), `size_of::<T>()` must be a multiple of 8, and every bit pattern of
/// zeroes must be a valid `T` (true of the plain-data records of `tracer_common::wire`).
#[inline(always)]
pub unsafe fn zero_in_place<T>(p: *mut T) {
    let words = core::mem::size_of::<T>() / 8;
    let p = p.cast::<u64>();
    let mut i = 0;
    while i < words {
        // SAFETY: `i < words` keeps the store inside the `size_of::<T>()` bytes the caller
        // vouched for, at an 8-byte aligned address.
        unsafe { core::ptr::write_volatile(p.add(i), 0) };
        i += 1;
    }
}
