//! The fragmentation measure of the default policy, after FGD (Weng et al.,
//! "Beware of Fragmentation: Scheduling GPU-Sharing Workloads with
//! Fragmentation Gradient Descent", USENIX ATC '23).
//!
//! A node's fragmentation with respect to one request shape is the free GPU
//! compute (thousandths) on it that a request of that shape could not use:
//! all of it when the shape cannot run there at all (too few GPUs with room
//! for it, or too little CPU or memory left), else the free compute of the
//! GPUs too small for it, in compute or in memory. Weighted by how often
//! each shape occurs in the target `Workload` and summed, this is the node's
//! expected fragmentation; the default policy places each request where it
//! grows least, and picks the GPU on the node the same way.
//!
//! CPU-only shapes are left out of the target: for them every free GPU is a
//! fragment wherever a request goes, so they add the same amount to every
//! candidate and change no decision. The arithmetic is in integers, so the
//! measure is exact and the same on every machine.
//!
//! Cost: the GPUs of a node are first reduced to their distinct states
//! (free GPUs are all alike), then each target shape is checked once per
//! state and once per candidate state, so a node costs a few hundred
//! comparisons at most.

use std::collections::BTreeMap;

use berth_common::Resources;
use berth_common::resources::WHOLE_GPU_MILLI;
use serde::{Deserialize, Serialize};

use super::{Gpu, GpuShare, Node, Request, gpu_model_matches};

/// At most this many shapes make up the target: the most requested ones,
/// and one whole GPU (see `Targets::new`). The measure costs a few
/// operations per shape and GPU on every scored node.
pub const MAX_TARGET_SHAPES: usize = 16;

/// A whole GPU, counted once in every target: room for one is worth
/// something even before such a request was seen (a pseudo-count, soon
/// outweighed by what is seen).
const WHOLE_GPU: Shape = Shape {
    gpus: 1,
    gpu_milli: WHOLE_GPU_MILLI,
    gpu_memory_mib: 0,
    cpu_milli: 0,
    memory_mib: 0,
};

/// A GPU request shape, as the fragmentation measure sees it: the GPU part
/// of requests, with the least CPU and memory any of them asked for. A GPU
/// is lost to a shape only when no request of it could use the GPU, so
/// requests that differ only in CPU and memory are one shape (which also
/// lets a few shapes cover most of a workload).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Shape {
    /// GPUs on one node (at least 1).
    pub gpus: u32,
    /// Compute share per GPU, thousandths.
    pub gpu_milli: u32,
    /// Memory per GPU, MiB; 0 = all of a GPU's memory.
    pub gpu_memory_mib: u64,
    /// The least CPU, millicores.
    pub cpu_milli: u64,
    /// The least memory, MiB.
    pub memory_mib: u64,
}

impl Shape {
    /// The GPU part: what makes two requests one shape.
    fn gpu_part(&self) -> (u32, u32, u64) {
        (self.gpus, self.gpu_milli, self.gpu_memory_mib)
    }
}

/// The workload the default policy keeps room for: how often each GPU
/// request shape was seen. `schedule_in_place` counts each batch; `berth
/// sim` counts every task as it arrives; the control plane starts from the
/// placed replicas. Empty means "room for more of the request being
/// placed".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Per GPU part: the shape (least CPU and memory so far) and its count.
    seen: BTreeMap<(u32, u32, u64), (Shape, u64)>,
    /// The `MAX_TARGET_SHAPES - 1` most frequent shapes with their counts
    /// (ties by shape), recomputed on every change so a decision only
    /// reads it.
    typical: Vec<(Shape, u64)>,
}

impl Workload {
    /// Counts `n` requests of `resources`; CPU-only ones are not counted
    /// (see the module comment).
    pub fn observe(&mut self, resources: &Resources, n: u64) {
        self.extend(std::iter::once((resources, n)));
    }

