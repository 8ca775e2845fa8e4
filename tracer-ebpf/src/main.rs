//! whoclosed kernel programs: thin producers of TCP lifecycle facts.
//!
//! No policy lives here. Every hook reserves a [`RawEvent`] in one ring buffer, fills in
//! what it knows (states, flags, TTL, sequence numbers, errors, the current task) and
//! submits it. The agent decides what the facts mean.
#![no_std]
#![no_main]

use core::ptr::read_volatile;

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_buf,
    },
    macros::{cgroup_skb, fentry, kprobe, map, tracepoint},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::{FEntryContext, ProbeContext, SkBuffContext, TracePointContext},
};
use aya_log_ebpf::debug;
use tracer_common::{
    AF_INET, AF_INET6, Config, DirState, H2_CAPTURE, H2Record, IPPROTO_TCP, NO_FIELD, PktState,
    RawEvent, counter, field, flag, kind, proto, sk_proto, sync, tcp_flag, tp,
};

/// Written by the agent before load (tracepoint layouts and BTF offsets of this kernel).
/// Always read through `read_volatile` so the compiler cannot fold the placeholder value.
#[unsafe(no_mangle)]
static CONFIG: Config = Config::empty();

/// Default size; the agent may resize it before load (`--ringbuf-kib`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Per-socket packet state, keyed by the `struct sock` address. Removed when the socket
/// reaches TCP_CLOSE or is destroyed; LRU so that missed removals cannot fill it.
#[map]
static SK_PKT: LruHashMap<u64, PktState> = LruHashMap::with_max_entries(65536, 0);

const TCP_CLOSE: i32 = 7;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_LISTEN: i32 = 10;

const EMPTY_DIR: DirState = DirState {
    next_hdr: 0,
    end: 0,
    hdr: [0; 12],
    sync: sync::AWAIT,
    hdr_have: 0,
    tries: 0,
    have_end: 0,
};
/// `PktState::seen` bit: the connection's start was observed.
const SEEN_START: u8 = 4;
const FRESH: PktState = PktState {
    dir: [EMPTY_DIR; 2],
    ttl_in: 0,
    seen: SEEN_START,
    proto: sk_proto::UNKNOWN,
    _pad: [0; 5],
};
/// `task_struct.flags` bit set by `do_exit()` before it releases the task's files.
const PF_EXITING: u32 = 0x0000_0004;

#[inline(always)]
fn bump(idx: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
        unsafe { *slot += 1 }
    }
}

#[inline(always)]
fn tp_off(tp: usize, f: usize) -> u16 {
    // SAFETY: CONFIG is a plain static; volatile read keeps the loaded value authoritative.
    unsafe { read_volatile(&CONFIG.tp[tp].off[f]) }
}

#[inline(always)]
fn read_field<T>(ctx: &TracePointContext, tp: usize, f: usize) -> Option<T> {
    let off = tp_off(tp, f);
    if off == NO_FIELD {
        return None;
    }
    // SAFETY: the offset comes from this kernel's tracepoint format; the read is checked
    // by bpf_probe_read_kernel.
    match unsafe { ctx.read_at::<T>(off as usize) } {
        Ok(v) => Some(v),
        Err(_) => {
            bump(counter::READ_ERRORS);
            None
        }
    }
}

/// Zeroes `words` u64s in place. Volatile stores keep LLVM from turning this into a memset
/// call or from building the value on the (512-byte) BPF stack first.
#[inline(always)]
fn zero_in_place<T>(p: *mut T) {
    let words = core::mem::size_of::<T>() / 8;
    let p = p.cast::<u64>();
    let mut i = 0;
    while i < words {
        // SAFETY: `p` points to a reserved ring buffer slot of at least size_of::<T>() bytes,
        // 8-byte aligned (ring buffer records are).
        unsafe { core::ptr::write_volatile(p.add(i), 0) };
        i += 1;
    }
}

/// Reserve, fill and submit one event; count the loss when the ring buffer is full.
#[inline(always)]
fn emit<F: FnOnce(&mut RawEvent)>(kind: u8, fill: F) {
    let Some(mut entry) = EVENTS.reserve::<RawEvent>(0) else {
        bump(counter::RINGBUF_DROPS);
        return;
    };
    // SAFETY: the reservation is ours until submit; it is fully initialised right here.
    let ev = unsafe {
        let p = entry.as_mut_ptr();
        zero_in_place(p);
        &mut *p
    };
    ev.kind = kind;
    // SAFETY: helpers without preconditions.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    // SAFETY: as above.
    ev.cpu = unsafe { bpf_get_smp_processor_id() };
    fill(ev);
    entry.submit(0);
    bump(counter::EVENTS);
}

