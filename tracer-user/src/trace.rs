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
    export::{self, Clock, Drops, Filter, Ready, Stats},
    probes::{self, Counters, LoadOptions, Logger, ProbeMode, ProbeReport, Probes},
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
    pub max_conns: usize,
    /// Entries of the kernel's per-socket packet map (`--max-sockets`).
    pub max_sockets: u32,
    pub probe_report: bool,
    /// When not empty, only these network namespaces are this host: events from others
    /// are discarded before the connection table, as if those sockets lived elsewhere.
    pub visible_netns: Vec<u32>,
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

struct Output<W: Write> {
    out: W,
    format: Format,
    filter: Filter,
    clock: Clock,
    printed: u64,
}

impl<W: Write> Output<W> {
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

    fn closed(&mut self, c: &Closed) -> io::Result<()> {
        if !self.filter.matches(c) {
            return Ok(());
        }
        self.printed += 1;
        match self.format {
            Format::Json => {
                serde_json::to_writer(
                    &mut self.out,
                    &export::CloseObject {
                        closed: c,
                        clock: &self.clock,
                    },
                )?;
                self.out.write_all(b"\n")
            }
            Format::Table => writeln!(self.out, "{}", export::close_line(c, &self.clock)),
        }
    }

    fn all(&mut self, closed: Vec<Closed>) -> io::Result<()> {
        closed.iter().try_for_each(|c| self.closed(c))
    }
}

struct Loop {
    table: Table,
    counters: Counters,
    decode_errors: u64,
    last_drops: u64,
    visible_netns: Vec<u32>,
}

impl Loop {
    fn drain<W: Write>(
        &mut self,
        rb: &mut RingBuf<MapData>,
        out: &mut Output<W>,
    ) -> io::Result<()> {
        while let Some(item) = rb.next() {
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
        Ok(())
    }

    /// Reports ring-buffer losses since the last check.
    fn check_drops<W: Write>(&mut self, out: &mut Output<W>) -> io::Result<()> {
        match self.counters.snapshot() {
            Ok(s) if s.ringbuf_drops > self.last_drops => {
                let new = s.ringbuf_drops - self.last_drops;
                warn!(
                    "ring buffer full: {new} kernel events lost ({} in total); raise --ringbuf-kib",
                    s.ringbuf_drops
                );
                out.record(&Drops::new(out.now(), new, &s))?;
                self.last_drops = s.ringbuf_drops;
            }
            Ok(_) => {}
            Err(e) => warn!("reading kernel counters: {e}"),
        }
        Ok(())
    }

    /// Shutdown: what is still in the ring buffer, every socket that already closed, then
    /// the `stats` record.
    fn flush<W: Write>(
        &mut self,
        rb: &mut RingBuf<MapData>,
        out: &mut Output<W>,
    ) -> io::Result<()> {
        self.drain(rb, out)?;
        let kernel = self.counters.final_snapshot().unwrap_or_default();
        self.table
            .note_ringbuf_drops(export::monotonic_ns(), kernel.ringbuf_drops);
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
        out.out.flush()
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>()
        .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

fn warn_unless_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        warn!(
            "not running as root: loading eBPF programs needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN"
        );
    }
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

/// Reads events until SIGINT or SIGTERM.
async fn event_loop<W: Write>(
    state: &mut Loop,
    rb: &mut Events,
    logger: &mut Option<KernelLog>,
    out: &mut Output<W>,
) -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut drops_tick = tokio::time::interval(Duration::from_secs(1));
    info!("tracing; Ctrl-C to stop");
    loop {
        tokio::select! {
            guard = rb.readable_mut() => {
                let mut guard = guard?;
                state.drain(guard.get_inner_mut(), out)?;
                guard.clear_ready();
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
                let now = export::monotonic_ns();
                // Before judging: a connection alive while the ring buffer overflowed may
                // miss facts, and its verdict must say so.
                if let Ok(s) = state.counters.snapshot() {
                    state.table.note_ringbuf_drops(now, s.ringbuf_drops);
                }
                out.all(state.table.take_due(now))?;
                out.out.flush()?;
            }
            _ = drops_tick.tick() => state.check_drops(out)?,
            _ = sigint.recv() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
        }
    }
}

pub async fn run(opts: TraceOptions) -> anyhow::Result<()> {
    warn_unless_root();
    let mut probes = probes::load(&LoadOptions {
        mode: opts.mode,
        ringbuf_bytes: opts.ringbuf_bytes,
        packets: opts.packets,
        max_sockets: opts.max_sockets,
    })
    .context("attaching the probes (whoclosed trace must run as root)")?;
    if opts.probe_report {
        return print_probe_report(&probes);
    }

    let (mut rb, mut logger) = poll_sources(&mut probes)?;
    let mut state = Loop {
        table: Table::new(table_config(&opts, &probes.report)),
        counters: probes.take_counters()?,
        decode_errors: 0,
        last_drops: 0,
        visible_netns: opts.visible_netns.clone(),
    };
    let stdout = io::stdout();
    let mut out = Output {
        out: io::BufWriter::new(stdout.lock()),
        format: opts.format,
        filter: opts.filter,
        clock: Clock::now(),
        printed: 0,
    };
    match opts.format {
        Format::Json => out.record(&Ready::new(out.now(), &probes.report))?,
        Format::Table => writeln!(out.out, "{}", export::TABLE_HEADER)?,
    }
    out.out.flush()?;

    match event_loop(&mut state, &mut rb, &mut logger, &mut out).await {
        Err(e) if is_broken_pipe(&e) => return Ok(()),
        Err(e) => return Err(e),
        Ok(()) => {}
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
            max_conns: 7,
            max_sockets: 1024,
            probe_report: false,
        }
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
