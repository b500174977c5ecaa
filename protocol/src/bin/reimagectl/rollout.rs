//! `reimage` and `reboot` across a fleet: waves of at most `--max-parallel`
//! nodes in flight, no new node once `--max-failures` have failed, Ctrl-C
//! stops starting nodes, and a summary of every node at the end.

use crate::error::CliError;
use crate::output::{self, Format, Table};
use crate::progress::{NodeProgress, Progress};
use anyhow::Context;
use jiff::Timestamp;
use reimage_protocol::ErrorCode;
use reimage_protocol::api::{
    ImageSpec, NodeReimageOption, Operation, OperationError, OperationStatus, ReimageRequest,
};
use reimage_protocol::{Client, ClientError, Phase, WaitEvent};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// `--option` of reimage and reboot: what happens to the node's tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReimageOption {
    /// Stop running tasks now; run them again on the new image.
    Requeue,
    /// Stop running tasks now; mark them completed with a failure.
    Terminate,
    /// Take no new tasks; wait for the running ones to end.
    #[value(name = "taskcompletion")]
    TaskCompletion,
    /// As taskcompletion, and wait until every task's retained data expired.
    #[value(name = "retaineddata")]
    RetainedData,
}

impl From<ReimageOption> for NodeReimageOption {
    fn from(option: ReimageOption) -> Self {
        match option {
            ReimageOption::Requeue => NodeReimageOption::Requeue,
            ReimageOption::Terminate => NodeReimageOption::Terminate,
            ReimageOption::TaskCompletion => NodeReimageOption::TaskCompletion,
            ReimageOption::RetainedData => NodeReimageOption::RetainedData,
        }
    }
}

/// How a fleet is rolled through.
#[derive(Debug, clap::Args)]
pub struct RolloutArgs {
    /// Nodes with an operation in flight at once. Without --wait a node is
    /// done once its operation is accepted, so this only paces the requests.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_parallel: u32,
    /// Start no new node once this many have failed. The default, 1, stops
    /// at the first failure: a bad image should cost one node, not a fleet.
    #[arg(long, value_name = "M", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_failures: u32,
    /// Follow each operation to Succeeded or Failed (through the node's
    /// reboot) before its slot takes the next node.
    #[arg(long)]
    wait: bool,
    /// With --wait: how long one node's operation may take, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 7200)]
    timeout: u64,
}

/// `reimagectl reimage`.
#[derive(Debug, clap::Args)]
pub struct ReimageArgs {
    /// What happens to the tasks on the node.
    #[arg(long, value_enum, default_value_t = ReimageOption::Requeue)]
    option: ReimageOption,
    /// The image to write (http or https URL; raw, gzip, xz or zstd).
    /// Without it or --manifest each agent writes its configured [image].
    #[arg(
        long,
        value_name = "URL",
        requires = "sha256",
        conflicts_with = "manifest"
    )]
    image_url: Option<String>,
    /// SHA-256 (hex) of the raw image given by --image-url.
    #[arg(long, value_name = "HEX", requires = "image_url")]
    sha256: Option<String>,
    /// URL of an image manifest (`*.manifest.json`: url, format, size, sha256).
    #[arg(long, value_name = "URL")]
    manifest: Option<String>,
    #[command(flatten)]
    rollout: RolloutArgs,
}

/// `reimagectl reboot`.
#[derive(Debug, clap::Args)]
pub struct RebootArgs {
    /// What happens to the tasks on the node.
    #[arg(long, value_enum, default_value_t = ReimageOption::Requeue)]
    option: ReimageOption,
    #[command(flatten)]
    rollout: RolloutArgs,
}

impl ReimageArgs {
    /// Reimages every node of `fleet`.
    pub async fn run(self, fleet: &[Client], format: Format) -> anyhow::Result<()> {
        let request = ReimageRequest {
            node_reimage_option: self.option.into(),
            image: self
                .image_url
                .zip(self.sha256)
                .map(|(url, sha256)| ImageSpec {
                    url,
                    sha256,
                    size: None,
                }),
            manifest_url: self.manifest,
        };
        roll_out(fleet, Action::Reimage(request), &self.rollout, format).await
    }
}

impl RebootArgs {
    /// Reboots every node of `fleet`.
    pub async fn run(self, fleet: &[Client], format: Format) -> anyhow::Result<()> {
        roll_out(
            fleet,
            Action::Reboot(self.option.into()),
            &self.rollout,
            format,
        )
        .await
    }
}

