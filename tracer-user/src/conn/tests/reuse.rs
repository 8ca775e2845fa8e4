//! Address reuse must not change what is proven. The kernel hands a closed socket's memory
//! to a new socket at any moment, so a record can be retired (and judged in the next tick)
//! before its linger is over, before or after the records of its peer and of a proxy's
//! other leg. For each scenario the verdicts with every socket's address reused, in every
//! order and at every point after its CLOSE, are compared with the verdicts of the same
//! events without reuse: they must be the same, or at least not claim `high` for anything
//! else (CI once saw a wrong high from exactly this: a proxy's other leg retired behind the
//! client's record).

use super::mbox::{ProxyHost, active_close, dnat_pair, mk, passive_close, rst_from_between};
use super::*;
use crate::classify::Confidence;

struct Scenario {
    name: &'static str,
    events: Vec<Event>,
    /// The sockets that close (their verdicts are compared).
    socks: Vec<u64>,
}

fn client_close() -> Scenario {
    let p = pair(1);
    let mut ev = handshake_events(&p, (1, 2), 100, "client");
    ev.extend(active_close(100 * MS, &p, true, 100, "client"));
    ev.extend(passive_close(101 * MS, &p, false, 200, "server"));
    Scenario {
        name: "client close",
        events: ev,
        socks: vec![p.c, p.s],
    }
}

fn killed_server() -> Scenario {
    let p = pair(2);
    let mut ev = handshake_events(&p, (1, 2), 100, "client");
    ev.extend(killed_server_events(&p));
    Scenario {
        name: "server killed with unread data",
        events: ev,
        socks: vec![p.s, p.c],
    }
}

/// A RST neither end sent, then the server's write answered by the client's kernel.
fn middlebox_reset() -> Scenario {
    let p = mk(3, "10.9.1.2:40000", "10.9.2.2:8080");
    let mut ev = handshake_events(&p, (1, 2), 100, "client");
    ev.extend(rst_from_between(&p));
    Scenario {
        name: "middlebox reset seen by both ends",
        events: ev,
        socks: vec![p.c, p.s],
    }
}

fn dnat_server_close() -> Scenario {
    let p = dnat_pair();
    let mut ev = handshake_events(&p, (1, 3), 100, "client");
    ev.extend(active_close(100 * MS, &p, false, 200, "server"));
    ev.extend(passive_close(101 * MS, &p, true, 100, "client"));
    Scenario {
        name: "server close through DNAT",
        events: ev,
        socks: vec![p.c, p.s],
    }
}

/// client -> proxy -> server; `relay` passes the server's close on, else the proxy ends
/// both legs itself.
fn proxied(name: &'static str, comm: &str, relay: bool) -> Scenario {
    let h = ProxyHost::new();
    let mut ev = h.handshakes(comm);
    ev.extend(if relay {
        h.relay_close(comm)
    } else {
        h.proxy_timeout(comm)
    });
    Scenario {
        name,
        events: ev,
        socks: vec![h.down.c, h.down.s, h.up.c, h.up.s],
    }
}

/// An HTTP/2 frame as both ends' kernels report it: sent by `from`, received by `to`.
fn h2_both(
    ts: u64,
    from: (u64, Tuple),
    to: (u64, Tuple),
    head: [u8; 9],
    body: &[u8],
) -> [Event; 2] {
    let frame = |sk: u64, t: Tuple, dir: Dir| {
        base(
            ts,
            sk,
            Some(t),
            EventKind::H2Frame {
                dir,
                seq: 0,
                head,
                payload: bytes::Bytes::copy_from_slice(body),
            },
        )
    };
    [
        frame(from.0, from.1, Dir::Egress),
        frame(to.0, to.1, Dir::Ingress),
    ]
}

