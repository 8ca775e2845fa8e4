//! Builds the kernel programs (`tracer-ebpf`) for the BPF target with the nightly toolchain and
//! `bpf-linker`, so that a plain `cargo build` produces an agent with its programs embedded
//! (`probes.rs` includes `$OUT_DIR/whoclosed`).
//!
//! One kernel build serves every build of this crate. aya-build, which this replaces, gave the
//! nested cargo a target directory under `OUT_DIR`, which differs per profile, per feature set
//! and per workspace: `cargo clippy`, `cargo test`, `cargo build --release`, the image build and
//! the fuzz workspace each compiled `core` and the programs for bpfel again (35 to 55 s each on
//! the CI machine, five times per CI run). Here the nested cargo always uses `<target
//! dir>/ebpf` of this workspace, and cargo's own fingerprints and lock decide what to rebuild.
use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

/// The kernel crate, and its one binary: the object the agent loads.
const PACKAGE: &str = "tracer-ebpf";
const OBJECT: &str = "whoclosed";

fn main() -> anyhow::Result<()> {
    let meta = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let pkg = meta
        .packages
        .iter()
        .find(|p| p.name.as_str() == PACKAGE)
        .ok_or_else(|| anyhow!("{PACKAGE} is not in the workspace"))?;
    let pkg_dir = pkg
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", pkg.manifest_path))?;
    // The kernel crate's sources (its binary's modules are not in the library the
    // build-dependency compiles); a change to that library or to anything it depends on
    // (tracer-common, aya-ebpf, Cargo.lock) reruns this script through the build-dependency,
    // and the kernel crate's own build.rs reruns on a new bpf-linker.
    println!("cargo:rerun-if-changed={pkg_dir}");

    let target = bpf_target()?;
    let target_dir = meta.target_directory.join("ebpf").into_std_path_buf();
    build(&target, &target_dir)?;

    let built = target_dir.join(&target).join("release").join(OBJECT);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    install(&built, &out_dir.join(OBJECT))
}

/// `bpfel-unknown-none` or `bpfeb-unknown-none`, after the host's byte order.
fn bpf_target() -> anyhow::Result<String> {
    let endian = env::var("CARGO_CFG_TARGET_ENDIAN").context("CARGO_CFG_TARGET_ENDIAN")?;
    Ok(match endian.as_str() {
        "little" => "bpfel-unknown-none".into(),
        "big" => "bpfeb-unknown-none".into(),
        other => bail!("unsupported byte order {other}"),
    })
}

/// `cargo build` of the kernel crate with nightly (for `-Z build-std=core`), into `target_dir`.
/// Its output is kept and shown only if it fails.
fn build(target: &str, target_dir: &Path) -> anyhow::Result<()> {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH")?;
    // aya-ebpf reads the architecture's register layout (kprobe arguments) from this cfg.
    let arch = if arch.starts_with("riscv64") {
        "riscv64".to_string()
    } else {
        arch
    };
    // The nightly toolchain through rustup when there is one, else whatever `cargo` is.
    let mut cmd = if which_rustup() {
        let mut c = Command::new("rustup");
        c.args(["run", "nightly", "cargo"]);
        c
    } else {
        Command::new("cargo")
    };
    cmd.args([
        "build",
        "--package",
        PACKAGE,
        "--bins",
        "--release",
        "--target",
    ])
    .arg(target)
    .args(["-Z", "build-std=core", "--target-dir"])
    .arg(target_dir);
    let mut flags = OsString::new();
    flags.push(format!("--cfg=bpf_target_arch=\"{arch}\""));
    flags.push("\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf");
    cmd.env("CARGO_ENCODED_RUSTFLAGS", flags);
    // The outer build's compiler, wrappers (clippy-driver), flags (the fuzz build's
    // sanitizers, the image build's static linking) and target settings are not for the BPF
    // target; left in, they would also change the fingerprints of the kernel crate's host-side
    // build script, and builds would take turns rebuilding it.
    for (key, _) in env::vars_os() {
        let k = key.to_string_lossy();
        if matches!(
            k.as_ref(),
            "RUSTC" | "RUSTC_WRAPPER" | "RUSTC_WORKSPACE_WRAPPER" | "RUSTFLAGS" | "RUSTDOCFLAGS"
        ) || k.starts_with("CARGO_TARGET_")
            || k.starts_with("CARGO_BUILD_")
            || k.starts_with("CARGO_PROFILE_")
        {
            cmd.env_remove(&key);
        }
    }
    let out = cmd.output().with_context(|| {
        format!("running {cmd:?} (is the nightly toolchain installed? `cargo xtask setup`)")
    })?;
    if !out.status.success() {
        bail!(
            "building the kernel programs failed ({}; `cargo xtask setup` installs rust-src and \
             bpf-linker):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn which_rustup() -> bool {
    env::var_os("PATH")
        .is_some_and(|paths| env::split_paths(&paths).any(|dir| dir.join("rustup").is_file()))
}

/// Copies the object into `OUT_DIR` through a temporary name, so a reader never sees half of it.
fn install(built: &Path, dest: &Path) -> anyhow::Result<()> {
    let tmp = dest.with_extension("tmp");
    fs::copy(built, &tmp).with_context(|| format!("copying {}", built.display()))?;
    fs::rename(&tmp, dest).with_context(|| format!("renaming to {}", dest.display()))?;
    Ok(())
}