/// pid/tid and comm of the current task, and whether it is exiting.
#[inline(always)]
fn task_info(ev: &mut RawEvent) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ev.pid_tgid = pid_tgid;
    if let Ok(comm) = bpf_get_current_comm() {
        ev.comm = comm;
    }
    // SAFETY: plain static read.
    let off_flags = unsafe { read_volatile(&CONFIG.off_task_flags) };
    if off_flags == u32::MAX || pid_tgid == 0 {
        return;
    }
    // SAFETY: helper without preconditions; the task is only read through the checked helper.
    let task = unsafe { bpf_get_current_task() };
    if let Some(flags) = kread::<u32>(task + off_flags as u64) {
        if flags & PF_EXITING != 0 {
            ev.flags |= flag::EXITING;
        }
    }
}

/// Network namespace inode of a socket, through BTF offsets the agent provided.
#[inline(always)]
fn set_netns(ev: &mut RawEvent, sk: u64) {
    // SAFETY: plain static reads.
    let (off_net, off_inum) = unsafe {
        (
            read_volatile(&CONFIG.off_sk_net),
            read_volatile(&CONFIG.off_net_inum),
        )
    };
    if sk == 0 || off_net == u32::MAX || off_inum == u32::MAX {
        return;
    }
    // SAFETY: kernel memory read through the checked helper.
    let Ok(net) = (unsafe { bpf_probe_read_kernel((sk + off_net as u64) as *const u64) }) else {
        return;
    };
    if net == 0 {
        return;
    }
    // SAFETY: as above.
    if let Ok(inum) = unsafe { bpf_probe_read_kernel((net + off_inum as u64) as *const u32) } {
        ev.netns = inum;
        ev.flags |= flag::HAS_NETNS;
    }
}

/// Local/remote addresses and ports from a tracepoint record.
#[inline(always)]
fn read_tuple(ctx: &TracePointContext, tp: usize, ev: &mut RawEvent) {
    if tp_off(tp, field::SOCKADDR_STYLE) != NO_FIELD {
        // 28-byte blobs holding a sockaddr_in or sockaddr_in6.
        let (Some(s), Some(d)) = (
            read_field::<[u8; 28]>(ctx, tp, field::SADDR),
            read_field::<[u8; 28]>(ctx, tp, field::DADDR),
        ) else {
            return;
        };
        let family = u16::from_ne_bytes([s[0], s[1]]);
        ev.sport = u16::from_be_bytes([s[2], s[3]]);
        ev.dport = u16::from_be_bytes([d[2], d[3]]);
        if family == AF_INET {
            ev.saddr[..4].copy_from_slice(&s[4..8]);
            ev.daddr[..4].copy_from_slice(&d[4..8]);
        } else if family == AF_INET6 {
            ev.saddr.copy_from_slice(&s[8..24]);
            ev.daddr.copy_from_slice(&d[8..24]);
        } else {
            return;
        }
        ev.family = family;
        ev.flags |= flag::HAS_TUPLE;
        return;
    }
    let (Some(sport), Some(dport)) = (
        read_field::<u16>(ctx, tp, field::SPORT),
        read_field::<u16>(ctx, tp, field::DPORT),
    ) else {
        return;
    };
    ev.sport = sport;
    ev.dport = dport;
    let s6 = read_field::<[u8; 16]>(ctx, tp, field::SADDR_V6).unwrap_or([0; 16]);
    let d6 = read_field::<[u8; 16]>(ctx, tp, field::DADDR_V6).unwrap_or([0; 16]);
    let family = match read_field::<u16>(ctx, tp, field::FAMILY) {
        Some(f) => f,
        // Older layouts without `family`: IPv4 sockets carry v4-mapped v6 fields.
        None if s6[..10] == [0; 10] && s6[10] == 0xff && s6[11] == 0xff => AF_INET,
        None => AF_INET6,
    };
    if family == AF_INET {
        let (Some(s4), Some(d4)) = (
            read_field::<[u8; 4]>(ctx, tp, field::SADDR),
            read_field::<[u8; 4]>(ctx, tp, field::DADDR),
        ) else {
            return;
        };
        ev.saddr[..4].copy_from_slice(&s4);
        ev.daddr[..4].copy_from_slice(&d4);
    } else if family == AF_INET6 {
        ev.saddr = s6;
        ev.daddr = d6;
    } else {
        return;
    }
    ev.family = family;
    ev.flags |= flag::HAS_TUPLE;
}

// ---------------------------------------------------------------------------------------------
// Tracepoints
// ---------------------------------------------------------------------------------------------

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_set_state(&ctx);
    0
}

