//! The firmware's variables through efivarfs (`/sys/firmware/efi/efivars`),
//! or through a plain directory laid out the same way (tests, and
//! `EFIVARFS_PATH` for `efibootmgr`).
//!
//! A file is named `<Name>-<vendor GUID>` and holds the variable's
//! attributes (u32, little-endian) followed by its value. efivarfs wants
//! each value written in one `write(2)`, and marks some files immutable;
//! the flag is cleared before a variable is changed or removed.

use super::load_option::LoadOption;
use std::ffi::{c_int, c_long};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// `EFI_GLOBAL_VARIABLE`, the vendor of `Boot####`, `BootOrder`, `BootNext`.
pub const GLOBAL: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";

/// Non-volatile, boot-service and runtime access: what boot variables have.
const ATTRIBUTES: u32 = 0x7;

const FS_IMMUTABLE_FL: c_int = 0x10;

mod ioctl {
    // FS_IOC_GETFLAGS/SETFLAGS are declared with `long` but pass an int.
    nix::ioctl_read_bad!(
        get_flags,
        nix::request_code_read!(b'f', 1, std::mem::size_of::<super::c_long>()),
        super::c_int
    );
    nix::ioctl_write_ptr_bad!(
        set_flags,
        nix::request_code_write!(b'f', 2, std::mem::size_of::<super::c_long>()),
        super::c_int
    );
}

/// The boot variables of one firmware.
#[derive(Debug, Clone)]
pub struct EfiVars {
    dir: PathBuf,
}

impl EfiVars {
    /// The variables under `dir` (efivarfs, or a directory laid out like it).
    pub fn at(dir: &Path) -> EfiVars {
        EfiVars {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-{GLOBAL}"))
    }

    /// The value of global variable `name`, or `None` when it is not set.
    pub fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let mut bytes = Vec::new();
        match File::open(self.path(name)) {
            Ok(mut file) => file.read_to_end(&mut bytes)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if bytes.len() < 4 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{name} holds {} bytes, fewer than its attributes",
                    bytes.len()
                ),
            ));
        }
        Ok(Some(bytes.split_off(4)))
    }

    /// Sets global variable `name` to `value`, in one write.
    pub fn write(&self, name: &str, value: &[u8]) -> io::Result<()> {
        let path = self.path(name);
        make_mutable(&path)?;
        let mut bytes = Vec::with_capacity(4 + value.len());
        bytes.extend_from_slice(&ATTRIBUTES.to_le_bytes());
        bytes.extend_from_slice(value);
        // No O_TRUNC: efivarfs replaces the value on write; a plain file is
        // cut to length below.
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let written = file.write(&bytes)?;
        if written != bytes.len() {
            return Err(io::Error::other(format!(
                "{name}: wrote {written} of {} bytes",
                bytes.len()
            )));
        }
        if file.metadata()?.len() > bytes.len() as u64 {
            file.set_len(bytes.len() as u64)?;
        }
        Ok(())
    }

    /// Removes global variable `name`; one that is not set is fine.
    pub fn delete(&self, name: &str) -> io::Result<()> {
        let path = self.path(name);
        make_mutable(&path)?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// A `u16` variable (`BootCurrent`, `BootNext`).
    pub fn read_u16(&self, name: &str) -> io::Result<Option<u16>> {
        Ok(self
            .read(name)?
            .and_then(|v| Some(u16::from_le_bytes(v.get(..2)?.try_into().ok()?))))
    }

    pub fn write_u16(&self, name: &str, value: u16) -> io::Result<()> {
        self.write(name, &value.to_le_bytes())
    }

    /// `BootOrder`; empty when it is not set.
    pub fn boot_order(&self) -> io::Result<Vec<u16>> {
        Ok(self
            .read("BootOrder")?
            .unwrap_or_default()
            .chunks_exact(2)
            .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
            .collect())
    }

    pub fn set_boot_order(&self, order: &[u16]) -> io::Result<()> {
        let bytes: Vec<u8> = order.iter().flat_map(|n| n.to_le_bytes()).collect();
        self.write("BootOrder", &bytes)
    }

    /// Every `Boot####` load option, by number; ones that do not decode are
    /// left out (with a log line): they are not the agent's to judge.
    pub fn boot_entries(&self) -> io::Result<Vec<(u16, LoadOption)>> {
        let mut entries = Vec::new();
        for dirent in std::fs::read_dir(&self.dir)? {
            let name = dirent?.file_name();
            let Some(number) = name.to_str().and_then(boot_number) else {
                continue;
            };
            let Some(value) = self.read(&boot_name(number))? else {
                continue;
            };
            match LoadOption::decode(&value) {
                Ok(option) => entries.push((number, option)),
                Err(err) => {
                    tracing::warn!(entry = %boot_name(number), %err, "skipping a boot entry")
                }
            }
        }
        entries.sort_by_key(|(number, _)| *number);
        Ok(entries)
    }
}

/// `Boot0004` for 4.
pub fn boot_name(number: u16) -> String {
    format!("Boot{number:04X}")
}

/// The number of a `Boot####-<global GUID>` file name.
fn boot_number(file_name: &str) -> Option<u16> {
    let hex = file_name.strip_prefix("Boot")?.strip_suffix(GLOBAL)?;
    let hex = hex.strip_suffix('-')?;
    (hex.len() == 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u16::from_str_radix(hex, 16).ok())
        .flatten()
}

/// Clears the immutable flag efivarfs sets on a variable's file. A file
/// that does not exist, or a file system without flags, needs nothing.
fn make_mutable(path: &Path) -> io::Result<()> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut flags: c_int = 0;
    // SAFETY: the descriptor is open and `flags` outlives both calls.
    if unsafe { ioctl::get_flags(file.as_raw_fd(), &mut flags) }.is_err() {
        return Ok(());
    }
    if flags & FS_IMMUTABLE_FL != 0 {
        let cleared = flags & !FS_IMMUTABLE_FL;
        // SAFETY: as above.
        unsafe { ioctl::set_flags(file.as_raw_fd(), &cleared) }
            .map_err(|e| io::Error::other(format!("clearing the immutable flag: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_it_writes_and_cuts_shorter_values_to_length() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vars = EfiVars::at(dir.path());
        assert_eq!(vars.boot_order().expect("reads"), Vec::<u16>::new());
        vars.set_boot_order(&[3, 1, 0x10]).expect("writes");
        vars.set_boot_order(&[1]).expect("writes");
        assert_eq!(vars.boot_order().expect("reads"), vec![1]);
        let raw = std::fs::read(dir.path().join(format!("BootOrder-{GLOBAL}"))).expect("file");
        assert_eq!(raw, [7, 0, 0, 0, 1, 0]);
        vars.write_u16("BootNext", 0xabcd).expect("writes");
        assert_eq!(vars.read_u16("BootNext").expect("reads"), Some(0xabcd));
        vars.delete("BootNext").expect("deletes");
        vars.delete("BootNext").expect("deleting twice is fine");
        assert_eq!(vars.read_u16("BootNext").expect("reads"), None);
    }

    #[test]
    fn lists_boot_entries_by_number_and_nothing_else() {
        assert_eq!(boot_number(&format!("Boot000A-{GLOBAL}")), Some(10));
        assert_eq!(boot_number(&format!("BootOrder-{GLOBAL}")), None);
        assert_eq!(boot_number(&format!("Boot0001-{}", "0".repeat(36))), None);
        assert_eq!(boot_number(&format!("Boot00G1-{GLOBAL}")), None);
        assert_eq!(boot_name(0x1f), "Boot001F");
    }
}
