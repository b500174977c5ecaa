//! `reimage-agent write` against a block device that really fails: a loop
//! device over a FUSE file ([`FaultyDisk`]) answering chosen reads, writes
//! or fsyncs with EIO, or stalling them. After each run: the stable error
//! code naming what failed, the saved partition's bytes, and no partition
//! table copy (primary or backup) describing the unverified image.

use reimage_e2e::bin::{binary, stderr};
use reimage_e2e::faulty_disk::{Faults, FaultyDisk};
use reimage_e2e::images::{
    Copy, MIB, os_image, read_range, sha256, table_copy_labels, target_disk, zstd,
};
use reimage_e2e::skip;
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const DISK_MIB: u64 = 64;
const STORAGE_MIB: u64 = 16;
/// Where `target_disk` puts local-storage: its last 16 MiB before the final one.
const STORAGE: Range<u64> = (DISK_MIB - 1 - STORAGE_MIB) * MIB..(DISK_MIB - 1) * MIB;
const IMAGE_MIB: u64 = 24;
/// The image's bytes past the held first MiB: reads there are the read-back.
const READ_BACK: Range<u64> = MIB..IMAGE_MIB * MIB;
/// The backup GPT: 32 sectors of entries and the header, ending the disk.
const BACKUP_TABLE: Range<u64> = DISK_MIB * MIB - 33 * 512..DISK_MIB * MIB;
/// No run may take longer: a stalled or failing disk must not hang the agent.
const DEADLINE: Duration = Duration::from_secs(120);

/// A faulty disk holding an old system and local-storage, and an image.
struct Lab {
    /// Detached and unmounted before `dir` goes away (fields drop in order).
    disk: FaultyDisk,
    _dir: tempfile::TempDir,
    before: Vec<u8>,
    storage_sha: String,
    image: PathBuf,
    raw: Vec<u8>,
}

impl Lab {
    /// `None` (after printing why) where FUSE, loop devices or root are missing.
    fn new(test: &str) -> Option<Lab> {
        let dir = tempfile::tempdir().expect("tempdir");
        let backing = dir.path().join("disk.img");
        let storage_sha = target_disk(&backing, DISK_MIB, STORAGE_MIB, 41);
        let before = fs::read(&backing).expect("target");
        let disk = match FaultyDisk::over(&backing) {
            Ok(disk) => disk,
            Err(why) => {
                skip(test, &why);
                return None;
            }
        };
        // 1 MiB of random data, then 2 MiB of zeros, repeated: data at
        // 1, 4, 7, 10, … MiB.
        let raw = os_image(IMAGE_MIB, 2, 42);
        let image = dir.path().join("os.img.zst");
        fs::write(&image, zstd(&raw)).expect("image");
        Some(Lab {
            disk,
            _dir: dir,
            before,
            storage_sha,
            image,
            raw,
        })
    }