fn try_set_state(ctx: &TracePointContext) -> Option<()> {
    let t = tp::SET_STATE;
    let proto: u16 = read_field(ctx, t, field::PROTOCOL)?;
    if proto != IPPROTO_TCP {
        return None;
    }
    let sk: u64 = read_field(ctx, t, field::SKADDR)?;
    let old: i32 = read_field(ctx, t, field::OLDSTATE)?;
    let new: i32 = read_field(ctx, t, field::NEWSTATE)?;
    if new == TCP_CLOSE {
        let _ = SK_PKT.remove(&sk);
    } else if new == TCP_SYN_SENT || (old == TCP_LISTEN && new == TCP_SYN_RECV) {
        // A connection whose first byte we will see: payload that is neither HTTP/2 nor TLS
        // at its start is "other", not "unsynced".
        if SK_PKT.insert(&sk, &FRESH, 0).is_err() {
            bump(counter::SKMAP_FAILS);
            // Kept out of the per-packet programs: aya-log's record costs stack there.
            debug!(ctx, "whoclosed: per-socket packet map insert failed");
        }
    }
    emit(kind::STATE, |ev| {
        ev.skaddr = sk;
        ev.oldstate = old as u8;
        ev.newstate = new as u8;
        read_tuple(ctx, t, ev);
        set_netns(ev, sk);
        task_info(ev);
    });
    Some(())
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let _ = try_retransmit(&ctx);
    0
}

fn try_retransmit(ctx: &TracePointContext) -> Option<()> {
    let t = tp::RETRANSMIT;
    let sk: u64 = read_field(ctx, t, field::SKADDR)?;
    let state: i32 = read_field(ctx, t, field::STATE).unwrap_or(0);
    let err: i32 = read_field(ctx, t, field::VALUE).unwrap_or(0);
    emit(kind::RETRANSMIT, |ev| {
        ev.skaddr = sk;
        ev.newstate = state as u8;
        ev.value = err;
        read_tuple(ctx, t, ev);
    });
    Some(())
}

#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let _ = try_send_reset(&ctx);
    0
}

fn try_send_reset(ctx: &TracePointContext) -> Option<()> {
    let t = tp::SEND_RESET;
    let sk: u64 = read_field(ctx, t, field::SKADDR).unwrap_or(0);
    let state: i32 = read_field(ctx, t, field::STATE).unwrap_or(0);
    let reason: i32 = read_field(ctx, t, field::VALUE).unwrap_or(-1);
    emit(kind::SEND_RESET, |ev| {
        ev.skaddr = sk;
        ev.newstate = state as u8;
        ev.value = reason;
        read_tuple(ctx, t, ev);
        set_netns(ev, sk);
        task_info(ev);
    });
    Some(())
}

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let _ = try_sk_event(&ctx, tp::RECV_RESET, kind::RECV_RESET);
    0
}

#[tracepoint(category = "tcp", name = "tcp_destroy_sock")]
pub fn tcp_destroy_sock(ctx: TracePointContext) -> u32 {
    let _ = try_sk_event(&ctx, tp::DESTROY, kind::DESTROY);
    0
}

fn try_sk_event(ctx: &TracePointContext, t: usize, k: u8) -> Option<()> {
    let sk: u64 = read_field(ctx, t, field::SKADDR)?;
    let cookie: u64 = read_field(ctx, t, field::COOKIE).unwrap_or(0);
    if k == kind::DESTROY {
        let _ = SK_PKT.remove(&sk);
    }
    emit(k, |ev| {
        ev.skaddr = sk;
        ev.cookie = cookie;
        read_tuple(ctx, t, ev);
    });
    Some(())
}

#[tracepoint(category = "sock", name = "inet_sk_error_report")]
pub fn inet_sk_error_report(ctx: TracePointContext) -> u32 {
    let _ = try_error_report(&ctx);
    0
}

fn try_error_report(ctx: &TracePointContext) -> Option<()> {
    let t = tp::ERROR_REPORT;
    let proto: u16 = read_field(ctx, t, field::PROTOCOL)?;
    if proto != IPPROTO_TCP {
        return None;
    }
    let error: i32 = read_field(ctx, t, field::VALUE)?;
    emit(kind::ERROR_REPORT, |ev| {
        ev.value = error;
        read_tuple(ctx, t, ev);
        task_info(ev);
    });
    Some(())
}

// ---------------------------------------------------------------------------------------------
// tcp_close(): fentry where the kernel allows it, kprobe otherwise. One handler.
// ---------------------------------------------------------------------------------------------

// Offsets inside `struct sock_common`, unchanged since Linux 3.x.
const SKC_DADDR: u64 = 0;
const SKC_RCV_SADDR: u64 = 4;
const SKC_DPORT: u64 = 12;
const SKC_NUM: u64 = 14;
const SKC_FAMILY: u64 = 16;
const SKC_STATE: u64 = 18;

