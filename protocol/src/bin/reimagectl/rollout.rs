//! `reimage`, `reboot` and `prefetch` across a fleet: canary waves of at most
//! `--max-parallel` nodes in flight, failure and unreachability budgets
//! that stop the rollout, a journal from which a rerun carries on, Ctrl-C
//! (SIGTERM, SIGHUP) that stops starting nodes, and a summary at the end.

use crate::error::CliError;
use crate::journal::{self, Event, Journal};
use crate::node_job::{Deadlines, JobContext, NodeJob, Seen};
use crate::output::Format;
use crate::progress::Progress;
use crate::summary::Summary;
use crate::waves::Waves;
use anyhow::Context;
use jiff::Timestamp;
use reimage_protocol::ErrorCode;
use reimage_protocol::api::{
    ImageSpec, NodeReimageOption, Operation, OperationError, OperationKind, OperationStatus,
    PrefetchRequest, ReimageRequest,
};
use reimage_protocol::{Client, ClientError, Phase};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{Semaphore, watch};
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
    /// Nodes with an operation in flight at once, within a wave. Without
    /// --wait a node is done once its operation is accepted, so this only
    /// paces the requests.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_parallel: u32,
    /// Waves, as Ansible's `serial`: sizes by count or percentage of the
    /// fleet, the last repeated (`1,5%,25%,100%`). A wave starts once the
    /// one before ended within its budgets. The default is one canary
    /// node, then the rest.
    #[arg(long, value_name = "SIZES", default_value = "1,100%")]
    waves: Waves,
    /// With --wait: seconds to wait after a wave before the next one.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    soak: u64,
    /// Start no new node once this many have failed. Without it and
    /// without --max-fail-percent, 1: a bad image should cost one node.
    #[arg(long, value_name = "M",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_failures: Option<u32>,
    /// Start no new node once more than this percentage of a wave failed
    /// (Ansible's `max_fail_percentage`).
    #[arg(long, value_name = "P",
          value_parser = clap::value_parser!(u32).range(0..=100))]
    max_fail_percent: Option<u32>,
    /// Start no new node once this many were unreachable (counted apart
    /// from failures; no limit by default).
    #[arg(long, value_name = "N")]
    max_unreachable: Option<u32>,
    /// Nodes downloading the image at once (the image server's limit),
    /// apart from --max-parallel: a node holds its slot from its request
    /// to its image written.
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_downloads: Option<u32>,
    /// With --wait: run `sh -c CMD` for each node whose operation
    /// succeeded, with $REIMAGE_AGENT set to its URL; anything but exit 0
    /// counts the node as failed (HealthCheckFailed).
    #[arg(long, value_name = "CMD")]
    health_cmd: Option<String>,
    /// Follow each operation to Succeeded or Failed (through the node's
    /// reboot) before its slot takes the next node.
    #[arg(long)]
    wait: bool,
    /// With --wait: how long one node's operation may take in all, in
    /// seconds.
    #[arg(long, value_name = "SECS", default_value_t = 7200)]
    timeout: u64,
    /// Seconds for a node to accept the request (connecting, the checks
    /// of where it stands, the request itself); a node that does not is
    /// unreachable.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    accept_timeout: u64,
    /// Seconds for a node to download, write and verify the image.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    download_timeout: u64,
    /// Seconds for a node that went down to reboot (or whose agent went
    /// silent) to answer again.
    #[arg(long, value_name = "SECS", default_value_t = 900)]
    reboot_timeout: u64,
    /// The journal: every event, one JSON object per line, as it happens.
    /// Default: $XDG_STATE_HOME/reimagectl/ (or ~/.local/state/reimagectl/),
    /// named after the rollout, so that rerunning the command resumes it.
    #[arg(long, value_name = "FILE", conflicts_with = "resume")]
    journal: Option<PathBuf>,
    /// Resume the rollout of this journal: operations in flight are
    /// followed, nodes already done are left alone.
    #[arg(long, value_name = "JOURNAL")]
    resume: Option<PathBuf>,
    /// Start the action even on nodes that already run the target image
    /// (or that an earlier run of the rollout already rebooted).
    #[arg(long)]
    force: bool,
}

