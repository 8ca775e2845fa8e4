//! One socket's record: what the table knows about it, and the questions asked of it
//! (owner, exit, summary for its peer's verdict).

use std::borrow::Cow;

use crate::{
    event::{ProtoNote, TcpState, Tuple},
    timeline::{ConnId, Fact, FactKind, LegEnd, PeerSummary, Role},
};

use super::h2::{H2State, H2Track};

/// Facts kept per connection; later ones are counted, not stored.
pub const MAX_FACTS: usize = 128;

#[derive(Clone, Debug)]
pub struct Conn {
    pub id: ConnId,
    pub skaddr: u64,
    pub tuple: Option<Tuple>,
    /// The addresses the socket's own state changes carry (packets may carry translated
    /// ones, e.g. after OUTPUT-chain DNAT): to tell a reused address from the same socket.
    pub(super) state_tuple: Option<Tuple>,
    pub netns: Option<u32>,
    pub role: Role,
    pub role_inferred: bool,
    pub preexisting: bool,
    /// [`mark`] bits: one byte for what would be two bools (the record's size is
    /// bench-live's budget).
    pub(super) marks: u8,
    pub first_ns: u64,
    pub opened_ns: Option<u64>,
    pub closed_ns: Option<u64>,
    pub state: TcpState,
    pub facts: Vec<Fact>,
    pub facts_dropped: u32,
    /// Part of this socket's life was certainly not seen: its end (the address was reused
    /// before its CLOSE arrived) or its start (another socket's events at its address).
    /// Like lost facts, it lowers the verdict's confidence.
    pub gap: bool,
    pub ttl_baseline: Option<u8>,
    pub egress_seq0: Option<u32>,
    pub ingress_seq0: Option<u32>,
    /// When the socket last carried payload (either direction), from its packet records
    /// (CLOCK_MONOTONIC, never 0; the niche keeps the record at 256 bytes).
    pub last_data_ns: Option<std::num::NonZeroU64>,
    /// The socket's cgroup v2 id, from its packet records: names its pod when no event of
    /// its owner was seen.
    pub cgroup_id: Option<std::num::NonZeroU64>,
    pub retransmits: u32,
    /// HTTP/2 state, once any payload of this socket was classified.
    /// Boxed: most connections are not HTTP/2, and the tracker is larger than the rest of
    /// the record (376 of 680 bytes inline, for every tracked socket).
    pub h2: Option<Box<H2Track>>,
    /// What the payload turned out to be when that is all there will be: TLS, or not
    /// HTTP/2 (the kernel stops walking such a socket). Kept inline, not as a boxed tracker
    /// (about 400 bytes on every socket that carried payload: bench-live); readers get the
    /// tracker it stands for from [`Conn::h2_view`].
    pub h2_opaque: Option<H2State>,
    /// CPU and time of the last event about this socket (to place tuple-only error reports).
    /// `u16::MAX` when none (CPU numbers fit: Linux allows at most 8192).
    pub(super) last_cpu: u16,
    pub(super) last_ns: u64,
    /// Received RSTs: index into `facts` and the segment's sequence number if seen.
    pub(super) rst_in: Vec<(usize, Option<u32>)>,
}

/// Bits of [`Conn::marks`].
pub(super) mod mark {
    /// `state` of a socket met mid-life came from a walk of the live sockets (`iter/tcp`),
    /// not from a state change.
    pub const STATE_WALKED: u8 = 1 << 0;
    /// A packet record said the socket holds the kernel's per-socket packet state, which
    /// the kernel frees only with the socket: a recheck's storage listing that lacks it
    /// proves the socket gone (`conn/recheck.rs`).
    pub const HAS_STATE: u8 = 1 << 1;
}

fn make_id(skaddr: u64, first_ns: u64) -> ConnId {
    use std::hash::{Hash, Hasher};
    // Not the raw kernel address: ids end up in logs and must not leak kernel layout.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (skaddr, first_ns).hash(&mut h);
    ConnId(h.finish())
}

