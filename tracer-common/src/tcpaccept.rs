//! Would the receiving socket's TCP accept this segment? The rule the ingress hook applies
//! before a segment may become evidence (see docs/hostile-input.md), as a pure function of
//! the segment's header fields and the socket's sequence state, so that it is unit-tested
//! here (sequence wraparound included) and run unchanged by the kernel program.
//!
//! All sequence arithmetic is modulo 2^32 (RFC 9293 §3.4).

use crate::tcp_flag;

/// TCP states in which the receive checks of RFC 9293 §3.10.7.4 and RFC 5961 apply to a
/// full socket: ESTABLISHED 1, FIN_WAIT1 4, FIN_WAIT2 5, CLOSE_WAIT 8, LAST_ACK 9,
/// CLOSING 11.
#[inline(always)]
pub fn synchronized(state: u32) -> bool {
    matches!(state, 1 | 4 | 5 | 8 | 9 | 11)
}

/// `a` comes before `b` in sequence space.
#[inline(always)]
pub fn seq_before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// The receiving socket's sequence state, read just before TCP processes the segment.
#[derive(Clone, Copy, Debug)]
pub struct SockSeq {
    pub state: u32,
    pub rcv_nxt: u32,
    pub snd_una: u32,
    pub snd_nxt: u32,
    /// The largest receive window this host can advertise (`Config::rcv_wnd_max`).
    pub wnd: u32,
}

/// The segment's header fields that matter.
#[derive(Clone, Copy, Debug)]
pub struct SegSeq {
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload_len: u32,
}

