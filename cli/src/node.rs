//! `berth node list|show|cordon|drain|...`: the nodes, their state and
//! their inventory (GPU health commands are in `gpu`).

use std::collections::BTreeMap;

use berth_common::units::{format_cpu_milli, format_mib_approx as format_mib};
use berth_proto::v1 as pb;
use clap::Subcommand;
use serde::Serialize;

use crate::args::duration;
use crate::client::{CliError, Client};
use crate::gpu::{GpuCommand, GpuHealthView, SimulateFault, health_cell, health_table};
use crate::output::{OutputFormat, print_json, table};

/// Node subcommands.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List the nodes with their state, capacity and last heartbeat.
    List {
        /// Answer from the contacted member's local state, without heartbeat readings.
        #[arg(long)]
        stale: bool,
    },
    /// No new replicas land on the node; the ones running stay.
    Cordon {
        /// The node's name.
        name: String,
    },
    /// New replicas may land on the node again (also after a drain).
    Uncordon {
        /// The node's name.
        name: String,
    },
    /// Move the node's replicas elsewhere, each replaced before it stops; then the node is drained.
    Drain {
        /// The node's name.
        name: String,
        /// Wait until the node is drained (progress on stderr).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "10m", value_parser = duration)]
        timeout: std::time::Duration,
    },
    /// Show one node: state, and its whole inventory (every GPU) read from its agent now.
    Show {
        /// The node's name.
        name: String,
        /// Answer from the contacted member's local state, without heartbeat readings.
        #[arg(long)]
        stale: bool,
    },
    /// Quarantine or release one of a node's GPUs.
    Gpu {
        /// What to do.
        #[command(subcommand)]
        cmd: GpuCommand,
    },
    /// Inject a fault into a SIMULATED GPU (an agent with --simulate-gpus), for tests and demos; refused for real GPUs.
    SimulateFault(SimulateFault),
    /// Forget a node and revoke its certificates (its agent is cut off; the token it joined with cannot bring it back).
    Remove {
        /// The node's name.
        name: String,
        /// Remove it even with replicas placed there (they are replaced elsewhere; drain first to move them without downtime).
        #[arg(long)]
        force: bool,
    },
}

/// One node in `node list`.
#[derive(Debug, Serialize)]
pub struct NodeView {
    /// Unique name.
    pub name: String,
    /// ready or down.
    pub state: String,
    /// Whether its GPUs are simulated.
    pub simulated: bool,
    /// GPU count.
    pub gpus: u32,
    /// GPU models, once each.
    pub gpu_models: Vec<String>,
    /// GPU memory over all GPUs, MiB.
    pub gpu_memory_total_mib: u64,
    /// Free GPU memory from the last heartbeat, MiB; null without one.
    pub gpu_memory_free_mib: Option<u64>,
    /// Logical CPUs.
    pub cpus: u64,
    /// CPU capacity, millicores.
    pub cpu_milli: u64,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Seconds since the leader last heard from the agent; null when it has not since it leads.
    pub last_heartbeat_age_s: Option<f64>,
    /// The agent's address.
    pub addr: String,
    /// Bumped each time a new agent process registers.
    pub epoch: u64,
    /// Replicas the agent runs (not counting stopped ones it still lists).
    pub replicas: u32,
    /// Where the GPU list comes from.
    pub gpu_source: String,
    /// When the state last changed, ms since the epoch.
    pub state_since_ms: u64,
    /// Seconds before the node's newest certificate expires; null in plaintext clusters.
    pub cert_expires_in_s: Option<i64>,
    /// Each GPU's health and quarantine.
    pub gpu_health: Vec<GpuHealthView>,
}

impl From<pb::NodeSummary> for NodeView {
    fn from(n: pb::NodeSummary) -> Self {
        NodeView {
            name: n.name,
            state: n.state,
            simulated: n.simulated,
            gpus: n.gpus,
            gpu_models: n.gpu_models,
            gpu_memory_total_mib: n.gpu_memory_total_mib,
            gpu_memory_free_mib: n.gpu_memory_free_mib,
            cpus: n.cpu_milli / 1000,
            cpu_milli: n.cpu_milli,
            memory_mib: n.memory_mib,
            labels: n.labels.into_iter().collect(),
            last_heartbeat_age_s: n.last_heartbeat_age_s,
            addr: n.addr,
            epoch: n.epoch,
            replicas: n.replicas,
            gpu_source: n.gpu_source,
            state_since_ms: n.state_since_ms,
            cert_expires_in_s: crate::credentials::seconds_left(n.cert_expires_ms),
            gpu_health: n.gpu_status.into_iter().map(Into::into).collect(),
        }
    }
}

