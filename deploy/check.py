"""Policy checks on deploy/daemonset.yaml (and the rendered chart) beyond the Kubernetes schemas (which
`kubernetes-validate --strict` checks): least privilege, read-only host mounts, probes.
Run by `cargo xtask deploy-check` with the venv that has kubernetes-validate (and PyYAML)."""
import sys

import yaml

CAPS = {"BPF", "PERFMON", "NET_ADMIN"}
# Needed on kernels before 5.11 only (RLIMIT_MEMLOCK); the chart can leave it out.
OPTIONAL_CAPS = {"SYS_RESOURCE"}
HOST_PATHS = {"/sys/kernel/tracing", "/sys/kernel/btf", "/sys/fs/cgroup", "/proc", "/var/log"}


def check(path):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    errors = []
    for key in ("hostPID", "hostNetwork", "hostIPC"):
        if pod.get(key):
            errors.append(f"{key} is on")
    if pod.get("automountServiceAccountToken", True):
        errors.append("the service account token is mounted (no API access is needed by default)")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    host_paths = {v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v}
    if host_paths != HOST_PATHS:
        errors.append(f"host paths {sorted(host_paths)} != {sorted(HOST_PATHS)}")
    for c in pod["containers"]:
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            errors.append(f"{c['name']}: privileged")
        if sc.get("allowPrivilegeEscalation", True):
            errors.append(f"{c['name']}: allowPrivilegeEscalation")
        if not sc.get("readOnlyRootFilesystem"):
            errors.append(f"{c['name']}: root filesystem is writable")
        caps = sc.get("capabilities", {})
        if caps.get("drop") != ["ALL"]:
            errors.append(f"{c['name']}: does not drop ALL capabilities")
        added = set(caps.get("add", []))
        if not CAPS <= added or not added <= CAPS | OPTIONAL_CAPS:
            errors.append(
                f"{c['name']}: capabilities {caps.get('add')} are not {sorted(CAPS)}"
                f" (+ optionally {sorted(OPTIONAL_CAPS)})"
            )
        if sc.get("seccompProfile", {}).get("type") not in ("Localhost", "RuntimeDefault"):
            errors.append(f"{c['name']}: no seccomp profile")
        for m in c.get("volumeMounts", []):
            if "hostPath" in volumes.get(m["name"], {}) and not m.get("readOnly"):
                errors.append(f"{c['name']}: host mount {m['mountPath']} is writable")
        for probe in ("livenessProbe", "readinessProbe"):
            if probe not in c:
                errors.append(f"{c['name']}: no {probe}")
        if "resources" not in c or "limits" not in c["resources"]:
            errors.append(f"{c['name']}: no resource limits")
    return errors


if __name__ == "__main__":
    failed = False
    for path in sys.argv[1:]:
        errs = check(path)
        for e in errs:
            print(f"{path}: {e}")
        failed |= bool(errs)
    sys.exit(1 if failed else 0)
