//! One bounded QEMU boot (TCG: there is no usable KVM on these machines).
//!
//! Serial ports: ttyS0 = kernel console (`console.log`), ttyS1 = the command's stdout and
//! stderr (`output.log`, streamed line by line while the guest runs), ttyS2 = its exit
//! code (`exit.log`). QEMU writes the files itself; opening `/dev/stdout` from QEMU would
//! garble output when stdout is a file.

use std::{
    fs,
    io::Read as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::kernels::Kernel;

pub struct BootResult {
    /// The command's output (ttyS1), carriage returns removed.
    pub output: String,
    /// The command's exit code, if the guest got as far as reporting it.
    pub exit: Option<i32>,
    pub timed_out: bool,
    /// The guest never started its command, so nothing of ours ran: killed at the stall
    /// bound (a boot that hangs under TCG), or dead before it (a kernel that panics while
    /// booting, as 7.3 did once under TCG: an `int3` Oops in `sched_clock_cpu` while code
    /// was being patched, 2 s into the boot).
    pub stalled: bool,
    /// Earlier attempts of this boot that stalled (see [`BootResult::stalled`]) and were
    /// booted again.
    pub stalls_before: u32,
    /// Wall time of the boot, QEMU start to exit.
    pub secs: f64,
    pub logs: PathBuf,
}

impl BootResult {
    /// Last lines of the kernel console, for error messages.
    pub fn console_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(self.logs.join("console.log")).unwrap_or_default();
        tail(&text, n)
    }

    /// Last lines of the command's output, for error messages.
    pub fn output_tail(&self, n: usize) -> String {
        tail(&self.output, n)
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.trim_end_matches('\r'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Bounds of one boot.
#[derive(Clone, Copy)]
pub struct Bounds {
    /// The whole boot: QEMU is killed after it.
    pub total: Duration,
    /// The guest's start of its command (`@@VM-UP` on ttyS2, written by `/init`): QEMU is
    /// killed when it has not come by then.
    pub first_line: Duration,
}

/// Boots `kernel` with `initrd`, logs in `logs/`, killing QEMU when a bound passes.
/// `on_line` sees every complete line of the command's output as it arrives.
pub fn boot(
    kernel: &Kernel,
    initrd: &Path,
    logs: &Path,
    bounds: Bounds,
    on_line: &mut dyn FnMut(&str),
) -> Result<BootResult> {
    fs::create_dir_all(logs)?;
    let console = logs.join("console.log");
    let output = logs.join("output.log");
    let exit = logs.join("exit.log");
    for f in [&console, &output, &exit] {
        fs::write(f, b"")?;
    }
    let qemu_log = fs::File::create(logs.join("qemu.log"))?;
    let serial = |p: &Path| format!("file:{}", p.display());
    let append = [
        "console=ttyS0",
        "8250.nr_uarts=4",
        "panic=-1",
        "oops=panic",
        "loglevel=4",
        "mitigations=off",
        "rdinit=/init",
    ]
    .join(" ");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-m",
        "1G",
        "-smp",
        "2",
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .arg("-serial")
    .arg(serial(&console))
    .arg("-serial")
    .arg(serial(&output))
    .arg("-serial")
    .arg(serial(&exit))
    .arg("-kernel")
    .arg(&kernel.image)
    .arg("-initrd")
    .arg(initrd)
    .arg("-append")
    .arg(&append)
    .stdin(Stdio::null())
    .stdout(qemu_log.try_clone()?)
    .stderr(qemu_log);
    // SAFETY: prctl is async-signal-safe; QEMU dies with us (e.g. on Ctrl-C).
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let mut reader = fs::File::open(&output)?;
    let mut pending = Vec::new();
    let mut all = String::new();
    let mut pump = |pending: &mut Vec<u8>, all: &mut String, flush: bool| -> Result<()> {
        let mut buf = Vec::new();
        reader.read_to_end(&mut buf)?;
        pending.extend(buf.iter().copied().filter(|&b| b != b'\r'));
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            on_line(&line);
            all.push_str(&line);
            all.push('\n');
        }
        if flush && !pending.is_empty() {
            let line = String::from_utf8_lossy(pending).into_owned();
            pending.clear();
            on_line(&line);
            all.push_str(&line);
            all.push('\n');
        }
        Ok(())
    };
    let mut timed_out = false;
    let mut stalled = false;
    let mut up = false;
    loop {
        pump(&mut pending, &mut all, false)?;
        if child.try_wait()?.is_some() {
            // Gone without `@@VM-UP`: it died booting, before anything of ours ran.
            stalled = fs::metadata(&exit)?.len() == 0;
            break;
        }
        let waited = start.elapsed();
        if !up && waited >= bounds.first_line {
            up = fs::metadata(&exit)?.len() > 0;
            if !up {
                stalled = true;
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
        }
        if waited >= bounds.total {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    pump(&mut pending, &mut all, true)?;
    let secs = start.elapsed().as_secs_f64();
    let exit_text = fs::read_to_string(&exit).unwrap_or_default();
    let exit = exit_text
        .lines()
        .find_map(|l| l.trim().strip_prefix("@@VM-EXIT "))
        .and_then(|n| n.trim().parse().ok());
    Ok(BootResult {
        output: all,
        exit,
        timed_out,
        stalled,
        stalls_before: 0,
        secs,
        logs: logs.to_path_buf(),
    })
}
