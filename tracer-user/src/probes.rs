//! Loading and attaching the kernel programs, with graceful degradation: every optional
//! hook that the kernel refuses is recorded in the [`ProbeReport`] and logged, never fatal.
//! Only `sock:inet_sock_set_state` is indispensable.

use std::{collections::HashMap, fs::File, os::fd::AsFd as _, path::Path};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, ProgramArray, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, FEntry, Iter, KProbe, TracePoint,
    },
};
use log::{info, warn};
use serde::Serialize;
use tracer_common::{Config, counter, walk_slot};

use crate::{
    existing::ExistingWalk,
    kernel::{self, KernelBtf},
    skipped::Skipped,
};

/// How `tcp_close()` is observed. `Tracepoint` means: not at all, state changes only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeMode {
    /// fentry if the kernel allows it, else kprobe, else tracepoints only.
    Auto,
    Fentry,
    Kprobe,
    Tracepoint,
}

impl ProbeMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Fentry => "fentry",
            Self::Kprobe => "kprobe",
            Self::Tracepoint => "tracepoint",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Attached,
    Failed,
    Skipped,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProgramStatus {
    pub program: &'static str,
    pub kind: &'static str,
    pub target: String,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What loaded, what did not and why.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeReport {
    pub requested_mode: ProbeMode,
    /// The mode in force: `fentry`, `kprobe` or `tracepoint` (tcp_close unobserved).
    pub probe_mode: ProbeMode,
    pub kernel: String,
    pub tracefs: String,
    pub btf: bool,
    pub netns_ids: bool,
    pub exit_detection: bool,
    pub packet_facts: bool,
    /// HTTP/2 frames are walked: the packet hooks and the walker programs loaded.
    pub h2_frames: bool,
    /// The connections open before the agent are listed at its start: the `iter/tcp`
    /// program loaded and, once the walk ran, every network namespace found was walked
    /// (entering one needs CAP_SYS_ADMIN). Without it they are met at their first segment
    /// or state change.
    pub existing_sockets: bool,
    pub cgroup: Option<String>,
    pub ringbuf_bytes: u32,
    pub programs: Vec<ProgramStatus>,
    /// Names of this kernel's `sk_rst_reason` values, from BTF (empty without BTF or
    /// before 6.10). Not part of the printed report.
    #[serde(skip)]
    pub rst_reason_names: HashMap<u32, String>,
}

pub struct LoadOptions {
    pub mode: ProbeMode,
    pub ringbuf_bytes: u32,
    pub packets: bool,
    /// Load the HTTP/2 walker programs the packet hooks tail-call (`--no-h2-frames`).
    pub h2_frames: bool,
    /// Walk the TCP sockets open before the start (`--no-existing`).
    pub existing: bool,
}

pub struct Probes {
    pub ebpf: Ebpf,
    pub report: ProbeReport,
    /// The `iter/tcp` walk over the sockets open before the agent, not yet run (see
    /// [`ProbeReport::existing_sockets`]).
    pub existing: Option<ExistingWalk>,
    /// The walk over the sockets that hold packet state, every network namespace at once
    /// (`sk_storage_existing`), for the recheck after lost events; `None` without the
    /// packet hooks or the `iter/tcp` walk, or where the kernel refuses it.
    pub storage_walk: Option<ExistingWalk>,
    /// Kernel-side log records (aya-log). Must outlive the programs that write to its map.
    pub logger: Option<Logger>,
}

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/whoclosed"));

fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct; failure only matters on kernels < 5.11.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        warn!("could not lift RLIMIT_MEMLOCK; map creation may fail on kernels older than 5.11");
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn err_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// The ring-buffer fill level at which the kernel wakes the agent: a quarter of the buffer.
/// Below it the agent drains on its timer ([`DRAIN_INTERVAL`]), so a wake-up comes once per
/// batch, and a burst still leaves three quarters of the buffer to absorb the agent's
/// reaction time.
pub fn wakeup_bytes(ringbuf_bytes: u32) -> u32 {
    ringbuf_bytes / 4
}

/// How often the agent drains the ring buffer without being woken, and judges the
/// connections whose linger is over (one timer: each wake-up of an idle agent costs more
/// than the reading; 20 ms here and a separate 100 ms judging tick kept an agent with
/// nothing to do at 0.7 % of a core).
pub const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Loads the object and attaches every hook the kernel allows, in named steps: check the
/// options, read the tracepoint layouts, read kernel BTF (once), load the object, attach
/// the tracepoints, the tcp_close hook and the packet hooks, then report.
pub fn load(opts: &LoadOptions) -> anyhow::Result<Probes> {
    check_ringbuf_size(opts.ringbuf_bytes)?;
    raise_memlock();
    let tracefs = kernel::ensure_tracefs().context("tracepoints need tracefs")?;

    let mut programs = Vec::new();
    let mut config = Config::empty();
    let usable_tp = read_tracepoint_layouts(&tracefs, &mut config, &mut programs)?;
    let btf = load_kernel_btf();
    let offsets = btf.as_ref().map(KernelBtf::offsets).unwrap_or_default();
    offsets.apply(&mut config);
    config.rcv_wnd_max = kernel::rcv_wnd_max().unwrap_or(0);
    config.wakeup_bytes = wakeup_bytes(opts.ringbuf_bytes);
    let rst_reason_names = btf
        .as_ref()
        .map(KernelBtf::rst_reason_names)
        .unwrap_or_default();
    drop(btf);

    let (mut ebpf, logger) = load_object(&config, opts.ringbuf_bytes)?;
    attach_tracepoints(&mut ebpf, &usable_tp, &mut programs)?;
    // aya's view of the kernel BTF, for the BTF tracing programs (fentry, the iterator):
    // parsed once, when the first of them needs it (a parse took about a second under TCG).
    let aya_btf = LazyBtf::default();
    let probe_mode = attach_close_hook(&mut ebpf, opts.mode, &aya_btf, &mut programs)?;
    let packets = if opts.packets {
        attach_packet_hooks(&mut ebpf, &mut programs, opts.h2_frames)
    } else {
        skip_packet_hooks(&mut programs);
        PacketHooks::default()
    };
    // Last: the walk is read once the hooks are in, so no socket falls between the two.
    let existing = if opts.existing {
        attach_existing_walk(&mut ebpf, &aya_btf, &mut programs)
    } else {
        skip_walk(&mut programs, TCP_WALK, "--no-existing")
    };
    let storage_walk = match (&existing, packets.attached) {
        (Some(_), true) => attach_storage_walk(&mut ebpf, &aya_btf, &mut programs),
        (None, _) => skip_walk(&mut programs, STORAGE_WALK, "no iter/tcp walk"),
        (Some(_), false) => skip_walk(&mut programs, STORAGE_WALK, "no packet hooks"),
    };

    let report = ProbeReport {
        requested_mode: opts.mode,
        probe_mode,
        kernel: kernel_release(),
        tracefs: tracefs.display().to_string(),
        btf: Path::new(kernel::VMLINUX_BTF).exists(),
        netns_ids: offsets.sk_net.is_some() && offsets.net_inum.is_some(),
        exit_detection: offsets.task_flags.is_some(),
        packet_facts: packets.attached,
        h2_frames: packets.h2_walker,
        existing_sockets: existing.is_some(),
        cgroup: packets.cgroup,
        ringbuf_bytes: opts.ringbuf_bytes,
        programs,
        rst_reason_names,
    };
    info!(
        "probe mode {} (requested {}), packet facts {}, HTTP/2 frames {}, kernel {}",
        report.probe_mode.name(),
        report.requested_mode.name(),
        if report.packet_facts { "on" } else { "off" },
        if report.h2_frames { "on" } else { "off" },
        report.kernel
    );
    Ok(Probes {
        ebpf,
        report,
        existing,
        storage_walk,
        logger,
    })
}

fn check_ringbuf_size(bytes: u32) -> anyhow::Result<()> {
    if !bytes.is_power_of_two() || bytes < 4096 {
        bail!("ring buffer size must be a power of two of at least 4096 bytes, got {bytes}");
    }
    Ok(())
}

/// Reads each tracepoint's record layout into `config`; returns the usable ones. Only the
/// core tracepoint is indispensable.
fn read_tracepoint_layouts(
    tracefs: &Path,
    config: &mut Config,
    programs: &mut Vec<ProgramStatus>,
) -> anyhow::Result<Vec<&'static kernel::TracepointSpec>> {
    let mut usable = Vec::new();
    for spec in kernel::TRACEPOINTS {
        match kernel::tracepoint_layout(tracefs, spec) {
            Ok(layout) => {
                config.tp[spec.slot] = layout;
                usable.push(spec);
            }
            Err(e) if spec.name == "inet_sock_set_state" => {
                return Err(anyhow!(e).context("the core tracepoint is unusable on this kernel"));
            }
            Err(e) => programs.push(ProgramStatus {
                program: spec.program,
                kind: "tracepoint",
                target: format!("{}:{}", spec.category, spec.name),
                status: Status::Failed,
                error: Some(e.to_string()),
            }),
        }
    }
    Ok(usable)
}

