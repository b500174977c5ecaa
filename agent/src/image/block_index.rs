//! Reading block indexes ([`reimage_protocol::block_index`]): parsed and
//! checked, fetched against the SHA-256 the manifest gives for them (so a
//! signed manifest covers the index), and the digest of a raw block. A
//! write that uses an index still checks the whole image's SHA-256.

use crate::disk::HEAD_LEN;
use crate::image::digest::parse_sha256_hex;
use crate::image::http::HttpOptions;
use crate::image::source::{self, Location};
use crate::{Error, Result};
pub use reimage_protocol::block_index::{BLOCK_SIZE, Block, BlockIndex, VERSION};
use sha2::{Digest, Sha256};

/// An index of a terabyte image is about 40 MB; anything larger is not one.
const INDEX_LIMIT: u64 = 64 << 20;

/// A block's raw digest.
pub fn digest(block: &Block) -> blake3::Hash {
    // Checked when the index was parsed.
    blake3::Hash::from_hex(&block.blake3).unwrap_or_else(|_| blake3::hash(b""))
}

/// Parses and checks an index's text: the frames must tile the
/// compressed file in order, one per block of the image, and the block
/// size must hold the image's first MiB (which the commit writes last).
pub fn parse(bytes: &[u8]) -> Result<BlockIndex> {
    let invalid = |why: String| Error::ManifestInvalid(format!("block index: {why}"));
    let index: BlockIndex = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
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
    let index = parse(&bytes).map_err(|e| match e {
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
        crate::image::survey::is_zero(raw),
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
        parse(&serde_json::to_vec(index).expect("serialises"))
    }

    #[test]
    fn a_consistent_index_parses_and_its_digests_are_those_of_the_blocks() {
        let good = index(3, 2 * BLOCK_SIZE + 512);
        let back = parsed(&good).expect("valid");
        assert_eq!(back, good);
        assert_eq!(digest(&back.blocks[1]), blake3::hash(b"x"));
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
        assert_eq!(load(&location, &sha256, 4096, &http).expect("loads"), good);
        let other = hex::encode(Sha256::digest(b"other"));
        let err = load(&location, &other, 4096, &http).expect_err("wrong hash");
        assert!(matches!(err, Error::ImageChecksumMismatch { .. }), "{err}");
        let err = load(&location, &sha256, 8192, &http).expect_err("wrong size");
        assert!(err.to_string().contains("the manifest 8192"), "{err}");
    }
}
