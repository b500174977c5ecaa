//! How the binary talks to people and programs: logs, the one-line error,
//! the progress bar and JSON progress lines.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reimage_agent::Error;
use reimage_protocol::{Phase, WriteProgress};
use std::fs::File;
use std::io::{IsTerminal, Write};

/// `<context>: <Code>: <cause>`: the contexts the binary added, then the
/// pipeline's typed error with its stable code. The typed error's message
/// already holds its own cause, so the chain stops there.
pub fn error_line(err: &anyhow::Error) -> String {
    let mut parts = Vec::new();
    for cause in err.chain() {
        if let Some(typed) = cause.downcast_ref::<Error>() {
            parts.push(format!("{}: {typed}", typed.code()));
            break;
        }
        parts.push(cause.to_string());
    }
    parts.join(": ")
}

/// Where progress goes: a bar on a terminal, JSON lines on a descriptor.
pub struct ProgressOutput {
    bar: Option<ProgressBar>,
    json: Option<File>,
}

impl ProgressOutput {
    /// A bar when stderr is a terminal; JSON lines when `fd` is given.
    pub fn new(fd: Option<i32>) -> anyhow::Result<Self> {
        let json = fd.map(open_fd).transpose()?;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:>17} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        Ok(ProgressOutput { bar, json })
    }

    /// Shows one progress report.
    pub fn show(&mut self, progress: &WriteProgress) {
        if let Some(bar) = &self.bar {
            bar.set_message(phase_name(progress.phase));
            bar.set_length(progress.total_bytes.unwrap_or(progress.bytes_written));
            bar.set_position(progress.bytes_written);
            if progress.phase == Phase::Done {
                bar.finish_and_clear();
            }
        }
        if let Some(out) = &mut self.json {
            // Progress is advisory: a reader that went away must not fail the write.
            if let Ok(line) = serde_json::to_string(progress) {
                let _ = writeln!(out, "{line}");
            }
        }
    }

    /// Clears the bar (after a failure) so the error line stands alone.
    pub fn clear(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::WaitingForTasks => "waiting for tasks",
        Phase::WaitingForRetention => "waiting retention",
        Phase::Staging => "staging",
        Phase::Comparing => "comparing",
        Phase::Downloading => "writing",
        Phase::Verifying => "reading back",
        Phase::SavingPartitions => "partition table",
        Phase::Rebooting => "rebooting",
        Phase::Confirming => "confirming",
        Phase::Done => "done",
    }
}

/// Opens an inherited descriptor by its /proc path: no unsafe ownership
/// claim on a raw fd, and a clear error when it is not open.
fn open_fd(fd: i32) -> anyhow::Result<File> {
    use anyhow::Context;
    std::fs::OpenOptions::new()
        .append(true)
        .open(format!("/proc/self/fd/{fd}"))
        .with_context(|| format!("--progress-fd {fd} is not an open, writable descriptor"))
}
