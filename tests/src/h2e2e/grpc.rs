//! The grpcio scenarios (Python peers in `tests/peers/`) and what the agent must say about
//! each. The `scenario_*` functions are shared with the wire cross-checks.

use super::verdict::{
    Goaway, check, check_goaway, check_pair, check_pid, check_same_story, check_synced, fail,
    goaway_count, ms_numbers, num, s, wait_close,
};
use super::{CHANNEL_TIMEOUT, GRPC_PORT};
use crate::h2peers::{GrpcClient, GrpcServer};
use crate::{Agent, Expect, Topology};
use serde_json::Value;
use std::time::Duration;

// ---- What grpcio 1.85.1 (C-core) sends; checked without the agent by the wire_* tests.

/// `grpc.max_connection_idle_ms`: one GOAWAY, INTERNAL_ERROR (not NO_ERROR), this text,
/// last_stream_id = last stream, then the server's FIN ~0.1 ms later.
pub const IDLE_GOAWAY: (&str, u64, &str) = ("INTERNAL_ERROR", 2, "connection idle");
/// `grpc.max_connection_age_ms`: GOAWAY(NO_ERROR, 2^31-1, "max_age") + PING, the client's
/// PING ack, GOAWAY(NO_ERROR, last stream, "max_age"), server FIN.
pub const MAX_AGE_DEBUG: &str = "max_age";
/// Ping enforcement: GOAWAY(ENHANCE_YOUR_CALM, last stream, "too_many_pings"), server FIN.
pub const TOO_MANY_PINGS: (&str, u64, &str) = ("ENHANCE_YOUR_CALM", 11, "too_many_pings");
pub const MAX_STREAM_ID: u64 = 0x7fff_ffff;
pub const NO_OPTS: &[(&str, i64)] = &[];

/// A grpc server in the server namespace and a client in the client namespace.
pub struct Grpc {
    pub server: GrpcServer,
    pub client: GrpcClient,
    /// Client socket address as the server saw it (set by the first call).
    pub client_addr: String,
    pub server_addr: String,
    pub client_ns: u64,
    pub server_ns: u64,
}

impl Grpc {
    pub fn start(
        t: &Topology,
        v6: bool,
        server_opts: &[(&str, i64)],
        client_opts: &[(&str, i64)],
    ) -> Grpc {
        let addr = t.server_addr(v6, GRPC_PORT);
        let server =
            GrpcServer::spawn(&t.server, addr, server_opts).unwrap_or_else(|e| panic!("{e:#}"));
        let client =
            GrpcClient::spawn(&t.client, addr, client_opts).unwrap_or_else(|e| panic!("{e:#}"));
        Grpc {
            server,
            client,
            client_addr: String::new(),
            server_addr: addr.to_string(),
            client_ns: t.client_inode().expect("client netns inode"),
            server_ns: t.server_inode().expect("server netns inode"),
        }
    }

    /// `n` unary calls on the channel's (single) connection.
    pub fn call(&mut self, n: u32) {
        let local = self.client.call(n).unwrap_or_else(|e| panic!("{e:#}"));
        if self.client_addr.is_empty() {
            self.client_addr = local;
        } else {
            assert_eq!(
                local, self.client_addr,
                "the channel reconnected unexpectedly"
            );
        }
    }