    /// Counts each `(resources, n)`: `observe` for many, sorting once.
    pub fn extend<'a>(&mut self, requests: impl IntoIterator<Item = (&'a Resources, u64)>) {
        for (r, n) in requests {
            if r.gpus == 0 || n == 0 {
                continue;
            }
            let shape = Shape {
                gpus: r.gpus,
                gpu_milli: r.gpu_milli,
                gpu_memory_mib: r.gpu_memory_mib,
                cpu_milli: u64::from(r.cpu_milli),
                memory_mib: r.memory_mib,
            };
            let (least, count) = self.seen.entry(shape.gpu_part()).or_insert((shape, 0));
            least.cpu_milli = least.cpu_milli.min(shape.cpu_milli);
            least.memory_mib = least.memory_mib.min(shape.memory_mib);
            *count += n;
        }
        let mut all: Vec<(Shape, u64)> = self.seen.values().copied().collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(MAX_TARGET_SHAPES - 1);
        self.typical = all;
    }

    /// Whether nothing was observed.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// The most frequent shapes with their counts.
    pub fn typical(&self) -> &[(Shape, u64)] {
        &self.typical
    }
}

/// Narrows a size or count to the `u32` lanes of the inner loops. Capped,
/// never wrapped; nothing a node or request may hold comes near the cap
/// (GPU memory at most 256 GiB, node memory at most 16 TiB in MiB, CPU at
/// most 1024 cores in millicores).
fn lane(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// One GPU's room, as the measure needs it: free compute, free memory, and
/// whether no memory at all is used (what a whole-memory request needs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct GpuState {
    free_milli: u32,
    free_mib: u32,
    untouched: bool,
}

impl GpuState {
    fn of(g: &Gpu) -> Self {
        GpuState {
            free_milli: WHOLE_GPU_MILLI.saturating_sub(g.used.milli),
            free_mib: lane(g.memory_mib.saturating_sub(g.used.memory_mib)),
            untouched: g.used.memory_mib == 0,
        }
    }

    /// The state after a request takes `milli` and `mib` of it.
    fn minus(&self, milli: u32, mib: u32) -> Self {
        GpuState {
            free_milli: self.free_milli.saturating_sub(milli),
            free_mib: self.free_mib.saturating_sub(mib),
            untouched: self.untouched && mib == 0,
        }
    }
}

/// One value per target shape: the inner loops run over all
/// `MAX_TARGET_SHAPES` slots (unused ones never fit and weigh 0), so they
/// have a fixed length the compiler unrolls and vectorizes.
type Lanes = [u32; MAX_TARGET_SHAPES];

/// The target of one decision as lanes.
pub(super) struct Targets {
    milli: Lanes,
    /// Memory per GPU of a partial-memory shape (0 for a whole-memory one).
    mib: Lanes,
    /// `u32::MAX` for a whole-memory shape (it needs an untouched GPU), 0
    /// otherwise; compared with `GpuState::untouched` as 0 or `u32::MAX`.
    whole: Lanes,
    gpus: Lanes,
    cpu: Lanes,
    memory: Lanes,
    weights: [i64; MAX_TARGET_SHAPES],
}

/// A node before the bind, per target: GPUs with room for it, free compute
/// on the others, and the fragmentation.
struct Before {
    free_milli: u32,
    cpu_left: u32,
    memory_left: u32,
    roomy: Lanes,
    stranded: Lanes,
    amounts: Lanes,
}

impl Targets {
    /// The target for placing `request`: the workload's typical shapes (the
    /// request's own shape when the workload is empty), and one whole GPU.
    pub(super) fn new(workload: &Workload, request: &Request) -> Self {
        let mut t = Targets {
            milli: [u32::MAX; MAX_TARGET_SHAPES],
            mib: [0; MAX_TARGET_SHAPES],
            whole: [0; MAX_TARGET_SHAPES],
            gpus: [0; MAX_TARGET_SHAPES],
            cpu: [0; MAX_TARGET_SHAPES],
            memory: [0; MAX_TARGET_SHAPES],
            weights: [0; MAX_TARGET_SHAPES],
        };
        let mut own = Workload::default();
        let seen = if workload.is_empty() {
            own.observe(&request.resources, 1);
            own.typical()
        } else {
            workload.typical()
        };
        let prior = (!seen
            .iter()
            .any(|(s, _)| s.gpu_part() == WHOLE_GPU.gpu_part()))
        .then_some((WHOLE_GPU, 1));
        let shapes = seen.iter().take(MAX_TARGET_SHAPES - 1).chain(prior.iter());
        for (i, (shape, count)) in shapes.enumerate() {
            t.milli[i] = shape.gpu_milli;
            if shape.gpu_memory_mib == 0 {
                t.whole[i] = u32::MAX;
            } else {
                t.mib[i] = lane(shape.gpu_memory_mib);
            }
            t.gpus[i] = shape.gpus;
            t.cpu[i] = lane(shape.cpu_milli);
            t.memory[i] = lane(shape.memory_mib);
            t.weights[i] = i64::try_from(*count).unwrap_or(i64::MAX);
        }
        t
    }

