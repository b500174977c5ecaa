//! One reimage write, in the order that makes it safe:
//!
//! ```text
//! source → decode → sha256 → sink (first MiB held back, saved ranges refused)
//!   → fsync → hash and size match? → read-back matches?
//!   → first MiB + merged GPT written, read back → BLKRRPART
//! ```
//!
//! Until the last step the disk's partition table holds only the saved
//! partitions, so a corrupt, truncated or half-written image never boots.
//!
//! Decoding, SHA-256 and the disk I/O each run on their own threads
//! ([`MeasuredStream`], [`DiskSink`]): a chunk is written while the same
//! bytes are hashed.
//! The read-back checks every chunk written against an XXH3-128 digest
//! taken from the very bytes the SHA-256 measured ([`WrittenChunks`]),
//! several reads in flight: one SHA-256 pass, and the disk still holds the
//! bytes that hashed to the expected SHA-256.
//!
//! An image with a block index is written by [`delta`] where the target
//! holds data: only the blocks that differ are fetched and written, and the
//! whole extent's SHA-256 is read back from the disk before the same commit.

mod delta;

pub use delta::BlockCounts;

use crate::boot::BootLayout;
use crate::disk::HEAD_LEN;
use crate::disk::device::{Target, TargetKind};
use crate::disk::gpt::TableSectors;
use crate::disk::readback::{self, WrittenChunks};
use crate::disk::reset::{self, CopyOutcome};
use crate::disk::saved::{SaveSpec, SavedPartition, SavedPartitions};
use crate::disk::sink::{self, DiskSink};
use crate::image::block_index::IndexRef;
use crate::image::digest::parse_sha256_hex;
use crate::image::http::HttpOptions;
use crate::image::measure::Measured;
use crate::image::source::{self, Location};
use crate::image::stream::{MeasuredStream, Piece};
use crate::image::{decode, manifest};
use crate::progress::ProgressMeter;
use crate::{Error, Result};
use reimage_protocol::{ImageFormat, Phase, WriteProgress};
use std::cell::Cell;
use std::io::Read;
use std::path::PathBuf;
use std::thread::Scope;
use std::time::{Duration, Instant};

/// The image to write and what it must turn out to be.
#[derive(Debug, Clone)]
pub struct ImageRequest {
    pub location: Location,
    /// Expected SHA-256 of the decoded image, lowercase hex.
    pub sha256: Option<String>,
    /// Expected size of the decoded image.
    pub size: Option<u64>,
    /// Format named by a manifest; the data must agree.
    pub format: Option<ImageFormat>,
    /// The block index the manifest names, if any.
    pub block_index: Option<IndexRef>,
    /// The EFI loader the manifest names (`boot.loader`), if any.
    pub boot_loader: Option<String>,
}

impl ImageRequest {
    /// Builds the request from an image location and/or a manifest and/or
    /// a hash. A manifest supplies what is not given; given values must
    /// agree with it.
    ///
    /// With `trusted_keys`, only a manifest whose signature verifies is
    /// accepted: an image given by URL and hash alone is refused.
    pub fn resolve(
        image: Option<&str>,
        manifest: Option<&str>,
        sha256: Option<&str>,
        http: &HttpOptions,
        trusted_keys: &[String],
    ) -> Result<ImageRequest> {
        let sha256 = sha256
            .map(|text| {
                parse_sha256_hex(text.trim())
                    .map_err(|e| Error::InvalidArgument(format!("sha256 '{text}': {e}")))
            })
            .transpose()?;
        if manifest.is_none() && !trusted_keys.is_empty() {
            return Err(Error::ManifestUnsigned(
                "trusted keys are configured, so the image must come with a signed manifest".into(),
            ));
        }
        let Some(manifest_at) = manifest else {
            let image = image.ok_or_else(|| {
                Error::InvalidArgument("give the image (--image) or a manifest (--manifest)".into())
            })?;
            return Ok(ImageRequest {
                location: Location::parse(image)?,
                sha256,
                size: None,
                format: None,
                block_index: None,
                boot_loader: None,
            });
        };
        let manifest_location = Location::parse(manifest_at)?;
        let (manifest, from_manifest) = manifest::load(&manifest_location, http, trusted_keys)?;
        if let Some(given) = &sha256
            && *given != manifest.sha256
        {
            return Err(Error::InvalidArgument(format!(
                "--sha256 {given} disagrees with the manifest's {}",
                manifest.sha256
            )));
        }
        let location = match image {
            Some(image) => Location::parse(image)?,
            None => from_manifest,
        };
        let block_index = manifest
            .block_index
            .map(|index| {
                Ok::<_, Error>(IndexRef {
                    location: manifest_location.join(&index.url)?,
                    sha256: index.sha256,
                })
            })
            .transpose()?;
        Ok(ImageRequest {
            location,
            sha256: Some(manifest.sha256),
            size: Some(manifest.size),
            format: Some(manifest.format),
            block_index,
            boot_loader: manifest.boot.and_then(|boot| boot.loader),
        })
    }
}

