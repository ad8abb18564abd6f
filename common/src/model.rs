//! The model registry's objects: a `Model` has named `ModelVersion`s, each
//! saying how to run it (runtime, source), what a replica needs by default
//! (resources), and how to tell it is healthy.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::names::{validate_env, validate_labels, validate_name, validate_version};
use crate::{Labels, Resources, ValidationError};

/// Runtime names accepted on the wire and the command line.
pub const RUNTIME_NAMES: [&str; 7] = [
    "vllm",
    "llama-cpp",
    "tgi",
    "sglang",
    "triton",
    "demo",
    "command",
];
/// Placeholders a `command` template may use.
pub const TEMPLATE_PLACEHOLDERS: [&str; 4] =
    ["{source}", "{port}", "{gpus}", "{gpu_memory_fraction}"];
/// The longest accepted source or command template.
pub const MAX_SOURCE_LEN: usize = 4096;

/// Where a model server reports its load: a Prometheus text endpoint on
/// its serving port, and the gauges that count the requests it queues and
/// the ones it is generating (summed over their label sets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineMetrics {
    /// The HTTP path.
    pub path: &'static str,
    /// Gauges of requests waiting for a slot.
    pub waiting: &'static [&'static str],
    /// Gauges of requests being generated.
    pub running: &'static [&'static str],
    /// Gauges of the KV cache's use, as a fraction of it (the largest counts).
    pub kv_cache: &'static [&'static str],
}

/// How a model server is started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Runtime {
    /// vLLM's OpenAI-compatible server.
    Vllm,
    /// llama.cpp's `llama-server`.
    LlamaCpp,
    /// Hugging Face text-generation-inference.
    Tgi,
    /// NVIDIA Triton inference server.
    Triton,
    /// `berth demo-model`, a small real HTTP server for demos and tests.
    Demo,
    /// Any command, from a template using `{source} {port} {gpus} {gpu_memory_fraction}`.
    Command {
        /// The command line template.
        template: String,
    },
    /// SGLang's server (appended: runtimes are stored by index).
    Sglang,
}

impl Runtime {
    /// Builds a runtime from its name and, for `command`, its template.
    pub fn parse(name: &str, template: Option<&str>) -> Result<Self, ValidationError> {
        let template = template.filter(|t| !t.is_empty());
        let rt = match name {
            "vllm" => Runtime::Vllm,
            "llama-cpp" => Runtime::LlamaCpp,
            "tgi" => Runtime::Tgi,
            "triton" => Runtime::Triton,
            "sglang" => Runtime::Sglang,
            "demo" => Runtime::Demo,
            "command" => {
                let Some(t) = template else {
                    return Err(ValidationError::new(
                        "command",
                        "",
                        "runtime command needs a command template, e.g. --command 'my-server --port {port} {source}'",
                    ));
                };
                return Ok(Runtime::Command {
                    template: t.to_string(),
                });
            }
            other => {
                return Err(ValidationError::new(
                    "runtime",
                    other,
                    format!("must be one of {}", RUNTIME_NAMES.join(", ")),
                ));
            }
        };
        if let Some(t) = template {
            return Err(ValidationError::new(
                "command",
                t,
                format!("a command template is only for runtime command, not {name}"),
            ));
        }
        Ok(rt)
    }

