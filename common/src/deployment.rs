//! Deployments and the replicas placed for them, as the control plane
//! records them. A `Deployment` says what should run ("3 replicas of
//! llama:v2, 1 GPU and 20 GiB each"), with numbered revisions for rollback.
//! A `Replica` is one placement: which node and which GPUs one copy got,
//! and whether it should keep running. What a replica is doing (its phase,
//! pid, port) is observed by its agent and never stored here.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::names::{validate_labels, validate_name, validate_version};
use crate::{Labels, ResourceOverrides, Resources, ValidationError};

/// The most replicas one deployment may ask for.
pub const MAX_REPLICAS: u32 = 1000;
/// The longest deployment name: replica ids add `-<n>` and stay within 63.
pub const MAX_DEPLOYMENT_NAME: usize = 52;
/// Priorities range from -1000 to 1000 (higher is placed first and may preempt lower).
pub const MAX_PRIORITY: i32 = 1000;
/// Revisions kept for rollback.
pub const MAX_REVISIONS: usize = 10;

/// How a deployment's replicas are spread over nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlacementPolicy {
    /// Fragmentation-aware: keep whole GPUs and whole nodes free, then pack.
    #[default]
    Default,
    /// Fullest nodes first.
    Binpack,
    /// Emptiest nodes first.
    Spread,
}

impl PlacementPolicy {
    /// Parses `default`, `binpack` or `spread`.
    pub fn parse(text: &str) -> Result<Self, ValidationError> {
        match text {
            "" | "default" => Ok(PlacementPolicy::Default),
            "binpack" => Ok(PlacementPolicy::Binpack),
            "spread" => Ok(PlacementPolicy::Spread),
            other => Err(ValidationError::new(
                "policy",
                other,
                "must be default, binpack or spread",
            )),
        }
    }

    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            PlacementPolicy::Default => "default",
            PlacementPolicy::Binpack => "binpack",
            PlacementPolicy::Spread => "spread",
        }
    }
}

impl fmt::Display for PlacementPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a deployment asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentSpec {
    /// The model.
    pub model: String,
    /// Its version.
    pub version: String,
    /// How many replicas.
    pub replicas: u32,
    /// What each replica needs.
    pub resources: Resources,
    /// How replicas are spread.
    pub policy: PlacementPolicy,
    /// Labels a node must carry.
    pub selector: Labels,
    /// GPU model the node's GPUs must be.
    pub gpu_model: Option<String>,
    /// Higher is placed first and may preempt lower.
    pub priority: i32,
    /// Extra replicas a rollout may start above `replicas`.
    pub max_surge: u32,
    /// Replicas a rollout may take down below `replicas`.
    pub max_unavailable: u32,
}

impl DeploymentSpec {
    /// Checks every field that does not depend on the registry.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_name("model", &self.model)?;
        validate_version("version", &self.version)?;
        if self.replicas > MAX_REPLICAS {
            return Err(ValidationError::new(
                "replicas",
                self.replicas,
                format!("must be between 0 and {MAX_REPLICAS}"),
            ));
        }
        self.resources.validate()?;
        validate_labels("selector", &self.selector)?;
        if let Some(m) = &self.gpu_model
            && (m.is_empty() || m.len() > 64 || m.chars().any(char::is_control))
        {
            return Err(ValidationError::new(
                "gpu_model",
                m,
                "must be 1-64 characters without control characters, e.g. A100-80GB",
            ));
        }
        if self.priority.abs() > MAX_PRIORITY {
            return Err(ValidationError::new(
                "priority",
                self.priority,
                format!("must be between -{MAX_PRIORITY} and {MAX_PRIORITY}"),
            ));
        }
        for (field, v) in [
            ("max_surge", self.max_surge),
            ("max_unavailable", self.max_unavailable),
        ] {
            if v > MAX_REPLICAS {
                return Err(ValidationError::new(
                    field,
                    v,
                    format!("must be between 0 and {MAX_REPLICAS}"),
                ));
            }
        }
        if self.max_surge == 0 && self.max_unavailable == 0 {
            return Err(ValidationError::new(
                "max_unavailable",
                0,
                "max_surge and max_unavailable cannot both be 0: a rollout could never make progress",
            ));
        }
        Ok(())
    }
}

