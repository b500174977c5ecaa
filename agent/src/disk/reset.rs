//! The reset after a failure: the disk is left with a partition table that
//! holds only the saved partitions.
//!
//! Each GPT copy is reset on its own. Firmware and `gdisk` fall back to the
//! backup copy when the primary is unreadable, so a bad sector under one copy
//! must not stop the other from being reset: after a failed commit the backup
//! already describes the image ("backup first"), and a primary that cannot be
//! written would otherwise leave it the only valid table. A copy that cannot
//! be reset is spoiled instead (its header zeroed), so it reads as no table.

use crate::Error;
use crate::disk::aligned::ALIGNMENT;
use crate::disk::device::Target;
use crate::disk::gpt::{TableCopy, TableSectors};

/// What the reset did to one copy of the table.
#[derive(Debug)]
pub enum CopyOutcome {
    /// The saved-only copy is written.
    Reset,
    /// It could not be written; its header block is zeroed instead.
    Spoiled { write: Error },
    /// Neither written nor spoiled: it holds whatever it held before.
    Unwritable { write: Error, spoil: Error },
}

/// What the reset did, copy by copy.
#[derive(Debug)]
pub struct ResetReport {
    pub primary: CopyOutcome,
    pub backup: CopyOutcome,
    /// The fsync after both copies. A failed one cannot be pinned on either
    /// copy (it may be an earlier write's error coming due), so it spoils
    /// nothing: spoiling would be no more durable than the reset it undoes.
    pub synced: crate::Result<()>,
}

impl ResetReport {
    /// Both copies hold the saved-only table, durably.
    pub fn is_complete(&self) -> bool {
        matches!(
            (&self.primary, &self.backup, &self.synced),
            (CopyOutcome::Reset, CopyOutcome::Reset, Ok(()))
        )
    }

    /// Each copy with its outcome.
    pub fn copies(&self) -> [(TableCopy, &CopyOutcome); 2] {
        [
            (TableCopy::Primary, &self.primary),
            (TableCopy::Backup, &self.backup),
        ]
    }
}

/// Writes the saved-only `table` onto `target`, primary and backup copy
/// each on its own, spoiling a copy that cannot be written, then syncs.
/// Never fails: the report says what each copy holds.
pub fn reset_to_saved_only(target: &Target, table: &TableSectors) -> ResetReport {
    let primary = reset_copy(target, table, TableCopy::Primary);
    let backup = reset_copy(target, table, TableCopy::Backup);
    ResetReport {
        primary,
        backup,
        synced: target.sync(),
    }
}

fn reset_copy(target: &Target, table: &TableSectors, copy: TableCopy) -> CopyOutcome {
    let written = table
        .copy_runs(copy)
        .iter()
        .try_for_each(|(offset, bytes)| target.write_at(bytes, *offset));
    let Err(write) = written else {
        return CopyOutcome::Reset;
    };
    match spoil_copy(target, table, copy) {
        Ok(()) => CopyOutcome::Spoiled { write },
        Err(spoil) => CopyOutcome::Unwritable { write, spoil },
    }
}

/// Zeroes the aligned block holding the copy's header. The block holds only
/// table sectors: MBR, header and first entries at the start; the last
/// entries and the header at the end, past the last usable LBA.
fn spoil_copy(target: &Target, table: &TableSectors, copy: TableCopy) -> crate::Result<()> {
    let Some(lba) = table.header_lba(copy) else {
        return Ok(());
    };
    let block = table.sector_size().max(ALIGNMENT as u64);
    let start = lba * table.sector_size() / block * block;
    target.write_at(&vec![0u8; block as usize], start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::gpt::{self, SparseDisk};
    use std::fs;

    const MIB: u64 = 1 << 20;

    fn saved_only_table(size: u64) -> TableSectors {
        let mut disk = SparseDisk::new(size, 512);
        let mut table = gptman::GPT::new_from(&mut disk, 512, [3; 16]).expect("table");
        gpt::render(&mut table, size, None).expect("renders")
    }

    #[test]
    fn both_copies_are_written_and_read_back_as_a_table() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("disk.img");
        fs::write(&path, vec![0x5a; (8 * MIB) as usize])?;
        let target = Target::open_for_write(&path)?;
        let report = reset_to_saved_only(&target, &saved_only_table(8 * MIB));
        assert!(report.is_complete(), "{report:?}");
        let mut disk = fs::File::open(&path)?;
        let back = gptman::GPT::read_from(&mut disk, 512)?;
        assert_eq!(back.header.disk_guid, [3; 16]);
        Ok(())
    }

    #[test]
    fn copies_that_cannot_be_written_or_spoiled_are_reported()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("disk.img");
        let before = vec![0x5a; (8 * MIB) as usize];
        fs::write(&path, &before)?;
        // One bad copy beside a good one needs a faulty disk: the end-to-end
        // tests in `tests/disk_faults.rs` cover that on a real block device.
        let target = Target::open_read_only(&path)?;
        let report = reset_to_saved_only(&target, &saved_only_table(8 * MIB));
        assert!(!report.is_complete());
        assert!(report.synced.is_ok(), "nothing to sync");
        for (copy, outcome) in report.copies() {
            match outcome {
                CopyOutcome::Unwritable { write, spoil } => {
                    assert_eq!(write.code(), "DiskWriteFailed", "{copy}: {write}");
                    assert_eq!(spoil.code(), "DiskWriteFailed", "{copy}: {spoil}");
                }
                other => panic!("{copy}: {other:?}"),
            }
        }
        assert!(fs::read(&path)? == before, "nothing changed");
        Ok(())
    }
}
