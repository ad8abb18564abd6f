//! `Serving`: the replicas that can take requests, streamed to gateways as a
//! snapshot and then changes. Only the leader hears heartbeats, so only the
//! leader knows which replicas passed their probe; a follower relays the
//! leader's stream, so that a gateway may watch any member.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::{Duration, Instant};

use berth_common::{NodeState, ReplicaIntent};
use berth_proto::v1 as pb;
use berth_proto::v1::serving_client::ServingClient;
use berth_proto::v1::serving_server::Serving;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::reconciler::autoscaler::Autoscaler;
use crate::reconciler::nodes::{NodeTracker, NotHere};
use crate::state::ClusterState;
use crate::state::load_times;

/// How often the leader looks for changes to send. A replica becomes
/// routable at most this long after the heartbeat that says it is ready.
const EVERY: Duration = Duration::from_millis(200);

/// How often a leader that streams confirms with a quorum that it still
/// leads, so that a deposed leader cut off from the others stops feeding
/// gateways an old view.
const CONFIRM_EVERY: Duration = Duration::from_secs(2);

/// The `Serving` gRPC service.
#[derive(Clone)]
pub struct ServingService {
    nodes: NodeTracker,
    autoscaler: Autoscaler,
    shutdown: CancellationToken,
}

impl ServingService {
    /// The service of the member behind `nodes`; gateways' load reports go
    /// to `autoscaler`.
    pub fn new(nodes: NodeTracker, autoscaler: Autoscaler, shutdown: CancellationToken) -> Self {
        ServingService {
            nodes,
            autoscaler,
            shutdown,
        }
    }
}

impl ServingService {
    /// A client of the leader at `addr`, for relaying.
    fn leader(&self, addr: &str) -> Result<ServingClient<berth_proto::grpc::Channel>, Status> {
        let channel = self
            .nodes
            .member
            .dialer
            .channel(addr)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(ServingClient::new(channel))
    }
}

/// The most deployments one load report may carry.
const MAX_REPORTED: usize = 100_000;

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::EndpointUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Serving for ServingService {
    type WatchEndpointsStream = UpdateStream;

    async fn watch_endpoints(
        &self,
        request: Request<pb::WatchEndpointsRequest>,
    ) -> Result<Response<UpdateStream>, Status> {
        let req = request.into_inner();
        match self.nodes.leader_here() {
            Ok(_) => {
                self.nodes
                    .leader_confirmed()
                    .await
                    .map_err(super::registry::redirect)?;
                tracing::info!(gateway = %req.gateway, "a gateway watches the endpoints");
                Ok(Response::new(self.stream_here()))
            }
            Err(NotHere::Leader(addr)) => {
                let upstream = self.leader(&addr)?.watch_endpoints(req).await?.into_inner();
                Ok(Response::new(Box::pin(upstream)))
            }
            Err(e) => Err(super::registry::redirect(e)),
        }
    }

    async fn report_load(
        &self,
        request: Request<pb::LoadReport>,
    ) -> Result<Response<pb::LoadReportAck>, Status> {
        let report = request.into_inner();
        if report.gateway.is_empty() || report.gateway.len() > 256 {
            return Err(Status::invalid_argument(format!(
                "gateway {:?}: must be 1-256 characters (the reporting gateway's instance)",
                report.gateway
            )));
        }
        if report.deployments.len() > MAX_REPORTED {
            return Err(Status::invalid_argument(format!(
                "deployments: {} entries; at most {MAX_REPORTED} per report",
                report.deployments.len()
            )));
        }
        match self.nodes.leader_here() {
            Ok(_) => {
                self.autoscaler.board().record(report);
                Ok(Response::new(pb::LoadReportAck {}))
            }
            Err(NotHere::Leader(addr)) => self.leader(&addr)?.report_load(report).await,
            Err(e) => Err(super::registry::redirect(e)),
        }
    }
}

