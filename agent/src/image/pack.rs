//! `image pack`: compress a raw image and write its manifest beside it.

use crate::image::block_index::{self, BLOCK_SIZE, Block, BlockIndex};
use crate::image::measure::ImageSha256;
use crate::{Error, Result};
use reimage_protocol::{BlockIndexRef, ImageFormat, ImageManifest};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// The format an output name asks for: `.zst`, `.gz`, `.xz`, or raw.
pub fn format_for(output: &Path) -> Result<ImageFormat> {
    let ext = output.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "zst" | "zstd" => Ok(ImageFormat::Zstd),
        "gz" => Ok(ImageFormat::Gzip),
        "xz" => Ok(ImageFormat::Xz),
        "img" | "raw" => Ok(ImageFormat::Raw),
        _ => Err(Error::InvalidArgument(format!(
            "cannot tell the format from '{}': name it .zst, .gz, .xz or .img",
            output.display()
        ))),
    }
}

/// Where the manifest of `output` goes: `OUT.manifest.json`.
pub fn manifest_path(output: &Path) -> PathBuf {
    let mut name = output.as_os_str().to_owned();
    name.push(".manifest.json");
    PathBuf::from(name)
}

/// How `image pack` encodes.
#[derive(Debug, Clone, Copy)]
pub struct PackOptions {
    /// Compression level.
    pub level: i32,
    /// One zstd frame per block of raw image and a block index beside it
    /// (zstd only), so that a write can fetch only the blocks that differ.
    pub block_index: bool,
}

/// Where the block index of `output` goes: `OUT.index.json`.
pub fn index_path(output: &Path) -> PathBuf {
    with_suffix(output, INDEX_SUFFIX)
}

/// What [`index_path`] adds to the image's file name.
pub const INDEX_SUFFIX: &str = ".index.json";

/// Compresses `raw` into `output` (format from its extension, zstd with
/// the options' level and all cores), hashing the raw bytes on the way, and
/// writes the manifest (and the block index when asked). Every file appears
/// only complete (written aside, then renamed); the manifest last.
pub fn pack(raw: &Path, output: &Path, options: PackOptions) -> Result<ImageManifest> {
    let format = format_for(output)?;
    if options.block_index && format != ImageFormat::Zstd {
        return Err(Error::InvalidArgument(format!(
            "a block index needs zstd frames: name the output .zst, not '{}'",
            output.display()
        )));
    }
    let input = File::open(raw).map_err(|e| Error::io(format!("opening {}", raw.display()), e))?;
    let partial = with_suffix(output, ".partial");
    let out = File::create(&partial)
        .map_err(|e| Error::io(format!("creating {}", partial.display()), e))?;
    let mut hashing = HashingReader {
        inner: input,
        hasher: ImageSha256::default(),
        len: 0,
    };
    let out = BufWriter::with_capacity(1 << 20, out);
    let result = if options.block_index {
        encode_blocks(&mut hashing, out, options.level).map(Some)
    } else {
        encode(&mut hashing, out, format, options.level).map(|()| None)
    }
    .map_err(|e| Error::io(format!("writing {}", partial.display()), e));
    let index = match result {
        Ok(index) => index,
        Err(err) => {
            let _ = fs::remove_file(&partial);
            return Err(err);
        }
    };
    fs::rename(&partial, output)
        .map_err(|e| Error::io(format!("renaming to {}", output.display()), e))?;
    let block_index = index
        .map(|mut index| {
            index.image_size = hashing.len;
            let text = serde_json::to_vec(&index)
                .map_err(|e| Error::io("serialising the block index", io::Error::other(e)))?;
            let at = index_path(output);
            write_aside(&at, &text)?;
            Ok::<_, Error>(BlockIndexRef {
                url: file_name(&at),
                sha256: hex::encode(Sha256::digest(&text)),
            })
        })
        .transpose()?;
    let manifest = ImageManifest {
        name: raw
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into()),
        url: file_name(output),
        format,
        size: hashing.len,
        sha256: hashing.hasher.finish(),
        block_index,
        boot: None,
    };
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| Error::io("serialising the manifest", io::Error::other(e)))?;
    write_aside(&manifest_path(output), (text + "\n").as_bytes())?;
    Ok(manifest)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Writes `bytes` to `path` through a `.partial` file renamed into place.
