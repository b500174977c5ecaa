//! `reimage-agent serve` end to end: the real daemon on 127.0.0.1, real
//! tasks, a real HTTP image server, a real disk file; the saved partition's
//! SHA-256 is checked after every reimage.

use reimage_e2e::daemon::{ADMIN, Daemon, NodeSetup, OPERATOR, READER, write_config};
use reimage_e2e::http_server::{Fault, FaultServer};
use reimage_e2e::images::{labels, os_image, partition_sha256, sha256, target_disk, zstd};
use reimage_e2e::skip;
use reqwest::Method;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;

struct Node {
    daemon: Daemon,
    server: FaultServer,
    image_sha: String,
    disk: PathBuf,
    storage_sha: String,
    _dir: tempfile::TempDir,
}

/// An agent with a 64 MiB disk (local-storage at its end) and a 16 MiB image
/// served from 127.0.0.1.
fn node() -> Node {
    node_with(64, os_image(16, 1, 42))
}

/// An agent with a `disk_mib` MiB disk (16 MiB local-storage at its end)
/// and the image `raw` served from 127.0.0.1.
fn node_with(disk_mib: u64, raw: Vec<u8>) -> Node {
    let setup = NodeSetup::new(disk_mib, 41, &raw);
    Node {
        daemon: Daemon::start(&setup.config("")),
        server: setup.server,
        image_sha: setup.image_sha,
        disk: setup.disk,
        storage_sha: setup.storage_sha,
        _dir: setup.dir,
    }
}

impl Node {
    fn reimage_body(&self, option: &str) -> Value {
        json!({
            "nodeReimageOption": option,
            "image": {"url": self.server.url("/os.img.zst"), "sha256": self.image_sha},
        })
    }

    /// Starts a reimage and returns the operation id.
    fn reimage(&self, option: &str) -> String {
        let (status, body) = self
            .daemon
            .post("/v1/node/reimage", ADMIN, self.reimage_body(option));
        assert_eq!(status, 202, "reimage accepted: {body}");
        body["id"].as_str().expect("operation id").to_string()
    }

    fn add_task(&self, id: &str, command: &str, retention: Option<&str>) {
        let mut body = json!({"id": id, "commandLine": command});
        if let Some(retention) = retention {
            body["constraints"] = json!({"retentionTime": retention});
        }
        self.daemon.add_task(body);
    }

    fn assert_storage_intact(&self) {
        let (sha, _) =
            partition_sha256(&self.disk, "local-storage").expect("local-storage in the table");
        assert_eq!(sha, self.storage_sha, "local-storage bytes unchanged");
    }

    fn assert_new_image(&self) {
        let labels = labels(&self.disk);
        assert_eq!(labels, vec!["efi", "root", "local-storage"]);
        self.assert_storage_intact();
    }
}

#[test]
fn requeue_stops_running_tasks_and_runs_them_again_on_the_new_image() {
    let node = node();
    node.add_task("long", "echo started >> runs.txt; sleep 1000", None);
    node.daemon.wait_task("long", "running");
    let op = node.reimage("requeue");
    let done = node.daemon.wait_operation(&op);
    assert_eq!(done["status"], "Succeeded", "{done}");
    assert_eq!(done["requeuedTasks"], json!(["long"]));
    assert_eq!(done["kind"], "reimage");
    node.assert_new_image();
    let task = node.daemon.wait_task("long", "running");
    assert_eq!(task["executionInfo"]["requeueCount"], 1, "{task}");
    let nodeinfo = node.daemon.get("/v1/node");
    assert_eq!(nodeinfo["image"]["sha256"], node.image_sha.as_str());
    assert_eq!(nodeinfo["state"], "running");
}

#[test]
fn terminate_completes_running_tasks_with_a_failure() {
    let node = node();
    node.add_task("long", "sleep 1000", None);
    node.daemon.wait_task("long", "running");
    let op = node.reimage("terminate");
    let done = node.daemon.wait_operation(&op);
    assert_eq!(done["status"], "Succeeded", "{done}");
    assert_eq!(done["terminatedTasks"], json!(["long"]));
    let task = node.daemon.get("/v1/tasks/long");
    assert_eq!(task["state"], "completed");
    assert!(
        task["executionInfo"]["failureInfo"]["code"].is_string(),
        "{task}"
    );
    node.assert_new_image();
    assert_eq!(node.daemon.get("/v1/node")["state"], "idle");
}

