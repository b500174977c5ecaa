//! The typed errors of the reimage pipeline, each with a stable code that the
//! API and the CLI show (`error: <context>: <code>: <cause>`).

use reimage_protocol::ErrorCode;
use std::io;

/// Everything that can end a reimage. `code()` is stable: operators and the
/// controller match on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image could not be fetched (HTTP status, connection, retries exhausted).
    #[error("download failed: {0}")]
    DownloadFailed(String),
    /// The image stream ended before the image did.
    #[error("image truncated: {0}")]
    ImageTruncated(String),
    /// The decoded image does not hash to the expected SHA-256.
    #[error("image checksum mismatch: expected sha256 {expected}, got {actual}")]
    ImageChecksumMismatch { expected: String, actual: String },
    /// The decoded image has another size than the one announced.
    #[error("image size mismatch: expected {expected} bytes, got {actual}")]
    ImageSizeMismatch { expected: u64, actual: u64 },
    /// The compressed stream is malformed.
    #[error("image is corrupt: {0}")]
    ImageCorrupt(String),
    /// Bytes follow the end of the compressed stream.
    #[error("image has trailing data after the end of the compressed stream: {0}")]
    ImageTrailingData(String),
    /// The image's format is not the one its manifest names.
    #[error("image format mismatch: manifest says {expected}, the data is {actual}")]
    ImageFormatMismatch { expected: String, actual: String },
    /// The image (or a redirect, or a manifest's image) is outside `[image] allowed_urls`.
    #[error("image URL not allowed: {0}")]
    ImageUrlNotAllowed(String),
    /// Trusted keys are configured and the manifest has no signature (or
    /// the image was given without a manifest).
    #[error("manifest not signed: {0}")]
    ManifestUnsigned(String),
    /// The manifest's signature is not by a trusted key or does not match.
    #[error("manifest signature invalid: {0}")]
    ManifestSignatureInvalid(String),
    /// The manifest cannot be read or is not valid.
    #[error("invalid manifest: {0}")]
    ManifestInvalid(String),
    /// The target has mounted partitions, holders or swap on it.
    #[error("disk {target} is busy: {}", users.join(", "))]
    DiskBusy { target: String, users: Vec<String> },
    /// A partition asked to be saved does not exist on the target.
    #[error("saved partition not found: {0}")]
    SavedPartitionNotFound(String),
    /// The image's layout overlaps a saved partition.
    #[error("saved partition collision: {0}")]
    SavedPartitionCollision(String),
    /// The image does not fit on the target.
    #[error("target too small: image needs {needed} bytes, target has {available}")]
    TargetTooSmall { needed: u64, available: u64 },
    /// A partition table (the target's or the image's) cannot be used.
    #[error("invalid partition table: {0}")]
    PartitionTableInvalid(String),
    /// Writing the target failed.
    #[error("writing {context}: {source}")]
    DiskWriteFailed {
        context: String,
        #[source]
        source: io::Error,
    },
    /// Reading the target back failed.
    #[error("reading {context}: {source}")]
    DiskReadFailed {
        context: String,
        #[source]
        source: io::Error,
    },
    /// What was read back from the target differs from what was written.
    #[error("read-back verification failed: {0}")]
    ReadbackMismatch(String),
    /// No staging area has room for the image of an in-place reimage.
    #[error("no room to stage the image: {0}")]
    StagingSpaceInsufficient(String),
    /// The target is in use and the in-place reimage through the shutdown
    /// handoff is not possible on this node (no systemd, reboot method,
    /// state_dir on a part of the disk the image overwrites, ...).
    #[error("in-place reimage not possible: {0}")]
    HandoffUnavailable(String),
    /// The request itself is wrong (bad hash syntax, bad device path, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The state store (`state_dir/agent.redb`) could not be read or written,
    /// or holds a value that does not decode.
    #[error("state store: {0}")]
    StoreFailed(String),
    /// The agent's configuration cannot be read or is not valid; the message
    /// names the file, the key and, where known, the line.
    #[error("{0}")]
    ConfigInvalid(String),
    /// Any other I/O failure, with what was being done.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The stable error code, as shown by the API (`error.code`) and the CLI.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::DownloadFailed(_) => ErrorCode::DownloadFailed,
            Error::ImageTruncated(_) => ErrorCode::ImageTruncated,
            Error::ImageChecksumMismatch { .. } => ErrorCode::ImageChecksumMismatch,
            Error::ImageSizeMismatch { .. } => ErrorCode::ImageSizeMismatch,
            Error::ImageCorrupt(_) => ErrorCode::ImageCorrupt,
            Error::ImageTrailingData(_) => ErrorCode::ImageTrailingData,
            Error::ImageFormatMismatch { .. } => ErrorCode::ImageFormatMismatch,
            Error::ImageUrlNotAllowed(_) => ErrorCode::ImageUrlNotAllowed,
            Error::ManifestUnsigned(_) => ErrorCode::ManifestUnsigned,
            Error::ManifestSignatureInvalid(_) => ErrorCode::ManifestSignatureInvalid,
            Error::ManifestInvalid(_) => ErrorCode::ManifestInvalid,
            Error::DiskBusy { .. } => ErrorCode::DiskBusy,
            Error::SavedPartitionNotFound(_) => ErrorCode::SavedPartitionNotFound,
            Error::SavedPartitionCollision(_) => ErrorCode::SavedPartitionCollision,
            Error::TargetTooSmall { .. } => ErrorCode::TargetTooSmall,
            Error::PartitionTableInvalid(_) => ErrorCode::PartitionTableInvalid,
            Error::DiskWriteFailed { .. } => ErrorCode::DiskWriteFailed,
            Error::DiskReadFailed { .. } => ErrorCode::DiskReadFailed,
            Error::ReadbackMismatch(_) => ErrorCode::ReadbackMismatch,
            Error::StagingSpaceInsufficient(_) => ErrorCode::StagingSpaceInsufficient,
            Error::HandoffUnavailable(_) => ErrorCode::HandoffUnavailable,
            Error::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Error::StoreFailed(_) => ErrorCode::StoreFailed,
            Error::ConfigInvalid(_) => ErrorCode::ConfigInvalid,
            Error::Io { .. } => ErrorCode::IoError,
        }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Carries this error through an `io::Read`/`io::Write` boundary;
    /// [`Error::from_io`] recovers it on the other side.
    pub fn into_io(self) -> io::Error {
        io::Error::other(self)
    }

    /// Recovers a typed error that crossed an `io` boundary, or classifies a
    /// plain one: an unexpected EOF means the stream was cut short.
    pub fn from_io(err: io::Error, context: &str) -> Self {
        let err = match err.downcast::<Error>() {
            Ok(typed) => return typed,
            Err(plain) => plain,
        };
        match err.kind() {
            io::ErrorKind::UnexpectedEof => Error::ImageTruncated(format!("{context}: {err}")),
            _ => Error::io(context, err),
        }
    }
}

/// Result with the pipeline's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_error_survives_an_io_boundary() {
        let err = Error::DownloadFailed("503 Service Unavailable".into()).into_io();
        let back = Error::from_io(err, "reading image");
        assert_eq!(back.code(), "DownloadFailed");
        assert!(back.to_string().contains("503"));
    }

    #[test]
    fn unexpected_eof_is_a_truncated_image() {
        let err = io::Error::new(io::ErrorKind::UnexpectedEof, "stream ended");
        assert_eq!(Error::from_io(err, "decoding").code(), "ImageTruncated");
    }
}
