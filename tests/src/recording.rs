//! Reading a `whoclosed trace --record FILE` session in the tests: its kernel records (the
//! frame layout is documented in tracer-user/src/record.rs), and where the cgroups are.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use tracer_common::LifecycleRecord;

/// The kernel records of a recording, each as the ring buffer gave it.
pub fn kernel_records(path: &Path) -> Result<Vec<Vec<u8>>> {
    let f = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if f.get(..8) != Some(b"WHOCLREC".as_slice()) {
        bail!("{} is not a recording", path.display());
    }
    let word = |at: usize| -> Option<usize> {
        let b: [u8; 4] = f.get(at..at + 4)?.try_into().ok()?;
        Some(u32::from_le_bytes(b) as usize)
    };
    let mut at = 16 + word(12).context("header length")?;
    let mut out = Vec::new();
    while at + 5 <= f.len() {
        let kind = f[at];
        let len = word(at + 1).context("frame length")?;
        let body = f.get(at + 5..at + 5 + len).context("a frame cut short")?;
        if kind == 1 {
            out.push(body.to_vec());
        }
        at += 5 + len;
    }
    Ok(out)
}

/// `raw` as a lifecycle record (the layout of every tracepoint record and of `EXISTING`),
/// when it is one of that size.
pub fn lifecycle(raw: &[u8]) -> Option<LifecycleRecord> {
    if raw.len() != std::mem::size_of::<LifecycleRecord>() {
        return None;
    }
    // SAFETY: `raw` holds exactly size_of::<LifecycleRecord>() bytes, the record is plain
    // `#[repr(C)]` data for which any bit pattern is valid, and the read is unaligned.
    Some(unsafe { std::ptr::read_unaligned(raw.as_ptr().cast::<LifecycleRecord>()) })
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a hybrid
/// host).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// This process's cgroup v2 directory under `mount` (`/proc/self/cgroup`'s `0::` line).
pub fn own_cgroup(mount: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(mount.join(rel.trim_start_matches('/')))
}

/// The id the kernel gives the cgroup at `dir`: its directory's inode number.
pub fn cgroup_id(dir: &Path) -> Result<u64> {
    Ok(std::fs::metadata(dir)
        .with_context(|| format!("stat {}", dir.display()))?
        .ino())
}

/// A cgroup v2 directory made for a test and removed on drop, once the processes in it
/// have exited (declare it before them, so that it is dropped after them).
pub struct TempCgroup {
    pub path: PathBuf,
}

impl TempCgroup {
    pub fn new(mount: &Path, name: &str) -> Result<TempCgroup> {
        let path = mount.join(name);
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(TempCgroup { path })
    }
}

impl Drop for TempCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}
