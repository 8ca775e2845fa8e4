//! Helpers shared by the privileged integration tests: cgroups named as the kubelet names
//! them, a kubelet log layout, loopback connectors, and a real Prometheus.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::{
    io::{BufRead, BufReader, Read},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

/// The cgroup2 mount point, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2")
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// Removes the cgroup directories it created (deepest first) and the temporary host root,
/// after the children are gone.
pub struct Cleanup {
    pub children: Vec<Child>,
    pub cgroups: Vec<PathBuf>,
    pub host_root: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for dir in self.cgroups.iter().rev() {
            if let Err(e) = std::fs::remove_dir(dir) {
                eprintln!("k8s_cgroups: cannot remove {}: {e}", dir.display());
            }
        }
        let _ = std::fs::remove_dir_all(&self.host_root);
    }
}

impl Cleanup {
    /// Creates `rel` under `base` one directory at a time, remembering each for removal.
    pub fn mkdirs(&mut self, base: &Path, rel: &str) -> PathBuf {
        let mut dir = base.to_path_buf();
        for seg in rel.split('/').filter(|s| !s.is_empty()) {
            dir.push(seg);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
                self.cgroups.push(dir.clone());
            }
        }
        dir
    }
}

/// A shell that waits for a line, connects to `port` on loopback, says so, and holds the
/// connection until killed.
pub fn spawn_connector(port: u16) -> (Child, ChildStdin, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "read go; exec 3<>/dev/tcp/127.0.0.1/{port}; echo connected; read done"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn bash");
    let stdin = child.stdin.take().expect("stdin piped");
    let stdout = BufReader::new(child.stdout.take().expect("stdout piped"));
    (child, stdin, stdout)
}

/// The pid owning the TCP socket `127.0.0.1:local_port -> 127.0.0.1:remote_port`, found the
/// way a user would check it: `/proc/net/tcp` for the inode, then every process's fds.
pub fn socket_owner(local_port: u16, remote_port: u16) -> Option<u32> {
    let tcp = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let want_local = format!("0100007F:{local_port:04X}");
    let want_remote = format!("0100007F:{remote_port:04X}");
    let inode = tcp.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&want_local.as_str()) && f.get(2) == Some(&want_remote.as_str()))
            .then(|| f.get(9).map(|s| s.to_string()))?
    })?;
    let target = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == target) {
                return Some(pid);
            }
        }
    }
    None
}

pub fn kubelet_layout(
    host_root: &Path,
    ns: &str,
    pod: &str,
    uid: &str,
    container: &str,
    cid: &str,
) {
    let cdir = host_root
        .join("var/log/pods")
        .join(format!("{ns}_{pod}_{uid}"))
        .join(container);
    std::fs::create_dir_all(&cdir).expect("mkdir pods");
    std::fs::write(cdir.join("0.log"), b"").expect("write log");
    let links = host_root.join("var/log/containers");
    std::fs::create_dir_all(&links).expect("mkdir containers");
    std::os::unix::fs::symlink(
        cdir.join("0.log"),
        links.join(format!("{pod}_{ns}_{container}-{cid}.log")),
    )
    .expect("symlink");
}

/// One pod, `shop/web-7f9c-abcde` (container `app`): its cgroup under `<cg2>/<test_dir>`
/// named as the kubelet's cgroupfs driver names it, and its kubelet log layout under
/// `host_root`. Returns the container's cgroup (write a pid to its `cgroup.procs`) and what
/// removes it all.
pub fn one_pod(
    cg2: &Path,
    test_dir: &str,
    host_root: &Path,
    uid: &str,
    cid: &str,
) -> (Cleanup, PathBuf) {
    let _ = std::fs::remove_dir_all(host_root);
    let mut cleanup = Cleanup {
        children: Vec::new(),
        cgroups: Vec::new(),
        host_root: host_root.to_path_buf(),
    };
    let leaf = cleanup.mkdirs(
        cg2,
        &format!("{test_dir}/kubepods/burstable/pod{uid}/{cid}"),
    );
    kubelet_layout(host_root, "shop", "web-7f9c-abcde", uid, "app", cid);
    (cleanup, leaf)
}

