//! HTTP/2 frame walking in TCP sequence space, per socket and direction.
//!
//! The sniffing rules (preface, TLS, plausible headers, chains) are
//! `tracer_common::h2sniff`, shared with the agent and the fuzzer; this module only loads
//! bytes from the packet, keeps per-direction state, and reports frames and notes.

use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::SkBuffContext};
use tracer_common::{
    H2_CAPTURE, H2FrameRecord, H2NoteRecord, counter, flag,
    h2sniff::{
        self, Chain, HEADER_LEN, RESYNC_CHAIN_FRAMES, RESYNC_MAX_FRAME_SIZE, frame_flag, frame_type,
    },
    kind, proto,
};

use crate::{
    emit::emit,
    maps::{DirState, PktState, bump, seen, sk_proto, sync},
    verifier::{pkt_off, verifier_len},
};

/// Frame headers walked per program run. A segment with more frames than one run takes is
/// walked on by the continuation programs (`skb_walk_in`, `skb_walk_out`, through a tail
/// call; the first run is a tail call too, and the kernel allows 33: 396 frames per
/// segment); past that the direction loses sync honestly (reported) rather than looping
/// unboundedly. Measured while the walk ran inside the entry programs: 32 made the 5.10
/// verifier give up (over 1M instructions processed for skb_ingress); 12 fits.
const MAX_FRAMES_PER_SEG: usize = 12;
/// Segments a mid-stream direction may try to resynchronise on before giving up.
const MAX_RESYNC_TRIES: u8 = 64;

/// Where one segment's TCP payload is.
pub struct SegInfo {
    pub sk: u64,
    pub seq: u32,
    /// Offset of the TCP payload in the packet.
    pub poff: u32,
    pub plen: u32,
    /// 0: egress, 1: ingress.
    pub di: usize,
}

#[inline(always)]
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

#[inline(always)]
fn dir_flag(di: usize) -> u8 {
    if di == 1 { flag::INGRESS } else { 0 }
}

/// An `H2_NOTE` record.
#[inline(always)]
fn note(sk: u64, di: usize, seq: u32, what: u8) {
    emit(kind::H2_NOTE, sk, |rec: &mut H2NoteRecord| {
        rec.seq = seq;
        rec.note = what;
        rec.flags = dir_flag(di);
    });
}

/// One segment's payload for the HTTP/2 walker. True when frame headers are left in the
/// segment after one run's bounded walk: the caller continues with [`h2_more`] in a
/// tail-called program, or gives the rest up with [`h2_lost_rest`].
#[inline(never)]
pub fn h2_segment(ctx: &SkBuffContext, st: &mut PktState, seg: &SegInfo) -> bool {
    let di = if seg.di == 1 { 1 } else { 0 };
    let proto_now = st.proto;
    let seen_bits = st.seen;
    let d = &mut st.dir[di];
    if d.sync == sync::OFF {
        return false;
    }
    let seg_end = seg.seq.wrapping_add(seg.plen);
    let mut start_off: u32 = 0;
    if d.have_end != 0 {
        if !before(d.end, seg_end) {
            return false; // a retransmission of bytes already walked
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
            match first_payload(ctx, d, seg, di, proto_now, seen_bits) {
                Decided::H2Preface => {
                    st.proto = sk_proto::H2;
                }
                Decided::Stop(p) => {
                    st.proto = p;
                    st.dir[0].sync = sync::OFF;
                    st.dir[1].sync = sync::OFF;
                    return false;
                }
                Decided::Walk | Decided::Resync => {}
            }
        }
    }
    let d = &mut st.dir[di];
    if d.sync == sync::UNSYNCED && (start_off != 0 || !resync(ctx, d, seg, di)) {
        return false;
    }
    d.sync == sync::SYNCED && walk::<true>(ctx, d, seg, di)
}

/// A segment that starts where the walked bytes end and holds no frame header (a stretch
/// inside a large DATA frame): what [`h2_segment`] would do with it, which is only to move
/// the end of the walked bytes, done in place so that the entry program need not call the
/// walker. False for anything else.
#[inline(always)]
pub fn h2_headerless(d: &mut DirState, seq: u32, plen: u32) -> bool {
    let ahead = d.next_hdr.wrapping_sub(seq);
    if d.sync == sync::SYNCED
        && d.have_end != 0
        && d.end == seq
        && d.hdr_have == 0
        && !before(d.next_hdr, seq)
        && ahead >= plen
    {
        d.end = seq.wrapping_add(plen);
        return true;
    }
    false
}

