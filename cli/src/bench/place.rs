//! `berth bench place`: placements per second through a real control plane,
//! with hollow agents (`berth_node_agent::hollow`: the real registration,
//! heartbeats and Agent service, recording starts instead of spawning
//! processes, all in this process). Deployments are created by concurrent
//! clients; a placement counts once the plan is committed through Raft and
//! the agent acknowledged the start. Before placing, the leader's CPU is
//! measured while the agents only heartbeat. Figures are printed, never
//! asserted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use berth_node_agent::hollow::{Fleet, FleetOptions, StartLog};
use berth_proto::v1 as pb;
use clap::Args;
use serde::Serialize;
use tokio::time::Instant;

use super::{applied, cpu_seconds, create_demo_model, percentile, wait_for};
use crate::args;
use crate::client::{CliError, Client};
use crate::local::{LocalCluster, MemberOptions};
use crate::output::{OutputFormat, print_json, table};

/// The model the bench deploys (runtime `demo`; hollow agents run nothing).
const MODEL: &str = "bench-place";

/// `bench place` options.
#[derive(Debug, Args)]
pub struct PlaceArgs {
    /// Hollow agents (nodes) to run in this process.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Replicas to place.
    #[arg(long, default_value_t = 1000)]
    replicas: usize,
    /// Replicas per deployment (the last one takes the rest).
    #[arg(long, default_value_t = 100)]
    per_deployment: usize,
    /// Deployments being created at once. Under a placement burst each
    /// creation waits tens of milliseconds for its commit, so a few clients
    /// measure write latency rather than how fast replicas are placed.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Each hollow node's simulated GPUs.
    #[arg(long, default_value = "8xH100-80GB")]
    gpus: String,
    /// Each replica's share of one GPU, in thousandths.
    #[arg(long, default_value_t = 250)]
    gpu_share: u32,
    /// Heartbeat interval of the hollow agents.
    #[arg(long, default_value = "1s", value_parser = args::duration)]
    heartbeat_interval: Duration,
    /// How long to measure the leader's CPU while the agents only heartbeat (0s skips it).
    #[arg(long, default_value = "10s", value_parser = args::duration)]
    idle: Duration,
    /// Hollow agents started per second (0: all at once).
    #[arg(long, default_value_t = 1000)]
    start_rate: usize,
    /// Start a 3-member cluster on this machine for the run instead of using --server.
    #[arg(long)]
    local: bool,
    /// How long registration, and then placement, may take.
    #[arg(long, default_value = "5m", value_parser = args::duration)]
    timeout: Duration,
}

/// `bench place` results.
#[derive(Debug, Serialize)]
pub struct PlaceReport {
    /// Replicas placed and acknowledged by their agent.
    pub placements: usize,
    /// Placements over the time from the first creation to the last acknowledgement.
    pub placements_per_sec: f64,
    /// Deployment creation → the agent acknowledged the start, median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Worst, ms.
    pub max_ms: f64,
    /// Hollow nodes.
    pub nodes: usize,
    /// Deployments created.
    pub deployments: usize,
    /// Seconds from the first creation to the last acknowledgement.
    pub place_s: f64,
    /// Seconds the creations took (all acknowledged by the cluster).
    pub create_s: f64,
    /// Heartbeats per second the leader accepted while idle.
    pub idle_heartbeats_per_sec: Option<f64>,
    /// The leader's CPU while the agents only heartbeat, in cores (null when
    /// its process is not on this machine).
    pub leader_cpu_idle_cores: Option<f64>,
    /// The leader's CPU while placing, in cores.
    pub leader_cpu_place_cores: Option<f64>,
}

/// The process listening on TCP `port` on this machine, if any (through
/// /proc: the socket's inode, then the process holding it).
fn pid_listening_on(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is hex ip:port; state 0A is LISTEN; field 9 the inode.
            let listening = f.get(3) == Some(&"0A");
            let on_port = f
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if listening
                && on_port
                && let Some(inode) = f.get(9)
            {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && inodes.iter().any(|i| target.as_os_str() == i.as_str())
            {
                return Some(pid);
            }
        }
    }
    None
}

/// The leader's process on this machine, if it is here.
async fn leader_pid(client: &Client, cluster: Option<&mut LocalCluster>) -> Option<u32> {
    let status = client
        .admin(|mut c| async move {
            c.cluster_status(pb::ClusterStatusRequest {
                stale: false,
                digest: false,
            })
            .await
        })
        .await
        .ok()?;
    if let Some(cluster) = cluster {
        return cluster.member(status.leader_id?).ok()?.pid();
    }
    let port = status.leader_addr.rsplit_once(':')?.1.parse().ok()?;
    pid_listening_on(port)
}

