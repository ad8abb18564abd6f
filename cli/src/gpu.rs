//! GPU health in the CLI: `berth node gpu quarantine|release`, `berth node
//! simulate-fault`, and the health views `node list` and `node show` print.

use berth_common::gpu_health::GpuFaults;
use berth_proto::v1 as pb;
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::client::{CliError, Client};
use crate::output::{OutputFormat, print_json, table};

/// `berth node gpu` subcommands.
#[derive(Debug, Subcommand)]
pub enum GpuCommand {
    /// Take a GPU out of placement: nothing new lands on it, and its replicas move to other GPUs (each replaced before it stops).
    Quarantine {
        /// The node's name.
        node: String,
        /// The GPU's index on the node (see `berth node show NODE`).
        gpu: u32,
        /// Why, for the record (shown by `node show` and in the events).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Return a quarantined GPU to placement (also one the control plane quarantined for its faults: those faults are not held against it again, new ones are).
    Release {
        /// The node's name.
        node: String,
        /// The GPU's index on the node.
        gpu: u32,
    },
}

/// `berth node simulate-fault`: what to inject.
#[derive(Debug, Args)]
pub struct SimulateFault {
    /// The node's name (its agent must run with --simulate-gpus).
    pub node: String,
    /// The GPU's index on the node.
    #[arg(long)]
    pub gpu: u32,
    /// An XID event with this code (79: fallen off the bus; 48: double-bit ECC; 13: an application's fault, not held against the GPU).
    #[arg(long)]
    pub xid: Option<u64>,
    /// This many more uncorrected ECC errors.
    #[arg(long, default_value_t = 0)]
    pub ecc_uncorrected: u64,
    /// Row remaps pending a GPU reset (degrades the GPU).
    #[arg(long)]
    pub remap_pending: bool,
    /// NVML loses the GPU.
    #[arg(long)]
    pub lost: bool,
    /// Forget the GPU's simulated faults first, as a GPU reset would.
    #[arg(long)]
    pub clear: bool,
    /// Not a fault: set the memory that simulated processes Berth did not start hold on the GPU, e.g. 60GiB (0 frees it). The scheduler keeps requests that do not fit in the rest away from the GPU.
    #[arg(long, value_parser = crate::args::size, value_name = "SIZE")]
    pub foreign_memory: Option<u64>,
}

/// One GPU's health in `node list` and `node show`.
#[derive(Debug, Clone, Serialize)]
pub struct GpuHealthView {
    /// Index on the node.
    pub index: u32,
    /// uuid.
    pub uuid: String,
    /// healthy, degraded, unhealthy, lost, or unknown (no heartbeat yet).
    pub health: String,
    /// Why, when not healthy.
    pub reason: String,
    /// Whether it is out of placement.
    pub quarantined: bool,
    /// Why it was quarantined; null when it is not.
    pub quarantine_reason: Option<String>,
    /// health (the control plane, from its faults) or operator; null when not quarantined.
    pub quarantined_by: Option<String>,
    /// When it was quarantined, ms since the epoch; null when not quarantined.
    pub quarantined_since_ms: Option<u64>,
    /// The fault counters from the last heartbeat; null without one.
    pub faults: Option<GpuFaults>,
    /// Memory in use at the last heartbeat, MiB; null without one.
    pub memory_used_mib: Option<u64>,
    /// Memory held by processes Berth did not start, MiB.
    pub foreign_memory_mib: u64,
    /// Memory replicas use beyond their reservations, MiB.
    pub over_reservation_mib: u64,
}

impl From<pb::GpuStatus> for GpuHealthView {
    fn from(g: pb::GpuStatus) -> Self {
        let q = g.quarantined;
        GpuHealthView {
            index: g.index,
            uuid: g.uuid,
            health: g.health,
            reason: g.reason,
            quarantined: q,
            quarantine_reason: q.then_some(g.quarantine_reason),
            quarantined_by: q.then_some(g.quarantined_by),
            quarantined_since_ms: q.then_some(g.quarantined_since_ms),
            faults: g.faults.as_ref().map(Into::into),
            memory_used_mib: g.memory_used_mib,
            foreign_memory_mib: g.foreign_memory_mib,
            over_reservation_mib: g.over_reservation_mib,
        }
    }
}

/// A node's GPU health in one cell: `ok`, or counts of what is not.
pub fn health_cell(gpus: &[GpuHealthView]) -> String {
    if gpus.is_empty() {
        return "-".into();
    }
    let count = |f: &dyn Fn(&GpuHealthView) -> bool| gpus.iter().filter(|g| f(g)).count();
    let mut parts = Vec::new();
    for (n, what) in [
        (count(&|g| g.quarantined), "quarantined"),
        (count(&|g| g.health == "unhealthy"), "unhealthy"),
        (count(&|g| g.health == "lost"), "lost"),
        (count(&|g| g.health == "degraded"), "degraded"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    if parts.is_empty() {
        if gpus.iter().all(|g| g.health == "healthy") {
            "ok".into()
        } else {
            "unknown".into()
        }
    } else {
        parts.join(", ")
    }
}

/// The GPU health table of `node show`.
pub fn health_table(gpus: &[GpuHealthView]) -> String {
    let mut t = table(&["GPU", "HEALTH", "WHY", "QUARANTINE"]);
    for g in gpus {
        t.add_row(vec![
            g.index.to_string(),
            g.health.clone(),
            if g.reason.is_empty() {
                "-".into()
            } else {
                g.reason.clone()
            },
            match (&g.quarantined_by, &g.quarantine_reason) {
                (Some(by), Some(why)) => format!("by {by}: {why}"),
                _ => "-".into(),
            },
        ]);
    }
    t.to_string()
}

/// Runs `berth node gpu ...`.
pub async fn run(cmd: GpuCommand, client: &Client, out: OutputFormat) -> Result<(), CliError> {
    let (node, gpu, summary) = match cmd {
        GpuCommand::Quarantine { node, gpu, reason } => {
            let n = client
                .admin(|mut c| {
                    let req = pb::QuarantineGpuRequest {
                        node: node.clone(),
                        gpu,
                        reason: reason.clone(),
                    };
                    async move { c.quarantine_gpu(req).await }
                })
                .await?;
            eprintln!(
                "gpu {gpu} of node {node} quarantined: nothing new lands on it, and its replicas move to other GPUs; `berth node gpu release {node} {gpu}` returns it"
            );
            (node, gpu, n)
        }
        GpuCommand::Release { node, gpu } => {
            let n = client
                .admin(|mut c| {
                    let req = pb::ReleaseGpuRequest {
                        node: node.clone(),
                        gpu,
                    };
                    async move { c.release_gpu(req).await }
                })
                .await?;
            eprintln!("gpu {gpu} of node {node} released: replicas may be placed on it again");
            (node, gpu, n)
        }
    };
    let view: Option<GpuHealthView> = summary
        .gpu_status
        .into_iter()
        .find(|g| g.index == gpu)
        .map(Into::into);
    match out {
        OutputFormat::Json => print_json(&serde_json::json!({ "node": node, "gpu": view })),
        OutputFormat::Table => {
            if let Some(v) = view {
                out!("{}", health_table(&[v]));
            }
        }
    }
    Ok(())
}

/// Runs `berth node simulate-fault`.
pub async fn simulate(
    args: SimulateFault,
    client: &Client,
    out: OutputFormat,
) -> Result<(), CliError> {
    if args.xid.is_none()
        && args.ecc_uncorrected == 0
        && !args.remap_pending
        && !args.lost
        && !args.clear
        && args.foreign_memory.is_none()
    {
        return Err(CliError::Usage(
            "no fault given: pass --xid CODE, --ecc-uncorrected N, --remap-pending, --lost, --clear or --foreign-memory SIZE".into(),
        ));
    }
    let req = pb::SimulateGpuFaultRequest {
        node: args.node.clone(),
        gpu: args.gpu,
        xid: args.xid,
        ecc_uncorrected: args.ecc_uncorrected,
        remap_pending: args.remap_pending,
        lost: args.lost,
        clear: args.clear,
        foreign_memory_mib: args.foreign_memory,
    };
    let g = client
        .admin(|mut c| {
            let req = req.clone();
            async move { c.simulate_gpu_fault(req).await }
        })
        .await?;
    eprintln!(
        "SIMULATED change made to gpu {} of node {}; the control plane acts on it at the node's next heartbeat",
        args.gpu, args.node
    );
    match out {
        OutputFormat::Json => print_json(&serde_json::json!({
            "node": args.node,
            "gpu": g.index,
            "simulated": g.simulated,
            "health": g.health,
            "memory_used_mib": g.memory_used_mib,
            "foreign_memory_mib": g.foreign_memory_mib,
        })),
        OutputFormat::Table => out!(
            "gpu {} of node {}: {}, {} of {} MiB in use ({} MiB foreign)",
            g.index,
            args.node,
            g.health,
            g.memory_used_mib,
            g.memory_total_mib,
            g.foreign_memory_mib
        ),
    }
    Ok(())
}
