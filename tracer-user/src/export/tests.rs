//! Golden tests of the JSON contract. Set `UPDATE_GOLDEN=1` to rewrite the files after an
//! intended change (and bump SCHEMA_VERSION if it is incompatible).

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use serde_json::Value;

use super::*;
use crate::{
    conn::Table,
    event::{Dir, Event, EventKind, Packet, TcpState, Tuple},
    timeline::Role,
};
use tracer_common::tcp_flag::{ACK, FIN, RST, SYN};

const MS: u64 = 1_000_000;

fn ev(ts: u64, sk: u64, t: &str, kind: EventKind, pid: u32, comm: &str, exiting: bool) -> Event {
    let (l, r) = t.split_once(" > ").expect("tuple");
    Event {
        ts_ns: ts,
        skaddr: sk,
        cookie: 0,
        pid,
        tid: pid,
        comm: comm.into(),
        exiting,
        netns: Some(4026532000),
        tuple: Some(Tuple::new(
            l.parse::<SocketAddr>().expect("local"),
            r.parse::<SocketAddr>().expect("remote"),
        )),
        cpu: 1,
        kind,
    }
}

fn p(dir: Dir, flags: u8, seq: u32, ttl: u8) -> EventKind {
    EventKind::Packet(Packet {
        dir,
        flags,
        ttl,
        seq,
        ack: 0,
        payload_len: 0,
        first_in_dir: true,
        ttl_changed: false,
        has_state: false,
        last_data_ns: None,
        cgroup_id: 0,
    })
}

fn golden(name: &str, value: &Value) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/export/golden")
        .join(name);
    let text = serde_json::to_string_pretty(value).expect("serialise") + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).expect("write golden");
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        text,
        want,
        "golden {} differs (UPDATE_GOLDEN=1 to accept)",
        path.display()
    );
}

fn clock() -> Clock {
    Clock::fixed(
        0,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_460_100),
    )
}

#[test]
fn golden_ipv6_client_close() {
    use TcpState::*;
    let t = "[fd00:9:1::2]:40000 > [fd00:9:2::2]:443";
    let mut tbl = Table::default();
    for e in [
        ev(
            1_000 * MS,
            7,
            "[fd00:9:1::2]:0 > [fd00:9:2::2]:443",
            EventKind::State {
                old: Close,
                new: SynSent,
            },
            321,
            "wc-peer",
            false,
        ),
        ev(1_000 * MS, 7, t, p(Dir::Egress, SYN, 100, 64), 0, "", false),
        ev(
            1_001 * MS,
            7,
            t,
            p(Dir::Ingress, SYN | ACK, 900, 63),
            0,
            "",
            false,
        ),
        ev(
            1_001 * MS,
            7,
            t,
            EventKind::State {
                old: SynSent,
                new: Established,
            },
            0,
            "swapper/1",
            false,
        ),
        ev(
            3_001 * MS,
            7,
            t,
            EventKind::State {
                old: Established,
                new: FinWait1,
            },
            321,
            "wc-peer",
            false,
        ),
        ev(
            3_001 * MS,
            7,
            t,
            p(Dir::Egress, FIN | ACK, 111, 64),
            0,
            "",
            false,
        ),
        ev(
            3_002 * MS,
            7,
            t,
            p(Dir::Ingress, FIN | ACK, 901, 63),
            0,
            "",
            false,
        ),
        ev(
            3_002 * MS,
            7,
            t,
            EventKind::State {
                old: FinWait2,
                new: Close,
            },
            0,
            "swapper/1",
            false,
        ),
    ] {
        tbl.on_event(&e);
    }
    let out = tbl.take_all_closed();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].conn.role, Role::Client);
    golden("ipv6_client_close.json", &close_json(&out[0], &clock()));
}

