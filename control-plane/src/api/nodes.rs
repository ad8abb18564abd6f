//! The Admin calls about nodes: `ListNodes` and `GetNode`. The node records
//! come from the replicated state; heartbeat readings (age, free GPU
//! memory, replica phases) only the leader has, so a follower asks the
//! leader. `stale` answers from the contacted member alone, without
//! readings. `GetNode` also asks the node's agent for its whole inventory.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use berth_common::Node;
use berth_common::gpu_health::{GpuFaults, GpuRecord, Quarantine, QuarantinedBy, assess};
use berth_proto::grpc;
use berth_proto::v1::agent_client::AgentClient;
use berth_proto::v1::{self as pb};
use tokio::time::Instant;
use tonic::Status;

use super::{here_or_leader, not_found, status, unexpected};
use crate::reconciler::nodes::{NodeTracker, Observation};
use crate::state::ObjectKind;

/// How long `GetNode` waits for the agent's inventory.
const AGENT_TIMEOUT: Duration = Duration::from_secs(3);

/// `ListNodes`.
pub(super) async fn list(
    nodes: &NodeTracker,
    req: pb::ListNodesRequest,
) -> Result<pb::ListNodesResponse, Status> {
    let readings = here_or_leader!(nodes, req.stale, req, list_nodes);
    let observed = if readings {
        nodes.observations()
    } else {
        HashMap::new()
    };
    let now = Instant::now();
    let applied = nodes.member.state.read();
    let expiries = applied.state.security.expiries();
    Ok(pb::ListNodesResponse {
        nodes: applied
            .state
            .nodes
            .values()
            .map(|n| {
                let mut s = summary(
                    n,
                    applied.state.gpus.get(&n.name),
                    observed.get(&n.name),
                    now,
                );
                s.cert_expires_ms = expiries.get(format!("node {}", n.name).as_str()).copied();
                s
            })
            .collect(),
    })
}

/// `GetNode`.
pub(super) async fn get(
    nodes: &NodeTracker,
    req: pb::GetNodeRequest,
) -> Result<pb::GetNodeResponse, Status> {
    let readings = here_or_leader!(nodes, req.stale, req, get_node);
    let node = node_record(nodes, &req.name)?;
    let observation = if readings {
        nodes.observation(&node.name)
    } else {
        None
    };
    let (live, live_error) =
        match live_inventory(&nodes.member.dialer, &node.name, &node.addr).await {
            Ok(inv) => (Some(inv), String::new()),
            Err(e) => (None, e),
        };
    let records = nodes
        .member
        .state
        .read()
        .state
        .gpus
        .get(&node.name)
        .cloned();
    let mut summary = summary(
        &node,
        records.as_ref(),
        observation.as_ref(),
        Instant::now(),
    );
    summary.cert_expires_ms = nodes
        .member
        .state
        .read()
        .state
        .security
        .expiries()
        .get(format!("node {}", node.name).as_str())
        .copied();
    Ok(pb::GetNodeResponse {
        node: Some(summary),
        registered: Some((&node.inventory).into()),
        live,
        live_error,
        replicas: observation.map(|o| o.report.replicas).unwrap_or_default(),
    })
}

async fn live_inventory(
    dialer: &grpc::Dialer,
    node: &str,
    addr: &str,
) -> Result<pb::Inventory, String> {
    let channel = dialer
        .agent_channel(addr, node)
        .map_err(|e| e.to_string())?;
    let mut req = grpc::for_node(node, pb::GetInventoryRequest {});
    req.set_timeout(AGENT_TIMEOUT);
    AgentClient::new(channel)
        .get_inventory(req)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| format!("the agent at {addr} did not answer: {}", s.message()))
}

