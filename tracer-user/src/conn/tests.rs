//! Connection-table tests: synthetic kernel event streams in the order the kernel emits them.

use std::net::SocketAddr;

use super::*;
use crate::{
    classify::{self, ClosedBy, Initiator, Mechanism},
    event::{Dir, ECONNRESET, ETIMEDOUT, Packet, TcpState},
    timeline::{FactKind, RstOrigin},
};
use tracer_common::tcp_flag::{ACK, FIN, RST, SYN};

const MS: u64 = 1_000_000;

fn tuple(local: &str, remote: &str) -> Tuple {
    Tuple::new(
        local.parse::<SocketAddr>().expect("local"),
        remote.parse::<SocketAddr>().expect("remote"),
    )
}

fn base(ts: u64, sk: u64, t: Option<Tuple>, kind: EventKind) -> Event {
    Event {
        ts_ns: ts,
        skaddr: sk,
        cookie: 0,
        pid: 0,
        tid: 0,
        comm: "".into(),
        exiting: false,
        netns: Some(4026531993),
        tuple: t,
        cpu: 0,
        kind,
    }
}

fn state(ts: u64, sk: u64, t: Tuple, old: TcpState, new: TcpState) -> Event {
    base(ts, sk, Some(t), EventKind::State { old, new })
}

fn by(mut ev: Event, pid: u32, comm: &str, exiting: bool) -> Event {
    ev.pid = pid;
    ev.tid = pid;
    ev.comm = comm.into();
    ev.exiting = exiting;
    ev
}

fn pkt(ts: u64, sk: u64, t: Tuple, dir: Dir, flags: u8, seq: u32, ttl: u8) -> Event {
    base(
        ts,
        sk,
        Some(t),
        EventKind::Packet(Packet {
            dir,
            flags,
            ttl,
            seq,
            ack: 0,
            payload_len: 0,
            first_in_dir: false,
            ttl_changed: false,
            has_state: false,
            last_data_ns: None,
            cgroup_id: 0,
        }),
    )
}

struct Pair {
    c: u64,
    s: u64,
    ct: Tuple,
    st: Tuple,
    cisn: u32,
    sisn: u32,
}

/// A client and a server socket on this host completing a handshake.
fn handshake(tbl: &mut Table, p: &Pair, netns: (u32, u32)) {
    handshake_by(tbl, p, netns, 100, "client");
}

/// [`handshake`] with the connecting process named.
fn handshake_by(tbl: &mut Table, p: &Pair, netns: (u32, u32), pid: u32, comm: &str) {
    for ev in handshake_events(p, netns, pid, comm) {
        assert!(tbl.on_event(&ev).is_empty());
    }
}

/// The events of [`handshake_by`].
fn handshake_events(p: &Pair, netns: (u32, u32), pid: u32, comm: &str) -> Vec<Event> {
    use Dir::*;
    use TcpState::*;
    let mut evs = vec![
        // SYN_SENT is entered before the local port is chosen.
        by(
            state(
                0,
                p.c,
                Tuple::new(SocketAddr::new(p.ct.local().ip(), 0), p.ct.remote()),
                Close,
                SynSent,
            ),
            pid,
            comm,
            false,
        ),
        pkt(1, p.c, p.ct, Egress, SYN, p.cisn, 64),
        state(2, p.s, p.st, Listen, SynRecv),
        pkt(3, p.c, p.ct, Ingress, SYN | ACK, p.sisn, 63),
        state(3, p.c, p.ct, SynSent, Established),
        state(4, p.s, p.st, SynRecv, Established),
        pkt(5, p.s, p.st, Ingress, ACK, p.cisn.wrapping_add(1), 63),
        pkt(6, p.s, p.st, Egress, ACK, p.sisn.wrapping_add(1), 64),
    ];
    for ev in &mut evs {
        ev.netns = Some(if ev.skaddr == p.c { netns.0 } else { netns.1 });
    }
    evs
}

fn pair(n: u64) -> Pair {
    let ct = tuple("10.9.1.2:40000", "10.9.2.2:8080");
    Pair {
        c: 0x1000 + n,
        s: 0x2000 + n,
        ct,
        st: ct.reversed(),
        cisn: (n as u32).wrapping_mul(0x3b9a_ca07),
        sisn: (n as u32).wrapping_mul(0x9e37_79b9),
    }
}

fn only(v: &[Closed], sk: u64) -> &Closed {
    let found: Vec<_> = v.iter().filter(|c| c.conn.skaddr == sk).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one verdict for {sk:#x}, got {v:#?}"
    );
    found[0]
}

#[test]
fn client_close_both_sides() {
    let mut tbl = Table::default();
    let p = pair(1);
    handshake(&mut tbl, &p, (1, 2));
    for ev in client_close_events(&p, 100 * MS) {
        tbl.on_event(&ev);
    }
    assert!(
        tbl.take_due(500 * MS).is_empty(),
        "nothing is due before the linger period"
    );
    let out = tbl.take_due(2_000 * MS);
    let c = only(&out, p.c);
    assert_eq!(
        (c.verdict.closed_by, c.verdict.reason.as_str()),
        (ClosedBy::Client, "client_close")
    );
    assert_eq!(c.verdict.tcp_initiator, Initiator::Local);
    assert_eq!(c.owner, Some((100, "client".into())));
    assert_eq!(c.conn.role, Role::Client);
    assert_eq!(
        c.conn.tuple,
        Some(p.ct),
        "the local port learned after SYN_SENT replaces the zero port"
    );
    let s = only(&out, p.s);
    assert_eq!(
        (s.verdict.closed_by, s.verdict.reason.as_str()),
        (ClosedBy::Client, "client_close")
    );
    assert_eq!(s.verdict.tcp_initiator, Initiator::Remote);
    assert_eq!(s.owner, Some((200, "server".into())));
    assert_eq!(s.peer.as_ref().map(|p| p.id), Some(c.conn.id));
    assert!(tbl.is_empty());
}

/// The server process is killed with unread data at 50 ms: its socket resets the
/// connection, the RST reaches the client.
fn killed_server_events(p: &Pair) -> Vec<Event> {
    use Dir::*;
    use TcpState::*;
    vec![
        by(
            state(50 * MS, p.s, p.st, Established, Close),
            200,
            "server",
            true,
        ),
        by(
            base(
                50 * MS,
                p.s,
                Some(p.st),
                EventKind::SendReset {
                    state: Established,
                    reason: Some(1),
                },
            ),
            200,
            "server",
            true,
        ),
        pkt(50 * MS, p.s, p.st, Egress, RST | ACK, p.sisn + 1, 64),
        pkt(50 * MS + 10, p.c, p.ct, Ingress, RST | ACK, p.sisn + 1, 63),
        base(
            50 * MS + 11,
            0,
            Some(p.ct),
            EventKind::ErrorReport { error: ECONNRESET },
        ),
        state(50 * MS + 12, p.c, p.ct, Established, Close),
    ]
}

#[test]
fn killed_server_with_unread_data() {
    let mut tbl = Table::default();
    let p = pair(2);
    handshake(&mut tbl, &p, (1, 2));
    for ev in killed_server_events(&p) {
        tbl.on_event(&ev);
    }
    let out = tbl.take_all_closed();
    let s = only(&out, p.s);
    assert_eq!(
        (s.verdict.closed_by, s.verdict.reason.as_str()),
        (ClosedBy::Server, "server_process_exit")
    );
    assert_eq!(s.verdict.mechanism, Mechanism::Rst);
    assert_eq!(s.owner, Some((200, "server".into())));
    let c = only(&out, p.c);
    assert_eq!(
        (c.verdict.closed_by, c.verdict.reason.as_str()),
        (ClosedBy::Server, "server_process_exit")
    );
    assert_eq!(c.verdict.tcp_initiator, Initiator::Remote);
    assert!(
        c.conn
            .facts
            .iter()
            .any(|f| f.kind == FactKind::SocketError { errno: ECONNRESET }),
        "the error report is attached by tuple: {:?}",
        c.conn.facts
    );
}

#[test]
fn forged_rst_is_middlebox_when_peer_is_traced() {
    use Dir::*;
    use TcpState::*;
    let mut tbl = Table::default();
    let p = pair(3);
    handshake(&mut tbl, &p, (1, 2));
    for ev in [
        pkt(60 * MS, p.c, p.ct, Ingress, RST, p.sisn + 1, 64),
        base(60 * MS, p.c, Some(p.ct), EventKind::RecvReset),
        state(60 * MS, p.c, p.ct, Established, Close),
    ] {
        tbl.on_event(&ev);
    }
    let out = tbl.take_all_closed();
    let c = only(&out, p.c);
    assert_eq!(
        (c.verdict.closed_by, c.verdict.reason.as_str()),
        (ClosedBy::Middlebox, "middlebox_reset")
    );
    assert_eq!(c.verdict.confidence, classify::Confidence::High);
    let rsts = c
        .conn
        .facts
        .iter()
        .filter(|f| matches!(f.kind, FactKind::RstReceived { .. }))
        .count();
    assert_eq!(
        rsts, 1,
        "tracepoint and segment are one RST: {:?}",
        c.conn.facts
    );
    assert_eq!(tbl.len(), 1, "the server socket is still open");
}