#[inline(always)]
fn kread<T>(addr: u64) -> Option<T> {
    // SAFETY: checked kernel read.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

#[inline(always)]
fn on_tcp_close(sk: u64) -> Option<()> {
    if sk == 0 {
        return None;
    }
    let family: u16 = kread(sk + SKC_FAMILY)?;
    let state: u8 = kread(sk + SKC_STATE)?;
    let dport_be: u16 = kread(sk + SKC_DPORT)?;
    let sport: u16 = kread(sk + SKC_NUM)?;
    emit(kind::CLOSE_CALL, |ev| {
        ev.skaddr = sk;
        ev.oldstate = state;
        ev.family = family;
        ev.sport = sport;
        ev.dport = u16::from_be(dport_be);
        // Straight into the event: no Option pairs, whose spilled discriminants 5.10/6.1
        // verifiers lose track of (they then reject a path that cannot be taken).
        let (so, dof, len) = if family == AF_INET {
            (SKC_RCV_SADDR, SKC_DADDR, 4usize)
        } else if family == AF_INET6 {
            // SAFETY: plain static reads.
            let (os, od) = unsafe {
                (
                    read_volatile(&CONFIG.off_v6_saddr),
                    read_volatile(&CONFIG.off_v6_daddr),
                )
            };
            if os == u32::MAX || od == u32::MAX {
                (0, 0, 0)
            } else {
                (os as u64, od as u64, 16usize)
            }
        } else {
            (0, 0, 0)
        };
        if len == 4 || len == 16 {
            // SAFETY: checked kernel reads into the event's own buffers.
            let ok = unsafe {
                bpf_probe_read_kernel_buf((sk + so) as *const u8, &mut ev.saddr[..len]).is_ok()
                    && bpf_probe_read_kernel_buf((sk + dof) as *const u8, &mut ev.daddr[..len])
                        .is_ok()
            };
            if ok {
                ev.flags |= flag::HAS_TUPLE;
            }
        }
        set_netns(ev, sk);
        task_info(ev);
    });
    Some(())
}

#[fentry(function = "tcp_close")]
pub fn tcp_close_fentry(ctx: FEntryContext) -> u32 {
    let sk: *const u8 = ctx.arg(0);
    let _ = on_tcp_close(sk as u64);
    0
}

#[kprobe]
pub fn tcp_close_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<*const u8>(0) {
        let _ = on_tcp_close(sk as u64);
    }
    0
}

// ---------------------------------------------------------------------------------------------
// Packets of local sockets: cgroup_skb at the cgroup v2 root (every netns).
// ---------------------------------------------------------------------------------------------

/// cgroup_skb verdict: 1 lets the packet through. We never drop.
const PASS: i32 = 1;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP_U8: u8 = 6;

#[cgroup_skb(ingress)]
pub fn skb_ingress(ctx: SkBuffContext) -> i32 {
    let _ = handle_packet(&ctx, true);
    PASS
}

#[cgroup_skb(egress)]
pub fn skb_egress(ctx: SkBuffContext) -> i32 {
    let _ = handle_packet(&ctx, false);
    PASS
}

/// Parsed L3/L4 facts of one segment.
struct Seg {
    family: u16,
    ttl: u8,
    src: [u8; 16],
    dst: [u8; 16],
    l4_off: usize,
    l3_payload: u32,
}

/// Fills `seg` from the IP header; false for anything but the first fragment of TCP.
#[inline(always)]
fn parse_l3(ctx: &SkBuffContext, seg: &mut Seg) -> bool {
    parse_l3_inner(ctx, seg).is_some()
}

#[inline(always)]
fn parse_l3_inner(ctx: &SkBuffContext, seg: &mut Seg) -> Option<()> {
    // SAFETY: reading a field of the context the verifier hands us.
    let proto = unsafe { (*ctx.skb.skb).protocol };
    if proto == ETH_P_IP.to_be() as u32 {
        let h: [u8; 20] = ctx.load(0).ok()?;
        if h[0] >> 4 != 4 || h[9] != IPPROTO_TCP_U8 {
            return None;
        }
        // Later fragments carry no TCP header.
        if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
            return None;
        }
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        let total = u16::from_be_bytes([h[2], h[3]]) as u32;
        seg.family = AF_INET;
        seg.ttl = h[8];
        seg.src[..4].copy_from_slice(&h[12..16]);
        seg.dst[..4].copy_from_slice(&h[16..20]);
        seg.l4_off = ihl;
        seg.l3_payload = total.saturating_sub(ihl as u32);
    } else if proto == ETH_P_IPV6.to_be() as u32 {
        let h: [u8; 40] = ctx.load(0).ok()?;
        if h[0] >> 4 != 6 || h[6] != IPPROTO_TCP_U8 {
            return None;
        }
        seg.family = AF_INET6;
        seg.ttl = h[7];
        seg.src.copy_from_slice(&h[8..24]);
        seg.dst.copy_from_slice(&h[24..40]);
        seg.l4_off = 40;
        seg.l3_payload = u16::from_be_bytes([h[4], h[5]]) as u32;
    } else {
        return None;
    }
    Some(())
}

