//! `reimagectl`: the controller. Drives one node's agent or rolls a reimage
//! (or a prefetch of its image) through a whole fleet in waves (a thin layer over
//! `reimage_protocol::Client`; flags are documented where they are defined).

mod error;
mod hosts;
mod journal;
mod node_cmd;
mod node_job;
mod op_cmd;
mod output;
mod progress;
mod rollout;
mod scheduling_cmd;
mod summary;
mod task_cmd;
mod waves;

use anyhow::Context;
use clap::{Parser, Subcommand};
use error::CliError;
use output::Format;
use reimage_protocol::ErrorCode;
use reimage_protocol::{Client, KeepAlive};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "reimagectl",
    version,
    about = "Reimage fleet hosts through their reimage-agent: one node, or a whole fleet in waves",
    after_help = "Exit status: 0 when every node's operation succeeded (without --wait: was \
                  accepted), 1 on any failure, 130 when interrupted by Ctrl-C."
)]
struct Cli {
    /// Base URL of an agent, e.g. http://10.0.0.5:7480 (repeat for several).
    #[arg(
        long = "agent",
        value_name = "URL",
        global = true,
        help_heading = "Global options"
    )]
    agents: Vec<String>,
    /// File of agent base URLs, one per line; `#` starts a comment, blank
    /// lines are ignored. Adds to --agent.
    #[arg(
        long,
        value_name = "FILE",
        global = true,
        help_heading = "Global options"
    )]
    hosts: Option<PathBuf>,
    /// File holding the bearer token (surrounding whitespace is trimmed).
    /// Without it the token is taken from $REIMAGE_TOKEN.
    #[arg(
        long,
        value_name = "FILE",
        global = true,
        help_heading = "Global options"
    )]
    token_file: Option<PathBuf>,
    /// `table` (aligned columns for people), `json` (one document) or, for
    /// reimage, reboot and prefetch, `jsonl` (each event as a JSON line as it
    /// happens, the summary last).
    #[arg(long, value_enum, default_value_t = Format::Table, global = true, help_heading = "Global options")]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show each agent's node: state, scheduling, tasks, image.
    Node,
    /// Reimage the nodes: one, or a fleet in waves of --max-parallel.
    Reimage(rollout::ReimageArgs),
    /// Reboot the nodes: one, or a fleet in waves of --max-parallel.
    Reboot(rollout::RebootArgs),
    /// Download and verify the image into each node's staging area ahead
    /// of the reimage, in waves of its own --max-parallel; the nodes keep
    /// working meanwhile.
    Prefetch(rollout::PrefetchArgs),
    /// Show, follow or list the operations of one agent.
    #[command(subcommand)]
    Op(op_cmd::OpCommand),
    /// Add, list, show, read and delete the tasks of one agent.
    #[command(subcommand)]
    Task(task_cmd::TaskCommand),
    /// Stop or resume scheduling new tasks on one agent's node.
    #[command(subcommand)]
    Scheduling(scheduling_cmd::SchedulingCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
        .and_then(|runtime| runtime.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", error::error_line(&err));
            error::exit_code(&err)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let agents = hosts::agents(&cli.agents, cli.hosts.as_deref())?;
    let token = read_token(cli.token_file.as_deref())?;
    let format = cli.output;
    // Only rollouts have events to stream.
    let document = match format {
        Format::Jsonl => Format::Json,
        other => other,
    };
    let format = match cli.command {
        Command::Reimage(_) | Command::Reboot(_) | Command::Prefetch(_) => format,
        _ => document,
    };
    match cli.command {
        Command::Node => node_cmd::run(&fleet(&agents, token, KeepAlive::None)?, format).await,
        Command::Reimage(args) => {
            args.run(&fleet(&agents, token, KeepAlive::OnePerAgent)?, format)
                .await
        }
        Command::Reboot(args) => {
            args.run(&fleet(&agents, token, KeepAlive::OnePerAgent)?, format)
                .await
        }
        Command::Prefetch(args) => {
            args.run(&fleet(&agents, token, KeepAlive::OnePerAgent)?, format)
                .await
        }
        Command::Op(command) => command.run(&one_agent(&agents, token, "op")?, format).await,
        Command::Task(command) => {
            command
                .run(&one_agent(&agents, token, "task")?, format)
                .await
        }
        Command::Scheduling(command) => {
            command
                .run(&one_agent(&agents, token, "scheduling")?, format)
                .await
        }
    }
}

/// The bearer token: the file's contents, else `$REIMAGE_TOKEN`, trimmed.
fn read_token(file: Option<&Path>) -> anyhow::Result<Option<String>> {
    let token = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the token file {}", path.display()))?;
            let token = text.trim().to_string();
            if token.is_empty() {
                return Err(CliError::new(
                    ErrorCode::InvalidArgument,
                    format!("the token file {} is empty", path.display()),
                )
                .into());
            }
            Some(token)
        }
        None => std::env::var("REIMAGE_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()),
    };
    Ok(token)
}

/// A client per agent, sharing one connection pool that keeps `keep_alive`.
fn fleet(
    agents: &[String],
    token: Option<String>,
    keep_alive: KeepAlive,
) -> anyhow::Result<Vec<Client>> {
    let Some(first) = agents.first() else {
        return Err(CliError::new(
            ErrorCode::InvalidArgument,
            "no agent: give --agent URL or --hosts FILE",
        )
        .into());
    };
    let first =
        Client::with_pool(first, token, keep_alive).with_context(|| format!("agent {first}"))?;
    let mut clients = vec![first.clone()];
    for agent in &agents[1..] {
        clients.push(
            first
                .with_base_url(agent)
                .with_context(|| format!("agent {agent}"))?,
        );
    }
    Ok(clients)
}

/// The client of the one agent a `command` talks to.
fn one_agent(agents: &[String], token: Option<String>, command: &str) -> anyhow::Result<Client> {
    if agents.len() > 1 {
        return Err(CliError::new(
            ErrorCode::InvalidArgument,
            format!(
                "`{command}` talks to one agent and {} were given; name one with --agent URL",
                agents.len()
            ),
        )
        .into());
    }
    let mut clients = fleet(agents, token, KeepAlive::OnePerAgent)?;
    clients
        .pop()
        .ok_or_else(|| CliError::new(ErrorCode::InvalidArgument, "no agent").into())
}
