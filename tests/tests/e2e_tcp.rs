//! Privileged end-to-end tests: real TCP connections between network namespaces, traced
//! by the whoclosed agent (`target/debug/whoclosed` or `$WHOCLOSED_BIN`; build it with
//! `cargo build` first). Skipped when not root unless `WHOCLOSED_E2E=require`.
//! `WHOCLOSED_PROBE_MODE=<mode>` passes `--probe-mode <mode>` to the agent.

use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tests::{
    Agent, Expect, Peer, PidCheck, Topology, agent_bin, check_close, check_peer_link, should_run,
};

const WC_PEER: &str = env!("CARGO_BIN_EXE_wc-peer");
const PORT: u16 = 8080;
/// Bound for a close object to show up (linger is 300 ms).
const VERDICT_TIMEOUT: Duration = Duration::from_secs(15);

fn peer_bin() -> &'static Path {
    Path::new(WC_PEER)
}

/// Root / agent-binary gate shared by all cases.
fn prelude(test: &str) -> bool {
    if !should_run(test) {
        return false;
    }
    let bin = agent_bin();
    assert!(
        bin.exists(),
        "{test}: whoclosed agent binary not found at {}; build it first with `cargo build` \
         in the workspace root (or set WHOCLOSED_BIN)",
        bin.display()
    );
    true
}

fn family(v6: bool) -> &'static str {
    if v6 { "ipv6" } else { "ipv4" }
}

/// An established client/server pair (with a little data exchanged both ways).
struct Conn {
    client: Peer,
    server: Peer,
    /// Client socket's address (`10.241.1.2:<ephemeral>` / `[fd00:241:1::2]:<ephemeral>`).
    client_addr: String,
    /// Server socket's address.
    server_addr: String,
    client_ns: u64,
    server_ns: u64,
    v6: bool,
}

impl Conn {
    /// Connected, and bytes exchanged both ways.
    fn open(t: &Topology, v6: bool) -> Conn {
        let mut c = Conn::connect(t, v6);
        c.client.send(100).expect("client send");
        c.server.read(100).expect("server read");
        c.server.send(50).expect("server send");
        c.client.read(50).expect("client read");
        c
    }

    /// Connected, nothing sent yet.
    fn connect(t: &Topology, v6: bool) -> Conn {
        let addr: SocketAddr = t.server_addr(v6, PORT);
        let mut server = Peer::listen(peer_bin(), &t.server, addr).expect("start server");
        let client = Peer::connect(peer_bin(), &t.client, addr).expect("client connect");
        let seen = server
            .wait_accepted(Duration::from_secs(10))
            .expect("server accepts");
        assert_eq!(seen, client.local, "server sees the client's address");
        assert_eq!(client.local.ip(), t.client_ip(v6));
        Conn {
            client_addr: client.local.to_string(),
            server_addr: addr.to_string(),
            client,
            server,
            client_ns: t.client_inode().expect("client netns inode"),
            server_ns: t.server_inode().expect("server netns inode"),
            v6,
        }
    }

    fn client_expect(&self) -> Expect {
        Expect {
            family: Some(family(self.v6)),
            local: Some(self.client_addr.clone()),
            remote: Some(self.server_addr.clone()),
            role: Some("client"),
            preexisting: Some(false),
            netns: Some(self.client_ns),
            pid: PidCheck::Exact(self.client.pid()),
            ..Expect::default()
        }
    }

    fn server_expect(&self) -> Expect {
        Expect {
            family: Some(family(self.v6)),
            local: Some(self.server_addr.clone()),
            remote: Some(self.client_addr.clone()),
            role: Some("server"),
            preexisting: Some(false),
            netns: Some(self.server_ns),
            pid: PidCheck::Exact(self.server.pid()),
            ..Expect::default()
        }
    }

    /// The client socket's close object (matched on addresses and namespace).
    fn client_verdict(&self, agent: &mut Agent) -> Value {
        agent
            .wait_for_close(
                &self.client_addr,
                &self.server_addr,
                Some(self.client_ns),
                VERDICT_TIMEOUT,
            )
            .expect("close object for the client socket")
    }

    /// The server socket's close object.
    fn server_verdict(&self, agent: &mut Agent) -> Value {
        agent
            .wait_for_close(
                &self.server_addr,
                &self.client_addr,
                Some(self.server_ns),
                VERDICT_TIMEOUT,
            )
            .expect("close object for the server socket")
    }

