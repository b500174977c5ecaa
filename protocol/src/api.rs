//! Bodies of the HTTP API v1 (camelCase JSON), as in DESIGN.md.

use crate::error_code::ErrorCode;
use crate::progress::Phase;
use crate::wire_enum::wire_enum;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Node states, as Batch names them.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Idle,
    Running,
    Reimaging,
    Rebooting,
    Starting,
    Unusable,
    Offline,
}

impl NodeState {
    /// Every state.
    pub const ALL: [NodeState; 7] = [
        NodeState::Idle,
        NodeState::Running,
        NodeState::Reimaging,
        NodeState::Rebooting,
        NodeState::Starting,
        NodeState::Unusable,
        NodeState::Offline,
    ];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Idle => "idle",
            NodeState::Running => "running",
            NodeState::Reimaging => "reimaging",
            NodeState::Rebooting => "rebooting",
            NodeState::Starting => "starting",
            NodeState::Unusable => "unusable",
            NodeState::Offline => "offline",
        }
    }
}

/// Whether the node takes new tasks.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulingState {
    Enabled,
    Disabled,
}

wire_enum! {
    /// What happens to the work on the node when it is reimaged or rebooted.
    #[derive(Default)]
    pub enum NodeReimageOption {
        /// Stop running tasks now and run them again on the new image.
        #[default]
        Requeue = "requeue",
        /// Stop running tasks now and mark them completed with a failure.
        Terminate = "terminate",
        /// Take no new tasks and wait for the running ones.
        TaskCompletion = "taskcompletion",
        /// As taskcompletion, and also wait for every retention timer.
        RetainedData = "retaineddata",
    }
}

wire_enum! {
    /// How a reimaged node starts its new image, where a request chooses.
    pub enum RebootKind {
        /// Through the firmware, as `[reboot] method` says.
        Firmware = "firmware",
        /// Straight into the new image's kernel (its manifest's
        /// `boot.kexec`), skipping the firmware.
        Kexec = "kexec",
    }
}

wire_enum! {
    /// What happens to running tasks when scheduling is disabled.
    #[derive(Default)]
    pub enum DisableSchedulingOption {
        /// Stop running tasks now and run them again later.
        #[default]
        Requeue = "requeue",
        /// Stop running tasks now and mark them completed with a failure.
        Terminate = "terminate",
        /// Let running tasks finish.
        TaskCompletion = "taskcompletion",
    }
}

/// The image a node runs or is asked to run.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageRef {
    pub name: String,
    pub sha256: String,
}

/// A partition kept across reimages.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedPartitionInfo {
    pub index: u32,
    pub label: String,
    pub guid: String,
    pub start_bytes: u64,
    pub size_bytes: u64,
}

/// The target disk of a node.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskInfo {
    pub target: String,
    pub size_bytes: u64,
    pub saved_partitions: Vec<SavedPartitionInfo>,
}

/// `GET /v1/node`.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub id: String,
    pub state: NodeState,
    pub scheduling_state: SchedulingState,
    pub running_tasks_count: u32,
    pub total_tasks_run: u64,
    pub state_transition_time: Timestamp,
    pub last_boot_time: Option<Timestamp>,
    /// The image on the disk, as far as the agent knows; `null` once a
    /// failed write left the disk with only the saved partitions.
    pub image: Option<ImageRef>,
    pub disk: DiskInfo,
    pub agent_version: String,
    /// Why the node is `unusable`, or how its last operation failed.
    #[serde(default)]
    pub errors: Vec<NodeError>,
    /// How the node contains its tasks; older agents did not say, and
    /// used process groups.
    #[serde(default)]
    pub task_isolation: TaskIsolation,
}

/// A node error, in Batch's `ComputeNodeError` shape.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeError {
    pub code: ErrorCode,
    pub message: String,
    /// `operationId`: the operation that failed.
    #[serde(default)]
    pub error_details: Vec<NameValuePair>,
}

/// A `{"name","value"}` pair, as Batch writes details.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameValuePair {
    pub name: String,
    pub value: String,
}

