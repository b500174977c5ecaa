//! Recovery after a restart and confirmation after a reboot.

use super::*;
use crate::handoff::{HandoffPlan, Outcome, OutcomeRecord, outcome, stage};
use crate::tasks::TasksConfig;
use reimage_protocol::ErrorCode;
use reimage_protocol::api::{ImageRef, NodeReimageOption};

/// An agent on `dir` whose store already holds `record` (a reimage that
/// was rebooting) and a verified image waiting for the new boot.
async fn agent_after_restart(dir: &std::path::Path, record: &OperationRecord) -> Arc<Agent> {
    let text = format!(
        "[agent]\nnode_id = \"n\"\nstate_dir = \"{0}/state\"\n[disk]\ntarget = \"{0}/disk.img\"\n[reboot]\nmethod = \"systemd\"\n",
        dir.display()
    );
    let config = Config::parse(&text, "test").expect("config");
    let store = Arc::new(Store::open(&dir.join("state")).expect("store"));
    store
        .put(Table::Operations, &record.operation.id, record)
        .expect("operation");
    let mut node = NodeRecord::new();
    node.pending_image = Some(ImageRef {
        name: "new".into(),
        sha256: "ab".repeat(32),
    });
    store.put(Table::Node, NODE_KEY, &node).expect("node");
    let tasks = TaskManager::start(Arc::clone(&store), TasksConfig::new(dir.join("tasks")))
        .await
        .expect("tasks");
    let disk = DiskInfo {
        target: "disk.img".into(),
        size_bytes: 0,
        saved_partitions: Vec::new(),
    };
    Agent::start(config, store, tasks, disk).expect("agent")
}

fn rebooting(boot_id: &str) -> OperationRecord {
    let mut record = OperationRecord::new(
        OperationKind::Reimage,
        NodeReimageOption::Requeue,
        None,
        None,
    );
    record.operation.phase = Some(Phase::Rebooting);
    record.boot_id = Some(boot_id.to_string());
    record
}

#[tokio::test]
async fn a_reboot_into_a_new_boot_confirms_the_operation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = rebooting("a-boot-before-this-one");
    let agent = agent_after_restart(dir.path(), &record).await;
    let op = agent.operation(&record.operation.id).expect("operation");
    assert_eq!(op.status, OperationStatus::Succeeded, "{op:?}");
    let node = agent.node();
    assert_eq!(node.image.map(|i| i.name), Some("new".to_string()));
    assert_eq!(node.state, NodeState::Idle);
}

#[tokio::test]
async fn the_same_boot_after_a_restart_means_the_reboot_did_not_happen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = rebooting(&crate::system::boot_id().expect("boot id"));
    let agent = agent_after_restart(dir.path(), &record).await;
    let op = agent.operation(&record.operation.id).expect("operation");
    assert_eq!(op.status, OperationStatus::Failed);
    assert_eq!(op.error.map(|e| e.code), Some(ErrorCode::RebootNotObserved));
    assert_eq!(agent.node().state, NodeState::Unusable);
}

/// An in-place reimage that was rebooting in an earlier boot, with its
/// plan (expecting `expected`) and, if given, the handoff's outcome.
fn handoff_rebooted(
    dir: &std::path::Path,
    expected: &str,
    outcome: Option<Outcome>,
) -> OperationRecord {
    let mut record = rebooting("a-boot-before-this-one");
    record.handoff = true;
    let id = record.operation.id.clone();
    let state_dir = dir.join("state");
    std::fs::create_dir_all(state_dir.join("handoff")).expect("handoff dir");
    let plan = HandoffPlan {
        version: crate::handoff::PLAN_VERSION,
        operation_id: id.clone(),
        staged: crate::handoff::StagedAt::StateDir {
            path: "staging/op.img".into(),
        },
        staged_sha256: "cd".repeat(32),
        staged_index_sha256: None,
        format: reimage_protocol::ImageFormat::Zstd,
        image_size: 1 << 20,
        image_sha256: expected.to_string(),
        target: dir.join("disk.img"),
        save_partlabel: vec!["local-storage".into()],
        save_partindex: Vec::new(),
        state: crate::handoff::StateFilesystem {
            device: "/dev/vda2".into(),
            dev: "254:2".into(),
            fstype: "ext4".into(),
            state_dir_in_fs: "/".into(),
            on_target: true,
        },
    };
    plan.save(&outcome::plan_path(&state_dir, &id))
        .expect("plan");
    std::fs::create_dir_all(state_dir.join("staging")).expect("staging");
    std::fs::write(state_dir.join("staging/op.img"), b"staged").expect("staged image");
    if let Some(outcome) = outcome {
        OutcomeRecord {
            operation_id: id,
            finished_at: Timestamp::now(),
            elapsed_seconds: 3.0,
            outcome,
        }
        .save(&state_dir)
        .expect("outcome");
    }
    record
}

