//! Test disks and images: GPT layouts with random and zero regions, built
//! in memory with gptman so every test knows exactly what each byte is.

use gptman::{GPT, GPTPartitionEntry};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::Path;

/// One mebibyte.
pub const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

/// Hex SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A partition to put in a test table.
#[derive(Debug, Clone)]
pub struct Part {
    pub index: u32,
    pub label: &'static str,
    pub first_mib: u64,
    pub last_mib_excl: u64,
    pub guid: u8,
}

/// `C12A7328-F81F-11D2-BA4B-00A0C93EC93B`, the EFI system partition's
/// type, as a GPT entry stores it.
pub const ESP_TYPE: [u8; 16] = [
    0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b,
];

/// An entry for `part`; one labelled `efi` is an EFI system partition, as
/// in a real OS image.
fn entry(part: &Part) -> GPTPartitionEntry {
    GPTPartitionEntry {
        partition_type_guid: if part.label == "efi" {
            ESP_TYPE
        } else {
            [0x0f; 16]
        },
        unique_partition_guid: [part.guid; 16],
        starting_lba: part.first_mib * MIB / SECTOR,
        ending_lba: part.last_mib_excl * MIB / SECTOR - 1,
        attribute_bits: 0,
        partition_name: part.label.into(),
    }
}

/// Writes a GPT holding `parts` into `disk` (its length is the disk size).
pub fn write_table(disk: &mut Vec<u8>, parts: &[Part]) {
    let mut cursor = Cursor::new(std::mem::take(disk));
    let mut table = GPT::new_from(&mut cursor, SECTOR, [0x42; 16]).expect("new GPT");
    for part in parts {
        table[part.index] = entry(part);
    }
    GPT::write_protective_mbr_into(&mut cursor, SECTOR).expect("protective MBR");
    table.write_into(&mut cursor).expect("GPT fits");
    *disk = cursor.into_inner();
}

/// An OS image of `size_mib` MiB: GPT with `efi` (1–3 MiB) and `root`
/// (3 MiB to the end), whose contents alternate 1 MiB of random data and
/// `zero_mib` MiB of zeros, so zero runs are exercised.
pub fn os_image(size_mib: u64, zero_mib: u64, seed: u64) -> Vec<u8> {
    let mut image = vec![0u8; (size_mib * MIB) as usize];
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut mib = 1;
    while mib < size_mib - 1 {
        let start = (mib * MIB) as usize;
        rng.fill(&mut image[start..start + MIB as usize]);
        mib += 1 + zero_mib;
    }
    // Boot code in the MBR area, as a real image has.
    rng.fill(&mut image[..440]);
    write_os_table(&mut image);
    image
}

/// Writes the table of an OS image into `image` (its length is the image's
/// size): `efi` from 1 to 3 MiB, `root` from 3 MiB to the last MiB.
pub fn write_os_table(image: &mut Vec<u8>) {
    write_os_table_with_esp(image, 0xe1);
}

/// The same with the ESP's partition GUID all `esp_guid` bytes: images
/// built separately have ESPs of different GUIDs.
pub fn write_os_table_with_esp(image: &mut Vec<u8>, esp_guid: u8) {
    let size_mib = image.len() as u64 / MIB;
    write_table(
        image,
        &[
            Part {
                index: 1,
                label: "efi",
                first_mib: 1,
                last_mib_excl: 3,
                guid: esp_guid,
            },
            Part {
                index: 2,
                label: "root",
                first_mib: 3,
                last_mib_excl: size_mib - 1,
                guid: 0xe2,
            },
        ],
    );
}

/// A target disk file of `size_mib` MiB filled with random bytes, with an
/// `old-root` partition and `local-storage` in its last `storage_mib` MiB.
/// Returns the SHA-256 of the local-storage partition.
pub fn target_disk(path: &Path, size_mib: u64, storage_mib: u64, seed: u64) -> String {
    let mut disk = vec![0u8; (size_mib * MIB) as usize];
    fastrand::Rng::with_seed(seed).fill(&mut disk);
    let last = size_mib - 1;
    write_table(
        &mut disk,
        &[
            Part {
                index: 1,
                label: "old-root",
                first_mib: 1,
                last_mib_excl: last - storage_mib,
                guid: 0xa1,
            },
            Part {
                index: 2,
                label: "local-storage",
                first_mib: last - storage_mib,
                last_mib_excl: last,
                guid: 0xa2,
            },
        ],
    );
    fs::write(path, &disk).expect("write target disk");
    partition_sha256(path, "local-storage")
        .expect("local-storage exists")
        .0
}

