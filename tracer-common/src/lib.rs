//! Types shared by the kernel programs (`tracer-ebpf`) and the agent (`tracer-user`).
//!
//! Layout rules: `#[repr(C)]`, fields largest first, explicit padding, no `bool`,
//! and a compile-time size check so both sides agree byte for byte.
#![no_std]

/// What produced a [`RawEvent`].
pub mod kind {
    /// `sock:inet_sock_set_state` for a TCP socket.
    pub const STATE: u8 = 1;
    /// `tcp:tcp_retransmit_skb`.
    pub const RETRANSMIT: u8 = 2;
    /// `tcp:tcp_send_reset` (the kernel built a RST; `skaddr` is 0 when no socket owns it).
    pub const SEND_RESET: u8 = 3;
    /// `tcp:tcp_receive_reset`.
    pub const RECV_RESET: u8 = 4;
    /// `tcp:tcp_destroy_sock`.
    pub const DESTROY: u8 = 5;
    /// `sock:inet_sk_error_report` (carries the tuple and the error, not the socket).
    pub const ERROR_REPORT: u8 = 6;
    /// `tcp_close()` entry, through fentry or kprobe.
    pub const CLOSE_CALL: u8 = 7;
    /// A TCP segment seen by cgroup_skb ingress or egress.
    pub const PACKET: u8 = 8;
    /// An HTTP/2 frame header (and, for control frames, a payload prefix): an [`H2Record`].
    pub const H2_FRAME: u8 = 9;
    /// What the payload of a socket turned out to be, or a change of frame sync: an
    /// [`H2Record`] whose `base.value` is one of [`proto`].
    pub const H2_PROTO: u8 = 10;
}

/// `base.value` of a `H2_PROTO` record.
pub mod proto {
    /// The client connection preface was seen in this direction (HTTP/2 confirmed).
    pub const H2_PREFACE: i32 = 1;
    /// A TLS record header opened the stream: encrypted, not parsed.
    pub const TLS: i32 = 2;
    /// Neither: plain TCP or another protocol, not parsed.
    pub const OTHER: i32 = 3;
    /// A direction first seen mid-stream found frame boundaries again.
    pub const RESYNCED: i32 = 4;
    /// Bytes holding a frame header were never seen (a capture gap): sync lost.
    pub const DESYNC: i32 = 5;
    /// A direction started with a SETTINGS frame (the server side of HTTP/2).
    pub const H2_SETTINGS_FIRST: i32 = 6;
    /// Resynchronisation was given up after too many segments.
    pub const GAVE_UP: i32 = 7;
}

/// HTTP/2 frame payload bytes copied per control frame.
pub const H2_CAPTURE: usize = 64;

/// Bits of [`RawEvent::flags`].
pub mod flag {
    /// The current task had `PF_EXITING` set: its process is dying (crash, `kill -9`, exit).
    pub const EXITING: u8 = 1 << 0;
    /// Packet direction: received by a local socket (ingress); otherwise sent (egress).
    pub const INGRESS: u8 = 1 << 1;
    /// The first packet of this socket seen in this direction.
    pub const FIRST_IN_DIR: u8 = 1 << 2;
    /// Ingress TTL / hop limit differs from the one recorded for this socket.
    pub const TTL_CHANGED: u8 = 1 << 3;
    /// `netns` is valid.
    pub const HAS_NETNS: u8 = 1 << 4;
    /// The tuple fields are valid.
    pub const HAS_TUPLE: u8 = 1 << 5;
}

