//! The end-to-end boot: the case list, the guest script (one test process per case,
//! between `@@CASE-START` / `@@CASE-END` markers) and the parsing of its output.

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::{Context as _, Result};

use super::kernels::Kernel;
use super::report::{kv, kv_f64};
use super::{Mode, image};

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

pub fn test_script(art: &image::Artefacts, mode: Mode, cases: &[String]) -> String {
    let mut s = format!(
        "echo \"@@KERNEL $(uname -r)\"\n\
         export WHOCLOSED_BIN={w} WHOCLOSED_E2E=require WHOCLOSED_PROBE_MODE={m} RUST_BACKTRACE=1\n\
         up() {{ cut -d' ' -f1 /proc/uptime; }}\n\
         cd /tmp\nfail=0\n",
        w = art.whoclosed.display(),
        m = mode.name()
    );
    for c in cases {
        let _ = write!(
            s,
            "t0=$(up)\necho \"@@CASE-START {c}\"\n\
             {e} --exact {c} --test-threads=1\n\
             rc=$?\n[ $rc = 0 ] || fail=1\n\
             echo \"@@CASE-END {c} rc=$rc t0=$t0 t1=$(up)\"\n",
            e = art.e2e.display(),
        );
    }
    s.push_str("echo \"@@DONE\"\nexit $fail\n");
    s
}

#[derive(Clone)]
pub struct CaseResult {
    pub name: String,
    pub passed: bool,
    pub ran: bool,
    pub secs: f64,
    pub output: String,
}

pub struct TestRun {
    pub kernel: Kernel,
    pub mode: Mode,
    pub cases: Vec<CaseResult>,
    pub boot_secs: f64,
    pub error: Option<String>,
}

impl TestRun {
    pub fn passed(&self) -> usize {
        self.cases.iter().filter(|c| c.passed).count()
    }
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.cases.iter().all(|c| c.passed)
    }
}

pub fn parse_cases(output: &str, cases: &[String]) -> Vec<CaseResult> {
    let mut results: Vec<CaseResult> = cases
        .iter()
        .map(|c| CaseResult {
            name: c.clone(),
            passed: false,
            ran: false,
            secs: 0.0,
            output: String::new(),
        })
        .collect();
    let mut current: Option<usize> = None;
    for l in output.lines() {
        if let Some(rest) = l.strip_prefix("@@CASE-START ") {
            current = results.iter().position(|c| c.name == rest.trim());
        } else if let Some(rest) = l.strip_prefix("@@CASE-END ") {
            let name = rest.split_whitespace().next().unwrap_or("");
            if let Some(c) = results.iter_mut().find(|c| c.name == name) {
                c.ran = true;
                c.passed = kv(l, "rc") == Some("0");
                c.secs = kv_f64(l, "t1").unwrap_or(0.0) - kv_f64(l, "t0").unwrap_or(0.0);
            }
            current = None;
        } else if let Some(i) = current {
            results[i].output.push_str(l);
            results[i].output.push('\n');
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::report::guest_release;

    #[test]
    fn case_markers() {
        let out = "@@KERNEL 6.1\n@@CASE-START a\nrunning 1 test\n@@CASE-END a rc=0 t0=1.50 t1=3.00\n\
                   @@CASE-START b\npanicked\n@@CASE-END b rc=101 t0=3.00 t1=4.00\n";
        let c = parse_cases(out, &["a".into(), "b".into(), "c".into()]);
        assert!(c[0].passed && c[0].ran && (c[0].secs - 1.5).abs() < 1e-9);
        assert!(!c[1].passed && c[1].ran && c[1].output == "panicked\n");
        assert!(!c[2].ran);
        assert_eq!(guest_release(out), "6.1");
    }
}