/// Kernel BTF, parsed once; `None` (with a warning) when absent or unreadable.
fn load_kernel_btf() -> Option<KernelBtf> {
    let path = Path::new(kernel::VMLINUX_BTF);
    if !path.exists() {
        warn!(
            "no kernel BTF at {}; netns ids, exit detection and RST reason names disabled",
            path.display()
        );
        return None;
    }
    match KernelBtf::load(path) {
        Ok(b) => Some(b),
        Err(e) => {
            warn!(
                "kernel BTF unreadable ({e}); netns ids, exit detection and RST reason names disabled"
            );
            None
        }
    }
}

/// The reader of kernel-side log records (aya-log).
pub type Logger = aya_log::EbpfLogger<&'static dyn log::Log>;

fn load_object(config: &Config, ringbuf_bytes: u32) -> anyhow::Result<(Ebpf, Option<Logger>)> {
    let mut ebpf = EbpfLoader::new()
        .override_global("CONFIG", config, true)
        .map_max_entries("EVENTS", ringbuf_bytes)
        .load(OBJECT)
        .context("loading the eBPF object")?;
    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            // Only debug-level kernel messages go through it; nothing is lost without it.
            log::debug!("kernel-side logging unavailable: {e}");
            None
        }
    };
    Ok((ebpf, logger))
}

