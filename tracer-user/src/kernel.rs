//! Facts about the running kernel that the probes need before they load: where tracefs is,
//! the record layout of each tracepoint (it changes between kernel versions), BTF offsets
//! of the few struct fields the programs read, and the cgroup v2 root to attach to.

use std::{
    collections::HashMap,
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use thiserror::Error;
use tracer_common::{Config, NO_FIELD, TpLayout, field, tp};

#[derive(Debug, Error)]
pub enum KernelError {
    #[error("tracefs is not mounted and mounting it at {path} failed: {source}")]
    TracefsMount {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read tracepoint format {path}: {source}")]
    Format {
        path: String,
        source: std::io::Error,
    },
    #[error("tracepoint {0} has no field `{1}` on this kernel")]
    MissingField(&'static str, &'static str),
    #[error("no cgroup v2 mount found in /proc/self/mountinfo (needed for packet facts)")]
    NoCgroup2,
    #[error("cannot read /proc/self/mountinfo: {0}")]
    Mountinfo(std::io::Error),
}

const TRACEFS_CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

fn has_events(dir: &Path) -> bool {
    dir.join("events").is_dir()
}

/// Returns the tracefs directory, mounting tracefs at `/sys/kernel/tracing` when no mount
/// exists (a fresh VM or a container with a bare /sys mount).
pub fn ensure_tracefs() -> Result<PathBuf, KernelError> {
    if let Some(found) = TRACEFS_CANDIDATES
        .iter()
        .map(Path::new)
        .find(|p| has_events(p))
    {
        return Ok(found.to_path_buf());
    }
    let target = TRACEFS_CANDIDATES[0];
    let cstr = |s: &str| {
        CString::new(s).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let mount = || -> std::io::Result<()> {
        let (src, dst, fstype) = (cstr("tracefs")?, cstr(target)?, cstr("tracefs")?);
        // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    mount().map_err(|source| KernelError::TracefsMount {
        path: target.into(),
        source,
    })?;
    Ok(PathBuf::from(target))
}

/// One field of a tracepoint record: offset and size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldSpec {
    pub offset: u16,
    pub size: u16,
}

/// Parses a tracefs `format` file into `name -> (offset, size)`.
///
/// Lines look like `\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;`; array fields
/// keep their bare name (`saddr[4]` -> `saddr`).
pub fn parse_format(text: &str) -> HashMap<String, FieldSpec> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for (i, part) in rest.split(';').enumerate() {
            let part = part.trim();
            if i == 0 {
                decl = Some(part);
            } else if let Some(v) = part.strip_prefix("offset:") {
                offset = v.trim().parse::<u16>().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.trim().parse::<u16>().ok();
            }
        }
        let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
            continue;
        };
        let Some(last) = decl.split_whitespace().last() else {
            continue;
        };
        let name = last
            .split('[')
            .next()
            .unwrap_or(last)
            .trim_start_matches('*');
        out.insert(name.to_string(), FieldSpec { offset, size });
    }
    out
}

/// Which record fields each hook uses, by the names the kernel gives them.
const WANTED: &[(&str, usize, u16)] = &[
    ("skaddr", field::SKADDR, 8),
    ("oldstate", field::OLDSTATE, 4),
    ("newstate", field::NEWSTATE, 4),
    ("state", field::STATE, 4),
    ("sport", field::SPORT, 2),
    ("dport", field::DPORT, 2),
    ("family", field::FAMILY, 2),
    ("protocol", field::PROTOCOL, 2),
    ("saddr_v6", field::SADDR_V6, 16),
    ("daddr_v6", field::DADDR_V6, 16),
    ("sock_cookie", field::COOKIE, 8),
];

/// Builds the layout the kernel program reads for one tracepoint.
pub fn layout_from_fields(fields: &HashMap<String, FieldSpec>) -> TpLayout {
    let mut layout = TpLayout::empty();
    for (name, idx, size) in WANTED {
        if let Some(f) = fields.get(*name) {
            if f.size == *size {
                layout.off[*idx] = f.offset;
            }
        }
    }
    // saddr/daddr are 4 bytes (IPv4) on most layouts, 28 bytes (a sockaddr_in6-sized blob)
    // on tcp_send_reset since 6.10.
    if let (Some(s), Some(d)) = (fields.get("saddr"), fields.get("daddr")) {
        if s.size == 4 && d.size == 4 {
            layout.off[field::SADDR] = s.offset;
            layout.off[field::DADDR] = d.offset;
        } else if s.size == 28 && d.size == 28 {
            layout.off[field::SADDR] = s.offset;
            layout.off[field::DADDR] = d.offset;
            layout.off[field::SOCKADDR_STYLE] = 1;
        }
    }
    for (name, size) in [("err", 4), ("error", 4), ("reason", 4)] {
        if let Some(f) = fields.get(name) {
            if f.size == size {
                layout.off[field::VALUE] = f.offset;
            }
        }
    }
    layout
}

