//! Live progress on stderr while operations run: one indicatif bar per node
//! on a terminal (phase, bytes, rate), plain log lines otherwise (one per
//! change of phase or reachability, so logs stay readable).

use crate::output;
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use reimage_protocol::ClientError;
use reimage_protocol::api::{Operation, OperationStatus};
use std::io::IsTerminal;
use std::time::Duration;

/// Where the progress of every node goes.
#[derive(Clone)]
pub struct Progress {
    bars: Option<MultiProgress>,
}

impl Progress {
    /// Bars when stderr is a terminal, log lines otherwise.
    pub fn new() -> Self {
        let bars = std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Progress { bars }
    }

    /// The progress of the node behind `agent`.
    pub fn node(&self, agent: &str) -> NodeProgress {
        let bar = self.bars.as_ref().map(|bars| {
            let bar = bars.add(ProgressBar::new(1));
            bar.set_style(style("{prefix} [{bar:25}] {msg}"));
            bar.set_prefix(agent.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        NodeProgress {
            agent: agent.to_string(),
            bar,
            shown: None,
            unreachable: false,
        }
    }

    /// Takes the bars off the terminal, so that the summary on stdout
    /// follows on a clean line (it says what the bars said).
    pub fn clear(&self) {
        if let Some(bars) = &self.bars {
            let _ = bars.clear();
        }
    }

    /// A line that does not belong to one node.
    pub fn line(&self, text: &str) {
        match &self.bars {
            Some(bars) => {
                let _ = bars.println(text);
            }
            None => eprintln!("{text}"),
        }
    }
}

/// The progress of one node's operation.
pub struct NodeProgress {
    agent: String,
    bar: Option<ProgressBar>,
    /// What the last log line said (status and phase), so that a line is
    /// written only when it changes.
    shown: Option<String>,
    unreachable: bool,
}

impl NodeProgress {
    /// The request was sent.
    pub fn starting(&mut self, what: &str) {
        self.say(&format!("{what}..."));
    }

    /// The agent accepted the operation.
    pub fn accepted(&mut self, what: &str, operation: &Operation) {
        self.say(&format!("{what} accepted as operation {}", operation.id));
    }

    /// A new observation of the operation.
    pub fn observed(&mut self, operation: &Operation) {
        if self.unreachable {
            self.unreachable = false;
            self.say("the agent answers again");
        }
        let state = match operation.status {
            OperationStatus::InProgress => operation
                .phase
                .map_or_else(|| "starting".to_string(), output::phase),
            status => output::status(status),
        };
        if let Some(bar) = &self.bar {
            let mut message = format!("{state} {}", output::progress(operation));
            let rate = operation.progress.bytes_per_second;
            if rate > 0 {
                message.push_str(&format!(" {}/s", HumanBytes(rate)));
            }
            // An unknown total shows an empty bar, not a full one.
            let total = operation.progress.total_bytes;
            bar.set_length(total.unwrap_or(1).max(1));
            bar.set_position(total.map_or(0, |_| operation.progress.bytes_written));
            bar.set_message(message.trim_end().to_string());
        } else if self.shown.as_deref() != Some(state.as_str()) {
            let bytes = output::progress(operation);
            let line = if bytes.is_empty() {
                format!("operation {}: {state}", operation.id)
            } else {
                format!("operation {}: {state} ({bytes})", operation.id)
            };
            self.say(&line);
            self.shown = Some(state);
        }
    }

    /// A poll failed: the node is probably rebooting.
    pub fn unreachable(&mut self, err: &ClientError) {
        if !self.unreachable {
            self.unreachable = true;
            self.say(&format!(
                "agent unreachable ({}: {err}); still waiting",
                err.code()
            ));
        }
    }

    /// The node's end, in a few words (`succeeded in 3.2s`).
    pub fn finish(&mut self, text: &str) {
        match &self.bar {
            Some(bar) => {
                bar.set_style(style("{prefix} {msg}"));
                bar.finish_with_message(text.to_string());
            }
            None => eprintln!("{}: {text}", self.agent),
        }
    }

    fn say(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(text.to_string()),
            None => eprintln!("{}: {text}", self.agent),
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}
