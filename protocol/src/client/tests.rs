//! The client against tiny local servers that misbehave on purpose.

use super::*;
use crate::api::{OperationKind, OperationProgress};
use axum::Json;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use std::sync::Mutex;

fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        attempts: 3,
        first_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(20),
    }
}

fn operation(status: OperationStatus) -> Operation {
    let at = jiff::Timestamp::UNIX_EPOCH;
    Operation {
        id: "op-1".into(),
        kind: OperationKind::Reimage,
        status,
        phase: None,
        progress: OperationProgress::default(),
        node_reimage_option: NodeReimageOption::Requeue,
        requeued_tasks: vec![],
        terminated_tasks: vec![],
        error: None,
        image: None,
        created_at: at,
        updated_at: at,
        ended_at: None,
        duration_seconds: None,
        boot_entry: None,
        reboot: None,
    }
}

/// Serves `router` on `listener` in the background.
fn serve_on(
    listener: tokio::net::TcpListener,
    router: axum::Router,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    })
}

async fn serve(router: axum::Router) -> (Client, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let client = Client::new(&url, Some("secret".into()))
        .expect("client")
        .with_retry_policy(quick_retries())
        .with_poll_interval(Duration::from_millis(20));
    (client, serve_on(listener, router))
}

#[tokio::test]
async fn a_retried_post_resends_the_same_client_request_id() {
    let seen_log: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let log = Arc::clone(&seen_log);
    let router = axum::Router::new().route(
        "/v1/node/reimage",
        post(move |headers: HeaderMap| {
            let log = Arc::clone(&log);
            async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string()
                };
                let mut log = log.lock().expect("log");
                log.push((header(CLIENT_REQUEST_ID), header("authorization")));
                if log.len() < 3 {
                    StatusCode::SERVICE_UNAVAILABLE.into_response()
                } else {
                    (
                        StatusCode::ACCEPTED,
                        Json(operation(OperationStatus::InProgress)),
                    )
                        .into_response()
                }
            }
        }),
    );
    let (client, _server) = serve(router).await;
    let accepted = client
        .reimage(&ReimageRequest::default())
        .await
        .expect("accepted on the third try");
    assert_eq!(accepted.id, "op-1");
    let seen = seen_log.lock().expect("log").clone();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|(id, _)| *id == seen[0].0), "{seen:?}");
    assert_eq!(seen[0].0.len(), 36, "a UUID: {seen:?}");
    assert_eq!(seen[0].1, "Bearer secret");

    client
        .reimage(&ReimageRequest::default())
        .await
        .expect("accepted");
    let seen = seen_log.lock().expect("log").clone();
    assert_eq!(seen.len(), 4);
    assert_ne!(seen[3].0, seen[0].0, "a new call has a new id");
}

#[tokio::test]
async fn api_errors_keep_their_code_and_are_not_retried() {
    let calls = Arc::new(Mutex::new(0));
    let count = Arc::clone(&calls);
    let router = axum::Router::new().route(
        "/v1/node/reboot",
        post(move || {
            let count = Arc::clone(&count);
            async move {
                *count.lock().expect("count") += 1;
                (
                    StatusCode::CONFLICT,
                    Json(ErrorBody::new(
                        ErrorCode::NodeBeingReimaged,
                        "the node is reimaging",
                    )),
                )
            }
        }),
    );
    let (client, _server) = serve(router).await;
    let err = client
        .reboot(NodeReimageOption::Requeue)
        .await
        .expect_err("conflict");
    assert_eq!(err.code(), "NodeBeingReimaged");
    assert_eq!(err.status(), Some(409));
    assert_eq!(err.to_string(), "the node is reimaging");
    assert_eq!(*calls.lock().expect("count"), 1);
}

