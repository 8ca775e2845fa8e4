//! The CLI's side of the query API: talk to one or more agents ([`Agent`]), merge their
//! verdicts, join the two ends of a connection seen by different agents, and render a table.
//!
//! HTTP through hyper's client (no hand-written HTTP), over the agent's unix socket or an
//! opt-in TCP listener with a bearer token.

use std::{collections::HashMap, path::PathBuf, str::FromStr};

use comfy_table::{Table, presets::NOTHING};
use http_body_util::{BodyExt as _, Empty};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The default unix socket of `whoclosed agent`.
pub const DEFAULT_SOCKET: &str = "/run/whoclosed/whoclosed.sock";

/// Where an agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Agent {
    Unix(PathBuf),
    Tcp {
        /// `host:port`
        addr: String,
        token: Option<String>,
    },
}

impl std::fmt::Display for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Agent::Unix(p) => write!(f, "unix:{}", p.display()),
            Agent::Tcp { addr, .. } => write!(f, "http://{addr}"),
        }
    }
}

impl FromStr for Agent {
    type Err = String;

    /// `unix:/path`, `/path` (a unix socket), or `http://host:port` / `host:port` (TCP; the
    /// token is set separately).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Agent::Unix(PathBuf::from(p)));
        }
        if s.starts_with('/') {
            return Ok(Agent::Unix(PathBuf::from(s)));
        }
        let addr = s.strip_prefix("http://").unwrap_or(s).trim_end_matches('/');
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Agent::Tcp {
                    addr: addr.to_string(),
                    token: None,
                })
            }
            _ => Err(format!(
                "agent {s:?}: expected unix:/path/to.sock, /path/to.sock or host:port"
            )),
        }
    }
}

