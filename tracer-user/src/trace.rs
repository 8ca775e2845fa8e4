//! `whoclosed trace`: load the probes, read the ring buffer, print one verdict per ended
//! socket, flush and detach on SIGINT/SIGTERM.

use std::{
    io::{self, Write},
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use log::{info, warn};
use serde::Serialize;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{
    conn::{Closed, Table, TableConfig, ephemeral_range},
    event,
    export::{self, Clock, Drops, Filter, Losses, Ready, Stats},
    k8s::K8sEnds,
    probes::{self, Counters, LoadOptions, Logger, ProbeMode, ProbeReport, Probes},
    record::ClockBase,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Json,
    Table,
}

pub struct TraceOptions {
    pub format: Format,
    pub filter: Filter,
    pub linger: Duration,
    pub mode: ProbeMode,
    pub ringbuf_bytes: u32,
    pub packets: bool,
    /// Load the HTTP/2 walker programs (with `packets`).
    pub h2_frames: bool,
    /// List the connections open before the start (`--no-existing`).
    pub existing: bool,
    pub max_conns: usize,
    pub probe_report: bool,
    /// When not empty, only these network namespaces are this host: events from others
    /// are discarded before the connection table, as if those sockets lived elsewhere.
    pub visible_netns: Vec<u32>,
    /// `--record FILE`: the raw kernel records, for `whoclosed replay`.
    pub record: Option<std::path::PathBuf>,
    /// Where to read pod names from, and the node's name (`None`: `--no-k8s`).
    pub k8s: Option<(crate::k8s::Roots, Option<String>)>,
}

/// The table's configuration: the options, and what the probes actually attached (packet
/// facts only when both packet hooks did, whatever was asked) and read from kernel BTF.
pub fn table_config(opts: &TraceOptions, report: &ProbeReport) -> TableConfig {
    TableConfig {
        linger_ns: u64::try_from(opts.linger.as_nanos()).unwrap_or(u64::MAX),
        max_conns: opts.max_conns,
        ephemeral: ephemeral_range(),
        packet_facts: report.packet_facts,
        rst_reason_names: report.rst_reason_names.clone(),
    }
}

/// Everything that leaves the pipeline: the printed records, and (for `whoclosed agent`)
/// the API's history, the metrics and pod names, and (with `--record`) the recording.
pub(crate) struct Output<W: Write> {
    pub(crate) out: W,
    pub(crate) format: Format,
    pub(crate) filter: Filter,
    pub(crate) clock: Clock,
    /// What `clock` was made from (kept in a recording so that replay writes the same `ts`).
    pub(crate) clock_base: ClockBase,
    pub(crate) printed: u64,
    /// One serialised `close` line, reused.
    line: Vec<u8>,
    pub(crate) agent: Option<crate::agent::Side>,
    pub(crate) recorder: Option<crate::record::Writer>,
    /// Pod names recorded with `--record`, for `whoclosed replay` (by `conn.id`).
    pub(crate) recorded_k8s: Option<std::collections::HashMap<String, K8sEnds>>,
    /// Pod names (`None`: `--no-k8s`), for the verdicts and the agent's `/v1/conns`.
    pub(crate) pods: Option<crate::k8s::Resolver>,
}

impl<W: Write> Output<W> {
    pub(crate) fn new(out: W, format: Format, filter: Filter, clock_base: ClockBase) -> Self {
        Output {
            out,
            format,
            filter,
            clock: clock_base.clock(),
            clock_base,
            printed: 0,
            line: Vec::with_capacity(4096),
            agent: None,
            recorder: None,
            recorded_k8s: None,
            pods: None,
        }
    }

    fn now(&self) -> String {
        self.clock.rfc3339(export::monotonic_ns())
    }

    /// One JSON record (not printed with `-o table`).
    fn record(&mut self, v: &impl Serialize) -> io::Result<()> {
        if self.format == Format::Json {
            serde_json::to_writer(&mut self.out, v)?;
            self.out.write_all(b"\n")?;
        }
        Ok(())
    }

    /// The pods of both ends: resolved live by the agent, or as recorded.
    fn k8s_of(&mut self, c: &Closed) -> K8sEnds {
        if let Some(map) = &self.recorded_k8s {
            if map.is_empty() {
                return K8sEnds::default();
            }
            return map.get(&c.conn.id.to_string()).cloned().unwrap_or_default();
        }
        let ends = match &mut self.pods {
            Some(r) => crate::k8s::ends_of(r, c),
            None => K8sEnds::default(),
        };
        if !ends.is_empty()
            && let Some(r) = &mut self.recorder
            && let Err(e) = r.k8s(&c.conn.id.to_string(), &ends)
        {
            warn!("recording pod names: {e}");
        }
        ends
    }

    pub(crate) fn closed(&mut self, c: &Closed) -> io::Result<()> {
        if !self.filter.matches(c) {
            return Ok(());
        }
        let k8s = self.k8s_of(c);
        // The agent's filters set its scope: what it writes, keeps and counts.
        if let Some(a) = &mut self.agent {
            a.observe(c);
        }
        self.printed += 1;
        match self.format {
            Format::Json => {
                self.line.clear();
                export::CloseObject {
                    closed: c,
                    clock: &self.clock,
                    k8s: (!k8s.is_empty()).then_some(&k8s),
                }
                .write_json(&mut self.line)?;
                self.out.write_all(&self.line)?;
                self.out.write_all(b"\n")?;
                if let Some(a) = &mut self.agent {
                    a.keep(&self.line);
                }
                Ok(())
            }
            Format::Table => writeln!(self.out, "{}", export::close_line(c, &self.clock)),
        }
    }

    pub(crate) fn all(&mut self, closed: Vec<Closed>) -> io::Result<()> {
        closed.iter().try_for_each(|c| self.closed(c))
    }

    /// Judges the sockets whose linger is over at `now_ns` (a tick, recorded for replay),
    /// after noting the kernel's lost-event total (when known) so that connections alive
    /// during a loss say so.
    pub(crate) fn tick(
        &mut self,
        table: &mut Table,
        now_ns: u64,
        events_lost: Option<u64>,
    ) -> io::Result<()> {
        if let Some(r) = &mut self.recorder {
            r.tick(now_ns, events_lost)?;
        }
        if let Some(d) = events_lost {
            table.note_events_lost(now_ns, d);
        }
        let due = table.take_due(now_ns);
        self.all(due)?;
        if let Some(a) = &mut self.agent {
            a.tracked(table.len(), table.stats.ends_unseen);
        }
        Ok(())
    }

    /// A recheck's walk over the live sockets starts at `now_ns` (recorded for replay).
    pub(crate) fn recheck_start(&mut self, table: &mut Table, now_ns: u64) -> io::Result<()> {
        if let Some(r) = &mut self.recorder {
            r.recheck_start(now_ns)?;
        }
        table.recheck_start(now_ns);
        Ok(())
    }

    /// That walk ended (recorded for replay): the records of the sockets it found gone are
    /// retired; returns how many.
    pub(crate) fn recheck_end(
        &mut self,
        table: &mut Table,
        walked: &[u64],
        stored: bool,
        complete: bool,
    ) -> io::Result<u64> {
        if let Some(r) = &mut self.recorder {
            r.recheck_end(walked, stored, complete)?;
        }
        let (gone, now) = table.recheck_end(walked, stored, complete);
        self.all(now)?;
        Ok(gone)
    }
}

/// Ring-buffer records read per wake-up before the loop serves its other sources.
const DRAIN_BATCH: usize = 4096;
/// Batches read per drain tick at most (the kernel's wake-up covers a faster fill).
const DRAIN_TICK_BATCHES: usize = 16;
/// How long the shutdown flush keeps reading a ring buffer that refills.
const FLUSH_DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);
/// Bytes of the start-up walk read at a time, for a ring buffer of `ringbuf_bytes`: the
/// walk writes one byte per connection, so at most this many `EXISTING` records enter the
/// ring buffer before it is drained: a quarter of it (at least 16, at most 4096 records).
fn walk_chunk(ringbuf_bytes: u32) -> usize {
    // A record and its ring-buffer header.
    let per_record = std::mem::size_of::<tracer_common::LifecycleRecord>() + 8;
    (ringbuf_bytes as usize / 4 / per_record).clamp(16, 4096)
}

