//! HTTP/2 peers for the end-to-end tests: real implementations run inside the topology's
//! namespaces.
//!
//! * [`GrpcServer`] / [`GrpcClient`]: Python grpcio (`tests/peers/grpc_server.py`,
//!   `tests/peers/grpc_client.py`) from the venv at `$WHOCLOSED_VENV`, else
//!   `$HOME/.cache/whoclosed/venv` ([`venv_dir`]); line-driven like `wc-peer`.
//! * [`Nghttpd`], [`nghttp_get`], [`h2load`]: the nghttp2 tools from Debian, with a
//!   [`DocRoot`] holding a large file.
//!
//! [`h2_tools_missing`] tells which of these are unavailable, so tests can skip with the
//! reason (or fail under `WHOCLOSED_E2E=require`).
//!
//! Note: grpcio (C-core) opens AF_INET6 dual-stack sockets even for IPv4 addresses, so the
//! kernel sees `[::ffff:10.241.1.2]:port`; [`norm_addr`] folds that to `10.241.1.2:port`.

use crate::{lineproc::LineProc, wait_until};
use anyhow::{Context, Result, anyhow, bail};
use std::fmt::Display;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// pip requirement the peers were written and verified against (also in
/// `tests/peers/requirements.txt`). The GOAWAY debug texts and error codes asserted by the
/// tests are those of this release.
pub const GRPCIO_REQUIREMENT: &str = "grpcio==1.85.1";
/// The version in [`GRPCIO_REQUIREMENT`].
pub const GRPCIO_VERSION: &str = "1.85.1";
/// Default bound for one command of a Python peer.
pub const H2_PEER_TIMEOUT: Duration = Duration::from_secs(15);

/// `$WHOCLOSED_VENV`, else `$HOME/.cache/whoclosed/venv`.
pub fn venv_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("WHOCLOSED_VENV") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/whoclosed/venv")
}

/// The venv's interpreter.
pub fn venv_python() -> PathBuf {
    venv_dir().join("bin/python3")
}

/// `tests/peers/`.
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// What is missing to run the grpc cases, or `None`.
pub fn grpc_missing() -> Option<String> {
    let py = venv_python();
    if !py.exists() {
        return Some(format!(
            "no Python venv at {} (set WHOCLOSED_VENV, or create it: python3 -m venv {} && \
             {}/bin/pip install -r {})",
            py.display(),
            venv_dir().display(),
            venv_dir().display(),
            peers_dir().join("requirements.txt").display()
        ));
    }
    match Command::new(&py)
        .args(["-c", "import grpc; print(grpc.__version__)"])
        .output()
    {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "{} cannot import grpc ({}): pip install '{GRPCIO_REQUIREMENT}' into {}",
            py.display(),
            String::from_utf8_lossy(&o.stderr).trim(),
            venv_dir().display()
        )),
        Err(e) => Some(format!("cannot run {}: {e}", py.display())),
    }
}

/// grpcio version in the venv (for messages), if importable.
pub fn grpc_version() -> Option<String> {
    let o = Command::new(venv_python())
        .args(["-c", "import grpc; print(grpc.__version__)"])
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// The nghttp2 programs among `progs` (`nghttpd`, `nghttp`, `h2load`) that are not on
/// `PATH`, as a message, or `None`.
pub fn nghttp2_missing(progs: &[&str]) -> Option<String> {
    let missing: Vec<&str> = progs
        .iter()
        .copied()
        .filter(|p| which(p).is_none())
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "{} not found on PATH (Debian package nghttp2-server / nghttp2-client)",
            missing.join(", ")
        )
    })
}

/// Everything the HTTP/2 cases need that is missing, or `None`.
pub fn h2_tools_missing() -> Option<String> {
    let v: Vec<String> = [
        grpc_missing(),
        nghttp2_missing(&["nghttpd", "nghttp", "h2load"]),
    ]
    .into_iter()
    .flatten()
    .collect();
    (!v.is_empty()).then(|| v.join("; "))
}

fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// `[::ffff:a.b.c.d]:p` -> `a.b.c.d:p`; anything else unchanged.
pub fn norm_addr(s: &str) -> String {
    if let Some(rest) = s.strip_prefix("[::ffff:") {
        if let Some((ip, port)) = rest.split_once("]:") {
            if ip.parse::<std::net::Ipv4Addr>().is_ok() {
                return format!("{ip}:{port}");
            }
        }
    }
    s.to_string()
}

/// grpc address syntax for a socket address (`10.241.2.2:50051`, `[fd00::2]:50051`).
fn grpc_target(addr: SocketAddr) -> String {
    addr.to_string()
}

