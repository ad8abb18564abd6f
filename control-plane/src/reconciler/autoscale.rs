//! The autoscaler's decision: a pure function of a deployment's policy, its
//! count, the load signals seen so far and the time (passed in). The leader
//! feeds it once a second (`AutoscaleLoop` in `autoscaler`); `berth sim`
//! style replays and the tests below feed it directly.
//!
//! The rules, against the failures users report of other autoscalers:
//!
//! * desired = ceil(load / target) over a 60 s stable window; a 6 s panic
//!   window that reaches 2× the target per replica of the current count
//!   switches to panic mode for a stable window, during which the count
//!   never goes down;
//! * within a 10 % tolerance of the target the count holds (in panic mode
//!   too), and one decision at most doubles it;
//! * the count includes starting replicas, so a slow load does not cause
//!   a second scale-up for the same load (no "scale-up that ignores how
//!   long a model takes to load");
//! * scale-down goes to the highest count recommended over the last
//!   max(scale-down delay, measured load time) — a square wave shorter than
//!   that never shrinks the deployment (no flapping);
//! * a count that cannot be placed holds, with the scheduler's reason, and
//!   is not raised further;
//! * no scale-down while a replica's KV cache is nearly full (an engine
//!   out of cache preempts or queues, whatever the request count says);
//! * no fresh signal holds, and says so.

use std::collections::VecDeque;

use berth_common::{AutoscalePolicy, AutoscaleTarget};

/// The stable window, ms.
pub const STABLE_WINDOW_MS: u64 = 60_000;
/// The panic window, ms.
pub const PANIC_WINDOW_MS: u64 = 6_000;
/// Panic starts when the panic window's load reaches this many times what
/// the current count should carry.
pub const PANIC_THRESHOLD: f64 = 2.0;
/// Within this fraction of the target the count holds.
pub const TOLERANCE: f64 = 0.1;
/// One decision multiplies the count by at most this.
pub const MAX_UP_FACTOR: u32 = 2;
/// KV cache use (thousandths) from which the count does not go down.
pub const KV_FULL_MILLI: u32 = 900;

/// What the autoscaler knows of a deployment at one tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Inputs {
    /// The policy.
    pub policy: AutoscalePolicy,
    /// The replica count asked for now: starting replicas count as capacity.
    pub current: u32,
    /// The load now, in the policy's metric, summed over the deployment;
    /// `None` when no signal is fresh.
    pub load: Option<f64>,
    /// Replicas of the current count that cannot be placed, and why.
    pub unplaced: Option<(u32, String)>,
    /// The model's measured time from spawn to ready, ms (0 when unknown).
    pub load_time_ms: u64,
    /// The fullest KV cache among its replicas, in thousandths, when their
    /// engines report it.
    pub kv_cache_milli: Option<u32>,
}

/// What the autoscaler decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Keep the count; why, for people.
    Hold(String),
    /// The count should grow but cannot: the condition, naming what is missing.
    Blocked(String),
    /// Change the count.
    Scale {
        /// The new count.
        to: u32,
        /// The inputs that led here, for the event.
        reason: String,
    },
}

/// The signals seen of one deployment: the windows the decision averages
/// over, and what it recommended over the scale-down delay.
#[derive(Debug, Clone, Default)]
pub struct Window {
    samples: VecDeque<(u64, f64)>,
    recommendations: VecDeque<(u64, u32)>,
    panic_until: Option<u64>,
    first_ms: Option<u64>,
    last_busy_ms: Option<u64>,
}

fn mean(samples: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = samples.fold((0.0, 0u32), |(s, n), x| (s + x, n + 1));
    if n == 0 { 0.0 } else { sum / f64::from(n) }
}

/// ceil(load / target) as a count, saturating.
fn needed(load: f64, target: f64) -> u32 {
    let n = (load / target).ceil();
    if n.is_nan() || n <= 0.0 {
        0
    } else if n >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        n as u32
    }
}

impl Window {
    /// Whether the panic window is in force at `now_ms`.
    pub fn panicking(&self, now_ms: u64) -> bool {
        self.panic_until.is_some_and(|u| now_ms < u)
    }

