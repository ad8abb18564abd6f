//! Placement: which node and which GPUs each pending replica gets.
//!
//! Pure and deterministic: `schedule` reads a `Cluster` snapshot and the
//! pending `Request`s and returns a `Plan`; no I/O, no clock, no
//! randomness, and maps are `BTreeMap`s, so the same input gives the same
//! plan everywhere (the control plane and `berth sim` share this code).
//!
//! For each request, in queue order: filter the nodes (ready, selector, GPU
//! model, CPU, memory, GPU fit), score the survivors, bind to the best one,
//! and account the bind before the next request. GPU rules: a replica with
//! `gpus = 1` and a share below a whole GPU (`gpu_milli < 1000`, or GPU
//! memory below the GPU's) may share a GPU while both sums fit; a replica
//! with N GPUs gets N whole GPUs on one node, all or nothing, preferring
//! GPUs in one locality group (NVLink domain, PCIe switch or NUMA node).
//! A request left pending gets an `Explanation`: per filter, how many
//! nodes it excluded.
//!
//! Preemption (when enabled): a request that fits nowhere may evict
//! lower-priority replicas; the node needing the fewest evictions (then the
//! lowest evicted priorities) wins, and each eviction says why.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::fmt;

use berth_common::resources::WHOLE_GPU_MILLI;
use berth_common::{Labels, Resources};
use serde::{Deserialize, Serialize};

mod fragmentation;
#[cfg(test)]
mod tests;

pub use fragmentation::{MAX_TARGET_SHAPES, Shape, Workload, node_fragmentation};

/// One GPU of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// Index on its node (what `CUDA_VISIBLE_DEVICES` uses).
    pub index: u32,
    /// Model name, e.g. `A100-80GB`.
    pub model: String,
    /// Total memory, MiB.
    pub memory_mib: u64,
    /// Locality group (GPUs in one group talk fastest); `None` when unknown.
    pub locality: Option<u32>,
    /// What is allocated on it.
    pub used: GpuUse,
}

/// What is allocated on one GPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuUse {
    /// Compute share in thousandths.
    pub milli: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
}

impl GpuUse {
    fn is_free(&self) -> bool {
        self.milli == 0 && self.memory_mib == 0
    }
}

/// A node as the scheduler sees it: capacity plus what is allocated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Unique name.
    pub name: String,
    /// Whether new replicas may land here (`ready`, not down, cordoned,
    /// draining, drained or quarantined); the text is the state's name.
    pub schedulable: bool,
    /// The node's state, for explanations.
    pub state: String,
    /// Labels for selectors.
    pub labels: Labels,
    /// CPU capacity, millicores.
    pub cpu_milli: u64,
    /// Memory capacity, MiB.
    pub memory_mib: u64,
    /// GPUs by index.
    pub gpus: Vec<Gpu>,
    /// Allocated CPU, millicores.
    pub used_cpu_milli: u64,
    /// Allocated memory, MiB.
    pub used_memory_mib: u64,
}

impl Node {
    fn gpu_mut(&mut self, index: u32) -> Option<&mut GpuUse> {
        self.gpus
            .iter_mut()
            .find(|g| g.index == index)
            .map(|g| &mut g.used)
    }

    fn is_empty(&self) -> bool {
        self.used_cpu_milli == 0
            && self.used_memory_mib == 0
            && self.gpus.iter().all(|g| g.used.is_free())
    }
}

/// A replica that holds resources: what it asked for and where it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    /// The request it was placed for.
    pub request: Request,
    /// Where it went.
    pub bind: Bind,
}

/// The cluster snapshot: nodes by name, and the replicas placed on them
/// (by replica id), whose resources the nodes' `used_*` fields include.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    /// Every node.
    pub nodes: BTreeMap<String, Node>,
    /// Every placed replica.
    pub placed: BTreeMap<String, Placed>,
    /// The node where the next decision starts scanning (where the last
    /// one stopped), so bounded scoring visits every node in turn.
    pub scan_from: Option<String>,
    /// The requests seen so far, whose mix the default policy keeps room
    /// for (`schedule_in_place` adds its batch; empty: room for more of
    /// each request being placed).
    pub workload: Workload,
}

