//! The vocabulary shared by the connection table ([`crate::conn`]), which writes timelines,
//! and the classifier ([`crate::classify`]), which reads them: roles, facts, where a received
//! RST came from, the one typed GOAWAY, and what the peer socket did.

use serde::Serialize;

use crate::{event::TcpState, h2::Reason as ErrorCode};

/// A socket record's id (`conn.id`): 64 bits shown as 16 hex digits. A number, not a
/// string, so that copying it into peer summaries and proxy legs costs nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl ConnId {
    /// The 16 lowercase hex digits of the id (its `Display` form), without `fmt`: two per
    /// verdict through `{:016x}` were a few percent of `replay`.
    pub fn hex(self) -> [u8; 16] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 16];
        for (i, d) in out.iter_mut().enumerate() {
            *d = DIGITS[((self.0 >> (60 - 4 * i)) & 0xf) as usize];
        }
        out
    }
}

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hex = self.hex();
        // Hex digits are ASCII.
        f.write_str(std::str::from_utf8(&hex).map_err(|_| std::fmt::Error)?)
    }
}

impl Serialize for ConnId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

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
    /// The peer is not on this host (or its RSTs cannot be seen); only TTL can hint at the
    /// sender.
    Untraced,
}

impl RstOrigin {
    /// The JSON name (the serde form; the export tests check every variant).
    pub fn name(self) -> &'static str {
        match self {
            RstOrigin::PeerSocket => "peer_socket",
            RstOrigin::PeerKernel => "peer_kernel",
            RstOrigin::NotSentByPeer => "not_sent_by_peer",
            RstOrigin::Untraced => "untraced",
        }
    }
}

/// An HTTP/2 GOAWAY this socket sent or received: the one shape the HTTP/2 tracker records,
/// the timeline carries as a fact, the classifier reads and the exporter prints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoAway {
    /// This socket sent it (egress); otherwise it received it.
    pub sent: bool,
    /// CLOCK_MONOTONIC.
    pub at_ns: u64,
    pub code: ErrorCode,
    pub last_stream_id: u32,
    /// Debug data as text (lossy UTF-8), possibly cut short by the kernel's capture.
    pub debug: String,
    pub debug_truncated: bool,
    /// How long the connection had no open stream when it was sent.
    pub idle_ns: Option<u64>,
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
        comm: crate::event::Comm,
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
        comm: crate::event::Comm,
        exiting: bool,
    },
    /// Boxed: the largest fact by far, and rare; every other fact stays small.
    GoAway(Box<GoAway>),
}

impl FactKind {
    /// A step of closing done by an exiting owner (crash, kill, exit without close).
    pub fn is_exit_close(&self) -> bool {
        match self {
            FactKind::State { exiting, to, .. } => {
                *exiting && matches!(to, TcpState::FinWait1 | TcpState::LastAck | TcpState::Close)
            }
            FactKind::CloseCall { exiting, .. } | FactKind::RstSent { exiting, .. } => *exiting,
            _ => false,
        }
    }

    /// The socket itself reset the connection: a RST it sent, or a dying owner taking an
    /// open connection straight to CLOSE (which the kernel does with a RST).
    pub fn is_own_reset(&self) -> bool {
        matches!(
            self,
            FactKind::RstSent { .. }
                | FactKind::State {
                    from: TcpState::Established | TcpState::CloseWait | TcpState::SynRecv,
                    to: TcpState::Close,
                    exiting: true,
                    ..
                }
        )
    }
}

/// The HTTP/2 facts the classifier uses.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct H2Summary {
    pub synced: bool,
    pub goaways: Vec<GoAway>,
    /// Median interval of the PINGs this socket sent / received.
    pub ping_interval_sent_ns: Option<u64>,
    pub ping_interval_received_ns: Option<u64>,
    /// Since when a PING this socket sent (received) has gone unanswered, if one has.
    pub unanswered_sent_since: Option<u64>,
    pub unanswered_received_since: Option<u64>,
    /// When the last frame from the peer arrived.
    pub last_received_ns: Option<u64>,
    /// When a PING this socket sent (received) was last acknowledged.
    pub answered_sent_at: Option<u64>,
    pub answered_received_at: Option<u64>,
    /// Since when no stream was open at the end (None: some were open).
    pub idle_since_ns: Option<u64>,
    /// Streams still open when the connection ended.
    pub open_streams: usize,
    /// Most streams open at once over the connection's life (0: no stream ever seen).
    pub max_open_streams: usize,
}

