//! `berth bench writes` (replicated admin writes from N concurrent clients),
//! `berth bench failover` (SIGKILL the leader of a local 3-member cluster
//! while a writer runs), and the agent benchmarks (`agent`). Figures are
//! printed, never asserted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use berth_common::units::parse_duration;
use berth_proto::v1 as pb;
use clap::{Args, Subcommand};
use serde::Serialize;
use tokio::time::Instant;
use tonic::Code;

use crate::client::{CliError, Client};
use crate::local::{LocalCluster, MemberOptions};
use crate::output::{OutputFormat, print_json, table};

mod agent;
mod autoscale;
mod gateway;
mod heartbeats;
mod node_loss;
mod place;
mod tls;

/// Benchmark subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// N concurrent writers issuing replicated admin writes (add/remove model versions).
    Writes(WritesArgs),
    /// Repeatedly SIGKILL the leader of a local 3-member cluster while a writer runs.
    Failover(FailoverArgs),
    /// StartReplica → model server spawned, over many starts on a local agent.
    AgentStart(agent::AgentStartArgs),
    /// An idle agent's memory and CPU while it heartbeats to a local control plane.
    AgentIdle(agent::AgentIdleArgs),
    /// SIGKILL the agent running a replica; time until its replacement runs elsewhere.
    NodeLoss(node_loss::NodeLossArgs),
    /// Inject XID 79 into the simulated GPU running a replica; time until its replacement runs on another GPU.
    GpuFault(node_loss::NodeLossArgs),
    /// Placements per second through a real cluster, with hollow agents (no processes).
    Place(place::PlaceArgs),
    /// Writes through local 3-member clusters with mTLS and plaintext, side by side; time to a first write and to a ready node.
    Tls(tls::TlsArgs),
    /// The leader's CPU while N hollow agents heartbeat, over mTLS (or --insecure).
    Heartbeats(heartbeats::HeartbeatsArgs),
    /// What berth-gateway adds to a request (latency, requests per core, chunk gaps), beside direct, nginx and LiteLLM.
    Gateway(gateway::GatewayArgs),
    /// The autoscaler against slow-loading demo replicas through berth-gateway: a 1x→4x load step, a square wave, a cold start from zero.
    Autoscale(autoscale::AutoscaleArgs),
}

/// `bench writes` options.
#[derive(Debug, Args)]
pub struct WritesArgs {
    /// Concurrent writers, spread over the --server addresses.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// How long to write.
    #[arg(long, default_value = "10s")]
    duration: String,
}

/// `bench failover` options.
#[derive(Debug, Args)]
pub struct FailoverArgs {
    /// Leader kills.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Election timeout of the members (default: berth-control's).
    #[arg(long, default_value = "150ms")]
    election_timeout: String,
}

/// Runs a benchmark.
pub async fn run(
    cmd: BenchCommand,
    connect: &crate::credentials::ConnectArgs,
    out: OutputFormat,
) -> Result<(), CliError> {
    match cmd {
        BenchCommand::Writes(a) => writes(a, &connect.resolve()?, out).await,
        BenchCommand::Failover(a) => failover(a, out).await,
        BenchCommand::AgentStart(a) => agent::agent_start(a, out).await,
        BenchCommand::AgentIdle(a) => agent::agent_idle(a, out).await,
        BenchCommand::NodeLoss(a) => node_loss::node_loss(a, out).await,
        BenchCommand::GpuFault(a) => node_loss::gpu_fault(a, out).await,
        BenchCommand::Place(a) => place::place(a, connect, out).await,
        BenchCommand::Tls(a) => tls::tls(a, out).await,
        BenchCommand::Heartbeats(a) => heartbeats::heartbeats(a, out).await,
        BenchCommand::Gateway(a) => gateway::gateway(a, out).await,
        BenchCommand::Autoscale(a) => autoscale::autoscale(a, out).await,
    }
}

