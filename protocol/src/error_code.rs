//! The one registry of error codes: every `code` the agent's API, its
//! operations and tasks, `reimage-agent` and `reimagectl` show comes from
//! [`ErrorCode`], so the API, the CLIs and the README cannot drift.
//!
//! On the wire a code is its name as a string (`"DiskBusy"`). A code this
//! version does not know (a newer agent's) is kept as [`ErrorCode::Other`].

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

macro_rules! error_codes {
    ($( $(#[doc = $doc:literal])+ $name:ident, )+) => {
        /// A stable error code. Match on it; show it with `Display`.
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( $(#[doc = $doc])+ $name, )+
            /// A code this version does not know, as it was received.
            Other(String),
        }

        impl ErrorCode {
            /// Every code this version knows, in the registry's order.
            pub const KNOWN: &'static [ErrorCode] = &[ $( ErrorCode::$name, )+ ];

            /// The code as shown on the wire and on the command line.
            pub fn as_str(&self) -> &str {
                match self {
                    $( ErrorCode::$name => stringify!($name), )+
                    ErrorCode::Other(code) => code,
                }
            }

            /// The code named `text`; [`ErrorCode::Other`] when it is not
            /// one this version knows.
            pub fn parse(text: &str) -> ErrorCode {
                match text {
                    $( stringify!($name) => ErrorCode::$name, )+
                    other => ErrorCode::Other(other.to_string()),
                }
            }

            /// What the code means, from its entry in the registry.
            pub fn meaning(&self) -> &'static str {
                match self {
                    $( ErrorCode::$name => concat!($($doc),+).trim_ascii(), )+
                    ErrorCode::Other(_) => "a code this version does not know",
                }
            }
        }
    };
}

error_codes! {
    // The image and where it comes from.
    /// The image or its manifest could not be fetched or opened.
    DownloadFailed,
    /// The image stream ended before the image did.
    ImageTruncated,
    /// The decoded image does not hash to the expected SHA-256.
    ImageChecksumMismatch,
    /// The decoded image is not the size announced.
    ImageSizeMismatch,
    /// The compressed stream is malformed.
    ImageCorrupt,
    /// Bytes follow the end of the compressed stream.
    ImageTrailingData,
    /// The image's data is not in the format its manifest names.
    ImageFormatMismatch,
    /// An image or manifest URL (or a redirect) is outside `[image] allowed_urls`.
    ImageUrlNotAllowed,
    /// An image or manifest location in a request is not a URL the agent takes.
    InvalidImageUrl,
    /// The request names no image and none is configured.
    MissingImage,
    /// Trusted keys are configured and the manifest has no signature.
    ManifestUnsigned,
    /// The manifest's signature is not by a trusted key or does not match.
    ManifestSignatureInvalid,
    /// The manifest cannot be read or is not valid.
    ManifestInvalid,
    // The target disk.
    /// The target has mounted partitions, holders or swap.
    DiskBusy,
    /// A partition asked to be saved is not on the target.
    SavedPartitionNotFound,
    /// The image's layout overlaps a saved partition.
    SavedPartitionCollision,
    /// The image does not fit on the target.
    TargetTooSmall,
    /// A partition table (the target's or the image's) cannot be used.
    PartitionTableInvalid,
    /// Writing the target failed.
    DiskWriteFailed,
    /// Reading the target failed.
    DiskReadFailed,
    /// What was read back from the target differs from what was written.
    ReadbackMismatch,
    // The firmware's boot entries.
    /// The firmware's boot variables could not be set for the new image; the verified write stands.
    BootEntryFailed,
    // The in-place reimage through the shutdown handoff.
    /// No staging area has room for the image of an in-place reimage.
    StagingSpaceInsufficient,
    /// The target is in use and the shutdown handoff is not possible here.
    HandoffUnavailable,
    /// The shutdown handoff wrote nothing (its checks refused); the node is on its old image.
    HandoffRefused,
    /// The node rebooted but the shutdown handoff left no outcome: it did not run.
    HandoffNotRun,
    /// The shutdown handoff wrote another image than the operation expected.
    HandoffImageMismatch,
    /// The shutdown handoff's outcome file cannot be read.
    HandoffOutcomeUnreadable,
    /// No staged image has this SHA-256.
    StagedImageNotFound,
    // How operations end.
    /// The agent stopped in the middle of the operation.
    AgentRestarted,
    /// The agent restarted but the node did not reboot.
    RebootNotObserved,
    /// The node went down to reboot and its agent did not answer again in time.
    NodeDidNotReturn,
    // The agent itself.
    /// An argument or a request value is wrong.
    InvalidArgument,
    /// The state store could not be read or written.
    StoreFailed,
    /// The agent's configuration cannot be read or is not valid.
    ConfigInvalid,
    /// Another I/O failure, with what was being done.
    IoError,
    /// The agent failed in a way it did not expect.
    InternalError,
    // Requests to the API.
    /// The request body is not a JSON object of the route's shape.
    InvalidRequestBody,
    /// The route needs a JSON body and got none.
    MissingRequestBody,
    /// The request body is larger than the API takes.
    RequestBodyTooLarge,
    /// The request body is not `application/json`.
    UnsupportedMediaType,
    /// A header holds a value the API cannot take.
    InvalidHeaderValue,
    /// A required query parameter (`api-version`) is missing.
    MissingRequiredQueryParameter,
    /// A query parameter holds a value the API cannot take.
    InvalidQueryParameterValue,
    /// A `client-request-id` was used before for another request.
    RequestIdConflict,
    /// No route has this path.
    ResourceNotFound,
    /// No operation has this id.
    OperationNotFound,
    /// The request names another node than this agent's.
    NodeNotFound,
    /// No bearer token, or one the agent does not know.
    AuthenticationFailed,
    /// The token's role is not enough for the request.
    InsufficientPermissions,
    /// The node is being reimaged.
    NodeBeingReimaged,
    /// The node is rebooting.
    NodeBeingRebooted,
    /// The node is starting after a reboot.
    NodeBeingStarted,
    /// The node's state refuses the request.
    OperationInvalidForCurrentState,
    // Service Management requests.
    /// A Service Management request is malformed.
    BadRequest,
    /// `x-ms-version` is missing.
    MissingOrInvalidRequiredHeader,
    /// `x-ms-version` is malformed or too old.
    InvalidHeader,
    // Tasks.
    /// A task with this id exists.
    TaskExists,
    /// No task has this id.
    TaskNotFound,
    /// The task id is empty, too long or has characters outside `[A-Za-z0-9_-]`.
    InvalidTaskId,
    /// A duration is not an ISO 8601 duration the agent can honour.
    InvalidDuration,
    /// The command line is empty or holds a NUL byte.
    InvalidCommandLine,
    /// An environment setting cannot be passed or uses a reserved name.
    InvalidEnvironmentSetting,
    /// The task's user identity is not one the agent can run.
    UnsupportedUserIdentity,
    /// The node takes no new tasks now.
    NodeNotAcceptingTasks,
    /// The task has no such file (not written yet, or deleted by retention).
    TaskFileNotFound,
    /// The task's command exited with a non-zero code.
    TaskFailed,
    /// The node stopped the task (a `terminate` reimage, reboot or scheduling change).
    TaskTerminated,
    /// The node could not start the task's process.
    TaskStartFailed,
    /// The task ran longer than its `maxWallClockTime`.
    MaxWallClockTimeExceeded,
    // The client and `reimagectl`.
    /// The agent could not be reached, or the connection broke.
    ConnectionFailed,
    /// No answer in time, or an operation still running at the deadline.
    Timeout,
    /// The agent's answer is not what the API describes.
    InvalidResponse,
    /// An agent URL is unusable.
    InvalidUrl,
    /// A `--hosts` file line is not an agent URL.
    InvalidHostsFile,
    /// An operation failed (the node's code is in the message).
    OperationFailed,
    /// A rollout did not succeed on every node.
    RolloutFailed,
    /// Some nodes could not be reached.
    NodesUnreachable,
    /// A node's `--health-cmd` failed after its operation succeeded.
    HealthCheckFailed,
    /// A `--resume` journal belongs to another rollout or cannot be read.
    JournalInvalid,
    /// Stopped by Ctrl-C (or SIGTERM, SIGHUP).
    Interrupted,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for ErrorCode {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
        Ok(ErrorCode::parse(&text))
    }
}

#[cfg(feature = "utoipa")]
impl utoipa::PartialSchema for ErrorCode {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some(
                "A stable error code, e.g. DiskBusy; the README lists them all",
            ))
            .min_length(Some(1))
            .into()
    }
}

