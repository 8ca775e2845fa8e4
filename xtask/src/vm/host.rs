//! Host prerequisites of `cargo xtask vm`: QEMU, a static busybox, the decompressors.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Runs a command, showing its output only if it fails.
pub fn run_quiet(cmd: &mut Command) -> Result<()> {
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
pub const VM_DEBS: &[(&str, &str)] = &[
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

pub fn have(tool: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(tool).exists())
}

/// Installs the missing host packages (QEMU, static busybox, decompressors).
pub fn check_host_tools() -> Result<()> {
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

pub fn is_static(path: &str) -> bool {
    Command::new("ldd")
        .arg(path)
        .output()
        .is_ok_and(|o| !o.status.success())
}