/// Finds the partition labelled `label` on the disk or file at `path`,
/// returns the SHA-256 of its bytes and its entry.
pub fn partition_sha256(path: &Path, label: &str) -> Option<(String, GPTPartitionEntry)> {
    let mut disk = fs::File::open(path).expect("open disk");
    let table = GPT::read_from(&mut disk, SECTOR).ok()?;
    let (_, entry) = table
        .iter()
        .find(|(_, e)| e.is_used() && e.partition_name.as_str() == label)?;
    disk.seek(SeekFrom::Start(entry.starting_lba * SECTOR))
        .expect("seek");
    let mut bytes = vec![0u8; ((entry.ending_lba + 1 - entry.starting_lba) * SECTOR) as usize];
    disk.read_exact(&mut bytes).expect("read partition");
    Some((sha256(&bytes), entry.clone()))
}

/// Labels of the used entries of the GPT on `path`, by index; empty when
/// there is no valid GPT.
pub fn partition_labels(path: &Path) -> Vec<(u32, String)> {
    let Ok(mut disk) = fs::File::open(path) else {
        return Vec::new();
    };
    match GPT::read_from(&mut disk, SECTOR) {
        Ok(table) => table
            .iter()
            .filter(|(_, e)| e.is_used())
            .map(|(i, e)| (i, e.partition_name.as_str().to_string()))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// One copy of a disk's GPT, read on its own (gptman's `read_from` falls
/// back to the backup when the primary is invalid, hiding which is which).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copy {
    Primary,
    Backup,
}

/// The labels of the used entries of one GPT copy on `path`, in index
/// order; `None` when that copy is not a valid table.
pub fn table_copy_labels(path: &Path, copy: Copy) -> Option<Vec<String>> {
    use gptman::GPTHeader;
    let mut disk = fs::File::open(path).ok()?;
    let len = disk.seek(SeekFrom::End(0)).ok()?;
    let header_lba = match copy {
        Copy::Primary => 1,
        Copy::Backup => len / SECTOR - 1,
    };
    disk.seek(SeekFrom::Start(header_lba * SECTOR)).ok()?;
    let header = GPTHeader::read_from(&mut disk).ok()?;
    if header.primary_lba != header_lba {
        return None;
    }
    let entries = header.read_partitions(&mut disk, SECTOR).ok()?;
    Some(
        entries
            .iter()
            .filter(|e| e.is_used())
            .map(|e| e.partition_name.as_str().to_string())
            .collect(),
    )
}

/// Just the labels of [`partition_labels`], in index order.
pub fn labels(path: &Path) -> Vec<String> {
    partition_labels(path).into_iter().map(|(_, l)| l).collect()
}

/// Bytes `[start, end)` of the file or device at `path`.
pub fn read_range(path: &Path, start: u64, end: u64) -> Vec<u8> {
    let mut file = fs::File::open(path).expect("open");
    file.seek(SeekFrom::Start(start)).expect("seek");
    let mut bytes = vec![0u8; (end - start) as usize];
    file.read_exact(&mut bytes).expect("read range");
    bytes
}

/// zstd with a frame checksum, as the zstd CLI writes it.
pub fn zstd(raw: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = zstd::Encoder::new(Vec::new(), 1).expect("encoder");
    encoder.include_checksum(true).expect("checksum");
    encoder.write_all(raw).expect("compress");
    encoder.finish().expect("finish")
}

/// After a failure: each GPT copy on `disk` holds the saved partition and
/// nothing else (no copy describes the image), and its bytes still hash to
/// `storage_sha`.
pub fn assert_saved_only(disk: &Path, storage_sha: &str) {
    for copy in [Copy::Primary, Copy::Backup] {
        assert_eq!(
            table_copy_labels(disk, copy),
            Some(vec!["local-storage".to_string()]),
            "the {copy:?} table of {}",
            disk.display()
        );
    }
    let (sha, _) = partition_sha256(disk, "local-storage").expect("local-storage in the table");
    assert_eq!(sha, storage_sha, "local-storage bytes changed");
}
