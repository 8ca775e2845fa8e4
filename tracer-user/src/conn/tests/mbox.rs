//! Middlebox joins in the connection table: a proxy on this host (both legs traced), the
//! relay case, a process talking to itself, and lost kernel events.

use super::*;
use crate::{classify::MiddleboxKind, timeline::ProxyLeg};

pub(super) fn mk(n: u64, local: &str, remote: &str) -> Pair {
    let ct = tuple(local, remote);
    Pair {
        c: 0x1000 + n,
        s: 0x2000 + n,
        ct,
        st: ct.reversed(),
        cisn: (n as u32).wrapping_mul(0x3b9a_ca07),
        sisn: (n as u32).wrapping_mul(0x9e37_79b9),
    }
}

/// `sk` (owned by `pid`) closes first: FIN out, the peer `psk` gets it.
pub(super) fn active_close(
    at: u64,
    p: &Pair,
    from_client: bool,
    pid: u32,
    comm: &str,
) -> Vec<Event> {
    use Dir::*;
    use TcpState::*;
    let (sk, t, psk, pt, seq) = if from_client {
        (p.c, p.ct, p.s, p.st, p.cisn + 11)
    } else {
        (p.s, p.st, p.c, p.ct, p.sisn + 11)
    };
    vec![
        by(state(at, sk, t, Established, FinWait1), pid, comm, false),
        pkt(at, sk, t, Egress, FIN | ACK, seq, 64),
        pkt(at, psk, pt, Ingress, FIN | ACK, seq, 63),
        state(at, psk, pt, Established, CloseWait),
    ]
}

/// The passive side `sk` (owned by `pid`) closes in turn; both reach CLOSE.
pub(super) fn passive_close(
    at: u64,
    p: &Pair,
    client_is_passive: bool,
    pid: u32,
    comm: &str,
) -> Vec<Event> {
    use Dir::*;
    use TcpState::*;
    let (sk, t, psk, pt, seq) = if client_is_passive {
        (p.c, p.ct, p.s, p.st, p.cisn + 11)
    } else {
        (p.s, p.st, p.c, p.ct, p.sisn + 11)
    };
    vec![
        by(state(at, sk, t, CloseWait, LastAck), pid, comm, false),
        pkt(at, sk, t, Egress, FIN | ACK, seq, 64),
        pkt(at, psk, pt, Ingress, FIN | ACK, seq, 63),
        state(at, psk, pt, FinWait1, Close),
        state(at + MS, sk, t, LastAck, Close),
    ]
}

pub(super) struct ProxyHost {
    /// client -> proxy (downstream leg): `c` the client's socket, `s` the proxy's.
    pub(super) down: Pair,
    /// proxy -> server (upstream leg): `c` the proxy's socket, `s` the server's.
    pub(super) up: Pair,
}

pub(super) const PROXY: u32 = 300;

impl ProxyHost {
    pub(super) fn new() -> ProxyHost {
        ProxyHost {
            down: mk(1, "10.9.1.2:40000", "10.9.1.1:8443"),
            up: mk(2, "10.9.2.1:50000", "10.9.2.2:8080"),
        }
    }

    /// Both legs' handshakes, the proxy (`comm`) connecting upstream.
    pub(super) fn handshakes(&self, comm: &str) -> Vec<Event> {
        let mut ev = handshake_events(&self.down, (1, 2), 100, "client");
        ev.extend(handshake_events(&self.up, (2, 3), PROXY, comm));
        ev
    }

    /// The proxy's own timeout: it closes both legs at 5000 ms, client and server follow.
    pub(super) fn proxy_timeout(&self, comm: &str) -> Vec<Event> {
        let mut ev = active_close(5000 * MS, &self.down, false, PROXY, comm);
        ev.extend(active_close(5000 * MS, &self.up, true, PROXY, comm));
        ev.extend(passive_close(5001 * MS, &self.down, true, 100, "client"));
        ev.extend(passive_close(5001 * MS, &self.up, false, 200, "server"));
        ev
    }

