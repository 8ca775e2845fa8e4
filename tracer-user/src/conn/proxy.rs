//! Proxy legs: a process on this host that holds both an accepted socket and a connected
//! one, alive at the same time, is relaying between them (haproxy, nginx, a sidecar). When
//! one of its sockets ends, its other leg says whether the proxy decided the ending or only
//! passed on one that came from the far side.
//!
//! Closed sockets are remembered per owning process (bounded per process and in time), so
//! the lookup costs a few comparisons, not a scan of the table.

use std::collections::{HashMap, VecDeque};

use super::{Conn, FastMap, LOG_WINDOW_NS, Table};
use crate::{
    classify::{PAIR_WINDOW_NS, leg_end},
    event::Tuple,
    timeline::{ConnId, Fact, LegEnd, OtherLeg, PeerSummary, ProxyLeg, ProxyView, Role},
};

/// Closed sockets remembered per process, and processes remembered at all.
const MAX_LEGS_PER_PID: usize = 256;
const MAX_PIDS: usize = 16_384;
/// Closed sockets waiting for their judgement, at most (more than a table holds by default).
const MAX_UNSETTLED: usize = 1 << 17;
/// Other-leg candidates checked per socket, nearest in time first.
const MAX_CANDIDATES: usize = 8;

/// Process names of well-known proxies (the kernel's 15-byte `comm`).
const KNOWN_PROXIES: &[&str] = &[
    "haproxy",
    "nginx",
    "envoy",
    "traefik",
    "linkerd2-proxy",
    "caddy",
    "squid",
    "socat",
    "pilot-agent",
    "istio-proxy",
    "pgbouncer",
    "proxysql",
    "varnishd",
    "stunnel",
    "stunnel4",
];

pub(super) fn known_proxy(comm: &str) -> bool {
    KNOWN_PROXIES.contains(&comm)
}

/// One closed socket of a process.
#[derive(Clone, Debug)]
pub(super) struct LegRec {
    /// Increasing in each process's queue: found again by binary search.
    serial: u64,
    skaddr: u64,
    id: ConnId,
    role: Role,
    tuple: Option<Tuple>,
    opened_ns: Option<u64>,
    closed_ns: u64,
    ended: Option<(u64, LegEnd)>,
}

/// One process's closed sockets, oldest first, and how many of them are of each role.
#[derive(Debug, Default)]
struct PidLegs {
    q: VecDeque<LegRec>,
    /// Entries in `q` whose role is client, and server. A process with legs of one role
    /// only (most of them: a client pod's outgoing connections, a server's accepted ones)
    /// has no other leg to find, and the lookup then costs no scan of `q`.
    clients: u32,
    servers: u32,
}

impl PidLegs {
    fn push(&mut self, rec: LegRec) {
        self.count(rec.role, true);
        self.q.push_back(rec);
    }

    fn pop_front(&mut self) -> Option<LegRec> {
        let old = self.q.pop_front()?;
        self.count(old.role, false);
        Some(old)
    }

    fn count(&mut self, role: Role, add: bool) {
        let n = match role {
            Role::Client => &mut self.clients,
            Role::Server => &mut self.servers,
            Role::Unknown => return,
        };
        *n = if add { *n + 1 } else { n.saturating_sub(1) };
    }

    fn has(&self, role: Role) -> bool {
        match role {
            Role::Client => self.clients > 0,
            Role::Server => self.servers > 0,
            Role::Unknown => false,
        }
    }
}

/// A live socket of a process that has begun to end (FIN sent or received) but has not
/// reached CLOSE: a leg whose far end closed stays in CLOSE_WAIT until the proxy closes it,
/// and a leg the proxy only shut down for writing (a half-close passed on) stays in
/// FIN_WAIT2 until the far end closes too. (A closed fd in FIN_WAIT2 reaches CLOSE at
/// once: the kernel hands it to a timewait socket.) Meanwhile the other leg may be judged,
/// and once a new socket takes its address, it is, in the next tick.
#[derive(Clone, Copy, Debug)]
struct Ending {
    skaddr: u64,
    id: ConnId,
    role: Role,
}

#[derive(Debug, Default)]
pub(super) struct Legs {
    by_pid: HashMap<u32, PidLegs>,
    /// Per process, its live sockets that have begun to end, oldest first (bounded like
    /// the closed ones). Entries stay until their socket closes; stale ones (the record
    /// retired or gone) are skipped on lookup and pushed out by newer ones.
    ending: HashMap<u32, VecDeque<Ending>>,
    /// Entries in `ending`, all processes together.
    ending_total: usize,
    /// Where each closed but not yet judged socket's entry is: (owner, serial). Settling it
    /// at judgement was a scan of its owner's queue (a few percent of the agent under churn,
    /// where one process owns every socket).
    unsettled: FastMap<ConnId, (u32, u64)>,
    serial: u64,
}

