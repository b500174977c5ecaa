//! The HTTP(S) image source: a blocking [`Read`] over a download that resumes
//! where it broke off.
//!
//! A reimage streams gigabytes over networks that drop connections; starting
//! over each time could never finish. So a broken, failed or stalled body is
//! resumed with `Range: bytes=<pos>-` guarded by `If-Range`, and a resumed
//! response is only accepted when it provably continues the same file: the
//! bytes of two versions of an image are never spliced together.
//!
//! The reader is plain blocking code for the pipeline's reader thread: it owns
//! a private current-thread tokio runtime and blocks on it for each chunk.

use std::hash::{BuildHasher, RandomState};
use std::io::{self, Read};
use std::sync::{Arc, Once};
use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{
    ACCEPT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, ETAG, HeaderMap, IF_RANGE, LAST_MODIFIED, RANGE,
};
use url::Url;

use crate::{Error, Result};

/// How hard to try before a download is declared failed.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Consecutive failed attempts allowed without receiving a new byte;
    /// the count starts again whenever a connection delivers data.
    pub retries: u32,
    /// A connection that delivers no byte for this long is abandoned and the
    /// download resumed.
    pub stall_timeout: Duration,
    /// Limit for establishing a TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Wait before the first retry; it doubles with each further one.
    pub backoff_base: Duration,
    /// Longest wait between two attempts.
    pub backoff_max: Duration,
    /// A download slower than this many bytes per second over
    /// `min_rate_window` is abandoned (a server trickling bytes is never a
    /// stall, but would never finish either). 0 disables the check.
    pub min_rate: u64,
    /// The window over which `min_rate` is measured.
    pub min_rate_window: Duration,
    /// Which URLs may be fetched, the first one and every redirect: the
    /// daemon's `[image] allowed_urls`. `None` allows all.
    pub url_policy: Option<UrlPolicy>,
}

/// A predicate over URLs, shared by the client's redirect policy.
#[derive(Clone)]
pub struct UrlPolicy(pub Arc<dyn Fn(&Url) -> bool + Send + Sync>);

impl std::fmt::Debug for UrlPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UrlPolicy")
    }
}

impl UrlPolicy {
    /// Refuses `url` with `ImageUrlNotAllowed` unless the policy allows it.
    pub fn check(&self, url: &Url) -> Result<()> {
        if (self.0)(url) {
            Ok(())
        } else {
            Err(Error::ImageUrlNotAllowed(format!(
                "{} does not match [image] allowed_urls",
                shown_url(url)
            )))
        }
    }
}

/// At most this many redirects are followed.
const MAX_REDIRECTS: usize = 10;

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            retries: 10,
            stall_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(8),
            min_rate: 1024,
            min_rate_window: Duration::from_secs(60),
            url_policy: None,
        }
    }
}

/// A resumable download of one HTTP(S) resource, read as a byte stream.
///
/// Errors from [`Read::read`] carry a [`crate::Error`] (recover it with
/// [`Error::from_io`]): `DownloadFailed` for statuses, connection failures
/// and a file that changed on the server, `ImageTruncated` when the server
/// has fewer bytes than it announced. Once a read failed, every later read
/// fails too.
pub struct HttpSource {
    url: Url,
    /// The URL as logs and errors show it (no password, no query).
    shown: String,
    opts: HttpOptions,
    /// The body being read; `None` between a failure and the next attempt.
    response: Option<reqwest::Response>,
    /// Received bytes not yet handed to the reader.
    pending: Bytes,
    /// Offset in the resource of the end of the bytes received so far.
    pos: u64,
    /// Bytes still to be thrown away from the current body: a server that
    /// ignores `Range` restarts from the first byte.
    discard: u64,
    /// Reading one byte range ([`HttpSource::select_range`]): where it ends.
    end: Option<u64>,
    /// A range request was answered with the whole file.
    ranges_refused: bool,
    /// Length of the whole resource, when announced.
    total: Option<u64>,
    /// What proves that a later response comes from the same file.
    validator: Option<Validator>,
    resumes: u32,
    /// Consecutive attempts that delivered no new byte.
    failures: u32,
    finished: bool,
    failed: bool,
    /// Start and position of the current `min_rate` window.
    rate_window: (std::time::Instant, u64),
    client: reqwest::Client,
    /// Declared last so that it is dropped after the response and the client.
    rt: tokio::runtime::Runtime,
}

impl HttpSource {
    /// Sends the first GET; fails with `DownloadFailed` on non-2xx, connection errors after retries, etc.
    ///
    /// Server errors (5xx, 408, 429) and connection failures are retried as
    /// [`HttpOptions`] says; other statuses fail at once.
    pub fn open(url: &Url, opts: &HttpOptions) -> Result<HttpSource> {
        let mut source = HttpSource::build(url, opts)?;
        source.connect()?;
        Ok(source)
    }

    /// A source for reading byte ranges of `url` with one client, one range
    /// at a time ([`HttpSource::select_range`]); sends nothing yet.
    pub fn for_ranges(url: &Url, opts: &HttpOptions) -> Result<HttpSource> {
        let mut source = HttpSource::build(url, opts)?;
        source.finished = true;
        Ok(source)
    }

