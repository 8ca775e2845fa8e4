//! The API's routes through the router (no network), then over a real unix socket and a
//! real TCP listener with curl.

use std::{sync::Arc, time::Duration};

use axum::{
    body::Body,
    http::{Request, StatusCode},
};
use tower::ServiceExt as _;

use super::*;
use crate::history::Limits;

const GOLDENS: [&str; 3] = [
    include_str!("../export/golden/grpc_idle_timeout_client.json"),
    include_str!("../export/golden/ipv4_middlebox_reset_untraced.json"),
    include_str!("../export/golden/ipv6_client_close.json"),
];

fn state() -> Arc<ApiState> {
    let s = Arc::new(ApiState::new(
        History::new(Limits::default()),
        Arc::new(Metrics::new()),
    ));
    for g in GOLDENS {
        let v: serde_json::Value = serde_json::from_str(g).expect("golden");
        s.record(&v.to_string()).expect("a close record");
    }
    s
}

async fn get(router: &Router, uri: &str) -> (StatusCode, String) {
    let resp = router
        .clone()
        .oneshot(Request::get(uri).body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn ids(body: &str) -> Vec<String> {
    body.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("NDJSON line");
            v["conn"]["id"].as_str().unwrap_or_default().to_string()
        })
        .collect()
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let s = state();
    let r = router(s.clone());
    assert_eq!(get(&r, "/healthz").await.0, StatusCode::OK);
    let (code, body) = get(&r, "/readyz").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("probes are not attached"), "{body}");
    s.set_ready(true);
    assert_eq!(get(&r, "/readyz").await.0, StatusCode::OK);
    s.metrics.observe_close("client", "client_close", "high");
    let (code, body) = get(&r, "/metrics").await;
    assert_eq!(code, StatusCode::OK);
    assert!(
        body.contains("whoclosed_closes_total{closed_by=\"client\""),
        "{body}"
    );
}

#[tokio::test]
async fn closes_filters_and_lookup() {
    let r = router(state());
    let (code, body) = get(&r, "/v1/closes").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(ids(&body).len(), 3);
    let (_, body) = get(&r, "/v1/closes?closed_by=middlebox,unknown").await;
    assert_eq!(ids(&body), ["3a48113ddbc90c95"]);
    let (_, body) = get(&r, "/v1/closes?port=443&since=1h").await;
    assert_eq!(ids(&body), ["b1e266365af28ec6"]);
    let (_, body) = get(&r, "/v1/closes?addr=10.241.2.2&pid=77&confidence=medium").await;
    assert_eq!(ids(&body), ["b0b16bcd9bca933c"]);
    let (_, body) = get(&r, "/v1/closes?limit=1").await;
    assert_eq!(ids(&body), ["b1e266365af28ec6"], "the newest");
    let (code, body) = get(&r, "/v1/closes/3a48113ddbc90c95").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(ids(&body), ["3a48113ddbc90c95"]);
    let (code, body) = get(&r, "/v1/closes/ffff").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(body.contains("ffff"), "{body}");
}

#[tokio::test]
async fn stats_counts_the_filtered_history() {
    let r = router(state());
    let (code, body) = get(&r, "/v1/stats").await;
    assert_eq!(code, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["records"], 3);
    assert_eq!(v["by_closed_by"]["middlebox"], 1);
    assert_eq!(v["by_closed_by"]["server"], 1);
    assert_eq!(v["by_closed_by"]["client"], 1);
    let (_, body) = get(&r, "/v1/stats?closed_by=server").await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["records"], 1);
    assert_eq!(v["top_remotes"][0]["key"], "10.241.2.2");
    assert_eq!(get(&r, "/v1/stats?port=x").await.0, StatusCode::BAD_REQUEST);
}

