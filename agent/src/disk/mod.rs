//! The target disk: opening it, keeping saved partitions, writing and reading back.

pub mod aligned;
pub mod busy;
pub mod device;
pub mod filesystem;
pub mod gpt;
pub mod readback;
pub mod reset;
pub mod saved;
pub mod sink;

/// The first bytes of the image are held back and written last: until they
/// are, the disk's partition table points only at the saved partitions, so
/// a half-written image can never boot.
pub const HEAD_LEN: usize = 1 << 20;

pub use aligned::{ALIGNMENT, AlignedBuf};
pub use busy::check_not_busy;
pub use device::{Target, TargetKind};
