//! The agent's bounded history of verdicts, for `whoclosed closes` / `explain` through the
//! query API.
//!
//! Records are kept as the NDJSON lines the exporter wrote (what the API serves), with the
//! few fields the filters need extracted once on insertion. Three limits bound it: a count,
//! an age and the bytes of the kept lines; the oldest records go first. It works on the
//! JSON contract (docs/events.md), not on the pipeline's types, so it does not change when
//! they do.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::Value;

/// History bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_records: usize,
    pub max_age: Duration,
    /// Bytes of kept lines (the extracted keys add a small constant per record).
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_records: 10_000,
            max_age: Duration::from_secs(3600),
            max_bytes: 32 << 20,
        }
    }
}

/// Why a line was not kept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PushError {
    #[error("not a JSON object: {0}")]
    NotJson(String),
    #[error("not a close record (type {0:?})")]
    NotClose(String),
    #[error("a {0}-byte record exceeds the history's byte limit")]
    TooLarge(usize),
}

/// The fields the filters look at.
#[derive(Debug, Clone, Default)]
struct Keys {
    id: String,
    closed_by: String,
    reason: String,
    confidence: String,
    local: Option<SocketAddr>,
    remote: Option<SocketAddr>,
    pid: Option<u64>,
    comm: Option<String>,
    namespace: Option<String>,
    pod: Option<String>,
}

impl Keys {
    fn from(v: &Value) -> Self {
        let s = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_string);
        let addr = |p: &str| s(p).and_then(|a| a.parse().ok());
        Self {
            id: s("/conn/id").unwrap_or_default(),
            closed_by: s("/verdict/closed_by").unwrap_or_default(),
            reason: s("/verdict/reason").unwrap_or_default(),
            confidence: s("/verdict/confidence").unwrap_or_default(),
            local: addr("/conn/local"),
            remote: addr("/conn/remote"),
            pid: v.pointer("/conn/pid").and_then(Value::as_u64),
            comm: s("/conn/comm"),
            namespace: s("/conn/k8s/namespace"),
            pod: s("/conn/k8s/pod"),
        }
    }
}

struct Entry {
    inserted: Instant,
    line: Arc<str>,
    keys: Keys,
}

/// A filter over kept verdicts; empty lists and `None` match everything.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub closed_by: Vec<String>,
    pub reason: Vec<String>,
    pub confidence: Vec<String>,
    /// Only records kept within this long before the query.
    pub since: Option<Duration>,
    /// Local or remote port.
    pub ports: Vec<u16>,
    /// Local or remote address.
    pub addrs: Vec<IpAddr>,
    pub pid: Option<u64>,
    pub comm: Option<String>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    /// At most this many, the newest.
    pub limit: Option<usize>,
}

impl Query {
    /// Whether a `close` line just written matches (for followers; `since` and `limit` do
    /// not apply to new lines).
    pub fn matches_new(&self, line: &str) -> bool {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            return false;
        };
        let e = Entry {
            inserted: Instant::now(),
            line: Arc::from(""),
            keys: Keys::from(&v),
        };
        Query {
            since: None,
            ..self.clone()
        }
        .matches(&e, e.inserted)
    }

    fn matches(&self, e: &Entry, now: Instant) -> bool {
        let k = &e.keys;
        let any = |list: &[String], v: &str| list.is_empty() || list.iter().any(|x| x == v);
        let ends = [k.local, k.remote];
        any(&self.closed_by, &k.closed_by)
            && any(&self.reason, &k.reason)
            && any(&self.confidence, &k.confidence)
            && self
                .since
                .is_none_or(|d| now.saturating_duration_since(e.inserted) <= d)
            && (self.ports.is_empty()
                || ends
                    .iter()
                    .flatten()
                    .any(|a| self.ports.contains(&a.port())))
            && (self.addrs.is_empty()
                || ends.iter().flatten().any(|a| self.addrs.contains(&a.ip())))
            && self.pid.is_none_or(|p| k.pid == Some(p))
            && self
                .comm
                .as_ref()
                .is_none_or(|c| k.comm.as_ref() == Some(c))
            && self
                .namespace
                .as_ref()
                .is_none_or(|n| k.namespace.as_ref() == Some(n))
            && self.pod.as_ref().is_none_or(|p| k.pod.as_ref() == Some(p))
    }
}