#[test]
fn golden_ipv4_middlebox_reset() {
    use TcpState::*;
    let t = "10.9.1.2:40000 > 10.9.2.2:8080";
    let mut tbl = Table::default();
    for e in [
        ev(
            0,
            9,
            "10.9.1.2:0 > 10.9.2.2:8080",
            EventKind::State {
                old: Close,
                new: SynSent,
            },
            42,
            "app",
            false,
        ),
        ev(0, 9, t, p(Dir::Egress, SYN, 5, 64), 0, "", false),
        ev(MS, 9, t, p(Dir::Ingress, SYN | ACK, 77, 63), 0, "", false),
        ev(
            MS,
            9,
            t,
            EventKind::State {
                old: SynSent,
                new: Established,
            },
            0,
            "",
            false,
        ),
        ev(500 * MS, 9, t, p(Dir::Ingress, RST, 78, 64), 0, "", false),
        ev(
            500 * MS,
            9,
            t,
            EventKind::ErrorReport { error: 104 },
            0,
            "",
            false,
        ),
        ev(
            500 * MS,
            9,
            t,
            EventKind::State {
                old: Established,
                new: Close,
            },
            0,
            "",
            false,
        ),
    ] {
        tbl.on_event(&e);
    }
    let out = tbl.take_all_closed();
    assert_eq!(out.len(), 1);
    let j = close_json(&out[0], &clock());
    assert_eq!(j["verdict"]["closed_by"], "middlebox", "{j:#}");
    golden("ipv4_middlebox_reset_untraced.json", &j);
    let line = close_line(&out[0], &clock());
    assert!(
        line.contains("middlebox") && line.contains("middlebox_reset") && line.contains("app(42)"),
        "{line}"
    );
    assert!(
        !line.contains('['),
        "no middlebox object, no suffix: {line}"
    );
    // A known middlebox is shown in the table and as `verdict.middlebox` in JSON.
    let mut named = out[0].clone();
    named.verdict.middlebox = Some(crate::classify::Middlebox {
        pid: Some(300),
        comm: Some("haproxy".into()),
        leg: Some(crate::timeline::ProxyLeg::Downstream),
        action: Some("fin"),
        ..crate::classify::Middlebox::of(crate::classify::MiddleboxKind::Proxy)
    });
    let named_line = close_line(&named, &clock());
    assert!(
        named_line.ends_with("  [proxy haproxy(300) downstream fin]"),
        "{named_line}"
    );
    let nj = close_json(&named, &clock());
    assert_eq!(nj["verdict"]["middlebox"]["kind"], "proxy", "{nj:#}");
    assert_eq!(nj["verdict"]["middlebox"]["leg"], "downstream", "{nj:#}");
    assert!(
        nj["verdict"]["middlebox"].get("after_ms").is_none(),
        "{nj:#}"
    );
    // A process name is whatever the process set (prctl PR_SET_NAME): escape sequences and
    // bidi overrides must not reach the terminal, in the process column or the middlebox tag.
    let mut hostile = named.clone();
    hostile.owner = Some((7, "\u{1b}]0;pwned\u{7}\u{1b}[2J\u{202e}x".into()));
    if let Some(m) = hostile.verdict.middlebox.as_mut() {
        m.comm = Some("\u{1b}[31mred".into());
    }
    let hostile_line = close_line(&hostile, &clock());
    assert!(
        !hostile_line
            .chars()
            .any(|c| c.is_control() || c == '\u{202e}'),
        "{hostile_line:?}"
    );
    assert!(
        hostile_line.contains("\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{202e}x(7)")
            && hostile_line.contains("[proxy \\u{1b}[31mred(300)"),
        "{hostile_line}"
    );
    // Pinned as a golden too, so the JSON Schema test (which reads every golden) checks the
    // middlebox object's shape.
    golden("ipv4_middlebox_named_proxy.json", &nj);
    // Columns line up with the header: the reason is padded like every other column.
    for (col, want) in [("REASON", "middlebox_reset"), ("MECH", "rst"), ("CONF", "")] {
        let at = TABLE_HEADER.find(col).expect("column in header");
        assert!(
            line.get(at..).is_some_and(|rest| rest.starts_with(want)
                && !line[..at].ends_with(|c: char| !c.is_whitespace())),
            "{col} misplaced:\n{TABLE_HEADER}\n{line}"
        );
    }
}

#[test]
fn filter_selects_by_port_addr_netns_pid() {
    use TcpState::*;
    let t = "10.0.0.1:40000 > 10.0.0.2:80";
    let mut tbl = Table::default();
    tbl.on_event(&ev(
        0,
        1,
        t,
        EventKind::State {
            old: Close,
            new: SynSent,
        },
        5,
        "c",
        false,
    ));
    tbl.on_event(&ev(
        1,
        1,
        t,
        EventKind::State {
            old: SynSent,
            new: Close,
        },
        5,
        "c",
        false,
    ));
    let out = tbl.take_all_closed();
    let c = &out[0];
    assert!(Filter::default().matches(c));
    assert!(
        Filter {
            ports: vec![80],
            ..Default::default()
        }
        .matches(c)
    );
    assert!(
        !Filter {
            ports: vec![81],
            ..Default::default()
        }
        .matches(c)
    );
    assert!(
        Filter {
            addrs: vec!["10.0.0.2".parse().expect("ip")],
            ..Default::default()
        }
        .matches(c)
    );
    assert!(
        !Filter {
            addrs: vec!["10.0.0.3".parse().expect("ip")],
            ..Default::default()
        }
        .matches(c)
    );
    assert!(
        Filter {
            netns: vec![4026532000],
            ..Default::default()
        }
        .matches(c)
    );
    assert!(
        !Filter {
            netns: vec![1],
            ..Default::default()
        }
        .matches(c)
    );
    assert!(
        Filter {
            pid: Some(5),
            ..Default::default()
        }
        .matches(c)
    );
    assert!(
        !Filter {
            pid: Some(6),
            ..Default::default()
        }
        .matches(c)
    );
    let _ = RST;
}