/// What [`Loop::walk_existing`] did.
#[derive(Default)]
struct WalkSummary {
    /// Connections listed.
    connections: u64,
    /// Network namespaces walked.
    namespaces: usize,
    /// Network namespaces that could not be walked (or not to the end).
    failed: usize,
    /// Inodes of the network namespaces walked to their end.
    walked: Vec<u64>,
}

/// When to walk the live sockets again (`conn/recheck.rs`): once the kernel's lost-event
/// total has grown and then held still for [`RECHECK_QUIET_NS`] (the walk adds records of
/// its own, so not while the loss is still going on), at most every [`RECHECK_GAP_NS`]
/// ([`RECHECK_RETRY_NS`] after a walk that itself saw a loss). Kernels that skip program
/// runs without counting them (before 6.7) may lose an ending unseen at any time, so there
/// the walk also runs every [`RECHECK_PERIOD_NS`].
#[derive(Debug)]
struct RecheckPolicy {
    /// The lost-event total the last complete walk covers.
    checked_lost: u64,
    /// The total last read, and when it last changed.
    seen_lost: u64,
    grew_ns: u64,
    /// The last walk: when it ended, and whether no event was lost while it ran.
    last_ns: Option<u64>,
    last_complete: bool,
    /// Walk every [`RECHECK_PERIOD_NS`] (counted from `start_ns`) even without a loss.
    periodic: bool,
    start_ns: u64,
}

