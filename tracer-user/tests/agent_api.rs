//! A real `whoclosed agent` (root: it loads eBPF) on a temporary socket, real loopback
//! connections (one from a process placed in a cgroup named as the kubelet names a pod's),
//! and the CLI verbs against it: `closes` (JSON and table), `conns`, `explain`, `stats`, their
//! exit codes; every JSON line validated against docs/schema; a real Prometheus scraping
//! `--metrics-addr`; SIGTERM; and `replay` of the `--record` file reproducing the verdicts.
//!
//! Skips with a reason when not root, unless `WHOCLOSED_E2E=require`.
// Test code: a failed expectation is meant to stop the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

mod support;
use support::{Prometheus, WhoclosedProc, cgroup2_mount, one_pod, spawn_connector};

const UID: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
const CID: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";
const BIN: &str = env!("CARGO_BIN_EXE_whoclosed");

fn require() -> bool {
    std::env::var("WHOCLOSED_E2E").as_deref() == Ok("require")
}

fn cli(sock: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--agent")
        .arg(sock)
        .output()
        .expect("run the whoclosed CLI")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json_lines(o: &Output) -> Vec<Value> {
    text(o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn abort(c: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a pointer to a linger struct of the given size.
    let rc = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER");
    drop(c);
}

/// Whether the test can run: root (it loads eBPF); else skipped, unless required.
fn root_or_skip() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(!require(), "the agent test needs root");
    eprintln!("SKIP agent_api: needs root to load eBPF");
    false
}

/// A fresh directory for one test, named after the test and this process.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

/// Moves `child` into the pod's container cgroup `leaf` (killed with `cleanup`), then tells
/// it to go on (it waits for a first line).
fn go_in_pod<R>(
    cleanup: &mut support::Cleanup,
    leaf: &Path,
    child: std::process::Child,
    mut stdin: std::process::ChildStdin,
    stdout: R,
) -> (std::process::ChildStdin, R) {
    std::fs::write(leaf.join("cgroup.procs"), child.id().to_string()).expect("into the pod");
    cleanup.children.push(child);
    writeln!(stdin, "go").expect("go");
    (stdin, stdout)
}

/// A Python server in the pod's cgroup: it makes its listener once inside (a socket keeps
/// the cgroup it was made in; an accepted one takes its listener's), prints its port and,
/// on a connection, `accepted`; the next line on stdin closes that connection.
fn server_in_pod(
    cleanup: &mut support::Cleanup,
    leaf: &Path,
) -> (
    std::process::ChildStdin,
    BufReader<std::process::ChildStdout>,
    u16,
) {
    let server_py = "import socket, sys\n\
sys.stdin.readline()\n\
l = socket.socket()\n\
l.bind(('127.0.0.1', 0))\n\
l.listen()\n\
print(l.getsockname()[1], flush=True)\n\
c, _ = l.accept()\n\
print('accepted', flush=True)\n\
sys.stdin.readline()\n\
c.close()\n";
    let mut server = Command::new("python3")
        .args(["-c", server_py])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 for the server in the pod");
    let stdin = server.stdin.take().unwrap();
    let stdout = BufReader::new(server.stdout.take().unwrap());
    let (stdin, mut stdout) = go_in_pod(cleanup, leaf, server, stdin, stdout);
    let mut line = String::new();
    stdout.read_line(&mut line).expect("server port");
    let port: u16 = line.trim().parse().expect("a port");
    (stdin, stdout, port)
}

/// A loopback connection to `listener` that carried `bytes` from the client to the server:
/// (client, server, the client's port).
fn connected(listener: &TcpListener, bytes: &[u8]) -> (TcpStream, TcpStream, u16) {
    let port = listener.local_addr().expect("addr").port();
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (mut s, _) = listener.accept().expect("accept");
    let c_port = c.local_addr().expect("addr").port();
    c.write_all(bytes).expect("write");
    let mut buf = vec![0u8; bytes.len()];
    s.read_exact(&mut buf).expect("read");
    (c, s, c_port)
}

/// `whoclosed agent` on `sock`, tracing `port`, verdicts 300 ms after a close; then `extra`.
fn agent_args(port: u16, sock: &Path, extra: &[&str]) -> Vec<String> {
    let port = port.to_string();
    let mut args = strings(&[
        "agent",
        "--linger-ms",
        "300",
        "--port",
        &port,
        "--socket",
        &sock.to_string_lossy(),
    ]);
    args.extend(strings(extra));
    args
}

/// [`agent_args`] naming pods from the kubelet layout under `host_root` (pids from the real
/// `/proc`) on node `test-node`; then `extra`.
fn pod_agent_args(port: u16, sock: &Path, host_root: &Path, extra: &[&str]) -> Vec<String> {
    let host_root = host_root.to_string_lossy();
    let mut pod = vec![
        "--host-root",
        &*host_root,
        "--proc-root",
        "/proc",
        "--node-name",
        "test-node",
    ];
    pod.extend_from_slice(extra);
    agent_args(port, sock, &pod)
}

/// A test's scratch directory, and one pod: its container's cgroup (named the way the
/// kubelet names it) and its kubelet log layout under `host_root`.
struct PodSetup {
    dir: PathBuf,
    host_root: PathBuf,
    cleanup: support::Cleanup,
    leaf: PathBuf,
}

/// [`PodSetup`] for test `name`; `None` when the test is skipped (not root, no cgroup v2).
fn pod_setup(name: &str) -> Option<PodSetup> {
    if !root_or_skip() {
        return None;
    }
    let Some(cg2) = cgroup2_mount() else {
        assert!(!require(), "no cgroup2 mount");
        eprintln!("SKIP agent_api: no cgroup2 mount");
        return None;
    };
    let dir = scratch_dir(name);
    let host_root = dir.join("host");
    let test_dir = format!("{name}-test-{}", std::process::id());
    let (cleanup, leaf) = one_pod(&cg2, &test_dir, &host_root, UID, CID);
    Some(PodSetup {
        dir,
        host_root,
        cleanup,
        leaf,
    })
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn port_of(addr: &Value) -> u16 {
    addr.as_str()
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(0)
}

#[test]
fn live_agent_answers_the_cli_and_replay_reproduces_it() {
    let Some(PodSetup {
        dir,
        host_root,
        mut cleanup,
        leaf,
    }) = pod_setup("whoclosed-agent")
    else {
        return;
    };

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let metrics_port = support::free_port();
    let sock = dir.join("run/whoclosed.sock");
    let api_port = support::free_port();
    let token_file = dir.join("token");
    std::fs::write(&token_file, "s3cret-token\n").expect("token file");
    let rec = dir.join("session.rec");
    let args = pod_agent_args(
        port,
        &sock,
        &host_root,
        &[
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_port}"),
            "--record",
            rec.to_str().unwrap(),
            "--output-file",
            dir.join("verdicts.ndjson").to_str().unwrap(),
            "--api-addr",
            &format!("127.0.0.1:{api_port}"),
            "--api-token-file",
            token_file.to_str().unwrap(),
        ],
    );
    let mut agent = WhoclosedProc::start(BIN, &args);
    let mode = std::fs::metadata(&sock).expect("socket exists");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    let prom = support::which_prometheus()
        .ok()
        .map(|bin| Prometheus::start(&bin, "agent", &format!("127.0.0.1:{metrics_port}")));
    assert!(prom.is_some() || !require(), "prometheus is not installed");

    // A follower streams the verdicts as they come.
    let mut follower = Command::new(BIN)
        .args(["closes", "--follow", "-o", "json", "--agent"])
        .arg(&sock)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start closes --follow");
    let (ftx, frx) = mpsc::channel::<String>();
    let fout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(fout).lines().map_while(Result::ok) {
            if ftx.send(l).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));

    // A: an orderly close, client first.
    let (c, mut s, a_port) = connected(&listener, b"hi");
    drop(c);
    let _ = s.read_to_end(&mut Vec::new());
    drop(s);

    // B: a client in a pod's cgroup; while it is open, `conns` shows it with its pod.
    let (child, stdin, stdout) = spawn_connector(port);
    let child_pid = child.id();
    let (mut stdin, mut stdout) = go_in_pod(&mut cleanup, &leaf, child, stdin, stdout);
    let mut line = String::new();
    stdout.read_line(&mut line).expect("child output");
    assert_eq!(line.trim(), "connected");
    let (server_b, b_peer) = listener.accept().expect("accept B");
    std::thread::sleep(Duration::from_millis(200));

    let out = cli(&sock, &["conns", "-o", "json", "--port", &port.to_string()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let conns = json_lines(&out);
    let client_b = conns
        .iter()
        .find(|c| port_of(&c["local"]) == b_peer.port())
        .unwrap_or_else(|| panic!("B's client socket in conns: {conns:#?}"));
    assert_eq!(client_b["state"], "ESTABLISHED");
    assert_eq!(client_b["role"], "client");
    assert_eq!(client_b["pid"], child_pid);
    assert_eq!(client_b["k8s"]["pod"], "web-7f9c-abcde");
    assert!(client_b["age_ms"].as_f64().unwrap() >= 150.0, "{client_b}");
    assert!(client_b["idle_ms"].as_f64().unwrap() >= 150.0, "{client_b}");
    let out = cli(&sock, &["conns", "--port", &port.to_string()]);
    let table = text(&out);
    assert!(table.lines().next().unwrap().contains("IDLE"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("ESTABLISHED") && l.contains("shop/web-7f9c-abcde")),
        "{table}"
    );

    // B ends: the server closes first, then the pod's process exits.
    drop(server_b);
    std::thread::sleep(Duration::from_millis(100));
    writeln!(stdin, "done").expect("done");
    drop(stdin);

    // C: the client aborts (SO_LINGER 0 sends a RST).
    let c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (s, _) = listener.accept().expect("accept");
    let c_port = c.local_addr().expect("addr").port();
    abort(c);
    std::thread::sleep(Duration::from_millis(100));
    drop(s);

    // Six verdicts (two sockets per connection).
    let deadline = Instant::now() + Duration::from_secs(15);
    let closes = loop {
        let out = cli(&sock, &["closes", "-o", "json"]);
        let v = if out.status.code() == Some(0) {
            json_lines(&out)
        } else {
            Vec::new()
        };
        if v.len() >= 6 || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(closes.len(), 6, "{closes:#?}");
    let validator = support::record_validator();
    for v in closes.iter().chain(conns.iter()) {
        let errs = support::schema_errors(&validator, v);
        assert!(errs.is_empty(), "{v}\n{errs:#?}");
    }
    let by_local = |p: u16| {
        closes
            .iter()
            .find(|c| port_of(&c["conn"]["local"]) == p)
            .unwrap_or_else(|| panic!("no verdict for local port {p}: {closes:#?}"))
    };
    let by_remote = |p: u16| {
        closes
            .iter()
            .find(|c| port_of(&c["conn"]["remote"]) == p)
            .unwrap_or_else(|| panic!("no verdict for remote port {p}: {closes:#?}"))
    };
    // A: both ends say the client closed, high confidence.
    for v in [by_local(a_port), by_remote(a_port)] {
        assert_eq!(v["verdict"]["closed_by"], "client", "{v}");
        assert_eq!(v["verdict"]["reason"], "client_close", "{v}");
        assert_eq!(v["verdict"]["confidence"], "high", "{v}");
    }
    // B: the server closed; the client socket is the pod's, and the server socket's peer is.
    let b_client = by_local(b_peer.port());
    let b_server = by_remote(b_peer.port());
    assert_eq!(b_client["verdict"]["closed_by"], "server", "{b_client}");
    assert_eq!(b_server["verdict"]["closed_by"], "server", "{b_server}");
    let pod = json!({"node": "test-node", "namespace": "shop", "pod": "web-7f9c-abcde",
        "container": "app", "pod_uid": UID, "container_id": CID});
    assert_eq!(b_client["conn"]["k8s"], pod, "{b_client}");
    assert_eq!(b_server["peer"]["k8s"], pod, "{b_server}");
    assert!(b_server["conn"].get("k8s").is_none(), "{b_server}");
    // C: the client's abort.
    let c_client = by_local(c_port);
    assert_eq!(c_client["verdict"]["closed_by"], "client", "{c_client}");
    assert_eq!(c_client["verdict"]["mechanism"], "rst", "{c_client}");

    // The follower saw the same six, as they came.
    let mut followed = Vec::new();
    while followed.len() < 6 {
        match frx.recv_timeout(Duration::from_secs(10)) {
            Ok(l) => followed.push(serde_json::from_str::<Value>(&l).unwrap()),
            Err(_) => panic!("the follower got {} lines: {followed:#?}", followed.len()),
        }
    }
    let ids = |v: &[Value]| {
        let mut ids: Vec<String> = v.iter().map(|c| c["conn"]["id"].to_string()).collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&followed), ids(&closes));

    // The TCP API needs the token; two agents' stats are summed (here one agent twice).
    let http = format!("http://127.0.0.1:{api_port}");
    let out = Command::new(BIN)
        .args([
            "closes",
            "-o",
            "json",
            "--agent",
            &http,
            "--token",
            "s3cret-token",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(ids(&json_lines(&out)), ids(&closes));
    let out = Command::new(BIN)
        .args(["closes", "--agent", &http])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{out:?}"
    );
    let out = Command::new(BIN)
        .args(["stats", "-o", "json", "--token", "s3cret-token", "--agent"])
        .arg(&sock)
        .args(["--agent", &http])
        .output()
        .unwrap();
    let st: Value = serde_json::from_str(&text(&out)).unwrap();
    assert_eq!(st["records"], 12, "{st}");
    assert_eq!(st["agents"].as_object().unwrap().len(), 2, "{st}");

    // Table output.
    let out = cli(
        &sock,
        &[
            "closes",
            "--closed-by",
            "client",
            "--port",
            &a_port.to_string(),
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    let table = text(&out);
    let mut rows = table.lines();
    let header = rows.next().unwrap();
    for col in ["TIME", "LOCAL", "REMOTE", "CLOSED_BY", "REASON", "CONF"] {
        assert!(header.contains(col), "{table}");
    }
    let rows: Vec<&str> = rows.collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(
        rows.iter()
            .all(|r| r.contains("client_close") && r.contains("high"))
    );
    let out = cli(&sock, &["closes", "-o", "wide", "--namespace", "shop"]);
    let wide = text(&out);
    assert_eq!(
        wide.lines().count(),
        2,
        "header and B's client socket: {wide}"
    );
    assert!(wide.contains("shop/web-7f9c-abcde"), "{wide}");

    // explain.
    let id = by_local(a_port)["conn"]["id"].as_str().unwrap().to_string();
    let out = cli(&sock, &["explain", &id]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let ex = text(&out);
    assert!(
        ex.contains("closed by client (client_close, high confidence)"),
        "{ex}"
    );
    assert!(ex.contains("ESTABLISHED -> FIN_WAIT1"), "{ex}");
    assert!(ex.contains("hint: "), "{ex}");
    let out = cli(&sock, &["explain", &id, "-o", "json"]);
    assert_eq!(json_lines(&out), vec![by_local(a_port).clone()]);

    // stats.
    let out = cli(&sock, &["stats", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let st: Value = serde_json::from_str(&text(&out)).unwrap();
    let errs = support::schema_errors(&support::schema_validator("cli-stats"), &st);
    assert!(errs.is_empty(), "{st}\n{errs:#?}");
    assert_eq!(st["records"], 6, "{st}");
    assert_eq!(st["by_closed_by"]["client"], 4, "{st}");
    assert_eq!(st["by_closed_by"]["server"], 2, "{st}");
    assert_eq!(st["top_pods"][0]["key"], "shop/web-7f9c-abcde", "{st}");
    let agent_key = format!("unix:{}", sock.display());
    assert_eq!(st["agents"][&agent_key]["probe_mode"], "tracepoint", "{st}");
    let out = cli(&sock, &["stats"]);
    let t = text(&out);
    assert!(t.contains("CLOSED_BY") && t.contains("PROBE_MODE"), "{t}");

    // Exit codes.
    let code = |o: Output| o.status.code();
    assert_eq!(
        code(cli(&sock, &["closes", "--closed-by", "middlebox"])),
        Some(1)
    );
    assert_eq!(code(cli(&sock, &["explain", "00000000deadbeef"])), Some(1));
    assert_eq!(code(cli(&sock, &["closes", "--reason", "bogus"])), Some(2));
    assert_eq!(code(cli(&dir.join("nothing.sock"), &["closes"])), Some(3));
    assert_eq!(code(cli(&dir.join("nothing.sock"), &["stats"])), Some(3));

    // A real Prometheus sees the same count.
    if let Some(prom) = &prom {
        let got = prom.wait_for("sum(whoclosed_closes_total)", 6.0, Duration::from_secs(60));
        assert_eq!(got, Some(6.0), "prometheus log:\n{}", prom.log());
        let got = prom.wait_for(
            r#"sum(whoclosed_closes_total{closed_by="client",reason="client_close",confidence="high"})"#,
            2.0,
            Duration::from_secs(10),
        );
        assert_eq!(got, Some(2.0));
    }

    // SIGTERM: everything flushed, the stats line last, the socket gone.
    // SAFETY: kill with our own child's pid and a valid signal.
    unsafe { libc::kill(agent.child.id() as libc::pid_t, libc::SIGTERM) };
    let status = agent.child.wait().expect("wait");
    assert!(status.success(), "agent exited with {status}");
    agent.seen.extend(agent.lines.iter());
    let live: Vec<Value> = agent
        .seen
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for v in &live {
        let errs = support::schema_errors(&validator, v);
        assert!(errs.is_empty(), "{v}\n{errs:#?}");
    }
    assert_eq!(live.first().unwrap()["type"], "ready");
    assert_eq!(live.last().unwrap()["type"], "stats");
    assert_eq!(live.last().unwrap()["printed"], 6);
    assert!(!sock.exists(), "socket removed on exit");
    // The follower's stream ended with the agent, cleanly.
    let fstatus = follower.wait().expect("follower exits");
    assert_eq!(
        fstatus.code(),
        Some(0),
        "closes --follow after the agent stopped"
    );
    let live_closes: Vec<&String> = agent
        .seen
        .iter()
        .filter(|l| l.contains("\"type\":\"close\""))
        .collect();
    assert_eq!(live_closes.len(), 6);
    let file = std::fs::read_to_string(dir.join("verdicts.ndjson")).unwrap();
    assert_eq!(file.lines().collect::<Vec<_>>(), live_closes);

    // replay: the same lines, byte for byte, without the kernel and without privileges
    // (as nobody, every capability dropped, when setpriv is there).
    let unprivileged = Command::new("setpriv").arg("--version").output().is_ok();
    let out = if unprivileged {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--",
                BIN,
                "replay",
                rec.to_str().unwrap(),
            ])
            .output()
            .expect("replay")
    } else {
        Command::new(BIN)
            .args(["replay", rec.to_str().unwrap()])
            .output()
            .expect("replay")
    };
    assert!(out.status.success(), "{out:?}");
    let replayed: Vec<String> = text(&out).lines().map(str::to_string).collect();
    let live_closes: Vec<String> = live_closes.into_iter().cloned().collect();
    assert_eq!(replayed, live_closes);

    drop(prom);
    drop(cleanup);
    let _ = std::fs::remove_dir_all(&dir);
    let _: PathBuf = dir;
}

/// A connection opened before the agent started is listed by the kernel's walk over the TCP
/// sockets at the start, idle as it is: `preexisting`, with its state, its age a lower
/// bound in the table view; its close then gives a verdict under the same id, with the
/// process that closed it (known from its close()). Where the kernel refuses the walk
/// (`ready.existing_sockets` false) this checks the fallback, as the next test does.
#[test]
fn connection_older_than_the_agent_is_listed_at_start() {
    older_connection(&[]);
}

/// As above with `--no-existing`: while idle the connection is not listed (the agent has
/// seen nothing of it); from the first segment after the start it is, with state
/// `UNKNOWN`.
#[test]
fn connection_older_than_the_agent_is_listed_once_a_segment_passes() {
    older_connection(&["--no-existing"]);
}

/// Thousands of connections open before the start, and a ring buffer a hundredth of the
/// default: the walk hands its records over a quarter of the buffer at a time, draining in
/// between, so every connection is listed and none is lost to a full buffer.
#[test]
fn many_older_connections_are_listed_through_a_small_ring_buffer() {
    if !root_or_skip() {
        return;
    }
    const PAIRS: usize = 1500;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut held = Vec::with_capacity(2 * PAIRS);
    for _ in 0..PAIRS {
        let c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (s, _) = listener.accept().expect("accept");
        held.push(c);
        held.push(s);
    }
    let args = strings(&["trace", "--ringbuf-kib", "64", "--port", &port.to_string()]);
    let mut agent = WhoclosedProc::start(BIN, &args);
    let ready = agent
        .wait_for(Duration::from_secs(1), |v| v["type"] == "ready")
        .expect("ready record");
    // SAFETY: kill with our own child's pid and a valid signal.
    unsafe { libc::kill(agent.child.id() as libc::pid_t, libc::SIGINT) };
    let stats = agent
        .wait_for(Duration::from_secs(30), |v| v["type"] == "stats")
        .unwrap_or_else(|| panic!("no stats line: {:#?}", agent.seen));
    if ready["existing_sockets"] != true {
        eprintln!("SKIP the walk: this kernel does not list older connections: {ready}");
        return;
    }
    let walked = stats["table"]["conns_walked"].as_u64().unwrap_or(0);
    assert!(
        walked >= 2 * PAIRS as u64,
        "{walked} of {} connections listed: {stats:#}",
        2 * PAIRS
    );
    assert_eq!(stats["kernel"]["ringbuf_drops"], 0, "{stats:#}");
    drop(held);
}

/// SIGTERM the moment `ready` is read (what a supervisor that stops a just-started agent
/// does): the agent still flushes and writes its final `stats` line. The handlers were
/// once installed only after `ready`, and a signal in that gap killed it silently.
#[test]
fn stopped_as_soon_as_ready_it_still_writes_stats() {
    if !root_or_skip() {
        return;
    }
    for round in 0..3 {
        let args = strings(&["trace", "--no-packets", "--port", "9"]);
        let mut agent = WhoclosedProc::start(BIN, &args);
        agent
            .wait_for(Duration::from_secs(10), |v| v["type"] == "ready")
            .expect("ready record");
        // SAFETY: kill with our own child's pid and a valid signal.
        unsafe { libc::kill(agent.child.id() as libc::pid_t, libc::SIGTERM) };
        let stats = agent.wait_for(Duration::from_secs(10), |v| v["type"] == "stats");
        assert!(
            stats.is_some(),
            "round {round}: no stats line: {:#?}",
            agent.seen
        );
    }
}

/// Record kinds (the first byte of each ring-buffer record) in a `--record` file, counted
/// (docs: the frame layout in tracer-user/src/record.rs).
fn record_kinds(path: &Path) -> std::collections::BTreeMap<u8, usize> {
    let f = std::fs::read(path).expect("read the recording");
    assert_eq!(&f[..8], b"WHOCLREC");
    let header = u32::from_le_bytes(f[12..16].try_into().unwrap()) as usize;
    let mut at = 16 + header;
    let mut kinds = std::collections::BTreeMap::new();
    while at + 5 <= f.len() {
        let frame = f[at];
        let len = u32::from_le_bytes(f[at + 1..at + 5].try_into().unwrap()) as usize;
        if frame == 1 && len > 0 {
            *kinds.entry(f[at + 5]).or_insert(0) += 1;
        }
        at += 5 + len;
    }
    kinds
}

/// `trace --record` (plus `extra`) while `n` loopback connections open, carry a byte each
/// way and close one after the other; the record kinds and the final stats line.
fn record_churn(extra: &[&str], n: usize) -> (std::collections::BTreeMap<u8, usize>, Value) {
    let dir = scratch_dir(&format!("whoclosed-churn{}", extra.len()));
    let rec = dir.join("churn.rec");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut args = strings(&["trace", "--port", &port.to_string(), "--record"]);
    args.push(rec.to_string_lossy().into_owned());
    args.extend(strings(extra));
    let mut agent = WhoclosedProc::start(BIN, &args);
    for _ in 0..n {
        let (mut c, mut s, _) = connected(&listener, b"x");
        s.write_all(b"y").expect("write");
        c.read_exact(&mut [0u8; 1]).expect("read");
        c.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let _ = s.read_to_end(&mut Vec::new());
    }
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill with our own child's pid and a valid signal.
    unsafe { libc::kill(agent.child.id() as libc::pid_t, libc::SIGINT) };
    let stats = agent
        .wait_for(Duration::from_secs(30), |v| v["type"] == "stats")
        .unwrap_or_else(|| panic!("no stats line: {:#?}", agent.seen));
    let _ = agent.child.wait();
    let kinds = record_kinds(&rec);
    let _ = std::fs::remove_dir_all(&dir);
    (kinds, stats)
}

/// A socket is destroyed in CLOSE, and its change to CLOSE ends its record: the kernel
/// writes no `DESTROY` record while nothing was lost, and writes them once something was
/// (they then end the records whose CLOSE went missing).
#[test]
fn destroy_records_come_only_after_a_loss() {
    const STATE: u8 = 1;
    const DESTROY: u8 = 5;
    if !root_or_skip() {
        return;
    }
    let (kinds, stats) = record_churn(&[], 30);
    assert_eq!(stats["kernel"]["ringbuf_drops"], 0, "{stats:#}");
    assert_eq!(stats["kernel"]["read_errors"], 0, "{stats:#}");
    assert!(
        kinds.get(&STATE).copied().unwrap_or(0) >= 30 * 10,
        "the churn's state changes: {kinds:?}"
    );
    assert_eq!(
        kinds.get(&DESTROY),
        None,
        "DESTROY without a loss: {kinds:?}"
    );

    let (kinds, stats) = record_churn(&["--ringbuf-kib", "4"], 400);
    assert!(
        stats["kernel"]["ringbuf_drops"].as_u64().unwrap_or(0) > 0,
        "a 4 KiB ring buffer kept up with 400 connections: {stats:#}"
    );
    assert!(
        kinds.get(&DESTROY).copied().unwrap_or(0) > 0,
        "no DESTROY after the losses: {kinds:?}"
    );
}

fn older_connection(extra: &[&str]) {
    if !root_or_skip() {
        return;
    }
    let pid = std::process::id();
    let dir = scratch_dir(&format!("whoclosed-agent-old{}", extra.len()));
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (mut c, mut s, c_port) = connected(&listener, b"before");
    let mut buf = [0u8; 6];

    let sock = dir.join("whoclosed.sock");
    let mut agent = WhoclosedProc::start(BIN, &agent_args(port, &sock, extra));
    let ready = agent
        .wait_for(Duration::from_secs(1), |v| v["type"] == "ready")
        .expect("ready record");
    let walked = ready["existing_sockets"] == true;
    assert!(
        !(walked && extra.contains(&"--no-existing")),
        "walked with --no-existing: {ready}"
    );
    let conns_now = || {
        let out = cli(&sock, &["conns", "-o", "json", "--port", &port.to_string()]);
        match out.status.code() {
            Some(0) => json_lines(&out),
            Some(1) => Vec::new(),
            _ => panic!("conns failed: {out:?}"),
        }
    };
    let state = if walked {
        // The walk is done before the agent answers its first query.
        "ESTABLISHED"
    } else {
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            conns_now().is_empty(),
            "an idle connection older than the agent is listed without the walk: nothing \
             of it was seen"
        );
        c.write_all(b"after!").expect("write");
        s.read_exact(&mut buf).expect("read");
        "UNKNOWN"
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let conns = loop {
        let v = conns_now();
        if v.len() >= 2 || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(conns.len(), 2, "both ends listed: {conns:#?}");
    let validator = support::record_validator();
    for v in &conns {
        let errs = support::schema_errors(&validator, v);
        assert!(errs.is_empty(), "{v}\n{errs:#?}");
        assert_eq!(v["preexisting"], true, "{v}");
        assert_eq!(v["state"], state, "{v}");
        assert_eq!(v["pid"], Value::Null, "no owner context seen yet: {v}");
    }
    let client = conns
        .iter()
        .find(|v| port_of(&v["local"]) == c_port)
        .unwrap_or_else(|| panic!("the client socket in conns: {conns:#?}"));
    let client_id = client["id"].clone();
    let table = text(&cli(&sock, &["conns", "--port", &port.to_string()]));
    let row = table
        .lines()
        .find(|l| l.contains(&format!("127.0.0.1:{c_port}")))
        .unwrap_or_else(|| panic!("no row for the client: {table}"));
    assert!(
        row.contains(state) && row.split_whitespace().any(|w| w.starts_with('>')),
        "the age of a pre-existing connection is not shown as a lower bound: {row}"
    );
    if walked {
        // Traffic after the walk stays on the listed records.
        c.write_all(b"after!").expect("write");
        s.read_exact(&mut buf).expect("read");
        std::thread::sleep(Duration::from_millis(300));
        let again = conns_now();
        assert_eq!(again.len(), 2, "{again:#?}");
        assert!(again.iter().any(|v| v["id"] == client_id), "{again:#?}");
    }

    // shutdown(), not only drop: the FIN then leaves in this process's context even if a
    // process another test spawns holds a copy of the descriptor between its fork and exec
    // (the last close would then be that process's, and so would the owner).
    c.shutdown(std::net::Shutdown::Write).expect("shutdown");
    drop(c);
    let _ = s.read_to_end(&mut Vec::new());
    drop(s);
    let v = agent
        .wait_for(Duration::from_secs(10), |v| {
            v["type"] == "close" && port_of(&v["conn"]["local"]) == c_port
        })
        .unwrap_or_else(|| panic!("no verdict for the client: {:#?}", agent.seen));
    assert_eq!(v["conn"]["id"], client_id, "{v}");
    assert_eq!(v["conn"]["preexisting"], true, "{v}");
    // Both ports are in the ephemeral range: which end is the client is not known, only
    // that this end closed first.
    assert_eq!(v["verdict"]["tcp_initiator"], "local", "{v}");
    assert_eq!(v["verdict"]["reason"], "local_close", "{v}");
    assert_ne!(v["verdict"]["confidence"], "high", "{v}");
    assert_eq!(v["conn"]["pid"], pid, "the closing process: {v}");
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pod's connection opened before the agent and idle since: no segment or event names
/// its pod, so the start-up walk must. The walk reads the socket's cgroup in the kernel,
/// and `conns` names the pod at once.
#[test]
fn an_idle_older_connection_is_named_by_its_pod_at_start() {
    older_pod_connection(&[]);
}

/// As above without the packet hooks (`--no-packets`): the walk alone names the pod.
#[test]
fn an_idle_older_connection_is_named_by_its_pod_without_packet_hooks() {
    older_pod_connection(&["--no-packets"]);
}

fn older_pod_connection(extra: &[&str]) {
    let Some(PodSetup {
        dir,
        host_root,
        mut cleanup,
        leaf,
    }) = pod_setup(&format!("whoclosed-agent-oldpod{}", extra.len()))
    else {
        return;
    };
    let (mut stdin, mut stdout, port) = server_in_pod(&mut cleanup, &leaf);
    let mut line = String::new();
    let c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let c_port = c.local_addr().expect("addr").port();
    line.clear();
    stdout.read_line(&mut line).expect("accepted");
    assert_eq!(line.trim(), "accepted");

    let sock = dir.join("whoclosed.sock");
    let args = pod_agent_args(port, &sock, &host_root, extra);
    let mut agent = WhoclosedProc::start(BIN, &args);
    let ready = agent
        .wait_for(Duration::from_secs(10), |v| v["type"] == "ready")
        .expect("ready record");
    if ready["existing_sockets"] != true {
        eprintln!("SKIP: this kernel does not list older connections: {ready}");
        writeln!(stdin, "done").expect("done");
        return;
    }
    let out = cli(&sock, &["conns", "-o", "json", "--port", &port.to_string()]);
    let conns = json_lines(&out);
    let server_side = conns
        .iter()
        .find(|v| port_of(&v["remote"]) == c_port)
        .unwrap_or_else(|| panic!("the server socket in conns: {conns:#?}"));
    assert_eq!(server_side["preexisting"], true, "{server_side}");
    assert_eq!(server_side["state"], "ESTABLISHED", "{server_side}");
    assert_eq!(server_side["pid"], Value::Null, "{server_side}");
    assert_eq!(server_side["events_lost"], false, "{server_side}");
    assert_eq!(
        server_side["k8s"]["pod"], "web-7f9c-abcde",
        "named from the walk: {server_side}"
    );
    assert_eq!(server_side["k8s"]["container"], "app", "{server_side}");
    writeln!(stdin, "done").expect("done");
    drop(c);
}

/// A server in a pod whose connection the client resets: no event runs in the server's
/// context (the RST moves its socket to CLOSE in softirq, and close() of a closed socket
/// changes no state), so its owner stays unknown. Its pod comes from the socket's own cgroup
/// (the packet records carry its id), in its verdict, in `conns` while it lives, and as the
/// client's `peer.k8s`.
#[test]
fn a_reset_server_socket_is_named_by_its_cgroup() {
    let Some(PodSetup {
        dir,
        host_root,
        mut cleanup,
        leaf,
    }) = pod_setup("whoclosed-agent-cgid")
    else {
        return;
    };
    let (mut stdin, mut stdout, port) = server_in_pod(&mut cleanup, &leaf);
    let mut line = String::new();

    let sock = dir.join("whoclosed.sock");
    let port_arg = port.to_string();
    let args = pod_agent_args(port, &sock, &host_root, &[]);
    let mut agent = WhoclosedProc::start(BIN, &args);
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let c_port = c.local_addr().expect("addr").port();
    line.clear();
    stdout.read_line(&mut line).expect("accepted");
    assert_eq!(line.trim(), "accepted");
    c.write_all(b"hello").expect("write");
    std::thread::sleep(Duration::from_millis(200));

    let out = cli(&sock, &["conns", "-o", "json", "--port", &port_arg]);
    let conns = json_lines(&out);
    let live = conns
        .iter()
        .find(|v| port_of(&v["remote"]) == c_port)
        .unwrap_or_else(|| panic!("the server socket in conns: {conns:#?}"));
    assert_eq!(live["pid"], Value::Null, "{live}");
    assert_eq!(live["k8s"]["pod"], "web-7f9c-abcde", "{live}");

    abort(c);
    let server_v = agent
        .wait_for(Duration::from_secs(10), |v| {
            v["type"] == "close" && port_of(&v["conn"]["remote"]) == c_port
        })
        .unwrap_or_else(|| panic!("no verdict for the server socket: {:#?}", agent.seen));
    let client_v = agent
        .wait_for(Duration::from_secs(10), |v| {
            v["type"] == "close" && port_of(&v["conn"]["local"]) == c_port
        })
        .unwrap_or_else(|| panic!("no verdict for the client socket: {:#?}", agent.seen));
    writeln!(stdin, "done").expect("done");
    let validator = support::record_validator();
    for v in [&server_v, &client_v] {
        let errs = support::schema_errors(&validator, v);
        assert!(errs.is_empty(), "{v}\n{errs:#?}");
    }
    assert_eq!(server_v["conn"]["pid"], Value::Null, "{server_v}");
    let k = &server_v["conn"]["k8s"];
    assert_eq!(k["namespace"], "shop", "{server_v}");
    assert_eq!(k["pod"], "web-7f9c-abcde", "{server_v}");
    assert_eq!(k["container"], "app", "{server_v}");
    assert_eq!(k["container_id"], CID, "{server_v}");
    assert_eq!(k["node"], "test-node", "{server_v}");
    assert_eq!(server_v["verdict"]["closed_by"], "client", "{server_v}");
    // The client runs in no pod: its own socket has none, its peer has the server's.
    assert!(client_v["conn"]["k8s"].is_null(), "{client_v}");
    assert_eq!(
        client_v["peer"]["k8s"]["pod"], "web-7f9c-abcde",
        "{client_v}"
    );
    drop(agent);
    drop(cleanup);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without the capabilities (dropped from the bounding set, so root has none of them), the
/// error names each missing one instead of "must run as root".
#[test]
fn missing_capabilities_are_named() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 || Command::new("setpriv").arg("--version").output().is_err()
    {
        assert!(!require(), "needs root and setpriv");
        eprintln!("SKIP missing_capabilities_are_named: needs root and setpriv");
        return;
    }
    let out = Command::new("setpriv")
        .args([
            "--bounding-set",
            "-bpf,-perfmon,-net_admin,-sys_admin",
            "--inh-caps",
            "-all",
            "--",
            BIN,
            "trace",
        ])
        .output()
        .expect("setpriv");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"] {
        assert!(err.contains(cap), "{cap} not named: {err}");
    }
    assert!(!err.contains("must run as root"), "{err}");
}

/// (local, remote) addresses of connection ends.
type Endpoints = std::collections::BTreeSet<(String, String)>;

/// Keeps every 25th of 8,000 loopback connections to `listener` open, closing the others at
/// once, both ends: returns the kept pairs and their (local, remote) addresses, both ends.
fn flood_keeping_some(listener: &TcpListener) -> (Vec<(TcpStream, TcpStream)>, Endpoints) {
    let port = listener.local_addr().expect("addr").port();
    let mut held = Vec::new();
    let mut live = std::collections::BTreeSet::new();
    for i in 0..8000 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (mut s, _) = listener.accept().expect("accept");
        c.write_all(b"x").expect("write");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("read");
        if i % 25 == 0 {
            for e in [&c, &s] {
                live.insert((
                    e.local_addr().unwrap().to_string(),
                    e.peer_addr().unwrap().to_string(),
                ));
            }
            held.push((c, s));
        }
    }
    (held, live)
}

/// Where [`recheck_case`] runs its flood.
enum FloodAt {
    /// On the agent's own loopback, which its `iter/tcp` walk covers.
    OwnNamespace,
    /// In a network namespace the agent never enters: a thread's own (`unshare` moves only
    /// the calling thread, and `/proc/PID/ns/net` names the process's), with an agent that
    /// lacks CAP_SYS_ADMIN and CAP_SYS_PTRACE besides, as the least-privilege DaemonSet
    /// does. Only the walk over the sockets holding packet state covers it.
    NamespaceNotEntered,
}

/// A thread in a network namespace of its own, listening on its loopback: floods
/// ([`flood_keeping_some`]) when told, then holds the kept connections until told again.
struct FloodThread {
    port: u16,
    go: mpsc::Sender<()>,
    live: mpsc::Receiver<Endpoints>,
    thread: std::thread::JoinHandle<()>,
}

impl FloodThread {
    fn start() -> FloodThread {
        let (port_tx, port_rx) = mpsc::channel();
        let (go, go_rx) = mpsc::channel::<()>();
        let (live_tx, live) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            // SAFETY: unshare(2) with a namespace flag; it affects only this thread.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            // A child forked from this thread starts in its namespace.
            let up = Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .expect("ip");
            assert!(up.success());
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            port_tx
                .send(listener.local_addr().expect("addr").port())
                .unwrap();
            let _ = go_rx.recv();
            let (held, set) = flood_keeping_some(&listener);
            live_tx.send(set).unwrap();
            // Hold until the test ends (the sender dropped).
            let _ = go_rx.recv();
            drop(held);
        });
        let port = port_rx.recv().expect("the flood thread's port");
        FloodThread {
            port,
            go,
            live,
            thread,
        }
    }
}

/// The flood of [`recheck_case`], where [`FloodAt`] says.
enum Flooder {
    Own {
        listener: TcpListener,
        held: Vec<(TcpStream, TcpStream)>,
    },
    Thread(FloodThread),
}

impl Flooder {
    fn start(at: &FloodAt) -> Flooder {
        match at {
            FloodAt::OwnNamespace => Flooder::Own {
                listener: TcpListener::bind("127.0.0.1:0").expect("bind"),
                held: Vec::new(),
            },
            FloodAt::NamespaceNotEntered => Flooder::Thread(FloodThread::start()),
        }
    }

    fn port(&self) -> u16 {
        match self {
            Flooder::Own { listener, .. } => listener.local_addr().expect("addr").port(),
            Flooder::Thread(t) => t.port,
        }
    }

    /// Floods ([`flood_keeping_some`]); the kept connections stay open until
    /// [`Flooder::finish`]. Returns their ends.
    fn flood(&mut self) -> Endpoints {
        match self {
            Flooder::Own { listener, held } => {
                let (h, live) = flood_keeping_some(listener);
                *held = h;
                live
            }
            Flooder::Thread(t) => {
                t.go.send(()).unwrap();
                t.live.recv().expect("the flood thread's connections")
            }
        }
    }

    /// Closes the kept connections.
    fn finish(self) {
        if let Flooder::Thread(t) = self {
            drop(t.go);
            t.thread.join().expect("the flood thread");
        }
    }
}

/// A connect/close flood through a 4 KiB ring buffer loses most kernel records, the CLOSE
/// of some ended connections and the opening of some live ones among them. Without a
/// recheck their records stayed: `conns` listed connections in FIN_WAIT1 or LAST_ACK that
/// no longer existed (100 of 556 in one measurement) and missed live ones. Once the loss
/// stops the agent walks the live sockets again, and `conns` lists exactly the connections
/// that exist, in the kernel's state. Stats count the recheck, and a replay of the
/// recording gives the same verdicts, the ends the recheck found included.
fn recheck_case(at: FloodAt) {
    let tag = match at {
        FloodAt::OwnNamespace => "own",
        FloodAt::NamespaceNotEntered => "netns",
    };
    let dir = std::env::temp_dir().join(format!("whoclosed-recheck-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("whoclosed.sock");
    let rec = dir.join("session.rec");
    let mut flooder = Flooder::start(&at);
    let port = flooder.port();
    let mut args = agent_args(port, &sock, &["--ringbuf-kib", "4"]);
    args.extend(strings(&["--record", rec.to_str().unwrap()]));
    let mut agent = match at {
        FloodAt::OwnNamespace => WhoclosedProc::start(BIN, &args),
        FloodAt::NamespaceNotEntered => {
            let mut wrapped = strings(&[
                "--bounding-set",
                "-sys_admin,-sys_ptrace",
                "--inh-caps",
                "-all",
                "--",
                BIN,
            ]);
            wrapped.extend(args);
            WhoclosedProc::start("setpriv", &wrapped)
        }
    };
    let ready = agent
        .wait_for(Duration::from_secs(10), |v| v["type"] == "ready")
        .expect("ready record");
    match at {
        FloodAt::OwnNamespace if ready["existing_sockets"] != true => {
            eprintln!("SKIP: this kernel does not list live connections: {ready}");
            return;
        }
        // Other processes' namespaces (init's at least) were out of its reach.
        FloodAt::NamespaceNotEntered => assert_eq!(ready["existing_sockets"], false, "{ready}"),
        FloodAt::OwnNamespace => {}
    }
    let live = flooder.flood();
    // (local, remote) -> state of each connection `conns` lists on the port.
    let listed = || -> std::collections::BTreeMap<(String, String), String> {
        json_lines(&cli(
            &sock,
            &["conns", "-o", "json", "--port", &port.to_string()],
        ))
        .iter()
        .map(|v| {
            let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
            ((s("local"), s("remote")), s("state"))
        })
        .collect()
    };
    // Until the recheck, stale records may be listed, in any state.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = listed();
    while got
        .keys()
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        != live
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(250));
        got = listed();
    }
    let stale: Vec<_> = got.keys().filter(|k| !live.contains(*k)).collect();
    let missing: Vec<_> = live.iter().filter(|k| !got.contains_key(*k)).collect();
    assert!(
        stale.is_empty() && missing.is_empty(),
        "{} listed that do not exist (first {:?}), {} live not listed (first {:?})",
        stale.len(),
        stale.first(),
        missing.len(),
        missing.first()
    );
    // Every one lived through the flood's losses, and says so.
    let flagged = json_lines(&cli(
        &sock,
        &["conns", "-o", "json", "--port", &port.to_string()],
    ));
    assert!(
        flagged.iter().all(|v| v["events_lost"] == true),
        "a connection alive through the losses is not flagged: {:?}",
        flagged.iter().find(|v| v["events_lost"] != true)
    );
    let not_established: Vec<_> = got.iter().filter(|(_, s)| *s != "ESTABLISHED").collect();
    assert!(
        not_established.is_empty(),
        "not in the kernel's state: {not_established:?}"
    );

    // SAFETY: kill with our own child's pid and a valid signal.
    unsafe { libc::kill(agent.child.id() as libc::pid_t, libc::SIGINT) };
    let stats = agent
        .wait_for(Duration::from_secs(30), |v| v["type"] == "stats")
        .unwrap_or_else(|| panic!("no stats line: {:#?}", agent.seen.last()));
    assert!(
        stats["kernel"]["ringbuf_drops"].as_u64().unwrap_or(0) > 0,
        "the flood lost nothing, so nothing was tested: {stats:#}"
    );
    assert!(
        stats["table"]["rechecks"].as_u64().unwrap_or(0) >= 1,
        "{stats:#}"
    );
    let live_closes: Vec<String> = agent
        .seen
        .iter()
        .filter(|l| l.contains("\"type\":\"close\""))
        .cloned()
        .collect();
    let out = Command::new(BIN)
        .args(["replay", rec.to_str().unwrap()])
        .output()
        .expect("replay");
    assert!(out.status.success(), "{out:?}");
    let replayed: Vec<String> = text(&out).lines().map(str::to_string).collect();
    assert_eq!(replayed.len(), live_closes.len());
    assert!(
        replayed == live_closes,
        "replay differs from the live verdicts"
    );
    flooder.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn after_lost_events_conns_lists_exactly_the_live_connections() {
    if !root_or_skip() {
        return;
    }
    recheck_case(FloodAt::OwnNamespace);
}

/// The same in a namespace the agent cannot enter, by an agent without the capabilities
/// to enter one: the walk over the sockets holding packet state finds the ones gone.
#[test]
fn after_lost_events_a_namespace_not_entered_is_rechecked_too() {
    if !root_or_skip() {
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        assert!(!require(), "needs setpriv");
        eprintln!("SKIP: needs setpriv");
        return;
    }
    let report = Command::new(BIN)
        .args(["trace", "--probe-report"])
        .output()
        .expect("probe report");
    let report: Value = serde_json::from_slice(&report.stdout).unwrap_or(Value::Null);
    let attached = report["programs"].as_array().is_some_and(|ps| {
        ps.iter()
            .any(|p| p["program"] == "sk_storage_existing" && p["status"] == "attached")
    });
    if !attached {
        eprintln!("SKIP: this kernel does not load the socket storage walk: {report}");
        return;
    }
    recheck_case(FloodAt::NamespaceNotEntered);
}
