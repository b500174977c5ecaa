//! The firmware's boot entries around a reimage on a UEFI node: the real
//! daemon writes a loop device, and its `[reboot] efivars` is a directory
//! laid out as efivarfs, read back by the agent's API and by `efibootmgr`
//! (libefivar pointed at it by `EFIVARFS_PATH`).

use reimage_e2e::daemon::{ADMIN, Daemon, write_config};
use reimage_e2e::http_server::{Fault, FaultServer};
use reimage_e2e::images::{
    MIB, Part, os_image, partition_sha256, sha256, target_disk, write_os_table_with_esp,
    write_table, zstd,
};
use reimage_e2e::loopdev::LoopDevice;
use reimage_e2e::skip;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const GLOBAL: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";

/// A UEFI node: a loop device holding an old image (`old-root`, GUID
/// 0xa1…) and local-storage, and firmware variables with the disk's own
/// entry (0), the old image's (1, booting old-root's partition) and an
/// entry for another disk (2), in the order 1, 0, 2.
struct UefiNode {
    daemon: Daemon,
    server: FaultServer,
    efivars: PathBuf,
    file: PathBuf,
    storage_sha: String,
    _device: LoopDevice,
    dir: tempfile::TempDir,
}

/// A `Boot####` value: active, `description`, and when `guid` is given
/// `HD(1,GPT,guid,0x800,0x1000)/File(\EFI\BOOT\BOOTX64.EFI)`.
fn load_option(description: &str, guid: Option<u8>) -> Vec<u8> {
    let utf16 = |s: &str| -> Vec<u8> {
        s.encode_utf16()
            .chain([0])
            .flat_map(u16::to_le_bytes)
            .collect()
    };
    let mut path = Vec::new();
    if let Some(guid) = guid {
        path.extend_from_slice(&[4, 1, 42, 0, 1, 0, 0, 0]);
        path.extend_from_slice(&0x800u64.to_le_bytes());
        path.extend_from_slice(&0x1000u64.to_le_bytes());
        path.extend_from_slice(&[guid; 16]);
        path.extend_from_slice(&[2, 2]);
        let file = utf16("\\EFI\\BOOT\\BOOTX64.EFI");
        path.extend_from_slice(&[4, 4]);
        path.extend_from_slice(&((file.len() + 4) as u16).to_le_bytes());
        path.extend_from_slice(&file);
    }
    path.extend_from_slice(&[0x7f, 0xff, 4, 0]);
    let mut value = vec![1, 0, 0, 0];
    value.extend_from_slice(&(path.len() as u16).to_le_bytes());
    value.extend_from_slice(&utf16(description));
    value.extend_from_slice(&path);
    value
}

fn set_var(efivars: &Path, name: &str, value: &[u8]) {
    let mut bytes = vec![7, 0, 0, 0];
    bytes.extend_from_slice(value);
    std::fs::write(efivars.join(format!("{name}-{GLOBAL}")), bytes).expect("write variable");
}

fn var(efivars: &Path, name: &str) -> Option<Vec<u8>> {
    std::fs::read(efivars.join(format!("{name}-{GLOBAL}")))
        .ok()
        .map(|bytes| bytes[4..].to_vec())
}

fn u16s(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks_exact(2)
        .map(|p| u16::from_le_bytes([p[0], p[1]]))
        .collect()
}

/// Two images that differ in their ESP's partition GUID, as images built
/// separately do.
fn images() -> Vec<(String, Arc<Vec<u8>>, String)> {
    [("/a.img.zst", 0xe1u8), ("/b.img.zst", 0xe5)]
        .into_iter()
        .map(|(path, esp)| {
            let mut raw = os_image(16, 1, 42);
            write_os_table_with_esp(&mut raw, esp);
            (path.to_string(), Arc::new(zstd(&raw)), sha256(&raw))
        })
        .collect()
}

impl UefiNode {
    fn start(test: &str, efivars_extra: impl FnOnce(&Path)) -> Option<UefiNode> {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("disk.img");
        let storage_sha = target_disk(&file, 64, 16, 41);
        let device = match LoopDevice::attach(&file, true) {
            Ok(device) => device,
            Err(why) => {
                skip(test, &why);
                return None;
            }
        };
        let efivars = dir.path().join("efivars");
        std::fs::create_dir(&efivars).expect("efivars dir");
        set_var(
            &efivars,
            "Boot0000",
            &load_option("UEFI QEMU HARDDISK", None),
        );
        set_var(&efivars, "Boot0001", &load_option("old image", Some(0xa1)));
        set_var(
            &efivars,
            "Boot0002",
            &load_option("another disk", Some(0xcc)),
        );
        set_var(&efivars, "BootOrder", &[1, 0, 0, 0, 2, 0]);
        efivars_extra(&efivars);
        let extra = format!("efivars = \"{}\"\n", efivars.display());
        let config = write_config(dir.path(), &extra);
        let text = std::fs::read_to_string(&config).expect("config");
        // Staged copies in the test's directory, not in /run.
        let text = text
            .replace(
                &format!("target = \"{}\"", file.display()),
                &format!("target = \"{}\"", device.path.display()),
            )
            .replace(
                "save_partlabel = [\"local-storage\"]\n",
                "save_partlabel = [\"local-storage\"]\nstaging = \"state_dir\"\n",
            );
        std::fs::write(&config, text).expect("config");
        let served = images()
            .into_iter()
            .map(|(path, bytes, _)| (path, bytes))
            .collect();
        let server = FaultServer::start(served, Fault::None);
        Some(UefiNode {
            daemon: Daemon::start(&config),
            server,
            efivars,
            file,
            storage_sha,
            _device: device,
            dir,
        })
    }

