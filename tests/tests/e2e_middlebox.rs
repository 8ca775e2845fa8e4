//! Privileged end-to-end tests of middlebox attribution (issue #8): a real haproxy in the
//! router namespace ending both legs on its idle timeout or passing on the server's close,
//! and a blackholed path whose late RST must not be blamed on the side that sent it.
//! Every case declares the truth, and every `high` verdict printed for its namespaces is
//! checked against it ([`tests::middlebox::check_calibrated`]).

use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tests::middlebox::{Haproxy, Truth, check_calibrated, haproxy_missing};
use tests::{Agent, Expect, Peer, PidCheck, Topology, agent_bin, check_close, should_run};

const WC_PEER: &str = env!("CARGO_BIN_EXE_wc-peer");
const SERVER_PORT: u16 = 8080;
const PROXY_PORT: u16 = 8443;
const IDLE: Duration = Duration::from_millis(1500);
const VERDICT_TIMEOUT: Duration = Duration::from_secs(15);

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

fn ok<T>(r: anyhow::Result<T>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e:#}"),
    }
}

/// client --> haproxy (router) --> server, data exchanged both ways, all four sockets known.
struct Proxied {
    client: Peer,
    server: Peer,
    haproxy: Haproxy,
    /// client socket, haproxy's downstream socket's view is the reverse.
    client_addr: String,
    proxy_addr: String,
    /// haproxy's upstream socket.
    upstream_addr: String,
    server_addr: String,
    ns: [u64; 3],
    /// Namespace haproxy runs in.
    proxy_netns: u64,
}

impl Proxied {
    fn open(t: &Topology) -> Proxied {
        Self::open_with(t, false)
    }

    /// `sidecar`: haproxy runs in the client's namespace on 127.0.0.1 (the service-mesh
    /// layout), else in the router.
    fn open_with(t: &Topology, sidecar: bool) -> Proxied {
        let server_addr = t.server_addr(false, SERVER_PORT);
        let (proxy_ns, bind, upstream_ip) = if sidecar {
            (
                &t.client,
                SocketAddr::from(([127, 0, 0, 1], 15001)),
                t.plan.client_v4,
            )
        } else {
            (
                &t.router,
                SocketAddr::new(t.plan.router_client_v4.into(), PROXY_PORT),
                t.plan.router_server_v4,
            )
        };
        let mut server = ok(
            Peer::listen(Path::new(WC_PEER), &t.server, server_addr),
            "start server",
        );
        let haproxy = ok(
            Haproxy::start(proxy_ns, bind, server_addr, IDLE),
            "start haproxy",
        );
        let mut client = ok(
            Peer::connect(Path::new(WC_PEER), &t.client, bind),
            "client connects to haproxy",
        );
        let upstream = ok(
            server.wait_accepted(Duration::from_secs(10)),
            "server accepts haproxy's connection",
        );
        assert_eq!(upstream.ip(), upstream_ip, "upstream comes from haproxy");
        ok(client.send(100), "client send");
        ok(server.read(100), "server read");
        ok(server.send(50), "server send");
        ok(client.read(50), "client read");
        let ns = ok(t.inodes(), "inodes");
        let proxy_netns = if sidecar { ns[0] } else { ns[1] };
        Proxied {
            client_addr: client.local.to_string(),
            proxy_addr: bind.to_string(),
            upstream_addr: upstream.to_string(),
            server_addr: server_addr.to_string(),
            client,
            server,
            haproxy,
            ns: [ns[0], ns[1], ns[2]],
            proxy_netns,
        }
    }

    /// [client socket, haproxy downstream, haproxy upstream, server socket].
    fn verdicts(&self, agent: &mut Agent) -> [Value; 4] {
        let [c, _, s] = self.ns;
        let r = self.proxy_netns;
        let mut get = |l: &str, rm: &str, ns: u64, what: &str| {
            ok(
                agent.wait_for_close(l, rm, Some(ns), VERDICT_TIMEOUT),
                &format!("close object for {what}"),
            )
        };
        [
            get(&self.client_addr, &self.proxy_addr, c, "the client socket"),
            get(
                &self.proxy_addr,
                &self.client_addr,
                r,
                "haproxy's downstream socket",
            ),
            get(
                &self.upstream_addr,
                &self.server_addr,
                r,
                "haproxy's upstream socket",
            ),
            get(
                &self.server_addr,
                &self.upstream_addr,
                s,
                "the server socket",
            ),
        ]
    }
}

fn check(obj: &Value, e: &Expect) {
    if let Err(err) = check_close(obj, e) {
        panic!("{err:#}");
    }
}

/// The agent seeing every namespace, or (`single`) only the client's: `--visible-netns`
/// discards the other namespaces' events before any joining, as if they were other nodes.
fn start_agent(ns: &[u64], single: bool) -> Agent {
    if !single {
        return ok(Agent::start(ns), "agent");
    }
    let mut args = tests::default_trace_args(&ns[..1]);
    args.push("--visible-netns".into());
    args.push(ns[0].to_string());
    ok(
        Agent::spawn(&agent_bin(), &args, tests::READY_TIMEOUT),
        "agent (client namespace only)",
    )
}

