//! Prometheus metrics of the agent, with the `prometheus-client` crate (OpenMetrics text).
//!
//! Every label set is bounded: verdict labels are checked against the values the classifier
//! can produce (docs/events.md) and anything else is counted as `other`, so a new reason
//! string can never grow the series count without a code change. No label carries a
//! connection, address, pid or pod.
//!
//! The pipeline calls the `observe_*` / `set_*` methods; the HTTP layer calls [`Metrics::encode`].
//! All methods take `&self` (the counters are atomic), so one `Arc<Metrics>` is shared.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const CLOSED_BY: &[&str] = &["client", "server", "middlebox", "unknown"];
const CONFIDENCE: &[&str] = &["high", "medium", "low"];
/// What a label value outside its known set is counted as.
pub const OTHER: &str = "other";

/// A reason the classifier can produce (docs/events.md).
pub fn known_reason(reason: &str) -> bool {
    crate::classify::Reason::is_known(reason)
}

fn bounded(value: &str, known: impl Fn(&str) -> bool) -> &str {
    if known(value) { value } else { OTHER }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    closed_by: &'static str,
    reason: String,
    confidence: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: &'static str,
}

/// Why the kernel side lost events other than to a full ring buffer (which has its own
/// counter, `ringbuf_drops`). The value indexes `Metrics::last_lost`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LostCause {
    /// A tracepoint record the kernel side could not read.
    UnreadableRecord = 0,
    /// A tracing program's run the kernel skipped because another BPF program was
    /// running on that CPU.
    SkippedRun = 1,
}

/// What a kernel running `total` grew by since the `last` one read (which it replaces); a
/// total lower than the last (counters reset by a reload) counts from zero again.
fn growth(last: &AtomicU64, total: u64) -> u64 {
    let last = last.swap(total, Ordering::Relaxed);
    if total >= last { total - last } else { total }
}

impl LostCause {
    const ALL: [LostCause; 2] = [LostCause::UnreadableRecord, LostCause::SkippedRun];

    fn label(self) -> &'static str {
        match self {
            LostCause::UnreadableRecord => "unreadable_record",
            LostCause::SkippedRun => "skipped_run",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    probe_mode: String,
    packet_facts: &'static str,
    kernel: String,
}

/// Which end of the socket sent a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Sent,
    Received,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::Sent => "sent",
            Direction::Received => "received",
        }
    }
}

/// How the probes are attached, once known (an info metric; absent before).
#[derive(Debug, Default)]
struct ProbeInfo(Mutex<Option<ProbeLabels>>);

