//! `cargo xtask profile-h2`: where the packet programs spend a bulk HTTP/2 transfer, down to
//! their JIT-ed instructions.
//!
//! `perf annotate` cannot disassemble BPF unless perf was built with libopcodes, and
//! `bpftool prog dump jited` needs libbfd; Debian's builds have neither. So this reads the
//! JIT-ed images itself (`BPF_OBJ_GET_INFO_BY_FD`: `jited_prog_insns`, `jited_ksyms`,
//! `jited_func_lens`) while the tracer runs, disassembles them with `objdump -b binary`,
//! and places perf's leaf samples (`perf script -F ip -G`) on them. Needs `perf` (Debian
//! linux-perf), `objdump` (binutils), nghttpd and h2load. Prints shares of all samples;
//! asserts nothing.

use std::{
    collections::HashMap,
    io::Write as _,
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

#[derive(clap::Args)]
pub struct ProfileArgs {
    /// Seconds of samples, taken 2 s into the transfer.
    #[arg(long, default_value_t = 4)]
    secs: u32,
    /// Hottest instructions shown per program function.
    #[arg(long, default_value_t = 6)]
    top: usize,
    /// Extra arguments for `whoclosed trace` (repeatable), e.g. `--tracer-arg=--no-h2-frames`.
    #[arg(long = "tracer-arg", allow_hyphen_values = true)]
    tracer_args: Vec<String>,
}

/// A child killed and reaped when dropped (error paths included).
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The tracer, stopped with SIGINT when dropped.
struct Tracer(std::process::Child);

impl Drop for Tracer {
    fn drop(&mut self) {
        crate::bench::stop(&mut self.0);
    }
}

/// One JIT-ed function of a loaded program.
struct JitFunc {
    addr: u64,
    name: String,
    code: Vec<u8>,
}

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `struct bpf_prog_info` is read into a buffer this large (the kernel fills what it knows).
const INFO_LEN: usize = 256;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<i64> {
    // SAFETY: bpf(2) with a zero-padded attribute buffer of the size passed.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `BPF_OBJ_GET_INFO_BY_FD` with some fields of the info set first (lengths and buffers).
fn prog_info(fd: i32, set: &[(usize, u64, usize)]) -> std::io::Result<[u8; INFO_LEN]> {
    let mut info = [0u8; INFO_LEN];
    for &(off, val, size) in set {
        info[off..off + size].copy_from_slice(&val.to_ne_bytes()[..size]);
    }
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(fd as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(INFO_LEN as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// The JIT-ed functions of program `id`, named from /proc/kallsyms.
fn jit_funcs(id: u32, names: &HashMap<u64, String>) -> Result<Vec<JitFunc>> {
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&id.to_ne_bytes());
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).with_context(|| format!("program {id}"))? as i32;
    let result = (|| -> Result<Vec<JitFunc>> {
        let first = prog_info(fd, &[])?;
        let len = u32_at(&first, 16) as usize;
        let nr = u32_at(&first, 104) as usize;
        let mut image = vec![0u8; len];
        let mut ksyms = vec![0u64; nr];
        let mut lens = vec![0u32; nr];
        prog_info(
            fd,
            &[
                (16, len as u64, 4),
                (24, image.as_mut_ptr() as u64, 8),
                (104, nr as u64, 4),
                (108, nr as u64, 4),
                (112, ksyms.as_mut_ptr() as u64, 8),
                (120, lens.as_mut_ptr() as u64, 8),
            ],
        )?;
        let mut out = Vec::new();
        let mut pos = 0usize;
        for (addr, l) in ksyms.iter().zip(&lens) {
            let l = *l as usize;
            let code = image
                .get(pos..pos + l)
                .context("JIT image shorter than its functions")?;
            out.push(JitFunc {
                addr: *addr,
                name: names
                    .get(addr)
                    .cloned()
                    .unwrap_or_else(|| format!("prog{id}@{addr:x}")),
                code: code.to_vec(),
            });
            pos += l;
        }
        Ok(out)
    })();
    // SAFETY: closing the fd bpf(2) gave us.
    unsafe { libc::close(fd) };
    result
}

/// Program ids held open by process `pid` (from its fdinfo).
fn prog_ids(pid: u32) -> Vec<u32> {
    let mut ids = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return ids;
    };
    for e in dir.flatten() {
        if let Ok(text) = std::fs::read_to_string(e.path()) {
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("prog_id:") {
                    if let Ok(id) = v.trim().parse() {
                        ids.push(id);
                    }
                }
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Every symbol in /proc/kallsyms (BPF functions included while loaded), by address.
fn kallsyms() -> HashMap<u64, String> {
    let text = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let addr = u64::from_str_radix(it.next()?, 16).ok()?;
            let name = it.nth(1)?;
            Some((addr, name.to_string()))
        })
        .filter(|(a, _)| *a != 0)
        .collect()
}

/// `call 0x<addr>` with the callee's name appended when kallsyms knows it.
fn name_call(text: &str, syms: &HashMap<u64, String>) -> String {
    let target = text
        .strip_prefix("call")
        .map(str::trim)
        .and_then(|t| t.strip_prefix("0x"))
        .and_then(|t| u64::from_str_radix(t, 16).ok());
    match target.and_then(|a| syms.get(&a)) {
        Some(name) => format!("{text}  <{name}>"),
        None => text.to_string(),
    }
}

/// `objdump` of one function: (offset, instruction text).
fn disassemble(f: &JitFunc, scratch: &Path) -> Result<Vec<(u64, String)>> {
    let bin = scratch.join("func.bin");
    std::fs::write(&bin, &f.code)?;
    let out = Command::new("objdump")
        .args(["-D", "-b", "binary", "-mi386:x86-64"])
        .arg(format!("--adjust-vma=0x{:x}", f.addr))
        .arg(&bin)
        .output()
        .context("running objdump (Debian binutils)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let (a, rest) = l.split_once(":\t")?;
            let addr = u64::from_str_radix(a.trim(), 16).ok()?;
            let insn = rest.rsplit('\t').next()?.trim().to_string();
            Some((addr.checked_sub(f.addr)?, insn))
        })
        .collect())
}

fn perf_shares(data: &Path) -> Result<Vec<(f64, String)>> {
    let out = Command::new("perf")
        .args([
            "report",
            "--no-children",
            "--sort",
            "sym",
            "--stdio",
            "-g",
            "none",
            "-i",
        ])
        .arg(data)
        .stderr(Stdio::null())
        .output()
        .context("running perf report")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (pct, rest) = l.trim().split_once('%')?;
            let sym = rest.split("] ").nth(1)?.trim().to_string();
            Some((pct.trim().parse().ok()?, sym))
        })
        .collect())
}

