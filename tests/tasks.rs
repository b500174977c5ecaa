//! Tasks that try to outlive their stop, and tasks as their users, against
//! the real daemon. Whether a task's processes are gone is checked by
//! scanning `/proc` for a marker in their environment, never by asking
//! the agent.

use reimage_e2e::daemon::{ADMIN, Daemon, OPERATOR, write_config};
use reimage_e2e::http_server::{Fault, FaultServer};
use reimage_e2e::images::{os_image, sha256, target_disk, zstd};
use reimage_e2e::{is_root, skip};
use reqwest::Method;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The environment variable that marks a test's processes.
const MARKER: &str = "REIMAGE_E2E_MARKER";

/// A command that tries every way out: a setsid child that ignores
/// SIGTERM (sh and its sleep), a double-forked daemon (its sleep), and
/// the foreground sleep under the task's own sh: five processes.
const ESCAPER: &str = "echo run >> runs.txt; \
    setsid sh -c 'trap \"\" TERM; sleep 1000' & \
    setsid sh -c 'sleep 1000 &'; \
    sleep 1000";
const ESCAPER_PROCESSES: usize = 5;

struct Node {
    daemon: Daemon,
    server: FaultServer,
    image_sha: String,
    dir: tempfile::TempDir,
}

fn node() -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    target_disk(&dir.path().join("disk.img"), 64, 16, 71);
    let raw = os_image(16, 1, 72);
    let server = FaultServer::start(
        vec![("/os.img.zst".into(), Arc::new(zstd(&raw)))],
        Fault::None,
    );
    let daemon = Daemon::start(&write_config(dir.path(), ""));
    Node {
        daemon,
        server,
        image_sha: sha256(&raw),
        dir,
    }
}

impl Node {
    /// Why this machine cannot contain tasks in cgroups, or `None`.
    fn without_cgroups(&self) -> Option<String> {
        let isolation = self.daemon.get("/v1/node")["taskIsolation"].clone();
        (isolation != "cgroup")
            .then(|| format!("taskIsolation is {isolation}: no writable cgroup v2 for the agent"))
    }

    fn add(&self, token: &str, body: Value) -> (u16, Value) {
        self.daemon.post("/v1/tasks", token, body)
    }

    fn add_marked(&self, id: &str, command: &str, marker: &str, extra: Value) {
        let mut body = json!({
            "id": id,
            "commandLine": command,
            "environmentSettings": [{"name": MARKER, "value": marker}],
        });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        let (status, answer) = self.add(OPERATOR, body);
        assert_eq!(status, 201, "task added: {answer}");
    }

    fn wait_task(&self, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        self.daemon.wait_for(
            &format!("task {id} {what}"),
            &format!("/v1/tasks/{id}"),
            check,
        )
    }

    fn reimage(&self, option: &str) -> Value {
        let body = json!({
            "nodeReimageOption": option,
            "image": {"url": self.server.url("/os.img.zst"), "sha256": self.image_sha},
        });
        let (status, answer) = self.daemon.post("/v1/node/reimage", ADMIN, body);
        assert_eq!(status, 202, "reimage accepted: {answer}");
        let op = self
            .daemon
            .wait_operation(answer["id"].as_str().expect("operation id"));
        assert_eq!(op["status"], "Succeeded", "{op}");
        op
    }

    fn task_dir(&self, id: &str) -> PathBuf {
        self.dir.path().join("tasks/tasks").join(id)
    }

    fn stdout(&self, id: &str) -> String {
        std::fs::read_to_string(self.task_dir(id).join("stdout.txt")).unwrap_or_default()
    }
}

impl Drop for Node {
    /// A clean stop (SIGTERM): the agent stops its tasks' cgroups, so no
    /// test leaves escaped processes behind (a `kill -9` would).
    fn drop(&mut self) {
        if self.daemon.pid().is_some() {
            self.daemon.terminate();
        }
    }
}

fn not_root() -> Option<String> {
    (!is_root()).then(|| "running tasks as other users needs root".to_owned())
}

/// A marker no other test (or earlier run) uses.
fn unique_marker(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{test}-{}-{nanos}", std::process::id())
}

