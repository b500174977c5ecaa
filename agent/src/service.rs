//! Living under systemd: logs to the journal, and the `sd_notify` protocol
//! (READY, STATUS, WATCHDOG, STOPPING) the `Type=notify` unit relies on.
//!
//! Everything here also works outside systemd, doing nothing: the same
//! binary runs in a lab shell, a container or a test.

use sd_notify::NotifyState;
use std::io::IsTerminal;
use std::time::Duration;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global logger: the journal (with levels and fields) when
/// systemd connected stderr to it, otherwise plain lines on stderr.
/// `RUST_LOG` overrides `default_level` (e.g. `info`, `reimage_agent=debug`).
/// A second call keeps the first logger.
pub fn init_logging(default_level: &str) {
    let filter =
        || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let mut journal_error = None;
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(journal) => {
                let _ = tracing_subscriber::registry()
                    .with(filter())
                    .with(journal)
                    .try_init();
                return;
            }
            Err(e) => journal_error = Some(e),
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
    if let Some(e) = journal_error {
        tracing::warn!("cannot log to the journal, logging to stderr: {e}");
    }
}

/// True when `JOURNAL_STREAM` names the very stream stderr is: systemd
/// sets it for the service, but children of a service (a shell started
/// from it) inherit the variable with another stderr.
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (
        dev.parse::<nix::libc::dev_t>(),
        ino.parse::<nix::libc::ino_t>(),
    ) else {
        return false;
    };
    nix::sys::stat::fstat(std::io::stderr()).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

/// Tells systemd the daemon is up (`READY=1`), with a status line for
/// `systemctl status`. Without `NOTIFY_SOCKET`, does nothing.
pub fn notify_ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Updates the status line `systemctl status` shows.
pub fn notify_status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// Tells systemd the daemon is shutting down (`STOPPING=1`), so a slow
/// stop (tasks in their kill grace) is not taken for a hang.
pub fn notify_stopping() {
    notify(&[NotifyState::Stopping]);
}

/// Starts a task that sends `WATCHDOG=1` at half the interval systemd asked
/// for (`WatchdogSec=`), so a wedged runtime gets the agent restarted.
/// Returns `None`, doing nothing, when no watchdog is asked for (not under
/// systemd, or `WATCHDOG_PID` names another process) or when called outside
/// a tokio runtime.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    std::env::var_os("NOTIFY_SOCKET")?;
    let interval = sd_notify::watchdog_enabled()?;
    let runtime = match tokio::runtime::Handle::try_current() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::warn!("systemd watchdog not started: {e}");
            return None;
        }
    };
    let period = (interval / 2).max(Duration::from_millis(1));
    tracing::debug!(?period, "pinging the systemd watchdog");
    Some(runtime.spawn(async move {
        let mut ticks = tokio::time::interval(period);
        // After a stall, one ping is enough; a burst would hide nothing.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            notify(&[NotifyState::Watchdog]);
        }
    }))
}

/// Sends one notification. A failure is logged, never fatal: the agent's
/// work matters more than systemd's view of it.
fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}
