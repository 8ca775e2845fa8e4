//! Driver for the `wc-peer` helper (see `src/bin/wc-peer.rs` for the line protocol).

use anyhow::{Context, Result, anyhow, bail};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Default bound for one request/response exchange.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// One TCP endpoint: a `wc-peer` process inside a network namespace.
pub struct Peer {
    name: String,
    ns: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    stderr_done: Receiver<()>,
    pid: u32,
    /// `listen`: the listening address; `connect`: the connected socket's local address.
    pub local: SocketAddr,
    transcript: Vec<String>,
    dead: bool,
}

impl Peer {
    /// `ip netns exec <ns> <bin> listen <addr>`; returns once `listening` was printed.
    pub fn listen(bin: &Path, ns: &str, addr: SocketAddr) -> Result<Peer> {
        let mut p = Self::spawn(bin, ns, "listen", addr)?;
        let line = p.expect_line("listening", PEER_TIMEOUT)?;
        p.local = parse_addr(&line, "listening")?;
        Ok(p)
    }

    /// `ip netns exec <ns> <bin> connect <addr>`; returns once `connected` was printed.
    pub fn connect(bin: &Path, ns: &str, addr: SocketAddr) -> Result<Peer> {
        let mut p = Self::spawn(bin, ns, "connect", addr)?;
        let line = p.expect_line("connected", Duration::from_secs(30))?;
        p.local = parse_addr(&line, "connected")?;
        Ok(p)
    }

    fn spawn(bin: &Path, ns: &str, mode: &str, addr: SocketAddr) -> Result<Peer> {
        if !bin.exists() {
            bail!("wc-peer binary not found at {}", bin.display());
        }
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin)
            .args([mode, &addr.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning wc-peer {mode} {addr} in {ns}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let (done_tx, stderr_done) = channel::<()>();
        std::thread::spawn(move || {
            let _done = done_tx; // dropped (disconnecting `stderr_done`) at stderr EOF
            let mut buf = String::new();
            let _ = BufReader::new(stderr_pipe).read_to_string(&mut buf);
            sink.lock().expect("stderr lock").push_str(&buf);
        });
        let mut p = Peer {
            name: format!("wc-peer {mode} {addr} in {ns}"),
            ns: ns.to_string(),
            stdin: child.stdin.take(),
            child,
            lines: rx,
            stderr,
            stderr_done,
            pid: 0,
            local: addr,
            transcript: Vec::new(),
            dead: false,
        };
        let line = p.expect_line("pid", PEER_TIMEOUT)?;
        p.pid = line
            .strip_prefix("pid ")
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| anyhow!("{}: bad pid line {line:?}", p.name))?;
        Ok(p)
    }

