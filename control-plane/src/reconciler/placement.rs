//! From the replicated state to the scheduler and back, purely: ready
//! nodes and what their placed replicas hold become a `scheduler::Cluster`,
//! pending replicas become `Request`s (grouped by their deployment's
//! policy), and the binds become the `PlanBind`s of an `ApplyPlan` command,
//! which `apply` re-validates. MIG GPUs are left out: Berth does not split
//! or share them; so are quarantined GPUs.
//!
//! A GPU's memory in use is what the replicas placed on it reserve plus
//! what the reservations do not account for, as its agent last measured it
//! (`Unreserved`: memory of processes Berth did not start, and replicas'
//! use above their reservations). So a GPU whose measured free memory is
//! below a request never gets it, whatever the reservations say, while a
//! replica that was placed but has not started yet still counts whole.

use std::collections::{BTreeMap, HashMap};

use berth_common::{GpuSlice, PlacementPolicy, Replica, ReplicaIntent};

use crate::scheduler::{
    self, Cluster, Config, Explanation, Gpu, GpuUse, Policy, QueueOrder, Request, Workload,
};
use crate::state::{ClusterState, PlanBind, capacity, gpus};

/// Per node, then GPU index: GPU memory in use beyond the reservations
/// (MiB), from the agents' last heartbeats; nodes and GPUs with none are
/// left out.
pub type Unreserved = HashMap<String, HashMap<u32, u64>>;

/// The scheduler's view of the cluster.
pub fn cluster(state: &ClusterState, unreserved: &Unreserved) -> Cluster {
    let usage = capacity::usage(state.replicas.values());
    let quarantined = gpus::quarantined(state);
    let mut nodes = BTreeMap::new();
    for (name, n) in &state.nodes {
        let used = usage.get(name).cloned().unwrap_or_default();
        let out = quarantined.get(name.as_str());
        let measured = unreserved.get(name.as_str());
        let gpus = n
            .inventory
            .gpus
            .iter()
            .filter(|g| !g.mig_enabled && !out.is_some_and(|q| q.contains(&g.index)))
            .map(|g| {
                let u = used.gpus.get(&g.index).copied().unwrap_or_default();
                let beyond = measured.and_then(|m| m.get(&g.index)).copied().unwrap_or(0);
                Gpu {
                    index: g.index,
                    model: g.model.clone(),
                    memory_mib: g.memory_mib,
                    locality: g.locality,
                    used: GpuUse {
                        milli: u.milli,
                        memory_mib: u.memory_mib.saturating_add(beyond).min(g.memory_mib),
                    },
                }
            })
            .collect();
        nodes.insert(
            name.clone(),
            scheduler::Node {
                name: name.clone(),
                schedulable: n.schedulable(),
                state: n.display_state().to_string(),
                labels: n.labels.clone(),
                cpu_milli: n.inventory.cpu_milli,
                memory_mib: n.inventory.memory_mib,
                gpus,
                used_cpu_milli: used.cpu_milli,
                used_memory_mib: used.memory_mib,
            },
        );
    }
    // Requests seen so far: the placed replicas (scheduling adds the
    // pending ones), whose mix the default policy keeps room for. The
    // replicas themselves are not listed (`Cluster::placed`): the control
    // plane does not preempt, so the scheduler never releases one, and
    // copying every replica on every pass would cost more than scheduling.
    let mut workload = Workload::default();
    workload.extend(
        state
            .replicas
            .values()
            .filter(|r| r.node.is_some())
            .map(|r| (&r.resources, 1)),
    );
    Cluster {
        nodes,
        placed: BTreeMap::new(),
        scan_from: None,
        workload,
    }
}

/// The scheduler request of a replica.
fn request(state: &ClusterState, r: &Replica) -> Request {
    let d = state.deployments.get(&r.deployment);
    Request {
        id: r.id.clone(),
        resources: r.resources,
        selector: d.map(|d| d.spec.selector.clone()).unwrap_or_default(),
        gpu_model: d.and_then(|d| d.spec.gpu_model.clone()),
        priority: d.map_or(0, |d| d.spec.priority),
        arrival: r.created_at_ms,
    }
}

fn policy(p: PlacementPolicy) -> Policy {
    match p {
        PlacementPolicy::Default => Policy::Default,
        PlacementPolicy::Binpack => Policy::Binpack,
        PlacementPolicy::Spread => Policy::Spread,
    }
}

/// What a scheduling pass decided: binds to propose, and why the others wait.
#[derive(Debug, Default)]
pub struct Decision {
    /// Placements for an `ApplyPlan`.
    pub binds: Vec<PlanBind>,
    /// Replicas left pending, with the scheduler's explanation.
    pub pending: Vec<(String, Explanation)>,
}

/// What a scheduling pass works on, copied out of the state: the cluster
/// and the pending replicas' requests by policy. Taking it is quick; the
/// scheduling itself then runs without holding the state.
#[derive(Debug, Default)]
pub struct Pending {
    cluster: Cluster,
    by_policy: BTreeMap<u8, (PlacementPolicy, Vec<Request>)>,
}

