//! The client against real API servers (unix sockets and a TCP listener with a token).

use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::{
    api::{self, ApiState},
    history::{History, Limits},
    metrics::Metrics,
};

#[test]
fn agent_addresses() {
    assert_eq!(
        "unix:/run/x.sock".parse::<Agent>(),
        Ok(Agent::Unix("/run/x.sock".into()))
    );
    assert_eq!(
        "/run/x.sock".parse::<Agent>(),
        Ok(Agent::Unix("/run/x.sock".into()))
    );
    assert_eq!(
        "http://10.0.0.1:9091/".parse::<Agent>(),
        Ok(Agent::Tcp {
            addr: "10.0.0.1:9091".into(),
            token: None
        })
    );
    assert_eq!(
        "node-1:9091".parse::<Agent>().map(|a| a.to_string()),
        Ok("http://node-1:9091".to_string())
    );
    for bad in ["node-1", "node-1:http", ":9091", "http://"] {
        let err = bad.parse::<Agent>().expect_err(bad);
        assert!(err.contains("host:port"), "{err}");
    }
}

/// The ipv4 golden (a client socket) and its server end as another node's agent sees it.
fn both_ends() -> (String, String) {
    let client: Value = serde_json::from_str(include_str!(
        "../export/golden/ipv4_middlebox_reset_untraced.json"
    ))
    .expect("golden");
    let mut server = client.clone();
    server["ts"] = json!("2026-11-23T18:55:09.000000Z");
    server["conn"]["id"] = json!("5e5e5e5e5e5e5e5e");
    server["conn"]["local"] = client["conn"]["remote"].clone();
    server["conn"]["remote"] = client["conn"]["local"].clone();
    server["conn"]["role"] = json!("server");
    server["verdict"]["closed_by"] = json!("client");
    server["verdict"]["reason"] = json!("client_reset");
    server["verdict"]["confidence"] = json!("low");
    (client.to_string(), server.to_string())
}

fn serve_unix(
    dir: &std::path::Path,
    name: &str,
    lines: &[&str],
) -> (Agent, tokio::task::JoinHandle<()>) {
    let state = Arc::new(ApiState::new(
        History::new(Limits::default()),
        Arc::new(Metrics::new()),
    ));
    for l in lines {
        state.record(l).expect("close record");
    }
    let sock = dir.join(name);
    let listener = api::bind_unix(&sock).expect("bind");
    let task = tokio::spawn(async move {
        let _ = api::serve_unix(listener, api::router(state)).await;
    });
    (Agent::Unix(sock), task)
}

#[tokio::test]
async fn merges_agents_and_joins_the_two_ends() {
    let dir = std::env::temp_dir().join(format!("whoclosed-client-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let (client_end, server_end) = both_ends();
    let other: Value =
        serde_json::from_str(include_str!("../export/golden/ipv6_client_close.json"))
            .expect("golden");
    let other = other.to_string();
    let (a, ta) = serve_unix(&dir, "a.sock", &[&client_end, &other]);
    let (b, tb) = serve_unix(&dir, "b.sock", &[&server_end]);

    let records = closes(&[a.clone(), b.clone()], "").await.expect("closes");
    assert_eq!(records.len(), 3);
    let ts: Vec<&str> = records.iter().map(|r| s(&r.value, "/ts")).collect();
    let mut sorted = ts.clone();
    sorted.sort();
    assert_eq!(ts, sorted, "merged oldest first");
    let pairs = join_ends(&records);
    assert_eq!(pairs.len(), 1, "{pairs:?}");
    let (i, j) = pairs[0];
    let ids = [
        s(&records[i].value, "/conn/id"),
        s(&records[j].value, "/conn/id"),
    ];
    assert!(ids.contains(&"3a48113ddbc90c95") && ids.contains(&"5e5e5e5e5e5e5e5e"));

    let wide = table(&records, true);
    let row = wide
        .lines()
        .find(|l| l.contains("10.9.1.2:40000") && l.contains("client "))
        .expect("the client row");
    assert!(
        row.contains(&format!("{b} client/client_reset (low)")),
        "the other end's verdict on the client row: {wide}"
    );
    let narrow = table(&records, false);
    assert!(
        narrow
            .lines()
            .next()
            .is_some_and(|h| h.contains("CLOSED_BY") && !h.contains("HINT"))
    );
    assert_eq!(
        narrow.lines().count(),
        4,
        "header and three rows:\n{narrow}"
    );

    // Filters go to every agent.
    let only = closes(
        &[a.clone(), b.clone()],
        "reason=client_reset&confidence=low",
    )
    .await
    .expect("closes");
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].agent, b.to_string());

    // Errors name the agent and the cause.
    let err = closes(std::slice::from_ref(&a), "port=http")
        .await
        .expect_err("400");
    assert!(
        err.to_string().contains("answered 400") && err.to_string().contains("bad port"),
        "{err}"
    );
    let gone = Agent::Unix(dir.join("nobody.sock"));
    let err = closes(&[gone], "").await.expect_err("no agent");
    assert!(
        err.to_string().contains("is `whoclosed agent` running"),
        "{err}"
    );
    ta.abort();
    tb.abort();
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[tokio::test]
async fn tcp_agent_with_token() {
    let state = Arc::new(ApiState::new(
        History::new(Limits::default()),
        Arc::new(Metrics::new()),
    ));
    let (client_end, _) = both_ends();
    state.record(&client_end).expect("record");
    let app = api::require_bearer(api::router(state), "tok").expect("token");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let agent: Agent = addr.parse().expect("agent");
    let err = closes(std::slice::from_ref(&agent), "")
        .await
        .expect_err("no token");
    assert!(err.to_string().contains("answered 401"), "{err}");
    let agent = agent.with_token(Some("tok".into()));
    let records = closes(&[agent], "").await.expect("closes");
    assert_eq!(records.len(), 1);
    task.abort();
}

#[test]
fn ambiguous_ends_are_not_joined() {
    let (client_end, server_end) = both_ends();
    let rec = |agent: &str, line: &str| Record {
        agent: agent.into(),
        value: serde_json::from_str(line).expect("json"),
    };
    // Same agent: not a cross-agent join (the agent joins its own ends as `peer`).
    assert!(join_ends(&[rec("a", &client_end), rec("a", &server_end)]).is_empty());
    // Two candidates for one end (address reuse, NAT): nothing is joined.
    assert!(
        join_ends(&[
            rec("a", &client_end),
            rec("b", &server_end),
            rec("c", &server_end)
        ])
        .is_empty()
    );
    assert_eq!(
        join_ends(&[rec("a", &client_end), rec("b", &server_end)]),
        [(0, 1)]
    );
}

async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
        .await
        .expect("a line within 5 s")
        .expect("stream open")
}

