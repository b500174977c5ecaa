//! Live progress on stderr while a rollout runs. On a terminal: one overall
//! line (done, failed, unreachable, in flight, skipped, ETA) and a bar for
//! each node in flight, as many as fit the terminal, every line cut to its
//! width and redrawn a few times a second at most. Otherwise: log lines
//! with a timestamp, one per change of phase or reachability. Every node's
//! lines also go to the journal.

use crate::journal::{Event, Journal};
use crate::output;
use crate::rollout::{NodeReport, Outcome};
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use jiff::Timestamp;
use reimage_protocol::ClientError;
use reimage_protocol::api::{Operation, OperationStatus};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Redraws a second at most: enough to look alive, cheap at 1,000 nodes.
const REDRAWS_PER_SECOND: u8 = 4;
/// Terminal rows kept for the overall line and the shell prompt.
const ROWS_KEPT: usize = 3;
/// The widest the agent column of a bar may be.
const AGENT_COLUMNS: usize = 28;

/// Where the progress of a rollout goes.
#[derive(Clone)]
pub struct Progress {
    bars: Option<Bars>,
    /// Log lines on stderr (off with `--output jsonl`, whose stdout says it all).
    log: bool,
    /// None for `op wait`, which follows one operation outside a rollout.
    journal: Option<Journal>,
    tally: Arc<Mutex<Tally>>,
}

#[derive(Clone)]
struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
    /// Node bars shown now, and how many may be.
    shown: Arc<AtomicUsize>,
    max_shown: usize,
    width: usize,
}

/// The counts of the overall line.
struct Tally {
    total: usize,
    done: usize,
    failed: usize,
    unreachable: usize,
    skipped: usize,
    in_flight: usize,
    began: Instant,
}

impl Tally {
    fn line(&self) -> String {
        let ended = self.done + self.failed + self.unreachable + self.skipped;
        let left = self.total.saturating_sub(ended);
        let eta = if ended > 0 && left > 0 {
            let per_node = self.began.elapsed().as_secs_f64() / ended as f64;
            output::duration(Duration::from_secs_f64(per_node * left as f64))
        } else {
            "-".to_string()
        };
        format!(
            "{ended}/{} done {} fail {} unreach {} flight {} skip {} ETA {eta}",
            self.total, self.done, self.failed, self.unreachable, self.in_flight, self.skipped
        )
    }
}

impl Progress {
    /// Bars when stderr is a terminal, log lines otherwise; `log` false
    /// shows neither.
    pub fn new(total: usize, log: bool, journal: Option<Journal>) -> Self {
        let tally = Arc::new(Mutex::new(Tally {
            total,
            done: 0,
            failed: 0,
            unreachable: 0,
            skipped: 0,
            in_flight: 0,
            began: Instant::now(),
        }));
        let bars = (log && std::io::stderr().is_terminal()).then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(
                REDRAWS_PER_SECOND,
            ));
            let width = output::terminal_width().unwrap_or(80);
            let rows = output::terminal_height().unwrap_or(24);
            let overall = multi.add(ProgressBar::new(1));
            overall.set_style(style("{wide_msg}"));
            overall.set_message(tally.lock().map(|t| t.line()).unwrap_or_default());
            Bars {
                multi,
                overall,
                shown: Arc::default(),
                max_shown: rows.saturating_sub(ROWS_KEPT).max(1),
                width,
            }
        });
        Progress {
            bars,
            log,
            journal,
            tally,
        }
    }

    /// The progress of the node behind `agent`, now in flight.
    pub fn node(&self, agent: &str) -> NodeProgress {
        self.update(|t| t.in_flight += 1);
        let bar = self.bars.as_ref().and_then(|bars| {
            let taken = bars.shown.fetch_add(1, Ordering::SeqCst);
            if taken >= bars.max_shown {
                bars.shown.fetch_sub(1, Ordering::SeqCst);
                return None;
            }
            let bar = bars.multi.add(ProgressBar::new(1));
            bar.set_style(style("{prefix} [{bar:20}] {wide_msg}"));
            bar.set_prefix(output::fit(agent_column(agent), AGENT_COLUMNS));
            Some(bar)
        });
        NodeProgress {
            agent: agent.to_string(),
            bar,
            progress: self.clone(),
            shown: None,
            unreachable: false,
        }
    }

    /// A node's job ended with `outcome`.
    pub fn finished(&self, outcome: Outcome) {
        self.update(|t| {
            t.in_flight = t.in_flight.saturating_sub(1);
            match outcome {
                Outcome::Succeeded | Outcome::Current | Outcome::Accepted => t.done += 1,
                Outcome::Failed => t.failed += 1,
                Outcome::Unreachable => t.unreachable += 1,
                Outcome::Skipped | Outcome::Interrupted => t.skipped += 1,
            }
        });
    }

    fn update(&self, change: impl FnOnce(&mut Tally)) {
        let Ok(mut tally) = self.tally.lock() else {
            return;
        };
        change(&mut tally);
        if let Some(bars) = &self.bars {
            bars.overall.set_message(tally.line());
        }
    }

    /// Takes the bars off the terminal, so that the summary on stdout
    /// follows on a clean line (it says what the bars said).
    pub fn clear(&self) {
        if let Some(bars) = &self.bars {
            bars.overall.finish_and_clear();
            let _ = bars.multi.clear();
        }
    }

    /// A line that does not belong to one node.
    pub fn line(&self, text: &str) {
        if !self.log {
            return;
        }
        match &self.bars {
            Some(bars) => {
                let _ = bars.multi.println(output::fit(text, bars.width));
            }
            None => log_line(text),
        }
    }
}

