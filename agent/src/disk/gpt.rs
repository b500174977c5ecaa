//! Partition tables rendered in memory before anything touches the disk.
//!
//! A table is built with `gptman` against a [`SparseDisk`] of the target's
//! size, so every check `gptman` makes (overlaps, bounds, unique GUIDs) runs
//! as a dry run; the resulting sectors are then written by the pipeline at
//! the moment it chooses.

use crate::{Error, Result};
use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom, Write};

/// Offset of the MBR partition records; bytes before it are boot code.
pub const MBR_BOOT_CODE_LEN: usize = 446;

/// One of the two copies of a GPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableCopy {
    /// Header at LBA 1, entries after it.
    Primary,
    /// Entries and header at the end of the disk; firmware and `gdisk` fall
    /// back to it when the primary is unreadable.
    Backup,
}

impl std::fmt::Display for TableCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TableCopy::Primary => "primary",
            TableCopy::Backup => "backup",
        })
    }
}

/// The sectors of a rendered partition table: protective MBR, primary header
/// and entries at the start of the disk, backup entries and header at its end.
#[derive(Debug, Clone, Default)]
pub struct TableSectors {
    sector_size: u64,
    sectors: BTreeMap<u64, Vec<u8>>,
}

impl TableSectors {
    /// Contiguous runs of rendered bytes as `(byte offset, bytes)`, in order.
    pub fn runs(&self) -> Vec<(u64, Vec<u8>)> {
        let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
        for (&lba, data) in &self.sectors {
            let offset = lba * self.sector_size;
            match runs.last_mut() {
                Some((start, bytes)) if *start + bytes.len() as u64 == offset => {
                    bytes.extend_from_slice(data)
                }
                _ => runs.push((offset, data.clone())),
            }
        }
        runs
    }

    /// The runs of one copy of the table: the primary copy (protective MBR,
    /// header, entries) lies in the first MiB, the backup copy at the end.
    pub fn copy_runs(&self, copy: TableCopy) -> Vec<(u64, Vec<u8>)> {
        let in_head = |offset: u64| offset < crate::disk::HEAD_LEN as u64;
        self.runs()
            .into_iter()
            .filter(|(offset, _)| in_head(*offset) == (copy == TableCopy::Primary))
            .collect()
    }

    /// The LBA of one copy's header: LBA 1 for the primary, the last
    /// rendered sector for the backup; `None` if the copy was not rendered.
    pub fn header_lba(&self, copy: TableCopy) -> Option<u64> {
        let head_lbas = crate::disk::HEAD_LEN as u64 / self.sector_size;
        match copy {
            TableCopy::Primary => self.sectors.contains_key(&1).then_some(1),
            TableCopy::Backup => self
                .sectors
                .keys()
                .next_back()
                .copied()
                .filter(|lba| *lba >= head_lbas),
        }
    }

    /// Bytes per sector of the table.
    pub fn sector_size(&self) -> u64 {
        self.sector_size
    }

    /// The sectors rendered, by LBA.
    pub fn lbas(&self) -> impl Iterator<Item = u64> + '_ {
        self.sectors.keys().copied()
    }

    /// Whether sector `lba` is part of the table.
    pub fn contains(&self, lba: u64) -> bool {
        self.sectors.contains_key(&lba)
    }

    /// Writes the table into `disk`, an in-memory image of the whole disk.
    pub fn apply_to(&self, disk: &mut [u8]) {
        for (offset, bytes) in self.runs() {
            let start = offset as usize;
            disk[start..start + bytes.len()].copy_from_slice(&bytes);
        }
    }

    /// Copies the rendered sectors that fall inside `head` (which holds the
    /// disk's first bytes) into it and returns the runs that lie beyond it.
    pub fn overlay_head(&self, head: &mut Vec<u8>) -> Vec<(u64, Vec<u8>)> {
        let mut beyond = Vec::new();
        for (offset, bytes) in self.runs() {
            let end = offset + bytes.len() as u64;
            if offset < head.len() as u64 || (offset as usize) < crate::disk::HEAD_LEN {
                if end as usize > head.len() {
                    head.resize(end as usize, 0);
                }
                head[offset as usize..end as usize].copy_from_slice(&bytes);
            } else {
                beyond.push((offset, bytes));
            }
        }
        beyond
    }
}

