//! Runs the whoclosed agent and collects its NDJSON output.
//! `WHOCLOSED_E2E_VERBOSE=1` echoes its stderr live and its stdout objects on stop.

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bound for the `ready` line. Natively the agent is ready in about a second; in the QEMU
/// guests (software emulation) it took 29 to 35 s per case on 5.10 and 6.1 with the first
/// version of the walker's continuation programs, which is why 30 s became 90; since the
/// walker runs in programs of its own it takes 5 to 7 s there.
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound for the agent to exit after SIGINT.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// `$WHOCLOSED_BIN`, else `<workspace>/target/debug/whoclosed`. Never built by the harness.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WHOCLOSED_BIN") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives inside the workspace")
        .join("target/debug/whoclosed")
}

/// `trace --linger-ms 300 --netns <i>...`, plus `--probe-mode $WHOCLOSED_PROBE_MODE` if set.
pub fn default_trace_args(netns: &[u64]) -> Vec<String> {
    let mut a: Vec<String> = vec!["trace".into(), "--linger-ms".into(), "300".into()];
    for i in netns {
        a.push("--netns".into());
        a.push(i.to_string());
    }
    if let Ok(m) = std::env::var("WHOCLOSED_PROBE_MODE") {
        if !m.is_empty() {
            a.push("--probe-mode".into());
            a.push(m);
        }
    }
    a
}

enum Line {
    Json(Value),
    Invalid(String),
}

/// What [`Agent::stop`] observed.
#[derive(Debug)]
pub struct AgentExit {
    pub status: ExitStatus,
    /// Every JSON object printed over the agent's lifetime (ready line included).
    pub objects: Vec<Value>,
}

impl AgentExit {
    /// The final `stats` line (the agent writes one on exit); panics without it.
    pub fn stats(&self) -> &Value {
        self.objects
            .iter()
            .rev()
            .find(|o| o["type"] == "stats")
            .unwrap_or_else(|| panic!("no stats line: {:#?}", self.objects))
    }
}

/// A running `whoclosed trace`. Killed on drop.
pub struct Agent {
    child: Child,
    cmdline: String,
    lines: Receiver<Line>,
    eof: bool,
    objects: Vec<Value>,
    invalid: Vec<String>,
    stderr: Arc<Mutex<String>>,
    /// Disconnects once the stderr reader saw EOF.
    stderr_done: Receiver<()>,
    ready: Value,
    exited: Option<ExitStatus>,
}

