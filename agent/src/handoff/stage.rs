//! Staging: the whole image downloaded, decoded and verified while the old
//! system still runs, so that a bad image fails with the node up and its
//! disk untouched. The encoded stream is kept as fetched (smaller than the
//! raw image) in RAM or on the state filesystem, whichever has room.
//!
//! ```text
//! source → tee (staged file) → decode → sha256, size, head
//!   → hash and size match? → layout fits beside the saved partitions?
//!   → fsync, staged file hashed as stored
//! ```
//!
//! With a block index ([`stage_from_disk`]) the running system's disk is
//! the seed: blocks it already holds are copied from it (re-checked as
//! they are copied) and compressed again, only the others are fetched; the
//! staged file is a whole framed image with an index of its own, verified
//! against the image's SHA-256 like any other.

use crate::boot::BootLayout;
use crate::disk::aligned::AlignedBuf;
use crate::disk::device::Target;
use crate::disk::saved::{SaveSpec, SavedPartitions};
use crate::image::block_fetch::{BlockFetch, MAX_RUN_BLOCKS};
use crate::image::block_index::{self, Block, BlockIndex};
use crate::image::decode;
use crate::image::http::HttpOptions;
use crate::image::measure::{Measure, measure_to_end};
use crate::image::pack::compress_frame;
use crate::image::source::{self, Source};
use crate::pipeline::{self, ImageRequest};
use crate::progress::ProgressMeter;
use crate::{Error, Result};
use reimage_protocol::{ImageFormat, Phase};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Room kept free beyond the staged file, in RAM and on disk alike.
pub const STAGING_HEADROOM: u64 = 64 << 20;
/// Where RAM staging writes: the agent's runtime directory on `/run`
/// (tmpfs), moved into the handoff root by [`super::install`].
pub const MEMORY_STAGING_DIR: &str = "/run/reimage-agent/staging";
/// The staging directory under `state_dir`.
pub const STATE_STAGING_DIR: &str = "staging";

/// `[disk] staging`: where an in-place reimage keeps the image until the
/// handoff writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StagingChoice {
    /// RAM when the image fits in half of the available memory, else the
    /// state filesystem when it has room.
    #[default]
    Auto,
    Memory,
    StateDir,
}

/// Where one image is staged.
pub use reimage_protocol::api::StagingArea;

/// Free room in each area, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Room {
    /// Half of `MemAvailable`: RAM staging must leave the node enough.
    pub memory: u64,
    /// Free space on the state filesystem.
    pub state_dir: u64,
}

impl Room {
    /// Measures both areas now.
    pub fn measure(state_dir: &Path) -> Result<Room> {
        let available = crate::system::memory_available().ok_or_else(|| {
            Error::io(
                "reading /proc/meminfo",
                io::Error::other("no MemAvailable line"),
            )
        })?;
        let stat = nix::sys::statvfs::statvfs(state_dir)
            .map_err(|e| Error::io(format!("statvfs {}", state_dir.display()), e.into()))?;
        Ok(Room {
            memory: available / 2,
            state_dir: stat.blocks_available() as u64 * stat.fragment_size() as u64,
        })
    }
}

/// Picks the area for an image of `needed` staged bytes (the download's
/// length, or failing that the raw size: an upper bound for a compressed
/// image). Fails, naming the room each area has, when none fits.
pub fn choose_area(choice: StagingChoice, needed: Option<u64>, room: Room) -> Result<StagingArea> {
    let fits = |free: u64| needed.is_some_and(|n| n.saturating_add(STAGING_HEADROOM) <= free);
    let refuse = |what: &str| {
        let needed = needed.map_or("an unknown number of".to_string(), |n| n.to_string());
        Err(Error::StagingSpaceInsufficient(format!(
            "{what}: the image needs {needed} bytes plus {STAGING_HEADROOM} to spare; \
             RAM staging has {} (half of MemAvailable), the state filesystem {}",
            room.memory, room.state_dir
        )))
    };
    match choice {
        StagingChoice::Memory if fits(room.memory) => Ok(StagingArea::Memory),
        StagingChoice::Memory => refuse("[disk] staging = \"memory\""),
        // The state filesystem takes an image of unknown size on trust: a
        // full disk fails the staging cleanly, the node still up.
        StagingChoice::StateDir if needed.is_none() || fits(room.state_dir) => {
            Ok(StagingArea::StateDir)
        }
        StagingChoice::StateDir => refuse("[disk] staging = \"state_dir\""),
        StagingChoice::Auto if fits(room.memory) => Ok(StagingArea::Memory),
        StagingChoice::Auto if needed.is_none() || fits(room.state_dir) => {
            Ok(StagingArea::StateDir)
        }
        StagingChoice::Auto => refuse("no staging area has room"),
    }
}

