//! The rollout's journal: one JSON object per line, appended and flushed as
//! each event happens, so that a controller killed at any moment leaves a
//! record from which the same command (or `--resume JOURNAL`) carries on.
//!
//! A rollout is named by a key made of what it does and to which agents;
//! the default journal's file name carries it, so rerunning the same
//! command finds its journal, and `--resume` refuses another rollout's.

use crate::error::CliError;
use jiff::Timestamp;
use reimage_protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// One line of the journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub at: Timestamp,
    #[serde(flatten)]
    pub event: Event,
}

/// What happened. `agent` is the node's base URL.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "camelCase")]
pub enum Event {
    /// The rollout (re)started: its key, what it does, to how many nodes.
    #[serde(rename_all = "camelCase")]
    Rollout {
        key: String,
        action: String,
        nodes: usize,
        target_sha256: Option<String>,
        waves: Vec<usize>,
    },
    /// A wave begins with these nodes.
    #[serde(rename_all = "camelCase")]
    Wave { wave: usize, agents: Vec<String> },
    /// The request was sent to the node.
    #[serde(rename_all = "camelCase")]
    Started { agent: String },
    /// The node accepted the operation.
    #[serde(rename_all = "camelCase")]
    Accepted { agent: String, operation_id: String },
    /// An operation already in flight on the node (an earlier run's) is
    /// followed instead of starting another.
    #[serde(rename_all = "camelCase")]
    Adopted { agent: String, operation_id: String },
    /// A per-node log line: a new phase, the agent gone or back.
    #[serde(rename_all = "camelCase")]
    Log { agent: String, message: String },
    /// The node's end in this rollout.
    #[serde(rename_all = "camelCase")]
    Finished {
        agent: String,
        status: String,
        operation_id: Option<String>,
        code: Option<String>,
        message: Option<String>,
    },
    /// The rollout starts no more nodes, and why.
    #[serde(rename_all = "camelCase")]
    Stopped { reason: String },
    /// The rollout ended with these counts.
    #[serde(rename_all = "camelCase")]
    Ended {
        succeeded: usize,
        failed: usize,
        unreachable: usize,
        current: usize,
        skipped: usize,
        interrupted: usize,
    },
}

/// What an earlier run of the same rollout left: each node's last
/// operation.
#[derive(Debug, Default)]
pub struct Earlier {
    pub operations: HashMap<String, String>,
}

/// The journal being written. Cheap to clone; every clone appends to the
/// same file, whole lines only.
#[derive(Clone)]
pub struct Journal {
    path: PathBuf,
    file: Arc<Mutex<File>>,
    /// `--output jsonl`: every entry on stdout as well.
    echo: bool,
}

impl Journal {
    /// Opens (creating) the journal at `path` for appending.
    pub fn open(path: &Path, echo: bool) -> Result<Journal, CliError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                CliError::new(
                    ErrorCode::IoError,
                    format!("creating the journal directory {}: {e}", dir.display()),
                )
            })?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| {
                CliError::new(
                    ErrorCode::IoError,
                    format!("opening the journal {}: {e}", path.display()),
                )
            })?;
        Ok(Journal {
            path: path.to_path_buf(),
            file: Arc::new(Mutex::new(file)),
            echo,
        })
    }

    /// Where it is written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `event` now. One `write` per line on an `O_APPEND` file, so
    /// a kill leaves at most a torn last line, which reading skips. A
    /// journal that cannot be written does not stop the rollout: the
    /// operations go on either way, and the failure is said once.
    pub fn record(&self, event: Event) {
        let entry = Entry {
            at: Timestamp::now(),
            event,
        };
        let Ok(mut line) = serde_json::to_string(&entry) else {
            return;
        };
        line.push('\n');
        if self.echo {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(line.as_bytes());
            let _ = stdout.flush();
        }
        if let Ok(mut file) = self.file.lock()
            && let Err(err) = file.write_all(line.as_bytes())
        {
            let _ = writeln!(
                std::io::stderr(),
                "warning: writing the journal {}: {err}",
                self.path.display()
            );
        }
    }
}

