//! Tasks that try to escape (setsid, double forks, ignored SIGTERM) and
//! tasks as their users: checked on real processes, found by a marker in
//! their environment rather than by asking the manager.

use super::*;
use crate::tasks::cgroup::cgroup_of;
use reimage_protocol::api::{AutoUserScope, AutoUserSpecification, ElevationLevel, UserIdentity};

/// The environment variable that marks a test's processes.
const MARKER: &str = "REIMAGE_TEST_MARKER";

/// A marker no other test (or earlier run) uses.
fn unique_marker(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{test}-{}-{nanos}", std::process::id())
}

fn marked(id: &str, command_line: &str, marker: &str) -> AddTaskRequest {
    let mut req = request(id, command_line);
    req.environment_settings = vec![EnvironmentSetting {
        name: MARKER.into(),
        value: marker.into(),
    }];
    req
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

async fn wait_marked(marker: &str, count: usize) -> Vec<i32> {
    poll_until(&format!("{count} processes marked {marker}"), || {
        marked_pids(marker).len() >= count
    })
    .await;
    marked_pids(marker)
}

/// True when the manager contains runs in cgroups; else prints why the
/// test cannot run.
fn has_cgroups(m: &TaskManager, test: &str) -> bool {
    if m.isolation() == TaskIsolation::Cgroup {
        return true;
    }
    reimage_e2e::skip(
        test,
        "no writable cgroup v2 here (tasks fall back to process groups)",
    );
    false
}

/// True when the tests run as root (switching users needs it); else
/// prints why the test cannot run.
fn is_root(test: &str) -> bool {
    if reimage_e2e::is_root() {
        return true;
    }
    reimage_e2e::skip(test, "running tasks as other users needs root");
    false
}

fn identity(scope: Option<AutoUserScope>, level: Option<ElevationLevel>) -> UserIdentity {
    UserIdentity {
        auto_user: Some(AutoUserSpecification {
            scope,
            elevation_level: level,
        }),
        username: None,
    }
}

#[tokio::test]
async fn a_setsid_child_and_a_double_forked_daemon_are_stopped_with_their_task() {
    let f = fixture();
    let m = f.start(LONG_GRACE).await;
    if !has_cgroups(
        &m,
        "a_setsid_child_and_a_double_forked_daemon_are_stopped_with_their_task",
    ) {
        return;
    }
    let marker = unique_marker("escape");
    m.add(
        marked(
            "escape",
            "setsid sleep 1000 & setsid sh -c 'sleep 1000 &'; sleep 1000",
            &marker,
        ),
        Requester::Operator,
    )
    .expect("added");
    // sh, the setsid sleep, the daemon's sleep and the foreground sleep.
    let pids = wait_marked(&marker, 4).await;
    let pgid = running_group(&m, "escape", 1).await;
    let escaped = pids
        .iter()
        .filter(|pid| {
            procfs::process::Process::new(**pid)
                .and_then(|p| p.stat())
                .is_ok_and(|s| s.pgrp != pgid)
        })
        .count();
    assert_eq!(escaped, 2, "two processes left the task's process group");
    let cgroup = cgroup_of(pgid).expect("cgroup of the task");
    assert!(cgroup.ends_with("/escape.0"), "{cgroup}");
    for pid in &pids {
        assert_eq!(
            cgroup_of(*pid).ok().as_deref(),
            Some(cgroup.as_str()),
            "{pid}"
        );
    }

    assert_eq!(m.stop_running(StopMode::Terminate).await, vec!["escape"]);
    assert_eq!(marked_pids(&marker), Vec::<i32>::new());
    let Isolation::Cgroup(tree) = &m.isolation else {
        unreachable!("checked above")
    };
    assert!(tree.leftovers().is_empty(), "the run's cgroup is removed");
}

#[tokio::test]
async fn what_a_finished_command_left_running_is_stopped() {
    let f = fixture();
    let m = f.start(LONG_GRACE).await;
    if !has_cgroups(&m, "what_a_finished_command_left_running_is_stopped") {
        return;
    }
    let marker = unique_marker("leaves");
    m.add(
        marked(
            "leaves",
            "setsid sh -c 'sleep 1000 &'; echo started",
            &marker,
        ),
        Requester::Operator,
    )
    .expect("added");
    let task = wait_state(&m, "leaves", TaskState::Completed).await;
    assert_eq!(task.execution_info.exit_code, Some(0));
    assert_eq!(task.execution_info.failure_info, None);
    assert_eq!(marked_pids(&marker), Vec::<i32>::new());
}

#[tokio::test]
async fn a_setsid_child_ignoring_sigterm_is_killed_after_the_grace() {
    let f = fixture();
    let grace = Duration::from_secs(1);
    let m = f.start(grace).await;
    if !has_cgroups(
        &m,
        "a_setsid_child_ignoring_sigterm_is_killed_after_the_grace",
    ) {
        return;
    }
    let marker = unique_marker("stubborn");
    m.add(
        marked(
            "stubborn",
            "trap '' TERM; setsid sleep 1000 & sleep 1000",
            &marker,
        ),
        Requester::Operator,
    )
    .expect("added");
    wait_marked(&marker, 3).await;
    let began = std::time::Instant::now();
    assert_eq!(m.stop_running(StopMode::Terminate).await, vec!["stubborn"]);
    assert!(began.elapsed() >= grace, "{:?}", began.elapsed());
    assert_eq!(marked_pids(&marker), Vec::<i32>::new());
    let task = m.get("stubborn").expect("task");
    assert_eq!(task.execution_info.exit_code, Some(128 + 9));
}

#[tokio::test]
async fn after_a_requeue_only_the_new_runs_processes_exist() {
    let f = fixture();
    let m = f.start(LONG_GRACE).await;
    if !has_cgroups(&m, "after_a_requeue_only_the_new_runs_processes_exist") {
        return;
    }
    let marker = unique_marker("rq");
    m.add(
        marked("rq", "setsid sleep 1000 & sleep 1000", &marker),
        Requester::Operator,
    )
    .expect("added");
    wait_marked(&marker, 3).await;
    m.set_hold(true);
    assert_eq!(m.stop_running(StopMode::Requeue).await, vec!["rq"]);
    assert_eq!(marked_pids(&marker), Vec::<i32>::new());

    m.set_hold(false);
    let pids = wait_marked(&marker, 3).await;
    assert_eq!(pids.len(), 3, "one run: {pids:?}");
    for pid in pids {
        let cgroup = cgroup_of(pid).expect("cgroup");
        assert!(cgroup.ends_with("/rq.1"), "{pid} in {cgroup}");
    }
    assert_eq!(m.stop_running(StopMode::Terminate).await, vec!["rq"]);
    assert_eq!(marked_pids(&marker), Vec::<i32>::new());
}

#[test]
fn a_task_left_running_by_a_killed_agent_is_stopped_and_requeued_once() {
    let f = fixture();
    let marker = unique_marker("orphan");
    let first = runtime();
    let cgroups = first.block_on(async {
        let m = f.start(LONG_GRACE).await;
        if !has_cgroups(
            &m,
            "a_task_left_running_by_a_killed_agent_is_stopped_and_requeued_once",
        ) {
            return false;
        }
        m.add(
            marked("orphan", "setsid sleep 1000 & sleep 1000", &marker),
            Requester::Operator,
        )
        .expect("added");
        wait_marked(&marker, 3).await;
        true
    });
    if !cgroups {
        return;
    }
    // The agent is gone with its runtime, as after kill -9: nothing stopped
    // the task, and it is still recorded as running.
    drop(first);
    assert_eq!(marked_pids(&marker).len(), 3);
    assert_eq!(
        f.stored("orphan").expect("stored").task.state,
        TaskState::Running
    );
    let held = Gates {
        held: true,
        ..Gates::default()
    };
    f.store.put(Table::Node, GATES_KEY, &held).expect("stored");

    runtime().block_on(async {
        let m = f.start(LONG_GRACE).await;
        assert_eq!(marked_pids(&marker), Vec::<i32>::new());
        let task = m.get("orphan").expect("task");
        assert_eq!(task.state, TaskState::Active);
        assert_eq!(task.execution_info.requeue_count, 1);
        let Isolation::Cgroup(tree) = &m.isolation else {
            unreachable!("the same machine")
        };
        assert!(
            tree.leftovers().is_empty(),
            "the old run's cgroup is removed"
        );
    });
}

#[tokio::test]
async fn tasks_run_as_their_own_user_unless_an_admin_elevates_them() {
    if !is_root("tasks_run_as_their_own_user_unless_an_admin_elevates_them") {
        return;
    }
    let f = fixture();
    let m = f.start(LONG_GRACE).await;
    let who = "id -u; id -g; id -G; grep -E '^(CapBnd|CapEff|NoNewPrivs):' /proc/self/status";
    let mut pool = request("pool", who);
    pool.user_identity = Some(identity(None, None));
    let mut admin = request("admin", who);
    admin.user_identity = Some(identity(None, Some(ElevationLevel::Admin)));
    m.add(request("own", who), Requester::Operator)
        .expect("added");
    m.add(pool, Requester::Operator).expect("added");
    let refused = m
        .add(admin.clone(), Requester::Operator)
        .expect_err("an operator may not elevate");
    assert_eq!(refused.code(), "InsufficientPermissions");
    assert_eq!(m.get("admin"), None);
    assert!(f.stored("admin").is_none());
    m.add(admin, Requester::Admin).expect("an admin may");

    let output = |id: &str| -> Vec<String> {
        read(&f.task_dir(id).join("stdout.txt"))
            .lines()
            .map(str::to_owned)
            .collect()
    };
    for id in ["own", "pool", "admin"] {
        let task = wait_state(&m, id, TaskState::Completed).await;
        assert_eq!(task.execution_info.exit_code, Some(0), "{id}: {task:?}");
    }

    let own = output("own");
    let uid: u32 = own[0].parse().expect("uid");
    assert!(TASK_UIDS.contains(&uid), "{own:?}");
    assert_eq!(own[1], uid.to_string(), "gid = uid");
    assert_eq!(own[2], uid.to_string(), "no supplementary groups");
    assert_eq!(
        own[3..],
        [
            "CapEff:\t0000000000000000",
            "CapBnd:\t0000000000000000",
            "NoNewPrivs:\t1"
        ]
    );
    let wd = std::fs::metadata(f.task_dir("own").join("wd")).expect("wd");
    use std::os::unix::fs::MetadataExt;
    assert_eq!((wd.uid(), wd.mode() & 0o777), (uid, 0o700));
    let task = m.get("own").expect("task");
    let auto = task.user_identity.auto_user.expect("identity shown");
    assert_eq!(auto.scope, Some(AutoUserScope::Task));
    assert_eq!(auto.elevation_level, Some(ElevationLevel::NonAdmin));

    let pool = output("pool");
    let expected = nix::unistd::User::from_name(DEFAULT_TASK_USER)
        .ok()
        .flatten()
        .or_else(|| nix::unistd::User::from_name("nobody").ok().flatten())
        .map_or(65534, |u| u.uid.as_raw());
    assert_eq!(pool[0], expected.to_string(), "{pool:?}");

    assert_eq!(output("admin")[0], "0");
}

#[tokio::test]
async fn a_task_cannot_read_another_tasks_files_or_the_agents_state() {
    if !is_root("a_task_cannot_read_another_tasks_files_or_the_agents_state") {
        return;
    }
    let f = fixture();
    let m = f.start(LONG_GRACE).await;
    m.add(
        request("first", "echo secret > secret.txt"),
        Requester::Operator,
    )
    .expect("added");
    wait_state(&m, "first", TaskState::Completed).await;
    let secret = f.task_dir("first").join("wd/secret.txt");
    assert_eq!(read(&secret), "secret\n");
    let state = f.state_dir();
    let probe = format!(
        "cat '{secret}'; echo \"other=$?\"; ls '{tasks}'; echo \"list=$?\"; \
         ls '{state}'; echo \"state=$?\"; cat '{db}' > /dev/null; echo \"db=$?\"; \
         echo mine > mine.txt && cat mine.txt ../stdout.txt > /dev/null; echo \"own=$?\"",
        secret = secret.display(),
        tasks = f.work_dir.join("tasks").display(),
        state = state.display(),
        db = state.join("agent.redb").display(),
    );
    m.add(request("second", &probe), Requester::Operator)
        .expect("added");
    wait_state(&m, "second", TaskState::Completed).await;
    let out = read(&f.task_dir("second").join("stdout.txt"));
    for refused in ["other", "list", "state", "db"] {
        assert!(
            out.lines().any(|l| l
                .strip_prefix(&format!("{refused}="))
                .is_some_and(|c| c != "0")),
            "{refused} must fail: {out}"
        );
    }
    assert!(out.contains("own=0"), "{out}");
    assert!(!out.contains("secret"), "{out}");
}

#[tokio::test]
async fn tasks_get_the_batch_environment() {
    let f = fixture();
    let mut config = f.config(LONG_GRACE);
    config.node_id = "node-7".into();
    let m = TaskManager::start_with_limit(Arc::clone(&f.store), config, 2)
        .await
        .expect("started");
    m.add(
        request(
            "env",
            "echo \"$AZ_BATCH_NODE_ID|$AZ_BATCH_TASK_ID|$AZ_BATCH_TASK_DIR|$AZ_BATCH_TASK_WORKING_DIR|$PWD\"",
        ),
        Requester::Operator,
    )
    .expect("added");
    wait_state(&m, "env", TaskState::Completed).await;
    let dir = f.task_dir("env");
    assert_eq!(
        read(&dir.join("stdout.txt")),
        format!(
            "node-7|env|{}|{}|{}\n",
            dir.display(),
            dir.join("wd").display(),
            dir.join("wd").display()
        )
    );
    let mut reserved = request("reserved", "true");
    reserved.environment_settings = vec![EnvironmentSetting {
        name: "AZ_BATCH_TASK_ID".into(),
        value: "other".into(),
    }];
    let err = m.add(reserved, Requester::Admin).expect_err("reserved");
    assert_eq!(err.code(), "InvalidEnvironmentSetting");
    assert!(err.to_string().contains("AZ_BATCH_"), "{err}");
}

#[tokio::test]
async fn a_subtree_removed_under_the_agent_is_made_again() {
    let f = fixture();
    let m = f.start(LONG_GRACE).await;
    if !has_cgroups(&m, "a_subtree_removed_under_the_agent_is_made_again") {
        return;
    }
    let Isolation::Cgroup(tree) = &m.isolation else {
        unreachable!("checked above")
    };
    std::fs::remove_dir(tree.dir()).expect("the empty subtree goes");
    m.add(request("again", "true"), Requester::Operator)
        .expect("added");
    let task = wait_state(&m, "again", TaskState::Completed).await;
    assert_eq!(task.execution_info.exit_code, Some(0), "{task:?}");
    assert!(tree.dir().is_dir());
}

#[tokio::test]
async fn a_shutdown_requeues_tasks_without_starting_them_again() {
    let f = fixture();
    let m = f.start(LONG_GRACE).await;
    let marker = unique_marker("shutdown");
    m.add(
        marked("down", "echo run >> runs.txt; sleep 1000", &marker),
        Requester::Operator,
    )
    .expect("added");
    wait_marked(&marker, 2).await;
    assert_eq!(m.shutdown().await, vec!["down"]);
    assert_eq!(marked_pids(&marker), Vec::<i32>::new());
    // A negative: give the scheduler a fair chance to (wrongly) start it.
    let started = tokio::time::timeout(
        Duration::from_millis(300),
        wait_task(&m, "down", "started", |t| t.state != TaskState::Active),
    )
    .await;
    assert!(started.is_err(), "started again during the shutdown");
    assert_eq!(marked_pids(&marker), Vec::<i32>::new());
    let stored = f.stored("down").expect("persisted");
    assert_eq!(stored.task.state, TaskState::Active);
    assert_eq!(stored.task.execution_info.requeue_count, 1);
    if let Isolation::Cgroup(tree) = &m.isolation {
        assert!(!tree.dir().exists(), "the subtree is removed");
    }
}