/// Everything one write needs.
#[derive(Debug, Clone)]
pub struct WriteRequest {
    pub image: ImageRequest,
    pub target: PathBuf,
    pub save: SaveSpec,
    /// Read everything written back and compare (on by default).
    pub read_back: bool,
    pub http: HttpOptions,
    /// Read-only mounts of saved partitions that may stay while the target
    /// is written (the shutdown handoff reads its staged image from one);
    /// empty everywhere else, and then the target is opened exclusively.
    pub beside_mounts: Vec<PathBuf>,
}

/// What a successful write did.
#[derive(Debug, Clone)]
pub struct WriteReport {
    pub format: ImageFormat,
    pub size: u64,
    pub sha256: String,
    pub zeroed_bytes: u64,
    pub saved: Vec<SavedPartition>,
    pub elapsed: Duration,
    /// Written through a block index: what was fetched, kept and written.
    pub blocks: Option<BlockCounts>,
    /// The image's EFI system partition and partition GUIDs.
    pub boot: BootLayout,
}

/// A failed write, and whether it got as far as changing the disk (then the
/// disk holds only the saved partitions and no bootable system).
#[derive(Debug)]
pub struct WriteFailure {
    pub error: Error,
    pub disk_touched: bool,
}

impl From<Error> for WriteFailure {
    fn from(error: Error) -> Self {
        WriteFailure {
            error,
            disk_touched: false,
        }
    }
}

/// Streams, verifies and writes the image; see the module docs for the order.
/// On any failure after the disk was touched, the partition table is reset to
/// one holding only the saved partitions.
pub fn write_image(
    request: &WriteRequest,
    report: &mut dyn FnMut(&WriteProgress),
) -> Result<WriteReport, WriteFailure> {
    let started = Instant::now();
    let target = Target::open_for_write_beside(&request.target, &request.beside_mounts)?;
    let job = Job::plan(&target, request)?;
    let mut meter = ProgressMeter::new(report);
    let result = job.run(request, &mut meter);
    let (format, streamed) = match result {
        Ok(done) => done,
        Err(error) => {
            job.reset_after_failure(&error);
            return Err(WriteFailure {
                error,
                disk_touched: job.touched.get(),
            });
        }
    };
    Ok(WriteReport {
        format,
        size: streamed.size,
        sha256: streamed.sha256,
        zeroed_bytes: streamed.zeroed,
        saved: job.saved.iter().cloned().collect(),
        elapsed: started.elapsed(),
        blocks: streamed.blocks,
        boot: BootLayout::of_head(&streamed.head, job.saved.sector_size()),
    })
}

/// What streaming the image produced.
struct Streamed {
    /// The image's first bytes, held back.
    head: Vec<u8>,
    size: u64,
    sha256: String,
    zeroed: u64,
    /// Written through a block index: what was fetched, kept and written.
    blocks: Option<BlockCounts>,
}

/// What streaming wrote, to be read back.
struct Written {
    /// Bytes streamed, the held head included.
    size: u64,
    /// Bytes held back for the commit.
    head_len: u64,
    zeroed: u64,
    /// What each chunk written must read back as.
    chunks: WrittenChunks,
}

/// The measured stream ended without an error or the end of the image: it
/// cannot, short of a panic in one of its threads.
fn stream_cut_off() -> Error {
    Error::io(
        "streaming the image",
        std::io::Error::other("the hashing thread stopped before the end of the image"),
    )
}

/// One write against one opened target.
struct Job<'t> {
    target: &'t Target,
    saved: SavedPartitions,
    /// A regular file that was empty: it grows to the image's size and has
    /// nothing on it to protect or reset.
    growable: bool,
    /// Set once the saved-only table was written: from then on a failure
    /// must leave that table behind.
    touched: Cell<bool>,
}

