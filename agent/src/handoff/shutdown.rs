//! `/run/initramfs/shutdown`: the agent binary run by systemd-shutdown as
//! PID 1, after every filesystem it could unmount is unmounted, in the
//! handoff root with the old root at `/oldroot` (read-only). It writes the
//! staged image and reboots itself; it must never exit, since PID 1
//! exiting panics the kernel.
//!
//! ```text
//! /proc, /sys → plan → detach /oldroot → mount the state filesystem (ro)
//!   → run_plan (staged hash, then the pipeline) → outcome into state_dir
//!   → unmount → sync → reboot(2)
//! ```
//!
//! Anything that goes wrong before the write leaves the disk as it was and
//! the node reboots into its old system; the next agent learns why from the
//! outcome (or from its absence).

use super::outcome::{Outcome, OutcomeRecord};
use super::plan::{HandoffPlan, StateFilesystem};
use super::{HandoffFailure, PLAN_FILE, run_plan};
use crate::disk::filesystem::block_device_number;
use crate::{Error, Result};
use jiff::Timestamp;
use nix::mount::{MntFlags, MsFlags};
use reimage_protocol::{Phase, WriteProgress};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the handoff mounts the state filesystem inside its root.
const STATE_MOUNT: &str = "/state";
/// How long the target may stay busy after the old root was detached.
const TARGET_FREE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the handoff for `args` (`/shutdown VERB`, VERB being what systemd
/// was asked: reboot, poweroff, halt, kexec) and does not return.
///
/// `/shutdown rehearse STATE_DIR` runs the same plan without PID 1's
/// duties (no mounts, no reboot) and exits 0 only if the image was
/// written: the project's tests use it in a chroot to prove the installed
/// root is complete.
pub fn main(args: &[OsString]) -> std::process::ExitCode {
    let verb = args
        .get(1)
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    if verb == "rehearse" {
        let Some(state_dir) = args.get(2).map(PathBuf::from) else {
            say("usage: /shutdown rehearse STATE_DIR");
            return std::process::ExitCode::from(2);
        };
        let written = HandoffPlan::load(&Path::new("/").join(PLAN_FILE))
            .and_then(|plan| write_and_record(&plan, &state_dir, &[], false));
        return match written {
            Ok(Outcome::Written { .. }) => std::process::ExitCode::SUCCESS,
            Ok(_) => std::process::ExitCode::FAILURE,
            Err(err) => {
                say(&format!("error: {err}"));
                std::process::ExitCode::FAILURE
            }
        };
    }
    if std::process::id() != 1 {
        say("only systemd-shutdown runs this, as PID 1");
        return std::process::ExitCode::from(2);
    }
    say("starting the shutdown handoff");
    match std::panic::catch_unwind(handoff) {
        Ok(Ok(summary)) => say(&summary),
        Ok(Err(err)) => say(&format!(
            "error: {}: {err}; nothing more is written",
            err.code()
        )),
        Err(_) => say("the handoff panicked; nothing more is written"),
    }
    finish(&verb)
}

/// PID 1's part: mounts, then [`write_and_record`].
fn handoff() -> Result<String> {
    mount_api_filesystems();
    let plan_path = Path::new("/").join(PLAN_FILE);
    if !plan_path.exists() {
        return Ok("no plan: nothing to write".into());
    }
    let plan = HandoffPlan::load(&plan_path)?;
    // The old root is still mounted (read-only) and holds a partition of
    // the target: let it go, with everything mounted under it.
    if let Err(err) = nix::mount::umount2("/oldroot", MntFlags::MNT_DETACH) {
        say(&format!("detaching /oldroot: {err} (going on)"));
    }
    let state_dir = mount_state(&plan.state)?;
    let beside: Vec<PathBuf> = if plan.state.on_target {
        vec![PathBuf::from(STATE_MOUNT)]
    } else {
        Vec::new()
    };
    wait_until_free(&plan.target, &beside);
    let outcome = write_and_record(&plan, &state_dir, &beside, true);
    if let Err(err) = nix::mount::umount(STATE_MOUNT) {
        say(&format!("unmounting {STATE_MOUNT}: {err}"));
    }
    reread_partition_table(&plan.target);
    Ok(match outcome? {
        Outcome::Written { sha256, .. } => format!("image {sha256} written and verified"),
        Outcome::Refused { code, message } => format!("refused: {code}: {message}"),
        Outcome::WriteFailed { code, message } => format!("write failed: {code}: {message}"),
    })
}

/// Runs the plan against the staged image and leaves the outcome in
/// `state_dir` (with `remount_state`, after remounting [`STATE_MOUNT`]
/// read-write).
fn write_and_record(
    plan: &HandoffPlan,
    state_dir: &Path,
    beside: &[PathBuf],
    remount_state: bool,
) -> Result<Outcome> {
    let staged = plan.staged_path(state_dir);
    say(&format!(
        "writing {} ({} bytes, sha256 {}) to {}",
        staged.display(),
        plan.image_size,
        plan.image_sha256,
        plan.target.display()
    ));
    let started = Instant::now();
    let mut console = ConsoleProgress::default();
    let outcome = match run_plan(plan, &staged, beside, &mut |p| console.show(p)) {
        Ok(report) => Outcome::Written {
            sha256: report.sha256,
            size: report.size,
            blocks: report.blocks,
        },
        Err(HandoffFailure::Refused(err)) => Outcome::Refused {
            code: err.code(),
            message: err.to_string(),
        },
        Err(HandoffFailure::WriteFailed(failure)) => Outcome::WriteFailed {
            code: failure.error.code(),
            message: failure.error.to_string(),
        },
    };
    if remount_state {
        remount_read_write(STATE_MOUNT)?;
    }
    OutcomeRecord {
        operation_id: plan.operation_id.clone(),
        finished_at: Timestamp::now(),
        elapsed_seconds: started.elapsed().as_secs_f64(),
        outcome: outcome.clone(),
    }
    .save(state_dir)?;
    nix::unistd::sync();
    Ok(outcome)
}

/// `/proc` and `/sys`, unless systemd moved them in already; the busy
/// check and the device lookups read them.
fn mount_api_filesystems() {
    for (fstype, at, present) in [
        ("proc", "/proc", "/proc/self"),
        ("sysfs", "/sys", "/sys/block"),
    ] {
        if Path::new(present).exists() {
            continue;
        }
        let _ = std::fs::create_dir_all(at);
        if let Err(err) = nix::mount::mount(
            Some(fstype),
            at,
            Some(fstype),
            MsFlags::empty(),
            None::<&str>,
        ) {
            say(&format!("mounting {at}: {err}"));
        }
    }
}

/// Mounts the state filesystem read-only at [`STATE_MOUNT`] after checking
/// that its node is still the device staging saw; returns `state_dir`.
fn mount_state(state: &StateFilesystem) -> Result<PathBuf> {
    let dev = block_device_number(&state.device)?;
    if dev.map(|d| d.to_string()).as_deref() != Some(state.dev.as_str()) {
        return Err(Error::InvalidArgument(format!(
            "{} is no longer block device {}",
            state.device.display(),
            state.dev
        )));
    }
    std::fs::create_dir_all(STATE_MOUNT)
        .map_err(|e| Error::io(format!("creating {STATE_MOUNT}"), e))?;
    nix::mount::mount(
        Some(&state.device),
        STATE_MOUNT,
        Some(state.fstype.as_str()),
        MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|e| {
        Error::io(
            format!(
                "mounting {} ({}) on {STATE_MOUNT}",
                state.device.display(),
                state.fstype
            ),
            e.into(),
        )
    })?;
    let inside = state
        .state_dir_in_fs
        .strip_prefix("/")
        .unwrap_or(&state.state_dir_in_fs);
    Ok(Path::new(STATE_MOUNT).join(inside))
}

fn remount_read_write(at: &str) -> Result<()> {
    nix::mount::mount(
        None::<&str>,
        at,
        None::<&str>,
        MsFlags::MS_REMOUNT,
        None::<&str>,
    )
    .map_err(|e| Error::io(format!("remounting {at} read-write"), e.into()))
}

/// The detached old root lets go of its partition a moment later: wait
/// (bounded) until nothing but `beside` holds the target.
fn wait_until_free(target: &Path, beside: &[PathBuf]) {
    let deadline = Instant::now() + TARGET_FREE_TIMEOUT;
    loop {
        match crate::disk::busy::check_not_busy_except(target, beside) {
            Ok(()) => return,
            Err(err) if Instant::now() >= deadline => {
                say(&format!("the target is still busy ({err}); trying anyway"));
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Best effort: the kernel reads the table at the next boot anyway.
fn reread_partition_table(target: &Path) {
    if let Err(err) =
        crate::disk::Target::open_read_only(target).and_then(|t| t.reread_partition_table())
    {
        say(&format!(
            "re-reading the partition table: {err} (it is read at boot)"
        ));
    }
}

/// Syncs and reboots (or powers off or halts, as systemd was asked; or
/// boots the kernel the agent loaded for kexec, when it was asked to and
/// one is loaded).
fn finish(verb: &str) -> ! {
    use nix::sys::reboot::{RebootMode, reboot};
    nix::unistd::sync();
    let mode = match verb {
        "poweroff" => RebootMode::RB_POWER_OFF,
        "halt" => RebootMode::RB_HALT_SYSTEM,
        "kexec" if crate::reboot::kexec::loaded() => RebootMode::RB_KEXEC,
        _ => RebootMode::RB_AUTOBOOT,
    };
    say(&format!("{verb}: {mode:?}"));
    let Err(err) = reboot(mode);
    say(&format!("reboot(2) failed: {err}"));
    // PID 1 must not exit.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// One line on the console (systemd-shutdown left stderr there).
fn say(line: &str) {
    eprintln!("reimage-agent handoff: {line}");
}

/// Progress on the console: each phase, and every tenth of the way.
#[derive(Default)]
struct ConsoleProgress {
    phase: Option<Phase>,
    tenth: u64,
}

impl ConsoleProgress {
    fn show(&mut self, progress: &WriteProgress) {
        if self.phase != Some(progress.phase) {
            self.phase = Some(progress.phase);
            self.tenth = 0;
            say(&format!("{:?}", progress.phase));
        }
        let Some(total) = progress.total_bytes.filter(|t| *t > 0) else {
            return;
        };
        let tenth = progress.bytes_written * 10 / total;
        if tenth > self.tenth {
            self.tenth = tenth;
            say(&format!(
                "{:?} {}% ({} MiB/s)",
                progress.phase,
                tenth * 10,
                progress.bytes_per_second >> 20
            ));
        }
    }
}
