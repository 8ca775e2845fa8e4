//! HTTP/2 sniffing rules, one copy for the kernel walker, the agent and the fuzzer.
//!
//! The kernel decides from the first bytes of a direction whether it carries HTTP/2 (the
//! client preface, or a leading SETTINGS frame on the server side), TLS, or something else,
//! and, on a connection first seen mid-stream, where frame boundaries are. The agent's
//! `h2` module re-exports these rules for its tests and the fuzz target, so what is tested
//! is what the kernel runs.
//!
//! Written for the BPF verifier of Linux 5.10 and 6.1: every function takes fixed-size
//! arrays (never slices of unknown length), is `#[inline(always)]`, compares with integer
//! operations (no `memcmp`/`memset` calls, which would be stack frames of their own), and
//! has no loops; a caller that walks a chain bounds its own loop.
//!
//! # Rules, and why
//!
//! - **Preface** ([`is_preface`]): all 24 octets of RFC 9113 §3.4. A prefix is not enough.
//! - **TLS** ([`is_tls_record_header`]): a 5-octet record header with content type
//!   0x14–0x17, legacy version 3.0–3.4 and a length no TLS stack exceeds
//!   ([`TLS_MAX_RECORD`]). The kernel used to look at 3 octets only, the agent at 5: the
//!   length is the only field of the five that filters binary junk starting with `16 03`,
//!   so the stricter rule is the one kept, and the kernel now needs 5 octets.
//! - **Plausible frame header** ([`plausible_header`]): what a conforming peer sends and a
//!   conforming receiver accepts *as framing*: a type RFC 9113 defines (unknown types are
//!   legal but say nothing about sync), the reserved bit clear, only the flags the type
//!   defines, the stream rule of the type, the length rule of the type (PING 8, RST_STREAM
//!   and WINDOW_UPDATE 4, PRIORITY 5, GOAWAY ≥ 8, SETTINGS a multiple of 6 and 0 with ACK,
//!   room for the pad-length / priority / promised-stream fields the flags announce) and a
//!   length within `max_frame_size`.
//!   - The cap applies to every type (RFC 9113 §4.2 makes any frame above
//!     SETTINGS_MAX_FRAME_SIZE a FRAME_SIZE_ERROR). The kernel used to cap only
//!     variable-length types, at 1 MiB, the agent every type at the caller's value. A
//!     direction seen mid-stream cannot know the negotiated value, so the kernel passes
//!     [`RESYNC_MAX_FRAME_SIZE`] (1 MiB, what Go's `net/http2` server advertises, larger
//!     than the 16 KiB default others keep).
//!   - Payload *values* are not judged. The agent used to reject a WINDOW_UPDATE with a
//!     zero increment, the kernel could not (it does not read payloads while
//!     resynchronising). RFC 9113 §6.9 makes that increment a PROTOCOL_ERROR of the stream
//!     or the connection, but it is still a correctly framed frame: its boundaries are
//!     exactly where the next frame starts, and the peer's reaction (RST_STREAM or GOAWAY)
//!     is evidence the tracer wants. Resynchronisation is about boundaries, so it accepts
//!     the frame; the agent's parser reports it.
//! - **Chain** ([`chain_step`]): resynchronising accepts a segment only if it is a chain of
//!   plausible headers whose frames end *exactly* at the segment end. A frame running past
//!   the end, or fewer than 9 octets left for the next header, means "not in sync" (never
//!   "probably fine"). The kernel stops after [`RESYNC_CHAIN_FRAMES`] headers (a verifier
//!   budget); the agent's `plausible_chain` has no bound. Both use the same step.

/// Size of a frame header on the wire.
pub const HEADER_LEN: usize = 9;

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: [u8; 24] = *b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The preface as three native-endian words, for a comparison without `memcmp`.
pub const PREFACE_WORDS: [u64; 3] = [preface_word(0), preface_word(8), preface_word(16)];

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

