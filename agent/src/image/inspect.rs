//! `image inspect`: what an image is, decoded in full: format, sizes,
//! SHA-256 and the partition table inside.

use crate::disk::HEAD_LEN;
use crate::disk::gpt::format_guid;
use crate::image::decode;
use crate::image::http::HttpOptions;
use crate::image::source::{self, Location};
use crate::{Error, Result};
use reimage_protocol::ImageFormat;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::io::{Cursor, Read};

/// The facts `image inspect` prints.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageInfo {
    pub location: String,
    pub format: ImageFormat,
    /// Bytes as stored (compressed), when known.
    pub encoded_size: Option<u64>,
    /// Bytes of the raw image.
    pub size: u64,
    pub sha256: String,
    pub partition_table: Option<PartitionTable>,
}

/// A GPT found in the image.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionTable {
    pub sector_size: u64,
    pub disk_guid: String,
    pub partitions: Vec<PartitionInfo>,
}

/// One used partition entry.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionInfo {
    pub index: u32,
    pub first_lba: u64,
    pub last_lba: u64,
    pub size_bytes: u64,
    pub type_guid: String,
    pub guid: String,
    pub label: String,
}

/// Decodes the whole image at `location` and describes it.
pub fn inspect(location: &Location, options: &HttpOptions) -> Result<ImageInfo> {
    let source = source::open(location, options)?;
    let encoded_size = source.length;
    let (format, mut decoded) = decode::open_decoder(source.reader)?;
    let mut hasher = Sha256::new();
    let mut head = Vec::with_capacity(HEAD_LEN);
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match decoded.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::from_io(e, "reading the image")),
        };
        hasher.update(&buffer[..n]);
        let held = (HEAD_LEN - head.len()).min(n);
        head.extend_from_slice(&buffer[..held]);
        size += n as u64;
    }
    Ok(ImageInfo {
        location: location.to_string(),
        format,
        encoded_size,
        size,
        sha256: hex::encode(hasher.finalize()),
        partition_table: read_table(&head),
    })
}

fn read_table(head: &[u8]) -> Option<PartitionTable> {
    [512u64, 4096].into_iter().find_map(|sector_size| {
        let table = gptman::GPT::read_from(&mut Cursor::new(head), sector_size).ok()?;
        let partitions = table
            .iter()
            .filter(|(_, e)| e.is_used())
            .map(|(index, e)| PartitionInfo {
                index,
                first_lba: e.starting_lba,
                last_lba: e.ending_lba,
                size_bytes: (e.ending_lba + 1 - e.starting_lba) * sector_size,
                type_guid: format_guid(&e.partition_type_guid),
                guid: format_guid(&e.unique_partition_guid),
                label: e.partition_name.as_str().to_string(),
            })
            .collect();
        Some(PartitionTable {
            sector_size,
            disk_guid: format_guid(&table.header.disk_guid),
            partitions,
        })
    })
}
