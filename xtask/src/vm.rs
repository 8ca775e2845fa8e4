//! `cargo xtask vm`: boots stock Debian kernels under QEMU (TCG) and runs whoclosed inside.
//!
//! * `kernels`: download (once, into `~/.cache/whoclosed/kernels/`) and list them.
//! * `report`: per kernel, `whoclosed trace --probe-report` in every probe mode, plus the
//!   verifier's view of every loaded program (bpftool + fdinfo).
//! * `test`: the privileged end-to-end tests in one kernel with one forced probe mode: the
//!   `tcp` suite (`tests/tests/e2e_tcp.rs`) and the `h2` suite (`tests/tests/e2e_h2.rs`;
//!   its nghttp2 cases, the grpcio ones skip in guests, see [`Suite::H2`]).
//! * `matrix`: `report` on every kernel, then `test` for every mode that loaded; prints the
//!   tables and, with `--write-doc`, writes `docs/kernel-support.md`.
//! * `ci`: the quick subset: report boots of 5.10 and 6.1 (every mode must load, no program
//!   may come near the verifier's limit), then the end-to-end tests once per probe mode, the
//!   HTTP/2 ones on 5.10 and 6.1 (see `CI_REPORTS`, `CI_SET`). Two boots at a time
//!   (`--jobs`) with the release agent: 382 s on the 2-core CI VM, against 928 s one after
//!   another with the debug agent.
//! * `run`: any command in a guest (debugging).
//!
//! Each guest is one boot of `qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m 1G
//! -smp 2` with a busybox initramfs carrying the workspace's binaries at their host paths;
//! logs of every boot stay in `target/vm/logs/`.

mod doc;
mod host;
mod image;
mod kernels;
mod print;
mod qemu;
mod report;
mod runner;
mod testrun;
mod verifier;

use std::{
    collections::BTreeMap,
    fs,
    path::Path,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use anyhow::{Result, bail};
use clap::{Args, Subcommand, ValueEnum};

use doc::Matrix;
use kernels::Kernel;
use print::{check_runs, print_report, print_tests};
use runner::Vm;

#[derive(Args)]
#[command(
    after_help = "Kernels: 5.10 (bullseye), 6.1 (bookworm), 6.12 (trixie), newest \
    (the higher of trixie-backports and sid), Debian `cloud` flavour, cached in \
    ~/.cache/whoclosed/kernels/ ($WHOCLOSED_VM_CACHE overrides ~/.cache/whoclosed). \
    Boot logs: target/vm/logs/."
)]
pub struct VmArgs {
    #[command(subcommand)]
    cmd: VmCmd,
}

