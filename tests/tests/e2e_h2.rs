//! HTTP/2 end-to-end tests: real gRPC (Python grpcio) and nghttp2 peers between the
//! topology's namespaces, traced by the whoclosed agent, which must tell who ended the
//! connection at L7 (GOAWAY, keepalive PINGs) as well as at L4 (`tcp_initiator`).
//!
//! * `grpc_*`, `nghttp_*`, `h2load_*`, `plain_tcp_not_h2`: need root, the agent binary
//!   (`cargo build`; or `$WHOCLOSED_BIN`), and the peers: a venv with grpcio at
//!   `$WHOCLOSED_VENV` (default `~/.cache/whoclosed/venv`) and nghttp2's `nghttpd`,
//!   `nghttp`, `h2load`. Missing pieces skip the test with the reason, or fail it under
//!   `WHOCLOSED_E2E=require`.
//! * `wire_*`: the same scenarios WITHOUT the agent, checking with tcpdump + tshark that
//!   the peers put on the wire what the agent cases assert (GOAWAY codes and debug texts,
//!   PINGs, RST_STREAM, who sends the first FIN). They pin the peer behaviour the
//!   classifier rules rely on (grpcio 1.85.1, nghttp2 1.52). Skipped when tcpdump/tshark
//!   are missing. `--nocapture` prints each timeline.

use serde_json::Value;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tests::h2peers::{
    Capture, DocRoot, GRPCIO_VERSION, GrpcClient, GrpcServer, Nghttpd, WireEvent, WireKind,
    capture_tools_missing, grpc_missing, grpc_version, h2load, nghttp_get, nghttp2_missing,
    norm_addr,
};
use tests::{
    Agent, Expect, Peer, PidCheck, Topology, agent_bin, check_close, check_peer_link, should_run,
};

const WC_PEER: &str = env!("CARGO_BIN_EXE_wc-peer");
const GRPC_PORT: u16 = 50051;
const HTTP_PORT: u16 = 8080;
const TCP_PORT: u16 = 8081;
/// Bound for a close object to show up (linger is 300 ms).
const VERDICT_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound for a grpc channel to notice the server's GOAWAY / its own keepalive failure.
const CHANNEL_TIMEOUT: Duration = Duration::from_secs(20);
/// Size of the bulk download.
const BIG: u64 = 100 * 1024 * 1024;

// ---- What grpcio 1.85.1 (C-core) sends; checked without the agent by the wire_* tests.

/// `grpc.max_connection_idle_ms`: one GOAWAY, INTERNAL_ERROR (not NO_ERROR), this text,
/// last_stream_id = last stream, then the server's FIN ~0.1 ms later.
const IDLE_GOAWAY: (&str, u64, &str) = ("INTERNAL_ERROR", 2, "connection idle");
/// `grpc.max_connection_age_ms`: GOAWAY(NO_ERROR, 2^31-1, "max_age") + PING, the client's
/// PING ack, GOAWAY(NO_ERROR, last stream, "max_age"), server FIN.
const MAX_AGE_DEBUG: &str = "max_age";
/// Ping enforcement: GOAWAY(ENHANCE_YOUR_CALM, last stream, "too_many_pings"), server FIN.
const TOO_MANY_PINGS: (&str, u64, &str) = ("ENHANCE_YOUR_CALM", 11, "too_many_pings");
const MAX_STREAM_ID: u64 = 0x7fff_ffff;
const NO_OPTS: &[(&str, i64)] = &[];

fn peer_bin() -> &'static Path {
    Path::new(WC_PEER)
}

/// Which external peers a case needs.
#[derive(Clone, Copy)]
enum Need {
    Grpc,
    Nghttp2(&'static [&'static str]),
    Nothing,
}

fn missing(need: Need) -> Option<String> {
    match need {
        Need::Grpc => grpc_missing().or_else(|| {
            let v = grpc_version().unwrap_or_default();
            if v != GRPCIO_VERSION {
                eprintln!(
                    "warning: grpcio {v} in the venv; the asserted GOAWAY texts are those of \
                     {GRPCIO_VERSION} (tests/peers/requirements.txt)"
                );
            }
            None
        }),
        Need::Nghttp2(progs) => nghttp2_missing(progs),
        Need::Nothing => None,
    }
}

/// Skip (or, under `WHOCLOSED_E2E=require`, fail) for a reason other than not being root.
fn skip(test: &str, why: &str) -> bool {
    if std::env::var("WHOCLOSED_E2E").as_deref() == Ok("require") {
        panic!("{test}: WHOCLOSED_E2E=require but {why}");
    }
    say_skip(test, why);
    false
}

/// Straight to fd 2 (not eprintln!), so libtest's output capture doesn't hide it.
fn say_skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
}

/// Gate of the agent cases: root, agent binary, peers.
fn prelude(test: &str, need: Need) -> bool {
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
    match missing(need) {
        Some(why) => skip(test, &why),
        None => true,
    }
}

/// Gate of the wire_* self-checks: root, peers, tcpdump + tshark (always just skipped
/// when those two are missing: they are developer tools, not test dependencies).
fn wire_prelude(test: &str, need: Need) -> bool {
    if !should_run(test) {
        return false;
    }
    if let Some(why) = capture_tools_missing() {
        say_skip(test, &why);
        return false;
    }
    match missing(need) {
        Some(why) => skip(test, &why),
        None => true,
    }
}

