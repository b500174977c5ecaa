//! The shape of `agent.toml` as written: every key optional where the file
//! may leave it out, leaf values parsed by the agent's one parser for
//! their kind (durations, SHA-256s), unknown keys refused. What depends on
//! other keys and every default is decided in [`super::Config::from_file`].

use crate::api::auth::Role;
use crate::duration::parse_duration;
use crate::handoff::stage::StagingChoice;
use crate::image::digest::{parse_sha256, parse_sha256_hex};
use crate::reboot::RebootMethod;
use serde::{Deserialize, Deserializer};
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ConfigFile {
    #[serde(default)]
    pub agent: AgentFile,
    #[serde(default)]
    pub api: ApiFile,
    pub disk: DiskFile,
    #[serde(default)]
    pub image: ImageFile,
    #[serde(default)]
    pub tasks: TasksFile,
    pub reboot: RebootFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AgentFile {
    pub node_id: Option<String>,
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ApiFile {
    pub listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    #[serde(default)]
    pub tokens: Vec<TokenFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TokenFile {
    #[serde(deserialize_with = "sha256_bytes")]
    pub sha256: [u8; 32],
    pub role: Role,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DiskFile {
    pub target: PathBuf,
    #[serde(default)]
    pub save_partlabel: Vec<String>,
    #[serde(default)]
    pub save_partindex: Vec<u32>,
    #[serde(default)]
    pub staging: StagingChoice,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ImageFile {
    pub url: Option<String>,
    #[serde(default, deserialize_with = "optional_sha256_hex")]
    pub sha256: Option<String>,
    pub manifest_url: Option<String>,
    #[serde(default, deserialize_with = "url_prefixes")]
    pub allowed_urls: crate::image::allowed_urls::AllowedUrls,
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    pub allow_local_files: Option<bool>,
    pub prefetch_budget_mib: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TasksFile {
    pub work_dir: Option<PathBuf>,
    #[serde(default, deserialize_with = "optional_duration")]
    pub default_retention: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    pub kill_grace: Option<Duration>,
    pub max_running: Option<NonZeroUsize>,
    pub user: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RebootFile {
    pub method: RebootMethod,
    pub efivars: Option<PathBuf>,
}

fn optional_duration<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(de)?;
    parse_duration(&text)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("{text:?}: {e}")))
}

fn sha256_bytes<'de, D: Deserializer<'de>>(de: D) -> Result<[u8; 32], D::Error> {
    let text = String::deserialize(de)?;
    parse_sha256(&text).map_err(serde::de::Error::custom)
}

fn optional_sha256_hex<'de, D: Deserializer<'de>>(de: D) -> Result<Option<String>, D::Error> {
    let text = String::deserialize(de)?;
    parse_sha256_hex(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn url_prefixes<'de, D: Deserializer<'de>>(
    de: D,
) -> Result<crate::image::allowed_urls::AllowedUrls, D::Error> {
    let prefixes = Vec::<String>::deserialize(de)?;
    crate::image::allowed_urls::AllowedUrls::parse(&prefixes).map_err(serde::de::Error::custom)
}
