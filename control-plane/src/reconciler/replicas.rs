//! The replica loop, on the leader: desired (deployments and their replica
//! records, in Raft) against observed (the replicas each agent reports in
//! its heartbeats, in the leader's memory). Each pass:
//!
//! 1. replaces the replicas of nodes that are down (`ReplaceLostReplicas`);
//! 2. places pending replicas through the scheduler and commits the binds
//!    as one `ApplyPlan` (re-validated in `apply`); the scheduler's reasons
//!    for the replicas it could not place are kept for `deploy explain`;
//! 3. tells agents to start the replicas placed on them that they do not
//!    run at the right generation, and to stop the ones being removed;
//!    once an agent reports a removed replica stopped (or gone), its record
//!    is dropped (`RemoveReplica`).
//!
//! 4. moves rollouts on (`rollout_step`): adds replicas of the current
//!    revision within `max_surge`, retires older ones while at least
//!    `replicas - max_unavailable` run, and pauses the rollout when a new
//!    replica fails or is not healthy within the progress deadline (the old
//!    replicas keep serving).
//!
//! Starts, resizes and stops are idempotent on the agent (replica id +
//! generation) and retried with back-off; the loop never waits for an agent. A node is
//! only acted on once this leader heard a heartbeat from it, so a new
//! leader never mistakes "no heartbeat yet" for "not running": it restarts
//! nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_common::{NodeState, Replica, ReplicaIntent, ReplicaSpec};
use berth_proto::grpc;
use berth_proto::grpc::Channel;
use berth_proto::v1::agent_client::AgentClient;
use berth_proto::v1::{self as pb};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::nodes::NodeTracker;
use super::placement;
use crate::member::Member;
use crate::state::{ClusterState, Command, Outcome, gpus};

/// How often the loop runs when nothing wakes it.
const PASS_EVERY: Duration = Duration::from_millis(250);
/// The least time between the starts of two passes.
const MIN_PASS_GAP: Duration = Duration::from_millis(20);
/// How long a start or stop call to an agent may take.
const AGENT_CALL: Duration = Duration::from_secs(15);
/// First retry delay of a failed call; doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// After a call succeeded, how long to wait for heartbeats to show it before calling again.
const SETTLE: Duration = Duration::from_secs(3);
/// The grace period of stops the reconciler asks for.
const STOP_GRACE_MS: u64 = 10_000;
/// How long a replica marked for removal keeps running before it is told to
/// stop: gateways learn within a few hundred milliseconds that it takes no
/// more requests (the endpoint watch), so none is sent to a stopping server.
pub const DRAIN_DELAY: Duration = Duration::from_secs(1);
/// Restarts after which a replica that is still not running is replaced.
pub const FAILING_RESTARTS: u32 = 3;
/// Wait between replacements of a deployment's failing replicas: doubles
/// from this up to `MAX_REPLACE_BACKOFF`, and starts over once a deployment
/// went that long without one.
const FIRST_REPLACE_BACKOFF: Duration = Duration::from_secs(10);
const MAX_REPLACE_BACKOFF: Duration = Duration::from_secs(300);

