//! The daemon under load: GET /v1/node at 1,000 requests/s (open loop, the
//! workspace's `api-load`) while reimages run back to back, and 100 tasks
//! started at once (100 task slots) and retained. Every request must be answered without an
//! error, every reimage succeed with local-storage intact, and the agent's
//! memory stay bounded. How much the load slows a write is a performance
//! figure, measured by `bench/api.sh`, not asserted here.
//!
//! The load lasts 5 s, or a minute with `REIMAGE_LONG_TESTS=1` (CI sets it).

use reimage_e2e::bin::binary;
use reimage_e2e::daemon::{ADMIN, Daemon, OPERATOR, READER, write_config};
use reimage_e2e::http_server::{Fault, FaultServer};
use reimage_e2e::images::{labels, os_image, partition_sha256, sha256, target_disk, zstd};
use serde_json::json;
use std::process::Command;
use std::sync::Arc;

/// Peak RSS the agent may reach, in KiB: a debug build, its buffer pool
/// (4 × 4 MiB), 100 task records and the connections of the load.
const RSS_LIMIT_KIB: u64 = 160 * 1024;

fn load_seconds() -> u64 {
    if std::env::var_os("REIMAGE_LONG_TESTS").is_some_and(|v| v == "1") {
        60
    } else {
        5
    }
}

#[test]
fn the_api_answers_1000_requests_a_second_while_reimages_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.img");
    let storage_sha = target_disk(&disk, 64, 16, 61);
    let raw = os_image(40, 1, 62);
    let server = FaultServer::start(
        vec![("/os.img.zst".into(), Arc::new(zstd(&raw)))],
        Fault::None,
    );
    let daemon = Daemon::start(&write_config(dir.path(), ""));
    let seconds = load_seconds();
    let load = Command::new(binary("api-load"))
        .arg(format!("{}/v1/node", daemon.url))
        .args([READER, "1000", &seconds.to_string()])
        .output();
    let load = std::thread::spawn(move || load);

    // Reimage after reimage for as long as the load runs.
    let started = std::time::Instant::now();
    let mut reimages = 0;
    while started.elapsed().as_secs() < seconds {
        let body = json!({
            "nodeReimageOption": "requeue",
            "image": {"url": server.url("/os.img.zst"), "sha256": sha256(&raw)},
        });
        let (status, answer) = daemon.post("/v1/node/reimage", ADMIN, body);
        assert_eq!(status, 202, "{answer}");
        let op = daemon.wait_operation(answer["id"].as_str().expect("id"));
        assert_eq!(op["status"], "Succeeded", "{op}");
        reimages += 1;
    }
    let load = load.join().expect("load thread").expect("api-load runs");
    let report = String::from_utf8_lossy(&load.stdout).into_owned();
    eprintln!("{reimages} reimages under load; api-load: {report}");
    assert!(
        load.status.success(),
        "api-load: {}",
        String::from_utf8_lossy(&load.stderr)
    );
    let field = |name: &str| -> u64 {
        report
            .split_whitespace()
            .skip_while(|w| *w != name)
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {report}"))
    };
    assert_eq!(field("requests"), 1000 * seconds, "every request was sent");
    assert_eq!(field("errors"), 0, "every request answered 200");
    assert!(reimages >= 1);
    let labels = labels(&disk);
    assert_eq!(labels, ["efi", "root", "local-storage"]);
    assert_eq!(
        partition_sha256(&disk, "local-storage").map(|(s, _)| s),
        Some(storage_sha)
    );
    let peak = daemon.peak_rss_kib().expect("VmHWM");
    eprintln!("agent peak RSS {} MiB", peak / 1024);
    assert!(peak < RSS_LIMIT_KIB, "peak RSS {peak} KiB");
}

#[test]
fn a_hundred_tasks_start_together_and_are_all_retained() {
    let dir = tempfile::tempdir().expect("tempdir");
    target_disk(&dir.path().join("disk.img"), 64, 16, 63);
    // A hundred task slots: all of them run at once.
    let config = write_config(dir.path(), "");
    let text = std::fs::read_to_string(&config).expect("config");
    let text = text.replace("kill_grace = ", "max_running = 100\nkill_grace = ");
    std::fs::write(&config, text).expect("config");
    let daemon = Daemon::start(&config);
    let ids: Vec<String> = (0..100).map(|i| format!("t{i:03}")).collect();
    let adders: Vec<_> = ids
        .chunks(10)
        .map(|chunk| {
            let chunk = chunk.to_vec();
            let url = daemon.url.clone();
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::new();
                for id in chunk {
                    let body = json!({
                        "id": id,
                        "commandLine": format!("echo {id}; sleep 3"),
                        "constraints": {"retentionTime": "PT1H"},
                    });
                    let response = client
                        .post(format!("{url}/v1/tasks"))
                        .bearer_auth(OPERATOR)
                        .json(&body)
                        .send()
                        .expect("sent");
                    assert_eq!(response.status().as_u16(), 201, "{id}");
                }
            })
        })
        .collect();
    // Meanwhile: how many run at the same time.
    let mut most_running = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !adders.iter().all(|a| a.is_finished()) || most_running < 100 {
        let running = daemon.get("/v1/node")["runningTasksCount"]
            .as_u64()
            .unwrap_or(0);
        most_running = most_running.max(running);
        if std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for adder in adders {
        adder.join().expect("adder");
    }
    assert!(
        most_running >= 90,
        "at most {most_running} tasks ran at once"
    );
    let all = daemon.wait_for("every task to complete", "/v1/tasks", |list| {
        list["value"].as_array().is_some_and(|tasks| {
            tasks.len() == 100 && tasks.iter().all(|t| t["state"] == "completed")
        })
    });
    for task in all["value"].as_array().expect("tasks") {
        assert_eq!(task["executionInfo"]["exitCode"], 0, "{task}");
        assert!(task["retentionExpiry"].is_string(), "retained: {task}");
    }
    for id in &ids {
        let (status, _, body) = daemon.request(
            reqwest::Method::GET,
            &format!("/v1/tasks/{id}/files/stdout.txt"),
            Some(READER),
            None,
            &[],
        );
        assert_eq!(status, 200);
        assert_eq!(
            body.as_str().map(str::trim),
            Some(id.as_str()),
            "{id}'s output kept"
        );
    }
    assert_eq!(daemon.get("/v1/node")["totalTasksRun"], 100);
    let peak = daemon.peak_rss_kib().expect("VmHWM");
    eprintln!("agent peak RSS with 100 tasks {} MiB", peak / 1024);
    assert!(peak < RSS_LIMIT_KIB, "peak RSS {peak} KiB");
}
