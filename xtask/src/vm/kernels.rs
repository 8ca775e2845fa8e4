//! Stock Debian kernels: resolved and downloaded once with a private apt state, unpacked
//! with `dpkg-deb -x`, `depmod -b` run on the tree, and the uncompressed `vmlinux` pulled
//! out of the bzImage (QEMU boots it directly through its PVH entry, which is faster under
//! TCG than letting the kernel decompress itself).
//!
//! Layout (outside the repository): `~/.cache/whoclosed/kernels/<alias>/` with `kernel.json`
//! (what was resolved), `debs/`, `root/` (the unpacked packages) and `vmlinux`;
//! `~/.cache/whoclosed/apt/<suite>/` holds the private apt state of each suite.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

/// A kernel of the matrix: which Debian suite(s) and metapackage it comes from.
pub struct KernelSpec {
    /// Name used on the command line (`--kernel 6.1`).
    pub alias: &'static str,
    /// Suites to resolve the metapackage in; with several, the highest version wins.
    pub suites: &'static [&'static str],
    /// Metapackage naming the flavour (`linux-image-cloud-amd64`).
    pub meta: &'static str,
}

/// The `cloud` flavour is enough everywhere: veth, nf_tables + nft_compat, the xtables
/// REJECT targets and IPv6 are modules (or built in) in all four (checked when the
/// initramfs is built: a missing module is an error naming it).
pub const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        alias: "5.10",
        suites: &["bullseye"],
        meta: "linux-image-cloud-amd64",
    },
    KernelSpec {
        alias: "6.1",
        suites: &["bookworm"],
        meta: "linux-image-cloud-amd64",
    },
    KernelSpec {
        alias: "6.12",
        suites: &["trixie"],
        meta: "linux-image-cloud-amd64",
    },
    KernelSpec {
        alias: "newest",
        suites: &["trixie-backports", "sid"],
        meta: "linux-image-cloud-amd64",
    },
];

/// A downloaded, unpacked kernel.
#[derive(Clone, Debug, Default)]
pub struct Kernel {
    pub alias: String,
    pub suite: String,
    /// Debian package version (`6.1.176-1`).
    pub version: String,
    /// `uname -r` (`6.1.0-50-cloud-amd64`).
    pub release: String,
    pub packages: Vec<String>,
    /// Directory holding `lib/modules/<release>` (with `modules.dep`).
    pub root: PathBuf,
    /// Uncompressed ELF kernel (PVH entry), or the bzImage if it could not be extracted.
    pub image: PathBuf,
}

impl Kernel {
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }

    /// `6.1.176` out of `6.1.176-1` (or `7.3.4-1~bpo13+1`).
    pub fn upstream_version(&self) -> &str {
        self.version
            .split(['-', '~', '+'])
            .next()
            .unwrap_or(&self.version)
    }

    /// `6.1 (6.1.176, bookworm)`.
    pub fn label(&self) -> String {
        format!(
            "{} ({}, {})",
            self.alias,
            self.upstream_version(),
            self.suite
        )
    }
}

pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("WHOCLOSED_VM_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/whoclosed")
}

pub fn spec(alias: &str) -> Result<&'static KernelSpec> {
    KERNELS.iter().find(|k| k.alias == alias).with_context(|| {
        let known: Vec<_> = KERNELS.iter().map(|k| k.alias).collect();
        format!("unknown kernel {alias:?}; known: {}", known.join(", "))
    })
}

