//! A real block device whose I/O errors the test chooses: a one-file FUSE
//! file system over a backing file, with a loop device on top. This kernel
//! has no device-mapper or NBD, but `/dev/fuse` works.
//!
//! Kernel facts behind the recipe: FUSE splits requests into 128 KiB pieces
//! and the loop driver completes a short write as a success, so the loop
//! device's `queue/max_sectors_kb` is clamped to 128: then every request the
//! file system fails reaches the writer as EIO.

use crate::is_root;
use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request, WriteFlags,
};
use std::ffi::OsStr;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// The only file of the file system.
const DISK_NAME: &str = "disk";
const DISK_INODE: INodeNo = INodeNo(2);

/// What the device does wrong. Ranges are byte ranges of the disk; a request
/// that overlaps one fails as a whole, as a bad sector fails its request.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Reads overlapping this range fail with EIO.
    pub fail_reads: Option<Range<u64>>,
    /// Writes overlapping this range fail with EIO.
    pub fail_writes: Option<Range<u64>>,
    /// Every fsync (the loop device's flush) fails with EIO.
    pub fail_fsync: bool,
    /// Requests overlapping this range wait this long before they are
    /// answered (or failed).
    pub stall: Option<(Range<u64>, Duration)>,
    /// The faults above start only once a read overlapping this range was
    /// served: "after the read-back began", without racing the writer.
    pub armed_by_read_of: Option<Range<u64>>,
}

/// Counters a test can assert on: a fault that never fired proves nothing.
#[derive(Debug, Default)]
struct Counters {
    failed_reads: AtomicU64,
    failed_writes: AtomicU64,
    failed_fsyncs: AtomicU64,
    stalls: AtomicU64,
}

struct Shared {
    faults: Mutex<Faults>,
    armed: AtomicBool,
    counters: Counters,
}