fn start_agent(t: &Topology) -> Agent {
    match Agent::start(&t.inodes().expect("inodes")) {
        Ok(a) => a,
        Err(e) => panic!("starting the agent: {e:#}"),
    }
}

fn stop(mut agent: Agent) {
    if let Err(e) = agent.stop() {
        panic!("stopping the agent: {e:#}");
    }
}

// ---- Scenarios (shared by the agent cases and the wire checks).

/// A grpc server in the server namespace and a client in the client namespace.
struct Grpc {
    server: GrpcServer,
    client: GrpcClient,
    /// Client socket address as the server saw it (set by the first call).
    client_addr: String,
    server_addr: String,
    client_ns: u64,
    server_ns: u64,
}

impl Grpc {
    fn start(
        t: &Topology,
        v6: bool,
        server_opts: &[(&str, i64)],
        client_opts: &[(&str, i64)],
    ) -> Grpc {
        let addr = t.server_addr(v6, GRPC_PORT);
        let server =
            GrpcServer::spawn(&t.server, addr, server_opts).unwrap_or_else(|e| panic!("{e:#}"));
        let client =
            GrpcClient::spawn(&t.client, addr, client_opts).unwrap_or_else(|e| panic!("{e:#}"));
        Grpc {
            server,
            client,
            client_addr: String::new(),
            server_addr: addr.to_string(),
            client_ns: t.client_inode().expect("client netns inode"),
            server_ns: t.server_inode().expect("server netns inode"),
        }
    }

    /// `n` unary calls on the channel's (single) connection.
    fn call(&mut self, n: u32) {
        let local = self.client.call(n).unwrap_or_else(|e| panic!("{e:#}"));
        if self.client_addr.is_empty() {
            self.client_addr = local;
        } else {
            assert_eq!(
                local, self.client_addr,
                "the channel reconnected unexpectedly"
            );
        }
    }