/// Downloads and unpacks the kernel unless it is cached (`refresh` re-resolves it).
pub fn prepare(spec: &KernelSpec, refresh: bool) -> Result<Kernel> {
    let dir = cache_dir().join("kernels").join(spec.alias);
    let meta = dir.join("kernel.json");
    if !refresh {
        if let Some(k) = load(&dir, &meta) {
            return Ok(k);
        }
    }
    let (suite, version, packages) = resolve(spec)?;
    if let Some(k) = load(&dir, &meta) {
        if k.version == version && k.suite == suite {
            return Ok(k);
        }
    }
    eprintln!(
        "vm: downloading kernel {} ({suite} {version}: {})",
        spec.alias,
        packages.join(" ")
    );
    let debs = dir.join("debs");
    let root = dir.join("root");
    for d in [&debs, &root] {
        if d.exists() {
            fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
        fs::create_dir_all(d)?;
    }
    let _ = fs::remove_file(&meta);
    let mut dl = apt(&suite, "apt-get")?;
    dl.arg("download").args(&packages).current_dir(&debs);
    super::host::run_quiet(&mut dl)?;
    for ent in fs::read_dir(&debs)? {
        let deb = ent?.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            super::host::run_quiet(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        }
    }
    // From trixie on, modules live in usr/lib/modules; depmod -b wants <base>/lib/modules.
    if !root.join("lib").exists() && root.join("usr/lib/modules").exists() {
        std::os::unix::fs::symlink("usr/lib", root.join("lib"))?;
    }
    let release = only_subdir(&root.join("lib/modules"))?;
    let mod_dir = root.join("lib/modules").join(&release);
    let vmlinuz = [
        root.join("boot").join(format!("vmlinuz-{release}")),
        mod_dir.join("vmlinuz"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .with_context(|| format!("no vmlinuz for {release} in {}", root.display()))?;
    super::host::run_quiet(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    let vmlinux = dir.join("vmlinux");
    let image = match extract_vmlinux(&vmlinuz, &vmlinux) {
        Ok(()) => vmlinux,
        Err(e) => {
            eprintln!("vm: booting the compressed image of {release}: {e:#}");
            vmlinuz
        }
    };
    let k = Kernel {
        alias: spec.alias.to_string(),
        suite,
        version,
        release,
        packages,
        root,
        image,
    };
    let v = json!({
        "alias": k.alias, "suite": k.suite, "version": k.version, "release": k.release,
        "packages": k.packages, "image": k.image,
    });
    fs::write(&meta, serde_json::to_string_pretty(&v)?)?;
    Ok(k)
}

fn load(dir: &Path, meta: &Path) -> Option<Kernel> {
    let v: Value = serde_json::from_slice(&fs::read(meta).ok()?).ok()?;
    let s = |k: &str| v[k].as_str().map(str::to_string);
    let k = Kernel {
        alias: s("alias")?,
        suite: s("suite")?,
        version: s("version")?,
        release: s("release")?,
        packages: v["packages"]
            .as_array()?
            .iter()
            .filter_map(|p| p.as_str().map(str::to_string))
            .collect(),
        root: dir.join("root"),
        image: PathBuf::from(s("image")?),
    };
    (k.image.exists() && k.modules_dir().join("modules.dep").exists()).then_some(k)
}

fn only_subdir(dir: &Path) -> Result<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.len() != 1 {
        bail!(
            "expected one kernel release in {}, found {names:?}",
            dir.display()
        );
    }
    Ok(names.remove(0))
}

/// The host's Debian archive URI (its apt sources, security and updates suites excluded),
/// or `$WHOCLOSED_VM_MIRROR`.
fn mirror() -> Result<String> {
    if let Ok(m) = std::env::var("WHOCLOSED_VM_MIRROR") {
        return Ok(m);
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        // deb822 stanzas: URIs + Suites.
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza.lines().find_map(|l| {
                    l.strip_prefix(name)
                        .and_then(|r| r.strip_prefix(':'))
                        .map(|r| r.trim().to_string())
                })
            };
            if let (Some(uris), Some(suites)) = (field("URIs"), field("Suites")) {
                if !suites.contains("security") && uris.contains("debian") {
                    if let Some(u) = uris.split_whitespace().next() {
                        return Ok(u.trim_end_matches('/').to_string());
                    }
                }
            }
        }
        // One-line format: deb [opts] URI suite components.
        for l in text.lines() {
            let mut w = l.split_whitespace().peekable();
            if w.next() != Some("deb") {
                continue;
            }
            if w.peek().is_some_and(|x| x.starts_with('[')) {
                for x in w.by_ref() {
                    if x.ends_with(']') {
                        break;
                    }
                }
            }
            if let (Some(uri), Some(suite)) = (w.next(), w.next()) {
                if !suite.contains("security") && uri.contains("debian") {
                    return Ok(uri.trim_end_matches('/').to_string());
                }
            }
        }
    }
    bail!("no Debian archive in the host's apt sources; set WHOCLOSED_VM_MIRROR to one")
}

/// `apt-get`/`apt-cache` on a private state for one suite (nothing of the host's package
/// state or sources is read or changed).
fn apt(suite: &str, tool: &str) -> Result<Command> {
    let state = cache_dir().join("apt").join(suite);
    for d in [
        "lists/partial",
        "cache/archives/partial",
        "sources.list.d",
        "prefs.d",
    ] {
        fs::create_dir_all(state.join(d))?;
    }
    let list = state.join("sources.list");
    let line = format!(
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {} {suite} main\n",
        mirror()?
    );
    if fs::read_to_string(&list).ok().as_deref() != Some(line.as_str()) {
        fs::write(&list, line)?;
    }
    let mut c = Command::new(tool);
    let o = |k: &str, v: &Path| format!("{k}={}", v.display());
    for opt in [
        o("Dir::Etc::sourcelist", &list),
        o("Dir::Etc::sourceparts", &state.join("sources.list.d")),
        o("Dir::Etc::preferencesparts", &state.join("prefs.d")),
        "Dir::Etc::preferences=/dev/null".into(),
        o("Dir::State::Lists", &state.join("lists")),
        o("Dir::Cache", &state.join("cache")),
        "Dir::State::status=/dev/null".into(),
        "APT::Sandbox::User=root".into(),
        "Acquire::Languages=none".into(),
        "APT::Architecture=amd64".into(),
        "APT::Architectures=amd64".into(),
        "Debug::NoLocking=1".into(),
    ] {
        c.arg("-o").arg(opt);
    }
    Ok(c)
}

fn apt_output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Field `name` of the first stanza of `apt-cache show` output.
fn show_field(show: &str, name: &str) -> Option<String> {
    let stanza = show.split("\n\n").next()?;
    stanza.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|r| r.strip_prefix(':'))
            .map(|r| r.trim().to_string())
    })
}

