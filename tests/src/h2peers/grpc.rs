//! The grpcio peers: `tests/peers/grpc_server.py` and `grpc_client.py`, line-driven.

use super::{H2_PEER_TIMEOUT, norm_addr, peers_dir, venv_python};
use crate::lineproc::LineProc;
use anyhow::{Result, anyhow};
use std::fmt::Display;
use std::net::SocketAddr;
use std::time::Duration;

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

    /// Waits until the channel, once reported READY, has left it (`IDLE`,
    /// `TRANSIENT_FAILURE` or `SHUTDOWN`); returns the state reached. grpcio reports states
    /// on a thread of its own and late: right after a call the last state delivered can
    /// still be the initial `IDLE`, so "wait for IDLE" alone can return at once.
    pub fn wait_down(&mut self, timeout: Duration) -> Result<String> {
        let line = self.proc.command(
            &format!("wait-down {}", timeout.as_millis()),
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
