//! The floor of any cgroup_skb tracer: a pair of programs that do nothing (return "pass")
//! attached at the cgroup v2 root, where whoclosed attaches its packet hooks. `bench-h2
//! --floor` measures them in place of the tracer: what the hook costs before a single
//! instruction of ours runs.
//!
//! The object is built from four lines of LLVM IR with `llc` (Debian's, any version with
//! the BPF target) and loaded and attached with `bpftool`; both are benchmark tools only.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

const IR: &str = r#"target triple = "bpfel"
define i32 @floor_in(i8* %ctx) #0 section "cgroup_skb/ingress" {
  ret i32 1
}
define i32 @floor_out(i8* %ctx) #0 section "cgroup_skb/egress" {
  ret i32 1
}
@_license = global [4 x i8] c"GPL\00", section "license"
attributes #0 = { nounwind }
"#;

/// The two empty programs, loaded and pinned; attached between [`Floor::attach`] and
/// [`Floor::detach`] (and detached and unpinned on drop).
pub struct Floor {
    pins: PathBuf,
    cgroup: PathBuf,
    attached: bool,
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (Debian llvm and bpftool)"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Floor {
    /// Builds and loads the programs (not attached yet).
    pub fn load(scratch: &Path) -> Result<Floor> {
        std::fs::create_dir_all(scratch)?;
        let ll = scratch.join("floor.ll");
        let obj = scratch.join("floor.o");
        std::fs::write(&ll, IR)?;
        run(Command::new("llc")
            .args(["-march=bpfel", "-filetype=obj", "-o"])
            .arg(&obj)
            .arg(&ll))?;
        let pins = PathBuf::from(format!(
            "/sys/fs/bpf/whoclosed-floor-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&pins);
        run(Command::new("bpftool")
            .args(["prog", "loadall"])
            .arg(&obj)
            .arg(&pins)
            .args(["type", "cgroup/skb"]))?;
        Ok(Floor {
            pins,
            cgroup: crate::image::cgroup2_mount()?,
            attached: false,
        })
    }

    fn each(&self, verb: &str) -> Result<()> {
        for (dir, prog) in [("ingress", "floor_in"), ("egress", "floor_out")] {
            let mut cmd = Command::new("bpftool");
            cmd.args(["cgroup", verb])
                .arg(&self.cgroup)
                .args([dir, "pinned"])
                .arg(self.pins.join(prog));
            if verb == "attach" {
                cmd.arg("multi");
            }
            run(&mut cmd)?;
        }
        Ok(())
    }

    pub fn attach(&mut self) -> Result<()> {
        self.each("attach")?;
        self.attached = true;
        Ok(())
    }

    pub fn detach(&mut self) -> Result<()> {
        if self.attached {
            self.attached = false;
            self.each("detach")?;
        }
        Ok(())
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            eprintln!("bench-h2 --floor: {e:#}");
        }
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}
