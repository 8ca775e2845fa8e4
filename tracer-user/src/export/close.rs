//! The `close` object: one ended socket, its verdict, the evidence it rests on, its stats,
//! its HTTP/2 state and its peer.

use std::{collections::BTreeMap, io, net::SocketAddr};

use serde::{
    Serialize, Serializer,
    ser::{SerializeMap, SerializeSeq},
};
use serde_json::Value;

use super::{Clock, SCHEMA_VERSION, jsonw as w, ms};
use crate::{
    classify::Verdict,
    conn::{
        Closed,
        h2::{H2State, H2Track},
    },
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
    joined_midstream: bool,
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

fn h2_json<'a>(c: &Closed, h: &'a H2Track) -> H2Json<'a> {
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
    H2Json {
        state: h.state,
        preface_seen: h.preface_seen,
        joined_midstream: h.joined_midstream,
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
    }
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
        let family = conn.tuple.map_or("unknown", |t| t.family_name());
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
        let h2 = conn.h2_view();
        m.serialize_entry("h2", &h2.as_deref().map(|h| h2_json(c, h)))?;
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

impl CloseObject<'_> {
    /// The `close` object as one line of JSON, appended to `out`: byte for byte what the
    /// `Serialize` impl above writes (the export tests compare the two on every shape), but
    /// with the keys and punctuation as literals and no allocation. This runs for every
    /// ended socket, and serde_json's escaping of every key byte by byte and its map
    /// machinery were a quarter to a third of the pipeline's CPU (perf, `replay -o json`).
    ///
    /// Fails only if a `Display` impl or the serde fallback (`verdict.middlebox`) does.
    pub fn write_json(&self, out: &mut Vec<u8>) -> io::Result<()> {
        let c = self.closed;
        let conn = &c.conn;
        let closed = conn.closed_ns.unwrap_or(conn.first_ns);
        let lifetime_from = conn.opened_ns.unwrap_or(conn.first_ns);
        let family = conn.tuple.map_or("unknown", |t| t.family_name());
        out.reserve(1600);
        out.extend_from_slice(b"{\"v\":");
        w::int(out, SCHEMA_VERSION);
        out.extend_from_slice(b",\"type\":\"close\",\"ts\":");
        // What `Clock::rfc3339` returns, without the String.
        w::rfc3339_micros(out, self.clock.wall(closed))?;

        out.extend_from_slice(b",\"conn\":{\"id\":");
        w::id(out, conn.id);
        out.extend_from_slice(b",\"family\":");
        w::name(out, family);
        out.extend_from_slice(b",\"local\":");
        w::opt_addr(out, conn.tuple.map(|t| t.local()))?;
        out.extend_from_slice(b",\"remote\":");
        w::opt_addr(out, conn.tuple.map(|t| t.remote()))?;
        out.extend_from_slice(b",\"role\":");
        w::name(out, conn.role.name());
        out.extend_from_slice(b",\"preexisting\":");
        w::boolean(out, conn.preexisting);
        out.extend_from_slice(b",\"pid\":");
        w::opt_int(out, c.owner.as_ref().map(|o| o.0));
        out.extend_from_slice(b",\"comm\":");
        w::opt_string(out, c.owner.as_ref().map(|o| &*o.1));
        out.extend_from_slice(b",\"netns\":");
        w::opt_int(out, conn.netns);
        if let Some(k) = self.k8s.and_then(|k| k.conn.as_ref()) {
            out.extend_from_slice(b",\"k8s\":");
            write_pod(out, k);
        }

        out.extend_from_slice(b"},\"verdict\":");
        write_verdict(out, &c.verdict)?;

        out.extend_from_slice(b",\"evidence\":[");
        for (i, f) in conn.facts.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_fact(out, c, f)?;
        }

        out.extend_from_slice(b"],\"stats\":{\"lifetime_ms\":");
        w::ms(out, closed.saturating_sub(lifetime_from));
        out.extend_from_slice(b",\"retransmits\":");
        w::int(out, conn.retransmits);
        out.extend_from_slice(b",\"ttl_baseline\":");
        w::opt_int(out, conn.ttl_baseline);
        out.extend_from_slice(b",\"facts_dropped\":");
        w::int(out, conn.facts_dropped);
        out.extend_from_slice(b",\"idle_before_end_ms\":");
        w::opt_ms(out, conn.idle_before_end_ns());

        out.extend_from_slice(b"},\"h2\":");
        match (conn.h2.as_deref(), conn.h2_opaque) {
            (Some(h), _) => write_h2(out, c, h)?,
            (None, Some(state)) => write_h2_blank(out, c, state, Some(conn.h2_start())),
            (None, None) => w::null(out),
        }

        out.extend_from_slice(b",\"peer\":");
        match &c.peer {
            Some(p) => {
                out.extend_from_slice(b"{\"id\":");
                w::id(out, p.id);
                out.extend_from_slice(b",\"pid\":");
                w::opt_int(out, p.pid);
                out.extend_from_slice(b",\"comm\":");
                w::opt_string(out, p.comm.as_deref());
                out.extend_from_slice(b",\"netns\":");
                w::opt_int(out, p.netns);
                out.extend_from_slice(b",\"exited\":");
                w::boolean(out, p.exited);
                if let Some(k) = self.k8s.and_then(|k| k.peer.as_ref()) {
                    out.extend_from_slice(b",\"k8s\":");
                    write_pod(out, k);
                }
                out.push(b'}');
            }
            None => w::null(out),
        }
        out.push(b'}');
        Ok(())
    }
}

