//! The Ansible collection `reimage.agent` end to end: ansible-core from
//! PyPI in the venv `ansible/venv.sh` makes (cached), the example playbook
//! `ansible/playbooks/rollout.yml` rolling 20 real agents on 127.0.0.1 in
//! waves (`serial: [1, "50%", "100%"]`), a rerun that changes nothing, a
//! rollout that stops at `max_fail_percentage`, and `ansible-test sanity`
//! on the collection. Without python3 and its venv module the tests say
//! `skipping <test>: <reason>`.

use reimage_e2e::ctl::time;
use reimage_e2e::daemon::{ADMIN, Daemon, write_config};
use reimage_e2e::http_server::{Fault, FaultServer};
use reimage_e2e::images::{os_image, partition_sha256, sha256, target_disk, zstd};
use reimage_e2e::pki::{client, require_client_certificates, server_pki};
use reimage_e2e::skip;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Agents in the fleet; with `serial: [1, "50%", "100%"]` the waves are
/// hosts 1, 2–11 and 12–20.
const FLEET: usize = 20;
const WAVES: [std::ops::Range<usize>; 3] = [0..1, 1..11, 11..20];

/// The wave-2 hosts given an image that collides with their local-storage:
/// 3 of 10 is more than the playbook's `max_fail_percentage: 20`.
const COLLIDING: [usize; 3] = [2, 4, 6];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace holds tests/")
        .to_path_buf()
}

fn collection() -> PathBuf {
    repo().join("ansible/collections/ansible_collections/reimage/agent")
}

/// The venv with ansible-core (made by `ansible/venv.sh` if it is not
/// cached yet), or why none can be had here.
fn venv() -> Result<PathBuf, String> {
    // The interpreter venv.sh uses.
    let python = std::env::var("REIMAGE_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import venv, ensurepip"])
        .output()
        .map_err(|err| format!("no {python}: {err}"))?;
    if !probe.status.success() {
        return Err(format!(
            "{python} has no venv module (install python3-venv): {}",
            String::from_utf8_lossy(&probe.stderr).trim()
        ));
    }
    let output = Command::new("bash")
        .arg(repo().join("ansible/venv.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("venv.sh runs");
    assert!(output.status.success(), "ansible/venv.sh failed");
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim(),
    ))
}

