//! Decoding of the kernel's ring-buffer records (`tracer_common::wire`) into typed events.
//!
//! Every record is checked before it is read: its header's version must be this agent's
//! [`WIRE_VERSION`], its kind known, its `size` the size of that kind, and the bytes the
//! ring buffer handed over exactly that many.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use bytes::Bytes;
use thiserror::Error;
use tracer_common::{
    AF_INET, AF_INET6, Endpoints, H2FrameRecord, H2NoteRecord, Header, LifecycleRecord,
    PacketRecord, WIRE_VERSION, flag, kind, proto, tcp_flag,
    wire::{HEADER_SIZE, Record, record_size},
};

/// Why a ring-buffer record was not decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("ring buffer record of {0} bytes is shorter than the {HEADER_SIZE}-byte record header")]
    Short(usize),
    #[error(
        "kernel record format version {found}, this agent reads version {WIRE_VERSION}: the \
         kernel programs and the agent come from different builds"
    )]
    Version { found: u8 },
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("record of kind {kind} says it is {header} bytes, but that kind is {expected} bytes")]
    SizeMismatch {
        kind: u8,
        header: u16,
        expected: usize,
    },
    #[error("record of kind {kind} is {header} bytes, but the ring buffer handed over {got}")]
    Truncated { kind: u8, header: u16, got: usize },
    #[error("unknown HTTP/2 protocol note {0}")]
    UnknownProto(u8),
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

/// Local and remote endpoints of a socket, stored compactly: every record, index entry
/// and log entry of the connection table holds one or two of these, so they are 38 bytes
/// (and `Option<Tuple>` too) instead of two 32-byte `SocketAddr`s, and hash in two
/// writes. IPv4 addresses sit in the first four bytes of their array, the rest zero.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    laddr: [u8; 16],
    raddr: [u8; 16],
    lport: u16,
    rport: u16,
    family: Family,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Family {
    V4,
    V6,
}

impl std::hash::Hash for Tuple {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        let fam = u64::from(self.family == Family::V6);
        let l = u128::from_ne_bytes(self.laddr);
        let r = u128::from_ne_bytes(self.raddr);
        h.write_u128(l ^ r.rotate_left(64));
        h.write_u64(u64::from(self.lport) | u64::from(self.rport) << 16 | fam << 32);
    }
}

impl std::fmt::Debug for Tuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> {}", self.local(), self.remote())
    }
}

fn octets(ip: IpAddr) -> ([u8; 16], Family) {
    match ip {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (b, Family::V4)
        }
        IpAddr::V6(a) => (a.octets(), Family::V6),
    }
}

impl Tuple {
    /// Both ends must be of one family; an IPv4 end with an IPv6 one is stored as IPv6
    /// (the IPv4 address mapped).
    pub fn new(local: SocketAddr, remote: SocketAddr) -> Self {
        let (mut l, lf) = octets(local.ip());
        let (mut r, rf) = octets(remote.ip());
        let family = if lf == rf {
            lf
        } else {
            if lf == Family::V4 {
                l = mapped(l);
            }
            if rf == Family::V4 {
                r = mapped(r);
            }
            Family::V6
        };
        Tuple {
            laddr: l,
            raddr: r,
            lport: local.port(),
            rport: remote.port(),
            family,
        }
    }

    fn addr(&self, b: [u8; 16], port: u16) -> SocketAddr {
        match self.family {
            Family::V4 => SocketAddr::new(IpAddr::from([b[0], b[1], b[2], b[3]]), port),
            Family::V6 => SocketAddr::new(IpAddr::from(b), port),
        }
    }

    pub fn local(&self) -> SocketAddr {
        self.addr(self.laddr, self.lport)
    }

    pub fn remote(&self) -> SocketAddr {
        self.addr(self.raddr, self.rport)
    }

