//! The `close` object: one ended socket, its verdict, the evidence it rests on, its stats,
//! its HTTP/2 state and its peer.

use std::{collections::BTreeMap, net::SocketAddr};

use serde::{
    Serialize, Serializer,
    ser::{SerializeMap, SerializeSeq},
};
use serde_json::Value;

use super::{Clock, SCHEMA_VERSION, ms};
use crate::{
    conn::{Closed, h2::H2State},
    event::{TcpState, errno_name},
    k8s::{K8sEnds, PodIdentity},
    timeline::{Fact, FactKind, Role},
};

/// The `evidence` array, serialised straight from the facts (no intermediate `Value`:
/// this runs for every ended socket and dominated the agent's CPU when it allocated).
struct Evidence<'a>(&'a Closed);

impl Serialize for Evidence<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.conn.facts.len()))?;
        for f in &self.0.conn.facts {
            seq.serialize_element(&EvidenceItem { c: self.0, f })?;
        }
        seq.end()
    }
}

struct EvidenceItem<'a> {
    c: &'a Closed,
    f: &'a Fact,
}

impl Serialize for EvidenceItem<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry(
            "at_ms",
            &ms(self.f.at_ns.saturating_sub(self.c.conn.first_ns)),
        )?;
        match &self.f.kind {
            FactKind::State {
                from,
                to,
                pid,
                comm,
                exiting,
            } => {
                m.serialize_entry("what", "state")?;
                m.serialize_entry("from", from.name())?;
                m.serialize_entry("to", to.name())?;
                // Only transitions made by the owning process carry a meaningful task.
                if matches!(
                    to,
                    TcpState::SynSent | TcpState::FinWait1 | TcpState::LastAck
                ) || *exiting
                {
                    m.serialize_entry("pid", pid)?;
                    m.serialize_entry("comm", comm)?;
                }
                if *exiting {
                    m.serialize_entry("owner_exiting", &true)?;
                }
            }
            FactKind::FinSent => m.serialize_entry("what", "fin_sent")?,
            FactKind::FinReceived { ttl } => {
                m.serialize_entry("what", "fin_received")?;
                m.serialize_entry("ttl", ttl)?;
            }
            FactKind::RstSent {
                exiting,
                kernel_reason,
            } => {
                m.serialize_entry("what", "rst_sent")?;
                if let Some(r) = kernel_reason {
                    m.serialize_entry("kernel_reason", r)?;
                }
                if *exiting {
                    m.serialize_entry("owner_exiting", &true)?;
                }
            }
            FactKind::RstReceived {
                ttl,
                origin,
                sender_reason,
            } => {
                m.serialize_entry("what", "rst_received")?;
                if let Some(r) = sender_reason {
                    m.serialize_entry("sender_kernel_reason", r)?;
                }
                if *ttl != 0 {
                    m.serialize_entry("ttl", ttl)?;
                }
                if let Some(b) = self.c.conn.ttl_baseline {
                    m.serialize_entry("ttl_baseline", &b)?;
                }
                m.serialize_entry("origin", origin)?;
            }
            FactKind::TtlChanged { ttl } => {
                m.serialize_entry("what", "ttl_changed")?;
                m.serialize_entry("ttl", ttl)?;
            }
            FactKind::Retransmit { state } => {
                m.serialize_entry("what", "retransmit")?;
                m.serialize_entry("state", state.name())?;
            }
            FactKind::SocketError { errno } => {
                m.serialize_entry("what", "socket_error")?;
                m.serialize_entry("errno", errno)?;
                m.serialize_entry("error", errno_name(*errno))?;
            }
            FactKind::GoAway(g) => {
                m.serialize_entry(
                    "what",
                    if g.sent {
                        "goaway_sent"
                    } else {
                        "goaway_received"
                    },
                )?;
                m.serialize_entry("error_code", &g.code)?;
                m.serialize_entry("last_stream_id", &g.last_stream_id)?;
                m.serialize_entry("debug", &g.debug)?;
            }
            FactKind::CloseCall { pid, comm, exiting } => {
                m.serialize_entry("what", "close_call")?;
                m.serialize_entry("pid", pid)?;
                m.serialize_entry("comm", comm)?;
                if *exiting {
                    m.serialize_entry("owner_exiting", &true)?;
                }
            }
        }
        m.end()
    }
}

fn opt_ms(ns: Option<u64>) -> Option<f64> {
    ns.map(ms)
}

#[derive(Serialize)]
struct GoAwayJson<'a> {
    dir: &'static str,
    at_ms: f64,
    error_code: String,
    code: u32,
    last_stream_id: u32,
    debug: &'a str,
    debug_truncated: bool,
    idle_ms: Option<f64>,
}

#[derive(Serialize)]
struct PingsJson {
    sent: u32,
    received: u32,
    acks_sent: u32,
    acks_received: u32,
    unanswered_sent: usize,
    unanswered_received: usize,
    min_interval_ms_sent: Option<f64>,
    min_interval_ms_received: Option<f64>,
    median_interval_ms_sent: Option<f64>,
    median_interval_ms_received: Option<f64>,
}

#[derive(Serialize)]
struct RstStreamsJson<'a> {
    sent: &'a BTreeMap<String, u32>,
    received: &'a BTreeMap<String, u32>,
}

/// The `h2` object (`null` when no payload of the socket was ever classified).
#[derive(Serialize)]
struct H2Json<'a> {
    state: H2State,
    preface_seen: bool,
    frames: u64,
    parse_errors: u32,
    desyncs: u32,
    goaways: Vec<GoAwayJson<'a>>,
    pings: PingsJson,
    rst_streams: RstStreamsJson<'a>,
    streams_open_at_close: usize,
    max_open_streams: usize,
    idle_before_close_ms: Option<f64>,
}