/// A replica waiting for a place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Replica id.
    pub id: String,
    /// What it needs (GPU memory and share per GPU).
    pub resources: Resources,
    /// Labels the node must carry.
    pub selector: Labels,
    /// GPU model the node's GPUs must be, if any.
    pub gpu_model: Option<String>,
    /// Higher goes first (queue order `priority`).
    pub priority: i32,
    /// Arrival order (queue order `fifo`, ties elsewhere).
    pub arrival: u64,
}

/// One GPU's part of a bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuShare {
    /// GPU index on the node.
    pub index: u32,
    /// Compute share, thousandths.
    pub milli: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
}

/// A placement decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    /// Replica id.
    pub replica: String,
    /// Node name.
    pub node: String,
    /// GPUs given, empty for a CPU-only replica.
    pub gpus: Vec<GpuShare>,
}

/// Why a node was excluded, in filter order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Exclusion {
    /// Node not schedulable (its state).
    NotReady(String),
    /// A selector label missing or different.
    Selector(String),
    /// No GPU of the requested model.
    GpuModel(String),
    /// Not enough free CPU.
    Cpu,
    /// Not enough free memory.
    Memory,
    /// Fewer GPUs in total than requested.
    GpuCount,
    /// GPUs exist but too few are free (whole GPUs, or room on one GPU).
    GpuFree,
    /// No single GPU has enough memory, even empty.
    GpuMemory,
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exclusion::NotReady(s) => write!(f, "node {s}"),
            Exclusion::Selector(s) => write!(f, "selector {s} not matched"),
            Exclusion::GpuModel(m) => write!(f, "no {m} GPU"),
            Exclusion::Cpu => f.write_str("not enough free CPU"),
            Exclusion::Memory => f.write_str("not enough free memory"),
            Exclusion::GpuCount => f.write_str("fewer GPUs than requested"),
            Exclusion::GpuFree => {
                f.write_str("not enough free GPUs or free room on any single GPU")
            }
            Exclusion::GpuMemory => f.write_str("no GPU with that much memory"),
        }
    }
}

/// Why a request stayed pending: per exclusion, how many nodes it excluded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// Nodes excluded per reason.
    pub excluded: BTreeMap<Exclusion, u32>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.excluded.is_empty() {
            return f.write_str("no nodes");
        }
        let parts: Vec<String> = self
            .excluded
            .iter()
            .map(|(why, n)| format!("{n} node{}: {why}", if *n == 1 { "" } else { "s" }))
            .collect();
        f.write_str(&parts.join("; "))
    }
}

/// A replica evicted to make room for a higher-priority one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eviction {
    /// The evicted replica.
    pub replica: String,
    /// Its node.
    pub node: String,
    /// Why, for the event log.
    pub reason: String,
}

/// The scheduler's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Placements, in the order they were decided.
    pub binds: Vec<Bind>,
    /// Replicas evicted (preemption), before the binds that needed them.
    pub evictions: Vec<Eviction>,
    /// Requests left pending, with why.
    pub pending: Vec<(String, Explanation)>,
}

/// How nodes are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Policy {
    /// Fragmentation-aware (the default): keep whole GPUs and whole nodes
    /// free for large replicas, then pack.
    #[default]
    Default,
    /// Prefer the fullest nodes.
    Binpack,
    /// Prefer the emptiest nodes.
    Spread,
    /// The first node (by name) that fits: a baseline for `berth sim`.
    FirstFit,
    /// The node left with the least free GPU (then CPU) after the bind: a
    /// baseline for `berth sim`.
    BestFit,
}

impl Policy {
    /// Every policy, for comparisons (`berth sim`, benchmarks).
    pub const ALL: [Policy; 5] = [
        Policy::Default,
        Policy::Binpack,
        Policy::Spread,
        Policy::FirstFit,
        Policy::BestFit,
    ];
}