fn opt_args<K: Display, V: Display>(opts: &[(K, V)]) -> Vec<String> {
    opts.iter()
        .flat_map(|(k, v)| ["--opt".to_string(), format!("{k}={v}")])
        .collect()
}

/// `grpc_server.py` in a namespace: methods `Peer` (returns the caller's address) and
/// `Slow` (sleeps, notices cancellation).
pub struct GrpcServer {
    pub proc: LineProc,
    /// The listening address.
    pub addr: SocketAddr,
}

/// Counters of a [`GrpcServer`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrpcServerStats {
    pub calls: u64,
    pub cancelled: u64,
    /// Client addresses seen (normalised, `10.241.1.2:41236`).
    pub peers: Vec<String>,
}

impl GrpcServer {
    /// Starts the server on `addr` with grpc server channel args `opts`
    /// (e.g. `[("grpc.max_connection_idle_ms", 1000)]`); returns once it listens.
    pub fn spawn<K: Display, V: Display>(
        ns: &str,
        addr: SocketAddr,
        opts: &[(K, V)],
    ) -> Result<GrpcServer> {
        let mut args = vec![
            peers_dir().join("grpc_server.py").display().to_string(),
            "--listen".into(),
            grpc_target(addr),
        ];
        args.extend(opt_args(opts));
        let mut proc = LineProc::spawn(&format!("grpc_server {addr}"), ns, &venv_python(), &args)?;
        proc.expect_line("listening", Duration::from_secs(30))?;
        Ok(GrpcServer { proc, addr })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn stats(&mut self) -> Result<GrpcServerStats> {
        let line = self.proc.command("stats", "stats", H2_PEER_TIMEOUT)?;
        let mut st = GrpcServerStats::default();
        for w in line.split_whitespace().skip(1) {
            match w.split_once('=') {
                Some(("calls", v)) => st.calls = v.parse()?,
                Some(("cancelled", v)) => st.cancelled = v.parse()?,
                Some(("peers", v)) => {
                    st.peers = v
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(norm_addr)
                        .collect()
                }
                _ => {}
            }
        }
        Ok(st)
    }

    /// Waits until `n` `Slow` calls noticed their cancellation.
    pub fn wait_cancelled(&mut self, n: u64, timeout: Duration) -> Result<()> {
        let ms = timeout.as_millis();
        self.proc
            .command(
                &format!("wait-cancelled {n} {ms}"),
                "cancelled",
                timeout + Duration::from_secs(5),
            )
            .map(drop)
    }

    /// `server.stop(grace)` and wait.
    pub fn stop(&mut self, grace: Duration) -> Result<()> {
        self.proc
            .command(
                &format!("stop {}", grace.as_millis()),
                "stopped",
                grace + H2_PEER_TIMEOUT,
            )
            .map(drop)
    }

    pub fn exit(&mut self) -> Result<()> {
        self.proc.exit()
    }
}

/// `grpc_client.py` in a namespace: one channel to a [`GrpcServer`].
pub struct GrpcClient {
    pub proc: LineProc,
    pub target: SocketAddr,
}

impl GrpcClient {
    /// Creates the channel (no connection yet) with grpc channel args `opts`.
    pub fn spawn<K: Display, V: Display>(
        ns: &str,
        target: SocketAddr,
        opts: &[(K, V)],
    ) -> Result<GrpcClient> {
        let mut args = vec![
            peers_dir().join("grpc_client.py").display().to_string(),
            "--target".into(),
            grpc_target(target),
        ];
        args.extend(opt_args(opts));
        let mut proc = LineProc::spawn(
            &format!("grpc_client -> {target}"),
            ns,
            &venv_python(),
            &args,
        )?;
        proc.expect_line("ready", Duration::from_secs(30))?;
        Ok(GrpcClient { proc, target })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// `n` unary calls; returns the client socket's address as the server saw it
    /// (normalised: `10.241.1.2:41236` / `[fd00:241:1::2]:41236`).
    pub fn call(&mut self, n: u32) -> Result<String> {
        let line = self
            .proc
            .command(&format!("call {n}"), "done", H2_PEER_TIMEOUT)?;
        let local = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("local="))
            .ok_or_else(|| anyhow!("no local= in {line:?}"))?;
        Ok(norm_addr(local))
    }

    /// Starts a `Slow(ms)` call, waits `after`, cancels it (client sends RST_STREAM CANCEL).
    pub fn slow_cancel(&mut self, ms: u64, after: Duration) -> Result<()> {
        self.proc
            .command(
                &format!("slow-cancel {ms} {}", after.as_millis()),
                "cancelled",
                after + H2_PEER_TIMEOUT,
            )
            .map(drop)
    }

