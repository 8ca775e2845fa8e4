//! Table-driven tests: one named case per rule, wire bytes written out in hex.
use bytes::Bytes;

use super::*;

/// Hex to bytes; spaces are for readability and ignored.
fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(
        digits.len().is_multiple_of(2),
        "odd hex digit count in {s:?}"
    );
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

/// Parses `wire` as a header followed by the captured payload.
fn parse_wire(wire: &[u8]) -> Result<Frame, Error> {
    let head = Head::parse(wire)?;
    parse_frame(&head, &wire[HEADER_LEN..])
}

/// Splits a contiguous byte stream into (head, full payload) pairs.
fn frames_of(mut stream: &[u8]) -> Vec<(Head, Vec<u8>)> {
    let mut out = Vec::new();
    while !stream.is_empty() {
        let head = Head::parse(stream).unwrap();
        let end = HEADER_LEN + head.length as usize;
        out.push((head, stream[HEADER_LEN..end].to_vec()));
        stream = &stream[end..];
    }
    out
}

fn bad_len(kind: Kind, length: u32) -> Result<Frame, Error> {
    Err(Error::BadLength { kind, length })
}

fn bad_stream(kind: Kind, stream_id: u32) -> Result<Frame, Error> {
    Err(Error::BadStreamId { kind, stream_id })
}

fn truncated(kind: Kind, needed: usize, captured: usize) -> Result<Frame, Error> {
    Err(Error::Truncated {
        kind,
        needed,
        captured,
    })
}

fn goaway(last_stream_id: u32, reason: Reason, debug: &[u8], debug_truncated: bool) -> Frame {
    Frame::GoAway(GoAway {
        last_stream_id,
        reason,
        debug: Bytes::copy_from_slice(debug),
        debug_truncated,
    })
}

