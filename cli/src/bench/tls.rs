//! `berth bench tls`: what mTLS costs. Local 3-member clusters, one secure
//! and one `--insecure`, run one after the other (alternating which goes
//! first each round) with the same `bench writes` workload at each client
//! count; plus the time from starting a member with `--bootstrap` to its
//! first acknowledged write, and from starting `berth-agent --token` to its
//! node being `ready`. Figures are printed, never asserted.

use std::time::Duration;

use berth_proto::v1 as pb;
use clap::Args;
use serde::Serialize;
use tokio::time::Instant;

use super::{WritesReport, create_demo_model, measure_writes, wait_for};
use crate::client::CliError;
use crate::credentials::Connection;
use crate::local::{LocalAgent, LocalCluster, MemberOptions};
use crate::output::{OutputFormat, print_json, table};

/// `bench tls` options.
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// Writer counts to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,256")]
    clients: Vec<usize>,
    /// How long each measurement writes.
    #[arg(long, default_value = "10s", value_parser = crate::args::duration)]
    duration: Duration,
    /// Rounds; each runs both clusters, alternating which goes first.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
}

/// One cluster's figures in one round.
#[derive(Debug, Serialize)]
pub struct ModeReport {
    /// `mtls` or `plaintext`.
    pub mode: &'static str,
    /// The round.
    pub round: usize,
    /// Starting a one-member cluster to its first acknowledged write, ms.
    pub bootstrap_to_first_write_ms: f64,
    /// Starting an agent (with `--token` when secure) to its node `ready`, ms.
    pub agent_start_to_ready_ms: f64,
    /// `bench writes` at each client count.
    pub writes: Vec<WritesReport>,
}

/// Runs the benchmark.
pub async fn tls(a: TlsArgs, out: OutputFormat) -> Result<(), CliError> {
    if a.clients.is_empty() || a.clients.contains(&0) || a.rounds == 0 {
        return Err(CliError::Usage(
            "--clients needs counts of at least 1, and --rounds at least 1".into(),
        ));
    }
    let mut reports = Vec::new();
    for round in 0..a.rounds {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for secure in order {
            eprintln!(
                "bench tls: round {} of {}, {}",
                round + 1,
                a.rounds,
                if secure { "mTLS" } else { "plaintext" }
            );
            reports.push(one_mode(secure, round, &a).await?);
        }
    }
    match out {
        OutputFormat::Json => print_json(&reports),
        OutputFormat::Table => print_table(&reports, &a.clients),
    }
    Ok(())
}

async fn one_mode(secure: bool, round: usize, a: &TlsArgs) -> Result<ModeReport, CliError> {
    let options = MemberOptions {
        insecure: !secure,
        ..MemberOptions::default()
    };
    // Bootstrap to first write: a one-member cluster of its own.
    let started = Instant::now();
    let single = LocalCluster::start(1, options.clone()).await?;
    create_demo_model(
        &single.client(),
        "first",
        pb::Resources::default(),
        Duration::from_secs(30),
    )
    .await?;
    let bootstrap_to_first_write_ms = started.elapsed().as_secs_f64() * 1000.0;
    drop(single);

    let cluster = LocalCluster::start(3, options).await?;
    let started = Instant::now();
    let _agent = LocalAgent::start_in(
        cluster.root(),
        cluster.agent_options("bench-tls", "1xA100-80GB"),
    )?;
    let client = cluster.client();
    wait_for(
        "the agent's node to be ready",
        Duration::from_secs(60),
        || async {
            let nodes =
                client
                    .admin(|mut c| async move {
                        c.list_nodes(pb::ListNodesRequest { stale: false }).await
                    })
                    .await
                    .ok()?;
            nodes.nodes.iter().any(|n| n.state == "ready").then_some(())
        },
    )
    .await?;
    let agent_start_to_ready_ms = started.elapsed().as_secs_f64() * 1000.0;
    let connection = Connection {
        servers: cluster.servers(),
        dialer: cluster.dialer.clone(),
    };
    let mut writes = Vec::new();
    for &n in &a.clients {
        writes.push(measure_writes(n, a.duration, &connection).await?);
    }
    Ok(ModeReport {
        mode: if secure { "mtls" } else { "plaintext" },
        round,
        bootstrap_to_first_write_ms,
        agent_start_to_ready_ms,
        writes,
    })
}

fn print_table(reports: &[ModeReport], clients: &[usize]) {
    let mut t = table(&[
        "ROUND",
        "MODE",
        "CLIENTS",
        "WRITES/S",
        "P50 MS",
        "P99 MS",
        "ERRORS",
        "FIRST WRITE MS",
        "AGENT READY MS",
    ]);
    for r in reports {
        for w in &r.writes {
            t.add_row(vec![
                (r.round + 1).to_string(),
                r.mode.to_string(),
                w.clients.to_string(),
                format!("{:.0}", w.writes_per_sec),
                format!("{:.2}", w.p50_ms),
                format!("{:.2}", w.p99_ms),
                w.errors.to_string(),
                format!("{:.0}", r.bootstrap_to_first_write_ms),
                format!("{:.0}", r.agent_start_to_ready_ms),
            ]);
        }
    }
    out!("{t}");
    // mTLS against plaintext, per client count, over all rounds.
    for &n in clients {
        let rate = |mode: &str| -> f64 {
            let v: Vec<f64> = reports
                .iter()
                .filter(|r| r.mode == mode)
                .flat_map(|r| r.writes.iter().filter(|w| w.clients == n))
                .map(|w| w.writes_per_sec)
                .collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        };
        let (tls, plain) = (rate("mtls"), rate("plaintext"));
        if plain > 0.0 {
            out!(
                "{n} writers: mTLS {tls:.0} writes/s, plaintext {plain:.0} writes/s: mTLS is {:+.1} %",
                (tls / plain - 1.0) * 100.0
            );
        }
    }
}