    /// Runs `write` onto the faulty device; kills it after [`DEADLINE`].
    fn write(&self) -> (Output, Duration) {
        let started = Instant::now();
        let mut child = Command::new(binary("reimage-agent"))
            .args(["write", "--image"])
            .arg(&self.image)
            .args(["--sha256", &sha256(&self.raw), "--target"])
            .arg(self.disk.device())
            .args(["--save-partlabel", "local-storage"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("write starts");
        while child.try_wait().expect("child").is_none() {
            if started.elapsed() > DEADLINE {
                let _ = child.kill();
                panic!("the write hung for more than {DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let output = child.wait_with_output().expect("reaped");
        eprintln!("--- stderr of write\n{}", stderr(&output));
        (output, started.elapsed())
    }

    fn backing(&self) -> &Path {
        self.disk.backing()
    }

    /// The write failed with exit 1 and `code`.
    fn assert_failed_with(&self, output: &Output, code: &str) -> String {
        let text = stderr(output);
        assert_eq!(output.status.code(), Some(1), "exit 1: {text}");
        let error = text
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("one error line: {text}"))
            .to_string();
        assert!(error.contains(code), "names {code}: {error}");
        error
    }

    /// local-storage is byte for byte what it was.
    fn assert_storage_intact(&self) {
        let bytes = read_range(self.backing(), STORAGE.start, STORAGE.end);
        assert_eq!(
            sha256(&bytes),
            self.storage_sha,
            "local-storage bytes changed"
        );
    }

    /// Each copy of `copies` is the saved-only table.
    fn assert_saved_only_table(&self, copies: &[Copy]) {
        for &copy in copies {
            assert_eq!(
                table_copy_labels(self.backing(), copy),
                Some(vec!["local-storage".into()]),
                "the {copy:?} table"
            );
        }
    }

    /// Each GPT copy is the old table (only while the image extent is
    /// untouched), the saved-only one, or no table; never the image's; and
    /// at least one valid copy still lists local-storage.
    fn assert_no_table_of_the_image(&self) {
        let mut valid = 0;
        for copy in [Copy::Primary, Copy::Backup] {
            let Some(labels) = table_copy_labels(self.backing(), copy) else {
                eprintln!("{copy:?} table: none (spoiled or never written)");
                continue;
            };
            eprintln!("{copy:?} table: {labels:?}");
            valid += 1;
            match labels.iter().map(String::as_str).collect::<Vec<_>>()[..] {
                ["local-storage"] => {}
                ["old-root", "local-storage"] => {
                    let extent = (READ_BACK.start as usize)..(READ_BACK.end as usize);
                    let now = read_range(self.backing(), READ_BACK.start, READ_BACK.end);
                    assert!(
                        now == self.before[extent],
                        "the {copy:?} table still lists old-root, but its bytes changed"
                    );
                }
                _ => panic!("the {copy:?} table describes the image: {labels:?}"),
            }
        }
        assert!(
            valid > 0,
            "no valid table copy is left to list local-storage"
        );
        self.assert_storage_intact();
    }
}

/// The `(offset, len)` an error names as "<len> bytes at offset <offset>".
fn named_range(error: &str) -> Option<Range<u64>> {
    let at = error.find(" bytes at offset ")?;
    let len: u64 = error[..at]
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let rest = &error[at + " bytes at offset ".len()..];
    let offset: u64 = rest
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some(offset..offset + len)
}

/// The error names a range of the disk that holds `byte`.
fn assert_names(error: &str, byte: u64) {
    let range = named_range(error).unwrap_or_else(|| panic!("names an offset: {error}"));
    assert!(
        range.contains(&byte),
        "{range:?} holds byte {byte}: {error}"
    );
}

#[test]
fn an_eio_writing_inside_the_image_fails_with_disk_write_failed_and_the_saved_only_table() {
    let Some(lab) = Lab::new("an_eio_writing_inside_the_image") else {
        return;
    };
    let bad = 7 * MIB + 64 * 1024;
    lab.disk.set(Faults {
        fail_writes: Some(bad..bad + 4096),
        ..Faults::default()
    });
    let (output, _) = lab.write();
    let error = lab.assert_failed_with(&output, "DiskWriteFailed");
    assert_names(&error, bad);
    assert!(lab.disk.failures().1 > 0, "the fault fired");
    lab.assert_saved_only_table(&[Copy::Primary, Copy::Backup]);
    lab.assert_no_table_of_the_image();
}

#[test]
fn an_eio_reading_back_fails_with_disk_read_failed_and_the_saved_only_table() {
    let Some(lab) = Lab::new("an_eio_reading_back") else {
        return;
    };
    let bad = 10 * MIB + 8192;
    lab.disk.set(Faults {
        fail_reads: Some(bad..bad + 4096),
        ..Faults::default()
    });
    let (output, _) = lab.write();
    let error = lab.assert_failed_with(&output, "DiskReadFailed");
    assert_names(&error, bad);
    assert!(lab.disk.failures().0 > 0, "the fault fired");
    lab.assert_saved_only_table(&[Copy::Primary, Copy::Backup]);
    lab.assert_no_table_of_the_image();
}

#[test]
fn a_failed_fsync_fails_with_disk_write_failed_naming_the_fsync() {
    let Some(lab) = Lab::new("a_failed_fsync") else {
        return;
    };
    lab.disk.set(Faults {
        fail_fsync: true,
        ..Faults::default()
    });
    let (output, _) = lab.write();
    let error = lab.assert_failed_with(&output, "DiskWriteFailed");
    assert!(error.contains("fsync"), "names the fsync: {error}");
    assert!(
        !error.contains("writing syncing"),
        "reads as English: {error}"
    );
    assert!(lab.disk.failures().2 > 0, "the fault fired");
    lab.assert_no_table_of_the_image();
}

#[test]
fn a_failed_fsync_while_committing_the_table_leaves_no_table_of_the_image() {
    let Some(lab) = Lab::new("a_failed_fsync_while_committing") else {
        return;
    };
    // Armed by the read-back: the syncs of the commit fail, and those of
    // the reset after it.
    lab.disk.set(Faults {
        fail_fsync: true,
        armed_by_read_of: Some(READ_BACK),
        ..Faults::default()
    });
    let (output, _) = lab.write();
    let error = lab.assert_failed_with(&output, "DiskWriteFailed");
    assert!(error.contains("fsync"), "names the fsync: {error}");
    assert!(lab.disk.failures().2 > 0, "the fault fired");
    lab.assert_no_table_of_the_image();
}

#[test]
fn an_eio_on_the_first_sectors_while_the_table_is_reset_leaves_the_old_disk_or_saved_only() {
    let Some(lab) = Lab::new("an_eio_on_the_first_sectors_while_the_table_is_reset") else {
        return;
    };
    // The saved-only table is the first thing written: it fails at once.
    lab.disk.set(Faults {
        fail_writes: Some(0..4096),
        ..Faults::default()
    });
    let (output, _) = lab.write();
    let error = lab.assert_failed_with(&output, "DiskWriteFailed");
    assert_names(&error, 0);
    assert!(lab.disk.failures().1 > 0, "the fault fired");
    assert_eq!(
        table_copy_labels(lab.backing(), Copy::Backup),
        Some(vec!["local-storage".into()]),
        "the backup is reset on its own"
    );
    assert!(stderr(&output).contains("primary partition table could neither be reset"));
    lab.assert_no_table_of_the_image();
}

#[test]
fn an_eio_on_the_first_sectors_during_the_commit_leaves_no_backup_table_of_the_image() {
    let Some(lab) = Lab::new("an_eio_on_the_first_sectors_during_the_commit") else {
        return;
    };
    // After the read-back began: the commit writes the merged backup table
    // first, then fails on the first MiB; the reset fails there too.
    lab.disk.set(Faults {
        fail_writes: Some(0..4096),
        armed_by_read_of: Some(READ_BACK),
        ..Faults::default()
    });
    let (output, _) = lab.write();
    let error = lab.assert_failed_with(&output, "DiskWriteFailed");
    assert_names(&error, 0);
    assert!(lab.disk.failures().1 > 0, "the fault fired");
    assert_eq!(
        table_copy_labels(lab.backing(), Copy::Backup),
        Some(vec!["local-storage".into()]),
        "the merged backup is reset, although the primary cannot be written"
    );
    assert_eq!(
        table_copy_labels(lab.backing(), Copy::Primary),
        Some(vec!["local-storage".into()]),
        "the primary still holds the saved-only table of the streaming phase"
    );
    lab.assert_no_table_of_the_image();
}

#[test]
fn a_write_error_on_the_backup_table_at_the_disks_end_leaves_no_table_of_the_image() {
    let Some(lab) = Lab::new("a_write_error_on_the_backup_table") else {
        return;
    };
    lab.disk.set(Faults {
        fail_writes: Some(BACKUP_TABLE),
        armed_by_read_of: Some(READ_BACK),
        ..Faults::default()
    });
    let (output, _) = lab.write();
    let error = lab.assert_failed_with(&output, "DiskWriteFailed");
    let named = named_range(&error).unwrap_or_else(|| panic!("names an offset: {error}"));
    assert!(
        named.start < BACKUP_TABLE.end && BACKUP_TABLE.start < named.end,
        "names the backup table: {error}"
    );
    assert!(lab.disk.failures().1 > 0, "the fault fired");
    assert!(
        stderr(&output).contains("backup partition table could"),
        "the unwritable backup is reported"
    );
    assert_eq!(
        table_copy_labels(lab.backing(), Copy::Primary),
        Some(vec!["local-storage".into()])
    );
    lab.assert_no_table_of_the_image();
}

#[test]
fn a_disk_that_stalls_for_seconds_slows_the_write_but_it_completes_verified() {
    let Some(lab) = Lab::new("a_disk_that_stalls_for_seconds") else {
        return;
    };
    let stall = Duration::from_secs(3);
    let slow = 13 * MIB..13 * MIB + 4096;
    lab.disk.set(Faults {
        stall: Some((slow, stall)),
        ..Faults::default()
    });
    let (output, took) = lab.write();
    assert!(
        output.status.success(),
        "the write succeeds: {}",
        stderr(&output)
    );
    assert!(
        lab.disk.stalls() >= 2,
        "the write and the read-back stalled"
    );
    assert!(took >= 2 * stall, "took {took:?}");
    assert_eq!(
        table_copy_labels(lab.backing(), Copy::Primary),
        Some(vec!["efi".into(), "root".into(), "local-storage".into()])
    );
    assert_eq!(
        table_copy_labels(lab.backing(), Copy::Backup),
        Some(vec!["efi".into(), "root".into(), "local-storage".into()])
    );
    let on_disk = read_range(lab.backing(), READ_BACK.start, READ_BACK.end);
    assert!(
        on_disk == lab.raw[MIB as usize..],
        "the image is on the disk"
    );
    lab.assert_storage_intact();
}