/// How a node contains its tasks, so that stopping one reaches every
/// process it started.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TaskIsolation {
    /// A cgroup v2 per task run: nothing a task starts escapes a stop.
    Cgroup,
    /// A process group per task run, where no writable cgroup v2 exists:
    /// a process that calls `setsid` leaves it.
    #[default]
    ProcessGroup,
}

/// An image given inline in a reimage request.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageSpec {
    /// `http(s)://…`, or `file://…` where `[image] allow_local_files` is on.
    #[cfg_attr(feature = "utoipa", schema(min_length = 1, max_length = 4096))]
    pub url: String,
    /// SHA-256 of the decoded image: 64 hex digits.
    #[cfg_attr(feature = "utoipa", schema(pattern = "^[0-9a-fA-F]{64}$"))]
    pub sha256: String,
    /// Size of the decoded image in bytes (`4096.0` is taken as `4096`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole_number::option_u64"
    )]
    #[cfg_attr(feature = "utoipa", schema(maximum = 9007199254740991_u64))]
    pub size: Option<u64>,
}

/// `POST /v1/node/reimage`.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReimageRequest {
    #[serde(default)]
    pub node_reimage_option: NodeReimageOption,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSpec>,
    /// The image's manifest: `http(s)://…`, or `file://…` where `[image]
    /// allow_local_files` is on. Not together with `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "utoipa", schema(min_length = 1, max_length = 4096))]
    pub manifest_url: Option<String>,
    /// `kexec`: boot the new image's kernel directly instead of through
    /// the firmware (falls back to the firmware when it cannot be loaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot: Option<RebootKind>,
}

/// `POST /v1/images/prefetch`: the image to stage, as in a reimage request
/// (empty: the configured image).
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrefetchRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSpec>,
    /// The image's manifest; not together with `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "utoipa", schema(min_length = 1, max_length = 4096))]
    pub manifest_url: Option<String>,
}

/// Where a staged image is kept.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StagingArea {
    /// RAM (`/run`): gone with a reboot.
    Memory,
    /// The state directory's file system.
    StateDir,
}

/// `GET /v1/images`: an image staged by a prefetch, verified, waiting for
/// the reimage that writes it.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StagedImageInfo {
    /// SHA-256 of the decoded image, as `DELETE /v1/images/{sha256}` takes it.
    pub sha256: String,
    pub name: String,
    /// Size of the decoded image.
    pub size: u64,
    /// Bytes it takes where it is staged (as fetched, still encoded).
    pub staged_bytes: u64,
    pub area: StagingArea,
    /// Where it was fetched from.
    pub url: String,
    /// The manifest it was prefetched by, if any: a reimage naming the same
    /// manifest writes this copy without fetching the manifest again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_url: Option<String>,
    pub staged_at: Timestamp,
    /// The prefetch operation that staged it.
    pub operation_id: String,
}

/// `POST /v1/node/reboot`.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RebootRequest {
    #[serde(default)]
    pub node_reboot_option: NodeReimageOption,
}

/// `POST /v1/node/disablescheduling`.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DisableSchedulingRequest {
    #[serde(default)]
    pub node_disable_scheduling_option: DisableSchedulingOption,
}

/// What an operation does.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperationKind {
    Reimage,
    Reboot,
    /// Downloading and verifying an image into the staging area, ahead
    /// of the reimage that will write it; the node keeps working.
    Prefetch,
}

impl OperationKind {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OperationKind::Reimage => "reimage",
            OperationKind::Reboot => "reboot",
            OperationKind::Prefetch => "prefetch",
        }
    }
}

/// Where an operation stands.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperationStatus {
    InProgress,
    Succeeded,
    Failed,
}

impl OperationStatus {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OperationStatus::InProgress => "InProgress",
            OperationStatus::Succeeded => "Succeeded",
            OperationStatus::Failed => "Failed",
        }
    }
}

