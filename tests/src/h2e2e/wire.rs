//! Wire cross-checks: the scenarios run WITHOUT the agent while tcpdump captures in the
//! client namespace; tshark reads the capture back. They pin what the peers put on the
//! wire (GOAWAY codes and debug texts, PINGs, RST_STREAM, who sends the first FIN) and so
//! what the agent cases may assert (grpcio 1.85.1, nghttp2 1.52).

use super::grpc::{IDLE_GOAWAY, MAX_AGE_DEBUG, MAX_STREAM_ID, TOO_MANY_PINGS};
use crate::Topology;
use crate::h2peers::{Capture, WireEvent, WireKind, wire_events};
use std::time::Duration;

/// Captures in the client namespace while `scenario` runs; returns the timeline.
pub fn capture<T>(
    test: &str,
    t: &Topology,
    port: u16,
    scenario: impl FnOnce(&Topology) -> T,
) -> (T, Vec<WireEvent>) {
    let path = std::env::temp_dir().join(format!("whoclosed-{test}-{}.pcap", std::process::id()));
    let cap = Capture::start(&t.client, port, &path).unwrap_or_else(|e| panic!("{e:#}"));
    let out = scenario(t);
    // Let the last FIN/ACKs arrive.
    std::thread::sleep(Duration::from_millis(300));
    let (path, summary) = cap.stop();
    let evs = wire_events(&path, port).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "{test}: {} ({})",
        path.display(),
        summary.trim().replace('\n', "; ")
    );
    for e in &evs {
        eprintln!("  {:>10.6}  {:<16} {:?}", e.at, e.from, e.kind);
    }
    if std::env::var_os("WHOCLOSED_KEEP_PCAP").is_none() {
        let _ = std::fs::remove_file(&path);
    }
    (out, evs)
}

pub fn from<'a>(evs: &'a [WireEvent], ip: &'a str) -> impl Iterator<Item = &'a WireEvent> + 'a {
    evs.iter().filter(move |e| e.from == ip)
}

pub fn goaways(evs: &[WireEvent], ip: &str) -> Vec<(u32, u32, String)> {
    from(evs, ip)
        .filter_map(|e| match &e.kind {
            WireKind::Goaway {
                code,
                last_stream_id,
                debug,
            } => Some((*code, *last_stream_id, debug.clone())),
            _ => None,
        })
        .collect()
}

pub fn first_fin(evs: &[WireEvent]) -> Option<&WireEvent> {
    evs.iter().find(|e| e.kind == WireKind::Fin)
}

pub fn at_of(evs: &[WireEvent], ip: &str, pred: impl Fn(&WireKind) -> bool) -> Option<f64> {
    from(evs, ip).find(|e| pred(&e.kind)).map(|e| e.at)
}

pub fn no_resets(evs: &[WireEvent]) {
    assert!(
        !evs.iter().any(|e| e.kind == WireKind::Rst),
        "unexpected TCP RST: {evs:#?}"
    );
}

/// The client closed first: a RST may follow, only from the client and only after its
/// FIN. grpc servers send a PING ~100 ms after a call (a bandwidth probe); when it reaches
/// the client after `channel.close()`, the client's kernel answers the unread bytes with a
/// RST. The client's first ending is still its FIN.
pub fn client_resets_only_after_its_fin(evs: &[WireEvent], cip: &str, sip: &str) {
    let cfin = at_of(evs, cip, |k| *k == WireKind::Fin).expect("client FIN");
    assert!(
        !from(evs, sip).any(|e| e.kind == WireKind::Rst),
        "the server never resets: {evs:#?}"
    );
    if let Some(r) = at_of(evs, cip, |k| *k == WireKind::Rst) {
        assert!(r >= cfin, "a client RST only after its FIN: {evs:#?}");
        eprintln!(
            "client RST {:.3} ms after its FIN (late server bytes)",
            (r - cfin) * 1e3
        );
    }
}

pub fn ips(t: &Topology, v6: bool) -> (String, String) {
    (t.client_ip(v6).to_string(), t.server_ip(v6).to_string())
}

