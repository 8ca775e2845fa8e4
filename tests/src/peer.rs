//! Driver for the `wc-peer` helper (see `src/bin/wc-peer.rs` for the line protocol).

use crate::lineproc::LineProc;
use anyhow::{Result, anyhow, bail};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Default bound for one request/response exchange.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// One TCP endpoint: a `wc-peer` process inside a network namespace.
pub struct Peer {
    proc: LineProc,
    ns: String,
    /// `listen`: the listening address; `connect`: the connected socket's local address.
    pub local: SocketAddr,
}

impl Peer {
    /// `ip netns exec <ns> <bin> listen <addr>`; returns once `listening` was printed.
    pub fn listen(bin: &Path, ns: &str, addr: SocketAddr) -> Result<Peer> {
        let mut p = Self::spawn(bin, ns, "listen", addr)?;
        let line = p.expect_line("listening", PEER_TIMEOUT)?;
        p.local = parse_addr(&line, "listening")?;
        Ok(p)
    }

    /// `ip netns exec <ns> <bin> churn <addr>`: a listener that connects to itself on
    /// `churn <n> <k>` commands; returns once `listening` was printed.
    pub fn churn(bin: &Path, ns: &str, addr: SocketAddr) -> Result<Peer> {
        let mut p = Self::spawn(bin, ns, "churn", addr)?;
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

    /// As [`Peer::listen`], the process moved into the cgroup v2 directory `cgroup` before
    /// it makes its socket (so the accepted socket belongs to that cgroup too). The move is
    /// made from here: inside `ip netns exec` the cgroup mounts are not there.
    pub fn listen_in_cgroup(bin: &Path, ns: &str, addr: SocketAddr, cgroup: &Path) -> Result<Peer> {
        let hold: &std::ffi::OsStr = "1".as_ref();
        let mut p = Self::spawn_env(bin, ns, "listen", addr, &[("WC_PEER_HOLD", hold)])?;
        let procs = cgroup.join("cgroup.procs");
        std::fs::write(&procs, p.pid().to_string())
            .map_err(|e| anyhow!("moving wc-peer into {}: {e}", procs.display()))?;
        let line = p.request("go", PEER_TIMEOUT)?;
        p.local = parse_addr(&line, "listening")?;
        Ok(p)
    }

    fn spawn(bin: &Path, ns: &str, mode: &str, addr: SocketAddr) -> Result<Peer> {
        Self::spawn_env(bin, ns, mode, addr, &[])
    }

    fn spawn_env(
        bin: &Path,
        ns: &str,
        mode: &str,
        addr: SocketAddr,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Peer> {
        if !bin.exists() {
            bail!("wc-peer binary not found at {}", bin.display());
        }
        let args = [mode.to_string(), addr.to_string()];
        let proc =
            LineProc::spawn_with_env(&format!("wc-peer {mode} {addr}"), ns, bin, &args, env)?;
        Ok(Peer {
            proc,
            ns: ns.to_string(),
            local: addr,
        })
    }

    /// Pid of the wc-peer process itself (as printed by it; `ip netns exec` execs).
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Next output line, bounded by `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Result<String> {
        self.proc.next_line(timeout)
    }

    /// Next line must start with `word`; an `error ...` (or anything else) fails.
    pub fn expect_line(&mut self, word: &str, timeout: Duration) -> Result<String> {
        self.proc.expect_line(word, timeout)
    }

    /// Sends one command line and returns the raw response line (may be `error ...`).
    pub fn request(&mut self, cmd: &str, timeout: Duration) -> Result<String> {
        self.proc.request(cmd, timeout)
    }

    /// Sends `cmd`; the response must start with `word`.
    pub fn command(&mut self, cmd: &str, word: &str, timeout: Duration) -> Result<String> {
        self.proc.command(cmd, word, timeout)
    }

    /// Sends `cmd`; the response must be `error ...` mentioning `needle` (case-insensitive).
    /// Returns the error line.
    pub fn expect_error(&mut self, cmd: &str, needle: &str, timeout: Duration) -> Result<String> {
        let line = self.request(cmd, timeout)?;
        if line.starts_with("error ") && line.to_lowercase().contains(&needle.to_lowercase()) {
            Ok(line)
        } else {
            Err(self.proc.fail(&format!(
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

    /// Writes exact bytes, given as hex, in one `write`.
    pub fn send_hex(&mut self, hex: &str) -> Result<()> {
        self.command(&format!("sendhex {hex}"), "sent", PEER_TIMEOUT)
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
        self.proc.exit()
    }

    /// `kill -9` the wc-peer process and reap it.
    pub fn kill9(&mut self) -> Result<()> {
        self.proc.kill9()
    }
}

fn parse_addr(line: &str, word: &str) -> Result<SocketAddr> {
    line.strip_prefix(word)
        .map(str::trim)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("cannot parse address from {line:?}"))
}