fn write_aside(path: &Path, bytes: &[u8]) -> Result<()> {
    let partial = with_suffix(path, ".partial");
    fs::write(&partial, bytes)
        .and_then(|()| fs::rename(&partial, path))
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// One zstd frame per [`BLOCK_SIZE`] of `input`, compressed a batch of
/// blocks at a time on all cores and written in order; returns the index
/// (its `image_size` is the caller's to fill in).
fn encode_blocks<W: Write>(
    input: &mut impl Read,
    mut out: W,
    level: i32,
) -> io::Result<BlockIndex> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut blocks = Vec::new();
    let mut offset = 0u64;
    loop {
        let mut batch = Vec::with_capacity(threads);
        while batch.len() < threads {
            let mut raw = Vec::with_capacity(BLOCK_SIZE as usize);
            input.by_ref().take(BLOCK_SIZE).read_to_end(&mut raw)?;
            if raw.is_empty() {
                break;
            }
            batch.push(raw);
        }
        if batch.is_empty() {
            break;
        }
        let frames = std::thread::scope(|scope| {
            let workers: Vec<_> = batch
                .iter()
                .map(|raw| scope.spawn(move || compress_frame(raw, level)))
                .collect();
            workers
                .into_iter()
                .map(|worker| {
                    worker
                        .join()
                        .unwrap_or_else(|_| Err(io::Error::other("a compressing thread panicked")))
                })
                .collect::<io::Result<Vec<_>>>()
        })?;
        for (raw, frame) in batch.iter().zip(frames) {
            out.write_all(&frame)?;
            let (blake3, zero) = block_index::describe(raw);
            blocks.push(Block {
                blake3,
                zero,
                offset,
                length: frame.len() as u64,
            });
            offset += frame.len() as u64;
        }
        if batch
            .last()
            .is_some_and(|raw| (raw.len() as u64) < BLOCK_SIZE)
        {
            break;
        }
    }
    out.flush()?;
    Ok(BlockIndex {
        version: block_index::VERSION,
        block_size: BLOCK_SIZE,
        image_size: 0,
        blocks,
    })
}

/// One self-contained zstd frame, with its content size and checksum.
pub(crate) fn compress_frame(raw: &[u8], level: i32) -> io::Result<Vec<u8>> {
    use zstd::zstd_safe::CParameter;
    let mut compressor = zstd::bulk::Compressor::new(level)?;
    compressor.set_parameter(CParameter::ChecksumFlag(true))?;
    compressor.set_parameter(CParameter::ContentSizeFlag(true))?;
    compressor.compress(raw)
}

