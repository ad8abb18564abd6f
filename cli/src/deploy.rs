//! `berth deploy create|list|show|scale|delete|explain` and `berth replica list`.

use std::collections::BTreeMap;
use std::time::Duration;

use berth_common::units::{format_cpu_milli, format_mib_approx as format_mib};
use berth_proto::v1 as pb;
use clap::{Args, Subcommand};
use serde::Serialize;
use tokio::time::Instant;

use crate::args::{cpu, duration, label, size};
use crate::client::{CliError, Client};
use crate::output::{OutputFormat, print_json, table};

/// Deployment subcommands.
#[derive(Debug, Subcommand)]
pub enum DeployCommand {
    /// Create a deployment: N replicas of a model version, placed by the scheduler.
    Create(CreateArgs),
    /// List deployments with their replica counts.
    List {
        /// Answer from the contacted member's local state, without running counts.
        #[arg(long)]
        stale: bool,
    },
    /// Show one deployment, its revisions and its replicas.
    Show {
        /// The deployment.
        name: String,
    },
    /// Set the number of replicas (scaling down removes the newest first).
    Scale {
        /// The deployment.
        name: String,
        /// The new number of replicas (0-1000).
        replicas: u32,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Roll out another model version (a new revision), within --max-surge
    /// and --max-unavailable, gated on health; paused if new replicas fail.
    Update {
        /// The deployment.
        name: String,
        /// The model version to run.
        #[arg(long)]
        version: String,
        /// Extra replicas the rollout may start.
        #[arg(long)]
        max_surge: Option<u32>,
        /// Replicas the rollout may take down.
        #[arg(long)]
        max_unavailable: Option<u32>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Go back to an earlier revision's spec (default: the previous one), as a new revision.
    Rollback {
        /// The deployment.
        name: String,
        /// The revision to go back to (`berth deploy show` lists them).
        #[arg(long)]
        to_revision: Option<u64>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Change each replica's resources: CPU and memory in place, GPU changes by rolling replacement.
    Resize {
        /// The deployment.
        name: String,
        /// CPU per replica: cores (2, 1.5) or millicores (500m).
        #[arg(long, value_parser = cpu)]
        cpu: Option<u32>,
        /// Memory per replica, e.g. 8GiB.
        #[arg(long, value_parser = size, value_name = "SIZE")]
        memory: Option<u64>,
        /// Whole GPUs per replica.
        #[arg(long)]
        gpus: Option<u32>,
        /// GPU memory per GPU, e.g. 20GiB.
        #[arg(long, value_parser = size, value_name = "SIZE")]
        gpu_memory: Option<u64>,
        /// Compute share per GPU in thousandths.
        #[arg(long, value_name = "MILLI")]
        gpu_share: Option<u32>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Let the autoscaler set the replica count from serving load
    /// (`deploy autoscale chat --max 8 --target-inflight 4`), or hand the
    /// count back (`deploy autoscale chat off`).
    Autoscale(AutoscaleArgs),
    /// Set the other names the gateway routes to this deployment
    /// (replacing them; none clears them), e.g. `deploy alias chat assistant`.
    Alias {
        /// The deployment.
        name: String,
        /// Its aliases (model-name rules; not a model's or deployment's name).
        aliases: Vec<String>,
    },
    /// Delete a deployment; its replicas are stopped and removed.
    Delete {
        /// The deployment.
        name: String,
    },
    /// Why each pending replica has no place: per filter, how many nodes it excluded.
    Explain {
        /// The deployment.
        name: String,
    },
}

/// Replica subcommands.
#[derive(Debug, Subcommand)]
pub enum ReplicaCommand {
    /// List replicas: placement, phase, port.
    List {
        /// Only this deployment's.
        #[arg(long)]
        deployment: Option<String>,
        /// Only this node's.
        #[arg(long)]
        node: Option<String>,
        /// Answer from the contacted member's local state, without phases.
        #[arg(long)]
        stale: bool,
    },
    /// Print a replica's stdout and stderr (from its node's agent).
    Logs {
        /// The replica.
        id: String,
        /// Lines of existing output to print first.
        #[arg(long, default_value_t = 100)]
        tail: u32,
        /// Keep printing new output until Ctrl-C.
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

/// `--wait` and `--timeout`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Wait until every replica runs the current revision (progress on stderr).
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "5m", value_parser = duration)]
    timeout: Duration,
}

/// `deploy create` options.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Deployment name: lowercase letters, digits and '-', at most 52.
    name: String,
    /// The model, optionally with a version: llama or llama:v2 (default: its newest version).
    #[arg(long, value_name = "MODEL[:VERSION]")]
    model: String,
    /// Number of replicas (0-1000).
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// Whole GPUs per replica, on one node (default: the model version's).
    #[arg(long)]
    gpus: Option<u32>,
    /// GPU memory per GPU, e.g. 20GiB (default: the model version's; 0 = whole GPU).
    #[arg(long, value_parser = size, value_name = "SIZE")]
    gpu_memory: Option<u64>,
    /// Compute share per GPU in thousandths (1-1000; below 1000 shares a GPU).
    #[arg(long, value_name = "MILLI")]
    gpu_share: Option<u32>,
    /// CPU per replica: cores (2, 1.5) or millicores (500m).
    #[arg(long, value_parser = cpu)]
    cpu: Option<u32>,
    /// Memory per replica, e.g. 8GiB.
    #[arg(long, value_parser = size, value_name = "SIZE")]
    memory: Option<u64>,
    /// Placement policy: default (fragmentation-aware), binpack or spread.
    #[arg(long, default_value = "default")]
    policy: String,
    /// A label nodes must carry, k=v (repeatable).
    #[arg(long = "selector", value_parser = label, value_name = "K=V")]
    selector: Vec<(String, String)>,
    /// GPU model the nodes' GPUs must be, e.g. A100-80GB.
    #[arg(long)]
    gpu_model: Option<String>,
    /// Priority, -1000 to 1000 (higher is placed first).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Extra replicas a rolling update may start.
    #[arg(long)]
    max_surge: Option<u32>,
    /// Replicas a rolling update may take down.
    #[arg(long)]
    max_unavailable: Option<u32>,
    #[command(flatten)]
    wait: WaitArgs,
}

/// `deploy autoscale` options.
#[derive(Debug, Args)]
pub struct AutoscaleArgs {
    /// The deployment.
    pub name: String,
    /// `off`: stop autoscaling (the count stays where it is; `deploy scale` works again).
    #[arg(value_parser = ["off"])]
    pub off: Option<String>,
    /// Fewest replicas while there is traffic.
    #[arg(long, default_value_t = 1, conflicts_with = "off")]
    pub min: u32,
    /// Most replicas.
    #[arg(long, required_unless_present = "off", conflicts_with = "off")]
    pub max: Option<u32>,
    /// Requests in flight per replica to aim for (counted by the gateways).
    #[arg(
        long,
        value_name = "N",
        required_unless_present_any = ["off", "target_queue_depth"],
        conflicts_with_all = ["off", "target_queue_depth"]
    )]
    pub target_inflight: Option<u32>,
    /// Requests queued in each replica's engine to aim for (from the runtime's metrics).
    #[arg(long, value_name = "N", conflicts_with = "off")]
    pub target_queue_depth: Option<u32>,
    /// How long load must stay low before replicas are removed (never less than the model's measured load time).
    #[arg(long, default_value = "5m", value_parser = duration, conflicts_with = "off")]
    pub scale_down_delay: Duration,
    /// Opt-in: with no traffic for this long, go to 0 replicas; the gateway holds the next request while one starts.
    #[arg(long, value_parser = duration, conflicts_with = "off")]
    pub scale_to_zero_after: Option<Duration>,
}

