//! The JSON Schemas in docs/schema/v1 accept every record whoclosed is known to write (the
//! exporter goldens and real `whoclosed trace` sessions in docs/schema/examples) and reject
//! records that break the contract.
// Test code: a failed expectation is meant to stop the test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use jsonschema::{Registry, Validator};
use serde_json::{Value, json};

const TYPES: [&str; 5] = ["close", "ready", "drops", "stats", "conn"];
const BASE: &str = "https://whoclosed.invalid/schema/v1/";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn load(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn schema(name: &str) -> Value {
    load(
        &repo()
            .join("docs/schema/v1")
            .join(format!("{name}.schema.json")),
    )
}

/// A validator for `record.schema.json` (dispatching on `type`) or for one `$ref` into the
/// registered schemas, offline.
fn validator(root: &Value) -> Validator {
    let mut builder = Registry::new();
    for t in TYPES
        .iter()
        .chain(["record", "api-stats", "cli-stats"].iter())
    {
        builder = builder
            .add(format!("{BASE}{t}.schema.json"), schema(t))
            .unwrap_or_else(|e| panic!("registering {t}: {e}"));
    }
    let registry = builder.prepare().expect("schemas resolve");
    jsonschema::options()
        .with_registry(&registry)
        .should_validate_formats(true)
        .build(root)
        .expect("a valid 2020-12 schema")
}

fn record_validator() -> Validator {
    validator(&json!({"$ref": format!("{BASE}record.schema.json")}))
}

fn errors(v: &Validator, instance: &Value) -> Vec<String> {
    v.iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

fn examples() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let golden = repo().join("tracer-user/src/export/golden");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&golden)
        .expect("golden dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    for f in files {
        out.push((f.display().to_string(), load(&f)));
    }
    let dir = repo().join("docs/schema/examples");
    let mut sessions: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("examples dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "ndjson"))
        .collect();
    sessions.sort();
    for f in sessions {
        let text = std::fs::read_to_string(&f).expect("read session");
        for (i, line) in text.lines().enumerate() {
            let v = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}:{}: {e}", f.display(), i + 1));
            out.push((format!("{}:{}", f.display(), i + 1), v));
        }
    }
    out
}

#[test]
fn every_golden_and_sample_record_is_valid() {
    let v = record_validator();
    let records = examples();
    let mut seen_types = std::collections::BTreeSet::new();
    for (name, record) in &records {
        let errs = errors(&v, record);
        assert!(errs.is_empty(), "{name} is rejected: {errs:#?}");
        seen_types.insert(record["type"].as_str().unwrap_or("?").to_string());
    }
    assert_eq!(
        seen_types.into_iter().collect::<Vec<_>>(),
        ["close", "conn", "drops", "ready", "stats"],
        "the samples cover every record type"
    );
    assert!(
        records.len() >= 20,
        "only {} records checked",
        records.len()
    );
}

#[test]
fn each_type_schema_stands_alone() {
    for t in TYPES {
        let v = validator(&json!({"$ref": format!("{BASE}{t}.schema.json")}));
        let mut matched = 0;
        for (name, record) in examples() {
            if record["type"] == t {
                let errs = errors(&v, &record);
                assert!(errs.is_empty(), "{name} against {t}: {errs:#?}");
                matched += 1;
            } else {
                assert!(!v.is_valid(&record), "{t} schema accepted {name}");
            }
        }
        assert!(matched > 0, "no sample of type {t}");
    }
}

/// The pod identity the agent will put in `conn.k8s` matches the schema's `$defs/k8s`.
#[test]
fn pod_identity_matches_the_k8s_definition() {
    let v = validator(&json!({"$ref": format!("{BASE}close.schema.json#/$defs/k8s")}));
    let id = tracer_user::k8s::PodIdentity {
        node: Some("node-1".into()),
        namespace: Some("shop".into()),
        pod: Some("web-0".into()),
        container: None,
        pod_uid: "2c7a1f3e-9b1d-4c55-8e0f-1a2b3c4d5e6f".into(),
        container_id: Some("ab".repeat(32)),
    };
    let value = serde_json::to_value(&id).expect("serialises");
    assert!(errors(&v, &value).is_empty(), "{:#?}", errors(&v, &value));
    let mut bad = value.clone();
    bad["container_id"] = json!("not-hex");
    assert!(!v.is_valid(&bad));
}

fn golden_close() -> Value {
    load(&repo().join("tracer-user/src/export/golden/grpc_idle_timeout_client.json"))
}

fn sample_of(t: &str) -> Value {
    examples()
        .into_iter()
        .map(|(_, v)| v)
        .find(|v| v["type"] == t)
        .unwrap_or_else(|| panic!("no {t} sample"))
}