/// The image of a reimage or a prefetch.
#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// The image (http or https URL; raw, gzip, xz or zstd). Without it or
    /// --manifest each agent takes its configured [image].
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
}

impl ImageArgs {
    /// The SHA-256 of the image, when known (a manifest's is read through
    /// the first client), so that nodes already done are left alone.
    async fn target_sha256(&self, fleet: &[Client]) -> anyhow::Result<Option<String>> {
        Ok(match (&self.sha256, &self.manifest, fleet.first()) {
            (Some(sha256), _, _) => Some(sha256.to_ascii_lowercase()),
            (None, Some(manifest), Some(client)) => Some(
                client
                    .manifest_sha256(manifest)
                    .await
                    .with_context(|| format!("reading the manifest {manifest}"))?,
            ),
            _ => None,
        })
    }

    /// The request's `image`.
    fn spec(&self) -> Option<ImageSpec> {
        self.image_url
            .clone()
            .zip(self.sha256.clone())
            .map(|(url, sha256)| ImageSpec {
                url,
                sha256,
                size: None,
            })
    }
}

/// `reimagectl reimage`.
#[derive(Debug, clap::Args)]
pub struct ReimageArgs {
    /// What happens to the tasks on the node.
    #[arg(long, value_enum, default_value_t = ReimageOption::Requeue)]
    option: ReimageOption,
    /// Boot the new image's kernel directly (kexec, from its manifest's
    /// `boot.kexec`) instead of through the firmware.
    #[arg(long)]
    kexec: bool,
    #[command(flatten)]
    image: ImageArgs,
    #[command(flatten)]
    rollout: RolloutArgs,
}

/// `reimagectl prefetch`.
#[derive(Debug, clap::Args)]
pub struct PrefetchArgs {
    #[command(flatten)]
    image: ImageArgs,
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
        let target_sha256 = self.image.target_sha256(fleet).await?;
        let request = ReimageRequest {
            node_reimage_option: self.option.into(),
            image: self.image.spec(),
            manifest_url: self.image.manifest,
            reboot: self
                .kexec
                .then_some(reimage_protocol::api::RebootKind::Kexec),
        };
        roll_out(
            fleet,
            Action::Reimage(request),
            target_sha256,
            &self.rollout,
            format,
        )
        .await
    }
}

impl PrefetchArgs {
    /// Prefetches the image on every node of `fleet`: the download is
    /// paced by this rollout's --max-parallel (and --max-downloads), apart
    /// from the reimage's maintenance window.
    pub async fn run(self, fleet: &[Client], format: Format) -> anyhow::Result<()> {
        let target_sha256 = self.image.target_sha256(fleet).await?;
        let request = PrefetchRequest {
            image: self.image.spec(),
            manifest_url: self.image.manifest,
        };
        roll_out(
            fleet,
            Action::Prefetch(request),
            target_sha256,
            &self.rollout,
            format,
        )
        .await
    }
}

impl RebootArgs {
    /// Reboots every node of `fleet`.
    pub async fn run(self, fleet: &[Client], format: Format) -> anyhow::Result<()> {
        roll_out(
            fleet,
            Action::Reboot(self.option.into()),
            None,
            &self.rollout,
            format,
        )
        .await
    }
}

