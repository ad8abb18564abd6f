//! Batching of writes, in both directions.
//!
//! * `Proposer` (leader): openraft 0.9 writes and fsyncs each proposal on
//!   its own, so concurrent writes are gathered into one `Command::Batch`
//!   entry: one append, one fsync, one replication round for all of them.
//!   A lone write is proposed as itself.
//! * `Forwarder` (follower): the writes forwarded to the leader while a
//!   `Raft.Propose` call is in flight travel together in the next call.
//!
//! Each keeps a few batches in flight; while they are, new writes queue up
//! and form the next batch, so batches grow with load and a lone write
//! waits for nobody.

use std::sync::Arc;
use std::time::Duration;

use berth_proto::v1::RaftPayload;
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{PeerClients, ProposeReply, now_ms};
use crate::raft::{Raft, decode, encode};
use crate::state::{Command, Outcome, Request};

/// The most commands one log entry (or one forwarded call) carries.
const MAX_BATCH: usize = 1024;
/// Batches in flight at once. Two keep the log writer busy while the
/// previous batch replicates; more only made smaller batches (more entries,
/// fsyncs and RPCs for the same writes): 256 writers on 3 members measured
/// 15.1k-15.4k writes/s with 2 in flight, 13.2k-13.6k with 4.
const MAX_IN_FLIGHT: usize = 2;
/// A batch still unanswered after this gives up (its callers have long timed out).
const BATCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the shared gather loop: take a permit, wait for a first item, take
/// whatever else is queued, hand the batch to `flush` on its own task.
async fn gather<T, F, Fut>(mut rx: mpsc::Receiver<T>, shutdown: CancellationToken, flush: F)
where
    T: Send + 'static,
    F: Fn(Vec<T>, OwnedSemaphorePermit) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.cancelled() => return,
        };
        let first = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => m,
                None => return,
            },
            _ = shutdown.cancelled() => return,
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        tokio::spawn(flush(batch, permit));
    }
}

struct Pending {
    command: Command,
    reply: oneshot::Sender<ProposeReply>,
}

/// Group commit on the leader.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Pending>,
}

impl Proposer {
    /// Starts the batching task for `raft`.
    pub fn start(raft: Raft, tasks: &TaskTracker, shutdown: CancellationToken) -> Self {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        tasks.spawn(gather(rx, shutdown, move |batch, permit| {
            let raft = raft.clone();
            async move {
                propose_batch(&raft, batch).await;
                drop(permit);
            }
        }));
        Self { tx }
    }

    /// Queues `command`; the answer comes on `reply`. False when stopped.
    pub(super) async fn submit(
        &self,
        command: Command,
        reply: oneshot::Sender<ProposeReply>,
    ) -> bool {
        self.tx.send(Pending { command, reply }).await.is_ok()
    }
}

async fn propose_batch(raft: &Raft, batch: Vec<Pending>) {
    let (commands, replies): (Vec<Command>, Vec<oneshot::Sender<ProposeReply>>) =
        batch.into_iter().map(|p| (p.command, p.reply)).unzip();
    let single = commands.len() == 1;
    let command = match <[Command; 1]>::try_from(commands) {
        Ok([one]) => one,
        Err(many) => Command::Batch(many),
    };
    let request = Request {
        at_ms: now_ms(),
        command,
    };
    let all = |reply: ProposeReply| -> Vec<ProposeReply> {
        replies.iter().map(|_| reply.clone()).collect()
    };
    let answers: Vec<ProposeReply> =
        match tokio::time::timeout(BATCH_TIMEOUT, raft.client_write(request)).await {
            Ok(Ok(resp)) => match resp.data.0 {
                Ok(Outcome::Batch(results)) if !single && results.len() == replies.len() => {
                    results.into_iter().map(ProposeReply::Applied).collect()
                }
                result if single => vec![ProposeReply::Applied(result)],
                other => all(ProposeReply::Failed(format!(
                    "a batch of {} writes had the unexpected outcome {other:?}",
                    replies.len()
                ))),
            },
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                all(ProposeReply::NotLeader)
            }
            Ok(Err(e)) => all(ProposeReply::Failed(format!("write failed: {e}"))),
            Err(_) => all(ProposeReply::Failed(format!(
                "write not committed within {BATCH_TIMEOUT:?}; it may still be applied"
            ))),
        };
    for (reply, answer) in replies.into_iter().zip(answers) {
        let _ = reply.send(answer);
    }
}

