//! The connection table: one state machine per socket, keyed by the kernel's socket address
//! (unique among live sockets whatever their network namespace). It turns kernel events
//! into timelines, and at the end of each socket's life (plus a linger period for late
//! facts such as the RST a close sends after its state change) it resolves the cross-socket
//! evidence and asks the classifier for a verdict.
//!
//! By concern: this file holds the table, its configuration and the event dispatch;
//! `record` one socket's record; `lifecycle` state changes, closes and errors; `packets`
//! segment facts; `rst` where RSTs came from; `peer` matching the two ends of a local
//! connection; `finish` linger, cross-socket resolution and classification; [`h2`] the
//! HTTP/2 tracker.

mod early;
mod finish;
pub mod h2;
mod lifecycle;
mod packets;
mod peer;
mod proxy;
mod recheck;
mod record;
mod rst;

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, HashSet, VecDeque},
};

use crate::{
    classify::Verdict,
    event::{Event, EventKind, Tuple},
    timeline::{PeerSummary, Role},
};
pub use record::{Conn, MAX_FACTS};

/// Hashes a kernel socket address: one multiply. The keys are kernel pointers, which no
/// remote party chooses, so the DoS-resistant default (SipHash, a few percent of the agent
/// under churn in `perf`) buys nothing here. Tuple-keyed maps, whose keys a remote party
/// does choose, use [`FastMap`].
#[derive(Clone, Copy, Default)]
pub(crate) struct SkHasher(u64);

impl std::hash::Hasher for SkHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, x: u64) {
        // Socket addresses are aligned: fold the high bits of the product down so the low
        // bits the table indexes by depend on all of them.
        let m = (self.0 ^ x).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = m ^ (m >> 29);
    }
}

type SkBuild = std::hash::BuildHasherDefault<SkHasher>;
/// Maps keyed by addresses or sequence numbers, which remote parties choose: foldhash with
/// a per-process random seed. SipHash, std's default, cost about 3 % of the agent under
/// churn in `perf`.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// The sockets (or log entries) at one tuple: almost always one, so it is kept inline
/// (no allocation per indexed socket; `bench-live`).
type Few<T> = smallvec::SmallVec<[T; 1]>;
type SkMap<V> = HashMap<u64, V, SkBuild>;
type SkSet = HashSet<u64, SkBuild>;

/// Bounds of the cross-socket logs (sent RSTs, recently finished connections).
const MAX_LOG: usize = 16_384;
const LOG_WINDOW_NS: u64 = 60_000_000_000;

/// Everything the table is configured with, made once from the command line and from what
/// the probes actually attached. There are no setters: a table is built from one of these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableConfig {
    /// How long a closed socket waits for late evidence before it is judged.
    pub linger_ns: u64,
    /// Most connections tracked at once; more are counted as dropped.
    pub max_conns: usize,
    /// `net.ipv4.ip_local_port_range`, to guess roles of pre-existing connections.
    pub ephemeral: (u16, u16),
    /// Both packet hooks are attached: a RST segment missing from the log means something.
    /// Without them only a peer's own record can say it sent a RST.
    pub packet_facts: bool,
    /// Names of this kernel's `enum sk_rst_reason` values (from BTF; see
    /// [`crate::kernel::KernelBtf::enum_names`]).
    pub rst_reason_names: HashMap<u32, String>,
}

impl Default for TableConfig {
    /// One second of linger, 65 536 connections, Linux's default ephemeral range, packet
    /// facts on and no reason names (what the unit tests and examples feed).
    fn default() -> Self {
        TableConfig {
            linger_ns: 1_000_000_000,
            max_conns: 65_536,
            ephemeral: (32768, 60999),
            packet_facts: true,
            rst_reason_names: HashMap::new(),
        }
    }
}