fn summary(
    node: &Node,
    records: Option<&BTreeMap<u32, GpuRecord>>,
    observed: Option<&Observation>,
    now: Instant,
) -> pb::NodeSummary {
    let total = node.inventory.gpu_memory_mib();
    let mut models: Vec<String> = node
        .inventory
        .gpus
        .iter()
        .map(|g| g.model.clone())
        .collect();
    models.dedup();
    pb::NodeSummary {
        name: node.name.clone(),
        state: node.display_state().into(),
        addr: node.addr.clone(),
        labels: node.labels.clone().into_iter().collect(),
        simulated: node.inventory.simulated(),
        gpus: node.inventory.gpus.len() as u32,
        gpu_memory_total_mib: total,
        gpu_memory_free_mib: observed.map(|o| {
            let used = o
                .report
                .gpus
                .iter()
                .fold(0u64, |sum, g| sum.saturating_add(g.memory_used_mib));
            total.saturating_sub(used)
        }),
        cpu_milli: node.inventory.cpu_milli,
        memory_mib: node.inventory.memory_mib,
        last_heartbeat_age_s: observed.map(|o| now.saturating_duration_since(o.at).as_secs_f64()),
        epoch: node.epoch,
        state_since_ms: node.state_since_ms,
        registered_at_ms: node.registered_at_ms,
        gpu_models: models,
        replicas: observed.map_or(0, |o| {
            o.report
                .replicas
                .iter()
                .filter(|r| r.desired == "running")
                .count() as u32
        }),
        gpu_source: node.inventory.gpu_source.to_string(),
        cert_expires_ms: None,
        gpu_status: gpu_status(node, records, observed),
    }
}

/// Each GPU's health (judged from the last heartbeat against the release
/// baseline, as the leader judges it) and quarantine.
fn gpu_status(
    node: &Node,
    records: Option<&BTreeMap<u32, GpuRecord>>,
    observed: Option<&Observation>,
) -> Vec<pb::GpuStatus> {
    node.inventory
        .gpus
        .iter()
        .map(|g| {
            let record = records.and_then(|r| r.get(&g.index));
            let reading = observed.and_then(|o| o.report.gpus.iter().find(|r| r.index == g.index));
            let faults = reading.map(|r| GpuFaults::from(&r.faults.unwrap_or_default()));
            let (health, reason) = match (faults, observed) {
                (Some(f), Some(o)) => {
                    let baseline = record
                        .map(|r| r.baseline_for(&o.instance))
                        .unwrap_or_default();
                    let (h, why) = assess(&f, &baseline);
                    (h.as_str().to_string(), why)
                }
                _ => (
                    "unknown".to_string(),
                    "no heartbeat from the node yet".to_string(),
                ),
            };
            let q = record.and_then(|r| r.quarantine.as_ref());
            pb::GpuStatus {
                index: g.index,
                uuid: g.uuid.clone(),
                health,
                reason,
                quarantined: q.is_some(),
                quarantine_reason: q.map(|q| q.reason.clone()).unwrap_or_default(),
                quarantined_by: q.map(|q| q.by.as_str().to_string()).unwrap_or_default(),
                quarantined_since_ms: q.map_or(0, |q| q.since_ms),
                faults: faults.map(|f| (&f).into()),
                memory_used_mib: reading.map(|r| r.memory_used_mib),
                foreign_memory_mib: reading.map_or(0, |r| r.foreign_memory_mib),
                over_reservation_mib: reading.map_or(0, |r| r.over_reservation_mib),
            }
        })
        .collect()
}

/// `CordonNode` and `UncordonNode`.
pub(super) async fn set_admin(
    nodes: &NodeTracker,
    name: String,
    admin: berth_common::NodeAdmin,
) -> Result<pb::NodeSummary, Status> {
    berth_common::names::validate_name("name", &name)
        .map_err(|e| berth_proto::grpc::invalid_argument(&e))?;
    write_node_command(nodes, crate::state::Command::SetNodeAdmin { name, admin }).await
}

/// Node `name`'s record as this member applied it, or `NotFound`.
fn node_record(nodes: &NodeTracker, name: &str) -> Result<Node, Status> {
    nodes
        .member
        .state
        .read()
        .state
        .nodes
        .get(name)
        .cloned()
        .ok_or_else(|| not_found(ObjectKind::Node, name))
}