impl Conn {
    pub(super) fn new(skaddr: u64, at_ns: u64, role: Role, preexisting: bool) -> Self {
        Conn {
            id: make_id(skaddr, at_ns),
            skaddr,
            tuple: None,
            state_tuple: None,
            netns: None,
            role,
            role_inferred: preexisting,
            preexisting,
            marks: 0,
            first_ns: at_ns,
            opened_ns: (!preexisting).then_some(at_ns),
            closed_ns: None,
            state: TcpState::Close,
            facts: Vec::new(),
            facts_dropped: 0,
            gap: false,
            ttl_baseline: None,
            egress_seq0: None,
            ingress_seq0: None,
            last_data_ns: None,
            cgroup_id: None,
            retransmits: 0,
            h2: None,
            h2_opaque: None,
            last_cpu: u16::MAX,
            last_ns: 0,
            rst_in: Vec::new(),
        }
    }

    /// Would an event's tuple `t` change this record's? Not when it is the same, nor when
    /// it is incomplete and the record has one.
    pub(super) fn takes_tuple(&self, t: &Tuple) -> bool {
        self.tuple != Some(*t) && (t.is_complete() || self.tuple.is_none())
    }

    pub(super) fn push(&mut self, at_ns: u64, kind: FactKind) -> Option<usize> {
        if self.facts.len() >= MAX_FACTS {
            self.facts_dropped += 1;
            return None;
        }
        if self.facts.capacity() == 0 {
            // An open, idle connection holds two facts (its opening transitions): room for
            // two, not the four a first push reserves (96 bytes per tracked socket).
            self.facts.reserve_exact(2);
        } else if self.facts.len() == 2 && self.facts.capacity() == 2 {
            // The third fact is the connection starting to end; a plain close brings seven
            // (three more transitions, a FIN each way): grow once to eight, not 2 → 4 → 8
            // (two reallocations per ended socket were 3 % of replay's instructions).
            self.facts.reserve_exact(6);
        }
        self.facts.push(Fact { at_ns, kind });
        Some(self.facts.len() - 1)
    }

    /// The HTTP/2 state, boxed tracker or inline.
    pub fn h2_state(&self) -> Option<H2State> {
        self.h2.as_ref().map(|t| t.state).or(self.h2_opaque)
    }

    /// Where the HTTP/2 tracker's time starts (an inline state's tracker: its
    /// `idle_since_ns`).
    pub fn h2_start(&self) -> u64 {
        self.opened_ns.unwrap_or(self.first_ns)
    }

