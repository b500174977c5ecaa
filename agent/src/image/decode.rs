//! Decoding by magic bytes: raw, gzip, xz, zstd.
//!
//! Each compressed format is decoded one member (gzip member, xz stream,
//! zstd frame) at a time; after a member, what follows must be another
//! member or nothing. Trailing garbage is an error, never silently ignored:
//! a peer tool once wrote only the first member of a tampered image and
//! reported success.

use crate::{Error, Result};
use reimage_protocol::ImageFormat;
use std::io::{self, BufRead, BufReader, Read};

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
/// Skippable zstd frames carry metadata; their magic is 0x184D2A5? (LE).
const ZSTD_SKIPPABLE_MAGIC_TAIL: &[u8] = &[0x2a, 0x4d, 0x18];

/// Input buffer of the decoders: large reads keep syscalls and HTTP chunk
/// handling off the profile.
const INPUT_BUFFER: usize = 256 * 1024;

/// Names the format whose magic starts `head`. Anything unrecognised is raw.
pub fn detect_format(head: &[u8]) -> ImageFormat {
    if head.starts_with(GZIP_MAGIC) {
        ImageFormat::Gzip
    } else if head.starts_with(XZ_MAGIC) {
        ImageFormat::Xz
    } else if starts_zstd_frame(head) {
        ImageFormat::Zstd
    } else {
        ImageFormat::Raw
    }
}

fn starts_zstd_frame(head: &[u8]) -> bool {
    head.starts_with(ZSTD_MAGIC)
        || (head.len() >= 4 && head[0] & 0xf0 == 0x50 && &head[1..4] == ZSTD_SKIPPABLE_MAGIC_TAIL)
}

/// Wraps `source` in the decoder its magic bytes call for. Errors that come
/// out of the returned reader are typed [`Error`]s carried in `io::Error`.
pub fn open_decoder<R: Read + Send + 'static>(
    mut source: R,
) -> Result<(ImageFormat, Box<dyn Read + Send>)> {
    let head = read_head(&mut source, XZ_MAGIC.len())?;
    let format = detect_format(&head);
    let input = BufReader::with_capacity(INPUT_BUFFER, io::Cursor::new(head).chain(source));
    let reader: Box<dyn Read + Send> = match format {
        ImageFormat::Raw => Box::new(input),
        ImageFormat::Gzip => Box::new(Members::<GzipMember<_>>::new(input)?),
        ImageFormat::Xz => Box::new(Members::<XzMember<_>>::new(input)?),
        ImageFormat::Zstd => Box::new(Members::<ZstdMember<_>>::new(input)?),
    };
    Ok((format, reader))
}

/// Reads up to `n` bytes, looping over short reads, so that magic detection
/// never sees a network stream's small first chunk.
fn read_head<R: Read>(source: &mut R, n: usize) -> Result<Vec<u8>> {
    let mut head = Vec::with_capacity(n);
    source
        .take(n as u64)
        .read_to_end(&mut head)
        .map_err(|e| Error::from_io(e, "reading the image"))?;
    Ok(head)
}

/// One member of a concatenated compressed stream.
trait Member: Read + Sized {
    type Input: BufRead;
    const FORMAT: ImageFormat;
    fn start(input: Self::Input) -> io::Result<Self>;
    fn input_mut(&mut self) -> &mut Self::Input;
    fn finish(self) -> Self::Input;
    fn is_next_member(rest: &[u8]) -> bool;
}

/// Decodes members one after another and refuses anything else after them.
struct Members<D> {
    current: Option<D>,
}

impl<D: Member> Members<D> {
    fn new(input: D::Input) -> Result<Self> {
        let first = D::start(input).map_err(|e| Error::from_io(e, "starting the decoder"))?;
        Ok(Members {
            current: Some(first),
        })
    }