#[test]
fn blackhole_timeout_with_live_peer() {
    use TcpState::*;
    let mut tbl = Table::default();
    let p = pair(4);
    handshake(&mut tbl, &p, (1, 2));
    for i in 0..4 {
        tbl.on_event(&base(
            (100 + i * 200) * MS,
            p.c,
            Some(p.ct),
            EventKind::Retransmit {
                state: Established,
                err: 0,
            },
        ));
    }
    tbl.on_event(&base(
        1000 * MS,
        0,
        Some(p.ct),
        EventKind::ErrorReport { error: ETIMEDOUT },
    ));
    tbl.on_event(&state(1000 * MS, p.c, p.ct, Established, Close));
    let out = tbl.take_due(2000 * MS);
    let c = only(&out, p.c);
    // The server socket is still open on this host: the path, proven.
    assert_eq!(
        (c.verdict.closed_by, c.verdict.reason.as_str()),
        (ClosedBy::Middlebox, "path_blackhole")
    );
    assert_eq!(c.verdict.confidence, classify::Confidence::High);
    assert_eq!(c.conn.retransmits, 4);
    let mb = c.verdict.middlebox.as_ref().expect("middlebox object");
    assert_eq!(mb.kind, classify::MiddleboxKind::Path);
    assert_eq!((mb.detected_by, mb.after_ms), (Some("client"), Some(900)));

    // The path heals; the server's next segment draws the client kernel's no-socket RST.
    use Dir::*;
    for ev in [
        pkt(5000 * MS, 0, p.ct, Egress, RST, p.cisn + 50, 64),
        pkt(5000 * MS, p.s, p.st, Ingress, RST, p.cisn + 50, 63),
        base(5000 * MS, p.s, Some(p.st), EventKind::RecvReset),
        state(5000 * MS, p.s, p.st, Established, Close),
    ] {
        tbl.on_event(&ev);
    }
    let out = tbl.take_all_closed();
    let s = only(&out, p.s);
    assert_eq!(
        (s.verdict.closed_by, s.verdict.reason.as_str()),
        (ClosedBy::Middlebox, "path_blackhole"),
        "the RST is the echo of the client's timeout, not a client decision: {:#?}",
        s.verdict
    );
    assert_eq!(s.verdict.confidence, classify::Confidence::High);
    assert_eq!(s.verdict.tcp_initiator, Initiator::Remote);
    assert!(
        s.verdict
            .hint
            .contains("4 unanswered retransmissions after 900 ms")
    );
}

mod mbox;
mod reuse;

#[test]
fn identical_addresses_in_two_namespaces_stay_apart() {
    use Dir::*;
    use TcpState::*;
    let mut tbl = Table::default();
    let a = pair(5);
    let mut b = pair(6);
    b.ct = a.ct;
    b.st = a.st;
    handshake(&mut tbl, &a, (11, 12));
    handshake(&mut tbl, &b, (21, 22));
    // A: client closes. B: server closes. Same tuples, same instant, and an error report
    // whose tuple matches both clients.
    for ev in [
        by(
            state(10 * MS, a.c, a.ct, Established, FinWait1),
            1,
            "a-client",
            false,
        ),
        pkt(10 * MS, a.c, a.ct, Egress, FIN | ACK, a.cisn + 1, 64),
        pkt(10 * MS, a.s, a.st, Ingress, FIN | ACK, a.cisn + 1, 63),
        state(10 * MS, a.s, a.st, Established, CloseWait),
        by(
            state(10 * MS, b.s, b.st, Established, FinWait1),
            2,
            "b-server",
            false,
        ),
        pkt(10 * MS, b.s, b.st, Egress, FIN | ACK, b.sisn + 1, 64),
        pkt(10 * MS, b.c, b.ct, Ingress, FIN | ACK, b.sisn + 1, 63),
        state(10 * MS, b.c, b.ct, Established, CloseWait),
        by(
            state(11 * MS, a.s, a.st, CloseWait, LastAck),
            3,
            "a-server",
            false,
        ),
        state(12 * MS, a.s, a.st, LastAck, Close),
        state(12 * MS, a.c, a.ct, FinWait2, Close),
        by(
            state(11 * MS, b.c, b.ct, CloseWait, LastAck),
            4,
            "b-client",
            false,
        ),
        state(12 * MS, b.c, b.ct, LastAck, Close),
        state(12 * MS, b.s, b.st, FinWait2, Close),
    ] {
        tbl.on_event(&ev);
    }
    let out = tbl.take_all_closed();
    assert_eq!(out.len(), 4);
    let (ac, as_, bc, bs) = (
        only(&out, a.c),
        only(&out, a.s),
        only(&out, b.c),
        only(&out, b.s),
    );
    assert_eq!(ac.verdict.reason, "client_close");
    assert_eq!(as_.verdict.reason, "client_close");
    assert_eq!(bc.verdict.reason, "server_close");
    assert_eq!(bs.verdict.reason, "server_close");
    assert_eq!((ac.conn.netns, bc.conn.netns), (Some(11), Some(21)));
    // Peers are matched by sequence space, not just by the (identical) tuples.
    assert_eq!(as_.peer.as_ref().map(|p| p.id), Some(ac.conn.id));
    assert_eq!(bs.peer.as_ref().map(|p| p.id), Some(bc.conn.id));
    let mut ids: Vec<_> = out.iter().map(|c| c.conn.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4);
}

#[test]
fn address_reuse_retires_the_old_connection_until_the_next_tick() {
    use TcpState::*;
    let mut tbl = Table::default();
    let t1 = tuple("127.0.0.1:40001", "127.0.0.1:80");
    tbl.on_event(&state(0, 0x99, t1, Close, SynSent));
    tbl.on_event(&state(1, 0x99, t1, SynSent, Established));
    tbl.on_event(&state(2, 0x99, t1, Established, FinWait1));
    tbl.on_event(&state(3, 0x99, t1, FinWait2, Close));
    let early = tbl.on_event(&state(
        4,
        0x99,
        tuple("127.0.0.1:40002", "127.0.0.1:80"),
        Close,
        SynSent,
    ));
    assert!(
        early.is_empty(),
        "judged before the drop total was read: {early:?}"
    );
    assert_eq!(tbl.len(), 1, "the new socket is tracked");
    // The next tick judges the retired record even though its linger is not over.
    let out = tbl.take_due(5);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].verdict.reason, "client_close");
    assert_eq!(out[0].verdict.confidence, classify::Confidence::High);
    assert!(!out[0].conn.gap);
    assert_eq!(tbl.stats.ends_unseen, 0);
    assert_eq!(tbl.len(), 1);
}

/// The CI failure this guards: under a flood, a lingering record was judged the moment its
/// address was reused, before the tick that read the ring buffer's drop total, so a record
/// missing half its transitions came out `high`.
#[test]
fn reused_address_verdict_sees_drops_noted_at_the_next_tick() {
    use TcpState::*;
    let mut tbl = Table::default();
    let t1 = tuple("127.0.0.1:80", "127.0.0.1:40001");
    tbl.on_event(&state(0, 0x99, t1, Listen, SynRecv));
    // SYN_RECV -> ESTABLISHED and ESTABLISHED -> CLOSE_WAIT were lost.
    tbl.on_event(&state(3 * MS, 0x99, t1, CloseWait, LastAck));
    tbl.on_event(&state(4 * MS, 0x99, t1, LastAck, Close));
    let reused = tuple("127.0.0.1:80", "127.0.0.1:40002");
    assert!(
        tbl.on_event(&state(5 * MS, 0x99, reused, Listen, SynRecv))
            .is_empty()
    );
    tbl.note_events_lost(100 * MS, 7);
    let out = tbl.take_due(100 * MS);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_ne!(
        out[0].verdict.confidence,
        classify::Confidence::High,
        "{:#?}",
        out[0].verdict
    );
}

/// A record still open when its address is reused lost its CLOSE: it is judged with its end
/// unseen, never `high`, and counted.
#[test]
fn reuse_of_an_open_record_marks_its_end_unseen() {
    use TcpState::*;
    let mut tbl = Table::default();
    let t1 = tuple("127.0.0.1:40001", "127.0.0.1:80");
    tbl.on_event(&state(0, 0x99, t1, Close, SynSent));
    tbl.on_event(&state(1, 0x99, t1, SynSent, Established));
    tbl.on_event(&state(2, 0x99, t1, Established, FinWait1));
    // FIN_WAIT1 -> ... -> CLOSE lost; a new socket is born at the address.
    let t2 = tuple("127.0.0.1:40002", "127.0.0.1:80");
    tbl.on_event(&state(3, 0x99, t2, Close, SynSent));
    let out = tbl.take_due(4);
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(out[0].conn.gap);
    assert_eq!(out[0].conn.closed_ns, Some(2));
    assert_ne!(out[0].verdict.confidence, classify::Confidence::High);
    assert_eq!(tbl.stats.ends_unseen, 1);
    assert_eq!(tbl.len(), 1);
}

