//! What `reimagectl` prints on stdout: aligned columns for people, one JSON
//! document for programs.

use anyhow::Context;
use jiff::Timestamp;
use reimage_protocol::Phase;
use reimage_protocol::api::{Operation, OperationKind, OperationStatus};
use serde::Serialize;
use std::time::Duration;

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// One JSON document (the API's camelCase shapes).
    Json,
    /// For rollouts: each journal entry as one JSON line as it happens,
    /// then the summary as the last line. Other commands print as `json`.
    Jsonl,
}

/// The terminal's width in columns, when stderr or stdout is one.
pub fn terminal_width() -> Option<usize> {
    let (_, columns) = console::Term::stderr()
        .size_checked()
        .or_else(|| console::Term::stdout().size_checked())?;
    Some(usize::from(columns))
}

/// The terminal's height in rows, when stderr is one.
pub fn terminal_height() -> Option<usize> {
    let (rows, _) = console::Term::stderr().size_checked()?;
    Some(usize::from(rows))
}

/// `line` cut to `width` columns, a cut line ending in `…`.
pub fn fit(line: &str, width: usize) -> String {
    if line.chars().count() <= width {
        return line.to_string();
    }
    let mut cut: String = line.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Prints `value` as one pretty JSON document.
pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value).context("encoding the JSON output")?;
    println!("{text}");
    Ok(())
}

/// Columns padded to their widest cell, two spaces apart.
#[derive(Debug)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&str]) -> Self {
        Table {
            rows: vec![headers.iter().map(|h| h.to_string()).collect()],
        }
    }

    /// Adds a row (one cell per header).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row; the last column is not padded.
    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut text = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let pad = widths[c].saturating_sub(cell.chars().count());
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad + 2));
                }
            }
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }

    /// Prints the table on stdout.
    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// `2026-11-23 10:00:00` (UTC), short enough for a column.
pub fn time(at: Timestamp) -> String {
    at.strftime("%Y-%m-%d %H:%M:%S").to_string()
}

/// `-` for what is not there.
pub fn or_dash(text: Option<String>) -> String {
    text.filter(|t| !t.is_empty()).unwrap_or_else(|| "-".into())
}

/// `1m05s`, `3.2s`.
pub fn duration(elapsed: Duration) -> String {
    let seconds = elapsed.as_secs_f64();
    if seconds < 60.0 {
        format!("{seconds:.1}s")
    } else {
        let whole = elapsed.as_secs();
        if whole < 3600 {
            format!("{}m{:02}s", whole / 60, whole % 60)
        } else {
            format!("{}h{:02}m{:02}s", whole / 3600, whole / 60 % 60, whole % 60)
        }
    }
}

/// The API's spelling of a phase (`waitingForTasks`).
pub fn phase(phase: Phase) -> String {
    serde_json::to_value(phase)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{phase:?}"))
}

/// `Succeeded`, `InProgress`, `Failed`.
pub fn status(status: OperationStatus) -> String {
    format!("{status:?}")
}

/// The API's lowercase spelling of a serde enum (`taskcompletion`).
pub fn wire_name(value: &impl Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// `12.0 MiB/64.0 MiB`, or just the bytes when the total is unknown.
pub fn progress(operation: &Operation) -> String {
    let done = indicatif::HumanBytes(operation.progress.bytes_written);
    match operation.progress.total_bytes {
        Some(total) => format!("{done}/{}", indicatif::HumanBytes(total)),
        None if operation.progress.bytes_written > 0 => done.to_string(),
        None => String::new(),
    }
}

/// `CODE: message` of a failed operation.
pub fn operation_error(operation: &Operation) -> String {
    operation
        .error
        .as_ref()
        .map(|e| format!("{}: {}", e.code, e.message))
        .unwrap_or_default()
}

/// The columns of an operation, shared by `op show|wait|list`.
pub fn operation_table(operations: &[Operation]) -> Table {
    let mut table = Table::new(&[
        "ID", "KIND", "OPTION", "STATUS", "PHASE", "PROGRESS", "CREATED", "UPDATED", "ERROR",
    ]);
    for op in operations {
        table.row(vec![
            op.id.clone(),
            wire_name(&op.kind),
            // A prefetch leaves the tasks alone: its option means nothing.
            or_dash(
                (op.kind != OperationKind::Prefetch).then(|| wire_name(&op.node_reimage_option)),
            ),
            status(op.status),
            or_dash(op.phase.map(phase)),
            or_dash(Some(progress(op))),
            time(op.created_at),
            time(op.updated_at),
            or_dash(Some(operation_error(op))),
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_and_lines_not_padded_at_the_end() {
        let mut table = Table::new(&["NODE", "STATUS", "ERROR"]);
        table.row(vec!["http://a:1".into(), "succeeded".into(), "-".into()]);
        table.row(vec!["b".into(), "failed".into(), "X: y".into()]);
        assert_eq!(
            table.render(),
            "NODE        STATUS     ERROR\n\
             http://a:1  succeeded  -\n\
             b           failed     X: y\n"
        );
    }

    #[test]
    fn long_lines_are_cut_to_the_width() {
        assert_eq!(fit("abcdef", 6), "abcdef");
        assert_eq!(fit("abcdefg", 6), "abcde…");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(Duration::from_millis(3200)), "3.2s");
        assert_eq!(duration(Duration::from_secs(65)), "1m05s");
        assert_eq!(duration(Duration::from_secs(3725)), "1h02m05s");
        assert_eq!(phase(Phase::WaitingForTasks), "waitingForTasks");
    }
}