    /// Classifies a decoder failure: a typed error from the source passes
    /// through; if the input is exhausted the stream was cut short.
    fn classify(&mut self, err: io::Error) -> io::Error {
        if err.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            return err;
        }
        let at_end = self
            .current
            .as_mut()
            .and_then(|d| d.input_mut().fill_buf().ok().map(|rest| rest.is_empty()))
            .unwrap_or(true);
        let typed = if at_end || err.kind() == io::ErrorKind::UnexpectedEof {
            Error::ImageTruncated(format!("{} stream ended early: {err}", D::FORMAT))
        } else {
            Error::ImageCorrupt(format!("{} stream: {err}", D::FORMAT))
        };
        typed.into_io()
    }
}

impl<D: Member> Read for Members<D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(decoder) = self.current.as_mut() else {
                return Ok(0);
            };
            match decoder.read(buf) {
                Ok(0) if buf.is_empty() => return Ok(0),
                Ok(0) => {}
                Ok(n) => return Ok(n),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(self.classify(err)),
            }
            // The member ended: what follows must be another one or nothing.
            let Some(decoder) = self.current.take() else {
                return Ok(0);
            };
            let mut input = decoder.finish();
            let rest = input.fill_buf()?;
            if rest.is_empty() {
                return Ok(0);
            }
            if !D::is_next_member(rest) {
                let shown = &rest[..rest.len().min(8)];
                return Err(Error::ImageTrailingData(format!(
                    "bytes follow the end of the {} stream, starting with {}",
                    D::FORMAT,
                    hex::encode(shown)
                ))
                .into_io());
            }
            self.current = Some(D::start(input).map_err(|e| self.classify(e))?);
        }
    }
}

struct GzipMember<R>(flate2::bufread::GzDecoder<R>);

impl<R: BufRead> Read for GzipMember<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: BufRead> Member for GzipMember<R> {
    type Input = R;
    const FORMAT: ImageFormat = ImageFormat::Gzip;
    fn start(input: R) -> io::Result<Self> {
        Ok(GzipMember(flate2::bufread::GzDecoder::new(input)))
    }
    fn input_mut(&mut self) -> &mut R {
        self.0.get_mut()
    }
    fn finish(self) -> R {
        self.0.into_inner()
    }
    fn is_next_member(rest: &[u8]) -> bool {
        rest.starts_with(GZIP_MAGIC)
    }
}

struct XzMember<R>(liblzma::bufread::XzDecoder<R>);

impl<R: BufRead> Read for XzMember<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: BufRead> Member for XzMember<R> {
    type Input = R;
    const FORMAT: ImageFormat = ImageFormat::Xz;
    fn start(input: R) -> io::Result<Self> {
        Ok(XzMember(liblzma::bufread::XzDecoder::new(input)))
    }
    fn input_mut(&mut self) -> &mut R {
        self.0.get_mut()
    }
    fn finish(self) -> R {
        self.0.into_inner()
    }
    fn is_next_member(rest: &[u8]) -> bool {
        rest.starts_with(XZ_MAGIC)
    }
}

