//! The sd_notify protocol as systemd sees it: each check runs this test
//! binary again as a child with NOTIFY_SOCKET (and WATCHDOG_USEC) set in the
//! child's environment only, and listens on the socket the way systemd does.

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Set in the child's environment: the child tests do their part only then.
const CHILD: &str = "REIMAGE_SERVICE_TEST_CHILD";

/// Runs the ignored test `name` of this binary as a child with `env`;
/// returns what it printed.
fn run_child(name: &str, env: &[(&str, &Path)], extra: &[(&str, &str)]) -> String {
    run_child_with(name, env, extra, |_| {})
}

/// [`run_child`], with `setup` adjusting the command (its stderr, say).
fn run_child_with(
    name: &str,
    env: &[(&str, &Path)],
    extra: &[(&str, &str)],
    setup: impl FnOnce(&mut Command),
) -> String {
    let exe = std::env::current_exe().expect("test binary");
    let mut command = Command::new(exe);
    command
        .args([
            "--exact",
            name,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID");
    for (key, value) in env {
        command.env(key, value);
    }
    for (key, value) in extra {
        command.env(key, value);
    }
    setup(&mut command);
    let output = command.output().expect("child runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "child {name} failed:\n{said}");
    assert!(
        said.contains("1 passed"),
        "child {name} ran no test:\n{said}"
    );
    said
}

/// Every datagram that arrives until `quiet` passes without one.
fn datagrams(socket: &UnixDatagram, quiet: Duration) -> Vec<String> {
    socket.set_read_timeout(Some(quiet)).expect("timeout");
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(n) => messages.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => break,
        }
    }
    messages
}

#[test]
fn notifications_reach_the_notify_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind");
    run_child(
        "child_sends_notifications",
        &[("NOTIFY_SOCKET", &path)],
        // 200 ms: pings every 100 ms while the child waits 450 ms.
        &[("WATCHDOG_USEC", "200000")],
    );
    let messages = datagrams(&socket, Duration::from_millis(200));
    assert_eq!(
        messages.first().map(String::as_str),
        Some("READY=1\nSTATUS=listening on 127.0.0.1:7480\n"),
        "{messages:?}"
    );
    assert!(
        messages.contains(&"STATUS=reimaging\n".to_string()),
        "{messages:?}"
    );
    let pings = messages.iter().filter(|m| *m == "WATCHDOG=1\n").count();
    assert!(
        pings >= 2,
        "watchdog pings at half the interval: {messages:?}"
    );
    assert_eq!(
        messages.last().map(String::as_str),
        Some("STOPPING=1\n"),
        "{messages:?}"
    );
}

#[test]
#[ignore = "run by notifications_reach_the_notify_socket in a child process"]
fn child_sends_notifications() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    reimage_agent::service::notify_ready("listening on 127.0.0.1:7480");
    reimage_agent::service::notify_status("reimaging");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let watchdog = reimage_agent::service::spawn_watchdog().expect("watchdog asked for");
        tokio::time::sleep(Duration::from_millis(450)).await;
        watchdog.abort();
    });
    reimage_agent::service::notify_stopping();
}

#[test]
fn without_systemd_notifications_do_nothing() {
    run_child("child_without_systemd", &[], &[("WATCHDOG_USEC", "200000")]);
}

#[test]
#[ignore = "run by without_systemd_notifications_do_nothing in a child process"]
fn child_without_systemd() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    reimage_agent::service::notify_ready("ready");
    reimage_agent::service::notify_status("status");
    reimage_agent::service::notify_stopping();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let watchdog = runtime.block_on(async { reimage_agent::service::spawn_watchdog() });
    assert!(watchdog.is_none(), "no NOTIFY_SOCKET, no watchdog");
}

#[test]
fn logging_falls_back_to_stderr_outside_the_journal() {
    // JOURNAL_STREAM naming another stream (as a shell started by a service
    // inherits it) must not send logs to the journal.
    let said = run_child(
        "child_logs_to_stderr",
        &[],
        &[("JOURNAL_STREAM", "1:1"), ("RUST_LOG", "info")],
    );
    assert!(
        said.contains("a line for stderr"),
        "RUST_LOG=info wins over warn:\n{said}"
    );
}

#[test]
fn logging_goes_to_the_journal_when_stderr_is_the_journal_stream() {
    // JOURNAL_STREAM names the child's stderr (a file here): the agent
    // takes the journal path. Where no journald listens, it says so on
    // stderr and logs there; where one does, the line goes to the journal.
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("stderr.txt");
    let file = std::fs::File::create(&log).expect("stderr file");
    let meta = file.metadata().expect("metadata");
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    run_child_with(
        "child_logs_to_stderr",
        &[],
        &[("JOURNAL_STREAM", &stream), ("RUST_LOG", "info")],
        |command| {
            command.stderr(file);
        },
    );
    let said = std::fs::read_to_string(&log).expect("stderr");
    assert!(
        said.contains("cannot log to the journal") || !said.contains("a line for stderr"),
        "the journal was not tried:\n{said}"
    );
}

#[test]
#[ignore = "run by the logging tests in a child process"]
fn child_logs_to_stderr() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    reimage_agent::service::init_logging("warn");
    tracing::info!("a line for stderr");
}