    /// The server closes at 5000 ms; the proxy passes the FIN on 1 ms later; the client's
    /// socket closes before the proxy's upstream one.
    pub(super) fn relay_close(&self, comm: &str) -> Vec<Event> {
        let mut ev = active_close(5000 * MS, &self.up, false, 200, "server");
        ev.extend(active_close(5001 * MS, &self.down, false, PROXY, comm));
        ev.extend(passive_close(5002 * MS, &self.down, true, 100, "client"));
        ev.extend(passive_close(5002 * MS, &self.up, true, PROXY, comm));
        ev
    }
}

fn proxy_host(tbl: &mut Table, comm: &str) -> ProxyHost {
    let h = ProxyHost::new();
    for ev in h.handshakes(comm) {
        assert!(tbl.on_event(&ev).is_empty());
    }
    h
}

/// A RST reaches the client that the server never sent (REJECT in between) at 1000 ms;
/// the server writes at 1050 ms and the client's kernel answers for the socket it lost.
pub(super) fn rst_from_between(p: &Pair) -> Vec<Event> {
    use Dir::*;
    use TcpState::*;
    vec![
        pkt(1000 * MS, p.c, p.ct, Ingress, RST, p.sisn + 1, 63),
        base(1000 * MS, p.c, Some(p.ct), EventKind::RecvReset),
        state(1000 * MS, p.c, p.ct, Established, Close),
        pkt(1050 * MS, 0, p.ct, Egress, RST, p.cisn + 1, 64),
        pkt(1050 * MS, p.s, p.st, Ingress, RST, p.cisn + 1, 63),
        base(1050 * MS, p.s, Some(p.st), EventKind::RecvReset),
        state(1050 * MS, p.s, p.st, Established, Close),
    ]
}

fn feed(tbl: &mut Table, evs: Vec<Event>) {
    for ev in evs {
        tbl.on_event(&ev);
    }
}

fn verdict_of(out: &[Closed], sk: u64) -> &classify::Verdict {
    &only(out, sk).verdict
}

fn proxy_ended_both_legs(comm: &str) {
    let mut tbl = Table::default();
    let h = proxy_host(&mut tbl, comm);
    // The proxy's idle timeout: it closes both legs itself.
    feed(&mut tbl, h.proxy_timeout(comm));
    let out = tbl.take_all_closed();
    for (sk, leg) in [
        (h.down.c, ProxyLeg::Downstream),
        (h.down.s, ProxyLeg::Downstream),
        (h.up.c, ProxyLeg::Upstream),
        (h.up.s, ProxyLeg::Upstream),
    ] {
        let v = verdict_of(&out, sk);
        assert_eq!(
            (v.closed_by, v.reason.as_str(), v.confidence),
            (
                ClosedBy::Middlebox,
                "proxy_close",
                classify::Confidence::High
            ),
            "socket {sk:#x}: {v:#?}"
        );
        let mb = v.middlebox.as_ref().expect("middlebox object");
        assert_eq!(mb.kind, MiddleboxKind::Proxy);
        assert_eq!((mb.pid, mb.comm.as_deref()), (Some(PROXY), Some(comm)));
        assert_eq!(mb.leg, Some(leg), "socket {sk:#x}");
        assert_eq!(mb.action, Some("fin"));
        assert_eq!(mb.other_leg_ended, Some("by_proxy"));
    }
    // The client's socket names the proxy's other leg.
    let mb = verdict_of(&out, h.down.c).middlebox.clone().expect("mb");
    assert_eq!(
        mb.other_leg.as_deref(),
        Some("10.9.2.1:50000 -> 10.9.2.2:8080")
    );
}

#[test]
fn known_proxy_ending_both_legs_is_a_proven_middlebox() {
    proxy_ended_both_legs("haproxy");
}

#[test]
fn any_process_ending_both_legs_at_once_is_a_proven_middlebox() {
    proxy_ended_both_legs("my-relay");
}

