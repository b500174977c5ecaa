//! The agent's configuration: `/etc/reimage-agent/agent.toml`, or the safe
//! sandbox `serve` runs with when it is given none.
//!
//! Every table refuses unknown keys: a misspelt `save_partlabel` must stop
//! the agent, not silently let a reimage overwrite the data it was meant to
//! keep. Errors name the file, the key and the line.

use crate::disk::gpt;
use crate::reboot::RebootMethod;
use crate::{Error, Result};
use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use subtle::{ConditionallySelectable, ConstantTimeEq};
use url::Url;

/// Where the daemon keeps its state when the config does not say.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/reimage-agent";
/// Where `serve` reads its config by default.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/reimage-agent/agent.toml";
/// The sandbox's file-backed target disk, inside its directory.
pub const SANDBOX_DISK_FILE: &str = "disk.img";
/// The sandbox's admin token (hex, mode 0600), inside its directory.
pub const SANDBOX_TOKEN_FILE: &str = "admin.token";
/// Size of the sandbox's sparse target disk.
pub const SANDBOX_DISK_SIZE: u64 = 8 << 30;
/// Size of the sandbox's `local-storage` partition at the end of its disk.
pub const SANDBOX_LOCAL_STORAGE_SIZE: u64 = 1 << 30;

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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The node's id in the API and the seed routes; the hostname by default.
    #[serde(default = "hostname")]
    pub node_id: String,
    /// Operations, tasks and timers; on a saved partition in production so
    /// they survive the reimage.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
}

/// `[api]`: where the HTTP API listens and who may call it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address and port to listen on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// PEM certificate chain; with `tls_key`, the API speaks HTTPS only.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle; when set, clients must present a certificate it signed.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// `[[api.tokens]]`: bearer tokens by their SHA-256, with a role each.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: default_listen(),
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            tokens: Vec::new(),
        }
    }
}

/// One `[[api.tokens]]` entry. Only the hash is configured, so the config
/// file never holds a credential.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// SHA-256 of the token as presented in `Authorization: Bearer <token>`.
    #[serde(deserialize_with = "sha256_bytes")]
    pub sha256: [u8; 32],
    /// What the token may do.
    pub role: Role,
}

