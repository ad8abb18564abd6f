//! A deployment's autoscaling policy: the bounds and the load per replica
//! the autoscaler aims for. The decisions themselves are the reconciler's.

use serde::{Deserialize, Serialize};

use crate::ValidationError;
use crate::deployment::MAX_REPLICAS;

/// What load one replica should carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AutoscaleTarget {
    /// Requests in flight per replica, as the gateways count them (queued
    /// in a gateway, sent and not yet answered).
    Inflight(u32),
    /// Requests the engine queues per replica (waiting for a batch slot),
    /// as the agents read them from the runtime's metrics.
    QueueDepth(u32),
}

impl AutoscaleTarget {
    /// The target's value per replica.
    pub fn per_replica(self) -> u32 {
        match self {
            AutoscaleTarget::Inflight(n) | AutoscaleTarget::QueueDepth(n) => n,
        }
    }

    /// `inflight` or `queue-depth`.
    pub fn metric(self) -> &'static str {
        match self {
            AutoscaleTarget::Inflight(_) => "inflight",
            AutoscaleTarget::QueueDepth(_) => "queue-depth",
        }
    }
}

/// The most a target per replica may be.
pub const MAX_TARGET: u32 = 100_000;
/// The longest delay a policy may set (a day).
pub const MAX_DELAY_MS: u64 = 24 * 3600 * 1000;

/// A deployment's autoscaling policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoscalePolicy {
    /// The fewest replicas while there is traffic (at least 1).
    pub min: u32,
    /// The most replicas.
    pub max: u32,
    /// The load per replica to aim for.
    pub target: AutoscaleTarget,
    /// How long load must stay low before replicas are removed (the
    /// autoscaler also waits at least the model's measured load time).
    pub scale_down_delay_ms: u64,
    /// With no traffic for this long, scale to 0 replicas (opt-in).
    pub scale_to_zero_after_ms: Option<u64>,
}

impl AutoscalePolicy {
    /// Checks every field; the error names the field and the rule.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.min == 0 {
            return Err(ValidationError::new(
                "min",
                self.min,
                "must be at least 1 (to let an idle deployment go to 0 replicas, set scale_to_zero_after)",
            ));
        }
        if self.max > MAX_REPLICAS {
            return Err(ValidationError::new(
                "max",
                self.max,
                format!("must be between 1 and {MAX_REPLICAS}"),
            ));
        }
        if self.max < self.min {
            return Err(ValidationError::new(
                "max",
                self.max,
                format!("must be at least min ({})", self.min),
            ));
        }
        let target = self.target.per_replica();
        if target == 0 || target > MAX_TARGET {
            return Err(ValidationError::new(
                match self.target {
                    AutoscaleTarget::Inflight(_) => "target_inflight",
                    AutoscaleTarget::QueueDepth(_) => "target_queue_depth",
                },
                target,
                format!("must be between 1 and {MAX_TARGET} requests per replica"),
            ));
        }
        if self.scale_down_delay_ms > MAX_DELAY_MS {
            return Err(ValidationError::new(
                "scale_down_delay",
                format!("{}ms", self.scale_down_delay_ms),
                "must be at most 24h",
            ));
        }
        if let Some(after) = self.scale_to_zero_after_ms
            && !(1000..=MAX_DELAY_MS).contains(&after)
        {
            return Err(ValidationError::new(
                "scale_to_zero_after",
                format!("{after}ms"),
                "must be between 1s and 24h",
            ));
        }
        Ok(())
    }

    /// `replicas` brought within the policy's bounds (0 stays 0 when the
    /// policy scales to zero).
    pub fn clamp(&self, replicas: u32) -> u32 {
        if replicas == 0 && self.scale_to_zero_after_ms.is_some() {
            0
        } else {
            replicas.clamp(self.min, self.max)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> AutoscalePolicy {
        AutoscalePolicy {
            min: 1,
            max: 8,
            target: AutoscaleTarget::Inflight(4),
            scale_down_delay_ms: 300_000,
            scale_to_zero_after_ms: None,
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        let bad = |f: fn(&mut AutoscalePolicy)| {
            let mut p = policy();
            f(&mut p);
            p.validate().unwrap_err().field
        };
        assert!(policy().validate().is_ok());
        assert_eq!(bad(|p| p.min = 0), "min");
        assert_eq!(bad(|p| p.max = 0), "max");
        assert_eq!(bad(|p| p.max = MAX_REPLICAS + 1), "max");
        assert_eq!(
            bad(|p| p.target = AutoscaleTarget::Inflight(0)),
            "target_inflight"
        );
        assert_eq!(
            bad(|p| p.target = AutoscaleTarget::QueueDepth(MAX_TARGET + 1)),
            "target_queue_depth"
        );
        assert_eq!(
            bad(|p| p.scale_down_delay_ms = MAX_DELAY_MS + 1),
            "scale_down_delay"
        );
        assert_eq!(
            bad(|p| p.scale_to_zero_after_ms = Some(10)),
            "scale_to_zero_after"
        );
    }

    #[test]
    fn clamp_keeps_zero_only_when_scaling_to_zero() {
        let mut p = policy();
        assert_eq!(p.clamp(0), 1);
        assert_eq!(p.clamp(20), 8);
        assert_eq!(p.clamp(3), 3);
        p.scale_to_zero_after_ms = Some(60_000);
        assert_eq!(p.clamp(0), 0);
    }
}