#[test]
fn proxy_passing_on_the_servers_close_keeps_the_server_as_the_decider() {
    let mut tbl = Table::default();
    let h = proxy_host(&mut tbl, "haproxy");
    // The server closes; the proxy passes the FIN on to the client 1 ms later.
    feed(&mut tbl, h.relay_close("haproxy"));
    let out = tbl.take_all_closed();
    for sk in [h.down.c, h.down.s, h.up.c, h.up.s] {
        let v = verdict_of(&out, sk);
        assert_eq!(
            (v.closed_by, v.reason.as_str()),
            (ClosedBy::Server, "server_close"),
            "socket {sk:#x}: {v:#?}"
        );
        assert!(v.middlebox.is_none());
    }
    let v = verdict_of(&out, h.down.c);
    assert!(
        v.hint.contains("passed on by the proxy haproxy(300)"),
        "{}",
        v.hint
    );
}

/// The four sockets' memory is reused by new sockets before their linger is over, the
/// client's first: every record is retired and judged in the next tick, the client's before
/// the proxy's upstream leg (seen once in CI: the client's verdict read that leg's ending as
/// unknown and called haproxy the decider, high).
#[test]
fn proxy_passing_on_a_close_is_seen_when_every_socket_is_reused_at_once() {
    use TcpState::*;
    let mut tbl = Table::default();
    let h = proxy_host(&mut tbl, "haproxy");
    feed(&mut tbl, h.relay_close("haproxy"));
    for (i, sk) in [h.down.c, h.down.s, h.up.s, h.up.c].into_iter().enumerate() {
        let t = tuple(&format!("10.9.7.1:{}", 41000 + i), "10.9.7.2:80");
        feed(&mut tbl, vec![state(5003 * MS, sk, t, Close, SynSent)]);
    }
    let out = tbl.take_due(5004 * MS);
    for sk in [h.down.c, h.down.s, h.up.c, h.up.s] {
        let v = verdict_of(&out, sk);
        assert_eq!(
            (v.closed_by, v.reason.as_str()),
            (ClosedBy::Server, "server_close"),
            "socket {sk:#x}: {v:#?}"
        );
        assert!(v.middlebox.is_none(), "socket {sk:#x}: {v:#?}");
    }
}

/// The proxy's upstream leg reached CLOSE, but how it ended never arrived (its FIN and
/// state events lost): the proxy may have passed the server's close on, so its FIN on the
/// client's leg proves nothing about who decided.
#[test]
fn proxy_whose_other_leg_ending_was_lost_is_not_named_with_high_confidence() {
    use TcpState::*;
    let mut tbl = Table::default();
    let h = proxy_host(&mut tbl, "haproxy");
    feed(
        &mut tbl,
        active_close(5001 * MS, &h.down, false, PROXY, "haproxy"),
    );
    feed(
        &mut tbl,
        passive_close(5002 * MS, &h.down, true, 100, "client"),
    );
    // Only the upstream socket's last transition arrives.
    feed(
        &mut tbl,
        vec![state(5002 * MS, h.up.c, h.up.ct, LastAck, Close)],
    );
    let out = tbl.take_all_closed();
    let v = verdict_of(&out, h.down.c);
    assert_eq!(
        (v.closed_by, v.reason.as_str(), v.confidence),
        (
            ClosedBy::Middlebox,
            "proxy_close",
            classify::Confidence::Low
        ),
        "{v:#?}"
    );
    let mb = v.middlebox.as_ref().expect("middlebox object");
    assert_eq!(mb.other_leg_ended, Some("unknown"));
    assert!(v.hint.contains("how it ended was not seen"), "{}", v.hint);
}