/// The socket's own ending, from its facts in time order.
pub(super) fn own_end(facts: &[Fact]) -> Option<(u64, LegEnd)> {
    // Judged records are sorted already; only a live record's facts may be out of order
    // (events of several CPUs), and only those are copied.
    if facts.is_sorted_by_key(|f| f.at_ns) {
        return leg_end(facts);
    }
    let mut sorted = facts.to_vec();
    sorted.sort_by_key(|f| f.at_ns);
    leg_end(&sorted)
}

/// What is known about the socket whose other leg is looked for.
struct Leg {
    pid: u32,
    id: ConnId,
    role: Role,
    tuple: Option<Tuple>,
    opened_ns: Option<u64>,
    closed_ns: Option<u64>,
}

/// A candidate for a proxy's other leg: a closed leg, or a live one that has begun to end.
struct Candidate<'a> {
    skaddr: u64,
    id: ConnId,
    tuple: Option<Tuple>,
    /// When it closed, or for a live leg when it began to end.
    at: u64,
    /// A closed leg's entry (its settled ending once judged).
    closed: Option<&'a LegRec>,
}

impl Table {
    /// `sk` began to end (FIN_WAIT1, CLOSE_WAIT, LAST_ACK): remember it under its owner, if
    /// the owner is known, until it closes.
    pub(super) fn note_ending_leg(&mut self, sk: u64) {
        let Some(c) = self.conns.get(&sk) else {
            return;
        };
        if c.closed_ns.is_some() || !matches!(c.role, Role::Client | Role::Server) {
            return;
        }
        let Some((pid, _)) = c.owner() else {
            return;
        };
        let e = Ending {
            skaddr: sk,
            id: c.id,
            role: c.role,
        };
        // Entries leave when their socket closes; stale ones (a record retired or refused
        // before its CLOSE) only leave when pushed out, so the whole map is bounded too.
        if self.legs.ending_total >= MAX_UNSETTLED
            || (self.legs.ending.len() >= MAX_PIDS && !self.legs.ending.contains_key(&pid))
        {
            self.legs.ending.clear();
            self.legs.ending_total = 0;
        }
        let q = self.legs.ending.entry(pid).or_default();
        if q.iter().any(|x| x.skaddr == sk && x.id == e.id) {
            return;
        }
        if q.len() >= MAX_LEGS_PER_PID {
            q.pop_front();
            self.legs.ending_total = self.legs.ending_total.saturating_sub(1);
        }
        q.push_back(e);
        self.legs.ending_total += 1;
    }

    /// The running total of half-closed legs agrees with the per-process queues.
    #[cfg(test)]
    pub(super) fn ending_legs_counted(&self) -> (usize, usize) {
        let sum = self.legs.ending.values().map(VecDeque::len).sum();
        (self.legs.ending_total, sum)
    }

    /// `sk` reached CLOSE: remember it under its owner, if the owner is known.
    pub(super) fn note_closed_leg(&mut self, sk: u64) {
        let Some(c) = self.conns.get(&sk) else {
            return;
        };
        let (Some((pid, _)), Some(closed)) = (c.owner(), c.closed_ns) else {
            return;
        };
        if !matches!(c.role, Role::Client | Role::Server) {
            return;
        }
        let serial = self.legs.serial;
        self.legs.serial += 1;
        if self.legs.unsettled.len() >= MAX_UNSETTLED {
            // Records taken without a judgement would otherwise pile up; losing these only
            // loses late facts of their siblings' other legs.
            self.legs.unsettled.clear();
        }
        self.legs.unsettled.insert(c.id, (pid, serial));
        let rec = LegRec {
            serial,
            skaddr: sk,
            id: c.id,
            role: c.role,
            tuple: c.tuple,
            opened_ns: c.opened_ns,
            closed_ns: closed,
            ended: None,
        };
        if self.legs.by_pid.len() >= MAX_PIDS && !self.legs.by_pid.contains_key(&pid) {
            self.legs.by_pid.clear();
        }
        if let Some(q) = self.legs.ending.get_mut(&pid) {
            let before = q.len();
            q.retain(|e| e.skaddr != sk);
            self.legs.ending_total = self.legs.ending_total.saturating_sub(before - q.len());
            if q.is_empty() {
                self.legs.ending.remove(&pid);
            }
        }
        let p = self.legs.by_pid.entry(pid).or_default();
        p.push(rec);
        while p.q.len() > MAX_LEGS_PER_PID
            || p.q
                .front()
                .is_some_and(|r| closed.saturating_sub(r.closed_ns) > LOG_WINDOW_NS)
        {
            p.pop_front();
        }
    }