#[derive(Subcommand)]
enum VmCmd {
    /// Download the kernels that are not cached yet and list them.
    Kernels {
        /// Re-resolve every kernel against the mirror and download newer packages.
        #[arg(long)]
        refresh: bool,
    },
    /// Which probe modes load on each kernel, and the verifier's view of every program.
    Report {
        /// Kernels to boot (repeatable; default: all).
        #[arg(long = "kernel", short)]
        kernels: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Run the end-to-end tests inside one kernel with one forced probe mode.
    Test {
        /// Kernel: 5.10, 6.1, 6.12 or newest.
        #[arg(long, short, default_value = "6.12")]
        kernel: String,
        #[arg(long, short, value_enum, default_value_t = Mode::Fentry)]
        mode: Mode,
        /// Test suites (repeatable; default: both).
        #[arg(long = "suite", short, value_enum)]
        suites: Vec<Suite>,
        /// Only the cases whose name contains this (like libtest's filter; repeatable);
        /// `=NAME` selects the case named exactly NAME.
        #[arg(long)]
        filter: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
    /// `report` on every kernel, then `test` in every mode that loaded; prints the tables.
    Matrix {
        /// Kernels (repeatable; default: all).
        #[arg(long = "kernel", short)]
        kernels: Vec<String>,
        /// Modes (repeatable; default: all three).
        #[arg(long = "mode", short, value_enum)]
        modes: Vec<Mode>,
        /// Test suites (repeatable; default: both).
        #[arg(long = "suite", short, value_enum)]
        suites: Vec<Suite>,
        /// Only the cases whose name contains this (repeatable); `=NAME`: exactly NAME.
        #[arg(long)]
        filter: Vec<String>,
        /// Also write the result to docs/kernel-support.md.
        #[arg(long)]
        write_doc: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Quick subset for CI (about 6 minutes on 2 cores): report boots of 5.10 and 6.1
    /// (every mode must load; on 6.1 no program may take over half the verifier's
    /// instruction limit), then the end-to-end tests once per mode: tracepoint on 5.10 and
    /// fentry on 6.1 (both suites), kprobe on the newest kernel (tcp suite).
    Ci {
        /// Boots at a time. Each guest is TCG-emulated with 2 vCPUs, but mostly waits on
        /// one (the verifier, the agent's start, the cases' timeouts), so two guests on a
        /// 2-core host finish well before two in a row.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=8))]
        jobs: u8,
        #[command(flatten)]
        common: Common,
    },
    /// Run a shell command inside a guest, e.g. `run -k 5.10 -- whoclosed trace --probe-report`.
    Run {
        /// Kernel: 5.10, 6.1, 6.12 or newest.
        #[arg(long, short, default_value = "6.12")]
        kernel: String,
        /// Command line (run by busybox `sh -c`; the agent's directory is on PATH).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// Bound for one boot, in seconds (QEMU is killed and the boot reported as timed out).
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Echo the guest's output live.
    #[arg(long, short)]
    verbose: bool,
    /// Do not build: use the artefacts already in the target directory.
    #[arg(long)]
    no_build: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Mode {
    Fentry,
    Kprobe,
    Tracepoint,
}

const ALL_MODES: [Mode; 3] = [Mode::Fentry, Mode::Kprobe, Mode::Tracepoint];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Fentry => "fentry",
            Mode::Kprobe => "kprobe",
            Mode::Tracepoint => "tracepoint",
        }
    }
}

/// A test binary of the `tests` crate that the guests run, one process per case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Suite {
    /// `tests/tests/e2e_tcp.rs`: TCP endings with `wc-peer`, iptables in the router.
    Tcp,
    /// `tests/tests/e2e_h2.rs`: HTTP/2 endings. The guest carries nghttp2's `nghttpd`,
    /// `nghttp`, `h2load` (and `ss`), so those cases run; it carries no Python, so the
    /// grpcio cases skip there with the reason (host-only, see docs/kernel-support.md).
    /// The tcpdump/tshark cross-checks (`h2_wire.rs`) are host-only too.
    H2,
}

impl Suite {
    const ALL: [Suite; 2] = [Suite::Tcp, Suite::H2];

    fn name(self) -> &'static str {
        match self {
            Suite::Tcp => "tcp",
            Suite::H2 => "h2",
        }
    }

    /// The given suites, or all of them.
    fn or_all(suites: &[Suite]) -> Vec<Suite> {
        if suites.is_empty() {
            Suite::ALL.to_vec()
        } else {
            suites.to_vec()
        }
    }
}

/// CI: kernels whose report boot must show every probe mode loading: 5.10, the oldest and
/// strictest verifier, and 6.1, the oldest that reports what its verifier processed
/// (`verified_insns`, 5.16+), which must stay within [`VERIFIED_INSNS_CI_MAX`]. (6.1's
/// report boot left CI for a while, when it took about 150 s under TCG; since the HTTP/2
/// walker runs in tail-called programs of its own it takes about 40 s.) `vm matrix` reports
/// every kernel...
const CI_REPORTS: &[&str] = &["5.10", "6.1"];