/// Bytes moved by the running phase; once the write finished, what it
/// wrote in all and its average rate (of the image's `totalBytes`).
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationProgress {
    pub bytes_written: u64,
    pub total_bytes: Option<u64>,
    pub bytes_per_second: u64,
    /// A finished write through a block index: encoded bytes fetched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_downloaded: Option<u64>,
    /// A finished write through a block index: bytes the disk already held,
    /// neither fetched nor written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_unchanged: Option<u64>,
}

/// Why an operation failed: a stable code and a message.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationError {
    pub code: ErrorCode,
    pub message: String,
}

/// What a reimage on a node that booted through UEFI did to the firmware's
/// boot entries. A failure here (`error`, code `BootEntryFailed`) does not
/// fail the operation: the verified image stays written.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootEntryReport {
    /// The load option that boots the new image (`Boot0004`).
    pub entry: Option<String>,
    /// The partition GUID of the new image's EFI system partition.
    pub esp_part_uuid: Option<String>,
    /// The loader it boots (`\EFI\BOOT\BOOTX64.EFI`).
    pub loader: Option<String>,
    /// `BootNext` was set to the entry before the reboot.
    pub boot_next: bool,
    /// After the confirmation, whether the firmware booted the entry
    /// (`BootCurrent`), and the entry is first in `BootOrder`.
    pub booted: Option<bool>,
    pub first_in_boot_order: bool,
    /// Entries of the old image (their ESP left the disk), removed.
    pub removed: Vec<String>,
    pub error: Option<OperationError>,
}

/// `GET /v1/operations/{id}`.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    pub id: String,
    pub kind: OperationKind,
    pub status: OperationStatus,
    /// The phase it is in; once it ended, `done`, or the phase it failed in.
    pub phase: Option<Phase>,
    pub progress: OperationProgress,
    pub node_reimage_option: NodeReimageOption,
    pub requeued_tasks: Vec<String>,
    pub terminated_tasks: Vec<String>,
    pub error: Option<OperationError>,
    /// The image a reimage writes, once its source is resolved (its name
    /// and the SHA-256 of the decoded image).
    #[serde(default)]
    pub image: Option<ImageRef>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// When it succeeded or failed.
    #[serde(default)]
    pub ended_at: Option<Timestamp>,
    /// From `createdAt` to `endedAt`.
    #[serde(default)]
    pub duration_seconds: Option<f64>,
    /// A reimage of a node that booted through UEFI: its boot entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_entry: Option<BootEntryReport>,
    /// How the node went down into the new image, once it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot: Option<RebootReport>,
}

/// How a reimaged node rebooted: `kexec` (the new kernel was loaded) or
/// `firmware`; `fallback` says why a `kexec` that was asked for became a
/// firmware reboot.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RebootReport {
    pub method: RebootKind,
    pub fallback: Option<String>,
}

/// `{"name","value"}` for a task's environment.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvironmentSetting {
    pub name: String,
    pub value: String,
}

/// ISO 8601 durations (`PT1H`, `P7D`).
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskConstraints {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wall_clock_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_time: Option<String>,
}

/// `POST /v1/tasks`.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddTaskRequest {
    pub id: String,
    pub command_line: String,
    #[serde(default)]
    pub environment_settings: Vec<EnvironmentSetting>,
    #[serde(default)]
    pub constraints: TaskConstraints,
    /// Who the task runs as; omitted, a non-administrative user unique to
    /// the task (`autoUser` with scope `task`, elevation `nonadmin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_identity: Option<UserIdentity>,
}

/// `userIdentity`, as Batch has it: an automatic user (`autoUser`) or a
/// named account (`username`, which this agent does not support yet).
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserIdentity {
    /// Required: without it the identity names no user this agent has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "utoipa", schema(required = true, nullable = false))]
    pub auto_user: Option<AutoUserSpecification>,
    /// A named account: refused (`UnsupportedUserIdentity`) until named
    /// accounts are supported, so only `null` is described.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "utoipa", schema(schema_with = null_only))]
    pub username: Option<String>,
}

/// The schema of a field whose only accepted value is `null`.
#[cfg(feature = "utoipa")]
fn null_only() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::Null)
        .build()
}

