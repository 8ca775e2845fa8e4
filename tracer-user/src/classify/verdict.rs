//! What the classifier answers: who ended the connection, why (a typed reason with a stable
//! name), how, and how sure.

use std::fmt;

use serde::{Serialize, Serializer};

use crate::timeline::Role;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClosedBy {
    Client,
    Server,
    Middlebox,
    Unknown,
}

impl ClosedBy {
    /// The JSON name (same as the serde form; a test keeps them equal).
    pub fn as_str(self) -> &'static str {
        match self {
            ClosedBy::Client => "client",
            ClosedBy::Server => "server",
            ClosedBy::Middlebox => "middlebox",
            ClosedBy::Unknown => "unknown",
        }
    }
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

impl Initiator {
    /// The JSON name (same as the serde form; a test keeps them equal).
    pub fn as_str(self) -> &'static str {
        match self {
            Initiator::Local => "local",
            Initiator::Remote => "remote",
            Initiator::None => "none",
        }
    }
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

impl Mechanism {
    /// The JSON name (same as the serde form; a test keeps them equal).
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Fin => "fin",
            Mechanism::Rst => "rst",
            Mechanism::Timeout => "timeout",
            Mechanism::GoawayThenFin => "goaway_then_fin",
            Mechanism::GoawayThenRst => "goaway_then_rst",
            Mechanism::GoawayThenTimeout => "goaway_then_timeout",
            Mechanism::PingTimeout => "ping_timeout",
            Mechanism::None => "none",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Confidence {
    Low,
    Medium,
    High,
}

impl Confidence {
    /// The JSON name (same as the serde form; a test keeps them equal).
    pub fn as_str(self) -> &'static str {
        match self {
            Confidence::Low => "low",
            Confidence::Medium => "medium",
            Confidence::High => "high",
        }
    }

    pub(crate) fn lower(self) -> Self {
        match self {
            Confidence::High => Confidence::Medium,
            _ => Confidence::Low,
        }
    }
}

/// A side of the connection as a reason names it: by role when the role is known, else
/// from this socket's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Party {
    Client,
    Server,
    Local,
    Remote,
}

impl Party {
    /// `local`: this socket's side, else the other one.
    pub fn of(role: Role, local: bool) -> Party {
        match (role, local) {
            (Role::Unknown, true) => Party::Local,
            (Role::Unknown, false) => Party::Remote,
            (Role::Client, true) | (Role::Server, false) => Party::Client,
            (Role::Server, true) | (Role::Client, false) => Party::Server,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Party::Client => "client",
            Party::Server => "server",
            Party::Local => "local",
            Party::Remote => "remote",
        }
    }
}

impl fmt::Display for Party {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// What a [`Party`] did to end the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// Closed it (first FIN).
    Close,
    /// Its process exited and the kernel closed or reset the socket.
    ProcessExit,
    /// Its socket reset the connection.
    Abort,
    /// Its kernel had no socket for the connection and answered with RST.
    NoSocket,
    /// A RST from its direction whose sender cannot be proven.
    Reset,
    /// An HTTP/2 GOAWAY with no more specific reason.
    Goaway,
    IdleTimeout,
    MaxAge,
    TooManyPings,
    KeepaliveTimeout,
    /// A graceful shutdown: GOAWAY, then streams finish (drain), then the close.
    Shutdown,
}

const CAUSES: usize = 11;

impl Cause {
    fn index(self) -> usize {
        match self {
            Cause::Close => 0,
            Cause::ProcessExit => 1,
            Cause::Abort => 2,
            Cause::NoSocket => 3,
            Cause::Reset => 4,
            Cause::Goaway => 5,
            Cause::IdleTimeout => 6,
            Cause::MaxAge => 7,
            Cause::TooManyPings => 8,
            Cause::KeepaliveTimeout => 9,
            Cause::Shutdown => 10,
        }
    }
}