impl AutoscaleArgs {
    /// The request: a policy, or none for `off`.
    fn request(&self) -> pb::SetAutoscaleRequest {
        pb::SetAutoscaleRequest {
            name: self.name.clone(),
            policy: self.off.is_none().then(|| pb::AutoscalePolicy {
                min: self.min,
                max: self.max.unwrap_or(0),
                target_inflight: self.target_inflight.unwrap_or(0),
                target_queue_depth: self.target_queue_depth.unwrap_or(0),
                scale_down_delay_ms: self.scale_down_delay.as_millis() as u64,
                scale_to_zero_after_ms: self.scale_to_zero_after.map(|d| d.as_millis() as u64),
            }),
        }
    }
}

/// A deployment's autoscaling policy, as printed.
#[derive(Debug, Serialize)]
pub struct AutoscaleView {
    /// Fewest replicas while there is traffic.
    pub min: u32,
    /// Most replicas.
    pub max: u32,
    /// `inflight` or `queue_depth`.
    pub metric: &'static str,
    /// The target per replica.
    pub target: u32,
    /// Scale-down delay, s.
    pub scale_down_delay_s: f64,
    /// Idle time before going to 0; null: never.
    pub scale_to_zero_after_s: Option<f64>,
}

impl From<pb::AutoscalePolicy> for AutoscaleView {
    fn from(p: pb::AutoscalePolicy) -> Self {
        let (metric, target) = if p.target_queue_depth > 0 {
            ("queue_depth", p.target_queue_depth)
        } else {
            ("inflight", p.target_inflight)
        };
        AutoscaleView {
            min: p.min,
            max: p.max,
            metric,
            target,
            scale_down_delay_s: p.scale_down_delay_ms as f64 / 1000.0,
            scale_to_zero_after_s: p.scale_to_zero_after_ms.map(|z| z as f64 / 1000.0),
        }
    }
}

