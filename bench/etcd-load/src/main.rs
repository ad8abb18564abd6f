//! `etcd-load`: the etcd side of `scripts/bench-vs-etcd.sh`. It mirrors
//! `berth bench writes` (cli/src/bench.rs): N concurrent writers issue
//! sequential, acknowledged writes for a fixed duration, and the report has
//! the same fields, JSON keys and percentile rule.
//!
//! Mapping to Berth's bench:
//! - writer i talks to endpoint i % n (Berth's writer i puts the i-th
//!   `--server` address first; with no failures that is the only one used);
//! - odd-numbered writes Put a ~150-byte value at `bench/<pid>/<i>/<n>`,
//!   even-numbered writes Delete the key just put, so the data stays small,
//!   as Berth alternates add-version and remove-version;
//! - latency is measured per write in microseconds and a write counts only
//!   when acknowledged; failed writes are counted as errors.
//!
//! Connections: each writer owns one etcd client (one HTTP/2 connection to
//! its endpoint), opened before the clock starts, as each of Berth's writers
//! owns one client whose channels connect on the first request (made before
//! the clock starts) and are reused. `--connect-per-write` opens a new
//! connection per write instead.
//!
//! TLS: `--cacert` verifies the members' certificates against that CA, and
//! `--cert`/`--key` present a client certificate (for etcd's
//! `--client-cert-auth`), as etcdctl's options of the same names do. rustls
//! with the ring provider (the `tls-ring` feature, the only provider
//! compiled in), as Berth uses.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use etcd_client::{Certificate, Client, ConnectOptions, DeleteOptions, Identity, TlsOptions};
use serde::Serialize;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

/// Concurrent sequential writers against an etcd cluster, reported like `berth bench writes`.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// etcd client endpoints, comma-separated (host:port, http://host:port
    /// or https://host:port; host:port means https with --cacert).
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// Concurrent writers; writer i uses endpoint i % n.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// How long to write (e.g. 10s, 500ms, 1m).
    #[arg(long, default_value = "10s")]
    duration: String,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Open a new connection for every write (as Berth's CLI does) instead of one per writer.
    #[arg(long)]
    connect_per_write: bool,
    /// Connect with TLS, verifying the members' certificates against this CA (PEM).
    #[arg(long, value_name = "FILE")]
    cacert: Option<PathBuf>,
    /// Client certificate (PEM) to present; needs --key and --cacert.
    #[arg(long, value_name = "FILE", requires_all = ["key", "cacert"])]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM); needs --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
}

/// Same fields and JSON keys as Berth's `WritesReport`.
#[derive(Debug, Serialize)]
struct WritesReport {
    writes: u64,
    writes_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    errors: u64,
    clients: usize,
    duration_s: f64,
}

/// Berth's percentile rule: nearest rank on (len - 1) * p, microseconds in, ms out.
fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("read {what} {}", path.display()))
}

/// TLS options from --cacert, --cert and --key; None without --cacert (plaintext).
fn tls_options(a: &Args) -> anyhow::Result<Option<TlsOptions>> {
    let Some(ca) = &a.cacert else {
        return Ok(None);
    };
    let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca, "--cacert")?));
    if let (Some(cert), Some(key)) = (&a.cert, &a.key) {
        tls = tls.identity(Identity::from_pem(
            read(cert, "--cert")?,
            read(key, "--key")?,
        ));
    }
    Ok(Some(tls))
}

async fn connect(endpoint: &str, tls: Option<&TlsOptions>) -> anyhow::Result<Client> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10));
    if let Some(tls) = tls {
        opts = opts.with_tls(tls.clone());
    }
    Client::connect([endpoint], Some(opts))
        .await
        .with_context(|| format!("connect to etcd at {endpoint}"))
}

/// A ~150-byte value, distinct per write.
fn value(i: usize, n: u64) -> Vec<u8> {
    let mut v = format!("writer={i} write={n} ").into_bytes();
    v.resize(150, b'x');
    v
}

async fn write(client: &mut Client, prefix: &str, i: usize, n: u64) -> anyhow::Result<()> {
    if n % 2 == 1 {
        client
            .put(format!("{prefix}{n}"), value(i, n), None)
            .await?;
    } else {
        client.delete(format!("{prefix}{}", n - 1), None).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let duration = humantime::parse_duration(&a.duration)
        .with_context(|| format!("--duration {:?}", a.duration))?;
    if a.clients == 0 {
        bail!("--clients 0 is invalid: use at least 1");
    }
    let endpoints: Vec<String> = a
        .endpoints
        .iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        bail!("--endpoints is empty");
    }
    let tls = tls_options(&a)?;
    let run_id = std::process::id();
    eprintln!(
        "etcd-load: {} clients for {:?} against {}{}{}",
        a.clients,
        duration,
        endpoints.join(","),
        match (&tls, &a.cert) {
            (None, _) => "",
            (Some(_), None) => " (TLS)",
            (Some(_), Some(_)) => " (TLS, client certificate)",
        },
        if a.connect_per_write {
            " (new connection per write)"
        } else {
            ""
        }
    );

    // One connection per writer, opened before the clock starts.
    let mut clients = Vec::with_capacity(a.clients);
    for i in 0..a.clients {
        let ep = endpoints[i % endpoints.len()].clone();
        let c = if a.connect_per_write {
            None
        } else {
            Some(connect(&ep, tls.as_ref()).await?)
        };
        clients.push((ep, c));
    }

    let start = Instant::now();
    let deadline = start + duration;
    let mut handles = Vec::with_capacity(a.clients);
    for (i, (ep, mut client)) in clients.into_iter().enumerate() {
        let tls = tls.clone();
        let prefix = format!("bench/{run_id}/{i}/");
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut n = 1u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let result = match client.as_mut() {
                    Some(c) => write(c, &prefix, i, n).await,
                    None => match connect(&ep, tls.as_ref()).await {
                        Ok(mut c) => write(&mut c, &prefix, i, n).await,
                        Err(e) => Err(e),
                    },
                };
                match result {
                    Ok(()) => lat.push(t.elapsed().as_micros() as u64),
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
        clients: a.clients,
        duration_s: elapsed,
    };

    // Clean up this run's keys (a writer may have stopped between put and delete).
    if let Ok(mut c) = connect(&endpoints[0], tls.as_ref()).await {
        let _ = c
            .delete(
                format!("bench/{run_id}/"),
                Some(DeleteOptions::new().with_prefix()),
            )
            .await;
    }

    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => {
            let header = [
                "CLIENTS", "WRITES", "WRITES/S", "P50 MS", "P99 MS", "MAX MS", "ERRORS",
            ];
            let row = [
                report.clients.to_string(),
                report.writes.to_string(),
                format!("{:.0}", report.writes_per_sec),
                format!("{:.2}", report.p50_ms),
                format!("{:.2}", report.p99_ms),
                format!("{:.2}", report.max_ms),
                report.errors.to_string(),
            ];
            let w: Vec<usize> = header
                .iter()
                .zip(&row)
                .map(|(h, r)| h.len().max(r.len()))
                .collect();
            let line = |cells: Vec<&str>| {
                cells
                    .iter()
                    .zip(&w)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_string()
            };
            println!("{}", line(header.to_vec()));
            println!("{}", line(row.iter().map(String::as_str).collect()));
        }
    }
    Ok(())
}