pub struct Prometheus {
    pub child: Child,
    pub dir: PathBuf,
    pub port: u16,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// `query` through Prometheus's HTTP API: the scalar value of the single result, if any.
pub fn instant_query(prom_port: u16, query: &str) -> Option<f64> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "5", "-G"])
        .arg(format!("http://127.0.0.1:{prom_port}/api/v1/query"))
        .arg("--data-urlencode")
        .arg(format!("query={query}"))
        .output()
        .ok()?;
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let result = body["data"]["result"].as_array()?;
    if result.len() != 1 {
        return None;
    }
    result[0]["value"][1].as_str()?.parse().ok()
}

impl Prometheus {
    /// Debian's `prometheus`, scraping `target` (host:port) every second, with its data and
    /// log under a fresh temporary directory named after `tag`.
    pub fn start(bin: &Path, tag: &str, target: &str) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("whoclosed-prom-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: whoclosed\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write config");
        let port = free_port();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("log file"))
            .spawn()
            .expect("start prometheus");
        Prometheus { child, dir, port }
    }

    /// Polls `query` until it returns `want` or `timeout` passes; the last answer.
    pub fn wait_for(&self, query: &str, want: f64, timeout: Duration) -> Option<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = instant_query(self.port, query);
            if got == Some(want) || Instant::now() >= deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

pub fn which_prometheus() -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("prometheus"))
                .find(|p| p.is_file())
        })
        .ok_or(())
}

const SCHEMA_BASE: &str = "https://whoclosed.invalid/schema/v1/";

/// A validator for `docs/schema/v1/record.schema.json` (any NDJSON line), offline.
pub fn record_validator() -> jsonschema::Validator {
    schema_validator("record")
}

/// A validator for `docs/schema/v1/<name>.schema.json`, with every schema there registered
/// for its `$ref`s, offline.
pub fn schema_validator(name: &str) -> jsonschema::Validator {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/schema/v1");
    let mut builder = jsonschema::Registry::new();
    for entry in std::fs::read_dir(&dir).expect("docs/schema/v1").flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if !file.ends_with(".schema.json") {
            continue;
        }
        let schema: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(entry.path()).expect("read schema"))
                .expect("schema is JSON");
        builder = builder
            .add(format!("{SCHEMA_BASE}{file}"), schema)
            .expect("register schema");
    }
    let registry = builder.prepare().expect("schemas resolve");
    jsonschema::options()
        .with_registry(&registry)
        .should_validate_formats(true)
        .build(&serde_json::json!({"$ref": format!("{SCHEMA_BASE}{name}.schema.json")}))
        .expect("a valid schema")
}

pub fn schema_errors(v: &jsonschema::Validator, instance: &serde_json::Value) -> Vec<String> {
    v.iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

/// `whoclosed trace` or `agent` running with its stdout read line by line; started once it
/// printed its `ready` record. Killed on drop.
pub struct WhoclosedProc {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    /// Every line read so far.
    pub seen: Vec<String>,
}

impl Drop for WhoclosedProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl WhoclosedProc {
    pub fn start(bin: &str, args: &[String]) -> WhoclosedProc {
        let mut child = Command::new(bin)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start whoclosed {args:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut a = WhoclosedProc {
            child,
            lines: rx,
            seen: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !a.seen.iter().any(|l| l.contains("\"type\":\"ready\"")) {
            match a
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) => a.seen.push(l),
                Err(_) => {
                    let _ = a.child.kill();
                    let mut err = String::new();
                    if let Some(mut e) = a.child.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    panic!("whoclosed {args:?} never became ready: {err}");
                }
            }
        }
        a
    }

    /// The first JSON line (read so far or within `timeout`) that `pred` accepts.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let parse = |l: &str| serde_json::from_str::<serde_json::Value>(l).ok();
        if let Some(v) = self.seen.iter().filter_map(|l| parse(l)).find(|v| pred(v)) {
            return Some(v);
        }
        let deadline = Instant::now() + timeout;
        while let Ok(l) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            let v = parse(&l);
            self.seen.push(l);
            if let Some(v) = v.filter(|v| pred(v)) {
                return Some(v);
            }
        }
        None
    }
}
