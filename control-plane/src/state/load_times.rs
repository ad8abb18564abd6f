//! Measured load times: how long a model's replicas take from spawn to
//! ready, per model and node class (the GPU model, or `cpu`). The
//! autoscaler waits at least this long before it scales down, and the
//! gateway holds requests for a cold deployment at least this long.

use serde::{Deserialize, Serialize};

use super::{ClusterState, Outcome, Rejection};

/// One replica's measured time from spawn to ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadTimeSample {
    /// The model.
    pub model: String,
    /// The node class it ran on.
    pub node_class: String,
    /// Spawn to ready, ms.
    pub ms: u64,
}

/// The estimate for one model on one node class.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadTime {
    /// The estimate, ms: the mean of the first samples, then an
    /// exponentially weighted mean (weight 1/4 for each new sample).
    pub estimate_ms: u64,
    /// The slowest load seen, ms.
    pub max_ms: u64,
    /// The samples seen.
    pub samples: u64,
    /// The last sample, ms.
    pub last_ms: u64,
}

/// Samples after which the estimate becomes a moving average.
const MEAN_OF_FIRST: u64 = 4;
/// A load time above this is not believed (a stuck clock or report), ms.
pub const MAX_LOAD_MS: u64 = 24 * 3600 * 1000;

impl LoadTime {
    fn add(&mut self, ms: u64) {
        self.samples += 1;
        self.estimate_ms = if self.samples <= MEAN_OF_FIRST {
            (self.estimate_ms * (self.samples - 1) + ms) / self.samples
        } else {
            (self.estimate_ms * 3 + ms) / 4
        };
        self.max_ms = self.max_ms.max(ms);
        self.last_ms = ms;
    }
}

/// Records samples of models that still exist; others are skipped.
pub(super) fn record(
    state: &mut ClusterState,
    samples: Vec<LoadTimeSample>,
) -> Result<Outcome, Rejection> {
    for s in samples {
        if s.ms > MAX_LOAD_MS || !state.models.contains_key(&s.model) {
            continue;
        }
        state
            .load_times
            .entry(s.model)
            .or_default()
            .entry(s.node_class)
            .or_default()
            .add(s.ms);
    }
    Ok(Outcome::Noop)
}

/// The estimate the autoscaler and the gateway use for a model: the
/// largest over its node classes (a replica may land on the slowest), ms.
pub fn estimate_ms(state: &ClusterState, model: &str) -> Option<u64> {
    state
        .load_times
        .get(model)?
        .values()
        .map(|t| t.estimate_ms)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_is_a_mean_then_a_moving_average() {
        let mut t = LoadTime::default();
        for ms in [1000, 3000] {
            t.add(ms);
        }
        assert_eq!(t.estimate_ms, 2000);
        t.add(2000);
        t.add(2000);
        assert_eq!(t.estimate_ms, 2000);
        t.add(6000);
        assert_eq!(t.estimate_ms, 3000);
        assert_eq!((t.max_ms, t.samples, t.last_ms), (6000, 5, 6000));
    }
}
