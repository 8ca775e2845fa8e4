//! HTTP/2 events of sockets the table has not met yet.
//!
//! The table meets a socket through its lifecycle events. A connection that was open before
//! the agent started has none until it ends, yet the kernel walks its frames as soon as its
//! segments pass (resynchronising mid-stream): a GOAWAY it receives then is the evidence its
//! verdict needs. Such events wait here, per socket, and are applied, in order, when the
//! socket is met. A socket that carries more than a few of them before any lifecycle event
//! is met at once, mid-life: it has clearly been open a while (a new connection's opening
//! event precedes its payload in the ring buffer, which keeps the order of reservation).
//! Waiting rather than meeting every such socket at its first event keeps a late event of
//! a socket already judged and removed (possible when the agent runs behind) from opening
//! a record for a dead socket.

use super::{Closed, Table, h2::H2State};
use crate::{
    event::{Event, EventKind},
    timeline::FactKind,
};

/// Events kept per socket before it is met mid-life instead.
pub(super) const EARLY_H2_EVENTS: usize = 8;
/// Sockets with waiting events (an event is 152 bytes, plus at most 64 captured payload
/// bytes of a control frame: at most about 7 MiB in all). Past it, a further socket is met
/// mid-life at its first event: nothing is lost.
pub(super) const MAX_EARLY_SOCKETS: usize = 4_096;

impl Table {
    /// An HTTP/2 note or frame.
    pub(super) fn on_h2(&mut self, ev: &Event, out: &mut Vec<Closed>) {
        let sk = ev.skaddr;
        if !self.conns.contains_key(&sk) {
            if sk == 0 || self.listeners.contains(&sk) || self.refused.contains(&sk) {
                return;
            }
            let waiting = self.early_h2.get(&sk).map_or(0, Vec::len);
            let room = waiting > 0 || self.early_h2.len() < MAX_EARLY_SOCKETS;
            if waiting < EARLY_H2_EVENTS && room {
                self.early_h2.entry(sk).or_default().push(ev.clone());
                return;
            }
            // Met mid-life: `open` applies the waiting events first.
            if !self.ensure(ev, out) {
                self.early_h2.remove(&sk);
                return;
            }
        }
        self.apply_h2(ev);
    }

    /// Applies the events that waited for socket `sk`, just met (its record exists). A new
    /// connection (`since` its opening event's time) takes only events from after its
    /// opening: earlier ones belong to an untracked socket that had the same address.
    pub(super) fn apply_early_h2(&mut self, sk: u64, since: Option<u64>) {
        let Some(waiting) = self.early_h2.remove(&sk) else {
            return;
        };
        for ev in waiting {
            if since.is_none_or(|t| ev.ts_ns >= t) {
                self.apply_h2(&ev);
            }
        }
    }

    fn apply_h2(&mut self, ev: &Event) {
        let Some(c) = self.conns.get_mut(&ev.skaddr) else {
            return;
        };
        match ev.kind {
            EventKind::H2Proto { note, .. } => c.on_h2_note(note),
            EventKind::H2Frame {
                dir,
                ref head,
                ref payload,
                ..
            } => {
                let track = c.h2_mut();
                if track.state == H2State::Unsynced && track.frames == 0 {
                    // Frames only come from a synced walker.
                    track.state = H2State::Synced;
                }
                if let Some(g) = track.on_frame(ev.ts_ns, dir, head, payload).cloned() {
                    c.push(ev.ts_ns, FactKind::GoAway(Box::new(g)));
                }
            }
            _ => {}
        }
    }
}
