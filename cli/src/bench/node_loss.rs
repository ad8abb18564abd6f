//! `berth bench node-loss` and `berth bench gpu-fault`: a local 3-member
//! control plane, two agents with two simulated GPUs each, and a
//! one-replica demo deployment on a whole GPU. Each node-loss trial SIGKILLs
//! the agent whose node runs the replica and times how long until a
//! replacement runs on the other node (the grace period, then placement
//! and start), then restarts the killed agent. Each gpu-fault trial injects
//! XID 79 into the replica's (simulated) GPU and times how long until a
//! replacement runs on another GPU (the next heartbeat, the quarantine, a
//! placement and a start), then releases the GPU. Figures are printed,
//! never asserted.

use std::time::Duration;

use berth_proto::v1 as pb;
use clap::Args;
use serde::Serialize;
use tokio::time::Instant;

use super::{create_demo_model, percentile, wait_for};
use crate::client::{CliError, Client};
use crate::local::{LocalAgent, LocalCluster, MemberOptions};
use crate::output::{OutputFormat, print_json, table};

/// How long one step of a trial may take before the bench gives up.
const WAIT: Duration = Duration::from_secs(120);

/// `bench node-loss` and `bench gpu-fault` options.
#[derive(Debug, Args)]
pub struct NodeLossArgs {
    /// Agent kills (or GPU faults).
    #[arg(long, default_value_t = 10)]
    trials: usize,
}

/// `bench node-loss` and `bench gpu-fault` results.
#[derive(Debug, Serialize)]
pub struct NodeLossReport {
    /// Kill (or fault) → replacement running, per trial, ms.
    pub trials_ms: Vec<f64>,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Worst, ms.
    pub max_ms: f64,
}

/// The one running replica: id, node, first GPU.
async fn running_on(client: &Client) -> Option<(String, String, u32)> {
    let r = client
        .admin(|mut c| async move {
            c.list_cluster_replicas(pb::ListClusterReplicasRequest {
                deployment: "loss".into(),
                ..Default::default()
            })
            .await
        })
        .await
        .ok()?;
    let mut running = r
        .replicas
        .into_iter()
        .filter(|r| r.intent == "run" && r.phase == "running");
    let one = running.next()?;
    let gpu = one.gpus.first().copied().unwrap_or(0);
    running.next().is_none().then_some((one.id, one.node, gpu))
}

/// The cluster, its two agents and the one-replica deployment.
async fn setup(trials: usize) -> Result<(LocalCluster, Vec<LocalAgent>, Client), CliError> {
    if trials == 0 {
        return Err(CliError::Usage("--trials must be at least 1".into()));
    }
    let cluster = LocalCluster::start(3, MemberOptions::default()).await?;
    let client = cluster.client();
    let mut agents = Vec::new();
    for node in ["loss-a", "loss-b"] {
        agents.push(LocalAgent::start_in(
            cluster.root(),
            cluster.agent_options(node, "2xA100-80GB"),
        )?);
    }
    create_demo_model(
        &client,
        "loss",
        pb::Resources {
            cpu_milli: 100,
            memory_mib: 128,
            gpus: 1,
            gpu_memory_mib: 10 * 1024,
            gpu_milli: 1000,
        },
        WAIT,
    )
    .await?;
    client
        .admin(|mut c| async move {
            c.create_deployment(pb::CreateDeploymentRequest {
                name: "loss".into(),
                model: "loss".into(),
                replicas: 1,
                ..Default::default()
            })
            .await
        })
        .await?;
    Ok((cluster, agents, client))
}

/// Runs the node-loss trials.
pub async fn node_loss(a: NodeLossArgs, out: OutputFormat) -> Result<(), CliError> {
    let (cluster, mut agents, client) = setup(a.trials).await?;
    let mut micros = Vec::new();
    for trial in 1..=a.trials {
        let (id, node, _) = wait_for("the replica to run", WAIT, || running_on(&client)).await?;
        let victim = agents
            .iter_mut()
            .find(|ag| ag.node == node)
            .ok_or_else(|| anyhow::anyhow!("no local agent for node {node}"))?;
        victim.kill()?;
        let killed = Instant::now();
        let (new_id, new_node, _) = wait_for("a replacement to run", WAIT, || async {
            running_on(&client).await.filter(|(i, _, _)| *i != id)
        })
        .await?;
        let took = killed.elapsed();
        micros.push(took.as_micros() as u64);
        eprintln!(
            "trial {trial}: killed {node} (ran {id}); {new_id} running on {new_node} after {:.2}s",
            took.as_secs_f64()
        );
        // Bring the node back; its agent stops the replaced replica itself.
        victim.restart()?;
        wait_for("the killed node to be ready again", WAIT, || async {
            let nodes =
                client
                    .admin(|mut c| async move {
                        c.list_nodes(pb::ListNodesRequest { stale: false }).await
                    })
                    .await
                    .ok()?;
            nodes.nodes.iter().all(|n| n.state == "ready").then_some(())
        })
        .await?;
    }
    drop(agents);
    drop(cluster);
    print_report(micros, out);
    Ok(())
}

/// Runs the gpu-fault trials.
pub async fn gpu_fault(a: NodeLossArgs, out: OutputFormat) -> Result<(), CliError> {
    let (cluster, agents, client) = setup(a.trials).await?;
    let mut micros = Vec::new();
    for trial in 1..=a.trials {
        let (id, node, gpu) = wait_for("the replica to run", WAIT, || running_on(&client)).await?;
        let fault = pb::SimulateGpuFaultRequest {
            node: node.clone(),
            gpu,
            xid: Some(79),
            ..Default::default()
        };
        client
            .admin(|mut c| {
                let fault = fault.clone();
                async move { c.simulate_gpu_fault(fault).await }
            })
            .await?;
        let injected = Instant::now();
        let (new_id, new_node, new_gpu) = wait_for("a replacement to run", WAIT, || async {
            running_on(&client).await.filter(|(i, _, _)| *i != id)
        })
        .await?;
        let took = injected.elapsed();
        micros.push(took.as_micros() as u64);
        eprintln!(
            "trial {trial}: XID 79 on gpu {gpu} of {node} (ran {id}); {new_id} running on gpu {new_gpu} of {new_node} after {:.2}s",
            took.as_secs_f64()
        );
        let release = pb::ReleaseGpuRequest { node, gpu };
        client
            .admin(|mut c| {
                let release = release.clone();
                async move { c.release_gpu(release).await }
            })
            .await?;
    }
    drop(agents);
    drop(cluster);
    print_report(micros, out);
    Ok(())
}

fn print_report(mut micros: Vec<u64>, out: OutputFormat) {
    let trials_ms: Vec<f64> = micros.iter().map(|m| *m as f64 / 1000.0).collect();
    micros.sort_unstable();
    let report = NodeLossReport {
        trials_ms,
        p50_ms: percentile(&micros, 0.5),
        p99_ms: percentile(&micros, 0.99),
        max_ms: percentile(&micros, 1.0),
    };
    match out {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Table => {
            let mut t = table(&["TRIALS", "P50", "P99", "MAX"]);
            t.add_row(vec![
                report.trials_ms.len().to_string(),
                format!("{:.2} s", report.p50_ms / 1000.0),
                format!("{:.2} s", report.p99_ms / 1000.0),
                format!("{:.2} s", report.max_ms / 1000.0),
            ]);
            out!("{t}");
        }
    }
}