impl Shared {
    fn faults(&self) -> Faults {
        self.faults
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

fn overlaps(range: &Option<Range<u64>>, offset: u64, len: u64) -> bool {
    range
        .as_ref()
        .is_some_and(|r| r.start < offset + len && offset < r.end)
}

struct DiskFs {
    backing: File,
    size: u64,
    shared: Arc<Shared>,
}

impl DiskFs {
    fn attr(&self, ino: INodeNo) -> FileAttr {
        let is_root = ino == INodeNo::ROOT;
        FileAttr {
            ino,
            size: if is_root { 0 } else { self.size },
            blocks: self.size / 512,
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            crtime: SystemTime::UNIX_EPOCH,
            kind: if is_root {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if is_root { 0o755 } else { 0o600 },
            nlink: if is_root { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }

    /// Applies the stall and says whether the request must fail.
    fn misbehaves(
        &self,
        offset: u64,
        len: u64,
        fail: &Option<Range<u64>>,
        faults: &Faults,
    ) -> bool {
        if !self.shared.armed.load(Ordering::SeqCst) {
            return false;
        }
        if let Some((range, pause)) = &faults.stall
            && overlaps(&Some(range.clone()), offset, len)
        {
            self.shared.counters.stalls.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(*pause);
        }
        overlaps(fail, offset, len)
    }
}

const TTL: Duration = Duration::from_secs(1);

impl Filesystem for DiskFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == DISK_NAME {
            reply.entry(&TTL, &self.attr(DISK_INODE), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT || ino == DISK_INODE {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Direct I/O: no FUSE page cache, so every read and write of the
        // loop device reaches this file system and its faults.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let faults = self.shared.faults();
        if self.misbehaves(offset, u64::from(size), &faults.fail_reads, &faults) {
            self.shared
                .counters
                .failed_reads
                .fetch_add(1, Ordering::SeqCst);
            reply.error(Errno::EIO);
            return;
        }
        if overlaps(&faults.armed_by_read_of, offset, u64::from(size)) {
            self.shared.armed.store(true, Ordering::SeqCst);
        }
        let len = u64::from(size).min(self.size.saturating_sub(offset));
        let mut buffer = vec![0u8; len as usize];
        match self.backing.read_exact_at(&mut buffer, offset) {
            Ok(()) => reply.data(&buffer),
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let faults = self.shared.faults();
        let len = data.len() as u64;
        if offset + len > self.size {
            reply.error(Errno::ENOSPC);
            return;
        }
        if self.misbehaves(offset, len, &faults.fail_writes, &faults) {
            self.shared
                .counters
                .failed_writes
                .fetch_add(1, Ordering::SeqCst);
            reply.error(Errno::EIO);
            return;
        }
        match self.backing.write_all_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let faults = self.shared.faults();
        if faults.fail_fsync && self.shared.armed.load(Ordering::SeqCst) {
            self.shared
                .counters
                .failed_fsyncs
                .fetch_add(1, Ordering::SeqCst);
            reply.error(Errno::EIO);
            return;
        }
        match self.backing.sync_data() {
            Ok(()) => reply.ok(),
            Err(_) => reply.error(Errno::EIO),
        }
    }
}

/// A loop device over a FUSE file that fails where the test says. Detached
/// and unmounted on drop (also on panic).
pub struct FaultyDisk {
    device: PathBuf,
    backing: PathBuf,
    shared: Arc<Shared>,
    /// Unmounted after the loop device is detached.
    session: Option<BackgroundSession>,
    mountpoint: tempfile::TempDir,
    /// The device's `max_sectors_kb` before the clamp, put back before it
    /// is detached: the value outlives `losetup -d`, and the next user of
    /// that loop device (a benchmark) must not inherit 128 KiB requests.
    unclamped: Option<(PathBuf, String)>,
}

impl FaultyDisk {
    /// Puts a faulty block device over the disk image at `backing` (which the
    /// test keeps reading directly: it is what the "disk" holds). No faults
    /// until [`FaultyDisk::set`]. `Err` says why it cannot run here.
    pub fn over(backing: &Path) -> Result<FaultyDisk, String> {
        if !is_root() {
            return Err("not running as root".into());
        }
        if !Path::new("/dev/fuse").exists() {
            return Err("no /dev/fuse".into());
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(backing)
            .map_err(|e| format!("opening {}: {e}", backing.display()))?;
        let size = file
            .metadata()
            .map_err(|e| format!("inspecting {}: {e}", backing.display()))?
            .len();
        let shared = Arc::new(Shared {
            faults: Mutex::new(Faults::default()),
            armed: AtomicBool::new(true),
            counters: Counters::default(),
        });
        let mountpoint = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let fs = DiskFs {
            backing: file,
            size,
            shared: Arc::clone(&shared),
        };
        let mut config = Config::default();
        config
            .mount_options
            .push(fuser::MountOption::FSName("reimage-faulty-disk".into()));
        let session = fuser::spawn_mount(fs, mountpoint.path(), &config)
            .map_err(|e| format!("mounting the FUSE file system: {e}"))?;
        let file_path = mountpoint.path().join(DISK_NAME);
        let mut disk = FaultyDisk {
            device: PathBuf::new(),
            backing: backing.to_path_buf(),
            shared,
            session: Some(session),
            mountpoint,
            unclamped: None,
        };
        let (device, unclamped) = attach_clamped(&file_path)?;
        disk.device = device;
        disk.unclamped = Some(unclamped);
        Ok(disk)
    }

    /// The block device (`/dev/loopN`).
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// The file the device's bytes live in, read without any fault.
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Replaces the faults. With `armed_by_read_of` set they wait for that read.
    pub fn set(&self, faults: Faults) {
        self.shared
            .armed
            .store(faults.armed_by_read_of.is_none(), Ordering::SeqCst);
        *self
            .shared
            .faults
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = faults;
    }

    /// Injected failures so far: reads, writes, fsyncs.
    pub fn failures(&self) -> (u64, u64, u64) {
        let c = &self.shared.counters;
        (
            c.failed_reads.load(Ordering::SeqCst),
            c.failed_writes.load(Ordering::SeqCst),
            c.failed_fsyncs.load(Ordering::SeqCst),
        )
    }

    /// Requests that were stalled so far.
    pub fn stalls(&self) -> u64 {
        self.shared.counters.stalls.load(Ordering::SeqCst)
    }
}

impl Drop for FaultyDisk {
    fn drop(&mut self) {
        self.set(Faults::default());
        if let Some((knob, value)) = &self.unclamped {
            let _ = std::fs::write(knob, value);
        }
        if !self.device.as_os_str().is_empty() {
            let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        }
        if let Some(session) = self.session.take() {
            // The loop device lets go of the file asynchronously: a busy
            // unmount is retried, then left lazy so nothing hangs.
            let mut session = Some(session);
            for _ in 0..50 {
                let busy = Command::new("umount")
                    .arg(self.mountpoint.path())
                    .status()
                    .map(|s| !s.success())
                    .unwrap_or(true);
                if !busy {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.mountpoint.path())
                .status();
            drop(session.take());
        }
    }
}

/// `losetup` over `file`, with requests clamped to 128 KiB (see the module
/// docs); also returns the clamp's knob and the value it had.
fn attach_clamped(file: &Path) -> Result<(PathBuf, (PathBuf, String)), String> {
    let output = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(file)
        .output()
        .map_err(|e| format!("losetup cannot run: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "losetup over a FUSE file failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let device = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let name = device
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let clamp = PathBuf::from(format!("/sys/block/{name}/queue/max_sectors_kb"));
    let before = std::fs::read_to_string(&clamp).map(|v| v.trim().to_string());
    let clamped = before.and_then(|before| std::fs::write(&clamp, "128").map(|()| before));
    match clamped {
        Ok(before) => Ok((device, (clamp, before))),
        Err(e) => {
            let _ = Command::new("losetup").arg("-d").arg(&device).status();
            Err(format!("clamping {}: {e}", clamp.display()))
        }
    }
}
