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
    /// A RST left this socket (egress segment or the kernel's send_reset for it), with the
    /// kernel's `sk_rst_reason` when the kernel reports one (6.10+).
    RstSent {
        exiting: bool,
        kernel_reason: Option<String>,
    },
    /// `sender_reason`: the reason the sender's kernel gave, when that kernel is this host's.
    RstReceived {
        ttl: u8,
        origin: RstOrigin,
        sender_reason: Option<String>,
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
    /// An HTTP/2 GOAWAY this socket sent (`sent`) or received.
    GoAway {
        sent: bool,
        code: u32,
        last_stream_id: u32,
        debug: String,
    },
}

/// A GOAWAY as the classifier sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoAwaySummary {
    pub sent: bool,
    pub at_ns: u64,
    pub code: u32,
    pub debug: String,
    /// How long no stream had been open when it was sent.
    pub idle_ns: Option<u64>,
}

/// The HTTP/2 facts the classifier uses.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct H2Summary {
    pub synced: bool,
    pub goaways: Vec<GoAwaySummary>,
    /// Median interval of the PINGs this socket sent / received.
    pub ping_interval_sent_ns: Option<u64>,
    pub ping_interval_received_ns: Option<u64>,
    /// Since when a PING this socket sent (received) has gone unanswered, if one has.
    pub unanswered_sent_since: Option<u64>,
    pub unanswered_received_since: Option<u64>,
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
    /// HTTP/2 evidence, when the connection carried HTTP/2 (or was checked for it).
    pub h2: Option<H2Summary>,
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
    /// An HTTP/2 GOAWAY, then the TCP close.
    GoawayThenFin,
    GoawayThenRst,
    GoawayThenTimeout,
    /// Keepalive PINGs went unanswered and the pinging side closed.
    PingTimeout,
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
        FactKind::CloseCall { exiting, .. } | FactKind::RstSent { exiting, .. } => *exiting,
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

/// The verdict for one ended socket: the HTTP/2 decision when there is one, else the TCP
/// one. `tcp_initiator` always comes from TCP, so both layers show.
pub fn classify(t: &Timeline) -> Verdict {
    let tcp = classify_inner(t);
    let mut v = h2_rules(t, &tcp).unwrap_or(tcp);
    if t.role_inferred {
        v.confidence = v.confidence.lower();
    }
    v
}

fn is_idle(debug: &str) -> bool {
    debug.to_ascii_lowercase().contains("idle")
}

fn is_age(debug: &str) -> bool {
    let d = debug.to_ascii_lowercase();
    d.contains("max_age") || d.contains("agetimeout") || d.contains("connection_age") || d == "age"
}