/// Two sockets at one address, the first one's CLOSE and the second one's opening both lost:
/// an event whose addresses are not the record's starts a new record instead of merging the
/// second socket's FIN into the first one's story (a client's close read as the server's).
#[test]
fn other_addresses_at_the_same_socket_split_the_record() {
    use TcpState::*;
    let mut tbl = Table::default();
    let server = tuple("127.0.0.1:8080", "127.0.0.1:40001");
    tbl.on_event(&state(0, 0x77, server, Listen, SynRecv));
    tbl.on_event(&state(1, 0x77, server, SynRecv, Established));
    // Lost: the server socket's CLOSE, the client socket's CLOSE -> SYN_SENT -> ESTABLISHED.
    let client = tuple("127.0.0.1:40002", "127.0.0.1:8080");
    tbl.on_event(&by(
        state(10 * MS, 0x77, client, Established, FinWait1),
        42,
        "client",
        false,
    ));
    tbl.on_event(&state(11 * MS, 0x77, client, FinWait1, FinWait2));
    tbl.on_event(&state(12 * MS, 0x77, client, FinWait2, Close));
    let out = tbl.take_all_closed();
    assert_eq!(out.len(), 2, "{out:?}");
    let old = out
        .iter()
        .find(|c| c.conn.tuple == Some(server))
        .expect("old");
    let new = out
        .iter()
        .find(|c| c.conn.tuple == Some(client))
        .expect("new");
    assert!(old.conn.gap && new.conn.gap);
    assert!(
        !old.conn
            .has(|k| matches!(k, FactKind::State { to: FinWait1, .. })),
        "the client's FIN is not the server's"
    );
    assert_eq!(new.conn.role, Role::Client);
    for c in &out {
        assert_ne!(
            c.verdict.confidence,
            classify::Confidence::High,
            "{:#?}",
            c.verdict
        );
    }
    assert_eq!(tbl.stats.ends_unseen, 1);
}

/// OUTPUT-chain DNAT: the socket's state changes name the Service address, its packets the
/// backend. That is one socket, not an address reuse.
#[test]
fn translated_packet_addresses_do_not_split_a_record() {
    use Dir::*;
    use TcpState::*;
    let mut tbl = Table::default();
    let vip = tuple("10.0.0.1:40000", "10.96.0.10:80");
    let backend = tuple("10.0.0.1:40000", "10.0.2.2:8080");
    tbl.on_event(&state(0, 0x31, vip, Close, SynSent));
    tbl.on_event(&pkt(1, 0x31, backend, Egress, SYN, 1000, 64));
    tbl.on_event(&state(2, 0x31, vip, SynSent, Established));
    tbl.on_event(&pkt(3, 0x31, backend, Ingress, FIN | ACK, 5000, 63));
    tbl.on_event(&state(4, 0x31, vip, Established, CloseWait));
    tbl.on_event(&state(5, 0x31, vip, CloseWait, LastAck));
    tbl.on_event(&state(6, 0x31, vip, LastAck, Close));
    let out = tbl.take_all_closed();
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(!out[0].conn.gap);
    assert!(!out[0].conn.preexisting);
    assert_eq!(tbl.stats.ends_unseen, 0);
}

fn note(ts: u64, sk: u64, t: Tuple, note: crate::event::ProtoNote) -> Event {
    base(
        ts,
        sk,
        Some(t),
        EventKind::H2Proto {
            dir: Dir::Egress,
            seq: 0,
            note,
        },
    )
}

/// A socket whose payload is TLS or not HTTP/2 keeps that inline, without a boxed tracker
/// (about 400 bytes per socket, bench-live), and reads as the tracker the box would have
/// held; a later note that needs the tracker boxes it with the state it had. The verdict
/// reads it too: TLS is opaque evidence.
#[test]
fn opaque_payload_needs_no_boxed_tracker() {
    use crate::{conn::h2::H2State, event::ProtoNote};
    use TcpState::*;
    let t = tuple("10.0.0.1:45000", "10.0.0.2:443");
    let open = |tbl: &mut Table, sk: u64| {
        tbl.on_event(&by(state(0, sk, t, Close, SynSent), 9, "curl", false));
        tbl.on_event(&state(MS, sk, t, SynSent, Established));
    };
    let mut tbl = Table::new(TableConfig {
        linger_ns: 0,
        max_conns: 16,
        ..TableConfig::default()
    });
    open(&mut tbl, 0x42);
    tbl.on_event(&note(2 * MS, 0x42, t, ProtoNote::Tls));
    let c = &tbl.conns[&0x42];
    assert!(c.h2.is_none(), "a TLS socket got a boxed tracker");
    let view = c.h2_view().expect("the TLS state reads as a tracker");
    assert_eq!(view.state, H2State::Tls);
    assert_eq!(
        view.idle_since_ns,
        Some(0),
        "the tracker starts at the opening"
    );
    tbl.on_event(&by(
        state(3 * MS, 0x42, t, Established, FinWait1),
        9,
        "curl",
        false,
    ));
    tbl.on_event(&state(4 * MS, 0x42, t, FinWait2, Close));
    let out = tbl.take_all_closed();
    let closed = only(&out, 0x42);
    assert!(
        closed.verdict.hint.contains("TLS"),
        "the verdict did not see the TLS state: {:?}",
        closed.verdict
    );

    // Not HTTP/2, then a note that needs the tracker: boxed, with the state it had.
    open(&mut tbl, 0x43);
    tbl.on_event(&note(2 * MS, 0x43, t, ProtoNote::Other));
    assert!(tbl.conns[&0x43].h2.is_none());
    tbl.on_event(&note(3 * MS, 0x43, t, ProtoNote::GaveUp));
    let c = &tbl.conns[&0x43];
    let boxed = c.h2.as_deref().expect("GaveUp needs the tracker");
    assert_eq!(boxed.state, H2State::NotH2);
    assert_eq!(boxed.idle_since_ns, Some(0));
    assert!(c.h2_opaque.is_none(), "the inline state outlived its box");
}

fn goaway_in(ts: u64, sk: u64) -> Event {
    base(
        ts,
        sk,
        None,
        EventKind::H2Frame {
            dir: Dir::Ingress,
            seq: 0,
            head: [0, 0, 8, 7, 0, 0, 0, 0, 0],
            payload: bytes::Bytes::from_static(&[0, 0, 0, 0, 0, 0, 0, 0]),
        },
    )
}

fn goaway_facts(c: &Conn) -> Vec<usize> {
    (0..c.facts.len())
        .filter(|&i| matches!(c.facts[i].kind, FactKind::GoAway(_)))
        .collect()
}

/// HTTP/2 events of a socket the table has not met wait for it: a connection open since
/// before the agent, whose first lifecycle event is its end, still has the GOAWAY it
/// received (before its end in the evidence); a new connection at the same address takes
/// only events from after its opening; a socket with many frames and no lifecycle event is
/// met mid-life at once.
#[test]
fn http2_events_before_the_first_lifecycle_event_wait_for_it() {
    use TcpState::*;
    let t = tuple("10.0.0.1:45000", "10.0.0.2:443");
    let mut tbl = Table::new(TableConfig {
        linger_ns: 0,
        max_conns: 16,
        ..TableConfig::default()
    });
    // Open before the agent: the GOAWAY, then the peer's FIN moves it to CLOSE_WAIT.
    tbl.on_event(&goaway_in(MS, 0x42));
    assert!(
        !tbl.conns.contains_key(&0x42),
        "met before any lifecycle event"
    );
    tbl.on_event(&state(2 * MS, 0x42, t, Established, CloseWait));
    let c = &tbl.conns[&0x42];
    assert_eq!(
        goaway_facts(c),
        vec![0],
        "the GOAWAY waited and comes first"
    );
    assert_eq!(
        c.h2_view().map(|h| h.state),
        Some(crate::conn::h2::H2State::Synced)
    );

    // A stale event at an address, then a new connection there: not taken.
    tbl.on_event(&goaway_in(3 * MS, 0x43));
    tbl.on_event(&by(
        state(4 * MS, 0x43, t, Close, SynSent),
        9,
        "curl",
        false,
    ));
    tbl.on_event(&goaway_in(5 * MS, 0x43));
    assert_eq!(
        goaway_facts(&tbl.conns[&0x43]).len(),
        1,
        "the stale GOAWAY was taken"
    );

    // Many frames (PINGs), no lifecycle event: met mid-life.
    let ping = |ts: u64| {
        let mut ev = goaway_in(ts, 0x44);
        if let EventKind::H2Frame { ref mut head, .. } = ev.kind {
            head[3] = 6;
        }
        ev
    };
    for i in 0..super::early::EARLY_H2_EVENTS as u64 {
        tbl.on_event(&ping(10 * MS + i));
        assert!(!tbl.conns.contains_key(&0x44));
    }
    tbl.on_event(&ping(20 * MS));
    let c = &tbl.conns[&0x44];
    assert!(c.preexisting, "met mid-life");
    assert_eq!(
        c.h2_view().map(|h| h.frames),
        Some(super::early::EARLY_H2_EVENTS as u64 + 1),
        "the waiting events were lost"
    );

    // As many sockets waiting as the table keeps: the next one is met at its first event.
    let mut tbl = Table::new(TableConfig {
        linger_ns: 0,
        max_conns: 16,
        ..TableConfig::default()
    });
    for sk in 0..super::early::MAX_EARLY_SOCKETS as u64 {
        tbl.on_event(&goaway_in(MS, 0x1000 + sk));
    }
    assert!(tbl.conns.is_empty());
    tbl.on_event(&goaway_in(2 * MS, 0x42));
    assert_eq!(
        tbl.conns.get(&0x42).map(|c| goaway_facts(c).len()),
        Some(1),
        "a socket past the waiting room lost its event"
    );
}