#[test]
fn taskcompletion_waits_for_running_tasks_and_refuses_new_ones() {
    let node = node();
    node.add_task("short", "sleep 3; echo done", None);
    node.daemon.wait_task("short", "running");
    let op = node.reimage("taskcompletion");
    let waiting = node
        .daemon
        .wait_for("waitingForTasks", &format!("/v1/operations/{op}"), |o| {
            o["phase"] == "waitingForTasks"
        });
    assert_eq!(waiting["status"], "InProgress");
    assert_eq!(node.daemon.get("/v1/node")["state"], "reimaging");
    let (status, body) = node.daemon.post(
        "/v1/tasks",
        OPERATOR,
        json!({"id": "late", "commandLine": "true"}),
    );
    assert_eq!(status, 409, "no new tasks while waiting: {body}");
    let (status, body) = node
        .daemon
        .post("/v1/node/reimage", ADMIN, node.reimage_body("requeue"));
    assert_eq!(status, 409);
    assert_eq!(body["code"], "NodeBeingReimaged", "{body}");

    let done = node.daemon.wait_operation(&op);
    assert_eq!(done["status"], "Succeeded", "{done}");
    let task = node.daemon.get("/v1/tasks/short");
    assert_eq!(task["state"], "completed");
    assert_eq!(
        task["executionInfo"]["exitCode"], 0,
        "the task ran to its end: {task}"
    );
    let task_end: jiff::Timestamp = task["executionInfo"]["endTime"]
        .as_str()
        .expect("end")
        .parse()
        .expect("time");
    let op_end: jiff::Timestamp = done["updatedAt"]
        .as_str()
        .expect("updated")
        .parse()
        .expect("time");
    assert!(task_end <= op_end, "the reimage finished after the task");
    node.assert_new_image();
}

#[test]
fn retaineddata_also_waits_for_retention_to_expire() {
    let node = node();
    node.add_task("kept", "echo result > out.txt", Some("PT3S"));
    let task = node.daemon.wait_task("kept", "completed");
    assert!(task["retentionExpiry"].is_string(), "{task}");
    let op = node.reimage("retaineddata");
    node.daemon.wait_for(
        "waitingForRetention",
        &format!("/v1/operations/{op}"),
        |o| o["phase"] == "waitingForRetention" || o["status"] != "InProgress",
    );
    let done = node.daemon.wait_operation(&op);
    assert_eq!(done["status"], "Succeeded", "{done}");
    let expiry: jiff::Timestamp = task["retentionExpiry"]
        .as_str()
        .expect("expiry")
        .parse()
        .expect("time");
    let op_end: jiff::Timestamp = done["updatedAt"]
        .as_str()
        .expect("updated")
        .parse()
        .expect("time");
    assert!(
        op_end >= expiry,
        "the reimage waited for the retention timer"
    );
    let (status, _, _) = node.daemon.request(
        Method::GET,
        "/v1/tasks/kept/files/stdout.txt",
        Some(READER),
        None,
        &[],
    );
    assert_eq!(status, 404, "the retained data is gone");
    node.assert_new_image();
}

#[test]
fn a_bad_image_fails_the_operation_and_keeps_local_storage() {
    let node = node();
    let body = json!({
        "image": {"url": node.server.url("/os.img.zst"), "sha256": "0".repeat(64)},
    });
    let (status, body) = node.daemon.post("/v1/node/reimage", ADMIN, body);
    assert_eq!(status, 202, "{body}");
    let done = node.daemon.wait_operation(body["id"].as_str().expect("id"));
    assert_eq!(done["status"], "Failed");
    assert_eq!(done["error"]["code"], "ImageChecksumMismatch", "{done}");
    node.assert_storage_intact();
    let labels = labels(&node.disk);
    assert_eq!(labels, vec!["local-storage"]);
    assert_eq!(node.daemon.get("/v1/node")["state"], "unusable");
    // An unusable node can be reimaged to recover.
    let op = node.reimage("requeue");
    assert_eq!(node.daemon.wait_operation(&op)["status"], "Succeeded");
    assert_eq!(node.daemon.get("/v1/node")["state"], "idle");
    node.assert_new_image();
}

#[test]
fn a_finished_operation_keeps_the_record_of_what_it_wrote() {
    let node = node();
    let op = node.reimage("requeue");
    let done = node.daemon.wait_operation(&op);
    assert_eq!(done["status"], "Succeeded", "{done}");
    assert_eq!(done["phase"], "done");
    let size = 16u64 << 20;
    assert_eq!(done["progress"]["bytesWritten"], size, "{done}");
    assert_eq!(done["progress"]["totalBytes"], size, "{done}");
    assert!(
        done["progress"]["bytesPerSecond"].as_u64() > Some(0),
        "an average rate: {done}"
    );
    assert_eq!(done["image"]["sha256"], node.image_sha.as_str(), "{done}");
    assert_eq!(done["image"]["name"], "os.img.zst", "{done}");
    let created: jiff::Timestamp = done["createdAt"]
        .as_str()
        .expect("created")
        .parse()
        .expect("time");
    let ended: jiff::Timestamp = done["endedAt"]
        .as_str()
        .expect("ended")
        .parse()
        .expect("time");
    assert!(ended >= created, "{done}");
    let seconds = done["durationSeconds"].as_f64().expect("duration");
    let between = ended.duration_since(created).as_secs_f64();
    assert!((seconds - between).abs() < 0.01, "{seconds} vs {between}");
}

