//! Installing the shutdown handoff: a copy of this binary as
//! `/run/initramfs/shutdown` with the shared libraries it runs with, the
//! plan, and (for RAM staging) the staged image, plus `/run` made
//! executable and large enough.
//!
//! The agent's own unit sandbox cannot do this: `/run` is read-only in its
//! mount namespace, and `exec` is a flag of the host's `/run` mount that
//! no other namespace can change. So the agent runs these steps as a
//! transient systemd unit ([`run_privileged`]), which systemd starts in
//! the host's namespace: `reimage-agent handoff reserve|install|cancel`.

use super::plan::{HandoffPlan, StagedAt};
use super::stage::staged_index_path;
use super::{HANDOFF_ROOT, PLAN_FILE};
use crate::{Error, Result};
use nix::mount::MsFlags;
use nix::sys::statvfs::{FsFlags, statvfs};
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The handoff binary's name inside the handoff root.
pub const SHUTDOWN_BINARY: &str = "shutdown";
/// Where a RAM-staged image is moved inside the handoff root.
pub const STAGED_DIR: &str = "staged";
/// Mount points the handoff uses inside its root.
const MOUNT_POINTS: [&str; 5] = ["proc", "sys", "dev", "oldroot", "state"];
/// Room on `/run` for the binary, its libraries and the plan, beyond a
/// staged image.
const INSTALL_ROOM: u64 = 128 << 20;

/// True when systemd runs this system (`sd_booted()`): only then does
/// anything run `/run/initramfs/shutdown`.
pub fn systemd_is_init() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// The file a privileged step writes its error to, under `state_dir`:
/// systemd-run reports only that the unit failed, not why.
pub const REPORT_FILE: &str = "handoff/helper-error.txt";

/// Runs `reimage-agent handoff <args> --report FILE` as a transient
/// systemd service (outside the agent's sandbox) and waits for it. Without
/// `--wait`/`--pipe`, systemd-run needs only systemd's private socket, not
/// a D-Bus daemon (minimal systems have none): for a oneshot unit it waits
/// for the start job, which ends when the command does. The command's
/// error comes back through `state_dir`'s [`REPORT_FILE`].
pub fn run_privileged(args: &[OsString], state_dir: &Path) -> Result<()> {
    if !systemd_is_init() {
        return Err(Error::HandoffUnavailable(
            "systemd is not running this system, and only systemd runs a shutdown handoff".into(),
        ));
    }
    let exe =
        std::env::current_exe().map_err(|e| Error::io("finding the agent's own binary", e))?;
    let report = state_dir.join(REPORT_FILE);
    if let Some(dir) = report.parent() {
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    let _ = fs::remove_file(&report);
    let output = Command::new("systemd-run")
        .args([
            "--quiet",
            "--collect",
            "--service-type=oneshot",
            "--description=reimage-agent: prepare the shutdown handoff",
        ])
        .arg("--")
        .arg(&exe)
        .arg("handoff")
        .args(args)
        .arg("--report")
        .arg(&report)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io("running systemd-run", e))?;
    if output.status.success() {
        return Ok(());
    }
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let why = fs::read_to_string(&report)
        .map(|text| text.trim().to_string())
        .unwrap_or_else(|_| String::from_utf8_lossy(&output.stderr).trim().to_string());
    Err(Error::HandoffUnavailable(format!(
        "`reimage-agent handoff {}` under systemd-run failed ({}): {why}",
        shown.join(" "),
        output.status
    )))
}

