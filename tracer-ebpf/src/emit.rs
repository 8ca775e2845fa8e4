//! The one way a record reaches the agent: reserve, zero, fill the header, fill the
//! payload, submit. Reservation failures are counted.

use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns};
use tracer_common::{WIRE_VERSION, counter, wire::Record};

use crate::{
    config::wakeup_bytes,
    maps::{EVENTS, bump},
    verifier::zero_in_place,
};

/// Reserves a `T` in the ring buffer, fills its header (`kind`, version, size, time, CPU,
/// `skaddr`), lets `fill` write the payload, and submits it. When the ring buffer is full
/// the record is lost and counted in `RINGBUF_DROPS`.
#[inline(always)]
pub fn emit<T: Record + 'static, F: FnOnce(&mut T)>(kind: u8, skaddr: u64, fill: F) {
    let Some(mut entry) = EVENTS.reserve::<T>(0) else {
        bump(counter::RINGBUF_DROPS); // exported as `ringbuf_drops` (and per CPU)
        return;
    };
    // SAFETY: the reservation is ours until submit, 8-byte aligned and `size_of::<T>()`
    // bytes long; records are plain data whose all-zero pattern is valid, so after
    // zeroing the reference is to an initialised `T`.
    let rec = unsafe {
        let p = entry.as_mut_ptr();
        zero_in_place(p);
        &mut *p
    };
    let hdr = rec.header_mut();
    hdr.kind = kind;
    hdr.version = WIRE_VERSION;
    hdr.size = T::SIZE;
    // SAFETY: helpers without preconditions.
    hdr.ts_ns = unsafe { bpf_ktime_get_ns() };
    // SAFETY: as above.
    hdr.cpu = unsafe { bpf_get_smp_processor_id() };
    hdr.skaddr = skaddr;
    fill(rec);
    entry.submit(wakeup_flag(T::SIZE as u64));
    bump(counter::EVENTS); // exported as `events`
}

/// Batched wake-ups: a record wakes the agent only when it takes the buffer's fill level
/// across `wakeup_bytes`; below that the agent drains on its own timer. One wake-up per
/// batch instead of one whenever the agent had caught up (which, under churn, was nearly
/// every record: an irq_work and a reader wake-up each).
#[inline(always)]
fn wakeup_flag(size: u64) -> u64 {
    const BPF_RB_NO_WAKEUP: u64 = 1;
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    const BPF_RB_AVAIL_DATA: u64 = 0;
    let at = wakeup_bytes();
    if at == 0 {
        return 0;
    }
    // Bytes not yet consumed, this reservation included.
    let avail = EVENTS.query(BPF_RB_AVAIL_DATA);
    if avail >= at && avail < at + size + 8 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}