    /// Per target, all ones when one GPU of it fits a GPU in state `g`,
    /// else 0 (masks, so the loops below need no multiplication).
    // The lanes of several arrays are read in step: an index loop of fixed
    // length is what the compiler vectorizes.
    #[allow(clippy::needless_range_loop)]
    fn fits(&self, g: &GpuState) -> Lanes {
        let untouched = if g.untouched { u32::MAX } else { 0 };
        let mut out = [0u32; MAX_TARGET_SHAPES];
        for i in 0..MAX_TARGET_SHAPES {
            let fits = (self.milli[i] <= g.free_milli)
                & (self.mib[i] <= g.free_mib)
                & (self.whole[i] <= untouched);
            out[i] = if fits { u32::MAX } else { 0 };
        }
        out
    }

    /// Per target, the fragmentation of a node with these tallies, `free`
    /// compute and CPU and memory left.
    fn amounts(
        &self,
        roomy: &Lanes,
        stranded: &Lanes,
        free: u32,
        cpu_left: u32,
        memory_left: u32,
    ) -> Lanes {
        let mut out = [0u32; MAX_TARGET_SHAPES];
        for i in 0..MAX_TARGET_SHAPES {
            let runs = (roomy[i] >= self.gpus[i])
                & (cpu_left >= self.cpu[i])
                & (memory_left >= self.memory[i]);
            out[i] = if runs { stranded[i] } else { free };
        }
        out
    }

    fn before(&self, node: &Node) -> Before {
        let mut roomy = [0u32; MAX_TARGET_SHAPES];
        let mut stranded = [0u32; MAX_TARGET_SHAPES];
        let mut free_milli = 0u32;
        let mut add = |state: &GpuState, count: u32| {
            free_milli += count * state.free_milli;
            let fits = self.fits(state);
            let free = count * state.free_milli;
            for i in 0..MAX_TARGET_SHAPES {
                roomy[i] += fits[i] & count;
                stranded[i] += !fits[i] & free;
            }
        };
        // GPUs in a row are often alike (all free, or all full): each run of
        // equal states is checked once. A full GPU has nothing to lose and
        // fits no shape (every shape asks for some compute): skipped.
        let mut run: Option<(GpuState, u32)> = None;
        for g in &node.gpus {
            let state = GpuState::of(g);
            if state.free_milli == 0 {
                continue;
            }
            match &mut run {
                Some((s, count)) if *s == state => *count += 1,
                _ => {
                    if let Some((s, count)) = run {
                        add(&s, count);
                    }
                    run = Some((state, 1));
                }
            }
        }
        if let Some((s, count)) = run {
            add(&s, count);
        }
        let cpu_left = lane(node.cpu_milli.saturating_sub(node.used_cpu_milli));
        let memory_left = lane(node.memory_mib.saturating_sub(node.used_memory_mib));
        Before {
            amounts: self.amounts(&roomy, &stranded, free_milli, cpu_left, memory_left),
            free_milli,
            cpu_left,
            memory_left,
            roomy,
            stranded,
        }
    }

    /// Weighted growth of the node's fragmentation when the request takes
    /// `cpu` and `memory`, and `milli` and `mib` of each GPU in `changed`
    /// (their states before the bind).
    fn delta(
        &self,
        before: &Before,
        cpu: u32,
        memory: u32,
        changed: &[GpuState],
        milli: u32,
        mib: u32,
    ) -> i64 {
        let mut roomy = before.roomy;
        let mut stranded = before.stranded;
        let mut taken = 0u32;
        for g in changed {
            let after = g.minus(milli, mib);
            taken += g.free_milli - after.free_milli;
            let (b, a) = (self.fits(g), self.fits(&after));
            for i in 0..MAX_TARGET_SHAPES {
                // Each changed GPU was counted in `before`: it is taken out
                // and put back in its new state (masks count as -1, as in
                // `before`), so the totals never go below zero.
                roomy[i] = roomy[i].wrapping_add(b[i]).wrapping_sub(a[i]);
                stranded[i] = (stranded[i] + (!a[i] & after.free_milli)) - (!b[i] & g.free_milli);
            }
        }
        let after = self.amounts(
            &roomy,
            &stranded,
            before.free_milli - taken,
            before.cpu_left.saturating_sub(cpu),
            before.memory_left.saturating_sub(memory),
        );
        self.weights
            .iter()
            .zip(after.iter().zip(before.amounts.iter()))
            .map(|(w, (a, b))| w * (i64::from(*a) - i64::from(*b)))
            .sum()
    }

