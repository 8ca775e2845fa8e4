//! The connection table: one state machine per socket, keyed by the kernel's socket address
//! (unique among live sockets whatever their network namespace). It turns kernel events
//! into timelines, and at the end of each socket's life (plus a linger period for late
//! facts such as the RST a close sends after its state change) it resolves the cross-socket
//! evidence and asks the classifier for a verdict.

pub mod h2;

use std::collections::{HashMap, HashSet, VecDeque};

use crate::{
    classify::{self, Fact, FactKind, H2Summary, PeerSummary, Role, RstOrigin, Timeline, Verdict},
    event::{Dir, Event, EventKind, Packet, TcpState, Tuple},
};
use h2::{H2State, H2Track};

/// Facts kept per connection; later ones are counted, not stored.
pub const MAX_FACTS: usize = 128;
const MAX_ORPHANS: usize = 65_536;
const MAX_LOG: usize = 16_384;
const LOG_WINDOW_NS: u64 = 60_000_000_000;
/// Two sockets are each other's peer when their sequence spaces line up within this.
const SEQ_WINDOW: u32 = 1 << 24;

#[derive(Clone, Debug)]
pub struct Conn {
    pub id: String,
    pub skaddr: u64,
    pub tuple: Option<Tuple>,
    pub netns: Option<u32>,
    pub role: Role,
    pub role_inferred: bool,
    pub preexisting: bool,
    pub first_ns: u64,
    pub opened_ns: Option<u64>,
    pub closed_ns: Option<u64>,
    pub state: TcpState,
    pub facts: Vec<Fact>,
    pub facts_dropped: u32,
    pub ttl_baseline: Option<u8>,
    pub egress_seq0: Option<u32>,
    pub ingress_seq0: Option<u32>,
    pub retransmits: u32,
    /// HTTP/2 state, once any payload of this socket was classified.
    pub h2: Option<H2Track>,
    /// CPU and time of the last event about this socket (to place tuple-only error reports).
    last_cpu: u32,
    last_ns: u64,
    /// Received RSTs: index into `facts` and the segment's sequence number if seen.
    rst_in: Vec<(usize, Option<u32>)>,
}

/// A finished connection and its verdict.
#[derive(Clone, Debug)]
pub struct Closed {
    pub conn: Conn,
    pub verdict: Verdict,
    pub peer: Option<PeerSummary>,
    pub owner: Option<(u32, String)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TableStats {
    pub events: u64,
    pub conns_opened: u64,
    pub conns_closed: u64,
    /// Connections not tracked because the table was full.
    pub conns_dropped: u64,
    pub facts_dropped: u64,
    pub errors_unmatched: u64,
}

#[derive(Clone, Debug, Default)]
struct Orphan {
    ttl_in: Option<u8>,
    egress_seq0: Option<u32>,
    ingress_seq0: Option<u32>,
}

/// A RST that left some socket on this host (or the kernel's no-socket reply).
#[derive(Clone, Debug)]
struct SentRst {
    at_ns: u64,
    /// From the sender's point of view.
    tuple: Tuple,
    seq: u32,
    from_conn: bool,
    /// The sending kernel's `sk_rst_reason`, when this host's kernel reported it.
    reason: Option<String>,
}

/// What remains of a finished connection, for its peer's verdict.
#[derive(Clone, Debug)]
struct Recent {
    at_ns: u64,
    tuple: Tuple,
    egress_seq0: Option<u32>,
    ingress_seq0: Option<u32>,
    summary: PeerSummary,
    closed_ns: Option<u64>,
}

pub struct Table {
    conns: HashMap<u64, Conn>,
    by_tuple: HashMap<Tuple, Vec<u64>>,
    listeners: HashSet<u64>,
    orphans: HashMap<u64, Orphan>,
    rst_log: VecDeque<SentRst>,
    recent: VecDeque<Recent>,
    /// Reasons of no-socket resets reported by `tcp_send_reset`, waiting for their segment.
    pending_reasons: HashMap<Tuple, String>,
    /// `sk_rst_reason` value names of this kernel (from BTF).
    rst_reason_names: HashMap<u32, String>,
    /// The packet hooks are attached: absence of a RST segment in the log means something.
    packet_facts: bool,
    linger_ns: u64,
    max_conns: usize,
    ephemeral: (u16, u16),
    pub stats: TableStats,
}

fn make_id(skaddr: u64, first_ns: u64) -> String {
    use std::hash::{Hash, Hasher};
    // Not the raw kernel address: ids end up in logs and must not leak kernel layout.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (skaddr, first_ns).hash(&mut h);
    format!("{:016x}", h.finish())
}

fn seq_near(a: u32, b: u32) -> bool {
    a.wrapping_sub(b) < SEQ_WINDOW || b.wrapping_sub(a) < SEQ_WINDOW
}

impl Conn {
    fn new(skaddr: u64, at_ns: u64, role: Role, preexisting: bool) -> Self {
        Conn {
            id: make_id(skaddr, at_ns),
            skaddr,
            tuple: None,
            netns: None,
            role,
            role_inferred: preexisting,
            preexisting,
            first_ns: at_ns,
            opened_ns: (!preexisting).then_some(at_ns),
            closed_ns: None,
            state: TcpState::Close,
            facts: Vec::new(),
            facts_dropped: 0,
            ttl_baseline: None,
            egress_seq0: None,
            ingress_seq0: None,
            retransmits: 0,
            h2: None,
            last_cpu: u32::MAX,
            last_ns: 0,
            rst_in: Vec::new(),
        }
    }

