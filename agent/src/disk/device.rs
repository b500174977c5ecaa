//! The reimage target: a block device or a regular file, written and read
//! back with positional O_DIRECT I/O where the kernel allows it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, OFlag, PosixFadviseAdvice, fallocate, posix_fadvise};
use nix::libc;

use super::aligned::{ALIGNMENT, AlignedBuf, is_aligned};
use super::busy;
use crate::{Error, Result};

/// `ALIGNMENT` as a file offset.
const ALIGN: u64 = ALIGNMENT as u64;

/// Size of the bounce buffer that carries misaligned memory through O_DIRECT.
const BOUNCE_SIZE: usize = 1 << 20;

/// Size of the shared zero buffer that zero ranges are written from when the
/// target cannot zero them itself.
const ZERO_CHUNK: usize = 1 << 20;

/// One zero buffer for every target: zero writes never allocate.
static ZEROS: LazyLock<AlignedBuf> = LazyLock::new(|| AlignedBuf::new(ZERO_CHUNK));

/// How `BLKRRPART` is retried while the kernel still reports a partition open.
const REREAD_ATTEMPTS: u32 = 10;
const REREAD_FIRST_DELAY: Duration = Duration::from_millis(100);
const REREAD_MAX_DELAY: Duration = Duration::from_secs(1);

mod ioctl {
    // BLKGETSIZE64 is declared `_IOR(0x12, 114, size_t)` but always returns a
    // u64, so the request code carries size_t's size while the data is a u64.
    nix::ioctl_read_bad!(
        blk_get_size64,
        nix::request_code_read!(0x12, 114, std::mem::size_of::<usize>()),
        u64
    );
    // BLKSSZGET is an old `_IO` request that nevertheless returns an int.
    nix::ioctl_read_bad!(
        blk_ssz_get,
        nix::request_code_none!(0x12, 104),
        nix::libc::c_int
    );
    nix::ioctl_none!(blk_rr_part, 0x12, 95);
    nix::ioctl_none!(blk_flsbuf, 0x12, 97);
}

/// What a [`Target`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A whole disk or a partition (`/dev/sda`, `/dev/loop0`).
    BlockDevice,
    /// A regular file holding a disk image; it may grow.
    File,
}

/// How [`Target::zero_range`] makes a range read back as zeros. It only moves
/// down the list, so a refused call is not retried on every range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum ZeroMethod {
    /// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`: a hole in a file, a
    /// zeroout without fallback on a block device.
    PunchHole = 0,
    /// `FALLOC_FL_ZERO_RANGE` (regular files only).
    ZeroRange = 1,
    /// Writing zeros from the shared zero buffer.
    WriteZeros = 2,
}

impl ZeroMethod {
    fn from_u8(value: u8) -> Self {
        match value {
            0 => ZeroMethod::PunchHole,
            1 => ZeroMethod::ZeroRange,
            _ => ZeroMethod::WriteZeros,
        }
    }
}

/// An open reimage target. All I/O is positional and takes `&self`, so a
/// writer thread and a verifier can share it; callers must not write
/// overlapping ranges concurrently.
#[derive(Debug)]
pub struct Target {
    path: PathBuf,
    kind: TargetKind,
    /// Opened with O_EXCL for writing block devices, and with O_DIRECT where
    /// the kernel allows it.
    primary: File,
    /// A second, buffered descriptor of the same target for unaligned heads
    /// and tails; only present while `primary` uses O_DIRECT.
    buffered: Option<File>,
    logical_block_size: u64,
    /// The device size, or the file length (grown by our own writes).
    size: AtomicU64,
    zero_method: AtomicU8,
}

/// How to open a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    ReadOnly,
    Write,
    /// Write without O_EXCL, see [`Target::open_for_write_beside`].
    WriteShared,
    WriteCreate,
}

impl Target {
    /// Opens the target for writing.
    ///
    /// Block devices are refused while busy (mounted partitions, holders,
    /// swap, loop devices on top) and are opened with O_EXCL, so the kernel
    /// also refuses mounts while we write, and with O_DIRECT; if O_DIRECT is
    /// refused (EINVAL) the target falls back to buffered I/O, logged.
    /// Regular files must exist or be creatable (never truncated) and use
    /// O_DIRECT where the filesystem allows it. Anything else (a character
    /// device, a directory, a missing parent directory) is `InvalidArgument`.
    pub fn open_for_write(path: &Path) -> Result<Target> {
        Target::open_for_write_beside(path, &[])
    }

    /// As [`Target::open_for_write`], but read-only mounts at
    /// `read_only_mounts` (saved partitions of the target, from which the
    /// shutdown handoff reads its staged image) may stay. The kernel refuses
    /// O_EXCL while any partition is mounted, so then the disk is opened
    /// without it; the sink's protected ranges keep writes off those
    /// partitions.
    pub fn open_for_write_beside(path: &Path, read_only_mounts: &[PathBuf]) -> Result<Target> {
        match fs::metadata(path) {
            Ok(meta) => {
                let kind = kind_of(path, &meta.file_type())?;
                busy::check_not_busy_except(path, read_only_mounts)?;
                let access = if read_only_mounts.is_empty() {
                    Access::Write
                } else {
                    Access::WriteShared
                };
                Target::open(path, kind, access)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let parent = match path.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
                if !parent.is_dir() {
                    return Err(Error::InvalidArgument(format!(
                        "{}: parent directory {} does not exist",
                        path.display(),
                        parent.display()
                    )));
                }
                Target::open(path, TargetKind::File, Access::WriteCreate)
            }
            Err(e) => Err(Error::io(format!("inspecting {}", path.display()), e)),
        }
    }