/// `S:GOAWAY`, `C:PING-ack`, `S:FIN`, ... (SETTINGS, HEADERS and the handshake left out).
pub fn timeline(evs: &[WireEvent], server_ip: &str) -> Vec<String> {
    evs.iter()
        .filter_map(|e| {
            let w = if e.from == server_ip { "S" } else { "C" };
            let k = match &e.kind {
                WireKind::Goaway { .. } => "GOAWAY",
                WireKind::Ping { ack: true } => "PING-ack",
                WireKind::Ping { ack: false } => "PING",
                WireKind::Fin => "FIN",
                WireKind::Rst => "RST",
                WireKind::RstStream { .. } => "RST_STREAM",
                _ => return None,
            };
            Some(format!("{w}:{k}"))
        })
        .collect()
}

/// After the server's (last) GOAWAY both ends FIN within 100 ms: the server closes right
/// after sending it, the client as soon as it reads it, so which FIN is first is a race
/// (usually the server's by ~0.1-0.5 ms).
pub fn fins_follow_goaway(what: &str, evs: &[WireEvent], cip: &str, sip: &str) {
    let ga = from(evs, sip)
        .filter(|e| matches!(e.kind, WireKind::Goaway { .. }))
        .last()
        .expect("a server GOAWAY")
        .at;
    let sfin = at_of(evs, sip, |k| *k == WireKind::Fin).expect("server FIN");
    let cfin = at_of(evs, cip, |k| *k == WireKind::Fin).expect("client FIN");
    for (who, f) in [("server", sfin), ("client", cfin)] {
        assert!(
            f >= ga && f - ga < 0.1,
            "{who} FIN {:.3} ms after the GOAWAY: {evs:#?}",
            (f - ga) * 1e3
        );
    }
    eprintln!(
        "{what}: server FIN +{:.3} ms, client FIN +{:.3} ms after the server's GOAWAY",
        (sfin - ga) * 1e3,
        (cfin - ga) * 1e3
    );
}

// ---- What each scenario must look like on the wire.

/// grpc `max_connection_idle`: one server GOAWAY, then both FINs, no RST.
pub fn check_grpc_max_idle(t: &Topology, evs: &[WireEvent]) {
    let (cip, sip) = ips(t, false);
    assert_eq!(
        goaways(evs, &sip),
        vec![(IDLE_GOAWAY.1 as u32, 1, IDLE_GOAWAY.2.to_string())]
    );
    assert!(goaways(evs, &cip).is_empty());
    fins_follow_goaway("max_idle", evs, &cip, &sip);
    no_resets(evs);
}

/// grpc `max_connection_age`: the two-GOAWAY drain with its PING; the client's FIN races
/// the second GOAWAY.
pub fn check_grpc_max_age(t: &Topology, evs: &[WireEvent]) {
    let (cip, sip) = ips(t, false);
    let m = MAX_AGE_DEBUG.to_string();
    // The server always sends both GOAWAYs (even when the client closed in between).
    assert_eq!(
        goaways(evs, &sip),
        vec![(0, MAX_STREAM_ID as u32, m.clone()), (0, 1, m)]
    );
    assert!(goaways(evs, &cip).is_empty());
    // GOAWAY#1 and the server's PING, then the client's ack; the rest is a race between
    // the client closing its idle transport on GOAWAY#1 (FIN, then its kernel RSTs the
    // late GOAWAY#2) and the server's GOAWAY#2 + FIN.
    let tl = timeline(evs, &sip);
    let start = tl
        .iter()
        .position(|s| s == "S:GOAWAY")
        .expect("a server GOAWAY");
    assert_eq!(
        tl[start..start + 3],
        ["S:GOAWAY", "S:PING", "C:PING-ack"],
        "{tl:?}"
    );
    let rest = &tl[start + 3..];
    eprintln!("after the drain PING: {rest:?}");
    assert!(rest.contains(&"S:GOAWAY".to_string()), "{tl:?}");
    let cfin = rest.iter().position(|s| s == "C:FIN").expect("client FIN");
    if let Some(r) = rest.iter().position(|s| s == "C:RST") {
        assert!(r > cfin, "a client RST only after the client's FIN: {tl:?}");
    }
    assert!(
        !tl.iter().any(|s| s == "S:RST"),
        "the server never resets: {tl:?}"
    );
}

