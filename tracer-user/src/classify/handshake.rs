//! Connections that never completed their handshake.

use super::{
    ClosedBy, Confidence, Initiator, Mechanism, Reason, Verdict, ending::errno_seen,
    verdict::verdict,
};
use crate::{
    event::{ECONNREFUSED, ECONNRESET, ETIMEDOUT},
    timeline::{FactKind, Role, RstOrigin, Timeline},
};

pub(super) fn failure(t: &Timeline) -> Verdict {
    let refused = errno_seen(t, ECONNREFUSED)
        || errno_seen(t, ECONNRESET)
        || t.facts
            .iter()
            .any(|f| matches!(f.kind, FactKind::RstReceived { .. }));
    if t.role == Role::Client && refused {
        let origin = t.facts.iter().find_map(|f| match f.kind {
            FactKind::RstReceived { origin, .. } => Some(origin),
            _ => None,
        });
        if origin == Some(RstOrigin::NotSentByPeer) {
            return verdict(
                ClosedBy::Middlebox,
                Reason::ConnectRejected,
                Initiator::Remote,
                Mechanism::Rst,
                Confidence::Medium,
                "the SYN was answered with a RST that the server host never sent: a firewall \
                 REJECT rule in between",
            );
        }
        return verdict(
            ClosedBy::Server,
            Reason::ConnectionRefused,
            Initiator::Remote,
            Mechanism::Rst,
            if origin == Some(RstOrigin::PeerKernel) {
                Confidence::High
            } else {
                Confidence::Medium
            },
            "nothing listens on the server port (or a firewall rejects it); check the service \
             endpoints and the server's listen address",
        );
    }
    if errno_seen(t, ETIMEDOUT) {
        return verdict(
            ClosedBy::Unknown,
            Reason::ConnectTimeout,
            Initiator::Local,
            Mechanism::Timeout,
            Confidence::Low,
            "the SYN was never answered: wrong address, a firewall dropping it, or the server's \
             accept backlog is full",
        );
    }
    let local_close = t
        .facts
        .iter()
        .any(|f| matches!(f.kind, FactKind::CloseCall { .. }))
        || t.facts
            .iter()
            .any(|f| matches!(f.kind, FactKind::State { pid, .. } if pid != 0));
    verdict(
        if local_close && t.role == Role::Client {
            ClosedBy::Client
        } else {
            ClosedBy::Unknown
        },
        Reason::HandshakeFailed,
        Initiator::None,
        Mechanism::None,
        Confidence::Low,
        "the connection never completed its handshake",
    )
}
