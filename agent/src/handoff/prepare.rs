//! The daemon's side of an in-place reimage, while the old system runs:
//!
//! ```text
//! preconditions (systemd, state_dir survives) → open the source
//!   → choose the staging area → stage (download, decode, verify, layout)
//!   → plan into state_dir → (the operation notes it) → install the handoff
//! ```
//!
//! A failure anywhere here leaves the disk untouched and the node up.

use super::install::{run_privileged, systemd_is_init};
use super::outcome::plan_path;
use super::plan::{HandoffPlan, PLAN_VERSION, StagedAt, StateFilesystem};
use super::stage::{
    self, MEMORY_STAGING_DIR, Room, STATE_STAGING_DIR, StagedImage, StagingArea, StagingChoice,
    StagingSource,
};
use crate::disk::filesystem::{block_device_number, filesystem_of};
use crate::disk::saved::{SaveSpec, SavedPartitions};
use crate::image::http::HttpOptions;
use crate::pipeline::ImageRequest;
use crate::progress::ProgressMeter;
use crate::reboot::RebootMethod;
use crate::{Error, Result};
use reimage_protocol::WriteProgress;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// What an in-place reimage works with.
#[derive(Debug, Clone)]
pub struct InPlaceRequest {
    pub operation_id: String,
    pub image: ImageRequest,
    pub http: HttpOptions,
    pub target: PathBuf,
    pub save: SaveSpec,
    pub state_dir: PathBuf,
    pub staging: StagingChoice,
    pub reboot: RebootMethod,
}

/// A staged image and the plan that writes it.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub staged: StagedImage,
    /// Staged through a block index: the encoded bytes fetched.
    pub downloaded: Option<u64>,
    /// `state_dir/handoff/<operation>.plan.json`.
    pub plan_path: PathBuf,
}

/// Checks that an in-place reimage can work here, stages and verifies the
/// image and writes the plan; [`install`] then hands it to the shutdown.
/// `busy` says who holds the target (for the errors).
pub fn stage(
    request: &InPlaceRequest,
    busy: &[String],
    report: &mut dyn FnMut(&WriteProgress),
) -> Result<Prepared> {
    if !request.reboot.through_systemd() {
        return Err(Error::HandoffUnavailable(format!(
            "the target is in use ({}) and [reboot] method is {:?}; only \"systemd\" (or \"kexec\") runs a shutdown handoff that can write it",
            busy.join(", "),
            request.reboot
        )));
    }
    if !systemd_is_init() {
        return Err(Error::HandoffUnavailable(format!(
            "the target is in use ({}) and systemd does not run this system, so nothing can write it after the old root is unmounted",
            busy.join(", ")
        )));
    }
    let state = state_filesystem(&request.state_dir, &request.target, &request.save)?;
    let image = &request.image;
    let from = StagingSource::open(image, &request.http)?;
    let needed = from.needed;
    let area = stage::choose_area(request.staging, needed, Room::measure(&request.state_dir)?)?;
    let dir = match area {
        StagingArea::Memory => {
            let bytes = needed.unwrap_or(0).to_string();
            run_privileged(&args(&["reserve", "--bytes", &bytes]), &request.state_dir)?;
            PathBuf::from(MEMORY_STAGING_DIR)
        }
        StagingArea::StateDir => request.state_dir.join(STATE_STAGING_DIR),
    };
    clear_staging_dir(&dir)?;
    let dest = dir.join(format!("{}.img", request.operation_id));
    tracing::info!(?area, path = %dest.display(), needed, "staging the image");
    let mut meter = ProgressMeter::new(report);
    let stage::Staging {
        staged,
        index_sha256: staged_index_sha256,
        downloaded,
    } = stage::stage(
        image,
        from,
        &request.http,
        &dest,
        &request.target,
        &request.save,
        &mut meter,
    )?;
    let plan = HandoffPlan {
        version: PLAN_VERSION,
        operation_id: request.operation_id.clone(),
        staged: match area {
            StagingArea::Memory => StagedAt::Memory { path: dest.clone() },
            StagingArea::StateDir => StagedAt::StateDir {
                path: Path::new(STATE_STAGING_DIR).join(dest.file_name().unwrap_or_default()),
            },
        },
        staged_sha256: staged.staged_sha256.clone(),
        staged_index_sha256,
        format: staged.format,
        image_size: staged.size,
        image_sha256: staged.sha256.clone(),
        target: request.target.clone(),
        save_partlabel: request.save.labels.clone(),
        save_partindex: request.save.indexes.clone(),
        state,
    };
    let path = plan_path(&request.state_dir, &request.operation_id);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
    }
    plan.save(&path)?;
    Ok(Prepared {
        staged,
        downloaded,
        plan_path: path,
    })
}

/// Installs the shutdown handoff for the plan at `plan_path`: from now on
/// the next reboot writes the image.
pub fn install(plan_path: &Path, state_dir: &Path) -> Result<()> {
    let mut install = args(&["install", "--plan"]);
    install.push(plan_path.as_os_str().to_owned());
    run_privileged(&install, state_dir)?;
    tracing::info!(plan = %plan_path.display(), "the shutdown handoff is installed");
    Ok(())
}

/// Removes a handoff installed for an operation that will not reboot.
pub fn cancel_installed(state_dir: &Path) -> Result<()> {
    run_privileged(&args(&["cancel"]), state_dir)
}

fn args(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// The filesystem of `state_dir`, which must survive the write: on another
/// disk, or on a saved partition of the target. Anything else would be
/// overwritten, and with it the operation the new system has to confirm.
fn state_filesystem(state_dir: &Path, target: &Path, save: &SaveSpec) -> Result<StateFilesystem> {
    let fs = filesystem_of(state_dir)?;
    let target_dev = block_device_number(target)?;
    let on_target = match (fs.partition, target_dev) {
        (_, Some(disk)) if fs.dev == disk => {
            return Err(state_dir_overwritten(
                state_dir,
                &fs.device,
                "the target disk itself",
            ));
        }
        (Some(part), Some(disk)) if part.disk == disk => {
            let (_, saved) = SavedPartitions::read_from_target(target, save)?;
            if !saved.iter().any(|p| p.index == part.index) {
                return Err(state_dir_overwritten(
                    state_dir,
                    &fs.device,
                    &format!("partition {} of the target, which is not saved", part.index),
                ));
            }
            true
        }
        _ => false,
    };
    Ok(StateFilesystem {
        device: fs.device,
        dev: fs.dev.to_string(),
        fstype: fs.fstype,
        state_dir_in_fs: fs.path_in_fs,
        on_target,
    })
}

fn state_dir_overwritten(state_dir: &Path, device: &Path, what: &str) -> Error {
    Error::HandoffUnavailable(format!(
        "[agent] state_dir {} is on {} ({what}): the new image would overwrite the operation journal; put state_dir on a saved partition",
        state_dir.display(),
        device.display()
    ))
}

/// One image is staged at a time: what an earlier operation left goes.
fn clear_staging_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("clearing {}", dir.display()), e)),
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))
}
