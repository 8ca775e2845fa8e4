//! Exporters: versioned NDJSON (one object per line, see docs/events.md) and a table view.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use serde_json::{Map, Value, json};

use crate::{
    classify::{FactKind, PeerSummary},
    conn::Closed,
    event::errno_name,
};

/// Version of every JSON object whoclosed writes. Bumped on incompatible changes only.
pub const SCHEMA_VERSION: u32 = 1;

/// Maps CLOCK_MONOTONIC (the kernel's timestamps) to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    mono0_ns: u64,
    real0: SystemTime,
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

impl Clock {
    pub fn now() -> Self {
        Clock {
            mono0_ns: monotonic_ns(),
            real0: SystemTime::now(),
        }
    }

    /// A fixed clock for reproducible output in tests.
    pub fn fixed(mono0_ns: u64, real0: SystemTime) -> Self {
        Clock { mono0_ns, real0 }
    }

    pub fn wall(&self, mono_ns: u64) -> SystemTime {
        if mono_ns >= self.mono0_ns {
            self.real0 + Duration::from_nanos(mono_ns - self.mono0_ns)
        } else {
            self.real0 - Duration::from_nanos(self.mono0_ns - mono_ns)
        }
    }

    pub fn rfc3339(&self, mono_ns: u64) -> String {
        humantime::format_rfc3339_micros(self.wall(mono_ns)).to_string()
    }
}

fn ms(ns: u64) -> f64 {
    (ns as f64 / 1_000.0).round() / 1_000.0
}

fn evidence(c: &Closed) -> Vec<Value> {
    let start = c.conn.first_ns;
    let mut out = Vec::with_capacity(c.conn.facts.len());
    for f in &c.conn.facts {
        let mut o = Map::new();
        o.insert("at_ms".into(), json!(ms(f.at_ns.saturating_sub(start))));
        let mut put = |k: &str, v: Value| {
            o.insert(k.into(), v);
        };
        match &f.kind {
            FactKind::State {
                from,
                to,
                pid,
                comm,
                exiting,
            } => {
                put("what", json!("state"));
                put("from", json!(from.name()));
                put("to", json!(to.name()));
                // Only transitions made by the owning process carry a meaningful task.
                if matches!(to.name(), "SYN_SENT" | "FIN_WAIT1" | "LAST_ACK") || *exiting {
                    put("pid", json!(pid));
                    put("comm", json!(comm));
                }
                if *exiting {
                    put("owner_exiting", json!(true));
                }
            }
            FactKind::FinSent => put("what", json!("fin_sent")),
            FactKind::FinReceived { ttl } => {
                put("what", json!("fin_received"));
                put("ttl", json!(ttl));
            }
            FactKind::RstSent {
                exiting,
                kernel_reason,
            } => {
                put("what", json!("rst_sent"));
                if let Some(r) = kernel_reason {
                    put("kernel_reason", json!(r));
                }
                if *exiting {
                    put("owner_exiting", json!(true));
                }
            }
            FactKind::RstReceived {
                ttl,
                origin,
                sender_reason,
            } => {
                put("what", json!("rst_received"));
                if let Some(r) = sender_reason {
                    put("sender_kernel_reason", json!(r));
                }
                if *ttl != 0 {
                    put("ttl", json!(ttl));
                }
                if let Some(b) = c.conn.ttl_baseline {
                    put("ttl_baseline", json!(b));
                }
                put("origin", json!(origin));
            }
            FactKind::TtlChanged { ttl } => {
                put("what", json!("ttl_changed"));
                put("ttl", json!(ttl));
            }
            FactKind::Retransmit { state } => {
                put("what", json!("retransmit"));
                put("state", json!(state.name()));
            }
            FactKind::SocketError { errno } => {
                put("what", json!("socket_error"));
                put("errno", json!(errno));
                put("error", json!(errno_name(*errno)));
            }
            FactKind::GoAway {
                sent,
                code,
                last_stream_id,
                debug,
            } => {
                put(
                    "what",
                    json!(if *sent {
                        "goaway_sent"
                    } else {
                        "goaway_received"
                    }),
                );
                put("error_code", json!(crate::h2::Reason(*code).to_string()));
                put("last_stream_id", json!(last_stream_id));
                put("debug", json!(debug));
            }
            FactKind::CloseCall { pid, comm, exiting } => {
                put("what", json!("close_call"));
                put("pid", json!(pid));
                put("comm", json!(comm));
                if *exiting {
                    put("owner_exiting", json!(true));
                }
            }
        }
        out.push(Value::Object(o));
    }
    out
}

fn opt_ms(ns: Option<u64>) -> Value {
    ns.map(|n| json!(ms(n))).unwrap_or(Value::Null)
}