    /// `conn.family` in the JSON.
    pub fn family_name(&self) -> &'static str {
        match self.family {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    pub fn reversed(self) -> Self {
        Self {
            laddr: self.raddr,
            raddr: self.laddr,
            lport: self.rport,
            rport: self.lport,
            family: self.family,
        }
    }

    /// A tuple is complete once both ports are known (a client socket's local port is
    /// chosen after its SYN_SENT transition).
    pub fn is_complete(&self) -> bool {
        self.lport != 0 && self.rport != 0
    }
}

fn mapped(v4: [u8; 16]) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[10] = 0xff;
    b[11] = 0xff;
    b[12..].copy_from_slice(&v4[..4]);
    b
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
    /// The socket holds the kernel's per-socket packet state (`flag::HAS_STATE`): the
    /// storage iterator lists it until the kernel frees it.
    pub has_state: bool,
    /// When the socket last carried payload, either direction, this segment included
    /// (CLOCK_MONOTONIC); `None` if never.
    pub last_data_ns: Option<u64>,
    /// The socket's cgroup v2 id; 0 when unknown.
    pub cgroup_id: u64,
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
    /// The socket was open, in `state`, when the agent started (its `iter/tcp` walk), in
    /// the cgroup (v2) `cgroup_id` where the kernel could tell.
    Existing {
        state: TcpState,
        cgroup_id: Option<std::num::NonZeroU64>,
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
    pub comm: Comm,
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

/// A process name (`task->comm`), shared: the same few names come with most events, so
/// they are interned instead of allocated per event and per fact.
pub type Comm = std::sync::Arc<str>;

/// Distinct names kept by the interner before it starts over.
const MAX_INTERNED: usize = 4096;

thread_local! {
    static COMMS: std::cell::RefCell<
        std::collections::HashMap<[u8; 16], Comm, foldhash::fast::RandomState>,
    > =
        std::cell::RefCell::new(std::collections::HashMap::default());
    static NO_COMM: Comm = Comm::from("");
}

/// The empty name of records that carry none (packets, frames): shared, since
/// `Comm::from("")` allocates a fresh `Arc` for every such record.
fn no_comm() -> Comm {
    NO_COMM.with(Comm::clone)
}

fn comm(raw: &[u8; 16]) -> Comm {
    if raw[0] == 0 {
        return no_comm();
    }
    COMMS.with(|c| {
        let mut c = c.borrow_mut();
        if let Some(v) = c.get(raw) {
            return v.clone();
        }
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        let v: Comm = String::from_utf8_lossy(&raw[..end]).into();
        if c.len() >= MAX_INTERNED {
            c.clear();
        }
        c.insert(*raw, v.clone());
        v
    })
}

/// Reads a `T` from the start of `bytes` ([`check_header`] has matched the sizes already;
/// the length is checked again here because the read depends on it).
fn read_record<T: Record>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() < size_of::<T>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    // SAFETY: length checked above; records are plain `#[repr(C)]` data valid for any bit
    // pattern, and read_unaligned makes no alignment assumption about the slot.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Checks a record's header against the contract: version, kind, size.
pub fn check_header(bytes: &[u8]) -> Result<Header, DecodeError> {
    let Some(raw) = bytes.first_chunk::<HEADER_SIZE>() else {
        return Err(DecodeError::Short(bytes.len()));
    };
    // SAFETY: `raw` is HEADER_SIZE bytes; Header is plain data valid for any bit pattern.
    let hdr: Header = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast::<Header>()) };
    if hdr.version != WIRE_VERSION {
        return Err(DecodeError::Version { found: hdr.version });
    }
    let Some(expected) = record_size(hdr.kind) else {
        return Err(DecodeError::UnknownKind(hdr.kind));
    };
    if usize::from(hdr.size) != expected {
        return Err(DecodeError::SizeMismatch {
            kind: hdr.kind,
            header: hdr.size,
            expected,
        });
    }
    if bytes.len() != expected {
        return Err(DecodeError::Truncated {
            kind: hdr.kind,
            header: hdr.size,
            got: bytes.len(),
        });
    }
    Ok(hdr)
}

