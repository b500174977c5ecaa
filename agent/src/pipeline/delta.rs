//! A write with a block index: fetch and write only the blocks that differ.
//!
//! ```text
//! index (SHA-256 from the manifest) → block 0 by Range (the held head)
//!   → compare: each block of the target's image extent against the index
//!   → saved-only table → differing blocks by Range (runs coalesced),
//!     each decoded and checked against the index, written; zero blocks zeroed
//!   → fsync → read-back of what was written
//!   → SHA-256 of the whole image extent (held head + disk) = the manifest's?
//!   → [commit: first MiB + merged table, as a full write]
//! ```
//!
//! The whole-image SHA-256 is read from the disk after the last write, so
//! the result is exactly as safe as a full write: a block that changed on
//! the disk after the comparison is found (once, and fetched again), and an
//! index that describes another image fails the write. Nothing is written
//! before the head was fetched with `Range`: a server that does not honour
//! it leaves the write to stream the whole image.

use super::{Job, Streamed, WriteRequest, check_image, stream_cut_off};
use crate::disk::HEAD_LEN;
use crate::disk::readback::{self, WrittenChunks};
use crate::disk::sink;
use crate::image::block_fetch::{BlockFetch, MAX_RUN_BLOCKS};
use crate::image::block_index::{self, BlockIndex, IndexRef};
use crate::image::measure::Measure;
use crate::progress::ProgressMeter;
use crate::{Error, Result};
use reimage_protocol::{ImageFormat, Phase};
use std::ops::Range;

/// The final pass reads the extent in pieces of this size.
const READ_PIECE: u64 = 4 << 20;

/// What a write with a block index moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockCounts {
    /// Encoded bytes fetched from the image's source.
    pub downloaded: u64,
    /// Raw bytes the target already held, neither fetched nor written.
    pub unchanged: u64,
    /// Raw bytes written (zeroed blocks included).
    pub written: u64,
}

