//! whoclosed kernel programs: thin producers of TCP lifecycle facts.
//!
//! No policy lives here. Every hook fills one record of the wire format
//! (`tracer_common::wire`) and submits it through [`emit::emit`]; the agent decides what the
//! facts mean. This file holds only the entry points, each a thin wrapper around a `try_*`
//! function of its program group:
//!
//! - `lifecycle`: the six stable tracepoints;
//! - `close`: `tcp_close()` through fentry or kprobe, one handler; and `tcp_existing`, the
//!   `iter/tcp` walk over the sockets open before the agent, and `sk_storage_existing`, the
//!   same listing over the sockets that hold packet state, every namespace at once;
//! - `packet`: cgroup_skb ingress/egress, feeding `h2walk`, the HTTP/2 frame walker, which
//!   runs in programs of its own (`skb_h2_in`/`skb_h2_out`, continued by
//!   `skb_walk_in`/`skb_walk_out`; tail-called, never attached);
//! - `config`, `maps`, `emit`: what they share; `verifier`: workarounds for old verifiers.
#![no_std]
#![no_main]

mod close;
mod config;
mod emit;
mod h2walk;
mod lifecycle;
mod maps;
mod packet;
mod verifier;

use aya_ebpf::{
    macros::{cgroup_skb, fentry, kprobe, tracepoint},
    programs::{FEntryContext, ProbeContext, SkBuffContext, TracePointContext},
};
use tracer_common::{kind, tp};

/// cgroup_skb verdict: 1 lets the packet through. We never drop.
const PASS: i32 = 1;

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = lifecycle::try_set_state(&ctx);
    0
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let _ = lifecycle::try_retransmit(&ctx);
    0
}

#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let _ = lifecycle::try_send_reset(&ctx);
    0
}

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let _ = lifecycle::try_sk_event(&ctx, tp::RECV_RESET, kind::RECV_RESET);
    0
}

#[tracepoint(category = "tcp", name = "tcp_destroy_sock")]
pub fn tcp_destroy_sock(ctx: TracePointContext) -> u32 {
    let _ = lifecycle::try_destroy(&ctx);
    0
}

#[tracepoint(category = "sock", name = "inet_sk_error_report")]
pub fn inet_sk_error_report(ctx: TracePointContext) -> u32 {
    let _ = lifecycle::try_error_report(&ctx);
    0
}

#[fentry(function = "tcp_close")]
pub fn tcp_close_fentry(ctx: FEntryContext) -> u32 {
    let sk: *const u8 = ctx.arg(0);
    let _ = close::try_tcp_close(sk as u64);
    0
}

#[kprobe]
pub fn tcp_close_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<*const u8>(0) {
        let _ = close::try_tcp_close(sk as u64);
    }
    0
}

/// The sockets that were open before the agent: run for every TCP socket, once, when the
/// agent reads this iterator after its hooks are attached. Each connection goes into the
/// ring buffer as an `EXISTING` record (in order with the hooks' records) and one byte
/// into the iterator's output: the agent reads that in small chunks and drains the ring
/// buffer between them, so a host with many sockets does not overflow it. A BTF tracing
/// program (like fentry): kernels that refuse those refuse it, and the agent says so.
///
/// # Safety
/// Called by the kernel with `ctx` pointing at a `struct bpf_iter__tcp` (`meta`,
/// `sk_common`, `uid`); the verifier checks the loads made from it.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub unsafe extern "C" fn tcp_existing(ctx: *const u64) -> i32 {
    // SAFETY: see above; `sk_common` is the second pointer of the context (NULL on the
    // walk's final call), `meta` the first, whose first field is the output's `seq_file`.
    let sk = unsafe { core::ptr::read_volatile(ctx.add(1)) };
    if close::try_existing(sk).is_some() {
        // SAFETY: as above.
        unsafe { one_byte_out(ctx) };
    }
    0
}

/// The sockets that hold the packet hooks' state (`SK_PKT`), in every network namespace:
/// the same `EXISTING` record and output byte as [`tcp_existing`], for each live socket
/// that has passed a segment since the agent attached. The agent's recheck after lost
/// events runs it for the namespaces it cannot walk with `iter/tcp` (entering one takes
/// `setns`, which the least-privilege DaemonSet does not grant): a record whose socket
/// had state and is not listed belongs to a socket the kernel has freed. Linked with the
/// map by the agent; a BTF tracing program like `tcp_existing`.
///
/// # Safety
/// Called by the kernel with `ctx` pointing at a `struct bpf_iter__bpf_sk_storage_map`
/// (`meta`, `map`, `sk`, `value`); the verifier checks the loads made from it.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/bpf_sk_storage_map")]
pub unsafe extern "C" fn sk_storage_existing(ctx: *const u64) -> i32 {
    // SAFETY: see above; `sk` is the third pointer of the context (NULL on the walk's
    // final call).
    let sk = unsafe { core::ptr::read_volatile(ctx.add(2)) };
    if close::try_existing(sk).is_some() {
        // SAFETY: as above.
        unsafe { one_byte_out(ctx) };
    }
    0
}

/// One byte into an iterator's output, for the agent's chunked read.
///
/// # Safety
/// `ctx` is an iterator program's context, whose first pointer is its `bpf_iter_meta`,
/// whose first field is the output's `seq_file`.
#[inline(always)]
unsafe fn one_byte_out(ctx: *const u64) {
    // SAFETY: see above; the helper checks its arguments (one byte from the stack).
    unsafe {
        let meta = core::ptr::read_volatile(ctx) as *const u64;
        let seq = core::ptr::read_volatile(meta) as *mut aya_ebpf::bindings::seq_file;
        let one = 1u8;
        aya_ebpf::helpers::bpf_seq_write(seq, (&raw const one).cast(), 1);
    }
}

#[cgroup_skb(ingress)]
pub fn skb_ingress(ctx: SkBuffContext) -> i32 {
    let _ = packet::try_packet(&ctx, true);
    PASS
}

#[cgroup_skb(egress)]
pub fn skb_egress(ctx: SkBuffContext) -> i32 {
    let _ = packet::try_packet(&ctx, false);
    PASS
}

/// The HTTP/2 walker's first run over an ingress segment; never attached, only tail-called
/// from `skb_ingress` via `WALK_IN` (slot `walk_slot::FIRST`).
#[cgroup_skb(ingress)]
pub fn skb_h2_in(ctx: SkBuffContext) -> i32 {
    let _ = packet::try_walk_first(&ctx, true);
    PASS
}

/// As `skb_h2_in`, for egress (`WALK_OUT`).
#[cgroup_skb(egress)]
pub fn skb_h2_out(ctx: SkBuffContext) -> i32 {
    let _ = packet::try_walk_first(&ctx, false);
    PASS
}

/// Continuation of the HTTP/2 walk for ingress segments with more frames than one run
/// walks; never attached, only tail-called from `skb_h2_in` (and itself) via `WALK_IN`
/// (slot `walk_slot::MORE`).
#[cgroup_skb(ingress)]
pub fn skb_walk_in(ctx: SkBuffContext) -> i32 {
    let _ = packet::try_walk_more(&ctx, true);
    PASS
}

/// As `skb_walk_in`, for egress (`WALK_OUT`).
#[cgroup_skb(egress)]
pub fn skb_walk_out(ctx: SkBuffContext) -> i32 {
    let _ = packet::try_walk_more(&ctx, false);
    PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
