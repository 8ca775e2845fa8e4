//! Rechecking the table against the kernel after events were lost.
//!
//! A record whose CLOSE (and the DESTROY behind it) was lost stays open until another
//! socket takes its address. Until then `conns` lists a connection that no longer exists,
//! its ending is never judged, and it holds a place in the table. Measured: after a
//! connect/close flood through a 4 KiB ring buffer, 100 of 556 listed connections were in
//! states no socket of that port had any more, and 125 records were still open when the
//! agent stopped.
//!
//! A recheck is a new walk over the kernel's TCP sockets ([`crate::existing`]). Every
//! record that existed before the walk started, is still open, belongs to a network
//! namespace that was walked to its end, and was not listed, belongs to a socket that is
//! gone: it is retired as an end that was not seen (`ends_unseen`, judged with its
//! confidence lowered, see [`Table::retire`]). A socket the walk lists that the table did
//! not know (its opening was lost) is taken up as `preexisting`, marked as having lost
//! events (its verdict's confidence is lowered); so is one
//! listed at the address of a record with other addresses, whose record is retired the
//! same way (the allocator gave a gone socket's address to a new one, and both the old
//! one's end and the new one's start were lost: in the measurement above, all 200 of the
//! stale records sat at the addresses of live sockets). A listed record that no event
//! touched since the walk began and whose state is not the kernel's missed a state change:
//! it takes the kernel's state and is marked as having lost events. The
//! walk's records pass through the ring buffer like any other: if events were lost while
//! it ran, a listing may be among them, and the recheck retires nothing.
//!
//! A namespace the agent cannot enter (the least-privilege DaemonSet has no `setns`, so
//! every pod's namespace) is not walked that way. A second walk covers them all at once:
//! the kernel's iterator over the packet hooks' socket storage lists every socket that
//! holds that state, in every namespace, with the same `EXISTING` records. The kernel frees
//! a socket's storage only with the socket, so a record whose packets said its socket held
//! state ([`super::record::mark::HAS_STATE`]), that no event touched since the walk began
//! (its state was then made before the walk started), and that this walk did not list,
//! belongs to a socket that is gone. A record without that mark (a socket that never
//! passed a segment since the agent attached, or one the kernel refused storage) is kept.

use super::{Closed, Table};

/// A walk in progress.
#[derive(Debug, Default)]
pub(super) struct Recheck {
    /// CLOCK_MONOTONIC before the walk started: only records first seen before it are
    /// checked (a socket opened during the walk may be behind the walk's position).
    started_ns: u64,
    /// Sockets the walk listed: a vector, sorted at the end, 8 bytes a socket (a hash set
    /// would take about twice that; the record has no spare byte for a mark, and its size
    /// is bench-live's budget).
    listed: Vec<u64>,
}

impl Recheck {
    pub(super) fn started_ns(&self) -> u64 {
        self.started_ns
    }

    pub(super) fn listed(&mut self, skaddr: u64) {
        self.listed.push(skaddr);
    }
}

impl Table {
    /// A walk over the live sockets starts at `now_ns`: the `EXISTING` records that follow,
    /// up to [`Table::recheck_end`], are its listing.
    pub fn recheck_start(&mut self, now_ns: u64) {
        self.recheck = Some(Recheck {
            started_ns: now_ns,
            listed: Vec::new(),
        });
    }

    /// The walk started by [`Table::recheck_start`] has ended and its records are read.
    /// `walked`: the network namespaces (inode numbers) walked to their end; `stored`: the
    /// walk over the sockets holding packet state (every namespace) was read to its end;
    /// `complete`: no kernel event was lost while they ran. Retires the records of sockets
    /// the walks should have listed and did not; returns how many, and the verdicts that
    /// could not wait for the next tick ([`Table::retire`]).
    pub fn recheck_end(
        &mut self,
        walked: &[u64],
        stored: bool,
        complete: bool,
    ) -> (u64, Vec<Closed>) {
        let Some(mut r) = self.recheck.take() else {
            return (0, Vec::new());
        };
        self.stats.rechecks += 1;
        if !complete {
            return (0, Vec::new());
        }
        r.listed.sort_unstable();
        let gone: Vec<u64> = self
            .conns
            .iter()
            .filter(|(sk, c)| {
                let walked_ns = c.netns.is_some_and(|n| walked.contains(&u64::from(n)));
                let had_state = stored
                    && c.marks & super::record::mark::HAS_STATE != 0
                    && c.last_ns < r.started_ns;
                c.closed_ns.is_none()
                    && c.first_ns < r.started_ns
                    && (walked_ns || had_state)
                    && r.listed.binary_search(sk).is_err()
            })
            .map(|(sk, _)| *sk)
            .collect();
        let n = gone.len() as u64;
        self.stats.ends_found_gone += n;
        let out = gone.into_iter().filter_map(|sk| self.retire(sk)).collect();
        (n, out)
    }
}
