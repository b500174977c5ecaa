//! The sandbox `serve` runs when it is given no config: safe to start
//! anywhere, and complete enough that every request of the API and of the
//! seed routes (Batch, Cloud Services) works against it out of the box.
//!
//! In its directory (created if missing): a sparse 8 GiB target file
//! `disk.img` whose GPT holds one 1 GiB `local-storage` partition at its
//! end, a small packed test image with its manifest (`image/`), used as
//! the `[image]` default, and a random admin token in `admin.token`
//! (mode 0600). Existing files are reused, so the disk keeps its data
//! and the token stays the same across restarts.

use crate::api::auth::{Role, Token};
use crate::config::{
    AgentConfig, ApiConfig, Config, DiskConfig, ImageConfig, RebootConfig, TasksSection,
};
use crate::disk::gpt;
use crate::reboot::RebootMethod;
use crate::tasks::{DEFAULT_KILL_GRACE, DEFAULT_RETENTION};
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The sandbox's file-backed target disk, inside its directory.
pub const DISK_FILE: &str = "disk.img";
/// The sandbox's admin token (hex, mode 0600), inside its directory.
pub const TOKEN_FILE: &str = "admin.token";
/// The sandbox's default image and its manifest, inside its directory.
pub const IMAGE_FILE: &str = "image/os.img.zst";
/// Size of the sandbox's sparse target disk.
pub const DISK_SIZE: u64 = 8 << 30;
/// Size of the sandbox's `local-storage` partition at the end of its disk.
pub const LOCAL_STORAGE_SIZE: u64 = 1 << 30;
/// Size of the sandbox's test image (decoded).
pub const IMAGE_SIZE: u64 = 64 << 20;

/// GPT type "Linux filesystem data" (0FC63DAF-8483-4772-8E79-3D69D8477DE4),
/// in the table's mixed-endian byte order.
const LINUX_FILESYSTEM_GUID: [u8; 16] = [
    0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4,
];
/// GPT type "EFI System" (C12A7328-F81F-11D2-BA4B-00A0C93EC93B).
const EFI_SYSTEM_GUID: [u8; 16] = [
    0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b,
];

const SECTOR: u64 = 512;
/// Partitions start on 1 MiB boundaries, as partitioning tools place them.
const ALIGN: u64 = (1 << 20) / SECTOR;

/// Sets up the sandbox in `dir` (see the module docs): listen on
/// 127.0.0.1:7480, state in `dir`, the sandbox disk as target with
/// `local-storage` saved, the test image as default, reboot `none`, and
/// the admin token. Logs where the token is.
pub fn sandbox(dir: &Path) -> Result<Config> {
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    // Absolute, so nothing depends on the working directory later.
    let dir = dir
        .canonicalize()
        .map_err(|e| Error::io(format!("resolving {}", dir.display()), e))?;

    let disk = dir.join(DISK_FILE);
    if !exists(&disk)? {
        create_disk(&disk)?;
        tracing::info!(path = %disk.display(), "created the sandbox's sparse target disk");
    }
    let image = dir.join(IMAGE_FILE);
    let manifest = crate::image::pack::manifest_path(&image);
    if !exists(&manifest)? {
        create_image(&image)?;
        tracing::info!(path = %manifest.display(), "created the sandbox's test image");
    }

    let token_path = dir.join(TOKEN_FILE);
    let token = admin_token(&token_path)?;
    tracing::info!(path = %token_path.display(), "sandbox admin token (Bearer) is in this file");

    Ok(Config {
        agent: AgentConfig {
            node_id: Some(crate::config::hostname())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "sandbox".into()),
            state_dir: dir.clone(),
        },
        api: ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7480)),
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            tokens: vec![Token::for_secret(&token, Role::Admin)],
        },
        disk: DiskConfig {
            target: disk,
            save_partlabel: vec!["local-storage".into()],
            save_partindex: Vec::new(),
            staging: Default::default(),
        },
        image: ImageConfig {
            manifest_url: Some(manifest.display().to_string()),
            ..ImageConfig::default()
        },
        tasks: TasksSection {
            work_dir: dir.join("tasks"),
            default_retention: DEFAULT_RETENTION,
            kill_grace: DEFAULT_KILL_GRACE,
            max_running: None,
            user: crate::tasks::DEFAULT_TASK_USER.to_owned(),
        },
        reboot: RebootConfig {
            method: RebootMethod::None,
            // The sandbox's target is a file: boot entries are never written.
            efivars: std::path::PathBuf::from(crate::config::DEFAULT_EFIVARS),
        },
    })
}

fn exists(path: &Path) -> Result<bool> {
    path.try_exists()
        .map_err(|e| Error::io(format!("looking for {}", path.display()), e))
}

