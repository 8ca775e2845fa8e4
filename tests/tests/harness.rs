//! Self-checks of the harness itself, without the whoclosed agent: topology, wc-peer,
//! the failure modes the e2e cases rely on, the Agent plumbing (with a fake agent
//! script) and the close-object checker.

use serde_json::json;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tests::{
    Agent, Expect, Peer, PidCheck, Topology, agent_bin, check_close, check_peer_link, netns_inode,
    should_run,
};

const WC_PEER: &str = env!("CARGO_BIN_EXE_wc-peer");

fn peer_bin() -> &'static Path {
    Path::new(WC_PEER)
}

/// Connects client -> server across the router and exchanges data both ways.
fn connected_pair(t: &Topology, v6: bool, port: u16) -> (Peer, Peer, SocketAddr) {
    let addr = t.server_addr(v6, port);
    let mut server = Peer::listen(peer_bin(), &t.server, addr).expect("start listener");
    let mut client = Peer::connect(peer_bin(), &t.client, addr).expect("connect");
    let seen = server
        .wait_accepted(Duration::from_secs(10))
        .expect("server accepts");
    assert_eq!(
        seen, client.local,
        "no NAT: server sees the client's address"
    );
    assert_eq!(client.local.ip(), t.client_ip(v6));
    client.send(100).expect("client send");
    server.read(100).expect("server read");
    server.send(50).expect("server send");
    client.read(50).expect("client read");
    (client, server, addr)
}

#[test]
fn topology_selfcheck() {
    if !should_run("topology_selfcheck") {
        return;
    }
    let t = Topology::new().expect("topology");
    let inodes = t.inodes().expect("inodes");
    assert_eq!(inodes.len(), 3);
    assert!(inodes[0] != inodes[1] && inodes[1] != inodes[2] && inodes[0] != inodes[2]);
    assert_ne!(
        inodes[0],
        std::fs::metadata("/proc/self/ns/net")
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .expect("own netns")
    );
    for v6 in [false, true] {
        let (mut client, mut server, addr) = connected_pair(&t, v6, 8080);
        if v6 {
            assert!(
                client.local.to_string().starts_with('['),
                "{}",
                client.local
            );
            assert!(addr.to_string().starts_with("[fd00:241:2::2]:"), "{addr}");
        }
        // Each peer reports its own pid, distinct from ours.
        assert_ne!(client.pid(), server.pid());
        assert_ne!(client.pid(), std::process::id());
        let comm =
            std::fs::read_to_string(format!("/proc/{}/comm", client.pid())).expect("client comm");
        assert_eq!(comm.trim(), "wc-peer", "ip netns exec must exec, not fork");
        // Client closes first: server sees EOF, then closes.
        client.close().expect("client close");
        server.wait_eof().expect("server sees eof");
        server.close().expect("server close");
        client.exit().expect("client exit");
        server.exit().expect("server exit");
        // Server closes first.
        let (mut client, mut server, _) = connected_pair(&t, v6, 8081);
        server.close().expect("server close");
        client.wait_eof().expect("client sees eof");
        client.close().expect("client close");
        // Socket errors are reported, not fatal.
        let line = client
            .request("send 1", Duration::from_secs(5))
            .expect("send");
        assert!(line.starts_with("error "), "{line}");
        client.exit().expect("client still alive");
    }
}

#[test]
fn selfcheck_kill9_with_unread_data_resets_client() {
    if !should_run("selfcheck_kill9") {
        return;
    }
    let t = Topology::new().expect("topology");
    for v6 in [false, true] {
        let (mut client, mut server, _) = connected_pair(&t, v6, 8080);
        client.send(1000).expect("client send");
        server.wait_recvq(1000).expect("bytes queued at the server");
        server.kill9().expect("kill -9 server");
        let line = client
            .expect_error("read 1", "reset", Duration::from_secs(10))
            .expect("client sees reset");
        assert!(line.contains("os error 104"), "{line}");
        client.close().expect("client close");
    }
}

#[test]
fn selfcheck_router_reject_resets_client() {
    if !should_run("selfcheck_router_reject") {
        return;
    }
    let t = Topology::new().expect("topology");
    let (mut client, mut server, addr) = connected_pair(&t, false, 8080);
    let (c, s, p) = (
        t.plan.client_v4.to_string(),
        t.plan.server_v4.to_string(),
        addr.port().to_string(),
    );
    let rule = [
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
    ];
    let mut ins = vec!["-I", "FORWARD"];
    ins.extend_from_slice(&rule);
    t.router_iptables(&ins).expect("insert REJECT");
    client.send(10).expect("send is buffered");
    client
        .expect_error("read 1", "reset", Duration::from_secs(10))
        .expect("client sees reset");
    // The server never heard of it: its socket is still open and has no data.
    let q = server
        .request("recvq", Duration::from_secs(5))
        .expect("recvq");
    assert_eq!(q, "recvq 0");
    let mut del = vec!["-D", "FORWARD"];
    del.extend_from_slice(&rule);
    t.router_iptables(&del).expect("delete REJECT");
}