    /// Waits until the client channel left READY (it got a GOAWAY, or its transport died).
    pub fn wait_channel_down(&mut self) -> String {
        self.client
            .wait_down(CHANNEL_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn client_close(&self, agent: &mut Agent) -> Value {
        wait_close(
            agent,
            self.client_ns,
            Some(&self.client_addr),
            Some(&self.server_addr),
        )
    }

    pub fn server_close(&self, agent: &mut Agent) -> Value {
        wait_close(
            agent,
            self.server_ns,
            Some(&self.server_addr),
            Some(&self.client_addr),
        )
    }

    /// Both ends' close objects: the client's, then the server's.
    pub fn closes(&self, agent: &mut Agent) -> (Value, Value) {
        let c = self.client_close(agent);
        let sv = self.server_close(agent);
        (c, sv)
    }

    pub fn client_expect(&self) -> Expect {
        Expect {
            role: Some("client"),
            preexisting: Some(false),
            netns: Some(self.client_ns),
            ..Expect::default()
        }
    }

    pub fn server_expect(&self) -> Expect {
        Expect {
            role: Some("server"),
            preexisting: Some(false),
            netns: Some(self.server_ns),
            ..Expect::default()
        }
    }
}

/// Case 1: the server's `max_connection_idle` ends an idle connection.
pub fn scenario_max_idle(t: &Topology) -> Grpc {
    let mut g = Grpc::start(t, false, &[("grpc.max_connection_idle_ms", 1000)], NO_OPTS);
    g.call(1);
    g.wait_channel_down();
    g
}

/// Case 2: the server's `max_connection_age` (with grace) ends an idle connection.
pub fn scenario_max_age(t: &Topology) -> Grpc {
    let mut g = Grpc::start(
        t,
        false,
        &[
            ("grpc.max_connection_age_ms", 1000),
            ("grpc.max_connection_age_grace_ms", 500),
        ],
        NO_OPTS,
    );
    g.call(1);
    g.wait_channel_down();
    g
}

/// Case 3: a client pinging more often than the server permits gets ENHANCE_YOUR_CALM.
/// grpc C-core never sends keepalive PINGs less than 1 s apart without data, so the client
/// pings every ~1000 ms despite `keepalive_time_ms=200`; still 5x too often.
pub fn scenario_too_many_pings(t: &Topology) -> Grpc {
    let mut g = Grpc::start(
        t,
        false,
        &[("grpc.http2.min_ping_interval_without_data_ms", 5000)],
        &[
            ("grpc.keepalive_time_ms", 200),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    );
    g.call(1);
    g.wait_channel_down();
    g
}

/// Case 4: the client closes its channel (no GOAWAY from grpcio: just a FIN).
pub fn scenario_client_close(t: &Topology) -> Grpc {
    let mut g = Grpc::start(t, false, NO_OPTS, NO_OPTS);
    g.call(3);
    g.client.close_channel().unwrap_or_else(|e| panic!("{e:#}"));
    g
}

/// Case 5: the path is blackholed; the client's keepalive PING goes unanswered. grpcio
/// sets TCP_USER_TIMEOUT = keepalive_timeout_ms on its socket, and the kernel's timeout
/// (ETIMEDOUT) fires before grpc's own ping watchdog: no FIN, RST or GOAWAY leaves the
/// client.
pub fn scenario_keepalive_blackhole(t: &Topology) -> Grpc {
    let mut g = Grpc::start(
        t,
        false,
        NO_OPTS,
        &[
            ("grpc.keepalive_time_ms", 1000),
            ("grpc.keepalive_timeout_ms", 1000),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    );
    g.call(1);
    t.router_iptables(&["-I", "FORWARD", "-j", "DROP"])
        .expect("insert DROP rule in the router");
    g.wait_channel_down();
    g
}

/// Case 6: the client cancels one call (RST_STREAM CANCEL), makes another, closes.
pub fn scenario_stream_cancel(t: &Topology) -> Grpc {
    let mut g = Grpc::start(t, false, NO_OPTS, NO_OPTS);
    g.call(1);
    g.client
        .slow_cancel(5000, Duration::from_millis(300))
        .unwrap_or_else(|e| panic!("{e:#}"));
    g.server
        .wait_cancelled(1, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    g.call(1);
    g.client.close_channel().unwrap_or_else(|e| panic!("{e:#}"));
    g
}

// ---- What each case's close objects must say.

/// Case 1: both ends blame the server's idle timeout and carry its one GOAWAY.
pub fn check_max_idle(g: &Grpc, c: &Value, sv: &Value) {
    for (obj, e, dir, pid) in [
        (c, g.client_expect(), "received", g.client.pid()),
        (sv, g.server_expect(), "sent", g.server.pid()),
    ] {
        check(
            obj,
            &Expect {
                closed_by: Some("server"),
                reason: Some("server_idle_timeout"),
                ..e
            },
        );
        check_pid(obj, pid);
        check_synced(obj);
        check_goaway(
            obj,
            0,
            &Goaway {
                dir,
                error_code: IDLE_GOAWAY.0,
                code: IDLE_GOAWAY.1,
                last_stream_id: Some(1),
                debug: IDLE_GOAWAY.2,
            },
        );
    }
    check_same_story(c, sv);
    check_pair(c, sv);
}

/// Case 2: grpc's two-GOAWAY drain (GOAWAY 2^31-1 + PING, ack, GOAWAY last-stream). The
/// client usually closes its idle transport on the first GOAWAY, so its FIN often precedes
/// the second GOAWAY, which its kernel then answers with a RST: the L4 initiator and
/// mechanism vary, the L7 verdict must not. When the client's PING ack and FIN reach the
/// server in one read, the server closes on the FIN without sending the second GOAWAY
/// at all (seen once: one GOAWAY on both sockets, no RST), so one is enough on either
/// side; the client never sees more than the server sent.
pub fn check_max_age(g: &Grpc, c: &Value, sv: &Value) {
    for (obj, e, dir, need) in [
        (c, g.client_expect(), "received", 1),
        (sv, g.server_expect(), "sent", 1),
    ] {
        check(
            obj,
            &Expect {
                closed_by: Some("server"),
                reason: Some("server_max_age"),
                ..e
            },
        );
        check_synced(obj);
        let n = goaway_count(obj);
        if n < need || n > 2 {
            fail(obj, &format!("expected {need}..=2 GOAWAYs, got {n}"));
        }
        for (i, lsid) in [(0, MAX_STREAM_ID), (1, 1)].into_iter().take(n) {
            check_goaway(
                obj,
                i,
                &Goaway {
                    dir,
                    error_code: "NO_ERROR",
                    code: 0,
                    last_stream_id: Some(lsid),
                    debug: MAX_AGE_DEBUG,
                },
            );
        }
        if n == 2 && num(obj, "/h2/goaways/1/at_ms") < num(obj, "/h2/goaways/0/at_ms") {
            fail(obj, "GOAWAYs out of order");
        }
    }
    if goaway_count(c) > goaway_count(sv) {
        fail(c, "the client received more GOAWAYs than the server sent");
    }
    // The drain PING: sent with the first GOAWAY by the server, acked by the client.
    if num(sv, "/h2/pings/sent") < 1.0 || num(sv, "/h2/pings/acks_received") < 1.0 {
        fail(
            sv,
            "the server's drain PING (sent with the first GOAWAY) and its ack",
        );
    }
    check_same_story(c, sv);
    check_pair(c, sv);
}

/// Case 3: ENHANCE_YOUR_CALM "too_many_pings", the hint naming the client's PING interval,
/// the strikes counted on both ends.
pub fn check_too_many_pings(g: &Grpc, c: &Value, sv: &Value) {
    for (obj, e, dir) in [
        (c, g.client_expect(), "received"),
        (sv, g.server_expect(), "sent"),
    ] {
        check(
            obj,
            &Expect {
                closed_by: Some("server"),
                reason: Some("server_too_many_pings"),
                ..e
            },
        );
        check_synced(obj);
        check_goaway(
            obj,
            0,
            &Goaway {
                dir,
                error_code: TOO_MANY_PINGS.0,
                code: TOO_MANY_PINGS.1,
                last_stream_id: Some(1),
                debug: TOO_MANY_PINGS.2,
            },
        );
        // The hint names the client's PING interval (~1000 ms on the wire, see
        // scenario_too_many_pings); lenient on the value.
        let hint = s(obj, "/verdict/hint").as_str().unwrap_or("");
        let ms = ms_numbers(hint);
        if !ms.iter().any(|v| (150.0..=2000.0).contains(v)) {
            fail(
                obj,
                &format!("verdict.hint should name the client's PING interval in ms; found {ms:?}"),
            );
        }
    }
    // Three keepalive PINGs (strikes) from the client, ~1 s apart.
    if num(c, "/h2/pings/sent") < 3.0 || num(sv, "/h2/pings/received") < 3.0 {
        fail(
            c,
            &format!("expected >= 3 client PINGs (client object below; server: {sv})"),
        );
    }
    let iv = num(c, "/h2/pings/min_interval_ms_sent");
    if !(100.0..=1500.0).contains(&iv) {
        fail(c, &format!("min_interval_ms_sent {iv} not in 100..=1500"));
    }
    let iv = num(sv, "/h2/pings/min_interval_ms_received");
    if !(100.0..=1500.0).contains(&iv) {
        fail(
            sv,
            &format!("min_interval_ms_received {iv} not in 100..=1500"),
        );
    }
    check_same_story(c, sv);
    check_pair(c, sv);
}

/// Case 4: grpcio sends no GOAWAY on `channel.close()`, only a FIN, so the verdict is the
/// TCP-level `client_close`.
pub fn check_client_close(g: &Grpc, c: &Value, sv: &Value) {
    for (obj, e, ini) in [
        (c, g.client_expect(), "local"),
        (sv, g.server_expect(), "remote"),
    ] {
        check(
            obj,
            &Expect {
                closed_by: Some("client"),
                reason: Some("client_close"),
                tcp_initiator: Some(ini),
                mechanism: Some("fin"),
                ..e
            },
        );
        check_synced(obj);
        if goaway_count(obj) != 0 {
            fail(obj, "grpcio sends no GOAWAY on channel.close()");
        }
    }
    check_pid(c, g.client.pid());
    check_same_story(c, sv);
    check_pair(c, sv);
}

/// Case 5: the client's keepalive gave up behind the blackhole while the server socket
/// (traced on this host) was still open: the path ended it, detected by the client.
pub fn check_keepalive_blackhole(g: &Grpc, c: &Value) {
    check(
        c,
        &Expect {
            closed_by: Some("middlebox"),
            reason: Some("path_blackhole"),
            tcp_initiator: Some("local"),
            // ETIMEDOUT from the TCP_USER_TIMEOUT grpcio sets; nothing is sent.
            mechanism: Some("timeout"),
            ..g.client_expect()
        },
    );
    check_synced(c);
    if c.pointer("/verdict/middlebox/kind").and_then(Value::as_str) != Some("path")
        || c.pointer("/verdict/middlebox/detected_by")
            .and_then(Value::as_str)
            != Some("client")
    {
        fail(
            c,
            "expected verdict.middlebox {kind: path, detected_by: client}",
        );
    }
    if num(c, "/h2/pings/unanswered_sent") < 1.0 {
        fail(c, "expected h2.pings.unanswered_sent >= 1");
    }
    if goaway_count(c) != 0 {
        fail(c, "nothing (no GOAWAY) leaves the client in this case");
    }
}

/// Case 6: the cancelled call shows as RST_STREAM(CANCEL); the connection still ends with
/// the client's close.
pub fn check_stream_cancel(g: &Grpc, c: &Value, sv: &Value) {
    for (obj, e, ini, side) in [
        (c, g.client_expect(), "local", "sent"),
        (sv, g.server_expect(), "remote", "received"),
    ] {
        check(
            obj,
            &Expect {
                closed_by: Some("client"),
                reason: Some("client_close"),
                tcp_initiator: Some(ini),
                mechanism: Some("fin"),
                ..e
            },
        );
        check_synced(obj);
        let ptr = format!("/h2/rst_streams/{side}/CANCEL");
        if num(obj, &ptr) < 1.0 {
            fail(obj, &format!("expected {ptr} >= 1"));
        }
        if goaway_count(obj) != 0 {
            fail(obj, "no GOAWAY in this case");
        }
    }
    check_same_story(c, sv);
    check_pair(c, sv);
}
