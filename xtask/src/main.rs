//! Project tasks: `cargo xtask <setup|build|run|test|bench-churn>`.
//!
//! `setup` is idempotent: it checks each prerequisite and installs only what is missing,
//! so it is cheap to run before every build.

mod bench;
mod bench_packet;
mod bench_scale;
mod budgets;
mod deploy;
mod floor;
mod fuzz;
mod image;
mod profile;
mod vm;

use std::{
    env,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (Debian packages, nightly rust-src,
    /// bpf-linker). Does nothing when everything is present.
    Setup,
    /// Set up, then build the workspace (the kernel programs are built by tracer-user/build.rs).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, build and run `whoclosed` with the given arguments (as root).
    Run {
        #[arg(long)]
        release: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build and run every test, privileged end-to-end tests included (as root).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Connection-churn benchmark: nothing attached vs whoclosed vs libbpf-tools tcplife.
    BenchChurn(bench::ChurnArgs),
    /// HTTP/2 benchmark: the same h2load transfer with the agent detached and attached.
    BenchH2(bench::H2Args),
    /// Per-segment cost of the packet programs: BPF_PROG_TEST_RUN on crafted segments.
    BenchPacket(bench_packet::PacketArgs),
    /// Where the packet programs spend a bulk HTTP/2 transfer: perf samples placed on
    /// their JIT-ed instructions (needs perf and objdump).
    ProfileH2(profile::ProfileArgs),
    /// Userspace pipeline: record a loopback churn, then time `whoclosed replay` of it.
    BenchPipeline(bench_scale::PipelineArgs),
    /// Memory: hold many loopback connections open and read the agent's RSS.
    BenchLive(bench_scale::LiveArgs),
    /// Every benchmark behind issue #10's budgets, then one table: budget, measured, met.
    BenchBudgets(budgets::BudgetArgs),
    /// Boot stock Debian kernels under QEMU and run the end-to-end tests inside them.
    Vm(vm::VmArgs),
    /// Run the HTTP/2 frame parser fuzz target for a bounded time (cargo-fuzz, nightly).
    Fuzz(fuzz::FuzzArgs),
    /// Container image: build it offline (buildah) and run it with the DaemonSet's
    /// capabilities only (podman).
    Image(image::ImageArgs),
    /// Validate deploy/ offline: Kubernetes schemas (kubernetes-validate) and policy.
    DeployCheck,
}

/// Debian packages the build, the tests and the benchmarks use.
const DEB_PACKAGES: &[&str] = &[
    "iproute2",
    "iptables",
    "procps",
    "psmisc",
    "libbpf-tools",
    "bpftool",
    "nghttp2-client",
    "nghttp2-server",
    "python3-venv",
    // The HTTP/2 tests check each scenario's wire facts in a capture too.
    "tcpdump",
    "tshark",
    // Middlebox tests (issue #8): a real haproxy and nginx in the router namespace.
    "haproxy",
    "nginx",
    // TLS case: openssl s_server / s_client and a throwaway certificate.
    "openssl",
    // `cargo xtask vm`: stock Debian kernels under QEMU (see xtask/src/vm.rs).
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "xz-utils",
    "zstd",
    "binutils",
    "debian-archive-keyring",
    // tracer-user/tests/prometheus_scrape.rs: a real Prometheus scrapes /metrics.
    "prometheus",
];

/// Python requirements of the HTTP/2 end-to-end peers (grpcio from PyPI, pinned: the tests
/// assert that release's GOAWAY debug texts; Debian's 1.51 behaves differently).
const PEER_REQUIREMENTS: &str = "tests/peers/requirements.txt";

const BPF_LINKER_VERSION: &str = "0.13.0";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    check(status, cmd)
}

fn check(status: ExitStatus, cmd: &Command) -> Result<()> {
    if status.success() {
        Ok(())
    } else {
        bail!("{cmd:?} failed: {status}")
    }
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

fn missing_debs() -> Vec<&'static str> {
    DEB_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect()
}

fn setup_debs() -> Result<()> {
    let missing = missing_debs();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages {missing:?}; run `cargo xtask setup` as root");
    }
    eprintln!("xtask: installing {missing:?}");
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn nightly_sysroot() -> Result<PathBuf> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("no nightly toolchain: install one with `rustup toolchain install nightly`")?;
    Ok(PathBuf::from(sysroot.trim()))
}

