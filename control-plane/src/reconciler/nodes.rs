//! Node liveness. Intent and observation are kept apart: the node records
//! (state, epoch, inventory) are replicated through Raft; the heartbeats are
//! observations held only in the leader's memory (`Observed`) and never
//! logged. Only transitions are proposed: `ready` → `down` when a node's
//! last heartbeat is older than the grace period, `down` → `ready` when it
//! heartbeats again.
//!
//! A new leader has no heartbeats yet, so it counts every node's grace from
//! the moment it became leader: a healthy node, whose agent finds the new
//! leader within a heartbeat or two, is never marked down by a leader
//! change. A member serves heartbeats only while a quorum confirms it leads
//! (checked at most every `CONFIRM_EVERY`), so an old leader cut off from
//! its peers sends the agents away instead of keeping them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_common::gpu_health::{
    GpuFaults, GpuHealth, GpuRecord, Quarantine, QuarantinedBy, assess,
};
use berth_common::{NodeRegistration, NodeState};
use berth_proto::v1 as pb;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::member::{Member, MemberError};
use crate::state::{Command, Outcome};

/// Default time without heartbeats before a node is marked down.
pub const DEFAULT_NODE_GRACE: Duration = Duration::from_secs(5);
/// How long a quorum's confirmation of this member's leadership is trusted.
const CONFIRM_EVERY: Duration = Duration::from_millis(500);
/// How long a confirmation may take before this member counts as not leading.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);

/// The last heartbeat of a node, as the leader received it.
#[derive(Debug, Clone)]
pub struct Observation {
    /// When it arrived.
    pub at: Instant,
    /// The agent instance that sent it.
    pub instance: String,
    /// What it said (empty until the first heartbeat after registration).
    pub report: pb::HeartbeatRequest,
}

/// Node liveness on this member: meaningful while it leads.
#[derive(Clone)]
pub struct NodeTracker {
    /// The member (Raft + state).
    pub member: Member,
    /// How long a node may stay silent before it is down.
    pub grace: Duration,
    observed: Arc<Mutex<HashMap<String, Observation>>>,
    /// The term this member leads in and since when; None while it follows.
    leading: Arc<Mutex<Option<(u64, Instant)>>>,
    /// When a quorum last confirmed this member leads; one confirmation at a time.
    confirmed: Arc<tokio::sync::Mutex<Option<Instant>>>,
    /// The replicas that should run on each node, as of one state version.
    desired: Arc<Mutex<DesiredIndex>>,
}

/// Each node's desired replicas at one state version, rebuilt at most every
/// `DESIRED_REBUILD` while the state changes, so a heartbeat costs a lookup,
/// not a scan of every replica. An answer from an older version is safe:
/// the agent keeps what was placed after the version it is told, and stops
/// what was moved away at a later heartbeat.
#[derive(Default)]
struct DesiredIndex {
    /// The state version it was built from, and when; None before the first build.
    built: Option<(u64, Instant)>,
    by_node: HashMap<String, Vec<(String, u64)>>,
}

/// How often the desired index may be rebuilt while the state changes.
const DESIRED_REBUILD: Duration = Duration::from_millis(200);

impl DesiredIndex {
    /// The desired replicas of `node` and the state version they are of.
    fn of(&mut self, state: &crate::state::ClusterState, node: &str) -> (Vec<(String, u64)>, u64) {
        let fresh = self.built.is_some_and(|(version, at)| {
            version == state.version || at.elapsed() < DESIRED_REBUILD
        });
        let version = match self.built {
            Some((version, _)) if fresh => version,
            _ => {
                self.by_node.clear();
                // Replicas marked for removal stay desired while they are
                // placed: the reconciler stops them itself, after gateways
                // had time to stop sending them requests (a drain). Left
                // out, the agent would stop them at its next heartbeat.
                for r in state.replicas.values() {
                    if let Some(n) = &r.node {
                        self.by_node
                            .entry(n.clone())
                            .or_default()
                            .push((r.id.clone(), r.generation));
                    }
                }
                self.built = Some((state.version, Instant::now()));
                state.version
            }
        };
        (self.by_node.get(node).cloned().unwrap_or_default(), version)
    }
}

/// What the leader answers a heartbeat.
#[derive(Debug, Clone)]
pub struct HeartbeatAnswer {
    /// The node's epoch.
    pub epoch: u64,
    /// Replicas that should run on the node: id and generation.
    pub desired: Vec<(String, u64)>,
    /// The state version `desired` was read at.
    pub state_version: u64,
}

