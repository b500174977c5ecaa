//! `reimagectl node`: each agent's node, read a few at a time.

use crate::error::CliError;
use crate::output::{self, Format, Table};
use anyhow::Context;
use reimage_protocol::ErrorCode;
use reimage_protocol::api::{Node, OperationError};
use reimage_protocol::{Client, ClientError};
use serde::Serialize;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Agents read at once: the fds in use stay this many whatever the fleet.
const READS_AT_ONCE: usize = 16;

/// One agent's answer, as `--output json` prints it for several agents.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AgentNode {
    agent: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<Node>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<OperationError>,
}

/// Prints the node of every agent of `fleet`: for one agent its node as
/// the API shows it, for several a list of `{"agent","node"|"error"}`.
pub async fn run(fleet: &[Client], format: Format) -> anyhow::Result<()> {
    if let [client] = fleet {
        let node = client
            .node()
            .await
            .with_context(|| format!("reading the node of {}", client.base_url()))?;
        return match format {
            Format::Json | Format::Jsonl => output::print_json(&node),
            Format::Table => {
                table(&[(client.base_url().to_string(), Ok(node))]).print();
                Ok(())
            }
        };
    }
    let slots = Arc::new(Semaphore::new(READS_AT_ONCE));
    let mut reads = JoinSet::new();
    for (index, client) in fleet.iter().cloned().enumerate() {
        let slots = Arc::clone(&slots);
        reads.spawn(async move {
            let _slot = slots.acquire_owned().await;
            (index, client.node().await)
        });
    }
    let mut answers: Vec<Option<Result<Node, ClientError>>> = vec![None; fleet.len()];
    while let Some(joined) = reads.join_next().await {
        let (index, answer) = joined.context("reading the nodes")?;
        answers[index] = Some(answer);
    }
    let answers: Vec<(String, Result<Node, ClientError>)> = fleet
        .iter()
        .zip(answers)
        .filter_map(|(client, answer)| Some((client.base_url().to_string(), answer?)))
        .collect();
    match format {
        Format::Json | Format::Jsonl => {
            let list: Vec<AgentNode> = answers
                .iter()
                .map(|(agent, answer)| AgentNode {
                    agent: agent.clone(),
                    node: answer.as_ref().ok().cloned(),
                    error: answer.as_ref().err().map(|e| OperationError {
                        code: e.code(),
                        message: e.to_string(),
                    }),
                })
                .collect();
            output::print_json(&list)?;
        }
        Format::Table => table(&answers).print(),
    }
    let unread = answers.iter().filter(|(_, a)| a.is_err()).count();
    if unread > 0 {
        return Err(CliError::new(
            ErrorCode::NodesUnreachable,
            format!("{unread} of {} agent(s) did not answer", answers.len()),
        )
        .into());
    }
    Ok(())
}

fn table(answers: &[(String, Result<Node, ClientError>)]) -> Table {
    let mut table = Table::new(&[
        "AGENT",
        "NODE",
        "STATE",
        "SCHEDULING",
        "RUNNING",
        "TASKS RUN",
        "IMAGE",
        "VERSION",
    ]);
    for (agent, answer) in answers {
        match answer {
            Ok(node) => table.row(vec![
                agent.clone(),
                node.id.clone(),
                output::wire_name(&node.state),
                output::wire_name(&node.scheduling_state),
                node.running_tasks_count.to_string(),
                node.total_tasks_run.to_string(),
                output::or_dash(node.image.as_ref().map(|i| i.name.clone())),
                node.agent_version.clone(),
            ]),
            Err(err) => table.row(vec![
                agent.clone(),
                "-".into(),
                format!("error: {}: {err}", err.code()),
            ]),
        }
    }
    table
}
