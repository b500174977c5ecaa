//! Prefetch end to end: the real daemon, a counting HTTP image server and
//! a disk file. A prefetch stages the image while the node works; the
//! reimage that follows downloads nothing; bad images, budgets, deletes
//! and `kill -9` leave the node and its disk as they were.

use reimage_e2e::daemon::{ADMIN, Daemon, OPERATOR, READER, stage_in_state_dir, write_config};
use reimage_e2e::http_server::{Fault, FaultServer};
use reimage_e2e::images::{labels, os_image, partition_sha256, sha256, target_disk, zstd};
use reqwest::Method;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Node {
    daemon: Daemon,
    server: FaultServer,
    /// SHA-256 of the raw image served at `/os.img.zst`.
    image_sha: String,
    disk: PathBuf,
    storage_sha: String,
    dir: tempfile::TempDir,
}

/// An agent with a 64 MiB disk (16 MiB local-storage at its end) staging
/// into `state_dir`, and `images` (path, raw image) served from 127.0.0.1;
/// `image_toml` goes into the config's `[image]` table.
fn node_with(images: Vec<(&str, Vec<u8>)>, fault: Fault, image_toml: &str) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.img");
    let storage_sha = target_disk(&disk, 64, 16, 41);
    let image_sha = sha256(&images[0].1);
    let files = images
        .iter()
        .map(|(path, raw)| (path.to_string(), Arc::new(zstd(raw))))
        .collect();
    let server = FaultServer::start(files, fault);
    let config = write_config(dir.path(), &format!("[image]\n{image_toml}\n"));
    stage_in_state_dir(&config);
    let daemon = Daemon::start(&config);
    Node {
        daemon,
        server,
        image_sha,
        disk,
        storage_sha,
        dir,
    }
}

/// The 16 MiB image of the other daemon tests.
fn node() -> Node {
    node_with(vec![("/os.img.zst", os_image(16, 1, 42))], Fault::None, "")
}

impl Node {
    fn image(&self, path: &str, sha: &str) -> Value {
        json!({"url": self.server.url(path), "sha256": sha})
    }

    /// Starts a prefetch of `body` and returns the operation id.
    fn prefetch(&self, body: Value) -> String {
        let (status, body) = self.daemon.post("/v1/images/prefetch", ADMIN, body);
        assert_eq!(status, 202, "prefetch accepted: {body}");
        assert_eq!(body["kind"], "prefetch", "{body}");
        body["id"].as_str().expect("operation id").to_string()
    }

    fn reimage(&self, option: &str) -> String {
        let body = json!({
            "nodeReimageOption": option,
            "image": self.image("/os.img.zst", &self.image_sha),
        });
        let (status, body) = self.daemon.post("/v1/node/reimage", ADMIN, body);
        assert_eq!(status, 202, "reimage accepted: {body}");
        body["id"].as_str().expect("operation id").to_string()
    }

    /// GETs of the image the server answered so far.
    fn downloads(&self, path: &str) -> usize {
        self.server
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path == path)
            .count()
    }

    fn staged(&self) -> Vec<Value> {
        self.daemon.get("/v1/images")["value"]
            .as_array()
            .expect("list")
            .clone()
    }

    fn staged_shas(&self) -> Vec<String> {
        self.staged()
            .iter()
            .map(|i| i["sha256"].as_str().expect("sha").to_string())
            .collect()
    }

    /// `/metrics` as text.
    fn metrics(&self) -> String {
        let (status, _, body) =
            self.daemon
                .request(Method::GET, "/metrics", Some(READER), None, &[]);
        assert_eq!(status, 200, "{body}");
        body.as_str().expect("text").to_string()
    }

    fn images_dir(&self) -> PathBuf {
        self.dir.path().join("state/images")
    }

    fn disk_sha(&self) -> String {
        sha256(&std::fs::read(&self.disk).expect("disk"))
    }

    fn assert_storage_intact(&self) {
        let (sha, _) =
            partition_sha256(&self.disk, "local-storage").expect("local-storage in the table");
        assert_eq!(sha, self.storage_sha, "local-storage bytes unchanged");
    }

    fn add_task(&self, id: &str, command: &str) {
        self.daemon
            .add_task(json!({"id": id, "commandLine": command}));
    }
}

