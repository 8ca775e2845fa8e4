//! Overload (root): a deliberately tiny ring buffer under a real loopback connection flood.
//! The agent must keep reporting losses while the flood goes on (its read loop does not
//! starve the timers), stop on SIGINT with its final `stats` line while the flood is still
//! running, stay within a bounded memory, and never give a `high` verdict that contradicts
//! the traffic: on loopback there is no middlebox, and every connection here is closed by
//! its client. It is also benign traffic: the kernel must not judge any of its segments
//! unacceptable.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::{Agent, agent_bin, should_run};

/// Peak resident memory allowed for the agent under this flood (generous: it is the bound,
/// not a measurement; the note and docs/performance.md have the measured figure).
const RSS_LIMIT_KIB: u64 = 256 * 1024;

/// Held by each test for its whole run: the tests of this binary would otherwise run at
/// once, and every agent sees every socket of the host. The flood then reached the other
/// test's agent (a default 4 MiB ring buffer, `--max-conns 4`): in one CI run it lost
/// 23,284 records and refused 3,194 connections, where that test asserts no loss.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    // A test that panicked while holding it leaves nothing to protect.
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Connect, send a byte, close; the server reads and closes after the client: every
/// connection is the client's close. Bounded by `stop` and by a fixed time.
fn flood(port: u16, stop: Arc<AtomicBool>, made: Arc<AtomicU64>) -> Vec<thread::JoinHandle<()>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    (0..2)
        .map(|_| {
            let stop = stop.clone();
            let made = made.clone();
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                        let _ = s.write_all(b"x");
                        made.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect()
}

#[test]
fn tiny_ring_buffer_under_a_flood() {
    if !should_run("tiny_ring_buffer_under_a_flood") {
        return;
    }
    let _serial = one_at_a_time();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let stop = Arc::new(AtomicBool::new(false));
    let server_stop = stop.clone();
    let server = thread::spawn(move || {
        listener.set_nonblocking(true).expect("nonblocking");
        let deadline = Instant::now() + Duration::from_secs(40);
        while !server_stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let mut b = [0u8; 1];
                    let _ = s.read(&mut b);
                    // Read to EOF: the client's FIN comes first.
                    let _ = s.read(&mut b);
                }
                Err(_) => thread::sleep(Duration::from_micros(200)),
            }
        }
    });

    let args: Vec<String> = [
        "trace",
        "--ringbuf-kib",
        "4",
        "--linger-ms",
        "200",
        "--port",
        &port.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut agent =
        Agent::spawn(&agent_bin(), &args, Duration::from_secs(30)).expect("start the agent");
    let made = Arc::new(AtomicU64::new(0));
    let clients = flood(port, stop.clone(), made.clone());

    // Losses are reported while the flood runs.
    let drops = agent.wait_for_type("drops", Duration::from_secs(15));
    let flooding = !stop.load(Ordering::Relaxed) && clients.iter().any(|c| !c.is_finished());
    let hwm = vm_hwm_kib(agent.pid());

    // SIGINT while the flood still runs: the agent drains what it can, then stops.
    let t0 = Instant::now();
    let exit = agent.stop();
    let stop_time = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let _ = server.join();

    let drops = drops.expect("a drops record while the flood runs");
    assert!(flooding, "the flood had ended before the drops record came");
    assert!(drops["ringbuf_drops"].as_u64().unwrap_or(0) > 0, "{drops}");
    exit.unwrap_or_else(|e| panic!("the agent did not stop cleanly under the flood: {e:#}"));
    let objects = agent.objects();
    let stats = objects
        .iter()
        .rev()
        .find(|v| v["type"] == "stats")
        .expect("the final stats line");
    assert!(
        stats["kernel"]["ringbuf_drops"].as_u64().unwrap_or(0) > 0,
        "{stats}"
    );
    // Benign same-host traffic: no segment may be judged one the socket would not accept
    // (the ACK of data still inside tcp_write_xmit once counted about two per connection).
    assert_eq!(stats["kernel"]["unaccepted"], 0, "{stats}");
    let hwm = hwm.expect("VmHWM of the agent");
    assert!(
        hwm < RSS_LIMIT_KIB,
        "agent peak RSS {hwm} KiB under the flood"
    );
    let closes: Vec<&Value> = objects.iter().filter(|v| v["type"] == "close").collect();
    let wrong_high: Vec<&&Value> = closes
        .iter()
        .filter(|v| {
            v["verdict"]["confidence"] == "high"
                && (v["verdict"]["closed_by"] == "middlebox"
                    || v["verdict"]["closed_by"] == "server")
        })
        .collect();
    assert!(
        wrong_high.is_empty(),
        "{} of {} verdicts say high for what did not happen; first: {}",
        wrong_high.len(),
        closes.len(),
        wrong_high[0]
    );
    eprintln!(
        "overload: {} connections offered, {} verdicts, kernel drops {}, peak RSS {} KiB, stop took {:?}; stats {}",
        made.load(Ordering::Relaxed),
        closes.len(),
        stats["kernel"]["ringbuf_drops"],
        hwm,
        stop_time,
        stats
    );
}

/// A full connection table is reported while the agent runs, not only in the final stats:
/// with `--max-conns 4` and a dozen connections held open, a `drops` record counts the
/// refused ones in `losses_new.conns_dropped`.
#[test]
fn full_table_is_reported_live() {
    if !should_run("full_table_is_reported_live") {
        return;
    }
    let _serial = one_at_a_time();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let args: Vec<String> = ["trace", "--max-conns", "4", "--port", &port.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut agent =
        Agent::spawn(&agent_bin(), &args, Duration::from_secs(30)).expect("start the agent");
    let mut held = Vec::new();
    for _ in 0..12 {
        let c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (s, _) = listener.accept().expect("accept");
        held.push((c, s));
    }
    // 24 sockets, 4 tracked. A `drops` record may come while the connections are still
    // being made, counting only some of them; wait for the one that counts them all.
    let drops = agent.wait_object(
        "a drops record counting 20 refused connections",
        Duration::from_secs(10),
        |v| v["type"] == "drops" && v["losses"]["conns_dropped"].as_u64() >= Some(20),
    );
    drop(held);
    let _ = agent.stop();
    let drops = drops.expect("a drops record while the connections are open");
    assert_eq!(drops["ringbuf_drops"], 0, "{drops}");
    let new = drops["losses_new"]["conns_dropped"].as_u64().unwrap_or(0);
    let total = drops["losses"]["conns_dropped"].as_u64().unwrap_or(0);
    assert!(new >= 1 && new <= total, "{drops}");
}