fn handle_packet(ctx: &SkBuffContext, ingress: bool) -> Option<()> {
    let mut seg = Seg {
        family: 0,
        ttl: 0,
        src: [0; 16],
        dst: [0; 16],
        l4_off: 0,
        l3_payload: 0,
    };
    if !parse_l3(ctx, &mut seg) {
        return None;
    }
    let l4_off = if seg.l4_off > 60 {
        return None;
    } else {
        seg.l4_off
    };
    let th: [u8; 20] = ctx.load(l4_off).ok()?;
    bump(counter::PACKETS);
    let tcp_flags = th[13];
    let doff = ((th[12] >> 4) as u32) * 4;
    let seq = u32::from_be_bytes([th[4], th[5], th[6], th[7]]);
    let payload_len = seg.l3_payload.saturating_sub(doff);
    // SAFETY: `sk` is a context field; its value (the socket address) is only recorded.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk } as u64;

    let dir_bit: u8 = if ingress { 2 } else { 1 };
    let mut evflags: u8 = if ingress { flag::INGRESS } else { 0 };
    let st = match SK_PKT.get_ptr_mut(&sk) {
        Some(st) => st,
        None => {
            let mut fresh = FRESH;
            if tcp_flags & tcp_flag::SYN == 0 {
                fresh.seen = 0;
            }
            if SK_PKT.insert(&sk, &fresh, 0).is_err() {
                bump(counter::SKMAP_FAILS);
            }
            SK_PKT.get_ptr_mut(&sk)?
        }
    };
    // SAFETY: map value pointer, valid for this program run.
    let st = unsafe { &mut *st };
    if st.seen & dir_bit == 0 {
        st.seen |= dir_bit;
        evflags |= flag::FIRST_IN_DIR;
        if ingress {
            st.ttl_in = seg.ttl;
        }
    } else if ingress && st.ttl_in != seg.ttl {
        evflags |= flag::TTL_CHANGED;
        st.ttl_in = seg.ttl;
    }
    let control = tcp_flags & (tcp_flag::SYN | tcp_flag::FIN | tcp_flag::RST) != 0;
    if control || evflags & (flag::FIRST_IN_DIR | flag::TTL_CHANGED) != 0 {
        emit_packet(&seg, &th, sk, evflags, payload_len);
    }
    if payload_len > 0 && payload_len < 0x0100_0000 {
        let info = SegInfo {
            sk,
            seq,
            poff: (l4_off as u32).wrapping_add(doff),
            plen: payload_len,
            di: if ingress { 1 } else { 0 },
        };
        h2_segment(ctx, st, &info);
    }
    Some(())
}