/// A staged, verified image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedImage {
    pub path: PathBuf,
    /// SHA-256 of the staged (still encoded) file.
    pub staged_sha256: String,
    pub format: ImageFormat,
    /// Size and SHA-256 of the decoded image.
    pub size: u64,
    pub sha256: String,
    /// The image's EFI system partition and partition GUIDs.
    pub boot: BootLayout,
}

/// What staging an image reads: its block index when it has one (then the
/// stream is opened only if the server turns out not to honour `Range`),
/// else the whole stream, opened; and the most the staged file takes.
pub struct StagingSource {
    index: Option<BlockIndex>,
    source: Option<Source>,
    /// Bytes the staged file takes at most, when known.
    pub needed: Option<u64>,
}

impl StagingSource {
    /// Loads `image`'s block index (checked against its SHA-256), or opens
    /// its stream: whichever sizes the staging area.
    pub fn open(image: &ImageRequest, http: &HttpOptions) -> Result<StagingSource> {
        let index = match (&image.block_index, image.size) {
            (Some(index), Some(size)) => Some(block_index::load(
                &index.location,
                &index.sha256,
                size,
                http,
            )?),
            _ => None,
        };
        let source = match index {
            Some(_) => None,
            None => Some(source::open(&image.location, http)?),
        };
        let needed = index
            .as_ref()
            .map(BlockIndex::encoded_size)
            .or(source.as_ref().and_then(|s| s.length))
            .or(image.size);
        Ok(StagingSource {
            index,
            source,
            needed,
        })
    }

    /// Wraps the opened stream, if any (a prefetch caps it at its budget).
    pub fn map_source(self, wrap: impl FnOnce(Source) -> Source) -> StagingSource {
        StagingSource {
            source: self.source.map(wrap),
            ..self
        }
    }
}

/// What [`stage`] staged, and how.
#[derive(Debug)]
pub struct Staging {
    pub staged: StagedImage,
    /// Staged through the block index: the SHA-256 of the staged file's own
    /// index, beside it ([`staged_index_path`]).
    pub index_sha256: Option<String>,
    /// Staged through the block index: the encoded bytes fetched.
    pub downloaded: Option<u64>,
}

/// Stages `image` into `dest`: through its block index, with the target as
/// the seed, when it has one and the server honours `Range`; else the whole
/// stream. The one home of that choice, for the in-place path and for
/// prefetching.
pub fn stage(
    image: &ImageRequest,
    from: StagingSource,
    http: &HttpOptions,
    dest: &Path,
    target: &Path,
    save: &SaveSpec,
    meter: &mut ProgressMeter<'_>,
) -> Result<Staging> {
    let StagingSource { index, source, .. } = from;
    if let Some(index) = &index {
        let mut fetch = BlockFetch::open(&image.location, http, index)?;
        match stage_from_disk(&mut fetch, image, dest, target, save, meter)? {
            Some((staged, index_sha256)) => {
                tracing::info!(
                    downloaded = fetch.downloaded,
                    staged_bytes = std::fs::metadata(&staged.path).map_or(0, |m| m.len()),
                    "staged through the block index, the disk as the seed"
                );
                return Ok(Staging {
                    staged,
                    index_sha256: Some(index_sha256),
                    downloaded: Some(fetch.downloaded),
                });
            }
            None => {
                tracing::info!(image = %image.location, "staging the whole image: the server does not honour Range requests");
            }
        }
    }
    let source = match source {
        Some(source) => source,
        None => source::open(&image.location, http)?,
    };
    Ok(Staging {
        staged: stage_image(source, image, dest, target, save, meter)?,
        index_sha256: None,
        downloaded: None,
    })
}

