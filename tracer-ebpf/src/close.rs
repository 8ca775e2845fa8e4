//! `tcp_close()`: fentry where the kernel allows it, kprobe otherwise (chosen by the agent).
//! Both entry points call [`try_tcp_close`], the way libbpf-tools' `tcpconnlat` shares one
//! handler between its fentry and kprobe variants. The `iter/tcp` program that reports the
//! sockets open before the agent ([`try_existing`]) reads a socket the same way.

use aya_ebpf::helpers::bpf_probe_read_kernel_buf;
use tracer_common::{AF_INET, AF_INET6, LifecycleRecord, flag, kind};

use crate::{
    config::{kread, off_cgroup, off_v6_addrs},
    emit::emit,
    lifecycle::{fill_netns, fill_task},
};

// Offsets inside `struct sock_common`, unchanged since Linux 3.x.
const SKC_DADDR: u64 = 0;
const SKC_RCV_SADDR: u64 = 4;
const SKC_DPORT: u64 = 12;
const SKC_NUM: u64 = 14;
const SKC_FAMILY: u64 = 16;
const SKC_STATE: u64 = 18;

// `enum tcp_state` values an iterated socket may have that are not a connection.
const TCP_TIME_WAIT: u8 = 6;
const TCP_CLOSE: u8 = 7;
const TCP_LISTEN: u8 = 10;
const TCP_NEW_SYN_RECV: u8 = 12;

/// Records the socket's state, tuple, netns and the closing task.
#[inline(always)]
pub fn try_tcp_close(sk: u64) -> Option<()> {
    record_sock::<true>(kind::CLOSE_CALL, sk)
}

/// The socket's cgroup (v2) id, where the task would be (`flag::HAS_CGROUP`): the walk has
/// no task of the socket's, and the id names its pod before any of its segments does.
#[inline(always)]
fn fill_cgroup(ev: &mut LifecycleRecord, sk: u64) {
    if let Some(id) = cgroup_id(sk) {
        ev.pid_tgid = id;
        ev.flags |= flag::HAS_CGROUP;
    }
}

#[inline(always)]
fn cgroup_id(sk: u64) -> Option<u64> {
    let (sk_cgrp, cgrp_kn, kn_id) = off_cgroup();
    if sk_cgrp == u32::MAX || cgrp_kn == u32::MAX || kn_id == u32::MAX {
        return None;
    }
    let cgrp: u64 = kread(sk + sk_cgrp as u64)?;
    // Before 5.15 the field is a tagged word: lowest bit set, it holds net_cls/net_prio
    // data instead of the pointer.
    if cgrp == 0 || cgrp & 1 != 0 {
        return None;
    }
    let kn: u64 = kread(cgrp + cgrp_kn as u64)?;
    if kn == 0 {
        return None;
    }
    let id: u64 = kread(kn + kn_id as u64)?;
    (id != 0).then_some(id)
}

/// One socket of the `iter/tcp` walk: a connection's state, tuple and netns. Listeners,
/// closed sockets and the mini-sockets of TIME_WAIT and pending handshakes are not
/// connections of their own and are skipped. The walk runs in the agent's read(): no task.
#[inline(always)]
pub fn try_existing(sk: u64) -> Option<()> {
    if sk == 0 {
        return None;
    }
    let state: u8 = kread(sk + SKC_STATE)?;
    if matches!(
        state,
        TCP_TIME_WAIT | TCP_CLOSE | TCP_LISTEN | TCP_NEW_SYN_RECV
    ) {
        return None;
    }
    record_sock::<false>(kind::EXISTING, sk)
}

#[inline(always)]
fn record_sock<const TASK: bool>(kind: u8, sk: u64) -> Option<()> {
    if sk == 0 {
        return None;
    }
    let family: u16 = kread(sk + SKC_FAMILY)?;
    let state: u8 = kread(sk + SKC_STATE)?;
    let dport_be: u16 = kread(sk + SKC_DPORT)?;
    let sport: u16 = kread(sk + SKC_NUM)?;
    emit(kind, sk, |ev: &mut LifecycleRecord| {
        ev.state = state;
        ev.ep.family = family;
        ev.ep.sport = sport;
        ev.ep.dport = u16::from_be(dport_be);
        // Straight into the record: no Option pairs (see verifier.rs).
        let (so, dof, len) = if family == AF_INET {
            (SKC_RCV_SADDR, SKC_DADDR, 4usize)
        } else if family == AF_INET6 {
            let (os, od) = off_v6_addrs();
            if os == u32::MAX || od == u32::MAX {
                (0, 0, 0)
            } else {
                (os as u64, od as u64, 16usize)
            }
        } else {
            (0, 0, 0)
        };
        if len == 4 || len == 16 {
            // SAFETY: checked kernel reads into the record's own buffers (len <= 16).
            let ok = unsafe {
                bpf_probe_read_kernel_buf((sk + so) as *const u8, &mut ev.ep.saddr[..len]).is_ok()
                    && bpf_probe_read_kernel_buf((sk + dof) as *const u8, &mut ev.ep.daddr[..len])
                        .is_ok()
            };
            if ok {
                ev.flags |= flag::HAS_TUPLE;
            }
        }
        fill_netns(ev, sk);
        if TASK {
            fill_task(ev);
        } else {
            fill_cgroup(ev, sk);
        }
    });
    Some(())
}
