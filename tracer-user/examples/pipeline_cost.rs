//! CPU cost of the agent's userspace pipeline, without the kernel: synthetic event streams
//! of 100 000 loopback connections (both ends local) through the connection table, then
//! every verdict serialised to JSON (as the pipeline does it, and through serde_json to
//! compare). Reports CPU microseconds per event and per close object (process CPU time, so
//! other load on the machine does not inflate it).
//!
//! `cargo run --release -p tracer-user --example pipeline_cost`
use std::{net::SocketAddr, time::SystemTime};
use tracer_common::tcp_flag::*;
use tracer_user::{
    conn::{Table, TableConfig},
    event::*,
    export::{Clock, CloseObject},
};

fn cpu() -> f64 {
    // SAFETY: an all-zero rusage is valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_utime.tv_sec as f64 + ru.ru_utime.tv_usec as f64 / 1e6
}
fn ev(ts: u64, sk: u64, t: Tuple, kind: EventKind) -> Event {
    Event {
        ts_ns: ts,
        skaddr: sk,
        cookie: 0,
        pid: 5,
        tid: 5,
        comm: "bench".into(),
        exiting: false,
        netns: Some(1),
        tuple: Some(t),
        cpu: 0,
        kind,
    }
}
fn pk(dir: Dir, flags: u8, seq: u32) -> EventKind {
    EventKind::Packet(Packet {
        dir,
        flags,
        ttl: 64,
        seq,
        ack: 0,
        payload_len: 0,
        first_in_dir: true,
        ttl_changed: false,
        has_state: true,
        last_data_ns: None,
        cgroup_id: 0,
    })
}
fn main() -> std::io::Result<()> {
    use TcpState::*;
    let n = 100_000u64;
    let mut evs = Vec::new();
    for i in 0..n {
        let ct = Tuple::new(
            SocketAddr::from(([127, 0, 0, 1], 30000 + (i % 30000) as u16)),
            SocketAddr::from(([127, 0, 0, 1], 80)),
        );
        let st = ct.reversed();
        let (c, s, ts) = (0x1000_0000 + i * 2, 0x1000_0001 + i * 2, i * 1000);
        let isn = (i as u32).wrapping_mul(0x9e3779b9);
        evs.extend([
            ev(
                ts,
                c,
                ct,
                EventKind::State {
                    old: Close,
                    new: SynSent,
                },
            ),
            ev(ts, c, ct, pk(Dir::Egress, SYN, isn)),
            ev(
                ts,
                s,
                st,
                EventKind::State {
                    old: Listen,
                    new: SynRecv,
                },
            ),
            ev(ts, c, ct, pk(Dir::Ingress, SYN | ACK, !isn)),
            ev(
                ts,
                c,
                ct,
                EventKind::State {
                    old: SynSent,
                    new: Established,
                },
            ),
            ev(
                ts,
                s,
                st,
                EventKind::State {
                    old: SynRecv,
                    new: Established,
                },
            ),
            ev(ts, s, st, pk(Dir::Ingress, ACK, isn + 1)),
            ev(ts, s, st, pk(Dir::Egress, ACK, !isn + 1)),
            ev(
                ts,
                c,
                ct,
                EventKind::State {
                    old: Established,
                    new: FinWait1,
                },
            ),
            ev(ts, c, ct, pk(Dir::Egress, FIN | ACK, isn + 65)),
            ev(ts, s, st, pk(Dir::Ingress, FIN | ACK, isn + 65)),
            ev(
                ts,
                s,
                st,
                EventKind::State {
                    old: Established,
                    new: CloseWait,
                },
            ),
            ev(
                ts,
                s,
                st,
                EventKind::State {
                    old: CloseWait,
                    new: LastAck,
                },
            ),
            ev(ts, s, st, pk(Dir::Egress, FIN | ACK, !isn + 1)),
            ev(ts, c, ct, pk(Dir::Ingress, FIN | ACK, !isn + 1)),
            ev(
                ts,
                c,
                ct,
                EventKind::State {
                    old: FinWait1,
                    new: FinWait2,
                },
            ),
            ev(
                ts,
                c,
                ct,
                EventKind::State {
                    old: FinWait2,
                    new: Close,
                },
            ),
            ev(
                ts,
                s,
                st,
                EventKind::State {
                    old: LastAck,
                    new: Close,
                },
            ),
            ev(ts, c, ct, EventKind::Destroy),
            ev(ts, s, st, EventKind::Destroy),
        ]);
    }
    let mut tbl = Table::new(TableConfig {
        linger_ns: 0,
        max_conns: 1 << 20,
        ..TableConfig::default()
    });
    let clock = Clock::fixed(0, SystemTime::UNIX_EPOCH);
    let t0 = cpu();
    let mut closed = Vec::new();
    for (i, e) in evs.iter().enumerate() {
        closed.extend(tbl.on_event(e));
        if i % 200 == 0 {
            closed.extend(tbl.take_due(e.ts_ns + 1));
        }
    }
    closed.extend(tbl.take_all_closed());
    let t1 = cpu();
    // As `Output::closed` writes them: one reused line, the hand-written writer.
    let mut sink = std::io::sink();
    let mut line = Vec::with_capacity(4096);
    let mut bytes = 0usize;
    for c in &closed {
        line.clear();
        CloseObject {
            closed: c,
            clock: &clock,
            k8s: None,
        }
        .write_json(&mut line)?;
        bytes += line.len();
        std::io::Write::write_all(&mut sink, &line)?;
    }
    let t2 = cpu();
    // The same through serde_json (the `Serialize` impl), for comparison.
    for c in &closed {
        line.clear();
        serde_json::to_writer(
            &mut line,
            &CloseObject {
                closed: c,
                clock: &clock,
                k8s: None,
            },
        )?;
        std::io::Write::write_all(&mut sink, &line)?;
    }
    let t3 = cpu();
    println!(
        "{} events, {} closes: table {:.2} us/event, json {:.2} us/close ({} B avg; serde_json {:.2})",
        evs.len(),
        closed.len(),
        (t1 - t0) * 1e6 / evs.len() as f64,
        (t2 - t1) * 1e6 / closed.len() as f64,
        bytes / closed.len(),
        (t3 - t2) * 1e6 / closed.len() as f64,
    );
    Ok(())
}