/// The derived `Serialize` of [`PodIdentity`], by hand (the agent writes one or two per
/// socket on Kubernetes). Destructured whole so that a new field does not compile here.
fn write_pod(out: &mut Vec<u8>, p: &PodIdentity) {
    let PodIdentity {
        node,
        namespace,
        pod,
        container,
        pod_uid,
        container_id,
    } = p;
    out.extend_from_slice(b"{\"node\":");
    w::opt_string(out, node.as_deref());
    out.extend_from_slice(b",\"namespace\":");
    w::opt_string(out, namespace.as_deref());
    out.extend_from_slice(b",\"pod\":");
    w::opt_string(out, pod.as_deref());
    out.extend_from_slice(b",\"container\":");
    w::opt_string(out, container.as_deref());
    out.extend_from_slice(b",\"pod_uid\":");
    w::string(out, pod_uid);
    out.extend_from_slice(b",\"container_id\":");
    w::opt_string(out, container_id.as_deref());
    out.push(b'}');
}

/// The derived `Serialize` of [`Verdict`], by hand; the rare `middlebox` object stays on
/// serde. Destructured whole so that a new field does not compile here.
fn write_verdict(out: &mut Vec<u8>, v: &Verdict) -> io::Result<()> {
    let Verdict {
        closed_by,
        reason,
        tcp_initiator,
        mechanism,
        confidence,
        hint,
        middlebox,
    } = v;
    out.extend_from_slice(b"{\"closed_by\":");
    w::name(out, closed_by.as_str());
    out.extend_from_slice(b",\"reason\":");
    w::name(out, reason.as_str());
    out.extend_from_slice(b",\"tcp_initiator\":");
    w::name(out, tcp_initiator.as_str());
    out.extend_from_slice(b",\"mechanism\":");
    w::name(out, mechanism.as_str());
    out.extend_from_slice(b",\"confidence\":");
    w::name(out, confidence.as_str());
    out.extend_from_slice(b",\"hint\":");
    w::string(out, hint);
    if let Some(m) = middlebox {
        out.extend_from_slice(b",\"middlebox\":");
        serde_json::to_writer(&mut *out, m)?;
    }
    out.push(b'}');
    Ok(())
}

