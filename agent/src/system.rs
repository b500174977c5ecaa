//! Facts about the running system, read through `procfs` rather than by
//! hand: this boot's id, when it booted, memory available, mounts.

use jiff::Timestamp;
use std::io;

/// This boot's id (`/proc/sys/kernel/random/boot_id`); it changes on every
/// boot.
pub fn boot_id() -> io::Result<String> {
    procfs::sys::kernel::random::boot_id()
        .map(|id| id.trim().to_string())
        .map_err(io::Error::other)
}

/// When the machine booted (`btime` of `/proc/stat`).
pub fn boot_time() -> Option<Timestamp> {
    let seconds = procfs::boot_time_secs().ok()?;
    Timestamp::from_second(i64::try_from(seconds).ok()?).ok()
}

/// Memory the kernel says new work can use without swapping
/// (`MemAvailable` of `/proc/meminfo`), in bytes.
pub fn memory_available() -> Option<u64> {
    use procfs::Current;
    let meminfo = procfs::Meminfo::current().ok()?;
    meminfo.mem_available
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_boot_has_an_id_a_start_and_free_memory() {
        let id = boot_id().expect("boot id");
        assert_eq!(id.len(), 36, "{id}");
        assert_eq!(boot_id().expect("boot id"), id, "stable within a boot");
        let booted = boot_time().expect("boot time");
        assert!(booted < Timestamp::now());
        assert!(memory_available().expect("MemAvailable") > 0);
    }
}
