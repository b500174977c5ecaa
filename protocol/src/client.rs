//! The typed async client of the API v1 (reqwest, rustls): bearer token,
//! a fresh `client-request-id` on every POST, bounded retries of
//! transient failures that re-send the same id (so a retried reimage is
//! replayed by the agent, never run twice), and [`Client::follow_operation`]
//! that follows an operation across the node's reboot.

use crate::api::{
    AddTaskRequest, DisableSchedulingOption, DisableSchedulingRequest, ErrorBody, List, Node,
    NodeReimageOption, Operation, OperationStatus, PrefetchRequest, RebootRequest, ReimageRequest,
    StagedImageInfo, Task,
};
use crate::error_code::ErrorCode;
use crate::request_id::new_request_id;
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;
use std::sync::{Arc, Once};
use std::time::Duration;
use tokio::time::Instant;

/// The header a caller sets so that a repeated POST is answered with the
/// first one's result.
pub const CLIENT_REQUEST_ID: &str = "client-request-id";

/// How long one request may take, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often [`Client::follow_operation`] asks by default.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// A kept-alive connection unused this long is closed: longer than the
/// poll interval, so a followed operation keeps its one connection, and
/// short, so a fleet's finished nodes do not each keep an fd open.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The agent answered with an error status and (usually) its error body.
    #[error("{}", body.message.value)]
    Api { status: u16, body: ErrorBody },
    /// The agent could not be reached, or the connection broke.
    #[error("{0}")]
    Transport(String),
    /// No answer in time, or an operation still running at the deadline.
    #[error("{0}")]
    Timeout(String),
    /// The node went down to reboot for an operation and its agent did not
    /// answer again before the deadline: the reboot (for an in-place
    /// reimage, the write during it) failed or is stuck. The operation is
    /// to be treated as failed.
    #[error("{0}")]
    NodeDidNotReturn(String),
    /// The answer was not what the API describes.
    #[error("{0}")]
    Decode(String),
    /// The agent's base URL is unusable.
    #[error("{0}")]
    InvalidUrl(String),
}

impl ClientError {
    /// A stable code: the API's (`NodeBeingReimaged`, `TaskNotFound`, ...)
    /// or `ConnectionFailed`, `Timeout`, `InvalidResponse`, `InvalidUrl`.
    pub fn code(&self) -> ErrorCode {
        match self {
            ClientError::Api { body, .. } => body.code.clone(),
            ClientError::Transport(_) => ErrorCode::ConnectionFailed,
            ClientError::Timeout(_) => ErrorCode::Timeout,
            ClientError::NodeDidNotReturn(_) => ErrorCode::NodeDidNotReturn,
            ClientError::Decode(_) => ErrorCode::InvalidResponse,
            ClientError::InvalidUrl(_) => ErrorCode::InvalidUrl,
        }
    }

    /// The HTTP status, for errors the agent answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Worth another try: the agent was unreachable, slow, or a proxy in
    /// front of it said it is (502, 503, 504).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport(_) | ClientError::Timeout(_) => true,
            ClientError::Api { status, .. } => matches!(status, 502..=504),
            ClientError::Decode(_)
            | ClientError::InvalidUrl(_)
            | ClientError::NodeDidNotReturn(_) => false,
        }
    }
}