/// The next run's share of a segment that [`h2_segment`] (or the run before) left frame
/// headers in; true when some are still left. Checks that the state still describes this
/// segment: it ends where the segment ends and its next header lies inside it.
#[inline(never)]
pub fn h2_more(ctx: &SkBuffContext, st: &mut PktState, seg: &SegInfo) -> bool {
    let di = if seg.di == 1 { 1 } else { 0 };
    let d = &mut st.dir[di];
    if d.sync != sync::SYNCED
        || d.have_end == 0
        || d.end != seg.seq.wrapping_add(seg.plen)
        || d.hdr_have != 0
        || d.next_hdr.wrapping_sub(seg.seq) >= seg.plen
    {
        return false;
    }
    walk::<false>(ctx, d, seg, di)
}

/// Frame headers are left in this segment and no further run can walk them (the
/// continuation program is missing or the tail-call limit is reached): boundaries are lost
/// for this direction, say so.
#[inline(never)]
pub fn h2_lost_rest(st: &mut PktState, seg: &SegInfo) {
    let di = if seg.di == 1 { 1 } else { 0 };
    let d = &mut st.dir[di];
    if d.sync == sync::SYNCED {
        desync(d, seg, di);
    }
}

enum Decided {
    H2Preface,
    Walk,
    Resync,
    Stop(u8),
}

/// The first payload bytes of a direction: preface, a leading SETTINGS frame, TLS, or other
/// (rules: `h2sniff::{is_preface_words, is_leading_settings, is_tls_record_header}`).
#[inline(always)]
fn first_payload(
    ctx: &SkBuffContext,
    d: &mut DirState,
    seg: &SegInfo,
    di: usize,
    proto_now: u8,
    seen_bits: u8,
) -> Decided {
    if proto_now == sk_proto::TLS || proto_now == sk_proto::OTHER {
        d.sync = sync::OFF;
        return Decided::Stop(proto_now);
    }
    let off = seg.poff as usize;
    if seg.plen >= 24 {
        // Loaded as words: compared without memcmp (see verifier.rs).
        if let Ok(w) = ctx.load::<[u64; 3]>(off) {
            if h2sniff::is_preface_words(&w) {
                d.sync = sync::SYNCED;
                d.next_hdr = seg.seq.wrapping_add(24);
                note(seg.sk, di, seg.seq, proto::H2_PREFACE);
                return Decided::H2Preface;
            }
        }
    }
    if seg.plen >= HEADER_LEN as u32 {
        if let Ok(h) = ctx.load::<[u8; HEADER_LEN]>(off) {
            if h2sniff::is_leading_settings(&h) {
                d.sync = sync::SYNCED;
                d.next_hdr = seg.seq;
                if proto_now == sk_proto::UNKNOWN {
                    note(
                        seg.sk,
                        di,
                        seg.seq,
                        joined(seen_bits, proto::H2_SETTINGS_FIRST),
                    );
                }
                return Decided::Walk;
            }
        }
    }
    if seg.plen >= 5 {
        if let Ok(h) = ctx.load::<[u8; 5]>(off) {
            if h2sniff::is_tls_record_header(&h) {
                note(seg.sk, di, seg.seq, proto::TLS);
                return Decided::Stop(sk_proto::TLS);
            }
        }
    }
    if proto_now == sk_proto::H2 {
        d.sync = sync::SYNCED;
        d.next_hdr = seg.seq;
        if seen_bits & seen::START == 0 {
            note(seg.sk, di, seg.seq, proto::RESYNCED);
        }
        return Decided::Walk;
    }
    if seen_bits & seen::START != 0 {
        note(seg.sk, di, seg.seq, proto::OTHER);
        return Decided::Stop(sk_proto::OTHER);
    }
    d.sync = sync::UNSYNCED;
    Decided::Resync
}

/// `at_start` when the socket's state was made at its stream's start (`seen::START`), else
/// `RESYNCED`: a direction whose first walked payload is not its first byte joined mid-stream
/// (a connection older than the agent, or one whose first data segment completed the
/// handshake under the listener, where no hook sees the new socket), and the agent says so.
#[inline(always)]
fn joined(seen_bits: u8, at_start: u8) -> u8 {
    if seen_bits & seen::START != 0 {
        at_start
    } else {
        proto::RESYNCED
    }
}