/// `SETTINGS_MAX_FRAME_SIZE` until the peer says otherwise (RFC 9113 §6.5.2).
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 16_384;

/// The frame length cap used where the negotiated one is unknown (a direction seen
/// mid-stream): the largest value a common server advertises (Go `net/http2`: 1 MiB).
pub const RESYNC_MAX_FRAME_SIZE: u32 = 1 << 20;

/// Frame headers the kernel examines per segment while resynchronising.
pub const RESYNC_CHAIN_FRAMES: usize = 4;

/// Largest TLS record length accepted: 2^14 plaintext plus the 2048 octets of expansion
/// TLS 1.2 allows (RFC 5246 §6.2.3; TLS 1.3 allows only 256).
pub const TLS_MAX_RECORD: u16 = (1 << 14) + 2048;

/// Frame types (RFC 9113 §6).
pub mod frame_type {
    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const PRIORITY: u8 = 2;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const PUSH_PROMISE: u8 = 5;
    pub const PING: u8 = 6;
    pub const GOAWAY: u8 = 7;
    pub const WINDOW_UPDATE: u8 = 8;
    pub const CONTINUATION: u8 = 9;
}

/// Flag bits; their meaning depends on the frame type.
pub mod frame_flag {
    /// DATA, HEADERS: last frame the sender will send on this stream.
    pub const END_STREAM: u8 = 0x1;
    /// SETTINGS, PING: this frame acknowledges the peer's.
    pub const ACK: u8 = 0x1;
    /// HEADERS, PUSH_PROMISE, CONTINUATION: the field block is complete.
    pub const END_HEADERS: u8 = 0x4;
    /// DATA, HEADERS, PUSH_PROMISE: a pad-length octet starts the payload.
    pub const PADDED: u8 = 0x8;
    /// HEADERS: exclusive bit, stream dependency and weight follow (5 octets).
    pub const PRIORITY: u8 = 0x20;
}

/// The 24-bit payload length of a frame header.
#[inline(always)]
pub fn frame_len(h: &[u8; HEADER_LEN]) -> u32 {
    u32::from_be_bytes([0, h[0], h[1], h[2]])
}

/// Whether three words loaded from the wire (native endian) are the client preface.
#[inline(always)]
pub fn is_preface_words(w: &[u64; 3]) -> bool {
    w[0] == PREFACE_WORDS[0] && w[1] == PREFACE_WORDS[1] && w[2] == PREFACE_WORDS[2]
}

/// Whether 24 octets are the client preface.
#[inline(always)]
pub fn is_preface(b: &[u8; 24]) -> bool {
    let w = |i: usize| {
        u64::from_ne_bytes([
            b[i],
            b[i + 1],
            b[i + 2],
            b[i + 3],
            b[i + 4],
            b[i + 5],
            b[i + 6],
            b[i + 7],
        ])
    };
    is_preface_words(&[w(0), w(8), w(16)])
}

/// Whether 5 octets are a TLS record header (see the [module docs](self) for the rule).
#[inline(always)]
pub fn is_tls_record_header(h: &[u8; 5]) -> bool {
    h[0] >= 0x14
        && h[0] <= 0x17
        && h[1] == 0x03
        && h[2] <= 0x04
        && u16::from_be_bytes([h[3], h[4]]) <= TLS_MAX_RECORD
}

