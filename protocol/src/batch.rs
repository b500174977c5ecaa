//! Bodies of the Azure Batch node routes (`/pools/{pool}/nodes/...`), in
//! Batch's own shapes, so Batch SDK clients and their pollers work against
//! an agent.

use crate::api::{NodeError, NodeState, SchedulingState};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Batch's `ComputeNode`, as `GET /pools/{pool}/nodes/{node}` answers.
/// `state` is `reimaging` from the moment a reimage is accepted until its
/// operation ends (through the reboot), as Batch pollers expect.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ComputeNode {
    pub id: String,
    /// This node's URL: `{scheme}://{host}/pools/{pool}/nodes/{node}`.
    pub url: String,
    pub state: NodeState,
    pub scheduling_state: SchedulingState,
    pub state_transition_time: Timestamp,
    pub last_boot_time: Option<Timestamp>,
    pub total_tasks_run: u64,
    pub running_tasks_count: u32,
    /// One slot per running task.
    pub running_task_slots_count: u32,
    pub total_tasks_succeeded: u64,
    /// The agent's node is the machine itself, never a spot VM.
    pub is_dedicated: bool,
    /// Why the node is `unusable`, or how its last operation failed.
    pub errors: Vec<NodeError>,
    pub node_agent_info: NodeAgentInfo,
}

/// Which agent runs on the node.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeAgentInfo {
    /// The version of reimage-agent.
    pub version: String,
    /// When this agent process started.
    pub last_update_time: Timestamp,
}

/// `GET /pools/{pool}/nodes`: Batch's list shape.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComputeNodeList {
    pub value: Vec<ComputeNode>,
}