    /// Waits until the client channel left READY (it got a GOAWAY, or its transport died).
    fn wait_channel_down(&mut self) -> String {
        self.client
            .wait_state(&["IDLE", "TRANSIENT_FAILURE"], CHANNEL_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn client_close(&self, agent: &mut Agent) -> Value {
        wait_close(
            agent,
            self.client_ns,
            Some(&self.client_addr),
            Some(&self.server_addr),
        )
    }

    fn server_close(&self, agent: &mut Agent) -> Value {
        wait_close(
            agent,
            self.server_ns,
            Some(&self.server_addr),
            Some(&self.client_addr),
        )
    }

    fn client_expect(&self) -> Expect {
        Expect {
            role: Some("client"),
            preexisting: Some(false),
            netns: Some(self.client_ns),
            ..Expect::default()
        }
    }

    fn server_expect(&self) -> Expect {
        Expect {
            role: Some("server"),
            preexisting: Some(false),
            netns: Some(self.server_ns),
            ..Expect::default()
        }
    }
}

/// Case 1: the server's `max_connection_idle` ends an idle connection.
fn scenario_max_idle(t: &Topology) -> Grpc {
    let mut g = Grpc::start(t, false, &[("grpc.max_connection_idle_ms", 1000)], NO_OPTS);
    g.call(1);
    g.wait_channel_down();
    g
}

/// Case 2: the server's `max_connection_age` (with grace) ends an idle connection.
fn scenario_max_age(t: &Topology) -> Grpc {
    let mut g = Grpc::start(
        t,
        false,
        &[
            ("grpc.max_connection_age_ms", 1000),
            ("grpc.max_connection_age_grace_ms", 500),
        ],
        NO_OPTS,
    );
    g.call(1);
    g.wait_channel_down();
    g
}

/// Case 3: a client pinging more often than the server permits gets ENHANCE_YOUR_CALM.
/// grpc C-core never sends keepalive PINGs less than 1 s apart without data, so the client
/// pings every ~1000 ms despite `keepalive_time_ms=200`; still 5x too often.
fn scenario_too_many_pings(t: &Topology) -> Grpc {
    let mut g = Grpc::start(
        t,
        false,
        &[("grpc.http2.min_ping_interval_without_data_ms", 5000)],
        &[
            ("grpc.keepalive_time_ms", 200),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    );
    g.call(1);
    g.wait_channel_down();
    g
}

/// Case 4: the client closes its channel (no GOAWAY from grpcio: just a FIN).
fn scenario_client_close(t: &Topology) -> Grpc {
    let mut g = Grpc::start(t, false, NO_OPTS, NO_OPTS);
    g.call(3);
    g.client.close_channel().unwrap_or_else(|e| panic!("{e:#}"));
    g
}

/// Case 5: the path is blackholed; the client's keepalive PING goes unanswered. grpcio
/// sets TCP_USER_TIMEOUT = keepalive_timeout_ms on its socket, and the kernel's timeout
/// (ETIMEDOUT) fires before grpc's own ping watchdog: no FIN, RST or GOAWAY leaves the
/// client.
fn scenario_keepalive_blackhole(t: &Topology) -> Grpc {
    let mut g = Grpc::start(
        t,
        false,
        NO_OPTS,
        &[
            ("grpc.keepalive_time_ms", 1000),
            ("grpc.keepalive_timeout_ms", 1000),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    );
    g.call(1);
    t.router_iptables(&["-I", "FORWARD", "-j", "DROP"])
        .expect("insert DROP rule in the router");
    g.wait_channel_down();
    g
}

/// Case 6: the client cancels one call (RST_STREAM CANCEL), makes another, closes.
fn scenario_stream_cancel(t: &Topology) -> Grpc {
    let mut g = Grpc::start(t, false, NO_OPTS, NO_OPTS);
    g.call(1);
    g.client
        .slow_cancel(5000, Duration::from_millis(300))
        .unwrap_or_else(|e| panic!("{e:#}"));
    g.server
        .wait_cancelled(1, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    g.call(1);
    g.client.close_channel().unwrap_or_else(|e| panic!("{e:#}"));
    g
}

/// nghttpd in the server namespace, `nghttp -n` fetching `path` from the client namespace.
struct Fetch {
    server_addr: String,
    client_ns: u64,
    server_ns: u64,
    elapsed: Duration,
}

fn scenario_nghttp(t: &Topology, v6: bool, path: &str, docroot: &DocRoot) -> Fetch {
    let addr = t.server_addr(v6, HTTP_PORT);
    let d = Nghttpd::spawn(&t.server, addr, docroot).unwrap_or_else(|e| panic!("{e:#}"));
    let run = nghttp_get(&t.client, &d.url(path), Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e:#}"));
    // Leave nghttpd running: its socket closes on the client's GOAWAY/FIN, not on exit.
    std::thread::sleep(Duration::from_millis(200));
    d.stop();
    Fetch {
        server_addr: addr.to_string(),
        client_ns: t.client_inode().expect("inode"),
        server_ns: t.server_inode().expect("inode"),
        elapsed: run.elapsed,
    }
}

// ---- Looking up and checking close objects.

fn s<'a>(v: &'a Value, ptr: &str) -> &'a Value {
    v.pointer(ptr).unwrap_or(&Value::Null)
}

/// The close object in `netns` whose (normalised) local/remote addresses match.
fn wait_close(agent: &mut Agent, netns: u64, local: Option<&str>, remote: Option<&str>) -> Value {
    let what = format!("close object netns={netns} local={local:?} remote={remote:?}");
    agent
        .wait_for(&what, VERDICT_TIMEOUT, |v| {
            let c = &v["conn"];
            c["netns"].as_u64() == Some(netns)
                && local.is_none_or(|l| norm_addr(c["local"].as_str().unwrap_or("")) == l)
                && remote.is_none_or(|r| norm_addr(c["remote"].as_str().unwrap_or("")) == r)
        })
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// `n` distinct close objects in `netns` matching local/remote (for several connections).
fn wait_closes(
    agent: &mut Agent,
    n: usize,
    netns: u64,
    local: Option<&str>,
    remote: Option<&str>,
) -> Vec<Value> {
    let mut got: Vec<Value> = Vec::new();
    for _ in 0..n {
        let seen: Vec<Value> = got.iter().map(|o| o["conn"]["id"].clone()).collect();
        let what = format!(
            "close object #{} netns={netns} local={local:?} remote={remote:?}",
            got.len() + 1
        );
        let o = agent
            .wait_for(&what, VERDICT_TIMEOUT, |v| {
                let c = &v["conn"];
                c["netns"].as_u64() == Some(netns)
                    && !seen.contains(&c["id"])
                    && local.is_none_or(|l| norm_addr(c["local"].as_str().unwrap_or("")) == l)
                    && remote.is_none_or(|r| norm_addr(c["remote"].as_str().unwrap_or("")) == r)
            })
            .unwrap_or_else(|e| panic!("{e:#}"));
        got.push(o);
    }
    got
}

fn fail(obj: &Value, msg: &str) -> ! {
    panic!(
        "{msg}\nobject: {}",
        serde_json::to_string_pretty(obj).unwrap_or_default()
    )
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

/// `conn.pid`, when present, is the peer process.
fn check_pid(obj: &Value, pid: u32) {
    let got = s(obj, "/conn/pid");
    if !got.is_null() && *got != pid {
        fail(
            obj,
            &format!("/conn/pid: expected null or {pid}, got {got}"),
        );
    }
}

/// Both ends agree on who sent the first FIN/RST, and on closed_by/reason.
fn check_same_story(c: &Value, sv: &Value) {
    let (a, b) = (
        s(c, "/verdict/tcp_initiator").as_str().unwrap_or("?"),
        s(sv, "/verdict/tcp_initiator").as_str().unwrap_or("?"),
    );
    let ok = matches!(
        (a, b),
        ("local", "remote") | ("remote", "local") | ("none", "none")
    );
    assert!(
        ok,
        "tcp_initiator inconsistent: client socket says {a:?}, server socket says {b:?}\n{c}\n{sv}"
    );
    for ptr in ["/verdict/closed_by", "/verdict/reason"] {
        assert_eq!(
            s(c, ptr),
            s(sv, ptr),
            "{ptr} differs between the ends\nclient: {c}\nserver: {sv}"
        );
    }
}

/// `h2`, which must be an object.
fn h2(obj: &Value) -> &Value {
    let h = &obj["h2"];
    if !h.is_object() {
        fail(obj, &format!("/h2: expected an object, got {h}"));
    }
    h
}

/// `h2.state == "synced"` and the preface was seen.
fn check_synced(obj: &Value) {
    let h = h2(obj);
    if h["state"] != "synced" || h["preface_seen"] != true {
        fail(
            obj,
            &format!(
                "expected h2.state \"synced\" and h2.preface_seen true, got {} / {}",
                h["state"], h["preface_seen"]
            ),
        );
    }
}

/// Expected fields of `h2.goaways[i]`.
struct Goaway<'a> {
    dir: &'a str,
    error_code: &'a str,
    code: u64,
    last_stream_id: Option<u64>,
    debug: &'a str,
}

fn check_goaway(obj: &Value, i: usize, want: &Goaway) {
    let g = &h2(obj)["goaways"][i];
    if !g.is_object() {
        fail(obj, &format!("/h2/goaways/{i}: missing"));
    }
    let mut bad = Vec::new();
    let mut eq = |field: &str, w: Value| {
        if g[field] != w {
            bad.push(format!(
                "/h2/goaways/{i}/{field}: expected {w}, got {}",
                g[field]
            ));
        }
    };
    eq("dir", want.dir.into());
    eq("error_code", want.error_code.into());
    eq("code", want.code.into());
    eq("debug", want.debug.into());
    eq("debug_truncated", false.into());
    if let Some(l) = want.last_stream_id {
        eq("last_stream_id", l.into());
    }
    if !g["at_ms"].is_number() {
        bad.push(format!(
            "/h2/goaways/{i}/at_ms: not a number: {}",
            g["at_ms"]
        ));
    }
    if !bad.is_empty() {
        fail(obj, &bad.join("\n"));
    }
}

fn goaway_count(obj: &Value) -> usize {
    match &h2(obj)["goaways"] {
        Value::Array(a) => a.len(),
        other => fail(obj, &format!("/h2/goaways: expected an array, got {other}")),
    }
}

fn num(obj: &Value, ptr: &str) -> f64 {
    s(obj, ptr).as_f64().unwrap_or_else(|| {
        fail(
            obj,
            &format!("{ptr}: expected a number, got {}", s(obj, ptr)),
        )
    })
}

/// Numbers written as `<n> ms` / `<n>ms` / `<n.m> ms` in `text`.
fn ms_numbers(text: &str) -> Vec<f64> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit()
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'.'))
        {
            let start = i;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            let n = &text[start..i];
            let mut j = i;
            if j < b.len() && b[j] == b' ' {
                j += 1;
            }
            let unit_ok = text[j..].starts_with("ms")
                && !text[j + 2..].starts_with(|c: char| c.is_ascii_alphanumeric());
            if unit_ok {
                if let Ok(v) = n.trim_end_matches('.').parse() {
                    out.push(v);
                }
            }
        } else {
            i += 1;
        }
    }
    out
}

// ---- Agent cases.

/// Case 1: `grpc.max_connection_idle_ms=1000`; the client makes one call and idles.
#[test]
fn grpc_server_max_idle() {
    if !prelude("grpc_server_max_idle", Need::Grpc) {
        return;
    }
    let t = Topology::new().expect("topology");
    let mut agent = start_agent(&t);
    let g = scenario_max_idle(&t);
    let c = g.client_close(&mut agent);
    let sv = g.server_close(&mut agent);
    for (obj, e, dir, pid) in [
        (&c, g.client_expect(), "received", g.client.pid()),
        (&sv, g.server_expect(), "sent", g.server.pid()),
    ] {
        check(
            obj,
            &Expect {
                closed_by: Some("server"),
                reason: Some("server_idle_timeout"),
                ..e
            },
        );
        check_pid(obj, pid);
        check_synced(obj);
        check_goaway(
            obj,
            0,
            &Goaway {
                dir,
                error_code: IDLE_GOAWAY.0,
                code: IDLE_GOAWAY.1,
                last_stream_id: Some(1),
                debug: IDLE_GOAWAY.2,
            },
        );
    }
    check_same_story(&c, &sv);
    check_pair(&c, &sv);
    stop(agent);
}

/// Case 2: `max_connection_age_ms=1000`, grace 500 ms, idle client: grpc's two-GOAWAY
/// drain (GOAWAY 2^31-1 + PING, ack, GOAWAY last-stream). The client usually closes its
/// idle transport on the first GOAWAY, so its FIN often precedes the second GOAWAY, which
/// its kernel then answers with a RST: the L4 initiator and mechanism vary, the L7 verdict
/// must not.
#[test]
fn grpc_server_max_age() {
    if !prelude("grpc_server_max_age", Need::Grpc) {
        return;
    }
    let t = Topology::new().expect("topology");
    let mut agent = start_agent(&t);
    let g = scenario_max_age(&t);
    let c = g.client_close(&mut agent);
    let sv = g.server_close(&mut agent);
    for (obj, e, dir, need) in [
        (&c, g.client_expect(), "received", 1),
        (&sv, g.server_expect(), "sent", 2),
    ] {
        check(
            obj,
            &Expect {
                closed_by: Some("server"),
                reason: Some("server_max_age"),
                ..e
            },
        );
        check_synced(obj);
        let n = goaway_count(obj);
        // The server socket sends both; the client socket sees the second one only if it
        // arrives (it does, possibly after the client's own FIN).
        if n < need || n > 2 {
            fail(obj, &format!("expected {need}..=2 GOAWAYs, got {n}"));
        }
        for (i, lsid) in [(0, MAX_STREAM_ID), (1, 1)].into_iter().take(n) {
            check_goaway(
                obj,
                i,
                &Goaway {
                    dir,
                    error_code: "NO_ERROR",
                    code: 0,
                    last_stream_id: Some(lsid),
                    debug: MAX_AGE_DEBUG,
                },
            );
        }
        if n == 2 && num(obj, "/h2/goaways/1/at_ms") < num(obj, "/h2/goaways/0/at_ms") {
            fail(obj, "GOAWAYs out of order");
        }
    }
    // The drain PING: sent with the first GOAWAY by the server, acked by the client.
    if num(&sv, "/h2/pings/sent") < 1.0 || num(&sv, "/h2/pings/acks_received") < 1.0 {
        fail(
            &sv,
            "the server's drain PING (sent with the first GOAWAY) and its ack",
        );
    }
    check_same_story(&c, &sv);
    check_pair(&c, &sv);
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
    let g = scenario_too_many_pings(&t);
    let c = g.client_close(&mut agent);
    let sv = g.server_close(&mut agent);
    for (obj, e, dir) in [
        (&c, g.client_expect(), "received"),
        (&sv, g.server_expect(), "sent"),
    ] {
        check(
            obj,
            &Expect {
                closed_by: Some("server"),
                reason: Some("server_too_many_pings"),
                ..e
            },
        );
        check_synced(obj);
        check_goaway(
            obj,
            0,
            &Goaway {
                dir,
                error_code: TOO_MANY_PINGS.0,
                code: TOO_MANY_PINGS.1,
                last_stream_id: Some(1),
                debug: TOO_MANY_PINGS.2,
            },
        );
        // The hint names the client's PING interval (~1000 ms on the wire, see
        // scenario_too_many_pings); lenient on the value.
        let hint = s(obj, "/verdict/hint").as_str().unwrap_or("");
        let ms = ms_numbers(hint);
        if !ms.iter().any(|v| (150.0..=2000.0).contains(v)) {
            fail(
                obj,
                &format!("verdict.hint should name the client's PING interval in ms; found {ms:?}"),
            );
        }
    }
    // Three keepalive PINGs (strikes) from the client, ~1 s apart.
    if num(&c, "/h2/pings/sent") < 3.0 || num(&sv, "/h2/pings/received") < 3.0 {
        fail(
            &c,
            &format!("expected >= 3 client PINGs (client object below; server: {sv})"),
        );
    }
    let iv = num(&c, "/h2/pings/min_interval_ms_sent");
    if !(100.0..=1500.0).contains(&iv) {
        fail(&c, &format!("min_interval_ms_sent {iv} not in 100..=1500"));
    }
    let iv = num(&sv, "/h2/pings/min_interval_ms_received");
    if !(100.0..=1500.0).contains(&iv) {
        fail(
            &sv,
            &format!("min_interval_ms_received {iv} not in 100..=1500"),
        );
    }
    check_same_story(&c, &sv);
    check_pair(&c, &sv);
    stop(agent);
}

/// Case 4: `channel.close()` after three calls. grpcio sends no GOAWAY on close, only a
/// FIN, so the verdict is the TCP-level `client_close`.
#[test]
fn grpc_client_closes_channel() {
    if !prelude("grpc_client_closes_channel", Need::Grpc) {
        return;
    }
    let t = Topology::new().expect("topology");
    let mut agent = start_agent(&t);
    let g = scenario_client_close(&t);
    let c = g.client_close(&mut agent);
    let sv = g.server_close(&mut agent);
    for (obj, e, ini) in [
        (&c, g.client_expect(), "local"),
        (&sv, g.server_expect(), "remote"),
    ] {
        check(
            obj,
            &Expect {
                closed_by: Some("client"),
                reason: Some("client_close"),
                tcp_initiator: Some(ini),
                mechanism: Some("fin"),
                ..e
            },
        );
        check_synced(obj);
        if goaway_count(obj) != 0 {
            fail(obj, "grpcio sends no GOAWAY on channel.close()");
        }
    }
    check_pid(&c, g.client.pid());
    check_same_story(&c, &sv);
    check_pair(&c, &sv);
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
    let g = scenario_keepalive_blackhole(&t);
    let c = g.client_close(&mut agent);
    check(
        &c,
        &Expect {
            closed_by: Some("client"),
            reason: Some("client_keepalive_timeout"),
            tcp_initiator: Some("local"),
            // ETIMEDOUT from the TCP_USER_TIMEOUT grpcio sets; nothing is sent.
            mechanism: Some("timeout"),
            ..g.client_expect()
        },
    );
    check_synced(&c);
    if num(&c, "/h2/pings/unanswered_sent") < 1.0 {
        fail(&c, "expected h2.pings.unanswered_sent >= 1");
    }
    if goaway_count(&c) != 0 {
        fail(&c, "nothing (no GOAWAY) leaves the client in this case");
    }
    // The server's socket is still open; it is not part of the verdict.
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
    let g = scenario_stream_cancel(&t);
    let c = g.client_close(&mut agent);
    let sv = g.server_close(&mut agent);
    for (obj, e, ini, side) in [
        (&c, g.client_expect(), "local", "sent"),
        (&sv, g.server_expect(), "remote", "received"),
    ] {
        check(
            obj,
            &Expect {
                closed_by: Some("client"),
                reason: Some("client_close"),
                tcp_initiator: Some(ini),
                mechanism: Some("fin"),
                ..e
            },
        );
        check_synced(obj);
        let ptr = format!("/h2/rst_streams/{side}/CANCEL");
        if num(obj, &ptr) < 1.0 {
            fail(obj, &format!("expected {ptr} >= 1"));
        }
        if goaway_count(obj) != 0 {
            fail(obj, "no GOAWAY in this case");
        }
    }
    check_same_story(&c, &sv);
    check_pair(&c, &sv);
    stop(agent);
}

/// Checks of an nghttp fetch: nghttp ends with GOAWAY(NO_ERROR, last_stream_id 0, no
/// debug data), shutdown(SHUT_WR), close; nghttpd answers the GOAWAY with its own FIN,
/// so which FIN is first is a race (usually the client's).
fn check_nghttp_fetch(agent: &mut Agent, f: &Fetch) {
    let c = wait_close(agent, f.client_ns, None, Some(&f.server_addr));
    let sv = wait_close(agent, f.server_ns, Some(&f.server_addr), None);
    for (obj, role, dir) in [(&c, "client", "sent"), (&sv, "server", "received")] {
        check(
            obj,
            &Expect {
                role: Some(role),
                preexisting: Some(false),
                closed_by: Some("client"),
                reason: Some("client_goaway"),
                ..Expect::default()
            },
        );
        check_synced(obj);
        if goaway_count(obj) != 1 {
            fail(obj, "expected exactly nghttp's GOAWAY");
        }
        check_goaway(
            obj,
            0,
            &Goaway {
                dir,
                error_code: "NO_ERROR",
                code: 0,
                last_stream_id: Some(0),
                debug: "",
            },
        );
        if num(obj, "/h2/streams_open_at_close") != 0.0 {
            fail(obj, "every stream had ended before the close");
        }
    }
    check_same_story(&c, &sv);
    check_pair(&c, &sv);
}

/// Case 7a: 100 MB download over HTTP/2 (IPv4): frame tracking survives the bulk DATA,
/// and nghttp's final GOAWAY is parsed.
#[test]
fn nghttp_bulk_100mb_then_close() {
    if !prelude(
        "nghttp_bulk_100mb_then_close",
        Need::Nghttp2(&["nghttpd", "nghttp"]),
    ) {
        return;
    }
    let t = Topology::new().expect("topology");
    let docroot = DocRoot::new(BIG).expect("docroot");
    let mut agent = start_agent(&t);
    let f = scenario_nghttp(&t, false, "big", &docroot);
    eprintln!("nghttp fetched {BIG} bytes in {:?}", f.elapsed);
    check_nghttp_fetch(&mut agent, &f);
    stop(agent);
}

/// Case 7b: a small HTTP/2 fetch over IPv6.
#[test]
fn nghttp_ipv6_close() {
    if !prelude("nghttp_ipv6_close", Need::Nghttp2(&["nghttpd", "nghttp"])) {
        return;
    }
    let t = Topology::new().expect("topology");
    let docroot = DocRoot::new(4096).expect("docroot");
    let mut agent = start_agent(&t);
    let f = scenario_nghttp(&t, true, "small", &docroot);
    let c = wait_close(&mut agent, f.client_ns, None, Some(&f.server_addr));
    assert_eq!(c["conn"]["family"], "ipv6", "{c}");
    check_nghttp_fetch(&mut agent, &f);
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
    let addr = t.server_addr(false, HTTP_PORT);
    let d = Nghttpd::spawn(&t.server, addr, &docroot).unwrap_or_else(|e| panic!("{e:#}"));
    h2load(&t.client, &d.url("small"), 100, 2, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let server_addr = addr.to_string();
    let (cns, sns) = (
        t.client_inode().expect("inode"),
        t.server_inode().expect("inode"),
    );
    let cs = wait_closes(&mut agent, 2, cns, None, Some(&server_addr));
    let ss = wait_closes(&mut agent, 2, sns, Some(&server_addr), None);
    d.stop();
    for (obj, dir) in cs
        .iter()
        .map(|o| (o, "sent"))
        .chain(ss.iter().map(|o| (o, "received")))
    {
        check(
            obj,
            &Expect {
                closed_by: Some("client"),
                reason: Some("client_goaway"),
                ..Expect::default()
            },
        );
        check_synced(obj);
        check_goaway(
            obj,
            0,
            &Goaway {
                dir,
                error_code: "NO_ERROR",
                code: 0,
                last_stream_id: None,
                debug: "",
            },
        );
    }
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
    let addr: SocketAddr = t.server_addr(false, TCP_PORT);
    let mut server = Peer::listen(peer_bin(), &t.server, addr).expect("start server");
    let mut client = Peer::connect(peer_bin(), &t.client, addr).expect("client connect");
    server
        .wait_accepted(Duration::from_secs(10))
        .expect("accept");
    client.send(100).expect("client send");
    server.read(100).expect("server read");
    server.send(50).expect("server send");
    client.read(50).expect("client read");
    client.close().expect("client close");
    server.wait_eof().expect("server sees FIN");
    server.close().expect("server close");

    let (cl, sa) = (client.local.to_string(), addr.to_string());
    let c = wait_close(
        &mut agent,
        t.client_inode().expect("inode"),
        Some(&cl),
        Some(&sa),
    );
    let sv = wait_close(
        &mut agent,
        t.server_inode().expect("inode"),
        Some(&sa),
        Some(&cl),
    );
    for (obj, role, ini, pid) in [
        (&c, "client", "local", client.pid()),
        (&sv, "server", "remote", server.pid()),
    ] {
        check(
            obj,
            &Expect {
                family: Some("ipv4"),
                role: Some(role),
                closed_by: Some("client"),
                reason: Some("client_close"),
                tcp_initiator: Some(ini),
                mechanism: Some("fin"),
                ..Expect::default()
            },
        );
        if role == "client" {
            check(
                obj,
                &Expect {
                    pid: PidCheck::Exact(pid),
                    ..Expect::default()
                },
            );
        }
        if h2(obj)["state"] != "not_h2" {
            fail(obj, "expected h2.state \"not_h2\"");
        }
    }
    check_pair(&c, &sv);
    stop(agent);
}

// ---- Wire checks: the same scenarios without the agent, read back with tshark.

/// Captures in the client namespace while `scenario` runs; returns the timeline.
fn capture<T>(
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
    let evs = tests::h2peers::wire_events(&path, port).unwrap_or_else(|e| panic!("{e:#}"));
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

fn from<'a>(evs: &'a [WireEvent], ip: &'a str) -> impl Iterator<Item = &'a WireEvent> + 'a {
    evs.iter().filter(move |e| e.from == ip)
}

fn goaways(evs: &[WireEvent], ip: &str) -> Vec<(u32, u32, String)> {
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

fn first_fin(evs: &[WireEvent]) -> Option<&WireEvent> {
    evs.iter().find(|e| e.kind == WireKind::Fin)
}

fn at_of(evs: &[WireEvent], ip: &str, pred: impl Fn(&WireKind) -> bool) -> Option<f64> {
    from(evs, ip).find(|e| pred(&e.kind)).map(|e| e.at)
}

fn no_resets(evs: &[WireEvent]) {
    assert!(
        !evs.iter().any(|e| e.kind == WireKind::Rst),
        "unexpected TCP RST: {evs:#?}"
    );
}

fn ips(t: &Topology, v6: bool) -> (String, String) {
    (t.client_ip(v6).to_string(), t.server_ip(v6).to_string())
}

#[test]
fn wire_grpc_max_idle() {
    if !wire_prelude("wire_grpc_max_idle", Need::Grpc) {
        return;
    }
    let t = Topology::new().expect("topology");
    let (_g, evs) = capture("wire_grpc_max_idle", &t, GRPC_PORT, scenario_max_idle);
    let (cip, sip) = ips(&t, false);
    assert_eq!(
        goaways(&evs, &sip),
        vec![(IDLE_GOAWAY.1 as u32, 1, IDLE_GOAWAY.2.to_string())]
    );
    assert!(goaways(&evs, &cip).is_empty());
    fins_follow_goaway("max_idle", &evs, &cip, &sip);
    no_resets(&evs);
}

#[test]
fn wire_grpc_max_age() {
    if !wire_prelude("wire_grpc_max_age", Need::Grpc) {
        return;
    }
    let t = Topology::new().expect("topology");
    let (_g, evs) = capture("wire_grpc_max_age", &t, GRPC_PORT, scenario_max_age);
    let (cip, sip) = ips(&t, false);
    let m = MAX_AGE_DEBUG.to_string();
    // The server always sends both GOAWAYs (even when the client closed in between).
    assert_eq!(
        goaways(&evs, &sip),
        vec![(0, MAX_STREAM_ID as u32, m.clone()), (0, 1, m)]
    );
    assert!(goaways(&evs, &cip).is_empty());
    // GOAWAY#1 and the server's PING, then the client's ack; the rest is a race between
    // the client closing its idle transport on GOAWAY#1 (FIN, then its kernel RSTs the
    // late GOAWAY#2) and the server's GOAWAY#2 + FIN.
    let tl = timeline(&evs, &sip);
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

/// `S:GOAWAY`, `C:PING-ack`, `S:FIN`, ... (SETTINGS, HEADERS and the handshake left out).
fn timeline(evs: &[WireEvent], server_ip: &str) -> Vec<String> {
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

#[test]
fn wire_grpc_too_many_pings() {
    if !wire_prelude("wire_grpc_too_many_pings", Need::Grpc) {
        return;
    }
    let t = Topology::new().expect("topology");
    let (_g, evs) = capture(
        "wire_grpc_too_many_pings",
        &t,
        GRPC_PORT,
        scenario_too_many_pings,
    );
    let (cip, sip) = ips(&t, false);
    assert_eq!(
        goaways(&evs, &sip),
        vec![(TOO_MANY_PINGS.1 as u32, 1, TOO_MANY_PINGS.2.to_string())]
    );
    let pings: Vec<f64> = from(&evs, &cip)
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
    fins_follow_goaway("too_many_pings", &evs, &cip, &sip);
    no_resets(&evs);
}

/// After the server's (last) GOAWAY both ends FIN within 100 ms: the server closes right
/// after sending it, the client as soon as it reads it, so which FIN is first is a race
/// (usually the server's by ~0.1-0.5 ms).
fn fins_follow_goaway(what: &str, evs: &[WireEvent], cip: &str, sip: &str) {
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

#[test]
fn wire_grpc_client_close() {
    if !wire_prelude("wire_grpc_client_close", Need::Grpc) {
        return;
    }
    let t = Topology::new().expect("topology");
    let (_g, evs) = capture(
        "wire_grpc_client_close",
        &t,
        GRPC_PORT,
        scenario_client_close,
    );
    let (cip, sip) = ips(&t, false);
    assert!(
        goaways(&evs, &cip).is_empty(),
        "grpcio sends no GOAWAY on close"
    );
    assert!(goaways(&evs, &sip).is_empty());
    assert_eq!(
        first_fin(&evs).expect("a FIN").from,
        cip,
        "client FINs first"
    );
    no_resets(&evs);
}

#[test]
fn wire_grpc_keepalive_blackhole() {
    if !wire_prelude("wire_grpc_keepalive_blackhole", Need::Grpc) {
        return;
    }
    let t = Topology::new().expect("topology");
    let started = Instant::now();
    let (_g, evs) = capture(
        "wire_grpc_keepalive_blackhole",
        &t,
        GRPC_PORT,
        scenario_keepalive_blackhole,
    );
    eprintln!("channel down after {:?}", started.elapsed());
    let (cip, _) = ips(&t, false);
    // The last thing the client sent: its keepalive PING (and its retransmissions).
    let last_ping = from(&evs, &cip)
        .filter(|e| e.kind == WireKind::Ping { ack: false })
        .last()
        .expect("a client PING")
        .at;
    let after: Vec<&WireEvent> = from(&evs, &cip).filter(|e| e.at > last_ping).collect();
    assert!(
        after.is_empty(),
        "nothing (no GOAWAY, FIN or RST) leaves the client after its PING: {after:#?}"
    );
}

#[test]
fn wire_grpc_stream_cancel() {
    if !wire_prelude("wire_grpc_stream_cancel", Need::Grpc) {
        return;
    }
    let t = Topology::new().expect("topology");
    let (_g, evs) = capture(
        "wire_grpc_stream_cancel",
        &t,
        GRPC_PORT,
        scenario_stream_cancel,
    );
    let (cip, sip) = ips(&t, false);
    let rst: Vec<(u32, u32)> = from(&evs, &cip)
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
        !from(&evs, &sip).any(|e| matches!(e.kind, WireKind::RstStream { .. })),
        "the server sends no RST_STREAM"
    );
    assert!(goaways(&evs, &cip).is_empty() && goaways(&evs, &sip).is_empty());
    assert_eq!(first_fin(&evs).expect("a FIN").from, cip);
    no_resets(&evs);
}

#[test]
fn wire_nghttp_goaway() {
    if !wire_prelude("wire_nghttp_goaway", Need::Nghttp2(&["nghttpd", "nghttp"])) {
        return;
    }
    let t = Topology::new().expect("topology");
    let docroot = DocRoot::new(4096).expect("docroot");
    for v6 in [false, true] {
        let (_f, evs) = capture("wire_nghttp_goaway", &t, HTTP_PORT, |t| {
            scenario_nghttp(t, v6, "small", &docroot)
        });
        let (cip, sip) = ips(&t, v6);
        assert_eq!(goaways(&evs, &cip), vec![(0, 0, String::new())]);
        assert!(goaways(&evs, &sip).is_empty(), "nghttpd sends no GOAWAY");
        let ga = at_of(&evs, &cip, |k| matches!(k, WireKind::Goaway { .. })).expect("goaway");
        let cfin = at_of(&evs, &cip, |k| *k == WireKind::Fin).expect("client FIN");
        let sfin = at_of(&evs, &sip, |k| *k == WireKind::Fin).expect("server FIN");
        assert!(cfin >= ga && sfin >= ga, "both FINs follow the GOAWAY");
        eprintln!(
            "v6={v6}: client FIN +{:.3} ms, server FIN +{:.3} ms after the GOAWAY",
            (cfin - ga) * 1e3,
            (sfin - ga) * 1e3
        );
        no_resets(&evs);
    }
}

#[test]
fn ms_numbers_in_hints() {
    assert_eq!(
        ms_numbers("pings every 1001.2 ms, allowed 5000ms"),
        vec![1001.2, 5000.0]
    );
    assert_eq!(ms_numbers("after 3 s; 12 msgs; v2 ms"), Vec::<f64>::new());
    assert_eq!(ms_numbers("~200 ms."), vec![200.0]);
}
