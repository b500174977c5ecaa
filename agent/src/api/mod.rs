//! HTTP API v1 (axum): the routes of DESIGN.md, one error body, a
//! `request-id` on every answer, bearer-token roles, and `client-request-id`
//! idempotency for POSTs. Every route is declared once, in [`routes`], with
//! its OpenAPI description next to its handler; the router and
//! `/v1/openapi.json` are both built from that one list.

pub mod auth;
pub mod batch;
pub mod body;
pub mod error;
pub mod openapi;
pub mod seed;
pub mod tls;

use crate::api::auth::Role;
use crate::ops::Agent;
use crate::pattern::Pattern;
use crate::tasks::Requester;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::header::{CONTENT_TYPE, LOCATION};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use body::{JsonBody, OptionalJsonBody};
use error::ApiError;
use reimage_protocol::ErrorCode;
use reimage_protocol::api::{
    AddTaskRequest, DisableSchedulingRequest, ErrorBody, List, Node, Operation, PrefetchRequest,
    RebootRequest, ReimageRequest, StagedImageInfo, Task,
};
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// `request-id`: set on every response (the operation id for reimage and reboot).
pub const REQUEST_ID: HeaderName = HeaderName::from_static("request-id");
/// `client-request-id`: a caller's retry key for POSTs.
pub const CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("client-request-id");
/// `return-client-request-id: true` asks for `client-request-id` back.
pub const RETURN_CLIENT_REQUEST_ID: HeaderName =
    HeaderName::from_static("return-client-request-id");
/// The message of the `404` for a path no route matches.
pub const NO_SUCH_ROUTE: &str = "no such route";

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub agent: Arc<Agent>,
    pub tokens: Arc<Vec<auth::Token>>,
    /// `http` or `https`, for the URLs the Batch routes answer with.
    pub scheme: &'static str,
}

/// Every route of the API with its description. Only `routes!` may add a
/// route here: it takes the path and methods from the handler's
/// `#[utoipa::path]`, so a route cannot exist undocumented.
pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(node))
        .routes(routes!(reimage))
        .routes(routes!(reboot))
        .routes(routes!(disable_scheduling))
        .routes(routes!(enable_scheduling))
        .routes(routes!(operations))
        .routes(routes!(operation))
        .routes(routes!(add_task, list_tasks))
        .routes(routes!(get_task, delete_task))
        .routes(routes!(task_file))
        .routes(routes!(prefetch))
        .routes(routes!(staged_images))
        .routes(routes!(delete_staged_image))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(batch::list_nodes))
        .routes(routes!(batch::get_node))
        .routes(routes!(batch::reimage))
        .routes(routes!(batch::reboot))
        .routes(routes!(batch::disable_scheduling))
        .routes(routes!(batch::enable_scheduling))
        .routes(routes!(seed::role_instance))
        .routes(routes!(seed::role_instance_by_slot))
        .routes(routes!(seed::operation_status))
}

/// The API description served at `/v1/openapi.json`.
pub fn description() -> serde_json::Value {
    openapi::complete(routes().into_openapi())
}

/// `/v1/openapi.json`'s body, serialised once.
#[derive(Clone)]
struct OpenApiJson(Bytes);

