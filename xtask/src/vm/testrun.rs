//! The end-to-end boot: the case list of each suite's test binary, the guest script (one
//! test process per case, between `@@CASE-START` / `@@CASE-END` markers) and the parsing
//! of its output.

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use super::kernels::Kernel;
use super::report::{kv, kv_f64};
use super::{Mode, Suite, image};

/// Set in the guest: the HTTP/2 gates skip the grpcio cases there with the reason (the
/// guest carries no Python), even under `WHOCLOSED_E2E=require`.
const IN_VM_ENV: &str = "WHOCLOSED_IN_VM";

/// One test case of one suite's binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    pub suite: Suite,
    pub name: String,
}

/// Test names from `<e2e> --list`.
pub fn list_cases(e2e: &Path) -> Result<Vec<String>> {
    let out = Command::new(e2e)
        .args(["--list", "--format", "terse"])
        .output()
        .with_context(|| format!("{} --list", e2e.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect())
}

/// The cases of every suite, in suite order. Names must be unique across suites: the
/// markers, the filters and the tables name cases without their suite.
pub fn list_all_cases(art: &image::Artefacts) -> Result<Vec<Case>> {
    let mut all: Vec<Case> = Vec::new();
    for suite in Suite::ALL {
        for name in list_cases(art.e2e(suite))? {
            if let Some(other) = all.iter().find(|c| c.name == name) {
                bail!(
                    "test case {name} is in both the {} and the {} suite; rename one",
                    other.suite.name(),
                    suite.name()
                );
            }
            all.push(Case { suite, name });
        }
    }
    Ok(all)
}

/// The cases of `suites` that one of `filter` selects (all without a filter): a name
/// containing it, or, written `=NAME`, the name NAME exactly.
pub fn select(all: &[Case], suites: &[Suite], filter: &[String]) -> Vec<Case> {
    let selects = |f: &String, name: &str| match f.strip_prefix('=') {
        Some(exact) => name == exact,
        None => name.contains(f.as_str()),
    };
    all.iter()
        .filter(|c| suites.contains(&c.suite))
        .filter(|c| filter.is_empty() || filter.iter().any(|f| selects(f, &c.name)))
        .cloned()
        .collect()
}

/// Bound for one case in the guest. The slowest case takes about 30 s under TCG; one
/// still running after this hangs, and is killed so that the boot goes on to the next case
/// and reports this one by name (instead of the whole boot timing out with no result).
pub const CASE_TIMEOUT_SECS: u64 = 300;

/// After a killed case: what it had started (its agent and peers, its namespaces), so that
/// the next case starts clean. iproute2's `ip` by path: busybox sh prefers its own applet.
const CLEANUP: &str = "killall -9 whoclosed wc-peer nghttpd nghttp h2load 2>/dev/null; \
                       /usr/sbin/ip -all netns delete 2>/dev/null";

pub fn test_script(art: &image::Artefacts, mode: Mode, cases: &[Case]) -> String {
    let mut s = format!(
        "echo \"@@KERNEL $(uname -r)\"\n\
         export WHOCLOSED_BIN={w} WHOCLOSED_E2E=require WHOCLOSED_PROBE_MODE={m} RUST_BACKTRACE=1\n\
         export {IN_VM_ENV}=1\n\
         up() {{ cut -d' ' -f1 /proc/uptime; }}\n\
         cd /tmp\nfail=0\n",
        w = art.whoclosed.display(),
        m = mode.name()
    );
    for c in cases {
        let _ = write!(
            s,
            "t0=$(up)\necho \"@@CASE-START {n}\"\n\
             timeout -k 10 {CASE_TIMEOUT_SECS} {e} --exact {n} --test-threads=1\n\
             rc=$?\n[ $rc = 0 ] || fail=1\n\
             echo \"@@CASE-END {n} rc=$rc t0=$t0 t1=$(up)\"\n\
             [ $rc = 143 ] || [ $rc = 137 ] && {{ {CLEANUP}; }}\n",
            n = c.name,
            e = art.e2e(c.suite).display(),
        );
    }
    s.push_str("echo \"@@DONE\"\nexit $fail\n");
    s
}

#[derive(Clone)]
pub struct CaseResult {
    pub name: String,
    pub suite: Suite,
    pub passed: bool,
    /// Its end marker was seen.
    pub ran: bool,
    /// Its start marker was seen (and, without `ran`, no end: the boot stopped in it).
    pub started: bool,
    /// Killed by the guest's [`CASE_TIMEOUT_SECS`] bound.
    pub timed_out: bool,
    /// The test passed by skipping: the reason from its `SKIP <name>: <why>` line.
    pub skipped: Option<String>,
    pub secs: f64,
    pub output: String,
}

impl CaseResult {
    /// Ran its assertions and passed (not skipped).
    pub fn verified(&self) -> bool {
        self.passed && self.skipped.is_none()
    }
}

pub struct TestRun {
    pub kernel: Kernel,
    pub mode: Mode,
    pub cases: Vec<CaseResult>,
    pub boot_secs: f64,
    /// Boots of this run that stalled before the guest's command and were booted again.
    pub stalls: u32,
    pub error: Option<String>,
}

impl TestRun {
    /// Cases that passed, skipped ones included.
    pub fn passed(&self) -> usize {
        self.cases.iter().filter(|c| c.passed).count()
    }
    /// Cases that ran their assertions and passed.
    pub fn verified(&self) -> usize {
        self.cases.iter().filter(|c| c.verified()).count()
    }
    pub fn skipped(&self) -> usize {
        self.cases.iter().filter(|c| c.skipped.is_some()).count()
    }
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.cases.iter().all(|c| c.passed)
    }
}

