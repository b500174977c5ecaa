//! `reimagectl` end to end: the real binary against real `reimage-agent`
//! daemons on 127.0.0.1, each with its own disk file, and a real HTTP image
//! server. One node with every command, an operation followed through an
//! agent killed and restarted, a fleet rolled out in waves that stops at
//! its first failure, and Ctrl-C in the middle of a rollout.

use reimage_e2e::bin::run;
use reimage_e2e::ctl::{ServedImage, json, reimagectl, stdout, time, token_file};
use reimage_e2e::daemon::{ADMIN, Daemon, write_config};
use reimage_e2e::http_server::Fault;
use reimage_e2e::images::{MIB, target_disk};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

/// A running agent with a 32 MiB disk file and the admin token in a file.
struct Agent {
    daemon: Daemon,
    token: PathBuf,
    dir: tempfile::TempDir,
}

impl Agent {
    /// An agent whose disk has `local-storage` at its end.
    fn start() -> Agent {
        Agent::with_disk(|disk| {
            target_disk(disk, 32, 8, 11);
        })
    }

    /// An agent whose disk has no partition table, so the `local-storage`
    /// its config keeps is not there: every reimage fails with
    /// `SavedPartitionNotFound` before writing anything.
    fn without_local_storage() -> Agent {
        Agent::with_disk(|disk| {
            let file = std::fs::File::create(disk).expect("create disk");
            file.set_len(32 * MIB).expect("size disk");
        })
    }

    fn with_disk(make_disk: impl FnOnce(&Path)) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        make_disk(&dir.path().join("disk.img"));
        let daemon = Daemon::start(&write_config(dir.path(), ""));
        let token = token_file(dir.path(), "admin", ADMIN);
        Agent { daemon, token, dir }
    }

    /// `reimagectl --token-file T --agent URL ARGS...`, run to its end.
    fn ctl(&self, args: &[&str]) -> Output {
        let mut command = reimagectl(&self.token, &["--agent", &self.daemon.url]);
        run(command.args(args))
    }

    /// As [`Agent::ctl`], expecting success and JSON.
    fn ctl_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let output = self.ctl(&all);
        assert!(output.status.success(), "reimagectl {args:?} failed");
        json(&output)
    }

    fn operations(&self) -> Vec<Value> {
        self.daemon.get("/v1/operations")["value"]
            .as_array()
            .expect("list")
            .clone()
    }

    /// `kill -9`, a reboot's worth of silence, then the agent again on the
    /// same state and port.
    fn kill_and_restart_after(&mut self, down: Duration) {
        self.daemon.kill9();
        // The downtime is the scenario (a node rebooting), not a wait for
        // something to happen.
        std::thread::sleep(down);
        self.daemon = Daemon::start(&self.daemon.config.clone());
    }
}

fn spawn(mut command: std::process::Command) -> Child {
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("reimagectl starts")
}