    /// Where on `node` the request's GPUs go, and how much the node's
    /// expected fragmentation grows. A single-GPU request tries each
    /// distinct state of the GPUs with room for it (least growth, then the
    /// least compute left on the GPU, then the lowest index); a multi-GPU
    /// request keeps `chosen` (whole free GPUs, alike to the measure).
    pub(super) fn place_on(
        &self,
        node: &Node,
        request: &Request,
        mut chosen: Vec<GpuShare>,
    ) -> (i64, Vec<GpuShare>) {
        let r = &request.resources;
        let (cpu, memory) = (r.cpu_milli, lane(r.memory_mib));
        let before = self.before(node);
        if r.gpus != 1 || chosen.len() != 1 {
            let changed: Vec<GpuState> = chosen
                .iter()
                .filter_map(|s| node.gpus.iter().find(|g| g.index == s.index))
                .map(GpuState::of)
                .collect();
            // Whole GPUs: each is left with nothing free.
            let delta = self.delta(&before, cpu, memory, &changed, r.gpu_milli, u32::MAX);
            return (delta, chosen);
        }
        // (growth, compute left, index, memory taken, state) of the best GPU.
        let mut best: Option<(i64, u32, u32, u64, GpuState)> = None;
        let mut tried = [GpuState::default(); 8];
        let mut n_tried = 0usize;
        for g in &node.gpus {
            let s = GpuState::of(g);
            let mib = if r.gpu_memory_mib == 0 {
                g.memory_mib
            } else {
                r.gpu_memory_mib
            };
            let room = if r.gpu_memory_mib == 0 {
                s.untouched
            } else {
                g.used.memory_mib + mib <= g.memory_mib
            };
            if s.free_milli < r.gpu_milli
                || !room
                || request
                    .gpu_model
                    .as_ref()
                    .is_some_and(|m| !gpu_model_matches(&g.model, m))
            {
                continue;
            }
            // GPUs in the same state give the same growth: the first (by
            // position, normally the lowest index) stands for them.
            if tried[..n_tried].contains(&s) {
                continue;
            }
            if n_tried < tried.len() {
                tried[n_tried] = s;
                n_tried += 1;
            }
            let delta = self.delta(
                &before,
                cpu,
                memory,
                std::slice::from_ref(&s),
                r.gpu_milli,
                lane(mib),
            );
            let key = (delta, s.free_milli - r.gpu_milli, g.index);
            if best.is_none_or(|b| key < (b.0, b.1, b.2)) {
                best = Some((key.0, key.1, key.2, mib, s));
            }
        }
        match best {
            Some((delta, _, index, memory_mib, _)) => {
                chosen[0] = GpuShare {
                    index,
                    milli: r.gpu_milli,
                    memory_mib,
                };
                (delta, chosen)
            }
            // `fit` found room, so some GPU has it; keep its choice anyway.
            None => (0, chosen),
        }
    }
}

/// A node's expected fragmentation with respect to `workload`: the sum
/// over its typical shapes of count × the free GPU compute (thousandths)
/// that a request of that shape could not use. For tests and explanations.
pub fn node_fragmentation(node: &Node, workload: &Workload) -> u64 {
    let probe = Request {
        id: String::new(),
        resources: Resources::default(),
        selector: Default::default(),
        gpu_model: None,
        priority: 0,
        arrival: 0,
    };
    let targets = Targets::new(workload, &probe);
    let before = targets.before(node);
    (0..MAX_TARGET_SHAPES)
        .map(|i| targets.weights[i].unsigned_abs() * u64::from(before.amounts[i]))
        .sum()
}

#[cfg(test)]
mod tests {
    use berth_common::Labels;
    use proptest::prelude::*;

    use super::super::{Bind, Cluster, Gpu, GpuUse, Policy, fit};
    use super::*;

    fn gpu(index: u32, milli: u32, used_gib: u64, gib: u64) -> Gpu {
        Gpu {
            index,
            model: "A100".into(),
            memory_mib: gib * 1024,
            locality: None,
            used: GpuUse {
                milli,
                memory_mib: used_gib * 1024,
            },
        }
    }

