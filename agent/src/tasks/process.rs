//! A task's processes: started as `sh -c <commandLine>` leading a process
//! group of its own (and, where cgroups are usable, inside the run's
//! cgroup and as the task's user before it execs), and identified by pid,
//! start time and boot so that a later agent never signals an unrelated
//! process that reused the pid.

use super::cgroup::CgroupJoin;
use super::identity::PrivilegeDrop;
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

/// The umask tasks start with: the agent's own is stricter (its state
/// must stay private), a task's files are its own business.
const TASK_UMASK: nix::libc::mode_t = 0o022;

/// How often the group is checked while waiting for it to exit.
pub(crate) const POLL: Duration = Duration::from_millis(25);

/// How long to wait for SIGKILLed processes to disappear (a process in
/// uninterruptible sleep dies only when its I/O returns).
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(10);

/// Everything needed to start one run of a task.
#[derive(Debug)]
pub(crate) struct Launch {
    pub command_line: String,
    pub working_dir: PathBuf,
    /// The task's `stdout.txt` and `stderr.txt`, opened by the agent.
    pub stdout: File,
    pub stderr: File,
    /// Set in this order after the clean base environment.
    pub env: Vec<(String, String)>,
    /// Moves the child into the run's cgroup; `None` with process groups only.
    pub cgroup: Option<CgroupJoin>,
    /// Makes the child the task's user; `None` for a task that runs as the agent's user.
    pub privileges: Option<PrivilegeDrop>,
}

/// Starts `sh -c <commandLine>` as the leader of a new process group, in a
/// clean environment (PATH only, then `launch.env`), output to the task's
/// files. Between fork and exec the child joins its cgroup (while it is
/// still root: the agent owns the cgroup files), then drops to the task's
/// user: whatever the command runs is contained and unprivileged from its
/// first instruction.
pub(crate) fn spawn(launch: Launch) -> io::Result<Child> {
    let path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned());
    let Launch {
        command_line,
        working_dir,
        stdout,
        stderr,
        env,
        cgroup,
        privileges,
    } = launch;
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(&command_line)
        .current_dir(&working_dir)
        .env_clear()
        .env("PATH", path)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        // The supervisor decides when the run dies; a dropped handle (the
        // agent shutting down) must leave it to the next agent's orphan check.
        .kill_on_drop(false);
    // SAFETY: the hook runs in the forked child of a multi-threaded
    // process, so it only makes async-signal-safe system calls on data
    // prepared before the fork (no allocation, no locks).
    unsafe {
        command.pre_exec(move || {
            if let Some(cgroup) = &cgroup {
                cgroup.join_self()?;
            }
            if let Some(privileges) = &privileges {
                privileges.apply()?;
            }
            nix::libc::umask(TASK_UMASK);
            Ok(())
        });
    }
    command.spawn()
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
            start_time: read_stat(pid)?.starttime,
            boot_id: crate::system::boot_id()?,
        })
    }

    /// Live members of this process's group that belong to it, if it is
    /// still the same group: same boot, and either the leader with its
    /// recorded start time, or (the leader gone) members that started no
    /// earlier than it did. Linux does not hand out a pid that is still in
    /// use as a process group id, so a leaderless group with the recorded id
    /// is that group's remains.
    pub fn surviving_members(&self) -> Vec<i32> {
        if crate::system::boot_id().ok().as_deref() != Some(self.boot_id.as_str()) {
            return Vec::new();
        }
        match read_stat(self.pid) {
            Ok(leader) if leader.starttime != self.start_time || leader.pgrp != self.pid => {
                return Vec::new();
            }
            _ => {}
        }
        group_members(self.pid)
            .into_iter()
            .filter(|(_, stat)| stat.starttime >= self.start_time)
            .map(|(pid, _)| pid)
            .collect()
    }
}

/// `/proc/PID/stat`.
fn read_stat(pid: i32) -> io::Result<procfs::process::Stat> {
    procfs::process::Process::new(pid)
        .and_then(|process| process.stat())
        .map_err(proc_error)
}

/// A `/proc` read failure as the `io::Error` the rest of the agent handles.
pub(crate) fn proc_error(err: procfs::ProcError) -> io::Error {
    match err {
        procfs::ProcError::Io(err, _) => err,
        procfs::ProcError::NotFound(path) => io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} is gone",
                path.map(|p| p.display().to_string()).unwrap_or_default()
            ),
        ),
        other => io::Error::other(other.to_string()),
    }
}

/// Processes of group `pgid` that have not exited. Zombies are left out:
/// they are dead and hold nothing, and one whose parent never reaps it
/// must not keep a stop waiting.
fn group_members(pgid: i32) -> Vec<(i32, procfs::process::Stat)> {
    let Ok(processes) = procfs::process::all_processes() else {
        return Vec::new();
    };
    processes
        .filter_map(|process| {
            let stat = process.ok()?.stat().ok()?;
            Some((stat.pid, stat))
        })
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

/// Stops process group `pgid`: SIGTERM to the whole group, up to `grace`
/// for it to exit (so a task can save its work), then SIGKILL to the group.
/// Returns once no process of the group is alive. A process that left the
/// group (`setsid`) is out of reach: only a cgroup holds those.
pub(crate) async fn stop_group(pgid: i32, grace: Duration) {
    let group = Pid::from_raw(pgid);
    if !signal_group(group, Signal::SIGTERM) {
        return;
    }
    if wait_group_exit(pgid, grace).await {
        return;
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
    fn this_process_has_an_identity() -> io::Result<()> {
        let me = ProcessIdentity::of(std::process::id() as i32)?;
        assert!(me.start_time > 0);
        assert_eq!(me.boot_id, crate::system::boot_id()?);
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

    #[test]
    fn a_vanished_process_reads_as_not_found() {
        // Pid max is below this on every Linux configuration.
        let err = ProcessIdentity::of(i32::MAX).expect_err("no such process");
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }
}
