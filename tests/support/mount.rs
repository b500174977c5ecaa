//! File systems mounted for a test (root only).

use crate::{require_root, run};
use std::path::Path;

/// A filesystem mounted on a temporary directory, unmounted on drop.
#[derive(Debug)]
pub struct Mounted {
    pub dir: tempfile::TempDir,
}

impl Mounted {
    /// `mount [-t fstype] source <tempdir>`; `Err` says why it cannot.
    pub fn new(source: &str, fstype: Option<&str>) -> Result<Mounted, String> {
        require_root("mounting")?;
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let target = dir.path().to_str().ok_or("the tempdir path is not UTF-8")?;
        let mut args = Vec::new();
        if let Some(fstype) = fstype {
            args.extend(["-t", fstype]);
        }
        args.extend([source, target]);
        run("mount", &args)?;
        Ok(Mounted { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let path = self.dir.path().to_string_lossy();
        if let Err(e) = run("umount", &[&path]) {
            eprintln!("warning: {e}");
        }
    }
}