    /// Current connectivity state (`IDLE`, `READY`, ...).
    pub fn state(&mut self) -> Result<String> {
        let line = self.proc.command("state", "state", H2_PEER_TIMEOUT)?;
        Ok(line.trim_start_matches("state ").to_string())
    }

    /// Waits until the channel is in one of `states`; returns the state reached.
    pub fn wait_state(&mut self, states: &[&str], timeout: Duration) -> Result<String> {
        let line = self.proc.command(
            &format!("wait-state {} {}", states.join(","), timeout.as_millis()),
            "state",
            timeout + Duration::from_secs(5),
        )?;
        Ok(line.trim_start_matches("state ").to_string())
    }

    /// `channel.close()`.
    pub fn close_channel(&mut self) -> Result<()> {
        self.proc
            .command("close", "closed", H2_PEER_TIMEOUT)
            .map(drop)
    }

    pub fn exit(&mut self) -> Result<()> {
        self.proc.exit()
    }
}

static DOCROOT_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A temporary docroot for nghttpd: `big` (sparse, `big_bytes` of zeros) and `small`
/// (`hello\n`). Removed on drop.
pub struct DocRoot {
    pub dir: PathBuf,
    pub big_bytes: u64,
}

impl DocRoot {
    pub fn new(big_bytes: u64) -> Result<DocRoot> {
        let n = DOCROOT_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("whoclosed-h2-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let d = DocRoot { dir, big_bytes };
        let f = std::fs::File::create(d.dir.join("big")).context("create big")?;
        f.set_len(big_bytes).context("size big")?;
        std::fs::write(d.dir.join("small"), b"hello\n").context("write small")?;
        Ok(d)
    }
}

impl Drop for DocRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `nghttpd --no-tls` serving a [`DocRoot`] inside a namespace. Killed on drop.
pub struct Nghttpd {
    child: Child,
    pub addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    dead: bool,
}

impl Nghttpd {
    /// Starts nghttpd on `addr` and waits until the port listens.
    pub fn spawn(ns: &str, addr: SocketAddr, docroot: &DocRoot) -> Result<Nghttpd> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "nghttpd", "--no-tls", "-d"])
            .arg(&docroot.dir)
            .args(["-a", &addr.ip().to_string(), &addr.port().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning nghttpd {addr} in {ns}"))?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let mut pipe = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            let mut buf = String::new();
            let _ = pipe.read_to_string(&mut buf);
            sink.lock().expect("stderr lock").push_str(&buf);
        });
        let mut d = Nghttpd {
            child,
            addr,
            stderr,
            dead: false,
        };
        let port = addr.port().to_string();
        let filter = format!("sport = :{port}");
        let res = wait_until(
            &format!("nghttpd listening on {addr} in {ns}"),
            Duration::from_secs(10),
            || {
                if let Some(st) = d.child.try_wait()? {
                    bail!(
                        "nghttpd exited ({st}): {}",
                        d.stderr.lock().map(|s| s.clone()).unwrap_or_default()
                    );
                }
                let out = crate::run_cmd("ip", &["netns", "exec", ns, "ss", "-Hltn", &filter])?;
                Ok(!out.trim().is_empty())
            },
        );
        if let Err(e) = res {
            d.kill();
            return Err(e);
        }
        Ok(d)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://<addr>/<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr)
    }

    fn kill(&mut self) {
        if !self.dead {
            // SAFETY: kill(2) on our own, not yet reaped, child (`ip netns exec` execs).
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    self.dead = true;
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.dead = true;
        }
    }

    /// Stops the server (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(mut self) {
        self.kill();
    }
}

impl Drop for Nghttpd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A finished client program.
#[derive(Debug)]
pub struct ToolRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `ip netns exec <ns> <prog> <args>` to completion, killing it after `timeout`.
pub fn run_in_ns_bounded(
    ns: &str,
    prog: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<ToolRun> {
    let cmdline = format!("ip netns exec {ns} {prog} {}", args.join(" "));
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, prog])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning `{cmdline}`"))?;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let t_out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        String::from_utf8_lossy(&b).into_owned()
    });
    let t_err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        String::from_utf8_lossy(&b).into_owned()
    });
    let deadline = started + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().context("waiting")? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let so = t_out.join().unwrap_or_default();
            let se = t_err.join().unwrap_or_default();
            bail!(
                "`{cmdline}` did not finish within {timeout:?}; killed\nstdout: {so}\nstderr: {se}"
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(ToolRun {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
        elapsed: started.elapsed(),
    })
}