    /// Pid of the wc-peer process itself (as printed by it; `ip netns exec` execs).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Next output line, bounded by `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Result<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => {
                self.transcript.push(format!("< {l}"));
                Ok(l)
            }
            Err(RecvTimeoutError::Timeout) => {
                Err(self.fail(&format!("no output within {timeout:?}")))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let _ = self.stderr_done.recv_timeout(Duration::from_secs(2));
                Err(self.fail("process closed its stdout (exited?)"))
            }
        }
    }

    /// Next line must start with `word`; an `error ...` (or anything else) fails.
    pub fn expect_line(&mut self, word: &str, timeout: Duration) -> Result<String> {
        let line = self.next_line(timeout)?;
        if line == word || line.starts_with(&format!("{word} ")) {
            Ok(line)
        } else {
            Err(self.fail(&format!("expected `{word} ...`, got {line:?}")))
        }
    }

    /// Sends one command line and returns the raw response line (may be `error ...`).
    pub fn request(&mut self, cmd: &str, timeout: Duration) -> Result<String> {
        self.transcript.push(format!("> {cmd}"));
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("stdin already closed"))?;
        if let Err(e) = writeln!(stdin, "{cmd}").and_then(|_| stdin.flush()) {
            return Err(self.fail(&format!("writing command {cmd:?}: {e}")));
        }
        self.next_line(timeout)
    }

    /// Sends `cmd`; the response must start with `word`.
    pub fn command(&mut self, cmd: &str, word: &str, timeout: Duration) -> Result<String> {
        let line = self.request(cmd, timeout)?;
        if line == word || line.starts_with(&format!("{word} ")) {
            Ok(line)
        } else {
            Err(self.fail(&format!("`{cmd}`: expected `{word} ...`, got {line:?}")))
        }
    }

    /// Sends `cmd`; the response must be `error ...` mentioning `needle` (case-insensitive).
    /// Returns the error line.
    pub fn expect_error(&mut self, cmd: &str, needle: &str, timeout: Duration) -> Result<String> {
        let line = self.request(cmd, timeout)?;
        if line.starts_with("error ") && line.to_lowercase().contains(&needle.to_lowercase()) {
            Ok(line)
        } else {
            Err(self.fail(&format!(
                "`{cmd}`: expected `error ...{needle}...`, got {line:?}"
            )))
        }
    }

    /// For a listener: waits for `accepted <peer>` and returns the peer address.
    pub fn wait_accepted(&mut self, timeout: Duration) -> Result<SocketAddr> {
        let line = self.expect_line("accepted", timeout)?;
        parse_addr(&line, "accepted")
    }

    pub fn send(&mut self, n: usize) -> Result<()> {
        self.command(&format!("send {n}"), "sent", PEER_TIMEOUT)
            .map(drop)
    }
    pub fn read(&mut self, n: usize) -> Result<()> {
        self.command(&format!("read {n}"), "read", PEER_TIMEOUT)
            .map(drop)
    }
    pub fn wait_eof(&mut self) -> Result<()> {
        self.command("wait-eof", "eof", PEER_TIMEOUT).map(drop)
    }
    pub fn shutdown(&mut self) -> Result<()> {
        self.command("shutdown", "shutdown", PEER_TIMEOUT).map(drop)
    }
    pub fn close(&mut self) -> Result<()> {
        self.command("close", "closed", PEER_TIMEOUT).map(drop)
    }
    pub fn abort(&mut self) -> Result<()> {
        self.command("abort", "aborted", PEER_TIMEOUT).map(drop)
    }
    /// Waits until at least `n` bytes sit unread in the socket's receive queue.
    pub fn wait_recvq(&mut self, n: usize) -> Result<()> {
        self.command(&format!("wait-recvq {n} 10000"), "recvq", PEER_TIMEOUT)
            .map(drop)
    }
    /// `exit` and wait for the process.
    pub fn exit(&mut self) -> Result<()> {
        self.command("exit", "bye", PEER_TIMEOUT)?;
        self.reap();
        Ok(())
    }

    /// `kill -9` the wc-peer process and reap it.
    pub fn kill9(&mut self) -> Result<()> {
        // SAFETY: plain kill(2) on a pid we spawned and have not reaped yet.
        if unsafe { libc::kill(self.pid as i32, libc::SIGKILL) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(self.fail(&format!("kill -9 {}: {e}", self.pid)));
        }
        self.reap();
        Ok(())
    }

    fn reap(&mut self) {
        if !self.dead {
            self.stdin = None;
            let _ = self.child.wait();
            self.dead = true;
        }
    }

    fn fail(&self, what: &str) -> anyhow::Error {
        let stderr = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        anyhow!(
            "{} (pid {}): {what}\ntranscript:\n  {}\nstderr: {}",
            self.name,
            self.pid,
            self.transcript.join("\n  "),
            stderr.trim()
        )
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if !self.dead {
            if self.pid != 0 {
                // SAFETY: kill(2) on the peer we spawned (not reaped yet, pid still ours).
                unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
            }
            let _ = self.child.kill();
            self.reap();
        }
    }
}

fn parse_addr(line: &str, word: &str) -> Result<SocketAddr> {
    line.strip_prefix(word)
        .map(str::trim)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("cannot parse address from {line:?}"))
}
