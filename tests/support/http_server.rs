//! A real HTTP/1.1 file server that misbehaves on purpose, for testing image
//! downloads against the faults real networks and servers produce.
//!
//! It is hand-written over [`TcpListener`] (one thread per connection, one
//! response per connection, `Connection: close`) so that it can lie in its
//! headers and cut a connection at an exact byte offset, which an HTTP
//! framework would not allow.
//!
//! ```no_run
//! use std::sync::Arc;
//! use reimage_e2e::http_server::{Fault, FaultServer};
//!
//! let image = Arc::new(vec![7u8; 1 << 20]);
//! let server = FaultServer::start(vec![("/img.raw".into(), image)], Fault::DropEvery(64 << 10));
//! let url = server.url("/img.raw"); // http://127.0.0.1:PORT/img.raw
//! // ... download `url`, then look at what the client asked for:
//! assert!(server.requests().iter().skip(1).all(|r| r.range.is_some()));
//! ```
//!
//! Offsets in [`Fault`] are absolute positions in the file unless the variant
//! says otherwise. Faults that fire "once" are re-armed by
//! [`FaultServer::set_fault`].

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Bodies are written in slices of this size straight from the shared file,
/// so files of hundreds of MiB are served without copies.
const SLICE: u64 = 256 << 10;

/// Request heads larger than this are refused: no test client sends them.
const MAX_HEAD: usize = 64 << 10;

/// Idle sockets are given up after this long, so a client that vanished
/// without closing cannot keep a server thread alive forever.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

/// `Last-Modified` of the first version of a file (2023-11-14T22:13:20Z);
/// every new version is one minute later, so dates differ between versions.
const FIRST_MODIFIED: u64 = 1_700_000_000;

/// What the server does wrong. Combine several with [`Fault::All`].
#[derive(Clone, Debug)]
pub enum Fault {
    /// Behave.
    None,
    /// Close every connection after sending this many body bytes on it.
    DropEvery(u64),
    /// Close the first connection whose body reaches this offset, once.
    DropOnceAt(u64),
    /// The first time a body reaches offset `after`, send nothing for `for_`
    /// (or until [`FaultServer::end_stall`], or the server is dropped), then
    /// go on sending.
    StallOnce {
        /// Offset at which the stall starts.
        after: u64,
        /// How long the stall lasts.
        for_: Duration,
    },
    /// Ignore `Range`: answer `200` with the whole file.
    IgnoreRange,
    /// Honour `Range` but ignore `If-Range`, like a careless proxy.
    IgnoreIfRange,
    /// The first time a body reaches offset `after`, replace the file with
    /// `replacement` (new validators) and close that connection.
    ChangeAfter {
        /// Offset at which the file changes.
        after: u64,
        /// The file's new content.
        replacement: Arc<Vec<u8>>,
    },
    /// Every response closes once the body reaches this offset.
    TruncateAt(u64),
    /// Announce this many more bytes in `Content-Length` than are sent.
    ContentLengthExtra(u64),
    /// Announce this many fewer bytes in `Content-Length` than are sent
    /// (the whole body is sent anyway).
    ContentLengthShort(u64),
    /// Answer every request with this status and a short text body.
    Status(u16),
    /// Answer every request with `302 Found` and this `Location`.
    RedirectTo(String),
    /// Send neither `ETag` nor `Last-Modified`.
    NoValidators,
    /// Send `Last-Modified` but no `ETag`.
    NoETag,
    /// Send bodies at about this many bytes per second.
    SlowBytesPerSec(u64),
    /// All of these at once.
    All(Vec<Fault>),
}

/// One request as the server saw it, and the status it answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestLog {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The path, without the query string.
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// The `If-Range` header, if any.
    pub if_range: Option<String>,
    /// The `Accept-Encoding` header, if any.
    pub accept_encoding: Option<String>,
    /// The status code of the answer.
    pub status: u16,
}

