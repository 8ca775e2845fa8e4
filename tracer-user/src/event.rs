//! Decoding of the kernel's [`RawEvent`] records into typed events.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use bytes::Bytes;
use thiserror::Error;
use tracer_common::{
    AF_INET, AF_INET6, H2_RECORD_SIZE, H2Record, RAW_EVENT_SIZE, RawEvent, flag, kind, proto,
    tcp_flag,
};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("ring buffer record of {0} bytes is shorter than an event ({RAW_EVENT_SIZE})")]
    Short(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u8),
    #[error("HTTP/2 record of {0} bytes is shorter than {H2_RECORD_SIZE}")]
    ShortH2(usize),
    #[error("unknown HTTP/2 protocol note {0}")]
    UnknownProto(i32),
}

/// What the kernel learned about a socket's payload (`H2_PROTO` records).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtoNote {
    H2Preface,
    H2SettingsFirst,
    Tls,
    Other,
    Resynced,
    Desync,
    GaveUp,
}

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    BoundInactive,
    Other(u8),
}

impl TcpState {
    pub fn from_kernel(v: u8) -> Self {
        match v {
            1 => Self::Established,
            2 => Self::SynSent,
            3 => Self::SynRecv,
            4 => Self::FinWait1,
            5 => Self::FinWait2,
            6 => Self::TimeWait,
            7 => Self::Close,
            8 => Self::CloseWait,
            9 => Self::LastAck,
            10 => Self::Listen,
            11 => Self::Closing,
            12 => Self::NewSynRecv,
            13 => Self::BoundInactive,
            other => Self::Other(other),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Established => "ESTABLISHED",
            Self::SynSent => "SYN_SENT",
            Self::SynRecv => "SYN_RECV",
            Self::FinWait1 => "FIN_WAIT1",
            Self::FinWait2 => "FIN_WAIT2",
            Self::TimeWait => "TIME_WAIT",
            Self::Close => "CLOSE",
            Self::CloseWait => "CLOSE_WAIT",
            Self::LastAck => "LAST_ACK",
            Self::Listen => "LISTEN",
            Self::Closing => "CLOSING",
            Self::NewSynRecv => "NEW_SYN_RECV",
            Self::BoundInactive => "BOUND_INACTIVE",
            Self::Other(_) => "UNKNOWN",
        }
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    Ingress,
    Egress,
}

/// Local and remote endpoints of a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl Tuple {
    pub fn reversed(self) -> Self {
        Self {
            local: self.remote,
            remote: self.local,
        }
    }

    /// A tuple is complete once both ports are known (a client socket's local port is
    /// chosen after its SYN_SENT transition).
    pub fn is_complete(&self) -> bool {
        self.local.port() != 0 && self.remote.port() != 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub dir: Dir,
    pub flags: u8,
    pub ttl: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload_len: u32,
    pub first_in_dir: bool,
    pub ttl_changed: bool,
}

impl Packet {
    pub fn syn(&self) -> bool {
        self.flags & tcp_flag::SYN != 0
    }
    pub fn fin(&self) -> bool {
        self.flags & tcp_flag::FIN != 0
    }
    pub fn rst(&self) -> bool {
        self.flags & tcp_flag::RST != 0
    }
    pub fn ack_flag(&self) -> bool {
        self.flags & tcp_flag::ACK != 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    State {
        old: TcpState,
        new: TcpState,
    },
    Retransmit {
        state: TcpState,
        err: i32,
    },
    /// The kernel sent a RST; `reason` is `enum sk_rst_reason` where the kernel reports it.
    SendReset {
        state: TcpState,
        reason: Option<u32>,
    },
    RecvReset,
    Destroy,
    ErrorReport {
        error: i32,
    },
    CloseCall {
        state: TcpState,
    },
    Packet(Packet),
    /// An HTTP/2 frame: its raw header and the captured payload prefix (control frames).
    H2Frame {
        dir: Dir,
        seq: u32,
        head: [u8; 9],
        payload: Bytes,
    },
    H2Proto {
        dir: Dir,
        seq: u32,
        note: ProtoNote,
    },
}

/// One decoded kernel fact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub skaddr: u64,
    pub cookie: u64,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub exiting: bool,
    pub netns: Option<u32>,
    pub tuple: Option<Tuple>,
    pub cpu: u32,
    pub kind: EventKind,
}

/// Addresses are canonical: an IPv4-mapped IPv6 address (a dual-stack socket talking IPv4)
/// becomes the IPv4 address, as the packets on the wire carry it. Tracepoints report such a
/// socket in its IPv6 form and the packet hooks in IPv4 form; without this the two would not
/// match.
fn addr(family: u16, raw: &[u8; 16]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        AF_INET6 => {
            let v6 = Ipv6Addr::from(*raw);
            Some(match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            })
        }
        _ => None,
    }
}

fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// Decodes one ring buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    if bytes.len() < RAW_EVENT_SIZE {
        return Err(DecodeError::Short(bytes.len()));
    }
    // SAFETY: length checked above; RawEvent is plain data valid for any bit pattern, and
    // read_unaligned makes no alignment assumption about the ring buffer slot.
    let raw: RawEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<RawEvent>()) };
    if raw.kind == kind::H2_FRAME || raw.kind == kind::H2_PROTO {
        if bytes.len() < H2_RECORD_SIZE {
            return Err(DecodeError::ShortH2(bytes.len()));
        }
        // SAFETY: as above, for the larger record.
        let rec: H2Record = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<H2Record>()) };
        return from_h2(&rec);
    }
    from_raw(&raw)
}

pub fn from_h2(rec: &H2Record) -> Result<Event, DecodeError> {
    let b = &rec.base;
    let dir = if b.flags & flag::INGRESS != 0 {
        Dir::Ingress
    } else {
        Dir::Egress
    };
    let kind = if b.kind == kind::H2_FRAME {
        let mut head = [0u8; 9];
        head.copy_from_slice(&rec.head[..9]);
        let n = (b.payload_len as usize).min(rec.payload.len());
        EventKind::H2Frame {
            dir,
            seq: b.seq,
            head,
            payload: Bytes::copy_from_slice(&rec.payload[..n]),
        }
    } else {
        let note = match b.value {
            proto::H2_PREFACE => ProtoNote::H2Preface,
            proto::H2_SETTINGS_FIRST => ProtoNote::H2SettingsFirst,
            proto::TLS => ProtoNote::Tls,
            proto::OTHER => ProtoNote::Other,
            proto::RESYNCED => ProtoNote::Resynced,
            proto::DESYNC => ProtoNote::Desync,
            proto::GAVE_UP => ProtoNote::GaveUp,
            other => return Err(DecodeError::UnknownProto(other)),
        };
        EventKind::H2Proto {
            dir,
            seq: b.seq,
            note,
        }
    };
    Ok(Event {
        ts_ns: b.ts_ns,
        skaddr: b.skaddr,
        cookie: 0,
        pid: 0,
        tid: 0,
        comm: String::new(),
        exiting: false,
        netns: None,
        tuple: None,
        cpu: b.cpu,
        kind,
    })
}

