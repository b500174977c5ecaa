//! Who else uses a disk: mounted partitions, holders (device-mapper, md),
//! active swap and loop devices on top of it. Writing under any of them
//! corrupts a live filesystem, so the target is refused while it has users.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Fails with [`Error::DiskBusy`] listing every user of `path` (a block device
/// or a regular file; symlinks such as `/dev/disk/by-id/…` are resolved):
/// mounted partitions, holders, active swap, and loop devices backed by it.
pub fn check_not_busy(path: &Path) -> Result<()> {
    check_not_busy_except(path, &[])
}

/// As [`check_not_busy`], except that read-only mounts at `read_only_mounts`
/// are not counted: the shutdown handoff reads the staged image from a saved
/// partition it mounted read-only while it writes the rest of the disk.
pub fn check_not_busy_except(path: &Path, read_only_mounts: &[PathBuf]) -> Result<()> {
    let users = users_of_except(path, read_only_mounts)?;
    if users.is_empty() {
        Ok(())
    } else {
        Err(Error::DiskBusy {
            target: path.display().to_string(),
            users,
        })
    }
}

/// Every user of `path`, described for an operator; empty when it is free.
pub(crate) fn users_of(path: &Path) -> Result<Vec<String>> {
    users_of_except(path, &[])
}

/// Every user of `path` but read-only mounts at `read_only_mounts`.
pub(crate) fn users_of_except(path: &Path, read_only_mounts: &[PathBuf]) -> Result<Vec<String>> {
    let resolved = fs::canonicalize(path)
        .map_err(|e| Error::io(format!("resolving {}", path.display()), e))?;
    let meta = fs::metadata(&resolved)
        .map_err(|e| Error::io(format!("inspecting {}", resolved.display()), e))?;
    let system = System::live()?;
    let file_type = meta.file_type();
    if file_type.is_block_device() {
        let dev = DevNum::from_rdev(meta.rdev());
        system
            .block_device_users(dev, read_only_mounts)
            .map_err(|e| Error::io(format!("finding users of {}", resolved.display()), e))
    } else if file_type.is_file() {
        system
            .file_users(&resolved, (meta.dev(), meta.ino()))
            .map_err(|e| Error::io(format!("finding users of {}", resolved.display()), e))
    } else {
        Err(Error::InvalidArgument(format!(
            "{}: not a block device or regular file",
            path.display()
        )))
    }
}

/// A device number as the kernel prints it (`major:minor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DevNum {
    pub major: u64,
    pub minor: u64,
}

impl DevNum {
    pub(crate) fn from_rdev(rdev: u64) -> Self {
        DevNum {
            major: nix::sys::stat::major(rdev),
            minor: nix::sys::stat::minor(rdev),
        }
    }

    /// Parses `"7:0"` (as in mountinfo and sysfs `dev` files).
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let (major, minor) = text.trim().split_once(':')?;
        Some(DevNum {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }
}

impl std::fmt::Display for DevNum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountEntry {
    pub dev: DevNum,
    /// The directory of the filesystem that is mounted (`/` unless a bind
    /// mount of a subdirectory).
    pub root: String,
    pub mount_point: String,
    /// The mount's own options say `ro`.
    pub read_only: bool,
    pub fstype: String,
    pub source: String,
}

/// The mounts of a `/proc/self/mountinfo` text, split into fields by
/// procfs; malformed lines are skipped. procfs leaves the kernel's octal
/// escapes (`\040` for a space) in paths, so they are undone here.
pub(crate) fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| procfs::process::MountInfo::from_line(line).ok())
        .filter_map(|mount| {
            Some(MountEntry {
                dev: DevNum::parse(&mount.majmin)?,
                root: unescape(&mount.root),
                mount_point: unescape(&mount.mount_point.to_string_lossy()),
                read_only: mount.mount_options.contains_key("ro"),
                source: mount
                    .mount_source
                    .as_deref()
                    .map(unescape)
                    .unwrap_or_default(),
                fstype: unescape(&mount.fs_type),
            })
        })
        .collect()
}

/// Parses `/proc/swaps` into the paths of the active swap areas (header and
/// malformed lines skipped); procfs has no reader for it.
pub(crate) fn parse_swaps(text: &str) -> Vec<String> {
    text.lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .map(unescape)
        .collect()
}