struct ZstdMember<R: BufRead>(zstd::stream::read::Decoder<'static, R>);

impl<R: BufRead> Read for ZstdMember<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: BufRead> Member for ZstdMember<R> {
    type Input = R;
    const FORMAT: ImageFormat = ImageFormat::Zstd;
    fn start(input: R) -> io::Result<Self> {
        let mut decoder = zstd::stream::read::Decoder::with_buffer(input)?.single_frame();
        // Images packed with --long need a window beyond the default limit.
        decoder.window_log_max(31)?;
        Ok(ZstdMember(decoder))
    }
    fn input_mut(&mut self) -> &mut R {
        self.0.get_mut()
    }
    fn finish(self) -> R {
        self.0.finish()
    }
    fn is_next_member(rest: &[u8]) -> bool {
        starts_zstd_frame(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sample() -> Vec<u8> {
        let mut data = vec![0u8; 300_000];
        let mut rng = fastrand::Rng::with_seed(7);
        rng.fill(&mut data[..100_000]);
        data
    }

    fn compress(format: ImageFormat, data: &[u8]) -> Vec<u8> {
        match format {
            ImageFormat::Raw => data.to_vec(),
            ImageFormat::Gzip => {
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                enc.write_all(data).expect("gzip");
                enc.finish().expect("gzip")
            }
            ImageFormat::Xz => {
                let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 1);
                enc.write_all(data).expect("xz");
                enc.finish().expect("xz")
            }
            ImageFormat::Zstd => {
                // As the zstd CLI does by default: a frame checksum.
                let mut enc = zstd::Encoder::new(Vec::new(), 3).expect("zstd");
                enc.include_checksum(true).expect("zstd");
                enc.write_all(data).expect("zstd");
                enc.finish().expect("zstd")
            }
        }
    }

    fn decode(bytes: Vec<u8>) -> (ImageFormat, Result<Vec<u8>>) {
        let (format, mut reader) = open_decoder(io::Cursor::new(bytes)).expect("opens");
        let mut out = Vec::new();
        let result = reader
            .read_to_end(&mut out)
            .map(|_| out)
            .map_err(|e| Error::from_io(e, "decoding"));
        (format, result)
    }

    const COMPRESSED: [ImageFormat; 3] = [ImageFormat::Gzip, ImageFormat::Xz, ImageFormat::Zstd];

    #[test]
    fn every_format_is_detected_and_decoded_exactly() {
        let data = sample();
        for format in [ImageFormat::Raw].into_iter().chain(COMPRESSED) {
            let (detected, decoded) = decode(compress(format, &data));
            assert_eq!(detected, format);
            assert!(decoded.expect("decodes") == data, "{format} round trip");
        }
    }

    #[test]
    fn concatenated_members_decode_to_the_concatenation() {
        let data = sample();
        for format in COMPRESSED {
            let mut bytes = compress(format, &data[..1000]);
            bytes.extend(compress(format, &data[1000..]));
            let (_, decoded) = decode(bytes);
            assert!(decoded.expect("decodes") == data, "{format} members");
        }
    }

    #[test]
    fn trailing_garbage_after_the_stream_is_refused() {
        for format in COMPRESSED {
            let mut bytes = compress(format, &sample());
            bytes.extend_from_slice(b"GARBAGE!");
            let err = decode(bytes).1.expect_err("trailing data must fail");
            assert_eq!(err.code(), "ImageTrailingData", "{format}: {err}");
            assert!(err.to_string().contains("474152"), "names the bytes: {err}");
        }
    }

    #[test]
    fn a_cut_stream_is_truncated() {
        for format in COMPRESSED {
            let mut bytes = compress(format, &sample());
            bytes.truncate(bytes.len() * 2 / 3);
            let err = decode(bytes).1.expect_err("truncated must fail");
            assert_eq!(err.code(), "ImageTruncated", "{format}: {err}");
        }
    }

    #[test]
    fn a_flipped_byte_fails_the_decode() {
        for format in COMPRESSED {
            let mut bytes = compress(format, &sample());
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x55;
            let result = decode(bytes).1;
            // Each format carries a checksum here: corruption never decodes clean.
            assert!(result.is_err(), "{format} decoded a corrupted stream");
        }
    }

    #[test]
    fn short_and_empty_inputs_are_raw() {
        assert_eq!(decode(Vec::new()).1.expect("empty"), Vec::<u8>::new());
        let (format, decoded) = decode(vec![0x1f]);
        assert_eq!(format, ImageFormat::Raw);
        assert_eq!(decoded.expect("one byte"), vec![0x1f]);
    }

    #[test]
    fn magic_split_over_short_reads_is_still_detected() {
        /// Hands out one byte per read, like a slow network stream.
        struct Trickle(io::Cursor<Vec<u8>>);
        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(1);
                self.0.read(&mut buf[..n])
            }
        }
        let bytes = compress(ImageFormat::Xz, b"hello");
        let (format, mut reader) = open_decoder(Trickle(io::Cursor::new(bytes))).expect("opens");
        assert_eq!(format, ImageFormat::Xz);
        let mut out = Vec::new();
        reader.read_to_end(&mut out).expect("decodes");
        assert_eq!(out, b"hello");
    }
}
