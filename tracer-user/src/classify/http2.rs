//! Layer-7 rules: who decided to end an HTTP/2 connection, whoever sent the first FIN/RST.

use super::{
    Cause, ClosedBy, Confidence, Initiator, Mechanism, Middlebox, MiddleboxKind, Party, Reason,
    Verdict, ending::first_ending, verdict::verdict,
};
use crate::{
    h2::Reason as ErrorCode,
    timeline::{FactKind, GoAway, H2Summary, Role, Timeline},
};

/// The debug text names an idle timeout of the connection ("max_idle", "idleTimeout",
/// "connection idle", "idle timeout"), not an error that merely mentions a stream state
/// (`RST_STREAM: stream in idle`, "frame on idle stream").
fn is_idle(debug: &str) -> bool {
    let d = debug.to_ascii_lowercase();
    let about_stream = d.contains("stream in idle")
        || d.contains("idle stream")
        || d.contains("in idle state")
        || d.contains("rst_stream");
    !about_stream
        && (d.contains("max_idle")
            || d.contains("idle_timeout")
            || d.contains("idletimeout")
            || d.contains("idle timeout")
            || d.contains("connection idle")
            || d.contains("idle connection")
            || d == "idle")
}

fn is_age(debug: &str) -> bool {
    let d = debug.to_ascii_lowercase();
    d.contains("max_age") || d.contains("agetimeout") || d.contains("connection_age") || d == "age"
}

