//! The end of a rollout: every node's outcome, the failures grouped by
//! error code, and the exit verdict.

use crate::error::CliError;
use crate::journal::Event;
use crate::output::{self, Format, Table};
use crate::rollout::{Action, NodeReport, Outcome};
use anyhow::Context;
use reimage_protocol::ErrorCode;
use reimage_protocol::api::NodeReimageOption;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Beyond this many nodes the table lists only those that did not
/// succeed: the counts say the rest.
const FULL_TABLE_NODES: usize = 50;
/// Agents named per error code before `(+N more)`.
const AGENTS_PER_CODE: usize = 3;

/// The whole rollout, as `--output json` prints it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    action: &'static str,
    /// None for a prefetch, which leaves the tasks alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    node_reimage_option: Option<NodeReimageOption>,
    max_parallel: u32,
    waited: bool,
    interrupted: bool,
    /// The signal that interrupted it.
    #[serde(skip_serializing_if = "Option::is_none")]
    interrupted_by: Option<&'static str>,
    journal: PathBuf,
    succeeded: usize,
    failed: usize,
    unreachable: usize,
    /// Already where the rollout wants them: nothing started.
    current: usize,
    accepted: usize,
    in_flight: usize,
    skipped: usize,
    nodes: Vec<NodeReport>,
}

impl Summary {
    pub fn new(
        action: &Action,
        max_parallel: u32,
        waited: bool,
        interrupted_by: Option<&'static str>,
        journal: &Path,
        nodes: Vec<NodeReport>,
    ) -> Self {
        let count = |outcome| nodes.iter().filter(|n| n.status == outcome).count();
        Summary {
            action: action.name(),
            node_reimage_option: action.option(),
            max_parallel,
            waited,
            interrupted: interrupted_by.is_some(),
            interrupted_by,
            journal: journal.to_path_buf(),
            succeeded: count(Outcome::Succeeded),
            failed: count(Outcome::Failed),
            unreachable: count(Outcome::Unreachable),
            current: count(Outcome::Current),
            accepted: count(Outcome::Accepted),
            in_flight: count(Outcome::Interrupted),
            skipped: count(Outcome::Skipped),
            nodes,
        }
    }

    /// The journal's last entry.
    pub fn ended_event(&self) -> Event {
        Event::Ended {
            succeeded: self.succeeded,
            failed: self.failed,
            unreachable: self.unreachable,
            current: self.current,
            skipped: self.skipped,
            interrupted: self.in_flight,
        }
    }

    /// Prints the summary; the output going away (a closed terminal) is
    /// not an error of the rollout.
    pub fn print(&self, format: Format) -> anyhow::Result<()> {
        match format {
            Format::Json => output::print_json(self),
            // The journal's entries went to stdout as they happened; the
            // summary is the last line.
            Format::Jsonl => {
                let line = serde_json::to_string(self).context("encoding the summary")?;
                let _ = writeln!(std::io::stdout(), "{line}");
                Ok(())
            }
            Format::Table => {
                let width = std::io::stdout()
                    .is_terminal()
                    .then(output::terminal_width)
                    .flatten();
                let _ = std::io::stdout().write_all(self.render(width).as_bytes());
                Ok(())
            }
        }
    }

    /// The table, the counts and the failures by code, each line cut to
    /// `width` columns when given.
    fn render(&self, width: Option<usize>) -> String {
        let mut table = Table::new(&["NODE", "STATUS", "PHASE", "DURATION", "OPERATION", "ERROR"]);
        let all = self.nodes.len() <= FULL_TABLE_NODES;
        for node in &self.nodes {
            if !all && matches!(node.status, Outcome::Succeeded | Outcome::Current) {
                continue;
            }
            table.row(vec![
                node.agent.clone(),
                output::wire_name(&node.status),
                output::or_dash(node.phase.map(output::phase)),
                output::or_dash(
                    node.duration_seconds
                        .map(|s| output::duration(Duration::from_secs_f64(s))),
                ),
                output::or_dash(node.operation_id.clone()),
                output::or_dash(Some(node.error_text())),
            ]);
        }
        let mut text = String::new();
        if all || self.nodes.iter().any(|n| n.status != Outcome::Succeeded) {
            text.push_str(&table.render());
        }
        text.push_str(&format!(
            "{} node(s): {} succeeded, {} failed, {} unreachable, {} current, {} skipped",
            self.nodes.len(),
            self.succeeded,
            self.failed,
            self.unreachable,
            self.current,
            self.skipped
        ));
        if self.accepted > 0 {
            text.push_str(&format!(", {} accepted", self.accepted));
        }
        if self.in_flight > 0 {
            text.push_str(&format!(", {} interrupted", self.in_flight));
        }
        text.push('\n');
        let groups = self.failures_by_code();
        if !groups.is_empty() {
            text.push_str("failures by code:\n");
            for (code, agents) in groups {
                let mut named = agents
                    .iter()
                    .take(AGENTS_PER_CODE)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ");
                if agents.len() > AGENTS_PER_CODE {
                    named.push_str(&format!(" (+{} more)", agents.len() - AGENTS_PER_CODE));
                }
                text.push_str(&format!("  {code} ({}): {named}\n", agents.len()));
            }
        }
        match width {
            Some(width) => text
                .lines()
                .map(|line| output::fit(line, width) + "\n")
                .collect(),
            None => text,
        }
    }

