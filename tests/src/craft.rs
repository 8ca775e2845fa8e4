//! An on-path packet crafter (`tests/peers/spoof.py`, standard-library Python) running in
//! the router namespace of a [`Topology`](crate::Topology): it watches the server -> client
//! direction on the router's client-side device, so it knows the client socket's `rcv_nxt`,
//! and forges segments that claim to come from the server.

use crate::lineproc::LineProc;
use anyhow::{Context, Result, anyhow};
use std::path::{Path, PathBuf};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(10);

/// The crafter process. Killed on drop.
pub struct Spoofer {
    proc: LineProc,
}

/// `tests/peers/spoof.py`.
pub fn spoof_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/spoof.py")
}

impl Spoofer {
    /// Starts the crafter in `router_ns`, watching `iface` for segments from
    /// `server_ip:server_port`.
    pub fn start(router_ns: &str, iface: &str, server_ip: &str, server_port: u16) -> Result<Self> {
        let args = [
            spoof_script().display().to_string(),
            iface.to_string(),
            server_ip.to_string(),
            server_port.to_string(),
        ];
        let mut proc = LineProc::spawn("spoof.py", router_ns, Path::new("python3"), &args)
            .context("starting the packet crafter")?;
        proc.expect_line("ready", TIMEOUT)?;
        Ok(Spoofer { proc })
    }

    /// The client's `rcv_nxt` as the crafter derived it.
    pub fn rcv_nxt(&mut self) -> Result<u32> {
        let line = self.proc.command("state", "state", TIMEOUT)?;
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("rcv_nxt="))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("bad state line {line:?}"))
    }

    /// Forges one segment server -> client at `rcv_nxt + delta` with TCP `flags` (letters
    /// of `FSRPA`), IP `ttl` and `payload_hex`.
    pub fn inject(&mut self, flags: &str, delta: u32, ttl: u8, payload_hex: &str) -> Result<()> {
        let cmd = format!("inject {flags} {delta:#x} {ttl} {payload_hex}");
        self.proc
            .command(cmd.trim_end(), "injected", TIMEOUT)
            .map(drop)
    }

    /// `n` RSTs at sequence numbers that are never `rcv_nxt`.
    pub fn flood_rst(&mut self, n: usize) -> Result<()> {
        self.proc
            .command(&format!("flood {n}"), "flooded", TIMEOUT)
            .map(drop)
    }

    pub fn exit(&mut self) -> Result<()> {
        self.proc.exit()
    }
}
