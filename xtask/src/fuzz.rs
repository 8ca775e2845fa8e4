//! `cargo xtask fuzz`: runs a cargo-fuzz target of `fuzz/` for a bounded time and reports
//! how many inputs it executed and whether it crashed.
//!
//! cargo-fuzz is installed from crates.io when missing; the fuzz build needs the nightly
//! toolchain (sanitizers), which `cargo xtask setup` already requires for the eBPF build.
//! Inputs that crash are left by libFuzzer in `fuzz/artifacts/<target>/`; the corpus grows
//! in `fuzz/corpus/<target>/`, and `fuzz/seeds/<target>/` (checked in) is read-only.
use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// How long libFuzzer runs, in seconds (`-max_total_time`; the build comes on top).
    #[arg(long, default_value_t = 60)]
    pub secs: u64,
    /// Fuzz target: a file name in `fuzz/fuzz_targets/`, without `.rs`.
    #[arg(long, default_value = "h2_frames", conflicts_with = "all")]
    pub target: String,
    /// Run every target in `fuzz/fuzz_targets/`, one after the other, `--secs` each (for CI:
    /// `cargo xtask fuzz --all --secs 60`); fails if any crashed.
    #[arg(long)]
    pub all: bool,
    /// Extra libFuzzer options, after `--` (e.g. `-- -max_len=512 -seed=1`).
    #[arg(last = true)]
    pub libfuzzer_args: Vec<String>,
}

/// `cargo` through the rustup proxy on PATH (not `$CARGO`, which names the stable toolchain's
/// binary and would not understand `+nightly`).
fn rustup_cargo() -> Command {
    let mut c = Command::new("cargo");
    // The outer `cargo run` of the xtask must not pin the toolchain of the inner one.
    c.env_remove("RUSTUP_TOOLCHAIN");
    c
}

