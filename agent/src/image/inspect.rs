//! `image inspect`: what an image is, decoded in full: format, sizes,
//! SHA-256 and the partition table inside.

use crate::Result;
use crate::disk::gpt::format_guid;
use crate::image::decode;
use crate::image::http::HttpOptions;
use crate::image::measure::measure_to_end;
use crate::image::source::{self, Location};
use reimage_protocol::ImageFormat;
use serde::Serialize;
use std::io::Cursor;

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
    let measured = measure_to_end(&mut decoded, None, &mut |_| {})?;
    Ok(ImageInfo {
        location: location.to_string(),
        format,
        encoded_size,
        size: measured.size,
        partition_table: read_table(&measured.head),
        sha256: measured.sha256,
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
