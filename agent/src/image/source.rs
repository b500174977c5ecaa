//! Where an image comes from: an HTTP(S) URL or a local path.

use crate::image::http::{self, HttpOptions, HttpSource};
use crate::pattern::Pattern;
use crate::{Error, Result};
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use url::Url;

/// The `http(s)://` URLs an API request may name, as the API description
/// states them: a DNS name whose last label starts with a letter, or a
/// dotted-quad IPv4 address; a port up to 65535; a path and query of
/// unreserved, reserved and `%` characters. Each such text is a URL the
/// `url` crate parses (no IPv6 literals, no user info, no fragment).
pub static API_URL_PATTERN: Pattern = Pattern::new(concat!(
    "^[hH][tT][tT][pP][sS]?://",
    "(?:(?:[A-Za-z0-9-]{1,63}\\.)*[A-Za-z][A-Za-z0-9-]{0,62}",
    "|(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\\.){3}",
    "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9]))",
    "(?::(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}|0))?",
    "(?:/[A-Za-z0-9._~%!$&'()*+,;=:@/-]*)?",
    "(?:\\?[A-Za-z0-9._~%!$&'()*+,;=:@/?-]*)?$"
));

/// An image or manifest location as given by the user or a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Http(Url),
    File(PathBuf),
}

impl Location {
    /// `http://` and `https://` are URLs, `file://` and anything else a path.
    pub fn parse(text: &str) -> Result<Location> {
        let lower = text.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            let url = Url::parse(text)
                .map_err(|e| Error::InvalidArgument(format!("image URL '{text}': {e}")))?;
            Ok(Location::Http(url))
        } else if lower.starts_with("file://") {
            let url = Url::parse(text)
                .map_err(|e| Error::InvalidArgument(format!("file URL '{text}': {e}")))?;
            let path = url
                .to_file_path()
                .map_err(|()| Error::InvalidArgument(format!("file URL '{text}' has no path")))?;
            Ok(Location::File(path))
        } else if text.contains("://") {
            Err(Error::InvalidArgument(format!(
                "'{text}': only http, https and file URLs are supported"
            )))
        } else if text.is_empty() {
            Err(Error::InvalidArgument("empty image location".into()))
        } else {
            Ok(Location::File(PathBuf::from(text)))
        }
    }

    /// A location named in an API request: an `http(s)://` URL of
    /// [`API_URL_PATTERN`]'s shape, or a `file://` URL where
    /// `allow_local_files` is set. Bare paths are refused: they would be
    /// read relative to the daemon's working directory, or anywhere on the
    /// node.
    pub fn parse_url(text: &str, allow_local_files: bool) -> Result<Location> {
        let lower = text.to_ascii_lowercase();
        let is_file_url = lower.starts_with("file://");
        if !lower.starts_with("http://") && !lower.starts_with("https://") && !is_file_url {
            return Err(Error::InvalidArgument(format!(
                "'{text}' is not an http:// or https:// URL"
            )));
        }
        if !is_file_url && !API_URL_PATTERN.is_match(text) {
            return Err(Error::InvalidArgument(format!(
                "'{text}' is not a URL the agent takes: a host name or IPv4 address, \
                 an optional port, then a path and query of URL characters"
            )));
        }
        if is_file_url && !allow_local_files {
            return Err(Error::InvalidArgument(format!(
                "'{text}': file:// URLs are refused unless [image] allow_local_files is set"
            )));
        }
        Location::parse(text)
    }

    /// Resolves `reference` (a manifest's `url`) against this location: an
    /// absolute URL stands alone, a relative one is next to the manifest.
    pub fn join(&self, reference: &str) -> Result<Location> {
        if reference.contains("://") {
            return Location::parse(reference);
        }
        match self {
            Location::Http(base) => base.join(reference).map(Location::Http).map_err(|e| {
                Error::ManifestInvalid(format!("url '{reference}' relative to {base}: {e}"))
            }),
            Location::File(path) => {
                let dir = path.parent().map(PathBuf::from).unwrap_or_default();
                Ok(Location::File(dir.join(reference)))
            }
        }
    }
}

