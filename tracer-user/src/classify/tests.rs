//! Table-driven classifier tests: one named case per rule.

use super::*;
use crate::{
    event::{ECONNREFUSED, ECONNRESET, ETIMEDOUT, TcpState as S},
    h2::Reason as ErrorCode,
    timeline::*,
};

fn st(at: u64, from: S, to: S) -> Fact {
    Fact {
        at_ns: at,
        kind: FactKind::State {
            from,
            to,
            pid: 0,
            comm: "".into(),
            exiting: false,
        },
    }
}
fn st_by(at: u64, from: S, to: S, exiting: bool) -> Fact {
    Fact {
        at_ns: at,
        kind: FactKind::State {
            from,
            to,
            pid: 77,
            comm: "app".into(),
            exiting,
        },
    }
}
fn f(at: u64, kind: FactKind) -> Fact {
    Fact { at_ns: at, kind }
}

fn client_open() -> Vec<Fact> {
    vec![
        st(0, S::Close, S::SynSent),
        st(10, S::SynSent, S::Established),
    ]
}
fn server_open() -> Vec<Fact> {
    vec![
        st(0, S::Listen, S::SynRecv),
        st(10, S::SynRecv, S::Established),
    ]
}

fn tl(role: Role, open: Vec<Fact>, rest: Vec<Fact>, peer: Option<PeerSummary>) -> Timeline {
    let mut facts = open;
    facts.extend(rest);
    Timeline {
        role,
        role_inferred: false,
        facts,
        peer,
        ttl_baseline: Some(63),
        h2: None,
        tls: false,
        events_lost: false,
        proxy: None,
        last_data_ns: None,
    }
}

fn with_h2(mut t: Timeline, h2: H2Summary) -> Timeline {
    t.h2 = Some(h2);
    t
}

fn goaway(sent: bool, at_ns: u64, code: u32, debug: &str) -> GoAway {
    GoAway {
        sent,
        at_ns,
        code: ErrorCode(code),
        last_stream_id: 0,
        debug: debug.into(),
        debug_truncated: false,
        idle_ns: Some(1_000_000_000),
    }
}

fn synced(goaways: Vec<GoAway>) -> H2Summary {
    H2Summary {
        synced: true,
        goaways,
        ..Default::default()
    }
}

/// Client FIN after the server's GOAWAY, seen from the client.
fn client_fin_after(at: u64) -> Vec<Fact> {
    vec![
        st_by(at, S::Established, S::FinWait1, false),
        f(at, FactKind::FinSent),
        st(at + 1, S::FinWait2, S::Close),
    ]
}

fn peer(exited: bool, closed_first: bool) -> Option<PeerSummary> {
    Some(PeerSummary {
        id: ConnId(0x70),
        exited,
        closed_first,
        ..Default::default()
    })
}

struct Case {
    name: &'static str,
    timeline: Timeline,
    closed_by: ClosedBy,
    reason: &'static str,
    initiator: Initiator,
    mechanism: Mechanism,
    confidence: Confidence,
}