impl ServingService {
    /// The leader's stream: a snapshot, then a change set whenever the
    /// endpoints differ from what this stream last sent.
    fn stream_here(&self) -> UpdateStream {
        let (tx, rx) = mpsc::channel(8);
        let nodes = self.nodes.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let start = nodes.member.view();
            let mut sent: HashMap<String, pb::Endpoint> = HashMap::new();
            let mut sent_routes: Option<Vec<pb::Route>> = None;
            let mut snapshot = true;
            let mut confirmed = Instant::now();
            loop {
                let view = nodes.member.view();
                let leads = view.leader.as_ref().map(|l| l.0) == Some(nodes.member.id)
                    && view.term == start.term;
                let stale = confirmed.elapsed() >= CONFIRM_EVERY
                    && match nodes.leader_confirmed().await {
                        Ok(_) => {
                            confirmed = Instant::now();
                            false
                        }
                        Err(_) => true,
                    };
                if !leads || stale {
                    let _ = tx
                        .send(Err(Status::unavailable(format!(
                            "member {} no longer leads (term {}); watch again",
                            nodes.member.id, start.term
                        ))))
                        .await;
                    return;
                }
                let now = ready_endpoints(&nodes);
                let (upsert, remove) = changes(&sent, &now);
                let routes = {
                    let applied = nodes.member.state.read();
                    routes(&applied.state)
                };
                let new_routes = sent_routes.as_ref() != Some(&routes);
                if snapshot || !upsert.is_empty() || !remove.is_empty() || new_routes {
                    let update = pb::EndpointUpdate {
                        snapshot,
                        upsert,
                        remove,
                        leader_id: nodes.member.id,
                        term: view.term,
                        routes: if new_routes {
                            routes.clone()
                        } else {
                            Vec::new()
                        },
                        routes_present: new_routes,
                    };
                    if tx.send(Ok(update)).await.is_err() {
                        return;
                    }
                    snapshot = false;
                    sent = now;
                    sent_routes = Some(routes);
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(EVERY) => {}
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

/// What changed from `before` to `now`: endpoints to add or replace, and
/// replica ids to remove (sorted, so that updates are reproducible).
fn changes(
    before: &HashMap<String, pb::Endpoint>,
    now: &HashMap<String, pb::Endpoint>,
) -> (Vec<pb::Endpoint>, Vec<String>) {
    let mut upsert: Vec<pb::Endpoint> = now
        .iter()
        .filter(|(id, e)| before.get(*id) != Some(e))
        .map(|(_, e)| e.clone())
        .collect();
    upsert.sort_by(|a, b| a.replica.cmp(&b.replica));
    let mut remove: Vec<String> = before
        .keys()
        .filter(|id| !now.contains_key(*id))
        .cloned()
        .collect();
    remove.sort();
    (upsert, remove)
}

/// Every deployment a request may name, sorted by name.
fn routes(state: &ClusterState) -> Vec<pb::Route> {
    state
        .deployments
        .values()
        .map(|d| pb::Route {
            deployment: d.name.clone(),
            model: d.spec.model.clone(),
            version: d.spec.version.clone(),
            aliases: state
                .aliases
                .iter()
                .filter(|(_, owner)| **owner == d.name)
                .map(|(alias, _)| alias.clone())
                .collect(),
            scales_from_zero: state
                .autoscale
                .get(&d.name)
                .is_some_and(|p| p.scale_to_zero_after_ms.is_some()),
            load_time_ms: load_times::estimate_ms(state, &d.spec.model).unwrap_or(0),
        })
        .collect()
}

/// The replicas that can take requests, by replica id: they should run,
/// their node is not down and heartbeated within the grace period, and its
/// last heartbeat says they run the current generation and passed their
/// probe (`running`).
fn ready_endpoints(nodes: &NodeTracker) -> HashMap<String, pb::Endpoint> {
    let applied = nodes.member.state.read();
    let state = &applied.state;
    let mut aliases: HashMap<&str, Vec<String>> = HashMap::new();
    for (alias, deployment) in &state.aliases {
        aliases
            .entry(deployment.as_str())
            .or_default()
            .push(alias.clone());
    }
    nodes.with_observations(|observed| {
        let reported: HashMap<&str, (&str, &pb::ReplicaStatus)> = observed
            .iter()
            .filter(|(_, o)| o.at.elapsed() <= nodes.grace)
            .flat_map(|(node, o)| {
                o.report
                    .replicas
                    .iter()
                    .map(move |x| (x.id.as_str(), (node.as_str(), x)))
            })
            .collect();
        state
            .replicas
            .values()
            .filter(|r| r.intent == ReplicaIntent::Run)
            .filter_map(|r| {
                let node_name = r.node.as_deref()?;
                let node = state.nodes.get(node_name)?;
                if node.state == NodeState::Down {
                    return None;
                }
                let (from, seen) = reported.get(r.id.as_str())?;
                if *from != node_name
                    || seen.generation < r.generation
                    || seen.phase != "running"
                    || seen.port == 0
                {
                    return None;
                }
                let deployment = state.deployments.get(&r.deployment)?;
                let spec = deployment
                    .history
                    .iter()
                    .find(|h| h.revision == r.revision)
                    .map_or(&deployment.spec, |h| &h.spec);
                let runtime = state
                    .models
                    .get(&spec.model)
                    .and_then(|m| m.versions.get(&spec.version))
                    .map(|v| v.spec.runtime.name().to_string())
                    .unwrap_or_default();
                // The agent's host, brackets of an IPv6 address kept.
                let host = node
                    .addr
                    .rsplit_once(':')
                    .map_or(node.addr.as_str(), |(h, _)| h);
                Some((
                    r.id.clone(),
                    pb::Endpoint {
                        replica: r.id.clone(),
                        deployment: r.deployment.clone(),
                        model: spec.model.clone(),
                        version: spec.version.clone(),
                        address: format!("{host}:{}", seen.port),
                        node: node_name.to_string(),
                        runtime,
                        queue_depth: seen.queue_depth.unwrap_or(0),
                        aliases: aliases
                            .get(r.deployment.as_str())
                            .cloned()
                            .unwrap_or_default(),
                    },
                ))
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(id: &str, addr: &str) -> pb::Endpoint {
        pb::Endpoint {
            replica: id.into(),
            address: addr.into(),
            ..Default::default()
        }
    }

    #[test]
    fn changes_carry_additions_moves_and_removals_only() {
        let before: HashMap<String, pb::Endpoint> = [
            ("a".to_string(), endpoint("a", "h:1")),
            ("b".to_string(), endpoint("b", "h:2")),
            ("c".to_string(), endpoint("c", "h:3")),
        ]
        .into();
        let now: HashMap<String, pb::Endpoint> = [
            ("a".to_string(), endpoint("a", "h:1")),
            ("b".to_string(), endpoint("b", "h:9")),
            ("d".to_string(), endpoint("d", "h:4")),
        ]
        .into();
        let (upsert, remove) = changes(&before, &now);
        let ids: Vec<&str> = upsert.iter().map(|e| e.replica.as_str()).collect();
        assert_eq!(ids, ["b", "d"]);
        assert_eq!(upsert[0].address, "h:9");
        assert_eq!(remove, ["c"]);
        assert_eq!(changes(&now, &now), (vec![], vec![]));
    }
}
