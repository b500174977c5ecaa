//! Loop devices over files: real block devices for tests (root only).

use crate::{require_root, run};
use std::path::{Path, PathBuf};

/// A loop device attached for the duration of a test, detached on drop
/// (also when the test panics).
#[derive(Debug)]
pub struct LoopDevice {
    pub path: PathBuf,
}

impl LoopDevice {
    /// Attaches `backing` to a free loop device, with partition scanning
    /// when `partscan`; `Err` says why this machine cannot.
    pub fn attach(backing: &Path, partscan: bool) -> Result<LoopDevice, String> {
        require_root("a loop device")?;
        let backing = backing.to_str().ok_or("the backing path is not UTF-8")?;
        let mut args = vec!["--find", "--show"];
        if partscan {
            args.push("--partscan");
        }
        args.push(backing);
        let path = run("losetup", &args)?;
        Ok(LoopDevice {
            path: PathBuf::from(path.trim()),
        })
    }

    /// The kernel name, `loop3`.
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Makes the partition devices match the table on the device, read by
    /// `partx` in userspace: kernels built without partition parsers (no
    /// CONFIG_EFI_PARTITION) find none by themselves, and `BLKRRPART`
    /// succeeds without creating any.
    pub fn sync_partitions(&self) -> Result<(), String> {
        run("partx", &["--update", &self.path.to_string_lossy()]).map(drop)
    }

    /// The node of partition `number`, `/dev/loop3p1`.
    pub fn partition(&self, number: u32) -> PathBuf {
        PathBuf::from(format!("{}p{number}", self.path.display()))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let path = self.path.to_string_lossy();
        if let Err(e) = run("losetup", &["--detach", &path]) {
            eprintln!("warning: {e}");
        }
    }
}

/// A sparse file of `size` bytes in `dir`, partitioned by sgdisk into
/// 16 MiB partitions 1 and 2 when `partitions`.
pub fn disk_image(dir: &Path, size: u64, partitions: bool) -> Result<PathBuf, String> {
    let path = dir.join("disk.img");
    let file = std::fs::File::create(&path).map_err(|e| format!("creating image: {e}"))?;
    file.set_len(size)
        .map_err(|e| format!("sizing image: {e}"))?;
    if partitions {
        let image = path.to_str().ok_or("the image path is not UTF-8")?;
        run("sgdisk", &["-n", "1:2048:+16M", "-n", "2:0:+16M", image])?;
    }
    Ok(path)
}

/// A 64 MiB disk image in `dir` with partitions 1 and 2, attached with
/// its partitions, and an ext4 made on partition `ext4_on`.
pub fn loop_disk_with_ext4(dir: &Path, ext4_on: u32) -> Result<LoopDevice, String> {
    let image = disk_image(dir, 64 << 20, true)?;
    let disk = LoopDevice::attach(&image, true)?;
    disk.sync_partitions()?;
    run(
        "mkfs.ext4",
        &["-q", &disk.partition(ext4_on).to_string_lossy()],
    )?;
    Ok(disk)
}
