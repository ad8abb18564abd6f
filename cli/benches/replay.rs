//! `cargo bench -p berth-cli --bench replay`: a full `berth sim` replay of a
//! generated 1,500-node (about 6,200 GPUs), 8,000-task trace, in both
//! modes, for every policy. Prints figures; asserts nothing.

use berth_cli::sim::{generate, replay, trace};
use berth_control_plane::scheduler::{Config, Policy};

fn main() {
    let (cluster, workload) = generate::generate(1_500, 8, 8_000, 1);
    let nodes = trace::parse_cluster("generated", &cluster).expect("generated cluster parses");
    let tasks = trace::parse_workload("generated", &workload).expect("generated workload parses");
    let gpus: usize = nodes.iter().map(|n| n.gpus.len()).sum();
    println!(
        "replay of {} nodes, {gpus} GPUs, {} tasks",
        nodes.len(),
        tasks.len()
    );
    for no_departures in [true, false] {
        for policy in Policy::ALL {
            let options = replay::Options {
                config: Config {
                    policy,
                    ..Config::default()
                },
                no_departures,
            };
            let r = replay::replay(nodes.clone(), &tasks, options, |_, _| {});
            println!(
                "{:6} {policy:?}: placed {} never {} alloc final {:.4} mean {:.4} wait p99 {:.0}s decision p50 {:.1}µs p99 {:.1}µs wall {:.2}s",
                if no_departures { "fill" } else { "replay" },
                r.placed,
                r.never_placed,
                r.gpu_alloc_ratio_final,
                r.gpu_alloc_ratio_mean,
                r.queue_wait_p99_s,
                r.decision_us_p50,
                r.decision_us_p99,
                r.wall_s
            );
        }
    }
}