/// Files in `dir` whose name ends with `suffix`.
fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(suffix))
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `check` until it holds, for at most 60 s.
fn wait_until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_reimage_after_a_prefetch_downloads_nothing_and_drops_the_copy() {
    let node = node();
    node.add_task("work", "sleep 1000");
    node.daemon.wait_task("work", "running");
    let op = node.prefetch(json!({"image": node.image("/os.img.zst", &node.image_sha)}));
    let done = node.daemon.wait_operation(&op);
    assert_eq!(done["status"], "Succeeded", "{done}");
    assert_eq!(done["image"]["sha256"], node.image_sha.as_str(), "{done}");
    let info = node.daemon.get("/v1/node");
    assert_eq!(info["state"], "running", "the node worked on: {info}");
    assert!(
        info["image"].is_null(),
        "the node's image is unchanged: {info}"
    );
    let staged = node.staged();
    assert_eq!(staged.len(), 1, "{staged:?}");
    assert_eq!(staged[0]["sha256"], node.image_sha.as_str());
    assert_eq!(staged[0]["area"], "stateDir");
    assert_eq!(staged[0]["operationId"], op.as_str());
    let fetched = node.server.requests().len();
    assert!(fetched > 0, "the prefetch downloaded the image");

    let reimage = node.reimage("requeue");
    let done = node.daemon.wait_operation(&reimage);
    assert_eq!(done["status"], "Succeeded", "{done}");
    assert_eq!(
        node.server.requests().len(),
        fetched,
        "the reimage made no request to the image server: {:?}",
        node.server.requests()
    );
    assert_eq!(labels(&node.disk), vec!["efi", "root", "local-storage"]);
    node.assert_storage_intact();
    assert_eq!(
        node.daemon.get("/v1/node")["image"]["sha256"],
        node.image_sha.as_str()
    );
    assert!(node.staged().is_empty(), "the copy was dropped after use");
    assert!(files_ending(&node.images_dir(), ".staged").is_empty());
}

#[test]
fn a_prefetch_of_a_bad_image_fails_with_the_node_working_and_the_disk_untouched() {
    let node = node();
    node.add_task("work", "sleep 1000");
    node.daemon.wait_task("work", "running");
    let disk_before = node.disk_sha();
    let op = node.prefetch(json!({"image": node.image("/os.img.zst", &"0".repeat(64))}));
    let done = node.daemon.wait_operation(&op);
    assert_eq!(done["status"], "Failed", "{done}");
    assert_eq!(done["error"]["code"], "ImageChecksumMismatch", "{done}");
    let info = node.daemon.get("/v1/node");
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["errors"], json!([]), "the node has no failure: {info}");
    assert_eq!(node.daemon.wait_task("work", "running")["state"], "running");
    assert_eq!(
        node.disk_sha(),
        disk_before,
        "not a byte of the disk changed"
    );
    node.assert_storage_intact();
    assert!(node.staged().is_empty());
    assert!(files_ending(&node.images_dir(), ".partial").is_empty());
    assert!(files_ending(&node.images_dir(), ".staged").is_empty());
}

#[test]
fn a_taskcompletion_reimage_stages_its_image_before_the_task_ends() {
    let node = node();
    let release = node.dir.path().join("release");
    node.add_task(
        "long",
        &format!("while [ ! -e {} ]; do sleep 0.1; done", release.display()),
    );
    node.daemon.wait_task("long", "running");
    let op = node.reimage("taskcompletion");
    wait_until("the image staged while the task runs", || {
        node.staged_shas().contains(&node.image_sha)
    });
    assert_eq!(
        node.daemon.get("/v1/tasks/long")["state"],
        "running",
        "the image was staged before the task ended"
    );
    let waiting = node.daemon.get(&format!("/v1/operations/{op}"));
    assert_eq!(waiting["phase"], "waitingForTasks", "{waiting}");
    let fetched = node.downloads("/os.img.zst");
    assert!(fetched > 0);

    std::fs::write(&release, b"").expect("release the task");
    let done = node.daemon.wait_operation(&op);
    assert_eq!(done["status"], "Succeeded", "{done}");
    assert_eq!(
        node.downloads("/os.img.zst"),
        fetched,
        "the write read the staged copy"
    );
    let task = node.daemon.get("/v1/tasks/long");
    assert_eq!(task["executionInfo"]["exitCode"], 0, "{task}");
    assert_eq!(labels(&node.disk), vec!["efi", "root", "local-storage"]);
    node.assert_storage_intact();
    assert!(node.staged().is_empty());
}

