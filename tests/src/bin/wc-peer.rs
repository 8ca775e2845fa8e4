//! `wc-peer`: a line-driven TCP endpoint for the whoclosed end-to-end tests.
//!
//! Usage:
//!   wc-peer listen  <addr:port>   prints `pid <n>`, `listening <local>`, then (when a
//!                                 connection arrives) `accepted <peer>`; the listening
//!                                 socket is closed right after the first accept.
//!   wc-peer connect <addr:port>   prints `pid <n>`, then `connected <local>` (or
//!                                 `error <text>` and exits 1).
//!   wc-peer churn   <addr:port>   prints `pid <n>`, `listening <local>`; then only two
//!                                 commands: `churn <n> <k>` connects to itself n times
//!                                 (one byte from the client, read by the server), closes
//!                                 every connection but each k-th, which it holds, both ends
//!                                 -> `held <connections held so far>`; and `exit`.
//!
//! Then one command per stdin line, one response line each on stdout:
//!   send <n>            write n bytes                          -> `sent <n>`
//!   read <n>            read exactly n bytes                   -> `read <n>`
//!   wait-eof            read (discarding) until the peer's FIN -> `eof <discarded bytes>`
//!   shutdown            shutdown(SHUT_WR)                      -> `shutdown`
//!   close               close the socket                       -> `closed`
//!   abort               SO_LINGER{1,0} then close (RST)        -> `aborted`
//!   recvq               bytes in the receive queue (FIONREAD)  -> `recvq <n>`
//!   wait-recvq <n> [ms] wait until >= n bytes are queued       -> `recvq <n>`
//!   pid                                                        -> `pid <n>`
//!   exit                                                       -> `bye`, exit 0
//! Any failure is reported as `error <text>` (e.g. `error Connection reset by peer (os
//! error 104)`); socket errors never make the process panic. EOF on stdin exits.
//!
//! With `WC_PEER_HOLD=1` in its environment it waits, after `pid <n>`, for a `go` line
//! before it makes its socket: time for the harness to move it into a cgroup (a socket
//! belongs to its creator's cgroup, an accepted one to its listener's). `ip netns exec`
//! mounts a sysfs of its own, without the cgroup mounts, so it cannot do that itself.

use std::io::{self, BufRead, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

fn say(line: &str) {
    let mut out = io::stdout().lock();
    // If the harness went away there is nobody to report to; just exit.
    if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
        std::process::exit(0);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: wc-peer listen|connect <addr:port>");
        std::process::exit(2);
    }
    let addr: SocketAddr = match args[2].parse() {
        Ok(a) => a,
        Err(e) => {
            say(&format!("error bad address {:?}: {e}", args[2]));
            std::process::exit(2);
        }
    };
    say(&format!("pid {}", std::process::id()));
    if std::env::var_os("WC_PEER_HOLD").is_some() {
        let mut line = String::new();
        if io::stdin().lock().read_line(&mut line).is_err() || line.trim() != "go" {
            say(&format!("error expected `go`, got {:?}", line.trim()));
            std::process::exit(2);
        }
    }
    let stream = match args[1].as_str() {
        "churn" => churn(addr),
        "listen" => listen(addr),
        "connect" => connect(addr),
        other => {
            say(&format!("error unknown mode {other:?}"));
            std::process::exit(2);
        }
    };
    let stream = match stream {
        Ok(s) => s,
        Err(e) => {
            say(&format!("error {e}"));
            std::process::exit(1);
        }
    };
    serve(stream);
}

/// The `churn` mode: a listener, and connections to it made, closed or held on command.
fn churn(addr: SocketAddr) -> ! {
    let listener = match TcpListener::bind(addr).and_then(|l| Ok((l.local_addr()?, l))) {
        Ok((local, l)) => {
            say(&format!("listening {local}"));
            l
        }
        Err(e) => {
            say(&format!("error {e}"));
            std::process::exit(1);
        }
    };
    let mut held: Vec<(TcpStream, TcpStream)> = Vec::new();
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.split_first() {
            Some((&"churn", rest)) => {
                let reply = (|| -> io::Result<String> {
                    let n = num(rest, 0)?;
                    let k = num(rest, 1)?.max(1);
                    let to = listener.local_addr()?;
                    for i in 0..n {
                        let mut c = TcpStream::connect(to)?;
                        let (mut s, _) = listener.accept()?;
                        c.write_all(b"x")?;
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b)?;
                        if i % k == 0 {
                            held.push((c, s));
                        }
                    }
                    Ok(format!("held {}", held.len()))
                })();
                match reply {
                    Ok(r) => say(&r),
                    Err(e) => say(&format!("error {e}")),
                }
            }
            Some((&"exit", _)) => {
                say("bye");
                std::process::exit(0);
            }
            Some((cmd, _)) => say(&format!("error unknown command {cmd:?} in churn mode")),
            None => {}
        }
    }
    std::process::exit(0);
}

