//! One control-plane member as the API sees it: the Raft handle plus the
//! rules for serving any call on any member.
//!
//! * Writes: on the leader, `client_write`; on a follower, forwarded to the
//!   leader's `Raft.Propose`. While no leader is known the call waits, up to
//!   the write timeout, then answers `Unavailable`. Both directions batch
//!   concurrent writes (`batching`).
//! * Linearizable reads: the leader confirms its leadership (read index); a
//!   follower asks the leader for the read index and waits until it has
//!   applied that far. Stale reads answer from the local state at once.
//! * Membership changes run on the leader; followers forward them.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_proto::grpc;
use berth_proto::grpc::{Channel, Dialer};
use berth_proto::v1::raft_client::RaftClient;
use berth_proto::v1::{JoinRequest, ReadIndexRequest};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::raft::state_machine::{StateView, members};
use crate::raft::{NodeId, Raft};
use crate::state::{Command, Outcome, Rejection};

mod batching;
pub mod detector;

use batching::Forwarded;
pub use batching::{Forwarder, Proposer};

/// Why a call could not be served. `api::status` maps each to a gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    /// The state machine refused the command.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// No leader, or no quorum, within the deadline.
    #[error("{0}")]
    Unavailable(String),
    /// The caller asked for something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is valid but cannot be done in this state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request itself is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// A bug or a stopped Raft.
    #[error("{0}")]
    Internal(String),
}

/// The answer to a forwarded write, as sent back by the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ProposeReply {
    /// Applied (or rejected by the state machine) at the leader.
    Applied(Result<Outcome, Rejection>),
    /// The member asked is not the leader (any more).
    NotLeader,
    /// The leader failed to commit; the text says why.
    Failed(String),
}

/// A member's role in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The current leader.
    Leader,
    /// A voter that is not the leader.
    Follower,
    /// A non-voting member catching up.
    Learner,
}

impl Role {
    /// The role's name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Learner => "learner",
        }
    }
}

/// This member's view of the cluster.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// The leader, if one is known.
    pub leader: Option<(NodeId, String)>,
    /// The current term.
    pub term: u64,
    /// Every member: id, address, role.
    pub members: Vec<(NodeId, String, Role)>,
    /// The last index in this member's log.
    pub last_log_index: u64,
    /// The last index this member applied.
    pub applied_index: u64,
}

/// A running member: Raft plus the read and write rules above.
#[derive(Clone)]
pub struct Member {
    /// This member's id.
    pub id: NodeId,
    /// The Raft handle.
    pub raft: Raft,
    /// The applied state.
    pub state: StateView,
    /// How long a write or read waits for a leader.
    pub request_timeout: Duration,
    /// Serializes membership changes on this member: openraft refuses a
    /// change while another is in progress, and joins often come together.
    pub membership_lock: Arc<tokio::sync::Mutex<()>>,
    /// Connections to the leader (and other members) for forwarding.
    pub peers: PeerClients,
    /// Batches this member's proposals while it leads.
    pub proposer: Proposer,
    /// Batches the writes this member forwards while it follows.
    pub forwarder: Forwarder,
    /// When this member last heard from a leader (see `detector`).
    pub contact: detector::LeaderContact,
    /// What happened: applied commands, and the leader's observations.
    pub events: crate::events::EventLog,
    /// How this member dials other members and agents (TLS with its
    /// member certificate, or plaintext in development mode).
    pub dialer: Dialer,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Clients to other members by address, created once and reused: a
/// forwarded write must not pay for a new connection.
#[derive(Clone)]
pub struct PeerClients {
    clients: Arc<std::sync::Mutex<HashMap<String, RaftClient<Channel>>>>,
    dialer: Dialer,
}

impl PeerClients {
    /// An empty cache whose clients dial through `dialer`.
    pub fn new(dialer: Dialer) -> Self {
        PeerClients {
            clients: Arc::default(),
            dialer,
        }
    }

    fn get(&self, addr: &str) -> Result<RaftClient<Channel>, MemberError> {
        let mut clients = self
            .clients
            .lock()
            .map_err(|_| MemberError::Internal("peer client cache poisoned".into()))?;
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let client = self
            .dialer
            .channel(addr)
            .map(|c| {
                RaftClient::new(c)
                    .max_decoding_message_size(grpc::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(grpc::MAX_MESSAGE_BYTES)
            })
            .map_err(|e| MemberError::Internal(format!("leader address: {e}")))?;
        clients.insert(addr.to_string(), client.clone());
        Ok(client)
    }
}

const NO_LEADER: &str = "no leader: the cluster has not elected one (is a majority of members up and reachable?); retry in a moment";

/// The leader named in `m` and its address, if it is a known member.
fn leader_of(m: &openraft::RaftMetrics<NodeId, BasicNode>) -> Option<(NodeId, String)> {
    let id = m.current_leader?;
    let node = m.membership_config.membership().get_node(&id)?;
    Some((id, node.addr.clone()))
}

impl Member {
    /// This member's current view of leader, term and members.
    pub fn view(&self) -> ClusterView {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.clone();
        // During a joint change a member votes only once it is in every
        // configuration: one still joining does not yet count towards the
        // quorum that survives losing another member.
        let configs = membership.membership().get_joint_config();
        let voters: BTreeSet<NodeId> = membership
            .membership()
            .voter_ids()
            .filter(|id| configs.iter().all(|c| c.contains(id)))
            .collect();
        let leader = leader_of(&m);
        let members = members(&membership)
            .into_iter()
            .map(|(id, addr, _)| {
                let role = if Some(id) == m.current_leader {
                    Role::Leader
                } else if voters.contains(&id) {
                    Role::Follower
                } else {
                    Role::Learner
                };
                (id, addr, role)
            })
            .collect();
        ClusterView {
            leader,
            term: m.current_term,
            members,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
        }
    }