impl Pending {
    /// Whether nothing waits for a place.
    pub fn is_empty(&self) -> bool {
        self.by_policy.is_empty()
    }

    /// The pending replicas of `state` and the cluster they go on, with
    /// `unreserved` GPU memory in use.
    pub fn of(state: &ClusterState, unreserved: &Unreserved) -> Pending {
        let mut by_policy: BTreeMap<u8, (PlacementPolicy, Vec<Request>)> = BTreeMap::new();
        for r in state.replicas.values() {
            if r.intent != ReplicaIntent::Run || r.node.is_some() {
                continue;
            }
            let p = state
                .deployments
                .get(&r.deployment)
                .map_or(PlacementPolicy::Default, |d| d.spec.policy);
            by_policy
                .entry(p as u8)
                .or_insert_with(|| (p, Vec::new()))
                .1
                .push(request(state, r));
        }
        if by_policy.is_empty() {
            return Pending::default();
        }
        Pending {
            cluster: cluster(state, unreserved),
            by_policy,
        }
    }

    /// Places every pending replica it can, deployments of each policy in
    /// turn (priority first within one policy), accounting each bind before
    /// the next.
    pub fn schedule(self) -> Decision {
        let Pending {
            mut cluster,
            by_policy,
        } = self;
        let mut out = Decision::default();
        for (p, requests) in by_policy.into_values() {
            let config = Config {
                policy: policy(p),
                queue: QueueOrder::Priority,
                weights: Default::default(),
                preemption: false,
            };
            let started = std::time::Instant::now();
            let plan = scheduler::schedule_in_place(&mut cluster, &requests, &config);
            crate::metrics::scheduler_batch(requests.len(), started.elapsed());
            out.binds.extend(plan.binds.into_iter().map(|b| {
                PlanBind {
                    replica: b.replica,
                    node: b.node,
                    gpus: b
                        .gpus
                        .into_iter()
                        .map(|g| GpuSlice {
                            index: g.index,
                            milli: g.milli,
                            memory_mib: g.memory_mib,
                        })
                        .collect(),
                }
            }));
            out.pending.extend(plan.pending);
        }
        out
    }
}

/// Places every pending replica of `state` it can (`Pending::of`, then `schedule`).
pub fn decide(state: &ClusterState, unreserved: &Unreserved) -> Decision {
    Pending::of(state, unreserved).schedule()
}

#[cfg(test)]
mod tests {
    use berth_common::{
        DeploymentRequest, GpuDevice, GpuSource, HealthProbe, Labels, ModelVersionSpec,
        NodeInventory, NodeRegistration, ResourceOverrides, Resources, Runtime,
    };
    use proptest::prelude::*;

    use super::*;
    use crate::state::{Command, Outcome, Request as StateRequest, apply, check_invariants};

    fn run(state: &mut ClusterState, command: Command) -> Result<Outcome, crate::state::Rejection> {
        apply(
            state,
            StateRequest {
                at_ms: 1000,
                command,
            },
        )
    }

    fn node(name: &str, gpus: u32, cpus: u64, mig: bool) -> Command {
        Command::RegisterNode(NodeRegistration {
            name: name.into(),
            addr: "127.0.0.1:7500".into(),
            labels: Labels::from([("zone".to_string(), name.to_string())]),
            inventory: NodeInventory {
                gpu_source: GpuSource::Simulated {
                    spec: "test".into(),
                },
                gpus: (0..gpus)
                    .map(|i| GpuDevice {
                        index: i,
                        uuid: format!("GPU-{name}-{i}"),
                        model: "A100-80GB".into(),
                        memory_mib: 80 * 1024,
                        pci_bus_id: String::new(),
                        locality: Some(i / 4),
                        mig_enabled: mig && i == 0,
                    })
                    .collect(),
                cpu_model: "cpu".into(),
                cpu_milli: cpus * 1000,
                memory_mib: 256 * 1024,
                hostname: name.into(),
                os: "linux".into(),
                cgroups: "unavailable".into(),
                agent_version: "test".into(),
            },
            instance: "i".into(),
        })
    }

    fn model() -> Command {
        Command::CreateModel {
            name: "m".into(),
            version: ModelVersionSpec {
                version: "v1".into(),
                runtime: Runtime::Demo,
                source: "demo".into(),
                resources: Resources::default(),
                env: Default::default(),
                health: HealthProbe::Tcp,
                labels: Labels::new(),
            },
        }
    }

    fn deploy(name: &str, replicas: u32, gpus: u32, memory_gib: u64, milli: u32) -> Command {
        Command::CreateDeployment {
            name: name.into(),
            request: DeploymentRequest {
                model: "m".into(),
                version: "v1".into(),
                replicas,
                resources: ResourceOverrides {
                    gpus: Some(gpus),
                    gpu_memory_mib: Some(memory_gib * 1024),
                    gpu_milli: Some(milli),
                    ..Default::default()
                },
                policy: PlacementPolicy::Default,
                selector: Labels::new(),
                gpu_model: None,
                priority: 0,
                max_surge: 1,
                max_unavailable: 0,
            },
        }
    }

