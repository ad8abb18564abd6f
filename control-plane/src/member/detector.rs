//! Fast leader-failure detection for followers.
//!
//! openraft 0.9 starts an election only after the leader lease (the maximum
//! election timeout) plus a random election timeout, and a candidate whose
//! log is behind is refused and then waits twice the maximum again. So when
//! the leader dies, the follower that happens to time out first is often
//! the wrong one, and failover takes well over a second.
//!
//! Here each follower tracks when it last heard from the leader (every
//! AppendEntries, heartbeats included). Once that is longer ago than the
//! lease plus a heartbeat — when the other voters stop refusing votes — it
//! asks the other live voters how long their logs are, and only the voter
//! with the longest log (ties: highest id, the one openraft prefers in a
//! term) starts an election at once. Everyone else keeps openraft's own
//! timers as the fallback, so this changes when an election starts, never
//! how votes are decided.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use berth_proto::grpc;
use berth_proto::v1::ClusterStatusRequest;
use berth_proto::v1::admin_client::AdminClient;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Member, Role};

/// When this member last heard from a leader, as milliseconds since `base`.
#[derive(Clone)]
pub struct LeaderContact {
    base: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Default for LeaderContact {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            last_ms: Arc::default(),
        }
    }
}

impl LeaderContact {
    /// Records contact now (called for every AppendEntries received).
    pub fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn since(&self) -> Duration {
        let now = self.base.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Starts the detector for `member`. `lease` is openraft's leader lease
/// (the maximum election timeout), `heartbeat` the heartbeat interval.
pub fn start(
    member: Member,
    lease: Duration,
    heartbeat: Duration,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) {
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(heartbeat / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            if member.contact.since() <= lease + heartbeat {
                continue;
            }
            let view = member.view();
            let me = view.members.iter().find(|m| m.0 == member.id);
            let following = me.is_some_and(|m| m.2 == Role::Follower)
                && view.leader.as_ref().is_some_and(|l| l.0 != member.id);
            if !following {
                continue;
            }
            let leader = view.leader.as_ref().map(|l| l.0);
            let mine = (view.last_log_index, member.id);
            let mut best = mine;
            for (id, addr, role) in &view.members {
                if *id == member.id || Some(*id) == leader || *role == Role::Learner {
                    continue;
                }
                if let Some(theirs) = last_log_index(&member.dialer, addr, heartbeat * 2).await {
                    best = best.max((theirs, *id));
                }
            }
            if best == mine {
                tracing::info!(
                    member = member.id,
                    silent_ms = member.contact.since().as_millis() as u64,
                    "no word from the leader past its lease; this member has the longest log, starting an election"
                );
                let _ = member.raft.trigger().elect().await;
            }
            // Give the election (ours or theirs) time before looking again.
            member.contact.touch();
        }
    });
}

async fn last_log_index(dialer: &grpc::Dialer, addr: &str, timeout: Duration) -> Option<u64> {
    let channel = dialer.channel(addr).ok()?;
    let mut req = tonic::Request::new(ClusterStatusRequest {
        stale: true,
        digest: false,
    });
    req.set_timeout(timeout);
    let reply = AdminClient::new(channel).cluster_status(req).await.ok()?;
    Some(reply.into_inner().last_log_index)
}