/// `<party>_<cause>`, written out so the names are `&'static str` and greppable.
const PARTY_REASONS: [[&str; CAUSES]; 4] = [
    [
        "client_close",
        "client_process_exit",
        "client_abort",
        "client_no_socket",
        "client_reset",
        "client_goaway",
        "client_idle_timeout",
        "client_max_age",
        "client_too_many_pings",
        "client_keepalive_timeout",
        "client_shutdown",
    ],
    [
        "server_close",
        "server_process_exit",
        "server_abort",
        "server_no_socket",
        "server_reset",
        "server_goaway",
        "server_idle_timeout",
        "server_max_age",
        "server_too_many_pings",
        "server_keepalive_timeout",
        "server_shutdown",
    ],
    [
        "local_close",
        "local_process_exit",
        "local_abort",
        "local_no_socket",
        "local_reset",
        "local_goaway",
        "local_idle_timeout",
        "local_max_age",
        "local_too_many_pings",
        "local_keepalive_timeout",
        "local_shutdown",
    ],
    [
        "remote_close",
        "remote_process_exit",
        "remote_abort",
        "remote_no_socket",
        "remote_reset",
        "remote_goaway",
        "remote_idle_timeout",
        "remote_max_age",
        "remote_too_many_pings",
        "remote_keepalive_timeout",
        "remote_shutdown",
    ],
];

/// The verdict's reason code. Its string form ([`Reason::as_str`]) is part of the JSON
/// schema (docs/events.md) and never changes for an existing reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// `<party>_<cause>`, e.g. `server_process_exit`.
    By(Party, Cause),
    /// The server closed an HTTP/2 connection without a GOAWAY.
    ServerCloseNoGoaway,
    MiddleboxReset,
    RetransmissionTimeout,
    KeepaliveTimeout,
    ConnectRejected,
    ConnectionRefused,
    ConnectTimeout,
    HandshakeFailed,
    /// A proxy on this host ended the connection itself (FIN).
    ProxyClose,
    /// A proxy on this host reset the connection itself.
    ProxyReset,
    /// A proxy on this host sent GOAWAY on its own account.
    ProxyGoaway,
    /// Packets stopped getting through until one side's kernel or application gave up,
    /// while the other side was still there.
    PathBlackhole,
    Unknown,
}

/// The reasons that are not `<party>_<cause>`.
const OTHER_REASONS: [Reason; 13] = [
    Reason::ServerCloseNoGoaway,
    Reason::MiddleboxReset,
    Reason::RetransmissionTimeout,
    Reason::KeepaliveTimeout,
    Reason::ConnectRejected,
    Reason::ConnectionRefused,
    Reason::ConnectTimeout,
    Reason::HandshakeFailed,
    Reason::ProxyClose,
    Reason::ProxyReset,
    Reason::ProxyGoaway,
    Reason::PathBlackhole,
    Reason::Unknown,
];

impl Reason {
    /// Is `s` the string form of some reason? (Bounds label sets, e.g. in metrics.)
    pub fn is_known(s: &str) -> bool {
        PARTY_REASONS.iter().flatten().any(|r| *r == s)
            || OTHER_REASONS.iter().any(|r| r.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::By(p, c) => {
                let row = match p {
                    Party::Client => 0,
                    Party::Server => 1,
                    Party::Local => 2,
                    Party::Remote => 3,
                };
                PARTY_REASONS[row][c.index()]
            }
            Reason::ServerCloseNoGoaway => "server_close_no_goaway",
            Reason::MiddleboxReset => "middlebox_reset",
            Reason::RetransmissionTimeout => "retransmission_timeout",
            Reason::KeepaliveTimeout => "keepalive_timeout",
            Reason::ConnectRejected => "connect_rejected",
            Reason::ConnectionRefused => "connection_refused",
            Reason::ConnectTimeout => "connect_timeout",
            Reason::HandshakeFailed => "handshake_failed",
            Reason::ProxyClose => "proxy_close",
            Reason::ProxyReset => "proxy_reset",
            Reason::ProxyGoaway => "proxy_goaway",
            Reason::PathBlackhole => "path_blackhole",
            Reason::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl Serialize for Reason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// What kind of thing in between ended the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MiddleboxKind {
    /// A process on this host relaying between two legs (haproxy, nginx, a sidecar).
    Proxy,
    /// A NAT/conntrack table.
    Nat,
    /// A packet filter answering for the peer (REJECT) or dropping.
    Firewall,
    /// The path itself: packets stopped getting through.
    Path,
}

/// The `middlebox` object of a verdict whose `closed_by` is `middlebox`: what it was and,
/// when this host saw it, which process and what it did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Middlebox {
    pub kind: MiddleboxKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    /// proxy: which of its legs this connection is (`downstream`: the one it accepted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leg: Option<crate::timeline::ProxyLeg>,
    /// proxy: what it did on this leg (`fin`, `rst`, `goaway`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<&'static str>,
    /// proxy: its other leg (`local -> remote`) and how that one ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other_leg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other_leg_ended: Option<&'static str>,
    /// path: the side whose kernel or application gave up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detected_by: Option<&'static str>,
    /// path: from the first unanswered retransmission (or PING) to giving up, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_ms: Option<u64>,
}

impl Middlebox {
    pub fn of(kind: MiddleboxKind) -> Self {
        Middlebox {
            kind,
            pid: None,
            comm: None,
            netns: None,
            leg: None,
            action: None,
            other_leg: None,
            other_leg_ended: None,
            detected_by: None,
            after_ms: None,
        }
    }