/// Streams `source` into the file `dest` while decoding and verifying it
/// against `image`, and checks that its layout fits `target` beside the
/// saved partitions. Nothing on `target` is written. On failure `dest` is
/// removed.
fn stage_image(
    source: Source,
    image: &ImageRequest,
    dest: &Path,
    target: &Path,
    save: &SaveSpec,
    meter: &mut ProgressMeter<'_>,
) -> Result<StagedImage> {
    let (disk_size, saved) = SavedPartitions::read_from_target(target, save)?;
    if let Some(size) = image.size {
        pipeline::check_image_fits(&saved, disk_size, size)?;
    }
    let staged = stage_and_verify(source, image, dest, meter).and_then(|decoded| {
        pipeline::check_image_fits(&saved, disk_size, decoded.size)?;
        saved.merge_with_image(&decoded.head, disk_size)?;
        let (staged_sha256, _) = hash_file(dest)?;
        Ok(StagedImage {
            path: dest.to_path_buf(),
            staged_sha256,
            format: decoded.format,
            size: decoded.size,
            boot: BootLayout::of_head(&decoded.head, saved.sector_size()),
            sha256: decoded.sha256,
        })
    });
    if staged.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    staged
}

/// Stages the image of `index` into `dest` with the target as the seed:
/// each block that the target holds (its BLAKE3 is the index's when it is
/// read for the copy) is compressed from the disk, the others are fetched
/// by `fetch`, coalesced. Writes the staged file's own index beside it
/// ([`staged_index_path`]) and returns its SHA-256 with the staged image.
/// `Ok(None)`: the source does not honour `Range` (nothing staged). Nothing
/// on `target` is written; on failure `dest` and its index are removed.
fn stage_from_disk(
    fetch: &mut BlockFetch<'_>,
    image: &ImageRequest,
    dest: &Path,
    target: &Path,
    save: &SaveSpec,
    meter: &mut ProgressMeter<'_>,
) -> Result<Option<(StagedImage, String)>> {
    let (disk_size, saved) = SavedPartitions::read_from_target(target, save)?;
    let index = fetch.index;
    pipeline::check_image_fits(&saved, disk_size, index.image_size)?;
    let staged = seed_and_fetch(fetch, image, dest, target, meter).and_then(|seeded| {
        let Some((decoded, local)) = seeded else {
            return Ok(None);
        };
        saved.merge_with_image(&decoded.head, disk_size)?;
        let text = serde_json::to_vec(&local)
            .map_err(|e| Error::io("serialising the staged block index", io::Error::other(e)))?;
        let index_path = staged_index_path(dest);
        std::fs::write(&index_path, &text)
            .and_then(|()| File::open(&index_path)?.sync_all())
            .map_err(|e| Error::io(format!("writing {}", index_path.display()), e))?;
        let (staged_sha256, _) = hash_file(dest)?;
        Ok(Some((
            StagedImage {
                path: dest.to_path_buf(),
                staged_sha256,
                format: ImageFormat::Zstd,
                size: decoded.size,
                boot: BootLayout::of_head(&decoded.head, saved.sector_size()),
                sha256: decoded.sha256,
            },
            hex::encode(Sha256::digest(&text)),
        )))
    });
    if !matches!(staged, Ok(Some(_))) {
        let _ = std::fs::remove_file(dest);
        let _ = std::fs::remove_file(staged_index_path(dest));
    }
    staged
}

/// Where the staged file's own block index is: beside it, named as
/// `image pack` names an index.
pub fn staged_index_path(staged: &Path) -> PathBuf {
    crate::image::pack::index_path(staged)
}