/// What a caller may do; each role includes the ones below it
/// (`Admin > Operator > Reader`), so a route checks `role >= needed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// GET routes.
    Reader,
    /// Tasks and scheduling, plus everything a reader may do.
    Operator,
    /// Reimage and reboot, plus everything an operator may do.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 3] = [Role::Reader, Role::Operator, Role::Admin];

    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// A non-zero number per role, so [`role_for_token`] can select one
    /// without branching on a secret comparison.
    fn rank(self) -> u8 {
        match self {
            Role::Reader => 1,
            Role::Operator => 2,
            Role::Admin => 3,
        }
    }

    fn from_rank(rank: u8) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.rank() == rank)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[disk]`: the only disk the agent ever writes, and what on it to keep.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The target block device (a stable `/dev/disk/by-id/…` path) or file.
    pub target: PathBuf,
    /// Globs over partition labels whose partitions survive every reimage.
    #[serde(default)]
    pub save_partlabel: Vec<String>,
    /// 1-based partition indexes that survive every reimage.
    #[serde(default)]
    pub save_partindex: Vec<u32>,
    /// Where an in-place reimage (the target holds the running system)
    /// stages the image until the shutdown handoff writes it: `auto`
    /// (RAM when it fits, else `state_dir`), `memory` or `state_dir`.
    #[serde(default)]
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

/// `[image]`: the default image, and which images are acceptable at all.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// Image a reimage writes when the request names none.
    #[serde(default)]
    pub url: Option<String>,
    /// Lowercase hex SHA-256 of the raw (decoded) default image.
    #[serde(default, deserialize_with = "optional_sha256_hex")]
    pub sha256: Option<String>,
    /// A manifest naming the default image, instead of `url` + `sha256`.
    #[serde(default)]
    pub manifest_url: Option<String>,
    /// When not empty, image and manifest URLs must start with one of these
    /// (compared as URLs, see [`Config::allows_url`]).
    #[serde(default, deserialize_with = "url_prefixes")]
    pub allowed_urls: Vec<String>,
    /// Minisign public keys; when set, manifests must carry a valid signature.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebootConfig {
    /// `none`, `systemd` or `syscall`. Required: a default that reboots
    /// would surprise a lab, one that does not would strand a fleet node.
    pub method: RebootMethod,
}

/// The file's shape; [`Config::parse`] fills in what depends on other keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default = "default_agent")]
    agent: AgentConfig,
    #[serde(default)]
    api: ApiConfig,
    disk: DiskConfig,
    #[serde(default)]
    image: ImageConfig,
    #[serde(default)]
    tasks: TasksFile,
    reboot: RebootConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TasksFile {
    #[serde(default)]
    work_dir: Option<PathBuf>,
    #[serde(default = "default_retention", deserialize_with = "iso8601_duration")]
    default_retention: Duration,
    #[serde(default = "default_kill_grace", deserialize_with = "iso8601_duration")]
    kill_grace: Duration,
    #[serde(default)]
    max_running: Option<std::num::NonZeroUsize>,
    #[serde(default = "default_task_user")]
    user: String,
}

impl Default for TasksFile {
    fn default() -> Self {
        TasksFile {
            work_dir: None,
            default_retention: default_retention(),
            kill_grace: default_kill_grace(),
            max_running: None,
            user: default_task_user(),
        }
    }
}

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
        let work_dir = file
            .tasks
            .work_dir
            .unwrap_or_else(|| file.agent.state_dir.join("tasks"));
        let config = Config {
            agent: file.agent,
            api: file.api,
            disk: file.disk,
            image: file.image,
            tasks: TasksSection {
                work_dir,
                default_retention: file.tasks.default_retention,
                kill_grace: file.tasks.kill_grace,
                max_running: file.tasks.max_running,
                user: file.tasks.user,
            },
            reboot: file.reboot,
        };
        config
            .validate()
            .map_err(|e| Error::ConfigInvalid(format!("{origin}: {e}")))?;
        for warning in config.warnings() {
            tracing::warn!("{origin}: {warning}");
        }
        Ok(config)
    }

    /// `allowed_urls` as a policy for the HTTP client (first URL and every
    /// redirect); `None` when every URL is allowed.
    pub fn url_policy(&self) -> Option<crate::image::http::UrlPolicy> {
        if self.image.allowed_urls.is_empty() {
            return None;
        }
        let config = self.clone();
        Some(crate::image::http::UrlPolicy(std::sync::Arc::new(
            move |url: &url::Url| config.allows_url(url.as_str()),
        )))
    }

    /// True when `allowed_urls` is empty or `url` lies under one of them:
    /// same scheme, host and port, and a path under the prefix's path
    /// (whole segments: `/prod` allows `/prod/os.img`, not `/production`).
    /// Compared as parsed URLs, so `https://images.example.evil.com/` does
    /// not pass for `https://images.example`. Local paths never pass a
    /// non-empty list.
    pub fn allows_url(&self, url: &str) -> bool {
        let allowed = &self.image.allowed_urls;
        allowed.is_empty() || allowed.iter().any(|prefix| url_is_under(url, prefix))
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
                && !self.allows_url(url)
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

/// The sandbox `serve` runs without a config, set up in `dir` (created if
/// missing): listen on 127.0.0.1:7480, state in `dir`, target a sparse
/// 8 GiB file `dir/disk.img` whose GPT holds one 1 GiB `local-storage`
/// partition at its end (created only if missing), that partition saved,
/// reboot `none`, and one admin token: random, written to `dir/admin.token`
/// with mode 0600 (an existing one is reused). Logs where the token is.
pub fn sandbox(dir: &Path) -> Result<Config> {
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    // Absolute, so nothing depends on the working directory later.
    let dir = dir
        .canonicalize()
        .map_err(|e| Error::io(format!("resolving {}", dir.display()), e))?;

    let disk = dir.join(SANDBOX_DISK_FILE);
    let disk_exists = disk
        .try_exists()
        .map_err(|e| Error::io(format!("looking for {}", disk.display()), e))?;
    if !disk_exists {
        create_sandbox_disk(&disk)?;
        tracing::info!(path = %disk.display(), "created the sandbox's sparse target disk");
    }

    let token_path = dir.join(SANDBOX_TOKEN_FILE);
    let token = sandbox_admin_token(&token_path)?;
    tracing::info!(path = %token_path.display(), "sandbox admin token (Bearer) is in this file");

    Ok(Config {
        agent: AgentConfig {
            node_id: Some(hostname())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "sandbox".into()),
            state_dir: dir.clone(),
        },
        api: ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7480)),
            tokens: vec![TokenConfig {
                sha256: Sha256::digest(token.as_bytes()).into(),
                role: Role::Admin,
            }],
            ..ApiConfig::default()
        },
        disk: DiskConfig {
            target: disk,
            save_partlabel: vec!["local-storage".into()],
            save_partindex: Vec::new(),
            staging: Default::default(),
        },
        image: ImageConfig::default(),
        tasks: TasksSection {
            work_dir: dir.join("tasks"),
            default_retention: default_retention(),
            kill_grace: default_kill_grace(),
            max_running: None,
            user: default_task_user(),
        },
        reboot: RebootConfig {
            method: RebootMethod::None,
        },
    })
}

