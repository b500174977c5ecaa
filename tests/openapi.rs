//! `/v1/openapi.json` checked against the real agent: every documented path
//! and method is routed, no undocumented method is, and the contract's
//! routes (DESIGN.md) are all described.
//!
//! The agent builds its router and this description from one list of
//! routes (`api::routes`), so a route cannot be served undocumented; this
//! test checks the other direction on the running binary.

use reimage_e2e::daemon::{ADMIN, Daemon, READER, write_config};
use reimage_e2e::images::target_disk;
use reqwest::Method;
use serde_json::Value;
use std::time::Duration;

/// The routes DESIGN.md promises (HTTP API v1 and the seed routes).
const CONTRACT: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/v1/node"),
    ("post", "/v1/node/reimage"),
    ("post", "/v1/node/reboot"),
    ("post", "/v1/node/disablescheduling"),
    ("post", "/v1/node/enablescheduling"),
    ("get", "/v1/operations"),
    ("get", "/v1/operations/{id}"),
    ("post", "/v1/tasks"),
    ("get", "/v1/tasks"),
    ("get", "/v1/tasks/{id}"),
    ("delete", "/v1/tasks/{id}"),
    ("get", "/v1/tasks/{id}/files/{name}"),
    ("post", "/v1/images/prefetch"),
    ("get", "/v1/images"),
    ("delete", "/v1/images/{sha256}"),
    ("get", "/metrics"),
    ("get", "/v1/openapi.json"),
    ("post", "/pools/{pool}/nodes/{node}/reimage"),
    (
        "post",
        "/{subscription}/services/hostedservices/{service}/deployments/{deployment}/roleinstances/{role}",
    ),
    ("get", "/{subscription}/operations/{request_id}"),
];

const METHODS: &[&str] = &["get", "post", "put", "patch", "delete"];

/// A concrete path for a templated one: every `{parameter}` becomes a value
/// that names nothing, so no request below changes the node.
fn concrete(template: &str) -> String {
    template
        .split('/')
        .map(|segment| {
            if segment.starts_with('{') && segment.ends_with('}') {
                "no-such-thing"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Sends a request that passes authentication but that every handler
/// refuses or answers without effect: an admin token, a body that is not
/// JSON, an `x-ms-version` that is not a version, no query string, and ids
/// that name nothing. Returns the status and the body.
fn probe(
    client: &reqwest::blocking::Client,
    daemon: &Daemon,
    method: &str,
    path: &str,
) -> (u16, String) {
    let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
    let response = client
        .request(method, format!("{}{path}", daemon.url))
        .bearer_auth(ADMIN)
        .header("content-type", "text/plain")
        .header("x-ms-version", "not-a-version")
        .body("not json")
        .send()
        .expect("request sent");
    let status = response.status().as_u16();
    (status, response.text().unwrap_or_default())
}

fn is_no_such_route(status: u16, body: &str) -> bool {
    status == 404
        && serde_json::from_str::<Value>(body)
            .is_ok_and(|b| b["message"]["value"] == "no such route")
}

#[test]
fn the_description_matches_the_routes_the_agent_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    target_disk(&dir.path().join("disk.img"), 64, 16, 61);
    let daemon = Daemon::start(&write_config(dir.path(), ""));

    let (status, _, body) = daemon.request(Method::GET, "/v1/openapi.json", None, None, &[]);
    assert_eq!(status, 401, "the description needs a reader token: {body}");
    let (status, headers, doc) =
        daemon.request(Method::GET, "/v1/openapi.json", Some(READER), None, &[]);
    assert_eq!(status, 200, "{doc}");
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{}",
        doc["openapi"]
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    for name in ["ErrorBody", "Node", "Operation", "ReimageRequest", "Task"] {
        assert!(
            doc["components"]["schemas"].get(name).is_some(),
            "schema {name} is described"
        );
    }

    let paths = doc["paths"].as_object().expect("paths");
    for (method, path) in CONTRACT {
        assert!(
            paths
                .get(*path)
                .and_then(|item| item.get(*method))
                .is_some(),
            "{method} {path} of the contract is not described"
        );
    }

    // Sanity of the probe itself: it can tell a missing route and a missing
    // method from a routed one.
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let (status, body) = probe(&client, &daemon, "get", "/v1/no-such-route");
    assert!(is_no_such_route(status, &body), "{status} {body}");
    let (status, _) = probe(&client, &daemon, "put", "/v1/node");
    assert_eq!(status, 405);

    let mut probed = 0;
    for (template, item) in paths {
        let path = concrete(template);
        let item = item.as_object().expect("path item");
        for method in METHODS {
            let (status, body) = probe(&client, &daemon, method, &path);
            if let Some(operation) = item.get(*method) {
                probed += 1;
                assert!(
                    !is_no_such_route(status, &body) && status != 405,
                    "{} {template} is described but not routed: {status} {body}",
                    method.to_uppercase()
                );
                let responses = operation["responses"].as_object().expect("responses");
                assert!(
                    responses.keys().any(|s| s.starts_with('2')),
                    "{method} {template} describes a success"
                );
                if template != "/healthz" {
                    assert!(
                        responses.contains_key("401"),
                        "{method} {template} describes its 401"
                    );
                }
            } else {
                assert_eq!(
                    status,
                    405,
                    "{} {template} is routed but not described: {body}",
                    method.to_uppercase()
                );
            }
        }
    }
    assert!(probed >= CONTRACT.len(), "probed {probed} operations");

    assert_eq!(
        daemon.get("/v1/operations")["value"],
        Value::Array(Vec::new()),
        "no probe started an operation"
    );
}