    /// Client closes, server sees EOF and closes.
    fn client_closes_first(&mut self) {
        self.client.close().expect("client close");
        self.server.wait_eof().expect("server sees FIN");
        self.server.close().expect("server close");
    }

    /// Server closes, client sees EOF and closes.
    fn server_closes_first(&mut self) {
        self.server.close().expect("server close");
        self.client.wait_eof().expect("client sees FIN");
        self.client.close().expect("client close");
    }
}

fn check(obj: &Value, e: &Expect) {
    if let Err(err) = check_close(obj, e) {
        panic!("{err:#}");
    }
}

fn check_pair(c: &Value, s: &Value) {
    if let Err(err) = check_peer_link(c, s) {
        panic!("{err:#}");
    }
    assert_ne!(c["conn"]["id"], s["conn"]["id"], "both ends share an id");
}

fn stop(mut agent: Agent) {
    if let Err(e) = agent.stop() {
        panic!("stopping the agent: {e:#}");
    }
}

fn start_agent(inodes: &[u64]) -> Agent {
    match Agent::start(inodes) {
        Ok(a) => a,
        Err(e) => panic!("starting the agent: {e:#}"),
    }
}

fn client_close_case(v6: bool) {
    let t = Topology::new().expect("topology");
    let agent_ns = t.inodes().expect("inodes");
    let mut agent = start_agent(&agent_ns);
    let mut conn = Conn::open(&t, v6);
    // Idle for a moment after the last payload: both ends' records must measure it.
    std::thread::sleep(Duration::from_millis(300));
    conn.client_closes_first();

    let c = conn.client_verdict(&mut agent);
    check(
        &c,
        &Expect {
            pid: PidCheck::Exact(conn.client.pid()),
            closed_by: Some("client"),
            reason: Some("client_close"),
            tcp_initiator: Some("local"),
            mechanism: Some("fin"),
            ..conn.client_expect()
        },
    );
    let s = conn.server_verdict(&mut agent);
    check(
        &s,
        &Expect {
            closed_by: Some("client"),
            reason: Some("client_close"),
            tcp_initiator: Some("remote"),
            ..conn.server_expect()
        },
    );
    check_pair(&c, &s);
    for v in [&c, &s] {
        let idle = v["stats"]["idle_before_end_ms"].as_f64().unwrap_or(-1.0);
        assert!(
            (250.0..30_000.0).contains(&idle),
            "idle_before_end_ms {idle}: {v}"
        );
    }
    stop(agent);
}

/// Case 1: Client closes first.
#[test]
fn client_close() {
    if prelude("client_close") {
        client_close_case(false);
    }
}

/// Case 2: Server closes first.
#[test]
fn server_close() {
    if !prelude("server_close") {
        return;
    }
    let t = Topology::new().expect("topology");
    let mut agent = start_agent(&t.inodes().expect("inodes"));
    let mut conn = Conn::open(&t, false);
    conn.server_closes_first();

    let s = conn.server_verdict(&mut agent);
    check(
        &s,
        &Expect {
            pid: PidCheck::Exact(conn.server.pid()),
            closed_by: Some("server"),
            reason: Some("server_close"),
            tcp_initiator: Some("local"),
            mechanism: Some("fin"),
            ..conn.server_expect()
        },
    );
    let c = conn.client_verdict(&mut agent);
    check(
        &c,
        &Expect {
            closed_by: Some("server"),
            reason: Some("server_close"),
            tcp_initiator: Some("remote"),
            ..conn.client_expect()
        },
    );
    check_pair(&c, &s);
    stop(agent);
}