/// Makes `/run` executable (the handoff is run from it) and grows it, if
/// needed, so that `room` more bytes fit beside what it holds.
pub fn reserve_run(room: u64) -> Result<()> {
    let run = Path::new("/run");
    let stat = statvfs(run).map_err(|e| Error::io("statvfs /run", e.into()))?;
    let block = stat.fragment_size() as u64;
    let total = stat.blocks() as u64 * block;
    let used = total - stat.blocks_free() as u64 * block;
    let wanted = used + room + INSTALL_ROOM;
    let flags = stat.flags();
    if !flags.contains(FsFlags::ST_NOEXEC) && wanted <= total {
        return Ok(());
    }
    // A remount sets the mount's flags anew: keep the others, drop noexec.
    let mut keep = MsFlags::MS_REMOUNT;
    for (statvfs_flag, mount_flag) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if flags.contains(statvfs_flag) {
            keep |= mount_flag;
        }
    }
    let size = format!("size={}", wanted.max(total));
    nix::mount::mount(None::<&str>, run, None::<&str>, keep, Some(size.as_str()))
        .map_err(|e| Error::HandoffUnavailable(format!("remounting /run exec,{size}: {e}")))?;
    tracing::info!(%size, "remounted /run exec for the shutdown handoff");
    Ok(())
}

/// Installs the handoff in `root` for the plan at `plan_path` (as the
/// agent wrote it in `state_dir`). With `root` the real
/// [`HANDOFF_ROOT`], `/run` is first made executable and large enough.
pub fn install(root: &Path, plan_path: &Path) -> Result<()> {
    let mut plan = HandoffPlan::load(plan_path)?;
    if root == Path::new(HANDOFF_ROOT) {
        reserve_run(0)?;
    }
    let io_err = |what: String| move |e| Error::io(what, e);
    for dir in MOUNT_POINTS.iter().chain(&[STAGED_DIR]) {
        let dir = root.join(dir);
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    }
    let exe = fs::read_link("/proc/self/exe").map_err(io_err("reading /proc/self/exe".into()))?;
    let shutdown = root.join(SHUTDOWN_BINARY);
    copy_file(Path::new("/proc/self/exe"), &shutdown)?;
    fs::set_permissions(&shutdown, fs::Permissions::from_mode(0o755))
        .map_err(io_err(format!("making {} executable", shutdown.display())))?;
    for (source, at) in runtime_files(&exe)? {
        copy_file(&source, &root.join(at.strip_prefix("/").unwrap_or(&at)))?;
    }
    if let StagedAt::Memory { path } = &plan.staged {
        let name = path.file_name().ok_or_else(|| {
            Error::InvalidArgument(format!("staged image {} has no file name", path.display()))
        })?;
        let inside = Path::new("/").join(STAGED_DIR).join(name);
        let moved = root.join(STAGED_DIR).join(name);
        move_file(path, &moved)?;
        // Staged through a block index: its own index goes along.
        if plan.staged_index_sha256.is_some() {
            move_file(&staged_index_path(path), &staged_index_path(&moved))?;
        }
        plan.staged = StagedAt::Memory { path: inside };
    }
    plan.save(&root.join(PLAN_FILE))?;
    tracing::info!(root = %root.display(), operation = %plan.operation_id, "installed the shutdown handoff");
    Ok(())
}

/// Removes an installed handoff, so that no later reboot writes anything.
/// What is not there is fine.
pub fn cancel(root: &Path) -> Result<()> {
    for name in [SHUTDOWN_BINARY, PLAN_FILE] {
        let path = root.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("removing {}", path.display()), e)),
        }
    }
    let staged = root.join(STAGED_DIR);
    match fs::remove_dir_all(&staged) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", staged.display()), e)),
    }
}

/// What the binary needs to start in an empty root: every shared library
/// mapped into this process (as `(file, path to put it at)`), and the ELF
/// interpreter at the path the binary names.
fn runtime_files(exe: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let maps = fs::read_to_string("/proc/self/maps")
        .map_err(|e| Error::io("reading /proc/self/maps", e))?;
    let mut files: Vec<(PathBuf, PathBuf)> = mapped_libraries(&maps, exe)
        .into_iter()
        .map(|lib| (lib.clone(), lib))
        .collect();
    if let Some(interpreter) = elf_interpreter(Path::new("/proc/self/exe"))? {
        let real = fs::canonicalize(&interpreter)
            .map_err(|e| Error::io(format!("resolving {}", interpreter.display()), e))?;
        files.push((real, interpreter));
    }
    Ok(files)
}