/// Undoes the kernel's octal escaping of whitespace and backslashes in paths
/// (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)))
            .map(|d| (d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A block device as sysfs names it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BlockDev {
    name: String,
    dev: DevNum,
    /// Its directory under /sys (holders, partitions).
    sys_dir: PathBuf,
}

impl BlockDev {
    fn dev_path(&self) -> String {
        format!("/dev/{}", self.name)
    }
}

/// The kernel's view of the system: `/sys` (a directory, so tests can build a
/// fake one) and the text of mountinfo and swaps.
pub(crate) struct System {
    sys: PathBuf,
    mountinfo: String,
    swaps: String,
}

impl System {
    pub(crate) fn live() -> Result<Self> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
        // Without CONFIG_SWAP there is no /proc/swaps, and no swap either.
        let swaps = match fs::read_to_string("/proc/swaps") {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io("reading /proc/swaps", e)),
        };
        Ok(System {
            sys: PathBuf::from("/sys"),
            mountinfo,
            swaps,
        })
    }

    /// The device itself and, for a whole disk, its partitions.
    fn device_and_partitions(&self, dev: DevNum) -> io::Result<Vec<BlockDev>> {
        let link = self
            .sys
            .join(format!("dev/block/{}:{}", dev.major, dev.minor));
        let sys_dir = fs::canonicalize(&link)?;
        let name = file_name(&sys_dir)?;
        let mut devices = vec![BlockDev { name, dev, sys_dir }];
        for child in read_dir_names(&devices[0].sys_dir)? {
            let dir = devices[0].sys_dir.join(&child);
            if !dir.join("partition").exists() {
                continue;
            }
            let text = fs::read_to_string(dir.join("dev"))?;
            let part_dev = DevNum::parse(&text).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad device number {text:?} in {}", dir.display()),
                )
            })?;
            devices.push(BlockDev {
                name: child,
                dev: part_dev,
                sys_dir: dir,
            });
        }
        Ok(devices)
    }

    fn block_device_users(
        &self,
        dev: DevNum,
        read_only_mounts: &[PathBuf],
    ) -> io::Result<Vec<String>> {
        let devices = self.device_and_partitions(dev)?;
        let mut users = Vec::new();

        let mounts = parse_mountinfo(&self.mountinfo);
        let allowed = |mount: &MountEntry| {
            mount.read_only
                && read_only_mounts
                    .iter()
                    .any(|allowed| Path::new(&mount.mount_point) == allowed)
        };
        for device in &devices {
            for mount in &mounts {
                if mount_is_on(mount, device) && !allowed(mount) {
                    users.push(format!(
                        "{} mounted on {}",
                        device.dev_path(),
                        mount.mount_point
                    ));
                }
            }
        }

        for device in &devices {
            for holder in read_dir_names(&device.sys_dir.join("holders"))? {
                let dm_name =
                    fs::read_to_string(self.sys.join("block").join(&holder).join("dm/name"))
                        .map(|name| format!(" ({})", name.trim()))
                        .unwrap_or_default();
                users.push(format!("{} held by {holder}{dm_name}", device.name));
            }
        }

        let numbers: HashSet<DevNum> = devices.iter().map(|d| d.dev).collect();
        let names: HashSet<String> = devices.iter().map(BlockDev::dev_path).collect();
        let is_ours = |path: &str| {
            names.contains(path)
                || fs::metadata(path).is_ok_and(|m| {
                    m.file_type().is_block_device()
                        && numbers.contains(&DevNum::from_rdev(m.rdev()))
                })
        };
        for swap in parse_swaps(&self.swaps) {
            if is_ours(&swap) {
                users.push(format!("{swap} is active swap"));
            }
        }
        for (loop_dev, backing) in self.loop_backing_files()? {
            if is_ours(&backing) {
                users.push(format!("{backing} is the backing device of {loop_dev}"));
            }
        }
        Ok(users)
    }

    fn file_users(&self, path: &Path, id: (u64, u64)) -> io::Result<Vec<String>> {
        let is_ours = |candidate: &str| {
            Path::new(candidate) == path
                || fs::metadata(candidate).is_ok_and(|m| (m.dev(), m.ino()) == id)
        };
        let mut users = Vec::new();
        for (loop_dev, backing) in self.loop_backing_files()? {
            if is_ours(&backing) {
                users.push(format!("attached to {loop_dev}"));
            }
        }
        for swap in parse_swaps(&self.swaps) {
            if is_ours(&swap) {
                users.push("active swap file".to_string());
            }
        }
        Ok(users)
    }

    /// `(/dev/loopN, backing file)` for every attached loop device.
    fn loop_backing_files(&self) -> io::Result<Vec<(String, String)>> {
        let mut attached = Vec::new();
        for name in read_dir_names(&self.sys.join("block"))? {
            if !name.starts_with("loop") {
                continue;
            }
            // Only attached loop devices have loop/backing_file.
            match fs::read_to_string(self.sys.join("block").join(&name).join("loop/backing_file")) {
                Ok(backing) => {
                    attached.push((format!("/dev/{name}"), backing.trim_end().to_string()))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(attached)
    }
}

/// A mount is on `device` when mountinfo names its device number, or when its
/// source is the device's node: btrfs reports an anonymous `0:N` number.
fn mount_is_on(mount: &MountEntry, device: &BlockDev) -> bool {
    if mount.dev == device.dev {
        return true;
    }
    let dev_path = device.dev_path();
    mount.source == dev_path
        || (mount.source.starts_with("/dev/")
            && fs::canonicalize(&mount.source).is_ok_and(|p| p == Path::new(&dev_path)))
}

/// Names in a directory, sorted; a missing directory has none.
fn read_dir_names(dir: &Path) -> io::Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in entries {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

fn file_name(path: &Path) -> io::Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} has no file name", path.display()),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use reimage_e2e::loopdev::{LoopDevice, disk_image, loop_disk_with_ext4};
    use reimage_e2e::mount::Mounted;
    use reimage_e2e::{TestResult, run, skip};

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
36 22 259:1 / /mnt/data\\040disk rw,noatime shared:5 master:1 - ext4 /dev/loop0p1 rw
37 22 0:45 / /srv rw,relatime - btrfs /dev/loop0p2 rw,space_cache=v2
38 22 0:5 / /dev rw,nosuid - devtmpfs devtmpfs rw
garbage line
";

    #[test]
    fn mountinfo_fields_are_parsed_and_unescaped() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(mounts.len(), 4);
        assert_eq!(
            mounts[1],
            MountEntry {
                dev: DevNum {
                    major: 259,
                    minor: 1
                },
                root: "/".into(),
                mount_point: "/mnt/data disk".into(),
                read_only: false,
                fstype: "ext4".into(),
                source: "/dev/loop0p1".into(),
            }
        );
        assert_eq!(mounts[2].fstype, "btrfs");
        assert_eq!(mounts[2].source, "/dev/loop0p2");
        assert_eq!(
            mounts[2].dev,
            DevNum {
                major: 0,
                minor: 45
            }
        );
    }

    #[test]
    fn swaps_skip_the_header_and_unescape() {
        let text = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
                    /dev/loop0p3                            partition\t1048572\t\t0\t\t-2\n\
                    /var/swap\\040file                       file\t\t1024\t\t0\t\t-3\n";
        assert_eq!(parse_swaps(text), vec!["/dev/loop0p3", "/var/swap file"]);
        assert!(parse_swaps("Filename Type Size Used Priority\n").is_empty());
    }

    #[test]
    fn dev_numbers_parse_with_trailing_newline() {
        assert_eq!(
            DevNum::parse("7:16\n"),
            Some(DevNum {
                major: 7,
                minor: 16
            })
        );
        assert_eq!(DevNum::parse("7"), None);
        assert_eq!(DevNum::parse("a:b"), None);
    }

    #[test]
    fn unescape_leaves_other_backslashes_alone() {
        assert_eq!(unescape(r"a\134b\040c\9"), r"a\b c\9");
        assert_eq!(unescape(r"end\04"), r"end\04");
    }

    /// Builds `/sys` for a disk loop0 (7:0) with partitions loop0p1 (259:1),
    /// mounted, and loop0p2 (259:2), held by dm-0, plus loop3 backed by a
    /// partition and swap on loop0p3 (259:3).
    fn fake_system(root: &Path) -> io::Result<System> {
        let disk = root.join("devices/virtual/block/loop0");
        for (part, dev) in [
            ("loop0p1", "259:1"),
            ("loop0p2", "259:2"),
            ("loop0p3", "259:3"),
        ] {
            fs::create_dir_all(disk.join(part).join("holders"))?;
            fs::write(disk.join(part).join("partition"), "1\n")?;
            fs::write(disk.join(part).join("dev"), format!("{dev}\n"))?;
        }
        fs::create_dir_all(disk.join("holders"))?;
        fs::create_dir_all(disk.join("queue"))?;
        fs::write(disk.join("dev"), "7:0\n")?;
        fs::create_dir(disk.join("loop0p2/holders/dm-0"))?;
        fs::create_dir_all(root.join("block/dm-0/dm"))?;
        fs::write(root.join("block/dm-0/dm/name"), "vg-root\n")?;
        fs::create_dir_all(root.join("block/loop3/loop"))?;
        fs::write(root.join("block/loop3/loop/backing_file"), "/dev/loop0p2\n")?;
        fs::create_dir_all(root.join("block/loop4/loop"))?;
        fs::write(
            root.join("block/loop4/loop/backing_file"),
            "/var/lib/image.raw\n",
        )?;
        // An unattached loop device has no backing_file.
        fs::create_dir_all(root.join("block/loop5/loop"))?;
        fs::create_dir_all(root.join("dev/block"))?;
        std::os::unix::fs::symlink(&disk, root.join("dev/block/7:0"))?;
        Ok(System {
            sys: root.to_path_buf(),
            mountinfo: MOUNTINFO.to_string(),
            swaps: "Filename Type Size Used Priority\n/dev/loop0p3 partition 1024 0 -2\n".into(),
        })
    }

    #[test]
    fn every_user_of_a_disk_and_its_partitions_is_listed() -> io::Result<()> {
        let root = tempfile::tempdir()?;
        let system = fake_system(root.path())?;
        let users = system.block_device_users(DevNum { major: 7, minor: 0 }, &[])?;
        assert_eq!(
            users,
            vec![
                "/dev/loop0p1 mounted on /mnt/data disk",
                "/dev/loop0p2 mounted on /srv",
                "loop0p2 held by dm-0 (vg-root)",
                "/dev/loop0p3 is active swap",
                "/dev/loop0p2 is the backing device of /dev/loop3",
            ]
        );
        Ok(())
    }

    #[test]
    fn only_a_read_only_mount_at_an_allowed_path_is_left_out() -> io::Result<()> {
        let root = tempfile::tempdir()?;
        let mut system = fake_system(root.path())?;
        let disk = DevNum { major: 7, minor: 0 };
        let allowed = [PathBuf::from("/mnt/data disk")];
        let mounted = "/dev/loop0p1 mounted on /mnt/data disk".to_string();
        // Read-write: still a user, whatever the caller allows.
        assert!(
            system
                .block_device_users(disk, &allowed)?
                .contains(&mounted)
        );
        system.mountinfo = MOUNTINFO.replace("disk rw,noatime", "disk ro,noatime");
        let users = system.block_device_users(disk, &allowed)?;
        assert!(!users.contains(&mounted), "{users:?}");
        assert!(
            users.contains(&"/dev/loop0p2 mounted on /srv".to_string()),
            "other mounts still count: {users:?}"
        );
        assert!(system.block_device_users(disk, &[])?.contains(&mounted));
        Ok(())
    }

    #[test]
    fn a_free_disk_has_no_users() -> io::Result<()> {
        let root = tempfile::tempdir()?;
        let mut system = fake_system(root.path())?;
        system.mountinfo = MOUNTINFO.lines().next().unwrap_or_default().to_string();
        system.swaps = String::new();
        fs::remove_dir(
            root.path()
                .join("devices/virtual/block/loop0/loop0p2/holders/dm-0"),
        )?;
        fs::remove_file(root.path().join("block/loop3/loop/backing_file"))?;
        assert!(
            system
                .block_device_users(DevNum { major: 7, minor: 0 }, &[])?
                .is_empty()
        );
        Ok(())
    }

    #[test]
    fn a_file_attached_to_a_loop_device_is_busy() -> io::Result<()> {
        let root = tempfile::tempdir()?;
        let system = fake_system(root.path())?;
        let users = system.file_users(Path::new("/var/lib/image.raw"), (0, 0))?;
        assert_eq!(users, vec!["attached to /dev/loop4"]);
        assert!(
            system
                .file_users(Path::new("/var/lib/other.raw"), (0, 0))?
                .is_empty()
        );
        Ok(())
    }

    #[test]
    fn a_character_device_is_refused() {
        let err = check_not_busy(Path::new("/dev/null")).expect_err("/dev/null is no disk");
        assert_eq!(err.code(), "InvalidArgument");
        assert!(err.to_string().contains("/dev/null"), "{err}");
    }

    #[test]
    fn an_unused_regular_file_is_free() -> io::Result<()> {
        let file = tempfile::NamedTempFile::new()?;
        check_not_busy(file.path()).map_err(Error::into_io)?;
        Ok(())
    }

    #[test]
    fn a_mounted_partition_and_a_stacked_loop_make_the_disk_busy() -> TestResult {
        let test = "a_mounted_partition_and_a_stacked_loop_make_the_disk_busy";
        let dir = tempfile::tempdir()?;
        let attached = disk_image(dir.path(), 64 << 20, true).and_then(|image| {
            let disk = LoopDevice::attach(&image, true)?;
            disk.sync_partitions()?;
            let first = disk.partition(1);
            let first = first.to_str().ok_or("partition path is not UTF-8")?;
            run("mkfs.ext4", &["-q", first])?;
            let mounted = Mounted::new(first, None)?;
            let stacked = LoopDevice::attach(&disk.partition(2), false)?;
            Ok((image, disk, mounted, stacked))
        });
        let (image, disk, mounted, stacked) = match attached {
            Ok(attached) => attached,
            Err(reason) => {
                skip(test, &reason);
                return Ok(());
            }
        };
        let link = dir.path().join("usb-Disk_0123-0:0");
        std::os::unix::fs::symlink(&disk.path, &link)?;

        let expected = vec![
            format!(
                "{} mounted on {}",
                disk.partition(1).display(),
                fs::canonicalize(mounted.path())?.display()
            ),
            format!(
                "{} is the backing device of {}",
                disk.partition(2).display(),
                stacked.path.display()
            ),
        ];
        match check_not_busy(&link) {
            Err(Error::DiskBusy { target, users }) => {
                assert_eq!(target, link.display().to_string());
                assert_eq!(users, expected);
            }
            other => panic!("expected DiskBusy, got {other:?}"),
        }
        let err = crate::disk::Target::open_for_write(&disk.path).expect_err("busy");
        assert_eq!(err.code(), "DiskBusy", "{err}");
        assert_eq!(
            users_of(&image)?,
            vec![format!("attached to {}", disk.path.display())]
        );

        drop(stacked);
        drop(mounted);
        check_not_busy(&disk.path)?;

        // While a writer holds the disk with O_EXCL, the kernel refuses to
        // mount any of its partitions.
        let _writer = crate::disk::Target::open_for_write(&disk.path)?;
        let first = disk.partition(1);
        let mount = Mounted::new(&first.to_string_lossy(), None);
        assert!(
            mount.is_err(),
            "{} was mounted under a writer",
            first.display()
        );
        Ok(())
    }

    #[test]
    fn the_handoff_may_write_beside_a_read_only_mount_of_a_partition() -> TestResult {
        let test = "the_handoff_may_write_beside_a_read_only_mount_of_a_partition";
        let dir = tempfile::tempdir()?;
        let disk = match loop_disk_with_ext4(dir.path(), 2) {
            Ok(disk) => disk,
            Err(reason) => {
                skip(test, &reason);
                return Ok(());
            }
        };
        let second = disk.partition(2).to_string_lossy().into_owned();
        let staged_on = tempfile::tempdir()?;
        let at = staged_on.path().to_string_lossy().into_owned();
        let allowed = [staged_on.path().to_path_buf()];

        run("mount", &["-o", "ro", &second, &at])?;
        let beside = crate::disk::Target::open_for_write_beside(&disk.path, &allowed);
        let exclusive = crate::disk::Target::open_for_write(&disk.path);
        run("mount", &["-o", "remount,rw", &at])?;
        let beside_rw = crate::disk::Target::open_for_write_beside(&disk.path, &allowed);
        run("umount", &[&at])?;

        assert!(beside.is_ok(), "read-only mount allowed: {beside:?}");
        assert_eq!(exclusive.expect_err("busy").code(), "DiskBusy");
        assert_eq!(beside_rw.expect_err("rw mount").code(), "DiskBusy");
        Ok(())
    }
}
