//! Rebooting into the new image once it is written and verified.

use crate::{Error, Result};
use std::process::Command;

/// How the node reboots after a successful write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RebootMethod {
    /// Do not reboot (lab use, sandbox, tests).
    #[default]
    None,
    /// `systemctl reboot`: services stop cleanly, filesystems unmount.
    Systemd,
    /// `sync` then `reboot(2)` at once: for a node with no init to ask.
    Syscall,
}

/// Reboots the node by `method`. Returns only for `None` or on failure.
pub fn reboot(method: RebootMethod) -> Result<()> {
    match method {
        RebootMethod::None => Ok(()),
        RebootMethod::Systemd => {
            tracing::info!("rebooting through systemd");
            let status = Command::new("systemctl")
                .arg("reboot")
                .status()
                .map_err(|e| Error::io("running systemctl reboot", e))?;
            if status.success() {
                Ok(())
            } else {
                Err(Error::io(
                    "running systemctl reboot",
                    std::io::Error::other(format!("systemctl exited with {status}")),
                ))
            }
        }
        RebootMethod::Syscall => {
            tracing::info!("rebooting with reboot(2)");
            nix::unistd::sync();
            nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT)
                .map(|_| ())
                .map_err(|e| Error::io("calling reboot(2)", e.into()))
        }
    }
}
