//! The classifier: a pure function from one socket's timeline to a verdict.
//!
//! One rule per named case, applied to the *first terminating signal* of the connection
//! (the first FIN, RST or timeout, in either direction). The connection table does all the
//! impure work beforehand: it resolves where each received RST came from and what the peer
//! socket did when the peer is also on this host.
//!
//! Rules by concern: [`tcp`] (FIN endings and this socket's own RST), [`rst`] (a RST from
//! the other side), [`timeout`], [`handshake`] and [`http2`] (the layer-7 decision, which
//! wins over the TCP one when there is one).

mod ending;
mod handshake;
mod http2;
mod proxy;
mod rst;
mod tcp;
mod timeout;
mod verdict;

pub use ending::leg_end;
pub(crate) use proxy::PAIR_WINDOW_NS;
pub use verdict::{
    Cause, ClosedBy, Confidence, Initiator, Mechanism, Middlebox, MiddleboxKind, Party, Reason,
    Verdict,
};

use crate::timeline::{FactKind, RstOrigin, Timeline};

/// The verdict for one ended socket: the HTTP/2 decision when there is one, else the TCP
/// one. `tcp_initiator` always comes from TCP, so both layers show.
pub fn classify(t: &Timeline) -> Verdict {
    let tcp = tcp::classify_tcp(t);
    let l7 = http2::rules(t, &tcp).unwrap_or(tcp);
    let mut v = proxy::rules(t, &l7).unwrap_or(l7);
    calibrate(t, &mut v);
    v
}

/// Confidence is a promise: lower it where the evidence cannot carry it.
fn calibrate(t: &Timeline, v: &mut Verdict) {
    if t.role_inferred {
        v.confidence = v.confidence.lower();
    }
    // With TLS the application layer is opaque: a FIN says who closed the socket, not who
    // decided (an encrypted GOAWAY or close_notify from the other side may have come first).
    if t.tls
        && v.confidence == Confidence::High
        && v.mechanism == Mechanism::Fin
        && matches!(v.reason, Reason::By(_, Cause::Close))
    {
        v.confidence = Confidence::Medium;
        v.hint.push_str(
            " (TLS: the payload is opaque, so the first FIN alone does not prove who decided; \
             an encrypted GOAWAY or close_notify from the other side may have come first)",
        );
    }
    // Only this end on this host: the other end's FIN or GOAWAY is seen, not who decided
    // there; a proxy or load balancer in front of the real peer looks exactly the same.
    // (A RST the peer socket sent is proof, and stays. A no-socket RST from a kernel on
    // this host is not, without the peer: that kernel may be a NAT's answering for a VIP.)
    let remote: ClosedBy = t.role.opposite().into();
    let proven_here = t.facts.iter().any(|f| {
        matches!(
            f.kind,
            FactKind::RstReceived {
                origin: RstOrigin::PeerSocket,
                ..
            }
        )
    });
    let single_ended = t.peer.is_none()
        && t.proxy.is_none()
        && !proven_here
        && remote != ClosedBy::Unknown
        && v.closed_by == remote;
    if single_ended && v.confidence == Confidence::High {
        v.confidence = Confidence::Medium;
        v.hint.push_str(
            " (the other end is not traced on this host, so this is what arrived from its side; \
             a proxy or load balancer in front of it would look the same: trace that host too)",
        );
    }
    if single_ended {
        if let Some(lb) = idle_hint(t) {
            v.hint.push_str(&lb);
        }
    }
    if t.events_lost {
        v.confidence = v.confidence.lower();
        v.hint.push_str(
            " (kernel events were lost while this connection lived: a full ring buffer, \
             program runs the kernel skipped, or too many facts; the verdict may miss what \
             happened; the drops records say which)",
        );
    }
}

#[cfg(test)]
mod tests;

/// Well-known idle timeouts of load balancers and NAT tables, in seconds.
const KNOWN_IDLE_TIMEOUTS: [(&str, u64); 5] = [
    ("AWS ALB", 60),
    ("Azure Load Balancer", 240),
    ("AWS NLB", 350),
    ("GCP load balancer / Cloud NAT", 600),
    ("IPVS (kube-proxy ipvs mode)", 900),
];

/// When the connection had been idle for about a well-known idle timeout before the other
/// side ended it, say so: an inference for the hint only. Idle is "no open HTTP/2 stream"
/// when HTTP/2 was parsed (keepalive PINGs are bytes but not activity), otherwise "no
/// payload either way" from the packet hooks, which works for TLS and plain TCP too.
fn idle_hint(t: &Timeline) -> Option<String> {
    let since =
        t.h2.as_ref()
            .and_then(|h| h.idle_since_ns)
            .or(t.last_data_ns)?;
    let (end, _) = ending::first_ending(t)?;
    let idle_s = end.saturating_sub(since) as f64 / 1e9;
    let (name, secs) = KNOWN_IDLE_TIMEOUTS
        .iter()
        .find(|(_, s)| (idle_s - *s as f64).abs() <= (*s as f64) * 0.05)?;
    Some(format!(
        "; it had been idle {idle_s:.0} s, close to the {name} idle timeout ({secs} s): \
         possibly that device (inferred from the timing alone)"
    ))
}
