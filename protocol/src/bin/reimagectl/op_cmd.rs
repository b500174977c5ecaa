//! `reimagectl op show|wait|list`.

use crate::error::CliError;
use crate::output::{self, Format};
use crate::progress::Progress;
use anyhow::Context;
use reimage_protocol::ErrorCode;
use reimage_protocol::api::OperationStatus;
use reimage_protocol::{Client, WaitEvent};
use std::time::Duration;

/// The operations of one agent.
#[derive(Debug, clap::Subcommand)]
pub enum OpCommand {
    /// Show one operation.
    Show {
        /// The operation id (the `request-id` of the reimage or reboot).
        id: String,
    },
    /// Follow an operation to Succeeded or Failed, through the node's
    /// reboot; exit 0 only if it succeeded.
    Wait {
        /// The operation id.
        id: String,
        /// Give up after this many seconds.
        #[arg(long, value_name = "SECS", default_value_t = 7200)]
        timeout: u64,
    },
    /// List the agent's operations, oldest first.
    List,
}

impl OpCommand {
    /// Runs the command against `client`'s agent.
    pub async fn run(self, client: &Client, format: Format) -> anyhow::Result<()> {
        let agent = client.base_url();
        match self {
            OpCommand::Show { id } => {
                let operation = client
                    .operation(&id)
                    .await
                    .with_context(|| format!("operation {id} on {agent}"))?;
                show(&[operation], format)
            }
            OpCommand::List => {
                let operations = client
                    .operations()
                    .await
                    .with_context(|| format!("listing the operations of {agent}"))?;
                match format {
                    Format::Json | Format::Jsonl => output::print_json(&operations),
                    Format::Table => show(&operations, format),
                }
            }
            OpCommand::Wait { id, timeout } => {
                let progress = Progress::new(1, true, None);
                let mut node = progress.node(agent);
                let operation = client
                    .follow_operation(&id, Duration::from_secs(timeout), |event| match event {
                        WaitEvent::Observed(operation) => node.observed(operation),
                        WaitEvent::Unreachable(err) => node.unreachable(err),
                    })
                    .await
                    .with_context(|| format!("waiting for operation {id} on {agent}"))?;
                let failure = operation.error.clone();
                node.finish_with(&output::status(operation.status));
                progress.clear();
                show(std::slice::from_ref(&operation), format)?;
                match (operation.status, failure) {
                    (OperationStatus::Succeeded, _) => Ok(()),
                    (_, Some(error)) => Err(CliError::new(error.code, error.message))
                        .context(format!("operation {id} on {agent} failed")),
                    (status, None) => Err(CliError::new(
                        ErrorCode::OperationFailed,
                        format!("the operation ended {status:?}"),
                    ))
                    .context(format!("operation {id} on {agent}")),
                }
            }
        }
    }
}

fn show(operations: &[reimage_protocol::api::Operation], format: Format) -> anyhow::Result<()> {
    match (format, operations) {
        (Format::Json | Format::Jsonl, [operation]) => output::print_json(operation),
        (Format::Json | Format::Jsonl, _) => output::print_json(&operations),
        (Format::Table, _) => {
            output::operation_table(operations).print();
            Ok(())
        }
    }
}
