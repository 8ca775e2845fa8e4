//! Privileged end-to-end tests with hostile input: segments forged by an on-path crafter
//! in the router namespace (`tests/peers/spoof.py`), and HTTP/2 frames cut at awkward
//! places by a real peer. The real agent must not take what the client's TCP ignored as
//! evidence, and must not lose frames because of where segments end.
//! Skipped when not root unless `WHOCLOSED_E2E=require`.

use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tests::craft::Spoofer;
use tests::h2e2e::frames::{GOAWAY_MAX_IDLE, SETTINGS};
use tests::{Agent, Peer, Topology, agent_bin, should_run};

const WC_PEER: &str = env!("CARGO_BIN_EXE_wc-peer");
const PORT: u16 = 8080;
const VERDICT_TIMEOUT: Duration = Duration::from_secs(15);
/// The router's device towards the client (see `topology.rs`).
const ROUTER_CLIENT_DEV: &str = "veth-c";

fn prelude(test: &str) -> bool {
    if !should_run(test) {
        return false;
    }
    let bin = agent_bin();
    assert!(
        bin.exists(),
        "{test}: whoclosed agent binary not found at {}; build it first with `cargo build`",
        bin.display()
    );
    true
}

fn start_agent(t: &Topology) -> Agent {
    match Agent::start(&t.inodes().expect("inodes")) {
        Ok(a) => a,
        Err(e) => panic!("starting the agent: {e:#}"),
    }
}

/// A connected pair (no data yet); the server is `10.241.2.2:8080`.
fn open(t: &Topology) -> (Peer, Peer) {
    let addr: SocketAddr = t.server_addr(false, PORT);
    let mut server = Peer::listen(Path::new(WC_PEER), &t.server, addr).expect("server");
    let client = Peer::connect(Path::new(WC_PEER), &t.client, addr).expect("client");
    server
        .wait_accepted(Duration::from_secs(10))
        .expect("server accepts");
    (client, server)
}

fn client_close(agent: &mut Agent, client: &Peer, t: &Topology) -> Value {
    let local = client.local.to_string();
    let remote = t.server_addr(false, PORT).to_string();
    agent
        .wait_for_close(
            &local,
            &remote,
            Some(t.client_inode().expect("client inode")),
            VERDICT_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("close object for the client socket: {e:#}"))
}

