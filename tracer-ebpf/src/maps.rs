//! Maps, their value types, and the per-CPU counters.
//!
//! Per-socket state lives here, in the kernel, so that records carry decisions and endings
//! rather than every packet.

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    btf_maps::SkStorage,
    helpers::{bpf_sk_fullsock, bpf_sk_storage_get},
    macros::{btf_map, map},
    maps::{Array, PerCpuArray, ProgramArray, RingBuf},
};
use tracer_common::counter;

/// Every record for the agent. Default size; the agent may resize it before load
/// (`--ringbuf-kib`).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

/// One tracepoint record per CPU, copied at the start of a run ([`crate::config::TpRec`]).
/// Twice the copied length, so that masked field offsets stay inside it. Only the classic
/// tracepoint programs use it, and the kernel never nests those on one CPU (`trace_call_bpf`
/// skips a program while another runs there), so a run's copy is not overwritten under it.
#[map]
pub static TP_SCRATCH: PerCpuArray<TpScratch> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
pub struct TpScratch {
    pub b: [u8; 2 * crate::config::TP_COPY],
}

/// Set (slot 0 to 1) once a record may have been lost: a full ring buffer or an unreadable
/// tracepoint record, on any CPU. Until then a `DESTROY` record would only repeat the
/// socket's CLOSE (see `lifecycle::try_destroy`). A tracepoint the kernel skips because
/// another BPF program runs on that CPU (`trace_call_bpf`'s recursion guard) is counted
/// only in the program's `recursion_misses` (from 6.7), which the agent reads at each
/// drain tick (100 ms) and then sets this flag itself; a CLOSE skipped before that ends its
/// record when the socket's address is reused, with `ends_unseen`. On kernels that do not
/// count such skips the agent sets the flag at its start.
#[map]
pub static LOST: Array<u32> = Array::with_max_entries(1, 0);

/// Whether [`LOST`] is set.
#[inline(always)]
pub fn records_lost() -> bool {
    LOST.get(0).is_some_and(|v| *v != 0)
}

/// Per-CPU counters, indexed by [`tracer_common::counter`]; the agent sums them.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Per-socket packet state: socket local storage, which the kernel keeps on the socket
/// itself and frees with it. A lookup is a pointer chase from the socket rather than a
/// hash of its address (the hash map this replaced was about a seventh of a bulk segment's
/// program time), there is no size to outgrow and nothing to evict, and an address the
/// allocator reuses cannot inherit a dead socket's state. Only the packet programs can
/// reach it (classic tracepoints cannot call the storage helpers); whether a socket's start
/// is still ahead is read from its TCP counters when its state is made
/// (`packet::nothing_passed`).
#[btf_map]
pub static SK_PKT: SkStorage<PktState> = SkStorage::new();

/// The full socket behind a context's socket pointer, null for none or for a request or
/// TIME_WAIT socket (which cannot carry storage).
#[inline(always)]
pub fn full_sock(sk: *mut bpf_sock) -> *mut bpf_sock {
    if sk.is_null() {
        return sk;
    }
    // SAFETY: the helper checks its argument (a socket pointer from the context) and
    // returns null for anything but a full socket.
    unsafe { bpf_sk_fullsock(sk) }
}

/// The packet state of the full socket `full` ([`full_sock`], not null), null when it has
/// none. With `init` not null, creates it from `*init` when absent (null when the kernel
/// refuses: out of memory, or the socket's option memory limit).
#[inline(always)]
pub fn pkt_state(full: *mut bpf_sock, init: *const PktState) -> *mut PktState {
    let flags = if init.is_null() {
        0
    } else {
        BPF_SK_STORAGE_GET_F_CREATE as u64
    };
    // SAFETY: the map is a socket storage map of `PktState`, `full` a full socket from
    // `bpf_sk_fullsock` and `init`, when not null, a whole `PktState` (read-only data) that
    // the helper copies.
    unsafe {
        bpf_sk_storage_get(
            core::ptr::addr_of!(SK_PKT).cast_mut().cast(),
            full.cast(),
            init.cast_mut().cast(),
            flags,
        )
    }
    .cast()
}