/// Queue order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum QueueOrder {
    /// Higher priority first, then arrival.
    #[default]
    Priority,
    /// Arrival order.
    Fifo,
    /// Smallest GPU need first, then CPU and memory.
    SmallestFirst,
}

/// Weights of the resource dimensions in the utilization score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Weights {
    /// GPU compute.
    pub gpu: u32,
    /// GPU memory.
    pub gpu_memory: u32,
    /// CPU.
    pub cpu: u32,
    /// Memory.
    pub memory: u32,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            gpu: 4,
            gpu_memory: 2,
            cpu: 1,
            memory: 1,
        }
    }
}

/// Scheduler settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Node ranking.
    pub policy: Policy,
    /// Queue order.
    pub queue: QueueOrder,
    /// Dimension weights.
    pub weights: Weights,
    /// Whether a request that fits nowhere may evict lower-priority replicas.
    pub preemption: bool,
}

/// A node's rank for one request: compared field by field, lower is
/// better, node name last so ties break the same way everywhere.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Score<'a> {
    /// Policy-specific keys, most important first.
    pub keys: [i64; 3],
    /// The node.
    pub node: &'a str,
}

/// Places `requests` on `cluster` and returns the plan; `cluster` is not
/// changed.
pub fn schedule(cluster: &Cluster, requests: &[Request], config: &Config) -> Plan {
    let mut work = cluster.clone();
    schedule_in_place(&mut work, requests, config)
}

/// Places `requests` in queue order, applying each bind (and eviction) to
/// `cluster` as it goes. The requests are first counted in
/// `cluster.workload`: requests seen, so the default policy keeps room for
/// the later ones of the same batch.
pub fn schedule_in_place(cluster: &mut Cluster, requests: &[Request], config: &Config) -> Plan {
    schedule_batch(cluster, requests, config, true)
}

/// `schedule_in_place`, with or without the memo of same-shaped runs (tests
/// compare the two).
fn schedule_batch(
    cluster: &mut Cluster,
    requests: &[Request],
    config: &Config,
    remember: bool,
) -> Plan {
    cluster
        .workload
        .extend(requests.iter().map(|r| (&r.resources, 1)));
    let mut queue: Vec<&Request> = requests.iter().collect();
    sort_queue(&mut queue, config.queue);
    let mut plan = Plan::default();
    let mut memo = Memo::new(cluster);
    for request in queue {
        memo.next_request(request);
        let memo = remember.then_some(&mut memo);
        match place_one_with(cluster, request, config, memo) {
            Ok((bind, evictions)) => {
                plan.evictions.extend(evictions);
                plan.binds.push(bind);
            }
            Err(why) => plan.pending.push((request.id.clone(), why)),
        }
    }
    plan
}

/// Places one request, applying the bind (and any evictions) to `cluster`.
pub fn place_one(
    cluster: &mut Cluster,
    request: &Request,
    config: &Config,
) -> Result<(Bind, Vec<Eviction>), Explanation> {
    place_one_with(cluster, request, config, None)
}

/// What each node answered for the current run of same-shaped requests
/// (same resources, selector and GPU model) within one batch.
///
/// A node's answer (its filter verdict, the GPUs it would give, its score
/// keys) depends only on the node, the request's shape, the policy and the
/// batch's workload, none of which change within a run except the nodes
/// the run's own binds (and evictions) touch, which are forgotten. So a
/// deployment of many replicas checks each node once per change instead of
/// once per replica, and the plan is the same as without the memo. Answers
/// are kept by the node's position in name order (a batch adds or removes
/// no node), so a lookup costs no hashing.
struct Memo<'r> {
    /// The request that opened the current run.
    shape_of: Option<&'r Request>,
    /// Runs so far; answers of older runs are stale.
    run: u64,
    /// Node names in order, for positions.
    names: Vec<String>,
    answers: Vec<Option<(u64, Answer)>>,
}

