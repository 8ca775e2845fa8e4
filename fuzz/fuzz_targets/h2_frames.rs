//! Fuzzes the HTTP/2 frame parser (`tracer_user::h2`) the way the tracer feeds it.
//!
//! Input: one control byte, then bytes. The control byte picks how much payload a
//! "kernel capture" keeps and the `max_frame_size` given to `plausible_chain`. The bytes are
//! checked as one chain (`plausible_chain`), then split into header + captured-payload
//! records (`Head::parse`, `parse_frame`), each frame checked against its header.
//!
//! The sniffing rules are the kernel's own (`tracer_common::h2sniff`, re-exported as
//! `h2::sniff`): every header is also checked against the agent's parser
//! (`check_sniff_agrees`), and the kernel's bounded resync walk against the unbounded one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_user::h2::{
    self, Error, Frame, HEADER_LEN, Head, Kind, MAX_LENGTH, STREAM_ID_MASK, flags, sniff,
};

/// Payload bytes a record keeps: none, a few, one PING, the kernel's 64, everything.
const CAPTURES: [usize; 5] = [0, 3, 8, 64, usize::MAX];

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, bytes)) = data.split_first() else {
        return;
    };
    let capture = CAPTURES[usize::from(ctl) % CAPTURES.len()];
    let max_frame_size = match ctl >> 4 {
        0 => 0,
        1 => 16,
        2..=11 => h2::DEFAULT_MAX_FRAME_SIZE,
        _ => MAX_LENGTH,
    };

    check_chain(bytes, max_frame_size);

    let mut rest = bytes;
    while !rest.is_empty() {
        let head = match Head::parse(rest) {
            Ok(head) => head,
            Err(e) => {
                assert!(
                    rest.len() < HEADER_LEN,
                    "Head::parse failed on {} bytes",
                    rest.len()
                );
                assert_eq!(e, Error::ShortHeader(rest.len()));
                break;
            }
        };
        check_head(&head, rest);
        check_sniff_agrees(&head, rest, max_frame_size);
        let body = &rest[HEADER_LEN..];
        let in_frame = body.len().min(head.length as usize);
        let take = in_frame.min(capture);
        check_frame(&head, &body[..take]);
        // Bytes captured past the frame's end must not change the outcome (a bounded
        // overshoot: checking against all of `rest` would make the walk quadratic).
        if take == in_frame && in_frame < body.len() {
            let over = &body[..body.len().min(in_frame + 2 * HEADER_LEN)];
            check_frame(&head, over);
            assert_eq!(
                h2::parse_frame(&head, over),
                h2::parse_frame(&head, &body[..in_frame])
            );
        }
        rest = &body[take..];
    }

    let _ = h2::is_preface(bytes);
    if h2::is_preface(bytes) {
        assert!(h2::may_be_preface(bytes));
        assert!(!h2::looks_like_tls(bytes));
    }
    if h2::looks_like_tls(bytes) {
        assert!(bytes.len() >= 5);
        assert!(!h2::may_be_preface(bytes));
    }
    if let Some(h) = bytes.first_chunk::<HEADER_LEN>() {
        // A leading SETTINGS frame is a plausible header, and neither TLS nor the preface.
        if sniff::is_leading_settings(h) {
            assert!(sniff::plausible_header(h, sniff::RESYNC_MAX_FRAME_SIZE));
            assert!(!h2::looks_like_tls(bytes) && !h2::may_be_preface(bytes));
        }
    }
});