    /// Positions the source at `range` of the resource: reads return its
    /// bytes, then the end. Interrupted ranges resume as whole downloads do,
    /// and every range after the first carries `If-Range` with the
    /// validator of the first answer, so all come from one version of the
    /// file. `Ok(false)`: the server answered with the whole file, so it
    /// does not honour `Range`.
    pub fn select_range(&mut self, range: std::ops::Range<u64>) -> Result<bool> {
        self.response = None;
        self.pending = Bytes::new();
        self.pos = range.start;
        self.end = Some(range.end);
        self.discard = 0;
        self.failures = 0;
        self.failed = false;
        self.finished = range.is_empty();
        self.rate_window = (std::time::Instant::now(), range.start);
        if self.finished {
            return Ok(true);
        }
        match self.connect() {
            Ok(()) => Ok(true),
            Err(_) if self.ranges_refused => Ok(false),
            Err(err) => Err(err),
        }
    }

    fn build(url: &Url, opts: &HttpOptions) -> Result<HttpSource> {
        let shown = shown_url(url);
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::InvalidArgument(format!(
                "{shown}: only http and https URLs can be downloaded"
            )));
        }
        if let Some(policy) = &opts.url_policy {
            policy.check(url)?;
        }
        install_crypto_provider();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the HTTP client runtime", e))?;
        let client = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            // The image must arrive as stored: its hash is over those bytes,
            // and a Content-Length of an encoded body would not be the image's.
            .no_gzip()
            .no_brotli()
            .no_deflate()
            .no_zstd()
            .user_agent(concat!("reimage-agent/", env!("CARGO_PKG_VERSION")))
            .redirect(redirect_policy(opts.url_policy.clone()))
            .build()
            .map_err(|e| Error::DownloadFailed(format!("{shown}: {}", chain(&e))))?;
        Ok(HttpSource {
            url: url.clone(),
            shown,
            opts: opts.clone(),
            response: None,
            pending: Bytes::new(),
            pos: 0,
            discard: 0,
            end: None,
            ranges_refused: false,
            total: None,
            validator: None,
            resumes: 0,
            failures: 0,
            finished: false,
            failed: false,
            rate_window: (std::time::Instant::now(), 0),
            client,
            rt,
        })
    }

    /// Length of the whole resource when the server announced it.
    pub fn content_length(&self) -> Option<u64> {
        self.total
    }

    /// How many times the download was resumed (for logs and tests).
    pub fn resumes(&self) -> u32 {
        self.resumes
    }

    /// Sends requests until one gives a usable body, backing off between
    /// attempts; fails when one is refused for good or retries run out.
    fn connect(&mut self) -> Result<()> {
        loop {
            let attempt = match (self.pos, &self.validator) {
                // A block's digest proves its bytes, so a range needs no
                // validator to resume; it still sends one when it has one.
                _ if self.end.is_some() => self.request_range(),
                // Nothing received yet: starting over is always safe.
                (0, _) => self.request_whole(),
                (_, Some(validator)) => {
                    let validator = validator.clone();
                    self.request_rest(&validator)
                }
                (_, None) => Err(Failure::Fatal(Error::DownloadFailed(format!(
                    "{}: the connection broke at byte {} and the server sent neither a strong \
                     ETag nor Last-Modified, so a resumed download could not be proven to be \
                     the same file; refusing to resume",
                    self.shown, self.pos
                )))),
            };
            match attempt {
                Ok(response) => {
                    self.response = Some(response);
                    return Ok(());
                }
                Err(Failure::Fatal(error)) => return Err(error),
                Err(Failure::Retry { reason, truncated }) => self.back_off(&reason, truncated)?,
            }
        }
    }

    /// The first request, or a fresh start when no byte was received yet.
    fn request_whole(&mut self) -> Result<reqwest::Response, Failure> {
        let response = self.send(None, None)?;
        if response.status() == StatusCode::PARTIAL_CONTENT || !response.status().is_success() {
            return Err(self.refused(response.status()));
        }
        let headers = response.headers();
        self.total = header_u64(headers, CONTENT_LENGTH.as_str());
        self.validator = Validator::of(headers);
        self.discard = 0;
        Ok(response)
    }

    /// A resume at `self.pos`, accepted only for the same file.
    fn request_rest(&mut self, validator: &Validator) -> Result<reqwest::Response, Failure> {
        let range = format!("bytes={}-", self.pos);
        let response = self.send(Some(&range), Some(validator))?;
        let headers = response.headers();
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {
                self.check_continuation(headers, Some(validator))?;
                self.discard = 0;
                tracing::info!(url = %self.shown, position = self.pos, "resumed image download");
            }
            StatusCode::OK => {
                // The server ignored Range, or If-Range found another version.
                let same_length = match (self.total, header_u64(headers, CONTENT_LENGTH.as_str())) {
                    (Some(total), Some(length)) => total == length,
                    _ => true,
                };
                if !validator.matches(headers) || !same_length {
                    return Err(Failure::Fatal(self.changed()));
                }
                self.discard = self.pos;
                tracing::info!(
                    url = %self.shown,
                    position = self.pos,
                    "server ignored the range request; restarting the same file and skipping \
                     what was already received"
                );
            }
            StatusCode::RANGE_NOT_SATISFIABLE => return Err(self.unsatisfiable()),
            status => return Err(self.refused(status)),
        }
        self.resumes += 1;
        Ok(response)
    }

    /// The rest of the selected range, from `self.pos`.
    fn request_range(&mut self) -> Result<reqwest::Response, Failure> {
        let end = self.end.unwrap_or(u64::MAX);
        let range = format!("bytes={}-{}", self.pos, end.saturating_sub(1));
        let validator = self.validator.clone();
        let response = self.send(Some(&range), validator.as_ref())?;
        let headers = response.headers();
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {
                self.check_continuation(headers, validator.as_ref())?;
                if validator.is_none() {
                    self.validator = Validator::of(headers);
                }
                Ok(response)
            }
            StatusCode::OK => {
                self.ranges_refused = true;
                Err(Failure::Fatal(Error::DownloadFailed(format!(
                    "{}: asked for bytes {}..{end}, the server answered 200 with the whole file: \
                     it does not honour Range requests",
                    self.shown, self.pos
                ))))
            }
            StatusCode::RANGE_NOT_SATISFIABLE => Err(self.unsatisfiable()),
            status => Err(self.refused(status)),
        }
    }

    /// A 416: the file is shorter than where we asked to read.
    fn unsatisfiable(&self) -> Failure {
        Failure::Fatal(Error::ImageTruncated(format!(
            "{}: the server refused to send bytes from {} on (416): its file is shorter than \
             {}",
            self.shown,
            self.pos,
            match self.total {
                Some(total) => format!("the {total} bytes it announced"),
                None => "that".into(),
            }
        )))
    }

    /// Checks that a `206` starts where we are and belongs to the same file.
    fn check_continuation(
        &mut self,
        headers: &HeaderMap,
        validator: Option<&Validator>,
    ) -> Result<(), Failure> {
        let content_range = header_str(headers, CONTENT_RANGE.as_str()).unwrap_or_default();
        let (shown, pos) = (self.shown.clone(), self.pos);
        let bad = |why: &str| {
            Failure::Fatal(Error::DownloadFailed(format!(
                "{shown}: asked to resume at byte {pos}, the server answered Content-Range \
                 {content_range:?}: {why}"
            )))
        };
        let Some((start, total)) = parse_content_range(content_range) else {
            return Err(bad("not a byte range"));
        };
        if start != self.pos {
            return Err(bad("it starts elsewhere"));
        }
        match (self.total, total) {
            (Some(known), Some(total)) if known != total => {
                return Err(Failure::Fatal(self.changed()));
            }
            (Some(_), None) => return Err(bad("the length of the file is missing")),
            (None, total) => self.total = total,
            _ => {}
        }
        // A server that ignores If-Range may still send another version's
        // range; its ETag, when present, gives it away.
        if let Some(validator @ Validator::ETag(_)) = validator
            && headers.get(ETAG).is_some()
            && !validator.matches(headers)
        {
            return Err(Failure::Fatal(self.changed()));
        }
        Ok(())
    }

    fn changed(&self) -> Error {
        Error::DownloadFailed(format!(
            "{}: the file changed on the server during the download (at byte {}); \
             not mixing two versions of it",
            self.shown, self.pos
        ))
    }

    /// Sends a GET, of `range` (a `Range` header value) when given, with
    /// `If-Range` when `validator` is given too.
    fn send(
        &mut self,
        range: Option<&str>,
        validator: Option<&Validator>,
    ) -> Result<reqwest::Response, Failure> {
        let mut request = self
            .client
            .get(self.url.clone())
            .header(ACCEPT_ENCODING, "identity");
        if let Some(range) = range {
            request = request.header(RANGE, range);
            if let Some(validator) = validator {
                request = request.header(IF_RANGE, validator.value());
            }
        }
        let stall = self.opts.stall_timeout;
        // The timer must be created inside the runtime, hence the async block.
        let sent = self
            .rt
            .block_on(async { tokio::time::timeout(stall, request.send()).await });
        match sent {
            Ok(Ok(response)) => Ok(response),
            // A refused redirect is a decision, not a network hiccup.
            Ok(Err(error)) if error.is_redirect() => Err(Failure::Fatal(
                Error::ImageUrlNotAllowed(format!("{}: {}", self.shown, chain(&error))),
            )),
            // A certificate that does not verify will not verify on the
            // next try either: say so now instead of after every retry.
            Ok(Err(error)) if let Some(problem) = certificate_problem(&error) => {
                Err(Failure::Fatal(Error::DownloadFailed(format!(
                    "{}: the server's TLS certificate is not acceptable ({problem}); not retried: {}",
                    self.shown,
                    chain(&error)
                ))))
            }
            Ok(Err(error)) => Err(Failure::Retry {
                reason: chain(&error),
                truncated: false,
            }),
            Err(_) => Err(Failure::Retry {
                reason: format!("no response within {stall:?}"),
                truncated: false,
            }),
        }
    }

    /// A status we did not ask for: retried if the server may recover.
    fn refused(&self, status: StatusCode) -> Failure {
        let reason = format!("the server answered {status}");
        let transient = status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS;
        if transient {
            Failure::Retry {
                reason,
                truncated: false,
            }
        } else {
            Failure::Fatal(Error::DownloadFailed(format!("{}: {reason}", self.shown)))
        }
    }

    /// Counts a failed attempt and waits before the next, or gives up.
    /// `truncated`: the body ended early, as opposed to no body at all.
    fn back_off(&mut self, reason: &str, truncated: bool) -> Result<()> {
        self.response = None;
        self.failures += 1;
        if self.failures > self.opts.retries {
            let message = format!(
                "{}: giving up after {} attempts without progress at byte {}{}: {reason}",
                self.shown,
                self.failures,
                self.pos,
                self.total.map(|t| format!(" of {t}")).unwrap_or_default()
            );
            return Err(if truncated {
                Error::ImageTruncated(message)
            } else {
                Error::DownloadFailed(message)
            });
        }
        let delay = backoff_delay(&self.opts, self.failures);
        crate::metrics::global().http_retries.inc();
        tracing::warn!(
            url = %self.shown,
            position = self.pos,
            attempt = self.failures,
            retries = self.opts.retries,
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            reason,
            "image download interrupted; retrying"
        );
        std::thread::sleep(delay);
        Ok(())
    }

    /// Fills `pending` with the next bytes of the resource, resuming as
    /// needed; leaves it empty only at the end of the resource.
    fn fill(&mut self) -> Result<()> {
        while self.pending.is_empty() && !self.finished {
            if self.last_byte().is_some_and(|last| self.pos >= last) {
                // Exactly the announced bytes; whatever else a lying server
                // sends is not part of the resource.
                self.finish();
                break;
            }
            let Some(response) = self.response.as_mut() else {
                self.connect()?;
                continue;
            };
            let stall = self.opts.stall_timeout;
            let next = self
                .rt
                .block_on(async { tokio::time::timeout(stall, response.chunk()).await });
            match next {
                Ok(Ok(Some(chunk))) => {
                    self.accept(chunk);
                    self.check_rate()?;
                }
                Ok(Ok(None)) => match self.last_byte() {
                    Some(total) => {
                        let reason =
                            format!("the connection closed at byte {} of {total}", self.pos);
                        self.back_off(&reason, true)?;
                    }
                    // Without a length, a clean end of body is the end; the
                    // pipeline's size and hash checks judge the rest.
                    None => self.finish(),
                },
                Ok(Err(error)) => self.back_off(&chain(&error), true)?,
                Err(_) => self.back_off(&format!("no data for {stall:?}"), false)?,
            }
        }
        Ok(())
    }

    /// Takes a chunk off the wire: skips what a restart repeats, clips what a
    /// server sends past the announced length.
    fn accept(&mut self, mut chunk: Bytes) {
        let skip = usize::try_from(self.discard)
            .unwrap_or(usize::MAX)
            .min(chunk.len());
        let _ = chunk.split_to(skip);
        self.discard -= skip as u64;
        if let Some(last) = self.last_byte() {
            let room = usize::try_from(last.saturating_sub(self.pos)).unwrap_or(usize::MAX);
            chunk.truncate(room);
        }
        if !chunk.is_empty() {
            self.failures = 0;
            self.pos += chunk.len() as u64;
            self.pending = chunk;
        }
    }

    /// Abandons a download that stays below `min_rate` for a whole window.
    fn check_rate(&mut self) -> Result<()> {
        let (start, at) = self.rate_window;
        let elapsed = start.elapsed();
        if self.opts.min_rate == 0 || elapsed < self.opts.min_rate_window {
            return Ok(());
        }
        let received = self.pos.saturating_sub(at);
        let floor = self.opts.min_rate.saturating_mul(elapsed.as_secs().max(1));
        if received < floor {
            return Err(Error::DownloadFailed(format!(
                "{}: {received} bytes in {:.0} s, below the minimum of {} bytes/s",
                self.shown,
                elapsed.as_secs_f64(),
                self.opts.min_rate
            )));
        }
        self.rate_window = (std::time::Instant::now(), self.pos);
        Ok(())
    }

    fn finish(&mut self) {
        self.finished = true;
        self.response = None;
    }

    /// Where the bytes to read end: the selected range, else the resource.
    fn last_byte(&self) -> Option<u64> {
        match (self.end, self.total) {
            (Some(end), Some(total)) => Some(end.min(total)),
            (end, total) => end.or(total),
        }
    }
}

