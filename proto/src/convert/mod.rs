//! Protobuf ⇄ domain conversions. Inbound conversions validate and fill the
//! documented defaults; outbound ones cannot fail. Models here; nodes in
//! `node`, replicas in `replica`.

use berth_common::names::DEFAULT_VERSION;
use berth_common::{Model, ModelVersion, ModelVersionSpec, Resources, ValidationError};

use crate::v1;

mod deployment;
mod node;
mod replica;

pub use deployment::{autoscale_policy_from_proto, deployment_request_from_proto};
pub use node::{inventory_from_proto, registration_from_proto};
pub use replica::{replica_spec_from_proto, runtime_from_parts};

impl From<Resources> for v1::Resources {
    fn from(r: Resources) -> Self {
        v1::Resources {
            cpu_milli: r.cpu_milli,
            memory_mib: r.memory_mib,
            gpus: r.gpus,
            gpu_memory_mib: r.gpu_memory_mib,
            gpu_milli: r.gpu_milli,
        }
    }
}

/// Resources from the wire, none meaning the defaults; GPUs asked for
/// without a share get whole GPUs.
pub fn resources_from_proto(r: Option<v1::Resources>) -> Resources {
    let mut resources: Resources = r.map(Into::into).unwrap_or_default();
    if resources.gpus > 0 && resources.gpu_milli == 0 {
        resources.gpu_milli = berth_common::resources::WHOLE_GPU_MILLI;
    }
    resources
}

impl From<v1::Resources> for Resources {
    fn from(r: v1::Resources) -> Self {
        Resources {
            cpu_milli: r.cpu_milli,
            memory_mib: r.memory_mib,
            gpus: r.gpus,
            gpu_memory_mib: r.gpu_memory_mib,
            gpu_milli: r.gpu_milli,
        }
    }
}

/// Builds a validated version spec, filling defaults: version `v1`, the
/// runtime's health probe, 1 CPU and 1GiB without GPU, and a whole-GPU share
/// when GPUs are asked for without one.
pub fn version_spec_from_proto(
    spec: Option<v1::ModelVersionSpec>,
) -> Result<ModelVersionSpec, ValidationError> {
    let Some(spec) = spec else {
        return Err(ValidationError::new(
            "version",
            "",
            "is required: give runtime, source and resources of the first version",
        ));
    };
    let (runtime, health) = runtime_from_parts(&spec.runtime, &spec.command, &spec.health)?;
    let out = ModelVersionSpec {
        version: if spec.version.is_empty() {
            DEFAULT_VERSION.to_string()
        } else {
            spec.version
        },
        runtime,
        source: spec.source,
        resources: resources_from_proto(spec.resources),
        env: spec.env.into_iter().collect(),
        health,
        labels: spec.labels.into_iter().collect(),
    };
    out.validate()?;
    Ok(out)
}

impl From<&ModelVersionSpec> for v1::ModelVersionSpec {
    fn from(s: &ModelVersionSpec) -> Self {
        v1::ModelVersionSpec {
            version: s.version.clone(),
            runtime: s.runtime.name().to_string(),
            command: s.runtime.template().unwrap_or_default().to_string(),
            source: s.source.clone(),
            resources: Some(s.resources.into()),
            env: s.env.clone().into_iter().collect(),
            health: s.health.to_string(),
            labels: s.labels.clone().into_iter().collect(),
        }
    }
}

impl From<&ModelVersion> for v1::ModelVersion {
    fn from(v: &ModelVersion) -> Self {
        v1::ModelVersion {
            spec: Some((&v.spec).into()),
            created_at_ms: v.created_at_ms,
        }
    }
}

impl From<&Model> for v1::Model {
    fn from(m: &Model) -> Self {
        v1::Model {
            name: m.name.clone(),
            versions: m.versions.values().map(Into::into).collect(),
            created_at_ms: m.created_at_ms,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_common::HealthProbe;

    fn spec() -> v1::ModelVersionSpec {
        v1::ModelVersionSpec {
            runtime: "vllm".into(),
            source: "/models/llama".into(),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_filled() {
        let s = version_spec_from_proto(Some(spec())).unwrap();
        assert_eq!(s.version, "v1");
        assert_eq!(s.resources, Resources::default());
        assert_eq!(
            s.health,
            HealthProbe::Http {
                path: "/health".into()
            }
        );
        let mut p = spec();
        p.resources = Some(v1::Resources {
            gpus: 2,
            cpu_milli: 1000,
            memory_mib: 1024,
            ..Default::default()
        });
        assert_eq!(
            version_spec_from_proto(Some(p))
                .unwrap()
                .resources
                .gpu_milli,
            1000
        );
    }

    #[test]
    fn bad_fields_are_named() {
        assert_eq!(version_spec_from_proto(None).unwrap_err().field, "version");
        let mut p = spec();
        p.runtime = "onnx".into();
        assert_eq!(
            version_spec_from_proto(Some(p)).unwrap_err().field,
            "runtime"
        );
        let mut p = spec();
        p.health = "nope".into();
        assert_eq!(
            version_spec_from_proto(Some(p)).unwrap_err().field,
            "health"
        );
    }

    #[test]
    fn round_trip() {
        let s = version_spec_from_proto(Some(spec())).unwrap();
        let back = version_spec_from_proto(Some((&s).into())).unwrap();
        assert_eq!(s, back);
    }
}