impl Agent {
    /// Default binary and [`default_trace_args`]; returns once `ready` was printed.
    ///
    /// With `WHOCLOSED_PROBE_MODE` set to a forced mode, the `ready` line must report that
    /// very mode: a test asked for fentry must not pass on the tracepoint fallback.
    pub fn start(netns: &[u64]) -> Result<Agent> {
        let agent = Self::spawn(&agent_bin(), &default_trace_args(netns), READY_TIMEOUT)?;
        if let Ok(want) = std::env::var("WHOCLOSED_PROBE_MODE") {
            let got = agent.ready()["probe_mode"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if !want.is_empty() && want != "auto" && got != want {
                bail!("asked for --probe-mode {want}, the agent reports probe_mode {got:?}");
            }
        }
        Ok(agent)
    }

    /// Any binary and arguments; returns once a `{"type":"ready"}` object was printed
    /// (lines before it are kept), or fails after `ready_timeout` / on early exit.
    pub fn spawn(bin: &Path, args: &[String], ready_timeout: Duration) -> Result<Agent> {
        if !bin.exists() {
            bail!(
                "whoclosed agent binary not found at {}; build it first with `cargo build` \
                 in the workspace (or point WHOCLOSED_BIN at it)",
                bin.display()
            );
        }
        let cmdline = format!("{} {}", bin.display(), args.join(" "));
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning `{cmdline}`"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let msg = match serde_json::from_str::<Value>(&line) {
                    Ok(v) if v.is_object() => Line::Json(v),
                    _ => Line::Invalid(line),
                };
                if tx.send(msg).is_err() {
                    break;
                }
            }
        });
        let (stderr, stderr_done) =
            crate::lineproc::capture_stderr(stderr_pipe, "whoclosed".into());
        let mut agent = Agent {
            child,
            cmdline,
            lines: rx,
            eof: false,
            objects: Vec::new(),
            invalid: Vec::new(),
            stderr,
            stderr_done,
            ready: Value::Null,
            exited: None,
        };
        agent.ready =
            agent.wait_object("the `ready` line", ready_timeout, |v| v["type"] == "ready")?;
        Ok(agent)
    }

    /// The `ready` object.
    pub fn ready(&self) -> &Value {
        &self.ready
    }

    /// All JSON objects received so far.
    pub fn objects(&self) -> &[Value] {
        &self.objects
    }

    /// Captured stderr (last 64 KiB).
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// First `type == "close"` object (already received or arriving within `timeout`)
    /// matching `pred`. The error lists everything the agent printed plus its stderr.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        self.wait_object(what, timeout, |v| v["type"] == "close" && pred(v))
    }

    /// First object of this `type` (`drops`, `stats`, …) received or arriving within `timeout`.
    pub fn wait_for_type(&mut self, ty: &str, timeout: Duration) -> Result<Value> {
        self.wait_object(&format!("a {ty} record"), timeout, |v| v["type"] == ty)
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Close object with `conn.local == local` and `conn.remote == remote`, and, if
    /// `netns` is given, `conn.netns == netns`.
    pub fn wait_for_close(
        &mut self,
        local: &str,
        remote: &str,
        netns: Option<u64>,
        timeout: Duration,
    ) -> Result<Value> {
        let what = match netns {
            Some(n) => format!("close object local={local} remote={remote} netns={n}"),
            None => format!("close object local={local} remote={remote}"),
        };
        self.wait_for(&what, timeout, |v| {
            let c = &v["conn"];
            c["local"] == local
                && c["remote"] == remote
                && netns.is_none_or(|n| c["netns"].as_u64() == Some(n))
        })
    }

    /// The first object (already read or still to come) that `pred` accepts; `what` names
    /// it in the error.
    pub fn wait_object(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        if let Some(v) = self.objects.iter().find(|v| pred(v)) {
            return Ok(v.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            if self.eof {
                self.settle();
                let st = self.exit_status_text();
                return Err(self.fail(&format!("agent closed stdout ({st}) before {what}")));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(Line::Json(v)) => {
                    let hit = pred(&v);
                    self.objects.push(v.clone());
                    if hit {
                        return Ok(v);
                    }
                }
                Ok(Line::Invalid(l)) => self.invalid.push(l),
                Err(RecvTimeoutError::Disconnected) => self.eof = true,
                Err(RecvTimeoutError::Timeout) => {
                    let st = self.exit_status_text();
                    return Err(self.fail(&format!(
                        "timed out after {timeout:?} waiting for {what} (agent {st})"
                    )));
                }
            }
        }
    }

    /// After stdout EOF: give the process and the stderr reader a moment to finish, so
    /// failure messages carry the agent's last words and exit status.
    fn settle(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.exited.is_none() && Instant::now() < deadline {
            self.exited = self.child.try_wait().ok().flatten();
            if self.exited.is_none() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if self.exited.is_some() {
            let _ = self.stderr_done.recv_timeout(Duration::from_secs(2));
        }
    }

    fn exit_status_text(&mut self) -> String {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        match self.exited {
            Some(s) => format!("exited, {s}"),
            None => "still running".into(),
        }
    }

    /// Formats a failure with all output seen so far and the agent's stderr.
    pub fn fail(&self, what: &str) -> anyhow::Error {
        let mut msg = format!("{what}\nagent: {}\n", self.cmdline);
        msg.push_str(&format!("{} JSON objects received:\n", self.objects.len()));
        for o in &self.objects {
            msg.push_str(&format!("  {o}\n"));
        }
        if !self.invalid.is_empty() {
            msg.push_str("non-JSON stdout lines:\n");
            for l in &self.invalid {
                msg.push_str(&format!("  {l}\n"));
            }
        }
        msg.push_str(&format!("agent stderr:\n{}", self.stderr()));
        anyhow!(msg)
    }

    /// SIGINT, wait (bounded) for exit, drain stdout. Fails if the agent had to be
    /// killed, exited non-zero, or printed a line that is not a JSON object with `"v":1`.
    pub fn stop(&mut self) -> Result<AgentExit> {
        let status = match self.exited {
            Some(s) => s,
            None => {
                // SAFETY: kill(2) on our own, not yet reaped, child.
                unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
                let deadline = Instant::now() + STOP_TIMEOUT;
                loop {
                    if let Some(s) = self.child.try_wait().context("waiting for agent")? {
                        break s;
                    }
                    if Instant::now() >= deadline {
                        let _ = self.child.kill();
                        let s = self.child.wait().context("reaping agent")?;
                        self.exited = Some(s);
                        return Err(self.fail(&format!(
                            "agent did not exit within {STOP_TIMEOUT:?} of SIGINT; killed"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        self.exited = Some(status);
        let _ = self.stderr_done.recv_timeout(Duration::from_secs(2));
        // Drain what it flushed on the way out.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.eof {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(Line::Json(v)) => self.objects.push(v),
                Ok(Line::Invalid(l)) => self.invalid.push(l),
                Err(RecvTimeoutError::Disconnected) => self.eof = true,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.fail("agent exited but its stdout stayed open for 5 s"));
                }
            }
        }
        if std::env::var_os("WHOCLOSED_E2E_VERBOSE").is_some() {
            for o in &self.objects {
                eprintln!("[whoclosed stdout] {o}");
            }
        }
        if !status.success() {
            return Err(self.fail(&format!("agent exited with {status} after SIGINT")));
        }
        if !self.invalid.is_empty() {
            return Err(self.fail("agent printed non-JSON lines on stdout"));
        }
        if let Some(bad) = self.objects.iter().find(|o| o["v"] != 1) {
            return Err(self.fail(&format!("object without \"v\":1: {bad}")));
        }
        Ok(AgentExit {
            status,
            objects: self.objects.clone(),
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