impl std::fmt::Display for AutoscaleView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}-{} replicas, target {} {} per replica, scale-down delay {} s",
            self.min,
            self.max,
            self.target,
            if self.metric == "inflight" {
                "in flight"
            } else {
                "queued"
            },
            self.scale_down_delay_s
        )?;
        if let Some(z) = self.scale_to_zero_after_s {
            write!(f, ", to zero after {z} s without traffic")?;
        }
        Ok(())
    }
}

/// A deployment, as printed.
#[derive(Debug, Serialize)]
pub struct DeploymentView {
    /// Name.
    pub name: String,
    /// Model.
    pub model: String,
    /// Model version.
    pub version: String,
    /// Replicas asked for.
    pub replicas: u32,
    /// Replicas placed on a node.
    pub replicas_placed: u32,
    /// Replicas running (from the leader's heartbeats; 0 in a stale read).
    pub replicas_running: u32,
    /// Replicas waiting for a place.
    pub replicas_pending: u32,
    /// Replicas that should run at the current revision.
    pub replicas_updated: u32,
    /// Why the rollout is paused; null when it is not.
    pub paused: Option<String>,
    /// Other names the gateway routes here.
    pub aliases: Vec<String>,
    /// Its autoscaling policy; null when the count is set by hand.
    pub autoscale: Option<AutoscaleView>,
    /// The autoscaler's last decision (from the leader); null when none yet.
    pub autoscale_status: Option<String>,
    /// Whether that decision is a condition: the count should grow but cannot.
    pub autoscale_blocked: bool,
    /// Current revision.
    pub revision: u64,
    /// CPU per replica, millicores.
    pub cpu_milli: u32,
    /// Memory per replica, MiB.
    pub memory_mib: u64,
    /// GPUs per replica.
    pub gpus: u32,
    /// GPU memory per GPU, MiB (0: the whole GPU).
    pub gpu_memory_mib: u64,
    /// Compute share per GPU, thousandths.
    pub gpu_milli: u32,
    /// Placement policy.
    pub policy: String,
    /// Node labels required.
    pub selector: BTreeMap<String, String>,
    /// GPU model required; null: any.
    pub gpu_model: Option<String>,
    /// Priority.
    pub priority: i32,
    /// Rollout surge.
    pub max_surge: u32,
    /// Rollout unavailability.
    pub max_unavailable: u32,
    /// Revisions kept: number, model version, creation time.
    pub history: Vec<RevisionView>,
    /// Creation time, ms since the epoch.
    pub created_at_ms: u64,
}

/// One revision, as printed.
#[derive(Debug, Serialize)]
pub struct RevisionView {
    /// Its number.
    pub revision: u64,
    /// Model version it runs.
    pub version: String,
    /// When it was made, ms since the epoch.
    pub created_at_ms: u64,
}

