//! What the store keeps about the node and each operation.

use jiff::Timestamp;
use reimage_protocol::api::{
    ImageRef, NodeError, NodeReimageOption, NodeState, Operation, OperationKind, OperationProgress,
    OperationStatus, ReimageRequest, SchedulingState,
};
use serde::{Deserialize, Serialize};

/// The node's persisted state; the visible state is derived from it, the
/// current operation and the running tasks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    pub scheduling: SchedulingState,
    /// The last write left the disk with only the saved partitions.
    pub unusable: bool,
    /// The image the node runs, as far as the agent knows.
    pub image: Option<ImageRef>,
    /// Written and verified, becomes `image` once the reboot is confirmed.
    pub pending_image: Option<ImageRef>,
    pub last_state: NodeState,
    pub state_transition_time: Timestamp,
    /// How the last operation failed, until one succeeds: shown as the
    /// node's `errors`.
    #[serde(default)]
    pub last_failure: Option<NodeError>,
}

impl NodeRecord {
    /// A node seen for the first time.
    pub fn new() -> Self {
        NodeRecord {
            scheduling: SchedulingState::Enabled,
            unusable: false,
            image: None,
            pending_image: None,
            last_state: NodeState::Idle,
            state_transition_time: Timestamp::now(),
            last_failure: None,
        }
    }
}

/// An operation as the API shows it, plus what the agent needs to resume it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OperationRecord {
    pub operation: Operation,
    /// The reimage request, to re-read the image choice after a restart.
    pub request: Option<ReimageRequest>,
    /// Where the image comes from (URL or manifest), for logs.
    pub image_source: Option<String>,
    /// The boot the node was in when it started rebooting: a different one
    /// at start-up means the reboot happened.
    pub boot_id: Option<String>,
    /// An in-place reimage: the image is staged and the shutdown handoff
    /// writes it during the reboot, leaving its outcome in `state_dir`.
    #[serde(default)]
    pub handoff: bool,
    /// On a UEFI node, the GUIDs of the target's partitions before the
    /// write: boot entries naming one that left the disk are the old image's.
    #[serde(default)]
    pub partitions_before: Vec<[u8; 16]>,
}

impl OperationRecord {
    /// A new operation, `InProgress`.
    pub fn new(
        kind: OperationKind,
        option: NodeReimageOption,
        request: Option<ReimageRequest>,
        image_source: Option<String>,
    ) -> Self {
        let now = Timestamp::now();
        OperationRecord {
            operation: Operation {
                id: reimage_protocol::new_request_id(),
                kind,
                status: OperationStatus::InProgress,
                phase: None,
                progress: OperationProgress::default(),
                node_reimage_option: option,
                requeued_tasks: Vec::new(),
                terminated_tasks: Vec::new(),
                error: None,
                image: None,
                created_at: now,
                updated_at: now,
                ended_at: None,
                duration_seconds: None,
                boot_entry: None,
                reboot: None,
            },
            request,
            image_source,
            boot_id: None,
            handoff: false,
            partitions_before: Vec::new(),
        }
    }
}
