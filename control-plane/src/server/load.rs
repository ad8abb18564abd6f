//! How busy the member's async worker threads are: sampled from tokio's
//! per-worker busy time, exported at `/metrics`, and warned about when it
//! stays high. A member runs one worker by default (`--worker-threads`), so
//! this is how an operator learns that a large fleet needs more.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How often the busy ratio is sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// A sample at or above this counts as busy.
const BUSY: f64 = 0.8;
/// Consecutive busy samples before a warning.
const BUSY_SAMPLES: u32 = 3;
/// The shortest time between two warnings.
const WARN_EVERY: Duration = Duration::from_secs(600);

/// The last sampled ratio, as `f64` bits; `u64::MAX` (a NaN) before the first.
static LAST: AtomicU64 = AtomicU64::new(u64::MAX);

/// The share of the last sample window the workers spent running tasks
/// (0 to 1), once `watch` has sampled; `None` where nothing watches (the
/// members of `berth dev` share the CLI's runtime).
pub fn busy_ratio() -> Option<f64> {
    let v = f64::from_bits(LAST.load(Ordering::Relaxed));
    (!v.is_nan()).then_some(v)
}

/// Samples the current runtime's load until `shutdown`.
pub fn watch(shutdown: CancellationToken) {
    let handle = tokio::runtime::Handle::current();
    tokio::spawn(async move {
        let metrics = handle.metrics();
        let workers = metrics.num_workers();
        let busy_total = || {
            (0..workers)
                .map(|w| metrics.worker_total_busy_duration(w))
                .sum::<Duration>()
        };
        let mut warn = Warn::default();
        let mut before = (Instant::now(), busy_total());
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SAMPLE_EVERY) => {}
            }
            let now = (Instant::now(), busy_total());
            let r = ratio(now.1.saturating_sub(before.1), now.0 - before.0, workers);
            before = now;
            LAST.store(r.to_bits(), Ordering::Relaxed);
            if warn.observe(r, now.0) {
                tracing::warn!(
                    workers,
                    busy_percent = (r * 100.0).round(),
                    "the member's worker threads have been busy for {}s: requests and heartbeats wait for a thread; give it more with --worker-threads (now {workers})",
                    (SAMPLE_EVERY * BUSY_SAMPLES).as_secs()
                );
            }
        }
    });
}

/// Busy time over the time the `workers` threads had.
fn ratio(busy: Duration, elapsed: Duration, workers: usize) -> f64 {
    let had = elapsed.as_secs_f64() * workers.max(1) as f64;
    if had <= 0.0 {
        return 0.0;
    }
    (busy.as_secs_f64() / had).clamp(0.0, 1.0)
}

/// When to warn: after `BUSY_SAMPLES` busy samples in a row, and then not
/// again for `WARN_EVERY`.
#[derive(Default)]
struct Warn {
    streak: u32,
    last: Option<Instant>,
}

impl Warn {
    fn observe(&mut self, ratio: f64, now: Instant) -> bool {
        if ratio < BUSY {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        let quiet = self
            .last
            .is_none_or(|at| now.duration_since(at) >= WARN_EVERY);
        if self.streak >= BUSY_SAMPLES && quiet {
            self.last = Some(now);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_is_busy_time_over_thread_time() {
        let s = Duration::from_secs;
        assert_eq!(ratio(s(5), s(10), 1), 0.5);
        assert_eq!(ratio(s(5), s(10), 2), 0.25);
        assert_eq!(ratio(s(30), s(10), 2), 1.0, "clamped");
        assert_eq!(ratio(s(1), Duration::ZERO, 1), 0.0);
    }

    #[test]
    fn warns_after_a_busy_streak_then_stays_quiet_for_a_while() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = Warn::default();
        assert!(!w.observe(0.9, at(0)));
        assert!(!w.observe(0.9, at(10)));
        assert!(w.observe(0.9, at(20)), "third busy sample in a row");
        assert!(!w.observe(0.9, at(30)), "quiet after a warning");
        assert!(!w.observe(0.1, at(40)), "an idle sample ends the streak");
        assert!(!w.observe(0.9, at(650)));
        assert!(!w.observe(0.9, at(660)));
        assert!(
            w.observe(0.95, at(670)),
            "a new streak after the quiet time"
        );
    }

    #[test]
    fn a_blocked_worker_counts_as_busy() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let m = rt.metrics();
        let before = m.worker_total_busy_duration(0);
        rt.block_on(async {
            tokio::spawn(async { std::thread::sleep(Duration::from_millis(300)) })
                .await
                .unwrap();
        });
        // A worker reports its busy time when it next parks; the deadline
        // only bounds a hang.
        let deadline = Instant::now() + Duration::from_secs(10);
        while m.worker_total_busy_duration(0) - before < Duration::from_millis(300) {
            assert!(
                Instant::now() < deadline,
                "busy time never covered the blocked task"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
