//! `berth bench heartbeats`: the leader's CPU while N hollow agents
//! heartbeat to a local 3-member cluster, over mTLS (each agent with its own
//! node certificate and connection, like real agents) or, with
//! `--insecure`, plaintext over shared connections. Figures are printed,
//! never asserted.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use berth_node_agent::hollow::{Fleet, FleetOptions};
use clap::Args;
use serde::Serialize;
use tokio::time::Instant;

use super::{cpu_seconds, wait_for};
use crate::client::CliError;
use crate::local::{LocalCluster, MemberOptions};
use crate::output::{OutputFormat, print_json, table};

/// `bench heartbeats` options.
#[derive(Debug, Args)]
pub struct HeartbeatsArgs {
    /// Hollow agents.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// How long to measure once every agent heartbeats.
    #[arg(long, default_value = "30s", value_parser = crate::args::duration)]
    duration: Duration,
    /// Agents started per second.
    #[arg(long, default_value_t = 1000)]
    start_rate: usize,
    /// Plaintext cluster and shared connections instead of mTLS.
    #[arg(long)]
    insecure: bool,
    /// A cgroup directory this process (the hollow fleet) moves into once
    /// the members run, so that a low CPU weight there keeps the fleet from
    /// starving the members on a small machine (v2: `echo 10 > DIR/cpu.weight`;
    /// v1: `echo 100 > /sys/fs/cgroup/cpu/NAME/cpu.shares`).
    #[arg(long, value_name = "DIR")]
    fleet_cgroup: Option<std::path::PathBuf>,
}

/// What was measured.
#[derive(Debug, Serialize)]
pub struct HeartbeatsReport {
    /// `mtls` or `plaintext`.
    pub mode: &'static str,
    /// Hollow agents heartbeating.
    pub nodes: usize,
    /// Seconds measured.
    pub duration_s: f64,
    /// The leader's CPU, in cores (CPU seconds per second).
    pub leader_cores: f64,
    /// The busiest follower's CPU, in cores.
    pub follower_cores: f64,
    /// Seconds from the first agent's start until every agent heartbeat.
    pub all_heartbeating_s: f64,
    /// The hollow fleet's own CPU (this process), in cores.
    pub fleet_cores: f64,
    /// Heartbeats answered per second during the measurement (the agents
    /// send one a second each).
    pub heartbeats_per_sec: f64,
    /// One scrape of the leader's /metrics with every agent heartbeating:
    /// the median over 20, ms.
    pub leader_scrape_ms: f64,
    /// The size of the leader's /metrics page, bytes.
    pub leader_scrape_bytes: usize,
}