/// nginx (HTTP/2 to the client, any protocol upstream) ends an idle client connection with
/// GOAWAY(NO_ERROR), then FIN, and closes its backend leg at the same moment.
fn nginx_goaway() -> Scenario {
    let h = ProxyHost::new();
    let d = &h.down;
    let (client, proxy) = ((d.c, d.ct), (d.s, d.st));
    let mut ev = h.handshakes("nginx");
    for (sk, t, dir) in [(d.c, d.ct, Dir::Egress), (d.s, d.st, Dir::Ingress)] {
        ev.push(base(
            2 * MS,
            sk,
            Some(t),
            EventKind::H2Proto {
                dir,
                seq: 0,
                note: crate::event::ProtoNote::H2Preface,
            },
        ));
    }
    ev.extend(h2_both(
        3 * MS,
        client,
        proxy,
        [0, 0, 0, 4, 0, 0, 0, 0, 0],
        &[],
    ));
    ev.extend(h2_both(
        3 * MS,
        client,
        proxy,
        [0, 0, 5, 1, 0x5, 0, 0, 0, 1],
        &[],
    ));
    ev.extend(h2_both(
        4 * MS,
        proxy,
        client,
        [0, 0, 0, 4, 0, 0, 0, 0, 0],
        &[],
    ));
    ev.extend(h2_both(
        4 * MS,
        proxy,
        client,
        [0, 0, 0, 4, 0x1, 0, 0, 0, 0],
        &[],
    ));
    ev.extend(h2_both(
        4 * MS,
        client,
        proxy,
        [0, 0, 0, 4, 0x1, 0, 0, 0, 0],
        &[],
    ));
    ev.extend(h2_both(
        5 * MS,
        proxy,
        client,
        [0, 0, 8, 1, 0x5, 0, 0, 0, 1],
        &[],
    ));
    ev.extend(h2_both(
        4999 * MS,
        proxy,
        client,
        [0, 0, 8, 7, 0, 0, 0, 0, 0],
        &[0, 0, 0, 1, 0, 0, 0, 0],
    ));
    ev.extend(h.proxy_timeout("nginx"));
    Scenario {
        name: "nginx GOAWAY on an idle client connection",
        events: ev,
        socks: vec![h.down.c, h.down.s, h.up.c, h.up.s],
    }
}

fn scenarios() -> Vec<Scenario> {
    vec![
        client_close(),
        killed_server(),
        middlebox_reset(),
        dnat_server_close(),
        proxied("haproxy passes the server's close on", "haproxy", true),
        proxied(
            "an unnamed relay passes the server's close on",
            "relay",
            true,
        ),
        proxied("haproxy ends both legs", "haproxy", false),
        proxied("an unnamed relay ends both legs", "relay", false),
        nginx_goaway(),
    ]
}

/// What must not change: who, why, how, how sure, and the middlebox kind.
type Sig = (
    ClosedBy,
    String,
    Mechanism,
    Confidence,
    Option<classify::MiddleboxKind>,
);

fn sig(v: &classify::Verdict) -> Sig {
    (
        v.closed_by,
        v.reason.as_str().to_string(),
        v.mechanism,
        v.confidence,
        v.middlebox.as_ref().map(|m| m.kind),
    )
}

fn verdicts(out: &[Closed], socks: &[u64]) -> Vec<Sig> {
    socks
        .iter()
        .map(|&sk| sig(&only(out, sk).verdict))
        .collect()
}

/// A new socket takes `sk`'s address.
fn reuse(ts: u64, sk: u64, n: usize) -> Event {
    let t = tuple(&format!("10.9.7.1:{}", 41000 + n), "10.9.7.2:80");
    by(
        state(ts, sk, t, TcpState::Close, TcpState::SynSent),
        999,
        "newcomer",
        false,
    )
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut all = Vec::new();
    for p in permutations(n - 1) {
        for i in 0..=p.len() {
            let mut q = p.clone();
            q.insert(i, n - 1);
            all.push(q);
        }
    }
    all
}

fn last_ts(events: &[Event]) -> u64 {
    events.iter().map(|e| e.ts_ns).max().unwrap_or(0)
}