/// The fault-injecting server; it listens on `127.0.0.1` on a free port and
/// stops (ending stalls and open connections) when dropped.
pub struct FaultServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultServer {
    /// Starts serving `files` (path such as `/img.zst`, content) with `fault`.
    ///
    /// Panics if no local port can be bound: without it there is no test.
    pub fn start(files: Vec<(String, Arc<Vec<u8>>)>, fault: Fault) -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the test HTTP server");
        let addr = listener
            .local_addr()
            .expect("reading the test HTTP server's address");
        let mut state = State {
            files: HashMap::new(),
            fault,
            log: Vec::new(),
            fired: Fired::default(),
            versions: 0,
        };
        for (path, data) in files {
            state.insert(path, data);
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            stopping: Mutex::new(false),
            stall_ended: AtomicBool::new(false),
            wake: Condvar::new(),
            connections: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("fault-server".into())
                .spawn(move || accept_loop(&listener, &shared))
                .expect("spawning the test HTTP server thread")
        };
        FaultServer {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// The URL of `path` on this server: `http://127.0.0.1:PORT/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<RequestLog> {
        self.shared.state().log.clone()
    }

    /// Forgets the requests logged so far.
    pub fn clear_requests(&self) {
        self.shared.state().log.clear();
    }

    /// Changes the fault for the requests that follow, and re-arms the
    /// faults that fire once.
    pub fn set_fault(&self, fault: Fault) {
        let mut state = self.shared.state();
        state.fault = fault;
        state.fired = Fired::default();
    }

    /// Ends a [`Fault::StallOnce`] stall now, so a test can hold a download
    /// until it has seen what it waits for, without guessing a duration.
    pub fn end_stall(&self) {
        let _stopping = lock(&self.shared.stopping);
        self.shared.stall_ended.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
    }

    /// Replaces (or adds) a file; it gets a new `ETag` and `Last-Modified`.
    pub fn replace_file(&self, path: &str, data: Arc<Vec<u8>>) {
        self.shared.state().insert(path.to_string(), data);
    }

    /// The `ETag` currently served for `path`.
    pub fn etag(&self, path: &str) -> Option<String> {
        self.shared.state().files.get(path).map(|f| f.etag.clone())
    }

    /// The `Last-Modified` currently served for `path`.
    pub fn last_modified(&self, path: &str) -> Option<String> {
        self.shared
            .state()
            .files
            .get(path)
            .map(|f| f.last_modified.clone())
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        *lock(&self.shared.stopping) = true;
        self.shared.wake.notify_all();
        // accept() only returns on a connection: make one so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let connections = std::mem::take(&mut *lock(&self.shared.connections));
        for (stream, _) in &connections {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for (_, handle) in connections {
            let _ = handle.join();
        }
    }
}

struct Shared {
    state: Mutex<State>,
    /// Set when the server is dropped; `wake` tells stalled threads.
    stopping: Mutex<bool>,
    /// Set by [`FaultServer::end_stall`]; `wake` tells stalled threads.
    stall_ended: AtomicBool,
    wake: Condvar,
    /// Open connections, so that drop can cut them and wait for their threads.
    connections: Mutex<Vec<(TcpStream, JoinHandle<()>)>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn stopping(&self) -> bool {
        *lock(&self.stopping)
    }

    /// Waits for `duration` or until the server stops or the stall is
    /// ended, whichever is first. Returns whether the server is stopping.
    fn pause(&self, duration: Duration) -> bool {
        let deadline = Instant::now() + duration;
        let mut stopping = lock(&self.stopping);
        while !*stopping && !self.stall_ended.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            stopping = self
                .wake
                .wait_timeout(stopping, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        *stopping
    }
}

/// A test thread that panicked must not take every later request down too.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

struct State {
    files: HashMap<String, File>,
    fault: Fault,
    log: Vec<RequestLog>,
    fired: Fired,
    versions: u64,
}

impl State {
    fn insert(&mut self, path: String, data: Arc<Vec<u8>>) {
        self.versions += 1;
        let version = self.versions;
        let file = File {
            etag: format!("\"v{version}-{:x}\"", data.len()),
            last_modified: http_date(FIRST_MODIFIED + 60 * version),
            data,
        };
        self.files.insert(path, file);
    }
}

#[derive(Clone)]
struct File {
    data: Arc<Vec<u8>>,
    etag: String,
    last_modified: String,
}

/// Which of the faults that fire once already did.
#[derive(Default)]
struct Fired {
    drop_once: bool,
    stall: bool,
    change: bool,
}

/// A [`Fault`] flattened into what to do at each step of a response.
#[derive(Default)]
struct Plan {
    drop_every: Option<u64>,
    drop_once_at: Option<u64>,
    stall: Option<(u64, Duration)>,
    ignore_range: bool,
    ignore_if_range: bool,
    change: Option<(u64, Arc<Vec<u8>>)>,
    truncate_at: Option<u64>,
    length_extra: u64,
    length_short: u64,
    status: Option<u16>,
    redirect: Option<String>,
    no_validators: bool,
    no_etag: bool,
    bytes_per_sec: Option<u64>,
}

impl Plan {
    fn of(fault: &Fault) -> Plan {
        let mut plan = Plan::default();
        plan.add(fault);
        plan
    }

