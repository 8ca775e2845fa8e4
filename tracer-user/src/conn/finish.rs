//! Finishing: a closed socket lingers for late evidence, then the cross-socket facts are
//! resolved (peer, RST origins) and the classifier gives its verdict.

use super::{
    Closed, Conn, Table,
    h2::{H2State, H2Track},
};
use crate::{
    classify,
    timeline::{H2Summary, Timeline},
};

use std::cmp::Reverse;

impl Table {
    /// Connections whose linger period is over at `now_ns` (CLOCK_MONOTONIC), after every
    /// record retired since the last call (address reuse).
    pub fn take_due(&mut self, now_ns: u64) -> Vec<Closed> {
        let linger = self.cfg.linger_ns;
        // Retired records first: they closed (or were last seen) before anything that
        // lingers now at their address, and their peers may look them up.
        // One at a time: the ones still waiting stay visible to the peer lookup.
        self.index_retired();
        let mut out: Vec<Closed> = Vec::with_capacity(self.retired.len());
        for i in 0..self.retired.len() {
            if let Some(c) = self.retired.get_mut(i).and_then(Option::take) {
                out.push(self.judge(c));
            }
        }
        self.retired.clear();
        self.retired_by_tuple.clear();
        self.retired_by_seq.clear();
        // Oldest first: a socket's verdict may rest on its peer's resolved record (which RST
        // reached it, from whom), and the peer that closed first is resolved first. The
        // queue holds only closed records, so a tick costs nothing per open connection (a
        // scan of every record at each tick was 3 % of a core with 100,000 idle sockets).
        let mut due = Vec::new();
        while let Some(&Reverse((t, sk))) = self.due.peek() {
            if t.saturating_add(linger) > now_ns {
                break;
            }
            self.due.pop();
            // Stale when the record at `sk` was retired, or replaced by another socket's
            // since it was scheduled: only the record that closed at `t` is due.
            if self.conns.get(&sk).is_some_and(|c| c.closed_ns == Some(t)) {
                due.push(sk);
            }
        }
        // A verdict is large: room for all at once rather than growing (and copying) twice.
        out.reserve(due.len());
        for sk in due {
            if let Some(c) = self.take(sk) {
                out.push(self.judge(c));
            }
        }
        // Retired records first, then the due ones oldest first: often out of order (a
        // retired record closed after some due ones). A verdict is large, so the order is
        // sorted as indices and each verdict moved once (sorting the verdicts themselves
        // was a few percent of `replay` in memmove).
        if out.is_sorted_by_key(|c| c.conn.closed_ns) {
            return out;
        }
        let mut order: Vec<usize> = (0..out.len()).collect();
        order.sort_by_key(|&i| out[i].conn.closed_ns);
        let mut slots: Vec<Option<Closed>> = out.into_iter().map(Some).collect();
        // Sized up front: collected from `filter_map`, the vector grew from nothing by
        // reallocation, copying the verdicts again (`perf` of a live agent under churn).
        let mut sorted = Vec::with_capacity(slots.len());
        sorted.extend(
            order
                .into_iter()
                .filter_map(|i| slots.get_mut(i).and_then(Option::take)),
        );
        sorted
    }

    /// Queues the record at `sk`, closed at `closed_ns`, for its verdict after the linger.
    pub(super) fn schedule(&mut self, closed_ns: u64, sk: u64) {
        self.due.push(Reverse((closed_ns, sk)));
    }

    /// Every connection that has closed, whatever its linger (shutdown flush).
    pub fn take_all_closed(&mut self) -> Vec<Closed> {
        self.take_due(u64::MAX)
    }

    /// Removes `sk`'s record from the live table and its tuple index.
    fn take(&mut self, sk: u64) -> Option<Conn> {
        let conn = self.conns.remove(&sk)?;
        if let Some(t) = conn.tuple {
            self.unindex(sk, t);
        }
        Some(*conn)
    }

    /// The record at `sk` belongs to a socket that is gone: another socket now has its
    /// address. It is judged at the next [`Self::take_due`] (after the drop total is read).
    /// If its CLOSE was never seen, its end was lost and its verdict says so. Returns a
    /// verdict at once only when more retired records wait than the table may hold; that
    /// one is marked as having lost events, since whether it did is not yet known.
    pub(super) fn retire(&mut self, sk: u64) -> Option<Closed> {
        let mut conn = self.take(sk)?;
        if conn.closed_ns.is_none() {
            conn.gap = true;
            conn.closed_ns = Some(conn.last_ns.max(conn.first_ns));
            self.stats.ends_unseen += 1;
        }
        self.retired.push(Some(conn));
        if self.retired.len() <= self.cfg.max_conns {
            return None;
        }
        // Rare (more retired than the table holds between two ticks): judge the oldest now,
        // without the index of the others.
        let mut oldest = self.retired.iter_mut().find_map(Option::take)?;
        self.retired.retain(Option::is_some);
        oldest.gap = true;
        Some(self.judge(oldest))
    }