/// haproxy ends both legs, but its upstream leg has not reached CLOSE when the client's
/// verdict is due (shut down for writing, it waits in FIN_WAIT2 for the backend's FIN). It
/// has ended all the same, by haproxy, at the same moment.
#[test]
fn proxy_leg_still_in_fin_wait2_is_its_other_leg() {
    use Dir::*;
    use TcpState::*;
    let mut tbl = Table::default();
    let h = proxy_host(&mut tbl, "haproxy");
    feed(
        &mut tbl,
        active_close(5000 * MS, &h.down, false, PROXY, "haproxy"),
    );
    feed(
        &mut tbl,
        active_close(5000 * MS, &h.up, true, PROXY, "haproxy"),
    );
    feed(
        &mut tbl,
        passive_close(5001 * MS, &h.down, true, 100, "client"),
    );
    // The backend acknowledges haproxy's FIN and keeps its socket in CLOSE_WAIT.
    feed(
        &mut tbl,
        vec![
            pkt(5001 * MS, h.up.s, h.up.st, Egress, ACK, h.up.sisn + 1, 64),
            state(5001 * MS, h.up.c, h.up.ct, FinWait1, FinWait2),
        ],
    );
    let out = tbl.take_due(10_000 * MS);
    for sk in [h.down.c, h.down.s] {
        let v = verdict_of(&out, sk);
        assert_eq!(
            (v.closed_by, v.reason.as_str(), v.confidence),
            (
                ClosedBy::Middlebox,
                "proxy_close",
                classify::Confidence::High
            ),
            "socket {sk:#x}: {v:#?}"
        );
        let mb = v.middlebox.as_ref().expect("middlebox object");
        assert_eq!(mb.other_leg_ended, Some("by_proxy"), "socket {sk:#x}");
        assert_eq!(
            mb.other_leg.as_deref(),
            Some("10.9.2.1:50000 -> 10.9.2.2:8080")
        );
    }
    assert!(
        out.iter().all(|c| c.conn.skaddr != h.up.c),
        "the upstream leg is still open"
    );
}

/// haproxy closes the client's connection and its backend leg is not on this host: it may
/// have decided or passed its backend's close on, so the client's verdict (the server end
/// closed) is not `high`.
#[test]
fn known_proxy_without_a_visible_backend_leg_is_not_high() {
    let mut tbl = Table::default();
    let down = mk(1, "10.9.1.2:40000", "10.9.1.1:8443");
    handshake_by(&mut tbl, &down, (1, 2), 100, "client");
    feed(
        &mut tbl,
        active_close(5000 * MS, &down, false, PROXY, "haproxy"),
    );
    feed(
        &mut tbl,
        passive_close(5001 * MS, &down, true, 100, "client"),
    );
    let out = tbl.take_all_closed();
    for sk in [down.c, down.s] {
        let v = verdict_of(&out, sk);
        assert_eq!(
            (v.closed_by, v.reason.as_str(), v.confidence),
            (
                ClosedBy::Server,
                "server_close",
                classify::Confidence::Medium
            ),
            "socket {sk:#x}: {v:#?}"
        );
        assert!(v.hint.contains("the proxy haproxy(300)"), "{}", v.hint);
        assert!(v.middlebox.is_none());
    }
    // Any other process at that end keeps the two-party verdict.
    let mut tbl = Table::default();
    handshake_by(&mut tbl, &down, (1, 2), 100, "client");
    feed(
        &mut tbl,
        active_close(5000 * MS, &down, false, PROXY, "api-server"),
    );
    feed(
        &mut tbl,
        passive_close(5001 * MS, &down, true, 100, "client"),
    );
    let out = tbl.take_all_closed();
    assert_eq!(
        verdict_of(&out, down.c).confidence,
        classify::Confidence::High
    );
}

