//! The report boot: its guest script (`--probe-report` in every mode, then the agent's
//! programs as bpftool and fdinfo see them) and the parsing of its output.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use serde_json::Value;

use super::{ALL_MODES, Mode};

pub fn guest_release(output: &str) -> String {
    output
        .lines()
        .find_map(|l| l.strip_prefix("@@KERNEL "))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// Guest script: in every mode, `--probe-report`, then (if it loaded) the agent itself
/// long enough to list its programs with bpftool and read their fdinfo
/// (`verified_insns`, kernels >= 5.16).
pub fn report_script(whoclosed: &Path) -> String {
    let w = whoclosed.display();
    let mut s = String::from(
        "echo \"@@KERNEL $(uname -r)\"\nexport RUST_LOG=info\nup() { cut -d' ' -f1 /proc/uptime; }\n",
    );
    for m in ALL_MODES {
        let m = m.name();
        let _ = write!(
            s,
            r#"
t0=$(up)
{w} trace --probe-mode {m} --probe-report >/tmp/report.json 2>/tmp/report.err
rc=$?
echo "@@REPORT {m} rc=$rc t0=$t0 t1=$(up)"
echo "@@JSON"
cat /tmp/report.json
echo "@@STDERR"
cat /tmp/report.err
if [ $rc = 0 ]; then
    t0=$(up)
    {w} trace --probe-mode {m} >/tmp/agent.out 2>/tmp/agent.err &
    pid=$!
    i=0
    while ! grep -q '"ready"' /tmp/agent.out && kill -0 $pid 2>/dev/null && [ $i -lt 1800 ]; do
        usleep 100000
        i=$((i+1))
    done
    echo "@@AGENT {m} t0=$t0 t1=$(up)"
    cat /tmp/agent.out
    echo "@@PROGS {m}"
    bpftool prog show --json
    echo
    echo "@@FDINFO {m}"
    for f in /proc/$pid/fdinfo/*; do
        if grep -q '^prog_id' $f 2>/dev/null; then echo "@@FD"; cat $f; fi
    done
    # SIGTERM: a background job of a non-interactive shell ignores SIGINT.
    kill -TERM $pid
    i=0
    while kill -0 $pid 2>/dev/null && [ $i -lt 300 ]; do
        usleep 100000
        i=$((i+1))
    done
    kill -KILL $pid 2>/dev/null
    wait $pid
    echo "@@AGENT-EXIT {m} rc=$?"
    cat /tmp/agent.err | tail -n 20
fi
"#
        );
    }
    s.push_str("echo \"@@DONE\"\n");
    s
}

/// `key=value` out of a marker line.
pub fn kv<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

pub fn kv_f64(line: &str, key: &str) -> Option<f64> {
    kv(line, key).and_then(|v| v.parse().ok())
}

/// Splits output into (marker line, following lines) sections.
pub fn sections(output: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for l in output.lines() {
        if l.starts_with("@@") {
            out.push((l.to_string(), Vec::new()));
        } else if let Some(last) = out.last_mut() {
            last.1.push(l.to_string());
        }
    }
    out
}

#[derive(Default, Clone)]
pub struct ProgStat {
    pub id: u64,
    pub name: String,
    pub prog_type: String,
    /// bytes_xlated / 8: instructions after the verifier's rewrites.
    pub xlated_insns: u64,
    pub jited_bytes: u64,
    /// `verified_insns` from fdinfo: what the verifier processed (kernels >= 5.16).
    pub verified_insns: Option<u64>,
}

#[derive(Default, Clone)]
pub struct ModeReport {
    pub rc: i32,
    /// The `--probe-report` JSON (when it ran).
    pub json: Option<Value>,
    pub stderr: String,
    pub report_secs: f64,
    /// Time from agent start to its `ready` line.
    pub ready_secs: Option<f64>,
    pub progs: Vec<ProgStat>,
}

#[derive(Default)]
pub struct Report {
    pub modes: BTreeMap<Mode, ModeReport>,
    pub boot_secs: f64,
    pub guest_release: String,
    pub error: Option<String>,
}

impl Report {
    pub fn loaded(&self, mode: Mode) -> bool {
        self.modes.get(&mode).is_some_and(|m| {
            m.rc == 0
                && m.json
                    .as_ref()
                    .is_some_and(|j| j["probe_mode"] == mode.name())
        })
    }
}

pub fn mode_of(s: &str) -> Option<Mode> {
    ALL_MODES.into_iter().find(|m| m.name() == s)
}

pub fn parse_report(output: &str) -> Report {
    let mut r = Report::default();
    let mut cur: Option<Mode> = None;
    for (head, body) in sections(output) {
        let word: Vec<&str> = head.split_whitespace().collect();
        let text = body.join("\n");
        match word.first().copied() {
            Some("@@REPORT") => {
                cur = word.get(1).and_then(|m| mode_of(m));
                if let Some(m) = cur {
                    let e = r.modes.entry(m).or_default();
                    e.rc = kv(&head, "rc").and_then(|v| v.parse().ok()).unwrap_or(-1);
                    e.report_secs =
                        kv_f64(&head, "t1").unwrap_or(0.0) - kv_f64(&head, "t0").unwrap_or(0.0);
                }
            }
            Some("@@JSON") => {
                if let Some(m) = cur {
                    r.modes.entry(m).or_default().json = serde_json::from_str(&text).ok();
                }
            }
            Some("@@STDERR") => {
                if let Some(m) = cur {
                    r.modes.entry(m).or_default().stderr = text;
                }
            }
            Some("@@AGENT") => {
                if let Some(m) = cur {
                    r.modes.entry(m).or_default().ready_secs = Some(
                        kv_f64(&head, "t1").unwrap_or(0.0) - kv_f64(&head, "t0").unwrap_or(0.0),
                    );
                }
            }
            Some("@@PROGS") => {
                if let (Some(m), Ok(Value::Array(progs))) =
                    (cur, serde_json::from_str::<Value>(&text))
                {
                    let e = r.modes.entry(m).or_default();
                    e.progs = progs
                        .iter()
                        .map(|p| ProgStat {
                            id: p["id"].as_u64().unwrap_or(0),
                            name: p["name"].as_str().unwrap_or("?").to_string(),
                            prog_type: p["type"].as_str().unwrap_or("?").to_string(),
                            xlated_insns: p["bytes_xlated"].as_u64().unwrap_or(0) / 8,
                            jited_bytes: p["bytes_jited"].as_u64().unwrap_or(0),
                            verified_insns: None,
                        })
                        .collect();
                }
            }
            Some("@@FD") => {
                let field = |k: &str| {
                    body.iter().find_map(|l| {
                        l.strip_prefix(k)
                            .and_then(|r| r.trim_start().strip_prefix(':'))
                            .and_then(|v| v.trim().parse::<u64>().ok())
                    })
                };
                if let (Some(m), Some(id), Some(v)) =
                    (cur, field("prog_id"), field("verified_insns"))
                {
                    let e = r.modes.entry(m).or_default();
                    if let Some(p) = e.progs.iter_mut().find(|p| p.id == id) {
                        p.verified_insns = Some(v);
                    }
                }
            }
            _ => {}
        }
    }
    for m in r.modes.values_mut() {
        // Only the agent's own programs (bpftool lists every program in the guest).
        let names: Vec<String> = m
            .json
            .as_ref()
            .and_then(|j| j["programs"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p["program"].as_str().map(str::to_string))
            .collect();
        m.progs
            .retain(|p| names.iter().any(|n| n.starts_with(&p.name)));
        for p in &mut m.progs {
            if let Some(full) = names.iter().find(|n| n.starts_with(&p.name)) {
                p.name = full.clone();
            }
        }
    }
    r
}
