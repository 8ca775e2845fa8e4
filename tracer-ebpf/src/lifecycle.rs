//! Lifecycle tracepoints: `sock:inet_sock_set_state`, `tcp:tcp_retransmit_skb`,
//! `tcp:tcp_send_reset`, `tcp:tcp_receive_reset`, `tcp:tcp_destroy_sock`,
//! `sock:inet_sk_error_report`. Field offsets come from the agent (tracefs formats differ
//! between kernels). Also the fill helpers lifecycle records share with `close.rs`.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task},
    programs::TracePointContext,
};
use aya_log_ebpf::debug;
use tracer_common::{
    AF_INET, AF_INET6, Endpoints, IPPROTO_TCP, LifecycleRecord, NO_FIELD, field, flag, kind, tp,
};

use crate::{
    config::{TpRec, kread, off_netns, off_task_flags, read_field, tp_off},
    emit::emit,
    maps::records_lost,
};

const TCP_SYN_SENT: i32 = 2;
const TCP_FIN_WAIT1: i32 = 4;
const TCP_CLOSE: i32 = 7;
const TCP_LAST_ACK: i32 = 9;

/// `task_struct.flags` bit set by `do_exit()` before it releases the task's files.
const PF_EXITING: u32 = 0x0000_0004;

pub fn try_set_state(ctx: &TracePointContext) -> Option<()> {
    let Some(rec) = TpRec::load(ctx) else {
        // Counted as `read_errors`; the line names the program (`RUST_LOG=debug` shows
        // kernel-side lines). Kept out of the per-packet programs: aya-log's record costs
        // stack there.
        debug!(ctx, "whoclosed: inet_sock_set_state record unreadable");
        return None;
    };
    let t = tp::SET_STATE;
    let proto: u16 = read_field(&rec, t, field::PROTOCOL)?;
    if proto != IPPROTO_TCP {
        return None;
    }
    let sk: u64 = read_field(&rec, t, field::SKADDR)?;
    let old: i32 = read_field(&rec, t, field::OLDSTATE)?;
    let new: i32 = read_field(&rec, t, field::NEWSTATE)?;
    // The task is the owner's only in connect() and close()/shutdown() (and in an abort to
    // CLOSE); other transitions run in softirq or for whichever task holds the lock, and the
    // agent reads no task from them (`Conn::owner`, `FactKind::is_exit_close`).
    let owner_context = matches!(new, TCP_SYN_SENT | TCP_FIN_WAIT1 | TCP_LAST_ACK | TCP_CLOSE);
    emit(kind::STATE, sk, |ev: &mut LifecycleRecord| {
        ev.old_state = old as u8;
        ev.state = new as u8;
        read_tuple(&rec, t, ev);
        fill_netns(ev, sk);
        if owner_context {
            fill_task(ev);
        }
    });
    Some(())
}

pub fn try_retransmit(ctx: &TracePointContext) -> Option<()> {
    let rec = TpRec::load(ctx)?;
    let t = tp::RETRANSMIT;
    let sk: u64 = read_field(&rec, t, field::SKADDR)?;
    let state: i32 = read_field(&rec, t, field::STATE).unwrap_or(0);
    let err: i32 = read_field(&rec, t, field::VALUE).unwrap_or(0);
    emit(kind::RETRANSMIT, sk, |ev: &mut LifecycleRecord| {
        ev.state = state as u8;
        ev.error = err;
        read_tuple(&rec, t, ev);
    });
    Some(())
}

pub fn try_send_reset(ctx: &TracePointContext) -> Option<()> {
    let rec = TpRec::load(ctx)?;
    let t = tp::SEND_RESET;
    let sk: u64 = read_field(&rec, t, field::SKADDR).unwrap_or(0);
    let state: i32 = read_field(&rec, t, field::STATE).unwrap_or(0);
    let reason: i32 = read_field(&rec, t, field::VALUE).unwrap_or(-1);
    emit(kind::SEND_RESET, sk, |ev: &mut LifecycleRecord| {
        ev.state = state as u8;
        ev.reset_reason = reason;
        read_tuple(&rec, t, ev);
        fill_netns(ev, sk);
        fill_task(ev);
    });
    Some(())
}

/// `tcp_destroy_sock`, only once a record may have been lost ([`records_lost`]): a
/// socket is destroyed in CLOSE, and its state change to CLOSE, which the agent ends the
/// record at, was recorded before it. Until a loss the `DESTROY` record repeated that
/// (two of about 22 records per connection, bench-pipeline); after one it closes the
/// records whose CLOSE went missing.
pub fn try_destroy(ctx: &TracePointContext) -> Option<()> {
    if !records_lost() {
        return None;
    }
    try_sk_event(ctx, tp::DESTROY, kind::DESTROY)
}

/// `tcp_receive_reset` and `tcp_destroy_sock`: the socket, its cookie and its tuple.
pub fn try_sk_event(ctx: &TracePointContext, t: usize, k: u8) -> Option<()> {
    let rec = TpRec::load(ctx)?;
    let sk: u64 = read_field(&rec, t, field::SKADDR)?;
    let cookie: u64 = read_field(&rec, t, field::COOKIE).unwrap_or(0);
    emit(k, sk, |ev: &mut LifecycleRecord| {
        ev.cookie = cookie;
        read_tuple(&rec, t, ev);
    });
    Some(())
}