    /// The agents of each failed or unreachable node, by error code.
    fn failures_by_code(&self) -> BTreeMap<String, Vec<String>> {
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for node in &self.nodes {
            if matches!(node.status, Outcome::Failed | Outcome::Unreachable) {
                let code = node
                    .error
                    .as_ref()
                    .map_or_else(|| "-".to_string(), |e| e.code.to_string());
                groups.entry(code).or_default().push(node.agent.clone());
            }
        }
        groups
    }

    /// `Ok` only when every node's operation succeeded (or, without
    /// --wait, was accepted), or the node was already current.
    pub fn verdict(&self) -> anyhow::Result<()> {
        if let Some(signal) = self.interrupted_by {
            let by = if signal == "SIGINT" {
                "Ctrl-C".to_string()
            } else {
                signal.to_string()
            };
            return Err(CliError::new(
                ErrorCode::Interrupted,
                format!(
                    "stopped by {by} with {} node(s) in flight (their operations go on; \
                     follow them with `reimagectl op wait`, or rerun to resume) and {} skipped",
                    self.in_flight, self.skipped
                ),
            ))
            .context(self.action);
        }
        if self.failed == 0 && self.skipped == 0 && self.unreachable == 0 {
            return Ok(());
        }
        if let [node] = self.nodes.as_slice()
            && let Some(error) = &node.error
        {
            return Err(CliError::new(error.code.clone(), error.message.clone()))
                .context(format!("{} on {}", self.action, node.agent));
        }
        let mut message = format!(
            "{} of {} node(s) failed, {} skipped",
            self.failed,
            self.nodes.len(),
            self.skipped
        );
        if self.unreachable > 0 {
            message.push_str(&format!(", {} unreachable", self.unreachable));
        }
        Err(CliError::new(ErrorCode::RolloutFailed, message)).context(self.action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reimage_protocol::api::{OperationError, ReimageRequest};

    fn node(agent: &str, status: Outcome, code: Option<&str>) -> NodeReport {
        let mut report = NodeReport::skipped(agent);
        report.status = status;
        report.error = code.map(|c| OperationError {
            code: ErrorCode::parse(c),
            message: "a long message that says what went wrong on this node in detail".into(),
        });
        report
    }

    #[test]
    fn failures_are_grouped_by_code_and_lines_fit_the_width() {
        let mut nodes = vec![
            node("http://10.0.0.1:7480", Outcome::Failed, Some("DiskBusy")),
            node(
                "http://10.0.0.2:7480",
                Outcome::Unreachable,
                Some("Timeout"),
            ),
        ];
        for n in 3..=7 {
            nodes.push(node(
                &format!("http://10.0.0.{n}:7480"),
                Outcome::Failed,
                Some("DiskBusy"),
            ));
        }
        let summary = Summary::new(
            &Action::Reimage(ReimageRequest::default()),
            1,
            true,
            None,
            Path::new("/j"),
            nodes,
        );
        let text = summary.render(Some(80));
        assert!(text.lines().all(|l| l.chars().count() <= 80), "{text}");
        let tail: Vec<&str> = text.lines().rev().take(3).collect();
        assert_eq!(tail[2], "failures by code:", "{text}");
        assert!(
            tail[1].starts_with("  DiskBusy (6): http://10.0.0.1:7480, http://10.0.0.3:7480"),
            "{text}"
        );
        assert!(
            tail[0].starts_with("  Timeout (1): http://10.0.0.2:7480"),
            "{text}"
        );
        assert!(
            text.contains("7 node(s): 0 succeeded, 6 failed, 1 unreachable, 0 current"),
            "{text}"
        );
    }
}