    /// The runtime's name as the API and CLI spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Runtime::Vllm => "vllm",
            Runtime::LlamaCpp => "llama-cpp",
            Runtime::Tgi => "tgi",
            Runtime::Triton => "triton",
            Runtime::Sglang => "sglang",
            Runtime::Demo => "demo",
            Runtime::Command { .. } => "command",
        }
    }

    /// Where the server reports its load, and under which metric names,
    /// for the runtimes that have one on their serving port.
    pub fn engine_metrics(&self) -> Option<EngineMetrics> {
        match self {
            Runtime::Vllm => Some(EngineMetrics {
                path: "/metrics",
                waiting: &["vllm:num_requests_waiting"],
                running: &["vllm:num_requests_running"],
                // The second is the name before vLLM 0.10 (deprecated since).
                kv_cache: &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
            }),
            Runtime::LlamaCpp => Some(EngineMetrics {
                path: "/metrics",
                waiting: &["llamacpp:requests_deferred"],
                running: &["llamacpp:requests_processing"],
                // Exported by older builds; newer ones have no KV gauge.
                kv_cache: &["llamacpp:kv_cache_usage_ratio"],
            }),
            Runtime::Tgi => Some(EngineMetrics {
                path: "/metrics",
                waiting: &["tgi_queue_size"],
                running: &["tgi_batch_current_size"],
                kv_cache: &[],
            }),
            Runtime::Sglang => Some(EngineMetrics {
                path: "/metrics",
                waiting: &["sglang:num_queue_reqs"],
                running: &["sglang:num_running_reqs"],
                kv_cache: &["sglang:token_usage"],
            }),
            Runtime::Demo => Some(EngineMetrics {
                path: "/metrics",
                waiting: &["berth_demo:requests_waiting"],
                running: &["berth_demo:requests_running"],
                kv_cache: &["berth_demo:kv_cache_usage_ratio"],
            }),
            // Triton reports on its own metrics port, which the preset
            // turns off; a command's server is unknown.
            Runtime::Triton | Runtime::Command { .. } => None,
        }
    }

    /// The command template, for `command`.
    pub fn template(&self) -> Option<&str> {
        match self {
            Runtime::Command { template } => Some(template),
            _ => None,
        }
    }

    /// The health probe a runtime answers when none is given.
    pub fn default_probe(&self) -> HealthProbe {
        match self {
            Runtime::Triton => HealthProbe::Http {
                path: "/v2/health/ready".into(),
            },
            Runtime::Command { .. } => HealthProbe::Tcp,
            _ => HealthProbe::Http {
                path: "/health".into(),
            },
        }
    }

    /// Checks the command template of runtime `command`.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if let Runtime::Command { template } = self {
            if template.trim().is_empty() {
                return Err(ValidationError::new(
                    "command",
                    template,
                    "must not be empty for runtime command",
                ));
            }
            if template.len() > MAX_SOURCE_LEN || template.contains('\0') {
                return Err(ValidationError::new(
                    "command",
                    "…",
                    format!("must be at most {MAX_SOURCE_LEN} bytes without NUL characters"),
                ));
            }
        }
        Ok(())
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the agent tells a replica is ready to serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HealthProbe {
    /// HTTP GET on the replica's port; any 2xx is healthy.
    Http {
        /// Path, starting with `/`.
        path: String,
    },
    /// A TCP connect to the replica's port.
    Tcp,
}

impl HealthProbe {
    /// Parses `http:/path`, `/path` or `tcp`.
    pub fn parse(text: &str) -> Result<Self, ValidationError> {
        let probe = if text == "tcp" {
            HealthProbe::Tcp
        } else {
            let path = text.strip_prefix("http:").unwrap_or(text);
            HealthProbe::Http { path: path.into() }
        };
        probe.validate()?;
        Ok(probe)
    }

    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            HealthProbe::Tcp => Ok(()),
            HealthProbe::Http { path } => {
                if path.starts_with('/')
                    && path.len() <= 1024
                    && path.bytes().all(|b| b.is_ascii_graphic())
                {
                    Ok(())
                } else {
                    Err(ValidationError::new(
                        "health",
                        path,
                        "must be tcp or an HTTP path starting with '/' (e.g. /health)",
                    ))
                }
            }
        }
    }
}

impl fmt::Display for HealthProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthProbe::Http { path } => write!(f, "http:{path}"),
            HealthProbe::Tcp => f.write_str("tcp"),
        }
    }
}