#[tokio::test]
async fn a_proxy_error_page_becomes_an_http_code_after_the_retries() {
    let calls = Arc::new(Mutex::new(0));
    let count = Arc::clone(&calls);
    let router = axum::Router::new().route(
        "/v1/node",
        get(move || {
            let count = Arc::clone(&count);
            async move {
                *count.lock().expect("count") += 1;
                (StatusCode::BAD_GATEWAY, "<html>upstream down</html>")
            }
        }),
    );
    let (client, _server) = serve(router).await;
    let err = client.node().await.expect_err("bad gateway");
    assert_eq!(err.code(), "Http502");
    assert!(err.to_string().contains("upstream down"), "{err}");
    assert_eq!(*calls.lock().expect("count"), 3, "retried as policy says");
}

#[tokio::test]
async fn a_retried_delete_that_finds_the_task_gone_succeeded() {
    let calls = Arc::new(Mutex::new(0));
    let count = Arc::clone(&calls);
    let router = axum::Router::new().route(
        "/v1/tasks/{id}",
        axum::routing::delete(move || {
            let count = Arc::clone(&count);
            async move {
                let mut count = count.lock().expect("count");
                *count += 1;
                if *count == 1 {
                    // The delete happened, but its answer was lost.
                    StatusCode::GATEWAY_TIMEOUT.into_response()
                } else {
                    (
                        StatusCode::NOT_FOUND,
                        Json(ErrorBody::new(ErrorCode::TaskNotFound, "no task t1")),
                    )
                        .into_response()
                }
            }
        }),
    );
    let (client, _server) = serve(router).await;
    client.delete_task("t1").await.expect("gone is deleted");
    let err = client.delete_task("t1").await.expect_err("first try 404");
    assert_eq!(err.code(), "TaskNotFound");
}

#[tokio::test]
async fn an_unreachable_agent_is_a_connection_failure() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let client = Client::new(&format!("http://127.0.0.1:{port}/"), None)
        .expect("client")
        .with_retry_policy(quick_retries());
    assert_eq!(client.base_url(), format!("http://127.0.0.1:{port}"));
    let err = client.node().await.expect_err("nobody listens");
    assert_eq!(err.code(), "ConnectionFailed");
    assert!(err.is_transient());
    assert!(err.to_string().contains("/v1/node"), "{err}");
}

#[test]
fn base_urls_must_be_http_without_a_query() {
    for bad in [
        "ftp://host/",
        "not a url",
        "http://host/?x=1",
        "unix:/run/sock",
    ] {
        let err = Client::new(bad, None).expect_err(bad);
        assert_eq!(err.code(), "InvalidUrl", "{bad}");
    }
    let client = Client::new("https://proxy.example/agents/n1/", None).expect("prefix");
    assert_eq!(client.base_url(), "https://proxy.example/agents/n1");
    let other = client
        .with_base_url("http://10.0.0.2:7480/")
        .expect("another agent");
    assert_eq!(other.base_url(), "http://10.0.0.2:7480");
    assert_eq!(
        client
            .with_base_url("10.0.0.2:7480")
            .map(|_| ())
            .map_err(|e| e.code().to_string()),
        Err("InvalidUrl".to_string())
    );
}

#[tokio::test]
async fn waiting_follows_an_operation_through_an_agent_restart() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    // `Connection: close`, so that stopping the server leaves no kept-alive
    // connection answering for it.
    let in_progress = axum::Router::new().route(
        "/v1/operations/{id}",
        get(|| async {
            (
                [(axum::http::header::CONNECTION, "close")],
                Json(operation(OperationStatus::InProgress)),
            )
        }),
    );
    let first = serve_on(listener, in_progress);
    let client = Client::new(&format!("http://{addr}"), None)
        .expect("client")
        .with_retry_policy(quick_retries())
        .with_poll_interval(Duration::from_millis(20));

    let events: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = Arc::clone(&events);
    let waiter = tokio::spawn(async move {
        client
            .follow_operation("op-1", Duration::from_secs(20), |event| {
                let line = match event {
                    WaitEvent::Observed(op) => format!("{:?}", op.status),
                    WaitEvent::Unreachable(err) => err.code().to_string(),
                };
                log.lock().expect("log").push(line);
            })
            .await
    });
    wait_until(|| events.lock().expect("log").contains(&"InProgress".into())).await;
    first.abort();
    let _ = first.await;
    wait_until(|| {
        events
            .lock()
            .expect("log")
            .contains(&"ConnectionFailed".into())
    })
    .await;
    let listener = tokio::net::TcpListener::bind(addr).await.expect("rebind");
    let done = axum::Router::new().route(
        "/v1/operations/{id}",
        get(|| async { Json(operation(OperationStatus::Succeeded)) }),
    );
    let _second = serve_on(listener, done);
    let finished = waiter.await.expect("joined").expect("followed to the end");
    assert_eq!(finished.status, OperationStatus::Succeeded);
    let events = events.lock().expect("log").clone();
    assert_eq!(events.first().map(String::as_str), Some("InProgress"));
    assert_eq!(events.last().map(String::as_str), Some("Succeeded"));
    assert_eq!(
        events.iter().filter(|e| *e == "InProgress").count(),
        1,
        "an unchanged operation is reported once: {events:?}"
    );
}

