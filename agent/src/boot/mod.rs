//! Keeping the firmware's boot entries on the image the agent wrote.
//!
//! UEFI firmware boots what its `BootOrder` (or a one-time `BootNext`)
//! names, and an entry names the EFI system partition by its GPT GUID: an
//! image whose ESP has another GUID leaves the old entry pointing at
//! nothing. So on a node that booted through UEFI:
//!
//! ```text
//! after the commit (direct) or the handoff's install (in place):
//!   Boot#### = HD(new ESP)/File(loader)   (reused if one already boots it)
//!   BootNext = ####
//! once the new system's agent confirms the operation:
//!   BootOrder = ####, then the rest
//!   remove entries whose ESP was on the disk before and is gone now
//! ```
//!
//! None of it can undo a verified write: a failure is reported with the
//! operation (`BootEntryFailed`) and the node still reboots.

pub mod efivars;
pub mod load_option;

use crate::disk::gpt::format_guid;
use efivars::{EfiVars, boot_name};
use load_option::{HardDrive, LoadOption};
use std::io::{self, Cursor};
use std::path::Path;

/// Where firmware looks on removable media, and the default loader.
pub const DEFAULT_LOADER: &str = "\\EFI\\BOOT\\BOOTX64.EFI";

/// `C12A7328-F81F-11D2-BA4B-00A0C93EC93B`, as a GPT entry stores it.
const ESP_TYPE: [u8; 16] = [
    0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b,
];

/// A disk's partitions as the boot entries care about them: the GUID of
/// each, and the EFI system partition, if there is one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootLayout {
    pub esp: Option<HardDrive>,
    pub guids: Vec<[u8; 16]>,
}

impl BootLayout {
    /// The layout of `gpt`: its first EFI system partition by index.
    pub fn of_table(gpt: &gptman::GPT) -> BootLayout {
        let used = || gpt.iter().filter(|(_, e)| e.is_used());
        BootLayout {
            esp: used()
                .find(|(_, e)| e.partition_type_guid == ESP_TYPE)
                .map(|(number, e)| HardDrive {
                    partition_number: number,
                    start_lba: e.starting_lba,
                    size_lba: e.ending_lba - e.starting_lba + 1,
                    guid: e.unique_partition_guid,
                }),
            guids: used().map(|(_, e)| e.unique_partition_guid).collect(),
        }
    }

    /// The layout of the GPT in an image's first bytes; empty without one.
    pub fn of_head(head: &[u8], sector_size: u64) -> BootLayout {
        gptman::GPT::read_from(&mut Cursor::new(head), sector_size)
            .map(|gpt| BootLayout::of_table(&gpt))
            .unwrap_or_default()
    }

    /// The layout of the table on `disk` now; empty without one.
    pub fn of_disk(disk: &Path) -> BootLayout {
        std::fs::File::open(disk)
            .ok()
            .and_then(|mut file| gptman::GPT::find_from(&mut file).ok())
            .map(|gpt| BootLayout::of_table(&gpt))
            .unwrap_or_default()
    }
}

/// The entry to boot the new image by.
#[derive(Debug, Clone)]
pub struct BootTarget {
    pub esp: HardDrive,
    pub loader: String,
    pub description: String,
}

/// Writes the `Boot####` for `target` (the number of an entry that already
/// boots that file on that partition, else the lowest free one) and sets
/// `BootNext` to it. Returns the number.
pub fn point_next_boot_at(vars: &EfiVars, target: &BootTarget) -> io::Result<u16> {
    let entries = vars.boot_entries()?;
    let wanted = LoadOption::new(&target.description, target.esp, &target.loader);
    let number = entries
        .iter()
        .find(|(_, option)| option.boots_same(&wanted))
        .map(|(number, _)| *number)
        .or_else(|| (0..=u16::MAX).find(|n| entries.iter().all(|(taken, _)| taken != n)))
        .ok_or_else(|| io::Error::other("every Boot#### number is taken"))?;
    vars.write(&boot_name(number), &wanted.encode())?;
    vars.write_u16("BootNext", number)?;
    tracing::info!(entry = %boot_name(number), esp = %format_guid(&target.esp.guid), loader = %target.loader, "the next boot boots the new image");
    Ok(number)
}

