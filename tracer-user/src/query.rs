//! The CLI verbs that query agents: `closes`, `conns`, `explain`, `stats`.
//!
//! Exit codes (a script can rely on them):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | answered, with at least one record (`--follow`: the streams ended) |
//! | 1 | answered, but nothing matched (`explain`: no agent keeps that ID) |
//! | 2 | usage error: a bad flag or value (clap) |
//! | 3 | an agent could not be reached, or refused or failed the request |

use std::{collections::BTreeMap, io::Write, net::IpAddr, process::ExitCode, time::Duration};

use comfy_table::{Table, presets::NOTHING};
use serde_json::Value;

use crate::client::{self, Agent, ClientError, Record};

pub const EXIT_OK: u8 = 0;
pub const EXIT_NO_MATCH: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_AGENT: u8 = 3;

/// Which agents to ask.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentsArg {
    /// An agent: a unix socket path (unix:/path or /path) or http://HOST:PORT. Repeat to
    /// query several agents and merge their answers. Default: the local agent's socket.
    #[arg(long = "agent", env = "WHOCLOSED_AGENT", value_delimiter = ',')]
    pub agents: Vec<Agent>,
    /// Bearer token for agents reached over TCP.
    #[arg(long, env = "WHOCLOSED_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl AgentsArg {
    pub fn resolve(&self) -> Vec<Agent> {
        let agents = if self.agents.is_empty() {
            vec![Agent::Unix(client::DEFAULT_SOCKET.into())]
        } else {
            self.agents.clone()
        };
        agents
            .into_iter()
            .map(|a| a.with_token(self.token.clone()))
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClosedByArg {
    Client,
    Server,
    Middlebox,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConfidenceArg {
    High,
    Medium,
    Low,
}

fn parse_reason(s: &str) -> Result<String, String> {
    if crate::metrics::known_reason(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a reason whoclosed gives (see docs/events.md: e.g. server_close, \
             client_abort, middlebox_reset, server_idle_timeout)"
        ))
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 90s, 10m, 1h)"))
}

fn parse_id(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!(
            "{s:?} is not a connection id (conn.id: hexadecimal, as shown by `whoclosed closes -o wide`/`-o json`)"
        ))
    }
}

/// Filters sent to the agents as `/v1/closes` and `/v1/stats` query parameters.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Filters {
    /// Only verdicts with this closed_by (repeatable or comma-separated).
    #[arg(long = "closed-by", value_enum, value_delimiter = ',')]
    pub closed_by: Vec<ClosedByArg>,
    /// Only these reasons (repeatable or comma-separated; see docs/events.md).
    #[arg(long, value_delimiter = ',', value_parser = parse_reason)]
    pub reason: Vec<String>,
    /// Only these confidences.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub confidence: Vec<ConfidenceArg>,
    /// Only verdicts from the last DURATION (90s, 10m, 1h).
    #[arg(long, value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// Local or remote port (repeatable).
    #[arg(long = "port")]
    pub ports: Vec<u16>,
    /// Local or remote address (repeatable).
    #[arg(long = "addr")]
    pub addrs: Vec<IpAddr>,
    /// Owner's process id.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Owner's command name.
    #[arg(long)]
    pub comm: Option<String>,
    /// Kubernetes namespace of the owner's pod.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Name of the owner's pod.
    #[arg(long)]
    pub pod: Option<String>,
}

fn enum_name(v: &impl clap::ValueEnum) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