impl Read for HttpSource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.failed {
            return Err(Error::DownloadFailed(format!(
                "{}: read after the download already failed",
                self.shown
            ))
            .into_io());
        }
        if let Err(error) = self.fill() {
            self.failed = true;
            self.response = None;
            return Err(error.into_io());
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending.split_to(n));
        crate::metrics::global().bytes_downloaded.inc_by(n as u64);
        Ok(n)
    }
}

/// Fetches a small document (a manifest) with a size limit; for http(s) URLs.
///
/// A document larger than `limit` is `DownloadFailed`, whether its
/// `Content-Length` says so or its body shows it.
pub fn fetch_small(url: &Url, limit: u64, opts: &HttpOptions) -> Result<Vec<u8>> {
    let too_large = || {
        Error::DownloadFailed(format!(
            "{}: the document is larger than the {limit} bytes allowed",
            shown_url(url)
        ))
    };
    let mut source = HttpSource::open(url, opts)?;
    if source.content_length().is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let mut document = Vec::new();
    (&mut source)
        .take(limit.saturating_add(1))
        .read_to_end(&mut document)
        .map_err(|e| Error::from_io(e, &format!("reading {}", shown_url(url))))?;
    if document.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(document)
}

/// Follows up to [`MAX_REDIRECTS`] redirects, each to a URL the policy allows.
fn redirect_policy(policy: Option<UrlPolicy>) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
        }
        match &policy {
            Some(policy) if !(policy.0)(attempt.url()) => {
                let refused = format!(
                    "redirect to {} does not match [image] allowed_urls",
                    shown_url(attempt.url())
                );
                attempt.error(refused)
            }
            _ => attempt.follow(),
        }
    })
}