impl Location {
    /// The location of a companion file: `os.manifest.json` → `os.manifest.json.minisig`.
    pub fn with_suffix(&self, suffix: &str) -> Location {
        match self {
            Location::Http(url) => {
                let mut url = url.clone();
                let path = format!("{}{suffix}", url.path());
                url.set_path(&path);
                Location::Http(url)
            }
            Location::File(path) => {
                let mut name = path.as_os_str().to_owned();
                name.push(suffix);
                Location::File(PathBuf::from(name))
            }
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Http(url) => write!(f, "{url}"),
            Location::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// An opened image stream, still encoded.
pub struct Source {
    pub reader: Box<dyn Read + Send>,
    /// Encoded length, when the file or the server says it.
    pub length: Option<u64>,
}

/// Opens the stream at `location`; HTTP downloads resume on their own.
pub fn open(location: &Location, options: &HttpOptions) -> Result<Source> {
    match location {
        Location::Http(url) => {
            let source = HttpSource::open(url, options)?;
            let length = source.content_length();
            Ok(Source {
                reader: Box::new(source),
                length,
            })
        }
        Location::File(path) => {
            let file = File::open(path).map_err(|e| {
                Error::DownloadFailed(format!("opening image {}: {e}", path.display()))
            })?;
            let length = file.metadata().ok().map(|m| m.len());
            Ok(Source {
                reader: Box::new(file),
                length,
            })
        }
    }
}

/// Reads a small document (a manifest, a signature), refusing more than `limit` bytes.
pub fn read_small(location: &Location, limit: u64, options: &HttpOptions) -> Result<Vec<u8>> {
    match location {
        Location::Http(url) => http::fetch_small(url, limit, options),
        Location::File(path) => {
            let file = File::open(path)
                .map_err(|e| Error::DownloadFailed(format!("opening {}: {e}", path.display())))?;
            let mut bytes = Vec::new();
            file.take(limit + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            if bytes.len() as u64 > limit {
                return Err(Error::InvalidArgument(format!(
                    "{} is larger than {limit} bytes",
                    path.display()
                )));
            }
            Ok(bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_by_scheme() {
        assert!(matches!(
            Location::parse("https://h/x.zst"),
            Ok(Location::Http(_))
        ));
        assert!(matches!(
            Location::parse("HTTP://h/x.zst"),
            Ok(Location::Http(_))
        ));
        assert_eq!(
            Location::parse("file:///srv/x.img").expect("file url"),
            Location::File("/srv/x.img".into())
        );
        assert_eq!(
            Location::parse("./x.img").expect("path"),
            Location::File("./x.img".into())
        );
        let err = Location::parse("ftp://h/x").expect_err("ftp");
        assert!(err.to_string().contains("only http"), "{err}");
    }

    #[test]
    fn manifest_urls_resolve_next_to_the_manifest() {
        let http = Location::parse("http://h/images/os.manifest.json").expect("url");
        assert_eq!(
            http.join("os.zst").expect("joins").to_string(),
            "http://h/images/os.zst"
        );
        let file = Location::parse("/srv/images/os.manifest.json").expect("path");
        assert_eq!(
            file.join("os.zst").expect("joins"),
            Location::File("/srv/images/os.zst".into())
        );
        assert_eq!(
            file.join("https://cdn/os.zst")
                .expect("absolute")
                .to_string(),
            "https://cdn/os.zst"
        );
    }

    #[test]
    fn request_urls_of_the_described_shape_parse_and_others_are_refused() {
        for text in [
            "http://127.0.0.1:7480/os.img.zst",
            "HTTPS://images.example.com/os.img?v=1&sig=a%2Fb",
            "http://a-/x",
            "http://0.0.0.0:0",
            "http://h:65535/~user/(x)*;y=z@w:1",
            "http://1.2.3.x",
        ] {
            assert!(API_URL_PATTERN.is_match(text), "{text}");
            let location = Location::parse_url(text, false);
            assert!(
                matches!(location, Ok(Location::Http(_))),
                "{text}: {location:?}"
            );
        }
        for text in [
            "0",
            "http://",
            "http://1.2.3.999/x",
            "http://h:65536/x",
            "http://[::1]/x",
            "http://user@h/x",
            "http://h/x#frag",
            "http://h/a b",
            "http://h.123/x",
        ] {
            assert!(!API_URL_PATTERN.is_match(text), "{text}");
            assert!(Location::parse_url(text, false).is_err(), "{text}");
        }
        assert!(Location::parse_url("file:///srv/os.img", false).is_err());
        assert!(Location::parse_url("file:///srv/os.img", true).is_ok());
    }
}