pub fn parse_cases(output: &str, cases: &[Case]) -> Vec<CaseResult> {
    let mut results: Vec<CaseResult> = cases
        .iter()
        .map(|c| CaseResult {
            name: c.name.clone(),
            suite: c.suite,
            passed: false,
            ran: false,
            started: false,
            timed_out: false,
            skipped: None,
            secs: 0.0,
            output: String::new(),
        })
        .collect();
    let mut current: Option<usize> = None;
    for l in output.lines() {
        if let Some(rest) = l.strip_prefix("@@CASE-START ") {
            current = results.iter().position(|c| c.name == rest.trim());
            if let Some(i) = current {
                results[i].started = true;
            }
        } else if let Some(rest) = l.strip_prefix("@@CASE-END ") {
            let name = rest.split_whitespace().next().unwrap_or("");
            if let Some(c) = results.iter_mut().find(|c| c.name == name) {
                c.ran = true;
                c.passed = kv(l, "rc") == Some("0");
                c.secs = kv_f64(l, "t1").unwrap_or(0.0) - kv_f64(l, "t0").unwrap_or(0.0);
                // busybox `timeout` sends TERM (the shell sees 143), then KILL (137).
                c.timed_out = matches!(kv(l, "rc"), Some("143" | "137"))
                    && c.secs >= CASE_TIMEOUT_SECS as f64 - 1.0;
                if !c.passed {
                    c.skipped = None;
                }
            }
            current = None;
        } else if let Some(i) = current {
            let c = &mut results[i];
            // The test's stderr line can land behind libtest's `test <name> ... ` on stdout.
            let marker = format!("SKIP {}: ", c.name);
            if let Some(at) = l.find(&marker) {
                c.skipped = Some(l[at + marker.len()..].trim().to_string());
            }
            c.output.push_str(l);
            c.output.push('\n');
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::report::guest_release;

    fn cases(names: &[&str]) -> Vec<Case> {
        names
            .iter()
            .map(|n| Case {
                suite: Suite::Tcp,
                name: n.to_string(),
            })
            .collect()
    }

    #[test]
    fn case_markers() {
        let out = "@@KERNEL 6.1\n@@CASE-START a\nrunning 1 test\n@@CASE-END a rc=0 t0=1.50 t1=3.00\n\
                   @@CASE-START b\npanicked\n@@CASE-END b rc=101 t0=3.00 t1=4.00\n";
        let c = parse_cases(out, &cases(&["a", "b", "c"]));
        assert!(c[0].passed && c[0].ran && (c[0].secs - 1.5).abs() < 1e-9);
        assert!(c[0].verified());
        assert!(!c[1].passed && c[1].ran && c[1].output == "panicked\n");
        assert!(!c[2].ran);
        assert_eq!(guest_release(out), "6.1");
    }

    #[test]
    fn a_killed_case_and_an_unfinished_one_are_told_apart() {
        let out = format!(
            "@@CASE-START a\nwaiting\n@@CASE-END a rc=143 t0=1.00 t1={}\n\
             @@CASE-START b\n@@CASE-END b rc=137 t0=1.00 t1=2.00\n\
             @@CASE-START c\nstuck here\n",
            1.0 + CASE_TIMEOUT_SECS as f64
        );
        let c = parse_cases(&out, &cases(&["a", "b", "c", "d"]));
        assert!(c[0].timed_out && c[0].ran && !c[0].passed);
        // Killed, but not by the bound: an ordinary failure.
        assert!(!c[1].timed_out && c[1].ran && !c[1].passed);
        assert!(c[2].started && !c[2].ran && c[2].output == "stuck here\n");
        assert!(!c[3].started && !c[3].ran);
    }

    #[test]
    fn every_case_runs_under_the_guest_bound() {
        let art = image::Artefacts {
            whoclosed: "/w/whoclosed".into(),
            e2e_tcp: "/w/e2e_tcp".into(),
            e2e_h2: "/w/e2e_h2".into(),
            wc_peer: "/w/wc-peer".into(),
        };
        let s = test_script(&art, Mode::Kprobe, &cases(&["a", "b"]));
        let bounded = format!("timeout -k 10 {CASE_TIMEOUT_SECS} ");
        assert_eq!(s.matches(&bounded).count(), 2, "{s}");
        assert_eq!(s.matches("--exact").count(), 2);
    }

    #[test]
    fn skipped_cases_are_told_apart() {
        let out = "@@CASE-START g\ntest g ... SKIP g: no python here\nok\n@@CASE-END g rc=0 t0=1 t1=2\n\
                   @@CASE-START h\nSKIP g: another case's line\n@@CASE-END h rc=0 t0=2 t1=3\n\
                   @@CASE-START f\nSKIP f: why\npanicked\n@@CASE-END f rc=101 t0=3 t1=4\n";
        let c = parse_cases(out, &cases(&["g", "h", "f"]));
        assert_eq!(c[0].skipped.as_deref(), Some("no python here"));
        assert!(c[0].passed && !c[0].verified());
        assert!(c[1].skipped.is_none() && c[1].verified());
        assert!(c[2].skipped.is_none() && !c[2].passed);
        let run = TestRun {
            kernel: crate::vm::kernels::Kernel::default(),
            mode: Mode::Fentry,
            cases: c,
            boot_secs: 0.0,
            stalls: 0,
            error: None,
        };
        assert_eq!(
            (run.passed(), run.verified(), run.skipped(), run.ok()),
            (2, 1, 1, false)
        );
    }

    #[test]
    fn selection_by_suite_and_filter() {
        let all = vec![
            Case {
                suite: Suite::Tcp,
                name: "client_close".into(),
            },
            Case {
                suite: Suite::H2,
                name: "nghttp_ipv6_close".into(),
            },
            Case {
                suite: Suite::H2,
                name: "grpc_client_closes_channel".into(),
            },
        ];
        assert_eq!(select(&all, &[Suite::H2], &[]).len(), 2);
        assert_eq!(select(&all, &Suite::ALL, &["close".into()]).len(), 3);
        assert_eq!(select(&all, &[Suite::Tcp], &["ipv6".into()]).len(), 0);
        let exact = select(&all, &Suite::ALL, &["=client_close".into()]);
        assert_eq!(
            exact.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["client_close"]
        );
        assert!(select(&all, &Suite::ALL, &["=close".into()]).is_empty());
    }
}
