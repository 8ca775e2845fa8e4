//! Command line.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{Parser, Subcommand};

use crate::{
    export::Filter,
    probes::ProbeMode,
    trace::{Format, TraceOptions},
};

pub use crate::query::{ClosesArgs, ConnsArgs, ExplainArgs, StatsArgs};

/// whoclosed: who ended each TCP connection — client, server or a middlebox — with evidence.
#[derive(Debug, Parser)]
#[command(
    name = "whoclosed",
    version,
    about,
    after_help = "Examples:
  whoclosed trace -o table                    # watch verdicts on this host (root)
  whoclosed agent --metrics-addr 127.0.0.1:9090 --record /var/tmp/session.rec
  whoclosed closes --closed-by middlebox --since 10m -o wide
  whoclosed conns --port 443
  whoclosed explain 3f2a9c0d1e4b5a67
  whoclosed stats
  whoclosed replay /var/tmp/session.rec      # same verdicts, offline, no root

Exit codes of closes, conns, explain and stats: 0 ok, 1 nothing matched (explain: ID not
kept), 2 usage error, 3 an agent could not be reached or refused the request."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace TCP connections and print one verdict per ended socket (needs root).
    Trace(TraceArgs),
    /// Run as a node agent: trace, keep recent verdicts, serve the query API and metrics.
    Agent(AgentArgs),
    /// Recent verdicts from one or more agents (filters, -o table|wide|json, --follow).
    Closes(ClosesArgs),
    /// Live connections tracked by the agents: state, age, idle time.
    Conns(ConnsArgs),
    /// One connection's verdict as a readable timeline of its evidence, with the hint.
    Explain(ExplainArgs),
    /// Counts by closed_by, reason and confidence; top remotes and pods; drops; probe mode.
    Stats(StatsArgs),
    /// Judge a `--record` file offline (no privileges) and print its verdicts.
    Replay(ReplayArgs),
}

/// A size with a unit: `100M`, `64KiB`, `1G` (powers of 1024), or bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as 100M or 64KiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        u => return Err(format!("{s:?}: unknown unit {u:?} (use K, M or G)")),
    };
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("{s:?}: must be between 1 byte and 16 EiB"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 90s, 10m, 1h)"))
}

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub trace: TraceArgs,
    /// The API's unix socket (mode 0600, its directory 0700 when created).
    #[arg(long, env = "WHOCLOSED_SOCKET", default_value = crate::client::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Serve /metrics, /healthz and /readyz over TCP on HOST:PORT (off by default; the
    /// DaemonSet sets 0.0.0.0:9090).
    #[arg(long, env = "WHOCLOSED_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Also serve the query API over TCP on HOST:PORT (off by default; needs a token).
    #[arg(long)]
    pub api_addr: Option<SocketAddr>,
    /// File holding the bearer token the TCP API requires (else $WHOCLOSED_API_TOKEN).
    #[arg(long)]
    pub api_token_file: Option<PathBuf>,
    /// Verdicts kept for queries, at most.
    #[arg(long, default_value_t = 10_000)]
    pub history_max: usize,
    /// Verdicts older than this are dropped from the history.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub history_age: Duration,
    /// Bytes of verdicts kept in the history, at most (e.g. 32M).
    #[arg(long, default_value = "32M", value_parser = parse_size)]
    pub history_bytes: u64,
    /// Also append each verdict to this file (NDJSON), rotated to FILE.1 at --output-file-max.
    #[arg(long)]
    pub output_file: Option<PathBuf>,
    /// Size at which --output-file is rotated (e.g. 100M).
    #[arg(long, default_value = "100M", value_parser = parse_size)]
    pub output_file_max: u64,
}