#[test]
fn parse_frame_cases() {
    #[rustfmt::skip]
    let cases: Vec<(&str, &str, Result<Frame, Error>)> = vec![
        // ---- valid frames, one per type ----
        ("data end_stream", "000005 00 01 00000001",
            Ok(Frame::Data(Data { stream_id: 1, end_stream: true, length: 5 }))),
        ("data padded", "000001 00 08 00000003",
            Ok(Frame::Data(Data { stream_id: 3, end_stream: false, length: 1 }))),
        ("headers end_stream end_headers priority", "000026 01 25 0000000d",
            Ok(Frame::Headers(Headers { stream_id: 13, end_stream: true, end_headers: true, length: 38 }))),
        ("headers no flags", "000010 01 00 00000001",
            Ok(Frame::Headers(Headers { stream_id: 1, end_stream: false, end_headers: false, length: 16 }))),
        ("priority", "000005 02 00 00000003  00000000 c8",
            Ok(Frame::Priority(Priority { stream_id: 3, dependency: 0, exclusive: false, weight: 201 }))),
        ("priority exclusive", "000005 02 00 00000009  80000007 00",
            Ok(Frame::Priority(Priority { stream_id: 9, dependency: 7, exclusive: true, weight: 1 }))),
        ("rst_stream cancel", "000004 03 00 00000001  00000008",
            Ok(Frame::RstStream(RstStream { stream_id: 1, reason: Reason::CANCEL }))),
        ("rst_stream unknown code", "000004 03 00 00000005  0000abcd",
            Ok(Frame::RstStream(RstStream { stream_id: 5, reason: Reason(0xabcd) }))),
        ("settings", "00000c 04 00 00000000  0003 00000064  0004 0000ffff",
            Ok(Frame::Settings(Settings { ack: false, params: vec![(3, 100), (4, 65_535)], truncated: false }))),
        ("settings empty", "000000 04 00 00000000",
            Ok(Frame::Settings(Settings { ack: false, params: vec![], truncated: false }))),
        ("settings ack", "000000 04 01 00000000",
            Ok(Frame::Settings(Settings { ack: true, params: vec![], truncated: false }))),
        ("settings unknown id kept", "000006 04 00 00000000  fa11 00000001",
            Ok(Frame::Settings(Settings { ack: false, params: vec![(0xfa11, 1)], truncated: false }))),
        ("push_promise", "000004 05 04 00000001  00000002",
            Ok(Frame::PushPromise(PushPromise { stream_id: 1, end_headers: true, length: 4, promised_stream_id: Some(2) }))),
        ("push_promise padded", "000006 05 08 00000001  00 80000004 00",
            Ok(Frame::PushPromise(PushPromise { stream_id: 1, end_headers: false, length: 6, promised_stream_id: Some(4) }))),
        ("push_promise header only", "000020 05 04 00000003",
            Ok(Frame::PushPromise(PushPromise { stream_id: 3, end_headers: true, length: 32, promised_stream_id: None }))),
        ("ping", "000008 06 00 00000000  0102030405060708",
            Ok(Frame::Ping(Ping { ack: false, opaque: [1, 2, 3, 4, 5, 6, 7, 8] }))),
        ("ping ack", "000008 06 01 00000000  0000000000000000",
            Ok(Frame::Ping(Ping { ack: true, opaque: [0; 8] }))),
        ("ping undefined flags ignored", "000008 06 fe 00000000  0000000000000001",
            Ok(Frame::Ping(Ping { ack: false, opaque: [0, 0, 0, 0, 0, 0, 0, 1] }))),
        ("goaway", "000008 07 00 00000000  00000000 00000000",
            Ok(goaway(0, Reason::NO_ERROR, b"", false))),
        ("goaway debug", "00000d 07 00 00000000  00000003 0000000b 63616c6d21",
            Ok(goaway(3, Reason::ENHANCE_YOUR_CALM, b"calm!", false))),
        ("goaway reserved bit of last stream masked", "000008 07 00 00000000  80000005 00000002",
            Ok(goaway(5, Reason::INTERNAL_ERROR, b"", false))),
        ("window_update connection", "000004 08 00 00000000  0000ffff",
            Ok(Frame::WindowUpdate(WindowUpdate { stream_id: 0, increment: 65_535 }))),
        ("window_update stream, reserved bit masked", "000004 08 00 00000005  80000100",
            Ok(Frame::WindowUpdate(WindowUpdate { stream_id: 5, increment: 256 }))),
        ("window_update zero increment decoded", "000004 08 00 00000000  00000000",
            Ok(Frame::WindowUpdate(WindowUpdate { stream_id: 0, increment: 0 }))),
        ("continuation", "000003 09 04 00000001",
            Ok(Frame::Continuation(Continuation { stream_id: 1, end_headers: true, length: 3 }))),
        ("unknown type kept", "000004 0a 00 00000007  abcdef01",
            Ok(Frame::Unknown(Unknown { kind: 0x0a, stream_id: 7, length: 4 }))),
        ("unknown type on stream 0", "000000 ff ff 00000000",
            Ok(Frame::Unknown(Unknown { kind: 0xff, stream_id: 0, length: 0 }))),
        ("reserved stream bit masked", "000000 04 01 80000000",
            Ok(Frame::Settings(Settings { ack: true, params: vec![], truncated: false }))),

        // ---- lengths ----
        ("ping length 7", "000007 06 00 00000000  01020304050607", bad_len(Kind::Ping, 7)),
        ("ping length 9", "000009 06 00 00000000  010203040506070809", bad_len(Kind::Ping, 9)),
        ("rst_stream length 3", "000003 03 00 00000001  000000", bad_len(Kind::RstStream, 3)),
        ("rst_stream length 5", "000005 03 00 00000001  0000000000", bad_len(Kind::RstStream, 5)),
        ("window_update length 3", "000003 08 00 00000000  000001", bad_len(Kind::WindowUpdate, 3)),
        ("window_update length 8", "000008 08 00 00000000  0000000100000001", bad_len(Kind::WindowUpdate, 8)),
        ("priority length 4", "000004 02 00 00000001  00000000", bad_len(Kind::Priority, 4)),
        ("priority length 6", "000006 02 00 00000001  000000000000", bad_len(Kind::Priority, 6)),
        ("goaway length 7", "000007 07 00 00000000  00000000000000", bad_len(Kind::GoAway, 7)),
        ("goaway length 0", "000000 07 00 00000000", bad_len(Kind::GoAway, 0)),
        ("settings length 5", "000005 04 00 00000000  0003000000", bad_len(Kind::Settings, 5)),
        ("settings ack with payload", "000006 04 01 00000000  000300000064", bad_len(Kind::Settings, 6)),
        ("data padded without pad length", "000000 00 08 00000001", bad_len(Kind::Data, 0)),
        ("headers priority flag, length 4", "000004 01 20 00000001", bad_len(Kind::Headers, 4)),
        ("headers padded+priority, length 5", "000005 01 28 00000001", bad_len(Kind::Headers, 5)),
        ("push_promise length 3", "000003 05 04 00000001", bad_len(Kind::PushPromise, 3)),
        ("push_promise padded length 4", "000004 05 0c 00000001", bad_len(Kind::PushPromise, 4)),

        // ---- stream identifiers ----
        ("data on stream 0", "000005 00 01 00000000", bad_stream(Kind::Data, 0)),
        ("headers on stream 0", "000010 01 04 00000000", bad_stream(Kind::Headers, 0)),
        ("priority on stream 0", "000005 02 00 00000000  0000000110", bad_stream(Kind::Priority, 0)),
        ("rst_stream on stream 0", "000004 03 00 00000000  00000002", bad_stream(Kind::RstStream, 0)),
        ("settings on stream 1", "000000 04 01 00000001", bad_stream(Kind::Settings, 1)),
        ("push_promise on stream 0", "000004 05 04 00000000  00000002", bad_stream(Kind::PushPromise, 0)),
        ("ping on stream 1", "000008 06 00 00000001  0000000000000000", bad_stream(Kind::Ping, 1)),
        ("goaway on stream 3", "000008 07 00 00000003  0000000000000000", bad_stream(Kind::GoAway, 3)),
        ("continuation on stream 0", "000000 09 04 00000000", bad_stream(Kind::Continuation, 0)),
        ("stream id checked before length", "000007 06 00 00000001", bad_stream(Kind::Ping, 1)),

        // ---- truncated captures ----
        ("ping with 3 bytes captured", "000008 06 00 00000000  010203", truncated(Kind::Ping, 8, 3)),
        ("rst_stream with nothing captured", "000004 03 00 00000001", truncated(Kind::RstStream, 4, 0)),
        ("window_update with 2 bytes", "000004 08 00 00000000  0001", truncated(Kind::WindowUpdate, 4, 2)),
        ("priority with 4 bytes", "000005 02 00 00000001  00000000", truncated(Kind::Priority, 5, 4)),
        ("goaway with 5 bytes", "000010 07 00 00000000  0000000100", truncated(Kind::GoAway, 8, 5)),
        ("goaway debug partly captured", "000010 07 00 00000000  00000001 00000000 6162",
            Ok(goaway(1, Reason::NO_ERROR, b"ab", true))),
        ("settings with 1.5 parameters captured", "000012 04 00 00000000  0003 00000064 0004 00",
            Ok(Frame::Settings(Settings { ack: false, params: vec![(3, 100)], truncated: true }))),
        ("settings with nothing captured", "000012 04 00 00000000",
            Ok(Frame::Settings(Settings { ack: false, params: vec![], truncated: true }))),

        // ---- captured bytes beyond the frame belong to the next one ----
        ("ping followed by more bytes", "000008 06 01 00000000  0807060504030201 000000040100000000",
            Ok(Frame::Ping(Ping { ack: true, opaque: [8, 7, 6, 5, 4, 3, 2, 1] }))),
        ("goaway followed by more bytes", "00000a 07 00 00000000  00000000 00000000 6869 ffff",
            Ok(goaway(0, Reason::NO_ERROR, b"hi", false))),
        ("settings followed by more bytes", "000006 04 00 00000000  0005 00004000 0006",
            Ok(Frame::Settings(Settings { ack: false, params: vec![(5, 16_384)], truncated: false }))),

        // ---- header ----
        ("header of 8 bytes", "000000 04 01 000000", Err(Error::ShortHeader(8))),
        ("empty input", "", Err(Error::ShortHeader(0))),
    ];
    let mut failures = Vec::new();
    for (name, wire, want) in &cases {
        let got = parse_wire(&hex(wire));
        if &got != want {
            failures.push(format!("{name}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn goaway_debug_cut_at_64_bytes() {
    // The kernel copies 64 payload bytes: 8 fixed + 56 of a 100-byte debug string.
    let text: Vec<u8> = (0..100u8).map(|i| b'a' + i % 26).collect();
    let mut wire = hex("00006c 07 00 00000000  0000002a 00000002");
    wire.extend_from_slice(&text);
    let head = Head::parse(&wire).unwrap();
    assert_eq!(head.length, 108);
    let captured = &wire[HEADER_LEN..HEADER_LEN + 64];
    let Frame::GoAway(g) = parse_frame(&head, captured).unwrap() else {
        panic!("not a GOAWAY");
    };
    assert_eq!(g.last_stream_id, 42);
    assert_eq!(g.reason, Reason::INTERNAL_ERROR);
    assert_eq!(&g.debug[..], &text[..56]);
    assert!(g.debug_truncated);
    assert_eq!(g.debug_text().len(), 56);
    // Same frame, fully captured.
    let Frame::GoAway(full) = parse_frame(&head, &wire[HEADER_LEN..]).unwrap() else {
        panic!("not a GOAWAY");
    };
    assert_eq!(&full.debug[..], &text[..]);
    assert!(!full.debug_truncated);
}

#[test]
fn goaway_debug_text() {
    let cases: &[(&str, &[u8], &str)] = &[
        ("plain", b"too_many_pings", "too_many_pings"),
        ("empty", b"", ""),
        ("trailing nuls", b"bye\0\0\0", "bye"),
        (
            "newlines and tabs",
            b"\tline one\nline two\r\n",
            "line one line two",
        ),
        ("invalid utf-8", b"x\xffy", "x\u{fffd}y"),
        ("escape sequence", b"\x1b[31mred", "[31mred"),
    ];
    for (name, debug, want) in cases {
        let g = GoAway {
            last_stream_id: 0,
            reason: Reason::NO_ERROR,
            debug: Bytes::copy_from_slice(debug),
            debug_truncated: false,
        };
        assert_eq!(g.debug_text(), *want, "{name}");
    }
}

#[test]
fn head_cases() {
    #[rustfmt::skip]
    let cases: &[(&str, &str, Head)] = &[
        ("settings ack", "000000 04 01 00000000",
            Head { length: 0, kind: Kind::Settings, flags: 1, stream_id: 0 }),
        ("max 24-bit length", "ffffff 00 00 00000001",
            Head { length: 16_777_215, kind: Kind::Data, flags: 0, stream_id: 1 }),
        ("reserved bit masked", "000004 08 00 80000003",
            Head { length: 4, kind: Kind::WindowUpdate, flags: 0, stream_id: 3 }),
        ("max stream id", "000000 09 04 ffffffff",
            Head { length: 0, kind: Kind::Continuation, flags: 4, stream_id: 0x7fff_ffff }),
        ("unknown type", "000001 fa 77 00000009",
            Head { length: 1, kind: Kind::Unknown(0xfa), flags: 0x77, stream_id: 9 }),
        ("trailing bytes ignored", "000008 06 00 00000000 0102",
            Head { length: 8, kind: Kind::Ping, flags: 0, stream_id: 0 }),
    ];
    for (name, wire, want) in cases {
        let wire = hex(wire);
        let got = Head::parse(&wire).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&got, want, "{name}");
        assert_eq!(
            got.encode()[..],
            {
                let mut w = wire[..HEADER_LEN].to_vec();
                w[5] &= 0x7f;
                w
            }[..],
            "{name}: encode"
        );
    }
    assert_eq!(MAX_LENGTH, 16_777_215);
    for n in 0..HEADER_LEN {
        assert_eq!(Head::parse(&[0; 9][..n]), Err(Error::ShortHeader(n)));
    }
}

#[test]
fn kind_codes_names_and_rules() {
    let all = [
        (0, "DATA", StreamRule::NonZero),
        (1, "HEADERS", StreamRule::NonZero),
        (2, "PRIORITY", StreamRule::NonZero),
        (3, "RST_STREAM", StreamRule::NonZero),
        (4, "SETTINGS", StreamRule::Zero),
        (5, "PUSH_PROMISE", StreamRule::NonZero),
        (6, "PING", StreamRule::Zero),
        (7, "GOAWAY", StreamRule::Zero),
        (8, "WINDOW_UPDATE", StreamRule::Any),
        (9, "CONTINUATION", StreamRule::NonZero),
    ];
    for (code, name, rule) in all {
        let kind = Kind::from_u8(code);
        assert!(kind.is_known());
        assert_eq!(kind.to_u8(), code);
        assert_eq!(kind.to_string(), name);
        assert_eq!(kind.stream_rule(), rule, "{name}");
    }
    for code in 10..=255u8 {
        let kind = Kind::from_u8(code);
        assert_eq!(kind, Kind::Unknown(code));
        assert_eq!(kind.to_u8(), code);
        assert_eq!(kind.name(), None);
        assert_eq!(kind.stream_rule(), StreamRule::Any);
    }
    assert_eq!(Kind::Unknown(0xa).to_string(), "UNKNOWN(0x0a)");
    assert_eq!(
        Error::Truncated {
            kind: Kind::Ping,
            needed: 8,
            captured: 3
        }
        .to_string(),
        "PING frame: 8 payload bytes needed, only 3 captured"
    );
}

#[test]
fn reason_names_display_serialize() {
    let named = [
        (0x0, "NO_ERROR"),
        (0x1, "PROTOCOL_ERROR"),
        (0x2, "INTERNAL_ERROR"),
        (0x3, "FLOW_CONTROL_ERROR"),
        (0x4, "SETTINGS_TIMEOUT"),
        (0x5, "STREAM_CLOSED"),
        (0x6, "FRAME_SIZE_ERROR"),
        (0x7, "REFUSED_STREAM"),
        (0x8, "CANCEL"),
        (0x9, "COMPRESSION_ERROR"),
        (0xa, "CONNECT_ERROR"),
        (0xb, "ENHANCE_YOUR_CALM"),
        (0xc, "INADEQUATE_SECURITY"),
        (0xd, "HTTP_1_1_REQUIRED"),
    ];
    for (code, name) in named {
        let r = Reason(code);
        assert_eq!(r.name(), Some(name));
        assert_eq!(r.to_string(), name);
        assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{name}\""));
    }
    assert_eq!(Reason::HTTP_1_1_REQUIRED, Reason(0xd));
    assert_eq!(Reason::from(8), Reason::CANCEL);
    assert_eq!(u32::from(Reason::REFUSED_STREAM), 7);
    let unknown = [(0xe, "0xe"), (0x1234, "0x1234"), (u32::MAX, "0xffffffff")];
    for (code, text) in unknown {
        let r = Reason(code);
        assert_eq!(r.name(), None);
        assert_eq!(r.to_string(), text);
        assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{text}\""));
    }
    assert_eq!(format!("{:?}", Reason::CANCEL), "Reason(CANCEL)");
}