fn calibrated(agent: &Agent, ns: &[u64], truth: Truth) -> usize {
    ok(check_calibrated(agent.objects(), ns, truth), "calibration")
}

/// haproxy's `timeout client/server` fires: it closes both legs itself. Every socket of
/// both legs is `middlebox`, naming haproxy, high (both legs and both far ends traced).
#[test]
fn haproxy_idle_timeout_closes_both_legs() {
    if prelude("haproxy_idle_timeout_closes_both_legs") {
        idle_timeout_case("haproxy_idle_timeout_closes_both_legs", false);
    }
}

/// The same with haproxy as a sidecar in the client's namespace, reached over loopback.
#[test]
fn sidecar_idle_timeout_closes_both_legs() {
    if prelude("sidecar_idle_timeout_closes_both_legs") {
        idle_timeout_case("sidecar_idle_timeout_closes_both_legs", true);
    }
}

fn idle_timeout_case(test: &str, sidecar: bool) {
    if let Some(why) = haproxy_missing() {
        panic!("{test}: {why}");
    }
    let t = ok(Topology::new(), "topology");
    let mut agent = ok(Agent::start(&ok(t.inodes(), "inodes")), "agent");
    let mut p = Proxied::open_with(&t, sidecar);
    // Nobody sends anything: haproxy's idle timeout ends it.
    ok(p.client.wait_eof(), "client sees haproxy's FIN");
    ok(p.server.wait_eof(), "server sees haproxy's FIN");
    ok(p.client.close(), "client close");
    ok(p.server.close(), "server close");
    let v = p.verdicts(&mut agent);
    let hp = p.haproxy.pid();
    for (obj, leg) in v
        .iter()
        .zip(["downstream", "downstream", "upstream", "upstream"])
    {
        check(
            obj,
            &Expect {
                closed_by: Some("middlebox"),
                reason: Some("proxy_close"),
                confidence: Some("high"),
                ..Expect::default()
            },
        );
        let mb = &obj["verdict"]["middlebox"];
        assert_eq!(mb["kind"], "proxy", "{obj}");
        assert_eq!(mb["pid"].as_u64(), Some(u64::from(hp)), "{obj}");
        assert_eq!(mb["comm"], "haproxy", "{obj}");
        assert_eq!(mb["netns"].as_u64(), Some(p.proxy_netns), "{obj}");
        assert_eq!(mb["leg"], leg, "{obj}");
        assert_eq!(mb["other_leg_ended"], "by_proxy", "{obj}");
    }
    // The sockets of the far ends are still attributed to their own processes.
    check(
        &v[0],
        &Expect {
            role: Some("client"),
            netns: Some(p.ns[0]),
            pid: PidCheck::Exact(p.client.pid()),
            tcp_initiator: Some("remote"),
            ..Expect::default()
        },
    );
    check(
        &v[3],
        &Expect {
            role: Some("server"),
            netns: Some(p.ns[2]),
            tcp_initiator: Some("remote"),
            ..Expect::default()
        },
    );
    // The client's verdict names haproxy's other leg: the joined endpoints.
    assert_eq!(
        v[0]["verdict"]["middlebox"]["other_leg"],
        format!("{} -> {}", p.upstream_addr, p.server_addr)
    );
    let n = calibrated(
        &agent,
        &p.ns,
        Truth {
            closed_by: "middlebox",
            middlebox_pid: Some(hp),
        },
    );
    assert!(n >= 4, "{n} high verdicts checked");
    ok(agent.stop().map(drop), "stop agent");
}

/// The server closes; haproxy only passes the FIN on. The decider stays the server, on
/// every socket, and the client's verdict names the relay.
#[test]
fn haproxy_passes_on_the_server_close() {
    if !prelude("haproxy_passes_on_the_server_close") {
        return;
    }
    if let Some(why) = haproxy_missing() {
        panic!("haproxy_passes_on_the_server_close: {why}");
    }
    let t = ok(Topology::new(), "topology");
    let mut agent = ok(Agent::start(&ok(t.inodes(), "inodes")), "agent");
    let mut p = Proxied::open(&t);
    ok(p.server.close(), "server close");
    ok(p.client.wait_eof(), "client sees the FIN haproxy passed on");
    ok(p.client.close(), "client close");
    let v = p.verdicts(&mut agent);
    for obj in &v {
        check(
            obj,
            &Expect {
                closed_by: Some("server"),
                reason: Some("server_close"),
                confidence: Some("high"),
                ..Expect::default()
            },
        );
        assert!(obj["verdict"]["middlebox"].is_null(), "{obj}");
    }
    let hint = v[0]["verdict"]["hint"].as_str().unwrap_or("");
    assert!(
        hint.contains(&format!(
            "passed on by the proxy haproxy({})",
            p.haproxy.pid()
        )),
        "{hint}"
    );
    calibrated(
        &agent,
        &p.ns,
        Truth {
            closed_by: "server",
            middlebox_pid: None,
        },
    );
    ok(agent.stop().map(drop), "stop agent");
}