/// The role of the token a caller presented, or `None`. The token is hashed
/// and compared with every configured hash in constant time, without
/// stopping at a match, so timing tells nothing about which hash matched.
pub fn role_for_token(tokens: &[TokenConfig], presented: &str) -> Option<Role> {
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let mut rank = 0u8;
    for token in tokens {
        rank.conditional_assign(&token.role.rank(), digest.ct_eq(&token.sha256));
    }
    Role::from_rank(rank)
}

/// GPT type "Linux filesystem data" (0FC63DAF-8483-4772-8E79-3D69D8477DE4),
/// in the table's mixed-endian byte order.
const LINUX_FILESYSTEM_GUID: [u8; 16] = [
    0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4,
];

/// Writes the sandbox disk under a temporary name and renames it into
/// place, so a crash never leaves a `disk.img` without its table.
fn create_sandbox_disk(path: &Path) -> Result<()> {
    const SECTOR: u64 = 512;
    const ALIGN: u64 = (1 << 20) / SECTOR;
    let partial = path.with_extension("img.partial");
    let context = |what: &str| format!("{what} {}", partial.display());
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&partial)
        .map_err(|e| Error::io(context("creating"), e))?;
    // set_len on an empty file allocates nothing: the disk stays sparse.
    file.set_len(SANDBOX_DISK_SIZE)
        .map_err(|e| Error::io(context("sizing"), e))?;

    let invalid = |e: gptman::Error| Error::PartitionTableInvalid(format!("sandbox disk: {e}"));
    let mut table =
        gptman::GPT::new_from(&mut file, SECTOR, gpt::random_guid()?).map_err(invalid)?;
    let sectors = SANDBOX_LOCAL_STORAGE_SIZE / SECTOR;
    let start = (table.header.last_usable_lba + 1 - sectors) / ALIGN * ALIGN;
    table[1] = gptman::GPTPartitionEntry {
        partition_type_guid: LINUX_FILESYSTEM_GUID,
        unique_partition_guid: gpt::random_guid()?,
        starting_lba: start,
        ending_lba: start + sectors - 1,
        attribute_bits: 0,
        partition_name: "local-storage".into(),
    };
    gptman::GPT::write_protective_mbr_into(&mut file, SECTOR).map_err(invalid)?;
    table.write_into(&mut file).map_err(invalid)?;
    file.sync_all()
        .map_err(|e| Error::io(context("syncing"), e))?;
    fs::rename(&partial, path)
        .map_err(|e| Error::io(format!("renaming {} into place", partial.display()), e))
}

