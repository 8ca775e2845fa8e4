//! `cargo xtask deploy-check`: the manifests in deploy/ validated offline.
//!
//! Kubernetes schemas: PyPI `kubernetes-validate` (ships the schemas; `--strict` rejects
//! unknown fields) for the oldest and newest Kubernetes versions it knows that we support.
//! Policy: deploy/check.py (least privilege, read-only host mounts, probes, limits). Both
//! must also reject a broken copy, so a check that passes everything fails here.
//!
//! The Helm chart (deploy/chart/whoclosed) is rendered with Helm's own engine through PyPI
//! `helm-python-sdk` (no helm binary is installable here): with default values it must
//! render exactly the objects of deploy/daemonset.yaml; with other values the result must
//! pass the same schema and policy checks; values outside values.schema.json are refused.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

const VALIDATOR: &str = "kubernetes-validate==1.37.0";
const HELM_SDK: &str = "helm-python-sdk==0.2.2";
const CHART: &str = "deploy/chart/whoclosed";
/// Values that change every knob the chart has.
const CUSTOM_VALUES: &str = r#"{"image": {"repository": "registry.example/whoclosed", "tag": "0.1.0", "pullPolicy": "Always"}, "metricsPort": 9191, "extraArgs": ["--max-conns=131072"], "nodeSelector": {"kubernetes.io/os": "linux"}, "memlockCapability": false, "metricsService": false, "priorityClassName": ""}"#;
const K8S_VERSIONS: &[&str] = &["1.29", "1.37"];
const MANIFESTS: &[&str] = &["deploy/daemonset.yaml", "deploy/rbac-api-source.yaml"];

fn venv() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/whoclosed/deploy-venv")
}

