//! A task's processes: started as `sh -c <commandLine>` leading a process
//! group of its own, so that stopping the task reaches every process it
//! started, and identified by pid, start time and boot so that a later agent
//! never signals an unrelated process that reused the pid.

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// PATH for tasks when the agent itself has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How often the group is checked while waiting for it to exit.
const POLL: Duration = Duration::from_millis(25);

/// How long to wait for SIGKILLed processes to disappear (a process in
/// uninterruptible sleep dies only when its I/O returns).
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Everything needed to start one run of a task.
#[derive(Debug)]
pub(crate) struct Launch {
    pub command_line: String,
    pub working_dir: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// Set in this order after the clean base environment.
    pub env: Vec<(String, String)>,
}

/// Starts `sh -c <commandLine>` as the leader of a new process group, in a
/// clean environment (PATH only, then `launch.env`), output to the task's
/// files (truncated: each run starts them afresh).
pub(crate) fn spawn(launch: &Launch) -> io::Result<Child> {
    let stdout = File::create(&launch.stdout)?;
    let stderr = File::create(&launch.stderr)?;
    let path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned());
    Command::new("sh")
        .arg("-c")
        .arg(&launch.command_line)
        .current_dir(&launch.working_dir)
        .env_clear()
        .env("PATH", path)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        // The supervisor decides when the group dies; a dropped handle (the
        // agent shutting down) must leave it to the next agent's orphan check.
        .kill_on_drop(false)
        .spawn()
}

/// Who a task's process group leader is, durably: a pid alone may be reused
/// by an unrelated process after the task ended or the node rebooted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ProcessIdentity {
    /// The leader's pid, which is also the process group id.
    pub pid: i32,
    /// The leader's start time, in clock ticks after boot (`/proc/PID/stat` field 22).
    pub start_time: u64,
    /// `/proc/sys/kernel/random/boot_id` when it started.
    pub boot_id: String,
}

impl ProcessIdentity {
    /// The identity of the running process `pid`.
    pub fn of(pid: i32) -> io::Result<ProcessIdentity> {
        Ok(ProcessIdentity {
            pid,
            start_time: read_stat(pid)?.start_time,
            boot_id: boot_id()?,
        })
    }

    /// Live members of this process's group that belong to it, if it is
    /// still the same group: same boot, and either the leader with its
    /// recorded start time, or (the leader gone) members that started no
    /// earlier than it did. Linux does not hand out a pid that is still in
    /// use as a process group id, so a leaderless group with the recorded id
    /// is that group's remains.
    pub fn surviving_members(&self) -> Vec<i32> {
        if boot_id().ok().as_deref() != Some(self.boot_id.as_str()) {
            return Vec::new();
        }
        match read_stat(self.pid) {
            Ok(leader) if leader.start_time != self.start_time || leader.pgrp != self.pid => {
                return Vec::new();
            }
            _ => {}
        }
        group_members(self.pid)
            .into_iter()
            .filter(|(_, stat)| stat.start_time >= self.start_time)
            .map(|(pid, _)| pid)
            .collect()
    }
}

/// This boot's id; it changes on every boot.
pub(crate) fn boot_id() -> io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_owned())
}

/// What `/proc/PID/stat` says that matters here.
#[derive(Debug, Clone, Copy)]
struct ProcStat {
    state: char,
    pgrp: i32,
    start_time: u64,
}

fn read_stat(pid: i32) -> io::Result<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected /proc/{pid}/stat: {text:?}"),
        )
    })
}

/// Parses `pid (comm) state ppid pgrp ... starttime ...`. The command name
/// may hold spaces and parentheses, so fields are counted after the last `)`.
fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (state); field N is `fields[N - 3]`.
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// Processes of group `pgid` that have not exited. Zombies are left out:
/// they are dead and hold nothing, and one whose parent never reaps it
/// must not keep a stop waiting.
fn group_members(pgid: i32) -> Vec<(i32, ProcStat)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, read_stat(pid).ok()?)))
        .filter(|(_, stat)| stat.pgrp == pgid && !matches!(stat.state, 'Z' | 'X'))
        .collect()
}

/// The pids of group `pgid` that are still alive.
pub(crate) fn live_group_members(pgid: i32) -> Vec<i32> {
    group_members(pgid)
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

/// How a group stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GroupStop {
    /// Every process exited within the grace period after SIGTERM.
    Exited,
    /// Some had to be killed with SIGKILL.
    Killed,
}

/// Stops process group `pgid`: SIGTERM to the whole group, up to `grace`
/// for it to exit (so a task can save its work), then SIGKILL to the group.
/// Returns once no process of the group is alive.
pub(crate) async fn stop_group(pgid: i32, grace: Duration) -> GroupStop {
    let group = Pid::from_raw(pgid);
    if !signal_group(group, Signal::SIGTERM) {
        return GroupStop::Exited;
    }
    if wait_group_exit(pgid, grace).await {
        return GroupStop::Exited;
    }
    tracing::info!(
        pgid,
        "task processes outlived the kill grace; sending SIGKILL"
    );
    signal_group(group, Signal::SIGKILL);
    if !wait_group_exit(pgid, KILL_WAIT).await {
        tracing::warn!(
            pgid,
            members = ?live_group_members(pgid),
            "task processes are still alive after SIGKILL"
        );
    }
    GroupStop::Killed
}

/// Sends `signal` to the group; false when the group no longer exists.
fn signal_group(group: Pid, signal: Signal) -> bool {
    match killpg(group, signal) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        Err(err) => {
            tracing::warn!(%group, %signal, %err, "signalling a task's process group");
            true
        }
    }
}

/// Polls until no member of `pgid` is alive; false if `limit` passed first.
async fn wait_group_exit(pgid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if live_group_members(pgid).is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL.min(deadline - Instant::now())).await;
    }
}

/// The exit code as a shell reports it: the code, or 128 + the signal.
pub(crate) fn exit_code(status: ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let line = "4242 (a (weird) name) S 1 4240 4240 0 -1 4194560 105 0 0 0 0 0 0 0 20 0 1 0 987654 4096 100";
        let stat = parse_stat(line).expect("parses");
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.pgrp, 4240);
        assert_eq!(stat.start_time, 987654);
        assert!(parse_stat("4242 (x) S 1").is_none());
    }

    #[test]
    fn this_process_has_an_identity() -> io::Result<()> {
        let me = ProcessIdentity::of(std::process::id() as i32)?;
        assert!(me.start_time > 0);
        assert_eq!(me.boot_id, boot_id()?);
        let reused = ProcessIdentity {
            start_time: me.start_time + 1,
            ..me.clone()
        };
        // This process leads no group of its own here, but a changed start
        // time must rule it out whatever the group.
        assert!(reused.surviving_members().is_empty());
        let other_boot = ProcessIdentity {
            boot_id: "another boot".into(),
            ..me
        };
        assert!(other_boot.surviving_members().is_empty());
        Ok(())
    }
}
