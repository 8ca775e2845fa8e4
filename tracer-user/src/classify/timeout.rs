//! Retransmission and keepalive timeouts: the path, not an endpoint, ended the connection.

use super::{
    ClosedBy, Confidence, Initiator, Mechanism, Party, Reason, Verdict, ending::retransmits,
    verdict::verdict,
};
use crate::{event::errno_name, timeline::Timeline};

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
        verdict(
            ClosedBy::Middlebox,
            reason,
            Initiator::Local,
            Mechanism::Timeout,
            Confidence::High,
            format!(
                "{what} ({}) while the {who} socket was still open on this host: the path dropped \
                 the packets (firewall DROP, blackhole route, stale conntrack/NAT entry)",
                errno_name(errno)
            ),
        )
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
