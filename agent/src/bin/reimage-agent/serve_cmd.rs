//! `reimage-agent serve`: the daemon.

use anyhow::Context;
use clap::Args;
use reimage_agent::config::{self, Config};
use std::path::{Path, PathBuf};

/// The sandbox's state, relative to the working directory.
const SANDBOX_DIR: &str = "reimage-state";

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file. Without it, /etc/reimage-agent/agent.toml is
    /// used if it exists; otherwise a safe sandbox runs in ./reimage-state/
    /// (loopback only, a sparse disk file as target, no reboot).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = load(args.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(reimage_agent::daemon::serve(config))?;
    Ok(())
}

fn load(explicit: Option<&Path>) -> anyhow::Result<Config> {
    if let Some(path) = explicit {
        return Config::load(path).with_context(|| format!("loading {}", path.display()));
    }
    let default = Path::new(config::DEFAULT_CONFIG_PATH);
    if default.exists() {
        tracing::info!(
            config = config::DEFAULT_CONFIG_PATH,
            "using the system configuration"
        );
        return Config::load(default)
            .with_context(|| format!("loading {}", config::DEFAULT_CONFIG_PATH));
    }
    tracing::info!(dir = SANDBOX_DIR, "no configuration: running the sandbox");
    reimage_agent::sandbox::sandbox(Path::new(SANDBOX_DIR)).context("preparing the sandbox")
}