fn h2_json(c: &Closed) -> Option<H2Json<'_>> {
    let h = c.conn.h2.as_ref()?;
    let start = c.conn.first_ns;
    let closed = c.conn.closed_ns.unwrap_or(start);
    let goaways = h
        .goaways
        .iter()
        .map(|g| GoAwayJson {
            dir: if g.sent { "sent" } else { "received" },
            at_ms: ms(g.at_ns.saturating_sub(start)),
            error_code: g.code.to_string(),
            code: g.code.0,
            last_stream_id: g.last_stream_id,
            debug: &g.debug,
            debug_truncated: g.debug_truncated,
            idle_ms: opt_ms(g.idle_ns),
        })
        .collect();
    Some(H2Json {
        state: h.state,
        preface_seen: h.preface_seen,
        frames: h.frames,
        parse_errors: h.parse_errors,
        desyncs: h.desyncs,
        goaways,
        pings: PingsJson {
            sent: h.ping_sent.pings,
            received: h.ping_received.pings,
            acks_sent: h.ping_sent.acks,
            acks_received: h.ping_received.acks,
            unanswered_sent: h.ping_sent.unanswered(),
            unanswered_received: h.ping_received.unanswered(),
            min_interval_ms_sent: opt_ms(h.ping_sent.min_interval_ns()),
            min_interval_ms_received: opt_ms(h.ping_received.min_interval_ns()),
            median_interval_ms_sent: opt_ms(h.ping_sent.median_interval_ns()),
            median_interval_ms_received: opt_ms(h.ping_received.median_interval_ns()),
        },
        rst_streams: RstStreamsJson {
            sent: &h.rst_sent,
            received: &h.rst_received,
        },
        streams_open_at_close: h.open_streams(),
        max_open_streams: h.max_open_streams,
        idle_before_close_ms: opt_ms(h.idle_since_ns.map(|t| closed.saturating_sub(t))),
    })
}

#[derive(Serialize)]
struct PeerJson<'a> {
    id: crate::timeline::ConnId,
    pid: Option<u32>,
    comm: Option<&'a str>,
    netns: Option<u32>,
    exited: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    k8s: Option<&'a PodIdentity>,
}

#[derive(Serialize)]
struct ConnJson<'a> {
    id: crate::timeline::ConnId,
    family: &'static str,
    local: Option<SocketAddr>,
    remote: Option<SocketAddr>,
    role: Role,
    preexisting: bool,
    pid: Option<u32>,
    comm: Option<&'a str>,
    netns: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    k8s: Option<&'a PodIdentity>,
}

#[derive(Serialize)]
struct StatsJson {
    lifetime_ms: f64,
    retransmits: u32,
    ttl_baseline: Option<u8>,
    facts_dropped: u32,
    /// No payload either way for this long before the first FIN or RST (packet hooks).
    idle_before_end_ms: Option<f64>,
}

/// The `close` object for one ended socket, ready to serialise.
pub struct CloseObject<'a> {
    pub closed: &'a Closed,
    pub clock: &'a Clock,
    /// `conn.k8s` / `peer.k8s`, when the agent resolved the owners' pods.
    pub k8s: Option<&'a K8sEnds>,
}

impl Serialize for CloseObject<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let c = self.closed;
        let conn = &c.conn;
        let closed = conn.closed_ns.unwrap_or(conn.first_ns);
        let lifetime_from = conn.opened_ns.unwrap_or(conn.first_ns);
        let family = match conn.tuple {
            Some(t) if t.is_ipv4() => "ipv4",
            Some(_) => "ipv6",
            None => "unknown",
        };
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("v", &SCHEMA_VERSION)?;
        m.serialize_entry("type", "close")?;
        m.serialize_entry("ts", &self.clock.rfc3339(closed))?;
        m.serialize_entry(
            "conn",
            &ConnJson {
                id: conn.id,
                family,
                local: conn.tuple.map(|t| t.local()),
                remote: conn.tuple.map(|t| t.remote()),
                role: conn.role,
                preexisting: conn.preexisting,
                pid: c.owner.as_ref().map(|o| o.0),
                comm: c.owner.as_ref().map(|o| &*o.1),
                netns: conn.netns,
                k8s: self.k8s.and_then(|k| k.conn.as_ref()),
            },
        )?;
        m.serialize_entry("verdict", &c.verdict)?;
        m.serialize_entry("evidence", &Evidence(c))?;
        m.serialize_entry(
            "stats",
            &StatsJson {
                lifetime_ms: ms(closed.saturating_sub(lifetime_from)),
                retransmits: conn.retransmits,
                ttl_baseline: conn.ttl_baseline,
                facts_dropped: conn.facts_dropped,
                idle_before_end_ms: conn.idle_before_end_ns().map(ms),
            },
        )?;
        m.serialize_entry("h2", &h2_json(c))?;
        m.serialize_entry(
            "peer",
            &c.peer.as_ref().map(|p| PeerJson {
                id: p.id,
                pid: p.pid,
                comm: p.comm.as_deref(),
                netns: p.netns,
                exited: p.exited,
                k8s: self.k8s.and_then(|k| k.peer.as_ref()),
            }),
        )?;
        m.end()
    }
}

/// The `close` object as a JSON value (tests and callers that edit it).
pub fn close_json(c: &Closed, clock: &Clock) -> Value {
    serde_json::to_value(CloseObject {
        closed: c,
        clock,
        k8s: None,
    })
    .unwrap_or(Value::Null)
}