/// Why a registry call is not served here.
#[derive(Debug)]
pub enum NotHere {
    /// Another member leads; its address.
    Leader(String),
    /// No leader is known.
    NoLeader,
}

impl NodeTracker {
    /// A tracker for `member`.
    pub fn new(member: Member, grace: Duration) -> Self {
        NodeTracker {
            member,
            grace,
            observed: Arc::default(),
            leading: Arc::default(),
            confirmed: Arc::default(),
            desired: Arc::default(),
        }
    }

    /// The last heartbeat of every node (empty on a follower).
    pub fn observations(&self) -> HashMap<String, Observation> {
        self.with_observations(Clone::clone)
    }

    /// Runs `f` on the last heartbeat of every node without copying them.
    /// Heartbeats wait meanwhile: keep `f` short and never await in it.
    pub fn with_observations<T>(&self, f: impl FnOnce(&HashMap<String, Observation>) -> T) -> T {
        match self.observed.lock() {
            Ok(o) => f(&o),
            Err(p) => f(&p.into_inner()),
        }
    }

    /// GPU memory in use beyond the reservations, per node and GPU, as the
    /// agents last measured it (foreign processes, and replicas above their
    /// reservations): what scheduling adds to the reservations.
    pub fn unreserved_use(&self) -> crate::reconciler::placement::Unreserved {
        self.with_observations(|observed| {
            observed
                .iter()
                .filter_map(|(node, o)| {
                    let gpus: HashMap<u32, u64> = o
                        .report
                        .gpus
                        .iter()
                        .map(|g| {
                            (
                                g.index,
                                g.foreign_memory_mib.saturating_add(g.over_reservation_mib),
                            )
                        })
                        .filter(|(_, mib)| *mib > 0)
                        .collect();
                    (!gpus.is_empty()).then(|| (node.clone(), gpus))
                })
                .collect()
        })
    }

    /// The last heartbeat of one node (None on a follower).
    pub fn observation(&self, node: &str) -> Option<Observation> {
        self.observed.lock().ok()?.get(node).cloned()
    }

    /// When agent `instance` of `node` was last heard from, if it was.
    fn last_heard(&self, node: &str, instance: &str) -> Option<Instant> {
        let observed = self.observed.lock().ok()?;
        observed
            .get(node)
            .filter(|o| o.instance == instance)
            .map(|o| o.at)
    }

    fn observe(&self, node: &str, o: Observation) {
        if let Ok(mut m) = self.observed.lock() {
            m.insert(node.to_string(), o);
        }
    }

    /// This member's own address when it leads, or where the leader is.
    pub fn leader_here(&self) -> Result<String, NotHere> {
        match self.member.leader_now() {
            Some((id, addr)) if id == self.member.id => Ok(addr),
            Some((_, addr)) => Err(NotHere::Leader(addr)),
            None => Err(NotHere::NoLeader),
        }
    }

    /// Like `leader_here`, but a quorum must have confirmed the leadership
    /// within `CONFIRM_EVERY`; concurrent callers share one confirmation.
    pub async fn leader_confirmed(&self) -> Result<String, NotHere> {
        let addr = self.leader_here()?;
        let mut confirmed = self.confirmed.lock().await;
        if confirmed.is_some_and(|at| at.elapsed() < CONFIRM_EVERY) {
            return Ok(addr);
        }
        match tokio::time::timeout(CONFIRM_TIMEOUT, self.member.read_index()).await {
            Ok(Ok(_)) => {
                *confirmed = Some(Instant::now());
                Ok(addr)
            }
            _ => {
                *confirmed = None;
                Err(NotHere::NoLeader)
            }
        }
    }

    /// When this member started leading in its current term (grace starts there).
    fn leading_since(&self, term: u64) -> Instant {
        let mut l = self.leading.lock().unwrap_or_else(|p| p.into_inner());
        match *l {
            Some((t, at)) if t == term => at,
            _ => {
                let now = Instant::now();
                *l = Some((term, now));
                // Heartbeats received under an earlier term are not this
                // leadership's observations.
                if let Ok(mut o) = self.observed.lock() {
                    o.clear();
                }
                now
            }
        }
    }