/// A part of the packet path: its name, its share of all samples, and its symbols' shares.
type Group = (&'static str, f64, Vec<(f64, String)>);

/// Which part of the packet path a kernel symbol belongs to, if any.
fn group(sym: &str) -> Option<&'static str> {
    if sym.starts_with("bpf_prog_") {
        Some("the programs' own code")
    } else if [
        "lookup_nulls_elem_raw",
        "htab_map_hash",
        "__htab_map_lookup_elem",
        "bpf_sk_fullsock",
        "bpf_sk_storage_get",
        "bpf_local_storage_lookup",
    ]
    .contains(&sym)
    {
        // Socket storage since 2026-11-27; the hash map's symbols stay for older trees.
        Some("the per-socket state (socket storage)")
    } else if [
        "skb_copy_bits",
        "bpf_skb_load_bytes",
        "__pi_memcpy",
        "memcpy",
    ]
    .contains(&sym)
    {
        Some("loading payload bytes (memcpy partly other callers')")
    } else if ["__cgroup_bpf_run_filter_skb", "__bpf_prog_run_save_cb"].contains(&sym) {
        Some("the cgroup hook around the programs")
    } else if sym.starts_with("bpf_") || sym.contains("ringbuf") {
        Some("other BPF helpers")
    } else {
        None
    }
}

