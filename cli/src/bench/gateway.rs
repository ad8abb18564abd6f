//! `berth bench gateway`: what `berth-gateway` adds to a request, side by
//! side with a direct connection to the same replica and, when their
//! binaries are given, nginx (`proxy_buffering off`) and the LiteLLM proxy
//! in front of the same replica. A local one-member control plane, one agent
//! with a simulated GPU and two demo replicas (one answering at once, one
//! streaming words 20 ms apart) are the upstream. For each target it
//! measures latency at a fixed moderate rate (p50, p99, and what the proxy
//! adds over direct), the saturation rate and the proxy's CPU there
//! (requests per second per core), and the gaps between streamed chunks.
//! Figures are printed, never asserted.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use berth_proto::v1 as pb;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use tokio::time::Instant;

use super::{cpu_seconds, create_demo_model, percentile, wait_for};
use crate::client::{CliError, Client};
use crate::local::{LocalAgent, LocalCluster, MemberOptions, find_binary, free_port};
use crate::output::{OutputFormat, print_json, table};

/// Each demo replica: a tenth of a GPU and 1 GiB of its memory.
const SMALL: pb::Resources = pb::Resources {
    cpu_milli: 100,
    memory_mib: 128,
    gpus: 1,
    gpu_memory_mib: 1024,
    gpu_milli: 100,
};
/// How long a set-up step may take.
const WAIT: Duration = Duration::from_secs(120);
/// Words in a streamed answer, and the time between two.
const STREAM_WORDS: u32 = 40;
const WORD_GAP: Duration = Duration::from_millis(20);

/// `bench gateway` options.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Requests per second of the fixed-rate (latency) run.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Length of each run.
    #[arg(long, default_value = "10s", value_parser = crate::args::duration)]
    duration: Duration,
    /// Connections sending back to back in the saturation run.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Streams in the chunk-gap run.
    #[arg(long, default_value_t = 20)]
    streams: usize,
    /// nginx binary to compare with (e.g. /usr/sbin/nginx); left out: not compared.
    #[arg(long, value_name = "PATH")]
    nginx: Option<PathBuf>,
    /// LiteLLM proxy binary to compare with (`litellm`, from PyPI); left out: not compared.
    #[arg(long, value_name = "PATH")]
    litellm: Option<PathBuf>,
    /// berth-gateway's worker threads (its --threads; nginx runs one worker).
    #[arg(long, default_value_t = 1)]
    gateway_threads: usize,
}

/// One target's figures.
#[derive(Debug, Serialize)]
pub struct TargetReport {
    /// direct, berth-gateway, nginx or litellm.
    pub target: String,
    /// Median latency at the fixed rate, ms.
    pub p50_ms: f64,
    /// 99th percentile latency at the fixed rate, ms.
    pub p99_ms: f64,
    /// p50 over direct's, ms (null for direct).
    pub added_p50_ms: Option<f64>,
    /// p99 over direct's, ms (null for direct).
    pub added_p99_ms: Option<f64>,
    /// Failed requests at the fixed rate.
    pub errors: u64,
    /// Requests per second with `concurrency` connections back to back.
    pub saturation_rps: f64,
    /// The proxy's CPU cores busy at saturation (null for direct).
    pub proxy_cores: Option<f64>,
    /// Saturation requests per second per proxy core (null for direct).
    pub rps_per_core: Option<f64>,
    /// 99th percentile gap between two streamed chunks, ms (the server sends one per 20 ms).
    pub chunk_gap_p99_ms: f64,
    /// Largest gap between two streamed chunks, ms.
    pub chunk_gap_max_ms: f64,
}

/// kill -9 of one of two replicas under load, through berth-gateway.
#[derive(Debug, Serialize)]
pub struct KillReport {
    /// Requests answered during the run.
    pub requests: u64,
    /// Requests that failed (the client saw an error).
    pub failed: u64,
    /// Requests the gateway retried on the other replica.
    pub retried: u64,
    /// Kill → the last retry (after it the gateway no longer chose the dead replica), ms.
    pub stopped_choosing_ms: Option<f64>,
    /// Kill → the replica left the gateway's table (its agent reported it), ms.
    pub left_table_ms: Option<f64>,
}

/// `bench gateway` results.
#[derive(Debug, Serialize)]
pub struct GatewayReport {
    /// Fixed-rate requests per second.
    pub rate: u32,
    /// Seconds per run.
    pub duration_s: f64,
    /// Saturation connections.
    pub concurrency: usize,
    /// Per target.
    pub targets: Vec<TargetReport>,
    /// kill -9 of one replica under load.
    pub kill: KillReport,
}

