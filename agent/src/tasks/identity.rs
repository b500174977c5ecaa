//! Who a task runs as. Batch's `userIdentity.autoUser`:
//!
//! - `elevationLevel: nonadmin` (the default): an unprivileged user, with
//!   no capabilities (bounding set emptied before the uid changes, nothing
//!   inherited or ambient), no supplementary groups and `no_new_privs`.
//!   - `scope: task` (the default without `userIdentity`): a uid and gid
//!     of the task's own, drawn from [`TASK_UIDS`] when it first starts and
//!     kept in its record until its files are deleted, so no other task
//!     can read them.
//!   - `scope: pool` (Batch's default once `autoUser` is given): the
//!     `[tasks] user` account (`reimage-task`, shipped as a sysusers.d
//!     file; `nobody` with a warning where it does not exist), shared by
//!     every pool-scoped task, which can therefore read each other's files.
//! - `elevationLevel: admin`: root with the agent's capabilities; only an
//!   admin token may ask for it.
//!
//! An agent that does not run as root cannot switch users: its tasks run
//! as its own user, and it says so once.

use super::TaskError;
use nix::unistd::{Gid, Uid};
use reimage_protocol::api::{AutoUserScope, AutoUserSpecification, ElevationLevel, UserIdentity};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io;
use std::ops::RangeInclusive;

/// The default `[tasks] user`.
pub const DEFAULT_TASK_USER: &str = "reimage-task";

/// Where per-task uids (and gids, the same numbers) come from: 65,536 ids
/// at the start of the range systemd documents as unused (1879048192–
/// 2147352575), above the subordinate ids `useradd` hands out
/// (100000–600100000) and away from systemd's DynamicUser range
/// (61184–65519), whose allocator would not know about these.
pub const TASK_UIDS: RangeInclusive<u32> = 0x7000_0000..=0x7000_FFFF;

/// Who asks for a task: only an admin may have it run as root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requester {
    /// An operator token: tasks and scheduling, unprivileged tasks only.
    Operator,
    /// An admin token: may add `elevationLevel: admin` tasks.
    Admin,
}

/// A uid and gid a task's processes run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// Whether this is a per-task id from [`TASK_UIDS`].
    pub fn is_per_task(&self) -> bool {
        TASK_UIDS.contains(&self.uid)
    }
}

/// The identity a task asked for, with Batch's defaults filled in: no
/// `userIdentity` is a nonadmin user of the task's own; an `autoUser`
/// without a scope is the pool's user. A `username` (named accounts) is
/// refused until the agent manages accounts; an elevated task needs an
/// admin.
pub(crate) fn resolve(
    identity: Option<&UserIdentity>,
    requester: Requester,
) -> Result<UserIdentity, TaskError> {
    let auto = match identity {
        None => AutoUserSpecification {
            scope: Some(AutoUserScope::Task),
            elevation_level: Some(ElevationLevel::NonAdmin),
        },
        Some(UserIdentity {
            username: Some(_), ..
        }) => {
            return Err(TaskError::UnsupportedUserIdentity(
                "userIdentity.username: named user accounts are not supported; use userIdentity.autoUser".into(),
            ));
        }
        Some(UserIdentity {
            auto_user: None, ..
        }) => {
            return Err(TaskError::UnsupportedUserIdentity(
                "userIdentity needs autoUser (userIdentity.username is not supported)".into(),
            ));
        }
        Some(UserIdentity {
            auto_user: Some(auto),
            ..
        }) => AutoUserSpecification {
            scope: Some(auto.scope.unwrap_or(AutoUserScope::Pool)),
            elevation_level: Some(auto.elevation_level.unwrap_or(ElevationLevel::NonAdmin)),
        },
    };
    if auto.elevation_level == Some(ElevationLevel::Admin) && requester != Requester::Admin {
        return Err(TaskError::ElevationNotAllowed);
    }
    Ok(UserIdentity {
        auto_user: Some(auto),
        username: None,
    })
}

/// The scope and elevation of a resolved identity; a record from before
/// identities existed reads as the default (task, nonadmin).
pub(crate) fn scope_and_level(identity: &UserIdentity) -> (AutoUserScope, ElevationLevel) {
    let auto = identity.auto_user.clone().unwrap_or_default();
    (
        auto.scope.unwrap_or(AutoUserScope::Task),
        auto.elevation_level.unwrap_or(ElevationLevel::NonAdmin),
    )
}

/// The accounts tasks can run as on this node, found once at start.
#[derive(Debug, Clone)]
pub(crate) struct TaskUsers {
    /// False when the agent is not root: tasks then run as the agent's user.
    can_switch: bool,
    /// The account of pool-scoped tasks.
    pool: RunAs,
}