/// One GPU in `node show`.
#[derive(Debug, Serialize)]
pub struct GpuView {
    /// Index on the node.
    pub index: u32,
    /// uuid.
    pub uuid: String,
    /// Model name.
    pub model: String,
    /// Whether it is simulated.
    pub simulated: bool,
    /// Memory, MiB.
    pub memory_total_mib: u64,
    /// Memory in use, MiB.
    pub memory_used_mib: u64,
    /// Free memory, MiB.
    pub memory_free_mib: u64,
    /// GPU utilization, percent.
    pub utilization_percent: Option<u32>,
    /// Temperature, °C.
    pub temperature_c: Option<u32>,
    /// Power draw, watts.
    pub power_w: Option<f64>,
    /// enabled, disabled or unsupported.
    pub mig_mode: String,
    /// PCI bus id.
    pub pci_bus_id: String,
    /// NUMA node of its PCI bus.
    pub locality: Option<u32>,
    /// Corrected ECC errors (volatile).
    pub ecc_errors_corrected: Option<u64>,
    /// Uncorrected ECC errors (volatile).
    pub ecc_errors_uncorrected: Option<u64>,
    /// Critical XID events since the agent started.
    pub xid_events: u64,
    /// The last XID code.
    pub last_xid: Option<u64>,
    /// ok, or what is wrong.
    pub health: String,
    /// Memory held by processes Berth did not start, MiB.
    pub foreign_memory_mib: u64,
    /// Memory replicas use beyond their reservations, MiB.
    pub over_reservation_mib: u64,
    /// Processes using it: pid, memory, and the replica it belongs to.
    pub processes: Vec<GpuProcessView>,
}

/// A process on a GPU.
#[derive(Debug, Serialize)]
pub struct GpuProcessView {
    /// Process id.
    pub pid: u32,
    /// GPU memory it uses, MiB.
    pub used_memory_mib: u64,
    /// The replica it belongs to; null for a process Berth did not start.
    pub replica: Option<String>,
}

impl From<pb::Gpu> for GpuView {
    fn from(g: pb::Gpu) -> Self {
        GpuView {
            index: g.index,
            uuid: g.uuid,
            model: g.model,
            simulated: g.simulated,
            memory_total_mib: g.memory_total_mib,
            memory_used_mib: g.memory_used_mib,
            memory_free_mib: g.memory_free_mib,
            utilization_percent: g.utilization_percent,
            temperature_c: g.temperature_c,
            power_w: g.power_mw.map(|mw| f64::from(mw) / 1000.0),
            mig_mode: g.mig_mode,
            pci_bus_id: g.pci_bus_id,
            locality: g.locality,
            ecc_errors_corrected: g.ecc_errors_corrected,
            ecc_errors_uncorrected: g.ecc_errors_uncorrected,
            xid_events: g.xid_events,
            last_xid: g.last_xid,
            health: g.health,
            foreign_memory_mib: g.foreign_memory_mib,
            over_reservation_mib: g.over_reservation_mib,
            processes: g
                .processes
                .into_iter()
                .map(|p| GpuProcessView {
                    pid: p.pid,
                    used_memory_mib: p.used_memory_mib,
                    replica: Some(p.replica).filter(|r| !r.is_empty()),
                })
                .collect(),
        }
    }
}

/// A disk in `node show`.
#[derive(Debug, Serialize)]
pub struct DiskView {
    /// Mount point.
    pub mount_point: String,
    /// File system.
    pub file_system: String,
    /// Size, MiB.
    pub total_mib: u64,
    /// Free, MiB.
    pub available_mib: u64,
}

/// A network interface in `node show`.
#[derive(Debug, Serialize)]
pub struct NetworkView {
    /// Interface name.
    pub name: String,
    /// MAC address.
    pub mac: String,
    /// Addresses with prefix length.
    pub addresses: Vec<String>,
    /// Bytes received since boot.
    pub received_bytes: u64,
    /// Bytes sent since boot.
    pub transmitted_bytes: u64,
}

