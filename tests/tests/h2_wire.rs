//! Wire cross-checks of the HTTP/2 scenarios: each runs WITHOUT the agent while tcpdump
//! captures in the client namespace, and tshark reads back what the peers sent (GOAWAY
//! codes and debug texts, PINGs, RST_STREAM, who sends the first FIN). They pin the peer
//! behaviour the agent cases in `e2e_h2.rs` and the classifier rules rely on (grpcio
//! 1.85.1, nghttp2 1.52). Need root and the peers; skipped when tcpdump/tshark are
//! missing (developer tools, not test dependencies; the VM guests carry neither).
//! `--nocapture` prints each timeline.

use std::time::Instant;
use tests::Topology;
use tests::h2e2e::wire::{self, capture};
use tests::h2e2e::{GRPC_PORT, HTTP_PORT, Need, grpc, nghttp, wire_prelude};
use tests::h2peers::DocRoot;

#[test]
fn wire_grpc_max_idle() {
    if !wire_prelude("wire_grpc_max_idle", Need::Grpc) {
        return;
    }
    let t = Topology::new().expect("topology");
    let (_g, evs) = capture("wire_grpc_max_idle", &t, GRPC_PORT, grpc::scenario_max_idle);
    wire::check_grpc_max_idle(&t, &evs);
}

#[test]
fn wire_grpc_max_age() {
    if !wire_prelude("wire_grpc_max_age", Need::Grpc) {
        return;
    }
    let t = Topology::new().expect("topology");
    let (_g, evs) = capture("wire_grpc_max_age", &t, GRPC_PORT, grpc::scenario_max_age);
    wire::check_grpc_max_age(&t, &evs);
}

#[test]
fn wire_grpc_too_many_pings() {
    if !wire_prelude("wire_grpc_too_many_pings", Need::Grpc) {
        return;
    }
    let t = Topology::new().expect("topology");
    let (_g, evs) = capture(
        "wire_grpc_too_many_pings",
        &t,
        GRPC_PORT,
        grpc::scenario_too_many_pings,
    );
    wire::check_grpc_too_many_pings(&t, &evs);
}

#[test]
fn wire_grpc_client_close() {
    if !wire_prelude("wire_grpc_client_close", Need::Grpc) {
        return;
    }
    let t = Topology::new().expect("topology");
    let (_g, evs) = capture(
        "wire_grpc_client_close",
        &t,
        GRPC_PORT,
        grpc::scenario_client_close,
    );
    wire::check_grpc_client_close(&t, &evs);
}

#[test]
fn wire_grpc_keepalive_blackhole() {
    if !wire_prelude("wire_grpc_keepalive_blackhole", Need::Grpc) {
        return;
    }
    let t = Topology::new().expect("topology");
    let started = Instant::now();
    let (_g, evs) = capture(
        "wire_grpc_keepalive_blackhole",
        &t,
        GRPC_PORT,
        grpc::scenario_keepalive_blackhole,
    );
    eprintln!("channel down after {:?}", started.elapsed());
    wire::check_grpc_keepalive_blackhole(&t, &evs);
}

#[test]
fn wire_grpc_stream_cancel() {
    if !wire_prelude("wire_grpc_stream_cancel", Need::Grpc) {
        return;
    }
    let t = Topology::new().expect("topology");
    let (_g, evs) = capture(
        "wire_grpc_stream_cancel",
        &t,
        GRPC_PORT,
        grpc::scenario_stream_cancel,
    );
    wire::check_grpc_stream_cancel(&t, &evs);
}

#[test]
fn wire_nghttp_goaway() {
    if !wire_prelude("wire_nghttp_goaway", Need::Nghttp2(&["nghttpd", "nghttp"])) {
        return;
    }
    let t = Topology::new().expect("topology");
    let docroot = DocRoot::new(4096).expect("docroot");
    for v6 in [false, true] {
        let (_f, evs) = capture("wire_nghttp_goaway", &t, HTTP_PORT, |t| {
            nghttp::scenario_nghttp(t, v6, "small", &docroot)
        });
        wire::check_nghttp_goaway(&t, v6, &evs);
    }
}