#[tokio::test]
async fn follow_streams_kept_then_new_matching_verdicts() {
    let dir = std::env::temp_dir().join(format!("whoclosed-follow-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let state = Arc::new(ApiState::new(
        History::new(Limits::default()),
        Arc::new(Metrics::new()),
    ));
    let (client_end, server_end) = both_ends();
    state.record(&client_end).expect("record");
    let sock = dir.join("f.sock");
    let listener = api::bind_unix(&sock).expect("bind");
    let server = tokio::spawn({
        let state = state.clone();
        async move {
            let _ = api::serve_unix(listener, api::router(state)).await;
        }
    });
    let agent = Agent::Unix(sock);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let follower = tokio::spawn(async move {
        follow(&[agent], "closed_by=middlebox,client", move |r| {
            let _ = tx.send(s(&r.value, "/conn/id").to_string());
        })
        .await
    });
    assert_eq!(
        next(&mut rx).await,
        "3a48113ddbc90c95",
        "the kept verdict first"
    );
    // A new verdict that does not match, then one that does.
    let golden: Value = serde_json::from_str(include_str!(
        "../export/golden/grpc_idle_timeout_client.json"
    ))
    .expect("golden");
    state.record(&golden.to_string()).expect("record");
    state.record(&server_end).expect("record");
    assert_eq!(
        next(&mut rx).await,
        "5e5e5e5e5e5e5e5e",
        "only the matching new one"
    );
    server.abort();
    let _ = server.await;
    follower.abort();
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn explain_reads_as_a_timeline_with_the_hint() {
    let v: Value = serde_json::from_str(include_str!(
        "../export/golden/grpc_idle_timeout_client.json"
    ))
    .expect("golden");
    let text = explain(&v);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].contains("client 10.241.1.2:40000 -> 10.241.2.2:8080 (python3(77))"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("closed by server (server_idle_timeout, medium confidence)"),
        "{text}"
    );
    let goaway = lines
        .iter()
        .position(|l| {
            l.contains("goaway_received INTERNAL_ERROR last_stream_id=1 debug=\"connection idle\"")
        })
        .expect("the GOAWAY fact");
    let fin = lines
        .iter()
        .position(|l| l.contains("fin_sent"))
        .expect("the FIN fact");
    assert!(goaway < fin, "oldest first:\n{text}");
    assert!(lines.iter().any(|l| l.contains("2004.000")), "{text}");
    assert!(text.trim_end().ends_with(s(&v, "/verdict/hint")), "{text}");
}

#[test]
fn stats_tables_sort_by_count() {
    let summary = json!({"records": 5, "evicted": 2,
        "by_closed_by": {"client": 1, "server": 4}, "by_reason": {"server_close": 4, "client_close": 1},
        "by_confidence": {"high": 5},
        "top_remotes": [{"key": "10.0.0.2", "count": 4}], "top_pods": []});
    let text = stats_table(&summary);
    assert!(text.starts_with("5 verdicts kept (2 evicted"), "{text}");
    let server = text.find("server ").expect("server row");
    let client = text.find("client ").expect("client row");
    assert!(server < client, "most first:\n{text}");
    assert!(
        text.contains("REMOTE") && text.contains("10.0.0.2"),
        "{text}"
    );
    assert!(!text.contains("POD"), "empty lists are left out:\n{text}");
}
