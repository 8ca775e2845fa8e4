//! A proxy on this host (haproxy, nginx, a sidecar: any process holding this connection's
//! one end and another leg) that ended the connection on its own account, or that only
//! passed on an ending that came from its other leg.

use super::{
    ClosedBy, Confidence, Mechanism, Middlebox, MiddleboxKind, Reason, Verdict, verdict::verdict,
};
use crate::{
    h2::Reason as ErrorCode,
    timeline::{LegEnd, ProxyLeg, ProxyView, Timeline},
};

/// Two legs ended by the proxy within this of each other were ended by one decision.
pub(crate) const PAIR_WINDOW_NS: u64 = 200_000_000;
/// An ending on the other leg this soon after the proxy's own still counts as "first"
/// (the two reach the agent through different CPUs).
const RELAY_SLACK_NS: u64 = 1_000_000;

fn leg_name(l: ProxyLeg) -> &'static str {
    match l {
        ProxyLeg::Downstream => "downstream (client-facing)",
        ProxyLeg::Upstream => "upstream (backend-facing)",
    }
}

/// How the other leg ended. It is only ever a closed socket (the legs of a proxy are
/// joined when they close), so `unknown` is a closed leg whose ending was not seen.
fn ended_name(e: Option<&(u64, LegEnd)>) -> &'static str {
    match e.map(|(_, e)| e) {
        None => "unknown",
        Some(e) if e.is_own() => "by_proxy",
        Some(LegEnd::OwnExit) => "proxy_exit",
        Some(_) => "by_far_side",
    }
}

/// The verdict when a proxy on this host decided the ending; `base` is the two-party
/// verdict, kept (with the relay named) when the proxy only passed an ending on.
pub(super) fn rules(t: &Timeline, base: &Verdict) -> Option<Verdict> {
    let p = t.proxy.as_ref()?;
    let (at, end) = p.ended.as_ref()?;
    if !end.is_own() {
        return None;
    }
    let other_end = p.other.as_ref().and_then(|o| o.ended.as_ref());
    let who = format!("{}({})", p.comm, p.pid);
    if let Some((oat, oend)) = other_end {
        if !oend.is_own() && *oat <= at.saturating_add(RELAY_SLACK_NS) {
            // Its other leg ended first from the far side: the proxy passed it on.
            let mut v = base.clone();
            v.hint = format!(
                "{} (passed on by the proxy {who}: its other leg ended first, {})",
                v.hint,
                oend.name()
            );
            return Some(unproven_pairing(p, v));
        }
    }
    if p.other.is_none() && p.leg == ProxyLeg::Downstream {
        // A known proxy ended its client-facing leg and its backend leg is not visible: it
        // may have decided, or passed on an ending from its backend. The two-party verdict
        // stands (the proxy is that end), without the proof `high` needs.
        let mut v = base.clone();
        if v.confidence == Confidence::High {
            v.confidence = Confidence::Medium;
        }
        let end_of = if p.local {
            "this socket's own process"
        } else {
            "the end this socket talked to"
        };
        v.hint = format!(
            "{} ({end_of} is the proxy {who}; its backend leg is not visible on this host, so \
             whether the proxy decided this or passed on an ending from its backend is not known)",
            v.hint
        );
        return Some(v);
    }
    let paired =
        other_end.is_some_and(|(oat, oend)| oend.is_own() && oat.abs_diff(*at) <= PAIR_WINDOW_NS);
    // Proven: the proxy's own action on this leg, and its other leg seen, either ended by the
    // proxy at the same moment, or (a process known as a proxy) ended apart. A closed other
    // leg whose ending was not seen (its events lost) may have been where the ending came
    // from: the proxy then only passed it on, so nothing is proven.
    let confidence = match (&p.other, paired, p.known_name) {
        (Some(_), true, _) => Confidence::High,
        (Some(_), false, true) if other_end.is_none() => Confidence::Low,
        (Some(_), false, true) => Confidence::High,
        (None, _, true) if p.leg == ProxyLeg::Upstream => Confidence::Medium,
        _ => return None,
    };
    Some(unproven_pairing(
        p,
        own_decision(base, p, end, paired, confidence, &who),
    ))
}

