//! A fleet of real agents on 127.0.0.1 rolled out by the real `reimagectl`:
//! waves over the whole fleet under `ulimit -n 64`, a controller killed
//! with `kill -9` and resumed from its journal, a bad image that costs only
//! the canary, a frozen agent reported unreachable by the accept deadline,
//! and the terminal output at 80×24.
//!
//! 100 agents with `REIMAGE_LONG_TESTS=1` (CI), 20 otherwise.

use reimage_e2e::ctl::{ServedImage, json, reimagectl, time, token_file};
use reimage_e2e::daemon::{ADMIN, Daemon, write_config};
use reimage_e2e::http_server::Fault;
use reimage_e2e::images::{MIB, partition_sha256, target_disk};
use reimage_e2e::skip;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn fleet_size() -> usize {
    if std::env::var_os("REIMAGE_LONG_TESTS").is_some_and(|v| v == "1") {
        100
    } else {
        20
    }
}

/// An agent with a 24 MiB disk file whose `local-storage` is its last 8 MiB.
struct Agent {
    daemon: Daemon,
    storage_sha: String,
    dir: tempfile::TempDir,
}

impl Agent {
    fn start(seed: u64) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage_sha = target_disk(&dir.path().join("disk.img"), 24, 8, seed);
        let daemon = Daemon::start(&write_config(dir.path(), ""));
        Agent {
            daemon,
            storage_sha,
            dir,
        }
    }

    fn operations(&self) -> Vec<Value> {
        self.daemon.get("/v1/operations")["value"]
            .as_array()
            .expect("list")
            .clone()
    }

    fn assert_storage_kept(&self) {
        let (storage, _) =
            partition_sha256(&self.dir.path().join("disk.img"), "local-storage").expect("kept");
        assert_eq!(
            storage, self.storage_sha,
            "{}: local-storage changed",
            self.daemon.url
        );
    }
}

/// The agents, a hosts file naming them, and the admin token's file.
struct Fleet {
    agents: Vec<Agent>,
    hosts: PathBuf,
    token: PathBuf,
    dir: tempfile::TempDir,
}

impl Fleet {
    fn start(size: usize) -> Fleet {
        let dir = tempfile::tempdir().expect("tempdir");
        let agents: Vec<Agent> = (0..size).map(|i| Agent::start(i as u64)).collect();
        let hosts = dir.path().join("fleet.txt");
        let text: String = agents
            .iter()
            .map(|agent| format!("{}\n", agent.daemon.url))
            .collect();
        std::fs::write(&hosts, text).expect("hosts file");
        let token = token_file(dir.path(), "admin", ADMIN);
        Fleet {
            agents,
            hosts,
            token,
            dir,
        }
    }

    /// `reimagectl --hosts FLEET --output json reimage --wait ARGS... IMAGE`.
    fn reimage(&self, args: &[&str], image: &ServedImage) -> Command {
        let mut all = vec![
            "--hosts",
            self.hosts.to_str().expect("utf-8 path"),
            "--output",
            "json",
            "reimage",
            "--wait",
        ];
        all.extend_from_slice(args);
        let mut command = reimagectl(&self.token, &all);
        command.args(image.args());
        command
    }

    fn journal(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// How many operations each agent holds.
    fn operation_counts(&self) -> Vec<usize> {
        self.agents.iter().map(|a| a.operations().len()).collect()
    }
}

/// Runs `command` under `ulimit -n LIMIT` (through `sh`, so the limit is
/// the child's only).
fn with_fd_limit(command: &Command, limit: u32) -> Command {
    let mut shell = Command::new("sh");
    shell
        .arg("-c")
        .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
        .arg(command.get_program())
        .args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => shell.env(key, value),
            None => shell.env_remove(key),
        };
    }
    shell
}

