//! The seed-compatible routes with the exact requests of the two seed
//! operations: Azure Batch "Compute Node - Reimage" and Cloud Services
//! "Reimage Role Instance" followed by "Get Operation Status", against the
//! real agent, a real image server and a real disk file.

use reimage_e2e::daemon::{ADMIN, Daemon, NodeSetup, READER};
use reimage_e2e::http_server::FaultServer;
use reimage_e2e::images::{labels, os_image, partition_sha256};
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const BATCH_API_VERSION: &str = "2024-07-01.20.0";
const MS_VERSION: &str = "2010-10-28";
const MS_NAMESPACE: &str = "http://schemas.microsoft.com/windowsazure";
const SUBSCRIPTION: &str = "0b1f6471-1bf0-4dda-aec3-111122223333";
const ROLE_INSTANCE: &str =
    "/services/hostedservices/fleet/deployments/fleet-prod/roleinstances/node-1";

struct Node {
    daemon: Daemon,
    server: FaultServer,
    client: reqwest::blocking::Client,
    image_sha: String,
    disk: PathBuf,
    storage_sha: String,
    _dir: tempfile::TempDir,
}

/// An agent with a 64 MiB disk (local-storage at its end) whose config
/// names a 16 MiB default image served from 127.0.0.1: the seed requests
/// carry no image.
fn node() -> Node {
    let setup = NodeSetup::new(64, 51, &os_image(16, 1, 52));
    let daemon = Daemon::start(&setup.config(&setup.default_image()));
    Node {
        daemon,
        server: setup.server,
        client: reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client"),
        image_sha: setup.image_sha,
        disk: setup.disk,
        storage_sha: setup.storage_sha,
        _dir: setup.dir,
    }
}

/// A response, its body as text.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

