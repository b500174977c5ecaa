//! One node's part of a rollout: find out where the node stands (an
//! operation of ours already in flight, the target image already on it),
//! start the action if it is still needed, follow the operation under its
//! per-phase deadlines, and run the health check.

use crate::journal::{Event, Journal};
use crate::output;
use crate::progress::NodeProgress;
use crate::rollout::{Action, NodeReport, Outcome, Started};
use reimage_protocol::api::{Operation, OperationError, OperationStatus};
use reimage_protocol::{Client, ClientError, ErrorCode, Phase, WaitEvent};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// How long each phase of one node may take.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// From the first request to the operation accepted (or adopted).
    pub accept: Duration,
    /// From the first byte downloaded to the image written and verified.
    pub download: Duration,
    /// From the node going down to reboot (or its agent going silent)
    /// to its operation seen again.
    pub reboot_return: Duration,
    /// The whole operation, from acceptance (`--timeout`).
    pub overall: Duration,
}

/// What a rollout gives each node's job.
#[derive(Clone)]
pub struct JobContext {
    pub action: Action,
    /// The SHA-256 of the image a reimage writes, when known: nodes
    /// already on it are left alone.
    pub target_sha256: Option<String>,
    /// `--force`: start the action even where it looks done.
    pub force: bool,
    /// `--wait`: follow each operation to its end.
    pub wait: bool,
    pub deadlines: Deadlines,
    /// `--max-downloads`: a permit per node downloading.
    pub downloads: Option<Arc<Semaphore>>,
    pub health_cmd: Option<String>,
    pub journal: Journal,
    /// Becomes true when the rollout is interrupted.
    pub stopped: watch::Receiver<bool>,
}

/// Where a node stands before anything is started on it.
enum Plan {
    /// Nothing of ours is on the node: start the action.
    Start,
    /// Our operation is already in flight (an earlier run started it).
    Adopt(Box<Operation>),
    /// The node is where the rollout wants it; the reason says how we know.
    Current(String),
}

/// What the rollout knows of a node in flight, for a report after an
/// interruption cut its job short.
pub type Seen = Arc<Mutex<(Started, Option<Operation>)>>;

/// One node's job.
pub struct NodeJob {
    pub client: Client,
    pub context: JobContext,
    /// The operation an earlier run of this rollout started on the node.
    pub earlier_operation: Option<String>,
    pub seen: Seen,
}

impl NodeJob {
    /// Runs the node's part of the rollout to its report.
    pub async fn run(self, mut progress: NodeProgress) -> NodeReport {
        let report = self.run_to_report(&mut progress).await;
        self.context.journal.record(Event::Finished {
            agent: report.agent.clone(),
            status: output::wire_name(&report.status),
            operation_id: report.operation_id.clone(),
            code: report.error.as_ref().map(|e| e.code.to_string()),
            message: report.error.as_ref().map(|e| e.message.clone()),
        });
        progress.finish(&report);
        report
    }

    async fn run_to_report(&self, progress: &mut NodeProgress) -> NodeReport {
        let agent = self.client.base_url().to_string();
        let started = self.started();
        let accept = self.context.deadlines.accept;
        let plan = match tokio::time::timeout(accept, self.plan()).await {
            Ok(Ok(plan)) => plan,
            Ok(Err(err)) => return self.refused(&started, &err),
            Err(_) => return self.refused(&started, &accept_timeout(&agent, accept)),
        };
        let (operation, permit) = match plan {
            Plan::Current(why) => {
                progress.say(&why);
                return NodeReport::started(&agent, &started, Outcome::Current);
            }
            Plan::Adopt(operation) => {
                self.context.journal.record(Event::Adopted {
                    agent: agent.clone(),
                    operation_id: operation.id.clone(),
                });
                progress.say(&format!(
                    "following operation {} already in flight",
                    operation.id
                ));
                (*operation, None)
            }
            Plan::Start => {
                // Waiting for a download slot is the image server's limit,
                // not the agent's slowness: outside the accept deadline.
                let permit = match &self.context.downloads {
                    Some(slots) => Arc::clone(slots).acquire_owned().await.ok(),
                    None => None,
                };
                self.context.journal.record(Event::Started {
                    agent: agent.clone(),
                });
                progress.starting(self.context.action.name());
                let start = self.context.action.start(&self.client);
                let operation = match tokio::time::timeout(accept, start).await {
                    Ok(Ok(operation)) => operation,
                    Ok(Err(err)) => return self.refused(&started, &err),
                    Err(_) => return self.refused(&started, &accept_timeout(&agent, accept)),
                };
                self.context.journal.record(Event::Accepted {
                    agent: agent.clone(),
                    operation_id: operation.id.clone(),
                });
                progress.accepted(self.context.action.name(), &operation);
                (operation, permit)
            }
        };
        self.note(&operation);
        if !self.context.wait {
            return NodeReport::started(&agent, &started, Outcome::Accepted)
                .with_operation(&operation);
        }
        let report = self.follow(&started, operation, permit, progress).await;
        if report.status == Outcome::Succeeded {
            return self.check_health(report, progress).await;
        }
        report
    }