/// A node's answer to one request: score keys and GPUs, or why it is excluded.
type Answer = Result<([i64; 3], Vec<GpuShare>), Exclusion>;

impl<'r> Memo<'r> {
    fn new(cluster: &Cluster) -> Self {
        Memo {
            shape_of: None,
            run: 0,
            names: cluster.nodes.keys().cloned().collect(),
            answers: vec![None; cluster.nodes.len()],
        }
    }

    /// Starts a new run unless `request` has the shape of the current one.
    fn next_request(&mut self, request: &'r Request) {
        let same = self.shape_of.is_some_and(|s| {
            s.resources == request.resources
                && s.selector == request.selector
                && s.gpu_model == request.gpu_model
        });
        if !same {
            self.shape_of = Some(request);
            self.run += 1;
        }
    }

    /// The position of the first node named `name` or after.
    fn position(&self, name: &str) -> usize {
        self.names.partition_point(|n| n.as_str() < name)
    }

    /// The answer at `slot`, computed by `answer` unless known for this run.
    fn answer(&mut self, slot: usize, answer: impl FnOnce() -> Answer) -> Option<&Answer> {
        let run = self.run;
        let entry = self.answers.get_mut(slot)?;
        if entry.as_ref().is_none_or(|(r, _)| *r != run) {
            *entry = Some((run, answer()));
        }
        entry.as_ref().map(|(_, a)| a)
    }

    fn forget(&mut self, node: &str) {
        let slot = self.position(node);
        if self.names.get(slot).is_some_and(|n| n == node)
            && let Some(a) = self.answers.get_mut(slot)
        {
            *a = None;
        }
    }
}

fn place_one_with(
    cluster: &mut Cluster,
    request: &Request,
    config: &Config,
    mut memo: Option<&mut Memo<'_>>,
) -> Result<(Bind, Vec<Eviction>), Explanation> {
    let (decision, next) = place(cluster, request, config, memo.as_deref_mut());
    cluster.scan_from = next;
    match decision {
        Ok(bind) => {
            if let Some(m) = memo.as_deref_mut() {
                m.forget(&bind.node);
            }
            cluster.apply(request, &bind);
            Ok((bind, Vec::new()))
        }
        Err(why) => {
            if !config.preemption {
                return Err(why);
            }
            let Some((node, victims, gpus)) = preempt(cluster, request, config) else {
                return Err(why);
            };
            let mut evictions = Vec::new();
            for v in victims {
                if let Some(p) = cluster.release(&v) {
                    evictions.push(Eviction {
                        reason: format!(
                            "preempted by {} (priority {} > {})",
                            request.id, request.priority, p.request.priority
                        ),
                        replica: v,
                        node: node.clone(),
                    });
                }
            }
            if let Some(m) = memo {
                m.forget(&node);
            }
            let bind = Bind {
                replica: request.id.clone(),
                node,
                gpus,
            };
            cluster.apply(request, &bind);
            Ok((bind, evictions))
        }
    }
}

/// Whether a GPU named `have` is of the model `want`: the same name, or
/// `want`'s words (letters and digits, any case) appear in `have`'s in
/// order, so `A100-80GB` matches NVML's `NVIDIA A100-SXM4-80GB` and `h100`
/// matches `NVIDIA H100 80GB HBM3`, but `A10` does not match `A100-80GB`.
pub fn gpu_model_matches(have: &str, want: &str) -> bool {
    if have == want {
        return true;
    }
    let words = |s: &str| -> Vec<String> {
        s.split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_ascii_lowercase)
            .collect()
    };
    let want = words(want);
    let mut have = words(have).into_iter();
    !want.is_empty() && want.iter().all(|w| have.any(|h| &h == w))
}

