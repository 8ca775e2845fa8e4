//! The agent's HTTP API (axum): health, readiness, metrics and recent verdicts.
//!
//! | route | answer |
//! |---|---|
//! | `GET /healthz` | 200 while the process serves requests |
//! | `GET /readyz` | 200 once the probes are attached ([`ApiState::set_ready`]), else 503 |
//! | `GET /metrics` | OpenMetrics text ([`crate::metrics`]) |
//! | `GET /v1/closes` | matching `close` records as NDJSON, oldest first; query parameters below |
//! | `GET /v1/closes/{id}` | one socket's `close` record (`conn.id`), 404 when not kept |
//! | `GET /v1/conns` | the live connection table as NDJSON `conn` lines (agent only, else 503) |
//! | `GET /v1/stats` | counts by `closed_by`, `reason`, `confidence`, top remotes and pods (JSON); same filters |
//!
//! `/v1/closes` parameters (lists are comma-separated): `closed_by`, `reason`, `confidence`,
//! `since` (a duration: `90s`, `5m`), `port`, `addr`, `pid`, `comm`, `namespace`, `pod`,
//! `limit`; `follow=true` keeps the answer open and streams new matching lines. A bad value
//! is a 400 naming the parameter.
//!
//! By default the API listens on a unix socket only ([`serve_unix`], mode 0600: root's
//! `whoclosed` CLI on the node). A TCP listener is opt-in and must be wrapped in
//! [`require_bearer`].

use std::{
    collections::HashMap,
    io,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use axum::{
    Router,
    extract::{Path as UrlPath, Query, Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};

use crate::{
    history::{self, History},
    metrics::Metrics,
};

/// `Content-Type` of NDJSON answers.
pub const NDJSON: &str = "application/x-ndjson";

/// New lines buffered per follower before it is cut off as too slow.
const FOLLOW_BUFFER: usize = 1024;

/// What the API serves, shared with the pipeline.
pub struct ApiState {
    history: Mutex<History>,
    ready: AtomicBool,
    metrics: Arc<Metrics>,
    /// New `close` lines for `--follow` clients.
    /// `None` once [`ApiState::close_followers`] ended their streams (shutdown).
    new_lines: Mutex<Option<tokio::sync::broadcast::Sender<Arc<str>>>>,
    /// Asks the pipeline for a snapshot of its connection table (`/v1/conns`).
    conns: Option<tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<String>>>,
}

impl ApiState {
    pub fn new(history: History, metrics: Arc<Metrics>) -> Self {
        Self {
            history: Mutex::new(history),
            ready: AtomicBool::new(false),
            metrics,
            new_lines: Mutex::new(Some(tokio::sync::broadcast::channel(FOLLOW_BUFFER).0)),
            conns: None,
        }
    }

    /// Serves `/v1/conns` by asking the pipeline through `tx`.
    pub fn with_conns(
        mut self,
        tx: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<String>>,
    ) -> Self {
        self.conns = Some(tx);
        self
    }

    /// Marks the agent ready (probes attached) or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Keeps one `close` line for queries and sends it to followers.
    pub fn record(&self, line: &str) -> Result<(), history::PushError> {
        self.history().push(line, Instant::now())?;
        // No follower is not an error.
        if let Some(tx) = self.followers().as_ref() {
            let _ = tx.send(Arc::from(line.trim_end()));
        }
        Ok(())
    }

    fn followers(&self) -> MutexGuard<'_, Option<tokio::sync::broadcast::Sender<Arc<str>>>> {
        match self.new_lines.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Ends every `follow=true` stream (their answers complete normally), so that a
    /// graceful shutdown does not wait for them; later follows get the kept lines only.
    pub fn close_followers(&self) {
        self.followers().take();
    }

    /// The history, even if a panic poisoned the lock (its state is always consistent
    /// between method calls).
    pub fn history(&self) -> MutexGuard<'_, History> {
        match self.history.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// All routes.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/closes", get(closes))
        .route("/v1/closes/{id}", get(close_by_id))
        .route("/v1/stats", get(stats))
        .route("/v1/conns", get(conns))
        .with_state(state.clone())
        .merge(crate::metrics::router(state.metrics.clone()))
}

/// `/healthz`, `/readyz` and `/metrics` only: what `--metrics-addr` serves without a token
/// (no verdicts, addresses or pods).
pub fn probe_router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state.clone())
        .merge(crate::metrics::router(state.metrics.clone()))
}