    /// Opens the target for reading back (no busy check, no O_EXCL), with
    /// O_DIRECT where allowed.
    pub fn open_read_only(path: &Path) -> Result<Target> {
        let meta = match fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::InvalidArgument(format!(
                    "{}: does not exist",
                    path.display()
                )));
            }
            Err(e) => return Err(Error::io(format!("inspecting {}", path.display()), e)),
        };
        let kind = kind_of(path, &meta.file_type())?;
        Target::open(path, kind, Access::ReadOnly)
    }

    fn open(path: &Path, kind: TargetKind, access: Access) -> Result<Target> {
        let exclusive = kind == TargetKind::BlockDevice
            && matches!(access, Access::Write | Access::WriteCreate);
        let (primary, mut direct) = match open_file(path, access, exclusive, true) {
            Ok(file) => (file, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(
                    path = %path.display(),
                    "O_DIRECT refused (EINVAL), falling back to buffered I/O: \
                     writes go through the page cache and read-back needs drop_caches"
                );
                (
                    open_file(path, access, exclusive, false).map_err(|e| open_error(path, e))?,
                    false,
                )
            }
            Err(e) => return Err(open_error(path, e)),
        };

        // The path may have been replaced between the check and the open.
        let meta = primary
            .metadata()
            .map_err(|e| Error::io(format!("inspecting {}", path.display()), e))?;
        if kind_of(path, &meta.file_type())? != kind {
            return Err(Error::InvalidArgument(format!(
                "{}: changed type while being opened",
                path.display()
            )));
        }

        let (size, logical_block_size) = match kind {
            TargetKind::BlockDevice => block_device_geometry(&primary)
                .map_err(|e| Error::io(format!("querying the size of {}", path.display()), e))?,
            TargetKind::File => (meta.len(), 512),
        };
        if direct && logical_block_size > ALIGN {
            // O_DIRECT would need alignment beyond our buffers' 4096 bytes.
            tracing::warn!(
                path = %path.display(),
                logical_block_size,
                "logical block size exceeds the I/O alignment, using buffered I/O"
            );
            clear_o_direct(&primary)
                .map_err(|e| Error::io(format!("clearing O_DIRECT on {}", path.display()), e))?;
            direct = false;
        }

        let buffered = if direct {
            Some(reopen_buffered(&primary, access).map_err(|e| {
                Error::io(
                    format!("opening {} a second time for buffered I/O", path.display()),
                    e,
                )
            })?)
        } else {
            None
        };

        Ok(Target {
            path: path.to_path_buf(),
            kind,
            primary,
            buffered,
            logical_block_size,
            size: AtomicU64::new(size),
            zero_method: AtomicU8::new(ZeroMethod::PunchHole as u8),
        })
    }

    /// The path the target was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this is a block device or a regular file.
    pub fn kind(&self) -> TargetKind {
        self.kind
    }

    /// Size in bytes: `BLKGETSIZE64` for block devices; for files the length
    /// at open, grown by this target's own writes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// `BLKSSZGET` for block devices, 512 for files.
    pub fn logical_block_size(&self) -> u64 {
        self.logical_block_size
    }

    /// Whether aligned I/O bypasses the page cache (O_DIRECT).
    pub fn uses_direct_io(&self) -> bool {
        self.buffered.is_some()
    }

    /// Writes all of `data` at `offset`. The aligned middle (offset and length
    /// multiples of 4096) goes through O_DIRECT, bounced through an aligned
    /// buffer when `data` itself is not 4096-aligned in memory; unaligned
    /// heads and tails go through the buffered descriptor. Errors are
    /// `DiskWriteFailed` naming the offset.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        let end = self.end_of(offset, data.len() as u64)?;
        self.write_split(data, offset)
            .map_err(|e| Error::DiskWriteFailed {
                context: format!(
                    "{} bytes at offset {offset} of {}",
                    data.len(),
                    self.path.display()
                ),
                source: e,
            })?;
        self.grew_to(end);
        Ok(())
    }

    /// Reads exactly `data.len()` bytes at `offset`. Wherever direct I/O is in
    /// use the whole read goes through it — unaligned parts by reading the
    /// enclosing aligned blocks into a bounce buffer — so a read-back is never
    /// served from the page cache. Errors (including reading past the end) are
    /// `DiskReadFailed`.
    pub fn read_at(&self, data: &mut [u8], offset: u64) -> Result<()> {
        self.end_of(offset, data.len() as u64)?;
        self.read_split(data, offset)
            .map_err(|e| Error::DiskReadFailed {
                context: format!(
                    "{} bytes at offset {offset} of {}",
                    data.len(),
                    self.path.display()
                ),
                source: e,
            })
    }

    /// Makes `[offset, offset + len)` read back as zeros, never by skipping it.
    ///
    /// Block devices: `fallocate(PUNCH_HOLE | KEEP_SIZE)`, which the kernel
    /// maps to a zeroout *without* fallback (BLKZEROOUT and ZERO_RANGE may
    /// silently write zeros instead, BLKDISCARD need not zero at all); where
    /// that is refused with EOPNOTSUPP, zeros are written from one shared
    /// buffer, and later calls go straight to writing. Regular files: punch a
    /// hole (keeps sparse files sparse), else `FALLOC_FL_ZERO_RANGE`, else
    /// write zeros; a range past the end grows the file.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        let end = self.end_of(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let failed = |e: io::Error| Error::DiskWriteFailed {
            context: format!(
                "zeros over {len} bytes at offset {offset} of {}",
                self.path.display()
            ),
            source: e,
        };
        match self.kind {
            TargetKind::BlockDevice => {
                if end > self.size() {
                    return Err(failed(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "the range ends past the end of the device ({} bytes)",
                            self.size()
                        ),
                    )));
                }
                self.zero_block_range(offset, end).map_err(failed)
            }
            TargetKind::File => {
                self.zero_file_range(offset, end).map_err(failed)?;
                self.grew_to(end);
                Ok(())
            }
        }
    }

    /// Flushes written data and metadata to stable storage. fsync, not
    /// fdatasync: a file target that grew needs its new length persisted.
    /// Both descriptors share one inode, so one fsync covers both.
    pub fn sync(&self) -> Result<()> {
        self.primary.sync_all().map_err(|e| Error::DiskWriteFailed {
            context: format!("{} to stable storage (fsync)", self.path.display()),
            source: e,
        })
    }

    /// Asks the kernel to re-read the partition table (`BLKRRPART`), so it
    /// sees the one just written. A no-op for files.
    ///
    /// The kernel answers EBUSY for a while after the last close of a
    /// partition, so EBUSY is retried with a short backoff before it becomes
    /// `DiskBusy`. EINVAL means the device does not scan partitions (a loop
    /// device without partscan): logged, not an error.
    pub fn reread_partition_table(&self) -> Result<()> {
        if self.kind == TargetKind::File {
            return Ok(());
        }
        let mut delay = REREAD_FIRST_DELAY;
        let mut attempt = 1;
        loop {
            // SAFETY: the descriptor is open for the duration of the call and
            // BLKRRPART passes no data.
            let result = unsafe { ioctl::blk_rr_part(self.primary.as_raw_fd()) };
            match result {
                Ok(_) => return Ok(()),
                Err(Errno::EINVAL) => {
                    tracing::info!(
                        path = %self.path.display(),
                        "the kernel does not scan partitions on this device; partition table not re-read"
                    );
                    return Ok(());
                }
                Err(Errno::EBUSY) if attempt < REREAD_ATTEMPTS => {
                    tracing::debug!(path = %self.path.display(), attempt, "BLKRRPART busy, retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(REREAD_MAX_DELAY);
                    attempt += 1;
                }
                Err(Errno::EBUSY) => {
                    // Best effort: naming the users helps, but the error is
                    // already known to be "busy".
                    let mut users = busy::users_of(&self.path).unwrap_or_default();
                    if users.is_empty() {
                        users.push(format!(
                            "a partition is still open (BLKRRPART busy after {REREAD_ATTEMPTS} attempts)"
                        ));
                    }
                    return Err(Error::DiskBusy {
                        target: self.path.display().to_string(),
                        users,
                    });
                }
                Err(e) => {
                    return Err(Error::io(
                        format!("re-reading the partition table of {}", self.path.display()),
                        e.into(),
                    ));
                }
            }
        }
    }

    /// Drops the target's cached pages, so a buffered read-back reads the
    /// disk: `BLKFLSBUF` (writes back, then invalidates) for block devices;
    /// fdatasync and `POSIX_FADV_DONTNEED` for files (DONTNEED skips dirty
    /// pages, hence the sync first).
    pub fn drop_caches(&self) -> Result<()> {
        let result = match self.kind {
            TargetKind::BlockDevice => {
                // SAFETY: the descriptor is open for the duration of the call
                // and BLKFLSBUF passes no data.
                unsafe { ioctl::blk_flsbuf(self.primary.as_raw_fd()) }
                    .map(drop)
                    .map_err(io::Error::from)
            }
            TargetKind::File => self.primary.sync_data().and_then(|()| {
                posix_fadvise(&self.primary, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED)
                    .map_err(io::Error::from)
            }),
        };
        result.map_err(|e| {
            Error::io(
                format!("dropping cached pages of {}", self.path.display()),
                e,
            )
        })
    }

    /// `offset + len`, refusing ranges that overflow.
    fn end_of(&self, offset: u64, len: u64) -> Result<u64> {
        offset
            .checked_add(len)
            .filter(|end| i64::try_from(*end).is_ok())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "range of {len} bytes at offset {offset} of {} is out of bounds",
                    self.path.display()
                ))
            })
    }

    fn grew_to(&self, end: u64) {
        if self.kind == TargetKind::File {
            self.size.fetch_max(end, Ordering::Relaxed);
        }
    }

    fn buffered(&self) -> &File {
        self.buffered.as_ref().unwrap_or(&self.primary)
    }

    fn write_split(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if self.buffered.is_none() {
            return self.primary.write_all_at(data, offset);
        }
        let (head, middle) = split_aligned(offset, data.len());
        let (head_data, rest) = data.split_at(head);
        let (middle_data, tail_data) = rest.split_at(middle);
        self.buffered().write_all_at(head_data, offset)?;
        self.write_direct(middle_data, offset + head as u64)?;
        self.buffered()
            .write_all_at(tail_data, offset + (head + middle) as u64)
    }

    /// Writes an aligned range through O_DIRECT, bouncing misaligned memory.
    fn write_direct(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if data.is_empty() || is_aligned(data) {
            return self.primary.write_all_at(data, offset);
        }
        let mut bounce = AlignedBuf::new(data.len().min(BOUNCE_SIZE));
        let mut position = offset;
        for chunk in data.chunks(bounce.capacity()) {
            bounce.set_len(chunk.len());
            bounce.copy_from_slice(chunk);
            self.primary.write_all_at(&bounce, position)?;
            position += chunk.len() as u64;
        }
        Ok(())
    }

    fn read_split(&self, data: &mut [u8], offset: u64) -> io::Result<()> {
        if self.buffered.is_none() {
            return self.primary.read_exact_at(data, offset);
        }
        let end = offset + data.len() as u64;
        if offset.is_multiple_of(ALIGN) && data.len().is_multiple_of(ALIGNMENT) && is_aligned(data)
        {
            let got = read_direct_up_to(&self.primary, data, offset)?;
            return ensure_read(got == data.len(), offset + got as u64, end);
        }
        // Read the enclosing aligned blocks and copy out the wanted bytes.
        let aligned_start = offset - offset % ALIGN;
        let aligned_end = end.next_multiple_of(ALIGN);
        let mut bounce = AlignedBuf::new(((aligned_end - aligned_start) as usize).min(BOUNCE_SIZE));
        let mut position = aligned_start;
        while position < end {
            let want = ((aligned_end - position) as usize).min(bounce.capacity());
            bounce.set_len(want);
            let got = read_direct_up_to(&self.primary, &mut bounce, position)?;
            let got_end = position + got as u64;
            let from = position.max(offset);
            let to = got_end.min(end);
            if to > from {
                data[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&bounce[(from - position) as usize..(to - position) as usize]);
            }
            if got < want {
                return ensure_read(got_end >= end, got_end, end);
            }
            position += want as u64;
        }
        Ok(())
    }

    fn zero_block_range(&self, offset: u64, end: u64) -> io::Result<()> {
        // fallocate on a block device wants logical-block-aligned ranges; the
        // ragged edges, if any, are written.
        let lbs = self.logical_block_size;
        let first = offset.next_multiple_of(lbs);
        let last = end - end % lbs;
        if first < last && self.zero_method() == ZeroMethod::PunchHole {
            match punch_hole(&self.primary, first, last - first) {
                Ok(()) => {
                    self.write_zeros(offset, first)?;
                    return self.write_zeros(last, end);
                }
                Err(Errno::EOPNOTSUPP) => {
                    tracing::info!(
                        path = %self.path.display(),
                        "the device cannot zero ranges without falling back (EOPNOTSUPP), writing zeros"
                    );
                    self.set_zero_method(ZeroMethod::WriteZeros);
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.write_zeros(offset, end)
    }

    fn zero_file_range(&self, offset: u64, end: u64) -> io::Result<()> {
        if end > self.primary.metadata()?.len() {
            // Grow by writing the last byte: unlike ftruncate this can never
            // shrink the file under a concurrent write, and leaves a hole.
            self.buffered().write_all_at(&[0], end - 1)?;
        }
        let len = (end - offset) as i64;
        loop {
            let method = self.zero_method();
            let flags = match method {
                ZeroMethod::PunchHole => FallocateFlags::FALLOC_FL_PUNCH_HOLE,
                ZeroMethod::ZeroRange => FallocateFlags::FALLOC_FL_ZERO_RANGE,
                ZeroMethod::WriteZeros => return self.write_zeros(offset, end),
            };
            match fallocate(
                &self.primary,
                flags | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len,
            ) {
                Ok(()) => return Ok(()),
                Err(Errno::EOPNOTSUPP) => {
                    let next = match method {
                        ZeroMethod::PunchHole => ZeroMethod::ZeroRange,
                        _ => ZeroMethod::WriteZeros,
                    };
                    tracing::info!(
                        path = %self.path.display(),
                        refused = ?method,
                        next = ?next,
                        "the filesystem refused a zeroing fallocate (EOPNOTSUPP)"
                    );
                    self.set_zero_method(next);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Writes zeros over `[offset, end)` from the shared zero buffer.
    fn write_zeros(&self, mut offset: u64, end: u64) -> io::Result<()> {
        while offset < end {
            // Start as far into the buffer as `offset` is past a 4096 boundary,
            // so the O_DIRECT middle of the write is aligned in memory too.
            let skew = (offset % ALIGN) as usize;
            let len = ((end - offset) as usize).min(ZERO_CHUNK - skew);
            self.write_split(&ZEROS[skew..skew + len], offset)?;
            offset += len as u64;
        }
        Ok(())
    }

    fn zero_method(&self) -> ZeroMethod {
        ZeroMethod::from_u8(self.zero_method.load(Ordering::Relaxed))
    }

    fn set_zero_method(&self, method: ZeroMethod) {
        self.zero_method.fetch_max(method as u8, Ordering::Relaxed);
    }
}

/// The target kind of a file type, or why it cannot be a target.
fn kind_of(path: &Path, file_type: &fs::FileType) -> Result<TargetKind> {
    let what = if file_type.is_block_device() {
        return Ok(TargetKind::BlockDevice);
    } else if file_type.is_file() {
        return Ok(TargetKind::File);
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "an unsupported file type"
    };
    Err(Error::InvalidArgument(format!(
        "{}: is {what}, not a block device or regular file",
        path.display()
    )))
}

fn open_file(path: &Path, access: Access, exclusive: bool, direct: bool) -> io::Result<File> {
    let mut flags = 0;
    if exclusive {
        // On a block device O_EXCL (without O_CREAT) claims the device: the
        // kernel refuses mounts and other exclusive openers while we hold it.
        flags |= libc::O_EXCL;
    }
    if direct {
        flags |= libc::O_DIRECT;
    }
    OpenOptions::new()
        .read(true)
        .write(access != Access::ReadOnly)
        .create(access == Access::WriteCreate)
        .custom_flags(flags)
        .open(path)
}

fn open_error(path: &Path, err: io::Error) -> Error {
    if err.raw_os_error() == Some(libc::EBUSY) {
        return Error::DiskBusy {
            target: path.display().to_string(),
            users: vec![
                "opened exclusively by another user (a filesystem, RAID, LVM or another writer)"
                    .to_string(),
            ],
        };
    }
    Error::io(format!("opening {}", path.display()), err)
}

/// Opens the same inode again without O_DIRECT or O_EXCL. Going through
/// /proc/self/fd guarantees it is the same target even if the path changed.
fn reopen_buffered(primary: &File, access: Access) -> io::Result<File> {
    let fd_path = format!("/proc/self/fd/{}", primary.as_raw_fd());
    OpenOptions::new()
        .read(true)
        .write(access != Access::ReadOnly)
        .open(fd_path)
}

fn clear_o_direct(file: &File) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(file, FcntlArg::F_GETFL)?);
    fcntl(file, FcntlArg::F_SETFL(flags - OFlag::O_DIRECT))?;
    Ok(())
}

/// `(size in bytes, logical block size)` of a block device.
fn block_device_geometry(file: &File) -> io::Result<(u64, u64)> {
    let mut size = 0u64;
    let mut block_size: libc::c_int = 0;
    // SAFETY: the descriptor is open for the duration of the calls and each
    // pointer refers to a live variable of the type the kernel writes.
    unsafe {
        ioctl::blk_get_size64(file.as_raw_fd(), &mut size)?;
        ioctl::blk_ssz_get(file.as_raw_fd(), &mut block_size)?;
    }
    let block_size = u64::try_from(block_size)
        .ok()
        .filter(|b| b.is_power_of_two())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("BLKSSZGET returned {block_size}"),
            )
        })?;
    Ok((size, block_size))
}

fn punch_hole(file: &File, offset: u64, len: u64) -> nix::Result<()> {
    fallocate(
        file,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    )
}

/// Splits `len` bytes at `offset` into `(head, middle)` lengths: an unaligned
/// head up to the next 4096 boundary, then a middle of whole 4096 blocks; the
/// rest is the tail.
fn split_aligned(offset: u64, len: usize) -> (usize, usize) {
    let head = (((ALIGN - offset % ALIGN) % ALIGN) as usize).min(len);
    let rest = len - head;
    (head, rest - rest % ALIGNMENT)
}

/// Reads into `buf` at `offset` through an O_DIRECT descriptor until it is
/// full or the end is reached; returns how many bytes were read.
fn read_direct_up_to(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                // Only the end of the target stops a direct read off a block
                // boundary, and reading on from there would be misaligned.
                if done % ALIGNMENT != 0 {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn ensure_read(complete: bool, reached: u64, wanted: u64) -> io::Result<()> {
    if complete {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the target ends at byte {reached}, before byte {wanted}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reimage_e2e::loopdev::{LoopDevice, disk_image};
    use reimage_e2e::mount::Mounted;
    use reimage_e2e::{TestResult, random_bytes, run, skip};
    use std::os::unix::fs::MetadataExt;

    const MIB: u64 = 1 << 20;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn target_is_send_and_sync() {
        assert_send_sync::<Target>();
    }

    #[test]
    fn split_aligned_separates_head_middle_and_tail() {
        assert_eq!(split_aligned(0, 8192), (0, 8192));
        assert_eq!(split_aligned(1000, 3 * 4096 + 500), (3096, 8192));
        assert_eq!(split_aligned(4095, 1), (1, 0));
        assert_eq!(split_aligned(100, 10), (10, 0));
        assert_eq!(split_aligned(4096, 4095), (0, 0));
    }

    /// A file in a fresh temporary directory holding `content`.
    fn file_with(content: &[u8]) -> std::io::Result<(tempfile::TempDir, PathBuf)> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("target.img");
        fs::write(&path, content)?;
        Ok((dir, path))
    }

    #[test]
    fn an_existing_file_keeps_its_content_and_size() -> TestResult {
        let content = random_bytes(12345);
        let (_dir, path) = file_with(&content)?;
        let target = Target::open_for_write(&path)?;
        assert_eq!(target.kind(), TargetKind::File);
        assert_eq!(target.size(), 12345);
        assert_eq!(target.logical_block_size(), 512);
        assert_eq!(target.path(), path);
        assert_eq!(fs::read(&path)?, content, "opening must not truncate");
        Ok(())
    }

    #[test]
    fn direct_io_is_used_where_the_filesystem_allows_it() -> TestResult {
        let dir = tempfile::tempdir()?;
        let probe = dir.path().join("probe");
        let allowed = OpenOptions::new()
            .write(true)
            .create(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe)
            .is_ok();
        let target = Target::open_for_write(&dir.path().join("target.img"))?;
        assert_eq!(target.uses_direct_io(), allowed);
        Ok(())
    }

    #[test]
    fn targets_that_are_not_disks_are_invalid_arguments() -> TestResult {
        let dir = tempfile::tempdir()?;
        let cases = [
            (dir.path().to_path_buf(), "is a directory"),
            (PathBuf::from("/dev/null"), "is a character device"),
            (dir.path().join("missing/target.img"), "parent directory"),
        ];
        for (path, why) in cases {
            let err = Target::open_for_write(&path).expect_err("must be refused");
            assert_eq!(err.code(), "InvalidArgument", "{err}");
            let message = err.to_string();
            assert!(
                message.contains(&*path.to_string_lossy()) && message.contains(why),
                "{message}"
            );
        }
        let err = Target::open_read_only(&dir.path().join("missing.img")).expect_err("missing");
        assert_eq!(err.code(), "InvalidArgument", "{err}");
        Ok(())
    }

    #[test]
    fn write_at_handles_unaligned_heads_tails_and_memory() -> TestResult {
        let mut model = random_bytes(64 * 1024);
        let (_dir, path) = file_with(&model)?;
        let target = Target::open_for_write(&path)?;

        let mut write = |data: &[u8], offset: usize| -> crate::Result<()> {
            target.write_at(data, offset as u64)?;
            model[offset..offset + data.len()].copy_from_slice(data);
            Ok(())
        };
        write(&random_bytes(3 * 4096 + 500), 1000)?;
        let mut aligned = AlignedBuf::new(3 * 4096);
        fastrand::fill(&mut aligned);
        write(&aligned[..8192], 16384)?;
        // Aligned file offset, misaligned memory: goes through the bounce buffer.
        write(&aligned[1..1 + 8192], 32768)?;
        write(&random_bytes(10), 30001)?;
        write(&[], 5)?;

        assert_eq!(fs::read(&path)?, model);
        let mut back = vec![0u8; model.len()];
        target.read_at(&mut back, 0)?;
        assert_eq!(back, model);
        assert_eq!(target.size(), model.len() as u64);
        Ok(())
    }

    #[test]
    fn read_at_reads_any_range_and_fails_past_the_end() -> TestResult {
        let content = random_bytes(10_000);
        let (_dir, path) = file_with(&content)?;
        let target = Target::open_read_only(&path)?;
        for (offset, len) in [
            (0, 10_000),
            (9000, 1000),
            (1, 4096),
            (4096, 4096),
            (4097, 5000),
        ] {
            let mut buf = vec![0u8; len];
            target.read_at(&mut buf, offset as u64)?;
            assert_eq!(
                buf,
                content[offset..offset + len],
                "{len} bytes at {offset}"
            );
        }
        let mut aligned = AlignedBuf::new(8192);
        target.read_at(&mut aligned[..4096], 4096)?;
        assert_eq!(aligned[..4096], content[4096..8192]);

        for (offset, len) in [(9000u64, 1001usize), (8192, 4096), (20_000, 10)] {
            let mut buf = AlignedBuf::new(len);
            buf.set_len(len);
            let err = target.read_at(&mut buf, offset).expect_err("past the end");
            assert_eq!(err.code(), "DiskReadFailed", "{err}");
            assert!(
                err.to_string().contains(&format!("offset {offset}")),
                "{err}"
            );
        }
        Ok(())
    }

    #[test]
    fn zero_range_zeroes_exactly_the_range() -> TestResult {
        let mut model = random_bytes(MIB as usize);
        let (_dir, path) = file_with(&model)?;
        let target = Target::open_for_write(&path)?;
        for (offset, len) in [(5000usize, 300_000usize), (524_288, 131_072), (700_001, 3)] {
            target.zero_range(offset as u64, len as u64)?;
            model[offset..offset + len].fill(0);
        }
        target.zero_range(100, 0)?;
        assert_eq!(fs::read(&path)?, model);
        assert_eq!(target.size(), MIB);
        Ok(())
    }

    #[test]
    fn zero_range_keeps_a_file_sparse() -> TestResult {
        let (_dir, path) = file_with(&random_bytes(4 * MIB as usize))?;
        let target = Target::open_for_write(&path)?;
        target.sync()?;
        target.zero_range(MIB, 2 * MIB)?;
        target.sync()?;
        if target.zero_method() != ZeroMethod::PunchHole {
            skip(
                "zero_range_keeps_a_file_sparse",
                "this filesystem does not punch holes",
            );
            return Ok(());
        }
        let allocated = fs::metadata(&path)?.blocks() * 512;
        assert!(
            allocated <= 2 * MIB + 64 * 1024,
            "{allocated} bytes allocated"
        );
        Ok(())
    }

    #[test]
    fn a_file_target_grows_by_zero_range_and_write_at() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("new.img");
        let target = Target::open_for_write(&path)?;
        assert_eq!(target.size(), 0);

        target.zero_range(10_000, 5000)?;
        assert_eq!(target.size(), 15_000);
        assert_eq!(fs::read(&path)?, vec![0u8; 15_000]);

        target.write_at(b"abc", 20_000)?;
        target.zero_range(0, 100)?;
        assert_eq!(target.size(), 20_003);
        let content = fs::read(&path)?;
        assert_eq!(content.len(), 20_003);
        assert!(content[..20_000].iter().all(|b| *b == 0));
        assert_eq!(&content[20_000..], b"abc");
        Ok(())
    }

    #[test]
    fn sync_drop_caches_and_reread_work_on_files() -> TestResult {
        let (_dir, path) = file_with(&random_bytes(8192))?;
        let target = Target::open_for_write(&path)?;
        target.write_at(b"hello", 3)?;
        target.sync()?;
        target.drop_caches()?;
        target.reread_partition_table()?;
        let mut back = [0u8; 5];
        target.read_at(&mut back, 3)?;
        assert_eq!(&back, b"hello");
        Ok(())
    }

    #[test]
    fn a_read_only_target_refuses_writes_naming_the_offset() -> TestResult {
        let (_dir, path) = file_with(&random_bytes(8192))?;
        let target = Target::open_read_only(&path)?;
        let err = target.write_at(&[1; 10], 4096).expect_err("read-only");
        assert_eq!(err.code(), "DiskWriteFailed");
        assert!(err.to_string().contains("offset 4096"), "{err}");
        let err = target.zero_range(0, 4096).expect_err("read-only");
        assert_eq!(err.code(), "DiskWriteFailed");
        Ok(())
    }

    #[test]
    fn a_file_on_ramfs_uses_buffered_io_and_writes_zeros() -> TestResult {
        // ramfs refuses O_DIRECT and every zeroing fallocate: all fallbacks.
        let ramfs = match Mounted::new("none", Some("ramfs")) {
            Ok(mounted) => mounted,
            Err(reason) => {
                skip("a_file_on_ramfs_uses_buffered_io_and_writes_zeros", &reason);
                return Ok(());
            }
        };
        let path = ramfs.path().join("target.img");
        let target = Target::open_for_write(&path)?;
        assert!(!target.uses_direct_io());

        let mut model = random_bytes(3 * MIB as usize);
        target.write_at(&model, 0)?;
        target.zero_range(1000, 2 * MIB)?;
        model[1000..1000 + 2 * MIB as usize].fill(0);
        assert_eq!(target.zero_method(), ZeroMethod::WriteZeros);
        target.zero_range(3 * MIB, 5000)?;
        model.extend_from_slice(&[0; 5000]);

        let mut back = vec![0u8; model.len()];
        target.read_at(&mut back, 0)?;
        assert_eq!(back, model);
        assert_eq!(fs::read(&path)?, model);
        Ok(())
    }

    /// Attaches a loop device over a fresh `size`-byte image, or says why not.
    fn loop_or_skip(
        test: &str,
        dir: &Path,
        size: u64,
        partitions: bool,
        partscan: bool,
    ) -> Option<(PathBuf, LoopDevice)> {
        let attached = disk_image(dir, size, partitions)
            .and_then(|image| Ok((image.clone(), LoopDevice::attach(&image, partscan)?)));
        match attached {
            Ok(attached) => Some(attached),
            Err(reason) => {
                skip(test, &reason);
                None
            }
        }
    }

    fn sysfs_number(
        device: &LoopDevice,
        attribute: &str,
    ) -> Result<u64, Box<dyn std::error::Error>> {
        let text = fs::read_to_string(format!("/sys/block/{}/{attribute}", device.name()))?;
        Ok(text.trim().parse()?)
    }

    #[test]
    fn a_loop_device_is_written_and_read_through_o_direct() -> TestResult {
        let dir = tempfile::tempdir()?;
        let Some((image, disk)) = loop_or_skip(
            "a_loop_device_is_written_and_read_through_o_direct",
            dir.path(),
            64 * MIB,
            false,
            false,
        ) else {
            return Ok(());
        };
        let target = Target::open_for_write(&disk.path)?;
        assert_eq!(target.kind(), TargetKind::BlockDevice);
        assert_eq!(target.size(), 64 * MIB);
        assert_eq!(target.size(), sysfs_number(&disk, "size")? * 512);
        assert_eq!(
            target.logical_block_size(),
            sysfs_number(&disk, "queue/logical_block_size")?
        );
        assert!(target.uses_direct_io());

        let mut model = vec![0u8; 4 * MIB as usize];
        let mut aligned = AlignedBuf::new(MIB as usize);
        fastrand::fill(&mut aligned);
        target.write_at(&aligned, 4096)?;
        model[4096..4096 + MIB as usize].copy_from_slice(&aligned);
        let unaligned = random_bytes(10_000);
        target.write_at(&unaligned, 1_500_001)?;
        model[1_500_001..1_510_001].copy_from_slice(&unaligned);

        // Before any sync: the direct read must see the buffered head and tail.
        let mut back = vec![0u8; model.len()];
        target.read_at(&mut back, 0)?;
        assert_eq!(back, model);
        target.sync()?;
        let backing = fs::read(&image)?;
        assert_eq!(
            backing[..model.len()],
            model[..],
            "the backing file holds the writes"
        );

        let err = target
            .write_at(&aligned[..4096], 64 * MIB)
            .expect_err("past the end of the device");
        assert_eq!(err.code(), "DiskWriteFailed");
        target.drop_caches()?;
        Ok(())
    }

    #[test]
    fn a_loop_device_zeroes_ranges_itself() -> TestResult {
        let dir = tempfile::tempdir()?;
        let Some((_image, disk)) = loop_or_skip(
            "a_loop_device_zeroes_ranges_itself",
            dir.path(),
            16 * MIB,
            false,
            false,
        ) else {
            return Ok(());
        };
        let target = Target::open_for_write(&disk.path)?;
        let mut model = random_bytes(4 * MIB as usize);
        target.write_at(&model, 0)?;
        target.zero_range(1000, 2 * MIB)?;
        model[1000..1000 + 2 * MIB as usize].fill(0);
        // A loop device over a file on ext4 supports write-zeroes, so the
        // no-fallback zeroout must have been accepted.
        assert_eq!(target.zero_method(), ZeroMethod::PunchHole);

        let mut back = vec![0u8; model.len()];
        target.read_at(&mut back, 0)?;
        assert_eq!(back, model);

        let err = target
            .zero_range(15 * MIB, 2 * MIB)
            .expect_err("past the end of the device");
        assert_eq!(err.code(), "DiskWriteFailed");
        assert!(err.to_string().contains("past the end"), "{err}");
        Ok(())
    }

    #[test]
    fn a_loop_device_without_zeroout_gets_zeros_written() -> TestResult {
        let test = "a_loop_device_without_zeroout_gets_zeros_written";
        // A loop device over a ramfs file has no write-zeroes support, so the
        // kernel answers the no-fallback zeroout with EOPNOTSUPP.
        let ramfs = match Mounted::new("none", Some("ramfs")) {
            Ok(mounted) => mounted,
            Err(reason) => {
                skip(test, &reason);
                return Ok(());
            }
        };
        let Some((_image, disk)) = loop_or_skip(test, ramfs.path(), 8 * MIB, false, false) else {
            return Ok(());
        };
        let target = Target::open_for_write(&disk.path)?;
        let mut model = random_bytes(4 * MIB as usize);
        target.write_at(&model, 0)?;
        for (offset, len) in [(1000usize, 2 * MIB as usize), (3 * MIB as usize, 8192)] {
            target.zero_range(offset as u64, len as u64)?;
            model[offset..offset + len].fill(0);
            assert_eq!(target.zero_method(), ZeroMethod::WriteZeros);
        }
        let mut back = vec![0u8; model.len()];
        target.read_at(&mut back, 0)?;
        assert_eq!(back, model);
        Ok(())
    }

    #[test]
    fn o_excl_refuses_a_second_writer() -> TestResult {
        let dir = tempfile::tempdir()?;
        let Some((_image, disk)) = loop_or_skip(
            "o_excl_refuses_a_second_writer",
            dir.path(),
            8 * MIB,
            false,
            false,
        ) else {
            return Ok(());
        };
        let _writer = Target::open_for_write(&disk.path)?;
        let err = Target::open_for_write(&disk.path).expect_err("already claimed");
        assert_eq!(err.code(), "DiskBusy", "{err}");
        let reader = Target::open_read_only(&disk.path)?;
        assert_eq!(reader.size(), 8 * MIB);
        Ok(())
    }

    /// Whether this kernel can parse a GPT: some minimal kernels are built
    /// without any partition parser, see /proc/config.gz.
    fn kernel_parses_gpt() -> bool {
        use std::io::Read;
        let mut config = String::new();
        let readable = File::open("/proc/config.gz")
            .and_then(|f| flate2::read::GzDecoder::new(f).read_to_string(&mut config));
        readable.is_err() || !config.contains("# CONFIG_EFI_PARTITION is not set")
    }

    #[test]
    fn reread_partition_table_replaces_the_kernels_partitions() -> TestResult {
        let test = "reread_partition_table_replaces_the_kernels_partitions";
        let dir = tempfile::tempdir()?;
        let Some((_image, disk)) = loop_or_skip(test, dir.path(), 64 * MIB, false, true) else {
            return Ok(());
        };
        let table_dir = dir.path().join("table");
        fs::create_dir(&table_dir)?;
        let table = match disk_image(&table_dir, 64 * MIB, true) {
            Ok(table) => fs::read(table)?,
            Err(reason) => {
                skip(test, &reason);
                return Ok(());
            }
        };
        let target = Target::open_for_write(&disk.path)?;
        // Primary GPT (34 sectors) and backup GPT (33 sectors); unaligned lengths.
        let backup = table.len() - 33 * 512;
        target.write_at(&table[..34 * 512], 0)?;
        target.write_at(&table[backup..], backup as u64)?;
        target.sync()?;

        // A partition the new table does not have: the re-read must drop it.
        let stale = PathBuf::from(format!("/sys/class/block/{}p3", disk.name()));
        if let Err(reason) = run(
            "addpart",
            &[&disk.path.to_string_lossy(), "3", "40960", "2048"],
        ) {
            skip(test, &reason);
            return Ok(());
        }
        assert!(stale.exists(), "addpart did not create {}", stale.display());

        target.reread_partition_table()?;
        assert!(!stale.exists(), "{} survived BLKRRPART", stale.display());
        let first = PathBuf::from(format!("/sys/class/block/{}p1", disk.name()));
        if kernel_parses_gpt() {
            assert!(
                first.exists(),
                "{} missing after BLKRRPART",
                first.display()
            );
        } else {
            eprintln!(
                "note: {test}: this kernel has no GPT parser, checked only that BLKRRPART ran"
            );
        }
        Ok(())
    }

    #[test]
    fn reread_without_partscan_is_not_an_error() -> TestResult {
        let dir = tempfile::tempdir()?;
        let Some((_image, disk)) = loop_or_skip(
            "reread_without_partscan_is_not_an_error",
            dir.path(),
            64 * MIB,
            true,
            false,
        ) else {
            return Ok(());
        };
        let target = Target::open_for_write(&disk.path)?;
        target.reread_partition_table()?;
        assert!(!disk.partition(1).exists(), "no partscan, no partitions");
        Ok(())
    }

    #[test]
    fn reread_reports_busy_while_a_partition_stays_open() -> TestResult {
        let dir = tempfile::tempdir()?;
        let Some((_image, disk)) = loop_or_skip(
            "reread_reports_busy_while_a_partition_stays_open",
            dir.path(),
            64 * MIB,
            true,
            true,
        ) else {
            return Ok(());
        };
        if let Err(reason) = disk.sync_partitions() {
            skip("reread_reports_busy_while_a_partition_stays_open", &reason);
            return Ok(());
        }
        let target = Target::open_for_write(&disk.path)?;
        let _open_partition = File::open(disk.partition(1))?;
        let err = target
            .reread_partition_table()
            .expect_err("a partition is open");
        assert_eq!(err.code(), "DiskBusy", "{err}");
        Ok(())
    }
}