impl Job<'_> {
    /// Writes the image through its block index when it has one and the
    /// target holds data to compare with. `Ok(None)`: the image must be
    /// streamed whole instead (the log says why); nothing was written.
    pub(super) fn write_changed_blocks(
        &self,
        request: &WriteRequest,
        meter: &mut ProgressMeter<'_>,
    ) -> Result<Option<Streamed>> {
        let image = &request.image;
        let fall_back = |why: &str| {
            tracing::info!(image = %image.location, "streaming the whole image: {why}");
            Ok(None)
        };
        let Some(index_ref) = &image.block_index else {
            return Ok(None);
        };
        if self.growable {
            return fall_back("the target is empty, so no block can be kept");
        }
        if image
            .format
            .is_some_and(|format| format != ImageFormat::Zstd)
        {
            return fall_back("a block index needs a zstd image");
        }
        let index = self.load_index(index_ref, request)?;
        self.check_fits(Some(index.image_size))?;
        let mut fetch = BlockFetch::open(&image.location, &request.http, &index)?;
        meter.phase(Phase::Downloading, None);
        let Some(block0) = fetch_block0(&mut fetch)? else {
            return fall_back("the server does not honour Range requests");
        };
        let head = &block0[..block0.len().min(HEAD_LEN)];
        self.check_merge(head, Some(index.image_size))?;
        tracing::info!(image = %image.location, blocks = index.blocks.len(), "comparing the target with the image's block index");
        let mut holds = self.compare(&index, meter)?;
        self.reset_table_before_writing()?;
        let mut writer = BlockWriter {
            job: self,
            written: WrittenChunks::new(),
            bytes: 0,
        };
        let wanted = differing(&holds);
        writer.write_and_read_back(&mut fetch, &wanted, Some(&block0), meter)?;
        let mut sha256 = self.measure_extent(head, index.image_size, meter)?;
        if image
            .sha256
            .as_ref()
            .is_some_and(|expected| *expected != sha256)
        {
            // A block changed on the disk after the comparison, or the index
            // describes another image: find out which, and fetch once more.
            let stale = differing(&self.compare(&index, meter)?);
            if stale.is_empty() {
                return Err(Error::ImageCorrupt(format!(
                    "every block of the disk matches the block index, but the image extent's \
                     SHA-256 is {sha256}: the index describes another image"
                )));
            }
            tracing::warn!(blocks = ?stale, "blocks changed on the disk after they were compared; fetching them again");
            writer.written = WrittenChunks::new();
            writer.write_and_read_back(&mut fetch, &stale, None, meter)?;
            for &number in &stale {
                holds[number] = false;
            }
            sha256 = self.measure_extent(head, index.image_size, meter)?;
        }
        check_image(index.image_size, &sha256, image)?;
        let counts = BlockCounts {
            downloaded: fetch.downloaded,
            unchanged: index.extents_len(&kept(&holds)),
            // The held head is written by the commit.
            written: writer.bytes + head.len() as u64,
        };
        crate::metrics::global()
            .bytes_unchanged
            .inc_by(counts.unchanged);
        tracing::info!(
            downloaded = counts.downloaded,
            unchanged = counts.unchanged,
            written = counts.written,
            "wrote the blocks that differ"
        );
        Ok(Some(Streamed {
            head: head.to_vec(),
            size: index.image_size,
            sha256,
            zeroed: 0,
            blocks: Some(counts),
        }))
    }

    fn load_index(&self, index_ref: &IndexRef, request: &WriteRequest) -> Result<BlockIndex> {
        let size = request.image.size.ok_or_else(|| {
            Error::ManifestInvalid(
                "a manifest with a block index must give the image's size".into(),
            )
        })?;
        block_index::load(&index_ref.location, &index_ref.sha256, size, &request.http)
    }

    /// Which blocks the target already holds: each block of the image
    /// extent past block 0 (which is always fetched, for the head) read,
    /// several reads in flight, and its BLAKE3 compared with the index's.
    fn compare(&self, index: &BlockIndex, meter: &mut ProgressMeter<'_>) -> Result<Vec<bool>> {
        meter.phase(Phase::Comparing, Some(index.image_size));
        let extents: Vec<_> = (1..index.blocks.len()).map(|n| index.extent(n)).collect();
        let mut holds = vec![false; index.blocks.len()];
        let mut done = 0;
        readback::read_each(
            self.target,
            &extents,
            &|i, bytes| Ok(blake3::hash(bytes) == block_index::digest(&index.blocks[i + 1])),
            &mut |i, len, same| {
                holds[i + 1] = same;
                done += len;
                meter.update(done);
            },
        )?;
        meter.finish_phase(done);
        Ok(holds)
    }

    /// The SHA-256 of the image as the disk now holds it: the held `head`,
    /// then the extent past it read from the disk, several reads in flight
    /// ahead of the hashing.
    fn measure_extent(
        &self,
        head: &[u8],
        size: u64,
        meter: &mut ProgressMeter<'_>,
    ) -> Result<String> {
        meter.phase(Phase::Verifying, Some(size));
        let mut measure = Measure::new(Some(size));
        measure.update(head)?;
        let extents: Vec<_> = (head.len() as u64..size)
            .step_by(READ_PIECE as usize)
            .map(|start| start..(start + READ_PIECE).min(size))
            .collect();
        readback::read_in_order(self.target, &extents, &mut |_, bytes| {
            measure.update(bytes)?;
            meter.update(measure.size());
            Ok(())
        })?;
        let measured = measure.finish();
        meter.finish_phase(measured.size);
        Ok(measured.sha256)
    }
}

/// Block 0, which holds the head the commit writes: fetched first, and
/// checked against the index like every block. `None`: the source does
/// not honour ranges.
fn fetch_block0(fetch: &mut BlockFetch<'_>) -> Result<Option<Vec<u8>>> {
    let mut block0 = None;
    let honoured = fetch.run(0..1, &mut |_, _, raw| {
        block0 = Some(raw.to_vec());
        Ok(())
    })?;
    if !honoured {
        return Ok(None);
    }
    block0.ok_or_else(stream_cut_off).map(Some)
}

/// The blocks past block 0 that the target does not hold.
fn differing(holds: &[bool]) -> Vec<usize> {
    (1..holds.len()).filter(|&n| !holds[n]).collect()
}

