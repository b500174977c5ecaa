//! One cgroup v2 per task run, so that stopping a task reaches every
//! process it started, including those that left its process group
//! (`setsid`, daemons that double-fork).
//!
//! The runs live in a subtree of the agent's own cgroup (the one
//! `/proc/self/cgroup` names; the unit has `Delegate=yes`):
//! `<own>/reimage-agent-<hash of the tasks directory>/<task id>.<run>`.
//! The hash keeps agents that share a cgroup apart (the end-to-end tests
//! start many as root in `/`), and a restarted agent finds its own
//! leftovers by it. The agent itself stays in `<own>`: it enables no
//! controllers for the subtree, so cgroup v2's no-internal-processes rule
//! does not apply (a memory or pids limit per task would need the agent to
//! move into a leaf of its own first).

use super::process::{KILL_WAIT, POLL};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use procfs::ProcessCGroups;
use procfs::process::MountInfos;
use sha2::{Digest, Sha256};
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

/// Prefix of the agent's subtree below its own cgroup.
const SUBTREE_PREFIX: &str = "reimage-agent-";

/// The agent's subtree, where every task run gets a cgroup. Dropped (the
/// task manager gone), it is removed if empty; one that is not stays for
/// the next start to sweep.
#[derive(Debug)]
pub(crate) struct CgroupTree {
    dir: PathBuf,
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        self.remove_if_empty();
    }
}

impl CgroupTree {
    /// Finds the agent's own cgroup v2 (from `/proc/self/mountinfo` and
    /// `/proc/self/cgroup`) and creates the subtree for the tasks kept in
    /// `tasks_dir`. The error says why tasks must do with process groups.
    pub fn open(tasks_dir: &Path) -> Result<CgroupTree, String> {
        let myself = procfs::process::Process::myself()
            .map_err(|e| format!("cannot read /proc/self: {e}"))?;
        let mounts = myself
            .mountinfo()
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let cgroups = myself
            .cgroups()
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let own = own_cgroup_dir(&mounts, &cgroups)?;
        CgroupTree::open_below(&own, tasks_dir)
    }

