//! Which filesystem holds a path, on which block device, and whether that
//! device is a partition of the target. The in-place reimage needs it: the
//! agent's state must live where the new image does not overwrite it, and
//! the shutdown handoff mounts that filesystem again by its device.

use super::busy::{DevNum, MountEntry, parse_mountinfo};
use crate::{Error, Result};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The mounted filesystem that holds a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filesystem {
    /// The block device node, `/dev/vda2`.
    pub device: PathBuf,
    pub dev: DevNum,
    pub fstype: String,
    /// The path inside the filesystem (what it is under the filesystem's
    /// own root, whatever bind mounts show it at).
    pub path_in_fs: PathBuf,
    /// Set when the device is a partition: its disk and 1-based index.
    pub partition: Option<PartitionOf>,
}

/// A partition's disk and index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionOf {
    pub disk: DevNum,
    pub index: u32,
}

/// Finds the filesystem holding `path` (an existing directory or file).
/// A filesystem on no block device (tmpfs, overlay) is `InvalidArgument`.
pub fn filesystem_of(path: &Path) -> Result<Filesystem> {
    let path = fs::canonicalize(path)
        .map_err(|e| Error::io(format!("resolving {}", path.display()), e))?;
    let meta =
        fs::metadata(&path).map_err(|e| Error::io(format!("inspecting {}", path.display()), e))?;
    let dev = DevNum::from_rdev(meta.dev());
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
    let mounts = parse_mountinfo(&mountinfo);
    let mount = innermost_mount(&mounts, &path, dev).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{}: no mount of device {dev} holds it in /proc/self/mountinfo",
            path.display()
        ))
    })?;
    let sys_dir = fs::canonicalize(format!("/sys/dev/block/{dev}")).map_err(|_| {
        Error::InvalidArgument(format!(
            "{} is on a {} filesystem with no block device",
            path.display(),
            mount.fstype
        ))
    })?;
    let name = sys_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let device = PathBuf::from(format!("/dev/{name}"));
    let node_matches = fs::metadata(&device)
        .is_ok_and(|m| m.file_type().is_block_device() && DevNum::from_rdev(m.rdev()) == dev);
    if !node_matches {
        return Err(Error::InvalidArgument(format!(
            "{} is not the block device {dev} that holds {}",
            device.display(),
            path.display()
        )));
    }
    let relative = path
        .strip_prefix(&mount.mount_point)
        .unwrap_or(Path::new(""));
    Ok(Filesystem {
        device,
        dev,
        fstype: mount.fstype.clone(),
        path_in_fs: Path::new(&mount.root).join(relative),
        partition: partition_of(&sys_dir)?,
    })
}

/// The mount of `dev` whose mount point is the longest prefix of `path`
/// (the last one listed wins a tie: it is the one on top).
fn innermost_mount<'m>(
    mounts: &'m [MountEntry],
    path: &Path,
    dev: DevNum,
) -> Option<&'m MountEntry> {
    mounts
        .iter()
        .filter(|m| m.dev == dev && path.starts_with(&m.mount_point))
        .max_by_key(|m| Path::new(&m.mount_point).components().count())
}

/// A partition's sysfs directory has a `partition` file (its index) and
/// sits in its disk's directory.
fn partition_of(sys_dir: &Path) -> Result<Option<PartitionOf>> {
    let index = match fs::read_to_string(sys_dir.join("partition")) {
        Ok(text) => text.trim().parse::<u32>().map_err(|_| {
            Error::InvalidArgument(format!("{}/partition: not a number", sys_dir.display()))
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::io(
                format!("reading {}/partition", sys_dir.display()),
                e,
            ));
        }
    };
    let disk_dir = sys_dir.parent().unwrap_or(sys_dir);
    let text = fs::read_to_string(disk_dir.join("dev"))
        .map_err(|e| Error::io(format!("reading {}/dev", disk_dir.display()), e))?;
    let disk = DevNum::parse(&text).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{}/dev: bad device number {text:?}",
            disk_dir.display()
        ))
    })?;
    Ok(Some(PartitionOf { disk, index }))
}

/// The device number of a block device node (symlinks resolved).
pub fn block_device_number(path: &Path) -> Result<Option<DevNum>> {
    let meta =
        fs::metadata(path).map_err(|e| Error::io(format!("inspecting {}", path.display()), e))?;
    Ok(meta
        .file_type()
        .is_block_device()
        .then(|| DevNum::from_rdev(meta.rdev())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reimage_e2e::loopdev::loop_disk_with_ext4;
    use reimage_e2e::mount::Mounted;
    use reimage_e2e::{TestResult, skip};

    fn mount(dev: &str, root: &str, at: &str) -> MountEntry {
        MountEntry {
            dev: DevNum::parse(dev).expect("dev"),
            root: root.into(),
            mount_point: at.into(),
            read_only: false,
            fstype: "ext4".into(),
            source: "/dev/x".into(),
        }
    }

    #[test]
    fn the_innermost_mount_of_the_device_holds_the_path() {
        let mounts = [
            mount("254:1", "/", "/"),
            mount("254:2", "/", "/var/lib/reimage-agent"),
            // A bind mount of a subdirectory, mounted on top of the first.
            mount("254:2", "/state", "/var/lib/reimage-agent"),
        ];
        let dev = DevNum::parse("254:2").expect("dev");
        let path = Path::new("/var/lib/reimage-agent/staging");
        let found = innermost_mount(&mounts, path, dev).expect("found");
        assert_eq!(found.root, "/state");
        assert!(innermost_mount(&mounts, Path::new("/etc"), dev).is_none());
    }

    #[test]
    fn a_directory_on_a_mounted_partition_is_found_with_its_index() -> TestResult {
        let test = "a_directory_on_a_mounted_partition_is_found_with_its_index";
        let dir = tempfile::tempdir()?;
        let attached = loop_disk_with_ext4(dir.path(), 2).and_then(|disk| {
            let mounted = Mounted::new(&disk.partition(2).to_string_lossy(), None)?;
            Ok((disk, mounted))
        });
        let (disk, mounted) = match attached {
            Ok(attached) => attached,
            Err(reason) => {
                skip(test, &reason);
                return Ok(());
            }
        };
        fs::create_dir(mounted.path().join("state"))?;
        let found = filesystem_of(&mounted.path().join("state"))?;
        assert_eq!(found.device, disk.partition(2));
        assert_eq!(found.fstype, "ext4");
        assert_eq!(found.path_in_fs, Path::new("/state"));
        let disk_dev = block_device_number(&disk.path)?.ok_or("not a block device")?;
        assert_eq!(
            found.partition,
            Some(PartitionOf {
                disk: disk_dev,
                index: 2
            })
        );
        Ok(())
    }
}