    fn node(gpus: Vec<Gpu>, cpu_left: u64) -> Node {
        Node {
            name: "n".into(),
            schedulable: true,
            state: "ready".into(),
            labels: Labels::new(),
            cpu_milli: 64_000,
            memory_mib: 256 * 1024,
            gpus,
            used_cpu_milli: 64_000 - cpu_left,
            used_memory_mib: 0,
        }
    }

    fn res(gpus: u32, milli: u32, gib: u64, cpu: u32) -> Resources {
        Resources {
            cpu_milli: cpu,
            memory_mib: 1024,
            gpus,
            gpu_memory_mib: gib * 1024,
            gpu_milli: if gpus > 1 { 1000 } else { milli },
        }
    }

    fn request(r: Resources) -> Request {
        Request {
            id: "r".into(),
            resources: r,
            selector: Labels::new(),
            gpu_model: None,
            priority: 0,
            arrival: 0,
        }
    }

    fn workload(shapes: &[(Resources, u64)]) -> Workload {
        let mut w = Workload::default();
        w.extend(shapes.iter().map(|(r, n)| (r, *n)));
        w
    }

    /// The whole-GPU pseudo-count is part of every target; these tests
    /// always see whole GPUs, so it adds nothing unexpected.
    fn whole(n: u64) -> (Resources, u64) {
        (res(1, 1000, 0, 1000), n)
    }

    #[test]
    fn free_compute_too_small_for_a_shape_is_fragmented() {
        // GPU 0 has 190 free, GPU 1 is free: a 470 share cannot use GPU 0's
        // 190 (fragment), a whole GPU cannot use it either.
        let n = node(vec![gpu(0, 810, 2, 80), gpu(1, 0, 0, 80)], 32_000);
        let w = workload(&[(res(1, 470, 4, 1000), 3), whole(1)]);
        assert_eq!(node_fragmentation(&n, &w), 3 * 190 + 190);
        // Filled up, nothing is lost; fully free, nothing is lost either.
        let full = node(vec![gpu(0, 1000, 2, 80), gpu(1, 0, 0, 80)], 32_000);
        assert_eq!(node_fragmentation(&full, &w), 0);
    }

    #[test]
    fn a_shape_that_cannot_run_loses_all_free_compute() {
        let w = workload(&[(res(1, 300, 4, 8_000), 1), whole(1)]);
        // Too little CPU left for the share: all 1,700 free are lost to
        // it; the whole GPU (1,000 CPU) still runs on GPU 1, so GPU 0's
        // 700 are lost to it.
        let n = node(vec![gpu(0, 300, 4, 80), gpu(1, 0, 0, 80)], 4_000);
        assert_eq!(node_fragmentation(&n, &w), 1_700 + 700);
        // Too few GPUs for a 2-GPU shape: all free compute is lost to it.
        let w = workload(&[(res(2, 1000, 0, 1000), 1), whole(1)]);
        let n = node(vec![gpu(0, 500, 4, 80), gpu(1, 0, 0, 80)], 32_000);
        assert_eq!(node_fragmentation(&n, &w), 1_500 + 500);
    }

    #[test]
    fn memory_bound_gpus_are_fragmented_too() {
        // 700 compute left on GPU 0, but only 2 GiB of memory: lost to an
        // 8 GiB share and to a whole GPU, usable by a 1 GiB one.
        let n = node(vec![gpu(0, 300, 22, 24)], 32_000);
        let w = workload(&[
            (res(1, 200, 8, 1000), 2),
            (res(1, 200, 1, 1000), 5),
            whole(1),
        ]);
        assert_eq!(node_fragmentation(&n, &w), 2 * 700 + 700);
    }

    #[test]
    fn shapes_differing_only_in_cpu_and_memory_are_one_with_the_least() {
        let mut w = Workload::default();
        w.observe(&res(1, 470, 4, 8_000), 2);
        w.observe(&res(1, 470, 4, 3_000), 1);
        w.observe(&res(1, 470, 8, 3_000), 1);
        w.observe(&res(0, 0, 0, 3_000), 9);
        let typical = w.typical();
        assert_eq!(typical.len(), 2, "{typical:?}");
        assert_eq!(typical[0].1, 3);
        assert_eq!(typical[0].0.cpu_milli, 3_000);
        assert_eq!(typical[1].0.gpu_memory_mib, 8 * 1024);
        // At most MAX_TARGET_SHAPES - 1 are kept, the most frequent, ties
        // by shape: the same on every run.
        for milli in 1..=40u32 {
            w.observe(&res(1, milli * 10, 1, 1000), u64::from(milli));
        }
        assert_eq!(w.typical().len(), MAX_TARGET_SHAPES - 1);
        assert_eq!(w.typical()[0].0.gpu_milli, 400);
    }

