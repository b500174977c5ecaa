//! The image manifest (`*.manifest.json`): what an image is and how to check it.

use serde::{Deserialize, Serialize};
use std::fmt;

/// How an image is encoded on the wire. The agent detects it from the magic
/// bytes; a manifest that names another format is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Gzip,
    Xz,
    Zstd,
}

impl ImageFormat {
    /// The name used in manifests and shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Gzip => "gzip",
            ImageFormat::Xz => "xz",
            ImageFormat::Zstd => "zstd",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `{"name", "url", "format", "size", "sha256", "blockIndex"?}`: `size` and
/// `sha256` are those of the raw (decoded) image; `url` may be relative to
/// the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageManifest {
    pub name: String,
    pub url: String,
    pub format: ImageFormat,
    #[serde(deserialize_with = "crate::whole_number::u64")]
    pub size: u64,
    pub sha256: String,
    /// The image's block index, when it was packed with one.
    #[serde(
        default,
        rename = "blockIndex",
        skip_serializing_if = "Option::is_none"
    )]
    pub block_index: Option<BlockIndexRef>,
    /// How the image boots, where it differs from the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<ImageBoot>,
}

/// `"boot": {"loader", "kexec"}`: the EFI loader on the image's EFI system
/// partition that the firmware's boot entry names
/// (`\EFI\BOOT\BOOTX64.EFI` when not given), and what a `kexec`
/// reboot boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageBoot {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loader: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kexec: Option<KexecBoot>,
}

/// `"kexec": {"kernel", "initrd", "cmdline"}`: the image's kernel and
/// initramfs, each with its SHA-256, and its kernel command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KexecBoot {
    pub kernel: FileRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<FileRef>,
    pub cmdline: String,
}

/// A file the manifest names beside the image (`url`, relative to the
/// manifest like the image's) and its SHA-256, so that the manifest's
/// signature covers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRef {
    pub url: String,
    pub sha256: String,
}

/// Where an image's block index is.
pub type BlockIndexRef = FileRef;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trips_with_the_contract_field_names() {
        let text = r#"{"name":"debian-13","url":"debian-13.img.zst","format":"zstd","size":4096,"sha256":"ab"}"#;
        let manifest: ImageManifest = serde_json::from_str(text).expect("valid manifest");
        assert_eq!(manifest.format, ImageFormat::Zstd);
        assert_eq!(serde_json::to_string(&manifest).expect("serialises"), text);
    }

    #[test]
    fn unknown_manifest_fields_are_refused() {
        let text = r#"{"name":"x","url":"x","format":"raw","size":1,"sha256":"ab","sha1":"cd"}"#;
        let err = serde_json::from_str::<ImageManifest>(text).expect_err("unknown field");
        assert!(err.to_string().contains("sha1"), "{err}");
    }
}