impl<'t> Job<'t> {
    /// Reads what must be kept.
    fn plan(target: &'t Target, request: &WriteRequest) -> Result<Job<'t>> {
        let growable = target.kind() == TargetKind::File && target.size() == 0;
        let mut table_reader = std::fs::File::open(target.path())
            .map_err(|e| Error::io(format!("opening {}", target.path().display()), e))?;
        let saved = SavedPartitions::find(
            &mut table_reader,
            target.logical_block_size(),
            &request.save,
        )?;
        for partition in saved.iter() {
            tracing::info!(
                index = partition.index,
                label = partition.label(),
                "keeping saved partition"
            );
        }
        Ok(Job {
            target,
            saved,
            growable,
            touched: Cell::new(false),
        })
    }

    fn run(
        &self,
        request: &WriteRequest,
        meter: &mut ProgressMeter<'_>,
    ) -> Result<(ImageFormat, Streamed)> {
        let (format, streamed) = match self.write_changed_blocks(request, meter)? {
            Some(streamed) => (ImageFormat::Zstd, streamed),
            None => self.write_stream(request, meter)?,
        };
        self.commit_table(&streamed, meter)?;
        // The disk holds the verified image and its table now: a kernel
        // that cannot re-read it yet (a partition still open) sees it at the
        // next boot, so this must not undo the write.
        if let Err(err) = self.target.reread_partition_table() {
            tracing::warn!(%err, "the new partition table is written, but the kernel did not re-read it; it takes effect at the next boot");
        }
        meter.phase(Phase::Done, Some(streamed.size));
        Ok((format, streamed))
    }

    /// The whole image streamed, written and read back.
    fn write_stream(
        &self,
        request: &WriteRequest,
        meter: &mut ProgressMeter<'_>,
    ) -> Result<(ImageFormat, Streamed)> {
        let image = &request.image;
        let source = source::open(&image.location, &request.http)?;
        let encoded_length = source.length;
        let (format, decoded) = decode::open_decoder(source.reader)?;
        check_format(image, format)?;
        // A raw stream's length is the image's size: check it up front too.
        let raw_length = encoded_length.filter(|_| format == ImageFormat::Raw);
        self.check_fits(image.size.or(raw_length))?;
        tracing::info!(image = %image.location, %format, "writing image");
        let (written, measured) = self.stream(decoded, image.size, meter)?;
        check_image(measured.size, &measured.sha256, image)?;
        if request.read_back {
            self.read_back(&written, meter)?;
        }
        let streamed = Streamed {
            head: measured.head,
            size: measured.size,
            sha256: measured.sha256,
            zeroed: written.zeroed,
            blocks: None,
        };
        Ok((format, streamed))
    }

    /// Refuses, before anything is written, an image of `size` bytes that
    /// does not fit on the target or would cover a saved partition.
    fn check_fits(&self, size: Option<u64>) -> Result<()> {
        let Some(size) = size else {
            return Ok(());
        };
        if self.growable {
            return self.saved.check_image_extent(size);
        }
        check_image_fits(&self.saved, self.target.size(), size)
    }

    /// decode → outline → sink, with the SHA-256 on its own thread (see
    /// [`MeasuredStream`]); the first MiB is held back, and every chunk
    /// written is recorded for the read-back. Returns once everything but
    /// the head is written and synced and the last chunk is hashed.
    fn stream(
        &self,
        decoded: Box<dyn Read + Send>,
        expected_size: Option<u64>,
        meter: &mut ProgressMeter<'_>,
    ) -> Result<(Written, Measured)> {
        let mut pieces = MeasuredStream::spawn(decoded, expected_size)?;
        let mut chunks = WrittenChunks::new();
        let mut head_len = 0;
        let mut position = 0u64;
        meter.phase(Phase::Downloading, expected_size);
        // The sink's writer threads end with this scope: whatever happens,
        // nothing is still writing once it returns.
        let zeroed = std::thread::scope(|scope| {
            let mut sink: Option<DiskSink<'_>> = None;
            loop {
                match pieces.next_piece().ok_or_else(stream_cut_off)?? {
                    Piece::Head(head) => {
                        self.check_merge(&head, expected_size)?;
                        self.reset_table_before_writing()?;
                        head_len = head.len() as u64;
                        sink = Some(self.sink(scope)?);
                    }
                    Piece::Chunk(chunk) => {
                        let held = (HEAD_LEN as u64).saturating_sub(position);
                        let held = held.min(chunk.len() as u64) as usize;
                        if held < chunk.len() {
                            let sink = sink.as_mut().ok_or_else(stream_cut_off)?;
                            let survey = chunk.survey_from(held);
                            sink.write(&chunk, held, &survey)?;
                            chunks.record_surveyed(position + held as u64, &survey);
                        }
                        position += chunk.len() as u64;
                        meter.update(position);
                    }
                    Piece::End => break,
                }
            }
            // The head always comes before the end, so the sink exists.
            let sink = sink.as_mut().ok_or_else(stream_cut_off)?;
            sink.finish()?;
            Ok::<_, Error>(sink.zeroed_bytes())
        })?;
        // The hashing thread is at most the pool's few chunks behind, and
        // waiting for it frees the pool before the read-back's buffers.
        let measured = pieces.finish()?;
        meter.finish_phase(position);
        let written = Written {
            size: position,
            head_len,
            zeroed,
            chunks,
        };
        Ok((written, measured))
    }

    /// Runs once the head is known, before anything is written: a merge of
    /// the image's table with the saved partitions that cannot work fails
    /// here, with the disk untouched.
    fn check_merge(&self, head: &[u8], expected_size: Option<u64>) -> Result<()> {
        let capacity = (!self.growable).then(|| self.target.size());
        if let Some(disk_size) = capacity.or(expected_size) {
            self.saved.merge_with_image(head, disk_size)?;
        }
        Ok(())
    }

    /// The first write: the table is reset to the saved partitions only, so
    /// nothing that follows can be found or booted until the commit. A file
    /// that grows has no table to reset.
    fn reset_table_before_writing(&self) -> Result<()> {
        if self.growable {
            return Ok(());
        }
        self.touched.set(true);
        self.write_table(&self.saved.saved_only_table(self.target.size())?)?;
        self.target.sync()
    }

    /// The sink for the image's bytes past the held head, its writer
    /// threads in `scope`.
    fn sink<'scope>(&self, scope: &'scope Scope<'scope, 't>) -> Result<DiskSink<'scope>> {
        let capacity = (!self.growable).then(|| self.target.size());
        DiskSink::new(
            scope,
            self.target,
            HEAD_LEN as u64,
            self.saved.protected_ranges(),
            capacity,
        )
    }

    /// Reads everything written back, several reads in flight, and checks
    /// each chunk against what was recorded from the hashed bytes: with the
    /// SHA-256 matched, the disk then holds the bytes that hashed to it.
    fn read_back(&self, written: &Written, meter: &mut ProgressMeter<'_>) -> Result<()> {
        meter.phase(Phase::Verifying, Some(written.size));
        written
            .chunks
            .verify(self.target, meter, written.head_len)?;
        meter.finish_phase(written.size);
        Ok(())
    }

    /// The commit point: the merged table (backup first) and then the held
    /// first MiB, each read back.
    fn commit_table(&self, streamed: &Streamed, meter: &mut ProgressMeter<'_>) -> Result<()> {
        meter.phase(Phase::SavingPartitions, None);
        let disk_size = if self.growable {
            streamed.size
        } else {
            self.target.size()
        };
        let head_len = streamed.head.len() as u64;
        sink::check_write_allowed(
            &(0..head_len),
            &self.saved.protected_ranges(),
            (!self.growable).then_some(disk_size),
        )?;
        let mut head = streamed.head.clone();
        let merged = self.saved.merge_with_image(&head, disk_size)?;
        let beyond = merged
            .as_ref()
            .map(|table| table.overlay_head(&mut head))
            .unwrap_or_default();
        if !self.growable {
            self.clear_stale_reset_table(merged.as_ref(), streamed.size, disk_size)?;
        }
        for (offset, bytes) in &beyond {
            self.target.write_at(bytes, *offset)?;
        }
        self.target.sync()?;
        self.target.write_at(&head, 0)?;
        self.target.sync()?;
        let written = beyond.iter().map(|(o, b)| (*o, b.as_slice()));
        for (offset, bytes) in written.chain([(0, head.as_slice())]) {
            if let Some(at) = readback::first_difference(self.target, offset, bytes)? {
                return Err(Error::ReadbackMismatch(format!(
                    "{} reads back differently at byte {at}",
                    describe_commit_bytes(at, self.saved.sector_size(), disk_size)
                )));
            }
        }
        meter.finish_phase(0);
        Ok(())
    }

    /// The saved-only table written before the stream has a backup copy at
    /// the end of the disk. Sectors of it that neither the image nor the new
    /// table covered would be a stale, valid-looking table: zero them.
    fn clear_stale_reset_table(
        &self,
        merged: Option<&TableSectors>,
        image_size: u64,
        disk_size: u64,
    ) -> Result<()> {
        let sector = self.saved.sector_size();
        let reset = self.saved.saved_only_table(disk_size)?;
        for lba in reset.lbas() {
            let offset = lba * sector;
            let covered = offset < image_size.max(HEAD_LEN as u64)
                || merged.is_some_and(|table| table.contains(lba));
            if !covered {
                self.target.write_at(&vec![0u8; sector as usize], offset)?;
            }
        }
        Ok(())
    }

    fn write_table(&self, table: &TableSectors) -> Result<()> {
        for (offset, bytes) in table.runs() {
            self.target.write_at(&bytes, offset)?;
        }
        Ok(())
    }

    /// After a failure: leave the saved-only table, so the disk holds the
    /// saved partitions and nothing that boots.
    fn reset_after_failure(&self, cause: &Error) {
        if !self.touched.get() {
            return;
        }
        tracing::warn!(
            code = %cause.code(),
            "write failed; resetting the partition table to the saved partitions"
        );
        let table = match self.saved.saved_only_table(self.target.size()) {
            Ok(table) => table,
            Err(err) => {
                tracing::error!(%err, "could not build the saved-only partition table after the failure");
                return;
            }
        };
        let report = reset::reset_to_saved_only(self.target, &table);
        for (copy, outcome) in report.copies() {
            match outcome {
                CopyOutcome::Reset => {}
                CopyOutcome::Spoiled { write } => tracing::warn!(
                    %copy,
                    %write,
                    "the {copy} partition table could not be reset to the saved partitions; its header was zeroed, so it reads as no table"
                ),
                CopyOutcome::Unwritable { write, spoil } => tracing::error!(
                    %copy,
                    %write,
                    %spoil,
                    "the {copy} partition table could neither be reset to the saved partitions nor spoiled: it holds what it held before the reset"
                ),
            }
        }
        if let Err(err) = &report.synced {
            tracing::error!(%err, "the reset partition table may not be durable: the fsync after it failed");
        }
    }
}