fn join<T: ToString>(v: &[T]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

impl Filters {
    /// The URL query string (without `?`).
    pub fn query(&self, limit: Option<usize>) -> String {
        let mut p: Vec<(&str, String)> = Vec::new();
        if !self.closed_by.is_empty() {
            let v: Vec<String> = self.closed_by.iter().map(enum_name).collect();
            p.push(("closed_by", v.join(",")));
        }
        if !self.reason.is_empty() {
            p.push(("reason", self.reason.join(",")));
        }
        if !self.confidence.is_empty() {
            let v: Vec<String> = self.confidence.iter().map(enum_name).collect();
            p.push(("confidence", v.join(",")));
        }
        if let Some(d) = self.since {
            p.push(("since", format!("{}ms", d.as_millis())));
        }
        if !self.ports.is_empty() {
            p.push(("port", join(&self.ports)));
        }
        if !self.addrs.is_empty() {
            p.push(("addr", join(&self.addrs)));
        }
        if let Some(pid) = self.pid {
            p.push(("pid", pid.to_string()));
        }
        for (k, v) in [
            ("comm", &self.comm),
            ("namespace", &self.namespace),
            ("pod", &self.pod),
        ] {
            if let Some(v) = v {
                p.push((k, v.clone()));
            }
        }
        if let Some(n) = limit {
            p.push(("limit", n.to_string()));
        }
        serde_urlencoded::to_string(&p).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClosesFormat {
    Table,
    Wide,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ViewFormat {
    Table,
    Json,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  whoclosed closes                                  # the local agent's recent verdicts
  whoclosed closes --closed-by middlebox --since 10m -o wide
  whoclosed closes --reason server_idle_timeout,server_max_age --namespace shop -o json
  whoclosed closes --follow --port 443
  whoclosed closes --agent /run/a.sock --agent http://10.0.0.2:9091 --token $T -o wide")]
pub struct ClosesArgs {
    #[command(flatten)]
    pub agents: AgentsArg,
    #[command(flatten)]
    pub filters: Filters,
    /// At most this many, the newest (per agent).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Output: a table, a wide table (pod, agent, the other end's verdict, hint), or NDJSON.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: ClosesFormat,
    /// Keep streaming new matching verdicts until interrupted.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  whoclosed conns
  whoclosed conns --port 5432 -o json")]
pub struct ConnsArgs {
    #[command(flatten)]
    pub agents: AgentsArg,
    /// Local or remote port (repeatable).
    #[arg(long = "port")]
    pub ports: Vec<u16>,
    /// Owner's command name.
    #[arg(long)]
    pub comm: Option<String>,
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: ViewFormat,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  whoclosed explain 3f2a9c0d1e4b5a67
  whoclosed explain 3f2a9c0d1e4b5a67 -o json")]
pub struct ExplainArgs {
    #[command(flatten)]
    pub agents: AgentsArg,
    /// The connection's id (`conn.id`).
    #[arg(value_parser = parse_id)]
    pub id: String,
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: ViewFormat,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  whoclosed stats
  whoclosed stats --since 1h --namespace shop -o json")]
pub struct StatsArgs {
    #[command(flatten)]
    pub agents: AgentsArg,
    #[command(flatten)]
    pub filters: Filters,
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub output: ViewFormat,
}

fn agent_error(e: &ClientError) -> ExitCode {
    eprintln!("whoclosed: {e}");
    ExitCode::from(EXIT_AGENT)
}

fn print(text: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error of ours.
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
    ExitCode::from(EXIT_OK)
}

fn json_lines(records: &[Record]) -> String {
    let mut s = String::new();
    for r in records {
        s.push_str(&r.value.to_string());
        s.push('\n');
    }
    s
}

pub async fn closes(args: ClosesArgs) -> ExitCode {
    let agents = args.agents.resolve();
    let query = args.filters.query(args.limit);
    if args.follow {
        let wide = args.output == ClosesFormat::Wide;
        let mut header_done = false;
        let result = client::follow(&agents, &query, |r| {
            let text = match args.output {
                ClosesFormat::Json => format!("{}\n", r.value),
                _ => {
                    let t = client::table(std::slice::from_ref(&r), wide);
                    let mut lines = t.lines();
                    let header = lines.next().unwrap_or_default();
                    let mut s = String::new();
                    if !header_done {
                        s.push_str(header);
                        s.push('\n');
                        header_done = true;
                    }
                    for l in lines {
                        s.push_str(l);
                        s.push('\n');
                    }
                    s
                }
            };
            print(&text);
        })
        .await;
        return match result {
            Ok(()) => ExitCode::from(EXIT_OK),
            Err(e) => agent_error(&e),
        };
    }
    let records = match client::closes(&agents, &query).await {
        Ok(r) => r,
        Err(e) => return agent_error(&e),
    };
    if records.is_empty() {
        if args.output != ClosesFormat::Json {
            eprintln!("no verdict matched");
        }
        return ExitCode::from(EXIT_NO_MATCH);
    }
    match args.output {
        ClosesFormat::Json => print(&json_lines(&records)),
        f => print(&format!(
            "{}\n",
            client::table(&records, f == ClosesFormat::Wide)
        )),
    };
    ExitCode::from(EXIT_OK)
}

fn ms_text(v: &Value) -> String {
    match v.as_f64() {
        Some(ms) if ms >= 60_000.0 => format!("{:.1}m", ms / 60_000.0),
        Some(ms) if ms >= 1_000.0 => format!("{:.1}s", ms / 1_000.0),
        Some(ms) => format!("{ms:.0}ms"),
        None => "-".into(),
    }
}

fn str_or_dash(v: &Value, p: &str) -> String {
    match v.pointer(p) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(x) => x.to_string(),
    }
}

/// `conns -o table`.
pub fn conns_table(records: &[Record], multi: bool) -> String {
    let mut t = Table::new();
    t.load_style(NOTHING);
    let mut header = vec![
        "ID", "STATE", "ROLE", "LOCAL", "REMOTE", "PROCESS", "AGE", "IDLE", "FACTS", "RETRANS",
        "H2", "POD",
    ];
    if multi {
        header.push("AGENT");
    }
    t.set_header(header);
    for r in records {
        let v = &r.value;
        let process = match (v["comm"].as_str(), v["pid"].as_u64()) {
            (Some(c), Some(p)) => format!("{c}({p})"),
            _ => "-".into(),
        };
        let pod = match (
            v.pointer("/k8s/namespace").and_then(Value::as_str),
            v.pointer("/k8s/pod").and_then(Value::as_str),
        ) {
            (Some(ns), Some(p)) => format!("{ns}/{p}"),
            _ => "-".into(),
        };
        // Open before the agent: the age counts from when it was first seen, a lower bound.
        let mut age = ms_text(&v["age_ms"]);
        if v["preexisting"] == Value::Bool(true) && age != "-" {
            age.insert(0, '>');
        }
        let mut state = str_or_dash(v, "/state");
        if v["closing"] == Value::Bool(true) {
            state.push_str(" (closing)");
        }
        if v["events_lost"] == Value::Bool(true) {
            state.push_str(" (events lost)");
        }
        let mut row = vec![
            str_or_dash(v, "/id"),
            state,
            str_or_dash(v, "/role"),
            str_or_dash(v, "/local"),
            str_or_dash(v, "/remote"),
            process,
            age,
            ms_text(&v["idle_ms"]),
            str_or_dash(v, "/facts"),
            str_or_dash(v, "/retransmits"),
            str_or_dash(v, "/h2_frames"),
            pod,
        ];
        if multi {
            row.push(r.agent.clone());
        }
        t.add_row(row);
    }
    t.trim_fmt()
}

pub async fn conns(args: ConnsArgs) -> ExitCode {
    let agents = args.agents.resolve();
    let mut records = Vec::new();
    for agent in &agents {
        let body = match client::get(agent, "/v1/conns").await {
            Ok(b) => b,
            Err(e) => return agent_error(&e),
        };
        for line in body.lines().filter(|l| !l.trim().is_empty()) {
            let value: Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(source) => {
                    return agent_error(&ClientError::Json {
                        agent: agent.to_string(),
                        source,
                    });
                }
            };
            let port_ok = args.ports.is_empty()
                || ["/local", "/remote"].iter().any(|p| {
                    value
                        .pointer(p)
                        .and_then(Value::as_str)
                        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                        .is_some_and(|a| args.ports.contains(&a.port()))
                });
            let comm_ok = args
                .comm
                .as_ref()
                .is_none_or(|c| value["comm"].as_str() == Some(c.as_str()));
            if port_ok && comm_ok {
                records.push(Record {
                    agent: agent.to_string(),
                    value,
                });
            }
        }
    }
    if records.is_empty() {
        if args.output == ViewFormat::Table {
            eprintln!("no live connection matched");
        }
        return ExitCode::from(EXIT_NO_MATCH);
    }
    match args.output {
        ViewFormat::Json => print(&json_lines(&records)),
        ViewFormat::Table => print(&format!("{}\n", conns_table(&records, agents.len() > 1))),
    }
}

pub async fn explain(args: ExplainArgs) -> ExitCode {
    let agents = args.agents.resolve();
    let path = format!("/v1/closes/{}", args.id);
    for agent in &agents {
        match client::get(agent, &path).await {
            Ok(body) => {
                let Some(line) = body.lines().find(|l| !l.trim().is_empty()) else {
                    continue;
                };
                let value: Value = match serde_json::from_str(line) {
                    Ok(v) => v,
                    Err(source) => {
                        return agent_error(&ClientError::Json {
                            agent: agent.to_string(),
                            source,
                        });
                    }
                };
                return match args.output {
                    ViewFormat::Json => print(&format!("{value}\n")),
                    ViewFormat::Table => print(&client::explain(&value)),
                };
            }
            Err(ClientError::Status { status: 404, .. }) => continue,
            Err(e) => return agent_error(&e),
        }
    }
    eprintln!(
        "no verdict with conn.id {} is kept by {}",
        args.id,
        agents
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    ExitCode::from(EXIT_NO_MATCH)
}

/// Sums the `/v1/stats` answers of several agents (top lists re-ranked over the sum).
pub fn merge_stats(answers: &[(String, Value)]) -> Value {
    let mut records = 0u64;
    let mut evicted = 0u64;
    let mut maps: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
    let mut tops: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
    let mut agents = serde_json::Map::new();
    for (name, a) in answers {
        records += a["records"].as_u64().unwrap_or(0);
        evicted += a["evicted"].as_u64().unwrap_or(0);
        for key in ["by_closed_by", "by_reason", "by_confidence"] {
            if let Some(m) = a[key].as_object() {
                let dst = maps.entry(key).or_default();
                for (k, v) in m {
                    *dst.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
                }
            }
        }
        for key in ["top_remotes", "top_pods"] {
            let dst = tops.entry(key).or_default();
            for c in a[key].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                if let Some(k) = c["key"].as_str() {
                    *dst.entry(k.to_string()).or_default() += c["count"].as_u64().unwrap_or(0);
                }
            }
        }
        agents.insert(name.clone(), a["agent"].clone());
    }
    let mut out = serde_json::json!({"records": records, "evicted": evicted});
    for (k, m) in maps {
        out[k] = serde_json::to_value(m).unwrap_or(Value::Null);
    }
    for (k, m) in tops {
        let mut v: Vec<(String, u64)> = m.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(10);
        out[k] = v
            .into_iter()
            .map(|(key, count)| serde_json::json!({"key": key, "count": count}))
            .collect();
    }
    out["agents"] = Value::Object(agents);
    out
}

/// The per-agent part of `stats -o table`: probe mode, drops, tracked connections.
pub fn agents_table(merged: &Value) -> String {
    let mut t = Table::new();
    t.load_style(NOTHING);
    t.set_header(vec![
        "AGENT",
        "PROBE_MODE",
        "PACKET_FACTS",
        "TRACKED",
        "RINGBUF_DROPS",
        "RST_SENT",
        "RST_RECEIVED",
        "RETRANSMITS",
    ]);
    for (name, a) in merged["agents"].as_object().into_iter().flatten() {
        t.add_row(vec![
            name.clone(),
            str_or_dash(a, "/probe_mode"),
            str_or_dash(a, "/packet_facts"),
            str_or_dash(a, "/tracked_connections"),
            str_or_dash(a, "/ringbuf_drops"),
            str_or_dash(a, "/resets_sent"),
            str_or_dash(a, "/resets_received"),
            str_or_dash(a, "/retransmits"),
        ]);
    }
    format!("\n{}\n", t.trim_fmt())
}

pub async fn stats(args: StatsArgs) -> ExitCode {
    let agents = args.agents.resolve();
    let query = args.filters.query(None);
    let path = if query.is_empty() {
        "/v1/stats".to_string()
    } else {
        format!("/v1/stats?{query}")
    };
    let mut answers = Vec::new();
    for agent in &agents {
        let body = match client::get(agent, &path).await {
            Ok(b) => b,
            Err(e) => return agent_error(&e),
        };
        match serde_json::from_str::<Value>(&body) {
            Ok(v) => answers.push((agent.to_string(), v)),
            Err(source) => {
                return agent_error(&ClientError::Json {
                    agent: agent.to_string(),
                    source,
                });
            }
        }
    }
    let merged = merge_stats(&answers);
    match args.output {
        ViewFormat::Json => print(&format!("{merged}\n")),
        ViewFormat::Table => print(&format!(
            "{}{}",
            client::stats_table(&merged),
            agents_table(&merged)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn parse(args: &[&str]) -> Result<crate::cli::Cli, clap::Error> {
        crate::cli::Cli::try_parse_from(std::iter::once("whoclosed").chain(args.iter().copied()))
    }

    #[test]
    fn filters_become_the_api_query() {
        let Ok(crate::cli::Cli {
            command: crate::cli::Command::Closes(a),
        }) = parse(&[
            "closes",
            "--closed-by",
            "server,middlebox",
            "--reason",
            "server_idle_timeout",
            "--since",
            "90s",
            "--port",
            "443",
            "--port",
            "80",
            "--pod",
            "web 1",
        ])
        else {
            panic!("parse failed");
        };
        assert_eq!(
            a.filters.query(Some(5)),
            "closed_by=server%2Cmiddlebox&reason=server_idle_timeout&since=90000ms&port=443%2C80&pod=web+1&limit=5"
        );
        let q: std::collections::HashMap<String, String> =
            serde_urlencoded::from_str(&a.filters.query(None)).unwrap();
        let parsed = crate::api::parse_query(&q).unwrap();
        assert_eq!(parsed.ports, vec![443, 80]);
        assert_eq!(parsed.since, Some(Duration::from_secs(90)));
        assert_eq!(parsed.pod.as_deref(), Some("web 1"));
    }

    #[test]
    fn bad_values_are_usage_errors_naming_the_flag() {
        for (args, needle) in [
            (&["closes", "--closed-by", "router"][..], "--closed-by"),
            (&["closes", "--reason", "server_bored"][..], "server_bored"),
            (&["closes", "--since", "ten minutes"][..], "--since"),
            (&["closes", "--port", "70000"][..], "--port"),
            (&["explain", "../../etc"][..], "connection id"),
            (&["closes", "--agent", "nowhere"][..], "--agent"),
            (&["agent", "--history-bytes", "12Q"][..], "unknown unit"),
        ] {
            let e = parse(args).map(|_| ()).unwrap_err();
            assert_eq!(e.exit_code(), i32::from(EXIT_USAGE), "{args:?}");
            assert!(e.to_string().contains(needle), "{args:?}: {e}");
        }
    }

    #[test]
    fn stats_of_several_agents_are_summed() {
        let a = serde_json::json!({"records": 2, "evicted": 0,
            "by_closed_by": {"server": 2}, "by_reason": {"server_close": 2},
            "by_confidence": {"high": 2},
            "top_remotes": [{"key": "10.0.0.1", "count": 2}], "top_pods": [],
            "agent": {"probe_mode": "tracepoint"}});
        let b = serde_json::json!({"records": 3, "evicted": 1,
            "by_closed_by": {"server": 1, "client": 2}, "by_reason": {"client_close": 3},
            "by_confidence": {"high": 3},
            "top_remotes": [{"key": "10.0.0.1", "count": 1}, {"key": "10.0.0.9", "count": 2}],
            "top_pods": [], "agent": {"probe_mode": "fentry"}});
        let m = merge_stats(&[("a".into(), a), ("b".into(), b)]);
        assert_eq!(m["records"], 5);
        assert_eq!(m["evicted"], 1);
        assert_eq!(m["by_closed_by"]["server"], 3);
        assert_eq!(m["by_closed_by"]["client"], 2);
        assert_eq!(m["top_remotes"][0]["key"], "10.0.0.1");
        assert_eq!(m["top_remotes"][0]["count"], 3);
        assert_eq!(m["agents"]["b"]["probe_mode"], "fentry");
        let t = agents_table(&m);
        assert!(t.contains("fentry") && t.contains("tracepoint"), "{t}");
    }
}