const RECHECK_QUIET_NS: u64 = 1_000_000_000;
const RECHECK_GAP_NS: u64 = 10_000_000_000;
const RECHECK_RETRY_NS: u64 = 60_000_000_000;
const RECHECK_PERIOD_NS: u64 = 300_000_000_000;

impl RecheckPolicy {
    fn new(start_ns: u64, periodic: bool) -> Self {
        RecheckPolicy {
            checked_lost: 0,
            seen_lost: 0,
            grew_ns: start_ns,
            last_ns: None,
            last_complete: true,
            periodic,
            start_ns,
        }
    }

    /// Whether to walk now, given the lost-event total read at `now_ns` (when readable).
    fn due(&mut self, now_ns: u64, lost: Option<u64>) -> bool {
        if let Some(t) = lost
            && t != self.seen_lost
        {
            self.seen_lost = t;
            self.grew_ns = now_ns;
        }
        if self.seen_lost > self.checked_lost {
            let gap = if self.last_complete {
                RECHECK_GAP_NS
            } else {
                RECHECK_RETRY_NS
            };
            return now_ns.saturating_sub(self.grew_ns) >= RECHECK_QUIET_NS
                && self.last_ns.is_none_or(|l| now_ns.saturating_sub(l) >= gap);
        }
        self.periodic
            && now_ns.saturating_sub(self.last_ns.unwrap_or(self.start_ns)) >= RECHECK_PERIOD_NS
    }

    /// A walk ended at `now_ns`; the lost-event total was `lost_at_start` when it began.
    fn ran(&mut self, now_ns: u64, lost_at_start: u64, complete: bool) {
        self.last_ns = Some(now_ns);
        self.last_complete = complete;
        if complete {
            self.checked_lost = lost_at_start;
        }
    }
}

/// What a recheck needs: the linked walk programs and where to find the namespaces.
struct Rechecker {
    walk: crate::existing::ExistingWalk,
    /// The walk over the sockets holding packet state, every namespace at once.
    storage: Option<crate::existing::ExistingWalk>,
    proc_root: std::path::PathBuf,
    ringbuf_bytes: u32,
    policy: RecheckPolicy,
}

struct Loop {
    table: Table,
    counters: Counters,
    decode_errors: u64,
    last_drops: u64,
    last_losses: Losses,
    visible_netns: Vec<u32>,
    /// None without the walk (`--no-existing`, or a kernel without `iter/tcp`).
    rechecker: Option<Rechecker>,
}

impl Loop {
    /// Runs the kernel's walk over the sockets open before the agent (see
    /// [`Probes::existing`]), one network namespace after the other, reading each walk a
    /// chunk at a time and draining the ring buffer, where its records go, after each
    /// chunk. A namespace that cannot be walked is counted and named in one warning: its
    /// sockets are then met at their next event instead.
    fn walk_existing<W: Write>(
        &mut self,
        walk: &crate::existing::ExistingWalk,
        proc_root: &std::path::Path,
        ringbuf_bytes: u32,
        rb: &mut RingBuf<MapData>,
        out: &mut Output<W>,
        at_start: bool,
    ) -> io::Result<WalkSummary> {
        let (walks, mut errors) = walk.open_all(proc_root);
        let mut sum = WalkSummary {
            namespaces: walks.len(),
            ..WalkSummary::default()
        };
        let mut buf = vec![0u8; walk_chunk(ringbuf_bytes)];
        for (netns, mut f) in walks {
            let (n, res) = self.read_walk(&mut f, &mut buf, rb, out)?;
            sum.connections += n;
            match res {
                Ok(()) => sum.walked.push(netns),
                Err(e) => errors.push(format!(
                    "reading the walk of network namespace {netns}: {e}"
                )),
            }
            log::debug!("{n} TCP connections open in network namespace {netns}");
        }
        sum.failed = errors.len();
        if !at_start {
            if let Some(first) = errors.first() {
                info!(
                    "recheck: {} network namespace(s) not walked, their records kept; first: \
                     {first}",
                    errors.len()
                );
            }
        } else if let Some(first) = errors.first() {
            warn!(
                "connections open before the start are not listed in {} network namespace(s) \
                 (they are met at their first segment or state change); first: {first}{}",
                errors.len(),
                if first.contains("Operation not permitted") || first.contains("Permission denied")
                {
                    "; entering another network namespace needs CAP_SYS_ADMIN, opening it \
                     CAP_SYS_PTRACE, and a seccomp profile that allows setns (the DaemonSet's \
                     least-privilege profile has none of these: docs/operating.md)"
                } else {
                    ""
                }
            );
        }
        Ok(sum)
    }