#[test]
fn preexisting_connection_gets_inferred_role() {
    use TcpState::*;
    let mut tbl = Table::new(TableConfig {
        linger_ns: 0,
        max_conns: 16,
        ..TableConfig::default()
    });
    let t = tuple("10.0.0.1:45000", "10.0.0.2:443");
    tbl.on_event(&by(
        state(0, 0x42, t, Established, FinWait1),
        9,
        "curl",
        false,
    ));
    tbl.on_event(&state(1, 0x42, t, FinWait2, Close));
    let out = tbl.take_all_closed();
    let c = only(&out, 0x42);
    assert!(c.conn.preexisting);
    assert_eq!(c.conn.role, Role::Client);
    assert_eq!(c.verdict.reason, "client_close");
    assert_eq!(
        c.verdict.confidence,
        classify::Confidence::Medium,
        "inferred roles lower confidence"
    );
}

/// A connection open before the agent is met at its first data or ACK segment after the
/// start (so that `conns` lists it while it lives), with the facts of that segment; its
/// record then goes on to its verdict. Control segments of an unknown socket, a listener's
/// segments and sockets the full table refused are not met this way.
#[test]
fn preexisting_connection_is_met_at_its_first_data_segment() {
    use Dir::*;
    use TcpState::*;
    let mut tbl = Table::new(TableConfig {
        linger_ns: 0,
        max_conns: 2,
        ..TableConfig::default()
    });
    let t = tuple("10.0.0.1:45000", "10.0.0.2:443");
    let mut first = pkt(MS, 0x42, t, Ingress, ACK, 1000, 61);
    if let EventKind::Packet(ref mut p) = first.kind {
        p.first_in_dir = true;
        p.payload_len = 9;
        p.last_data_ns = Some(MS);
    }
    tbl.on_event(&first);
    let c = tbl.conns.get(&0x42).expect("met at its first data segment");
    assert!(c.preexisting && c.opened_ns.is_none());
    assert_eq!(c.role, Role::Client, "role from the ports");
    assert_eq!(c.state_name(), "UNKNOWN", "no state change seen yet");
    assert_eq!(c.ttl_baseline, Some(61));
    assert_eq!(c.ingress_seq0, Some(1000));
    assert_eq!(c.last_data_ns.map(|t| t.get()), Some(MS));
    let id = c.id;
    tbl.on_event(&goaway_in(2 * MS, 0x42));
    assert_eq!(goaway_facts(&tbl.conns[&0x42]), vec![0]);
    tbl.on_event(&state(3 * MS, 0x42, t, Established, CloseWait));
    assert_eq!(tbl.conns[&0x42].state_name(), "CLOSE_WAIT");
    tbl.on_event(&by(
        state(4 * MS, 0x42, t, CloseWait, LastAck),
        9,
        "app",
        false,
    ));
    tbl.on_event(&state(5 * MS, 0x42, t, LastAck, Close));
    let out = tbl.take_all_closed();
    let v = only(&out, 0x42);
    assert_eq!(
        v.conn.id, id,
        "one record from the first segment to the verdict"
    );
    assert!(v.conn.preexisting);

    // Not met: an unknown socket's FIN, RST or SYN, a socket without address, a listener's
    // final handshake ACK.
    let u = tuple("10.0.0.1:45001", "10.0.0.2:443");
    for (sk, flags) in [(0x50, FIN | ACK), (0x51, RST), (0x52, SYN), (0, ACK)] {
        tbl.on_event(&pkt(6 * MS, sk, u, Egress, flags, 7, 64));
        assert!(!tbl.conns.contains_key(&sk), "met at flags {flags:#x}");
    }
    let l = tuple("0.0.0.0:443", "0.0.0.0:0");
    tbl.on_event(&state(7 * MS, 0x60, l, Close, Listen));
    tbl.on_event(&pkt(8 * MS, 0x60, u, Ingress, ACK, 8, 64));
    assert!(
        !tbl.conns.contains_key(&0x60),
        "a listener became a connection"
    );
    assert_eq!(tbl.stats.conns_dropped, 0);

    // The table full: a further unknown socket is refused (counted once), not met later.
    tbl.on_event(&pkt(9 * MS, 0x70, u, Egress, ACK, 9, 64));
    tbl.on_event(&pkt(9 * MS, 0x71, u, Egress, ACK, 9, 64));
    assert_eq!(tbl.len(), 2);
    tbl.on_event(&pkt(10 * MS, 0x72, u, Ingress, ACK, 9, 64));
    tbl.on_event(&pkt(11 * MS, 0x72, u, Ingress, ACK, 10, 64));
    assert!(!tbl.conns.contains_key(&0x72));
    assert_eq!(tbl.stats.conns_dropped, 1);
}

/// The start-up walk lists a connection open before the agent with its state (`conns`
/// shows it at once, not UNKNOWN); the record goes on to its verdict. A socket whose own
/// events came first keeps its record (opened after the hooks: not pre-existing), and a
/// listener is not a connection.
#[test]
fn a_connection_in_the_start_up_walk_is_listed_with_its_state() {
    use TcpState::*;
    let mut tbl = Table::new(TableConfig {
        linger_ns: 0,
        ..TableConfig::default()
    });
    let existing = |ts, sk, t, state| {
        let cgroup_id = std::num::NonZeroU64::new(sk);
        base(ts, sk, Some(t), EventKind::Existing { state, cgroup_id })
    };
    let t = tuple("10.0.0.1:45000", "10.0.0.2:443");
    tbl.on_event(&existing(MS, 0x42, t, Established));
    let c = tbl.conns.get(&0x42).expect("listed from the walk");
    assert!(c.preexisting && c.opened_ns.is_none());
    assert_eq!(c.state_name(), "ESTABLISHED");
    assert_eq!(c.role, Role::Client, "role from the ports");
    assert_eq!(tbl.stats.conns_walked, 1);
    assert_eq!(
        c.cgroup_id.map(|c| c.get()),
        Some(0x42),
        "its pod's cgroup from the walk"
    );
    let id = c.id;
    // Its first segment after the walk: the same record.
    tbl.on_event(&pkt(2 * MS, 0x42, t, Dir::Ingress, ACK, 1000, 61));
    assert_eq!(tbl.len(), 1);
    tbl.on_event(&state(3 * MS, 0x42, t, Established, FinWait1));
    tbl.on_event(&state(4 * MS, 0x42, t, FinWait1, Close));
    let out = tbl.take_all_closed();
    let v = only(&out, 0x42);
    assert_eq!(v.conn.id, id, "one record from the walk to the verdict");
    assert!(v.conn.preexisting);

    // Opened after the hooks, walked after its SYN_SENT: the walk changes nothing.
    let n = tuple("10.0.0.1:45001", "10.0.0.2:443");
    tbl.on_event(&state(5 * MS, 0x43, n, Close, SynSent));
    tbl.on_event(&state(6 * MS, 0x43, n, SynSent, Established));
    tbl.on_event(&existing(7 * MS, 0x43, n, Established));
    let c = &tbl.conns[&0x43];
    assert!(!c.preexisting && c.opened_ns == Some(5 * MS));
    // Met at a segment first (UNKNOWN), then walked: the walk gives its state.
    let m = tuple("10.0.0.1:45002", "10.0.0.2:443");
    tbl.on_event(&pkt(8 * MS, 0x44, m, Dir::Egress, ACK, 5, 64));
    assert_eq!(tbl.conns[&0x44].state_name(), "UNKNOWN");
    tbl.on_event(&existing(9 * MS, 0x44, m, CloseWait));
    assert_eq!(tbl.conns[&0x44].state_name(), "CLOSE_WAIT");
    assert_eq!(tbl.stats.conns_walked, 1, "only records the walk opened");
    // A listener stays one.
    let l = tuple("0.0.0.0:443", "0.0.0.0:0");
    tbl.on_event(&state(10 * MS, 0x60, l, Close, Listen));
    tbl.on_event(&existing(11 * MS, 0x60, l, Established));
    assert!(!tbl.conns.contains_key(&0x60));
}

#[test]
fn table_full_counts_dropped_connections() {
    use TcpState::*;
    let mut tbl = Table::new(TableConfig {
        linger_ns: 0,
        max_conns: 1,
        ..TableConfig::default()
    });
    tbl.on_event(&state(
        0,
        1,
        tuple("127.0.0.1:40001", "127.0.0.1:80"),
        Close,
        SynSent,
    ));
    tbl.on_event(&state(
        0,
        2,
        tuple("127.0.0.1:40002", "127.0.0.1:80"),
        Close,
        SynSent,
    ));
    assert_eq!(tbl.len(), 1);
    assert_eq!(tbl.stats.conns_dropped, 1);
}

#[test]
fn listeners_do_not_become_connections() {
    use Dir::*;
    use TcpState::*;
    let mut tbl = Table::default();
    let l = tuple("0.0.0.0:80", "0.0.0.0:0");
    tbl.on_event(&state(0, 0x5, l, Close, Listen));
    tbl.on_event(&pkt(
        1,
        0x5,
        tuple("10.0.0.1:80", "10.0.0.2:5555"),
        Ingress,
        SYN,
        7,
        64,
    ));
    tbl.on_event(&pkt(
        2,
        0x5,
        tuple("10.0.0.1:80", "10.0.0.2:5555"),
        Egress,
        SYN | ACK,
        9,
        64,
    ));
    assert!(tbl.is_empty());
    tbl.on_event(&state(3, 0x5, l, Listen, Close));
    assert!(tbl.take_all_closed().is_empty());
}