/// Everything a person says about a model version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelVersionSpec {
    /// The version string, unique within its model.
    pub version: String,
    /// How to run it.
    pub runtime: Runtime,
    /// A path on the nodes, or a reference the runtime resolves.
    pub source: String,
    /// What one replica needs unless a deployment says otherwise.
    pub resources: Resources,
    /// Extra environment for the replica processes.
    pub env: BTreeMap<String, String>,
    /// How readiness is probed.
    pub health: HealthProbe,
    /// Free-form labels.
    pub labels: Labels,
}

impl ModelVersionSpec {
    /// Checks every field; the first broken rule is returned.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_version("version", &self.version)?;
        self.runtime.validate()?;
        if self.source.trim().is_empty() {
            return Err(ValidationError::new(
                "source",
                &self.source,
                "must not be empty: give a path on the nodes or a reference the runtime resolves",
            ));
        }
        if self.source.len() > MAX_SOURCE_LEN || self.source.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "source",
                &self.source,
                format!("must be at most {MAX_SOURCE_LEN} bytes without control characters"),
            ));
        }
        self.resources.validate()?;
        validate_env("env", &self.env)?;
        self.health.validate()?;
        validate_labels("label", &self.labels)
    }
}

/// A stored model version: the spec plus when it was registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelVersion {
    /// What was asked for.
    pub spec: ModelVersionSpec,
    /// Milliseconds since the Unix epoch, stamped by the leader.
    pub created_at_ms: u64,
}

/// A registered model and its versions, keyed by version string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    /// The model's unique name.
    pub name: String,
    /// Its versions; never empty.
    pub versions: BTreeMap<String, ModelVersion>,
    /// Milliseconds since the Unix epoch, stamped by the leader.
    pub created_at_ms: u64,
}

impl Model {
    /// Checks a model name.
    pub fn validate_name(name: &str) -> Result<(), ValidationError> {
        validate_name("name", name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec() -> ModelVersionSpec {
        ModelVersionSpec {
            version: "v1".into(),
            runtime: Runtime::Demo,
            source: "demo".into(),
            resources: Resources::default(),
            env: BTreeMap::new(),
            health: HealthProbe::Tcp,
            labels: Labels::new(),
        }
    }

    #[test]
    fn runtimes() {
        for name in RUNTIME_NAMES.iter().filter(|n| **n != "command") {
            assert_eq!(Runtime::parse(name, None).unwrap().name(), *name);
        }
        assert_eq!(
            Runtime::parse("command", Some("srv --port {port}")).unwrap(),
            Runtime::Command {
                template: "srv --port {port}".into()
            }
        );
        assert_eq!(
            Runtime::parse("command", None).unwrap_err().field,
            "command"
        );
        let e = Runtime::parse("onnx", None).unwrap_err();
        assert_eq!((e.field.as_str(), e.value.as_str()), ("runtime", "onnx"));
        assert!(e.rule.contains("vllm"));
        assert_eq!(
            Runtime::parse("vllm", Some("x")).unwrap_err().field,
            "command"
        );
    }

    #[test]
    fn probes() {
        assert_eq!(HealthProbe::parse("tcp").unwrap(), HealthProbe::Tcp);
        assert_eq!(
            HealthProbe::parse("/health").unwrap(),
            HealthProbe::Http {
                path: "/health".into()
            }
        );
        assert!(HealthProbe::parse("health").is_err());
        assert!(HealthProbe::parse("/a b").is_err());
    }

    #[test]
    fn version_spec() {
        assert!(spec().validate().is_ok());
        let mut s = spec();
        s.source = " ".into();
        assert_eq!(s.validate().unwrap_err().field, "source");
        let mut s = spec();
        s.version = "bad version".into();
        assert_eq!(s.validate().unwrap_err().field, "version");
        let mut s = spec();
        s.resources.gpus = 99;
        assert_eq!(s.validate().unwrap_err().field, "gpus");
        let mut s = spec();
        s.labels.insert("bad key!".into(), "x".into());
        assert_eq!(s.validate().unwrap_err().field, "label");
    }
}