/// `autoUser`: an account the node makes for tasks.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoUserSpecification {
    /// `task` or `pool` (Batch's default when `autoUser` is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<AutoUserScope>,
    /// `nonadmin` (the default) or `admin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elevation_level: Option<ElevationLevel>,
}

wire_enum! {
    /// Whether a task's automatic user is its own or shared by the node's tasks.
    pub enum AutoUserScope {
        /// A user unique to the task: other tasks cannot read its files.
        Task = "task",
        /// The user all pool-scoped tasks of the node share.
        Pool = "pool",
    }
}

wire_enum! {
    /// Whether a task runs unprivileged or as root.
    pub enum ElevationLevel {
        /// An unprivileged user without capabilities.
        NonAdmin = "nonadmin",
        /// Root; only an admin token may ask for it.
        Admin = "admin",
    }
}

/// Task states, as Batch names them.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Active,
    Running,
    Completed,
}

/// Why a task failed.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureInfo {
    /// `usererror` (the command failed) or `servererror` (the node stopped it).
    pub category: String,
    pub code: ErrorCode,
    pub message: String,
}

/// How a task ran.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionInfo {
    pub start_time: Option<Timestamp>,
    pub end_time: Option<Timestamp>,
    pub exit_code: Option<i32>,
    pub requeue_count: u32,
    pub failure_info: Option<FailureInfo>,
}

/// `GET /v1/tasks/{id}`.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    pub id: String,
    pub command_line: String,
    pub environment_settings: Vec<EnvironmentSetting>,
    pub constraints: TaskConstraints,
    pub state: TaskState,
    pub creation_time: Timestamp,
    pub state_transition_time: Timestamp,
    pub execution_info: ExecutionInfo,
    /// When the task's directory is deleted (set once it completed).
    pub retention_expiry: Option<Timestamp>,
    /// Who the task runs as, with every default filled in.
    #[serde(default)]
    pub user_identity: UserIdentity,
}

/// A list answer: `{"value": [...]}` as Batch lists are.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct List<T> {
    pub value: Vec<T>,
}

/// The error body of every route:
/// `{"code","message":{"lang","value"},"values":[{"key","value"}]}`.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: ErrorMessage,
    #[serde(default)]
    pub values: Vec<ErrorValue>,
}

/// The human part of an [`ErrorBody`].
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMessage {
    pub lang: String,
    pub value: String,
}

/// A detail of an [`ErrorBody`].
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorValue {
    pub key: String,
    pub value: String,
}

