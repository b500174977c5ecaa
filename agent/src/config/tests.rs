//! The config file: defaults, errors naming the key and line, validation.

use super::*;
use crate::api::auth::Role;

const EXAMPLE: &str = include_str!("../../../systemd/agent.toml");

/// The smallest valid file, with `extra` appended.
fn minimal(extra: &str) -> String {
    format!(
        "[disk]\ntarget = \"/dev/disk/by-id/test\"\nsave_partlabel = [\"local-storage\"]\n\n[reboot]\nmethod = \"none\"\n{extra}"
    )
}

fn error_of(text: &str) -> String {
    let err = Config::parse(text, "agent.toml").expect_err("must be refused");
    assert_eq!(err.code(), "ConfigInvalid");
    let message = err.to_string();
    assert!(
        message.starts_with("agent.toml: "),
        "names the file: {message}"
    );
    assert!(!message.contains('\n'), "one line: {message}");
    message
}

#[test]
fn the_example_file_parses() {
    let config = Config::parse(EXAMPLE, "systemd/agent.toml").expect("example is valid");
    assert_eq!(config.agent.node_id, "node-0017");
    assert_eq!(config.api.listen, "0.0.0.0:7480".parse().expect("addr"));
    assert_eq!(config.api.tokens.len(), 2);
    assert_eq!(config.api.tokens[0].role, Role::Admin);
    assert_eq!(config.disk.save_partlabel, ["local-storage"]);
    assert_eq!(
        config.tasks.default_retention,
        Duration::from_secs(7 * 86400)
    );
    assert_eq!(config.tasks.kill_grace, Duration::from_secs(30));
    assert_eq!(config.reboot.method, RebootMethod::Systemd);
    assert!(
        config
            .image
            .allowed_urls
            .allows(config.image.url.as_deref().expect("url"))
    );
    assert!(!config.image.allow_local_files, "off unless set");
}

#[test]
fn left_out_keys_take_their_defaults() {
    let config = Config::parse(&minimal(""), "agent.toml").expect("valid");
    assert_eq!(config.agent.node_id, hostname());
    assert_eq!(config.agent.state_dir, Path::new(DEFAULT_STATE_DIR));
    assert_eq!(config.api.listen, "0.0.0.0:7480".parse().expect("addr"));
    assert!(config.api.tokens.is_empty());
    assert_eq!(
        config.tasks.work_dir,
        Path::new(DEFAULT_STATE_DIR).join("tasks")
    );
    assert_eq!(config.tasks.kill_grace, Duration::from_secs(30));
    assert!(config.image.url.is_none());
}

#[test]
fn work_dir_defaults_under_the_configured_state_dir() {
    let text = minimal("[agent]\nnode_id = \"n1\"\nstate_dir = \"/srv/agent\"\n");
    let config = Config::parse(&text, "agent.toml").expect("valid");
    assert_eq!(config.tasks.work_dir, Path::new("/srv/agent/tasks"));
}

#[test]
fn an_unknown_table_is_named_with_its_line() {
    let message = error_of(&minimal("\n[bogus]\nx = 1\n"));
    assert!(message.contains("line 8"), "{message}");
    assert!(
        message.contains("unknown key `bogus`, expected one of `agent`"),
        "{message}"
    );
}

#[test]
fn an_unknown_key_in_a_table_is_named_with_its_line() {
    let message = error_of(&minimal(
        "[agent]\nnode_id = \"n1\"\nsave_partlabels = []\n",
    ));
    assert!(message.contains("line 9, column 1"), "{message}");
    assert!(
        message.contains("unknown key `agent.save_partlabels`"),
        "{message}"
    );
    assert!(
        message.contains("`node_id`"),
        "lists the known keys: {message}"
    );
}

#[test]
fn an_unknown_key_in_an_array_of_tables_is_named_with_its_line() {
    let text = minimal(
        "[[api.tokens]]\nsha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nrole = \"admin\"\nexpires = \"P1D\"\n",
    );
    let message = error_of(&text);
    assert!(message.contains("line 10"), "{message}");
    assert!(
        message.contains("unknown key `api.tokens[0].expires`"),
        "{message}"
    );
}

#[test]
fn an_unknown_role_is_named_with_its_key_and_line() {
    let text = minimal(
        "[[api.tokens]]\nsha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nrole = \"root\"\n",
    );
    let message = error_of(&text);
    assert!(message.contains("line 9"), "{message}");
    assert!(message.contains("api.tokens[0].role"), "{message}");
    assert!(
        message.contains("`root`") && message.contains("`admin`"),
        "{message}"
    );
}

#[test]
fn a_bad_token_hash_is_named_and_not_echoed() {
    let text = minimal("[[api.tokens]]\nsha256 = \"my-secret-token\"\nrole = \"admin\"\n");
    let message = error_of(&text);
    assert!(message.contains("line 8"), "{message}");
    assert!(message.contains("api.tokens[0].sha256"), "{message}");
    assert!(message.contains("64 hex digits"), "{message}");
    assert!(!message.contains("my-secret-token"), "{message}");

    let not_hex = format!(
        "[image]\nurl = \"https://x/\"\nsha256 = \"{}\"\n",
        "g".repeat(64)
    );
    let message = error_of(&minimal(&not_hex));
    assert!(
        message.contains("image.sha256") && message.contains("non-hex"),
        "{message}"
    );
}

