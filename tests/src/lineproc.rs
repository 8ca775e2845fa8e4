//! A line-protocol child process run inside a network namespace: it prints `pid <n>`
//! first, then one response line per command line it reads. Used for wc-peer and for the
//! Python gRPC peers; every wait is bounded and every error carries the transcript.

use anyhow::{Context, Result, anyhow};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Bound for the `pid` line and the `exit` exchange.
const LINE_TIMEOUT: Duration = Duration::from_secs(15);
const STDERR_KEEP: usize = 64 * 1024;

/// A line-protocol child process inside a namespace (`pid <n>` first, then one response
/// line per command). Killed on drop.
pub struct LineProc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    stderr_done: Receiver<()>,
    pid: u32,
    transcript: Vec<String>,
    dead: bool,
}

impl LineProc {
    /// `ip netns exec <ns> <prog> <args...>`; returns once `pid <n>` was printed.
    pub fn spawn(name: &str, ns: &str, prog: &Path, args: &[String]) -> Result<LineProc> {
        Self::spawn_with_env(name, ns, prog, args, &[])
    }

    /// As [`LineProc::spawn`], with `env` added to the program's environment.
    pub fn spawn_with_env(
        name: &str,
        ns: &str,
        prog: &Path,
        args: &[String],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<LineProc> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(prog)
            .args(args)
            .envs(env.iter().copied())
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {name} in {ns}"))?;
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
        let (stderr, stderr_done) = capture_stderr(stderr_pipe, name.to_string());
        let mut p = LineProc {
            name: format!("{name} in {ns}"),
            stdin: child.stdin.take(),
            child,
            lines: rx,
            stderr,
            stderr_done,
            pid: 0,
            transcript: Vec::new(),
            dead: false,
        };
        let line = p.expect_line("pid", LINE_TIMEOUT)?;
        p.pid = line
            .strip_prefix("pid ")
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| anyhow!("{}: bad pid line {line:?}", p.name))?;
        Ok(p)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Next stdout line, bounded by `timeout`.
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

    /// Next line must be `word` or start with `word `.
    pub fn expect_line(&mut self, word: &str, timeout: Duration) -> Result<String> {
        let line = self.next_line(timeout)?;
        if line == word || line.starts_with(&format!("{word} ")) {
            Ok(line)
        } else {
            Err(self.fail(&format!("expected `{word} ...`, got {line:?}")))
        }
    }

    /// Sends one command line, returns the raw response line (may be `error ...`).
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

    /// `exit` and reap.
    pub fn exit(&mut self) -> Result<()> {
        self.command("exit", "bye", LINE_TIMEOUT)?;
        self.reap();
        Ok(())
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) -> Result<()> {
        // SAFETY: kill(2) on the process we spawned (not reaped yet, pid still ours).
        if !self.dead && self.pid != 0 && unsafe { libc::kill(self.pid as i32, libc::SIGKILL) } != 0
        {
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

    /// Captured stderr (last 64 KiB).
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// An error carrying the transcript and stderr.
    pub fn fail(&self, what: &str) -> anyhow::Error {
        anyhow!(
            "{} (pid {}): {what}\ntranscript:\n  {}\nstderr:\n{}",
            self.name,
            self.pid,
            self.transcript.join("\n  "),
            self.stderr().trim()
        )
    }
}

impl Drop for LineProc {
    fn drop(&mut self) {
        if !self.dead {
            if self.pid != 0 {
                // SAFETY: kill(2) on the process we spawned (not reaped yet, pid still ours).
                unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
            }
            let _ = self.child.kill();
            self.reap();
        }
    }
}

/// Collects a child's stderr (last 64 KiB) on a thread, echoing it as `[tag] line` when
/// `WHOCLOSED_E2E_VERBOSE` is set. The receiver disconnects once stderr reached EOF.
pub(crate) fn capture_stderr(
    pipe: impl std::io::Read + Send + 'static,
    tag: String,
) -> (Arc<Mutex<String>>, Receiver<()>) {
    let stderr = Arc::new(Mutex::new(String::new()));
    let sink = stderr.clone();
    let (done_tx, done) = channel::<()>();
    let echo = std::env::var_os("WHOCLOSED_E2E_VERBOSE").is_some();
    std::thread::spawn(move || {
        let _done = done_tx; // dropped (disconnecting `done`) at stderr EOF
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if echo {
                eprintln!("[{tag}] {line}");
            }
            let mut s = sink.lock().expect("stderr lock");
            s.push_str(&line);
            s.push('\n');
            if s.len() > STDERR_KEEP {
                let cut = s.len() - STDERR_KEEP;
                let cut = (cut..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(0);
                s.drain(..cut);
            }
        }
    });
    (stderr, done)
}