/// `bench writes` results.
#[derive(Debug, Serialize)]
pub struct WritesReport {
    /// Acknowledged writes.
    pub writes: u64,
    /// Acknowledged writes per second.
    pub writes_per_sec: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Worst latency, ms.
    pub max_ms: f64,
    /// Failed writes.
    pub errors: u64,
    /// Writers.
    pub clients: usize,
    /// Seconds measured.
    pub duration_s: f64,
}

/// Polls `f` every 20 ms until it returns `Some`; fails after `timeout` naming `what`.
async fn wait_for<T, F: AsyncFn() -> Option<T>>(
    what: &str,
    timeout: Duration,
    f: F,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates model `name` (runtime `demo`, one version with `resources`),
/// retrying until the cluster takes it (it may still be electing a leader).
async fn create_demo_model(
    client: &Client,
    name: &str,
    resources: pb::Resources,
    timeout: Duration,
) -> anyhow::Result<()> {
    let model = pb::CreateModelRequest {
        name: name.into(),
        version: Some(pb::ModelVersionSpec {
            runtime: "demo".into(),
            source: "builtin:demo".into(),
            resources: Some(resources),
            ..Default::default()
        }),
    };
    wait_for("the cluster to take a model", timeout, || async {
        let r = client
            .admin(|mut c| {
                let model = model.clone();
                async move { c.create_model(model).await }
            })
            .await;
        applied(&r).then_some(())
    })
    .await
}

/// Whether a write took effect: it succeeded, or it was retried after being
/// applied already (AlreadyExists).
fn applied<T>(r: &Result<T, CliError>) -> bool {
    match r {
        Ok(_) => true,
        Err(CliError::Request { status, .. }) => status.code() == Code::AlreadyExists,
        Err(_) => false,
    }
}

/// CPU time (user + system) a process has used, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat; `rest` starts at field 3.
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100);
    Some(ticks as f64 / per_s as f64)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

fn version_spec(model: &str, n: u64) -> pb::ModelVersionSpec {
    pb::ModelVersionSpec {
        version: format!("b{n}"),
        runtime: "vllm".into(),
        source: format!("/models/bench/{model}/{n}"),
        labels: [("bench".to_string(), "writes".to_string())].into(),
        ..Default::default()
    }
}

/// A client whose first address is the `i`-th, so writers spread out.
fn rotated(servers: &str, dialer: &berth_proto::grpc::Dialer, i: usize) -> Client {
    let addrs: Vec<&str> = servers.split(',').filter(|s| !s.is_empty()).collect();
    let n = addrs.len().max(1);
    let order: Vec<&str> = (0..addrs.len()).map(|k| addrs[(i + k) % n]).collect();
    Client::new(&order.join(","), dialer)
}

