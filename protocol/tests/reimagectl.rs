//! `reimagectl` without agents: arguments, hosts files, tokens and the
//! one-line error, on the real binary.

use std::process::{Command, Output};

fn reimagectl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_reimagectl"))
        .args(args)
        .env_remove("REIMAGE_TOKEN")
        .output()
        .expect("reimagectl runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A port nobody listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

#[test]
fn a_bad_hosts_line_is_named_by_its_number() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = dir.path().join("fleet.txt");
    std::fs::write(
        &hosts,
        "# rack 1\nhttp://10.0.0.1:7480\n\n10.0.0.2:7480 # no scheme\n",
    )
    .expect("hosts");
    let output = reimagectl(&["--hosts", hosts.to_str().expect("utf-8"), "node"]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("InvalidHostsFile"), "{err}");
    assert!(err.contains("fleet.txt line 4"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[test]
fn an_agent_named_twice_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = dir.path().join("fleet.txt");
    std::fs::write(&hosts, "http://10.0.0.1:7480/\n").expect("hosts");
    let output = reimagectl(&[
        "--agent",
        "http://10.0.0.1:7480",
        "--hosts",
        hosts.to_str().expect("utf-8"),
        "reimage",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("named twice"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn single_agent_commands_refuse_a_fleet() {
    let output = reimagectl(&[
        "--agent",
        "http://10.0.0.1:7480",
        "--agent",
        "http://10.0.0.2:7480",
        "op",
        "list",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.contains("`op` talks to one agent and 2 were given"),
        "{err}"
    );
    let output = reimagectl(&["task", "list"]);
    assert!(stderr(&output).contains("no agent"), "{}", stderr(&output));
}

#[test]
fn an_empty_token_file_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "\n").expect("token");
    let output = reimagectl(&[
        "--agent",
        "http://127.0.0.1:1",
        "--token-file",
        token.to_str().expect("utf-8"),
        "node",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("is empty"), "{}", stderr(&output));
}

#[test]
fn an_unreachable_agent_is_one_error_line_with_its_code() {
    let agent = format!("http://127.0.0.1:{}", closed_port());
    let output = reimagectl(&["--agent", &agent, "node"]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.starts_with(&format!(
            "error: reading the node of {agent}: ConnectionFailed: GET {agent}/v1/node: "
        )),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn image_url_needs_its_hash() {
    let output = reimagectl(&[
        "--agent",
        "http://127.0.0.1:1",
        "reimage",
        "--image-url",
        "http://images/os.img",
    ]);
    assert_eq!(output.status.code(), Some(2), "a usage error");
    assert!(stderr(&output).contains("--sha256"), "{}", stderr(&output));
}