#[test]
fn the_task_user_defaults_to_reimage_task() {
    let config = Config::parse(&minimal(""), "t").expect("valid");
    assert_eq!(config.tasks.user, "reimage-task");
    let config = Config::parse(&minimal("[tasks]\nuser = \"batch\"\n"), "t").expect("valid");
    assert_eq!(config.tasks.user, "batch");
    let message = error_of(&minimal("[tasks]\nuser = \" \"\n"));
    assert!(message.contains("[tasks] user"), "{message}");
}

#[test]
fn task_slots_are_a_positive_number() {
    let message = error_of(&minimal("[tasks]\nmax_running = 0\n"));
    assert!(message.contains("tasks.max_running"), "{message}");
    let config = Config::parse(&minimal("[tasks]\nmax_running = 100\n"), "t").expect("valid");
    assert_eq!(config.tasks.max_running.map(|n| n.get()), Some(100));
    let text = minimal("").replace("[reboot]", "staging = \"tape\"\n[reboot]");
    let staging = error_of(&text);
    assert!(
        staging.contains("disk.staging") && staging.contains("state_dir"),
        "names the key and the choices: {staging}"
    );
}

#[test]
fn a_bad_duration_is_named() {
    let message = error_of(&minimal("[tasks]\nkill_grace = \"7 days\"\n"));
    assert!(message.contains("line 8"), "{message}");
    assert!(message.contains("tasks.kill_grace"), "{message}");
    assert!(message.contains("ISO 8601"), "{message}");

    let message = error_of(&minimal("[tasks]\ndefault_retention = \"P1M\"\n"));
    assert!(message.contains("tasks.default_retention"), "{message}");
    assert!(message.contains("no fixed length"), "{message}");
}

#[test]
fn a_bad_listen_address_is_named() {
    let message = error_of(&minimal("[api]\nlisten = \"nonsense\"\n"));
    assert!(message.contains("line 8"), "{message}");
    assert!(message.contains("api.listen"), "{message}");
}

#[test]
fn tls_needs_both_cert_and_key() {
    let message = error_of(&minimal("[api]\ntls_cert = \"/etc/cert.pem\"\n"));
    assert!(
        message.contains("tls_cert") && message.contains("tls_key"),
        "{message}"
    );
    let message = error_of(&minimal("[api]\nclient_ca = \"/etc/ca.pem\"\n"));
    assert!(message.contains("client_ca"), "{message}");
}

#[test]
fn missing_sections_and_values_are_named() {
    let message = error_of("[reboot]\nmethod = \"none\"\n");
    assert!(message.contains("missing field `disk`"), "{message}");
    let message = error_of("[disk]\ntarget = \"/dev/sda\"\n[reboot]\nmethod = \"now\"\n");
    assert!(
        message.contains("reboot.method") && message.contains("`now`"),
        "{message}"
    );
    let message = error_of(&minimal("[agent]\nnode_id = \"a/b\"\n"));
    assert!(message.contains("node_id"), "{message}");
    let message = error_of(&minimal("[tasks]\nwork_dir = \"tasks\"\n"));
    assert!(
        message.contains("work_dir") && message.contains("absolute"),
        "{message}"
    );
    let message = error_of("[disk]\ntarget = \"/dev/sda\"\n[reboot]\nmethod = \"none\"\nnope");
    assert!(
        message.contains("line 5"),
        "a syntax error has its line: {message}"
    );
}

#[test]
fn the_default_image_must_be_verifiable_and_allowed() {
    let message = error_of(&minimal(
        "[image]\nurl = \"https://images.example/os.img\"\n",
    ));
    assert!(message.contains("sha256"), "{message}");
    let text = format!(
        "[image]\nurl = \"https://elsewhere.example/os.img\"\nsha256 = \"{}\"\nallowed_urls = [\"https://images.example/\"]\n",
        "ab".repeat(32)
    );
    let message = error_of(&minimal(&text));
    assert!(
        message.contains("[image] url") && message.contains("allowed_urls"),
        "{message}"
    );
    let message = error_of(&minimal(
        "[image]\nallowed_urls = [\"ftp://images.example/\"]\n",
    ));
    assert!(message.contains("image.allowed_urls"), "{message}");
}

#[test]
fn a_token_hash_configured_twice_is_refused() {
    let entry = "[[api.tokens]]\nsha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nrole = \"reader\"\n";
    let message = error_of(&minimal(&format!("{entry}{entry}")));
    assert!(message.contains("configured twice"), "{message}");
}

#[test]
fn line_and_column_count_from_one() {
    assert_eq!(line_column("ab\ncd", 0), (1, 1));
    assert_eq!(line_column("ab\ncd", 4), (2, 2));
    assert_eq!(line_column("é\nx", 3), (2, 1));
}

#[test]
fn efivars_defaults_to_efivarfs_and_can_be_moved() {
    let config = Config::parse(&minimal(""), "agent.toml").expect("valid");
    assert_eq!(config.reboot.efivars, Path::new(DEFAULT_EFIVARS));
    let config = Config::parse(&minimal("efivars = \"/tmp/vars\"\n"), "agent.toml").expect("valid");
    assert_eq!(config.reboot.efivars, Path::new("/tmp/vars"));
    let message = error_of(&minimal("efivars = 3\n"));
    assert!(message.contains("efivars"), "{message}");
}
