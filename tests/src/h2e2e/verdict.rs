//! Finding close objects in the agent's output and asserting on them (every failure
//! message carries the whole object).

use super::VERDICT_TIMEOUT;
use crate::h2peers::norm_addr;
use crate::{Agent, Expect, check_close, check_peer_link};
use serde_json::Value;

/// The value at JSON pointer `ptr`, or null.
pub fn s<'a>(v: &'a Value, ptr: &str) -> &'a Value {
    v.pointer(ptr).unwrap_or(&Value::Null)
}

/// The close object in `netns` whose (normalised) local/remote addresses match.
pub fn wait_close(
    agent: &mut Agent,
    netns: u64,
    local: Option<&str>,
    remote: Option<&str>,
) -> Value {
    let what = format!("close object netns={netns} local={local:?} remote={remote:?}");
    agent
        .wait_for(&what, VERDICT_TIMEOUT, |v| {
            let c = &v["conn"];
            c["netns"].as_u64() == Some(netns)
                && local.is_none_or(|l| norm_addr(c["local"].as_str().unwrap_or("")) == l)
                && remote.is_none_or(|r| norm_addr(c["remote"].as_str().unwrap_or("")) == r)
        })
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// `n` distinct close objects in `netns` matching local/remote (for several connections).
pub fn wait_closes(
    agent: &mut Agent,
    n: usize,
    netns: u64,
    local: Option<&str>,
    remote: Option<&str>,
) -> Vec<Value> {
    let mut got: Vec<Value> = Vec::new();
    for _ in 0..n {
        let seen: Vec<Value> = got.iter().map(|o| o["conn"]["id"].clone()).collect();
        let what = format!(
            "close object #{} netns={netns} local={local:?} remote={remote:?}",
            got.len() + 1
        );
        let o = agent
            .wait_for(&what, VERDICT_TIMEOUT, |v| {
                let c = &v["conn"];
                c["netns"].as_u64() == Some(netns)
                    && !seen.contains(&c["id"])
                    && local.is_none_or(|l| norm_addr(c["local"].as_str().unwrap_or("")) == l)
                    && remote.is_none_or(|r| norm_addr(c["remote"].as_str().unwrap_or("")) == r)
            })
            .unwrap_or_else(|e| panic!("{e:#}"));
        got.push(o);
    }
    got
}

pub fn fail(obj: &Value, msg: &str) -> ! {
    panic!(
        "{msg}\nobject: {}",
        serde_json::to_string_pretty(obj).unwrap_or_default()
    )
}

pub fn check(obj: &Value, e: &Expect) {
    if let Err(err) = check_close(obj, e) {
        panic!("{err:#}");
    }
}

pub fn check_pair(c: &Value, s: &Value) {
    if let Err(err) = check_peer_link(c, s) {
        panic!("{err:#}");
    }
    assert_ne!(c["conn"]["id"], s["conn"]["id"], "both ends share an id");
}

/// `conn.pid`, when present, is the peer process.
pub fn check_pid(obj: &Value, pid: u32) {
    let got = s(obj, "/conn/pid");
    if !got.is_null() && *got != pid {
        fail(
            obj,
            &format!("/conn/pid: expected null or {pid}, got {got}"),
        );
    }
}

/// Both ends agree on who sent the first FIN/RST, and on closed_by/reason.
pub fn check_same_story(c: &Value, sv: &Value) {
    let (a, b) = (
        s(c, "/verdict/tcp_initiator").as_str().unwrap_or("?"),
        s(sv, "/verdict/tcp_initiator").as_str().unwrap_or("?"),
    );
    let ok = matches!(
        (a, b),
        ("local", "remote") | ("remote", "local") | ("none", "none")
    );
    assert!(
        ok,
        "tcp_initiator inconsistent: client socket says {a:?}, server socket says {b:?}\n{c}\n{sv}"
    );
    for ptr in ["/verdict/closed_by", "/verdict/reason"] {
        assert_eq!(
            s(c, ptr),
            s(sv, ptr),
            "{ptr} differs between the ends\nclient: {c}\nserver: {sv}"
        );
    }
}

/// `h2`, which must be an object.
pub fn h2(obj: &Value) -> &Value {
    let h = &obj["h2"];
    if !h.is_object() {
        fail(obj, &format!("/h2: expected an object, got {h}"));
    }
    h
}

/// `h2.state == "synced"` and the preface was seen, unless the walker joined the streams
/// mid-stream: a server socket whose client's first data segment completed the handshake
/// (its final ACK reordered behind it on the way through the router namespace) had that
/// segment processed under the listener, where no hook can credit it to the new socket.
pub fn check_synced(obj: &Value) {
    let h = h2(obj);
    let start_seen = h["preface_seen"] == true || h["joined_midstream"] == true;
    if h["state"] != "synced" || !start_seen {
        fail(
            obj,
            &format!(
                "expected h2.state \"synced\" and h2.preface_seen true (or joined_midstream), \
                 got {} / {} / {}",
                h["state"], h["preface_seen"], h["joined_midstream"]
            ),
        );
    }
}

/// Expected fields of `h2.goaways[i]`.
pub struct Goaway<'a> {
    /// `sent` or `received`, from the traced socket's point of view.
    pub dir: &'a str,
    pub error_code: &'a str,
    pub code: u64,
    /// `None`: not checked.
    pub last_stream_id: Option<u64>,
    pub debug: &'a str,
}

