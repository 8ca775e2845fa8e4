//! `cargo xtask vm`: boots stock Debian kernels under QEMU (TCG) and runs whoclosed inside.
//!
//! * `kernels`: download (once, into `~/.cache/whoclosed/kernels/`) and list them.
//! * `report`: per kernel, `whoclosed trace --probe-report` in every probe mode, plus the
//!   verifier's view of every loaded program (bpftool + fdinfo).
//! * `test`: the privileged end-to-end tests (`tests/tests/e2e_tcp.rs`) in one kernel with
//!   one forced probe mode.
//! * `matrix`: `report` on every kernel, then `test` for every mode that loaded; prints the
//!   tables and, with `--write-doc`, writes `docs/kernel-support.md`.
//! * `ci`: the quick subset (about 5 minutes): report boots of the two oldest kernels, then
//!   the end-to-end tests once per probe mode (see `CI_REPORTS`, `CI_SET`).
//! * `run`: any command in a guest (debugging).
//!
//! Each guest is one boot of `qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m 1G
//! -smp 2` with a busybox initramfs carrying the workspace's binaries at their host paths;
//! logs of every boot stay in `target/vm/logs/`.

mod image;
mod kernels;
mod qemu;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use kernels::Kernel;

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
        /// Only the cases whose name contains this (like libtest's filter; repeatable).
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
        /// Only the cases whose name contains this (repeatable).
        #[arg(long)]
        filter: Vec<String>,
        /// Also write the result to docs/kernel-support.md.
        #[arg(long)]
        write_doc: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Quick subset for CI (about 5 minutes): report boots of 5.10 and 6.1 (every mode must
    /// load), then the end-to-end tests once per mode: tracepoint on 5.10, fentry on 6.1,
    /// kprobe on the newest kernel.
    Ci {
        #[command(flatten)]
        common: Common,
    },
    /// Run a shell command inside a guest, e.g. `run -k 5.10 -- whoclosed trace --probe-report`.
    Run {
        /// Kernel: 5.10, 6.1, 6.12 or newest.
        #[arg(long, short, default_value = "6.12")]
        kernel: String,
        /// Command line (run by busybox `sh -c`; the workspace's target/debug is on PATH).
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

/// CI: kernels whose report boot must show every probe mode loading (the oldest
/// verifiers are the strict ones)...
const CI_REPORTS: &[&str] = &["5.10", "6.1"];

/// ...and end-to-end runs (kernel, mode): each mode once, the oldest kernel with the least
/// evidence (no tcp_close hook), 6.1 in the mode `auto` picks there, the newest verifier.
const CI_SET: &[(&str, Mode)] = &[
    ("5.10", Mode::Tracepoint),
    ("6.1", Mode::Fentry),
    ("newest", Mode::Kprobe),
];

pub fn run(root: &Path, args: &VmArgs) -> Result<()> {
    check_host_tools()?;
    match &args.cmd {
        VmCmd::Kernels { refresh } => {
            for spec in kernels::KERNELS {
                let k = kernels::prepare(spec, *refresh)?;
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
        VmCmd::Report { kernels, common } => {
            let mut vm = Vm::new(root, common)?;
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
        VmCmd::Test {
            kernel,
            mode,
            filter,
            common,
        } => {
            let mut vm = Vm::new(root, common)?;
            let k = vm.kernel(kernel)?;
            let t = vm.test(&k, *mode, filter)?;
            let runs = vec![t];
            print_tests(&runs);
            check_runs(&runs)
        }
        VmCmd::Matrix {
            kernels,
            modes,
            filter,
            write_doc,
            common,
        } => {
            let started = Instant::now();
            let mut vm = Vm::new(root, common)?;
            let modes = if modes.is_empty() {
                ALL_MODES.to_vec()
            } else {
                modes.clone()
            };
            let mut m = Matrix::default();
            for k in vm.kernels(kernels)? {
                let rep = vm.report(&k)?;
                print_report(&k, &rep);
                for &mode in &modes {
                    if rep.loaded(mode) {
                        m.tests.push(vm.test(&k, mode, filter)?);
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
            if *write_doc {
                fs::write(root.join("docs/kernel-support.md"), &md)?;
                eprintln!("vm: wrote docs/kernel-support.md");
            } else {
                eprintln!("vm: wrote {}", out.display());
            }
            println!("matrix: {:.0} s in all", m.total_secs);
            check_runs(&m.tests)
        }
        VmCmd::Ci { common } => {
            let started = Instant::now();
            let mut vm = Vm::new(root, common)?;
            let mut bad = Vec::new();
            for alias in CI_REPORTS {
                let k = vm.kernel(alias)?;
                let r = vm.report(&k)?;
                print_report(&k, &r);
                for m in ALL_MODES {
                    if !r.loaded(m) {
                        bad.push(format!("{alias}: --probe-mode {} does not load", m.name()));
                    }
                }
            }
            let mut runs = Vec::new();
            for (alias, mode) in CI_SET {
                let k = vm.kernel(alias)?;
                runs.push(vm.test(&k, *mode, &[])?);
            }
            print_tests(&runs);
            println!("vm ci: {:.0} s", started.elapsed().as_secs_f64());
            if !bad.is_empty() {
                bail!("{}", bad.join("; "));
            }
            check_runs(&runs)
        }
        VmCmd::Run {
            kernel,
            cmd,
            common,
        } => {
            let mut common = common.clone();
            common.verbose = true;
            let mut vm = Vm::new(root, &common)?;
            let k = vm.kernel(kernel)?;
            let dir = vm
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
            let b = vm.boot(&k, "run", &script)?;
            if b.timed_out {
                bail!(
                    "timed out after {} s; logs in {}",
                    common.timeout,
                    b.logs.display()
                );
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
    }
}

/// Runs a command, showing its output only if it fails.
fn run_quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Debian packages this needs on the host beyond `cargo xtask setup`'s.
const VM_DEBS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("depmod", "kmod"),
    ("xz", "xz-utils"),
    ("zstd", "zstd"),
    ("lz4", "lz4"),
    ("strip", "binutils"),
    ("dpkg-deb", "dpkg"),
    ("apt-get", "apt"),
];

fn have(tool: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(tool).exists())
}

/// Installs the missing host packages (QEMU, static busybox, decompressors).
fn check_host_tools() -> Result<()> {
    let mut missing: Vec<&str> = VM_DEBS
        .iter()
        .filter(|(tool, _)| !have(tool))
        .map(|(_, deb)| *deb)
        .collect();
    // A dynamically linked busybox would need its libraries in the guest too.
    if have("busybox") && !is_static("/usr/bin/busybox") && !is_static("/bin/busybox") {
        missing.push("busybox-static");
    }
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("vm: installing {missing:?}");
    run_quiet(Command::new("apt-get").args(["update", "-qq"]))?;
    run_quiet(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn is_static(path: &str) -> bool {
    Command::new("ldd")
        .arg(path)
        .output()
        .is_ok_and(|o| !o.status.success())
}

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

/// Shared state of one invocation: artefacts, the userland archive, kernels prepared.
struct Vm {
    common: Common,
    art: image::Artefacts,
    cases: Vec<String>,
    userland: Vec<u8>,
    kernel_parts: BTreeMap<String, Vec<u8>>,
    /// `target/vm`: logs and scratch files.
    work: PathBuf,
    boots: u32,
}

impl Vm {
    fn new(root: &Path, common: &Common) -> Result<Vm> {
        let art = if common.no_build {
            find_artefacts(root)?
        } else {
            build_artefacts(root)?
        };
        let work = root.join("target/vm");
        fs::create_dir_all(&work)?;
        let cases = list_cases(&art.e2e)?;
        let t = Instant::now();
        let userland = image::userland(&art, &work)?;
        eprintln!(
            "vm: userland archive {:.1} MiB in {:.1} s ({} e2e cases)",
            userland.len() as f64 / 1048576.0,
            t.elapsed().as_secs_f64(),
            cases.len()
        );
        Ok(Vm {
            common: common.clone(),
            art,
            cases,
            userland,
            kernel_parts: BTreeMap::new(),
            work,
            boots: 0,
        })
    }

    fn kernel(&self, alias: &str) -> Result<Kernel> {
        kernels::prepare(kernels::spec(alias)?, false)
    }

    fn kernels(&self, aliases: &[String]) -> Result<Vec<Kernel>> {
        if aliases.is_empty() {
            kernels::KERNELS
                .iter()
                .map(|s| kernels::prepare(s, false))
                .collect()
        } else {
            aliases.iter().map(|a| self.kernel(a)).collect()
        }
    }

    /// One boot running `script` (busybox sh) with its output on ttyS1.
    fn boot(&mut self, k: &Kernel, what: &str, script: &str) -> Result<qemu::BootResult> {
        if !self.kernel_parts.contains_key(&k.alias) {
            let part = image::kernel_part(k)?;
            self.kernel_parts.insert(k.alias.clone(), part);
        }
        self.boots += 1;
        let name = format!("{}-{what}", k.alias);
        let logs = self.work.join("logs").join(&name);
        let initrd = self.work.join("initrd.cpio");
        let mut f = fs::File::create(&initrd)?;
        f.write_all(&self.userland)?;
        f.write_all(&self.kernel_parts[&k.alias])?;
        f.write_all(&image::command_part(script))?;
        drop(f);
        let verbose = self.common.verbose;
        eprintln!("vm: booting {} for {what}", k.label());
        let mut on_line = |l: &str| {
            if verbose {
                eprintln!("  | {l}");
            } else if let Some(rest) = l.strip_prefix("@@CASE-END ") {
                eprintln!("  {rest}");
            }
        };
        let b = qemu::boot(
            k,
            &initrd,
            &logs,
            Duration::from_secs(self.common.timeout),
            &mut on_line,
        )?;
        let _ = fs::remove_file(&initrd);
        Ok(b)
    }

    fn report(&mut self, k: &Kernel) -> Result<Report> {
        let script = report_script(&self.art.whoclosed);
        let b = self.boot(k, "report", &script)?;
        let mut r = parse_report(&b.output);
        for (m, mr) in &r.modes {
            fs::write(b.logs.join(format!("{}.stderr.txt", m.name())), &mr.stderr)?;
        }
        r.boot_secs = b.secs;
        r.guest_release = guest_release(&b.output);
        if b.timed_out {
            r.error = Some(format!(
                "timed out after {} s; logs in {}",
                self.common.timeout,
                b.logs.display()
            ));
        } else if b.exit.is_none() {
            r.error = Some(format!(
                "the guest did not finish; console:\n{}",
                b.console_tail(30)
            ));
        }
        Ok(r)
    }

    fn test(&mut self, k: &Kernel, mode: Mode, filter: &[String]) -> Result<TestRun> {
        let cases: Vec<String> = self
            .cases
            .iter()
            .filter(|c| filter.is_empty() || filter.iter().any(|f| c.contains(f.as_str())))
            .cloned()
            .collect();
        if cases.is_empty() {
            bail!("no e2e case matches {filter:?} (cases: {:?})", self.cases);
        }
        let script = test_script(&self.art, mode, &cases);
        let b = self.boot(k, &format!("test-{}", mode.name()), &script)?;
        let mut t = TestRun {
            kernel: k.clone(),
            mode,
            cases: parse_cases(&b.output, &cases),
            boot_secs: b.secs,
            error: None,
        };
        if b.timed_out {
            t.error = Some(format!(
                "timed out after {} s; logs in {}",
                self.common.timeout,
                b.logs.display()
            ));
        } else if b.exit.is_none() {
            t.error = Some(format!(
                "the guest did not finish; console:\n{}",
                b.console_tail(30)
            ));
        }
        Ok(t)
    }
}

/// `cargo build` of the agent and `cargo test --no-run` of the e2e binary (which builds
/// wc-peer); paths from cargo's JSON messages.
fn build_artefacts(root: &Path) -> Result<image::Artefacts> {
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    for args in [
        &["build", "-p", "tracer-user", "--bin", "whoclosed"][..],
        &["test", "--no-run", "-p", "tests", "--test", "e2e_tcp"][..],
    ] {
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
    }
    let get = |n: &str| {
        found
            .get(n)
            .cloned()
            .with_context(|| format!("cargo built no executable named {n}"))
    };
    Ok(image::Artefacts {
        whoclosed: get("whoclosed")?,
        e2e: get("e2e_tcp")?,
        wc_peer: get("wc-peer")?,
    })
}

/// `--no-build`: the newest artefacts in the target directory.
fn find_artefacts(root: &Path) -> Result<image::Artefacts> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("debug");
    let mut e2e: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(target.join("deps"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("e2e_tcp-") && !n.contains('.'))
        })
        .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    e2e.sort();
    let art = image::Artefacts {
        whoclosed: target.join("whoclosed"),
        wc_peer: target.join("wc-peer"),
        e2e: e2e
            .pop()
            .map(|(_, p)| p)
            .context("no e2e_tcp test binary; build it with `cargo test --no-run`")?,
    };
    for p in [&art.whoclosed, &art.wc_peer] {
        if !p.exists() {
            bail!("{} missing; build first or drop --no-build", p.display());
        }
    }
    Ok(art)
}

/// Test names from `<e2e> --list`.
fn list_cases(e2e: &Path) -> Result<Vec<String>> {
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

fn guest_release(output: &str) -> String {
    output
        .lines()
        .find_map(|l| l.strip_prefix("@@KERNEL "))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// Guest script: in every mode, `--probe-report`, then (if it loaded) the agent itself
/// long enough to list its programs with bpftool and read their fdinfo
/// (`verified_insns`, kernels >= 5.16).
fn report_script(whoclosed: &Path) -> String {
    let w = whoclosed.display();
    let mut s = String::from(
        "echo \"@@KERNEL $(uname -r)\"\nexport RUST_LOG=info\nup() { cut -d' ' -f1 /proc/uptime; }\n",
    );
    for m in ALL_MODES {
        let m = m.name();
        let _ = write!(
            s,
            r#"
t0=$(up)
{w} trace --probe-mode {m} --probe-report >/tmp/report.json 2>/tmp/report.err
rc=$?
echo "@@REPORT {m} rc=$rc t0=$t0 t1=$(up)"
echo "@@JSON"
cat /tmp/report.json
echo "@@STDERR"
cat /tmp/report.err
if [ $rc = 0 ]; then
    t0=$(up)
    {w} trace --probe-mode {m} >/tmp/agent.out 2>/tmp/agent.err &
    pid=$!
    i=0
    while ! grep -q '"ready"' /tmp/agent.out && kill -0 $pid 2>/dev/null && [ $i -lt 1800 ]; do
        usleep 100000
        i=$((i+1))
    done
    echo "@@AGENT {m} t0=$t0 t1=$(up)"
    cat /tmp/agent.out
    echo "@@PROGS {m}"
    bpftool prog show --json
    echo
    echo "@@FDINFO {m}"
    for f in /proc/$pid/fdinfo/*; do
        if grep -q '^prog_id' $f 2>/dev/null; then echo "@@FD"; cat $f; fi
    done
    # SIGTERM: a background job of a non-interactive shell ignores SIGINT.
    kill -TERM $pid
    i=0
    while kill -0 $pid 2>/dev/null && [ $i -lt 300 ]; do
        usleep 100000
        i=$((i+1))
    done
    kill -KILL $pid 2>/dev/null
    wait $pid
    echo "@@AGENT-EXIT {m} rc=$?"
    cat /tmp/agent.err | tail -n 20
fi
"#
        );
    }
    s.push_str("echo \"@@DONE\"\n");
    s
}

fn test_script(art: &image::Artefacts, mode: Mode, cases: &[String]) -> String {
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

/// `key=value` out of a marker line.
fn kv<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

fn kv_f64(line: &str, key: &str) -> Option<f64> {
    kv(line, key).and_then(|v| v.parse().ok())
}

/// Splits output into (marker line, following lines) sections.
fn sections(output: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for l in output.lines() {
        if l.starts_with("@@") {
            out.push((l.to_string(), Vec::new()));
        } else if let Some(last) = out.last_mut() {
            last.1.push(l.to_string());
        }
    }
    out
}

#[derive(Default, Clone)]
struct ProgStat {
    id: u64,
    name: String,
    prog_type: String,
    /// bytes_xlated / 8: instructions after the verifier's rewrites.
    xlated_insns: u64,
    jited_bytes: u64,
    /// `verified_insns` from fdinfo: what the verifier processed (kernels >= 5.16).
    verified_insns: Option<u64>,
}

#[derive(Default, Clone)]
struct ModeReport {
    rc: i32,
    /// The `--probe-report` JSON (when it ran).
    json: Option<Value>,
    stderr: String,
    report_secs: f64,
    /// Time from agent start to its `ready` line.
    ready_secs: Option<f64>,
    progs: Vec<ProgStat>,
}

#[derive(Default)]
struct Report {
    modes: BTreeMap<Mode, ModeReport>,
    boot_secs: f64,
    guest_release: String,
    error: Option<String>,
}

impl Report {
    fn loaded(&self, mode: Mode) -> bool {
        self.modes.get(&mode).is_some_and(|m| {
            m.rc == 0
                && m.json
                    .as_ref()
                    .is_some_and(|j| j["probe_mode"] == mode.name())
        })
    }
}

fn mode_of(s: &str) -> Option<Mode> {
    ALL_MODES.into_iter().find(|m| m.name() == s)
}

fn parse_report(output: &str) -> Report {
    let mut r = Report::default();
    let mut cur: Option<Mode> = None;
    for (head, body) in sections(output) {
        let word: Vec<&str> = head.split_whitespace().collect();
        let text = body.join("\n");
        match word.first().copied() {
            Some("@@REPORT") => {
                cur = word.get(1).and_then(|m| mode_of(m));
                if let Some(m) = cur {
                    let e = r.modes.entry(m).or_default();
                    e.rc = kv(&head, "rc").and_then(|v| v.parse().ok()).unwrap_or(-1);
                    e.report_secs =
                        kv_f64(&head, "t1").unwrap_or(0.0) - kv_f64(&head, "t0").unwrap_or(0.0);
                }
            }
            Some("@@JSON") => {
                if let Some(m) = cur {
                    r.modes.entry(m).or_default().json = serde_json::from_str(&text).ok();
                }
            }
            Some("@@STDERR") => {
                if let Some(m) = cur {
                    r.modes.entry(m).or_default().stderr = text;
                }
            }
            Some("@@AGENT") => {
                if let Some(m) = cur {
                    r.modes.entry(m).or_default().ready_secs = Some(
                        kv_f64(&head, "t1").unwrap_or(0.0) - kv_f64(&head, "t0").unwrap_or(0.0),
                    );
                }
            }
            Some("@@PROGS") => {
                if let (Some(m), Ok(Value::Array(progs))) =
                    (cur, serde_json::from_str::<Value>(&text))
                {
                    let e = r.modes.entry(m).or_default();
                    e.progs = progs
                        .iter()
                        .map(|p| ProgStat {
                            id: p["id"].as_u64().unwrap_or(0),
                            name: p["name"].as_str().unwrap_or("?").to_string(),
                            prog_type: p["type"].as_str().unwrap_or("?").to_string(),
                            xlated_insns: p["bytes_xlated"].as_u64().unwrap_or(0) / 8,
                            jited_bytes: p["bytes_jited"].as_u64().unwrap_or(0),
                            verified_insns: None,
                        })
                        .collect();
                }
            }
            Some("@@FD") => {
                let field = |k: &str| {
                    body.iter().find_map(|l| {
                        l.strip_prefix(k)
                            .and_then(|r| r.trim_start().strip_prefix(':'))
                            .and_then(|v| v.trim().parse::<u64>().ok())
                    })
                };
                if let (Some(m), Some(id), Some(v)) =
                    (cur, field("prog_id"), field("verified_insns"))
                {
                    let e = r.modes.entry(m).or_default();
                    if let Some(p) = e.progs.iter_mut().find(|p| p.id == id) {
                        p.verified_insns = Some(v);
                    }
                }
            }
            _ => {}
        }
    }
    for m in r.modes.values_mut() {
        // Only the agent's own programs (bpftool lists every program in the guest).
        let names: Vec<String> = m
            .json
            .as_ref()
            .and_then(|j| j["programs"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p["program"].as_str().map(str::to_string))
            .collect();
        m.progs
            .retain(|p| names.iter().any(|n| n.starts_with(&p.name)));
        for p in &mut m.progs {
            if let Some(full) = names.iter().find(|n| n.starts_with(&p.name)) {
                p.name = full.clone();
            }
        }
    }
    r
}

#[derive(Clone)]
struct CaseResult {
    name: String,
    passed: bool,
    ran: bool,
    secs: f64,
    output: String,
}

struct TestRun {
    kernel: Kernel,
    mode: Mode,
    cases: Vec<CaseResult>,
    boot_secs: f64,
    error: Option<String>,
}

impl TestRun {
    fn passed(&self) -> usize {
        self.cases.iter().filter(|c| c.passed).count()
    }
    fn ok(&self) -> bool {
        self.error.is_none() && self.cases.iter().all(|c| c.passed)
    }
}

fn parse_cases(output: &str, cases: &[String]) -> Vec<CaseResult> {
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

fn print_report(k: &Kernel, r: &Report) {
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

fn print_tests(runs: &[TestRun]) {
    println!();
    println!(
        "{:<30} {:<11} {:>7} {:>8}  cases",
        "kernel", "mode", "passed", "boot s"
    );
    for t in runs {
        println!(
            "{:<30} {:<11} {:>3}/{:<3} {:>8.0}  {}",
            t.kernel.label(),
            t.mode.name(),
            t.passed(),
            t.cases.len(),
            t.boot_secs,
            t.cases
                .iter()
                .map(|c| format!(
                    "{}:{}{:.0}s",
                    c.name,
                    if c.passed {
                        ""
                    } else if c.ran {
                        "FAILED "
                    } else {
                        "NOT RUN "
                    },
                    c.secs
                ))
                .collect::<Vec<_>>()
                .join(" ")
        );
        if let Some(e) = &t.error {
            println!("    error: {e}");
        }
    }
    for t in runs {
        for c in t.cases.iter().filter(|c| c.ran && !c.passed) {
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

fn check_runs(runs: &[TestRun]) -> Result<()> {
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

#[derive(Default)]
struct Matrix {
    reports: Vec<(Kernel, Report)>,
    tests: Vec<TestRun>,
    modes: Vec<Mode>,
    total_secs: f64,
    command: String,
}

fn output_of(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

impl Matrix {
    fn test(&self, alias: &str, mode: Mode) -> Option<&TestRun> {
        self.tests
            .iter()
            .find(|t| t.kernel.alias == alias && t.mode == mode)
    }

    fn json(&self) -> Value {
        json!({
            "kernels": self.reports.iter().map(|(k, r)| json!({
                "alias": k.alias, "suite": k.suite, "version": k.version, "release": k.release,
                "boot_secs": r.boot_secs, "error": r.error,
                "modes": r.modes.iter().map(|(m, mr)| json!({
                    "mode": m.name(), "loaded": r.loaded(*m), "rc": mr.rc,
                    "report": mr.json, "stderr": mr.stderr,
                    "programs": mr.progs.iter().map(|p| json!({
                        "name": p.name, "type": p.prog_type, "xlated_insns": p.xlated_insns,
                        "jited_bytes": p.jited_bytes, "verified_insns": p.verified_insns,
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "tests": self.tests.iter().map(|t| json!({
                "kernel": t.kernel.alias, "mode": t.mode.name(), "boot_secs": t.boot_secs,
                "error": t.error,
                "cases": t.cases.iter().map(|c| json!({
                    "name": c.name, "passed": c.passed, "ran": c.ran, "secs": c.secs,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "total_secs": self.total_secs,
        })
    }

    fn markdown(&self, root: &Path) -> Result<String> {
        let mut s = String::new();
        let date = output_of(Command::new("date").args(["-u", "+%Y-%m-%d"]));
        let commit =
            output_of(
                Command::new("git")
                    .current_dir(root)
                    .args(["rev-parse", "--short", "HEAD"]),
            );
        let dirty = !output_of(Command::new("git").current_dir(root).args([
            "status",
            "--porcelain",
            "--untracked-files=no",
        ]))
        .is_empty();
        writeln!(s, "# Kernel support\n")?;
        writeln!(
            s,
            "Generated by `cargo xtask {}` on {date} (commit {commit}{}); \
             {:.0} s in all on a 2-core machine.\n",
            if self.command.is_empty() {
                "vm matrix"
            } else {
                &self.command
            },
            if dirty { ", with local changes" } else { "" },
            self.total_secs
        )?;
        writeln!(
            s,
            "Each kernel is a stock Debian `cloud` kernel booted under QEMU's software emulator \
             (`-accel tcg,thread=multi -cpu max -m 1G -smp 2`, no KVM) with a busybox \
             initramfs that carries the workspace's debug build. For every kernel one boot \
             runs `whoclosed trace --probe-mode <mode> --probe-report` in each mode and then \
             the agent itself to read its programs' verifier statistics; then one boot per \
             mode that loaded runs the privileged end-to-end tests (`tests/tests/e2e_tcp.rs`, \
             one process per case) with `WHOCLOSED_PROBE_MODE=<mode>` and \
             `WHOCLOSED_E2E=require`, so every case must pass in that very mode.\n"
        )?;

        // Kernel x mode.
        writeln!(s, "## Probe modes and end-to-end tests\n")?;
        write!(s, "| kernel | release |")?;
        for m in &self.modes {
            write!(s, " {} |", m.name())?;
        }
        writeln!(s)?;
        write!(s, "|---|---|")?;
        for _ in &self.modes {
            write!(s, "---|")?;
        }
        writeln!(s)?;
        for (k, r) in &self.reports {
            write!(s, "| {} | `{}` |", k.label(), k.release)?;
            for &m in &self.modes {
                let cell = if r.error.is_some() && !r.modes.contains_key(&m) {
                    "report boot failed".to_string()
                } else if !r.loaded(m) {
                    "does not load".to_string()
                } else {
                    match self.test(&k.alias, m) {
                        Some(t) if t.error.is_some() && t.passed() == 0 => {
                            "loads; e2e boot failed".to_string()
                        }
                        Some(t) => format!(
                            "loads; e2e {}/{} {} ({:.0} s)",
                            t.passed(),
                            t.cases.len(),
                            if t.ok() { "passed" } else { "**FAILED**" },
                            t.boot_secs
                        ),
                        None => "loads; e2e not run".to_string(),
                    }
                };
                write!(s, " {cell} |")?;
            }
            writeln!(s)?;
        }
        writeln!(s)?;

        // Cases.
        let case_names: Vec<String> = self
            .tests
            .first()
            .map(|t| t.cases.iter().map(|c| c.name.clone()).collect())
            .unwrap_or_default();
        if !case_names.is_empty() {
            writeln!(s, "### End-to-end cases (seconds inside the guest)\n")?;
            write!(s, "| case |")?;
            for t in &self.tests {
                write!(s, " {} {} |", t.kernel.alias, t.mode.name())?;
            }
            writeln!(s)?;
            write!(s, "|---|")?;
            for _ in &self.tests {
                write!(s, "---|")?;
            }
            writeln!(s)?;
            for name in &case_names {
                write!(s, "| `{name}` |")?;
                for t in &self.tests {
                    let cell = match t.cases.iter().find(|c| &c.name == name) {
                        Some(c) if c.passed => format!("ok {:.1}", c.secs),
                        Some(c) if c.ran => format!("**FAIL** {:.1}", c.secs),
                        Some(_) => "not run".to_string(),
                        None => "-".to_string(),
                    };
                    write!(s, " {cell} |")?;
                }
                writeln!(s)?;
            }
            writeln!(s)?;
        }

        // Kernel x program.
        writeln!(s, "## Programs\n")?;
        writeln!(
            s,
            "Per program and kernel: `verified/xlated`, where *verified* is the number of \
             instructions the verifier processed (`verified_insns` in the program's fdinfo, \
             the \"processed N insns\" of the verifier log; kernels from 5.16 on only, `-` \
             before) and *xlated* the size of the accepted program after the verifier's \
             rewrites (`bytes_xlated / 8` from `bpftool prog show`). `rejected` means the \
             load failed (error in the notes); `not loaded` that the agent did not try \
             (e.g. no such tracepoint).\n"
        )?;
        let mut programs: Vec<(String, String)> = Vec::new();
        for (_, r) in &self.reports {
            for mr in r.modes.values() {
                for p in mr
                    .json
                    .as_ref()
                    .and_then(|j| j["programs"].as_array().cloned())
                    .unwrap_or_default()
                {
                    let name = p["program"].as_str().unwrap_or("?").to_string();
                    let kind = p["kind"].as_str().unwrap_or("?").to_string();
                    if !programs.iter().any(|(n, _)| n == &name) {
                        programs.push((name, kind));
                    }
                }
            }
        }
        write!(s, "| program | kind |")?;
        for (k, _) in &self.reports {
            write!(s, " {} |", k.alias)?;
        }
        writeln!(s)?;
        write!(s, "|---|---|")?;
        for _ in &self.reports {
            write!(s, "---|")?;
        }
        writeln!(s)?;
        for (name, kind) in &programs {
            write!(s, "| `{name}` | {kind} |")?;
            for (_, r) in &self.reports {
                write!(s, " {} |", program_cell(r, name))?;
            }
            writeln!(s)?;
        }
        writeln!(s)?;

        // Timings.
        writeln!(s, "## Timings\n")?;
        writeln!(
            s,
            "Wall-clock seconds on the host per boot (QEMU start to power-off, boot itself \
             about 3-5 s; the same boot varies by a third with the load of the host). The \
             report boot runs six agent starts; *ready* is the time from \
             starting `whoclosed trace` to its `ready` line inside the guest.\n"
        )?;
        write!(s, "| kernel | report boot | ready (")?;
        write!(
            s,
            "{}) |",
            self.modes
                .iter()
                .map(|m| m.name())
                .collect::<Vec<_>>()
                .join(" / ")
        )?;
        for m in &self.modes {
            write!(s, " e2e {} |", m.name())?;
        }
        writeln!(s)?;
        write!(s, "|---|---|---|")?;
        for _ in &self.modes {
            write!(s, "---|")?;
        }
        writeln!(s)?;
        for (k, r) in &self.reports {
            let ready: Vec<String> = self
                .modes
                .iter()
                .map(|m| {
                    r.modes
                        .get(m)
                        .and_then(|x| x.ready_secs)
                        .map(|v| format!("{v:.1}"))
                        .unwrap_or_else(|| "-".into())
                })
                .collect();
            write!(
                s,
                "| {} | {:.0} | {} |",
                k.alias,
                r.boot_secs,
                ready.join(" / ")
            )?;
            for &m in &self.modes {
                match self.test(&k.alias, m) {
                    Some(t) => write!(s, " {:.0} |", t.boot_secs)?,
                    None => write!(s, " - |")?,
                }
            }
            writeln!(s)?;
        }
        writeln!(s)?;

        // Notes.
        writeln!(s, "## Notes\n")?;
        for (k, r) in &self.reports {
            writeln!(
                s,
                "- **{}**: packages {} from `{}`.",
                k.label(),
                k.packages
                    .iter()
                    .map(|p| format!("`{p}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                k.suite
            )?;
            if let Some(e) = &r.error {
                writeln!(s, "  - report boot failed: {}", one_line(e))?;
            }
            let any = r.modes.values().find_map(|m| m.json.as_ref());
            if let Some(j) = any {
                let mut lacks = Vec::new();
                for f in ["btf", "netns_ids", "exit_detection", "packet_facts"] {
                    if j[f] == false {
                        lacks.push(format!("`{f}` false"));
                    }
                }
                if lacks.is_empty() {
                    writeln!(
                        s,
                        "  - BTF, netns ids, exit detection and packet facts all available."
                    )?;
                } else {
                    writeln!(s, "  - lacks: {}.", lacks.join(", "))?;
                }
            }
            for (m, mr) in &r.modes {
                if !r.loaded(*m) {
                    let last = summarize_error(&mr.stderr);
                    writeln!(
                        s,
                        "  - `--probe-mode {}` does not load (exit {}): `{}`",
                        m.name(),
                        mr.rc,
                        one_line(&last)
                    )?;
                }
            }
            // Optional programs that failed, once per (program, error) with their modes.
            let mut failed: Vec<(String, String, Vec<&str>)> = Vec::new();
            for (m, mr) in &r.modes {
                for p in mr
                    .json
                    .as_ref()
                    .and_then(|j| j["programs"].as_array().cloned())
                    .unwrap_or_default()
                {
                    if p["status"] != "failed" {
                        continue;
                    }
                    let name = p["program"].as_str().unwrap_or("?").to_string();
                    let err = summarize_error(p["error"].as_str().unwrap_or(""));
                    match failed.iter_mut().find(|(n, e, _)| *n == name && *e == err) {
                        Some(f) => f.2.push(m.name()),
                        None => failed.push((name, err, vec![m.name()])),
                    }
                }
            }
            for (name, err, modes) in failed {
                writeln!(
                    s,
                    "  - `{name}` unavailable ({} mode{}): `{}`",
                    modes.join(", "),
                    if modes.len() > 1 { "s" } else { "" },
                    one_line(&err)
                )?;
            }
            let progs: Vec<&ProgStat> = r.modes.values().flat_map(|m| &m.progs).collect();
            if !progs.is_empty() && progs.iter().all(|p| p.verified_insns.is_none()) {
                writeln!(
                    s,
                    "  - no `verified_insns` in fdinfo (added in 5.16): only xlated sizes."
                )?;
            }
            for &m in &self.modes {
                if let Some(t) = self.test(&k.alias, m) {
                    if let Some(e) = &t.error {
                        writeln!(s, "  - e2e {}: {}", m.name(), one_line(e))?;
                    }
                    for c in t.cases.iter().filter(|c| c.ran && !c.passed) {
                        let why = panic_summary(&c.output);
                        writeln!(
                            s,
                            "  - e2e {} `{}` failed: {}",
                            m.name(),
                            c.name,
                            one_line(&why)
                        )?;
                    }
                }
            }
        }
        writeln!(
            s,
            "- Guest userland: the host's (Debian 12) iproute2 `ip`, `iptables`/`ip6tables` \
             with the nf_tables backend (modules {}, plus {} where it is a module of its own, \
             and their dependencies, loaded at boot), procps `sysctl`, `bpftool`, busybox for \
             the rest. The `cloud` flavour has every module the tests need on all these \
             kernels, so no generic flavour is used.",
            image::MODULES
                .iter()
                .map(|m| format!("`{m}`"))
                .collect::<Vec<_>>()
                .join(", "),
            image::OPTIONAL_MODULES
                .iter()
                .map(|m| format!("`{m}` (5.10)"))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        writeln!(
            s,
            "- `cargo xtask vm ci` is the quick subset: the report boots of 5.10 and 6.1 \
             (every mode must load) and the end-to-end tests in tracepoint mode on 5.10, \
             fentry on 6.1 and kprobe on the newest kernel."
        )?;
        Ok(s)
    }
}

fn one_line(s: &str) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let s = s.replace('`', "'").replace('|', "\\|");
    if s.chars().count() > 600 {
        format!("{}…", s.chars().take(600).collect::<String>())
    } else {
        s
    }
}

/// `verified/xlated` for a program on one kernel, over all modes.
fn program_cell(r: &Report, name: &str) -> String {
    let mut failure: Option<String> = None;
    for (mode, mr) in &r.modes {
        if let Some(p) = mr.progs.iter().find(|p| p.name == name) {
            return format!(
                "{}/{}",
                p.verified_insns
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "-".into()),
                p.xlated_insns
            );
        }
        if let Some(j) = &mr.json {
            for p in j["programs"].as_array().into_iter().flatten() {
                if p["program"] == name && p["status"] == "failed" {
                    failure = Some(p["error"].as_str().unwrap_or("").to_string());
                }
            }
        } else if mr.rc != 0 && close_hook(*mode) == Some(name) {
            // A forced mode that failed prints no report, only the error.
            failure = Some(mr.stderr.clone());
        }
    }
    match failure {
        Some(e) if e.contains("Verifier output") => "rejected".into(),
        Some(e) if e.contains("tracepoint format") => "no tracepoint".into(),
        Some(_) => "failed".into(),
        None => "not loaded".into(),
    }
}

/// The program that observes `tcp_close()` in a forced mode.
fn close_hook(mode: Mode) -> Option<&'static str> {
    match mode {
        Mode::Fentry => Some("tcp_close_fentry"),
        Mode::Kprobe => Some("tcp_close_kprobe"),
        Mode::Tracepoint => None,
    }
}

/// One line out of an agent error: the message up to "Verifier output:", plus, for a
/// verifier rejection, the last instruction and the verifier's complaint.
fn summarize_error(text: &str) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let head = lines
        .iter()
        .position(|l| *l == "Caused by:")
        .and_then(|i| lines.get(i + 1))
        .or_else(|| lines.iter().find(|l| l.contains("Verifier output:")))
        .or_else(|| lines.iter().rev().find(|l| !l.is_empty()))
        .copied()
        .unwrap_or("");
    let head = head.split("Verifier output:").next().unwrap_or(head).trim();
    if !text.contains("Verifier output:") {
        return head.to_string();
    }
    let end = lines
        .iter()
        .position(|l| l.starts_with("verification time"))
        .unwrap_or(lines.len());
    let is_insn = |l: &str| {
        l.split(':')
            .next()
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let mut why = Vec::new();
    let mut insn = None;
    // Register-state dumps (5.10 prints one before the complaint) say little in one line.
    let is_state = |l: &str| {
        l.contains("R10=fp0")
            || (l.starts_with('R') && l.split_whitespace().next().is_some_and(|w| w.contains('=')))
    };
    for l in lines[..end].iter().rev() {
        if let Some((_, rest)) = l.split_once("Verifier output:") {
            if !rest.trim().is_empty() && !is_state(rest) {
                why.push(rest.trim());
            }
            break;
        }
        if l.is_empty() || is_state(l) {
            continue;
        }
        if is_insn(l) {
            insn = Some(l.split(';').next().unwrap_or(l).trim());
            break;
        }
        why.push(*l);
    }
    why.reverse();
    format!(
        "{head} verifier: {}{}",
        insn.map(|i| format!("at `{i}`: ")).unwrap_or_default(),
        why.join("; ")
    )
}

/// The panic message of a failed test case and the mismatch lines under it.
fn panic_summary(output: &str) -> String {
    let mut lines = output.lines().skip_while(|l| !l.contains("panicked at"));
    lines.next();
    let mut parts: Vec<&str> = Vec::new();
    if let Some(msg) = lines.next() {
        parts.push(msg.trim());
    }
    parts.extend(lines.take_while(|l| l.starts_with("  /")).map(str::trim));
    parts.join(" ")
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

    #[test]
    fn verifier_error_summary() {
        let log = "Error: attaching the probes\n\nCaused by:\n    --probe-mode kprobe: refused: \
                   the BPF_PROG_LOAD syscall returned Permission denied (os error 13). \
                   Verifier output: 0: R1=ctx(off=0,imm=0) R10=fp0\n    466: (bf) r2 = r9\n    \
                   R9 !read_ok\n    verification time 12225 usec\n    processed 727 insns\n";
        assert_eq!(
            summarize_error(log),
            "--probe-mode kprobe: refused: the BPF_PROG_LOAD syscall returned Permission \
             denied (os error 13). verifier: at `466: (bf) r2 = r9`: R9 !read_ok"
        );
        assert_eq!(summarize_error("no such file"), "no such file");
        let early = "the BPF_PROG_LOAD syscall returned Permission denied (os error 13). \
                     Verifier output: combined stack size of 4 calls is 544. Too large\n\
                     verification time 20 usec\n";
        assert_eq!(
            summarize_error(early),
            "the BPF_PROG_LOAD syscall returned Permission denied (os error 13). verifier: \
             combined stack size of 4 calls is 544. Too large"
        );
    }

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

    #[test]
    fn cpio_entries_are_aligned() {
        let mut c = image::Cpio::default();
        c.file("a/b", 0o644, b"xyz");
        c.symlink("a/c", "b");
        let buf = c.finish();
        assert!(buf.starts_with(b"070701"));
        assert_eq!(buf.len() % 4, 0);
        assert!(buf.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