/// Once the new image has booted: puts `number` first in `BootOrder` and
/// removes the entries [`stale_entries`] finds. Returns the ones removed.
pub fn settle(
    vars: &EfiVars,
    number: u16,
    before: &[[u8; 16]],
    now: &[[u8; 16]],
) -> io::Result<Vec<u16>> {
    let stale = stale_entries(&vars.boot_entries()?, number, before, now);
    for gone in &stale {
        vars.delete(&boot_name(*gone))?;
    }
    let order = vars.boot_order()?;
    let rest = order.iter().filter(|n| **n != number && !stale.contains(n));
    let order: Vec<u16> = std::iter::once(number).chain(rest.copied()).collect();
    vars.set_boot_order(&order)?;
    Ok(stale)
}

/// The entries of the old image: they boot a partition that was on the
/// disk before the reimage (`before`) and is not on it now (`now`). Entries
/// for other disks, the firmware's own and `keep` are never chosen.
pub fn stale_entries(
    entries: &[(u16, LoadOption)],
    keep: u16,
    before: &[[u8; 16]],
    now: &[[u8; 16]],
) -> Vec<u16> {
    entries
        .iter()
        .filter(|(number, option)| {
            *number != keep
                && option
                    .hard_drive
                    .is_some_and(|hd| before.contains(&hd.guid) && !now.contains(&hd.guid))
        })
        .map(|(number, _)| *number)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hd(guid: u8) -> HardDrive {
        HardDrive {
            partition_number: 1,
            start_lba: 2048,
            size_lba: 65536,
            guid: [guid; 16],
        }
    }

    fn target(guid: u8) -> BootTarget {
        BootTarget {
            esp: hd(guid),
            loader: DEFAULT_LOADER.into(),
            description: "reimage: new".into(),
        }
    }

    fn firmware_entry(description: &str) -> LoadOption {
        LoadOption {
            attributes: 1,
            description: description.into(),
            hard_drive: None,
            path: None,
            optional_data: Vec::new(),
        }
    }

    /// Firmware with a disk entry (0), the old image's (1) and a
    /// PXE-like one (2), booting 1 first.
    fn firmware(dir: &Path) -> EfiVars {
        let vars = EfiVars::at(dir);
        let old = LoadOption::new("debian", hd(0xaa), "\\EFI\\debian\\shimx64.efi");
        vars.write("Boot0000", &firmware_entry("UEFI QEMU HARDDISK").encode())
            .expect("write");
        vars.write("Boot0001", &old.encode()).expect("write");
        vars.write("Boot0002", &firmware_entry("UEFI PXEv4").encode())
            .expect("write");
        vars.set_boot_order(&[1, 0, 2]).expect("write");
        vars
    }

    #[test]
    fn a_new_esp_gets_the_lowest_free_number_and_boot_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vars = firmware(dir.path());
        let number = point_next_boot_at(&vars, &target(0xbb)).expect("points");
        assert_eq!(number, 3);
        assert_eq!(vars.read_u16("BootNext").expect("reads"), Some(3));
        let written = LoadOption::decode(&vars.read("Boot0003").expect("reads").expect("set"))
            .expect("decodes");
        assert_eq!(written.hard_drive, Some(hd(0xbb)));
        assert_eq!(written.path.as_deref(), Some(DEFAULT_LOADER));
        assert_eq!(
            vars.boot_order().expect("reads"),
            vec![1, 0, 2],
            "BootOrder waits for the confirmation"
        );
    }

    #[test]
    fn an_entry_that_already_boots_the_loader_is_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vars = firmware(dir.path());
        let first = point_next_boot_at(&vars, &target(0xbb)).expect("points");
        let again = point_next_boot_at(&vars, &target(0xbb)).expect("points");
        assert_eq!(first, again);
        assert_eq!(vars.boot_entries().expect("lists").len(), 4);
    }

    #[test]
    fn settling_puts_the_entry_first_and_removes_the_old_images_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vars = firmware(dir.path());
        let number = point_next_boot_at(&vars, &target(0xbb)).expect("points");
        let before = [[0xaa; 16], [0x55; 16]]; // old ESP and a saved partition
        let now = [[0xbb; 16], [0x55; 16]];
        let removed = settle(&vars, number, &before, &now).expect("settles");
        assert_eq!(removed, vec![1]);
        assert_eq!(vars.boot_order().expect("reads"), vec![3, 0, 2]);
        assert_eq!(vars.read("Boot0001").expect("reads"), None);
    }

    #[test]
    fn only_entries_for_partitions_that_left_the_disk_are_stale() {
        let entries = vec![
            (0, firmware_entry("UEFI QEMU HARDDISK")),
            (1, LoadOption::new("old", hd(0xaa), DEFAULT_LOADER)),
            (2, LoadOption::new("other disk", hd(0xcc), DEFAULT_LOADER)),
            (
                3,
                LoadOption::new("same ESP", hd(0xbb), "\\EFI\\debian\\grubx64.efi"),
            ),
            (4, LoadOption::new("new", hd(0xbb), DEFAULT_LOADER)),
            (5, LoadOption::new("old, kept", hd(0xaa), DEFAULT_LOADER)),
        ];
        let before = [[0xaa; 16], [0xbb; 16]];
        let now = [[0xbb; 16]];
        assert_eq!(stale_entries(&entries, 4, &before, &now), vec![1, 5]);
        assert_eq!(stale_entries(&entries, 5, &before, &now), vec![1]);
        assert!(
            stale_entries(&entries, 4, &[], &now).is_empty(),
            "nothing known of before: nothing removed"
        );
    }

    /// `efibootmgr` (through libefivar, pointed at the directory by
    /// `EFIVARFS_PATH`) reads the entries the agent writes, and the agent
    /// reads the `BootNext` and `BootOrder` it writes.
    #[test]
    fn efibootmgr_and_the_agent_read_each_other() {
        use reimage_e2e::{run, skip};
        let test = "efibootmgr_and_the_agent_read_each_other";
        if let Err(reason) = run("efibootmgr", &["--version"]) {
            return skip(test, &reason);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let vars = firmware(dir.path());
        let mut esp = hd(0);
        esp.guid = super::load_option::tests::GUID;
        let target = BootTarget { esp, ..target(0) };
        let number = point_next_boot_at(&vars, &target).expect("points");
        let efibootmgr = |args: &[&str]| {
            let out = std::process::Command::new("efibootmgr")
                .args(args)
                .env("EFIVARFS_PATH", format!("{}/", dir.path().display()))
                .output()
                .expect("runs efibootmgr");
            assert!(
                out.status.success(),
                "efibootmgr {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).expect("utf-8")
        };
        let shown = efibootmgr(&["-v"]);
        assert!(shown.contains("BootNext: 0003"), "{shown}");
        assert!(
            shown.contains("Boot0003* reimage: new\tHD(1,GPT,12345678-1234-5678-9abc-def012345678,0x800,0x10000)/File(\\EFI\\BOOT\\BOOTX64.EFI)"),
            "{shown}"
        );
        assert!(
            shown.contains("File(\\EFI\\debian\\shimx64.efi)"),
            "{shown}"
        );
        // libefivar writes without truncating, as efivarfs wants: in a
        // plain directory a shorter BootOrder would keep a stale tail.
        efibootmgr(&["-o", "0002,0003,0000", "-n", "0001"]);
        assert_eq!(vars.boot_order().expect("reads"), vec![2, number, 0]);
        assert_eq!(vars.read_u16("BootNext").expect("reads"), Some(1));
    }

    #[test]
    fn finds_the_esp_of_a_table() {
        let mut gpt = gptman::GPT::new_from(
            &mut crate::disk::gpt::SparseDisk::new(64 << 20, 512),
            512,
            [9; 16],
        )
        .expect("table");
        gpt[1] = gptman::GPTPartitionEntry {
            partition_type_guid: [0x0f; 16],
            unique_partition_guid: [1; 16],
            starting_lba: 2048,
            ending_lba: 4095,
            attribute_bits: 0,
            partition_name: "root".into(),
        };
        gpt[2] = gptman::GPTPartitionEntry {
            partition_type_guid: ESP_TYPE,
            unique_partition_guid: [2; 16],
            starting_lba: 4096,
            ending_lba: 8191,
            attribute_bits: 0,
            partition_name: "esp".into(),
        };
        let layout = BootLayout::of_table(&gpt);
        assert_eq!(
            layout.esp,
            Some(HardDrive {
                partition_number: 2,
                start_lba: 4096,
                size_lba: 4096,
                guid: [2; 16],
            })
        );
        assert_eq!(layout.guids, vec![[1; 16], [2; 16]]);
        assert_eq!(BootLayout::of_head(&[0; 4096], 512), BootLayout::default());
    }
}
