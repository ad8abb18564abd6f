//! Raft RPCs over tonic (`berth.v1.Raft`): each openraft message is postcard
//! encoded into a `RaftPayload`; the answer is a postcard
//! `Result<Response, RaftError>`. AppendEntries travel on one long-lived
//! `AppendStream` per follower. The server half lives in `api::raft`.

// openraft's RPC errors are large by its design; they are returned as it asks.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use berth_proto::grpc;
use berth_proto::grpc::{Channel, Dialer};
use berth_proto::v1::RaftPayload;
use berth_proto::v1::raft_client::RaftClient;
use futures::SinkExt;
use futures::channel::mpsc;
use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::Streaming;

use super::{NodeId, TypeConfig, decode, encode};

/// Channels by peer address.
type Channels = Arc<Mutex<HashMap<String, Channel>>>;

/// Creates a client per peer; openraft keeps one per replication stream.
///
/// openraft also asks for a client each time it confirms its leadership for
/// a read, and sends one heartbeat on it within `heartbeat_interval`. A new
/// channel per client made that a new TCP connection and mTLS handshake to
/// every follower per read, which a loaded machine cannot finish in time:
/// reads then failed while writes went on (the fault suite's seed 3). So
/// clients share one channel per address, and a client that sees its peer
/// fail or time out drops that channel, so that the next one dials afresh
/// rather than wait on a connection a partition left half-open.
#[derive(Clone)]
pub struct Network {
    /// How peers are dialled.
    dialer: Dialer,
    channels: Channels,
}

impl Network {
    /// Dials peers with `dialer`.
    pub fn new(dialer: Dialer) -> Self {
        Network {
            dialer,
            channels: Channels::default(),
        }
    }

    fn channel(&self, addr: &str) -> Result<Channel, grpc::GrpcError> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let c = self.dialer.channel(addr)?;
        channels.insert(addr.to_string(), c.clone());
        Ok(c)
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        let client = self.channel(&node.addr).map(|c| {
            RaftClient::new(c)
                .max_decoding_message_size(grpc::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(grpc::MAX_MESSAGE_BYTES)
        });
        if let Err(e) = &client {
            tracing::warn!(target_id = target, addr = %node.addr, error = %e, "peer address is unusable");
        }
        PeerClient {
            target,
            addr: node.addr.clone(),
            channels: self.channels.clone(),
            client: client.ok(),
            stream: None,
            streaming: true,
        }
    }
}

/// A connection to one peer.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    /// The shared channels, to drop this peer's after a failure.
    channels: Channels,
    client: Option<RaftClient<Channel>>,
    /// The open `AppendStream`, if any.
    stream: Option<AppendStream>,
    /// Cleared once the peer answers that it has no `AppendStream` (an older
    /// member during an upgrade): AppendEntries then go one call each.
    streaming: bool,
}