fn cases() -> Vec<Case> {
    use ClosedBy as C;
    use Confidence as K;
    use Initiator as I;
    use Mechanism as M;
    vec![
        Case {
            name: "client FIN first, seen on the client",
            timeline: tl(
                Role::Client,
                client_open(),
                vec![
                    st_by(100, S::Established, S::FinWait1, false),
                    f(101, FactKind::FinSent),
                    f(102, FactKind::FinReceived { ttl: 63 }),
                    st(103, S::FinWait2, S::Close),
                ],
                peer(false, false),
            ),
            closed_by: C::Client,
            reason: "client_close",
            initiator: I::Local,
            mechanism: M::Fin,
            confidence: K::High,
        },
        Case {
            name: "client FIN first, seen on the server",
            timeline: tl(
                Role::Server,
                server_open(),
                vec![
                    f(100, FactKind::FinReceived { ttl: 64 }),
                    st(100, S::Established, S::CloseWait),
                    st_by(150, S::CloseWait, S::LastAck, false),
                    f(151, FactKind::FinSent),
                    st(152, S::LastAck, S::Close),
                ],
                peer(false, true),
            ),
            closed_by: C::Client,
            reason: "client_close",
            initiator: I::Remote,
            mechanism: M::Fin,
            confidence: K::High,
        },
        Case {
            name: "client FIN first, then late server bytes (a grpc PING) draw its kernel's RST, \
                   seen on the client",
            timeline: tl(
                Role::Client,
                client_open(),
                vec![
                    st_by(100, S::Established, S::FinWait1, false),
                    f(101, FactKind::FinSent),
                    f(
                        102,
                        FactKind::RstSent {
                            exiting: false,
                            kernel_reason: None,
                        },
                    ),
                    st(102, S::FinWait1, S::Close),
                ],
                peer(false, false),
            ),
            closed_by: C::Client,
            reason: "client_close",
            initiator: I::Local,
            mechanism: M::Fin,
            confidence: K::High,
        },
        Case {
            name: "client FIN first, then its kernel's RST for late server bytes, seen on the server",
            timeline: tl(
                Role::Server,
                server_open(),
                vec![
                    f(100, FactKind::FinReceived { ttl: 64 }),
                    st(100, S::Established, S::CloseWait),
                    f(
                        101,
                        FactKind::RstReceived {
                            ttl: 64,
                            origin: RstOrigin::PeerSocket,
                            sender_reason: None,
                        },
                    ),
                    st(101, S::CloseWait, S::Close),
                ],
                peer(false, true),
            ),
            closed_by: C::Client,
            reason: "client_close",
            initiator: I::Remote,
            mechanism: M::Fin,
            confidence: K::High,
        },
        Case {
            name: "simultaneous close, client view: its close() first, the server's FIN first on the wire",
            timeline: tl(
                Role::Client,
                client_open(),
                vec![
                    st_by(100, S::Established, S::FinWait1, false),
                    f(101, FactKind::FinReceived { ttl: 63 }),
                    f(102, FactKind::FinSent),
                    st(103, S::FinWait1, S::Closing),
                    st(104, S::Closing, S::Close),
                ],
                peer(false, true),
            ),
            closed_by: C::Server,
            reason: "server_close",
            initiator: I::Remote,
            mechanism: M::Fin,
            confidence: K::Medium,
        },
        Case {
            name: "simultaneous close, server view: its FIN first on the wire",
            timeline: tl(
                Role::Server,
                server_open(),
                vec![
                    st_by(100, S::Established, S::FinWait1, false),
                    f(101, FactKind::FinSent),
                    f(102, FactKind::FinReceived { ttl: 64 }),
                    st(103, S::FinWait1, S::Closing),
                    st(104, S::Closing, S::Close),
                ],
                peer(false, false),
            ),
            closed_by: C::Server,
            reason: "server_close",
            initiator: I::Local,
            mechanism: M::Fin,
            confidence: K::Medium,
        },
        Case {
            name: "FINs crossed on the wire, server view: each end sent before it received, \
                   the client's sent first (no CLOSING on this socket)",
            timeline: tl(
                Role::Server,
                server_open(),
                vec![
                    st_by(100, S::Established, S::FinWait1, false),
                    f(102, FactKind::FinSent),
                    f(102, FactKind::FinReceived { ttl: 64 }),
                    st(103, S::FinWait1, S::FinWait2),
                    st(104, S::FinWait2, S::Close),
                ],
                Some(PeerSummary {
                    id: ConnId(0x63),
                    fin_sent_ns: Some(101),
                    fin_received_ns: Some(103),
                    ..Default::default()
                }),
            ),
            closed_by: C::Client,
            reason: "client_close",
            initiator: I::Remote,
            mechanism: M::Fin,
            confidence: K::Medium,
        },
        Case {
            name: "FINs crossed on the wire, client view: its own FIN was first",
            timeline: tl(
                Role::Client,
                client_open(),
                vec![
                    st_by(100, S::Established, S::FinWait1, false),
                    f(101, FactKind::FinSent),
                    f(103, FactKind::FinReceived { ttl: 64 }),
                    st(103, S::FinWait1, S::Closing),
                    st(104, S::Closing, S::Close),
                ],
                Some(PeerSummary {
                    id: ConnId(0x73),
                    fin_sent_ns: Some(102),
                    fin_received_ns: Some(102),
                    ..Default::default()
                }),
            ),
            closed_by: C::Client,
            reason: "client_close",
            initiator: I::Local,
            mechanism: M::Fin,
            confidence: K::Medium,
        },
        Case {
            name: "peer on this host received our FIN before it sent its own: not crossed",
            timeline: tl(
                Role::Client,
                client_open(),
                vec![
                    st_by(100, S::Established, S::FinWait1, false),
                    f(101, FactKind::FinSent),
                    f(105, FactKind::FinReceived { ttl: 64 }),
                    st(106, S::FinWait2, S::Close),
                ],
                Some(PeerSummary {
                    id: ConnId(0x73),
                    fin_sent_ns: Some(104),
                    fin_received_ns: Some(102),
                    ..Default::default()
                }),
            ),
            closed_by: C::Client,
            reason: "client_close",
            initiator: I::Local,
            mechanism: M::Fin,
            confidence: K::High,
        },
        Case {
            name: "server FIN first, seen on the client, packets unavailable (states only)",
            timeline: tl(
                Role::Client,
                client_open(),
                vec![
                    st(100, S::Established, S::CloseWait),
                    st_by(120, S::CloseWait, S::LastAck, false),
                    st(121, S::LastAck, S::Close),
                ],
                peer(false, false),
            ),
            closed_by: C::Server,
            reason: "server_close",
            initiator: I::Remote,
            mechanism: M::Fin,
            confidence: K::High,
        },
        Case {
            name: "server killed with unread data, seen on the server",
            timeline: tl(
                Role::Server,
                server_open(),
                vec![
                    st_by(100, S::Established, S::Close, true),
                    f(
                        101,
                        FactKind::RstSent {
                            exiting: true,
                            kernel_reason: None,
                        },
                    ),
                ],
                None,
            ),
            closed_by: C::Server,
            reason: "server_process_exit",
            initiator: I::Local,
            mechanism: M::Rst,
            confidence: K::High,
        },
        Case {
            name: "server killed with unread data, seen on the client",
            timeline: tl(
                Role::Client,
                client_open(),
                vec![
                    f(
                        101,
                        FactKind::RstReceived {
                            ttl: 63,
                            origin: RstOrigin::PeerSocket,
                            sender_reason: None,
                        },
                    ),
                    f(101, FactKind::SocketError { errno: ECONNRESET }),
                    st(101, S::Established, S::Close),
                ],
                peer(true, true),
            ),
            closed_by: C::Server,
            reason: "server_process_exit",
            initiator: I::Remote,
            mechanism: M::Rst,
            confidence: K::High,
        },
        Case {
            name: "server process exit without unread data closes with FIN",
            timeline: tl(
                Role::Server,
                server_open(),
                vec![
                    st_by(100, S::Established, S::FinWait1, true),
                    f(101, FactKind::FinSent),
                ],
                None,
            ),
            closed_by: C::Server,
            reason: "server_process_exit",
            initiator: I::Local,
            mechanism: M::Fin,
            confidence: K::High,
        },
        Case {
            name: "client aborts with SO_LINGER 0",
            timeline: tl(
                Role::Client,
                client_open(),
                vec![
                    st_by(100, S::Established, S::Close, false),
                    f(
                        101,
                        FactKind::RstSent {
                            exiting: false,
                            kernel_reason: None,
                        },
                    ),
                ],
                None,
            ),
            closed_by: C::Client,
            reason: "client_abort",
            initiator: I::Local,
            mechanism: M::Rst,
            confidence: K::High,
        },
        Case {
            name: "RST from the peer's kernel (no socket)",
            timeline: tl(
                Role::Client,
                client_open(),
                vec![
                    f(
                        100,
                        FactKind::RstReceived {
                            ttl: 63,
                            origin: RstOrigin::PeerKernel,
                            sender_reason: None,
                        },
                    ),
                    st(100, S::Established, S::Close),
                ],
                peer(false, true),
            ),
            closed_by: C::Server,
            reason: "server_no_socket",
            initiator: I::Remote,
            mechanism: M::Rst,
            confidence: K::High,
        },
        Case {
            name: "middlebox RST proven: peer traced and never sent it",
            timeline: tl(
                Role::Client,
                client_open(),
                vec![
                    f(
                        100,
                        FactKind::RstReceived {
                            ttl: 64,
                            origin: RstOrigin::NotSentByPeer,
                            sender_reason: None,
                        },
                    ),
                    f(100, FactKind::SocketError { errno: ECONNRESET }),
                    st(100, S::Established, S::Close),
                ],
                peer(false, false),
            ),
            closed_by: C::Middlebox,
            reason: "middlebox_reset",
            initiator: I::Remote,
            mechanism: M::Rst,
            confidence: K::High,
        },
        Case {
            name: "middlebox RST inferred from a TTL unlike the flow's",
            timeline: tl(
                Role::Client,
                client_open(),
                vec![
                    f(
                        100,
                        FactKind::RstReceived {
                            ttl: 64,
                            origin: RstOrigin::Untraced,
                            sender_reason: None,
                        },
                    ),
                    st(100, S::Established, S::Close),
                ],
                None,
            ),
            closed_by: C::Middlebox,
            reason: "middlebox_reset",
            initiator: I::Remote,
            mechanism: M::Rst,
            confidence: K::Medium,
        },
        Case {
            name: "untraced peer RST with the flow's TTL",
            timeline: tl(
                Role::Client,
                client_open(),
                vec![
                    f(
                        100,
                        FactKind::RstReceived {
                            ttl: 63,
                            origin: RstOrigin::Untraced,
                            sender_reason: None,
                        },
                    ),
                    st(100, S::Established, S::Close),
                ],
                None,
            ),
            closed_by: C::Server,
            reason: "server_reset",
            initiator: I::Remote,
            mechanism: M::Rst,
            confidence: K::Medium,
        },
        Case {
            name: "blackholed path with the peer alive on this host",
            timeline: tl(
                Role::Client,
                client_open(),
                vec![
                    f(
                        100,
                        FactKind::Retransmit {
                            state: S::Established,
                        },
                    ),
                    f(
                        300,
                        FactKind::Retransmit {
                            state: S::Established,
                        },
                    ),
                    f(700, FactKind::SocketError { errno: ETIMEDOUT }),
                    st(700, S::Established, S::Close),
                ],
                peer(false, false),
            ),
            // Both ends seen: the path, proven (was `retransmission_timeout`, the mechanism).
            closed_by: C::Middlebox,
            reason: "path_blackhole",
            initiator: I::Local,
            mechanism: M::Timeout,
            confidence: K::High,
        },
        Case {
            name: "RST from the host whose socket already timed out: the path, not that side",
            timeline: tl(
                Role::Server,
                server_open(),
                vec![
                    f(
                        5000,
                        FactKind::RstReceived {
                            ttl: 63,
                            origin: RstOrigin::PeerKernel,
                            sender_reason: Some("NO_SOCKET".into()),
                        },
                    ),
                    st(5000, S::Established, S::Close),
                ],
                Some(PeerSummary {
                    id: ConnId(0x70),
                    closed_first: true,
                    ended: Some((700, LegEnd::Timeout)),
                    retransmits: 3,
                    stalled_ns: Some(600),
                    ..Default::default()
                }),
            ),
            closed_by: C::Middlebox,
            reason: "path_blackhole",
            initiator: I::Remote,
            mechanism: M::Timeout,
            confidence: K::High,
        },
        Case {
            name: "RST from the host whose socket a middlebox reset first: the middlebox",
            timeline: tl(
                Role::Server,
                server_open(),
                vec![
                    f(
                        5000,
                        FactKind::RstReceived {
                            ttl: 63,
                            origin: RstOrigin::PeerKernel,
                            sender_reason: Some("NO_SOCKET".into()),
                        },
                    ),
                    st(5000, S::Established, S::Close),
                ],
                Some(PeerSummary {
                    id: ConnId(0x70),
                    closed_first: true,
                    ended: Some((700, LegEnd::FarRst)),
                    middlebox_reset_at: Some(700),
                    ..Default::default()
                }),
            ),
            closed_by: C::Middlebox,
            reason: "middlebox_reset",
            initiator: I::Remote,
            mechanism: M::Rst,
            confidence: K::High,
        },
        Case {
            name: "GOAWAY text naming an idle *stream* is not an idle timeout",
            timeline: with_h2(
                tl(
                    Role::Client,
                    client_open(),
                    client_fin_after(200),
                    peer(false, false),
                ),
                synced(vec![goaway(false, 100, 1, "RST_STREAM: stream in idle")]),
            ),
            closed_by: C::Server,
            reason: "server_goaway",
            initiator: I::Local,
            mechanism: M::GoawayThenFin,
            confidence: K::High,
        },
        Case {
            name: "GOAWAY NO_ERROR without text after 1 s with no stream: inferred idle timeout",
            timeline: with_h2(
                tl(Role::Client, client_open(), client_fin_after(200), None),
                synced(vec![goaway(false, 100, 0, "")]),
            ),
            closed_by: C::Server,
            reason: "server_idle_timeout",
            initiator: I::Local,
            mechanism: M::GoawayThenFin,
            confidence: K::Medium,
        },
        Case {
            name: "GOAWAY NO_ERROR without text while streams are open: inferred shutdown",
            timeline: with_h2(
                tl(Role::Client, client_open(), client_fin_after(200), None),
                synced(vec![GoAway {
                    idle_ns: None,
                    ..goaway(false, 100, 0, "")
                }]),
            ),
            closed_by: C::Server,
            reason: "server_shutdown",
            initiator: I::Local,
            mechanism: M::GoawayThenFin,
            confidence: K::Medium,
        },
        Case {
            name: "two GOAWAYs NO_ERROR, the first with the largest stream id: inferred drain",
            timeline: with_h2(
                tl(Role::Client, client_open(), client_fin_after(200), None),
                synced(vec![
                    GoAway {
                        last_stream_id: (1 << 31) - 1,
                        idle_ns: Some(5_000_000),
                        ..goaway(false, 100, 0, "")
                    },
                    GoAway {
                        last_stream_id: 3,
                        ..goaway(false, 150, 0, "")
                    },
                ]),
            ),
            closed_by: C::Server,
            reason: "server_shutdown",
            initiator: I::Local,
            mechanism: M::GoawayThenFin,
            confidence: K::Medium,
        },
        Case {
            name: "bare server FIN after streams ran and 2 s without one: inferred idle timeout",
            timeline: with_h2(
                tl(
                    Role::Client,
                    client_open(),
                    vec![
                        f(3_000_000_000, FactKind::FinReceived { ttl: 63 }),
                        st(3_000_000_000, S::Established, S::CloseWait),
                    ],
                    None,
                ),
                H2Summary {
                    idle_since_ns: Some(1_000_000_000),
                    max_open_streams: 1,
                    ..synced(vec![])
                },
            ),
            closed_by: C::Server,
            reason: "server_idle_timeout",
            initiator: I::Remote,
            mechanism: M::Fin,
            confidence: K::Medium,
        },
        Case {
            name: "a PING answered after an unanswered one: not a keepalive timeout",
            timeline: with_h2(
                tl(Role::Client, client_open(), client_fin_after(3_000), None),
                H2Summary {
                    unanswered_sent_since: Some(1_000),
                    answered_sent_at: Some(2_000),
                    ..synced(vec![])
                },
            ),
            closed_by: C::Client,
            reason: "client_close",
            initiator: I::Local,
            mechanism: M::Fin,
            confidence: K::High,
        },
        Case {
            name: "only this end traced: the server's FIN could be a proxy's, medium",
            timeline: tl(
                Role::Client,
                client_open(),
                vec![
                    f(100, FactKind::FinReceived { ttl: 63 }),
                    st(100, S::Established, S::CloseWait),
                ],
                None,
            ),
            closed_by: C::Server,
            reason: "server_close",
            initiator: I::Remote,
            mechanism: M::Fin,
            confidence: K::Medium,
        },
        Case {
            name: "only this end traced: a GOAWAY max_idle could be a proxy's, medium",
            timeline: with_h2(
                tl(Role::Client, client_open(), client_fin_after(200), None),
                synced(vec![goaway(false, 100, 0, "max_idle")]),
            ),
            closed_by: C::Server,
            reason: "server_idle_timeout",
            initiator: I::Local,
            mechanism: M::GoawayThenFin,
            confidence: K::Medium,
        },
        Case {
            name: "frames from the server long after an unanswered PING: not a keepalive timeout",
            timeline: with_h2(
                tl(
                    Role::Client,
                    client_open(),
                    client_fin_after(2_000_000_000),
                    None,
                ),
                H2Summary {
                    unanswered_sent_since: Some(1_000),
                    last_received_ns: Some(1_000_002_500),
                    ..synced(vec![])
                },
            ),
            closed_by: C::Client,
            reason: "client_close",
            initiator: I::Local,
            mechanism: M::Fin,
            confidence: K::High,
        },
        Case {
            name: "TLS: the first FIN alone is not proof of who decided",
            timeline: Timeline {
                tls: true,
                ..tl(Role::Client, client_open(), client_fin_after(200), None)
            },
            closed_by: C::Client,
            reason: "client_close",
            initiator: I::Local,
            mechanism: M::Fin,
            confidence: K::Medium,
        },
        Case {
            name: "a known proxy's upstream leg it closed, its other leg unseen: medium",
            timeline: Timeline {
                proxy: Some(ProxyView {
                    local: true,
                    pid: 300,
                    comm: "nginx".into(),
                    netns: None,
                    leg: ProxyLeg::Upstream,
                    ended: Some((200, LegEnd::OwnFin)),
                    other: None,
                    known_name: true,
                }),
                ..tl(Role::Client, client_open(), client_fin_after(200), None)
            },
            closed_by: C::Middlebox,
            reason: "proxy_close",
            initiator: I::Local,
            mechanism: M::Fin,
            confidence: K::Medium,
        },
        Case {
            name: "nginx GOAWAY on its downstream leg while its upstream leg stayed apart",
            timeline: Timeline {
                proxy: Some(ProxyView {
                    local: false,
                    pid: 300,
                    comm: "nginx".into(),
                    netns: None,
                    leg: ProxyLeg::Downstream,
                    ended: Some((
                        100,
                        LegEnd::OwnGoaway {
                            code: ErrorCode(0),
                            debug: String::new(),
                        },
                    )),
                    other: Some(OtherLeg {
                        id: ConnId(0x75),
                        local: None,
                        remote: None,
                        ended: Some((50, LegEnd::OwnFin)),
                        ambiguous: false,
                    }),
                    known_name: true,
                }),
                ..with_h2(
                    tl(Role::Client, client_open(), client_fin_after(200), None),
                    synced(vec![goaway(false, 100, 0, "")]),
                )
            },
            closed_by: C::Middlebox,
            reason: "proxy_goaway",
            initiator: I::Local,
            mechanism: M::GoawayThenFin,
            confidence: K::High,
        },
        Case {
            name: "haproxy closed its downstream leg, its other leg closed but how is unseen: \
                   it may have passed that ending on, low",
            timeline: Timeline {
                proxy: Some(ProxyView {
                    local: false,
                    pid: 300,
                    comm: "haproxy".into(),
                    netns: None,
                    leg: ProxyLeg::Downstream,
                    ended: Some((100, LegEnd::OwnFin)),
                    other: Some(OtherLeg {
                        id: ConnId(0x75),
                        local: None,
                        remote: None,
                        ended: None,
                        ambiguous: false,
                    }),
                    known_name: true,
                }),
                ..tl(
                    Role::Client,
                    client_open(),
                    vec![
                        f(100, FactKind::FinReceived { ttl: 63 }),
                        st(100, S::Established, S::CloseWait),
                    ],
                    None,
                )
            },
            closed_by: C::Middlebox,
            reason: "proxy_close",
            initiator: I::Remote,
            mechanism: M::Fin,
            confidence: K::Low,
        },
        Case {
            name: "an unnamed process closed one socket, its other closed socket's ending unseen: \
                   not a proxy verdict",
            timeline: Timeline {
                proxy: Some(ProxyView {
                    local: false,
                    pid: 300,
                    comm: "app".into(),
                    netns: None,
                    leg: ProxyLeg::Downstream,
                    ended: Some((100, LegEnd::OwnFin)),
                    other: Some(OtherLeg {
                        id: ConnId(0x75),
                        local: None,
                        remote: None,
                        ended: None,
                        ambiguous: false,
                    }),
                    known_name: false,
                }),
                ..tl(
                    Role::Client,
                    client_open(),
                    vec![
                        f(100, FactKind::FinReceived { ttl: 63 }),
                        st(100, S::Established, S::CloseWait),
                    ],
                    None,
                )
            },
            closed_by: C::Server,
            reason: "server_close",
            initiator: I::Remote,
            mechanism: M::Fin,
            confidence: K::High,
        },
        Case {
            name: "an unnamed process with a second socket that ended apart is not a proxy",
            timeline: Timeline {
                proxy: Some(ProxyView {
                    local: false,
                    pid: 300,
                    comm: "app".into(),
                    netns: None,
                    leg: ProxyLeg::Downstream,
                    ended: Some((100, LegEnd::OwnFin)),
                    other: Some(OtherLeg {
                        id: ConnId(0x75),
                        local: None,
                        remote: None,
                        ended: Some((90_000_000_000, LegEnd::OwnFin)),
                        ambiguous: false,
                    }),
                    known_name: false,
                }),
                ..tl(
                    Role::Client,
                    client_open(),
                    vec![
                        f(100, FactKind::FinReceived { ttl: 63 }),
                        st(100, S::Established, S::CloseWait),
                    ],
                    None,
                )
            },
            closed_by: C::Server,
            reason: "server_close",
            initiator: I::Remote,
            mechanism: M::Fin,
            confidence: K::High,
        },
        Case {
            name: "retransmission timeout, peer not on this host, no error hook",
            timeline: tl(
                Role::Client,
                client_open(),
                vec![
                    f(
                        100,
                        FactKind::Retransmit {
                            state: S::Established,
                        },
                    ),
                    st(700, S::Established, S::Close),
                ],
                None,
            ),
            closed_by: C::Middlebox,
            reason: "retransmission_timeout",
            initiator: I::Local,
            mechanism: M::Timeout,
            confidence: K::Low,
        },
        Case {
            name: "keepalive timeout (no retransmissions)",
            timeline: tl(
                Role::Server,
                server_open(),
                vec![
                    f(700, FactKind::SocketError { errno: ETIMEDOUT }),
                    st(700, S::Established, S::Close),
                ],
                None,
            ),
            closed_by: C::Middlebox,
            reason: "keepalive_timeout",
            initiator: I::Local,
            mechanism: M::Timeout,
            confidence: K::Low,
        },
        Case {
            name: "connection refused by the server's kernel",
            timeline: tl(
                Role::Client,
                vec![st(0, S::Close, S::SynSent)],
                vec![
                    f(
                        5,
                        FactKind::RstReceived {
                            ttl: 64,
                            origin: RstOrigin::PeerKernel,
                            sender_reason: None,
                        },
                    ),
                    f(
                        5,
                        FactKind::SocketError {
                            errno: ECONNREFUSED,
                        },
                    ),
                    st(5, S::SynSent, S::Close),
                ],
                None,
            ),
            closed_by: C::Server,
            reason: "connection_refused",
            initiator: I::Remote,
            mechanism: M::Rst,
            // No listener socket to join: a kernel on this host answered, possibly a NAT's for
            // a VIP, so proven only as far as "that address's host said no".
            confidence: K::Medium,
        },
        Case {
            name: "connect timeout",
            timeline: tl(
                Role::Client,
                vec![st(0, S::Close, S::SynSent)],
                vec![
                    f(5, FactKind::SocketError { errno: ETIMEDOUT }),
                    st(5, S::SynSent, S::Close),
                ],
                None,
            ),
            closed_by: C::Unknown,
            reason: "connect_timeout",
            initiator: I::Local,
            mechanism: M::Timeout,
            confidence: K::Low,
        },
        Case {
            name: "nothing observed",
            timeline: tl(
                Role::Client,
                client_open(),
                vec![st(100, S::Established, S::Close)],
                None,
            ),
            closed_by: C::Unknown,
            reason: "unknown",
            initiator: I::None,
            mechanism: M::None,
            confidence: K::Low,
        },
        Case {
            name: "pre-existing connection with unknown role: sides named local/remote",
            timeline: Timeline {
                role: Role::Unknown,
                role_inferred: true,
                facts: vec![
                    f(100, FactKind::FinReceived { ttl: 63 }),
                    st(100, S::Established, S::CloseWait),
                ],
                peer: None,
                ttl_baseline: None,
                h2: None,
                tls: false,
                events_lost: false,
                proxy: None,
                last_data_ns: None,
            },
            closed_by: C::Unknown,
            reason: "remote_close",
            initiator: I::Remote,
            mechanism: M::Fin,
            confidence: K::Medium,
        },
        Case {
            name: "the first signal wins: local FIN, then a late RST from the peer",
            timeline: tl(
                Role::Client,
                client_open(),
                vec![
                    f(100, FactKind::FinSent),
                    f(
                        200,
                        FactKind::RstReceived {
                            ttl: 63,
                            origin: RstOrigin::PeerSocket,
                            sender_reason: None,
                        },
                    ),
                    st(200, S::FinWait1, S::Close),
                ],
                peer(false, false),
            ),
            closed_by: C::Client,
            reason: "client_close",
            initiator: I::Local,
            mechanism: M::Fin,
            confidence: K::High,
        },
        Case {
            name: "grpc max idle: server GOAWAY NO_ERROR max_idle, client sends the first FIN",
            timeline: with_h2(
                tl(
                    Role::Client,
                    client_open(),
                    client_fin_after(200),
                    peer(false, false),
                ),
                synced(vec![goaway(false, 100, 0, "max_idle")]),
            ),
            closed_by: C::Server,
            reason: "server_idle_timeout",
            initiator: I::Local,
            mechanism: M::GoawayThenFin,
            confidence: K::High,
        },
        Case {
            name: "grpc max idle, seen from the server that sent the GOAWAY",
            timeline: with_h2(
                tl(
                    Role::Server,
                    server_open(),
                    vec![
                        f(201, FactKind::FinReceived { ttl: 64 }),
                        st(201, S::Established, S::CloseWait),
                    ],
                    None,
                ),
                synced(vec![goaway(true, 100, 0, "max_idle")]),
            ),
            closed_by: C::Server,
            reason: "server_idle_timeout",
            initiator: I::Remote,
            mechanism: M::GoawayThenFin,
            confidence: K::High,
        },
        Case {
            name: "grpc C-core idle: GOAWAY INTERNAL_ERROR connection idle",
            timeline: with_h2(
                tl(
                    Role::Client,
                    client_open(),
                    client_fin_after(200),
                    peer(false, false),
                ),
                synced(vec![goaway(false, 100, 2, "connection idle")]),
            ),
            closed_by: C::Server,
            reason: "server_idle_timeout",
            initiator: I::Local,
            mechanism: M::GoawayThenFin,
            confidence: K::High,
        },
        Case {
            name: "grpc keepalive on a blackholed path: unanswered PING, then the kernel's ETIMEDOUT",
            timeline: with_h2(
                tl(
                    Role::Client,
                    client_open(),
                    vec![
                        f(
                            1_000,
                            FactKind::Retransmit {
                                state: S::Established,
                            },
                        ),
                        f(2_440, FactKind::SocketError { errno: 110 }),
                        st(2_440, S::Established, S::Close),
                    ],
                    peer(false, false),
                ),
                H2Summary {
                    unanswered_sent_since: Some(1_000),
                    ..synced(vec![])
                },
            ),
            closed_by: C::Middlebox,
            reason: "path_blackhole",
            initiator: I::Local,
            mechanism: M::Timeout,
            confidence: K::High,
        },
        Case {
            name: "grpc keepalive ETIMEDOUT with the server not traced: the client's keepalive, cause open",
            timeline: with_h2(
                tl(
                    Role::Client,
                    client_open(),
                    vec![
                        f(
                            1_000,
                            FactKind::Retransmit {
                                state: S::Established,
                            },
                        ),
                        f(2_440, FactKind::SocketError { errno: 110 }),
                        st(2_440, S::Established, S::Close),
                    ],
                    None,
                ),
                H2Summary {
                    unanswered_sent_since: Some(1_000),
                    ..synced(vec![])
                },
            ),
            closed_by: C::Client,
            reason: "client_keepalive_timeout",
            initiator: I::Local,
            mechanism: M::Timeout,
            confidence: K::High,
        },
        Case {
            name: "client app gives up on a retransmitted PING while the server socket is open: path",
            timeline: with_h2(
                tl(
                    Role::Client,
                    client_open(),
                    [
                        vec![f(
                            1_100,
                            FactKind::Retransmit {
                                state: S::Established,
                            },
                        )],
                        client_fin_after(3_000),
                    ]
                    .concat(),
                    peer(false, false),
                ),
                H2Summary {
                    unanswered_sent_since: Some(1_000),
                    ..synced(vec![])
                },
            ),
            closed_by: C::Middlebox,
            reason: "path_blackhole",
            initiator: I::Local,
            mechanism: M::PingTimeout,
            confidence: K::High,
        },
        Case {
            name: "a retransmission long before the unanswered PING is no proof the path lost the PING",
            timeline: with_h2(
                tl(
                    Role::Client,
                    client_open(),
                    [
                        vec![f(
                            500,
                            FactKind::Retransmit {
                                state: S::Established,
                            },
                        )],
                        client_fin_after(3_000),
                    ]
                    .concat(),
                    peer(false, false),
                ),
                H2Summary {
                    unanswered_sent_since: Some(1_000),
                    ..synced(vec![])
                },
            ),
            closed_by: C::Client,
            reason: "client_keepalive_timeout",
            initiator: I::Local,
            mechanism: M::PingTimeout,
            confidence: K::High,
        },
        Case {
            name: "client app gives up on a PING TCP acknowledged but HTTP/2 never answered: stuck server, not the path",
            timeline: with_h2(
                tl(
                    Role::Client,
                    client_open(),
                    client_fin_after(3_000),
                    peer(false, false),
                ),
                H2Summary {
                    unanswered_sent_since: Some(1_000),
                    ..synced(vec![])
                },
            ),
            closed_by: C::Client,
            reason: "client_keepalive_timeout",
            initiator: I::Local,
            mechanism: M::PingTimeout,
            confidence: K::High,
        },
        Case {
            name: "Kitex idle timeout text",
            timeline: with_h2(
                tl(
                    Role::Client,
                    client_open(),
                    client_fin_after(200),
                    peer(false, false),
                ),
                synced(vec![goaway(false, 100, 0, "idleTimeout")]),
            ),
            closed_by: C::Server,
            reason: "server_idle_timeout",
            initiator: I::Local,
            mechanism: M::GoawayThenFin,
            confidence: K::High,
        },
        Case {
            name: "grpc max age with the two-GOAWAY drain",
            timeline: with_h2(
                tl(
                    Role::Client,
                    client_open(),
                    client_fin_after(300),
                    peer(false, false),
                ),
                synced(vec![
                    goaway(false, 100, 0, "max_age"),
                    goaway(false, 200, 0, "max_age"),
                ]),
            ),
            closed_by: C::Server,
            reason: "server_max_age",
            initiator: I::Local,
            mechanism: M::GoawayThenFin,
            confidence: K::High,
        },
        Case {
            name: "too many pings: ENHANCE_YOUR_CALM too_many_pings",
            timeline: with_h2(
                tl(
                    Role::Client,
                    client_open(),
                    vec![
                        f(300, FactKind::FinReceived { ttl: 63 }),
                        st(300, S::Established, S::CloseWait),
                    ],
                    peer(false, false),
                ),
                H2Summary {
                    ping_interval_sent_ns: Some(200_000_000),
                    ..synced(vec![goaway(false, 290, 0xb, "too_many_pings")])
                },
            ),
            closed_by: C::Server,
            reason: "server_too_many_pings",
            initiator: I::Remote,
            mechanism: M::GoawayThenFin,
            confidence: K::High,
        },
        Case {
            name: "server GOAWAY with another code",
            timeline: with_h2(
                tl(
                    Role::Client,
                    client_open(),
                    client_fin_after(200),
                    peer(false, false),
                ),
                synced(vec![goaway(false, 100, 2, "")]),
            ),
            closed_by: C::Server,
            reason: "server_goaway",
            initiator: I::Local,
            mechanism: M::GoawayThenFin,
            confidence: K::High,
        },
        Case {
            name: "client GOAWAY (channel closed)",
            timeline: with_h2(
                tl(Role::Client, client_open(), client_fin_after(200), None),
                synced(vec![goaway(true, 100, 0, "")]),
            ),
            closed_by: C::Client,
            reason: "client_goaway",
            initiator: I::Local,
            mechanism: M::GoawayThenFin,
            confidence: K::High,
        },
        Case {
            name: "client keepalive timeout: unanswered PING, then the client's GOAWAY",
            timeline: with_h2(
                tl(Role::Client, client_open(), client_fin_after(3_000), None),
                H2Summary {
                    unanswered_sent_since: Some(1_000),
                    ..synced(vec![goaway(true, 2_000, 0, "")])
                },
            ),
            closed_by: C::Client,
            reason: "client_keepalive_timeout",
            initiator: I::Local,
            mechanism: M::PingTimeout,
            confidence: K::High,
        },
        Case {
            name: "client keepalive timeout without a GOAWAY",
            timeline: with_h2(
                tl(Role::Client, client_open(), client_fin_after(3_000), None),
                H2Summary {
                    unanswered_sent_since: Some(1_000),
                    ..synced(vec![])
                },
            ),
            closed_by: C::Client,
            reason: "client_keepalive_timeout",
            initiator: I::Local,
            mechanism: M::PingTimeout,
            confidence: K::High,
        },
        Case {
            name: "server closes an HTTP/2 connection without GOAWAY",
            timeline: with_h2(
                tl(
                    Role::Client,
                    client_open(),
                    vec![
                        f(300, FactKind::FinReceived { ttl: 63 }),
                        st(300, S::Established, S::CloseWait),
                    ],
                    None,
                ),
                synced(vec![]),
            ),
            closed_by: C::Server,
            reason: "server_close_no_goaway",
            initiator: I::Remote,
            mechanism: M::Fin,
            confidence: K::Medium,
        },
        Case {
            name: "a GOAWAY after a forged RST does not explain the RST",
            timeline: with_h2(
                tl(
                    Role::Client,
                    client_open(),
                    vec![
                        f(
                            100,
                            FactKind::RstReceived {
                                ttl: 64,
                                origin: RstOrigin::NotSentByPeer,
                                sender_reason: None,
                            },
                        ),
                        st(100, S::Established, S::Close),
                    ],
                    peer(false, false),
                ),
                synced(vec![goaway(true, 150, 0, "")]),
            ),
            closed_by: C::Middlebox,
            reason: "middlebox_reset",
            initiator: I::Remote,
            mechanism: M::Rst,
            confidence: K::High,
        },
        Case {
            name: "HTTP/2 client close without GOAWAY stays a TCP client close",
            timeline: with_h2(
                tl(Role::Client, client_open(), client_fin_after(200), None),
                synced(vec![]),
            ),
            closed_by: C::Client,
            reason: "client_close",
            initiator: I::Local,
            mechanism: M::Fin,
            confidence: K::High,
        },
    ]
}