impl From<pb::Deployment> for DeploymentView {
    fn from(d: pb::Deployment) -> Self {
        let s = d.spec.unwrap_or_default();
        let r = s.resources.unwrap_or_default();
        DeploymentView {
            name: d.name,
            model: s.model,
            version: s.version,
            replicas: s.replicas,
            replicas_placed: d.replicas_placed,
            replicas_running: d.replicas_running,
            replicas_pending: d.replicas_pending,
            replicas_updated: d.replicas_updated,
            paused: Some(d.paused).filter(|p| !p.is_empty()),
            aliases: d.aliases,
            autoscale: d.autoscale.map(Into::into),
            autoscale_status: Some(d.autoscale_status).filter(|s| !s.is_empty()),
            autoscale_blocked: d.autoscale_blocked,
            revision: d.revision,
            cpu_milli: r.cpu_milli,
            memory_mib: r.memory_mib,
            gpus: r.gpus,
            gpu_memory_mib: r.gpu_memory_mib,
            gpu_milli: r.gpu_milli,
            policy: s.policy,
            selector: s.selector.into_iter().collect(),
            gpu_model: Some(s.gpu_model).filter(|m| !m.is_empty()),
            priority: s.priority,
            max_surge: s.max_surge,
            max_unavailable: s.max_unavailable,
            history: d
                .history
                .into_iter()
                .map(|h| RevisionView {
                    revision: h.revision,
                    version: h.spec.map(|s| s.version).unwrap_or_default(),
                    created_at_ms: h.created_at_ms,
                })
                .collect(),
            created_at_ms: d.created_at_ms,
        }
    }
}

/// A replica, as printed.
#[derive(Debug, Serialize)]
pub struct ReplicaView {
    /// Replica id.
    pub id: String,
    /// Its deployment.
    pub deployment: String,
    /// Deployment revision it runs.
    pub revision: u64,
    /// Its generation.
    pub generation: u64,
    /// Its node; null while pending.
    pub node: Option<String>,
    /// GPU indices on its node.
    pub gpus: Vec<u32>,
    /// GPU uuids.
    pub gpu_uuids: Vec<String>,
    /// pending, starting, running, failed, stopped (unknown in a stale read).
    pub phase: String,
    /// Why, for people.
    pub reason: String,
    /// Its port; null until its agent started it.
    pub port: Option<u32>,
    /// host:port; null until known.
    pub endpoint: Option<String>,
    /// The model server's pid on its node.
    pub pid: Option<u32>,
    /// Restarts after exits.
    pub restarts: u32,
    /// run, or remove (being stopped).
    pub intent: String,
    /// Model.
    pub model: String,
    /// Model version.
    pub version: String,
    /// Requests its engine queues (null when its runtime reports none).
    pub queue_depth: Option<u32>,
    /// Requests its engine is generating (null when unknown).
    pub running_requests: Option<u32>,
    /// The engine's KV cache use, percent (null when its runtime reports none).
    pub kv_cache_pct: Option<f64>,
    /// GPU memory reserved for it, over all its GPUs.
    pub gpu_memory_reserved_mib: u64,
    /// GPU memory it was measured to use, over all its GPUs (null when not measured).
    pub gpu_memory_used_mib: Option<u64>,
    /// Whether it has stayed above its GPU memory reservation.
    pub over_gpu_memory_reservation: bool,
}

impl From<pb::ClusterReplica> for ReplicaView {
    fn from(r: pb::ClusterReplica) -> Self {
        ReplicaView {
            id: r.id,
            deployment: r.deployment,
            revision: r.revision,
            generation: r.generation,
            node: Some(r.node).filter(|n| !n.is_empty()),
            gpus: r.gpus,
            gpu_uuids: r.gpu_uuids,
            phase: r.phase,
            reason: r.reason,
            port: (r.port != 0).then_some(r.port),
            endpoint: Some(r.endpoint).filter(|e| !e.is_empty()),
            pid: (r.pid != 0).then_some(r.pid),
            restarts: r.restarts,
            intent: r.intent,
            model: r.model,
            version: r.version,
            queue_depth: r.queue_depth,
            running_requests: r.running_requests,
            kv_cache_pct: r.kv_cache_milli.map(|m| f64::from(m) / 10.0),
            gpu_memory_reserved_mib: r.gpu_memory_reserved_mib,
            gpu_memory_used_mib: r.gpu_memory_used_mib,
            over_gpu_memory_reservation: r.over_gpu_memory_reservation,
        }
    }
}