    /// How long load must stay low before the count goes down, ms.
    pub fn scale_down_wait_ms(inputs: &Inputs) -> u64 {
        inputs.policy.scale_down_delay_ms.max(inputs.load_time_ms)
    }

    /// One tick: records the load and decides. Pure: the same inputs in
    /// the same order give the same decisions.
    pub fn decide(&mut self, inputs: &Inputs, now_ms: u64) -> Decision {
        let p = &inputs.policy;
        let current = inputs.current;
        let metric = match p.target {
            AutoscaleTarget::Inflight(_) => "in flight",
            AutoscaleTarget::QueueDepth(_) => "queued in the engines",
        };
        let Some(load) = inputs.load.filter(|l| l.is_finite() && *l >= 0.0) else {
            return Decision::Hold(format!(
                "no fresh load signal (no gateway or agent reported this deployment's load in the last few seconds): holding at {current}"
            ));
        };
        let first = *self.first_ms.get_or_insert(now_ms);
        self.samples.push_back((now_ms, load));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| *t + STABLE_WINDOW_MS <= now_ms)
        {
            self.samples.pop_front();
        }
        if load > 0.0 {
            self.last_busy_ms = Some(now_ms);
        }
        let target = f64::from(p.target.per_replica());
        let stable = mean(self.samples.iter().map(|(_, l)| *l));
        let panic = mean(
            self.samples
                .iter()
                .filter(|(t, _)| *t + PANIC_WINDOW_MS > now_ms)
                .map(|(_, l)| *l),
        );
        let capacity = f64::from(current) * target;
        // Within the tolerance the count is right: signals sampled at
        // slightly different moments add up to a little more or less than
        // the true load, and that must not move the count.
        let want_for = |load: f64| {
            if current > 0 && (load / capacity - 1.0).abs() <= TOLERANCE {
                current
            } else {
                needed(load, target)
            }
        };
        let stable_want = want_for(stable);
        if current > 0 && panic >= PANIC_THRESHOLD * capacity {
            self.panic_until = Some(now_ms + STABLE_WINDOW_MS);
        }
        let panicking = self.panicking(now_ms);
        let inputs_text = format!(
            "load {load:.1} {metric} now, {stable:.1} over 60 s, {panic:.1} over 6 s; target {} per replica{}{}",
            p.target.per_replica(),
            inputs
                .kv_cache_milli
                .map(|k| format!("; KV cache up to {:.0} %", f64::from(k) / 10.0))
                .unwrap_or_default(),
            if panicking { "; panic mode" } else { "" }
        );

        let idle_for = now_ms - self.last_busy_ms.unwrap_or(first);
        let to_zero = p
            .scale_to_zero_after_ms
            .is_some_and(|z| idle_for >= z && now_ms - first >= z);
        let mut want = if panicking {
            current.max(stable_want).max(want_for(panic))
        } else {
            stable_want
        };
        let cap = current.saturating_mul(MAX_UP_FACTOR).max(p.min);
        want = want.min(cap);
        want = if to_zero && want == 0 {
            0
        } else {
            want.clamp(p.min, p.max)
        };
        let wait = Self::scale_down_wait_ms(inputs);
        self.recommendations.push_back((now_ms, want));
        while self
            .recommendations
            .front()
            .is_some_and(|(t, _)| *t + wait < now_ms)
        {
            self.recommendations.pop_front();
        }