/// The PACKET event.
#[inline(always)]
fn emit_packet(seg: &Seg, th: &[u8; 20], sk: u64, evflags: u8, payload_len: u32) {
    let ingress = evflags & flag::INGRESS != 0;
    emit(kind::PACKET, |ev| {
        ev.skaddr = sk;
        ev.family = seg.family;
        ev.ttl = seg.ttl;
        ev.tcp_flags = th[13];
        ev.flags = evflags | flag::HAS_TUPLE;
        ev.seq = u32::from_be_bytes([th[4], th[5], th[6], th[7]]);
        ev.ack = u32::from_be_bytes([th[8], th[9], th[10], th[11]]);
        ev.payload_len = payload_len;
        let sport = u16::from_be_bytes([th[0], th[1]]);
        let dport = u16::from_be_bytes([th[2], th[3]]);
        if ingress {
            ev.saddr = seg.dst;
            ev.daddr = seg.src;
            ev.sport = dport;
            ev.dport = sport;
        } else {
            ev.saddr = seg.src;
            ev.daddr = seg.dst;
            ev.sport = sport;
            ev.dport = dport;
        }
    });
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 frame walking, in TCP sequence space, per socket and direction.
// ---------------------------------------------------------------------------------------------

const PREFACE: [u8; 24] = *b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The preface as three native-endian words: comparing arrays would call memcmp, a stack
/// frame of its own that older kernels count against the 512-byte budget.
const PREFACE_WORDS: [u64; 3] = [preface_word(0), preface_word(8), preface_word(16)];

const fn preface_word(i: usize) -> u64 {
    let p = PREFACE;
    u64::from_ne_bytes([
        p[i],
        p[i + 1],
        p[i + 2],
        p[i + 3],
        p[i + 4],
        p[i + 5],
        p[i + 6],
        p[i + 7],
    ])
}
/// Frame headers walked per segment; a segment with more small frames than this loses sync
/// honestly (reported) rather than looping unboundedly.
const MAX_FRAMES_PER_SEG: usize = 12;
/// Segments a mid-stream direction may try to resynchronise on before giving up.
const MAX_RESYNC_TRIES: u8 = 64;

const H2_DATA: u8 = 0;
const H2_HEADERS: u8 = 1;
const H2_PRIORITY: u8 = 2;
const H2_RST_STREAM: u8 = 3;
const H2_SETTINGS: u8 = 4;
const H2_PUSH_PROMISE: u8 = 5;
const H2_PING: u8 = 6;
const H2_GOAWAY: u8 = 7;
const H2_WINDOW_UPDATE: u8 = 8;
const H2_CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;

struct SegInfo {
    sk: u64,
    seq: u32,
    /// Offset of the TCP payload in the packet.
    poff: u32,
    plen: u32,
    di: usize,
}

/// A helper length older verifiers (5.10, 6.1) can prove is in `[1, mask + 1]`: they do not
/// carry an earlier `n != 0` test into the size argument once LLVM has rewritten the
/// comparisons. The volatile round trip stops LLVM from folding the masking away again.
/// Callers guarantee `1 <= n <= mask + 1`.
#[inline(always)]
fn verifier_len(n: u32, mask: u32) -> u32 {
    // SAFETY: reads a local.
    let n = unsafe { read_volatile(&n) };
    (n.wrapping_sub(1) & mask) + 1
}

#[inline(always)]
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

#[inline(always)]
fn emit_proto(ctx_sk: u64, di: usize, seq: u32, what: i32) {
    let Some(mut entry) = EVENTS.reserve::<H2Record>(0) else {
        bump(counter::RINGBUF_DROPS);
        return;
    };
    // SAFETY: reserved memory, fully initialised here before use.
    let rec = unsafe {
        let p = entry.as_mut_ptr();
        zero_in_place(p);
        &mut *p
    };
    rec.base.kind = kind::H2_PROTO;
    // SAFETY: helpers without preconditions.
    rec.base.ts_ns = unsafe { bpf_ktime_get_ns() };
    // SAFETY: as above.
    rec.base.cpu = unsafe { bpf_get_smp_processor_id() };
    rec.base.skaddr = ctx_sk;
    rec.base.seq = seq;
    rec.base.value = what;
    rec.base.flags = if di == 1 { flag::INGRESS } else { 0 };
    entry.submit(0);
    bump(counter::EVENTS);
}

/// Is this 9-byte header plausible for a connection we are trying to (re)synchronise on?
#[inline(always)]
fn plausible(h: &[u8; 9]) -> bool {
    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]);
    let kind = h[3];
    let flags = h[4];
    if h[5] & 0x80 != 0 {
        return false;
    }
    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]);
    let (allowed, on_zero) = match kind {
        H2_DATA => (0x09, false),
        H2_HEADERS => (0x2d, false),
        H2_PRIORITY => (0x00, false),
        H2_RST_STREAM => (0x00, false),
        H2_SETTINGS => (0x01, true),
        H2_PUSH_PROMISE => (0x0c, false),
        H2_PING => (0x01, true),
        H2_GOAWAY => (0x00, true),
        H2_WINDOW_UPDATE => (0x00, stream == 0),
        H2_CONTINUATION => (0x04, false),
        _ => return false,
    };
    if flags & !allowed != 0 || on_zero != (stream == 0) {
        return false;
    }
    match kind {
        H2_PING => len == 8,
        H2_RST_STREAM | H2_WINDOW_UPDATE => len == 4,
        H2_PRIORITY => len == 5,
        H2_SETTINGS => len % 6 == 0 && (flags & 1 == 0 || len == 0),
        H2_GOAWAY => len >= 8,
        _ => len <= 1 << 20,
    }
}

/// One segment's payload for the HTTP/2 walker.
#[inline(never)]
fn h2_segment(ctx: &SkBuffContext, st: &mut PktState, seg: &SegInfo) {
    let di = if seg.di == 1 { 1 } else { 0 };
    let proto_now = st.proto;
    let seen = st.seen;
    let d = &mut st.dir[di];
    if d.sync == sync::OFF {
        return;
    }
    let seg_end = seg.seq.wrapping_add(seg.plen);
    let mut start_off: u32 = 0;
    if d.have_end != 0 {
        if !before(d.end, seg_end) {
            return; // a retransmission of bytes already walked
        }
        if before(seg.seq, d.end) {
            start_off = d.end.wrapping_sub(seg.seq);
        } else if before(d.end, seg.seq) && d.sync == sync::SYNCED && before(d.next_hdr, seg.seq) {
            // Bytes that held a frame header were never seen here.
            desync(d, seg, di);
        }
    }
    d.end = seg_end;
    d.have_end = 1;

    if d.sync == sync::AWAIT {
        if start_off != 0 {
            d.sync = sync::UNSYNCED;
        } else {
            let decided = first_payload(ctx, d, seg, di, proto_now, seen);
            match decided {
                Decided::H2Preface => {
                    st.proto = sk_proto::H2;
                }
                Decided::Stop(p) => {
                    st.proto = p;
                    st.dir[0].sync = sync::OFF;
                    st.dir[1].sync = sync::OFF;
                    return;
                }
                Decided::Walk | Decided::Resync => {}
            }
        }
    }
    let d = &mut st.dir[di];
    if d.sync == sync::UNSYNCED {
        if start_off != 0 || !resync(ctx, d, seg, di) {
            return;
        }
    }
    if d.sync == sync::SYNCED {
        walk(ctx, d, seg, di);
    }
}

enum Decided {
    H2Preface,
    Walk,
    Resync,
    Stop(u8),
}