/// One `evidence` item: what [`EvidenceItem`] serialises.
fn write_fact(out: &mut Vec<u8>, c: &Closed, f: &Fact) -> io::Result<()> {
    out.extend_from_slice(b"{\"at_ms\":");
    w::ms(out, f.at_ns.saturating_sub(c.conn.first_ns));
    out.extend_from_slice(b",\"what\":");
    match &f.kind {
        FactKind::State {
            from,
            to,
            pid,
            comm,
            exiting,
        } => {
            out.extend_from_slice(b"\"state\",\"from\":");
            w::name(out, from.name());
            out.extend_from_slice(b",\"to\":");
            w::name(out, to.name());
            // Only transitions made by the owning process carry a meaningful task.
            if matches!(
                to,
                TcpState::SynSent | TcpState::FinWait1 | TcpState::LastAck
            ) || *exiting
            {
                out.extend_from_slice(b",\"pid\":");
                w::int(out, *pid);
                out.extend_from_slice(b",\"comm\":");
                w::string(out, comm);
            }
            if *exiting {
                out.extend_from_slice(b",\"owner_exiting\":true");
            }
        }
        FactKind::FinSent => out.extend_from_slice(b"\"fin_sent\""),
        FactKind::FinReceived { ttl } => {
            out.extend_from_slice(b"\"fin_received\",\"ttl\":");
            w::int(out, *ttl);
        }
        FactKind::RstSent {
            exiting,
            kernel_reason,
        } => {
            out.extend_from_slice(b"\"rst_sent\"");
            if let Some(r) = kernel_reason {
                out.extend_from_slice(b",\"kernel_reason\":");
                w::string(out, r);
            }
            if *exiting {
                out.extend_from_slice(b",\"owner_exiting\":true");
            }
        }
        FactKind::RstReceived {
            ttl,
            origin,
            sender_reason,
        } => {
            out.extend_from_slice(b"\"rst_received\"");
            if let Some(r) = sender_reason {
                out.extend_from_slice(b",\"sender_kernel_reason\":");
                w::string(out, r);
            }
            if *ttl != 0 {
                out.extend_from_slice(b",\"ttl\":");
                w::int(out, *ttl);
            }
            if let Some(b) = c.conn.ttl_baseline {
                out.extend_from_slice(b",\"ttl_baseline\":");
                w::int(out, b);
            }
            out.extend_from_slice(b",\"origin\":");
            w::name(out, origin.name());
        }
        FactKind::TtlChanged { ttl } => {
            out.extend_from_slice(b"\"ttl_changed\",\"ttl\":");
            w::int(out, *ttl);
        }
        FactKind::Retransmit { state } => {
            out.extend_from_slice(b"\"retransmit\",\"state\":");
            w::name(out, state.name());
        }
        FactKind::SocketError { errno } => {
            out.extend_from_slice(b"\"socket_error\",\"errno\":");
            w::int(out, *errno);
            out.extend_from_slice(b",\"error\":");
            w::name(out, errno_name(*errno));
        }
        FactKind::GoAway(g) => {
            out.extend_from_slice(if g.sent {
                b"\"goaway_sent\",\"error_code\":"
            } else {
                b"\"goaway_received\",\"error_code\":"
            });
            w::display_str(out, g.code)?;
            out.extend_from_slice(b",\"last_stream_id\":");
            w::int(out, g.last_stream_id);
            out.extend_from_slice(b",\"debug\":");
            w::string(out, &g.debug);
        }
        FactKind::CloseCall { pid, comm, exiting } => {
            out.extend_from_slice(b"\"close_call\",\"pid\":");
            w::int(out, *pid);
            out.extend_from_slice(b",\"comm\":");
            w::string(out, comm);
            if *exiting {
                out.extend_from_slice(b",\"owner_exiting\":true");
            }
        }
    }
    out.push(b'}');
    Ok(())
}

/// What [`write_h2_full`] writes between the state and `idle_before_close_ms` for a track
/// whose counters are all zero ([`H2Track::is_blank`]), the common case of a socket that
/// never carried HTTP/2 (a third of such a verdict's bytes).
const BLANK_H2_MIDDLE: &[u8] = b",\"preface_seen\":false,\"joined_midstream\":false,\"frames\":0,\"parse_errors\":0,\"desyncs\":0,\"goaways\":[],\"pings\":{\"sent\":0,\"received\":0,\"acks_sent\":0,\"acks_received\":0,\"unanswered_sent\":0,\"unanswered_received\":0,\"min_interval_ms_sent\":null,\"min_interval_ms_received\":null,\"median_interval_ms_sent\":null,\"median_interval_ms_received\":null},\"rst_streams\":{\"sent\":{},\"received\":{}},\"streams_open_at_close\":0,\"max_open_streams\":0,\"idle_before_close_ms\":";

/// The `h2` object: what [`h2_json`] builds, written as it is read.
fn write_h2(out: &mut Vec<u8>, c: &Closed, h: &H2Track) -> io::Result<()> {
    if !h.is_blank() {
        return write_h2_full(out, c, h);
    }
    write_h2_blank(out, c, h.state, h.idle_since_ns);
    Ok(())
}

/// The `h2` object of a tracker whose counters are all zero: its state and idle time.
fn write_h2_blank(out: &mut Vec<u8>, c: &Closed, state: H2State, idle_since_ns: Option<u64>) {
    let closed = c.conn.closed_ns.unwrap_or(c.conn.first_ns);
    out.extend_from_slice(b"{\"state\":");
    w::name(out, state.name());
    out.extend_from_slice(BLANK_H2_MIDDLE);
    w::opt_ms(out, idle_since_ns.map(|t| closed.saturating_sub(t)));
    out.push(b'}');
}

