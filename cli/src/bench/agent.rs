//! Agent benchmarks: `bench agent-start` (StartReplica → model server
//! process spawned, over many starts) and `bench agent-idle` (the idle
//! agent's memory and CPU while it heartbeats). Both start their own real
//! processes; figures are printed, never asserted.

use std::time::Duration;

use anyhow::Context;
use berth_proto::v1 as pb;
use berth_proto::v1::agent_client::AgentClient;
use clap::Args;
use serde::Serialize;
use tokio::time::Instant;

use super::{cpu_seconds, create_demo_model, percentile, wait_for};
use crate::client::CliError;
use crate::local::{AgentOptions, LocalAgent, LocalCluster, MemberOptions};
use crate::output::{OutputFormat, print_json, table};

/// `bench agent-start` options.
#[derive(Debug, Args)]
pub struct AgentStartArgs {
    /// Replicas to start, one after the other.
    #[arg(long, default_value_t = 200)]
    count: usize,
}

/// `bench agent-start` results.
#[derive(Debug, Serialize)]
pub struct AgentStartReport {
    /// Replicas started.
    pub starts: usize,
    /// Median StartReplica → process spawned, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Worst, ms.
    pub max_ms: f64,
}

async fn wait_serving(addr: &str) -> anyhow::Result<AgentClient<berth_proto::grpc::Channel>> {
    let client = AgentClient::new(crate::local::standalone_channel(addr)?);
    wait_for("the agent to serve", Duration::from_secs(30), || async {
        let mut c = client.clone();
        c.list_replicas(pb::ListReplicasRequest {})
            .await
            .ok()
            .map(drop)
    })
    .await?;
    Ok(client)
}

/// Starts `count` replicas (`sleep 3600`) on a fresh standalone agent and
/// times each StartReplica call, which answers once the shim reports the
/// model server's pid. The agent and every replica are killed at the end.
pub async fn agent_start(a: AgentStartArgs, out: OutputFormat) -> Result<(), CliError> {
    if a.count == 0 {
        return Err(CliError::Usage("--count must be at least 1".into()));
    }
    let agent = LocalAgent::start(AgentOptions::standalone("bench-node"))?;
    let client = wait_serving(&agent.addr).await?;
    let mut micros = Vec::with_capacity(a.count);
    for i in 0..a.count {
        let spec = pb::ReplicaSpec {
            id: format!("bench-{i}"),
            generation: 1,
            model: "bench".into(),
            runtime: "command".into(),
            command: "sleep 3600".into(),
            source: "none".into(),
            health: "tcp".into(),
            ..Default::default()
        };
        let started = Instant::now();
        let s = client
            .clone()
            .start_replica(pb::StartReplicaRequest {
                spec: Some(spec),
                placed_at: 0,
            })
            .await
            .map_err(|s| anyhow::anyhow!("start replica {i}: {}", s.message()))?
            .into_inner();
        micros.push(started.elapsed().as_micros() as u64);
        if s.pid == 0 {
            return Err(anyhow::anyhow!("replica {i} has no process: {}", s.reason).into());
        }
        if i % 50 == 49 {
            eprintln!("started {} replicas", i + 1);
        }
    }
    micros.sort_unstable();
    let report = AgentStartReport {
        starts: micros.len(),
        p50_ms: percentile(&micros, 0.5),
        p99_ms: percentile(&micros, 0.99),
        max_ms: percentile(&micros, 1.0),
    };
    drop(agent);
    match out {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Table => {
            let mut t = table(&["STARTS", "P50", "P99", "MAX"]);
            t.add_row(vec![
                report.starts.to_string(),
                format!("{:.2} ms", report.p50_ms),
                format!("{:.2} ms", report.p99_ms),
                format!("{:.2} ms", report.max_ms),
            ]);
            out!("{t}");
        }
    }
    Ok(())
}

/// `bench agent-idle` options.
#[derive(Debug, Args)]
pub struct AgentIdleArgs {
    /// How long to measure (after the agent registered and settled).
    #[arg(long, default_value = "60s", value_parser = crate::args::duration)]
    duration: Duration,
    /// The agent's simulated GPUs.
    #[arg(long, default_value = "8xH100-80GB")]
    simulate_gpus: String,
    /// The agent's heartbeat interval.
    #[arg(long, default_value = "1s", value_parser = crate::args::duration)]
    heartbeat_interval: Duration,
    /// Demo replicas to run on the agent while it is measured (each takes a
    /// third of one GPU: at most three per simulated GPU).
    #[arg(long, default_value_t = 0)]
    replicas: u32,
}

/// `bench agent-idle` results.
#[derive(Debug, Serialize)]
pub struct AgentIdleReport {
    /// Seconds measured.
    pub duration_s: f64,
    /// Mean resident memory of the agent process, MiB.
    pub rss_mib_mean: f64,
    /// Highest resident memory seen, MiB.
    pub rss_mib_max: f64,
    /// CPU time over wall time, percent of one core.
    pub cpu_percent: f64,
    /// Heartbeats the leader accepted during the window.
    pub heartbeats: u64,
    /// Replicas running on the agent while it was measured.
    pub replicas: u32,
    /// One scrape of the agent's /metrics: the median over 20, ms.
    pub scrape_ms: f64,
    /// The size of its /metrics page, bytes.
    pub scrape_bytes: usize,
}