/// The shared plausibility rule against the agent's parser: a header is plausible exactly
/// when its type is known, the reserved bit and undefined flags are clear, it fits
/// `max_frame_size`, and `parse_frame` accepts it given its whole payload.
fn check_sniff_agrees(head: &Head, wire: &[u8], max_frame_size: u32) {
    let Some(h) = wire.first_chunk::<HEADER_LEN>() else {
        return;
    };
    let plausible = sniff::plausible_header(h, max_frame_size);
    assert_eq!(sniff::frame_len(h), head.length);
    let framing_ok = head.kind.is_known()
        && h[5] & 0x80 == 0
        && head.flags & !head.kind.defined_flags() == 0
        && head.length <= max_frame_size;
    // Whether parse_frame accepts the header: its header-level errors (stream, length)
    // do not depend on the payload; a short capture only adds `Truncated`.
    let capture = [0u8; 64];
    let capture = &capture[..capture.len().min(head.length as usize)];
    let parses = !matches!(
        h2::parse_frame(head, capture),
        Err(Error::BadLength { .. } | Error::BadStreamId { .. })
    );
    assert_eq!(
        plausible,
        framing_ok && parses,
        "h2sniff and parse_frame disagree on {h:02x?}"
    );
}

fn check_head(head: &Head, wire: &[u8]) {
    assert!(head.length <= MAX_LENGTH);
    assert!(head.stream_id <= STREAM_ID_MASK);
    assert_eq!(head.kind, Kind::from_u8(wire[3]));
    assert_eq!(head.kind.to_u8(), wire[3]);
    assert_eq!(head.flags, wire[4]);
    let encoded = head.encode();
    assert_eq!(Head::parse(&encoded).as_ref(), Ok(head));
    assert_eq!(encoded[..5], wire[..5]);
    let _ = head.kind.to_string();
}

/// `parse_frame` on a captured prefix: the frame agrees with its header, and errors are the
/// ones the header (or the capture) explains.
fn check_frame(head: &Head, payload: &[u8]) {
    let result = h2::parse_frame(head, payload);
    let captured = payload.len().min(head.length as usize);
    let len = head.length as usize;
    // Outcomes that depend on the header only: the same with nothing captured.
    let header_only = h2::parse_frame(head, &[]);
    match (&result, &header_only) {
        (Err(e @ (Error::BadLength { .. } | Error::BadStreamId { .. })), other) => {
            assert_eq!(
                Err(e),
                other.as_ref(),
                "header-level error depends on the capture"
            );
        }
        (_, Ok(_)) => assert!(result.is_ok(), "more capture turned Ok into {result:?}"),
        _ => {}
    }
    let frame = match result {
        Ok(frame) => frame,
        Err(e) => {
            let _ = e.to_string();
            match e {
                Error::ShortHeader(_) => panic!("parse_frame returned ShortHeader"),
                Error::BadStreamId { kind, stream_id } => {
                    assert_eq!((kind, stream_id), (head.kind, head.stream_id));
                    assert!(!head.kind.stream_rule().allows(head.stream_id));
                }
                Error::BadLength { kind, length } => {
                    assert_eq!((kind, length), (head.kind, head.length));
                    assert!(head.kind.is_known());
                }
                Error::Truncated {
                    kind,
                    needed,
                    captured: c,
                } => {
                    assert_eq!(kind, head.kind);
                    assert_eq!(c, captured);
                    assert!(c < needed && needed <= len);
                }
            }
            return;
        }
    };
    assert_eq!(frame.kind(), head.kind);
    assert_eq!(frame.stream_id(), head.stream_id);
    assert!(head.kind.stream_rule().allows(head.stream_id));
    let flag = |f: u8| head.flags & f != 0;
    match frame {
        Frame::Data(d) => {
            assert_eq!(d.length, head.length);
            assert_eq!(d.end_stream, flag(flags::END_STREAM));
        }
        Frame::Headers(h) => {
            assert_eq!(h.length, head.length);
            assert_eq!(h.end_stream, flag(flags::END_STREAM));
            assert_eq!(h.end_headers, flag(flags::END_HEADERS));
        }
        Frame::Continuation(c) => {
            assert_eq!(c.length, head.length);
            assert_eq!(c.end_headers, flag(flags::END_HEADERS));
        }
        Frame::PushPromise(p) => {
            assert_eq!(p.length, head.length);
            assert_eq!(p.end_headers, flag(flags::END_HEADERS));
            assert!(p.length >= 4);
            if let Some(id) = p.promised_stream_id {
                assert!(id <= STREAM_ID_MASK);
            }
        }
        Frame::Priority(p) => {
            assert_eq!((len, captured), (5, 5));
            assert!(p.dependency <= STREAM_ID_MASK);
            assert!((1..=256).contains(&p.weight));
        }
        Frame::RstStream(r) => {
            assert_eq!((len, captured), (4, 4));
            assert_eq!(r.reason.0.to_be_bytes(), payload[..4]);
            let _ = (r.reason.to_string(), r.reason.name());
        }
        Frame::Ping(p) => {
            assert_eq!((len, captured), (8, 8));
            assert_eq!(p.opaque, payload[..8]);
            assert_eq!(p.ack, flag(flags::ACK));
        }
        Frame::GoAway(g) => {
            assert!(len >= 8 && captured >= 8);
            assert!(g.last_stream_id <= STREAM_ID_MASK);
            assert_eq!(g.debug[..], payload[8..captured]);
            assert_eq!(g.debug_truncated, captured < len);
            let text = g.debug_text();
            assert!(!text.chars().any(char::is_control));
            let _ = g.reason.to_string();
        }
        Frame::WindowUpdate(w) => {
            assert_eq!((len, captured), (4, 4));
            assert!(w.increment <= STREAM_ID_MASK);
        }
        Frame::Settings(s) => {
            assert!(len.is_multiple_of(6));
            assert_eq!(s.ack, flag(flags::ACK));
            if s.ack {
                assert!(len == 0 && s.params.is_empty());
            }
            assert_eq!(s.params.len(), captured / 6);
            assert_eq!(s.truncated, captured < len);
        }
        Frame::Unknown(u) => {
            assert!(!head.kind.is_known());
            assert_eq!((u.kind, u.length), (head.kind.to_u8(), head.length));
        }
    }
}

