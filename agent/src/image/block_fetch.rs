//! Fetching blocks of an image packed with a block index: a run of
//! consecutive blocks in one range request, each frame decoded and checked
//! against the index before anyone sees it.

use crate::image::block_index::{self, BlockIndex};
use crate::image::http::HttpOptions;
use crate::image::ranges::RangeReader;
use crate::image::source::Location;
use crate::{Error, Result};
use std::io::Read;
use std::ops::Range;

/// Runs of blocks longer than this are fetched in several requests, so
/// that one slow request does not hold a whole image.
pub const MAX_RUN_BLOCKS: usize = 64;

/// Takes each fetched block: its number, its frame as fetched, its raw bytes.
pub type EachBlock<'a> = dyn FnMut(usize, &[u8], &[u8]) -> Result<()> + 'a;

/// Fetches runs of blocks from the image's source.
pub struct BlockFetch<'i> {
    reader: RangeReader,
    pub index: &'i BlockIndex,
    /// Encoded bytes fetched.
    pub downloaded: u64,
}

impl<'i> BlockFetch<'i> {
    /// Prepares to fetch blocks of the image at `location`; sends nothing.
    pub fn open(
        location: &Location,
        http: &HttpOptions,
        index: &'i BlockIndex,
    ) -> Result<BlockFetch<'i>> {
        Ok(BlockFetch {
            reader: RangeReader::open(location, http)?,
            index,
            downloaded: 0,
        })
    }

    /// Fetches the consecutive blocks `numbers` in one range, decodes each
    /// and checks it against the index before handing it to `each(number,
    /// frame, raw)`. `Ok(false)`: the source does not honour ranges.
    pub fn run(&mut self, numbers: Range<usize>, each: &mut EachBlock<'_>) -> Result<bool> {
        let blocks = &self.index.blocks[numbers.clone()];
        let (Some(first), Some(last)) = (blocks.first(), blocks.last()) else {
            return Ok(true);
        };
        if !self.reader.select(first.offset..last.frame().end)? {
            return Ok(false);
        }
        let mut decompressor =
            zstd::bulk::Decompressor::new().map_err(|e| Error::io("starting a zstd decoder", e))?;
        let mut frame = Vec::new();
        for (number, block) in numbers.zip(blocks) {
            frame.resize(block.length as usize, 0);
            self.reader
                .read_exact(&mut frame)
                .map_err(|e| Error::from_io(e, &format!("fetching block {number}")))?;
            self.downloaded += block.length;
            let extent = self.index.extent(number);
            let want = (extent.end - extent.start) as usize;
            let raw = decompressor.decompress(&frame, want).map_err(|e| {
                Error::ImageCorrupt(format!("block {number}'s zstd frame does not decode: {e}"))
            })?;
            if raw.len() != want || blake3::hash(&raw) != block_index::digest(block) {
                return Err(Error::ImageCorrupt(format!(
                    "block {number} (bytes {}..{} of the image) decodes to {} bytes that are not \
                     the ones the block index describes",
                    extent.start,
                    extent.end,
                    raw.len()
                )));
            }
            each(number, &frame, &raw)?;
        }
        Ok(true)
    }
}