    fn add(&mut self, fault: &Fault) {
        match fault {
            Fault::None => {}
            Fault::DropEvery(n) => self.drop_every = Some(*n),
            Fault::DropOnceAt(at) => self.drop_once_at = Some(*at),
            Fault::StallOnce { after, for_ } => self.stall = Some((*after, *for_)),
            Fault::IgnoreRange => self.ignore_range = true,
            Fault::IgnoreIfRange => self.ignore_if_range = true,
            Fault::ChangeAfter { after, replacement } => {
                self.change = Some((*after, Arc::clone(replacement)));
            }
            Fault::TruncateAt(at) => self.truncate_at = Some(*at),
            Fault::ContentLengthExtra(n) => self.length_extra = *n,
            Fault::ContentLengthShort(n) => self.length_short = *n,
            Fault::Status(code) => self.status = Some(*code),
            Fault::RedirectTo(location) => self.redirect = Some(location.clone()),
            Fault::NoValidators => self.no_validators = true,
            Fault::NoETag => self.no_etag = true,
            Fault::SlowBytesPerSec(rate) => self.bytes_per_sec = Some((*rate).max(1)),
            Fault::All(faults) => faults.iter().for_each(|f| self.add(f)),
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopping() {
            return;
        }
        let Ok(stream) = stream else { continue };
        let Ok(handle_copy) = stream.try_clone() else {
            continue;
        };
        let worker = {
            let shared = Arc::clone(shared);
            thread::Builder::new()
                .name("fault-server-conn".into())
                .spawn(move || {
                    // A failed connection only ends that connection.
                    let _ = serve_connection(stream, &shared);
                })
        };
        if let Ok(worker) = worker {
            let mut connections = lock(&shared.connections);
            connections.retain(|(_, h)| !h.is_finished());
            connections.push((handle_copy, worker));
        }
    }
}

/// The parts of a request the server acts on.
struct Request {
    method: String,
    path: String,
    range: Option<String>,
    if_range: Option<String>,
    accept_encoding: Option<String>,
}

fn read_request(stream: &TcpStream) -> io::Result<Option<Request>> {
    let mut reader = BufReader::new(stream.take(MAX_HEAD as u64));
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Ok(None);
    };
    let mut request = Request {
        method: method.to_string(),
        path: target.split('?').next().unwrap_or(target).to_string(),
        range: None,
        if_range: None,
        accept_encoding: None,
    };
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let header = line.trim_end();
        if header.is_empty() {
            return Ok(Some(request));
        }
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        let value = Some(value.trim().to_string());
        match name.trim().to_ascii_lowercase().as_str() {
            "range" => request.range = value,
            "if-range" => request.if_range = value,
            "accept-encoding" => request.accept_encoding = value,
            _ => {}
        }
    }
}

fn serve_connection(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    let result = serve_request(&mut stream, shared);
    // The acceptor holds a clone of the socket: closing our handle is not
    // enough to make the client see the end of the connection.
    let _ = stream.shutdown(Shutdown::Both);
    result
}

fn serve_request(stream: &mut TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_read_timeout(Some(SOCKET_TIMEOUT))?;
    stream.set_write_timeout(Some(SOCKET_TIMEOUT))?;
    let Some(request) = read_request(stream)? else {
        return Ok(());
    };
    let (plan, file) = {
        let state = shared.state();
        (
            Plan::of(&state.fault),
            state.files.get(&request.path).cloned(),
        )
    };
    respond(stream, shared, &request, &plan, file)
}

fn log(shared: &Shared, request: &Request, status: u16) {
    shared.state().log.push(RequestLog {
        method: request.method.clone(),
        path: request.path.clone(),
        range: request.range.clone(),
        if_range: request.if_range.clone(),
        accept_encoding: request.accept_encoding.clone(),
        status,
    });
}

fn respond(
    stream: &mut TcpStream,
    shared: &Shared,
    request: &Request,
    plan: &Plan,
    file: Option<File>,
) -> io::Result<()> {
    let head_only = request.method == "HEAD";
    if request.method != "GET" && !head_only {
        log(shared, request, 405);
        return send_text(stream, 405, "only GET and HEAD\n", false);
    }
    if let Some(code) = plan.status {
        log(shared, request, code);
        return send_text(stream, code, "fault injected\n", head_only);
    }
    if let Some(location) = &plan.redirect {
        log(shared, request, 302);
        let head = format!(
            "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return stream.write_all(head.as_bytes());
    }
    let Some(file) = file else {
        log(shared, request, 404);
        return send_text(stream, 404, "no such file\n", head_only);
    };
    let len = file.data.len() as u64;

    let range = request
        .range
        .as_deref()
        .filter(|_| !plan.ignore_range)
        .and_then(parse_range)
        .filter(|_| {
            // If-Range: the range only applies to the version the client has.
            let sent_etag = !plan.no_validators && !plan.no_etag;
            let sent_date = !plan.no_validators;
            plan.ignore_if_range
                || request.if_range.as_deref().is_none_or(|v| {
                    (sent_etag && v == file.etag) || (sent_date && v == file.last_modified)
                })
        });

    let mut head = String::new();
    let (status, start, end) = match range {
        Some((start, _)) if start >= len => {
            log(shared, request, 416);
            head.push_str(&format!("Content-Range: bytes */{len}\r\n"));
            send_head(stream, 416, &head, 0)?;
            return stream.flush();
        }
        Some((start, last)) => {
            let end = last.map_or(len, |last| (last + 1).min(len));
            head.push_str(&format!(
                "Content-Range: bytes {start}-{}/{len}\r\n",
                end - 1
            ));
            (206, start, end)
        }
        None => (200, 0, len),
    };
    let announced = (end - start + plan.length_extra).saturating_sub(plan.length_short);
    if !plan.no_validators {
        if !plan.no_etag {
            head.push_str(&format!("ETag: {}\r\n", file.etag));
        }
        head.push_str(&format!("Last-Modified: {}\r\n", file.last_modified));
    }
    head.push_str("Accept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\n");
    log(shared, request, status);
    send_head(stream, status, &head, announced)?;
    if head_only {
        return stream.flush();
    }
    send_body(stream, shared, plan, &request.path, &file.data, start, end)
}

/// Parses `bytes=N-` and `bytes=N-M`; anything else is ignored (a `200`),
/// which HTTP allows.
fn parse_range(value: &str) -> Option<(u64, Option<u64>)> {
    let spec = value.trim().strip_prefix("bytes=")?;
    let (first, last) = spec.split_once('-')?;
    let first: u64 = first.trim().parse().ok()?;
    let last = match last.trim() {
        "" => None,
        last => Some(last.parse::<u64>().ok().filter(|&l| l >= first)?),
    };
    Some((first, last))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Fault",
    }
}

fn send_head(stream: &mut TcpStream, status: u16, extra: &str, length: u64) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Length: {length}\r\nConnection: close\r\n{extra}\r\n",
        reason(status)
    );
    stream.write_all(head.as_bytes())
}