pub fn from_raw(raw: &RawEvent) -> Result<Event, DecodeError> {
    let tuple = if raw.flags & flag::HAS_TUPLE != 0 {
        match (addr(raw.family, &raw.saddr), addr(raw.family, &raw.daddr)) {
            (Some(l), Some(r)) => Some(Tuple {
                local: SocketAddr::new(l, raw.sport),
                remote: SocketAddr::new(r, raw.dport),
            }),
            _ => None,
        }
    } else {
        None
    };
    let kind = match raw.kind {
        kind::STATE => EventKind::State {
            old: TcpState::from_kernel(raw.oldstate),
            new: TcpState::from_kernel(raw.newstate),
        },
        kind::RETRANSMIT => EventKind::Retransmit {
            state: TcpState::from_kernel(raw.newstate),
            err: raw.value,
        },
        kind::SEND_RESET => EventKind::SendReset {
            state: TcpState::from_kernel(raw.newstate),
            reason: u32::try_from(raw.value).ok(),
        },
        kind::RECV_RESET => EventKind::RecvReset,
        kind::DESTROY => EventKind::Destroy,
        kind::ERROR_REPORT => EventKind::ErrorReport { error: raw.value },
        kind::CLOSE_CALL => EventKind::CloseCall {
            state: TcpState::from_kernel(raw.oldstate),
        },
        kind::PACKET => EventKind::Packet(Packet {
            dir: if raw.flags & flag::INGRESS != 0 {
                Dir::Ingress
            } else {
                Dir::Egress
            },
            flags: raw.tcp_flags,
            ttl: raw.ttl,
            seq: raw.seq,
            ack: raw.ack,
            payload_len: raw.payload_len,
            first_in_dir: raw.flags & flag::FIRST_IN_DIR != 0,
            ttl_changed: raw.flags & flag::TTL_CHANGED != 0,
        }),
        other => return Err(DecodeError::UnknownKind(other)),
    };
    Ok(Event {
        ts_ns: raw.ts_ns,
        skaddr: raw.skaddr,
        cookie: raw.cookie,
        pid: (raw.pid_tgid >> 32) as u32,
        tid: raw.pid_tgid as u32,
        comm: comm(&raw.comm),
        exiting: raw.flags & flag::EXITING != 0,
        netns: (raw.flags & flag::HAS_NETNS != 0).then_some(raw.netns),
        tuple,
        cpu: raw.cpu,
        kind,
    })
}

/// Linux errno names for the socket errors that matter here.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        32 => "EPIPE",
        103 => "ECONNABORTED",
        104 => "ECONNRESET",
        110 => "ETIMEDOUT",
        111 => "ECONNREFUSED",
        113 => "EHOSTUNREACH",
        101 => "ENETUNREACH",
        71 => "EPROTO",
        _ => "E?",
    }
}

