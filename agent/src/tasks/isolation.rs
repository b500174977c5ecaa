//! How task runs are contained, so that a stop reaches every process a run
//! started: a cgroup v2 per run where the agent has a writable one, a
//! process group per run where it has none (some containers), which a
//! process leaves with `setsid`. The choice is made once at start, logged
//! when it is the weaker one, and shown as `taskIsolation` in `/v1/node`.

use super::cgroup::{CgroupTree, TaskCgroup};
use super::process::{live_group_members, stop_group};
use reimage_protocol::api::TaskIsolation;
use std::path::Path;
use std::time::Duration;

/// The node's way of containing task runs.
#[derive(Debug)]
pub(crate) enum Isolation {
    /// Every run in a cgroup of its own below the agent's subtree.
    Cgroup(CgroupTree),
    /// Every run leads a process group.
    ProcessGroup,
}

impl Isolation {
    /// Cgroups if the agent's own cgroup v2 lets it make the subtree for
    /// `tasks_dir`, else process groups with a warning saying why.
    pub fn detect(tasks_dir: &Path) -> Isolation {
        Isolation::choose(CgroupTree::open(tasks_dir))
    }

    /// The decision itself, on what looking for a cgroup found.
    pub fn choose(found: Result<CgroupTree, String>) -> Isolation {
        match found {
            Ok(tree) => {
                tracing::info!(cgroup = %tree.dir().display(), "tasks run in cgroups of their own");
                Isolation::Cgroup(tree)
            }
            Err(why) => {
                tracing::warn!(
                    reason = %why,
                    "no writable cgroup v2: tasks run in process groups, which a process leaves with setsid"
                );
                Isolation::ProcessGroup
            }
        }
    }

    /// What `/v1/node` shows.
    pub fn kind(&self) -> TaskIsolation {
        match self {
            Isolation::Cgroup(_) => TaskIsolation::Cgroup,
            Isolation::ProcessGroup => TaskIsolation::ProcessGroup,
        }
    }
}

/// Where one run's processes are.
#[derive(Debug)]
pub(crate) enum Containment {
    Cgroup(TaskCgroup),
    /// The group id (the pid of the run's `sh`).
    ProcessGroup(i32),
}

impl Containment {
    /// Whether any process of the run is still alive.
    pub fn is_occupied(&self) -> bool {
        match self {
            Containment::Cgroup(cgroup) => cgroup.is_populated(),
            Containment::ProcessGroup(pgid) => !live_group_members(*pgid).is_empty(),
        }
    }

    /// SIGTERM to every process of the run, `grace`, then SIGKILL to all;
    /// returns once none is left (or the kill wait ran out, logged).
    pub async fn stop(&self, grace: Duration) {
        match self {
            Containment::Cgroup(cgroup) => cgroup.stop(grace).await,
            Containment::ProcessGroup(pgid) => stop_group(*pgid, grace).await,
        }
    }

    /// Gives up what held the run (the empty cgroup).
    pub async fn release(self) {
        if let Containment::Cgroup(cgroup) = self {
            cgroup.remove().await;
        }
    }
}
