//! Booting the new image's kernel without the firmware: the kernel,
//! initramfs and command line the image's manifest names (`"boot":
//! {"kexec": …}`), each file held to its SHA-256, loaded with
//! `kexec_file_load`; then a clean shutdown that ends in that kernel
//! (`systemctl kexec`, whose last step on the in-place path is the shutdown
//! handoff's `reboot(LINUX_REBOOT_CMD_KEXEC)`).

use crate::image::digest::parse_sha256_hex;
use crate::image::http::HttpOptions;
use crate::image::source::{self, Location};
use crate::{Error, Result};
use reimage_protocol::{FileRef, KexecBoot};
use sha2::{Digest, Sha256};
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;

/// Kernels and initramfs images are tens of MiB; more is not one.
const FILE_LIMIT: u64 = 512 << 20;

/// What `kexec` boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KexecRequest {
    pub kernel: KexecFile,
    pub initrd: Option<KexecFile>,
    pub cmdline: String,
}

/// A file to fetch and the SHA-256 it must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KexecFile {
    pub location: Location,
    pub sha256: String,
}

impl KexecRequest {
    /// The manifest's `boot.kexec`, its URLs resolved beside the manifest
    /// at `manifest`.
    pub fn from_manifest(kexec: &KexecBoot, manifest: &Location) -> Result<KexecRequest> {
        let file = |what: &str, file: &FileRef| {
            Ok::<_, Error>(KexecFile {
                location: manifest.join(&file.url)?,
                sha256: parse_sha256_hex(&file.sha256).map_err(|e| {
                    Error::ManifestInvalid(format!(
                        "boot.kexec.{what}.sha256 '{}': {e}",
                        file.sha256
                    ))
                })?,
            })
        };
        if kexec.cmdline.contains('\0') || kexec.cmdline.len() > 4096 {
            return Err(Error::ManifestInvalid(
                "boot.kexec.cmdline must be at most 4096 bytes without NUL".into(),
            ));
        }
        Ok(KexecRequest {
            kernel: file("kernel", &kexec.kernel)?,
            initrd: kexec
                .initrd
                .as_ref()
                .map(|f| file("initrd", f))
                .transpose()?,
            cmdline: kexec.cmdline.clone(),
        })
    }

    /// Every file it fetches.
    pub fn files(&self) -> impl Iterator<Item = &KexecFile> {
        std::iter::once(&self.kernel).chain(&self.initrd)
    }
}

/// Fetches and checks the kernel and initramfs of `request` and loads them
/// for the next kexec. When it returns `Ok`, the running kernel holds them.
pub fn load(request: &KexecRequest, http: &HttpOptions) -> Result<()> {
    let kernel = fetch(&request.kernel, "kernel", http)?;
    let initrd = request
        .initrd
        .as_ref()
        .map(|file| fetch(file, "initramfs", http))
        .transpose()?;
    let cmdline = CString::new(request.cmdline.as_str())
        .map_err(|_| Error::InvalidArgument("the kexec command line holds a NUL byte".into()))?;
    kexec_file_load(&kernel, initrd.as_ref(), &cmdline)
        .map_err(|e| Error::io("loading the new kernel with kexec_file_load", e))?;
    tracing::info!(kernel = %request.kernel.location, cmdline = %request.cmdline, "the new image's kernel is loaded for kexec");
    Ok(())
}

/// Whether a kernel is loaded for kexec (`/sys/kernel/kexec_loaded`).
pub fn loaded() -> bool {
    std::fs::read_to_string("/sys/kernel/kexec_loaded").is_ok_and(|s| s.trim() == "1")
}

/// Streams `file` into an anonymous memory file, hashing it on the way: it
/// is loaded only if its SHA-256 is the manifest's.
fn fetch(file: &KexecFile, what: &str, http: &HttpOptions) -> Result<File> {
    let name = CString::new(format!("reimage-{what}")).expect("no NUL in the name");
    let fd = nix::sys::memfd::memfd_create(name.as_c_str(), nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(|e| Error::io(format!("creating a memory file for the {what}"), e.into()))?;
    let mut out = File::from(fd);
    let mut reader = source::open(&file.location, http)?
        .reader
        .take(FILE_LIMIT + 1);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| Error::from_io(e, &format!("fetching the {what} {}", file.location)))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > FILE_LIMIT {
            return Err(Error::DownloadFailed(format!(
                "the {what} {} is larger than {FILE_LIMIT} bytes",
                file.location
            )));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| Error::io(format!("keeping the {what} in memory"), e))?;
    }
    let sha256 = hex::encode(hasher.finalize());
    if sha256 != file.sha256 {
        return Err(Error::ImageChecksumMismatch {
            expected: file.sha256.clone(),
            actual: sha256,
        });
    }
    Ok(out)
}

fn kexec_file_load(kernel: &File, initrd: Option<&File>, cmdline: &CString) -> std::io::Result<()> {
    const KEXEC_FILE_NO_INITRAMFS: nix::libc::c_ulong = 0x4;
    let bytes = cmdline.as_bytes_with_nul();
    let (initrd_fd, flags) = match initrd {
        Some(file) => (file.as_raw_fd(), 0),
        None => (-1, KEXEC_FILE_NO_INITRAMFS),
    };
    // SAFETY: both descriptors are open and the command line outlives the
    // call; the kernel only reads them.
    let rc = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_kexec_file_load,
            kernel.as_raw_fd(),
            initrd_fd,
            bytes.len(),
            bytes.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(kernel_sha: &str) -> KexecBoot {
        serde_json::from_value(serde_json::json!({
            "kernel": {"url": "boot/vmlinuz", "sha256": kernel_sha},
            "initrd": {"url": "https://other.example/initrd.img", "sha256": "AB".repeat(32)},
            "cmdline": "root=PARTLABEL=root ro",
        }))
        .expect("kexec boot")
    }

    #[test]
    fn resolves_the_files_beside_the_manifest() {
        let manifest = Location::parse("https://images.example/os/v2.manifest.json").expect("url");
        let request =
            KexecRequest::from_manifest(&boot(&"cd".repeat(32)), &manifest).expect("valid");
        assert_eq!(
            request.kernel.location.to_string(),
            "https://images.example/os/boot/vmlinuz"
        );
        let initrd = request.initrd.as_ref().expect("initrd");
        assert_eq!(
            initrd.location.to_string(),
            "https://other.example/initrd.img"
        );
        assert_eq!(initrd.sha256, "ab".repeat(32), "normalised");
        assert_eq!(request.files().count(), 2);
    }

    #[test]
    fn a_bad_hash_or_command_line_names_the_field() {
        let manifest = Location::parse("https://images.example/m.json").expect("url");
        let err = KexecRequest::from_manifest(&boot("xyz"), &manifest).expect_err("bad hash");
        assert_eq!(err.code(), "ManifestInvalid");
        assert!(
            err.to_string().contains("boot.kexec.kernel.sha256"),
            "{err}"
        );
        let mut long = boot(&"cd".repeat(32));
        long.cmdline = "x".repeat(5000);
        let err = KexecRequest::from_manifest(&long, &manifest).expect_err("too long");
        assert!(err.to_string().contains("cmdline"), "{err}");
    }

    #[test]
    fn a_file_with_another_hash_is_never_loaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vmlinuz");
        std::fs::write(&path, b"not the kernel").expect("write");
        let file = KexecFile {
            location: Location::File(path),
            sha256: "00".repeat(32),
        };
        let err = fetch(&file, "kernel", &HttpOptions::default()).expect_err("mismatch");
        assert_eq!(err.code(), "ImageChecksumMismatch");
    }
}