/// Reads the sandbox token at `path`, or creates it: written to a
/// temporary file made with mode 0600 (never readable by others, even
/// briefly), then hard-linked into place, which fails rather than replace
/// a token another agent created meanwhile.
fn sandbox_admin_token(path: &Path) -> Result<String> {
    if let Some(token) = read_sandbox_token(path)? {
        return Ok(token);
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::io("drawing the sandbox token", io::Error::other(e.to_string())))?;
    let token = hex::encode(bytes);

    let partial = path.with_extension("token.partial");
    let context = |what: &str| format!("{what} {}", partial.display());
    match fs::remove_file(&partial) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(context("removing a stale"), e)),
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| Error::io(context("creating"), e))?;
    file.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(context("writing"), e))?;
    let linked = fs::hard_link(&partial, path);
    // The temporary name goes either way; the token lives on under `path`.
    let _ = fs::remove_file(&partial);
    match linked {
        Ok(()) => Ok(token),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => read_sandbox_token(path)?
            .ok_or_else(|| Error::io(format!("reading {}", path.display()), e)),
        Err(e) => Err(Error::io(format!("creating {}", path.display()), e)),
    }
}

/// The token in an existing token file; tightens a file others can read.
fn read_sandbox_token(path: &Path) -> Result<Option<String>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    let token = text.trim();
    if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::ConfigInvalid(format!(
            "{}: not a sandbox token (64 hex digits); delete it to get a new one",
            path.display()
        )));
    }
    let mode = fs::metadata(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "token file was readable by others; setting mode 0600");
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("setting the mode of {}", path.display()), e))?;
    }
    Ok(Some(token.to_string()))
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

fn url_is_under(url: &str, prefix: &str) -> bool {
    let (Ok(url), Ok(prefix)) = (Url::parse(url), Url::parse(prefix)) else {
        return false;
    };
    url.scheme() == prefix.scheme()
        && url.host().is_some()
        && url.host() == prefix.host()
        && url.port_or_known_default() == prefix.port_or_known_default()
        && path_is_under(url.path(), prefix.path())
}

fn path_is_under(path: &str, prefix: &str) -> bool {
    if prefix.ends_with('/') {
        path.starts_with(prefix)
    } else {
        path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'))
    }
}

/// The kernel's hostname, or empty when it cannot be read (then
/// validation asks for `node_id`).
fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn default_agent() -> AgentConfig {
    AgentConfig {
        node_id: hostname(),
        state_dir: default_state_dir(),
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7480))
}

fn default_retention() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

fn default_kill_grace() -> Duration {
    Duration::from_secs(30)
}

fn default_task_user() -> String {
    crate::tasks::DEFAULT_TASK_USER.to_owned()
}

/// Parses an ISO 8601 duration (`P7D`, `PT30S`, `PT1H30M`). Days count as
/// 24 hours; years, months and negative durations have no fixed length
/// here and are refused.
pub fn parse_iso8601_duration(text: &str) -> std::result::Result<Duration, String> {
    // The strict ISO 8601 parser: jiff's `FromStr` also takes "7 days",
    // which the API (ISO 8601 only) would then refuse for the same value.
    let span = jiff::fmt::temporal::SpanParser::new()
        .parse_span(text)
        .map_err(|e| format!("{text:?} is not an ISO 8601 duration like P7D or PT30S: {e}"))?;
    let signed = span
        .to_duration(jiff::SpanRelativeTo::days_are_24_hours())
        .map_err(|e| {
            format!("{text:?} has no fixed length (use days, hours, minutes, seconds): {e}")
        })?;
    Duration::try_from(signed).map_err(|_| format!("{text:?} is negative"))
}

fn iso8601_duration<'de, D: Deserializer<'de>>(de: D) -> std::result::Result<Duration, D::Error> {
    let text = String::deserialize(de)?;
    parse_iso8601_duration(&text).map_err(serde::de::Error::custom)
}

fn sha256_bytes<'de, D: Deserializer<'de>>(de: D) -> std::result::Result<[u8; 32], D::Error> {
    let text = String::deserialize(de)?;
    parse_sha256(&text).map_err(serde::de::Error::custom)
}

fn optional_sha256_hex<'de, D: Deserializer<'de>>(
    de: D,
) -> std::result::Result<Option<String>, D::Error> {
    let text = String::deserialize(de)?;
    parse_sha256(&text)
        .map(|bytes| Some(hex::encode(bytes)))
        .map_err(serde::de::Error::custom)
}

