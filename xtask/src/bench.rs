//! Loopback connection-churn benchmark. Phases run back to back in one invocation:
//! nothing attached, `whoclosed trace` attached, libbpf-tools `tcplife` attached, and
//! nothing attached again. It prints throughput ratios against the mean of the two bare
//! phases, the tracer's CPU share, and the BPF run time per connection (from
//! `kernel.bpf_stats_enabled`). It asserts nothing: numbers are for people to read.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

#[derive(clap::Args)]
pub struct ChurnArgs {
    /// Seconds per phase.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Concurrent client threads.
    #[arg(long, default_value_t = 2)]
    clients: usize,
    /// Bytes each client sends before closing.
    #[arg(long, default_value_t = 64)]
    bytes: usize,
    /// Rounds of all phases. Each round compares its tracers with its own bare phases, and
    /// odd rounds run tcplife before whoclosed; from six rounds on, the summary gives
    /// medians with a 95 % interval.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
}

struct Phase {
    name: String,
    conns: u64,
    secs: f64,
    tracer_cpu: Option<f64>,
    bpf_ns: Option<u64>,
    /// Per program that ran during the phase: name, runs, run time (ns).
    programs: Vec<(String, u64, u64)>,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.conns as f64 / self.secs
    }
}

/// A median with its 95 % interval over `n` values (NaN bounds under six).
#[derive(Clone, Copy, Debug)]
pub struct Interval {
    pub median: f64,
    pub lo: f64,
    pub hi: f64,
    pub n: usize,
}

impl Interval {
    pub fn of(mut v: Vec<f64>) -> Self {
        v.retain(|x| x.is_finite());
        v.sort_by(f64::total_cmp);
        let (lo, hi) = median_ci95(&v);
        Interval {
            median: v.get(v.len() / 2).copied().unwrap_or(f64::NAN),
            lo,
            hi,
            n: v.len(),
        }
    }

    /// Prints `what = median` with the interval and how many `of` it came from.
    fn print(&self, what: &str, of: &str) {
        println!(
            "{what} = {:.3}, 95 % interval of that median {:.3} to {:.3} ({} {of})",
            self.median, self.lo, self.hi, self.n
        );
    }
}

/// One tracer's phases of [`churn`], over the rounds: each against the mean of its own
/// round's bare phases.
#[derive(Clone, Copy, Debug)]
pub struct TracerCost {
    /// Connections per second attached over bare.
    pub ratio: Interval,
    /// The tracer's own CPU (user + system), µs per completed connection.
    pub us_per_conn: Interval,
    /// Run time of all BPF programs per connection, minus the bare phases' background.
    pub bpf_ns_per_conn: Interval,
}

/// whoclosed over tcplife, round by round (the two phases of a round are next to each
/// other in time, so the machine's drift between rounds cancels).
#[derive(Clone, Copy, Debug)]
pub struct Relative {
    pub bpf_ns: Interval,
    pub us: Interval,
    pub rate: Interval,
}

/// What [`churn`] measured, for `bench-budgets`.
#[derive(Clone, Copy, Debug)]
pub struct ChurnSummary {
    pub rounds: usize,
    pub whoclosed: TracerCost,
    /// None when tcplife is not installed.
    pub tcplife: Option<TracerCost>,
    pub vs_tcplife: Option<Relative>,
}

