//! The target disk: opening it, keeping saved partitions, writing and reading back.

pub mod aligned;
pub mod busy;
pub mod device;

pub use aligned::{ALIGNMENT, AlignedBuf};
pub use busy::check_not_busy;
pub use device::{Target, TargetKind};