/// A disk of a given size that records sector writes instead of doing them.
/// Reads see what was written, zeros elsewhere.
#[derive(Debug)]
pub struct SparseDisk {
    len: u64,
    pos: u64,
    table: TableSectors,
}

impl SparseDisk {
    /// A recording disk of `len` bytes with `sector_size`-byte sectors.
    pub fn new(len: u64, sector_size: u64) -> Self {
        SparseDisk {
            len,
            pos: 0,
            table: TableSectors {
                sector_size,
                sectors: BTreeMap::new(),
            },
        }
    }

    /// The sectors written so far.
    pub fn into_sectors(self) -> TableSectors {
        self.table
    }

    fn sector_mut(&mut self, lba: u64) -> &mut Vec<u8> {
        let size = self.table.sector_size as usize;
        self.table
            .sectors
            .entry(lba)
            .or_insert_with(|| vec![0; size])
    }
}

impl Write for SparseDisk {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.pos + buf.len() as u64 > self.len {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("write at byte {} runs past the end of the disk", self.pos),
            ));
        }
        let sector_size = self.table.sector_size;
        let mut written = 0;
        while written < buf.len() {
            let at = self.pos + written as u64;
            let (lba, within) = (at / sector_size, (at % sector_size) as usize);
            let n = (sector_size as usize - within).min(buf.len() - written);
            self.sector_mut(lba)[within..within + n].copy_from_slice(&buf[written..written + n]);
            written += n;
        }
        self.pos += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for SparseDisk {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let sector_size = self.table.sector_size;
        let remaining = self.len.saturating_sub(self.pos);
        let (lba, within) = (self.pos / sector_size, (self.pos % sector_size) as usize);
        let n = (buf.len() as u64)
            .min(remaining)
            .min(sector_size - within as u64) as usize;
        match self.table.sectors.get(&lba) {
            Some(sector) => buf[..n].copy_from_slice(&sector[within..within + n]),
            None => buf[..n].fill(0),
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for SparseDisk {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the disk",
            )
        })?;
        Ok(self.pos)
    }
}

/// Renders `gpt` for a disk of `disk_size` bytes: protective MBR (keeping
/// `boot_code` in front of it), primary and backup GPT. Fails if `gptman`
/// finds the table inconsistent.
pub fn render(
    gpt: &mut gptman::GPT,
    disk_size: u64,
    boot_code: Option<&[u8]>,
) -> Result<TableSectors> {
    let mut disk = SparseDisk::new(disk_size, gpt.sector_size);
    let invalid = |e: gptman::Error| Error::PartitionTableInvalid(e.to_string());
    if let Some(code) = boot_code {
        let code = &code[..code.len().min(MBR_BOOT_CODE_LEN)];
        disk.write_all(code)
            .map_err(|e| Error::PartitionTableInvalid(e.to_string()))?;
    }
    gptman::GPT::write_protective_mbr_into(&mut disk, gpt.sector_size).map_err(invalid)?;
    gpt.write_into(&mut disk).map_err(invalid)?;
    Ok(disk.into_sectors())
}

/// Moves the backup header and the last usable sector of `gpt` to the end of
/// a disk of `disk_size` bytes (an image's table describes the image's size).
pub fn fit_to_disk(gpt: &mut gptman::GPT, disk_size: u64) -> Result<()> {
    let mut disk = SparseDisk::new(disk_size, gpt.sector_size);
    gpt.header
        .update_from(&mut disk, gpt.sector_size)
        .map_err(|e| Error::PartitionTableInvalid(format!("resizing the table: {e}")))
}

/// A fresh random GUID for a new disk label.
pub fn random_guid() -> Result<[u8; 16]> {
    let mut guid = [0u8; 16];
    getrandom::fill(&mut guid)
        .map_err(|e| Error::io("drawing a disk GUID", io::Error::other(e.to_string())))?;
    // RFC 4122 version 4, variant 1 (GPT stores the first fields little-endian).
    guid[7] = (guid[7] & 0x0f) | 0x40;
    guid[8] = (guid[8] & 0x3f) | 0x80;
    Ok(guid)
}