#[test]
fn too_many_pings_hint_names_the_client_interval() {
    let t = with_h2(
        tl(
            Role::Server,
            server_open(),
            vec![st_by(300, S::Established, S::FinWait1, false)],
            None,
        ),
        H2Summary {
            ping_interval_received_ns: Some(200_000_000),
            ..synced(vec![goaway(true, 290, 0xb, "too_many_pings")])
        },
    );
    let v = classify(&t);
    assert_eq!(v.reason, "server_too_many_pings");
    assert!(v.hint.contains("every 200 ms"), "{}", v.hint);
}

#[test]
fn classifier_table() {
    let mut failures = Vec::new();
    for c in cases() {
        let v = classify(&c.timeline);
        let got = (
            v.closed_by,
            v.reason.as_str(),
            v.tcp_initiator,
            v.mechanism,
            v.confidence,
        );
        let want = (
            c.closed_by,
            c.reason,
            c.initiator,
            c.mechanism,
            c.confidence,
        );
        if got != want {
            failures.push(format!("{}:\n   got {got:?}\n  want {want:?}", c.name));
        }
        assert!(!v.hint.is_empty(), "{}: empty hint", c.name);
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_case_name_is_unique() {
    let mut names: Vec<_> = cases().iter().map(|c| c.name).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(before, names.len());
}

#[test]
fn ttl_hint_names_both_values() {
    let t = tl(
        Role::Client,
        client_open(),
        vec![f(
            100,
            FactKind::RstReceived {
                ttl: 64,
                origin: RstOrigin::Untraced,
                sender_reason: None,
            },
        )],
        None,
    );
    let v = classify(&t);
    assert!(
        v.hint.contains("TTL 64") && v.hint.contains("TTL 63"),
        "{}",
        v.hint
    );
}

#[test]
fn single_ended_idle_close_near_a_known_lb_timeout_is_named_in_the_hint() {
    let s = 1_000_000_000u64;
    let t = with_h2(
        tl(
            Role::Client,
            client_open(),
            vec![
                f(400 * s, FactKind::FinReceived { ttl: 63 }),
                st(400 * s, S::Established, S::CloseWait),
            ],
            None,
        ),
        H2Summary {
            idle_since_ns: Some(49 * s),
            max_open_streams: 1,
            ..synced(vec![])
        },
    );
    let v = classify(&t);
    assert_eq!(v.confidence, Confidence::Medium, "{v:?}");
    assert!(
        v.hint.contains("AWS NLB idle timeout (350 s)"),
        "{}",
        v.hint
    );
}

/// TLS (or any opaque payload): no HTTP/2 idle time, but the packet hooks' last payload
/// time gives the idle period before the remote RST, and it names the device.
#[test]
fn single_ended_tls_idle_reset_near_a_known_lb_timeout_is_named_from_l4_idle() {
    let s = 1_000_000_000u64;
    let mut t = tl(
        Role::Client,
        client_open(),
        vec![f(
            361 * s,
            FactKind::RstReceived {
                ttl: 63,
                origin: RstOrigin::Untraced,
                sender_reason: None,
            },
        )],
        None,
    );
    t.tls = true;
    t.last_data_ns = Some(11 * s);
    let v = classify(&t);
    assert!(
        v.hint.contains("AWS NLB idle timeout (350 s)"),
        "{}",
        v.hint
    );
    // Without the packet hooks' payload time there is no idle figure to match.
    t.last_data_ns = None;
    let v = classify(&t);
    assert!(!v.hint.contains("idle timeout ("), "{}", v.hint);
}

/// Every proxy case whose other leg is seen and told: marked ambiguous (another leg of the
/// proxy ended as near with another story), the same story is told, never with `high`.
#[test]
fn an_ambiguous_other_leg_is_never_high() {
    let mut seen = 0;
    for c in cases() {
        let Some(p) = c.timeline.proxy.as_ref().filter(|p| p.other.is_some()) else {
            continue;
        };
        let mut t = c.timeline.clone();
        let mut q = p.clone();
        if let Some(o) = q.other.as_mut() {
            o.ambiguous = true;
        }
        t.proxy = Some(q);
        let (clear, unsure) = (classify(&c.timeline), classify(&t));
        if super::proxy::rules(&c.timeline, &clear).is_none() {
            continue; // not taken for a proxy (an unnamed process): no pairing told
        }
        assert_eq!(
            (unsure.closed_by, unsure.reason.as_str()),
            (clear.closed_by, clear.reason.as_str()),
            "{}",
            c.name
        );
        assert_ne!(unsure.confidence, Confidence::High, "{}", c.name);
        assert!(unsure.hint.contains("not certain which"), "{}", unsure.hint);
        seen += 1;
    }
    assert!(
        seen >= 2,
        "proxy cases with a seen other leg in the table: {seen}"
    );
}