/// What became of a forwarded write.
pub(super) enum Forwarded {
    /// The leader answered.
    Reply(ProposeReply),
    /// The leader could not be reached: nothing was sent, retry.
    Unreachable,
    /// The call failed after it was sent: the outcome is unknown.
    Failed(String),
}

struct Forward {
    command: Command,
    leader: String,
    reply: oneshot::Sender<Forwarded>,
}

/// Batches a follower's forwarded writes into few `Raft.Propose` calls.
#[derive(Clone)]
pub struct Forwarder {
    tx: mpsc::Sender<Forward>,
}

impl Forwarder {
    /// Starts the forwarding task.
    pub fn start(peers: PeerClients, tasks: &TaskTracker, shutdown: CancellationToken) -> Self {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        tasks.spawn(gather(rx, shutdown, move |batch, permit| {
            let peers = peers.clone();
            async move {
                forward_batch(&peers, batch).await;
                drop(permit);
            }
        }));
        Self { tx }
    }

    /// Forwards `command` to the leader at `leader`, waiting until `deadline`.
    pub(super) async fn forward(
        &self,
        command: Command,
        leader: &str,
        deadline: Instant,
    ) -> Forwarded {
        let (reply, answer) = oneshot::channel();
        let queued = self.tx.send(Forward {
            command,
            leader: leader.to_string(),
            reply,
        });
        if queued.await.is_err() {
            return Forwarded::Reply(ProposeReply::Failed("this member is shutting down".into()));
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(f)) => f,
            Ok(Err(_)) => {
                Forwarded::Reply(ProposeReply::Failed("this member is shutting down".into()))
            }
            Err(_) => Forwarded::Failed("no answer from the leader in time".into()),
        }
    }
}

async fn forward_batch(peers: &PeerClients, batch: Vec<Forward>) {
    // Usually one leader; a batch spanning a leader change is split.
    let mut groups: Vec<(String, Vec<Forward>)> = Vec::new();
    for f in batch {
        match groups.iter_mut().find(|(l, _)| *l == f.leader) {
            Some((_, g)) => g.push(f),
            None => groups.push((f.leader.clone(), vec![f])),
        }
    }
    for (leader, group) in groups {
        let (commands, replies): (Vec<Command>, Vec<oneshot::Sender<Forwarded>>) =
            group.into_iter().map(|f| (f.command, f.reply)).unzip();
        let outcome = call_propose(peers, &leader, &commands).await;
        match outcome {
            Ok(answers) if answers.len() == replies.len() => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(Forwarded::Reply(answer));
                }
            }
            Ok(answers) => {
                let e = format!(
                    "the leader answered {} of {} writes",
                    answers.len(),
                    replies.len()
                );
                for reply in replies {
                    let _ = reply.send(Forwarded::Failed(e.clone()));
                }
            }
            Err(unreachable) => {
                for reply in replies {
                    let _ = reply.send(match &unreachable {
                        None => Forwarded::Unreachable,
                        Some(e) => Forwarded::Failed(e.clone()),
                    });
                }
            }
        }
    }
}