pub fn check_goaway(obj: &Value, i: usize, want: &Goaway) {
    let g = &h2(obj)["goaways"][i];
    if !g.is_object() {
        fail(obj, &format!("/h2/goaways/{i}: missing"));
    }
    let mut bad = Vec::new();
    let mut eq = |field: &str, w: Value| {
        if g[field] != w {
            bad.push(format!(
                "/h2/goaways/{i}/{field}: expected {w}, got {}",
                g[field]
            ));
        }
    };
    eq("dir", want.dir.into());
    eq("error_code", want.error_code.into());
    eq("code", want.code.into());
    eq("debug", want.debug.into());
    eq("debug_truncated", false.into());
    if let Some(l) = want.last_stream_id {
        eq("last_stream_id", l.into());
    }
    if !g["at_ms"].is_number() {
        bad.push(format!(
            "/h2/goaways/{i}/at_ms: not a number: {}",
            g["at_ms"]
        ));
    }
    if !bad.is_empty() {
        fail(obj, &bad.join("\n"));
    }
}

pub fn goaway_count(obj: &Value) -> usize {
    match &h2(obj)["goaways"] {
        Value::Array(a) => a.len(),
        other => fail(obj, &format!("/h2/goaways: expected an array, got {other}")),
    }
}

pub fn num(obj: &Value, ptr: &str) -> f64 {
    s(obj, ptr).as_f64().unwrap_or_else(|| {
        fail(
            obj,
            &format!("{ptr}: expected a number, got {}", s(obj, ptr)),
        )
    })
}

/// Numbers written as `<n> ms` / `<n>ms` / `<n.m> ms` in `text`.
pub fn ms_numbers(text: &str) -> Vec<f64> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit()
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'.'))
        {
            let start = i;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            let n = &text[start..i];
            let mut j = i;
            if j < b.len() && b[j] == b' ' {
                j += 1;
            }
            let unit_ok = text[j..].starts_with("ms")
                && !text[j + 2..].starts_with(|c: char| c.is_ascii_alphanumeric());
            if unit_ok {
                if let Ok(v) = n.trim_end_matches('.').parse() {
                    out.push(v);
                }
            }
        } else {
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::ms_numbers;

    #[test]
    fn ms_numbers_in_hints() {
        assert_eq!(
            ms_numbers("pings every 1001.2 ms, allowed 5000ms"),
            vec![1001.2, 5000.0]
        );
        assert_eq!(ms_numbers("after 3 s; 12 msgs; v2 ms"), Vec::<f64>::new());
        assert_eq!(ms_numbers("~200 ms."), vec![200.0]);
    }
}