/// Mid-stream: accept a segment whose bytes are a chain of plausible frame headers ending
/// exactly at the segment end (`h2sniff::chain_step`, at most `RESYNC_CHAIN_FRAMES`
/// headers); then walk it from its start.
#[inline(always)]
fn resync(ctx: &SkBuffContext, d: &mut DirState, seg: &SegInfo, di: usize) -> bool {
    if d.tries >= MAX_RESYNC_TRIES {
        d.sync = sync::OFF;
        note(seg.sk, di, seg.seq, proto::GAVE_UP);
        return false;
    }
    d.tries += 1;
    let mut off: u32 = 0;
    for _ in 0..RESYNC_CHAIN_FRAMES {
        if off.wrapping_add(HEADER_LEN as u32) > seg.plen {
            return false;
        }
        let Ok(h) = ctx.load::<[u8; HEADER_LEN]>(pkt_off(seg.poff.wrapping_add(off)) as usize)
        else {
            return false;
        };
        match h2sniff::chain_step(&h, &mut off, seg.plen, RESYNC_MAX_FRAME_SIZE) {
            Chain::Complete => {
                d.sync = sync::SYNCED;
                d.next_hdr = seg.seq;
                d.hdr_have = 0;
                note(seg.sk, di, seg.seq, proto::RESYNCED);
                return true;
            }
            Chain::Broken => return false,
            Chain::More => {}
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
    bump(counter::H2_DESYNCS); // exported as `h2_desyncs`
    note(seg.sk, di, seg.seq, proto::DESYNC);
}

/// Walks up to [`MAX_FRAMES_PER_SEG`] frame headers that start inside this segment; true
/// when more start in it after those.
///
/// `SPLIT`: whether the first header may be one buffered from the previous segment (a run
/// of [`h2_segment`]). A continuation run starts at a whole header ([`h2_more`] checks
/// that), and leaving that code out of its program halves what the verifier explores there.
#[inline(always)]
fn walk<const SPLIT: bool>(
    ctx: &SkBuffContext,
    d: &mut DirState,
    seg: &SegInfo,
    di: usize,
) -> bool {
    // A header behind a contiguous segment's start was never walked (the previous segment
    // held more frames than its runs took): boundaries are lost, say so.
    if d.hdr_have == 0 && before(d.next_hdr, seg.seq) {
        desync(d, seg, di);
        return false;
    }
    for _ in 0..MAX_FRAMES_PER_SEG {
        // Offset (in this segment) of the first byte of the header still to read.
        let (hdr_start, got) = if SPLIT && d.hdr_have != 0 {
            // A header split across segments: its first 1..=8 bytes are buffered; or a
            // whole control-frame header (9) whose payload starts in this segment.
            let have = (d.hdr_have & 0xf) as u32;
            let at = d.next_hdr.wrapping_add(have).wrapping_sub(seg.seq);
            (at, have)
        } else {
            (d.next_hdr.wrapping_sub(seg.seq), 0)
        };
        if hdr_start >= seg.plen {
            return false;
        }
        let avail = seg.plen - hdr_start;
        let need = HEADER_LEN as u32 - got;
        if avail < need {
            // The header continues in the next segment: buffer what is here (1..=8 bytes,
            // with what earlier segments gave, at most 8 of the 9).
            if avail == 0 || got + avail > 8 {
                return false;
            }
            let n = verifier_len(avail, 0x7);
            // SAFETY: destination is inside the map value: `hdr` is 24 bytes, the offset is
            // masked below 16 and n <= 8 (and got + n <= 8 in fact).
            let ok = unsafe {
                bpf_skb_load_bytes(
                    ctx.skb.skb as *const _,
                    pkt_off(seg.poff.wrapping_add(hdr_start)),
                    d.hdr.as_mut_ptr().add((got & 0xf) as usize) as *mut _,
                    n,
                )
            } == 0;
            if ok {
                d.hdr_have = (got + n) as u8;
            } else {
                // The header's first bytes are lost: its frame must not be reported.
                desync(d, seg, di);
            }
            return false;
        }
        // Built by value in both branches: a zero-initialised array would be a memset call
        // (see verifier.rs).
        let h: [u8; HEADER_LEN] = if !SPLIT || got == 0 {
            let Ok(full) =
                ctx.load::<[u8; HEADER_LEN]>(pkt_off(seg.poff.wrapping_add(hdr_start)) as usize)
            else {
                return false;
            };
            full
        } else if need == 0 {
            // A whole header deferred from the previous segment (see below).
            d.hdr_have = 0;
            let b = &d.hdr;
            [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8]]
        } else {
            // Complete the buffered header in place (a map value, see verifier.rs).
            let g = (got & 0xf) as usize;
            if need == 0 || need > 8 || g + need as usize > HEADER_LEN {
                return false;
            }
            let n = verifier_len(need, 0x7);
            // SAFETY: destination `hdr[g..g + n]` lies inside the 24-byte map value field
            // (g < 16, n <= 8).
            let ok = unsafe {
                bpf_skb_load_bytes(
                    ctx.skb.skb as *const _,
                    pkt_off(seg.poff.wrapping_add(hdr_start)),
                    d.hdr.as_mut_ptr().add(g) as *mut _,
                    n,
                )
            } == 0;
            d.hdr_have = 0;
            if !ok {
                desync(d, seg, di);
                return false;
            }
            let b = &d.hdr;
            [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8]]
        };
        let len = h2sniff::frame_len(&h);
        let frame_seq = d.next_hdr;
        // Payload bytes of this frame present in this segment.
        let body_off = hdr_start + need;
        let body_avail = seg.plen - body_off;
        if body_avail == 0 && len != 0 && captured_type(h[3]) {
            // The header ends this segment and the payload attribution needs is in the
            // next one: keep the header and report the frame from there.
            d.hdr[0] = h[0];
            d.hdr[1] = h[1];
            d.hdr[2] = h[2];
            d.hdr[3] = h[3];
            d.hdr[4] = h[4];
            d.hdr[5] = h[5];
            d.hdr[6] = h[6];
            d.hdr[7] = h[7];
            d.hdr[8] = h[8];
            d.hdr_have = HEADER_LEN as u8;
            return false;
        }
        h2_frame(ctx, seg, di, frame_seq, &h, body_off, body_avail.min(len));
        bump(counter::H2_FRAMES); // exported as `h2_frames`
        d.next_hdr = frame_seq.wrapping_add(HEADER_LEN as u32).wrapping_add(len);
    }
    // Still a header inside this segment after the bounded pass: the next run's.
    d.hdr_have == 0 && d.next_hdr.wrapping_sub(seg.seq) < seg.plen
}