    /// Records a registration through Raft; the grace starts now.
    pub async fn register(
        &self,
        registration: NodeRegistration,
    ) -> Result<berth_common::Node, MemberError> {
        let name = registration.name.clone();
        let existing = self.member.state.read().state.nodes.get(&name).cloned();
        if let Some(n) = existing
            && n.instance != registration.instance
            && n.addr != registration.addr
            && n.state == NodeState::Ready
            && self
                .last_heard(&name, &n.instance)
                .is_some_and(|at| at.elapsed() < self.grace)
        {
            return Err(MemberError::FailedPrecondition(format!(
                "node name {name:?} is taken by another agent at {}, which is heartbeating: give this agent another --node-name",
                n.addr
            )));
        }
        let instance = registration.instance.clone();
        match self
            .member
            .write(Command::RegisterNode(registration))
            .await?
        {
            Outcome::Node(node) => {
                self.observe(
                    &name,
                    Observation {
                        at: Instant::now(),
                        instance,
                        report: pb::HeartbeatRequest::default(),
                    },
                );
                tracing::info!(node = %name, epoch = node.epoch, addr = %node.addr, "node registered");
                Ok(*node)
            }
            other => Err(MemberError::Internal(format!(
                "unexpected outcome {other:?}"
            ))),
        }
    }

    /// Records a heartbeat. `Ok(None)`: the node or this agent instance is
    /// unknown, the agent must register. A node that was down is ready
    /// again. The answer carries the replicas that should run there.
    pub async fn heartbeat(
        &self,
        report: pb::HeartbeatRequest,
    ) -> Result<Option<HeartbeatAnswer>, MemberError> {
        crate::metrics::heartbeat_received();
        let (epoch, instance, node_state, desired, version, gpu_records, uuids) = {
            let applied = self.member.state.read();
            let s = &applied.state;
            let Some(node) = s.nodes.get(&report.node) else {
                return Ok(None);
            };
            if node.instance != report.instance {
                return Ok(None);
            }
            let (desired, version) = match self.desired.lock() {
                Ok(mut index) => index.of(s, &report.node),
                Err(p) => p.into_inner().of(s, &report.node),
            };
            (
                node.epoch,
                node.instance.clone(),
                node.state,
                desired,
                version,
                s.gpus.get(&report.node).cloned().unwrap_or_default(),
                node.inventory
                    .gpus
                    .iter()
                    .map(|g| (g.index, g.uuid.clone()))
                    .collect::<HashMap<u32, String>>(),
            )
        };
        let quarantines = gpu_quarantines(&report, &gpu_records, &uuids);
        let name = report.node.clone();
        let events = match self.observed.lock() {
            Ok(mut observed) => {
                let before = observed.get(&name).map(|b| &b.report);
                let mut events = replica_events(&name, before, &report);
                events.extend(gpu_health_events(&name, before, &report, &gpu_records));
                let o = Observation {
                    at: Instant::now(),
                    instance: report.instance.clone(),
                    report,
                };
                observed.insert(name.clone(), o);
                events
            }
            Err(_) => Vec::new(),
        };
        self.member.events.extend(events);
        for (gpu, quarantine) in quarantines {
            tracing::warn!(node = %name, gpu, reason = %quarantine.reason, "GPU is unhealthy: quarantining it");
            let command = Command::QuarantineGpu {
                node: name.clone(),
                gpu,
                quarantine,
            };
            if let Err(e) = self.member.write(command).await {
                tracing::warn!(node = %name, gpu, error = %e, "could not quarantine the GPU; the next heartbeat retries");
            }
        }
        if node_state == NodeState::Down {
            tracing::info!(node = %name, "node is heartbeating again: ready");
            self.member
                .write(Command::SetNodeState {
                    name,
                    from: NodeState::Down,
                    to: NodeState::Ready,
                    instance,
                })
                .await?;
        }
        Ok(Some(HeartbeatAnswer {
            epoch,
            desired,
            state_version: version,
        }))
    }