    fn started(&self) -> Started {
        let started = Started::now();
        if let Ok(mut seen) = self.seen.lock() {
            *seen = (started, None);
        }
        started
    }

    /// Where the node stands: our operation in flight, the target already
    /// there, or neither.
    async fn plan(&self) -> Result<Plan, ClientError> {
        let operations = self.client.operations().await?;
        let kind = self.context.action.kind();
        if let Some(operation) = operations
            .iter()
            .rev()
            .find(|op| op.kind == kind && op.status == OperationStatus::InProgress)
            && self.is_ours(operation)
        {
            return Ok(Plan::Adopt(Box::new(operation.clone())));
        }
        if self.context.force {
            return Ok(Plan::Start);
        }
        if let (Action::Reimage(_) | Action::Prefetch(_), Some(target)) =
            (&self.context.action, &self.context.target_sha256)
        {
            let node = self.client.node().await?;
            let on_target = node
                .image
                .as_ref()
                .is_some_and(|image| image.sha256.eq_ignore_ascii_case(target));
            if on_target {
                return Ok(Plan::Current(format!("already on image {}", short(target))));
            }
            if let Action::Prefetch(_) = self.context.action
                && self
                    .client
                    .staged_images()
                    .await?
                    .iter()
                    .any(|staged| staged.sha256.eq_ignore_ascii_case(target))
            {
                return Ok(Plan::Current(format!(
                    "image {} staged already",
                    short(target)
                )));
            }
            return Ok(Plan::Start);
        }
        // Without a known target, what an earlier run saw succeed stands.
        let done_earlier = self.earlier_operation.as_ref().is_some_and(|id| {
            operations
                .iter()
                .any(|op| &op.id == id && op.status == OperationStatus::Succeeded)
        });
        Ok(if done_earlier {
            Plan::Current("done by an earlier run of this rollout".to_string())
        } else {
            Plan::Start
        })
    }

    /// An operation in flight is ours to follow when an earlier run
    /// started it, or when it writes the rollout's image.
    fn is_ours(&self, operation: &Operation) -> bool {
        if self.earlier_operation.as_deref() == Some(operation.id.as_str()) {
            return true;
        }
        match (&self.context.target_sha256, &operation.image) {
            (Some(target), Some(image)) => image.sha256.eq_ignore_ascii_case(target),
            _ => true,
        }
    }

    /// The action could not be started: the agent did not answer (the node
    /// is unreachable, counted apart) or refused.
    fn refused(&self, started: &Started, err: &ClientError) -> NodeReport {
        let outcome = if matches!(err, ClientError::Transport(_) | ClientError::Timeout(_)) {
            Outcome::Unreachable
        } else {
            Outcome::Failed
        };
        NodeReport::started(self.client.base_url(), started, outcome).with_error(err)
    }

    /// Follows `operation` to its end under the deadlines, or until the
    /// rollout is interrupted.
    async fn follow(
        &self,
        started: &Started,
        operation: Operation,
        permit: Option<OwnedSemaphorePermit>,
        progress: &mut NodeProgress,
    ) -> NodeReport {
        let agent = self.client.base_url();
        let clock = Mutex::new(PhaseClock::new(permit));
        if let Ok(mut clock) = clock.lock() {
            clock.observed(&operation);
        }
        let mut stopped = self.context.stopped.clone();
        let deadlines = self.context.deadlines;
        let followed = tokio::select! {
            followed = self.client.follow_operation(&operation.id, deadlines.overall, |event| {
                match event {
                    WaitEvent::Observed(op) => {
                        self.note(op);
                        if let Ok(mut clock) = clock.lock() {
                            clock.observed(op);
                        }
                        progress.observed(op);
                    }
                    WaitEvent::Unreachable(err) => {
                        if let Ok(mut clock) = clock.lock() {
                            clock.unreachable();
                        }
                        progress.unreachable(err);
                    }
                }
            }) => Some(followed),
            err = overdue(&clock, &deadlines, &operation.id) => Some(Err(err)),
            () = until_stopped(&mut stopped) => None,
        };
        let last = self.last_seen().unwrap_or(operation);
        match followed {
            Some(Ok(op)) => {
                NodeReport::started(agent, started, Outcome::Accepted).with_operation(&op)
            }
            Some(Err(err)) => NodeReport::started(agent, started, Outcome::Failed)
                .with_error(&err)
                .with_operation(&last),
            None => NodeReport::started(agent, started, Outcome::Interrupted).with_operation(&last),
        }
    }