async fn after_handoff(outcome: Option<Outcome>) -> (tempfile::TempDir, Arc<Agent>, Operation) {
    let dir = tempfile::tempdir().expect("tempdir");
    let expected = "ab".repeat(32);
    let record = handoff_rebooted(dir.path(), &expected, outcome);
    let agent = agent_after_restart(dir.path(), &record).await;
    let op = agent.operation(&record.operation.id).expect("operation");
    (dir, agent, op)
}

#[tokio::test]
async fn an_agent_killed_while_staging_fails_the_operation_and_wrote_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut record = rebooting("a-boot-before-this-one");
    record.operation.phase = Some(Phase::Staging);
    let staging = dir.path().join("state").join(stage::STATE_STAGING_DIR);
    std::fs::create_dir_all(&staging).expect("staging dir");
    std::fs::write(staging.join("op.img.partial"), b"half").expect("partial image");
    let agent = agent_after_restart(dir.path(), &record).await;
    let op = agent.operation(&record.operation.id).expect("operation");
    assert_eq!(op.status, OperationStatus::Failed);
    let error = op.error.expect("error");
    assert_eq!(error.code, "AgentRestarted");
    assert!(
        error.message.contains("nothing was written"),
        "{}",
        error.message
    );
    assert_eq!(
        agent.node().state,
        NodeState::Idle,
        "the disk was not touched"
    );
    assert!(!staging.exists(), "the half-staged image is removed");
}

#[tokio::test]
async fn a_handoff_that_wrote_the_expected_image_confirms_the_operation() {
    let written = Outcome::Written {
        sha256: "ab".repeat(32),
        size: 1 << 20,
        blocks: None,
    };
    let (dir, agent, op) = after_handoff(Some(written)).await;
    assert_eq!(op.status, OperationStatus::Succeeded, "{op:?}");
    assert_eq!(agent.node().state, NodeState::Idle);
    let state_dir = dir.path().join("state");
    assert!(
        !state_dir.join("staging").exists(),
        "the staged image is removed"
    );
    assert!(!outcome::outcome_path(&state_dir, &op.id).exists());
}

#[tokio::test]
async fn a_handoff_that_wrote_another_image_fails_the_operation() {
    let other = Outcome::Written {
        sha256: "ef".repeat(32),
        size: 1 << 20,
        blocks: None,
    };
    let (_dir, _agent, op) = after_handoff(Some(other)).await;
    assert_eq!(op.status, OperationStatus::Failed);
    assert_eq!(
        op.error.map(|e| e.code),
        Some(ErrorCode::HandoffImageMismatch)
    );
}

#[tokio::test]
async fn a_refused_handoff_fails_the_operation_and_the_node_stays_usable() {
    let refused = Outcome::Refused {
        code: ErrorCode::ImageChecksumMismatch,
        message: "the staged image changed".into(),
    };
    let (_dir, agent, op) = after_handoff(Some(refused)).await;
    assert_eq!(op.status, OperationStatus::Failed);
    let error = op.error.expect("error");
    assert_eq!(error.code, "HandoffRefused");
    assert!(
        error.message.contains("ImageChecksumMismatch"),
        "{}",
        error.message
    );
    assert_eq!(
        agent.node().state,
        NodeState::Idle,
        "on its old image, usable"
    );
}

#[tokio::test]
async fn a_reboot_without_a_handoff_outcome_is_handoff_not_run() {
    let (_dir, agent, op) = after_handoff(None).await;
    assert_eq!(op.status, OperationStatus::Failed);
    assert_eq!(op.error.map(|e| e.code), Some(ErrorCode::HandoffNotRun));
    assert_eq!(agent.node().state, NodeState::Idle);
}

#[tokio::test]
async fn a_failed_handoff_write_makes_the_node_unusable() {
    let failed = Outcome::WriteFailed {
        code: ErrorCode::DiskWriteFailed,
        message: "EIO".into(),
    };
    let (_dir, agent, op) = after_handoff(Some(failed)).await;
    assert_eq!(op.error.map(|e| e.code), Some(ErrorCode::DiskWriteFailed));
    assert_eq!(agent.node().state, NodeState::Unusable);
}
