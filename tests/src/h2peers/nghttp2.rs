//! The nghttp2 peers: `nghttpd` serving a [`DocRoot`], `nghttp` and `h2load` fetching.

use crate::wait_until;
use anyhow::{Context, Result, bail};
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