/// What the peer socket did, when the peer is on this host too.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PeerSummary {
    pub id: ConnId,
    pub pid: Option<u32>,
    pub comm: Option<crate::event::Comm>,
    /// Its cgroup v2 id, from its packet records (its pod when `pid` is unknown).
    pub cgroup_id: Option<std::num::NonZeroU64>,
    /// Its owner was exiting when it closed (crash, kill -9, exit without close).
    pub exited: bool,
    /// It reached TCP_CLOSE before our socket did.
    pub closed_first: bool,
    pub netns: Option<u32>,
    /// When its own record shows it reset the connection (see [`FactKind::is_own_reset`]).
    pub reset_at_ns: Option<u64>,
    /// How the peer socket itself ended, when its record shows it (first signal).
    pub ended: Option<(u64, LegEnd)>,
    /// Its retransmissions (a timed-out peer: how many went unanswered).
    pub retransmits: u32,
    /// From its first retransmission to its ending, when it timed out after some.
    pub stalled_ns: Option<u64>,
    /// When it was opened (CLOCK_MONOTONIC), when known.
    pub opened_ns: Option<u64>,
    /// Its own addresses (local = its side).
    pub tuple: Option<crate::event::Tuple>,
    /// When it received a RST that nobody on this host sent (a middlebox reset it).
    pub middlebox_reset_at: Option<u64>,
    /// Its addresses are not this socket's reversed: the two were joined by sequence
    /// numbers through address translation (DNAT/SNAT) on the way.
    pub translated: bool,
    /// When it first sent a FIN, and first received one (egress/ingress hooks), to order
    /// FINs that crossed on the wire (same clock on both ends).
    pub fin_sent_ns: Option<u64>,
    pub fin_received_ns: Option<u64>,
}

/// How one socket's connection ended, from that socket's point of view: the first
/// terminating signal of its own record (a GOAWAY it sent counts as its own decision).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LegEnd {
    /// The socket's owner closed it (first FIN).
    OwnFin,
    /// The socket's owner reset it.
    OwnRst,
    /// The owner exited and the kernel closed or reset it.
    OwnExit,
    /// The socket sent an HTTP/2 GOAWAY before any FIN/RST.
    OwnGoaway { code: ErrorCode, debug: String },
    /// The far side closed it (FIN arrived first).
    FarFin,
    /// A RST arrived first.
    FarRst,
    /// The kernel gave up: retransmission or keepalive timeout (ETIMEDOUT).
    Timeout,
}

impl LegEnd {
    /// The socket's own owner decided the ending.
    pub fn is_own(&self) -> bool {
        matches!(
            self,
            LegEnd::OwnFin | LegEnd::OwnRst | LegEnd::OwnGoaway { .. }
        )
    }
    pub fn name(&self) -> &'static str {
        match self {
            LegEnd::OwnFin => "fin",
            LegEnd::OwnRst => "rst",
            LegEnd::OwnExit => "process_exit",
            LegEnd::OwnGoaway { .. } => "goaway",
            LegEnd::FarFin => "far_fin",
            LegEnd::FarRst => "far_rst",
            LegEnd::Timeout => "timeout",
        }
    }
}

/// Which of a proxy's legs a connection is, from the proxy's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyLeg {
    /// The leg the proxy accepted (facing its clients).
    Downstream,
    /// The leg the proxy connected (facing the backend).
    Upstream,
}

/// The other leg of a proxy: another socket of the same process, of the opposite role,
/// alive during this one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtherLeg {
    pub id: ConnId,
    pub local: Option<std::net::SocketAddr>,
    pub remote: Option<std::net::SocketAddr>,
    /// How the proxy's socket on that leg ended, if it has.
    pub ended: Option<(u64, LegEnd)>,
    /// Another leg of the proxy ended about as near in time with a different story (one by
    /// the proxy, the other from its far side, or one not seen): legs are paired by time
    /// alone, so which one belongs with this connection is not proven.
    pub ambiguous: bool,
}

/// A process on this host holding this connection's one end and another leg: a proxy
/// (or sidecar), either this socket's own owner or the peer socket's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyView {
    /// The proxy owns this very socket (else it owns the peer socket).
    pub local: bool,
    pub pid: u32,
    pub comm: String,
    pub netns: Option<u32>,
    /// Which of the proxy's legs this connection is.
    pub leg: ProxyLeg,
    /// How the proxy's socket on this connection ended.
    pub ended: Option<(u64, LegEnd)>,
    pub other: Option<OtherLeg>,
    /// The process name is a well-known proxy (haproxy, nginx, envoy, …).
    pub known_name: bool,
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
    /// The payload is TLS: the application layer is opaque.
    pub tls: bool,
    /// Kernel events may have been lost while this socket lived (ring-buffer drops, or
    /// facts beyond the per-socket bound).
    pub events_lost: bool,
    /// A proxy on this host holds this connection's end and another leg.
    pub proxy: Option<ProxyView>,
    /// When the connection last carried payload, either direction (packet hooks), to tell
    /// an idle timeout from its length even when the payload is opaque (TLS).
    pub last_data_ns: Option<u64>,
}

impl Timeline {
    /// Was the local owner exiting when it closed?
    pub fn local_exit(&self) -> bool {
        self.facts.iter().any(|f| f.kind.is_exit_close())
    }
}
