//! Microsoft's own client libraries from PyPI against the real agent:
//! azure-batch 15 (track 2, azure-core, over HTTPS with a CA made by the
//! test), azure-batch 14 (track 1, msrest) and
//! azure-servicemanagement-legacy. Each script in `tests/sdk/` prints one
//! `ok {json}` line per case it passed; this side checks the facts the
//! scripts report against the agent's own records and the disk.
//!
//! The venvs come from `tests/sdk/venv.sh` (pinned, cached by `.ci/run`);
//! without python3 and its venv module the tests say `skipping: <reason>`.

use reimage_e2e::daemon::{ADMIN, Daemon, write_config};
use reimage_e2e::http_server::{Fault, FaultServer};
use reimage_e2e::images::{os_image, partition_sha256, sha256, target_disk, zstd};
use reimage_e2e::pki::{Pki, add_to_api_table, client, server_pki, tls_lines};
use serde_json::Value;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The folder of the scripts and their requirements.
fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk")
}

/// The venv `name` (made by `venv.sh` if it is not cached yet), or why
/// none can be had here.
fn venv(name: &str) -> Result<PathBuf, String> {
    let probe = Command::new("python3")
        .args(["-c", "import venv, ensurepip"])
        .output()
        .map_err(|err| format!("no python3: {err}"))?;
    if !probe.status.success() {
        return Err(format!(
            "python3 has no venv module (install python3-venv): {}",
            String::from_utf8_lossy(&probe.stderr).trim()
        ));
    }
    let output = Command::new("bash")
        .arg(sdk_dir().join("venv.sh"))
        .arg(name)
        .stderr(Stdio::inherit())
        .output()
        .expect("venv.sh runs");
    assert!(output.status.success(), "venv.sh {name} failed");
    let path = String::from_utf8_lossy(&output.stdout).trim().to_string();
    Ok(PathBuf::from(path))
}

/// An agent over HTTPS with a 64 MiB disk file (local-storage at its end)
/// whose config names a 16 MiB default image, as the Batch requests carry
/// none.
struct Node {
    daemon: Daemon,
    _server: FaultServer,
    pki: Pki,
    image_sha: String,
    storage_sha: String,
    dir: tempfile::TempDir,
    /// Where a script creates `release`, which ends the test's tasks; a
    /// folder the task's unprivileged user can search.
    release_dir: tempfile::TempDir,
}

fn node() -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage_sha = target_disk(&dir.path().join("disk.img"), 64, 16, 91);
    let raw = os_image(16, 1, 92);
    let server = FaultServer::start(
        vec![("/os.img.zst".into(), Arc::new(zstd(&raw)))],
        Fault::None,
    );
    let image_sha = sha256(&raw);
    let extra = format!(
        "\n[image]\nurl = \"{}\"\nsha256 = \"{image_sha}\"\n",
        server.url("/os.img.zst")
    );
    let pki = server_pki(dir.path());
    let config = write_config(dir.path(), &extra);
    add_to_api_table(&config, &tls_lines(&pki));
    let daemon = Daemon::start_with(&config, "https", client(&pki.server_ca.pem(), None));
    let release_dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(release_dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    Node {
        daemon,
        _server: server,
        pki,
        image_sha,
        storage_sha,
        dir,
        release_dir,
    }
}

impl Node {
    fn ca_path(&self) -> PathBuf {
        let path = self.dir.path().join("ca.pem");
        std::fs::write(&path, self.pki.server_ca.pem()).expect("write CA");
        path
    }

