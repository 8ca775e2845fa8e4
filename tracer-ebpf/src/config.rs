//! What the agent wrote into the object before load, and checked reads of kernel memory.

use core::ptr::read_volatile;

use aya_ebpf::{helpers::bpf_probe_read_kernel, programs::TracePointContext};
use tracer_common::{Config, NO_FIELD, counter};

use crate::maps::bump;

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

/// Reads field `f` of tracepoint `tp`; `None` if this kernel lacks it or the read failed
/// (counted).
#[inline(always)]
pub fn read_field<T>(ctx: &TracePointContext, tp: usize, f: usize) -> Option<T> {
    let off = tp_off(tp, f);
    if off == NO_FIELD {
        return None;
    }
    // SAFETY: the offset comes from this kernel's tracepoint format; the read is checked
    // by bpf_probe_read_kernel.
    match unsafe { ctx.read_at::<T>(off as usize) } {
        Ok(v) => Some(v),
        Err(_) => {
            bump(counter::READ_ERRORS); // exported as `read_errors`
            None
        }
    }
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
