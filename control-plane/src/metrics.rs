//! The member's own figures, kept for the life of the process and shown on
//! its `/metrics` page beside the gauges read at scrape time
//! (`server::http`): how long writes take to be answered, how many
//! heartbeats arrive, how long reconciler passes and scheduler batches
//! take. Process-wide: one member runs per process (tests that run several
//! in one process share them).

use std::sync::OnceLock;
use std::time::Duration;

use berth_proto::call_metrics::seconds_histogram as seconds;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// How a write ended.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    /// `applied`, `rejected` (applied, and refused by validation) or
    /// `failed` (no answer from Raft: no leader, a timeout, a cut call).
    result: &'static str,
}

type Seconds = fn() -> Histogram;

struct Figures {
    writes: Family<WriteLabels, Histogram, Seconds>,
    heartbeats: Counter,
    reconciler_passes: Histogram,
    scheduler_batches: Histogram,
    scheduler_requests: Counter,
}

fn figures() -> &'static Figures {
    static FIGURES: OnceLock<Figures> = OnceLock::new();
    FIGURES.get_or_init(|| Figures {
        writes: Family::new_with_constructor(seconds as Seconds),
        heartbeats: Counter::default(),
        reconciler_passes: seconds(),
        scheduler_batches: seconds(),
        scheduler_requests: Counter::default(),
    })
}

/// A write through `Member::write` was answered after `took`.
pub fn write_answered(result: &'static str, took: Duration) {
    figures()
        .writes
        .get_or_create(&WriteLabels { result })
        .observe(took.as_secs_f64());
}

/// The leader received a heartbeat.
pub fn heartbeat_received() {
    figures().heartbeats.inc();
}

/// One pass of the replica reconciler took `took`.
pub fn reconciler_pass(took: Duration) {
    figures().reconciler_passes.observe(took.as_secs_f64());
}

/// The scheduler placed a batch of `requests` in `took`.
pub fn scheduler_batch(requests: usize, took: Duration) {
    let f = figures();
    f.scheduler_batches.observe(took.as_secs_f64());
    f.scheduler_requests.inc_by(requests as u64);
}

/// Adds the figures to `registry` (prefixed `berth`).
pub fn register(registry: &mut Registry) {
    let f = figures();
    registry.register(
        "write_duration_seconds",
        "Writes this member was asked for (API calls, the reconciler), by result, and the seconds until Raft answered",
        f.writes.clone(),
    );
    registry.register(
        "heartbeats_received",
        "Agent heartbeats this member received while it led",
        f.heartbeats.clone(),
    );
    registry.register(
        "reconciler_pass_duration_seconds",
        "Passes of the replica reconciler on the leader, and the seconds each took",
        f.reconciler_passes.clone(),
    );
    registry.register(
        "scheduler_batch_duration_seconds",
        "Batches the scheduler placed, and the seconds each took (mean time per decision: the sum over scheduler_requests_total)",
        f.scheduler_batches.clone(),
    );
    registry.register(
        "scheduler_requests",
        "Replicas the scheduler was asked to place",
        f.scheduler_requests.clone(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> String {
        let mut registry = Registry::with_prefix("berth");
        register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    /// The value of the line holding every part (label order is the
    /// encoder's); 0 when there is none yet.
    fn value(text: &str, parts: &[&str]) -> f64 {
        text.lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    #[test]
    fn figures_are_counted_and_named_in_base_units() {
        // Differences, not totals: other tests of this process may count too.
        let series: [&[&str]; 7] = [
            &["berth_write_duration_seconds_count", r#"result="applied""#],
            &[
                "berth_write_duration_seconds_bucket",
                r#"result="failed""#,
                r#"le="5.0""#,
            ],
            &[
                "berth_write_duration_seconds_bucket",
                r#"result="failed""#,
                r#"le="2.5""#,
            ],
            &["berth_heartbeats_received_total"],
            &["berth_reconciler_pass_duration_seconds_count"],
            &["berth_scheduler_batch_duration_seconds_count"],
            &["berth_scheduler_requests_total"],
        ];
        let before = page();
        write_answered("applied", Duration::from_millis(2));
        write_answered("failed", Duration::from_secs(3));
        heartbeat_received();
        reconciler_pass(Duration::from_millis(1));
        scheduler_batch(40, Duration::from_micros(900));
        let after = page();
        let added: Vec<f64> = series
            .iter()
            .map(|parts| value(&after, parts) - value(&before, parts))
            .collect();
        assert_eq!(added, [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 40.0], "{after}");
    }
}
