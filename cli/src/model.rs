//! `berth model create|list|show|delete` and `berth model version add|remove`.

use std::collections::BTreeMap;

use berth_common::units::{format_cpu_milli, format_mib};
use berth_proto::v1 as pb;
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::args::{cpu, label, size};
use crate::client::{CliError, Client};
use crate::output::{OutputFormat, print_json, table};

/// Model subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Register a model with its first version.
    Create {
        /// Model name: lowercase letters, digits and '-', at most 63.
        name: String,
        /// Version of this first version.
        #[arg(long, default_value = "v1")]
        version: String,
        #[command(flatten)]
        spec: VersionArgs,
    },
    /// List models and their versions.
    List {
        /// Answer from the contacted member's local state.
        #[arg(long)]
        stale: bool,
    },
    /// Show one model with every version.
    Show {
        /// The model's name.
        name: String,
        /// Answer from the contacted member's local state.
        #[arg(long)]
        stale: bool,
    },
    /// Delete a model and all its versions.
    Delete {
        /// The model's name.
        name: String,
    },
    /// Add or remove versions of a model.
    #[command(subcommand)]
    Version(VersionCommand),
}

/// `berth model version` subcommands.
#[derive(Debug, Subcommand)]
pub enum VersionCommand {
    /// Add a version to a model.
    Add {
        /// The model.
        model: String,
        /// The new version (letters, digits, '.', '_', '-').
        version: String,
        #[command(flatten)]
        spec: VersionArgs,
    },
    /// Remove a version from a model (its last version cannot be removed).
    Remove {
        /// The model.
        model: String,
        /// The version.
        version: String,
    },
}

fn env_var(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| "must be NAME=value".to_string())
}

/// How to run a model version and what one replica needs.
#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Runtime: vllm, llama-cpp, tgi, sglang, triton, demo or command.
    #[arg(long)]
    runtime: String,
    /// Path on the nodes, or a reference the runtime resolves.
    #[arg(long)]
    source: String,
    /// Command template for runtime command: {source} {port} {gpus} {gpu_memory_fraction}.
    #[arg(long)]
    command: Option<String>,
    /// Whole GPUs per replica, on one node (0-16).
    #[arg(long, default_value_t = 0)]
    gpus: u32,
    /// GPU memory per GPU, e.g. 20GiB (default: the whole GPU).
    #[arg(long, value_parser = size, value_name = "SIZE")]
    gpu_memory: Option<u64>,
    /// Compute share per GPU in thousandths (1-1000; below 1000 shares a GPU).
    #[arg(long, value_name = "MILLI")]
    gpu_share: Option<u32>,
    /// CPU per replica: cores (2, 1.5) or millicores (500m).
    #[arg(long, value_parser = cpu, default_value = "1")]
    cpu: u32,
    /// Memory per replica, e.g. 8GiB.
    #[arg(long, value_parser = size, default_value = "1GiB", value_name = "SIZE")]
    memory: u64,
    /// Health probe: an HTTP path (/health) or tcp (default: the runtime's).
    #[arg(long)]
    health: Option<String>,
    /// Environment variable for the replicas (repeatable).
    #[arg(long = "env", value_parser = env_var, value_name = "NAME=VALUE")]
    env: Vec<(String, String)>,
    /// Label k=v (repeatable).
    #[arg(long = "label", value_parser = label, value_name = "K=V")]
    labels: Vec<(String, String)>,
}

impl VersionArgs {
    fn into_proto(self, version: String) -> pb::ModelVersionSpec {
        pb::ModelVersionSpec {
            version,
            runtime: self.runtime,
            command: self.command.unwrap_or_default(),
            source: self.source,
            resources: Some(pb::Resources {
                cpu_milli: self.cpu,
                memory_mib: self.memory,
                gpus: self.gpus,
                gpu_memory_mib: self.gpu_memory.unwrap_or(0),
                gpu_milli: self.gpu_share.unwrap_or(0),
            }),
            env: self.env.into_iter().collect(),
            health: self.health.unwrap_or_default(),
            labels: self.labels.into_iter().collect(),
        }
    }
}

/// One version, as printed.
#[derive(Debug, Serialize)]
pub struct VersionView {
    /// Version string.
    pub version: String,
    /// Runtime name.
    pub runtime: String,
    /// Command template (runtime command), else null.
    pub command: Option<String>,
    /// Source.
    pub source: String,
    /// CPU per replica, millicores.
    pub cpu_milli: u32,
    /// Memory per replica, MiB.
    pub memory_mib: u64,
    /// GPUs per replica.
    pub gpus: u32,
    /// GPU memory per GPU, MiB (0: whole GPU).
    pub gpu_memory_mib: u64,
    /// Compute share per GPU, thousandths.
    pub gpu_milli: u32,
    /// Health probe.
    pub health: String,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Registration time, ms since the epoch.
    pub created_at_ms: u64,
}

/// One model, as printed.
#[derive(Debug, Serialize)]
pub struct ModelView {
    /// Name.
    pub name: String,
    /// Versions, in version order.
    pub versions: Vec<VersionView>,
    /// Registration time, ms since the epoch.
    pub created_at_ms: u64,
    /// Measured time from spawn to ready, per node class.
    pub load_times: Vec<LoadTimeView>,
}

/// A model's measured load time on one node class, as printed.
#[derive(Debug, Serialize)]
pub struct LoadTimeView {
    /// A GPU model, or `cpu`.
    pub node_class: String,
    /// The estimate (mean of the first samples, then a moving average), s.
    pub estimate_s: f64,
    /// The slowest seen, s.
    pub max_s: f64,
    /// The last one, s.
    pub last_s: f64,
    /// How many replicas were measured.
    pub samples: u64,
}