/// Case 3: Server process SIGKILLed with unread data in its receive queue -> RST.
#[test]
fn server_process_killed() {
    if !prelude("server_process_killed") {
        return;
    }
    let t = Topology::new().expect("topology");
    let mut agent = start_agent(&t.inodes().expect("inodes"));
    let mut conn = Conn::open(&t, false);
    conn.client.send(1000).expect("client send");
    conn.server
        .wait_recvq(1000)
        .expect("data sits unread at the server");
    conn.server.kill9().expect("kill -9 server");
    conn.client
        .expect_error("read 1", "reset", Duration::from_secs(10))
        .expect("client gets the RST");
    conn.client.close().expect("client close");

    let s = conn.server_verdict(&mut agent);
    check(
        &s,
        &Expect {
            pid: PidCheck::Exact(conn.server.pid()),
            closed_by: Some("server"),
            reason: Some("server_process_exit"),
            tcp_initiator: Some("local"),
            mechanism: Some("rst"),
            ..conn.server_expect()
        },
    );
    let c = conn.client_verdict(&mut agent);
    check(
        &c,
        &Expect {
            closed_by: Some("server"),
            reason: Some("server_process_exit"),
            tcp_initiator: Some("remote"),
            mechanism: Some("rst"),
            ..conn.client_expect()
        },
    );
    check_pair(&c, &s);
    stop(agent);
}

/// Case 4: The router forges a RST towards the client.
#[test]
fn middlebox_reset() {
    if !prelude("middlebox_reset") {
        return;
    }
    let t = Topology::new().expect("topology");
    let mut agent = start_agent(&t.inodes().expect("inodes"));
    let mut conn = Conn::open(&t, false);
    let (c, s, p) = (
        t.plan.client_v4.to_string(),
        t.plan.server_v4.to_string(),
        PORT.to_string(),
    );
    t.router_iptables(&[
        "-I",
        "FORWARD",
        "-p",
        "tcp",
        "-s",
        &c,
        "-d",
        &s,
        "--dport",
        &p,
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    ])
    .expect("insert REJECT rule in the router");
    conn.client.send(10).expect("client send");
    conn.client
        .expect_error("read 1", "reset", Duration::from_secs(10))
        .expect("client gets the forged RST");
    conn.client.close().expect("client close");

    let c = conn.client_verdict(&mut agent);
    check(
        &c,
        &Expect {
            closed_by: Some("middlebox"),
            reason: Some("middlebox_reset"),
            tcp_initiator: Some("remote"),
            mechanism: Some("rst"),
            confidence: Some("high"),
            ..conn.client_expect()
        },
    );
    stop(agent);
}

/// Case 5: The router blackholes the path; the client's retransmissions time out.
#[test]
fn blackhole_timeout() {
    if !prelude("blackhole_timeout") {
        return;
    }
    let t = Topology::new().expect("topology");
    t.sysctl(&t.client, "net.ipv4.tcp_retries2", "3")
        .expect("tcp_retries2=3 in the client namespace");
    let mut agent = start_agent(&t.inodes().expect("inodes"));
    let mut conn = Conn::open(&t, false);
    t.router_iptables(&["-I", "FORWARD", "-j", "DROP"])
        .expect("insert DROP rule in the router");
    conn.client.send(10).expect("client send");
    conn.client
        .expect_error("read 1", "timed out", Duration::from_secs(60))
        .expect("client gets ETIMEDOUT");
    conn.client.close().expect("client close");

    let c = conn.client_verdict(&mut agent);
    check(
        &c,
        &Expect {
            closed_by: Some("middlebox"),
            reason: Some("path_blackhole"),
            tcp_initiator: Some("local"),
            mechanism: Some("timeout"),
            confidence: Some("high"),
            ..conn.client_expect()
        },
    );
    stop(agent);
}

/// Case 6: Case 1 over IPv6.
#[test]
fn ipv6_client_close() {
    if prelude("ipv6_client_close") {
        client_close_case(true);
    }
}