#[tokio::test]
async fn waiting_gives_up_at_the_deadline_with_the_last_phase() {
    let router = axum::Router::new().route(
        "/v1/operations/{id}",
        get(|| async {
            let mut op = operation(OperationStatus::InProgress);
            op.phase = Some(crate::Phase::WaitingForTasks);
            Json(op)
        }),
    );
    let (client, _server) = serve(router).await;
    let mut updates = 0;
    let err = client
        .wait_for_operation("op-1", Duration::from_millis(200), |_| updates += 1)
        .await
        .expect_err("still running");
    assert_eq!(err.code(), "Timeout");
    assert!(err.to_string().contains("WaitingForTasks"), "{err}");
    assert_eq!(updates, 1);
}

#[tokio::test]
async fn a_node_that_went_down_to_reboot_and_stays_down_did_not_return() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let rebooting = axum::Router::new().route(
        "/v1/operations/{id}",
        get(|| async {
            let mut op = operation(OperationStatus::InProgress);
            op.phase = Some(crate::Phase::Rebooting);
            ([(axum::http::header::CONNECTION, "close")], Json(op))
        }),
    );
    let server = serve_on(listener, rebooting);
    let client = Client::new(&format!("http://{addr}"), None)
        .expect("client")
        .with_retry_policy(quick_retries())
        .with_poll_interval(Duration::from_millis(20));
    let seen = Arc::new(Mutex::new(false));
    let flag = Arc::clone(&seen);
    let waiter = tokio::spawn(async move {
        client
            .follow_operation("op-1", Duration::from_secs(2), |event| {
                if matches!(event, WaitEvent::Observed(_)) {
                    *flag.lock().expect("flag") = true;
                }
            })
            .await
    });
    wait_until(|| *seen.lock().expect("flag")).await;
    server.abort();
    let err = waiter.await.expect("joined").expect_err("never came back");
    assert_eq!(err.code(), "NodeDidNotReturn", "{err}");
    assert!(err.to_string().contains("Rebooting"), "{err}");
    assert!(!err.is_transient());
}

#[tokio::test]
async fn waiting_for_an_unknown_operation_fails_at_once() {
    let router = axum::Router::new().route(
        "/v1/operations/{id}",
        get(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(ErrorBody::new(
                    ErrorCode::OperationNotFound,
                    "no operation x",
                )),
            )
        }),
    );
    let (client, _server) = serve(router).await;
    let err = client
        .wait_for_operation("x", Duration::from_secs(30), |_| {})
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), "OperationNotFound");
}

#[test]
fn path_segments_are_percent_encoded() {
    assert_eq!(path_segment("task-1_a.b~"), "task-1_a.b~");
    assert_eq!(path_segment("../x y"), "..%2Fx%20y");
}

#[test]
fn backoff_doubles_up_to_its_cap() {
    let policy = RetryPolicy {
        attempts: 10,
        first_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(350),
    };
    let waits: Vec<u128> = (1..=4).map(|n| policy.backoff(n).as_millis()).collect();
    assert_eq!(waits, [100, 200, 350, 350]);
    assert_eq!(policy.backoff(99), Duration::from_millis(350));
}

async fn wait_until(condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "condition never held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
