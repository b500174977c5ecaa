//! `/metrics`, the way an operator graphs a fleet: counters that only grow
//! (`_total`), histograms of how long operations and their phases take,
//! and gauges of what the node is doing now, in Prometheus's text format.
//!
//! The counters live in one process-wide registry, so the parts that see
//! an event count it where it happens (the HTTP source counts its bytes
//! and retries, the task manager its task transitions); the gauges are
//! set from the node's state when `/metrics` is read.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::sync::LazyLock;

/// Operation and phase durations: from a quick reboot to a long drain.
const DURATION_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0,
];
/// API request latencies.
const REQUEST_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    /// Operations that ended, by kind, status and error code (empty when
    /// they succeeded).
    pub operations: IntCounterVec,
    /// Bytes received from image servers (resumed ranges included).
    pub bytes_downloaded: IntCounter,
    /// Bytes of images written to the target.
    pub bytes_written: IntCounter,
    /// Bytes a write through a block index found on the target already.
    pub bytes_unchanged: IntCounter,
    /// HTTP attempts that failed and were retried or resumed.
    pub http_retries: IntCounter,
    /// Writes whose read-back differed from what was written.
    pub readback_mismatches: IntCounter,
    /// Task transitions, by the state entered (`active` when requeued).
    pub tasks: IntCounterVec,
    /// How long operations took, by kind and status.
    pub operation_duration: HistogramVec,
    /// How long each phase of an operation took.
    pub phase_duration: HistogramVec,
    /// When an operation last ended, by status (Unix seconds).
    pub last_operation: IntGaugeVec,
    /// API requests answered, by method, route and status.
    pub api_requests: IntCounterVec,
    /// API request latencies, by route.
    pub api_request_duration: HistogramVec,
    /// 1 for the node's state, 0 for the others.
    pub node_state: IntGaugeVec,
    /// 1 for the scheduling state, 0 for the other.
    pub scheduling_state: IntGaugeVec,
    /// 1 for the current operation's phase (none when idle).
    pub operation_phase: IntGaugeVec,
    /// Bytes moved by the current phase, and the total it will move.
    pub progress_bytes: IntGauge,
    pub progress_total_bytes: IntGauge,
    /// Tasks now in each state.
    pub tasks_by_state: IntGaugeVec,
    /// Bytes held by completed tasks' retained files.
    pub retained_bytes: IntGauge,
    /// Images staged by prefetches, and the bytes they take as fetched.
    pub staged_images: IntGauge,
    pub staged_bytes: IntGauge,
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let metric = IntCounter::new(name, help).unwrap_or_else(|e| invalid(name, e));
            register(&registry, metric)
        };
        let counters = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| invalid(name, e));
            register(&registry, metric)
        };
        let gauge = |name: &str, help: &str| {
            let metric = IntGauge::new(name, help).unwrap_or_else(|e| invalid(name, e));
            register(&registry, metric)
        };
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| invalid(name, e));
            register(&registry, metric)
        };
        let histograms = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            let metric = HistogramVec::new(opts, labels).unwrap_or_else(|e| invalid(name, e));
            register(&registry, metric)
        };
        let build = gauges(
            "reimage_build_info",
            "The agent's version (the value is always 1).",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Metrics {
            operations: counters(
                "reimage_operations_total",
                "Operations that ended, by kind, status and error code.",
                &["kind", "status", "code"],
            ),
            bytes_downloaded: counter(
                "reimage_bytes_downloaded_total",
                "Bytes received from image servers.",
            ),
            bytes_written: counter(
                "reimage_bytes_written_total",
                "Bytes of images written to the target disk.",
            ),
            bytes_unchanged: counter(
                "reimage_bytes_unchanged_total",
                "Bytes a write through a block index found on the target already, neither fetched nor written.",
            ),
            http_retries: counter(
                "reimage_http_retries_total",
                "Image downloads interrupted and retried or resumed.",
            ),
            readback_mismatches: counter(
                "reimage_readback_mismatches_total",
                "Writes whose read-back differed from what was written.",
            ),
            tasks: counters(
                "reimage_tasks_total",
                "Task transitions, by the state entered (active when requeued).",
                &["state"],
            ),
            operation_duration: histograms(
                "reimage_operation_duration_seconds",
                "How long operations took, from acceptance to their end.",
                &["kind", "status"],
                DURATION_BUCKETS,
            ),
            phase_duration: histograms(
                "reimage_phase_duration_seconds",
                "How long each phase of an operation took.",
                &["phase"],
                DURATION_BUCKETS,
            ),
            last_operation: gauges(
                "reimage_last_operation_timestamp_seconds",
                "When an operation last ended, by status.",
                &["status"],
            ),
            api_requests: counters(
                "reimage_api_requests_total",
                "API requests answered, by method, route and status.",
                &["method", "route", "status"],
            ),
            api_request_duration: histograms(
                "reimage_api_request_duration_seconds",
                "API request latencies, by route.",
                &["route"],
                REQUEST_BUCKETS,
            ),
            node_state: gauges(
                "reimage_node_state",
                "1 for the node's state, 0 for the others.",
                &["state"],
            ),
            scheduling_state: gauges(
                "reimage_scheduling_state",
                "1 for the node's scheduling state, 0 for the other.",
                &["state"],
            ),
            operation_phase: gauges(
                "reimage_operation_phase",
                "1 for the phase of the operation in progress.",
                &["phase"],
            ),
            progress_bytes: gauge(
                "reimage_operation_progress_bytes",
                "Bytes moved by the current phase of the operation in progress.",
            ),
            progress_total_bytes: gauge(
                "reimage_operation_progress_total_bytes",
                "Bytes the current phase will move (0 when unknown).",
            ),
            tasks_by_state: gauges("reimage_tasks", "Tasks now in each state.", &["state"]),
            retained_bytes: gauge(
                "reimage_retained_bytes",
                "Bytes held by completed tasks' retained files.",
            ),
            staged_images: gauge(
                "reimage_staged_images",
                "Images prefetched into the staging area, waiting for a reimage.",
            ),
            staged_bytes: gauge(
                "reimage_staged_bytes",
                "Bytes the prefetched images take in the staging area, as fetched.",
            ),
            registry,
        }
    }

    /// Every metric in Prometheus's text format (0.0.4).
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(%err, "encoding the metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    if let Err(err) = registry.register(Box::new(metric.clone())) {
        // Names are constants: only a bug (a name given twice) gets here.
        tracing::error!(%err, "registering a metric");
    }
    metric
}

/// A metric name or label set the library refuses: a bug in this file.
fn invalid<T>(name: &str, err: prometheus::Error) -> T {
    panic!("metric {name} is not valid: {err}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported_with_its_type() {
        let metrics = Metrics::new();
        metrics
            .operations
            .with_label_values(&["reimage", "Failed", "DiskBusy"])
            .inc();
        metrics.bytes_written.inc_by(4096);
        let text = metrics.render();
        assert!(
            text.contains("# TYPE reimage_operations_total counter"),
            "{text}"
        );
        assert!(
            text.contains(
                r#"reimage_operations_total{code="DiskBusy",kind="reimage",status="Failed"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("reimage_bytes_written_total 4096"), "{text}");
        assert!(text.contains(&format!(
            "reimage_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
    }
}