    /// Creates (or reuses) the subtree for `tasks_dir` below the cgroup
    /// directory `own` and checks that the agent can place processes there.
    pub fn open_below(own: &Path, tasks_dir: &Path) -> Result<CgroupTree, String> {
        let dir = own.join(subtree_name(tasks_dir));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(format!("cannot create the cgroup {}: {err}", dir.display())),
        }
        // mkdir in a cgroup2 file system makes the interface files; in
        // anything else (a read-only or tmpfs stand-in) it does not.
        let procs = dir.join("cgroup.procs");
        if !procs.is_file() {
            let _ = std::fs::remove_dir(&dir);
            return Err(format!("{} is not a cgroup v2 directory", own.display()));
        }
        nix::unistd::access(&procs, nix::unistd::AccessFlags::W_OK)
            .map_err(|e| format!("cannot write {}: {e}", procs.display()))?;
        Ok(CgroupTree { dir })
    }

    /// The subtree's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes the subtree if no run cgroup is left in it (the agent is
    /// stopping); a later run makes it again.
    pub fn remove_if_empty(&self) {
        let _ = std::fs::remove_dir(&self.dir);
    }

    /// Creates the cgroup of run `run` (the task's requeue count) of task
    /// `id`. A name still taken (a leftover whose removal failed) gets a
    /// suffix: a run never shares a cgroup with processes it did not start.
    pub fn create_run(&self, id: &str, run: u32) -> io::Result<TaskCgroup> {
        let mut attempt = 0u32;
        let mut recreated = false;
        loop {
            let name = match attempt {
                0 => format!("{id}.{run}"),
                n => format!("{id}.{run}.{n}"),
            };
            let dir = self.dir.join(&name);
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok(TaskCgroup { dir }),
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => {
                    attempt += 1;
                }
                // The (empty) subtree was removed under the agent: make it again.
                Err(err) if err.kind() == io::ErrorKind::NotFound && !recreated => {
                    std::fs::create_dir(&self.dir).or_else(|e| match e.kind() {
                        io::ErrorKind::AlreadyExists => Ok(()),
                        _ => Err(e),
                    })?;
                    recreated = true;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// The run cgroups an earlier agent left behind (after `kill -9` or a
    /// crash): every cgroup in the subtree is one.
    pub fn leftovers(&self) -> Vec<TaskCgroup> {
        child_cgroups(&self.dir)
            .into_iter()
            .map(|dir| TaskCgroup { dir })
            .collect()
    }
}

/// `reimage-agent-<16 hex digits of SHA-256 of the tasks directory>`: the
/// same for every start of one agent, different for two agents.
pub(crate) fn subtree_name(tasks_dir: &Path) -> String {
    let digest = Sha256::digest(tasks_dir.as_os_str().as_bytes());
    format!("{SUBTREE_PREFIX}{}", &hex::encode(digest)[..16])
}

/// The directory of this process's cgroup v2, or why there is none: no
/// cgroup2 file system mounted, the process is in no v2 hierarchy, or its
/// cgroup is outside every cgroup2 mount (another cgroup namespace's).
pub(crate) fn own_cgroup_dir(
    mounts: &MountInfos,
    cgroups: &ProcessCGroups,
) -> Result<PathBuf, String> {
    let own = cgroups
        .0
        .iter()
        .find(|c| c.hierarchy == 0 && c.controllers.is_empty())
        .map(|c| c.pathname.clone())
        .ok_or("the agent is in no cgroup v2 hierarchy (no 0:: line in /proc/self/cgroup)")?;
    let v2: Vec<_> = mounts.0.iter().filter(|m| m.fs_type == "cgroup2").collect();
    if v2.is_empty() {
        return Err("no cgroup2 file system is mounted".into());
    }
    v2.iter()
        .find_map(|mount| {
            let root = mount.root.trim_end_matches('/');
            let below = own.strip_prefix(root)?;
            if !below.is_empty() && !below.starts_with('/') {
                return None;
            }
            Some(mount.mount_point.join(below.trim_start_matches('/')))
        })
        .ok_or_else(|| format!("the agent's cgroup {own} is under no cgroup2 mount"))
}

/// Parses `/proc/self/mountinfo` and `/proc/self/cgroup` text (for tests).
#[cfg(test)]
pub(crate) fn parse_proc(mountinfo: &str, cgroup: &str) -> (MountInfos, ProcessCGroups) {
    use procfs::FromBufRead;
    (
        MountInfos::from_buf_read(mountinfo.as_bytes()).expect("mountinfo"),
        ProcessCGroups::from_buf_read(cgroup.as_bytes()).expect("cgroup"),
    )
}

/// The child cgroups (directories) of `dir`.
fn child_cgroups(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// What a forked child needs to move itself into a run's cgroup: the path
/// of its `cgroup.procs`, built before the fork.
#[derive(Debug)]
pub(crate) struct CgroupJoin {
    procs: CString,
}

impl CgroupJoin {
    /// Moves the calling process into the cgroup ("0" names the writer).
    /// Async-signal-safe: meant for the child between fork and exec.
    pub fn join_self(&self) -> io::Result<()> {
        // SAFETY: open/write/close on a NUL-terminated path and a static
        // buffer; no allocation, no locks.
        unsafe {
            let fd = nix::libc::open(
                self.procs.as_ptr(),
                nix::libc::O_WRONLY | nix::libc::O_CLOEXEC,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let written = nix::libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = io::Error::last_os_error();
            nix::libc::close(fd);
            if written != 1 {
                return Err(err);
            }
        }
        Ok(())
    }
}

/// The cgroup of one task run.
#[derive(Debug, Clone)]
pub(crate) struct TaskCgroup {
    dir: PathBuf,
}

impl TaskCgroup {
    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The task id in the cgroup's name (`<id>.<run>`); ids hold no dot.
    pub fn task_id(&self) -> String {
        let name = self.dir.file_name().unwrap_or_default().to_string_lossy();
        name.split('.').next().unwrap_or_default().to_owned()
    }

    /// The hook data that puts a child into this cgroup.
    pub fn join(&self) -> io::Result<CgroupJoin> {
        let procs = CString::new(self.dir.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(CgroupJoin { procs })
    }

    /// Whether any process is still in the cgroup or below it
    /// (`cgroup.events`: `populated 1`). A cgroup that is gone holds none.
    pub fn is_populated(&self) -> bool {
        match std::fs::read_to_string(self.dir.join("cgroup.events")) {
            Ok(events) => events
                .lines()
                .any(|line| line.split_whitespace().eq(["populated", "1"])),
            Err(err) if err.kind() == io::ErrorKind::NotFound => false,
            Err(err) => {
                tracing::warn!(cgroup = %self.dir.display(), %err, "reading cgroup.events");
                true
            }
        }
    }

    /// The pids in the cgroup and the cgroups below it (a root task may
    /// make its own).
    pub fn pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        let mut pending = vec![self.dir.clone()];
        while let Some(dir) = pending.pop() {
            if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
            pending.extend(child_cgroups(&dir));
        }
        pids
    }

    /// Stops every process in the cgroup: SIGTERM to each, up to `grace`
    /// for them to exit (so the task can save its work), then `cgroup.kill`.
    /// Returns once the cgroup is empty or the kill wait ran out.
    pub async fn stop(&self, grace: Duration) {
        if !self.is_populated() {
            return;
        }
        // A pid read here could only be reused if its process exited and
        // the kernel cycled through the whole pid space in between.
        self.signal_each(Signal::SIGTERM);
        if self.wait_empty(grace, false).await {
            return;
        }
        tracing::info!(
            cgroup = %self.dir.display(),
            "task processes outlived the kill grace; killing the cgroup"
        );
        let killed = self.kill_all();
        if !self.wait_empty(KILL_WAIT, !killed).await {
            tracing::warn!(
                cgroup = %self.dir.display(),
                pids = ?self.pids(),
                "task processes are still alive after SIGKILL"
            );
        }
    }

    /// SIGKILL to the whole cgroup at once through `cgroup.kill` (Linux
    /// 5.14), which forks cannot race; false when the kernel has none and
    /// each process was signalled instead.
    fn kill_all(&self) -> bool {
        match std::fs::write(self.dir.join("cgroup.kill"), "1") {
            Ok(()) => true,
            Err(err) => {
                if err.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(cgroup = %self.dir.display(), %err, "writing cgroup.kill");
                }
                self.signal_each(Signal::SIGKILL);
                false
            }
        }
    }

    fn signal_each(&self, signal: Signal) {
        for pid in self.pids() {
            match kill(Pid::from_raw(pid), signal) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(err) => tracing::warn!(pid, %signal, %err, "signalling a task process"),
            }
        }
    }

    /// Polls `cgroup.events` until `populated 0`; false if `limit` passed
    /// first. With `keep_killing`, processes forked since the last look are
    /// SIGKILLed too (kernels without `cgroup.kill`).
    async fn wait_empty(&self, limit: Duration, keep_killing: bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if !self.is_populated() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            if keep_killing {
                self.signal_each(Signal::SIGKILL);
            }
            tokio::time::sleep(POLL.min(deadline - Instant::now())).await;
        }
    }

    /// Removes the (empty) cgroup and any a root task made below it. One
    /// that cannot be removed is logged and left: the next agent's start
    /// sweeps it again.
    pub async fn remove(&self) {
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            match remove_tree(&self.dir) {
                Ok(()) => return,
                // The kernel may still count an exiting process for a moment.
                Err(err) if err.raw_os_error() == Some(nix::libc::EBUSY) => {
                    if Instant::now() >= deadline {
                        tracing::warn!(cgroup = %self.dir.display(), %err, "removing a task cgroup");
                        return;
                    }
                    tokio::time::sleep(POLL).await;
                }
                Err(err) => {
                    tracing::warn!(cgroup = %self.dir.display(), %err, "removing a task cgroup");
                    return;
                }
            }
        }
    }
}