/// The API's router.
pub fn router(state: ApiState) -> Router {
    let (router, paths) = routes().split_for_parts();
    let json = openapi::complete(paths).to_string().into_bytes();
    router
        .fallback(|| async { ApiError::not_found(ErrorCode::ResourceNotFound, NO_SUCH_ROUTE) })
        .layer(Extension(OpenApiJson(Bytes::from(json))))
        .layer(DefaultBodyLimit::max(body::BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

/// Gives every response a `request-id`, unless the handler set one, and
/// echoes `client-request-id` when the caller sent
/// `return-client-request-id: true` (as Batch does).
async fn request_id(request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = request.method().clone();
    // The route's template, not the path: ids in paths must not become labels.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    // The Service Management routes do not take the header: it is ignored
    // there, as any unknown header.
    let echo = return_client_request_id(request.headers()).or_else(|err| {
        if seed::is_service_management(&route) {
            Ok(false)
        } else {
            Err(err)
        }
    });
    let mut response = match echo {
        Ok(echo) => {
            let echo = echo
                .then(|| request.headers().get(&CLIENT_REQUEST_ID).cloned())
                .flatten();
            let mut response = next.run(request).await;
            if let Some(client_request_id) = echo {
                response
                    .headers_mut()
                    .insert(CLIENT_REQUEST_ID, client_request_id);
            }
            response
        }
        Err(err) => err.into_response(),
    };
    if !response.headers().contains_key(REQUEST_ID)
        && let Ok(value) = HeaderValue::from_str(&crate::ops::new_request_id())
    {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    let metrics = crate::metrics::global();
    metrics
        .api_requests
        .with_label_values(&[method.as_str(), &route, response.status().as_str()])
        .inc();
    metrics
        .api_request_duration
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Refuses requests without the role their route needs; Service
/// Management routes get the refusal in their own XML shape. The caller's
/// role rides on an accepted request (an extension) for handlers whose
/// answer depends on it, such as `POST /v1/tasks`.
async fn authenticate(State(state): State<ApiState>, mut request: Request, next: Next) -> Response {
    let Some(needed) = auth::required_role(request.method(), request.uri().path()) else {
        return next.run(request).await;
    };
    let err = match auth::authorize(&state.tokens, request.headers(), needed) {
        Ok(role) => {
            request.extensions_mut().insert(role);
            return next.run(request).await;
        }
        Err(err) => err,
    };
    tracing::info!(method = %request.method(), path = request.uri().path(), code = %err.body.code, "request refused");
    let service_management = request
        .extensions()
        .get::<MatchedPath>()
        .is_some_and(|route| seed::is_service_management(route.as_str()));
    let unauthorized = err.status == StatusCode::UNAUTHORIZED;
    let mut response = if service_management {
        seed::XmlError::from(err).into_response()
    } else {
        err.into_response()
    };
    if unauthorized {
        response
            .headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
    }
    response
}

/// Sets header `name` to `value`; a value no header can carry is left out.
pub(crate) fn insert_header(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// A `client-request-id`: 1 to 128 visible ASCII characters, spaces only
/// between them.
pub static CLIENT_REQUEST_ID_PATTERN: Pattern = Pattern::new("^[!-~](?:[ -~]{0,126}[!-~])?$");

/// `return-client-request-id`: `true` or `false` in any letter case, as the
/// description's boolean; absent is `false`.
fn return_client_request_id(headers: &HeaderMap) -> Result<bool, ApiError> {
    let Some(value) = headers.get(&RETURN_CLIENT_REQUEST_ID) else {
        return Ok(false);
    };
    match value.to_str().map(str::to_ascii_lowercase).as_deref() {
        Ok("true") => Ok(true),
        Ok("false") => Ok(false),
        _ => Err(ApiError::bad_request(
            ErrorCode::InvalidHeaderValue,
            "return-client-request-id must be true or false",
        )),
    }
}

pub(crate) fn client_request_id(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(&CLIENT_REQUEST_ID) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .ok()
        .filter(|v| CLIENT_REQUEST_ID_PATTERN.is_match(v))
        .ok_or_else(|| {
            ApiError::bad_request(
                ErrorCode::InvalidHeaderValue,
                "client-request-id must be 1-128 visible characters",
            )
        })?;
    Ok(Some(text.to_string()))
}

/// Liveness: answers `ok` without a token.
#[utoipa::path(get, path = "/healthz", tag = "agent",
    responses((status = 200, description = "the agent serves", body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok"
}

/// The node: state, scheduling, tasks, image, disk and saved partitions.
#[utoipa::path(get, path = "/v1/node", tag = "node",
    responses((status = 200, description = "the node", body = Node)))]
async fn node(State(state): State<ApiState>) -> impl IntoResponse {
    Json(state.agent.node())
}

/// `202 Accepted` with the operation, its id as `request-id` and `Location`.
fn accepted(operation: Operation) -> Response {
    let mut response = (StatusCode::ACCEPTED, Json(&operation)).into_response();
    let headers = response.headers_mut();
    insert_header(headers, REQUEST_ID, &operation.id);
    insert_header(
        headers,
        LOCATION,
        &format!("/v1/operations/{}", operation.id),
    );
    response
}

/// Reimages the node under `nodeReimageOption`, with the given image or the
/// configured one. An empty body means `requeue` and the configured image.
#[utoipa::path(post, path = "/v1/node/reimage", tag = "node",
    params(("client-request-id" = Option<String>, Header, description = "retry key: the same value returns the same operation")),
    request_body(content = Option<ReimageRequest>, content_type = "application/json"),
    responses(
        (status = 202, description = "accepted; follow the operation", body = Operation, headers(
            ("request-id" = String, description = "the operation id"),
            ("Location" = String, description = "/v1/operations/{id}"))),
        (status = 400, description = "InvalidRequestBody, MissingImage, InvalidImageUrl, ImageUrlNotAllowed", body = ErrorBody),
        (status = 409, description = "NodeBeingReimaged, NodeBeingRebooted, NodeBeingStarted or OperationInvalidForCurrentState", body = ErrorBody)))]
async fn reimage(
    State(state): State<ApiState>,
    headers: HeaderMap,
    OptionalJsonBody(request): OptionalJsonBody<ReimageRequest>,
) -> Result<Response, ApiError> {
    let client_id = client_request_id(&headers)?;
    let operation = state.agent.reimage(request, client_id.as_deref()).await?;
    Ok(accepted(operation))
}

/// Reboots the node under `nodeRebootOption` (the four reimage options).
#[utoipa::path(post, path = "/v1/node/reboot", tag = "node",
    params(("client-request-id" = Option<String>, Header, description = "retry key: the same value returns the same operation")),
    request_body(content = Option<RebootRequest>, content_type = "application/json"),
    responses(
        (status = 202, description = "accepted; follow the operation", body = Operation, headers(
            ("request-id" = String, description = "the operation id"),
            ("Location" = String, description = "/v1/operations/{id}"))),
        (status = 409, description = "the node's state refuses a reboot", body = ErrorBody)))]
async fn reboot(
    State(state): State<ApiState>,
    headers: HeaderMap,
    OptionalJsonBody(request): OptionalJsonBody<RebootRequest>,
) -> Result<Response, ApiError> {
    let client_id = client_request_id(&headers)?;
    let operation = state.agent.reboot(request, client_id.as_deref()).await?;
    Ok(accepted(operation))
}

/// Stops giving the node new tasks; running ones are requeued, terminated or
/// left to complete.
#[utoipa::path(post, path = "/v1/node/disablescheduling", tag = "node",
    request_body(content = Option<DisableSchedulingRequest>, content_type = "application/json"),
    responses(
        (status = 200, description = "scheduling disabled"),
        (status = 409, description = "the node's state refuses it", body = ErrorBody)))]
