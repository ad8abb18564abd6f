//! Replicas as an agent runs them: the `ReplicaSpec` the control plane sends
//! (what to run, on which GPUs, with which limits) and the `ReplicaStatus`
//! the agent reports back (phase, pid, restarts).
//!
//! A spec is identified by its replica id and a generation: the same id and
//! generation always mean the same process, a higher generation replaces it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::names::{validate_env, validate_name};
use crate::{HealthProbe, Resources, Runtime, ValidationError};

/// What an agent runs for one replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaSpec {
    /// Replica id, unique in the cluster (same rules as names).
    pub id: String,
    /// Bumped by the control plane each time the replica's spec changes.
    pub generation: u64,
    /// The model it serves (for logs, env and the demo runtime).
    pub model: String,
    /// How to start it.
    pub runtime: Runtime,
    /// The model source the runtime loads.
    pub source: String,
    /// The port it listens on; 0 lets the agent pick a free one.
    pub port: u16,
    /// GPU indices on the node; as many as `resources.gpus`.
    pub gpus: Vec<u32>,
    /// CPU, memory and per-GPU memory and share.
    pub resources: Resources,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// How readiness is probed.
    pub health: HealthProbe,
}

impl ReplicaSpec {
    /// Checks every field that does not depend on the node.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_name("id", &self.id)?;
        if self.generation == 0 {
            return Err(ValidationError::new(
                "generation",
                0,
                "must be at least 1 (the control plane bumps it on every change)",
            ));
        }
        validate_name("model", &self.model)?;
        self.runtime.validate()?;
        if self.source.trim().is_empty() || self.source.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "source",
                &self.source,
                "must be a non-empty path or reference without control characters",
            ));
        }
        self.resources.validate()?;
        if self.gpus.len() != self.resources.gpus as usize {
            return Err(ValidationError::new(
                "gpus",
                format!("{:?}", self.gpus),
                format!(
                    "must list exactly resources.gpus = {} GPU indices",
                    self.resources.gpus
                ),
            ));
        }
        let mut seen = self.gpus.clone();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != self.gpus.len() {
            return Err(ValidationError::new(
                "gpus",
                format!("{:?}", self.gpus),
                "must not list a GPU twice",
            ));
        }
        validate_env("env", &self.env)
    }

    /// The fraction of each GPU's memory this replica may use (for
    /// `{gpu_memory_fraction}` and vLLM's `--gpu-memory-utilization`),
    /// given the memory of its GPUs; 0.9 for a whole GPU.
    pub fn gpu_memory_fraction(&self, gpu_memory_mib: u64) -> f64 {
        if self.resources.gpu_memory_mib == 0 || gpu_memory_mib == 0 {
            return 0.9;
        }
        (self.resources.gpu_memory_mib as f64 / gpu_memory_mib as f64).clamp(0.01, 0.95)
    }
}

/// Where a replica is in its life. Variants are only appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaPhase {
    /// Not started yet (no place, or waiting for a restart back-off).
    Pending,
    /// The process runs but its health probe has not passed yet.
    Starting,
    /// The process runs and its health probe passes.
    Running,
    /// The process exited or its probe keeps failing; the reason says which.
    Failed,
    /// Stopped on request.
    Stopped,
}

impl ReplicaPhase {
    /// The phase's name in the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaPhase::Pending => "pending",
            ReplicaPhase::Starting => "starting",
            ReplicaPhase::Running => "running",
            ReplicaPhase::Failed => "failed",
            ReplicaPhase::Stopped => "stopped",
        }
    }

    /// Parses a phase name.
    pub fn parse(text: &str) -> Result<Self, ValidationError> {
        Ok(match text {
            "pending" => ReplicaPhase::Pending,
            "starting" => ReplicaPhase::Starting,
            "running" => ReplicaPhase::Running,
            "failed" => ReplicaPhase::Failed,
            "stopped" => ReplicaPhase::Stopped,
            other => {
                return Err(ValidationError::new(
                    "phase",
                    other,
                    "must be pending, starting, running, failed or stopped",
                ));
            }
        })
    }
}

impl fmt::Display for ReplicaPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec() -> ReplicaSpec {
        ReplicaSpec {
            id: "demo-1".into(),
            generation: 1,
            model: "demo".into(),
            runtime: Runtime::Demo,
            source: "builtin:demo".into(),
            port: 0,
            gpus: vec![0],
            resources: Resources {
                gpus: 1,
                gpu_milli: 500,
                gpu_memory_mib: 20 * 1024,
                ..Resources::default()
            },
            env: BTreeMap::new(),
            health: HealthProbe::Tcp,
        }
    }

    #[test]
    fn specs_are_checked() {
        assert!(spec().validate().is_ok());
        let bad = |f: fn(&mut ReplicaSpec)| {
            let mut s = spec();
            f(&mut s);
            s.validate().unwrap_err().field
        };
        assert_eq!(bad(|s| s.id = "Bad Id".into()), "id");
        assert_eq!(bad(|s| s.generation = 0), "generation");
        assert_eq!(bad(|s| s.gpus = vec![0, 1]), "gpus");
        assert_eq!(bad(|s| s.source = String::new()), "source");
        assert_eq!(
            bad(|s| {
                s.resources.gpus = 2;
                s.resources.gpu_milli = 1000;
                s.gpus = vec![1, 1];
            }),
            "gpus"
        );
    }

    #[test]
    fn memory_fraction() {
        let s = spec();
        assert!((s.gpu_memory_fraction(80 * 1024) - 0.25).abs() < 1e-9);
        let mut whole = spec();
        whole.resources.gpu_memory_mib = 0;
        assert!((whole.gpu_memory_fraction(80 * 1024) - 0.9).abs() < 1e-9);
    }

    #[test]
    fn phases_round_trip() {
        for p in [
            ReplicaPhase::Pending,
            ReplicaPhase::Starting,
            ReplicaPhase::Running,
            ReplicaPhase::Failed,
            ReplicaPhase::Stopped,
        ] {
            assert_eq!(ReplicaPhase::parse(p.as_str()).unwrap(), p);
        }
        assert_eq!(ReplicaPhase::parse("zombie").unwrap_err().field, "phase");
    }
}