#[test]
fn golden_grpc_idle_timeout_on_the_client() {
    use crate::event::ProtoNote;
    use TcpState::*;
    let t = "10.241.1.2:40000 > 10.241.2.2:8080";
    let h2 = |ts: u64, dir: Dir, head: [u8; 9], payload: &[u8]| {
        ev(
            ts,
            3,
            t,
            EventKind::H2Frame {
                dir,
                seq: 0,
                head,
                payload: bytes::Bytes::copy_from_slice(payload),
            },
            0,
            "",
            false,
        )
    };
    let mut goaway = vec![0, 0, 0, 1, 0, 0, 0, 2];
    goaway.extend_from_slice(b"connection idle");
    let mut tbl = Table::default();
    for e in [
        ev(
            0,
            3,
            "10.241.1.2:0 > 10.241.2.2:8080",
            EventKind::State {
                old: Close,
                new: SynSent,
            },
            77,
            "python3",
            false,
        ),
        ev(
            MS,
            3,
            t,
            EventKind::State {
                old: SynSent,
                new: Established,
            },
            0,
            "",
            false,
        ),
        ev(
            2 * MS,
            3,
            t,
            EventKind::H2Proto {
                dir: Dir::Egress,
                seq: 0,
                note: ProtoNote::H2Preface,
            },
            0,
            "",
            false,
        ),
        h2(3 * MS, Dir::Egress, [0, 0, 20, 1, 0x4, 0, 0, 0, 1], &[]),
        h2(3 * MS, Dir::Egress, [0, 0, 5, 0, 0x1, 0, 0, 0, 1], &[]),
        h2(4 * MS, Dir::Ingress, [0, 0, 8, 1, 0x4, 0, 0, 0, 1], &[]),
        h2(4 * MS, Dir::Ingress, [0, 0, 8, 1, 0x5, 0, 0, 0, 1], &[]),
        h2(
            2_004 * MS,
            Dir::Ingress,
            [0, 0, 23, 7, 0, 0, 0, 0, 0],
            &goaway,
        ),
        ev(
            2_004 * MS,
            3,
            t,
            EventKind::State {
                old: Established,
                new: FinWait1,
            },
            77,
            "python3",
            false,
        ),
        ev(
            2_004 * MS,
            3,
            t,
            p(Dir::Egress, FIN | ACK, 500, 64),
            0,
            "",
            false,
        ),
        ev(
            2_005 * MS,
            3,
            t,
            p(Dir::Ingress, FIN | ACK, 900, 63),
            0,
            "",
            false,
        ),
        ev(
            2_005 * MS,
            3,
            t,
            EventKind::State {
                old: FinWait2,
                new: Close,
            },
            0,
            "",
            false,
        ),
    ] {
        tbl.on_event(&e);
    }
    let out = tbl.take_all_closed();
    assert_eq!(out.len(), 1);
    let j = close_json(&out[0], &clock());
    assert_eq!(j["verdict"]["reason"], "server_idle_timeout", "{j:#}");
    assert_eq!(j["verdict"]["tcp_initiator"], "local", "{j:#}");
    assert_eq!(j["h2"]["goaways"][0]["idle_ms"], 2000.0, "{j:#}");
    golden("grpc_idle_timeout_client.json", &j);
}

// ---- The hand-written `close` writer against serde_json ----------------------------------
//
// `CloseObject::write_json` must write exactly what serde_json writes for the `Serialize`
// impl. The golden tests above check it through `close_json`; these cover every fact, every
// optional part and awkward strings and numbers: crafted records, then random event streams
// through the connection table.

mod writer {
    use std::{net::SocketAddr, time::Duration};

    use bytes::Bytes;

    use super::*;
    use crate::{
        classify::{
            Cause, ClosedBy, Confidence, Initiator, Mechanism, Middlebox, MiddleboxKind, Party,
            Reason,
        },
        conn::{
            Closed, TableConfig,
            h2::{H2State, H2Track},
        },
        event::{Comm, ProtoNote},
        h2::Reason as ErrorCode,
        k8s::{K8sEnds, PodIdentity},
        timeline::{Fact, FactKind, GoAway, PeerSummary, ProxyLeg, RstOrigin},
    };

