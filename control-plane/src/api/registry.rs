//! `berth.v1.NodeRegistry`: agents register their node and heartbeat. Both
//! calls are served by the leader (heartbeats live in its memory); another
//! member answers `FailedPrecondition` with the leader's address in the
//! `berth-leader` metadata, or `Unavailable` when there is no leader.
//! Heartbeats come as messages on one `HeartbeatStream` per agent (decision
//! 073), each judged as a `Heartbeat` call would be.

use std::pin::Pin;

use berth_proto::auth::Principal;
use berth_proto::convert::registration_from_proto;
use berth_proto::grpc::{LEADER_KEY, invalid_argument};
use berth_proto::v1::node_registry_server::NodeRegistry;
use berth_proto::v1::{self as pb};
use futures::Stream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use super::status;
use crate::reconciler::nodes::{NodeTracker, NotHere};

/// The NodeRegistry service of one member.
pub struct RegistryService {
    nodes: NodeTracker,
    /// Ends open heartbeat streams, so that a stopping member does not
    /// wait on them and its agents move on at once.
    shutdown: CancellationToken,
}

impl RegistryService {
    /// Serves registry calls through `nodes` until `shutdown`.
    pub fn new(nodes: NodeTracker, shutdown: CancellationToken) -> Self {
        RegistryService { nodes, shutdown }
    }

    async fn leader(&self) -> Result<String, Status> {
        self.nodes.leader_confirmed().await.map_err(redirect)
    }
}

/// The answer of a member that does not lead.
pub fn redirect(not_here: NotHere) -> Status {
    match not_here {
        NotHere::Leader(addr) => {
            let mut s = Status::failed_precondition(format!(
                "this member does not lead; the leader is at {addr}"
            ));
            if let Ok(v) = MetadataValue::try_from(addr.as_str()) {
                s.metadata_mut().insert(LEADER_KEY, v);
            }
            s
        }
        NotHere::NoLeader => Status::unavailable(
            "no leader: the cluster has not elected one (is a majority of members up?); retry in a moment",
        ),
    }
}

/// An agent speaks for its own node only: the node its certificate names.
/// (No principal: plaintext development mode, nothing to check.)
fn own_node(caller: Option<&Principal>, node: &str) -> Result<(), Status> {
    match caller {
        Some(p) if p.node() != Some(node) => Err(Status::permission_denied(format!(
            "{} may not speak for node {node:?}: an agent's certificate is good for its own node only",
            p.node().map_or_else(
                || "this caller".to_string(),
                |n| format!("the agent of node {n:?}")
            )
        ))),
        _ => Ok(()),
    }
}

/// One heartbeat, judged and answered as the `Heartbeat` call does.
async fn heartbeat(
    nodes: &NodeTracker,
    caller: Option<&Principal>,
    report: pb::HeartbeatRequest,
) -> Result<pb::HeartbeatResponse, Status> {
    own_node(caller, &report.node)?;
    nodes.leader_confirmed().await.map_err(redirect)?;
    let answer = nodes.heartbeat(report).await.map_err(status)?;
    Ok(match answer {
        Some(a) => pb::HeartbeatResponse {
            registered: true,
            epoch: a.epoch,
            desired: a
                .desired
                .into_iter()
                .map(|(id, generation)| pb::DesiredReplica { id, generation })
                .collect(),
            state_version: a.state_version,
        },
        None => pb::HeartbeatResponse::default(),
    })
}

type HeartbeatAnswers = Pin<Box<dyn Stream<Item = Result<pb::HeartbeatResponse, Status>> + Send>>;

#[tonic::async_trait]
impl NodeRegistry for RegistryService {
    #[tracing::instrument(skip_all, fields(node = %request.get_ref().node))]
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        own_node(berth_proto::auth::caller(&request), &request.get_ref().node)?;
        let leader_addr = self.leader().await?;
        let registration =
            registration_from_proto(request.into_inner()).map_err(|e| invalid_argument(&e))?;
        let node = self.nodes.register(registration).await.map_err(status)?;
        Ok(Response::new(pb::RegisterResponse {
            epoch: node.epoch,
            state: node.state.as_str().into(),
            leader_addr,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let caller = berth_proto::auth::caller(&request).cloned();
        heartbeat(&self.nodes, caller.as_ref(), request.into_inner())
            .await
            .map(Response::new)
    }

    type HeartbeatStreamStream = HeartbeatAnswers;

    async fn heartbeat_stream(
        &self,
        request: Request<Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<HeartbeatAnswers>, Status> {
        // Opening the stream is refused where a heartbeat would be, so the
        // agent is redirected before it sends anything.
        self.leader().await?;
        let caller = berth_proto::auth::caller(&request).cloned();
        let state = (
            self.nodes.clone(),
            caller,
            request.into_inner(),
            self.shutdown.clone(),
            false,
        );
        // One answer per heartbeat, in order; the first refusal ends the stream.
        let answers = futures::stream::unfold(
            state,
            |(nodes, caller, mut incoming, shutdown, ended)| async move {
                if ended {
                    return None;
                }
                let next = tokio::select! {
                    next = incoming.message() => next,
                    () = shutdown.cancelled() => Err(Status::unavailable(
                        "this member is shutting down; heartbeat to another member",
                    )),
                };
                let answer = match next {
                    Ok(Some(report)) => heartbeat(&nodes, caller.as_ref(), report).await,
                    Ok(None) => return None,
                    Err(e) => Err(e),
                };
                let ended = answer.is_err();
                Some((answer, (nodes, caller, incoming, shutdown, ended)))
            },
        );
        Ok(Response::new(Box::pin(answers)))
    }
}