/// A running proxy process (killed on drop).
pub(super) struct Proxy {
    name: &'static str,
    /// host:port it listens on.
    pub(super) addr: String,
    /// Processes whose CPU counts as the proxy's.
    child: tokio::process::Child,
    _dir: Option<tempfile::TempDir>,
}

impl Proxy {
    fn cpu(&self) -> f64 {
        let Some(pid) = self.child.id() else {
            return 0.0;
        };
        // The process and its children (nginx's worker, LiteLLM's workers).
        let mut pids = vec![pid];
        pids.extend(children(pid));
        pids.iter().filter_map(|p| cpu_seconds(*p)).sum()
    }
}

/// Direct children of `pid`, from /proc.
fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

pub(super) type Http = HttpClient<HttpConnector, Full<Bytes>>;

pub(super) fn http_client() -> Http {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    HttpClient::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(c)
}

fn completion(addr: &str, model: &str) -> anyhow::Result<hyper::Request<Full<Bytes>>> {
    let body = format!(r#"{{"model":"{model}","prompt":"hello","max_tokens":8}}"#);
    Ok(
        hyper::Request::post(format!("http://{addr}/v1/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?,
    )
}

/// One completion: its latency in µs, or None when it failed.
pub(super) async fn one(client: &Http, addr: &str, model: &str) -> Option<u64> {
    attempt(client, addr, model).await.ok()
}

/// One completion: its latency in µs, or why it failed.
pub(super) async fn attempt(client: &Http, addr: &str, model: &str) -> Result<u64, String> {
    let started = Instant::now();
    let request = completion(addr, model).map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status.is_success() {
        Ok(started.elapsed().as_micros() as u64)
    } else {
        Err(format!("{status}: {}", String::from_utf8_lossy(&body)))
    }
}

/// Latencies at a fixed rate, and the failures.
async fn fixed_rate(addr: &str, model: &str, rate: u32, duration: Duration) -> (Vec<u64>, u64) {
    let client = http_client();
    let errors = Arc::new(AtomicU64::new(0));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = Instant::now() + duration;
    let mut tasks = Vec::new();
    while Instant::now() < end {
        tick.tick().await;
        let (client, addr, model, errors) = (
            client.clone(),
            addr.to_string(),
            model.to_string(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let r = one(&client, &addr, &model).await;
            if r.is_none() {
                errors.fetch_add(1, Ordering::Relaxed);
            }
            r
        }));
    }
    let mut latencies: Vec<u64> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .filter_map(|r| r.ok().flatten())
        .collect();
    latencies.sort_unstable();
    (latencies, errors.load(Ordering::Relaxed))
}

/// Requests per second with `concurrency` connections back to back.
async fn saturation(addr: &str, model: &str, concurrency: usize, duration: Duration) -> f64 {
    let client = http_client();
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, addr, model, done) = (
                client.clone(),
                addr.to_string(),
                model.to_string(),
                done.clone(),
            );
            tokio::spawn(async move {
                while Instant::now() < end {
                    if one(&client, &addr, &model).await.is_some() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    futures::future::join_all(workers).await;
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// Gaps between consecutive chunks of `streams` streamed answers, µs, sorted.
async fn chunk_gaps(addr: &str, model: &str, streams: usize) -> Vec<u64> {
    let client = http_client();
    let mut gaps = Vec::new();
    for _ in 0..streams {
        let body = format!(
            r#"{{"model":"{model}","prompt":"hello","max_tokens":{STREAM_WORDS},"stream":true}}"#
        );
        let Ok(request) = hyper::Request::post(format!("http://{addr}/v1/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
        else {
            continue;
        };
        let Ok(response) = client.request(request).await else {
            continue;
        };
        let mut body = response.into_body();
        let mut last: Option<Instant> = None;
        while let Some(Ok(frame)) = body.frame().await {
            if frame.data_ref().is_some_and(|d| !d.is_empty()) {
                let now = Instant::now();
                if let Some(l) = last {
                    gaps.push(now.duration_since(l).as_micros() as u64);
                }
                last = Some(now);
            }
        }
    }
    gaps.sort_unstable();
    gaps
}

/// Waits until a completion through `addr` answers 200.
pub(super) async fn answers(addr: &str, model: &str) -> anyhow::Result<()> {
    let client = http_client();
    wait_for(&format!("{addr} to answer"), WAIT, || async {
        one(&client, addr, model).await.map(|_| ())
    })
    .await
}

pub(super) fn start_gateway(control: &str, token: &str, threads: usize) -> anyhow::Result<Proxy> {
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let child = tokio::process::Command::new(find_binary("berth-gateway")?)
        .args(["--listen", &addr, "--control", control, "--token", token])
        .args(["--log-format", "json", "--threads", &threads.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    Ok(Proxy {
        name: "berth-gateway",
        addr,
        child,
        _dir: None,
    })
}

fn start_nginx(nginx: &PathBuf, upstreams: &[&str]) -> anyhow::Result<Proxy> {
    let dir = tempfile::Builder::new()
        .prefix("berth-bench-nginx-")
        .tempdir()?;
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let d = dir.path().display();
    // One worker: the rate is then per core by construction; keep-alive to
    // the upstream and no buffering, as a reverse proxy for streams is run.
    let locations: String = upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| format!("    upstream up{i} {{ server {u}; keepalive 64; }}\n"))
        .collect();
    let conf = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n    access_log off;\n    client_body_temp_path {d};\n    proxy_temp_path {d};\n{locations}\
             server {{\n        listen {addr};\n\
                 location /stream/ {{ proxy_pass http://up1/; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }}\n\
                 location / {{ proxy_pass http://up0; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }}\n\
             }}\n}}\n"
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf)?;
    let child = tokio::process::Command::new(nginx)
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    Ok(Proxy {
        name: "nginx",
        addr,
        child,
        _dir: Some(dir),
    })
}

fn start_litellm(litellm: &PathBuf, upstream: &str, model: &str) -> anyhow::Result<Proxy> {
    let port = free_port()?;
    let child = tokio::process::Command::new(litellm)
        .args(["--model", &format!("openai/{model}"), "--alias", model])
        .args(["--api_base", &format!("http://{upstream}/v1")])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .env("OPENAI_API_KEY", "unused")
        // A local, loopback-only comparison: no master key to check.
        .env(
            "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY",
            "true",
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    Ok(Proxy {
        name: "litellm",
        addr: format!("127.0.0.1:{port}"),
        child,
        _dir: None,
    })
}

/// A counter's value in a Prometheus page (summed over its label sets).
fn counter(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// GET `path` on `addr` through `client`: the body.
async fn get_text(client: &Http, addr: &str, path: &str) -> Option<String> {
    let request = hyper::Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .ok()?;
    let body = client.request(request).await.ok()?.into_body();
    let bytes = body.collect().await.ok()?.to_bytes();
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// Scales `fast` to two replicas, loads the gateway with 8 connections,
/// SIGKILLs the new replica's server, and watches the gateway's retries and
/// table until it is back.
async fn kill_one(client: &Client, gateway: &str) -> anyhow::Result<KillReport> {
    let routable = |n: u64| {
        let http = http_client();
        let gateway = gateway.to_string();
        async move {
            let text = get_text(&http, &gateway, "/v1/models").await?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            v["data"]
                .as_array()?
                .iter()
                .any(|m| m["id"] == "fast" && m["ready_replicas"] == n)
                .then_some(())
        }
    };
    client
        .admin(|mut c| async move {
            c.scale_deployment(pb::ScaleDeploymentRequest {
                name: "fast".into(),
                replicas: 2,
            })
            .await
        })
        .await?;
    wait_for("two fast replicas routable", WAIT, || routable(2)).await?;
    let pid = wait_for("the second replica's pid", WAIT, || async {
        let r = client
            .admin(|mut c| async move {
                c.list_cluster_replicas(pb::ListClusterReplicasRequest {
                    deployment: "fast".into(),
                    ..Default::default()
                })
                .await
            })
            .await
            .ok()?;
        r.replicas
            .into_iter()
            .find(|r| r.id == "fast-2" && r.pid > 0)
            .map(|r| r.pid)
    })
    .await?;
    let http = http_client();
    let metrics = get_text(&http, gateway, "/metrics")
        .await
        .unwrap_or_default();
    let retries_before = counter(&metrics, "berth_gateway_retries_total");
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (http, gateway, done, failed, stop) = (
                http.clone(),
                gateway.to_string(),
                done.clone(),
                failed.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match one(&http, &gateway, "fast").await {
                        Some(_) => done.fetch_add(1, Ordering::Relaxed),
                        None => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let mut last_retry: Option<Instant> = None;
    let mut retries = retries_before;
    let mut left_table = None;
    while killed.elapsed() < Duration::from_secs(4) {
        let page = get_text(&http, gateway, "/metrics")
            .await
            .unwrap_or_default();
        let now = counter(&page, "berth_gateway_retries_total");
        if now > retries {
            retries = now;
            last_retry = Some(Instant::now());
        }
        if left_table.is_none()
            && counter(&page, "berth_gateway_ready_replicas{model=\"fast\"}") == 1.0
        {
            left_table = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    futures::future::join_all(workers).await;
    client
        .admin(|mut c| async move {
            c.scale_deployment(pb::ScaleDeploymentRequest {
                name: "fast".into(),
                replicas: 1,
            })
            .await
        })
        .await?;
    Ok(KillReport {
        requests: done.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        retried: (retries - retries_before).max(0.0) as u64,
        stopped_choosing_ms: last_retry.map(|t| t.duration_since(killed).as_secs_f64() * 1000.0),
        left_table_ms: left_table.map(|d| d.as_secs_f64() * 1000.0),
    })
}

/// Runs every measurement against one target.
async fn measure(
    a: &GatewayArgs,
    target: &str,
    addr: &str,
    stream_addr: &str,
    model: &str,
    stream_model: &str,
    proxy: Option<&Proxy>,
) -> TargetReport {
    eprintln!("{target}: {} requests/s for {:?}…", a.rate, a.duration);
    let (latencies, errors) = fixed_rate(addr, model, a.rate, a.duration).await;
    eprintln!(
        "{target}: saturation with {} connections for {:?}…",
        a.concurrency, a.duration
    );
    let cpu_before = proxy.map(Proxy::cpu);
    let wall = Instant::now();
    let rps = saturation(addr, model, a.concurrency, a.duration).await;
    let cores = proxy
        .zip(cpu_before)
        .map(|(p, before)| (p.cpu() - before) / wall.elapsed().as_secs_f64());
    eprintln!("{target}: {} streams…", a.streams);
    let gaps = chunk_gaps(stream_addr, stream_model, a.streams).await;
    TargetReport {
        target: target.to_string(),
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        added_p50_ms: None,
        added_p99_ms: None,
        errors,
        saturation_rps: rps,
        proxy_cores: cores,
        rps_per_core: cores.filter(|c| *c > 0.0).map(|c| rps / c),
        chunk_gap_p99_ms: percentile(&gaps, 0.99),
        chunk_gap_max_ms: gaps.last().map_or(0.0, |g| *g as f64 / 1000.0),
    }
}

async fn demo_deployment(client: &Client, name: &str, env: &[(&str, &str)]) -> anyhow::Result<()> {
    create_demo_model(client, name, SMALL, WAIT).await?;
    if !env.is_empty() {
        let version = pb::ModelVersionSpec {
            version: "v2".into(),
            runtime: "demo".into(),
            source: "builtin:demo".into(),
            resources: Some(SMALL),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        client
            .admin(|mut c| {
                let req = pb::AddModelVersionRequest {
                    model: name.into(),
                    version: Some(version.clone()),
                };
                async move { c.add_model_version(req).await }
            })
            .await?;
    }
    // The newest version: v2, with `env`, when there is one.
    client
        .admin(|mut c| async move {
            c.create_deployment(pb::CreateDeploymentRequest {
                name: name.into(),
                model: name.into(),
                replicas: 1,
                ..Default::default()
            })
            .await
        })
        .await?;
    Ok(())
}

/// The endpoint of `deployment`'s one running replica.
async fn endpoint(client: &Client, deployment: &str) -> anyhow::Result<String> {
    wait_for(&format!("{deployment} to run"), WAIT, || async {
        let r = client
            .admin(|mut c| async move {
                c.list_cluster_replicas(pb::ListClusterReplicasRequest {
                    deployment: deployment.into(),
                    ..Default::default()
                })
                .await
            })
            .await
            .ok()?;
        r.replicas
            .into_iter()
            .find(|r| r.phase == "running" && !r.endpoint.is_empty())
            .map(|r| r.endpoint)
    })
    .await
}

/// Runs the benchmark.
pub async fn gateway(a: GatewayArgs, out: OutputFormat) -> Result<(), CliError> {
    if a.rate == 0 || a.concurrency == 0 || a.streams == 0 {
        return Err(CliError::Usage(
            "--rate, --concurrency and --streams must be at least 1".into(),
        ));
    }
    let cluster = LocalCluster::start(1, MemberOptions::default()).await?;
    let client = cluster.client();
    let _agent = LocalAgent::start_in(
        cluster.root(),
        cluster.agent_options("bench-gw", "1xA100-80GB"),
    )?;
    eprintln!("starting the upstream: two demo replicas…");
    demo_deployment(&client, "fast", &[]).await?;
    let gap = format!("{}ms", WORD_GAP.as_millis());
    demo_deployment(
        &client,
        "words",
        &[("BERTH_DEMO_TOKEN_DELAY", gap.as_str())],
    )
    .await?;
    let fast = endpoint(&client, "fast").await?;
    let words = endpoint(&client, "words").await?;
    let token = cluster.token("gateway").await?;
    let gateway = start_gateway(&cluster.servers(), &token, a.gateway_threads)?;
    answers(&gateway.addr, "fast").await?;
    answers(&gateway.addr, "words").await?;

    let mut targets = vec![measure(&a, "direct", &fast, &words, "fast", "words", None).await];
    targets.push(
        measure(
            &a,
            gateway.name,
            &gateway.addr,
            &gateway.addr,
            "fast",
            "words",
            Some(&gateway),
        )
        .await,
    );
    eprintln!("berth-gateway: kill -9 of one of two replicas under load…");
    let kill = kill_one(&client, &gateway.addr).await?;
    drop(gateway);
    // The fast deployment is back to its first replica, which the other
    // targets reach directly.
    answers(&fast, "fast").await?;
    if let Some(nginx) = &a.nginx {
        let proxy = start_nginx(nginx, &[&fast, &words])?;
        answers(&proxy.addr, "fast").await?;
        let stream_addr = format!("{}/stream", proxy.addr);
        targets.push(
            measure(
                &a,
                proxy.name,
                &proxy.addr,
                &stream_addr,
                "fast",
                "words",
                Some(&proxy),
            )
            .await,
        );
    }
    if let Some(litellm) = &a.litellm {
        let proxy = start_litellm(litellm, &fast, "fast")?;
        answers(&proxy.addr, "fast").await?;
        // LiteLLM proxies one model here: streams go to the fast replica,
        // so its chunk gaps are not comparable with the others'.
        targets.push(
            measure(
                &a,
                proxy.name,
                &proxy.addr,
                &proxy.addr,
                "fast",
                "fast",
                Some(&proxy),
            )
            .await,
        );
    }
    let (d50, d99) = (targets[0].p50_ms, targets[0].p99_ms);
    for t in targets.iter_mut().skip(1) {
        t.added_p50_ms = Some(t.p50_ms - d50);
        t.added_p99_ms = Some(t.p99_ms - d99);
    }
    let report = GatewayReport {
        rate: a.rate,
        duration_s: a.duration.as_secs_f64(),
        concurrency: a.concurrency,
        targets,
        kill,
    };
    match out {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Table => {
            let mut t = table(&[
                "TARGET",
                "P50 MS",
                "P99 MS",
                "ADDED P50",
                "ADDED P99",
                "ERRORS",
                "SATURATION RPS",
                "PROXY CORES",
                "RPS/CORE",
                "CHUNK GAP P99 MS",
                "MAX GAP MS",
            ]);
            let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
            for r in &report.targets {
                t.add_row(vec![
                    r.target.clone(),
                    format!("{:.2}", r.p50_ms),
                    format!("{:.2}", r.p99_ms),
                    f(r.added_p50_ms),
                    f(r.added_p99_ms),
                    r.errors.to_string(),
                    format!("{:.0}", r.saturation_rps),
                    f(r.proxy_cores),
                    r.rps_per_core.map_or("-".into(), |v| format!("{v:.0}")),
                    format!("{:.2}", r.chunk_gap_p99_ms),
                    format!("{:.2}", r.chunk_gap_max_ms),
                ]);
            }
            println!("{t}");
            println!(
                "fixed rate {} requests/s for {:.0}s; saturation with {} connections; streams of {STREAM_WORDS} words {:?} apart; the load generator shares this machine's cores",
                report.rate, report.duration_s, report.concurrency, WORD_GAP
            );
            let k = &report.kill;
            let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} ms"));
            println!(
                "kill -9 of one of two replicas under 8 connections: {} requests, {} failed, {} retried; the gateway stopped choosing it after {}, and dropped it from its table after {}",
                k.requests,
                k.failed,
                k.retried,
                ms(k.stopped_choosing_ms),
                ms(k.left_table_ms)
            );
        }
    }
    Ok(())
}