fn resources(d: &DeploymentView) -> String {
    let mut s = format!(
        "cpu {} mem {}",
        format_cpu_milli(d.cpu_milli),
        format_mib(d.memory_mib)
    );
    if d.gpus > 0 {
        s.push_str(&format!(" gpus {}", d.gpus));
        if d.gpu_memory_mib > 0 {
            s.push_str(&format!(" × {}", format_mib(d.gpu_memory_mib)));
        }
        if d.gpu_milli < 1000 {
            s.push_str(&format!(" share {}", d.gpu_milli));
        }
    }
    s
}

fn deployments_table(ds: &[DeploymentView]) -> String {
    let mut t = table(&[
        "DEPLOYMENT",
        "MODEL",
        "REVISION",
        "READY",
        "UPDATED",
        "PENDING",
        "RESOURCES",
        "POLICY",
    ]);
    for d in ds {
        t.add_row(vec![
            d.name.clone(),
            format!("{}:{}", d.model, d.version),
            d.revision.to_string(),
            match &d.autoscale {
                Some(a) => format!(
                    "{}/{} (auto {}-{})",
                    d.replicas_running, d.replicas, a.min, a.max
                ),
                None => format!("{}/{}", d.replicas_running, d.replicas),
            },
            if d.paused.is_some() {
                format!("{}/{} PAUSED", d.replicas_updated, d.replicas)
            } else {
                format!("{}/{}", d.replicas_updated, d.replicas)
            },
            d.replicas_pending.to_string(),
            resources(d),
            d.policy.clone(),
        ]);
    }
    t.to_string()
}

/// A table of replicas.
pub fn replicas_table(rs: &[ReplicaView]) -> String {
    let mut t = table(&[
        "REPLICA", "REV", "NODE", "GPUS", "GPU MEM", "PHASE", "ENDPOINT", "LOAD", "RESTARTS",
        "REASON",
    ]);
    for r in rs {
        let gpus: Vec<String> = r.gpus.iter().map(u32::to_string).collect();
        let mut phase = r.phase.clone();
        if r.intent == "remove" {
            phase.push_str(" (removing)");
        }
        t.add_row(vec![
            r.id.clone(),
            r.revision.to_string(),
            r.node.clone().unwrap_or_else(|| "-".into()),
            if gpus.is_empty() {
                "-".into()
            } else {
                gpus.join(",")
            },
            gpu_memory(
                r.gpu_memory_used_mib,
                r.gpu_memory_reserved_mib,
                r.over_gpu_memory_reservation,
            ),
            phase,
            r.endpoint.clone().unwrap_or_else(|| "-".into()),
            // The engine's own count: running + queued.
            match (r.running_requests, r.queue_depth) {
                (Some(running), Some(queued)) => format!("{running}+{queued}q"),
                _ => "-".into(),
            },
            r.restarts.to_string(),
            r.reason.clone(),
        ]);
    }
    t.to_string()
}

/// GPU memory as `used/reserved`, `-` measured while nothing is, and
/// `OVER` once the replica stays above its reservation.
pub fn gpu_memory(used: Option<u64>, reserved: u64, over: bool) -> String {
    if reserved == 0 && used.is_none() {
        return "-".into();
    }
    let used = used.map_or_else(|| "-".to_string(), format_mib);
    let mut s = format!("{used}/{}", format_mib(reserved));
    if over {
        s.push_str(" OVER");
    }
    s
}

async fn get(client: &Client, name: &str) -> Result<pb::Deployment, CliError> {
    client
        .admin(|mut c| {
            let name = name.to_string();
            async move {
                c.get_deployment(pb::GetDeploymentRequest { name, stale: false })
                    .await
            }
        })
        .await
}

/// Replicas of a deployment (or all), from the leader.
pub async fn list_replicas(
    client: &Client,
    deployment: &str,
    node: &str,
    stale: bool,
) -> Result<Vec<ReplicaView>, CliError> {
    let req = pb::ListClusterReplicasRequest {
        deployment: deployment.to_string(),
        node: node.to_string(),
        stale,
    };
    let r = client
        .admin(|mut c| {
            let req = req.clone();
            async move { c.list_cluster_replicas(req).await }
        })
        .await?;
    Ok(r.replicas.into_iter().map(Into::into).collect())
}