impl AgentArgs {
    pub fn into_options(self) -> anyhow::Result<crate::agent::AgentOptions> {
        if self.trace.output != Format::Json {
            anyhow::bail!(
                "the agent writes NDJSON; use `whoclosed closes -o table` to read it as a table"
            );
        }
        let api_token = match (&self.api_token_file, std::env::var("WHOCLOSED_API_TOKEN")) {
            (Some(p), _) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("--api-token-file {}: {e}", p.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, Ok(t)) => Some(t.trim().to_string()),
            (None, Err(_)) => None,
        };
        if self.api_addr.is_some() && api_token.as_deref().is_none_or(str::is_empty) {
            anyhow::bail!(
                "--api-addr needs a non-empty bearer token (--api-token-file or $WHOCLOSED_API_TOKEN)"
            );
        }
        if self.history_max == 0 {
            anyhow::bail!("--history-max must be at least 1");
        }
        Ok(crate::agent::AgentOptions {
            socket: self.socket,
            metrics_addr: self.metrics_addr,
            api_addr: self.api_addr,
            api_token,
            history: crate::history::Limits {
                max_records: self.history_max,
                max_age: self.history_age,
                max_bytes: usize::try_from(self.history_bytes).unwrap_or(usize::MAX),
            },
            output_file: self.output_file,
            output_file_max_bytes: self.output_file_max,
            trace: self.trace.into_options()?,
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// A file written with `--record`.
    pub file: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "json")]
    pub output: Format,
    /// Print sockets with these local or remote ports (repeatable), instead of what the
    /// recorded session's own filters selected.
    #[arg(long = "port")]
    pub ports: Vec<u16>,
    /// Print sockets with these local or remote addresses (repeatable), instead of what the
    /// recorded session's own filters selected.
    #[arg(long = "addr")]
    pub addrs: Vec<IpAddr>,
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
    /// Attach the packet hooks without the HTTP/2 frame walker: FIN/RST direction and TTL
    /// evidence stay, HTTP/2 evidence (GOAWAY, RST_STREAM, PING, SETTINGS) goes, and bulk
    /// transfers cost less per segment (docs/performance.md).
    #[arg(long)]
    pub no_h2_frames: bool,
    /// Do not walk the kernel's TCP sockets: neither at the start (the connections open
    /// before it are then met at their first segment or state change) nor after lost
    /// events (records whose end was lost then stay until their address is reused).
    #[arg(long)]
    pub no_existing: bool,
    /// Most connections tracked at once; more are counted as dropped.
    #[arg(long, default_value_t = 65_536)]
    pub max_conns: usize,
    /// Treat only these network namespaces (inodes, repeatable) as this host: events from
    /// all others are discarded before any joining, as if those sockets lived on another
    /// node (the single-ended view; unlike --netns, which only filters what is printed).
    #[arg(long = "visible-netns")]
    pub visible_netns: Vec<u32>,
    /// No longer used: the kernel keeps packet state on each socket (socket storage), with
    /// no table to size. Accepted so that existing command lines keep working; it warns.
    #[arg(long, hide = true)]
    pub max_sockets: Option<u32>,
    /// Also write the raw kernel records to FILE, for `whoclosed replay FILE`.
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// The host's root filesystem, for pod names (/proc and /var/log under it).
    #[arg(long, env = "WHOCLOSED_HOST_ROOT", default_value = "/")]
    pub host_root: PathBuf,
    /// The procfs whose pids the kernel reports (default: <host-root>/proc).
    #[arg(long)]
    pub proc_root: Option<PathBuf>,
    /// This node's name in conn.k8s (else the host's /etc/hostname).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Do not name pods (no conn.k8s / peer.k8s).
    #[arg(long)]
    pub no_k8s: bool,
}

impl TraceArgs {
    pub fn into_options(self) -> anyhow::Result<TraceOptions> {
        let ringbuf_bytes = self
            .ringbuf_kib
            .checked_mul(1024)
            .ok_or_else(|| anyhow::anyhow!("--ringbuf-kib {} is too large", self.ringbuf_kib))?;
        if self.max_sockets.is_some() {
            log::warn!(
                "--max-sockets is ignored: the kernel keeps packet state on each socket \
                 (socket storage), with no table to size"
            );
        }
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
            h2_frames: !self.no_h2_frames,
            existing: !self.no_existing,
            max_conns: self.max_conns,
            probe_report: self.probe_report,
            visible_netns: self.visible_netns,
            record: self.record,
            k8s: (!self.no_k8s).then(|| {
                let roots = match &self.proc_root {
                    Some(p) => crate::k8s::Roots::with_proc_root(&self.host_root, p),
                    None => crate::k8s::Roots::new(&self.host_root),
                };
                (roots, self.node_name.clone())
            }),
        })
    }
}