/// What is done to each node.
#[derive(Debug, Clone)]
enum Action {
    Reimage(ReimageRequest),
    Reboot(NodeReimageOption),
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::Reimage(_) => "reimage",
            Action::Reboot(_) => "reboot",
        }
    }

    fn option(&self) -> NodeReimageOption {
        match self {
            Action::Reimage(request) => request.node_reimage_option,
            Action::Reboot(option) => *option,
        }
    }

    async fn start(&self, client: &Client) -> Result<Operation, ClientError> {
        match self {
            Action::Reimage(request) => client.reimage(request).await,
            Action::Reboot(option) => client.reboot(*option).await,
        }
    }
}

/// Where one node ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The operation succeeded.
    Succeeded,
    /// The request was refused, the operation failed, or it outlasted --timeout.
    Failed,
    /// Accepted and not followed (no --wait).
    Accepted,
    /// In flight when Ctrl-C stopped the rollout; it goes on on the agent.
    Interrupted,
    /// Never started.
    Skipped,
}

/// One line of the summary.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    agent: String,
    status: Outcome,
    operation_id: Option<String>,
    /// The phase it ended in (`done` when it succeeded).
    phase: Option<Phase>,
    started_at: Option<Timestamp>,
    finished_at: Option<Timestamp>,
    duration_seconds: Option<f64>,
    error: Option<OperationError>,
    /// The operation as last seen.
    operation: Option<Operation>,
}

impl NodeReport {
    fn skipped(agent: &str) -> Self {
        NodeReport {
            agent: agent.to_string(),
            status: Outcome::Skipped,
            operation_id: None,
            phase: None,
            started_at: None,
            finished_at: None,
            duration_seconds: None,
            error: None,
            operation: None,
        }
    }

    fn started(agent: &str, started: &Started, status: Outcome) -> Self {
        NodeReport {
            status,
            started_at: Some(started.at),
            finished_at: (status != Outcome::Interrupted).then(Timestamp::now),
            duration_seconds: Some(started.clock.elapsed().as_secs_f64()),
            ..NodeReport::skipped(agent)
        }
    }

    /// Adds what the operation says; its status decides the outcome.
    fn with_operation(mut self, operation: &Operation) -> Self {
        if self.status != Outcome::Interrupted {
            self.status = match operation.status {
                OperationStatus::Succeeded => Outcome::Succeeded,
                OperationStatus::Failed => Outcome::Failed,
                OperationStatus::InProgress => self.status,
            };
        }
        self.operation_id = Some(operation.id.clone());
        self.phase = match (operation.status, operation.phase) {
            (OperationStatus::Succeeded, None) => Some(Phase::Done),
            (_, phase) => phase,
        };
        self.error = self.error.or_else(|| operation.error.clone());
        self.operation = Some(operation.clone());
        self
    }

    fn with_error(mut self, err: &ClientError) -> Self {
        self.error = Some(OperationError {
            code: err.code(),
            message: err.to_string(),
        });
        self
    }

    fn error_text(&self) -> String {
        self.error
            .as_ref()
            .map(|e| format!("{}: {}", e.code, e.message))
            .unwrap_or_default()
    }
}

/// The whole rollout, as `--output json` prints it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    action: &'static str,
    node_reimage_option: NodeReimageOption,
    max_parallel: u32,
    max_failures: u32,
    waited: bool,
    interrupted: bool,
    succeeded: usize,
    failed: usize,
    accepted: usize,
    in_flight: usize,
    skipped: usize,
    nodes: Vec<NodeReport>,
}

impl Summary {
    fn new(action: &Action, args: &RolloutArgs, interrupted: bool, nodes: Vec<NodeReport>) -> Self {
        let count = |outcome| nodes.iter().filter(|n| n.status == outcome).count();
        Summary {
            action: action.name(),
            node_reimage_option: action.option(),
            max_parallel: args.max_parallel,
            max_failures: args.max_failures,
            waited: args.wait,
            interrupted,
            succeeded: count(Outcome::Succeeded),
            failed: count(Outcome::Failed),
            accepted: count(Outcome::Accepted),
            in_flight: count(Outcome::Interrupted),
            skipped: count(Outcome::Skipped),
            nodes,
        }
    }