/// What is done to each node.
#[derive(Debug, Clone)]
pub enum Action {
    Reimage(ReimageRequest),
    Reboot(NodeReimageOption),
    Prefetch(PrefetchRequest),
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Reimage(_) => "reimage",
            Action::Reboot(_) => "reboot",
            Action::Prefetch(_) => "prefetch",
        }
    }

    pub fn kind(&self) -> OperationKind {
        match self {
            Action::Reimage(_) => OperationKind::Reimage,
            Action::Reboot(_) => OperationKind::Reboot,
            Action::Prefetch(_) => OperationKind::Prefetch,
        }
    }

    /// What happens to the nodes' tasks; a prefetch leaves them alone.
    pub fn option(&self) -> Option<NodeReimageOption> {
        match self {
            Action::Reimage(request) => Some(request.node_reimage_option),
            Action::Reboot(option) => Some(*option),
            Action::Prefetch(_) => None,
        }
    }

    /// What makes two rollouts the same one (the agents apart).
    fn identity(&self) -> Vec<String> {
        let mut parts = vec![self.name().to_string()];
        parts.extend(self.option().map(|option| format!("{option:?}")));
        let (image, manifest_url) = match self {
            Action::Reimage(request) => (&request.image, &request.manifest_url),
            Action::Prefetch(request) => (&request.image, &request.manifest_url),
            Action::Reboot(_) => return parts,
        };
        if let Some(image) = image {
            parts.push(image.url.clone());
            parts.push(image.sha256.to_ascii_lowercase());
        }
        parts.extend(manifest_url.clone());
        parts
    }

    pub async fn start(&self, client: &Client) -> Result<Operation, ClientError> {
        match self {
            Action::Reimage(request) => client.reimage(request).await,
            Action::Reboot(option) => client.reboot(*option).await,
            Action::Prefetch(request) => client.prefetch(request).await,
        }
    }
}

/// Where one node ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The operation succeeded (and the health check passed).
    Succeeded,
    /// The request was refused, the operation failed, outlasted a
    /// deadline, or the health check failed.
    Failed,
    /// The agent did not answer in time to start anything.
    Unreachable,
    /// Already where the rollout wants it (on the target image, or done by
    /// an earlier run); nothing was started.
    Current,
    /// Accepted and not followed (no --wait).
    Accepted,
    /// In flight when the rollout was interrupted; it goes on on the agent.
    Interrupted,
    /// Never started.
    Skipped,
}

/// One line of the summary.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    pub agent: String,
    pub status: Outcome,
    pub operation_id: Option<String>,
    /// The phase it ended in (`done` when it succeeded).
    pub phase: Option<Phase>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub duration_seconds: Option<f64>,
    pub error: Option<OperationError>,
    /// The operation as last seen.
    pub operation: Option<Operation>,
}