impl Collector for ProbeInfo {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let labels = match self.0.lock() {
            Ok(l) => l.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        if let Some(labels) = labels {
            let info = Info::new(labels);
            let metric = encoder.encode_descriptor(
                "probe",
                "How tcp_close() is observed (probe_mode), whether packet facts are attached, and the kernel release.",
                None,
                info.metric_type(),
            )?;
            info.encode(metric)?;
        }
        Ok(())
    }
}

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    closes: Family<CloseLabels, Counter>,
    resets: Family<DirectionLabels, Counter>,
    retransmits: Counter,
    ringbuf_drops: Counter,
    last_drops: AtomicU64,
    events_lost: Family<CauseLabels, Counter>,
    last_lost: [AtomicU64; 2],
    ends_unseen: Counter,
    last_ends_unseen: AtomicU64,
    tracked: Gauge,
    probe: Arc<ProbeInfo>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("whoclosed");
        let closes = Family::<CloseLabels, Counter>::default();
        registry.register(
            "closes",
            "TCP connections that ended, by verdict: who closed them, why, and how sure.",
            closes.clone(),
        );
        let resets = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "tcp_resets",
            "TCP RST segments of traced sockets, by direction (sent or received).",
            resets.clone(),
        );
        let retransmits = Counter::default();
        registry.register(
            "retransmits",
            "TCP segment retransmissions of traced sockets.",
            retransmits.clone(),
        );
        let ringbuf_drops = Counter::default();
        registry.register(
            "ringbuf_drops",
            "Kernel events lost because the ring buffer was full (raise --ringbuf-kib).",
            ringbuf_drops.clone(),
        );
        let events_lost = Family::<CauseLabels, Counter>::default();
        registry.register(
            "kernel_events_lost",
            "Kernel events lost other than to a full ring buffer, by cause: unreadable_record \
             (a tracepoint record the kernel side could not read) or skipped_run (a tracing \
             program the kernel did not run because another BPF program was running on that \
             CPU; counted by kernels from 6.7, fentry from 5.12).",
            events_lost.clone(),
        );
        for c in LostCause::ALL {
            // Listed at zero from the start, so that a rate over them is defined.
            let _ = events_lost.get_or_create(&CauseLabels { cause: c.label() });
        }
        let ends_unseen = Counter::default();
        registry.register(
            "ends_unseen",
            "Tracked sockets whose end was not seen because kernel events were lost: another \
             socket took the address first, or the recheck after a loss found them gone. Each \
             is judged with its confidence lowered.",
            ends_unseen.clone(),
        );
        let tracked = Gauge::default();
        registry.register(
            "tracked_connections",
            "TCP sockets currently tracked by the agent.",
            tracked.clone(),
        );
        let probe = Arc::new(ProbeInfo::default());
        registry.register_collector(Box::new(probe.clone()));
        Self {
            registry,
            closes,
            resets,
            retransmits,
            ringbuf_drops,
            last_drops: AtomicU64::new(0),
            events_lost,
            last_lost: [AtomicU64::new(0), AtomicU64::new(0)],
            ends_unseen,
            last_ends_unseen: AtomicU64::new(0),
            tracked,
            probe,
        }
    }

    /// One verdict. Values outside the documented sets are counted under `other`.
    pub fn observe_close(&self, closed_by: &str, reason: &str, confidence: &str) {
        let labels = CloseLabels {
            closed_by: static_label(closed_by, CLOSED_BY),
            reason: bounded(reason, known_reason).to_string(),
            confidence: static_label(confidence, CONFIDENCE),
        };
        self.closes.get_or_create(&labels).inc();
    }

    /// `n` RST segments in one direction.
    pub fn observe_resets(&self, direction: Direction, n: u64) {
        self.resets
            .get_or_create(&DirectionLabels {
                direction: direction.label(),
            })
            .inc_by(n);
    }

    /// `n` retransmitted segments.
    pub fn observe_retransmits(&self, n: u64) {
        self.retransmits.inc_by(n);
    }

    /// The kernel's running total of ring-buffer drops (summed per-CPU counters, as read
    /// from the map): the counter advances by the difference. A total lower than the last
    /// one (counters reset by a reload) counts from zero again.
    pub fn set_drops(&self, total: u64) {
        self.ringbuf_drops.inc_by(growth(&self.last_drops, total));
    }

    /// The kernel's running total of events lost to `cause`, as [`Metrics::set_drops`].
    pub fn set_events_lost(&self, cause: LostCause, total: u64) {
        let delta = growth(&self.last_lost[cause as usize], total);
        self.events_lost
            .get_or_create(&CauseLabels {
                cause: cause.label(),
            })
            .inc_by(delta);
    }

    /// The connection table's running total of ends not seen (`table.ends_unseen`), as
    /// [`Metrics::set_drops`].
    pub fn set_ends_unseen(&self, total: u64) {
        self.ends_unseen
            .inc_by(growth(&self.last_ends_unseen, total));
    }

    /// Sockets currently in the connection table.
    pub fn set_tracked_connections(&self, n: u64) {
        self.tracked.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Records how the probes were attached (`fentry`, `kprobe`, `tracepoint`).
    pub fn set_probe_info(&self, probe_mode: &str, packet_facts: bool, kernel: &str) {
        let labels = ProbeLabels {
            probe_mode: probe_mode.to_string(),
            packet_facts: if packet_facts { "true" } else { "false" },
            kernel: kernel.to_string(),
        };
        match self.probe.0.lock() {
            Ok(mut l) => *l = Some(labels),
            Err(poisoned) => *poisoned.into_inner() = Some(labels),
        }
    }

    /// The agent-wide numbers of `/v1/stats` (`whoclosed stats`): ring-buffer drops,
    /// tracked connections, resets, retransmits and how the probes are attached.
    pub fn agent_summary(&self) -> serde_json::Value {
        let probe = match self.probe.0.lock() {
            Ok(l) => l.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let resets = |d: Direction| {
            self.resets
                .get_or_create(&DirectionLabels {
                    direction: d.label(),
                })
                .get()
        };
        serde_json::json!({
            "ringbuf_drops": self.ringbuf_drops.get(),
            "tracked_connections": self.tracked.get(),
            "resets_sent": resets(Direction::Sent),
            "resets_received": resets(Direction::Received),
            "retransmits": self.retransmits.get(),
            "probe_mode": probe.as_ref().map(|p| p.probe_mode.clone()),
            "packet_facts": probe.as_ref().map(|p| p.packet_facts == "true"),
            "kernel": probe.as_ref().map(|p| p.kernel.clone()),
        })
    }

    /// The OpenMetrics text exposition (serve with [`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would be a bug in a label
        // encoder, and an empty body then tells the scraper something is wrong.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            log::error!("encoding metrics: {e}");
            out.clear();
        }
        out
    }
}

