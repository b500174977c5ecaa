//! The staged images: copies a prefetch downloaded and verified, kept as
//! fetched (still encoded) in RAM or under `state_dir` until the reimage
//! that writes them. Each is a file `<sha256>.staged` in its area's
//! directory plus a record in [`Table::Images`]. A download in progress is
//! `<sha256>.partial`, renamed only once the whole image verified, so a
//! `.staged` file is always a verified copy; partials are removed at start.
//! A copy staged through a block index has its own index beside it,
//! `<sha256>.staged.index.json`, renamed and removed with it.
//!
//! The copies' total size stays under a budget (`[image]
//! prefetch_budget_mib`): making room evicts the least recently used.

use crate::handoff::stage::staged_index_path as index_path;
use crate::image::pack::INDEX_SUFFIX;
use crate::store::{Store, Table};
use crate::{Error, Result};
use jiff::Timestamp;
use reimage_protocol::ImageFormat;
use reimage_protocol::api::{StagedImageInfo, StagingArea};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The directory of staged images under `state_dir`.
pub const STATE_IMAGES_DIR: &str = "images";
/// RAM staging: the agent's runtime directory on `/run` (tmpfs). Each
/// agent takes a subdirectory named after its `state_dir`, so that two
/// agents on one host (sandboxes, tests) never share copies.
pub const MEMORY_IMAGES_DIR: &str = "/run/reimage-agent/images";
const STAGED: &str = "staged";
const PARTIAL: &str = "partial";

/// What the store keeps about one staged copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StagedRecord {
    /// As `GET /v1/images` shows it.
    pub info: StagedImageInfo,
    /// The encoding of the staged file; a write from it must find the same.
    pub format: ImageFormat,
    /// Last staged or asked for again: eviction takes the oldest first.
    pub last_used: Timestamp,
    /// The EFI loader the image's manifest names, for the boot entry.
    #[serde(default)]
    pub boot_loader: Option<String>,
    /// Staged through a block index: the SHA-256 of the copy's own index.
    #[serde(default)]
    pub index_sha256: Option<String>,
}

/// The staged copies of one agent.
pub struct StagedImages {
    store: Arc<Store>,
    memory_dir: PathBuf,
    state_dir: PathBuf,
    budget: u64,
    claims: Mutex<Claims>,
    released: Condvar,
}

/// Images someone is staging or looking up, and the bytes reserved for
/// the downloads in progress.
#[derive(Default)]
struct Claims {
    images: BTreeSet<String>,
    reserved: BTreeMap<String, u64>,
}

impl StagedImages {
    /// The staged images of the agent whose state is in `state_dir`, with
    /// what an earlier run left cleaned up: partial downloads, copies
    /// without a record (cut off between rename and record) and records
    /// whose copy is gone (RAM copies do not survive a reboot).
    pub fn open(store: Arc<Store>, state_dir: &Path, budget: u64) -> Result<StagedImages> {
        let key = hex::encode(Sha256::digest(state_dir.as_os_str().as_encoded_bytes()));
        let staged = StagedImages {
            store,
            memory_dir: Path::new(MEMORY_IMAGES_DIR).join(&key[..16]),
            state_dir: state_dir.join(STATE_IMAGES_DIR),
            budget,
            claims: Mutex::new(Claims::default()),
            released: Condvar::new(),
        };
        staged.clean_up()?;
        Ok(staged)
    }

    /// The directory of `area`.
    pub fn dir(&self, area: StagingArea) -> &Path {
        match area {
            StagingArea::Memory => &self.memory_dir,
            StagingArea::StateDir => &self.state_dir,
        }
    }

    /// Where the verified copy of image `sha256` is kept in `area`.
    pub fn staged_path(&self, area: StagingArea, sha256: &str) -> PathBuf {
        self.dir(area).join(format!("{sha256}.{STAGED}"))
    }

    /// Where image `sha256` is downloaded to in `area` until it verified.
    pub fn partial_path(&self, area: StagingArea, sha256: &str) -> PathBuf {
        self.dir(area).join(format!("{sha256}.{PARTIAL}"))
    }