/// A busy proxy: while haproxy's idle timeout ends connection A (both legs), the backend of
/// another connection B closes 1 ms earlier. Its leg (B's upstream) is nearer in time to
/// A's end than A's own upstream leg, and a far-side ending: A would read as "passed on
/// from the backend". Legs are paired by time alone, so when legs with different stories
/// are that close, the pairing is not proof: not high, whichever story is told.
#[test]
fn a_busy_proxy_with_two_candidate_legs_is_not_high() {
    for b_fully_closed in [false, true] {
        let mut tbl = Table::default();
        let a = proxy_host(&mut tbl, "haproxy");
        let b = ProxyHost {
            down: mk(3, "10.9.1.3:40001", "10.9.1.1:8443"),
            up: mk(4, "10.9.2.1:50001", "10.9.2.2:8080"),
        };
        handshake_by(&mut tbl, &b.down, (1, 2), 101, "client2");
        handshake_by(&mut tbl, &b.up, (2, 3), PROXY, "haproxy");
        // B's backend closes first.
        feed(
            &mut tbl,
            active_close(4999 * MS, &b.up, false, 200, "server"),
        );
        if b_fully_closed {
            feed(
                &mut tbl,
                passive_close(4999 * MS, &b.up, true, PROXY, "haproxy"),
            );
        }
        // haproxy times A out: the client leg now, the backend leg 150 ms later.
        feed(
            &mut tbl,
            active_close(5000 * MS, &a.down, false, PROXY, "haproxy"),
        );
        feed(
            &mut tbl,
            active_close(5150 * MS, &a.up, true, PROXY, "haproxy"),
        );
        feed(
            &mut tbl,
            passive_close(5001 * MS, &a.down, true, 100, "client"),
        );
        feed(
            &mut tbl,
            passive_close(5151 * MS, &a.up, false, 200, "server"),
        );
        let out = tbl.take_all_closed();
        let v = verdict_of(&out, a.down.c);
        assert!(
            v.confidence != classify::Confidence::High
                || (v.closed_by, v.reason.as_str()) == (ClosedBy::Middlebox, "proxy_close"),
            "B closed fully: {b_fully_closed}: {v:#?}"
        );
        assert!(
            v.hint.contains("not certain which"),
            "B closed fully: {b_fully_closed}: {}",
            v.hint
        );
    }
}

#[test]
fn a_process_talking_to_itself_is_not_a_proxy() {
    let mut tbl = Table::default();
    let a = mk(1, "127.0.0.1:40000", "127.0.0.1:9000");
    let b = mk(2, "127.0.0.1:40001", "127.0.0.1:9000");
    handshake_by(&mut tbl, &a, (1, 1), 100, "selftest");
    handshake_by(&mut tbl, &b, (1, 1), 100, "selftest");
    feed(&mut tbl, active_close(100 * MS, &a, true, 100, "selftest"));
    feed(&mut tbl, active_close(100 * MS, &b, true, 100, "selftest"));
    feed(
        &mut tbl,
        passive_close(101 * MS, &a, false, 100, "selftest"),
    );
    feed(
        &mut tbl,
        passive_close(101 * MS, &b, false, 100, "selftest"),
    );
    let out = tbl.take_all_closed();
    for sk in [a.c, a.s, b.c, b.s] {
        let v = verdict_of(&out, sk);
        assert_eq!(
            (v.closed_by, v.reason.as_str()),
            (ClosedBy::Client, "client_close"),
            "socket {sk:#x}: {v:#?}"
        );
    }
}

#[test]
fn lost_kernel_events_lower_confidence() {
    let run = |drops: bool| {
        let mut tbl = Table::default();
        let p = mk(1, "10.9.1.2:40000", "10.9.2.2:8080");
        handshake(&mut tbl, &p, (1, 2));
        tbl.note_events_lost(50 * MS, 0);
        tbl.note_events_lost(60 * MS, if drops { 7 } else { 0 });
        feed(&mut tbl, active_close(100 * MS, &p, true, 100, "client"));
        feed(&mut tbl, passive_close(101 * MS, &p, false, 200, "server"));
        tbl.note_events_lost(2_000 * MS, if drops { 7 } else { 0 });
        tbl.take_due(2_000 * MS)
    };
    let clean = run(false);
    let lossy = run(true);
    for out in [&clean, &lossy] {
        assert_eq!(out.len(), 2);
    }
    for (a, b) in clean.iter().zip(lossy.iter()) {
        assert_eq!(a.verdict.confidence, classify::Confidence::High);
        assert_eq!(b.verdict.confidence, classify::Confidence::Medium);
        assert_eq!(a.verdict.reason, b.verdict.reason);
        assert!(b.verdict.hint.contains("kernel events were lost"));
    }
}

