//! Packets of local sockets: cgroup_skb ingress and egress at the cgroup v2 root (every
//! netns). TCP flags, TTL and sequence numbers; payload goes to the HTTP/2 walker, which
//! runs in tail-called programs of its own (`maps::WALK_OUT`).

use core::mem::MaybeUninit;

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_ns, bpf_skb_cgroup_id, bpf_tcp_sock},
    programs::SkBuffContext,
};
use tracer_common::{
    AF_INET, AF_INET6, PacketRecord, counter, flag, kind, tcp_flag,
    tcpaccept::{self, SegSeq, SockSeq},
    walk_slot,
};

use crate::{
    config::rcv_wnd_max,
    emit::emit,
    h2walk::{SegInfo, h2_headerless, h2_lost_rest, h2_more, h2_segment},
    maps::{FRESH, MIDSTREAM, PktState, WALK_IN, WALK_OUT, bump, full_sock, pkt_state, seen, sync},
    verifier::zero_in_place,
};

const ETH_P_IP: u16 = 0x0800;
/// `cb[3]` when `cb[0..3]` hold a segment handed to the walker ([`hand_over`]).
const CB_SEGMENT: u32 = 0x7768_6f63;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP_U8: u8 = 6;
const IPPROTO_HOPOPTS: u8 = 0;
/// The Jumbo Payload option (RFC 2675) of a Hop-by-Hop header.
const IPV6_TLV_JUMBO: u8 = 0xc2;

/// Parsed IP and TCP header facts of one segment. Laid out to 64 bytes so that it is
/// zeroed with eight stores (`zero_in_place`) rather than a byte-wise `memset` call.
#[repr(C, align(8))]
struct Seg {
    src: [u8; 16],
    dst: [u8; 16],
    /// The fixed part of the TCP header.
    th: [u8; 20],
    family: u16,
    ttl: u8,
    _pad: u8,
    l3_payload: u32,
    l4_off: u32,
}

const _: () = assert!(core::mem::size_of::<Seg>() == 64);

/// Fills `seg` from the IP and TCP headers; false for anything but the first fragment of
/// TCP. Only the entry programs call it (the walker programs get the payload's position
/// from [`hand_over`]). Not inlined: its register spills (the 40-byte IPv6 header) take a
/// frame of their own (512 bytes for the chain, verifier.rs), and the packet pointers it
/// uses stay inside it, out of the states the verifier explores for the rest of the entry
/// program.
#[inline(never)]
fn parse_headers(ctx: &SkBuffContext, seg: &mut Seg) -> bool {
    parse_headers_inner(ctx, seg).is_some()
}

/// `N` bytes at `off`: read in place when the linear part of the skb holds them (the
/// usual case: the kernel builds and receives TCP headers linear), which costs no helper
/// call, else through `bpf_skb_load_bytes`.
#[inline(always)]
fn hdr<const N: usize>(ctx: &SkBuffContext, off: usize) -> Option<[u8; N]> {
    // SAFETY: reading fields of the context the verifier hands us.
    let (data, end) = unsafe {
        (
            (*ctx.skb.skb).data as usize,
            (*ctx.skb.skb).data_end as usize,
        )
    };
    if data + off + N <= end {
        let p = (data + off) as *const u8;
        let mut out = [0u8; N];
        let mut i = 0;
        while i < N {
            // SAFETY: `p + i` is below `data_end`, checked above; volatile keeps LLVM from
            // turning the loop into a `memcpy` call (verifier.rs).
            out[i] = unsafe { core::ptr::read_volatile(p.add(i)) };
            i += 1;
        }
        Some(out)
    } else {
        ctx.load(off).ok()
    }
}

/// The packet's length from the IP header on (cgroup_skb programs see `data` at the network
/// header in both directions).
#[inline(always)]
fn skb_len(ctx: &SkBuffContext) -> u32 {
    // SAFETY: reading a field of the context the verifier hands us.
    unsafe { (*ctx.skb.skb).len }
}