/// A tracepoint the agent uses: category, name, slot in [`Config::tp`], and the fields
/// without which its program is useless.
pub struct TracepointSpec {
    pub category: &'static str,
    pub name: &'static str,
    pub program: &'static str,
    pub slot: usize,
    pub required: &'static [(usize, &'static str)],
}

pub const TRACEPOINTS: &[TracepointSpec] = &[
    TracepointSpec {
        category: "sock",
        name: "inet_sock_set_state",
        program: "inet_sock_set_state",
        slot: tp::SET_STATE,
        required: &[
            (field::SKADDR, "skaddr"),
            (field::OLDSTATE, "oldstate"),
            (field::NEWSTATE, "newstate"),
            (field::PROTOCOL, "protocol"),
        ],
    },
    TracepointSpec {
        category: "tcp",
        name: "tcp_retransmit_skb",
        program: "tcp_retransmit_skb",
        slot: tp::RETRANSMIT,
        required: &[(field::SKADDR, "skaddr")],
    },
    TracepointSpec {
        category: "tcp",
        name: "tcp_send_reset",
        program: "tcp_send_reset",
        slot: tp::SEND_RESET,
        required: &[],
    },
    TracepointSpec {
        category: "tcp",
        name: "tcp_receive_reset",
        program: "tcp_receive_reset",
        slot: tp::RECV_RESET,
        required: &[(field::SKADDR, "skaddr")],
    },
    TracepointSpec {
        category: "tcp",
        name: "tcp_destroy_sock",
        program: "tcp_destroy_sock",
        slot: tp::DESTROY,
        required: &[(field::SKADDR, "skaddr")],
    },
    TracepointSpec {
        category: "sock",
        name: "inet_sk_error_report",
        program: "inet_sk_error_report",
        slot: tp::ERROR_REPORT,
        required: &[(field::VALUE, "error"), (field::PROTOCOL, "protocol")],
    },
];

/// Reads and checks the layout of one tracepoint.
pub fn tracepoint_layout(tracefs: &Path, spec: &TracepointSpec) -> Result<TpLayout, KernelError> {
    let path = tracefs
        .join("events")
        .join(spec.category)
        .join(spec.name)
        .join("format");
    let text = fs::read_to_string(&path).map_err(|source| KernelError::Format {
        path: path.display().to_string(),
        source,
    })?;
    let layout = layout_from_fields(&parse_format(&text));
    for (idx, name) in spec.required {
        if layout.off[*idx] == NO_FIELD {
            return Err(KernelError::MissingField(spec.name, name));
        }
    }
    Ok(layout)
}

/// Byte offsets of struct members the programs read, resolved from kernel BTF.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BtfOffsets {
    pub sk_net: Option<u32>,
    pub net_inum: Option<u32>,
    pub v6_saddr: Option<u32>,
    pub v6_daddr: Option<u32>,
    pub task_flags: Option<u32>,
    pub sk_cgrp: Option<u32>,
    pub cgrp_kn: Option<u32>,
    pub kn_id: Option<u32>,
}

impl BtfOffsets {
    pub fn apply(&self, cfg: &mut Config) {
        let v = |o: Option<u32>| o.unwrap_or(u32::MAX);
        cfg.off_sk_net = v(self.sk_net);
        cfg.off_net_inum = v(self.net_inum);
        cfg.off_v6_saddr = v(self.v6_saddr);
        cfg.off_v6_daddr = v(self.v6_daddr);
        cfg.off_task_flags = v(self.task_flags);
        cfg.off_sk_cgrp = v(self.sk_cgrp);
        cfg.off_cgrp_kn = v(self.cgrp_kn);
        cfg.off_kn_id = v(self.kn_id);
    }
}

/// Kernel BTF (`/sys/kernel/btf/vmlinux`), parsed once and asked for everything the agent
/// needs from it: struct member offsets for the programs, enum value names for the table.
pub struct KernelBtf {
    btf: btf_rs::Btf,
}

/// Where the running kernel exposes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