fn secs(ns: u64) -> String {
    let s = ns as f64 / 1e9;
    if s >= 10.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

/// The HTTP/2 verdict, when the HTTP/2 evidence decides who ended the connection.
pub(super) fn rules(t: &Timeline, tcp: &Verdict) -> Option<Verdict> {
    let h = t.h2.as_ref()?;
    let ending_at = first_ending(t).map(|(at, _)| at);
    let before_end = |at: u64| ending_at.is_none_or(|e| at <= e);
    if let Some(g) = h.goaways.iter().find(|g| before_end(g.at_ns)) {
        return Some(goaway(t, h, tcp, g));
    }
    if !h.synced {
        return None;
    }
    keepalive(t, h, tcp, ending_at).or_else(|| close_without_goaway(h, tcp, ending_at))
}

/// An unanswered PING is keepalive evidence only while nothing was answered after it: a
/// later PING acknowledged means the peer and the path were alive (the early one was lost
/// or ignored), however long before the close it went out.
fn still_unanswered(since: Option<u64>, answered_at: Option<u64>) -> Option<u64> {
    since.filter(|s| answered_at.is_none_or(|a| a < *s))
}

/// Frames from the peer kept arriving well after this PING went out (more than a second:
/// not just what was already in flight when the path broke): the peer and the path were
/// alive, so the PING is no keepalive evidence.
fn heard_after(h: &H2Summary, since: u64) -> bool {
    h.last_received_ns
        .is_some_and(|r| r > since.saturating_add(HEARD_AFTER_NS))
}

const HEARD_AFTER_NS: u64 = 1_000_000_000;

/// PINGs from the client side that went unanswered, and their cadence.
fn client_pings(role: Role, h: &H2Summary) -> (Option<u64>, Option<u64>) {
    match role {
        Role::Client | Role::Unknown => (
            still_unanswered(h.unanswered_sent_since, h.answered_sent_at)
                .filter(|s| !heard_after(h, *s)),
            h.ping_interval_sent_ns,
        ),
        Role::Server => (
            still_unanswered(h.unanswered_received_since, h.answered_received_at),
            h.ping_interval_received_ns,
        ),
    }
}

/// The first GOAWAY before the TCP ending names the side that decided.
fn goaway(t: &Timeline, h: &H2Summary, tcp: &Verdict, g: &GoAway) -> Verdict {
    let role = t.role;
    let mechanism = match tcp.mechanism {
        Mechanism::Fin => Mechanism::GoawayThenFin,
        Mechanism::Rst => Mechanism::GoawayThenRst,
        Mechanism::Timeout => Mechanism::GoawayThenTimeout,
        m => m,
    };
    let (client_unanswered, client_interval) = client_pings(role, h);
    // Which side sent it: this socket when `sent`, else the peer.
    let from_local = g.sent;
    let sender_role = if from_local { role } else { role.opposite() };
    let who = Party::of(role, from_local);
    let debug = if g.debug.is_empty() {
        String::new()
    } else {
        format!(" \"{}\"", g.debug)
    };
    let closed_by: ClosedBy = sender_role.into();
    let v = |cause: Cause, hint: String| {
        verdict(
            closed_by,
            Reason::By(who, cause),
            tcp.tcp_initiator,
            mechanism,
            Confidence::High,
            hint,
        )
    };
    let code = g.code;
    if sender_role == Role::Server || (role == Role::Unknown && !from_local) {
        if code == ErrorCode::ENHANCE_YOUR_CALM && g.debug.contains("too_many_pings") {
            let every = client_interval
                .map(|n| format!("every {} ms", n / 1_000_000))
                .unwrap_or_else(|| "too often".into());
            return v(
                Cause::TooManyPings,
                format!(
                    "the {who} sent GOAWAY ENHANCE_YOUR_CALM{debug}: the client sent keepalive PINGs {every}, \
                     more often than the server's enforcement allows (grpc: \
                     min_ping_interval_without_data_ms / EnforcementPolicy.MinTime, permit_without_stream); \
                     raise the client's keepalive time above the server's minimum or relax the server policy"
                ),
            );
        }
        // grpc-go/Kitex say NO_ERROR "max_idle"/"idleTimeout"; grpc C-core (grpcio 1.85)
        // says INTERNAL_ERROR "connection idle": the text decides, not the code.
        if is_idle(&g.debug) {
            let idle = g
                .idle_ns
                .map(|n| format!(" after {} without an open stream", secs(n)))
                .unwrap_or_default();
            return v(
                Cause::IdleTimeout,
                format!(
                    "the {who}'s max idle timer fired{idle} (GOAWAY {code}{debug}); expected behaviour: \
                     let the client reconnect on demand, or raise max_connection_idle on the server"
                ),
            );
        }
        if is_age(&g.debug) {
            return v(
                Cause::MaxAge,
                format!(
                    "the {who} reached its max connection age and drained the connection (GOAWAY {code}{debug}); \
                     clients must retry on a new connection; raise max_connection_age(+grace) if that is too often"
                ),
            );
        }
        if let Some(v) = infer_goaway_cause(h, tcp, g, who, mechanism, closed_by) {
            return v;
        }
        return v(
            Cause::Goaway,
            format!("the {who} sent GOAWAY {code}{debug}; check the {who}'s logs around this time"),
        );
    }
    // The client sent the GOAWAY.
    if let Some(since) = client_unanswered.filter(|s| *s <= g.at_ns) {
        return verdict(
            closed_by,
            Reason::By(who, Cause::KeepaliveTimeout),
            tcp.tcp_initiator,
            Mechanism::PingTimeout,
            Confidence::High,
            format!(
                "the {who}'s keepalive PING went unanswered for {} and it gave up on the connection: \
                 the server or the path stopped responding (blackhole, stale NAT/conntrack entry, \
                 overloaded server)",
                secs(g.at_ns.saturating_sub(since))
            ),
        );
    }
    v(
        Cause::Goaway,
        format!(
            "the {who} ended the connection with GOAWAY {code}{debug} (e.g. it closed its channel)"
        ),
    )
}

/// No stream for this long before a GOAWAY or FIN makes it an idle close.
const IDLE_INFER_NS: u64 = 1_000_000_000;

/// A GOAWAY NO_ERROR whose text names no cause: what the stream activity says, stated as
/// an inference (`medium`). Idle for a while with no open stream: an idle timeout. Sent
/// while streams were open, or in two steps (the first announcing the maximum stream id):
/// a graceful shutdown draining them (max age or a restart; the text does not say which).
fn infer_goaway_cause(
    h: &H2Summary,
    tcp: &Verdict,
    g: &GoAway,
    who: Party,
    mechanism: Mechanism,
    closed_by: ClosedBy,
) -> Option<Verdict> {
    if g.code != ErrorCode::NO_ERROR {
        return None;
    }
    let from_same_side = h.goaways.iter().filter(|x| x.sent == g.sent).count();
    let debug = if g.debug.is_empty() {
        "no debug text".to_string()
    } else {
        format!("debug \"{}\" names no cause", g.debug)
    };
    let v = |cause, hint: String| {
        Some(verdict(
            closed_by,
            Reason::By(who, cause),
            tcp.tcp_initiator,
            mechanism,
            Confidence::Medium,
            hint,
        ))
    };
    match g.idle_ns {
        Some(idle) if idle >= IDLE_INFER_NS && from_same_side == 1 => v(
            Cause::IdleTimeout,
            format!(
                "inferred: the {who} sent GOAWAY NO_ERROR ({debug}) after {} without an open stream, \
                 the signature of an idle timeout (grpc max_connection_idle, a proxy's keepalive/idle \
                 timeout); raise it or let the client reconnect on demand",
                secs(idle)
            ),
        ),
        None => v(
            Cause::Shutdown,
            format!(
                "inferred: the {who} sent GOAWAY NO_ERROR ({debug}) while streams were open: a graceful \
                 shutdown draining them (max connection age, a restart or a scale-down); clients \
                 must retry on a new connection"
            ),
        ),
        Some(_) if from_same_side >= 2 && g.last_stream_id == (1 << 31) - 1 => v(
            Cause::Shutdown,
            format!(
                "inferred: the {who} sent two GOAWAYs NO_ERROR ({debug}), the first announcing the \
                 largest stream id: a graceful drain (max connection age, a restart or a scale-down)"
            ),
        ),
        _ => None,
    }
}

/// The client's keepalive gave up: its PING went unanswered and then either the kernel
/// timed the socket out (grpc sets TCP_USER_TIMEOUT to the keepalive timeout) or the
/// client closed it.
fn keepalive(
    t: &Timeline,
    h: &H2Summary,
    tcp: &Verdict,
    ending_at: Option<u64>,
) -> Option<Verdict> {
    let before_end = |at: u64| ending_at.is_none_or(|e| at <= e);
    let role = t.role;
    let (client_unanswered, _) = client_pings(role, h);
    let ended_by_client = matches!(
        (tcp.tcp_initiator, role),
        (Initiator::Local, Role::Client) | (Initiator::Remote, Role::Server)
    );
    if let (Some(since), true) = (
        still_unanswered(h.unanswered_sent_since, h.answered_sent_at)
            .filter(|s| !heard_after(h, *s)),
        role == Role::Client && tcp.mechanism == Mechanism::Timeout,
    ) {
        if before_end(since) {
            if tcp.reason == Reason::PathBlackhole {
                // The server socket was still open on this host while the client's kernel
                // gave up: the path, not an endpoint, ended it.
                return Some(ping_blackhole(
                    t,
                    since,
                    ending_at,
                    tcp.tcp_initiator,
                    Mechanism::Timeout,
                ));
            }
            let path = if tcp.confidence == Confidence::High {
                "the server socket was still open on this host, so the path dropped the packets"
            } else {
                "the path or the server stopped responding"
            };
            return Some(verdict(
                ClosedBy::Client,
                Reason::By(Party::Client, Cause::KeepaliveTimeout),
                tcp.tcp_initiator,
                Mechanism::Timeout,
                Confidence::High,
                format!(
                    "the client's keepalive PING went unanswered and its keepalive timeout (TCP_USER_TIMEOUT) \
                     ended the connection; {path} (firewall DROP, blackhole route, stale NAT/conntrack entry)"
                ),
            ));
        }
    }
    if let (true, Some(since)) = (ended_by_client, client_unanswered) {
        if before_end(since) && tcp.closed_by != ClosedBy::Middlebox {
            // The PING's own segment went unacknowledged at the TCP level while the peer
            // socket was open here: the path dropped it. (A PING TCP acknowledged but HTTP/2
            // never answered is a stuck server, not the path.)
            let peer_open = t.peer.as_ref().is_some_and(|p| !p.closed_first);
            let unacked_since_ping = t
                .facts
                .iter()
                .any(|f| f.at_ns >= since && matches!(f.kind, FactKind::Retransmit { .. }));
            if peer_open && unacked_since_ping {
                return Some(ping_blackhole(
                    t,
                    since,
                    ending_at,
                    tcp.tcp_initiator,
                    Mechanism::PingTimeout,
                ));
            }
            let who = Party::of(role, role == Role::Client);
            return Some(verdict(
                ClosedBy::Client,
                Reason::By(who, Cause::KeepaliveTimeout),
                tcp.tcp_initiator,
                Mechanism::PingTimeout,
                Confidence::High,
                format!(
                    "the {who}'s keepalive PING went unanswered and it closed the connection: the server or \
                     the path stopped responding (blackhole, stale NAT/conntrack entry, overloaded server)"
                ),
            ));
        }
    }
    None
}

/// A keepalive that gave up while the peer socket was still open on this host.
fn ping_blackhole(
    t: &Timeline,
    since: u64,
    ending_at: Option<u64>,
    initiator: Initiator,
    mechanism: Mechanism,
) -> Verdict {
    let detected_by = Party::of(t.role, true);
    let after_ms = ending_at.map(|e| e.saturating_sub(since) / 1_000_000);
    let after = after_ms
        .map(|ms| format!(" after {}", secs(ms * 1_000_000)))
        .unwrap_or_default();
    let mut v = verdict(
        ClosedBy::Middlebox,
        Reason::PathBlackhole,
        initiator,
        mechanism,
        Confidence::High,
        format!(
            "the {detected_by}'s keepalive PING went unanswered and it gave up{after}, while the \
             other end's socket was still open on this host: the path dropped the packets \
             (firewall DROP, blackhole route, stale NAT/conntrack entry)"
        ),
    );
    v.middlebox = Some(Middlebox {
        detected_by: Some(detected_by.name()),
        after_ms,
        ..Middlebox::of(MiddleboxKind::Path)
    });
    v
}

/// A synced HTTP/2 connection the server ended at the TCP level, with no GOAWAY first.
/// After streams had run and then none was open for a while, that is an idle close
/// (inferred, `medium`).
fn close_without_goaway(h: &H2Summary, tcp: &Verdict, ending_at: Option<u64>) -> Option<Verdict> {
    let process_exit = matches!(tcp.reason, Reason::By(_, Cause::ProcessExit));
    let server_ended = tcp.closed_by == ClosedBy::Server
        && matches!(tcp.mechanism, Mechanism::Fin | Mechanism::Rst)
        && !process_exit;
    if !server_ended {
        return None;
    }
    let idle = match (h.idle_since_ns, ending_at) {
        (Some(s), Some(e)) if h.open_streams == 0 && h.max_open_streams > 0 => {
            Some(e.saturating_sub(s))
        }
        _ => None,
    };
    if let Some(idle) = idle.filter(|i| *i >= IDLE_INFER_NS && tcp.mechanism == Mechanism::Fin) {
        return Some(verdict(
            ClosedBy::Server,
            Reason::By(Party::Server, Cause::IdleTimeout),
            tcp.tcp_initiator,
            tcp.mechanism,
            Confidence::Medium,
            format!(
                "inferred: the server side closed the HTTP/2 connection with a bare FIN (no GOAWAY) \
                 after {} without an open stream, the signature of an idle timeout in the server or \
                 a proxy/LB in front of it; check their idle timeouts",
                secs(idle)
            ),
        ));
    }
    Some(verdict(
        ClosedBy::Server,
        Reason::ServerCloseNoGoaway,
        tcp.tcp_initiator,
        tcp.mechanism,
        Confidence::Medium,
        "the server side closed the HTTP/2 connection without a GOAWAY: an abrupt close (crash, \
         kill, hard timeout) or a proxy/LB in front of the server ending it; check both",
    ))
}
