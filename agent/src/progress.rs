//! Progress of a write: measured here, shown by the caller (a TTY bar,
//! JSON lines on `--progress-fd`, an operation's `progress`).

use reimage_protocol::{Phase, WriteProgress};
use std::time::{Duration, Instant};

/// Reports are spaced at least this far apart, phase changes excepted.
const REPORT_INTERVAL: Duration = Duration::from_millis(250);

/// Turns byte counts into throttled [`WriteProgress`] reports.
pub struct ProgressMeter<'a> {
    report: &'a mut dyn FnMut(&WriteProgress),
    phase: Phase,
    total: Option<u64>,
    phase_start: Instant,
    last_report: Option<Instant>,
}

impl<'a> ProgressMeter<'a> {
    /// A meter that hands its reports to `report`.
    pub fn new(report: &'a mut dyn FnMut(&WriteProgress)) -> Self {
        ProgressMeter {
            report,
            phase: Phase::Downloading,
            total: None,
            phase_start: Instant::now(),
            last_report: None,
        }
    }

    /// Starts a phase of `total` bytes (if known) and reports it at once.
    pub fn phase(&mut self, phase: Phase, total: Option<u64>) {
        self.phase = phase;
        self.total = total;
        self.phase_start = Instant::now();
        self.last_report = None;
        self.update(0);
    }

    /// Reports `done` bytes of the current phase, unless one was just sent.
    pub fn update(&mut self, done: u64) {
        let now = Instant::now();
        if self
            .last_report
            .is_some_and(|last| now.duration_since(last) < REPORT_INTERVAL)
        {
            return;
        }
        self.last_report = Some(now);
        self.send(done, now);
    }

    /// Reports `done` bytes now, whatever the interval (end of a phase).
    pub fn finish_phase(&mut self, done: u64) {
        self.send(done, Instant::now());
    }

    fn send(&mut self, done: u64, now: Instant) {
        let elapsed = now.duration_since(self.phase_start).as_secs_f64();
        let rate = if elapsed > 0.0 {
            (done as f64 / elapsed) as u64
        } else {
            0
        };
        (self.report)(&WriteProgress {
            phase: self.phase,
            bytes_written: done,
            total_bytes: self.total,
            bytes_per_second: rate,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_are_throttled_but_phases_and_ends_are_not() {
        let mut seen = Vec::new();
        let mut record = |p: &WriteProgress| seen.push((p.phase, p.bytes_written));
        {
            let mut meter = ProgressMeter::new(&mut record);
            meter.phase(Phase::Downloading, Some(100));
            for done in 1..50 {
                meter.update(done);
            }
            meter.finish_phase(100);
            meter.phase(Phase::Verifying, Some(100));
        }
        assert_eq!(seen.first(), Some(&(Phase::Downloading, 0)));
        assert!(seen.len() < 10, "throttled: {seen:?}");
        assert!(seen.contains(&(Phase::Downloading, 100)));
        assert_eq!(seen.last(), Some(&(Phase::Verifying, 0)));
    }
}