/// `rmdir` of a cgroup and its descendants, deepest first (a cgroup's
/// interface files go with it; `remove_dir_all` would try to unlink them).
fn remove_tree(dir: &Path) -> io::Result<()> {
    for child in child_cgroups(dir) {
        remove_tree(&child)?;
    }
    match std::fs::remove_dir(dir) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The cgroup a process is in (`/proc/PID/cgroup`, v2 line).
#[cfg(test)]
pub(crate) fn cgroup_of(pid: i32) -> io::Result<String> {
    let cgroups = procfs::process::Process::new(pid)
        .and_then(|p| p.cgroups())
        .map_err(super::process::proc_error)?;
    cgroups
        .0
        .into_iter()
        .find(|c| c.hierarchy == 0)
        .map(|c| c.pathname)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup v2 line"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const UNIFIED: &str = "\
30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn the_own_cgroup_is_found_under_the_cgroup2_mount() {
        let (mounts, cgroups) = parse_proc(HYBRID, "4:memory:/x\n0::/\n");
        assert_eq!(
            own_cgroup_dir(&mounts, &cgroups),
            Ok(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let (mounts, cgroups) = parse_proc(UNIFIED, "0::/system.slice/reimage-agent.service\n");
        assert_eq!(
            own_cgroup_dir(&mounts, &cgroups),
            Ok(PathBuf::from(
                "/sys/fs/cgroup/system.slice/reimage-agent.service"
            ))
        );
    }

    #[test]
    fn a_cgroup2_mount_of_a_subtree_is_followed() {
        let bind = "50 23 0:26 /system.slice /mnt/cg rw - cgroup2 cgroup2 rw\n";
        let (mounts, cgroups) = parse_proc(bind, "0::/system.slice/a.service\n");
        assert_eq!(
            own_cgroup_dir(&mounts, &cgroups),
            Ok(PathBuf::from("/mnt/cg/a.service"))
        );
        // `/system.slicex` is not below `/system.slice`.
        let (mounts, cgroups) = parse_proc(bind, "0::/system.slicex/a.service\n");
        assert!(own_cgroup_dir(&mounts, &cgroups).is_err());
    }

    #[test]
    fn without_cgroup_v2_tasks_fall_back_to_process_groups() {
        let v1_only = "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let (mounts, cgroups) = parse_proc(v1_only, "4:memory:/x\n0::/\n");
        let why = own_cgroup_dir(&mounts, &cgroups).expect_err("no cgroup2");
        assert!(why.contains("no cgroup2"), "{why}");

        let (mounts, cgroups) = parse_proc(HYBRID, "4:memory:/x\n");
        let why = own_cgroup_dir(&mounts, &cgroups).expect_err("no v2 line");
        assert!(why.contains("0::"), "{why}");

        // A directory that is not a cgroup (mkdir makes no interface files).
        let dir = tempfile::tempdir().expect("tempdir");
        let why =
            CgroupTree::open_below(dir.path(), Path::new("/srv/tasks")).expect_err("not a cgroup");
        assert!(why.contains("not a cgroup v2 directory"), "{why}");
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            0,
            "the probe is cleaned up"
        );
    }

    #[test]
    fn two_task_directories_get_two_subtrees() {
        let a = subtree_name(Path::new("/tmp/a/tasks"));
        let b = subtree_name(Path::new("/tmp/b/tasks"));
        assert_ne!(a, b);
        assert_eq!(a, subtree_name(Path::new("/tmp/a/tasks")));
        assert!(a.starts_with(SUBTREE_PREFIX) && a.len() == SUBTREE_PREFIX.len() + 16);
    }

    #[test]
    fn run_names_carry_the_task_id() {
        let cgroup = TaskCgroup {
            dir: PathBuf::from("/sys/fs/cgroup/x/reimage-agent-0/my-task_1.3.1"),
        };
        assert_eq!(cgroup.task_id(), "my-task_1");
    }
}
