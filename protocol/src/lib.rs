//! Wire types shared by `reimage-agent` and `reimagectl`, so the two sides
//! cannot drift: the image manifest and the progress of a write.

pub mod api;
pub mod manifest;
pub mod progress;

pub use manifest::{ImageFormat, ImageManifest};
pub use progress::{Phase, WriteProgress};