    fn print(&self, format: Format) -> anyhow::Result<()> {
        if format == Format::Json {
            return output::print_json(self);
        }
        let mut table = Table::new(&["NODE", "STATUS", "PHASE", "DURATION", "OPERATION", "ERROR"]);
        for node in &self.nodes {
            table.row(vec![
                node.agent.clone(),
                output::wire_name(&node.status),
                output::or_dash(node.phase.map(output::phase)),
                output::or_dash(
                    node.duration_seconds
                        .map(|s| output::duration(Duration::from_secs_f64(s))),
                ),
                output::or_dash(node.operation_id.clone()),
                output::or_dash(Some(node.error_text())),
            ]);
        }
        table.print();
        Ok(())
    }

    /// `Ok` only when every node's operation succeeded (or, without
    /// --wait, was accepted).
    fn verdict(&self) -> anyhow::Result<()> {
        if self.interrupted {
            return Err(CliError::new(
                ErrorCode::Interrupted,
                format!(
                    "stopped by Ctrl-C with {} node(s) in flight (their operations go on; \
                     follow them with `reimagectl op wait`) and {} skipped",
                    self.in_flight, self.skipped
                ),
            ))
            .context(self.action);
        }
        if self.failed == 0 && self.skipped == 0 {
            return Ok(());
        }
        if let [node] = self.nodes.as_slice()
            && let Some(error) = &node.error
        {
            return Err(CliError::new(error.code.clone(), error.message.clone()))
                .context(format!("{} on {}", self.action, node.agent));
        }
        Err(CliError::new(
            ErrorCode::RolloutFailed,
            format!(
                "{} of {} node(s) failed, {} skipped",
                self.failed,
                self.nodes.len(),
                self.skipped
            ),
        ))
        .context(self.action)
    }
}

/// When a node was started.
#[derive(Debug, Clone, Copy)]
struct Started {
    at: Timestamp,
    clock: Instant,
}

/// What the rollout knows of each node in flight: when it started and its
/// operation as last seen, for the report after a second Ctrl-C.
type InFlight = Arc<Mutex<BTreeMap<usize, (Started, Option<Operation>)>>>;

/// Rolls `action` through `fleet` in order, prints the summary and says
/// whether the whole rollout succeeded.
///
/// Ctrl-C starts no more nodes and stops following operations, but lets a
/// request in flight finish, so that every operation an agent started is
/// reported with its id; a second Ctrl-C quits at once.
async fn roll_out(
    fleet: &[Client],
    action: Action,
    args: &RolloutArgs,
    format: Format,
) -> anyhow::Result<()> {
    let progress = Progress::new();
    let max_parallel = args.max_parallel as usize;
    let max_failures = args.max_failures as usize;
    let mut reports: Vec<NodeReport> = fleet
        .iter()
        .map(|c| NodeReport::skipped(c.base_url()))
        .collect();
    let in_flight: InFlight = Arc::default();
    let (stop, stopped) = watch::channel(false);
    let mut running = JoinSet::new();
    let mut started: BTreeSet<usize> = BTreeSet::new();
    let mut next = 0;
    let mut failures = 0;
    // Registered before the first node starts (tokio::signal::ctrl_c would
    // register only when first polled), so no Ctrl-C is missed.
    let mut ctrl_c =
        signal(SignalKind::interrupt()).context("handling Ctrl-C (SIGINT) during the rollout")?;
    loop {
        while !*stop.borrow()
            && next < fleet.len()
            && running.len() < max_parallel
            && failures < max_failures
        {
            let job = NodeJob {
                index: next,
                client: fleet[next].clone(),
                action: action.clone(),
                wait: args.wait.then(|| Duration::from_secs(args.timeout)),
                in_flight: Arc::clone(&in_flight),
                stopped: stopped.clone(),
            };
            let node = progress.node(job.client.base_url());
            started.insert(next);
            running.spawn(async move { (job.index, job.run(node).await) });
            next += 1;
        }
        tokio::select! {
            joined = running.join_next() => match joined {
                Some(Ok((index, report))) => {
                    if report.status == Outcome::Failed {
                        failures += 1;
                    }
                    started.remove(&index);
                    reports[index] = report;
                }
                Some(Err(err)) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                Some(Err(_)) => {}
                None => break,
            },
            Some(()) = ctrl_c.recv() => {
                if *stop.borrow() {
                    running.abort_all();
                    break;
                }
                stop.send_replace(true);
                progress.line(
                    "interrupted: starting no more nodes; letting requests in flight finish \
                     (Ctrl-C again to quit at once)",
                );
            }
        }
    }
    if failures >= max_failures && next < fleet.len() {
        progress.line(&format!(
            "{failures} node(s) failed (--max-failures {max_failures}): not starting the {} left",
            fleet.len() - next
        ));
    }
    // Only after a second Ctrl-C are nodes left without a report of their own.
    let seen = in_flight.lock().map(|n| n.clone()).unwrap_or_default();
    for index in started {
        reports[index] = interrupted_report(fleet[index].base_url(), seen.get(&index));
    }
    let summary = Summary::new(&action, args, *stop.borrow(), reports);
    progress.clear();
    summary.print(format)?;
    summary.verdict()
}