/// 32 bytes from 64 hex digits. The value is not echoed: a token pasted
/// here by mistake must not end up in logs.
fn parse_sha256(text: &str) -> std::result::Result<[u8; 32], String> {
    let mut bytes = [0u8; 32];
    if text.len() != 64 {
        return Err(format!(
            "expected a SHA-256 as 64 hex digits, got {} characters",
            text.chars().count()
        ));
    }
    hex::decode_to_slice(text, &mut bytes).map_err(|_| {
        "expected a SHA-256 as 64 hex digits, found a non-hex character".to_string()
    })?;
    Ok(bytes)
}

fn url_prefixes<'de, D: Deserializer<'de>>(de: D) -> std::result::Result<Vec<String>, D::Error> {
    let prefixes = Vec::<String>::deserialize(de)?;
    for prefix in &prefixes {
        let url = Url::parse(prefix)
            .map_err(|e| serde::de::Error::custom(format!("{prefix:?} is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(serde::de::Error::custom(format!(
                "{prefix:?} must be an http:// or https:// URL with a host"
            )));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(serde::de::Error::custom(format!(
                "{prefix:?}: a prefix has no query or fragment"
            )));
        }
    }
    Ok(prefixes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const EXAMPLE: &str = include_str!("../../systemd/agent.toml");

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
        assert!(config.allows_url(config.image.url.as_deref().expect("url")));
    }

    #[test]
    fn left_out_keys_take_their_defaults() {
        let config = Config::parse(&minimal(""), "agent.toml").expect("valid");
        assert_eq!(config.agent.node_id, hostname());
        assert_eq!(config.agent.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert_eq!(config.api.listen, default_listen());
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
    fn iso8601_durations_count_days_as_24_hours() {
        assert_eq!(
            parse_iso8601_duration("P7D"),
            Ok(Duration::from_secs(604_800))
        );
        assert_eq!(
            parse_iso8601_duration("PT1H30M"),
            Ok(Duration::from_secs(5400))
        );
        assert_eq!(
            parse_iso8601_duration("PT0.5S"),
            Ok(Duration::from_millis(500))
        );
        assert!(parse_iso8601_duration("-PT1S").is_err());
        assert!(parse_iso8601_duration("30s").is_err());
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
    fn allowed_urls_compare_scheme_host_port_and_whole_path_segments() {
        let text = minimal(
            "[image]\nallowed_urls = [\"https://images.example\", \"http://mirror.example:8080/fleet/os\"]\n",
        );
        let config = Config::parse(&text, "agent.toml").expect("valid");
        for allowed in [
            "https://images.example/os.img",
            "https://IMAGES.example/a/b.zst",
            "https://images.example:443/os.img",
            "http://mirror.example:8080/fleet/os/x.raw",
            "http://mirror.example:8080/fleet/os",
        ] {
            assert!(config.allows_url(allowed), "{allowed} must be allowed");
        }
        for refused in [
            "https://images.example.evil.com/os.img",
            "https://images.example@evil.com/os.img",
            "http://images.example/os.img",
            "https://images.example:8443/os.img",
            "http://mirror.example:8080/fleet/osx/x.raw",
            "http://mirror.example:8080/fleet/os/../../secret",
            "http://mirror.example/fleet/os/x.raw",
            "/srv/images/os.img",
            "not a url",
        ] {
            assert!(!config.allows_url(refused), "{refused} must be refused");
        }
        let open = Config::parse(&minimal(""), "agent.toml").expect("valid");
        assert!(open.allows_url("/srv/images/os.img"), "no list allows all");
    }

    #[test]
    fn tokens_map_to_their_roles() {
        let hash = |t: &str| -> [u8; 32] { Sha256::digest(t.as_bytes()).into() };
        let tokens = [
            TokenConfig {
                sha256: hash("r"),
                role: Role::Reader,
            },
            TokenConfig {
                sha256: hash("o"),
                role: Role::Operator,
            },
            TokenConfig {
                sha256: hash("a"),
                role: Role::Admin,
            },
        ];
        assert_eq!(role_for_token(&tokens, "r"), Some(Role::Reader));
        assert_eq!(role_for_token(&tokens, "o"), Some(Role::Operator));
        assert_eq!(role_for_token(&tokens, "a"), Some(Role::Admin));
        assert_eq!(role_for_token(&tokens, "x"), None);
        assert_eq!(role_for_token(&tokens, ""), None);
        assert_eq!(role_for_token(&[], "a"), None);
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Reader);
    }

    #[test]
    fn a_token_hash_configured_twice_is_refused() {
        let entry = "[[api.tokens]]\nsha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nrole = \"reader\"\n";
        let message = error_of(&minimal(&format!("{entry}{entry}")));
        assert!(message.contains("configured twice"), "{message}");
    }

    #[test]
    fn the_sandbox_makes_a_sparse_disk_and_a_private_token_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("reimage-state");
        let config = sandbox(&dir).expect("sandbox");

        assert_eq!(config.api.listen, "127.0.0.1:7480".parse().expect("addr"));
        assert_eq!(config.reboot.method, RebootMethod::None);
        assert_eq!(config.disk.save_partlabel, ["local-storage"]);
        assert!(config.agent.state_dir.is_absolute());

        let disk = dir.join(SANDBOX_DISK_FILE);
        assert_eq!(config.disk.target, disk.canonicalize().expect("disk"));
        let meta = fs::metadata(&disk).expect("disk exists");
        assert_eq!(meta.len(), SANDBOX_DISK_SIZE);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "sparse: {} blocks",
            meta.blocks()
        );
        let table = gptman::GPT::find_from(&mut fs::File::open(&disk).expect("open"))
            .expect("GPT on the sandbox disk");
        let (index, part) = table
            .iter()
            .find(|(_, p)| p.is_used())
            .expect("a partition");
        assert_eq!(index, 1);
        assert_eq!(part.partition_name.as_str(), "local-storage");
        assert_eq!(part.size().expect("size") * 512, SANDBOX_LOCAL_STORAGE_SIZE);
        assert!(
            part.ending_lba + 2048 > table.header.last_usable_lba,
            "at the end"
        );
        assert_eq!(
            gpt::format_guid(&part.partition_type_guid),
            "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
        );

        let token_path = dir.join(SANDBOX_TOKEN_FILE);
        let token_meta = fs::metadata(&token_path).expect("token file");
        assert_eq!(token_meta.permissions().mode() & 0o777, 0o600);
        let token = fs::read_to_string(&token_path).expect("token");
        let token = token.trim();
        assert_eq!(token.len(), 64);
        assert_eq!(role_for_token(&config.api.tokens, token), Some(Role::Admin));
        assert!(!dir.join("admin.token.partial").exists());

        // A second start reuses both: same token, same disk (its data kept).
        fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .and_then(|f| {
                use std::os::unix::fs::FileExt;
                f.write_all_at(b"kept", 4 << 30)
            })
            .expect("mark the disk");
        let again = sandbox(&dir).expect("sandbox again");
        assert_eq!(again.api.tokens, config.api.tokens);
        assert_eq!(
            fs::read_to_string(&token_path).expect("token").trim(),
            token
        );
        let mut mark = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(
            &fs::File::open(&disk).expect("open"),
            &mut mark,
            4 << 30,
        )
        .expect("read");
        assert_eq!(&mark, b"kept");
    }

    #[test]
    fn a_token_file_others_can_read_is_tightened() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join(SANDBOX_TOKEN_FILE);
        fs::write(&path, format!("{}\n", "ab".repeat(32))).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let token = sandbox_admin_token(&path).expect("reused");
        assert_eq!(token, "ab".repeat(32));
        let mode = fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        fs::write(&path, "short\n").expect("write");
        assert_eq!(
            sandbox_admin_token(&path).expect_err("malformed").code(),
            "ConfigInvalid"
        );
    }

    #[test]
    fn line_and_column_count_from_one() {
        assert_eq!(line_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
        assert_eq!(line_column("é\nx", 3), (2, 1));
    }
}