fn send_text(stream: &mut TcpStream, status: u16, text: &str, head_only: bool) -> io::Result<()> {
    send_head(
        stream,
        status,
        "Content-Type: text/plain\r\n",
        text.len() as u64,
    )?;
    if !head_only {
        stream.write_all(text.as_bytes())?;
    }
    stream.flush()
}

/// Writes `data[start..end]`, firing the plan's faults at their offsets.
/// Returning early closes the connection: that is how drops are made.
fn send_body(
    stream: &mut TcpStream,
    shared: &Shared,
    plan: &Plan,
    path: &str,
    data: &[u8],
    start: u64,
    end: u64,
) -> io::Result<()> {
    let mut offset = start;
    while offset < end {
        let mut stop = end.min(offset + SLICE);
        if let Some(per_connection) = plan.drop_every {
            let limit = start.saturating_add(per_connection);
            if offset >= limit {
                return Ok(());
            }
            stop = stop.min(limit);
        }
        if let Some(at) = plan.truncate_at {
            if offset >= at {
                return Ok(());
            }
            stop = stop.min(at);
        }
        if let Some(at) = plan.drop_once_at {
            if once(shared, offset >= at, |f| &mut f.drop_once) {
                return Ok(());
            }
            if offset < at {
                stop = stop.min(at);
            }
        }
        if let Some((after, duration)) = plan.stall {
            if once(shared, offset >= after, |f| &mut f.stall) {
                stream.flush()?;
                if shared.pause(duration) {
                    return Ok(());
                }
            }
            if offset < after {
                stop = stop.min(after);
            }
        }
        if let Some((after, replacement)) = &plan.change {
            if once(shared, offset >= *after, |f| &mut f.change) {
                shared
                    .state()
                    .insert(path.to_string(), Arc::clone(replacement));
                return Ok(());
            }
            if offset < *after {
                stop = stop.min(*after);
            }
        }
        if let Some(rate) = plan.bytes_per_sec {
            // Twenty small writes a second look like a slow, steady link.
            stop = stop.min(offset + (rate / 20).max(1));
        }
        write_slice(stream, data, offset, stop)?;
        offset = stop;
        if plan.bytes_per_sec.is_some() && shared.pause(Duration::from_millis(50)) {
            return Ok(());
        }
    }
    stream.flush()
}