/// Only the client's namespace selected (`--netns` filters what is printed, the kernel
/// side still sees the host): the client's socket alone is printed, naming haproxy.
#[test]
fn haproxy_idle_timeout_client_namespace_only() {
    if !prelude("haproxy_idle_timeout_client_namespace_only") {
        return;
    }
    if let Some(why) = haproxy_missing() {
        panic!("haproxy_idle_timeout_client_namespace_only: {why}");
    }
    let t = ok(Topology::new(), "topology");
    let client_ns = ok(t.client_inode(), "client inode");
    let mut agent = ok(Agent::start(&[client_ns]), "agent");
    let mut p = Proxied::open(&t);
    ok(p.client.wait_eof(), "client sees haproxy's FIN");
    ok(p.client.close(), "client close");
    let c = ok(
        agent.wait_for_close(
            &p.client_addr,
            &p.proxy_addr,
            Some(client_ns),
            VERDICT_TIMEOUT,
        ),
        "client close object",
    );
    check(
        &c,
        &Expect {
            closed_by: Some("middlebox"),
            reason: Some("proxy_close"),
            confidence: Some("high"),
            ..Expect::default()
        },
    );
    assert_eq!(c["verdict"]["middlebox"]["comm"], "haproxy");
    ok(p.server.close(), "server close");
    let exit = ok(agent.stop(), "stop agent");
    let others: Vec<&Value> = exit
        .objects
        .iter()
        .filter(|o| o["type"] == "close" && o["conn"]["netns"].as_u64() != Some(client_ns))
        .collect();
    assert!(
        others.is_empty(),
        "--netns printed other namespaces: {others:?}"
    );
}

/// The router drops everything; the client's kernel gives up (tcp_retries2=3). The path
/// heals, the server writes, the client host answers with RST. Both sockets: the path.
#[test]
fn blackhole_then_late_rst() {
    if prelude("blackhole_then_late_rst") {
        blackhole_case(false);
    }
}

/// The same seen from the client's namespace only: the server's socket is on "another
/// node", so path or dead host cannot be told apart: `retransmission_timeout`, `low`.
#[test]
fn blackhole_client_namespace_only() {
    if prelude("blackhole_client_namespace_only") {
        blackhole_case(true);
    }
}

fn blackhole_case(single: bool) {
    let t = ok(Topology::new(), "topology");
    ok(
        t.sysctl(&t.client, "net.ipv4.tcp_retries2", "3"),
        "tcp_retries2=3",
    );
    let ns = ok(t.inodes(), "inodes");
    let mut agent = start_agent(&ns, single);
    let addr = t.server_addr(false, SERVER_PORT);
    let mut server = ok(Peer::listen(Path::new(WC_PEER), &t.server, addr), "server");
    let mut client = ok(Peer::connect(Path::new(WC_PEER), &t.client, addr), "client");
    ok(
        server.wait_accepted(Duration::from_secs(10)).map(drop),
        "accept",
    );
    ok(client.send(10), "client send");
    ok(server.read(10), "server read");
    ok(
        t.router_iptables(&["-I", "FORWARD", "-j", "DROP"]),
        "DROP in the router",
    );
    ok(client.send(10), "client send into the blackhole");
    ok(
        client
            .expect_error("read 1", "timed out", Duration::from_secs(60))
            .map(drop),
        "client gets ETIMEDOUT",
    );
    ok(client.close(), "client close");
    ok(
        t.router_iptables(&["-D", "FORWARD", "-j", "DROP"]),
        "the path heals",
    );
    ok(
        server.send(10),
        "server writes to a socket the client no longer has",
    );
    ok(
        server
            .expect_error("read 1", "reset", Duration::from_secs(10))
            .map(drop),
        "server gets the client host's RST",
    );
    ok(server.close(), "server close");
    let client_addr = client.local.to_string();
    let c = ok(
        agent.wait_for_close(
            &client_addr,
            &addr.to_string(),
            Some(ns[0]),
            VERDICT_TIMEOUT,
        ),
        "client close object",
    );
    if single {
        check(
            &c,
            &Expect {
                closed_by: Some("middlebox"),
                reason: Some("retransmission_timeout"),
                tcp_initiator: Some("local"),
                confidence: Some("low"),
                ..Expect::default()
            },
        );
        assert!(c["peer"].is_null(), "{c}");
        calibrated(
            &agent,
            &ns,
            Truth {
                closed_by: "middlebox",
                middlebox_pid: None,
            },
        );
        ok(agent.stop().map(drop), "stop agent");
        return;
    }
    let s = ok(
        agent.wait_for_close(
            &addr.to_string(),
            &client_addr,
            Some(ns[2]),
            VERDICT_TIMEOUT,
        ),
        "server close object",
    );
    for (obj, init) in [(&c, "local"), (&s, "remote")] {
        check(
            obj,
            &Expect {
                closed_by: Some("middlebox"),
                reason: Some("path_blackhole"),
                tcp_initiator: Some(init),
                mechanism: Some("timeout"),
                confidence: Some("high"),
                ..Expect::default()
            },
        );
        assert_eq!(obj["verdict"]["middlebox"]["kind"], "path", "{obj}");
        assert_eq!(
            obj["verdict"]["middlebox"]["detected_by"], "client",
            "{obj}"
        );
        assert!(
            obj["verdict"]["middlebox"]["after_ms"]
                .as_u64()
                .unwrap_or(0)
                > 0,
            "{obj}"
        );
    }
    // The RST stays in the server's evidence, from the client host's kernel.
    let rst = s["evidence"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["what"] == "rst_received")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(rst["origin"], "peer_kernel", "{s}");
    calibrated(
        &agent,
        &ns,
        Truth {
            closed_by: "middlebox",
            middlebox_pid: None,
        },
    );
    ok(agent.stop().map(drop), "stop agent");
}