#[test]
fn no_socket_reset_carries_the_kernel_reason() {
    use TcpState::*;
    let mut tbl = Table::new(TableConfig {
        rst_reason_names: [(1, "NO_SOCKET".to_string())].into_iter().collect(),
        ..TableConfig::default()
    });
    let ct = tuple("127.0.0.1:40100", "127.0.0.1:9");
    tbl.on_event(&state(0, 0x77, ct, Close, SynSent));
    tbl.on_event(&pkt(1, 0x77, ct, Dir::Egress, SYN, 500, 64));
    // The kernel answers from no socket: tracepoint first, then the segment, from a control socket.
    tbl.on_event(&base(
        2,
        0,
        Some(ct.reversed()),
        EventKind::SendReset {
            state: Close,
            reason: Some(1),
        },
    ));
    tbl.on_event(&pkt(
        2,
        0xdead,
        ct.reversed(),
        Dir::Egress,
        RST | ACK,
        0,
        64,
    ));
    tbl.on_event(&pkt(3, 0x77, ct, Dir::Ingress, RST | ACK, 0, 64));
    tbl.on_event(&state(3, 0x77, ct, SynSent, Close));
    let out = tbl.take_all_closed();
    let c = only(&out, 0x77);
    assert_eq!(c.verdict.reason, "connection_refused");
    assert!(
        c.conn.facts.iter().any(|f| matches!(
            &f.kind,
            FactKind::RstReceived { origin: RstOrigin::PeerKernel, sender_reason: Some(r), .. } if r == "NO_SOCKET"
        )),
        "{:?}",
        c.conn.facts
    );
}

#[test]
fn without_packet_facts_a_missing_rst_segment_proves_nothing() {
    use TcpState::*;
    let mut tbl = Table::new(TableConfig {
        packet_facts: false,
        ..TableConfig::default()
    });
    let ct = tuple("10.9.1.2:40000", "10.9.2.2:8080");
    let st = ct.reversed();
    for ev in [
        by(state(0, 0x10, ct, Close, SynSent), 1, "client", false),
        state(1, 0x20, st, Listen, SynRecv),
        state(2, 0x10, ct, SynSent, Established),
        state(2, 0x20, st, SynRecv, Established),
        // The server dies with unread data; only tracepoints are available.
        by(
            state(50 * MS, 0x20, st, Established, Close),
            2,
            "server",
            true,
        ),
        base(50 * MS + 5, 0x10, Some(ct), EventKind::RecvReset),
        state(50 * MS + 6, 0x10, ct, Established, Close),
    ] {
        tbl.on_event(&ev);
    }
    let out = tbl.take_all_closed();
    let c = only(&out, 0x10);
    assert_eq!(
        (c.verdict.closed_by, c.verdict.reason.as_str()),
        (ClosedBy::Server, "server_process_exit")
    );
    let s = only(&out, 0x20);
    assert_eq!(s.verdict.reason, "server_process_exit");
}

/// The event stream of a peer that reset the connection only when it died, as tracepoints
/// alone show it: no segments at all.
fn tracepoint_only_stream(peer_dies: bool) -> Vec<Event> {
    use TcpState::*;
    let ct = tuple("10.9.1.2:40000", "10.9.2.2:8080");
    let st = ct.reversed();
    let mut evs = vec![
        by(state(0, 0x10, ct, Close, SynSent), 1, "client", false),
        state(1, 0x20, st, Listen, SynRecv),
        state(2, 0x10, ct, SynSent, Established),
        state(2, 0x20, st, SynRecv, Established),
    ];
    if peer_dies {
        // The server closes with FIN first, then dies much later (not a reset).
        evs.push(by(
            state(10 * MS, 0x20, st, Established, FinWait1),
            2,
            "server",
            false,
        ));
        evs.push(state(11 * MS, 0x10, ct, Established, CloseWait));
        evs.push(state(12 * MS, 0x20, st, FinWait1, FinWait2));
        evs.push(state(13 * MS, 0x20, st, FinWait2, Close));
    }
    evs.push(base(50 * MS, 0x10, Some(ct), EventKind::RecvReset));
    evs.push(state(50 * MS + 1, 0x10, ct, Established, Close));
    evs
}

#[test]
fn without_packet_facts_a_rst_from_a_live_peer_is_not_a_proven_middlebox() {
    for packet_facts in [true, false] {
        let mut tbl = Table::new(TableConfig {
            packet_facts,
            ..TableConfig::default()
        });
        for ev in tracepoint_only_stream(false) {
            tbl.on_event(&ev);
        }
        let out = tbl.take_all_closed();
        let c = only(&out, 0x10);
        if packet_facts {
            // With the hooks attached, a RST segment nobody here sent was forged.
            assert_eq!(c.verdict.reason, "middlebox_reset");
            assert_eq!(c.verdict.confidence, classify::Confidence::High);
        } else {
            // Without them nothing says who sent it.
            assert_eq!(
                (c.verdict.closed_by, c.verdict.reason.as_str()),
                (ClosedBy::Server, "server_reset")
            );
            assert_eq!(c.verdict.confidence, classify::Confidence::Low);
        }
    }
}

#[test]
fn without_packet_facts_a_peer_that_closed_first_without_reset_is_not_the_sender() {
    let mut tbl = Table::new(TableConfig {
        packet_facts: false,
        ..TableConfig::default()
    });
    for ev in tracepoint_only_stream(true) {
        tbl.on_event(&ev);
    }
    let out = tbl.take_all_closed();
    let c = only(&out, 0x10);
    assert!(
        c.conn.facts.iter().any(|f| matches!(
            f.kind,
            FactKind::RstReceived {
                origin: RstOrigin::Untraced,
                ..
            }
        )),
        "{:?}",
        c.conn.facts
    );
    // The FIN came first: the verdict rests on it, not on the unexplained RST.
    assert_eq!(c.verdict.reason, "server_close");
}

#[test]
fn without_packet_facts_the_peer_record_of_its_reset_proves_the_sender() {
    use TcpState::*;
    let mut tbl = Table::new(TableConfig {
        packet_facts: false,
        ..TableConfig::default()
    });
    let ct = tuple("10.9.1.2:40000", "10.9.2.2:8080");
    let st = ct.reversed();
    for ev in [
        by(state(0, 0x10, ct, Close, SynSent), 1, "client", false),
        state(1, 0x20, st, Listen, SynRecv),
        state(2, 0x10, ct, SynSent, Established),
        state(2, 0x20, st, SynRecv, Established),
        // The server application aborts (SO_LINGER 0): its own send_reset tracepoint.
        by(
            base(
                40 * MS,
                0x20,
                Some(st),
                EventKind::SendReset {
                    state: Established,
                    reason: None,
                },
            ),
            2,
            "server",
            false,
        ),
        by(
            state(40 * MS, 0x20, st, Established, Close),
            2,
            "server",
            false,
        ),
        base(40 * MS + 5, 0x10, Some(ct), EventKind::RecvReset),
        state(40 * MS + 6, 0x10, ct, Established, Close),
    ] {
        tbl.on_event(&ev);
    }
    let out = tbl.take_all_closed();
    let c = only(&out, 0x10);
    assert_eq!(
        (c.verdict.closed_by, c.verdict.reason.as_str()),
        (ClosedBy::Server, "server_abort")
    );
}

/// A socket reset by its peer is judged after the linger period; its application closes the
/// fd later (tcp_close sees the socket in CLOSE). That close() must not open a new record and
/// print a second verdict for the same socket.
#[test]
fn close_after_linger_is_no_second_verdict() {
    use TcpState::*;
    let t = tuple("10.9.1.2:40000", "10.9.2.2:8080");
    let mut tbl = Table::default();
    let sk = 0xffff_8880_0000_1000;
    let mut verdicts = 0;
    for ev in [
        by(state(0, sk, t, Close, SynSent), 100, "app", false),
        state(1, sk, t, SynSent, Established),
        base(10, sk, Some(t), EventKind::RecvReset),
        state(10, sk, t, Established, Close),
    ] {
        verdicts += tbl.on_event(&ev).len();
    }
    verdicts += tbl.take_due(10 + 5_000_000_000).len();
    assert_eq!(
        verdicts, 1,
        "the reset is judged once the linger period is over"
    );
    let late = by(
        base(
            6_000_000_000,
            sk,
            Some(t),
            EventKind::CloseCall { state: Close },
        ),
        100,
        "app",
        false,
    );
    verdicts += tbl.on_event(&late).len();
    verdicts += tbl
        .on_event(&base(6_000_000_001, sk, Some(t), EventKind::Destroy))
        .len();
    verdicts += tbl.take_due(20_000_000_000).len();
    verdicts += tbl.take_all_closed().len();
    assert_eq!(verdicts, 1, "no phantom verdict from the late close()");
    assert!(tbl.is_empty());
    assert_eq!(tbl.stats.late_close_calls, 1);
}

