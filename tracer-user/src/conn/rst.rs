//! RST provenance: every RST that left a socket on this host (or the kernel's no-socket
//! reply) is logged, so that a received RST can be traced to the peer socket, the peer's
//! kernel, or to nobody on this host (forged in between). Without packet facts, only the
//! peer's own record can prove it sent one.

use super::{Conn, LOG_WINDOW_NS, MAX_LOG, Table};
use crate::{
    event::{Event, Packet, Tuple},
    timeline::{Fact, FactKind, PeerSummary, RstOrigin},
};

/// How far apart a sent and a received RST may be and still be the same one.
const MATCH_AFTER_NS: u64 = 1_000_000;
const MATCH_BEFORE_NS: u64 = 1_000_000_000;
const MAX_PENDING_REASONS: usize = 1024;

/// A RST that left some socket on this host (or the kernel's no-socket reply).
#[derive(Clone, Debug)]
pub(super) struct SentRst {
    at_ns: u64,
    /// From the sender's point of view.
    tuple: Tuple,
    seq: u32,
    from_conn: bool,
    /// The sending kernel's `sk_rst_reason`, when this host's kernel reported it.
    reason: Option<String>,
}

impl Table {
    fn rst_reason(&self, r: Option<u32>) -> Option<String> {
        let r = r?;
        Some(
            self.cfg
                .rst_reason_names
                .get(&r)
                .cloned()
                .unwrap_or_else(|| format!("reason_{r}")),
        )
    }

    /// `tcp_send_reset`: a socket's own RST, or (no socket) the kernel's reply whose
    /// segment follows.
    pub(super) fn on_send_reset(&mut self, ev: &Event, reason: Option<u32>) {
        let name = self.rst_reason(reason);
        if ev.skaddr != 0 {
            if let Some(c) = self.conns.get_mut(&ev.skaddr) {
                mark_rst_sent(c, ev.ts_ns, ev.exiting, name);
            }
        } else if let (Some(t), Some(name)) = (ev.tuple, name) {
            if self.pending_reasons.len() >= MAX_PENDING_REASONS {
                self.pending_reasons.clear();
            }
            self.pending_reasons.insert(t, name);
        }
    }

    /// `tcp_receive_reset`: the socket accepted a RST (its segment may follow).
    pub(super) fn on_recv_reset(&mut self, ev: &Event) {
        if let Some(c) = self.conns.get_mut(&ev.skaddr) {
            if !c.has(|k| matches!(k, FactKind::RstReceived { .. })) {
                if let Some(i) = c.push(ev.ts_ns, untraced_rst(0)) {
                    c.rst_in.push((i, None));
                }
            }
        }
    }

    /// An egress RST segment; `from_conn`: it belongs to a tracked socket.
    pub(super) fn log_sent_rst(&mut self, at_ns: u64, tuple: Tuple, seq: u32, from_conn: bool) {
        let reason = if from_conn {
            None
        } else {
            self.pending_reasons.remove(&tuple)
        };
        self.rst_log.push_back(SentRst {
            at_ns,
            tuple,
            seq,
            from_conn,
            reason,
        });
        while let Some(oldest) = self.rst_log.front() {
            let expired = at_ns.saturating_sub(oldest.at_ns) > LOG_WINDOW_NS;
            if !expired && self.rst_log.len() <= MAX_LOG {
                break;
            }
            if !expired {
                // Pushed out by the cap while a RST received around then could still match
                // it (a scan against closed ports makes the kernel send RST after RST):
                // counted, and remembered so that its absence proves nothing.
                self.stats.rst_log_evictions += 1;
                self.rst_log_evicted_ns = Some(oldest.at_ns);
            }
            self.rst_log.pop_front();
        }
    }

    /// Where a received RST came from, looked up in the log of sent RSTs.
    fn rst_origin_logged(
        &self,
        tuple: Option<Tuple>,
        seq: Option<u32>,
        at_ns: u64,
        peer: Option<&PeerSummary>,
    ) -> (RstOrigin, Option<String>) {
        // The sender's own view of the connection: the peer's addresses when it is known
        // (they differ from ours reversed through NAT), else ours reversed.
        let sender = peer
            .and_then(|p| p.tuple)
            .filter(|t| t.is_complete())
            .or(tuple.map(|t| t.reversed()));
        if let Some(sender) = sender {
            let sent = self.rst_log.iter().rev().find(|r| {
                r.tuple == sender
                    && r.at_ns <= at_ns.saturating_add(MATCH_AFTER_NS)
                    && match seq {
                        Some(s) => r.seq == s,
                        None => at_ns.saturating_sub(r.at_ns) < MATCH_BEFORE_NS,
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
        // Not in the log: the peer's own record may still show it reset the connection then.
        if origin_without_packets(peer, at_ns) == RstOrigin::PeerSocket {
            return (RstOrigin::PeerSocket, None);
        }
        // "Not sent by the peer" is proven by absence only while the log still holds every
        // RST sent around then; after evictions by the cap it is just unknown.
        let log_complete = self
            .rst_log_evicted_ns
            .is_none_or(|e| e.saturating_add(LOG_WINDOW_NS) < at_ns);
        if peer.is_some() && log_complete {
            (RstOrigin::NotSentByPeer, None)
        } else {
            (RstOrigin::Untraced, None)
        }
    }

    /// Fills in the origin of every RST `conn` received.
    pub(super) fn resolve_received_rsts(&self, conn: &mut Conn, peer: Option<&PeerSummary>) {
        for (i, seq) in conn.rst_in.clone() {
            let at = conn.facts.get(i).map(|f| f.at_ns).unwrap_or(0);
            let (origin, reason) = if self.cfg.packet_facts {
                self.rst_origin_logged(conn.tuple, seq, at, peer)
            } else {
                (origin_without_packets(peer, at), None)
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
    }
}

/// Without segments the peer's RST cannot be looked up, so its absence proves nothing:
/// the peer sent it only if its own record says it reset the connection around then.
fn origin_without_packets(peer: Option<&PeerSummary>, at_ns: u64) -> RstOrigin {
    match peer.and_then(|p| p.reset_at_ns) {
        Some(t)
            if t <= at_ns.saturating_add(MATCH_AFTER_NS)
                && at_ns.saturating_sub(t) < MATCH_BEFORE_NS =>
        {
            RstOrigin::PeerSocket
        }
        _ => RstOrigin::Untraced,
    }
}

fn untraced_rst(ttl: u8) -> FactKind {
    FactKind::RstReceived {
        ttl,
        origin: RstOrigin::Untraced,
        sender_reason: None,
    }
}

/// An ingress RST segment; the reset tracepoint may have recorded it already, without
/// the segment.
pub(super) fn rst_segment_received(c: &mut Conn, at_ns: u64, p: &Packet) {
    let none_yet = c.rst_in.is_empty();
    match c.rst_in.iter_mut().find(|(_, s)| s.is_none()) {
        Some((i, s)) => {
            *s = Some(p.seq);
            let i = *i;
            if let Some(f) = c.facts.get_mut(i) {
                f.kind = untraced_rst(p.ttl);
            }
        }
        None if none_yet => {
            if let Some(i) = c.push(at_ns, untraced_rst(p.ttl)) {
                c.rst_in.push((i, Some(p.seq)));
            }
        }
        None => {}
    }
}

/// Records the first RST this socket sent; the segment and the tracepoint each add what
/// they know (the tracepoint: the owner's state and the kernel's reason).
pub(super) fn mark_rst_sent(c: &mut Conn, at_ns: u64, exiting: bool, reason: Option<String>) {
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
