//! Loop devices for tests that need a real block device (root only).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A loop device over a file, detached on drop (also on panic).
pub struct LoopDevice {
    pub path: PathBuf,
}

impl LoopDevice {
    /// Attaches `file` with partition scanning, or says why it cannot.
    pub fn attach(file: &Path) -> Result<LoopDevice, String> {
        if !is_root() {
            return Err("not running as root".into());
        }
        let output = Command::new("losetup")
            .args(["--find", "--show", "--partscan"])
            .arg(file)
            .output()
            .map_err(|e| format!("losetup cannot run: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        Ok(LoopDevice { path })
    }

    /// `/dev/loopNpK`.
    pub fn partition(&self, index: u32) -> PathBuf {
        PathBuf::from(format!("{}p{index}", self.path.display()))
    }

    /// Makes the partition devices match the table on the device, read by
    /// `partx` in userspace: some kernels are built without a GPT reader,
    /// so `BLKRRPART` alone may find nothing.
    pub fn sync_partitions(&self) -> Result<(), String> {
        let output = Command::new("partx")
            .arg("--update")
            .arg(&self.path)
            .output()
            .map_err(|e| format!("partx cannot run: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "partx --update failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// Whether this process runs as root (uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