/// A finished connection and its verdict.
#[derive(Clone, Debug)]
pub struct Closed {
    pub conn: Conn,
    pub verdict: Verdict,
    pub peer: Option<PeerSummary>,
    pub owner: Option<(u32, crate::event::Comm)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TableStats {
    pub events: u64,
    pub conns_opened: u64,
    pub conns_closed: u64,
    /// Records opened by the start-up walk over the TCP sockets (`EXISTING` records).
    pub conns_walked: u64,
    /// Connections not tracked because the table was full (each counted once; the table
    /// keeps the connections it has whole rather than evicting one half-way).
    pub conns_dropped: u64,
    pub facts_dropped: u64,
    pub errors_unmatched: u64,
    /// close() calls on sockets already in CLOSE and no longer tracked (judged before).
    pub late_close_calls: u64,
    /// Sent RSTs pushed out of the provenance log by its cap while still recent: a RST
    /// received around then can no longer be proven "not sent by the peer".
    pub rst_log_evictions: u64,
    /// Sockets whose end was never seen: their address was reused (or used by a socket with
    /// other addresses) while their record was still open, or a recheck found them gone, so
    /// their CLOSE was lost.
    pub ends_unseen: u64,
    /// Walks over the live sockets after a loss ([`Table::recheck_start`]).
    pub rechecks: u64,
    /// Of `ends_unseen`: records a recheck found without a socket.
    pub ends_found_gone: u64,
}

pub struct Table {
    cfg: TableConfig,
    /// Boxed: a bucket is then 16 bytes, so the table's spare capacity (up to half of it
    /// after a resize) costs pointers, not whole records (bench-live).
    conns: SkMap<Box<Conn>>,
    /// Records taken out of `conns` because their address was reused: judged at the next
    /// [`Table::take_due`], after the ring-buffer drop total has been read, never before
    /// (a verdict given at once could not know whether its events were lost meanwhile).
    retired: Vec<Option<Conn>>,
    /// Positions in `retired` by tuple and by (first egress, first ingress) sequence
    /// numbers, built when a take_due starts judging them: the peer lookup of each retired
    /// record is then a hash lookup, not a scan of all of them (quadratic under churn,
    /// when thousands are retired between two ticks).
    retired_by_tuple: FastMap<Tuple, Few<usize>>,
    retired_by_seq: FastMap<(u32, u32), usize>,
    /// Live sockets by tuple, keyed by the tuple's seeded hash: 8 bytes a key instead of
    /// the 40-byte tuple (bench-live). Lookups check each record's own tuple
    /// ([`Table::live_at`]), so a collision costs a comparison, never a wrong match.
    by_tuple: SkMap<Few<u64>>,
    tuple_hasher: foldhash::fast::RandomState,
    listeners: SkSet,
    /// Sockets refused because the table was full: their later events are ignored until
    /// they close (counted once, never brought back as `preexisting`). At most `max_conns`.
    refused: SkSet,
    orphans: SkMap<packets::Orphan>,
    /// HTTP/2 events of sockets not met yet (`early.rs`).
    early_h2: SkMap<Vec<Event>>,
    rst_log: VecDeque<rst::SentRst>,
    /// Time of the newest sent RST the log's cap pushed out while still inside the window.
    rst_log_evicted_ns: Option<u64>,
    recent: VecDeque<peer::Recent>,
    /// Closed live records by (close time, socket), earliest first, for
    /// [`Table::take_due`]; entries whose record was since retired or replaced are skipped.
    due: BinaryHeap<Reverse<(u64, u64)>>,
    /// Reasons of no-socket resets reported by `tcp_send_reset`, waiting for their segment.
    pending_reasons: FastMap<Tuple, String>,
    /// Live sockets by (first egress, first ingress) sequence number: the two ends of one
    /// connection have them crossed, whatever NAT did to the addresses.
    live_seq: FastMap<(u32, u32), u64>,
    /// The same for recently finished sockets: the serial of their [`peer::Recent`] entry.
    recent_seq: FastMap<(u32, u32), u64>,
    /// Serials of recently finished sockets by tuple, oldest first: a peer lookup reads the
    /// few entries with its reversed tuple instead of scanning the whole log (which, full at
    /// 16 384 entries under churn, took most of the agent's CPU).
    recent_by_tuple: FastMap<Tuple, Few<u64>>,
    recent_serial: u64,
    /// Closed sockets per owning process, to find a proxy's other leg.
    legs: proxy::Legs,
    /// Intervals (CLOCK_MONOTONIC) during which the kernel lost events (a full ring buffer,
    /// unreadable records, skipped program runs).
    drop_windows: VecDeque<(u64, u64)>,
    /// The windows that left `drop_windows` (older than a minute, or past 256), as one span.
    drops_before: Option<(u64, u64)>,
    drops_seen: u64,
    drops_checked_ns: u64,
    /// A walk over the live sockets in progress (`recheck.rs`).
    recheck: Option<recheck::Recheck>,
    pub stats: TableStats,
}

impl Default for Table {
    fn default() -> Self {
        Table::new(TableConfig::default())
    }
}

impl Table {
    pub fn new(cfg: TableConfig) -> Self {
        Table {
            cfg,
            conns: SkMap::default(),
            retired: Vec::new(),
            retired_by_tuple: FastMap::default(),
            retired_by_seq: FastMap::default(),
            by_tuple: SkMap::default(),
            tuple_hasher: foldhash::fast::RandomState::default(),
            listeners: SkSet::default(),
            refused: SkSet::default(),
            orphans: SkMap::default(),
            early_h2: SkMap::default(),
            rst_log: VecDeque::new(),
            rst_log_evicted_ns: None,
            recent: VecDeque::new(),
            due: BinaryHeap::new(),
            pending_reasons: FastMap::default(),
            live_seq: FastMap::default(),
            recent_seq: FastMap::default(),
            recent_by_tuple: FastMap::default(),
            recent_serial: 0,
            legs: proxy::Legs::default(),
            drop_windows: VecDeque::new(),
            drops_before: None,
            drops_seen: 0,
            drops_checked_ns: 0,
            recheck: None,
            stats: TableStats::default(),
        }
    }

