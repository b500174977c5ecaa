//! The shipped systemd pieces: the unit passes `systemd-analyze verify`,
//! and the example config is one the agent accepts.

use reimage_agent::config::Config;
use reimage_e2e::skip;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

fn unit_text() -> String {
    fs::read_to_string(systemd_dir().join("reimage-agent.service")).expect("unit file")
}

/// The value of `key=` in the unit (the last one wins, as in systemd).
fn unit_setting(unit: &str, key: &str) -> Option<String> {
    unit.lines()
        .filter_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .next_back()
        .map(str::to_string)
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    if !analyze.is_ok_and(|o| o.status.success()) {
        return skip(
            "the_unit_passes_systemd_analyze_verify",
            "systemd-analyze is not installed (apt-get install systemd)",
        );
    }
    // verify checks that ExecStart= exists: point it at the binary just built.
    let unit = unit_text();
    let exec = unit_setting(&unit, "ExecStart").expect("ExecStart");
    assert!(exec.starts_with("/usr/bin/reimage-agent serve "), "{exec}");
    let rewritten = unit.replace(
        "/usr/bin/reimage-agent",
        env!("CARGO_BIN_EXE_reimage-agent"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("reimage-agent.service");
    fs::write(&path, rewritten).expect("write unit");

    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "verify failed:\n{said}");
    // Unknown or misspelt keys are only warnings, with exit status 0.
    let complaints: Vec<&str> = said
        .lines()
        .filter(|line| line.contains("reimage-agent"))
        .collect();
    assert!(complaints.is_empty(), "verify complained:\n{said}");
}

#[test]
fn the_unit_is_a_notify_service_with_a_watchdog() {
    let unit = unit_text();
    for (key, value) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("WatchdogSec", "30s"),
        ("Restart", "on-failure"),
        ("KillMode", "mixed"),
        ("StateDirectory", "reimage-agent"),
        ("ConfigurationDirectory", "reimage-agent"),
        ("ProtectSystem", "strict"),
        ("PrivateDevices", "no"),
        ("NoNewPrivileges", "yes"),
        ("Delegate", "yes"),
        ("ProtectControlGroups", "no"),
        ("StateDirectoryMode", "0711"),
    ] {
        assert_eq!(unit_setting(&unit, key).as_deref(), Some(value), "{key}=");
    }
    // Any device allow-list would close the target disk.
    assert_eq!(unit_setting(&unit, "DeviceAllow"), None);
    assert_eq!(unit_setting(&unit, "ProtectClock"), None);
}

#[test]
fn the_stop_timeout_outlasts_the_example_kill_grace() {
    let config = Config::load(&systemd_dir().join("agent.toml")).expect("example loads");
    let timeout = unit_setting(&unit_text(), "TimeoutStopSec").expect("TimeoutStopSec");
    let seconds: u64 = timeout
        .strip_suffix('s')
        .and_then(|s| s.parse().ok())
        .expect("TimeoutStopSec in seconds");
    assert!(
        Duration::from_secs(seconds) > config.tasks.kill_grace + Duration::from_secs(30),
        "TimeoutStopSec={timeout} leaves no time after kill_grace {:?}",
        config.tasks.kill_grace
    );
}

#[test]
fn the_example_config_loads() {
    let config = Config::load(&systemd_dir().join("agent.toml")).expect("example loads");
    assert_eq!(config.agent.state_dir, Path::new("/var/lib/reimage-agent"));
    // ReadWritePaths= adds up over its lines; `-` marks a path that may be
    // absent.
    let writable: Vec<String> = unit_text()
        .lines()
        .filter_map(|line| line.strip_prefix("ReadWritePaths="))
        .flat_map(|paths| paths.split_whitespace().map(str::to_string))
        .collect();
    let state_dir = config.agent.state_dir.to_string_lossy().into_owned();
    assert!(
        writable.contains(&state_dir),
        "the unit lets the agent write its state dir: {writable:?}"
    );
    let efivars = format!("-{}", config.reboot.efivars.display());
    assert!(
        writable.contains(&efivars),
        "the unit lets the agent write the firmware's boot variables where they exist: {writable:?}"
    );
}

#[test]
fn the_unit_lets_the_agent_start_tasks_as_other_users() {
    let caps = unit_setting(&unit_text(), "CapabilityBoundingSet").expect("bounding set");
    for cap in [
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_SETPCAP",
        "CAP_CHOWN",
        "CAP_KILL",
    ] {
        assert!(caps.split_whitespace().any(|c| c == cap), "{cap} in {caps}");
    }
}

#[test]
fn the_sysusers_file_makes_the_default_task_user() {
    let sysusers = Command::new("systemd-sysusers").arg("--version").output();
    if !sysusers.is_ok_and(|o| o.status.success()) {
        return skip(
            "the_sysusers_file_makes_the_default_task_user",
            "systemd-sysusers is not installed (apt-get install systemd)",
        );
    }
    let config = Config::load(&systemd_dir().join("agent.toml")).expect("example loads");
    let root = tempfile::tempdir().expect("tempdir");
    fs::create_dir(root.path().join("etc")).expect("etc");
    let output = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(systemd_dir().join("reimage-agent.sysusers"))
        .output()
        .expect("systemd-sysusers runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let passwd = fs::read_to_string(root.path().join("etc/passwd")).expect("passwd");
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with(&format!("{}:", config.tasks.user))),
        "{passwd}"
    );
}