impl Agent {
    /// The same agent with a bearer token (TCP only; a unix socket is guarded by its mode).
    pub fn with_token(self, token: Option<String>) -> Self {
        match self {
            Agent::Tcp { addr, .. } => Agent::Tcp { addr, token },
            unix => unix,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to the agent at {agent}: {source} (is `whoclosed agent` running there?)"
    )]
    Connect {
        agent: String,
        source: std::io::Error,
    },
    #[error("talking to the agent at {agent}: {source}")]
    Http { agent: String, source: hyper::Error },
    #[error("the agent at {agent} answered {status}: {body}")]
    Status {
        agent: String,
        status: u16,
        body: String,
    },
    #[error("the agent at {agent} sent a line that is not JSON: {source}")]
    Json {
        agent: String,
        source: serde_json::Error,
    },
    #[error("bad request: {0}")]
    Request(String),
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// Sends `GET path_and_query` to `agent`; the answer's head, with its body still to read,
/// and the task driving the connection (abort it when done).
async fn request(
    agent: &Agent,
    path_and_query: &str,
) -> Result<
    (
        hyper::Response<hyper::body::Incoming>,
        tokio::task::JoinHandle<()>,
    ),
    ClientError,
> {
    let name = agent.to_string();
    let connect_err = |source| ClientError::Connect {
        agent: name.clone(),
        source,
    };
    let (io, host): (Box<dyn Stream>, &str) = match agent {
        Agent::Unix(p) => (
            Box::new(
                tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(connect_err)?,
            ),
            "whoclosed",
        ),
        Agent::Tcp { addr, .. } => (
            Box::new(
                tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map_err(connect_err)?,
            ),
            addr.as_str(),
        ),
    };
    let http_err = |source| ClientError::Http {
        agent: name.clone(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(http_err)?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::get(path_and_query).header(hyper::header::HOST, host);
    if let Agent::Tcp {
        token: Some(token), ..
    } = agent
    {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| ClientError::Request(e.to_string()))?;
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            driver.abort();
            return Err(http_err(e));
        }
    };
    if !resp.status().is_success() {
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
            .unwrap_or_default();
        driver.abort();
        return Err(ClientError::Status {
            agent: name,
            status,
            body,
        });
    }
    Ok((resp, driver))
}

/// `GET path_and_query` from `agent`; the body of a 200 answer.
pub async fn get(agent: &Agent, path_and_query: &str) -> Result<String, ClientError> {
    let (resp, driver) = request(agent, path_and_query).await?;
    let body = resp.into_body().collect().await;
    driver.abort();
    let body = body
        .map_err(|source| ClientError::Http {
            agent: agent.to_string(),
            source,
        })?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Streams `/v1/closes?follow=true&<query>` from every agent: the kept matching verdicts,
/// then new ones as they come, each passed to `on_record` as it arrives. Returns when every
/// agent has ended its stream, or with the first error.
pub async fn follow(
    agents: &[Agent],
    query: &str,
    mut on_record: impl FnMut(Record),
) -> Result<(), ClientError> {
    let path = if query.is_empty() {
        "/v1/closes?follow=true".to_string()
    } else {
        format!("/v1/closes?follow=true&{query}")
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Record, ClientError>>(256);
    for agent in agents {
        let (agent, path, tx) = (agent.clone(), path.clone(), tx.clone());
        tokio::spawn(async move {
            if let Err(e) = follow_one(&agent, &path, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
    }
    drop(tx);
    while let Some(item) = rx.recv().await {
        on_record(item?);
    }
    Ok(())
}

async fn follow_one(
    agent: &Agent,
    path: &str,
    tx: &tokio::sync::mpsc::Sender<Result<Record, ClientError>>,
) -> Result<(), ClientError> {
    let name = agent.to_string();
    let (resp, driver) = request(agent, path).await?;
    let mut body = resp.into_body();
    let mut pending: Vec<u8> = Vec::new();
    let result = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|source| ClientError::Http {
                agent: name.clone(),
                source,
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&line);
                if line.trim().is_empty() {
                    continue;
                }
                let value = serde_json::from_str(&line).map_err(|source| ClientError::Json {
                    agent: name.clone(),
                    source,
                })?;
                let record = Record {
                    agent: name.clone(),
                    value,
                };
                if tx.send(Ok(record)).await.is_err() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
    .await;
    driver.abort();
    result
}

/// One verdict and the agent it came from.
#[derive(Debug, Clone)]
pub struct Record {
    pub agent: String,
    pub value: Value,
}

/// `/v1/closes?<query>` from every agent, merged oldest first (by `ts`).
pub async fn closes(agents: &[Agent], query: &str) -> Result<Vec<Record>, ClientError> {
    let path = if query.is_empty() {
        "/v1/closes".to_string()
    } else {
        format!("/v1/closes?{query}")
    };
    let mut out = Vec::new();
    for agent in agents {
        let body = get(agent, &path).await?;
        for line in body.lines().filter(|l| !l.trim().is_empty()) {
            let value = serde_json::from_str(line).map_err(|source| ClientError::Json {
                agent: agent.to_string(),
                source,
            })?;
            out.push(Record {
                agent: agent.to_string(),
                value,
            });
        }
    }
    out.sort_by(|a, b| {
        a.value["ts"]
            .as_str()
            .unwrap_or("")
            .cmp(b.value["ts"].as_str().unwrap_or(""))
    });
    Ok(out)
}

/// Pairs of indices into `records` that are the two ends of one connection seen by
/// different agents: one end's local address is the other's remote and the reverse. Each
/// record is in at most one pair; an ambiguous match (several candidates) pairs nothing,
/// since a wrong join would show one connection's verdict as another's.
pub fn join_ends(records: &[Record]) -> Vec<(usize, usize)> {
    let key = |r: &Record| -> Option<(String, String)> {
        Some((
            r.value.pointer("/conn/local")?.as_str()?.to_string(),
            r.value.pointer("/conn/remote")?.as_str()?.to_string(),
        ))
    };
    let mut by_key: HashMap<(String, String), Vec<usize>> = HashMap::new();
    for (i, r) in records.iter().enumerate() {
        if let Some(k) = key(r) {
            by_key.entry(k).or_default().push(i);
        }
    }
    let mut pairs = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let Some((local, remote)) = key(r) else {
            continue;
        };
        let Some(mine) = by_key.get(&(local.clone(), remote.clone())) else {
            continue;
        };
        let Some(theirs) = by_key.get(&(remote, local)) else {
            continue;
        };
        if mine.len() != 1 || theirs.len() != 1 {
            continue;
        }
        let j = theirs[0];
        if i < j && records[j].agent != r.agent {
            pairs.push((i, j));
        }
    }
    pairs
}

fn s<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or("-")
}

fn process(v: &Value) -> String {
    match (
        v.pointer("/conn/comm").and_then(Value::as_str),
        v.pointer("/conn/pid").and_then(Value::as_u64),
    ) {
        (Some(c), Some(p)) => format!("{c}({p})"),
        (None, Some(p)) => format!("({p})"),
        _ => "-".into(),
    }
}

fn pod(v: &Value) -> String {
    match (
        v.pointer("/conn/k8s/namespace").and_then(Value::as_str),
        v.pointer("/conn/k8s/pod").and_then(Value::as_str),
    ) {
        (Some(ns), Some(p)) => format!("{ns}/{p}"),
        _ => "-".into(),
    }
}

/// `closes -o table` (or `wide`: with pod, agent, hint and the other end's verdict).
pub fn table(records: &[Record], wide: bool) -> String {
    let mut t = Table::new();
    t.load_style(NOTHING);
    let mut header = vec![
        "TIME",
        "ROLE",
        "LOCAL",
        "REMOTE",
        "CLOSED_BY",
        "REASON",
        "MECH",
        "CONF",
        "PROCESS",
    ];
    if wide {
        header.extend(["POD", "AGENT", "OTHER END", "HINT"]);
    }
    t.set_header(header);
    let mut other: HashMap<usize, usize> = HashMap::new();
    if wide {
        for (a, b) in join_ends(records) {
            other.insert(a, b);
            other.insert(b, a);
        }
    }
    for (i, r) in records.iter().enumerate() {
        let v = &r.value;
        let mut row = vec![
            s(v, "/ts").to_string(),
            s(v, "/conn/role").to_string(),
            s(v, "/conn/local").to_string(),
            s(v, "/conn/remote").to_string(),
            s(v, "/verdict/closed_by").to_string(),
            s(v, "/verdict/reason").to_string(),
            s(v, "/verdict/mechanism").to_string(),
            s(v, "/verdict/confidence").to_string(),
            process(v),
        ];
        if wide {
            let o = other.get(&i).map(|&j| {
                let w = &records[j].value;
                format!(
                    "{} {}/{} ({})",
                    records[j].agent,
                    s(w, "/verdict/closed_by"),
                    s(w, "/verdict/reason"),
                    s(w, "/verdict/confidence")
                )
            });
            row.extend([
                pod(v),
                r.agent.clone(),
                o.unwrap_or_else(|| "-".into()),
                s(v, "/verdict/hint").to_string(),
            ]);
        }
        t.add_row(row);
    }
    t.trim_fmt()
}

/// One fact of the evidence as a short phrase.
fn fact_text(f: &Value) -> String {
    let what = s(f, "/what");
    let mut parts = vec![what.to_string()];
    match what {
        "state" => parts = vec![format!("{} -> {}", s(f, "/from"), s(f, "/to"))],
        "goaway_sent" | "goaway_received" => parts.push(format!(
            "{} last_stream_id={} debug={:?}",
            s(f, "/error_code"),
            f.get("last_stream_id").cloned().unwrap_or(Value::Null),
            s(f, "/debug")
        )),
        "socket_error" => parts.push(s(f, "/error").to_string()),
        "retransmit" => parts.push(format!("in {}", s(f, "/state"))),
        "rst_received" => parts.push(format!("origin={}", s(f, "/origin"))),
        _ => {}
    }
    for key in ["ttl", "kernel_reason", "sender_kernel_reason"] {
        if let Some(v) = f.get(key) {
            parts.push(format!(
                "{key}={}",
                v.as_str().map(str::to_string).unwrap_or(v.to_string())
            ));
        }
    }
    if let (Some(comm), Some(pid)) = (f.get("comm").and_then(Value::as_str), f.get("pid")) {
        parts.push(format!("by {comm}({pid})"));
    }
    if f.get("owner_exiting") == Some(&Value::Bool(true)) {
        parts.push("(owner exiting)".into());
    }
    parts.join(" ")
}

/// `whoclosed explain ID`: one connection's verdict, evidence timeline and hint, for people.
pub fn explain(v: &Value) -> String {
    let mut out = format!(
        "{} {} {} -> {} ({}){}\n",
        s(v, "/ts"),
        s(v, "/conn/role"),
        s(v, "/conn/local"),
        s(v, "/conn/remote"),
        process(v),
        match pod(v).as_str() {
            "-" => String::new(),
            p => format!(" pod {p}"),
        }
    );
    out.push_str(&format!(
        "closed by {} ({}, {} confidence); first FIN/RST: {}, via {}\n\n",
        s(v, "/verdict/closed_by"),
        s(v, "/verdict/reason"),
        s(v, "/verdict/confidence"),
        s(v, "/verdict/tcp_initiator"),
        s(v, "/verdict/mechanism"),
    ));
    let mut t = Table::new();
    t.load_style(NOTHING);
    t.set_header(vec!["AT (ms)", "FACT"]);
    for f in v["evidence"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let at = f["at_ms"]
            .as_f64()
            .map(|x| format!("{x:.3}"))
            .unwrap_or("-".into());
        t.add_row(vec![at, fact_text(f)]);
    }
    out.push_str(&t.trim_fmt());
    out.push_str(&format!("\n\nhint: {}\n", s(v, "/verdict/hint")));
    out
}

/// `whoclosed stats`: the `/v1/stats` summary of one agent as tables.
pub fn stats_table(summary: &Value) -> String {
    let mut out = format!(
        "{} verdicts kept ({} evicted by the history limits)\n",
        summary["records"], summary["evicted"]
    );
    for (title, key) in [
        ("CLOSED_BY", "by_closed_by"),
        ("REASON", "by_reason"),
        ("CONFIDENCE", "by_confidence"),
    ] {
        let mut rows: Vec<(String, u64)> = summary[key]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out.push_str(&counts_table(title, rows));
    }
    for (title, key) in [("REMOTE", "top_remotes"), ("POD", "top_pods")] {
        let rows = summary[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| (s(c, "/key").to_string(), c["count"].as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        out.push_str(&counts_table(title, rows));
    }
    out
}

fn counts_table(title: &str, rows: Vec<(String, u64)>) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut t = Table::new();
    t.load_style(NOTHING);
    t.set_header(vec![title, "COUNT"]);
    for (k, n) in rows {
        t.add_row(vec![k, n.to_string()]);
    }
    format!("\n{}\n", t.trim_fmt())
}

#[cfg(test)]
mod tests;
