//! The task manager against real processes in temp directories.

mod isolation;

use super::process::{ProcessIdentity, live_group_members};
use super::*;
use reimage_protocol::api::{EnvironmentSetting, TaskConstraints};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use tempfile::TempDir;

/// Longest any single wait in these tests may take.
const TIMEOUT: Duration = Duration::from_secs(15);
/// A grace long enough that reaching it means the test failed.
const LONG_GRACE: Duration = Duration::from_secs(10);
/// Starts a process group of three: `sh`, a background and a foreground sleep.
const TWO_SLEEPS: &str = "sleep 1000 & sleep 1000";

struct Fixture {
    _dir: TempDir,
    store: Arc<Store>,
    work_dir: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    // Unprivileged tasks must be able to search their way to work_dir.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
        .expect("chmod temp dir");
    let store = Arc::new(Store::open(&dir.path().join("state")).expect("store"));
    let work_dir = dir.path().join("work");
    Fixture {
        _dir: dir,
        store,
        work_dir,
    }
}

impl Fixture {
    fn config(&self, kill_grace: Duration) -> TasksConfig {
        TasksConfig {
            kill_grace,
            state_dir: Some(self.state_dir()),
            ..TasksConfig::new(&self.work_dir)
        }
    }

    fn state_dir(&self) -> PathBuf {
        self._dir.path().join("state")
    }

    async fn start(&self, kill_grace: Duration) -> Arc<TaskManager> {
        TaskManager::start_with_limit(Arc::clone(&self.store), self.config(kill_grace), 4)
            .await
            .expect("task manager starts")
    }

    fn task_dir(&self, id: &str) -> PathBuf {
        self.work_dir.join("tasks").join(id)
    }

    fn stored(&self, id: &str) -> Option<TaskRecord> {
        self.store.get(Table::Tasks, id).expect("store readable")
    }
}

fn request(id: &str, command_line: &str) -> AddTaskRequest {
    AddTaskRequest {
        id: id.into(),
        command_line: command_line.into(),
        environment_settings: Vec::new(),
        constraints: TaskConstraints::default(),
        user_identity: None,
    }
}

fn with_limits(
    mut request: AddTaskRequest,
    max_wall_clock_time: Option<&str>,
    retention_time: Option<&str>,
) -> AddTaskRequest {
    request.constraints = TaskConstraints {
        max_wall_clock_time: max_wall_clock_time.map(str::to_owned),
        retention_time: retention_time.map(str::to_owned),
    };
    request
}

/// Waits (on the change watch) until task `id` satisfies `done`.
async fn wait_task(
    manager: &TaskManager,
    id: &str,
    what: &str,
    done: impl Fn(&Task) -> bool,
) -> Task {
    let mut changes = manager.changes();
    let waited = tokio::time::timeout(TIMEOUT, async {
        loop {
            if let Some(task) = manager.get(id)
                && done(&task)
            {
                return task;
            }
            changes.changed().await.expect("manager alive");
        }
    })
    .await;
    waited.unwrap_or_else(|_| panic!("task {id} never {what}: {:?}", manager.get(id)))
}

async fn wait_state(manager: &TaskManager, id: &str, state: TaskState) -> Task {
    wait_task(manager, id, &format!("{state:?}"), |t| t.state == state).await
}

