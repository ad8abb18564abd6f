//! Registration and heartbeats: the agent registers its node with the
//! control plane (static inventory, labels, address), then heartbeats every
//! interval with its GPU readings and its replicas' phases.
//!
//! Both calls go to the leader. Any member may be asked first: a follower
//! answers `FailedPrecondition` with the leader's address in the
//! `berth-leader` metadata, and the agent follows it. When the member asked
//! does not answer, the agent tries the next address at once, so a leader
//! change costs one round trip, not a heartbeat interval. A heartbeat
//! answered `registered = false` (a new leader that lost track, a node
//! record removed) makes the agent register again.
//!
//! Heartbeats travel on one long-lived `HeartbeatStream` to the leader: a
//! call per heartbeat cost the leader nearly twice the CPU of a message on
//! a stream (HTTP/2 stream set-up, headers and trailers, the authorization
//! layer), which matters with thousands of agents (decision 073). Any
//! failure drops the stream, and the next heartbeat opens a new one, at
//! the leader a refusal named. A member that does not know the stream
//! (`Unimplemented`, an older version during an upgrade) gets unary
//! `Heartbeat` calls instead.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use berth_common::Labels;
use berth_proto::grpc::{Channel, Dialer, LEADER_KEY};
use berth_proto::v1::node_registry_client::NodeRegistryClient;
use berth_proto::v1::{self as pb};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::api::replica_to_proto;
use crate::inventory::{SharedInventory, heartbeat_readings};
use crate::supervisor::Replicas;

/// How long one heartbeat may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one registration may take: a write through Raft, slower when a
/// whole fleet registers at once, and retrying sooner would only add load.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// After a phase change, how long to wait for others before heartbeating.
const PHASE_DEBOUNCE: Duration = Duration::from_millis(20);
/// The least time between two heartbeats sent early for phase changes: a
/// lone change is reported within `PHASE_DEBOUNCE`, while a burst of them
/// (many replicas placed on the node at once) costs a few heartbeats a
/// second, not one per replica.
const MIN_EARLY_GAP: Duration = Duration::from_millis(250);

/// Counters the agent's /metrics shows.
#[derive(Debug, Default)]
pub struct Counters {
    /// Heartbeats the leader accepted.
    pub heartbeats: AtomicU64,
    /// Heartbeat or registration rounds that reached no leader.
    pub failures: AtomicU64,
    /// Whether the node is registered with the current leader.
    pub registered: AtomicBool,
}

/// What the loop needs.
pub struct Registration {
    /// Control-plane members.
    pub control: Vec<String>,
    /// The node's name.
    pub node: String,
    /// Where the control plane reaches this agent.
    pub addr: String,
    /// Labels.
    pub labels: Labels,
    /// This agent process.
    pub instance: String,
    /// Heartbeat interval.
    pub interval: Duration,
    /// The inventory.
    pub inventory: Arc<SharedInventory>,
    /// The supervisor, for replica phases.
    pub supervisor: Arc<dyn Replicas>,
    /// Counters for /metrics.
    pub counters: Arc<Counters>,
    /// Clients of the control-plane members, by address: an agent's own,
    /// or shared by the hollow agents of `berth bench`.
    pub clients: Clients,
    /// How members are dialled (with the node's certificate, or plaintext).
    pub dialer: Dialer,
}

/// Registry clients by member address.
pub type Clients = Arc<std::sync::Mutex<HashMap<String, NodeRegistryClient<Channel>>>>;

enum Outcome {
    Done,
    /// The node must register (again).
    Unregistered,
}

/// The open heartbeat stream: requests go in through `requests`, one
/// answer per request comes back on `answers`.
struct HeartbeatStream {
    addr: String,
    requests: tokio::sync::mpsc::Sender<pb::HeartbeatRequest>,
    answers: tonic::Streaming<pb::HeartbeatResponse>,
}

struct Loop {
    reg: Registration,
    stream: Option<HeartbeatStream>,
    /// Members that answered the stream `Unimplemented`: unary calls there.
    unary: std::collections::HashSet<String>,
    next: usize,
    leader: Option<String>,
    registered: bool,
    healthy: Option<bool>,
    last_error: Option<String>,
}

