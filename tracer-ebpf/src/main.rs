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
    },
    macros::{cgroup_skb, fentry, kprobe, map, tracepoint},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::{FEntryContext, ProbeContext, SkBuffContext, TracePointContext},
};
use aya_log_ebpf::debug;
use tracer_common::{
    AF_INET, AF_INET6, Config, IPPROTO_TCP, NO_FIELD, PktState, RawEvent, counter, field, flag,
    kind, tcp_flag, tp,
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
        p.write(RawEvent::zeroed());
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
        if family == AF_INET {
            if let (Some(s), Some(d)) = (
                kread::<[u8; 4]>(sk + SKC_RCV_SADDR),
                kread::<[u8; 4]>(sk + SKC_DADDR),
            ) {
                ev.saddr[..4].copy_from_slice(&s);
                ev.daddr[..4].copy_from_slice(&d);
                ev.flags |= flag::HAS_TUPLE;
            }
        } else if family == AF_INET6 {
            // SAFETY: plain static reads.
            let (os, od) = unsafe {
                (
                    read_volatile(&CONFIG.off_v6_saddr),
                    read_volatile(&CONFIG.off_v6_daddr),
                )
            };
            if os != u32::MAX && od != u32::MAX {
                if let (Some(s), Some(d)) = (
                    kread::<[u8; 16]>(sk + os as u64),
                    kread::<[u8; 16]>(sk + od as u64),
                ) {
                    ev.saddr = s;
                    ev.daddr = d;
                    ev.flags |= flag::HAS_TUPLE;
                }
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

#[inline(always)]
fn parse_l3(ctx: &SkBuffContext) -> Option<Seg> {
    // SAFETY: reading a field of the context the verifier hands us.
    let proto = unsafe { (*ctx.skb.skb).protocol };
    let mut seg = Seg {
        family: 0,
        ttl: 0,
        src: [0; 16],
        dst: [0; 16],
        l4_off: 0,
        l3_payload: 0,
    };
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
    Some(seg)
}

fn handle_packet(ctx: &SkBuffContext, ingress: bool) -> Option<()> {
    let seg = parse_l3(ctx)?;
    let l4_off = if seg.l4_off > 60 {
        return None;
    } else {
        seg.l4_off
    };
    let th: [u8; 20] = ctx.load(l4_off).ok()?;
    bump(counter::PACKETS);
    let tcp_flags = th[13];
    let doff = ((th[12] >> 4) as u32) * 4;
    // SAFETY: `sk` is a context field; its value (the socket address) is only recorded.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk } as u64;

    let dir_bit: u8 = if ingress { 2 } else { 1 };
    let mut evflags: u8 = if ingress { flag::INGRESS } else { 0 };
    match SK_PKT.get_ptr_mut(&sk) {
        Some(st) => {
            // SAFETY: map value pointer valid for this program run.
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
        }
        None => {
            let st = PktState {
                ttl_in: if ingress { seg.ttl } else { 0 },
                seen: dir_bit,
                _pad: [0; 6],
            };
            if SK_PKT.insert(&sk, &st, 0).is_err() {
                bump(counter::SKMAP_FAILS);
                debug!(ctx, "whoclosed: per-socket packet map insert failed");
            }
            evflags |= flag::FIRST_IN_DIR;
        }
    }
    let control = tcp_flags & (tcp_flag::SYN | tcp_flag::FIN | tcp_flag::RST) != 0;
    if !control && evflags & (flag::FIRST_IN_DIR | flag::TTL_CHANGED) == 0 {
        return Some(());
    }
    emit(kind::PACKET, |ev| {
        ev.skaddr = sk;
        ev.family = seg.family;
        ev.ttl = seg.ttl;
        ev.tcp_flags = tcp_flags;
        ev.flags = evflags | flag::HAS_TUPLE;
        ev.seq = u32::from_be_bytes([th[4], th[5], th[6], th[7]]);
        ev.ack = u32::from_be_bytes([th[8], th[9], th[10], th[11]]);
        ev.payload_len = seg.l3_payload.saturating_sub(doff);
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
    Some(())
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