        if want < current {
            if panicking {
                return Decision::Hold(format!(
                    "{inputs_text}: would go to {want}, but the count never goes down in panic mode"
                ));
            }
            if inputs.kv_cache_milli.is_some_and(|k| k >= KV_FULL_MILLI) {
                return Decision::Hold(format!(
                    "{inputs_text}: would go to {want}, but a replica's KV cache is nearly full"
                ));
            }
            if want > 0 || !to_zero {
                if now_ms - first < wait {
                    return Decision::Hold(format!(
                        "{inputs_text}: would go to {want}, but load must stay low for {} s first (scale-down delay, or the model's load time if longer)",
                        wait / 1000
                    ));
                }
                let highest = self
                    .recommendations
                    .iter()
                    .map(|(_, w)| *w)
                    .max()
                    .unwrap_or(want);
                if highest >= current {
                    return Decision::Hold(format!(
                        "{inputs_text}: would go to {want}, but {highest} were needed within the last {} s",
                        wait / 1000
                    ));
                }
                want = highest;
            }
        }
        if want > current
            && let Some((n, why)) = &inputs.unplaced
            && *n > 0
        {
            return Decision::Blocked(format!(
                "wants {want} replicas ({inputs_text}), but {n} of the {current} asked for cannot be placed: {why}"
            ));
        }
        if want == current {
            return Decision::Hold(format!("{inputs_text}: {current} replicas fit"));
        }
        let why = if want == 0 {
            format!(
                "no traffic for {} s (scale to zero)",
                p.scale_to_zero_after_ms.unwrap_or_default() / 1000
            )
        } else if want == cap && want > current {
            format!("{inputs_text} (at most {MAX_UP_FACTOR}x per step)")
        } else {
            inputs_text
        };
        Decision::Scale {
            to: want,
            reason: why,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(min: u32, max: u32, delay_s: u64) -> AutoscalePolicy {
        AutoscalePolicy {
            min,
            max,
            target: AutoscaleTarget::Inflight(4),
            scale_down_delay_ms: delay_s * 1000,
            scale_to_zero_after_ms: None,
        }
    }

    /// Feeds one load a second for `seconds`, applying each decision to the
    /// count; returns the counts after each tick and the decisions.
    struct Run {
        window: Window,
        inputs: Inputs,
        now_ms: u64,
        changes: Vec<(u64, u32, u32)>,
        last: Option<Decision>,
    }

    impl Run {
        fn new(policy: AutoscalePolicy, current: u32) -> Self {
            Run {
                window: Window::default(),
                inputs: Inputs {
                    policy,
                    current,
                    load: Some(0.0),
                    unplaced: None,
                    load_time_ms: 0,
                    kv_cache_milli: None,
                },
                now_ms: 1_000_000,
                changes: Vec::new(),
                last: None,
            }
        }

        fn feed(&mut self, load: Option<f64>, seconds: u64) -> &mut Self {
            for _ in 0..seconds {
                self.inputs.load = load;
                let d = self.window.decide(&self.inputs, self.now_ms);
                if let Decision::Scale { to, .. } = &d {
                    self.changes.push((self.now_ms, self.inputs.current, *to));
                    self.inputs.current = *to;
                }
                self.last = Some(d);
                self.now_ms += 1000;
            }
            self
        }

        fn count(&self) -> u32 {
            self.inputs.current
        }
    }

    #[test]
    fn a_step_up_scales_up_doubling_at_most_and_settles() {
        let mut run = Run::new(policy(1, 8, 300), 1);
        run.feed(Some(4.0), 30);
        assert_eq!(run.count(), 1, "at target: no change");
        // 4x the load: panic (16 >= 2 x 4) within seconds, each step at most doubling.
        run.feed(Some(16.0), 10);
        assert_eq!(
            run.count(),
            4,
            "16 in flight at 4 per replica: {:?}",
            run.changes
        );
        assert!(run.changes[0].0 - run.changes.first().map_or(0, |c| c.0) < 3_000);
        for (_, from, to) in &run.changes {
            assert!(to > from && *to <= from * 2, "{:?}", run.changes);
        }
        let steps = run.changes.len();
        run.feed(Some(16.0), 300);
        assert_eq!(run.count(), 4);
        assert_eq!(
            run.changes.len(),
            steps,
            "no further change: {:?}",
            run.changes
        );
    }

    #[test]
    fn a_step_down_waits_for_the_delay_then_goes_to_what_the_load_needs() {
        let mut run = Run::new(policy(1, 8, 120), 4);
        run.feed(Some(16.0), 150);
        assert!(run.changes.is_empty(), "{:?}", run.changes);
        let drop_at = run.now_ms;
        run.feed(Some(4.0), 400);
        assert_eq!(run.count(), 1);
        let (at, _, _) = run.changes[0];
        assert!(at - drop_at >= 120_000, "waited {} ms", at - drop_at);
        // Down only, following the 60 s average as the delay lets it.
        assert!(run.changes.iter().all(|c| c.2 < c.1), "{:?}", run.changes);
        assert!(run.changes.len() <= 3, "{:?}", run.changes);
    }

    #[test]
    fn the_wait_is_at_least_the_measured_load_time() {
        let mut run = Run::new(policy(1, 8, 10), 4);
        run.inputs.load_time_ms = 90_000;
        run.feed(Some(16.0), 70);
        let drop_at = run.now_ms;
        run.feed(Some(0.0), 200);
        let (at, _, _) = run.changes[0];
        assert!(at - drop_at >= 90_000, "waited {} ms", at - drop_at);
    }

    #[test]
    fn a_square_wave_shorter_than_the_delay_does_not_flap() {
        let mut run = Run::new(policy(1, 8, 300), 1);
        // 30 minutes of 2 minutes at 12 in flight, 2 minutes at 2.
        for _ in 0..8 {
            run.feed(Some(12.0), 120).feed(Some(2.0), 120);
        }
        // Up once, to what the peaks need, and never down.
        assert!(run.changes.iter().all(|c| c.2 > c.1), "{:?}", run.changes);
        assert!(run.changes.len() <= 2, "{:?}", run.changes);
        assert_eq!(run.count(), 3);
    }

    #[test]
    fn a_burst_panics_and_panic_never_scales_down() {
        let mut run = Run::new(policy(1, 16, 0), 2);
        run.feed(Some(8.0), 60);
        run.feed(Some(40.0), 2);
        assert!(run.window.panicking(run.now_ms - 1000));
        let peak = run.count();
        assert!(peak >= 4, "{:?}", run.changes);
        // The burst ends at once; during the panic window nothing goes down.
        run.feed(Some(0.0), 50);
        assert!(run.count() >= peak, "{:?}", run.changes);
        assert!(run.changes.iter().all(|c| c.2 > c.1), "{:?}", run.changes);
        run.feed(Some(0.0), 120);
        assert_eq!(
            run.count(),
            1,
            "after panic ends, back to min: {:?}",
            run.changes
        );
    }

    #[test]
    fn jitter_within_the_tolerance_does_not_ratchet_up_in_panic_mode() {
        let mut run = Run::new(policy(1, 16, 300), 1);
        run.feed(Some(4.0), 60).feed(Some(16.0), 10);
        assert_eq!(run.count(), 4, "{:?}", run.changes);
        // Signals read at different moments: 15 to 17 for 16 in flight.
        for load in [17.0, 15.0, 17.0, 16.0].iter().cycle().take(120) {
            run.feed(Some(*load), 1);
        }
        assert_eq!(run.count(), 4, "{:?}", run.changes);
    }

    #[test]
    fn a_nearly_full_kv_cache_holds_the_count() {
        let mut run = Run::new(policy(1, 8, 0), 4);
        run.inputs.kv_cache_milli = Some(950);
        run.feed(Some(2.0), 300);
        assert_eq!(run.count(), 4, "{:?}", run.changes);
        let Some(Decision::Hold(why)) = &run.last else {
            panic!("hold: {:?}", run.last);
        };
        assert!(why.contains("KV cache is nearly full"), "{why}");
        run.inputs.kv_cache_milli = Some(400);
        run.feed(Some(2.0), 5);
        assert_eq!(run.count(), 1, "{:?}", run.changes);
    }

    #[test]
    fn a_count_that_cannot_be_placed_holds_and_says_why() {
        let mut run = Run::new(policy(1, 8, 300), 2);
        run.inputs.unplaced = Some((1, "no node has a free A100-80GB".into()));
        run.feed(Some(30.0), 30);
        assert!(run.changes.is_empty(), "{:?}", run.changes);
        let Some(Decision::Blocked(why)) = &run.last else {
            panic!("blocked: {:?}", run.last);
        };
        assert!(why.contains("no node has a free A100-80GB"), "{why}");
        assert!(why.contains("cannot be placed"), "{why}");
    }

    #[test]
    fn stale_signals_hold_and_say_so() {
        let mut run = Run::new(policy(1, 8, 0), 3);
        run.feed(None, 600);
        assert!(run.changes.is_empty());
        let Some(Decision::Hold(why)) = &run.last else {
            panic!("hold: {:?}", run.last);
        };
        assert!(why.contains("no fresh load signal"), "{why}");
    }

    #[test]
    fn min_and_max_are_respected() {
        let mut run = Run::new(policy(2, 3, 0), 2);
        run.feed(Some(400.0), 60);
        assert_eq!(run.count(), 3);
        run.feed(Some(0.0), 300);
        assert_eq!(run.count(), 2);
    }

    #[test]
    fn an_idle_deployment_goes_to_zero_and_back_on_the_first_request() {
        let mut p = policy(1, 4, 30);
        p.scale_to_zero_after_ms = Some(120_000);
        let mut run = Run::new(p, 1);
        run.feed(Some(1.0), 10).feed(Some(0.0), 119);
        assert_eq!(run.count(), 1, "not idle long enough");
        run.feed(Some(0.0), 2);
        assert_eq!(run.count(), 0);
        run.feed(Some(0.0), 60);
        assert_eq!(run.count(), 0, "stays at zero");
        // A gateway holds the first request: load 1.
        run.feed(Some(1.0), 1);
        assert_eq!(run.count(), 1, "{:?}", run.changes);
    }

    fn policies() -> impl Strategy<Value = AutoscalePolicy> {
        (
            1u32..4,
            0u32..8,
            1u32..10,
            0u64..200,
            proptest::option::of(1u64..300),
            any::<bool>(),
        )
            .prop_map(|(min, extra, target, delay, zero, queue)| AutoscalePolicy {
                min,
                max: min + extra,
                target: if queue {
                    AutoscaleTarget::QueueDepth(target)
                } else {
                    AutoscaleTarget::Inflight(target)
                },
                scale_down_delay_ms: delay * 1000,
                scale_to_zero_after_ms: zero.map(|z| z * 1000),
            })
    }

    /// Load per second: runs of one value (or no signal) for a while.
    fn loads() -> impl Strategy<Value = Vec<(Option<f64>, u64)>> {
        proptest::collection::vec(
            (proptest::option::weighted(0.9, 0.0f64..80.0), 1u64..90),
            1..12,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn decisions_stay_in_bounds_wait_and_repeat(
            policy in policies(),
            loads in loads(),
            load_time_s in 0u64..60,
            kv in proptest::option::of(0u32..1000),
        ) {
            let start = policy.clamp(1);
            let mut run = Run::new(policy.clone(), start);
            run.inputs.load_time_ms = load_time_s * 1000;
            run.inputs.kv_cache_milli = kv;
            let wait = Window::scale_down_wait_ms(&run.inputs);
            let first = run.now_ms;
            let mut last_up = None;
            for (load, seconds) in &loads {
                for _ in 0..*seconds {
                    let panicking = run.window.panicking(run.now_ms);
                    let before = run.count();
                    run.feed(*load, 1);
                    let after = run.count();
                    let at = run.now_ms - 1000;
                    // Within [min, max], or 0 when the policy scales to zero.
                    prop_assert!(
                        (policy.min..=policy.max).contains(&after)
                            || (after == 0 && policy.scale_to_zero_after_ms.is_some()),
                        "{after} outside {}..={}", policy.min, policy.max
                    );
                    if after > before {
                        last_up = Some(at);
                        prop_assert!(after <= before.saturating_mul(MAX_UP_FACTOR).max(policy.min));
                    }
                    if after < before && after > 0 {
                        prop_assert!(!panicking, "scaled down in panic mode");
                        prop_assert!(run.inputs.kv_cache_milli.is_none_or(|k| k < KV_FULL_MILLI));
                        prop_assert!(at - first >= wait, "down {} ms after the start", at - first);
                        if let Some(up) = last_up {
                            prop_assert!(at - up >= wait, "down {} ms after an up", at - up);
                        }
                    }
                }
            }
            // The same inputs give the same decisions.
            let mut again = Run::new(policy, start);
            again.inputs.load_time_ms = load_time_s * 1000;
            again.inputs.kv_cache_milli = kv;
            for (load, seconds) in &loads {
                again.feed(*load, *seconds);
            }
            prop_assert_eq!(&again.changes, &run.changes);
        }
    }
}
