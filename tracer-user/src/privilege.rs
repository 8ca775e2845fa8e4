//! Why loading the probes failed, in terms a user can act on: which capability is missing
//! from the effective set (`CapEff` in `/proc/self/status`), or, when they are all there, a
//! seccomp filter or kernel lockdown refusing `bpf()` — instead of "must run as root" for a
//! process that is root but confined.

/// A capability the probes need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    pub bit: u32,
    pub name: &'static str,
    pub why: &'static str,
}

pub const CAP_NET_ADMIN: Cap = Cap {
    bit: 12,
    name: "CAP_NET_ADMIN",
    why: "cgroup_skb packet hooks",
};
pub const CAP_SYS_ADMIN: Cap = Cap {
    bit: 21,
    name: "CAP_SYS_ADMIN",
    why: "bpf() on kernels before 5.8",
};
pub const CAP_PERFMON: Cap = Cap {
    bit: 38,
    name: "CAP_PERFMON",
    why: "loading and attaching tracing programs",
};
pub const CAP_BPF: Cap = Cap {
    bit: 39,
    name: "CAP_BPF",
    why: "creating maps and loading programs",
};

/// The effective capability set from the text of `/proc/<pid>/status`.
pub fn cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// `Seccomp:` of `/proc/<pid>/status`: 0 none, 1 strict, 2 filter.
pub fn seccomp_mode(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The capabilities among those needed that `eff` lacks. `CAP_SYS_ADMIN` stands in for
/// `CAP_BPF` and `CAP_PERFMON` (kernels accept either).
pub fn missing(eff: u64) -> Vec<Cap> {
    let has = |c: Cap| eff & (1u64 << c.bit) != 0;
    let admin = has(CAP_SYS_ADMIN);
    [CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN]
        .into_iter()
        .filter(|&c| !(has(c) || admin && c != CAP_NET_ADMIN))
        .collect()
}

fn is_eperm(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::EPERM))
            || c.to_string().contains("Operation not permitted")
    })
}

/// The likely cause of a failed probe load, from this process's status.
pub fn explain_load_failure(e: &anyhow::Error) -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown").unwrap_or_default();
    explain(&status, &lockdown, is_eperm(e))
}

/// [`explain_load_failure`] from the texts of `/proc/self/status` and
/// `/sys/kernel/security/lockdown`.
pub fn explain(status: &str, lockdown: &str, eperm: bool) -> String {
    let Some(eff) = cap_eff(status) else {
        return "cannot read the capability set from /proc/self/status".into();
    };
    let missing = missing(eff);
    if !missing.is_empty() {
        let list: Vec<String> = missing
            .iter()
            .map(|c| format!("{} ({})", c.name, c.why))
            .collect();
        return format!(
            "missing capabilities: {} (effective set {eff:#x}); grant them to the process (being \
             uid 0 is not enough when a container runtime or setpriv dropped them)",
            list.join(", ")
        );
    }
    if !eperm {
        return "the capabilities are present (see the cause below)".into();
    }
    if seccomp_mode(status) == Some(2) {
        return "permission denied although the capabilities are granted: a seccomp filter is \
                active (Seccomp: 2 in /proc/self/status) and likely refuses bpf() or \
                perf_event_open(); container runtimes' default profiles do — use \
                deploy/seccomp/whoclosed.json"
            .into();
    }
    if lockdown.contains("[confidentiality]") {
        return "permission denied although the capabilities are granted: the kernel is in \
                lockdown=confidentiality, which forbids tracing programs that read kernel memory"
            .into();
    }
    "permission denied although the capabilities are granted (an LSM such as SELinux or \
     AppArmor, or kernel.perf_event_paranoid, may refuse it)"
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "Name:\twhoclosed\nCapEff:\t000001ffffffffff\nSeccomp:\t0\n";

    #[test]
    fn names_each_missing_capability() {
        // podman's default set: no BPF, PERFMON, NET_ADMIN, SYS_ADMIN.
        let st = "CapEff:\t00000000a80425fb\nSeccomp:\t2\n";
        let m = explain(st, "", true);
        assert!(m.contains("CAP_BPF"), "{m}");
        assert!(m.contains("CAP_PERFMON"), "{m}");
        assert!(m.contains("CAP_NET_ADMIN"), "{m}");
        // Only NET_ADMIN dropped.
        let eff = 0x1ff_ffff_ffffu64 & !(1 << 12);
        assert_eq!(missing(eff), vec![CAP_NET_ADMIN]);
        // SYS_ADMIN stands in for BPF and PERFMON.
        let eff = (1u64 << 21) | (1 << 12);
        assert!(missing(eff).is_empty());
        assert_eq!(missing(1 << 21), vec![CAP_NET_ADMIN]);
    }

    #[test]
    fn names_seccomp_or_lockdown_when_root_is_refused() {
        let seccomp = FULL.replace("Seccomp:\t0", "Seccomp:\t2");
        assert!(explain(&seccomp, "", true).contains("seccomp"));
        let lock = "none integrity [confidentiality]\n";
        assert!(explain(FULL, lock, true).contains("lockdown"));
        assert!(explain(FULL, "[none] integrity confidentiality", true).contains("LSM"));
        assert!(!explain(FULL, "", false).contains("missing"));
        assert!(explain("", "", true).contains("cannot read"));
    }
}
