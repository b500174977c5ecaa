//! The agent's configuration, `/etc/reimage-agent/agent.toml`: the file's
//! shape ([`file`]), then the validated [`Config`] the agent runs with.
//! The sandbox `serve` runs without a file is made in [`crate::sandbox`].
//!
//! Every table refuses unknown keys: a misspelt `save_partlabel` must stop
//! the agent, not silently let a reimage overwrite the data it was meant to
//! keep. Errors name the file, the key and the line.

mod file;
#[cfg(test)]
mod tests;

use crate::api::auth::Token;
use crate::image::allowed_urls::AllowedUrls;
use crate::reboot::RebootMethod;
use crate::tasks::{DEFAULT_KILL_GRACE, DEFAULT_RETENTION};
use crate::{Error, Result};
use file::ConfigFile;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the daemon keeps its state when the config does not say.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/reimage-agent";
/// Where `serve` reads its config by default.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/reimage-agent/agent.toml";

/// Longest `kill_grace` that still ends inside the shipped unit's
/// `TimeoutStopSec=90s` (with room for persisting state after the kill).
const KILL_GRACE_WITHIN_UNIT: Duration = Duration::from_secs(60);

/// The whole configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[agent]`
    pub agent: AgentConfig,
    /// `[api]` and `[[api.tokens]]`
    pub api: ApiConfig,
    /// `[disk]`
    pub disk: DiskConfig,
    /// `[image]`
    pub image: ImageConfig,
    /// `[tasks]`
    pub tasks: TasksSection,
    /// `[reboot]`
    pub reboot: RebootConfig,
}

/// `[agent]`: who this node is and where its state lives.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The node's id in the API and the seed routes; the hostname by default.
    pub node_id: String,
    /// Operations, tasks and timers; on a saved partition in production so
    /// they survive the reimage.
    pub state_dir: PathBuf,
}

/// `[api]`: where the HTTP API listens and who may call it.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Address and port to listen on (`0.0.0.0:7480` by default).
    pub listen: SocketAddr,
    /// PEM certificate chain; with `tls_key`, the API speaks HTTPS only.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle; when set, clients must present a certificate it signed.
    pub client_ca: Option<PathBuf>,
    /// `[[api.tokens]]`: bearer tokens by their SHA-256, with a role each.
    pub tokens: Vec<Token>,
}

/// `[disk]`: the only disk the agent ever writes, and what on it to keep.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// The target block device (a stable `/dev/disk/by-id/…` path) or file.
    pub target: PathBuf,
    /// Globs over partition labels whose partitions survive every reimage.
    pub save_partlabel: Vec<String>,
    /// 1-based partition indexes that survive every reimage.
    pub save_partindex: Vec<u32>,
    /// Where an in-place reimage (the target holds the running system)
    /// stages the image until the shutdown handoff writes it: `auto`
    /// (RAM when it fits, else `state_dir`), `memory` or `state_dir`.
    pub staging: crate::handoff::stage::StagingChoice,
}

impl DiskConfig {
    /// The partitions every reimage of this disk keeps.
    pub fn save_spec(&self) -> crate::disk::saved::SaveSpec {
        crate::disk::saved::SaveSpec {
            labels: self.save_partlabel.clone(),
            indexes: self.save_partindex.clone(),
        }
    }
}

/// `[image] prefetch_budget_mib` when the file does not say: room for a
/// couple of fleet images, compressed.
pub const DEFAULT_PREFETCH_BUDGET: u64 = 4096 << 20;

/// `[image]`: the default image, and which images are acceptable at all.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    /// Image a reimage writes when the request names none.
    pub url: Option<String>,
    /// Lowercase hex SHA-256 of the raw (decoded) default image.
    pub sha256: Option<String>,
    /// A manifest naming the default image, instead of `url` + `sha256`.
    pub manifest_url: Option<String>,
    /// When not empty, image and manifest URLs must lie under one of these.
    pub allowed_urls: AllowedUrls,
    /// Minisign public keys; when set, manifests must carry a valid signature.
    pub trusted_keys: Vec<String>,
    /// Whether API requests may name `file://` images and manifests (off by
    /// default: a request must not make the agent read files of the node).
    pub allow_local_files: bool,
    /// Bytes the prefetched (staged) images may take in all, as fetched;
    /// making room evicts the least recently used. 0 turns prefetching off.
    pub prefetch_budget: u64,
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig {
            url: None,
            sha256: None,
            manifest_url: None,
            allowed_urls: AllowedUrls::default(),
            trusted_keys: Vec::new(),
            allow_local_files: false,
            prefetch_budget: DEFAULT_PREFETCH_BUDGET,
        }
    }
}