/// The first payload bytes of a direction: preface, a leading SETTINGS frame, TLS, or other.
#[inline(always)]
fn first_payload(
    ctx: &SkBuffContext,
    d: &mut DirState,
    seg: &SegInfo,
    di: usize,
    proto_now: u8,
    seen: u8,
) -> Decided {
    if proto_now == sk_proto::TLS || proto_now == sk_proto::OTHER {
        d.sync = sync::OFF;
        return Decided::Stop(proto_now);
    }
    let off = seg.poff as usize;
    if seg.plen >= 24 {
        if let Ok(w) = ctx.load::<[u64; 3]>(off) {
            if w[0] == PREFACE_WORDS[0] && w[1] == PREFACE_WORDS[1] && w[2] == PREFACE_WORDS[2] {
                d.sync = sync::SYNCED;
                d.next_hdr = seg.seq.wrapping_add(24);
                emit_proto(seg.sk, di, seg.seq, proto::H2_PREFACE);
                return Decided::H2Preface;
            }
        }
    }
    if seg.plen >= 9 {
        if let Ok(h) = ctx.load::<[u8; 9]>(off) {
            if h[3] == H2_SETTINGS && plausible(&h) {
                d.sync = sync::SYNCED;
                d.next_hdr = seg.seq;
                if proto_now == sk_proto::UNKNOWN {
                    emit_proto(seg.sk, di, seg.seq, proto::H2_SETTINGS_FIRST);
                }
                return Decided::Walk;
            }
        }
    }
    if seg.plen >= 3 {
        if let Ok(h) = ctx.load::<[u8; 3]>(off) {
            if (0x14..=0x17).contains(&h[0]) && h[1] == 3 && h[2] <= 4 {
                emit_proto(seg.sk, di, seg.seq, proto::TLS);
                return Decided::Stop(sk_proto::TLS);
            }
        }
    }
    if proto_now == sk_proto::H2 {
        d.sync = sync::SYNCED;
        d.next_hdr = seg.seq;
        return Decided::Walk;
    }
    if seen & SEEN_START != 0 {
        emit_proto(seg.sk, di, seg.seq, proto::OTHER);
        return Decided::Stop(sk_proto::OTHER);
    }
    d.sync = sync::UNSYNCED;
    Decided::Resync
}

/// Mid-stream: accept a segment whose bytes are a chain of plausible frame headers ending
/// exactly at the segment end; then walk it from its start.
#[inline(always)]
fn resync(ctx: &SkBuffContext, d: &mut DirState, seg: &SegInfo, di: usize) -> bool {
    if d.tries >= MAX_RESYNC_TRIES {
        d.sync = sync::OFF;
        emit_proto(seg.sk, di, seg.seq, proto::GAVE_UP);
        return false;
    }
    d.tries += 1;
    let mut off: u32 = 0;
    for _ in 0..4 {
        if off.wrapping_add(9) > seg.plen {
            return false;
        }
        let Ok(h) = ctx.load::<[u8; 9]>((seg.poff.wrapping_add(off) & 0xffff) as usize) else {
            return false;
        };
        if !plausible(&h) {
            return false;
        }
        off = off
            .wrapping_add(9)
            .wrapping_add(u32::from_be_bytes([0, h[0], h[1], h[2]]));
        if off == seg.plen {
            d.sync = sync::SYNCED;
            d.next_hdr = seg.seq;
            d.hdr_have = 0;
            emit_proto(seg.sk, di, seg.seq, proto::RESYNCED);
            return true;
        }
        if off > seg.plen {
            return false;
        }
    }
    false
}

/// Frame boundaries are lost for this direction: report it and fall back to resync.
#[inline(always)]
fn desync(d: &mut DirState, seg: &SegInfo, di: usize) {
    d.sync = sync::UNSYNCED;
    d.hdr_have = 0;
    d.tries = 0;
    bump(counter::H2_DESYNCS);
    emit_proto(seg.sk, di, seg.seq, proto::DESYNC);
}