/// The leader's CPU, in cores, over what `during` does.
async fn leader_cores<T>(pid: Option<u32>, during: impl Future<Output = T>) -> (T, Option<f64>) {
    let before = pid.and_then(cpu_seconds);
    let started = Instant::now();
    let out = during.await;
    let wall = started.elapsed().as_secs_f64();
    let after = pid.and_then(cpu_seconds);
    let cores = before
        .zip(after)
        .map(|(b, a)| (a - b) / wall.max(f64::EPSILON));
    (out, cores)
}

/// Runs the benchmark.
pub async fn place(
    a: PlaceArgs,
    connect: &crate::credentials::ConnectArgs,
    out: OutputFormat,
) -> Result<(), CliError> {
    for (flag, v) in [
        ("--nodes", a.nodes),
        ("--replicas", a.replicas),
        ("--per-deployment", a.per_deployment),
        ("--clients", a.clients),
    ] {
        if v == 0 {
            return Err(CliError::Usage(format!("{flag} must be at least 1")));
        }
    }
    if let Err(e) = berth_common::fsutil::raise_open_files_limit() {
        eprintln!("warning: cannot raise the open-files limit: {e}");
    }
    let mut cluster = if a.local {
        eprintln!("starting a local 3-member control plane");
        // Hollow agents share connections, so they hold no node
        // certificates: the local cluster runs plaintext.
        let options = MemberOptions {
            insecure: true,
            ..MemberOptions::default()
        };
        let c = LocalCluster::start(3, options).await?;
        c.wait_for_leader(Duration::from_secs(30)).await?;
        Some(c)
    } else {
        None
    };
    let (servers, client) = match &cluster {
        Some(c) => (c.servers(), c.client()),
        None => {
            let connection = connect.resolve()?;
            let client = Client::new(&connection.servers, &connection.dialer);
            (connection.servers, client)
        }
    };
    create_demo_model(
        &client,
        MODEL,
        pb::Resources {
            cpu_milli: 500,
            memory_mib: 1024,
            gpus: 1,
            gpu_memory_mib: 4 * 1024,
            gpu_milli: a.gpu_share,
        },
        a.timeout,
    )
    .await?;

    eprintln!(
        "starting {} hollow agents ({} each, heartbeat every {:?})",
        a.nodes, a.gpus, a.heartbeat_interval
    );
    let fleet = Fleet::start(&FleetOptions {
        control: servers.split(',').map(|s| s.trim().to_string()).collect(),
        nodes: a.nodes,
        gpus: a.gpus.clone(),
        cpus: 256,
        memory_mib: 2 * 1024 * 1024,
        heartbeat: a.heartbeat_interval,
        agents_per_listener: 100,
        agents_per_connection: 100,
        start_rate: a.start_rate,
        tls: None,
    })
    .await?;
    let shown = std::sync::atomic::AtomicUsize::new(0);
    wait_for(
        "every hollow agent to register and heartbeat",
        a.timeout,
        || {
            let n = fleet.heartbeating();
            let before = shown.swap(n, std::sync::atomic::Ordering::Relaxed);
            if n / 1000 != before / 1000 || (n == a.nodes && before != n) {
                eprintln!("  {n}/{} agents heartbeating", a.nodes);
            }
            async move { (n == a.nodes).then_some(()) }
        },
    )
    .await?;
    let pid = leader_pid(&client, cluster.as_mut()).await;
    if pid.is_none() {
        eprintln!("the leader's process is not on this machine: its CPU is not measured");
    }

    let (mut idle_rate, mut idle_cores) = (None, None);
    if !a.idle.is_zero() {
        eprintln!(
            "measuring the leader while {} agents heartbeat, for {:?}",
            a.nodes, a.idle
        );
        let before = fleet.heartbeats();
        let ((), cores) = leader_cores(pid, tokio::time::sleep(a.idle)).await;
        idle_rate = Some((fleet.heartbeats() - before) as f64 / a.idle.as_secs_f64());
        idle_cores = cores;
    }

    let run = std::process::id();
    let mut sizes = Vec::new();
    let mut left = a.replicas;
    while left > 0 {
        let n = if left < 2 * a.per_deployment {
            left
        } else {
            a.per_deployment
        };
        sizes.push(n);
        left -= n;
    }
    let names: Vec<String> = (0..sizes.len())
        .map(|k| format!("bench-{run}-{k}"))
        .collect();
    eprintln!(
        "placing {} replicas in {} deployments",
        a.replicas,
        names.len()
    );
    let started = Instant::now();
    let (placed, place_cores) = leader_cores(pid, async {
        let created = create_all(&client, &names, &sizes, a.clients).await?;
        let create_s = started.elapsed().as_secs_f64();
        let last = wait_acked(&fleet.starts, a.replicas, a.timeout).await?;
        Ok::<_, CliError>((created, create_s, last))
    })
    .await;
    let (created, create_s, last) = placed?;
    let mut micros: Vec<u64> = fleet
        .starts
        .snapshot()
        .into_iter()
        .filter_map(|(id, at)| {
            let deployment = id.rsplit_once('-')?.0;
            let from = created.get(deployment)?;
            Some(at.saturating_duration_since(*from).as_micros() as u64)
        })
        .collect();
    micros.sort_unstable();
    let place_s = last.saturating_duration_since(started).as_secs_f64();
    let report = PlaceReport {
        placements: micros.len(),
        placements_per_sec: micros.len() as f64 / place_s.max(f64::EPSILON),
        p50_ms: percentile(&micros, 0.5),
        p99_ms: percentile(&micros, 0.99),
        max_ms: percentile(&micros, 1.0),
        nodes: a.nodes,
        deployments: names.len(),
        place_s,
        create_s,
        idle_heartbeats_per_sec: idle_rate,
        leader_cpu_idle_cores: idle_cores,
        leader_cpu_place_cores: place_cores,
    };
    if cluster.is_none() {
        clean_up(&client, &names, a.timeout).await;
        eprintln!(
            "the {} hollow nodes (label {}=true) stay registered and go down once the bench exits",
            a.nodes,
            berth_node_agent::hollow::HOLLOW_LABEL
        );
    }
    fleet.stop().await;
    drop(cluster);
    match out {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Table => {
            let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
            let mut t = table(&[
                "NODES",
                "PLACEMENTS",
                "PER SEC",
                "P50",
                "P99",
                "MAX",
                "LEADER CPU IDLE",
                "LEADER CPU PLACING",
            ]);
            t.add_row(vec![
                report.nodes.to_string(),
                report.placements.to_string(),
                format!("{:.0}", report.placements_per_sec),
                format!("{:.1} ms", report.p50_ms),
                format!("{:.1} ms", report.p99_ms),
                format!("{:.1} ms", report.max_ms),
                format!("{} cores", opt(report.leader_cpu_idle_cores)),
                format!("{} cores", opt(report.leader_cpu_place_cores)),
            ]);
            out!("{t}");
        }
    }
    Ok(())
}

