//! The runner: one `Vm` per invocation builds (or finds) the artefacts and the userland
//! archive once, then boots kernels for report, test and ad-hoc command runs.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::kernels::{self, Kernel};
use super::report::{Report, guest_release, parse_report, report_script};
use super::testrun::{Case, TestRun, list_all_cases, parse_cases, select, test_script};
use super::{Common, Mode, Suite, image, qemu};

/// Bound for a guest's first output line. Under TCG a boot reaches its command in 5 to
/// 30 s (two guests at a time, the HTTP/2 archive unpacked); one that has printed nothing
/// by this bound hangs before anything of ours runs.
pub(super) const FIRST_LINE_SECS: u64 = 180;

/// How often a stalled boot is booted again. A stall is a QEMU/guest boot that hung or
/// died before its command started, not a result; a second one in a row is reported as the
/// boot's failure.
const STALL_RETRIES: u32 = 1;

/// Quotes words for the guest's busybox sh (one word: passed through as a script line).
fn shell_words(words: &[String]) -> String {
    if words.len() == 1 {
        return words[0].clone();
    }
    words
        .iter()
        .map(|w| sh_quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}

fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Shared state of one invocation: artefacts, the userland archive, kernels prepared. Boots
/// take `&self`, so several can run at once (`vm ci --jobs`); the archives built on first use
/// sit behind locks.
pub struct Vm {
    pub common: Common,
    pub art: image::Artefacts,
    /// Every case of every suite.
    pub cases: Vec<Case>,
    pub userland: Vec<u8>,
    /// Shared libraries in `userland` (the HTTP/2 archive adds only the others).
    pub userland_libs: BTreeSet<PathBuf>,
    /// The HTTP/2 suite's archive, built by the first boot that needs it.
    h2_part: Mutex<Option<Vec<u8>>>,
    kernel_parts: Mutex<BTreeMap<String, Vec<u8>>>,
    /// `target/vm`: logs and scratch files.
    pub work: PathBuf,
}

impl Vm {
    pub fn new(root: &Path, common: &Common) -> Result<Vm> {
        let art = if common.no_build {
            find_artefacts(root)?
        } else {
            build_artefacts(root)?
        };
        let work = root.join("target/vm");
        fs::create_dir_all(&work)?;
        let cases = list_all_cases(&art)?;
        let t = Instant::now();
        let (userland, userland_libs) = image::userland(&art, &work)?;
        eprintln!(
            "vm: userland archive {:.1} MiB in {:.1} s ({} e2e cases: {})",
            userland.len() as f64 / 1048576.0,
            t.elapsed().as_secs_f64(),
            cases.len(),
            Suite::ALL
                .iter()
                .map(|s| format!(
                    "{} {}",
                    cases.iter().filter(|c| c.suite == *s).count(),
                    s.name()
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(Vm {
            common: common.clone(),
            art,
            cases,
            userland,
            userland_libs,
            h2_part: Mutex::new(None),
            kernel_parts: Mutex::new(BTreeMap::new()),
            work,
        })
    }

    pub fn kernel(&self, alias: &str) -> Result<Kernel> {
        kernels::prepare(kernels::spec(alias)?, false)
    }

    pub fn kernels(&self, aliases: &[String]) -> Result<Vec<Kernel>> {
        if aliases.is_empty() {
            kernels::KERNELS
                .iter()
                .map(|s| kernels::prepare(s, false))
                .collect()
        } else {
            aliases.iter().map(|a| self.kernel(a)).collect()
        }
    }

    /// One boot running `cmd` (quoted for busybox sh) in /tmp, the agent's directory on
    /// PATH.
    pub fn run_command(&self, k: &Kernel, cmd: &[String]) -> Result<qemu::BootResult> {
        let dir = self
            .art
            .whoclosed
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let script = format!(
            "export PATH={}:$PATH\ncd /tmp\n{}\n",
            dir.display(),
            shell_words(cmd)
        );
        self.boot(k, "run", &script, &[])
    }

    /// The HTTP/2 suite's archive (built once).
    fn h2_part(&self) -> Result<Vec<u8>> {
        let mut cached = lock(&self.h2_part);
        if let Some(p) = &*cached {
            return Ok(p.clone());
        }
        let t = Instant::now();
        let p = image::h2_part(&self.art, &self.work, &self.userland_libs)?;
        eprintln!(
            "vm: HTTP/2 suite archive {:.1} MiB in {:.1} s",
            p.len() as f64 / 1048576.0,
            t.elapsed().as_secs_f64()
        );
        *cached = Some(p.clone());
        Ok(p)
    }

    /// The kernel's modules archive (built once per kernel).
    fn kernel_part(&self, k: &Kernel) -> Result<Vec<u8>> {
        let mut parts = lock(&self.kernel_parts);
        if let Some(p) = parts.get(&k.alias) {
            return Ok(p.clone());
        }
        let p = image::kernel_part(k)?;
        parts.insert(k.alias.clone(), p.clone());
        Ok(p)
    }

    /// One boot running `script` (busybox sh) with its output on ttyS1; `extra` archives
    /// are unpacked over the base userland. Its initramfs and logs are named after the
    /// kernel and `what`, so boots of different names can run at once.
    pub fn boot(
        &self,
        k: &Kernel,
        what: &str,
        script: &str,
        extra: &[&[u8]],
    ) -> Result<qemu::BootResult> {
        let kernel_part = self.kernel_part(k)?;
        let name = format!("{}-{what}", k.alias);
        let logs = self.work.join("logs").join(&name);
        let initrd = self.work.join(format!("initrd-{name}.cpio"));
        let mut f = fs::File::create(&initrd)?;
        f.write_all(&self.userland)?;
        for part in extra {
            f.write_all(part)?;
        }
        f.write_all(&kernel_part)?;
        f.write_all(&image::command_part(script))?;
        drop(f);
        let verbose = self.common.verbose;
        eprintln!("vm: booting {} for {what}", k.label());
        let mut on_line = |l: &str| {
            if verbose {
                eprintln!("  {name} | {l}");
            } else if let Some(rest) = l.strip_prefix("@@CASE-END ") {
                eprintln!("  {name}: {rest}");
            }
        };
        let bounds = qemu::Bounds {
            total: Duration::from_secs(self.common.timeout),
            first_line: Duration::from_secs(FIRST_LINE_SECS.min(self.common.timeout)),
        };
        let mut stalls = 0;
        let b = loop {
            let mut b = qemu::boot(k, &initrd, &logs, bounds, &mut on_line)?;
            b.stalls_before = stalls;
            if !b.stalled || stalls >= STALL_RETRIES {
                break b;
            }
            stalls += 1;
            // Keep the stalled boot's logs beside the next one's.
            let kept = logs.with_file_name(format!("{name}-stalled-{stalls}"));
            let _ = fs::remove_dir_all(&kept);
            fs::rename(&logs, &kept)?;
            eprintln!(
                "vm: {name} did not start its command ({:.0} s; console ends: {:?}); \
                 booting it again, logs of the stalled boot in {}",
                b.secs,
                b.console_tail(1),
                kept.display()
            );
        };
        let _ = fs::remove_file(&initrd);
        Ok(b)
    }

    pub fn report(&self, k: &Kernel) -> Result<Report> {
        let script = report_script(&self.art.whoclosed);
        let b = self.boot(k, "report", &script, &[])?;
        let mut r = parse_report(&b.output);
        for (m, mr) in &r.modes {
            fs::write(b.logs.join(format!("{}.stderr.txt", m.name())), &mr.stderr)?;
        }
        r.boot_secs = b.secs;
        r.guest_release = guest_release(&b.output);
        if let Some(e) = boot_error(&b, self.common.timeout) {
            r.error = Some(e);
        } else if b.exit.is_none() {
            r.error = Some(format!(
                "the guest did not finish; console:\n{}",
                b.console_tail(30)
            ));
        }
        Ok(r)
    }

    /// One boot running the cases of `suites` that match `filter`.
    pub fn test(
        &self,
        k: &Kernel,
        mode: Mode,
        suites: &[Suite],
        filter: &[String],
    ) -> Result<TestRun> {
        let cases = select(&self.cases, suites, filter);
        if cases.is_empty() {
            let names: Vec<String> = select(&self.cases, suites, &[])
                .into_iter()
                .map(|c| c.name)
                .collect();
            bail!(
                "no e2e case matches {filter:?} (cases of {:?}: {names:?})",
                suites.iter().map(|s| s.name()).collect::<Vec<_>>()
            );
        }
        let script = test_script(&self.art, mode, &cases);
        let h2 = if cases.iter().any(|c| c.suite == Suite::H2) {
            Some(self.h2_part()?)
        } else {
            None
        };
        let extra: Vec<&[u8]> = h2.iter().map(Vec::as_slice).collect();
        let b = self.boot(k, &format!("test-{}", mode.name()), &script, &extra)?;
        let mut t = TestRun {
            kernel: k.clone(),
            mode,
            cases: parse_cases(&b.output, &cases),
            boot_secs: b.secs,
            stalls: 0,
            error: None,
        };
        t.stalls = b.stalls_before;
        if let Some(e) = boot_error(&b, self.common.timeout) {
            t.error = Some(e);
        } else if b.exit.is_none() {
            t.error = Some(format!(
                "the guest did not finish; console:\n{}",
                b.console_tail(30)
            ));
        }
        Ok(t)
    }
}

/// Why a boot ended early, with what the guest printed last; `None` for a boot that ran
/// to its end.
pub(super) fn boot_error(b: &qemu::BootResult, timeout: u64) -> Option<String> {
    let retried = match b.stalls_before {
        0 => String::new(),
        n => format!(" (after {n} stalled boot(s))"),
    };
    if b.stalled {
        Some(format!(
            "the guest did not start its command (hung for {} s or died booting, after \
             {:.0} s){retried}; logs in {}; console ends:\n{}",
            FIRST_LINE_SECS.min(timeout),
            b.secs,
            b.logs.display(),
            b.console_tail(15)
        ))
    } else if b.timed_out {
        Some(format!(
            "timed out after {timeout} s{retried}; logs in {}; output ends:\n{}\nconsole ends:\n{}",
            b.logs.display(),
            b.output_tail(15),
            b.console_tail(5)
        ))
    } else {
        None
    }
}

/// A lock whose holder panicked still guards a usable cache.
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The agent as the container image has it (a static release build, shared with `cargo
/// xtask image build`), and `cargo test --no-run` of the e2e binaries (which builds
/// wc-peer; their paths from cargo's JSON messages). A release agent, not the debug one the
/// host's tests run: under TCG the debug agent took 12.0 s to load its programs on 5.10
/// and the release one 6.2 s, and every case starts at least one.
pub fn build_artefacts(root: &Path) -> Result<image::Artefacts> {
    let whoclosed = crate::image::static_binary(root)?;
    let args = [
        "test", "--no-run", "-p", "tests", "--test", "e2e_tcp", "--test", "e2e_h2",
    ];
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(root)
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cargo {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str())
        else {
            continue;
        };
        found.insert(name.to_string(), PathBuf::from(exe));
    }
    let get = |n: &str| {
        found
            .get(n)
            .cloned()
            .with_context(|| format!("cargo built no executable named {n}"))
    };
    Ok(image::Artefacts {
        whoclosed,
        e2e_tcp: get("e2e_tcp")?,
        e2e_h2: get("e2e_h2")?,
        wc_peer: get("wc-peer")?,
    })
}

/// `--no-build`: the newest artefacts in the target directory.
pub fn find_artefacts(root: &Path) -> Result<image::Artefacts> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("debug");
    let newest_test = |name: &str| -> Result<PathBuf> {
        let prefix = format!("{name}-");
        let mut found: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(target.join("deps"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && !n.contains('.'))
            })
            .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
            .collect();
        found.sort();
        found
            .pop()
            .map(|(_, p)| p)
            .with_context(|| format!("no {name} test binary; build it with `cargo test --no-run`"))
    };
    let art = image::Artefacts {
        whoclosed: crate::image::static_binary_path(root),
        wc_peer: target.join("wc-peer"),
        e2e_tcp: newest_test("e2e_tcp")?,
        e2e_h2: newest_test("e2e_h2")?,
    };
    for p in [&art.whoclosed, &art.wc_peer] {
        if !p.exists() {
            bail!("{} missing; build first or drop --no-build", p.display());
        }
    }
    Ok(art)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("a-b/c=d"), "a-b/c=d");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_words(&["echo".into(), "a b".into()]), "echo 'a b'");
        assert_eq!(shell_words(&["uname -a; ls".into()]), "uname -a; ls");
    }
}