/// Walks the frame headers that start inside this segment.
#[inline(always)]
fn walk(ctx: &SkBuffContext, d: &mut DirState, seg: &SegInfo, di: usize) {
    // A header behind a contiguous segment's start was never walked (the previous segment
    // held more frames than one pass takes): boundaries are lost, say so.
    if d.hdr_have == 0 && before(d.next_hdr, seg.seq) {
        desync(d, seg, di);
        return;
    }
    for _ in 0..MAX_FRAMES_PER_SEG {
        // Offset (in this segment) of the first byte of the header still to read.
        let (hdr_start, got) = if d.hdr_have != 0 {
            // A header split across segments: its first bytes are buffered.
            let have = (d.hdr_have & 0x7) as u32;
            let at = d.next_hdr.wrapping_add(have).wrapping_sub(seg.seq);
            (at, have)
        } else {
            (d.next_hdr.wrapping_sub(seg.seq), 0)
        };
        if hdr_start >= seg.plen {
            return;
        }
        let avail = seg.plen - hdr_start;
        let need = 9 - got;
        if avail < need {
            // The header continues in the next segment: buffer what is here.
            if avail == 0 || avail > 7 || got + avail > 8 {
                return;
            }
            let n = verifier_len(avail, 0x7);
            // SAFETY: destination is inside the map value (`hdr` is 12 bytes, got+n <= 8).
            let ok = unsafe {
                aya_ebpf::helpers::bpf_skb_load_bytes(
                    ctx.skb.skb as *const _,
                    (seg.poff.wrapping_add(hdr_start) & 0xffff) as u32,
                    d.hdr.as_mut_ptr().add((got & 0x7) as usize) as *mut _,
                    n,
                )
            } == 0;
            if ok {
                d.hdr_have = (got + n) as u8;
            }
            return;
        }
        // Built by value in both branches: a zero-initialised array would be a memset call,
        // a 32-byte stack frame of its own on kernels before 6.x's frame accounting.
        let h: [u8; 9] = if got == 0 {
            let Ok(full) =
                ctx.load::<[u8; 9]>((seg.poff.wrapping_add(hdr_start) & 0xffff) as usize)
            else {
                return;
            };
            full
        } else {
            // Complete the buffered header in place (map value: variable offsets are fine
            // there, unlike on the stack).
            let g = (got & 0x7) as usize;
            if need == 0 || need > 8 || g + need as usize > 9 {
                return;
            }
            let n = verifier_len(need, 0x7);
            // SAFETY: destination `hdr[g..g + n]` lies inside the 12-byte map value field.
            let ok = unsafe {
                aya_ebpf::helpers::bpf_skb_load_bytes(
                    ctx.skb.skb as *const _,
                    (seg.poff.wrapping_add(hdr_start) & 0xffff) as u32,
                    d.hdr.as_mut_ptr().add(g) as *mut _,
                    n,
                )
            } == 0;
            d.hdr_have = 0;
            if !ok {
                return;
            }
            let b = &d.hdr;
            [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8]]
        };
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]);
        let frame_seq = d.next_hdr;
        // Payload bytes of this frame present in this segment.
        let body_off = hdr_start + need;
        let body_avail = seg.plen - body_off;
        h2_frame(ctx, seg, di, frame_seq, &h, body_off, body_avail.min(len));
        bump(counter::H2_FRAMES);
        d.next_hdr = frame_seq.wrapping_add(9).wrapping_add(len);
    }
    // Still a header inside this segment after the bounded pass: too many frames in one
    // segment to follow here.
    if d.hdr_have == 0 && d.next_hdr.wrapping_sub(seg.seq) < seg.plen {
        desync(d, seg, di);
    }
}

/// Reports one frame: control frames with a payload prefix, stream openers and stream ends
/// with their header only; bulk DATA and flow control are not reported.
#[inline(always)]
fn h2_frame(
    ctx: &SkBuffContext,
    seg: &SegInfo,
    di: usize,
    frame_seq: u32,
    h: &[u8; 9],
    body_off: u32,
    body_avail: u32,
) {
    let kind_ = h[3];
    let capture = matches!(kind_, H2_RST_STREAM | H2_SETTINGS | H2_PING | H2_GOAWAY);
    let header_only = kind_ == H2_HEADERS || (kind_ == H2_DATA && h[4] & END_STREAM != 0);
    if !capture && !header_only {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<H2Record>(0) else {
        bump(counter::RINGBUF_DROPS);
        return;
    };
    // SAFETY: reserved memory, fully initialised here before use.
    let rec = unsafe {
        let p = entry.as_mut_ptr();
        zero_in_place(p);
        &mut *p
    };
    rec.base.kind = kind::H2_FRAME;
    // SAFETY: helpers without preconditions.
    rec.base.ts_ns = unsafe { bpf_ktime_get_ns() };
    // SAFETY: as above.
    rec.base.cpu = unsafe { bpf_get_smp_processor_id() };
    rec.base.skaddr = seg.sk;
    rec.base.seq = frame_seq;
    rec.base.flags = if di == 1 { flag::INGRESS } else { 0 };
    rec.head[..9].copy_from_slice(h);
    if capture {
        let n = body_avail.min(H2_CAPTURE as u32);
        if n > 0 {
            let n = verifier_len(n, H2_CAPTURE as u32 - 1);
            // SAFETY: destination is the record's 64-byte payload and n <= 64.
            let ok = unsafe {
                aya_ebpf::helpers::bpf_skb_load_bytes(
                    ctx.skb.skb as *const _,
                    (seg.poff.wrapping_add(body_off) & 0xffff) as u32,
                    rec.payload.as_mut_ptr() as *mut _,
                    n,
                )
            } == 0;
            if ok {
                rec.base.payload_len = n;
            }
        }
    }
    entry.submit(0);
    bump(counter::EVENTS);
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
