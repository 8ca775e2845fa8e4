//! Where frames sit in segments: many small frames in one segment (the walker's
//! continuation programs), and bulk DATA in GSO packets larger than 64 KiB. Raw frames
//! written by two `wc-peer`s, so the bytes and the write boundaries are exact.

use super::TCP_PORT;
use super::verdict::wait_close;
use crate::{Agent, Peer, Topology};
use serde_json::Value;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

/// An empty SETTINGS frame: what a server opens HTTP/2 with (syncs the client's walker).
pub const SETTINGS: &str = "000000040000000000";
/// One PING (opaque 0102030405060708): 17 bytes.
const PING: &str = "0000080601000000000102030405060708";
/// GOAWAY(last_stream 0, NO_ERROR, debug "max_idle"), what grpc-go's idle timeout sends.
pub const GOAWAY_MAX_IDLE: &str = concat!(
    "000010",
    "07",
    "00",
    "00000000", // length 16, GOAWAY, no flags, stream 0
    "00000000",
    "00000000",         // last stream 0, NO_ERROR
    "6d61785f69646c65", // "max_idle"
);
const PEER_TIMEOUT: Duration = Duration::from_secs(20);

/// Where a connection of a case runs: between the namespaces over veth (a segment holds at
/// most 1,448 bytes), or on loopback inside the server's namespace (64 KiB and more).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    Veth,
    Loopback,
    /// Loopback over IPv6 (`::1`) in the server's namespace.
    Loopback6,
}

/// A connected pair and the address the client dialled.
fn pair(peer_bin: &Path, t: &Topology, link: Link, port: u16) -> (Peer, Peer, SocketAddr) {
    let (ns, addr): (&str, SocketAddr) = match link {
        Link::Veth => (&t.client, t.server_addr(false, port)),
        Link::Loopback => (&t.server, (Ipv4Addr::LOCALHOST, port).into()),
        Link::Loopback6 => (&t.server, (Ipv6Addr::LOCALHOST, port).into()),
    };
    let mut server = Peer::listen(peer_bin, &t.server, addr).expect("start server");
    let client = Peer::connect(peer_bin, ns, addr).expect("client connect");
    server
        .wait_accepted(Duration::from_secs(10))
        .expect("server accepts");
    (client, server, addr)
}

fn netns(t: &Topology, link: Link, server_side: bool) -> u64 {
    if server_side || link != Link::Veth {
        t.server_inode().expect("server inode")
    } else {
        t.client_inode().expect("client inode")
    }
}

/// Whether `obj`'s evidence holds the max_idle GOAWAY, sent or received.
pub fn has_goaway(obj: &Value, what: &str) -> bool {
    obj["evidence"].as_array().is_some_and(|ev| {
        ev.iter()
            .any(|e| e["what"] == what && e["debug"] == "max_idle")
    })
}

/// The server writes SETTINGS, then `pings` PINGs and a GOAWAY in one write, then closes;
/// returns the client's close object.
pub fn pings_then_goaway(
    peer_bin: &Path,
    t: &Topology,
    agent: &mut Agent,
    pings: usize,
    link: Link,
) -> Value {
    let (mut client, mut server, addr) = pair(peer_bin, t, link, TCP_PORT);
    server.send_hex(SETTINGS).expect("server settings");
    client.read(9).expect("client reads settings");
    let mut hex = PING.repeat(pings);
    hex.push_str(GOAWAY_MAX_IDLE);
    server.send_hex(&hex).expect("frames");
    client.read(17 * pings + 25).expect("client reads frames");
    close_both(agent, t, link, client, server, addr, false)
}

/// The server closes first, then the client; returns the close object of the client
/// (`server_side` false) or of the server.
fn close_both(
    agent: &mut Agent,
    t: &Topology,
    link: Link,
    mut client: Peer,
    mut server: Peer,
    addr: SocketAddr,
    server_side: bool,
) -> Value {
    server.close().expect("server close");
    client.wait_eof().expect("client sees FIN");
    client.close().expect("client close");
    let (cl, sa) = (client.local.to_string(), addr.to_string());
    let (local, remote) = if server_side { (&sa, &cl) } else { (&cl, &sa) };
    let obj = wait_close(
        agent,
        netns(t, link, server_side),
        Some(local),
        Some(remote),
    );
    let _ = server.exit();
    let _ = client.exit();
    obj
}

/// Lets the server namespace's loopback build IPv6 GSO packets of up to 192 KiB (BIG TCP,
/// Linux 6.0+; IPv4 loopback builds them unasked from 6.3). Whether the kernel inserts a
/// Hop-by-Hop Jumbo header into those packets (6.0 to 6.19) or only zeroes the payload
/// length (7.0+) is the kernel's business: the walker must take both. False when the
/// kernel refuses the size (older than 6.0).
pub fn big_tcp_on_server_loopback(t: &Topology) -> bool {
    t.ip(
        &t.server,
        &["link", "set", "dev", "lo", "gso_max_size", "196608"],
    )
    .is_ok()
}

/// On loopback (`link`): SETTINGS, then `frames` DATA frames of `len` bytes in one write
/// (the write blocks until the client has read most of it, so it runs on another thread),
/// a GOAWAY, and the server's close; returns the server's close object.
pub fn bulk_data_then_goaway(
    peer_bin: &Path,
    t: &Topology,
    agent: &mut Agent,
    link: Link,
    frames: usize,
    len: usize,
) -> Value {
    let port = if link == Link::Loopback6 {
        TCP_PORT + 2
    } else {
        TCP_PORT + 1
    };
    let (mut client, mut server, addr) = pair(peer_bin, t, link, port);
    server.send_hex(SETTINGS).expect("server settings");
    client.read(9).expect("client reads settings");
    let writer = std::thread::spawn(move || {
        server
            .command(&format!("senddata {frames} {len}"), "sent", PEER_TIMEOUT)
            .expect("bulk DATA");
        server.send_hex(GOAWAY_MAX_IDLE).expect("goaway");
        server
    });
    client
        .read(frames * (9 + len) + 25)
        .expect("client reads everything");
    let server = writer.join().expect("writer thread");
    close_both(agent, t, link, client, server, addr, true)
}