/// A deployment as asked for: resource fields left out come from the model
/// version's defaults when the deployment is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRequest {
    /// The model.
    pub model: String,
    /// Its version.
    pub version: String,
    /// How many replicas.
    pub replicas: u32,
    /// Resource fields that differ from the version's defaults.
    pub resources: ResourceOverrides,
    /// How replicas are spread.
    pub policy: PlacementPolicy,
    /// Labels a node must carry.
    pub selector: Labels,
    /// GPU model the node's GPUs must be.
    pub gpu_model: Option<String>,
    /// Higher is placed first and may preempt lower.
    pub priority: i32,
    /// Extra replicas a rollout may start above `replicas`.
    pub max_surge: u32,
    /// Replicas a rollout may take down below `replicas`.
    pub max_unavailable: u32,
}

impl Deployment {
    /// Whether a rollout is under way among `replicas` (this deployment's
    /// records): some that count still run an older revision.
    pub fn rolling<'a>(&self, mut replicas: impl Iterator<Item = &'a Replica>) -> bool {
        replicas.any(|r| r.deployment == self.name && r.counts() && r.revision != self.revision)
    }
}

impl DeploymentRequest {
    /// The spec, given the model version's default resources.
    pub fn resolve(&self, version_defaults: Resources) -> DeploymentSpec {
        DeploymentSpec {
            model: self.model.clone(),
            version: self.version.clone(),
            replicas: self.replicas,
            resources: self.resources.over(version_defaults),
            policy: self.policy,
            selector: self.selector.clone(),
            gpu_model: self.gpu_model.clone(),
            priority: self.priority,
            max_surge: self.max_surge,
            max_unavailable: self.max_unavailable,
        }
    }
}

/// Checks a deployment name: a name, short enough for replica ids.
pub fn validate_deployment_name(name: &str) -> Result<(), ValidationError> {
    validate_name("name", name)?;
    if name.len() > MAX_DEPLOYMENT_NAME {
        return Err(ValidationError::new(
            "name",
            name,
            format!(
                "must be at most {MAX_DEPLOYMENT_NAME} characters (replica ids add a number to it)"
            ),
        ));
    }
    Ok(())
}

/// One numbered version of a deployment's spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    /// Its number, from 1.
    pub revision: u64,
    /// The spec.
    pub spec: DeploymentSpec,
    /// When it was made (ms since the Unix epoch, leader's clock).
    pub created_at_ms: u64,
}

/// A deployment as the control plane records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// Unique name.
    pub name: String,
    /// The current spec.
    pub spec: DeploymentSpec,
    /// The current revision's number.
    pub revision: u64,
    /// The last revisions, oldest first, the current one last.
    pub history: Vec<Revision>,
    /// When it was created.
    pub created_at_ms: u64,
    /// The number the next replica id gets (`<name>-<n>`).
    pub next_ordinal: u64,
    /// Why the rollout to the current revision is paused (a new replica
    /// failed its health probe); None while it may go on.
    pub paused: Option<String>,
}

impl DeploymentSpec {
    /// Whether replicas of `self` and `other` run the same process: the
    /// same model version and the same resources. Placement settings and
    /// the replica count do not matter.
    pub fn same_process(&self, other: &DeploymentSpec) -> bool {
        self.model == other.model
            && self.version == other.version
            && self.resources == other.resources
    }

    /// Whether `other` differs from `self` only in CPU and memory, which a
    /// running replica can change in place.
    pub fn resizable_to(&self, other: &DeploymentSpec) -> bool {
        let (a, b) = (&self.resources, &other.resources);
        self.model == other.model
            && self.version == other.version
            && a.gpus == b.gpus
            && a.gpu_memory_mib == b.gpu_memory_mib
            && a.gpu_milli == b.gpu_milli
    }
}