/// The answer matches docs/schema/v1/api-stats.schema.json.
#[tokio::test]
async fn stats_answer_matches_its_schema() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/schema/v1/api-stats.schema.json"
    );
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read schema")).expect("JSON");
    let validator = jsonschema::validator_for(&schema).expect("a valid schema");
    let r = router(state());
    for q in [
        "/v1/stats",
        "/v1/stats?closed_by=server",
        "/v1/stats?port=1",
    ] {
        let (code, body) = get(&r, q).await;
        assert_eq!(code, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let errs: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
        assert!(errs.is_empty(), "{q}: {v}\n{errs:#?}");
    }
}

#[tokio::test]
async fn bad_parameters_are_named() {
    let r = router(state());
    for (uri, names) in [
        ("/v1/closes?port=http", "bad port=\"http\""),
        ("/v1/closes?addr=10.0.0", "bad addr=\"10.0.0\""),
        ("/v1/closes?since=yesterday", "bad since=\"yesterday\""),
        ("/v1/closes?pid=-1", "bad pid=\"-1\""),
        (
            "/v1/closes?verdict=server",
            "bad verdict=\"server\": unknown parameter",
        ),
    ] {
        let (code, body) = get(&r, uri).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{uri}");
        assert!(body.contains(names), "{uri}: {body}");
    }
}

async fn curl(args: Vec<String>) -> (String, String) {
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("curl")
            .args(["-s", "--max-time", "5", "-w", "\n%{http_code}"])
            .args(&args)
            .output()
            .expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
        (body.to_string(), code.to_string())
    })
    .await
    .expect("curl task")
}

#[tokio::test]
async fn unix_socket_is_private_and_serves() {
    let dir = std::env::temp_dir().join(format!("whoclosed-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sock = dir.join("run/whoclosed.sock");
    let listener = bind_unix(&sock).expect("bind");
    let mode = std::fs::metadata(&sock).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dir_mode = std::fs::metadata(dir.join("run"))
        .expect("stat")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
    let server = tokio::spawn(serve_unix(listener, router(state())));
    let sock_arg = sock.display().to_string();
    let (body, code) = curl(vec![
        "--unix-socket".into(),
        sock_arg.clone(),
        "http://agent/v1/closes?closed_by=server".into(),
    ])
    .await;
    assert_eq!(code, "200");
    assert_eq!(ids(&body), ["b0b16bcd9bca933c"]);
    server.abort();
    let _ = server.await;
    // A stale socket from a previous run is replaced; any other file is not touched.
    drop(bind_unix(&sock).expect("rebinding over a stale socket"));
    let file = dir.join("run/not-a-socket");
    std::fs::write(&file, b"keep me").expect("write");
    let err = bind_unix(&file).expect_err("must refuse");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).expect("read"), b"keep me");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[tokio::test]
async fn tcp_listener_requires_the_bearer_token() {
    assert!(require_bearer(router(state()), "  ").is_err());
    let app = require_bearer(router(state()), "s3cret").expect("token");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "http://{}/v1/closes?limit=1",
        listener.local_addr().expect("addr")
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (_, code) = curl(vec![url.clone()]).await;
    assert_eq!(code, "401", "no token");
    let (_, code) = curl(vec![
        "-H".into(),
        "Authorization: Bearer s3cres".into(),
        url.clone(),
    ])
    .await;
    assert_eq!(code, "401", "wrong token");
    let (body, code) = curl(vec![
        "-H".into(),
        "Authorization: Bearer s3cret".into(),
        url,
    ])
    .await;
    assert_eq!(code, "200");
    assert_eq!(ids(&body), ["b1e266365af28ec6"]);
    server.abort();
}

#[tokio::test]
async fn follow_flag_is_checked() {
    let r = router(state());
    let (code, body) = get(&r, "/v1/closes?follow=maybe").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(body.contains("bad follow"), "{body}");
    let (code, body) = get(&r, "/v1/closes?follow=false&closed_by=middlebox").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(ids(&body), ["3a48113ddbc90c95"]);
}