/// What the commit wrote at byte `at` of a disk of `disk_size` bytes: the
/// first MiB is the MBR and primary table, then the image's own bytes up to
/// 1 MiB (the gap before the first partition); the end holds the backup.
fn describe_commit_bytes(at: u64, sector_size: u64, disk_size: u64) -> &'static str {
    // A GPT's entries take 16 KiB whatever the sector size.
    let primary_end = 2 * sector_size + 16 * 1024;
    if at < 512 {
        "the protective MBR (with the image's boot code)"
    } else if at < primary_end {
        "the primary partition table"
    } else if at < HEAD_LEN as u64 {
        "the image's bytes between the partition table and 1 MiB"
    } else if at + 16 * 1024 + sector_size >= disk_size {
        "the backup partition table at the end of the disk"
    } else {
        "the partition table"
    }
}

/// The data's format must be the one the manifest named, if it named one.
pub(crate) fn check_format(image: &ImageRequest, format: ImageFormat) -> Result<()> {
    match image.format {
        Some(expected) if expected != format => Err(Error::ImageFormatMismatch {
            expected: expected.to_string(),
            actual: format.to_string(),
        }),
        _ => Ok(()),
    }
}

/// An image of `size` bytes fits on a disk of `disk_size` without covering a
/// saved partition.
pub(crate) fn check_image_fits(saved: &SavedPartitions, disk_size: u64, size: u64) -> Result<()> {
    if size > disk_size {
        return Err(Error::TargetTooSmall {
            needed: size,
            available: disk_size,
        });
    }
    saved.check_image_extent(size)
}