/// At --max-conns the table refuses new connections deliberately: a refused connection is
/// counted once however many events it has, its events never bring it back as
/// `preexisting` when room frees up, and it gets no verdict.
#[test]
fn full_table_refuses_whole_connections_and_counts_them_once() {
    use TcpState::*;
    let mut tbl = Table::new(TableConfig {
        max_conns: 1,
        ..TableConfig::default()
    });
    let (a, b) = (0xffff_8880_0000_a000, 0xffff_8880_0000_b000);
    let ta = tuple("10.9.1.2:40000", "10.9.2.2:8080");
    let tb = tuple("10.9.1.2:40001", "10.9.2.2:8080");
    let mut verdicts = Vec::new();
    let evs = vec![
        by(state(0, a, ta, Close, SynSent), 1, "a", false),
        state(1, a, ta, SynSent, Established),
        by(state(2, b, tb, Close, SynSent), 2, "b", false),
        state(3, b, tb, SynSent, Established),
        base(
            4,
            b,
            Some(tb),
            EventKind::Retransmit {
                state: Established,
                err: 0,
            },
        ),
        // a ends: room for one again.
        by(state(5, a, ta, Established, FinWait1), 1, "a", false),
        state(6, a, ta, FinWait1, Close),
        // b's later events must not bring it back.
        base(
            7,
            b,
            Some(tb),
            EventKind::Retransmit {
                state: Established,
                err: 0,
            },
        ),
        by(state(8, b, tb, Established, FinWait1), 2, "b", false),
        state(9, b, tb, FinWait1, Close),
    ];
    for ev in &evs {
        verdicts.extend(tbl.on_event(ev));
    }
    verdicts.extend(tbl.take_all_closed());
    let ids: Vec<u64> = verdicts.iter().map(|c| c.conn.skaddr).collect();
    assert_eq!(ids, vec![a], "only the tracked connection is judged");
    assert_eq!(
        tbl.stats.conns_dropped, 1,
        "one connection refused, counted once"
    );
    assert!(tbl.is_empty());
    // The address is reused by a new connection: tracked again.
    tbl.on_event(&by(state(10, b, tb, Close, SynSent), 3, "b2", false));
    assert_eq!(tbl.len(), 1);
}

/// On loopback the dying process's RST is processed on the other socket in the dying
/// process's own context, so that socket's CLOSE transition carries PF_EXITING too. Only the
/// owner's pid makes it this socket's exit: the client here did not die, the server did.
#[test]
fn a_dying_peer_context_is_not_this_sockets_exit() {
    use TcpState::*;
    for dying_is_server in [true, false] {
        let mut tbl = Table::new(TableConfig {
            packet_facts: false,
            ..TableConfig::default()
        });
        let ct = tuple("10.9.1.2:40000", "10.9.2.2:8080");
        let st = ct.reversed();
        let mut evs = vec![
            by(state(0, 0x10, ct, Close, SynSent), 1, "client", false),
            state(1, 0x20, st, Listen, SynRecv),
            state(2, 0x10, ct, SynSent, Established),
            state(2, 0x20, st, SynRecv, Established),
        ];
        let (dead, dead_t, other, other_t, pid, comm) = if dying_is_server {
            (0x20, st, 0x10, ct, 2, "server")
        } else {
            (0x10, ct, 0x20, st, 1, "client")
        };
        evs.extend([
            by(
                state(50 * MS, dead, dead_t, Established, Close),
                pid,
                comm,
                true,
            ),
            // The other socket's RST handling runs on the dying process's exit path.
            by(
                base(50 * MS + 5, other, Some(other_t), EventKind::RecvReset),
                pid,
                comm,
                true,
            ),
            by(
                state(50 * MS + 6, other, other_t, Established, Close),
                pid,
                comm,
                true,
            ),
        ]);
        for ev in &evs {
            tbl.on_event(ev);
        }
        let out = tbl.take_all_closed();
        let want = if dying_is_server {
            (ClosedBy::Server, "server_process_exit")
        } else {
            (ClosedBy::Client, "client_process_exit")
        };
        for sk in [dead, other] {
            let c = only(&out, sk);
            assert_eq!(
                (c.verdict.closed_by, c.verdict.reason.as_str()),
                want,
                "socket {sk:#x} (the {comm} died): {:#?}",
                c.verdict
            );
        }
    }
}

/// The client closes first; the server is then killed and its RST finishes the client's
/// socket (FIN_WAIT2 -> CLOSE) on the server's exit path. The client did not die: its
/// verdict stays the client's close, not a client process exit.
#[test]
fn a_dying_peer_finishing_our_socket_is_not_our_exit() {
    use TcpState::*;
    for packet_facts in [false, true] {
        let mut tbl = Table::new(TableConfig {
            packet_facts,
            ..TableConfig::default()
        });
        let ct = tuple("10.9.1.2:40000", "10.9.2.2:8080");
        let st = ct.reversed();
        for ev in [
            by(state(0, 0x10, ct, Close, SynSent), 1, "client", false),
            state(1, 0x20, st, Listen, SynRecv),
            state(2, 0x10, ct, SynSent, Established),
            state(2, 0x20, st, SynRecv, Established),
            by(
                state(10 * MS, 0x10, ct, Established, FinWait1),
                1,
                "client",
                false,
            ),
            state(10 * MS + 1, 0x20, st, Established, CloseWait),
            state(10 * MS + 2, 0x10, ct, FinWait1, FinWait2),
            // The server dies with unread data.
            by(
                state(50 * MS, 0x20, st, CloseWait, Close),
                2,
                "server",
                true,
            ),
            by(
                base(50 * MS + 5, 0x10, Some(ct), EventKind::RecvReset),
                2,
                "server",
                true,
            ),
            by(
                state(50 * MS + 6, 0x10, ct, FinWait2, Close),
                2,
                "server",
                true,
            ),
        ] {
            tbl.on_event(&ev);
        }
        let out = tbl.take_all_closed();
        let c = only(&out, 0x10);
        assert_eq!(
            (c.verdict.closed_by, c.verdict.reason.as_str()),
            (ClosedBy::Client, "client_close"),
            "packet_facts {packet_facts}: {:#?}",
            c.verdict
        );
    }
}

/// A listener whose LISTEN -> CLOSE was lost (ring-buffer drop) and that then connects:
/// its connection still gets its one verdict (the event_sequences fuzz target found it
/// left in the table forever).
#[test]
fn listener_that_connects_after_a_lost_close_still_gets_a_verdict() {
    let mut t = Table::default();
    let lt = tuple("127.0.0.1:8080", "0.0.0.0:0");
    let ct = tuple("127.0.0.1:8080", "127.0.0.1:50000");
    t.on_event(&state(1, 0x10, lt, TcpState::Close, TcpState::Listen));
    // LISTEN -> CLOSE lost; the socket connects.
    t.on_event(&state(2, 0x10, ct, TcpState::Close, TcpState::SynSent));
    t.on_event(&state(
        3,
        0x10,
        ct,
        TcpState::SynSent,
        TcpState::Established,
    ));
    t.on_event(&state(4, 0x10, ct, TcpState::Established, TcpState::Close));
    let closed = t.take_all_closed();
    assert_eq!(closed.len(), 1, "{closed:#?}");
    assert!(t.is_empty());
}

/// The recent log's tuple index follows the log: bounded with it, and every entry in it.
#[test]
fn recent_tuple_index_stays_in_step_with_the_log() {
    use TcpState::*;
    let mut tbl = Table::new(TableConfig {
        linger_ns: 0,
        ..TableConfig::default()
    });
    let n = MAX_LOG as u64 + 3000;
    for i in 0..n {
        // 50 distinct tuples, reused over and over (ports recycle under churn).
        let t = tuple(&format!("127.0.0.1:{}", 40000 + i % 50), "127.0.0.1:80");
        tbl.on_event(&state(i * 10, 0x1000 + i, t, Close, SynSent));
        tbl.on_event(&state(i * 10 + 1, 0x1000 + i, t, SynSent, Established));
        tbl.on_event(&state(i * 10 + 2, 0x1000 + i, t, Established, Close));
        tbl.take_due(i * 10 + 3);
    }
    let indexed: usize = tbl.recent_by_tuple.values().map(|q| q.len()).sum();
    assert_eq!(indexed, tbl.recent.len());
    assert!(tbl.recent.len() <= MAX_LOG);
    assert_eq!(tbl.recent_by_tuple.len(), 50);
}

/// Both ends of a connection retired in one tick (both addresses reused before their
/// linger ended): each still finds the other.
#[test]
fn both_ends_retired_in_one_tick_find_each_other() {
    use TcpState::*;
    let mut tbl = Table::default();
    let p = Pair {
        c: 0xc1,
        s: 0x51,
        ct: tuple("127.0.0.1:43012", "127.0.0.1:8080"),
        st: tuple("127.0.0.1:8080", "127.0.0.1:43012"),
        cisn: 1000,
        sisn: 9000,
    };
    handshake(&mut tbl, &p, (1, 1));
    for ev in [
        state(10, p.c, p.ct, Established, FinWait1),
        pkt(11, p.c, p.ct, Dir::Egress, FIN | ACK, p.cisn + 1, 64),
        pkt(12, p.s, p.st, Dir::Ingress, FIN | ACK, p.cisn + 1, 64),
        state(12, p.s, p.st, Established, CloseWait),
        state(13, p.s, p.st, CloseWait, LastAck),
        pkt(13, p.s, p.st, Dir::Egress, FIN | ACK, p.sisn + 1, 64),
        pkt(14, p.c, p.ct, Dir::Ingress, FIN | ACK, p.sisn + 1, 64),
        state(14, p.c, p.ct, FinWait2, Close),
        state(15, p.s, p.st, LastAck, Close),
        // The server's address first, then the client's, go to new sockets.
        state(
            16,
            p.s,
            tuple("127.0.0.1:8080", "127.0.0.1:43020"),
            Listen,
            SynRecv,
        ),
        state(
            17,
            p.c,
            tuple("127.0.0.1:43030", "127.0.0.1:8080"),
            Close,
            SynSent,
        ),
    ] {
        tbl.on_event(&ev);
    }
    let out = tbl.take_due(18);
    assert_eq!(out.len(), 2, "{out:?}");
    for c in &out {
        assert!(
            c.peer.is_some(),
            "no peer for {:?}: {:#?}",
            c.conn.tuple,
            c.verdict
        );
        assert_eq!(c.verdict.reason, "client_close", "{:#?}", c.verdict);
    }
}