    /// Memory the reservations do not account for (foreign processes,
    /// replicas above their reservations) keeps a request off a GPU whose
    /// measured free memory is too small, though the reservations say it
    /// fits; a whole-GPU request needs a GPU nobody else uses.
    #[test]
    fn measured_use_beyond_reservations_keeps_requests_away() {
        let mut s = ClusterState::default();
        for c in [
            model(),
            node("a", 2, 16, false),
            deploy("chat", 1, 1, 40, 500),
        ] {
            run(&mut s, c).unwrap();
        }
        let free = decide(&s, &Unreserved::new());
        assert_eq!(
            free.binds[0].gpus[0].index, 0,
            "either GPU fits; 0 comes first"
        );

        // 50 GiB of foreign use on GPU 0: 30 GiB really free there.
        let foreign = Unreserved::from([("a".to_string(), HashMap::from([(0, 50 * 1024)]))]);
        let d = decide(&s, &foreign);
        assert_eq!(d.binds.len(), 1);
        assert_eq!(d.binds[0].gpus[0].index, 1, "{:?}", d.binds);

        // Both GPUs short: the replica waits, whatever the reservations say.
        let both = Unreserved::from([(
            "a".to_string(),
            HashMap::from([(0, 50 * 1024), (1, 41 * 1024 + 1)]),
        )]);
        let d = decide(&s, &both);
        assert!(d.binds.is_empty(), "{:?}", d.binds);
        assert_eq!(d.pending[0].0, "chat-1");

        // Use beyond the reservations never makes a GPU look over-full.
        let huge = Unreserved::from([("a".to_string(), HashMap::from([(0, u64::MAX)]))]);
        let view = cluster(&s, &huge);
        assert_eq!(view.nodes["a"].gpus[0].used.memory_mib, 80 * 1024);

        // A whole GPU is refused where anything else holds memory.
        run(&mut s, deploy("whole", 1, 1, 0, 1000)).unwrap();
        let one = Unreserved::from([("a".to_string(), HashMap::from([(1, 512)]))]);
        let d = decide(&s, &one);
        let whole = d
            .binds
            .iter()
            .find(|b| b.replica == "whole-1")
            .expect("placed");
        assert_eq!(whole.gpus[0].index, 0);
    }

    #[test]
    fn pending_replicas_are_placed_and_the_plan_applies() {
        let mut s = ClusterState::default();
        for c in [
            model(),
            node("a", 2, 16, true),
            node("b", 8, 64, false),
            deploy("big", 1, 8, 0, 1000),
            deploy("shared", 3, 1, 20, 300),
            deploy("huge", 1, 16, 0, 1000),
        ] {
            run(&mut s, c).unwrap();
        }
        let d = decide(&s, &Unreserved::new());
        assert_eq!(d.binds.len(), 4, "{:?}", d.binds);
        assert_eq!(d.pending.len(), 1);
        assert_eq!(d.pending[0].0, "huge-1");
        assert!(
            d.pending[0].1.to_string().contains("fewer GPUs"),
            "{}",
            d.pending[0].1
        );
        let big = d.binds.iter().find(|b| b.replica == "big-1").unwrap();
        assert_eq!(big.node, "b");
        // The MIG GPU of node a is never given out.
        assert!(
            d.binds
                .iter()
                .all(|b| b.node != "a" || b.gpus.iter().all(|g| g.index != 0)),
            "{:?}",
            d.binds
        );
        let Ok(Outcome::Plan(results)) = run(&mut s, Command::ApplyPlan(d.binds)) else {
            panic!("a plan");
        };
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        check_invariants(&s).unwrap();
        // Nothing left to place but what cannot fit.
        let again = decide(&s, &Unreserved::new());
        assert!(again.binds.is_empty());
        assert_eq!(again.pending.len(), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the deployments, a plan the scheduler makes from the
        /// state applies in full and keeps every invariant.
        #[test]
        fn scheduler_plans_always_apply(
            nodes in prop::collection::vec((0u32..9, 1u64..65), 1..5),
            deployments in prop::collection::vec(
                (1u32..6, 0u32..3, prop::sample::select(vec![0u64, 10, 40, 80]), prop::sample::select(vec![250u32, 500, 1000])),
                1..5,
            ),
        ) {
            let mut s = ClusterState::default();
            run(&mut s, model()).unwrap();
            for (i, (gpus, cpus)) in nodes.iter().enumerate() {
                run(&mut s, node(&format!("n{i}"), *gpus, *cpus, false)).unwrap();
            }
            for (i, (replicas, gpus, mem, milli)) in deployments.iter().enumerate() {
                let milli = if *gpus > 1 { 1000 } else { *milli };
                let _ = run(&mut s, deploy(&format!("d{i}"), *replicas, *gpus, *mem, milli));
            }
            let d = decide(&s, &Unreserved::new());
            let n = d.binds.len();
            let Ok(Outcome::Plan(results)) = run(&mut s, Command::ApplyPlan(d.binds)) else {
                panic!("a plan");
            };
            prop_assert_eq!(results.len(), n);
            prop_assert!(results.iter().all(Result::is_ok), "{:?}", results);
            prop_assert!(check_invariants(&s).is_ok());
        }
    }
}