#[inline(always)]
fn parse_headers_inner(ctx: &SkBuffContext, seg: &mut Seg) -> Option<()> {
    // SAFETY: reading a field of the context the verifier hands us.
    let proto = unsafe { (*ctx.skb.skb).protocol };
    if proto == ETH_P_IP.to_be() as u32 {
        let h: [u8; 20] = hdr(ctx, 0)?;
        if h[0] >> 4 != 4 || h[9] != IPPROTO_TCP_U8 {
            return None;
        }
        // Later fragments carry no TCP header.
        if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
            return None;
        }
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        let total = match u16::from_be_bytes([h[2], h[3]]) {
            // A GSO packet over 64 KiB (BIG TCP, Linux 6.3+; loopback builds them too)
            // carries 0 here: its length is the skb's.
            0 => skb_len(ctx),
            n => n as u32,
        };
        seg.family = AF_INET;
        seg.ttl = h[8];
        seg.src[..4].copy_from_slice(&h[12..16]);
        seg.dst[..4].copy_from_slice(&h[16..20]);
        seg.l4_off = ihl as u32;
        seg.l3_payload = total.saturating_sub(ihl as u32);
        seg.th = hdr(ctx, ihl)?;
    } else if proto == ETH_P_IPV6.to_be() as u32 {
        let h: [u8; 40] = hdr(ctx, 0)?;
        if h[0] >> 4 != 6 {
            return None;
        }
        let plen = u16::from_be_bytes([h[4], h[5]]);
        if h[6] == IPPROTO_TCP_U8 {
            seg.l4_off = 40;
            seg.l3_payload = match plen {
                // As for IPv4: a GSO packet over 64 KiB (BIG TCP, 7.0+) carries 0.
                0 => skb_len(ctx).saturating_sub(40),
                n => n as u32,
            };
            seg.th = hdr(ctx, 40)?;
        } else if h[6] == IPPROTO_HOPOPTS && plen == 0 {
            // BIG TCP on 6.0 to 6.19: a GSO packet over 64 KiB carries a Hop-by-Hop header
            // holding only a Jumbo Payload option, then TCP.
            let x: [u8; 8] = hdr(ctx, 40)?;
            if x[0] != IPPROTO_TCP_U8 || x[1] != 0 || x[2] != IPV6_TLV_JUMBO || x[3] != 4 {
                return None;
            }
            seg.l4_off = 48;
            seg.l3_payload = skb_len(ctx).saturating_sub(48);
            seg.th = hdr(ctx, 48)?;
        } else {
            return None;
        }
        seg.family = AF_INET6;
        seg.ttl = h[7];
        seg.src.copy_from_slice(&h[8..24]);
        seg.dst.copy_from_slice(&h[24..40]);
    } else {
        return None;
    }
    Some(())
}