/// Case 7: Two topologies with identical addresses/ports and both connections open at once:
/// in A the client closes first, in B the server does.
#[test]
fn identical_addresses_in_two_namespace_sets() {
    if !prelude("identical_addresses_in_two_namespace_sets") {
        return;
    }
    let a = Topology::new().expect("topology A");
    let b = Topology::with_plan(a.plan.clone()).expect("topology B");
    let mut inodes = a.inodes().expect("inodes A");
    inodes.extend(b.inodes().expect("inodes B"));
    let mut agent = start_agent(&inodes);

    let mut ca = Conn::open(&a, false);
    let mut cb = Conn::open(&b, false);
    assert_eq!(ca.server_addr, cb.server_addr);
    assert_ne!(ca.client_ns, cb.client_ns);
    // The kernel may or may not pick the same ephemeral port; the predicates include
    // the namespace either way.
    ca.client_closes_first();
    cb.server_closes_first();

    let a_c = ca.client_verdict(&mut agent);
    let a_s = ca.server_verdict(&mut agent);
    let b_c = cb.client_verdict(&mut agent);
    let b_s = cb.server_verdict(&mut agent);
    check(
        &a_c,
        &Expect {
            pid: PidCheck::Exact(ca.client.pid()),
            closed_by: Some("client"),
            reason: Some("client_close"),
            tcp_initiator: Some("local"),
            mechanism: Some("fin"),
            ..ca.client_expect()
        },
    );
    check(
        &a_s,
        &Expect {
            closed_by: Some("client"),
            reason: Some("client_close"),
            tcp_initiator: Some("remote"),
            ..ca.server_expect()
        },
    );
    check(
        &b_s,
        &Expect {
            pid: PidCheck::Exact(cb.server.pid()),
            closed_by: Some("server"),
            reason: Some("server_close"),
            tcp_initiator: Some("local"),
            mechanism: Some("fin"),
            ..cb.server_expect()
        },
    );
    check(
        &b_c,
        &Expect {
            closed_by: Some("server"),
            reason: Some("server_close"),
            tcp_initiator: Some("remote"),
            ..cb.client_expect()
        },
    );
    check_pair(&a_c, &a_s);
    check_pair(&b_c, &b_s);
    let ids: std::collections::HashSet<&Value> = [&a_c, &a_s, &b_c, &b_s]
        .iter()
        .map(|o| &o["conn"]["id"])
        .collect();
    assert_eq!(ids.len(), 4, "conn ids must be distinct: {ids:?}");
    stop(agent);
}

/// Case 3 with `--no-packets` (as on a node where the cgroup_skb hooks cannot attach): the
/// configuration must reach the connection table, so the absence of a RST segment proves
/// nothing. The RST of the killed server is never `middlebox_reset`, and a `high` verdict
/// rests only on the server socket's own record (its reset or its owner's exit).
#[test]
fn server_process_killed_without_packet_facts() {
    if !prelude("server_process_killed_without_packet_facts") {
        return;
    }
    let t = Topology::new().expect("topology");
    let mut args = tests::default_trace_args(&t.inodes().expect("inodes"));
    args.push("--no-packets".into());
    let mut agent = match Agent::spawn(&agent_bin(), &args, tests::READY_TIMEOUT) {
        Ok(a) => a,
        Err(e) => panic!("starting the agent: {e:#}"),
    };
    assert_eq!(
        agent.ready()["packet_facts"],
        false,
        "--no-packets must report packet_facts false: {}",
        agent.ready()
    );
    assert_eq!(
        agent.ready()["h2_frames"],
        false,
        "--no-packets walks no HTTP/2 frames: {}",
        agent.ready()
    );
    let mut conn = Conn::open(&t, false);
    conn.client.send(2000).expect("client send");
    conn.server
        .wait_recvq(2000)
        .expect("data sits unread at the server");
    conn.server.kill9().expect("kill -9 server");
    conn.client
        .expect_error("read 1", "reset", Duration::from_secs(10))
        .expect("client gets the RST");
    conn.client.close().expect("client close");

    let s = conn.server_verdict(&mut agent);
    check(
        &s,
        &Expect {
            pid: PidCheck::Exact(conn.server.pid()),
            closed_by: Some("server"),
            reason: Some("server_process_exit"),
            tcp_initiator: Some("local"),
            mechanism: Some("rst"),
            ..conn.server_expect()
        },
    );
    let c = conn.client_verdict(&mut agent);
    check(
        &c,
        &Expect {
            closed_by: Some("server"),
            tcp_initiator: Some("remote"),
            mechanism: Some("rst"),
            ..conn.client_expect()
        },
    );
    let evidence = c["evidence"].as_array().cloned().unwrap_or_default();
    let origins: Vec<&Value> = evidence
        .iter()
        .filter(|f| f["what"] == "rst_received")
        .map(|f| &f["origin"])
        .collect();
    assert!(
        !origins.is_empty() && origins.iter().all(|o| *o != "not_sent_by_peer"),
        "without packet facts a RST is never proven forged: {origins:?}\n{c:#}"
    );
    if c["verdict"]["confidence"] == "high" {
        // Proven only by the server socket's own record of its reset and its owner's exit.
        assert_eq!(c["verdict"]["reason"], "server_process_exit", "{c:#}");
        assert!(origins.iter().all(|o| *o == "peer_socket"), "{c:#}");
        let own_reset = s["evidence"].as_array().is_some_and(|e| {
            e.iter()
                .any(|f| f["what"] == "rst_sent" || f["owner_exiting"] == true)
        });
        assert!(own_reset, "high without the server's own reset: {s:#}");
        assert_eq!(c["peer"]["exited"], true, "{c:#}");
    } else {
        assert_eq!(c["verdict"]["reason"], "server_reset", "{c:#}");
    }
    check_pair(&c, &s);
    let exit = match agent.stop() {
        Ok(e) => e,
        Err(e) => panic!("stopping the agent: {e:#}"),
    };
    // Every kernel counter is exported, the HTTP/2 ones included.
    let stats = exit.stats();
    for counter in ["events", "packets", "h2_frames", "h2_desyncs"] {
        assert!(
            stats["kernel"][counter].is_u64(),
            "stats.kernel.{counter} missing: {stats:#}"
        );
    }
    assert_eq!(
        stats["kernel"]["packets"], 0,
        "--no-packets inspected segments: {stats:#}"
    );
}