/// Legs are paired by time alone. When another leg of the proxy ended about as near with a
/// different story, the pairing, and so the story told, is not proof.
fn unproven_pairing(p: &ProxyView, mut v: Verdict) -> Verdict {
    if p.other.as_ref().is_some_and(|o| o.ambiguous) {
        if v.confidence == Confidence::High {
            v.confidence = Confidence::Medium;
        }
        v.hint.push_str(
            " (the proxy ended other connections at about the same time, so it is not certain \
             which of its legs belongs with this one)",
        );
    }
    v
}

fn own_decision(
    base: &Verdict,
    p: &ProxyView,
    end: &LegEnd,
    paired: bool,
    confidence: Confidence,
    who: &str,
) -> Verdict {
    let (reason, action, what) = match end {
        LegEnd::OwnRst => (Reason::ProxyReset, "rst", "reset it".to_string()),
        LegEnd::OwnGoaway { code, debug } => {
            let d = if debug.is_empty() {
                String::new()
            } else {
                format!(" \"{debug}\"")
            };
            let why = if *code == ErrorCode::NO_ERROR {
                " (NO_ERROR: an idle/keepalive timeout or a graceful shutdown)"
            } else {
                ""
            };
            (
                Reason::ProxyGoaway,
                "goaway",
                format!("sent GOAWAY {code}{d}{why}"),
            )
        }
        _ => (
            Reason::ProxyClose,
            "fin",
            "closed it (first FIN)".to_string(),
        ),
    };
    let other = match (&p.other, paired) {
        (Some(o), true) => format!(
            ", and ended its other leg {} at the same moment",
            addr_pair(o.local, o.remote)
        ),
        (Some(o), false) => match &o.ended {
            None => format!(
                "; its other leg {} closed too, but how it ended was not seen (kernel events \
                 lost), so the proxy may only have passed on an ending that came from that side",
                addr_pair(o.local, o.remote)
            ),
            Some(_) => format!(
                "; its other leg {} ended separately",
                addr_pair(o.local, o.remote)
            ),
        },
        (None, _) => ", its other leg is not visible on this host".to_string(),
    };
    let side = if p.local {
        "this socket's own process"
    } else {
        "the process at the other end"
    };
    let mechanism = match (end, base.mechanism) {
        (LegEnd::OwnGoaway { .. }, Mechanism::Rst | Mechanism::GoawayThenRst) => {
            Mechanism::GoawayThenRst
        }
        (LegEnd::OwnGoaway { .. }, Mechanism::Timeout | Mechanism::GoawayThenTimeout) => {
            Mechanism::GoawayThenTimeout
        }
        (LegEnd::OwnGoaway { .. }, _) => Mechanism::GoawayThenFin,
        (_, m) => m,
    };
    let mut v = verdict(
        ClosedBy::Middlebox,
        reason,
        base.tcp_initiator,
        mechanism,
        confidence,
        format!(
            "the proxy {who} ({side}, on its {} leg) {what} on its own account{other}: \
             typically its idle timeout (haproxy `timeout client/server/tunnel`, nginx \
             `keepalive_timeout`/`proxy_timeout`/`grpc_read_timeout`), a request or age limit, \
             or a reload; check that proxy's timeouts and keep them above the application's \
             idle periods (or send keepalives)",
            leg_name(p.leg)
        ),
    );
    v.middlebox = Some(Middlebox {
        pid: Some(p.pid),
        comm: Some(p.comm.clone()),
        netns: p.netns,
        leg: Some(p.leg),
        action: Some(action),
        other_leg: p.other.as_ref().map(|o| addr_pair(o.local, o.remote)),
        other_leg_ended: p.other.as_ref().map(|o| ended_name(o.ended.as_ref())),
        ..Middlebox::of(MiddleboxKind::Proxy)
    });
    v
}

fn addr_pair(l: Option<std::net::SocketAddr>, r: Option<std::net::SocketAddr>) -> String {
    let s = |a: Option<std::net::SocketAddr>| a.map(|a| a.to_string()).unwrap_or("?".into());
    format!("{} -> {}", s(l), s(r))
}
