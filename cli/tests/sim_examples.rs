//! The example traces under `examples/` give stable figures (everything but
//! the wall-clock timings), for every policy in both modes. Refresh with
//! `UPDATE_EXPECT=1` when a scheduling change is meant to move them.

use std::path::PathBuf;

use berth_cli::sim::{replay, trace};
use berth_control_plane::scheduler::{Config, Policy};

#[test]
fn example_traces_give_stable_figures() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("examples");
    let mut out = String::new();
    for example in ["small", "mixed-4gpu"] {
        let dir = root.join(example);
        let (nodes, tasks) = trace::load(&dir.join("cluster.csv"), &dir.join("workload.csv"))
            .expect("example parses");
        for no_departures in [false, true] {
            for policy in Policy::ALL {
                let options = replay::Options {
                    config: Config {
                        policy,
                        ..Config::default()
                    },
                    no_departures,
                };
                let r = replay::replay(nodes.clone(), &tasks, options, |_, _| {});
                out.push_str(&format!(
                    "{example} {} {policy:?}: placed {} never {} preempted {} alloc mean {:.4} peak {:.4} final {:.4} wait p50 {:.1}s p99 {:.1}s\n",
                    if no_departures { "fill" } else { "replay" },
                    r.placed,
                    r.never_placed,
                    r.preemptions,
                    r.gpu_alloc_ratio_mean,
                    r.gpu_alloc_ratio_peak,
                    r.gpu_alloc_ratio_final,
                    r.queue_wait_p50_s,
                    r.queue_wait_p99_s,
                ));
            }
        }
    }
    expect_test::expect_file!["sim_examples.expected"].assert_eq(&out);
}
