//! `EFI_LOAD_OPTION`, the value of a `Boot####` variable (UEFI 2.10,
//! §3.1.3): attributes, the length of the device path, a NUL-terminated
//! UTF-16 description, the device path and optional data.
//!
//! The agent writes one kind of device path, the short form that firmware
//! expands by the partition's GUID on whichever disk holds it:
//!
//! ```text
//! HD(partition number, GPT, partition GUID, start LBA, size in LBAs)
//!   / File(\EFI\BOOT\BOOTX64.EFI) / End
//! ```
//!
//! It reads any load option, keeping of its device path only what it needs
//! to tell which partition and file an entry boots.

use std::fmt;

/// `LOAD_OPTION_ACTIVE`: the firmware may boot the entry.
pub const LOAD_OPTION_ACTIVE: u32 = 0x1;

const MEDIA: u8 = 0x04;
const MEDIA_HARD_DRIVE: u8 = 0x01;
const MEDIA_FILE_PATH: u8 = 0x04;
const END: u8 = 0x7f;
const END_ENTIRE: u8 = 0xff;
const HARD_DRIVE_LEN: usize = 42;
const MBR_TYPE_GPT: u8 = 0x02;
const SIGNATURE_GUID: u8 = 0x02;

/// A GPT partition as a `HD()` device-path node names it. `guid` is the
/// partition's unique GUID in its on-disk byte order (as the GPT entry
/// stores it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HardDrive {
    pub partition_number: u32,
    pub start_lba: u64,
    pub size_lba: u64,
    pub guid: [u8; 16],
}

/// A decoded `Boot####` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOption {
    pub attributes: u32,
    pub description: String,
    /// The GPT partition its device path names, if it names one.
    pub hard_drive: Option<HardDrive>,
    /// The file its device path names on that partition, if any.
    pub path: Option<String>,
    pub optional_data: Vec<u8>,
}

