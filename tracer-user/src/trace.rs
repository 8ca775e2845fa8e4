//! `whoclosed trace`: load the probes, read the ring buffer, print one verdict per ended
//! socket, flush and detach on SIGINT/SIGTERM.

use std::{
    io::{self, Write},
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use log::{info, warn};
use serde_json::json;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{
    conn::{Closed, Table, ephemeral_range},
    event,
    export::{self, Clock, Filter, SCHEMA_VERSION},
    probes::{self, LoadOptions, ProbeMode},
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
    pub probe_report: bool,
}

struct Output<W: Write> {
    out: W,
    format: Format,
    filter: Filter,
    clock: Clock,
    printed: u64,
}

impl<W: Write> Output<W> {
    fn line(&mut self, v: &serde_json::Value) -> io::Result<()> {
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
}

struct Loop {
    table: Table,
    decode_errors: u64,
    last_drops: u64,
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
                    for c in self.table.on_event(&ev) {
                        out.closed(&c)?;
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
}

fn is_broken_pipe(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe
}

pub async fn run(opts: TraceOptions) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        warn!(
            "not running as root: loading eBPF programs needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN"
        );
    }
    let mut probes = probes::load(&LoadOptions {
        mode: opts.mode,
        ringbuf_bytes: opts.ringbuf_bytes,
        packets: opts.packets,
    })
    .context("attaching the probes (whoclosed trace must run as root)")?;

    let stdout = io::stdout();
    if opts.probe_report {
        let mut lock = stdout.lock();
        serde_json::to_writer_pretty(&mut lock, &probes.report)?;
        writeln!(lock)?;
        return Ok(());
    }

    let rb = probes.take_ringbuf()?;
    let counters = probes.take_counters()?;
    // SAFETY: RingBuf and EbpfLogger own their map file descriptors for as long as they
    // live and always return the same one, which is what AsyncFd requires.
    let mut rb = unsafe { AsyncFd::register_with_interest(rb, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {}", e))?;
    let mut logger = match probes.logger.take() {
        // SAFETY: as above.
        Some(l) => Some(
            unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("polling the kernel log buffer: {}", e))?,
        ),
        None => None,
    };

    let clock = Clock::now();
    let mut out = Output {
        out: io::BufWriter::new(stdout.lock()),
        format: opts.format,
        filter: opts.filter.clone(),
        clock,
        printed: 0,
    };
    let report = &probes.report;
    match opts.format {
        Format::Json => out.line(&json!({
            "v": SCHEMA_VERSION,
            "type": "ready",
            "ts": clock.rfc3339(export::monotonic_ns()),
            "probe_mode": report.probe_mode,
            "packet_facts": report.packet_facts,
            "netns_ids": report.netns_ids,
            "exit_detection": report.exit_detection,
            "kernel": report.kernel,
        }))?,
        Format::Table => writeln!(out.out, "{}", export::TABLE_HEADER)?,
    }
    out.out.flush()?;

    let linger_ns = u64::try_from(opts.linger.as_nanos()).unwrap_or(u64::MAX);
    let mut table = Table::new(linger_ns, opts.max_conns, ephemeral_range());
    table.set_rst_reason_names(crate::kernel::btf_enum_names(
        std::path::Path::new("/sys/kernel/btf/vmlinux"),
        "sk_rst_reason",
        "SK_RST_REASON_",
    ));
    let mut state = Loop {
        table,
        decode_errors: 0,
        last_drops: 0,
    };
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut drops_tick = tokio::time::interval(Duration::from_secs(1));
    info!("tracing; Ctrl-C to stop");

    let result: anyhow::Result<()> = async {
        loop {
            tokio::select! {
                guard = rb.readable_mut() => {
                    let mut guard = guard?;
                    state.drain(guard.get_inner_mut(), &mut out)?;
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
                    for c in state.table.take_due(export::monotonic_ns()) {
                        out.closed(&c)?;
                    }
                    out.out.flush()?;
                }
                _ = drops_tick.tick() => {
                    match counters.snapshot() {
                        Ok(s) if s.ringbuf_drops > state.last_drops => {
                            let new = s.ringbuf_drops - state.last_drops;
                            warn!("ring buffer full: {new} kernel events lost ({} in total); raise --ringbuf-kib", s.ringbuf_drops);
                            out.line(&json!({
                                "v": SCHEMA_VERSION,
                                "type": "drops",
                                "ts": clock.rfc3339(export::monotonic_ns()),
                                "ringbuf_drops": new,
                                "ringbuf_drops_total": s.ringbuf_drops,
                                "per_cpu": s.ringbuf_drops_per_cpu,
                            }))?;
                            state.last_drops = s.ringbuf_drops;
                        }
                        Ok(_) => {}
                        Err(e) => warn!("reading kernel counters: {e}"),
                    }
                }
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = &result {
        if e.downcast_ref::<io::Error>().is_some_and(is_broken_pipe) {
            return Ok(());
        }
        return result;
    }

    // Flush: what is still in the ring buffer, then every socket that already closed.
    state.drain(rb.get_mut(), &mut out)?;
    for c in state.table.take_all_closed() {
        out.closed(&c)?;
    }
    let kernel = counters.snapshot().unwrap_or_default();
    if kernel.ringbuf_drops > 0 {
        warn!(
            "{} kernel events were lost to a full ring buffer",
            kernel.ringbuf_drops
        );
    }
    out.line(&json!({
        "v": SCHEMA_VERSION,
        "type": "stats",
        "ts": clock.rfc3339(export::monotonic_ns()),
        "printed": out.printed,
        "open_connections": state.table.len(),
        "decode_errors": state.decode_errors,
        "table": state.table.stats,
        "kernel": kernel,
    }))?;
    out.out.flush()?;
    info!("detaching probes");
    drop(rb);
    drop(probes);
    Ok(())
}