impl From<pb::Model> for ModelView {
    fn from(m: pb::Model) -> Self {
        ModelView {
            name: m.name,
            created_at_ms: m.created_at_ms,
            load_times: m
                .load_times
                .into_iter()
                .map(|t| LoadTimeView {
                    node_class: t.node_class,
                    estimate_s: t.estimate_ms as f64 / 1000.0,
                    max_s: t.max_ms as f64 / 1000.0,
                    last_s: t.last_ms as f64 / 1000.0,
                    samples: t.samples,
                })
                .collect(),
            versions: m
                .versions
                .into_iter()
                .map(|v| {
                    let s = v.spec.unwrap_or_default();
                    let r = s.resources.unwrap_or_default();
                    VersionView {
                        version: s.version,
                        runtime: s.runtime,
                        command: Some(s.command).filter(|c| !c.is_empty()),
                        source: s.source,
                        cpu_milli: r.cpu_milli,
                        memory_mib: r.memory_mib,
                        gpus: r.gpus,
                        gpu_memory_mib: r.gpu_memory_mib,
                        gpu_milli: r.gpu_milli,
                        health: s.health,
                        env: s.env.into_iter().collect(),
                        labels: s.labels.into_iter().collect(),
                        created_at_ms: v.created_at_ms,
                    }
                })
                .collect(),
        }
    }
}

fn resources(v: &VersionView) -> String {
    let mut s = format!(
        "cpu {} mem {}",
        format_cpu_milli(v.cpu_milli),
        format_mib(v.memory_mib)
    );
    if v.gpus > 0 {
        s.push_str(&format!(" gpus {}", v.gpus));
        if v.gpu_memory_mib > 0 {
            s.push_str(&format!(" × {}", format_mib(v.gpu_memory_mib)));
        }
        if v.gpu_milli < 1000 {
            s.push_str(&format!(" share {}", v.gpu_milli));
        }
    }
    s
}

fn models_table(models: &[ModelView]) -> String {
    let mut t = table(&[
        "MODEL",
        "VERSION",
        "RUNTIME",
        "SOURCE",
        "RESOURCES",
        "LABELS",
    ]);
    for m in models {
        for v in &m.versions {
            let labels: Vec<String> = v.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            t.add_row(vec![
                m.name.clone(),
                v.version.clone(),
                v.runtime.clone(),
                v.source.clone(),
                resources(v),
                labels.join(","),
            ]);
        }
    }
    t.to_string()
}

fn print_model(model: ModelView, out: OutputFormat) {
    match out {
        OutputFormat::Json => print_json(&model),
        OutputFormat::Table => {
            out!("{}", models_table(std::slice::from_ref(&model)));
            if model.load_times.is_empty() {
                out!("load time: not measured yet (measured when a replica becomes ready)");
            }
            for t in &model.load_times {
                out!(
                    "load time on {}: {:.1} s (last {:.1} s, slowest {:.1} s, {} replicas measured)",
                    t.node_class,
                    t.estimate_s,
                    t.last_s,
                    t.max_s,
                    t.samples
                );
            }
        }
    }
}

/// Runs a model subcommand.
pub async fn run(cmd: ModelCommand, client: &Client, out: OutputFormat) -> Result<(), CliError> {
    match cmd {
        ModelCommand::Create {
            name,
            version,
            spec,
        } => {
            let req = pb::CreateModelRequest {
                name,
                version: Some(spec.into_proto(version)),
            };
            let m = client
                .admin(|mut c| {
                    let req = req.clone();
                    async move { c.create_model(req).await }
                })
                .await?;
            eprintln!("created model {}", m.name);
            print_model(m.into(), out);
        }
        ModelCommand::List { stale } => {
            let r = client
                .admin(|mut c| async move { c.list_models(pb::ListModelsRequest { stale }).await })
                .await?;
            let models: Vec<ModelView> = r.models.into_iter().map(Into::into).collect();
            match out {
                OutputFormat::Json => print_json(&models),
                OutputFormat::Table if models.is_empty() => {
                    eprintln!(
                        "no models; register one with `berth model create NAME --runtime R --source S`"
                    )
                }
                OutputFormat::Table => out!("{}", models_table(&models)),
            }
        }
        ModelCommand::Show { name, stale } => {
            let m = client
                .admin(|mut c| {
                    let name = name.clone();
                    async move { c.get_model(pb::GetModelRequest { name, stale }).await }
                })
                .await?;
            print_model(m.into(), out);
        }
        ModelCommand::Delete { name } => {
            client
                .admin(|mut c| {
                    let name = name.clone();
                    async move { c.delete_model(pb::DeleteModelRequest { name }).await }
                })
                .await?;
            match out {
                OutputFormat::Json => print_json(&serde_json::json!({ "deleted": name })),
                OutputFormat::Table => eprintln!("deleted model {name}"),
            }
        }
        ModelCommand::Version(VersionCommand::Add {
            model,
            version,
            spec,
        }) => {
            let req = pb::AddModelVersionRequest {
                model,
                version: Some(spec.into_proto(version.clone())),
            };
            let m = client
                .admin(|mut c| {
                    let req = req.clone();
                    async move { c.add_model_version(req).await }
                })
                .await?;
            eprintln!("added version {version} to model {}", m.name);
            print_model(m.into(), out);
        }
        ModelCommand::Version(VersionCommand::Remove { model, version }) => {
            let req = pb::RemoveModelVersionRequest {
                model,
                version: version.clone(),
            };
            let m = client
                .admin(|mut c| {
                    let req = req.clone();
                    async move { c.remove_model_version(req).await }
                })
                .await?;
            eprintln!("removed version {version} from model {}", m.name);
            print_model(m.into(), out);
        }
    }
    Ok(())
}
