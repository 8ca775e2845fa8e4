//! `cargo xtask bench-packet`: the per-segment cost of the packet programs, measured without
//! traffic. The agent attaches as usual; then `BPF_PROG_TEST_RUN` (through `bpftool prog
//! run`) runs its `skb_egress` and `skb_ingress` programs many times on crafted segments,
//! and the kernel reports the average run time. Unlike `bench-h2`, whose throughput pairs
//! spread by ±10 % on this VM, repeated samples here agree within a few nanoseconds, so a
//! change to the fixed per-segment path shows up.
//!
//! What a test run is: each `bpftool prog run` call gives the program a fresh socket that
//! is not TCP, so the acceptance check takes its early exit (no `tcp_sock`); the first of
//! the repeated runs creates the per-socket state and the others find it; the payload is
//! not HTTP/2, so the walker gives up within the first runs. The figure is the fixed path
//! of a known socket plus the test harness's own loop (about 30 ns here, measured with an
//! empty program). The frame walk over real HTTP/2 traffic is measured by `bench-h2`.
//! It asserts nothing: numbers are for people to read.

use std::{collections::HashSet, path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::bench::{start_tracer, stop};

#[derive(clap::Args)]
pub struct PacketArgs {
    /// Runs per sample (the kernel averages over them).
    #[arg(long, default_value_t = 2_000_000, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Samples per segment and program; the table gives their median and minimum.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..))]
    samples: u32,
}

/// A crafted frame as `BPF_PROG_TEST_RUN` takes it for cgroup_skb: an Ethernet header
/// (stripped by the kernel), then IP and TCP.
fn segment(v6: bool, payload: usize) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
    let tcp_len = 20 + payload;
    if v6 {
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        f.extend_from_slice(&[6, 64]); // next header TCP, hop limit
        f.extend_from_slice(&[0; 15]);
        f.push(1); // ::1
        f.extend_from_slice(&[0; 15]);
        f.push(1);
    } else {
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]); // id, DF, TTL 64, TCP, checksum
        f.extend_from_slice(&[127, 0, 0, 1, 127, 0, 0, 2]);
    }
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&8080u16.to_be_bytes());
    f.extend_from_slice(&1000u32.to_be_bytes()); // seq
    f.extend_from_slice(&2000u32.to_be_bytes()); // ack
    let flags = if payload > 0 { 0x18 } else { 0x10 }; // PSH|ACK or ACK
    f.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    f.resize(f.len() + payload, 0);
    f
}

fn prog_ids() -> Result<Vec<(u64, String)>> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .context("running bpftool (Debian bpftool)")?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing `bpftool prog show --json`")?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_string())))
        .collect())
}

/// One sample: the kernel's average run time in ns over `repeat` runs.
fn sample(id: u64, data: &Path, repeat: u32) -> Result<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "run", "id", &id.to_string(), "data_in"])
        .arg(data)
        .args(["repeat", &repeat.to_string()])
        .output()
        .context("running bpftool prog run")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "bpftool prog run: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    if v["retval"].as_u64() != Some(1) {
        bail!("program {id} returned {} (expected 1, pass)", v["retval"]);
    }
    v["duration"]
        .as_u64()
        .with_context(|| format!("no duration in {v}"))
}

pub fn packet(root: &Path, args: &PacketArgs) -> Result<()> {
    let before: HashSet<u64> = prog_ids()?.into_iter().map(|(id, _)| id).collect();
    let mut cmd = Command::new(root.join("target/release/whoclosed"));
    cmd.args(["trace", "--linger-ms", "200"]);
    let mut tracer = start_tracer(cmd, |l| l.contains("\"type\":\"ready\""))?;
    let r = measure(&before, args);
    stop(&mut tracer);
    r
}

fn measure(before: &HashSet<u64>, args: &PacketArgs) -> Result<()> {
    let ours: Vec<(u64, String)> = prog_ids()?
        .into_iter()
        .filter(|(id, name)| !before.contains(id) && name.starts_with("skb_"))
        .collect();
    let find = |name: &str| {
        ours.iter()
            .find(|(_, n)| n == name)
            .map(|(id, _)| *id)
            .with_context(|| {
                format!("the agent loaded no {name} program (packet facts off? see its log)")
            })
    };
    let progs = [
        ("skb_egress", find("skb_egress")?),
        ("skb_ingress", find("skb_ingress")?),
    ];
    let dir = std::env::temp_dir().join(format!("whoclosed-bench-packet-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let segments = [
        ("IPv4 bare ACK", segment(false, 0)),
        ("IPv4 1000-byte payload", segment(false, 1000)),
        ("IPv6 bare ACK", segment(true, 0)),
    ];
    println!(
        "BPF_PROG_TEST_RUN, {} runs per sample, {} samples (median / minimum ns per run)",
        args.repeat, args.samples
    );
    println!(
        "{:<26} {:>16} {:>16}",
        "segment", "skb_egress", "skb_ingress"
    );
    let result = (|| -> Result<()> {
        for (i, (label, bytes)) in segments.iter().enumerate() {
            let file = dir.join(format!("seg{i}"));
            std::fs::write(&file, bytes)?;
            let mut cells = Vec::new();
            for (_, id) in progs {
                let mut v = (0..args.samples)
                    .map(|_| sample(id, &file, args.repeat))
                    .collect::<Result<Vec<u64>>>()?;
                v.sort_unstable();
                cells.push(format!("{} / {}", v[v.len() / 2], v[0]));
            }
            println!("{:<26} {:>16} {:>16}", label, cells[0], cells[1]);
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::segment;

    #[test]
    fn crafted_segments_have_consistent_lengths() {
        let v4 = segment(false, 1000);
        assert_eq!(v4.len(), 14 + 20 + 20 + 1000);
        assert_eq!(u16::from_be_bytes([v4[16], v4[17]]), 1040); // IPv4 total length
        assert_eq!(v4[14 + 20 + 13], 0x18);
        let v6 = segment(true, 0);
        assert_eq!(v6.len(), 14 + 40 + 20);
        assert_eq!(u16::from_be_bytes([v6[18], v6[19]]), 20); // IPv6 payload length
        assert_eq!(v6[14 + 40 + 12] >> 4, 5); // TCP data offset
    }
}
