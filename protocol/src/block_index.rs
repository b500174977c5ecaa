//! The block index of an image packed with `image pack --block-index`
//! (`OUT.index.json`), as the agent reads and writes it.
//!
//! The image is stored as one zstd frame per [`BLOCK_SIZE`] bytes of raw
//! image, so that any block can be fetched (HTTP `Range`) and decoded on its
//! own, while the file stays one valid zstd stream for any decoder. The
//! index says, per block, the BLAKE3 digest of its raw bytes, whether they
//! are all zeros, and where its frame is in the compressed file.

use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Raw bytes per block: an index of about 35 KB per GiB of image, and a
/// small change costs at most 4 MiB per block it touches to fetch.
pub const BLOCK_SIZE: u64 = 4 << 20;

/// The format version written and read.
pub const VERSION: u32 = 1;

/// `{"version","blockSize","imageSize","blocks"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BlockIndex {
    pub version: u32,
    /// Raw bytes per block; the last block may be shorter.
    pub block_size: u64,
    /// Bytes of the raw image.
    pub image_size: u64,
    pub blocks: Vec<Block>,
}

/// One block of the raw image and its frame in the compressed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Block {
    /// BLAKE3 of the block's raw bytes, 64 hex digits.
    pub blake3: String,
    /// The raw bytes are all zeros: a write zeroes them, nothing is fetched.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zero: bool,
    /// Where the block's zstd frame starts in the compressed file.
    pub offset: u64,
    /// The frame's length in bytes.
    pub length: u64,
}

impl Block {
    /// The block's frame in the compressed file.
    pub fn frame(&self) -> Range<u64> {
        self.offset..self.offset + self.length
    }
}

impl BlockIndex {
    /// The raw bytes of block `number`.
    pub fn extent(&self, number: usize) -> Range<u64> {
        let start = number as u64 * self.block_size;
        start..(start + self.block_size).min(self.image_size)
    }

    /// Raw bytes of the blocks `numbers`.
    pub fn extents_len(&self, numbers: &[usize]) -> u64 {
        numbers
            .iter()
            .map(|&n| {
                let extent = self.extent(n);
                extent.end - extent.start
            })
            .sum()
    }

    /// Bytes of the compressed file.
    pub fn encoded_size(&self) -> u64 {
        self.blocks.last().map_or(0, |b| b.offset + b.length)
    }

    /// Blocks that are all zeros.
    pub fn zero_blocks(&self) -> usize {
        self.blocks.iter().filter(|b| b.zero).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_tile_the_image_and_the_compressed_file() {
        let block = |offset, zero| Block {
            blake3: "00".repeat(32),
            zero,
            offset,
            length: 10,
        };
        let index = BlockIndex {
            version: VERSION,
            block_size: BLOCK_SIZE,
            image_size: 2 * BLOCK_SIZE + 512,
            blocks: vec![block(0, false), block(10, true), block(20, false)],
        };
        assert_eq!(index.extent(2), 2 * BLOCK_SIZE..2 * BLOCK_SIZE + 512);
        assert_eq!(index.extents_len(&[0, 2]), BLOCK_SIZE + 512);
        assert_eq!(index.encoded_size(), 30);
        assert_eq!(index.zero_blocks(), 1);
        assert_eq!(index.blocks[1].frame(), 10..20);
        let text = serde_json::to_string(&index.blocks[0]).expect("json");
        assert!(
            !text.contains("zero"),
            "a false zero flag is left out: {text}"
        );
    }
}