    /// One pass of the liveness check; only the leader acts.
    async fn check(&self) {
        let view = self.member.view();
        if view.leader.as_ref().map(|l| l.0) != Some(self.member.id) {
            if let Ok(mut l) = self.leading.lock() {
                *l = None;
            }
            return;
        }
        let since = self.leading_since(view.term);
        let ready: Vec<(String, String)> = self
            .member
            .state
            .read()
            .state
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Ready)
            .map(|n| (n.name.clone(), n.instance.clone()))
            .collect();
        let silent_for = |name: &str, instance: &str| {
            let last = self
                .last_heard(name, instance)
                .map_or(since, |at| at.max(since));
            Instant::now().saturating_duration_since(last)
        };
        let late: Vec<(String, String)> = ready
            .into_iter()
            .filter(|(name, instance)| silent_for(name, instance) > self.grace)
            .collect();
        if late.is_empty() || self.leader_confirmed().await.is_err() {
            return;
        }
        // Proposed together, so that many nodes lost at once (a rack, a
        // switch) are marked down in one log entry, not one round trip each.
        let (names, downs): (Vec<String>, Vec<Command>) = late
            .into_iter()
            .filter_map(|(name, instance)| {
                // Look again: a heartbeat may have arrived while leadership was confirmed.
                let silent = silent_for(&name, &instance);
                if silent <= self.grace {
                    return None;
                }
                tracing::warn!(node = %name, silent_s = silent.as_secs_f64(), "node missed its heartbeats past the grace period: marking it down");
                let down = Command::SetNodeState {
                    name: name.clone(),
                    from: NodeState::Ready,
                    to: NodeState::Down,
                    instance,
                };
                Some((name, down))
            })
            .unzip();
        for (name, result) in names.iter().zip(self.member.write_all(downs).await) {
            if let Err(e) = result {
                tracing::warn!(node = %name, error = %e, "could not mark the node down; retrying");
            }
        }
    }

    /// Runs the liveness check until `shutdown`.
    pub fn start(&self, tasks: &TaskTracker, shutdown: CancellationToken) {
        let me = self.clone();
        // Often enough that a node is marked down soon after its grace ends.
        let every = (self.grace / 20).clamp(Duration::from_millis(100), Duration::from_millis(500));
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(every) => me.check().await,
                }
            }
        });
    }
}

/// Events for what changed in each replica between two heartbeats of
/// `node`: its phase (or generation), and whether it stays above its GPU
/// memory reservation (the agent judges "stays": see
/// berth_node_agent::inventory::ledger). The first heartbeat after
/// registration makes no phase events.
fn replica_events(
    node: &str,
    before: Option<&pb::HeartbeatRequest>,
    now: &pb::HeartbeatRequest,
) -> Vec<crate::events::Event> {
    let at_ms = crate::member::now_ms();
    let event = |r: &pb::ReplicaStatus, warning: bool, message: String| crate::events::Event {
        at_ms,
        severity: if warning { "warning" } else { "info" },
        kind: "replica",
        object: r.id.clone(),
        message,
    };
    let mut events = Vec::new();
    for r in &now.replicas {
        let prev = before.and_then(|b| b.replicas.iter().find(|x| x.id == r.id));
        let was = prev.map(|x| (x.phase.as_str(), x.generation));
        if before.is_some() && was != Some((r.phase.as_str(), r.generation)) {
            let mut message = format!("replica {} on node {node} is {}", r.id, r.phase);
            if !r.reason.is_empty() {
                message.push_str(&format!(": {}", r.reason));
            }
            events.push(event(r, r.phase == "failed", message));
        }
        let was_over = prev.is_some_and(|x| x.over_gpu_memory_reservation);
        if was_over != r.over_gpu_memory_reservation {
            let used = r.gpu_memory_used_mib.unwrap_or(0);
            let reserved = r.gpu_memory_reserved_mib;
            let message = if r.over_gpu_memory_reservation {
                format!(
                    "replica {} on node {node} stays above its GPU memory reservation: it uses {used} MiB of the {reserved} MiB it reserved; the scheduler counts the excess as taken (reserve more with berth deploy resize NAME --gpu-memory SIZE)",
                    r.id
                )
            } else {
                format!(
                    "replica {} on node {node} is back within its GPU memory reservation ({used} of {reserved} MiB)",
                    r.id
                )
            };
            events.push(event(r, r.over_gpu_memory_reservation, message));
        }
    }
    events
}

