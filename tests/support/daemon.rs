//! A real `reimage-agent serve` on 127.0.0.1 with a config of its own, and
//! a small blocking client to talk to it.

use crate::bin::binary;
use crate::images::sha256;
use serde_json::Value;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Tokens of the three roles, as the test's config knows them.
pub const ADMIN: &str = "admin-token-for-tests";
pub const OPERATOR: &str = "operator-token-for-tests";
pub const READER: &str = "reader-token-for-tests";

/// A running agent; killed on drop.
pub struct Daemon {
    child: Option<Child>,
    pub url: String,
    pub config: PathBuf,
    log: PathBuf,
    client: reqwest::blocking::Client,
}

/// A free port on 127.0.0.1 (closed again before the agent binds it).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Writes a config for an agent whose files live in `dir`: state, tasks,
/// and the target `dir/disk.img` (which the caller creates), reboot none.
/// `extra` is appended (more TOML).
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let port = free_port();
    let tokens: String = [(ADMIN, "admin"), (OPERATOR, "operator"), (READER, "reader")]
        .iter()
        .map(|(token, role)| {
            format!(
                "[[api.tokens]]\nsha256 = \"{}\"\nrole = \"{role}\"\n",
                sha256(token.as_bytes())
            )
        })
        .collect();
    let text = format!(
        r#"[agent]
node_id = "node-1"
state_dir = "{dir}/state"

[api]
listen = "127.0.0.1:{port}"
{tokens}
[disk]
target = "{dir}/disk.img"
save_partlabel = ["local-storage"]

[tasks]
work_dir = "{dir}/tasks"
kill_grace = "PT2S"

[reboot]
method = "none"
{extra}"#,
        dir = dir.display()
    );
    let path = dir.join("agent.toml");
    fs::write(&path, text).expect("write config");
    path
}

/// Makes the agent of `config` stage images (prefetch, in place) under its
/// state directory: RAM copies in `/run` would outlive the test's directory.
pub fn stage_in_state_dir(config: &Path) {
    let text = fs::read_to_string(config).expect("config");
    let text = text.replacen(
        "save_partlabel = [\"local-storage\"]\n",
        "save_partlabel = [\"local-storage\"]\nstaging = \"state_dir\"\n",
        1,
    );
    assert!(
        text.contains("staging = "),
        "a [disk] table to add staging to"
    );
    fs::write(config, text).expect("config");
}

impl Daemon {
    /// Starts `reimage-agent serve --config CONFIG` and waits for /healthz.
    pub fn start(config: &Path) -> Daemon {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        Daemon::start_with(config, "http", client)
    }

    /// Starts the agent like [`Daemon::start`], then talks to it as
    /// `SCHEME://LISTEN` with `client` (say HTTPS with a test CA and a client
    /// certificate).
    pub fn start_with(config: &Path, scheme: &str, client: reqwest::blocking::Client) -> Daemon {
        // For the test's other plain clients.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let text = fs::read_to_string(config).expect("config");
        let listen = text
            .lines()
            .find_map(|l| l.strip_prefix("listen = \""))
            .and_then(|l| l.strip_suffix('"'))
            .expect("listen in config")
            .to_string();
        let mut daemon = Daemon {
            child: None,
            url: format!("{scheme}://{listen}"),
            config: config.to_path_buf(),
            log: config.with_extension("log"),
            client,
        };
        daemon.spawn();
        daemon
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(binary("reimage-agent"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("agent starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = self.client.get(format!("{}/healthz", self.url)).send()
                && r.status().is_success()
            {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("the agent exited with {status}:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not come up:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent's peak resident memory (`VmHWM`) so far, in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }

    /// What the agent logged so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9`, then start again on the same state.
    pub fn kill9_and_restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// `kill -9` without restarting.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        child.wait().expect("agent exits")
    }

    /// A request with `token` (None: no Authorization header) and a JSON body.
    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.url));
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.send(request, token, headers)
    }

    /// A request whose body is `body` exactly, with no content type but
    /// what `headers` name.
    pub fn request_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: &str,
        headers: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let request = self
            .client
            .request(method, format!("{}{path}", self.url))
            .body(body.to_string());
        self.send(request, token, headers)
    }

    fn send(
        &self,
        mut request: reqwest::blocking::RequestBuilder,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().expect("request sent");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().unwrap_or_default();
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, json)
    }

    /// GET with the reader token; asserts 200.
    pub fn get(&self, path: &str) -> Value {
        let (status, _, body) = self.request(reqwest::Method::GET, path, Some(READER), None, &[]);
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// POST with `token`; returns status and body.
    pub fn post(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        let (status, _, body) =
            self.request(reqwest::Method::POST, path, Some(token), Some(body), &[]);
        (status, body)
    }

    /// Polls `check` on the node/task/operation JSON until it holds.
    pub fn wait_for(&self, what: &str, path: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let value = self.get(path);
            if check(&value) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last {path}: {value}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until operation `id` is no longer InProgress and returns it.
    pub fn wait_operation(&self, id: &str) -> Value {
        self.wait_for(
            "the operation to end",
            &format!("/v1/operations/{id}"),
            |op| op["status"] != "InProgress",
        )
    }

    /// Adds the task `body` with the operator's token; it must be accepted.
    pub fn add_task(&self, body: Value) {
        let (status, body) = self.post("/v1/tasks", OPERATOR, body);
        assert_eq!(status, 201, "task added: {body}");
    }

    /// Waits until task `id` is in `state` and returns it.
    pub fn wait_task(&self, id: &str, state: &str) -> Value {
        self.wait_for(
            &format!("task {id} {state}"),
            &format!("/v1/tasks/{id}"),
            |t| t["state"] == state,
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What the daemon tests set up before starting an agent: a temporary
/// directory with the target `disk.img` (random bytes, `old-root`, and
/// 16 MiB of local-storage at its end) and an OS image served from
/// 127.0.0.1 at `/os.img.zst`.
pub struct NodeSetup {
    pub dir: tempfile::TempDir,
    pub disk: PathBuf,
    /// SHA-256 of local-storage's bytes.
    pub storage_sha: String,
    pub server: crate::http_server::FaultServer,
    /// SHA-256 of the raw image.
    pub image_sha: String,
}

impl NodeSetup {
    /// A `disk_mib` MiB disk filled from `seed` and the image `raw`.
    pub fn new(disk_mib: u64, seed: u64, raw: &[u8]) -> NodeSetup {
        use crate::http_server::{Fault, FaultServer};
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join("disk.img");
        let storage_sha = crate::images::target_disk(&disk, disk_mib, 16, seed);
        let server = FaultServer::start(
            vec![(
                "/os.img.zst".into(),
                std::sync::Arc::new(crate::images::zstd(raw)),
            )],
            Fault::None,
        );
        NodeSetup {
            dir,
            disk,
            storage_sha,
            server,
            image_sha: sha256(raw),
        }
    }

    /// The `[image]` lines that make the served image the node's default
    /// (the seed and Batch requests name none).
    pub fn default_image(&self) -> String {
        format!(
            "\n[image]\nurl = \"{}\"\nsha256 = \"{}\"\n",
            self.server.url("/os.img.zst"),
            self.image_sha
        )
    }

    /// The agent's config in the directory, with `extra` appended.
    pub fn config(&self, extra: &str) -> PathBuf {
        write_config(self.dir.path(), extra)
    }
}