fn run(command: &mut Command) -> Output {
    let output = command
        .stdin(Stdio::null())
        .output()
        .expect("reimagectl runs");
    eprintln!(
        "--- stderr of reimagectl\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn statuses(summary: &Value) -> Vec<String> {
    summary["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["status"].as_str().expect("status").to_string())
        .collect()
}

#[test]
fn a_fleet_rolls_in_waves_under_a_small_fd_limit_and_a_rerun_does_nothing() {
    let fleet = Fleet::start(fleet_size());
    let image = ServedImage::serve(Fault::None);
    let journal = fleet.journal("rollout.jsonl");
    let journal_arg = journal.to_str().expect("utf-8 path");
    let args = [
        "--waves",
        "1,10%,100%",
        "--max-parallel",
        "10",
        "--journal",
        journal_arg,
    ];
    let output = run(&mut with_fd_limit(&fleet.reimage(&args, &image), 64));
    assert!(output.status.success(), "the rollout failed");
    let summary = json(&output);
    assert_eq!(summary["succeeded"], fleet.agents.len(), "{summary}");
    assert!(
        fleet.operation_counts().iter().all(|&n| n == 1),
        "one operation per node: {:?}",
        fleet.operation_counts()
    );
    for agent in &fleet.agents {
        agent.assert_storage_kept();
        assert_eq!(
            agent.daemon.get("/v1/node")["image"]["sha256"],
            image.sha256.as_str()
        );
    }
    // The canary went alone: its operation ended before any other began.
    let ops: Vec<Value> = fleet
        .agents
        .iter()
        .map(|a| a.operations()[0].clone())
        .collect();
    let canary = ops
        .iter()
        .min_by_key(|op| time(&op["createdAt"]))
        .expect("an operation");
    assert!(
        ops.iter()
            .filter(|op| op["id"] != canary["id"])
            .all(|op| time(&op["createdAt"]) >= time(&canary["updatedAt"])),
        "the canary wave overlapped the next"
    );

    // The same rollout again: every node is current, nothing starts.
    let output = run(&mut fleet.reimage(&args, &image));
    assert!(output.status.success(), "the rerun failed");
    let summary = json(&output);
    assert_eq!(summary["current"], fleet.agents.len(), "{summary}");
    assert!(fleet.operation_counts().iter().all(|&n| n == 1));
}

#[test]
fn a_controller_killed_mid_rollout_resumes_without_reimaging_a_node_twice() {
    let fleet = Fleet::start(fleet_size());
    // About 2 s per node, so the rollout is well under way when it dies.
    let image = ServedImage::serve(Fault::SlowBytesPerSec(MIB));
    let journal = fleet.journal("rollout.jsonl");
    let journal_arg = journal.to_str().expect("utf-8 path");
    let args = [
        "--waves",
        "100%",
        "--max-parallel",
        "5",
        "--journal",
        journal_arg,
    ];
    let mut first = fleet.reimage(&args, &image);
    let mut child = first
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("reimagectl starts");
    // Kill it once some nodes are done and others are in flight.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(&journal).unwrap_or_default();
        let finished = text.matches("\"event\":\"finished\"").count();
        if finished >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "no node finished: {text}");
        assert!(child.try_wait().expect("poll").is_none(), "it ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().expect("kill -9");
    child.wait().expect("reaped");
    let before = fleet.operation_counts();
    assert!(
        before.contains(&0),
        "some nodes were not started yet: {before:?}"
    );

    let mut resume = fleet.reimage(&["--max-parallel", "5", "--resume", journal_arg], &image);
    let output = run(&mut resume);
    assert!(output.status.success(), "the resumed rollout failed");
    let summary = json(&output);
    let counts = fleet.operation_counts();
    assert!(
        counts.iter().all(|&n| n == 1),
        "no node reimaged twice, none left out: {counts:?}"
    );
    for agent in &fleet.agents {
        agent.assert_storage_kept();
        let ops = agent.operations();
        assert_eq!(ops[0]["status"], "Succeeded", "{}", agent.daemon.url);
    }
    let failed = summary["failed"].as_u64().unwrap_or(0);
    assert_eq!(failed, 0, "{summary}");
}

#[test]
fn a_bad_image_costs_only_the_canary() {
    let fleet = Fleet::start(fleet_size().min(20));
    let image = ServedImage::with_wrong_hash();
    let output =
        run(&mut fleet.reimage(&["--waves", "1,50%,100%", "--max-parallel", "10"], &image));
    assert_eq!(
        output.status.code(),
        Some(1),
        "a failed canary fails the run"
    );
    let summary = json(&output);
    let statuses = statuses(&summary);
    assert_eq!(
        statuses.iter().filter(|s| *s == "failed").count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| *s == "skipped").count(),
        fleet.agents.len() - 1,
        "{statuses:?}"
    );
    let counts = fleet.operation_counts();
    assert_eq!(
        counts.iter().sum::<usize>(),
        1,
        "only the canary was asked: {counts:?}"
    );
    for agent in &fleet.agents {
        agent.assert_storage_kept();
    }
}

#[test]
fn a_frozen_agent_is_unreachable_by_the_accept_deadline() {
    let fleet = Fleet::start(3);
    let image = ServedImage::serve(Fault::None);
    let frozen = fleet.agents[1].daemon.pid().expect("running");
    let stop = Command::new("kill")
        .args(["-STOP", &frozen.to_string()])
        .status()
        .expect("kill -STOP");
    assert!(stop.success());
    let started = Instant::now();
    let output = run(&mut fleet.reimage(
        &[
            "--waves",
            "100%",
            "--max-parallel",
            "3",
            "--accept-timeout",
            "3",
            "--max-unreachable",
            "1",
        ],
        &image,
    ));
    let took = started.elapsed();
    let resumed = Command::new("kill")
        .args(["-CONT", &frozen.to_string()])
        .status()
        .expect("kill -CONT");
    assert!(resumed.success());
    let summary = json(&output);
    assert_eq!(
        statuses(&summary),
        ["succeeded", "unreachable", "succeeded"],
        "{summary}"
    );
    assert_eq!(summary["unreachable"], 1);
    // The frozen node held its slot for the accept deadline, not for the
    // two-hour operation timeout.
    assert!(took < Duration::from_secs(60), "took {took:?}");
    let node = &summary["nodes"][1];
    let seconds = node["durationSeconds"].as_f64().unwrap_or(f64::MAX);
    assert!(seconds < 10.0, "unreachable after {seconds} s: {node}");
}

/// The runs of text `raw` writes between newlines, carriage returns and
/// escape sequences (cursor moves, erases): what the terminal lays out
/// from the cursor onwards.
fn screen_lines(raw: &str) -> Vec<String> {
    let mut text = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte; others: ESC and one char.
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
            text.push('\n');
        } else {
            text.push(c);
        }
    }
    text.split(['\n', '\r'])
        .map(str::to_string)
        .filter(|line| !line.is_empty())
        .collect()
}

