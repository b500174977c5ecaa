//! The target disk: opening it, keeping saved partitions, writing and reading back.

pub mod gpt;
pub mod saved;

/// The first bytes of the image are held back and written last: until they
/// are, the disk's partition table points only at the saved partitions, so
/// a half-written image can never boot.
pub const HEAD_LEN: usize = 1 << 20;
