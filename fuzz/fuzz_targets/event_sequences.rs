//! Stateful fuzzing of the agent's pipeline: random, reordered and dropped event sequences
//! go through `event::decode`, the connection table and the classifier, as the ring-buffer
//! reader feeds them.
//!
//! Input: a sequence of records. Each starts with two control bytes (record kind, socket
//! from a pool of 6, endpoint pair from a pool of 4, a time step that may go backwards),
//! then the record's bytes, taken from the input as they come: states, flags, sequence
//! numbers, frame headers are all fuzzed. The header (kind, version, size, time, socket) and
//! the endpoints are patched so that records meet the same few sockets and tuples, as on a
//! real host; everything else is whatever the fuzzer chose. Some records are decoded with a
//! wrong size or version to reach the decode errors.
//!
//! Checked: no panic; the table never holds more than `max_conns` connections nor a
//! connection more than `MAX_FACTS` facts; a connection id gets at most one verdict; once
//! every socket of the pool has reached TCP_CLOSE and the linger is over, the table is
//! empty, so every tracked connection got exactly one verdict; every verdict serialises.
#![no_main]

use std::collections::HashSet;
use std::mem::offset_of;

use libfuzzer_sys::fuzz_target;
use tracer_common::wire::{
    H2_FRAME_SIZE, H2_NOTE_SIZE, Header, LIFECYCLE_SIZE, LifecycleRecord, PACKET_SIZE, PacketRecord,
};
use tracer_common::{WIRE_VERSION, kind};
use tracer_user::conn::{Closed, MAX_FACTS, Table, TableConfig};
use tracer_user::event::{self, Event, EventKind, TcpState};
use tracer_user::export::{Clock, CloseObject, close_json};

const SOCKETS: [u64; 6] = [
    0xffff_8880_0000_1000,
    0xffff_8880_0000_2000,
    0xffff_8880_0000_3000,
    0xffff_8880_0000_4000,
    0xffff_8880_0000_5000,
    0,
];
const MAX_CONNS: usize = 4;
/// In units of the harness clock, before the record counter multiplies it by 1024.
const LINGER_NS: u64 = 1_000_000;
const KINDS: [u8; 10] = [
    kind::STATE,
    kind::RETRANSMIT,
    kind::SEND_RESET,
    kind::RECV_RESET,
    kind::DESTROY,
    kind::ERROR_REPORT,
    kind::CLOSE_CALL,
    kind::PACKET,
    kind::H2_FRAME,
    kind::H2_NOTE,
];

/// Endpoint pairs (local, remote), IPv4 as the kernel writes them (address in the first 4
/// bytes); the second is the first reversed, so two sockets can be the two ends.
const TUPLES: [([u8; 4], u16, [u8; 4], u16); 4] = [
    ([10, 0, 0, 1], 40000, [10, 0, 0, 2], 443),
    ([10, 0, 0, 2], 443, [10, 0, 0, 1], 40000),
    ([10, 0, 0, 1], 40001, [10, 0, 0, 2], 443),
    ([127, 0, 0, 1], 8080, [127, 0, 0, 1], 50000),
];

fn record_size(k: u8) -> usize {
    match k {
        kind::PACKET => PACKET_SIZE,
        kind::H2_FRAME => H2_FRAME_SIZE,
        kind::H2_NOTE => H2_NOTE_SIZE,
        _ => LIFECYCLE_SIZE,
    }
}

fn put_header(buf: &mut [u8], k: u8, size: usize, version: u8, ts: u64, sk: u64) {
    buf[offset_of!(Header, kind)] = k;
    buf[offset_of!(Header, version)] = version;
    let s = offset_of!(Header, size);
    buf[s..s + 2].copy_from_slice(&(size as u16).to_ne_bytes());
    let t = offset_of!(Header, ts_ns);
    buf[t..t + 8].copy_from_slice(&ts.to_ne_bytes());
    let a = offset_of!(Header, skaddr);
    buf[a..a + 8].copy_from_slice(&sk.to_ne_bytes());
}

/// Writes endpoint pair `i` at `ep` (the `Endpoints` offset of the record).
fn put_tuple(buf: &mut [u8], ep: usize, i: usize) {
    let (l, lp, r, rp) = TUPLES[i % TUPLES.len()];
    // family, then saddr[16], daddr[16], sport, dport (see tracer_common::wire::Endpoints).
    use tracer_common::wire::Endpoints;
    let f = ep + offset_of!(Endpoints, family);
    buf[f..f + 2].copy_from_slice(&tracer_common::AF_INET.to_ne_bytes());
    let s = ep + offset_of!(Endpoints, saddr);
    buf[s..s + 16].fill(0);
    buf[s..s + 4].copy_from_slice(&l);
    let d = ep + offset_of!(Endpoints, daddr);
    buf[d..d + 16].fill(0);
    buf[d..d + 4].copy_from_slice(&r);
    let sp = ep + offset_of!(Endpoints, sport);
    buf[sp..sp + 2].copy_from_slice(&lp.to_ne_bytes());
    let dp = ep + offset_of!(Endpoints, dport);
    buf[dp..dp + 2].copy_from_slice(&rp.to_ne_bytes());
}

