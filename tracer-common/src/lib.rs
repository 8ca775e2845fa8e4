//! Types and rules shared by the kernel programs (`tracer-ebpf`) and the agent (`tracer-user`).
//!
//! - [`wire`]: the ring-buffer record format, a versioned contract (header + per-kind payload).
//! - [`config`]: what the agent writes into the kernel object before load.
//! - [`h2sniff`]: the HTTP/2 sniffing rules (preface, TLS, plausible frame headers, chains)
//!   the kernel walker applies and the agent's tests and fuzzer check, one copy of each.
//! - [`tcpaccept`]: whether the receiving socket's TCP accepts a segment (the ingress
//!   hook's evidence rule), pure and unit-tested across sequence wraparound.
//!
//! Layout rules for shared structs: `#[repr(C)]`, fields largest first (except where a
//! comment says why not), explicit padding, no `bool`, and compile-time checks of size and
//! field offsets so both sides agree byte for byte.
#![cfg_attr(not(test), no_std)]

pub mod config;
pub mod h2sniff;
pub mod tcpaccept;
pub mod wire;

pub use config::{Config, DEFAULT_RCV_WND_MAX, NO_FIELD, TpLayout, field, tp};
pub use wire::{
    Endpoints, H2FrameRecord, H2NoteRecord, Header, LifecycleRecord, PacketRecord, WIRE_VERSION,
    flag, kind, proto,
};

/// Size of the kernel's private per-socket packet state (`tracer-ebpf` `PktState`, the value
/// of the `SK_PKT` map). The agent only counts the map's entries, but opening it needs the
/// value size; the kernel crate asserts this at compile time so the two cannot drift.
pub const PKT_STATE_SIZE: usize = 88;

/// HTTP/2 frame payload bytes copied per control frame.
pub const H2_CAPTURE: usize = 64;

/// Slots of the HTTP/2 walker's per-direction program arrays (`WALK_IN`, `WALK_OUT`): the
/// kernel tail-calls them, the agent fills them.
pub mod walk_slot {
    /// The walker's first run over a segment (`skb_h2_in`, `skb_h2_out`), tail-called by
    /// the entry program.
    pub const FIRST: u32 = 0;
    /// Its continuation (`skb_walk_in`, `skb_walk_out`), tail-called when a segment holds
    /// more frame headers than one run walks.
    pub const MORE: u32 = 1;
}

/// TCP header flag bits as they appear in byte 13 of the header.
pub mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// Indexes of the per-CPU counter array `COUNTERS`. The agent exports every one of them
/// (`whoclosed_kernel_*` metrics and `whoclosed stats`); keep the numbers stable.
pub mod counter {
    /// Records written to the ring buffer.
    pub const EVENTS: u32 = 0;
    /// Records lost because the ring buffer had no room (reservation failed).
    pub const RINGBUF_DROPS: u32 = 1;
    /// TCP segments inspected by the cgroup_skb programs.
    pub const PACKETS: u32 = 2;
    /// Per-socket packet state that could not be made (the kernel refused the socket
    /// storage: out of memory, or the socket's option memory limit).
    pub const SKMAP_FAILS: u32 = 3;
    /// Tracepoint fields that could not be read.
    pub const READ_ERRORS: u32 = 4;
    /// HTTP/2 frame headers walked.
    pub const H2_FRAMES: u32 = 5;
    /// HTTP/2 directions that lost frame sync (capture gap).
    pub const H2_DESYNCS: u32 = 6;
    /// Ingress segments the socket's TCP would not accept (RST not at `rcv_nxt`, data or
    /// FIN outside the receive window, ACK of unsent data, SYN on a synchronised
    /// connection): not recorded as evidence and not walked.
    pub const UNACCEPTED: u32 = 7;
    // 8 and 9 counted the inserts and removes of the per-socket map (an LRU hash, then a
    // set of start marks) before the packet state moved to socket storage; unused, not
    // reassigned.
    pub const COUNT: u32 = 10;
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, `#[repr(C)]`, explicit padding, every bit pattern valid.
    unsafe impl aya::Pod for super::Config {}
}