impl NodeReport {
    pub(crate) fn skipped(agent: &str) -> Self {
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

    pub fn started(agent: &str, started: &Started, status: Outcome) -> Self {
        NodeReport {
            status,
            started_at: Some(started.at),
            finished_at: (status != Outcome::Interrupted).then(Timestamp::now),
            duration_seconds: Some(started.clock.elapsed().as_secs_f64()),
            ..NodeReport::skipped(agent)
        }
    }

    /// Adds what the operation says; its status decides the outcome.
    pub fn with_operation(mut self, operation: &Operation) -> Self {
        if !matches!(self.status, Outcome::Interrupted | Outcome::Failed) {
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

    pub fn with_error(mut self, err: &ClientError) -> Self {
        self.error = Some(OperationError {
            code: err.code(),
            message: err.to_string(),
        });
        self
    }

    /// The operation succeeded but the node is not counted good.
    pub fn failed_with(mut self, error: OperationError) -> Self {
        self.status = Outcome::Failed;
        self.error = Some(error);
        self
    }

    pub fn error_text(&self) -> String {
        self.error
            .as_ref()
            .map(|e| format!("{}: {}", e.code, e.message))
            .unwrap_or_default()
    }
}

/// When a node was started.
#[derive(Debug, Clone, Copy)]
pub struct Started {
    pub at: Timestamp,
    pub clock: Instant,
}

impl Started {
    pub fn now() -> Self {
        Started {
            at: Timestamp::now(),
            clock: Instant::now(),
        }
    }
}

/// The failure budgets of a rollout and what was spent of them.
struct Budget {
    max_failures: Option<usize>,
    max_fail_percent: Option<u32>,
    max_unreachable: Option<usize>,
    failed: usize,
    unreachable: usize,
    /// Of the wave running now.
    wave_failed: usize,
    wave_size: usize,
}

impl Budget {
    fn new(args: &RolloutArgs) -> Self {
        // Neither budget given: the first failure stops the rollout.
        let max_failures = match (args.max_failures, args.max_fail_percent) {
            (None, None) => Some(1),
            (max, _) => max.map(|m| m as usize),
        };
        Budget {
            max_failures,
            max_fail_percent: args.max_fail_percent,
            max_unreachable: args.max_unreachable.map(|m| m as usize),
            failed: 0,
            unreachable: 0,
            wave_failed: 0,
            wave_size: 0,
        }
    }

    fn count(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Failed => {
                self.failed += 1;
                self.wave_failed += 1;
            }
            Outcome::Unreachable => self.unreachable += 1,
            _ => {}
        }
    }

    /// Why no new node may start, once a budget is spent.
    fn spent(&self) -> Option<String> {
        if let Some(max) = self.max_failures
            && self.failed >= max
        {
            return Some(format!(
                "{} node(s) failed (--max-failures {max})",
                self.failed
            ));
        }
        if let Some(percent) = self.max_fail_percent
            && self.wave_failed * 100 > percent as usize * self.wave_size
        {
            return Some(format!(
                "{} of the {} node(s) of the wave failed (--max-fail-percent {percent})",
                self.wave_failed, self.wave_size
            ));
        }
        if let Some(max) = self.max_unreachable
            && self.unreachable >= max
        {
            return Some(format!(
                "{} node(s) unreachable (--max-unreachable {max})",
                self.unreachable
            ));
        }
        None
    }
}

/// SIGINT, SIGTERM and SIGHUP (an ssh session gone): each interrupts the
/// rollout the same way.
struct Interrupts {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Interrupts {
    /// Registered before the first node starts (tokio::signal::ctrl_c would
    /// register only when first polled), so no signal is missed.
    fn register() -> anyhow::Result<Self> {
        let on = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("handling {name} during the rollout"))
        };
        Ok(Interrupts {
            int: on(SignalKind::interrupt(), "SIGINT")?,
            term: on(SignalKind::terminate(), "SIGTERM")?,
            hup: on(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    /// The name of the next signal.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            Some(()) = self.int.recv() => "SIGINT",
            Some(()) = self.term.recv() => "SIGTERM",
            Some(()) = self.hup.recv() => "SIGHUP",
        }
    }
}

/// Rolls `action` through `fleet` in waves, prints the summary and says
/// whether the whole rollout succeeded.
///
/// An interruption starts no more nodes and stops following operations,
/// but lets a request in flight finish, so that every operation an agent
/// started is in the journal and the summary with its id; a second one
/// quits at once.
async fn roll_out(
    fleet: &[Client],
    action: Action,
    target_sha256: Option<String>,
    args: &RolloutArgs,
    format: Format,
) -> anyhow::Result<()> {
    let agents: Vec<&str> = fleet.iter().map(Client::base_url).collect();
    let mut identity = action.identity();
    identity.extend(agents.iter().map(|a| a.to_string()));
    let key = journal::rollout_key(&identity.iter().map(String::as_str).collect::<Vec<_>>());
    let path = match (&args.resume, &args.journal) {
        (Some(path), _) => {
            if !path.exists() {
                return Err(CliError::new(
                    ErrorCode::JournalInvalid,
                    format!("--resume {}: no such journal", path.display()),
                )
                .into());
            }
            path.clone()
        }
        (None, Some(path)) => path.clone(),
        (None, None) => journal::default_path(action.name(), &key)?,
    };
    let earlier = journal::read_earlier(&path, &key)?;
    let journal = Journal::open(&path, format == Format::Jsonl)?;
    let waves = args.waves.sizes(fleet.len());
    let progress = Progress::new(fleet.len(), format != Format::Jsonl, Some(journal.clone()));
    // The first line of output says where the journal is, so that an
    // operator whose controller died knows what to --resume.
    progress.line(&format!("journal: {}", journal.path().display()));
    journal.record(Event::Rollout {
        key,
        action: action.name().to_string(),
        nodes: fleet.len(),
        target_sha256: target_sha256.clone(),
        waves: waves.clone(),
    });

    let (stop, stopped) = watch::channel(false);
    let context = JobContext {
        action: action.clone(),
        target_sha256,
        force: args.force,
        wait: args.wait,
        deadlines: Deadlines {
            accept: Duration::from_secs(args.accept_timeout),
            download: Duration::from_secs(args.download_timeout),
            reboot_return: Duration::from_secs(args.reboot_timeout),
            overall: Duration::from_secs(args.timeout),
        },
        downloads: args
            .max_downloads
            .map(|n| Arc::new(Semaphore::new(n as usize))),
        health_cmd: args.health_cmd.clone(),
        journal: journal.clone(),
        stopped,
    };
    let mut reports: Vec<NodeReport> = agents.iter().map(|a| NodeReport::skipped(a)).collect();
    let mut in_flight: BTreeMap<usize, Seen> = BTreeMap::new();
    let mut running = JoinSet::new();
    let mut budget = Budget::new(args);
    let mut interrupted: Option<&'static str> = None;
    let mut stop_reason: Option<String> = None;
    let mut interrupts = Interrupts::register()?;
    let mut first = 0;
    'waves: for (number, size) in waves.iter().copied().enumerate() {
        let wave = first..first + size;
        first += size;
        budget.wave_failed = 0;
        budget.wave_size = size;
        journal.record(Event::Wave {
            wave: number + 1,
            agents: agents[wave.clone()].iter().map(|a| a.to_string()).collect(),
        });
        progress.line(&format!(
            "wave {} of {}: {size} node(s)",
            number + 1,
            waves.len()
        ));
        let mut next = wave.start;
        loop {
            while interrupted.is_none()
                && stop_reason.is_none()
                && next < wave.end
                && running.len() < args.max_parallel as usize
            {
                let seen: Seen = Arc::new(Mutex::new((Started::now(), None)));
                in_flight.insert(next, Arc::clone(&seen));
                let job = NodeJob {
                    client: fleet[next].clone(),
                    context: context.clone(),
                    earlier_operation: earlier.operations.get(agents[next]).cloned(),
                    seen,
                };
                let node = progress.node(agents[next]);
                let index = next;
                running.spawn(async move { (index, job.run(node).await) });
                next += 1;
            }
            tokio::select! {
                joined = running.join_next() => match joined {
                    Some(Ok((index, report))) => {
                        budget.count(report.status);
                        in_flight.remove(&index);
                        progress.finished(report.status);
                        reports[index] = report;
                        if stop_reason.is_none() && let Some(reason) = budget.spent() {
                            progress.line(&format!("{reason}: starting no more nodes"));
                            journal.record(Event::Stopped { reason: reason.clone() });
                            stop_reason = Some(reason);
                        }
                    }
                    Some(Err(err)) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                    Some(Err(_)) => {}
                    None => break,
                },
                name = interrupts.next() => {
                    if interrupted.is_some() {
                        running.abort_all();
                        break 'waves;
                    }
                    interrupted = Some(name);
                    stop.send_replace(true);
                    journal.record(Event::Stopped { reason: format!("interrupted by {name}") });
                    progress.line(&format!(
                        "interrupted by {name}: starting no more nodes; letting requests in \
                         flight finish (again to quit at once)"
                    ));
                }
            }
        }
        let last_wave = number + 1 == waves.len();
        if interrupted.is_some() || stop_reason.is_some() || last_wave {
            break;
        }
        if args.soak > 0 && args.wait {
            progress.line(&format!("soaking {}s before the next wave", args.soak));
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(args.soak)) => {}
                name = interrupts.next() => {
                    interrupted = Some(name);
                    journal.record(Event::Stopped { reason: format!("interrupted by {name}") });
                    break;
                }
            }
        }
    }
    // Only after a second interruption are nodes left without a report.
    for (index, seen) in in_flight {
        reports[index] = interrupted_report(agents[index], &seen);
    }
    let summary = Summary::new(
        &action,
        args.max_parallel,
        args.wait,
        interrupted,
        journal.path(),
        reports,
    );
    journal.record(summary.ended_event());
    progress.clear();
    summary.print(format)?;
    summary.verdict()
}

/// A node in flight at the second interruption, as last seen.
fn interrupted_report(agent: &str, seen: &Seen) -> NodeReport {
    let Ok(seen) = seen.lock() else {
        return NodeReport::skipped(agent);
    };
    match &*seen {
        (when, Some(operation)) => {
            NodeReport::started(agent, when, Outcome::Interrupted).with_operation(operation)
        }
        (when, None) => NodeReport::started(agent, when, Outcome::Interrupted),
    }
}