impl Registration {
    /// Registers, then heartbeats until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let changed = self.supervisor.changed();
        let mut last = Instant::now();
        let mut l = Loop {
            reg: self,
            stream: None,
            unary: Default::default(),
            next: 0,
            leader: None,
            registered: false,
            healthy: None,
            last_error: None,
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                // A replica changed phase: tell the leader now, not at the next tick.
                _ = changed.notified() => {
                    let due = (last + MIN_EARLY_GAP).max(Instant::now() + PHASE_DEBOUNCE);
                    tokio::time::sleep_until(due).await;
                    tick.reset();
                }
            }
            last = Instant::now();
            let result = l.round().await;
            l.reg
                .counters
                .registered
                .store(l.registered, Ordering::Relaxed);
            match result {
                Ok(()) => {
                    if l.healthy != Some(true) {
                        tracing::info!(node = %l.reg.node, leader = l.leader.as_deref().unwrap_or(""), "heartbeating to the control-plane leader");
                    }
                    l.healthy = Some(true);
                }
                Err(e) => {
                    l.reg.counters.failures.fetch_add(1, Ordering::Relaxed);
                    if l.healthy != Some(false) || l.last_error.as_deref() != Some(e.as_str()) {
                        tracing::warn!(node = %l.reg.node, error = %e, "cannot reach the control-plane leader; retrying every heartbeat (replicas keep running)");
                    }
                    l.healthy = Some(false);
                    l.last_error = Some(e);
                }
            }
        }
    }
}