/// Memory per tracked socket (bench-live: 1 121 bytes per socket before the HTTP/2 tracker
/// and GOAWAY facts were boxed): the record sits inline in the table's buckets and every
/// fact in its vector, so their sizes are the budget's first term.
#[test]
fn record_sizes_stay_small() {
    // Every tracked socket holds a record; every index and log entry a tuple (bench-live).
    // HTTP/2 events of sockets not met yet wait in the table (`early.rs`, bounded in
    // number on this size).
    assert!(
        std::mem::size_of::<Event>() <= 160,
        "{}",
        std::mem::size_of::<Event>()
    );
    assert!(
        std::mem::size_of::<Conn>() <= 256,
        "{}",
        std::mem::size_of::<Conn>()
    );
    assert!(
        std::mem::size_of::<Option<Tuple>>() <= 40,
        "{}",
        std::mem::size_of::<Option<Tuple>>()
    );
    assert!(
        std::mem::size_of::<crate::timeline::Fact>() <= 48,
        "{}",
        std::mem::size_of::<crate::timeline::Fact>()
    );
}

/// The packet records' last-payload time reaches the record: idle from the last payload to
/// the first FIN or RST, whichever way it went, and the timeline's L4 idle figure.
#[test]
fn idle_before_end_comes_from_the_packet_records() {
    use Dir::*;
    use TcpState::*;
    let mut tbl = Table::new(TableConfig {
        linger_ns: 0,
        ..TableConfig::default()
    });
    let t = tuple("10.0.0.1:45000", "10.0.0.2:443");
    let with_data = |mut ev: Event, at: u64| {
        if let EventKind::Packet(p) = &mut ev.kind {
            p.last_data_ns = Some(at);
        }
        ev
    };
    tbl.on_event(&state(0, 0x61, t, Close, SynSent));
    tbl.on_event(&pkt(1, 0x61, t, Egress, SYN, 100, 64));
    tbl.on_event(&state(2, 0x61, t, SynSent, Established));
    // First ingress segment carried data at 5 ms; then 361 s of silence and a RST.
    tbl.on_event(&with_data(
        pkt(5 * MS, 0x61, t, Ingress, ACK, 900, 63),
        5 * MS,
    ));
    tbl.on_event(&with_data(
        pkt(361_005 * MS, 0x61, t, Ingress, RST, 950, 63),
        5 * MS,
    ));
    tbl.on_event(&state(361_005 * MS, 0x61, t, Established, Close));
    let out = tbl.take_all_closed();
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].conn.last_data_ns.map(|t| t.get()), Some(5 * MS));
    assert_eq!(out[0].conn.idle_before_end_ns(), Some(361_000 * MS));
    assert!(
        out[0].verdict.hint.contains("AWS NLB idle timeout (350 s)"),
        "{}",
        out[0].verdict.hint
    );
}

/// Verdicts come out in the order their sockets closed, even when a retired record (judged
/// first) closed after records that were due in the same tick.
#[test]
fn verdicts_leave_in_close_order_across_retired_and_due() {
    use TcpState::*;
    let mut tbl = Table::default();
    let a = pair(1);
    let b = Pair {
        c: 0x1100,
        s: 0x2100,
        ..pair(7)
    };
    let b = Pair {
        ct: tuple("10.9.1.3:40001", "10.9.2.2:8080"),
        st: tuple("10.9.2.2:8080", "10.9.1.3:40001"),
        ..b
    };
    handshake(&mut tbl, &a, (1, 2));
    handshake(&mut tbl, &b, (1, 2));
    for ev in client_close_events(&a, 100 * MS)
        .into_iter()
        .chain(client_close_events(&b, 200 * MS))
    {
        tbl.on_event(&ev);
    }
    // b's server socket address goes to a new socket: b.s is retired, judged first.
    tbl.on_event(&state(
        300 * MS,
        b.s,
        tuple("10.9.2.2:8080", "10.9.1.9:41000"),
        Listen,
        SynRecv,
    ));
    let out = tbl.take_due(5_000 * MS);
    let socks: Vec<u64> = out.iter().map(|c| c.conn.skaddr).collect();
    assert_eq!(out.len(), 4, "{socks:x?}");
    assert!(
        out.is_sorted_by_key(|c| c.conn.closed_ns),
        "{:?}",
        out.iter().map(|c| c.conn.closed_ns).collect::<Vec<_>>()
    );
    assert_eq!(socks.last(), Some(&b.s), "b's server socket closed last");
}

/// The client closes at `at`, the server follows 1 ms later.
fn client_close_events(p: &Pair, at: u64) -> Vec<Event> {
    use Dir::*;
    use TcpState::*;
    vec![
        by(
            state(at, p.c, p.ct, Established, FinWait1),
            100,
            "client",
            false,
        ),
        pkt(at, p.c, p.ct, Egress, FIN | ACK, p.cisn + 11, 64),
        pkt(at, p.s, p.st, Ingress, FIN | ACK, p.cisn + 11, 63),
        state(at, p.s, p.st, Established, CloseWait),
        by(
            state(at + MS, p.s, p.st, CloseWait, LastAck),
            200,
            "server",
            false,
        ),
        pkt(at + MS, p.s, p.st, Egress, FIN | ACK, p.sisn + 5, 64),
        pkt(at + MS, p.c, p.ct, Ingress, FIN | ACK, p.sisn + 5, 63),
        state(at + MS, p.c, p.ct, FinWait1, Close),
        state(at + 2 * MS, p.s, p.st, LastAck, Close),
    ]
}

#[test]
fn a_reused_address_is_judged_at_its_own_close_not_at_the_old_records() {
    use TcpState::*;
    let mut tbl = Table::default();
    let a = pair(1);
    handshake(&mut tbl, &a, (1, 2));
    for ev in client_close_events(&a, 100 * MS) {
        tbl.on_event(&ev);
    }
    // Inside the old server record's linger, a new socket gets its address and closes at
    // 900 ms: the old record's queue entry (101 ms) must not take the new record along.
    let t = tuple("10.9.2.2:8080", "10.9.1.9:41000");
    tbl.on_event(&state(300 * MS, a.s, t, Listen, SynRecv));
    tbl.on_event(&state(301 * MS, a.s, t, SynRecv, Established));
    tbl.on_event(&state(900 * MS, a.s, t, Established, Close));
    let first = tbl.take_due(1_200 * MS);
    let socks: Vec<(u64, Option<u64>)> = first
        .iter()
        .map(|c| (c.conn.skaddr, c.conn.closed_ns))
        .collect();
    assert_eq!(first.len(), 2, "{socks:x?}");
    assert!(
        first.iter().all(|c| c.conn.closed_ns < Some(300 * MS)),
        "only the old records are due at 1.2 s: {socks:x?}"
    );
    assert!(tbl.take_due(1_850 * MS).is_empty(), "the new one lingers");
    let second = tbl.take_due(1_900 * MS);
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].conn.skaddr, a.s);
    assert_eq!(second[0].conn.closed_ns, Some(900 * MS));
    assert!(tbl.take_due(u64::MAX).is_empty(), "nothing is judged twice");
}