/// A Service-VIP-like DNAT in the router (10.241.1.1:80 -> server:8080) whose conntrack
/// entry expires while the connection idles; with `nf_conntrack_tcp_loose=0` the client's
/// next segment is no longer translated, reaches the router itself and draws its RST. The
/// client socket is joined to the server socket behind the VIP by sequence numbers, so the
/// RST is proven not to be the server's: `middlebox_reset`, kind `nat`.
#[test]
fn dnat_vip_conntrack_expiry_reset() {
    if prelude("dnat_vip_conntrack_expiry_reset") {
        dnat_case(false);
    }
}

/// The same seen from the client's namespace only: no peer to join, the router's RST is
/// told from the server's segments by its TTL alone: `middlebox_reset`, `medium`.
#[test]
fn dnat_vip_client_namespace_only() {
    if prelude("dnat_vip_client_namespace_only") {
        dnat_case(true);
    }
}

fn dnat_case(single: bool) {
    let t = ok(Topology::new(), "topology");
    let vip = SocketAddr::new(t.plan.router_client_v4.into(), 80);
    let server_addr = t.server_addr(false, SERVER_PORT);
    ok(
        t.router_iptables(&[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            &vip.ip().to_string(),
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            &server_addr.to_string(),
        ]),
        "DNAT rule",
    );
    ok(
        t.sysctl(&t.router, "net.netfilter.nf_conntrack_tcp_loose", "0"),
        "no mid-stream pickup",
    );
    ok(
        t.sysctl(
            &t.router,
            "net.netfilter.nf_conntrack_tcp_timeout_established",
            "2",
        ),
        "short established timeout",
    );
    let ns = ok(t.inodes(), "inodes");
    let mut agent = start_agent(&ns, single);
    let mut server = ok(
        Peer::listen(Path::new(WC_PEER), &t.server, server_addr),
        "server",
    );
    let mut client = ok(Peer::connect(Path::new(WC_PEER), &t.client, vip), "client");
    ok(
        server.wait_accepted(Duration::from_secs(10)).map(drop),
        "accept",
    );
    ok(client.send(10), "client send");
    ok(server.read(10), "server read");
    // Idle past the conntrack timeout.
    std::thread::sleep(Duration::from_secs(4));
    ok(client.send(10), "client sends after the entry expired");
    ok(
        client
            .expect_error("read 1", "reset", Duration::from_secs(10))
            .map(drop),
        "client gets the router's RST",
    );
    ok(client.close(), "client close");
    let client_addr = client.local.to_string();
    let c = ok(
        agent.wait_for_close(&client_addr, &vip.to_string(), Some(ns[0]), VERDICT_TIMEOUT),
        "client close object",
    );
    if single {
        check(
            &c,
            &Expect {
                closed_by: Some("middlebox"),
                reason: Some("middlebox_reset"),
                tcp_initiator: Some("remote"),
                confidence: Some("medium"),
                ..Expect::default()
            },
        );
        assert!(c["peer"].is_null(), "{c}");
        ok(server.close(), "server close");
        calibrated(
            &agent,
            &ns,
            Truth {
                closed_by: "middlebox",
                middlebox_pid: None,
            },
        );
        ok(agent.stop().map(drop), "stop agent");
        return;
    }
    check(
        &c,
        &Expect {
            closed_by: Some("middlebox"),
            reason: Some("middlebox_reset"),
            tcp_initiator: Some("remote"),
            mechanism: Some("rst"),
            confidence: Some("high"),
            ..Expect::default()
        },
    );
    assert_eq!(c["verdict"]["middlebox"]["kind"], "nat", "{c}");
    // Joined to the server socket behind the VIP.
    assert_eq!(c["peer"]["netns"].as_u64(), Some(ns[2]), "{c}");
    ok(server.close(), "server close");
    let s = ok(
        agent.wait_for_close(
            &server_addr.to_string(),
            &client_addr,
            Some(ns[2]),
            VERDICT_TIMEOUT,
        ),
        "server close object",
    );
    assert_eq!(s["conn"]["id"], c["peer"]["id"], "{s}\n{c}");
    calibrated(
        &agent,
        &[ns[0]],
        Truth {
            closed_by: "middlebox",
            middlebox_pid: None,
        },
    );
    calibrated(
        &agent,
        &[ns[2]],
        Truth {
            closed_by: "server",
            middlebox_pid: None,
        },
    );
    ok(agent.stop().map(drop), "stop agent");
}

