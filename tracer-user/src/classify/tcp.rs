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
    let crossed = crossed_fins(t);
    let ending = match (ending, crossed) {
        (Ending::LocalFin { .. }, Some(true)) => Ending::RemoteFin,
        (e, _) => e,
    };
    let crossed = crossed.is_some();
    match ending {
        Ending::LocalFin { exiting } => simultaneous(t, crossed, local_fin(t, exiting)),
        Ending::RemoteFin => simultaneous(t, crossed, remote_fin(t)),
        Ending::LocalRst { exiting } => local_rst(t, exiting),
        Ending::RemoteRst { ttl, origin } => rst::remote_rst(t, at, ttl, origin),
        Ending::Timeout { errno } => timeout::timeout(t, errno),
    }
}

/// With the peer socket on this host too: did each end send its FIN before receiving the
/// other's (the FINs crossed)? Then `Some(peer's was sent first)`, on the one clock both
/// records share. Each socket alone sees its own FIN first in that case; without this both
/// would name themselves the initiator.
fn crossed_fins(t: &Timeline) -> Option<bool> {
    let first = |pred: fn(&FactKind) -> bool| {
        t.facts
            .iter()
            .filter(|f| pred(&f.kind))
            .map(|f| f.at_ns)
            .min()
    };
    let sent = first(|k| matches!(k, FactKind::FinSent))?;
    let received = first(|k| matches!(k, FactKind::FinReceived { .. }))?;
    let p = t.peer.as_ref()?;
    let (peer_sent, peer_received) = (p.fin_sent_ns?, p.fin_received_ns?);
    (sent <= received && peer_sent <= peer_received).then_some(peer_sent < sent)
}

/// Both ends called close() before either saw the other's FIN (the socket went through
/// CLOSING, or both records show it): the first FIN on the wire is still named, but neither
/// side's close was a reaction to the other's, so the verdict is not proof of who decided.
fn simultaneous(t: &Timeline, crossed_on_wire: bool, mut v: Verdict) -> Verdict {
    let crossed = crossed_on_wire
        || t.facts.iter().any(|f| {
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
