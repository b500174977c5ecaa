//! `image inspect`: what an image is, decoded in full: format, sizes,
//! SHA-256 and the partition table inside; given a manifest, the image it
//! names and its block index, each block checked against the index.

use crate::Result;
use crate::disk::gpt::format_guid;
use crate::image::block_index;
use crate::image::decode;
use crate::image::http::HttpOptions;
use crate::image::measure::measure_to_end;
use crate::image::source::{self, Location};
use reimage_protocol::ImageFormat;
use serde::Serialize;
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
    /// Given a manifest: whether the image is the one it describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest_matches: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_index: Option<IndexInfo>,
}

/// The block index a manifest names, checked against the decoded image.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexInfo {
    pub location: String,
    pub block_size: u64,
    pub blocks: usize,
    pub zero_blocks: usize,
    /// Bytes of the compressed file the frames cover.
    pub encoded_size: u64,
    /// Blocks whose decoded bytes are not the ones the index describes.
    pub mismatched_blocks: Vec<usize>,
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

/// Decodes the whole image at `location` and describes it. A location
/// ending in `.json` is a manifest: the image it names is described, and
/// checked against it and its block index.
pub fn inspect(location: &Location, options: &HttpOptions) -> Result<ImageInfo> {
    let manifest = if location.to_string().ends_with(".json") {
        Some(crate::image::manifest::load(location, options, &[])?)
    } else {
        None
    };
    let image = manifest.as_ref().map_or(location, |(_, image)| image);
    let index = match &manifest {
        Some((manifest, _)) => manifest
            .block_index
            .as_ref()
            .map(|index| {
                let at = location.join(&index.url)?;
                let loaded = block_index::load(&at, &index.sha256, manifest.size, options)?;
                Ok::<_, crate::Error>((at, loaded))
            })
            .transpose()?,
        None => None,
    };
    let source = source::open(image, options)?;
    let encoded_size = source.length;
    let (format, decoded) = decode::open_decoder(source.reader)?;
    let block_size = index.as_ref().map(|(_, index)| index.block_size);
    let mut digests = BlockDigests::new(decoded, block_size);
    let measured = measure_to_end(&mut digests, None, &mut |_| {})?;
    let digests = digests.finish();
    Ok(ImageInfo {
        location: image.to_string(),
        format,
        encoded_size,
        size: measured.size,
        partition_table: read_table(&measured.head),
        manifest_matches: manifest.as_ref().map(|(manifest, _)| {
            manifest.sha256 == measured.sha256
                && manifest.size == measured.size
                && manifest.format == format
        }),
        sha256: measured.sha256,
        block_index: index.map(|(at, index)| IndexInfo {
            location: at.to_string(),
            block_size: index.block_size,
            blocks: index.blocks.len(),
            zero_blocks: index.zero_blocks(),
            encoded_size: index.encoded_size(),
            mismatched_blocks: (0..index.blocks.len().max(digests.len()))
                .filter(|&n| {
                    index.blocks.get(n).map(block_index::digest) != digests.get(n).copied()
                })
                .collect(),
        }),
    })
}

/// Passes decoded bytes through, taking the BLAKE3 of each block (when
/// there are blocks to check).
struct BlockDigests<R> {
    inner: R,
    block_size: Option<u64>,
    current: blake3::Hasher,
    in_block: u64,
    digests: Vec<blake3::Hash>,
}

impl<R: Read> BlockDigests<R> {
    fn new(inner: R, block_size: Option<u64>) -> Self {
        BlockDigests {
            inner,
            block_size,
            current: blake3::Hasher::new(),
            in_block: 0,
            digests: Vec::new(),
        }
    }

    /// The digest of every block, the last one however short.
    fn finish(mut self) -> Vec<blake3::Hash> {
        if self.in_block > 0 {
            self.digests.push(self.current.finalize());
        }
        self.digests
    }
}

impl<R: Read> Read for BlockDigests<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let Some(block_size) = self.block_size else {
            return Ok(n);
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let take = rest.len().min((block_size - self.in_block) as usize);
            self.current.update(&rest[..take]);
            self.in_block += take as u64;
            rest = &rest[take..];
            if self.in_block == block_size {
                self.digests.push(self.current.finalize());
                self.current.reset();
                self.in_block = 0;
            }
        }
        Ok(n)
    }
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