/// Frame types whose payload prefix is copied into the record.
#[inline(always)]
fn captured_type(t: u8) -> bool {
    use frame_type::{GOAWAY, PING, RST_STREAM, SETTINGS};
    matches!(t, RST_STREAM | SETTINGS | PING | GOAWAY)
}

/// Reports one frame: control frames with a payload prefix, stream openers and stream ends
/// with their header only; bulk DATA and flow control are not reported.
#[inline(always)]
fn h2_frame(
    ctx: &SkBuffContext,
    seg: &SegInfo,
    di: usize,
    frame_seq: u32,
    h: &[u8; HEADER_LEN],
    body_off: u32,
    body_avail: u32,
) {
    use frame_type::{DATA, HEADERS};
    let t = h[3];
    let capture = captured_type(t);
    let header_only = t == HEADERS || (t == DATA && h[4] & frame_flag::END_STREAM != 0);
    if !capture && !header_only {
        return;
    }
    emit(kind::H2_FRAME, seg.sk, |rec: &mut H2FrameRecord| {
        rec.seq = frame_seq;
        rec.flags = dir_flag(di);
        rec.head = *h;
        if capture {
            let n = body_avail.min(H2_CAPTURE as u32);
            if n > 0 {
                let n = verifier_len(n, H2_CAPTURE as u32 - 1);
                // SAFETY: destination is the record's 64-byte payload and n <= 64.
                let ok = unsafe {
                    bpf_skb_load_bytes(
                        ctx.skb.skb as *const _,
                        pkt_off(seg.poff.wrapping_add(body_off)),
                        rec.payload.as_mut_ptr() as *mut _,
                        n,
                    )
                } == 0;
                if ok {
                    rec.payload_len = n as u16;
                }
            }
        }
    });
}