fn attach_tracepoints(
    ebpf: &mut Ebpf,
    usable: &[&'static kernel::TracepointSpec],
    programs: &mut Vec<ProgramStatus>,
) -> anyhow::Result<()> {
    for spec in usable {
        let target = format!("{}:{}", spec.category, spec.name);
        let res = (|| -> anyhow::Result<()> {
            let p: &mut TracePoint = program_as(ebpf, spec.program)?;
            p.load()?;
            p.attach(spec.category, spec.name)?;
            Ok(())
        })();
        match res {
            Ok(()) => programs.push(ProgramStatus {
                program: spec.program,
                kind: "tracepoint",
                target,
                status: Status::Attached,
                error: None,
            }),
            Err(e) if spec.name == "inet_sock_set_state" => {
                return Err(e.context("attaching the core tracepoint sock:inet_sock_set_state"));
            }
            Err(e) => {
                warn!("tracepoint {target} unavailable: {}", err_chain(e.as_ref()));
                programs.push(ProgramStatus {
                    program: spec.program,
                    kind: "tracepoint",
                    target,
                    status: Status::Failed,
                    error: Some(err_chain(e.as_ref())),
                });
            }
        }
    }
    Ok(())
}

/// What the packet hooks gave: `attached` only when both directions are.
#[derive(Default)]
struct PacketHooks {
    attached: bool,
    /// The packet hooks and both first-run walker programs loaded.
    h2_walker: bool,
    cgroup: Option<String>,
}

const SKB_PROGRAMS: [(&str, CgroupSkbAttachType); 2] = [
    ("skb_ingress", CgroupSkbAttachType::Ingress),
    ("skb_egress", CgroupSkbAttachType::Egress),
];

fn attach_packet_hooks(
    ebpf: &mut Ebpf,
    programs: &mut Vec<ProgramStatus>,
    h2_frames: bool,
) -> PacketHooks {
    let root = match kernel::cgroup2_root() {
        Ok(root) => root,
        Err(e) => {
            warn!("{e}; FIN/RST direction and TTL evidence disabled");
            let names = WALK_PROGRAMS
                .iter()
                .map(|w| (w.program, "cgroup_skb tail call"))
                .chain(SKB_PROGRAMS.iter().map(|(p, _)| (*p, "cgroup_skb")));
            for (program, kind) in names {
                programs.push(ProgramStatus {
                    program,
                    kind,
                    target: "-".into(),
                    status: Status::Failed,
                    error: Some(e.to_string()),
                });
            }
            return PacketHooks::default();
        }
    };
    // Before the entry programs, so that no segment is walked in part: the continuations
    // first, then the first runs that tail-call them.
    let mut h2_walker = h2_frames;
    for w in &WALK_PROGRAMS {
        if !h2_frames {
            programs.push(ProgramStatus {
                program: w.program,
                kind: "cgroup_skb tail call",
                target: "-".into(),
                status: Status::Skipped,
                error: Some("disabled by --no-h2-frames".into()),
            });
            continue;
        }
        let res = load_walker(ebpf, w);
        if let Err(e) = &res {
            let (what, without) = if w.slot == walk_slot::FIRST {
                h2_walker = false;
                ("walker", "HTTP/2 frames in this direction are not seen")
            } else {
                (
                    "walk continuation",
                    "a segment with more than 12 frames loses sync (counted in h2_desyncs)",
                )
            };
            warn!(
                "HTTP/2 {what} {} unavailable ({:?}): {}; {without}",
                w.program,
                w.attach,
                err_chain(e.as_ref())
            );
        }
        programs.push(ProgramStatus {
            program: w.program,
            kind: "cgroup_skb tail call",
            target: format!("{}[{}]", w.array, w.slot),
            status: if res.is_ok() {
                Status::Attached
            } else {
                Status::Failed
            },
            error: res.err().map(|e| err_chain(e.as_ref())),
        });
    }
    let mut all = true;
    for (program, attach) in SKB_PROGRAMS {
        let res = attach_cgroup_skb(ebpf, program, &root, attach);
        if let Err(e) = &res {
            warn!(
                "cgroup_skb {program} unavailable: {}",
                err_chain(e.as_ref())
            );
            all = false;
        }
        programs.push(ProgramStatus {
            program,
            kind: "cgroup_skb",
            target: root.display().to_string(),
            status: if res.is_ok() {
                Status::Attached
            } else {
                Status::Failed
            },
            error: res.err().map(|e| err_chain(e.as_ref())),
        });
    }
    PacketHooks {
        attached: all,
        h2_walker: all && h2_walker,
        cgroup: Some(root.display().to_string()),
    }
}

/// One of the HTTP/2 walker's programs: loaded, never attached, and tail-called through its
/// direction's program array (the entry program calls slot `walk_slot::FIRST`, which
/// continues in slot `walk_slot::MORE`).
struct Walker {
    program: &'static str,
    attach: CgroupSkbAttachType,
    array: &'static str,
    slot: u32,
}

/// In load order: the continuations, then the first runs that tail-call them.
const WALK_PROGRAMS: [Walker; 4] = [
    Walker {
        program: "skb_walk_in",
        attach: CgroupSkbAttachType::Ingress,
        array: "WALK_IN",
        slot: walk_slot::MORE,
    },
    Walker {
        program: "skb_walk_out",
        attach: CgroupSkbAttachType::Egress,
        array: "WALK_OUT",
        slot: walk_slot::MORE,
    },
    Walker {
        program: "skb_h2_in",
        attach: CgroupSkbAttachType::Ingress,
        array: "WALK_IN",
        slot: walk_slot::FIRST,
    },
    Walker {
        program: "skb_h2_out",
        attach: CgroupSkbAttachType::Egress,
        array: "WALK_OUT",
        slot: walk_slot::FIRST,
    },
];

fn load_walker(ebpf: &mut Ebpf, w: &Walker) -> anyhow::Result<()> {
    let p: &mut CgroupSkb = program_as(ebpf, w.program)?;
    p.load()?;
    let fd = p.fd()?.try_clone()?;
    let map = ebpf
        .map_mut(w.array)
        .ok_or_else(|| anyhow!("map {} missing from object", w.array))?;
    let mut slots = ProgramArray::try_from(map)?;
    slots
        .set(w.slot, &fd, 0)
        .with_context(|| format!("putting {} into {}[{}]", w.program, w.array, w.slot))?;
    Ok(())
}

fn skip_packet_hooks(programs: &mut Vec<ProgramStatus>) {
    for w in WALK_PROGRAMS {
        programs.push(ProgramStatus {
            program: w.program,
            kind: "cgroup_skb tail call",
            target: "-".into(),
            status: Status::Skipped,
            error: Some("disabled by --no-packets".into()),
        });
    }
    for (program, _) in SKB_PROGRAMS {
        programs.push(ProgramStatus {
            program,
            kind: "cgroup_skb",
            target: "-".into(),
            status: Status::Skipped,
            error: Some("disabled by --no-packets".into()),
        });
    }
}

fn attach_cgroup_skb(
    ebpf: &mut Ebpf,
    program: &str,
    root: &Path,
    attach: CgroupSkbAttachType,
) -> anyhow::Result<()> {
    let cg = File::open(root).with_context(|| format!("opening cgroup {}", root.display()))?;
    let p: &mut CgroupSkb = program_as(ebpf, program)?;
    p.load()?;
    // On 5.7+ aya attaches through a BPF link, which is always multi-attach and takes no
    // flags (passing BPF_F_ALLOW_MULTI there is EINVAL); other tools' programs coexist.
    p.attach(&cg, attach, CgroupAttachMode::Single)?;
    Ok(())
}

/// The object's program `name`, as the program type `T`.
fn program_as<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from object"))?
        .try_into()?)
}

