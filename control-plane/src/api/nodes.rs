//! The Admin calls about nodes: `ListNodes` and `GetNode`. The node records
//! come from the replicated state; heartbeat readings (age, free GPU
//! memory, replica phases) only the leader has, so a follower asks the
//! leader. `stale` answers from the contacted member alone, without
//! readings. `GetNode` also asks the node's agent for its whole inventory.

use std::collections::HashMap;
use std::time::Duration;

use berth_common::Node;
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
                let mut s = summary(n, observed.get(&n.name), now);
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
    let node = nodes
        .member
        .state
        .read()
        .state
        .nodes
        .get(&req.name)
        .cloned()
        .ok_or_else(|| not_found(ObjectKind::Node, &req.name))?;
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
    let mut summary = summary(&node, observation.as_ref(), Instant::now());
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

fn summary(node: &Node, observed: Option<&Observation>, now: Instant) -> pb::NodeSummary {
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
    }
}

/// `CordonNode` and `UncordonNode`.
pub(super) async fn set_admin(
    nodes: &NodeTracker,
    name: String,
    admin: berth_common::NodeAdmin,
) -> Result<pb::NodeSummary, Status> {
    berth_common::names::validate_name("name", &name)
        .map_err(|e| berth_proto::grpc::invalid_argument(&e))?;
    match nodes
        .member
        .write(crate::state::Command::SetNodeAdmin { name, admin })
        .await
        .map_err(status)?
    {
        crate::state::Outcome::Node(node) => {
            let observed = nodes.observation(&node.name);
            Ok(summary(&node, observed.as_ref(), Instant::now()))
        }
        other => Err(unexpected(other)),
    }
}