/// The most instructions any program's verification may process in a CI report boot: half
/// the verifier's limit of 1,000,000. The packet entry program once took 813,574 on 6.1,
/// an unnoticed step or two from not loading there at all; the largest program now takes
/// about 68,000.
const VERIFIED_INSNS_CI_MAX: u64 = 500_000;

/// ...and end-to-end runs (kernel, mode, suites): each mode once, the oldest kernel with the
/// least evidence (no tcp_close hook), 6.1 in the mode `auto` picks there, the newest
/// verifier. The HTTP/2 suite runs on 5.10, the oldest verifier the in-kernel HTTP/2 walker
/// has workarounds for, and on 6.1. On 6.1, seven of the nine TCP cases: the two that
/// depend on no probe mode and take longest under TCG (agent restart, addresses in two
/// namespace sets) run in the other two boots.
/// A filter is a list of name substrings (`=NAME`: that name exactly), as `vm test
/// --filter`; empty: every case.
const CI_SET: &[(&str, Mode, &[Suite], &[&str])] = &[
    ("5.10", Mode::Tracepoint, &Suite::ALL, &[]),
    (
        "6.1",
        Mode::Fentry,
        &Suite::ALL,
        &[
            // tcp suite
            "blackhole_timeout",
            // exactly: as a substring it also selects grpc_client_closes_channel, a
            // host-only case that only skips in a guest
            "=client_close",
            "ipv6_client_close",
            "middlebox_reset",
            "server_close",
            "server_process_killed",
            // h2 suite (its grpcio cases are host-only)
            "h2load_through_agent",
            "nghttp_",
            "plain_tcp_not_h2",
            "many_frames_in_one_segment",
            "gso_packets_over_64k_are_walked",
        ],
    ),
    ("newest", Mode::Kprobe, &[Suite::Tcp], &[]),
];

pub fn run(root: &Path, args: &VmArgs) -> Result<()> {
    host::check_host_tools()?;
    match &args.cmd {
        VmCmd::Kernels { refresh } => list_kernels(*refresh),
        VmCmd::Report { kernels, common } => report(root, kernels, common),
        VmCmd::Test {
            kernel,
            mode,
            suites,
            filter,
            common,
        } => test(root, kernel, *mode, &Suite::or_all(suites), filter, common),
        VmCmd::Matrix {
            kernels,
            modes,
            suites,
            filter,
            write_doc,
            common,
        } => matrix(
            root,
            kernels,
            modes,
            &Suite::or_all(suites),
            filter,
            *write_doc,
            common,
        ),
        VmCmd::Ci { jobs, common } => ci(root, common, usize::from(*jobs)),
        VmCmd::Run {
            kernel,
            cmd,
            common,
        } => run_command(root, kernel, cmd, common),
    }
}

fn list_kernels(refresh: bool) -> Result<()> {
    for spec in kernels::KERNELS {
        let k = kernels::prepare(spec, refresh)?;
        println!(
            "{:<7} {:<17} {:<28} {}",
            k.alias,
            k.suite,
            k.release,
            k.image.display()
        );
    }
    Ok(())
}

fn report(root: &Path, kernels: &[String], common: &Common) -> Result<()> {
    let vm = Vm::new(root, common)?;
    let mut failed = false;
    for k in vm.kernels(kernels)? {
        let r = vm.report(&k)?;
        print_report(&k, &r);
        failed |= r.error.is_some();
    }
    if failed {
        bail!("a report boot failed (see above)");
    }
    Ok(())
}

fn test(
    root: &Path,
    kernel: &str,
    mode: Mode,
    suites: &[Suite],
    filter: &[String],
    common: &Common,
) -> Result<()> {
    let vm = Vm::new(root, common)?;
    let k = vm.kernel(kernel)?;
    let t = vm.test(&k, mode, suites, filter)?;
    let runs = vec![t];
    print_tests(&runs);
    check_runs(&runs)
}