struct Run {
    table: Table,
    seen: HashSet<tracer_user::timeline::ConnId>,
    clock: Clock,
}

impl Run {
    fn take(&mut self, closed: Vec<Closed>) {
        for c in closed {
            assert!(
                self.seen.insert(c.conn.id),
                "second verdict for connection {}",
                c.conn.id
            );
            assert!(c.conn.facts.len() <= MAX_FACTS);
            let json = close_json(&c, &self.clock);
            assert_eq!(json["v"], 1);
            assert!(serde_json::to_string(&json).is_ok());
            // The pipeline writes close lines by hand: byte for byte serde's, whatever the
            // record holds.
            let obj = CloseObject {
                closed: &c,
                clock: &self.clock,
                k8s: None,
            };
            let mut fast = Vec::new();
            assert!(obj.write_json(&mut fast).is_ok());
            let slow = serde_json::to_vec(&obj).unwrap_or_default();
            assert!(
                fast == slow,
                "write_json differs from serde_json:\n{}\n{}",
                String::from_utf8_lossy(&fast),
                String::from_utf8_lossy(&slow)
            );
        }
    }

    fn feed(&mut self, ev: &Event) {
        let early = self.table.on_event(ev);
        self.take(early);
        assert!(self.table.len() <= MAX_CONNS, "table over max_conns");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut run = Run {
        table: Table::new(TableConfig {
            linger_ns: LINGER_NS * 1024,
            max_conns: MAX_CONNS,
            ..TableConfig::default()
        }),
        seen: HashSet::new(),
        clock: Clock::fixed(0, std::time::UNIX_EPOCH),
    };
    let mut ts: u64 = 1_000_000_000;
    let mut rest = data;
    let mut records: u64 = 0;
    let mut latest: u64 = 0;
    let mut buf = [0u8; 128];
    while let [c0, c1, tail @ ..] = rest {
        let k = KINDS[usize::from(c0 & 0x0f) % KINDS.len()];
        let sk = match SOCKETS[usize::from(c0 >> 4) % SOCKETS.len()] {
            // Only these kinds come without a socket from the kernel.
            0 if !matches!(k, kind::ERROR_REPORT | kind::SEND_RESET) => SOCKETS[0],
            s => s,
        };
        let tuple = usize::from(c1 & 0x03);
        // Time: mostly forward by up to ~0.5 ms; 1 in 8 records goes back (reordering
        // across CPUs), and bit 5 jumps past the linger.
        let step = u64::from(c1 >> 2);
        ts = match c1 & 0xe0 {
            0xe0 => ts.saturating_sub(step * 10_000),
            0x20 => ts + LINGER_NS * 2,
            _ => ts + step * 8_000,
        };
        let size = record_size(k);
        let n = size.min(tail.len());
        buf[..size].fill(0);
        buf[..n].copy_from_slice(&tail[..n]);
        rest = &tail[n..];
        // 1 in 16 records keeps a broken header (size or version) to reach decode errors.
        let (hdr_size, version) = match c1 & 0x0f {
            0x0f => (size - 1, WIRE_VERSION),
            0x0e => (size, WIRE_VERSION.wrapping_add(1)),
            _ => (size, WIRE_VERSION),
        };
        // Connection ids are (socket, first timestamp): a kernel never stamps two records of
        // one socket with the same nanosecond, so neither does this harness (the low bits
        // count records).
        records += 1;
        let stamp = ts * 1024 + (records % 1024);
        latest = latest.max(stamp);
        put_header(&mut buf, k, hdr_size, version, stamp, sk);
        match k {
            kind::PACKET => put_tuple(&mut buf, offset_of!(PacketRecord, ep), tuple),
            kind::H2_FRAME | kind::H2_NOTE => {}
            _ => put_tuple(&mut buf, offset_of!(LifecycleRecord, ep), tuple),
        }
        if let Ok(ev) = event::decode(&buf[..size]) {
            run.feed(&ev);
        }
        let due = run.table.take_due(stamp);
        run.take(due);
    }
    // Every socket of the pool closes; after the linger nothing may be left.
    // After the latest record, however far back the sequence ended.
    let mut ts = latest.max(ts * 1024) + 1024;
    for sk in SOCKETS.iter().copied().filter(|&s| s != 0) {
        ts += 1_000 * 1024;
        run.feed(&Event {
            ts_ns: ts,
            skaddr: sk,
            cookie: 0,
            pid: 0,
            tid: 0,
            comm: "".into(),
            exiting: false,
            netns: None,
            tuple: None,
            cpu: 0,
            kind: EventKind::State {
                old: TcpState::LastAck,
                new: TcpState::Close,
            },
        });
    }
    let due = run.table.take_due(ts + LINGER_NS * 2 * 1024);
    run.take(due);
    assert_eq!(
        run.table.len(),
        0,
        "connections left without a verdict after every socket closed"
    );
    let stats = &run.table.stats;
    assert!(run.seen.len() as u64 <= stats.conns_opened);
});
