//! `cargo xtask image build|check`: the container image, built offline, and a run of it
//! with only the capabilities the DaemonSet grants.
//!
//! `build`: a statically linked release `whoclosed` (glibc, `+crt-static`), checked to have
//! no ELF interpreter, copied into a context with `deploy/Containerfile` (`FROM scratch`),
//! built with Debian's buildah (`--pull=never`: nothing is downloaded).
//!
//! `check`: runs `whoclosed agent` in the image as the DaemonSet does, with podman,
//! `--cap-drop ALL` plus [`CAPS`], the host mounts of [`MOUNTS`] (and the host's `/proc` and
//! `/var/log` under `/host` for pod names), a read-only root filesystem with a tmpfs for the
//! API socket, no network (`--network none`) and a private cgroup namespace (what containerd
//! and CRI-O give pods on cgroup v2), makes a loopback connection on the host — outside the
//! container — and requires its verdict in the container's output and from
//! `whoclosed closes` run inside the container against the agent's socket. Then it runs once
//! more without each capability to show that every one of them is needed, and prints what
//! each absence broke.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    cmd: ImageCmd,
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Build the static binary and the image (buildah, offline).
    Build {
        #[arg(long, default_value = DEFAULT_TAG)]
        tag: String,
    },
    /// Run the image with the DaemonSet's capabilities only and require a verdict for a
    /// host connection; then prove each capability necessary.
    Check {
        #[arg(long, default_value = DEFAULT_TAG)]
        tag: String,
        /// Skip the runs without each capability (the necessity proof).
        #[arg(long)]
        no_necessity: bool,
    },
}

const DEFAULT_TAG: &str = "localhost/whoclosed:dev";
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// The capabilities the DaemonSet grants, each with the reason (kept in step with
/// deploy/chart/whoclosed/values.yaml; `check` proves each one necessary on this kernel).
pub const CAPS: &[(&str, &str)] = &[
    (
        "BPF",
        "bpf(): create maps, load programs (kernel 5.8+; SYS_ADMIN before)",
    ),
    (
        "PERFMON",
        "load tracing programs and attach them to tracepoints with perf_event_open()",
    ),
    (
        "NET_ADMIN",
        "load cgroup_skb programs and attach them to the cgroup v2 root (packet facts)",
    ),
];

/// Host paths the agent reads, mounted read-only at the same place.
pub const MOUNTS: &[(&str, &str)] = &[
    (
        "/sys/kernel/tracing",
        "tracepoint ids and record layouts (tracefs)",
    ),
    ("/sys/kernel/btf", "kernel BTF: struct offsets, fentry"),
];

pub fn run(root: &Path, args: &ImageArgs) -> Result<()> {
    setup_debs()?;
    match &args.cmd {
        ImageCmd::Build { tag } => build(root, tag),
        ImageCmd::Check { tag, no_necessity } => check(root, tag, !no_necessity),
    }
}

/// Debian packages of the image tasks (not in the common setup: only these tasks use them).
const IMAGE_DEBS: &[&str] = &["buildah", "podman", "runc", "binutils"];

