//! Assertions on `close` objects, reporting every mismatch at once.

use anyhow::{Result, bail};
use serde_json::Value;

/// How `conn.pid` / `conn.comm` are checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PidCheck {
    /// Not checked.
    #[default]
    Any,
    /// `conn.pid == pid` and `conn.comm == "wc-peer"`.
    Exact(u32),
    /// `conn.pid` is null or `pid`; `conn.comm` is null or `"wc-peer"`.
    IfPresent(u32),
}

/// Expected fields of one close object; `None` = not checked.
#[derive(Clone, Debug, Default)]
pub struct Expect {
    pub family: Option<&'static str>,
    pub local: Option<String>,
    pub remote: Option<String>,
    pub role: Option<&'static str>,
    pub preexisting: Option<bool>,
    pub netns: Option<u64>,
    pub pid: PidCheck,
    pub closed_by: Option<&'static str>,
    pub reason: Option<&'static str>,
    pub tcp_initiator: Option<&'static str>,
    pub mechanism: Option<&'static str>,
    pub confidence: Option<&'static str>,
}

/// comm the tests' peer processes run under.
pub const PEER_COMM: &str = "wc-peer";

fn at<'a>(v: &'a Value, ptr: &str) -> &'a Value {
    v.pointer(ptr).unwrap_or(&Value::Null)
}

/// Checks the envelope (`v`, `type`, `conn.id`, `verdict`, `evidence`) and every field
/// set in `e`. The error lists all mismatches and the whole object.
pub fn check_close(obj: &Value, e: &Expect) -> Result<()> {
    let mut bad: Vec<String> = Vec::new();
    let mut eq = |ptr: &str, want: &Value| {
        let got = at(obj, ptr);
        if got != want {
            bad.push(format!("{ptr}: expected {want}, got {got}"));
        }
    };
    eq("/v", &Value::from(1));
    eq("/type", &Value::from("close"));
    let strs = [
        ("/conn/family", e.family),
        ("/conn/role", e.role),
        ("/verdict/closed_by", e.closed_by),
        ("/verdict/reason", e.reason),
        ("/verdict/tcp_initiator", e.tcp_initiator),
        ("/verdict/mechanism", e.mechanism),
        ("/verdict/confidence", e.confidence),
    ];
    for (ptr, want) in strs {
        if let Some(w) = want {
            eq(ptr, &Value::from(w));
        }
    }
    if let Some(l) = &e.local {
        eq("/conn/local", &Value::from(l.as_str()));
    }
    if let Some(r) = &e.remote {
        eq("/conn/remote", &Value::from(r.as_str()));
    }
    if let Some(p) = e.preexisting {
        eq("/conn/preexisting", &Value::from(p));
    }
    if let Some(n) = e.netns {
        eq("/conn/netns", &Value::from(n));
    }
    match e.pid {
        PidCheck::Any => {}
        PidCheck::Exact(pid) => {
            eq("/conn/pid", &Value::from(pid));
            eq("/conn/comm", &Value::from(PEER_COMM));
        }
        PidCheck::IfPresent(pid) => {
            let got = at(obj, "/conn/pid");
            if !got.is_null() && *got != pid {
                bad.push(format!("/conn/pid: expected null or {pid}, got {got}"));
            }
            let got = at(obj, "/conn/comm");
            if !got.is_null() && *got != PEER_COMM {
                bad.push(format!(
                    "/conn/comm: expected null or {PEER_COMM:?}, got {got}"
                ));
            }
        }
    }
    if at(obj, "/conn/id").as_str().is_none_or(str::is_empty) {
        bad.push("/conn/id: missing or empty".into());
    }
    if !at(obj, "/ts").is_string() {
        bad.push("/ts: missing".into());
    }
    if !at(obj, "/evidence").is_array() {
        bad.push("/evidence: not an array".into());
    }
    if !bad.is_empty() {
        bail!(
            "close object does not match:\n  {}\nobject: {}",
            bad.join("\n  "),
            serde_json::to_string_pretty(obj).unwrap_or_default()
        );
    }
    Ok(())
}

/// If either object names its `peer.id`, it must be the other object's `conn.id`.
pub fn check_peer_link(a: &Value, b: &Value) -> Result<()> {
    for (x, y) in [(a, b), (b, a)] {
        let pid = at(x, "/peer/id");
        if !pid.is_null() && pid != at(y, "/conn/id") {
            bail!(
                "peer.id {pid} of {} does not name the other end {}\n{x}\n{y}",
                at(x, "/conn/id"),
                at(y, "/conn/id")
            );
        }
    }
    Ok(())
}