/// `nghttp -n <url>` (download, discard) inside `ns`; fails on a non-zero exit.
pub fn nghttp_get(ns: &str, url: &str, timeout: Duration) -> Result<ToolRun> {
    let r = run_in_ns_bounded(ns, "nghttp", &["-n", url], timeout)?;
    if !r.status.success() {
        bail!(
            "nghttp -n {url} failed ({}): {}{}",
            r.status,
            r.stderr.trim(),
            r.stdout.trim()
        );
    }
    Ok(r)
}

/// `h2load -n <n> -c <c> <url>` inside `ns`; fails unless every request succeeded.
pub fn h2load(ns: &str, url: &str, n: u32, c: u32, timeout: Duration) -> Result<ToolRun> {
    let (ns_, cs) = (n.to_string(), c.to_string());
    let r = run_in_ns_bounded(ns, "h2load", &["-n", &ns_, "-c", &cs, url], timeout)?;
    let want = format!("{n} succeeded, 0 failed, 0 errored");
    if !r.status.success() || !r.stdout.contains(&want) {
        bail!(
            "h2load -n {n} -c {c} {url}: expected `{want}` ({}):\n{}{}",
            r.status,
            r.stdout.trim(),
            r.stderr.trim()
        );
    }
    Ok(r)
}

/// `tcpdump` writing a pcap inside a namespace (all interfaces, one TCP port). For
/// checking what the peers put on the wire; needs `tcpdump` and, to read it, `tshark`.
pub struct Capture {
    child: Child,
    pub path: PathBuf,
    stderr: Arc<Mutex<String>>,
    dead: bool,
}

/// Whether `tcpdump` and `tshark` are available (for [`Capture`] / [`wire_events`]).
pub fn capture_tools_missing() -> Option<String> {
    let missing: Vec<&str> = ["tcpdump", "tshark"]
        .into_iter()
        .filter(|p| which(p).is_none())
        .collect();
    (!missing.is_empty()).then(|| format!("{} not found on PATH", missing.join(", ")))
}