    fn check(c: &Closed, k8s: Option<&K8sEnds>) {
        let odd = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_234_567_891_234_567_891);
        for clock in [clock(), Clock::fixed(5 * MS, odd)] {
            super::super::close::assert_writer_matches_serde(&CloseObject {
                closed: c,
                clock: &clock,
                k8s,
            });
        }
    }

    /// xorshift64*: reproducible choices without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
            &v[self.below(v.len())]
        }
        fn chance(&mut self, one_in: u64) -> bool {
            self.next().is_multiple_of(one_in)
        }
        fn text(&mut self) -> &'static str {
            TEXTS[self.below(TEXTS.len())]
        }
    }

    /// Text with everything JSON escaping has to get right.
    const TEXTS: [&str; 10] = [
        "",
        "nginx",
        "say \"hi\"",
        "back\\slash\\",
        "\u{0}\u{1}\u{8}\u{9}\u{a}\u{b}\u{c}\u{d}\u{1b}\u{1f}\u{7f}",
        "caf\u{e9} \u{65e5}\u{672c} \u{1f600}",
        "\u{202e}evil\u{2028}line\u{2029}",
        "\u{fffd}\u{fffd}lossy",
        "{\"json\":[1,2]}",
        "a hint that is long enough to span several vector widths, with no escapes in it",
    ];

    const STATES: [TcpState; 14] = [
        TcpState::Established,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Listen,
        TcpState::Closing,
        TcpState::NewSynRecv,
        TcpState::BoundInactive,
        TcpState::Other(200),
    ];

    const ORIGINS: [RstOrigin; 4] = [
        RstOrigin::PeerSocket,
        RstOrigin::PeerKernel,
        RstOrigin::NotSentByPeer,
        RstOrigin::Untraced,
    ];

    const CODES: [ErrorCode; 4] = [
        ErrorCode::NO_ERROR,
        ErrorCode::ENHANCE_YOUR_CALM,
        ErrorCode(0x1234),
        ErrorCode(u32::MAX),
    ];

    /// Offsets from the connection's first event: 0, 1 µs, sub-µs rounding, seconds,
    /// 123456.789 ms, days, and the far end of u64.
    const OFFSETS: [u64; 9] = [
        0,
        1_000,
        1_499,
        1_500,
        2_004 * MS,
        123_456_789_000,
        86_400_000 * MS,
        u64::MAX / 2,
        u64::MAX,
    ];

    fn comm(s: &str) -> Comm {
        s.into()
    }

    fn goaway(sent: bool, at_ns: u64, code: ErrorCode, debug: &str, idle: Option<u64>) -> GoAway {
        GoAway {
            sent,
            at_ns,
            code,
            last_stream_id: if sent { 0 } else { 0x7fff_ffff },
            debug: debug.into(),
            debug_truncated: !debug.is_empty() && sent,
            idle_ns: idle,
        }
    }

    /// One fact of every kind, with each variant of what it may show.
    fn every_fact(t0: u64) -> Vec<Fact> {
        let mut kinds = Vec::new();
        for (i, to) in STATES.into_iter().enumerate() {
            for exiting in [false, true] {
                kinds.push(FactKind::State {
                    from: STATES[(i + 3) % STATES.len()],
                    to,
                    pid: i as u32 * 1000,
                    comm: comm(TEXTS[i % TEXTS.len()]),
                    exiting,
                });
            }
        }
        kinds.push(FactKind::FinSent);
        for ttl in [0, 1, 64, 255] {
            kinds.push(FactKind::FinReceived { ttl });
            kinds.push(FactKind::TtlChanged { ttl });
        }
        for (exiting, kernel_reason) in [
            (false, None),
            (true, None),
            (false, Some("NO_SOCKET")),
            (true, Some("TCP_ABORT_ON_\"CLOSE\"\\\n")),
        ] {
            kinds.push(FactKind::RstSent {
                exiting,
                kernel_reason: kernel_reason.map(String::from),
            });
        }
        for (i, origin) in ORIGINS.into_iter().enumerate() {
            for ttl in [0, 57] {
                kinds.push(FactKind::RstReceived {
                    ttl,
                    origin,
                    sender_reason: (i % 2 == 1).then(|| TEXTS[i + ttl as usize % 5].into()),
                });
            }
        }
        for state in STATES {
            kinds.push(FactKind::Retransmit { state });
        }
        for errno in [0, 32, 71, 101, 103, 104, 110, 111, 113, 9999, -1, i32::MIN] {
            kinds.push(FactKind::SocketError { errno });
        }
        for (i, code) in CODES.into_iter().enumerate() {
            for sent in [false, true] {
                kinds.push(FactKind::GoAway(Box::new(goaway(
                    sent,
                    t0.saturating_add(OFFSETS[i + 3]),
                    code,
                    TEXTS[(i * 2 + usize::from(sent)) % TEXTS.len()],
                    None,
                ))));
            }
        }
        for exiting in [false, true] {
            kinds.push(FactKind::CloseCall {
                pid: u32::MAX,
                comm: comm("\"quoted\" \\ comm\u{7}"),
                exiting,
            });
        }
        kinds
            .into_iter()
            .enumerate()
            .map(|(i, kind)| Fact {
                // Offsets of every magnitude, and a fact stamped before the first one.
                at_ns: if i == 1 {
                    t0.saturating_sub(5)
                } else {
                    t0.saturating_add(OFFSETS[i % OFFSETS.len()])
                },
                kind,
            })
            .collect()
    }

    /// A plain client connection closed with FIN (the most common record).
    fn base(sk: u64, t: &str) -> Closed {
        use TcpState::*;
        let mut tbl = Table::default();
        for e in [
            ev(
                1_000 * MS,
                sk,
                t,
                EventKind::State {
                    old: Close,
                    new: SynSent,
                },
                42,
                "app",
                false,
            ),
            ev(
                1_001 * MS,
                sk,
                t,
                EventKind::State {
                    old: SynSent,
                    new: Established,
                },
                0,
                "",
                false,
            ),
            ev(
                1_500 * MS,
                sk,
                t,
                EventKind::State {
                    old: Established,
                    new: FinWait1,
                },
                42,
                "app",
                false,
            ),
            ev(
                1_501 * MS,
                sk,
                t,
                EventKind::State {
                    old: FinWait1,
                    new: Close,
                },
                0,
                "",
                false,
            ),
        ] {
            tbl.on_event(&e);
        }
        tbl.take_all_closed().pop().expect("closed")
    }

    /// The blank-track shortcut of the writer against serde, for every state, with and
    /// without an idle time, and a track one counter away from blank (the full path).
    #[test]
    fn blank_h2_objects_match_serde() {
        for state in [
            H2State::Synced,
            H2State::Unsynced,
            H2State::NotH2,
            H2State::Tls,
        ] {
            for idle in [None, Some(1_200 * MS)] {
                let mut c = base(0x77, "10.0.0.1:40000 > 10.0.0.2:443");
                let mut h = H2Track::new(1_000 * MS);
                h.state = state;
                h.idle_since_ns = idle;
                assert!(h.is_blank());
                c.conn.h2 = Some(Box::new(h.clone()));
                check(&c, None);
                h.max_open_streams = 1;
                assert!(!h.is_blank());
                c.conn.h2 = Some(Box::new(h));
                check(&c, None);
            }
        }
    }

    fn frame(len: u32, kind: u8, flags: u8, stream: u32) -> [u8; 9] {
        let l = len.to_be_bytes();
        let s = stream.to_be_bytes();
        [l[1], l[2], l[3], kind, flags, s[0], s[1], s[2], s[3]]
    }

    /// An HTTP/2 tracker fed real frames: streams, PINGs both ways (some answered), RST_STREAM
    /// with registered and unregistered codes, GOAWAYs with awkward debug text.
    fn busy_h2(t0: u64, debug: &str) -> H2Track {
        let mut h = H2Track::new(t0);
        h.on_proto(ProtoNote::H2Preface);
        let none = Bytes::new();
        let ping = |opaque: u8| Bytes::from(vec![opaque; 8]);
        let rst = |code: u32| Bytes::from(code.to_be_bytes().to_vec());
        // Frames after t0 (or, for a t0 at the end of the clock, before it).
        let mut at = t0.min(u64::MAX / 4);
        for s in [1u32, 3, 5, 7] {
            at += 1_234_567;
            h.on_frame(at, Dir::Egress, &frame(20, 1, 0x4, s), &none);
        }
        h.on_frame(at + 1, Dir::Ingress, &frame(10, 1, 0x5, 1), &none);
        h.on_frame(at + 2, Dir::Egress, &frame(5, 0, 0x1, 1), &none);
        for (i, code) in [0x8u32, 0x8, 0x2, 0xdead, 0x1].into_iter().enumerate() {
            let dir = if i % 2 == 0 {
                Dir::Egress
            } else {
                Dir::Ingress
            };
            h.on_frame(
                at + 3 + i as u64,
                dir,
                &frame(4, 3, 0, 3 + 2 * i as u32),
                &rst(code),
            );
        }
        for (i, gap) in [1_000u64, 15_000_000_000, 7, 2_000_000]
            .into_iter()
            .enumerate()
        {
            at += gap;
            h.on_frame(at, Dir::Egress, &frame(8, 6, 0, 0), &ping(i as u8));
            at += gap / 3;
            h.on_frame(at, Dir::Ingress, &frame(8, 6, 0, 0), &ping(100 + i as u8));
            if i % 2 == 0 {
                h.on_frame(at + 1, Dir::Ingress, &frame(8, 6, 0x1, 0), &ping(i as u8));
                h.on_frame(
                    at + 2,
                    Dir::Egress,
                    &frame(8, 6, 0x1, 0),
                    &ping(100 + i as u8),
                );
            }
        }
        // A malformed frame (a PING of the wrong length) counts as a parse error.
        h.on_frame(at + 3, Dir::Ingress, &frame(3, 6, 0, 0), &none);
        for (i, code) in [0x0u32, 0xb, 0x4242].into_iter().enumerate() {
            let mut p = vec![0, 0, 0, 9];
            p.extend_from_slice(&code.to_be_bytes());
            p.extend_from_slice(debug.as_bytes());
            let dir = if i == 1 { Dir::Egress } else { Dir::Ingress };
            h.on_frame(
                at + 10 + i as u64,
                dir,
                &frame(p.len() as u32, 7, 0, 0),
                &Bytes::from(p),
            );
        }
        h.rst_sent.insert("we\"ird\\key\u{1}".into(), u32::MAX);
        h
    }

    fn pod(r: &mut Rng) -> PodIdentity {
        let opt = |r: &mut Rng| (!r.chance(3)).then(|| r.text().to_string());
        PodIdentity {
            node: opt(r),
            namespace: opt(r),
            pod: opt(r),
            container: opt(r),
            pod_uid: r.text().to_string(),
            container_id: opt(r),
        }
    }

    fn middlebox(r: &mut Rng) -> Middlebox {
        Middlebox {
            pid: r.chance(2).then_some(300),
            comm: r.chance(2).then(|| r.text().into()),
            netns: r.chance(2).then_some(4026531840),
            leg: *r.pick(&[None, Some(ProxyLeg::Downstream), Some(ProxyLeg::Upstream)]),
            action: *r.pick(&[None, Some("fin"), Some("rst"), Some("goaway")]),
            other_leg: r.chance(2).then(|| "10.0.0.1:1 -> 10.0.0.2:2".into()),
            other_leg_ended: r.chance(2).then_some("rst"),
            detected_by: r.chance(2).then_some("client"),
            after_ms: r.chance(2).then_some(u64::MAX),
            ..Middlebox::of(*r.pick(&[
                MiddleboxKind::Proxy,
                MiddleboxKind::Nat,
                MiddleboxKind::Firewall,
                MiddleboxKind::Path,
            ]))
        }
    }

    fn reason(r: &mut Rng) -> Reason {
        let party = *r.pick(&[Party::Client, Party::Server, Party::Local, Party::Remote]);
        let cause = *r.pick(&[
            Cause::Close,
            Cause::ProcessExit,
            Cause::Abort,
            Cause::NoSocket,
            Cause::Reset,
            Cause::Goaway,
            Cause::IdleTimeout,
            Cause::MaxAge,
            Cause::TooManyPings,
            Cause::KeepaliveTimeout,
            Cause::Shutdown,
        ]);
        *r.pick(&[
            Reason::By(party, cause),
            Reason::ServerCloseNoGoaway,
            Reason::MiddleboxReset,
            Reason::RetransmissionTimeout,
            Reason::KeepaliveTimeout,
            Reason::ConnectRejected,
            Reason::ConnectionRefused,
            Reason::ConnectTimeout,
            Reason::HandshakeFailed,
            Reason::ProxyClose,
            Reason::ProxyReset,
            Reason::ProxyGoaway,
            Reason::PathBlackhole,
            Reason::Unknown,
        ])
    }

    /// Each part of the record, one at a time, on the common client record.
    #[test]
    fn every_part_on_its_own() {
        let c0 = base(7, "10.9.1.2:40000 > 10.9.2.2:8080");
        check(&c0, None);
        let t0 = c0.conn.first_ns;

        for baseline in [None, Some(0), Some(63), Some(255)] {
            let mut c = c0.clone();
            c.conn.facts = every_fact(t0);
            c.conn.ttl_baseline = baseline;
            check(&c, None);
        }
        for tuple in [
            None,
            Some(("[fd00:9:1::2]:40000", "[fd00:9:2::2]:443")),
            Some(("[::ffff:10.0.0.1]:1", "[::1]:65535")),
            Some(("0.0.0.0:0", "255.255.255.255:65535")),
        ] {
            let mut c = c0.clone();
            c.conn.tuple = tuple.map(|(l, r)| {
                Tuple::new(
                    l.parse::<SocketAddr>().expect("local"),
                    r.parse::<SocketAddr>().expect("remote"),
                )
            });
            check(&c, None);
        }
        for owner in [None, Some((0, "")), Some((u32::MAX, TEXTS[4]))] {
            let mut c = c0.clone();
            c.owner = owner.map(|(p, s)| (p, comm(s)));
            c.conn.netns = None;
            c.conn.preexisting = !c.conn.preexisting;
            c.conn.role = Role::Unknown;
            check(&c, None);
        }
        // Times: the record's clocks at their extremes (lifetime and at_ms of 0 and huge).
        for (first, opened, closed) in [
            (0, None, None),
            (0, Some(0), Some(u64::MAX)),
            (u64::MAX, Some(0), Some(u64::MAX)),
            (5, Some(10), Some(3)),
            (1_000 * MS, None, Some(1_000 * MS + 123_456_789_000)),
        ] {
            let mut c = c0.clone();
            c.conn.first_ns = first;
            c.conn.opened_ns = opened;
            c.conn.closed_ns = closed;
            c.conn.retransmits = u32::MAX;
            c.conn.facts_dropped = 17;
            c.conn.facts = every_fact(first);
            check(&c, None);
        }
        // The peer, with and without what it may lack.
        for peer in [
            PeerSummary {
                id: crate::timeline::ConnId(0x5ae1710ec318e7fe),
                pid: Some(28007),
                comm: Some("xtask".into()),
                netns: Some(4026531833),
                exited: true,
                ..PeerSummary::default()
            },
            PeerSummary {
                id: crate::timeline::ConnId(u64::MAX),
                ..PeerSummary::default()
            },
        ] {
            let mut c = c0.clone();
            c.peer = Some(peer);
            check(&c, None);
        }
        // Pods on either end, both, and none.
        let mut r = Rng(7);
        let mut c = c0.clone();
        c.peer = Some(PeerSummary {
            id: crate::timeline::ConnId(0x70),
            ..PeerSummary::default()
        });
        for _ in 0..20 {
            let ends = K8sEnds {
                conn: r.chance(3).then(|| pod(&mut r)).or(Some(pod(&mut r))),
                peer: (!r.chance(3)).then(|| pod(&mut r)),
            };
            check(&c, Some(&ends));
            let peer_only = K8sEnds {
                conn: None,
                peer: Some(pod(&mut r)),
            };
            check(&c, Some(&peer_only));
            check(&c0, Some(&ends));
        }
        check(&c, Some(&K8sEnds::default()));
        // The verdict: every closed_by, initiator, mechanism, confidence; awkward hints;
        // a middlebox of each shape.
        for _ in 0..200 {
            let mut c = c0.clone();
            let v = &mut c.verdict;
            v.closed_by = *r.pick(&[
                ClosedBy::Client,
                ClosedBy::Server,
                ClosedBy::Middlebox,
                ClosedBy::Unknown,
            ]);
            v.reason = reason(&mut r);
            v.tcp_initiator = *r.pick(&[Initiator::Local, Initiator::Remote, Initiator::None]);
            v.mechanism = *r.pick(&[
                Mechanism::Fin,
                Mechanism::Rst,
                Mechanism::Timeout,
                Mechanism::GoawayThenFin,
                Mechanism::GoawayThenRst,
                Mechanism::GoawayThenTimeout,
                Mechanism::PingTimeout,
                Mechanism::None,
            ]);
            v.confidence = *r.pick(&[Confidence::Low, Confidence::Medium, Confidence::High]);
            v.hint = r.text().into();
            v.middlebox = r.chance(2).then(|| middlebox(&mut r));
            check(&c, None);
        }
        // HTTP/2: none, a fresh tracker in each state, a busy one.
        for state in [
            H2State::Synced,
            H2State::Unsynced,
            H2State::NotH2,
            H2State::Tls,
        ] {
            let mut c = c0.clone();
            let mut h = H2Track::new(t0);
            h.state = state;
            h.idle_since_ns = None;
            c.conn.h2 = Some(Box::new(h));
            check(&c, None);
        }
        for debug in TEXTS {
            let mut c = c0.clone();
            let mut h = busy_h2(t0, debug);
            h.goaways
                .push(goaway(true, u64::MAX, ErrorCode(7), debug, Some(u64::MAX)));
            h.frames = u64::MAX;
            h.max_open_streams = usize::MAX;
            assert!(h.ping_sent.min_interval_ns().is_some() && h.ping_sent.unanswered() > 0);
            c.conn.h2 = Some(Box::new(h));
            c.conn.facts = every_fact(t0);
            check(&c, None);
        }
    }

    /// Random combinations of all the parts.
    #[test]
    fn random_records() {
        let c0 = base(9, "[fd00:9:1::2]:40000 > [fd00:9:2::2]:443");
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2_000 {
            let mut c = c0.clone();
            let t0 = *r.pick(&[0, 1_000 * MS, u64::MAX - 10]);
            c.conn.first_ns = t0;
            c.conn.opened_ns = r.chance(3).then(|| t0.saturating_add(*r.pick(&OFFSETS)));
            c.conn.closed_ns = (!r.chance(4)).then(|| t0.saturating_add(*r.pick(&OFFSETS)));
            let mut facts = every_fact(t0);
            let n = r.below(facts.len() + 1);
            for i in 0..facts.len() {
                let j = r.below(facts.len());
                facts.swap(i, j);
            }
            facts.truncate(n);
            c.conn.facts = facts;
            c.conn.ttl_baseline = r.chance(2).then(|| r.next() as u8);
            c.conn.tuple = match r.below(3) {
                0 => None,
                1 => Some(Tuple::new(
                    SocketAddr::from(([10, 0, r.next() as u8, 1], r.next() as u16)),
                    SocketAddr::from(([192, 168, 0, r.next() as u8], 443)),
                )),
                _ => Some(Tuple::new(
                    SocketAddr::from(([0xfd00, 0, 0, 0, 0, 0, 0, r.next() as u16], 1)),
                    SocketAddr::from(([0, 0, 0, 0, 0, 0xffff, 0x0a00, 1], 80)),
                )),
            };
            c.owner = r
                .chance(4)
                .then(|| (r.next() as u32, comm(r.text())))
                .or(c.owner.clone());
            c.conn.h2 = match r.below(3) {
                0 => None,
                1 => Some(Box::new(H2Track::new(t0))),
                _ => Some(Box::new(busy_h2(t0, r.text()))),
            };
            c.verdict.hint = r.text().into();
            c.verdict.reason = reason(&mut r);
            c.verdict.middlebox = r.chance(5).then(|| middlebox(&mut r));
            c.peer = r.chance(2).then(|| PeerSummary {
                id: crate::timeline::ConnId(r.next()),
                pid: r.chance(2).then(|| r.next() as u32),
                comm: r.chance(2).then(|| r.text().into()),
                netns: r.chance(2).then(|| r.next() as u32),
                exited: r.chance(2),
                ..PeerSummary::default()
            });
            let ends = K8sEnds {
                conn: r.chance(2).then(|| pod(&mut r)),
                peer: r.chance(2).then(|| pod(&mut r)),
            };
            check(&c, r.chance(2).then_some(&ends));
        }
    }

    /// Random event streams through the connection table: whatever records the table and
    /// the classifier make from them, the writer writes as serde does.
    #[test]
    fn random_event_streams() {
        use tracer_common::tcp_flag::PSH;
        const TUPLES: [&str; 4] = [
            "10.0.0.1:40000 > 10.0.0.2:443",
            "10.0.0.2:443 > 10.0.0.1:40000",
            "[fd00::1]:40001 > [fd00::2]:8080",
            "[fd00::2]:8080 > [fd00::1]:40001",
        ];
        // What the streams must have reached for the comparison to mean something.
        const SHAPES: [&str; 15] = [
            "\"what\":\"rst_received\"",
            "\"what\":\"rst_sent\"",
            "\"kernel_reason\":",
            "\"owner_exiting\":true",
            "\"what\":\"goaway_received\"",
            "\"what\":\"socket_error\"",
            "\"what\":\"retransmit\"",
            "\"what\":\"close_call\"",
            "\"what\":\"ttl_changed\"",
            "\"h2\":null",
            "\"h2\":{\"state\":\"synced\"",
            "\"h2\":{\"state\":\"tls\"",
            "\"dir\":\"sent\"",
            "\"peer\":{",
            "\\u001b",
        ];
        let mut seen = [0usize; SHAPES.len()];
        let mut r = Rng(42);
        let mut closes = 0;
        for _ in 0..40 {
            let mut tbl = Table::new(TableConfig {
                linger_ns: 50 * MS,
                rst_reason_names: [(2, "NO_SOCKET".into()), (5, "TCP_\"ABORT\"\\".into())]
                    .into_iter()
                    .collect(),
                ..TableConfig::default()
            });
            let mut ts = 1_000 * MS;
            let mut out = Vec::new();
            for _ in 0..400 {
                ts += *r.pick(&[0, 1, 999, 1_000_000, 30 * MS, 2_000 * MS]);
                let i = r.below(TUPLES.len());
                let sk = 0x1000 + i as u64;
                let (old, new) = (*r.pick(&STATES), *r.pick(&STATES));
                let kind = match r.below(12) {
                    0..=2 => EventKind::State { old, new },
                    3 => EventKind::Retransmit { state: old, err: 0 },
                    4 => EventKind::SendReset {
                        state: old,
                        reason: *r.pick(&[None, Some(2), Some(5), Some(99)]),
                    },
                    5 => EventKind::RecvReset,
                    6 => EventKind::ErrorReport {
                        error: *r.pick(&[32, 104, 110, 111, 7]),
                    },
                    7 => EventKind::CloseCall { state: old },
                    8 => EventKind::H2Proto {
                        dir: *r.pick(&[Dir::Egress, Dir::Ingress]),
                        seq: 0,
                        note: *r.pick(&[
                            ProtoNote::H2Preface,
                            ProtoNote::H2SettingsFirst,
                            ProtoNote::Tls,
                            ProtoNote::Other,
                            ProtoNote::Resynced,
                            ProtoNote::Desync,
                            ProtoNote::GaveUp,
                        ]),
                    },
                    9 => {
                        let kind = *r.pick(&[0u8, 1, 3, 4, 6, 7, 8]);
                        let mut payload = match kind {
                            3 => (r.next() as u32 % 16).to_be_bytes().to_vec(),
                            6 => vec![r.next() as u8 % 3; 8],
                            7 => {
                                let mut p = vec![0, 0, 0, 1];
                                p.extend_from_slice(&(r.next() as u32 % 14).to_be_bytes());
                                p.extend_from_slice(r.pick(&TEXTS).as_bytes());
                                p
                            }
                            _ => Vec::new(),
                        };
                        if r.chance(8) {
                            payload.truncate(3);
                        }
                        EventKind::H2Frame {
                            dir: *r.pick(&[Dir::Egress, Dir::Ingress]),
                            seq: 0,
                            head: frame(
                                payload.len() as u32,
                                kind,
                                *r.pick(&[0, 1, 4, 5]),
                                *r.pick(&[0, 1, 3, 5]),
                            ),
                            payload: Bytes::from(payload),
                        }
                    }
                    _ => EventKind::Packet(Packet {
                        dir: *r.pick(&[Dir::Egress, Dir::Ingress]),
                        flags: *r.pick(&[
                            SYN,
                            SYN | ACK,
                            ACK,
                            FIN | ACK,
                            RST,
                            RST | ACK,
                            PSH | ACK,
                        ]),
                        ttl: *r.pick(&[0, 63, 64, 250]),
                        seq: r.next() as u32,
                        ack: 0,
                        payload_len: *r.pick(&[0, 100]),
                        first_in_dir: r.chance(3),
                        ttl_changed: r.chance(4),
                        has_state: r.chance(2),
                        last_data_ns: r.chance(2).then(|| ts.saturating_sub(r.next() % MS)),
                        cgroup_id: 0,
                    }),
                };
                let e = ev(
                    ts,
                    sk,
                    TUPLES[i],
                    kind,
                    *r.pick(&[0, 42, 43]),
                    r.text(),
                    r.chance(10),
                );
                out.extend(tbl.on_event(&e));
                if r.chance(20) {
                    out.extend(tbl.take_due(ts));
                }
            }
            out.extend(tbl.take_all_closed());
            for c in &out {
                check(c, None);
                let line = String::from_utf8(
                    serde_json::to_vec(&CloseObject {
                        closed: c,
                        clock: &clock(),
                        k8s: None,
                    })
                    .expect("serde"),
                )
                .expect("utf-8");
                for (i, shape) in SHAPES.iter().enumerate() {
                    seen[i] += usize::from(line.contains(shape));
                }
            }
            closes += out.len();
        }
        eprintln!("{closes} records; shapes: {seen:?}");
        for (shape, n) in SHAPES.iter().zip(seen) {
            assert!(n > 0, "no record with {shape} among {closes}");
        }
    }

    /// The enums written by name in close.rs: one check per variant.
    #[test]
    fn enum_names_are_the_serde_names() {
        let mut c = base(3, "10.0.0.1:1 > 10.0.0.2:2");
        for i in [Initiator::Local, Initiator::Remote, Initiator::None] {
            c.verdict.tcp_initiator = i;
            check(&c, None);
        }
        for origin in ORIGINS {
            c.conn.facts = vec![Fact {
                at_ns: c.conn.first_ns,
                kind: FactKind::RstReceived {
                    ttl: 1,
                    origin,
                    sender_reason: None,
                },
            }];
            check(&c, None);
        }
        for state in [
            H2State::Synced,
            H2State::Unsynced,
            H2State::NotH2,
            H2State::Tls,
        ] {
            let mut h = H2Track::new(0);
            h.state = state;
            c.conn.h2 = Some(Box::new(h));
            check(&c, None);
        }
        for role in [Role::Client, Role::Server, Role::Unknown] {
            c.conn.role = role;
            check(&c, None);
        }
    }

    /// What the pipeline does: one reused buffer, one line per record.
    #[test]
    fn reused_buffer_holds_one_line() {
        let c = base(4, "10.0.0.1:1 > 10.0.0.2:2");
        let clock = clock();
        let obj = CloseObject {
            closed: &c,
            clock: &clock,
            k8s: None,
        };
        let mut line = Vec::new();
        for _ in 0..3 {
            line.clear();
            obj.write_json(&mut line).expect("write");
            assert_eq!(line, serde_json::to_vec(&obj).expect("serde"));
            assert!(!line.contains(&b'\n'));
        }
        let v: Value = serde_json::from_slice(&line).expect("valid JSON");
        assert_eq!(v["conn"]["family"], "ipv4");
    }
}