/// Marks a once-only fault as fired when `due`; true if this call fired it.
fn once(shared: &Shared, due: bool, flag: impl FnOnce(&mut Fired) -> &mut bool) -> bool {
    if !due {
        return false;
    }
    let mut state = shared.state();
    let fired = flag(&mut state.fired);
    !std::mem::replace(fired, true)
}

fn write_slice(stream: &mut TcpStream, data: &[u8], from: u64, to: u64) -> io::Result<()> {
    // The file can be shorter than the range when ContentLengthExtra lies.
    let len = data.len();
    let from = usize::try_from(from).unwrap_or(len).min(len);
    let to = usize::try_from(to).unwrap_or(len).min(len);
    stream.write_all(&data[from..to])
}

/// Formats seconds since the epoch as an HTTP date
/// (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn http_date(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm), valid for all u64 dates here.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response read off the wire by [`exchange`].
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// Sends one request with raw headers and reads the reply to EOF.
    fn exchange(server: &FaultServer, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut stream = TcpStream::connect(server.addr).expect("connecting to the test server");
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream
            .write_all(request.as_bytes())
            .expect("sending the request");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).expect("reading the reply");
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a complete reply head");
        let head = String::from_utf8(raw[..split].to_vec()).expect("an ASCII reply head");
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        Reply {
            status,
            headers,
            body: raw[split + 4..].to_vec(),
        }
    }

    fn data(len: usize) -> Arc<Vec<u8>> {
        Arc::new((0..len).map(|i| (i * 7 + i / 251) as u8).collect())
    }

    fn server(fault: Fault) -> (FaultServer, Arc<Vec<u8>>) {
        let file = data(1_000_000);
        (
            FaultServer::start(vec![("/img".into(), Arc::clone(&file))], fault),
            file,
        )
    }

    #[test]
    fn serves_the_whole_file_with_validators() {
        let (server, file) = server(Fault::None);
        let reply = exchange(&server, "GET", "/img", &[]);
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, *file);
        assert_eq!(reply.header("content-length"), Some("1000000"));
        assert_eq!(reply.header("etag"), server.etag("/img").as_deref());
        assert_eq!(
            reply.header("last-modified"),
            server.last_modified("/img").as_deref()
        );
        assert_eq!(reply.header("accept-ranges"), Some("bytes"));
    }

    #[test]
    fn ranges_get_206_with_content_range() {
        let (server, file) = server(Fault::None);
        let open = exchange(&server, "GET", "/img", &[("Range", "bytes=999000-")]);
        assert_eq!(open.status, 206);
        assert_eq!(
            open.header("content-range"),
            Some("bytes 999000-999999/1000000")
        );
        assert_eq!(open.body, file[999_000..]);

        let closed = exchange(&server, "GET", "/img", &[("Range", "bytes=10-19")]);
        assert_eq!(closed.status, 206);
        assert_eq!(closed.header("content-range"), Some("bytes 10-19/1000000"));
        assert_eq!(closed.header("content-length"), Some("10"));
        assert_eq!(closed.body, file[10..20]);
    }

    #[test]
    fn if_range_applies_the_range_only_to_the_same_version() {
        let (server, file) = server(Fault::None);
        let etag = server.etag("/img").expect("an etag");
        let date = server.last_modified("/img").expect("a date");
        for validator in [etag.as_str(), date.as_str()] {
            let same = exchange(
                &server,
                "GET",
                "/img",
                &[("Range", "bytes=500-"), ("If-Range", validator)],
            );
            assert_eq!(same.status, 206, "If-Range {validator}");
            assert_eq!(same.body, file[500..]);
        }
        let other = exchange(
            &server,
            "GET",
            "/img",
            &[("Range", "bytes=500-"), ("If-Range", "\"old\"")],
        );
        assert_eq!(other.status, 200);
        assert_eq!(other.body, *file);

        server.replace_file("/img", data(10));
        let replaced = exchange(
            &server,
            "GET",
            "/img",
            &[("Range", "bytes=5-"), ("If-Range", &etag)],
        );
        assert_eq!(replaced.status, 200, "a new version has new validators");
        assert_ne!(replaced.header("etag"), Some(etag.as_str()));
        assert_ne!(replaced.header("last-modified"), Some(date.as_str()));
    }

    #[test]
    fn a_range_past_the_end_is_416() {
        let (server, _) = server(Fault::None);
        let reply = exchange(&server, "GET", "/img", &[("Range", "bytes=1000000-")]);
        assert_eq!(reply.status, 416);
        assert_eq!(reply.header("content-range"), Some("bytes */1000000"));
        assert!(reply.body.is_empty());
    }

    #[test]
    fn head_sends_the_headers_without_the_body() {
        let (server, _) = server(Fault::None);
        let reply = exchange(&server, "HEAD", "/img", &[]);
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-length"), Some("1000000"));
        assert!(reply.body.is_empty());
        assert_eq!(server.requests()[0].method, "HEAD");
    }

    #[test]
    fn unknown_paths_are_404_and_status_faults_apply() {
        let (server, _) = server(Fault::None);
        assert_eq!(exchange(&server, "GET", "/nope", &[]).status, 404);
        server.set_fault(Fault::Status(503));
        assert_eq!(exchange(&server, "GET", "/img", &[]).status, 503);
        let statuses: Vec<u16> = server.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [404, 503]);
    }

    #[test]
    fn faults_cut_and_mislabel_bodies() {
        let (server, file) = server(Fault::DropEvery(300_000));
        let reply = exchange(&server, "GET", "/img", &[("Range", "bytes=100-")]);
        assert_eq!(reply.body, file[100..300_100]);

        server.set_fault(Fault::TruncateAt(400_000));
        let reply = exchange(&server, "GET", "/img", &[("Range", "bytes=100-")]);
        assert_eq!(reply.body, file[100..400_000]);

        server.set_fault(Fault::ContentLengthShort(10));
        let reply = exchange(&server, "GET", "/img", &[]);
        assert_eq!(reply.header("content-length"), Some("999990"));
        assert_eq!(reply.body, *file, "the whole body is sent anyway");

        server.set_fault(Fault::All(vec![Fault::NoValidators, Fault::IgnoreRange]));
        let reply = exchange(&server, "GET", "/img", &[("Range", "bytes=100-")]);
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("etag"), None);
        assert_eq!(reply.header("last-modified"), None);
    }

    #[test]
    fn a_stall_ends_when_the_server_is_dropped() {
        let (server, _) = server(Fault::StallOnce {
            after: 1000,
            for_: Duration::from_secs(600),
        });
        let mut stream = TcpStream::connect(server.addr).expect("connecting to the test server");
        stream
            .write_all(b"GET /img HTTP/1.1\r\nHost: test\r\n\r\n")
            .expect("sending the request");
        // The head and the first 1000 bytes arrive, then nothing.
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        while !received.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).expect("reading the head");
            assert!(n > 0, "the server closed before the stall");
            received.extend_from_slice(&buf[..n]);
        }
        let started = Instant::now();
        drop(server);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "dropping the server waited for the stall"
        );
    }

    #[test]
    fn http_dates_are_formatted_like_rfc_9110() {
        assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(http_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
    }
}
