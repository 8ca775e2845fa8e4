//! `cargo xtask deploy-check`: the manifests in deploy/ validated offline.
//!
//! Kubernetes schemas: PyPI `kubernetes-validate` (ships the schemas; `--strict` rejects
//! unknown fields) for the oldest and newest Kubernetes versions it knows that we support.
//! Policy: deploy/check.py (least privilege, read-only host mounts, probes, limits). Both
//! must also reject a broken copy, so a check that passes everything fails here.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

const VALIDATOR: &str = "kubernetes-validate==1.37.0";
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
    if have.as_deref().map(str::trim) == VALIDATOR.split("==").nth(1) {
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
    Ok(())
}