/// Counts over the kept verdicts that match a query (`whoclosed stats`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub records: usize,
    /// Records dropped by the history's limits since the agent started.
    pub evicted: u64,
    pub by_closed_by: BTreeMap<String, usize>,
    pub by_reason: BTreeMap<String, usize>,
    pub by_confidence: BTreeMap<String, usize>,
    /// Remote addresses (IP only) with the most verdicts, most first.
    pub top_remotes: Vec<Count>,
    /// `namespace/pod` of the local end with the most verdicts, most first.
    pub top_pods: Vec<Count>,
}

/// One entry of a top list.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Count {
    pub key: String,
    pub count: usize,
}

fn top(counts: HashMap<String, usize>, n: usize) -> Vec<Count> {
    let mut v: Vec<Count> = counts
        .into_iter()
        .map(|(key, count)| Count { key, count })
        .collect();
    v.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
    v.truncate(n);
    v
}

/// Verdicts, oldest first, within [`Limits`].
pub struct History {
    limits: Limits,
    entries: VecDeque<Entry>,
    bytes: usize,
    evicted: u64,
}

impl History {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            entries: VecDeque::new(),
            bytes: 0,
            evicted: 0,
        }
    }

    /// Keeps one `close` line (as written by the exporter), evicting the oldest records
    /// beyond the limits.
    pub fn push(&mut self, line: &str, now: Instant) -> Result<(), PushError> {
        let line = line.trim_end();
        let v: Value = serde_json::from_str(line).map_err(|e| PushError::NotJson(e.to_string()))?;
        if !v.is_object() {
            return Err(PushError::NotJson("not an object".into()));
        }
        if v["type"] != "close" {
            return Err(PushError::NotClose(
                v["type"].as_str().unwrap_or("none").to_string(),
            ));
        }
        if line.len() > self.limits.max_bytes {
            return Err(PushError::TooLarge(line.len()));
        }
        self.entries.push_back(Entry {
            inserted: now,
            line: Arc::from(line),
            keys: Keys::from(&v),
        });
        self.bytes += line.len();
        self.expire(now);
        Ok(())
    }

    /// Drops records older than the age limit (also done on every push).
    pub fn expire(&mut self, now: Instant) {
        while let Some(front) = self.entries.front() {
            let too_old = now.saturating_duration_since(front.inserted) > self.limits.max_age;
            if !(too_old
                || self.entries.len() > self.limits.max_records
                || self.bytes > self.limits.max_bytes)
            {
                break;
            }
            if let Some(e) = self.entries.pop_front() {
                self.bytes -= e.line.len();
                self.evicted += 1;
            }
        }
    }

    /// Matching lines, oldest first (the newest `limit` of them when limited).
    pub fn query(&self, q: &Query, now: Instant) -> Vec<Arc<str>> {
        let mut out: Vec<Arc<str>> = self
            .entries
            .iter()
            .rev()
            .filter(|e| q.matches(e, now))
            .take(q.limit.unwrap_or(usize::MAX))
            .map(|e| e.line.clone())
            .collect();
        out.reverse();
        out
    }

    /// Counts over the records matching `q` (its `limit` is ignored), with the `n` largest
    /// remote addresses and pods.
    pub fn summary(&self, q: &Query, now: Instant, n: usize) -> Summary {
        let mut s = Summary {
            evicted: self.evicted,
            ..Summary::default()
        };
        let mut remotes = HashMap::new();
        let mut pods = HashMap::new();
        for e in self.entries.iter().filter(|e| q.matches(e, now)) {
            let k = &e.keys;
            s.records += 1;
            *s.by_closed_by.entry(k.closed_by.clone()).or_default() += 1;
            *s.by_reason.entry(k.reason.clone()).or_default() += 1;
            *s.by_confidence.entry(k.confidence.clone()).or_default() += 1;
            if let Some(r) = k.remote {
                *remotes.entry(r.ip().to_string()).or_default() += 1;
            }
            if let (Some(ns), Some(pod)) = (&k.namespace, &k.pod) {
                *pods.entry(format!("{ns}/{pod}")).or_default() += 1;
            }
        }
        s.top_remotes = top(remotes, n);
        s.top_pods = top(pods, n);
        s
    }

    /// The record of one socket (`conn.id`), for `explain`.
    pub fn get(&self, id: &str) -> Option<Arc<str>> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.keys.id == id)
            .map(|e| e.line.clone())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of the kept lines.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Records dropped by the limits so far.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOLDENS: [&str; 3] = [
        include_str!("export/golden/grpc_idle_timeout_client.json"),
        include_str!("export/golden/ipv4_middlebox_reset_untraced.json"),
        include_str!("export/golden/ipv6_client_close.json"),
    ];

    /// The goldens as NDJSON lines (what the exporter writes).
    fn lines() -> Vec<String> {
        GOLDENS
            .iter()
            .map(|g| {
                let v: Value = serde_json::from_str(g).expect("golden is JSON");
                serde_json::to_string(&v).expect("serialises")
            })
            .collect()
    }

    fn with_id(line: &str, id: &str) -> String {
        let mut v: Value = serde_json::from_str(line).expect("json");
        v["conn"]["id"] = Value::from(id);
        serde_json::to_string(&v).expect("serialises")
    }

    fn id_of(line: &str) -> String {
        let v: Value = serde_json::from_str(line).expect("json");
        v["conn"]["id"].as_str().unwrap_or_default().to_string()
    }

    fn big() -> Limits {
        Limits {
            max_records: 100,
            max_age: Duration::from_secs(60),
            max_bytes: 1 << 20,
        }
    }

    #[test]
    fn filters_select_by_verdict_endpoint_process_and_pod() {
        let mut h = History::new(big());
        let t0 = Instant::now();
        let l = lines();
        for line in &l {
            h.push(line, t0).expect("a close record");
        }
        let mut with_pod: Value = serde_json::from_str(&l[2]).expect("json");
        with_pod["conn"]["id"] = Value::from("podconn");
        with_pod["conn"]["k8s"] = serde_json::json!({"node": "n1", "namespace": "shop",
            "pod": "web-0", "container": "app", "pod_uid": "2c7a1f3e-9b1d-4c55-8e0f-1a2b3c4d5e6f",
            "container_id": null});
        h.push(&with_pod.to_string(), t0).expect("push");
        let ids = |q: Query| -> Vec<String> { h.query(&q, t0).iter().map(|l| id_of(l)).collect() };
        assert_eq!(ids(Query::default()).len(), 4);
        assert_eq!(
            ids(Query {
                closed_by: vec!["middlebox".into()],
                ..Query::default()
            }),
            ["3a48113ddbc90c95"]
        );
        assert_eq!(
            ids(Query {
                reason: vec!["server_idle_timeout".into()],
                confidence: vec!["medium".into()],
                ..Query::default()
            }),
            ["b0b16bcd9bca933c"]
        );
        assert_eq!(
            ids(Query {
                ports: vec![443],
                ..Query::default()
            }),
            ["b1e266365af28ec6", "podconn"]
        );
        assert_eq!(
            ids(Query {
                addrs: vec!["10.9.2.2".parse().expect("ip")],
                ..Query::default()
            }),
            ["3a48113ddbc90c95"]
        );
        assert_eq!(
            ids(Query {
                pid: Some(77),
                comm: Some("python3".into()),
                ..Query::default()
            }),
            ["b0b16bcd9bca933c"]
        );
        assert_eq!(
            ids(Query {
                namespace: Some("shop".into()),
                pod: Some("web-0".into()),
                ..Query::default()
            }),
            ["podconn"]
        );
        assert!(
            ids(Query {
                closed_by: vec!["server".into()],
                ports: vec![443],
                ..Query::default()
            })
            .is_empty(),
            "filters combine with AND"
        );
        assert_eq!(
            ids(Query {
                limit: Some(2),
                ..Query::default()
            }),
            ["b1e266365af28ec6", "podconn"],
            "the newest, oldest first"
        );
        assert_eq!(
            h.get("3a48113ddbc90c95").map(|l| id_of(&l)).as_deref(),
            Some("3a48113ddbc90c95")
        );
        assert_eq!(h.get("nope"), None);
    }

    #[test]
    fn count_age_and_byte_limits_evict_the_oldest() {
        let l = lines();
        let t0 = Instant::now();
        let mut h = History::new(Limits {
            max_records: 3,
            ..big()
        });
        for i in 0..5 {
            h.push(&with_id(&l[0], &format!("c{i}")), t0).expect("push");
        }
        let kept: Vec<String> = h
            .query(&Query::default(), t0)
            .iter()
            .map(|l| id_of(l))
            .collect();
        assert_eq!(kept, ["c2", "c3", "c4"]);
        assert_eq!(h.evicted(), 2);

        let mut h = History::new(big());
        h.push(&with_id(&l[0], "old"), t0).expect("push");
        h.push(&with_id(&l[0], "new"), t0 + Duration::from_secs(50))
            .expect("push");
        let since = Query {
            since: Some(Duration::from_secs(20)),
            ..Query::default()
        };
        let recent: Vec<String> = h
            .query(&since, t0 + Duration::from_secs(55))
            .iter()
            .map(|l| id_of(l))
            .collect();
        assert_eq!(recent, ["new"]);
        h.expire(t0 + Duration::from_secs(61));
        assert_eq!(h.len(), 1, "the 61 s old record is gone");

        let one = with_id(&l[1], "a").len();
        let mut h = History::new(Limits {
            max_bytes: one * 2 + one / 2,
            ..big()
        });
        for id in ["a", "b", "c"] {
            h.push(&with_id(&l[1], id), t0).expect("push");
        }
        assert_eq!(h.len(), 2);
        assert!(h.bytes() <= one * 2 + one / 2);
        assert!(matches!(
            h.push(&"x".repeat(10), t0),
            Err(PushError::NotJson(_))
        ));
    }

    #[test]
    fn summary_counts_matching_records() {
        let l = lines();
        let t0 = Instant::now();
        let mut h = History::new(big());
        for (i, line) in l.iter().enumerate() {
            h.push(&with_id(line, &format!("a{i}")), t0).expect("push");
        }
        h.push(&with_id(&l[1], "b"), t0).expect("push");
        let s = h.summary(&Query::default(), t0, 1);
        assert_eq!(s.records, 4);
        assert_eq!(s.by_closed_by.get("middlebox"), Some(&2));
        assert_eq!(s.by_reason.get("middlebox_reset"), Some(&2));
        assert_eq!(s.by_reason.values().sum::<usize>(), 4);
        assert_eq!(
            s.top_remotes,
            [Count {
                key: "10.9.2.2".into(),
                count: 2
            }]
        );
        assert!(s.top_pods.is_empty(), "no record carries conn.k8s");
        let only = h.summary(
            &Query {
                closed_by: vec!["server".into()],
                ..Query::default()
            },
            t0,
            5,
        );
        assert_eq!(only.records, 1);
        assert_eq!(only.by_closed_by.len(), 1);
    }

    #[test]
    fn only_close_records_are_kept() {
        let mut h = History::new(big());
        let t0 = Instant::now();
        assert_eq!(
            h.push(r#"{"v":1,"type":"ready"}"#, t0),
            Err(PushError::NotClose("ready".into()))
        );
        assert!(matches!(h.push("[1]", t0), Err(PushError::NotJson(_))));
        let mut tiny = History::new(Limits {
            max_bytes: 10,
            ..big()
        });
        assert!(matches!(
            tiny.push(&lines()[0], t0),
            Err(PushError::TooLarge(_))
        ));
        assert!(h.is_empty() && tiny.is_empty());
    }
}
