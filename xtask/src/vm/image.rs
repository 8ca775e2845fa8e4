//! The guest's initramfs, in three concatenated `newc` cpio archives:
//!
//! * userland (once per invocation): busybox, the workspace binaries at the same absolute
//!   paths as on the host (debug info stripped), iproute2 `ip`, `iptables`/`ip6tables`
//!   (the host's backend, nft, with its xtables extensions), procps `sysctl`, `bpftool`,
//!   and every shared library they load, with the host's symlinks (merged /usr) recreated;
//!   for boots that run the HTTP/2 suite, a second userland archive with its test binary,
//!   nghttp2's `nghttpd`, `nghttp`, `h2load`, iproute2's `ss` and the libraries they add
//!   (ICU's data, through nghttp's libxml2, is most of its size);
//! * kernel (once per kernel): `/init` and the modules the tests need, decompressed, in
//!   dependency order;
//! * command (once per boot): `/vm/cmd.sh`.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Component, Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::Suite;
use super::kernels::{self, Kernel};

/// Modules the guest loads (with their dependencies): veth pairs for the topology,
/// nf_tables + nft_compat for `iptables-nft`, the xtables REJECT targets and tcp match.
pub const MODULES: &[&str] = &[
    "veth",
    "nf_tables",
    "nft_compat",
    "xt_tcpudp",
    "ipt_REJECT",
    "ip6t_REJECT",
];

/// Loaded where they are modules of their own: `nft_counter` (every iptables-nft rule has a
/// counter) is one on 5.10 and part of `nf_tables` from 5.17 on.
pub const OPTIONAL_MODULES: &[&str] = &["nft_counter"];

/// Host tools copied into the guest (found in the usual sbin/bin directories).
const TOOLS: &[&str] = &["ip", "iptables", "ip6tables", "sysctl", "bpftool"];

/// Host tools the HTTP/2 suite adds: the nghttp2 peers, and `ss` (the tests wait for
/// nghttpd's listening socket with it).
pub const H2_TOOLS: &[&str] = &["nghttpd", "nghttp", "h2load", "ss"];

const XTABLES_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/xtables",
    "/usr/lib/xtables",
    "/usr/lib64/xtables",
];

/// A `newc` cpio archive built in memory.
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
    seen: BTreeSet<String>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let name = name.trim_start_matches('/');
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & S_IFDIR != 0 { 2 } else { 1 },
            0, // mtime
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// Claims a path; false if it is already in the archive.
    fn claim(&mut self, path: &str) -> bool {
        self.seen.insert(path.trim_start_matches('/').to_string())
    }

    /// A directory and its parents.
    pub fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        if path.is_empty() {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        if self.claim(path) {
            self.entry(path, S_IFDIR | 0o755, &[], (0, 0));
        }
    }

    fn parent(&mut self, path: &str) {
        if let Some((parent, _)) = path.trim_matches('/').rsplit_once('/') {
            self.dir(parent);
        }
    }

    /// A regular file (replaces nothing: the first one added wins).
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.parent(path);
        if self.claim(path) {
            self.entry(path, S_IFREG | (mode & 0o7777), data, (0, 0));
        }
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.parent(path);
        if self.claim(path) {
            self.entry(path, S_IFLNK | 0o777, target.as_bytes(), (0, 0));
        }
    }

    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) {
        self.parent(path);
        if self.claim(path) {
            self.entry(path, S_IFCHR | 0o600, &[], (major, minor));
        }
    }

    /// A host path at the same place in the guest, with every symlink on the way
    /// recreated (so `/lib64/ld-linux-x86-64.so.2` works with merged /usr). `data`
    /// replaces the final file's content.
    pub fn host_path(&mut self, path: &Path, data: Option<&[u8]>) -> Result<()> {
        self.host_path_depth(path, data, 0)
    }

    fn host_path_depth(&mut self, path: &Path, data: Option<&[u8]>, depth: u32) -> Result<()> {
        if depth > 40 {
            bail!("too many symlinks resolving {}", path.display());
        }
        let comps: Vec<Component> = path.components().collect();
        let mut cur = PathBuf::from("/");
        for (i, comp) in comps.iter().enumerate() {
            match comp {
                Component::RootDir | Component::CurDir | Component::Prefix(_) => continue,
                Component::ParentDir => {
                    cur.pop();
                    continue;
                }
                Component::Normal(n) => cur.push(n),
            }
            let meta =
                fs::symlink_metadata(&cur).with_context(|| format!("reading {}", cur.display()))?;
            let name = cur.to_string_lossy().into_owned();
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&cur)?;
                self.symlink(&name, &target.to_string_lossy());
                let mut rest = if target.is_absolute() {
                    target
                } else {
                    cur.parent().unwrap_or(Path::new("/")).join(target)
                };
                for c in &comps[i + 1..] {
                    rest.push(c);
                }
                return self.host_path_depth(&rest, data, depth + 1);
            } else if meta.is_dir() {
                self.dir(&name);
            } else {
                if i + 1 != comps.len() {
                    bail!("{} is not a directory", cur.display());
                }
                let content;
                let bytes = match data {
                    Some(d) => d,
                    None => {
                        content = fs::read(&cur)?;
                        &content
                    }
                };
                self.file(&name, meta.permissions().mode(), bytes);
            }
        }
        Ok(())
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.buf
    }
}