#[test]
fn selfcheck_blackhole_times_out() {
    if !should_run("selfcheck_blackhole") {
        return;
    }
    let t = Topology::new().expect("topology");
    t.sysctl(&t.client, "net.ipv4.tcp_retries2", "3")
        .expect("retries2");
    let (mut client, _server, _) = connected_pair(&t, false, 8080);
    t.router_iptables(&["-I", "FORWARD", "-j", "DROP"])
        .expect("blackhole");
    client.send(10).expect("send is buffered");
    let started = std::time::Instant::now();
    let line = client
        .expect_error("read 1", "timed out", Duration::from_secs(60))
        .expect("client times out");
    assert!(line.contains("os error 110"), "{line}");
    eprintln!("blackhole: ETIMEDOUT after {:?}", started.elapsed());
}

#[test]
fn selfcheck_identical_topologies_coexist() {
    if !should_run("selfcheck_identical_topologies") {
        return;
    }
    let a = Topology::new().expect("topology A");
    let b = Topology::with_plan(a.plan.clone()).expect("topology B");
    assert_ne!(a.prefix, b.prefix);
    let ia = a.inodes().expect("inodes A");
    let ib = b.inodes().expect("inodes B");
    assert!(ia.iter().all(|i| !ib.contains(i)), "{ia:?} vs {ib:?}");
    // Same listen address and port in both, connections open at the same time.
    let (mut ca, mut sa, addr_a) = connected_pair(&a, false, 8080);
    let (mut cb, mut sb, addr_b) = connected_pair(&b, false, 8080);
    assert_eq!(addr_a, addr_b);
    assert_eq!(ca.local.ip(), cb.local.ip());
    ca.close().expect("A client close");
    sb.close().expect("B server close");
    sa.wait_eof().expect("A server eof");
    cb.wait_eof().expect("B client eof");
    sa.close().expect("A server close");
    cb.close().expect("B client close");
}

#[test]
fn selfcheck_cleanup_on_panic() {
    if !should_run("selfcheck_cleanup_on_panic") {
        return;
    }
    let names = std::sync::Mutex::new(Vec::new());
    let r = std::panic::catch_unwind(|| {
        let t = Topology::new().expect("topology");
        names
            .lock()
            .expect("lock")
            .extend([t.client.clone(), t.router.clone(), t.server.clone()]);
        assert!(netns_inode(&t.router).is_ok());
        panic!("deliberate");
    });
    assert!(r.is_err());
    let names = names.into_inner().expect("names");
    assert_eq!(names.len(), 3);
    for n in names {
        assert!(
            !Path::new(&format!("/run/netns/{n}")).exists(),
            "{n} leaked"
        );
    }
}

// ---- Agent plumbing, with a shell script standing in for whoclosed (no root needed).

fn fake_agent(name: &str, script: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("wc-fake-{}-{name}.sh", std::process::id()));
    std::fs::write(&p, script).expect("write fake agent");
    p
}

#[test]
fn agent_plumbing_with_fake_agent() {
    let script = fake_agent(
        "ok",
        r#"
echo "fake starting, args: $*" >&2
# The handler first: a stop may come as soon as `ready` is out.
trap 'echo "{\"v\":1,\"type\":\"close\",\"conn\":{\"local\":\"10.0.0.1:6\",\"remote\":\"10.0.0.2:80\"}}"; echo "{\"v\":1,\"type\":\"stats\"}"; exit 0' INT
echo 'not json before ready is tolerated until stop'
echo '{"v":1,"type":"ready","probe_mode":"fake"}'
echo '{"v":1,"type":"close","conn":{"local":"10.0.0.1:5","remote":"10.0.0.2:80","netns":7}}'
echo '{"v":1,"type":"mystery"}'
while :; do sleep 0.05; done
"#,
    );
    let mut args = vec![script.display().to_string()];
    args.extend(tests::default_trace_args(&[11, 22]));
    let mut agent =
        Agent::spawn(Path::new("/bin/sh"), &args, Duration::from_secs(10)).expect("fake ready");
    assert_eq!(agent.ready()["probe_mode"], "fake");
    let c = agent
        .wait_for_close("10.0.0.1:5", "10.0.0.2:80", Some(7), Duration::from_secs(5))
        .expect("close line");
    assert_eq!(c["conn"]["netns"], 7);
    let err = agent
        .wait_for_close(
            "10.0.0.1:9",
            "10.0.0.2:80",
            None,
            Duration::from_millis(300),
        )
        .expect_err("nothing matches");
    let msg = format!("{err:#}");
    assert!(msg.contains("timed out"), "{msg}");
    assert!(
        msg.contains("--linger-ms 300 --netns 11 --netns 22"),
        "{msg}"
    );
    assert!(msg.contains("fake starting"), "stderr in message: {msg}");
    assert!(msg.contains("10.0.0.1:5"), "objects in message: {msg}");
    // The non-JSON line makes stop() fail, but the flushed objects are still collected.
    let err = agent.stop().expect_err("non-JSON line is reported");
    assert!(format!("{err:#}").contains("non-JSON"), "{err:#}");
    assert!(
        agent
            .objects()
            .iter()
            .any(|o| o["conn"]["local"] == "10.0.0.1:6")
    );
    assert!(agent.objects().iter().any(|o| o["type"] == "stats"));
    let _ = std::fs::remove_file(script);
}

