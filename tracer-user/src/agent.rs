//! `whoclosed agent`: the `trace` pipeline, long-running, with what a node agent adds —
//! the query API on a unix socket (and optionally TCP with a bearer token), Prometheus
//! metrics and health probes on `--metrics-addr`, a bounded history of verdicts, the live
//! connection table for `whoclosed conns`, pod names on every verdict, and an optional
//! size-rotated copy of the verdicts in a file.
//!
//! The pipeline is [`crate::trace::pipeline`]; this module is only its [`Side`]: what the
//! pipeline hands each verdict and tick to.

use std::{
    fs::File,
    io::{self, BufWriter, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use log::{info, warn};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::{
    api::{self, ApiState},
    conn::{Closed, Table},
    export::SCHEMA_VERSION,
    history::{self, History},
    k8s::{PodIdentity, Resolver},
    metrics::{Direction, Metrics},
    probes::ProbeReport,
    record::ClockBase,
    timeline::{FactKind, Role},
    trace::{self, Format, Output, TraceOptions},
};

/// Requests for a snapshot of the connection table (`/v1/conns`), answered by the pipeline
/// between two ring-buffer reads with NDJSON `conn` lines.
pub type ConnRequests = mpsc::Receiver<oneshot::Sender<String>>;

pub struct AgentOptions {
    pub trace: TraceOptions,
    pub socket: PathBuf,
    pub metrics_addr: Option<SocketAddr>,
    pub api_addr: Option<SocketAddr>,
    pub api_token: Option<String>,
    pub history: history::Limits,
    pub output_file: Option<PathBuf>,
    pub output_file_max_bytes: u64,
}

/// A file of `close` lines, renamed to `<path>.1` (replacing the previous one) when it
/// would grow past its limit.
struct Rotating {
    path: PathBuf,
    file: BufWriter<File>,
    written: u64,
    max: u64,
}

impl Rotating {
    fn open(path: &Path, max: u64) -> io::Result<Self> {
        let file = File::options().create(true).append(true).open(path)?;
        let written = file.metadata()?.len();
        Ok(Rotating {
            path: path.to_path_buf(),
            file: BufWriter::with_capacity(trace::OUT_BUFFER, file),
            written,
            max,
        })
    }

    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let n = line.len() as u64 + 1;
        if self.written > 0 && self.written + n > self.max {
            self.file.flush()?;
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            std::fs::rename(&self.path, &old)?;
            self.file = BufWriter::with_capacity(trace::OUT_BUFFER, File::create(&self.path)?);
            self.written = 0;
        }
        self.file.write_all(line)?;
        self.file.write_all(b"\n")?;
        self.written += n;
        Ok(())
    }
}

/// What the pipeline hands each verdict, event and tick to in `whoclosed agent`.
pub struct Side {
    api: Arc<ApiState>,
    metrics: Arc<Metrics>,
    file: Option<Rotating>,
    file_errors: u64,
}

impl Side {
    /// Metrics of one verdict (every verdict, whatever the output filters).
    pub(crate) fn observe(&mut self, c: &Closed) {
        self.metrics.observe_close(
            c.verdict.closed_by.as_str(),
            c.verdict.reason.as_str(),
            c.verdict.confidence.as_str(),
        );
        let (mut sent, mut received) = (0, 0);
        for f in &c.conn.facts {
            match f.kind {
                FactKind::RstSent { .. } => sent += 1,
                FactKind::RstReceived { .. } => received += 1,
                _ => {}
            }
        }
        if sent > 0 {
            self.metrics.observe_resets(Direction::Sent, sent);
        }
        if received > 0 {
            self.metrics.observe_resets(Direction::Received, received);
        }
        if c.conn.retransmits > 0 {
            self.metrics
                .observe_retransmits(u64::from(c.conn.retransmits));
        }
    }

    /// Keeps one written `close` line for the API and the file.
    pub(crate) fn keep(&mut self, line: &[u8]) {
        let Ok(text) = std::str::from_utf8(line) else {
            return;
        };
        if let Err(e) = self.api.record(text) {
            warn!("history: {e}");
        }
        if let Some(f) = &mut self.file
            && let Err(e) = f.write_line(line)
        {
            self.file_errors += 1;
            if self.file_errors <= 3 {
                warn!("writing {}: {e}", f.path.display());
            }
        }
    }

    /// The connection table's size and its running total of ends not seen.
    pub(crate) fn tracked(&self, n: usize, ends_unseen: u64) {
        self.metrics.set_tracked_connections(n as u64);
        self.metrics.set_ends_unseen(ends_unseen);
    }

    /// The kernel's loss totals, as read.
    pub(crate) fn losses(&self, kernel: &crate::probes::CounterSnapshot) {
        use crate::metrics::LostCause;
        self.metrics.set_drops(kernel.ringbuf_drops);
        self.metrics
            .set_events_lost(LostCause::UnreadableRecord, kernel.read_errors);
        self.metrics
            .set_events_lost(LostCause::SkippedRun, kernel.runs_skipped);
    }

    pub(crate) fn attached(&self, report: &ProbeReport) {
        self.metrics.set_probe_info(
            report.probe_mode.name(),
            report.packet_facts,
            &report.kernel,
        );
        self.api.set_ready(true);
        info!("ready: probes attached ({})", report.probe_mode.name());
    }

    pub(crate) fn stopping(&mut self) {
        self.api.set_ready(false);
        if let Some(f) = &mut self.file {
            let _ = f.file.flush();
        }
    }

    /// The connection table as NDJSON `conn` lines, oldest first.
    pub(crate) fn conns(
        &mut self,
        table: &Table,
        now_ns: u64,
        mut pods: Option<&mut Resolver>,
    ) -> String {
        let mut live: Vec<_> = table.live().collect();
        live.sort_by_key(|(c, _)| (c.opened_ns.unwrap_or(c.first_ns), c.skaddr));
        let mut out = String::new();
        for (c, last_ns) in live {
            let owner = c.owner();
            let k8s = pods
                .as_deref_mut()
                .and_then(|r| r.of_socket(owner.as_ref().map(|o| o.0), c.cgroup_id));
            let view = ConnView {
                v: SCHEMA_VERSION,
                kind: "conn",
                id: c.id,
                family: c.tuple.map_or("unknown", |t| t.family_name()),
                local: c.tuple.map(|t| t.local()),
                remote: c.tuple.map(|t| t.remote()),
                role: c.role,
                state: c.state_name(),
                preexisting: c.preexisting,
                pid: owner.as_ref().map(|o| o.0),
                comm: owner.as_ref().map(|o| &*o.1),
                netns: c.netns,
                age_ms: ms(now_ns.saturating_sub(c.opened_ns.unwrap_or(c.first_ns))),
                idle_ms: ms(now_ns.saturating_sub(last_ns)),
                facts: c.facts.len(),
                retransmits: c.retransmits,
                h2_frames: c.h2.as_ref().map(|h| h.frames).or(c.h2_opaque.map(|_| 0)),
                closing: c.closed_ns.is_some(),
                events_lost: table.events_lost(c, u64::MAX),
                k8s: k8s.as_ref(),
            };
            if let Ok(s) = serde_json::to_string(&view) {
                out.push_str(&s);
                out.push('\n');
            }
        }
        out
    }
}

fn ms(ns: u64) -> f64 {
    (ns as f64 / 1_000.0).round() / 1_000.0
}

/// Serialised labels of the verdict's enums (they serialise as their documented names).
/// One live connection (`/v1/conns`, `docs/schema/v1/conn.schema.json`).
#[derive(Serialize)]
struct ConnView<'a> {
    v: u32,
    #[serde(rename = "type")]
    kind: &'static str,
    id: crate::timeline::ConnId,
    family: &'static str,
    local: Option<SocketAddr>,
    remote: Option<SocketAddr>,
    role: Role,
    state: &'static str,
    preexisting: bool,
    pid: Option<u32>,
    comm: Option<&'a str>,
    netns: Option<u32>,
    /// Since the handshake (since first seen for a pre-existing connection).
    age_ms: f64,
    /// Since the last kernel event about the socket.
    idle_ms: f64,
    facts: usize,
    retransmits: u32,
    h2_frames: Option<u64>,
    /// Closed, waiting out its linger before the verdict.
    closing: bool,
    /// Kernel events were lost while it was tracked, or part of its life was not seen: its
    /// record may miss facts, and its verdict will say so.
    events_lost: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    k8s: Option<&'a PodIdentity>,
}