/// Decodes one ring buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let hdr = check_header(bytes)?;
    match hdr.kind {
        kind::PACKET => Ok(from_packet(&read_record::<PacketRecord>(bytes)?)),
        kind::H2_FRAME => Ok(from_h2_frame(&read_record::<H2FrameRecord>(bytes)?)),
        kind::H2_NOTE => from_h2_note(&read_record::<H2NoteRecord>(bytes)?),
        _ => from_lifecycle(&read_record::<LifecycleRecord>(bytes)?),
    }
}

fn dir_of(flags: u8) -> Dir {
    if flags & flag::INGRESS != 0 {
        Dir::Ingress
    } else {
        Dir::Egress
    }
}

/// An event with only the header's facts; the caller fills the rest.
fn bare(hdr: &Header, kind: EventKind) -> Event {
    Event {
        ts_ns: hdr.ts_ns,
        skaddr: hdr.skaddr,
        cookie: 0,
        pid: 0,
        tid: 0,
        comm: no_comm(),
        exiting: false,
        netns: None,
        tuple: None,
        cpu: hdr.cpu,
        kind,
    }
}

fn tuple(flags: u8, ep: &Endpoints) -> Option<Tuple> {
    if flags & flag::HAS_TUPLE == 0 {
        return None;
    }
    match (addr(ep.family, &ep.saddr), addr(ep.family, &ep.daddr)) {
        (Some(l), Some(r)) => Some(Tuple::new(
            SocketAddr::new(l, ep.sport),
            SocketAddr::new(r, ep.dport),
        )),
        _ => None,
    }
}

pub fn from_h2_frame(rec: &H2FrameRecord) -> Event {
    let n = usize::from(rec.payload_len).min(rec.payload.len());
    bare(
        &rec.hdr,
        EventKind::H2Frame {
            dir: dir_of(rec.flags),
            seq: rec.seq,
            head: rec.head,
            payload: Bytes::copy_from_slice(&rec.payload[..n]),
        },
    )
}

pub fn from_h2_note(rec: &H2NoteRecord) -> Result<Event, DecodeError> {
    let note = match rec.note {
        proto::H2_PREFACE => ProtoNote::H2Preface,
        proto::H2_SETTINGS_FIRST => ProtoNote::H2SettingsFirst,
        proto::TLS => ProtoNote::Tls,
        proto::OTHER => ProtoNote::Other,
        proto::RESYNCED => ProtoNote::Resynced,
        proto::DESYNC => ProtoNote::Desync,
        proto::GAVE_UP => ProtoNote::GaveUp,
        other => return Err(DecodeError::UnknownProto(other)),
    };
    Ok(bare(
        &rec.hdr,
        EventKind::H2Proto {
            dir: dir_of(rec.flags),
            seq: rec.seq,
            note,
        },
    ))
}

pub fn from_packet(rec: &PacketRecord) -> Event {
    let mut ev = bare(
        &rec.hdr,
        EventKind::Packet(Packet {
            dir: dir_of(rec.flags),
            flags: rec.tcp_flags,
            ttl: rec.ttl,
            seq: rec.seq,
            ack: rec.ack,
            payload_len: rec.payload_len,
            first_in_dir: rec.flags & flag::FIRST_IN_DIR != 0,
            ttl_changed: rec.flags & flag::TTL_CHANGED != 0,
            has_state: rec.flags & flag::HAS_STATE != 0,
            last_data_ns: (rec.last_data_ns != 0).then_some(rec.last_data_ns),
            cgroup_id: rec.cgroup_id,
        }),
    );
    ev.tuple = tuple(rec.flags, &rec.ep);
    ev
}

