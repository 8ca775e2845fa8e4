//! The records other than `close`: `ready` (once, after the probes attached), `drops`
//! (when the ring buffer lost events) and `stats` (once, on exit). Field order is the
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
            netns_ids: report.netns_ids,
            exit_detection: report.exit_detection,
            kernel: &report.kernel,
        }
    }
}

/// `{"type":"drops"}`: kernel events lost to a full ring buffer since the last report.
#[derive(Debug, Serialize)]
pub struct Drops<'a> {
    v: u32,
    #[serde(rename = "type")]
    kind: &'static str,
    ts: String,
    ringbuf_drops: u64,
    ringbuf_drops_total: u64,
    per_cpu: &'a [u64],
}

impl<'a> Drops<'a> {
    /// `new`: lost since the previous report.
    pub fn new(ts: String, new: u64, kernel: &'a CounterSnapshot) -> Self {
        Drops {
            v: SCHEMA_VERSION,
            kind: "drops",
            ts,
            ringbuf_drops: new,
            ringbuf_drops_total: kernel.ringbuf_drops,
            per_cpu: &kernel.ringbuf_drops_per_cpu,
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
