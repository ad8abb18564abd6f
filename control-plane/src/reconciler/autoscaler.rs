//! The autoscaler loop, on the leader. Once a second, for each autoscaled
//! deployment, it sums the fresh load signals — the gateways' reports
//! (`Serving.ReportLoad`, kept in a `LoadBoard`) and the engines' gauges the
//! agents send in heartbeats — runs the pure decision
//! (`autoscale::Window::decide`) and writes the result as one
//! `Command::Autoscale`, naming the idlest replicas to remove first. It also
//! records each replica's measured load time once (`RecordLoadTimes`).
//!
//! All of it lives in the leader's memory: a new leader starts with empty
//! windows, so it scales nothing down before it has watched the load for
//! the whole scale-down delay.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_common::{AutoscaleTarget, Node, Replica, ReplicaIntent};
use berth_proto::v1 as pb;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::autoscale::{Decision, Inputs, Window};
use super::nodes::{NodeTracker, Observation};
use super::replicas::Replicas;
use crate::state::load_times::{self, LoadTimeSample};
use crate::state::{ClusterState, Command};

/// A signal older than this does not count.
pub const SIGNAL_MAX_AGE: Duration = Duration::from_secs(5);
/// How often the autoscaler decides.
const TICK: Duration = Duration::from_secs(1);
/// Gateways silent for this long are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// The gateways' last reports, by gateway instance.
#[derive(Default)]
pub struct LoadBoard {
    reports: Mutex<HashMap<String, (Instant, Vec<pb::DeploymentLoad>)>>,
    /// Woken by a report of requests held with none in flight (a cold
    /// deployment's first requests): the autoscaler decides at once.
    cold: tokio::sync::Notify,
}

impl LoadBoard {
    /// Keeps a gateway's report (replacing its last one).
    pub fn record(&self, report: pb::LoadReport) {
        if report
            .deployments
            .iter()
            .any(|d| d.queued > 0 && d.inflight == 0)
        {
            self.cold.notify_one();
        }
        if let Ok(mut r) = self.reports.lock() {
            r.retain(|_, (at, _)| at.elapsed() < FORGET_AFTER);
            r.insert(report.gateway, (Instant::now(), report.deployments));
        }
    }

    /// The fresh reports' sums for each deployment: (in flight, queued).
    fn sums(&self) -> HashMap<String, (u64, u64)> {
        let mut out: HashMap<String, (u64, u64)> = HashMap::new();
        if let Ok(r) = self.reports.lock() {
            for (at, loads) in r.values() {
                if at.elapsed() >= SIGNAL_MAX_AGE {
                    continue;
                }
                for l in loads {
                    let e = out.entry(l.deployment.clone()).or_default();
                    e.0 += u64::from(l.inflight);
                    e.1 += u64::from(l.queued);
                }
            }
        }
        out
    }
}

/// The autoscaler's last word on a deployment, for `deploy show`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// What it decided and why.
    pub text: String,
    /// Whether it is a condition: the count should grow but cannot.
    pub blocked: bool,
}

#[derive(Default)]
struct Memory {
    /// The term these windows were built in.
    term: Option<u64>,
    windows: HashMap<String, Window>,
    status: HashMap<String, Status>,
    /// Runs whose load time was recorded: (replica, run start).
    recorded: HashSet<(String, u64)>,
}

/// The autoscaler of this member (acting while it leads).
#[derive(Clone)]
pub struct Autoscaler {
    nodes: NodeTracker,
    replicas: Replicas,
    board: Arc<LoadBoard>,
    memory: Arc<Mutex<Memory>>,
    epoch: Instant,
}

/// What one tick found to do.
struct Work {
    decisions: Vec<(String, u32, Decision, Vec<String>)>,
    samples: Vec<LoadTimeSample>,
}