/// The blocks past block 0 that the target holds.
fn kept(holds: &[bool]) -> Vec<usize> {
    (1..holds.len()).filter(|&n| holds[n]).collect()
}

/// Writes blocks of the image to the target and records them for the
/// read-back.
struct BlockWriter<'j, 't> {
    job: &'j Job<'t>,
    written: WrittenChunks,
    /// Raw bytes written.
    bytes: u64,
}

impl BlockWriter<'_, '_> {
    /// Writes `block0` (when given, past the held head) and the blocks
    /// `numbers`, syncs, and reads back what was written.
    fn write_and_read_back(
        &mut self,
        fetch: &mut BlockFetch<'_>,
        numbers: &[usize],
        block0: Option<&[u8]>,
        meter: &mut ProgressMeter<'_>,
    ) -> Result<()> {
        let index = fetch.index;
        let block0_tail = block0.map_or(0, |raw| raw.len().saturating_sub(HEAD_LEN) as u64);
        let before = self.bytes;
        meter.phase(
            Phase::Downloading,
            Some(block0_tail + index.extents_len(numbers)),
        );
        if let Some(raw) = block0 {
            self.write_block(index, 0, raw)?;
        }
        self.write_blocks(fetch, numbers, meter, block0_tail)?;
        self.job.target.sync()?;
        meter.finish_phase(self.bytes - before);
        meter.phase(Phase::Verifying, Some(self.written.bytes()));
        self.written.verify(self.job.target, meter, 0)?;
        meter.finish_phase(self.written.bytes());
        Ok(())
    }

    /// Writes the blocks `numbers` (ascending): zero blocks by zeroing,
    /// the others fetched in runs of consecutive blocks. Progress counts on
    /// from `done`.
    fn write_blocks(
        &mut self,
        fetch: &mut BlockFetch<'_>,
        numbers: &[usize],
        meter: &mut ProgressMeter<'_>,
        mut done: u64,
    ) -> Result<()> {
        let index = fetch.index;
        let mut rest = numbers;
        while let Some(&first) = rest.first() {
            if index.blocks[first].zero {
                self.zero_block(index, first)?;
                done += index.extents_len(&[first]);
                meter.update(done);
                rest = &rest[1..];
                continue;
            }
            let run = rest
                .iter()
                .take(MAX_RUN_BLOCKS)
                .enumerate()
                .take_while(|&(i, &n)| n == first + i && !index.blocks[n].zero)
                .count();
            let honoured = fetch.run(first..first + run, &mut |number, _, raw| {
                self.write_block(index, number, raw)?;
                done += raw.len() as u64;
                meter.update(done);
                Ok(())
            })?;
            if !honoured {
                return Err(Error::DownloadFailed(
                    "the server stopped honouring Range requests in the middle of the write".into(),
                ));
            }
            rest = &rest[run..];
        }
        Ok(())
    }

    /// Writes block `number`'s raw bytes, past the held head for block 0.
    fn write_block(&mut self, index: &BlockIndex, number: usize, raw: &[u8]) -> Result<()> {
        let start = index.extent(number).start;
        let skip = (HEAD_LEN as u64)
            .saturating_sub(start)
            .min(raw.len() as u64) as usize;
        let (offset, bytes) = (start + skip as u64, &raw[skip..]);
        if bytes.is_empty() {
            return Ok(());
        }
        self.check_allowed(offset..offset + bytes.len() as u64)?;
        self.job.target.write_at(bytes, offset)?;
        self.written.record(offset, bytes);
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    fn zero_block(&mut self, index: &BlockIndex, number: usize) -> Result<()> {
        let extent = index.extent(number);
        let start = extent.start.max(HEAD_LEN as u64);
        if start >= extent.end {
            return Ok(());
        }
        self.check_allowed(start..extent.end)?;
        self.job.target.zero_range(start, extent.end - start)?;
        self.written.record_zeros(start, extent.end - start);
        self.bytes += extent.end - start;
        Ok(())
    }

    /// Saved partitions are never written, whatever the index says.
    fn check_allowed(&self, range: Range<u64>) -> Result<()> {
        sink::check_write_allowed(
            &range,
            &self.job.saved.protected_ranges(),
            Some(self.job.target.size()),
        )
    }
}
