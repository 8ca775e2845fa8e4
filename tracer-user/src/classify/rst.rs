//! A RST from the other side: who sent it, as far as the table could prove.

use super::{
    Cause, ClosedBy, Confidence, Initiator, Mechanism, Middlebox, MiddleboxKind, Party, Reason,
    Verdict, verdict::verdict,
};
use crate::timeline::{LegEnd, RstOrigin, Timeline};

/// The peer socket on this host had been reset by a middlebox (a RST nobody on this host
/// sent) before this RST came from its host: that reset is the story, this RST its echo.
fn peer_reset_by_middlebox(t: &Timeline, rst_at: u64) -> Option<Verdict> {
    let p = t.peer.as_ref()?;
    let at = p.middlebox_reset_at?;
    if at > rst_at {
        return None;
    }
    let side = Party::of(t.role, false);
    let mut v = verdict(
        ClosedBy::Middlebox,
        Reason::MiddleboxReset,
        Initiator::Remote,
        Mechanism::Rst,
        Confidence::High,
        format!(
            "the {side} socket on this host was reset first by a RST that nobody on this host \
             sent (a firewall REJECT, a proxy or a NAT/conntrack table in between); the RST that \
             ended this socket is the {side} host answering afterwards for a socket it no longer \
             had, not the cause"
        ),
    );
    v.middlebox = Some(Middlebox::of(MiddleboxKind::Firewall));
    Some(v)
}

/// The peer socket on this host had already died of a timeout when this RST came: its
/// host answered a late segment for a socket it no longer had. The ending is the path
/// that made the peer give up; the RST is only its echo.
fn peer_timed_out(t: &Timeline, rst_at: u64) -> Option<Verdict> {
    let p = t.peer.as_ref()?;
    let (at, end) = p.ended.as_ref()?;
    if *end != LegEnd::Timeout || *at > rst_at {
        return None;
    }
    let side = Party::of(t.role, false);
    let after = p.stalled_ns.map(|n| n / 1_000_000);
    let how = if p.retransmits > 0 {
        format!("{} unanswered retransmissions", p.retransmits)
    } else {
        "unanswered keepalive probes".to_string()
    };
    let after_txt = after
        .map(|ms| format!(" after {ms} ms"))
        .unwrap_or_default();
    let mut v = verdict(
        ClosedBy::Middlebox,
        Reason::PathBlackhole,
        Initiator::Remote,
        Mechanism::Timeout,
        Confidence::High,
        format!(
            "the {side} socket on this host timed out first ({how}{after_txt}) while this one was              still open: the path dropped the packets (firewall DROP, blackhole route, stale              conntrack/NAT entry); the RST that ended this socket is the {side} host answering              for a socket it no longer had, not the cause"
        ),
    );
    v.middlebox = Some(Middlebox {
        detected_by: Some(side.name()),
        after_ms: after,
        ..Middlebox::of(MiddleboxKind::Path)
    });
    Some(v)
}

pub(super) fn remote_rst(t: &Timeline, at: u64, ttl: u8, origin: RstOrigin) -> Verdict {
    let remote = t.role.opposite();
    let who = Party::of(t.role, false);
    if origin != RstOrigin::NotSentByPeer {
        if let Some(v) = peer_timed_out(t, at).or_else(|| peer_reset_by_middlebox(t, at)) {
            return v;
        }
    }
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
        RstOrigin::NotSentByPeer => forged(
            t,
            verdict(
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

/// A RST the traced peer never sent: a NAT when the peer was joined through address
/// translation (its conntrack entry gone, the translating host answered), else a filter.
fn forged(t: &Timeline, mut v: Verdict) -> Verdict {
    let translated = t.peer.as_ref().is_some_and(|p| p.translated);
    let mut m = Middlebox::of(if translated {
        MiddleboxKind::Nat
    } else {
        MiddleboxKind::Firewall
    });
    if let Some(p) = &t.peer {
        m.netns = p.netns;
    }
    if translated {
        v.hint.push_str(
            "; the peer socket, reached through address translation, is still traced on this \
             host and sent no RST: the NAT/conntrack entry was probably gone (expired or \
             flushed) and the translating host answered for an address with no socket",
        );
    }
    v.middlebox = Some(m);
    v
}