/// A GUID in its usual text form (GPT's mixed-endian layout).
pub fn format_guid(g: &[u8; 16]) -> String {
    format!(
        "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        g[3],
        g[2],
        g[1],
        g[0],
        g[5],
        g[4],
        g[7],
        g[6],
        g[8],
        g[9],
        g[10],
        g[11],
        g[12],
        g[13],
        g[14],
        g[15]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_rendered_table_reads_back_from_the_sparse_disk() {
        let mut disk = SparseDisk::new(64 * MIB, 512);
        let mut gpt = gptman::GPT::new_from(&mut disk, 512, [7; 16]).expect("new table");
        gpt[1] = gptman::GPTPartitionEntry {
            partition_type_guid: [1; 16],
            unique_partition_guid: [2; 16],
            starting_lba: 2048,
            ending_lba: 4095,
            attribute_bits: 0,
            partition_name: "root".into(),
        };
        let sectors = render(&mut gpt, 64 * MIB, Some(&[0xeb; 446])).expect("renders");
        let runs = sectors.runs();
        assert_eq!(runs.len(), 2, "one run at the start, one at the end");
        assert_eq!(runs[0].0, 0);
        let (last_offset, last) = runs.last().expect("backup run");
        assert_eq!(
            last_offset + last.len() as u64,
            64 * MIB,
            "backup ends the disk"
        );

        let mut image = vec![0u8; (64 * MIB) as usize];
        sectors.apply_to(&mut image);
        assert_eq!(&image[..446], &[0xeb; 446], "boot code kept");
        assert_eq!(&image[510..512], &[0x55, 0xaa]);
        let back = gptman::GPT::read_from(&mut io::Cursor::new(image), 512).expect("reads");
        assert_eq!(back[1].partition_name.as_str(), "root");
        assert_eq!(back.header.backup_lba, 64 * MIB / 512 - 1);
    }

    #[test]
    fn the_two_copies_are_told_apart_with_their_headers() {
        let mut disk = SparseDisk::new(64 * MIB, 512);
        let mut gpt = gptman::GPT::new_from(&mut disk, 512, [7; 16]).expect("new table");
        let sectors = render(&mut gpt, 64 * MIB, None).expect("renders");
        let primary = sectors.copy_runs(TableCopy::Primary);
        let backup = sectors.copy_runs(TableCopy::Backup);
        assert_eq!(primary.len(), 1);
        assert_eq!(primary[0].0, 0, "MBR, header and entries from byte 0");
        assert_eq!(backup.len(), 1);
        let (offset, bytes) = &backup[0];
        assert_eq!(
            offset + bytes.len() as u64,
            64 * MIB,
            "backup ends the disk"
        );
        assert_eq!(sectors.header_lba(TableCopy::Primary), Some(1));
        assert_eq!(
            sectors.header_lba(TableCopy::Backup),
            Some(64 * MIB / 512 - 1)
        );
        let last = &bytes[bytes.len() - 512..];
        assert_eq!(
            &last[..8],
            b"EFI PART",
            "the backup header is its last sector"
        );
    }

    #[test]
    fn overlapping_partitions_fail_the_dry_run() {
        let mut disk = SparseDisk::new(64 * MIB, 512);
        let mut gpt = gptman::GPT::new_from(&mut disk, 512, [7; 16]).expect("new table");
        for (i, start) in [(1, 2048), (2, 3000)] {
            gpt[i] = gptman::GPTPartitionEntry {
                partition_type_guid: [1; 16],
                unique_partition_guid: [i as u8; 16],
                starting_lba: start,
                ending_lba: start + 2047,
                attribute_bits: 0,
                partition_name: "p".into(),
            };
        }
        let err = render(&mut gpt, 64 * MIB, None).expect_err("overlap refused");
        assert_eq!(err.code(), "PartitionTableInvalid");
    }

    #[test]
    fn writes_past_the_end_of_the_sparse_disk_fail() {
        let mut disk = SparseDisk::new(1024, 512);
        disk.seek(SeekFrom::Start(1000)).expect("seek");
        assert!(disk.write_all(&[1; 100]).is_err());
    }

    #[test]
    fn guids_print_in_mixed_endian_form() {
        let guid = [
            0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
            0xc9, 0x3b,
        ];
        assert_eq!(format_guid(&guid), "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
        let random = random_guid().expect("random");
        assert_eq!(random[7] >> 4, 4, "version 4");
    }
}
