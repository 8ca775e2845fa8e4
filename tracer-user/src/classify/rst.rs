//! A RST from the other side: who sent it, as far as the table could prove.

use super::{
    Cause, ClosedBy, Confidence, Initiator, Mechanism, Party, Reason, Verdict, verdict::verdict,
};
use crate::timeline::{RstOrigin, Timeline};

pub(super) fn remote_rst(t: &Timeline, ttl: u8, origin: RstOrigin) -> Verdict {
    let remote = t.role.opposite();
    let who = Party::of(t.role, false);
    match origin {
        RstOrigin::PeerSocket => {
            let exited = t.peer.as_ref().is_some_and(|p| p.exited);
            if exited {
                verdict(
                    remote.into(),
                    Reason::By(who, Cause::ProcessExit),
                    Initiator::Remote,
                    Mechanism::Rst,
                    Confidence::High,
                    format!(
                        "the {who} process died with unread data in its socket and its kernel reset \
                         the connection; check the {who}'s logs, OOM kills and exit status"
                    ),
                )
            } else {
                verdict(
                    remote.into(),
                    Reason::By(who, Cause::Abort),
                    Initiator::Remote,
                    Mechanism::Rst,
                    Confidence::High,
                    format!(
                        "the {who} socket reset the connection (close with unread data, SO_LINGER 0 \
                         or an application abort)"
                    ),
                )
            }
        }
        RstOrigin::PeerKernel => verdict(
            remote.into(),
            Reason::By(who, Cause::NoSocket),
            Initiator::Remote,
            Mechanism::Rst,
            Confidence::High,
            format!(
                "the {who}'s kernel had no socket for this connection any more (restarted process, \
                 closed port or state already dropped) and answered with RST"
            ),
        ),
        RstOrigin::NotSentByPeer => verdict(
            ClosedBy::Middlebox,
            Reason::MiddleboxReset,
            Initiator::Remote,
            Mechanism::Rst,
            Confidence::High,
            format!(
                "a RST arrived (TTL {ttl}) that the {who} never sent: a firewall, proxy, load balancer \
                 or conntrack/NAT table in between reset the connection; check REJECT rules, \
                 conntrack timeouts and LB idle timeouts on the path"
            ),
        ),
        RstOrigin::Untraced => match t.ttl_baseline {
            Some(base) if base != ttl => verdict(
                ClosedBy::Middlebox,
                Reason::MiddleboxReset,
                Initiator::Remote,
                Mechanism::Rst,
                Confidence::Medium,
                format!(
                    "the RST came with TTL {ttl} while the {who}'s segments arrive with TTL {base}: \
                     it was probably sent by a device in between (firewall, LB, NAT); check its \
                     idle and conntrack timeouts"
                ),
            ),
            base => verdict(
                remote.into(),
                Reason::By(who, Cause::Reset),
                Initiator::Remote,
                Mechanism::Rst,
                if base.is_some() {
                    Confidence::Medium
                } else {
                    Confidence::Low
                },
                format!(
                    "the {who} (or a device answering with its TTL) reset the connection; trace the \
                     {who}'s host with whoclosed to tell which"
                ),
            ),
        },
    }
}