/// Why an attempt did not give a usable response.
enum Failure {
    /// Worth another attempt after a pause.
    Retry { reason: String, truncated: bool },
    /// Another attempt cannot help (wrong status, another file, ...).
    Fatal(Error),
}

/// What identifies one version of the file across requests, in the order of
/// preference HTTP gives them for `If-Range`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Validator {
    /// A strong entity tag; weak ones cannot guard a range.
    ETag(String),
    /// The `Last-Modified` date, when there is no strong entity tag.
    LastModified(String),
}

impl Validator {
    fn of(headers: &HeaderMap) -> Option<Validator> {
        header_str(headers, ETAG.as_str())
            .filter(|tag| !tag.starts_with("W/"))
            .map(|tag| Validator::ETag(tag.to_string()))
            .or_else(|| {
                header_str(headers, LAST_MODIFIED.as_str())
                    .map(|date| Validator::LastModified(date.to_string()))
            })
    }

    fn value(&self) -> &str {
        match self {
            Validator::ETag(value) | Validator::LastModified(value) => value,
        }
    }

    /// Whether a response carries this same validator.
    fn matches(&self, headers: &HeaderMap) -> bool {
        let name = match self {
            Validator::ETag(_) => ETAG,
            Validator::LastModified(_) => LAST_MODIFIED,
        };
        header_str(headers, name.as_str()) == Some(self.value())
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    header_str(headers, name)?.parse().ok()
}

/// Parses `bytes <start>-<end>/<total or *>` into the start and the total.
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let (range, total) = value.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        total => Some(total.parse::<u64>().ok().filter(|&t| t > end)?),
    };
    Some((start, total))
}

