//! The block index of an image packed with `image pack --block-index`.
//!
//! The image is stored as one zstd frame per [`BLOCK_SIZE`] bytes of raw
//! image, so that any block can be fetched (HTTP `Range`) and decoded on its
//! own, while the file stays one valid zstd stream for any decoder. The
//! index says, per block, the BLAKE3 digest of its raw bytes, whether they
//! are all zeros, and where its frame is in the compressed file. The
//! manifest names the index with its SHA-256, so a signed manifest covers
//! it; a write that uses it still checks the whole image's SHA-256.

use crate::disk::HEAD_LEN;
use crate::image::digest::parse_sha256_hex;
use crate::image::http::HttpOptions;
use crate::image::source::{self, Location};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::ops::Range;

/// Raw bytes per block: an index of about 35 KB per GiB of image, and a
/// small change costs at most 4 MiB per block it touches to fetch.
pub const BLOCK_SIZE: u64 = 4 << 20;

/// The format version this agent reads and writes.
pub const VERSION: u32 = 1;

/// An index of a terabyte image is about 40 MB; anything larger is not one.
const INDEX_LIMIT: u64 = 64 << 20;

/// `OUT.index.json`.
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
    /// The block's raw digest.
    pub fn digest(&self) -> blake3::Hash {
        // Checked when the index was loaded.
        blake3::Hash::from_hex(&self.blake3).unwrap_or_else(|_| blake3::hash(b""))
    }

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

    /// Bytes of the compressed file.
    pub fn encoded_size(&self) -> u64 {
        self.blocks.last().map_or(0, |b| b.offset + b.length)
    }

    /// Blocks that are all zeros.
    pub fn zero_blocks(&self) -> usize {
        self.blocks.iter().filter(|b| b.zero).count()
    }

    /// Parses and checks an index's text: the frames must tile the
    /// compressed file in order, one per block of the image, and the block
    /// size must hold the image's first MiB (which the commit writes last).
    pub fn parse(bytes: &[u8]) -> Result<BlockIndex> {
        let invalid = |why: String| Error::ManifestInvalid(format!("block index: {why}"));
        let index: BlockIndex =
            serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        if index.version != VERSION {
            return Err(invalid(format!(
                "version {} (this agent reads version {VERSION})",
                index.version
            )));
        }
        if index.block_size < HEAD_LEN as u64 || !index.block_size.is_multiple_of(HEAD_LEN as u64) {
            return Err(invalid(format!(
                "block size {} is not a multiple of 1 MiB",
                index.block_size
            )));
        }
        let expected_blocks = index.image_size.div_ceil(index.block_size);
        if index.blocks.len() as u64 != expected_blocks {
            return Err(invalid(format!(
                "{} blocks for an image of {} bytes in blocks of {} (expected {expected_blocks})",
                index.blocks.len(),
                index.image_size,
                index.block_size
            )));
        }
        let mut next = 0;
        for (number, block) in index.blocks.iter().enumerate() {
            if block.offset != next || block.length == 0 {
                return Err(invalid(format!(
                    "block {number}'s frame ({} bytes at {}) does not follow the previous one (at {next})",
                    block.length, block.offset
                )));
            }
            next = block
                .offset
                .checked_add(block.length)
                .ok_or_else(|| invalid(format!("block {number}'s frame ends past 2^64")))?;
            if blake3::Hash::from_hex(&block.blake3).is_err() {
                return Err(invalid(format!(
                    "block {number}'s blake3 '{}' is not 64 hex digits",
                    block.blake3
                )));
            }
        }
        Ok(index)
    }

    /// Fetches the index at `location` and checks it against the SHA-256
    /// the manifest gave for it and the image's size.
    pub fn load(
        location: &Location,
        sha256: &str,
        image_size: u64,
        http: &HttpOptions,
    ) -> Result<BlockIndex> {
        let bytes = source::read_small(location, INDEX_LIMIT, http)?;
        let expected = parse_sha256_hex(sha256)
            .map_err(|e| Error::ManifestInvalid(format!("blockIndex sha256 '{sha256}': {e}")))?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != expected {
            return Err(Error::ImageChecksumMismatch {
                expected: format!("{expected} (the block index {location})"),
                actual,
            });
        }
        let index = BlockIndex::parse(&bytes).map_err(|e| match e {
            Error::ManifestInvalid(why) => Error::ManifestInvalid(format!("{location}: {why}")),
            other => other,
        })?;
        if index.image_size != image_size {
            return Err(Error::ManifestInvalid(format!(
                "{location}: the block index describes {} bytes, the manifest {image_size}",
                index.image_size
            )));
        }
        Ok(index)
    }
}