impl TaskUsers {
    /// Looks up `[tasks] user` (falling back to `nobody`, with a warning)
    /// and whether the agent may switch users at all.
    pub fn find(user: &str) -> TaskUsers {
        let can_switch = Uid::effective().is_root();
        if !can_switch {
            tracing::warn!(
                uid = Uid::effective().as_raw(),
                "the agent does not run as root: tasks run as its own user, unisolated from each other and from its state"
            );
        }
        let pool = match lookup(user) {
            Some(account) => account,
            None => {
                let nobody = lookup("nobody").unwrap_or(RunAs {
                    uid: 65534,
                    gid: 65534,
                });
                if can_switch {
                    tracing::warn!(
                        user,
                        uid = nobody.uid,
                        "[tasks] user does not exist (install the sysusers.d file): pool-scoped tasks run as nobody"
                    );
                }
                nobody
            }
        };
        TaskUsers { can_switch, pool }
    }

    /// Whether the agent can run tasks as other users.
    pub fn can_switch(&self) -> bool {
        self.can_switch
    }

    /// The account a run of a task with `identity` uses: `None` for root
    /// (or the agent's own user when it cannot switch). A task-scoped one
    /// keeps `previous` (its own uid from an earlier run) or gets a free
    /// one; `taken` holds the per-task uids of other tasks.
    pub fn run_as(
        &self,
        identity: &UserIdentity,
        previous: Option<RunAs>,
        taken: &HashSet<u32>,
    ) -> io::Result<Option<RunAs>> {
        if !self.can_switch {
            return Ok(None);
        }
        match scope_and_level(identity) {
            (_, ElevationLevel::Admin) => Ok(None),
            (AutoUserScope::Pool, ElevationLevel::NonAdmin) => Ok(Some(self.pool)),
            (AutoUserScope::Task, ElevationLevel::NonAdmin) => match previous {
                Some(own) if own.is_per_task() => Ok(Some(own)),
                _ => allocate_task_uid(taken).map(Some),
            },
        }
    }
}

/// The uid and primary gid of account `name`.
fn lookup(name: &str) -> Option<RunAs> {
    let user = nix::unistd::User::from_name(name).ok().flatten()?;
    Some(RunAs {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    })
}

/// A uid (and the gid of the same number) from [`TASK_UIDS`] that no other
/// task holds, no account or group in the user database has, and no
/// process runs as. Drawn at random, so that two agents on one machine (or
/// a uid given up a moment ago) rarely meet.
fn allocate_task_uid(taken: &HashSet<u32>) -> io::Result<RunAs> {
    let running = uids_of_processes();
    let span = TASK_UIDS.end() - TASK_UIDS.start() + 1;
    let mut seed = [0u8; 4];
    getrandom::fill(&mut seed).map_err(|e| io::Error::other(e.to_string()))?;
    let start = u32::from_le_bytes(seed) % span;
    for offset in 0..span {
        let uid = TASK_UIDS.start() + (start + offset) % span;
        if taken.contains(&uid) || running.contains(&uid) {
            continue;
        }
        let account = nix::unistd::User::from_uid(Uid::from_raw(uid));
        let group = nix::unistd::Group::from_gid(Gid::from_raw(uid));
        if matches!(account, Ok(None)) && matches!(group, Ok(None)) {
            return Ok(RunAs { uid, gid: uid });
        }
    }
    Err(io::Error::other(format!(
        "every uid in {}-{} is in use",
        TASK_UIDS.start(),
        TASK_UIDS.end()
    )))
}

/// The uids of running processes within [`TASK_UIDS`].
fn uids_of_processes() -> HashSet<u32> {
    let Ok(processes) = procfs::process::all_processes() else {
        return HashSet::new();
    };
    processes
        .filter_map(|p| p.ok()?.uid().ok())
        .filter(|uid| TASK_UIDS.contains(uid))
        .collect()
}

/// `struct __user_cap_header_struct` of capset(2).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct` of capset(2).
#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets, as two `CapData`.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// What a forked child does to become the task's unprivileged user.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PrivilegeDrop {
    run_as: RunAs,
}

impl PrivilegeDrop {
    /// Dropping to `run_as`.
    pub fn to(run_as: RunAs) -> PrivilegeDrop {
        PrivilegeDrop { run_as }
    }