    /// At finish: the record's final ending (late facts included), kept for its siblings.
    pub(super) fn settle_leg(&mut self, conn: &Conn, ended: &Option<(u64, LegEnd)>) {
        let Some((pid, serial)) = self.legs.unsettled.remove(&conn.id) else {
            return;
        };
        let Some(q) = self.legs.by_pid.get_mut(&pid).map(|p| &mut p.q) else {
            return;
        };
        if let Ok(i) = q.binary_search_by_key(&serial, |r| r.serial) {
            if let Some(r) = q.get_mut(i).filter(|r| r.skaddr == conn.skaddr) {
                r.ended = ended.clone();
            }
        }
    }

    /// Is the other end of `tuple` a socket of `pid` too (a process talking to itself)?
    fn peer_owned_by(&self, tuple: Option<Tuple>, pid: u32) -> bool {
        let Some(t) = tuple else { return false };
        let want = t.reversed();
        let live = self
            .live_at(want)
            .any(|c| c.owner().is_some_and(|(p, _)| p == pid));
        live || self
            .legs
            .by_pid
            .get(&pid)
            .is_some_and(|p| p.q.iter().any(|r| r.tuple == Some(want)))
    }

    /// The record of a leg that has no verdict yet: still at its address (open or
    /// lingering), or retired and waiting to be judged in this tick.
    fn unjudged(&self, skaddr: u64, id: ConnId, tuple: Option<Tuple>) -> Option<&Conn> {
        if let Some(c) = self.conns.get(&skaddr).filter(|c| c.id == id) {
            return Some(c);
        }
        self.retired_by_tuple
            .get(&tuple?)?
            .iter()
            .filter_map(|&i| self.retired_at(i))
            .find(|c| c.id == id)
    }

    /// The other leg of a proxy socket: a socket of the same process, of the opposite
    /// role, whose life overlapped this one's and that has ended (closed, or begun to end
    /// and still open); the one that closed, or began to end, nearest in time.
    fn other_leg(&self, leg: &Leg) -> Option<OtherLeg> {
        let want = leg.role.opposite();
        let closed = self.legs.by_pid.get(&leg.pid).filter(|p| p.has(want));
        let ending = self.legs.ending.get(&leg.pid);
        if closed.is_none() && ending.is_none_or(|q| !q.iter().any(|e| e.role == want)) {
            return None;
        }
        let reversed = leg.tuple.map(|t| t.reversed());
        let end = leg.closed_ns.unwrap_or(u64::MAX);
        let fits = |id: ConnId, tuple: Option<Tuple>, opened: Option<u64>, at: u64| {
            id != leg.id
                && tuple.is_some()
                && tuple != reversed
                && tuple != leg.tuple
                && opened.is_none_or(|o| o <= end)
                && leg.opened_ns.is_none_or(|o| at >= o)
        };
        let mut candidates: Vec<Candidate> = closed
            .into_iter()
            .flat_map(|p| p.q.iter())
            .filter(|r| r.role == want && fits(r.id, r.tuple, r.opened_ns, r.closed_ns))
            .map(|r| Candidate {
                skaddr: r.skaddr,
                id: r.id,
                tuple: r.tuple,
                at: r.closed_ns,
                closed: Some(r),
            })
            .collect();
        for e in ending.into_iter().flatten().filter(|e| e.role == want) {
            let Some(c) = self
                .conns
                .get(&e.skaddr)
                .filter(|c| c.id == e.id && c.closed_ns.is_none())
            else {
                continue;
            };
            let Some((at, _)) = own_end(&c.facts) else {
                continue;
            };
            if fits(c.id, c.tuple, c.opened_ns, at) {
                candidates.push(Candidate {
                    skaddr: e.skaddr,
                    id: c.id,
                    tuple: c.tuple,
                    at,
                    closed: None,
                });
            }
        }
        let from = end.min(u64::MAX / 2);
        candidates.sort_by_key(|c| c.at.abs_diff(from));
        // The nearest few only: checking a candidate's own peer costs a lookup each.
        let mut near = candidates
            .into_iter()
            .take(MAX_CANDIDATES)
            .filter(|c| !self.peer_owned_by(c.tuple, leg.pid));
        let best = near.next()?;
        let ended = self.candidate_end(&best);
        // Legs are paired by time alone: a second leg about as near with another story
        // (by the proxy / from its far side / not seen) leaves the pairing unproven.
        let story = |e: &Option<(u64, LegEnd)>| e.as_ref().map(|(_, e)| e.is_own());
        let ambiguous = near
            .take_while(|c| c.at.abs_diff(from) <= PAIR_WINDOW_NS)
            .any(|c| story(&self.candidate_end(&c)) != story(&ended));
        Some(OtherLeg {
            id: best.id,
            local: best.tuple.map(|t| t.local()),
            remote: best.tuple.map(|t| t.remote()),
            ended,
            ambiguous,
        })
    }

