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

mod capture;
mod grpc;
mod nghttp2;

pub use capture::{Capture, WireEvent, WireKind, capture_tools_missing, wire_events};
pub use grpc::{GrpcClient, GrpcServer, GrpcServerStats};
pub use nghttp2::{DocRoot, Nghttpd, ToolRun, h2load, nghttp_get, run_in_ns_bounded};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

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
}
