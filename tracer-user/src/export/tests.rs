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
        last_data_ns: None,
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