    /// `--health-cmd`: `sh -c CMD` with `$REIMAGE_AGENT` set to the node's
    /// agent URL; anything but exit 0 fails the node.
    async fn check_health(&self, report: NodeReport, progress: &mut NodeProgress) -> NodeReport {
        let Some(command) = &self.context.health_cmd else {
            return report;
        };
        progress.say("health check...");
        let output = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .env("REIMAGE_AGENT", self.client.base_url())
            .env(
                "REIMAGE_OPERATION_ID",
                report.operation_id.clone().unwrap_or_default(),
            )
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await;
        let why = match output {
            Ok(output) if output.status.success() => {
                progress.say("healthy");
                return report;
            }
            Ok(output) => {
                let stderr = String::from_utf8_lossy(&output.stderr);
                let last = stderr.lines().last().unwrap_or_default().trim().to_string();
                format!("`{command}` ended with {}: {last}", output.status)
            }
            Err(err) => format!("running `{command}`: {err}"),
        };
        report.failed_with(OperationError {
            code: ErrorCode::HealthCheckFailed,
            message: why.trim_end_matches(": ").to_string(),
        })
    }

    fn note(&self, operation: &Operation) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.1 = Some(operation.clone());
        }
    }

    fn last_seen(&self) -> Option<Operation> {
        self.seen.lock().ok()?.1.clone()
    }
}

/// The time an operation spends in each stretch that has a deadline, and
/// the download slot it holds while it downloads.
struct PhaseClock {
    /// Since the first phase that downloads or writes the image.
    downloading_since: Option<Instant>,
    /// Since the node went down to reboot.
    rebooting_since: Option<Instant>,
    /// Since the agent stopped answering (cleared when it answers).
    silent_since: Option<Instant>,
    permit: Option<OwnedSemaphorePermit>,
}

impl PhaseClock {
    fn new(permit: Option<OwnedSemaphorePermit>) -> Self {
        PhaseClock {
            downloading_since: None,
            rebooting_since: None,
            silent_since: None,
            permit,
        }
    }

    fn observed(&mut self, operation: &Operation) {
        self.silent_since = None;
        let writing = matches!(
            operation.phase,
            Some(
                Phase::Staging
                    | Phase::Comparing
                    | Phase::Downloading
                    | Phase::Verifying
                    | Phase::SavingPartitions
            )
        );
        let past_writing = operation.status != OperationStatus::InProgress
            || matches!(
                operation.phase,
                Some(Phase::Rebooting | Phase::Confirming | Phase::Done)
            );
        if writing && self.downloading_since.is_none() {
            self.downloading_since = Some(Instant::now());
        }
        if past_writing {
            // The image is on the disk: the next node may download.
            self.permit = None;
            self.downloading_since = None;
        }
        if operation.phase == Some(Phase::Rebooting) && self.rebooting_since.is_none() {
            self.rebooting_since = Some(Instant::now());
        }
    }

    fn unreachable(&mut self) {
        self.silent_since.get_or_insert_with(Instant::now);
    }

    /// The deadline passed, if one did.
    fn overdue(&self, deadlines: &Deadlines, id: &str) -> Option<ClientError> {
        let past =
            |since: Option<Instant>, limit: Duration| since.is_some_and(|s| s.elapsed() > limit);
        if past(self.rebooting_since, deadlines.reboot_return)
            || (self.rebooting_since.is_some() && past(self.silent_since, deadlines.reboot_return))
        {
            return Some(ClientError::NodeDidNotReturn(format!(
                "operation {id}: the node went down to reboot and did not come back within {}s \
                 (--reboot-timeout)",
                deadlines.reboot_return.as_secs()
            )));
        }
        if past(self.silent_since, deadlines.reboot_return) {
            return Some(ClientError::Timeout(format!(
                "operation {id}: the agent has not answered for {}s (--reboot-timeout)",
                deadlines.reboot_return.as_secs()
            )));
        }
        if past(self.downloading_since, deadlines.download) {
            return Some(ClientError::Timeout(format!(
                "operation {id}: the image was not written within {}s (--download-timeout)",
                deadlines.download.as_secs()
            )));
        }
        None
    }
}

/// Resolves with the error of the first deadline that passes.
async fn overdue(clock: &Mutex<PhaseClock>, deadlines: &Deadlines, id: &str) -> ClientError {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(err) = clock
            .lock()
            .ok()
            .and_then(|clock| clock.overdue(deadlines, id))
        {
            return err;
        }
    }
}

fn accept_timeout(agent: &str, accept: Duration) -> ClientError {
    ClientError::Timeout(format!(
        "{agent} did not accept the request within {}s (--accept-timeout)",
        accept.as_secs()
    ))
}

/// The first 12 hex digits of a SHA-256, enough to tell images apart.
fn short(sha256: &str) -> &str {
    sha256.get(..12).unwrap_or(sha256)
}

/// Resolves once `stopped` is true; never if the rollout is gone.
async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    if stopped.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}