pub fn from_lifecycle(rec: &LifecycleRecord) -> Result<Event, DecodeError> {
    let state = TcpState::from_kernel(rec.state);
    let kind = match rec.hdr.kind {
        kind::STATE => EventKind::State {
            old: TcpState::from_kernel(rec.old_state),
            new: state,
        },
        kind::RETRANSMIT => EventKind::Retransmit {
            state,
            err: rec.error,
        },
        kind::SEND_RESET => EventKind::SendReset {
            state,
            reason: u32::try_from(rec.reset_reason).ok(),
        },
        kind::RECV_RESET => EventKind::RecvReset,
        kind::DESTROY => EventKind::Destroy,
        kind::ERROR_REPORT => EventKind::ErrorReport { error: rec.error },
        kind::CLOSE_CALL => EventKind::CloseCall { state },
        kind::EXISTING => EventKind::Existing {
            state,
            cgroup_id: (rec.flags & flag::HAS_CGROUP != 0)
                .then(|| std::num::NonZeroU64::new(rec.pid_tgid))
                .flatten(),
        },
        other => return Err(DecodeError::UnknownKind(other)),
    };
    // An EXISTING record's `pid_tgid` is its cgroup id, never a task.
    let pid_tgid = if rec.hdr.kind == kind::EXISTING {
        0
    } else {
        rec.pid_tgid
    };
    Ok(Event {
        ts_ns: rec.hdr.ts_ns,
        skaddr: rec.hdr.skaddr,
        cookie: rec.cookie,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        comm: comm(&rec.comm),
        exiting: rec.flags & flag::EXITING != 0,
        netns: (rec.flags & flag::HAS_NETNS != 0).then_some(rec.netns),
        tuple: tuple(rec.flags, &rec.ep),
        cpu: rec.hdr.cpu,
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
    use tracer_common::wire::{H2_FRAME_SIZE, H2_NOTE_SIZE, LIFECYCLE_SIZE, PACKET_SIZE};

    use super::*;

    /// The bytes of a record as the kernel's emit helper writes them: header filled in.
    fn bytes_of<T: Record>(mut rec: T, k: u8) -> Vec<u8> {
        let h = rec.header_mut();
        h.kind = k;
        h.version = WIRE_VERSION;
        h.size = T::SIZE;
        // SAFETY: records are plain data of exactly size_of::<T>() bytes.
        unsafe { std::slice::from_raw_parts((&rec as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    fn lifecycle(k: u8, f: impl FnOnce(&mut LifecycleRecord)) -> Vec<u8> {
        let mut r = LifecycleRecord::zeroed();
        f(&mut r);
        bytes_of(r, k)
    }

    #[test]
    fn decodes_ipv4_state_change() {
        let bytes = lifecycle(kind::STATE, |r| {
            r.hdr.ts_ns = 42;
            r.hdr.cpu = 1;
            r.hdr.skaddr = 0xffff_8880_1234_5678;
            r.pid_tgid = (1000u64 << 32) | 1001;
            r.ep.family = AF_INET;
            r.ep.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
            r.ep.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
            r.ep.sport = 51234;
            r.ep.dport = 80;
            r.old_state = 1;
            r.state = 4;
            r.netns = 4026531993;
            r.flags = flag::HAS_TUPLE | flag::HAS_NETNS | flag::EXITING;
            r.comm[..4].copy_from_slice(b"curl");
        });
        let ev = decode(&bytes).expect("decode");
        assert_eq!(
            ev.kind,
            EventKind::State {
                old: TcpState::Established,
                new: TcpState::FinWait1
            }
        );
        assert_eq!(
            (ev.ts_ns, ev.cpu, ev.skaddr),
            (42, 1, 0xffff_8880_1234_5678)
        );
        assert_eq!(ev.pid, 1000);
        assert_eq!(ev.tid, 1001);
        assert_eq!(&*ev.comm, "curl");
        assert!(ev.exiting);
        assert_eq!(ev.netns, Some(4026531993));
        let t = ev.tuple.expect("tuple");
        assert_eq!(t.local().to_string(), "10.0.0.1:51234");
        assert_eq!(t.remote().to_string(), "10.0.0.2:80");
    }

    /// Each lifecycle kind reads its own fields, and only those (the others are set to
    /// values that would show up if a kind read the wrong one).
    #[test]
    fn lifecycle_kinds_read_their_own_fields() {
        let cases: &[(&str, u8, EventKind)] = &[
            (
                "state",
                kind::STATE,
                EventKind::State {
                    old: TcpState::SynSent,
                    new: TcpState::Established,
                },
            ),
            (
                "retransmit",
                kind::RETRANSMIT,
                EventKind::Retransmit {
                    state: TcpState::Established,
                    err: 110,
                },
            ),
            (
                "send_reset",
                kind::SEND_RESET,
                EventKind::SendReset {
                    state: TcpState::Established,
                    reason: Some(5),
                },
            ),
            ("recv_reset", kind::RECV_RESET, EventKind::RecvReset),
            ("destroy", kind::DESTROY, EventKind::Destroy),
            (
                "error_report",
                kind::ERROR_REPORT,
                EventKind::ErrorReport { error: 110 },
            ),
            (
                "close_call",
                kind::CLOSE_CALL,
                EventKind::CloseCall {
                    state: TcpState::Established,
                },
            ),
            (
                "existing",
                kind::EXISTING,
                EventKind::Existing {
                    state: TcpState::Established,
                    cgroup_id: None,
                },
            ),
        ];
        for (name, k, want) in cases {
            let bytes = lifecycle(*k, |r| {
                r.old_state = 2;
                r.state = 1;
                r.error = 110;
                r.reset_reason = 5;
                r.cookie = 77;
            });
            let ev = decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(&ev.kind, want, "{name}");
            assert_eq!(ev.cookie, 77, "{name}");
            assert_eq!(ev.tuple, None, "{name}: no HAS_TUPLE, no tuple");
        }
    }

    /// A walked socket's `pid_tgid` is its cgroup id when `HAS_CGROUP` says so, and never
    /// a process either way.
    #[test]
    fn a_walked_socket_carries_its_cgroup_not_a_task() {
        for (flags, want) in [
            (flag::HAS_CGROUP, std::num::NonZeroU64::new(0x1_0000_2a2b)),
            (0, None),
        ] {
            let bytes = lifecycle(kind::EXISTING, |r| {
                r.state = 1;
                r.pid_tgid = 0x1_0000_2a2b;
                r.flags = flags;
            });
            let ev = decode(&bytes).expect("decode");
            assert_eq!(
                ev.kind,
                EventKind::Existing {
                    state: TcpState::Established,
                    cgroup_id: want,
                }
            );
            assert_eq!((ev.pid, ev.tid), (0, 0));
        }
    }

    #[test]
    fn decodes_ipv6_ingress_rst_packet() {
        let mut r = PacketRecord::zeroed();
        r.hdr.skaddr = 9;
        r.ep.family = AF_INET6;
        r.ep.saddr = "fd00::1".parse::<Ipv6Addr>().expect("addr").octets();
        r.ep.daddr = "fd00::2".parse::<Ipv6Addr>().expect("addr").octets();
        r.ep.sport = 40000;
        r.ep.dport = 443;
        r.tcp_flags = tcp_flag::RST | tcp_flag::ACK;
        r.ttl = 63;
        r.seq = 7;
        r.ack = 8;
        r.payload_len = 3;
        r.flags = flag::HAS_TUPLE | flag::INGRESS | flag::TTL_CHANGED;
        let ev = decode(&bytes_of(r, kind::PACKET)).expect("decode");
        let EventKind::Packet(p) = ev.kind else {
            panic!("not a packet: {ev:?}")
        };
        assert_eq!(p.dir, Dir::Ingress);
        assert!(p.rst() && p.ack_flag() && !p.fin() && !p.syn());
        assert_eq!((p.ttl, p.seq, p.ack, p.payload_len), (63, 7, 8, 3));
        assert!(p.ttl_changed && !p.first_in_dir);
        assert_eq!(ev.skaddr, 9);
        assert_eq!(ev.netns, None);
        assert_eq!(
            ev.tuple.expect("tuple").local().to_string(),
            "[fd00::1]:40000"
        );
    }

    #[test]
    fn v4_mapped_addresses_become_ipv4() {
        let bytes = lifecycle(kind::STATE, |r| {
            r.ep.family = AF_INET6;
            r.ep.saddr = "::ffff:10.241.1.2"
                .parse::<Ipv6Addr>()
                .expect("addr")
                .octets();
            r.ep.daddr = "::ffff:10.241.2.2"
                .parse::<Ipv6Addr>()
                .expect("addr")
                .octets();
            r.ep.sport = 40000;
            r.ep.dport = 8080;
            r.flags = flag::HAS_TUPLE;
        });
        let t = decode(&bytes).expect("decode").tuple.expect("tuple");
        assert_eq!(t.local().to_string(), "10.241.1.2:40000");
        assert_eq!(t.remote().to_string(), "10.241.2.2:8080");
    }

    #[test]
    fn missing_tuple_flag_means_no_tuple() {
        let bytes = lifecycle(kind::DESTROY, |r| r.ep.family = AF_INET);
        let ev = decode(&bytes).expect("decode");
        assert_eq!(ev.tuple, None);
        assert_eq!(ev.kind, EventKind::Destroy);
    }

    #[test]
    fn decodes_h2_goaway_frame() {
        let mut rec = H2FrameRecord::zeroed();
        rec.hdr.skaddr = 5;
        rec.flags = flag::INGRESS;
        rec.seq = 1234;
        rec.head = [0, 0, 16, 7, 0, 0, 0, 0, 0];
        rec.payload[..16].copy_from_slice(b"\x7f\xff\xff\xff\0\0\0\0max_idle");
        rec.payload_len = 16;
        let ev = decode(&bytes_of(rec, kind::H2_FRAME)).expect("decode");
        assert_eq!(ev.skaddr, 5);
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
        assert_eq!(payload.len(), 16);
        assert_eq!(&payload[8..], b"max_idle");
    }

    #[test]
    fn h2_frame_payload_len_is_capped_at_the_capture() {
        let mut rec = H2FrameRecord::zeroed();
        rec.head = [0, 0, 8, 6, 0, 0, 0, 0, 0];
        rec.payload_len = 1000;
        let ev = decode(&bytes_of(rec, kind::H2_FRAME)).expect("decode");
        let EventKind::H2Frame { payload, dir, .. } = ev.kind else {
            panic!("{ev:?}")
        };
        assert_eq!(
            (payload.len(), dir),
            (tracer_common::H2_CAPTURE, Dir::Egress)
        );
    }

    #[test]
    fn decodes_h2_notes() {
        let cases: &[(u8, ProtoNote)] = &[
            (proto::H2_PREFACE, ProtoNote::H2Preface),
            (proto::H2_SETTINGS_FIRST, ProtoNote::H2SettingsFirst),
            (proto::TLS, ProtoNote::Tls),
            (proto::OTHER, ProtoNote::Other),
            (proto::RESYNCED, ProtoNote::Resynced),
            (proto::DESYNC, ProtoNote::Desync),
            (proto::GAVE_UP, ProtoNote::GaveUp),
        ];
        for (raw, want) in cases {
            let mut rec = H2NoteRecord::zeroed();
            rec.note = *raw;
            rec.seq = 99;
            rec.flags = flag::INGRESS;
            let ev = decode(&bytes_of(rec, kind::H2_NOTE)).expect("decode");
            assert_eq!(
                ev.kind,
                EventKind::H2Proto {
                    dir: Dir::Ingress,
                    seq: 99,
                    note: *want
                }
            );
        }
    }

    #[test]
    fn send_reset_without_reason_field() {
        let bytes = lifecycle(kind::SEND_RESET, |r| r.reset_reason = -1);
        let ev = decode(&bytes).expect("decode");
        assert_eq!(
            ev.kind,
            EventKind::SendReset {
                state: TcpState::Other(0),
                reason: None
            }
        );
    }

    /// Malformed records: each is refused with the error that names what is wrong.
    #[test]
    fn rejects_malformed_records() {
        let good_state = lifecycle(kind::STATE, |_| {});
        let good_note = {
            let mut r = H2NoteRecord::zeroed();
            r.note = proto::TLS;
            bytes_of(r, kind::H2_NOTE)
        };
        let with = |base: &[u8], f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = base.to_vec();
            f(&mut b);
            b
        };
        let set_size = |b: &mut Vec<u8>, n: u16| b[2..4].copy_from_slice(&n.to_ne_bytes());
        let cases: Vec<(&str, Vec<u8>, DecodeError)> = vec![
            ("empty", vec![], DecodeError::Short(0)),
            ("shorter than a header", vec![0; 12], DecodeError::Short(12)),
            (
                "all zero header: version 0",
                vec![0; LIFECYCLE_SIZE],
                DecodeError::Version { found: 0 },
            ),
            (
                "version 1 (the headerless format)",
                with(&good_state, &|b| b[1] = 1),
                DecodeError::Version { found: 1 },
            ),
            (
                "future version",
                with(&good_state, &|b| b[1] = WIRE_VERSION + 1),
                DecodeError::Version {
                    found: WIRE_VERSION + 1,
                },
            ),
            (
                "unknown kind",
                with(&good_state, &|b| b[0] = 99),
                DecodeError::UnknownKind(99),
            ),
            (
                "kind 0",
                with(&good_state, &|b| b[0] = 0),
                DecodeError::UnknownKind(0),
            ),
            (
                "header size disagrees with the kind",
                with(&good_state, &|b| set_size(b, 128)),
                DecodeError::SizeMismatch {
                    kind: kind::STATE,
                    header: 128,
                    expected: LIFECYCLE_SIZE,
                },
            ),
            (
                "packet kind on a lifecycle-sized record",
                with(&good_state, &|b| b[0] = kind::PACKET),
                DecodeError::SizeMismatch {
                    kind: kind::PACKET,
                    header: LIFECYCLE_SIZE as u16,
                    expected: PACKET_SIZE,
                },
            ),
            (
                "record cut short",
                good_state[..LIFECYCLE_SIZE - 8].to_vec(),
                DecodeError::Truncated {
                    kind: kind::STATE,
                    header: LIFECYCLE_SIZE as u16,
                    got: LIFECYCLE_SIZE - 8,
                },
            ),
            (
                "record with trailing bytes",
                with(&good_note, &|b| b.extend_from_slice(&[0; 8])),
                DecodeError::Truncated {
                    kind: kind::H2_NOTE,
                    header: H2_NOTE_SIZE as u16,
                    got: H2_NOTE_SIZE + 8,
                },
            ),
            (
                "h2 frame cut to a note's size",
                {
                    let b = bytes_of(H2FrameRecord::zeroed(), kind::H2_FRAME);
                    b[..H2_NOTE_SIZE].to_vec()
                },
                DecodeError::Truncated {
                    kind: kind::H2_FRAME,
                    header: H2_FRAME_SIZE as u16,
                    got: H2_NOTE_SIZE,
                },
            ),
            (
                "unknown protocol note",
                with(&good_note, &|b| b[28] = 42),
                DecodeError::UnknownProto(42),
            ),
        ];
        for (name, bytes, want) in cases {
            let got = decode(&bytes);
            assert_eq!(got.as_ref().err(), Some(&want), "{name}: {got:?}");
            // Every refusal explains itself in words.
            assert!(!want.to_string().is_empty(), "{name}");
        }
    }

    #[test]
    fn version_error_names_the_cause() {
        let msg = DecodeError::Version { found: 1 }.to_string();
        assert!(
            msg.contains("version 1") && msg.contains("different builds"),
            "{msg}"
        );
    }
}