/// One segment: per-socket bookkeeping, a record for control segments and firsts, and the
/// payload to the HTTP/2 walker. Inlined into both entry programs: every segment runs
/// it, and a BPF-to-BPF call costs a call and a return (a return thunk on kernels with
/// return-stack mitigations).
#[inline(always)]
pub fn try_packet(ctx: &SkBuffContext, ingress: bool) -> Option<()> {
    let mut seg = MaybeUninit::<Seg>::uninit();
    // SAFETY: a local of 64 bytes, 8-byte aligned; all zeroes is a valid `Seg`.
    // Used through a reference: moving the value out (`assume_init`) is a copy of known
    // zeroes, which LLVM turns back into a `memset` call.
    let seg: &mut Seg = unsafe {
        zero_in_place(seg.as_mut_ptr());
        &mut *seg.as_mut_ptr()
    };
    if !parse_headers(ctx, seg) {
        return None;
    }
    if seg.l4_off > 60 {
        return None;
    }
    let th = &seg.th;
    bump(counter::PACKETS); // exported as `packets`
    let tcp_flags = th[13];
    let doff = ((th[12] >> 4) as u32) * 4;
    let seq = u32::from_be_bytes([th[4], th[5], th[6], th[7]]);
    let payload_len = seg.l3_payload.saturating_sub(doff);
    // SAFETY: `sk` is a context field; its address is recorded, and the pointer goes only
    // to helpers that check it.
    let sk_ptr = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    let sk = sk_ptr as u64;
    if tcp_flags & tcp_flag::RST == 0 && not_a_connection(ctx) {
        return None;
    }
    let control = tcp_flags & (tcp_flag::SYN | tcp_flag::FIN | tcp_flag::RST) != 0;
    let dir_bit: u8 = if ingress { seen::INGRESS } else { seen::EGRESS };
    // A plain pointer, null when absent: an `Option` carried across the helper calls below
    // is what 5.10 and 6.1 lose track of (verifier.rs).
    let full = full_sock(sk_ptr);
    let existing: *mut PktState = if full.is_null() {
        core::ptr::null_mut()
    } else {
        pkt_state(full, core::ptr::null())
    };
    if !existing.is_null() {
        // SAFETY: non-null map value pointer, valid for this program run.
        let st = unsafe { &*existing };
        // A bare ACK on a known socket that changes nothing (about half of a bulk
        // transfer's segments): no record, no walk, no state change, so the acceptance
        // check below has nothing to protect.
        if payload_len == 0
            && !control
            && st.seen & dir_bit != 0
            && (!ingress || st.ttl_in == seg.ttl)
        {
            return Some(());
        }
    }
    if ingress && !acceptable(ctx, th, payload_len) {
        // Not evidence: TCP will drop it (a forged or stale segment), so it must neither
        // become a fact nor move the walker nor the TTL baseline.
        bump(counter::UNACCEPTED); // exported as `unaccepted`
        return None;
    }

    let mut evflags: u8 = if ingress { flag::INGRESS } else { 0 };
    // A socket connecting again after TCP_CLOSE keeps its storage (it lives as long as the
    // socket): its new SYN starts the state over. A retransmitted SYN finds nothing from
    // the peer yet and keeps the state it has.
    let restart = !existing.is_null()
        && !ingress
        && tcp_flags & (tcp_flag::SYN | tcp_flag::ACK) == tcp_flag::SYN
        // SAFETY: non-null map value pointer, valid for this program run.
        && unsafe { (*existing).seen } & seen::INGRESS != 0;
    let st = if !existing.is_null() && !restart {
        existing
    } else {
        // From read-only data: a copy on the stack would cost 88 of the 512 bytes the
        // whole call chain may use (see verifier.rs).
        let init: &PktState =
            if tcp_flags & tcp_flag::SYN != 0 || nothing_passed(full, ingress, payload_len, ctx) {
                &FRESH
            } else {
                &MIDSTREAM
            };
        if !existing.is_null() {
            // SAFETY: non-null map value pointer, valid for this program run.
            unsafe { *existing = *init };
            existing
        } else {
            let created = if full.is_null() {
                core::ptr::null_mut()
            } else {
                pkt_state(full, init)
            };
            if created.is_null() {
                // Not a full socket (a request or TIME_WAIT socket's RST), or the kernel
                // refused the storage: a control segment is still reported, without state.
                if !full.is_null() {
                    bump(counter::SKMAP_FAILS); // exported as `skmap_fails`
                }
                if control {
                    emit_packet(
                        ctx,
                        seg,
                        th,
                        sk,
                        evflags | flag::FIRST_IN_DIR,
                        payload_len,
                        0,
                    );
                }
                return Some(());
            }
            created
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
    if payload_len > 0 {
        // SAFETY: helper without preconditions; the verifier inlines it as a load.
        let tick = unsafe { bpf_jiffies64() } as u32;
        if tick != st.data_tick || st.last_data_ns == 0 {
            st.data_tick = tick;
            // SAFETY: helper without preconditions.
            st.last_data_ns = unsafe { bpf_ktime_get_ns() };
        }
    }
    if control || evflags & (flag::FIRST_IN_DIR | flag::TTL_CHANGED) != 0 {
        emit_packet(
            ctx,
            seg,
            th,
            sk,
            evflags | flag::HAS_STATE,
            payload_len,
            st.last_data_ns,
        );
    }
    // Sockets whose payload is not HTTP/2 (TLS, anything else) skip the walker, and so do
    // segments that hold no frame header (inside a large DATA frame): only the end of the
    // walked bytes moves. The rest goes to the walker program; when it did not load, the
    // payload is not walked (the probe report says so).
    let di = if ingress { 1 } else { 0 };
    if ingress
        && payload_len > 0
        && st.seen & seen::START != 0
        && st.dir[di].sync == sync::AWAIT
        && received_before(full)
    {
        // The state says the stream's start was seen, yet TCP already holds payload from the
        // peer that never passed here: the segment that completed the handshake carried it
        // and was filtered under the listener, while on another CPU a bare ACK reached the
        // new socket first, before that payload was queued, and made its state "fresh".
        // This direction then joins mid-stream, as for a socket met after its start.
        st.seen &= !seen::START;
    }
    let d = &mut st.dir[di];
    if d.sync != sync::OFF
        && payload_len > 0
        && payload_len < 0x0100_0000
        && !h2_headerless(d, seq, payload_len)
    {
        hand_over(ctx, seq, seg.l4_off.wrapping_add(doff), payload_len);
        tail_call(ctx, ingress, walk_slot::FIRST);
    }
    Some(())
}

/// Where the segment's payload is, for the walker programs, in the skb's control buffer:
/// they then need not parse the IP and TCP headers again. The buffer is the program
/// run's: tail calls keep it, and the kernel restores the owner's bytes when the run
/// ends (`bpf_prog_run_save_cb`).
#[inline(always)]
fn hand_over(ctx: &SkBuffContext, seq: u32, poff: u32, plen: u32) {
    // SAFETY: `cb` is a writable field of the context for cgroup_skb programs.
    unsafe {
        let cb = &mut (*ctx.skb.skb).cb;
        cb[0] = seq;
        cb[1] = poff;
        cb[2] = plen;
        cb[3] = CB_SEGMENT;
    }
}

/// Tail call into the direction's walker program in `slot`; returns only when that is not
/// taken (empty slot, tail-call limit).
#[inline(always)]
fn tail_call(ctx: &SkBuffContext, ingress: bool, slot: u32) {
    // SAFETY: a tail call into a program of the same type and attach type; on failure
    // execution continues here.
    unsafe {
        if ingress {
            WALK_IN.tail_call(ctx, slot);
        } else {
            WALK_OUT.tail_call(ctx, slot);
        }
    }
}

/// Frame headers are left in this segment after a run's bounded walk: continue in the
/// direction's continuation program, else report the rest lost.
#[inline(always)]
fn walk_on(ctx: &SkBuffContext, st: &mut PktState, info: &SegInfo, ingress: bool) {
    tail_call(ctx, ingress, walk_slot::MORE);
    h2_lost_rest(st, info);
}

/// The walker's first run over a segment (`skb_h2_in`, `skb_h2_out`): where its payload is,
/// from the control buffer ([`hand_over`]; the headers are not parsed again), the socket's
/// state as the entry program left it, and up to one run's frames.
#[inline(always)]
pub fn try_walk_first(ctx: &SkBuffContext, ingress: bool) -> Option<()> {
    walk_segment(ctx, ingress, |st, info| {
        if h2_segment(ctx, st, info) {
            walk_on(ctx, st, info, ingress);
        }
    })
}

/// The walker's continuation (`skb_walk_in`, `skb_walk_out`): the same segment again and
/// the next run's frames.
#[inline(always)]
pub fn try_walk_more(ctx: &SkBuffContext, ingress: bool) -> Option<()> {
    walk_segment(ctx, ingress, |st, info| {
        if h2_more(ctx, st, info) {
            walk_on(ctx, st, info, ingress);
        }
    })
}

/// Runs `walk` on the segment a walker program was tail-called for and its socket's state.
/// Passed in rather than returned: a returned (pointer, `SegInfo`) pair made the 6.1
/// verifier process four times the instructions for the same walk (`vm report -k 6.1`).
#[inline(always)]
fn walk_segment(
    ctx: &SkBuffContext,
    ingress: bool,
    walk: impl FnOnce(&mut PktState, &SegInfo),
) -> Option<()> {
    // SAFETY: reading the context's control buffer, which the entry program filled
    // (`hand_over`) before the tail call that led here.
    let (seq, poff, plen, mark) = unsafe {
        let cb = &(*ctx.skb.skb).cb;
        (cb[0], cb[1], cb[2], cb[3])
    };
    if mark != CB_SEGMENT || plen == 0 || plen >= 0x0100_0000 {
        return None;
    }
    // SAFETY: `sk` is a context field; the pointer goes only to helpers that check it.
    let sk_ptr = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    let sk = sk_ptr as u64;
    let full = full_sock(sk_ptr);
    if full.is_null() {
        return None;
    }
    let st = pkt_state(full, core::ptr::null());
    if st.is_null() {
        return None;
    }
    // SAFETY: non-null map value pointer, valid for this program run.
    let st = unsafe { &mut *st };
    let info = SegInfo {
        sk,
        seq,
        poff,
        plen,
        di: if ingress { 1 } else { 0 },
    };
    walk(st, &info);
    Some(())
}

/// Whether no payload has passed on the full socket `full` before this segment, either
/// way, so that state made now starts at the stream's start (`seen::START`): read from the
/// counters TCP keeps from the socket's start, bytes received in order (`bytes_received`,
/// before this ingress segment is processed) and payload segments sent (`data_segs_out`,
/// which on egress already counts this segment, `gso_segs` of them). Segments with SYN do
/// not ask. A socket met after its start (open before the agent, idle since) is judged as
/// well as one seen opening.
#[inline(never)]
fn nothing_passed(
    full: *mut aya_ebpf::bindings::bpf_sock,
    ingress: bool,
    payload_len: u32,
    ctx: &SkBuffContext,
) -> bool {
    if full.is_null() {
        return false;
    }
    // SAFETY: the helper checks its argument (a full socket from `bpf_sk_fullsock`) and
    // returns null for anything but a TCP socket.
    let tp = unsafe { bpf_tcp_sock(full) };
    if tp.is_null() {
        return false;
    }
    // SAFETY: non-null pointer from the helper; read-only fields.
    let (received, sent) = unsafe { ((*tp).bytes_received, (*tp).data_segs_out) };
    let this = if ingress || payload_len == 0 {
        0
    } else {
        // SAFETY: reading a field of the context the verifier hands us.
        unsafe { (*ctx.skb.skb).gso_segs }.max(1)
    };
    received == 0 && sent <= this
}

/// Whether TCP has received payload in order on the full socket `full` before this ingress
/// segment (`bytes_received`; this hook runs before TCP processes the segment).
#[inline(never)]
fn received_before(full: *mut aya_ebpf::bindings::bpf_sock) -> bool {
    if full.is_null() {
        return false;
    }
    // SAFETY: the helper checks its argument (a full socket from `bpf_sk_fullsock`) and
    // returns null for anything but a TCP socket.
    let tp = unsafe { bpf_tcp_sock(full) };
    // SAFETY: non-null pointer from the helper; a read-only field.
    !tp.is_null() && unsafe { (*tp).bytes_received } != 0
}

/// A listener (handshake segments are filtered against it), a request socket, a
/// TIME_WAIT socket or a socket in CLOSE: none is a connection the agent tracks, and their
/// segments were decoded only to be thrown away (a record, and per-socket state, per
/// handshake and per final ACK). A socket in CLOSE is unhashed, so only a segment looked up
/// just before its close reaches it, and TCP drops it: not evidence, and nothing of it may
/// follow the socket's CLOSE record (the agent meets an unknown socket at its first data or
/// ACK segment). RSTs are still recorded by the caller: every RST that leaves this host is
/// provenance for the one that arrives, and a socket's abort sends its RST after CLOSE.
#[inline(always)]
fn not_a_connection(ctx: &SkBuffContext) -> bool {
    // SAFETY: reading a context field.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: non-null socket pointer from the context; `state` is readable for every kind
    // of socket the hook can see.
    let state = unsafe { (*sk).state };
    // TCP_TIME_WAIT 6, TCP_CLOSE 7, TCP_LISTEN 10, TCP_NEW_SYN_RECV 12.
    matches!(state, 6 | 7 | 10 | 12)
}

/// Whether the receiving socket's TCP can accept this ingress segment, judged from its
/// state before TCP processes it (this hook runs before TCP's checks): the rule is
/// [`tracer_common::tcpaccept::acceptable`], documented and unit-tested there (the loopback
/// ACK race and sequence wraparound included). Segments without a full TCP socket are not
/// judged (true).
#[inline(never)]
fn acceptable(ctx: &SkBuffContext, th: &[u8; 20], payload_len: u32) -> bool {
    // SAFETY: reading a context field.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return true;
    }
    // SAFETY: the helper checks its argument (a non-null socket pointer from the context)
    // and returns null for anything but a full TCP socket.
    let tp = unsafe { bpf_tcp_sock(sk) };
    if tp.is_null() {
        return true;
    }
    // SAFETY: non-null pointers returned by the verifier-checked context and helper; the
    // fields are read-only views of the socket.
    let sock = unsafe {
        SockSeq {
            state: (*sk).state,
            rcv_nxt: (*tp).rcv_nxt,
            snd_una: (*tp).snd_una,
            snd_nxt: (*tp).snd_nxt,
            wnd: rcv_wnd_max(),
        }
    };
    let seg = SegSeq {
        flags: th[13],
        seq: u32::from_be_bytes([th[4], th[5], th[6], th[7]]),
        ack: u32::from_be_bytes([th[8], th[9], th[10], th[11]]),
        payload_len,
    };
    tcpaccept::acceptable(&sock, &seg)
}

/// The `PACKET` record.
#[inline(always)]
fn emit_packet(
    ctx: &SkBuffContext,
    seg: &Seg,
    th: &[u8; 20],
    sk: u64,
    evflags: u8,
    payload_len: u32,
    last_data_ns: u64,
) {
    let ingress = evflags & flag::INGRESS != 0;
    // SAFETY: the helper takes the program's own context; it reads the cgroup of the
    // socket the hook runs for (the kernel sets `skb->sk` for the run in both directions).
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    emit(kind::PACKET, sk, |ev: &mut PacketRecord| {
        ev.last_data_ns = last_data_ns;
        ev.cgroup_id = cgroup_id;
        ev.ep.family = seg.family;
        ev.ttl = seg.ttl;
        ev.tcp_flags = th[13];
        ev.flags = evflags | flag::HAS_TUPLE;
        ev.seq = u32::from_be_bytes([th[4], th[5], th[6], th[7]]);
        ev.ack = u32::from_be_bytes([th[8], th[9], th[10], th[11]]);
        ev.payload_len = payload_len;
        let sport = u16::from_be_bytes([th[0], th[1]]);
        let dport = u16::from_be_bytes([th[2], th[3]]);
        if ingress {
            ev.ep.saddr = seg.dst;
            ev.ep.daddr = seg.src;
            ev.ep.sport = dport;
            ev.ep.dport = sport;
        } else {
            ev.ep.saddr = seg.src;
            ev.ep.daddr = seg.dst;
            ev.ep.sport = sport;
            ev.ep.dport = dport;
        }
    });
}