    /// The leader this member knows of and its address. Cheaper than
    /// `view()` (no copy of the metrics or the member list): every write and
    /// every heartbeat asks.
    pub fn leader_now(&self) -> Option<(NodeId, String)> {
        leader_of(&self.raft.metrics().borrow())
    }

    /// Waits until a leader is known, or the deadline passes.
    async fn leader(&self, deadline: Instant) -> Result<(NodeId, String), MemberError> {
        let mut rx = self.raft.metrics();
        loop {
            if let Some(l) = leader_of(&rx.borrow_and_update()) {
                return Ok(l);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(MemberError::Unavailable("raft has stopped".into())),
                Err(_) => return Err(MemberError::Unavailable(NO_LEADER.into())),
            }
        }
    }

    /// Pauses briefly before retrying after a leader change, bounded by the deadline.
    async fn backoff(&self, deadline: Instant) -> Result<(), MemberError> {
        if Instant::now() >= deadline {
            return Err(MemberError::Unavailable(NO_LEADER.into()));
        }
        let mut rx = self.raft.metrics();
        let pause = (Instant::now() + Duration::from_millis(50)).min(deadline);
        let _ = tokio::time::timeout_at(pause, rx.changed()).await;
        Ok(())
    }

    /// Writes independent commands together: proposed at once, the
    /// proposer commits them in one log entry instead of one round trip
    /// each. Outcomes in the commands' order.
    pub async fn write_all(
        &self,
        commands: impl IntoIterator<Item = Command>,
    ) -> Vec<Result<Outcome, MemberError>> {
        futures::future::join_all(commands.into_iter().map(|c| self.write(c))).await
    }

    /// Replicates `command` through the leader and returns its outcome.
    pub async fn write(&self, command: Command) -> Result<Outcome, MemberError> {
        let started = std::time::Instant::now();
        let result = self.replicate(command).await;
        let kind = match &result {
            Ok(_) => "applied",
            Err(MemberError::Rejected(_)) => "rejected",
            Err(_) => "failed",
        };
        crate::metrics::write_answered(kind, started.elapsed());
        result
    }

    async fn replicate(&self, command: Command) -> Result<Outcome, MemberError> {
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let (leader, addr) = self.leader(deadline).await?;
            if leader == self.id {
                match self.propose_local(command.clone(), deadline).await {
                    ProposeReply::Applied(r) => return r.map_err(MemberError::Rejected),
                    ProposeReply::NotLeader => self.backoff(deadline).await?,
                    ProposeReply::Failed(e) => return Err(MemberError::Unavailable(e)),
                }
                continue;
            }
            match self
                .forwarder
                .forward(command.clone(), &addr, deadline)
                .await
            {
                Forwarded::Reply(ProposeReply::Applied(r)) => {
                    return r.map_err(MemberError::Rejected);
                }
                Forwarded::Reply(ProposeReply::NotLeader) | Forwarded::Unreachable => {
                    self.backoff(deadline).await?
                }
                Forwarded::Reply(ProposeReply::Failed(e)) => {
                    return Err(MemberError::Unavailable(e));
                }
                Forwarded::Failed(e) => {
                    return Err(MemberError::Unavailable(format!(
                        "forwarding to leader {leader} at {addr} failed ({e}); the write may or may not have been applied"
                    )));
                }
            }
        }
    }

    /// Proposes on this member, which must be the leader. Used by `write` and
    /// by the `Raft.Propose` handler for writes forwarded by followers.
    pub async fn propose_local(&self, command: Command, deadline: Instant) -> ProposeReply {
        let kind = command.kind();
        let (reply, answer) = oneshot::channel();
        let write = async {
            if !self.proposer.submit(command, reply).await {
                return ProposeReply::Failed("this member is shutting down".into());
            }
            answer
                .await
                .unwrap_or_else(|_| ProposeReply::Failed("this member is shutting down".into()))
        };
        match tokio::time::timeout_at(deadline, write).await {
            Ok(reply) => reply,
            Err(_) => ProposeReply::Failed(format!(
                "write {kind} was not committed in {:?}: is a majority of members up? it may still be applied",
                self.request_timeout
            )),
        }
    }