impl Loop {
    fn client(&mut self, addr: &str) -> Result<NodeRegistryClient<Channel>, String> {
        let mut clients = self.reg.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let c = NodeRegistryClient::new(self.reg.dialer.channel(addr).map_err(|e| e.to_string())?);
        clients.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// One heartbeat (registering first when needed), trying members until
    /// one that leads answers.
    async fn round(&mut self) -> Result<(), String> {
        if self.reg.control.is_empty() {
            return Err("no control-plane address".into());
        }
        let attempts = self.reg.control.len() * 2 + 2;
        let mut last = String::from("no control-plane address");
        for _ in 0..attempts {
            let addr = match &self.leader {
                Some(l) => l.clone(),
                None => {
                    let a = self.reg.control[self.next % self.reg.control.len()].clone();
                    self.next += 1;
                    a
                }
            };
            let result = if self.registered {
                self.heartbeat(&addr).await
            } else {
                self.register(&addr).await
            };
            match result {
                Ok(Outcome::Done) => {
                    if !self.registered {
                        self.registered = true;
                        // Heartbeat right away: the leader learns the phases now.
                        continue;
                    }
                    return Ok(());
                }
                Ok(Outcome::Unregistered) => {
                    self.registered = false;
                }
                Err(status) => {
                    let hint = status
                        .metadata()
                        .get(LEADER_KEY)
                        .and_then(|v| v.to_str().ok())
                        .filter(|v| !v.is_empty() && *v != addr)
                        .map(String::from);
                    if hint.is_none() && refused(&status) {
                        // The leader answered and said no: another member
                        // would say the same.
                        return Err(format!("refused by {addr}: {}", status.message()));
                    }
                    last = format!("{addr}: {}", status.message());
                    self.leader = hint;
                }
            }
        }
        Err(last)
    }

    async fn register(&mut self, addr: &str) -> Result<Outcome, tonic::Status> {
        let mut client = self.client(addr).map_err(tonic::Status::invalid_argument)?;
        let mut req = tonic::Request::new(pb::RegisterRequest {
            node: self.reg.node.clone(),
            addr: self.reg.addr.clone(),
            labels: self.reg.labels.clone().into_iter().collect(),
            inventory: Some(self.reg.inventory.registration().into()),
            instance: self.reg.instance.clone(),
        });
        req.set_timeout(REGISTER_TIMEOUT);
        let resp = client.register(req).await?.into_inner();
        tracing::info!(node = %self.reg.node, epoch = resp.epoch, state = %resp.state, leader = %addr, "registered with the control plane");
        self.leader = Some(if resp.leader_addr.is_empty() {
            addr.to_string()
        } else {
            resp.leader_addr
        });
        Ok(Outcome::Done)
    }

    async fn heartbeat(&mut self, addr: &str) -> Result<Outcome, tonic::Status> {
        let latest = self.reg.inventory.latest();
        let replicas = self.reg.supervisor.list().await;
        let req = pb::HeartbeatRequest {
            node: self.reg.node.clone(),
            instance: self.reg.instance.clone(),
            gpus: heartbeat_readings(&latest),
            replicas: replicas
                .iter()
                .map(|r| replica_to_proto(r, &self.reg.inventory))
                .collect(),
            memory_available_mib: latest.memory_available_mib,
            cpu_usage_percent: latest.cpu_usage_percent,
        };
        let resp = if self.unary.contains(addr) {
            self.unary_heartbeat(addr, req).await?
        } else {
            match self.streamed_heartbeat(addr, req.clone()).await {
                Err(e) if e.code() == tonic::Code::Unimplemented => {
                    tracing::info!(node = %self.reg.node, member = %addr, "the member has no heartbeat stream (an older version): heartbeating with unary calls");
                    self.unary.insert(addr.to_string());
                    self.unary_heartbeat(addr, req).await?
                }
                other => other?,
            }
        };
        if !resp.registered {
            tracing::info!(node = %self.reg.node, "the leader does not know this agent; registering again");
            return Ok(Outcome::Unregistered);
        }
        self.reg.counters.heartbeats.fetch_add(1, Ordering::Relaxed);
        let desired = resp
            .desired
            .into_iter()
            .map(|d| (d.id, d.generation))
            .collect();
        self.reg
            .supervisor
            .converge(&desired, resp.state_version)
            .await;
        Ok(Outcome::Done)
    }

    async fn unary_heartbeat(
        &mut self,
        addr: &str,
        req: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, tonic::Status> {
        let mut client = self.client(addr).map_err(tonic::Status::invalid_argument)?;
        let mut req = tonic::Request::new(req);
        req.set_timeout(CALL_TIMEOUT);
        Ok(client.heartbeat(req).await?.into_inner())
    }

    /// Sends one heartbeat on the stream to `addr` (opening it first when
    /// there is none to that member) and waits for its answer, all within
    /// `CALL_TIMEOUT`. Any failure drops the stream.
    async fn streamed_heartbeat(
        &mut self,
        addr: &str,
        req: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, tonic::Status> {
        let result = tokio::time::timeout(CALL_TIMEOUT, self.stream_round(addr, req)).await;
        let result = result.unwrap_or_else(|_| {
            Err(tonic::Status::deadline_exceeded(format!(
                "no heartbeat answer from {addr} within {CALL_TIMEOUT:?}"
            )))
        });
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    async fn stream_round(
        &mut self,
        addr: &str,
        req: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, tonic::Status> {
        if self.stream.as_ref().is_none_or(|s| s.addr != addr) {
            self.stream = None;
            let mut client = self.client(addr).map_err(tonic::Status::invalid_argument)?;
            // Room for the one request in flight: a send never waits.
            let (requests, rx) = tokio::sync::mpsc::channel(1);
            let answers = client
                .heartbeat_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            self.stream = Some(HeartbeatStream {
                addr: addr.to_string(),
                requests,
                answers,
            });
        }
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| tonic::Status::internal("the heartbeat stream was just opened"))?;
        stream.requests.send(req).await.map_err(|_| {
            tonic::Status::unavailable(format!("the heartbeat stream to {addr} closed"))
        })?;
        stream
            .answers
            .message()
            .await?
            .ok_or_else(|| tonic::Status::unavailable(format!("{addr} ended the heartbeat stream")))
    }
}

/// Whether a status is a refusal of the request itself (not "no leader here").
fn refused(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::InvalidArgument | Code::AlreadyExists | Code::FailedPrecondition | Code::NotFound
    )
}

/// A new id for this agent process (the kernel's random uuid).
pub fn new_instance_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| {
            format!(
                "{}-{}",
                std::process::id(),
                crate::supervisor::shim::now_ms()
            )
        })
}