async fn disable_scheduling(
    State(state): State<ApiState>,
    OptionalJsonBody(request): OptionalJsonBody<DisableSchedulingRequest>,
) -> Result<StatusCode, ApiError> {
    state
        .agent
        .disable_scheduling(request.node_disable_scheduling_option)
        .await?;
    Ok(StatusCode::OK)
}

/// Lets the node take tasks again.
#[utoipa::path(post, path = "/v1/node/enablescheduling", tag = "node",
    responses(
        (status = 200, description = "scheduling enabled"),
        (status = 409, description = "the node's state refuses it", body = ErrorBody)))]
async fn enable_scheduling(State(state): State<ApiState>) -> Result<StatusCode, ApiError> {
    state.agent.enable_scheduling().await?;
    Ok(StatusCode::OK)
}

/// Every operation, newest last.
#[utoipa::path(get, path = "/v1/operations", tag = "operations",
    responses((status = 200, description = "the operations", body = List<Operation>)))]
async fn operations(State(state): State<ApiState>) -> impl IntoResponse {
    Json(List {
        value: state.agent.operations(),
    })
}

/// One operation: status, phase, progress, tasks it requeued or stopped, error.
#[utoipa::path(get, path = "/v1/operations/{id}", tag = "operations",
    params(("id" = String, Path, description = "the operation id (the `request-id` of its POST)")),
    responses(
        (status = 200, description = "the operation", body = Operation),
        (status = 404, description = "OperationNotFound", body = ErrorBody)))]