/// The kernel BTF as aya reads it, parsed at the first [`LazyBtf::get`].
#[derive(Default)]
struct LazyBtf(std::cell::OnceCell<Result<Btf, String>>);

impl LazyBtf {
    fn get(&self) -> anyhow::Result<&Btf> {
        self.0
            .get_or_init(|| Btf::from_sys_fs().map_err(|e| err_chain(&e)))
            .as_ref()
            .map_err(|e| anyhow!("reading kernel BTF: {e}"))
    }
}

fn try_fentry(ebpf: &mut Ebpf, btf: &LazyBtf) -> anyhow::Result<()> {
    let btf = btf.get()?;
    let p: &mut FEntry = program_as(ebpf, "tcp_close_fentry")?;
    p.load("tcp_close", btf)?;
    p.attach()?;
    Ok(())
}

/// The two socket-walk iterators, as (program, iterator target).
const TCP_WALK: (&str, &str) = ("tcp_existing", "tcp");
const STORAGE_WALK: (&str, &str) = ("sk_storage_existing", "bpf_sk_storage_map");

/// A walk not loaded, and why, in the report.
fn skip_walk(
    programs: &mut Vec<ProgramStatus>,
    (program, target): (&'static str, &str),
    why: &str,
) -> Option<ExistingWalk> {
    programs.push(ProgramStatus {
        program,
        kind: "iter",
        target: target.into(),
        status: Status::Skipped,
        error: Some(why.into()),
    });
    None
}

/// The iterator over the kernel's TCP sockets (`tcp_existing`), linked and ready to be
/// opened per namespace; `None` (recorded, logged) where the kernel refuses it.
fn attach_existing_walk(
    ebpf: &mut Ebpf,
    btf: &LazyBtf,
    programs: &mut Vec<ProgramStatus>,
) -> Option<ExistingWalk> {
    let res = (|| -> anyhow::Result<ExistingWalk> {
        let btf = btf.get()?;
        let p: &mut Iter = program_as(ebpf, TCP_WALK.0)?;
        p.load(TCP_WALK.1, btf)?;
        ExistingWalk::link(p.fd()?.as_fd()).context("linking the iterator")
    })();
    record_walk(
        programs,
        TCP_WALK,
        res,
        "connections open before the agent are met at their first segment or state change",
    )
}

/// The iterator over the sockets holding the packet hooks' state (`sk_storage_existing`),
/// linked with that map; `None` (recorded, logged) where the kernel refuses it (before
/// 5.9, or BTF tracing programs refused). Only the recheck after lost events uses it.
fn attach_storage_walk(
    ebpf: &mut Ebpf,
    btf: &LazyBtf,
    programs: &mut Vec<ProgramStatus>,
) -> Option<ExistingWalk> {
    let res = (|| -> anyhow::Result<ExistingWalk> {
        let map = match ebpf.map("SK_PKT") {
            Some(aya::maps::Map::SkStorage(m)) => m.fd().as_fd().try_clone_to_owned()?,
            _ => bail!("no socket storage map SK_PKT in the object"),
        };
        let btf = btf.get()?;
        let p: &mut Iter = program_as(ebpf, STORAGE_WALK.0)?;
        p.load(STORAGE_WALK.1, btf)?;
        ExistingWalk::link_over_map(p.fd()?.as_fd(), map.as_fd()).context("linking the iterator")
    })();
    record_walk(
        programs,
        STORAGE_WALK,
        res,
        "after lost events, records in network namespaces the agent cannot enter stay until \
         their address is reused",
    )
}

/// An iterator `(program, target)` linked (`res`): one walk now, so that a kernel that
/// links the iterator but cannot run it says so here, in the report, not at the first
/// read; then its status in the report, and what its absence means logged.
fn record_walk(
    programs: &mut Vec<ProgramStatus>,
    (program, target): (&'static str, &str),
    res: anyhow::Result<ExistingWalk>,
    without: &str,
) -> Option<ExistingWalk> {
    let res = res.and_then(|w| {
        w.open().context("creating the iterator")?;
        Ok(w)
    });
    let (status, error, walk) = match res {
        Ok(w) => (Status::Attached, None, Some(w)),
        Err(e) => {
            let msg = err_chain(e.as_ref());
            info!("iter/{target} unavailable ({msg}): {without}");
            (Status::Failed, Some(msg), None)
        }
    };
    programs.push(ProgramStatus {
        program,
        kind: "iter",
        target: target.into(),
        status,
        error,
    });
    walk
}

fn try_kprobe(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let p: &mut KProbe = program_as(ebpf, "tcp_close_kprobe")?;
    p.load()?;
    p.attach("tcp_close", 0)?;
    Ok(())
}

/// Chooses how `tcp_close()` is observed and returns the mode in force. A forced mode that
/// cannot load is an error; `auto` falls back down the list.
fn attach_close_hook(
    ebpf: &mut Ebpf,
    mode: ProbeMode,
    btf: &LazyBtf,
    programs: &mut Vec<ProgramStatus>,
) -> anyhow::Result<ProbeMode> {
    let mut record = |program, kind, status, error: Option<String>| {
        programs.push(ProgramStatus {
            program,
            kind,
            target: "tcp_close".into(),
            status,
            error,
        });
    };
    let want_fentry = matches!(mode, ProbeMode::Auto | ProbeMode::Fentry);
    let want_kprobe = matches!(mode, ProbeMode::Auto | ProbeMode::Kprobe);
    let mut active = ProbeMode::Tracepoint;

    if want_fentry {
        match try_fentry(ebpf, btf) {
            Ok(()) => {
                record("tcp_close_fentry", "fentry", Status::Attached, None);
                active = ProbeMode::Fentry;
            }
            Err(e) => {
                let msg = err_chain(e.as_ref());
                if mode == ProbeMode::Fentry {
                    bail!("--probe-mode fentry: fentry on tcp_close refused: {msg}");
                }
                info!("fentry on tcp_close unavailable ({msg}); trying kprobe");
                record("tcp_close_fentry", "fentry", Status::Failed, Some(msg));
            }
        }
    } else {
        record(
            "tcp_close_fentry",
            "fentry",
            Status::Skipped,
            Some(format!("--probe-mode {}", mode.name())),
        );
    }

    if active == ProbeMode::Tracepoint && want_kprobe {
        match try_kprobe(ebpf) {
            Ok(()) => {
                record("tcp_close_kprobe", "kprobe", Status::Attached, None);
                active = ProbeMode::Kprobe;
            }
            Err(e) => {
                let msg = err_chain(e.as_ref());
                if mode == ProbeMode::Kprobe {
                    bail!("--probe-mode kprobe: kprobe on tcp_close refused: {msg}");
                }
                info!("kprobe on tcp_close unavailable ({msg}); tracepoint-only mode");
                record("tcp_close_kprobe", "kprobe", Status::Failed, Some(msg));
            }
        }
    } else {
        let why = if active != ProbeMode::Tracepoint {
            "fentry attached".to_string()
        } else {
            format!("--probe-mode {}", mode.name())
        };
        record("tcp_close_kprobe", "kprobe", Status::Skipped, Some(why));
    }
    if active == ProbeMode::Tracepoint {
        warn!(
            "tcp_close() is not observed (tracepoint-only mode): closes are seen through state changes"
        );
    }
    Ok(active)
}

impl Probes {
    pub fn take_ringbuf(&mut self) -> anyhow::Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or_else(|| anyhow!("EVENTS map missing"))?;
        Ok(RingBuf::try_from(map)?)
    }

    pub fn take_counters(&mut self) -> anyhow::Result<Counters> {
        let map = self
            .ebpf
            .take_map("COUNTERS")
            .ok_or_else(|| anyhow!("COUNTERS map missing"))?;
        let lost = self
            .ebpf
            .take_map("LOST")
            .ok_or_else(|| anyhow!("LOST map missing"))?;
        Ok(Counters {
            map: PerCpuArray::try_from(map)?,
            lost: Array::try_from(lost)?,
            lost_set: false,
            skipped: Skipped::of(&self.ebpf, &self.report.programs),
            skipped_last: std::cell::Cell::new(0),
        })
    }
}

/// The kernel-side per-CPU counters, and the runs of the tracing programs the kernel
/// skipped.
pub struct Counters {
    map: PerCpuArray<MapData, u64>,
    /// The kernel's "a record may have been lost" flag (`LOST`), which the kernel sets
    /// itself for a full ring buffer or an unreadable record; the agent sets it for skipped
    /// runs, which the kernel side cannot see.
    lost: Array<MapData, u32>,
    lost_set: bool,
    skipped: Skipped,
    /// The last total read (kept when a read fails: the count only grows).
    skipped_last: std::cell::Cell<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CounterSnapshot {
    pub events: u64,
    pub ringbuf_drops: u64,
    pub ringbuf_drops_per_cpu: Vec<u64>,
    pub packets: u64,
    pub skmap_fails: u64,
    pub read_errors: u64,
    /// HTTP/2 frame headers the kernel walked.
    pub h2_frames: u64,
    /// HTTP/2 directions whose frame sync the kernel lost (capture gap).
    pub h2_desyncs: u64,
    /// Ingress segments the socket's TCP would not accept (forged or stale): dropped
    /// before they became evidence. Bare ACKs that would change nothing are not judged.
    pub unaccepted: u64,
    /// Runs of the tracing programs the kernel skipped because another BPF program was
    /// running on that CPU (`recursion_misses`; counted by kernels from 6.7, fentry from
    /// 5.12): each an event lost.
    pub runs_skipped: u64,
}

impl CounterSnapshot {
    /// Every kernel event known lost: ring-buffer drops, unreadable tracepoint records
    /// and skipped runs. Connections alive while it grew say so in their verdicts.
    pub fn events_lost(&self) -> u64 {
        self.ringbuf_drops
            .saturating_add(self.read_errors)
            .saturating_add(self.runs_skipped)
    }
}

impl Counters {
    pub fn snapshot(&self) -> anyhow::Result<CounterSnapshot> {
        let per_cpu = |idx: u32| -> anyhow::Result<Vec<u64>> {
            Ok(self.map.get(&idx, 0)?.iter().copied().collect())
        };
        let drops = per_cpu(counter::RINGBUF_DROPS)?;
        Ok(CounterSnapshot {
            events: per_cpu(counter::EVENTS)?.iter().sum(),
            ringbuf_drops: drops.iter().sum(),
            ringbuf_drops_per_cpu: drops,
            packets: per_cpu(counter::PACKETS)?.iter().sum(),
            skmap_fails: per_cpu(counter::SKMAP_FAILS)?.iter().sum(),
            read_errors: per_cpu(counter::READ_ERRORS)?.iter().sum(),
            h2_frames: per_cpu(counter::H2_FRAMES)?.iter().sum(),
            h2_desyncs: per_cpu(counter::H2_DESYNCS)?.iter().sum(),
            unaccepted: per_cpu(counter::UNACCEPTED)?.iter().sum(),
            runs_skipped: self.runs_skipped(),
        })
    }

    fn runs_skipped(&self) -> u64 {
        match self.skipped.total() {
            Ok(n) => {
                let n = n.max(self.skipped_last.get());
                self.skipped_last.set(n);
                n
            }
            Err(e) => {
                log::debug!("reading the programs' skipped runs: {e}");
                self.skipped_last.get()
            }
        }
    }

    /// Tells the kernel side that records were lost (see [`Counters::lost`]), once: from
    /// then on it writes the records that only matter after a loss.
    pub fn mark_lost(&mut self) -> anyhow::Result<()> {
        if !self.lost_set {
            self.lost.set(0, 1, 0).context("setting the LOST flag")?;
            self.lost_set = true;
        }
        Ok(())
    }
}