    /// The budget, in bytes; 0 when prefetching is off.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    fn clean_up(&self) -> Result<()> {
        let records = self.records()?;
        for area in [StagingArea::Memory, StagingArea::StateDir] {
            let dir = self.dir(area);
            let entries = match std::fs::read_dir(dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let copy = name.strip_suffix(INDEX_SUFFIX).unwrap_or(&name);
                let recorded = copy.strip_suffix(&format!(".{STAGED}")).is_some_and(|sha| {
                    records
                        .iter()
                        .any(|r| r.info.sha256 == sha && r.info.area == area)
                });
                if !recorded {
                    tracing::info!(path = %path.display(), "removing a partial or unrecorded staged image");
                    remove_file(&path)?;
                }
            }
        }
        for record in records {
            if self.copy_of(&record).is_none() {
                tracing::info!(sha256 = %record.info.sha256, "the staged copy is gone; forgetting it");
                self.store.delete(Table::Images, &record.info.sha256)?;
            }
        }
        Ok(())
    }

    fn records(&self) -> Result<Vec<StagedRecord>> {
        Ok(self
            .store
            .list::<StagedRecord>(Table::Images)?
            .into_iter()
            .map(|(_, record)| record)
            .collect())
    }

    /// Every staged copy, oldest first.
    pub fn list(&self) -> Result<Vec<StagedImageInfo>> {
        let mut all: Vec<StagedImageInfo> = self.records()?.into_iter().map(|r| r.info).collect();
        all.sort_by_key(|info| info.staged_at);
        Ok(all)
    }

    /// The record of image `sha256` (lowercase hex), if it is staged.
    pub fn get(&self, sha256: &str) -> Result<Option<StagedRecord>> {
        self.store.get(Table::Images, sha256)
    }

    /// The newest copy prefetched by the manifest at `manifest_url`.
    pub fn by_manifest(&self, manifest_url: &str) -> Result<Option<StagedRecord>> {
        Ok(self
            .records()?
            .into_iter()
            .filter(|r| r.info.manifest_url.as_deref() == Some(manifest_url))
            .max_by_key(|r| r.info.staged_at))
    }

    /// The path of `record`'s copy when the file is there with the length
    /// it was staged with; `None` when it is gone or was cut short.
    pub fn copy_of(&self, record: &StagedRecord) -> Option<PathBuf> {
        let path = self.staged_path(record.info.area, &record.info.sha256);
        let len = std::fs::metadata(&path).ok()?.len();
        (len == record.info.staged_bytes).then_some(path)
    }

    /// The path and SHA-256 of `record`'s own block index, when it was
    /// staged through one and the index is there.
    pub fn index_of(&self, record: &StagedRecord) -> Option<(PathBuf, String)> {
        let sha256 = record.index_sha256.clone()?;
        let path = index_path(&self.staged_path(record.info.area, &record.info.sha256));
        path.exists().then_some((path, sha256))
    }

    /// Notes that image `sha256` was asked for again: it is evicted last.
    pub fn touch(&self, sha256: &str) -> Result<()> {
        if let Some(mut record) = self.get(sha256)? {
            record.last_used = Timestamp::now();
            self.store.put(Table::Images, sha256, &record)?;
        }
        Ok(())
    }

    /// Removes the copy of image `sha256` and its record; false when it was
    /// not staged.
    pub fn remove(&self, sha256: &str) -> Result<bool> {
        let Some(record) = self.get(sha256)? else {
            return Ok(false);
        };
        // The record goes first: a copy without one is removed at start.
        self.store.delete(Table::Images, sha256)?;
        let path = self.staged_path(record.info.area, sha256);
        remove_file(&path)?;
        remove_file(&index_path(&path))?;
        tracing::info!(%sha256, "removed the staged image");
        Ok(true)
    }

    /// Claims image `sha256` for staging or use, waiting while someone else
    /// holds it: a reimage asking for an image that is being prefetched
    /// waits for that download instead of starting its own.
    pub fn claim(&self, sha256: &str) -> Claim<'_> {
        let mut claims = self.lock();
        while claims.images.contains(sha256) {
            claims = self
                .released
                .wait(claims)
                .unwrap_or_else(|e| e.into_inner());
        }
        claims.images.insert(sha256.to_string());
        Claim {
            images: self,
            sha256: sha256.to_string(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Claims> {
        self.claims.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One image claimed by [`StagedImages::claim`]; released when dropped.
pub struct Claim<'a> {
    images: &'a StagedImages,
    sha256: String,
}

impl Claim<'_> {
    /// Reserves room under the budget for a download of `needed` bytes
    /// (`None`: not known), evicting the least recently used copies as
    /// needed. Returns how many bytes the download may take.
    pub fn reserve(&self, needed: Option<u64>) -> Result<u64> {
        let images = self.images;
        let mut claims = images.lock();
        let mut records = images.records()?;
        records.retain(|r| r.info.sha256 != self.sha256);
        let reserved_by_others: u64 = claims
            .reserved
            .iter()
            .filter(|(sha, _)| **sha != self.sha256)
            .map(|(_, n)| n)
            .sum();
        let staged: u64 = records.iter().map(|r| r.info.staged_bytes).sum();
        let Some(needed) = needed else {
            let allowance = images
                .budget
                .saturating_sub(staged)
                .saturating_sub(reserved_by_others);
            claims.reserved.insert(self.sha256.clone(), allowance);
            return Ok(allowance);
        };
        if needed.saturating_add(reserved_by_others) > images.budget {
            return Err(Error::StagingSpaceInsufficient(format!(
                "the image takes {needed} bytes; [image] prefetch_budget_mib allows {} in all, {reserved_by_others} of them reserved by other prefetches",
                images.budget
            )));
        }
        // Copies someone holds (a reimage about to write one) are kept.
        records.retain(|r| !claims.images.contains(&r.info.sha256));
        records.sort_by_key(|r| r.last_used);
        let mut total = staged + reserved_by_others;
        let mut evictable = records.into_iter();
        while total + needed > images.budget {
            let Some(oldest) = evictable.next() else {
                return Err(Error::StagingSpaceInsufficient(format!(
                    "the image takes {needed} bytes and the staged images in use leave {} of [image] prefetch_budget_mib",
                    images.budget.saturating_sub(total)
                )));
            };
            tracing::info!(sha256 = %oldest.info.sha256, bytes = oldest.info.staged_bytes, "evicting the least recently used staged image to make room");
            images.remove(&oldest.info.sha256)?;
            total -= oldest.info.staged_bytes;
        }
        claims.reserved.insert(self.sha256.clone(), needed);
        Ok(needed)
    }

    /// Makes the verified download at `partial` the staged copy that
    /// `record` describes: renamed, the rename made durable, recorded.
    pub fn commit(&self, partial: &Path, record: &StagedRecord) -> Result<()> {
        let images = self.images;
        let path = images.staged_path(record.info.area, &self.sha256);
        let mut renames = vec![(partial.to_path_buf(), path.clone())];
        if record.index_sha256.is_some() {
            renames.push((index_path(partial), index_path(&path)));
        }
        // The index first: a copy is recorded only with its index in place.
        for (from, to) in renames.iter().rev() {
            std::fs::rename(from, to).map_err(|e| {
                Error::io(
                    format!("renaming {} to {}", from.display(), to.display()),
                    e,
                )
            })?;
        }
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(format!("syncing {}", dir.display()), e))?;
        }
        images.store.put(Table::Images, &self.sha256, record)
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut claims = self.images.lock();
        claims.images.remove(&self.sha256);
        claims.reserved.remove(&self.sha256);
        drop(claims);
        self.images.released.notify_all();
    }
}

fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MIB: u64 = 1 << 20;

    struct Setup {
        dir: tempfile::TempDir,
        store: Arc<Store>,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(&dir.path().join("state")).expect("store"));
        Setup { dir, store }
    }

    impl Setup {
        fn state_dir(&self) -> PathBuf {
            self.dir.path().join("state")
        }

        fn open(&self, budget: u64) -> StagedImages {
            StagedImages::open(Arc::clone(&self.store), &self.state_dir(), budget).expect("opens")
        }
    }

    fn sha(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    fn record(sha256: &str, bytes: u64, used_seconds_ago: i64) -> StagedRecord {
        let at = Timestamp::now() - jiff::SignedDuration::from_secs(used_seconds_ago);
        StagedRecord {
            info: StagedImageInfo {
                sha256: sha256.to_string(),
                name: "os".into(),
                size: bytes * 2,
                staged_bytes: bytes,
                area: StagingArea::StateDir,
                url: "http://images/os.img.zst".into(),
                manifest_url: None,
                staged_at: at,
                operation_id: "op".into(),
            },
            format: ImageFormat::Zstd,
            last_used: at,
            boot_loader: None,
            index_sha256: None,
        }
    }

    /// The SHA-256 of each staged copy, as `list` orders them.
    fn staged_shas(images: &StagedImages) -> Vec<String> {
        images
            .list()
            .expect("list")
            .into_iter()
            .map(|i| i.sha256)
            .collect()
    }

    /// Stages `record`'s copy as a prefetch does: partial file, then commit.
    fn stage(images: &StagedImages, record: &StagedRecord) {
        let claim = images.claim(&record.info.sha256);
        claim.reserve(Some(record.info.staged_bytes)).expect("room");
        let partial = images.partial_path(record.info.area, &record.info.sha256);
        std::fs::create_dir_all(partial.parent().expect("dir")).expect("dir");
        std::fs::write(&partial, vec![7u8; record.info.staged_bytes as usize]).expect("partial");
        claim.commit(&partial, record).expect("commit");
    }

    #[test]
    fn a_copy_staged_through_an_index_keeps_its_index_until_it_goes() {
        let setup = setup();
        let images = setup.open(10 * MIB);
        let mut one = record(&sha(1), MIB, 0);
        one.index_sha256 = Some(sha(9));
        let partial = images.partial_path(StagingArea::StateDir, &sha(1));
        std::fs::create_dir_all(partial.parent().expect("dir")).expect("dir");
        std::fs::write(index_path(&partial), b"{}").expect("partial index");
        stage(&images, &one);
        let (index, index_sha) = images.index_of(&one).expect("the index is there");
        assert_eq!(index_sha, sha(9));
        assert!(
            index.ends_with(format!("{}.staged.index.json", sha(1))),
            "{index:?}"
        );
        assert!(!index_path(&partial).exists(), "renamed with the copy");
        // An index left without its copy's record goes at start; a
        // recorded copy's stays.
        let stray = images.staged_path(StagingArea::StateDir, &sha(2));
        std::fs::write(index_path(&stray), b"{}").expect("stray index");
        drop(images);
        let images = setup.open(10 * MIB);
        assert!(images.index_of(&one).is_some(), "kept across a restart");
        assert!(!index_path(&stray).exists(), "the stray index is removed");
        assert!(images.remove(&sha(1)).expect("remove"));
        assert!(!index.exists(), "removed with its copy");
        // Without an index on record, none is offered.
        let two = record(&sha(2), MIB, 0);
        stage(&images, &two);
        assert!(images.index_of(&two).is_none());
    }

    #[test]
    fn a_committed_copy_is_listed_found_and_removed() {
        let setup = setup();
        let images = setup.open(10 * MIB);
        let one = record(&sha(1), MIB, 0);
        stage(&images, &one);
        assert_eq!(images.list().expect("list"), vec![one.info.clone()]);
        let found = images.get(&sha(1)).expect("get").expect("staged");
        let path = images.copy_of(&found).expect("the copy is there");
        assert!(path.ends_with(format!("{}.staged", sha(1))), "{path:?}");
        assert!(!images.partial_path(StagingArea::StateDir, &sha(1)).exists());
        assert!(images.remove(&sha(1)).expect("remove"));
        assert!(!path.exists());
        assert!(images.list().expect("list").is_empty());
        assert!(!images.remove(&sha(1)).expect("again"), "nothing to remove");
    }

    #[test]
    fn making_room_evicts_the_least_recently_used_copies() {
        let setup = setup();
        let images = setup.open(3 * MIB);
        stage(&images, &record(&sha(1), MIB, 30));
        stage(&images, &record(&sha(2), MIB, 20));
        stage(&images, &record(&sha(3), MIB, 10));
        images.touch(&sha(1)).expect("touch");
        let claim = images.claim(&sha(4));
        assert_eq!(claim.reserve(Some(2 * MIB)).expect("room made"), 2 * MIB);
        let left = staged_shas(&images);
        assert_eq!(left, vec![sha(1)], "2 and 3 were used least recently");
    }

    #[test]
    fn an_image_larger_than_the_budget_is_refused_and_nothing_is_evicted() {
        let setup = setup();
        let images = setup.open(2 * MIB);
        stage(&images, &record(&sha(1), MIB, 0));
        let err = images
            .claim(&sha(2))
            .reserve(Some(3 * MIB))
            .expect_err("too large");
        assert_eq!(
            err.code(),
            reimage_protocol::ErrorCode::StagingSpaceInsufficient
        );
        assert_eq!(images.list().expect("list").len(), 1);
    }

    #[test]
    fn a_copy_in_use_is_not_evicted_and_downloads_in_progress_count() {
        let setup = setup();
        let images = setup.open(3 * MIB);
        stage(&images, &record(&sha(1), MIB, 30));
        let in_use = images.claim(&sha(1));
        let downloading = images.claim(&sha(2));
        downloading.reserve(Some(MIB)).expect("room");
        let err = images
            .claim(&sha(3))
            .reserve(Some(2 * MIB))
            .expect_err("1 is in use and 2 reserved");
        assert_eq!(
            err.code(),
            reimage_protocol::ErrorCode::StagingSpaceInsufficient
        );
        drop(in_use);
        drop(downloading);
        images
            .claim(&sha(3))
            .reserve(Some(3 * MIB))
            .expect("1 is evicted now");
        assert!(images.list().expect("list").is_empty());
    }

    #[test]
    fn an_unknown_size_gets_what_the_budget_has_left() {
        let setup = setup();
        let images = setup.open(3 * MIB);
        stage(&images, &record(&sha(1), MIB, 0));
        assert_eq!(images.claim(&sha(2)).reserve(None).expect("room"), 2 * MIB);
    }

    #[test]
    fn start_up_removes_partials_and_unrecorded_copies_and_forgets_lost_ones() {
        let setup = setup();
        let images = setup.open(10 * MIB);
        stage(&images, &record(&sha(1), MIB, 0));
        stage(&images, &record(&sha(2), MIB, 0));
        let dir = images.dir(StagingArea::StateDir).to_path_buf();
        let partial = images.partial_path(StagingArea::StateDir, &sha(3));
        std::fs::write(&partial, b"cut off").expect("partial");
        let stray = images.staged_path(StagingArea::StateDir, &sha(4));
        std::fs::write(&stray, b"renamed, never recorded").expect("stray");
        std::fs::remove_file(images.staged_path(StagingArea::StateDir, &sha(2))).expect("lost");
        drop(images);

        let images = setup.open(10 * MIB);
        assert!(!partial.exists(), "the partial download is removed");
        assert!(!stray.exists(), "the unrecorded copy is removed");
        let left = staged_shas(&images);
        assert_eq!(left, vec![sha(1)], "the lost copy is forgotten");
        assert!(dir.join(format!("{}.staged", sha(1))).exists());
    }

    #[test]
    fn a_second_claim_of_one_image_waits_for_the_first() {
        let setup = setup();
        let images = setup.open(10 * MIB);
        let first = images.claim(&sha(1));
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| {
                let _second = images.claim(&sha(1));
                images.get(&sha(1)).expect("get").is_some()
            });
            std::thread::sleep(Duration::from_millis(100));
            assert!(!waiter.is_finished(), "the second claim waits");
            let one = record(&sha(1), MIB, 0);
            first.reserve(Some(MIB)).expect("room");
            let partial = images.partial_path(StagingArea::StateDir, &sha(1));
            std::fs::create_dir_all(partial.parent().expect("dir")).expect("dir");
            std::fs::write(&partial, vec![7u8; MIB as usize]).expect("partial");
            first.commit(&partial, &one).expect("commit");
            drop(first);
            assert!(
                waiter.join().expect("joins"),
                "the second claim sees what the first staged"
            );
        });
    }
}
