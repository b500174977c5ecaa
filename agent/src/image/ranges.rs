//! Byte ranges of an encoded image: HTTP `Range` requests (one client, one
//! version of the file) or positioned reads of a local file.

use crate::image::http::{HttpOptions, HttpSource};
use crate::image::source::Location;
use crate::{Error, Result};
use std::fs::File;
use std::io::{self, Read};
use std::ops::Range;
use std::os::unix::fs::FileExt;

/// Reads one selected range of an image at a time.
pub enum RangeReader {
    Http(Box<HttpSource>),
    File { file: File, pos: u64, end: u64 },
}

impl RangeReader {
    /// Prepares to read ranges of the image at `location`; sends nothing.
    pub fn open(location: &Location, http: &HttpOptions) -> Result<RangeReader> {
        match location {
            Location::Http(url) => Ok(RangeReader::Http(Box::new(HttpSource::for_ranges(
                url, http,
            )?))),
            Location::File(path) => {
                let file = File::open(path).map_err(|e| {
                    Error::DownloadFailed(format!("opening image {}: {e}", path.display()))
                })?;
                Ok(RangeReader::File {
                    file,
                    pos: 0,
                    end: 0,
                })
            }
        }
    }

    /// Selects `range`: reads return its bytes, then the end. `Ok(false)`:
    /// the server does not honour `Range`.
    pub fn select(&mut self, range: Range<u64>) -> Result<bool> {
        match self {
            RangeReader::Http(source) => source.select_range(range),
            RangeReader::File { pos, end, .. } => {
                (*pos, *end) = (range.start, range.end);
                Ok(true)
            }
        }
    }
}

impl Read for RangeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            RangeReader::Http(source) => source.read(buf),
            RangeReader::File { file, pos, end } => {
                let room = usize::try_from(end.saturating_sub(*pos)).unwrap_or(usize::MAX);
                let want = buf.len().min(room);
                if want == 0 {
                    return Ok(0);
                }
                let n = file.read_at(&mut buf[..want], *pos)?;
                *pos += n as u64;
                Ok(n)
            }
        }
    }
}