/// How long `/v1/conns` waits for the pipeline (busy draining a burst) to answer.
const CONNS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

async fn conns(State(s): State<Arc<ApiState>>) -> Response {
    let unavailable =
        |why: &str| (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response();
    let Some(tx) = &s.conns else {
        return unavailable("no connection table here");
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    if tx.send(reply).await.is_err() {
        return unavailable("the agent is stopping");
    }
    match tokio::time::timeout(CONNS_TIMEOUT, answer).await {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, NDJSON)], body).into_response(),
        Ok(Err(_)) => unavailable("the agent is stopping or not tracing yet"),
        Err(_) => unavailable("the pipeline did not answer within 5 s"),
    }
}

async fn readyz(State(s): State<Arc<ApiState>>) -> Response {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the probes are not attached yet\n",
        )
            .into_response()
    }
}

/// A query parameter that cannot be used; answered with 400 and this message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadParam(pub String);

impl IntoResponse for BadParam {
    fn into_response(self) -> Response {
        (StatusCode::BAD_REQUEST, format!("{}\n", self.0)).into_response()
    }
}

fn bad(param: &str, value: &str, why: impl std::fmt::Display) -> BadParam {
    BadParam(format!("bad {param}={value:?}: {why}"))
}

fn list(params: &HashMap<String, String>, key: &str) -> Vec<String> {
    params
        .get(key)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn parse_list<T: std::str::FromStr>(
    params: &HashMap<String, String>,
    key: &str,
) -> Result<Vec<T>, BadParam>
where
    T::Err: std::fmt::Display,
{
    list(params, key)
        .iter()
        .map(|v| v.parse().map_err(|e| bad(key, v, e)))
        .collect()
}

fn parse_one<T: std::str::FromStr>(
    params: &HashMap<String, String>,
    key: &str,
) -> Result<Option<T>, BadParam>
where
    T::Err: std::fmt::Display,
{
    params
        .get(key)
        .map(|v| v.parse().map_err(|e| bad(key, v, e)))
        .transpose()
}

/// The `/v1/closes` query parameters as a [`history::Query`].
pub fn parse_query(params: &HashMap<String, String>) -> Result<history::Query, BadParam> {
    const KNOWN: &[&str] = &[
        "follow",
        "closed_by",
        "reason",
        "confidence",
        "since",
        "port",
        "addr",
        "pid",
        "comm",
        "namespace",
        "pod",
        "limit",
    ];
    if let Some(unknown) = params.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(bad(
            unknown,
            &params[unknown],
            format!("unknown parameter (known: {})", KNOWN.join(", ")),
        ));
    }
    let since = params
        .get("since")
        .map(|v| humantime::parse_duration(v).map_err(|e| bad("since", v, e)))
        .transpose()?;
    Ok(history::Query {
        closed_by: list(params, "closed_by"),
        reason: list(params, "reason"),
        confidence: list(params, "confidence"),
        since,
        ports: parse_list(params, "port")?,
        addrs: parse_list(params, "addr")?,
        pid: parse_one(params, "pid")?,
        comm: params.get("comm").cloned(),
        namespace: params.get("namespace").cloned(),
        pod: params.get("pod").cloned(),
        limit: parse_one(params, "limit")?,
    })
}

fn ndjson(lines: &[Arc<str>]) -> Response {
    let mut body = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for l in lines {
        body.push_str(l);
        body.push('\n');
    }
    ([(header::CONTENT_TYPE, NDJSON)], body).into_response()
}

