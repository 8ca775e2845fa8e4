//! HTTP/2 end-to-end tests: real gRPC (Python grpcio) and nghttp2 peers between the
//! topology's namespaces, traced by the whoclosed agent, which must tell who ended the
//! connection at L7 (GOAWAY, keepalive PINGs) as well as at L4 (`tcp_initiator`).
//!
//! Each case: gate, topology, agent, scenario, then the case's checks; the scenarios and
//! checks live in `tests::h2e2e`. Needs root, the agent binary (`cargo build`; or
//! `$WHOCLOSED_BIN`) and the peers: a venv with grpcio at `$WHOCLOSED_VENV` (default
//! `~/.cache/whoclosed/venv`) for `grpc_*`, nghttp2's `nghttpd`, `nghttp`, `h2load` for
//! `nghttp_*` / `h2load_*`. Missing pieces skip the case with the reason, or fail it under
//! `WHOCLOSED_E2E=require`. `cargo xtask vm test --suite h2` runs this binary in QEMU
//! guests, which carry the nghttp2 tools but no Python: there the `grpc_*` cases skip.
//! What the peers put on the wire is pinned by `h2_wire.rs`.

use std::path::Path;
use tests::Topology;
use tests::h2e2e::frames::{self, Link};
use tests::h2e2e::nghttp::{self, BIG};
use tests::h2e2e::{Need, grpc, plain, prelude, start_agent, stop};
use tests::h2peers::DocRoot;

const WC_PEER: &str = env!("CARGO_BIN_EXE_wc-peer");
const NGHTTP: Need = Need::Nghttp2(&["nghttpd", "nghttp"]);

/// Case 1: `grpc.max_connection_idle_ms=1000`; the client makes one call and idles.
#[test]
fn grpc_server_max_idle() {
    if !prelude("grpc_server_max_idle", Need::Grpc) {
        return;
    }
    let t = Topology::new().expect("topology");
    let mut agent = start_agent(&t);
    let g = grpc::scenario_max_idle(&t);
    let (c, sv) = g.closes(&mut agent);
    grpc::check_max_idle(&g, &c, &sv);
    stop(agent);
}

/// Case 2: `max_connection_age_ms=1000`, grace 500 ms, idle client: grpc's two-GOAWAY
/// drain; the L7 verdict must not depend on which FIN is first.
#[test]
fn grpc_server_max_age() {
    if !prelude("grpc_server_max_age", Need::Grpc) {
        return;
    }
    let t = Topology::new().expect("topology");
    let mut agent = start_agent(&t);
    let g = grpc::scenario_max_age(&t);
    let (c, sv) = g.closes(&mut agent);
    grpc::check_max_age(&g, &c, &sv);
    stop(agent);
}

/// Case 3: ping enforcement: ENHANCE_YOUR_CALM "too_many_pings".
#[test]
fn grpc_too_many_pings() {
    if !prelude("grpc_too_many_pings", Need::Grpc) {
        return;
    }
    let t = Topology::new().expect("topology");
    let mut agent = start_agent(&t);
    let g = grpc::scenario_too_many_pings(&t);
    let (c, sv) = g.closes(&mut agent);
    grpc::check_too_many_pings(&g, &c, &sv);
    stop(agent);
}

/// Case 4: `channel.close()` after three calls: a FIN, no GOAWAY.
#[test]
fn grpc_client_closes_channel() {
    if !prelude("grpc_client_closes_channel", Need::Grpc) {
        return;
    }
    let t = Topology::new().expect("topology");
    let mut agent = start_agent(&t);
    let g = grpc::scenario_client_close(&t);
    let (c, sv) = g.closes(&mut agent);
    grpc::check_client_close(&g, &c, &sv);
    stop(agent);
}

/// Case 5: keepalive PINGs unanswered behind a blackhole; the client gives up.
#[test]
fn grpc_client_keepalive_blackhole() {
    if !prelude("grpc_client_keepalive_blackhole", Need::Grpc) {
        return;
    }
    let t = Topology::new().expect("topology");
    let mut agent = start_agent(&t);
    let g = grpc::scenario_keepalive_blackhole(&t);
    let c = g.client_close(&mut agent);
    grpc::check_keepalive_blackhole(&g, &c);
    stop(agent);
}