/// The wait before attempt `attempt + 1`: exponential, capped, and spread
/// over its upper half so that a fleet does not retry in lockstep.
fn backoff_delay(opts: &HttpOptions, attempt: u32) -> Duration {
    let exponent = attempt.saturating_sub(1).min(31);
    let capped = opts
        .backoff_base
        .saturating_mul(1 << exponent)
        .min(opts.backoff_max);
    // Any per-process randomness will do; std seeds RandomState randomly.
    let spread = RandomState::new().hash_one(attempt) % 1024;
    capped / 2 + capped / 2 * u32::try_from(spread).unwrap_or(0) / 1023
}

/// The URL without what could be a secret: the password and the query (a
/// signed URL's signature).
fn shown_url(url: &Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("redacted"));
    }
    if shown.query().is_some() {
        shown.set_query(Some("redacted"));
    }
    shown.to_string()
}

/// An error with its causes, which is where reqwest says what went wrong.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The rustls certificate error somewhere in `error`'s causes, described.
/// `io::Error` hides the error it wraps from `source()`, so each one is
/// opened with `get_ref()`.
fn certificate_problem(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current = Some(error);
    while let Some(error) = current {
        match error.downcast_ref::<rustls::Error>() {
            Some(rustls::Error::InvalidCertificate(why)) => return Some(format!("{why:?}")),
            Some(rustls::Error::NoCertificatesPresented) => {
                return Some("the server presented no certificate".into());
            }
            _ => {}
        }
        if let Some(inner) = error
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            && let Some(found) = certificate_problem(inner)
        {
            return Some(found);
        }
        current = error.source();
    }
    None
}

