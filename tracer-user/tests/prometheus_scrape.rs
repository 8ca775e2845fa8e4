//! A real Prometheus (Debian's `prometheus` 2.42) scrapes the agent's `/metrics` router on
//! loopback, and a PromQL query through its HTTP API returns the counts the test recorded.
//!
//! Skips with a reason when `prometheus` is not installed, unless `WHOCLOSED_E2E=require`.
// Test code: a failed expectation is meant to stop the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tracer_user::metrics::{Direction, Metrics, router};

mod support;
use support::{Prometheus, instant_query, which_prometheus};

#[test]
fn real_prometheus_scrapes_the_metrics_endpoint() {
    let Ok(prom) = which_prometheus() else {
        if std::env::var("WHOCLOSED_E2E").as_deref() == Ok("require") {
            panic!("prometheus is not installed (Debian package `prometheus`)");
        }
        eprintln!("SKIP prometheus_scrape: no `prometheus` binary (apt-get install prometheus)");
        return;
    };

    let metrics = Arc::new(Metrics::new());
    for _ in 0..3 {
        metrics.observe_close("server", "server_idle_timeout", "high");
    }
    metrics.observe_close("middlebox", "middlebox_reset", "medium");
    metrics.observe_resets(Direction::Received, 4);
    metrics.set_probe_info("tracepoint", true, "test-kernel");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the metrics endpoint");
    let metrics_port = listener.local_addr().expect("addr").port();
    let app = router(metrics.clone());
    let server = std::thread::spawn(move || {
        runtime.block_on(async move {
            let _ = axum::serve(listener, app).await;
        })
    });
    drop(server); // detached: ends with the test process

    let prom = Prometheus::start(&prom, "scrape", &format!("127.0.0.1:{metrics_port}"));

    let deadline = Instant::now() + Duration::from_secs(60);
    let query = r#"sum(whoclosed_closes_total{closed_by="server",reason="server_idle_timeout",confidence="high"})"#;
    let mut got = None;
    while Instant::now() < deadline {
        got = instant_query(prom.port, query);
        if got.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = std::fs::read_to_string(prom.dir.join("prometheus.log")).unwrap_or_default();
    assert_eq!(got, Some(3.0), "PromQL {query}; prometheus log:\n{log}");

    // The scrape itself succeeded and the other series arrived with the right values.
    assert_eq!(
        instant_query(prom.port, r#"up{job="whoclosed"}"#),
        Some(1.0)
    );
    assert_eq!(
        instant_query(prom.port, "sum(whoclosed_closes_total)"),
        Some(4.0)
    );
    assert_eq!(
        instant_query(
            prom.port,
            r#"whoclosed_tcp_resets_total{direction="received"}"#
        ),
        Some(4.0)
    );
    assert_eq!(
        instant_query(
            prom.port,
            r#"whoclosed_probe_info{probe_mode="tracepoint"}"#
        ),
        Some(1.0)
    );
    // A counter that advances between scrapes is seen advancing.
    metrics.observe_close("server", "server_idle_timeout", "high");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && instant_query(prom.port, query) != Some(4.0) {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(instant_query(prom.port, query), Some(4.0));
}