/// TCP header flag bits as they appear in byte 13 of the header.
pub mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// Indexes of the per-CPU counter array `COUNTERS`.
pub mod counter {
    /// Events written to the ring buffer.
    pub const EVENTS: u32 = 0;
    /// Events lost because the ring buffer had no room (reservation failed).
    pub const RINGBUF_DROPS: u32 = 1;
    /// TCP segments inspected by the cgroup_skb programs.
    pub const PACKETS: u32 = 2;
    /// Per-socket packet state that could not be stored (map full).
    pub const SKMAP_FAILS: u32 = 3;
    /// Tracepoint fields that could not be read.
    pub const READ_ERRORS: u32 = 4;
    /// HTTP/2 frame headers walked.
    pub const H2_FRAMES: u32 = 5;
    /// HTTP/2 directions that lost frame sync (capture gap).
    pub const H2_DESYNCS: u32 = 6;
    pub const COUNT: u32 = 7;
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// One lifecycle fact, as written by the kernel programs.
///
/// Addresses and ports are normalised to the local socket's view: `saddr`/`sport` are
/// local, `daddr`/`dport` remote, ports in host byte order, addresses in network order
/// (IPv4 in the first 4 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Kernel address of the `struct sock` (0 when none).
    pub skaddr: u64,
    /// Socket cookie when the hook provides it (0 otherwise).
    pub cookie: u64,
    /// `bpf_get_current_pid_tgid()`: tgid in the high half, tid in the low half.
    pub pid_tgid: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Packets: TCP sequence number. Others: 0.
    pub seq: u32,
    /// Packets: TCP acknowledgement number. Others: 0.
    pub ack: u32,
    /// Network namespace inode number, when `flag::HAS_NETNS` is set.
    pub netns: u32,
    /// Error code (error report, retransmit) or reset reason (send_reset).
    pub value: i32,
    /// Packets: TCP payload length in bytes.
    pub payload_len: u32,
    /// CPU that produced the event.
    pub cpu: u32,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub kind: u8,
    pub oldstate: u8,
    pub newstate: u8,
    /// Packets: TCP flags byte.
    pub tcp_flags: u8,
    /// Packets: IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// Bits from [`flag`].
    pub flags: u8,
    pub _pad: [u8; 12],
    pub comm: [u8; 16],
}

pub const RAW_EVENT_SIZE: usize = 128;
const _: () = assert!(core::mem::size_of::<RawEvent>() == RAW_EVENT_SIZE);

impl RawEvent {
    pub const fn zeroed() -> Self {
        Self {
            ts_ns: 0,
            skaddr: 0,
            cookie: 0,
            pid_tgid: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            seq: 0,
            ack: 0,
            netns: 0,
            value: 0,
            payload_len: 0,
            cpu: 0,
            sport: 0,
            dport: 0,
            family: 0,
            kind: 0,
            oldstate: 0,
            newstate: 0,
            tcp_flags: 0,
            ttl: 0,
            flags: 0,
            _pad: [0; 12],
            comm: [0; 16],
        }
    }
}

/// Offset of a tracepoint field that this kernel does not have.
pub const NO_FIELD: u16 = u16::MAX;

/// Where the fields of one tracepoint sit in its record, read from tracefs `format` files
/// by the agent at start-up (layouts differ between kernel versions).
pub mod field {
    pub const SKADDR: usize = 0;
    pub const OLDSTATE: usize = 1;
    pub const NEWSTATE: usize = 2;
    pub const STATE: usize = 3;
    pub const SPORT: usize = 4;
    pub const DPORT: usize = 5;
    pub const FAMILY: usize = 6;
    pub const PROTOCOL: usize = 7;
    pub const SADDR: usize = 8;
    pub const DADDR: usize = 9;
    pub const SADDR_V6: usize = 10;
    pub const DADDR_V6: usize = 11;
    /// `err` (retransmit), `error` (error report) or `reason` (send_reset).
    pub const VALUE: usize = 12;
    pub const COOKIE: usize = 13;
    /// Non-zero when `saddr`/`daddr` are 28-byte `sockaddr_in6`-sized blobs holding a
    /// `sockaddr_in` or `sockaddr_in6` (tcp_send_reset since 6.10) rather than raw addresses.
    pub const SOCKADDR_STYLE: usize = 14;
    pub const COUNT: usize = 16;
}

/// Field offsets of one tracepoint; [`NO_FIELD`] where absent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TpLayout {
    pub off: [u16; field::COUNT],
}

impl TpLayout {
    pub const fn empty() -> Self {
        Self {
            off: [NO_FIELD; field::COUNT],
        }
    }
}

