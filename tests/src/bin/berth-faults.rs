//! `berth-faults`: runs Berth's fault suite (see `berth_tests::faults`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use berth_tests::faults::run::{Report, RunOptions, run};
use berth_tests::faults::schedule::Schedule;
use clap::{Parser, Subcommand};

/// Members and agents as separate hosts (network namespaces), seeded
/// faults, a recorded history and its checks. Needs root.
#[derive(Parser)]
#[command(name = "berth-faults", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One run from a seed (or a schedule file); exit 1 when a check fails.
    Run {
        /// The seed of the schedule and of the clients.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Members: 3 or 5 (1 to 7 accepted).
        #[arg(long, default_value_t = 3)]
        members: usize,
        /// Agents with 2 simulated GPUs each.
        #[arg(long, default_value_t = 2)]
        agents: usize,
        /// Faults in the schedule.
        #[arg(long, default_value_t = 20)]
        events: usize,
        /// Replay this schedule (JSON, as a run writes it) instead of drawing one.
        #[arg(long)]
        schedule: Option<PathBuf>,
        /// Where runs keep their folders.
        #[arg(long, default_value = "target/faults")]
        out: PathBuf,
        /// Keep the run's folder when it passes too.
        #[arg(long)]
        keep: bool,
        /// Print the schedule and stop.
        #[arg(long)]
        print: bool,
        /// Log entries between the members' snapshots. A large value keeps
        /// the whole Raft log on disk for a post-mortem (and sends no
        /// snapshots).
        #[arg(long, default_value_t = SNAPSHOT_EVERY)]
        snapshot_every: u64,
    },
    /// The bounded suite: several seeds, 3 and 5 members, and the
    /// regression seeds; exit 1 when any check fails.
    Suite {
        /// Where runs keep their folders.
        #[arg(long, default_value = "target/faults")]
        out: PathBuf,
    },
    /// Runs random seeds until the time is up (e.g. `--duration 2h`).
    Soak {
        /// How long to go on.
        #[arg(long, value_parser = humantime_duration)]
        duration: Duration,
        /// Faults per run.
        #[arg(long, default_value_t = 40)]
        events: usize,
        /// Where runs keep their folders.
        #[arg(long, default_value = "target/faults")]
        out: PathBuf,
    },
    /// Checks a kept run's history for linearizability again, key by key.
    Check {
        /// The run's history.jsonl.
        history: PathBuf,
        /// Steps the search may take per key.
        #[arg(long, default_value_t = BUDGET)]
        budget: u64,
    },
    /// Removes what interrupted runs left (namespaces, links, rules,
    /// processes) and lists anything still there.
    Cleanup,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    berth_common::units::parse_duration("--duration", s).map_err(|e| e.to_string())
}

/// Steps the linearizability search may take per key before it gives up
/// (about 25 s in a debug build when a key's history has many unknown writes).
const BUDGET: u64 = berth_tests::faults::check::DEFAULT_BUDGET;
/// Log entries between snapshots: low, so that runs install snapshots.
const SNAPSHOT_EVERY: u64 = 500;

/// The CI suite: (members, seed, faults). At least 100 faults in all.
/// Seed 3 with 5 members and 8 faults is a regression run: it found a
/// re-created deployment reusing replica ids, and a replica dropped from
/// the state between its start and the next heartbeat (both double-booked
/// a GPU). Seed 11 found a third double-booking (decision 067) and the
/// restarted leader that reused log ids (decision 066).
const SUITE: &[(usize, u64, usize)] = &[(5, 3, 8), (3, 11, 33), (5, 12, 32), (3, 13, 30)];