/// Runs the benchmark.
pub async fn heartbeats(a: HeartbeatsArgs, out: OutputFormat) -> Result<(), CliError> {
    if a.nodes == 0 {
        return Err(CliError::Usage("--nodes must be at least 1".into()));
    }
    if let Err(e) = berth_common::fsutil::raise_open_files_limit() {
        eprintln!("warning: cannot raise the open-files limit: {e}");
    }
    let options = MemberOptions {
        insecure: a.insecure,
        // A leader with thousands of agents needs more than one thread.
        extra: vec!["--worker-threads".into(), "2".into()],
        http: true,
        ..MemberOptions::default()
    };
    eprintln!("starting a local 3-member control plane");
    let cluster = LocalCluster::start(3, options).await?;
    if let Some(dir) = &a.fleet_cgroup {
        // Every thread moves with the process; the members stay where they are.
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string()).map_err(|e| {
            CliError::Usage(format!(
                "--fleet-cgroup: cannot move this process into {}: {e} (create the cgroup first, as root)",
                procs.display()
            ))
        })?;
        eprintln!("the hollow fleet runs in cgroup {}", dir.display());
    }
    let tls = if a.insecure {
        None
    } else {
        let files = berth_proto::tls::TlsFiles::under(&cluster.members[0].data_dir);
        let pem = std::fs::read_to_string(files.ca())
            .map_err(|e| CliError::Other(anyhow::anyhow!("read {}: {e}", files.ca().display())))?;
        let key = berth_proto::pki::read_private(&files.ca_key())
            .map_err(|e| CliError::Other(anyhow::anyhow!("{e}")))?;
        let ca = berth_proto::pki::Ca::from_pem(&pem, &key, "cluster CA")
            .map_err(|e| CliError::Other(anyhow::anyhow!("{e}")))?;
        Some(Arc::new(ca))
    };
    eprintln!(
        "starting {} hollow agents ({})",
        a.nodes,
        if a.insecure {
            "plaintext"
        } else {
            "mTLS, one certificate and connection each"
        }
    );
    // Agents are given the leader's address: real agents settle on the
    // leader too, and a crowd of thousands finding it through redirects
    // would measure the redirects (and this 2-core machine), not heartbeats.
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await?;
    let leader_addr = cluster
        .members
        .iter()
        .find(|m| m.id == leader)
        .map(|m| m.addr.clone())
        .unwrap_or_default();
    let started = Instant::now();
    let fleet = Fleet::start(&FleetOptions {
        control: vec![leader_addr],
        nodes: a.nodes,
        gpus: "8xH100-80GB".into(),
        cpus: 256,
        memory_mib: 2 * 1024 * 1024,
        heartbeat: Duration::from_secs(1),
        agents_per_listener: 100,
        agents_per_connection: 100,
        start_rate: a.start_rate,
        tls,
    })
    .await?;
    let last = std::sync::atomic::AtomicUsize::new(0);
    wait_for(
        "every agent to heartbeat",
        Duration::from_secs(600),
        || async {
            let n = fleet.heartbeating();
            let before = last.swap(n, std::sync::atomic::Ordering::Relaxed);
            if n / 1000 != before / 1000 {
                eprintln!("  {n} of {} heartbeating", a.nodes);
            }
            (n == a.nodes).then_some(())
        },
    )
    .await?;
    let all_heartbeating_s = started.elapsed().as_secs_f64();
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await?;
    let pids: Vec<(u64, u32)> = cluster
        .members
        .iter()
        .filter_map(|m| Some((m.id, m.pid()?)))
        .collect();
    let before: Vec<(u64, f64)> = pids
        .iter()
        .filter_map(|(id, pid)| Some((*id, cpu_seconds(*pid)?)))
        .collect();
    let fleet_before = cpu_seconds(std::process::id()).unwrap_or(0.0);
    let beats_before = fleet.heartbeats();
    let t = Instant::now();
    tokio::time::sleep(a.duration).await;
    let elapsed = t.elapsed().as_secs_f64();
    let fleet_cores =
        (cpu_seconds(std::process::id()).unwrap_or(fleet_before) - fleet_before) / elapsed;
    let heartbeats_per_sec = (fleet.heartbeats() - beats_before) as f64 / elapsed;
    let mut leader_cores = 0.0;
    let mut follower_cores: f64 = 0.0;
    for ((id, pid), (_, b)) in pids.iter().zip(&before) {
        let cores = (cpu_seconds(*pid).unwrap_or(*b) - b) / elapsed;
        if *id == leader {
            leader_cores = cores;
        } else {
            follower_cores = follower_cores.max(cores);
        }
    }
    let leader_http = cluster
        .members
        .iter()
        .find(|m| m.id == leader)
        .and_then(|m| m.http.clone())
        .context("the leader has no --http address")?;
    let (leader_scrape_ms, leader_scrape_bytes) = super::agent::scrape(&leader_http, 20)
        .await
        .context("scrape the leader's /metrics")?;
    let report = HeartbeatsReport {
        mode: if a.insecure { "plaintext" } else { "mtls" },
        nodes: a.nodes,
        duration_s: elapsed,
        leader_cores,
        follower_cores,
        all_heartbeating_s,
        fleet_cores,
        heartbeats_per_sec,
        leader_scrape_ms,
        leader_scrape_bytes,
    };
    drop(fleet);
    match out {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Table => {
            let mut t = table(&[
                "MODE",
                "NODES",
                "LEADER CORES",
                "FOLLOWER CORES",
                "ALL HEARTBEATING S",
                "FLEET CORES",
                "HEARTBEATS/S",
                "LEADER SCRAPE",
            ]);
            t.add_row(vec![
                report.mode.to_string(),
                report.nodes.to_string(),
                format!("{:.2}", report.leader_cores),
                format!("{:.2}", report.follower_cores),
                format!("{:.1}", report.all_heartbeating_s),
                format!("{:.2}", report.fleet_cores),
                format!("{:.0}", report.heartbeats_per_sec),
                format!(
                    "{:.2} ms, {:.1} KiB",
                    report.leader_scrape_ms,
                    report.leader_scrape_bytes as f64 / 1024.0
                ),
            ]);
            out!("{t}");
        }
    }
    Ok(())
}