/// The agent spec of a replica: its deployment revision's model version,
/// its resources and GPUs. None when the deployment or version is gone.
pub fn replica_spec(state: &ClusterState, r: &Replica) -> Option<ReplicaSpec> {
    let d = state.deployments.get(&r.deployment)?;
    let rev = d
        .history
        .iter()
        .find(|h| h.revision == r.revision)
        .map_or(&d.spec, |h| &h.spec);
    let v = &state
        .models
        .get(&rev.model)?
        .versions
        .get(&rev.version)?
        .spec;
    Some(ReplicaSpec {
        id: r.id.clone(),
        generation: r.generation,
        model: rev.model.clone(),
        runtime: v.runtime.clone(),
        source: v.source.clone(),
        port: 0,
        gpus: r.gpus.iter().map(|g| g.index).collect(),
        resources: r.resources,
        env: v.env.clone(),
        health: v.health.clone(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Start,
    Resize,
    Stop,
}

/// Default time a new replica of a rollout has to become healthy.
pub const DEFAULT_PROGRESS_DEADLINE: Duration = Duration::from_secs(600);

/// An observed phase: (phase, reason, restarts).
pub type Seen = (String, String, u32);

/// What a rollout does next, given the deployment's replica records and
/// their observed phases: pause, add new replicas, retire old ones, or
/// nothing. `waited` says how long each placed replica has been without
/// running (leader's clock).
pub fn rollout_step(
    d: &berth_common::Deployment,
    replicas: &[&Replica],
    phase: &dyn Fn(&Replica) -> Option<Seen>,
    waited: &dyn Fn(&Replica) -> Duration,
    deadline: Duration,
) -> Option<Command> {
    if d.paused.is_some() {
        return None;
    }
    let run: Vec<&Replica> = replicas.iter().copied().filter(|r| r.counts()).collect();
    let (new, old): (Vec<&Replica>, Vec<&Replica>) =
        run.iter().partition(|r| r.revision == d.revision);
    let want = d.spec.replicas as usize;
    let (total, current) = (run.len(), new.len());
    if old.is_empty() {
        // Retiring within max_unavailable may have left fewer than asked for.
        return (total < want).then(|| Command::RolloutAdd {
            name: d.name.clone(),
            count: (want - total) as u32,
        });
    }
    let running = |r: &Replica| phase(r).is_some_and(|(p, _, _)| p == "running");
    for r in &new {
        let failing = match phase(r) {
            Some((p, why, restarts)) if p == "failed" || (restarts > 0 && p != "running") => {
                Some(format!("new replica {} is {p}: {why}", r.id))
            }
            _ if r.node.is_some() && !running(r) && waited(r) > deadline => Some(format!(
                "new replica {} is not healthy after {:?} (the rollout's progress deadline)",
                r.id, deadline
            )),
            _ => None,
        };
        if let Some(reason) = failing {
            return Some(Command::PauseRollout {
                name: d.name.clone(),
                reason,
            });
        }
    }
    let room = (want + d.spec.max_surge as usize)
        .saturating_sub(total)
        .min(want.saturating_sub(current));
    if room > 0 {
        return Some(Command::RolloutAdd {
            name: d.name.clone(),
            count: room as u32,
        });
    }
    let floor = want.saturating_sub(d.spec.max_unavailable as usize);
    let by_records = total.saturating_sub(floor);
    let available = run.iter().filter(|r| running(r)).count();
    let mut take_ready = available.saturating_sub(floor);
    let (mut unready, ready): (Vec<&Replica>, Vec<&Replica>) =
        old.iter().partition(|r| !running(r));
    // Pending ones first: they never served.
    unready.sort_by_key(|r| r.node.is_some());
    let mut retire = Vec::new();
    for r in unready {
        if retire.len() < by_records {
            retire.push(r.id.clone());
        }
    }
    for r in ready {
        if retire.len() < by_records && take_ready > 0 {
            retire.push(r.id.clone());
            take_ready -= 1;
        }
    }
    (!retire.is_empty()).then(|| Command::RolloutRetire {
        name: d.name.clone(),
        replicas: retire,
    })
}

/// One call to an agent the pass decided on.
struct AgentCall {
    call: Call,
    id: String,
    generation: u64,
    placed_at: u64,
    node: String,
    addr: String,
    spec: Option<ReplicaSpec>,
}

#[derive(Debug)]
struct Attempt {
    call: Call,
    generation: u64,
    next_at: Instant,
    backoff: Duration,
    in_flight: bool,
    failures: u32,
    /// This leader asked the agent to start the replica, and no stop it
    /// asked for since was answered: a heartbeat that does not list the
    /// replica may predate the start, so its absence proves nothing.
    started: bool,
}

impl Attempt {
    /// A first try of `call` for `generation`, due at `now` (a stop: after
    /// the drain delay).
    fn new(call: Call, generation: u64, now: Instant) -> Self {
        Attempt {
            call,
            generation,
            next_at: if call == Call::Stop {
                now + DRAIN_DELAY
            } else {
                now
            },
            backoff: FIRST_BACKOFF,
            in_flight: false,
            failures: 0,
            started: false,
        }
    }
}

#[derive(Default)]
struct Shared {
    attempts: Mutex<HashMap<String, Attempt>>,
    /// When this leader first saw each placed replica (id, generation) not running.
    waiting: Mutex<HashMap<(String, u64), Instant>>,
    explanations: Mutex<BTreeMap<String, String>>,
    /// Failing replicas replaced per deployment, and when last (back-off).
    replaced: Mutex<HashMap<String, (u32, Instant)>>,
    agents: Mutex<HashMap<String, AgentClient<Channel>>>,
    wake: Notify,
}

/// The replica loop of one member (it acts only while the member leads).
#[derive(Clone)]
pub struct Replicas {
    member: Member,
    nodes: NodeTracker,
    shared: Arc<Shared>,
    deadline: Duration,
}

impl Replicas {
    /// A loop for `member`, reading heartbeats from `nodes`; a new replica
    /// of a rollout has `progress_deadline` to become healthy.
    pub fn new(member: Member, nodes: NodeTracker, progress_deadline: Duration) -> Self {
        Replicas {
            member,
            nodes,
            shared: Arc::default(),
            deadline: progress_deadline,
        }
    }

    /// Runs a pass soon (after a write that changes what should run).
    pub fn wake(&self) {
        self.shared.wake.notify_one();
    }

    /// Why each pending replica of `deployment` has no place (last pass).
    pub fn explanations(&self, deployment: &str) -> Vec<(String, String)> {
        let prefix = format!("{deployment}-");
        self.shared
            .explanations
            .lock()
            .map(|e| {
                e.iter()
                    .filter(|(id, _)| {
                        id.strip_prefix(&prefix)
                            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                    })
                    .map(|(id, why)| (id.clone(), why.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Runs the loop until `shutdown`.
    pub fn start(&self, tasks: &TaskTracker, shutdown: CancellationToken) {
        let me = self.clone();
        let tracker = tasks.clone();
        tasks.spawn(async move {
            let mut last = Instant::now();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(PASS_EVERY) => {}
                    _ = me.shared.wake.notified() => {}
                }
                // A burst of writes (many deployments created at once) is
                // handled by a few passes, each over everything pending,
                // instead of one pass a write, each over every replica.
                let gap = last.elapsed();
                if gap < MIN_PASS_GAP {
                    tokio::time::sleep(MIN_PASS_GAP - gap).await;
                }
                last = Instant::now();
                me.pass(&tracker).await;
                if me.nodes.leader_here().is_ok() {
                    crate::metrics::reconciler_pass(last.elapsed());
                }
            }
        });
    }

    async fn write(&self, command: Command) -> Option<Outcome> {
        let kind = command.kind();
        match self.member.write(command).await {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::warn!(command = kind, error = %e, "reconciler write failed; retrying next pass");
                None
            }
        }
    }

    /// `Member::write_all` (removing a deployment of thousands of replicas
    /// is one entry), each failure logged as `write` does.
    async fn write_all(&self, commands: impl IntoIterator<Item = Command>) {
        let commands: Vec<Command> = commands.into_iter().collect();
        let kinds: Vec<&'static str> = commands.iter().map(Command::kind).collect();
        for (kind, result) in kinds.into_iter().zip(self.member.write_all(commands).await) {
            if let Err(e) = result {
                tracing::warn!(command = kind, error = %e, "reconciler write failed; retrying next pass");
            }
        }
    }

    async fn pass(&self, tasks: &TaskTracker) {
        if self.nodes.leader_here().is_err() {
            if let Ok(mut a) = self.shared.attempts.lock() {
                a.clear();
            }
            return;
        }
        // Each step reads the state under its guard (no copy of the whole
        // state: it holds every node's inventory), collects what to do, and
        // acts after letting go: writes and agent calls never run under it.
        let unreserved = self.nodes.unreserved_use();
        let (lost, pending) = {
            let applied = self.member.state.read();
            let state = &applied.state;
            let occupied: std::collections::HashSet<&str> = state
                .replicas
                .values()
                .filter_map(|r| r.node.as_deref())
                .collect();
            let lost: Vec<String> = state
                .nodes
                .values()
                .filter(|n| n.state == NodeState::Down && occupied.contains(n.name.as_str()))
                .map(|n| n.name.clone())
                .collect();
            (lost, placement::Pending::of(state, &unreserved))
        };
        for node in &lost {
            tracing::warn!(node = %node, "node is down: replacing its replicas elsewhere");
        }
        self.write_all(
            lost.into_iter()
                .map(|node| Command::ReplaceLostReplicas { node }),
        )
        .await;
        // Scheduling takes a while on a large cluster: off the runtime's
        // threads, and not under the state's guard (apply would wait).
        let scheduling = Instant::now();
        let decision = if pending.is_empty() {
            placement::Decision::default()
        } else {
            tokio::task::spawn_blocking(move || pending.schedule())
                .await
                .unwrap_or_default()
        };
        if let Ok(mut e) = self.shared.explanations.lock() {
            *e = decision
                .pending
                .iter()
                .map(|(id, why)| (id.clone(), why.to_string()))
                .collect();
        }
        if !decision.binds.is_empty() {
            let n = decision.binds.len();
            let committing = Instant::now();
            let schedule_ms = (committing - scheduling).as_secs_f64() * 1000.0;
            let outcome = self.write(Command::ApplyPlan(decision.binds)).await;
            let commit_ms = committing.elapsed().as_secs_f64() * 1000.0;
            if let Some(Outcome::Plan(results)) = outcome {
                let refused: Vec<String> = results
                    .iter()
                    .filter_map(|r| r.as_ref().err().map(ToString::to_string))
                    .collect();
                tracing::info!(
                    placed = n - refused.len(),
                    refused = refused.len(),
                    schedule_ms,
                    commit_ms,
                    "placed replicas"
                );
                for why in refused {
                    tracing::debug!(%why, "a bind was refused; the replica is placed again next pass");
                }
            }
        }

        let steps = self.steps();
        for step in &steps {
            if let Command::PauseRollout { name, reason } = step {
                tracing::warn!(deployment = %name, %reason, "pausing the rollout; the old replicas keep serving");
            }
            if let Command::SetNodeAdmin { name, .. } = step {
                tracing::info!(node = %name, "node drained");
            }
        }
        self.write_all(steps).await;

        let (calls, removed) = self.agent_work();
        if let Ok(mut a) = self.shared.attempts.lock() {
            for id in &removed {
                a.remove(id);
            }
        }
        self.write_all(removed.into_iter().map(|id| Command::RemoveReplica { id }))
            .await;
        for c in calls {
            self.call(tasks, c);
        }
    }

    /// Rollout and drain steps, from the state and the observed phases.
    fn steps(&self) -> Vec<Command> {
        let applied = self.member.state.read();
        let state = &applied.state;
        self.nodes.with_observations(|observed| {
            let reported_of = |r: &Replica| {
                observed
                    .get(r.node.as_ref()?)?
                    .report
                    .replicas
                    .iter()
                    .find(|x| x.id == r.id && x.generation >= r.generation)
            };
            let mut by_deployment: HashMap<&str, Vec<&Replica>> = HashMap::new();
            for r in state.replicas.values() {
                by_deployment.entry(&r.deployment).or_default().push(r);
            }
            // How long each placed replica of a rollout in progress has
            // waited to run, on this leader's clock (the progress deadline).
            let now = Instant::now();
            if let Ok(mut waiting) = self.shared.waiting.lock() {
                let placed: std::collections::HashSet<(String, u64)> = state
                    .deployments
                    .values()
                    .filter_map(|d| {
                        let rs = by_deployment.get(d.name.as_str())?;
                        d.rolling(rs.iter().copied()).then_some(rs)
                    })
                    .flatten()
                    .filter(|r| r.node.is_some())
                    .filter(|r| reported_of(r).is_none_or(|x| x.phase != "running"))
                    .map(|r| (r.id.clone(), r.generation))
                    .collect();
                waiting.retain(|k, _| placed.contains(k));
                for k in placed {
                    waiting.entry(k).or_insert(now);
                }
            }
            let waited = |r: &Replica| {
                self.shared
                    .waiting
                    .lock()
                    .ok()
                    .and_then(|w| w.get(&(r.id.clone(), r.generation)).copied())
                    .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
            };
            let phase = |r: &Replica| {
                reported_of(r).map(|x| (x.phase.clone(), x.reason.clone(), x.restarts))
            };
            let mut steps = Vec::new();
            for d in state.deployments.values() {
                let replicas = by_deployment.get(d.name.as_str()).map_or(&[][..], |v| v);
                steps.extend(rollout_step(d, replicas, &phase, &waited, self.deadline));
                steps.extend(self.replace_failing(d, replicas, &reported_of, now));
            }
            // Drains, and quarantined GPUs: each replica on a draining node
            // or a quarantined GPU gets a replacement first, and stops once
            // that one runs (or found no place in time).
            let now_ms = crate::member::now_ms();
            let mut moving: Vec<&Replica> = Vec::new();
            for node in state
                .nodes
                .values()
                .filter(|n| n.admin == berth_common::NodeAdmin::Draining)
            {
                let on: Vec<&Replica> = state
                    .replicas
                    .values()
                    .filter(|r| r.node.as_deref() == Some(node.name.as_str()))
                    .collect();
                if on.is_empty() {
                    steps.push(Command::SetNodeAdmin {
                        name: node.name.clone(),
                        admin: berth_common::NodeAdmin::Drained,
                    });
                    continue;
                }
                moving.extend(on);
            }
            if !state.gpus.is_empty() {
                let off_gpu: Vec<&Replica> = state
                    .replicas
                    .values()
                    .filter(|r| {
                        gpus::on_quarantined_gpu(state, r) && !moving.iter().any(|m| m.id == r.id)
                    })
                    .collect();
                moving.extend(off_gpu);
            }
            for r in moving {
                if r.counts() {
                    steps.push(Command::EvacuateReplica { id: r.id.clone() });
                    continue;
                }
                if !r.evacuating || r.intent != ReplicaIntent::Run {
                    continue;
                }
                let replacement = state
                    .replicas
                    .values()
                    .find(|x| x.replaces.as_deref() == Some(r.id.as_str()));
                let done = match replacement {
                    None => true,
                    Some(x) => {
                        x.intent != ReplicaIntent::Run
                            || phase(x).is_some_and(|(p, _, _)| p == "running")
                            || Duration::from_millis(now_ms.saturating_sub(x.created_at_ms))
                                > self.deadline
                    }
                };
                if done {
                    steps.push(Command::FinishEvacuation { id: r.id.clone() });
                }
            }
            steps
        })
    }

    /// A replacement for one replica of `d` that keeps failing on its node
    /// (restarted `FAILING_RESTARTS` times and not running), unless a rollout
    /// is in progress (a failing rollout pauses instead) or the deployment's
    /// replacement back-off has not run out.
    fn replace_failing<'a>(
        &self,
        d: &berth_common::Deployment,
        replicas: &[&Replica],
        reported_of: &dyn Fn(&Replica) -> Option<&'a pb::ReplicaStatus>,
        now: Instant,
    ) -> Option<Command> {
        if d.paused.is_some() || d.rolling(replicas.iter().copied()) {
            return None;
        }
        let (r, seen) = replicas.iter().find_map(|r| {
            let seen = reported_of(r)?;
            (r.counts()
                && r.generation == seen.generation
                && seen.phase != "running"
                && seen.restarts >= FAILING_RESTARTS)
                .then_some((r, seen))
        })?;
        let mut replaced = self.shared.replaced.lock().ok()?;
        let (count, last) = replaced.get(&d.name).copied().unwrap_or((0, now));
        let wait = FIRST_REPLACE_BACKOFF
            .saturating_mul(1 << count.saturating_sub(1).min(16))
            .min(MAX_REPLACE_BACKOFF);
        let since = now.saturating_duration_since(last);
        let count = if since > MAX_REPLACE_BACKOFF {
            0
        } else {
            count
        };
        if count > 0 && since < wait {
            return None;
        }
        replaced.insert(d.name.clone(), (count + 1, now));
        let reason = format!(
            "restarted {} times on node {}, {}: {}",
            seen.restarts,
            r.node.as_deref().unwrap_or("?"),
            seen.phase,
            seen.reason
        );
        tracing::warn!(replica = %r.id, deployment = %d.name, %reason, "replacing a replica that keeps failing");
        Some(Command::ReplaceFailedReplica {
            id: r.id.clone(),
            reason,
        })
    }

    /// What agents must be told (starts, resizes, stops), and the removed
    /// replicas whose agents report them gone.
    fn agent_work(&self) -> (Vec<AgentCall>, Vec<String>) {
        let applied = self.member.state.read();
        let state = &applied.state;
        let mut calls = Vec::new();
        let mut removed = Vec::new();
        let now = Instant::now();
        // Replicas with a call in flight or not yet due: nothing to decide
        // (a new call or generation starts a new attempt, see `call`).
        let busy: HashMap<String, u64> = self
            .shared
            .attempts
            .lock()
            .map(|a| {
                a.iter()
                    .filter(|(_, a)| a.in_flight || a.next_at > now)
                    .map(|(id, a)| (id.clone(), a.generation))
                    .collect()
            })
            .unwrap_or_default();
        // Replicas whose absence from a heartbeat proves nothing yet (see
        // `Attempt::started`).
        let started: std::collections::HashSet<String> = self
            .shared
            .attempts
            .lock()
            .map(|a| {
                a.iter()
                    .filter(|(_, a)| a.started)
                    .map(|(id, _)| id.clone())
                    .collect()
            })
            .unwrap_or_default();
        self.nodes.with_observations(|observed| {
            for r in state.replicas.values() {
                if r.intent == ReplicaIntent::Run && busy.get(r.id.as_str()) == Some(&r.generation)
                {
                    continue;
                }
                let Some(node_name) = &r.node else { continue };
                let Some(node) = state.nodes.get(node_name) else {
                    continue;
                };
                if node.state != NodeState::Ready {
                    continue;
                }
                // Act on a node only once this leader heard from it.
                let Some(seen) = observed
                    .get(node_name)
                    .filter(|o| !o.report.node.is_empty())
                else {
                    continue;
                };
                let reported = seen.report.replicas.iter().find(|x| x.id == r.id);
                let call = |call, spec| AgentCall {
                    call,
                    id: r.id.clone(),
                    generation: r.generation,
                    placed_at: r.placed_at,
                    node: node.name.clone(),
                    addr: node.addr.clone(),
                    spec,
                };
                match r.intent {
                    ReplicaIntent::Run => {
                        let runs = reported.is_some_and(|x| {
                            x.generation >= r.generation && x.desired == "running"
                        });
                        if runs {
                            continue;
                        }
                        let gpus: Vec<u32> = r.gpus.iter().map(|g| g.index).collect();
                        // An older generation on the same GPUs: CPU and memory
                        // changed, resize it in place; anything else: start.
                        let resizable = reported.is_some_and(|x| {
                            x.generation < r.generation && x.desired == "running" && x.gpus == gpus
                        });
                        if let Some(spec) = replica_spec(state, r) {
                            let kind = if resizable { Call::Resize } else { Call::Start };
                            calls.push(call(kind, Some(spec)));
                        }
                    }
                    ReplicaIntent::Remove => {
                        // Its record holds its GPUs until the agent shows
                        // it stopped: dropping it sooner lets the scheduler
                        // place another replica on a GPU still in use (the
                        // fault suite found this when a deployment scaled
                        // down between a start and the next heartbeat).
                        let gone = match reported {
                            Some(x) => x.phase == "stopped",
                            None => !started.contains(&r.id),
                        };
                        if gone {
                            removed.push(r.id.clone());
                        } else {
                            calls.push(call(Call::Stop, None));
                        }
                    }
                }
            }
        });
        // Forget attempts of replicas that no longer exist.
        if let Ok(mut a) = self.shared.attempts.lock() {
            a.retain(|id, _| state.replicas.contains_key(id));
        }
        (calls, removed)
    }

    /// The client of `node`'s agent at `addr` (one per node and address:
    /// the TLS client checks that it talks to that node's agent).
    fn agent(&self, node: &str, addr: &str) -> Option<AgentClient<Channel>> {
        let key = format!("{node}@{addr}");
        let mut agents = self.shared.agents.lock().ok()?;
        if let Some(c) = agents.get(&key) {
            return Some(c.clone());
        }
        let c = AgentClient::new(self.member.dialer.agent_channel(addr, node).ok()?);
        agents.insert(key, c.clone());
        Some(c)
    }

    /// Starts, resizes or stops a replica on its agent, unless a call is
    /// in flight or backing off.
    fn call(&self, tasks: &TaskTracker, c: AgentCall) {
        let AgentCall {
            call,
            id,
            generation,
            placed_at,
            node,
            addr,
            spec,
        } = c;
        let now = Instant::now();
        {
            let Ok(mut attempts) = self.shared.attempts.lock() else {
                return;
            };
            let a = attempts
                .entry(id.clone())
                .or_insert_with(|| Attempt::new(call, generation, now));
            if a.call != call || a.generation != generation {
                // One call per replica at a time: a stop sent while a start
                // is on its way could reach the agent first and find nothing.
                if a.in_flight {
                    return;
                }
                let started = a.started;
                *a = Attempt::new(call, generation, now);
                a.started = started;
            }
            if a.in_flight || a.next_at > now {
                return;
            }
            a.in_flight = true;
            a.started |= call == Call::Start;
        }
        let Some(mut client) = self.agent(&node, &addr) else {
            return;
        };
        let shared = self.shared.clone();
        tasks.spawn(async move {
            let result = match call {
                Call::Start => {
                    let mut req = grpc::for_node(
                        &node,
                        pb::StartReplicaRequest {
                            spec: spec.as_ref().map(Into::into),
                            placed_at,
                        },
                    );
                    req.set_timeout(AGENT_CALL);
                    client.start_replica(req).await.map(|_| ())
                }
                Call::Resize => {
                    let r = spec.as_ref().map(|s| s.resources).unwrap_or_default();
                    let mut req = grpc::for_node(
                        &node,
                        pb::ResizeReplicaRequest {
                            id: id.clone(),
                            generation,
                            cpu_milli: r.cpu_milli,
                            memory_mib: r.memory_mib,
                            gpus: None,
                        },
                    );
                    req.set_timeout(AGENT_CALL);
                    client.resize_replica(req).await.map(|_| ())
                }
                Call::Stop => {
                    let mut req = grpc::for_node(
                        &node,
                        pb::StopReplicaRequest {
                            id: id.clone(),
                            generation,
                            grace_ms: Some(STOP_GRACE_MS),
                        },
                    );
                    req.set_timeout(AGENT_CALL);
                    client.stop_replica(req).await.map(|_| ())
                }
            };
            let Ok(mut attempts) = shared.attempts.lock() else {
                return;
            };
            let Some(a) = attempts.get_mut(&id) else {
                return;
            };
            a.in_flight = false;
            // A replica the agent does not have is as stopped as it gets.
            let result = match result {
                Err(status) if call == Call::Stop && status.code() == tonic::Code::NotFound => {
                    Ok(())
                }
                other => other,
            };
            match result {
                Ok(()) => {
                    tracing::debug!(replica = %id, generation, ?call, "agent accepted");
                    if call == Call::Stop {
                        a.started = false;
                    }
                    a.next_at = Instant::now() + SETTLE;
                    a.backoff = FIRST_BACKOFF;
                    a.failures = 0;
                }
                Err(status) => {
                    a.failures += 1;
                    if a.failures == 1 || a.failures.is_power_of_two() {
                        tracing::warn!(replica = %id, generation, ?call, failures = a.failures, error = %status.message(), "agent refused or did not answer; retrying with back-off");
                    }
                    a.next_at = Instant::now() + a.backoff;
                    a.backoff = (a.backoff * 2).min(MAX_BACKOFF);
                }
            }
            // No wake: what follows a call shows in the agent's next
            // heartbeat, or is due after a back-off, at a later pass.
        });
    }
}

#[cfg(test)]
mod tests {
    use berth_common::{GpuSlice, Resources};

    use super::*;

    #[test]
    fn a_replica_spec_comes_from_its_revision_and_model_version() {
        let mut state = ClusterState::default();
        let r = Replica {
            id: "chat-1".into(),
            deployment: "chat".into(),
            revision: 1,
            generation: 3,
            resources: Resources {
                gpus: 1,
                gpu_milli: 1000,
                ..Resources::default()
            },
            node: Some("n".into()),
            gpus: vec![GpuSlice {
                index: 1,
                milli: 1000,
                memory_mib: 80 * 1024,
            }],
            intent: ReplicaIntent::Run,
            placed_at: 7,
            created_at_ms: 0,
            evacuating: false,
            replaces: None,
        };
        assert!(replica_spec(&state, &r).is_none(), "no deployment");
        state.models.insert(
            "m".into(),
            berth_common::Model {
                name: "m".into(),
                versions: BTreeMap::from([(
                    "v1".into(),
                    berth_common::ModelVersion {
                        spec: berth_common::ModelVersionSpec {
                            version: "v1".into(),
                            runtime: berth_common::Runtime::Demo,
                            source: "builtin:demo".into(),
                            resources: Resources::default(),
                            env: BTreeMap::from([("K".into(), "V".into())]),
                            health: berth_common::HealthProbe::Tcp,
                            labels: Default::default(),
                        },
                        created_at_ms: 0,
                    },
                )]),
                created_at_ms: 0,
            },
        );
        let spec = berth_common::DeploymentSpec {
            model: "m".into(),
            version: "v1".into(),
            replicas: 1,
            resources: r.resources,
            policy: Default::default(),
            selector: Default::default(),
            gpu_model: None,
            priority: 0,
            max_surge: 1,
            max_unavailable: 0,
        };
        state.deployments.insert(
            "chat".into(),
            berth_common::Deployment {
                name: "chat".into(),
                spec: spec.clone(),
                revision: 1,
                history: vec![berth_common::Revision {
                    revision: 1,
                    spec,
                    created_at_ms: 0,
                }],
                created_at_ms: 0,
                next_ordinal: 2,
                paused: None,
            },
        );
        let s = replica_spec(&state, &r).expect("a spec");
        assert_eq!(s.id, "chat-1");
        assert_eq!(s.generation, 3);
        assert_eq!(s.gpus, [1]);
        assert_eq!(s.runtime, berth_common::Runtime::Demo);
        assert_eq!(s.env["K"], "V");
        assert_eq!(s.port, 0);
        s.validate().expect("a valid spec");
    }

    fn rollout_state(surge: u32, unavailable: u32) -> ClusterState {
        use crate::state::{Command, Request as R, apply};
        let spec = |v: &str| berth_common::ModelVersionSpec {
            version: v.into(),
            runtime: berth_common::Runtime::Demo,
            source: "demo".into(),
            resources: Resources::default(),
            env: BTreeMap::new(),
            health: berth_common::HealthProbe::Tcp,
            labels: Default::default(),
        };
        let mut s = ClusterState::default();
        let run = |s: &mut ClusterState, command| apply(s, R { at_ms: 1, command }).unwrap();
        run(
            &mut s,
            Command::CreateModel {
                name: "m".into(),
                version: spec("v1"),
            },
        );
        run(
            &mut s,
            Command::AddModelVersion {
                model: "m".into(),
                version: spec("v2"),
            },
        );
        run(
            &mut s,
            Command::CreateDeployment {
                name: "d".into(),
                request: berth_common::DeploymentRequest {
                    model: "m".into(),
                    version: "v1".into(),
                    replicas: 2,
                    resources: Default::default(),
                    policy: Default::default(),
                    selector: Default::default(),
                    gpu_model: None,
                    priority: 0,
                    max_surge: surge,
                    max_unavailable: unavailable,
                },
            },
        );
        run(
            &mut s,
            Command::UpdateDeployment {
                name: "d".into(),
                change: crate::state::DeploymentChange {
                    version: Some("v2".into()),
                    ..Default::default()
                },
            },
        );
        // Both old replicas placed (on a node name the step does not look at).
        for r in s.replicas.values_mut() {
            r.node = Some("n".into());
        }
        s
    }

    fn step(
        s: &ClusterState,
        running: &[&str],
        failed: &[&str],
        waited: Duration,
    ) -> Option<Command> {
        let phase = |r: &Replica| {
            if failed.contains(&r.id.as_str()) {
                Some(("failed".to_string(), "exited with code 1".to_string(), 1))
            } else if running.contains(&r.id.as_str()) {
                Some(("running".to_string(), String::new(), 0))
            } else {
                None
            }
        };
        let d = &s.deployments["d"];
        let replicas: Vec<&Replica> = s.replicas.values().collect();
        rollout_step(d, &replicas, &phase, &|_| waited, Duration::from_secs(60))
    }

    #[test]
    fn a_rollout_surges_then_retires_only_what_availability_allows() {
        let mut s = rollout_state(1, 0);
        let Some(Command::RolloutAdd { count: 1, .. }) =
            step(&s, &["d-1", "d-2"], &[], Duration::ZERO)
        else {
            panic!("surge one new replica first");
        };
        // The new replica exists, placed but not running yet: nothing to do.
        let mut new = s.replicas["d-1"].clone();
        new.id = "d-3".into();
        new.revision = 2;
        s.replicas.insert("d-3".into(), new);
        assert!(step(&s, &["d-1", "d-2"], &[], Duration::ZERO).is_none());
        // Running: one old replica may go.
        let Some(Command::RolloutRetire { replicas, .. }) =
            step(&s, &["d-1", "d-2", "d-3"], &[], Duration::ZERO)
        else {
            panic!("retire one old replica");
        };
        assert_eq!(replicas.len(), 1);
        // A new replica that fails, or stays unhealthy past the deadline, pauses it.
        assert!(matches!(
            step(&s, &["d-1", "d-2"], &["d-3"], Duration::ZERO),
            Some(Command::PauseRollout { .. })
        ));
        let Some(Command::PauseRollout { reason, .. }) =
            step(&s, &["d-1", "d-2"], &[], Duration::from_secs(61))
        else {
            panic!("paused by the deadline");
        };
        assert!(
            reason.contains("d-3") && reason.contains("deadline"),
            "{reason}"
        );
    }

    #[test]
    fn with_max_unavailable_old_replicas_go_first_and_the_count_is_topped_up() {
        let mut s = rollout_state(0, 1);
        let Some(Command::RolloutRetire { replicas, .. }) =
            step(&s, &["d-1", "d-2"], &[], Duration::ZERO)
        else {
            panic!("no surge: retire one first");
        };
        assert_eq!(replicas.len(), 1);
        // Every old replica gone (e.g. retired while unhealthy): top up.
        s.replicas.clear();
        assert!(matches!(
            step(&s, &[], &[], Duration::ZERO),
            Some(Command::RolloutAdd { count: 2, .. })
        ));
    }
}