/// reqwest is built without a default TLS crypto provider; rustls needs one
/// per process, and a second install (by anyone) is harmless to ignore.
pub fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use reimage_e2e::http_server::{Fault, FaultServer};

    use super::*;

    const PATH: &str = "/image.raw";

    fn image(len: usize, seed: u64) -> Arc<Vec<u8>> {
        let mut rng = fastrand::Rng::with_seed(seed);
        Arc::new((0..len).map(|_| rng.u8(..)).collect())
    }

    /// Fast retries so that a test that exhausts them stays quick.
    fn opts() -> HttpOptions {
        HttpOptions {
            retries: 4,
            stall_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(5),
            min_rate: 0,
            min_rate_window: Duration::from_secs(60),
            url_policy: None,
        }
    }

    #[test]
    fn a_server_slower_than_the_minimum_rate_is_abandoned() {
        let data = image(100_000, 10);
        let (_server, url) = serve(&data, Fault::SlowBytesPerSec(200));
        let options = HttpOptions {
            min_rate: 10_000,
            min_rate_window: Duration::from_secs(1),
            ..opts()
        };
        let started = std::time::Instant::now();
        let mut source = HttpSource::open(&url, &options).expect("opens");
        let err = io::copy(&mut source, &mut io::sink()).expect_err("too slow");
        let err = Error::from_io(err, "reading");
        assert_eq!(err.code(), "DownloadFailed", "{err}");
        assert!(err.to_string().contains("below the minimum"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "ended within the window"
        );
    }

    #[test]
    fn a_redirect_outside_the_policy_is_refused_without_retrying() {
        let data = image(10_000, 9);
        let (target, target_url) = serve(&data, Fault::None);
        let (redirector, url) = serve(&data, Fault::RedirectTo(target_url.to_string()));
        let allowed_port = url.port();
        let options = HttpOptions {
            url_policy: Some(UrlPolicy(Arc::new(move |u: &Url| u.port() == allowed_port))),
            ..opts()
        };
        let err = HttpSource::open(&url, &options)
            .map(|_| ())
            .expect_err("the redirect leaves the policy");
        assert_eq!(err.code(), "ImageUrlNotAllowed", "{err}");
        assert!(target.requests().is_empty(), "never followed");
        assert_eq!(redirector.requests().len(), 1, "not retried");
        let err = HttpSource::open(&target_url, &options)
            .map(|_| ())
            .expect_err("the first URL leaves the policy");
        assert_eq!(err.code(), "ImageUrlNotAllowed");
    }

    #[test]
    fn redirects_within_the_policy_are_followed() {
        let data = image(10_000, 9);
        let (_target, target_url) = serve(&data, Fault::None);
        let (_redirector, url) = serve(&data, Fault::RedirectTo(target_url.to_string()));
        let mut source = HttpSource::open(&url, &opts()).expect("follows");
        let mut got = Vec::new();
        source.read_to_end(&mut got).expect("reads");
        assert!(got == *data);
    }

    fn serve(data: &Arc<Vec<u8>>, fault: Fault) -> (FaultServer, Url) {
        let server = FaultServer::start(vec![(PATH.into(), Arc::clone(data))], fault);
        let url = Url::parse(&server.url(PATH)).expect("a valid server URL");
        (server, url)
    }

    /// Reads to the end or the first error; returns what was read and the error.
    fn drain(source: &mut HttpSource) -> (Vec<u8>, Option<Error>) {
        let mut received = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match source.read(&mut buf) {
                Ok(0) => return (received, None),
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) => return (received, Some(Error::from_io(e, "reading the test image"))),
            }
        }
    }

    fn download(url: &Url, opts: &HttpOptions) -> (HttpSource, Vec<u8>) {
        let mut source = HttpSource::open(url, opts).expect("opening the download");
        let (received, error) = drain(&mut source);
        if let Some(error) = error {
            panic!("download failed: {error}");
        }
        (source, received)
    }

    fn failed_download(url: &Url, opts: &HttpOptions) -> (Vec<u8>, Error) {
        let mut source = HttpSource::open(url, opts).expect("opening the download");
        let (received, error) = drain(&mut source);
        (received, error.expect("the download to fail"))
    }

    #[test]
    fn downloads_the_exact_bytes_as_stored() {
        let data = image(3 << 20, 1);
        let (server, url) = serve(&data, Fault::None);
        let (source, received) = download(&url, &opts());
        assert!(received == *data, "bytes differ");
        assert_eq!(source.content_length(), Some(data.len() as u64));
        assert_eq!(source.resumes(), 0);
        let requests = server.requests();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].accept_encoding.as_deref(), Some("identity"));
        assert_eq!(requests[0].range, None);
    }

    #[test]
    fn resumes_after_every_dropped_connection() {
        let data = image(1 << 20, 2);
        let (server, url) = serve(&data, Fault::DropEvery(100_000));
        let (source, received) = download(&url, &opts());
        assert!(received == *data, "bytes differ");
        assert!(source.resumes() >= 10, "resumes: {}", source.resumes());
        let etag = server.etag(PATH);
        for request in &server.requests()[1..] {
            assert!(request.range.is_some(), "{request:?}");
            assert_eq!(request.if_range, etag, "{request:?}");
            assert_eq!(request.status, 206);
        }
    }

    #[test]
    fn resumes_after_a_stall() {
        let data = image(1 << 20, 3);
        let stall = Fault::StallOnce {
            after: 300_000,
            for_: Duration::from_secs(60),
        };
        let (server, url) = serve(&data, stall);
        let opts = HttpOptions {
            stall_timeout: Duration::from_millis(300),
            ..opts()
        };
        let (source, received) = download(&url, &opts);
        assert!(received == *data, "bytes differ");
        assert_eq!(source.resumes(), 1);
        assert_eq!(server.requests()[1].range.as_deref(), Some("bytes=300000-"));
    }

    #[test]
    fn a_slow_steady_server_is_not_a_stall() {
        let data = image(60_000, 4);
        let (_server, url) = serve(&data, Fault::SlowBytesPerSec(200_000));
        let opts = HttpOptions {
            stall_timeout: Duration::from_millis(300),
            ..opts()
        };
        let (source, received) = download(&url, &opts);
        assert!(received == *data, "bytes differ");
        assert_eq!(source.resumes(), 0);
    }

    #[test]
    fn restarts_cleanly_when_the_server_ignores_range() {
        let data = image(1 << 20, 5);
        let fault = Fault::All(vec![Fault::IgnoreRange, Fault::DropOnceAt(400_000)]);
        let (server, url) = serve(&data, fault);
        let (source, received) = download(&url, &opts());
        assert!(received == *data, "bytes differ");
        assert_eq!(source.resumes(), 1);
        let statuses: Vec<u16> = server.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [200, 200]);
    }

    /// Reads `range` of the selected source to its end.
    fn read_range(source: &mut HttpSource, range: std::ops::Range<u64>) -> Result<Option<Vec<u8>>> {
        if !source.select_range(range)? {
            return Ok(None);
        }
        let mut bytes = Vec::new();
        source
            .read_to_end(&mut bytes)
            .map_err(|e| Error::from_io(e, "reading the range"))?;
        Ok(Some(bytes))
    }

    #[test]
    fn ranges_are_read_exactly_resumed_and_tied_to_one_version_of_the_file() {
        let data = image(1 << 20, 11);
        let (server, url) = serve(&data, Fault::DropEvery(150_000));
        let mut source = HttpSource::for_ranges(&url, &opts()).expect("no request yet");
        assert!(
            server.requests().is_empty(),
            "nothing is sent before a range is selected"
        );
        for range in [0..1000, 200_000..900_000, 999_999..1_048_576, 5..5] {
            let bytes = read_range(&mut source, range.clone())
                .expect("reads")
                .expect("206");
            assert!(
                bytes[..] == data[range.start as usize..range.end as usize],
                "{range:?}"
            );
        }
        let requests = server.requests();
        assert!(requests.iter().all(|r| r.status == 206), "{requests:?}");
        assert_eq!(requests[0].range.as_deref(), Some("bytes=0-999"));
        assert!(
            requests[0].if_range.is_none(),
            "the first range has no validator yet"
        );
        assert!(
            requests[1..]
                .iter()
                .all(|r| r.if_range == server.etag(PATH)),
            "every later range names the version of the first: {requests:?}"
        );
        assert!(
            requests.len() > 4,
            "the long range resumed after drops: {requests:?}"
        );
    }

    #[test]
    fn a_server_that_ignores_range_is_told_apart_from_a_failure() {
        let data = image(100_000, 12);
        let (_server, url) = serve(&data, Fault::IgnoreRange);
        let mut source = HttpSource::for_ranges(&url, &opts()).expect("no request yet");
        assert_eq!(read_range(&mut source, 10..20).expect("no error"), None);
        let (_server, url) = serve(&data, Fault::Status(404));
        let mut source = HttpSource::for_ranges(&url, &opts()).expect("no request yet");
        let err = read_range(&mut source, 10..20).expect_err("a 404 fails");
        assert!(matches!(err, Error::DownloadFailed(_)), "{err}");
        let (_server, url) = serve(&data, Fault::None);
        let mut source = HttpSource::for_ranges(&url, &opts()).expect("no request yet");
        let err = read_range(&mut source, 100_000..100_010).expect_err("past the end");
        assert!(matches!(err, Error::ImageTruncated(_)), "{err}");
    }

    #[test]
    fn resumes_with_last_modified_when_there_is_no_etag() {
        let data = image(1 << 20, 6);
        let fault = Fault::All(vec![Fault::NoETag, Fault::DropEvery(300_000)]);
        let (server, url) = serve(&data, fault);
        let (source, received) = download(&url, &opts());
        assert!(received == *data, "bytes differ");
        assert!(source.resumes() >= 3);
        assert_eq!(server.requests()[1].if_range, server.last_modified(PATH));
    }

    /// The bytes received before the error are a prefix of the original and
    /// nothing of the replacement follows them.
    fn assert_not_spliced(received: &[u8], original: &[u8], error: &Error) {
        assert_eq!(error.code(), "DownloadFailed", "{error}");
        assert!(error.to_string().contains("changed"), "{error}");
        assert!(received.len() <= 400_000, "read past the change");
        assert!(received == &original[..received.len()], "spliced bytes");
    }

    #[test]
    fn fails_when_the_file_changes_during_the_download() {
        let data = image(1 << 20, 7);
        let fault = Fault::ChangeAfter {
            after: 400_000,
            replacement: image(1 << 20, 8),
        };
        let (server, url) = serve(&data, fault);
        let (received, error) = failed_download(&url, &opts());
        assert_not_spliced(&received, &data, &error);
        assert_eq!(
            server.requests()[1].status,
            200,
            "If-Range sent a new version"
        );
    }

    #[test]
    fn fails_when_a_server_ignoring_if_range_changed_the_file() {
        let data = image(1 << 20, 9);
        let fault = Fault::All(vec![
            Fault::IgnoreIfRange,
            Fault::ChangeAfter {
                after: 400_000,
                replacement: image(1 << 20, 10),
            },
        ]);
        let (server, url) = serve(&data, fault);
        let (received, error) = failed_download(&url, &opts());
        assert_not_spliced(&received, &data, &error);
        assert_eq!(
            server.requests()[1].status,
            206,
            "a range of the new version"
        );
    }

    #[test]
    fn fails_when_a_server_ignoring_range_changed_the_file() {
        let data = image(1 << 20, 11);
        let fault = Fault::All(vec![
            Fault::IgnoreRange,
            Fault::ChangeAfter {
                after: 400_000,
                replacement: image(1 << 20, 12),
            },
        ]);
        let (_server, url) = serve(&data, fault);
        let (received, error) = failed_download(&url, &opts());
        assert_not_spliced(&received, &data, &error);
    }

    #[test]
    fn a_truncated_body_is_image_truncated() {
        let data = image(1 << 20, 13);
        let (server, url) = serve(&data, Fault::TruncateAt(500_000));
        let (received, error) = failed_download(&url, &opts());
        assert_eq!(error.code(), "ImageTruncated", "{error}");
        assert!(received == data[..500_000], "bytes differ");
        assert_eq!(server.requests().len(), 1 + opts().retries as usize);
    }

    #[test]
    fn a_content_length_beyond_the_file_is_image_truncated() {
        let data = image(1 << 20, 14);
        let (_server, url) = serve(&data, Fault::ContentLengthExtra(1000));
        let (received, error) = failed_download(&url, &opts());
        assert_eq!(error.code(), "ImageTruncated", "{error}");
        assert!(error.to_string().contains("416"), "{error}");
        assert!(received == *data, "bytes differ");
    }

    #[test]
    fn a_short_content_length_yields_exactly_the_announced_bytes() {
        let data = image(1 << 20, 15);
        let (_server, url) = serve(&data, Fault::ContentLengthShort(1000));
        let (source, received) = download(&url, &opts());
        let announced = data.len() - 1000;
        assert_eq!(source.content_length(), Some(announced as u64));
        assert!(received == data[..announced], "bytes differ");
    }

    #[test]
    fn client_errors_fail_at_once_with_the_status() {
        let data = image(1000, 16);
        let (server, _) = serve(&data, Fault::None);
        let url = Url::parse(&server.url("/missing")).expect("a valid URL");
        let error = HttpSource::open(&url, &opts())
            .err()
            .expect("a 404 to fail");
        assert_eq!(error.code(), "DownloadFailed");
        assert!(error.to_string().contains("404"), "{error}");
        assert_eq!(server.requests().len(), 1, "a 404 is not retried");
    }

    #[test]
    fn server_errors_are_retried_then_fail_with_the_status() {
        let data = image(1000, 17);
        let (server, url) = serve(&data, Fault::Status(500));
        let error = HttpSource::open(&url, &opts())
            .err()
            .expect("a 500 to fail");
        assert_eq!(error.code(), "DownloadFailed");
        assert!(error.to_string().contains("500"), "{error}");
        assert_eq!(server.requests().len(), 1 + opts().retries as usize);
    }

    #[test]
    fn refuses_to_resume_without_validators() {
        let data = image(1 << 20, 18);
        let fault = Fault::All(vec![Fault::NoValidators, Fault::DropEvery(300_000)]);
        let (server, url) = serve(&data, fault);
        let (received, error) = failed_download(&url, &opts());
        assert_eq!(error.code(), "DownloadFailed");
        assert!(error.to_string().contains("ETag"), "{error}");
        assert!(received == data[..300_000], "bytes differ");
        assert_eq!(server.requests().len(), 1);
    }

    #[test]
    fn unreachable_servers_fail_after_the_retries() {
        let url = {
            let (_server, url) = serve(&image(10, 19), Fault::None);
            url
        };
        let error = HttpSource::open(&url, &opts())
            .err()
            .expect("no server to fail");
        assert_eq!(error.code(), "DownloadFailed", "{error}");
        assert!(
            error.to_string().contains("giving up after 5 attempts"),
            "{error}"
        );
    }

    #[test]
    fn reads_from_a_plain_thread_and_from_spawn_blocking() {
        let data = image(1 << 20, 20);
        let (_server, url) = serve(&data, Fault::DropEvery(400_000));
        let source = HttpSource::open(&url, &opts()).expect("opening the download");
        let reader = std::thread::spawn(move || {
            let mut source = source;
            drain(&mut source).0
        });
        assert!(reader.join().expect("the reader thread") == *data);

        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a test runtime");
        let opts = opts();
        let received = rt
            .block_on(rt.spawn_blocking(move || download(&url, &opts).1))
            .expect("the blocking task");
        assert!(received == *data, "bytes differ");
    }

    #[test]
    fn fetch_small_enforces_its_limit() {
        let manifest = Arc::new(br#"{"name":"test"}"#.to_vec());
        let (server, url) = serve(&manifest, Fault::None);
        let fetched = fetch_small(&url, 100, &opts()).expect("a small document");
        assert_eq!(fetched, *manifest);

        let error = fetch_small(&url, 10, &opts()).expect_err("over the limit");
        assert_eq!(error.code(), "DownloadFailed");
        assert!(error.to_string().contains("larger than"), "{error}");
        assert_eq!(
            server.requests().len(),
            2,
            "no retry of a document too large"
        );
    }

    #[test]
    fn only_http_urls_are_opened() {
        let url = Url::parse("file:///etc/hostname").expect("a valid URL");
        let error = HttpSource::open(&url, &opts())
            .err()
            .expect("file: to be refused");
        assert_eq!(error.code(), "InvalidArgument");
    }

    #[test]
    fn secrets_in_urls_are_not_shown() {
        let url = Url::parse("https://user:hunter2@images.example/a.zst?sig=abc").expect("a URL");
        let shown = shown_url(&url);
        assert!(
            !shown.contains("hunter2") && !shown.contains("abc"),
            "{shown}"
        );
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let opts = HttpOptions::default();
        let first = backoff_delay(&opts, 1);
        assert!(first >= opts.backoff_base / 2 && first <= opts.backoff_base);
        let late = backoff_delay(&opts, 30);
        assert!(late >= opts.backoff_max / 2 && late <= opts.backoff_max);
    }

    #[test]
    fn content_ranges_are_parsed_strictly() {
        assert_eq!(parse_content_range("bytes 5-9/10"), Some((5, Some(10))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("bytes 5-9/9"), None);
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_content_range("items 5-9/10"), None);
    }
}
