//! Log streams held open through the faults: one follower per member keeps
//! a `ReplicaLogs` stream (tail, then follow) open on a running replica
//! through its own member, which relays it from the replica's agent, and
//! opens another when one ends, fails or has been open `MAX_STREAM`. So
//! leaders are killed, paused and cut off while members relay agents' log
//! streams, and the run shows that streams come back after healing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use berth_proto::grpc::Channel;
use berth_proto::v1::admin_client::AdminClient;
use berth_proto::v1::{ListClusterReplicasRequest, ReplicaLogsRequest};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long one stream is kept before it is opened again (a stream through
/// a member that was cut off stalls rather than fails).
const MAX_STREAM: Duration = Duration::from_secs(10);
/// How long listing replicas or opening a stream may take.
const CALL: Duration = Duration::from_secs(5);
/// The deployment whose replica's logs are followed: the harness creates
/// it with one CPU-only replica, and no client touches it.
pub const LOG_SOURCE: &str = "log-source";

/// What the followers saw, shared between them.
#[derive(Debug, Default)]
pub struct Streams {
    opened: AtomicU64,
    chunks: AtomicU64,
    failed: AtomicU64,
    /// When the last chunk arrived, as the recorder's clock (0: never).
    last_chunk_ns: AtomicU64,
}

/// The followers' figures for the report.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StreamFigures {
    /// Streams opened.
    pub opened: u64,
    /// Chunks received.
    pub chunks: u64,
    /// Streams that ended with an error (their member died or was cut off).
    pub failed: u64,
}

impl Streams {
    /// The figures so far.
    pub fn figures(&self) -> StreamFigures {
        StreamFigures {
            opened: self.opened.load(Ordering::Relaxed),
            chunks: self.chunks.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }

    /// When the last chunk arrived (recorder's clock; 0: never).
    pub fn last_chunk_ns(&self) -> u64 {
        self.last_chunk_ns.load(Ordering::Relaxed)
    }
}

/// Follows replicas' logs through one member until `stop`; `now_ns` is the
/// history's clock.
pub async fn follow_loop(
    channel: Channel,
    streams: Arc<Streams>,
    now_ns: impl Fn() -> u64 + Send + 'static,
    stop: CancellationToken,
) {
    let mut admin = AdminClient::new(channel);
    while !stop.is_cancelled() {
        if let Some(id) = running_replica(&mut admin).await {
            follow(&mut admin, &id, &streams, &now_ns, &stop).await;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
}

/// A replica of `LOG_SOURCE` that runs (phases are the leader's: the
/// member asks it).
async fn running_replica(admin: &mut AdminClient<Channel>) -> Option<String> {
    let req = ListClusterReplicasRequest {
        deployment: LOG_SOURCE.into(),
        ..Default::default()
    };
    let list = tokio::time::timeout(CALL, admin.list_cluster_replicas(req))
        .await
        .ok()?
        .ok()?
        .into_inner();
    list.replicas
        .into_iter()
        .find(|r| r.phase == "running")
        .map(|r| r.id)
}

/// One stream: open it, count its chunks until it ends, fails, `MAX_STREAM`
/// passes or `stop`.
async fn follow(
    admin: &mut AdminClient<Channel>,
    id: &str,
    streams: &Streams,
    now_ns: &impl Fn() -> u64,
    stop: &CancellationToken,
) {
    let req = ReplicaLogsRequest {
        id: id.to_string(),
        tail: Some(5),
        follow: true,
    };
    let mut stream = match tokio::time::timeout(CALL, admin.replica_logs(req)).await {
        Ok(Ok(r)) => r.into_inner(),
        // Not opened: the member is down, cut off, or the replica just went.
        _ => return,
    };
    streams.opened.fetch_add(1, Ordering::Relaxed);
    let until = Instant::now() + MAX_STREAM;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(until) => return,
            next = stream.message() => match next {
                Ok(Some(_)) => {
                    streams.chunks.fetch_add(1, Ordering::Relaxed);
                    streams.last_chunk_ns.store(now_ns(), Ordering::Relaxed);
                }
                Ok(None) => return,
                Err(_) => {
                    streams.failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
        }
    }
}