/// Frees what `placed` holds on `node`.
fn release_on(node: &mut Node, placed: &Placed) {
    let r = &placed.request.resources;
    node.used_cpu_milli = node.used_cpu_milli.saturating_sub(u64::from(r.cpu_milli));
    node.used_memory_mib = node.used_memory_mib.saturating_sub(r.memory_mib);
    for g in &placed.bind.gpus {
        if let Some(u) = node.gpu_mut(g.index) {
            u.milli = u.milli.saturating_sub(g.milli);
            u.memory_mib = u.memory_mib.saturating_sub(g.memory_mib);
        }
    }
}

/// A way to make room: evict `victims` on `node`, then bind `gpus` there.
struct Room {
    /// Fewest victims, then lowest priorities, then node name.
    key: (usize, i64, String),
    victims: Vec<String>,
    gpus: Vec<GpuShare>,
}

/// Finds the node where evicting the fewest, lowest-priority replicas makes
/// room for `request`: returns the node, the victims and the GPUs.
fn preempt(
    cluster: &Cluster,
    request: &Request,
    config: &Config,
) -> Option<(String, Vec<String>, Vec<GpuShare>)> {
    let mut best: Option<Room> = None;
    for node in cluster.nodes.values() {
        let mut victims: Vec<&Placed> = cluster
            .placed
            .values()
            .filter(|p| p.bind.node == node.name && p.request.priority < request.priority)
            .collect();
        if victims.is_empty() {
            continue;
        }
        // Lowest priority first; among equals the biggest, so fewer go.
        victims.sort_by_key(|p| {
            let r = &p.request.resources;
            (
                p.request.priority,
                Reverse(u64::from(r.gpus) * u64::from(r.gpu_milli)),
                Reverse(r.cpu_milli),
                p.request.id.clone(),
            )
        });
        let mut trial = node.clone();
        let mut chosen: Vec<&Placed> = Vec::new();
        let mut fits = false;
        for v in victims {
            release_on(&mut trial, v);
            chosen.push(v);
            if fit(&trial, request, config.policy).is_ok() {
                fits = true;
                break;
            }
        }
        if !fits {
            continue;
        }
        // Put back every victim that turns out not to be needed.
        let mut i = 0;
        while i < chosen.len() {
            let mut without = node.clone();
            for (j, v) in chosen.iter().enumerate() {
                if j != i {
                    release_on(&mut without, v);
                }
            }
            if fit(&without, request, config.policy).is_ok() {
                chosen.remove(i);
            } else {
                i += 1;
            }
        }
        let mut freed = node.clone();
        for v in &chosen {
            release_on(&mut freed, v);
        }
        let Ok(gpus) = fit(&freed, request, config.policy) else {
            continue;
        };
        let key = (
            chosen.len(),
            chosen
                .iter()
                .map(|p| i64::from(p.request.priority))
                .sum::<i64>(),
            node.name.clone(),
        );
        if best.as_ref().is_none_or(|b| key < b.key) {
            best = Some(Room {
                key,
                victims: chosen.iter().map(|p| p.request.id.clone()).collect(),
                gpus,
            });
        }
    }
    best.map(|b| (b.key.2, b.victims, b.gpus))
}

/// Sorts requests into queue order.
pub fn sort_queue(queue: &mut [&Request], order: QueueOrder) {
    match order {
        QueueOrder::Priority => queue.sort_by(|a, b| {
            (Reverse(a.priority), a.arrival, &a.id).cmp(&(Reverse(b.priority), b.arrival, &b.id))
        }),
        QueueOrder::Fifo => queue.sort_by(|a, b| (a.arrival, &a.id).cmp(&(b.arrival, &b.id))),
        QueueOrder::SmallestFirst => queue.sort_by_key(|r| {
            let g = &r.resources;
            (
                u64::from(g.gpus) * u64::from(g.gpu_milli),
                u64::from(g.gpus) * g.gpu_memory_mib,
                g.cpu_milli,
                g.memory_mib,
                r.arrival,
                r.id.clone(),
            )
        }),
    }
}