async fn operation(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Operation>, ApiError> {
    state.agent.operation(&id).map(Json).ok_or_else(|| {
        ApiError::not_found(ErrorCode::OperationNotFound, format!("no operation {id}"))
    })
}

/// Adds a task; it runs when the node takes tasks.
#[utoipa::path(post, path = "/v1/tasks", tag = "tasks",
    params(("client-request-id" = Option<String>, Header, description = "retry key: the same value returns the same task")),
    request_body(content = AddTaskRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "added", body = Task, headers(
            ("Location" = String, description = "/v1/tasks/{id}"))),
        (status = 400, description = "MissingRequestBody, InvalidRequestBody, InvalidTaskId, InvalidDuration, UnsupportedUserIdentity, …", body = ErrorBody),
        (status = 403, description = "InsufficientPermissions: elevationLevel admin needs an admin token", body = ErrorBody),
        (status = 409, description = "TaskExists or NodeNotAcceptingTasks", body = ErrorBody)))]
async fn add_task(
    State(state): State<ApiState>,
    role: Option<Extension<Role>>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<AddTaskRequest>,
) -> Result<Response, ApiError> {
    let client_id = client_request_id(&headers)?;
    // Only an admin token may have a task run as root.
    let requester = match role {
        Some(Extension(Role::Admin)) => Requester::Admin,
        _ => Requester::Operator,
    };
    let task = state
        .agent
        .add_task(request, requester, client_id.as_deref())
        .await?;
    let mut response = (StatusCode::CREATED, Json(&task)).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/tasks/{}", task.id)) {
        response.headers_mut().insert(LOCATION, location);
    }
    Ok(response)
}

/// Every task the node knows.
#[utoipa::path(get, path = "/v1/tasks", tag = "tasks",
    responses((status = 200, description = "the tasks", body = List<Task>)))]
async fn list_tasks(State(state): State<ApiState>) -> impl IntoResponse {
    Json(List {
        value: state.agent.tasks.list(),
    })
}

/// One task.
#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "tasks",
    params(("id" = String, Path, description = "the task id")),
    responses(
        (status = 200, description = "the task", body = Task),
        (status = 404, description = "TaskNotFound", body = ErrorBody)))]
async fn get_task(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let task = state
        .agent
        .tasks
        .get(&id)
        .ok_or_else(|| ApiError::not_found(ErrorCode::TaskNotFound, format!("no task {id}")))?;
    Ok(Json(task).into_response())
}

/// Deletes a task: stops it if it runs and removes its directory.
#[utoipa::path(delete, path = "/v1/tasks/{id}", tag = "tasks",
    params(("id" = String, Path, description = "the task id")),
    responses(
        (status = 200, description = "deleted"),
        (status = 404, description = "TaskNotFound", body = ErrorBody)))]
async fn delete_task(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.agent.tasks.delete(&id).await?;
    Ok(StatusCode::OK)
}

/// A task's `stdout.txt` or `stderr.txt`, while its directory is retained.
#[utoipa::path(get, path = "/v1/tasks/{id}/files/{name}", tag = "tasks",
    params(
        ("id" = String, Path, description = "the task id"),
        ("name" = String, Path, description = "`stdout.txt` or `stderr.txt`")),
    responses(
        (status = 200, description = "the file", body = String, content_type = "text/plain"),
        (status = 404, description = "TaskNotFound or TaskFileNotFound", body = ErrorBody)))]
