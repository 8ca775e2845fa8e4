//! Configuration the agent writes into the kernel object's `CONFIG` global before load:
//! tracepoint record layouts read from tracefs, and BTF offsets of this kernel.

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

/// Receive-window bound used when the agent wrote none: the largest window TCP window
/// scaling allows (RFC 7323), so nothing TCP could accept is judged unacceptable.
pub const DEFAULT_RCV_WND_MAX: u32 = 1 << 30;

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
    /// Largest receive window a socket on this host can advertise, in bytes (from the
    /// `tcp_rmem` / `rmem_max` sysctls); 0: [`DEFAULT_RCV_WND_MAX`]. The ingress hook treats a
    /// segment further than this from the socket's `rcv_nxt` as one TCP will not accept.
    pub rcv_wnd_max: u32,
    /// Ring-buffer fill level, in bytes, at which a record wakes the agent; below it records
    /// are submitted with `BPF_RB_NO_WAKEUP` and the agent drains on its own short timer.
    /// 0: wake on every record the kernel's default policy would (no batching).
    pub wakeup_bytes: u32,
    /// The socket's cgroup (v2), for the sockets of the start-up walk (from BTF,
    /// `u32::MAX` if unknown): `sk_cgrp_data.cgroup` in `struct sock` (`sk_cgrp_data.val`
    /// before 5.15, a pointer when its lowest bit is clear), `kn` in `struct cgroup` and
    /// `id` in `struct kernfs_node`: the id `bpf_skb_cgroup_id` gives the packet records.
    pub off_sk_cgrp: u32,
    pub off_cgrp_kn: u32,
    pub off_kn_id: u32,
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<TpLayout>() == field::COUNT * 2);
    assert!(size_of::<Config>() == tp::COUNT * field::COUNT * 2 + 40);
    assert!(size_of::<Config>().is_multiple_of(8));
    assert!(offset_of!(Config, off_sk_net) == tp::COUNT * field::COUNT * 2);
    assert!(offset_of!(Config, off_task_flags) == tp::COUNT * field::COUNT * 2 + 16);
};

impl Config {
    pub const fn empty() -> Self {
        Self {
            tp: [TpLayout::empty(); tp::COUNT],
            off_sk_net: u32::MAX,
            off_net_inum: u32::MAX,
            off_v6_saddr: u32::MAX,
            off_v6_daddr: u32::MAX,
            off_task_flags: u32::MAX,
            rcv_wnd_max: 0,
            wakeup_bytes: 0,
            off_sk_cgrp: u32::MAX,
            off_cgrp_kn: u32::MAX,
            off_kn_id: u32::MAX,
        }
    }
}
