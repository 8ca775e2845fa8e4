//! Privileged: after the agent stops (SIGINT, SIGTERM) or is killed (`kill -9`), none of
//! its BPF programs or links stays in the kernel, so nothing stays attached (cgroup_skb at
//! the cgroup root, tracepoints, tcp_close).
//!
//! Programs are told apart from other tracers' (and other test runs' agents, which load
//! the same program names) by id: while the agent runs, the ids of its programs and links
//! are read from its `/proc/<pid>/fdinfo`. Anything still attached holds a reference to its
//! program, so "the program id no longer exists" proves nothing of ours is attached. The
//! cgroup tree is checked directly too. A panic ends the process like `kill -9` does as far
//! as the kernel is concerned (the file descriptors are closed by exit).
//! Skipped when not root unless `WHOCLOSED_E2E=require`.

use anyhow::{Context, Result, bail};
use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::{READY_TIMEOUT, agent_bin, should_run};

/// Bound for the kernel to free programs after the last reference went away.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Ids {
    progs: BTreeSet<u64>,
    links: BTreeSet<u64>,
}

/// Program and link ids behind the BPF file descriptors of `pid`.
fn bpf_ids(pid: u32) -> Result<Ids> {
    let mut ids = Ids::default();
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(entry) = entry else { continue };
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
        };
        if let Some(link) = field("link_id:") {
            ids.links.insert(link);
        }
        if let Some(prog) = field("prog_id:") {
            ids.progs.insert(prog);
        }
    }
    Ok(ids)
}

fn bpftool_ok(args: &[&str]) -> bool {
    Command::new("bpftool")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Ids of the programs attached anywhere in the cgroup v2 hierarchy.
fn cgroup_prog_ids() -> Result<BTreeSet<u64>> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "tree"])
        .output()
        .context("running bpftool cgroup tree")?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing bpftool cgroup tree")?;
    let mut ids = BTreeSet::new();
    for cg in v.as_array().into_iter().flatten() {
        for p in cg["programs"].as_array().into_iter().flatten() {
            if let Some(id) = p["id"].as_u64() {
                ids.insert(id);
            }
        }
    }
    Ok(ids)
}

/// Waits until none of `ids` exists any more; returns what is left after the timeout.
fn wait_released(ids: &Ids) -> Result<Vec<String>> {
    let deadline = Instant::now() + RELEASE_TIMEOUT;
    loop {
        let mut left = Vec::new();
        let cg = cgroup_prog_ids()?;
        for p in &ids.progs {
            if bpftool_ok(&["prog", "show", "id", &p.to_string()]) {
                left.push(format!("program {p}"));
            }
            if cg.contains(p) {
                left.push(format!("program {p} attached to a cgroup"));
            }
        }
        for l in &ids.links {
            if bpftool_ok(&["link", "show", "id", &l.to_string()]) {
                left.push(format!("link {l}"));
            }
        }
        if left.is_empty() || Instant::now() >= deadline {
            return Ok(left);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts `whoclosed trace`, waits until it is attached (its ready line), and returns it
/// with its BPF ids.
fn start() -> Result<(std::process::Child, Ids)> {
    let mut child = Command::new(agent_bin())
        .args(["trace", "--linger-ms", "300"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning the agent")?;
    let stdout = child.stdout.take().context("agent stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains("\"ready\"") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(READY_TIMEOUT).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        bail!("agent not ready within {READY_TIMEOUT:?}");
    }
    let ids = bpf_ids(child.id())?;
    Ok((child, ids))
}

fn stop_with(signal: i32, name: &str) {
    let (mut child, ids) = match start() {
        Ok(x) => x,
        Err(e) => panic!("{name}: {e:#}"),
    };
    assert!(
        ids.progs.len() >= 3,
        "{name}: the running agent holds only {:?}; expected its programs",
        ids
    );
    let attached_cg: Vec<u64> = cgroup_prog_ids()
        .expect("cgroup tree")
        .intersection(&ids.progs)
        .copied()
        .collect();
    assert!(
        !attached_cg.is_empty(),
        "{name}: none of {:?} is attached to a cgroup while running",
        ids.progs
    );
    // The check below can fail: while the agent runs, its programs exist.
    for p in &ids.progs {
        assert!(
            bpftool_ok(&["prog", "show", "id", &p.to_string()]),
            "{name}: bpftool does not see running program {p}"
        );
    }
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, signal) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name}: agent still running 10 s after the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = wait_released(&ids).expect("bpftool");
    assert!(
        left.is_empty(),
        "{name}: still in the kernel {RELEASE_TIMEOUT:?} after the agent ended: {left:?}"
    );
}

#[test]
fn nothing_attached_after_sigint() {
    if should_run("nothing_attached_after_sigint") {
        stop_with(libc::SIGINT, "SIGINT");
    }
}

#[test]
fn nothing_attached_after_sigterm() {
    if should_run("nothing_attached_after_sigterm") {
        stop_with(libc::SIGTERM, "SIGTERM");
    }
}

#[test]
fn nothing_attached_after_kill_9() {
    if should_run("nothing_attached_after_kill_9") {
        stop_with(libc::SIGKILL, "kill -9");
    }
}