/// Runs `command`, printing its output for the test log.
fn run(command: &mut Command) -> Output {
    let started = Instant::now();
    let output = command.output().expect("the command runs");
    eprintln!(
        "--- {command:?} ({:.1} s)\n{}{}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The images the agents are given, by name, served from 127.0.0.1 as
/// `/NAME.img.zst`.
struct Images {
    server: FaultServer,
    sha256: BTreeMap<&'static str, String>,
}

impl Images {
    fn serve() -> Images {
        let images = [
            ("first", os_image(8, 1, 7)),
            ("second", os_image(8, 1, 8)),
            // Its root partition (3–27 MiB) runs over local-storage (23–31
            // MiB of the 32 MiB disks): refused before a byte is written.
            ("colliding", os_image(28, 1, 9)),
        ];
        let sha256 = images
            .iter()
            .map(|(name, raw)| (*name, sha256(raw)))
            .collect();
        let files = images
            .iter()
            .map(|(name, raw)| (format!("/{name}.img.zst"), Arc::new(zstd(raw))))
            .collect();
        Images {
            server: FaultServer::start(files, Fault::None),
            sha256,
        }
    }

    fn sha(&self, name: &str) -> &str {
        &self.sha256[name]
    }

    /// The host variables that name image `name`.
    fn vars(&self, name: &str) -> Value {
        json!({
            "reimage_image_url": self.server.url(&format!("/{name}.img.zst")),
            "reimage_image_sha256": self.sha(name),
        })
    }
}

/// One agent with a 32 MiB disk file (local-storage in its last 8 MiB).
struct Node {
    name: String,
    daemon: Daemon,
    disk: PathBuf,
    storage_sha: String,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(index: usize) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join("disk.img");
        let storage_sha = target_disk(&disk, 32, 8, 100 + index as u64);
        let daemon = Daemon::start(&write_config(dir.path(), ""));
        Node {
            name: format!("agent-{:02}", index + 1),
            daemon,
            disk,
            storage_sha,
            _dir: dir,
        }
    }

    fn reimages(&self) -> Vec<Value> {
        self.daemon.get("/v1/operations")["value"]
            .as_array()
            .expect("a list")
            .iter()
            .filter(|op| op["kind"] == "reimage")
            .cloned()
            .collect()
    }

    fn image_sha(&self) -> Value {
        self.daemon.get("/v1/node")["image"]["sha256"].clone()
    }

    fn assert_storage_intact(&self) {
        let (now, _) = partition_sha256(&self.disk, "local-storage").expect("local-storage");
        assert_eq!(
            now, self.storage_sha,
            "{}: local-storage changed",
            self.name
        );
    }
}

/// `ansible-playbook` from the venv, with the collection from the
/// repository and nothing from the user's home.
struct Ansible {
    venv: PathBuf,
    dir: tempfile::TempDir,
}

impl Ansible {
    fn new(venv: PathBuf) -> Ansible {
        Ansible {
            venv,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn command(&self, tool: &str) -> Command {
        let mut command = Command::new(self.venv.join("bin").join(tool));
        let tmp = self.dir.path().join("tmp");
        command
            .current_dir(self.dir.path())
            .env(
                "ANSIBLE_COLLECTIONS_PATH",
                repo().join("ansible/collections"),
            )
            .env("ANSIBLE_LOCAL_TEMP", &tmp)
            .env("ANSIBLE_REMOTE_TEMP", &tmp)
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_FORCE_COLOR", "0")
            // A whole wave (10 nodes) in flight at once.
            .env("ANSIBLE_FORKS", "10")
            .env("REIMAGE_TOKEN", ADMIN);
        command
    }

    /// Runs the rollout playbook over `fleet`, `vars(index)` being the
    /// variables of the fleet's host `index`.
    fn rollout(&self, fleet: &[Node], vars: impl Fn(usize) -> Value) -> Rollout {
        let hosts: serde_json::Map<String, Value> = fleet
            .iter()
            .enumerate()
            .map(|(index, node)| {
                let mut host = vars(index);
                host["reimage_agent_url"] = Value::from(node.daemon.url.as_str());
                (node.name.clone(), host)
            })
            .collect();
        // JSON is YAML: the inventory's YAML plugin reads it.
        let inventory = self.dir.path().join("inventory.yml");
        let text = json!({
            "reimage_agents": {
                "hosts": hosts,
                "vars": {"reimage_poll_interval": 0.1, "reimage_wait_timeout": 120},
            }
        });
        fs::write(&inventory, text.to_string()).expect("write inventory");
        let started = Instant::now();
        let output = run(self
            .command("ansible-playbook")
            .arg("-i")
            .arg(&inventory)
            .arg(repo().join("ansible/playbooks/rollout.yml")));
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        Rollout {
            success: output.status.success(),
            recap: recap(&stdout),
            stdout,
            seconds: started.elapsed().as_secs_f64(),
        }
    }
}

impl Ansible {
    /// Runs `playbook` on localhost with the extra variables `vars`, and
    /// returns the `results.json` it writes next to itself.
    fn play(&self, playbook: &str, vars: Value) -> Value {
        let path = self.dir.path().join("play.yml");
        fs::write(&path, playbook).expect("write playbook");
        let output = run(self
            .command("ansible-playbook")
            .args(["-i", "localhost,"])
            .arg(&path)
            .arg("-e")
            .arg(vars.to_string()));
        assert!(output.status.success(), "the playbook failed");
        let text = fs::read_to_string(self.dir.path().join("results.json")).expect("results");
        serde_json::from_str(&text).expect("results are JSON")
    }
}

/// What one `ansible-playbook` run showed.
struct Rollout {
    success: bool,
    /// Host → counter (`ok`, `changed`, `failed`, ...) → value.
    recap: BTreeMap<String, BTreeMap<String, u64>>,
    stdout: String,
    seconds: f64,
}

impl Rollout {
    fn count(&self, host: &str, counter: &str) -> u64 {
        self.recap
            .get(host)
            .and_then(|c| c.get(counter))
            .copied()
            .unwrap_or_else(|| panic!("no {counter} for {host} in the recap:\n{}", self.stdout))
    }
}

/// The `PLAY RECAP` lines: `host : ok=2 changed=1 unreachable=0 failed=0 ...`.
fn recap(stdout: &str) -> BTreeMap<String, BTreeMap<String, u64>> {
    stdout
        .lines()
        .skip_while(|line| !line.starts_with("PLAY RECAP"))
        .skip(1)
        .filter_map(|line| {
            let (host, counters) = line.split_once(" : ")?;
            let counters = counters
                .split_whitespace()
                .filter_map(|pair| {
                    let (name, value) = pair.split_once('=')?;
                    Some((name.to_string(), value.parse().ok()?))
                })
                .collect();
            Some((host.trim().to_string(), counters))
        })
        .collect()
}

#[test]
fn the_rollout_playbook_reimages_in_waves_changes_nothing_twice_and_stops_at_max_fail_percentage() {
    let test = "the_rollout_playbook_reimages_in_waves_changes_nothing_twice_and_stops_at_max_fail_percentage";
    let venv = match venv() {
        Ok(venv) => venv,
        Err(reason) => return skip(test, &reason),
    };
    let images = Images::serve();
    let started = Instant::now();
    let fleet: Vec<Node> = (0..FLEET).map(Node::start).collect();
    eprintln!(
        "{FLEET} agents up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let ansible = Ansible::new(venv);

    let first = ansible.rollout(&fleet, |_| images.vars("first"));
    assert!(first.success, "the rollout failed:\n{}", first.stdout);
    assert_eq!(first.recap.len(), FLEET, "{}", first.stdout);
    for node in &fleet {
        assert_eq!(first.count(&node.name, "changed"), 1, "{}", node.name);
        assert_eq!(first.count(&node.name, "failed"), 0, "{}", node.name);
        assert_eq!(node.image_sha(), images.sha("first"), "{}", node.name);
        let reimages = node.reimages();
        assert_eq!(reimages.len(), 1, "{}: {reimages:?}", node.name);
        assert_eq!(reimages[0]["status"], "Succeeded", "{}", node.name);
        node.assert_storage_intact();
    }
    // Serial waves on the agents' own clocks: every reimage of a wave
    // ended before the first of the next one was requested.
    let spans: Vec<(jiff::Timestamp, jiff::Timestamp)> = fleet
        .iter()
        .map(|node| {
            let op = &node.reimages()[0];
            (time(&op["createdAt"]), time(&op["endedAt"]))
        })
        .collect();
    for pair in WAVES.windows(2) {
        let last_end = spans[pair[0].clone()].iter().map(|s| s.1).max();
        let next_start = spans[pair[1].clone()].iter().map(|s| s.0).min();
        assert!(last_end < next_start, "waves overlap: {spans:?}");
    }

    let second = ansible.rollout(&fleet, |_| images.vars("first"));
    assert!(second.success, "the rerun failed:\n{}", second.stdout);
    assert_eq!(second.recap.len(), FLEET, "{}", second.stdout);
    for node in &fleet {
        assert_eq!(second.count(&node.name, "changed"), 0, "{}", node.name);
        assert_eq!(second.count(&node.name, "failed"), 0, "{}", node.name);
        assert_eq!(node.reimages().len(), 1, "{} reimaged again", node.name);
    }

    let third = ansible.rollout(&fleet, |index| {
        images.vars(if COLLIDING.contains(&index) {
            "colliding"
        } else {
            "second"
        })
    });
    assert!(
        !third.success,
        "3 of 10 failed in wave 2:\n{}",
        third.stdout
    );
    assert!(
        third.stdout.contains("SavedPartitionCollision"),
        "the agent's code is shown:\n{}",
        third.stdout
    );
    for (index, node) in fleet.iter().enumerate() {
        let reimages = node.reimages();
        if WAVES[2].contains(&index) {
            assert!(
                !third.recap.contains_key(&node.name),
                "{} is in the recap of a play that ended after wave 2",
                node.name
            );
            assert_eq!(reimages.len(), 1, "{}: wave 3 was started", node.name);
            assert_eq!(node.image_sha(), images.sha("first"), "{}", node.name);
        } else if COLLIDING.contains(&index) {
            assert_eq!(third.count(&node.name, "failed"), 1, "{}", node.name);
            let last = reimages.last().expect("an operation");
            assert_eq!(last["status"], "Failed", "{}", node.name);
            assert_eq!(last["error"]["code"], "SavedPartitionCollision");
        } else {
            assert_eq!(third.count(&node.name, "changed"), 1, "{}", node.name);
            assert_eq!(third.count(&node.name, "failed"), 0, "{}", node.name);
            assert_eq!(node.image_sha(), images.sha("second"), "{}", node.name);
        }
        node.assert_storage_intact();
    }
    eprintln!(
        "rollout {:.1} s, rerun {:.1} s, stopped rollout {:.1} s",
        first.seconds, second.seconds, third.seconds
    );
}

/// The collection's modules, as `ansible-doc` names them.
fn modules() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(collection().join("plugins/modules"))
        .expect("plugins/modules")
        .filter_map(|entry| {
            let name = entry.expect("dir entry").file_name();
            let stem = name.to_str()?.strip_suffix(".py")?.to_string();
            Some(format!("reimage.agent.{stem}"))
        })
        .collect();
    names.sort();
    names
}

/// Copies the collection's files (not what Python or a test run left:
/// `__pycache__`, `tests/output`) to `to`.
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for entry in fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let left_behind = entry.file_name() == "__pycache__"
            || (entry.file_name() == "output" && from.ends_with("tests"));
        if left_behind {
            continue;
        }
        if entry.file_type().expect("file type").is_dir() {
            copy_tree(&source, &target);
        } else {
            fs::copy(&source, &target).expect("copy");
        }
    }
}

/// Prints the argument spec of each module named after the collections
/// path, as JSON by module: `main()` runs until it builds its
/// `AnsibleModule`, which stops it.
const ARGUMENT_SPECS_PY: &str = r#"
import importlib, json, sys
from ansible.module_utils import basic
from ansible.utils.collection_loader._collection_finder import _AnsibleCollectionFinder

_AnsibleCollectionFinder(paths=[sys.argv[1]])._install()


class Captured(Exception):
    pass


def capture(self, argument_spec, **kwargs):
    raise Captured(argument_spec)


basic.AnsibleModule.__init__ = capture
specs = {}
for name in sys.argv[2:]:
    collection, _, short = name.rpartition('.')
    module = importlib.import_module('ansible_collections.%s.plugins.modules.%s' % (collection, short))
    try:
        module.main()
    except Captured as captured:
        specs[name] = captured.args[0]
print(json.dumps(specs, default=repr))
"#;

/// What validate-modules checks first, which cannot run here: every
/// module documents exactly the options of its argument spec, with the
/// same type, default, choices, aliases and whether it is required.
fn assert_documented_as_specified(ansible: &Ansible, modules: &[String]) {
    let collections = repo().join("ansible/collections");
    let output = run(Command::new(ansible.venv.join("bin/python"))
        .args(["-c", ARGUMENT_SPECS_PY])
        .arg(&collections)
        .args(modules));
    assert!(output.status.success(), "the argument specs cannot be read");
    let specs: Value = serde_json::from_slice(&output.stdout).expect("specs are JSON");
    let output = run(ansible.command("ansible-doc").arg("--json").args(modules));
    assert!(output.status.success(), "ansible-doc --json failed");
    let docs: Value = serde_json::from_slice(&output.stdout).expect("docs are JSON");
    // 30 and 30.0 are one default.
    let same = |a: &Value, b: &Value| match (a.as_f64(), b.as_f64()) {
        (Some(a), Some(b)) => a == b,
        _ => a == b,
    };
    for module in modules {
        let spec = specs[module].as_object().expect("an argument spec");
        let documented = docs[module]["doc"]["options"]
            .as_object()
            .expect("documented options");
        let mut spec_names: Vec<&String> = spec.keys().collect();
        let mut doc_names: Vec<&String> = documented.keys().collect();
        spec_names.sort();
        doc_names.sort();
        assert_eq!(spec_names, doc_names, "{module}: options");
        for (name, option) in spec {
            let doc = &documented[name];
            let required = |v: &Value| v["required"].as_bool().unwrap_or(false);
            assert_eq!(option["type"], doc["type"], "{module} {name}: type");
            assert!(
                same(&option["default"], &doc["default"]),
                "{module} {name}: default {} documented as {}",
                option["default"],
                doc["default"]
            );
            assert_eq!(
                option["choices"], doc["choices"],
                "{module} {name}: choices"
            );
            assert_eq!(
                option["aliases"], doc["aliases"],
                "{module} {name}: aliases"
            );
            assert_eq!(required(option), required(doc), "{module} {name}: required");
        }
    }
}

/// The home ansible-test runs in: its venvs are cached there (under
/// `$REIMAGE_CI_CACHE`, as the venvs of the tests), and so is the pip
/// bootstrap script it would download, as `tests/ansible/get_pip.py`
/// stands in for it under the name this ansible-test looks for.
fn sanity_home(venv: &Path) -> PathBuf {
    let cache = std::env::var_os("REIMAGE_CI_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/reimage-ci"), PathBuf::from);
    let home = cache.join(format!(
        "ansible-test-home-{}",
        venv.file_name().and_then(|n| n.to_str()).unwrap_or("venv")
    ));
    let requirements = fs::read_dir(venv.join("lib"))
        .expect("the venv's lib")
        .filter_map(Result::ok)
        .map(|python| {
            python
                .path()
                .join("site-packages/ansible_test/_internal/python_requirements.py")
        })
        .find(|path| path.exists())
        .expect("ansible-test in the venv");
    let text = fs::read_to_string(&requirements).expect("read python_requirements.py");
    let pip = text
        .split("pip='")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .expect("ansible-test's pinned pip version");
    let cached = home.join(format!(
        ".ansible/test/cache/get_pip_{}.py",
        pip.replace('.', "_")
    ));
    fs::create_dir_all(cached.parent().expect("a folder")).expect("make the cache");
    fs::copy(repo().join("tests/ansible/get_pip.py"), &cached).expect("copy get_pip.py");
    home
}