/// The agent restarts while a connection is up: the new agent picks the connection up as
/// `preexisting` (roles from the ephemeral port range), listing both ends at its start
/// where the kernel walks its TCP sockets, and still judges its ending; the first agent
/// judged nothing for it (it never ended while that agent ran).
#[test]
fn restart_picks_up_live_connections() {
    if !prelude("restart_picks_up_live_connections") {
        return;
    }
    let t = Topology::new().expect("topology");
    let agent_ns = t.inodes().expect("inodes");
    let mut first = start_agent(&agent_ns);
    let mut conn = Conn::open(&t, false);
    if let Err(e) = first.stop() {
        panic!("stopping the first agent: {e:#}");
    }
    // Everything the first agent wrote, up to its final stats line, is read by now.
    let judged_early = first.objects().iter().any(|v| {
        v["type"] == "close"
            && (v["conn"]["local"] == conn.client_addr.as_str()
                || v["conn"]["remote"] == conn.client_addr.as_str())
    });
    assert!(
        !judged_early,
        "the live connection was judged before it ended"
    );

    let mut second = start_agent(&agent_ns);
    // Wherever the kernel has BTF, the second agent lists the connection at its start
    // (the kernel's walk over the TCP sockets, in their namespaces).
    let walked = second.ready()["existing_sockets"] == true;
    if std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        assert!(walked, "no start-up walk: {}", second.ready());
    }
    // Traffic after the restart, then the client closes.
    conn.client.send(10).expect("client send");
    conn.server.read(10).expect("server read");
    conn.client_closes_first();
    let c = conn.client_verdict(&mut second);
    check(
        &c,
        &Expect {
            preexisting: Some(true),
            pid: PidCheck::IfPresent(conn.client.pid()),
            closed_by: Some("client"),
            reason: Some("client_close"),
            tcp_initiator: Some("local"),
            mechanism: Some("fin"),
            ..conn.client_expect()
        },
    );
    let s = conn.server_verdict(&mut second);
    check(
        &s,
        &Expect {
            preexisting: Some(true),
            pid: PidCheck::IfPresent(conn.server.pid()),
            closed_by: Some("client"),
            reason: Some("client_close"),
            tcp_initiator: Some("remote"),
            ..conn.server_expect()
        },
    );
    let exit = second
        .stop()
        .unwrap_or_else(|e| panic!("stopping the agent: {e:#}"));
    let stats = exit.stats();
    // Both ends, and nothing else of the topology (its listener is not a connection).
    let want = if walked { 2 } else { 0 };
    assert_eq!(stats["table"]["conns_walked"], want, "{stats:#}");
}

