//! Prefetch: the image downloaded, decoded and verified into the staging
//! area ahead of the reimage that writes it, while the node keeps working:
//!
//! ```text
//! resolve (manifest, signature) → claim the image → already staged? done
//!   → reserve room under the budget (evicting) → choose the area
//!   → stage into <sha256>.partial (tee, decode, sha256, size, layout)
//!   → rename to <sha256>.staged, record it
//! ```
//!
//! The staging is the in-place path's ([`crate::handoff::stage`]): an image
//! with a block index is staged with the target as the seed, so a node
//! that holds the previous release downloads only the blocks that changed,
//! and the staged copy keeps an index of its own for the write that
//! follows. Nothing on the target is written.

pub mod store;

use crate::config::Config;
use crate::handoff::stage::{self, Room, StagingSource};
use crate::image::block_index::IndexRef;
use crate::image::http::HttpOptions;
use crate::image::source::{Location, Source};
use crate::ops::image_choice::{ImageChoice, ImageSource};
use crate::pipeline::ImageRequest;
use crate::progress::ProgressMeter;
use crate::{Error, Result};
use jiff::Timestamp;
use reimage_protocol::WriteProgress;
use reimage_protocol::api::{StagedImageInfo, StagingArea};
use std::io::{self, Read};
use std::path::Path;
pub use store::{StagedImages, StagedRecord};

/// Downloads and verifies the image `choice` names into `images` for
/// operation `operation_id`; an image already staged is only noted as
/// asked for again.
pub fn fetch(
    images: &StagedImages,
    config: &Config,
    choice: &ImageChoice,
    http: &HttpOptions,
    operation_id: &str,
    report: &mut dyn FnMut(&WriteProgress),
) -> Result<StagedRecord> {
    let request = choice.resolve(config, http)?;
    let sha256 = request.sha256.clone().ok_or_else(|| {
        Error::InvalidArgument(
            "a prefetched image needs its SHA-256 (inline or from a manifest)".into(),
        )
    })?;
    let claim = images.claim(&sha256);
    if let Some(record) = images.get(&sha256)?
        && images.copy_of(&record).is_some()
    {
        tracing::info!(%sha256, operation = %operation_id, "the image is staged already");
        images.touch(&sha256)?;
        return Ok(record);
    }
    let from = StagingSource::open(&request, http)?;
    let needed = from.needed;
    let allowance = claim.reserve(needed)?;
    let area = stage::choose_area(config.disk.staging, needed, room(images, config)?)?;
    let dir = images.dir(area);
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let partial = images.partial_path(area, &sha256);
    tracing::info!(%sha256, ?area, path = %partial.display(), needed, "prefetching the image");
    // A whole stream is cut off at the allowance; through the index the
    // allowance is the index's own size of the image.
    let from = from.map_source(|source| Source {
        reader: Box::new(Capped {
            inner: source.reader,
            left: allowance,
        }),
        length: source.length,
    });
    let mut meter = ProgressMeter::new(report);
    let stage::Staging {
        staged,
        index_sha256,
        downloaded,
    } = stage::stage(
        &request,
        from,
        http,
        &partial,
        &config.disk.target,
        &config.disk.save_spec(),
        &mut meter,
    )?;
    if let Some(downloaded) = downloaded {
        tracing::info!(%sha256, downloaded, "prefetched through the block index: only the blocks the target lacks were downloaded");
    }
    let staged_bytes = std::fs::metadata(&staged.path)
        .map_err(|e| Error::io(format!("reading {}", staged.path.display()), e))?
        .len();
    let now = Timestamp::now();
    let record = StagedRecord {
        info: StagedImageInfo {
            sha256: staged.sha256,
            name: choice.name(),
            size: staged.size,
            staged_bytes,
            area,
            url: request.location.to_string(),
            manifest_url: match &choice.what {
                ImageSource::Manifest(url) => Some(url.clone()),
                ImageSource::Inline { .. } => None,
            },
            staged_at: now,
            operation_id: operation_id.to_string(),
        },
        format: staged.format,
        last_used: now,
        boot_loader: request.boot_loader.clone(),
        index_sha256,
    };
    claim.commit(&partial, &record)?;
    tracing::info!(sha256 = %record.info.sha256, bytes = staged_bytes, "the image is staged");
    Ok(record)
}

/// What a write reads instead of the image's URL: the staged copy, still
/// held to the image's SHA-256, size and format.
pub fn write_request(images: &StagedImages, record: &StagedRecord) -> Option<ImageRequest> {
    let path = images.copy_of(record)?;
    let block_index = images.index_of(record).map(|(index, sha256)| IndexRef {
        location: Location::File(index),
        sha256,
    });
    Some(ImageRequest {
        location: Location::File(path),
        sha256: Some(record.info.sha256.clone()),
        size: Some(record.info.size),
        format: Some(record.format),
        block_index,
        boot_loader: record.boot_loader.clone(),
    })
}

/// Room in each area. RAM staging is also bounded by the free space of
/// the tmpfs it writes (`/run` is a fraction of RAM).
fn room(images: &StagedImages, config: &Config) -> Result<Room> {
    let mut room = Room::measure(&config.agent.state_dir)?;
    let memory_dir = images.dir(StagingArea::Memory);
    let run = memory_dir
        .ancestors()
        .find(|dir| dir.exists())
        .unwrap_or(Path::new("/"));
    room.memory = match nix::sys::statvfs::statvfs(run) {
        Ok(stat) => room
            .memory
            .min(stat.blocks_available().saturating_mul(stat.fragment_size())),
        Err(_) => 0,
    };
    Ok(room)
}

/// Refuses to read more than the budget left for this download: a server
/// that announced no length cannot overrun it.
struct Capped {
    inner: Box<dyn Read + Send>,
    left: u64,
}

impl Read for Capped {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            Error::StagingSpaceInsufficient(
                "the image is larger than [image] prefetch_budget_mib leaves for it".into(),
            )
            .into_io()
        })?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_download_longer_than_its_allowance_is_refused() {
        let mut within = Capped {
            inner: Box::new(io::Cursor::new(vec![1u8; 100])),
            left: 100,
        };
        let mut all = Vec::new();
        within.read_to_end(&mut all).expect("fits exactly");
        assert_eq!(all.len(), 100);

        let mut beyond = Capped {
            inner: Box::new(io::Cursor::new(vec![1u8; 101])),
            left: 100,
        };
        let err = beyond
            .read_to_end(&mut Vec::new())
            .expect_err("one byte too many");
        assert_eq!(
            Error::from_io(err, "reading").code(),
            reimage_protocol::ErrorCode::StagingSpaceInsufficient
        );
    }
}
