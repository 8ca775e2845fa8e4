//! The nghttp2 scenarios (`nghttpd` serving a docroot, `nghttp` / `h2load` fetching) and
//! what the agent must say about them. nghttp ends with GOAWAY(NO_ERROR) and a FIN, so
//! every close is the client's at L7.

use super::HTTP_PORT;
use super::verdict::{
    Goaway, check, check_goaway, check_pair, check_same_story, check_synced, fail, goaway_count,
    num, wait_close, wait_closes,
};
use crate::h2peers::{DocRoot, Nghttpd, h2load, nghttp_get};
use crate::{Agent, Expect, Topology};
use serde_json::Value;
use std::time::Duration;

/// Size of the bulk download.
pub const BIG: u64 = 100 * 1024 * 1024;

/// nghttpd in the server namespace, `nghttp -n` fetching `path` from the client namespace.
pub struct Fetch {
    pub server_addr: String,
    pub client_ns: u64,
    pub server_ns: u64,
    pub elapsed: Duration,
}

/// Serves `docroot`, fetches `path` over IPv6 if `v6`, stops nghttpd.
pub fn scenario_nghttp(t: &Topology, v6: bool, path: &str, docroot: &DocRoot) -> Fetch {
    let addr = t.server_addr(v6, HTTP_PORT);
    let d = Nghttpd::spawn(&t.server, addr, docroot).unwrap_or_else(|e| panic!("{e:#}"));
    let run = nghttp_get(&t.client, &d.url(path), Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e:#}"));
    // Leave nghttpd running: its socket closes on the client's GOAWAY/FIN, not on exit.
    std::thread::sleep(Duration::from_millis(200));
    d.stop();
    Fetch {
        server_addr: addr.to_string(),
        client_ns: t.client_inode().expect("inode"),
        server_ns: t.server_inode().expect("inode"),
        elapsed: run.elapsed,
    }
}

/// Checks of an nghttp fetch: nghttp ends with GOAWAY(NO_ERROR, last_stream_id 0, no
/// debug data), shutdown(SHUT_WR), close; nghttpd answers the GOAWAY with its own FIN,
/// so which FIN is first is a race (usually the client's).
pub fn check_nghttp_fetch(agent: &mut Agent, f: &Fetch) {
    let c = wait_close(agent, f.client_ns, None, Some(&f.server_addr));
    let sv = wait_close(agent, f.server_ns, Some(&f.server_addr), None);
    for (obj, role, dir) in [(&c, "client", "sent"), (&sv, "server", "received")] {
        check(
            obj,
            &Expect {
                role: Some(role),
                preexisting: Some(false),
                closed_by: Some("client"),
                reason: Some("client_goaway"),
                ..Expect::default()
            },
        );
        check_synced(obj);
        if goaway_count(obj) != 1 {
            fail(obj, "expected exactly nghttp's GOAWAY");
        }
        check_goaway(
            obj,
            0,
            &Goaway {
                dir,
                error_code: "NO_ERROR",
                code: 0,
                last_stream_id: Some(0),
                debug: "",
            },
        );
        if num(obj, "/h2/streams_open_at_close") != 0.0 {
            fail(obj, "every stream had ended before the close");
        }
    }
    check_same_story(&c, &sv);
    check_pair(&c, &sv);
}

/// Case 7b: the client's close object is an IPv6 one.
pub fn check_ipv6_family(agent: &mut Agent, f: &Fetch) {
    let c = wait_close(agent, f.client_ns, None, Some(&f.server_addr));
    assert_eq!(c["conn"]["family"], "ipv6", "{c}");
}

/// Case 8: `h2load -n <requests> -c <conns>` against nghttpd; returns the client and the
/// server sockets' close objects (`conns` of each).
pub fn h2load_closes(
    t: &Topology,
    agent: &mut Agent,
    docroot: &DocRoot,
    requests: u32,
    conns: u32,
) -> (Vec<Value>, Vec<Value>) {
    let addr = t.server_addr(false, HTTP_PORT);
    let d = Nghttpd::spawn(&t.server, addr, docroot).unwrap_or_else(|e| panic!("{e:#}"));
    h2load(
        &t.client,
        &d.url("small"),
        requests,
        conns,
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let server_addr = addr.to_string();
    let (cns, sns) = (
        t.client_inode().expect("inode"),
        t.server_inode().expect("inode"),
    );
    let n = conns as usize;
    let cs = wait_closes(agent, n, cns, None, Some(&server_addr));
    let ss = wait_closes(agent, n, sns, Some(&server_addr), None);
    d.stop();
    (cs, ss)
}

/// Case 8: every h2load connection is tracked in sync and ends with its GOAWAY.
pub fn check_h2load(cs: &[Value], ss: &[Value]) {
    for (obj, dir) in cs
        .iter()
        .map(|o| (o, "sent"))
        .chain(ss.iter().map(|o| (o, "received")))
    {
        check(
            obj,
            &Expect {
                closed_by: Some("client"),
                reason: Some("client_goaway"),
                ..Expect::default()
            },
        );
        check_synced(obj);
        check_goaway(
            obj,
            0,
            &Goaway {
                dir,
                error_code: "NO_ERROR",
                code: 0,
                last_stream_id: None,
                debug: "",
            },
        );
    }
}