impl Capture {
    /// Starts `tcpdump -i any -w <path> tcp port <port>` in `ns`; returns once it listens.
    pub fn start(ns: &str, port: u16, path: &Path) -> Result<Capture> {
        let mut child = Command::new("ip")
            .args([
                "netns", "exec", ns, "tcpdump", "-i", "any", "-s", "0", "-B", "65536",
            ])
            .args(["--immediate-mode", "-U", "-w"])
            .arg(path)
            .args(["tcp", "port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning tcpdump in {ns}"))?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let pipe = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().expect("stderr lock");
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut c = Capture {
            child,
            path: path.to_path_buf(),
            stderr,
            dead: false,
        };
        let res = wait_until(
            &format!("tcpdump listening in {ns}"),
            Duration::from_secs(10),
            || {
                if let Some(st) = c.child.try_wait()? {
                    bail!("tcpdump exited ({st}): {}", c.stderr_text());
                }
                Ok(c.stderr_text().contains("listening on"))
            },
        );
        if let Err(e) = res {
            c.kill();
            return Err(e);
        }
        Ok(c)
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn kill(&mut self) {
        if !self.dead {
            // SAFETY: kill(2) on our own, not yet reaped, child (`ip netns exec` execs).
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    self.dead = true;
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.dead = true;
        }
    }

    /// Stops tcpdump (flushing the file) and returns the pcap path and tcpdump's summary.
    pub fn stop(mut self) -> (PathBuf, String) {
        // Give the last segments a moment to be written.
        std::thread::sleep(Duration::from_millis(200));
        self.kill();
        (self.path.clone(), self.stderr_text())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One thing seen on the wire, in capture order.
#[derive(Clone, Debug, PartialEq)]
pub struct WireEvent {
    /// Seconds since the first captured packet.
    pub at: f64,
    /// Sender IP address (as tshark prints it).
    pub from: String,
    pub kind: WireKind,
}

/// What [`WireEvent`] saw: TCP flags and the HTTP/2 control frames the agent parses.
#[derive(Clone, Debug, PartialEq)]
pub enum WireKind {
    Syn,
    Fin,
    Rst,
    Settings {
        ack: bool,
    },
    Ping {
        ack: bool,
    },
    Goaway {
        code: u32,
        last_stream_id: u32,
        debug: String,
    },
    RstStream {
        stream: u32,
        code: u32,
    },
    Headers {
        stream: u32,
        end_stream: bool,
    },
}

/// Reads `pcap` with tshark (port `port` decoded as HTTP/2) into [`WireEvent`]s. DATA,
/// WINDOW_UPDATE, PRIORITY frames are left out.
pub fn wire_events(pcap: &Path, port: u16) -> Result<Vec<WireEvent>> {
    let pcap_s = pcap.display().to_string();
    let decode = format!("tcp.port=={port},http2");
    let fields = [
        "frame.time_relative",
        "ip.src",
        "ipv6.src",
        "tcp.flags.str",
        "http2.type",
        "http2.flags",
        "http2.streamid",
        "http2.goaway.error",
        "http2.goaway.last_stream_id",
        "http2.goaway.addata",
        "http2.rst_stream.error",
    ];
    let mut args: Vec<&str> = vec!["-n", "-r", &pcap_s, "-d", &decode, "-T", "fields"];
    for f in &fields {
        args.push("-e");
        args.push(f);
    }
    args.extend(["-E", "separator=/t", "-E", "aggregator=;"]);
    let out = Command::new("tshark")
        .args(&args)
        .output()
        .context("running tshark")?;
    if !out.status.success() {
        bail!(
            "tshark -r {pcap_s} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut evs = Vec::new();
    for line in text.lines() {
        let col: Vec<&str> = line.split('\t').collect();
        let get = |i: usize| col.get(i).copied().unwrap_or("");
        let list = |i: usize| -> Vec<&str> {
            let s = get(i);
            if s.is_empty() {
                Vec::new()
            } else {
                s.split(';').collect()
            }
        };
        let at: f64 = get(0).parse().unwrap_or(0.0);
        let from = if get(1).is_empty() { get(2) } else { get(1) }.to_string();
        let ev = |kind| WireEvent {
            at,
            from: from.clone(),
            kind,
        };
        let flags = get(3);
        if flags.contains('S') {
            evs.push(ev(WireKind::Syn));
        }
        let (types, fl, sids) = (list(4), list(5), list(6));
        let (gerr, glsid, gdata, rerr) = (list(7), list(8), list(9), list(10));
        let (mut gi, mut ri) = (0, 0);
        for (i, ty) in types.iter().enumerate() {
            let f = fl.get(i).map(|s| parse_num(s)).unwrap_or(0);
            let sid = sids.get(i).map(|s| parse_num(s)).unwrap_or(0);
            match *ty {
                "1" => evs.push(ev(WireKind::Headers {
                    stream: sid,
                    end_stream: f & 1 != 0,
                })),
                "3" => {
                    let code = rerr.get(ri).map(|s| parse_num(s)).unwrap_or(u32::MAX);
                    ri += 1;
                    evs.push(ev(WireKind::RstStream { stream: sid, code }));
                }
                "4" => evs.push(ev(WireKind::Settings { ack: f & 1 != 0 })),
                "6" => evs.push(ev(WireKind::Ping { ack: f & 1 != 0 })),
                "7" => {
                    let code = gerr.get(gi).map(|s| parse_num(s)).unwrap_or(u32::MAX);
                    let last_stream_id = glsid.get(gi).map(|s| parse_num(s)).unwrap_or(0);
                    let debug = gdata.get(gi).map(|s| unhex(s)).unwrap_or_default();
                    gi += 1;
                    evs.push(ev(WireKind::Goaway {
                        code,
                        last_stream_id,
                        debug,
                    }));
                }
                _ => {}
            }
        }
        if flags.contains('F') {
            evs.push(ev(WireKind::Fin));
        }
        if flags.contains('R') {
            evs.push(ev(WireKind::Rst));
        }
    }
    Ok(evs)
}

fn parse_num(s: &str) -> u32 {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).unwrap_or(u32::MAX),
        None => s.parse().unwrap_or(u32::MAX),
    }
}

fn unhex(s: &str) -> String {
    let h: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    let bytes: Vec<u8> = (0..h.len() / 2)
        .filter_map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::norm_addr;

    #[test]
    fn mapped_addresses_fold() {
        assert_eq!(norm_addr("[::ffff:10.241.1.2]:41236"), "10.241.1.2:41236");
        assert_eq!(norm_addr("10.241.1.2:41236"), "10.241.1.2:41236");
        assert_eq!(norm_addr("[fd00:241:1::2]:5"), "[fd00:241:1::2]:5");
        assert_eq!(norm_addr("[::ffff:1:2]:5"), "[::ffff:1:2]:5");
    }

    #[test]
    fn hex_and_numbers() {
        assert_eq!(super::unhex("6d61785f616765"), "max_age");
        assert_eq!(super::unhex("6d:61"), "ma");
        assert_eq!(super::parse_num("0x0b"), 11);
        assert_eq!(super::parse_num("2147483647"), 2147483647);
    }
}