fn finish(child: Child) -> Output {
    let output = child.wait_with_output().expect("reimagectl ends");
    eprintln!(
        "--- stderr of reimagectl\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Polls `check` until it holds (or fails the test after 30 s).
fn wait_until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn one_node_reimage_reboot_tasks_and_scheduling() {
    let image = ServedImage::serve(Fault::None);
    let agent = Agent::start();

    let node = agent.ctl_json(&["node"]);
    assert_eq!(node["id"], "node-1");
    assert_eq!(node["state"], "idle");
    let table = stdout(&agent.ctl(&["node"]));
    assert!(table.starts_with("AGENT "), "{table}");
    assert!(table.contains("node-1"), "{table}");

    let task = agent.ctl_json(&[
        "task",
        "add",
        "greet",
        "--env",
        "GREETING=hello",
        "--retention",
        "PT1H",
        "--",
        "echo",
        "$GREETING",
    ]);
    assert_eq!(task["id"], "greet");
    assert_eq!(task["commandLine"], "echo $GREETING");
    agent
        .daemon
        .wait_for("the task to complete", "/v1/tasks/greet", |t| {
            t["state"] == "completed"
        });
    let shown = agent.ctl_json(&["task", "show", "greet"]);
    assert_eq!(shown["executionInfo"]["exitCode"], 0, "{shown}");
    assert_eq!(shown["constraints"]["retentionTime"], "PT1H");
    let listed = agent.ctl_json(&["task", "list"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(stdout(&agent.ctl(&["task", "logs", "greet"])), "hello\n");
    assert_eq!(
        stdout(&agent.ctl(&["task", "logs", "greet", "--stderr"])),
        ""
    );
    let table = stdout(&agent.ctl(&["task", "list"]));
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("greet ")),
        "{table}"
    );

    let node = agent.ctl_json(&["scheduling", "disable", "--option", "taskcompletion"]);
    assert_eq!(node["schedulingState"], "disabled");
    let node = agent.ctl_json(&["scheduling", "enable"]);
    assert_eq!(node["schedulingState"], "enabled");

    let mut args = vec!["reimage", "--option", "requeue", "--wait"];
    let image_args = image.args();
    args.extend(image_args.iter().map(String::as_str));
    let summary = agent.ctl_json(&args);
    assert_eq!(summary["action"], "reimage");
    assert_eq!(summary["succeeded"], 1, "{summary}");
    let report = &summary["nodes"][0];
    assert_eq!(report["agent"], agent.daemon.url.as_str());
    assert_eq!(report["status"], "succeeded", "{summary}");
    assert_eq!(report["phase"], "done");
    let op_id = report["operationId"].as_str().expect("operation id");
    assert_eq!(
        agent.daemon.get(&format!("/v1/operations/{op_id}"))["status"],
        "Succeeded"
    );
    assert_eq!(
        agent.daemon.get("/v1/node")["image"]["sha256"],
        image.sha256.as_str()
    );

    let ops = agent.ctl_json(&["op", "list"]);
    assert_eq!(ops.as_array().map(Vec::len), Some(1), "{ops}");
    assert_eq!(ops[0]["id"], op_id);
    let shown = agent.ctl_json(&["op", "show", op_id]);
    assert_eq!(shown["status"], "Succeeded");
    let table = stdout(&agent.ctl(&["op", "show", op_id]));
    assert!(
        table.contains("Succeeded") && table.contains(op_id),
        "{table}"
    );

    // A table summary for people; with reboot "none" the agent confirms at once.
    let output = agent.ctl(&["reboot", "--option", "terminate", "--wait"]);
    assert!(output.status.success());
    let table = stdout(&output);
    assert!(table.starts_with("NODE "), "{table}");
    assert!(table.contains(" succeeded "), "{table}");
    assert_eq!(agent.operations().len(), 2);

    let output = agent.ctl(&["task", "delete", "greet"]);
    assert!(output.status.success());
    let output = agent.ctl(&["task", "show", "greet"]);
    assert_eq!(output.status.code(), Some(1));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.trim_end().ends_with("TaskNotFound: no task greet"),
        "{err}"
    );
    assert!(
        err.starts_with("error: task greet on http://127.0.0.1:"),
        "{err}"
    );
}

#[test]
fn op_wait_follows_an_operation_through_an_agent_restart() {
    let image = ServedImage::serve(Fault::None);
    let mut agent = Agent::start();
    let output = agent.ctl(&["task", "add", "busy", "--", "sleep", "2"]);
    assert!(output.status.success());
    agent
        .daemon
        .wait_for("the task to run", "/v1/tasks/busy", |t| {
            t["state"] == "running"
        });
    // Without --wait: accepted is success, and the summary names the operation.
    let mut args = vec!["reimage", "--option", "taskcompletion"];
    let image_args = image.args();
    args.extend(image_args.iter().map(String::as_str));
    let summary = agent.ctl_json(&args);
    assert_eq!(summary["nodes"][0]["status"], "accepted", "{summary}");
    let op_id = summary["nodes"][0]["operationId"]
        .as_str()
        .expect("operation id")
        .to_string();
    agent.daemon.wait_for(
        "the operation to wait for the task",
        &format!("/v1/operations/{op_id}"),
        |op| op["phase"] == "waitingForTasks",
    );

    let mut command = reimagectl(&agent.token, &["--agent", &agent.daemon.url]);
    command.args(["--output", "json", "op", "wait", &op_id, "--timeout", "60"]);
    let waiter = spawn(command);
    agent.kill_and_restart_after(Duration::from_millis(1500));
    let output = finish(waiter);

    assert!(output.status.success(), "op wait exit status");
    let operation = json(&output);
    assert_eq!(operation["id"], op_id.as_str());
    assert_eq!(operation["status"], "Succeeded", "{operation}");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        log.contains("agent unreachable (ConnectionFailed"),
        "kept polling while the agent was down:\n{log}"
    );
    assert!(log.contains("the agent answers again"), "{log}");
    assert_eq!(
        agent.daemon.get("/v1/node")["image"]["sha256"],
        image.sha256.as_str()
    );
}