/// Accepts, reads to EOF, closes; clients connect, write, close first. Returns completed
/// client connections and elapsed seconds.
pub(crate) fn churn_load(secs: u64, clients: usize, bytes: usize) -> Result<(u64, f64)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the loopback listener")?;
    let addr: SocketAddr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let server_stop = stop.clone();
    listener.set_nonblocking(false)?;
    let server = thread::spawn(move || {
        let mut buf = [0u8; 4096];
        for s in listener.incoming() {
            if server_stop.load(Ordering::Relaxed) {
                break;
            }
            let Ok(mut s) = s else { continue };
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        }
    });
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let payload = vec![0x5au8; bytes];
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let done = done.clone();
            let payload = payload.clone();
            thread::spawn(move || {
                while Instant::now() < deadline {
                    let Ok(mut c) = TcpStream::connect(addr) else {
                        continue;
                    };
                    if c.write_all(&payload).is_ok() && c.shutdown(Shutdown::Write).is_ok() {
                        let mut b = [0u8; 1];
                        let _ = c.read(&mut b);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = TcpStream::connect(addr); // wake the accept loop
    let _ = server.join();
    Ok((done.load(Ordering::Relaxed), elapsed))
}

pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some((utime + stime) / if hz > 0 { hz as f64 } else { 100.0 })
}

/// Run time and run count of one loaded BPF program.
#[derive(Clone, Default)]
struct ProgStats {
    name: String,
    run_time_ns: u64,
    run_cnt: u64,
}

/// Run statistics per loaded BPF program id (needs kernel.bpf_stats_enabled=1).
fn bpf_run_times() -> HashMap<u64, ProgStats> {
    let mut out = HashMap::new();
    let Ok(o) = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
    else {
        return out;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout) else {
        return out;
    };
    for p in v.as_array().into_iter().flatten() {
        if let Some(id) = p["id"].as_u64() {
            out.insert(
                id,
                ProgStats {
                    name: p["name"].as_str().unwrap_or("?").to_string(),
                    run_time_ns: p["run_time_ns"].as_u64().unwrap_or(0),
                    run_cnt: p["run_cnt"].as_u64().unwrap_or(0),
                },
            );
        }
    }
    out
}

/// Programs that ran between two snapshots: name, runs, run time (ns), costliest first.
fn programs_between(
    before: &HashMap<u64, ProgStats>,
    after: &HashMap<u64, ProgStats>,
) -> Vec<(String, u64, u64)> {
    let mut programs: Vec<(String, u64, u64)> = after
        .iter()
        .filter_map(|(id, a)| {
            let b = before.get(id)?;
            let runs = a.run_cnt.saturating_sub(b.run_cnt);
            (runs > 0).then(|| {
                (
                    a.name.clone(),
                    runs,
                    a.run_time_ns.saturating_sub(b.run_time_ns),
                )
            })
        })
        .collect();
    programs.sort_by_key(|p| std::cmp::Reverse(p.2));
    programs
}

/// Starts a tracer, waits until it has attached, drains its stdout in the background.
pub(crate) fn start_tracer(
    cmd: Command,
    ready: impl Fn(&str) -> bool + Send + 'static,
) -> Result<Child> {
    start_tracer_keeping(cmd, ready, None)
}

/// The last line of a tracer's stdout that `keep` matched (whoclosed's final `stats` line).
type KeptLine = std::sync::Arc<std::sync::Mutex<Option<String>>>;

/// As [`start_tracer`], also keeping the last stdout line that contains `keep.0` in
/// `keep.1`.
fn start_tracer_keeping(
    mut cmd: Command,
    ready: impl Fn(&str) -> bool + Send + 'static,
    keep: Option<(&'static str, KeptLine)>,
) -> Result<Child> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("{cmd:?}"))?;
    let stdout = child.stdout.take().context("tracer stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        let mut sent = false;
        while r.read_line(&mut line).is_ok_and(|n| n > 0) {
            if !sent && ready(&line) {
                let _ = tx.send(());
                sent = true;
            }
            if let Some((needle, slot)) = &keep {
                if line.contains(needle) {
                    if let Ok(mut s) = slot.lock() {
                        *s = Some(line.clone());
                    }
                }
            }
            line.clear();
        }
    });
    if rx.recv_timeout(Duration::from_secs(30)).is_err() {
        let _ = child.kill();
        bail!("tracer {cmd:?} did not become ready in 30 s");
    }
    Ok(child)
}

