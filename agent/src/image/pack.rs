//! `image pack`: compress a raw image and write its manifest beside it.

use crate::{Error, Result};
use reimage_protocol::{ImageFormat, ImageManifest};
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

/// Compresses `raw` into `output` (format from its extension, zstd with
/// `level` and all cores), hashing the raw bytes on the way, and writes the
/// manifest. Both files appear only complete (written aside, then renamed).
pub fn pack(raw: &Path, output: &Path, level: i32) -> Result<ImageManifest> {
    let format = format_for(output)?;
    let input = File::open(raw).map_err(|e| Error::io(format!("opening {}", raw.display()), e))?;
    let partial = with_suffix(output, ".partial");
    let out = File::create(&partial)
        .map_err(|e| Error::io(format!("creating {}", partial.display()), e))?;
    let mut hashing = HashingReader {
        inner: input,
        hasher: Sha256::new(),
        len: 0,
    };
    let result = encode(
        &mut hashing,
        BufWriter::with_capacity(1 << 20, out),
        format,
        level,
    )
    .map_err(|e| Error::io(format!("writing {}", partial.display()), e));
    if let Err(err) = result {
        let _ = fs::remove_file(&partial);
        return Err(err);
    }
    fs::rename(&partial, output)
        .map_err(|e| Error::io(format!("renaming to {}", output.display()), e))?;
    let manifest = ImageManifest {
        name: raw
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into()),
        url: output
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        format,
        size: hashing.len,
        sha256: hex::encode(hashing.hasher.finalize()),
    };
    let manifest_at = manifest_path(output);
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| Error::io("serialising the manifest", io::Error::other(e)))?;
    let partial = with_suffix(&manifest_at, ".partial");
    fs::write(&partial, text + "\n")
        .and_then(|()| fs::rename(&partial, &manifest_at))
        .map_err(|e| Error::io(format!("writing {}", manifest_at.display()), e))?;
    Ok(manifest)
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
    hasher: Sha256,
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

    #[test]
    fn packed_images_decode_to_the_raw_bytes_their_manifest_describes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = dir.path().join("os.img");
        let mut data = vec![0u8; 3 << 20];
        fastrand::Rng::with_seed(3).fill(&mut data[..1 << 20]);
        fs::write(&raw, &data).expect("raw image");
        for name in ["os.img.zst", "os.img.gz", "os.img.xz"] {
            let out = dir.path().join(name);
            let manifest = pack(&raw, &out, 3).expect("packs");
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
    fn an_unknown_extension_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = pack(&dir.path().join("missing"), &dir.path().join("os.bz2"), 3)
            .expect_err("unknown format");
        assert!(err.to_string().contains(".zst"), "{err}");
    }
}