    /// The HTTP/2 tracker, for reading: the boxed one, or the one [`Conn::h2_opaque`]
    /// stands for (built here; an empty tracker allocates nothing).
    pub fn h2_view(&self) -> Option<Cow<'_, H2Track>> {
        match (&self.h2, self.h2_opaque) {
            (Some(t), _) => Some(Cow::Borrowed(&**t)),
            (None, Some(state)) => Some(Cow::Owned(H2Track::in_state(self.h2_start(), state))),
            (None, None) => None,
        }
    }

    /// The HTTP/2 tracker, for writing: boxed now if it was not (carrying the state
    /// [`Conn::h2_opaque`] held).
    pub(super) fn h2_mut(&mut self) -> &mut H2Track {
        let start = self.h2_start();
        let opaque = self.h2_opaque.take();
        self.h2.get_or_insert_with(|| {
            Box::new(match opaque {
                Some(state) => H2Track::in_state(start, state),
                None => H2Track::new(start),
            })
        })
    }

    /// A note about the socket's payload from the kernel's walker.
    pub(super) fn on_h2_note(&mut self, note: ProtoNote) {
        if self.h2.is_none() {
            // Only the state would change: no tracker needed (`h2_view` builds the same).
            let opaque = match note {
                ProtoNote::Tls => Some(H2State::Tls),
                ProtoNote::Other => Some(H2State::NotH2),
                _ => None,
            };
            if opaque.is_some() {
                self.h2_opaque = opaque;
                return;
            }
        }
        self.h2_mut().on_proto(note);
    }

    /// The opening is seen late (`opened_ns` set after the record was made): an inline
    /// HTTP/2 state is boxed first, so that its tracker keeps the start it had.
    pub(super) fn set_opened(&mut self, at_ns: u64) {
        if self.h2_opaque.is_some() {
            self.h2_mut();
        }
        self.opened_ns = Some(at_ns);
    }

    /// How long the connection had carried no payload when it ended: from the last segment
    /// with payload to its first FIN or RST either way (0 if data came after). `None` without
    /// packet facts or without an ending.
    pub fn idle_before_end_ns(&self) -> Option<u64> {
        let end = self.first_at(|k| {
            matches!(
                k,
                FactKind::FinSent
                    | FactKind::FinReceived { .. }
                    | FactKind::RstSent { .. }
                    | FactKind::RstReceived { .. }
            )
        })?;
        Some(end.saturating_sub(self.last_data_ns?.get()))
    }

    /// Time of the first fact matching `pred`.
    pub fn first_at(&self, pred: impl Fn(&FactKind) -> bool) -> Option<u64> {
        self.facts
            .iter()
            .filter(|f| pred(&f.kind))
            .map(|f| f.at_ns)
            .min()
    }

    pub(super) fn has(&self, pred: impl Fn(&FactKind) -> bool) -> bool {
        self.facts.iter().any(|f| pred(&f.kind))
    }

    /// The TCP state to show for a live socket: `UNKNOWN` for one met mid-life (open before
    /// the agent) that has changed state in no event seen yet and was not in the start-up
    /// walk, whose `state` is only the record's initial value.
    pub fn state_name(&self) -> &'static str {
        if self.state_known() {
            self.state.name()
        } else {
            "UNKNOWN"
        }
    }

    /// Whether `state` is the socket's: it was opened here, changed state in an event seen,
    /// or was in that state in the start-up walk.
    pub fn state_known(&self) -> bool {
        !self.preexisting
            || self.marks & mark::STATE_WALKED != 0
            || self.has(|k| matches!(k, FactKind::State { .. }))
    }

    /// The owner closed the socket while exiting (crash, kill, exit without close).
    pub fn exited(&self) -> bool {
        self.facts.iter().any(|f| f.kind.is_exit_close())
    }

    /// The owning process, from facts that only happen in the owner's context: connect(),
    /// close()/shutdown() and the tcp_close hook.
    pub fn owner(&self) -> Option<(u32, crate::event::Comm)> {
        let from_proc = self.facts.iter().find_map(|f| match &f.kind {
            FactKind::CloseCall { pid, comm, .. } if *pid != 0 => Some((*pid, comm.clone())),
            FactKind::State {
                to: TcpState::SynSent | TcpState::FinWait1 | TcpState::LastAck,
                pid,
                comm,
                ..
            } if *pid != 0 => Some((*pid, comm.clone())),
            _ => None,
        });
        if from_proc.is_some() {
            return from_proc;
        }
        // A close that reset the connection runs in the closing process too; a close caused
        // by a received RST or a timeout does not, so only trust it when we sent the RST.
        if self.has(|k| matches!(k, FactKind::RstSent { .. })) {
            return self.facts.iter().find_map(|f| match &f.kind {
                FactKind::State {
                    to: TcpState::Close,
                    pid,
                    comm,
                    ..
                } if *pid != 0 => Some((*pid, comm.clone())),
                _ => None,
            });
        }
        None
    }

    /// What this socket's peer needs to know about it.
    pub(super) fn summary(&self) -> PeerSummary {
        let owner = self.owner();
        let ended = super::proxy::own_end(&self.facts);
        let first_rtx = self
            .facts
            .iter()
            .filter(|f| matches!(f.kind, FactKind::Retransmit { .. }))
            .map(|f| f.at_ns)
            .min();
        let stalled_ns = match (&ended, first_rtx) {
            (Some((at, LegEnd::Timeout)), Some(r)) => Some(at.saturating_sub(r)),
            _ => None,
        };
        PeerSummary {
            ended,
            retransmits: self.retransmits,
            stalled_ns,
            opened_ns: self.opened_ns,
            tuple: self.tuple,
            translated: false,
            middlebox_reset_at: self.facts.iter().find_map(|f| match f.kind {
                FactKind::RstReceived {
                    origin: crate::timeline::RstOrigin::NotSentByPeer,
                    ..
                } => Some(f.at_ns),
                _ => None,
            }),
            fin_sent_ns: self.first_at(|k| matches!(k, FactKind::FinSent)),
            fin_received_ns: self.first_at(|k| matches!(k, FactKind::FinReceived { .. })),
            id: self.id,
            pid: owner.as_ref().map(|o| o.0),
            comm: owner.map(|o| o.1),
            cgroup_id: self.cgroup_id,
            exited: self.exited(),
            closed_first: false,
            netns: self.netns,
            reset_at_ns: self
                .facts
                .iter()
                .filter(|f| f.kind.is_own_reset())
                .map(|f| f.at_ns)
                .min(),
        }
    }
}
