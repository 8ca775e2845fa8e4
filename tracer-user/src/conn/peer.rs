//! Peer matching: the other end of a connection when it is a socket on this host too,
//! live or recently finished. The reversed tuple must match and the sequence spaces line
//! up; without sequence numbers only an unambiguous candidate counts.

use super::{Conn, LOG_WINDOW_NS, MAX_LOG, Table};
use crate::{event::Tuple, timeline::PeerSummary};

/// Two sockets are each other's peer when their sequence spaces line up within this.
const SEQ_WINDOW: u32 = 1 << 24;

/// What remains of a finished connection, for its peer's verdict.
#[derive(Clone, Debug)]
pub(super) struct Recent {
    serial: u64,
    at_ns: u64,
    tuple: Tuple,
    egress_seq0: Option<u32>,
    ingress_seq0: Option<u32>,
    summary: PeerSummary,
    closed_ns: Option<u64>,
}

fn seq_near(a: u32, b: u32) -> bool {
    a.wrapping_sub(b) < SEQ_WINDOW || b.wrapping_sub(a) < SEQ_WINDOW
}

/// `Some(true)`: the sequence spaces of `conn` and a candidate with these first sequence
/// numbers line up; `Some(false)`: they cannot be peers; `None`: nothing to compare.
fn compatible(conn: &Conn, eg: Option<u32>, ing: Option<u32>) -> Option<bool> {
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
}

impl Table {
    /// The peer of `conn` and when it closed, if it is on this host.
    pub(super) fn find_peer(&self, conn: &Conn) -> Option<(PeerSummary, Option<u64>)> {
        let t = conn.tuple?;
        if !t.is_complete() {
            return None;
        }
        let want = t.reversed();
        let mut unsure: Vec<(PeerSummary, Option<u64>)> = Vec::new();
        // Live records, and records retired (address reused) but not judged yet: in one
        // take_due the two ends of a connection can both be retired, in either order.
        let live = self.live_at(want);
        let retired = self
            .retired_by_tuple
            .get(&want)
            .into_iter()
            .flatten()
            .filter_map(|&i| self.retired_at(i));
        for p in live.chain(retired) {
            if p.skaddr == conn.skaddr {
                continue;
            }
            match compatible(conn, p.egress_seq0, p.ingress_seq0) {
                Some(true) => return Some((self.live_summary(p, conn), p.closed_ns)),
                Some(false) => {}
                None => unsure.push((self.live_summary(p, conn), p.closed_ns)),
            }
        }
        let serials = self.recent_by_tuple.get(&want).into_iter().flatten().rev();
        for r in serials.filter_map(|&serial| self.recent_at(serial)) {
            match compatible(conn, r.egress_seq0, r.ingress_seq0) {
                Some(true) => return Some((r.summary.clone(), r.closed_ns)),
                Some(false) => {}
                None => unsure.push((r.summary.clone(), r.closed_ns)),
            }
        }
        // Without sequence numbers only an unambiguous match counts.
        if unsure.len() == 1 {
            return unsure.pop();
        }
        if !unsure.is_empty() {
            return None;
        }
        self.find_peer_by_seq(conn)
    }

    /// The peer through address translation (DNAT to a Service VIP, SNAT, a NAT router on
    /// this host): the socket whose first sequence numbers are this one's, crossed.
    fn find_peer_by_seq(&self, conn: &Conn) -> Option<(PeerSummary, Option<u64>)> {
        let key = (conn.ingress_seq0?, conn.egress_seq0?);
        if let Some(p) = self.live_seq.get(&key).and_then(|sk| self.conns.get(sk)) {
            if p.skaddr != conn.skaddr
                && (p.egress_seq0, p.ingress_seq0) == (Some(key.0), Some(key.1))
            {
                return Some((self.live_summary(p, conn), p.closed_ns));
            }
        }
        if let Some(p) = self
            .retired_by_seq
            .get(&key)
            .and_then(|&i| self.retired_at(i))
            .filter(|p| {
                p.skaddr != conn.skaddr
                    && (p.egress_seq0, p.ingress_seq0) == (Some(key.0), Some(key.1))
            })
        {
            return Some((self.live_summary(p, conn), p.closed_ns));
        }
        let r = self.recent_at(*self.recent_seq.get(&key)?)?;
        (r.summary.id != conn.id).then(|| (r.summary.clone(), r.closed_ns))
    }

    /// The entry of the recent log with this serial, if still there.
    fn recent_at(&self, serial: u64) -> Option<&Recent> {
        let front = self.recent.front()?.serial;
        let r = self
            .recent
            .get(usize::try_from(serial.checked_sub(front)?).ok()?)?;
        (r.serial == serial).then_some(r)
    }

    /// The summary of a peer still in the table (lingering, or finished out of turn because
    /// its address was reused): its received RSTs resolved the way its own finish will
    /// resolve them, so that what it inherits (a middlebox reset) is already known.
    fn live_summary(&self, p: &Conn, conn: &Conn) -> PeerSummary {
        if p.rst_in.is_empty() {
            return p.summary();
        }
        let mut resolved = p.clone();
        let me = conn.summary();
        self.resolve_received_rsts(&mut resolved, Some(&me));
        resolved.summary()
    }

    /// Keeps what the peer of a finished connection will need.
    pub(super) fn remember(&mut self, conn: &Conn) {
        if let (Some(e), Some(i)) = (conn.egress_seq0, conn.ingress_seq0) {
            if self.live_seq.get(&(e, i)) == Some(&conn.skaddr) {
                self.live_seq.remove(&(e, i));
            }
        }
        let Some(t) = conn.tuple else { return };
        let at = conn.closed_ns.unwrap_or(conn.first_ns);
        let serial = self.recent_serial;
        self.recent_serial += 1;
        if let (Some(e), Some(i)) = (conn.egress_seq0, conn.ingress_seq0) {
            self.recent_seq.insert((e, i), serial);
        }
        self.recent_by_tuple.entry(t).or_default().push(serial);
        self.recent.push_back(Recent {
            serial,
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
            if let Some(r) = self.recent.pop_front() {
                if let (Some(e), Some(i)) = (r.egress_seq0, r.ingress_seq0) {
                    if self.recent_seq.get(&(e, i)) == Some(&r.serial) {
                        self.recent_seq.remove(&(e, i));
                    }
                }
                // The oldest entry of the log is the oldest of its tuple too.
                if let Some(q) = self.recent_by_tuple.get_mut(&r.tuple) {
                    if q.first() == Some(&r.serial) {
                        q.remove(0);
                    }
                    if q.is_empty() {
                        self.recent_by_tuple.remove(&r.tuple);
                    }
                }
            }
        }
    }
}
