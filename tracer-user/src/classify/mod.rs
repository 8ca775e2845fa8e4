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
mod rst;
mod tcp;
mod timeout;
mod verdict;

pub use verdict::{Cause, ClosedBy, Confidence, Initiator, Mechanism, Party, Reason, Verdict};

use crate::timeline::Timeline;

/// The verdict for one ended socket: the HTTP/2 decision when there is one, else the TCP
/// one. `tcp_initiator` always comes from TCP, so both layers show.
pub fn classify(t: &Timeline) -> Verdict {
    let tcp = tcp::classify_tcp(t);
    let mut v = http2::rules(t, &tcp).unwrap_or(tcp);
    if t.role_inferred {
        v.confidence = v.confidence.lower();
    }
    v
}

#[cfg(test)]
mod tests;