/// The class of node a replica ran on: its first GPU's model (marked when
/// simulated), or `cpu`.
fn node_class(node: Option<&Node>, r: &Replica) -> String {
    let gpu = r
        .gpus
        .first()
        .and_then(|g| node?.inventory.gpus.iter().find(|d| d.index == g.index));
    match (gpu, node) {
        (Some(d), Some(n)) if n.inventory.simulated() => format!("{} (simulated)", d.model),
        (Some(d), _) => d.model.clone(),
        _ => "cpu".into(),
    }
}

impl Autoscaler {
    /// The autoscaler of the member behind `nodes`.
    pub fn new(nodes: NodeTracker, replicas: Replicas) -> Self {
        Autoscaler {
            nodes,
            replicas,
            board: Arc::new(LoadBoard::default()),
            memory: Arc::new(Mutex::new(Memory::default())),
            epoch: Instant::now(),
        }
    }

    /// The replica loop it wakes.
    pub fn replicas(&self) -> &Replicas {
        &self.replicas
    }

    /// Where gateways' reports go.
    pub fn board(&self) -> &LoadBoard {
        &self.board
    }

    /// The last decision about `deployment`, while this member leads.
    pub fn status(&self, deployment: &str) -> Option<Status> {
        self.memory.lock().ok()?.status.get(deployment).cloned()
    }