/// A node in flight at Ctrl-C, as last seen (skipped if it never began).
fn interrupted_report(agent: &str, seen: Option<&(Started, Option<Operation>)>) -> NodeReport {
    match seen {
        Some((when, Some(operation))) => {
            NodeReport::started(agent, when, Outcome::Interrupted).with_operation(operation)
        }
        Some((when, None)) => NodeReport::started(agent, when, Outcome::Interrupted),
        None => NodeReport::skipped(agent),
    }
}

/// One node's part of the rollout.
struct NodeJob {
    index: usize,
    client: Client,
    action: Action,
    /// `--wait`: how long to follow the operation.
    wait: Option<Duration>,
    in_flight: InFlight,
    /// Becomes true at Ctrl-C.
    stopped: watch::Receiver<bool>,
}

impl NodeJob {
    /// Starts the action on the node and, with `--wait`, follows its
    /// operation to its end (or to Ctrl-C).
    async fn run(self, mut progress: NodeProgress) -> NodeReport {
        let agent = self.client.base_url().to_string();
        let started = Started {
            at: Timestamp::now(),
            clock: Instant::now(),
        };
        if let Ok(mut nodes) = self.in_flight.lock() {
            nodes.insert(self.index, (started, None));
        }
        progress.starting(self.action.name());
        let accepted = match self.action.start(&self.client).await {
            Ok(operation) => operation,
            Err(err) => {
                progress.finish(&format!("failed: {}: {err}", err.code()));
                return NodeReport::started(&agent, &started, Outcome::Failed).with_error(&err);
            }
        };
        self.note(&accepted);
        progress.accepted(self.action.name(), &accepted);
        let Some(deadline) = self.wait else {
            progress.finish("accepted");
            return NodeReport::started(&agent, &started, Outcome::Accepted)
                .with_operation(&accepted);
        };
        let mut stopped = self.stopped.clone();
        let followed = tokio::select! {
            followed = self.client.follow_operation(&accepted.id, deadline, |event| match event {
                WaitEvent::Observed(operation) => {
                    self.note(operation);
                    progress.observed(operation);
                }
                WaitEvent::Unreachable(err) => progress.unreachable(err),
            }) => Some(followed),
            () = until_stopped(&mut stopped) => None,
        };
        let last = self.last_seen().unwrap_or(accepted);
        let report =
            match followed {
                Some(Ok(operation)) => NodeReport::started(&agent, &started, Outcome::Accepted)
                    .with_operation(&operation),
                Some(Err(err)) => NodeReport::started(&agent, &started, Outcome::Failed)
                    .with_error(&err)
                    .with_operation(&last),
                None => NodeReport::started(&agent, &started, Outcome::Interrupted)
                    .with_operation(&last),
            };
        let duration = output::duration(started.clock.elapsed());
        progress.finish(&match report.status {
            Outcome::Failed => format!("failed: {}", report.error_text()),
            Outcome::Succeeded => format!("succeeded in {duration}"),
            _ => format!(
                "interrupted while {}",
                output::or_dash(report.phase.map(output::phase))
            ),
        });
        report
    }

    fn note(&self, operation: &Operation) {
        if let Ok(mut nodes) = self.in_flight.lock()
            && let Some((_, seen)) = nodes.get_mut(&self.index)
        {
            *seen = Some(operation.clone());
        }
    }

    fn last_seen(&self) -> Option<Operation> {
        let nodes = self.in_flight.lock().ok()?;
        nodes.get(&self.index).and_then(|(_, seen)| seen.clone())
    }
}

/// Resolves once `stopped` is true; never if the rollout is gone.
async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    if stopped.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}
