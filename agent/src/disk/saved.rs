//! The partitions a reimage keeps: found on the target before anything is
//! written, protected during the write, and carried into the new table.

use crate::disk::device::Target;
use crate::disk::gpt::{self, TableSectors};
use crate::{Error, Result};
use gptman::{GPT, GPTPartitionEntry};
use std::io::{Cursor, Read, Seek};
use std::ops::Range;
use std::path::Path;

/// Which partitions to keep: by PARTLABEL glob and by index.
#[derive(Debug, Clone, Default)]
pub struct SaveSpec {
    /// Globs matched against partition labels (`local-storage`, `data-*`).
    pub labels: Vec<String>,
    /// 1-based GPT partition indexes.
    pub indexes: Vec<u32>,
}

impl SaveSpec {
    /// True when nothing is to be saved.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.indexes.is_empty()
    }

    fn describe(&self) -> String {
        let labels = self.labels.iter().map(|l| format!("label '{l}'"));
        let indexes = self.indexes.iter().map(|i| format!("index {i}"));
        labels.chain(indexes).collect::<Vec<_>>().join(", ")
    }
}

/// One kept partition: its entry exactly as found on the target.
#[derive(Debug, Clone)]
pub struct SavedPartition {
    /// Its index in the target's table before the reimage.
    pub index: u32,
    pub entry: GPTPartitionEntry,
}

impl SavedPartition {
    /// The partition's label.
    pub fn label(&self) -> &str {
        self.entry.partition_name.as_str()
    }

    fn describe(&self, sector_size: u64) -> String {
        let range = self.byte_range(sector_size);
        format!(
            "saved partition {} '{}' (bytes {}..{})",
            self.index,
            self.label(),
            range.start,
            range.end
        )
    }

    /// Bytes `[start, end)` the partition occupies.
    pub fn byte_range(&self, sector_size: u64) -> Range<u64> {
        self.entry.starting_lba * sector_size..(self.entry.ending_lba + 1) * sector_size
    }
}

/// The partitions to keep across a reimage, with the table they came from.
#[derive(Debug, Clone)]
pub struct SavedPartitions {
    sector_size: u64,
    disk_guid: [u8; 16],
    partitions: Vec<SavedPartition>,
}