/// Why a `Boot####` value cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed load option: {0}")]
pub struct Malformed(&'static str);

impl LoadOption {
    /// An active entry booting `path` on the partition `hard_drive`.
    pub fn new(description: &str, hard_drive: HardDrive, path: &str) -> LoadOption {
        LoadOption {
            attributes: LOAD_OPTION_ACTIVE,
            description: description.to_string(),
            hard_drive: Some(hard_drive),
            path: Some(path.to_string()),
            optional_data: Vec::new(),
        }
    }

    /// Whether this entry boots the same file on the same partition as
    /// `other` (description and attributes aside).
    pub fn boots_same(&self, other: &LoadOption) -> bool {
        let guid = |o: &LoadOption| o.hard_drive.map(|hd| hd.guid);
        let path = |o: &LoadOption| o.path.as_deref().map(str::to_ascii_uppercase);
        guid(self).is_some() && guid(self) == guid(other) && path(self) == path(other)
    }

    /// The variable's bytes: `HD()/File()/End` when both are known, else
    /// only the nodes that are.
    pub fn encode(&self) -> Vec<u8> {
        let mut device_path = Vec::new();
        if let Some(hd) = &self.hard_drive {
            let mut data = Vec::with_capacity(HARD_DRIVE_LEN - 4);
            data.extend_from_slice(&hd.partition_number.to_le_bytes());
            data.extend_from_slice(&hd.start_lba.to_le_bytes());
            data.extend_from_slice(&hd.size_lba.to_le_bytes());
            data.extend_from_slice(&hd.guid);
            data.extend_from_slice(&[MBR_TYPE_GPT, SIGNATURE_GUID]);
            push_node(&mut device_path, MEDIA, MEDIA_HARD_DRIVE, &data);
        }
        if let Some(path) = &self.path {
            push_node(&mut device_path, MEDIA, MEDIA_FILE_PATH, &utf16z(path));
        }
        push_node(&mut device_path, END, END_ENTIRE, &[]);
        let mut out = Vec::new();
        out.extend_from_slice(&self.attributes.to_le_bytes());
        out.extend_from_slice(&(device_path.len() as u16).to_le_bytes());
        out.extend_from_slice(&utf16z(&self.description));
        out.extend_from_slice(&device_path);
        out.extend_from_slice(&self.optional_data);
        out
    }

    /// Decodes a `Boot####` value. Nodes other than `HD()` (GPT) and
    /// `File()` are skipped; lengths are checked, never trusted.
    pub fn decode(bytes: &[u8]) -> Result<LoadOption, Malformed> {
        let attributes = u32::from_le_bytes(take::<4>(bytes, 0)?);
        let path_len = u16::from_le_bytes(take::<2>(bytes, 4)?) as usize;
        let (description, after) = read_utf16z(&bytes[6..])?;
        let start = 6 + after;
        let device_path = bytes
            .get(start..start + path_len)
            .ok_or(Malformed("the device path runs past the value"))?;
        let mut option = LoadOption {
            attributes,
            description,
            hard_drive: None,
            path: None,
            optional_data: bytes[start + path_len..].to_vec(),
        };
        let mut at = 0;
        while at < device_path.len() {
            let [kind, subtype, l0, l1] = take::<4>(device_path, at)?;
            let len = u16::from_le_bytes([l0, l1]) as usize;
            let node = device_path
                .get(at + 4..at + len.max(4))
                .filter(|_| len >= 4)
                .ok_or(Malformed("a device path node has a bad length"))?;
            match (kind, subtype) {
                (END, END_ENTIRE) => break,
                (MEDIA, MEDIA_HARD_DRIVE)
                    if len == HARD_DRIVE_LEN
                        && node[36] == MBR_TYPE_GPT
                        && node[37] == SIGNATURE_GUID =>
                {
                    option.hard_drive = Some(HardDrive {
                        partition_number: u32::from_le_bytes(take::<4>(node, 0)?),
                        start_lba: u64::from_le_bytes(take::<8>(node, 4)?),
                        size_lba: u64::from_le_bytes(take::<8>(node, 12)?),
                        guid: take::<16>(node, 20)?,
                    });
                }
                (MEDIA, MEDIA_FILE_PATH) => option.path = Some(read_utf16z(node)?.0),
                _ => {}
            }
            at += len;
        }
        Ok(option)
    }
}

impl fmt::Display for LoadOption {
    /// As `efibootmgr -v` shows it: `HD(1,GPT,<guid>,0x800,0x32000)/File(\…)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.description)?;
        if let Some(hd) = &self.hard_drive {
            write!(
                f,
                "\tHD({},GPT,{},{:#x},{:#x})",
                hd.partition_number,
                crate::disk::gpt::format_guid(&hd.guid).to_ascii_lowercase(),
                hd.start_lba,
                hd.size_lba
            )?;
        }
        if let Some(path) = &self.path {
            write!(f, "/File({path})")?;
        }
        Ok(())
    }
}

fn push_node(out: &mut Vec<u8>, kind: u8, subtype: u8, data: &[u8]) {
    out.extend_from_slice(&[kind, subtype]);
    out.extend_from_slice(&((data.len() + 4) as u16).to_le_bytes());
    out.extend_from_slice(data);
}

fn utf16z(text: &str) -> Vec<u8> {
    text.encode_utf16()
        .chain([0])
        .flat_map(u16::to_le_bytes)
        .collect()
}

/// The NUL-terminated UTF-16 string at the start of `bytes`, and the bytes
/// it took with its NUL.
fn read_utf16z(bytes: &[u8]) -> Result<(String, usize), Malformed> {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
        .take_while(|&unit| unit != 0)
        .collect();
    let taken = (units.len() + 1) * 2;
    if taken > bytes.len() {
        return Err(Malformed("a string has no terminating NUL"));
    }
    let text = String::from_utf16(&units).map_err(|_| Malformed("a string is not UTF-16"))?;
    Ok((text, taken))
}