/// After lost events, a walk over the live sockets ends the records of sockets it does not
/// list (their CLOSE was lost): judged with the end unseen, never `high`, and counted. Kept:
/// the sockets it lists, records first met after it started, records of namespaces it did
/// not walk to their end or of no known namespace, and everything when events were lost
/// while it ran. A socket it lists that the table never met is taken up as pre-existing.
#[test]
fn a_recheck_ends_the_records_of_sockets_that_are_gone() {
    use TcpState::*;
    const NS: u32 = 4026531993;
    let existing = |ts, sk, t, state| {
        base(
            ts,
            sk,
            Some(t),
            EventKind::Existing {
                state,
                cgroup_id: None,
            },
        )
    };
    let open = |tbl: &mut Table, ts, sk, t| {
        tbl.on_event(&state(ts, sk, t, Close, SynSent));
        tbl.on_event(&state(ts + 1, sk, t, SynSent, Established));
    };
    let alive = tuple("10.0.0.1:45000", "10.0.0.2:443");
    let gone = tuple("10.0.0.1:45001", "10.0.0.2:443");
    let other_ns = tuple("10.0.0.1:45002", "10.0.0.2:443");
    let no_ns = tuple("10.0.0.1:45003", "10.0.0.2:443");
    let late = tuple("10.0.0.1:45004", "10.0.0.2:443");
    let unmet = tuple("10.0.0.1:45005", "10.0.0.2:443");
    let fresh = || {
        let mut tbl = Table::default();
        open(&mut tbl, MS, 0x10, alive);
        open(&mut tbl, MS, 0x11, gone);
        tbl.on_event(&state(2 * MS, 0x11, gone, Established, FinWait1));
        let mut e = state(MS, 0x12, other_ns, Close, SynSent);
        e.netns = Some(NS + 1);
        tbl.on_event(&e);
        let mut p = pkt(MS, 0x13, no_ns, Dir::Egress, ACK, 5, 64);
        p.netns = None;
        tbl.on_event(&p);
        tbl
    };
    let walk = |tbl: &mut Table| {
        tbl.recheck_start(10 * MS);
        tbl.on_event(&existing(11 * MS, 0x10, alive, Established));
        open(tbl, 12 * MS, 0x14, late);
        tbl.on_event(&existing(13 * MS, 0x15, unmet, Established));
    };

    let mut tbl = fresh();
    walk(&mut tbl);
    let (n, now) = tbl.recheck_end(&[u64::from(NS)], false, true);
    assert_eq!(
        (n, now.len()),
        (1, 0),
        "judged at the next tick, not at once"
    );
    assert_eq!(tbl.stats.rechecks, 1);
    assert_eq!(tbl.stats.ends_found_gone, 1);
    assert_eq!(tbl.stats.ends_unseen, 1);
    for sk in [0x10, 0x12, 0x13, 0x14, 0x15] {
        assert!(tbl.conns.contains_key(&sk), "{sk:#x} kept");
    }
    assert!(tbl.conns[&0x15].preexisting, "met through the walk");
    assert!(tbl.conns[&0x15].gap, "its opening was lost");
    let out = tbl.take_due(20 * MS);
    let v = only(&out, 0x11);
    assert!(v.conn.gap);
    assert_ne!(v.verdict.confidence, classify::Confidence::High);
    assert_eq!(out.len(), 1, "{out:?}");

    // Events were lost while it ran: nothing is retired.
    let mut tbl = fresh();
    walk(&mut tbl);
    assert_eq!(tbl.recheck_end(&[u64::from(NS)], false, false).0, 0);
    assert_eq!(tbl.stats.rechecks, 1);
    assert!(tbl.conns.contains_key(&0x11));
    // Only the other namespace was walked to its end: the record there that the walk did
    // not list ends, the one in the namespace it did not finish is kept.
    let mut tbl = fresh();
    walk(&mut tbl);
    assert_eq!(tbl.recheck_end(&[u64::from(NS) + 1], false, true).0, 1);
    assert!(tbl.conns.contains_key(&0x11) && !tbl.conns.contains_key(&0x12));
    // No walk under way: nothing happens.
    assert_eq!(tbl.recheck_end(&[u64::from(NS)], false, true).0, 0);

    // A stale record at the address a live socket now has (the old one's CLOSE and the new
    // one's opening lost): the listing is another socket's, the old record ends unseen.
    let mut tbl = fresh();
    let reused = tuple("10.0.0.1:45006", "10.0.0.2:443");
    tbl.recheck_start(10 * MS);
    tbl.on_event(&existing(11 * MS, 0x10, alive, Established));
    tbl.on_event(&existing(12 * MS, 0x11, reused, Established));
    assert_eq!(tbl.recheck_end(&[u64::from(NS)], false, true).0, 0);
    assert_eq!(tbl.stats.ends_unseen, 1);
    let c = &tbl.conns[&0x11];
    assert!(c.preexisting && c.tuple == Some(reused), "{c:?}");
    let out = tbl.take_due(20 * MS);
    let v = only(&out, 0x11);
    assert_eq!(v.conn.tuple, Some(gone));
    assert!(v.conn.gap);

    // A live record that missed a state change takes the kernel's state, and says it lost
    // events; one with an event since the walk began keeps its own.
    let mut tbl = fresh();
    open(&mut tbl, MS, 0x17, late);
    tbl.recheck_start(10 * MS);
    tbl.on_event(&existing(11 * MS, 0x11, gone, CloseWait));
    tbl.on_event(&state(12 * MS, 0x17, late, Established, FinWait1));
    tbl.on_event(&existing(13 * MS, 0x17, late, Established));
    tbl.on_event(&existing(14 * MS, 0x10, alive, Established));
    let _ = tbl.recheck_end(&[u64::from(NS)], false, true);
    assert_eq!(tbl.conns[&0x11].state_name(), "CLOSE_WAIT");
    assert!(tbl.conns[&0x11].gap);
    assert_eq!(tbl.conns[&0x17].state_name(), "FIN_WAIT1");
    assert!(!tbl.conns[&0x17].gap && !tbl.conns[&0x10].gap);
}

/// Namespaces the agent cannot enter are covered by the walk over the sockets holding
/// packet state: a record whose packets said its socket held state, untouched since the
/// walk began and not listed, belongs to a freed socket and ends unseen. Kept: a listed
/// one, one without that mark (never passed a segment), one with an event since the walk
/// began, and all of them when that walk was not read to its end or events were lost.
#[test]
fn a_recheck_by_socket_storage_covers_namespaces_not_walked() {
    use TcpState::*;
    const NS: u32 = 4026532500;
    let with_state = |ts, sk, t| {
        let mut e = pkt(ts, sk, t, Dir::Egress, ACK, 5, 64);
        if let EventKind::Packet(p) = &mut e.kind {
            p.has_state = true;
        }
        e.netns = Some(NS);
        e
    };
    let open = |tbl: &mut Table, sk, t| {
        for mut e in [
            state(MS, sk, t, Close, SynSent),
            state(MS + 1, sk, t, SynSent, Established),
        ] {
            e.netns = Some(NS);
            tbl.on_event(&e);
        }
    };
    let gone = tuple("10.1.0.1:45000", "10.1.0.2:443");
    let listed = tuple("10.1.0.1:45001", "10.1.0.2:443");
    let no_state = tuple("10.1.0.1:45002", "10.1.0.2:443");
    let touched = tuple("10.1.0.1:45003", "10.1.0.2:443");
    let fresh = || {
        let mut tbl = Table::default();
        for (sk, t) in [
            (0x20, gone),
            (0x21, listed),
            (0x22, no_state),
            (0x23, touched),
        ] {
            open(&mut tbl, sk, t);
            let mut e = with_state(2 * MS, sk, t);
            if sk == 0x22 {
                e = pkt(2 * MS, sk, t, Dir::Egress, ACK, 5, 64);
                e.netns = Some(NS);
            }
            tbl.on_event(&e);
        }
        tbl.recheck_start(10 * MS);
        let mut e = base(
            11 * MS,
            0x21,
            Some(listed),
            EventKind::Existing {
                state: Established,
                cgroup_id: None,
            },
        );
        e.netns = Some(NS);
        tbl.on_event(&e);
        tbl.on_event(&with_state(12 * MS, 0x23, touched));
        tbl
    };
    assert!(
        fresh().conns[&0x20].marks & super::record::mark::HAS_STATE != 0
            && fresh().conns[&0x22].marks & super::record::mark::HAS_STATE == 0
    );

    // The namespace was not walked (`walked` empty); the storage walk was read to its end.
    let mut tbl = fresh();
    let (n, _) = tbl.recheck_end(&[], true, true);
    assert_eq!(n, 1);
    assert_eq!(tbl.stats.ends_found_gone, 1);
    for sk in [0x21, 0x22, 0x23] {
        assert!(tbl.conns.contains_key(&sk), "{sk:#x} kept");
    }
    let out = tbl.take_due(20 * MS);
    let v = only(&out, 0x20);
    assert!(v.conn.gap);
    assert_ne!(v.verdict.confidence, classify::Confidence::High);
    assert_eq!(out.len(), 1, "{out:?}");

    // Without the storage walk, or with events lost: nothing is retired.
    for (stored, complete) in [(false, true), (true, false)] {
        let mut tbl = fresh();
        assert_eq!(tbl.recheck_end(&[], stored, complete).0, 0);
        assert!(tbl.conns.contains_key(&0x20));
    }
}

/// Every connection alive while events were lost is judged with that said, however long
/// ago the loss. The table kept loss windows for 60 s (and 256 of them): a new loss noted
/// at the very tick that judged a connection pushed the old window out first, and the
/// connection, alive through the old loss and closed before the new one, came out `high`.
#[test]
fn a_loss_long_before_the_end_still_lowers_the_verdict() {
    const S: u64 = 1_000_000_000;
    let mut tbl = Table::default();
    let p = pair(1);
    handshake(&mut tbl, &p, (1, 2));
    tbl.note_events_lost(S, 0);
    tbl.note_events_lost(30 * S, 5);
    for ev in client_close_events(&p, 100 * S) {
        tbl.on_event(&ev);
    }
    // Linger (1 s) over at 101 s; the tick at 101.02 s notes a new loss, then judges.
    tbl.note_events_lost(101 * S + 10 * MS, 5);
    tbl.note_events_lost(101 * S + 20 * MS, 6);
    let out = tbl.take_due(101 * S + 20 * MS);
    for sk in [p.c, p.s] {
        let v = only(&out, sk);
        assert_ne!(
            v.verdict.confidence,
            classify::Confidence::High,
            "alive through the loss at 1 to 30 s: {:#?}",
            v.verdict
        );
    }
    // Opened after every loss: nothing lowers it.
    let late = pair(2);
    for ev in handshake_events(&late, (1, 2), 100, "client") {
        let mut ev = ev;
        ev.ts_ns += 200 * S;
        tbl.on_event(&ev);
    }
    for ev in client_close_events(&late, 300 * S) {
        tbl.on_event(&ev);
    }
    tbl.note_events_lost(302 * S, 6);
    let out = tbl.take_due(302 * S);
    assert_eq!(
        only(&out, late.c).verdict.confidence,
        classify::Confidence::High
    );
}