/// Hand-written schedules the suite replays besides the seeds, each for a
/// bug it found. `leader-sync-error`: the leader's fsync fails, it exits
/// and restarts; it must not lead its old term again (decision 066).
const REGRESSIONS: &[(&str, &str)] = &[(
    "leader-sync-error",
    include_str!("../../testdata/faults/leader-sync-error.json"),
)];

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = berth_tests::faults::net::available() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    // Registered before the run starts, so a SIGINT that comes while the
    // run is still setting up (before its first await) is caught too.
    let interrupted = interrupted();
    let result = tokio::select! {
        biased;
        _ = interrupted => {
            // Dropping `dispatch` ran the run's teardown.
            eprintln!("faults: interrupted; the run's namespaces, links and processes are removed");
            return ExitCode::from(130);
        }
        r = dispatch(cli.command) => r,
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves at SIGINT or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled.
fn interrupted() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let signals = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        let (Ok(mut int), Ok(mut term)) = signals else {
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<bool> {
    match command {
        Command::Run {
            seed,
            members,
            agents,
            events,
            schedule,
            out,
            keep,
            print,
            snapshot_every,
        } => {
            let schedule = match schedule {
                Some(path) => {
                    let text = std::fs::read(&path)
                        .map_err(|e| anyhow::anyhow!("read --schedule {}: {e}", path.display()))?;
                    serde_json::from_slice::<Schedule>(&text).map_err(|e| {
                        anyhow::anyhow!("--schedule {}: not a schedule ({e})", path.display())
                    })?
                }
                None => Schedule::generate(seed, members, agents, events),
            };
            if print {
                println!("{}", serde_json::to_string_pretty(&schedule)?);
                return Ok(true);
            }
            one(&schedule, &out, keep, snapshot_every).await
        }
        Command::Suite { out } => {
            let mut schedules: Vec<Schedule> = SUITE
                .iter()
                .map(|&(members, seed, events)| Schedule::generate(seed, members, 2, events))
                .collect();
            for (name, text) in REGRESSIONS {
                schedules.push(
                    serde_json::from_str(text)
                        .map_err(|e| anyhow::anyhow!("regression schedule {name}: {e}"))?,
                );
            }
            let started = std::time::Instant::now();
            let mut all = true;
            let mut faults = 0;
            for schedule in &schedules {
                faults += schedule.steps.len();
                all &= one(schedule, &out, false, SNAPSHOT_EVERY).await?;
            }
            eprintln!(
                "faults: suite of {} runs, {faults} faults in {} s: {}",
                schedules.len(),
                started.elapsed().as_secs(),
                if all { "passed" } else { "FAILED" }
            );
            Ok(all)
        }
        Command::Soak {
            duration,
            events,
            out,
        } => {
            let until = std::time::Instant::now() + duration;
            let mut all = true;
            let mut seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let mut runs = 0;
            while std::time::Instant::now() < until {
                let members = if runs % 2 == 0 { 3 } else { 5 };
                let schedule = Schedule::generate(seed, members, 2, events);
                all &= one(&schedule, &out, false, SNAPSHOT_EVERY).await?;
                seed += 1;
                runs += 1;
            }
            eprintln!(
                "faults: soak of {runs} runs: {}",
                if all { "passed" } else { "FAILED" }
            );
            Ok(all)
        }
        Command::Check { history, budget } => {
            use berth_tests::faults::check::Verdict;
            let events = berth_tests::faults::history::read_history(&history)?;
            let ops = berth_tests::faults::history::operations(&events)
                .map_err(|e| anyhow::anyhow!("{}: {e}", history.display()))?;
            let (verdicts, ms) =
                berth_tests::faults::run::check_in_background(ops.clone(), budget).await?;
            let mut ok = true;
            for v in verdicts.values() {
                let verdict = match &v.result {
                    Verdict::Linearizable => "linearizable".to_string(),
                    Verdict::Violation { explanation } => {
                        ok = false;
                        format!("NOT linearizable: {explanation}")
                    }
                    Verdict::Unknown { reason } => format!("undecided: {reason}"),
                };
                println!(
                    "{}: {} operations, {} steps: {verdict}",
                    v.key, v.operations, v.steps
                );
            }
            eprintln!(
                "faults: {} operations on {} keys checked in {} ms",
                ops.len(),
                verdicts.len(),
                ms
            );
            Ok(ok)
        }
        Command::Cleanup => {
            let swept = berth_tests::faults::net::sweep_runs(true);
            for r in &swept {
                eprintln!("faults: removed run {r}");
            }
            let left = berth_tests::faults::net::leftovers_of("");
            for l in &left {
                println!("{l}");
            }
            Ok(left.is_empty())
        }
    }
}

/// Runs one schedule and prints its report; the folder is removed when the
/// run passed (unless `keep`).
async fn one(
    schedule: &Schedule,
    out: &std::path::Path,
    keep: bool,
    snapshot_every: u64,
) -> anyhow::Result<bool> {
    let dir = out.join(format!(
        "seed-{}-{}m-{}",
        schedule.seed,
        schedule.members,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let options = RunOptions {
        dir: dir.clone(),
        clients_per_member: 2,
        check_budget: BUDGET,
        snapshot_every,
    };
    let report = run(schedule, &options).await?;
    print_report(&report);
    let passed = report.passed();
    if passed && !keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!(
            "faults: the run's history, schedule, logs and data dirs are in {}",
            dir.display()
        );
    }
    Ok(passed)
}

/// "N ms", or "never" when it did not happen.
fn after(r: &Result<u64, String>) -> String {
    match r {
        Ok(ms) => format!("{ms} ms"),
        Err(_) => "never".into(),
    }
}

fn print_report(r: &Report) {
    println!(
        "seed {} ({} members, {} agents): {} faults, {} operations, {} acknowledged writes, {} unknown; \
         lost {}, keys {} ({} not linearizable, {} undecided) checked in {} ms, double-bookings {}, \
         restarts {}, leader {} ms, a write {} and a log chunk {} after healing; log streams {} opened, \
         {} failed; longest write gaps (ms) {:?}",
        r.seed,
        r.members,
        r.agents,
        r.faults,
        r.operations,
        r.acknowledged_writes,
        r.unknown,
        r.lost_writes.len(),
        r.keys_checked,
        r.violations.len(),
        r.undecided.len(),
        r.check_ms,
        r.double_bookings.len(),
        r.restarts.len(),
        r.leader_after_heal_ms
            .map(|m| m.to_string())
            .unwrap_or("-".into()),
        after(&r.write_after_heal),
        after(&r.log_after_heal),
        r.log_streams.opened,
        r.log_streams.failed,
        r.unavailability_ms,
    );
    for f in r.failures() {
        println!("  FAIL {f}");
    }
    for u in &r.undecided {
        println!("  undecided {u}");
    }
    println!("  verdict: {}", if r.passed() { "PASS" } else { "FAIL" });
}