/// Scrapes `/metrics` at `http` `n` times, one after the other: the median
/// time of one scrape (ms) and the page's size. Shared with `bench
/// heartbeats`, which scrapes the leader's.
pub(super) async fn scrape(http: &str, n: usize) -> Option<(f64, usize)> {
    let mut ms = Vec::with_capacity(n);
    let mut bytes = 0;
    for _ in 0..n {
        let t = Instant::now();
        let (code, body) = crate::local::http_request(http, "GET", "/metrics", "").await?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if code != 200 {
            return None;
        }
        bytes = body.len();
    }
    ms.sort_by(f64::total_cmp);
    Some((*ms.get(ms.len() / 2)?, bytes))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

async fn heartbeats(http: &str) -> Option<u64> {
    let (_, body) = crate::local::http_request(http, "GET", "/metrics", "").await?;
    body.lines()
        .find(|l| l.starts_with("berth_agent_heartbeats_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Runs a one-member control plane and one agent, lets it register and
/// settle, then samples the agent's RSS every second and its CPU time over
/// the window.
pub async fn agent_idle(a: AgentIdleArgs, out: OutputFormat) -> Result<(), CliError> {
    let duration = a.duration;
    let cluster = LocalCluster::start(1, MemberOptions::default()).await?;
    let http = format!("127.0.0.1:{}", crate::local::free_port()?);
    let agent = LocalAgent::start_in(
        cluster.root(),
        AgentOptions {
            node: "idle-node".into(),
            simulate_gpus: Some(a.simulate_gpus.clone()),
            control: Some(cluster.servers()),
            token: cluster.agent_token(),
            extra: vec![
                "--heartbeat-interval".into(),
                format!("{}ms", a.heartbeat_interval.as_millis()),
                "--http".into(),
                http.clone(),
            ],
            placement: None,
        },
    )?;
    let pid = agent.pid().context("the agent is not running")?;
    let client = cluster.client();
    wait_for("the agent to register", Duration::from_secs(30), || async {
        let nodes = client
            .admin(|mut c| async move { c.list_nodes(pb::ListNodesRequest { stale: false }).await })
            .await
            .ok()?;
        nodes.nodes.iter().any(|n| n.state == "ready").then_some(())
    })
    .await?;
    if a.replicas > 0 {
        let gpus =
            berth_node_agent::inventory::simulated::parse_spec(&a.simulate_gpus, "idle-node")
                .map_err(|e| CliError::Usage(e.to_string()))?;
        if a.replicas as usize > gpus.len() * 3 {
            return Err(CliError::Usage(format!(
                "--replicas {} is more than {} GPUs hold at three replicas each",
                a.replicas,
                gpus.len()
            )));
        }
        create_demo_model(
            &client,
            "idle",
            pb::Resources {
                cpu_milli: 10,
                memory_mib: 64,
                gpus: 1,
                gpu_memory_mib: 8 * 1024,
                gpu_milli: 333,
            },
            Duration::from_secs(30),
        )
        .await?;
        let replicas = a.replicas;
        client
            .admin(|mut c| async move {
                c.create_deployment(pb::CreateDeploymentRequest {
                    name: "idle".into(),
                    model: "idle".into(),
                    replicas,
                    ..Default::default()
                })
                .await
            })
            .await?;
        eprintln!("waiting for {replicas} demo replicas to run");
        wait_for("the replicas to run", Duration::from_secs(120), || async {
            let r = client
                .admin(|mut c| async move {
                    c.list_cluster_replicas(pb::ListClusterReplicasRequest {
                        deployment: "idle".into(),
                        ..Default::default()
                    })
                    .await
                })
                .await
                .ok()?;
            let running = r.replicas.iter().filter(|r| r.phase == "running").count();
            (running == replicas as usize).then_some(())
        })
        .await?;
    }
    eprintln!("agent registered; settling for 5s, then measuring for {duration:?}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let hb0 = heartbeats(&http).await.unwrap_or(0);
    let cpu0 = cpu_seconds(pid).context("read the agent's CPU time")?;
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < duration {
        if let Some(k) = rss_kib(pid) {
            samples.push(k);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu1 = cpu_seconds(pid).context("read the agent's CPU time")?;
    let hb1 = heartbeats(&http).await.unwrap_or(0);
    let (scrape_ms, scrape_bytes) = scrape(&http, 20)
        .await
        .context("scrape the agent's /metrics")?;
    let mean = samples.iter().sum::<u64>() as f64 / samples.len().max(1) as f64;
    let report = AgentIdleReport {
        duration_s: wall,
        rss_mib_mean: mean / 1024.0,
        rss_mib_max: samples.iter().copied().max().unwrap_or(0) as f64 / 1024.0,
        cpu_percent: (cpu1 - cpu0) / wall * 100.0,
        heartbeats: hb1.saturating_sub(hb0),
        replicas: a.replicas,
        scrape_ms,
        scrape_bytes,
    };
    drop(agent);
    drop(cluster);
    match out {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Table => {
            let mut t = table(&[
                "WINDOW",
                "RSS MEAN",
                "RSS MAX",
                "CPU (ONE CORE)",
                "HEARTBEATS",
                "REPLICAS",
                "SCRAPE",
                "PAGE",
            ]);
            t.add_row(vec![
                format!("{:.0}s", report.duration_s),
                format!("{:.1} MiB", report.rss_mib_mean),
                format!("{:.1} MiB", report.rss_mib_max),
                format!("{:.3}%", report.cpu_percent),
                report.heartbeats.to_string(),
                report.replicas.to_string(),
                format!("{:.2} ms", report.scrape_ms),
                format!("{:.1} KiB", report.scrape_bytes as f64 / 1024.0),
            ]);
            out!("{t}");
        }
    }
    Ok(())
}
