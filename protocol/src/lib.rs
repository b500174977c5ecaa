//! Wire types shared by `reimage-agent` and `reimagectl`, so the two sides
//! cannot drift: the API v1 bodies, the image manifest and the progress of
//! a write; and the typed async client of the API that `reimagectl` is
//! built on.

pub mod api;
pub mod batch;
pub mod block_index;
pub mod client;
pub mod error_code;
pub mod manifest;
pub mod progress;
pub mod request_id;
pub mod whole_number;
mod wire_enum;

pub use client::{Client, ClientError, KeepAlive, RetryPolicy, WaitEvent};
pub use error_code::ErrorCode;
pub use manifest::{BlockIndexRef, FileRef, ImageBoot, ImageFormat, ImageManifest, KexecBoot};
pub use progress::{Phase, WriteProgress};
pub use request_id::new_request_id;