/// How long the API gets to finish answering after the pipeline stopped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

pub async fn run(opts: AgentOptions) -> anyhow::Result<()> {
    if opts.trace.probe_report {
        // Only the report: no socket, no listeners.
        return trace::run(opts.trace).await;
    }
    let metrics = Arc::new(Metrics::new());
    let (conn_tx, conn_rx) = mpsc::channel(8);
    let state =
        Arc::new(ApiState::new(History::new(opts.history), metrics.clone()).with_conns(conn_tx));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let mut servers = Vec::new();
    let unix = api::bind_unix(&opts.socket).context("the API's unix socket (--socket)")?;
    info!("API on unix:{}", opts.socket.display());
    {
        let router = api::router(state.clone());
        let stop = stopped();
        servers.push(tokio::spawn(async move {
            axum::serve(unix, router).with_graceful_shutdown(stop).await
        }));
    }
    if let Some(addr) = opts.api_addr {
        let token = opts.api_token.as_deref().unwrap_or("");
        let router = api::require_bearer(api::router(state.clone()), token)
            .context("--api-addr needs --api-token-file or WHOCLOSED_API_TOKEN")?;
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the API listener --api-addr {addr}"))?;
        info!("API on http://{addr} (bearer token required)");
        let stop = stopped();
        servers.push(tokio::spawn(async move {
            axum::serve(l, router).with_graceful_shutdown(stop).await
        }));
    }
    if let Some(addr) = opts.metrics_addr {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --metrics-addr {addr}"))?;
        info!("metrics and health probes on http://{addr}");
        let router = api::probe_router(state.clone());
        let stop = stopped();
        servers.push(tokio::spawn(async move {
            axum::serve(l, router).with_graceful_shutdown(stop).await
        }));
    }

    let side = Side {
        api: state.clone(),
        metrics,
        file: match &opts.output_file {
            Some(p) => Some(
                Rotating::open(p, opts.output_file_max_bytes)
                    .with_context(|| format!("--output-file {}", p.display()))?,
            ),
            None => None,
        },
        file_errors: 0,
    };
    let result = async {
        let probes = trace::load_probes(&opts.trace)?;
        trace::release_load_memory();
        let stdout = io::stdout();
        let mut out = Output::new(
            BufWriter::with_capacity(trace::OUT_BUFFER, stdout.lock()),
            Format::Json,
            opts.trace.filter.clone(),
            ClockBase::now(),
        );
        out.agent = Some(side);
        trace::pipeline(&opts.trace, probes, out, Some(conn_rx)).await
    }
    .await;

    state.set_ready(false);
    state.close_followers();
    let _ = stop_tx.send(true);
    for s in servers {
        let abort = s.abort_handle();
        if tokio::time::timeout(SHUTDOWN_GRACE, s).await.is_err() {
            // A `--follow` client keeps its answer open: cut it.
            abort.abort();
        }
    }
    if let Err(e) = std::fs::remove_file(&opts.socket) {
        warn!("removing {}: {e}", opts.socket.display());
    }
    result
}
