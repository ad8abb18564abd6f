//! `berth.v1.Raft`: the server half of the Raft network, plus the leader's
//! side of write forwarding, read indexes and joins.

use std::pin::Pin;

use berth_proto::v1::raft_server::Raft as RaftRpc;
use berth_proto::v1::{
    JoinRequest, JoinResponse, RaftPayload, ReadIndexRequest, ReadIndexResponse,
};
use futures::Stream;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, VoteRequest,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::status;
use crate::member::{Member, ProposeReply};
use crate::raft::{NodeId, TypeConfig, decode, encode};
use crate::state::Command;

/// The Raft service of one member.
pub struct RaftService {
    member: Member,
    /// Ends replication streams when the member stops.
    stop: CancellationToken,
}

impl RaftService {
    /// Serves Raft calls for `member` until `stop`.
    pub fn new(member: Member, stop: CancellationToken) -> Self {
        Self { member, stop }
    }
}

fn decode_payload<T: DeserializeOwned>(p: &RaftPayload) -> Result<T, Status> {
    decode(&p.data).map_err(|e| Status::invalid_argument(format!("payload does not decode: {e}")))
}

fn to_payload<T: Serialize>(v: &T) -> Result<RaftPayload, Status> {
    encode(v)
        .map(|data| RaftPayload { data })
        .map_err(|e| Status::internal(format!("encode reply: {e}")))
}

fn encode_payload<T: Serialize>(v: &T) -> Result<Response<RaftPayload>, Status> {
    to_payload(v).map(Response::new)
}

/// One AppendEntries, from either the unary call or the stream.
async fn append(member: &Member, payload: &RaftPayload) -> Result<RaftPayload, Status> {
    let req: AppendEntriesRequest<TypeConfig> = decode_payload(payload)?;
    let reply = member.raft.append_entries(req).await;
    // Only a leader this member accepts counts as contact.
    if matches!(
        reply,
        Ok(AppendEntriesResponse::Success
            | AppendEntriesResponse::PartialSuccess(_)
            | AppendEntriesResponse::Conflict)
    ) {
        member.contact.touch();
    }
    to_payload(&reply)
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        append(&self.member, request.get_ref())
            .await
            .map(Response::new)
    }

    type AppendStreamStream =
        Pin<Box<dyn Stream<Item = Result<RaftPayload, Status>> + Send + 'static>>;

    async fn append_stream(
        &self,
        request: Request<Streaming<RaftPayload>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        let state = (request.into_inner(), self.member.clone(), self.stop.clone());
        // Answers each request in order, in the stream's own task; ends when
        // the leader closes its side, on a bad payload, or when this member
        // stops (so a graceful stop does not wait for the leader).
        let replies = futures::stream::unfold(Some(state), |state| async move {
            let (mut incoming, member, stop) = state?;
            let next = tokio::select! {
                _ = stop.cancelled() => return None,
                next = incoming.message() => next,
            };
            match next {
                Ok(Some(payload)) => match append(&member, &payload).await {
                    Ok(reply) => Some((Ok(reply), Some((incoming, member, stop)))),
                    Err(status) => Some((Err(status), None)),
                },
                Ok(None) | Err(_) => None,
            }
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let req: VoteRequest<NodeId> = decode_payload(request.get_ref())?;
        encode_payload(&self.member.raft.vote(req).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let req: InstallSnapshotRequest<TypeConfig> = decode_payload(request.get_ref())?;
        encode_payload(&self.member.raft.install_snapshot(req).await)
    }

    async fn propose(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let commands: Vec<Command> = decode_payload(request.get_ref())?;
        let is_leader = self
            .member
            .leader_now()
            .is_some_and(|l| l.0 == self.member.id);
        let replies: Vec<ProposeReply> = if is_leader {
            let deadline = Instant::now() + self.member.request_timeout;
            // Each joins the leader's next batch.
            futures::future::join_all(
                commands
                    .into_iter()
                    .map(|c| self.member.propose_local(c, deadline)),
            )
            .await
        } else {
            commands.iter().map(|_| ProposeReply::NotLeader).collect()
        };
        encode_payload(&replies)
    }

    async fn read_index(
        &self,
        _request: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        let index = self.member.read_index().await.map_err(status)?;
        Ok(Response::new(ReadIndexResponse {
            index: index.unwrap_or(0),
            has_index: index.is_some(),
        }))
    }

    #[tracing::instrument(skip_all, fields(member = request.get_ref().id))]
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        // A member joins as the id its certificate names.
        if let Some(p) = berth_proto::auth::caller(&request)
            && p.via
                != berth_proto::auth::Via::Certificate(berth_proto::pki::Identity::Member(
                    request.get_ref().id,
                ))
        {
            return Err(Status::permission_denied(format!(
                "a member certificate for another id cannot join as member {}",
                request.get_ref().id
            )));
        }
        let req = request.into_inner();
        let voters = self.member.join(req.id, req.addr).await.map_err(status)?;
        let leader_id = self.member.leader_now().map(|l| l.0).unwrap_or(0);
        Ok(Response::new(JoinResponse { leader_id, voters }))
    }
}