    /// Reimages with the image served at `path` and returns the ended
    /// operation, which must have succeeded.
    fn reimage(&self, path: &str, sha: &str) -> Value {
        let body = json!({
            "nodeReimageOption": "requeue",
            "image": {"url": self.server.url(path), "sha256": sha},
        });
        let (status, body) = self.daemon.post("/v1/node/reimage", ADMIN, body);
        assert_eq!(status, 202, "reimage accepted: {body}");
        let op = self
            .daemon
            .wait_operation(body["id"].as_str().expect("operation id"));
        assert_eq!(op["status"], "Succeeded", "{op}");
        let (storage, _) = partition_sha256(&self.file, "local-storage").expect("local-storage");
        assert_eq!(storage, self.storage_sha, "local-storage bytes unchanged");
        op
    }

    fn boot_order(&self) -> Vec<u16> {
        u16s(&var(&self.efivars, "BootOrder").expect("BootOrder"))
    }

    /// `efibootmgr -v` over the variables, or `None` (said) without it.
    fn efibootmgr(&self) -> Option<String> {
        let out = Command::new("efibootmgr")
            .arg("-v")
            .env("EFIVARFS_PATH", format!("{}/", self.efivars.display()))
            .output();
        match out {
            Ok(out) if out.status.success() => Some(String::from_utf8_lossy(&out.stdout).into()),
            Ok(out) => panic!("efibootmgr -v: {}", String::from_utf8_lossy(&out.stderr)),
            Err(e) => {
                skip(
                    "the efibootmgr check",
                    &format!("cannot run efibootmgr: {e}"),
                );
                None
            }
        }
    }
}

#[test]
fn a_reimage_boots_the_new_esp_next_then_first_and_drops_the_old_images_entry() {
    let test = "a_reimage_boots_the_new_esp_next_then_first_and_drops_the_old_images_entry";
    let Some(node) = UefiNode::start(test, |_| {}) else {
        return;
    };
    let images = images();
    let op = node.reimage(&images[0].0, &images[0].2);
    let entry = &op["bootEntry"];
    assert_eq!(entry["entry"], "Boot0003", "{op}");
    assert_eq!(entry["espPartUuid"], "e1e1e1e1-e1e1-e1e1-e1e1-e1e1e1e1e1e1");
    assert_eq!(entry["loader"], "\\EFI\\BOOT\\BOOTX64.EFI");
    assert_eq!(entry["bootNext"], true);
    // reboot "none": confirmed at once, so the order is settled too.
    assert_eq!(entry["firstInBootOrder"], true);
    assert_eq!(entry["removed"], json!(["Boot0001"]));
    assert_eq!(entry["error"], Value::Null);
    assert_eq!(node.boot_order(), vec![3, 0, 2]);
    assert_eq!(var(&node.efivars, "BootNext"), Some(vec![3, 0]));
    assert_eq!(
        var(&node.efivars, "Boot0001"),
        None,
        "the old image's entry"
    );
    assert!(
        var(&node.efivars, "Boot0002").is_some(),
        "another disk's entry stays"
    );
    if let Some(shown) = node.efibootmgr() {
        assert!(shown.contains("BootNext: 0003"), "{shown}");
        assert!(shown.contains("BootOrder: 0003,0000,0002"), "{shown}");
        assert!(
            shown.contains("Boot0003* reimage: a.img.zst\tHD(1,GPT,e1e1e1e1-e1e1-e1e1-e1e1-e1e1e1e1e1e1,0x800,0x1000)/File(\\EFI\\BOOT\\BOOTX64.EFI)"),
            "{shown}"
        );
    }

    // An image whose ESP has another GUID gets an entry of its own, and
    // the first one, whose ESP left the disk, goes.
    let op = node.reimage(&images[1].0, &images[1].2);
    assert_eq!(op["bootEntry"]["entry"], "Boot0001", "{op}");
    assert_eq!(op["bootEntry"]["removed"], json!(["Boot0003"]));
    assert_eq!(node.boot_order(), vec![1, 0, 2]);

    // The same image again reuses its entry and removes nothing.
    let op = node.reimage(&images[1].0, &images[1].2);
    assert_eq!(op["bootEntry"]["entry"], "Boot0001", "{op}");
    assert_eq!(op["bootEntry"]["removed"], json!([]));
    assert_eq!(node.boot_order(), vec![1, 0, 2]);
}