#[test]
fn the_terminal_output_fits_80_columns_and_ends_with_the_failures_by_code() {
    if Command::new("script").arg("--version").output().is_err() {
        return skip(
            "the_terminal_output_fits_80_columns_and_ends_with_the_failures_by_code",
            "no script(1) (util-linux)",
        );
    }
    let fleet = Fleet::start(12);
    let image = ServedImage::serve(Fault::SlowBytesPerSec(4 * MIB));
    // Two nodes fail before writing: their disks have no local-storage.
    for agent in &fleet.agents[4..6] {
        let disk = agent.dir.path().join("disk.img");
        let file = std::fs::File::create(&disk).expect("create disk");
        file.set_len(24 * MIB).expect("size disk");
    }
    let command = fleet.reimage(
        &[
            "--waves",
            "100%",
            "--max-parallel",
            "6",
            "--max-failures",
            "5",
        ],
        &image,
    );
    // The table output, not JSON: drop `--output json`.
    let args: Vec<String> = command
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let args: Vec<String> = args
        .iter()
        .enumerate()
        .filter(|(i, a)| {
            let is_output = *a == "--output" || (*i > 0 && args[i - 1] == "--output");
            !is_output
        })
        .map(|(_, a)| shell_quote(a))
        .collect();
    let line = format!(
        "stty cols 80 rows 24; XDG_STATE_HOME={} {} {}",
        shell_quote(&fleet.dir.path().to_string_lossy()),
        shell_quote(&command.get_program().to_string_lossy()),
        args.join(" ")
    );
    let transcript = fleet.dir.path().join("typescript");
    let output = Command::new("script")
        .args(["-qfec", &line])
        .arg(&transcript)
        .env("TERM", "xterm")
        .env_remove("REIMAGE_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("script runs");
    let raw = std::fs::read_to_string(&transcript).unwrap_or_default();
    assert_eq!(
        output.status.code(),
        Some(1),
        "two failures fail the run:\n{raw}"
    );
    let lines: Vec<String> = screen_lines(&raw)
        .into_iter()
        .filter(|line| !line.starts_with("Script started") && !line.starts_with("Script done"))
        .collect();
    // The bars are drawn padded to the width, one after the other, so
    // that the terminal's own wrap at column 80 starts each on its row: a
    // run of whole rows. Anything else wider than 80 wraps mid-line.
    let wraps: Vec<&String> = lines
        .iter()
        .filter(|line| {
            let width = line.chars().count();
            width > 80 && width % 80 != 0
        })
        .collect();
    assert!(
        wraps.is_empty(),
        "lines that wrap at 80 columns: {wraps:#?}"
    );
    let tail = lines[lines.len().saturating_sub(8)..].join("\n");
    assert!(
        tail.contains("SavedPartitionNotFound"),
        "the failures by code end the output:\n{tail}"
    );
    for agent in &fleet.agents[4..6] {
        assert!(
            raw.contains(&agent.daemon.url),
            "failed node {} named",
            agent.daemon.url
        );
    }
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}