#[test]
fn ansible_test_sanity_passes_for_the_collection() {
    let test = "ansible_test_sanity_passes_for_the_collection";
    let venv = match venv() {
        Ok(venv) => venv,
        Err(reason) => return skip(test, &reason),
    };
    let ansible = Ansible::new(venv.clone());
    // ansible-test wants the collection under ansible_collections/NS/NAME
    // and writes tests/output there: a copy outside the repository also
    // makes it see uncommitted files as they are.
    let root = ansible.dir.path().join("ansible_collections/reimage/agent");
    copy_tree(&collection(), &root);
    let version = run(Command::new(venv.join("bin/python"))
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"]));
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let home = sanity_home(&venv);
    let mut sanity = ansible.command("ansible-test");
    sanity
        .current_dir(&root)
        .env("PATH", path)
        .env("HOME", &home)
        .args(["sanity", "--local", "--python", &version, "--color", "no"]);
    let started = Instant::now();
    let output = run(&mut sanity);
    assert!(output.status.success(), "ansible-test sanity failed");
    let text = String::from_utf8_lossy(&output.stdout);
    for ran in [
        "compile",
        "import",
        "pep8",
        "pylint",
        "validate-modules",
        "yamllint",
        "ansible-doc",
    ] {
        assert!(
            text.contains(&format!("Running sanity test \"{ran}\"")),
            "{ran} did not run:\n{text}"
        );
    }

    let modules = modules();
    assert_eq!(
        modules,
        [
            "reimage.agent.node_info",
            "reimage.agent.reimage",
            "reimage.agent.scheduling",
            "reimage.agent.task"
        ]
    );
    assert_documented_as_specified(&ansible, &modules);
    for module in &modules {
        let output = run(ansible.command("ansible-doc").arg(module));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && !stderr.contains("WARNING"),
            "{module}'s documentation does not render"
        );
    }
    eprintln!(
        "sanity and ansible-doc in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Every module once against one agent, each result written to
/// `results.json` (name → what the module returned) for the test to read.
const MODULES_PLAYBOOK: &str = r#"
- hosts: localhost
  connection: local
  gather_facts: false
  vars:
    ansible_python_interpreter: "{{ ansible_playbook_python }}"
    results: {}
  module_defaults:
    group/reimage.agent.api:
      agent_url: "{{ agent_url }}"
  tasks:
    - {name: add, reimage.agent.task: {id: greet, command_line: echo hello, retention_time: PT1H}, register: add}
    - {name: add again, reimage.agent.task: {id: greet, command_line: echo hello}, register: add_again}
    - {name: add another, reimage.agent.task: {id: greet, command_line: echo bye}, register: add_other, ignore_errors: true}
    - {name: delete, reimage.agent.task: {id: greet, state: absent}, register: delete}
    - {name: delete again, reimage.agent.task: {id: greet, state: absent}, register: delete_again}
    - {name: disable, reimage.agent.scheduling: {state: disabled, option: taskcompletion}, register: disable}
    - {name: disable again, reimage.agent.scheduling: {state: disabled}, register: disable_again}
    - {name: enable, reimage.agent.scheduling: {state: enabled}, register: enable}
    - {name: enable again, reimage.agent.scheduling: {state: enabled}, register: enable_again}
    - {name: reimage in check mode, reimage.agent.reimage: {manifest_url: "{{ manifest_url }}"}, check_mode: true, register: check}
    - {name: reimage a wrong hash, reimage.agent.reimage: {image_url: "{{ image_url }}", image_sha256: "{{ '0' * 64 }}", poll_interval: 0.1}, register: wrong_hash, ignore_errors: true}
    - {name: reimage, reimage.agent.reimage: {manifest_url: "{{ manifest_url }}", option: terminate, poll_interval: 0.1}, register: reimage}
    - {name: reimage again, reimage.agent.reimage: {manifest_url: "{{ manifest_url }}"}, register: reimage_again}
    - {name: info, reimage.agent.node_info: {operations: true, tasks: true}, register: info}
    - {name: info with a bad token, reimage.agent.node_info: {token: not-a-token}, register: bad_token, ignore_errors: true}
    - name: write the results
      ansible.builtin.copy:
        dest: "{{ playbook_dir }}/results.json"
        content: >-
          {{ {'add': add, 'add_again': add_again, 'add_other': add_other, 'delete': delete,
              'delete_again': delete_again, 'disable': disable, 'disable_again': disable_again,
              'enable': enable, 'enable_again': enable_again, 'check': check, 'wrong_hash': wrong_hash,
              'reimage': reimage, 'reimage_again': reimage_again, 'info': info,
              'bad_token': bad_token} | to_json }}
"#;

#[test]
fn each_module_is_idempotent_supports_check_mode_and_fails_with_the_agents_code() {
    let test = "each_module_is_idempotent_supports_check_mode_and_fails_with_the_agents_code";
    let venv = match venv() {
        Ok(venv) => venv,
        Err(reason) => return skip(test, &reason),
    };
    let raw = os_image(8, 1, 21);
    let image_sha = sha256(&raw);
    let server = FaultServer::start(
        vec![("/os.img.zst".into(), Arc::new(zstd(&raw)))],
        Fault::None,
    );
    let manifest = json!({
        "name": "os.img.zst",
        "url": server.url("/os.img.zst"),
        "format": "zstd",
        "size": raw.len(),
        "sha256": image_sha,
    });
    server.replace_file(
        "/os.img.zst.manifest.json",
        Arc::new(manifest.to_string().into_bytes()),
    );
    let node = Node::start(0);
    let results = Ansible::new(venv).play(
        MODULES_PLAYBOOK,
        json!({
            "agent_url": node.daemon.url,
            "image_url": server.url("/os.img.zst"),
            "manifest_url": server.url("/os.img.zst.manifest.json"),
        }),
    );
    let changed = |name: &str| {
        assert_ne!(results[name]["failed"], true, "{name}: {}", results[name]);
        results[name]["changed"] == true
    };
    let code = |name: &str| {
        assert_eq!(results[name]["failed"], true, "{name}: {}", results[name]);
        results[name]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };

    assert!(changed("add"));
    assert_eq!(results["add"]["task"]["id"], "greet");
    assert!(!changed("add_again"), "the task exists");
    assert_eq!(code("add_other"), "TaskExists", "a task cannot change");
    assert!(changed("delete"));
    assert!(!changed("delete_again"), "the task is gone");

    assert!(changed("disable"));
    assert_eq!(results["disable"]["scheduling_state"], "disabled");
    assert!(!changed("disable_again"));
    assert!(changed("enable"));
    assert_eq!(results["enable"]["scheduling_state"], "enabled");
    assert!(!changed("enable_again"));

    assert!(
        changed("check"),
        "check mode says the node would be reimaged"
    );
    assert_eq!(results["check"]["image_sha256"], image_sha.as_str());
    assert!(
        results["check"]["operation"].is_null(),
        "{}",
        results["check"]
    );
    assert_eq!(code("wrong_hash"), "ImageChecksumMismatch");
    assert!(
        results["wrong_hash"]["msg"]
            .as_str()
            .is_some_and(|m| m.contains("ImageChecksumMismatch")),
        "{}",
        results["wrong_hash"]
    );
    assert!(changed("reimage"));
    assert_eq!(results["reimage"]["operation"]["status"], "Succeeded");
    assert_eq!(
        results["reimage"]["operation"]["nodeReimageOption"],
        "terminate"
    );
    assert_eq!(
        results["reimage"]["node"]["image"]["sha256"],
        image_sha.as_str()
    );
    assert!(
        !changed("reimage_again"),
        "the node runs the manifest's image"
    );

    assert!(!changed("info"));
    assert_eq!(
        results["info"]["node"]["image"]["sha256"],
        image_sha.as_str()
    );
    assert_eq!(results["info"]["tasks"], json!([]));
    assert_eq!(code("bad_token"), "AuthenticationFailed");

    // The agent's own record: the failed and the successful reimage, and
    // nothing from check mode or the rerun.
    let statuses: Vec<Value> = node
        .reimages()
        .iter()
        .map(|op| op["status"].clone())
        .collect();
    assert_eq!(statuses, [json!("Failed"), json!("Succeeded")]);
    assert_eq!(
        results["info"]["operations"].as_array().map(Vec::len),
        Some(2)
    );
    node.assert_storage_intact();
}

/// A reimage of the image already in flight (started by a run that was cut
/// off, or by hand), followed by the module for at most `wait_timeout` s.
const ADOPT_PLAYBOOK: &str = r#"
- hosts: localhost
  connection: local
  gather_facts: false
  vars:
    ansible_python_interpreter: "{{ ansible_playbook_python }}"
  tasks:
    - name: reimage
      reimage.agent.reimage:
        agent_url: "{{ agent_url }}"
        image_url: "{{ image_url }}"
        image_sha256: "{{ image_sha256 }}"
        wait_timeout: "{{ wait_timeout }}"
        poll_interval: 0.1
      register: reimage
      ignore_errors: true
    - name: write the results
      ansible.builtin.copy:
        dest: "{{ playbook_dir }}/results.json"
        content: "{{ {'reimage': reimage} | to_json }}"
"#;

#[test]
fn a_reimage_in_flight_is_followed_not_requested_again_and_a_deadline_fails_timeout() {
    let test = "a_reimage_in_flight_is_followed_not_requested_again_and_a_deadline_fails_timeout";
    let venv = match venv() {
        Ok(venv) => venv,
        Err(reason) => return skip(test, &reason),
    };
    let raw = os_image(8, 1, 31);
    let image_sha = sha256(&raw);
    // The download stalls after 1 MiB until the test ends the stall, so
    // the operation is in flight while the module looks at it.
    let server = FaultServer::start(
        vec![("/os.img.zst".into(), Arc::new(zstd(&raw)))],
        Fault::StallOnce {
            after: 1 << 20,
            for_: Duration::from_secs(120),
        },
    );
    let node = Node::start(0);
    let image = json!({"url": server.url("/os.img.zst"), "sha256": image_sha});
    let (status, started) = node
        .daemon
        .post("/v1/node/reimage", ADMIN, json!({"image": image}));
    assert_eq!(status, 202, "{started}");
    let ansible = Ansible::new(venv);
    let vars = |wait_timeout: u64| {
        json!({
            "agent_url": node.daemon.url,
            "image_url": server.url("/os.img.zst"),
            "image_sha256": image_sha,
            "wait_timeout": wait_timeout,
        })
    };

    let results = ansible.play(ADOPT_PLAYBOOK, vars(1));
    let reimage = &results["reimage"];
    assert_eq!(reimage["failed"], true, "{reimage}");
    assert_eq!(reimage["code"], "Timeout", "{reimage}");
    assert_eq!(reimage["adopted"], true, "{reimage}");
    assert_eq!(reimage["operation"]["id"], started["id"], "{reimage}");
    assert_eq!(reimage["operation"]["status"], "InProgress", "{reimage}");
    assert_eq!(reimage["node"]["state"], "reimaging", "{reimage}");

    let polls_before = operation_polls(&node);
    let results = std::thread::scope(|scope| {
        let play = scope.spawn(|| ansible.play(ADOPT_PLAYBOOK, vars(120)));
        // Only once this run's module polls the operation may the
        // download go on.
        let deadline = Instant::now() + Duration::from_secs(120);
        while operation_polls(&node) == polls_before {
            assert!(
                !play.is_finished(),
                "the play ended without polling the operation"
            );
            assert!(
                Instant::now() < deadline,
                "the module never polled the operation"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server.end_stall();
        play.join().expect("the play thread")
    });
    let reimage = &results["reimage"];
    assert_ne!(reimage["failed"], true, "{reimage}");
    assert_eq!(reimage["adopted"], true, "{reimage}");
    assert_eq!(reimage["changed"], true, "{reimage}");
    assert_eq!(reimage["operation"]["id"], started["id"], "{reimage}");
    assert_eq!(reimage["operation"]["status"], "Succeeded", "{reimage}");
    assert_eq!(node.reimages().len(), 1, "no second reimage was requested");
    assert_eq!(node.image_sha(), image_sha.as_str());
    node.assert_storage_intact();
}

/// How many times the agent answered `GET /v1/operations/{id}`, from its
/// `/metrics` (the test itself never asks that route).
fn operation_polls(node: &Node) -> u64 {
    let metrics = node.daemon.get("/metrics");
    let prefix =
        r#"reimage_api_requests_total{method="GET",route="/v1/operations/{id}",status="200"} "#;
    metrics
        .as_str()
        .expect("metrics are text")
        .lines()
        .find_map(|line| line.strip_prefix(prefix))
        .map_or(0, |count| count.trim().parse().expect("a count"))
}

/// `node_info` against an HTTPS agent that requires a client certificate,
/// with and without each TLS option.
const TLS_PLAYBOOK: &str = r#"
- hosts: localhost
  connection: local
  gather_facts: false
  vars:
    ansible_python_interpreter: "{{ ansible_playbook_python }}"
  module_defaults:
    group/reimage.agent.api:
      agent_url: "{{ agent_url }}"
  tasks:
    - name: trusted
      reimage.agent.node_info: {ca_path: "{{ ca }}", client_cert: "{{ cert }}", client_key: "{{ key }}"}
      register: trusted
    - name: no client certificate
      reimage.agent.node_info: {ca_path: "{{ ca }}"}
      register: no_client_cert
      ignore_errors: true
    - name: an unknown CA
      reimage.agent.node_info: {client_cert: "{{ cert }}", client_key: "{{ key }}"}
      register: unknown_ca
      ignore_errors: true
    - name: not validated
      reimage.agent.node_info: {validate_certs: false, client_cert: "{{ cert }}", client_key: "{{ key }}"}
      register: not_validated
    - name: write the results
      ansible.builtin.copy:
        dest: "{{ playbook_dir }}/results.json"
        content: >-
          {{ {'trusted': trusted, 'no_client_cert': no_client_cert, 'unknown_ca': unknown_ca,
              'not_validated': not_validated} | to_json }}
"#;

#[test]
fn the_modules_reach_an_https_agent_with_its_ca_file_and_a_client_certificate() {
    let test = "the_modules_reach_an_https_agent_with_its_ca_file_and_a_client_certificate";
    let venv = match venv() {
        Ok(venv) => venv,
        Err(reason) => return skip(test, &reason),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    target_disk(&dir.path().join("disk.img"), 32, 8, 41);
    let pki = server_pki(dir.path());
    let config = write_config(dir.path(), "");
    let controller = require_client_certificates(dir.path(), &config, &pki);
    let daemon = Daemon::start_with(
        &config,
        "https",
        client(&pki.server_ca.pem(), Some(&controller)),
    );
    let files = [
        ("ca", pki.server_ca.pem()),
        ("cert", controller.cert),
        ("key", controller.key),
    ];
    let mut vars = json!({"agent_url": daemon.url});
    for (name, pem) in files {
        let path = dir.path().join(format!("{name}.pem"));
        fs::write(&path, pem).expect("write PEM");
        vars[name] = Value::from(path.to_str().expect("utf-8 path"));
    }

    let results = Ansible::new(venv).play(TLS_PLAYBOOK, vars);
    for name in ["trusted", "not_validated"] {
        assert_ne!(results[name]["failed"], true, "{name}: {}", results[name]);
        assert_eq!(results[name]["node"]["id"], "node-1", "{name}");
    }
    // OpenSSL's reasons, as Python's ssl module passes them on.
    for (name, reason) in [
        ("no_client_cert", "CERTIFICATE_REQUIRED"),
        ("unknown_ca", "CERTIFICATE_VERIFY_FAILED"),
    ] {
        assert_eq!(results[name]["failed"], true, "{name}: {}", results[name]);
        assert_eq!(results[name]["code"], "ConnectionFailed", "{name}");
        let msg = results[name]["msg"].as_str().unwrap_or_default();
        assert!(msg.contains(reason), "{name}: {msg}");
    }
}