/// Indexes into [`Config::tp`].
pub mod tp {
    pub const SET_STATE: usize = 0;
    pub const RETRANSMIT: usize = 1;
    pub const SEND_RESET: usize = 2;
    pub const RECV_RESET: usize = 3;
    pub const DESTROY: usize = 4;
    pub const ERROR_REPORT: usize = 5;
    pub const COUNT: usize = 6;
}

/// Configuration written into the kernel object's `CONFIG` global before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub tp: [TpLayout; tp::COUNT],
    /// Offset of `sk->__sk_common.skc_net` in `struct sock` (from BTF), `u32::MAX` if unknown.
    pub off_sk_net: u32,
    /// Offset of `net->ns.inum` in `struct net` (from BTF), `u32::MAX` if unknown.
    pub off_net_inum: u32,
    /// Offsets of `skc_v6_rcv_saddr` / `skc_v6_daddr` in `struct sock` for the tcp_close hook.
    pub off_v6_saddr: u32,
    pub off_v6_daddr: u32,
    /// Offset of `flags` in `struct task_struct` (PF_EXITING), `u32::MAX` if unknown.
    pub off_task_flags: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<Config>() == tp::COUNT * field::COUNT * 2 + 24);

impl Config {
    pub const fn empty() -> Self {
        Self {
            tp: [TpLayout::empty(); tp::COUNT],
            off_sk_net: u32::MAX,
            off_net_inum: u32::MAX,
            off_v6_saddr: u32::MAX,
            off_v6_daddr: u32::MAX,
            off_task_flags: u32::MAX,
            _pad: 0,
        }
    }
}

/// `DirState::sync` values.
pub mod sync {
    /// No payload seen yet in this direction.
    pub const AWAIT: u8 = 0;
    /// `next_hdr` is where the next frame header starts.
    pub const SYNCED: u8 = 1;
    /// Frame boundaries unknown (seen mid-stream); resynchronising.
    pub const UNSYNCED: u8 = 2;
    /// Not HTTP/2 (or given up): payload ignored.
    pub const OFF: u8 = 3;
}

/// Per-direction HTTP/2 frame walker state.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirState {
    /// Sequence number of the next frame header (when synced).
    pub next_hdr: u32,
    /// Highest sequence number end seen (bytes before it were already walked).
    pub end: u32,
    /// Bytes of a frame header split across segments, buffered until the rest arrives.
    pub hdr: [u8; 12],
    pub sync: u8,
    /// How many bytes of `hdr` are valid.
    pub hdr_have: u8,
    /// Segments tried while unsynced (bounded).
    pub tries: u8,
    /// Bit 0: `end` is valid.
    pub have_end: u8,
}

const _: () = assert!(core::mem::size_of::<DirState>() == 24);

/// Per-socket packet bookkeeping kept by the cgroup_skb programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PktState {
    /// Index 0: egress (sent), 1: ingress (received).
    pub dir: [DirState; 2],
    /// TTL / hop limit of the first ingress segment (0 = none seen yet).
    pub ttl_in: u8,
    /// Bit 0: an egress segment was seen; bit 1: an ingress segment was seen;
    /// bit 2: the state was created by a SYN (the connection's start was seen).
    pub seen: u8,
    /// 0 unknown, 1 HTTP/2, 2 TLS, 3 other.
    pub proto: u8,
    pub _pad: [u8; 5],
}

const _: () = assert!(core::mem::size_of::<PktState>() == 56);

pub mod sk_proto {
    pub const UNKNOWN: u8 = 0;
    pub const H2: u8 = 1;
    pub const TLS: u8 = 2;
    pub const OTHER: u8 = 3;
}

/// An HTTP/2 fact: the common event, the raw 9-byte frame header and a payload prefix.
/// `base.payload_len` is the number of valid bytes in `payload`; `base.seq` the sequence
/// number of the frame header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct H2Record {
    pub base: RawEvent,
    pub head: [u8; 16],
    pub payload: [u8; H2_CAPTURE],
}

pub const H2_RECORD_SIZE: usize = 208;
const _: () = assert!(core::mem::size_of::<H2Record>() == H2_RECORD_SIZE);

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, `#[repr(C)]`, explicit padding, every bit pattern valid.
    unsafe impl aya::Pod for super::RawEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PktState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::H2Record {}
}