/// The quarantines a heartbeat calls for: each GPU whose faults, beyond the
/// baseline of its last release, make it unhealthy or lost, and that is not
/// quarantined already.
fn gpu_quarantines(
    report: &pb::HeartbeatRequest,
    records: &BTreeMap<u32, GpuRecord>,
    uuids: &HashMap<u32, String>,
) -> Vec<(u32, Quarantine)> {
    report
        .gpus
        .iter()
        .filter_map(|g| {
            let record = records.get(&g.index);
            if record.is_some_and(|r| r.quarantine.is_some()) {
                return None;
            }
            let faults = GpuFaults::from(&g.faults.unwrap_or_default());
            let baseline = record
                .map(|r| r.baseline_for(&report.instance))
                .unwrap_or_default();
            let (health, reason) = assess(&faults, &baseline);
            health.quarantines().then(|| {
                (
                    g.index,
                    Quarantine {
                        uuid: uuids.get(&g.index).cloned().unwrap_or_default(),
                        reason: format!("{health}: {reason}"),
                        by: QuarantinedBy::Health,
                        since_ms: crate::member::now_ms(),
                        faults: Some((report.instance.clone(), faults)),
                    },
                )
            })
        })
        .collect()
}

/// Events for the GPUs whose health changed between two heartbeats of
/// `node` (the first heartbeat counts from healthy).
fn gpu_health_events(
    node: &str,
    before: Option<&pb::HeartbeatRequest>,
    now: &pb::HeartbeatRequest,
    records: &BTreeMap<u32, GpuRecord>,
) -> Vec<crate::events::Event> {
    let health = |report: &pb::HeartbeatRequest, index: u32| {
        let g = report.gpus.iter().find(|g| g.index == index)?;
        let baseline = records
            .get(&index)
            .map(|r| r.baseline_for(&report.instance))
            .unwrap_or_default();
        Some(assess(
            &GpuFaults::from(&g.faults.unwrap_or_default()),
            &baseline,
        ))
    };
    let at_ms = crate::member::now_ms();
    now.gpus
        .iter()
        .filter_map(|g| {
            let (state, reason) = health(now, g.index)?;
            let was = before
                .and_then(|b| health(b, g.index))
                .map_or(GpuHealth::Healthy, |(h, _)| h);
            if state == was {
                return None;
            }
            let message = if state == GpuHealth::Healthy {
                format!(
                    "gpu {} of node {node} is healthy again (was {was})",
                    g.index
                )
            } else {
                format!("gpu {} of node {node} is {state}: {reason}", g.index)
            };
            Some(crate::events::Event {
                at_ms,
                severity: if state > was { "warning" } else { "info" },
                kind: "gpu",
                object: format!("{node}/{}", g.index),
                message,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(replicas: &[(&str, &str, bool)]) -> pb::HeartbeatRequest {
        pb::HeartbeatRequest {
            node: "n1".into(),
            replicas: replicas
                .iter()
                .map(|&(id, phase, over)| pb::ReplicaStatus {
                    id: id.into(),
                    generation: 1,
                    phase: phase.into(),
                    gpu_memory_used_mib: Some(if over { 30720 } else { 10240 }),
                    gpu_memory_reserved_mib: 20480,
                    over_gpu_memory_reservation: over,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn messages(events: &[crate::events::Event]) -> Vec<(&str, &str)> {
        events
            .iter()
            .map(|e| (e.severity, e.message.as_str()))
            .collect()
    }

    #[test]
    fn replica_events_say_what_changed() {
        // The first heartbeat: no phase events, but a replica already over.
        let first = beat(&[("a-1", "running", false), ("b-1", "running", true)]);
        let e = replica_events("n1", None, &first);
        assert_eq!(
            messages(&e),
            [(
                "warning",
                "replica b-1 on node n1 stays above its GPU memory reservation: it uses 30720 MiB of the 20480 MiB it reserved; the scheduler counts the excess as taken (reserve more with berth deploy resize NAME --gpu-memory SIZE)"
            )]
        );
        // Nothing changed: nothing to say.
        assert!(replica_events("n1", Some(&first), &first).is_empty());
        // a-1 fails and goes over; b-1 comes back within its reservation.
        let second = beat(&[("a-1", "failed", true), ("b-1", "running", false)]);
        let e = replica_events("n1", Some(&first), &second);
        let m = messages(&e);
        assert_eq!(m.len(), 3, "{m:?}");
        assert_eq!(m[0], ("warning", "replica a-1 on node n1 is failed"));
        assert_eq!(m[1].0, "warning");
        assert!(
            m[1].1.starts_with("replica a-1 on node n1 stays above"),
            "{m:?}"
        );
        assert_eq!(
            m[2],
            (
                "info",
                "replica b-1 on node n1 is back within its GPU memory reservation (10240 of 20480 MiB)"
            )
        );
    }
}
