//! The ring-buffer record format: a contract between the kernel programs and the agent.
//!
//! Every record starts with a [`Header`] at offset 0, followed by the payload of its kind:
//!
//! | kind                                   | struct              | size |
//! |----------------------------------------|---------------------|------|
//! | `STATE` … `CLOSE_CALL`, `EXISTING`     | [`LifecycleRecord`] | 112  |
//! | `PACKET`                               | [`PacketRecord`]    | 96   |
//! | `H2_FRAME`                             | [`H2FrameRecord`]   | 112  |
//! | `H2_NOTE`                              | [`H2NoteRecord`]    | 32   |
//!
//! The agent checks `version`, `kind` and `size` before it looks at anything else, so a
//! kernel object and an agent built from different revisions fail loudly instead of
//! misreading each other. Bump [`WIRE_VERSION`] whenever a layout or a field's meaning
//! changes.
//!
//! Addresses and ports ([`Endpoints`]) are normalised to the local socket's view: `saddr` /
//! `sport` are local, `daddr` / `dport` remote, ports in host byte order, addresses in
//! network order (IPv4 in the first 4 bytes, the rest zero).

use core::mem::{offset_of, size_of};

/// Version of this format, in every [`Header`]. Version 6 carries the socket's cgroup id
/// in an `EXISTING` record's `pid_tgid` (`flag::HAS_CGROUP`); version 5 added the
/// `EXISTING` kind;
/// version 4 `PacketRecord::cgroup_id`;
/// version 3 `PacketRecord::last_data_ns`; version 2 was the first with a header; version 1
/// was the single 128/208-byte `RawEvent`/`H2Record` layout without a header.
pub const WIRE_VERSION: u8 = 6;

/// What produced a record. [`Header::kind`].
pub mod kind {
    /// `sock:inet_sock_set_state` for a TCP socket. [`LifecycleRecord`](super::LifecycleRecord).
    pub const STATE: u8 = 1;
    /// `tcp:tcp_retransmit_skb`. [`LifecycleRecord`](super::LifecycleRecord).
    pub const RETRANSMIT: u8 = 2;
    /// `tcp:tcp_send_reset` (the kernel built a RST; `skaddr` is 0 when no socket owns it).
    /// [`LifecycleRecord`](super::LifecycleRecord).
    pub const SEND_RESET: u8 = 3;
    /// `tcp:tcp_receive_reset`. [`LifecycleRecord`](super::LifecycleRecord).
    pub const RECV_RESET: u8 = 4;
    /// `tcp:tcp_destroy_sock`, written only once a record may have been lost (a full ring
    /// buffer or an unreadable tracepoint record since the load): until then it would
    /// repeat the socket's CLOSE. [`LifecycleRecord`](super::LifecycleRecord).
    pub const DESTROY: u8 = 5;
    /// `sock:inet_sk_error_report` (carries the tuple and the error, not the socket: `skaddr`
    /// is 0). [`LifecycleRecord`](super::LifecycleRecord).
    pub const ERROR_REPORT: u8 = 6;
    /// `tcp_close()` entry, through fentry or kprobe. [`LifecycleRecord`](super::LifecycleRecord).
    pub const CLOSE_CALL: u8 = 7;
    /// A TCP segment seen by cgroup_skb ingress or egress. [`PacketRecord`](super::PacketRecord).
    pub const PACKET: u8 = 8;
    /// An HTTP/2 frame header (and, for control frames, a payload prefix).
    /// [`H2FrameRecord`](super::H2FrameRecord).
    pub const H2_FRAME: u8 = 9;
    /// What the payload of a socket turned out to be, or a change of frame sync.
    /// [`H2NoteRecord`](super::H2NoteRecord), `note` one of [`proto`](super::proto).
    pub const H2_NOTE: u8 = 10;
    /// A TCP socket that was open when the agent started, from the `iter/tcp` iterator the
    /// agent reads once at start (run in the agent's context: no task fields).
    /// [`LifecycleRecord`](super::LifecycleRecord).
    pub const EXISTING: u8 = 11;

    /// Whether `k` is one of the lifecycle kinds (a [`LifecycleRecord`](super::LifecycleRecord)).
    pub const fn is_lifecycle(k: u8) -> bool {
        (k >= STATE && k <= CLOSE_CALL) || k == EXISTING
    }
}