/// Reads what an earlier run of the rollout `key` wrote to `path`; a
/// journal of another rollout is refused. A missing file is an empty past.
pub fn read_earlier(path: &Path, key: &str) -> Result<Earlier, CliError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Earlier::default()),
        Err(err) => {
            return Err(CliError::new(
                ErrorCode::JournalInvalid,
                format!("reading the journal {}: {err}", path.display()),
            ));
        }
    };
    let mut earlier = Earlier::default();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|e| {
            CliError::new(
                ErrorCode::JournalInvalid,
                format!("reading the journal {}: {e}", path.display()),
            )
        })?;
        // A torn last line (the controller killed mid-write) says nothing.
        let Ok(entry) = serde_json::from_str::<Entry>(&line) else {
            continue;
        };
        match entry.event {
            Event::Rollout { key: theirs, .. } if theirs != key => {
                return Err(CliError::new(
                    ErrorCode::JournalInvalid,
                    format!(
                        "the journal {} is of another rollout (another action, image, option \
                         or set of agents): resume it with the command that wrote it",
                        path.display()
                    ),
                ));
            }
            Event::Accepted {
                agent,
                operation_id,
            }
            | Event::Adopted {
                agent,
                operation_id,
            } => {
                earlier.operations.insert(agent, operation_id);
            }
            _ => {}
        }
    }
    Ok(earlier)
}

/// The journal of rollout `key` when no `--journal` is given:
/// `$XDG_STATE_HOME/reimagectl/`, else `~/.local/state/reimagectl/`.
pub fn default_path(action: &str, key: &str) -> Result<PathBuf, CliError> {
    let dir = std::env::var_os("XDG_STATE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|home| PathBuf::from(home).join(".local/state"))
        })
        .ok_or_else(|| {
            CliError::new(
                ErrorCode::InvalidArgument,
                "neither $XDG_STATE_HOME nor $HOME is set: give --journal FILE",
            )
        })?;
    Ok(dir.join("reimagectl").join(format!("{action}-{key}.jsonl")))
}

/// The key of a rollout: a stable 64-bit FNV-1a hash, in hex, of the parts
/// that make it the same rollout (action, option, image, agents in order).
pub fn rollout_key(parts: &[&str]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        // A separator that no part contains, so ["ab","c"] != ["a","bc"].
        for byte in part.bytes().chain([0]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_is_read_back_skipping_a_torn_line_and_refusing_another_rollout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/r.jsonl");
        let journal = Journal::open(&path, false).expect("open");
        journal.record(Event::Rollout {
            key: "k1".into(),
            action: "reimage".into(),
            nodes: 2,
            target_sha256: None,
            waves: vec![1, 1],
        });
        journal.record(Event::Accepted {
            agent: "http://a:1".into(),
            operation_id: "op-1".into(),
        });
        let mut file = OpenOptions::new().append(true).open(&path).expect("file");
        file.write_all(b"{\"at\":\"2026-").expect("torn line");
        let earlier = read_earlier(&path, "k1").expect("read");
        assert_eq!(
            earlier.operations.get("http://a:1").map(String::as_str),
            Some("op-1")
        );
        let err = read_earlier(&path, "k2").expect_err("another rollout");
        assert_eq!(err.code, ErrorCode::JournalInvalid);
        assert!(
            read_earlier(&dir.path().join("none"), "k1")
                .expect("missing")
                .operations
                .is_empty()
        );
    }

    #[test]
    fn rollout_keys_are_stable_and_tell_parts_apart() {
        assert_eq!(rollout_key(&["ab", "c"]), rollout_key(&["ab", "c"]));
        assert_ne!(rollout_key(&["ab", "c"]), rollout_key(&["a", "bc"]));
        assert_eq!(rollout_key(&[]).len(), 16);
    }
}
