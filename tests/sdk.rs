//! Microsoft's own client libraries from PyPI against the real agent:
//! azure-batch 15 (track 2, azure-core, over HTTPS with a CA made by the
//! test), azure-batch 14 (track 1, msrest) and
//! azure-servicemanagement-legacy. Each script in `tests/sdk/` prints one
//! `ok {json}` line per case it passed; this side checks the facts the
//! scripts report against the agent's own records and the disk.
//!
//! The venvs come from `tests/sdk/venv.sh` (pinned, cached by `.ci/run`);
//! without python3 and its venv module the tests say `skipping <test>: <reason>`.

use reimage_e2e::daemon::{ADMIN, Daemon, NodeSetup, READER};
use reimage_e2e::http_server::FaultServer;
use reimage_e2e::images::{os_image, partition_sha256};
use reimage_e2e::pki::{Pki, add_to_api_table, client, server_pki, tls_lines};
use reimage_e2e::skip;
use serde_json::Value;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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
    let setup = NodeSetup::new(64, 91, &os_image(16, 1, 92));
    let pki = server_pki(setup.dir.path());
    let config = setup.config(&setup.default_image());
    add_to_api_table(&config, &tls_lines(&pki));
    let daemon = Daemon::start_with(&config, "https", client(&pki.server_ca.pem(), None));
    let release_dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(release_dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    Node {
        daemon,
        _server: setup.server,
        pki,
        image_sha: setup.image_sha,
        storage_sha: setup.storage_sha,
        dir: setup.dir,
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
        let mut command = Command::new(venv.join("bin/python"));
        command
            .arg(sdk_dir().join(script))
            .env("REIMAGE_SDK_URL", url)
            .env("REIMAGE_SDK_TOKEN", ADMIN)
            .env("REIMAGE_SDK_CA", &ca)
            .env("REIMAGE_SDK_NODE", "node-1")
            .env(
                "REIMAGE_SDK_RELEASE",
                self.release_dir.path().join("release"),
            )
            .env("REQUESTS_CA_BUNDLE", &ca);
        let stdout = self.run_to_success(script, command, Duration::from_secs(300));
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

    /// Runs `command` (killed after `limit`), asserts it succeeded, and
    /// returns its stdout; a failure shows its output and the agent's log.
    fn run_to_success(&self, what: &str, mut command: Command, limit: Duration) -> String {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("{what} does not start: {err}"));
        // Read both pipes while it runs, so a chatty child cannot block.
        let mut out_pipe = child.stdout.take().expect("stdout");
        let mut err_pipe = child.stderr.take().expect("stderr");
        let out_reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = out_pipe.read_to_string(&mut text);
            text
        });
        let err_reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err_pipe.read_to_string(&mut text);
            text
        });
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for the child") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break child.wait().expect("wait for the child");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let stdout = out_reader.join().unwrap_or_default();
        let stderr = err_reader.join().unwrap_or_default();
        assert!(
            status.success(),
            "{what} failed ({status}):\n{stdout}\n{stderr}\nagent log:\n{}",
            self.daemon.log_text()
        );
        stdout
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
fn azure_batch_15_drives_every_node_call_and_its_poller_waits_for_the_reimage() {
    let venv = match venv("batch15") {
        Ok(venv) => venv,
        Err(reason) => {
            return skip(
                "azure_batch_15_drives_every_node_call_and_its_poller_waits_for_the_reimage",
                &reason,
            );
        }
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

#[test]
fn azure_batch_14_drives_every_compute_node_call_with_the_batch_headers() {
    let venv = match venv("batch14") {
        Ok(venv) => venv,
        Err(reason) => {
            return skip(
                "azure_batch_14_drives_every_compute_node_call_with_the_batch_headers",
                &reason,
            );
        }
    };
    let node = node();
    let cases = node.run(&venv, "batch14.py", &node.daemon.url);
    for name in [
        "get",
        "list",
        "not_found",
        "scheduling",
        "reboot",
        "conflict",
    ] {
        case(&cases, name);
    }
    let reimage = case(&cases, "reimage");
    let operation = node.operation(reimage["operation"].as_str().expect("operation id"));
    node.assert_reimaged(&operation);
    assert_eq!(operation["nodeReimageOption"], "taskcompletion");
    assert!(
        reimage["etag"]
            .as_str()
            .is_some_and(|etag| !etag.is_empty()),
        "{reimage}"
    );
}

#[test]
fn azure_servicemanagement_reimages_the_role_instance_and_follows_its_operation() {
    let venv = match venv("servicemanagement") {
        Ok(venv) => venv,
        Err(reason) => {
            return skip(
                "azure_servicemanagement_reimages_the_role_instance_and_follows_its_operation",
                &reason,
            );
        }
    };
    let node = node();
    let cases = node.run(&venv, "servicemanagement.py", &node.daemon.url);
    case(&cases, "not_found");
    case(&cases, "conflict");
    let reimage = case(&cases, "reimage");
    let operation = node.operation(reimage["operation"].as_str().expect("operation id"));
    node.assert_reimaged(&operation);
    assert_eq!(
        operation["nodeReimageOption"], "requeue",
        "the seed default"
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

/// Examples per operation and the time budget of one Schemathesis run: a
/// quick pass, or the long one CI runs (`REIMAGE_LONG_TESTS=1`).
fn schemathesis_budget() -> (u32, u32) {
    if std::env::var_os("REIMAGE_LONG_TESTS").is_some_and(|v| v == "1") {
        (50, 90)
    } else {
        (5, 20)
    }
}

/// Schemathesis's configuration, with `refused` (a status) also expected
/// for well-formed requests.
fn schemathesis_config(refused: Option<&str>) -> String {
    let refused = refused
        .map(|status| format!(", \"{status}\""))
        .unwrap_or_default();
    format!(
        r#"# The description promises which requests are well formed; whether the
# node can take one now is its state's business: a reimage during a
# reimage or a task id already used are refused with 409 and are valid
# data all the same, as is a task or file that does not exist (404).
[checks.positive_data_acceptance]
expected-statuses = ["2XX", "404", "409"{refused}]

# Schemathesis guesses links between operations from their paths and, with
# a Batch node and a v1 node both present, links /pools/{{pool}}/nodes/{{node}}
# to /v1/node/reimage with `pool` and `node` parameters that route does
# not have, which it then reports as an error of the description. The
# stateful phase still follows the links the description declares.
[phases.stateful.inference]
algorithms = []
"#
    )
}

#[test]
fn schemathesis_finds_nothing_with_an_admin_or_a_reader_token() {
    let venv = match venv("schemathesis") {
        Ok(venv) => venv,
        Err(reason) => {
            return skip(
                "schemathesis_finds_nothing_with_an_admin_or_a_reader_token",
                &reason,
            );
        }
    };
    let node = node();
    let ca = node.ca_path();
    let (examples, seconds) = schemathesis_budget();
    // A reader is refused every change: its 403s are the expected answer.
    for (token, refused) in [(ADMIN, None), (READER, Some("403"))] {
        let config = node.dir.path().join("schemathesis.toml");
        std::fs::write(&config, schemathesis_config(refused)).expect("write config");
        let mut command = Command::new(venv.join("bin/schemathesis"));
        command
            .current_dir(node.dir.path())
            .arg("--config-file")
            .arg(&config)
            .arg("run")
            .arg(format!("{}/v1/openapi.json", node.daemon.url))
            // One worker: Hypothesis's lambda introspection is not safe
            // across threads ("AST constructor recursion depth mismatch").
            .args(["--checks", "all", "--seed", "11", "--workers", "1"])
            // About one run in three, a request sent on a kept-alive TLS
            // connection meets the agent's close of it ("EOF occurred in
            // violation of protocol"), the keep-alive race every client
            // meets; clients retry that on a new connection, so this does.
            .args(["--request-retries", "2"])
            .args(["--max-examples", &examples.to_string()])
            .args(["--max-time", &seconds.to_string()])
            .arg("--header")
            .arg(format!("Authorization: Bearer {token}"))
            .arg("--tls-verify")
            .arg(&ca)
            .env("NO_COLOR", "1");
        let limit = Duration::from_secs(u64::from(seconds) + 120);
        let output = node.run_to_success("schemathesis", command, limit);
        // "N generated, N passed, M skipped": every case generated passed.
        let counts = output
            .lines()
            .find(|line| line.contains(" generated, "))
            .unwrap_or_else(|| panic!("no test case counts:\n{output}"));
        let numbers: Vec<u64> = counts
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect();
        assert!(
            numbers.len() >= 2 && numbers[0] > 0 && numbers[0] == numbers[1],
            "not every case passed: {counts}\n{output}"
        );
    }
    // Whatever it sent, the agent is healthy, nothing touches the disk any
    // more (a retaineddata reimage may still wait out the retention of a
    // task it added), and local-storage is what it was.
    node.daemon
        .wait_for("no operation at the disk", "/v1/operations", |ops| {
            ops["value"].as_array().is_some_and(|ops| {
                ops.iter().all(|op| {
                    op["status"] != "InProgress"
                        || ["waitingForTasks", "waitingForRetention"]
                            .contains(&op["phase"].as_str().unwrap_or_default())
                })
            })
        });
    let (storage, _) =
        partition_sha256(&node.dir.path().join("disk.img"), "local-storage").expect("kept");
    assert_eq!(storage, node.storage_sha, "local-storage changed");
    let (status, _, body) = node
        .daemon
        .request(reqwest::Method::GET, "/healthz", None, None, &[]);
    assert_eq!(status, 200, "healthz after the run: {body}");
}
