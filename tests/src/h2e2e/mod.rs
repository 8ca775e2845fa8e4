//! Building blocks of the HTTP/2 end-to-end cases (`tests/tests/e2e_h2.rs`) and of their
//! wire cross-checks (`tests/tests/h2_wire.rs`):
//!
//! * this module: the gates (root, agent binary, peers; skip with the reason) and the
//!   agent's start/stop;
//! * [`grpc`]: the grpcio scenarios and what each one's close objects must say;
//! * [`nghttp`]: the nghttp2 scenarios (nghttpd + nghttp / h2load) and their checks;
//! * [`plain`]: the non-HTTP/2 control case;
//! * [`verdict`]: finding close objects in the agent's output and asserting on them;
//! * [`wire`]: the same scenarios without the agent, captured with tcpdump and read back
//!   with tshark, to pin what the peers put on the wire.

pub mod frames;
pub mod grpc;
pub mod nghttp;
pub mod plain;
pub mod verdict;
pub mod wire;

use crate::h2peers::{GRPCIO_VERSION, grpc_missing, grpc_version, nghttp2_missing};
use crate::{Agent, Topology, agent_bin, should_run};
use std::io::Write;
use std::time::Duration;

/// Port of the grpc server.
pub const GRPC_PORT: u16 = 50051;
/// Port of nghttpd.
pub const HTTP_PORT: u16 = 8080;
/// Port of the plain TCP (not HTTP/2) case.
pub const TCP_PORT: u16 = 8081;
/// Bound for a close object to show up (linger is 300 ms).
pub const VERDICT_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound for a grpc channel to notice the server's GOAWAY / its own keepalive failure.
pub const CHANNEL_TIMEOUT: Duration = Duration::from_secs(20);

/// Set by `cargo xtask vm test` in the guest, which carries no Python (see [`Need::Grpc`]).
pub const IN_VM_ENV: &str = "WHOCLOSED_IN_VM";

/// Which external peers a case needs.
#[derive(Clone, Copy)]
pub enum Need {
    /// Python grpcio in the venv. Host-only: the QEMU guests of `cargo xtask vm` carry no
    /// Python, so there these cases skip (even under `WHOCLOSED_E2E=require`).
    Grpc,
    /// These nghttp2 programs on `PATH`.
    Nghttp2(&'static [&'static str]),
    Nothing,
}

/// Why the grpc cases do not run in the VMs (the skip message there).
pub const GRPC_HOST_ONLY: &str = "grpcio cases are host-only: the `cargo xtask vm` guest \
    carries no Python (python3, its standard library and grpcio would add 50 to 100 MB, \
    with the interpreter, to the initramfs of every HTTP/2 boot, and six Python-peer \
    cases to a boot that `vm ci` keeps short); the in-kernel HTTP/2 walker is exercised there by the nghttp2 cases, \
    and these cases run on the host (`cargo xtask test`); see docs/kernel-support.md";

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

/// Straight to fd 2 (not eprintln!), so libtest's output capture doesn't hide it. The
/// `SKIP <test>:` prefix is what `cargo xtask vm` looks for to report a case as skipped.
fn say_skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
}

/// Missing peers: the reason, and whether that is a deliberate skip even under
/// `WHOCLOSED_E2E=require` (grpc in a VM guest).
fn gate_peers(test: &str, need: Need) -> bool {
    let Some(why) = missing(need) else {
        return true;
    };
    if matches!(need, Need::Grpc) && std::env::var_os(IN_VM_ENV).is_some() {
        say_skip(test, &format!("{GRPC_HOST_ONLY}; here: {why}"));
        return false;
    }
    skip(test, &why)
}

/// Gate of the agent cases: root, agent binary, peers.
pub fn prelude(test: &str, need: Need) -> bool {
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
    gate_peers(test, need)
}

/// Gate of the wire self-checks: root, peers, tcpdump + tshark (always just skipped
/// when those two are missing: they are developer tools, not test dependencies).
pub fn wire_prelude(test: &str, need: Need) -> bool {
    if !should_run(test) {
        return false;
    }
    if let Some(why) = crate::h2peers::capture_tools_missing() {
        say_skip(test, &why);
        return false;
    }
    gate_peers(test, need)
}

/// Starts the agent on the topology's namespaces; panics with the cause.
pub fn start_agent(t: &Topology) -> Agent {
    let inodes = t.inodes().unwrap_or_else(|e| panic!("netns inodes: {e:#}"));
    match Agent::start(&inodes) {
        Ok(a) => a,
        Err(e) => panic!("starting the agent: {e:#}"),
    }
}

/// Stops the agent; panics if it did not exit cleanly.
pub fn stop(mut agent: Agent) {
    if let Err(e) = agent.stop() {
        panic!("stopping the agent: {e:#}");
    }
}