fn matrix(
    root: &Path,
    kernels: &[String],
    modes: &[Mode],
    suites: &[Suite],
    filter: &[String],
    write_doc: bool,
    common: &Common,
) -> Result<()> {
    let started = Instant::now();
    let vm = Vm::new(root, common)?;
    let modes = if modes.is_empty() {
        ALL_MODES.to_vec()
    } else {
        modes.to_vec()
    };
    let mut m = Matrix::default();
    for k in vm.kernels(kernels)? {
        let rep = vm.report(&k)?;
        print_report(&k, &rep);
        for &mode in &modes {
            if rep.loaded(mode) {
                m.tests.push(vm.test(&k, mode, suites, filter)?);
            }
        }
        m.reports.push((k, rep));
    }
    m.modes = modes;
    m.total_secs = started.elapsed().as_secs_f64();
    m.command = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    print_tests(&m.tests);
    let md = m.markdown(root)?;
    let out = vm.work.join("kernel-support.md");
    fs::write(&out, &md)?;
    fs::write(vm.work.join("matrix.json"), m.json().to_string())?;
    if write_doc {
        fs::write(root.join("docs/kernel-support.md"), &md)?;
        eprintln!("vm: wrote docs/kernel-support.md");
    } else {
        eprintln!("vm: wrote {}", out.display());
    }
    println!("matrix: {:.0} s in all", m.total_secs);
    check_runs(&m.tests)
}

/// One boot of `vm ci`.
enum CiJob {
    Report(&'static str),
    Test(
        &'static str,
        Mode,
        &'static [Suite],
        &'static [&'static str],
    ),
}

/// What a `vm ci` boot gave.
enum CiDone {
    Report(Kernel, report::Report),
    Test(testrun::TestRun),
}

fn ci(root: &Path, common: &Common, jobs: usize) -> Result<()> {
    let started = Instant::now();
    let vm = Vm::new(root, common)?;
    // The test boots first, longest first (the 5.10 run has the most cases), then the
    // shorter report boots fill the gaps: with two lanes the boots end close together.
    let mut queue: Vec<CiJob> = CI_SET
        .iter()
        .map(|&(alias, mode, suites, filter)| CiJob::Test(alias, mode, suites, filter))
        .collect();
    queue.extend(CI_REPORTS.iter().map(|&alias| CiJob::Report(alias)));
    let done = run_parallel(&queue, jobs, |job| -> Result<CiDone> {
        Ok(match *job {
            CiJob::Report(alias) => {
                let k = vm.kernel(alias)?;
                let r = vm.report(&k)?;
                CiDone::Report(k, r)
            }
            CiJob::Test(alias, mode, suites, filter) => {
                let k = vm.kernel(alias)?;
                let filter: Vec<String> = filter.iter().map(|f| f.to_string()).collect();
                CiDone::Test(vm.test(&k, mode, suites, &filter)?)
            }
        })
    });
    let mut bad = Vec::new();
    let mut runs = Vec::new();
    let mut reports = Vec::new();
    for d in done {
        match d? {
            CiDone::Report(k, r) => reports.push((k, r)),
            CiDone::Test(t) => runs.push(t),
        }
    }
    // Printed in the order of CI_REPORTS and CI_SET, whichever boot ended first.
    for (k, r) in &reports {
        print_report(k, r);
        for m in ALL_MODES {
            if !r.loaded(m) {
                bad.push(format!(
                    "{}: --probe-mode {} does not load",
                    k.alias,
                    m.name()
                ));
            }
        }
        bad.extend(verifier_headroom(&k.alias, r));
    }
    print_tests(&runs);
    println!(
        "vm ci: {:.0} s ({jobs} boot(s) at a time)",
        started.elapsed().as_secs_f64()
    );
    if !bad.is_empty() {
        bail!("{}", bad.join("; "));
    }
    check_runs(&runs)
}