    /// How a candidate leg ended. Not judged yet (open, lingering, or retired because a new
    /// socket took its address and waiting in this tick's queue, perhaps behind the one
    /// asking): its record is the evidence, and its facts may have grown since it closed.
    fn candidate_end(&self, c: &Candidate) -> Option<(u64, LegEnd)> {
        match self.unjudged(c.skaddr, c.id, c.tuple) {
            Some(r) => own_end(&r.facts),
            None => c.closed.and_then(|r| r.ended.clone()),
        }
    }

    /// The proxy holding this connection's end, if any: this socket's own process, or the
    /// peer socket's (`peer_closed_ns`: when the peer socket closed).
    pub(super) fn proxy_view(
        &self,
        conn: &Conn,
        own_ended: &Option<(u64, LegEnd)>,
        peer: Option<&PeerSummary>,
        peer_closed_ns: Option<u64>,
    ) -> Option<ProxyView> {
        if let Some((pid, comm)) = conn.owner() {
            let leg = Leg {
                pid,
                id: conn.id,
                role: conn.role,
                tuple: conn.tuple,
                opened_ns: conn.opened_ns,
                closed_ns: conn.closed_ns,
            };
            let talks_to_itself = peer.is_some_and(|p| p.pid == Some(pid));
            if !talks_to_itself {
                if let Some(v) = self.view(&leg, &comm, conn.netns, own_ended.clone(), true) {
                    return Some(v);
                }
            }
        }
        let p = peer?;
        let (pid, comm) = (p.pid?, p.comm.as_deref()?);
        let leg = Leg {
            pid,
            id: p.id,
            role: conn.role.opposite(),
            tuple: conn.tuple.map(|t| t.reversed()),
            opened_ns: p.opened_ns,
            closed_ns: peer_closed_ns,
        };
        if conn.owner().is_some_and(|(me, _)| me == pid) {
            return None;
        }
        self.view(&leg, comm, p.netns, p.ended.clone(), false)
    }

    fn view(
        &self,
        leg: &Leg,
        comm: &str,
        netns: Option<u32>,
        ended: Option<(u64, LegEnd)>,
        local: bool,
    ) -> Option<ProxyView> {
        let side = match leg.role {
            Role::Server => ProxyLeg::Downstream,
            Role::Client => ProxyLeg::Upstream,
            Role::Unknown => return None,
        };
        let other = self.other_leg(leg);
        let known_name = known_proxy(comm);
        if other.is_none() && !known_name {
            return None;
        }
        Some(ProxyView {
            local,
            pid: leg.pid,
            comm: comm.to_string(),
            netns,
            leg: side,
            ended,
            other,
            known_name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{LegRec, PidLegs, Role};
    use crate::timeline::ConnId;

    fn rec(serial: u64, role: Role) -> LegRec {
        LegRec {
            serial,
            skaddr: serial,
            id: ConnId(serial),
            role,
            tuple: None,
            opened_ns: None,
            closed_ns: serial,
            ended: None,
        }
    }

    /// After every push and eviction, `has` says exactly whether the queue holds a leg of
    /// that role: a count that fell to zero too early would hide a proxy's other leg.
    #[test]
    fn role_counts_follow_the_queue() {
        let roles = [
            Role::Client,
            Role::Unknown,
            Role::Client,
            Role::Server,
            Role::Client,
            Role::Server,
        ];
        let mut p = PidLegs::default();
        let check = |p: &PidLegs| {
            for role in [Role::Client, Role::Server] {
                let in_queue = p.q.iter().any(|r| r.role == role);
                assert_eq!(p.has(role), in_queue, "{role:?} after {:?}", p.q);
            }
            assert!(!p.has(Role::Unknown));
        };
        for (i, role) in roles.into_iter().enumerate() {
            p.push(rec(i as u64, role));
            check(&p);
        }
        while p.pop_front().is_some() {
            check(&p);
        }
        assert_eq!((p.clients, p.servers), (0, 0));
    }
}