#[test]
fn wrong_records_are_rejected() {
    let v = record_validator();
    type Mutation = (&'static str, fn() -> Value);
    let cases: &[Mutation] = &[
        ("unknown closed_by", || {
            let mut r = golden_close();
            r["verdict"]["closed_by"] = json!("alien");
            r
        }),
        ("confidence beyond high", || {
            let mut r = golden_close();
            r["verdict"]["confidence"] = json!("certain");
            r
        }),
        ("undocumented reason", || {
            let mut r = golden_close();
            r["verdict"]["reason"] = json!("cosmic_rays");
            r
        }),
        ("verdict missing", || {
            let mut r = golden_close();
            r.as_object_mut().map(|o| o.remove("verdict"));
            r
        }),
        ("undocumented top-level field", || {
            let mut r = golden_close();
            r["surprise"] = json!(1);
            r
        }),
        ("evidence kind unknown", || {
            let mut r = golden_close();
            r["evidence"][0]["what"] = json!("telepathy");
            r
        }),
        ("a field of another evidence kind", || {
            let mut r = golden_close();
            r["evidence"][0] = json!({"at_ms": 1.0, "what": "fin_sent", "ttl": 64});
            r
        }),
        ("rst_received without origin", || {
            let mut r = golden_close();
            r["evidence"][0] = json!({"at_ms": 1.0, "what": "rst_received", "ttl": 64});
            r
        }),
        ("negative pid", || {
            let mut r = golden_close();
            r["conn"]["pid"] = json!(-1);
            r
        }),
        ("address without port", || {
            let mut r = golden_close();
            r["conn"]["remote"] = json!("10.0.0.1");
            r
        }),
        ("timestamp without microseconds", || {
            let mut r = golden_close();
            r["ts"] = json!("2026-11-23T18:55:02Z");
            r
        }),
        ("schema version 2", || {
            let mut r = golden_close();
            r["v"] = json!(2);
            r
        }),
        ("unknown record type", || {
            let mut r = golden_close();
            r["type"] = json!("gossip");
            r
        }),
        (
            "ready with the requested mode instead of the one in force",
            || {
                let mut r = sample_of("ready");
                r["probe_mode"] = json!("auto");
                r
            },
        ),
        ("drops reporting nothing lost", || {
            let mut r = sample_of("drops");
            r["ringbuf_drops"] = json!(0);
            r
        }),
        ("stats without kernel counters", || {
            let mut r = sample_of("stats");
            r.as_object_mut().map(|o| o.remove("kernel"));
            r
        }),
    ];
    for (case, make) in cases {
        let record = make();
        assert!(!v.is_valid(&record), "{case}: accepted {record}");
    }
    // And the unmodified base records pass, so each rejection is the mutation's doing.
    assert!(v.is_valid(&golden_close()));
    for t in ["ready", "drops", "stats"] {
        assert!(v.is_valid(&sample_of(t)), "{t} sample");
    }
    // A drops record for a loss other than the ring buffer's is valid.
    let mut table_full = sample_of("drops");
    table_full["ringbuf_drops"] = json!(0);
    table_full["losses"]["conns_dropped"] = json!(3);
    table_full["losses_new"]["conns_dropped"] = json!(3);
    assert!(v.is_valid(&table_full), "{table_full}");
}

/// Every line a live `whoclosed trace` writes (root: it loads eBPF) is valid: ready, the
/// verdicts of real loopback connections (an orderly close, an abort, a refused connect),
/// and stats on SIGTERM. Skips when not root unless `WHOCLOSED_E2E=require`.
#[test]
fn live_trace_output_is_valid() {
    use std::{
        io::{BufRead, BufReader, Read, Write},
        net::{TcpListener, TcpStream},
        process::{Command, Stdio},
        sync::mpsc,
        time::{Duration, Instant},
    };

    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var("WHOCLOSED_E2E").as_deref() == Ok("require") {
            panic!("live schema test needs root");
        }
        eprintln!("SKIP live_trace_output_is_valid: needs root to load eBPF");
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let refused_port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_whoclosed"))
        .args(["trace", "-o", "json", "--linger-ms", "300"])
        .args([
            "--port",
            &port.to_string(),
            "--port",
            &refused_port.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start whoclosed");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !lines
        .iter()
        .any(|l: &String| l.contains("\"type\":\"ready\""))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => {
                let _ = child.kill();
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("whoclosed never became ready: {err}");
            }
        }
    }

    // An orderly close, client first.
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (mut s, _) = listener.accept().expect("accept");
    c.write_all(b"hi").expect("write");
    let mut buf = [0u8; 2];
    s.read_exact(&mut buf).expect("read");
    drop(c);
    let _ = s.read_to_end(&mut Vec::new());
    drop(s);
    // An abort: SO_LINGER 0 makes close() send a RST.
    let c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (s, _) = listener.accept().expect("accept");
    {
        use std::os::fd::AsRawFd;
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket fd and a pointer to a linger struct of the given size.
        let rc = unsafe {
            libc::setsockopt(
                c.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_LINGER");
    }
    drop(c);
    std::thread::sleep(Duration::from_millis(100));
    drop(s);
    // A refused connect.
    assert!(TcpStream::connect(("127.0.0.1", refused_port)).is_err());

    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill with a valid pid of our own child and a valid signal number.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    let _ = reader.join();
    lines.extend(rx.try_iter());
    assert!(status.success(), "whoclosed exited with {status}");

    let v = record_validator();
    let mut types = std::collections::BTreeMap::<String, usize>::new();
    for line in &lines {
        let record: Value = serde_json::from_str(line).expect("NDJSON");
        let errs = errors(&v, &record);
        assert!(errs.is_empty(), "live line rejected: {line}\n{errs:#?}");
        *types
            .entry(record["type"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    assert_eq!(types.get("ready"), Some(&1), "{lines:#?}");
    assert_eq!(types.get("stats"), Some(&1), "{lines:#?}");
    assert!(
        types.get("close").copied().unwrap_or(0) >= 5,
        "two sockets for each of two connections and the refused one: {lines:#?}"
    );
}

/// `GET /v1/stats` and `whoclosed stats -o json`: what the agent and the CLI write is
/// accepted (both built here from the same code paths' shapes), and broken answers are not.
#[test]
fn stats_answers_match_their_schemas() {
    let api = validator(&json!({"$ref": format!("{BASE}api-stats.schema.json")}));
    let cli = validator(&json!({"$ref": format!("{BASE}cli-stats.schema.json")}));
    let agent = json!({"ringbuf_drops": 0, "tracked_connections": 3, "resets_sent": 1,
        "resets_received": 2, "retransmits": 0, "probe_mode": "tracepoint",
        "packet_facts": true, "kernel": "6.18.0"});
    let answer = json!({"records": 3, "evicted": 0,
        "by_closed_by": {"client": 1, "server": 1, "middlebox": 1},
        "by_reason": {"client_close": 1, "server_close": 1, "middlebox_reset": 1},
        "by_confidence": {"high": 3},
        "top_remotes": [{"key": "10.241.2.2", "count": 2}, {"key": "127.0.0.1", "count": 1}],
        "top_pods": [{"key": "shop/web-7f9c-abcde", "count": 1}],
        "agent": agent});
    assert_eq!(errors(&api, &answer), Vec::<String>::new());
    let starting = json!({"ringbuf_drops": 0, "tracked_connections": 0, "resets_sent": 0,
        "resets_received": 0, "retransmits": 0, "probe_mode": null, "packet_facts": null,
        "kernel": null});
    let mut early = answer.clone();
    early["agent"] = starting;
    assert_eq!(
        errors(&api, &early),
        Vec::<String>::new(),
        "before the probes attach"
    );
    let merged = tracer_user::query::merge_stats(&[
        ("unix:/run/whoclosed/whoclosed.sock".into(), answer.clone()),
        ("http://10.0.0.2:9091".into(), early.clone()),
    ]);
    assert_eq!(errors(&cli, &merged), Vec::<String>::new(), "{merged}");
    for (what, broken) in [
        ("an unknown party", json!({"by_closed_by": {"proxy": 1}})),
        (
            "an unknown confidence",
            json!({"by_confidence": {"certain": 1}}),
        ),
        (
            "a reason that is no reason",
            json!({"by_reason": {"because": 1}}),
        ),
        ("a negative count", json!({"records": -1})),
        (
            "a top list entry without its count",
            json!({"top_pods": [{"key": "a/b"}]}),
        ),
        (
            "an unknown probe mode",
            json!({"agent": {"probe_mode": "uprobe"}}),
        ),
    ] {
        let mut bad = answer.clone();
        for (k, v) in broken.as_object().expect("object") {
            match (bad[k].as_object_mut(), v.as_object()) {
                (Some(dst), Some(src)) if k == "agent" => {
                    for (kk, vv) in src {
                        dst.insert(kk.clone(), vv.clone());
                    }
                }
                _ => bad[k] = v.clone(),
            }
        }
        assert!(!errors(&api, &bad).is_empty(), "{what} was accepted: {bad}");
    }
    // The reason names are the close records' (api-stats stands alone for the API unit test,
    // so it carries a copy of the pattern; the copy must not drift).
    assert_eq!(
        schema("api-stats")["$defs"]["by_reason"]["propertyNames"]["pattern"],
        schema("close")["properties"]["verdict"]["properties"]["reason"]["pattern"],
    );
    let mut no_agents = merged.clone();
    no_agents.as_object_mut().expect("object").remove("agents");
    assert!(
        !errors(&cli, &no_agents).is_empty(),
        "the merged answer names its agents"
    );
}