#[test]
fn agent_stop_clean_exit() {
    let script = fake_agent(
        "clean",
        r#"
# The handler first: a stop may come as soon as `ready` is out.
trap 'exit 0' INT TERM
echo '{"v":1,"type":"ready","probe_mode":"fake"}'
while :; do sleep 0.05; done
"#,
    );
    let mut agent = Agent::spawn(
        Path::new("/bin/sh"),
        &[script.display().to_string()],
        Duration::from_secs(10),
    )
    .expect("ready");
    let exit = agent.stop().expect("clean stop");
    assert!(exit.status.success());
    assert_eq!(exit.objects.len(), 1);
    let _ = std::fs::remove_file(script);
}

#[test]
fn agent_failures_are_explained() {
    let dies = fake_agent("dies", "echo 'cannot attach probes: EPERM' >&2; exit 3\n");
    let err = Agent::spawn(
        Path::new("/bin/sh"),
        &[dies.display().to_string()],
        Duration::from_secs(10),
    )
    .err()
    .expect("early exit is an error");
    let msg = format!("{err:#}");
    assert!(msg.contains("cannot attach probes"), "{msg}");
    assert!(msg.contains("ready"), "{msg}");

    let silent = fake_agent("silent", "echo waiting >&2; sleep 30\n");
    let err = Agent::spawn(
        Path::new("/bin/sh"),
        &[silent.display().to_string()],
        Duration::from_millis(500),
    )
    .err()
    .expect("no ready line is an error");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("timed out") && msg.contains("waiting"),
        "{msg}"
    );

    let err = Agent::spawn(
        Path::new("/nonexistent/whoclosed"),
        &[],
        Duration::from_secs(1),
    )
    .err()
    .expect("missing binary");
    assert!(format!("{err:#}").contains("cargo build"), "{err:#}");
    let _ = std::fs::remove_file(dies);
    let _ = std::fs::remove_file(silent);
}

#[test]
fn agent_bin_location() {
    let p = agent_bin();
    match std::env::var_os("WHOCLOSED_BIN") {
        Some(b) => assert_eq!(p, Path::new(&b)),
        None => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("ws");
            assert_eq!(p, root.join("target/debug/whoclosed"));
        }
    }
}

// ---- The close-object checker.

#[test]
fn checker_accepts_and_rejects() {
    let obj = json!({"v":1,"type":"close","ts":"2026-11-23T18:55:00.123456Z",
        "conn":{"id":"a","family":"ipv4","local":"10.0.0.1:5","remote":"10.0.0.2:80",
                "role":"client","preexisting":false,"pid":42,"comm":"wc-peer","netns":7},
        "verdict":{"closed_by":"client","reason":"client_close","tcp_initiator":"local",
                   "mechanism":"fin","confidence":"high","hint":""},
        "evidence":[],"stats":{},"peer":{"id":"b"}});
    let good = Expect {
        family: Some("ipv4"),
        local: Some("10.0.0.1:5".into()),
        remote: Some("10.0.0.2:80".into()),
        role: Some("client"),
        preexisting: Some(false),
        netns: Some(7),
        pid: PidCheck::Exact(42),
        closed_by: Some("client"),
        reason: Some("client_close"),
        tcp_initiator: Some("local"),
        mechanism: Some("fin"),
        confidence: Some("high"),
    };
    check_close(&obj, &good).expect("matches");
    check_close(
        &obj,
        &Expect {
            pid: PidCheck::IfPresent(42),
            ..good.clone()
        },
    )
    .expect("if-present matches");
    let bad = Expect {
        netns: Some(8),
        pid: PidCheck::Exact(43),
        reason: Some("server_close"),
        ..good.clone()
    };
    let msg = format!("{:#}", check_close(&obj, &bad).expect_err("mismatch"));
    for want in ["/conn/netns", "/conn/pid", "/verdict/reason"] {
        assert!(msg.contains(want), "{msg}");
    }
    let mut nullpid = obj.clone();
    nullpid["conn"]["pid"] = serde_json::Value::Null;
    check_close(
        &nullpid,
        &Expect {
            pid: PidCheck::IfPresent(42),
            ..good.clone()
        },
    )
    .expect("null pid allowed by IfPresent");
    check_close(&nullpid, &good).expect_err("null pid rejected by Exact");

    let other = json!({"conn":{"id":"b"},"peer":{"id":"a"}});
    check_peer_link(&obj, &other).expect("linked");
    let wrong = json!({"conn":{"id":"c"},"peer":null});
    check_peer_link(&obj, &wrong).expect_err("peer.id names someone else");
}