/// Polls `check` (something outside the manager: /proc, files) until it
/// holds or [`TIMEOUT`] passes.
async fn poll_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The process group of a running task, once `size` of its processes run.
async fn running_group(manager: &TaskManager, id: &str, size: usize) -> i32 {
    wait_state(manager, id, TaskState::Running).await;
    let pgid = {
        let state = manager.lock();
        let record = state.records.get(id).expect("record");
        record.process.as_ref().expect("process identity").pid
    };
    poll_until(&format!("{size} processes in group {pgid}"), || {
        live_group_members(pgid).len() >= size
    })
    .await;
    pgid
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

#[tokio::test]
async fn a_task_runs_and_completes_with_its_exit_code_and_files() {
    let f = fixture();
    let m = f.start(LONG_GRACE).await;
    let mut req = request(
        "t1",
        r#"echo out; echo err >&2; echo "id=$REIMAGE_TASK_ID foo=$FOO home=$HOME"; pwd"#,
    );
    req.environment_settings = vec![EnvironmentSetting {
        name: "FOO".into(),
        value: "bar baz".into(),
    }];
    let added = m.add(req, Requester::Operator).expect("added");
    assert_eq!(added.state, TaskState::Active);
    assert_eq!(f.stored("t1").expect("persisted").task.id, "t1");

    let task = wait_state(&m, "t1", TaskState::Completed).await;
    let info = &task.execution_info;
    assert_eq!(info.exit_code, Some(0));
    assert_eq!(info.failure_info, None);
    assert_eq!(info.requeue_count, 0);
    let end = info.end_time.expect("end time");
    assert!(info.start_time.expect("start time") <= end);
    assert_eq!(
        task.retention_expiry,
        Some(end.checked_add(DEFAULT_RETENTION).expect("in range"))
    );

    let wd = f.task_dir("t1").join("wd");
    let stdout = read(&m.file("t1", "stdout.txt").expect("stdout"));
    assert!(stdout.starts_with("out\n"), "{stdout}");
    assert!(
        stdout.contains(&format!("id=t1 foo=bar baz home={}", wd.display())),
        "{stdout}"
    );
    assert!(stdout.ends_with(&format!("{}\n", wd.display())), "{stdout}");
    assert_eq!(read(&m.file("t1", "stderr.txt").expect("stderr")), "err\n");

    assert_eq!(m.total_tasks_run(), 1);
    assert_eq!(m.running_count(), 0);
    assert_eq!(m.counts_by_state()[&TaskState::Completed], 1);
    assert_eq!(m.counts_by_state()[&TaskState::Active], 0);
    assert!(m.retained_bytes() > 0);
    assert_eq!(f.stored("t1").expect("persisted").task, task);
    let total: Option<u64> = f.store.get(Table::Node, TOTAL_RUN_KEY).expect("store");
    assert_eq!(total, Some(1));
}

#[tokio::test]
async fn a_failing_command_is_a_user_error() {
    let f = fixture();
    let m = f.start(LONG_GRACE).await;
    m.add(
        request("fails", "echo oops >&2; exit 3"),
        Requester::Operator,
    )
    .expect("added");
    let task = wait_state(&m, "fails", TaskState::Completed).await;
    assert_eq!(task.execution_info.exit_code, Some(3));
    let failure = task.execution_info.failure_info.expect("failure info");
    assert_eq!(failure.category, "usererror");
    assert_eq!(failure.code, "TaskFailed");
    assert!(failure.message.contains("code 3"), "{}", failure.message);
}

#[tokio::test]
async fn wait_idle_resolves_when_the_running_tasks_end() {
    let f = fixture();
    let m = f.start(LONG_GRACE).await;
    m.add(request("short", "sleep 0.3"), Requester::Operator)
        .expect("added");
    wait_state(&m, "short", TaskState::Running).await;
    tokio::time::timeout(TIMEOUT, m.wait_idle())
        .await
        .expect("idle");
    assert_eq!(m.get("short").expect("task").state, TaskState::Completed);
}

#[tokio::test]
async fn a_task_over_its_wall_clock_time_is_stopped() {
    let f = fixture();
    let m = f.start(LONG_GRACE).await;
    m.add(
        with_limits(request("slow", TWO_SLEEPS), Some("PT1S"), None),
        Requester::Operator,
    )
    .expect("added");
    let pgid = running_group(&m, "slow", 3).await;
    let task = wait_state(&m, "slow", TaskState::Completed).await;
    let info = &task.execution_info;
    let ran = info
        .end_time
        .expect("end")
        .duration_since(info.start_time.expect("start"));
    assert!(ran >= jiff::SignedDuration::from_secs(1), "ran {ran}");
    let failure = info.failure_info.clone().expect("failure info");
    assert_eq!(failure.code, "MaxWallClockTimeExceeded");
    assert_eq!(failure.category, "usererror");
    assert!(failure.message.contains("PT1S"), "{}", failure.message);
    assert_eq!(live_group_members(pgid), Vec::<i32>::new());
}

#[tokio::test]
async fn requeue_stops_the_whole_group_and_runs_it_again_once_released() {
    let f = fixture();
    let m = f.start(LONG_GRACE).await;
    m.add(
        request("rq", &format!("echo run >> runs.txt; {TWO_SLEEPS}")),
        Requester::Operator,
    )
    .expect("added");
    let pgid = running_group(&m, "rq", 3).await;

    m.set_hold(true);
    assert_eq!(m.stop_running(StopMode::Requeue).await, vec!["rq"]);
    assert_eq!(live_group_members(pgid), Vec::<i32>::new());
    let task = m.get("rq").expect("task");
    assert_eq!(task.state, TaskState::Active);
    assert_eq!(task.execution_info.requeue_count, 1);
    assert_eq!(task.execution_info.failure_info, None);
    assert_eq!(m.running_count(), 0);
    assert_eq!(m.total_tasks_run(), 0);
    let stored = f.stored("rq").expect("persisted");
    assert_eq!(stored.task.state, TaskState::Active);
    assert_eq!(stored.task.execution_info.requeue_count, 1);

    m.set_hold(false);
    wait_state(&m, "rq", TaskState::Running).await;
    let runs = f.task_dir("rq").join("wd").join("runs.txt");
    poll_until("the second run", || {
        std::fs::read_to_string(&runs).is_ok_and(|s| s == "run\nrun\n")
    })
    .await;
    assert_eq!(m.stop_running(StopMode::Terminate).await, vec!["rq"]);
}

#[tokio::test]
async fn terminate_completes_the_task_with_a_failure_and_kills_the_group() {
    let f = fixture();
    let m = f.start(LONG_GRACE).await;
    m.add(request("term", TWO_SLEEPS), Requester::Operator)
        .expect("added");
    let pgid = running_group(&m, "term", 3).await;

    assert_eq!(m.stop_running(StopMode::Terminate).await, vec!["term"]);
    assert_eq!(live_group_members(pgid), Vec::<i32>::new());
    let task = m.get("term").expect("task");
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(task.execution_info.exit_code, Some(128 + 15));
    let failure = task.execution_info.failure_info.clone().expect("failure");
    assert_eq!(failure.category, "servererror");
    assert_eq!(failure.code, "TaskTerminated");
    assert!(failure.message.contains("SIGTERM"), "{}", failure.message);
    assert_eq!(f.stored("term").expect("persisted").task, task);
    assert_eq!(m.total_tasks_run(), 1);
    assert!(m.stop_running(StopMode::Terminate).await.is_empty());
}

#[tokio::test]
async fn the_kill_grace_lets_a_term_trap_finish() {
    let f = fixture();
    let m = f.start(LONG_GRACE).await;
    m.add(
        request(
            "trap",
            "trap 'echo saved > saved.txt; exit 7' TERM; sleep 1000 & wait",
        ),
        Requester::Operator,
    )
    .expect("added");
    // Two processes mean the trap is set: it comes before the sleep. The
    // second one is `sleep` only once it has exec'd: a SIGTERM that meets
    // the forked shell before that is taken by the trap it inherited and
    // lost, and the sleep would outlive it to the end of the grace.
    let pgid = running_group(&m, "trap", 2).await;
    poll_until("the sleep exec'd", || {
        procfs::process::all_processes().is_ok_and(|mut all| {
            all.any(|p| {
                p.and_then(|p| p.stat())
                    .is_ok_and(|stat| stat.pgrp == pgid && stat.comm == "sleep")
            })
        })
    })
    .await;

    let began = std::time::Instant::now();
    assert_eq!(m.stop_running(StopMode::Terminate).await, vec!["trap"]);
    assert!(
        began.elapsed() < LONG_GRACE / 2,
        "waited for the grace: {:?}",
        began.elapsed()
    );
    let task = m.get("trap").expect("task");
    assert_eq!(task.execution_info.exit_code, Some(7));
    let saved = f.task_dir("trap").join("wd").join("saved.txt");
    assert_eq!(read(&saved), "saved\n");
}

#[tokio::test]
async fn a_task_ignoring_sigterm_is_killed_after_the_grace() {
    let f = fixture();
    let grace = Duration::from_secs(1);
    let m = f.start(grace).await;
    // The ignored SIGTERM is inherited by the sleep too.
    m.add(
        request("stubborn", "trap '' TERM; sleep 1000"),
        Requester::Operator,
    )
    .expect("added");
    let pgid = running_group(&m, "stubborn", 2).await;

    let began = std::time::Instant::now();
    assert_eq!(m.stop_running(StopMode::Terminate).await, vec!["stubborn"]);
    assert!(began.elapsed() >= grace, "{:?}", began.elapsed());
    assert_eq!(live_group_members(pgid), Vec::<i32>::new());
    let task = m.get("stubborn").expect("task");
    assert_eq!(task.execution_info.exit_code, Some(128 + 9));
}

#[tokio::test]
async fn deleting_a_running_task_stops_it_and_removes_its_files() {
    let f = fixture();
    let m = f.start(LONG_GRACE).await;
    m.add(request("del", TWO_SLEEPS), Requester::Operator)
        .expect("added");
    let pgid = running_group(&m, "del", 3).await;

    m.delete("del").await.expect("deleted");
    assert_eq!(live_group_members(pgid), Vec::<i32>::new());
    assert_eq!(m.get("del"), None);
    assert!(f.stored("del").is_none());
    let left: Vec<_> = std::fs::read_dir(f.work_dir.join("tasks"))
        .expect("tasks dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let err = m.delete("del").await.expect_err("gone");
    assert_eq!(err.code(), "TaskNotFound");
    // The id is free again.
    m.add(request("del", "true"), Requester::Operator)
        .expect("added again");
    wait_state(&m, "del", TaskState::Completed).await;
}

#[tokio::test]
async fn retention_deletes_the_directory_and_keeps_the_record() {
    let f = fixture();
    let m = f.start(LONG_GRACE).await;
    m.add(
        with_limits(
            request("kept", "echo data > data.txt; echo out"),
            None,
            Some("PT2S"),
        ),
        Requester::Operator,
    )
    .expect("added");
    let task = wait_state(&m, "kept", TaskState::Completed).await;
    let end = task.execution_info.end_time.expect("end");
    assert_eq!(
        task.retention_expiry,
        Some(end.checked_add(Duration::from_secs(2)).expect("in range"))
    );
    assert!(f.task_dir("kept").join("wd/data.txt").is_file());
    assert!(m.retained_bytes() >= "data\nout\n".len() as u64);

    tokio::time::timeout(TIMEOUT, m.wait_retention_expired())
        .await
        .expect("retention expired");
    assert!(jiff::Timestamp::now() >= task.retention_expiry.expect("expiry"));
    assert!(!f.task_dir("kept").exists());
    assert_eq!(
        m.get("kept").expect("record kept").state,
        TaskState::Completed
    );
    assert_eq!(m.retained_bytes(), 0);
    let err = m.file("kept", "stdout.txt").expect_err("files gone");
    assert_eq!(err.code(), "TaskFileNotFound");
    assert!(f.stored("kept").expect("persisted").files_deleted);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn retention_timers_survive_a_restart() {
    let f = fixture();
    let first = runtime();
    let expiry = first.block_on(async {
        let m = f.start(LONG_GRACE).await;
        m.add(
            with_limits(request("r", "echo hi"), None, Some("PT2S")),
            Requester::Operator,
        )
        .expect("added");
        let task = wait_state(&m, "r", TaskState::Completed).await;
        task.retention_expiry.expect("expiry")
    });
    // The first agent is gone with its runtime, timers and all.
    drop(first);
    assert!(f.task_dir("r").join("stdout.txt").is_file());

    runtime().block_on(async {
        let m = f.start(LONG_GRACE).await;
        assert_eq!(m.get("r").expect("task").retention_expiry, Some(expiry));
        tokio::time::timeout(TIMEOUT, m.wait_retention_expired())
            .await
            .expect("retention expired after the restart");
        assert!(!f.task_dir("r").exists());
        assert!(jiff::Timestamp::now() >= expiry);
    });
}

/// Stores a task that an earlier agent left `running` as group `identity`,
/// with the node held so that the test sees it requeued and not rerun.
fn store_orphan(f: &Fixture, id: &str, identity: ProcessIdentity) {
    let now = Timestamp::now();
    let mut record = TaskRecord::new(
        request(id, TWO_SLEEPS),
        Requester::Operator,
        0,
        DEFAULT_RETENTION,
        now,
    )
    .expect("record");
    record.task.state = TaskState::Running;
    record.task.execution_info.start_time = Some(now);
    record.process = Some(identity);
    f.store.put(Table::Tasks, id, &record).expect("stored");
    let held = Gates {
        held: true,
        ..Gates::default()
    };
    f.store.put(Table::Node, GATES_KEY, &held).expect("stored");
}

fn spawn_group() -> (std::process::Child, i32) {
    let child = std::process::Command::new("sh")
        .args(["-c", TWO_SLEEPS])
        .process_group(0)
        .spawn()
        .expect("spawn sh");
    let pid = i32::try_from(child.id()).expect("pid");
    (child, pid)
}

#[tokio::test]
async fn an_orphaned_task_is_stopped_and_requeued_on_start() {
    let f = fixture();
    let (mut child, pgid) = spawn_group();
    poll_until("the orphan's group", || live_group_members(pgid).len() >= 3).await;
    store_orphan(&f, "orphan", ProcessIdentity::of(pgid).expect("identity"));

    let m = f.start(LONG_GRACE).await;
    assert_eq!(live_group_members(pgid), Vec::<i32>::new());
    let task = m.get("orphan").expect("task");
    assert_eq!(task.state, TaskState::Active);
    assert_eq!(task.execution_info.requeue_count, 1);
    let stored = f.stored("orphan").expect("persisted");
    assert_eq!(stored.task.state, TaskState::Active);
    assert!(stored.process.is_none());
    child.wait().expect("reaped");
}

#[tokio::test]
async fn a_reused_pid_is_not_signalled_on_start() {
    let f = fixture();
    let (mut child, pgid) = spawn_group();
    poll_until("the group", || live_group_members(pgid).len() >= 3).await;
    let mut identity = ProcessIdentity::of(pgid).expect("identity");
    // Same pid, another start time: not the process the task started.
    identity.start_time -= 1;
    store_orphan(&f, "stale", identity);

    let m = f.start(LONG_GRACE).await;
    assert_eq!(live_group_members(pgid).len(), 3);
    let task = m.get("stale").expect("task");
    assert_eq!(task.state, TaskState::Active);
    assert_eq!(task.execution_info.requeue_count, 1);
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("cleanup");
    child.wait().expect("reaped");
}

#[tokio::test]
async fn bad_requests_are_refused_with_their_codes() {
    let f = fixture();
    let m = f.start(LONG_GRACE).await;
    m.add(request("t1", "echo hi"), Requester::Operator)
        .expect("added");
    let refused = |req: AddTaskRequest| {
        let err = m.add(req, Requester::Operator).expect_err("refused");
        (err.code(), err.to_string())
    };

    for id in ["t1", "T1"] {
        let (code, _) = refused(request(id, "true"));
        assert_eq!(code, "TaskExists", "{id}");
    }
    let long = "x".repeat(65);
    for id in [
        "",
        long.as_str(),
        "a/b",
        "../x",
        "a b",
        "é",
        ".hidden",
        "a.b",
    ] {
        let (code, _) = refused(request(id, "true"));
        assert_eq!(code, "InvalidTaskId", "{id:?}");
    }
    m.add(request(&"x".repeat(64), "true"), Requester::Operator)
        .expect("64 characters");

    for (wall, retention, field, value) in [
        (Some("P1M"), None, "maxWallClockTime", "P1M"),
        (Some("PT0S"), None, "maxWallClockTime", "PT0S"),
        (None, Some("-PT1S"), "retentionTime", "-PT1S"),
        (None, Some("P1Y"), "retentionTime", "P1Y"),
        (None, Some("P9999D"), "retentionTime", "P9999D"),
        (None, Some("soon"), "retentionTime", "soon"),
    ] {
        let (code, msg) = refused(with_limits(request("d", "true"), wall, retention));
        assert_eq!(code, "InvalidDuration", "{msg}");
        assert!(msg.contains(field) && msg.contains(value), "{msg}");
    }

    let (code, ..) = refused(request("c", "  "));
    assert_eq!(code, "InvalidCommandLine");
    for name in ["REIMAGE_TASK_ID", "A=B", ""] {
        let mut req = request("e", "true");
        req.environment_settings = vec![EnvironmentSetting {
            name: name.into(),
            value: "v".into(),
        }];
        let (code, _) = refused(req);
        assert_eq!(code, "InvalidEnvironmentSetting", "{name:?}");
    }
    assert_eq!(m.get("d"), None);

    m.set_accepting(false);
    let (code, _) = refused(request("later", "true"));
    assert_eq!(code, "NodeNotAcceptingTasks");
    m.set_accepting(true);
    m.add(request("later", "true"), Requester::Operator)
        .expect("accepted again");

    wait_state(&m, "t1", TaskState::Completed).await;
    let stdout = m.file("t1", "stdout.txt").expect("stdout");
    assert_eq!(stdout, f.task_dir("t1").join("stdout.txt"));
    for name in [
        "../x",
        "wd",
        "",
        "stdout.txt/../stdout.txt",
        "../t1/stdout.txt",
        "/etc/passwd",
        "STDOUT.TXT",
    ] {
        let err = m.file("t1", name).expect_err(name);
        assert_eq!(err.code(), "TaskFileNotFound", "{name}");
    }
    let err = m.file("nope", "stdout.txt").expect_err("no task");
    assert_eq!(err.code(), "TaskNotFound");
}

#[tokio::test]
async fn disabled_scheduling_keeps_tasks_active() {
    let f = fixture();
    let m = f.start(LONG_GRACE).await;
    m.set_scheduling(false);
    m.add(request("q", "true"), Requester::Operator)
        .expect("add still works");
    // A negative: give the scheduler a fair chance to (wrongly) start it.
    let started = tokio::time::timeout(
        Duration::from_millis(300),
        wait_task(&m, "q", "started", |t| t.state != TaskState::Active),
    )
    .await;
    assert!(started.is_err(), "started while scheduling was disabled");
    let gates: Option<Gates> = f.store.get(Table::Node, GATES_KEY).expect("store");
    assert_eq!(gates.map(|g| g.scheduling_enabled), Some(false));

    m.set_scheduling(true);
    wait_state(&m, "q", TaskState::Completed).await;
}

#[tokio::test]
async fn tasks_start_in_creation_order_up_to_the_limit() {
    let f = fixture();
    let m = TaskManager::start_with_limit(Arc::clone(&f.store), f.config(LONG_GRACE), 1)
        .await
        .expect("started");
    m.set_hold(true);
    // Each task runs as a user of its own: they share a file anyone may write.
    let order = f._dir.path().join("order.txt");
    std::fs::write(&order, "").expect("order file");
    std::fs::set_permissions(&order, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let ids = ["c", "a", "b"];
    for id in ids {
        let line = format!("echo $REIMAGE_TASK_ID >> '{}'", order.display());
        m.add(request(id, &line), Requester::Operator)
            .expect("added");
    }
    assert_eq!(
        m.list().iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        ids
    );
    m.set_hold(false);
    for id in ids {
        wait_state(&m, id, TaskState::Completed).await;
    }
    assert_eq!(read(&order), "c\na\nb\n");
    let tasks = m.list();
    for pair in tasks.windows(2) {
        let end = pair[0].execution_info.end_time.expect("end");
        let next_start = pair[1].execution_info.start_time.expect("start");
        assert!(end <= next_start, "one at a time: {pair:?}");
    }
}