impl Cluster {
    /// Accounts `bind` of `request` (no checks: `schedule` made it fit).
    pub fn apply(&mut self, request: &Request, bind: &Bind) {
        if let Some(node) = self.nodes.get_mut(&bind.node) {
            node.used_cpu_milli += u64::from(request.resources.cpu_milli);
            node.used_memory_mib += request.resources.memory_mib;
            for g in &bind.gpus {
                if let Some(u) = node.gpu_mut(g.index) {
                    u.milli += g.milli;
                    u.memory_mib += g.memory_mib;
                }
            }
            self.placed.insert(
                request.id.clone(),
                Placed {
                    request: request.clone(),
                    bind: bind.clone(),
                },
            );
        }
    }

    /// Releases what replica `id` holds; returns it if it was placed.
    pub fn release(&mut self, id: &str) -> Option<Placed> {
        let placed = self.placed.remove(id)?;
        if let Some(node) = self.nodes.get_mut(&placed.bind.node) {
            release_on(node, &placed);
        }
        Some(placed)
    }
}

/// How many feasible nodes are scored per decision: all of them up to 100,
/// then 5 % of the cluster (as kube-scheduler's percentageOfNodesToScore),
/// so a decision costs about the same on 5,000 nodes as on 2,000. The
/// default policy stops at 100 (kube-scheduler's floor): its fragmentation
/// measure costs about twice the rest of a node's check, and scoring more
/// nodes did not place more in `berth sim` (every node of 1,500: the same
/// GPU allocation within 0.1 %).
fn score_limit(nodes: usize, policy: Policy) -> usize {
    match policy {
        Policy::FirstFit => 1,
        Policy::Default => DEFAULT_POLICY_SCORED,
        _ => (nodes / 20).max(100),
    }
}

/// Feasible nodes the default policy scores per decision.
const DEFAULT_POLICY_SCORED: usize = 100;