/// [`H2NoteRecord::note`] values.
pub mod proto {
    /// The client connection preface was seen in this direction (HTTP/2 confirmed).
    pub const H2_PREFACE: u8 = 1;
    /// A TLS record header opened the stream: encrypted, not parsed.
    pub const TLS: u8 = 2;
    /// Neither: plain TCP or another protocol, not parsed.
    pub const OTHER: u8 = 3;
    /// A direction first seen mid-stream found frame boundaries again.
    pub const RESYNCED: u8 = 4;
    /// Bytes holding a frame header were never seen (a capture gap): sync lost.
    pub const DESYNC: u8 = 5;
    /// A direction started with a SETTINGS frame (the server side of HTTP/2).
    pub const H2_SETTINGS_FIRST: u8 = 6;
    /// Resynchronisation was given up after too many segments.
    pub const GAVE_UP: u8 = 7;
}

/// Bits of the `flags` byte of lifecycle, packet and HTTP/2 records. Each bit says which
/// records may set it; it is zero in all others.
pub mod flag {
    /// Lifecycle: the current task had `PF_EXITING` set (crash, `kill -9`, exit).
    pub const EXITING: u8 = 1 << 0;
    /// Packet, H2 frame, H2 note: received by the local socket (ingress); clear: sent.
    pub const INGRESS: u8 = 1 << 1;
    /// Packet: the first packet of this socket seen in this direction.
    pub const FIRST_IN_DIR: u8 = 1 << 2;
    /// Packet: ingress TTL / hop limit differs from the one recorded for this socket.
    pub const TTL_CHANGED: u8 = 1 << 3;
    /// Lifecycle: `netns` is valid.
    pub const HAS_NETNS: u8 = 1 << 4;
    /// Lifecycle, packet: the [`Endpoints`](super::Endpoints) are valid.
    pub const HAS_TUPLE: u8 = 1 << 5;
    /// Lifecycle `EXISTING`: `pid_tgid` holds the socket's cgroup (v2) id instead (the walk
    /// runs in the agent's read(), so it has no task of the socket's to report).
    pub const HAS_CGROUP: u8 = 1 << 6;
    /// Packet: the socket holds the packet hooks' per-socket state (socket storage), which
    /// the kernel frees only with the socket: from then on, while the socket lives, the
    /// storage iterator lists it (`sk_storage_existing`). Clear for a socket without it (a
    /// request or TIME_WAIT socket, or storage the kernel refused). Added within version 6:
    /// older producers never set it, and a reader takes its absence as "not known".
    pub const HAS_STATE: u8 = 1 << 7;
}

/// Starts every record.
///
/// Not ordered largest first on purpose: `kind`, `version` and `size` are the first four
/// bytes so that every future version can be recognised by reading the same four bytes.
/// The order still leaves every field naturally aligned, so there is no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// One of [`kind`].
    pub kind: u8,
    /// [`WIRE_VERSION`] of the producer.
    pub version: u8,
    /// Size of the whole record in bytes, this header included.
    pub size: u16,
    /// CPU that produced the record (`bpf_get_smp_processor_id()`).
    pub cpu: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Kernel address of the `struct sock` the record is about; 0 when none (error reports,
    /// resets the kernel sent without a socket).
    pub skaddr: u64,
}

/// Local and remote endpoints, in the local socket's view (see the [module docs](self)).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// `AF_INET` or `AF_INET6`; 0 when unknown.
    pub family: u16,
    /// Explicit tail padding: rounds 38 bytes of fields up to 40, so the records that embed
    /// it have no implicit hole before their next 4-byte field.
    pub _pad: [u8; 2],
}