    /// Empties the capability bounding set (it needs CAP_SETPCAP, so
    /// before the uid changes), clears the ambient set, drops every
    /// supplementary group, sets gid then uid (real, effective, saved: no
    /// way back), clears the inheritable set that survives a uid change,
    /// and sets `no_new_privs` so that no setuid binary or file capability
    /// gives anything back. Async-signal-safe: meant for the child between
    /// fork and exec.
    pub fn apply(&self) -> io::Result<()> {
        use nix::libc;
        let RunAs { uid, gid } = self.run_as;
        // SAFETY: plain system calls on stack data; no allocation, no locks.
        unsafe {
            for cap in 0..64 {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                    let err = io::Error::last_os_error();
                    // EINVAL: past the last capability this kernel knows.
                    if err.raw_os_error() == Some(libc::EINVAL) {
                        break;
                    }
                    return Err(err);
                }
            }
            // EINVAL: a kernel before ambient capabilities (4.3) has none to clear.
            if libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ) != 0
                && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
            {
                return Err(io::Error::last_os_error());
            }
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
            let mut header = CapHeader {
                version: CAPABILITY_VERSION_3,
                pid: 0,
            };
            let none = [CapData {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            }; 2];
            if libc::syscall(
                libc::SYS_capset,
                &mut header as *mut CapHeader,
                none.as_ptr(),
            ) != 0
                || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto(scope: Option<AutoUserScope>, level: Option<ElevationLevel>) -> UserIdentity {
        UserIdentity {
            auto_user: Some(AutoUserSpecification {
                scope,
                elevation_level: level,
            }),
            username: None,
        }
    }

    #[test]
    fn identities_get_batch_defaults() {
        let resolved = |identity: Option<&UserIdentity>| {
            scope_and_level(&resolve(identity, Requester::Operator).expect("resolves"))
        };
        assert_eq!(
            resolved(None),
            (AutoUserScope::Task, ElevationLevel::NonAdmin)
        );
        assert_eq!(
            resolved(Some(&auto(None, None))),
            (AutoUserScope::Pool, ElevationLevel::NonAdmin)
        );
        assert_eq!(
            resolved(Some(&auto(Some(AutoUserScope::Task), None))),
            (AutoUserScope::Task, ElevationLevel::NonAdmin)
        );
        // A record stored before identities existed.
        assert_eq!(
            scope_and_level(&UserIdentity::default()),
            (AutoUserScope::Task, ElevationLevel::NonAdmin)
        );
    }

    #[test]
    fn only_an_admin_may_elevate() {
        let elevated = auto(None, Some(ElevationLevel::Admin));
        let err = resolve(Some(&elevated), Requester::Operator).expect_err("refused");
        assert_eq!(err.code(), "InsufficientPermissions");
        let ok = resolve(Some(&elevated), Requester::Admin).expect("an admin may");
        assert_eq!(
            scope_and_level(&ok),
            (AutoUserScope::Pool, ElevationLevel::Admin)
        );
    }

    #[test]
    fn named_users_are_refused_naming_the_field() {
        let named = UserIdentity {
            auto_user: None,
            username: Some("alice".into()),
        };
        let err = resolve(Some(&named), Requester::Admin).expect_err("refused");
        assert_eq!(err.code(), "UnsupportedUserIdentity");
        assert!(err.to_string().contains("userIdentity.username"), "{err}");
        let empty = UserIdentity::default();
        let err = resolve(Some(&empty), Requester::Admin).expect_err("refused");
        assert!(err.to_string().contains("autoUser"), "{err}");
    }

    #[test]
    fn per_task_uids_are_free_and_distinct() {
        let users = TaskUsers {
            can_switch: true,
            pool: RunAs {
                uid: 65534,
                gid: 65534,
            },
        };
        let task = resolve(None, Requester::Operator).expect("default");
        let mut taken = HashSet::new();
        for _ in 0..50 {
            let run_as = users
                .run_as(&task, None, &taken)
                .expect("allocates")
                .expect("a user");
            assert!(run_as.is_per_task(), "{run_as:?}");
            assert_eq!(run_as.uid, run_as.gid);
            assert!(taken.insert(run_as.uid), "{} handed out twice", run_as.uid);
        }
        let kept = RunAs {
            uid: *TASK_UIDS.start(),
            gid: *TASK_UIDS.start(),
        };
        assert_eq!(
            users.run_as(&task, Some(kept), &taken).expect("kept"),
            Some(kept)
        );
        // A pool user in a record is not kept by a task-scoped task.
        let again = users
            .run_as(&task, Some(users.pool), &taken)
            .expect("allocates")
            .expect("a user");
        assert!(again.is_per_task());
        let pool = auto(Some(AutoUserScope::Pool), None);
        assert_eq!(
            users.run_as(&pool, None, &taken).expect("pool"),
            Some(users.pool)
        );
        let admin = auto(None, Some(ElevationLevel::Admin));
        assert_eq!(users.run_as(&admin, None, &taken).expect("root"), None);
    }
}