pub fn h2(root: &Path, args: &ProfileArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("whoclosed-profile-h2-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(root, args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(root: &Path, args: &ProfileArgs, dir: &Path) -> Result<()> {
    std::fs::write(dir.join("blob"), vec![0x5au8; 1 << 20])?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let server = Reap(
        Command::new("nghttpd")
            .args(["--no-tls", "-a", "127.0.0.1", "-d"])
            .arg(dir)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nghttpd (Debian nghttp2-server)")?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nghttpd did not listen on 127.0.0.1:{port}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let mut cmd = Command::new(root.join("target/release/whoclosed"));
    cmd.args(["trace", "--linger-ms", "200"])
        .args(&args.tracer_args);
    let tracer = Tracer(crate::bench::start_tracer(cmd, |l| {
        l.contains("\"type\":\"ready\"")
    })?);
    // Enough requests to outlast the samples at about 3 GB/s.
    let requests = (args.secs + 4) * 4000;
    let load = Reap(
        Command::new("h2load")
            .args(["-n", &requests.to_string(), "-c", "4", "-m", "10"])
            .arg(format!("http://127.0.0.1:{port}/blob"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting h2load (Debian nghttp2-client)")?,
    );
    thread::sleep(Duration::from_secs(2));
    let data = dir.join("perf.data");
    let perf = Command::new("perf")
        .args(["record", "-a", "-g", "-o"])
        .arg(&data)
        .args(["--", "sleep", &args.secs.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    // The programs must still be loaded to read their images.
    let names = kallsyms();
    let funcs: Result<Vec<JitFunc>> = prog_ids(tracer.0.id())
        .into_iter()
        .map(|id| jit_funcs(id, &names))
        .collect::<Result<Vec<_>>>()
        .map(|v| v.into_iter().flatten().collect());
    drop(load);
    drop(tracer);
    drop(server);
    if !perf.context("running perf (Debian linux-perf)")?.success() {
        bail!("perf record failed");
    }
    let funcs = funcs?;

    let shares = perf_shares(&data)?;
    let mut groups: Vec<Group> = Vec::new();
    for (pct, sym) in &shares {
        if let Some(g) = group(sym) {
            match groups.iter_mut().find(|x| x.0 == g) {
                Some(x) => {
                    x.1 += pct;
                    x.2.push((*pct, sym.clone()));
                }
                None => groups.push((g, *pct, vec![(*pct, sym.clone())])),
            }
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "h2load on loopback (1 MiB responses, 4 connections x 10 streams), {} s of `perf record -a -g`{}",
        args.secs,
        if args.tracer_args.is_empty() {
            String::new()
        } else {
            format!(", tracer {}", args.tracer_args.join(" "))
        }
    )?;
    writeln!(out, "\nshare of all samples (idle included)")?;
    for (g, total, syms) in &groups {
        writeln!(out, "{total:6.2} %  {g}")?;
        for (pct, sym) in syms.iter().take(8) {
            writeln!(out, "            {pct:5.2} %  {sym}")?;
        }
    }

    let ips = Command::new("perf")
        .args(["script", "-F", "ip", "-G", "-i"])
        .arg(&data)
        .stderr(Stdio::null())
        .output()
        .context("running perf script")?;
    let mut counts: HashMap<u64, u64> = HashMap::new();
    let mut total = 0u64;
    for l in String::from_utf8_lossy(&ips.stdout).lines() {
        if let Ok(ip) = u64::from_str_radix(l.trim(), 16) {
            *counts.entry(ip).or_default() += 1;
            total += 1;
        }
    }
    writeln!(
        out,
        "\nhottest JIT-ed instructions ({total} leaf samples; a sample often lands on the \
         instruction after a slow one)"
    )?;
    for f in &funcs {
        let end = f.addr + f.code.len() as u64;
        let mut hot: Vec<(u64, u64)> = counts
            .iter()
            .filter(|(ip, _)| **ip >= f.addr && **ip < end)
            .map(|(ip, c)| (*ip - f.addr, *c))
            .collect();
        let n: u64 = hot.iter().map(|h| h.1).sum();
        if n == 0 {
            continue;
        }
        hot.sort_by_key(|h| std::cmp::Reverse(h.1));
        writeln!(
            out,
            "\n{} ({} bytes): {n} samples, {:.2} %",
            f.name,
            f.code.len(),
            100.0 * n as f64 / total.max(1) as f64
        )?;
        let insns = disassemble(f, dir)?;
        for (off, c) in hot.iter().take(args.top) {
            let Some(i) = insns.iter().position(|(o, _)| o == off) else {
                continue;
            };
            writeln!(out, "  {c:5} at +0x{off:x}")?;
            for (o, text) in &insns[i.saturating_sub(2)..=i] {
                writeln!(out, "          +0x{o:<5x} {}", name_call(text, &names))?;
            }
        }
    }
    Ok(())
}