/// The staged file written block by block, from the disk or fetched, with
/// the SHA-256 and head of the raw image and the staged file's index.
fn seed_and_fetch(
    fetch: &mut BlockFetch<'_>,
    image: &ImageRequest,
    dest: &Path,
    target: &Path,
    meter: &mut ProgressMeter<'_>,
) -> Result<Option<(Decoded, BlockIndex)>> {
    let index = fetch.index;
    let disk = Target::open_read_only(target)?;
    let mut out = BufWriter::with_capacity(
        1 << 20,
        File::create(dest).map_err(|e| Error::io(format!("creating {}", dest.display()), e))?,
    );
    let mut measure = Measure::new(Some(index.image_size));
    let mut local = BlockIndex {
        blocks: Vec::with_capacity(index.blocks.len()),
        ..index.clone()
    };
    meter.phase(Phase::Staging, Some(index.image_size));
    let mut append = |number: usize, frame: &[u8], raw: &[u8]| -> Result<()> {
        out.write_all(frame)
            .map_err(|e| Error::io(format!("writing the staged image {}", dest.display()), e))?;
        measure.update(raw)?;
        let offset = local.encoded_size();
        local.blocks.push(Block {
            offset,
            length: frame.len() as u64,
            ..index.blocks[number].clone()
        });
        meter.update(measure.size());
        Ok(())
    };
    let mut buffer = AlignedBuf::new(index.block_size as usize);
    // Reads block `number` of the disk into `buffer`: does it hold it?
    let read_holds = |number: usize, buffer: &mut AlignedBuf| -> Result<bool> {
        let extent = index.extent(number);
        buffer.set_len((extent.end - extent.start) as usize);
        disk.read_at(&mut buffer[..], extent.start)?;
        Ok(blake3::hash(buffer) == block_index::digest(&index.blocks[number]))
    };
    let copy = |number: usize, raw: &[u8]| {
        compress_frame(raw, SEED_LEVEL)
            .map_err(|e| Error::io(format!("compressing block {number} of the disk"), e))
    };
    let mut number = 0;
    while number < index.blocks.len() {
        if read_holds(number, &mut buffer)? {
            append(number, &copy(number, &buffer)?, &buffer)?;
            number += 1;
            continue;
        }
        // The block differs: fetch it with the differing blocks after it.
        // The block that ends the run is in `buffer` then, and held.
        let mut end = number + 1;
        let mut held_after = false;
        while end < index.blocks.len() && end - number < MAX_RUN_BLOCKS {
            if read_holds(end, &mut buffer)? {
                held_after = true;
                break;
            }
            end += 1;
        }
        if !fetch.run(number..end, &mut append)? {
            return Ok(None);
        }
        if held_after {
            append(end, &copy(end, &buffer)?, &buffer)?;
            end += 1;
        }
        number = end;
    }
    out.flush()
        .map_err(|e| Error::io(format!("writing the staged image {}", dest.display()), e))?;
    drop(out);
    let measured = measure.finish();
    meter.finish_phase(measured.size);
    pipeline::check_image(measured.size, &measured.sha256, image)?;
    sync_file(dest)?;
    Ok(Some((
        Decoded {
            format: ImageFormat::Zstd,
            size: measured.size,
            sha256: measured.sha256,
            head: measured.head,
        },
        local,
    )))
}

/// Blocks copied from the disk are compressed fast: they are staged, not
/// served to a fleet.
const SEED_LEVEL: i32 = 1;

/// What decoding the staged stream found.
struct Decoded {
    format: ImageFormat,
    size: u64,
    sha256: String,
    head: Vec<u8>,
}