/// The HTTP/2 walker for egress segments: programs that are loaded, never attached, and
/// tail-called (slots: `tracer_common::walk_slot`). Walking in programs of their own keeps the
/// entry programs small: the verifier explores a called function once per distinct caller
/// state, and the entry program reaches the walk in many, a tail-called program starts from
/// one. One array per direction: a program array takes programs of its first program's type
/// and, on newer kernels, attach type. A slot stays empty when the agent could not load its
/// program: without the first, this direction's payload is not walked (the probe report
/// says so); without the continuation, the walk stops at one run's frames and reports the
/// lost sync.
#[map]
pub static WALK_OUT: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// As [`WALK_OUT`], for ingress segments (`skb_h2_in`, `skb_walk_in`).
#[map]
pub static WALK_IN: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// Adds one to a per-CPU counter. Each call site says, in a `// exported as …` comment,
/// the name of the agent's counter (`whoclosed stats`, metrics) that carries it.
#[inline(always)]
pub fn bump(idx: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
        unsafe { *slot += 1 }
    }
    if (idx == counter::RINGBUF_DROPS || idx == counter::READ_ERRORS)
        && let Some(flag) = LOST.get_ptr_mut(0)
    {
        // SAFETY: slot 0 of a one-entry array; every writer stores the same value.
        unsafe { core::ptr::write_volatile(flag, 1) }
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

/// `PktState::proto` values: what a socket's payload turned out to be.
pub mod sk_proto {
    pub const UNKNOWN: u8 = 0;
    pub const H2: u8 = 1;
    pub const TLS: u8 = 2;
    pub const OTHER: u8 = 3;
}

/// `PktState::seen` bits.
pub mod seen {
    /// An egress segment was seen.
    pub const EGRESS: u8 = 1;
    /// An ingress segment was seen.
    pub const INGRESS: u8 = 2;
    /// The state was created at the connection's start (a SYN or a SYN_SENT/SYN_RECV
    /// transition): its first payload byte will be seen.
    pub const START: u8 = 4;
}

/// Per-direction HTTP/2 frame walker state. A map value: variable offsets into `hdr` are
/// fine here (unlike on the stack, see `verifier.rs`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DirState {
    /// Sequence number of the next frame header (when synced).
    pub next_hdr: u32,
    /// Highest sequence number end seen (bytes before it were already walked).
    pub end: u32,
    /// Bytes of a frame header split across segments, buffered until the rest arrives.
    /// 9 are used; 24 lets the verifier bound a write at a masked offset (< 16) of a masked
    /// length (<= 8) without relating the two.
    pub hdr: [u8; 24],
    /// One of [`sync`].
    pub sync: u8,
    /// How many bytes of `hdr` are valid: 1..=8 of a header split across segments, or 9: a
    /// whole control-frame header that ended a segment, kept until its payload arrives.
    pub hdr_have: u8,
    /// Segments tried while unsynced (bounded).
    pub tries: u8,
    /// 1 when `end` is valid.
    pub have_end: u8,
}

const _: () = assert!(core::mem::size_of::<DirState>() == 36);

/// Per-socket packet bookkeeping kept by the cgroup_skb programs.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PktState {
    /// Index 0: egress (sent), 1: ingress (received).
    pub dir: [DirState; 2],
    /// TTL / hop limit of the first ingress segment (0 = none seen yet).
    pub ttl_in: u8,
    /// Bits from [`seen`].
    pub seen: u8,
    /// One of [`sk_proto`].
    pub proto: u8,
    /// Explicit padding to the 4-byte alignment of `data_tick`.
    pub _pad: u8,
    /// Low 32 bits of `jiffies` when `last_data_ns` was last taken.
    pub data_tick: u32,
    /// When payload last passed, either direction (`bpf_ktime_get_ns`), to within one
    /// scheduler tick: the clock is read on the first payload segment of each tick, and
    /// later segments in the same tick leave it (a clock read per bulk segment was a fifth
    /// of the packet programs' cost). 0: none yet. Reported in every packet record
    /// (`PacketRecord::last_data_ns`).
    pub last_data_ns: u64,
}

const _: () = assert!(core::mem::size_of::<PktState>() == tracer_common::PKT_STATE_SIZE);

pub const EMPTY_DIR: DirState = DirState {
    next_hdr: 0,
    end: 0,
    hdr: [0; 24],
    sync: sync::AWAIT,
    hdr_have: 0,
    tries: 0,
    have_end: 0,
};

/// State of a socket whose start was seen.
pub const FRESH: PktState = PktState {
    dir: [EMPTY_DIR; 2],
    ttl_in: 0,
    seen: seen::START,
    proto: sk_proto::UNKNOWN,
    _pad: 0,
    data_tick: 0,
    last_data_ns: 0,
};

/// State of a socket first met mid-connection (its first payload byte may be missed).
pub const MIDSTREAM: PktState = PktState { seen: 0, ..FRESH };