fn write_h2_full(out: &mut Vec<u8>, c: &Closed, h: &H2Track) -> io::Result<()> {
    let start = c.conn.first_ns;
    let closed = c.conn.closed_ns.unwrap_or(start);
    out.extend_from_slice(b"{\"state\":");
    w::name(out, h.state.name());
    out.extend_from_slice(b",\"preface_seen\":");
    w::boolean(out, h.preface_seen);
    out.extend_from_slice(b",\"joined_midstream\":");
    w::boolean(out, h.joined_midstream);
    out.extend_from_slice(b",\"frames\":");
    w::int(out, h.frames);
    out.extend_from_slice(b",\"parse_errors\":");
    w::int(out, h.parse_errors);
    out.extend_from_slice(b",\"desyncs\":");
    w::int(out, h.desyncs);
    out.extend_from_slice(b",\"goaways\":[");
    for (i, g) in h.goaways.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(if g.sent {
            b"{\"dir\":\"sent\",\"at_ms\":"
        } else {
            b"{\"dir\":\"received\",\"at_ms\":"
        });
        w::ms(out, g.at_ns.saturating_sub(start));
        out.extend_from_slice(b",\"error_code\":");
        w::display_str(out, g.code)?;
        out.extend_from_slice(b",\"code\":");
        w::int(out, g.code.0);
        out.extend_from_slice(b",\"last_stream_id\":");
        w::int(out, g.last_stream_id);
        out.extend_from_slice(b",\"debug\":");
        w::string(out, &g.debug);
        out.extend_from_slice(b",\"debug_truncated\":");
        w::boolean(out, g.debug_truncated);
        out.extend_from_slice(b",\"idle_ms\":");
        w::opt_ms(out, g.idle_ns);
        out.push(b'}');
    }
    let (sent, received) = (&h.ping_sent, &h.ping_received);
    out.extend_from_slice(b"],\"pings\":{\"sent\":");
    w::int(out, sent.pings);
    out.extend_from_slice(b",\"received\":");
    w::int(out, received.pings);
    out.extend_from_slice(b",\"acks_sent\":");
    w::int(out, sent.acks);
    out.extend_from_slice(b",\"acks_received\":");
    w::int(out, received.acks);
    out.extend_from_slice(b",\"unanswered_sent\":");
    w::int(out, sent.unanswered());
    out.extend_from_slice(b",\"unanswered_received\":");
    w::int(out, received.unanswered());
    out.extend_from_slice(b",\"min_interval_ms_sent\":");
    w::opt_ms(out, sent.min_interval_ns());
    out.extend_from_slice(b",\"min_interval_ms_received\":");
    w::opt_ms(out, received.min_interval_ns());
    out.extend_from_slice(b",\"median_interval_ms_sent\":");
    w::opt_ms(out, sent.median_interval_ns());
    out.extend_from_slice(b",\"median_interval_ms_received\":");
    w::opt_ms(out, received.median_interval_ns());
    out.extend_from_slice(b"},\"rst_streams\":{\"sent\":");
    write_counts(out, &h.rst_sent);
    out.extend_from_slice(b",\"received\":");
    write_counts(out, &h.rst_received);
    out.extend_from_slice(b"},\"streams_open_at_close\":");
    w::int(out, h.open_streams());
    out.extend_from_slice(b",\"max_open_streams\":");
    w::int(out, h.max_open_streams);
    out.extend_from_slice(b",\"idle_before_close_ms\":");
    w::opt_ms(out, h.idle_since_ns.map(|t| closed.saturating_sub(t)));
    out.push(b'}');
    Ok(())
}

/// A map of counts by name (`rst_streams.sent`), in the map's order.
fn write_counts(out: &mut Vec<u8>, m: &BTreeMap<String, u32>) {
    out.push(b'{');
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        w::string(out, k);
        out.push(b':');
        w::int(out, *v);
    }
    out.push(b'}');
}

/// The `close` object as a JSON value (tests and callers that edit it).
pub fn close_json(c: &Closed, clock: &Clock) -> Value {
    let obj = CloseObject {
        closed: c,
        clock,
        k8s: None,
    };
    // Every test that builds a close object (the golden files among them) also checks that
    // the writer the pipeline uses is byte for byte the serde form.
    #[cfg(test)]
    assert_writer_matches_serde(&obj);
    serde_json::to_value(obj).unwrap_or(Value::Null)
}

/// Panics unless [`CloseObject::write_json`] writes exactly what serde_json writes for the
/// `Serialize` impl (also when appending to a buffer that already holds something).
#[cfg(test)]
pub(super) fn assert_writer_matches_serde(obj: &CloseObject<'_>) {
    let want = serde_json::to_vec(obj).expect("serde_json");
    let mut got = b"previous line\n".to_vec();
    obj.write_json(&mut got).expect("write_json");
    let got = got.split_off(b"previous line\n".len());
    if got != want {
        let at = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        panic!(
            "write_json differs from serde_json at byte {at}:\n  serde: {}\n  fast:  {}",
            String::from_utf8_lossy(&want[at.saturating_sub(60)..]),
            String::from_utf8_lossy(&got[at.saturating_sub(60)..]),
        );
    }
}