/// Case 6: a cancelled call is a stream reset, not the end of the connection.
#[test]
fn grpc_stream_cancel_is_not_a_close() {
    if !prelude("grpc_stream_cancel_is_not_a_close", Need::Grpc) {
        return;
    }
    let t = Topology::new().expect("topology");
    let mut agent = start_agent(&t);
    let g = grpc::scenario_stream_cancel(&t);
    let (c, sv) = g.closes(&mut agent);
    grpc::check_stream_cancel(&g, &c, &sv);
    stop(agent);
}

/// Case 7a: 100 MB download over HTTP/2 (IPv4): frame tracking survives the bulk DATA,
/// and nghttp's final GOAWAY is parsed.
#[test]
fn nghttp_bulk_100mb_then_close() {
    if !prelude("nghttp_bulk_100mb_then_close", NGHTTP) {
        return;
    }
    let t = Topology::new().expect("topology");
    let docroot = DocRoot::new(BIG).expect("docroot");
    let mut agent = start_agent(&t);
    let f = nghttp::scenario_nghttp(&t, false, "big", &docroot);
    eprintln!("nghttp fetched {BIG} bytes in {:?}", f.elapsed);
    nghttp::check_nghttp_fetch(&mut agent, &f);
    stop(agent);
}

/// Case 7b: a small HTTP/2 fetch over IPv6.
#[test]
fn nghttp_ipv6_close() {
    if !prelude("nghttp_ipv6_close", NGHTTP) {
        return;
    }
    let t = Topology::new().expect("topology");
    let docroot = DocRoot::new(4096).expect("docroot");
    let mut agent = start_agent(&t);
    let f = nghttp::scenario_nghttp(&t, true, "small", &docroot);
    nghttp::check_ipv6_family(&mut agent, &f);
    nghttp::check_nghttp_fetch(&mut agent, &f);
    stop(agent);
}

/// Case 8: h2load, 100 requests over 2 connections: every close is tracked in sync.
#[test]
fn h2load_through_agent() {
    if !prelude(
        "h2load_through_agent",
        Need::Nghttp2(&["nghttpd", "h2load"]),
    ) {
        return;
    }
    let t = Topology::new().expect("topology");
    let docroot = DocRoot::new(4096).expect("docroot");
    let mut agent = start_agent(&t);
    let (cs, ss) = nghttp::h2load_closes(&t, &mut agent, &docroot, 100, 2);
    nghttp::check_h2load(&cs, &ss);
    stop(agent);
}

/// Case 9: a plain TCP connection carrying non-HTTP/2 bytes.
#[test]
fn plain_tcp_not_h2() {
    if !prelude("plain_tcp_not_h2", Need::Nothing) {
        return;
    }
    let t = Topology::new().expect("topology");
    let mut agent = start_agent(&t);
    let (c, sv) = plain::exchange(Path::new(WC_PEER), &t, &mut agent);
    plain::check_not_h2((&c.0, c.1), (&sv.0, sv.1));
    stop(agent);
}

/// Case 10: many small frames in one segment, the GOAWAY last. The walker's first run
/// (a tail call from the entry program) walks 12 frames; its continuations (tail calls,
/// 33 in all: 396 frames, 384 on 5.10) walk on, so 10, 20 and 80
/// PINGs before the GOAWAY over veth (one segment holds at most 1,448 bytes) and 300 on
/// loopback (one segment holds 64 KiB) are all walked without losing sync. 600 are past
/// the last tail call: the direction loses sync and says so (`h2.desyncs`), and the GOAWAY
/// after the lost boundary is not made up.
#[test]
fn many_frames_in_one_segment() {
    if !prelude("many_frames_in_one_segment", Need::Nothing) {
        return;
    }
    let t = Topology::new().expect("topology");
    let mut agent = start_agent(&t);
    assert_eq!(
        agent.ready()["h2_frames"],
        true,
        "the walker programs must load wherever the packet hooks do: {}",
        agent.ready()
    );
    let cases = [
        (10, Link::Veth),
        (20, Link::Veth),
        (80, Link::Veth),
        (300, Link::Loopback),
        (600, Link::Loopback),
    ];
    for (pings, link) in cases {
        let c = frames::pings_then_goaway(Path::new(WC_PEER), &t, &mut agent, pings, link);
        let goaway = frames::has_goaway(&c, "goaway_received");
        let desyncs = c["h2"]["desyncs"].as_u64().unwrap_or(u64::MAX);
        if pings <= 300 {
            assert!(
                goaway && desyncs == 0,
                "GOAWAY after {pings} frames in one segment ({link:?}) not walked cleanly: {c:#}"
            );
        } else {
            assert!(
                !goaway && desyncs >= 1,
                "{pings} frames in one segment are past the last tail call: the rest must be \
                 reported lost, not walked: {c:#}"
            );
        }
    }
    stop(agent);
}