/// Where an image's index is and what it must hash to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexRef {
    pub location: Location,
    pub sha256: String,
}

/// The digest and zero flag of a raw block, as the index records them.
pub fn describe(raw: &[u8]) -> (String, bool) {
    (
        blake3::hash(raw).to_hex().to_string(),
        crate::disk::sink::is_zero(raw),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(blocks: usize, image_size: u64) -> BlockIndex {
        let (digest, _) = describe(b"x");
        BlockIndex {
            version: VERSION,
            block_size: BLOCK_SIZE,
            image_size,
            blocks: (0..blocks as u64)
                .map(|n| Block {
                    blake3: digest.clone(),
                    zero: false,
                    offset: n * 10,
                    length: 10,
                })
                .collect(),
        }
    }

    fn parsed(index: &BlockIndex) -> Result<BlockIndex> {
        BlockIndex::parse(&serde_json::to_vec(index).expect("serialises"))
    }

    #[test]
    fn a_consistent_index_parses_and_describes_its_blocks() {
        let good = index(3, 2 * BLOCK_SIZE + 512);
        let back = parsed(&good).expect("valid");
        assert_eq!(back, good);
        assert_eq!(back.extent(2), 2 * BLOCK_SIZE..2 * BLOCK_SIZE + 512);
        assert_eq!(back.encoded_size(), 30);
        assert_eq!(back.blocks[1].frame(), 10..20);
    }

    #[test]
    fn inconsistent_indexes_say_what_is_wrong() {
        let mut wrong_count = index(2, 2 * BLOCK_SIZE + 1);
        let mut gap = index(3, 3 * BLOCK_SIZE);
        gap.blocks[2].offset = 25;
        let mut small = index(1, 4096);
        small.block_size = 4096;
        let mut version = index(1, 4096);
        version.version = 2;
        let mut digest = index(1, 4096);
        digest.blocks[0].blake3 = "xyz".into();
        for (bad, says) in [
            (&mut wrong_count, "expected 3"),
            (&mut gap, "block 2's frame"),
            (&mut small, "multiple of 1 MiB"),
            (&mut version, "version 2"),
            (&mut digest, "64 hex digits"),
        ] {
            let err = parsed(bad).expect_err(says);
            assert!(matches!(err, Error::ManifestInvalid(_)), "{err}");
            assert!(err.to_string().contains(says), "{says}: {err}");
        }
    }

    #[test]
    fn an_index_that_is_not_the_one_the_manifest_names_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("os.img.zst.index.json");
        let good = index(1, 4096);
        let bytes = serde_json::to_vec(&good).expect("serialises");
        std::fs::write(&path, &bytes).expect("index");
        let location = Location::File(path);
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let http = HttpOptions::default();
        assert_eq!(
            BlockIndex::load(&location, &sha256, 4096, &http).expect("loads"),
            good
        );
        let other = hex::encode(Sha256::digest(b"other"));
        let err = BlockIndex::load(&location, &other, 4096, &http).expect_err("wrong hash");
        assert!(matches!(err, Error::ImageChecksumMismatch { .. }), "{err}");
        let err = BlockIndex::load(&location, &sha256, 8192, &http).expect_err("wrong size");
        assert!(err.to_string().contains("the manifest 8192"), "{err}");
    }
}