#[test]
fn a_retaineddata_reimage_stages_its_image_while_retention_runs_out() {
    let node = node();
    let body = json!({
        "id": "kept",
        "commandLine": "echo result > out.txt",
        "constraints": {"retentionTime": "PT6S"},
    });
    let (status, body) = node.daemon.post("/v1/tasks", OPERATOR, body);
    assert_eq!(status, 201, "task added: {body}");
    node.daemon.wait_task("kept", "completed");
    let op = node.reimage("retaineddata");
    wait_until("the image staged while retention runs", || {
        node.staged_shas().contains(&node.image_sha)
    });
    let waiting = node.daemon.get(&format!("/v1/operations/{op}"));
    assert_eq!(
        waiting["status"], "InProgress",
        "staged before the wait ended"
    );
    let fetched = node.downloads("/os.img.zst");
    let done = node.daemon.wait_operation(&op);
    assert_eq!(done["status"], "Succeeded", "{done}");
    assert_eq!(node.downloads("/os.img.zst"), fetched, "no second download");
    node.assert_storage_intact();
}

#[test]
fn staged_images_are_listed_and_deleted_by_admins_only() {
    let node = node();
    let op = node.prefetch(json!({"image": node.image("/os.img.zst", &node.image_sha)}));
    assert_eq!(node.daemon.wait_operation(&op)["status"], "Succeeded");
    assert_eq!(node.staged_shas(), vec![node.image_sha.clone()]);
    let staged_bytes = node.staged()[0]["stagedBytes"].as_u64().expect("bytes");
    let metrics = node.metrics();
    assert!(metrics.contains("reimage_staged_images 1\n"), "{metrics}");
    assert!(
        metrics.contains(&format!("reimage_staged_bytes {staged_bytes}\n")),
        "{metrics}"
    );
    let path = format!("/v1/images/{}", node.image_sha);
    let (status, _, body) = node
        .daemon
        .request(Method::DELETE, &path, Some(READER), None, &[]);
    assert_eq!(status, 403, "{body}");
    let (status, _, body) = node.daemon.request(
        Method::POST,
        "/v1/images/prefetch",
        Some(OPERATOR),
        Some(json!({})),
        &[],
    );
    assert_eq!(status, 403, "prefetch needs admin: {body}");
    let (status, _, body) = node
        .daemon
        .request(Method::DELETE, &path, Some(ADMIN), None, &[]);
    assert_eq!(status, 200, "{body}");
    assert!(node.staged().is_empty());
    assert!(files_ending(&node.images_dir(), ".staged").is_empty());
    assert!(node.metrics().contains("reimage_staged_images 0\n"));
    let (status, _, body) = node
        .daemon
        .request(Method::DELETE, &path, Some(ADMIN), None, &[]);
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["code"], "StagedImageNotFound", "{body}");

    // With the copy gone, a reimage streams the image from its URL.
    let before = node.downloads("/os.img.zst");
    let done = node.daemon.wait_operation(&node.reimage("requeue"));
    assert_eq!(done["status"], "Succeeded", "{done}");
    assert!(node.downloads("/os.img.zst") > before);
    node.assert_storage_intact();
}

#[test]
fn a_prefetch_beyond_the_budget_evicts_the_least_recently_used_copy() {
    // Each image is about 8 MiB compressed (1 MiB random, 1 MiB zeros):
    // two do not fit in 12 MiB.
    let a = os_image(16, 1, 1);
    let b = os_image(16, 1, 2);
    let big = os_image(40, 0, 3);
    let (a_sha, b_sha, big_sha) = (sha256(&a), sha256(&b), sha256(&big));
    let node = node_with(
        vec![("/a.img.zst", a), ("/b.img.zst", b), ("/big.img.zst", big)],
        Fault::None,
        "prefetch_budget_mib = 12",
    );
    let op = node.prefetch(json!({"image": node.image("/a.img.zst", &a_sha)}));
    assert_eq!(node.daemon.wait_operation(&op)["status"], "Succeeded");
    let op = node.prefetch(json!({"image": node.image("/b.img.zst", &b_sha)}));
    assert_eq!(node.daemon.wait_operation(&op)["status"], "Succeeded");
    assert_eq!(node.staged_shas(), vec![b_sha.clone()], "a was evicted");
    assert_eq!(files_ending(&node.images_dir(), ".staged").len(), 1);

    let op = node.prefetch(json!({"image": node.image("/big.img.zst", &big_sha)}));
    let done = node.daemon.wait_operation(&op);
    assert_eq!(done["status"], "Failed", "{done}");
    assert_eq!(done["error"]["code"], "StagingSpaceInsufficient", "{done}");
    assert_eq!(node.staged_shas(), vec![b_sha], "nothing evicted for it");
}