/// Whether a placed replica should keep running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaIntent {
    /// Run it.
    Run,
    /// Stop it and forget it (scaled down, deleted, replaced).
    Remove,
}

/// One GPU's part of a placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSlice {
    /// GPU index on the node.
    pub index: u32,
    /// Compute share, thousandths.
    pub milli: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
}

/// A replica as the control plane records it: intent, never observation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// `<deployment>-<n>`, unique.
    pub id: String,
    /// Its deployment.
    pub deployment: String,
    /// The deployment revision it runs.
    pub revision: u64,
    /// Bumped whenever what the agent must run changes.
    pub generation: u64,
    /// What it holds (its revision's resources).
    pub resources: Resources,
    /// Its node; None while it waits for a place.
    pub node: Option<String>,
    /// Its GPUs on that node.
    pub gpus: Vec<GpuSlice>,
    /// Run it, or remove it.
    pub intent: ReplicaIntent,
    /// The state version at which it was placed: an agent stops a replica
    /// missing from the desired set it hears only if that set is at least
    /// this new (an older answer may predate the placement).
    pub placed_at: u64,
    /// When it was created.
    pub created_at_ms: u64,
    /// It is moving off a draining node: a replacement was added; it stops
    /// once that one runs. It no longer counts toward its deployment.
    pub evacuating: bool,
    /// The replica this one replaces, when it was added for an evacuation.
    pub replaces: Option<String>,
}

impl Replica {
    /// Whether it waits for a place.
    pub fn pending(&self) -> bool {
        self.node.is_none() && self.intent == ReplicaIntent::Run
    }

    /// Whether it counts toward its deployment: it should run and is not
    /// moving away.
    pub fn counts(&self) -> bool {
        self.intent == ReplicaIntent::Run && !self.evacuating
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec() -> DeploymentSpec {
        DeploymentSpec {
            model: "llama".into(),
            version: "v1".into(),
            replicas: 3,
            resources: Resources::default(),
            policy: PlacementPolicy::Default,
            selector: Labels::new(),
            gpu_model: None,
            priority: 0,
            max_surge: 1,
            max_unavailable: 0,
        }
    }

    #[test]
    fn specs_are_checked() {
        assert!(spec().validate().is_ok());
        let bad = |f: fn(&mut DeploymentSpec)| {
            let mut s = spec();
            f(&mut s);
            s.validate().unwrap_err().field
        };
        assert_eq!(bad(|s| s.model = "Bad".into()), "model");
        assert_eq!(bad(|s| s.version = "bad version".into()), "version");
        assert_eq!(bad(|s| s.replicas = MAX_REPLICAS + 1), "replicas");
        assert_eq!(bad(|s| s.resources.gpus = 99), "gpus");
        assert_eq!(bad(|s| s.priority = 5000), "priority");
        assert_eq!(bad(|s| s.gpu_model = Some(String::new())), "gpu_model");
        assert_eq!(
            bad(|s| {
                s.max_surge = 0;
                s.max_unavailable = 0
            }),
            "max_unavailable"
        );
        assert_eq!(
            bad(|s| {
                s.selector.insert("bad key".into(), "x".into());
            }),
            "selector"
        );
    }

    #[test]
    fn names_and_policies() {
        assert!(validate_deployment_name("llama").is_ok());
        assert!(validate_deployment_name(&"a".repeat(53)).is_err());
        assert!(validate_deployment_name("Llama").is_err());
        assert_eq!(
            PlacementPolicy::parse("").unwrap(),
            PlacementPolicy::Default
        );
        assert_eq!(
            PlacementPolicy::parse("spread").unwrap(),
            PlacementPolicy::Spread
        );
        assert_eq!(
            PlacementPolicy::parse("random").unwrap_err().field,
            "policy"
        );
    }
}