/// Whether TCP can accept `seg` on a socket in `sk`:
/// - RST: only at exactly `rcv_nxt` (RFC 5961 §3.2; an in-window RST elsewhere gets a
///   challenge ACK and is ignored), or `rcv_nxt - 1` once the peer's FIN was taken
///   (Linux's `tcp_reset_check`: CLOSE_WAIT, LAST_ACK, CLOSING);
/// - SYN on a synchronised connection: ignored (RFC 5961 §4); no ACK flag: dropped;
/// - otherwise the ACK must acknowledge nothing older than a window (RFC 5961 §5) and
///   nothing beyond both `snd_nxt` and a window past `snd_una`, and the sequence range must
///   lie within a window of `rcv_nxt`.
///
/// On loopback and veth the peer's ACK can reach the hook while the sender is still inside
/// `tcp_write_xmit`, before `snd_nxt` advances; TCP backlogs it and accepts it a moment
/// later, hence the `snd_una + wnd` allowance. Sockets in other states are not judged
/// (true).
#[inline(always)]
pub fn acceptable(sk: &SockSeq, seg: &SegSeq) -> bool {
    if !synchronized(sk.state) {
        return true;
    }
    if seg.flags & tcp_flag::RST != 0 {
        return seg.seq == sk.rcv_nxt
            || (seg.seq == sk.rcv_nxt.wrapping_sub(1) && matches!(sk.state, 8 | 9 | 11));
    }
    if seg.flags & tcp_flag::SYN != 0 || seg.flags & tcp_flag::ACK == 0 {
        return false;
    }
    let unsent =
        seq_before(sk.snd_nxt, seg.ack) && seq_before(sk.snd_una.wrapping_add(sk.wnd), seg.ack);
    if unsent || seq_before(seg.ack, sk.snd_una.wrapping_sub(sk.wnd)) {
        return false;
    }
    let fin = (seg.flags & tcp_flag::FIN) as u32;
    let end = seg.seq.wrapping_add(seg.payload_len).wrapping_add(fin);
    !seq_before(sk.rcv_nxt.wrapping_add(sk.wnd), seg.seq)
        && !seq_before(end, sk.rcv_nxt.wrapping_sub(sk.wnd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp_flag::{ACK, FIN, PSH, RST, SYN};

    const W: u32 = 1 << 20;

    fn sk(state: u32, rcv_nxt: u32, snd_una: u32, snd_nxt: u32) -> SockSeq {
        SockSeq {
            state,
            rcv_nxt,
            snd_una,
            snd_nxt,
            wnd: W,
        }
    }

    fn seg(flags: u8, seq: u32, ack: u32, payload_len: u32) -> SegSeq {
        SegSeq {
            flags,
            seq,
            ack,
            payload_len,
        }
    }

    #[test]
    fn table() {
        const EST: u32 = 1;
        const CLOSE_WAIT: u32 = 8;
        const SYN_SENT: u32 = 2;
        // Near the top of sequence space: every check must hold across the wrap.
        let top = u32::MAX - 100;
        let cases: &[(&str, SockSeq, SegSeq, bool)] = &[
            (
                "in-order data",
                sk(EST, 1000, 500, 600),
                seg(ACK | PSH, 1000, 600, 100),
                true,
            ),
            (
                "RST at rcv_nxt",
                sk(EST, 1000, 500, 600),
                seg(RST | ACK, 1000, 600, 0),
                true,
            ),
            (
                "RST one past rcv_nxt (challenge ACK)",
                sk(EST, 1000, 500, 600),
                seg(RST, 1001, 0, 0),
                false,
            ),
            (
                "RST at rcv_nxt-1 while ESTABLISHED",
                sk(EST, 1000, 500, 600),
                seg(RST, 999, 0, 0),
                false,
            ),
            (
                "RST at rcv_nxt-1 after the peer's FIN",
                sk(CLOSE_WAIT, 1000, 500, 600),
                seg(RST, 999, 0, 0),
                true,
            ),
            (
                "SYN on an established connection",
                sk(EST, 1000, 500, 600),
                seg(SYN | ACK, 1000, 600, 0),
                false,
            ),
            (
                "no ACK flag",
                sk(EST, 1000, 500, 600),
                seg(PSH, 1000, 0, 10),
                false,
            ),
            (
                "ACK older than a window",
                sk(EST, 1000, 5_000_000, 5_000_100),
                seg(ACK, 1000, 5_000_000 - W - 1, 0),
                false,
            ),
            (
                "ACK of data still being transmitted (loopback race)",
                sk(EST, 1000, 500, 500),
                seg(ACK, 1000, 564, 0),
                true,
            ),
            (
                "ACK beyond snd_nxt and a window past snd_una",
                sk(EST, 1000, 500, 600),
                seg(ACK, 1000, 500 + W + 1, 0),
                false,
            ),
            (
                "data beyond a window of rcv_nxt",
                sk(EST, 1000, 500, 600),
                seg(ACK, 1000 + W + 1, 600, 10),
                false,
            ),
            (
                "old duplicate within a window (accepted: TCP re-ACKs)",
                sk(EST, 1_000_000_000, 500, 600),
                seg(ACK, 1_000_000_000 - 1000, 600, 100),
                true,
            ),
            (
                "data entirely older than a window",
                sk(EST, 1_000_000_000, 500, 600),
                seg(ACK, 1_000_000_000 - W - 200, 600, 100),
                false,
            ),
            (
                "FIN at rcv_nxt",
                sk(EST, 1000, 500, 600),
                seg(FIN | ACK, 1000, 600, 0),
                true,
            ),
            (
                "not synchronised: not judged",
                sk(SYN_SENT, 0, 500, 501),
                seg(RST, 12345, 0, 0),
                true,
            ),
            // Wraparound.
            (
                "RST at rcv_nxt across the wrap",
                sk(EST, 5, top, top),
                seg(RST, 5, 0, 0),
                true,
            ),
            (
                "RST at rcv_nxt-1 = u32::MAX after FIN",
                sk(CLOSE_WAIT, 0, 10, 10),
                seg(RST, u32::MAX, 0, 0),
                true,
            ),
            (
                "data straddling the wrap",
                sk(EST, top, 500, 600),
                seg(ACK, top, 600, 200),
                true,
            ),
            (
                "ACK across the wrap (snd_una before, ack after 0)",
                sk(EST, 1000, top, 50),
                seg(ACK, 1000, 20, 0),
                true,
            ),
            (
                "ACK race across the wrap",
                sk(EST, 1000, top, top),
                seg(ACK, 1000, 30, 0),
                true,
            ),
            (
                "ACK older than a window across the wrap",
                sk(EST, 1000, 10, 20),
                seg(ACK, 1000, 10u32.wrapping_sub(W + 1), 0),
                false,
            ),
            (
                "data just inside the window across the wrap",
                sk(EST, top, 500, 600),
                seg(ACK, top.wrapping_add(W), 600, 0),
                true,
            ),
            (
                "data just outside the window across the wrap",
                sk(EST, top, 500, 600),
                seg(ACK, top.wrapping_add(W + 1), 600, 0),
                false,
            ),
        ];
        for (name, s, g, want) in cases {
            assert_eq!(acceptable(s, g), *want, "{name}: {s:?} {g:?}");
        }
    }

    #[test]
    fn seq_before_is_antisymmetric_across_the_wrap() {
        for (a, b) in [
            (0u32, 1u32),
            (u32::MAX, 0),
            (u32::MAX - 5, 3),
            (1 << 31, (1 << 31) + 1),
        ] {
            assert!(seq_before(a, b), "{a} before {b}");
            assert!(!seq_before(b, a), "{b} not before {a}");
            assert!(!seq_before(a, a));
        }
    }
}
