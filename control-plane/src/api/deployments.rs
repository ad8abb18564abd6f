//! The Admin calls about deployments and replicas. Writes go through Raft
//! from any member. Reads that show what replicas are doing (phases, ports,
//! running counts) and `ExplainDeployment` need the leader's observations,
//! so a follower asks the leader; `stale` answers from the contacted member
//! alone, with placements but no phases.

use std::collections::HashMap;

use berth_common::{Deployment, ReplicaIntent};
use berth_proto::convert::{autoscale_policy_from_proto, deployment_request_from_proto};
use berth_proto::grpc::invalid_argument;
use berth_proto::v1::agent_client::AgentClient;
use berth_proto::v1::{self as pb};
use tonic::Status;

use super::{Route, here_or_leader, leader_client, not_found, route, status, unexpected};
use crate::reconciler::autoscaler::Autoscaler;
use crate::reconciler::nodes::{NodeTracker, Observation};
use crate::reconciler::replicas::Replicas;
use crate::state::{ClusterState, Command, DeploymentChange, ObjectKind, Outcome};

/// What the deployment calls need.
pub(super) struct Deployments<'a> {
    /// Node liveness and the leader's heartbeats.
    pub nodes: &'a NodeTracker,
    /// The replica loop (explanations, wake-ups).
    pub replicas: &'a Replicas,
    /// The autoscaler (its last decisions).
    pub autoscaler: &'a Autoscaler,
}

/// The phase an agent reports for a replica, if its node's last heartbeat has it.
fn reported<'a>(
    observed: &'a HashMap<String, Observation>,
    node: Option<&String>,
    id: &str,
) -> Option<&'a pb::ReplicaStatus> {
    observed
        .get(node?)?
        .report
        .replicas
        .iter()
        .find(|x| x.id == id)
}

fn with_counts(
    state: &ClusterState,
    d: &Deployment,
    observed: &HashMap<String, Observation>,
) -> pb::Deployment {
    let mut out: pb::Deployment = d.into();
    out.autoscale = state.autoscale.get(&d.name).map(Into::into);
    out.aliases = state
        .aliases
        .iter()
        .filter(|(_, owner)| **owner == d.name)
        .map(|(alias, _)| alias.clone())
        .collect();
    for r in state
        .replicas
        .values()
        .filter(|r| r.deployment == d.name && r.intent == ReplicaIntent::Run)
    {
        if r.revision == d.revision {
            out.replicas_updated += 1;
        }
        if r.node.is_none() {
            out.replicas_pending += 1;
            continue;
        }
        out.replicas_placed += 1;
        if reported(observed, r.node.as_ref(), &r.id)
            .is_some_and(|x| x.phase == "running" && x.generation >= r.generation)
        {
            out.replicas_running += 1;
        }
    }
    out
}