fn stage_and_verify(
    source: Source,
    image: &ImageRequest,
    dest: &Path,
    meter: &mut ProgressMeter<'_>,
) -> Result<Decoded> {
    let file =
        File::create(dest).map_err(|e| Error::io(format!("creating {}", dest.display()), e))?;
    let tee = Tee {
        inner: source.reader,
        copy: BufWriter::with_capacity(1 << 20, file),
        dest: dest.to_path_buf(),
    };
    let (format, mut decoded) = decode::open_decoder(tee)?;
    pipeline::check_format(image, format)?;
    meter.phase(Phase::Staging, image.size);
    let measured = measure_to_end(&mut decoded, image.size, &mut |size| meter.update(size))?;
    meter.finish_phase(measured.size);
    pipeline::check_image(measured.size, &measured.sha256, image)?;
    // The decoder read its input to the end (trailing data is refused), so
    // the staged file holds the whole stream: flush and persist it.
    drop(decoded);
    sync_file(dest)?;
    Ok(Decoded {
        format,
        size: measured.size,
        sha256: measured.sha256,
        head: measured.head,
    })
}

/// Copies what it reads into the staged file.
struct Tee {
    inner: Box<dyn Read + Send>,
    copy: BufWriter<File>,
    dest: PathBuf,
}

impl Read for Tee {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 {
            self.copy.flush()
        } else {
            self.copy.write_all(&buf[..n])
        }
        .map_err(|e| {
            Error::io(
                format!("writing the staged image {}", self.dest.display()),
                e,
            )
            .into_io()
        })?;
        Ok(n)
    }
}

fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(format!("syncing {}", path.display()), e))
}

