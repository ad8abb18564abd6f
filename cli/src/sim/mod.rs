//! `berth sim`: replay a cluster and workload trace through the real
//! scheduler, and `berth sim generate`: write a synthetic trace pair.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use berth_control_plane::scheduler::{Config, Policy, QueueOrder};
use clap::{Args, Subcommand, ValueEnum};

use crate::client::CliError;
use crate::output::{OutputFormat, print_json, table};

pub mod generate;
pub mod replay;
pub mod trace;

/// `berth sim` arguments.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SimArgs {
    #[command(subcommand)]
    command: Option<SimCommand>,
    /// Cluster trace: node,cpu_milli,memory_mib,gpus,gpu_model,gpu_memory_mib.
    #[arg(long, value_name = "FILE")]
    cluster: Option<PathBuf>,
    /// Workload trace: id,arrival_s,duration_s,cpu_milli,memory_mib,gpus,gpu_milli,gpu_memory_mib,priority,tenant.
    #[arg(long, value_name = "FILE")]
    workload: Option<PathBuf>,
    /// Placement policy.
    #[arg(long, value_enum, default_value_t = PolicyArg::Default)]
    policy: PolicyArg,
    /// Queue order.
    #[arg(long, value_enum, default_value_t = QueueArg::Priority)]
    queue: QueueArg,
    /// Let higher-priority tasks evict lower-priority ones.
    #[arg(long)]
    preemption: bool,
    /// Tasks never leave; a task that does not fit on arrival is never placed (fill mode).
    #[arg(long)]
    no_departures: bool,
}

#[derive(Debug, Subcommand)]
enum SimCommand {
    /// Write a synthetic cluster.csv and workload.csv.
    Generate(GenerateArgs),
}

#[derive(Debug, Args)]
struct GenerateArgs {
    /// Nodes (about 21 % CPU-only, the rest in the GPU node shapes of Alibaba's GPU cluster trace).
    #[arg(long)]
    nodes: usize,
    /// GPUs on the largest nodes: 8 keeps the trace's node shapes (1, 2, 4 and 8 GPUs), other values scale them.
    #[arg(long, default_value_t = 8)]
    gpus_per_node: u32,
    /// Tasks (about 0.71 GPUs each: 1.4 × the GPUs offers 100 % of them).
    #[arg(long)]
    tasks: usize,
    /// Random seed: the same seed writes the same files.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory to write cluster.csv and workload.csv into.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PolicyArg {
    /// Fragmentation-aware (Berth's default).
    Default,
    Binpack,
    Spread,
    /// Baseline: first node by name that fits.
    FirstFit,
    /// Baseline: node left with the least free GPU.
    BestFit,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum QueueArg {
    Priority,
    Fifo,
    SmallestFirst,
}

/// Runs `berth sim`.
pub fn run(args: SimArgs, out: OutputFormat) -> Result<(), CliError> {
    if let Some(SimCommand::Generate(g)) = args.command {
        if g.nodes == 0 || g.tasks == 0 {
            return Err(CliError::Usage(
                "--nodes and --tasks must be at least 1".into(),
            ));
        }
        if g.gpus_per_node > 64 {
            return Err(CliError::Usage("--gpus-per-node must be at most 64".into()));
        }
        let (cluster, workload) = generate::generate(g.nodes, g.gpus_per_node, g.tasks, g.seed);
        std::fs::create_dir_all(&g.out).with_context(|| format!("create {}", g.out.display()))?;
        for (name, text) in [("cluster.csv", cluster), ("workload.csv", workload)] {
            let path = g.out.join(name);
            berth_common::fsutil::write_atomic(&path, text.as_bytes())
                .with_context(|| format!("write {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        return Ok(());
    }
    let (Some(cluster), Some(workload)) = (args.cluster, args.workload) else {
        return Err(CliError::Usage(
            "berth sim needs --cluster FILE and --workload FILE (or `berth sim generate`)".into(),
        ));
    };
    let (nodes, tasks) = trace::load(&cluster, &workload).map_err(|e| CliError::Other(e.into()))?;
    let options = replay::Options {
        config: Config {
            policy: match args.policy {
                PolicyArg::Default => Policy::Default,
                PolicyArg::Binpack => Policy::Binpack,
                PolicyArg::Spread => Policy::Spread,
                PolicyArg::FirstFit => Policy::FirstFit,
                PolicyArg::BestFit => Policy::BestFit,
            },
            queue: match args.queue {
                QueueArg::Priority => QueueOrder::Priority,
                QueueArg::Fifo => QueueOrder::Fifo,
                QueueArg::SmallestFirst => QueueOrder::SmallestFirst,
            },
            preemption: args.preemption,
            ..Config::default()
        },
        no_departures: args.no_departures,
    };
    let show_progress =
        out == OutputFormat::Table && std::io::stderr().is_terminal() && tasks.len() >= 1000;
    let mut last_shown = 0usize;
    let report = replay::replay(nodes, &tasks, options, |done, total| {
        if show_progress && (done == total || done >= last_shown + total / 100) {
            last_shown = done;
            eprint!(
                "\rreplaying: {done}/{total} arrivals ({}%)",
                done * 100 / total.max(1)
            );
            if done == total {
                eprintln!();
            }
        }
    });
    match out {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Table => {
            let mut t = table(&["METRIC", "VALUE"]);
            let rows: [(&str, String); 12] = [
                ("tasks", report.tasks.to_string()),
                ("placed", report.placed.to_string()),
                ("never placed", report.never_placed.to_string()),
                ("preemptions", report.preemptions.to_string()),
                (
                    "GPU allocation, mean",
                    format!("{:.3}", report.gpu_alloc_ratio_mean),
                ),
                (
                    "GPU allocation, peak",
                    format!("{:.3}", report.gpu_alloc_ratio_peak),
                ),
                (
                    "GPU allocation, after last arrival",
                    format!("{:.3}", report.gpu_alloc_ratio_final),
                ),
                (
                    "queue wait p50 (s)",
                    format!("{:.1}", report.queue_wait_p50_s),
                ),
                (
                    "queue wait p99 (s)",
                    format!("{:.1}", report.queue_wait_p99_s),
                ),
                (
                    "decision p50 (µs)",
                    format!("{:.1}", report.decision_us_p50),
                ),
                (
                    "decision p99 (µs)",
                    format!("{:.1}", report.decision_us_p99),
                ),
                ("wall time (s)", format!("{:.2}", report.wall_s)),
            ];
            for (k, v) in rows {
                t.add_row(vec![k.to_string(), v]);
            }
            out!("{t}");
        }
    }
    Ok(())
}