fn secs(ns: u64) -> String {
    let s = ns as f64 / 1e9;
    if s >= 10.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

fn code_name(code: u32) -> String {
    crate::h2::Reason(code).to_string()
}

/// L7 rules: who decided to end an HTTP/2 connection, whoever sent the first FIN/RST.
fn h2_rules(t: &Timeline, tcp: &Verdict) -> Option<Verdict> {
    let h = t.h2.as_ref()?;
    let ending_at = first_ending(t).map(|(at, _)| at);
    let before_end = |at: u64| ending_at.is_none_or(|e| at <= e);
    let role = t.role;
    let mechanism = match tcp.mechanism {
        Mechanism::Fin => Mechanism::GoawayThenFin,
        Mechanism::Rst => Mechanism::GoawayThenRst,
        Mechanism::Timeout => Mechanism::GoawayThenTimeout,
        m => m,
    };
    // PINGs from the client side that went unanswered, and their cadence.
    let (client_unanswered, client_interval) = match role {
        Role::Client => (h.unanswered_sent_since, h.ping_interval_sent_ns),
        Role::Server => (h.unanswered_received_since, h.ping_interval_received_ns),
        Role::Unknown => (h.unanswered_sent_since, h.ping_interval_sent_ns),
    };
    if let Some(g) = h.goaways.iter().find(|g| before_end(g.at_ns)) {
        // Which side sent it: this socket when `sent`, else the peer.
        let from_local = g.sent;
        let sender_role = if from_local { role } else { role.opposite() };
        let who = side(role, from_local);
        let debug = if g.debug.is_empty() {
            String::new()
        } else {
            format!(" \"{}\"", g.debug)
        };
        let closed_by: ClosedBy = sender_role.into();
        let v = |reason: String, hint: String| {
            verdict(
                closed_by,
                reason,
                tcp.tcp_initiator,
                mechanism,
                Confidence::High,
                hint,
            )
        };
        if sender_role == Role::Server || (role == Role::Unknown && !from_local) {
            if g.code == 0xb && g.debug.contains("too_many_pings") {
                let every = client_interval
                    .map(|n| format!("every {} ms", n / 1_000_000))
                    .unwrap_or_else(|| "too often".into());
                return Some(v(
                    format!("{who}_too_many_pings"),
                    format!(
                        "the {who} sent GOAWAY ENHANCE_YOUR_CALM{debug}: the client sent keepalive PINGs {every}, \
                         more often than the server's enforcement allows (grpc: \
                         min_ping_interval_without_data_ms / EnforcementPolicy.MinTime, permit_without_stream); \
                         raise the client's keepalive time above the server's minimum or relax the server policy"
                    ),
                ));
            }
            // grpc-go/Kitex say NO_ERROR "max_idle"/"idleTimeout"; grpc C-core (grpcio 1.85)
            // says INTERNAL_ERROR "connection idle": the text decides, not the code.
            if is_idle(&g.debug) {
                let idle = g
                    .idle_ns
                    .map(|n| format!(" after {} without an open stream", secs(n)))
                    .unwrap_or_default();
                return Some(v(
                    format!("{who}_idle_timeout"),
                    format!(
                        "the {who}'s max idle timer fired{idle} (GOAWAY {}{debug}); expected behaviour: \
                         let the client reconnect on demand, or raise max_connection_idle on the server",
                        code_name(g.code)
                    ),
                ));
            }
            if is_age(&g.debug) {
                return Some(v(
                    format!("{who}_max_age"),
                    format!(
                        "the {who} reached its max connection age and drained the connection (GOAWAY {}{debug}); \
                         clients must retry on a new connection; raise max_connection_age(+grace) if that is too often",
                        code_name(g.code)
                    ),
                ));
            }
            return Some(v(
                format!("{who}_goaway"),
                format!(
                    "the {who} sent GOAWAY {}{debug}; check the {who}'s logs around this time",
                    code_name(g.code)
                ),
            ));
        }
        // The client sent the GOAWAY.
        if let Some(since) = client_unanswered.filter(|s| *s <= g.at_ns) {
            return Some(verdict(
                closed_by,
                format!("{who}_keepalive_timeout"),
                tcp.tcp_initiator,
                Mechanism::PingTimeout,
                Confidence::High,
                format!(
                    "the {who}'s keepalive PING went unanswered for {} and it gave up on the connection: \
                     the server or the path stopped responding (blackhole, stale NAT/conntrack entry, \
                     overloaded server)",
                    secs(g.at_ns.saturating_sub(since))
                ),
            ));
        }
        return Some(v(
            format!("{who}_goaway"),
            format!(
                "the {who} ended the connection with GOAWAY {}{debug} (e.g. it closed its channel)",
                code_name(g.code)
            ),
        ));
    }
    if !h.synced {
        return None;
    }
    let ended_by_client = matches!(
        (tcp.tcp_initiator, role),
        (Initiator::Local, Role::Client) | (Initiator::Remote, Role::Server)
    );
    // The client's keepalive gave up: its PING went unanswered and then either the kernel
    // timed the socket out (grpc sets TCP_USER_TIMEOUT to the keepalive timeout) or the
    // client closed it.
    if let (Some(since), true) = (
        h.unanswered_sent_since,
        role == Role::Client && tcp.mechanism == Mechanism::Timeout,
    ) {
        if before_end(since) {
            let path = if tcp.confidence == Confidence::High {
                "the server socket was still open on this host, so the path dropped the packets"
            } else {
                "the path or the server stopped responding"
            };
            return Some(verdict(
                ClosedBy::Client,
                "client_keepalive_timeout",
                tcp.tcp_initiator,
                Mechanism::Timeout,
                Confidence::High,
                format!(
                    "the client's keepalive PING went unanswered and its keepalive timeout (TCP_USER_TIMEOUT) \
                     ended the connection; {path} (firewall DROP, blackhole route, stale NAT/conntrack entry)"
                ),
            ));
        }
    }
    if let (true, Some(since)) = (ended_by_client, client_unanswered) {
        if before_end(since) && tcp.closed_by != ClosedBy::Middlebox {
            let who = if role == Role::Client {
                side(role, true)
            } else {
                side(role, false)
            };
            return Some(verdict(
                ClosedBy::Client,
                format!("{who}_keepalive_timeout"),
                tcp.tcp_initiator,
                Mechanism::PingTimeout,
                Confidence::High,
                format!(
                    "the {who}'s keepalive PING went unanswered and it closed the connection: the server or \
                     the path stopped responding (blackhole, stale NAT/conntrack entry, overloaded server)"
                ),
            ));
        }
    }
    if tcp.closed_by == ClosedBy::Server
        && matches!(tcp.mechanism, Mechanism::Fin | Mechanism::Rst)
        && !tcp.reason.ends_with("_process_exit")
    {
        return Some(verdict(
            ClosedBy::Server,
            "server_close_no_goaway",
            tcp.tcp_initiator,
            tcp.mechanism,
            Confidence::Medium,
            "the server side closed the HTTP/2 connection without a GOAWAY: an abrupt close (crash, \
             kill, hard timeout) or a proxy/LB in front of the server ending it; check both",
        ));
    }
    None
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