/// A long-lived HTTP/2 connection that was open before the agent started (a DaemonSet
/// rollout): its first lifecycle event is its end, yet the GOAWAY it received after the
/// start, walked by the kernel from mid-stream, is in its verdict (the frame waits in the
/// agent until the socket is met).
#[test]
fn goaway_on_a_connection_older_than_the_agent_is_evidence() {
    use tests::h2e2e::frames::{GOAWAY_MAX_IDLE, SETTINGS};
    if !prelude("goaway_on_a_connection_older_than_the_agent_is_evidence") {
        return;
    }
    let t = Topology::new().expect("topology");
    let mut conn = Conn::open(&t, false);
    // The client preface and SETTINGS, the server's SETTINGS: HTTP/2 in use.
    let preface = format!("505249202a20485454502f322e300d0a0d0a534d0d0a0d0a{SETTINGS}");
    conn.client.send_hex(&preface).expect("client preface");
    conn.server
        .read(preface.len() / 2)
        .expect("server reads it");
    conn.server.send_hex(SETTINGS).expect("server SETTINGS");
    conn.client
        .read(SETTINGS.len() / 2)
        .expect("client reads it");

    let mut agent = start_agent(&t.inodes().expect("inodes"));
    conn.server
        .send_hex(GOAWAY_MAX_IDLE)
        .expect("server GOAWAY");
    conn.client
        .read(GOAWAY_MAX_IDLE.len() / 2)
        .expect("client reads it");
    conn.server_closes_first();
    let c = conn.client_verdict(&mut agent);
    assert_eq!(
        c["h2"]["joined_midstream"], true,
        "the walker met this connection mid-stream: {c:#}"
    );
    let goaways = c["h2"]["goaways"].as_array().cloned().unwrap_or_default();
    assert!(
        goaways
            .iter()
            .any(|g| g["dir"] == "received" && g["debug"] == "max_idle"),
        "the GOAWAY the client received is not in its verdict: {c:#}"
    );
    check(
        &c,
        &Expect {
            preexisting: Some(true),
            pid: PidCheck::IfPresent(conn.client.pid()),
            closed_by: Some("server"),
            ..conn.client_expect()
        },
    );
    stop(agent);
}

/// A connection opened before the agent started that has carried no payload yet: the
/// kernel reads from the socket's own TCP counters that its first payload byte is still to
/// come, so the first bytes sent after the start are the stream's start. HTTP/1.1 there is
/// then known not to be HTTP/2 (`not_h2`); before, such a socket was walked as met
/// mid-stream, never decided, and its verdict had no `h2` object. A `--max-sockets` left on
/// the command line is accepted and ignored.
#[test]
fn idle_connection_older_than_the_agent_is_walked_from_its_start() {
    if !prelude("idle_connection_older_than_the_agent_is_walked_from_its_start") {
        return;
    }
    let t = Topology::new().expect("topology");
    let mut conn = Conn::connect(&t, false);
    let mut args = tests::default_trace_args(&t.inodes().expect("inodes"));
    args.extend(["--max-sockets".to_string(), "16".to_string()]);
    let mut agent = Agent::spawn(&agent_bin(), &args, tests::READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("starting the agent: {e:#}"));
    // "GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    let request = "474554202f20485454502f312e310d0a486f73743a20780d0a0d0a";
    conn.client.send_hex(request).expect("client request");
    conn.server
        .read(request.len() / 2)
        .expect("server reads it");
    conn.client_closes_first();
    let c = conn.client_verdict(&mut agent);
    assert_eq!(c["conn"]["preexisting"], true, "{c:#}");
    assert_eq!(
        c["h2"]["state"], "not_h2",
        "the first bytes of a connection idle since before the agent were not its start: {c:#}"
    );
    stop(agent);
}

