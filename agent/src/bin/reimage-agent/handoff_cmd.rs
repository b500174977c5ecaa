//! `reimage-agent handoff …`: the privileged steps of an in-place reimage.
//! The daemon runs them through `systemd-run` (outside its own sandbox);
//! an operator may run `cancel` to make sure the next reboot writes nothing.

use anyhow::Context;
use clap::{Args, Subcommand};
use reimage_agent::handoff::{HANDOFF_ROOT, install};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct HandoffArgs {
    #[command(subcommand)]
    command: HandoffCommand,
    /// On failure, also write the error line to this file (systemd-run
    /// tells the daemon only that the unit failed).
    #[arg(long, value_name = "FILE", global = true)]
    report: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum HandoffCommand {
    /// Make /run executable and large enough for BYTES more (a RAM-staged
    /// image) besides the handoff itself.
    Reserve {
        #[arg(long, value_name = "BYTES")]
        bytes: u64,
    },
    /// Install the shutdown handoff for a plan the daemon wrote: this
    /// binary as ROOT/shutdown with its libraries, the plan, a RAM-staged
    /// image.
    Install {
        /// The plan, `state_dir/handoff/<operation>.plan.json`.
        #[arg(long, value_name = "PATH")]
        plan: PathBuf,
        /// The handoff root systemd-shutdown switches to.
        #[arg(long, value_name = "DIR", default_value = HANDOFF_ROOT)]
        root: PathBuf,
    },
    /// Remove an installed handoff: the next reboot writes nothing.
    Cancel {
        #[arg(long, value_name = "DIR", default_value = HANDOFF_ROOT)]
        root: PathBuf,
    },
}

pub fn run(args: HandoffArgs) -> anyhow::Result<()> {
    let result = run_command(args.command);
    if let (Err(err), Some(report)) = (&result, &args.report) {
        let line = crate::display::error_line(err);
        std::fs::write(report, format!("{line}\n"))
            .with_context(|| format!("writing the error to {}", report.display()))?;
    }
    result
}

fn run_command(command: HandoffCommand) -> anyhow::Result<()> {
    match command {
        HandoffCommand::Reserve { bytes } => {
            install::reserve_run(bytes).context("preparing /run for the handoff")
        }
        HandoffCommand::Install { plan, root } => install::install(&root, &plan)
            .with_context(|| format!("installing the handoff in {}", root.display())),
        HandoffCommand::Cancel { root } => install::cancel(&root)
            .with_context(|| format!("removing the handoff from {}", root.display())),
    }
}