/// grpc ping enforcement: ENHANCE_YOUR_CALM after keepalive PINGs ~1 s apart.
pub fn check_grpc_too_many_pings(t: &Topology, evs: &[WireEvent]) {
    let (cip, sip) = ips(t, false);
    assert_eq!(
        goaways(evs, &sip),
        vec![(TOO_MANY_PINGS.1 as u32, 1, TOO_MANY_PINGS.2.to_string())]
    );
    let pings: Vec<f64> = from(evs, &cip)
        .filter(|e| e.kind == WireKind::Ping { ack: false })
        .map(|e| e.at)
        .collect();
    let gaps: Vec<f64> = pings.windows(2).map(|w| (w[1] - w[0]) * 1000.0).collect();
    eprintln!("client PING gaps (ms): {gaps:?}");
    assert!(pings.len() >= 3, "client PINGs: {pings:?}");
    assert!(
        gaps.iter().skip(1).all(|g| (800.0..=1500.0).contains(g)),
        "keepalive PINGs ~1 s apart: {gaps:?}"
    );
    fins_follow_goaway("too_many_pings", evs, &cip, &sip);
    no_resets(evs);
}

/// grpc `channel.close()`: no GOAWAY either way, the client FINs first.
pub fn check_grpc_client_close(t: &Topology, evs: &[WireEvent]) {
    let (cip, sip) = ips(t, false);
    assert!(
        goaways(evs, &cip).is_empty(),
        "grpcio sends no GOAWAY on close"
    );
    assert!(goaways(evs, &sip).is_empty());
    assert_eq!(
        first_fin(evs).expect("a FIN").from,
        cip,
        "client FINs first"
    );
    client_resets_only_after_its_fin(evs, &cip, &sip);
}

/// grpc keepalive behind a blackhole: nothing leaves the client after its last PING.
pub fn check_grpc_keepalive_blackhole(t: &Topology, evs: &[WireEvent]) {
    let (cip, _) = ips(t, false);
    // The last thing the client sent: its keepalive PING (and its retransmissions).
    let last_ping = from(evs, &cip)
        .filter(|e| e.kind == WireKind::Ping { ack: false })
        .last()
        .expect("a client PING")
        .at;
    let after: Vec<&WireEvent> = from(evs, &cip).filter(|e| e.at > last_ping).collect();
    assert!(
        after.is_empty(),
        "nothing (no GOAWAY, FIN or RST) leaves the client after its PING: {after:#?}"
    );
}

/// grpc call cancelled: one RST_STREAM(CANCEL) from the client, no GOAWAY, client FIN first.
pub fn check_grpc_stream_cancel(t: &Topology, evs: &[WireEvent]) {
    let (cip, sip) = ips(t, false);
    let rst: Vec<(u32, u32)> = from(evs, &cip)
        .filter_map(|e| match e.kind {
            WireKind::RstStream { stream, code } => Some((stream, code)),
            _ => None,
        })
        .collect();
    assert_eq!(
        rst,
        vec![(3, 8)],
        "one RST_STREAM(CANCEL) on the second stream"
    );
    assert!(
        !from(evs, &sip).any(|e| matches!(e.kind, WireKind::RstStream { .. })),
        "the server sends no RST_STREAM"
    );
    assert!(goaways(evs, &cip).is_empty() && goaways(evs, &sip).is_empty());
    assert_eq!(first_fin(evs).expect("a FIN").from, cip);
    client_resets_only_after_its_fin(evs, &cip, &sip);
}

/// nghttp fetch: the client's GOAWAY(NO_ERROR, 0), none from nghttpd, both FINs after it.
pub fn check_nghttp_goaway(t: &Topology, v6: bool, evs: &[WireEvent]) {
    let (cip, sip) = ips(t, v6);
    assert_eq!(goaways(evs, &cip), vec![(0, 0, String::new())]);
    assert!(goaways(evs, &sip).is_empty(), "nghttpd sends no GOAWAY");
    let ga = at_of(evs, &cip, |k| matches!(k, WireKind::Goaway { .. })).expect("goaway");
    let cfin = at_of(evs, &cip, |k| *k == WireKind::Fin).expect("client FIN");
    let sfin = at_of(evs, &sip, |k| *k == WireKind::Fin).expect("server FIN");
    assert!(cfin >= ga && sfin >= ga, "both FINs follow the GOAWAY");
    eprintln!(
        "v6={v6}: client FIN +{:.3} ms, server FIN +{:.3} ms after the GOAWAY",
        (cfin - ga) * 1e3,
        (sfin - ga) * 1e3
    );
    no_resets(evs);
}