/// The summary of `node` as this member sees it now.
fn node_summary(nodes: &NodeTracker, node: &Node) -> pb::NodeSummary {
    let observed = nodes.observation(&node.name);
    let records = nodes
        .member
        .state
        .read()
        .state
        .gpus
        .get(&node.name)
        .cloned();
    summary(node, records.as_ref(), observed.as_ref(), Instant::now())
}

/// `QuarantineGpu`: an operator takes a GPU out of placement.
pub(super) async fn quarantine_gpu(
    nodes: &NodeTracker,
    req: pb::QuarantineGpuRequest,
) -> Result<pb::NodeSummary, Status> {
    berth_common::names::validate_name("node", &req.node)
        .map_err(|e| berth_proto::grpc::invalid_argument(&e))?;
    let reason = match req.reason.trim() {
        "" => "quarantined by an operator".to_string(),
        r if r.len() > 256 => {
            return Err(Status::invalid_argument(format!(
                "reason is {} characters long: must be at most 256",
                r.len()
            )));
        }
        r => r.to_string(),
    };
    let uuid = nodes
        .member
        .state
        .read()
        .state
        .nodes
        .get(&req.node)
        .and_then(|n| n.inventory.gpus.iter().find(|g| g.index == req.gpu))
        .map(|g| g.uuid.clone())
        .unwrap_or_default();
    let command = crate::state::Command::QuarantineGpu {
        node: req.node.clone(),
        gpu: req.gpu,
        quarantine: Quarantine {
            uuid,
            reason,
            by: QuarantinedBy::Operator,
            since_ms: crate::member::now_ms(),
            faults: None,
        },
    };
    write_node_command(nodes, command).await
}

/// `ReleaseGpu`: an operator returns a quarantined GPU to placement.
pub(super) async fn release_gpu(
    nodes: &NodeTracker,
    req: pb::ReleaseGpuRequest,
) -> Result<pb::NodeSummary, Status> {
    berth_common::names::validate_name("node", &req.node)
        .map_err(|e| berth_proto::grpc::invalid_argument(&e))?;
    let command = crate::state::Command::ReleaseGpu {
        node: req.node,
        gpu: req.gpu,
    };
    write_node_command(nodes, command).await
}

/// Writes a command whose outcome is a node, and answers its summary.
async fn write_node_command(
    nodes: &NodeTracker,
    command: crate::state::Command,
) -> Result<pb::NodeSummary, Status> {
    match nodes.member.write(command).await.map_err(status)? {
        crate::state::Outcome::Node(node) => Ok(node_summary(nodes, &node)),
        other => Err(unexpected(other)),
    }
}

/// `SimulateGpuFault`: relays the fault to the node's agent, which refuses
/// it unless its GPUs are simulated.
pub(super) async fn simulate_fault(
    nodes: &NodeTracker,
    req: pb::SimulateGpuFaultRequest,
) -> Result<pb::Gpu, Status> {
    berth_common::names::validate_name("node", &req.node)
        .map_err(|e| berth_proto::grpc::invalid_argument(&e))?;
    let node = node_record(nodes, &req.node)?;
    if !node.inventory.simulated() {
        return Err(Status::failed_precondition(format!(
            "node {}'s GPUs are real ({}): faults can only be injected into simulated GPUs (berth-agent --simulate-gpus)",
            node.name, node.inventory.gpu_source
        )));
    }
    let channel = nodes
        .member
        .dialer
        .agent_channel(&node.addr, &node.name)
        .map_err(|e| Status::internal(e.to_string()))?;
    let mut call = grpc::for_node(&node.name, req);
    call.set_timeout(AGENT_TIMEOUT);
    AgentClient::new(channel)
        .simulate_gpu_fault(call)
        .await
        .map(tonic::Response::into_inner)
}