impl Node {
    /// One request exactly as given: no header but `headers` (and the
    /// bearer `token`), the body bytes as they are.
    fn send(
        &self,
        method: Method,
        path_and_query: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Answer {
        let mut request = self
            .client
            .request(method, format!("{}{path_and_query}", self.daemon.url))
            .body(body.to_string());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().expect("request sent");
        Answer {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response.text().expect("body"),
        }
    }

    /// The Batch request as the Batch SDKs send it.
    fn batch_reimage(&self, node: &str, client_request_id: &str, body: &str) -> Answer {
        self.send(
            Method::POST,
            &format!(
                "/pools/fleet-pool/nodes/{node}/reimage?api-version={BATCH_API_VERSION}&timeout=30"
            ),
            Some(ADMIN),
            &[
                ("content-type", "application/json; odata=minimalmetadata"),
                ("client-request-id", client_request_id),
                ("return-client-request-id", "true"),
                ("ocp-date", &http_date()),
            ],
            body,
        )
    }

    /// The Service Management request: an empty body, `x-ms-version`.
    fn role_instance_reimage(&self, path: &str, version: Option<&str>) -> Answer {
        let mut headers = vec![("content-type", "application/xml")];
        if let Some(version) = version {
            headers.push(("x-ms-version", version));
        }
        self.send(
            Method::POST,
            &format!("/{SUBSCRIPTION}{path}?comp=reimage"),
            Some(ADMIN),
            &headers,
            "",
        )
    }

    fn operation_status(&self, request_id: &str, version: Option<&str>) -> Answer {
        let mut headers = Vec::new();
        if let Some(version) = version {
            headers.push(("x-ms-version", version));
        }
        self.send(
            Method::GET,
            &format!("/{SUBSCRIPTION}/operations/{request_id}"),
            Some(READER),
            &headers,
            "",
        )
    }

    /// Polls Get Operation Status until the operation ended; returns the
    /// parsed `Operation` of the last answer.
    fn wait_operation_xml(&self, request_id: &str) -> OperationXml {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let answer = self.operation_status(request_id, Some(MS_VERSION));
            assert_eq!(answer.status, 200, "{}", answer.body);
            assert!(
                answer
                    .header("content-type")
                    .is_some_and(|v| v.starts_with("application/xml")),
                "{:?}",
                answer.headers
            );
            assert!(answer.header("x-ms-request-id").is_some());
            let operation = OperationXml::parse(&answer.body);
            assert_eq!(operation.id, request_id);
            if operation.status != "InProgress" {
                return operation;
            }
            assert_eq!(
                operation.http_status_code, None,
                "no status code while in progress"
            );
            assert!(
                Instant::now() < deadline,
                "the operation did not end:\n{}",
                self.daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn assert_reimaged_with_storage_intact(&self) {
        let labels = labels(&self.disk);
        assert_eq!(labels, vec!["efi", "root", "local-storage"]);
        let (sha, _) =
            partition_sha256(&self.disk, "local-storage").expect("local-storage in the table");
        assert_eq!(sha, self.storage_sha, "local-storage bytes unchanged");
        assert_eq!(
            self.daemon.get("/v1/node")["image"]["sha256"],
            self.image_sha.as_str()
        );
    }
}

/// Now as an RFC 1123 date, as `ocp-date` carries it.
fn http_date() -> String {
    jiff::Timestamp::now()
        .strftime("%a, %d %b %Y %H:%M:%S GMT")
        .to_string()
}

/// A GUID in Batch's spelling (no braces).
fn guid() -> String {
    let hex: String = (0..32)
        .map(|_| char::from_digit(fastrand::u32(0..16), 16).unwrap_or('0'))
        .collect::<String>()
        .to_uppercase();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Service Management's `Operation`, read with a real XML parser.
#[derive(Debug)]
struct OperationXml {
    id: String,
    status: String,
    http_status_code: Option<u16>,
    error: Option<(String, String)>,
}

/// The text of `parent`'s child `name` in the Service Management namespace.
fn child_text(parent: roxmltree::Node<'_, '_>, name: &str) -> Option<String> {
    parent
        .children()
        .find(|n| n.has_tag_name((MS_NAMESPACE, name)))
        .map(|n| n.text().unwrap_or_default().to_string())
}

impl OperationXml {
    fn parse(xml: &str) -> OperationXml {
        let doc = roxmltree::Document::parse(xml).unwrap_or_else(|e| panic!("{e}: {xml}"));
        let root = doc.root_element();
        assert!(
            root.has_tag_name((MS_NAMESPACE, "Operation")),
            "root is {:?}: {xml}",
            root.tag_name()
        );
        let names: Vec<&str> = root
            .children()
            .filter(|n| n.is_element())
            .map(|n| {
                assert_eq!(n.tag_name().namespace(), Some(MS_NAMESPACE), "{xml}");
                n.tag_name().name()
            })
            .collect();
        for name in &names {
            assert!(
                ["ID", "Status", "HttpStatusCode", "Error"].contains(name),
                "unexpected element {name}: {xml}"
            );
        }
        let error = root
            .children()
            .find(|n| n.has_tag_name((MS_NAMESPACE, "Error")))
            .map(|e| {
                (
                    child_text(e, "Code").expect("Error/Code"),
                    child_text(e, "Message").expect("Error/Message"),
                )
            });
        OperationXml {
            id: child_text(root, "ID").expect("ID"),
            status: child_text(root, "Status").expect("Status"),
            http_status_code: child_text(root, "HttpStatusCode")
                .map(|c| c.parse().expect("HttpStatusCode is a number")),
            error,
        }
    }
}

/// Service Management's `<Error><Code/><Message/></Error>`, parsed.
fn xml_error(answer: &Answer) -> (String, String) {
    assert!(
        answer
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/xml")),
        "{:?}: {}",
        answer.headers,
        answer.body
    );
    assert!(
        answer.header("x-ms-request-id").is_some(),
        "every Service Management answer has x-ms-request-id"
    );
    let doc =
        roxmltree::Document::parse(&answer.body).unwrap_or_else(|e| panic!("{e}: {}", answer.body));
    let root = doc.root_element();
    assert!(
        root.has_tag_name((MS_NAMESPACE, "Error")),
        "{}",
        answer.body
    );
    (
        child_text(root, "Code").expect("Code"),
        child_text(root, "Message").expect("Message"),
    )
}

#[test]
fn batch_reimage_is_accepted_in_the_batch_shape_and_keeps_local_storage() {
    let node = node();
    let client_request_id = guid();
    let answer = node.batch_reimage(
        "node-1",
        &client_request_id,
        r#"{"nodeReimageOption":"terminate"}"#,
    );
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(answer.body, "", "202 has no body");
    let request_id = answer.header("request-id").expect("request-id").to_string();
    assert!(!request_id.is_empty());
    assert_eq!(
        answer.header("DataServiceId"),
        Some(format!("{}/pools/fleet-pool/nodes/node-1", node.daemon.url).as_str())
    );
    assert!(answer.header("ETag").is_some_and(|e| e.starts_with('"')));
    assert!(
        answer
            .header("Last-Modified")
            .is_some_and(|d| d.ends_with("GMT"))
    );
    assert_eq!(
        answer.header("client-request-id"),
        Some(client_request_id.as_str()),
        "return-client-request-id: true echoes it"
    );

    let done = node.daemon.wait_operation(&request_id);
    assert_eq!(done["status"], "Succeeded", "{done}");
    assert_eq!(done["kind"], "reimage");
    assert_eq!(done["nodeReimageOption"], "terminate");
    node.assert_reimaged_with_storage_intact();

    // A retry with the same client-request-id is the same operation.
    let again = node.batch_reimage(
        "node-1",
        &client_request_id,
        r#"{"nodeReimageOption":"terminate"}"#,
    );
    assert_eq!(again.status, 202, "{}", again.body);
    assert_eq!(again.header("request-id"), Some(request_id.as_str()));
    assert_eq!(
        node.daemon.get("/v1/operations")["value"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
}

impl Node {
    /// A Batch request without a body, as the SDKs send GETs.
    fn batch(&self, method: Method, path: &str, token: &str, body: &str) -> Answer {
        let separator = if path.contains('?') { '&' } else { '?' };
        self.send(
            method,
            &format!("{path}{separator}api-version={BATCH_API_VERSION}"),
            Some(token),
            &[("content-type", "application/json; odata=minimalmetadata")],
            body,
        )
    }

    fn compute_node(&self) -> Answer {
        let answer = self.batch(Method::GET, "/pools/fleet-pool/nodes/node-1", READER, "");
        assert_eq!(answer.status, 200, "{}", answer.body);
        answer
    }
}

#[test]
fn the_node_is_served_in_the_batch_compute_node_shape() {
    let node = node();
    let answer = node.compute_node();
    let body = answer.json();
    assert_eq!(body["id"], "node-1");
    assert_eq!(
        body["url"],
        format!("{}/pools/fleet-pool/nodes/node-1", node.daemon.url).as_str()
    );
    assert_eq!(body["state"], "idle");
    assert_eq!(body["schedulingState"], "enabled");
    for field in [
        "totalTasksRun",
        "runningTasksCount",
        "runningTaskSlotsCount",
        "totalTasksSucceeded",
    ] {
        assert_eq!(body[field], 0, "{field}: {body}");
    }
    assert_eq!(body["isDedicated"], true);
    assert_eq!(body["errors"], json!([]));
    assert!(body["nodeAgentInfo"]["version"].is_string(), "{body}");
    assert!(
        body["nodeAgentInfo"]["lastUpdateTime"].is_string(),
        "{body}"
    );
    assert!(body["stateTransitionTime"].is_string(), "{body}");
    let etag = answer.header("ETag").expect("ETag").to_string();
    let modified = answer.header("Last-Modified").expect("Last-Modified");
    jiff::fmt::rfc2822::parse(modified).unwrap_or_else(|e| panic!("{modified}: {e}"));
    assert_eq!(
        node.compute_node().header("ETag"),
        Some(etag.as_str()),
        "unchanged node, same ETag"
    );

    let list = node.batch(Method::GET, "/pools/fleet-pool/nodes", READER, "");
    assert_eq!(list.status, 200, "{}", list.body);
    assert_eq!(list.json()["value"][0]["id"], "node-1");

    let other = node.batch(Method::GET, "/pools/fleet-pool/nodes/node-2", READER, "");
    assert_eq!(other.status, 404, "{}", other.body);
    assert_eq!(other.json()["code"], "NodeNotFound");
    let unversioned = node.send(Method::GET, "/pools/p/nodes/node-1", Some(READER), &[], "");
    assert_eq!(unversioned.status, 400, "{}", unversioned.body);
    assert_eq!(unversioned.json()["code"], "MissingRequiredQueryParameter");
    let filtered = node.batch(
        Method::GET,
        "/pools/p/nodes?$filter=state%20eq%20'idle'",
        READER,
        "",
    );
    assert_eq!(filtered.status, 400, "{}", filtered.body);
    assert_eq!(filtered.json()["code"], "InvalidQueryParameterValue");

    // Scheduling through the Batch routes, with Batch's spelling.
    let disabled = node.batch(
        Method::POST,
        "/pools/fleet-pool/nodes/node-1/disablescheduling",
        ADMIN,
        r#"{"nodeDisableSchedulingOption":"taskCompletion"}"#,
    );
    assert_eq!(disabled.status, 200, "{}", disabled.body);
    assert!(disabled.header("DataServiceId").is_some());
    let after = node.compute_node();
    assert_eq!(after.json()["schedulingState"], "disabled");
    assert_ne!(
        after.header("ETag"),
        Some(etag.as_str()),
        "a change, a new ETag"
    );
    assert_eq!(disabled.header("ETag"), after.header("ETag"));
    let enabled = node.batch(
        Method::POST,
        "/pools/fleet-pool/nodes/node-1/enablescheduling",
        ADMIN,
        "",
    );
    assert_eq!(enabled.status, 200, "{}", enabled.body);
    assert_eq!(node.compute_node().json()["schedulingState"], "enabled");

    let reboot = node.batch(
        Method::POST,
        "/pools/fleet-pool/nodes/node-1/reboot",
        ADMIN,
        r#"{"nodeRebootOption":"Requeue"}"#,
    );
    assert_eq!(reboot.status, 202, "{}", reboot.body);
    let id = reboot.header("request-id").expect("request-id");
    let done = node.daemon.wait_operation(id);
    assert_eq!(done["kind"], "reboot");
    assert_eq!(done["status"], "Succeeded", "{done}");
}

#[test]
fn a_batch_node_reads_reimaging_until_its_operation_has_ended() {
    let node = node();
    let (status, task) = node.daemon.post(
        "/v1/tasks",
        ADMIN,
        json!({"id": "draining", "commandLine": "sleep 2"}),
    );
    assert_eq!(status, 201, "{task}");
    node.daemon
        .wait_for("the task running", "/v1/tasks/draining", |t| {
            t["state"] == "running"
        });
    let answer = node.batch_reimage(
        "node-1",
        &guid(),
        r#"{"nodeReimageOption":"taskCompletion"}"#,
    );
    assert_eq!(answer.status, 202, "{}", answer.body);
    let op = answer.header("request-id").expect("request-id").to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut polls_while_reimaging = 0;
    loop {
        // The node first, then the operation: a node that no longer reads
        // reimaging must have an operation that already ended.
        let state = node.compute_node().json()["state"].clone();
        let operation = node.daemon.get(&format!("/v1/operations/{op}"));
        if state != "reimaging" {
            assert_ne!(
                operation["status"], "InProgress",
                "{state} while {operation}"
            );
            assert_eq!(operation["status"], "Succeeded", "{operation}");
            break;
        }
        polls_while_reimaging += 1;
        assert!(Instant::now() < deadline, "still reimaging: {operation}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(polls_while_reimaging > 3, "the wait for the task was seen");
    let task = node.daemon.get("/v1/tasks/draining");
    assert_eq!(
        task["state"], "completed",
        "the task ran to its end: {task}"
    );
    assert_eq!(node.compute_node().json()["totalTasksSucceeded"], 1);
    node.assert_reimaged_with_storage_intact();
}

#[test]
fn batch_reimage_with_an_empty_body_requeues() {
    let node = node();
    let answer = node.send(
        Method::POST,
        &format!("/pools/p/nodes/node-1/reimage?api-version={BATCH_API_VERSION}"),
        Some(ADMIN),
        &[],
        "",
    );
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(answer.header("client-request-id"), None, "not asked for");
    let request_id = answer.header("request-id").expect("request-id");
    let done = node.daemon.wait_operation(request_id);
    assert_eq!(done["status"], "Succeeded", "{done}");
    assert_eq!(done["nodeReimageOption"], "requeue");
    node.assert_reimaged_with_storage_intact();
}

#[test]
fn batch_reimage_refusals_use_the_batch_error_body() {
    let node = node();
    let unknown = node.batch_reimage("node-2", &guid(), r#"{"nodeReimageOption":"requeue"}"#);
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    let body = unknown.json();
    assert_eq!(body["code"], "NodeNotFound");
    assert_eq!(body["message"]["lang"], "en-us");
    assert_eq!(
        body["values"],
        json!([{"key": "nodeId", "value": "node-2"}])
    );

    let no_version = node.send(
        Method::POST,
        "/pools/fleet-pool/nodes/node-1/reimage",
        Some(ADMIN),
        &[("content-type", "application/json; odata=minimalmetadata")],
        r#"{"nodeReimageOption":"requeue"}"#,
    );
    assert_eq!(no_version.status, 400, "{}", no_version.body);
    let body = no_version.json();
    assert_eq!(body["code"], "MissingRequiredQueryParameter");
    assert_eq!(
        body["values"],
        json!([{"key": "QueryParameterName", "value": "api-version"}])
    );

    let bad_option = node.batch_reimage("node-1", &guid(), r#"{"nodeReimageOption":"later"}"#);
    assert_eq!(bad_option.status, 400, "{}", bad_option.body);
    assert_eq!(bad_option.json()["code"], "InvalidRequestBody");

    let anonymous = node.send(
        Method::POST,
        &format!("/pools/fleet-pool/nodes/node-1/reimage?api-version={BATCH_API_VERSION}"),
        None,
        &[("content-type", "application/json; odata=minimalmetadata")],
        r#"{"nodeReimageOption":"requeue"}"#,
    );
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
    assert_eq!(anonymous.json()["code"], "AuthenticationFailed");
    assert_eq!(anonymous.header("www-authenticate"), Some("Bearer"));

    let reader = node.send(
        Method::POST,
        &format!("/pools/fleet-pool/nodes/node-1/reimage?api-version={BATCH_API_VERSION}"),
        Some(READER),
        &[],
        "",
    );
    assert_eq!(reader.status, 403, "{}", reader.body);

    assert_eq!(
        node.daemon.get("/v1/operations")["value"],
        json!([]),
        "no refused request started an operation"
    );
}

#[test]
fn role_instance_reimage_is_followed_to_success_with_get_operation_status() {
    let node = node();
    let answer = node.role_instance_reimage(ROLE_INSTANCE, Some(MS_VERSION));
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body, "", "no response body");
    let request_id = answer
        .header("x-ms-request-id")
        .expect("x-ms-request-id")
        .to_string();

    let operation = node.wait_operation_xml(&request_id);
    assert_eq!(operation.status, "Succeeded", "{operation:?}");
    assert_eq!(operation.http_status_code, Some(200));
    assert_eq!(operation.error, None);
    node.assert_reimaged_with_storage_intact();
    assert_eq!(
        node.daemon.get(&format!("/v1/operations/{request_id}"))["nodeReimageOption"],
        "requeue"
    );

    // The deployment-slot form of the same request, with a newer version.
    let answer = node.role_instance_reimage(
        "/services/hostedservices/fleet/deploymentslots/production/roleinstances/node-1",
        Some("2024-11-01"),
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    let second = answer.header("x-ms-request-id").expect("x-ms-request-id");
    assert_ne!(second, request_id, "a second reimage is a second operation");
    let operation = node.wait_operation_xml(second);
    assert_eq!(operation.status, "Succeeded", "{operation:?}");
    node.assert_reimaged_with_storage_intact();
}

#[test]
fn a_failed_reimage_reports_its_error_in_the_operation_xml() {
    let node = node();
    let wrong = "0".repeat(64);
    let answer = node.batch_reimage(
        "node-1",
        &guid(),
        &json!({
            "nodeReimageOption": "requeue",
            "image": {"url": node.server.url("/os.img.zst"), "sha256": wrong},
        })
        .to_string(),
    );
    assert_eq!(answer.status, 202, "{}", answer.body);
    let request_id = answer.header("request-id").expect("request-id");
    let operation = node.wait_operation_xml(request_id);
    assert_eq!(operation.status, "Failed", "{operation:?}");
    assert_eq!(operation.http_status_code, Some(500));
    let (code, message) = operation.error.expect("Error element");
    assert_eq!(code, "ImageChecksumMismatch");
    assert!(message.contains(&wrong), "{message}");
    let (sha, _) = partition_sha256(&node.disk, "local-storage").expect("local-storage");
    assert_eq!(sha, node.storage_sha);
}

#[test]
fn service_management_refusals_are_xml_errors() {
    let node = node();

    let missing = node.role_instance_reimage(ROLE_INSTANCE, None);
    assert_eq!(missing.status, 400, "{}", missing.body);
    let (code, message) = xml_error(&missing);
    assert_eq!(code, "MissingOrInvalidRequiredHeader");
    assert!(
        message.contains("x-ms-version") && message.contains("2010-10-28"),
        "{message}"
    );

    let old = node.role_instance_reimage(ROLE_INSTANCE, Some("2009-10-01"));
    assert_eq!(old.status, 400, "{}", old.body);
    let (code, message) = xml_error(&old);
    assert_eq!(code, "InvalidHeader");
    assert!(
        message.contains("2009-10-01") && message.contains("2010-10-28"),
        "{message}"
    );

    for garbage in ["latest", "2010-13-45", "2010-10-28x"] {
        let answer = node.role_instance_reimage(ROLE_INSTANCE, Some(garbage));
        assert_eq!(answer.status, 400, "{garbage}: {}", answer.body);
        let (code, message) = xml_error(&answer);
        assert_eq!(code, "InvalidHeader");
        assert!(message.contains(garbage), "{message}");
    }

    let other_role = node.role_instance_reimage(
        "/services/hostedservices/fleet/deployments/fleet-prod/roleinstances/node-2",
        Some(MS_VERSION),
    );
    assert_eq!(other_role.status, 404, "{}", other_role.body);
    assert_eq!(xml_error(&other_role).0, "ResourceNotFound");

    let bad_slot = node.role_instance_reimage(
        "/services/hostedservices/fleet/deploymentslots/canary/roleinstances/node-1",
        Some(MS_VERSION),
    );
    assert_eq!(bad_slot.status, 400, "{}", bad_slot.body);
    assert!(xml_error(&bad_slot).1.contains("canary"));

    let no_comp = node.send(
        Method::POST,
        &format!("/{SUBSCRIPTION}{ROLE_INSTANCE}"),
        Some(ADMIN),
        &[("x-ms-version", MS_VERSION)],
        "",
    );
    assert_eq!(no_comp.status, 400, "{}", no_comp.body);
    assert!(xml_error(&no_comp).1.contains("comp=reimage"));

    let status_without_version = node.operation_status("whatever", None);
    assert_eq!(status_without_version.status, 400);
    assert_eq!(
        xml_error(&status_without_version).0,
        "MissingOrInvalidRequiredHeader"
    );
    let status_with_garbage = node.operation_status("whatever", Some("soon"));
    assert_eq!(status_with_garbage.status, 400);
    assert_eq!(xml_error(&status_with_garbage).0, "InvalidHeader");

    let unknown = node.operation_status("no-such-request", Some(MS_VERSION));
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    assert_eq!(xml_error(&unknown).0, "ResourceNotFound");

    // Without a token both routes refuse, in their XML shape.
    let anonymous = node.send(
        Method::POST,
        &format!("/{SUBSCRIPTION}{ROLE_INSTANCE}?comp=reimage"),
        None,
        &[("x-ms-version", MS_VERSION)],
        "",
    );
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
    assert_eq!(xml_error(&anonymous).0, "AuthenticationFailed");
    let anonymous = node.send(
        Method::GET,
        &format!("/{SUBSCRIPTION}/operations/whatever"),
        None,
        &[("x-ms-version", MS_VERSION)],
        "",
    );
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
    assert_eq!(xml_error(&anonymous).0, "AuthenticationFailed");
    let reader = node.send(
        Method::POST,
        &format!("/{SUBSCRIPTION}{ROLE_INSTANCE}?comp=reimage"),
        Some(READER),
        &[("x-ms-version", MS_VERSION)],
        "",
    );
    assert_eq!(reader.status, 403, "{}", reader.body);
    assert_eq!(xml_error(&reader).0, "InsufficientPermissions");

    assert_eq!(
        node.daemon.get("/v1/operations")["value"],
        json!([]),
        "no refused request started an operation"
    );
}

#[test]
fn every_service_management_route_refuses_missing_wrong_and_lesser_tokens_in_xml() {
    use reimage_e2e::daemon::OPERATOR;
    let node = node();
    let reimage = |path: &str| (Method::POST, format!("/{SUBSCRIPTION}{path}?comp=reimage"));
    let routes = [
        (reimage(ROLE_INSTANCE), "admin"),
        (
            reimage(
                "/services/hostedservices/fleet/deploymentslots/production/roleinstances/node-1",
            ),
            "admin",
        ),
        (
            (Method::GET, format!("/{SUBSCRIPTION}/operations/whatever")),
            "reader",
        ),
    ];
    let rank = |role: &str| {
        ["reader", "operator", "admin"]
            .iter()
            .position(|r| *r == role)
    };
    for ((method, path), needed) in &routes {
        for (token, role) in [
            (None, None),
            (Some("not-a-token"), None),
            (Some(READER), Some("reader")),
            (Some(OPERATOR), Some("operator")),
        ] {
            let answer = node.send(
                method.clone(),
                path,
                token,
                &[("x-ms-version", MS_VERSION)],
                "",
            );
            let expected = match role {
                None => Some((401, "AuthenticationFailed")),
                Some(role) if rank(role) < rank(needed) => Some((403, "InsufficientPermissions")),
                Some(_) => None,
            };
            let Some((status, code)) = expected else {
                // Enough rights: past authentication (here an unknown operation).
                assert_ne!(answer.status, 401, "{method} {path} with {token:?}");
                assert_ne!(answer.status, 403, "{method} {path} with {token:?}");
                continue;
            };
            assert_eq!(
                answer.status, status,
                "{method} {path} with {token:?}: {}",
                answer.body
            );
            assert_eq!(xml_error(&answer).0, code, "{method} {path} with {token:?}");
            assert!(
                answer.header("x-ms-request-id").is_some(),
                "refusals carry a request id too: {method} {path}"
            );
        }
    }
    assert_eq!(
        node.daemon.get("/v1/operations")["value"],
        json!([]),
        "no refused request started an operation"
    );
    assert!(
        !node.daemon.log_text().contains("not-a-token"),
        "a presented token never reaches the log"
    );
}