fn listen(addr: SocketAddr) -> io::Result<TcpStream> {
    let listener = TcpListener::bind(addr)?;
    say(&format!("listening {}", listener.local_addr()?));
    let (stream, peer) = listener.accept()?;
    drop(listener);
    say(&format!("accepted {peer}"));
    Ok(stream)
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(20))?;
    say(&format!("connected {}", stream.local_addr()?));
    Ok(stream)
}

fn serve(stream: TcpStream) {
    let mut sock = Some(stream);
    let stdin = io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((&cmd, rest)) = words.split_first() else {
            continue;
        };
        let reply = match cmd {
            "pid" => Ok(format!("pid {}", std::process::id())),
            "exit" => {
                say("bye");
                std::process::exit(0);
            }
            _ => run(&mut sock, cmd, rest),
        };
        match reply {
            Ok(r) => say(&r),
            Err(e) => say(&format!("error {e}")),
        }
    }
}

fn num(rest: &[&str], i: usize) -> io::Result<usize> {
    rest.get(i)
        .ok_or_else(|| io::Error::other("missing number"))?
        .parse()
        .map_err(|e| io::Error::other(format!("bad number: {e}")))
}

fn run(sock: &mut Option<TcpStream>, cmd: &str, rest: &[&str]) -> io::Result<String> {
    let s = sock
        .as_mut()
        .ok_or_else(|| io::Error::other("no socket (already closed)"))?;
    match cmd {
        "sendhex" => {
            // Exact bytes (e.g. an HTTP/2 frame) in one write.
            let hex = rest.first().copied().unwrap_or("");
            let bytes = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("zz"), 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|e| io::Error::other(format!("bad hex: {e}")))?;
            s.write_all(&bytes)?;
            Ok(format!("sent {}", bytes.len()))
        }
        "senddata" => {
            // `senddata FRAMES LEN`: that many HTTP/2 DATA frames (stream 1, no flags) of
            // LEN payload bytes each, in one write (bulk HTTP/2 in a few large segments).
            let frames = num(rest, 0)?;
            let len = num(rest, 1)?.min(0x00ff_ffff);
            let l = (len as u32).to_be_bytes();
            let mut buf = Vec::with_capacity(frames * (9 + len));
            for _ in 0..frames {
                buf.extend_from_slice(&[l[1], l[2], l[3], 0, 0, 0, 0, 0, 1]);
                buf.resize(buf.len() + len, b'd');
            }
            s.write_all(&buf)?;
            Ok(format!("sent {}", buf.len()))
        }
        "send" => {
            let n = num(rest, 0)?;
            s.write_all(&vec![b'x'; n])?;
            Ok(format!("sent {n}"))
        }
        "read" => {
            let n = num(rest, 0)?;
            let mut buf = vec![0u8; n];
            let mut got = 0;
            while got < n {
                match s.read(&mut buf[got..]) {
                    Ok(0) => {
                        return Err(io::Error::other(format!(
                            "unexpected eof after {got} of {n} bytes"
                        )));
                    }
                    Ok(k) => got += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(format!("read {n}"))
        }
        "wait-eof" => {
            let mut buf = [0u8; 4096];
            let mut total = 0usize;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return Ok(format!("eof {total}")),
                    Ok(k) => total += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        "shutdown" => {
            s.shutdown(Shutdown::Write)?;
            Ok("shutdown".into())
        }
        "close" => {
            *sock = None;
            Ok("closed".into())
        }
        "abort" => {
            let lg = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: valid fd owned by `s`, pointer/len describe a live `linger`.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&lg as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            *sock = None;
            Ok("aborted".into())
        }
        "recvq" => Ok(format!("recvq {}", recvq(s)?)),
        "wait-recvq" => {
            let n = num(rest, 0)?;
            let ms = if rest.len() > 1 {
                num(rest, 1)?
            } else {
                10_000
            };
            let deadline = Instant::now() + Duration::from_millis(ms as u64);
            loop {
                let q = recvq(s)?;
                if q >= n {
                    return Ok(format!("recvq {q}"));
                }
                if Instant::now() >= deadline {
                    return Err(io::Error::other(format!(
                        "timeout: {q} of {n} bytes queued after {ms} ms"
                    )));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        other => Err(io::Error::other(format!("unknown command {other:?}"))),
    }
}

fn recvq(s: &TcpStream) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}