/// A log line with its time, for logs read later.
fn log_line(text: &str) {
    let now = Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ");
    let _ = writeln!(std::io::stderr(), "{now} {text}");
}

/// `10.0.0.5:7480` of `http://10.0.0.5:7480`: the scheme says nothing in a
/// narrow column.
fn agent_column(agent: &str) -> &str {
    agent
        .strip_prefix("http://")
        .or_else(|| agent.strip_prefix("https://"))
        .unwrap_or(agent)
}

/// The progress of one node's operation.
pub struct NodeProgress {
    agent: String,
    /// None when the terminal has no room for it (or is no terminal).
    bar: Option<ProgressBar>,
    progress: Progress,
    /// What the last line said (status and phase), so that a line is
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
        }
        if self.shown.as_deref() != Some(state.as_str()) {
            let bytes = output::progress(operation);
            let line = if bytes.is_empty() {
                format!("operation {}: {state}", operation.id)
            } else {
                format!("operation {}: {state} ({bytes})", operation.id)
            };
            self.log(&line);
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

    /// The node's end: its bar goes, one line says it.
    pub fn finish(&mut self, report: &NodeReport) {
        let text = match report.status {
            Outcome::Failed | Outcome::Unreachable => format!(
                "{}: {}",
                output::wire_name(&report.status),
                report.error_text()
            ),
            Outcome::Succeeded => format!(
                "succeeded in {}",
                output::duration(Duration::from_secs_f64(
                    report.duration_seconds.unwrap_or_default()
                ))
            ),
            Outcome::Interrupted => format!(
                "interrupted while {}",
                output::or_dash(report.phase.map(output::phase))
            ),
            status => output::wire_name(&status),
        };
        self.finish_with(&text);
    }

    /// The node's end, in a few words (`Succeeded`): its bar goes, one
    /// line says it.
    pub fn finish_with(&mut self, text: &str) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            if let Some(bars) = &self.progress.bars {
                bars.multi.remove(&bar);
                bars.shown.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let line = format!("{}: {text}", self.agent);
        self.progress.line(&line);
    }

    /// A line about this node: on its bar, or logged; always journaled.
    pub fn say(&mut self, text: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(text.to_string());
        }
        self.log(text);
    }

    fn log(&self, text: &str) {
        if let Some(journal) = &self.progress.journal {
            journal.record(Event::Log {
                agent: self.agent.clone(),
                message: text.to_string(),
            });
        }
        if self.progress.bars.is_none() && self.progress.log {
            log_line(&format!("{}: {text}", self.agent));
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}