/// The whole inventory, as the agent read it.
#[derive(Debug, Serialize)]
pub struct InventoryView {
    /// Where the GPU list comes from.
    pub gpu_source: String,
    /// Every GPU.
    pub gpus: Vec<GpuView>,
    /// CPU model.
    pub cpu_model: String,
    /// Logical CPUs.
    pub cpus: u32,
    /// Physical cores.
    pub physical_cores: u32,
    /// CPU use, percent of all CPUs.
    pub cpu_usage_percent: f32,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f64; 3],
    /// Memory, MiB.
    pub memory_total_mib: u64,
    /// Available memory, MiB.
    pub memory_available_mib: u64,
    /// Disks.
    pub disks: Vec<DiskView>,
    /// Network interfaces.
    pub networks: Vec<NetworkView>,
    /// Host name.
    pub hostname: String,
    /// OS and kernel.
    pub os: String,
    /// How replica limits are enforced.
    pub cgroups: String,
    /// The agent's version.
    pub agent_version: String,
    /// When read, ms since the epoch.
    pub refreshed_at_ms: u64,
    /// How long the reading took, µs.
    pub refresh_us: u64,
}

impl From<pb::Inventory> for InventoryView {
    fn from(i: pb::Inventory) -> Self {
        InventoryView {
            gpu_source: i.gpu_source,
            gpus: i.gpus.into_iter().map(Into::into).collect(),
            cpu_model: i.cpu_model,
            cpus: i.cpus,
            physical_cores: i.physical_cores,
            cpu_usage_percent: i.cpu_usage_percent,
            load: [i.load_1m, i.load_5m, i.load_15m],
            memory_total_mib: i.memory_total_mib,
            memory_available_mib: i.memory_available_mib,
            disks: i
                .disks
                .into_iter()
                .map(|d| DiskView {
                    mount_point: d.mount_point,
                    file_system: d.file_system,
                    total_mib: d.total_mib,
                    available_mib: d.available_mib,
                })
                .collect(),
            networks: i
                .networks
                .into_iter()
                .map(|n| NetworkView {
                    name: n.name,
                    mac: n.mac,
                    addresses: n.addresses,
                    received_bytes: n.received_bytes,
                    transmitted_bytes: n.transmitted_bytes,
                })
                .collect(),
            hostname: i.hostname,
            os: i.os,
            cgroups: i.cgroups,
            agent_version: i.agent_version,
            refreshed_at_ms: i.refreshed_at_ms,
            refresh_us: i.refresh_us,
        }
    }
}

/// A replica as an agent reports it.
#[derive(Debug, Serialize)]
pub struct NodeReplicaView {
    /// Replica id.
    pub id: String,
    /// Its generation.
    pub generation: u64,
    /// Model served.
    pub model: String,
    /// Runtime.
    pub runtime: String,
    /// pending, starting, running, failed or stopped.
    pub phase: String,
    /// Why, for people.
    pub reason: String,
    /// The model server's pid; null when none runs.
    pub pid: Option<u32>,
    /// Its port.
    pub port: u32,
    /// GPU indices on its node.
    pub gpus: Vec<u32>,
    /// GPU uuids.
    pub gpu_uuids: Vec<String>,
    /// Restarts after exits.
    pub restarts: u32,
    /// The last exit code, if any.
    pub exit_code: Option<i32>,
    /// The signal that ended the last run, if any.
    pub exit_signal: Option<i32>,
    /// running or stopped: what the agent was told.
    pub desired: String,
    /// GPU memory reserved for it, over all its GPUs.
    pub gpu_memory_reserved_mib: u64,
    /// GPU memory it was measured to use, over all its GPUs (null when not measured).
    pub gpu_memory_used_mib: Option<u64>,
    /// Whether it has stayed above its GPU memory reservation.
    pub over_gpu_memory_reservation: bool,
}