/// The decoded image (`size` bytes hashing to `sha256`) must have the
/// announced size and hash.
pub(crate) fn check_image(size: u64, sha256: &str, image: &ImageRequest) -> Result<()> {
    if let Some(expected) = image.size
        && size != expected
    {
        return Err(Error::ImageTruncated(format!(
            "the image ended after {size} of {expected} bytes"
        )));
    }
    match &image.sha256 {
        Some(expected) if expected != sha256 => Err(Error::ImageChecksumMismatch {
            expected: expected.clone(),
            actual: sha256.to_string(),
        }),
        Some(_) => Ok(()),
        None => {
            tracing::warn!(
                %sha256,
                "no expected SHA-256 was given: the image was checked only for a clean decode and a matching read-back"
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_mismatch_names_the_part_of_the_disk_it_is_in() {
        let disk = 64 << 20;
        assert!(describe_commit_bytes(100, 512, disk).contains("MBR"));
        assert!(describe_commit_bytes(600, 512, disk).contains("primary partition table"));
        assert!(describe_commit_bytes(17_000, 512, disk).contains("primary partition table"));
        let gap = describe_commit_bytes(300_000, 512, disk);
        assert!(gap.starts_with("the image's bytes"), "{gap}");
        assert!(describe_commit_bytes(disk - 100, 512, disk).contains("backup"));
    }
}