#[test]
fn firmware_that_refuses_the_variables_fails_only_the_boot_entry() {
    let test = "firmware_that_refuses_the_variables_fails_only_the_boot_entry";
    // A directory where BootNext's file would be: every write of it fails.
    let Some(node) = UefiNode::start(test, |efivars| {
        std::fs::create_dir(efivars.join(format!("BootNext-{GLOBAL}"))).expect("dir");
    }) else {
        return;
    };
    let images = images();
    let op = node.reimage(&images[0].0, &images[0].2);
    let entry = &op["bootEntry"];
    assert_eq!(entry["error"]["code"], "BootEntryFailed", "{op}");
    assert!(
        entry["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("BootNext")),
        "{op}"
    );
    assert_eq!(entry["bootNext"], false);
    assert_eq!(
        op["image"]["sha256"],
        images[0].2.as_str(),
        "the write stands"
    );
}

#[test]
fn an_image_without_an_esp_leaves_the_entries_and_says_why() {
    let test = "an_image_without_an_esp_leaves_the_entries_and_says_why";
    let Some(node) = UefiNode::start(test, |_| {}) else {
        return;
    };
    let mut raw = os_image(16, 1, 7);
    let root = Part {
        index: 1,
        label: "root",
        first_mib: 1,
        last_mib_excl: 15,
        guid: 0xd1,
    };
    write_table(&mut raw, &[root]);
    assert_eq!(raw.len() as u64, 16 * MIB);
    let server = FaultServer::start(
        vec![("/plain.img.zst".into(), Arc::new(zstd(&raw)))],
        Fault::None,
    );
    let body = json!({
        "nodeReimageOption": "requeue",
        "image": {"url": server.url("/plain.img.zst"), "sha256": sha256(&raw)},
    });
    let (status, body) = node.daemon.post("/v1/node/reimage", ADMIN, body);
    assert_eq!(status, 202, "{body}");
    let op = node.daemon.wait_operation(body["id"].as_str().expect("id"));
    assert_eq!(op["status"], "Succeeded", "{op}");
    assert_eq!(op["bootEntry"]["error"]["code"], "BootEntryFailed", "{op}");
    assert_eq!(op["bootEntry"]["entry"], Value::Null);
    assert_eq!(node.boot_order(), vec![1, 0, 2], "nothing changed");
}

#[test]
fn a_file_target_leaves_the_firmware_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("disk.img");
    target_disk(&file, 64, 16, 41);
    let efivars = dir.path().join("efivars");
    std::fs::create_dir(&efivars).expect("efivars dir");
    set_var(&efivars, "BootOrder", &[0, 0]);
    let config = write_config(
        dir.path(),
        &format!("efivars = \"{}\"\n", efivars.display()),
    );
    let daemon = Daemon::start(&config);
    let images = images();
    let served = images
        .iter()
        .map(|(p, b, _)| (p.clone(), b.clone()))
        .collect();
    let server = FaultServer::start(served, Fault::None);
    let body = json!({
        "nodeReimageOption": "requeue",
        "image": {"url": server.url(&images[0].0), "sha256": images[0].2},
    });
    let (status, body) = daemon.post("/v1/node/reimage", ADMIN, body);
    assert_eq!(status, 202, "{body}");
    let op = daemon.wait_operation(body["id"].as_str().expect("id"));
    assert_eq!(op["status"], "Succeeded", "{op}");
    assert!(op.get("bootEntry").is_none(), "{op}");
    let names: Vec<_> = std::fs::read_dir(&efivars)
        .expect("efivars")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names.len(), 1, "only BootOrder: {names:?}");
}

#[test]
fn a_prefetched_copy_that_fails_mid_write_still_drops_the_old_images_entry() {
    let test = "a_prefetched_copy_that_fails_mid_write_still_drops_the_old_images_entry";
    let Some(node) = UefiNode::start(test, |_| {}) else {
        return;
    };
    let images = images();
    let (path, _, sha) = &images[0];
    let body = json!({"image": {"url": node.server.url(path), "sha256": sha}});
    let (status, body) = node.daemon.post("/v1/images/prefetch", ADMIN, body);
    assert_eq!(status, 202, "{body}");
    let prefetch = node.daemon.wait_operation(body["id"].as_str().expect("id"));
    assert_eq!(prefetch["status"], "Succeeded", "{prefetch}");
    // Corrupt late in the copy: its write fails after the table was reset,
    // and the image is then streamed from its URL onto a saved-only disk.
    let staged = node.dir.path().join(format!("state/images/{sha}.staged"));
    let mut bytes = std::fs::read(&staged).expect("staged copy");
    let late = bytes.len() * 3 / 4;
    bytes[late] ^= 0xff;
    std::fs::write(&staged, &bytes).expect("corrupt the copy, same length");

    let op = node.reimage(path, sha);
    assert_eq!(op["bootEntry"]["entry"], "Boot0003", "{op}");
    assert_eq!(
        op["bootEntry"]["removed"],
        json!(["Boot0001"]),
        "the old image's entry goes although the second attempt found a saved-only disk: {op}"
    );
}