impl From<pb::ReplicaStatus> for NodeReplicaView {
    fn from(r: pb::ReplicaStatus) -> Self {
        NodeReplicaView {
            id: r.id,
            generation: r.generation,
            model: r.model,
            runtime: r.runtime,
            phase: r.phase,
            reason: r.reason,
            pid: (r.pid != 0).then_some(r.pid),
            port: r.port,
            gpus: r.gpus,
            gpu_uuids: r.gpu_uuids,
            restarts: r.restarts,
            exit_code: r.exit_code,
            exit_signal: r.exit_signal,
            desired: r.desired,
            gpu_memory_reserved_mib: r.gpu_memory_reserved_mib,
            gpu_memory_used_mib: r.gpu_memory_used_mib,
            over_gpu_memory_reservation: r.over_gpu_memory_reservation,
        }
    }
}

/// `node show`: the node, its whole inventory, its replicas.
#[derive(Debug, Serialize)]
pub struct NodeDetail {
    /// The node as listed.
    #[serde(flatten)]
    pub node: NodeView,
    /// The whole inventory read from the agent now; null when it did not answer.
    pub inventory: Option<InventoryView>,
    /// Why `inventory` is null.
    pub inventory_error: Option<String>,
    /// The GPUs as registered through Raft.
    pub registered_gpus: Vec<GpuView>,
    /// Replicas from the last heartbeat.
    pub replica_list: Vec<NodeReplicaView>,
}

fn age(s: Option<f64>) -> String {
    s.map_or("-".into(), |s| format!("{s:.1}s ago"))
}

fn gpus_cell(n: &NodeView) -> String {
    if n.gpus == 0 {
        return "-".into();
    }
    let mut s = format!("{}× {}", n.gpus, n.gpu_models.join("/"));
    if n.simulated {
        s.push_str(" (simulated)");
    }
    s
}

fn nodes_table(nodes: &[NodeView]) -> String {
    let mut t = table(&[
        "NODE",
        "STATE",
        "GPUS",
        "GPU HEALTH",
        "GPU MEMORY FREE/TOTAL",
        "CPUS",
        "MEMORY",
        "REPLICAS",
        "LABELS",
        "HEARTBEAT",
    ]);
    for n in nodes {
        let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let memory = match n.gpu_memory_free_mib {
            _ if n.gpus == 0 => "-".into(),
            Some(free) => format!(
                "{} / {}",
                format_mib(free),
                format_mib(n.gpu_memory_total_mib)
            ),
            None => format!("? / {}", format_mib(n.gpu_memory_total_mib)),
        };
        t.add_row(vec![
            n.name.clone(),
            n.state.clone(),
            gpus_cell(n),
            health_cell(&n.gpu_health),
            memory,
            format_cpu_milli(n.cpu_milli as u32),
            format_mib(n.memory_mib),
            n.replicas.to_string(),
            labels.join(","),
            age(n.last_heartbeat_age_s),
        ]);
    }
    t.to_string()
}

fn opt<T: ToString>(v: Option<T>, unit: &str) -> String {
    v.map_or("-".into(), |v| format!("{}{unit}", v.to_string()))
}

