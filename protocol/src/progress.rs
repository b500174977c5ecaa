//! Progress of a write, as shown by `--progress-fd` and in operations.

use serde::{Deserialize, Serialize};

/// The phases an operation goes through, in order.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    WaitingForTasks,
    WaitingForRetention,
    /// In-place reimage: downloading, decoding and verifying the whole image
    /// into the staging area while the old system still runs.
    Staging,
    /// A write with a block index: reading the target's image extent to
    /// find the blocks that already hold the image.
    Comparing,
    /// Streaming, decoding, hashing and writing the image (with a block
    /// index: fetching and writing the blocks that differ).
    Downloading,
    /// Reading back what was written and comparing it.
    Verifying,
    /// Writing the merged partition table that keeps the saved partitions.
    SavingPartitions,
    /// Rebooting; for an in-place reimage the shutdown handoff writes the
    /// staged image during this phase.
    Rebooting,
    Confirming,
    /// The write finished and verified.
    Done,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 10] = [
        Phase::WaitingForTasks,
        Phase::WaitingForRetention,
        Phase::Staging,
        Phase::Comparing,
        Phase::Downloading,
        Phase::Verifying,
        Phase::SavingPartitions,
        Phase::Rebooting,
        Phase::Confirming,
        Phase::Done,
    ];

    /// The wire spelling (`waitingForTasks`).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::WaitingForTasks => "waitingForTasks",
            Phase::WaitingForRetention => "waitingForRetention",
            Phase::Staging => "staging",
            Phase::Comparing => "comparing",
            Phase::Downloading => "downloading",
            Phase::Verifying => "verifying",
            Phase::SavingPartitions => "savingPartitions",
            Phase::Rebooting => "rebooting",
            Phase::Confirming => "confirming",
            Phase::Done => "done",
        }
    }
}

/// One progress report: `{"phase","bytesWritten","totalBytes","bytesPerSecond"}`.
/// During `verifying`, `bytesWritten` counts the bytes read back.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WriteProgress {
    pub phase: Phase,
    pub bytes_written: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    pub bytes_per_second: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_spelt_as_on_the_wire() {
        for phase in Phase::ALL {
            assert_eq!(
                serde_json::to_value(phase).expect("json"),
                phase.as_str(),
                "{phase:?}"
            );
        }
    }

    #[test]
    fn progress_is_camel_case_json() {
        let progress = WriteProgress {
            phase: Phase::SavingPartitions,
            bytes_written: 10,
            total_bytes: Some(20),
            bytes_per_second: 5,
        };
        assert_eq!(
            serde_json::to_string(&progress).expect("serialises"),
            r#"{"phase":"savingPartitions","bytesWritten":10,"totalBytes":20,"bytesPerSecond":5}"#
        );
    }
}