/// Index of the event that takes `sk` to CLOSE.
fn close_at(events: &[Event], sk: u64) -> usize {
    events
        .iter()
        .position(|e| {
            e.skaddr == sk
                && matches!(
                    e.kind,
                    EventKind::State {
                        new: TcpState::Close,
                        ..
                    }
                )
        })
        .expect("the socket closes")
}

fn baseline(s: &Scenario) -> Vec<Sig> {
    judged(&s.events, &s.socks)
}

/// `events` through one table, every record judged at the end; the verdicts of `socks`.
fn judged(events: &[Event], socks: &[u64]) -> Vec<Sig> {
    let mut tbl = Table::default();
    for ev in events {
        tbl.on_event(ev);
    }
    verdicts(&tbl.take_all_closed(), socks)
}

/// Every socket's address reused after the last event, in `order`; one tick judges them.
fn reused_at_end(s: &Scenario, order: &[usize]) -> Vec<Sig> {
    let mut tbl = Table::default();
    let mut out = Vec::new();
    for ev in &s.events {
        out.extend(tbl.on_event(ev));
    }
    let t = last_ts(&s.events);
    for (n, &i) in order.iter().enumerate() {
        out.extend(tbl.on_event(&reuse(t + 1 + n as u64, s.socks[i], n)));
    }
    out.extend(tbl.take_due(t + 100));
    out.extend(tbl.take_all_closed());
    verdicts(&out, &s.socks)
}

/// `sk`'s address reused right after its CLOSE; with `tick`, a tick right after each reuse
/// (the retired record judged while the others are still open or lingering).
fn reused_at_close(s: &Scenario, tick: bool) -> Vec<Sig> {
    let mut tbl = Table::default();
    let mut out = Vec::new();
    let closes: Vec<(usize, u64)> = s
        .socks
        .iter()
        .map(|&sk| (close_at(&s.events, sk), sk))
        .collect();
    for (i, ev) in s.events.iter().enumerate() {
        out.extend(tbl.on_event(ev));
        for (n, &(_, sk)) in closes.iter().enumerate().filter(|(_, (at, _))| *at == i) {
            out.extend(tbl.on_event(&reuse(ev.ts_ns, sk, n)));
            if tick {
                out.extend(tbl.take_due(ev.ts_ns));
            }
        }
    }
    out.extend(tbl.take_all_closed());
    verdicts(&out, &s.socks)
}

fn no_wrong_high(what: &str, s: &Scenario, base: &[Sig], got: &[Sig]) {
    for ((sk, b), g) in s.socks.iter().zip(base).zip(got) {
        assert!(
            g == b || g.3 != Confidence::High,
            "{}: {what}: socket {sk:#x} claims {g:?} with high confidence; with every \
             event judged together it is {b:?}",
            s.name
        );
    }
}

#[test]
fn reuse_in_any_order_after_the_last_event_changes_no_verdict() {
    for s in scenarios() {
        let base = baseline(&s);
        for order in permutations(s.socks.len()) {
            let got = reused_at_end(&s, &order);
            assert_eq!(got, base, "{}: reused in order {order:?}", s.name);
        }
    }
}

#[test]
fn reuse_right_after_each_close_changes_no_verdict() {
    for s in scenarios() {
        let base = baseline(&s);
        assert_eq!(reused_at_close(&s, false), base, "{}", s.name);
    }
}

/// Judged at once, a record may miss what its peer or the proxy's other leg has not done
/// yet: it may say less, never a different story with high confidence.
#[test]
fn reuse_judged_before_the_others_close_never_claims_a_wrong_high() {
    for s in scenarios() {
        let base = baseline(&s);
        let got = reused_at_close(&s, true);
        no_wrong_high("judged in the tick after its reuse", &s, &base, &got);
    }
}