/// Whether a 9-octet frame header is something a conforming peer sends as framing (see the
/// [module docs](self) for each rule and why).
#[inline(always)]
pub fn plausible_header(h: &[u8; HEADER_LEN], max_frame_size: u32) -> bool {
    use frame_flag::{ACK, END_HEADERS, END_STREAM, PADDED};
    // Qualified: frame_type::PRIORITY and frame_flag::PRIORITY share a name.
    use frame_type as t;

    let len = frame_len(h);
    let flags = h[4];
    if h[5] & 0x80 != 0 || len > max_frame_size {
        return false;
    }
    let stream_zero = h[5] == 0 && h[6] == 0 && h[7] == 0 && h[8] == 0;
    let pad = if flags & PADDED != 0 { 1 } else { 0 };
    // (defined flags, stream 0 required (1) / forbidden (0) / either (2), length test)
    let (defined, zero_rule, len_ok) = match h[3] {
        t::DATA => (END_STREAM | PADDED, 0, len >= pad),
        t::HEADERS => {
            let prio = if flags & frame_flag::PRIORITY != 0 {
                5
            } else {
                0
            };
            (
                END_STREAM | END_HEADERS | PADDED | frame_flag::PRIORITY,
                0,
                len >= pad + prio,
            )
        }
        t::PRIORITY => (0, 0, len == 5),
        t::RST_STREAM => (0, 0, len == 4),
        t::SETTINGS => (
            ACK,
            1,
            len.is_multiple_of(6) && (flags & ACK == 0 || len == 0),
        ),
        t::PUSH_PROMISE => (END_HEADERS | PADDED, 0, len >= 4 + pad),
        t::PING => (ACK, 1, len == 8),
        t::GOAWAY => (0, 1, len >= 8),
        t::WINDOW_UPDATE => (0, 2, len == 4),
        t::CONTINUATION => (END_HEADERS, 0, true),
        _ => return false,
    };
    let stream_ok = zero_rule == 2 || (zero_rule == 1) == stream_zero;
    flags & !defined == 0 && stream_ok && len_ok
}

/// Whether the first 9 octets of a direction are a SETTINGS frame header a server (or a
/// client without preface knowledge) would open with.
#[inline(always)]
pub fn is_leading_settings(h: &[u8; HEADER_LEN]) -> bool {
    h[3] == frame_type::SETTINGS && plausible_header(h, RESYNC_MAX_FRAME_SIZE)
}

/// Outcome of feeding one header to [`chain_step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Chain {
    /// The header was plausible and another one starts at the new offset.
    More,
    /// The header was plausible and its frame ends exactly at `total`: in sync.
    Complete,
    /// Not a plausible chain (implausible header, or the frame overruns `total`, or fewer
    /// than 9 octets are left for the next header).
    Broken,
}