/// client -> VIP 10.9.9.9:80, DNAT to the server 10.9.2.2:8080 on the way.
pub(super) fn dnat_pair() -> Pair {
    Pair {
        st: tuple("10.9.2.2:8080", "10.9.1.2:40000"),
        ..mk(7, "10.9.1.2:40000", "10.9.9.9:80")
    }
}

#[test]
fn ends_join_through_dnat_by_sequence_numbers() {
    let mut tbl = Table::default();
    let p = dnat_pair();
    handshake(&mut tbl, &p, (1, 3));
    feed(&mut tbl, active_close(100 * MS, &p, false, 200, "server"));
    feed(&mut tbl, passive_close(101 * MS, &p, true, 100, "client"));
    let out = tbl.take_all_closed();
    let c = only(&out, p.c);
    let s = only(&out, p.s);
    assert_eq!(
        c.peer.as_ref().map(|x| x.id),
        Some(s.conn.id),
        "the client socket is joined to the server socket behind the VIP"
    );
    assert!(c.peer.as_ref().is_some_and(|x| x.translated));
    assert_eq!(s.peer.as_ref().map(|x| x.id), Some(c.conn.id));
    assert_eq!(
        (c.verdict.closed_by, c.verdict.reason.as_str()),
        (ClosedBy::Server, "server_close")
    );
}

#[test]
fn rst_from_the_nat_host_while_the_server_lives_is_a_nat_reset() {
    use Dir::*;
    use TcpState::*;
    let mut tbl = Table::default();
    let p = dnat_pair();
    handshake(&mut tbl, &p, (1, 3));
    // The conntrack entry is gone: the router (the VIP's host, not the server) answers the
    // client's next segment with a no-socket RST from the VIP's address.
    let vip_view = p.ct.reversed();
    for ev in [
        pkt(3000 * MS, 0, vip_view, Egress, RST, p.sisn + 1, 64),
        pkt(3000 * MS, p.c, p.ct, Ingress, RST, p.sisn + 1, 63),
        base(3000 * MS, p.c, Some(p.ct), EventKind::RecvReset),
        state(3000 * MS, p.c, p.ct, Established, Close),
    ] {
        tbl.on_event(&ev);
    }
    let out = tbl.take_due(5000 * MS);
    let c = only(&out, p.c);
    assert_eq!(
        (
            c.verdict.closed_by,
            c.verdict.reason.as_str(),
            c.verdict.confidence
        ),
        (
            ClosedBy::Middlebox,
            "middlebox_reset",
            classify::Confidence::High
        ),
        "{:#?}",
        c.verdict
    );
    let mb = c.verdict.middlebox.as_ref().expect("middlebox object");
    assert_eq!(mb.kind, MiddleboxKind::Nat);
    // Without the join this RST would have looked like the server's kernel (no socket).
    assert!(
        c.verdict.hint.contains("address translation"),
        "{}",
        c.verdict.hint
    );
}

#[test]
fn rst_from_the_server_through_dnat_is_the_servers() {
    use Dir::*;
    use TcpState::*;
    let mut tbl = Table::default();
    let p = dnat_pair();
    handshake(&mut tbl, &p, (1, 3));
    for ev in [
        by(
            state(3000 * MS, p.s, p.st, Established, Close),
            200,
            "server",
            false,
        ),
        pkt(3000 * MS, p.s, p.st, Egress, RST, p.sisn + 1, 64),
        pkt(3000 * MS, p.c, p.ct, Ingress, RST, p.sisn + 1, 63),
        base(3000 * MS, p.c, Some(p.ct), EventKind::RecvReset),
        state(3000 * MS, p.c, p.ct, Established, Close),
    ] {
        tbl.on_event(&ev);
    }
    let out = tbl.take_all_closed();
    let c = only(&out, p.c);
    assert_eq!(
        (c.verdict.closed_by, c.verdict.reason.as_str()),
        (ClosedBy::Server, "server_abort"),
        "{:#?}",
        c.verdict
    );
}