#[test]
fn a_failed_write_clears_the_node_image_and_names_the_failure() {
    let node = node();
    let op = node.reimage("requeue");
    node.daemon.wait_operation(&op);
    assert_eq!(
        node.daemon.get("/v1/node")["image"]["sha256"],
        node.image_sha.as_str()
    );
    let body = json!({
        "image": {"url": node.server.url("/os.img.zst"), "sha256": "0".repeat(64)},
    });
    let (status, body) = node.daemon.post("/v1/node/reimage", ADMIN, body);
    assert_eq!(status, 202, "{body}");
    let failed_id = body["id"].as_str().expect("id").to_string();
    let done = node.daemon.wait_operation(&failed_id);
    assert_eq!(done["status"], "Failed", "{done}");
    assert_eq!(done["phase"], "downloading", "where it failed: {done}");
    assert!(done["endedAt"].is_string(), "{done}");
    let info = node.daemon.get("/v1/node");
    assert_eq!(info["state"], "unusable", "{info}");
    assert_eq!(
        info["image"],
        Value::Null,
        "the disk holds no image: {info}"
    );
    assert_eq!(info["errors"][0]["code"], "ImageChecksumMismatch", "{info}");
    assert_eq!(
        info["errors"][0]["errorDetails"],
        json!([{"name": "operationId", "value": failed_id}])
    );
    node.assert_storage_intact();
    // Recovered by the next reimage, which clears the errors.
    let op = node.reimage("requeue");
    assert_eq!(node.daemon.wait_operation(&op)["status"], "Succeeded");
    let info = node.daemon.get("/v1/node");
    assert_eq!(info["errors"], json!([]), "{info}");
    assert_eq!(info["image"]["sha256"], node.image_sha.as_str());
}