fn evidence_whats(obj: &Value) -> Vec<String> {
    obj["evidence"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["what"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn stop_stats(mut agent: Agent) -> Value {
    let exit = agent
        .stop()
        .unwrap_or_else(|e| panic!("stopping the agent: {e:#}"));
    exit.stats().clone()
}

/// Give the crafter's capture thread time to see the last server segment.
fn settle() {
    std::thread::sleep(Duration::from_millis(200));
}

/// Forged RSTs (out of window, in window but not at rcv_nxt, a flood), a forged FIN far
/// ahead and forged data with another TTL: the client's TCP ignores all of them, so the
/// verdict stays the client's own FIN close and none of them appears as evidence.
#[test]
fn forged_segments_are_not_evidence() {
    if !prelude("forged_segments_are_not_evidence") {
        return;
    }
    let t = Topology::new().expect("topology");
    let mut agent = start_agent(&t);
    let server_ip = t.server_ip(false).to_string();
    let mut spoof =
        Spoofer::start(&t.router, ROUTER_CLIENT_DEV, &server_ip, PORT).expect("crafter");
    let (mut client, mut server) = open(&t);
    client.send(100).expect("client send");
    server.read(100).expect("server read");
    server.send(50).expect("server send");
    client.read(50).expect("client read");
    settle();
    spoof.rcv_nxt().expect("crafter saw the connection");

    spoof
        .inject("R", 0x8000_0000, 64, "")
        .expect("rst far away");
    spoof.inject("R", 1000, 64, "").expect("rst in window");
    spoof
        .inject("FA", 0x4000_0000, 64, "")
        .expect("fin far ahead");
    spoof
        .inject("PA", 0x4000_0000, 7, "7878787878")
        .expect("data far ahead, other ttl");
    spoof.flood_rst(200).expect("rst flood");

    // The connection is unharmed: TCP ignored every forged segment.
    client.send(10).expect("client send after");
    server.read(10).expect("server read after");
    server.send(10).expect("server send after");
    client.read(10).expect("client read after");
    client.close().expect("client close");
    server.wait_eof().expect("server sees FIN");
    server.close().expect("server close");

    let c = client_close(&mut agent, &client, &t);
    let what = evidence_whats(&c);
    assert_eq!(c["verdict"]["closed_by"], "client", "{c:#}");
    assert_eq!(c["verdict"]["reason"], "client_close", "{c:#}");
    assert_eq!(c["verdict"]["mechanism"], "fin", "{c:#}");
    for forged in ["rst_received", "ttl_changed"] {
        assert!(
            !what.iter().any(|w| w == forged),
            "forged segment became evidence ({forged}): {c:#}"
        );
    }
    spoof.exit().expect("crafter exit");
    let stats = stop_stats(agent);
    let unaccepted = stats["kernel"]["unaccepted"].as_u64().unwrap_or(0);
    assert!(
        unaccepted >= 204,
        "kernel.unaccepted {unaccepted} < the 204 forged segments: {stats:#}"
    );
}

/// A forged GOAWAY "max_idle" a quarter of the sequence space ahead of the client's
/// rcv_nxt must neither become evidence (it would read as a server idle timeout) nor
/// desynchronise the walker: a real GOAWAY sent afterwards is still seen.
#[test]
fn forged_goaway_far_ahead_is_not_evidence() {
    if !prelude("forged_goaway_far_ahead_is_not_evidence") {
        return;
    }
    let t = Topology::new().expect("topology");
    let mut agent = start_agent(&t);
    let server_ip = t.server_ip(false).to_string();
    let mut spoof =
        Spoofer::start(&t.router, ROUTER_CLIENT_DEV, &server_ip, PORT).expect("crafter");
    let (mut client, mut server) = open(&t);
    server.send_hex(SETTINGS).expect("server settings");
    client.read(9).expect("client reads settings");
    settle();
    spoof
        .inject("PA", 0x4000_0000, 63, GOAWAY_MAX_IDLE)
        .expect("forged goaway");
    // Then a real control frame: a PING ack the walker must still find at its boundary.
    let ping_ack = "0000080601000000000102030405060708";
    server.send_hex(ping_ack).expect("server ping");
    client.read(17).expect("client reads ping");
    client.close().expect("client close");
    server.wait_eof().expect("server sees FIN");
    server.close().expect("server close");

    let c = client_close(&mut agent, &client, &t);
    let what = evidence_whats(&c);
    assert!(
        !what.iter().any(|w| w == "goaway_received"),
        "forged GOAWAY became evidence: {c:#}"
    );
    assert_eq!(c["verdict"]["closed_by"], "client", "{c:#}");
    assert_eq!(c["verdict"]["reason"], "client_close", "{c:#}");
    spoof.exit().expect("crafter exit");
    let stats = stop_stats(agent);
    assert_eq!(
        stats["kernel"]["h2_desyncs"], 0,
        "the forged segment desynchronised the walker: {stats:#}"
    );
    assert!(
        stats["kernel"]["unaccepted"].as_u64().unwrap_or(0) >= 1,
        "forged segment not counted: {stats:#}"
    );
}

/// The server's GOAWAY arrives in two segments cut after `cut` bytes (every cut inside the
/// 9-byte header, and one in the payload); the client's close object must carry it.
#[test]
fn goaway_header_split_at_every_offset() {
    if !prelude("goaway_header_split_at_every_offset") {
        return;
    }
    let t = Topology::new().expect("topology");
    let mut agent = start_agent(&t);
    let mut failures = Vec::new();
    for cut in 1..=9usize {
        let (mut client, mut server) = open(&t);
        server.send_hex(SETTINGS).expect("server settings");
        client.read(9).expect("client reads settings");
        let (a, b) = GOAWAY_MAX_IDLE.split_at(2 * cut);
        server.send_hex(a).expect("first part");
        // Let the first part leave as its own segment.
        client.wait_recvq(cut).expect("first part arrived");
        server.send_hex(b).expect("second part");
        client.read(25).expect("client reads goaway");
        server.close().expect("server close");
        client.wait_eof().expect("client sees FIN");
        client.close().expect("client close");
        let c = client_close(&mut agent, &client, &t);
        let seen = c["evidence"].as_array().is_some_and(|ev| {
            ev.iter()
                .any(|e| e["what"] == "goaway_received" && e["debug"] == "max_idle")
        });
        if !seen {
            failures.push(format!("cut after {cut} bytes: {c}"));
        }
        let _ = server.exit();
        let _ = client.exit();
    }
    let stats = stop_stats(agent);
    assert!(
        failures.is_empty(),
        "GOAWAY lost when split:\n{}\nstats: {stats:#}",
        failures.join("\n")
    );
}