fn setup_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("xtask: adding rust-src to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// The nightly toolchain's own libLLVM (no system LLVM 22 exists on these machines).
fn nightly_libllvm(sysroot: &Path) -> Result<PathBuf> {
    let lib = sysroot.join("lib");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(OsStr::to_str)
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .collect();
    found.sort();
    found
        .pop()
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", lib.display()))
}

fn llvm_major(libllvm: &Path) -> Option<String> {
    let name = libllvm.file_name()?.to_str()?;
    name.strip_prefix("libLLVM.so.")?
        .split('.')
        .next()
        .map(str::to_string)
}

fn bpf_linker_works() -> bool {
    // Run it directly (not through rustup) so a linker that only works with rustup's
    // LD_LIBRARY_PATH is rebuilt with an rpath.
    output(Command::new("bpf-linker").arg("--version")).is_some()
}

fn setup_bpf_linker(sysroot: &Path) -> Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    let libllvm = nightly_libllvm(sysroot)?;
    let major =
        llvm_major(&libllvm).context("cannot tell the LLVM version of the nightly toolchain")?;
    let home = env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    let prefix = home.join(".cache/whoclosed/llvm-prefix");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    let link = prefix_lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("linking {} -> {}", link.display(), libllvm.display()))?;
    let rpath = libllvm.parent().map(Path::to_path_buf).unwrap_or_default();
    eprintln!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} against {}",
        libllvm.display()
    );
    run(Command::new("cargo")
        .args([
            "install",
            "--locked",
            "--force",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", rpath.display()),
        ))?;
    if !bpf_linker_works() {
        bail!("bpf-linker was installed but does not run; is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

/// The Python venv with grpcio used by the HTTP/2 test peers (`$WHOCLOSED_VENV`).
pub fn venv_dir() -> PathBuf {
    if let Some(v) = env::var_os("WHOCLOSED_VENV") {
        return PathBuf::from(v);
    }
    let home = env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/whoclosed/venv")
}

fn setup_venv(root: &Path) -> Result<()> {
    let venv = venv_dir();
    let python = venv.join("bin/python3");
    let reqs = root.join(PEER_REQUIREMENTS);
    let text =
        std::fs::read_to_string(&reqs).with_context(|| format!("reading {}", reqs.display()))?;
    let want = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("grpcio=="))
        .with_context(|| format!("{} pins no grpcio version", reqs.display()))?;
    let have = output(Command::new(&python).args(["-c", "import grpc; print(grpc.__version__)"]));
    if have.as_deref().map(str::trim) == Some(want) {
        return Ok(());
    }
    if !python.exists() {
        eprintln!("xtask: creating the Python venv {}", venv.display());
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    eprintln!(
        "xtask: installing the test peers' Python requirements into {}",
        venv.display()
    );
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&reqs))
}

fn setup() -> Result<()> {
    setup_debs()?;
    setup_venv(&workspace_root())?;
    let sysroot = nightly_sysroot()?;
    setup_rust_src()?;
    setup_bpf_linker(&sysroot)?;
    Ok(())
}

fn cargo(root: &Path) -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root);
    c
}

fn build(root: &Path, release: bool) -> Result<()> {
    let mut c = cargo(root);
    // Default members only: tracer-ebpf is built for the BPF target by tracer-user/build.rs.
    c.args(["build", "--bins"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::Setup => setup(),
        Task::Build { release } => {
            setup()?;
            build(&root, release)
        }
        Task::Run { release, args } => {
            setup()?;
            build(&root, release)?;
            let bin = root
                .join("target")
                .join(if release { "release" } else { "debug" })
                .join("whoclosed");
            run(Command::new(bin).args(args))
        }
        Task::Test { args } => {
            setup()?;
            build(&root, false)?;
            if !is_root() {
                bail!("the end-to-end tests create network namespaces and load eBPF: run as root");
            }
            run(cargo(&root)
                .args(["test", "--"])
                .args(args)
                .env("WHOCLOSED_E2E", "require"))
        }
        Task::BenchChurn(args) => {
            setup()?;
            build(&root, true)?;
            bench::churn(&root, &args).map(|_| ())
        }
        Task::BenchH2(args) => {
            setup()?;
            build(&root, true)?;
            bench::h2(&root, &args).map(|_| ())
        }
        Task::BenchPacket(args) => {
            setup()?;
            build(&root, true)?;
            bench_packet::packet(&root, &args)
        }
        Task::ProfileH2(args) => {
            setup()?;
            build(&root, true)?;
            profile::h2(&root, &args)
        }
        Task::BenchPipeline(args) => {
            setup()?;
            build(&root, true)?;
            bench_scale::pipeline(&root, &args).map(|_| ())
        }
        Task::BenchLive(args) => {
            setup()?;
            build(&root, true)?;
            bench_scale::live(&root, &args).map(|_| ())
        }
        Task::BenchBudgets(args) => {
            setup()?;
            build(&root, true)?;
            budgets::run(&root, &args)
        }
        Task::Vm(args) => {
            setup()?;
            vm::run(&root, &args)
        }
        Task::Fuzz(args) => fuzz::run(&root, &args),
        Task::DeployCheck => deploy::check(&root),
        Task::Image(args) => {
            setup()?;
            image::run(&root, &args)
        }
    }
}