/// A lifecycle fact: kinds `STATE`, `RETRANSMIT`, `SEND_RESET`, `RECV_RESET`, `DESTROY`,
/// `ERROR_REPORT`, `CLOSE_CALL`, `EXISTING`.
///
/// Fields a kind does not fill are zero. Which kind fills what:
///
/// | field          | filled by                                                         |
/// |----------------|-------------------------------------------------------------------|
/// | `cookie`       | `RECV_RESET`, `DESTROY` when the tracepoint has it                |
/// | `pid_tgid`, `comm` | `STATE`, `SEND_RESET`, `ERROR_REPORT`, `CLOSE_CALL`          |
/// | `pid_tgid` as a cgroup id | `EXISTING`, when `flag::HAS_CGROUP`                     |
/// | `ep`           | all, when `flag::HAS_TUPLE`                                       |
/// | `netns`        | `STATE`, `SEND_RESET`, `CLOSE_CALL`, `EXISTING`, when `flag::HAS_NETNS` |
/// | `error`        | `RETRANSMIT`: the tracepoint's `err` (0 where absent); `ERROR_REPORT`: `error`, a positive errno |
/// | `reset_reason` | `SEND_RESET`: `enum sk_rst_reason`, or -1 when the kernel has none |
/// | `old_state`    | `STATE`: the state left                                           |
/// | `state`        | `STATE`: the state entered; `RETRANSMIT`, `SEND_RESET`, `CLOSE_CALL`, `EXISTING`: the socket's state at the event |
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LifecycleRecord {
    pub hdr: Header,
    /// Socket cookie when the tracepoint provides it.
    pub cookie: u64,
    /// `bpf_get_current_pid_tgid()`: tgid in the high half, tid in the low half.
    pub pid_tgid: u64,
    pub ep: Endpoints,
    /// Network namespace inode number, when `flag::HAS_NETNS` is set.
    pub netns: u32,
    pub error: i32,
    pub reset_reason: i32,
    pub old_state: u8,
    pub state: u8,
    /// Bits from [`flag`]: `EXITING`, `HAS_NETNS`, `HAS_TUPLE`.
    pub flags: u8,
    /// Explicit padding: `comm` (alignment 1) follows three bytes, and naming this byte keeps
    /// the record free of implicit holes.
    pub _pad: u8,
    /// `bpf_get_current_comm()`, NUL-padded.
    pub comm: [u8; 16],
}

/// A TCP segment of a local socket (cgroup_skb): kind `PACKET`.
///
/// Written for SYN, FIN and RST segments, the first segment in each direction and an
/// ingress TTL change; the HTTP/2 walker reads the others without a record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketRecord {
    pub hdr: Header,
    pub ep: Endpoints,
    /// TCP sequence number.
    pub seq: u32,
    /// TCP acknowledgement number.
    pub ack: u32,
    /// TCP payload length in bytes.
    pub payload_len: u32,
    /// TCP flags byte ([`tcp_flag`](crate::tcp_flag)).
    pub tcp_flags: u8,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// Bits from [`flag`]: `INGRESS`, `FIRST_IN_DIR`, `TTL_CHANGED`, `HAS_TUPLE`.
    pub flags: u8,
    /// Explicit padding to the 8-byte alignment of `last_data_ns`.
    pub _pad: u8,
    /// When the socket last sent or received a segment with payload, this one included
    /// (`bpf_ktime_get_ns`, CLOCK_MONOTONIC); 0: none seen. On a FIN or RST it gives how
    /// long the connection had been idle when it ended: the idle timeout of whatever ended
    /// it, even when the payload is TLS.
    pub last_data_ns: u64,
    /// The cgroup v2 id of the socket (`bpf_skb_cgroup_id`: the cgroup its creator ran in,
    /// which an accepted socket takes from its listener); 0 when unknown. It names the pod
    /// that owns the socket when no event ran in the owner's context (a socket reset by its
    /// peer, one open before the agent).
    pub cgroup_id: u64,
}

/// One HTTP/2 frame: kind `H2_FRAME`. Control frames (RST_STREAM, SETTINGS, PING, GOAWAY)
/// come with a payload prefix; HEADERS and END_STREAM DATA with the header only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct H2FrameRecord {
    pub hdr: Header,
    /// TCP sequence number of the frame's first header byte.
    pub seq: u32,
    /// Valid bytes in `payload` (at most [`H2_CAPTURE`](crate::H2_CAPTURE)).
    pub payload_len: u16,
    /// Bits from [`flag`]: `INGRESS`.
    pub flags: u8,
    /// Explicit padding: rounds `seq`, `payload_len` and `flags` up to 8 bytes so `head`
    /// starts at offset 32.
    pub _pad: u8,
    /// The raw 9-byte frame header.
    pub head: [u8; 9],
    /// Explicit padding so `payload` starts on an 8-byte boundary (the kernel copies into
    /// it with `bpf_skb_load_bytes`, whose destination is cheaper to prove when aligned).
    pub _pad2: [u8; 7],
    pub payload: [u8; crate::H2_CAPTURE],
}

