//! Rebooting into the new image once it is written and verified: through
//! the firmware, or straight into the new image's kernel ([`kexec`]).

pub mod kexec;

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
    /// As `systemd`, but into the new image's kernel without the firmware
    /// (`systemctl kexec`), when its manifest names one (`boot.kexec`) and
    /// it loads; else a firmware reboot.
    Kexec,
}

impl RebootMethod {
    /// Whether systemd takes the node down (the in-place handoff needs it).
    pub fn through_systemd(self) -> bool {
        matches!(self, RebootMethod::Systemd | RebootMethod::Kexec)
    }
}

/// Reboots the node by `method`; into the kernel loaded for kexec when
/// `kexec` (see [`kexec::load`]). Returns only for `None` or on failure.
pub fn reboot(method: RebootMethod, kexec: bool) -> Result<()> {
    match method {
        RebootMethod::None => Ok(()),
        RebootMethod::Systemd | RebootMethod::Kexec => {
            let verb = if kexec { "kexec" } else { "reboot" };
            tracing::info!("{verb} through systemd");
            let context = format!("running systemctl {verb}");
            let status = Command::new("systemctl")
                .arg(verb)
                .status()
                .map_err(|e| Error::io(&context, e))?;
            if status.success() {
                Ok(())
            } else {
                Err(Error::io(
                    context,
                    std::io::Error::other(format!("systemctl exited with {status}")),
                ))
            }
        }
        RebootMethod::Syscall => {
            use nix::sys::reboot::RebootMode;
            let mode = if kexec {
                RebootMode::RB_KEXEC
            } else {
                RebootMode::RB_AUTOBOOT
            };
            tracing::info!(?mode, "rebooting with reboot(2)");
            nix::unistd::sync();
            nix::sys::reboot::reboot(mode)
                .map(|_| ())
                .map_err(|e| Error::io("calling reboot(2)", e.into()))
        }
    }
}