    #[test]
    fn a_share_goes_where_it_fits_exactly() {
        // GPU 0 has 190 free, GPU 1 has 470 free, GPU 2 is whole: a 470
        // share fills GPU 1 instead of breaking GPU 2 or leaving GPU 1's
        // 470 to waste.
        let n = node(
            vec![gpu(0, 810, 2, 80), gpu(1, 530, 2, 80), gpu(2, 0, 0, 80)],
            32_000,
        );
        let w = workload(&[
            (res(1, 470, 4, 1000), 5),
            (res(1, 190, 4, 1000), 1),
            whole(3),
        ]);
        let r = request(res(1, 470, 4, 1000));
        let chosen = fit(&n, &r, Policy::Default).unwrap();
        let (growth, gpus) = Targets::new(&w, &r).place_on(&n, &r, chosen);
        assert_eq!(gpus[0].index, 1);
        assert!(
            growth < 0,
            "filling a fragment shrinks fragmentation: {growth}"
        );
    }

    fn arb_gpu(index: u32) -> impl Strategy<Value = Gpu> {
        (
            prop::sample::select(vec![0u32, 0, 250, 470, 500, 810, 1000]),
            0u64..20,
            prop::sample::select(vec![16u64, 24, 80]),
        )
            .prop_map(move |(milli, used, gib)| {
                let used = if milli == 0 { 0 } else { used.min(gib) };
                gpu(index, milli, used, gib)
            })
    }

    fn arb_node() -> impl Strategy<Value = Node> {
        (0usize..9, 0u64..64_000)
            .prop_flat_map(|(n, cpu)| ((0..n as u32).map(arb_gpu).collect::<Vec<_>>(), Just(cpu)))
            .prop_map(|(gpus, cpu)| node(gpus, cpu))
    }

    fn arb_resources() -> impl Strategy<Value = Resources> {
        (
            prop::sample::select(vec![1u32, 1, 1, 2, 4]),
            prop::sample::select(vec![110u32, 250, 470, 810, 1000]),
            prop::sample::select(vec![0u64, 1, 4, 12, 20]),
            prop::sample::select(vec![1_000u32, 8_000, 30_000]),
        )
            .prop_map(|(gpus, milli, gib, cpu)| res(gpus, milli, gib, cpu))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The growth a placement reports is exactly the node's
        /// fragmentation after the bind minus before, and no other GPU
        /// with room for a single-GPU request would grow it less.
        #[test]
        fn growth_is_the_measure_after_minus_before(
            n in arb_node(),
            seen in prop::collection::vec((arb_resources(), 1u64..20), 1..20),
            r in arb_resources(),
        ) {
            let w = workload(&seen);
            let r = request(r);
            let Ok(chosen) = fit(&n, &r, Policy::Default) else {
                return Ok(());
            };
            let targets = Targets::new(&w, &r);
            let (growth, gpus) = targets.place_on(&n, &r, chosen);
            let after = |gpus: Vec<GpuShare>| {
                let mut c = Cluster::default();
                c.nodes.insert(n.name.clone(), n.clone());
                c.apply(&r, &Bind { replica: r.id.clone(), node: n.name.clone(), gpus });
                node_fragmentation(&c.nodes[&n.name], &w) as i64
            };
            let before = node_fragmentation(&n, &w) as i64;
            prop_assert_eq!(growth, after(gpus.clone()) - before);
            if r.resources.gpus == 1 {
                for g in &n.gpus {
                    let mib = if r.resources.gpu_memory_mib == 0 { g.memory_mib } else { r.resources.gpu_memory_mib };
                    if g.used.milli + r.resources.gpu_milli > 1000 || g.used.memory_mib + mib > g.memory_mib
                        || (r.resources.gpu_memory_mib == 0 && g.used.memory_mib > 0) {
                        continue;
                    }
                    let other = vec![GpuShare { index: g.index, milli: r.resources.gpu_milli, memory_mib: mib }];
                    prop_assert!(after(other) - before >= growth, "GPU {} grows it less", g.index);
                }
            }
        }
    }
}
