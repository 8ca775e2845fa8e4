//! Retransmission and keepalive timeouts: the path, not an endpoint, ended the connection.

use super::{
    ClosedBy, Confidence, Initiator, Mechanism, Middlebox, MiddleboxKind, Party, Reason, Verdict,
    ending::{first_ending, retransmits},
    verdict::verdict,
};
use crate::{
    event::errno_name,
    timeline::{FactKind, Timeline},
};

pub(super) fn timeout(t: &Timeline, errno: i32) -> Verdict {
    let n = retransmits(t);
    let who = Party::of(t.role, false);
    let (reason, what) = if n > 0 {
        (
            Reason::RetransmissionTimeout,
            format!("{n} retransmissions went unacknowledged"),
        )
    } else {
        (
            Reason::KeepaliveTimeout,
            "keepalive probes went unanswered".to_string(),
        )
    };
    let peer_alive = t.peer.as_ref().is_some_and(|p| !p.closed_first);
    if peer_alive {
        // Both ends seen: the other socket was there all along, so the path lost the packets.
        let first_rtx = t
            .facts
            .iter()
            .find(|f| matches!(f.kind, FactKind::Retransmit { .. }))
            .map(|f| f.at_ns);
        let after_ms = match (first_rtx, first_ending(t)) {
            (Some(a), Some((e, _))) => Some(e.saturating_sub(a) / 1_000_000),
            _ => None,
        };
        let after = after_ms
            .map(|ms| format!(", {ms} ms after the first retransmission"))
            .unwrap_or_default();
        let mut v = verdict(
            ClosedBy::Middlebox,
            Reason::PathBlackhole,
            Initiator::Local,
            Mechanism::Timeout,
            Confidence::High,
            format!(
                "{what} ({}{after}) while the {who} socket was still open on this host: the path \
                 dropped the packets (firewall DROP, blackhole route, stale conntrack/NAT entry)",
                errno_name(errno)
            ),
        );
        v.middlebox = Some(Middlebox {
            detected_by: Some(Party::of(t.role, true).name()),
            after_ms,
            ..Middlebox::of(MiddleboxKind::Path)
        });
        v
    } else {
        verdict(
            ClosedBy::Middlebox,
            reason,
            Initiator::Local,
            Mechanism::Timeout,
            Confidence::Low,
            format!(
                "{what} ({}): the path is blackholed or the {who} host is down; check firewalls and \
                 conntrack/NAT timeouts, and enable keepalives shorter than the middlebox idle timeout",
                errno_name(errno)
            ),
        )
    }
}