#[test]
fn request_bodies_must_be_json_objects_and_change_nothing_otherwise() {
    let node = node();
    for (path, body) in [
        ("/v1/node/reimage", r#"["terminate"]"#),
        ("/v1/node/reimage", "[]"),
        ("/v1/node/reboot", "7"),
        ("/v1/node/disablescheduling", r#""terminate""#),
        ("/v1/tasks", "null"),
        ("/v1/tasks", r#"["t", "true"]"#),
        (
            "/pools/p/nodes/node-1/reimage?api-version=2024-07-01.20.0",
            r#"["terminate"]"#,
        ),
    ] {
        let (status, _, answer) = node.daemon.request_raw(
            Method::POST,
            path,
            Some(ADMIN),
            body,
            &[("content-type", "application/json")],
        );
        assert_eq!(status, 400, "{path} {body}: {answer}");
        let code = answer["code"].as_str().unwrap_or_default();
        assert!(
            code == "InvalidRequestBody" || code == "MissingRequestBody",
            "{path} {body}: {answer}"
        );
    }
    assert_eq!(node.daemon.get("/v1/operations")["value"], json!([]));
    assert_eq!(node.daemon.get("/v1/tasks")["value"], json!([]));
    assert_eq!(node.daemon.get("/v1/node")["schedulingState"], "enabled");
    // `null` is an empty body where the body is optional.
    let (status, _, answer) = node.daemon.request_raw(
        Method::POST,
        "/v1/node/disablescheduling",
        Some(ADMIN),
        "null",
        &[("content-type", "application/json")],
    );
    assert_eq!(status, 200, "{answer}");
}

#[test]
fn a_client_request_id_replays_only_the_same_request() {
    let node = node();
    let id = [("client-request-id", "shared-id")];
    let (status, _, reboot) = node.daemon.request(
        Method::POST,
        "/v1/node/reboot",
        Some(ADMIN),
        Some(json!({"nodeRebootOption": "requeue"})),
        &id,
    );
    assert_eq!(status, 202, "{reboot}");
    node.daemon
        .wait_operation(reboot["id"].as_str().expect("id"));
    let (status, _, answer) = node.daemon.request(
        Method::POST,
        "/v1/node/reimage",
        Some(ADMIN),
        Some(node.reimage_body("requeue")),
        &id,
    );
    assert_eq!(status, 409, "a reimage under a reboot's id: {answer}");
    assert_eq!(answer["code"], "RequestIdConflict");

    let other = [("client-request-id", "reimage-id")];
    let (status, _, first) = node.daemon.request(
        Method::POST,
        "/v1/node/reimage",
        Some(ADMIN),
        Some(node.reimage_body("terminate")),
        &other,
    );
    assert_eq!(status, 202, "{first}");
    node.daemon
        .wait_operation(first["id"].as_str().expect("id"));
    let (status, _, answer) = node.daemon.request(
        Method::POST,
        "/v1/node/reimage",
        Some(ADMIN),
        Some(node.reimage_body("requeue")),
        &other,
    );
    assert_eq!(status, 409, "another body under the same id: {answer}");
    assert_eq!(answer["code"], "RequestIdConflict");
    // The same body in another spelling is the same request.
    let mut respelled = node.reimage_body("terminate");
    respelled["nodeReimageOption"] = json!("Terminate");
    let (status, _, again) = node.daemon.request(
        Method::POST,
        "/v1/node/reimage",
        Some(ADMIN),
        Some(respelled),
        &other,
    );
    assert_eq!(status, 202, "{again}");
    assert_eq!(again["id"], first["id"]);
    let ops = node.daemon.get("/v1/operations");
    assert_eq!(ops["value"].as_array().map(Vec::len), Some(2), "{ops}");
}

#[test]
fn request_images_must_be_urls_and_local_files_must_be_allowed() {
    let node = node();
    for url in ["/etc/hostname", "os.img", "file:///etc/hostname"] {
        let body = json!({"image": {"url": url, "sha256": "ab".repeat(32)}});
        let (status, answer) = node.daemon.post("/v1/node/reimage", ADMIN, body);
        assert_eq!(status, 400, "{url}: {answer}");
        assert_eq!(answer["code"], "InvalidImageUrl", "{url}: {answer}");
    }
    let body = json!({"manifestUrl": "/etc/reimage/os.manifest.json"});
    let (status, answer) = node.daemon.post("/v1/node/reimage", ADMIN, body);
    assert_eq!(status, 400, "{answer}");
    assert_eq!(node.daemon.get("/v1/operations")["value"], json!([]));

    // With allow_local_files, file:// is taken, and a missing file is a
    // download failure naming it.
    let dir = tempfile::tempdir().expect("tempdir");
    target_disk(&dir.path().join("disk.img"), 64, 16, 43);
    let open = Daemon::start(&write_config(
        dir.path(),
        "
[image]
allow_local_files = true
",
    ));
    let missing = dir.path().join("missing.img.zst");
    let body = json!({"image": {"url": format!("file://{}", missing.display()), "sha256": "ab".repeat(32)}});
    let (status, answer) = open.post("/v1/node/reimage", ADMIN, body);
    assert_eq!(status, 202, "{answer}");
    let done = open.wait_operation(answer["id"].as_str().expect("id"));
    assert_eq!(done["error"]["code"], "DownloadFailed", "{done}");
    let message = done["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("missing.img.zst"), "{message}");
}

#[test]
fn the_same_client_request_id_returns_the_same_operation() {
    let node = node();
    let headers = [("client-request-id", "retry-1")];
    let first = node.daemon.request(
        Method::POST,
        "/v1/node/reimage",
        Some(ADMIN),
        Some(node.reimage_body("requeue")),
        &headers,
    );
    let second = node.daemon.request(
        Method::POST,
        "/v1/node/reimage",
        Some(ADMIN),
        Some(node.reimage_body("requeue")),
        &headers,
    );
    assert_eq!(first.0, 202);
    assert_eq!(second.0, 202);
    assert_eq!(first.2["id"], second.2["id"], "one operation");
    assert_eq!(first.1["request-id"], first.2["id"].as_str().expect("id"));
    assert_eq!(
        first.1["location"],
        format!("/v1/operations/{}", first.2["id"].as_str().expect("id")).as_str()
    );
    node.daemon
        .wait_operation(first.2["id"].as_str().expect("id"));
    assert_eq!(
        node.daemon.get("/v1/operations")["value"]
            .as_array()
            .expect("list")
            .len(),
        1
    );
}

#[test]
fn tokens_and_roles_guard_every_change() {
    let node = node();
    let (status, headers, body) = node
        .daemon
        .request(Method::GET, "/v1/node", None, None, &[]);
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["code"], "AuthenticationFailed");
    assert_eq!(body["message"]["lang"], "en-us");
    assert!(headers.contains_key("request-id"));
    let (status, _, _) = node
        .daemon
        .request(Method::GET, "/v1/node", Some("wrong"), None, &[]);
    assert_eq!(status, 401);
    let (status, body) = node
        .daemon
        .post("/v1/node/reimage", READER, node.reimage_body("requeue"));
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "InsufficientPermissions");
    let (status, _) = node
        .daemon
        .post("/v1/node/reimage", OPERATOR, node.reimage_body("requeue"));
    assert_eq!(status, 403);
    let (status, _) = node.daemon.post(
        "/v1/tasks",
        READER,
        json!({"id": "t", "commandLine": "true"}),
    );
    assert_eq!(status, 403);
    assert!(
        node.daemon.get("/v1/operations")["value"]
            .as_array()
            .expect("list")
            .is_empty(),
        "nothing started"
    );
    let (status, _, body) = node
        .daemon
        .request(Method::GET, "/healthz", None, None, &[]);
    assert_eq!((status, body), (200, Value::String("ok".into())));
}

#[test]
fn bad_requests_get_the_error_body() {
    let node = node();
    let (status, _, body) =
        node.daemon
            .request(Method::GET, "/v1/operations/nope", Some(READER), None, &[]);
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("OperationNotFound"))
    );
    let (status, _, body) =
        node.daemon
            .request(Method::GET, "/v1/tasks/nope", Some(READER), None, &[]);
    assert_eq!((status, body["code"].as_str()), (404, Some("TaskNotFound")));
    let (status, body) = node.daemon.post(
        "/v1/node/reimage",
        ADMIN,
        json!({"nodeReimageOption": "sometimes"}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]["value"]
            .as_str()
            .expect("message")
            .contains("sometimes"),
        "{body}"
    );
    let (status, body) = node.daemon.post(
        "/v1/node/reimage",
        ADMIN,
        json!({"image": {"url": "ftp://x/y", "sha256": "0".repeat(64)}}),
    );
    assert_eq!(status, 400, "{body}");
    let (status, body) = node.daemon.post("/v1/node/reimage", ADMIN, json!({}));
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("MissingImage")),
        "{body}"
    );
    let huge = "x".repeat(100 * 1024);
    let (status, body) = node.daemon.post(
        "/v1/tasks",
        OPERATOR,
        json!({"id": "big", "commandLine": huge}),
    );
    assert_eq!(status, 413, "{body}");
    let (status, body) = node.daemon.post(
        "/v1/tasks",
        OPERATOR,
        json!({"id": "../x", "commandLine": "true"}),
    );
    assert_eq!(status, 400, "{body}");
}

