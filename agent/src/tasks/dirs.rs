//! The task directories and who may reach them:
//!
//! ```text
//! work_dir/tasks/          root 0711: a task reaches its own directory by name, lists none
//! └── <id>/                root:<task gid> 01770: the task may add files beside its output;
//!     │                    the sticky bit keeps it from replacing the agent's
//!     ├── stdout.txt       root:<task gid> 0640: written through descriptors the agent opened
//!     ├── stderr.txt
//!     └── wd/              <task uid>:<task gid> 0700: working directory and HOME
//! ```
//!
//! Every directory above `work_dir/tasks` must let the task's user search
//! it. The agent makes `work_dir` searchable and, when `work_dir` is inside
//! `state_dir` (the default), each directory between them and `state_dir`
//! itself: mode 0711, searchable but not listable, with every other entry
//! of `state_dir` (the store, tokens, staging, handoff files) made private
//! to root. A `state_dir` outside the tasks' path is made 0700. Directories
//! above are the operator's: checked (a task that could not reach its
//! directory fails with the directory named), never changed.
//!
//! Everything here opens with `O_NOFOLLOW` and changes owners and modes
//! through the descriptor: a task that replaced its `wd` with a symlink
//! must not get the agent to chown what the link points at.

use super::identity::RunAs;
use std::fs::{File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of `work_dir/tasks`.
const TASKS_ROOT_MODE: u32 = 0o711;
/// Mode of a task's directory run by another user: group (the task)
/// may add files, the sticky bit keeps it from removing the agent's.
const TASK_DIR_MODE: u32 = 0o1770;
/// Mode of a task's working directory.
const WORKING_DIR_MODE: u32 = 0o700;
/// Mode of `stdout.txt` and `stderr.txt`: the task may read its own output.
const OUTPUT_MODE: u32 = 0o640;

/// Creates `tasks_root` (`work_dir/tasks`) and sets the modes of the path
/// to it and of `state_dir` as the module describes.
pub(crate) fn prepare_tasks_root(tasks_root: &Path, state_dir: Option<&Path>) -> io::Result<()> {
    std::fs::create_dir_all(tasks_root)?;
    set_mode(tasks_root, TASKS_ROOT_MODE)?;
    let inside_state = state_dir.filter(|state| tasks_root.starts_with(state));
    let mut dir = tasks_root.parent();
    while let Some(current) = dir {
        allow_search(current)?;
        match inside_state {
            Some(state) if current != state => dir = current.parent(),
            // Only work_dir itself when the state is elsewhere.
            _ => break,
        }
    }
    let Some(state) = state_dir else {
        return Ok(());
    };
    match inside_state {
        Some(state) => {
            set_mode(state, 0o711)?;
            let on_path = tasks_root
                .strip_prefix(state)
                .ok()
                .and_then(|rest| rest.components().next())
                .map(|c| c.as_os_str().to_owned());
            for entry in std::fs::read_dir(state)?.flatten() {
                if Some(entry.file_name()) != on_path {
                    make_private(&entry.path())?;
                }
            }
        }
        None => make_private(state)?,
    }
    Ok(())
}

/// Adds search permission for group and others (never read).
fn allow_search(dir: &Path) -> io::Result<()> {
    let mode = std::fs::metadata(dir)?.mode() & 0o7777;
    if mode & 0o011 != 0o011 {
        set_mode(dir, mode | 0o011)?;
    }
    Ok(())
}

/// Takes group's and others' permissions away (symlinks are left: their
/// mode means nothing, and chmod would follow them).
fn make_private(path: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    let mode = meta.mode() & 0o7777;
    if !meta.file_type().is_symlink() && mode & 0o077 != 0 {
        set_mode(path, mode & !0o077)?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    std::fs::set_permissions(path, Permissions::from_mode(mode))
}

/// The first directory on the way to `path` (itself included) that
/// `run_as` may not search, with its mode and owner; `None` when it can
/// reach `path`. A process without supplementary groups (tasks have none)
/// is judged by owner, then group, then others.
pub(crate) fn blocking_dir(path: &Path, run_as: RunAs) -> Option<(PathBuf, u32, u32)> {
    let mut blocking = None;
    for dir in path.ancestors() {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        let bit = if meta.uid() == run_as.uid {
            0o100
        } else if meta.gid() == run_as.gid {
            0o010
        } else {
            0o001
        };
        if meta.mode() & bit == 0 {
            // Keep the topmost: fixing a lower one would not help.
            blocking = Some((dir.to_path_buf(), meta.mode() & 0o7777, meta.uid()));
        }
    }
    blocking
}

/// A run's directories and output files, ready for the task's user.
#[derive(Debug)]
pub(crate) struct RunFiles {
    pub working_dir: PathBuf,
    pub stdout: File,
    pub stderr: File,
}

/// Creates (or takes over from an earlier run) `task_dir` and its `wd`,
/// `stdout.txt` and `stderr.txt` (truncated: each run starts them afresh),
/// owned as the module describes for `run_as` (`None`: the agent's own
/// user, root or not, and private to it).
pub(crate) fn prepare_run(task_dir: &Path, run_as: Option<RunAs>) -> io::Result<RunFiles> {
    let group = run_as.map(|r| r.gid);
    let dir = open_dir(task_dir)?;
    std::os::unix::fs::fchown(&dir, None, group)?;
    dir.set_permissions(Permissions::from_mode(match run_as {
        Some(_) => TASK_DIR_MODE,
        None => 0o700,
    }))?;

    let working_dir = task_dir.join("wd");
    let wd = open_dir(&working_dir)?;
    if let Some(run_as) = run_as
        && wd.metadata()?.uid() != run_as.uid
    {
        // Files an earlier run left as another user (before an upgrade,
        // or under another `[tasks] user`) become this run's.
        chown_tree(&working_dir, run_as)?;
    }
    wd.set_permissions(Permissions::from_mode(WORKING_DIR_MODE))?;

    let output = |name: &str| -> io::Result<File> {
        let file = open_output(&task_dir.join(name))?;
        std::os::unix::fs::fchown(&file, None, group)?;
        file.set_permissions(Permissions::from_mode(OUTPUT_MODE))?;
        Ok(file)
    };
    Ok(RunFiles {
        stdout: output("stdout.txt")?,
        stderr: output("stderr.txt")?,
        working_dir,
    })
}

/// Opens directory `path`, creating it; anything else in its place (a
/// symlink, a file) is removed first.
fn open_dir(path: &Path) -> io::Result<File> {
    let open = || {
        OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
            .open(path)
    };
    match std::fs::create_dir(path) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(err),
    }
    match open() {
        Ok(dir) => Ok(dir),
        Err(err)
            if matches!(
                err.raw_os_error(),
                Some(nix::libc::ELOOP | nix::libc::ENOTDIR)
            ) =>
        {
            std::fs::remove_file(path)?;
            std::fs::create_dir(path)?;
            open()
        }
        Err(err) => Err(err),
    }
}

/// Opens (truncating) an output file without following a symlink at `path`.
fn open_output(path: &Path) -> io::Result<File> {
    let open = || {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(OUTPUT_MODE)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
    };
    match open() {
        Err(err) if err.raw_os_error() == Some(nix::libc::ELOOP) => {
            std::fs::remove_file(path)?;
            open()
        }
        other => other,
    }
}

/// `lchown` of `dir` and everything below it to `run_as` (symlinks
/// themselves, never their targets).
fn chown_tree(dir: &Path, run_as: RunAs) -> io::Result<()> {
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        std::os::unix::fs::lchown(&path, Some(run_as.uid), Some(run_as.gid))?;
        if std::fs::symlink_metadata(&path)?.is_dir() {
            pending.extend(std::fs::read_dir(&path)?.flatten().map(|e| e.path()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).expect("stat").mode() & 0o7777
    }

    #[test]
    fn a_state_dir_holding_the_tasks_is_searchable_and_the_rest_private() {
        let top = tempfile::tempdir().expect("tempdir");
        let state = top.path().join("state");
        std::fs::create_dir(&state).expect("state");
        set_mode(&state, 0o700).expect("chmod");
        std::fs::write(state.join("agent.redb"), "db").expect("db");
        set_mode(&state.join("agent.redb"), 0o644).expect("chmod");
        std::fs::create_dir(state.join("staging")).expect("staging");
        set_mode(&state.join("staging"), 0o755).expect("chmod");
        let tasks_root = state.join("tasks/tasks");

        prepare_tasks_root(&tasks_root, Some(&state)).expect("prepared");
        assert_eq!(mode(&state), 0o711);
        assert_eq!(mode(&state.join("agent.redb")), 0o600);
        assert_eq!(mode(&state.join("staging")), 0o700);
        assert_eq!(mode(&state.join("tasks")) & 0o011, 0o011);
        assert_eq!(mode(&tasks_root), TASKS_ROOT_MODE);
    }

    #[test]
    fn a_state_dir_beside_the_tasks_is_closed() {
        let top = tempfile::tempdir().expect("tempdir");
        set_mode(top.path(), 0o700).expect("chmod");
        let state = top.path().join("state");
        std::fs::create_dir(&state).expect("state");
        set_mode(&state, 0o755).expect("chmod");
        let work = top.path().join("work");
        std::fs::create_dir(&work).expect("work");
        set_mode(&work, 0o700).expect("chmod");
        prepare_tasks_root(&work.join("tasks"), Some(&state)).expect("prepared");
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&work), 0o711);
        // The operator's directory above is left as it was.
        assert_eq!(mode(top.path()), 0o700);
    }

    #[test]
    fn the_blocking_directory_is_the_topmost_unsearchable_one() {
        let top = tempfile::tempdir().expect("tempdir");
        let deep = top.path().join("a/b");
        std::fs::create_dir_all(&deep).expect("dirs");
        set_mode(top.path(), 0o700).expect("chmod");
        set_mode(&top.path().join("a"), 0o700).expect("chmod");
        let stranger = RunAs {
            uid: 0x7000_0001,
            gid: 0x7000_0001,
        };
        let (dir, mode, _) = blocking_dir(&deep, stranger).expect("blocked");
        assert_eq!(dir, top.path());
        assert_eq!(mode, 0o700);
        set_mode(top.path(), 0o711).expect("chmod");
        assert_eq!(
            blocking_dir(&deep, stranger).map(|b| b.0),
            Some(top.path().join("a"))
        );
        set_mode(&top.path().join("a"), 0o701).expect("chmod");
        assert_eq!(blocking_dir(&deep, stranger), None);
    }

    #[test]
    fn a_symlinked_working_dir_is_replaced_not_followed() {
        if !reimage_e2e::is_root() {
            return reimage_e2e::skip(
                "a_symlinked_working_dir_is_replaced_not_followed",
                "chown needs root",
            );
        }
        let top = tempfile::tempdir().expect("tempdir");
        let precious = top.path().join("precious");
        std::fs::create_dir(&precious).expect("precious");
        let task_dir = top.path().join("t1");
        std::fs::create_dir(&task_dir).expect("task dir");
        std::os::unix::fs::symlink(&precious, task_dir.join("wd")).expect("symlink");
        std::os::unix::fs::symlink(precious.join("secret"), task_dir.join("stdout.txt"))
            .expect("symlink");
        let run_as = RunAs {
            uid: 0x7000_0002,
            gid: 0x7000_0002,
        };

        let files = prepare_run(&task_dir, Some(run_as)).expect("prepared");
        let meta = std::fs::metadata(&precious).expect("stat");
        assert_eq!(
            (meta.uid(), meta.gid()),
            (0, 0),
            "the link target is untouched"
        );
        assert!(!precious.join("secret").exists());
        let wd = std::fs::symlink_metadata(&files.working_dir).expect("stat");
        assert!(wd.is_dir());
        assert_eq!(
            (wd.uid(), wd.gid(), wd.mode() & 0o7777),
            (run_as.uid, run_as.gid, 0o700)
        );
        let dir = std::fs::metadata(&task_dir).expect("stat");
        assert_eq!(
            (dir.uid(), dir.gid(), dir.mode() & 0o7777),
            (0, run_as.gid, TASK_DIR_MODE)
        );
        let out = std::fs::symlink_metadata(task_dir.join("stdout.txt")).expect("stat");
        assert!(out.is_file());
        assert_eq!(
            (out.uid(), out.gid(), out.mode() & 0o7777),
            (0, run_as.gid, OUTPUT_MODE)
        );
    }
}