/// One step of the chain rule: `h` is the header found at `*off` in a buffer of `total`
/// octets; on [`Chain::More`], `*off` is advanced to the next header, which the caller has
/// checked fits (`*off + 9 <= total`).
#[inline(always)]
pub fn chain_step(h: &[u8; HEADER_LEN], off: &mut u32, total: u32, max_frame_size: u32) -> Chain {
    if !plausible_header(h, max_frame_size) {
        return Chain::Broken;
    }
    // No overflow: `*off < total` and `frame_len < 2^24`; totals are segment or test sizes.
    let next = off
        .wrapping_add(HEADER_LEN as u32)
        .wrapping_add(frame_len(h));
    *off = next;
    if next == total {
        Chain::Complete
    } else if next < total && total - next >= HEADER_LEN as u32 {
        Chain::More
    } else {
        Chain::Broken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hex to bytes; spaces are for readability.
    fn hex<const N: usize>(s: &str) -> [u8; N] {
        let digits: [u8; 64] = {
            let mut d = [0u8; 64];
            let mut n = 0;
            for b in s.bytes().filter(|b| !b.is_ascii_whitespace()) {
                d[n] = b;
                n += 1;
            }
            assert_eq!(n, 2 * N, "{s:?} is not {N} bytes");
            d
        };
        let nib = |c: u8| (c as char).to_digit(16).expect("hex digit") as u8;
        let mut out = [0u8; N];
        for (i, o) in out.iter_mut().enumerate() {
            *o = nib(digits[2 * i]) << 4 | nib(digits[2 * i + 1]);
        }
        out
    }

    #[test]
    fn plausible_header_cases() {
        const M: u32 = DEFAULT_MAX_FRAME_SIZE;
        #[rustfmt::skip]
        let cases: &[(&str, &str, u32, bool)] = &[
            ("settings", "00000c 04 00 00000000", M, true),
            ("settings ack", "000000 04 01 00000000", M, true),
            ("settings ack with payload", "000006 04 01 00000000", M, false),
            ("settings length not a multiple of 6", "000007 04 00 00000000", M, false),
            ("settings on stream 1", "000000 04 00 00000001", M, false),
            ("ping", "000008 06 00 00000000", M, true),
            ("ping ack", "000008 06 01 00000000", M, true),
            ("ping of length 7", "000007 06 00 00000000", M, false),
            ("undefined flag on ping", "000008 06 02 00000000", M, false),
            ("goaway", "000010 07 00 00000000", M, true),
            ("goaway too short", "000007 07 00 00000000", M, false),
            ("flags on goaway", "000008 07 01 00000000", M, false),
            ("goaway on stream 3", "000008 07 00 00000003", M, false),
            ("rst_stream", "000004 03 00 00000003", M, true),
            ("rst_stream on stream 0", "000004 03 00 00000000", M, false),
            ("priority", "000005 02 00 00000003", M, true),
            ("priority of length 4", "000004 02 00 00000003", M, false),
            ("window_update on stream 0", "000004 08 00 00000000", M, true),
            ("window_update on stream 5", "000004 08 00 00000005", M, true),
            ("window_update of length 8", "000008 08 00 00000000", M, false),
            ("data", "000002 00 00 00000001", M, true),
            ("empty data end_stream", "000000 00 01 00000001", M, true),
            ("data on stream 0", "000002 00 00 00000000", M, false),
            ("padded data without pad octet", "000000 00 08 00000001", M, false),
            ("padded data", "000001 00 08 00000001", M, true),
            ("headers end_stream end_headers", "000003 01 05 00000001", M, true),
            ("headers priority needs 5 octets", "000004 01 24 00000001", M, false),
            ("headers priority padded needs 6", "000005 01 2c 00000001", M, false),
            ("headers priority padded", "000006 01 2c 00000001", M, true),
            ("headers on stream 0", "000001 01 04 00000000", M, false),
            ("push_promise", "000004 05 04 00000001", M, true),
            ("push_promise too short", "000003 05 04 00000001", M, false),
            ("padded push_promise needs 5", "000004 05 0c 00000001", M, false),
            ("continuation", "000001 09 04 00000005", M, true),
            ("continuation on stream 0", "000001 09 04 00000000", M, false),
            ("unknown type", "000000 0a 00 00000000", M, false),
            ("reserved bit set", "000002 00 00 80000001", M, false),
            ("length at max_frame_size", "004000 00 00 00000001", M, true),
            ("length above max_frame_size", "004001 00 00 00000001", M, false),
            ("cap applies to goaway too", "004001 07 00 00000000", M, false),
            ("larger cap", "004001 00 00 00000001", RESYNC_MAX_FRAME_SIZE, true),
            ("zero run", "000000 00 00 00000000", M, false),
            ("http/1.1 start", "474554 20 2f 20485454", M, false),
            ("tls start", "160301 00 c8 010000c4", M, false),
        ];
        for (name, wire, max, want) in cases {
            assert_eq!(plausible_header(&hex(wire), *max), *want, "{name}");
        }
    }

    #[test]
    fn leading_settings_and_tls_and_preface() {
        assert!(is_leading_settings(&hex("000006 04 00 00000000")));
        assert!(!is_leading_settings(&hex("000008 06 00 00000000")), "ping");
        assert!(
            !is_leading_settings(&hex("000006 04 01 00000000")),
            "ack with payload"
        );

        #[rustfmt::skip]
        let tls: &[(&str, [u8; 5], bool)] = &[
            ("tls 1.0 client hello", [0x16, 0x03, 0x01, 0x00, 0xc8], true),
            ("tls 1.3 application data", [0x17, 0x03, 0x03, 0x40, 0x11], true),
            ("largest record", [0x17, 0x03, 0x03, 0x48, 0x00], true),
            ("oversized record", [0x17, 0x03, 0x03, 0x48, 0x01], false),
            ("alert", [0x15, 0x03, 0x03, 0x00, 0x02], true),
            ("change cipher spec", [0x14, 0x03, 0x03, 0x00, 0x01], true),
            ("heartbeat type", [0x18, 0x03, 0x03, 0x00, 0x10], false),
            ("content type 0x13", [0x13, 0x03, 0x03, 0x00, 0x10], false),
            ("bad minor", [0x16, 0x03, 0x05, 0x00, 0x10], false),
            ("bad major", [0x16, 0x02, 0x01, 0x00, 0x10], false),
            ("h2 settings", [0x00, 0x00, 0x00, 0x04, 0x01], false),
        ];
        for (name, h, want) in tls {
            assert_eq!(is_tls_record_header(h), *want, "{name}");
        }

        assert!(is_preface(&PREFACE));
        let mut near = PREFACE;
        near[12] = b'1';
        assert!(!is_preface(&near), "HTTP/1.1 instead of 2.0");
        let mut last = PREFACE;
        last[23] = 0;
        assert!(!is_preface(&last), "last octet differs");
    }

    /// Walks `bytes` with [`chain_step`] as the agent does (no bound) and returns the frame
    /// count on a complete chain.
    fn chain(bytes: &[u8], max: u32) -> Option<usize> {
        let total = u32::try_from(bytes.len()).ok()?;
        if bytes.len() < HEADER_LEN {
            return None;
        }
        let mut off = 0u32;
        let mut n = 0;
        loop {
            let h: &[u8; HEADER_LEN] = bytes.get(off as usize..)?.first_chunk()?;
            n += 1;
            match chain_step(h, &mut off, total, max) {
                Chain::More => {}
                Chain::Complete => return Some(n),
                Chain::Broken => return None,
            }
        }
    }

    #[test]
    fn chain_cases() {
        const M: u32 = DEFAULT_MAX_FRAME_SIZE;
        // settings(12) + window_update + headers(3)
        let mut buf = [0u8; 64];
        let parts: [&[u8]; 3] = [
            &hex::<21>("00000c 04 00 00000000 0003 00000064 0004 0000ffff"),
            &hex::<13>("000004 08 00 00000000 00000fff"),
            &hex::<12>("000003 01 05 00000001 828684"),
        ];
        let mut n = 0;
        for p in parts {
            buf[n..n + p.len()].copy_from_slice(p);
            n += p.len();
        }
        assert_eq!(chain(&buf[..n], M), Some(3));
        assert_eq!(chain(&buf[..n - 1], M), None, "one octet short");
        assert_eq!(chain(&buf[..n + 1], M), None, "one octet over");
        assert_eq!(chain(&buf[..n + 9], M), None, "a zero header after");
        assert_eq!(
            chain(&buf[..21 + 4], M),
            None,
            "partial header after a frame"
        );
        assert_eq!(chain(&buf[..21], M), Some(1));
        // A window update with a zero increment is framing like any other.
        assert_eq!(
            chain(&hex::<13>("000004 08 00 00000000 00000000"), M),
            Some(1)
        );
        // A chain starting mid-header-block.
        assert_eq!(chain(&hex::<10>("000001 09 04 00000005 82"), M), Some(1));
        assert_eq!(chain(&[], M), None);
        assert_eq!(chain(&PREFACE, M), None);
        // A step past the end is Broken, and `off` says where the frame would have ended.
        let mut off = 0;
        let h = hex::<9>("000010 07 00 00000000");
        assert_eq!(chain_step(&h, &mut off, 20, M), Chain::Broken);
        assert_eq!(off, 25);
    }
}