/// How often and how patiently transient failures are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all, the first included (at least 1).
    pub attempts: u32,
    /// The wait before the first retry; it doubles with every retry.
    pub first_backoff: Duration,
    /// The longest wait between two tries.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            first_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(4),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed try number `tried` (1-based).
    fn backoff(&self, tried: u32) -> Duration {
        let factor = 1u32
            .checked_shl(tried.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.first_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// What [`Client::follow_operation`] saw.
#[derive(Debug)]
pub enum WaitEvent<'a> {
    /// The operation, the first time and whenever it changed.
    Observed(&'a Operation),
    /// A poll failed with a transient error (the node rebooting, the agent
    /// restarting); polling goes on until the deadline.
    Unreachable(&'a ClientError),
}

/// Which connections a [`Client`] keeps open after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// At most one idle connection per agent, closed after 2 s unused: a
    /// followed operation reuses it, a finished node's goes away.
    OnePerAgent,
    /// None: every request opens its own connection and closes it, so the
    /// open fds are exactly the requests in flight (one-shot reads of many
    /// agents at once).
    None,
}

/// A client of one agent. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base_url: String,
    token: Option<Arc<str>>,
    retry: RetryPolicy,
    poll_interval: Duration,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the token.
        f.debug_struct("Client")
            .field("base_url", &self.base_url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("retry", &self.retry)
            .finish()
    }
}

impl Client {
    /// A client of the agent at `base_url` (`http://10.0.0.5:7480`, or an
    /// `https://` URL, possibly with a path prefix) sending `token`.
    pub fn new(base_url: &str, token: Option<String>) -> Result<Client, ClientError> {
        Client::with_pool(base_url, token, KeepAlive::OnePerAgent)
    }

    /// As [`Client::new`], with `keep_alive` deciding which connections
    /// outlive their request (so a fleet's fds follow its parallelism).
    pub fn with_pool(
        base_url: &str,
        token: Option<String>,
        keep_alive: KeepAlive,
    ) -> Result<Client, ClientError> {
        let base_url = parse_base_url(base_url)?;
        install_crypto_provider();
        let idle_per_agent = match keep_alive {
            KeepAlive::OnePerAgent => 1,
            KeepAlive::None => 0,
        };
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(idle_per_agent)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .user_agent(concat!("reimage-protocol/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Transport(format!("building the HTTP client: {e}")))?;
        Ok(Client {
            http,
            base_url,
            token: token.map(Arc::from),
            retry: RetryPolicy::default(),
            poll_interval: POLL_INTERVAL,
        })
    }

    /// A client of another agent sharing this one's token, settings and
    /// connection pool (one per fleet, not one per node).
    pub fn with_base_url(&self, base_url: &str) -> Result<Client, ClientError> {
        Ok(Client {
            base_url: parse_base_url(base_url)?,
            ..self.clone()
        })
    }

    /// The same client with another retry policy.
    pub fn with_retry_policy(mut self, retry: RetryPolicy) -> Client {
        self.retry = retry;
        self
    }

    /// The same client polling operations every `interval`.
    pub fn with_poll_interval(mut self, interval: Duration) -> Client {
        self.poll_interval = interval;
        self
    }

    /// The agent's base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `GET /v1/node`.
    pub async fn node(&self) -> Result<Node, ClientError> {
        self.get("/v1/node").await
    }

    /// `POST /v1/node/reimage`: the accepted operation.
    pub async fn reimage(&self, request: &ReimageRequest) -> Result<Operation, ClientError> {
        self.post("/v1/node/reimage", request).await
    }

    /// `POST /v1/node/reboot`: the accepted operation.
    pub async fn reboot(&self, option: NodeReimageOption) -> Result<Operation, ClientError> {
        let request = RebootRequest {
            node_reboot_option: option,
        };
        self.post("/v1/node/reboot", &request).await
    }

    /// `POST /v1/images/prefetch`: the accepted operation.
    pub async fn prefetch(&self, request: &PrefetchRequest) -> Result<Operation, ClientError> {
        self.post("/v1/images/prefetch", request).await
    }

    /// `GET /v1/images`: the images staged on the node.
    pub async fn staged_images(&self) -> Result<Vec<StagedImageInfo>, ClientError> {
        let list: List<StagedImageInfo> = self.get("/v1/images").await?;
        Ok(list.value)
    }

    /// `GET /v1/operations/{id}`.
    pub async fn operation(&self, id: &str) -> Result<Operation, ClientError> {
        self.get(&format!("/v1/operations/{}", path_segment(id)))
            .await
    }

    /// `GET /v1/operations`, oldest first.
    pub async fn operations(&self) -> Result<Vec<Operation>, ClientError> {
        let list: List<Operation> = self.get("/v1/operations").await?;
        Ok(list.value)
    }

    /// Follows operation `id` to `Succeeded` or `Failed` and returns it.
    /// Survives the agent going away during the node's reboot (connection
    /// refused, reset, timeouts) and coming back with a new boot, until
    /// `deadline`; calls `on_update` on each new observation.
    pub async fn wait_for_operation(
        &self,
        id: &str,
        deadline: Duration,
        mut on_update: impl FnMut(&Operation),
    ) -> Result<Operation, ClientError> {
        self.follow_operation(id, deadline, |event| {
            if let WaitEvent::Observed(operation) = event {
                on_update(operation);
            }
        })
        .await
    }

    /// As [`Client::wait_for_operation`], also telling when a poll failed.
    /// An error that is not transient (the operation is unknown, the token
    /// refused) ends the wait at once.
    pub async fn follow_operation(
        &self,
        id: &str,
        deadline: Duration,
        mut on_event: impl FnMut(WaitEvent<'_>),
    ) -> Result<Operation, ClientError> {
        let path = format!("/v1/operations/{}", path_segment(id));
        let give_up = Instant::now() + deadline;
        let mut last: Option<Operation> = None;
        loop {
            let remaining = give_up.saturating_duration_since(Instant::now());
            // One try per poll: the polling is the retry.
            let failure = match self
                .execute(Method::GET, &path, None, remaining.min(REQUEST_TIMEOUT), 1)
                .await
                .and_then(|bytes| decode::<Operation>(&path, &bytes))
            {
                Ok(operation) => {
                    if last.as_ref() != Some(&operation) {
                        on_event(WaitEvent::Observed(&operation));
                    }
                    if operation.status != OperationStatus::InProgress {
                        return Ok(operation);
                    }
                    last = Some(operation);
                    None
                }
                Err(err) if err.is_transient() => {
                    on_event(WaitEvent::Unreachable(&err));
                    Some(err)
                }
                Err(err) => return Err(err),
            };
            let remaining = give_up.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(wait_timeout(id, deadline, last.as_ref(), failure.as_ref()));
            }
            tokio::time::sleep(self.poll_interval.min(remaining)).await;
        }
    }

    /// The SHA-256 of the raw image an image manifest at `url` describes.
    /// The manifest lives on an image server, not on the agent: it is
    /// fetched without the agent's token.
    pub async fn manifest_sha256(&self, url: &str) -> Result<String, ClientError> {
        #[derive(serde::Deserialize)]
        struct Described {
            sha256: String,
        }
        let bytes = exchange(self.http.get(url), &format!("GET {url}")).await?;
        let described: Described = decode(url, &bytes)?;
        Ok(described.sha256.to_ascii_lowercase())
    }

    /// `POST /v1/tasks`: the task as created.
    pub async fn add_task(&self, request: &AddTaskRequest) -> Result<Task, ClientError> {
        self.post("/v1/tasks", request).await
    }

    /// `GET /v1/tasks`.
    pub async fn tasks(&self) -> Result<Vec<Task>, ClientError> {
        let list: List<Task> = self.get("/v1/tasks").await?;
        Ok(list.value)
    }

    /// `GET /v1/tasks/{id}`.
    pub async fn task(&self, id: &str) -> Result<Task, ClientError> {
        self.get(&format!("/v1/tasks/{}", path_segment(id))).await
    }

    /// `GET /v1/tasks/{id}/files/{name}` (`stdout.txt`, `stderr.txt`), as
    /// text (invalid UTF-8 replaced).
    pub async fn task_file(&self, id: &str, name: &str) -> Result<String, ClientError> {
        let path = format!(
            "/v1/tasks/{}/files/{}",
            path_segment(id),
            path_segment(name)
        );
        let bytes = self
            .execute(
                Method::GET,
                &path,
                None,
                REQUEST_TIMEOUT,
                self.retry.attempts,
            )
            .await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// `DELETE /v1/tasks/{id}`.
    pub async fn delete_task(&self, id: &str) -> Result<(), ClientError> {
        let path = format!("/v1/tasks/{}", path_segment(id));
        self.execute(
            Method::DELETE,
            &path,
            None,
            REQUEST_TIMEOUT,
            self.retry.attempts,
        )
        .await
        .map(drop)
    }

    /// `POST /v1/node/disablescheduling`.
    pub async fn disable_scheduling(
        &self,
        option: DisableSchedulingOption,
    ) -> Result<(), ClientError> {
        let request = DisableSchedulingRequest {
            node_disable_scheduling_option: option,
        };
        self.post_empty("/v1/node/disablescheduling", &request)
            .await
    }

    /// `POST /v1/node/enablescheduling`.
    pub async fn enable_scheduling(&self) -> Result<(), ClientError> {
        self.post_empty("/v1/node/enablescheduling", &serde_json::json!({}))
            .await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let bytes = self
            .execute(
                Method::GET,
                path,
                None,
                REQUEST_TIMEOUT,
                self.retry.attempts,
            )
            .await?;
        decode(path, &bytes)
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        let bytes = self.post_bytes(path, body).await?;
        decode(path, &bytes)
    }

    async fn post_empty(&self, path: &str, body: &impl Serialize) -> Result<(), ClientError> {
        self.post_bytes(path, body).await.map(drop)
    }

    async fn post_bytes(&self, path: &str, body: &impl Serialize) -> Result<Vec<u8>, ClientError> {
        let body = serde_json::to_vec(body)
            .map_err(|e| ClientError::Decode(format!("encoding the body of {path}: {e}")))?;
        self.execute(
            Method::POST,
            path,
            Some(body),
            REQUEST_TIMEOUT,
            self.retry.attempts,
        )
        .await
    }

    /// Sends one call, up to `attempts` times while it fails transiently.
    /// A POST carries one `client-request-id` for all its tries, so the
    /// agent answers a retry with what the first try created.
    async fn execute(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
        attempts: u32,
    ) -> Result<Vec<u8>, ClientError> {
        let url = format!("{}{path}", self.base_url);
        let client_request_id = (method == Method::POST).then(new_request_id);
        let mut tried = 0;
        loop {
            tried += 1;
            let result = self
                .send_once(
                    &method,
                    &url,
                    body.as_deref(),
                    client_request_id.as_deref(),
                    timeout,
                )
                .await;
            match result {
                Err(err) if err.is_transient() && tried < attempts.max(1) => {
                    tokio::time::sleep(self.retry.backoff(tried)).await;
                }
                // A DELETE retried after its answer was lost finds the
                // resource gone: what the caller asked for happened.
                Err(ClientError::Api { status: 404, .. })
                    if method == Method::DELETE && tried > 1 =>
                {
                    return Ok(Vec::new());
                }
                other => return other,
            }
        }
    }

    async fn send_once(
        &self,
        method: &Method,
        url: &str,
        body: Option<&[u8]>,
        client_request_id: Option<&str>,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        let mut request = self
            .http
            .request(method.clone(), url)
            .timeout(timeout)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(id) = client_request_id {
            request = request.header(CLIENT_REQUEST_ID, id);
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_vec());
        }
        exchange(request, &format!("{method} {url}")).await
    }
}

/// Sends `request` (described as `what` in errors) and returns the body of
/// a success; any other status is [`ClientError::Api`] with its error body.
async fn exchange(request: reqwest::RequestBuilder, what: &str) -> Result<Vec<u8>, ClientError> {
    let response = request
        .send()
        .await
        .map_err(|e| transport_error(what, &e))?;
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| transport_error(what, &e))?
        .to_vec();
    if status.is_success() {
        Ok(bytes)
    } else {
        Err(ClientError::Api {
            status: status.as_u16(),
            body: error_body(status, &bytes),
        })
    }
}

/// Checks an agent's base URL (`http://` or `https://`, a host, no query)
/// and returns it without its trailing slash.
pub fn parse_base_url(base_url: &str) -> Result<String, ClientError> {
    let invalid = |why: &str| ClientError::InvalidUrl(format!("{base_url:?}: {why}"));
    let url = Url::parse(base_url).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("an agent URL is http:// or https://"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("a base URL has no query or fragment"));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// The error body of a failed answer; a proxy's page or an empty body
/// becomes a body with the code `Http<status>`.
fn error_body(status: StatusCode, bytes: &[u8]) -> ErrorBody {
    serde_json::from_slice(bytes).unwrap_or_else(|_| {
        let text = String::from_utf8_lossy(bytes);
        let text = text.trim();
        let message = if text.is_empty() {
            status.canonical_reason().unwrap_or("no body").to_string()
        } else {
            text.chars().take(200).collect()
        };
        ErrorBody::new(
            ErrorCode::Other(format!("Http{}", status.as_u16())),
            message,
        )
    })
}

fn decode<T: DeserializeOwned>(path: &str, bytes: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ClientError::Decode(format!("the answer to {path} is not as expected: {e}")))
}

/// `what: <innermost cause>`: reqwest's outer messages repeat the URL and
/// say little; the innermost cause says what happened (`Connection refused`).
fn transport_error(what: &str, err: &reqwest::Error) -> ClientError {
    let mut innermost: &dyn std::error::Error = err;
    while let Some(source) = innermost.source() {
        innermost = source;
    }
    let message = format!("{what}: {innermost}");
    if err.is_timeout() {
        ClientError::Timeout(message)
    } else if err.is_decode() {
        ClientError::Decode(message)
    } else {
        ClientError::Transport(message)
    }
}

fn wait_timeout(
    id: &str,
    deadline: Duration,
    last: Option<&Operation>,
    last_error: Option<&ClientError>,
) -> ClientError {
    let mut message = format!(
        "operation {id} did not end within {}s",
        deadline.as_secs_f64().round()
    );
    if let Some(operation) = last {
        let phase = operation
            .phase
            .map(|p| format!("{p:?}"))
            .unwrap_or_else(|| "-".into());
        message.push_str(&format!("; last seen InProgress in phase {phase}"));
    }
    if let Some(err) = last_error {
        message.push_str(&format!("; the agent is unreachable: {err}"));
    }
    let rebooting = last.is_some_and(|op| op.phase == Some(crate::Phase::Rebooting));
    if rebooting && last_error.is_some() {
        message.push_str(
            "; the node went down to reboot and has not come back: treat the operation as failed and look at the node's console",
        );
        return ClientError::NodeDidNotReturn(message);
    }
    ClientError::Timeout(message)
}

/// Percent-encodes one path segment (ids are plain, but a caller's typo
/// must not reach another route).
fn path_segment(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// reqwest is built without a default TLS crypto provider; rustls needs one
/// per process, and a second install (by anyone) is harmless to ignore.
fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[cfg(test)]
mod tests;