#[test]
fn settings_names_and_lookup() {
    assert_eq!(
        setting_name(Settings::MAX_CONCURRENT_STREAMS),
        Some("MAX_CONCURRENT_STREAMS")
    );
    assert_eq!(
        setting_name(Settings::HEADER_TABLE_SIZE),
        Some("HEADER_TABLE_SIZE")
    );
    assert_eq!(
        setting_name(Settings::NO_RFC7540_PRIORITIES),
        Some("NO_RFC7540_PRIORITIES")
    );
    assert_eq!(setting_name(7), None);
    let Ok(Frame::Settings(s)) = parse_wire(&hex(
        "000012 04 00 00000000  0004 0000ffff 0003 00000064 0004 00010000",
    )) else {
        panic!("not SETTINGS");
    };
    assert_eq!(
        s.get(Settings::INITIAL_WINDOW_SIZE),
        Some(65_536),
        "last one wins"
    );
    assert_eq!(s.get(Settings::MAX_CONCURRENT_STREAMS), Some(100));
    assert_eq!(s.get(Settings::ENABLE_PUSH), None);
}

#[test]
fn plausible_chain_cases() {
    #[rustfmt::skip]
    let cases: &[(&str, &str, Option<usize>)] = &[
        ("settings + window_update + headers",
            "00000c 04 00 00000000 0003 00000064 0004 0000ffff
             000004 08 00 00000000 00000fff
             000003 01 05 00000001 828684", Some(3)),
        ("single settings ack", "000000 04 01 00000000", Some(1)),
        ("data then rst_stream",
            "000002 00 00 00000003 6869  000004 03 00 00000003 00000008", Some(2)),
        ("continuation first (mid-block resync)", "000001 09 04 00000005 82", Some(1)),
        ("empty", "", None),
        ("junk", "48656c6c6f2c20776f726c6421210a", None),
        ("http/1.1 request", "474554202f20485454502f312e310d0a", None),
        ("preface", "505249202a20485454502f322e300d0a0d0a534d0d0a0d0a", None),
        ("tls client hello start", "160301 00c8 01 0000c4 0303", None),
        ("chain overrunning the buffer",
            "000000 04 01 00000000  00000c 04 00 00000000 0003 00000064", None),
        ("trailing partial header",
            "000000 04 01 00000000  000000 04", None),
        ("data on stream 0", "000002 00 00 00000000 6869", None),
        ("headers on stream 0 after valid frame",
            "000000 04 01 00000000  000001 01 04 00000000 82", None),
        ("settings on stream 1", "000000 04 01 00000001", None),
        ("unknown type", "000000 0a 00 00000000", None),
        ("undefined flag on ping", "000008 06 02 00000000 0000000000000000", None),
        ("flags on goaway", "000008 07 01 00000000 0000000000000000", None),
        ("reserved stream bit set", "000002 00 00 80000001 6869", None),
        ("length above max_frame_size", "004001 00 00 00000001", None),
        ("ping of length 7", "000007 06 00 00000000 00000000000000", None),
        // A protocol error (RFC 9113 §6.9) but correct framing: resync may lock onto it.
        ("window_update zero increment", "000004 08 00 00000000 00000000", Some(1)),
        ("settings ack with payload", "000006 04 01 00000000 000300000064", None),
    ];
    for (name, wire, want) in cases {
        assert_eq!(
            plausible_chain(&hex(wire), DEFAULT_MAX_FRAME_SIZE),
            *want,
            "{name}"
        );
    }
    // max_frame_size is the caller's: the same 16 KiB + 1 DATA frame passes with a larger one.
    let mut big = hex("004001 00 01 00000001");
    big.resize(HEADER_LEN + 0x4001, 0);
    assert_eq!(plausible_chain(&big, DEFAULT_MAX_FRAME_SIZE), None);
    assert_eq!(plausible_chain(&big, MAX_LENGTH), Some(1));
}

#[test]
fn preface_and_tls_detection() {
    let mut with_settings = PREFACE.to_vec();
    with_settings.extend_from_slice(&hex("000000 04 00 00000000"));
    let cases: &[(&str, &[u8], bool, bool, bool)] = &[
        // name, bytes, is_preface, may_be_preface, looks_like_tls
        ("whole preface", PREFACE, true, true, false),
        ("preface then settings", &with_settings, true, true, false),
        (
            "first 10 bytes of preface",
            &PREFACE[..10],
            false,
            true,
            false,
        ),
        ("empty", b"", false, false, false),
        ("http/1.1", b"GET / HTTP/1.1\r\n", false, false, false),
        (
            "near miss",
            b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n",
            false,
            false,
            false,
        ),
        (
            "tls 1.0 client hello",
            &[0x16, 0x03, 0x01, 0x00, 0xc8, 0x01],
            false,
            false,
            true,
        ),
        (
            "tls 1.3 application data",
            &[0x17, 0x03, 0x03, 0x40, 0x11],
            false,
            false,
            true,
        ),
        (
            "tls alert",
            &[0x15, 0x03, 0x03, 0x00, 0x02, 0x01, 0x00],
            false,
            false,
            true,
        ),
        (
            "tls change cipher spec",
            &[0x14, 0x03, 0x03, 0x00, 0x01, 0x01],
            false,
            false,
            true,
        ),
        (
            "tls heartbeat type",
            &[0x18, 0x03, 0x03, 0x00, 0x10],
            false,
            false,
            false,
        ),
        (
            "bad tls minor version",
            &[0x16, 0x03, 0x05, 0x00, 0x10],
            false,
            false,
            false,
        ),
        (
            "bad tls major version",
            &[0x16, 0x02, 0x01, 0x00, 0x10],
            false,
            false,
            false,
        ),
        (
            "oversized tls record",
            &[0x17, 0x03, 0x03, 0x48, 0x01],
            false,
            false,
            false,
        ),
        (
            "short tls header",
            &[0x16, 0x03, 0x01, 0x00],
            false,
            false,
            false,
        ),
        (
            "h2 settings frame",
            &[0, 0, 0, 4, 1, 0, 0, 0, 0],
            false,
            false,
            false,
        ),
    ];
    for (name, bytes, pre, maybe, tls) in cases {
        assert_eq!(is_preface(bytes), *pre, "{name}: is_preface");
        assert_eq!(may_be_preface(bytes), *maybe, "{name}: may_be_preface");
        assert_eq!(looks_like_tls(bytes), *tls, "{name}: looks_like_tls");
    }
}

// Recorded fixture 1: nghttp2 1.52.0 (Debian) on loopback.
//   nghttpd --no-tls -a 127.0.0.1 -d /tmp/h2cap 8443
//   tcpdump -i lo -w cap.pcap 'tcp port 8443'
//   nghttp -nv http://127.0.0.1:8443/index.html      (index.html = "hello\n")
//   tshark -r cap.pcap -Y 'tcp.len>0' -T fields -e tcp.srcport -e tcp.payload
// One TCP segment per constant, in capture order.
/// client → server: preface, SETTINGS, 5 × PRIORITY (nghttp's dependency tree), HEADERS.
const NGHTTP_C1: &str = "505249202a20485454502f322e300d0a0d0a534d0d0a0d0a00000c04000000000000030000006400040000ffff00000502000000000300000000c800000502000000000500000000640000050200000000070000000000000005020000000009000000070000000502000000000b000000030000002601250000000d0000000b0f828586418a089d5c0b8170dc79a69953032a2f2a907a8aaa69d29ac4c0576c4b83";
/// server → client: SETTINGS (MAX_CONCURRENT_STREAMS 100).
const NGHTTP_S1: &str = "000006040000000000000300000064";
/// client → server: SETTINGS ACK.
const NGHTTP_C2: &str = "000000040100000000";
/// server → client: SETTINGS ACK, HEADERS (response), DATA "hello\n" with END_STREAM.
const NGHTTP_S2: &str = "00000004010000000000005b01040000000d887690aa69d29ae452a9a74a6b13015db12e0f5889a47e561cc58197000f6196d07abe94132a693f75040138a0817197ae040a62d1bf0f0d01366c96d07abe94132a693f75040138a0817197ae01e53168df5f87497ca589d34d1f00000600010000000d68656c6c6f0a";
/// client → server: GOAWAY NO_ERROR, last stream 0.
const NGHTTP_C3: &str = "0000080700000000000000000000000000";

// Recorded fixture 2: the same nghttpd, driven by a raw-socket Python client that sends the
// preface, an empty SETTINGS, a SETTINGS ACK, PING "whoclose", then a WINDOW_UPDATE with a
// zero increment on stream 0; captured with tcpdump on lo as above. The server-side segments
// are nghttpd's own replies: its SETTINGS, SETTINGS ACK, PING ACK, and the GOAWAY it sends
// for the protocol error (with nghttp2's debug text).
const PING_C: &str = "00000806000000000077686f636c6f7365";
const PING_S: &str = "00000806010000000077686f636c6f7365";
const BAD_WU_C: &str = "00000408000000000000000000";
const GOAWAY_S: &str = "000031070000000000000000000000000157494e444f575f5550444154453a2077696e646f775f73697a655f696e6372656d656e74203d3d2030";

/// Parses each frame of a byte stream as the kernel would hand it over: the header, plus
/// at most 64 payload bytes of control frames and nothing of the others. PRIORITY frames
/// are left out: the kernel does not report them (their payload is never captured).
fn kernel_view(stream: &[u8]) -> Vec<Frame> {
    frames_of(stream)
        .into_iter()
        .filter(|(head, _)| head.kind != Kind::Priority)
        .map(|(head, payload)| {
            let control = matches!(
                head.kind,
                Kind::Settings | Kind::Ping | Kind::GoAway | Kind::RstStream | Kind::WindowUpdate
            );
            let captured = if control {
                &payload[..payload.len().min(64)]
            } else {
                &[][..]
            };
            parse_frame(&head, captured).unwrap_or_else(|e| panic!("{head:?}: {e}"))
        })
        .collect()
}

#[test]
fn fixture_nghttp_exchange() {
    let c1 = hex(NGHTTP_C1);
    assert!(is_preface(&c1));
    assert!(!looks_like_tls(&c1));
    let client: Vec<u8> = [&c1[PREFACE.len()..], &hex(NGHTTP_C2), &hex(NGHTTP_C3)].concat();
    let server: Vec<u8> = [hex(NGHTTP_S1), hex(NGHTTP_S2)].concat();

    // Every segment after the preface is a plausible chain on its own.
    assert_eq!(
        plausible_chain(&c1[PREFACE.len()..], DEFAULT_MAX_FRAME_SIZE),
        Some(7)
    );
    assert_eq!(
        plausible_chain(&hex(NGHTTP_S1), DEFAULT_MAX_FRAME_SIZE),
        Some(1)
    );
    assert_eq!(
        plausible_chain(&hex(NGHTTP_S2), DEFAULT_MAX_FRAME_SIZE),
        Some(3)
    );
    assert_eq!(plausible_chain(&client, DEFAULT_MAX_FRAME_SIZE), Some(9));
    // ...but the preface is not, nor a stream cut in the middle of the response HEADERS.
    assert_eq!(plausible_chain(&c1, DEFAULT_MAX_FRAME_SIZE), None);
    assert_eq!(plausible_chain(&server[..40], DEFAULT_MAX_FRAME_SIZE), None);

    // With whole payloads every frame decodes; nghttp's PRIORITY tree is visible.
    let full: Vec<Frame> = frames_of(&client)
        .iter()
        .map(|(head, payload)| parse_frame(head, payload).unwrap())
        .collect();
    assert_eq!(full.len(), 9);
    assert_eq!(
        full[1],
        Frame::Priority(Priority {
            stream_id: 3,
            dependency: 0,
            exclusive: false,
            weight: 201
        })
    );
    assert_eq!(
        full[4],
        Frame::Priority(Priority {
            stream_id: 9,
            dependency: 7,
            exclusive: false,
            weight: 1
        })
    );
    for (head, payload) in frames_of(&server) {
        parse_frame(&head, &payload).unwrap();
    }

    let c = kernel_view(&client);
    let kinds: Vec<Kind> = c.iter().map(Frame::kind).collect();
    assert_eq!(
        kinds,
        [Kind::Settings, Kind::Headers, Kind::Settings, Kind::GoAway]
    );
    assert_eq!(
        c[0],
        Frame::Settings(Settings {
            ack: false,
            params: vec![
                (Settings::MAX_CONCURRENT_STREAMS, 100),
                (Settings::INITIAL_WINDOW_SIZE, 65_535)
            ],
            truncated: false,
        })
    );
    assert_eq!(
        c[1],
        Frame::Headers(Headers {
            stream_id: 13,
            end_stream: true,
            end_headers: true,
            length: 38
        })
    );
    assert_eq!(
        c[2],
        Frame::Settings(Settings {
            ack: true,
            params: vec![],
            truncated: false
        })
    );
    assert_eq!(c[3], goaway(0, Reason::NO_ERROR, b"", false));

    let s = kernel_view(&server);
    let kinds: Vec<Kind> = s.iter().map(Frame::kind).collect();
    assert_eq!(
        kinds,
        [Kind::Settings, Kind::Settings, Kind::Headers, Kind::Data]
    );
    assert_eq!(
        s[2],
        Frame::Headers(Headers {
            stream_id: 13,
            end_stream: false,
            end_headers: true,
            length: 91
        })
    );
    assert_eq!(
        s[3],
        Frame::Data(Data {
            stream_id: 13,
            end_stream: true,
            length: 6
        })
    );
}

#[test]
fn fixture_nghttpd_ping_and_goaway() {
    let ping = kernel_view(&hex(PING_C));
    let pong = kernel_view(&hex(PING_S));
    assert_eq!(
        ping,
        [Frame::Ping(Ping {
            ack: false,
            opaque: *b"whoclose"
        })]
    );
    assert_eq!(
        pong,
        [Frame::Ping(Ping {
            ack: true,
            opaque: *b"whoclose"
        })]
    );
    assert_eq!(
        kernel_view(&hex(BAD_WU_C)),
        [Frame::WindowUpdate(WindowUpdate {
            stream_id: 0,
            increment: 0
        })]
    );
    // A PROTOCOL_ERROR, yet correctly framed: the next frame starts right after it, so a
    // resync may lock onto it (the kernel cannot see the increment anyway).
    assert_eq!(
        plausible_chain(&hex(BAD_WU_C), DEFAULT_MAX_FRAME_SIZE),
        Some(1)
    );

    let goaway_wire = hex(GOAWAY_S);
    let [Frame::GoAway(g)] = &kernel_view(&goaway_wire)[..] else {
        panic!("not a single GOAWAY");
    };
    assert_eq!(g.last_stream_id, 0);
    assert_eq!(g.reason, Reason::PROTOCOL_ERROR);
    assert!(!g.debug_truncated);
    assert_eq!(g.debug_text(), "WINDOW_UPDATE: window_size_increment == 0");
    // Cut to a 21-byte capture: the fixed part survives, the text is a flagged prefix.
    let head = Head::parse(&goaway_wire).unwrap();
    let Frame::GoAway(cut) = parse_frame(&head, &goaway_wire[HEADER_LEN..HEADER_LEN + 21]).unwrap()
    else {
        panic!("not a GOAWAY");
    };
    assert_eq!(cut.reason, Reason::PROTOCOL_ERROR);
    assert_eq!(cut.debug_text(), "WINDOW_UPDATE");
    assert!(cut.debug_truncated);
}

/// The kernel's plausibility rule (`tracer_common::h2sniff`) and this parser agree on every
/// type, flag byte, a spread of lengths and stream identifiers: a header is plausible
/// exactly when its type is known, the reserved bit and undefined flags are clear, it fits
/// the cap, and `parse_frame` raises no header-level error.
#[test]
fn sniff_rule_agrees_with_parser_exhaustively() {
    let lengths = [0u32, 1, 3, 4, 5, 6, 7, 8, 9, 12, 16_384, 16_385, MAX_LENGTH];
    let streams = [0u32, 1, 3, 0x8000_0000, 0x8000_0001];
    let capture = [0u8; 64];
    let mut plausible_count = 0;
    for kind in 0u8..=11 {
        for flags in 0u8..=255 {
            for &length in &lengths {
                for &stream in &streams {
                    let [_, l0, l1, l2] = length.to_be_bytes();
                    let [s0, s1, s2, s3] = stream.to_be_bytes();
                    let wire = [l0, l1, l2, kind, flags, s0, s1, s2, s3];
                    let head = Head::parse(&wire).unwrap();
                    let got = sniff::plausible_header(&wire, DEFAULT_MAX_FRAME_SIZE);
                    let captured = &capture[..capture.len().min(length as usize)];
                    let header_ok = !matches!(
                        parse_frame(&head, captured),
                        Err(Error::BadLength { .. } | Error::BadStreamId { .. })
                    );
                    let want = head.kind.is_known()
                        && stream & 0x8000_0000 == 0
                        && flags & !head.kind.defined_flags() == 0
                        && length <= DEFAULT_MAX_FRAME_SIZE
                        && header_ok;
                    assert_eq!(got, want, "{wire:02x?}");
                    plausible_count += usize::from(got);
                }
            }
        }
    }
    // Not vacuous: hundreds of the combinations are plausible (477 when written).
    assert!(plausible_count > 400, "{plausible_count}");
}