async fn closes(
    State(s): State<Arc<ApiState>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let q = match parse_query(&params) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let follow = match params.get("follow").map(String::as_str) {
        None | Some("false" | "0") => false,
        Some("true" | "1" | "") => true,
        Some(v) => return bad("follow", v, "expected true or false").into_response(),
    };
    if !follow {
        let lines = s.history().query(&q, Instant::now());
        return ndjson(&lines);
    }
    // Subscribe before reading the history, so nothing falls between the two.
    let Some(rx) = s.followers().as_ref().map(|tx| tx.subscribe()) else {
        let lines = s.history().query(&q, Instant::now());
        return ndjson(&lines);
    };
    let kept = s.history().query(&q, Instant::now());
    let first = futures_util::stream::iter(
        kept.into_iter()
            .map(|l| Ok::<String, std::convert::Infallible>(format!("{l}\n"))),
    );
    let new = futures_util::stream::unfold((rx, q), |(mut rx, q)| async move {
        loop {
            match rx.recv().await {
                Ok(line) if q.matches_new(&line) => {
                    return Some((Ok(format!("{line}\n")), (rx, q)));
                }
                Ok(_) => {}
                // A follower too slow for FOLLOW_BUFFER lines, or the agent stopping: end
                // the stream; the client says so and can reconnect.
                Err(_) => return None,
            }
        }
    });
    (
        [(header::CONTENT_TYPE, NDJSON)],
        axum::body::Body::from_stream(futures_util::StreamExt::chain(first, new)),
    )
        .into_response()
}

/// Number of entries in the top lists of `/v1/stats`.
const TOP: usize = 10;

async fn stats(
    State(s): State<Arc<ApiState>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let q = match parse_query(&params) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let summary = s.history().summary(&q, Instant::now(), TOP);
    let mut value = match serde_json::to_value(&summary) {
        Ok(v) => v,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding the summary: {e}\n"),
            )
                .into_response();
        }
    };
    value["agent"] = s.metrics.agent_summary();
    match serde_json::to_string(&value) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the summary: {e}\n"),
        )
            .into_response(),
    }
}

async fn close_by_id(State(s): State<Arc<ApiState>>, UrlPath(id): UrlPath<String>) -> Response {
    match s.history().get(&id) {
        Some(line) => ndjson(&[line]),
        None => (
            StatusCode::NOT_FOUND,
            format!("no close record with conn.id {id:?} is kept\n"),
        )
            .into_response(),
    }
}

/// Wraps `router` so that every request needs `Authorization: Bearer <token>` (for the
/// opt-in TCP listener). An empty token is refused: it would let anyone in.
pub fn require_bearer(router: Router, token: &str) -> io::Result<Router> {
    if token.trim().is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the TCP API needs a non-empty bearer token",
        ));
    }
    let expected: Arc<str> = Arc::from(format!("Bearer {}", token.trim()));
    Ok(
        router.layer(middleware::from_fn(move |req: Request, next: Next| {
            let expected = expected.clone();
            async move {
                let given = req
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
                    next.run(req).await
                } else {
                    (
                        StatusCode::UNAUTHORIZED,
                        [(header::WWW_AUTHENTICATE, "Bearer")],
                        "a valid bearer token is required\n",
                    )
                        .into_response()
                }
            }
        })),
    )
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Binds the API's unix socket at `path`: creates the directory (0700 when new), replaces a
/// stale socket file (never any other kind of file), and makes the socket 0600.
pub fn bind_unix(path: &Path) -> io::Result<tokio::net::UnixListener> {
    let err = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|e| err("creating the directory of", e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| err("restricting the directory of", e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path).map_err(|e| err("removing the stale socket", e))?
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("checking", e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| err("binding", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err("restricting", e))?;
    Ok(listener)
}

/// Serves `router` on a unix socket from [`bind_unix`] until the future is dropped.
pub async fn serve_unix(listener: tokio::net::UnixListener, router: Router) -> io::Result<()> {
    axum::serve(listener, router).await
}

#[cfg(test)]
mod tests;