/// nginx (`http2`, `grpc_pass`) in the router between a grpcio client and server. After one
/// call nginx closes its upstream connection (no upstream keepalive configured) and, when
/// its `keepalive_timeout` fires, sends GOAWAY to the client and closes. Both of the
/// client's leg sockets are `proxy_goaway` naming nginx (high: nginx's own GOAWAY, its other
/// leg seen); the upstream leg is nginx's own close (`proxy_close`, high or medium: when it
/// is judged the client leg may still be open and unseen as nginx's).
#[test]
fn nginx_grpc_keepalive_timeout_goaway() {
    if prelude("nginx_grpc_keepalive_timeout_goaway") {
        nginx_case("nginx_grpc_keepalive_timeout_goaway", false);
    }
}

/// The same seen from the client's namespace only: a GOAWAY NO_ERROR without debug text
/// after 2 s with no open stream, from a peer that cannot be told from a proxy: the cause
/// is inferred (`server_idle_timeout`), `medium`, and the hint says "inferred".
#[test]
fn nginx_grpc_keepalive_timeout_client_namespace_only() {
    if prelude("nginx_grpc_keepalive_timeout_client_namespace_only") {
        nginx_case("nginx_grpc_keepalive_timeout_client_namespace_only", true);
    }
}

fn nginx_case(test: &str, single: bool) {
    use tests::h2peers::grpc_missing;
    use tests::middlebox::{Nginx, nginx_missing};
    use tests::{GrpcClient, GrpcServer};
    if let Some(why) = nginx_missing().or_else(grpc_missing) {
        panic!("{test}: {why}");
    }
    let t = ok(Topology::new(), "topology");
    let ns = ok(t.inodes(), "inodes");
    let mut agent = start_agent(&ns, single);
    let backend = t.server_addr(false, 50051);
    let bind = SocketAddr::new(t.plan.router_client_v4.into(), PROXY_PORT);
    let mut server = ok(
        GrpcServer::spawn::<&str, i64>(&t.server, backend, &[]),
        "grpc server",
    );
    let nginx = ok(
        Nginx::start(&t.router, bind, backend, Duration::from_millis(2000)),
        "nginx",
    );
    let mut client = ok(
        GrpcClient::spawn::<&str, i64>(&t.client, bind, &[]),
        "grpc client",
    );
    let upstream = ok(client.call(1), "one call through nginx");
    ok(
        client.wait_down(Duration::from_secs(15)).map(drop),
        "nginx's keepalive timeout ends the client's connection",
    );
    let bind_s = bind.to_string();
    let pred = |netns: u64, remote: String| {
        move |v: &Value| v["conn"]["netns"].as_u64() == Some(netns) && v["conn"]["remote"] == remote
    };
    let c = ok(
        agent.wait_for(
            "client socket",
            VERDICT_TIMEOUT,
            pred(ns[0], bind_s.clone()),
        ),
        "client close object",
    );
    if single {
        check(
            &c,
            &Expect {
                closed_by: Some("server"),
                reason: Some("server_idle_timeout"),
                mechanism: Some("goaway_then_fin"),
                confidence: Some("medium"),
                ..Expect::default()
            },
        );
        let hint = c["verdict"]["hint"].as_str().unwrap_or("");
        assert!(hint.starts_with("inferred"), "{hint}");
        calibrated(
            &agent,
            &ns,
            Truth {
                closed_by: "middlebox",
                middlebox_pid: Some(nginx.pid()),
            },
        );
        ok(server.exit(), "server exit");
        ok(client.exit(), "client exit");
        ok(agent.stop().map(drop), "stop agent");
        return;
    }
    let client_addr = c["conn"]["local"].as_str().unwrap_or("").to_string();
    let d = ok(
        agent.wait_for_close(&bind_s, &client_addr, Some(ns[1]), VERDICT_TIMEOUT),
        "nginx downstream close object",
    );
    let u = ok(
        agent.wait_for_close(
            &upstream,
            &backend.to_string(),
            Some(ns[1]),
            VERDICT_TIMEOUT,
        ),
        "nginx upstream close object",
    );
    let s = ok(
        agent.wait_for_close(
            &backend.to_string(),
            &upstream,
            Some(ns[2]),
            VERDICT_TIMEOUT,
        ),
        "server close object",
    );
    let np = u64::from(nginx.pid());
    for (obj, leg) in [(&c, "downstream"), (&d, "downstream")] {
        check(
            obj,
            &Expect {
                closed_by: Some("middlebox"),
                reason: Some("proxy_goaway"),
                confidence: Some("high"),
                ..Expect::default()
            },
        );
        let mb = &obj["verdict"]["middlebox"];
        assert_eq!(
            (mb["pid"].as_u64(), &mb["leg"]),
            (Some(np), &Value::from(leg)),
            "{obj}"
        );
        assert_eq!(mb["action"], "goaway", "{obj}");
    }
    for obj in [&u, &s] {
        check(
            obj,
            &Expect {
                closed_by: Some("middlebox"),
                reason: Some("proxy_close"),
                ..Expect::default()
            },
        );
        let mb = &obj["verdict"]["middlebox"];
        assert_eq!(
            (mb["pid"].as_u64(), &mb["leg"]),
            (Some(np), &Value::from("upstream")),
            "{obj}"
        );
    }
    calibrated(
        &agent,
        &ns,
        Truth {
            closed_by: "middlebox",
            middlebox_pid: Some(nginx.pid()),
        },
    );
    ok(server.exit(), "server exit");
    ok(client.exit(), "client exit");
    ok(agent.stop().map(drop), "stop agent");
}