impl ErrorBody {
    /// An error with `code` and an English message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: ErrorMessage {
                lang: "en-us".into(),
                value: message.into(),
            },
            values: Vec::new(),
        }
    }

    /// Adds a `{"key","value"}` detail.
    pub fn with_value(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.values.push(ErrorValue {
            key: key.into(),
            value: value.into(),
        });
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reimage_options_use_the_batch_spelling() {
        let body: ReimageRequest =
            serde_json::from_str(r#"{"nodeReimageOption":"taskcompletion"}"#).expect("parses");
        assert_eq!(body.node_reimage_option, NodeReimageOption::TaskCompletion);
        let body: ReimageRequest = serde_json::from_str("{}").expect("defaults");
        assert_eq!(body.node_reimage_option, NodeReimageOption::Requeue);
        for spelling in ["taskCompletion", "TASKCOMPLETION", "TaskCompletion"] {
            let body: ReimageRequest =
                serde_json::from_str(&format!(r#"{{"nodeReimageOption":"{spelling}"}}"#))
                    .expect("any case");
            assert_eq!(body.node_reimage_option, NodeReimageOption::TaskCompletion);
            assert_eq!(
                serde_json::to_value(&body).expect("json")["nodeReimageOption"],
                "taskcompletion",
                "answers keep one spelling"
            );
        }
        let err =
            serde_json::from_str::<ReimageRequest>(r#"{"nodeReimageOption":"task completion"}"#)
                .expect_err("not a value");
        assert!(
            err.to_string().contains("retaineddata"),
            "lists the values: {err}"
        );
        let err = serde_json::from_str::<ReimageRequest>(r#"{"nodeReimageOptions":"x"}"#)
            .expect_err("unknown field");
        assert!(err.to_string().contains("nodeReimageOptions"));
    }

    #[test]
    fn operation_status_is_pascal_case_and_times_are_rfc3339() {
        let at: Timestamp = "2026-11-23T10:00:00Z".parse().expect("time");
        let op = Operation {
            id: "op".into(),
            kind: OperationKind::Reimage,
            status: OperationStatus::InProgress,
            phase: Some(Phase::WaitingForTasks),
            progress: OperationProgress::default(),
            node_reimage_option: NodeReimageOption::RetainedData,
            requeued_tasks: vec![],
            terminated_tasks: vec![],
            error: None,
            image: None,
            created_at: at,
            updated_at: at,
            ended_at: None,
            duration_seconds: None,
            boot_entry: None,
            reboot: None,
        };
        let json = serde_json::to_value(&op).expect("serialises");
        assert_eq!(json["status"], "InProgress");
        assert_eq!(json["phase"], "waitingForTasks");
        assert_eq!(json["nodeReimageOption"], "retaineddata");
        assert_eq!(json["createdAt"], "2026-11-23T10:00:00Z");
    }

    #[test]
    fn user_identities_take_any_case_and_answer_in_lowercase() {
        let body: AddTaskRequest = serde_json::from_str(
            r#"{"id":"t","commandLine":"true","userIdentity":{"autoUser":{"scope":"Task","elevationLevel":"nonAdmin"}}}"#,
        )
        .expect("parses");
        let auto = body
            .user_identity
            .and_then(|u| u.auto_user)
            .expect("autoUser");
        assert_eq!(auto.scope, Some(AutoUserScope::Task));
        assert_eq!(auto.elevation_level, Some(ElevationLevel::NonAdmin));
        assert_eq!(
            serde_json::to_value(&auto).expect("serialises"),
            serde_json::json!({"scope": "task", "elevationLevel": "nonadmin"})
        );
        let err = serde_json::from_str::<AutoUserSpecification>(r#"{"elevationLevel":"root"}"#)
            .expect_err("unknown level");
        assert!(err.to_string().contains("nonadmin"), "{err}");
        let err = serde_json::from_str::<UserIdentity>(r#"{"autoUsr":{}}"#).expect_err("typo");
        assert!(err.to_string().contains("autoUsr"), "{err}");
    }

    #[test]
    fn task_isolation_is_camel_case_and_defaults_to_process_groups() {
        assert_eq!(
            serde_json::to_value(TaskIsolation::ProcessGroup).expect("serialises"),
            "processGroup"
        );
        assert_eq!(
            serde_json::from_str::<TaskIsolation>(r#""cgroup""#).expect("parses"),
            TaskIsolation::Cgroup
        );
        assert_eq!(TaskIsolation::default(), TaskIsolation::ProcessGroup);
    }

    #[test]
    fn states_kinds_and_statuses_are_spelt_as_on_the_wire() {
        for state in NodeState::ALL {
            assert_eq!(serde_json::to_value(state).expect("json"), state.as_str());
        }
        for kind in [
            OperationKind::Reimage,
            OperationKind::Reboot,
            OperationKind::Prefetch,
        ] {
            assert_eq!(serde_json::to_value(kind).expect("json"), kind.as_str());
        }
        for status in [
            OperationStatus::InProgress,
            OperationStatus::Succeeded,
            OperationStatus::Failed,
        ] {
            assert_eq!(serde_json::to_value(status).expect("json"), status.as_str());
        }
    }

    #[test]
    fn the_error_body_has_the_batch_shape() {
        let body =
            ErrorBody::new(ErrorCode::NodeBeingReimaged, "busy").with_value("operationId", "op1");
        assert_eq!(
            serde_json::to_string(&body).expect("serialises"),
            r#"{"code":"NodeBeingReimaged","message":{"lang":"en-us","value":"busy"},"values":[{"key":"operationId","value":"op1"}]}"#
        );
    }
}
