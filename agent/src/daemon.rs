//! `reimage-agent serve`: the store, the tasks, the operations and the API
//! (HTTP, or HTTPS with optional client certificates), wired together under
//! systemd's eye (READY, WATCHDOG, STOPPING).

use crate::api::tls::{self, TlsListener};
use crate::api::{self, ApiState};
use crate::config::Config;
use crate::disk::gpt::format_guid;
use crate::disk::saved::SavedPartitions;
use crate::ops::Agent;
use crate::service;
use crate::store::Store;
use crate::tasks::{TaskManager, TasksConfig};
use crate::{Error, Result};
use reimage_protocol::api::{DiskInfo, SavedPartitionInfo};
use std::sync::Arc;

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn serve(config: Config) -> Result<()> {
    Daemon::start(config)
        .await?
        .run_until(shutdown_signal())
        .await
}

/// A started daemon: state loaded, operations recovered, socket bound.
pub struct Daemon {
    agent: Arc<Agent>,
    router: axum::Router,
    listener: tokio::net::TcpListener,
    /// `Some` when `[api] tls_cert` is set: the API speaks HTTPS only.
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Where the API listens (useful with port 0).
    pub address: std::net::SocketAddr,
}

impl Daemon {
    /// Loads the TLS identity (if any), opens the store, starts the tasks,
    /// recovers operations and binds `[api] listen`.
    pub async fn start(config: Config) -> Result<Daemon> {
        // Bad certificate files stop the agent before it touches its state.
        let tls = tls::server_config(&config.api)?;
        // Whatever the agent creates (store, staging, handoff files) is
        // private: unprivileged tasks may search the state directory on
        // the way to their own (see tasks::dirs). Tasks get 022 back.
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let store = Arc::new(Store::open(&config.agent.state_dir)?);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let tasks = TaskManager::start_with_limit(
            Arc::clone(&store),
            TasksConfig {
                work_dir: config.tasks.work_dir.clone(),
                default_retention: config.tasks.default_retention,
                kill_grace: config.tasks.kill_grace,
                user: config.tasks.user.clone(),
                state_dir: Some(config.agent.state_dir.clone()),
                node_id: config.agent.node_id.clone(),
            },
            config.tasks.max_running.map_or(cpus, |n| n.get()),
        )
        .await?;
        let disk = describe_disk(&config);
        let agent = Agent::start(config.clone(), store, tasks, disk)?;
        let listener = tokio::net::TcpListener::bind(config.api.listen)
            .await
            .map_err(|e| Error::io(format!("listening on {}", config.api.listen), e))?;
        let address = listener
            .local_addr()
            .map_err(|e| Error::io("reading the listening address", e))?;
        tracing::info!(
            %address,
            tls = tls.is_some(),
            client_certificates = config.api.client_ca.is_some(),
            node = %config.agent.node_id,
            target = %config.disk.target.display(),
            "serving the API"
        );
        let router = api::router(ApiState {
            agent: Arc::clone(&agent),
            tokens: Arc::new(config.api.tokens.clone()),
            scheme: if tls.is_some() { "https" } else { "http" },
        });
        Ok(Daemon {
            agent,
            router,
            listener,
            tls,
            address,
        })
    }

    /// Serves until `shutdown` resolves, telling systemd where it stands.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        service::notify_ready(&format!("serving {scheme} on {}", self.address));
        service::spawn_watchdog();
        // Either way axum stops accepting on `shutdown` and lets in-flight
        // requests finish before returning.
        let served = match self.tls {
            None => {
                axum::serve(self.listener, self.router)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
            Some(config) => {
                let listener = TlsListener::new(self.listener, config)
                    .map_err(|e| Error::io("reading the listening address", e))?;
                axum::serve(listener, self.router)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
        };
        served.map_err(|e| Error::io("serving the API", e))?;
        service::notify_stopping();
        self.agent.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The target and its saved partitions as `GET /v1/node` shows them. A
/// target that cannot be read is logged, not fatal: the API must come up to
/// report it.
fn describe_disk(config: &Config) -> DiskInfo {
    let target = config.disk.target.display().to_string();
    let read = || -> Result<DiskInfo> {
        let (size_bytes, saved) =
            SavedPartitions::read_from_target(&config.disk.target, &config.disk.save_spec())?;
        let sector = saved.sector_size();
        Ok(DiskInfo {
            target: target.clone(),
            size_bytes,
            saved_partitions: saved
                .iter()
                .map(|p| SavedPartitionInfo {
                    index: p.index,
                    label: p.label().to_string(),
                    guid: format_guid(&p.entry.unique_partition_guid),
                    start_bytes: p.entry.starting_lba * sector,
                    size_bytes: (p.entry.ending_lba + 1 - p.entry.starting_lba) * sector,
                })
                .collect(),
        })
    };
    read().unwrap_or_else(|err| {
        tracing::warn!(%target, %err, "cannot describe the target disk");
        DiskInfo {
            target: target.clone(),
            size_bytes: 0,
            saved_partitions: Vec::new(),
        }
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot listen for SIGTERM/SIGINT; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
}
