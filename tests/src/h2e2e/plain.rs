//! The control case: a plain TCP connection carrying non-HTTP/2 bytes (two `wc-peer`s),
//! which the HTTP/2 tracker must call `not_h2` without changing the TCP verdict.

use super::TCP_PORT;
use super::verdict::{check, check_pair, fail, h2, wait_close};
use crate::{Agent, Expect, Peer, PidCheck, Topology};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Client sends 100 bytes, server answers 50, client closes first, then the server.
/// Returns both ends' close objects and their pids.
pub fn exchange(peer_bin: &Path, t: &Topology, agent: &mut Agent) -> ((Value, u32), (Value, u32)) {
    let addr: SocketAddr = t.server_addr(false, TCP_PORT);
    let mut server = Peer::listen(peer_bin, &t.server, addr).expect("start server");
    let mut client = Peer::connect(peer_bin, &t.client, addr).expect("client connect");
    server
        .wait_accepted(Duration::from_secs(10))
        .expect("accept");
    client.send(100).expect("client send");
    server.read(100).expect("server read");
    server.send(50).expect("server send");
    client.read(50).expect("client read");
    client.close().expect("client close");
    server.wait_eof().expect("server sees FIN");
    server.close().expect("server close");

    let (cl, sa) = (client.local.to_string(), addr.to_string());
    let c = wait_close(
        agent,
        t.client_inode().expect("inode"),
        Some(&cl),
        Some(&sa),
    );
    let sv = wait_close(
        agent,
        t.server_inode().expect("inode"),
        Some(&sa),
        Some(&cl),
    );
    ((c, client.pid()), (sv, server.pid()))
}

/// The client's close over IPv4, both ends `not_h2`, the client's pid exact.
pub fn check_not_h2(client: (&Value, u32), server: (&Value, u32)) {
    let (c, sv) = (client.0, server.0);
    for (obj, role, ini, pid) in [
        (c, "client", "local", client.1),
        (sv, "server", "remote", server.1),
    ] {
        check(
            obj,
            &Expect {
                family: Some("ipv4"),
                role: Some(role),
                closed_by: Some("client"),
                reason: Some("client_close"),
                tcp_initiator: Some(ini),
                mechanism: Some("fin"),
                ..Expect::default()
            },
        );
        if role == "client" {
            check(
                obj,
                &Expect {
                    pid: PidCheck::Exact(pid),
                    ..Expect::default()
                },
            );
        }
        if h2(obj)["state"] != "not_h2" {
            fail(obj, "expected h2.state \"not_h2\"");
        }
    }
    check_pair(c, sv);
}