fn setup() -> Result<PathBuf> {
    let venv = venv();
    let bin = venv.join("bin");
    let have = crate::output(Command::new(bin.join("kubernetes-validate")).arg("--version"));
    let sdk = crate::output(Command::new(bin.join("python3")).args([
        "-c",
        "import importlib.metadata as m; print(m.version('helm-python-sdk'))",
    ]));
    if have.as_deref().map(str::trim) == VALIDATOR.split("==").nth(1)
        && sdk.as_deref().map(str::trim) == HELM_SDK.split("==").nth(1)
    {
        return Ok(bin);
    }
    if !bin.join("python3").exists() {
        crate::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    crate::run(Command::new(bin.join("pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        VALIDATOR,
        HELM_SDK,
    ]))?;
    Ok(bin)
}

fn validates(bin: &Path, version: &str, files: &[PathBuf]) -> Result<bool> {
    let status = Command::new(bin.join("kubernetes-validate"))
        .args(["--strict", "--quiet", "-k", version])
        .args(files)
        .status()
        .context("running kubernetes-validate")?;
    Ok(status.success())
}

fn policy_ok(bin: &Path, root: &Path, file: &Path) -> Result<bool> {
    let status = Command::new(bin.join("python3"))
        .arg(root.join("deploy/check.py"))
        .arg(file)
        .status()
        .context("running deploy/check.py")?;
    Ok(status.success())
}

pub fn check(root: &Path) -> Result<()> {
    let bin = setup()?;
    let files: Vec<PathBuf> = MANIFESTS.iter().map(|m| root.join(m)).collect();
    for v in K8S_VERSIONS {
        if !validates(&bin, v, &files)? {
            bail!("deploy/ does not validate against Kubernetes {v}");
        }
    }
    let daemonset = root.join(MANIFESTS[0]);
    if !policy_ok(&bin, root, &daemonset)? {
        bail!("deploy/daemonset.yaml breaks the deployment policy (deploy/check.py)");
    }

    // The capabilities `cargo xtask image check` proves necessary are granted here.
    let text = std::fs::read_to_string(&daemonset)?;
    let granted: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .collect();
    for (cap, _) in crate::image::CAPS {
        if !granted.contains(cap) {
            bail!(
                "deploy/daemonset.yaml does not grant {cap}, which `xtask image check` proves needed"
            );
        }
    }

    // Both checks must reject a broken manifest.
    let tmp = std::env::temp_dir().join(format!("whoclosed-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let typo = tmp.join("typo.yaml");
    std::fs::write(
        &typo,
        text.replace("readOnlyRootFilesystem", "readOnlyRootFileSystem"),
    )?;
    let privileged = tmp.join("privileged.yaml");
    std::fs::write(
        &privileged,
        text.replace("privileged: false", "privileged: true"),
    )?;
    eprintln!("xtask: deploy-check: two broken copies follow; their errors are expected");
    let schema_rejects = !validates(&bin, K8S_VERSIONS[1], std::slice::from_ref(&typo))?;
    let policy_rejects = !policy_ok(&bin, root, &privileged)?;
    let _ = std::fs::remove_dir_all(&tmp);
    if !schema_rejects || !policy_rejects {
        bail!(
            "a check accepted a broken manifest (schema rejected typo: {schema_rejects}, policy rejected privileged: {policy_rejects})"
        );
    }
    eprintln!(
        "xtask: deploy-check: {} manifests valid for Kubernetes {K8S_VERSIONS:?} (strict), policy ok, broken copies rejected",
        MANIFESTS.len()
    );
    check_chart(&bin, root, &daemonset)
}

/// Renders the chart; `Ok(false)` when the renderer refused (bad values, template error).
fn render(
    bin: &Path,
    root: &Path,
    out: &Path,
    values: &str,
    compare: Option<&Path>,
) -> Result<bool> {
    let mut cmd = Command::new(bin.join("python3"));
    cmd.arg(root.join("deploy/render_chart.py"))
        .arg(root.join(CHART))
        .arg(out)
        .args(["--values", values]);
    if let Some(p) = compare {
        cmd.arg("--compare").arg(p);
    }
    Ok(cmd
        .status()
        .context("running deploy/render_chart.py")?
        .success())
}

fn check_chart(bin: &Path, root: &Path, plain: &Path) -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("whoclosed-chart-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let result = (|| -> Result<()> {
        let defaults = tmp.join("defaults.yaml");
        if !render(bin, root, &defaults, "{}", Some(plain))? {
            bail!("{CHART} with default values does not render deploy/daemonset.yaml's objects");
        }
        let custom = tmp.join("custom.yaml");
        if !render(bin, root, &custom, CUSTOM_VALUES, None)? {
            bail!("{CHART} does not render with {CUSTOM_VALUES}");
        }
        let text = std::fs::read_to_string(&custom)?;
        for want in [
            "--metrics-addr=0.0.0.0:9191",
            "--max-conns=131072",
            "kubernetes.io/os",
        ] {
            if !text.contains(want) {
                bail!("{CHART}: the custom values did not reach the manifests ({want} missing)");
            }
        }
        for v in K8S_VERSIONS {
            for f in [&defaults, &custom] {
                if !validates(bin, v, std::slice::from_ref(f))? {
                    bail!("{CHART} renders manifests that do not validate against Kubernetes {v}");
                }
            }
        }
        if !policy_ok(bin, root, &custom)? {
            bail!("{CHART} with custom values breaks the deployment policy (deploy/check.py)");
        }
        eprintln!(
            "xtask: deploy-check: a value outside the chart's schema follows; its error is expected"
        );
        if render(
            bin,
            root,
            &tmp.join("bad.yaml"),
            r#"{"metricsPort": "9090"}"#,
            None,
        )? {
            bail!("{CHART} accepted a metricsPort that is a string (values.schema.json)");
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    eprintln!(
        "xtask: deploy-check: chart renders deploy/daemonset.yaml by default; custom values valid for {K8S_VERSIONS:?} and within policy; bad values refused"
    );
    Ok(())
}