fn print_detail(d: &NodeDetail) {
    let n = &d.node;
    out!(
        "node {} — {} (epoch {}), agent at {}, last heartbeat {}",
        n.name,
        n.state,
        n.epoch,
        n.addr,
        age(n.last_heartbeat_age_s)
    );
    if n.simulated {
        out!("GPUs: {} — SIMULATED, not real GPUs", n.gpu_source);
    } else {
        out!("GPUs: {}", n.gpu_source);
    }
    let Some(inv) = &d.inventory else {
        out!(
            "inventory: the agent did not answer ({}); registered GPUs:",
            d.inventory_error.as_deref().unwrap_or("unknown")
        );
        let mut t = table(&["GPU", "UUID", "MODEL", "MEMORY"]);
        for g in &d.registered_gpus {
            t.add_row(vec![
                g.index.to_string(),
                g.uuid.clone(),
                g.model.clone(),
                format_mib(g.memory_total_mib),
            ]);
        }
        out!("{t}");
        return;
    };
    out!(
        "host {} — {} — agent {} — limits: {}",
        inv.hostname,
        inv.os,
        inv.agent_version,
        inv.cgroups
    );
    out!(
        "CPU: {} — {} CPUs ({} cores), {:.0}% busy, load {:.2} {:.2} {:.2}",
        inv.cpu_model,
        inv.cpus,
        inv.physical_cores,
        inv.cpu_usage_percent,
        inv.load[0],
        inv.load[1],
        inv.load[2]
    );
    out!(
        "memory: {} total, {} available",
        format_mib(inv.memory_total_mib),
        format_mib(inv.memory_available_mib)
    );
    if !inv.gpus.is_empty() {
        let mut t = table(&[
            "GPU",
            "UUID",
            "MODEL",
            "MEMORY USED/TOTAL",
            "FOREIGN",
            "UTIL",
            "TEMP",
            "POWER",
            "MIG",
            "PCI",
            "NUMA",
            "ECC (CORR/UNCORR)",
            "XID",
            "HEALTH",
            "PROCESSES",
        ]);
        for g in &inv.gpus {
            let procs: Vec<String> = g
                .processes
                .iter()
                .map(|p| {
                    let owner = p.replica.as_deref().unwrap_or("foreign");
                    format!("{} {owner} ({})", p.pid, format_mib(p.used_memory_mib))
                })
                .collect();
            t.add_row(vec![
                g.index.to_string(),
                g.uuid.clone(),
                if g.simulated {
                    format!("{} (simulated)", g.model)
                } else {
                    g.model.clone()
                },
                format!(
                    "{} / {}",
                    format_mib(g.memory_used_mib),
                    format_mib(g.memory_total_mib)
                ),
                if g.foreign_memory_mib == 0 {
                    "-".into()
                } else {
                    format_mib(g.foreign_memory_mib)
                },
                opt(g.utilization_percent, "%"),
                opt(g.temperature_c, "°C"),
                g.power_w.map_or("-".into(), |w| format!("{w:.0}W")),
                g.mig_mode.clone(),
                if g.pci_bus_id.is_empty() {
                    "-".into()
                } else {
                    g.pci_bus_id.clone()
                },
                opt(g.locality, ""),
                match (g.ecc_errors_corrected, g.ecc_errors_uncorrected) {
                    (None, None) => "-".into(),
                    (c, u) => format!("{}/{}", opt(c, ""), opt(u, "")),
                },
                g.last_xid.map_or(g.xid_events.to_string(), |x| {
                    format!("{} (last {x})", g.xid_events)
                }),
                g.health.clone(),
                procs.join(", "),
            ]);
        }
        out!("{t}");
    }
    let mut t = table(&["DISK", "FS", "SIZE", "FREE"]);
    for d in &inv.disks {
        t.add_row(vec![
            d.mount_point.clone(),
            d.file_system.clone(),
            format_mib(d.total_mib),
            format_mib(d.available_mib),
        ]);
    }
    out!("{t}");
    let mut t = table(&["INTERFACE", "MAC", "ADDRESSES"]);
    for n in &inv.networks {
        t.add_row(vec![n.name.clone(), n.mac.clone(), n.addresses.join(" ")]);
    }
    out!("{t}");
    if !n.gpu_health.is_empty() {
        out!("{}", health_table(&n.gpu_health));
    }
    if d.replica_list.is_empty() {
        out!("replicas: none reported");
    } else {
        out!("{}", node_replicas_table(&d.replica_list));
    }
}

/// A table of replicas as agents report them.
pub fn node_replicas_table(replicas: &[NodeReplicaView]) -> String {
    let mut t = table(&[
        "REPLICA", "GEN", "MODEL", "PHASE", "PID", "PORT", "GPUS", "GPU MEM", "RESTARTS", "REASON",
    ]);
    for r in replicas {
        let gpus: Vec<String> = r.gpus.iter().map(u32::to_string).collect();
        t.add_row(vec![
            r.id.clone(),
            r.generation.to_string(),
            r.model.clone(),
            r.phase.clone(),
            opt(r.pid, ""),
            r.port.to_string(),
            gpus.join(","),
            crate::deploy::gpu_memory(
                r.gpu_memory_used_mib,
                r.gpu_memory_reserved_mib,
                r.over_gpu_memory_reservation,
            ),
            r.restarts.to_string(),
            r.reason.clone(),
        ]);
    }
    t.to_string()
}

fn print_node(n: NodeView, out: OutputFormat) {
    match out {
        OutputFormat::Json => print_json(&n),
        OutputFormat::Table => out!("{}", nodes_table(&[n])),
    }
}