impl KernelBtf {
    pub fn load(path: &Path) -> Result<Self, String> {
        btf_rs::Btf::from_file(path)
            .map(|btf| KernelBtf { btf })
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Resolves [`BtfOffsets`]. Each offset is independent: a missing one disables only the
    /// fact that needs it.
    pub fn offsets(&self) -> BtfOffsets {
        let off = |s: &str, p: &[&str]| member_offset(&self.btf, s, p);
        BtfOffsets {
            sk_net: off("sock", &["__sk_common", "skc_net"]),
            net_inum: off("net", &["ns", "inum"]),
            v6_saddr: off("sock", &["__sk_common", "skc_v6_rcv_saddr"]),
            v6_daddr: off("sock", &["__sk_common", "skc_v6_daddr"]),
            task_flags: off("task_struct", &["flags"]),
            // 5.15 made the tagged word `val` a plain `cgroup` pointer, at the same place.
            sk_cgrp: off("sock", &["sk_cgrp_data", "cgroup"])
                .or_else(|| off("sock", &["sk_cgrp_data", "val"])),
            cgrp_kn: off("cgroup", &["kn"]),
            kn_id: off("kernfs_node", &["id"]),
        }
    }

    /// Names of an enum's values, with a common prefix removed (`sk_rst_reason`:
    /// `SK_RST_REASON_TCP_ABORT_ON_CLOSE` -> `TCP_ABORT_ON_CLOSE`). The numbering of such
    /// enums changes between kernel versions, so it is never hard-coded. Empty when the
    /// kernel has no such enum.
    pub fn enum_names(&self, name: &str, prefix: &str) -> HashMap<u32, String> {
        let mut out = HashMap::new();
        let Ok(types) = self.btf.resolve_types_by_name(name) else {
            return out;
        };
        for t in types {
            if let btf_rs::Type::Enum(e) = t {
                for m in &e.members {
                    if let Ok(n) = self.btf.resolve_name(m) {
                        out.insert(m.val(), n.strip_prefix(prefix).unwrap_or(&n).to_string());
                    }
                }
            }
        }
        out
    }

    /// Names of this kernel's `enum sk_rst_reason` values (6.10+).
    pub fn rst_reason_names(&self) -> HashMap<u32, String> {
        self.enum_names("sk_rst_reason", "SK_RST_REASON_")
    }
}

/// Byte offset of `path` (member names, descending into nested structs) inside struct
/// `name`. Anonymous unions and structs on the way are searched transparently.
fn member_offset(btf: &btf_rs::Btf, name: &str, path: &[&str]) -> Option<u32> {
    let types = btf.resolve_types_by_name(name).ok()?;
    let root = types.into_iter().find_map(|t| match t {
        btf_rs::Type::Struct(s) if !s.members.is_empty() => Some(s),
        _ => None,
    })?;
    let mut bits = 0u32;
    let mut current = root;
    for (depth, want) in path.iter().enumerate() {
        let (off, ty) = find_member(btf, &current, want)?;
        bits += off;
        if depth + 1 < path.len() {
            current = as_struct(btf, ty)?;
        }
    }
    bits.is_multiple_of(8).then_some(bits / 8)
}

/// Finds `want` among the members of `s`, looking inside anonymous members.
/// Returns the bit offset relative to `s` and the member's type.
fn find_member(btf: &btf_rs::Btf, s: &btf_rs::Struct, want: &str) -> Option<(u32, btf_rs::Type)> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let ty = btf.resolve_chained_type(m).ok()?;
        if name == want {
            return Some((m.bit_offset(), ty));
        }
        if name.is_empty() {
            if let Some(inner) = as_struct(btf, ty) {
                if let Some((off, t)) = find_member(btf, &inner, want) {
                    return Some((m.bit_offset() + off, t));
                }
            }
        }
    }
    None
}

/// Follows typedefs and qualifiers to a struct or union.
fn as_struct(btf: &btf_rs::Btf, mut ty: btf_rs::Type) -> Option<btf_rs::Struct> {
    for _ in 0..16 {
        match ty {
            btf_rs::Type::Struct(s) | btf_rs::Type::Union(s) => return Some(s),
            btf_rs::Type::Typedef(_)
            | btf_rs::Type::Const(_)
            | btf_rs::Type::Volatile(_)
            | btf_rs::Type::Restrict(_)
            | btf_rs::Type::TypeTag(_) => {
                let inner = ty.as_btf_type()?;
                ty = btf.resolve_chained_type(inner).ok()?;
            }
            _ => return None,
        }
    }
    None
}

/// The cgroup v2 mount point (the root of the unified hierarchy), from mountinfo.
pub fn cgroup2_root() -> Result<PathBuf, KernelError> {
    let text = fs::read_to_string("/proc/self/mountinfo").map_err(KernelError::Mountinfo)?;
    cgroup2_root_from_mountinfo(&text).ok_or(KernelError::NoCgroup2)
}

