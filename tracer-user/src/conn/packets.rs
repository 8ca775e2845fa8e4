//! Segment facts from the cgroup_skb hooks: FIN direction, TTL, the first sequence numbers
//! (to pair the two ends of a local connection) and RST segments.

use std::num::NonZeroU64;

use super::{Closed, Table};
use crate::{
    event::{Dir, Event, Packet},
    timeline::FactKind,
};

const MAX_ORPHANS: usize = 65_536;

/// First-segment facts of a socket the table has not met yet.
#[derive(Clone, Debug, Default)]
pub(super) struct Orphan {
    pub ttl_in: Option<u8>,
    pub egress_seq0: Option<u32>,
    pub ingress_seq0: Option<u32>,
    pub cgroup_id: Option<NonZeroU64>,
}

impl Table {
    pub(super) fn on_packet(&mut self, ev: &Event, p: &Packet, out: &mut Vec<Closed>) {
        let sk = ev.skaddr;
        let Some(t) = ev.tuple else { return };
        if !p.syn() && !p.fin() && !p.rst() && !self.conns.contains_key(&sk) {
            // A segment of an open socket the table has not met: a connection older than
            // the agent (a new one's opening event comes first in the ring buffer), or one
            // whose opening was lost. Met mid-life now, so that `conns` lists it while it
            // lives rather than from its first state change. Control segments are not
            // taken: a socket's last RST can follow its CLOSE, and opening a record for a
            // socket already judged would print a second verdict for it. Data and ACKs
            // cannot: the kernel side reports none from a socket in CLOSE.
            self.ensure(ev, out);
        }
        let tracked = self
            .conns
            .get(&sk)
            .is_some_and(|c| c.tuple.is_none_or(|ct| !ct.is_complete() || ct == t));
        if p.rst() && p.dir == Dir::Egress {
            self.log_sent_rst(ev.ts_ns, t, p.seq, tracked);
        }
        if !tracked {
            self.keep_orphan(sk, p);
            return;
        }
        let Some(c) = self.conns.get_mut(&sk) else {
            return;
        };
        // A SYN takes one sequence number: count from the first byte after it, as the
        // other end's first non-SYN segment does (so the two ends' values are equal, which
        // joins them even through address translation).
        let seq = if p.syn() {
            p.seq.wrapping_add(1)
        } else {
            p.seq
        };
        if let Some(t) = p.last_data_ns.and_then(NonZeroU64::new) {
            c.last_data_ns = Some(c.last_data_ns.map_or(t, |x| x.max(t)));
        }
        if c.cgroup_id.is_none() {
            c.cgroup_id = NonZeroU64::new(p.cgroup_id);
        }
        if p.has_state {
            c.marks |= super::record::mark::HAS_STATE;
        }
        let had_both = c.egress_seq0.is_some() && c.ingress_seq0.is_some();
        match p.dir {
            Dir::Egress => {
                c.egress_seq0.get_or_insert(seq);
                if p.fin() && !c.has(|k| matches!(k, FactKind::FinSent)) {
                    c.push(ev.ts_ns, FactKind::FinSent);
                }
                if p.rst() {
                    super::rst::mark_rst_sent(c, ev.ts_ns, false, None);
                }
            }
            Dir::Ingress => {
                c.ingress_seq0.get_or_insert(seq);
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
                    super::rst::rst_segment_received(c, ev.ts_ns, p);
                }
            }
        }
        if !had_both {
            if let (Some(e), Some(i)) = (c.egress_seq0, c.ingress_seq0) {
                self.live_seq.insert((e, i), sk);
            }
        }
    }

    /// Listener traffic (handshakes) or a socket we have not met yet: keep the first-segment
    /// facts until its first lifecycle event arrives.
    fn keep_orphan(&mut self, sk: u64, p: &Packet) {
        if self.listeners.contains(&sk) || p.syn() || sk == 0 {
            return;
        }
        if self.orphans.len() >= MAX_ORPHANS {
            self.orphans.clear();
        }
        let o = self.orphans.entry(sk).or_default();
        if o.cgroup_id.is_none() {
            o.cgroup_id = NonZeroU64::new(p.cgroup_id);
        }
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
    }
}