    /// Runs `script` with the venv's python and returns the cases it passed,
    /// by name.
    fn run(&self, venv: &Path, script: &str, url: &str) -> Vec<(String, Value)> {
        let ca = self.ca_path();
        let mut child = Command::new(venv.join("bin/python"))
            .arg(sdk_dir().join(script))
            .env("REIMAGE_SDK_URL", url)
            .env("REIMAGE_SDK_TOKEN", ADMIN)
            .env("REIMAGE_SDK_CA", &ca)
            .env("REIMAGE_SDK_NODE", "node-1")
            .env(
                "REIMAGE_SDK_RELEASE",
                self.release_dir.path().join("release"),
            )
            .env("REQUESTS_CA_BUNDLE", &ca)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python starts");
        let deadline = Instant::now() + Duration::from_secs(300);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for python") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break child.wait().expect("wait for python");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut stdout = String::new();
        let mut stderr = String::new();
        if let Some(mut out) = child.stdout.take() {
            let _ = out.read_to_string(&mut stdout);
        }
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        assert!(
            status.success(),
            "{script} failed ({status}):\n{stdout}\n{stderr}\nagent log:\n{}",
            self.daemon.log_text()
        );
        stdout
            .lines()
            .filter_map(|line| line.strip_prefix("ok "))
            .map(|json| {
                let value: Value = serde_json::from_str(json).expect("ok line is JSON");
                (
                    value["case"].as_str().unwrap_or_default().to_string(),
                    value,
                )
            })
            .collect()
    }

    /// The operation `id` from the agent's own `/v1/operations`.
    fn operation(&self, id: &str) -> Value {
        self.daemon.get(&format!("/v1/operations/{id}"))
    }

    /// The reimage wrote the default image and kept local-storage.
    fn assert_reimaged(&self, operation: &Value) {
        assert_eq!(operation["status"], "Succeeded", "{operation}");
        assert_eq!(operation["image"]["sha256"], self.image_sha, "{operation}");
        let (storage, _) =
            partition_sha256(&self.dir.path().join("disk.img"), "local-storage").expect("kept");
        assert_eq!(storage, self.storage_sha, "local-storage changed");
        let node = self.daemon.get("/v1/node");
        assert_eq!(node["image"]["sha256"], self.image_sha, "{node}");
    }
}

/// The names of the cases passed, for the assertion message.
fn names(cases: &[(String, Value)]) -> Vec<&str> {
    cases.iter().map(|(name, _)| name.as_str()).collect()
}

/// The facts of case `name`; panics if the script did not pass it.
fn case<'a>(cases: &'a [(String, Value)], name: &str) -> &'a Value {
    cases
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("case {name} not passed; passed: {:?}", names(cases)))
}

/// When the agent says operation `op` ended, as seconds since the epoch.
fn ended_at(op: &Value) -> f64 {
    let text = op["endedAt"]
        .as_str()
        .unwrap_or_else(|| panic!("no endedAt: {op}"));
    let at: jiff::Timestamp = text.parse().expect("endedAt is RFC 3339");
    at.as_millisecond() as f64 / 1000.0
}

#[test]
#[ignore = "issue 11: unfinished; azure-batch 15.1.0 sends no content type for begin_reimage_node and fails before the request"]
fn azure_batch_15_drives_every_node_call_and_its_poller_waits_for_the_reimage() {
    let venv = match venv("batch15") {
        Ok(venv) => venv,
        Err(reason) => return println!("skipping: {reason}"),
    };
    let node = node();
    let cases = node.run(&venv, "batch15.py", &node.daemon.url);
    for name in [
        "get_node",
        "list_nodes",
        "not_found",
        "scheduling",
        "reboot",
        "conflict",
        "begin_reimage_node",
    ] {
        case(&cases, name);
    }
    let reimage = case(&cases, "begin_reimage_node");
    let operation = node.operation(reimage["operation"].as_str().expect("operation id"));
    node.assert_reimaged(&operation);
    assert_eq!(operation["nodeReimageOption"], "taskcompletion");
    let returned = reimage["pollerReturnedAt"].as_f64().expect("a time");
    assert!(
        ended_at(&operation) <= returned,
        "the poller returned at {returned}, before the operation ended: {operation}"
    );
    let task = node.daemon.get("/v1/tasks/drain-me");
    assert_eq!(task["state"], "completed", "the task drained: {task}");
    assert!(
        ended_at(&operation) >= task_end(&task),
        "the reimage ended before the task did: {operation} {task}"
    );
}

/// When `task` ended, as seconds since the epoch.
fn task_end(task: &Value) -> f64 {
    let text = task["executionInfo"]["endTime"]
        .as_str()
        .unwrap_or_else(|| panic!("no endTime: {task}"));
    let at: jiff::Timestamp = text.parse().expect("endTime is RFC 3339");
    at.as_millisecond() as f64 / 1000.0
}
