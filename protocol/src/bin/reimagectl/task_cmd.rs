//! `reimagectl task add|list|show|logs|delete`.

use crate::output::{self, Format, Table};
use anyhow::Context;
use reimage_protocol::Client;
use reimage_protocol::api::{AddTaskRequest, EnvironmentSetting, Task, TaskConstraints};
use serde_json::json;

/// The tasks of one agent's node.
#[derive(Debug, clap::Subcommand)]
pub enum TaskCommand {
    /// Add a task: `task add ID [--env K=V]... [--retention P7D]
    /// [--max-wall-clock PT1H] -- COMMAND...` (options before `--`).
    Add(AddArgs),
    /// List the tasks.
    List,
    /// Show one task.
    Show {
        /// The task id.
        id: String,
    },
    /// Print a task's stdout (or stderr).
    Logs {
        /// The task id.
        id: String,
        /// Print stderr.txt instead of stdout.txt.
        #[arg(long)]
        stderr: bool,
    },
    /// Delete a task and its files.
    Delete {
        /// The task id.
        id: String,
    },
}

/// `task add`.
#[derive(Debug, clap::Args)]
pub struct AddArgs {
    /// The task id (letters, digits, `-` and `_`).
    id: String,
    /// An environment variable of the task, NAME=VALUE (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse_env)]
    env: Vec<EnvironmentSetting>,
    /// How long the task's files are kept after it completed (ISO 8601,
    /// e.g. P7D, the agent's default).
    #[arg(long, value_name = "DURATION")]
    retention: Option<String>,
    /// The longest the task may run (ISO 8601, e.g. PT1H).
    #[arg(long, value_name = "DURATION")]
    max_wall_clock: Option<String>,
    /// The command line, run by the node's shell; its words are joined by spaces.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn parse_env(text: &str) -> Result<EnvironmentSetting, String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok(EnvironmentSetting {
            name: name.to_string(),
            value: value.to_string(),
        }),
        _ => Err(format!("{text:?} is not NAME=VALUE")),
    }
}

impl TaskCommand {
    /// Runs the command against `client`'s agent.
    pub async fn run(self, client: &Client, format: Format) -> anyhow::Result<()> {
        let agent = client.base_url();
        match self {
            TaskCommand::Add(args) => {
                let request = AddTaskRequest {
                    id: args.id,
                    command_line: args.command.join(" "),
                    environment_settings: args.env,
                    constraints: TaskConstraints {
                        max_wall_clock_time: args.max_wall_clock,
                        retention_time: args.retention,
                    },
                    user_identity: None,
                };
                let task = client
                    .add_task(&request)
                    .await
                    .with_context(|| format!("adding task {} on {agent}", request.id))?;
                show(&[task], format)
            }
            TaskCommand::List => {
                let tasks = client
                    .tasks()
                    .await
                    .with_context(|| format!("listing the tasks of {agent}"))?;
                match format {
                    Format::Json | Format::Jsonl => output::print_json(&tasks),
                    Format::Table => show(&tasks, format),
                }
            }
            TaskCommand::Show { id } => {
                let task = client
                    .task(&id)
                    .await
                    .with_context(|| format!("task {id} on {agent}"))?;
                show(&[task], format)
            }
            TaskCommand::Logs { id, stderr } => {
                let name = if stderr { "stderr.txt" } else { "stdout.txt" };
                let text = client
                    .task_file(&id, name)
                    .await
                    .with_context(|| format!("{name} of task {id} on {agent}"))?;
                match format {
                    Format::Json | Format::Jsonl => output::print_json(&json!({
                        "taskId": id,
                        "name": name,
                        "content": text,
                    })),
                    Format::Table => {
                        print!("{text}");
                        Ok(())
                    }
                }
            }
            TaskCommand::Delete { id } => {
                client
                    .delete_task(&id)
                    .await
                    .with_context(|| format!("deleting task {id} on {agent}"))?;
                match format {
                    Format::Json | Format::Jsonl => output::print_json(&json!({ "deleted": id })),
                    Format::Table => {
                        println!("deleted task {id}");
                        Ok(())
                    }
                }
            }
        }
    }
}

fn show(tasks: &[Task], format: Format) -> anyhow::Result<()> {
    if format == Format::Json {
        return match tasks {
            [task] => output::print_json(task),
            _ => output::print_json(&tasks),
        };
    }
    let mut table = Table::new(&[
        "ID", "STATE", "EXIT", "REQUEUES", "CREATED", "FAILURE", "COMMAND",
    ]);
    for task in tasks {
        let info = &task.execution_info;
        table.row(vec![
            task.id.clone(),
            output::wire_name(&task.state),
            output::or_dash(info.exit_code.map(|c| c.to_string())),
            info.requeue_count.to_string(),
            output::time(task.creation_time),
            output::or_dash(info.failure_info.as_ref().map(|f| f.code.to_string())),
            task.command_line.clone(),
        ]);
    }
    table.print();
    Ok(())
}