/// `plausible_chain`: `Some(n)` means n ≥ 1 well-formed frames ending exactly at the end.
fn check_chain(bytes: &[u8], max_frame_size: u32) {
    let Some(n) = h2::plausible_chain(bytes, max_frame_size) else {
        return;
    };
    assert!(n >= 1);
    assert!(n <= bytes.len() / HEADER_LEN);
    let mut rest = bytes;
    let mut count = 0;
    while !rest.is_empty() {
        let head = Head::parse(rest).expect("a chain frame header");
        assert!(head.kind.is_known());
        assert!(head.length <= max_frame_size);
        assert_eq!(rest[5] & 0x80, 0, "reserved bit set in a chain");
        let end = HEADER_LEN + head.length as usize;
        assert!(end <= rest.len(), "chain frame overruns the buffer");
        assert!(h2::parse_frame(&head, &rest[HEADER_LEN..end]).is_ok());
        rest = &rest[end..];
        count += 1;
    }
    assert_eq!(count, n);
    // One byte short is never in sync; two copies are twice the chain.
    assert_eq!(
        h2::plausible_chain(&bytes[..bytes.len() - 1], max_frame_size),
        None
    );
    let twice = [bytes, bytes].concat();
    assert_eq!(h2::plausible_chain(&twice, max_frame_size), Some(2 * n));
    // The kernel's walk (at most RESYNC_CHAIN_FRAMES headers) accepts exactly the chains
    // that are short enough.
    assert_eq!(
        kernel_resync(bytes, max_frame_size),
        n <= sniff::RESYNC_CHAIN_FRAMES
    );
}

/// The kernel's resync loop (`tracer-ebpf/src/h2walk.rs`), over a byte slice.
fn kernel_resync(bytes: &[u8], max_frame_size: u32) -> bool {
    let Ok(total) = u32::try_from(bytes.len()) else {
        return false;
    };
    let mut off = 0u32;
    for _ in 0..sniff::RESYNC_CHAIN_FRAMES {
        if off as usize + HEADER_LEN > bytes.len() {
            return false;
        }
        let h = bytes[off as usize..]
            .first_chunk::<HEADER_LEN>()
            .expect("length checked");
        match sniff::chain_step(h, &mut off, total, max_frame_size) {
            sniff::Chain::Complete => return true,
            sniff::Chain::Broken => return false,
            sniff::Chain::More => {}
        }
    }
    false
}