    /// Reads a walk's output a chunk at a time (a byte per listed connection, whose record
    /// is in the ring buffer), draining the ring buffer after each chunk. Returns the
    /// connections listed and whether the walk was read to its end.
    fn read_walk<W: Write>(
        &mut self,
        f: &mut std::fs::File,
        buf: &mut [u8],
        rb: &mut RingBuf<MapData>,
        out: &mut Output<W>,
    ) -> io::Result<(u64, io::Result<()>)> {
        use std::io::Read as _;
        let mut listed = 0u64;
        loop {
            match f.read(buf) {
                Ok(0) => return Ok((listed, Ok(()))),
                Ok(n) => listed += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Ok((listed, Err(e))),
            }
            while self.drain(rb, out, DRAIN_BATCH)? {}
        }
    }

    /// The recheck's walk over the sockets holding packet state, in every network
    /// namespace (`sk_storage_existing`): the connections listed, or `None` when it could
    /// not be read to its end (its listing is then not used to retire records).
    fn walk_storage<W: Write>(
        &mut self,
        walk: &crate::existing::ExistingWalk,
        ringbuf_bytes: u32,
        rb: &mut RingBuf<MapData>,
        out: &mut Output<W>,
    ) -> io::Result<Option<u64>> {
        let mut f = match walk.open() {
            Ok(f) => f,
            Err(e) => {
                info!("recheck: the socket storage walk could not start: {e}");
                return Ok(None);
            }
        };
        let mut buf = vec![0u8; walk_chunk(ringbuf_bytes)];
        let (n, res) = self.read_walk(&mut f, &mut buf, rb, out)?;
        if let Err(e) = res {
            info!("recheck: reading the socket storage walk: {e}");
            return Ok(None);
        }
        Ok(Some(n))
    }

    /// Walks the live sockets again when [`RecheckPolicy`] says so, and retires the records
    /// of the sockets that walk found gone (`conn/recheck.rs`). `lost`: the lost-event
    /// total read at this tick.
    fn maybe_recheck<W: Write>(
        &mut self,
        rb: &mut RingBuf<MapData>,
        out: &mut Output<W>,
        now_ns: u64,
        lost: Option<u64>,
    ) -> io::Result<()> {
        let Some(mut r) = self.rechecker.take() else {
            return Ok(());
        };
        let result = if r.policy.due(now_ns, lost) {
            self.recheck(&mut r, rb, out)
        } else {
            Ok(())
        };
        self.rechecker = Some(r);
        result
    }

    fn recheck<W: Write>(
        &mut self,
        r: &mut Rechecker,
        rb: &mut RingBuf<MapData>,
        out: &mut Output<W>,
    ) -> io::Result<()> {
        let lost = |c: &Counters| c.snapshot().ok().map(|s| s.events_lost());
        // What is already in the buffer first: the walk's records then follow every
        // record written before it started.
        while self.drain(rb, out, DRAIN_BATCH)? {}
        let lost0 = lost(&self.counters);
        let started = export::monotonic_ns();
        out.recheck_start(&mut self.table, started)?;
        let sum = self.walk_existing(&r.walk, &r.proc_root, r.ringbuf_bytes, rb, out, false)?;
        let stored = match &r.storage {
            Some(w) => self.walk_storage(w, r.ringbuf_bytes, rb, out)?,
            None => None,
        };
        // Every record written before the walks ended: a socket freed before the storage
        // walk reached it wrote its CLOSE before, and that must be read before the records
        // it did not list are judged gone.
        while self.drain(rb, out, DRAIN_BATCH)? {}
        let lost1 = lost(&self.counters);
        let complete = lost0.is_some() && lost0 == lost1;
        let gone = out.recheck_end(&mut self.table, &sum.walked, stored.is_some(), complete)?;
        let ended = export::monotonic_ns();
        r.policy.ran(ended, lost0.unwrap_or(0), complete);
        if complete {
            // One line per recheck (after a loss, at most every 10 s; on kernels before 6.7
            // also every 5 minutes): what it listed, and what it found gone.
            let stored = match stored {
                Some(n) => format!(", {n} by their packet state in every namespace"),
                None => String::new(),
            };
            info!(
                "recheck: {} live connections listed in {} network namespace(s){stored} in \
                 {} ms; {gone} tracked connection(s) had ended unseen",
                sum.connections,
                sum.walked.len(),
                ended.saturating_sub(started) / 1_000_000
            );
        } else {
            info!(
                "recheck: kernel events were lost while it ran, so no record was retired; \
                 trying again later"
            );
        }
        Ok(())
    }