/// `[tasks]`: where local tasks run and how long their data is kept.
#[derive(Debug, Clone)]
pub struct TasksSection {
    /// Task working directories; `state_dir/tasks` by default.
    pub work_dir: PathBuf,
    /// How long a finished task's directory is kept when the task does not
    /// say (`retentionTime`); `P7D` by default.
    pub default_retention: Duration,
    /// Time between SIGTERM and SIGKILL when stopping a task; `PT30S` by default.
    pub kill_grace: Duration,
    /// Tasks running at once (the node's task slots); one per CPU when unset.
    pub max_running: Option<std::num::NonZeroUsize>,
    /// The account pool-scoped unprivileged tasks run as; `reimage-task`
    /// by default (task-scoped ones get a uid of their own).
    pub user: String,
}

/// `[reboot]`: how the node boots into a new image.
#[derive(Debug, Clone)]
pub struct RebootConfig {
    /// `none`, `systemd` or `syscall`. Required: a default that reboots
    /// would surprise a lab, one that does not would strand a fleet node.
    pub method: RebootMethod,
    /// Where the firmware's variables are (efivarfs). A node whose
    /// `efivars` directory exists booted through UEFI, and a reimage of a
    /// block device there writes the boot entry of the new image.
    pub efivars: PathBuf,
}

/// Where Linux mounts efivarfs.
pub const DEFAULT_EFIVARS: &str = "/sys/firmware/efi/efivars";

impl Config {
    /// Reads, parses and validates the config at `path`, and checks that the
    /// TLS files it names can be read. Every failure is `ConfigInvalid`,
    /// naming `path`.
    pub fn load(path: &Path) -> Result<Config> {
        let origin = path.display().to_string();
        let text = fs::read_to_string(path)
            .map_err(|e| Error::ConfigInvalid(format!("{origin}: cannot read: {e}")))?;
        let config = Config::parse(&text, &origin)?;
        for (key, file) in [
            ("tls_cert", &config.api.tls_cert),
            ("tls_key", &config.api.tls_key),
            ("client_ca", &config.api.client_ca),
        ] {
            if let Some(file) = file {
                // Found now rather than when the first client connects.
                fs::File::open(file).map_err(|e| {
                    Error::ConfigInvalid(format!(
                        "{origin}: [api] {key}: cannot read {}: {e}",
                        file.display()
                    ))
                })?;
            }
        }
        Ok(config)
    }

    /// Parses and validates config text; `origin` (the file name) starts
    /// every error message: `ORIGIN: line L, column C: KEY: what is wrong`.
    pub fn parse(text: &str, origin: &str) -> Result<Config> {
        let invalid = |path: &str, e: &toml::de::Error| {
            Error::ConfigInvalid(format!("{origin}: {}", describe_toml_error(path, e, text)))
        };
        let de = toml::Deserializer::parse(text).map_err(|e| invalid(".", &e))?;
        // The path names the key a value error is about; toml's own error
        // only carries the span.
        let file: ConfigFile = serde_path_to_error::deserialize(de)
            .map_err(|e| invalid(&e.path().to_string(), e.inner()))?;
        let config = Config::from_file(file);
        config
            .validate()
            .map_err(|e| Error::ConfigInvalid(format!("{origin}: {e}")))?;
        for warning in config.warnings() {
            tracing::warn!("{origin}: {warning}");
        }
        Ok(config)
    }

