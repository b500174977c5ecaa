//! The firmware's boot entries around a reimage (the rules are in
//! [`crate::boot`]): the partitions before the write, the entry and
//! `BootNext` once the image is written (or its handoff installed), and
//! `BootOrder` once the new system confirmed it. Nothing here fails the
//! operation: what goes wrong is in its `bootEntry.error`.

use super::Agent;
use super::run::Written;
use crate::boot::efivars::{EfiVars, boot_name};
use crate::boot::{self, BootLayout, BootTarget, DEFAULT_LOADER};
use crate::disk::gpt::format_guid;
use reimage_protocol::ErrorCode;
use reimage_protocol::api::{BootEntryReport, OperationError, RebootKind};
use std::os::unix::fs::FileTypeExt;

impl Agent {
    /// The firmware's variables, when reimages here keep boot entries: the
    /// node booted through UEFI and the target is a block device (a disk
    /// image in a file is not what the firmware boots).
    fn efi_vars(&self) -> Option<EfiVars> {
        let dir = &self.config.reboot.efivars;
        let block = std::fs::metadata(&self.config.disk.target)
            .is_ok_and(|m| m.file_type().is_block_device());
        (block && dir.is_dir()).then(|| EfiVars::at(dir))
    }

    /// Before anything is written: the partitions the target holds, whose
    /// boot entries become stale if they leave the disk. Noted once: a
    /// second attempt (the image from its URL after a prefetched copy
    /// failed mid-write) finds only the saved-only table.
    pub(super) fn note_partitions_before(&self, id: &str) -> crate::Result<()> {
        if self.efi_vars().is_none() {
            return Ok(());
        }
        let noted = self
            .lock()
            .operations
            .get(id)
            .is_some_and(|record| !record.partitions_before.is_empty());
        if noted {
            return Ok(());
        }
        let before = BootLayout::of_disk(&self.config.disk.target).guids;
        self.update_record(id, |record| record.partitions_before = before)
    }

    /// The image is written and verified (or staged with its handoff in
    /// place): the firmware's next boot boots its ESP.
    pub(super) fn point_firmware_at(&self, id: &str, written: &Written) -> crate::Result<()> {
        let Some(vars) = self.efi_vars() else {
            return Ok(());
        };
        let loader = written
            .boot_loader
            .clone()
            .unwrap_or_else(|| DEFAULT_LOADER.to_string());
        let mut report = BootEntryReport {
            loader: Some(loader.clone()),
            ..BootEntryReport::default()
        };
        match written.boot.esp {
            None => {
                report.error = Some(failed(
                    "the image has no EFI system partition, so no boot entry can name it; the firmware's entries are left as they are".into(),
                ))
            }
            Some(esp) => {
                report.esp_part_uuid = Some(format_guid(&esp.guid).to_ascii_lowercase());
                let target = BootTarget {
                    esp,
                    loader,
                    description: format!("reimage: {}", written.image.name),
                };
                match boot::point_next_boot_at(&vars, &target) {
                    Ok(number) => {
                        report.entry = Some(boot_name(number));
                        report.boot_next = true;
                    }
                    Err(err) => {
                        report.error = Some(failed(format!(
                            "writing the boot entry and BootNext in {}: {err}",
                            vars.dir().display()
                        )))
                    }
                }
            }
        }
        self.record_boot_entry(id, report)
    }

    /// The new system confirmed the operation: its entry goes first in
    /// `BootOrder`, the old image's entries go.
    pub(super) fn settle_boot_entries(&self, id: &str) -> crate::Result<()> {
        let Some(WrittenEntry {
            vars,
            mut report,
            number,
            before,
        }) = self.boot_entry_of(id)
        else {
            return Ok(());
        };
        // After a kexec the firmware's BootCurrent is the boot before it.
        let kexeced = self
            .operation(id)
            .and_then(|op| op.reboot)
            .is_some_and(|r| r.method == RebootKind::Kexec);
        report.booted = vars
            .read_u16("BootCurrent")
            .ok()
            .flatten()
            .filter(|_| !kexeced)
            .map(|current| current == number);
        let now = BootLayout::of_disk(&self.config.disk.target).guids;
        match boot::settle(&vars, number, &before, &now) {
            Ok(removed) => {
                report.first_in_boot_order = true;
                report.removed = removed.into_iter().map(boot_name).collect();
            }
            Err(err) => {
                report.error = Some(failed(format!(
                    "putting {} first in BootOrder: {err}",
                    boot_name(number)
                )))
            }
        }
        self.record_boot_entry(id, report)
    }

    /// The operation failed: an entry it wrote for an ESP that is not on
    /// the disk (the handoff never wrote it) would dangle; it is removed,
    /// with a `BootNext` naming it.
    pub(super) fn withdraw_boot_entry(&self, id: &str) {
        let Some(WrittenEntry {
            vars,
            mut report,
            number,
            ..
        }) = self.boot_entry_of(id)
        else {
            return;
        };
        let on_disk = BootLayout::of_disk(&self.config.disk.target).guids;
        let name = boot_name(number);
        let dangling = vars.read(&name).ok().flatten().and_then(|value| {
            let option = boot::load_option::LoadOption::decode(&value).ok()?;
            option.hard_drive.filter(|hd| !on_disk.contains(&hd.guid))
        });
        if dangling.is_none() {
            return;
        }
        let next = vars.read_u16("BootNext").ok().flatten();
        let withdrawn = vars.delete(&name).and_then(|()| match next {
            Some(next) if next == number => vars.delete("BootNext"),
            _ => Ok(()),
        });
        match withdrawn {
            Ok(()) => {
                report.removed.push(name);
                report.boot_next = false;
            }
            Err(err) => report.error = Some(failed(format!("removing {name}: {err}"))),
        }
        if let Err(err) = self.record_boot_entry(id, report) {
            tracing::warn!(operation = %id, %err, "could not record the withdrawn boot entry");
        }
    }

    /// The entry operation `id` wrote; `None` when it wrote none.
    fn boot_entry_of(&self, id: &str) -> Option<WrittenEntry> {
        let vars = self.efi_vars()?;
        let record = self.lock().operations.get(id).cloned()?;
        let report = record.operation.boot_entry?;
        let number = report
            .entry
            .as_deref()
            .and_then(|name| name.strip_prefix("Boot"))
            .and_then(|hex| u16::from_str_radix(hex, 16).ok())?;
        Some(WrittenEntry {
            vars,
            report,
            number,
            before: record.partitions_before,
        })
    }

    fn record_boot_entry(&self, id: &str, report: BootEntryReport) -> crate::Result<()> {
        if let Some(error) = &report.error {
            tracing::warn!(operation = %id, code = %error.code, message = %error.message, "the firmware's boot entries");
        }
        self.update(id, |op| op.boot_entry = Some(report))
    }
}

/// A boot entry an operation wrote, and what it needs to settle it.
struct WrittenEntry {
    vars: EfiVars,
    report: BootEntryReport,
    number: u16,
    /// The target's partition GUIDs before the write.
    before: Vec<[u8; 16]>,
}

fn failed(message: String) -> OperationError {
    OperationError {
        code: ErrorCode::BootEntryFailed,
        message,
    }
}