impl Deployments<'_> {
    /// Writes `command`, then waits until this member applied it too (a
    /// follower forwards writes), so the counts in the answer include it.
    async fn write(&self, command: Command) -> Result<Outcome, Status> {
        let outcome = self.nodes.member.write(command).await.map_err(status)?;
        self.replicas.wake();
        self.nodes
            .member
            .read_barrier(false)
            .await
            .map_err(status)?;
        Ok(outcome)
    }

    /// Writes a deployment command; the deployment it left, with its counts.
    async fn write_deployment(&self, command: Command) -> Result<pb::Deployment, Status> {
        match self.write(command).await? {
            Outcome::Deployment(d) => {
                let applied = self.nodes.member.state.read();
                Ok(with_counts(&applied.state, &d, &HashMap::new()))
            }
            other => Err(unexpected(other)),
        }
    }

    fn observations(&self, readings: bool) -> HashMap<String, Observation> {
        if readings {
            self.nodes.observations()
        } else {
            HashMap::new()
        }
    }

    /// `CreateDeployment`.
    pub async fn create(&self, req: pb::CreateDeploymentRequest) -> Result<pb::Deployment, Status> {
        let (name, request) =
            deployment_request_from_proto(req).map_err(|e| invalid_argument(&e))?;
        self.write_deployment(Command::CreateDeployment { name, request })
            .await
    }

    /// `ScaleDeployment`.
    pub async fn scale(&self, req: pb::ScaleDeploymentRequest) -> Result<pb::Deployment, Status> {
        self.write_deployment(Command::ScaleDeployment {
            name: req.name,
            replicas: req.replicas,
        })
        .await
    }

    /// `SetDeploymentAliases`.
    pub async fn set_aliases(
        &self,
        req: pb::SetDeploymentAliasesRequest,
    ) -> Result<pb::Deployment, Status> {
        self.write_deployment(Command::SetDeploymentAliases {
            name: req.name,
            aliases: req.aliases,
        })
        .await
    }

    /// `UpdateDeployment`.
    pub async fn update(&self, req: pb::UpdateDeploymentRequest) -> Result<pb::Deployment, Status> {
        if !req.version.is_empty() {
            berth_common::names::validate_version("version", &req.version)
                .map_err(|e| invalid_argument(&e))?;
        }
        let change = DeploymentChange {
            version: Some(req.version).filter(|v| !v.is_empty()),
            resources: req.resources.unwrap_or_default().into(),
            max_surge: req.max_surge,
            max_unavailable: req.max_unavailable,
        };
        self.write_deployment(Command::UpdateDeployment {
            name: req.name,
            change,
        })
        .await
    }

    /// `RollbackDeployment`.
    pub async fn rollback(
        &self,
        req: pb::RollbackDeploymentRequest,
    ) -> Result<pb::Deployment, Status> {
        self.write_deployment(Command::RollbackDeployment {
            name: req.name,
            to: req.to_revision,
        })
        .await
    }

    /// `DeleteDeployment`.
    pub async fn delete(&self, req: pb::DeleteDeploymentRequest) -> Result<(), Status> {
        self.write(Command::DeleteDeployment { name: req.name })
            .await
            .map(|_| ())
    }

    /// `GetDeployment`.
    pub async fn get(&self, req: pb::GetDeploymentRequest) -> Result<pb::Deployment, Status> {
        let readings = here_or_leader!(self.nodes, req.stale, req, get_deployment);
        let applied = self.nodes.member.state.read();
        let state = &applied.state;
        let d = state
            .deployments
            .get(&req.name)
            .ok_or_else(|| not_found(ObjectKind::Deployment, &req.name))?;
        let mut out = with_counts(state, d, &self.observations(readings));
        self.autoscale_status(&mut out);
        Ok(out)
    }

    /// Adds the autoscaler's last decision (the leader's memory).
    fn autoscale_status(&self, d: &mut pb::Deployment) {
        if let Some(s) = self.autoscaler.status(&d.name) {
            d.autoscale_status = s.text;
            d.autoscale_blocked = s.blocked;
        }
    }

    /// `SetAutoscale`.
    pub async fn set_autoscale(
        &self,
        req: pb::SetAutoscaleRequest,
    ) -> Result<pb::Deployment, Status> {
        let policy = req
            .policy
            .as_ref()
            .map(autoscale_policy_from_proto)
            .transpose()
            .map_err(|e| invalid_argument(&e))?;
        self.write_deployment(Command::SetAutoscale {
            name: req.name,
            policy,
        })
        .await
    }

    /// `ListDeployments`.
    pub async fn list(
        &self,
        req: pb::ListDeploymentsRequest,
    ) -> Result<pb::ListDeploymentsResponse, Status> {
        let readings = here_or_leader!(self.nodes, req.stale, req, list_deployments);
        let applied = self.nodes.member.state.read();
        let state = &applied.state;
        let observed = self.observations(readings);
        Ok(pb::ListDeploymentsResponse {
            deployments: state
                .deployments
                .values()
                .map(|d| {
                    let mut out = with_counts(state, d, &observed);
                    self.autoscale_status(&mut out);
                    out
                })
                .collect(),
        })
    }

    /// `ExplainDeployment`: only the leader has the scheduler's reasons.
    pub async fn explain(
        &self,
        req: pb::ExplainDeploymentRequest,
    ) -> Result<pb::ExplainDeploymentResponse, Status> {
        if let Route::Leader(addr) = route(self.nodes, false).await? {
            return leader_client(&self.nodes.member.dialer, &addr)?
                .explain_deployment(req)
                .await
                .map(tonic::Response::into_inner);
        }
        let applied = self.nodes.member.state.read();
        let state = &applied.state;
        if !state.deployments.contains_key(&req.name) {
            return Err(not_found(ObjectKind::Deployment, &req.name));
        }
        let reasons: HashMap<String, String> =
            self.replicas.explanations(&req.name).into_iter().collect();
        Ok(pb::ExplainDeploymentResponse {
            pending: state
                .replicas
                .values()
                .filter(|r| r.deployment == req.name && r.pending())
                .map(|r| pb::PendingReplica {
                    replica: r.id.clone(),
                    why: reasons.get(&r.id).cloned().unwrap_or_else(|| {
                        "not considered yet: the scheduler runs a few times a second".into()
                    }),
                })
                .collect(),
        })
    }

    /// `ListClusterReplicas`.
    pub async fn replicas(
        &self,
        req: pb::ListClusterReplicasRequest,
    ) -> Result<pb::ListClusterReplicasResponse, Status> {
        let readings = here_or_leader!(self.nodes, req.stale, req, list_cluster_replicas);
        let applied = self.nodes.member.state.read();
        let state = &applied.state;
        if !req.deployment.is_empty() && !state.deployments.contains_key(&req.deployment) {
            return Err(not_found(ObjectKind::Deployment, &req.deployment));
        }
        if !req.node.is_empty() && !state.nodes.contains_key(&req.node) {
            return Err(not_found(ObjectKind::Node, &req.node));
        }
        let observed = self.observations(readings);
        let explanations: HashMap<String, String> = if req.deployment.is_empty() {
            state
                .deployments
                .keys()
                .flat_map(|d| self.replicas.explanations(d))
                .collect()
        } else {
            self.replicas
                .explanations(&req.deployment)
                .into_iter()
                .collect()
        };
        let replicas = state
            .replicas
            .values()
            .filter(|r| req.deployment.is_empty() || r.deployment == req.deployment)
            .filter(|r| req.node.is_empty() || r.node.as_deref() == Some(req.node.as_str()))
            .map(|r| {
                let node = r.node.as_ref().and_then(|n| state.nodes.get(n));
                let revision = state.deployments.get(&r.deployment).map(|d| {
                    d.history
                        .iter()
                        .find(|h| h.revision == r.revision)
                        .map_or(&d.spec, |h| &h.spec)
                });
                let seen = reported(&observed, r.node.as_ref(), &r.id)
                    .filter(|x| x.generation >= r.generation);
                let (phase, reason) = match (&r.node, seen) {
                    (None, _) => (
                        "pending".to_string(),
                        explanations.get(&r.id).cloned().unwrap_or_default(),
                    ),
                    (Some(_), Some(x)) => (x.phase.clone(), x.reason.clone()),
                    (Some(n), None) if !readings => (
                        "unknown".into(),
                        format!("placed on {n}; no phase in a stale read"),
                    ),
                    (Some(n), None) => (
                        "pending".into(),
                        format!("placed on {n}; waiting for its agent to start it"),
                    ),
                };
                let port = seen.map_or(0, |x| x.port);
                let host = node
                    .and_then(|n| n.addr.rsplit_once(':').map(|(h, _)| h.to_string()))
                    .unwrap_or_default();
                pb::ClusterReplica {
                    id: r.id.clone(),
                    deployment: r.deployment.clone(),
                    revision: r.revision,
                    generation: r.generation,
                    node: r.node.clone().unwrap_or_default(),
                    gpus: r.gpus.iter().map(|g| g.index).collect(),
                    gpu_uuids: r
                        .gpus
                        .iter()
                        .filter_map(|g| node?.inventory.gpus.iter().find(|d| d.index == g.index))
                        .map(|d| d.uuid.clone())
                        .collect(),
                    intent: match r.intent {
                        ReplicaIntent::Run => "run",
                        ReplicaIntent::Remove => "remove",
                    }
                    .into(),
                    phase,
                    reason,
                    pid: seen.map_or(0, |x| x.pid),
                    port,
                    restarts: seen.map_or(0, |x| x.restarts),
                    endpoint: if port > 0 && !host.is_empty() {
                        format!("{host}:{port}")
                    } else {
                        String::new()
                    },
                    model: revision.map(|s| s.model.clone()).unwrap_or_default(),
                    version: revision.map(|s| s.version.clone()).unwrap_or_default(),
                    queue_depth: seen.and_then(|x| x.queue_depth),
                    running_requests: seen.and_then(|x| x.running_requests),
                    kv_cache_milli: seen.and_then(|x| x.kv_cache_milli),
                    // What the state reserves (a whole GPU's memory for a
                    // share of 0), not what the agent last said: it holds
                    // for a pending replica too.
                    gpu_memory_reserved_mib: r
                        .gpus
                        .iter()
                        .map(|g| match g.memory_mib {
                            0 => node
                                .and_then(|n| n.inventory.gpus.iter().find(|d| d.index == g.index))
                                .map_or(0, |d| d.memory_mib),
                            m => m,
                        })
                        .sum(),
                    gpu_memory_used_mib: seen.and_then(|x| x.gpu_memory_used_mib),
                    over_gpu_memory_reservation: seen
                        .is_some_and(|x| x.over_gpu_memory_reservation),
                }
            })
            .collect();
        Ok(pb::ListClusterReplicasResponse { replicas })
    }

    /// `ReplicaLogs`: any member looks up the replica's node and streams the
    /// logs from its agent.
    pub async fn logs(
        &self,
        req: pb::ReplicaLogsRequest,
    ) -> Result<tonic::Streaming<pb::LogChunk>, Status> {
        let (node, addr) = {
            let applied = self.nodes.member.state.read();
            let state = &applied.state;
            let r = state
                .replicas
                .get(&req.id)
                .ok_or_else(|| not_found(ObjectKind::Replica, &req.id))?;
            let Some(node) = r.node.as_ref().and_then(|n| state.nodes.get(n)) else {
                return Err(Status::failed_precondition(format!(
                    "replica {} is pending: it has no node yet, so no logs; see `berth deploy explain {}`",
                    req.id, r.deployment
                )));
            };
            (node.name.clone(), node.addr.clone())
        };
        let channel = self
            .nodes
            .member
            .dialer
            .agent_channel(&addr, &node)
            .map_err(|e| Status::internal(e.to_string()))?;
        AgentClient::new(channel)
            .stream_logs(berth_proto::grpc::for_node(
                &node,
                pb::StreamLogsRequest {
                    id: req.id.clone(),
                    tail: req.tail,
                    follow: req.follow,
                },
            ))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| {
                Status::new(
                    s.code(),
                    format!("the agent of node {node} (at {addr}): {}", s.message()),
                )
            })
    }
}
