//! End-to-end harness for the whoclosed agent.
//!
//! * [`Topology`]: client / router / server network namespaces joined by veth pairs,
//!   IPv4 + IPv6, forwarding in the router; removed again on drop.
//! * [`Agent`]: runs `whoclosed trace ...`, collects its NDJSON output, waits for objects.
//! * [`Peer`]: drives the `wc-peer` helper binary (one process per TCP end) inside a
//!   namespace, line by line.
//! * [`h2peers`]: HTTP/2 peers (grpcio scripts in `tests/peers/`, nghttp2 tools).
//! * [`h2e2e`]: the HTTP/2 scenarios and their checks, shared by `tests/e2e_h2.rs` (with
//!   the agent) and `tests/h2_wire.rs` (tcpdump + tshark, without it).
//!
//! Everything needs root; see [`should_run`] for the skip policy (`WHOCLOSED_E2E=require`).

mod agent;
mod check;
pub mod craft;
pub mod h2e2e;
pub mod h2peers;
mod lineproc;
pub mod middlebox;
mod peer;
pub mod recording;
mod topology;

pub use agent::{Agent, AgentExit, READY_TIMEOUT, STOP_TIMEOUT, agent_bin, default_trace_args};
pub use check::{Expect, PEER_COMM, PidCheck, check_close, check_peer_link};
pub use h2peers::{
    DocRoot, GrpcClient, GrpcServer, Nghttpd, h2_tools_missing, h2load, nghttp_get, norm_addr,
};
pub use peer::{PEER_TIMEOUT, Peer};
pub use topology::{AddrPlan, Topology, netns_inode};

use anyhow::{Result, bail};
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

/// True when running as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a privileged test should run. Not root: skip with a message, unless
/// `WHOCLOSED_E2E=require`, in which case this panics.
pub fn should_run(test: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var("WHOCLOSED_E2E").as_deref() == Ok("require") {
        panic!("{test}: WHOCLOSED_E2E=require but not running as root (euid != 0)");
    }
    // Straight to fd 2, not eprintln!, so libtest's output capture doesn't hide it.
    let _ = writeln!(
        std::io::stderr(),
        "SKIP {test}: needs root (network namespaces, eBPF); run as root or set \
         WHOCLOSED_E2E=require to make this a failure"
    );
    false
}

/// Runs a command to completion; errors carry the command line, status and stderr.
pub fn run_cmd(prog: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run `{prog} {}`: {e}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{prog} {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `cond` until it returns true or `timeout` passes (for kernel state that has no
/// event to wait on, e.g. link carrier / DAD). `what` names the condition in the error.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
