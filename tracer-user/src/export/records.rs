//! The records other than `close`: `ready` (once, after the probes attached), `drops`
//! (when events or evidence were lost) and `stats` (once, on exit). Field order is the
//! order of the JSON output.

use serde::Serialize;

use super::SCHEMA_VERSION;
use crate::{
    conn::TableStats,
    probes::{CounterSnapshot, ProbeMode, ProbeReport},
};

/// `{"type":"ready"}`: tracing has started, with what the probes could attach.
#[derive(Debug, Serialize)]
pub struct Ready<'a> {
    v: u32,
    #[serde(rename = "type")]
    kind: &'static str,
    ts: String,
    probe_mode: ProbeMode,
    packet_facts: bool,
    h2_frames: bool,
    existing_sockets: bool,
    netns_ids: bool,
    exit_detection: bool,
    kernel: &'a str,
}

impl<'a> Ready<'a> {
    pub fn new(ts: String, report: &'a ProbeReport) -> Self {
        Ready {
            v: SCHEMA_VERSION,
            kind: "ready",
            ts,
            probe_mode: report.probe_mode,
            packet_facts: report.packet_facts,
            h2_frames: report.h2_frames,
            existing_sockets: report.existing_sockets,
            netns_ids: report.netns_ids,
            exit_detection: report.exit_detection,
            kernel: &report.kernel,
        }
    }
}

/// `{"type":"drops"}`: evidence lost since the last report (checked every second): kernel
/// events to a full ring buffer, and what the agent's table had to give up.
#[derive(Debug, Serialize)]
pub struct Drops<'a> {
    v: u32,
    #[serde(rename = "type")]
    kind: &'static str,
    ts: String,
    ringbuf_drops: u64,
    ringbuf_drops_total: u64,
    per_cpu: &'a [u64],
    /// Totals so far of the other losses.
    losses: Losses,
    /// The same, since the previous report.
    losses_new: Losses,
}

/// Losses other than ring-buffer drops, each a count that only grows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Losses {
    /// Connections refused by a full table (`--max-conns`).
    pub conns_dropped: u64,
    /// Sockets whose CLOSE never arrived before their address was reused.
    pub ends_unseen: u64,
    /// Facts over the per-connection cap.
    pub facts_dropped: u64,
    /// Sent RSTs pushed out of the provenance log while still recent.
    pub rst_log_evictions: u64,
    /// Per-socket packet states the kernel could not insert.
    pub skmap_fails: u64,
    /// Tracepoint records the kernel side could not read (each an event lost).
    pub read_errors: u64,
    /// Runs of the tracing programs the kernel skipped because another BPF program was
    /// running on that CPU (each an event lost).
    pub runs_skipped: u64,
}

impl Losses {
    pub fn of(table: &TableStats, kernel: &CounterSnapshot) -> Self {
        Losses {
            conns_dropped: table.conns_dropped,
            ends_unseen: table.ends_unseen,
            facts_dropped: table.facts_dropped,
            rst_log_evictions: table.rst_log_evictions,
            skmap_fails: kernel.skmap_fails,
            read_errors: kernel.read_errors,
            runs_skipped: kernel.runs_skipped,
        }
    }

    /// What grew since `before`.
    pub fn since(&self, before: &Losses) -> Losses {
        Losses {
            conns_dropped: self.conns_dropped.saturating_sub(before.conns_dropped),
            ends_unseen: self.ends_unseen.saturating_sub(before.ends_unseen),
            facts_dropped: self.facts_dropped.saturating_sub(before.facts_dropped),
            rst_log_evictions: self
                .rst_log_evictions
                .saturating_sub(before.rst_log_evictions),
            skmap_fails: self.skmap_fails.saturating_sub(before.skmap_fails),
            read_errors: self.read_errors.saturating_sub(before.read_errors),
            runs_skipped: self.runs_skipped.saturating_sub(before.runs_skipped),
        }
    }

    pub fn any(&self) -> bool {
        *self != Losses::default()
    }
}

impl<'a> Drops<'a> {
    /// `new`: ring-buffer records lost since the previous report; `losses` now and their
    /// growth since then.
    pub fn new(
        ts: String,
        new: u64,
        kernel: &'a CounterSnapshot,
        losses: Losses,
        losses_new: Losses,
    ) -> Self {
        Drops {
            v: SCHEMA_VERSION,
            kind: "drops",
            ts,
            ringbuf_drops: new,
            ringbuf_drops_total: kernel.ringbuf_drops,
            per_cpu: &kernel.ringbuf_drops_per_cpu,
            losses,
            losses_new,
        }
    }
}

/// `{"type":"stats"}`: the agent's and the kernel's counters, written on exit.
#[derive(Debug, Serialize)]
pub struct Stats<'a> {
    v: u32,
    #[serde(rename = "type")]
    kind: &'static str,
    ts: String,
    /// Close objects printed (after filters).
    pub printed: u64,
    pub open_connections: usize,
    pub decode_errors: u64,
    pub table: &'a TableStats,
    pub kernel: &'a CounterSnapshot,
}

impl<'a> Stats<'a> {
    pub fn new(
        ts: String,
        printed: u64,
        open_connections: usize,
        decode_errors: u64,
        table: &'a TableStats,
        kernel: &'a CounterSnapshot,
    ) -> Self {
        Stats {
            v: SCHEMA_VERSION,
            kind: "stats",
            ts,
            printed,
            open_connections,
            decode_errors,
            table,
            kernel,
        }
    }
}