async fn task_file(
    State(state): State<ApiState>,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let path = state.agent.tasks.file(&id, &name)?;
    let file = tokio::fs::File::open(&path).await.map_err(|_| {
        ApiError::not_found(
            ErrorCode::TaskFileNotFound,
            format!("task {id} has no {name} (yet, or any more)"),
        )
    })?;
    let stream = tokio_util::io::ReaderStream::new(file);
    Ok((
        [(CONTENT_TYPE, "text/plain; charset=utf-8")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// Downloads and verifies an image into the staging area while the node
/// keeps working (its state, tasks and image are not changed): an
/// operation of kind `prefetch`. A later reimage of the same image (same
/// SHA-256, or the same manifest URL) writes the staged copy and
/// downloads nothing. An empty body prefetches the configured image.
#[utoipa::path(post, path = "/v1/images/prefetch", tag = "images",
    params(("client-request-id" = Option<String>, Header, description = "retry key: the same value returns the same operation")),
    request_body(content = Option<PrefetchRequest>, content_type = "application/json"),
    responses(
        (status = 202, description = "accepted; follow the operation", body = Operation, headers(
            ("request-id" = String, description = "the operation id"),
            ("Location" = String, description = "/v1/operations/{id}"))),
        (status = 400, description = "InvalidRequestBody, MissingImage, InvalidImageUrl, ImageUrlNotAllowed, ManifestUnsigned, StagingSpaceInsufficient (prefetching is off)", body = ErrorBody)))]
async fn prefetch(
    State(state): State<ApiState>,
    headers: HeaderMap,
    OptionalJsonBody(request): OptionalJsonBody<PrefetchRequest>,
) -> Result<Response, ApiError> {
    let client_id = client_request_id(&headers)?;
    let operation = state.agent.prefetch(request, client_id.as_deref()).await?;
    Ok(accepted(operation))
}

/// The staged images: prefetched, verified, waiting for the reimage that
/// writes them (oldest first).
#[utoipa::path(get, path = "/v1/images", tag = "images",
    responses((status = 200, description = "the staged images", body = List<StagedImageInfo>)))]
async fn staged_images(
    State(state): State<ApiState>,
) -> Result<Json<List<StagedImageInfo>>, ApiError> {
    Ok(Json(List {
        value: state.agent.staged_images()?,
    }))
}

/// Deletes a staged image; a reimage of it downloads it again.
#[utoipa::path(delete, path = "/v1/images/{sha256}", tag = "images",
    params(("sha256" = String, Path, description = "the SHA-256 of the decoded image")),
    responses(
        (status = 200, description = "deleted"),
        (status = 404, description = "StagedImageNotFound", body = ErrorBody)))]
async fn delete_staged_image(
    State(state): State<ApiState>,
    Path(sha256): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.agent.delete_staged_image(&sha256)?;
    Ok(StatusCode::OK)
}

/// Prometheus text: counters of operations (by kind, status and code),
/// bytes downloaded and written, retries, read-back mismatches, task
/// transitions and API requests; histograms of operation, phase and
/// request durations; gauges of the node's state, scheduling, the current
/// phase and its progress, tasks by state, retained bytes, the last
/// operation's time and the build.
#[utoipa::path(get, path = "/metrics", tag = "agent",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain")))]
async fn metrics(State(state): State<ApiState>) -> impl IntoResponse {
    state.agent.observe_gauges();
    (
        [(CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::global().render(),
    )
}

/// This description (OpenAPI 3.1), generated from the routes and the wire types.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "agent",
    responses((status = 200, description = "the OpenAPI description", body = Object, content_type = "application/json")))]
async fn openapi_json(Extension(OpenApiJson(json)): Extension<OpenApiJson>) -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/json")], json)
}