pub const ECONNRESET: i32 = 104;
pub const ETIMEDOUT: i32 = 110;
pub const ECONNREFUSED: i32 = 111;
pub const EPIPE: i32 = 32;

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_bytes(ev: &RawEvent) -> Vec<u8> {
        // SAFETY: RawEvent is plain data of RAW_EVENT_SIZE bytes.
        unsafe { std::slice::from_raw_parts((ev as *const RawEvent).cast::<u8>(), RAW_EVENT_SIZE) }
            .to_vec()
    }

    #[test]
    fn decodes_ipv4_state_change() {
        let mut r = RawEvent::zeroed();
        r.kind = kind::STATE;
        r.ts_ns = 42;
        r.skaddr = 0xffff_8880_1234_5678;
        r.pid_tgid = (1000u64 << 32) | 1001;
        r.family = AF_INET;
        r.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        r.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        r.sport = 51234;
        r.dport = 80;
        r.oldstate = 1;
        r.newstate = 4;
        r.netns = 4026531993;
        r.flags = flag::HAS_TUPLE | flag::HAS_NETNS | flag::EXITING;
        r.comm[..4].copy_from_slice(b"curl");
        let ev = decode(&raw_bytes(&r)).expect("decode");
        assert_eq!(
            ev.kind,
            EventKind::State {
                old: TcpState::Established,
                new: TcpState::FinWait1
            }
        );
        assert_eq!(ev.pid, 1000);
        assert_eq!(ev.tid, 1001);
        assert_eq!(ev.comm, "curl");
        assert!(ev.exiting);
        assert_eq!(ev.netns, Some(4026531993));
        let t = ev.tuple.expect("tuple");
        assert_eq!(t.local.to_string(), "10.0.0.1:51234");
        assert_eq!(t.remote.to_string(), "10.0.0.2:80");
    }

    #[test]
    fn decodes_ipv6_ingress_rst_packet() {
        let mut r = RawEvent::zeroed();
        r.kind = kind::PACKET;
        r.family = AF_INET6;
        r.saddr = "fd00::1".parse::<Ipv6Addr>().expect("addr").octets();
        r.daddr = "fd00::2".parse::<Ipv6Addr>().expect("addr").octets();
        r.sport = 40000;
        r.dport = 443;
        r.tcp_flags = tcp_flag::RST | tcp_flag::ACK;
        r.ttl = 63;
        r.seq = 7;
        r.flags = flag::HAS_TUPLE | flag::INGRESS;
        let ev = decode(&raw_bytes(&r)).expect("decode");
        let EventKind::Packet(p) = ev.kind else {
            panic!("not a packet: {ev:?}")
        };
        assert_eq!(p.dir, Dir::Ingress);
        assert!(p.rst() && p.ack_flag() && !p.fin() && !p.syn());
        assert_eq!(p.ttl, 63);
        assert_eq!(ev.netns, None);
        assert_eq!(
            ev.tuple.expect("tuple").local.to_string(),
            "[fd00::1]:40000"
        );
    }

    #[test]
    fn v4_mapped_addresses_become_ipv4() {
        let mut r = RawEvent::zeroed();
        r.kind = kind::STATE;
        r.family = AF_INET6;
        r.saddr = "::ffff:10.241.1.2"
            .parse::<Ipv6Addr>()
            .expect("addr")
            .octets();
        r.daddr = "::ffff:10.241.2.2"
            .parse::<Ipv6Addr>()
            .expect("addr")
            .octets();
        r.sport = 40000;
        r.dport = 8080;
        r.flags = flag::HAS_TUPLE;
        let t = decode(&raw_bytes(&r))
            .expect("decode")
            .tuple
            .expect("tuple");
        assert_eq!(t.local.to_string(), "10.241.1.2:40000");
        assert_eq!(t.remote.to_string(), "10.241.2.2:8080");
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        assert_eq!(decode(&[0u8; 12]), Err(DecodeError::Short(12)));
        let mut r = RawEvent::zeroed();
        r.kind = 99;
        assert_eq!(decode(&raw_bytes(&r)), Err(DecodeError::UnknownKind(99)));
    }

    #[test]
    fn missing_tuple_flag_means_no_tuple() {
        let mut r = RawEvent::zeroed();
        r.kind = kind::DESTROY;
        r.family = AF_INET;
        let ev = decode(&raw_bytes(&r)).expect("decode");
        assert_eq!(ev.tuple, None);
        assert_eq!(ev.kind, EventKind::Destroy);
    }

    #[test]
    fn decodes_h2_goaway_record_and_rejects_short_ones() {
        let mut rec = H2Record {
            base: RawEvent::zeroed(),
            head: [0; 16],
            payload: [0; 64],
        };
        rec.base.kind = kind::H2_FRAME;
        rec.base.flags = flag::INGRESS;
        rec.base.seq = 1234;
        rec.head[..9].copy_from_slice(&[0, 0, 16, 7, 0, 0, 0, 0, 0]);
        rec.payload[..16].copy_from_slice(b"\x7f\xff\xff\xff\0\0\0\0max_idle");
        rec.base.payload_len = 16;
        // SAFETY: H2Record is plain data of H2_RECORD_SIZE bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&rec as *const H2Record).cast::<u8>(), H2_RECORD_SIZE)
        };
        let ev = decode(bytes).expect("decode");
        let EventKind::H2Frame {
            dir,
            seq,
            head,
            payload,
        } = ev.kind
        else {
            panic!("{ev:?}")
        };
        assert_eq!((dir, seq, head[3]), (Dir::Ingress, 1234, 7));
        assert_eq!(&payload[8..], b"max_idle");
        assert_eq!(
            decode(&bytes[..RAW_EVENT_SIZE]),
            Err(DecodeError::ShortH2(RAW_EVENT_SIZE))
        );
    }

    #[test]
    fn send_reset_without_reason_field() {
        let mut r = RawEvent::zeroed();
        r.kind = kind::SEND_RESET;
        r.value = -1;
        let ev = decode(&raw_bytes(&r)).expect("decode");
        assert_eq!(
            ev.kind,
            EventKind::SendReset {
                state: TcpState::Other(0),
                reason: None
            }
        );
    }
}