/// The workspace artefacts to put into the guest (all at their host paths).
pub struct Artefacts {
    pub whoclosed: PathBuf,
    /// Test binary of the `tcp` suite (`tests/tests/e2e_tcp.rs`).
    pub e2e_tcp: PathBuf,
    /// Test binary of the `h2` suite (`tests/tests/e2e_h2.rs`).
    pub e2e_h2: PathBuf,
    pub wc_peer: PathBuf,
}

impl Artefacts {
    /// The test binary of `suite`.
    pub fn e2e(&self, suite: Suite) -> &Path {
        match suite {
            Suite::Tcp => &self.e2e_tcp,
            Suite::H2 => &self.e2e_h2,
        }
    }
}

fn find_tool(name: &str) -> Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("{name} not found on the host (see `cargo xtask setup`)")
}

/// Shared libraries `ldd` lists for an ELF file (the dynamic loader included).
fn ldd(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .with_context(|| format!("ldd {}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // Static binaries: "not a dynamic executable".
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some((_, rhs)) = line.split_once("=>") {
            let rhs = rhs.trim();
            if rhs.starts_with("not found") {
                bail!("{}: {line}", bin.display());
            }
            if let Some(p) = rhs.split_whitespace().next() {
                if p.starts_with('/') {
                    libs.push(PathBuf::from(p));
                }
            }
        } else if line.starts_with('/') {
            if let Some(p) = line.split_whitespace().next() {
                libs.push(PathBuf::from(p));
            }
        }
    }
    Ok(libs)
}

/// `strip --strip-debug` into memory (the debug info of a Rust debug build is most of it
/// and only slows down the guest's initramfs unpacking); the file as is if strip fails.
fn stripped(bin: &Path, tmp: &Path) -> Result<Vec<u8>> {
    let out = tmp.join(format!(
        "stripped-{}",
        bin.file_name().unwrap_or_default().to_string_lossy()
    ));
    let ok = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(bin)
        .status()
        .is_ok_and(|s| s.success());
    let data = if ok { fs::read(&out)? } else { fs::read(bin)? };
    let _ = fs::remove_file(&out);
    Ok(data)
}

/// The base userland archive, and the shared libraries it carries.
pub fn userland(art: &Artefacts, tmp: &Path) -> Result<(Vec<u8>, BTreeSet<PathBuf>)> {
    let mut c = Cpio::default();
    let mut elves: Vec<PathBuf> = Vec::new();
    for d in ["proc", "sys", "dev", "run", "tmp", "root", "etc", "vm/bin"] {
        c.dir(d);
    }
    c.char_dev("dev/console", 5, 1);
    c.char_dev("dev/null", 1, 3);
    // Merged /usr and /var/run -> /run as on the host (iproute2 keeps netns in /var/run).
    for p in ["/bin", "/sbin", "/lib", "/lib64", "/var/run"] {
        if Path::new(p).exists() {
            c.host_path(Path::new(p), None)?;
        }
    }
    let busybox = find_tool("busybox")?;
    c.file("vm/busybox", 0o755, &fs::read(&busybox)?);
    // `sh` and `env` from busybox.
    c.symlink("usr/bin/sh", "/vm/busybox");
    c.symlink("usr/bin/env", "/vm/busybox");
    for bin in [&art.whoclosed, &art.e2e_tcp, &art.wc_peer] {
        let data = stripped(bin, tmp)?;
        c.host_path(bin, Some(&data))?;
        elves.push(bin.clone());
    }
    for t in TOOLS {
        let p = find_tool(t)?;
        c.host_path(&p, None)?;
        elves.push(fs::canonicalize(&p)?);
    }
    if let Some(x) = XTABLES_DIRS.iter().map(Path::new).find(|p| p.is_dir()) {
        for ent in fs::read_dir(x)? {
            let p = ent?.path();
            c.host_path(&p, None)?;
            if p.extension().is_some_and(|e| e == "so") && !p.is_symlink() {
                elves.push(p);
            }
        }
    }
    let mut libs = BTreeSet::new();
    for e in &elves {
        libs.extend(ldd(e)?);
    }
    for l in &libs {
        c.host_path(l, None)?;
    }
    for f in ["/etc/protocols", "/etc/services", "/etc/ethertypes"] {
        if Path::new(f).exists() {
            c.host_path(Path::new(f), None)?;
        }
    }
    c.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    c.file("etc/group", 0o644, b"root:x:0:\n");
    Ok((c.finish(), libs))
}

/// The HTTP/2 suite's archive (unpacked over the base one): its test binary, the tools in
/// [`H2_TOOLS`] and the shared libraries of those that `base_libs` lacks. A missing tool
/// is an error naming its Debian package.
pub fn h2_part(art: &Artefacts, tmp: &Path, base_libs: &BTreeSet<PathBuf>) -> Result<Vec<u8>> {
    let mut c = Cpio::default();
    let data = stripped(&art.e2e_h2, tmp)?;
    c.host_path(&art.e2e_h2, Some(&data))?;
    let mut libs = BTreeSet::new();
    libs.extend(ldd(&art.e2e_h2)?);
    for t in H2_TOOLS {
        let p = find_tool(t).with_context(|| {
            format!(
                "the HTTP/2 suite needs {t} in the guest (nghttp2-server, nghttp2-client, iproute2)"
            )
        })?;
        c.host_path(&p, None)?;
        libs.extend(ldd(&fs::canonicalize(&p)?)?);
    }
    for l in libs.difference(base_libs) {
        c.host_path(l, None)?;
    }
    Ok(c.finish())
}

/// `/init`: mounts, modules, then `/vm/cmd.sh` with its output on ttyS1; its start and its
/// exit code on ttyS2; then power off.
const INIT: &str = r#"#!/vm/busybox sh
/vm/busybox --install -s /vm/bin
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/vm/bin
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /run
# No tmpfs on /tmp: the initramfs is writable already, and a workspace checked out under
# /tmp (a CI clone) carries its binaries there, at the paths the tests have compiled in.
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ulimit -l unlimited
ip link set lo up
for m in $(cat /vm/modules/order); do
    insmod /vm/modules/$m || echo "vm: insmod $m failed"
done
stty -F /dev/ttyS1 raw -echo 2>/dev/null
stty -F /dev/ttyS2 raw -echo 2>/dev/null
echo "@@VM-UP" >/dev/ttyS2
sh /vm/cmd.sh </dev/null >/dev/ttyS1 2>&1
echo "@@VM-EXIT $?" >/dev/ttyS2
sync
poweroff -f
"#;

/// The per-kernel archive: `/init` and the modules.
pub fn kernel_part(k: &Kernel) -> Result<Vec<u8>> {
    let mut c = Cpio::default();
    c.file("init", 0o755, INIT.as_bytes());
    let mut order = String::new();
    for (i, rel) in kernels::module_closure(k, MODULES, OPTIONAL_MODULES)?
        .iter()
        .enumerate()
    {
        let base = rel.rsplit('/').next().unwrap_or(rel);
        let name = format!("{i:02}-{}.ko", base.split(".ko").next().unwrap_or(base));
        c.file(
            &format!("vm/modules/{name}"),
            0o644,
            &kernels::module_bytes(k, rel)?,
        );
        order.push_str(&name);
        order.push('\n');
    }
    c.file("vm/modules/order", 0o644, order.as_bytes());
    Ok(c.finish())
}

/// The per-boot archive: the command script.
pub fn command_part(script: &str) -> Vec<u8> {
    let mut c = Cpio::default();
    c.file("vm/cmd.sh", 0o755, script.as_bytes());
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned() {
        let mut c = Cpio::default();
        c.file("a/b", 0o644, b"xyz");
        c.symlink("a/c", "b");
        let buf = c.finish();
        assert!(buf.starts_with(b"070701"));
        assert_eq!(buf.len() % 4, 0);
        assert!(buf.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