/// haproxy on a node this agent does not see (only the client's and the server's
/// namespaces are visible): neither end can be joined to the other, each sees only its TCP
/// peer's FIN. The verdicts name that peer but must not claim `high` (truth: the proxy).
#[test]
fn haproxy_on_an_unseen_node() {
    if !prelude("haproxy_on_an_unseen_node") {
        return;
    }
    if let Some(why) = haproxy_missing() {
        panic!("haproxy_on_an_unseen_node: {why}");
    }
    let t = ok(Topology::new(), "topology");
    let ns = ok(t.inodes(), "inodes");
    let mut args = tests::default_trace_args(&[ns[0], ns[2]]);
    for n in [ns[0], ns[2]] {
        args.push("--visible-netns".into());
        args.push(n.to_string());
    }
    let mut agent = ok(
        Agent::spawn(&agent_bin(), &args, tests::READY_TIMEOUT),
        "agent (client and server namespaces only)",
    );
    let mut p = Proxied::open(&t);
    ok(p.client.wait_eof(), "client sees haproxy's FIN");
    ok(p.server.wait_eof(), "server sees haproxy's FIN");
    ok(p.client.close(), "client close");
    ok(p.server.close(), "server close");
    let c = ok(
        agent.wait_for_close(&p.client_addr, &p.proxy_addr, Some(ns[0]), VERDICT_TIMEOUT),
        "client close object",
    );
    let s = ok(
        agent.wait_for_close(
            &p.server_addr,
            &p.upstream_addr,
            Some(ns[2]),
            VERDICT_TIMEOUT,
        ),
        "server close object",
    );
    for (obj, by, reason) in [
        (&c, "server", "server_close"),
        (&s, "client", "client_close"),
    ] {
        check(
            obj,
            &Expect {
                closed_by: Some(by),
                reason: Some(reason),
                tcp_initiator: Some("remote"),
                confidence: Some("medium"),
                ..Expect::default()
            },
        );
        assert!(obj["peer"].is_null(), "{obj}");
    }
    let n = calibrated(
        &agent,
        &ns,
        Truth {
            closed_by: "middlebox",
            middlebox_pid: None,
        },
    );
    assert_eq!(n, 0, "no high verdict from one side of an unseen proxy");
    ok(agent.stop().map(drop), "stop agent");
}

/// TLS (openssl s_server / s_client): the client sends a line and closes (truth: the
/// client decided). The payload is opaque, so the first FIN alone must not give `high`:
/// the server's FIN may win the race after the client's close_notify, exactly the case
/// where FIN order would blame the wrong side.
#[test]
fn tls_client_close_is_not_high_from_fin_order() {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    use tests::middlebox::{self_signed_cert, wait_listening};
    if !prelude("tls_client_close_is_not_high_from_fin_order") {
        return;
    }
    let t = ok(Topology::new(), "topology");
    let ns = ok(t.inodes(), "inodes");
    let dir = std::env::temp_dir().join(format!("wc-tls-{}", std::process::id()));
    let (cert, key) = ok(self_signed_cert(&dir), "self-signed certificate");
    let addr = t.server_addr(false, 8443);
    let mut agent = ok(Agent::start(&ns), "agent");
    let mut server = Command::new("ip")
        .args([
            "netns", "exec", &t.server, "openssl", "s_server", "-quiet", "-naccept", "1",
        ])
        .arg("-accept")
        .arg(addr.to_string())
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn openssl s_server");
    ok(wait_listening(&t.server, addr), "s_server listening");
    let mut client = Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.client,
            "openssl",
            "s_client",
            "-quiet",
            "-no_ign_eof",
        ])
        .arg("-connect")
        .arg(addr.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn openssl s_client");
    if let Some(mut stdin) = client.stdin.take() {
        let _ = stdin.write_all(b"hello\n");
        std::thread::sleep(Duration::from_millis(700));
        // stdin closes here: s_client sends close_notify and closes its socket.
    }
    let _ = client.wait();
    let pred = |netns: u64| {
        move |v: &Value| {
            v["conn"]["netns"].as_u64() == Some(netns) && v["conn"]["remote"] == addr.to_string()
        }
    };
    let c = ok(
        agent.wait_for("client TLS socket", VERDICT_TIMEOUT, pred(ns[0])),
        "client close object",
    );
    let client_addr = c["conn"]["local"].as_str().unwrap_or("").to_string();
    let s = ok(
        agent.wait_for_close(
            &addr.to_string(),
            &client_addr,
            Some(ns[2]),
            VERDICT_TIMEOUT,
        ),
        "server close object",
    );
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    // Which FIN goes first is a race (s_server answers the client's close_notify by
    // closing at once): whichever it is, the verdict names that side's FIN at `medium`,
    // never `high`, and both sockets agree.
    let first = c["verdict"]["closed_by"].as_str().unwrap_or("").to_string();
    assert!(first == "client" || first == "server", "{c}");
    let reason: &'static str = if first == "client" {
        "client_close"
    } else {
        "server_close"
    };
    for obj in [&c, &s] {
        assert_eq!(obj["h2"]["state"], "tls", "{obj}");
        check(
            obj,
            &Expect {
                closed_by: Some(if first == "client" {
                    "client"
                } else {
                    "server"
                }),
                reason: Some(reason),
                mechanism: Some("fin"),
                confidence: Some("medium"),
                ..Expect::default()
            },
        );
    }
    calibrated(
        &agent,
        &ns,
        Truth {
            closed_by: "client",
            middlebox_pid: None,
        },
    );
    ok(agent.stop().map(drop), "stop agent");
}