    /// One short line for the table view.
    pub fn short(&self) -> String {
        let kind = match self.kind {
            MiddleboxKind::Proxy => "proxy",
            MiddleboxKind::Nat => "nat",
            MiddleboxKind::Firewall => "firewall",
            MiddleboxKind::Path => "path",
        };
        let mut s = kind.to_string();
        if let (Some(c), Some(p)) = (&self.comm, self.pid) {
            s.push_str(&format!(" {c}({p})"));
        }
        if let Some(l) = self.leg {
            s.push_str(match l {
                crate::timeline::ProxyLeg::Downstream => " downstream",
                crate::timeline::ProxyLeg::Upstream => " upstream",
            });
        }
        if let Some(a) = self.action {
            s.push_str(&format!(" {a}"));
        }
        if let Some(d) = self.detected_by {
            s.push_str(&format!(" seen-by-{d}"));
        }
        if let Some(ms) = self.after_ms {
            s.push_str(&format!(" after {ms}ms"));
        }
        s
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub closed_by: ClosedBy,
    pub reason: Reason,
    pub tcp_initiator: Initiator,
    pub mechanism: Mechanism,
    pub confidence: Confidence,
    pub hint: String,
    /// Set when `closed_by` is `middlebox` and something is known about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub middlebox: Option<Middlebox>,
}

pub(super) fn verdict(
    closed_by: ClosedBy,
    reason: Reason,
    tcp_initiator: Initiator,
    mechanism: Mechanism,
    confidence: Confidence,
    hint: impl Into<String>,
) -> Verdict {
    Verdict {
        closed_by,
        reason,
        tcp_initiator,
        mechanism,
        confidence,
        hint: hint.into(),
        middlebox: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `as_str` is the serde name for every variant: the table view and the metrics labels
    /// use the first, the JSON the second.
    #[test]
    fn names_match_the_json_form() {
        fn json<T: Serialize>(v: T) -> String {
            serde_json::to_value(v)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        }
        for c in [
            ClosedBy::Client,
            ClosedBy::Server,
            ClosedBy::Middlebox,
            ClosedBy::Unknown,
        ] {
            assert_eq!(c.as_str(), json(c));
        }
        for m in [
            Mechanism::Fin,
            Mechanism::Rst,
            Mechanism::Timeout,
            Mechanism::GoawayThenFin,
            Mechanism::GoawayThenRst,
            Mechanism::GoawayThenTimeout,
            Mechanism::PingTimeout,
            Mechanism::None,
        ] {
            assert_eq!(m.as_str(), json(m));
        }
        for k in [Confidence::Low, Confidence::Medium, Confidence::High] {
            assert_eq!(k.as_str(), json(k));
        }
    }

    const ALL_CAUSES: [(Cause, &str); CAUSES] = [
        (Cause::Close, "close"),
        (Cause::ProcessExit, "process_exit"),
        (Cause::Abort, "abort"),
        (Cause::NoSocket, "no_socket"),
        (Cause::Reset, "reset"),
        (Cause::Goaway, "goaway"),
        (Cause::IdleTimeout, "idle_timeout"),
        (Cause::MaxAge, "max_age"),
        (Cause::TooManyPings, "too_many_pings"),
        (Cause::KeepaliveTimeout, "keepalive_timeout"),
        (Cause::Shutdown, "shutdown"),
    ];

    #[test]
    fn party_reason_names_are_party_then_cause() {
        for p in [Party::Client, Party::Server, Party::Local, Party::Remote] {
            for (c, name) in ALL_CAUSES {
                assert_eq!(Reason::By(p, c).as_str(), format!("{p}_{name}"));
            }
        }
    }

    #[test]
    fn reason_serialises_as_its_name() {
        let v = serde_json::to_value(Reason::By(Party::Server, Cause::ProcessExit)).unwrap();
        assert_eq!(v, "server_process_exit");
        assert_eq!(
            serde_json::to_value(Reason::MiddleboxReset).unwrap(),
            "middlebox_reset"
        );
    }
}