/// Writes the sandbox disk under a temporary name and renames it into
/// place, so a crash never leaves a `disk.img` without its table.
fn create_disk(path: &Path) -> Result<()> {
    let partial = path.with_extension("img.partial");
    let mut file = sparse_file(&partial, DISK_SIZE)?;
    let mut table = new_table(&mut file)?;
    let sectors = LOCAL_STORAGE_SIZE / SECTOR;
    let start = (table.header.last_usable_lba + 1 - sectors) / ALIGN * ALIGN;
    table[1] = entry(
        LINUX_FILESYSTEM_GUID,
        start,
        start + sectors - 1,
        "local-storage",
    )?;
    finish_table(&mut file, &mut table, &partial)?;
    fs::rename(&partial, path)
        .map_err(|e| Error::io(format!("renaming {} into place", partial.display()), e))
}

/// The test image: a GPT with an `efi` partition (8 MiB) and a `root`
/// partition (the rest), each starting with a few MiB of data and zeros
/// after it, as a file system image has; packed with zstd and given a
/// manifest, the raw file removed. It ends well before `local-storage`
/// starts on the sandbox disk, so every reimage keeps it.
fn create_image(packed: &Path) -> Result<()> {
    let dir = packed.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let raw = packed.with_extension("");
    let mut file = sparse_file(&raw, IMAGE_SIZE)?;
    let mut table = new_table(&mut file)?;
    let efi_end = 9 * ALIGN - 1;
    table[1] = entry(EFI_SYSTEM_GUID, ALIGN, efi_end, "efi")?;
    let root_end = table.header.last_usable_lba / ALIGN * ALIGN - 1;
    table[2] = entry(LINUX_FILESYSTEM_GUID, efi_end + 1, root_end, "root")?;
    finish_table(&mut file, &mut table, &raw)?;
    for (start_lba, len) in [(ALIGN, 1 << 20), ((efi_end + 1), 3 << 20)] {
        file.write_all_at(&filler(start_lba, len), start_lba * SECTOR)
            .map_err(|e| Error::io(format!("writing {}", raw.display()), e))?;
    }
    file.sync_all()
        .map_err(|e| Error::io(format!("syncing {}", raw.display()), e))?;
    drop(file);
    let packed_result = crate::image::pack::pack(
        &raw,
        packed,
        crate::image::pack::PackOptions {
            level: 3,
            block_index: false,
        },
    );
    let _ = fs::remove_file(&raw);
    packed_result.map(|_| ())
}

/// `len` bytes that do not compress away: SHA-256 in counter mode, seeded
/// with where they go.
fn filler(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut counter = 0u64;
    while out.len() < len {
        let block = Sha256::new()
            .chain_update(seed.to_le_bytes())
            .chain_update(counter.to_le_bytes())
            .finalize();
        out.extend_from_slice(&block);
        counter += 1;
    }
    out.truncate(len);
    out
}

fn sparse_file(path: &Path, size: u64) -> Result<fs::File> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    // set_len on an empty file allocates nothing: the file stays sparse.
    file.set_len(size)
        .map_err(|e| Error::io(format!("sizing {}", path.display()), e))?;
    Ok(file)
}

fn invalid(e: gptman::Error) -> Error {
    Error::PartitionTableInvalid(format!("sandbox disk: {e}"))
}

fn new_table(file: &mut fs::File) -> Result<gptman::GPT> {
    gptman::GPT::new_from(file, SECTOR, gpt::random_guid()?).map_err(invalid)
}

fn entry(kind: [u8; 16], start: u64, end: u64, label: &str) -> Result<gptman::GPTPartitionEntry> {
    Ok(gptman::GPTPartitionEntry {
        partition_type_guid: kind,
        unique_partition_guid: gpt::random_guid()?,
        starting_lba: start,
        ending_lba: end,
        attribute_bits: 0,
        partition_name: label.into(),
    })
}

fn finish_table(file: &mut fs::File, table: &mut gptman::GPT, path: &Path) -> Result<()> {
    gptman::GPT::write_protective_mbr_into(file, SECTOR).map_err(invalid)?;
    table.write_into(file).map_err(invalid)?;
    file.sync_all()
        .map_err(|e| Error::io(format!("syncing {}", path.display()), e))
}

/// Reads the sandbox token at `path`, or creates it: written to a
/// temporary file made with mode 0600 (never readable by others, even
/// briefly), then hard-linked into place, which fails rather than replace
/// a token another agent created meanwhile.
fn admin_token(path: &Path) -> Result<String> {
    if let Some(token) = read_token(path)? {
        return Ok(token);
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::io("drawing the sandbox token", io::Error::other(e.to_string())))?;
    let token = hex::encode(bytes);

    let partial = path.with_extension("token.partial");
    let context = |what: &str| format!("{what} {}", partial.display());
    match fs::remove_file(&partial) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(context("removing a stale"), e)),
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| Error::io(context("creating"), e))?;
    file.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(context("writing"), e))?;
    let linked = fs::hard_link(&partial, path);
    // The temporary name goes either way; the token lives on under `path`.
    let _ = fs::remove_file(&partial);
    match linked {
        Ok(()) => Ok(token),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            read_token(path)?.ok_or_else(|| Error::io(format!("reading {}", path.display()), e))
        }
        Err(e) => Err(Error::io(format!("creating {}", path.display()), e)),
    }
}

