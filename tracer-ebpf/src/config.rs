//! What the agent wrote into the object before load, and checked reads of kernel memory.

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf},
    programs::TracePointContext,
};
use tracer_common::{Config, NO_FIELD, counter};

use crate::maps::{TP_SCRATCH, bump};

/// Written by the agent before load (tracepoint layouts and BTF offsets of this kernel).
/// Always read through `read_volatile` so the compiler cannot fold the placeholder value.
#[unsafe(no_mangle)]
static CONFIG: Config = Config::empty();

/// Offset of field `f` in the record of tracepoint `tp`, [`NO_FIELD`] if absent.
#[inline(always)]
pub fn tp_off(tp: usize, f: usize) -> u16 {
    // SAFETY: CONFIG is a plain static; volatile read keeps the loaded value authoritative.
    unsafe { read_volatile(&CONFIG.tp[tp].off[f]) }
}

/// Bytes of a tracepoint record copied per run: every field whoclosed reads lies in the
/// first 96 bytes of its record on the kernels it supports (the largest, `tcp_send_reset`'s
/// `reason`, ends at 92 on 6.18).
pub const TP_COPY: usize = 128;

/// A tracepoint's record, copied once into a per-CPU map value. Each field used to be its
/// own `bpf_probe_read_kernel` (11 to 14 calls per state change: offsets come from the agent,
/// so they cannot be direct context loads); now it is one copy and plain loads, at
/// variable offsets into a map value, which every supported verifier accepts (see
/// verifier.rs).
pub struct TpRec {
    base: *const u8,
}

impl TpRec {
    /// Copies the record behind `ctx`; `None` (counted) if the copy failed.
    #[inline(always)]
    pub fn load(ctx: &TracePointContext) -> Option<TpRec> {
        let v = TP_SCRATCH.get_ptr_mut(0)?;
        // SAFETY: `v` is this CPU's map value, ours for the run; the copy is checked by the
        // helper and its length is the constant TP_COPY (the value is twice that).
        let ok = unsafe {
            let dst = &mut (&mut (*v).b)[..TP_COPY];
            bpf_probe_read_kernel_buf(ctx.as_ptr() as *const u8, dst)
        }
        .is_ok();
        if !ok {
            bump(counter::READ_ERRORS); // exported as `read_errors`
            return None;
        }
        Some(TpRec {
            base: v as *const u8,
        })
    }
}

/// Field `f` of tracepoint `tp` from its copied record; `None` if this kernel lacks it or
/// it lies beyond the copied bytes (counted).
#[inline(always)]
pub fn read_field<T>(rec: &TpRec, tp: usize, f: usize) -> Option<T> {
    let off = tp_off(tp, f);
    if off == NO_FIELD {
        return None;
    }
    if off as usize + core::mem::size_of::<T>() > TP_COPY {
        bump(counter::READ_ERRORS); // exported as `read_errors`
        return None;
    }
    // Masked below TP_COPY whatever LLVM makes of the test above: with a value of
    // 2 * TP_COPY bytes the verifier then sees every read inside it.
    let off = (off as usize) & (TP_COPY - 1);
    // SAFETY: `base` is the per-CPU map value (2 * TP_COPY bytes) and off + size_of::<T>()
    // <= 2 * TP_COPY; records are plain data valid for any bit pattern.
    Some(unsafe { core::ptr::read_unaligned(rec.base.add(off) as *const T) })
}

/// `sk->__sk_common.skc_net` in `struct sock` and `net->ns.inum` in `struct net`, raw
/// (`u32::MAX` when unknown).
#[inline(always)]
pub fn off_netns() -> (u32, u32) {
    // SAFETY: plain static reads.
    unsafe {
        (
            read_volatile(&CONFIG.off_sk_net),
            read_volatile(&CONFIG.off_net_inum),
        )
    }
}

/// `skc_v6_rcv_saddr` and `skc_v6_daddr` in `struct sock`, raw (`u32::MAX` when unknown):
/// the tcp_close handler tests them without building `Option`s (see `verifier.rs`).
#[inline(always)]
pub fn off_v6_addrs() -> (u32, u32) {
    // SAFETY: plain static reads.
    unsafe {
        (
            read_volatile(&CONFIG.off_v6_saddr),
            read_volatile(&CONFIG.off_v6_daddr),
        )
    }
}

/// The chain from a socket to its cgroup id (see `Config::off_sk_cgrp`), raw (`u32::MAX`
/// when unknown).
#[inline(always)]
pub fn off_cgroup() -> (u32, u32, u32) {
    // SAFETY: plain static reads.
    unsafe {
        (
            read_volatile(&CONFIG.off_sk_cgrp),
            read_volatile(&CONFIG.off_cgrp_kn),
            read_volatile(&CONFIG.off_kn_id),
        )
    }
}

/// `flags` in `struct task_struct`, raw (`u32::MAX` when unknown).
#[inline(always)]
pub fn off_task_flags() -> u32 {
    // SAFETY: plain static read.
    unsafe { read_volatile(&CONFIG.off_task_flags) }
}

/// A checked read of kernel memory.
#[inline(always)]
pub fn kread<T>(addr: u64) -> Option<T> {
    // SAFETY: checked kernel read; a bad address returns an error, never faults.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

/// The receive-window bound the agent wrote ([`tracer_common::DEFAULT_RCV_WND_MAX`] when
/// none).
#[inline(always)]
pub fn rcv_wnd_max() -> u32 {
    // SAFETY: plain static read.
    let w = unsafe { read_volatile(&CONFIG.rcv_wnd_max) };
    if w == 0 {
        tracer_common::DEFAULT_RCV_WND_MAX
    } else {
        w
    }
}

/// Fill level at which a record wakes the agent (0: every record may, the kernel's default).
#[inline(always)]
pub fn wakeup_bytes() -> u64 {
    // SAFETY: plain static read.
    u64::from(unsafe { read_volatile(&CONFIG.wakeup_bytes) })
}