#[test]
fn a_task_running_when_the_agent_is_killed_runs_again_after_restart() {
    let mut node = node();
    node.add_task("survivor", "echo run >> ../runs.txt; sleep 1000", None);
    node.daemon.wait_task("survivor", "running");
    node.daemon.kill9_and_restart();
    let task = node
        .daemon
        .wait_for("the requeued task to run", "/v1/tasks/survivor", |t| {
            t["state"] == "running" && t["executionInfo"]["requeueCount"] == 1
        });
    assert_eq!(task["id"], "survivor");
    let tasks = node.daemon.get("/v1/tasks")["value"]
        .as_array()
        .expect("list")
        .len();
    assert_eq!(tasks, 1, "the task is neither lost nor duplicated");
}

#[test]
fn an_operation_cut_off_mid_write_is_failed_with_a_reason_after_restart() {
    let mut node = node();
    // A slow server keeps the write in progress long enough to kill it.
    node.server.set_fault(Fault::SlowBytesPerSec(256 * 1024));
    let op = node.reimage("requeue");
    node.daemon
        .wait_for("the write to start", &format!("/v1/operations/{op}"), |o| {
            o["phase"] == "downloading"
                && o["progress"]["bytesWritten"].as_u64().unwrap_or(0) > 1 << 20
        });
    node.daemon.kill9_and_restart();
    let done = node.daemon.wait_operation(&op);
    assert_eq!(done["status"], "Failed", "never left InProgress: {done}");
    assert_eq!(done["error"]["code"], "AgentRestarted");
    node.assert_storage_intact();
    assert_eq!(node.daemon.get("/v1/node")["state"], "unusable");
    node.server.set_fault(Fault::None);
    let again = node.reimage("requeue");
    assert_eq!(node.daemon.wait_operation(&again)["status"], "Succeeded");
    node.assert_new_image();
}

#[test]
fn kill_9_while_waiting_for_tasks_resumes_the_wait_and_runs_no_task_twice() {
    let mut node = node();
    node.add_task("long", "echo run >> ../runs.txt; sleep 1000", None);
    node.daemon.wait_task("long", "running");
    let op = node.reimage("taskcompletion");
    node.daemon
        .wait_for("the wait", &format!("/v1/operations/{op}"), |o| {
            o["phase"] == "waitingForTasks"
        });
    node.daemon.kill9_and_restart();
    // The task was stopped with the agent and is held for the operation:
    // the resumed wait ends, the image is written, then the task runs again.
    let done = node.daemon.wait_operation(&op);
    assert_eq!(done["status"], "Succeeded", "{done}");
    node.assert_new_image();
    let task = node
        .daemon
        .wait_for("the task to run again", "/v1/tasks/long", |t| {
            t["state"] == "running" && t["executionInfo"]["requeueCount"] == 1
        });
    assert_eq!(task["id"], "long");
    let runs = node
        .daemon
        .wait_for("the second run's line", "/v1/node", |_| {
            std::fs::read_to_string(node._dir.path().join("tasks/tasks/long/runs.txt"))
                .is_ok_and(|t| t.lines().count() == 2)
        });
    assert_eq!(runs["runningTasksCount"], 1, "one copy of the task runs");
}

#[test]
fn kill_9_during_the_read_back_fails_the_operation_and_keeps_local_storage() {
    // 384 MiB (mostly zeros) to read back: the 50 ms poll below lands
    // inside the read-back.
    let mut node = node_with(512, os_image(384, 15, 43));
    let op = node.reimage("requeue");
    node.daemon
        .wait_for("the read-back", &format!("/v1/operations/{op}"), |o| {
            o["phase"] == "verifying" || o["status"] != "InProgress"
        });
    node.daemon.kill9_and_restart();
    let done = node.daemon.wait_operation(&op);
    if done["status"] == "Succeeded" {
        // The read-back and commit beat the kill: the disk must then hold
        // the whole verified image.
        eprintln!("the write finished before the kill landed");
        node.assert_new_image();
        return;
    }
    assert_eq!(done["error"]["code"], "AgentRestarted", "{done}");
    let labels = labels(&node.disk);
    assert_eq!(
        labels,
        vec!["local-storage"],
        "no table points at an unverified image"
    );
    node.assert_storage_intact();
    assert_eq!(node.daemon.get("/v1/node")["state"], "unusable");
    let again = node.reimage("requeue");
    assert_eq!(node.daemon.wait_operation(&again)["status"], "Succeeded");
    node.assert_new_image();
}

#[test]
fn operations_and_tasks_survive_a_restart() {
    let mut node = node();
    node.add_task("quick", "true", None);
    node.daemon.wait_task("quick", "completed");
    let op = node.reimage("requeue");
    node.daemon.wait_operation(&op);
    let status = node.daemon.terminate();
    assert!(status.success(), "SIGTERM is a clean stop: {status}");
    node.daemon.kill9_and_restart();
    assert_eq!(
        node.daemon.get(&format!("/v1/operations/{op}"))["status"],
        "Succeeded"
    );
    assert_eq!(node.daemon.get("/v1/tasks/quick")["state"], "completed");
    assert_eq!(node.daemon.get("/v1/node")["totalTasksRun"], 1);
}