/// `GET /metrics` serving `metrics`, for the agent's HTTP server to merge into its router.
pub fn router(metrics: Arc<Metrics>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let body = metrics.encode();
            async move { ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], body) }
        }),
    )
}

fn static_label(value: &str, known: &[&'static str]) -> &'static str {
    known
        .iter()
        .find(|k| **k == value)
        .copied()
        .unwrap_or(OTHER)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line `name{labels}` (labels as encoded), if present.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn exposition_names_types_and_values() {
        let m = Metrics::new();
        m.observe_close("server", "server_idle_timeout", "high");
        m.observe_close("server", "server_idle_timeout", "high");
        m.observe_close("middlebox", "middlebox_reset", "medium");
        m.observe_resets(Direction::Sent, 2);
        m.observe_resets(Direction::Received, 1);
        m.observe_retransmits(5);
        m.set_tracked_connections(17);
        m.set_drops(10);
        m.set_drops(25);
        let text = m.encode();
        assert_eq!(
            sample(&text, "whoclosed_ends_unseen_total"),
            Some(0.0),
            "{text}"
        );
        m.set_ends_unseen(3);
        m.set_ends_unseen(7);
        m.set_ends_unseen(7);
        let text = m.encode();
        assert_eq!(
            sample(&text, "whoclosed_ends_unseen_total"),
            Some(7.0),
            "{text}"
        );
        assert!(text.contains("# TYPE whoclosed_closes counter"), "{text}");
        assert_eq!(
            sample(
                &text,
                r#"whoclosed_closes_total{closed_by="server",reason="server_idle_timeout",confidence="high"}"#
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"whoclosed_closes_total{closed_by="middlebox",reason="middlebox_reset",confidence="medium"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"whoclosed_tcp_resets_total{direction="sent"}"#),
            Some(2.0)
        );
        assert_eq!(
            sample(&text, r#"whoclosed_tcp_resets_total{direction="received"}"#),
            Some(1.0)
        );
        assert_eq!(sample(&text, "whoclosed_retransmits_total"), Some(5.0));
        assert_eq!(sample(&text, "whoclosed_ringbuf_drops_total"), Some(25.0));
        assert!(text.contains("# TYPE whoclosed_tracked_connections gauge"));
        assert_eq!(sample(&text, "whoclosed_tracked_connections"), Some(17.0));
        assert!(
            text.trim_end().ends_with("# EOF"),
            "OpenMetrics ends with EOF"
        );
    }

    #[test]
    fn probe_info_appears_once_known_and_is_replaced() {
        let m = Metrics::new();
        assert!(!m.encode().contains("whoclosed_probe_info"));
        m.set_probe_info("kprobe", true, "6.1.0");
        m.set_probe_info("tracepoint", true, "6.18.0");
        let text = m.encode();
        assert!(text.contains("# TYPE whoclosed_probe info"), "{text}");
        assert_eq!(
            sample(
                &text,
                r#"whoclosed_probe_info{probe_mode="tracepoint",packet_facts="true",kernel="6.18.0"}"#
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(text.matches("whoclosed_probe_info{").count(), 1);
    }

    #[test]
    fn unknown_label_values_are_bounded() {
        let m = Metrics::new();
        m.observe_close("someone", "reason_with_conn_42", "certain");
        m.observe_close("client", "client_close", "low");
        m.observe_close("client", "remote_reset", "low");
        let text = m.encode();
        assert_eq!(
            sample(
                &text,
                r#"whoclosed_closes_total{closed_by="other",reason="other",confidence="other"}"#
            ),
            Some(1.0),
            "{text}"
        );
        assert!(!text.contains("reason_with_conn_42"));
        assert_eq!(
            sample(
                &text,
                r#"whoclosed_closes_total{closed_by="client",reason="remote_reset",confidence="low"}"#
            ),
            Some(1.0)
        );
    }

    #[test]
    fn drops_counter_never_goes_backwards() {
        let m = Metrics::new();
        m.set_drops(100);
        m.set_drops(100);
        m.set_drops(3); // the kernel counters restarted
        assert_eq!(
            sample(&m.encode(), "whoclosed_ringbuf_drops_total"),
            Some(103.0)
        );
    }

    #[test]
    fn other_kernel_losses_are_counted_by_cause() {
        let m = Metrics::new();
        let skipped = r#"whoclosed_kernel_events_lost_total{cause="skipped_run"}"#;
        let unreadable = r#"whoclosed_kernel_events_lost_total{cause="unreadable_record"}"#;
        assert_eq!(sample(&m.encode(), skipped), Some(0.0));
        m.set_events_lost(LostCause::SkippedRun, 4);
        m.set_events_lost(LostCause::SkippedRun, 9);
        m.set_events_lost(LostCause::UnreadableRecord, 2);
        let text = m.encode();
        assert_eq!(sample(&text, skipped), Some(9.0), "{text}");
        assert_eq!(sample(&text, unreadable), Some(2.0), "{text}");
    }

    /// Every reason documented in docs/events.md is a known label value, so none of them is
    /// folded into `other`.
    #[test]
    fn every_documented_reason_is_known() {
        let doc = include_str!("../../docs/events.md");
        let table = doc
            .split("Reasons (")
            .nth(1)
            .expect("the reasons table in docs/events.md");
        let mut seen = 0;
        for line in table.lines().skip_while(|l| !l.starts_with("| `")) {
            let Some(cell) = line.strip_prefix("| `") else {
                break;
            };
            let Some((reason, _)) = cell.split_once('`') else {
                continue;
            };
            let expanded: Vec<String> = match reason.strip_prefix("<side>_") {
                Some(rest) => ["client", "server", "local", "remote"]
                    .iter()
                    .map(|s| format!("{s}_{rest}"))
                    .collect(),
                None => vec![reason.to_string()],
            };
            for r in expanded {
                assert!(
                    known_reason(&r),
                    "documented reason {r} is not a known label"
                );
                seen += 1;
            }
        }
        assert!(seen > 30, "parsed only {seen} reasons from docs/events.md");
    }
}