/// Creates the deployments, `clients` at a time; when each creation began.
async fn create_all(
    client: &Client,
    names: &[String],
    sizes: &[usize],
    clients: usize,
) -> Result<HashMap<String, Instant>, CliError> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..clients.min(names.len()) {
        let (client, next) = (client.clone(), next.clone());
        let jobs: Vec<(String, usize)> = names.iter().cloned().zip(sizes.iter().copied()).collect();
        workers.spawn(async move {
            let mut created = Vec::new();
            loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((name, n)) = jobs.get(k).cloned() else {
                    return Ok::<_, CliError>(created);
                };
                let at = Instant::now();
                let r = client
                    .admin(|mut c| {
                        let name = name.clone();
                        async move {
                            c.create_deployment(pb::CreateDeploymentRequest {
                                name,
                                model: MODEL.into(),
                                replicas: n as u32,
                                ..Default::default()
                            })
                            .await
                        }
                    })
                    .await;
                if !applied(&r) {
                    r?;
                }
                created.push((name, at));
            }
        });
    }
    let mut all = HashMap::new();
    while let Some(done) = workers.join_next().await {
        let created = done.map_err(|e| anyhow::anyhow!("a creating client failed: {e}"))??;
        all.extend(created);
    }
    Ok(all)
}

/// Waits until the agents acknowledged `total` starts; when the last came.
async fn wait_acked(starts: &StartLog, total: usize, timeout: Duration) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    let mut shown = Instant::now();
    loop {
        let n = starts.len();
        if n >= total {
            return Ok(starts.last().unwrap_or_else(Instant::now));
        }
        if shown.elapsed() >= Duration::from_secs(1) {
            eprintln!("  {n}/{total} replicas started");
            shown = Instant::now();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {n} of {total} replicas were started (see `berth deploy explain` for what is pending)"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Deletes the bench's deployments and model, waiting for their replicas to go.
async fn clean_up(client: &Client, names: &[String], timeout: Duration) {
    for name in names {
        let _ = client
            .admin(|mut c| {
                let name = name.clone();
                async move {
                    c.delete_deployment(pb::DeleteDeploymentRequest { name })
                        .await
                }
            })
            .await;
    }
    let gone = wait_for("the bench's replicas to be removed", timeout, || async {
        let r = client
            .admin(|mut c| async move {
                c.list_cluster_replicas(pb::ListClusterReplicasRequest::default())
                    .await
            })
            .await
            .ok()?;
        (!r.replicas.iter().any(|x| names.contains(&x.deployment))).then_some(())
    })
    .await;
    if let Err(e) = gone {
        eprintln!("warning: {e}");
        return;
    }
    let _ = client
        .admin(|mut c| async move {
            c.delete_model(pb::DeleteModelRequest { name: MODEL.into() })
                .await
        })
        .await;
}