/// The token in an existing token file; tightens a file others can read.
fn read_token(path: &Path) -> Result<Option<String>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    let token = text.trim();
    if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::ConfigInvalid(format!(
            "{}: not a sandbox token (64 hex digits); delete it to get a new one",
            path.display()
        )));
    }
    let mode = fs::metadata(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "token file was readable by others; setting mode 0600");
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("setting the mode of {}", path.display()), e))?;
    }
    Ok(Some(token.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::auth::role_for_token;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_sandbox_makes_a_sparse_disk_a_test_image_and_a_private_token_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("reimage-state");
        let config = sandbox(&dir).expect("sandbox");

        assert_eq!(config.api.listen, "127.0.0.1:7480".parse().expect("addr"));
        assert_eq!(config.reboot.method, RebootMethod::None);
        assert_eq!(config.disk.save_partlabel, ["local-storage"]);
        assert!(config.agent.state_dir.is_absolute());

        let disk = dir.join(DISK_FILE);
        assert_eq!(config.disk.target, disk.canonicalize().expect("disk"));
        let meta = fs::metadata(&disk).expect("disk exists");
        assert_eq!(meta.len(), DISK_SIZE);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "sparse: {} blocks",
            meta.blocks()
        );
        let table = gptman::GPT::find_from(&mut fs::File::open(&disk).expect("open"))
            .expect("GPT on the sandbox disk");
        let (index, part) = table
            .iter()
            .find(|(_, p)| p.is_used())
            .expect("a partition");
        assert_eq!(index, 1);
        assert_eq!(part.partition_name.as_str(), "local-storage");
        assert_eq!(part.size().expect("size") * 512, LOCAL_STORAGE_SIZE);
        assert!(
            part.ending_lba + 2048 > table.header.last_usable_lba,
            "at the end"
        );
        assert_eq!(
            gpt::format_guid(&part.partition_type_guid),
            "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
        );

        let manifest_at = config.image.manifest_url.clone().expect("a default image");
        let manifest = crate::image::manifest::parse(&fs::read(&manifest_at).expect("manifest"))
            .expect("a valid manifest");
        assert_eq!(manifest.size, IMAGE_SIZE);
        assert!(
            fs::metadata(dir.join(IMAGE_FILE)).expect("packed").len() < 8 << 20,
            "the packed image is small"
        );
        assert!(
            !dir.join("image/os.img").exists(),
            "the raw image is removed"
        );

        let token_path = dir.join(TOKEN_FILE);
        let token_meta = fs::metadata(&token_path).expect("token file");
        assert_eq!(token_meta.permissions().mode() & 0o777, 0o600);
        let token = fs::read_to_string(&token_path).expect("token");
        let token = token.trim();
        assert_eq!(token.len(), 64);
        assert_eq!(role_for_token(&config.api.tokens, token), Some(Role::Admin));
        assert!(!dir.join("admin.token.partial").exists());

        // A second start reuses all three: same token, same disk (its data
        // kept), same image.
        fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .and_then(|f| f.write_all_at(b"kept", 4 << 30))
            .expect("mark the disk");
        let again = sandbox(&dir).expect("sandbox again");
        assert_eq!(again.api.tokens, config.api.tokens);
        assert_eq!(again.image.manifest_url, config.image.manifest_url);
        assert_eq!(
            crate::image::manifest::parse(&fs::read(&manifest_at).expect("manifest"))
                .expect("manifest")
                .sha256,
            manifest.sha256
        );
        let mut mark = [0u8; 4];
        fs::File::open(&disk)
            .expect("open")
            .read_exact_at(&mut mark, 4 << 30)
            .expect("read");
        assert_eq!(&mark, b"kept");
    }

    #[test]
    fn the_test_image_fits_before_local_storage() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let packed = tmp.path().join("image/os.img.zst");
        create_image(&packed).expect("image");
        let raw = zstd::decode_all(fs::File::open(&packed).expect("open")).expect("decode");
        assert_eq!(raw.len() as u64, IMAGE_SIZE);
        let table = gptman::GPT::find_from(&mut io::Cursor::new(&raw)).expect("GPT");
        let labels: Vec<String> = table
            .iter()
            .filter(|(_, p)| p.is_used())
            .map(|(_, p)| p.partition_name.as_str().to_string())
            .collect();
        assert_eq!(labels, ["efi", "root"]);
        const { assert!(IMAGE_SIZE < DISK_SIZE - LOCAL_STORAGE_SIZE) };
    }

    #[test]
    fn a_token_file_others_can_read_is_tightened() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join(TOKEN_FILE);
        fs::write(&path, format!("{}\n", "ab".repeat(32))).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let token = admin_token(&path).expect("reused");
        assert_eq!(token, "ab".repeat(32));
        let mode = fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        fs::write(&path, "short\n").expect("write");
        assert_eq!(
            admin_token(&path).expect_err("malformed").code(),
            reimage_protocol::ErrorCode::ConfigInvalid
        );
    }
}