/// SHA-256 and length of a file, read as stored.
pub fn hash_file(path: &Path) -> Result<(String, u64)> {
    let mut file =
        File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let mut hasher = Sha256::new();
    let len = io::copy(&mut file, &mut hasher)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    Ok((hex::encode(hasher.finalize()), len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::source::Location;
    use reimage_protocol::ErrorCode;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_area_follows_the_choice_and_the_room() {
        let room = Room {
            memory: 512 * MIB,
            state_dir: 4096 * MIB,
        };
        let auto = |needed| choose_area(StagingChoice::Auto, needed, room).map_err(|e| e.code());
        assert_eq!(auto(Some(100 * MIB)), Ok(StagingArea::Memory));
        assert_eq!(auto(Some(1000 * MIB)), Ok(StagingArea::StateDir));
        assert_eq!(auto(None), Ok(StagingArea::StateDir), "unknown size: disk");
        assert_eq!(
            auto(Some(4096 * MIB)),
            Err(ErrorCode::StagingSpaceInsufficient)
        );
        let memory = choose_area(StagingChoice::Memory, Some(1000 * MIB), room);
        let err = memory.expect_err("too big for RAM");
        assert!(err.to_string().contains("memory"), "{err}");
        assert_eq!(
            choose_area(StagingChoice::StateDir, Some(100 * MIB), room).ok(),
            Some(StagingArea::StateDir)
        );
        assert!(choose_area(StagingChoice::Memory, None, room).is_err());
    }

    struct Setup {
        dir: tempfile::TempDir,
        image: Vec<u8>,
        packed: PathBuf,
        target: PathBuf,
        target_sha: String,
    }

    /// A 3 MiB image with random bytes packed as zstd, and a 16 MiB target.
    fn setup() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut image = vec![0u8; 3 * MIB as usize];
        fastrand::Rng::with_seed(7).fill(&mut image[..2 * MIB as usize]);
        let packed = dir.path().join("os.img.zst");
        std::fs::write(&packed, zstd::encode_all(&image[..], 1).expect("zstd")).expect("packed");
        let target = dir.path().join("disk.img");
        let mut disk = vec![0u8; 16 * MIB as usize];
        fastrand::Rng::with_seed(8).fill(&mut disk);
        std::fs::write(&target, &disk).expect("target");
        let target_sha = hex::encode(Sha256::digest(&disk));
        Setup {
            dir,
            image,
            packed,
            target,
            target_sha,
        }
    }

    impl Setup {
        fn stage(&self, sha256: &str) -> Result<StagedImage> {
            let location = Location::File(self.packed.clone());
            let source = crate::image::source::open(&location, &Default::default())?;
            let request = ImageRequest {
                location,
                sha256: Some(sha256.to_string()),
                size: Some(self.image.len() as u64),
                format: Some(ImageFormat::Zstd),
                block_index: None,
                boot_loader: None,
            };
            let mut report = |_: &reimage_protocol::WriteProgress| {};
            let mut meter = ProgressMeter::new(&mut report);
            let dest = self.dir.path().join("staged.zst");
            stage_image(
                source,
                &request,
                &dest,
                &self.target,
                &SaveSpec::default(),
                &mut meter,
            )
        }

        fn target_unchanged(&self) -> bool {
            hash_file(&self.target).expect("target").0 == self.target_sha
        }
    }

    /// v1 (three random blocks and a short one) on a 32 MiB target, and
    /// v2 (v1 with block 2 changed) packed with a block index.
    struct Seeded {
        dir: tempfile::TempDir,
        v2: Vec<u8>,
        packed: PathBuf,
        index: BlockIndex,
        target: PathBuf,
        target_sha: String,
    }

    fn seeded() -> Seeded {
        use crate::image::block_index::BLOCK_SIZE;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut v1 = vec![0u8; (3 * BLOCK_SIZE + 5000) as usize];
        fastrand::Rng::with_seed(21).fill(&mut v1);
        let mut v2 = v1.clone();
        fastrand::Rng::with_seed(22)
            .fill(&mut v2[2 * BLOCK_SIZE as usize + 100..2 * BLOCK_SIZE as usize + 9000]);
        let raw = dir.path().join("v2.img");
        std::fs::write(&raw, &v2).expect("raw");
        let packed = dir.path().join("v2.img.zst");
        let options = crate::image::pack::PackOptions {
            level: 1,
            block_index: true,
        };
        crate::image::pack::pack(&raw, &packed, options).expect("packs");
        let text = std::fs::read(crate::image::pack::index_path(&packed)).expect("index");
        let index = block_index::parse(&text).expect("index");
        let target = dir.path().join("disk.img");
        let mut disk = v1.clone();
        disk.resize(32 * MIB as usize, 0x77);
        std::fs::write(&target, &disk).expect("target");
        let target_sha = hex::encode(Sha256::digest(&disk));
        Seeded {
            dir,
            v2,
            packed,
            index,
            target,
            target_sha,
        }
    }

    impl Seeded {
        fn stage(&self, index: &BlockIndex) -> (Result<Option<(StagedImage, String)>>, u64) {
            let location = Location::File(self.packed.clone());
            let request = ImageRequest {
                location: location.clone(),
                sha256: Some(hex::encode(Sha256::digest(&self.v2))),
                size: Some(self.v2.len() as u64),
                format: Some(ImageFormat::Zstd),
                block_index: None,
                boot_loader: None,
            };
            let mut fetch = BlockFetch::open(&location, &Default::default(), index).expect("opens");
            let mut report = |_: &reimage_protocol::WriteProgress| {};
            let mut meter = ProgressMeter::new(&mut report);
            let dest = self.dir.path().join("staged.img");
            let staged = stage_from_disk(
                &mut fetch,
                &request,
                &dest,
                &self.target,
                &SaveSpec::default(),
                &mut meter,
            );
            (staged, fetch.downloaded)
        }
    }

    #[test]
    fn staging_through_the_index_fetches_only_what_the_disk_lacks_and_stages_a_whole_image() {
        let seeded = seeded();
        let (staged, downloaded) = seeded.stage(&seeded.index);
        let (staged, index_sha256) = staged.expect("stages").expect("ranges work");
        assert_eq!(
            downloaded, seeded.index.blocks[2].length,
            "only block 2 was fetched"
        );
        assert_eq!(staged.sha256, hex::encode(Sha256::digest(&seeded.v2)));
        let file = File::open(&staged.path).expect("staged");
        let (_, mut decoded) = decode::open_decoder(file).expect("zstd");
        let mut bytes = Vec::new();
        decoded.read_to_end(&mut bytes).expect("decodes");
        assert!(bytes == seeded.v2, "the staged file is the whole of v2");
        let text = std::fs::read(staged_index_path(&staged.path)).expect("its index");
        assert_eq!(index_sha256, hex::encode(Sha256::digest(&text)));
        let local = block_index::parse(&text).expect("a valid index");
        assert_eq!(local.encoded_size(), staged_len(&staged.path));
        assert_eq!(
            hash_file(&seeded.target).expect("target").0,
            seeded.target_sha
        );

        // The shutdown write through that index writes block 2 and the head.
        let request = crate::pipeline::WriteRequest {
            image: ImageRequest {
                location: Location::File(staged.path.clone()),
                sha256: Some(staged.sha256.clone()),
                size: Some(staged.size),
                format: Some(ImageFormat::Zstd),
                block_index: Some(crate::image::block_index::IndexRef {
                    location: Location::File(staged_index_path(&staged.path)),
                    sha256: index_sha256,
                }),
                boot_loader: None,
            },
            target: seeded.target.clone(),
            save: SaveSpec::default(),
            read_back: true,
            http: Default::default(),
            beside_mounts: Vec::new(),
        };
        let report = crate::pipeline::write_image(&request, &mut |_| {}).expect("writes");
        let blocks = report.blocks.expect("through the index");
        assert_eq!(
            blocks.written,
            crate::disk::HEAD_LEN as u64 + 3 * MIB + seeded.index.extent(2).end
                - seeded.index.extent(2).start
        );
        let disk = std::fs::read(&seeded.target).expect("target");
        assert!(
            disk[..seeded.v2.len()] == seeded.v2[..],
            "the disk holds v2"
        );
    }

    #[test]
    fn a_fetched_block_that_is_not_the_indexed_one_fails_staging_and_leaves_nothing() {
        let seeded = seeded();
        let mut wrong = seeded.index.clone();
        wrong.blocks[2].blake3 = "ab".repeat(32);
        let (staged, _) = seeded.stage(&wrong);
        let err = staged.expect_err("a wrong block");
        assert_eq!(err.code(), "ImageCorrupt", "{err}");
        assert!(!seeded.dir.path().join("staged.img").exists());
        assert!(!staged_index_path(&seeded.dir.path().join("staged.img")).exists());
        assert_eq!(
            hash_file(&seeded.target).expect("target").0,
            seeded.target_sha
        );
    }

    fn staged_len(path: &Path) -> u64 {
        std::fs::metadata(path).expect("staged").len()
    }

    #[test]
    fn a_good_image_is_staged_as_fetched_and_the_target_is_untouched() {
        let setup = setup();
        let sha = hex::encode(Sha256::digest(&setup.image));
        let staged = setup.stage(&sha).expect("stages");
        assert_eq!(staged.sha256, sha);
        assert_eq!(staged.size, setup.image.len() as u64);
        assert_eq!(
            std::fs::read(&staged.path).expect("staged"),
            std::fs::read(&setup.packed).expect("packed"),
            "the staged file is the stream as fetched"
        );
        assert_eq!(
            staged.staged_sha256,
            hash_file(&setup.packed).expect("hash").0
        );
        assert!(setup.target_unchanged());
    }

    #[test]
    fn a_wrong_hash_fails_staging_and_leaves_no_staged_file() {
        let setup = setup();
        let err = setup.stage(&"0".repeat(64)).expect_err("wrong hash");
        assert_eq!(err.code(), "ImageChecksumMismatch");
        assert!(!setup.dir.path().join("staged.zst").exists());
        assert!(setup.target_unchanged());
    }

    #[test]
    fn an_image_larger_than_the_target_fails_before_it_is_fetched() {
        let setup = setup();
        std::fs::write(&setup.target, vec![0u8; MIB as usize]).expect("small target");
        let sha = hex::encode(Sha256::digest(&setup.image));
        let err = setup.stage(&sha).expect_err("too big");
        assert_eq!(err.code(), "TargetTooSmall");
    }
}