#[test]
fn disabling_scheduling_keeps_tasks_queued_until_enabled() {
    let node = node();
    let (status, _) = node.daemon.post(
        "/v1/node/disablescheduling",
        OPERATOR,
        json!({"nodeDisableSchedulingOption": "requeue"}),
    );
    assert_eq!(status, 200);
    assert_eq!(node.daemon.get("/v1/node")["schedulingState"], "disabled");
    node.add_task("queued", "true", None);
    assert_eq!(node.daemon.get("/v1/tasks/queued")["state"], "active");
    let (status, _) = node
        .daemon
        .post("/v1/node/enablescheduling", OPERATOR, json!({}));
    assert_eq!(status, 200);
    node.daemon.wait_task("queued", "completed");
}

/// `/metrics` as text.
fn metrics(node: &Node) -> String {
    let (status, headers, body) =
        node.daemon
            .request(Method::GET, "/metrics", Some(READER), None, &[]);
    assert_eq!(status, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .is_ok_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{headers:?}"
    );
    body.as_str().expect("text").to_string()
}

/// The value of the sample `name` (with its labels) in `text`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// `promtool check metrics` on `text`; `None` (with a printed reason)
/// where promtool is not installed.
fn promtool_check(text: &str) -> Option<String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        skip(
            "the promtool check",
            "promtool is not installed (Debian: prometheus)",
        );
        return None;
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let output = child.wait_with_output().expect("promtool ran");
    assert!(
        output.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Some(
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

#[test]
fn metrics_count_what_happened_and_keep_it_after_the_operation_ends() {
    let node = node();
    let idle = metrics(&node);
    if let Some(lint) = promtool_check(&idle) {
        assert!(
            lint.trim().is_empty(),
            "promtool lints the idle metrics: {lint}"
        );
    }
    assert_eq!(
        sample(&idle, r#"reimage_node_state{state="idle"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&idle, r#"reimage_scheduling_state{state="enabled"}"#),
        Some(1.0)
    );
    assert!(idle.contains("reimage_build_info{version="), "{idle}");

    node.add_task("m", "true", None);
    node.daemon.wait_task("m", "completed");
    node.add_task("slow", "sleep 3", None);
    node.daemon.wait_task("slow", "running");
    let body = json!({
        "nodeReimageOption": "taskcompletion",
        "image": {"url": node.server.url("/os.img.zst"), "sha256": node.image_sha},
    });
    let (status, answer) = node.daemon.post("/v1/node/reimage", ADMIN, body);
    assert_eq!(status, 202, "{answer}");
    let op = answer["id"].as_str().expect("id").to_string();
    // The operation enters its first phase just after it is accepted.
    node.daemon
        .wait_for("the drain", &format!("/v1/operations/{op}"), |o| {
            o["phase"] == "waitingForTasks"
        });
    let during = metrics(&node);
    if let Some(lint) = promtool_check(&during) {
        assert!(
            lint.trim().is_empty(),
            "promtool lints the metrics during a reimage: {lint}"
        );
    }
    assert_eq!(
        sample(&during, r#"reimage_node_state{state="reimaging"}"#),
        Some(1.0),
        "{during}"
    );
    assert_eq!(
        sample(
            &during,
            r#"reimage_operation_phase{phase="waitingForTasks"}"#
        ),
        Some(1.0),
        "{during}"
    );
    assert_eq!(node.daemon.wait_operation(&op)["status"], "Succeeded");

    let after = metrics(&node);
    promtool_check(&after);
    let succeeded = r#"reimage_operations_total{code="",kind="reimage",status="Succeeded"}"#;
    assert_eq!(sample(&after, succeeded), Some(1.0), "{after}");
    let written = sample(&after, "reimage_bytes_written_total").expect("bytes written");
    assert!(written >= (16u64 << 20) as f64, "{written}");
    let downloaded = sample(&after, "reimage_bytes_downloaded_total").expect("downloaded");
    assert!(downloaded > 0.0, "{downloaded}");
    assert_eq!(
        sample(&after, r#"reimage_tasks_total{state="completed"}"#),
        Some(2.0),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            r#"reimage_operation_duration_seconds_count{kind="reimage",status="Succeeded"}"#
        ),
        Some(1.0),
        "{after}"
    );
    assert!(
        sample(
            &after,
            r#"reimage_phase_duration_seconds_count{phase="waitingForTasks"}"#
        ) == Some(1.0),
        "{after}"
    );
    assert!(
        sample(
            &after,
            r#"reimage_last_operation_timestamp_seconds{status="Succeeded"}"#
        )
        .is_some_and(|t| t > 1.7e9),
        "{after}"
    );
    assert_eq!(
        sample(&after, r#"reimage_node_state{state="idle"}"#),
        Some(1.0)
    );
    assert!(
        after.contains(
            r#"reimage_api_requests_total{method="POST",route="/v1/node/reimage",status="202"} 1"#
        ),
        "{after}"
    );

    // The history survives a restart of the agent.
    let mut node = node;
    node.daemon.kill9_and_restart();
    let restarted = metrics(&node);
    assert_eq!(sample(&restarted, succeeded), Some(1.0), "{restarted}");
}

#[test]
fn a_reboot_waiting_for_tasks_refuses_a_reimage_with_node_being_rebooted() {
    let node = node();
    node.add_task("busy", "sleep 3", None);
    node.daemon.wait_task("busy", "running");
    let (status, body) = node.daemon.post(
        "/v1/node/reboot",
        ADMIN,
        json!({"nodeRebootOption": "taskcompletion"}),
    );
    assert_eq!(status, 202, "{body}");
    let op = body["id"].as_str().expect("id").to_string();
    assert_eq!(body["kind"], "reboot");
    assert_eq!(node.daemon.get("/v1/node")["state"], "rebooting");
    let (status, body) = node
        .daemon
        .post("/v1/node/reimage", ADMIN, node.reimage_body("requeue"));
    assert_eq!(status, 409);
    assert_eq!(body["code"], "NodeBeingRebooted", "{body}");
    let done = node.daemon.wait_operation(&op);
    assert_eq!(done["status"], "Succeeded", "{done}");
    assert_eq!(
        node.daemon.get("/v1/tasks/busy")["executionInfo"]["exitCode"],
        0
    );
    node.assert_storage_intact();
}

#[test]
fn a_duplicate_task_id_is_a_conflict() {
    let node = node();
    node.add_task("once", "true", None);
    let (status, body) = node.daemon.post(
        "/v1/tasks",
        OPERATOR,
        json!({"id": "once", "commandLine": "true"}),
    );
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "TaskExists");
}

#[test]
fn retention_timers_survive_a_restart() {
    let mut node = node();
    node.add_task("kept", "echo data > out.txt", Some("PT3S"));
    node.daemon.wait_task("kept", "completed");
    let (status, _, _) = node.daemon.request(
        Method::GET,
        "/v1/tasks/kept/files/stdout.txt",
        Some(READER),
        None,
        &[],
    );
    assert_eq!(status, 200, "files are there before expiry");
    node.daemon.kill9_and_restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, _, _) = node.daemon.request(
            Method::GET,
            "/v1/tasks/kept/files/stdout.txt",
            Some(READER),
            None,
            &[],
        );
        if status == 404 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "retention never expired after the restart"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        node.daemon.get("/v1/tasks/kept")["state"],
        "completed",
        "the record stays"
    );
}

#[test]
fn allowed_urls_are_enforced_on_the_request_and_on_redirects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.img");
    let storage_sha = target_disk(&disk, 64, 16, 51);
    let raw = os_image(16, 1, 52);
    let elsewhere = FaultServer::start(
        vec![("/os.img.zst".into(), Arc::new(zstd(&raw)))],
        Fault::None,
    );
    let allowed = FaultServer::start(
        vec![("/os.img.zst".into(), Arc::new(Vec::new()))],
        Fault::RedirectTo(elsewhere.url("/os.img.zst")),
    );
    let extra = format!("\n[image]\nallowed_urls = [\"{}\"]\n", allowed.url("/"));
    let daemon = Daemon::start(&write_config(dir.path(), &extra));
    let body = |url: String| json!({"image": {"url": url, "sha256": sha256(&raw)}});

    let (status, refused) = daemon.post(
        "/v1/node/reimage",
        ADMIN,
        body(elsewhere.url("/os.img.zst")),
    );
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["code"], "ImageUrlNotAllowed");

    let (status, accepted) =
        daemon.post("/v1/node/reimage", ADMIN, body(allowed.url("/os.img.zst")));
    assert_eq!(status, 202, "{accepted}");
    let done = daemon.wait_operation(accepted["id"].as_str().expect("id"));
    assert_eq!(done["status"], "Failed", "{done}");
    assert_eq!(done["error"]["code"], "ImageUrlNotAllowed", "{done}");
    assert!(
        elsewhere.requests().is_empty(),
        "the redirect was never followed"
    );
    let (sha, _) = partition_sha256(&disk, "local-storage").expect("kept");
    assert_eq!(sha, storage_sha);
    assert_eq!(
        daemon.get("/v1/node")["state"],
        "idle",
        "nothing was written"
    );
}