    /// Reads at most `budget` records; true when it stopped at the budget (more may wait).
    /// A bounded batch keeps the loop's timers, drop reports and signals served while the
    /// kernel refills the buffer faster than it drains.
    fn drain<W: Write>(
        &mut self,
        rb: &mut RingBuf<MapData>,
        out: &mut Output<W>,
        budget: usize,
    ) -> io::Result<bool> {
        let mut read = 0usize;
        while read < budget {
            let Some(item) = rb.next() else {
                return Ok(false);
            };
            read += 1;
            if let Some(r) = &mut out.recorder {
                r.event(&item)?;
            }
            match event::decode(&item) {
                Ok(ev) => {
                    log::trace!("{ev:?}");
                    // Events without a namespace count as another node's too in this mode
                    // unless they are about a socket already tracked (the kernel's
                    // no-socket replies come from a control socket that never is); error
                    // reports are kept, they only ever reach tracked sockets.
                    let hidden = !self.visible_netns.is_empty()
                        && match ev.netns {
                            Some(n) => !self.visible_netns.contains(&n),
                            None => {
                                !matches!(ev.kind, event::EventKind::ErrorReport { .. })
                                    && !self.table.tracks(ev.skaddr, ev.tuple)
                            }
                        };
                    if !hidden {
                        if let Some(r) = &mut out.pods {
                            crate::k8s::note_owner(r, &ev);
                        }
                        out.all(self.table.on_event(&ev))?;
                    }
                }
                Err(e) => {
                    self.decode_errors += 1;
                    if self.decode_errors <= 10 {
                        warn!("dropping malformed kernel record: {e}");
                    }
                }
            }
        }
        Ok(true)
    }

    /// Reports losses since the last check: ring-buffer drops, and what the table or the
    /// kernel's socket map had to give up (a `drops` record whenever any of them grew).
    fn check_drops<W: Write>(&mut self, out: &mut Output<W>) -> io::Result<()> {
        let s = match self.counters.snapshot() {
            Ok(s) => s,
            Err(e) => {
                warn!("reading kernel counters: {e}");
                return Ok(());
            }
        };
        let losses = Losses::of(&self.table.stats, &s);
        let losses_new = losses.since(&self.last_losses);
        let new = s.ringbuf_drops.saturating_sub(self.last_drops);
        if new == 0 && !losses_new.any() {
            return Ok(());
        }
        if let Some(a) = &out.agent {
            a.losses(&s);
        }
        if new > 0 {
            warn!(
                "ring buffer full: {new} kernel events lost ({} in total); raise --ringbuf-kib",
                s.ringbuf_drops
            );
        }
        if losses_new.runs_skipped > 0 {
            warn!(
                "the kernel skipped {} runs of the tracing programs ({} in total): another BPF \
                 program was running on that CPU; each is an event lost",
                losses_new.runs_skipped, losses.runs_skipped
            );
        }
        if losses_new.read_errors > 0 {
            warn!(
                "{} tracepoint records could not be read ({} in total); each is an event lost",
                losses_new.read_errors, losses.read_errors
            );
        }
        if losses_new.conns_dropped > 0 {
            warn!(
                "connection table full: {} connections not tracked ({} in total); raise --max-conns",
                losses_new.conns_dropped, losses.conns_dropped
            );
        }
        out.record(&Drops::new(out.now(), new, &s, losses, losses_new))?;
        self.last_drops = s.ringbuf_drops;
        self.last_losses = losses;
        Ok(())
    }

    /// Shutdown: what is still in the ring buffer, every socket that already closed, then
    /// the `stats` record.
    fn flush<W: Write>(
        &mut self,
        rb: &mut RingBuf<MapData>,
        out: &mut Output<W>,
    ) -> io::Result<()> {
        // What is in the buffer now, within a bounded time even if a flood keeps refilling it.
        let deadline = std::time::Instant::now() + FLUSH_DRAIN_LIMIT;
        while self.drain(rb, out, DRAIN_BATCH)? && std::time::Instant::now() < deadline {}
        let kernel = self.counters.snapshot().unwrap_or_default();
        self.table
            .note_events_lost(export::monotonic_ns(), kernel.events_lost());
        out.all(self.table.take_all_closed())?;
        if kernel.ringbuf_drops > 0 {
            warn!(
                "{} kernel events were lost to a full ring buffer",
                kernel.ringbuf_drops
            );
        }
        let stats = Stats::new(
            out.now(),
            out.printed,
            self.table.len(),
            self.decode_errors,
            &self.table.stats,
            &kernel,
        );
        out.record(&stats)?;
        if let Some(r) = &mut out.recorder {
            r.finish()?;
        }
        out.out.flush()
    }
}

/// Bytes of output buffered before a write: a pipe's default capacity (64 KiB). With the
/// standard 8 KiB a tick's verdicts went out in hundreds of small writes, each of which
/// could wake the reader on the other end of a pipe (a scheduler round trip apiece).
pub(crate) const OUT_BUFFER: usize = 64 * 1024;

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>()
        .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