/// The start-up walk reads each listed socket's cgroup from the socket itself
/// (`sk_cgrp_data`, at offsets from BTF; before 5.15 a tagged word), so that an idle
/// connection older than the agent is named by its pod before any event of it. The server
/// process here sits in a cgroup of its own: the `EXISTING` record of its accepted socket
/// carries that cgroup's id, the client's the id of the cgroup this test runs in. CI runs it
/// on 5.10 (the tagged word) as well as here.
#[test]
fn the_start_up_walk_reads_each_sockets_cgroup() {
    use tests::recording;
    use tracer_common::{flag, kind};
    if !prelude("the_start_up_walk_reads_each_sockets_cgroup") {
        return;
    }
    let Some(mount) = recording::cgroup2_mount() else {
        eprintln!("SKIP the_start_up_walk_reads_each_sockets_cgroup: no cgroup v2 mount");
        return;
    };
    let t = Topology::new().expect("topology");
    // Dropped after the peers below: removed once they have exited.
    let cg = recording::TempCgroup::new(
        &mount,
        &format!("whoclosed-e2e-walk-{}", std::process::id()),
    )
    .expect("a cgroup for the server");
    let dir = cg.path.clone();
    let server_cg = recording::cgroup_id(&dir).expect("the new cgroup's id");
    let own = recording::own_cgroup(&mount).expect("this process's cgroup");
    let client_cg = recording::cgroup_id(&own).expect("this process's cgroup id");
    let addr: SocketAddr = t.server_addr(false, PORT);
    let mut server =
        Peer::listen_in_cgroup(peer_bin(), &t.server, addr, &dir).expect("server in its cgroup");
    let client = Peer::connect(peer_bin(), &t.client, addr).expect("client connect");
    let seen = server
        .wait_accepted(Duration::from_secs(10))
        .expect("server accepts");
    assert_eq!(seen, client.local);

    let rec = std::env::temp_dir().join(format!("whoclosed-walk-{}.rec", std::process::id()));
    let mut args = tests::default_trace_args(&t.inodes().expect("inodes"));
    args.extend(["--record".to_string(), rec.to_string_lossy().into_owned()]);
    let agent = Agent::spawn(&agent_bin(), &args, tests::READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("starting the agent: {e:#}"));
    let walked = agent.ready()["existing_sockets"] == true;
    stop(agent);
    let records = recording::kernel_records(&rec).expect("the recording");
    let _ = std::fs::remove_file(&rec);
    drop(server);
    drop(client);
    drop(cg);
    if !walked {
        assert!(
            !Path::new("/sys/kernel/btf/vmlinux").exists(),
            "no start-up walk on a kernel with BTF"
        );
        eprintln!("SKIP the_start_up_walk_reads_each_sockets_cgroup: no start-up walk here");
        return;
    }
    let listed: Vec<_> = records
        .iter()
        .filter_map(|r| recording::lifecycle(r))
        .filter(|r| r.hdr.kind == kind::EXISTING)
        .collect();
    let c_port = seen.port();
    for (what, sport, dport, want) in [
        ("server", PORT, c_port, server_cg),
        ("client", c_port, PORT, client_cg),
    ] {
        let r = listed
            .iter()
            .find(|r| r.ep.sport == sport && r.ep.dport == dport)
            .unwrap_or_else(|| panic!("the {what} socket is not in the walk"));
        assert!(
            r.flags & flag::HAS_CGROUP != 0,
            "the {what} socket's cgroup was not read (flags {:#x})",
            r.flags
        );
        assert_eq!(r.pid_tgid, want, "the {what} socket's cgroup id");
    }
}