    /// The file's values with every default filled in.
    fn from_file(file: ConfigFile) -> Config {
        let state_dir = file
            .agent
            .state_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        Config {
            agent: AgentConfig {
                node_id: file.agent.node_id.unwrap_or_else(hostname),
                state_dir: state_dir.clone(),
            },
            api: ApiConfig {
                listen: file
                    .api
                    .listen
                    .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 7480))),
                tls_cert: file.api.tls_cert,
                tls_key: file.api.tls_key,
                client_ca: file.api.client_ca,
                tokens: file
                    .api
                    .tokens
                    .into_iter()
                    .map(|t| Token {
                        sha256: t.sha256,
                        role: t.role,
                    })
                    .collect(),
            },
            disk: DiskConfig {
                target: file.disk.target,
                save_partlabel: file.disk.save_partlabel,
                save_partindex: file.disk.save_partindex,
                staging: file.disk.staging,
            },
            image: ImageConfig {
                url: file.image.url,
                sha256: file.image.sha256,
                manifest_url: file.image.manifest_url,
                allowed_urls: file.image.allowed_urls,
                trusted_keys: file.image.trusted_keys,
                allow_local_files: file.image.allow_local_files.unwrap_or(false),
                prefetch_budget: file
                    .image
                    .prefetch_budget_mib
                    .map_or(DEFAULT_PREFETCH_BUDGET, |mib| mib.saturating_mul(1 << 20)),
            },
            tasks: TasksSection {
                work_dir: file
                    .tasks
                    .work_dir
                    .unwrap_or_else(|| state_dir.join("tasks")),
                default_retention: file.tasks.default_retention.unwrap_or(DEFAULT_RETENTION),
                kill_grace: file.tasks.kill_grace.unwrap_or(DEFAULT_KILL_GRACE),
                max_running: file.tasks.max_running,
                user: file
                    .tasks
                    .user
                    .unwrap_or_else(|| crate::tasks::DEFAULT_TASK_USER.to_owned()),
            },
            reboot: RebootConfig {
                method: file.reboot.method,
                efivars: file
                    .reboot
                    .efivars
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_EFIVARS)),
            },
        }
    }

    /// Checks beyond syntax: what each key's type cannot say on its own, and
    /// how keys depend on each other.
    fn validate(&self) -> std::result::Result<(), String> {
        let node_id = &self.agent.node_id;
        if node_id.is_empty() {
            return Err(
                "[agent] node_id: not set, and the hostname cannot be read to stand for it".into(),
            );
        }
        // The id is a path segment of the seed routes and a label in metrics.
        if node_id.len() > 128
            || !node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "[agent] node_id: {node_id:?} must be 1 to 128 letters, digits, '-', '_' or '.'"
            ));
        }
        require_absolute("[agent] state_dir", &self.agent.state_dir)?;

        let api = &self.api;
        match (&api.tls_cert, &api.tls_key) {
            (Some(_), None) => {
                return Err("[api] tls_cert is set without tls_key: set both or neither".into());
            }
            (None, Some(_)) => {
                return Err("[api] tls_key is set without tls_cert: set both or neither".into());
            }
            _ => {}
        }
        if api.client_ca.is_some() && api.tls_cert.is_none() {
            return Err(
                "[api] client_ca needs tls_cert and tls_key: client certificates need TLS".into(),
            );
        }
        for (i, token) in api.tokens.iter().enumerate() {
            if api.tokens[..i].iter().any(|t| t.sha256 == token.sha256) {
                return Err(format!(
                    "[[api.tokens]] #{}: sha256 {} is configured twice",
                    i + 1,
                    hex::encode(token.sha256)
                ));
            }
        }

        require_absolute("[disk] target", &self.disk.target)?;
        for pattern in &self.disk.save_partlabel {
            glob::Pattern::new(pattern)
                .map_err(|e| format!("[disk] save_partlabel: {pattern:?} is not a glob: {e}"))?;
        }
        if self.disk.save_partindex.contains(&0) {
            return Err("[disk] save_partindex: partition indexes start at 1".into());
        }

        let image = &self.image;
        if image.url.is_some() && image.manifest_url.is_some() {
            return Err("[image] url and manifest_url are both set: set one of them".into());
        }
        match (&image.url, &image.sha256) {
            (Some(_), None) => {
                return Err(
                    "[image] url is set without sha256: the image could not be verified".into(),
                );
            }
            (None, Some(_)) => return Err("[image] sha256 is set without url".into()),
            _ => {}
        }
        for (key, url) in [("url", &image.url), ("manifest_url", &image.manifest_url)] {
            if let Some(url) = url
                && !image.allowed_urls.allows(url)
            {
                return Err(format!(
                    "[image] {key}: {url:?} is not under any of allowed_urls"
                ));
            }
        }
        if image.trusted_keys.iter().any(|key| key.trim().is_empty()) {
            return Err("[image] trusted_keys: an entry is empty".into());
        }

        require_absolute("[tasks] work_dir", &self.tasks.work_dir)?;
        if self.tasks.user.trim().is_empty() {
            return Err("[tasks] user: the name is empty".into());
        }
        Ok(())
    }

    /// Settings that are allowed but probably not meant.
    fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.api.tokens.is_empty() {
            warnings
                .push("no [[api.tokens]]: no one can call the API (only /healthz answers)".into());
        }
        if self.disk.save_partlabel.is_empty() && self.disk.save_partindex.is_empty() {
            warnings
                .push("[disk] saves no partition: a reimage overwrites the whole target".into());
        }
        if self.tasks.kill_grace > KILL_GRACE_WITHIN_UNIT {
            warnings.push(format!(
                "[tasks] kill_grace is {}s: raise TimeoutStopSec in the systemd unit above it",
                self.tasks.kill_grace.as_secs()
            ));
        }
        warnings
    }
}

/// `ORIGIN`-less half of a TOML error: `line L, column C: KEY: message`.
/// toml's own Display spans several lines with a source excerpt; one line
/// fits the CLI's `error:` line and the API's error message.
fn describe_toml_error(path: &str, inner: &toml::de::Error, text: &str) -> String {
    let mut out = String::new();
    if let Some(span) = inner.span() {
        let (line, column) = line_column(text, span.start);
        out.push_str(&format!("line {line}, column {column}: "));
    }
    let message = inner.message().trim_end();
    // For an unknown key, the path already ends with the key itself.
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let expected = rest.split_once(", ").map(|(_, expected)| expected);
        out.push_str(&format!("unknown key `{path}`"));
        if let Some(expected) = expected {
            out.push_str(&format!(", {expected}"));
        }
    } else if path == "." {
        out.push_str(message);
    } else {
        out.push_str(&format!("{path}: {message}"));
    }
    out
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

fn require_absolute(key: &str, path: &Path) -> std::result::Result<(), String> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(format!(
            "{key}: {} must be an absolute path",
            path.display()
        ))
    }
}

/// The kernel's hostname, or empty when it cannot be read (then
/// validation asks for `node_id`).
pub(crate) fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_default()
}