    /// Indexes the waiting retired records for the peer lookup.
    fn index_retired(&mut self) {
        self.retired_by_tuple.clear();
        self.retired_by_seq.clear();
        for (i, c) in self.retired.iter().enumerate() {
            let Some(c) = c else { continue };
            if let Some(t) = c.tuple {
                self.retired_by_tuple.entry(t).or_default().push(i);
            }
            if let (Some(e), Some(g)) = (c.egress_seq0, c.ingress_seq0) {
                self.retired_by_seq.insert((e, g), i);
            }
        }
    }

    /// A retired record still waiting at position `i`.
    pub(super) fn retired_at(&self, i: usize) -> Option<&Conn> {
        self.retired.get(i)?.as_ref()
    }

    /// Resolves cross-socket evidence for a record out of the table and classifies it.
    fn judge(&mut self, mut conn: Conn) -> Closed {
        let found = self.find_peer(&conn);
        let peer_closed_ns = found.as_ref().and_then(|(_, c)| *c);
        let peer = found.map(|(mut s, closed)| {
            s.translated = match (s.tuple, conn.tuple) {
                (Some(p), Some(me)) => p != me.reversed(),
                _ => false,
            };
            s.closed_first = match (closed, conn.closed_ns) {
                (Some(p), Some(me)) => p <= me,
                _ => false,
            };
            s
        });
        self.resolve_received_rsts(&mut conn, peer.as_ref());
        conn.facts.sort_by_key(|f| f.at_ns);
        let own_ended = classify::leg_end(&conn.facts);
        let proxy = self.proxy_view(&conn, &own_ended, peer.as_ref(), peer_closed_ns);
        let until = conn
            .closed_ns
            .map_or(u64::MAX, |c| c.saturating_add(self.cfg.linger_ns));
        let events_lost = self.events_lost(&conn, until);
        // The facts move into the timeline and back: no copy of every fact (and its process
        // name) per verdict.
        let timeline = Timeline {
            role: conn.role,
            role_inferred: conn.role_inferred,
            facts: std::mem::take(&mut conn.facts),
            peer: peer.clone(),
            ttl_baseline: conn.ttl_baseline,
            h2: match (&conn.h2, conn.h2_opaque) {
                (Some(t), _) => Some(h2_summary(t)),
                (None, Some(_)) => Some(opaque_summary(conn.h2_start())),
                (None, None) => None,
            },
            tls: conn.h2_state() == Some(H2State::Tls),
            events_lost,
            proxy,
            last_data_ns: conn.last_data_ns.map(|t| t.get()),
        };
        let verdict = classify::classify(&timeline);
        conn.facts = timeline.facts;
        self.settle_leg(&conn, &own_ended);
        self.remember(&conn);
        self.stats.conns_closed += 1;
        self.stats.facts_dropped += u64::from(conn.facts_dropped);
        let owner = conn.owner();
        Closed {
            conn,
            verdict,
            peer,
            owner,
        }
    }
}

/// What [`h2_summary`] gives for a tracker that only holds a state (TLS, not HTTP/2) and
/// started at `start`: nothing but its idle time (equal: `opaque_summary_is_a_blank_trackers`).
fn opaque_summary(start: u64) -> H2Summary {
    H2Summary {
        idle_since_ns: Some(start),
        ..H2Summary::default()
    }
}

/// The classifier's view of the HTTP/2 state.
fn h2_summary(t: &H2Track) -> H2Summary {
    H2Summary {
        synced: t.state == H2State::Synced,
        goaways: t.goaways.clone(),
        ping_interval_sent_ns: t.ping_sent.median_interval_ns(),
        ping_interval_received_ns: t.ping_received.median_interval_ns(),
        unanswered_sent_since: t.ping_sent.oldest_unanswered_ns(),
        unanswered_received_since: t.ping_received.oldest_unanswered_ns(),
        last_received_ns: t.last_received_ns,
        answered_sent_at: t.ping_sent.last_answered_ns,
        answered_received_at: t.ping_received.last_answered_ns,
        idle_since_ns: t.idle_since_ns,
        open_streams: t.open_streams(),
        max_open_streams: t.max_open_streams,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_summary_is_a_blank_trackers() {
        for state in [H2State::Tls, H2State::NotH2] {
            let t = H2Track::in_state(12_345, state);
            assert_eq!(h2_summary(&t), opaque_summary(12_345));
        }
    }
}