#[test]
fn trusted_keys_admit_only_signed_manifests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.img");
    let storage_sha = target_disk(&disk, 64, 16, 61);
    let raw = os_image(16, 1, 62);
    let manifest = format!(
        r#"{{"name":"os","url":"os.img.zst","format":"zstd","size":{},"sha256":"{}"}}"#,
        raw.len(),
        sha256(&raw)
    );
    let minisign::KeyPair { pk, sk } =
        minisign::KeyPair::generate_unencrypted_keypair().expect("keys");
    let signature = minisign::sign(Some(&pk), &sk, manifest.as_bytes(), None, None).expect("signs");
    let server = FaultServer::start(
        vec![
            ("/os.img.zst".into(), Arc::new(zstd(&raw))),
            (
                "/signed.json".into(),
                Arc::new(manifest.clone().into_bytes()),
            ),
            (
                "/signed.json.minisig".into(),
                Arc::new(signature.to_string().into_bytes()),
            ),
            ("/unsigned.json".into(), Arc::new(manifest.into_bytes())),
        ],
        Fault::None,
    );
    let extra = format!("\n[image]\ntrusted_keys = [\"{}\"]\n", pk.to_base64());
    let daemon = Daemon::start(&write_config(dir.path(), &extra));

    let inline = json!({"image": {"url": server.url("/os.img.zst"), "sha256": sha256(&raw)}});
    let (status, body) = daemon.post("/v1/node/reimage", ADMIN, inline);
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("ManifestUnsigned")),
        "{body}"
    );

    let (status, body) = daemon.post(
        "/v1/node/reimage",
        ADMIN,
        json!({"manifestUrl": server.url("/unsigned.json")}),
    );
    assert_eq!(status, 202, "{body}");
    let done = daemon.wait_operation(body["id"].as_str().expect("id"));
    assert_eq!(done["error"]["code"], "ManifestUnsigned", "{done}");
    assert_eq!(
        daemon.get("/v1/node")["state"],
        "idle",
        "refused before writing"
    );

    let (status, body) = daemon.post(
        "/v1/node/reimage",
        ADMIN,
        json!({"manifestUrl": server.url("/signed.json")}),
    );
    assert_eq!(status, 202, "{body}");
    let done = daemon.wait_operation(body["id"].as_str().expect("id"));
    assert_eq!(done["status"], "Succeeded", "{done}");
    assert_eq!(
        partition_sha256(&disk, "local-storage").expect("kept").0,
        storage_sha
    );
}