fn dep_names(depends: &str) -> Vec<String> {
    depends
        .split(',')
        .flat_map(|alt| alt.split('|'))
        .filter_map(|d| d.split_whitespace().next().map(str::to_string))
        .collect()
}

/// (suite, version, packages to download) for the spec's highest version.
fn resolve(spec: &KernelSpec) -> Result<(String, String, Vec<String>)> {
    let mut best: Option<(String, String, Vec<String>)> = None;
    for suite in spec.suites {
        let mut update = apt(suite, "apt-get")?;
        update.args(["update", "-qq"]);
        super::host::run_quiet(&mut update)
            .with_context(|| format!("apt-get update for {suite}"))?;
        let show = apt_output(apt(suite, "apt-cache")?.args(["show", spec.meta]))?;
        let depends = show_field(&show, "Depends").unwrap_or_default();
        let image = dep_names(&depends)
            .into_iter()
            .find(|d| d.starts_with("linux-image-"))
            .with_context(|| format!("{} in {suite} depends on no linux-image-*", spec.meta))?;
        let show = apt_output(apt(suite, "apt-cache")?.args(["show", &image]))?;
        let version = show_field(&show, "Version").context("no Version")?;
        let mut packages = vec![image.clone()];
        // From trixie on the image package is a stub depending on linux-binary + modules.
        let depends = show_field(&show, "Depends").unwrap_or_default();
        for d in dep_names(&depends) {
            if (d.starts_with("linux-binary-") || d.starts_with("linux-modules-"))
                && !packages.contains(&d)
            {
                packages.push(d);
            }
        }
        let newer = match &best {
            None => true,
            Some((_, v, _)) => Command::new("dpkg")
                .args(["--compare-versions", &version, "gt", v])
                .status()
                .is_ok_and(|s| s.success()),
        };
        if newer {
            best = Some((suite.to_string(), version, packages));
        }
    }
    best.context("no suite")
}