/// Runs `f` on every item with up to `jobs` threads, each taking the next item in order;
/// the results come back in the items' order.
fn run_parallel<T: Sync, R: Send>(items: &[T], jobs: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, items.len().max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = f(item);
                    *runner::lock(&slots[i]) = Some(r);
                }
            });
        }
    });
    slots
        .into_iter()
        .filter_map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect()
}

/// Programs of a report boot whose verification processed more than
/// [`VERIFIED_INSNS_CI_MAX`] instructions (each program once, from any mode).
fn verifier_headroom(alias: &str, r: &report::Report) -> Vec<String> {
    let mut worst: BTreeMap<&str, u64> = BTreeMap::new();
    for m in r.modes.values() {
        for p in &m.progs {
            if let Some(v) = p.verified_insns {
                let e = worst.entry(p.name.as_str()).or_default();
                *e = (*e).max(v);
            }
        }
    }
    worst
        .into_iter()
        .filter(|(_, v)| *v > VERIFIED_INSNS_CI_MAX)
        .map(|(name, v)| {
            format!(
                "{alias}: {name} took {v} verifier instructions, over the {VERIFIED_INSNS_CI_MAX} \
                 CI allows (half the kernel's limit)"
            )
        })
        .collect()
}

fn run_command(root: &Path, kernel: &str, cmd: &[String], common: &Common) -> Result<()> {
    let mut common = common.clone();
    common.verbose = true;
    let vm = Vm::new(root, &common)?;
    let k = vm.kernel(kernel)?;
    let b = vm.run_command(&k, cmd)?;
    if let Some(e) = runner::boot_error(&b, common.timeout) {
        bail!("{e}");
    }
    match b.exit {
        Some(0) => Ok(()),
        Some(n) => bail!("guest command exited with {n}"),
        None => bail!(
            "the guest did not report an exit code; console:\n{}",
            b.console_tail(30)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{VERIFIED_INSNS_CI_MAX, report, run_parallel, verifier_headroom};

    #[test]
    fn run_parallel_returns_every_result_in_the_items_order() {
        let items: Vec<u64> = (0..7).collect();
        for jobs in [1, 2, 3, 16] {
            // Later items finish first: the order must come from the slots, not from the
            // order the threads finished in.
            let got = run_parallel(&items, jobs, |&i| {
                std::thread::sleep(std::time::Duration::from_millis(7 - i));
                (i, std::thread::current().id())
            });
            let order: Vec<u64> = got.iter().map(|(i, _)| *i).collect();
            assert_eq!(order, items, "jobs {jobs}");
            let threads: std::collections::HashSet<_> = got.iter().map(|(_, t)| *t).collect();
            assert!(
                threads.len() <= jobs.min(items.len()),
                "jobs {jobs}: {threads:?}"
            );
            if jobs > 1 {
                assert!(threads.len() > 1, "jobs {jobs}: one thread did everything");
            }
        }
        assert!(run_parallel(&[] as &[u8], 2, |_| ()).is_empty());
    }

    fn prog(name: &str, verified: Option<u64>) -> report::ProgStat {
        report::ProgStat {
            name: name.into(),
            verified_insns: verified,
            ..Default::default()
        }
    }

    #[test]
    fn verifier_headroom_flags_only_programs_over_the_bound() {
        let mut r = report::Report::default();
        let m = report::ModeReport {
            progs: vec![
                prog("skb_ingress", Some(813_574)),
                prog("skb_h2_in", Some(VERIFIED_INSNS_CI_MAX)),
                prog("inet_sock_set_state", None),
            ],
            ..Default::default()
        };
        r.modes.insert(super::Mode::Fentry, m.clone());
        r.modes.insert(super::Mode::Kprobe, m);
        let bad = verifier_headroom("6.1", &r);
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].contains("skb_ingress took 813574"), "{bad:?}");
        assert!(verifier_headroom("5.10", &report::Report::default()).is_empty());
    }
}
