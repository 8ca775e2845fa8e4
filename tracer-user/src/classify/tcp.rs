//! TCP endings: the first FIN in either direction, and this socket's own RST.

use super::{
    Cause, ClosedBy, Confidence, Initiator, Mechanism, Party, Reason, Verdict,
    ending::{Ending, first_ending, reached_established},
    handshake, rst, timeout,
    verdict::verdict,
};
use crate::{
    event::TcpState,
    timeline::{FactKind, Timeline},
};

/// The verdict from TCP facts alone.
pub(super) fn classify_tcp(t: &Timeline) -> Verdict {
    if !reached_established(t) {
        return handshake::failure(t);
    }
    let Some((at, ending)) = first_ending(t) else {
        return verdict(
            ClosedBy::Unknown,
            Reason::Unknown,
            Initiator::None,
            Mechanism::None,
            Confidence::Low,
            "the socket closed without a FIN, RST or error seen by whoclosed; \
             check `whoclosed trace --probe-report` for hooks that did not load",
        );
    };
    match ending {
        Ending::LocalFin { exiting } => simultaneous(t, local_fin(t, exiting)),
        Ending::RemoteFin => simultaneous(t, remote_fin(t)),
        Ending::LocalRst { exiting } => local_rst(t, exiting),
        Ending::RemoteRst { ttl, origin } => rst::remote_rst(t, at, ttl, origin),
        Ending::Timeout { errno } => timeout::timeout(t, errno),
    }
}

/// Both ends called close() before either saw the other's FIN (the socket went through
/// CLOSING): the first FIN on the wire is still named, but neither side's close was a reaction
/// to the other's, so the verdict is not proof of who decided.
fn simultaneous(t: &Timeline, mut v: Verdict) -> Verdict {
    let crossed = t.facts.iter().any(|f| {
        matches!(
            f.kind,
            FactKind::State {
                to: TcpState::Closing,
                ..
            }
        )
    });
    if crossed {
        v.confidence = v.confidence.lower();
        v.hint.push_str(
            "; both ends closed at the same moment (the FINs crossed), so the other end \
             was closing too",
        );
    }
    v
}

fn local_fin(t: &Timeline, exiting: bool) -> Verdict {
    let who = Party::of(t.role, true);
    if exiting {
        verdict(
            t.role.into(),
            Reason::By(who, Cause::ProcessExit),
            Initiator::Local,
            Mechanism::Fin,
            Confidence::High,
            format!(
                "the {who} process exited (crash, kill or exit without close) and the kernel \
                 closed its socket; check the {who}'s logs and exit status"
            ),
        )
    } else {
        verdict(
            t.role.into(),
            Reason::By(who, Cause::Close),
            Initiator::Local,
            Mechanism::Fin,
            Confidence::High,
            format!("the {who} application closed the connection (sent the first FIN)"),
        )
    }
}

fn remote_fin(t: &Timeline) -> Verdict {
    let remote = t.role.opposite();
    let who = Party::of(t.role, false);
    let peer_exited = t.peer.as_ref().is_some_and(|p| p.exited);
    if peer_exited {
        verdict(
            remote.into(),
            Reason::By(who, Cause::ProcessExit),
            Initiator::Remote,
            Mechanism::Fin,
            Confidence::High,
            format!(
                "the {who} process exited and its kernel closed the socket; \
                 check the {who}'s logs and exit status"
            ),
        )
    } else {
        verdict(
            remote.into(),
            Reason::By(who, Cause::Close),
            Initiator::Remote,
            Mechanism::Fin,
            Confidence::High,
            format!(
                "the {who} closed the connection (its FIN arrived first); if the {who} is a \
                 proxy or load balancer, check its idle timeout"
            ),
        )
    }
}

fn local_rst(t: &Timeline, exiting: bool) -> Verdict {
    let who = Party::of(t.role, true);
    if exiting {
        verdict(
            t.role.into(),
            Reason::By(who, Cause::ProcessExit),
            Initiator::Local,
            Mechanism::Rst,
            Confidence::High,
            format!(
                "the {who} process died with unread data in the socket, so its kernel reset \
                 the connection; check the {who}'s logs, OOM kills and exit status"
            ),
        )
    } else {
        verdict(
            t.role.into(),
            Reason::By(who, Cause::Abort),
            Initiator::Local,
            Mechanism::Rst,
            Confidence::High,
            format!(
                "the {who} aborted the connection (close with unread data, SO_LINGER 0 or \
                 a reset by the application)"
            ),
        )
    }
}
