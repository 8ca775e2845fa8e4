//! tcpdump captures read back with tshark, for the wire cross-checks.

use super::which;
use crate::wait_until;
use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `tcpdump` writing a pcap inside a namespace (all interfaces, one TCP port). For
/// checking what the peers put on the wire; needs `tcpdump` and, to read it, `tshark`.
pub struct Capture {
    child: Child,
    pub path: PathBuf,
    stderr: Arc<Mutex<String>>,
    dead: bool,
}

/// Whether `tcpdump` and `tshark` are available (for [`Capture`] / [`wire_events`]).
pub fn capture_tools_missing() -> Option<String> {
    let missing: Vec<&str> = ["tcpdump", "tshark"]
        .into_iter()
        .filter(|p| which(p).is_none())
        .collect();
    (!missing.is_empty()).then(|| format!("{} not found on PATH", missing.join(", ")))
}

impl Capture {
    /// Starts `tcpdump -i any -w <path> tcp port <port>` in `ns`; returns once it listens.
    pub fn start(ns: &str, port: u16, path: &Path) -> Result<Capture> {
        let mut child = Command::new("ip")
            .args([
                "netns", "exec", ns, "tcpdump", "-i", "any", "-s", "0", "-B", "65536",
            ])
            .args(["--immediate-mode", "-U", "-w"])
            .arg(path)
            .args(["tcp", "port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning tcpdump in {ns}"))?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let pipe = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().expect("stderr lock");
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut c = Capture {
            child,
            path: path.to_path_buf(),
            stderr,
            dead: false,
        };
        let res = wait_until(
            &format!("tcpdump listening in {ns}"),
            Duration::from_secs(10),
            || {
                if let Some(st) = c.child.try_wait()? {
                    bail!("tcpdump exited ({st}): {}", c.stderr_text());
                }
                Ok(c.stderr_text().contains("listening on"))
            },
        );
        if let Err(e) = res {
            c.kill();
            return Err(e);
        }
        Ok(c)
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn kill(&mut self) {
        if !self.dead {
            // SAFETY: kill(2) on our own, not yet reaped, child (`ip netns exec` execs).
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    self.dead = true;
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.dead = true;
        }
    }

    /// Stops tcpdump (flushing the file) and returns the pcap path and tcpdump's summary.
    pub fn stop(mut self) -> (PathBuf, String) {
        // Give the last segments a moment to be written.
        std::thread::sleep(Duration::from_millis(200));
        self.kill();
        (self.path.clone(), self.stderr_text())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One thing seen on the wire, in capture order.
#[derive(Clone, Debug, PartialEq)]
pub struct WireEvent {
    /// Seconds since the first captured packet.
    pub at: f64,
    /// Sender IP address (as tshark prints it).
    pub from: String,
    pub kind: WireKind,
}

/// What [`WireEvent`] saw: TCP flags and the HTTP/2 control frames the agent parses.
#[derive(Clone, Debug, PartialEq)]
pub enum WireKind {
    Syn,
    Fin,
    Rst,
    Settings {
        ack: bool,
    },
    Ping {
        ack: bool,
    },
    Goaway {
        code: u32,
        last_stream_id: u32,
        debug: String,
    },
    RstStream {
        stream: u32,
        code: u32,
    },
    Headers {
        stream: u32,
        end_stream: bool,
    },
}

/// Reads `pcap` with tshark (port `port` decoded as HTTP/2) into [`WireEvent`]s. DATA,
/// WINDOW_UPDATE, PRIORITY frames are left out.
pub fn wire_events(pcap: &Path, port: u16) -> Result<Vec<WireEvent>> {
    let pcap_s = pcap.display().to_string();
    let decode = format!("tcp.port=={port},http2");
    let fields = [
        "frame.time_relative",
        "ip.src",
        "ipv6.src",
        "tcp.flags.str",
        "http2.type",
        "http2.flags",
        "http2.streamid",
        "http2.goaway.error",
        "http2.goaway.last_stream_id",
        "http2.goaway.addata",
        "http2.rst_stream.error",
    ];
    let mut args: Vec<&str> = vec!["-n", "-r", &pcap_s, "-d", &decode, "-T", "fields"];
    for f in &fields {
        args.push("-e");
        args.push(f);
    }
    args.extend(["-E", "separator=/t", "-E", "aggregator=;"]);
    let out = Command::new("tshark")
        .args(&args)
        .output()
        .context("running tshark")?;
    if !out.status.success() {
        bail!(
            "tshark -r {pcap_s} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut evs = Vec::new();
    for line in text.lines() {
        let col: Vec<&str> = line.split('\t').collect();
        let get = |i: usize| col.get(i).copied().unwrap_or("");
        let list = |i: usize| -> Vec<&str> {
            let s = get(i);
            if s.is_empty() {
                Vec::new()
            } else {
                s.split(';').collect()
            }
        };
        let at: f64 = get(0).parse().unwrap_or(0.0);
        let from = if get(1).is_empty() { get(2) } else { get(1) }.to_string();
        let ev = |kind| WireEvent {
            at,
            from: from.clone(),
            kind,
        };
        let flags = get(3);
        if flags.contains('S') {
            evs.push(ev(WireKind::Syn));
        }
        let (types, fl, sids) = (list(4), list(5), list(6));
        let (gerr, glsid, gdata, rerr) = (list(7), list(8), list(9), list(10));
        let (mut gi, mut ri) = (0, 0);
        for (i, ty) in types.iter().enumerate() {
            let f = fl.get(i).map(|s| parse_num(s)).unwrap_or(0);
            let sid = sids.get(i).map(|s| parse_num(s)).unwrap_or(0);
            match *ty {
                "1" => evs.push(ev(WireKind::Headers {
                    stream: sid,
                    end_stream: f & 1 != 0,
                })),
                "3" => {
                    let code = rerr.get(ri).map(|s| parse_num(s)).unwrap_or(u32::MAX);
                    ri += 1;
                    evs.push(ev(WireKind::RstStream { stream: sid, code }));
                }
                "4" => evs.push(ev(WireKind::Settings { ack: f & 1 != 0 })),
                "6" => evs.push(ev(WireKind::Ping { ack: f & 1 != 0 })),
                "7" => {
                    let code = gerr.get(gi).map(|s| parse_num(s)).unwrap_or(u32::MAX);
                    let last_stream_id = glsid.get(gi).map(|s| parse_num(s)).unwrap_or(0);
                    let debug = gdata.get(gi).map(|s| unhex(s)).unwrap_or_default();
                    gi += 1;
                    evs.push(ev(WireKind::Goaway {
                        code,
                        last_stream_id,
                        debug,
                    }));
                }
                _ => {}
            }
        }
        if flags.contains('F') {
            evs.push(ev(WireKind::Fin));
        }
        if flags.contains('R') {
            evs.push(ev(WireKind::Rst));
        }
    }
    Ok(evs)
}

fn parse_num(s: &str) -> u32 {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).unwrap_or(u32::MAX),
        None => s.parse().unwrap_or(u32::MAX),
    }
}

fn unhex(s: &str) -> String {
    let h: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    let bytes: Vec<u8> = (0..h.len() / 2)
        .filter_map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_and_numbers() {
        assert_eq!(super::unhex("6d61785f616765"), "max_age");
        assert_eq!(super::unhex("6d:61"), "ma");
        assert_eq!(super::parse_num("0x0b"), 11);
        assert_eq!(super::parse_num("2147483647"), 2147483647);
    }
}