#[test]
fn kill_9_during_a_prefetch_fails_it_as_agent_restarted_and_removes_the_partial() {
    let mut node = node_with(
        vec![("/os.img.zst", os_image(16, 1, 42))],
        Fault::StallOnce {
            after: 2 << 20,
            for_: Duration::from_secs(600),
        },
        "",
    );
    let op = node.prefetch(json!({"image": node.image("/os.img.zst", &node.image_sha)}));
    let partial = node
        .images_dir()
        .join(format!("{}.partial", node.image_sha));
    wait_until("the partial download", || {
        std::fs::metadata(&partial).is_ok_and(|m| m.len() > 0)
    });
    node.daemon.kill9_and_restart();
    let done = node.daemon.wait_operation(&op);
    assert_eq!(done["status"], "Failed", "{done}");
    assert_eq!(done["error"]["code"], "AgentRestarted", "{done}");
    assert!(!partial.exists(), "the partial download was removed");
    let info = node.daemon.get("/v1/node");
    assert_eq!(info["state"], "idle", "{info}");
    assert_eq!(info["errors"], json!([]), "{info}");
    assert!(node.staged().is_empty());
    node.assert_storage_intact();
}

#[test]
fn a_staged_copy_that_does_not_verify_is_replaced_by_the_image_from_its_url() {
    let node = node();
    let op = node.prefetch(json!({"image": node.image("/os.img.zst", &node.image_sha)}));
    assert_eq!(node.daemon.wait_operation(&op)["status"], "Succeeded");
    let staged = node.images_dir().join(format!("{}.staged", node.image_sha));
    let mut bytes = std::fs::read(&staged).expect("staged copy");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&staged, &bytes).expect("corrupt the copy, same length");
    let before = node.downloads("/os.img.zst");

    let done = node.daemon.wait_operation(&node.reimage("requeue"));
    assert_eq!(done["status"], "Succeeded", "{done}");
    assert!(
        node.downloads("/os.img.zst") > before,
        "the image was streamed from its URL"
    );
    assert_eq!(labels(&node.disk), vec!["efi", "root", "local-storage"]);
    node.assert_storage_intact();
    assert_eq!(
        node.daemon.get("/v1/node")["image"]["sha256"],
        node.image_sha.as_str()
    );
    assert!(node.staged().is_empty(), "the bad copy was dropped");
}

#[test]
fn a_reimage_by_the_prefetched_manifest_fetches_neither_manifest_nor_image() {
    let raw = os_image(16, 1, 42);
    let packed = zstd(&raw);
    let manifest = json!({
        "name": "os",
        "url": "os.img.zst",
        "format": "zstd",
        "size": raw.len(),
        "sha256": sha256(&raw),
    });
    let node = node_with(vec![("/os.img.zst", raw)], Fault::None, "");
    node.server.replace_file(
        "/os.manifest.json",
        Arc::new(serde_json::to_vec(&manifest).expect("manifest")),
    );
    let manifest_url = node.server.url("/os.manifest.json");
    let op = node.prefetch(json!({"manifestUrl": manifest_url}));
    let done = node.daemon.wait_operation(&op);
    assert_eq!(done["status"], "Succeeded", "{done}");
    let staged = node.staged();
    assert_eq!(
        staged[0]["manifestUrl"],
        manifest_url.as_str(),
        "{staged:?}"
    );
    assert_eq!(staged[0]["stagedBytes"], packed.len(), "{staged:?}");
    let requests = node.server.requests().len();

    let body = json!({"nodeReimageOption": "requeue", "manifestUrl": manifest_url});
    let (status, body) = node.daemon.post("/v1/node/reimage", ADMIN, body);
    assert_eq!(status, 202, "{body}");
    let done = node.daemon.wait_operation(body["id"].as_str().expect("id"));
    assert_eq!(done["status"], "Succeeded", "{done}");
    assert_eq!(node.server.requests().len(), requests, "no request at all");
    node.assert_storage_intact();
}

#[test]
fn a_reimage_during_a_prefetch_of_its_image_waits_for_it_instead_of_downloading_again() {
    let node = node_with(
        vec![("/os.img.zst", os_image(16, 1, 42))],
        Fault::SlowBytesPerSec(4 << 20),
        "",
    );
    let prefetch = node.prefetch(json!({"image": node.image("/os.img.zst", &node.image_sha)}));
    wait_until("the prefetch downloading", || {
        node.downloads("/os.img.zst") > 0
    });
    let reimage = node.reimage("requeue");
    let done = node.daemon.wait_operation(&reimage);
    assert_eq!(done["status"], "Succeeded", "{done}");
    let prefetched = node.daemon.wait_operation(&prefetch);
    assert_eq!(prefetched["status"], "Succeeded", "{prefetched}");
    assert_eq!(
        node.downloads("/os.img.zst"),
        1,
        "one download for both: {:?}",
        node.server.requests()
    );
    node.assert_storage_intact();
    assert!(node.staged().is_empty(), "the copy was used and dropped");
}
