//! The classifier: a pure function from one socket's timeline to a verdict.
//!
//! One rule per named case, applied to the *first terminating signal* of the connection
//! (the first FIN, RST or timeout, in either direction). The connection table does all the
//! impure work beforehand: it resolves where each received RST came from and what the peer
//! socket did when the peer is also on this host.

use serde::Serialize;

use crate::event::{ECONNREFUSED, ECONNRESET, ETIMEDOUT, TcpState, errno_name};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Client,
    Server,
    Unknown,
}

impl Role {
    pub fn opposite(self) -> Role {
        match self {
            Role::Client => Role::Server,
            Role::Server => Role::Client,
            Role::Unknown => Role::Unknown,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Server => "server",
            Role::Unknown => "unknown",
        }
    }
}

/// Who a received RST came from, as far as this host can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RstOrigin {
    /// The peer socket (on this host) sent it.
    PeerSocket,
    /// The peer's kernel sent it for a segment that matched no socket there.
    PeerKernel,
    /// The peer is traced on this host and sent no such RST: something in between forged it.
    NotSentByPeer,
    /// The peer is not on this host; only TTL can hint at the sender.
    Untraced,
}

/// One fact of a connection's timeline. `at_ns` is CLOCK_MONOTONIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fact {
    pub at_ns: u64,
    pub kind: FactKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FactKind {
    State {
        from: TcpState,
        to: TcpState,
        pid: u32,
        comm: String,
        exiting: bool,
    },
    FinSent,
    FinReceived {
        ttl: u8,
    },
    /// A RST left this socket (egress segment or the kernel's send_reset for it).
    RstSent {
        exiting: bool,
    },
    RstReceived {
        ttl: u8,
        origin: RstOrigin,
    },
    TtlChanged {
        ttl: u8,
    },
    Retransmit {
        state: TcpState,
    },
    SocketError {
        errno: i32,
    },
    CloseCall {
        pid: u32,
        comm: String,
        exiting: bool,
    },
}

/// What the peer socket did, when the peer is on this host too.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PeerSummary {
    pub id: String,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// Its owner was exiting when it closed (crash, kill -9, exit without close).
    pub exited: bool,
    /// It reached TCP_CLOSE before our socket did.
    pub closed_first: bool,
    pub netns: Option<u32>,
}

/// Everything the classifier needs about one socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeline {
    pub role: Role,
    /// The role was inferred (the connection was open before the agent started).
    pub role_inferred: bool,
    pub facts: Vec<Fact>,
    pub peer: Option<PeerSummary>,
    /// TTL / hop limit of ordinary segments from the peer (first ingress segment).
    pub ttl_baseline: Option<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClosedBy {
    Client,
    Server,
    Middlebox,
    Unknown,
}