#[cfg(feature = "utoipa")]
impl utoipa::ToSchema for ErrorCode {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_code_round_trips_through_its_name() {
        for code in ErrorCode::KNOWN {
            assert_eq!(&ErrorCode::parse(code.as_str()), code);
            let json = serde_json::to_string(code).expect("serialises");
            assert_eq!(json, format!("\"{code}\""));
            assert_eq!(
                serde_json::from_str::<ErrorCode>(&json).expect("parses"),
                *code
            );
            assert!(!code.meaning().is_empty(), "{code} has a meaning");
        }
    }

    #[test]
    fn an_unknown_code_is_kept_as_received() {
        let code: ErrorCode = serde_json::from_str("\"SomethingNew\"").expect("parses");
        assert_eq!(code, ErrorCode::Other("SomethingNew".into()));
        assert_eq!(code.to_string(), "SomethingNew");
        assert_eq!(
            serde_json::to_string(&code).expect("json"),
            "\"SomethingNew\""
        );
    }

    #[test]
    fn codes_are_unique_and_pascal_case() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::KNOWN {
            assert!(seen.insert(code.as_str()), "{code} twice");
            assert!(code.as_str().starts_with(|c: char| c.is_ascii_uppercase()));
            assert!(code.as_str().chars().all(|c| c.is_ascii_alphanumeric()));
        }
    }
}
