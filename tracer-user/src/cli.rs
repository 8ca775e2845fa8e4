//! Command line.

use std::{net::IpAddr, time::Duration};

use clap::{Parser, Subcommand};

use crate::{
    export::Filter,
    probes::ProbeMode,
    trace::{Format, TraceOptions},
};

/// whoclosed: who ended each TCP connection — client, server or a middlebox — with evidence.
#[derive(Debug, Parser)]
#[command(name = "whoclosed", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace TCP connections and print one verdict per ended socket (needs root).
    Trace(TraceArgs),
}

#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    /// Output format: NDJSON (versioned, see docs/events.md) or a table for people.
    #[arg(short = 'o', long = "output", value_enum, default_value = "json")]
    pub output: Format,
    /// Only print sockets whose local or remote port is one of these (repeatable).
    #[arg(long = "port")]
    pub ports: Vec<u16>,
    /// Only print sockets whose local or remote address is one of these (repeatable).
    #[arg(long = "addr")]
    pub addrs: Vec<IpAddr>,
    /// Only print sockets owned by this process id.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Only print sockets owned by a process with this command name.
    #[arg(long)]
    pub comm: Option<String>,
    /// Only print sockets in these network namespaces (inode numbers, repeatable).
    #[arg(long = "netns")]
    pub netns: Vec<u32>,
    /// How long to wait after a socket closes for late evidence before judging it.
    #[arg(long, default_value_t = 1000)]
    pub linger_ms: u64,
    /// How to observe tcp_close(): auto picks fentry, then kprobe, then tracepoints only.
    #[arg(long, value_enum, default_value = "auto")]
    pub probe_mode: ProbeMode,
    /// Print which probes loaded, in which mode, and why others did not; then exit.
    #[arg(long)]
    pub probe_report: bool,
    /// Ring buffer size in KiB (a power of two).
    #[arg(long, default_value_t = 4096)]
    pub ringbuf_kib: u32,
    /// Do not attach the cgroup_skb packet hooks (FIN/RST direction and TTL evidence).
    #[arg(long)]
    pub no_packets: bool,
    /// Most connections tracked at once; more are counted as dropped.
    #[arg(long, default_value_t = 65_536)]
    pub max_conns: usize,
    /// Treat only these network namespaces (inodes, repeatable) as this host: events from
    /// all others are discarded before any joining, as if those sockets lived on another
    /// node (the single-ended view; unlike --netns, which only filters what is printed).
    #[arg(long = "visible-netns")]
    pub visible_netns: Vec<u32>,
    /// Sockets the kernel keeps packet state for (an LRU map; least recently used entries
    /// are evicted beyond it, counted as `skmap_evictions`).
    #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub max_sockets: u32,
}

impl TraceArgs {
    pub fn into_options(self) -> anyhow::Result<TraceOptions> {
        let ringbuf_bytes = self
            .ringbuf_kib
            .checked_mul(1024)
            .ok_or_else(|| anyhow::anyhow!("--ringbuf-kib {} is too large", self.ringbuf_kib))?;
        Ok(TraceOptions {
            format: self.output,
            filter: Filter {
                ports: self.ports,
                addrs: self.addrs,
                netns: self.netns,
                pid: self.pid,
                comm: self.comm,
            },
            linger: Duration::from_millis(self.linger_ms),
            mode: self.probe_mode,
            ringbuf_bytes,
            packets: !self.no_packets,
            max_conns: self.max_conns,
            max_sockets: self.max_sockets,
            probe_report: self.probe_report,
            visible_netns: self.visible_netns,
        })
    }
}