    /// The kernel's lost-event total ([`crate::probes::CounterSnapshot::events_lost`]) read
    /// at `now_ns` (CLOCK_MONOTONIC). When it rose since the last reading, every connection
    /// alive in between may miss events and its verdict says so. Call it before
    /// [`Table::take_due`] with the same `now_ns`.
    pub fn note_events_lost(&mut self, now_ns: u64, total: u64) {
        if total > self.drops_seen {
            self.drop_windows.push_back((self.drops_checked_ns, now_ns));
            while self.drop_windows.len() > 256
                || self
                    .drop_windows
                    .front()
                    .is_some_and(|w| now_ns.saturating_sub(w.1) > LOG_WINDOW_NS)
            {
                // Older windows merge into one rather than being forgotten: a connection
                // alive through any of them, judged now, still overlaps the merged span
                // (what it adds, the gaps between them, holds only connections judged
                // long ago).
                if let Some((s, e)) = self.drop_windows.pop_front() {
                    self.drops_before = Some(match self.drops_before {
                        Some((s0, e0)) => (s0.min(s), e0.max(e)),
                        None => (s, e),
                    });
                }
            }
        }
        self.drops_seen = total;
        self.drops_checked_ns = now_ns;
    }

    /// Whether `c` may miss events: part of its life unseen, facts over the cap, or the
    /// kernel lost events while it was tracked (up to `until_ns`; `u64::MAX` for a live
    /// one). Its verdict's confidence is lowered for it.
    pub fn events_lost(&self, c: &Conn, until_ns: u64) -> bool {
        c.gap || c.facts_dropped > 0 || self.drops_during(c.first_ns, until_ns)
    }

    /// Did the kernel lose events between `from_ns` and `to_ns`?
    fn drops_during(&self, from_ns: u64, to_ns: u64) -> bool {
        self.drops_before
            .iter()
            .chain(self.drop_windows.iter())
            .any(|&(s, e)| s < to_ns && e >= from_ns)
    }