#[test]
fn a_fleet_rolls_in_waves_and_stops_at_the_first_failure() {
    // About 1.5 s per good node, so the waves are visible in time and a
    // failure (found before the first byte is written) ends well before them.
    let image = ServedImage::serve(Fault::SlowBytesPerSec(2 * MIB));
    let agents = [
        Agent::start(),
        Agent::start(),
        Agent::start(),
        Agent::without_local_storage(),
        Agent::start(),
    ];
    let hosts = agents[0].dir.path().join("fleet.txt");
    let mut text = String::from("# the test fleet\n\n");
    for (index, agent) in agents.iter().enumerate() {
        text.push_str(&format!("{}   # node {index}\n", agent.daemon.url));
    }
    std::fs::write(&hosts, text).expect("hosts file");

    let hosts_arg = hosts.to_str().expect("utf-8 path");
    let mut args = vec![
        "--hosts",
        hosts_arg,
        "--output",
        "json",
        "reimage",
        // No canary wave: one window of two nodes slides over the fleet.
        "--waves",
        "100%",
        "--max-parallel",
        "2",
        "--max-failures",
        "1",
        "--wait",
        "--timeout",
        "60",
    ];
    let image_args = image.args();
    args.extend(image_args.iter().map(String::as_str));
    let output = run(&mut reimagectl(&agents[0].token, &args));

    assert_eq!(output.status.code(), Some(1), "a failed node fails the run");
    let err = String::from_utf8_lossy(&output.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert_eq!(
        last, "error: reimage: RolloutFailed: 1 of 5 node(s) failed, 1 skipped",
        "{err}"
    );
    let summary = json(&output);
    let statuses: Vec<&str> = summary["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["status"].as_str().expect("status"))
        .collect();
    assert_eq!(
        statuses,
        ["succeeded", "succeeded", "succeeded", "failed", "skipped"],
        "{summary}"
    );
    assert_eq!(
        (
            &summary["succeeded"],
            &summary["failed"],
            &summary["skipped"]
        ),
        (&Value::from(3), &Value::from(1), &Value::from(1))
    );
    let failed = &summary["nodes"][3];
    assert_eq!(failed["agent"], agents[3].daemon.url.as_str());
    assert_eq!(
        failed["error"]["code"], "SavedPartitionNotFound",
        "{failed}"
    );
    assert!(failed["operationId"].is_string());
    assert!(summary["nodes"][4]["operationId"].is_null());
    assert!(
        agents[4].operations().is_empty(),
        "the node after the failure was never asked"
    );

    // The agents' own clocks: [createdAt, updatedAt] of every operation.
    let spans: Vec<(jiff::Timestamp, jiff::Timestamp)> = agents[..4]
        .iter()
        .map(|agent| {
            let ops = agent.operations();
            assert_eq!(ops.len(), 1, "one operation per node: {ops:?}");
            (time(&ops[0]["createdAt"]), time(&ops[0]["updatedAt"]))
        })
        .collect();
    let most_at_once = spans
        .iter()
        .map(|(start, _)| {
            spans
                .iter()
                .filter(|(s, e)| s <= start && start < e)
                .count()
        })
        .max();
    assert_eq!(most_at_once, Some(2), "waves of two: {spans:?}");
    let first_end = spans[0].1.min(spans[1].1);
    let second_end = spans[0].1.max(spans[1].1);
    assert!(
        spans[2].0 >= first_end,
        "node 2 waited for a slot: {spans:?}"
    );
    assert!(
        spans[3].0 >= second_end,
        "node 3 waited for a slot: {spans:?}"
    );

    let seconds = summary["nodes"][0]["durationSeconds"]
        .as_f64()
        .expect("duration");
    assert!(seconds > 0.0, "{summary}");
}

#[test]
fn ctrl_c_stops_the_rollout_and_reports_the_nodes_in_flight() {
    let image = ServedImage::serve(Fault::SlowBytesPerSec(2 * MIB));
    let agents = [Agent::start(), Agent::start(), Agent::start()];
    let mut args = vec!["--output", "json"];
    for agent in &agents {
        args.extend(["--agent", agent.daemon.url.as_str()]);
    }
    args.extend(["reimage", "--wait", "--timeout", "60"]);
    let image_args = image.args();
    args.extend(image_args.iter().map(String::as_str));
    let child = spawn(reimagectl(&agents[0].token, &args));
    wait_until("the first node's operation", || {
        !agents[0].operations().is_empty()
    });
    let interrupted = std::process::Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status()
        .expect("kill runs");
    assert!(interrupted.success());
    let output = finish(child);

    assert_eq!(output.status.code(), Some(130));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.lines().last().is_some_and(|l| l.starts_with(
            "error: reimage: Interrupted: stopped by Ctrl-C with 1 node(s) in flight"
        )),
        "{err}"
    );
    let summary = json(&output);
    assert_eq!(summary["interrupted"], true);
    let op_id = agents[0].operations()[0]["id"].clone();
    assert_eq!(summary["nodes"][0]["status"], "interrupted", "{summary}");
    assert_eq!(summary["nodes"][0]["operationId"], op_id);
    assert_eq!(summary["nodes"][1]["status"], "skipped");
    assert_eq!(summary["nodes"][2]["status"], "skipped");
    assert!(agents[1].operations().is_empty() && agents[2].operations().is_empty());
    // The operation in flight goes on without the controller.
    let done = agents[0].daemon.wait_operation(op_id.as_str().expect("id"));
    assert_eq!(done["status"], "Succeeded", "{done}");
}

#[test]
fn each_reimage_option_through_reimagectl() {
    let image = ServedImage::serve(Fault::None);
    let agent = Agent::start();
    for option in ["requeue", "terminate", "taskcompletion", "retaineddata"] {
        let id = format!("work-{option}");
        let command = if option == "retaineddata" {
            "true"
        } else {
            "sleep 2"
        };
        agent.ctl_json(&["task", "add", &id, "--retention", "PT2S", "--", command]);
        agent
            .daemon
            .wait_for("the task to start", &format!("/v1/tasks/{id}"), |t| {
                t["state"] != "active"
            });
        let mut args = vec!["reimage", "--option", option, "--wait", "--force"];
        let image_args = image.args();
        args.extend(image_args.iter().map(String::as_str));
        let summary = agent.ctl_json(&args);
        assert_eq!(summary["succeeded"], 1, "{option}: {summary}");
        let operation = &summary["nodes"][0]["operation"];
        assert_eq!(operation["nodeReimageOption"], option, "{summary}");
        let task = agent.daemon.get(&format!("/v1/tasks/{id}"));
        // Earlier tasks may be running again too: this one must be among those stopped.
        let stopped = |field: &str| {
            operation[field]
                .as_array()
                .is_some_and(|ids| ids.contains(&Value::from(id.as_str())))
        };
        match option {
            "requeue" => assert!(stopped("requeuedTasks"), "{summary}"),
            "terminate" => assert!(stopped("terminatedTasks"), "{summary}"),
            _ => assert_eq!(
                task["executionInfo"]["exitCode"], 0,
                "{option}: ran to its end: {task}"
            ),
        }
    }
}

#[test]
fn prefetch_rolls_through_the_fleet_and_the_reimage_after_it_downloads_nothing() {
    let image = ServedImage::serve(Fault::None);
    let agents = [Agent::start(), Agent::start(), Agent::start()];
    let hosts = agents[0].dir.path().join("fleet.txt");
    let text: String = agents
        .iter()
        .map(|agent| format!("{}\n", agent.daemon.url))
        .collect();
    std::fs::write(&hosts, text).expect("hosts file");
    let hosts_arg = hosts.to_str().expect("utf-8 path");
    let image_args = image.args();
    let rollout = |action: &str| {
        let mut args = vec![
            "--hosts",
            hosts_arg,
            "--output",
            "json",
            action,
            "--waves",
            "100%",
            "--max-parallel",
            "2",
            "--wait",
            "--timeout",
            "60",
        ];
        args.extend(image_args.iter().map(String::as_str));
        run(&mut reimagectl(&agents[0].token, &args))
    };

    let output = rollout("prefetch");
    assert!(output.status.success(), "{}", stdout(&output));
    let summary = json(&output);
    assert_eq!(summary["action"], "prefetch", "{summary}");
    assert_eq!(summary["succeeded"], 3, "{summary}");
    assert!(summary.get("nodeReimageOption").is_none(), "{summary}");
    for agent in &agents {
        let staged = agent.daemon.get("/v1/images");
        assert_eq!(
            staged["value"][0]["sha256"],
            image.sha256.as_str(),
            "{staged}"
        );
        assert_eq!(agent.operations()[0]["kind"], "prefetch");
    }

    let again = rollout("prefetch");
    assert!(again.status.success(), "{}", stdout(&again));
    assert_eq!(json(&again)["current"], 3, "already staged everywhere");

    let downloads = image.server.requests().len();
    let output = rollout("reimage");
    assert!(output.status.success(), "{}", stdout(&output));
    assert_eq!(json(&output)["succeeded"], 3);
    assert_eq!(
        image.server.requests().len(),
        downloads,
        "the reimages wrote the staged copies"
    );
}