fn encode<W: Write>(
    input: &mut impl Read,
    out: W,
    format: ImageFormat,
    level: i32,
) -> io::Result<()> {
    match format {
        ImageFormat::Zstd => {
            let mut encoder = zstd::Encoder::new(out, level)?;
            encoder.include_checksum(true)?;
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
            encoder.multithread(threads)?;
            io::copy(input, &mut encoder)?;
            encoder.finish()?.flush()
        }
        ImageFormat::Gzip => {
            let level = flate2::Compression::new(level.clamp(1, 9) as u32);
            let mut encoder = flate2::write::GzEncoder::new(out, level);
            io::copy(input, &mut encoder)?;
            encoder.finish()?.flush()
        }
        ImageFormat::Xz => {
            let mut encoder = liblzma::write::XzEncoder::new(out, level.clamp(0, 9) as u32);
            io::copy(input, &mut encoder)?;
            encoder.finish()?.flush()
        }
        ImageFormat::Raw => {
            let mut out = out;
            io::copy(input, &mut out)?;
            out.flush()
        }
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Hashes and counts what passes through.
struct HashingReader<R> {
    inner: R,
    hasher: ImageSha256,
    len: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::decode::open_decoder;

    const LEVEL_3: PackOptions = PackOptions {
        level: 3,
        block_index: false,
    };

    #[test]
    fn packed_images_decode_to_the_raw_bytes_their_manifest_describes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = dir.path().join("os.img");
        let mut data = vec![0u8; 3 << 20];
        fastrand::Rng::with_seed(3).fill(&mut data[..1 << 20]);
        fs::write(&raw, &data).expect("raw image");
        for name in ["os.img.zst", "os.img.gz", "os.img.xz"] {
            let out = dir.path().join(name);
            let manifest = pack(&raw, &out, LEVEL_3).expect("packs");
            assert_eq!(manifest.size, data.len() as u64);
            assert_eq!(manifest.sha256, hex::encode(Sha256::digest(&data)));
            assert_eq!(manifest.url, name);
            let text = fs::read(manifest_path(&out)).expect("manifest written");
            assert_eq!(
                crate::image::manifest::parse(&text).expect("valid"),
                manifest
            );
            let (format, mut reader) =
                open_decoder(File::open(&out).expect("packed")).expect("decodes");
            assert_eq!(format, manifest.format);
            let mut decoded = Vec::new();
            reader.read_to_end(&mut decoded).expect("reads");
            assert!(decoded == data, "{name} round trip");
            assert!(!with_suffix(&out, ".partial").exists());
        }
    }

    #[test]
    fn a_block_index_describes_independent_frames_that_decode_as_one_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = dir.path().join("os.img");
        // Two random blocks, a zero block, and a short last block.
        let mut data = vec![0u8; (3 * BLOCK_SIZE + 5000) as usize];
        fastrand::Rng::with_seed(5).fill(&mut data[..2 * BLOCK_SIZE as usize]);
        fastrand::Rng::with_seed(6).fill(&mut data[3 * BLOCK_SIZE as usize..]);
        fs::write(&raw, &data).expect("raw image");
        let out = dir.path().join("os.img.zst");
        let options = PackOptions {
            level: 1,
            block_index: true,
        };
        let manifest = pack(&raw, &out, options).expect("packs");
        let named = manifest.block_index.expect("the manifest names the index");
        assert_eq!(named.url, "os.img.zst.index.json");
        let text = fs::read(index_path(&out)).expect("index written");
        assert_eq!(named.sha256, hex::encode(Sha256::digest(&text)));
        let index = block_index::parse(&text).expect("a valid index");
        assert_eq!(index.image_size, data.len() as u64);
        assert_eq!(index.blocks.len(), 4);
        let zeros: Vec<bool> = index.blocks.iter().map(|b| b.zero).collect();
        assert_eq!(zeros, [false, false, true, false]);
        let packed = fs::read(&out).expect("packed");
        assert_eq!(index.encoded_size(), packed.len() as u64);
        for (number, block) in index.blocks.iter().enumerate() {
            let extent = index.extent(number);
            let frame = &packed[block.frame().start as usize..block.frame().end as usize];
            let decoded = zstd::bulk::decompress(frame, BLOCK_SIZE as usize).expect("a frame");
            assert!(decoded[..] == data[extent.start as usize..extent.end as usize]);
            assert_eq!(block_index::digest(block), blake3::hash(&decoded));
        }
        let (_, mut reader) = open_decoder(File::open(&out).expect("packed")).expect("decodes");
        let mut decoded = Vec::new();
        reader.read_to_end(&mut decoded).expect("one stream");
        assert!(decoded == data, "the frames decode as one stream");
        let err = pack(&raw, &dir.path().join("os.img.gz"), options).expect_err("gzip");
        assert!(err.to_string().contains("zstd frames"), "{err}");
    }

    #[test]
    fn an_unknown_extension_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = pack(
            &dir.path().join("missing"),
            &dir.path().join("os.bz2"),
            LEVEL_3,
        )
        .expect_err("unknown format");
        assert!(err.to_string().contains(".zst"), "{err}");
    }
}