    /// Is `sk` a socket the table tracks right now, and (when `tuple` is given and both are
    /// complete) with these very addresses? A freed socket's address is soon reused, possibly
    /// in another namespace, while the old record still lingers.
    pub fn tracks(&self, sk: u64, tuple: Option<Tuple>) -> bool {
        sk != 0
            && self.conns.get(&sk).is_some_and(|c| match (c.tuple, tuple) {
                (Some(a), Some(b)) if a.is_complete() && b.is_complete() => a == b,
                _ => true,
            })
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Read-only view of the tracked sockets (`whoclosed conns`), each with the time of its
    /// last event (CLOCK_MONOTONIC ns).
    pub fn live(&self) -> impl Iterator<Item = (&Conn, u64)> {
        self.conns
            .values()
            .map(|c| (&**c, c.last_ns.max(c.first_ns)))
    }

    /// Feeds one event. Returns connections that had to be judged at once: only when more
    /// reused-address records wait than the table may hold (see [`Table::take_due`]).
    pub fn on_event(&mut self, ev: &Event) -> Vec<Closed> {
        self.stats.events += 1;
        let mut out = Vec::new();
        self.split_if_other_socket(ev, &mut out);
        match ev.kind {
            EventKind::State { old, new } => self.on_state(ev, old, new, &mut out),
            EventKind::Packet(p) => self.on_packet(ev, &p, &mut out),
            EventKind::H2Proto { .. } | EventKind::H2Frame { .. } => self.on_h2(ev, &mut out),
            EventKind::ErrorReport { error } => self.on_error(ev, error),
            EventKind::Retransmit { state, .. } => self.on_retransmit(ev, state, &mut out),
            EventKind::SendReset { reason, .. } => self.on_send_reset(ev, reason),
            EventKind::RecvReset => self.on_recv_reset(ev),
            EventKind::Destroy => self.on_destroy(ev),
            EventKind::CloseCall { state } => self.on_close_call(ev, state, &mut out),
            EventKind::Existing { state, cgroup_id } => {
                self.on_existing(ev, state, cgroup_id, &mut out)
            }
        }
        if let Some(c) = self.conns.get_mut(&ev.skaddr) {
            if ev.skaddr != 0 {
                c.last_cpu = u16::try_from(ev.cpu).unwrap_or(u16::MAX);
                c.last_ns = ev.ts_ns;
            }
            if c.netns.is_none() {
                c.netns = ev.netns;
            }
            // Decided here, while the record is at hand: nearly every event repeats the
            // tuple the record has, and set_tuple would look the record up again to see so.
            let new_tuple = ev
                .tuple
                .filter(|t| !matches!(ev.kind, EventKind::ErrorReport { .. }) && c.takes_tuple(t));
            if let Some(t) = new_tuple {
                self.set_tuple(ev.skaddr, t);
            }
        }
        out
    }

    fn infer_role(&self, t: Option<Tuple>) -> Role {
        let Some(t) = t else { return Role::Unknown };
        let (lo, hi) = self.cfg.ephemeral;
        let eph = |p: u16| p >= lo && p <= hi;
        match (eph(t.local().port()), eph(t.remote().port())) {
            (true, false) => Role::Client,
            (false, true) => Role::Server,
            _ => Role::Unknown,
        }
    }

    fn set_tuple(&mut self, sk: u64, t: Tuple) {
        let Some(conn) = self.conns.get_mut(&sk) else {
            return;
        };
        if !conn.takes_tuple(&t) {
            return;
        }
        if let Some(old) = conn.tuple.take() {
            self.unindex(sk, old);
        }
        if let Some(c) = self.conns.get_mut(&sk) {
            c.tuple = Some(t);
        }
        let preexisting_unknown = self
            .conns
            .get(&sk)
            .is_some_and(|c| c.role == Role::Unknown && c.preexisting);
        if preexisting_unknown {
            let role = self.infer_role(Some(t));
            if let Some(c) = self.conns.get_mut(&sk) {
                c.role = role;
            }
        }
        let key = self.tuple_key(&t);
        self.by_tuple.entry(key).or_default().push(sk);
    }

    /// Drops `sk` from the tuple index.
    fn unindex(&mut self, sk: u64, t: Tuple) {
        let key = self.tuple_key(&t);
        if let Some(v) = self.by_tuple.get_mut(&key) {
            v.retain(|s| *s != sk);
            if v.is_empty() {
                self.by_tuple.remove(&key);
            }
        }
    }

    fn tuple_key(&self, t: &Tuple) -> u64 {
        use std::hash::BuildHasher;
        self.tuple_hasher.hash_one(t)
    }

    /// The live records whose tuple is `t`.
    fn live_at(&self, t: Tuple) -> impl Iterator<Item = &Conn> {
        self.by_tuple
            .get(&self.tuple_key(&t))
            .into_iter()
            .flatten()
            .filter_map(|sk| self.conns.get(sk))
            .map(|c| &**c)
            .filter(move |c| c.tuple == Some(t))
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