/// A protocol or sync note about one direction of a socket: kind `H2_NOTE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct H2NoteRecord {
    pub hdr: Header,
    /// TCP sequence number the note refers to (the segment that decided it).
    pub seq: u32,
    /// One of [`proto`].
    pub note: u8,
    /// Bits from [`flag`]: `INGRESS`.
    pub flags: u8,
    /// Explicit tail padding to the 8-byte alignment of the header.
    pub _pad: [u8; 2],
}

pub const HEADER_SIZE: usize = 24;
pub const LIFECYCLE_SIZE: usize = 112;
pub const PACKET_SIZE: usize = 96;
pub const H2_FRAME_SIZE: usize = 112;
pub const H2_NOTE_SIZE: usize = 32;

/// The record size a kind must have, `None` for an unknown kind.
pub const fn record_size(k: u8) -> Option<usize> {
    if kind::is_lifecycle(k) {
        Some(LIFECYCLE_SIZE)
    } else if k == kind::PACKET {
        Some(PACKET_SIZE)
    } else if k == kind::H2_FRAME {
        Some(H2_FRAME_SIZE)
    } else if k == kind::H2_NOTE {
        Some(H2_NOTE_SIZE)
    } else {
        None
    }
}

// The contract, checked at compile time on both sides. Offsets are listed for every field
// so a reordering cannot slip through with the same total size.
const _: () = {
    assert!(size_of::<Header>() == HEADER_SIZE);
    assert!(offset_of!(Header, kind) == 0);
    assert!(offset_of!(Header, version) == 1);
    assert!(offset_of!(Header, size) == 2);
    assert!(offset_of!(Header, cpu) == 4);
    assert!(offset_of!(Header, ts_ns) == 8);
    assert!(offset_of!(Header, skaddr) == 16);

    assert!(size_of::<Endpoints>() == 40);
    assert!(offset_of!(Endpoints, saddr) == 0);
    assert!(offset_of!(Endpoints, daddr) == 16);
    assert!(offset_of!(Endpoints, sport) == 32);
    assert!(offset_of!(Endpoints, dport) == 34);
    assert!(offset_of!(Endpoints, family) == 36);
    assert!(offset_of!(Endpoints, _pad) == 38);

    assert!(size_of::<LifecycleRecord>() == LIFECYCLE_SIZE);
    assert!(offset_of!(LifecycleRecord, hdr) == 0);
    assert!(offset_of!(LifecycleRecord, cookie) == 24);
    assert!(offset_of!(LifecycleRecord, pid_tgid) == 32);
    assert!(offset_of!(LifecycleRecord, ep) == 40);
    assert!(offset_of!(LifecycleRecord, netns) == 80);
    assert!(offset_of!(LifecycleRecord, error) == 84);
    assert!(offset_of!(LifecycleRecord, reset_reason) == 88);
    assert!(offset_of!(LifecycleRecord, old_state) == 92);
    assert!(offset_of!(LifecycleRecord, state) == 93);
    assert!(offset_of!(LifecycleRecord, flags) == 94);
    assert!(offset_of!(LifecycleRecord, _pad) == 95);
    assert!(offset_of!(LifecycleRecord, comm) == 96);

    assert!(size_of::<PacketRecord>() == PACKET_SIZE);
    assert!(offset_of!(PacketRecord, hdr) == 0);
    assert!(offset_of!(PacketRecord, ep) == 24);
    assert!(offset_of!(PacketRecord, seq) == 64);
    assert!(offset_of!(PacketRecord, ack) == 68);
    assert!(offset_of!(PacketRecord, payload_len) == 72);
    assert!(offset_of!(PacketRecord, tcp_flags) == 76);
    assert!(offset_of!(PacketRecord, ttl) == 77);
    assert!(offset_of!(PacketRecord, flags) == 78);
    assert!(offset_of!(PacketRecord, _pad) == 79);
    assert!(offset_of!(PacketRecord, last_data_ns) == 80);
    assert!(offset_of!(PacketRecord, cgroup_id) == 88);

    assert!(size_of::<H2FrameRecord>() == H2_FRAME_SIZE);
    assert!(offset_of!(H2FrameRecord, hdr) == 0);
    assert!(offset_of!(H2FrameRecord, seq) == 24);
    assert!(offset_of!(H2FrameRecord, payload_len) == 28);
    assert!(offset_of!(H2FrameRecord, flags) == 30);
    assert!(offset_of!(H2FrameRecord, _pad) == 31);
    assert!(offset_of!(H2FrameRecord, head) == 32);
    assert!(offset_of!(H2FrameRecord, _pad2) == 41);
    assert!(offset_of!(H2FrameRecord, payload) == 48);

    assert!(size_of::<H2NoteRecord>() == H2_NOTE_SIZE);
    assert!(offset_of!(H2NoteRecord, hdr) == 0);
    assert!(offset_of!(H2NoteRecord, seq) == 24);
    assert!(offset_of!(H2NoteRecord, note) == 28);
    assert!(offset_of!(H2NoteRecord, flags) == 29);
    assert!(offset_of!(H2NoteRecord, _pad) == 30);

    // Sizes fit the header's u16 and keep ring-buffer records 8-byte aligned.
    assert!(LIFECYCLE_SIZE.is_multiple_of(8) && PACKET_SIZE.is_multiple_of(8));
    assert!(H2_FRAME_SIZE.is_multiple_of(8) && H2_NOTE_SIZE.is_multiple_of(8));
};