/// Waits until `name` has as many running replicas as it asks for and none
/// being removed, printing progress on stderr. On timeout: an error naming
/// what is pending and why.
pub async fn wait_ready(
    client: &Client,
    name: &str,
    timeout: Duration,
) -> Result<pb::Deployment, CliError> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let d = get(client, name).await?;
        let want = d.spec.as_ref().map_or(0, |s| s.replicas);
        let replicas = list_replicas(client, name, "", false).await?;
        let removing = replicas.iter().filter(|r| r.intent == "remove").count();
        let running = d.replicas_running;
        if !d.paused.is_empty() {
            return Err(CliError::Other(anyhow::anyhow!(
                "the rollout of {name} is paused: {}; the old replicas keep serving. Roll back with `berth deploy rollback {name}`",
                d.paused
            )));
        }
        let updated = d.replicas_updated;
        let line = format!(
            "{name}: {running}/{want} running, {updated}/{want} at revision {}, {} pending{}",
            d.revision,
            d.replicas_pending,
            if removing > 0 {
                format!(", {removing} being removed")
            } else {
                String::new()
            }
        );
        if line != last {
            eprintln!("{line}");
            last = line;
        }
        let all_current = replicas
            .iter()
            .filter(|r| r.intent == "run")
            .all(|r| r.revision == d.revision && r.phase == "running");
        if running == want && updated == want && removing == 0 && all_current {
            return Ok(d);
        }
        if Instant::now() >= deadline {
            let waiting: Vec<String> = replicas
                .iter()
                .filter(|r| r.intent == "run" && r.phase != "running")
                .map(|r| {
                    if r.reason.is_empty() {
                        format!("{} ({})", r.id, r.phase)
                    } else {
                        format!("{} ({}: {})", r.id, r.phase, r.reason)
                    }
                })
                .collect();
            return Err(CliError::Other(anyhow::anyhow!(
                "deployment {name}: {running} of {want} replicas running after {timeout:?}; not running: {}. See `berth deploy explain {name}` and `berth replica list --deployment {name}`",
                waiting.join("; ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits when asked, then prints the deployment.
async fn finish(
    client: &Client,
    name: &str,
    d: pb::Deployment,
    wait: &WaitArgs,
    out: OutputFormat,
) -> Result<(), CliError> {
    let d = if wait.wait {
        wait_ready(client, name, wait.timeout).await?
    } else {
        d
    };
    print_deployment(d.into(), out);
    Ok(())
}

fn print_deployment(d: DeploymentView, out: OutputFormat) {
    match out {
        OutputFormat::Json => print_json(&d),
        OutputFormat::Table => out!("{}", deployments_table(&[d])),
    }
}

/// Runs a deploy subcommand.
pub async fn run(cmd: DeployCommand, client: &Client, out: OutputFormat) -> Result<(), CliError> {
    match cmd {
        DeployCommand::Create(a) => {
            let (model, version) = match a.model.split_once(':') {
                Some((m, v)) => (m.to_string(), v.to_string()),
                None => (a.model.clone(), String::new()),
            };
            let req = pb::CreateDeploymentRequest {
                name: a.name.clone(),
                model,
                version,
                replicas: a.replicas,
                resources: Some(pb::ResourceOverrides {
                    cpu_milli: a.cpu,
                    memory_mib: a.memory,
                    gpus: a.gpus,
                    gpu_memory_mib: a.gpu_memory,
                    gpu_milli: a.gpu_share,
                }),
                policy: a.policy,
                selector: a.selector.into_iter().collect(),
                gpu_model: a.gpu_model.unwrap_or_default(),
                priority: a.priority,
                max_surge: a.max_surge,
                max_unavailable: a.max_unavailable,
            };
            let d = client
                .admin(|mut c| {
                    let req = req.clone();
                    async move { c.create_deployment(req).await }
                })
                .await?;
            eprintln!(
                "created deployment {} ({} replicas of {}:{})",
                d.name,
                a.replicas,
                req.model,
                d.spec.as_ref().map(|s| s.version.as_str()).unwrap_or("")
            );
            finish(client, &a.name, d, &a.wait, out).await?;
        }
        DeployCommand::List { stale } => {
            let r = client
                .admin(|mut c| async move {
                    c.list_deployments(pb::ListDeploymentsRequest { stale })
                        .await
                })
                .await?;
            let ds: Vec<DeploymentView> = r.deployments.into_iter().map(Into::into).collect();
            match out {
                OutputFormat::Json => print_json(&ds),
                OutputFormat::Table if ds.is_empty() => eprintln!(
                    "no deployments; create one with `berth deploy create NAME --model MODEL --replicas N`"
                ),
                OutputFormat::Table => out!("{}", deployments_table(&ds)),
            }
        }
        DeployCommand::Show { name } => {
            let d: DeploymentView = get(client, &name).await?.into();
            let replicas = list_replicas(client, &name, "", false).await?;
            match out {
                OutputFormat::Json => print_json(&serde_json::json!({
                    "deployment": d,
                    "replicas": replicas,
                })),
                OutputFormat::Table => {
                    out!("{}", deployments_table(std::slice::from_ref(&d)));
                    let revisions: Vec<String> = d
                        .history
                        .iter()
                        .map(|h| format!("{} ({})", h.revision, h.version))
                        .collect();
                    out!("revisions: {}", revisions.join(", "));
                    if !d.aliases.is_empty() {
                        out!("aliases: {}", d.aliases.join(", "));
                    }
                    if let Some(a) = &d.autoscale {
                        out!("autoscaling: {a}");
                        match (&d.autoscale_status, d.autoscale_blocked) {
                            (Some(s), true) => out!("autoscaler CONDITION: {s}"),
                            (Some(s), false) => out!("autoscaler: {s}"),
                            (None, _) => out!("autoscaler: no decision yet"),
                        }
                    }
                    if let Some(p) = &d.paused {
                        out!("rollout PAUSED: {p}");
                    } else if d.replicas_updated < d.replicas {
                        out!(
                            "rolling out revision {}: {}/{} replicas updated",
                            d.revision,
                            d.replicas_updated,
                            d.replicas
                        );
                    }
                    if replicas.is_empty() {
                        out!("no replicas");
                    } else {
                        out!("{}", replicas_table(&replicas));
                    }
                }
            }
        }
        DeployCommand::Scale {
            name,
            replicas,
            wait,
        } => {
            let req = pb::ScaleDeploymentRequest {
                name: name.clone(),
                replicas,
            };
            let d = client
                .admin(|mut c| {
                    let req = req.clone();
                    async move { c.scale_deployment(req).await }
                })
                .await?;
            eprintln!("scaled deployment {name} to {replicas} replicas");
            finish(client, &name, d, &wait, out).await?;
        }
        DeployCommand::Update {
            name,
            version,
            max_surge,
            max_unavailable,
            wait,
        } => {
            let req = pb::UpdateDeploymentRequest {
                name: name.clone(),
                version: version.clone(),
                max_surge,
                max_unavailable,
                ..Default::default()
            };
            let d = client
                .admin(|mut c| {
                    let req = req.clone();
                    async move { c.update_deployment(req).await }
                })
                .await?;
            eprintln!(
                "deployment {name}: rolling out revision {} ({version})",
                d.revision
            );
            finish(client, &name, d, &wait, out).await?;
        }
        DeployCommand::Rollback {
            name,
            to_revision,
            wait,
        } => {
            let req = pb::RollbackDeploymentRequest {
                name: name.clone(),
                to_revision,
            };
            let d = client
                .admin(|mut c| {
                    let req = req.clone();
                    async move { c.rollback_deployment(req).await }
                })
                .await?;
            eprintln!(
                "deployment {name}: rolled back as revision {} ({})",
                d.revision,
                d.spec.as_ref().map(|s| s.version.as_str()).unwrap_or("")
            );
            finish(client, &name, d, &wait, out).await?;
        }
        DeployCommand::Resize {
            name,
            cpu,
            memory,
            gpus,
            gpu_memory,
            gpu_share,
            wait,
        } => {
            if cpu.is_none()
                && memory.is_none()
                && gpus.is_none()
                && gpu_memory.is_none()
                && gpu_share.is_none()
            {
                return Err(CliError::Usage(
                    "give at least one of --cpu, --memory, --gpus, --gpu-memory, --gpu-share"
                        .into(),
                ));
            }
            let req = pb::UpdateDeploymentRequest {
                name: name.clone(),
                resources: Some(pb::ResourceOverrides {
                    cpu_milli: cpu,
                    memory_mib: memory,
                    gpus,
                    gpu_memory_mib: gpu_memory,
                    gpu_milli: gpu_share,
                }),
                ..Default::default()
            };
            let d = client
                .admin(|mut c| {
                    let req = req.clone();
                    async move { c.update_deployment(req).await }
                })
                .await?;
            eprintln!("deployment {name}: resized as revision {}", d.revision);
            finish(client, &name, d, &wait, out).await?;
        }
        DeployCommand::Autoscale(a) => {
            let req = a.request();
            let d: DeploymentView = client
                .admin(|mut c| {
                    let req = req.clone();
                    async move { c.set_autoscale(req).await }
                })
                .await?
                .into();
            match (out, &d.autoscale) {
                (OutputFormat::Json, _) => print_json(&d),
                (OutputFormat::Table, Some(p)) => out!(
                    "deployment {} is autoscaled: {p}; {} replicas now",
                    d.name,
                    d.replicas
                ),
                (OutputFormat::Table, None) => out!(
                    "deployment {}: autoscaling off; the count stays at {} (`berth deploy scale` sets it)",
                    d.name,
                    d.replicas
                ),
            }
        }
        DeployCommand::Alias { name, aliases } => {
            let d: DeploymentView = client
                .admin(|mut c| {
                    let req = pb::SetDeploymentAliasesRequest {
                        name: name.clone(),
                        aliases: aliases.clone(),
                    };
                    async move { c.set_deployment_aliases(req).await }
                })
                .await?
                .into();
            match out {
                OutputFormat::Json => print_json(&d),
                OutputFormat::Table if d.aliases.is_empty() => {
                    out!("deployment {name} has no aliases");
                }
                OutputFormat::Table => out!(
                    "deployment {name} also answers to {} (through the gateway)",
                    d.aliases.join(", ")
                ),
            }
        }
        DeployCommand::Delete { name } => {
            client
                .admin(|mut c| {
                    let name = name.clone();
                    async move {
                        c.delete_deployment(pb::DeleteDeploymentRequest { name })
                            .await
                    }
                })
                .await?;
            match out {
                OutputFormat::Json => print_json(&serde_json::json!({ "deleted": name })),
                OutputFormat::Table => {
                    eprintln!("deleted deployment {name}; its replicas are being stopped")
                }
            }
        }
        DeployCommand::Explain { name } => {
            let r = client
                .admin(|mut c| {
                    let name = name.clone();
                    async move {
                        c.explain_deployment(pb::ExplainDeploymentRequest { name })
                            .await
                    }
                })
                .await?;
            match out {
                OutputFormat::Json => print_json(
                    &r.pending
                        .iter()
                        .map(|p| serde_json::json!({"replica": p.replica, "why": p.why}))
                        .collect::<Vec<_>>(),
                ),
                OutputFormat::Table if r.pending.is_empty() => {
                    out!("no pending replicas: every replica of {name} has a place")
                }
                OutputFormat::Table => {
                    let mut t = table(&["PENDING REPLICA", "WHY (NODES EXCLUDED PER FILTER)"]);
                    for p in &r.pending {
                        t.add_row(vec![p.replica.clone(), p.why.clone()]);
                    }
                    out!("{t}");
                }
            }
        }
    }
    Ok(())
}

/// Runs a replica subcommand.
pub async fn run_replica(
    cmd: ReplicaCommand,
    client: &Client,
    out: OutputFormat,
) -> Result<(), CliError> {
    match cmd {
        ReplicaCommand::List {
            deployment,
            node,
            stale,
        } => {
            let rs = list_replicas(
                client,
                deployment.as_deref().unwrap_or(""),
                node.as_deref().unwrap_or(""),
                stale,
            )
            .await?;
            match out {
                OutputFormat::Json => print_json(&rs),
                OutputFormat::Table if rs.is_empty() => eprintln!("no replicas"),
                OutputFormat::Table => out!("{}", replicas_table(&rs)),
            }
        }
        ReplicaCommand::Logs { id, tail, follow } => {
            use std::io::Write as _;
            use tokio_stream::StreamExt as _;
            let req = pb::ReplicaLogsRequest {
                id,
                tail: Some(tail),
                follow,
            };
            let mut stream = client
                .admin(|mut c| {
                    let req = req.clone();
                    async move { c.replica_logs(req).await }
                })
                .await?;
            let mut stdout = std::io::stdout();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|status| CliError::Request {
                    status,
                    servers: client.servers().to_string(),
                })?;
                // A closed pipe (`| head`) ends the command quietly.
                if stdout
                    .write_all(&chunk.data)
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    Ok(())
}
