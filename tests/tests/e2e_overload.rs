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

/// A network namespace of this test's own, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Netns {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .output();
        tests::run_cmd("ip", &["netns", "add", &name]).expect("ip netns add");
        let ns = Netns(name);
        tests::run_cmd("ip", &["-n", &ns.0, "link", "set", "lo", "up"]).expect("lo up");
        ns
    }

    fn iptables(&self, args: &[&str]) {
        let mut a = vec!["netns", "exec", &self.0, "iptables"];
        a.extend_from_slice(args);
        tests::run_cmd("ip", &a).expect("iptables");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .output();
    }
}

/// Runs the calling thread on CPU 0 only.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity only
    // touch it and this thread's affinity.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set),
            0,
            "sched_setaffinity"
        );
    }
}

/// `bpf(2)` with an attribute of up to 32 bytes.
fn bpf(cmd: libc::c_long, attr: &mut [u64; 4]) -> i64 {
    // SAFETY: attr is a valid bpf_attr prefix for the commands used below, and every
    // pointer in it points to a live buffer of the size the command expects.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 32u32) }
}

/// Holds `bpf_prog_active` on CPU 0 most of the time until `stop`: the kernel raises it
/// around every map read from user space (as any agent that reads BPF maps does), and a
/// tracing program that would run on that CPU meanwhile, here from a timer softirq, is
/// skipped. A one-element array of 1 MiB makes each read long.
fn hold_bpf_busy(stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        pin_to_cpu0();
        const VALUE: usize = 1 << 20;
        // map_create: map_type ARRAY (2), key_size 4, value_size, max_entries 1.
        let mut attr = [2 | (4 << 32), VALUE as u64 | (1 << 32), 0, 0];
        let fd = bpf(0, &mut attr);
        assert!(
            fd >= 0,
            "BPF_MAP_CREATE: {}",
            std::io::Error::last_os_error()
        );
        let key = 0u32;
        let mut value = vec![0u8; VALUE];
        let mut reads = 0u64;
        while !stop.load(Ordering::Relaxed) {
            // map_lookup_elem: map_fd, key, value.
            let mut attr = [
                fd as u64,
                &key as *const u32 as u64,
                value.as_mut_ptr() as u64,
                0,
            ];
            assert_eq!(bpf(1, &mut attr), 0, "BPF_MAP_LOOKUP_ELEM");
            reads += 1;
        }
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(fd as i32) };
        reads
    })
}

/// The kernel does not run a tracing program on a CPU where another BPF program (or a
/// map access from user space) is active; each such run is an event lost, which the
/// kernel counts in the program's `recursion_misses` (tracepoints from 6.7). Here a
/// blackholed path makes a few hundred connections retransmit from timer softirqs on
/// CPU 0 while map reads keep that CPU's BPF busy. The agent must report the skipped runs
/// live (`drops.losses_new.runs_skipped`) and in `stats`, and no connection alive meanwhile
/// may be judged with confidence `high`: its record may miss what happened.
#[test]
fn skipped_program_runs_are_losses() {
    if !should_run("skipped_program_runs_are_losses") {
        return;
    }
    let _serial = one_at_a_time();
    const CONNS: usize = 200;
    let ns = Netns::new(format!("wcskip{}", std::process::id()));
    let inode = tests::netns_inode(&ns.0).expect("netns inode");
    let mut agent = Agent::start(&[inode]).expect("start the agent");
    let kernel = agent.ready()["kernel"].as_str().unwrap_or("").to_string();

    // The connections, made from a thread inside the namespace, on CPU 0 (their timers
    // are armed where they send).
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let ns_name = ns.0.clone();
    let conns = thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{ns_name}")).expect("open netns");
        // SAFETY: setns on this thread only, with a namespace descriptor.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns");
        pin_to_cpu0();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mut pairs = Vec::new();
        for _ in 0..CONNS {
            let c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            let (s, _) = listener.accept().expect("accept");
            pairs.push((c, s));
        }
        tx.send(Box::leak(port.to_string().into_boxed_str()))
            .expect("send");
        // Blackholed from here on (the main thread drops the server's port).
        done_rx.recv().expect("blackhole");
        // One at a time: each connection's retransmissions then fire at a jiffy of
        // their own, each a separate chance to land while CPU 0's BPF is busy (at the same
        // jiffy they are all skipped or none is).
        for (c, _) in &mut pairs {
            c.write_all(b"x").expect("write");
            thread::sleep(Duration::from_millis(5));
        }
        done_rx.recv().expect("path back");
        for (c, s) in pairs {
            let mut s = s;
            let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
            let mut b = [0u8; 1];
            let _ = s.read(&mut b);
            drop(c);
            drop(s);
        }
    });
    let port = rx.recv().expect("port");
    ns.iptables(&["-A", "INPUT", "-p", "tcp", "--dport", port, "-j", "DROP"]);
    let stop = Arc::new(AtomicBool::new(false));
    let busy = hold_bpf_busy(stop.clone());
    done_tx.send(()).expect("go");
    // RTO backoff: retransmits at about 0.2, 0.6, 1.4 and 3 s.
    let drops = agent.wait_object(
        "a drops record with skipped runs",
        Duration::from_secs(5),
        |v| v["type"] == "drops" && v["losses_new"]["runs_skipped"].as_u64() > Some(0),
    );
    stop.store(true, Ordering::Relaxed);
    let reads = busy.join().expect("map reads");
    ns.iptables(&["-D", "INPUT", "-p", "tcp", "--dport", port, "-j", "DROP"]);
    done_tx.send(()).expect("go");
    conns.join().expect("connections");
    let seen = std::cell::Cell::new(0usize);
    let _ = agent.wait_object("every verdict", Duration::from_secs(20), |v| {
        if v["type"] == "close" {
            seen.set(seen.get() + 1);
        }
        seen.get() >= 2 * CONNS
    });
    let exit = agent.stop().expect("stop the agent");
    let stats = exit.stats();
    let skipped = stats["kernel"]["runs_skipped"].as_u64().unwrap_or(0);
    let old_kernel = kernel
        .split(['.', '-'])
        .take(2)
        .map(|p| p.parse::<u32>().unwrap_or(0))
        .collect::<Vec<_>>()
        < vec![6, 7];
    if old_kernel {
        eprintln!("SKIP: kernel {kernel} does not count skipped tracepoint runs ({skipped})");
        return;
    }
    let drops = drops.unwrap_or_else(|e| panic!("{e:#} ({reads} map reads; {stats:#})"));
    assert!(skipped > 0, "{stats:#}");
    assert_eq!(stats["kernel"]["ringbuf_drops"], 0, "{stats:#}");
    let closes: Vec<&Value> = exit
        .objects
        .iter()
        .filter(|v| v["type"] == "close")
        .collect();
    assert!(closes.len() >= CONNS, "{} verdicts", closes.len());
    for c in closes {
        let v = &c["verdict"];
        assert_ne!(v["confidence"], "high", "{c:#}");
        assert!(
            v["hint"]
                .as_str()
                .unwrap_or("")
                .contains("kernel events were lost"),
            "{c:#}"
        );
    }
    eprintln!("{reads} map reads; {skipped} runs skipped; {drops}");
}
