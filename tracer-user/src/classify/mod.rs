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
pub use verdict::{
    Cause, ClosedBy, Confidence, Initiator, Mechanism, Middlebox, MiddleboxKind, Party, Reason,
    Verdict,
};

use crate::timeline::Timeline;

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
    if t.events_lost {
        v.confidence = v.confidence.lower();
        v.hint.push_str(
            " (kernel events were lost while this connection lived: ring buffer full or \
             too many facts; the verdict may miss what happened, raise --ringbuf-kib)",
        );
    }
}

#[cfg(test)]
mod tests;