fn print_probe_report(probes: &Probes) -> anyhow::Result<()> {
    let mut lock = io::stdout().lock();
    serde_json::to_writer_pretty(&mut lock, &probes.report)?;
    writeln!(lock)?;
    Ok(())
}

/// The ring buffer, polled by the runtime.
type Events = AsyncFd<RingBuf<MapData>>;
/// The kernel log buffer, polled by the runtime.
type KernelLog = AsyncFd<Logger>;

/// The ring buffer and the kernel log buffer, registered with the runtime.
fn poll_sources(probes: &mut Probes) -> anyhow::Result<(Events, Option<KernelLog>)> {
    let rb = probes.take_ringbuf()?;
    // SAFETY: RingBuf and EbpfLogger own their map file descriptors for as long as they
    // live and always return the same one, which is what AsyncFd requires.
    let rb = unsafe { AsyncFd::register_with_interest(rb, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {}", e))?;
    let logger = match probes.logger.take() {
        // SAFETY: as above.
        Some(l) => Some(
            unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("polling the kernel log buffer: {}", e))?,
        ),
        None => None,
    };
    Ok((rb, logger))
}

/// SIGINT and SIGTERM, caught from before `ready` is written: a reader that stops the
/// agent as soon as it is ready gets the final flush and `stats`, not the default
/// disposition's silent death.
struct Stop {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Stop {
    fn catch() -> anyhow::Result<Self> {
        let catch =
            |kind, name| signal(kind).with_context(|| format!("installing the {name} handler"));
        Ok(Stop {
            int: catch(SignalKind::interrupt(), "SIGINT")?,
            term: catch(SignalKind::terminate(), "SIGTERM")?,
        })
    }
}

/// Reads events until SIGINT or SIGTERM.
async fn event_loop<W: Write>(
    state: &mut Loop,
    rb: &mut Events,
    logger: &mut Option<KernelLog>,
    out: &mut Output<W>,
    mut conn_requests: Option<crate::agent::ConnRequests>,
    stop: &mut Stop,
) -> anyhow::Result<()> {
    // The kernel wakes us only when the buffer is a quarter full; anything less is read at
    // this tick, which then judges what is due.
    let mut tick = tokio::time::interval(crate::probes::DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drops_tick = tokio::time::interval(Duration::from_secs(1));
    info!("tracing; Ctrl-C or SIGTERM to stop");
    loop {
        tokio::select! {
            guard = rb.readable_mut() => {
                let mut guard = guard?;
                // Readiness stays set while records remain: the next turn comes back here,
                // after select! has given the other ready branches their chance.
                if !state.drain(guard.get_inner_mut(), out, DRAIN_BATCH)? {
                    guard.clear_ready();
                }
            }
            guard = async {
                match logger.as_mut() {
                    Some(l) => l.readable_mut().await,
                    None => std::future::pending().await,
                }
            } => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = tick.tick() => {
                // What arrived below the wake-up level first, so that the verdicts below
                // see the records written before this tick. Bounded: whatever is left
                // waits for the kernel's next wake-up or the next tick.
                let inner = rb.get_mut();
                for _ in 0..DRAIN_TICK_BATCHES {
                    if !state.drain(inner, out, DRAIN_BATCH)? {
                        break;
                    }
                }
                let now = export::monotonic_ns();
                // Before judging: a connection alive while the ring buffer overflowed may
                // miss facts, and its verdict must say so (the total is recorded with the
                // tick, so a replay lowers the same verdicts).
                let snap = state.counters.snapshot().ok();
                // The kernel side cannot see skipped runs: from the first one on it writes
                // what only matters after a loss (a DESTROY behind a CLOSE that may be
                // missing).
                if snap.as_ref().is_some_and(|s| s.runs_skipped > 0)
                    && let Err(e) = state.counters.mark_lost()
                {
                    log::debug!("{e:#}");
                }
                let drops = snap.map(|s| s.events_lost());
                out.tick(&mut state.table, now, drops)?;
                state.maybe_recheck(rb.get_mut(), out, now, drops)?;
                out.out.flush()?;
            }
            req = async {
                match conn_requests.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                if let (Some(reply), Some(a)) = (req, out.agent.as_mut()) {
                    let now = export::monotonic_ns();
                    let _ = reply.send(a.conns(&state.table, now, out.pods.as_mut()));
                }
            }
            _ = drops_tick.tick() => state.check_drops(out)?,
            _ = stop.int.recv() => return Ok(()),
            _ = stop.term.recv() => return Ok(()),
        }
    }
}

/// Gives back to the kernel the heap that loading used and freed (parsed kernel BTF, the
/// object's relocations: tens of MiB glibc would otherwise keep for the agent's lifetime).
pub fn release_load_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe { libc::malloc_trim(0) };
}

/// Loads the probes, or says why not (naming a missing capability or a seccomp refusal).
pub fn load_probes(opts: &TraceOptions) -> anyhow::Result<Probes> {
    probes::load(&LoadOptions {
        mode: opts.mode,
        ringbuf_bytes: opts.ringbuf_bytes,
        packets: opts.packets,
        h2_frames: opts.h2_frames,
        existing: opts.existing,
    })
    .map_err(|e| {
        let why = crate::privilege::explain_load_failure(&e);
        e.context(format!("attaching the probes: {why}"))
    })
}

/// `whoclosed trace`.
pub async fn run(opts: TraceOptions) -> anyhow::Result<()> {
    let probes = load_probes(&opts)?;
    release_load_memory();
    if opts.probe_report {
        return print_probe_report(&probes);
    }
    let stdout = io::stdout();
    let out = Output::new(
        io::BufWriter::with_capacity(OUT_BUFFER, stdout.lock()),
        opts.format,
        opts.filter.clone(),
        ClockBase::now(),
    );
    pipeline(&opts, probes, out, None).await
}

/// The one kernel pipeline of `trace` and `agent`: ring buffer → decode → connection table
/// → classifier → `out`, until SIGINT or SIGTERM; then everything still buffered is judged
/// and written with the final `stats` record.
pub(crate) async fn pipeline<W: Write>(
    opts: &TraceOptions,
    mut probes: Probes,
    mut out: Output<W>,
    conn_requests: Option<crate::agent::ConnRequests>,
) -> anyhow::Result<()> {
    let mut stop = Stop::catch()?;
    let (mut rb, mut logger) = poll_sources(&mut probes)?;
    let cfg = table_config(opts, &probes.report);
    out.pods = opts.k8s.clone().map(|(mut roots, node)| {
        // The mount the packet hooks attached at: the sockets' cgroup ids (from packet
        // records and the start-up walk) name its directories. Without the hooks the walk
        // still gives ids, so the mount is looked up all the same.
        roots.cgroup_root = match &probes.report.cgroup {
            Some(root) => Some(std::path::PathBuf::from(root)),
            None if probes.existing.is_some() => crate::kernel::cgroup2_root().ok(),
            None => None,
        };
        crate::k8s::Resolver::for_node(roots, node.as_deref())
    });
    if let Some(path) = &opts.record {
        out.recorder = Some(
            crate::record::Writer::create(path, out.clock_base, &cfg, &out.filter)
                .with_context(|| format!("--record {}", path.display()))?,
        );
    }
    let mut counters = probes.take_counters()?;
    let skips_counted = crate::skipped::counted_by(&probes.report.kernel);
    if !skips_counted {
        // This kernel skips tracepoint runs without counting them, so a loss may go
        // unseen: the kernel side writes from the start what otherwise only follows a
        // counted loss (DESTROY behind each CLOSE, ending a record whose CLOSE was lost).
        counters.mark_lost()?;
        info!(
            "kernel {} does not count skipped program runs (6.7 does): socket destructions \
             are recorded as a backstop",
            probes.report.kernel
        );
    }
    let mut state = Loop {
        table: Table::new(cfg),
        counters,
        decode_errors: 0,
        last_drops: 0,
        last_losses: Losses::default(),
        visible_netns: opts.visible_netns.clone(),
        rechecker: None,
    };
    // Before `ready`: a reader of `ready` (or of the agent's readiness) may ask for the
    // connections at once, and those open before the start are listed by then. The hooks
    // are attached already, so what happens meanwhile waits in the ring buffer.
    if let Some(walk) = probes.existing.take() {
        let proc_root = opts.k8s.as_ref().map_or_else(
            || std::path::PathBuf::from("/proc"),
            |(r, _)| r.proc_root.clone(),
        );
        let sum = state.walk_existing(
            &walk,
            &proc_root,
            opts.ringbuf_bytes,
            rb.get_mut(),
            &mut out,
            true,
        )?;
        info!(
            "{} TCP connections in {} network namespace(s) were open before the agent \
             started; listed",
            sum.connections, sum.namespaces
        );
        // `ready.existing_sockets` promises every namespace.
        probes.report.existing_sockets = sum.failed == 0;
        state.rechecker = Some(Rechecker {
            walk,
            storage: probes.storage_walk.take(),
            proc_root,
            ringbuf_bytes: opts.ringbuf_bytes,
            policy: RecheckPolicy::new(export::monotonic_ns(), !skips_counted),
        });
    }
    match opts.format {
        Format::Json => out.record(&Ready::new(out.now(), &probes.report))?,
        Format::Table => writeln!(out.out, "{}", export::TABLE_HEADER)?,
    }
    out.out.flush()?;
    if let Some(a) = &out.agent {
        a.attached(&probes.report);
    }

    let stopped = event_loop(
        &mut state,
        &mut rb,
        &mut logger,
        &mut out,
        conn_requests,
        &mut stop,
    );
    match stopped.await {
        Err(e) if is_broken_pipe(&e) => return Ok(()),
        Err(e) => return Err(e),
        Ok(()) => {}
    }
    if let Some(a) = &mut out.agent {
        a.stopping();
    }
    state.flush(rb.get_mut(), &mut out)?;
    info!("detaching probes");
    drop(rb);
    // The programs detach first: the logger must outlive what writes to its map.
    drop(probes);
    drop(logger);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(packet_facts: bool) -> ProbeReport {
        ProbeReport {
            requested_mode: ProbeMode::Auto,
            probe_mode: ProbeMode::Tracepoint,
            kernel: "test".into(),
            tracefs: "/sys/kernel/tracing".into(),
            btf: true,
            netns_ids: true,
            exit_detection: true,
            packet_facts,
            h2_frames: packet_facts,
            existing_sockets: false,
            cgroup: None,
            ringbuf_bytes: 4096,
            programs: Vec::new(),
            rst_reason_names: [(1, "NO_SOCKET".to_string())].into_iter().collect(),
        }
    }

    fn options(packets: bool) -> TraceOptions {
        TraceOptions {
            visible_netns: Vec::new(),
            format: Format::Json,
            filter: Filter::default(),
            linger: Duration::from_millis(300),
            mode: ProbeMode::Auto,
            ringbuf_bytes: 4096,
            packets,
            h2_frames: packets,
            existing: true,
            max_conns: 7,
            probe_report: false,
            record: None,
            k8s: None,
        }
    }

    /// When the live sockets are walked again: (seconds since the start, lost-event total
    /// read then, walk now?); after each walk, `complete` as given.
    #[test]
    fn rechecks_follow_losses_once_they_stop() {
        const S: u64 = 1_000_000_000;
        let run = |periodic: bool, steps: &[(u64, Option<u64>, bool)], complete: bool| {
            let mut p = RecheckPolicy::new(0, periodic);
            for (i, &(at, lost, want)) in steps.iter().enumerate() {
                let due = p.due(at, lost);
                assert_eq!(due, want, "step {i} at {} s, lost {lost:?}", at / S);
                if due {
                    p.ran(at, lost.unwrap_or(0), complete);
                }
            }
        };
        run(
            false,
            &[
                (S, Some(0), false),         // nothing lost
                (2 * S, Some(5), false),     // a loss: wait until it stops
                (5 * S / 2, Some(9), false), // still growing
                (3 * S, Some(9), false),
                (7 * S / 2, Some(9), true), // quiet for a second
                (5 * S, Some(9), false),    // covered
                (6 * S, Some(12), false),   // a new loss, quiet at 7 s...
                (7 * S, Some(12), false),   // ...but 10 s since the last walk first
                (27 * S / 2, Some(12), true),
                (15 * S, None, false),      // counters unreadable: nothing new
                (400 * S, Some(12), false), // no periodic walk where skips are counted
            ],
            true,
        );
        // A walk that saw a loss retires nothing, and the next try waits 60 s.
        run(
            false,
            &[
                (S, Some(3), false),
                (2 * S, Some(3), true),
                (20 * S, Some(3), false),
                (62 * S, Some(3), true),
            ],
            false,
        );
        // Where skips go uncounted (before 6.7): every 5 minutes as well.
        run(
            true,
            &[
                (299 * S, Some(0), false),
                (300 * S, Some(0), true),
                (301 * S, Some(0), false),
                (600 * S, Some(0), true),
            ],
            true,
        );
    }

    #[test]
    fn the_walk_fills_a_quarter_of_the_ring_buffer_at_most() {
        assert_eq!(walk_chunk(4 << 20), 4096);
        assert_eq!(walk_chunk(64 << 10), 136);
        assert_eq!(walk_chunk(4096), 16);
        assert!(walk_chunk(1 << 20) * 120 <= (1 << 20) / 4);
    }

    #[test]
    fn table_config_takes_packet_facts_from_what_attached() {
        // --no-packets: nothing attached.
        assert!(!table_config(&options(false), &report(false)).packet_facts);
        // Asked for, but the hooks failed (cgroup v1 node): still off.
        assert!(!table_config(&options(true), &report(false)).packet_facts);
        let cfg = table_config(&options(true), &report(true));
        assert!(cfg.packet_facts);
        assert_eq!(cfg.linger_ns, 300_000_000);
        assert_eq!(cfg.max_conns, 7);
        assert_eq!(
            cfg.rst_reason_names.get(&1).map(String::as_str),
            Some("NO_SOCKET")
        );
    }
}