    /// Runs the loop until `shutdown`.
    pub fn start(&self, tasks: &TaskTracker, shutdown: CancellationToken) {
        let me = self.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(TICK) => {}
                    _ = me.board.cold.notified() => {}
                }
                me.tick().await;
            }
        });
    }

    async fn tick(&self) {
        let term = self.nodes.member.view().term;
        let leads = self.nodes.leader_here().is_ok();
        let work = {
            let Ok(mut memory) = self.memory.lock() else {
                return;
            };
            if !leads || memory.term != Some(term) {
                *memory = Memory {
                    term: leads.then_some(term),
                    ..Memory::default()
                };
            }
            if !leads {
                return;
            }
            let applied = self.nodes.member.state.read();
            let now_ms = self.epoch.elapsed().as_millis() as u64;
            let gateways = self.board.sums();
            self.nodes.with_observations(|observed| {
                self.plan(&applied.state, observed, &gateways, &mut memory, now_ms)
            })
        };
        if !work.samples.is_empty()
            && let Err(e) = self
                .nodes
                .member
                .write(Command::RecordLoadTimes(work.samples))
                .await
        {
            tracing::warn!(error = %e, "recording load times failed");
        }
        for (name, from, decision, prefer) in work.decisions {
            let status = match decision {
                Decision::Hold(text) => Status {
                    text,
                    blocked: false,
                },
                Decision::Blocked(text) => Status {
                    text,
                    blocked: true,
                },
                Decision::Scale { to, reason } => {
                    tracing::info!(deployment = %name, from, to, %reason, "autoscaling");
                    let command = Command::Autoscale {
                        name: name.clone(),
                        from,
                        to,
                        prefer,
                        reason: reason.clone(),
                    };
                    match self.nodes.member.write(command).await {
                        Ok(_) => {
                            self.replicas.wake();
                            Status {
                                text: format!("scaled from {from} to {to}: {reason}"),
                                blocked: false,
                            }
                        }
                        Err(e) => Status {
                            text: format!("scaling from {from} to {to} failed: {e}"),
                            blocked: false,
                        },
                    }
                }
            };
            if let Ok(mut memory) = self.memory.lock() {
                memory.status.insert(name, status);
            }
        }
    }

    /// Reads the signals and decides, under the state's and the
    /// observations' guards (no I/O here).
    fn plan(
        &self,
        state: &ClusterState,
        observed: &HashMap<String, Observation>,
        gateways: &HashMap<String, (u64, u64)>,
        memory: &mut Memory,
        now_ms: u64,
    ) -> Work {
        let seen = |r: &Replica| -> Option<&pb::ReplicaStatus> {
            let o = observed.get(r.node.as_ref()?)?;
            (o.at.elapsed() < SIGNAL_MAX_AGE)
                .then(|| o.report.replicas.iter().find(|x| x.id == r.id))
                .flatten()
        };
        let mut samples = Vec::new();
        for r in state.replicas.values() {
            let Some(x) = seen(r) else { continue };
            if let Some(ms) = x.ready_after_ms
                && x.phase == "running"
                && memory.recorded.insert((r.id.clone(), x.started_at_ms))
            {
                let node = r.node.as_ref().and_then(|n| state.nodes.get(n));
                samples.push(LoadTimeSample {
                    model: x.model.clone(),
                    node_class: node_class(node, r),
                    ms,
                });
            }
        }
        memory
            .recorded
            .retain(|(id, _)| state.replicas.contains_key(id));
        memory
            .windows
            .retain(|name, _| state.autoscale.contains_key(name));
        memory
            .status
            .retain(|name, _| state.autoscale.contains_key(name));

        let mut decisions = Vec::new();
        for (name, policy) in &state.autoscale {
            let Some(d) = state.deployments.get(name) else {
                continue;
            };
            let mine: Vec<&Replica> = state
                .replicas
                .values()
                .filter(|r| r.deployment == *name && r.intent == ReplicaIntent::Run)
                .collect();
            // The engines' gauges: (running + waiting, waiting), summed over
            // the replicas whose agents reported them lately.
            let mut engine: Option<(u64, u64)> = None;
            let mut kv_cache_milli: Option<u32> = None;
            let mut idle: Vec<(u64, &str)> = Vec::new();
            for r in &mine {
                let Some(x) = seen(r) else { continue };
                if let Some(k) = x.kv_cache_milli {
                    kv_cache_milli = Some(kv_cache_milli.map_or(k, |m| m.max(k)));
                }
                if let (Some(w), Some(run)) = (x.queue_depth, x.running_requests) {
                    let e = engine.get_or_insert((0, 0));
                    e.0 += u64::from(w) + u64::from(run);
                    e.1 += u64::from(w);
                    idle.push((u64::from(w) + u64::from(run), r.id.as_str()));
                } else {
                    idle.push((0, r.id.as_str()));
                }
            }
            let gateway = gateways.get(name).copied();
            let load = match policy.target {
                // The gateways count exactly; the engines' gauges, read at
                // different moments on different nodes, only approximately
                // (a request that moved between two reads counts twice), so
                // they stand in only while no gateway reports.
                AutoscaleTarget::Inflight(_) => match (gateway, engine) {
                    (Some((inflight, queued)), _) => Some(inflight + queued),
                    (None, Some((busy, _))) => Some(busy),
                    (None, None) => None,
                },
                AutoscaleTarget::QueueDepth(_) => match (gateway, engine) {
                    (None, None) => None,
                    (g, e) => Some(g.map_or(0, |(_, q)| q) + e.map_or(0, |(_, w)| w)),
                },
            };
            let why_pending = self.replicas.explanations(name);
            let unplaced = (!why_pending.is_empty()).then(|| {
                (
                    why_pending.len() as u32,
                    why_pending
                        .first()
                        .map(|(_, why)| why.clone())
                        .unwrap_or_default(),
                )
            });
            let inputs = Inputs {
                policy: policy.clone(),
                current: d.spec.replicas,
                load: load.map(|l| l as f64),
                unplaced,
                load_time_ms: load_times::estimate_ms(state, &d.spec.model).unwrap_or(0),
                kv_cache_milli,
            };
            let decision = memory
                .windows
                .entry(name.clone())
                .or_default()
                .decide(&inputs, now_ms);
            idle.sort();
            let prefer = idle.into_iter().map(|(_, id)| id.to_string()).collect();
            decisions.push((name.clone(), d.spec.replicas, decision, prefer));
        }
        Work { decisions, samples }
    }
}