/// A record type: a fixed size and a [`Header`] at offset 0. Used by the kernel's one
/// emit helper (reserve, fill the header, fill the payload, submit) and by the agent's
/// decoder.
pub trait Record: Copy {
    /// Size on the wire; also what [`Header::size`] says.
    const SIZE: u16;
    /// The header every record starts with.
    fn header_mut(&mut self) -> &mut Header;
}

impl Record for LifecycleRecord {
    const SIZE: u16 = LIFECYCLE_SIZE as u16;
    #[inline(always)]
    fn header_mut(&mut self) -> &mut Header {
        &mut self.hdr
    }
}
impl Record for PacketRecord {
    const SIZE: u16 = PACKET_SIZE as u16;
    #[inline(always)]
    fn header_mut(&mut self) -> &mut Header {
        &mut self.hdr
    }
}
impl Record for H2FrameRecord {
    const SIZE: u16 = H2_FRAME_SIZE as u16;
    #[inline(always)]
    fn header_mut(&mut self) -> &mut Header {
        &mut self.hdr
    }
}
impl Record for H2NoteRecord {
    const SIZE: u16 = H2_NOTE_SIZE as u16;
    #[inline(always)]
    fn header_mut(&mut self) -> &mut Header {
        &mut self.hdr
    }
}

impl Header {
    pub const fn zeroed() -> Self {
        Self {
            kind: 0,
            version: 0,
            size: 0,
            cpu: 0,
            ts_ns: 0,
            skaddr: 0,
        }
    }
}

impl Endpoints {
    pub const fn zeroed() -> Self {
        Self {
            saddr: [0; 16],
            daddr: [0; 16],
            sport: 0,
            dport: 0,
            family: 0,
            _pad: [0; 2],
        }
    }
}

impl LifecycleRecord {
    pub const fn zeroed() -> Self {
        Self {
            hdr: Header::zeroed(),
            cookie: 0,
            pid_tgid: 0,
            ep: Endpoints::zeroed(),
            netns: 0,
            error: 0,
            reset_reason: 0,
            old_state: 0,
            state: 0,
            flags: 0,
            _pad: 0,
            comm: [0; 16],
        }
    }
}

impl PacketRecord {
    pub const fn zeroed() -> Self {
        Self {
            hdr: Header::zeroed(),
            ep: Endpoints::zeroed(),
            seq: 0,
            ack: 0,
            payload_len: 0,
            tcp_flags: 0,
            ttl: 0,
            flags: 0,
            _pad: 0,
            last_data_ns: 0,
            cgroup_id: 0,
        }
    }
}

impl H2FrameRecord {
    pub const fn zeroed() -> Self {
        Self {
            hdr: Header::zeroed(),
            seq: 0,
            payload_len: 0,
            flags: 0,
            _pad: 0,
            head: [0; 9],
            _pad2: [0; 7],
            payload: [0; crate::H2_CAPTURE],
        }
    }
}

impl H2NoteRecord {
    pub const fn zeroed() -> Self {
        Self {
            hdr: Header::zeroed(),
            seq: 0,
            note: 0,
            flags: 0,
            _pad: [0; 2],
        }
    }
}