/// The `h2` object: `null` when no payload of the socket was ever classified.
fn h2_json(c: &Closed) -> Value {
    let Some(h) = &c.conn.h2 else {
        return Value::Null;
    };
    let start = c.conn.first_ns;
    let closed = c.conn.closed_ns.unwrap_or(start);
    let goaways: Vec<Value> = h
        .goaways
        .iter()
        .map(|g| {
            json!({
                "dir": if g.dir == crate::event::Dir::Egress { "sent" } else { "received" },
                "at_ms": ms(g.at_ns.saturating_sub(start)),
                "error_code": g.reason.to_string(),
                "code": g.reason.0,
                "last_stream_id": g.last_stream_id,
                "debug": g.debug,
                "debug_truncated": g.debug_truncated,
                "idle_ms": opt_ms(g.idle_ns),
            })
        })
        .collect();
    json!({
        "state": h.state,
        "preface_seen": h.preface_seen,
        "frames": h.frames,
        "parse_errors": h.parse_errors,
        "desyncs": h.desyncs,
        "goaways": goaways,
        "pings": {
            "sent": h.ping_sent.pings,
            "received": h.ping_received.pings,
            "acks_sent": h.ping_sent.acks,
            "acks_received": h.ping_received.acks,
            "unanswered_sent": h.ping_sent.unanswered(),
            "unanswered_received": h.ping_received.unanswered(),
            "min_interval_ms_sent": opt_ms(h.ping_sent.min_interval_ns()),
            "min_interval_ms_received": opt_ms(h.ping_received.min_interval_ns()),
            "median_interval_ms_sent": opt_ms(h.ping_sent.median_interval_ns()),
            "median_interval_ms_received": opt_ms(h.ping_received.median_interval_ns()),
        },
        "rst_streams": { "sent": h.rst_sent, "received": h.rst_received },
        "streams_open_at_close": h.open_streams(),
        "max_open_streams": h.max_open_streams,
        "idle_before_close_ms": opt_ms(h.idle_since_ns.map(|t| closed.saturating_sub(t))),
    })
}

fn peer_json(p: &Option<PeerSummary>) -> Value {
    match p {
        None => Value::Null,
        Some(p) => json!({
            "id": p.id,
            "pid": p.pid,
            "comm": p.comm,
            "netns": p.netns,
            "exited": p.exited,
        }),
    }
}

/// The `close` object for one ended socket.
pub fn close_json(c: &Closed, clock: &Clock) -> Value {
    let conn = &c.conn;
    let (family, local, remote) = match conn.tuple {
        Some(t) => (
            if t.local.is_ipv4() { "ipv4" } else { "ipv6" },
            Value::String(t.local.to_string()),
            Value::String(t.remote.to_string()),
        ),
        None => ("unknown", Value::Null, Value::Null),
    };
    let closed = conn.closed_ns.unwrap_or(conn.first_ns);
    let lifetime_from = conn.opened_ns.unwrap_or(conn.first_ns);
    json!({
        "v": SCHEMA_VERSION,
        "type": "close",
        "ts": clock.rfc3339(closed),
        "conn": {
            "id": conn.id,
            "family": family,
            "local": local,
            "remote": remote,
            "role": conn.role,
            "preexisting": conn.preexisting,
            "pid": c.owner.as_ref().map(|o| o.0),
            "comm": c.owner.as_ref().map(|o| o.1.clone()),
            "netns": conn.netns,
        },
        "verdict": c.verdict,
        "evidence": evidence(c),
        "stats": {
            "lifetime_ms": ms(closed.saturating_sub(lifetime_from)),
            "retransmits": conn.retransmits,
            "ttl_baseline": conn.ttl_baseline,
            "facts_dropped": conn.facts_dropped,
        },
        "h2": h2_json(c),
        "peer": peer_json(&c.peer),
    })
}

pub const TABLE_HEADER: &str = "TIME                        ROLE    LOCAL                      REMOTE                     CLOSED_BY  REASON                    MECH     CONF    PROCESS";

/// One human-readable line for `-o table`.
pub fn close_line(c: &Closed, clock: &Clock) -> String {
    let (l, r) = match c.conn.tuple {
        Some(t) => (t.local.to_string(), t.remote.to_string()),
        None => ("?".into(), "?".into()),
    };
    let v = &c.verdict;
    let val = |x: Value| x.as_str().unwrap_or("?").to_string();
    let proc_ = c
        .owner
        .as_ref()
        .map(|(p, n)| format!("{n}({p})"))
        .unwrap_or_else(|| "-".into());
    format!(
        "{:<27} {:<7} {:<26} {:<26} {:<10} {:<25} {:<8} {:<7} {}",
        clock.rfc3339(c.conn.closed_ns.unwrap_or(c.conn.first_ns)),
        c.conn.role.name(),
        l,
        r,
        val(json!(v.closed_by)),
        v.reason,
        val(json!(v.mechanism)),
        val(json!(v.confidence)),
        proc_
    )
}

/// Output filters. Every socket is still tracked; filters only select what is printed.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub ports: Vec<u16>,
    pub addrs: Vec<IpAddr>,
    pub netns: Vec<u32>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
}

impl Filter {
    pub fn matches(&self, c: &Closed) -> bool {
        let t = c.conn.tuple;
        if !self.ports.is_empty()
            && !t.is_some_and(|t| {
                self.ports.contains(&t.local.port()) || self.ports.contains(&t.remote.port())
            })
        {
            return false;
        }
        if !self.addrs.is_empty()
            && !t.is_some_and(|t| {
                self.addrs.contains(&t.local.ip()) || self.addrs.contains(&t.remote.ip())
            })
        {
            return false;
        }
        if !self.netns.is_empty() && !c.conn.netns.is_some_and(|n| self.netns.contains(&n)) {
            return false;
        }
        if let Some(pid) = self.pid {
            if c.owner.as_ref().map(|o| o.0) != Some(pid) {
                return false;
            }
        }
        if let Some(comm) = &self.comm {
            if c.owner.as_ref().map(|o| o.1.as_str()) != Some(comm.as_str()) {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests;