/// One long-lived replication stream: a request, then its reply, in turn.
/// Saves each AppendEntries a new HTTP/2 stream, its headers and trailers,
/// and a task on the follower.
struct AppendStream {
    requests: mpsc::Sender<RaftPayload>,
    replies: Streaming<RaftPayload>,
    /// A request was sent and its reply not read yet: true after a caller
    /// gave up midway, so the next reply on this stream is not its own.
    awaiting: bool,
}

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl PeerClient {
    /// After a failure or a timeout: the next client dials afresh.
    fn forget_channel(&self) {
        self.channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.addr);
    }

    async fn call<Req, Resp, E>(&mut self, rpc: Rpc, req: &Req, ttl: Duration) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(client) = self.client.as_mut() else {
            return Err(unreachable("peer address is invalid"));
        };
        let data = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(RaftPayload { data });
        request.set_timeout(ttl);
        let reply = match rpc {
            Rpc::Append => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::Snapshot => client.install_snapshot(request).await,
        };
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(status) => {
                self.forget_channel();
                return Err(rpc_error(status));
            }
        };
        self.decode_reply(&reply)
    }

    fn decode_reply<Resp, E>(&self, reply: &RaftPayload) -> RpcResult<Resp, E>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let result: Result<Resp, RaftError<NodeId, E>> =
            decode(&reply.data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    /// Sends one AppendEntries payload on the replication stream, opening it
    /// first if needed. `Ok(None)`: the peer has no `AppendStream`.
    async fn stream_call(&mut self, data: Vec<u8>) -> Result<Option<RaftPayload>, RpcErr> {
        if self.stream.as_ref().is_some_and(|s| s.awaiting) {
            self.stream = None;
        }
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                let Some(client) = self.client.as_mut() else {
                    return Err(unreachable("peer address is invalid"));
                };
                let (requests, outgoing) = mpsc::channel(1);
                let replies = match client.append_stream(outgoing).await {
                    Ok(r) => r.into_inner(),
                    Err(status) if status.code() == tonic::Code::Unimplemented => {
                        return Ok(None);
                    }
                    Err(status) => return Err(rpc_error(status)),
                };
                self.stream.insert(AppendStream {
                    requests,
                    replies,
                    awaiting: false,
                })
            }
        };
        stream.awaiting = true;
        if stream.requests.send(RaftPayload { data }).await.is_err() {
            return Err(unreachable("replication stream closed"));
        }
        match stream.replies.message().await {
            Ok(Some(reply)) => {
                stream.awaiting = false;
                Ok(Some(reply))
            }
            Ok(None) => Err(unreachable("peer ended the replication stream")),
            Err(status) => Err(rpc_error(status)),
        }
    }
}

type RpcErr = RPCError<NodeId, BasicNode, RaftError<NodeId>>;

fn unreachable<E: std::error::Error>(
    why: &str,
) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(why.to_string())))
}