/// Finds the compressed payload in a bzImage and decompresses it (like the kernel's
/// `scripts/extract-vmlinux`): try every magic, keep the first output that is an ELF file.
fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<()> {
    let data = fs::read(bzimage)?;
    let formats: [(&[u8], &str, &[&str]); 4] = [
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd", &["-d", "-c", "-q"]),
        (&[0x02, 0x21, 0x4c, 0x18], "lz4", &["-d", "-c", "-q"]),
        (
            &[0xfd, b'7', b'z', b'X', b'Z', 0x00],
            "xz",
            &["-d", "-c", "-q"],
        ),
        (&[0x1f, 0x8b, 0x08], "gzip", &["-d", "-c", "-q"]),
    ];
    for (magic, tool, args) in formats {
        let mut pos = 0;
        while let Some(off) = find(&data[pos..], magic).map(|o| o + pos) {
            pos = off + 1;
            let mut child = match Command::new(tool)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
            {
                Ok(c) => c,
                Err(_) => break, // tool missing: try the next format
            };
            let Some(mut stdin) = child.stdin.take() else {
                break; // no pipe to feed: treat like a missing tool
            };
            let tail = data[off..].to_vec();
            let writer = std::thread::spawn(move || {
                let _ = stdin.write_all(&tail);
            });
            let result = child.wait_with_output()?;
            let _ = writer.join();
            if result.stdout.starts_with(b"\x7fELF") {
                fs::write(out, &result.stdout)?;
                return Ok(());
            }
        }
    }
    bail!("no compressed ELF payload found in {}", bzimage.display())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Modules to load, dependencies first, as paths relative to the modules dir. Names that
/// are built into the kernel are left out; a name that is neither is an error.
/// `optional` names are loaded only where they exist as modules (elsewhere they are part of
/// another module or missing, which is fine).
pub fn module_closure(k: &Kernel, names: &[&str], optional: &[&str]) -> Result<Vec<String>> {
    let dir = k.modules_dir();
    let norm = |s: &str| s.replace('-', "_");
    let dep_text = fs::read_to_string(dir.join("modules.dep"))?;
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in dep_text.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        deps.insert(
            norm(module_name(path)),
            (
                path.to_string(),
                rest.split_whitespace().map(str::to_string).collect(),
            ),
        );
    }
    let builtin: BTreeSet<String> = fs::read_to_string(dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(|l| norm(module_name(l)))
        .collect();
    let mut order: Vec<String> = Vec::new();
    fn visit(path: &str, deps: &BTreeMap<String, (String, Vec<String>)>, order: &mut Vec<String>) {
        if order.iter().any(|p| p == path) {
            return;
        }
        let name = module_name(path).replace('-', "_");
        if let Some((_, ds)) = deps.get(&name) {
            for d in ds {
                visit(d, deps, order);
            }
        }
        order.push(path.to_string());
    }
    let mut missing = Vec::new();
    for n in names {
        match deps.get(&norm(n)) {
            Some((path, _)) => visit(path, &deps, &mut order),
            None if builtin.contains(&norm(n)) => {}
            None => missing.push(*n),
        }
    }
    for n in optional {
        if let Some((path, _)) = deps.get(&norm(n)) {
            visit(path, &deps, &mut order);
        }
    }
    if !missing.is_empty() {
        bail!(
            "kernel {} ({}) has no module {missing:?}, neither loadable nor built in",
            k.alias,
            k.release
        );
    }
    Ok(order)
}

/// `veth` out of `kernel/drivers/net/veth.ko.xz`.
fn module_name(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.split(".ko").next().unwrap_or(base)
}

/// A module's bytes, decompressed (`.ko.xz`, `.ko.zst`, `.ko.gz`) for busybox `insmod`.
pub fn module_bytes(k: &Kernel, rel: &str) -> Result<Vec<u8>> {
    let path = k.modules_dir().join(rel);
    let tool = if rel.ends_with(".xz") {
        Some("xz")
    } else if rel.ends_with(".zst") {
        Some("zstd")
    } else if rel.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => Ok(fs::read(&path)?),
        Some(t) => {
            let out = Command::new(t)
                .args(["-d", "-c", "-q"])
                .arg(&path)
                .output()
                .with_context(|| format!("running {t}"))?;
            if !out.status.success() {
                bail!("{t} -dc {} failed", path.display());
            }
            Ok(out.stdout)
        }
    }
}