fn cargo_fuzz_installed() -> bool {
    rustup_cargo()
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn setup_cargo_fuzz() -> Result<()> {
    if cargo_fuzz_installed() {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz");
    crate::run(rustup_cargo().args(["install", "--locked", "cargo-fuzz"]))?;
    if !cargo_fuzz_installed() {
        bail!(
            "cargo-fuzz was installed but `cargo fuzz --version` still fails (is ~/.cargo/bin on PATH?)"
        );
    }
    Ok(())
}

fn check_nightly() -> Result<()> {
    let ok = Command::new("rustc")
        .args(["+nightly", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!("cargo-fuzz needs a nightly toolchain: `rustup toolchain install nightly`");
    }
    Ok(())
}

/// What libFuzzer said about the run, read from its stderr.
#[derive(Debug, Default, PartialEq)]
struct Stats {
    /// `stat::number_of_executed_units`, else the last `#N` status line or `Done N runs`.
    execs: Option<u64>,
    /// `stat::average_exec_per_sec`, else the last `exec/s:` of a status line.
    execs_per_sec: Option<u64>,
    /// `Done N runs in S second(s)`.
    secs: Option<u64>,
    /// Files libFuzzer wrote for failing inputs (crash-, oom-, timeout-, leak-, …).
    artifacts: Vec<String>,
    /// A libFuzzer or sanitizer error report was printed.
    error_report: bool,
}

impl Stats {
    fn feed(&mut self, line: &str) {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
            self.execs = v.trim().parse().ok().or(self.execs);
        } else if let Some(v) = line.strip_prefix("stat::average_exec_per_sec:") {
            self.execs_per_sec = v.trim().parse().ok().or(self.execs_per_sec);
        } else if let Some(rest) = line.strip_prefix("Done ") {
            // "Done 123456 runs in 61 second(s)"
            let mut words = rest.split_whitespace();
            if let (Some(n), Some("runs"), Some("in"), Some(s)) =
                (words.next(), words.next(), words.next(), words.next())
            {
                self.execs = self.execs.or(n.parse().ok());
                self.secs = s.parse().ok();
            }
        } else if let Some(rest) = line.strip_prefix('#') {
            // "#123456\tDONE   cov: 412 ft: 1234 corp: 88/2Kb lim: 4096 exec/s: 101234 rss: 61Mb"
            let mut words = rest.split_whitespace();
            if let Some(n) = words.next().and_then(|n| n.parse::<u64>().ok()) {
                if self.secs.is_none() {
                    self.execs = Some(n);
                }
                let mut words = rest.split_whitespace().skip_while(|w| *w != "exec/s:");
                if let Some(rate) = words.nth(1).and_then(|r| r.parse().ok()) {
                    self.execs_per_sec = Some(rate);
                }
            }
        } else if let Some((_, path)) = line.split_once("Test unit written to ") {
            self.artifacts.push(path.trim().to_string());
        }
        if line.contains("ERROR: libFuzzer:")
            || line.contains("ERROR: AddressSanitizer")
            || line.starts_with("SUMMARY: libFuzzer:")
        {
            self.error_report = true;
        }
    }

    fn crashes(&self) -> usize {
        self.artifacts.len()
    }
}

/// Names of the targets in `fuzz/fuzz_targets/`, sorted.
fn all_targets(root: &Path) -> Result<Vec<String>> {
    let dir = root.join("fuzz").join("fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".rs").map(str::to_string)
        })
        .collect();
    names.sort();
    Ok(names)
}

pub fn run(root: &Path, args: &FuzzArgs) -> Result<()> {
    if !args.all {
        return run_one(root, args, &args.target);
    }
    let targets = all_targets(root)?;
    if targets.is_empty() {
        bail!("no fuzz targets in fuzz/fuzz_targets/");
    }
    let mut failed = Vec::new();
    for t in &targets {
        if let Err(e) = run_one(root, args, t) {
            eprintln!("xtask: fuzz target {t}: {e:#}");
            failed.push(t.as_str());
        }
    }
    if !failed.is_empty() {
        bail!("fuzz target(s) failed: {}", failed.join(", "));
    }
    println!(
        "fuzz: {} target(s) ran {} s each without a crash",
        targets.len(),
        args.secs
    );
    Ok(())
}

fn run_one(root: &Path, args: &FuzzArgs, target: &str) -> Result<()> {
    let fuzz_dir = root.join("fuzz");
    let target_src = fuzz_dir.join("fuzz_targets").join(format!("{target}.rs"));
    if !target_src.is_file() {
        bail!(
            "no fuzz target {:?} ({} not found)",
            target,
            target_src.display()
        );
    }
    check_nightly()?;
    setup_cargo_fuzz()?;

    // First directory: the corpus libFuzzer adds to; the seeds after it are only read.
    let corpus = fuzz_dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let seeds = fuzz_dir.join("seeds").join(target);

    let mut cmd = rustup_cargo();
    cmd.current_dir(&fuzz_dir)
        .args(["+nightly", "fuzz", "run", target])
        .arg(&corpus);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    cmd.arg("--")
        .arg(format!("-max_total_time={}", args.secs))
        .arg("-print_final_stats=1")
        .args(&args.libfuzzer_args)
        .stderr(Stdio::piped());
    eprintln!("xtask: fuzzing {} for {} s", target, args.secs);
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let mut stats = Stats::default();
    if let Some(stderr) = child.stderr.take() {
        // Pass libFuzzer's (and cargo's) output through while reading the figures from it.
        for line in BufReader::new(stderr).split(b'\n') {
            let line = line.context("reading cargo fuzz output")?;
            let line = String::from_utf8_lossy(&line);
            eprintln!("{line}");
            stats.feed(&line);
        }
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    let wall = started.elapsed().as_secs();

    let execs = stats
        .execs
        .map_or_else(|| "unknown".to_string(), |n| n.to_string());
    let rate = stats
        .execs_per_sec
        .or_else(|| Some(stats.execs? / stats.secs.filter(|s| *s > 0)?))
        .map_or_else(|| "unknown".to_string(), |r| r.to_string());
    let duration = match stats.secs {
        Some(s) => format!("{s} s fuzzing"),
        None => "stopped before the time limit".to_string(),
    };
    println!(
        "fuzz {}: {execs} executions, {rate} exec/s, {} crash(es) ({duration}, {wall} s in all with the build)",
        target,
        stats.crashes(),
    );
    for artifact in &stats.artifacts {
        println!(
            "  crash input: {artifact}\n  reproduce: (cd fuzz && cargo +nightly fuzz run {} {artifact})",
            target
        );
    }
    if stats.crashes() > 0 || stats.error_report {
        bail!(
            "fuzz target {} crashed ({} input(s) saved)",
            target,
            stats.crashes()
        );
    }
    if !status.success() {
        bail!("cargo fuzz run {} failed: {status}", target);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Stats;

    fn feed(lines: &str) -> Stats {
        let mut s = Stats::default();
        lines.lines().for_each(|l| s.feed(l));
        s
    }

    #[test]
    fn clean_run_with_final_stats() {
        let s = feed(
            "INFO: Seed: 1234\n\
             #2\tINITED cov: 10 ft: 10 corp: 1/1b exec/s: 0 rss: 30Mb\n\
             #1048576\tpulse  cov: 300 ft: 900 corp: 80/2Kb lim: 4096 exec/s: 349525 rss: 60Mb\n\
             #12345678\tDONE   cov: 412 ft: 1234 corp: 88/2Kb lim: 4096 exec/s: 102880 rss: 61Mb\n\
             Done 12345678 runs in 120 second(s)\n\
             stat::number_of_executed_units: 12345679\n\
             stat::average_exec_per_sec:     102880\n\
             stat::new_units_added:          77\n",
        );
        assert_eq!(s.execs, Some(12_345_679));
        assert_eq!(s.execs_per_sec, Some(102_880));
        assert_eq!(s.secs, Some(120));
        assert_eq!(s.crashes(), 0);
        assert!(!s.error_report);
    }

    #[test]
    fn crash_report() {
        let s = feed(
            "#4096\tpulse  cov: 100 ft: 200 corp: 20/300b exec/s: 2048 rss: 40Mb\n\
             thread '<unnamed>' panicked at src/h2/mod.rs:1:1:\n\
             ==4242== ERROR: libFuzzer: deadly signal\n\
             SUMMARY: libFuzzer: deadly signal\n\
             MS: 1 ChangeBit-; base unit: 0000\n\
             artifact_prefix='/work/main/fuzz/artifacts/h2_frames/'; Test unit written to /work/main/fuzz/artifacts/h2_frames/crash-da39a3ee\n\
             Base64: AAAA\n",
        );
        assert_eq!(s.execs, Some(4096));
        assert_eq!(s.execs_per_sec, Some(2048));
        assert_eq!(
            s.artifacts,
            ["/work/main/fuzz/artifacts/h2_frames/crash-da39a3ee"]
        );
        assert!(s.error_report);
    }
}