fn take<const N: usize>(bytes: &[u8], at: usize) -> Result<[u8; N], Malformed> {
    bytes
        .get(at..at + N)
        .and_then(|slice| slice.try_into().ok())
        .ok_or(Malformed("the value is cut short"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `12345678-1234-5678-9abc-def012345678` as a GPT entry stores it.
    pub(crate) const GUID: [u8; 16] = [
        0x78, 0x56, 0x34, 0x12, 0x34, 0x12, 0x78, 0x56, 0x9a, 0xbc, 0xde, 0xf0, 0x12, 0x34, 0x56,
        0x78,
    ];

    fn esp() -> HardDrive {
        HardDrive {
            partition_number: 1,
            start_lba: 2048,
            size_lba: 204_800,
            guid: GUID,
        }
    }

    #[test]
    fn encodes_the_short_form_hard_drive_path_byte_for_byte() {
        let bytes = LoadOption::new("t", esp(), "\\A").encode();
        let expected: Vec<u8> = [
            &[1, 0, 0, 0][..],                       // LOAD_OPTION_ACTIVE
            &[56, 0],                                // device path length: 42 + 10 + 4
            &[b't', 0, 0, 0],                        // "t\0"
            &[4, 1, 42, 0, 1, 0, 0, 0],              // HD, partition 1
            &2048u64.to_le_bytes(),                  // start
            &204_800u64.to_le_bytes(),               // size
            &GUID,                                   // signature
            &[2, 2],                                 // GPT, GUID signature
            &[4, 4, 10, 0, b'\\', 0, b'A', 0, 0, 0], // File(\A)
            &[0x7f, 0xff, 4, 0],                     // End
        ]
        .concat();
        assert_eq!(bytes, expected);
    }

    #[test]
    fn decodes_what_it_encodes() {
        let option = LoadOption::new("reimage: new", esp(), "\\EFI\\BOOT\\BOOTX64.EFI");
        assert_eq!(LoadOption::decode(&option.encode()), Ok(option));
    }

    #[test]
    fn shows_the_entry_as_efibootmgr_does() {
        let option = LoadOption::new("new", esp(), "\\EFI\\BOOT\\BOOTX64.EFI");
        assert_eq!(
            option.to_string(),
            "new\tHD(1,GPT,12345678-1234-5678-9abc-def012345678,0x800,0x32000)/File(\\EFI\\BOOT\\BOOTX64.EFI)"
        );
    }

    #[test]
    fn skips_nodes_it_does_not_know_and_keeps_optional_data() {
        // PciRoot(0x0)/Pci(0x1,0x1)/End, as firmware writes for a whole disk.
        let path = [
            &[2, 1, 12, 0, 0xd0, 0x41, 0x03, 0x0a, 0, 0, 0, 0][..],
            &[1, 1, 6, 0, 1, 1],
            &[0x7f, 0xff, 4, 0],
        ]
        .concat();
        let bytes = [
            &[9, 0, 0, 0][..],
            &(path.len() as u16).to_le_bytes(),
            &utf16z("UEFI QEMU HARDDISK"),
            &path,
            b"NO",
        ]
        .concat();
        let option = LoadOption::decode(&bytes).expect("decodes");
        assert_eq!(option.attributes, 9);
        assert_eq!(option.description, "UEFI QEMU HARDDISK");
        assert_eq!((option.hard_drive, option.path), (None, None));
        assert_eq!(option.optional_data, b"NO");
    }

    #[test]
    fn refuses_lengths_that_run_past_the_value() {
        let good = LoadOption::new("x", esp(), "\\A").encode();
        for cut in [0, 3, 5, 8, 20, good.len() - 1] {
            assert!(LoadOption::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut zero_node = good.clone();
        // The HD node's length, after attributes, path length and "x\0".
        zero_node[12] = 0;
        zero_node[13] = 0;
        assert!(LoadOption::decode(&zero_node).is_err());
        let mut long_path_len = good;
        long_path_len[4] = 0xff;
        assert!(LoadOption::decode(&long_path_len).is_err());
    }

    #[test]
    fn the_same_file_on_the_same_partition_is_the_same_entry() {
        let a = LoadOption::new("a", esp(), "\\EFI\\BOOT\\BOOTX64.EFI");
        let b = LoadOption::new("b", esp(), "\\efi\\boot\\bootx64.efi");
        assert!(a.boots_same(&b));
        let other = HardDrive {
            guid: [1; 16],
            ..esp()
        };
        assert!(!a.boots_same(&LoadOption::new("a", other, "\\EFI\\BOOT\\BOOTX64.EFI")));
    }
}
