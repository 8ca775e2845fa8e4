//! What `cargo xtask vm` prints: the report of one kernel, the table of test runs.

use anyhow::{Result, bail};

use super::kernels::Kernel;
use super::report::Report;
use super::testrun::TestRun;
use super::verifier::summarize_error;

pub fn print_report(k: &Kernel, r: &Report) {
    println!(
        "\n== {} [{}] report boot {:.0} s",
        k.label(),
        if r.guest_release.is_empty() {
            &k.release
        } else {
            &r.guest_release
        },
        r.boot_secs
    );
    if let Some(e) = &r.error {
        println!("   boot failed: {e}");
    }
    for (mode, m) in &r.modes {
        let state = if r.loaded(*mode) {
            "loads"
        } else {
            "does not load"
        };
        println!(
            "   {:<10} {state} (rc {}, report {:.1} s{})",
            mode.name(),
            m.rc,
            m.report_secs,
            m.ready_secs
                .map(|s| format!(", agent ready in {s:.1} s"))
                .unwrap_or_default()
        );
        if m.rc != 0 {
            println!("      {}", summarize_error(&m.stderr));
        }
        if let Some(progs) = m.json.as_ref().and_then(|j| j["programs"].as_array()) {
            for p in progs {
                if p["status"] == "failed" {
                    println!(
                        "      {} {}: {}",
                        p["program"].as_str().unwrap_or("?"),
                        p["status"].as_str().unwrap_or("?"),
                        summarize_error(p["error"].as_str().unwrap_or(""))
                    );
                }
            }
        }
        for p in &m.progs {
            println!(
                "      {:<22} {:<12} verified {:>6}  xlated {:>5} insns  jited {:>6} B",
                p.name,
                p.prog_type,
                p.verified_insns
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "-".into()),
                p.xlated_insns,
                p.jited_bytes
            );
        }
    }
}

/// The table of test runs (`passed` counts cases that ran their assertions; skipped ones
/// are counted apart, with their reasons below), then the output of every failed case.
pub fn print_tests(runs: &[TestRun]) {
    println!();
    println!(
        "{:<30} {:<11} {:>7} {:>4} {:>8}  cases",
        "kernel", "mode", "passed", "skip", "boot s"
    );
    for t in runs {
        println!(
            "{:<30} {:<11} {:>3}/{:<3} {:>4} {:>8.0}  {}",
            t.kernel.label(),
            t.mode.name(),
            t.verified(),
            t.cases.len(),
            t.skipped(),
            t.boot_secs,
            t.cases
                .iter()
                .map(|c| format!(
                    "{}:{}{:.0}s",
                    c.name,
                    if c.skipped.is_some() {
                        "SKIPPED "
                    } else if c.passed {
                        ""
                    } else if c.timed_out {
                        "TIMED OUT "
                    } else if c.ran {
                        "FAILED "
                    } else if c.started {
                        "UNFINISHED "
                    } else {
                        "NOT RUN "
                    },
                    c.secs
                ))
                .collect::<Vec<_>>()
                .join(" ")
        );
        if t.stalls > 0 {
            println!(
                "    note: {} boot(s) stalled before their command and were booted again",
                t.stalls
            );
        }
        if let Some(e) = &t.error {
            println!("    error: {e}");
        }
    }
    let mut reasons: Vec<(&str, Vec<&str>)> = Vec::new();
    for c in runs.iter().flat_map(|t| &t.cases) {
        if let Some(why) = &c.skipped {
            match reasons.iter_mut().find(|(w, _)| w == why) {
                Some((_, names)) if names.contains(&c.name.as_str()) => {}
                Some((_, names)) => names.push(&c.name),
                None => reasons.push((why, vec![&c.name])),
            }
        }
    }
    for (why, names) in reasons {
        println!(
            "
skipped {}: {why}",
            names.join(", ")
        );
    }
    for t in runs {
        for c in t.cases.iter().filter(|c| c.started && !c.passed) {
            println!(
                "\n---- {} {} {} output:\n{}",
                t.kernel.label(),
                t.mode.name(),
                c.name,
                c.output.trim_end()
            );
        }
    }
}

pub fn check_runs(runs: &[TestRun]) -> Result<()> {
    let bad: Vec<String> = runs
        .iter()
        .filter(|t| !t.ok())
        .map(|t| format!("{} {}", t.kernel.alias, t.mode.name()))
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        bail!("end-to-end tests failed in: {}", bad.join(", "))
    }
}