/// Every route: what role it needs, and a request that would change state.
const ROUTES: &[(&str, &str, Option<&str>)] = &[
    ("GET", "/v1/node", Some("reader")),
    ("POST", "/v1/node/reimage", Some("admin")),
    ("POST", "/v1/node/reboot", Some("admin")),
    ("POST", "/v1/node/disablescheduling", Some("operator")),
    ("POST", "/v1/node/enablescheduling", Some("operator")),
    ("GET", "/v1/operations", Some("reader")),
    ("GET", "/v1/operations/x", Some("reader")),
    ("POST", "/v1/tasks", Some("operator")),
    ("GET", "/v1/tasks", Some("reader")),
    ("GET", "/v1/tasks/x", Some("reader")),
    ("DELETE", "/v1/tasks/x", Some("operator")),
    ("GET", "/v1/tasks/x/files/stdout.txt", Some("reader")),
    ("GET", "/metrics", Some("reader")),
    ("GET", "/v1/openapi.json", Some("reader")),
    (
        "POST",
        "/pools/p/nodes/node-1/reimage?api-version=2024-07-01.20.0",
        Some("admin"),
    ),
    (
        "POST",
        "/pools/p/nodes/node-1/reboot?api-version=2024-07-01.20.0",
        Some("admin"),
    ),
    (
        "POST",
        "/pools/p/nodes/node-1/disablescheduling?api-version=2024-07-01.20.0",
        Some("operator"),
    ),
    (
        "POST",
        "/pools/p/nodes/node-1/enablescheduling?api-version=2024-07-01.20.0",
        Some("operator"),
    ),
    (
        "GET",
        "/pools/p/nodes/node-1?api-version=2024-07-01.20.0",
        Some("reader"),
    ),
    (
        "GET",
        "/pools/p/nodes?api-version=2024-07-01.20.0",
        Some("reader"),
    ),
    ("GET", "/healthz", None),
];

#[test]
fn every_route_refuses_missing_wrong_and_lesser_tokens_and_changes_nothing() {
    let node = node();
    node.add_task("guarded", "sleep 1000", None);
    node.daemon.wait_task("guarded", "running");
    let rank = |role: &str| {
        ["reader", "operator", "admin"]
            .iter()
            .position(|r| *r == role)
    };
    for (method, path, needed) in ROUTES {
        let method = Method::from_bytes(method.as_bytes()).expect("method");
        let body = (method == Method::POST).then(|| json!({"id": "new", "commandLine": "true"}));
        for (token, role) in [
            (None, None),
            (Some("wrong"), None),
            (Some(READER), Some("reader")),
            (Some(OPERATOR), Some("operator")),
        ] {
            let (status, _, answer) =
                node.daemon
                    .request(method.clone(), path, token, body.clone(), &[]);
            let expected = match (needed, role) {
                (None, _) => None,
                (Some(_), None) => Some(401),
                (Some(needed), Some(role)) if rank(role) < rank(needed) => Some(403),
                _ => None,
            };
            if let Some(expected) = expected {
                assert_eq!(status, expected, "{method} {path} with {token:?}: {answer}");
                let code = if expected == 401 {
                    "AuthenticationFailed"
                } else {
                    "InsufficientPermissions"
                };
                assert_eq!(answer["code"], code, "{method} {path}");
            }
        }
    }
    // Only the operator's own allowed calls could have changed anything;
    // the admin-only ones did not run.
    assert!(
        node.daemon.get("/v1/operations")["value"]
            .as_array()
            .expect("list")
            .is_empty()
    );
    assert_eq!(node.daemon.get("/v1/tasks/guarded")["state"], "running");
    let log = node.daemon.log_text();
    for token in [ADMIN, OPERATOR, READER] {
        assert!(!log.contains(token), "a token appeared in the log");
    }
}