/// Case 11: bulk HTTP/2 on loopback, where the kernel builds GSO packets larger than 64 KiB:
/// IPv4 unasked from 6.3 (total length 0), IPv6 with BIG TCP switched on for the server
/// namespace's loopback (a Hop-by-Hop Jumbo header on 6.0 to 6.19, payload length 0 from
/// 7.0). 16 MiB of DATA frames in one write, then a GOAWAY, over each family. Every frame
/// header inside those packets is walked, so the sender's direction never loses sync and
/// its GOAWAY is evidence. (Before the packet programs took such a packet's length from
/// the skb and understood the Jumbo header, they saw no payload in it, or no TCP segment
/// at all, and lost sync about once per megabyte.) Older kernels build no such packets;
/// the case then checks the plain path.
#[test]
fn gso_packets_over_64k_are_walked() {
    if !prelude("gso_packets_over_64k_are_walked", Need::Nothing) {
        return;
    }
    let t = Topology::new().expect("topology");
    let big6 = frames::big_tcp_on_server_loopback(&t);
    eprintln!("IPv6 BIG TCP on the server namespace's loopback: {big6}");
    let mut agent = start_agent(&t);
    for link in [Link::Loopback, Link::Loopback6] {
        let s =
            frames::bulk_data_then_goaway(Path::new(WC_PEER), &t, &mut agent, link, 1024, 16384);
        assert_eq!(
            s["h2"]["desyncs"], 0,
            "the sender's frames in large GSO packets ({link:?}) were not all walked: {s:#}"
        );
        assert!(
            frames::has_goaway(&s, "goaway_sent"),
            "GOAWAY after 16 MiB of DATA ({link:?}) not seen: {s:#}"
        );
    }
    stop(agent);
}

/// `--no-h2-frames`: the packet hooks stay (`packet_facts`), the walker does not load
/// (`h2_frames` false), so a GOAWAY is not evidence and no connection carries an `h2`
/// object; the verdict rests on the TCP facts alone (the server's FIN, then the client's).
#[test]
fn no_h2_frames_keeps_tcp_facts_only() {
    if !prelude("no_h2_frames_keeps_tcp_facts_only", Need::Nothing) {
        return;
    }
    let t = Topology::new().expect("topology");
    let mut args = tests::default_trace_args(&t.inodes().expect("inodes"));
    args.push("--no-h2-frames".into());
    let mut agent = match tests::Agent::spawn(&tests::agent_bin(), &args, tests::READY_TIMEOUT) {
        Ok(a) => a,
        Err(e) => panic!("starting the agent: {e:#}"),
    };
    assert_eq!(agent.ready()["packet_facts"], true, "{}", agent.ready());
    assert_eq!(agent.ready()["h2_frames"], false, "{}", agent.ready());
    let c = frames::pings_then_goaway(Path::new(WC_PEER), &t, &mut agent, 3, Link::Loopback);
    assert!(c["h2"].is_null(), "no walker, yet HTTP/2 state: {c:#}");
    assert!(
        !frames::has_goaway(&c, "goaway_received"),
        "no walker, yet a GOAWAY: {c:#}"
    );
    assert_eq!(c["verdict"]["closed_by"], "server", "{c:#}");
    assert_eq!(c["verdict"]["mechanism"], "fin", "{c:#}");
    let exit = agent
        .stop()
        .unwrap_or_else(|e| panic!("stopping the agent: {e:#}"));
    let stats = exit.stats();
    assert_eq!(stats["kernel"]["h2_frames"], 0, "{stats:#}");
    assert!(
        stats["kernel"]["packets"].as_u64().unwrap_or(0) > 0,
        "the packet hooks saw nothing: {stats:#}"
    );
}
