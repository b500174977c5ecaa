//! `reimage-agent check-config PATH`: validates a config file the way
//! `serve` would load it, and says what it would run with.

use anyhow::Context;
use clap::Args;
use reimage_agent::Error;
use reimage_agent::api::auth::Role;
use reimage_agent::config::Config;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The config file (normally /etc/reimage-agent/agent.toml).
    pub path: PathBuf,
}

/// Prints `PATH: ok` and a summary, or fails with
/// `PATH: ConfigInvalid: line L, column C: KEY: what is wrong`.
pub fn run(args: CheckConfigArgs) -> anyhow::Result<()> {
    let origin = args.path.display().to_string();
    let config = Config::load(&args.path).map_err(|err| match err {
        // The message starts with the path; the CLI puts it before the
        // code instead, as for every other error line.
        Error::ConfigInvalid(message) => {
            let detail = message
                .strip_prefix(&format!("{origin}: "))
                .unwrap_or(&message)
                .to_string();
            anyhow::Error::new(Error::ConfigInvalid(detail)).context(origin.clone())
        }
        other => anyhow::Error::new(other).context(origin.clone()),
    })?;
    // The certificate and key must also parse and belong together, as
    // serve will require: a config that passes here must start.
    reimage_agent::api::tls::server_config(&config.api).context(origin.clone())?;
    println!("{origin}: ok");
    print!("{}", summary(&config));
    Ok(())
}

/// What the agent would run with, one setting a line.
fn summary(config: &Config) -> String {
    let api = &config.api;
    let tls = match (&api.tls_cert, &api.client_ca) {
        (None, _) => "",
        (Some(_), None) => " (https)",
        (Some(_), Some(_)) => " (https, client certificates required)",
    };
    let tokens = Role::ALL
        .iter()
        .rev()
        .map(|role| {
            let count = api.tokens.iter().filter(|t| t.role == *role).count();
            format!("{count} {role}")
        })
        .collect::<Vec<_>>()
        .join(", ");
    let disk = &config.disk;
    let saved = disk
        .save_partlabel
        .iter()
        .map(|label| format!("label {label}"))
        .chain(disk.save_partindex.iter().map(|i| format!("index {i}")))
        .collect::<Vec<_>>();
    let saved = if saved.is_empty() {
        "nothing".to_string()
    } else {
        saved.join(", ")
    };
    let reboot = clap::ValueEnum::to_possible_value(&config.reboot.method)
        .map(|value| value.get_name().to_string())
        .unwrap_or_else(|| format!("{:?}", config.reboot.method));
    [
        ("node id", config.agent.node_id.clone()),
        ("state dir", config.agent.state_dir.display().to_string()),
        ("listen", format!("{}{tls}", api.listen)),
        ("tokens", tokens),
        ("target", disk.target.display().to_string()),
        ("saved", saved),
        ("reboot", reboot),
    ]
    .iter()
    .map(|(name, value)| format!("  {:<10} {value}\n", format!("{name}:")))
    .collect()
}