/// The shared objects among the file mappings of `/proc/self/maps`.
fn mapped_libraries(maps: &str, exe: &Path) -> BTreeSet<PathBuf> {
    use procfs::FromBufRead;
    use procfs::process::MemoryMaps;
    // Line by line: one line procfs cannot read must not hide the others.
    maps.lines()
        .filter_map(|line| MemoryMaps::from_buf_read(line.as_bytes()).ok())
        .flatten()
        .filter_map(|map| match map.pathname {
            procfs::process::MMapPath::Path(path) => Some(path),
            _ => None,
        })
        .filter(|path| {
            path != exe
                && path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().contains(".so"))
        })
        .collect()
}

/// The `PT_INTERP` of a 64-bit little-endian ELF file (the dynamic loader
/// it must be started by), `None` for a static binary.
fn elf_interpreter(path: &Path) -> Result<Option<PathBuf>> {
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(1 << 20).read_to_end(&mut bytes))
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    parse_interpreter(&bytes).map_err(|why| {
        Error::InvalidArgument(format!(
            "{}: not an ELF binary this agent understands: {why}",
            path.display()
        ))
    })
}

fn parse_interpreter(elf: &[u8]) -> std::result::Result<Option<PathBuf>, &'static str> {
    const PT_INTERP: u32 = 3;
    // Every offset comes from the file: checked, never trusted.
    let field = |at: usize, len: usize| at.checked_add(len).and_then(|end| elf.get(at..end));
    let u16_at = |at| field(at, 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |at| field(at, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |at| {
        field(at, 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .and_then(|v| usize::try_from(v).ok())
    };
    if !elf.starts_with(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF file");
    }
    let out_of_range = "program header out of range";
    let phoff = u64_at(0x20).ok_or("short header")?;
    let phentsize = u16_at(0x36).ok_or("short header")?;
    let phnum = u16_at(0x38).ok_or("short header")?;
    for i in 0..phnum {
        let at = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or(out_of_range)?;
        if u32_at(at).ok_or(out_of_range)? != PT_INTERP {
            continue;
        }
        let offset = u64_at(at + 8).ok_or(out_of_range)?;
        let len = u64_at(at + 0x20).ok_or(out_of_range)?;
        let name = field(offset, len).ok_or("interpreter out of range")?;
        let name = name.split(|&b| b == 0).next().unwrap_or_default();
        let name = std::str::from_utf8(name).map_err(|_| "interpreter path is not UTF-8")?;
        return Ok(Some(PathBuf::from(name)));
    }
    Ok(None)
}

fn copy_file(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    fs::copy(from, to)
        .map(drop)
        .map_err(|e| Error::io(format!("copying {} to {}", from.display(), to.display()), e))
}

/// Renames, or copies and removes when `to` is on another filesystem.
fn move_file(from: &Path, to: &Path) -> Result<()> {
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => {
            copy_file(from, to)?;
            fs::remove_file(from).map_err(|e| Error::io(format!("removing {}", from.display()), e))
        }
        Err(e) => Err(Error::io(
            format!("moving {} to {}", from.display(), to.display()),
            e,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libraries_are_the_shared_objects_mapped_into_the_process() {
        let maps = "\
55d0a000-55d0b000 r--p 00000000 fe:01 11                  /usr/bin/reimage-agent
7f00a000-7f00b000 r--p 00000000 fe:01 12                  /usr/lib/x86_64-linux-gnu/libc.so.6
7f01a000-7f01b000 r-xp 00001000 fe:01 12                  /usr/lib/x86_64-linux-gnu/libc.so.6
7f02a000-7f02b000 r--p 00000000 fe:01 13                  /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
7f03a000-7f03b000 rw-p 00000000 00:00 0                   [heap]
7f04a000-7f04b000 rw-p 00000000 00:00 0 
bad line
7f05a000-7f05b000 r--p 00000000 fe:01 14                  /usr/share/locale/locale-archive
";
        let libs = mapped_libraries(maps, Path::new("/usr/bin/reimage-agent"));
        let libs: Vec<&str> = libs.iter().filter_map(|p| p.to_str()).collect();
        assert_eq!(
            libs,
            [
                "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                "/usr/lib/x86_64-linux-gnu/libc.so.6"
            ]
        );
    }

    #[test]
    fn this_test_binary_names_its_interpreter() {
        let found = elf_interpreter(Path::new("/proc/self/exe")).expect("reads itself");
        let interpreter = found.expect("tests are dynamically linked");
        assert!(interpreter.is_absolute(), "{}", interpreter.display());
        assert!(interpreter.exists(), "{}", interpreter.display());
    }

    #[test]
    fn hostile_elf_headers_are_errors_not_panics() {
        assert!(parse_interpreter(b"").is_err());
        assert!(parse_interpreter(b"\x7fELF\x01\x01").is_err(), "32-bit");
        let mut header = vec![0u8; 64];
        header[..6].copy_from_slice(b"\x7fELF\x02\x01");
        assert_eq!(parse_interpreter(&header), Ok(None), "no program headers");
        header[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        header[0x38] = 1;
        assert!(parse_interpreter(&header).is_err(), "headers out of range");
    }

    #[test]
    fn a_ram_staged_image_moves_into_the_root_with_its_block_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let staged = dir.path().join("op-1.img");
        fs::write(&staged, b"frames").expect("staged");
        fs::write(staged_index_path(&staged), b"index").expect("index");
        let mut plan: HandoffPlan = serde_json::from_value(serde_json::json!({
            "version": super::super::plan::PLAN_VERSION,
            "operationId": "op-1",
            "staged": {"area": "memory", "path": staged},
            "stagedSha256": "00",
            "stagedIndexSha256": "11",
            "format": "zstd",
            "imageSize": 6,
            "imageSha256": "22",
            "target": "/dev/vda",
            "savePartlabel": [],
            "savePartindex": [],
            "state": {"device": "/dev/vdb", "dev": "254:16", "fstype": "ext4",
                      "stateDirInFs": "/", "onTarget": false},
        }))
        .expect("a plan");
        let plan_path = dir.path().join("op-1.plan.json");
        plan.save(&plan_path).expect("saved");
        install(&root, &plan_path).expect("installs");
        let moved = root.join(STAGED_DIR).join("op-1.img");
        assert_eq!(fs::read(&moved).expect("moved"), b"frames");
        assert_eq!(
            fs::read(staged_index_path(&moved)).expect("index moved"),
            b"index"
        );
        assert!(!staged.exists() && !staged_index_path(&staged).exists());
        plan = HandoffPlan::load(&root.join(PLAN_FILE)).expect("the installed plan");
        assert_eq!(
            plan.staged_path(Path::new("/state")),
            Path::new("/staged/op-1.img")
        );
    }

    #[test]
    fn cancel_removes_what_install_left_and_tolerates_nothing_there() {
        let root = tempfile::tempdir().expect("tempdir");
        cancel(root.path()).expect("nothing installed");
        fs::write(root.path().join(SHUTDOWN_BINARY), b"x").expect("shutdown");
        fs::write(root.path().join(PLAN_FILE), b"{}").expect("plan");
        fs::create_dir(root.path().join(STAGED_DIR)).expect("staged");
        fs::write(root.path().join(STAGED_DIR).join("os.zst"), b"x").expect("image");
        cancel(root.path()).expect("cancels");
        assert!(!root.path().join(SHUTDOWN_BINARY).exists());
        assert!(!root.path().join(PLAN_FILE).exists());
        assert!(!root.path().join(STAGED_DIR).exists());
    }
}