/// Runs a node subcommand.
pub async fn run(cmd: NodeCommand, client: &Client, out: OutputFormat) -> Result<(), CliError> {
    match cmd {
        NodeCommand::List { stale } => {
            let r = client
                .admin(|mut c| async move { c.list_nodes(pb::ListNodesRequest { stale }).await })
                .await?;
            let nodes: Vec<NodeView> = r.nodes.into_iter().map(Into::into).collect();
            for n in &nodes {
                crate::credentials::warn_expiry(&format!("node {}", n.name), n.cert_expires_in_s);
            }
            match out {
                OutputFormat::Json => print_json(&nodes),
                OutputFormat::Table if nodes.is_empty() => eprintln!(
                    "no nodes; start an agent on a GPU machine: berth-agent --control {} --node-name NAME",
                    client.servers()
                ),
                OutputFormat::Table => out!("{}", nodes_table(&nodes)),
            }
        }
        NodeCommand::Remove { name, force } => {
            client
                .admin(|mut c| {
                    let name = name.clone();
                    async move { c.remove_node(pb::RemoveNodeRequest { name, force }).await }
                })
                .await?;
            if out == OutputFormat::Json {
                print_json(&serde_json::json!({ "removed": name }));
            }
            eprintln!(
                "node {name} removed: its certificates are revoked and its connections closed; the token it joined with cannot bring it back (to rejoin under another name as well, revoke that token: `berth token list`, `berth token revoke ID`)"
            );
        }
        NodeCommand::Cordon { name } => {
            let n = client
                .admin(|mut c| {
                    let name = name.clone();
                    async move { c.cordon_node(pb::CordonNodeRequest { name }).await }
                })
                .await?;
            eprintln!("cordoned node {name}: no new replicas land there; the ones running stay");
            print_node(n.into(), out);
        }
        NodeCommand::Drain {
            name,
            wait,
            timeout,
        } => {
            let n = client
                .admin(|mut c| {
                    let name = name.clone();
                    async move { c.drain_node(pb::CordonNodeRequest { name }).await }
                })
                .await?;
            eprintln!(
                "draining node {name}: its replicas move elsewhere, each replaced before it stops"
            );
            let n = if wait {
                let deadline = tokio::time::Instant::now() + timeout;
                let mut last = String::new();
                loop {
                    let r = client
                        .admin(|mut c| async move {
                            c.list_nodes(pb::ListNodesRequest { stale: false }).await
                        })
                        .await?;
                    let Some(node) = r.nodes.into_iter().find(|n| n.name == name) else {
                        return Err(CliError::Other(anyhow::anyhow!(
                            "node {name} is no longer registered while draining; see `berth node list`"
                        )));
                    };
                    let line = format!("{name}: {}, {} replicas left", node.state, node.replicas);
                    if line != last {
                        eprintln!("{line}");
                        last = line;
                    }
                    if node.state == "drained" {
                        break node;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(CliError::Other(anyhow::anyhow!(
                            "node {name} is not drained after {timeout:?}; see `berth replica list --node {name}`"
                        )));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            } else {
                n
            };
            print_node(n.into(), out);
        }
        NodeCommand::Gpu { cmd } => crate::gpu::run(cmd, client, out).await?,
        NodeCommand::SimulateFault(args) => crate::gpu::simulate(args, client, out).await?,
        NodeCommand::Uncordon { name } => {
            let n = client
                .admin(|mut c| {
                    let name = name.clone();
                    async move { c.uncordon_node(pb::CordonNodeRequest { name }).await }
                })
                .await?;
            eprintln!("uncordoned node {name}: new replicas may land there again");
            print_node(n.into(), out);
        }
        NodeCommand::Show { name, stale } => {
            let r = client
                .admin(|mut c| {
                    let name = name.clone();
                    async move { c.get_node(pb::GetNodeRequest { name, stale }).await }
                })
                .await?;
            let detail = NodeDetail {
                node: r.node.unwrap_or_default().into(),
                inventory: r.live.map(Into::into),
                inventory_error: Some(r.live_error).filter(|e| !e.is_empty()),
                registered_gpus: r
                    .registered
                    .map(|i| i.gpus.into_iter().map(Into::into).collect())
                    .unwrap_or_default(),
                replica_list: r.replicas.into_iter().map(Into::into).collect(),
            };
            match out {
                OutputFormat::Json => print_json(&detail),
                OutputFormat::Table => print_detail(&detail),
            }
        }
    }
    Ok(())
}