/// `clients` writers, each with its own connections and model, for
/// `duration`: acknowledged writes, latencies, errors.
pub(crate) async fn measure_writes(
    clients_n: usize,
    duration: Duration,
    connection: &crate::credentials::Connection,
) -> Result<WritesReport, CliError> {
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let servers = connection.servers.as_str();
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    );
    // One client and one model per writer, created before the clock starts
    // (which also opens the client's connection).
    let clients: Vec<Client> = (0..clients_n)
        .map(|i| rotated(servers, &connection.dialer, i))
        .collect();
    for (i, client) in clients.iter().enumerate() {
        let name = format!("bench-{run_id}-{i}");
        let req = pb::CreateModelRequest {
            name: name.clone(),
            version: Some(version_spec(&name, 0)),
        };
        client
            .admin(|mut c| {
                let req = req.clone();
                async move { c.create_model(req).await }
            })
            .await?;
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut handles = Vec::new();
    for (i, client) in clients.iter().cloned().enumerate() {
        let name = format!("bench-{run_id}-{i}");
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut n = 1u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                // Alternate: add b{n}, then remove it again; the model keeps 1-2 versions.
                let result = if n % 2 == 1 {
                    let req = pb::AddModelVersionRequest {
                        model: name.clone(),
                        version: Some(version_spec(&name, n)),
                    };
                    client
                        .admin(|mut c| {
                            let req = req.clone();
                            async move { c.add_model_version(req).await }
                        })
                        .await
                } else {
                    let req = pb::RemoveModelVersionRequest {
                        model: name.clone(),
                        version: format!("b{}", n - 1),
                    };
                    client
                        .admin(|mut c| {
                            let req = req.clone();
                            async move { c.remove_model_version(req).await }
                        })
                        .await
                };
                match result {
                    Ok(_) => lat.push(t.elapsed().as_micros() as u64),
                    Err(_) => errors += 1,
                }
                n += 1;
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for h in handles {
        let (lat, e) = h.await.context("writer task")?;
        all.extend(lat);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let report = WritesReport {
        writes: all.len() as u64,
        writes_per_sec: all.len() as f64 / elapsed,
        p50_ms: percentile(&all, 0.50),
        p99_ms: percentile(&all, 0.99),
        max_ms: all.last().map(|m| *m as f64 / 1000.0).unwrap_or(0.0),
        errors,
        clients: clients_n,
        duration_s: elapsed,
    };
    for (i, client) in clients.iter().enumerate() {
        let name = format!("bench-{run_id}-{i}");
        let _ = client
            .admin(|mut c| {
                let name = name.clone();
                async move { c.delete_model(pb::DeleteModelRequest { name }).await }
            })
            .await;
    }
    Ok(report)
}

async fn writes(
    a: WritesArgs,
    connection: &crate::credentials::Connection,
    out: OutputFormat,
) -> Result<(), CliError> {
    let duration =
        parse_duration("--duration", &a.duration).map_err(|e| CliError::Usage(e.to_string()))?;
    if a.clients == 0 {
        return Err(CliError::Usage(
            "--clients 0 is invalid: use at least 1".into(),
        ));
    }
    eprintln!(
        "bench writes: {} clients for {:?} against {}",
        a.clients, duration, connection.servers
    );
    let report = measure_writes(a.clients, duration, connection).await?;
    match out {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Table => {
            let mut t = table(&[
                "CLIENTS", "WRITES", "WRITES/S", "P50 MS", "P99 MS", "MAX MS", "ERRORS",
            ]);
            t.add_row(vec![
                report.clients.to_string(),
                report.writes.to_string(),
                format!("{:.0}", report.writes_per_sec),
                format!("{:.2}", report.p50_ms),
                format!("{:.2}", report.p99_ms),
                format!("{:.2}", report.max_ms),
                report.errors.to_string(),
            ]);
            out!("{t}");
        }
    }
    Ok(())
}

/// One leader kill.
#[derive(Debug, Serialize)]
pub struct FailoverTrial {
    /// Trial number, from 1.
    pub trial: usize,
    /// The member killed.
    pub killed: u64,
    /// The leader elected after it.
    pub new_leader: u64,
    /// Kill → a member reports itself leader, ms.
    pub elected_ms: f64,
    /// Kill → first acknowledged write that started after the kill, ms.
    pub recovery_ms: f64,
    /// Longest interval between two acknowledged writes around the kill, ms.
    pub longest_gap_ms: f64,
}

/// `bench failover` results.
#[derive(Debug, Serialize)]
pub struct FailoverReport {
    /// Every trial.
    pub trials: Vec<FailoverTrial>,
    /// Median recovery, ms.
    pub recovery_p50_ms: f64,
    /// 99th percentile recovery, ms.
    pub recovery_p99_ms: f64,
    /// Worst recovery, ms.
    pub recovery_max_ms: f64,
}

async fn failover(a: FailoverArgs, out: OutputFormat) -> Result<(), CliError> {
    parse_duration("--election-timeout", &a.election_timeout)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    eprintln!("bench failover: starting a local 3-member cluster");
    let options = MemberOptions {
        election_timeout: a.election_timeout.clone(),
        ..MemberOptions::default()
    };
    let mut cluster = LocalCluster::start(3, options).await?;
    let client = cluster.client();
    let model = format!("failover-{}", std::process::id());
    let req = pb::CreateModelRequest {
        name: model.clone(),
        version: Some(version_spec(&model, 0)),
    };
    client
        .admin(|mut c| {
            let req = req.clone();
            async move { c.create_model(req).await }
        })
        .await?;

    // The writer: sequential adds, each recorded as (start, end) when acknowledged.
    let acks: Arc<std::sync::Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let acks = acks.clone();
        let stop = stop.clone();
        let client = client.clone();
        let model = model.clone();
        tokio::spawn(async move {
            let mut n = 1u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let req = pb::AddModelVersionRequest {
                    model: model.clone(),
                    version: Some(version_spec(&model, n)),
                };
                let r = client
                    .admin(|mut c| {
                        let req = req.clone();
                        async move { c.add_model_version(req).await }
                    })
                    .await;
                if applied(&r) {
                    acks.lock().expect("acks lock").push((t, Instant::now()));
                }
                n += 1;
            }
        })
    };

    let mut trials = Vec::new();
    for trial in 1..=a.trials {
        let leader = cluster.wait_for_leader(Duration::from_secs(30)).await?;
        // Let the writer settle on the current leader.
        let settle = acks.lock().expect("acks lock").len() + 20;
        let until = Instant::now() + Duration::from_secs(30);
        while acks.lock().expect("acks lock").len() < settle && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let killed_at = Instant::now();
        cluster.kill(leader)?;
        let new_leader = cluster.wait_for_leader(Duration::from_secs(30)).await?;
        let elected_ms = killed_at.elapsed().as_secs_f64() * 1000.0;
        // Wait for the first write that started after the kill.
        let until = Instant::now() + Duration::from_secs(30);
        let recovered = loop {
            let found = acks
                .lock()
                .expect("acks lock")
                .iter()
                .find(|(s, _)| *s >= killed_at)
                .map(|(_, e)| *e);
            if let Some(e) = found {
                break e;
            }
            if Instant::now() > until {
                return Err(anyhow::anyhow!(
                    "no write acknowledged within 30s of killing leader {leader}"
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let longest_gap = {
            let acks = acks.lock().expect("acks lock");
            let ends: Vec<Instant> = acks.iter().map(|(_, e)| *e).collect();
            ends.windows(2)
                .filter(|w| w[1] >= killed_at && w[0] <= recovered)
                .map(|w| w[1] - w[0])
                .max()
                .unwrap_or_default()
        };
        let t = FailoverTrial {
            trial,
            killed: leader,
            new_leader,
            elected_ms,
            recovery_ms: (recovered - killed_at).as_secs_f64() * 1000.0,
            longest_gap_ms: longest_gap.as_secs_f64() * 1000.0,
        };
        eprintln!(
            "trial {trial}/{}: killed leader {leader}, new leader {new_leader} after {:.0} ms, recovery {:.0} ms, longest gap {:.0} ms",
            a.trials, t.elected_ms, t.recovery_ms, t.longest_gap_ms
        );
        trials.push(t);
        cluster.restart(leader)?;
        cluster.wait_for_voters(3, Duration::from_secs(60)).await?;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = writer.await;
    let mut rec: Vec<u64> = trials
        .iter()
        .map(|t| (t.recovery_ms * 1000.0) as u64)
        .collect();
    rec.sort_unstable();
    let report = FailoverReport {
        recovery_p50_ms: percentile(&rec, 0.50),
        recovery_p99_ms: percentile(&rec, 0.99),
        recovery_max_ms: rec.last().map(|m| *m as f64 / 1000.0).unwrap_or(0.0),
        trials,
    };
    match out {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Table => {
            let mut t = table(&[
                "TRIAL",
                "KILLED",
                "NEW LEADER",
                "RECOVERY MS",
                "LONGEST GAP MS",
            ]);
            for r in &report.trials {
                t.add_row(vec![
                    r.trial.to_string(),
                    r.killed.to_string(),
                    r.new_leader.to_string(),
                    format!("{:.0}", r.elected_ms),
                    format!("{:.0}", r.recovery_ms),
                    format!("{:.0}", r.longest_gap_ms),
                ]);
            }
            out!("{t}");
            out!(
                "recovery p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                report.recovery_p50_ms,
                report.recovery_p99_ms,
                report.recovery_max_ms
            );
        }
    }
    Ok(())
}