/// Live (not zombie) processes whose environment holds `marker`.
fn marked_pids(marker: &str) -> Vec<i32> {
    let Ok(processes) = procfs::process::all_processes() else {
        return Vec::new();
    };
    processes
        .flatten()
        .filter(|p| p.stat().is_ok_and(|s| !matches!(s.state, 'Z' | 'X')))
        .filter(|p| {
            p.environ().is_ok_and(|env| {
                env.get(std::ffi::OsStr::new(MARKER))
                    .is_some_and(|v| v == marker)
            })
        })
        .map(|p| p.pid)
        .collect()
}

/// Polls `/proc` until at least `count` processes carry `marker`.
fn wait_marked(marker: &str, count: usize) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pids = marked_pids(marker);
        if pids.len() >= count {
            return pids;
        }
        assert!(
            Instant::now() < deadline,
            "{count} processes marked {marker} never ran: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The cgroup v2 path of `pid`.
fn cgroup_of(pid: i32) -> Option<String> {
    let cgroups = procfs::process::Process::new(pid).ok()?.cgroups().ok()?;
    cgroups
        .0
        .into_iter()
        .find(|c| c.hierarchy == 0)
        .map(|c| c.pathname)
}

/// Starts the escaping task and checks that two of its processes really
/// left its process group (so only a cgroup can hold them).
fn start_escaper(node: &Node, id: &str, marker: &str, extra: Value) -> Vec<i32> {
    node.add_marked(id, ESCAPER, marker, extra);
    let pids = wait_marked(marker, ESCAPER_PROCESSES);
    let sessions: std::collections::HashSet<i32> = pids
        .iter()
        .filter_map(|pid| procfs::process::Process::new(*pid).ok()?.stat().ok())
        .map(|s| s.session)
        .collect();
    assert_eq!(
        sessions.len(),
        3,
        "three sessions: the task's and two setsid ones"
    );
    pids
}

#[test]
fn the_node_says_its_tasks_run_in_cgroups() {
    let node = node();
    if let Some(why) = not_root() {
        return skip("the_node_says_its_tasks_run_in_cgroups", &why);
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if !mountinfo.lines().any(|l| l.contains(" - cgroup2 ")) {
        return skip("the_node_says_its_tasks_run_in_cgroups", "no cgroup2 mount");
    }
    assert_eq!(node.daemon.get("/v1/node")["taskIsolation"], "cgroup");
}

#[test]
fn a_terminate_reimage_leaves_no_process_of_a_task_that_escaped() {
    let node = node();
    if let Some(why) = node.without_cgroups() {
        return skip(
            "a_terminate_reimage_leaves_no_process_of_a_task_that_escaped",
            &why,
        );
    }
    let marker = unique_marker("terminate");
    start_escaper(&node, "escaper", &marker, json!({}));
    let op = node.reimage("terminate");
    assert_eq!(op["terminatedTasks"], json!(["escaper"]), "{op}");
    assert_eq!(marked_pids(&marker), Vec::<i32>::new());
    let task = node.daemon.get("/v1/tasks/escaper");
    assert_eq!(task["state"], "completed");
    assert_eq!(
        task["executionInfo"]["failureInfo"]["code"],
        "TaskTerminated"
    );
}

#[test]
fn a_requeue_reimage_leaves_exactly_one_run_of_a_task_that_escaped() {
    let node = node();
    if let Some(why) = node.without_cgroups() {
        return skip(
            "a_requeue_reimage_leaves_exactly_one_run_of_a_task_that_escaped",
            &why,
        );
    }
    let marker = unique_marker("requeue");
    let first = start_escaper(&node, "escaper", &marker, json!({}));
    let op = node.reimage("requeue");
    assert_eq!(op["requeuedTasks"], json!(["escaper"]), "{op}");
    node.wait_task("escaper", "running again", |t| {
        t["state"] == "running" && t["executionInfo"]["requeueCount"] == 1
    });
    let second = wait_marked(&marker, ESCAPER_PROCESSES);
    assert_eq!(second.len(), ESCAPER_PROCESSES, "one run: {second:?}");
    assert!(
        second.iter().all(|pid| !first.contains(pid)),
        "no process of the first run: {first:?} {second:?}"
    );
    let cgroups: std::collections::HashSet<_> = second.iter().map(|p| cgroup_of(*p)).collect();
    assert_eq!(cgroups.len(), 1, "{cgroups:?}");
    assert!(
        cgroups.iter().flatten().all(|c| c.ends_with("/escaper.1")),
        "{cgroups:?}"
    );
    let runs =
        std::fs::read_to_string(node.task_dir("escaper").join("wd/runs.txt")).expect("runs.txt");
    assert_eq!(runs, "run\nrun\n");
}

#[test]
fn deleting_a_task_that_escaped_leaves_none_of_its_processes() {
    let node = node();
    if let Some(why) = node.without_cgroups() {
        return skip(
            "deleting_a_task_that_escaped_leaves_none_of_its_processes",
            &why,
        );
    }
    let marker = unique_marker("delete");
    start_escaper(&node, "escaper", &marker, json!({}));
    let (status, _, body) = node.daemon.request(
        Method::DELETE,
        "/v1/tasks/escaper",
        Some(OPERATOR),
        None,
        &[],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(marked_pids(&marker), Vec::<i32>::new());
    assert!(!node.task_dir("escaper").exists());
}

#[test]
fn max_wall_clock_time_leaves_none_of_the_processes_of_a_task_that_escaped() {
    let node = node();
    if let Some(why) = node.without_cgroups() {
        return skip(
            "max_wall_clock_time_leaves_none_of_the_processes_of_a_task_that_escaped",
            &why,
        );
    }
    let marker = unique_marker("wallclock");
    start_escaper(
        &node,
        "escaper",
        &marker,
        json!({"constraints": {"maxWallClockTime": "PT3S"}}),
    );
    let task = node.wait_task("escaper", "completed", |t| t["state"] == "completed");
    assert_eq!(
        task["executionInfo"]["failureInfo"]["code"], "MaxWallClockTimeExceeded",
        "{task}"
    );
    assert_eq!(marked_pids(&marker), Vec::<i32>::new());
}

#[test]
fn kill_9_of_the_agent_with_a_setsid_child_running_requeues_the_task_once() {
    let mut node = node();
    if let Some(why) = node.without_cgroups() {
        return skip(
            "kill_9_of_the_agent_with_a_setsid_child_running_requeues_the_task_once",
            &why,
        );
    }
    let marker = unique_marker("kill9");
    let old = start_escaper(&node, "escaper", &marker, json!({}));
    node.daemon.kill9();
    // The agent is gone; its task's processes are not.
    assert_eq!(marked_pids(&marker).len(), ESCAPER_PROCESSES);
    node.daemon.kill9_and_restart();
    let task = node.wait_task("escaper", "running again", |t| {
        t["state"] == "running" && t["executionInfo"]["requeueCount"] == 1
    });
    let new = wait_marked(&marker, ESCAPER_PROCESSES);
    assert!(
        new.iter().all(|pid| !old.contains(pid)),
        "no process of the old run: {old:?} {new:?}"
    );
    assert_eq!(new.len(), ESCAPER_PROCESSES, "one run: {new:?}");
    assert_eq!(task["executionInfo"]["requeueCount"], 1, "requeued once");
    let runs =
        std::fs::read_to_string(node.task_dir("escaper").join("wd/runs.txt")).expect("runs.txt");
    assert_eq!(runs, "run\nrun\n");
}

#[test]
fn tasks_run_unprivileged_unless_an_admin_elevates_them() {
    let node = node();
    if let Some(why) = not_root() {
        return skip("tasks_run_unprivileged_unless_an_admin_elevates_them", &why);
    }
    let (status, task) = node.add(OPERATOR, json!({"id": "plain", "commandLine": "id -u"}));
    assert_eq!(status, 201, "{task}");
    assert_eq!(
        task["userIdentity"],
        json!({"autoUser": {"scope": "task", "elevationLevel": "nonadmin"}})
    );
    let elevated = |id: &str| {
        json!({"id": id, "commandLine": "id -u",
               "userIdentity": {"autoUser": {"scope": "Pool", "elevationLevel": "Admin"}}})
    };
    let (status, body) = node.add(OPERATOR, elevated("root"));
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "InsufficientPermissions");
    let (status, _, _) =
        node.daemon
            .request(Method::GET, "/v1/tasks/root", Some(OPERATOR), None, &[]);
    assert_eq!(status, 404, "nothing stored");
    let (status, task) = node.add(ADMIN, elevated("root"));
    assert_eq!(status, 201, "{task}");
    assert_eq!(
        task["userIdentity"]["autoUser"],
        json!({"scope": "pool", "elevationLevel": "admin"})
    );
    let (status, body) = node.add(
        ADMIN,
        json!({"id": "named", "commandLine": "true", "userIdentity": {"username": "alice"}}),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "UnsupportedUserIdentity");
    assert!(
        body["message"]["value"]
            .as_str()
            .is_some_and(|m| m.contains("userIdentity.username")),
        "{body}"
    );

    for id in ["plain", "root"] {
        let task = node.wait_task(id, "completed", |t| t["state"] == "completed");
        assert_eq!(task["executionInfo"]["exitCode"], 0, "{task}");
    }
    let uid = node.stdout("plain");
    assert_ne!(uid.trim(), "0", "a task without userIdentity is not root");
    assert!(uid.trim().parse::<u32>().is_ok(), "{uid:?}");
    assert_eq!(node.stdout("root").trim(), "0");
}

#[test]
fn a_nonadmin_task_cannot_read_the_agents_state_or_another_tasks_files() {
    let node = node();
    if let Some(why) = not_root() {
        return skip(
            "a_nonadmin_task_cannot_read_the_agents_state_or_another_tasks_files",
            &why,
        );
    }
    let (status, body) = node.add(
        OPERATOR,
        json!({"id": "first", "commandLine": "echo secret > secret.txt"}),
    );
    assert_eq!(status, 201, "{body}");
    node.wait_task("first", "completed", |t| t["state"] == "completed");
    let secret = node.task_dir("first").join("wd/secret.txt");
    assert!(secret.is_file());
    let state = node.dir.path().join("state");
    let probe = format!(
        "cat '{secret}'; echo \"other=$?\"; ls '{tasks}'; echo \"list=$?\"; \
         ls '{state}'; echo \"state=$?\"; cat '{db}' > /dev/null; echo \"db=$?\"",
        secret = secret.display(),
        tasks = node.dir.path().join("tasks/tasks").display(),
        state = state.display(),
        db = state.join("agent.redb").display(),
    );
    let (status, body) = node.add(OPERATOR, json!({"id": "second", "commandLine": probe}));
    assert_eq!(status, 201, "{body}");
    node.wait_task("second", "completed", |t| t["state"] == "completed");
    let out = node.stdout("second");
    for refused in ["other", "list", "state", "db"] {
        assert!(
            out.lines().any(|l| l
                .strip_prefix(&format!("{refused}="))
                .is_some_and(|code| code != "0")),
            "{refused} must fail: {out}"
        );
    }
    assert!(!out.contains("secret"), "{out}");
}

#[test]
fn sigterm_of_the_agent_stops_a_task_that_escaped_and_requeues_it() {
    let mut node = node();
    if let Some(why) = node.without_cgroups() {
        return skip(
            "sigterm_of_the_agent_stops_a_task_that_escaped_and_requeues_it",
            &why,
        );
    }
    let marker = unique_marker("sigterm");
    let old = start_escaper(&node, "escaper", &marker, json!({}));
    let status = node.daemon.terminate();
    assert!(status.success(), "a clean stop: {status}");
    assert_eq!(marked_pids(&marker), Vec::<i32>::new());
    // Not running: the next agent starts it.
    node.daemon.kill9_and_restart();
    node.wait_task("escaper", "running again", |t| {
        t["state"] == "running" && t["executionInfo"]["requeueCount"] == 1
    });
    let new = wait_marked(&marker, ESCAPER_PROCESSES);
    assert!(new.iter().all(|pid| !old.contains(pid)), "{old:?} {new:?}");
}