/// Kernels before 6.7 skip tracepoint runs without counting them (when another BPF program
/// is active on the CPU), so a lost CLOSE could go unnoticed there: the agent has the kernel
/// record every socket's destruction from the start, a `DESTROY` behind each `CLOSE`. From
/// 6.7 on the skips are counted, and destructions are recorded only after a loss: a session
/// that lost nothing has none. Checked on the recording of one connection's life.
#[test]
fn socket_destructions_are_recorded_where_skips_go_uncounted() {
    use tests::recording;
    use tracer_common::kind;
    if !prelude("socket_destructions_are_recorded_where_skips_go_uncounted") {
        return;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut v = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let counted = (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 7);
    let t = Topology::new().expect("topology");
    let rec = std::env::temp_dir().join(format!("whoclosed-destroy-{}.rec", std::process::id()));
    let mut args = tests::default_trace_args(&t.inodes().expect("inodes"));
    args.extend(["--record".to_string(), rec.to_string_lossy().into_owned()]);
    let mut agent = Agent::spawn(&agent_bin(), &args, tests::READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("starting the agent: {e:#}"));
    let mut conn = Conn::open(&t, false);
    conn.client_closes_first();
    conn.client_verdict(&mut agent);
    conn.server_verdict(&mut agent);
    let exit = agent
        .stop()
        .unwrap_or_else(|e| panic!("stopping the agent: {e:#}"));
    let kernel = &exit.stats()["kernel"];
    let lost = ["ringbuf_drops", "read_errors", "runs_skipped"]
        .iter()
        .map(|k| kernel[k].as_u64().unwrap_or(0))
        .sum::<u64>();
    let records = recording::kernel_records(&rec).expect("the recording");
    let _ = std::fs::remove_file(&rec);
    let c_port = conn.client.local.port();
    let destroyed = |sport: u16, dport: u16| {
        records
            .iter()
            .filter_map(|r| recording::lifecycle(r))
            .filter(|r| r.hdr.kind == kind::DESTROY && r.ep.sport == sport && r.ep.dport == dport)
            .count()
    };
    let (client, server) = (destroyed(c_port, PORT), destroyed(PORT, c_port));
    if !counted {
        assert_eq!(
            (client, server),
            (1, 1),
            "kernel {}: each socket's destruction, once",
            release.trim()
        );
    } else if lost == 0 {
        assert_eq!(
            (client, server),
            (0, 0),
            "kernel {}: nothing was lost, yet destructions were recorded",
            release.trim()
        );
    }
}

/// After lost events the agent walks the live sockets again, and a namespace it does not
/// enter (here: it finds none, its `--proc-root` being empty; under the least-privilege
/// DaemonSet: every pod's) is covered by the kernel's walk over the sockets holding packet
/// state. A connect/close flood through a 4 KiB ring buffer in the server's namespace,
/// every 15th connection held: once the loss stops, a recheck lists every held socket
/// there, each as an `EXISTING` record carrying that namespace (the `iter/tcp` walk,
/// which lists only the agent's own, cannot have written them).
#[test]
fn a_recheck_lists_the_sockets_of_a_namespace_it_does_not_enter() {
    use tests::recording;
    use tracer_common::kind;
    if !prelude("a_recheck_lists_the_sockets_of_a_namespace_it_does_not_enter") {
        return;
    }
    let t = Topology::new().expect("topology");
    let server_ns = t.server_inode().expect("server namespace");
    let empty = std::env::temp_dir().join(format!("whoclosed-noproc-{}", std::process::id()));
    std::fs::create_dir_all(&empty).expect("mkdir");
    let rec = std::env::temp_dir().join(format!("whoclosed-recheck-{}.rec", std::process::id()));
    let mut args = tests::default_trace_args(&t.inodes().expect("inodes"));
    for a in [
        "--ringbuf-kib",
        "4",
        "--proc-root",
        &empty.to_string_lossy(),
        "--record",
        &rec.to_string_lossy(),
    ] {
        args.push(a.to_string());
    }
    let mut agent = Agent::spawn(&agent_bin(), &args, tests::READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("starting the agent: {e:#}"));
    // Complete rechecks so far (the agent logs one line for each).
    let rechecks = |a: &Agent| a.stderr().matches("by their packet state").count();
    let mut p = Peer::churn(
        peer_bin(),
        &t.server,
        "127.0.0.1:0".parse().expect("address"),
    )
    .expect("churn peer");
    let port = p.local.port();
    let line = p
        .command("churn 3000 15", "held", Duration::from_secs(240))
        .unwrap_or_else(|e| panic!("the flood: {e:#}"));
    let held: usize = line
        .trim_start_matches("held ")
        .trim()
        .parse()
        .expect("held count");
    assert_eq!(held, 200);
    // The loss has stopped: a recheck follows within about a second (a minute when one
    // ran during the flood and itself lost events).
    let before = rechecks(&agent);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let listed = loop {
        let err = agent.stderr();
        if rechecks(&agent) > before
            && let Some(l) = err.lines().rfind(|l| l.contains("by their packet state"))
        {
            break l.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no complete recheck after the flood; agent stderr:\n{err}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    p.command("exit", "bye", Duration::from_secs(10))
        .expect("peer exit");
    let exit = agent
        .stop()
        .unwrap_or_else(|e| panic!("stopping the agent: {e:#}"));
    assert!(
        exit.stats()["kernel"]["ringbuf_drops"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "the flood lost nothing, so nothing was tested: {}",
        exit.stats()
    );
    let records = recording::kernel_records(&rec).expect("the recording");
    let _ = std::fs::remove_file(&rec);
    let _ = std::fs::remove_dir_all(&empty);
    let listed_there: std::collections::BTreeSet<u64> = records
        .iter()
        .filter_map(|r| recording::lifecycle(r))
        .filter(|r| {
            r.hdr.kind == kind::EXISTING
                && u64::from(r.netns) == server_ns
                && (r.ep.sport == port || r.ep.dport == port)
        })
        .map(|r| r.hdr.skaddr)
        .collect();
    assert!(
        listed_there.len() >= 2 * held,
        "{} sockets of the server's namespace listed, {} held; the recheck said: {listed}",
        listed_there.len(),
        2 * held
    );
}
