//! The first signal that ended a connection, and small questions about a timeline that
//! several rules ask.

use crate::{
    event::{ETIMEDOUT, TcpState},
    timeline::{Fact, FactKind, LegEnd, RstOrigin, Timeline},
};

/// The first signal that ended the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ending {
    LocalFin { exiting: bool },
    RemoteFin,
    LocalRst { exiting: bool },
    RemoteRst { ttl: u8, origin: RstOrigin },
    Timeout { errno: i32 },
}

pub(super) fn first_ending(t: &Timeline) -> Option<(u64, Ending)> {
    first_ending_in(&t.facts)
}

fn first_ending_in(facts: &[Fact]) -> Option<(u64, Ending)> {
    let exiting = facts.iter().any(|f| f.kind.is_exit_close());
    // With our FIN seen on the wire, the wire order decides: in a simultaneous close our
    // close() (FIN_WAIT1) can precede the peer's FIN arriving while our own FIN leaves after
    // it, and both sockets would otherwise claim the first FIN.
    let fin_on_wire = facts.iter().any(|f| matches!(f.kind, FactKind::FinSent));
    let mut retransmits = 0u32;
    for f in facts {
        let e = match &f.kind {
            FactKind::FinSent => Ending::LocalFin { exiting },
            FactKind::State {
                from: TcpState::Established,
                to: TcpState::FinWait1,
                ..
            } if !fin_on_wire => Ending::LocalFin { exiting },
            FactKind::State {
                from: TcpState::Established | TcpState::SynRecv,
                to: TcpState::CloseWait,
                ..
            } => Ending::RemoteFin,
            FactKind::FinReceived { .. } => Ending::RemoteFin,
            FactKind::RstSent { .. } => Ending::LocalRst { exiting },
            // A dying owner taking an open connection straight to CLOSE aborts it (the RST
            // itself may be invisible: no packet hooks, no send_reset tracepoint before 6.10).
            FactKind::State {
                from: TcpState::Established | TcpState::CloseWait | TcpState::SynRecv,
                to: TcpState::Close,
                exiting: true,
                ..
            } => Ending::LocalRst { exiting: true },
            FactKind::RstReceived { ttl, origin, .. } => Ending::RemoteRst {
                ttl: *ttl,
                origin: *origin,
            },
            FactKind::Retransmit { .. } => {
                retransmits += 1;
                continue;
            }
            FactKind::SocketError { errno } if *errno == ETIMEDOUT => {
                Ending::Timeout { errno: *errno }
            }
            // Without the error-report hook, a close after unanswered retransmissions is
            // still a timeout.
            FactKind::State {
                to: TcpState::Close,
                ..
            } if retransmits > 0 => Ending::Timeout { errno: ETIMEDOUT },
            _ => continue,
        };
        return Some((f.at_ns, e));
    }
    None
}

/// How a socket's own record says its connection ended (facts in time order): the first
/// FIN/RST/timeout, or a GOAWAY it sent before that. Used to join the ends of a connection
/// and the legs of a proxy on this host.
pub fn leg_end(facts: &[Fact]) -> Option<(u64, LegEnd)> {
    let ending = first_ending_in(facts);
    let goaway = facts.iter().find_map(|f| match &f.kind {
        FactKind::GoAway(g) if g.sent && ending.is_none_or(|(at, _)| g.at_ns <= at) => Some((
            g.at_ns,
            LegEnd::OwnGoaway {
                code: g.code,
                debug: g.debug.clone(),
            },
        )),
        _ => None,
    });
    if goaway.is_some() {
        return goaway;
    }
    let (at, e) = ending?;
    let end = match e {
        Ending::LocalFin { exiting: false } => LegEnd::OwnFin,
        Ending::LocalRst { exiting: false } => LegEnd::OwnRst,
        Ending::LocalFin { exiting: true } | Ending::LocalRst { exiting: true } => LegEnd::OwnExit,
        Ending::RemoteFin => LegEnd::FarFin,
        Ending::RemoteRst { .. } => LegEnd::FarRst,
        Ending::Timeout { .. } => LegEnd::Timeout,
    };
    Some((at, end))
}

pub(super) fn reached_established(t: &Timeline) -> bool {
    t.role_inferred
        || t.facts.iter().any(|f| {
            matches!(
                &f.kind,
                FactKind::State {
                    to: TcpState::Established,
                    ..
                } | FactKind::State {
                    from: TcpState::Established,
                    ..
                }
            )
        })
}

pub(super) fn errno_seen(t: &Timeline, errno: i32) -> bool {
    t.facts
        .iter()
        .any(|f| matches!(f.kind, FactKind::SocketError { errno: e } if e == errno))
}

pub(super) fn retransmits(t: &Timeline) -> usize {
    t.facts
        .iter()
        .filter(|f| matches!(f.kind, FactKind::Retransmit { .. }))
        .count()
}
