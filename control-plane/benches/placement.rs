//! `cargo bench -p berth-control-plane --bench placement`: the wall time of
//! one placement decision on a 5,000-node × 8-GPU cluster at 50 %
//! occupancy, for each policy (the default one with a full target
//! workload); then a deployment-sized batch: 10,000 replicas of one shape
//! on 1,000 empty nodes, through `schedule` (which remembers each node's
//! answer for a run of same-shaped requests) and one `place_one` at a time.
//! Prints figures; asserts nothing.

use std::time::Instant;

use berth_common::{Labels, Resources};
use berth_control_plane::scheduler::{
    Cluster, Config, Gpu, GpuShare, MAX_TARGET_SHAPES, Node, Policy, Request, Workload, place_one,
    schedule,
};

const NODES: usize = 5_000;
const GPUS: u32 = 8;
const DECISIONS: usize = 4_000;

fn request(id: String, gpus: u32, milli: u32, gpu_mem: u64, cpu: u32) -> Request {
    Request {
        id,
        resources: Resources {
            cpu_milli: cpu,
            memory_mib: 16 * 1024,
            gpus,
            gpu_memory_mib: gpu_mem,
            gpu_milli: milli,
        },
        selector: Labels::new(),
        gpu_model: None,
        priority: 0,
        arrival: 0,
    }
}

/// `n` empty nodes of 8 H100s, 128 cores and 1 TiB each.
fn empty_cluster(n: usize) -> Cluster {
    let mut cluster = Cluster::default();
    for i in 0..n {
        let name = format!("node-{i:05}");
        cluster.nodes.insert(
            name.clone(),
            Node {
                name,
                schedulable: true,
                state: "ready".into(),
                labels: Labels::new(),
                cpu_milli: 128_000,
                memory_mib: 1024 * 1024,
                gpus: (0..GPUS)
                    .map(|index| Gpu {
                        index,
                        model: "H100-80GB".into(),
                        memory_mib: 81_920,
                        locality: Some(index / 2),
                        used: Default::default(),
                    })
                    .collect(),
                used_cpu_milli: 0,
                used_memory_mib: 0,
            },
        );
    }
    cluster
}

/// Half of every node's GPUs, CPU and memory are taken: three whole GPUs
/// and two half GPUs of eight, half the CPU.
fn half_full_cluster() -> Cluster {
    let mut cluster = empty_cluster(NODES);
    for n in 0..NODES {
        let name = format!("node-{n:05}");
        // Rotate which GPUs are busy so nodes differ.
        let base = (n % 4) as u32 * 2;
        let whole: Vec<GpuShare> = (0..3)
            .map(|k| GpuShare {
                index: (base + k) % GPUS,
                milli: 1000,
                memory_mib: 81_920,
            })
            .collect();
        let r = request(format!("fill-{n}-a"), 3, 1000, 0, 48_000);
        cluster.apply(
            &r,
            &berth_control_plane::scheduler::Bind {
                replica: r.id.clone(),
                node: name.clone(),
                gpus: whole,
            },
        );
        for k in 3..5 {
            let r = request(format!("fill-{n}-{k}"), 1, 500, 40_960, 8_000);
            cluster.apply(
                &r,
                &berth_control_plane::scheduler::Bind {
                    replica: r.id.clone(),
                    node: name.clone(),
                    gpus: vec![GpuShare {
                        index: (base + k) % GPUS,
                        milli: 500,
                        memory_mib: 40_960,
                    }],
                },
            );
        }
    }
    cluster
}

/// A target workload with more GPU shapes than the default policy keeps,
/// so its fragmentation measure runs at its full cost.
fn workload() -> Workload {
    let mut w = Workload::default();
    for (i, milli) in [50u32, 110, 160, 220, 320, 460, 470, 650, 810]
        .iter()
        .enumerate()
    {
        for gib in [4u64, 12] {
            let r = request(String::new(), 1, *milli, gib * 1024, 4_000);
            w.observe(&r.resources, 10 + i as u64);
        }
    }
    for (gpus, n) in [(1u32, 200u64), (2, 5), (4, 10), (8, 5)] {
        w.observe(
            &request(String::new(), gpus, 1000, 0, 12_000 * gpus).resources,
            n,
        );
    }
    w
}

fn main() {
    let mut cluster = half_full_cluster();
    cluster.workload = workload();
    assert_eq!(cluster.workload.typical().len(), MAX_TARGET_SHAPES - 1);
    println!(
        "placement decision, {NODES} nodes × {GPUS} GPUs, 50 % allocated, {DECISIONS} decisions per policy"
    );
    for policy in Policy::ALL {
        let config = Config {
            policy,
            ..Config::default()
        };
        let mut times = Vec::with_capacity(DECISIONS);
        for i in 0..DECISIONS {
            let r = match i % 5 {
                0 => request(format!("b{i}"), 1, 250, 10_240, 2_000),
                1 => request(format!("b{i}"), 1, 1000, 0, 8_000),
                2 => request(format!("b{i}"), 2, 1000, 0, 16_000),
                3 => request(format!("b{i}"), 0, 0, 0, 4_000),
                _ => request(format!("b{i}"), 1, 500, 20_480, 4_000),
            };
            let t = Instant::now();
            let placed = place_one(&mut cluster, &r, &config);
            times.push(t.elapsed().as_secs_f64() * 1e6);
            if placed.is_ok() {
                // Keep the cluster at 50 %: undo, untimed.
                cluster.release(&r.id);
            }
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{policy:?}: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
            times[times.len() / 2],
            times[times.len() * 99 / 100],
            times[times.len() - 1]
        );
    }
    batch();
}

/// A deployment-sized batch, per policy: µs per replica through `schedule`
/// and through one `place_one` per replica.
fn batch() {
    const BATCH_NODES: usize = 1_000;
    const REPLICAS: usize = 10_000;
    println!(
        "batch of {REPLICAS} replicas of one shape (1 GPU at 250 milli, 10 GiB), {BATCH_NODES} empty nodes × {GPUS} GPUs"
    );
    let requests: Vec<Request> = (0..REPLICAS)
        .map(|i| request(format!("d-{i}"), 1, 250, 10_240, 1_000))
        .collect();
    for policy in Policy::ALL {
        let config = Config {
            policy,
            ..Config::default()
        };
        let cluster = empty_cluster(BATCH_NODES);
        let t = Instant::now();
        let plan = schedule(&cluster, &requests, &config);
        let batched = t.elapsed().as_secs_f64() * 1e6 / REPLICAS as f64;
        let mut single = cluster.clone();
        single
            .workload
            .extend(requests.iter().map(|r| (&r.resources, 1)));
        let t = Instant::now();
        let placed = requests
            .iter()
            .filter(|r| place_one(&mut single, r, &config).is_ok())
            .count();
        let one_by_one = t.elapsed().as_secs_f64() * 1e6 / REPLICAS as f64;
        println!(
            "{policy:?}: schedule {batched:.2} µs per replica ({} placed), place_one {one_by_one:.2} µs per replica ({placed} placed)",
            plan.binds.len()
        );
    }
}