    /// Waits until a read on this member would see every write acknowledged
    /// before the call (unless `stale`).
    pub async fn read_barrier(&self, stale: bool) -> Result<(), MemberError> {
        if stale {
            return Ok(());
        }
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let (leader, addr) = self.leader(deadline).await?;
            let index = if leader == self.id {
                match tokio::time::timeout_at(deadline, self.read_index()).await {
                    Ok(Ok(index)) => index,
                    Ok(Err(MemberError::Unavailable(_))) => {
                        self.backoff(deadline).await?;
                        continue;
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Err(MemberError::Unavailable(NO_LEADER.into())),
                }
            } else {
                let mut req = tonic::Request::new(ReadIndexRequest {});
                req.set_timeout(deadline.saturating_duration_since(Instant::now()));
                match self.peers.get(&addr)?.read_index(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        r.has_index.then_some(r.index)
                    }
                    Err(_) => {
                        self.backoff(deadline).await?;
                        continue;
                    }
                }
            };
            let Some(index) = index else { return Ok(()) };
            let wait = deadline.saturating_duration_since(Instant::now());
            return self
                .raft
                .wait(Some(wait))
                .applied_index_at_least(Some(index), "linearizable read")
                .await
                .map(|_| ())
                .map_err(|e| MemberError::Unavailable(format!("catching up for a read: {e}")));
        }
    }

    /// The index a linearizable read must see applied; only on the leader.
    ///
    /// openraft's read index is max(committed, the leader's first entry in
    /// its term). A leader restored after a restart keeps its old term, so
    /// that first entry can be far behind, and its committed index is not
    /// durable: entries acknowledged before the crash may not be committed
    /// again yet. Every acknowledged write is in the leader's log, so the
    /// read also waits for the leader's last log index (taken before
    /// leadership is confirmed) to be applied.
    pub async fn read_index(&self) -> Result<Option<u64>, MemberError> {
        let last = self.raft.metrics().borrow().last_log_index;
        match self.raft.get_read_log_id().await {
            Ok((read, _applied)) => Ok(read.map(|l| l.index).max(last)),
            Err(e) => Err(MemberError::Unavailable(format!("not the leader: {e}"))),
        }
    }

    /// Adds a member: as a learner, then as a voter once it caught up. Runs on
    /// the leader; a follower forwards it. Joining again is harmless.
    pub async fn join(&self, id: NodeId, addr: String) -> Result<Vec<NodeId>, MemberError> {
        if addr.is_empty() {
            return Err(MemberError::InvalidArgument(
                "addr \"\" is invalid: a joining member must give the address it is reached at"
                    .into(),
            ));
        }
        let deadline = Instant::now() + self.request_timeout;
        let (leader, leader_addr) = self.leader(deadline).await?;
        if leader != self.id {
            let mut req = tonic::Request::new(JoinRequest { id, addr });
            req.set_timeout(Duration::from_secs(60));
            return self
                .peers
                .get(&leader_addr)?
                .join(req)
                .await
                .map(|r| r.into_inner().voters)
                .map_err(|s| {
                    MemberError::Unavailable(format!("leader {leader}: {}", s.message()))
                });
        }
        let _guard = self.membership_lock.lock().await;
        let view = self.view();
        if let Some((_, existing, role)) = view.members.iter().find(|(m, _, _)| *m == id) {
            if existing != &addr {
                return Err(MemberError::FailedPrecondition(format!(
                    "member id {id} is already in the cluster at {existing}: pick another --id, or remove it first with `berth cluster remove {id}`"
                )));
            }
            if *role != Role::Learner {
                return Ok(self.voters());
            }
        }
        tracing::info!(member = id, %addr, "adding member as learner");
        self.raft
            .add_learner(id, BasicNode::new(addr), true)
            .await
            .map_err(|e| MemberError::Unavailable(format!("add learner {id}: {e}")))?;
        tracing::info!(member = id, "promoting member to voter");
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| MemberError::Unavailable(format!("promote {id} to voter: {e}")))?;
        Ok(self.voters())
    }

    /// Removes a member (voter or learner). Must run on the leader.
    pub async fn remove(&self, id: NodeId) -> Result<(), MemberError> {
        let _guard = self.membership_lock.lock().await;
        let view = self.view();
        if !view.members.iter().any(|(m, _, _)| *m == id) {
            return Err(MemberError::NotFound(format!(
                "member {id} is not in the cluster; see `berth cluster members`"
            )));
        }
        let voters = self.voters();
        let change = if !voters.contains(&id) {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        } else {
            if voters.len() == 1 {
                return Err(MemberError::FailedPrecondition(format!(
                    "member {id} is the last voter: a cluster keeps at least one"
                )));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        };
        tracing::info!(member = id, "removing member");
        match self.raft.change_membership(change, false).await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(
                MemberError::Unavailable("leadership changed during the removal; retry".into()),
            ),
            Err(e) => Err(MemberError::Unavailable(format!("remove member {id}: {e}"))),
        }
    }

    fn voters(&self) -> Vec<NodeId> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }
}