/// Picks the cgroup2 mount of the root cgroup (a bind mount of a sub-cgroup would only see
/// part of the host); prefers `/sys/fs/cgroup` when several qualify.
pub fn cgroup2_root_from_mountinfo(text: &str) -> Option<PathBuf> {
    cgroup2_root_from_mountinfo_with(text, |mnt| !mnt.join("cgroup.type").exists())
}

/// A mount's root as mountinfo shows it, seen from inside a private cgroup namespace
/// (containerd and CRI-O on cgroup v2): the host's root cgroup is an ancestor of the
/// namespace's root, so its root field is `/..`, `/../..`, ... instead of `/`.
fn is_ancestor_root(root: &str) -> bool {
    root.strip_prefix('/')
        .is_some_and(|r| !r.is_empty() && r.split('/').all(|seg| seg == ".."))
}

/// [`cgroup2_root_from_mountinfo`] with the check that a mount whose root is only `..`
/// segments really is the root cgroup (`is_root_cgroup`: the root cgroup has no
/// `cgroup.type` file; any other cgroup does).
pub fn cgroup2_root_from_mountinfo_with(
    text: &str,
    is_root_cgroup: impl Fn(&Path) -> bool,
) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    for line in text.lines() {
        // id parent major:minor root mountpoint opts [optional...] - fstype source superopts
        let mut halves = line.splitn(2, " - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let cols: Vec<&str> = left.split_whitespace().collect();
        if cols.len() < 5 {
            continue;
        }
        let mnt = PathBuf::from(cols[4].replace("\\040", " "));
        if cols[3] == "/" || is_ancestor_root(cols[3]) && is_root_cgroup(&mnt) {
            found.push(mnt);
        }
    }
    found.sort_by_key(|p| p != Path::new("/sys/fs/cgroup"));
    found.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET_STATE_618: &str = "name: inet_sock_set_state
ID: 1234
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s\"
";

    const SEND_RESET_618: &str = "format:
\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:enum sk_rst_reason reason;\toffset:28;\tsize:4;\tsigned:0;
\tfield:__u8 saddr[28];\toffset:32;\tsize:28;\tsigned:0;
\tfield:__u8 daddr[28];\toffset:60;\tsize:28;\tsigned:0;
";

    /// tcp_send_reset as Linux 5.10 lays it out (no reason, raw addresses).
    const SEND_RESET_510: &str = "format:
\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;
";

    #[test]
    fn parses_set_state_layout() {
        let l = layout_from_fields(&parse_format(SET_STATE_618));
        assert_eq!(l.off[field::SKADDR], 8);
        assert_eq!(l.off[field::OLDSTATE], 16);
        assert_eq!(l.off[field::NEWSTATE], 20);
        assert_eq!(l.off[field::SPORT], 24);
        assert_eq!(l.off[field::FAMILY], 28);
        assert_eq!(l.off[field::PROTOCOL], 30);
        assert_eq!(l.off[field::SADDR], 32);
        assert_eq!(l.off[field::DADDR_V6], 56);
        assert_eq!(l.off[field::SOCKADDR_STYLE], NO_FIELD);
        assert_eq!(l.off[field::VALUE], NO_FIELD);
    }

    #[test]
    fn send_reset_new_layout_uses_sockaddr_blobs_and_reason() {
        let l = layout_from_fields(&parse_format(SEND_RESET_618));
        assert_eq!(l.off[field::SKADDR], 16);
        assert_eq!(l.off[field::STATE], 24);
        assert_eq!(l.off[field::VALUE], 28);
        assert_eq!(l.off[field::SADDR], 32);
        assert_eq!(l.off[field::DADDR], 60);
        assert_ne!(l.off[field::SOCKADDR_STYLE], NO_FIELD);
        assert_eq!(l.off[field::SPORT], NO_FIELD);
    }

    #[test]
    fn send_reset_old_layout_has_no_family_and_no_reason() {
        let l = layout_from_fields(&parse_format(SEND_RESET_510));
        assert_eq!(l.off[field::FAMILY], NO_FIELD);
        assert_eq!(l.off[field::VALUE], NO_FIELD);
        assert_eq!(l.off[field::SOCKADDR_STYLE], NO_FIELD);
        assert_eq!(l.off[field::SPORT], 28);
        assert_eq!(l.off[field::SADDR_V6], 40);
    }

    #[test]
    fn cgroup2_root_inside_a_private_cgroup_namespace() {
        // podman --cgroupns private / containerd on cgroup v2, host /sys/fs/cgroup mounted.
        let ns = "1 0 0:1 / / rw - overlay overlay rw\n\
                  30 1 0:26 /../.. /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_root_from_mountinfo_with(ns, |_| true),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        // The same root field on a mount that is not the root cgroup (it has cgroup.type).
        assert_eq!(cgroup2_root_from_mountinfo_with(ns, |_| false), None);
        // A sub-cgroup bind mount, or a mixed path, is never accepted.
        for root in ["/kubepods", "/../kubepods", "/..x", "/", "//"] {
            let line = format!("30 1 0:26 {root} /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
            let got = cgroup2_root_from_mountinfo_with(&line, |_| true);
            assert_eq!(got.is_some(), root == "/", "root {root:?}");
        }
        assert!(is_ancestor_root("/.."));
        assert!(is_ancestor_root("/../../.."));
        assert!(!is_ancestor_root("/"));
    }

    #[test]
    fn cgroup2_root_prefers_real_root_mount() {
        let hybrid = "\
25 20 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
27 25 0:24 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
";
        assert_eq!(
            cgroup2_root_from_mountinfo(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure = "\
30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
31 30 0:26 /kubepods/pod1 /host/cg rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_root_from_mountinfo(pure),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_root_from_mountinfo("1 0 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }

    #[test]
    fn btf_offsets_resolve_on_this_kernel_when_btf_exists() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("skipped: {} not present on this kernel", path.display());
            return;
        }
        let btf = KernelBtf::load(path).expect("parse vmlinux BTF");
        let o = btf.offsets();
        // skc_net follows the address pair, hash, ports, family/state, bound_dev_if,
        // bind node and prot pointer in every kernel since 4.x: it is never at offset 0.
        assert!(o.sk_net.is_some_and(|v| v > 0 && v < 128), "{o:?}");
        assert!(o.net_inum.is_some(), "{o:?}");
        assert!(o.task_flags.is_some(), "{o:?}");
        assert!(o.v6_daddr.is_some() && o.v6_saddr.is_some(), "{o:?}");
        // sk_rst_reason exists from 6.10 on; when it does, value 1 is NO_SOCKET.
        let names = btf.rst_reason_names();
        if !names.is_empty() {
            assert_eq!(
                names.get(&1).map(String::as_str),
                Some("NO_SOCKET"),
                "{names:?}"
            );
        }
    }
}

/// The largest receive window a TCP socket on this host can advertise, in bytes: a window
/// never exceeds the receive buffer, which autotuning grows to at most `tcp_rmem[2]` and
/// `SO_RCVBUF` to at most twice `rmem_max`. Clamped to `[1 MiB, 1 GiB]`; `None` when
/// neither sysctl is readable (the kernel then uses the 1 GiB protocol maximum). These are
/// the values of the agent's network namespace: a namespace configured with larger buffers
/// can see segments judged unacceptable (counted as `unaccepted`, never turned into
/// evidence).
pub fn rcv_wnd_max() -> Option<u32> {
    let read = |p: &str| fs::read_to_string(p).ok();
    let rmem = read("/proc/sys/net/ipv4/tcp_rmem")
        .and_then(|s| s.split_whitespace().nth(2)?.parse::<u64>().ok());
    let core = read("/proc/sys/net/core/rmem_max")
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|v| v.saturating_mul(2));
    rcv_wnd_bound(rmem, core)
}

fn rcv_wnd_bound(tcp_rmem_max: Option<u64>, core_rmem_max2: Option<u64>) -> Option<u32> {
    let raw = match (tcp_rmem_max, core_rmem_max2) {
        (None, None) => return None,
        (a, b) => a.unwrap_or(0).max(b.unwrap_or(0)),
    };
    let clamped = raw.clamp(1 << 20, 1 << 30);
    u32::try_from(clamped).ok()
}

#[cfg(test)]
mod rcv_wnd_tests {
    use super::rcv_wnd_bound;

    #[test]
    fn bound_is_the_larger_buffer_clamped() {
        assert_eq!(rcv_wnd_bound(None, None), None);
        assert_eq!(
            rcv_wnd_bound(Some(6_291_456), Some(425_984)),
            Some(6_291_456)
        );
        assert_eq!(
            rcv_wnd_bound(Some(6_291_456), Some(67_108_864)),
            Some(67_108_864)
        );
        assert_eq!(rcv_wnd_bound(Some(4096), None), Some(1 << 20));
        assert_eq!(rcv_wnd_bound(None, Some(u64::MAX)), Some(1 << 30));
    }
}