fn rpc_error<E: std::error::Error>(
    status: tonic::Status,
) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
    match status.code() {
        tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&status)),
        _ => RPCError::Network(NetworkError::new(&status)),
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        let ttl = option.hard_ttl();
        if !self.streaming {
            return self.call(Rpc::Append, &rpc, ttl).await;
        }
        let data = encode(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let reply = match tokio::time::timeout(ttl, self.stream_call(data)).await {
            Ok(Ok(Some(reply))) => reply,
            Ok(Ok(None)) => {
                tracing::info!(
                    target_id = self.target,
                    "peer has no AppendStream; replicating one call at a time"
                );
                self.streaming = false;
                return self.call(Rpc::Append, &rpc, ttl).await;
            }
            Ok(Err(e)) => {
                self.stream = None;
                self.forget_channel();
                return Err(e);
            }
            Err(elapsed) => {
                self.stream = None;
                self.forget_channel();
                return Err(RPCError::Network(NetworkError::new(&elapsed)));
            }
        };
        self.decode_reply(&reply)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(Rpc::Snapshot, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(Rpc::Vote, &rpc, option.hard_ttl()).await
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use berth_proto::v1::raft_server::{Raft as RaftRpc, RaftServer};
    use berth_proto::v1::{JoinRequest, JoinResponse, ReadIndexRequest, ReadIndexResponse};
    use futures::{Stream, StreamExt};
    use openraft::Vote;
    use tokio_util::sync::CancellationToken;
    use tonic::{Request, Response, Status};

    use super::*;

    /// A peer that answers each AppendEntries with `HigherVote(request's
    /// vote)`, so a reply shows which request it belongs to. A request of
    /// term 1 is answered only after 300 ms.
    struct EchoPeer {
        streaming: bool,
    }

    async fn echo(payload: RaftPayload) -> Result<RaftPayload, Status> {
        let req: AppendEntriesRequest<TypeConfig> = decode(&payload.data).unwrap();
        if req.vote.leader_id.term == 1 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let reply: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> =
            Ok(AppendEntriesResponse::HigherVote(req.vote));
        Ok(RaftPayload {
            data: encode(&reply).unwrap(),
        })
    }

    #[tonic::async_trait]
    impl RaftRpc for EchoPeer {
        async fn append_entries(
            &self,
            request: Request<RaftPayload>,
        ) -> Result<Response<RaftPayload>, Status> {
            echo(request.into_inner()).await.map(Response::new)
        }

        type AppendStreamStream =
            Pin<Box<dyn Stream<Item = Result<RaftPayload, Status>> + Send + 'static>>;

        async fn append_stream(
            &self,
            request: Request<tonic::Streaming<RaftPayload>>,
        ) -> Result<Response<Self::AppendStreamStream>, Status> {
            if !self.streaming {
                return Err(Status::unimplemented("no AppendStream here"));
            }
            let replies = request
                .into_inner()
                .take_while(|m| futures::future::ready(m.is_ok()))
                .then(|m| echo(m.unwrap()));
            Ok(Response::new(Box::pin(replies)))
        }

        async fn vote(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            Err(Status::unimplemented("test peer"))
        }

        async fn install_snapshot(
            &self,
            _: Request<RaftPayload>,
        ) -> Result<Response<RaftPayload>, Status> {
            Err(Status::unimplemented("test peer"))
        }

        async fn propose(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            Err(Status::unimplemented("test peer"))
        }

        async fn read_index(
            &self,
            _: Request<ReadIndexRequest>,
        ) -> Result<Response<ReadIndexResponse>, Status> {
            Err(Status::unimplemented("test peer"))
        }

        async fn join(&self, _: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
            Err(Status::unimplemented("test peer"))
        }
    }

    async fn peer(streaming: bool) -> (PeerClient, CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = CancellationToken::new();
        let routes = tonic::service::Routes::new(RaftServer::new(EchoPeer { streaming }));
        tokio::spawn(grpc::serve(
            listener,
            routes,
            &[],
            &grpc::ServerSecurity::Insecure,
            stop.clone().cancelled_owned(),
        ));
        let mut network = Network::new(grpc::Dialer::Insecure);
        let client = network.new_client(2, &BasicNode::new(addr)).await;
        (client, stop)
    }

    fn request(term: u64) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(term, 1),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        }
    }

    fn echoed(term: u64) -> AppendEntriesResponse<NodeId> {
        AppendEntriesResponse::HigherVote(Vote::new_committed(term, 1))
    }

    async fn send(client: &mut PeerClient, term: u64) -> AppendEntriesResponse<NodeId> {
        let option = RPCOption::new(Duration::from_secs(10));
        client.append_entries(request(term), option).await.unwrap()
    }

    #[tokio::test]
    async fn appends_share_one_stream_and_get_their_own_replies() {
        let (mut client, stop) = peer(true).await;
        for term in 2..6 {
            assert_eq!(send(&mut client, term).await, echoed(term));
            assert!(
                client.streaming && client.stream.is_some(),
                "uses the stream"
            );
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn a_peer_without_the_stream_gets_one_call_per_append() {
        let (mut client, stop) = peer(false).await;
        for term in 2..4 {
            assert_eq!(send(&mut client, term).await, echoed(term));
        }
        assert!(
            !client.streaming && client.stream.is_none(),
            "fell back to unary calls"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn an_abandoned_append_does_not_answer_the_next_one() {
        let (mut client, stop) = peer(true).await;
        // The caller gives up on the slow request while its reply is pending.
        let gave_up = tokio::time::timeout(
            Duration::from_millis(50),
            client.append_entries(request(1), RPCOption::new(Duration::from_secs(10))),
        )
        .await;
        assert!(gave_up.is_err());
        assert_eq!(send(&mut client, 7).await, echoed(7));
        // A timeout inside the call drops the stream as well.
        let timed_out = client
            .append_entries(request(1), RPCOption::new(Duration::from_millis(50)))
            .await;
        assert!(
            matches!(timed_out, Err(RPCError::Network(_))),
            "{timed_out:?}"
        );
        assert!(client.stream.is_none());
        assert_eq!(send(&mut client, 8).await, echoed(8));
        stop.cancel();
    }
}
