//! Deployments on the wire.

use berth_common::deployment::validate_deployment_name;
use berth_common::names::{validate_labels, validate_version};
use berth_common::{
    AutoscalePolicy, AutoscaleTarget, Deployment, DeploymentRequest, DeploymentSpec,
    PlacementPolicy, ResourceOverrides, ValidationError,
};

use crate::v1;

/// The default `max_surge` of a new deployment.
pub const DEFAULT_MAX_SURGE: u32 = 1;

impl From<v1::ResourceOverrides> for ResourceOverrides {
    fn from(r: v1::ResourceOverrides) -> Self {
        ResourceOverrides {
            cpu_milli: r.cpu_milli,
            memory_mib: r.memory_mib,
            gpus: r.gpus,
            gpu_memory_mib: r.gpu_memory_mib,
            gpu_milli: r.gpu_milli,
        }
    }
}

/// Builds a deployment request (name and what it asks for). An empty
/// version stays empty: the model's newest is taken when it is created.
pub fn deployment_request_from_proto(
    req: v1::CreateDeploymentRequest,
) -> Result<(String, DeploymentRequest), ValidationError> {
    validate_deployment_name(&req.name)?;
    berth_common::names::validate_name("model", &req.model)?;
    if !req.version.is_empty() {
        validate_version("version", &req.version)?;
    }
    let selector = req.selector.into_iter().collect();
    validate_labels("selector", &selector)?;
    let request = DeploymentRequest {
        model: req.model,
        version: req.version,
        replicas: req.replicas,
        resources: req.resources.unwrap_or_default().into(),
        policy: PlacementPolicy::parse(&req.policy)?,
        selector,
        gpu_model: Some(req.gpu_model).filter(|m| !m.is_empty()),
        priority: req.priority,
        max_surge: req.max_surge.unwrap_or(DEFAULT_MAX_SURGE),
        max_unavailable: req.max_unavailable.unwrap_or(0),
    };
    Ok((req.name, request))
}

impl From<&DeploymentSpec> for v1::DeploymentSpec {
    fn from(s: &DeploymentSpec) -> Self {
        v1::DeploymentSpec {
            model: s.model.clone(),
            version: s.version.clone(),
            replicas: s.replicas,
            resources: Some(s.resources.into()),
            policy: s.policy.as_str().into(),
            selector: s.selector.clone().into_iter().collect(),
            gpu_model: s.gpu_model.clone().unwrap_or_default(),
            priority: s.priority,
            max_surge: s.max_surge,
            max_unavailable: s.max_unavailable,
        }
    }
}

impl From<&Deployment> for v1::Deployment {
    fn from(d: &Deployment) -> Self {
        v1::Deployment {
            name: d.name.clone(),
            spec: Some((&d.spec).into()),
            revision: d.revision,
            history: d
                .history
                .iter()
                .map(|r| v1::DeploymentRevision {
                    revision: r.revision,
                    spec: Some((&r.spec).into()),
                    created_at_ms: r.created_at_ms,
                })
                .collect(),
            created_at_ms: d.created_at_ms,
            paused: d.paused.clone().unwrap_or_default(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> v1::CreateDeploymentRequest {
        v1::CreateDeploymentRequest {
            name: "chat".into(),
            model: "llama".into(),
            replicas: 2,
            ..Default::default()
        }
    }

    #[test]
    fn defaults_and_overrides() {
        let (name, d) = deployment_request_from_proto(req()).unwrap();
        assert_eq!(name, "chat");
        assert_eq!(d.version, "", "resolved when created");
        assert_eq!(d.max_surge, DEFAULT_MAX_SURGE);
        assert_eq!(d.resources, ResourceOverrides::default());
        let mut r = req();
        r.resources = Some(v1::ResourceOverrides {
            gpus: Some(2),
            ..Default::default()
        });
        r.policy = "spread".into();
        let (_, d) = deployment_request_from_proto(r).unwrap();
        assert_eq!(d.resources.gpus, Some(2));
        assert_eq!(d.policy, PlacementPolicy::Spread);
    }

    #[test]
    fn bad_fields_are_named() {
        let field = |f: fn(&mut v1::CreateDeploymentRequest)| {
            let mut r = req();
            f(&mut r);
            deployment_request_from_proto(r).unwrap_err().field
        };
        assert_eq!(field(|r| r.name = "Bad".into()), "name");
        assert_eq!(field(|r| r.model = String::new()), "model");
        assert_eq!(field(|r| r.version = "bad version".into()), "version");
        assert_eq!(field(|r| r.policy = "random".into()), "policy");
        assert_eq!(
            field(|r| {
                r.selector.insert("bad key".into(), "v".into());
            }),
            "selector"
        );
    }
}

impl From<&AutoscalePolicy> for v1::AutoscalePolicy {
    fn from(p: &AutoscalePolicy) -> Self {
        let (inflight, queue) = match p.target {
            AutoscaleTarget::Inflight(n) => (n, 0),
            AutoscaleTarget::QueueDepth(n) => (0, n),
        };
        v1::AutoscalePolicy {
            min: p.min,
            max: p.max,
            target_inflight: inflight,
            target_queue_depth: queue,
            scale_down_delay_ms: p.scale_down_delay_ms,
            scale_to_zero_after_ms: p.scale_to_zero_after_ms,
        }
    }
}

/// Reads an autoscaling policy: exactly one target, and the policy's rules.
pub fn autoscale_policy_from_proto(
    p: &v1::AutoscalePolicy,
) -> Result<AutoscalePolicy, ValidationError> {
    let target = match (p.target_inflight, p.target_queue_depth) {
        (n, 0) if n > 0 => AutoscaleTarget::Inflight(n),
        (0, n) if n > 0 => AutoscaleTarget::QueueDepth(n),
        (a, b) => {
            return Err(ValidationError::new(
                "target",
                format!("inflight {a}, queue depth {b}"),
                "set exactly one target: requests in flight per replica, or engine queue depth per replica",
            ));
        }
    };
    let policy = AutoscalePolicy {
        min: p.min,
        max: p.max,
        target,
        scale_down_delay_ms: p.scale_down_delay_ms,
        scale_to_zero_after_ms: p.scale_to_zero_after_ms,
    };
    policy.validate()?;
    Ok(policy)
}

#[cfg(test)]
mod autoscale_tests {
    use super::*;

    #[test]
    fn a_policy_round_trips_and_needs_exactly_one_target() {
        let p = AutoscalePolicy {
            min: 1,
            max: 8,
            target: AutoscaleTarget::QueueDepth(2),
            scale_down_delay_ms: 300_000,
            scale_to_zero_after_ms: Some(900_000),
        };
        let wire = v1::AutoscalePolicy::from(&p);
        assert_eq!(autoscale_policy_from_proto(&wire).unwrap(), p);
        let both = v1::AutoscalePolicy {
            target_inflight: 4,
            ..wire
        };
        assert_eq!(
            autoscale_policy_from_proto(&both).unwrap_err().field,
            "target"
        );
        let none = v1::AutoscalePolicy {
            target_inflight: 0,
            target_queue_depth: 0,
            ..both
        };
        assert_eq!(
            autoscale_policy_from_proto(&none).unwrap_err().field,
            "target"
        );
    }
}