#[test]
fn the_scenarios_cover_what_they_name() {
    let want: [(&str, &[(ClosedBy, &str)]); 4] = [
        (
            "haproxy passes the server's close on",
            &[(ClosedBy::Server, "server_close"); 4],
        ),
        (
            "haproxy ends both legs",
            &[(ClosedBy::Middlebox, "proxy_close"); 4],
        ),
        (
            "middlebox reset seen by both ends",
            &[(ClosedBy::Middlebox, "middlebox_reset"); 2],
        ),
        (
            "nginx GOAWAY on an idle client connection",
            &[
                (ClosedBy::Middlebox, "proxy_goaway"),
                (ClosedBy::Middlebox, "proxy_goaway"),
                (ClosedBy::Middlebox, "proxy_close"),
                (ClosedBy::Middlebox, "proxy_close"),
            ],
        ),
    ];
    let all = scenarios();
    for (name, expect) in want {
        let s = all.iter().find(|s| s.name == name).expect("scenario");
        let got: Vec<(ClosedBy, String)> = baseline(s).into_iter().map(|g| (g.0, g.1)).collect();
        let expect: Vec<(ClosedBy, String)> =
            expect.iter().map(|(c, r)| (*c, r.to_string())).collect();
        assert_eq!(got, expect, "{name}");
    }
}

/// Half-closed legs are kept per process until they close: after every scenario, with and
/// without reuse, none is left, and the running count agrees with the queues throughout.
#[test]
fn half_closed_legs_leave_when_they_close() {
    for s in scenarios() {
        let mut tbl = Table::default();
        for ev in &s.events {
            tbl.on_event(ev);
            let (total, sum) = tbl.ending_legs_counted();
            assert_eq!(total, sum, "{}", s.name);
        }
        tbl.take_all_closed();
        let (total, sum) = tbl.ending_legs_counted();
        assert_eq!((total, sum), (0, 0), "{}: every socket closed", s.name);
    }
}

/// Events of different sockets come from different CPUs through one ring buffer, so two
/// neighbours can arrive in either order. Swapping any two adjacent events of different
/// sockets gives the same verdicts, or at least no other story with high confidence.
#[test]
fn neighbouring_events_of_two_sockets_in_either_order_never_claim_a_wrong_high() {
    let (mut swapped_any, mut differ) = (0, 0);
    for s in scenarios() {
        let base = baseline(&s);
        for i in 0..s.events.len().saturating_sub(1) {
            if s.events[i].skaddr == s.events[i + 1].skaddr {
                continue;
            }
            let mut events = s.events.clone();
            events.swap(i, i + 1);
            let got = judged(&events, &s.socks);
            no_wrong_high(
                &format!("events {i} and {} swapped", i + 1),
                &s,
                &base,
                &got,
            );
            swapped_any += 1;
            if got != base {
                differ += 1;
                eprintln!("{}: events {i} and {} swapped: {got:?}", s.name, i + 1);
            }
        }
    }
    eprintln!("{swapped_any} swaps, {differ} with some verdict changed (none to a high)");
    assert!(swapped_any > 50, "{swapped_any} swaps tried");
}

/// One socket's events arrive late, each overtaken by up to `lag` events of the others (its
/// CPU was slow to commit to the ring buffer): no other story with high confidence.
#[test]
fn one_sockets_events_arriving_late_never_claim_a_wrong_high() {
    let mut tried = 0;
    for s in scenarios() {
        let base = baseline(&s);
        let mut socks: Vec<u64> = s.events.iter().map(|e| e.skaddr).collect();
        socks.sort_unstable();
        socks.dedup();
        for &late in &socks {
            for lag in 1..=6usize {
                let mut keyed: Vec<(usize, usize, &Event)> = s
                    .events
                    .iter()
                    .enumerate()
                    .map(|(i, e)| (2 * (i + if e.skaddr == late { lag } else { 0 }) + 1, i, e))
                    .collect();
                keyed.sort_by_key(|k| (k.0, k.1));
                let events: Vec<Event> = keyed.into_iter().map(|k| k.2.clone()).collect();
                let got = judged(&events, &s.socks);
                no_wrong_high(
                    &format!("socket {late:#x}'s events {lag} late"),
                    &s,
                    &base,
                    &got,
                );
                tried += 1;
            }
        }
    }
    assert!(tried > 100, "{tried} orders tried");
}