    fn push(&mut self, at_ns: u64, kind: FactKind) -> Option<usize> {
        if self.facts.len() >= MAX_FACTS {
            self.facts_dropped += 1;
            return None;
        }
        self.facts.push(Fact { at_ns, kind });
        Some(self.facts.len() - 1)
    }

    fn has(&self, pred: impl Fn(&FactKind) -> bool) -> bool {
        self.facts.iter().any(|f| pred(&f.kind))
    }

    /// The owner closed the socket while exiting (crash, kill, exit without close).
    pub fn exited(&self) -> bool {
        self.facts.iter().any(|f| match &f.kind {
            FactKind::State { exiting, to, .. } => {
                *exiting && matches!(to, TcpState::FinWait1 | TcpState::LastAck | TcpState::Close)
            }
            FactKind::CloseCall { exiting, .. } | FactKind::RstSent { exiting, .. } => *exiting,
            _ => false,
        })
    }

    /// The owning process, from facts that only happen in the owner's context: connect(),
    /// close()/shutdown() and the tcp_close hook.
    pub fn owner(&self) -> Option<(u32, String)> {
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

    fn summary(&self) -> PeerSummary {
        let owner = self.owner();
        PeerSummary {
            id: self.id.clone(),
            pid: owner.as_ref().map(|o| o.0),
            comm: owner.map(|o| o.1),
            exited: self.exited(),
            closed_first: false,
            netns: self.netns,
        }
    }
}

impl Table {
    pub fn new(linger_ns: u64, max_conns: usize, ephemeral: (u16, u16)) -> Self {
        Table {
            conns: HashMap::new(),
            by_tuple: HashMap::new(),
            listeners: HashSet::new(),
            orphans: HashMap::new(),
            rst_log: VecDeque::new(),
            recent: VecDeque::new(),
            pending_reasons: HashMap::new(),
            rst_reason_names: HashMap::new(),
            packet_facts: true,
            linger_ns,
            max_conns,
            ephemeral,
            stats: TableStats::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether packet facts are available (the cgroup_skb hooks attached).
    pub fn set_packet_facts(&mut self, on: bool) {
        self.packet_facts = on;
    }

    /// Names for the kernel's `enum sk_rst_reason` values (see `kernel::btf_enum_names`).
    pub fn set_rst_reason_names(&mut self, names: HashMap<u32, String>) {
        self.rst_reason_names = names;
    }

    fn rst_reason(&self, r: Option<u32>) -> Option<String> {
        let r = r?;
        Some(
            self.rst_reason_names
                .get(&r)
                .cloned()
                .unwrap_or_else(|| format!("reason_{r}")),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    fn infer_role(&self, t: Option<Tuple>) -> Role {
        let Some(t) = t else { return Role::Unknown };
        let eph = |p: u16| p >= self.ephemeral.0 && p <= self.ephemeral.1;
        match (eph(t.local.port()), eph(t.remote.port())) {
            (true, false) => Role::Client,
            (false, true) => Role::Server,
            _ => Role::Unknown,
        }
    }

    fn set_tuple(&mut self, sk: u64, t: Tuple) {
        let Some(conn) = self.conns.get_mut(&sk) else {
            return;
        };
        if conn.tuple == Some(t) || !t.is_complete() && conn.tuple.is_some() {
            return;
        }
        if let Some(old) = conn.tuple.take() {
            if let Some(v) = self.by_tuple.get_mut(&old) {
                v.retain(|&s| s != sk);
                if v.is_empty() {
                    self.by_tuple.remove(&old);
                }
            }
        }
        conn.tuple = Some(t);
        if conn.role == Role::Unknown && conn.preexisting {
            let role = self.infer_role(Some(t));
            if let Some(c) = self.conns.get_mut(&sk) {
                c.role = role;
            }
        }
        self.by_tuple.entry(t).or_default().push(sk);
    }

    /// Creates the connection for `sk`, first finishing any older one at the same address
    /// (the kernel reuses freed socket memory).
    fn open(&mut self, ev: &Event, role: Role, preexisting: bool, out: &mut Vec<Closed>) -> bool {
        if self.conns.contains_key(&ev.skaddr) {
            if let Some(c) = self.finish(ev.skaddr) {
                out.push(c);
            }
        }
        if self.conns.len() >= self.max_conns {
            self.stats.conns_dropped += 1;
            return false;
        }
        let mut conn = Conn::new(ev.skaddr, ev.ts_ns, role, preexisting);
        if let Some(o) = self.orphans.remove(&ev.skaddr) {
            conn.ttl_baseline = o.ttl_in;
            conn.egress_seq0 = o.egress_seq0;
            conn.ingress_seq0 = o.ingress_seq0;
        }
        self.conns.insert(ev.skaddr, conn);
        self.stats.conns_opened += 1;
        true
    }

    /// Feeds one event; returns connections that had to be finished early (address reuse).
    pub fn on_event(&mut self, ev: &Event) -> Vec<Closed> {
        self.stats.events += 1;
        let mut out = Vec::new();
        match ev.kind {
            EventKind::State { old, new } => self.on_state(ev, old, new, &mut out),
            EventKind::Packet(p) => self.on_packet(ev, &p),
            EventKind::H2Proto { note, .. } => {
                if let Some(c) = self.conns.get_mut(&ev.skaddr) {
                    let first = c.opened_ns.unwrap_or(c.first_ns);
                    c.h2.get_or_insert_with(|| H2Track::new(first))
                        .on_proto(note);
                }
            }
            EventKind::H2Frame {
                dir,
                ref head,
                ref payload,
                ..
            } => {
                if let Some(c) = self.conns.get_mut(&ev.skaddr) {
                    let first = c.opened_ns.unwrap_or(c.first_ns);
                    let track = c.h2.get_or_insert_with(|| H2Track::new(first));
                    if track.state == H2State::Unsynced && track.frames == 0 {
                        // Frames only come from a synced walker.
                        track.state = H2State::Synced;
                    }
                    if let Some(g) = track.on_frame(ev.ts_ns, dir, head, payload).cloned() {
                        c.push(
                            ev.ts_ns,
                            FactKind::GoAway {
                                sent: g.dir == Dir::Egress,
                                code: g.reason.0,
                                last_stream_id: g.last_stream_id,
                                debug: g.debug,
                            },
                        );
                    }
                }
            }
            EventKind::ErrorReport { error } => self.on_error(ev, error),
            EventKind::Retransmit { state, .. } => {
                if self.ensure(ev, &mut out) {
                    if let Some(c) = self.conns.get_mut(&ev.skaddr) {
                        c.retransmits += 1;
                        c.push(ev.ts_ns, FactKind::Retransmit { state });
                    }
                }
            }
            EventKind::SendReset { reason, .. } => {
                let name = self.rst_reason(reason);
                if ev.skaddr != 0 {
                    if let Some(c) = self.conns.get_mut(&ev.skaddr) {
                        mark_rst_sent(c, ev.ts_ns, ev.exiting, name);
                    }
                } else if let (Some(t), Some(name)) = (ev.tuple, name) {
                    // A reset for a segment that matched no socket; its packet follows.
                    if self.pending_reasons.len() >= 1024 {
                        self.pending_reasons.clear();
                    }
                    self.pending_reasons.insert(t, name);
                }
            }
            EventKind::RecvReset => {
                if let Some(c) = self.conns.get_mut(&ev.skaddr) {
                    if !c.has(|k| matches!(k, FactKind::RstReceived { .. })) {
                        if let Some(i) = c.push(
                            ev.ts_ns,
                            FactKind::RstReceived {
                                ttl: 0,
                                origin: RstOrigin::Untraced,
                                sender_reason: None,
                            },
                        ) {
                            c.rst_in.push((i, None));
                        }
                    }
                }
            }
            EventKind::Destroy => {
                if let Some(c) = self.conns.get_mut(&ev.skaddr) {
                    if c.closed_ns.is_none() {
                        c.closed_ns = Some(ev.ts_ns);
                        c.state = TcpState::Close;
                    }
                }
                self.listeners.remove(&ev.skaddr);
            }
            EventKind::CloseCall { state } => {
                if matches!(state, TcpState::Listen) {
                    return out;
                }
                if self.ensure(ev, &mut out) {
                    if let Some(c) = self.conns.get_mut(&ev.skaddr) {
                        c.push(
                            ev.ts_ns,
                            FactKind::CloseCall {
                                pid: ev.pid,
                                comm: ev.comm.clone(),
                                exiting: ev.exiting,
                            },
                        );
                    }
                }
            }
        }
        if let Some(c) = self.conns.get_mut(&ev.skaddr) {
            if ev.skaddr != 0 {
                c.last_cpu = ev.cpu;
                c.last_ns = ev.ts_ns;
            }
            if c.netns.is_none() {
                c.netns = ev.netns;
            }
            if let Some(t) = ev.tuple {
                if !matches!(ev.kind, EventKind::ErrorReport { .. }) {
                    self.set_tuple(ev.skaddr, t);
                }
            }
        }
        out
    }

    /// Makes sure a connection exists for an event about an already-open socket.
    fn ensure(&mut self, ev: &Event, out: &mut Vec<Closed>) -> bool {
        if ev.skaddr == 0 || self.listeners.contains(&ev.skaddr) {
            return false;
        }
        if self.conns.contains_key(&ev.skaddr) {
            return true;
        }
        let role = self.infer_role(ev.tuple);
        self.open(ev, role, true, out)
    }

    fn on_state(&mut self, ev: &Event, old: TcpState, new: TcpState, out: &mut Vec<Closed>) {
        let sk = ev.skaddr;
        if new == TcpState::Listen {
            if let Some(c) = self.finish(sk) {
                out.push(c);
            }
            self.listeners.insert(sk);
            return;
        }
        if old == TcpState::Listen {
            if new == TcpState::SynRecv {
                // A passive open: the child socket of a listener.
                self.listeners.remove(&sk);
                if !self.open(ev, Role::Server, false, out) {
                    return;
                }
            } else {
                self.listeners.remove(&sk);
                return;
            }
        } else if new == TcpState::SynSent {
            if !self.open(ev, Role::Client, false, out) {
                return;
            }
        } else if !self.ensure(ev, out) {
            return;
        }
        let Some(c) = self.conns.get_mut(&sk) else {
            return;
        };
        c.state = new;
        c.push(
            ev.ts_ns,
            FactKind::State {
                from: old,
                to: new,
                pid: ev.pid,
                comm: ev.comm.clone(),
                exiting: ev.exiting,
            },
        );
        if new == TcpState::Established && c.opened_ns.is_none() {
            c.opened_ns = Some(ev.ts_ns);
        }
        if new == TcpState::Close && c.closed_ns.is_none() {
            c.closed_ns = Some(ev.ts_ns);
        }
    }

    /// The error report carries a tuple, not a socket. The kernel reports the error right
    /// after (6.x) or right before (older) the socket's CLOSE transition, in the same context,
    /// so among sockets with that tuple the one this CPU touched last is the one.
    fn on_error(&mut self, ev: &Event, errno: i32) {
        let Some(t) = ev.tuple else {
            self.stats.errors_unmatched += 1;
            return;
        };
        let best = self
            .by_tuple
            .get(&t)
            .into_iter()
            .flatten()
            .filter_map(|s| self.conns.get(s))
            .max_by_key(|c| (c.last_cpu == ev.cpu, c.last_ns))
            .map(|c| c.skaddr);
        match best.and_then(|sk| self.conns.get_mut(&sk)) {
            Some(c) => {
                c.push(ev.ts_ns, FactKind::SocketError { errno });
            }
            None => self.stats.errors_unmatched += 1,
        }
    }

    fn on_packet(&mut self, ev: &Event, p: &Packet) {
        let sk = ev.skaddr;
        let Some(t) = ev.tuple else { return };
        let tracked = self
            .conns
            .get(&sk)
            .is_some_and(|c| c.tuple.is_none_or(|ct| !ct.is_complete() || ct == t));
        if p.rst() && p.dir == Dir::Egress {
            let reason = if tracked {
                None
            } else {
                self.pending_reasons.remove(&t)
            };
            self.rst_log.push_back(SentRst {
                at_ns: ev.ts_ns,
                tuple: t,
                seq: p.seq,
                from_conn: tracked,
                reason,
            });
            while self.rst_log.len() > MAX_LOG
                || self
                    .rst_log
                    .front()
                    .is_some_and(|r| ev.ts_ns.saturating_sub(r.at_ns) > LOG_WINDOW_NS)
            {
                self.rst_log.pop_front();
            }
        }
        if !tracked {
            // Listener traffic (handshakes) or a socket we have not met yet: keep the
            // first-segment facts until its first lifecycle event arrives.
            if self.listeners.contains(&sk) || p.syn() || sk == 0 {
                return;
            }
            if self.orphans.len() >= MAX_ORPHANS {
                self.orphans.clear();
            }
            let o = self.orphans.entry(sk).or_default();
            match p.dir {
                Dir::Egress => {
                    o.egress_seq0.get_or_insert(p.seq);
                }
                Dir::Ingress => {
                    o.ingress_seq0.get_or_insert(p.seq);
                    if !p.rst() {
                        o.ttl_in.get_or_insert(p.ttl);
                    }
                }
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&sk) else {
            return;
        };
        match p.dir {
            Dir::Egress => {
                c.egress_seq0.get_or_insert(p.seq);
                if p.fin() && !c.has(|k| matches!(k, FactKind::FinSent)) {
                    c.push(ev.ts_ns, FactKind::FinSent);
                }
                if p.rst() {
                    mark_rst_sent(c, ev.ts_ns, false, None);
                }
            }
            Dir::Ingress => {
                c.ingress_seq0.get_or_insert(p.seq);
                if !p.rst() && c.ttl_baseline.is_none() {
                    c.ttl_baseline = Some(p.ttl);
                }
                if p.ttl_changed && !p.rst() {
                    c.push(ev.ts_ns, FactKind::TtlChanged { ttl: p.ttl });
                }
                if p.fin() && !c.has(|k| matches!(k, FactKind::FinReceived { .. })) {
                    c.push(ev.ts_ns, FactKind::FinReceived { ttl: p.ttl });
                }
                if p.rst() {
                    // The reset tracepoint may have recorded it already, without the segment.
                    let none_yet = c.rst_in.is_empty();
                    let prior = c.rst_in.iter_mut().find(|(_, s)| s.is_none());
                    match prior {
                        Some((i, s)) => {
                            *s = Some(p.seq);
                            let i = *i;
                            if let Some(f) = c.facts.get_mut(i) {
                                f.kind = FactKind::RstReceived {
                                    ttl: p.ttl,
                                    origin: RstOrigin::Untraced,
                                    sender_reason: None,
                                };
                            }
                        }
                        None if none_yet => {
                            if let Some(i) = c.push(
                                ev.ts_ns,
                                FactKind::RstReceived {
                                    ttl: p.ttl,
                                    origin: RstOrigin::Untraced,
                                    sender_reason: None,
                                },
                            ) {
                                c.rst_in.push((i, Some(p.seq)));
                            }
                        }
                        None => {}
                    }
                }
            }
        }
    }

    /// Connections whose linger period is over at `now_ns` (CLOCK_MONOTONIC).
    pub fn take_due(&mut self, now_ns: u64) -> Vec<Closed> {
        let due: Vec<u64> = self
            .conns
            .values()
            .filter(|c| {
                c.closed_ns
                    .is_some_and(|t| t.saturating_add(self.linger_ns) <= now_ns)
            })
            .map(|c| c.skaddr)
            .collect();
        let mut out: Vec<Closed> = due.into_iter().filter_map(|sk| self.finish(sk)).collect();
        out.sort_by_key(|c| c.conn.closed_ns);
        out
    }

    /// Every connection that has closed, whatever its linger (shutdown flush).
    pub fn take_all_closed(&mut self) -> Vec<Closed> {
        self.take_due(u64::MAX)
    }

    fn find_peer(&self, conn: &Conn) -> Option<(PeerSummary, Option<u64>)> {
        let t = conn.tuple?;
        if !t.is_complete() {
            return None;
        }
        let want = t.reversed();
        let compatible = |eg: Option<u32>, ing: Option<u32>| {
            let a = match (conn.egress_seq0, ing) {
                (Some(x), Some(y)) => Some(seq_near(x, y)),
                _ => None,
            };
            let b = match (eg, conn.ingress_seq0) {
                (Some(x), Some(y)) => Some(seq_near(x, y)),
                _ => None,
            };
            match (a, b) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (None, None) => None,
                _ => Some(true),
            }
        };
        let mut unsure: Vec<(PeerSummary, Option<u64>)> = Vec::new();
        for sk in self.by_tuple.get(&want).into_iter().flatten() {
            let Some(p) = self.conns.get(sk) else {
                continue;
            };
            if p.skaddr == conn.skaddr {
                continue;
            }
            match compatible(p.egress_seq0, p.ingress_seq0) {
                Some(true) => return Some((p.summary(), p.closed_ns)),
                Some(false) => {}
                None => unsure.push((p.summary(), p.closed_ns)),
            }
        }
        for r in self.recent.iter().rev().filter(|r| r.tuple == want) {
            match compatible(r.egress_seq0, r.ingress_seq0) {
                Some(true) => return Some((r.summary.clone(), r.closed_ns)),
                Some(false) => {}
                None => unsure.push((r.summary.clone(), r.closed_ns)),
            }
        }
        // Without sequence numbers only an unambiguous match counts.
        if unsure.len() == 1 {
            unsure.pop()
        } else {
            None
        }
    }

    fn rst_origin(
        &self,
        tuple: Option<Tuple>,
        seq: Option<u32>,
        at_ns: u64,
        peer: bool,
    ) -> (RstOrigin, Option<String>) {
        if let Some(t) = tuple {
            let sender = t.reversed();
            let sent = self.rst_log.iter().rev().find(|r| {
                r.tuple == sender
                    && r.at_ns <= at_ns.saturating_add(1_000_000)
                    && match seq {
                        Some(s) => r.seq == s,
                        None => at_ns.saturating_sub(r.at_ns) < 1_000_000_000,
                    }
            });
            if let Some(r) = sent {
                let origin = if r.from_conn {
                    RstOrigin::PeerSocket
                } else {
                    RstOrigin::PeerKernel
                };
                return (origin, r.reason.clone());
            }
        }
        if peer {
            (RstOrigin::NotSentByPeer, None)
        } else {
            (RstOrigin::Untraced, None)
        }
    }

    /// Removes a connection, resolves cross-socket evidence and classifies it.
    fn finish(&mut self, sk: u64) -> Option<Closed> {
        let mut conn = self.conns.remove(&sk)?;
        if let Some(t) = conn.tuple {
            if let Some(v) = self.by_tuple.get_mut(&t) {
                v.retain(|&s| s != sk);
                if v.is_empty() {
                    self.by_tuple.remove(&t);
                }
            }
        }
        let peer = self.find_peer(&conn).map(|(mut s, closed)| {
            s.closed_first = match (closed, conn.closed_ns) {
                (Some(p), Some(me)) => p <= me,
                _ => false,
            };
            s
        });
        for (i, seq) in conn.rst_in.clone() {
            let at = conn.facts.get(i).map(|f| f.at_ns).unwrap_or(0);
            let (origin, reason) = if self.packet_facts {
                self.rst_origin(conn.tuple, seq, at, peer.is_some())
            } else {
                // Without segments the peer's RST cannot be looked up, so its absence proves
                // nothing; a peer socket that closed first most likely sent it.
                let first = peer.as_ref().is_some_and(|p| p.closed_first);
                (
                    if first {
                        RstOrigin::PeerSocket
                    } else {
                        RstOrigin::Untraced
                    },
                    None,
                )
            };
            if let Some(Fact {
                kind:
                    FactKind::RstReceived {
                        origin: o,
                        sender_reason,
                        ..
                    },
                ..
            }) = conn.facts.get_mut(i)
            {
                *o = origin;
                *sender_reason = reason;
            }
        }
        conn.facts.sort_by_key(|f| f.at_ns);
        let timeline = Timeline {
            role: conn.role,
            role_inferred: conn.role_inferred,
            facts: conn.facts.clone(),
            peer: peer.clone(),
            ttl_baseline: conn.ttl_baseline,
            h2: conn.h2.as_ref().map(h2_summary),
        };
        let verdict = classify::classify(&timeline);
        if let Some(t) = conn.tuple {
            let at = conn.closed_ns.unwrap_or(conn.first_ns);
            self.recent.push_back(Recent {
                at_ns: at,
                tuple: t,
                egress_seq0: conn.egress_seq0,
                ingress_seq0: conn.ingress_seq0,
                summary: conn.summary(),
                closed_ns: conn.closed_ns,
            });
            while self.recent.len() > MAX_LOG
                || self
                    .recent
                    .front()
                    .is_some_and(|r| at.saturating_sub(r.at_ns) > LOG_WINDOW_NS)
            {
                self.recent.pop_front();
            }
        }
        self.stats.conns_closed += 1;
        self.stats.facts_dropped += u64::from(conn.facts_dropped);
        let owner = conn.owner();
        Some(Closed {
            conn,
            verdict,
            peer,
            owner,
        })
    }
}

/// The classifier's view of the HTTP/2 state.
fn h2_summary(t: &H2Track) -> H2Summary {
    H2Summary {
        synced: t.state == H2State::Synced,
        goaways: t
            .goaways
            .iter()
            .map(|g| classify::GoAwaySummary {
                sent: g.dir == Dir::Egress,
                at_ns: g.at_ns,
                code: g.reason.0,
                debug: g.debug.clone(),
                idle_ns: g.idle_ns,
            })
            .collect(),
        ping_interval_sent_ns: t.ping_sent.median_interval_ns(),
        ping_interval_received_ns: t.ping_received.median_interval_ns(),
        unanswered_sent_since: t.ping_sent.oldest_unanswered_ns(),
        unanswered_received_since: t.ping_received.oldest_unanswered_ns(),
    }
}

/// Records the first RST this socket sent; the segment and the tracepoint each add what
/// they know (the tracepoint: the owner's state and the kernel's reason).
fn mark_rst_sent(c: &mut Conn, at_ns: u64, exiting: bool, reason: Option<String>) {
    for f in &mut c.facts {
        if let FactKind::RstSent {
            exiting: e,
            kernel_reason,
        } = &mut f.kind
        {
            *e |= exiting;
            if kernel_reason.is_none() {
                *kernel_reason = reason;
            }
            return;
        }
    }
    c.push(
        at_ns,
        FactKind::RstSent {
            exiting,
            kernel_reason: reason,
        },
    );
}

impl Default for Table {
    fn default() -> Self {
        Table::new(1_000_000_000, 65_536, (32768, 60999))
    }
}

/// Reads `net.ipv4.ip_local_port_range` (used to guess roles of pre-existing connections).
pub fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().filter_map(|v| v.parse::<u16>().ok());
            Some((it.next()?, it.next()?))
        })
        .unwrap_or((32768, 60999))
}

#[cfg(test)]
mod tests;