#[test]
fn peer_reset_by_a_middlebox_passes_it_on_even_when_judged_in_the_same_tick() {
    let mut tbl = Table::default();
    let p = mk(3, "10.9.1.2:40000", "10.9.2.2:8080");
    handshake(&mut tbl, &p, (1, 2));
    feed(&mut tbl, rst_from_between(&p));
    // Both are due in the same pass.
    let out = tbl.take_due(5000 * MS);
    for sk in [p.c, p.s] {
        let v = verdict_of(&out, sk);
        assert_eq!(
            (v.closed_by, v.reason.as_str(), v.confidence),
            (
                ClosedBy::Middlebox,
                "middlebox_reset",
                classify::Confidence::High
            ),
            "socket {sk:#x}: {v:#?}"
        );
    }
}

#[test]
fn peer_reset_by_a_middlebox_passes_it_on_when_judged_out_of_turn() {
    use TcpState::*;
    let mut tbl = Table::default();
    let p = mk(4, "10.9.1.2:40000", "10.9.2.2:8080");
    handshake(&mut tbl, &p, (1, 2));
    feed(&mut tbl, rst_from_between(&p));
    // The server socket's memory is reused at once: it is judged at the next tick, before
    // the client's linger is over.
    let reused = tuple("10.9.2.2:8080", "10.9.1.9:41000");
    assert!(
        tbl.on_event(&state(1060 * MS, p.s, reused, Listen, SynRecv))
            .is_empty()
    );
    let early = tbl.take_due(1100 * MS);
    assert!(
        early.iter().all(|c| c.conn.skaddr != p.c),
        "the client lingers"
    );
    let v = verdict_of(&early, p.s);
    assert_eq!(
        (v.closed_by, v.reason.as_str(), v.confidence),
        (
            ClosedBy::Middlebox,
            "middlebox_reset",
            classify::Confidence::High
        ),
        "{v:#?}"
    );
}

/// A scan against closed ports makes a host send RST after RST. When those push the real
/// peer's RST out of the provenance log before the connection is judged, its absence must
/// not read as "a RST the peer never sent" (a middlebox, high): the evictions are counted and
/// the peer's own record of its reset decides.
#[test]
fn rst_log_flood_does_not_turn_a_peer_reset_into_a_middlebox() {
    use Dir::*;
    use TcpState::*;
    let mut tbl = Table::default();
    let p = mk(7, "10.9.1.2:40000", "10.9.2.2:8080");
    handshake(&mut tbl, &p, (1, 2));
    let mut evs = vec![
        // The server aborts: its socket sends the RST, the client receives it.
        pkt(1000 * MS, p.s, p.st, Egress, RST, p.sisn + 1, 64),
        state(1000 * MS, p.s, p.st, Established, Close),
        pkt(1000 * MS, p.c, p.ct, Ingress, RST, p.sisn + 1, 63),
        base(1000 * MS, p.c, Some(p.ct), EventKind::RecvReset),
        state(1000 * MS, p.c, p.ct, Established, Close),
    ];
    // Then a scan: 20 000 no-socket RSTs within the linger period.
    for i in 0..20_000u32 {
        let t = tuple(
            &format!("10.9.2.2:{}", 1 + i % 60_000),
            &format!("10.9.3.{}:{}", 1 + i / 60_000, 40_000 + i % 20_000),
        );
        evs.push(pkt(1000 * MS + 1 + u64::from(i), 0, t, Egress, RST, i, 64));
    }
    for ev in &evs {
        tbl.on_event(ev);
    }
    let out = tbl.take_due(5000 * MS);
    let v = verdict_of(&out, p.c);
    assert_ne!(v.closed_by, ClosedBy::Middlebox, "{v:#?}");
    assert!(tbl.stats.rst_log_evictions > 0);
}
