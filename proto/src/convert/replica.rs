//! Replica specs and statuses on the wire.

use berth_common::{HealthProbe, ReplicaSpec, Runtime, ValidationError};

use crate::v1;

/// Builds a runtime from its name and command template, and its health probe
/// (the runtime's default when `health` is empty).
pub fn runtime_from_parts(
    runtime: &str,
    command: &str,
    health: &str,
) -> Result<(Runtime, HealthProbe), ValidationError> {
    let runtime = Runtime::parse(runtime, Some(command))?;
    let health = if health.is_empty() {
        runtime.default_probe()
    } else {
        HealthProbe::parse(health)?
    };
    Ok((runtime, health))
}

/// Builds a validated replica spec.
pub fn replica_spec_from_proto(
    spec: Option<v1::ReplicaSpec>,
) -> Result<ReplicaSpec, ValidationError> {
    let Some(spec) = spec else {
        return Err(ValidationError::new("spec", "", "is required"));
    };
    let (runtime, health) = runtime_from_parts(&spec.runtime, &spec.command, &spec.health)?;
    let Ok(port) = u16::try_from(spec.port) else {
        return Err(ValidationError::new(
            "port",
            spec.port,
            "must be between 0 and 65535 (0 lets the agent pick)",
        ));
    };
    let out = ReplicaSpec {
        id: spec.id,
        generation: spec.generation,
        model: spec.model,
        runtime,
        source: spec.source,
        port,
        gpus: spec.gpus,
        resources: super::resources_from_proto(spec.resources),
        env: spec.env.into_iter().collect(),
        health,
    };
    out.validate()?;
    Ok(out)
}

impl From<&ReplicaSpec> for v1::ReplicaSpec {
    fn from(s: &ReplicaSpec) -> Self {
        v1::ReplicaSpec {
            id: s.id.clone(),
            generation: s.generation,
            model: s.model.clone(),
            runtime: s.runtime.name().to_string(),
            command: s.runtime.template().unwrap_or_default().to_string(),
            source: s.source.clone(),
            port: u32::from(s.port),
            gpus: s.gpus.clone(),
            resources: Some(s.resources.into()),
            env: s.env.clone().into_iter().collect(),
            health: s.health.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_common::Resources;

    fn spec() -> v1::ReplicaSpec {
        v1::ReplicaSpec {
            id: "demo-1".into(),
            generation: 1,
            model: "demo".into(),
            runtime: "demo".into(),
            source: "builtin:demo".into(),
            ..Default::default()
        }
    }

    #[test]
    fn specs_round_trip_and_fill_defaults() {
        let s = replica_spec_from_proto(Some(spec())).unwrap();
        assert_eq!(
            s.health,
            HealthProbe::Http {
                path: "/health".into()
            }
        );
        assert_eq!(s.resources, Resources::default());
        let back = replica_spec_from_proto(Some((&s).into())).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn bad_specs_name_the_field() {
        let field = |f: fn(&mut v1::ReplicaSpec)| {
            let mut p = spec();
            f(&mut p);
            replica_spec_from_proto(Some(p)).unwrap_err().field
        };
        assert_eq!(field(|p| p.runtime = "onnx".into()), "runtime");
        assert_eq!(field(|p| p.runtime = "command".into()), "command");
        assert_eq!(field(|p| p.port = 70000), "port");
        assert_eq!(field(|p| p.gpus = vec![0]), "gpus");
        assert_eq!(field(|p| p.generation = 0), "generation");
        assert_eq!(replica_spec_from_proto(None).unwrap_err().field, "spec");
    }
}