/// The router REJECTs the client's segment with a forged RST; later the server writes and
/// the client host, which no longer has the socket, answers with RST. The server socket
/// inherits the client's story (`middlebox_reset`), not `client_no_socket`.
#[test]
fn reject_then_late_rst_inherits_the_middlebox_reset() {
    if !prelude("reject_then_late_rst_inherits_the_middlebox_reset") {
        return;
    }
    let t = ok(Topology::new(), "topology");
    let ns = ok(t.inodes(), "inodes");
    let mut agent = ok(Agent::start(&ns), "agent");
    let addr = t.server_addr(false, SERVER_PORT);
    let mut server = ok(Peer::listen(Path::new(WC_PEER), &t.server, addr), "server");
    let mut client = ok(Peer::connect(Path::new(WC_PEER), &t.client, addr), "client");
    ok(
        server.wait_accepted(Duration::from_secs(10)).map(drop),
        "accept",
    );
    let (c_ip, s_ip, port) = (
        t.plan.client_v4.to_string(),
        t.plan.server_v4.to_string(),
        SERVER_PORT.to_string(),
    );
    let rule = [
        "FORWARD",
        "-p",
        "tcp",
        "-s",
        &c_ip,
        "-d",
        &s_ip,
        "--dport",
        &port,
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    ];
    let with = |op: &'static str| -> Vec<String> {
        std::iter::once(op)
            .chain(rule.iter().copied())
            .map(String::from)
            .collect()
    };
    fn strs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let args = |op| with(op);
    ok(
        t.router_iptables(&strs(&args("-I"))),
        "REJECT in the router",
    );
    ok(client.send(10), "client send");
    ok(
        client
            .expect_error("read 1", "reset", Duration::from_secs(10))
            .map(drop),
        "client gets the forged RST",
    );
    ok(client.close(), "client close");
    ok(t.router_iptables(&strs(&args("-D"))), "REJECT removed");
    ok(
        server.send(10),
        "server writes to a socket the client no longer has",
    );
    ok(
        server
            .expect_error("read 1", "reset", Duration::from_secs(10))
            .map(drop),
        "server gets the client host's RST",
    );
    ok(server.close(), "server close");
    let client_addr = client.local.to_string();
    let c = ok(
        agent.wait_for_close(
            &client_addr,
            &addr.to_string(),
            Some(ns[0]),
            VERDICT_TIMEOUT,
        ),
        "client close object",
    );
    let s = ok(
        agent.wait_for_close(
            &addr.to_string(),
            &client_addr,
            Some(ns[2]),
            VERDICT_TIMEOUT,
        ),
        "server close object",
    );
    for obj in [&c, &s] {
        check(
            obj,
            &Expect {
                closed_by: Some("middlebox"),
                reason: Some("middlebox_reset"),
                tcp_initiator: Some("remote"),
                mechanism: Some("rst"),
                confidence: Some("high"),
                ..Expect::default()
            },
        );
    }
    assert_eq!(s["peer"]["id"], c["conn"]["id"], "{s}");
    calibrated(
        &agent,
        &ns,
        Truth {
            closed_by: "middlebox",
            middlebox_pid: None,
        },
    );
    ok(agent.stop().map(drop), "stop agent");
}