/// Scans nodes from `cluster.scan_from` (where the last decision stopped,
/// wrapping around), scoring at most `score_limit` feasible ones. Returns
/// the decision and where the next scan starts.
fn place(
    cluster: &Cluster,
    request: &Request,
    config: &Config,
    mut memo: Option<&mut Memo<'_>>,
) -> (Result<Bind, Explanation>, Option<String>) {
    let limit = score_limit(cluster.nodes.len(), config.policy);
    let start = match (&cluster.scan_from, config.policy) {
        (Some(from), p) if p != Policy::FirstFit => from.as_str(),
        _ => "",
    };
    let order = cluster
        .nodes
        .range::<str, _>((std::ops::Bound::Included(start), std::ops::Bound::Unbounded))
        .chain(
            cluster
                .nodes
                .range::<str, _>((std::ops::Bound::Unbounded, std::ops::Bound::Excluded(start))),
        );
    // Built on the first node the memo does not answer.
    let targets = std::cell::OnceCell::new();
    let mut why = Explanation::default();
    let answer = |node: &Node| -> Answer {
        let gpus = fit(node, request, config.policy)?;
        let (growth, gpus) = if config.policy == Policy::Default {
            targets
                .get_or_init(|| fragmentation::Targets::new(&cluster.workload, request))
                .place_on(node, request, gpus)
        } else {
            (0, gpus)
        };
        Ok((score(node, request, &gpus, growth, config).keys, gpus))
    };
    let mut best: Option<(Score<'_>, Vec<GpuShare>)> = None;
    let mut feasible = 0usize;
    let mut next = None;
    // `order` visits nodes in name order from `start`, wrapping: the k-th
    // is at position first + k in the memo.
    let first = memo.as_deref().map_or(0, |m| m.position(start));
    let count = cluster.nodes.len().max(1);
    for (k, (name, node)) in order.enumerate() {
        if feasible >= limit {
            next = Some(name.clone());
            break;
        }
        let slot = (first + k) % count;
        let computed;
        let known = match memo
            .as_deref_mut()
            .filter(|m| m.names.get(slot) == Some(name))
        {
            Some(m) => m.answer(slot, || answer(node)),
            None => {
                computed = answer(node);
                Some(&computed)
            }
        };
        match known {
            Some(Ok((keys, gpus))) => {
                feasible += 1;
                let score = Score {
                    keys: *keys,
                    node: &node.name,
                };
                if best.as_ref().is_none_or(|(b, _)| score < *b) {
                    best = Some((score, gpus.clone()));
                }
            }
            Some(Err(e)) => match why.excluded.get_mut(e) {
                Some(n) => *n += 1,
                None => {
                    why.excluded.insert(e.clone(), 1);
                }
            },
            None => {}
        }
    }
    let decision = match best {
        Some((score, gpus)) => Ok(Bind {
            replica: request.id.clone(),
            node: score.node.to_string(),
            gpus,
        }),
        None => Err(why),
    };
    (decision, next)
}

/// The filters, in order; on success, the GPUs this node would give.
fn fit(node: &Node, request: &Request, policy: Policy) -> Result<Vec<GpuShare>, Exclusion> {
    if !node.schedulable {
        return Err(Exclusion::NotReady(node.state.clone()));
    }
    for (k, v) in &request.selector {
        if node.labels.get(k) != Some(v) {
            return Err(Exclusion::Selector(format!("{k}={v}")));
        }
    }
    let r = &request.resources;
    if r.gpus > 0
        && let Some(m) = &request.gpu_model
        && !node.gpus.iter().any(|g| gpu_model_matches(&g.model, m))
    {
        return Err(Exclusion::GpuModel(m.clone()));
    }
    if node.used_cpu_milli + u64::from(r.cpu_milli) > node.cpu_milli {
        return Err(Exclusion::Cpu);
    }
    if node.used_memory_mib + r.memory_mib > node.memory_mib {
        return Err(Exclusion::Memory);
    }
    if r.gpus == 0 {
        return Ok(Vec::new());
    }
    if node.gpus.len() < r.gpus as usize {
        return Err(Exclusion::GpuCount);
    }
    let model_ok = |g: &&Gpu| {
        request
            .gpu_model
            .as_ref()
            .is_none_or(|m| gpu_model_matches(&g.model, m))
    };
    let need_mem = |g: &Gpu| {
        if r.gpu_memory_mib == 0 {
            g.memory_mib
        } else {
            r.gpu_memory_mib
        }
    };
    if node.gpus.iter().filter(model_ok).count() < r.gpus as usize {
        return Err(Exclusion::GpuCount);
    }
    if node
        .gpus
        .iter()
        .filter(model_ok)
        .all(|g| need_mem(g) > g.memory_mib)
    {
        return Err(Exclusion::GpuMemory);
    }
    let shares = |g: &Gpu| GpuShare {
        index: g.index,
        milli: r.gpu_milli,
        memory_mib: need_mem(g),
    };
    if r.gpus == 1 {
        let mut fits = node.gpus.iter().filter(model_ok).filter(|g| {
            let u = g.used;
            u.milli + r.gpu_milli <= WHOLE_GPU_MILLI && u.memory_mib + need_mem(g) <= g.memory_mib
        });
        // Which GPU on this node: spread takes the emptiest, first-fit the
        // first, the others the fullest that fits (best fit keeps whole
        // GPUs free).
        let chosen = match policy {
            Policy::Spread => fits.min_by_key(|g| {
                let u = g.used;
                (u.milli, u.memory_mib, g.index)
            }),
            Policy::FirstFit => fits.next(),
            Policy::Default | Policy::Binpack | Policy::BestFit => fits.min_by_key(|g| {
                let u = g.used;
                (
                    WHOLE_GPU_MILLI - u.milli - r.gpu_milli,
                    g.memory_mib - u.memory_mib - need_mem(g),
                    g.index,
                )
            }),
        };
        return chosen.map(|g| vec![shares(g)]).ok_or(Exclusion::GpuFree);
    }
    // Several GPUs: whole free GPUs, all on this node, preferring one
    // locality group (the smallest group that holds them all).
    let free: Vec<&Gpu> = node
        .gpus
        .iter()
        .filter(model_ok)
        .filter(|g| g.used.is_free() && need_mem(g) <= g.memory_mib)
        .collect();
    if free.len() < r.gpus as usize {
        return Err(Exclusion::GpuFree);
    }
    let mut groups: BTreeMap<Option<u32>, Vec<&Gpu>> = BTreeMap::new();
    for g in &free {
        groups.entry(g.locality).or_default().push(g);
    }
    let n = r.gpus as usize;
    let chosen: Vec<&Gpu> = match groups
        .iter()
        .filter(|(k, v)| k.is_some() && v.len() >= n)
        .min_by_key(|(k, v)| (v.len(), **k))
    {
        Some((_, group)) => group.iter().take(n).copied().collect(),
        None => free.iter().take(n).copied().collect(),
    };
    Ok(chosen.into_iter().map(shares).collect())
}

/// Utilization of each dimension after the bind, in thousandths, weighted.
fn weighted_use(node: &Node, request: &Request, gpus: &[GpuShare], w: &Weights) -> i64 {
    let r = &request.resources;
    let per_mille = |used: u64, total: u64| (used * 1000).checked_div(total).unwrap_or(0) as i64;
    let gpu_total = node.gpus.len() as u64 * u64::from(WHOLE_GPU_MILLI);
    let gpu_used: u64 = node
        .gpus
        .iter()
        .map(|g| u64::from(g.used.milli))
        .sum::<u64>()
        + gpus.iter().map(|g| u64::from(g.milli)).sum::<u64>();
    let mem_total: u64 = node.gpus.iter().map(|g| g.memory_mib).sum();
    let mem_used: u64 = node.gpus.iter().map(|g| g.used.memory_mib).sum::<u64>()
        + gpus.iter().map(|g| g.memory_mib).sum::<u64>();
    i64::from(w.gpu) * per_mille(gpu_used, gpu_total)
        + i64::from(w.gpu_memory) * per_mille(mem_used, mem_total)
        + i64::from(w.cpu) * per_mille(node.used_cpu_milli + u64::from(r.cpu_milli), node.cpu_milli)
        + i64::from(w.memory) * per_mille(node.used_memory_mib + r.memory_mib, node.memory_mib)
}

/// Ranks `node` for `request` bound to `gpus`; `growth` is the growth of
/// the node's expected fragmentation (the default policy's first key).
fn score<'a>(
    node: &'a Node,
    request: &Request,
    gpus: &[GpuShare],
    growth: i64,
    config: &Config,
) -> Score<'a> {
    let packed = weighted_use(node, request, gpus, &config.weights);
    let keys = match config.policy {
        Policy::Binpack => [-packed, 0, 0],
        Policy::Spread => [packed, 0, 0],
        Policy::FirstFit => [0, 0, 0],
        Policy::BestFit => {
            let gpu_free: u64 = node
                .gpus
                .iter()
                .map(|g| u64::from(WHOLE_GPU_MILLI - g.used.milli))
                .sum::<u64>()
                - gpus.iter().map(|g| u64::from(g.milli)).sum::<u64>();
            let cpu_free =
                node.cpu_milli - node.used_cpu_milli - u64::from(request.resources.cpu_milli);
            [gpu_free as i64, cpu_free as i64, 0]
        }
        Policy::Default => {
            // 1. the least growth of expected fragmentation (see
            //    `fragmentation`); among equals 2. keep GPU nodes for GPU
            //    work (a CPU-only replica prefers a node without GPUs) and
            //    do not open an empty node when a used one fits; then 3. pack.
            let wrong_class = i64::from(request.resources.gpus == 0 && !node.gpus.is_empty());
            let opens_node = i64::from(node.is_empty());
            [growth, wrong_class * 2 + opens_node, -packed]
        }
    };
    Score {
        keys,
        node: &node.name,
    }
}