/// SIGINT, then wait (killed after 10 s).
pub(crate) fn stop(child: &mut Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn phase(name: &str, args: &ChurnArgs, tracer: Option<Child>) -> Result<Phase> {
    let before = bpf_run_times();
    let pid = tracer.as_ref().map(Child::id);
    let cpu0 = pid.and_then(cpu_seconds);
    let (conns, secs) = churn_load(args.secs, args.clients, args.bytes)?;
    let cpu1 = pid.and_then(cpu_seconds);
    let after = bpf_run_times();
    let mut tracer = tracer;
    // The tracer attached before the first snapshot, so the run-time growth of every program
    // covers it; the bare phases measure what other programs on the host add.
    let programs = programs_between(&before, &after);
    let grown: u64 = programs.iter().map(|p| p.2).sum();
    if let Some(c) = tracer.as_mut() {
        stop(c);
    }
    Ok(Phase {
        name: name.into(),
        conns,
        secs,
        tracer_cpu: match (cpu0, cpu1) {
            (Some(a), Some(b)) => Some((b - a) / secs),
            _ => None,
        },
        bpf_ns: Some(grown),
        programs,
    })
}

/// One round's phases, in the order they ran.
fn churn_round(whoclosed: &Path, args: &ChurnArgs, tcplife_first: bool) -> Result<Vec<Phase>> {
    let mut phases = vec![phase("bare", args, None)?];
    let tcplife = Path::new("/usr/sbin/tcplife");
    for tracer in if tcplife_first {
        ["tcplife", "whoclosed"]
    } else {
        ["whoclosed", "tcplife"]
    } {
        if tracer == "whoclosed" {
            let mut cmd = Command::new(whoclosed);
            cmd.args(["trace", "--linger-ms", "200"]);
            let wc = start_tracer(cmd, |l| l.contains("\"type\":\"ready\""))?;
            phases.push(phase("whoclosed", args, Some(wc))?);
        } else if tcplife.exists() {
            // tcplife prints its header once attached; stdbuf keeps its stdout line-buffered
            // on a pipe so the header reaches us.
            let mut cmd = Command::new("stdbuf");
            cmd.arg("-oL").arg(tcplife).arg("-w");
            let t = start_tracer(cmd, |l| l.contains("PID"))?;
            phases.push(phase("tcplife", args, Some(t))?);
        }
    }
    phases.push(phase("bare-again", args, None)?);
    Ok(phases)
}

/// Per tracer phase of one round: (name, ratio vs bare, µs per connection, BPF ns per
/// connection above the bare background); prints the round's table.
fn churn_report(phases: &[Phase], programs: bool) -> Vec<(String, f64, f64, f64)> {
    let bare: Vec<&Phase> = phases
        .iter()
        .filter(|p| p.name.starts_with("bare"))
        .collect();
    let base_rate = bare.iter().map(|p| p.rate()).sum::<f64>() / bare.len().max(1) as f64;
    let base_bpf = bare
        .iter()
        .map(|p| p.bpf_ns.unwrap_or(0) as f64 / p.conns.max(1) as f64)
        .sum::<f64>()
        / bare.len().max(1) as f64;
    println!(
        "{:<11} {:>9} {:>11} {:>14} {:>12} {:>16}",
        "phase", "conns", "conns/s", "ratio vs bare", "tracer CPU", "BPF ns/conn"
    );
    let mut out = Vec::new();
    for p in phases {
        let bpf_per_conn = p.bpf_ns.unwrap_or(0) as f64 / p.conns.max(1) as f64;
        let bpf_cell = if p.name.starts_with("bare") {
            format!("{bpf_per_conn:.0} (bg)")
        } else {
            let above = (bpf_per_conn - base_bpf).max(0.0);
            out.push((
                p.name.clone(),
                p.rate() / base_rate,
                p.tracer_cpu
                    .map_or(f64::NAN, |c| c * 1e6 / p.rate().max(1e-9)),
                above,
            ));
            format!("{above:.0}")
        };
        println!(
            "{:<11} {:>9} {:>11.0} {:>14.3} {:>12} {:>16}",
            p.name,
            p.conns,
            p.rate(),
            p.rate() / base_rate,
            p.tracer_cpu
                .map(|c| format!("{:.1}%", c * 100.0))
                .unwrap_or_else(|| "-".into()),
            bpf_cell,
        );
    }
    if programs {
        println!(
            "(BPF ns/conn: run time of all BPF programs during the phase per connection, minus the bare phases' background)"
        );
        for p in phases.iter().filter(|p| !p.name.starts_with("bare")) {
            println!("\n{}: BPF programs that ran (per connection)", p.name);
            println!(
                "{:<24} {:>10} {:>10} {:>12}",
                "program", "runs/conn", "ns/run", "ns/conn"
            );
            let conns = p.conns.max(1) as f64;
            for (name, runs, ns) in &p.programs {
                println!(
                    "{:<24} {:>10.2} {:>10.0} {:>12.0}",
                    name,
                    *runs as f64 / conns,
                    *ns as f64 / (*runs).max(1) as f64,
                    *ns as f64 / conns
                );
            }
        }
    }
    out
}

pub fn churn(root: &Path, args: &ChurnArgs) -> Result<ChurnSummary> {
    let whoclosed = root.join("target/release/whoclosed");
    if !Path::new("/usr/sbin/tcplife").exists() {
        eprintln!("bench: /usr/sbin/tcplife not found (Debian libbpf-tools); skipping that phase");
    }
    let stats_was =
        std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .context("enabling kernel.bpf_stats_enabled (root needed)")?;
    println!(
        "connection churn on loopback: {} client threads, {} B per connection, {} s per phase, {} round(s)",
        args.clients,
        args.bytes,
        args.secs,
        args.rounds.max(1)
    );
    let mut rounds = Vec::new();
    let mut result = Ok(());
    for round in 0..args.rounds.max(1) {
        match churn_round(&whoclosed, args, round % 2 == 1) {
            Ok(phases) => {
                if args.rounds > 1 {
                    println!("\nround {}", round + 1);
                }
                rounds.push(churn_report(&phases, round + 1 == args.rounds.max(1)));
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_was.trim());
    result?;

    let pick = |name: &str| -> Vec<(f64, f64, f64)> {
        rounds
            .iter()
            .filter_map(|r| r.iter().find(|p| p.0 == name))
            .map(|p| (p.1, p.2, p.3))
            .collect()
    };
    let cost = |v: &[(f64, f64, f64)]| -> Option<TracerCost> {
        (!v.is_empty()).then(|| TracerCost {
            ratio: Interval::of(v.iter().map(|x| x.0).collect()),
            us_per_conn: Interval::of(v.iter().map(|x| x.1).collect()),
            bpf_ns_per_conn: Interval::of(v.iter().map(|x| x.2).collect()),
        })
    };
    let (wc, tl) = (pick("whoclosed"), pick("tcplife"));
    let whoclosed = cost(&wc).context("no whoclosed phase ran")?;
    let tcplife = cost(&tl);
    let vs_tcplife = (tcplife.is_some() && wc.len() == tl.len()).then(|| {
        let rel = |f: fn(&(f64, f64, f64)) -> f64| {
            Interval::of(wc.iter().zip(&tl).map(|(w, t)| f(w) / f(t)).collect())
        };
        Relative {
            bpf_ns: rel(|x| x.2),
            us: rel(|x| x.1),
            rate: rel(|x| x.0),
        }
    });
    if args.rounds > 1 {
        let show = |what: &str, i: &Interval| i.print(what, "rounds");
        println!();
        show("whoclosed ratio vs bare", &whoclosed.ratio);
        show("whoclosed tracer µs per connection", &whoclosed.us_per_conn);
        show(
            "whoclosed BPF ns per connection",
            &whoclosed.bpf_ns_per_conn,
        );
        if let Some(r) = &vs_tcplife {
            show("whoclosed/tcplife, BPF ns per connection", &r.bpf_ns);
            show("whoclosed/tcplife, tracer µs per connection", &r.us);
            show("whoclosed/tcplife, connections per second", &r.rate);
        }
    }
    Ok(ChurnSummary {
        rounds: rounds.len(),
        whoclosed,
        tcplife,
        vs_tcplife,
    })
}

#[derive(clap::Args)]
pub struct H2Args {
    /// Requests per phase (about 1.4 s each here).
    #[arg(long, default_value_t = 4000)]
    requests: u32,
    /// Response size in MiB.
    #[arg(long, default_value_t = 1)]
    mib: u32,
    /// Concurrent connections.
    #[arg(long, default_value_t = 4)]
    clients: u32,
    /// Concurrent streams per connection.
    #[arg(long, default_value_t = 10)]
    streams: u32,
    /// Detached/attached pairs. Single runs here spread by ±15 %, and the machine's busy
    /// CPU per MB spreads with them (the same segment count, no idle, no steal: each byte
    /// simply costs more CPU in some runs), so a 2 % difference needs many pairs: the report
    /// gives the median pair ratio with its 95 % interval.
    #[arg(long, default_value_t = 24)]
    rounds: u32,
    /// In place of the tracer, attach two programs that do nothing at the cgroup v2 root
    /// (where its packet hooks go): the cost of the cgroup_skb hook itself, the floor of
    /// any tracer built on it. Needs `llc` (Debian llvm) and `bpftool`.
    #[arg(long)]
    floor: bool,
    /// Extra arguments for `whoclosed trace` in the attached runs (repeatable), e.g.
    /// `--tracer-arg=--no-h2-frames` to measure the packet hooks without the HTTP/2 walker.
    #[arg(long = "tracer-arg", allow_hyphen_values = true)]
    tracer_args: Vec<String>,
}

struct H2Phase {
    name: &'static str,
    secs: f64,
    req_per_s: f64,
    mb_per_s: f64,
    tracer_cpu_s: Option<f64>,
    /// CPU seconds of the workload itself: h2load and nghttpd.
    work_cpu_s: f64,
    /// CPU seconds the whole machine was busy (`/proc/stat`: every CPU's time outside idle,
    /// I/O wait and steal): the workload, the tracer, softirqs, ksoftirqd, everything.
    busy_s: f64,
    /// Run time of every BPF program that ran during the phase (kernel.bpf_stats_enabled).
    bpf_s: f64,
    /// Per program: name, runs, run time (ns).
    programs: Vec<(String, u64, u64)>,
    /// Attached runs: HTTP/2 frames the kernel walked and its losses of sync (the tracer's
    /// final `stats` line). A walker that loses sync stops walking until it finds frame
    /// boundaries again, which makes it look cheaper than it is.
    walker: Option<(u64, u64)>,
}

/// A distribution-free 95 % confidence interval for the median of `sorted` (ascending):
/// the order statistics `n/2 ∓ 0.98·√n` (binomial, normal approximation), NaN for fewer
/// than six values.
fn median_ci95(sorted: &[f64]) -> (f64, f64) {
    let n = sorted.len();
    if n < 6 {
        return (f64::NAN, f64::NAN);
    }
    let half = 0.98 * (n as f64).sqrt();
    let lo = ((n as f64 / 2.0 - half).floor() as usize).min(n - 1);
    let hi = ((n as f64 / 2.0 + half).ceil() as usize).min(n - 1);
    (sorted[lo], sorted[hi])
}

/// Parses h2load's "finished in 1.23s, 325.20 req/s, 325.33MB/s" line.
fn parse_h2load(out: &str) -> Option<(f64, f64, f64)> {
    let line = out.lines().find(|l| l.starts_with("finished in"))?;
    let mut parts = line
        .trim_start_matches("finished in")
        .split(',')
        .map(str::trim);
    let t = parts.next()?;
    let secs = if let Some(v) = t.strip_suffix("ms") {
        v.parse::<f64>().ok()? / 1e3
    } else if let Some(v) = t.strip_suffix("us") {
        v.parse::<f64>().ok()? / 1e6
    } else {
        t.strip_suffix('s')?.parse::<f64>().ok()?
    };
    let rps = parts
        .next()?
        .trim_end_matches("req/s")
        .trim()
        .parse::<f64>()
        .ok()?;
    let rate = parts.next()?;
    let (num, unit) = rate.split_at(rate.find(|c: char| c.is_ascii_alphabetic())?);
    let num: f64 = num.trim().parse().ok()?;
    let mb = match unit {
        "GB/s" => num * 1000.0,
        "MB/s" => num,
        "KB/s" => num / 1000.0,
        "B/s" => num / 1e6,
        _ => return None,
    };
    Some((secs, rps, mb))
}

fn h2load_phase(
    name: &'static str,
    url: &str,
    args: &H2Args,
    server: u32,
    tracer: Option<(Child, KeptLine)>,
) -> Result<H2Phase> {
    let pid = tracer.as_ref().map(|t| t.0.id());
    let before = bpf_run_times();
    let cpu0 = pid.and_then(cpu_seconds);
    let srv0 = cpu_seconds(server).unwrap_or(0.0);
    let kids0 = children_cpu();
    let busy0 = busy_seconds();
    let out = Command::new("h2load")
        .args([
            "-n",
            &args.requests.to_string(),
            "-c",
            &args.clients.to_string(),
            "-m",
            &args.streams.to_string(),
            url,
        ])
        .output()
        .context("running h2load (Debian nghttp2-client)")?;
    let busy1 = busy_seconds();
    let kids1 = children_cpu();
    let srv1 = cpu_seconds(server).unwrap_or(0.0);
    let cpu1 = pid.and_then(cpu_seconds);
    let after = bpf_run_times();
    let text = String::from_utf8_lossy(&out.stdout);
    let (secs, req_per_s, mb_per_s) =
        parse_h2load(&text).with_context(|| format!("unexpected h2load output:\n{text}"))?;
    let walker = match tracer {
        Some((mut t, stats)) => {
            stop(&mut t);
            walker_counts(&stats)
        }
        None => None,
    };
    let programs = programs_between(&before, &after);
    Ok(H2Phase {
        walker,
        name,
        secs,
        req_per_s,
        mb_per_s,
        tracer_cpu_s: match (cpu0, cpu1) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
        work_cpu_s: (kids1 - kids0) + (srv1 - srv0),
        busy_s: match (busy0, busy1) {
            (Some(a), Some(b)) => b - a,
            _ => f64::NAN,
        },
        bpf_s: programs.iter().map(|p| p.2).sum::<u64>() as f64 / 1e9,
        programs,
    })
}

/// HTTP/2 frames the kernel walked and the times it lost sync, from the tracer's final
/// `stats` line (waits up to 2 s for its reader to see it after the exit).
fn walker_counts(stats: &KeptLine) -> Option<(u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let line = stats.lock().ok().and_then(|s| s.clone());
        if let Some(line) = line {
            let v: serde_json::Value = serde_json::from_str(&line).ok()?;
            let k = &v["kernel"];
            return Some((k["h2_frames"].as_u64()?, k["h2_desyncs"].as_u64()?));
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// CPU seconds the machine has been busy since boot, all CPUs: `/proc/stat`'s `cpu` line
/// without idle, I/O wait and steal (guest time is inside user time).
fn busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(busy as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// CPU seconds of this process's waited-for children (h2load, once it exited).
fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer, RUSAGE_CHILDREN always exists.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// What [`h2`] measured, for `bench-budgets`.
#[derive(Clone, Copy, Debug)]
pub struct H2Summary {
    /// Attached/detached pair ratios: their median and its 95 % interval.
    pub ratio: Interval,
    /// BPF run time as a share of the workload's CPU, profiled run.
    pub bpf_share: Option<f64>,
    /// The agent's CPU as a share of the workload's CPU, attached runs.
    pub agent_share: f64,
}

pub fn h2(root: &Path, args: &H2Args) -> Result<H2Summary> {
    let stats_was =
        std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    let r = h2_inner(root, args);
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_was.trim());
    r
}

/// Turns `kernel.bpf_stats_enabled` on or off. With it on, every BPF program run also
/// reads the clock twice and updates per-CPU counters: a cost of the measurement, not of
/// the tracer, so the throughput pairs run with it off and one extra run measures costs.
fn bpf_stats(on: bool) -> Result<()> {
    std::fs::write(
        "/proc/sys/kernel/bpf_stats_enabled",
        if on { "1" } else { "0" },
    )
    .context("setting kernel.bpf_stats_enabled (root needed)")
}

fn h2_inner(root: &Path, args: &H2Args) -> Result<H2Summary> {
    let dir = std::env::temp_dir().join(format!("whoclosed-bench-h2-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let body = vec![0x5au8; (args.mib as usize) << 20];
    std::fs::write(dir.join("blob"), &body)?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut server = Command::new("nghttpd")
        .args(["--no-tls", "-a", "127.0.0.1", "-d"])
        .arg(&dir)
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nghttpd (Debian nghttp2-server)")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            let _ = server.kill();
            bail!("nghttpd did not listen on 127.0.0.1:{port}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let url = format!("http://127.0.0.1:{port}/blob");
    let result = (|| -> Result<Vec<H2Phase>> {
        let mut phases = Vec::new();
        let tracer = || -> Result<(Child, KeptLine)> {
            let mut cmd = Command::new(root.join("target/release/whoclosed"));
            cmd.args(["trace", "--linger-ms", "200"]);
            cmd.args(&args.tracer_args);
            let stats = KeptLine::default();
            let child = start_tracer_keeping(
                cmd,
                |l| l.contains("\"type\":\"ready\""),
                Some(("\"type\":\"stats\"", stats.clone())),
            )?;
            Ok((child, stats))
        };
        let mut floor = if args.floor {
            Some(crate::floor::Floor::load(&dir.join("floor"))?)
        } else {
            None
        };
        bpf_stats(false)?;
        // Each round is one pair; odd rounds run the attached phase first, so that whatever
        // the first or second run of a pair gains (a warm page cache, the tracer's exit
        // still being reaped) falls on both sides equally.
        for round in 0..args.rounds.max(1) {
            let order = if round % 2 == 1 {
                [true, false]
            } else {
                [false, true]
            };
            for attached in order {
                let phase = match (attached, &mut floor) {
                    (false, _) => h2load_phase("detached", &url, args, server.id(), None)?,
                    (true, None) => {
                        h2load_phase("attached", &url, args, server.id(), Some(tracer()?))?
                    }
                    (true, Some(f)) => {
                        f.attach()?;
                        let p = h2load_phase("attached", &url, args, server.id(), None);
                        f.detach()?;
                        p?
                    }
                };
                phases.push(phase);
            }
        }
        bpf_stats(true)?;
        let profiled = match &mut floor {
            None => h2load_phase("profiled", &url, args, server.id(), Some(tracer()?)),
            Some(f) => {
                f.attach()?;
                let p = h2load_phase("profiled", &url, args, server.id(), None);
                f.detach()?;
                p
            }
        };
        bpf_stats(false)?;
        phases.push(profiled?);
        Ok(phases)
    })();
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let phases = result?;
    let median = |name: &str| {
        let mut v: Vec<f64> = phases
            .iter()
            .filter(|p| p.name == name)
            .map(|p| p.mb_per_s)
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let base = median("detached");
    println!(
        "h2load on loopback: {} requests of {} MiB, {} connections x {} streams, nghttpd --no-tls",
        args.requests, args.mib, args.clients, args.streams
    );
    if args.floor {
        println!(
            "--floor: \"attached\" is two empty cgroup_skb programs at the cgroup root, not the tracer"
        );
    } else if !args.tracer_args.is_empty() {
        println!("tracer: whoclosed trace {}", args.tracer_args.join(" "));
    }
    println!(
        "{:<10} {:>7} {:>9} {:>9} {:>9} {:>10} {:>12} {:>11} {:>10} {:>12}",
        "run",
        "secs",
        "req/s",
        "MB/s",
        "vs median",
        "pair ratio",
        "workload CPU",
        "agent CPU",
        "BPF CPU",
        "busy µs/MB"
    );
    let mut pair_ratios = Vec::new();
    // Per pair, the machine's busy CPU per MB detached over the same attached: what the
    // tracer adds to the cost of each byte, whatever else the run's throughput did (a stall
    // in loss recovery leaves a core idle and lowers MB/s, not CPU per MB).
    let mut cost_ratios = Vec::new();
    for (i, p) in phases.iter().enumerate() {
        // Each attached run against the detached run of its round (the phase before or
        // after it): slow drift of the machine (other guests, thermal) cancels out of these.
        let partner = if i % 2 == 0 { i + 1 } else { i - 1 };
        let vs_prev = match phases.get(partner) {
            Some(d) if p.name == "attached" && d.name == "detached" => {
                let r = p.mb_per_s / d.mb_per_s;
                pair_ratios.push(r);
                let per_mb = |x: &H2Phase| x.busy_s / (x.mb_per_s * x.secs).max(1e-9);
                let c = per_mb(d) / per_mb(p);
                if c.is_finite() {
                    cost_ratios.push(c);
                }
                format!("{r:.3}")
            }
            _ => "-".into(),
        };
        println!(
            "{:<10} {:>7.2} {:>9.1} {:>9.1} {:>9.3} {:>10} {:>11.2}s {:>11} {:>10} {:>12.0}",
            p.name,
            p.secs,
            p.req_per_s,
            p.mb_per_s,
            p.mb_per_s / base,
            vs_prev,
            p.work_cpu_s,
            p.tracer_cpu_s
                .map(|c| format!("{c:.2}s"))
                .unwrap_or_else(|| "-".into()),
            if p.name == "profiled" {
                format!("{:.3}s", p.bpf_s)
            } else {
                "-".into()
            },
            p.busy_s * 1e6 / (p.mb_per_s * p.secs).max(1e-9),
        );
    }
    let attached: Vec<&H2Phase> = phases.iter().filter(|p| p.name == "attached").collect();
    let sum = |v: &[&H2Phase], f: fn(&H2Phase) -> f64| v.iter().map(|p| f(p)).sum::<f64>();
    let bytes_att = sum(&attached, |p| p.mb_per_s * p.secs);
    let agent = sum(&attached, |p| p.tracer_cpu_s.unwrap_or(0.0));
    let work = sum(&attached, |p| p.work_cpu_s);
    println!(
        "median MB/s: detached {base:.1}, attached {:.1}; attached/detached = {:.3}",
        median("attached"),
        median("attached") / base,
    );
    let ratio = Interval::of(pair_ratios);
    ratio.print(
        "median pair ratio (attached/detached of one round)",
        "pairs",
    );
    let mut summary = H2Summary {
        ratio,
        bpf_share: None,
        agent_share: agent / work.max(1e-9),
    };
    Interval::of(cost_ratios).print(
        "median pair CPU ratio (busy CPU per MB detached/attached, whole machine)",
        "pairs",
    );
    // Per MB of the runs whose tracer left a final stats line, so that a missing one does
    // not read as a walker that walked less.
    let counted: Vec<(&H2Phase, (u64, u64))> = attached
        .iter()
        .filter_map(|p| Some((*p, p.walker?)))
        .collect();
    let bytes_counted: f64 = counted.iter().map(|(p, _)| p.mb_per_s * p.secs).sum();
    let (frames, desyncs) = counted
        .iter()
        .fold((0, 0), |(f, d), (_, (pf, pd))| (f + pf, d + pd));
    println!(
        "HTTP/2 walker in {} of {} attached runs (the others left no stats line): {frames} frames walked ({:.0} per MB), {desyncs} losses of sync ({:.2} per GB; loopback reorders a few segments, each costing one)",
        counted.len(),
        attached.len(),
        frames as f64 / bytes_counted.max(1e-9),
        desyncs as f64 * 1000.0 / bytes_counted.max(1e-9),
    );
    println!(
        "agent in the attached runs: {:.0} ns per MB ({:.2} % of the workload's CPU)",
        agent * 1e9 / bytes_att.max(1e-9),
        100.0 * agent / work.max(1e-9),
    );
    if let Some(p) = phases.iter().find(|p| p.name == "profiled") {
        let mb = (p.mb_per_s * p.secs).max(1e-9);
        summary.bpf_share = Some(p.bpf_s / p.work_cpu_s.max(1e-9));
        println!(
            "BPF in the profiled run (kernel.bpf_stats_enabled, which itself slows every program run): {:.0} ns per MB ({:.2} % of the workload's CPU)",
            p.bpf_s * 1e9 / mb,
            100.0 * p.bpf_s / p.work_cpu_s.max(1e-9),
        );
        println!(
            "(a CPU-bound transfer slows by about these shares; the MB/s ratios also carry this 2-core VM's noise)"
        );
        println!("\nBPF programs in the profiled run");
        println!(
            "{:<24} {:>12} {:>10} {:>12}",
            "program", "runs", "ns/run", "ns per MB"
        );
        for (name, runs, ns) in &p.programs {
            println!(
                "{:<24} {:>12} {:>10.0} {:>12.0}",
                name,
                runs,
                *ns as f64 / (*runs).max(1) as f64,
                *ns as f64 / mb
            );
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_interval_brackets_the_median() {
        let v: Vec<f64> = (0..25).map(f64::from).collect();
        let (lo, hi) = super::median_ci95(&v);
        // n = 25: 12.5 -/+ 4.9 -> order statistics 7 and 18.
        assert_eq!((lo, hi), (7.0, 18.0));
        assert!(super::median_ci95(&v[..5]).0.is_nan());
    }

    #[test]
    fn parses_h2load_summary() {
        let out = "starting benchmark...\nfinished in 1.23s, 325.20 req/s, 325.33MB/s\nrequests: 400 total";
        assert_eq!(super::parse_h2load(out), Some((1.23, 325.20, 325.33)));
        assert_eq!(
            super::parse_h2load("finished in 2.00s, 10.00 req/s, 1.50GB/s"),
            Some((2.0, 10.0, 1500.0))
        );
        assert_eq!(
            super::parse_h2load("finished in 183.21ms, 1637.46 req/s, 1.60GB/s"),
            Some((0.18321, 1637.46, 1600.0))
        );
        assert_eq!(super::parse_h2load("nothing"), None);
    }
}