/// kube-proxy style DNAT in the client's own OUTPUT chain (a host-network client reaching a
/// Service VIP): the client socket (to the VIP) and the server socket (from the client's
/// real address) are joined by sequence numbers, so the server's close is proven.
#[test]
fn output_chain_dnat_joins_both_ends() {
    if !prelude("output_chain_dnat_joins_both_ends") {
        return;
    }
    let t = ok(Topology::new(), "topology");
    let ns = ok(t.inodes(), "inodes");
    let vip: SocketAddr = "10.96.0.10:80".parse().expect("literal");
    let server_addr = t.server_addr(false, SERVER_PORT);
    ok(
        t.exec(
            &t.client,
            &[
                "iptables",
                "-w",
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-d",
                &vip.ip().to_string(),
                "-p",
                "tcp",
                "--dport",
                "80",
                "-j",
                "DNAT",
                "--to-destination",
                &server_addr.to_string(),
            ],
        ),
        "DNAT in the client's OUTPUT chain",
    );
    let mut agent = ok(Agent::start(&ns), "agent");
    let mut server = ok(
        Peer::listen(Path::new(WC_PEER), &t.server, server_addr),
        "server",
    );
    let mut client = ok(Peer::connect(Path::new(WC_PEER), &t.client, vip), "client");
    ok(
        server.wait_accepted(Duration::from_secs(10)).map(drop),
        "accept",
    );
    ok(client.send(10), "client send");
    ok(server.read(10), "server read");
    ok(server.close(), "server close");
    ok(client.wait_eof(), "client sees the FIN");
    ok(client.close(), "client close");
    let client_addr = client.local.to_string();
    let c = ok(
        agent.wait_for_close(&client_addr, &vip.to_string(), Some(ns[0]), VERDICT_TIMEOUT),
        "client close object",
    );
    let s = ok(
        agent.wait_for_close(
            &server_addr.to_string(),
            &client_addr,
            Some(ns[2]),
            VERDICT_TIMEOUT,
        ),
        "server close object",
    );
    for obj in [&c, &s] {
        check(
            obj,
            &Expect {
                closed_by: Some("server"),
                reason: Some("server_close"),
                confidence: Some("high"),
                ..Expect::default()
            },
        );
    }
    assert_eq!(c["peer"]["id"], s["conn"]["id"], "{c}");
    assert_eq!(s["peer"]["id"], c["conn"]["id"], "{s}");
    calibrated(
        &agent,
        &ns,
        Truth {
            closed_by: "server",
            middlebox_pid: None,
        },
    );
    ok(agent.stop().map(drop), "stop agent");
}

/// Overload: a 4 KiB ring buffer and a burst of loopback connections that the client
/// aborts (SO_LINGER 0: truth is `client` for every socket). Kernel events are lost; a
/// lost RST segment must not turn into a proven `middlebox_reset`: connections alive while
/// the drop counter rose are lowered, and no `high` verdict contradicts the truth.
#[test]
fn ring_buffer_drops_lower_confidence() {
    if !prelude("ring_buffer_drops_lower_confidence") {
        return;
    }
    const BURST: &str = r#"
import socket, struct, threading
N = 400
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 9100))
srv.listen(1024)
acc = []
def accept():
    for _ in range(N):
        c, _ = srv.accept()
        acc.append(c)
t = threading.Thread(target=accept)
t.start()
cl = []
for _ in range(N):
    s = socket.create_connection(("127.0.0.1", 9100))
    s.sendall(b"x" * 64)
    cl.append(s)
t.join()
for c in acc:
    c.recv(64)
for s in cl:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
for c in acc:
    c.close()
print("done")
"#;
    let t = ok(Topology::new(), "topology");
    let ns = ok(t.client_inode(), "client inode");
    let mut args = tests::default_trace_args(&[ns]);
    args.extend(["--ringbuf-kib".to_string(), "4".to_string()]);
    let mut agent = ok(
        Agent::spawn(&agent_bin(), &args, tests::READY_TIMEOUT),
        "agent with a 4 KiB ring buffer",
    );
    let out = ok(
        t.exec(&t.client, &["python3", "-c", BURST]),
        "loopback burst",
    );
    assert!(out.contains("done"), "{out}");
    std::thread::sleep(Duration::from_secs(2));
    let exit = ok(agent.stop(), "stop agent");
    let drops = exit
        .objects
        .iter()
        .find(|o| o["type"] == "stats")
        .and_then(|o| o["kernel"]["ringbuf_drops"].as_u64())
        .unwrap_or(0);
    assert!(
        drops > 0,
        "the burst did not overflow a 4 KiB ring buffer; nothing tested"
    );
    let lowered = exit
        .objects
        .iter()
        .filter(|o| {
            o["type"] == "close"
                && o["verdict"]["hint"]
                    .as_str()
                    .is_some_and(|h| h.contains("kernel events were lost"))
        })
        .count();
    assert!(lowered > 0, "{drops} events lost but no verdict says so");
    let n = ok(
        check_calibrated(
            &exit.objects,
            &[ns],
            Truth {
                closed_by: "client",
                middlebox_pid: None,
            },
        ),
        "calibration under overload",
    );
    eprintln!("{drops} kernel events lost, {lowered} verdicts lowered, {n} high verdicts checked");
}
