//! Middleboxes for the end-to-end tests: a real haproxy (TCP mode) run inside a test
//! namespace with its own configuration, and the calibration check that no `high`
//! verdict contradicts what a case knows to be true.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{run_cmd, wait_until};

/// A haproxy process in TCP mode listening on `bind` (inside `ns`) and forwarding to
/// `backend`, with the given idle timeouts. Killed (and its config removed) on drop.
pub struct Haproxy {
    child: Child,
    dir: PathBuf,
    pub bind: SocketAddr,
    pid: u32,
}

/// `haproxy` is installed (Debian package `haproxy`).
pub fn haproxy_missing() -> Option<String> {
    match Command::new("haproxy").arg("-v").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("haproxy not found (apt-get install haproxy, or `cargo xtask setup`)".into()),
    }
}

/// The configuration: one frontend, one backend, `timeout client/server` = `idle`.
pub fn haproxy_config(bind: SocketAddr, backend: SocketAddr, idle: Duration) -> String {
    let ms = idle.as_millis();
    format!(
        "global\n    maxconn 64\n    nbthread 1\n\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client {ms}ms\n    \
         timeout server {ms}ms\n\n\
         frontend fe\n    bind {bind}\n    default_backend be\n\n\
         backend be\n    server s1 {backend}\n"
    )
}

impl Haproxy {
    /// Starts `haproxy -db -f <config>` in `ns`; returns once it listens on `bind`.
    pub fn start(ns: &str, bind: SocketAddr, backend: SocketAddr, idle: Duration) -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("wc-haproxy-{}-{}", std::process::id(), bind.port()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, haproxy_config(bind, backend, idle))
            .with_context(|| format!("writing {}", cfg.display()))?;
        let log = std::fs::File::create(dir.join("haproxy.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "haproxy", "-db", "-f"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning haproxy in {ns}"))?;
        // `ip netns exec` execs, so the child's pid is haproxy's.
        let pid = child.id();
        let mut h = Haproxy {
            child,
            dir,
            bind,
            pid,
        };
        let log = h.dir.join("haproxy.log");
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        listening(ns, bind, Some(("haproxy", &mut h.child)), &read_log)?;
        Ok(h)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What haproxy printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An nginx (single process, `master_process off`) in `ns` terminating HTTP/2 on `bind`
/// and passing gRPC to `backend` (`grpc_pass`), with `keepalive_timeout` = `idle` (for
/// HTTP/2 the idle timeout that ends a connection with GOAWAY). Killed on drop.
pub struct Nginx {
    child: Child,
    dir: PathBuf,
    pub bind: SocketAddr,
    pid: u32,
}

/// `nginx` is installed (Debian package `nginx`).
pub fn nginx_missing() -> Option<String> {
    match Command::new("nginx").arg("-v").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("nginx not found (apt-get install nginx, or `cargo xtask setup`)".into()),
    }
}

/// The configuration of [`Nginx`], every path inside `dir`.
pub fn nginx_config(
    dir: &std::path::Path,
    bind: SocketAddr,
    backend: SocketAddr,
    idle: Duration,
) -> String {
    let d = dir.display();
    let ms = idle.as_millis();
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log info;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n    access_log off;\n\
             client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n\
             scgi_temp_path {d}/scgi;\n\
             server {{\n        listen {bind} http2;\n        keepalive_timeout {ms}ms;\n\
                 location / {{ grpc_pass grpc://{backend}; }}\n    }}\n}}\n"
    )
}

impl Nginx {
    /// Starts nginx in `ns`; returns once it listens on `bind`.
    pub fn start(ns: &str, bind: SocketAddr, backend: SocketAddr, idle: Duration) -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("wc-nginx-{}-{}", std::process::id(), bind.port()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let cfg = dir.join("nginx.conf");
        std::fs::write(&cfg, nginx_config(&dir, bind, backend, idle))
            .with_context(|| format!("writing {}", cfg.display()))?;
        let log = std::fs::File::create(dir.join("stderr.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "nginx", "-e"])
            .arg(dir.join("error.log"))
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning nginx in {ns}"))?;
        let pid = child.id();
        let mut n = Nginx {
            child,
            dir,
            bind,
            pid,
        };
        let dir = n.dir.clone();
        let read_log = || nginx_log(&dir);
        listening(ns, bind, Some(("nginx", &mut n.child)), &read_log)?;
        Ok(n)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its stderr and error log so far.
    pub fn log(&self) -> String {
        nginx_log(&self.dir)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nginx_log(dir: &std::path::Path) -> String {
    let r = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    format!("{}{}", r("stderr.log"), r("error.log"))
}

/// Waits until something in `ns` listens on `addr` (TCP).
pub fn wait_listening(ns: &str, addr: SocketAddr) -> Result<()> {
    listening(ns, addr, None, &String::new)
}

/// Waits until something in `ns` listens on `addr`; with a named child process, fails as
/// soon as it exits instead. Errors carry `log()`.
fn listening(
    ns: &str,
    addr: SocketAddr,
    mut child: Option<(&str, &mut std::process::Child)>,
    log: &dyn Fn() -> String,
) -> Result<()> {
    let want = addr.to_string();
    let what = child.as_ref().map_or("a listener", |(name, _)| *name);
    wait_until(
        &format!("{what} listening on {addr} in {ns}"),
        Duration::from_secs(10),
        || {
            if let Some((name, c)) = child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!("{name} exited ({st}): {}", log());
                }
            }
            let out = run_cmd("ip", &["netns", "exec", ns, "ss", "-Hltn"])?;
            Ok(out.split_whitespace().any(|w| w == want))
        },
    )
    .with_context(log)
}

/// A throwaway self-signed P-256 certificate and key in `dir` (`cert.pem`, `key.pem`).
pub fn self_signed_cert(dir: &std::path::Path) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    run_cmd(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &k,
            "-out",
            &c,
            "-days",
            "1",
            "-subj",
            "/CN=wc-test",
        ],
    )?;
    Ok((cert, key))
}

/// What a case knows to be true about who ended its connections.
#[derive(Clone, Copy, Debug)]
pub struct Truth {
    /// `closed_by` every socket of the case must show when it says `high`.
    pub closed_by: &'static str,
    /// When set, a `high` middlebox verdict must also name this process.
    pub middlebox_pid: Option<u32>,
}

/// Calibration: among `objects` (everything an agent printed), every close object whose
/// `conn.netns` is one of `netns` and that says `confidence: high` must agree with `truth`.
/// Returns how many high verdicts were checked.
pub fn check_calibrated(objects: &[Value], netns: &[u64], truth: Truth) -> Result<usize> {
    let mut bad = Vec::new();
    let mut checked = 0;
    for o in objects {
        if o["type"] != "close"
            || !netns
                .iter()
                .any(|n| o["conn"]["netns"].as_u64() == Some(*n))
            || o["verdict"]["confidence"] != "high"
        {
            continue;
        }
        checked += 1;
        if o["verdict"]["closed_by"] != truth.closed_by {
            bad.push(format!(
                "high verdict closed_by {} (truth: {}): {o}",
                o["verdict"]["closed_by"], truth.closed_by
            ));
            continue;
        }
        if let Some(pid) = truth.middlebox_pid {
            if o["verdict"]["middlebox"]["pid"].as_u64() != Some(u64::from(pid)) {
                bad.push(format!(
                    "high middlebox verdict does not name pid {pid}: {o}"
                ));
            }
        }
    }
    if !bad.is_empty() {
        bail!("{} wrong high verdict(s):\n{}", bad.len(), bad.join("\n"));
    }
    Ok(checked)
}