/// One `Raft.Propose` call. `Err(None)`: nothing was sent (the connection
/// could not be made), so the caller may retry at the leader it finds next;
/// `Err(Some(e))`: the call may have reached the leader, so a retry could
/// apply the write twice (a create would then answer "already exists"
/// although it was applied), and the outcome is unknown. `Unavailable` alone
/// does not say which: a keep-alive timeout or a reset connection also read
/// as `Unavailable`, after the leader got the call.
async fn call_propose(
    peers: &PeerClients,
    leader: &str,
    commands: &[Command],
) -> Result<Vec<ProposeReply>, Option<String>> {
    let data = encode(&commands).map_err(|e| Some(format!("encode: {e}")))?;
    let mut req = tonic::Request::new(RaftPayload { data });
    req.set_timeout(BATCH_TIMEOUT);
    let mut client = peers.get(leader).map_err(|e| Some(e.to_string()))?;
    match client.propose(req).await {
        Ok(reply) => decode::<Vec<ProposeReply>>(&reply.into_inner().data)
            .map_err(|e| Some(format!("leader's reply does not decode: {e}"))),
        Err(s) if berth_proto::grpc::never_sent(&s) => Err(None),
        Err(s) => Err(Some(berth_proto::grpc::describe(&s))),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use openraft::storage::RaftLogStorage;
    use openraft::{EntryPayload, RaftLogReader};

    use super::*;
    use crate::raft::tests::cluster::Cluster;
    use crate::state::tests::fixture_requests;

    fn create_model(name: &str) -> Command {
        let mut command = fixture_requests().remove(0).command;
        if let Command::CreateModel { name: n, .. } = &mut command {
            *n = name.into();
        }
        command
    }

    /// The last index the leader's log holds, stored or not.
    async fn last_index(cluster: &Cluster) -> u64 {
        let mut log = cluster.logs[&cluster.leader].clone();
        let state = log.get_log_state().await.unwrap();
        state.last_log_id.map_or(0, |l| l.index)
    }

    /// Polls `check` until it holds; the deadline only bounds a hang.
    async fn eventually(what: &str, check: impl AsyncFn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !check().await {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// While every batch slot is taken, writes queue up, and they go together
    /// in one entry once a slot frees; the writes that found a free slot went
    /// alone, one entry each, and no more batches than the slots were in flight.
    #[tokio::test]
    async fn queued_writes_share_one_entry_once_a_slot_frees() {
        let cluster = Cluster::start().await;
        let held = cluster.hold_commits();
        let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let proposer = Proposer::start(cluster.raft(cluster.leader), &tasks, shutdown.clone());
        let submit = |name: String| {
            let proposer = proposer.clone();
            let (reply, answer) = oneshot::channel();
            tokio::spawn(async move {
                assert!(proposer.submit(create_model(&name), reply).await);
                answer.await.expect("every write is answered")
            })
        };

        let start = last_index(&cluster).await;
        let mut writes = Vec::new();
        for i in 1..=MAX_IN_FLIGHT as u64 {
            writes.push(submit(format!("alone-{i}")));
            eventually("the lone write is in the log", async || {
                last_index(&cluster).await == start + i
            })
            .await;
        }
        for i in 0..8 {
            writes.push(submit(format!("queued-{i}")));
        }
        eventually("eight writes queue", async || {
            proposer.tx.max_capacity() - proposer.tx.capacity() == 8
        })
        .await;
        assert_eq!(
            last_index(&cluster).await,
            start + MAX_IN_FLIGHT as u64,
            "a queued write reached the log while every slot was taken"
        );

        drop(held);
        for write in writes {
            let reply = tokio::time::timeout(Duration::from_secs(30), write)
                .await
                .expect("the write is answered once the flush is released")
                .unwrap();
            assert!(matches!(reply, ProposeReply::Applied(Ok(_))), "{reply:?}");
        }
        let entries = cluster.logs[&cluster.leader]
            .clone()
            .try_get_log_entries(start + 1..)
            .await
            .unwrap();
        let sizes: Vec<usize> = entries
            .iter()
            .filter_map(|e| match &e.payload {
                EntryPayload::Normal(r) => Some(match &r.command {
                    Command::Batch(commands) => commands.len(),
                    _ => 1,
                }),
                _ => None,
            })
            .collect();
        assert_eq!(sizes, vec![1, 1, 8], "commands per entry");

        shutdown.cancel();
        tasks.close();
        tasks.wait().await;
        cluster.stop().await;
    }
}