pub fn try_error_report(ctx: &TracePointContext) -> Option<()> {
    let rec = TpRec::load(ctx)?;
    let t = tp::ERROR_REPORT;
    let proto: u16 = read_field(&rec, t, field::PROTOCOL)?;
    if proto != IPPROTO_TCP {
        return None;
    }
    let error: i32 = read_field(&rec, t, field::VALUE)?;
    emit(kind::ERROR_REPORT, 0, |ev: &mut LifecycleRecord| {
        ev.error = error;
        read_tuple(&rec, t, ev);
        fill_task(ev);
    });
    Some(())
}

/// pid/tid and comm of the current task, and whether it is exiting.
#[inline(always)]
pub fn fill_task(ev: &mut LifecycleRecord) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ev.pid_tgid = pid_tgid;
    if let Ok(comm) = bpf_get_current_comm() {
        ev.comm = comm;
    }
    let off_flags = off_task_flags();
    if off_flags == u32::MAX || pid_tgid == 0 {
        return;
    }
    // SAFETY: helper without preconditions; the task is only read through the checked helper.
    let task = unsafe { bpf_get_current_task() };
    if let Some(flags) = kread::<u32>(task + off_flags as u64) {
        if flags & PF_EXITING != 0 {
            ev.flags |= flag::EXITING;
        }
    }
}

/// Network namespace inode of a socket, through BTF offsets the agent provided.
#[inline(always)]
pub fn fill_netns(ev: &mut LifecycleRecord, sk: u64) {
    let (off_net, off_inum) = off_netns();
    if sk == 0 || off_net == u32::MAX || off_inum == u32::MAX {
        return;
    }
    let Some(net) = kread::<u64>(sk + off_net as u64) else {
        return;
    };
    if net == 0 {
        return;
    }
    if let Some(inum) = kread::<u32>(net + off_inum as u64) {
        ev.netns = inum;
        ev.flags |= flag::HAS_NETNS;
    }
}

/// Local/remote addresses and ports from a tracepoint record.
#[inline(always)]
fn read_tuple(rec: &TpRec, tp: usize, ev: &mut LifecycleRecord) {
    if read_endpoints(rec, tp, &mut ev.ep) {
        ev.flags |= flag::HAS_TUPLE;
    }
}

#[inline(always)]
fn read_endpoints(rec: &TpRec, tp: usize, ep: &mut Endpoints) -> bool {
    if tp_off(tp, field::SOCKADDR_STYLE) != NO_FIELD {
        // 28-byte blobs holding a sockaddr_in or sockaddr_in6.
        let (Some(s), Some(d)) = (
            read_field::<[u8; 28]>(rec, tp, field::SADDR),
            read_field::<[u8; 28]>(rec, tp, field::DADDR),
        ) else {
            return false;
        };
        let family = u16::from_ne_bytes([s[0], s[1]]);
        ep.sport = u16::from_be_bytes([s[2], s[3]]);
        ep.dport = u16::from_be_bytes([d[2], d[3]]);
        if family == AF_INET {
            ep.saddr[..4].copy_from_slice(&s[4..8]);
            ep.daddr[..4].copy_from_slice(&d[4..8]);
        } else if family == AF_INET6 {
            ep.saddr.copy_from_slice(&s[8..24]);
            ep.daddr.copy_from_slice(&d[8..24]);
        } else {
            return false;
        }
        ep.family = family;
        return true;
    }
    let (Some(sport), Some(dport)) = (
        read_field::<u16>(rec, tp, field::SPORT),
        read_field::<u16>(rec, tp, field::DPORT),
    ) else {
        return false;
    };
    ep.sport = sport;
    ep.dport = dport;
    let s6 = read_field::<[u8; 16]>(rec, tp, field::SADDR_V6).unwrap_or([0; 16]);
    let d6 = read_field::<[u8; 16]>(rec, tp, field::DADDR_V6).unwrap_or([0; 16]);
    let family = match read_field::<u16>(rec, tp, field::FAMILY) {
        Some(f) => f,
        // Older layouts without `family`: IPv4 sockets carry v4-mapped v6 fields.
        None if s6[..10] == [0; 10] && s6[10] == 0xff && s6[11] == 0xff => AF_INET,
        None => AF_INET6,
    };
    if family == AF_INET {
        let (Some(s4), Some(d4)) = (
            read_field::<[u8; 4]>(rec, tp, field::SADDR),
            read_field::<[u8; 4]>(rec, tp, field::DADDR),
        ) else {
            return false;
        };
        ep.saddr[..4].copy_from_slice(&s4);
        ep.daddr[..4].copy_from_slice(&d4);
    } else if family == AF_INET6 {
        ep.saddr = s6;
        ep.daddr = d6;
    } else {
        return false;
    }
    ep.family = family;
    true
}