impl From<Role> for ClosedBy {
    fn from(r: Role) -> Self {
        match r {
            Role::Client => ClosedBy::Client,
            Role::Server => ClosedBy::Server,
            Role::Unknown => ClosedBy::Unknown,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Initiator {
    Local,
    Remote,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    Fin,
    Rst,
    Timeout,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Confidence {
    Low,
    Medium,
    High,
}

impl Confidence {
    fn lower(self) -> Self {
        match self {
            Confidence::High => Confidence::Medium,
            _ => Confidence::Low,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub closed_by: ClosedBy,
    pub reason: String,
    pub tcp_initiator: Initiator,
    pub mechanism: Mechanism,
    pub confidence: Confidence,
    pub hint: String,
}

/// The first signal that ended the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    LocalFin { exiting: bool },
    RemoteFin,
    LocalRst { exiting: bool },
    RemoteRst { ttl: u8, origin: RstOrigin },
    Timeout { errno: i32 },
}

fn side(role: Role, local: bool) -> &'static str {
    match (role, local) {
        (Role::Unknown, true) => "local",
        (Role::Unknown, false) => "remote",
        (r, true) => r.name(),
        (r, false) => r.opposite().name(),
    }
}

/// Was the local owner exiting when it closed? (any closing step done by an exiting task)
fn local_exit(t: &Timeline) -> bool {
    t.facts.iter().any(|f| match &f.kind {
        FactKind::State { exiting, to, .. } => {
            *exiting && matches!(to, TcpState::FinWait1 | TcpState::LastAck | TcpState::Close)
        }
        FactKind::CloseCall { exiting, .. } | FactKind::RstSent { exiting } => *exiting,
        _ => false,
    })
}

fn first_ending(t: &Timeline) -> Option<(u64, Ending)> {
    let exiting = local_exit(t);
    let mut retransmits = 0u32;
    for f in &t.facts {
        let e = match &f.kind {
            FactKind::FinSent => Ending::LocalFin { exiting },
            FactKind::State {
                from: TcpState::Established,
                to: TcpState::FinWait1,
                ..
            } => Ending::LocalFin { exiting },
            FactKind::State {
                from: TcpState::Established | TcpState::SynRecv,
                to: TcpState::CloseWait,
                ..
            } => Ending::RemoteFin,
            FactKind::FinReceived { .. } => Ending::RemoteFin,
            FactKind::RstSent { .. } => Ending::LocalRst { exiting },
            FactKind::RstReceived { ttl, origin } => Ending::RemoteRst {
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

fn reached_established(t: &Timeline) -> bool {
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

fn errno_seen(t: &Timeline, errno: i32) -> bool {
    t.facts
        .iter()
        .any(|f| matches!(f.kind, FactKind::SocketError { errno: e } if e == errno))
}

fn retransmits(t: &Timeline) -> usize {
    t.facts
        .iter()
        .filter(|f| matches!(f.kind, FactKind::Retransmit { .. }))
        .count()
}

fn verdict(
    closed_by: ClosedBy,
    reason: impl Into<String>,
    tcp_initiator: Initiator,
    mechanism: Mechanism,
    confidence: Confidence,
    hint: impl Into<String>,
) -> Verdict {
    Verdict {
        closed_by,
        reason: reason.into(),
        tcp_initiator,
        mechanism,
        confidence,
        hint: hint.into(),
    }
}

/// The verdict for one ended socket.
pub fn classify(t: &Timeline) -> Verdict {
    let mut v = classify_inner(t);
    if t.role_inferred {
        v.confidence = v.confidence.lower();
    }
    v
}

fn classify_inner(t: &Timeline) -> Verdict {
    let role = t.role;
    let remote = role.opposite();
    if !reached_established(t) {
        return handshake_failure(t);
    }
    let Some((_, ending)) = first_ending(t) else {
        return verdict(
            ClosedBy::Unknown,
            "unknown",
            Initiator::None,
            Mechanism::None,
            Confidence::Low,
            "the socket closed without a FIN, RST or error seen by whoclosed; \
             check `whoclosed trace --probe-report` for hooks that did not load",
        );
    };
    match ending {
        Ending::LocalFin { exiting } => {
            let who = side(role, true);
            if exiting {
                verdict(
                    role.into(),
                    format!("{who}_process_exit"),
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
                    role.into(),
                    format!("{who}_close"),
                    Initiator::Local,
                    Mechanism::Fin,
                    Confidence::High,
                    format!("the {who} application closed the connection (sent the first FIN)"),
                )
            }
        }
        Ending::RemoteFin => {
            let who = side(role, false);
            let peer_exited = t.peer.as_ref().is_some_and(|p| p.exited);
            if peer_exited {
                verdict(
                    remote.into(),
                    format!("{who}_process_exit"),
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
                    format!("{who}_close"),
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
        Ending::LocalRst { exiting } => {
            let who = side(role, true);
            if exiting {
                verdict(
                    role.into(),
                    format!("{who}_process_exit"),
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
                    role.into(),
                    format!("{who}_abort"),
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
        Ending::RemoteRst { ttl, origin } => remote_rst(t, ttl, origin),
        Ending::Timeout { errno } => timeout(t, errno),
    }
}

fn remote_rst(t: &Timeline, ttl: u8, origin: RstOrigin) -> Verdict {
    let remote = t.role.opposite();
    let who = side(t.role, false);
    match origin {
        RstOrigin::PeerSocket => {
            let exited = t.peer.as_ref().is_some_and(|p| p.exited);
            if exited {
                verdict(
                    remote.into(),
                    format!("{who}_process_exit"),
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
                    format!("{who}_abort"),
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
            format!("{who}_no_socket"),
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
            "middlebox_reset",
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
                "middlebox_reset",
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
                format!("{who}_reset"),
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

fn timeout(t: &Timeline, errno: i32) -> Verdict {
    let n = retransmits(t);
    let who = side(t.role, false);
    let (reason, what) = if n > 0 {
        (
            "retransmission_timeout",
            format!("{n} retransmissions went unacknowledged"),
        )
    } else {
        (
            "keepalive_timeout",
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

fn handshake_failure(t: &Timeline) -> Verdict {
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
                "connect_rejected",
                Initiator::Remote,
                Mechanism::Rst,
                Confidence::Medium,
                "the SYN was answered with a RST that the server host never sent: a firewall \
                 REJECT rule in between",
            );
        }
        return verdict(
            ClosedBy::Server,
            "connection_refused",
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
            "connect_timeout",
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
        "handshake_failed",
        Initiator::None,
        Mechanism::None,
        Confidence::Low,
        "the connection never completed its handshake",
    )
}

#[cfg(test)]
mod tests;