/// Installs the missing [`IMAGE_DEBS`] (as root), like `cargo xtask setup` does for its own.
fn setup_debs() -> Result<()> {
    let missing: Vec<&str> = IMAGE_DEBS
        .iter()
        .copied()
        .filter(|p| {
            !crate::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::is_root() {
        bail!("missing Debian packages {missing:?}; run as root or apt-get install them");
    }
    eprintln!("xtask: installing {missing:?}");
    crate::run(Command::new("apt-get").args(["update", "-qq"]))?;
    crate::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Where [`static_binary`] puts the agent.
pub fn static_binary_path(root: &Path) -> PathBuf {
    root.join("target")
        .join(TARGET)
        .join("release")
        .join("whoclosed")
}

/// Builds the agent as a static release binary: the image's, and the one `cargo xtask vm`
/// boots (under TCG the release agent starts in half the time of the debug one).
pub fn static_binary(root: &Path) -> Result<PathBuf> {
    crate::run(
        crate::cargo(root)
            .args([
                "build",
                "--release",
                "-p",
                "tracer-user",
                "--bin",
                "whoclosed",
            ])
            .args(["--target", TARGET])
            // Target-scoped, so neither build scripts nor the eBPF build see it.
            .env(
                "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                "-C target-feature=+crt-static",
            ),
    )?;
    let bin = static_binary_path(root);
    // A static PIE keeps a DYNAMIC segment (to relocate itself) but has no interpreter and
    // needs no shared library.
    let headers = crate::output(Command::new("readelf").args(["-lW", "-d"]).arg(&bin))
        .with_context(|| format!("readelf -l -d {} (binutils)", bin.display()))?;
    if headers.contains("INTERP") || headers.contains("(NEEDED)") {
        bail!(
            "{} is dynamically linked; a FROM scratch image cannot run it",
            bin.display()
        );
    }
    Ok(bin)
}

fn build(root: &Path, tag: &str) -> Result<()> {
    let bin = static_binary(root)?;
    let ctx = root.join("target/image-context");
    let _ = std::fs::remove_dir_all(&ctx);
    std::fs::create_dir_all(&ctx).with_context(|| format!("mkdir {}", ctx.display()))?;
    std::fs::copy(&bin, ctx.join("whoclosed"))
        .with_context(|| format!("copying {}", bin.display()))?;
    crate::run(
        Command::new("buildah")
            .args(["build", "--pull=never", "--layers=false", "-t", tag, "-f"])
            .arg(root.join("deploy/Containerfile"))
            .arg(&ctx),
    )?;
    eprintln!("xtask: built {tag}");
    Ok(())
}

/// One run of the image: the container's stdout, stderr and whether a verdict for the
/// host's loopback connection came out.
struct Outcome {
    /// The container's effective capabilities as the runtime reports them.
    caps: String,
    /// `whoclosed closes -o json` inside the container, against the agent's socket.
    queried: Vec<serde_json::Value>,
    verdicts: Vec<serde_json::Value>,
    ready: Option<serde_json::Value>,
    stderr: String,
}

fn podman_run(
    root: &Path,
    tag: &str,
    caps: &[&str],
    our_seccomp: bool,
    port: u16,
) -> Result<Outcome> {
    let name = format!("whoclosed-check-{}-{port}", std::process::id());
    let _ = Command::new("podman")
        .args(["rm", "-f", &name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let mut c = Command::new("podman");
    c.args(["run", "-d", "--name", &name])
        // This VM's podman needs runc and explicit ulimits.
        .args(["--runtime", "runc"])
        .args([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=4096:4096",
        ])
        .args(["--network", "none", "--read-only", "--cgroupns", "private"])
        .args(["--tmpfs", "/run/whoclosed:rw,mode=0700,size=1m"])
        .args(["--security-opt", "no-new-privileges"])
        .args(["--cap-drop", "ALL"]);
    if our_seccomp {
        // The DaemonSet's seccomp profile: the runtime defaults allow bpf() and
        // perf_event_open() only with CAP_SYS_ADMIN.
        c.arg("--security-opt").arg(format!(
            "seccomp={}",
            root.join("deploy/seccomp/whoclosed.json").display()
        ));
    }
    for cap in caps {
        c.args(["--cap-add", &format!("CAP_{cap}")]);
    }
    for (path, _) in MOUNTS {
        c.args(["-v", &format!("{path}:{path}:ro")]);
    }
    let cg2 = cgroup2_mount()?;
    c.args(["-v", &format!("{0}:{0}:ro", cg2.display())]);
    c.args([
        "-v",
        "/proc:/host/proc:ro",
        "-v",
        "/var/log:/host/var/log:ro",
    ]);
    c.arg(tag).args([
        "agent",
        "--host-root=/host",
        "--node-name=image-check",
        "--port",
        &port.to_string(),
    ]);
    crate::run(c.stdout(Stdio::null()))?;

    // Wait for `ready` (or the container's end), then drive one connection on the host.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ready = None;
    while Instant::now() < deadline {
        let (out, _) = logs(&name);
        ready = out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["type"] == "ready");
        if ready.is_some() || !running(&name) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if ready.is_some() {
        loopback_connection(port)?;
        // Linger (1 s by default) before the verdict is printed.
        std::thread::sleep(Duration::from_millis(2500));
    }
    let caps_seen =
        crate::output(Command::new("podman").args(["inspect", "-f", "{{.EffectiveCaps}}", &name]))
            .unwrap_or_default();
    let queried = if ready.is_some() {
        crate::output(Command::new("podman").args([
            "exec",
            &name,
            "/whoclosed",
            "closes",
            "-o",
            "json",
        ]))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .collect()
    } else {
        Vec::new()
    };
    let _ = Command::new("podman")
        .args(["stop", "-t", "10", &name])
        .stdout(Stdio::null())
        .status();
    let (out, err) = logs(&name);
    let _ = Command::new("podman")
        .args(["rm", "-f", &name])
        .stdout(Stdio::null())
        .status();
    let verdicts = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "close")
        .collect();
    Ok(Outcome {
        caps: caps_seen.trim().to_string(),
        queried,
        verdicts,
        ready,
        stderr: err,
    })
}

/// The error line and its innermost cause from an anyhow report on stderr.
fn failure(stderr: &str) -> String {
    let head = stderr
        .lines()
        .find(|l| l.starts_with("Error:"))
        .unwrap_or("(no error line)");
    let cause = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    format!("{head} / {cause}")
}

fn logs(name: &str) -> (String, String) {
    match Command::new("podman").args(["logs", name]).output() {
        Ok(o) => (
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(_) => (String::new(), String::new()),
    }
}

fn running(name: &str) -> bool {
    crate::output(Command::new("podman").args(["inspect", "-f", "{{.State.Running}}", name]))
        .is_some_and(|s| s.trim() == "true")
}

/// The client sends a line and closes first; the server answers and closes.
fn loopback_connection(port: u16) -> Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .with_context(|| format!("binding 127.0.0.1:{port}"))?;
    let mut client = TcpStream::connect(("127.0.0.1", port))?;
    let (mut server, _) = listener.accept()?;
    client.write_all(b"ping\n")?;
    let mut buf = [0u8; 5];
    server.read_exact(&mut buf)?;
    drop(client);
    let mut rest = Vec::new();
    server.read_to_end(&mut rest)?;
    drop(server);
    Ok(())
}

pub(crate) fn cgroup2_mount() -> Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mut f = pre.split_whitespace();
            let root = f.nth(3)?;
            let mnt = f.next()?;
            (post.split_whitespace().next()? == "cgroup2" && root == "/")
                .then(|| PathBuf::from(mnt))
        })
        .context("no cgroup2 mount on the host (packet facts need cgroup v2)")
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn client_close(o: &Outcome, port: u16) -> bool {
    is_client_close(&o.verdicts, port)
}

fn is_client_close(verdicts: &[serde_json::Value], port: u16) -> bool {
    verdicts.iter().any(|v| {
        v["conn"]["remote"] == format!("127.0.0.1:{port}")
            && v["verdict"]["closed_by"] == "client"
            && v["verdict"]["reason"] == "client_close"
    })
}

fn check(root: &Path, tag: &str, necessity: bool) -> Result<()> {
    let caps: Vec<&str> = CAPS.iter().map(|(c, _)| *c).collect();
    let port = free_port()?;
    let o = podman_run(root, tag, &caps, true, port)?;
    let Some(ready) = &o.ready else {
        bail!(
            "whoclosed did not become ready with {caps:?}; its stderr:\n{}",
            o.stderr
        );
    };
    let want: Vec<String> = caps.iter().map(|c| format!("CAP_{c}")).collect();
    let mut seen: Vec<String> = o
        .caps
        .trim_matches(|c| c == '[' || c == ']')
        .split_whitespace()
        .map(str::to_string)
        .collect();
    seen.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    if seen != want_sorted {
        bail!("the container ran with {seen:?}, not exactly {want_sorted:?}");
    }
    if ready["packet_facts"] != true {
        bail!("packet facts are off with {caps:?}: {ready}\n{}", o.stderr);
    }
    // Entering the host's network namespace (to list its connections open before the
    // start) needs capabilities and a syscall this profile withholds: the agent must say
    // it could not, not claim a complete listing.
    if ready["existing_sockets"] != false || !o.stderr.contains("not listed in") {
        bail!(
            "under the least-privilege profile the agent claims to have listed the connections \
             of every network namespace: {ready}\n{}",
            o.stderr
        );
    }
    // The recheck after lost events covers the namespaces it may not enter through the
    // socket storage iterator: that must load under this profile.
    if o.stderr.contains("iter/bpf_sk_storage_map unavailable") {
        bail!(
            "the socket storage walk does not load under the least-privilege profile:\n{}",
            o.stderr
        );
    }
    if !client_close(&o, port) {
        bail!(
            "no client_close verdict for the host's connection to 127.0.0.1:{port}; got {:#?}\nstderr:\n{}",
            o.verdicts,
            o.stderr
        );
    }
    if !is_client_close(&o.queried, port) {
        bail!(
            "`whoclosed closes` inside the container did not return the verdict; got {:#?}",
            o.queried
        );
    }
    eprintln!(
        "xtask: image check: {tag} agent with only CAP_{{{}}}, read-only root, no network, private cgroup namespace: {} verdicts (also from `whoclosed closes`), ready = {ready}",
        caps.join(","),
        o.verdicts.len()
    );
    if !necessity {
        return Ok(());
    }
    let mut unnecessary = Vec::new();
    for drop in &caps {
        let fewer: Vec<&str> = caps.iter().copied().filter(|c| c != drop).collect();
        let port = free_port()?;
        let o = podman_run(root, tag, &fewer, true, port)?;
        let full =
            o.ready.as_ref().is_some_and(|r| r["packet_facts"] == true) && client_close(&o, port);
        let what = match &o.ready {
            None => format!("no start: {}", failure(&o.stderr)),
            Some(r) if r["packet_facts"] != true => "started without packet facts".into(),
            Some(_) if !full => "started, but no verdict for the connection".into(),
            Some(_) => "works without it".into(),
        };
        eprintln!("xtask: image check: without CAP_{drop}: {what}");
        if full {
            unnecessary.push(*drop);
        }
    }
    // The profile is needed too: with the runtime's default one, bpf() is refused.
    let port = free_port()?;
    let o = podman_run(root, tag, &caps, false, port)?;
    match &o.ready {
        None => eprintln!(
            "xtask: image check: with the runtime's default seccomp profile: no start: {}",
            failure(&o.stderr)
        ),
        Some(_) => eprintln!(
            "xtask: image check: the runtime's default seccomp profile works here too; deploy/seccomp/whoclosed.json is not needed on this host"
        ),
    }
    if !unnecessary.is_empty() {
        bail!("capabilities granted but not needed on this kernel: {unnecessary:?}");
    }
    Ok(())
}