impl SavedPartitions {
    /// Opens the target at `path` read-only and finds what `spec` names on
    /// it; also returns the target's size. Nothing is written.
    pub fn read_from_target(path: &Path, spec: &SaveSpec) -> Result<(u64, Self)> {
        let device = Target::open_read_only(path)?;
        let mut file = std::fs::File::open(path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let saved = SavedPartitions::find(&mut file, device.logical_block_size(), spec)?;
        Ok((device.size(), saved))
    }

    /// Reads the target's partition table and picks what `spec` names. Every
    /// label glob and index must match: asking to keep a partition that is
    /// not there is an error, not a silent loss.
    pub fn find<D: Read + Seek>(disk: &mut D, sector_size: u64, spec: &SaveSpec) -> Result<Self> {
        let table = match GPT::read_from(disk, sector_size) {
            Ok(table) => table,
            Err(e) if spec.is_empty() => {
                tracing::debug!("target has no readable GPT ({e}); nothing to save");
                return Ok(SavedPartitions {
                    sector_size,
                    disk_guid: gpt::random_guid()?,
                    partitions: Vec::new(),
                });
            }
            Err(gptman::Error::InvalidSignature) => {
                return Err(Error::SavedPartitionNotFound(format!(
                    "the target has no GPT, so nothing matches {}",
                    spec.describe()
                )));
            }
            Err(e) => {
                return Err(Error::PartitionTableInvalid(format!(
                    "the target's GPT cannot be read ({e}), so {} cannot be kept",
                    spec.describe()
                )));
            }
        };
        let patterns = spec
            .labels
            .iter()
            .map(|l| {
                glob::Pattern::new(l)
                    .map_err(|e| Error::InvalidArgument(format!("partition label glob '{l}': {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut partitions = Vec::new();
        for (index, entry) in table.iter().filter(|(_, e)| e.is_used()) {
            let label = entry.partition_name.as_str();
            if spec.indexes.contains(&index) || patterns.iter().any(|p| p.matches(label)) {
                partitions.push(SavedPartition {
                    index,
                    entry: entry.clone(),
                });
            }
        }
        for (glob, pattern) in spec.labels.iter().zip(&patterns) {
            if !partitions.iter().any(|p| pattern.matches(p.label())) {
                return Err(Error::SavedPartitionNotFound(format!(
                    "no partition on the target has a label matching '{glob}'"
                )));
            }
        }
        for index in &spec.indexes {
            if !partitions.iter().any(|p| p.index == *index) {
                return Err(Error::SavedPartitionNotFound(format!(
                    "the target has no partition {index}"
                )));
            }
        }
        Ok(SavedPartitions {
            sector_size,
            disk_guid: table.header.disk_guid,
            partitions,
        })
    }

    /// The kept partitions.
    pub fn iter(&self) -> impl Iterator<Item = &SavedPartition> {
        self.partitions.iter()
    }

    /// True when nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.partitions.is_empty()
    }

    /// Sector size of the target the partitions were read from.
    pub fn sector_size(&self) -> u64 {
        self.sector_size
    }

    /// Byte ranges no write may touch.
    pub fn protected_ranges(&self) -> Vec<Range<u64>> {
        self.partitions
            .iter()
            .map(|p| p.byte_range(self.sector_size))
            .collect()
    }

    /// Refuses an image whose bytes `[0, image_len)` would cover a saved
    /// partition: checked before the first byte is written.
    pub fn check_image_extent(&self, image_len: u64) -> Result<()> {
        match self
            .partitions
            .iter()
            .find(|p| p.byte_range(self.sector_size).start < image_len)
        {
            Some(p) => Err(Error::SavedPartitionCollision(format!(
                "the image is {image_len} bytes and would overwrite {}",
                p.describe(self.sector_size)
            ))),
            None => Ok(()),
        }
    }

    /// The table to leave on the disk while the image is written and after
    /// any failure: only the saved partitions, so no half-written image can
    /// ever be found or booted.
    pub fn saved_only_table(&self, disk_size: u64) -> Result<TableSectors> {
        let mut disk = gpt::SparseDisk::new(disk_size, self.sector_size);
        let mut table = GPT::new_from(&mut disk, self.sector_size, self.disk_guid)
            .map_err(|e| Error::PartitionTableInvalid(format!("creating a new table: {e}")))?;
        self.place_into(&mut table)?;
        gpt::render(&mut table, disk_size, None)
    }

    /// The table to write once the image verified: the image's own
    /// partitions plus the saved ones, unchanged (start, end, type, GUID,
    /// label, attributes), with the backup header at the end of the target.
    /// `image_head` holds the image's first bytes (its MBR and primary GPT).
    /// Returns `None` for an image without a GPT when nothing is saved: its
    /// first bytes are then written as they are.
    pub fn merge_with_image(
        &self,
        image_head: &[u8],
        disk_size: u64,
    ) -> Result<Option<TableSectors>> {
        let image_table = match read_image_table(image_head, self.sector_size) {
            Ok(table) => table,
            Err(_) if self.is_empty() => return Ok(None),
            Err(e) => {
                return Err(Error::PartitionTableInvalid(format!(
                    "the image has no usable GPT for {}-byte sectors ({e}), so the saved partitions cannot be carried into it",
                    self.sector_size
                )));
            }
        };
        self.check_collisions(&image_table)?;
        let mut merged = image_table;
        gpt::fit_to_disk(&mut merged, disk_size)?;
        self.place_into(&mut merged)?;
        gpt::render(&mut merged, disk_size, Some(image_head)).map(Some)
    }

    fn check_collisions(&self, image_table: &GPT) -> Result<()> {
        for (index, entry) in image_table.iter().filter(|(_, e)| e.is_used()) {
            for saved in &self.partitions {
                let overlaps = entry.starting_lba <= saved.entry.ending_lba
                    && saved.entry.starting_lba <= entry.ending_lba;
                let same_guid = entry.unique_partition_guid == saved.entry.unique_partition_guid;
                if overlaps || same_guid {
                    return Err(Error::SavedPartitionCollision(format!(
                        "image partition {index} '{}' (sectors {}..={}) {} {}",
                        entry.partition_name.as_str(),
                        entry.starting_lba,
                        entry.ending_lba,
                        if overlaps {
                            "overlaps"
                        } else {
                            "has the GUID of"
                        },
                        saved.describe(self.sector_size)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Puts each saved entry at its old index when free, else in the first
    /// free slot: the entry matters, not its number.
    fn place_into(&self, table: &mut GPT) -> Result<()> {
        let slots = table.header.number_of_partition_entries;
        for saved in &self.partitions {
            let free = |t: &GPT, i: u32| i >= 1 && i <= slots && t[i].is_unused();
            let slot = if free(table, saved.index) {
                Some(saved.index)
            } else {
                (1..=slots).find(|&i| free(table, i))
            };
            let slot = slot.ok_or_else(|| {
                Error::PartitionTableInvalid(format!(
                    "no free entry left in the image's table for {}",
                    saved.describe(self.sector_size)
                ))
            })?;
            table[slot] = saved.entry.clone();
        }
        Ok(())
    }
}

/// Reads the GPT held in an image's first bytes. The primary copy must be
/// there: the image's backup copy lies at its end, which is not held.
fn read_image_table(head: &[u8], sector_size: u64) -> std::result::Result<GPT, gptman::Error> {
    GPT::read_from(&mut Cursor::new(head), sector_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const DISK: u64 = 64 * MIB;

    fn entry(start: u64, end: u64, label: &str, guid: u8) -> GPTPartitionEntry {
        GPTPartitionEntry {
            partition_type_guid: [0xaf; 16],
            unique_partition_guid: [guid; 16],
            starting_lba: start,
            ending_lba: end,
            attribute_bits: 1 << 60,
            partition_name: label.into(),
        }
    }

    /// A disk (or image) of `size` bytes holding a GPT with `parts`.
    fn disk_with(size: u64, parts: &[(u32, GPTPartitionEntry)]) -> Vec<u8> {
        let mut sparse = gpt::SparseDisk::new(size, 512);
        let mut table = GPT::new_from(&mut sparse, 512, [9; 16]).expect("table");
        for (index, e) in parts {
            table[*index] = e.clone();
        }
        let mut bytes = vec![0u8; size as usize];
        gpt::render(&mut table, size, None)
            .expect("render")
            .apply_to(&mut bytes);
        bytes
    }

    /// A target with an old root at 1 MiB and local-storage in its last 16 MiB.
    fn target() -> Vec<u8> {
        let last = DISK / 512 - 34;
        disk_with(
            DISK,
            &[
                (1, entry(2048, 40_000, "old-root", 1)),
                (2, entry(last - 32_767, last, "local-storage", 2)),
            ],
        )
    }

    fn spec(labels: &[&str], indexes: &[u32]) -> SaveSpec {
        SaveSpec {
            labels: labels.iter().map(|s| s.to_string()).collect(),
            indexes: indexes.to_vec(),
        }
    }

    fn find(disk: &[u8], spec: &SaveSpec) -> Result<SavedPartitions> {
        SavedPartitions::find(&mut Cursor::new(disk), 512, spec)
    }

    #[test]
    fn partitions_are_found_by_label_glob_and_by_index() {
        let disk = target();
        let saved = find(&disk, &spec(&["local-*"], &[])).expect("found");
        assert_eq!(saved.iter().map(|p| p.index).collect::<Vec<_>>(), vec![2]);
        let saved = find(&disk, &spec(&[], &[1])).expect("found");
        assert_eq!(saved.iter().next().map(|p| p.label()), Some("old-root"));
        let ranges = find(&disk, &spec(&["local-storage"], &[1]))
            .expect("both")
            .protected_ranges();
        assert_eq!(ranges[0], 2048 * 512..40_001 * 512);
    }

    #[test]
    fn asking_for_a_missing_partition_is_an_error() {
        let disk = target();
        let err = find(&disk, &spec(&["scratch"], &[])).expect_err("no such label");
        assert_eq!(err.code(), "SavedPartitionNotFound");
        assert!(err.to_string().contains("scratch"), "{err}");
        let err = find(&disk, &spec(&[], &[7])).expect_err("no such index");
        assert_eq!(err.code(), "SavedPartitionNotFound");
        let blank = vec![0u8; MIB as usize];
        let err = find(&blank, &spec(&["local-storage"], &[])).expect_err("no GPT");
        assert!(err.to_string().contains("no GPT"), "{err}");
        assert!(
            find(&blank, &SaveSpec::default())
                .expect("nothing asked")
                .is_empty()
        );
    }

    #[test]
    fn a_bad_glob_is_an_invalid_argument() {
        let err = find(&target(), &spec(&["[local"], &[])).expect_err("bad glob");
        assert_eq!(err.code(), "InvalidArgument");
    }

    #[test]
    fn the_merged_table_keeps_the_saved_entry_exactly() {
        let mut disk = target();
        let saved = find(&disk, &spec(&["local-storage"], &[])).expect("found");
        let image = disk_with(
            16 * MIB,
            &[
                (1, entry(2048, 4095, "efi", 11)),
                (2, entry(4096, 30_000, "root", 12)),
            ],
        );
        let sectors = saved
            .merge_with_image(&image[..MIB as usize], DISK)
            .expect("merges")
            .expect("image has a GPT");
        sectors.apply_to(&mut disk);
        let merged = GPT::read_from(&mut Cursor::new(&disk), 512).expect("valid table");
        assert_eq!(
            merged.header.backup_lba,
            DISK / 512 - 1,
            "backup at the disk's end"
        );
        assert_eq!(merged[1].partition_name.as_str(), "efi");
        assert_eq!(merged[2].partition_name.as_str(), "root");
        let kept = merged
            .iter()
            .find(|(_, e)| e.partition_name.as_str() == "local-storage")
            .map(|(_, e)| e.clone())
            .expect("saved partition carried over");
        assert_eq!(kept, saved.iter().next().expect("one").entry);
        assert_eq!(merged.header.disk_guid, [9; 16], "the image's disk GUID");
    }

    #[test]
    fn the_image_boot_code_survives_the_merge() {
        let disk = target();
        let saved = find(&disk, &spec(&["local-storage"], &[])).expect("found");
        let mut image = disk_with(16 * MIB, &[(1, entry(2048, 4095, "efi", 11))]);
        image[..446].fill(0xeb);
        let mut head = image[..MIB as usize].to_vec();
        let sectors = saved
            .merge_with_image(&head, DISK)
            .expect("ok")
            .expect("gpt");
        let beyond = sectors.overlay_head(&mut head);
        assert_eq!(&head[..446], &[0xeb; 446]);
        assert_eq!(head[450], 0xee, "protective MBR partition type");
        assert_eq!(beyond.len(), 1, "the backup table lies past the head");
        assert!(beyond[0].0 > 60 * MIB);
    }

    #[test]
    fn an_image_partition_over_a_saved_one_is_a_collision() {
        let disk = target();
        let saved = find(&disk, &spec(&["local-storage"], &[])).expect("found");
        let image = disk_with(DISK, &[(1, entry(2048, DISK / 512 - 100, "root", 11))]);
        let err = saved
            .merge_with_image(&image[..MIB as usize], DISK)
            .expect_err("collision");
        assert_eq!(err.code(), "SavedPartitionCollision");
        assert!(err.to_string().contains("local-storage"), "{err}");
    }

    #[test]
    fn an_image_partition_with_the_saved_guid_is_a_collision() {
        let disk = target();
        let saved = find(&disk, &spec(&["local-storage"], &[])).expect("found");
        let image = disk_with(16 * MIB, &[(1, entry(2048, 4095, "efi", 2))]);
        let err = saved
            .merge_with_image(&image[..MIB as usize], DISK)
            .expect_err("duplicate GUID");
        assert_eq!(err.code(), "SavedPartitionCollision");
    }

    #[test]
    fn an_image_larger_than_the_space_before_a_saved_partition_is_a_collision() {
        let saved = find(&target(), &spec(&["local-storage"], &[])).expect("found");
        let start = saved.protected_ranges()[0].start;
        assert!(saved.check_image_extent(start).is_ok());
        let err = saved.check_image_extent(start + 1).expect_err("overlap");
        assert_eq!(err.code(), "SavedPartitionCollision");
    }

    #[test]
    fn a_saved_index_taken_by_the_image_moves_to_a_free_slot() {
        let mut disk = target();
        let saved = find(&disk, &spec(&["local-storage"], &[])).expect("index 2");
        let image = disk_with(
            16 * MIB,
            &[
                (1, entry(2048, 4095, "efi", 11)),
                (2, entry(4096, 8191, "root", 12)),
            ],
        );
        let sectors = saved
            .merge_with_image(&image[..MIB as usize], DISK)
            .expect("ok");
        sectors.expect("gpt").apply_to(&mut disk);
        let merged = GPT::read_from(&mut Cursor::new(&disk), 512).expect("valid");
        assert_eq!(merged[2].partition_name.as_str(), "root");
        assert_eq!(merged[3].partition_name.as_str(), "local-storage");
    }

    #[test]
    fn an_image_without_a_gpt_cannot_carry_saved_partitions() {
        let raw_image = vec![0x42u8; MIB as usize];
        let saved = find(&target(), &spec(&["local-storage"], &[])).expect("found");
        let err = saved
            .merge_with_image(&raw_image, DISK)
            .expect_err("no GPT");
        assert_eq!(err.code(), "PartitionTableInvalid");
        let nothing = find(&target(), &SaveSpec::default()).expect("empty");
        assert!(
            nothing
                .merge_with_image(&raw_image, DISK)
                .expect("ok")
                .is_none()
        );
    }

    #[test]
    fn the_saved_only_table_holds_just_the_saved_partitions() {
        let mut disk = target();
        let saved = find(&disk, &spec(&["local-storage"], &[])).expect("found");
        saved
            .saved_only_table(DISK)
            .expect("renders")
            .apply_to(&mut disk);
        let table = GPT::read_from(&mut Cursor::new(&disk), 512).expect("valid");
        let used: Vec<_> = table.iter().filter(|(_, e)| e.is_used()).collect();
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, 2, "kept at its index");
        assert_eq!(used[0].1, &saved.iter().next().expect("one").entry);
    }
}
