//! `berth bench autoscale`: the autoscaler against demo replicas that take
//! `--load-delay` to load (30 s by default), through a real berth-gateway,
//! on a local one-member control plane with one agent (simulated GPUs).
//! Each replica serves `--target` requests at once; more wait in its
//! engine's queue. Three runs:
//!
//! 1. a step from 1x to 4x the load one replica carries at target: the
//!    time to the first decision, until the replicas the load needs are
//!    ready, and until the engines' queues are empty again; failed requests;
//! 2. a square wave between 1x and 4x (compressed timings, printed): the
//!    scale changes against the fewest that load needs;
//! 3. a cold start: a deployment scaled to zero gets one request; its
//!    latency against the model's measured load time.
//!
//! Figures are printed, never asserted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use berth_proto::v1 as pb;
use clap::Args;
use serde::Serialize;
use tokio::time::Instant;

use super::gateway::{answers, attempt, http_client, one, start_gateway};
use super::wait_for;
use crate::client::{CliError, Client};
use crate::local::{LocalAgent, LocalCluster, MemberOptions};
use crate::output::{OutputFormat, print_json, table};

/// `bench autoscale` options.
#[derive(Debug, Args)]
pub struct AutoscaleArgs {
    /// How long each demo replica takes to load.
    #[arg(long, default_value = "30s", value_parser = crate::args::duration)]
    load_delay: Duration,
    /// Requests in flight per replica the policies aim for; each replica serves this many at once.
    #[arg(long, default_value_t = 4)]
    target: u32,
    /// The scale-down delay of the policies.
    #[arg(long, default_value = "2m", value_parser = crate::args::duration)]
    scale_down_delay: Duration,
    /// Length of the square-wave run (0s: skip it).
    #[arg(long, default_value = "10m", value_parser = crate::args::duration)]
    square: Duration,
    /// Half a period of the square wave: this long at 4x, then this long at 1x.
    #[arg(long, default_value = "60s", value_parser = crate::args::duration)]
    square_half: Duration,
    /// Idle time after which the cold-start run's deployment goes to zero.
    #[arg(long, default_value = "10s", value_parser = crate::args::duration)]
    zero_after: Duration,
}

/// The step from 1x to 4x.
#[derive(Debug, Serialize)]
pub struct StepReport {
    /// Clients before the step (each sends back to back).
    pub clients_before: usize,
    /// Clients after it.
    pub clients_after: usize,
    /// Replicas the load after the step needs at target.
    pub replicas_needed: u32,
    /// Step → the first scale-up written, s.
    pub decision_s: Option<f64>,
    /// Step → that many replicas running, s.
    pub ready_s: Option<f64>,
    /// Step → the engines' queues empty again (every request in a slot), s.
    pub queue_drained_s: Option<f64>,
    /// Requests answered during the run.
    pub requests: u64,
    /// Requests that failed.
    pub failed: u64,
    /// The first failures.
    pub errors: Vec<String>,
}

/// The square wave.
#[derive(Debug, Serialize)]
pub struct SquareReport {
    /// Length of the run, s.
    pub duration_s: f64,
    /// Half a period, s (compressed: production waves last hours).
    pub half_period_s: f64,
    /// The policy's scale-down delay, s.
    pub scale_down_delay_s: f64,
    /// Scale-ups seen.
    pub ups: u32,
    /// Scale-downs seen.
    pub downs: u32,
    /// The fewest changes that follow the load: the ups from 1 to the
    /// peak's need at most doubling each, and, when the low half is longer
    /// than the wait before scaling down, a down and those ups again each period.
    pub minimum_changes: u32,
    /// The replica counts in order.
    pub counts: Vec<u32>,
    /// Requests answered.
    pub requests: u64,
    /// Requests that failed.
    pub failed: u64,
    /// The first failures.
    pub errors: Vec<String>,
}

/// The cold start.
#[derive(Debug, Serialize)]
pub struct ColdReport {
    /// The model's measured load time (estimate), s.
    pub measured_load_time_s: Option<f64>,
    /// The first request after zero: sent → answered, s.
    pub first_request_s: Option<f64>,
    /// Whether it was answered (200).
    pub answered: bool,
}

/// `bench autoscale` results.
#[derive(Debug, Serialize)]
pub struct AutoscaleReport {
    /// The demo replicas' load time, s.
    pub load_delay_s: f64,
    /// In flight per replica at target.
    pub target: u32,
    /// The step.
    pub step: StepReport,
    /// The square wave (null when skipped).
    pub square: Option<SquareReport>,
    /// The cold start.
    pub cold: ColdReport,
}

/// Clients sending completions back to back, each until told to stop.
#[derive(Default)]
struct Load {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    /// The first failures' reasons.
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    clients: Vec<(Arc<AtomicBool>, tokio::task::JoinHandle<()>)>,
}

impl Load {
    fn add(&mut self, n: usize, addr: &str, model: &str) {
        for _ in 0..n {
            let stop = Arc::new(AtomicBool::new(false));
            let (ok, failed, errors) = (self.ok.clone(), self.failed.clone(), self.errors.clone());
            let (addr, model, stopped) = (addr.to_string(), model.to_string(), stop.clone());
            let task = tokio::spawn(async move {
                let http = http_client();
                while !stopped.load(Ordering::Relaxed) {
                    match attempt(&http, &addr, &model).await {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut errors) = errors.lock()
                                && errors.len() < 3
                            {
                                errors.push(e);
                            }
                        }
                    }
                }
            });
            self.clients.push((stop, task));
        }
    }

    /// Stops the `n` newest clients, letting their last requests finish.
    async fn remove(&mut self, n: usize) {
        let keep = self.clients.len().saturating_sub(n);
        let ending: Vec<_> = self.clients.drain(keep..).collect();
        for (stop, _) in &ending {
            stop.store(true, Ordering::Relaxed);
        }
        for (_, task) in ending {
            let _ = task.await;
        }
    }

    /// Stops every client: (answered, failed, the first failures).
    async fn finish(mut self) -> (u64, u64, Vec<String>) {
        self.remove(usize::MAX).await;
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.errors.lock().map(|e| e.clone()).unwrap_or_default(),
        )
    }
}

/// The deployment's count, its running replicas and their engines' queues.
async fn observe(client: &Client, name: &str) -> Option<(u32, u32, u32)> {
    observe_all(client, name)
        .await
        .map(|(c, r, q, _)| (c, r, q))
}

/// `observe`, and how many replica records it has (draining ones too).
async fn observe_all(client: &Client, name: &str) -> Option<(u32, u32, u32, usize)> {
    let d = client
        .admin(|mut c| async move {
            c.get_deployment(pb::GetDeploymentRequest {
                name: name.into(),
                stale: false,
            })
            .await
        })
        .await
        .ok()?;
    let r = client
        .admin(|mut c| async move {
            c.list_cluster_replicas(pb::ListClusterReplicasRequest {
                deployment: name.into(),
                ..Default::default()
            })
            .await
        })
        .await
        .ok()?;
    let running: Vec<&pb::ClusterReplica> = r
        .replicas
        .iter()
        .filter(|x| x.phase == "running" && x.intent == "run")
        .collect();
    Some((
        d.spec.map_or(0, |s| s.replicas),
        running.len() as u32,
        running.iter().map(|x| x.queue_depth.unwrap_or(0)).sum(),
        r.replicas.len(),
    ))
}

async fn create_model(client: &Client, a: &AutoscaleArgs) -> anyhow::Result<()> {
    let delay = format!("{}ms", a.load_delay.as_millis());
    let concurrency = a.target.to_string();
    let spec = pb::ModelVersionSpec {
        runtime: "demo".into(),
        source: "builtin:demo".into(),
        resources: Some(pb::Resources {
            cpu_milli: 100,
            memory_mib: 128,
            gpus: 1,
            gpu_memory_mib: 1024,
            gpu_milli: 50,
        }),
        env: [
            ("BERTH_DEMO_LOAD_DELAY", delay.as_str()),
            ("BERTH_DEMO_TOKEN_DELAY", "100ms"),
            ("BERTH_DEMO_MAX_CONCURRENCY", concurrency.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        ..Default::default()
    };
    wait_for("the cluster to take the model", WAIT, || async {
        let req = pb::CreateModelRequest {
            name: "demo".into(),
            version: Some(spec.clone()),
        };
        client
            .admin(|mut c| {
                let req = req.clone();
                async move { c.create_model(req).await }
            })
            .await
            .ok()
    })
    .await?;
    Ok(())
}

/// How long a set-up step may take.
const WAIT: Duration = Duration::from_secs(120);

/// Creates `name` with one replica, waits until it runs, then autoscales it.
async fn deployment(
    client: &Client,
    a: &AutoscaleArgs,
    name: &str,
    zero_after: Option<Duration>,
) -> anyhow::Result<()> {
    client
        .admin(|mut c| async move {
            c.create_deployment(pb::CreateDeploymentRequest {
                name: name.into(),
                model: "demo".into(),
                replicas: 1,
                ..Default::default()
            })
            .await
        })
        .await?;
    wait_for(&format!("{name} to run"), WAIT + a.load_delay, || async {
        let (_, running, _) = observe(client, name).await?;
        (running == 1).then_some(())
    })
    .await?;
    let policy = pb::AutoscalePolicy {
        min: 1,
        max: 16,
        target_inflight: a.target,
        scale_down_delay_ms: if zero_after.is_some() {
            1000
        } else {
            a.scale_down_delay.as_millis() as u64
        },
        scale_to_zero_after_ms: zero_after.map(|z| z.as_millis() as u64),
        ..Default::default()
    };
    client
        .admin(|mut c| {
            let req = pb::SetAutoscaleRequest {
                name: name.into(),
                policy: Some(policy),
            };
            async move { c.set_autoscale(req).await }
        })
        .await?;
    Ok(())
}

async fn step(client: &Client, gateway: &str, a: &AutoscaleArgs) -> anyhow::Result<StepReport> {
    deployment(client, a, "step", None).await?;
    let base = a.target as usize;
    answers(gateway, "step").await?;
    let mut load = Load::default();
    load.add(base, gateway, "step");
    // Settle at 1x: one replica carries it at target.
    tokio::time::sleep(Duration::from_secs(15)).await;
    eprintln!("step: 1x → 4x ({base} → {} clients)…", 4 * base);
    let t0 = Instant::now();
    load.add(3 * base, gateway, "step");
    let needed = 4;
    let (mut decision, mut ready, mut drained) = (None, None, None);
    let end = t0 + a.load_delay * 4 + Duration::from_secs(90);
    while Instant::now() < end && drained.is_none() {
        if let Some((count, running, queued)) = observe(client, "step").await {
            let at = t0.elapsed().as_secs_f64();
            if decision.is_none() && count > 1 {
                decision = Some(at);
            }
            if ready.is_none() && running >= needed {
                ready = Some(at);
            }
            if ready.is_some() && queued == 0 {
                drained = Some(at);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (requests, failed, errors) = load.finish().await;
    Ok(StepReport {
        errors,
        clients_before: base,
        clients_after: 4 * base,
        replicas_needed: needed,
        decision_s: decision,
        ready_s: ready,
        queue_drained_s: drained,
        requests,
        failed,
    })
}

async fn square(client: &Client, gateway: &str, a: &AutoscaleArgs) -> anyhow::Result<SquareReport> {
    deployment(client, a, "square", None).await?;
    let base = a.target as usize;
    answers(gateway, "square").await?;
    let mut load = Load::default();
    load.add(base, gateway, "square");
    let start = Instant::now();
    let mut counts = vec![1u32];
    let mut high = false;
    let mut flip = start;
    while start.elapsed() < a.square {
        if flip.elapsed() >= a.square_half || !high && start.elapsed() < Duration::from_millis(500)
        {
            if high {
                load.remove(3 * base).await;
            } else {
                load.add(3 * base, gateway, "square");
            }
            high = !high;
            flip = Instant::now();
        }
        if let Some((count, _, _)) = observe(client, "square").await
            && counts.last() != Some(&count)
        {
            counts.push(count);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (requests, failed, errors) = load.finish().await;
    let ups = counts.windows(2).filter(|w| w[1] > w[0]).count() as u32;
    let downs = counts.windows(2).filter(|w| w[1] < w[0]).count() as u32;
    // From 1 to 4 at most doubling: two ups. A low half longer than the
    // wait lets the count fall each period, and it must climb again.
    let wait = a.scale_down_delay.max(a.load_delay);
    let periods = (a.square.as_secs_f64() / (2.0 * a.square_half.as_secs_f64())).floor() as u32;
    let minimum = if a.square_half > wait {
        2 + periods.saturating_sub(1) * 3
    } else {
        2
    };
    Ok(SquareReport {
        duration_s: a.square.as_secs_f64(),
        half_period_s: a.square_half.as_secs_f64(),
        scale_down_delay_s: a.scale_down_delay.as_secs_f64(),
        ups,
        downs,
        minimum_changes: minimum,
        counts,
        requests,
        failed,
        errors,
    })
}

async fn cold(client: &Client, gateway: &str, a: &AutoscaleArgs) -> anyhow::Result<ColdReport> {
    deployment(client, a, "cold", Some(a.zero_after)).await?;
    eprintln!("cold start: waiting for the deployment to go to zero…");
    // Zero means the last replica is gone, not only asked to stop: while
    // it drains, it still answers requests that were sent to it.
    wait_for("cold to go to zero", WAIT + a.zero_after, || async {
        let (count, _, _, records) = observe_all(client, "cold").await?;
        (count == 0 && records == 0).then_some(())
    })
    .await?;
    let http = http_client();
    let started = Instant::now();
    let answered = one(&http, gateway, "cold").await.is_some();
    let first = started.elapsed().as_secs_f64();
    let model = client
        .admin(|mut c| async move {
            c.get_model(pb::GetModelRequest {
                name: "demo".into(),
                stale: false,
            })
            .await
        })
        .await?;
    Ok(ColdReport {
        measured_load_time_s: model
            .load_times
            .iter()
            .map(|t| t.estimate_ms as f64 / 1000.0)
            .reduce(f64::max),
        first_request_s: Some(first),
        answered,
    })
}

/// Runs the benchmark.
pub async fn autoscale(a: AutoscaleArgs, out: OutputFormat) -> Result<(), CliError> {
    if a.target == 0 || a.square_half.is_zero() {
        return Err(CliError::Usage(
            "--target must be at least 1 and --square-half longer than 0s".into(),
        ));
    }
    let cluster = LocalCluster::start(1, MemberOptions::default()).await?;
    let client = cluster.client();
    let _agent = LocalAgent::start_in(
        cluster.root(),
        cluster.agent_options("bench-as", "2xA100-80GB"),
    )?;
    create_model(&client, &a).await?;
    let token = cluster.token("gateway").await?;
    let gateway = start_gateway(&cluster.servers(), &token, 1)?;
    eprintln!(
        "bench autoscale: demo replicas loading for {:?}, target {} in flight per replica",
        a.load_delay, a.target
    );
    let step = step(&client, &gateway.addr, &a).await?;
    let square = if a.square.is_zero() {
        None
    } else {
        eprintln!(
            "square wave: {:?} at 4x, {:?} at 1x, for {:?} (compressed)…",
            a.square_half, a.square_half, a.square
        );
        Some(square(&client, &gateway.addr, &a).await?)
    };
    let cold = cold(&client, &gateway.addr, &a).await?;
    let report = AutoscaleReport {
        load_delay_s: a.load_delay.as_secs_f64(),
        target: a.target,
        step,
        square,
        cold,
    };
    match out {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Table => print_table(&report),
    }
    Ok(())
}

fn secs(s: Option<f64>) -> String {
    s.map_or("-".into(), |s| format!("{s:.1} s"))
}

fn print_table(r: &AutoscaleReport) {
    let s = &r.step;
    println!(
        "step 1x → 4x ({} → {} clients, {} replicas needed; replicas load in {} s):",
        s.clients_before, s.clients_after, s.replicas_needed, r.load_delay_s
    );
    println!("{}", {
        let mut t = table(&["DECISION", "READY", "QUEUE DRAINED", "REQUESTS", "FAILED"]);
        t.add_row(vec![
            secs(s.decision_s),
            secs(s.ready_s),
            secs(s.queue_drained_s),
            s.requests.to_string(),
            s.failed.to_string(),
        ]);
        t
    });
    if let Some(q) = &r.square {
        println!(
            "square wave (compressed): {} s at 4x then {} s at 1x, for {} s; scale-down delay {} s",
            q.half_period_s, q.half_period_s, q.duration_s, q.scale_down_delay_s
        );
        println!("{}", {
            let mut t = table(&["UPS", "DOWNS", "MINIMUM", "COUNTS", "REQUESTS", "FAILED"]);
            t.add_row(vec![
                q.ups.to_string(),
                q.downs.to_string(),
                q.minimum_changes.to_string(),
                q.counts
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("→"),
                q.requests.to_string(),
                q.failed.to_string(),
            ]);
            t
        });
    }
    for e in r
        .step
        .errors
        .iter()
        .chain(r.square.iter().flat_map(|q| &q.errors))
    {
        println!("a failure: {e}");
    }
    let c = &r.cold;
    println!(
        "cold start from zero: first request answered {} after {} (measured load time {})",
        if c.answered { "(200)" } else { "NOT" },
        secs(c.first_request_s),
        secs(c.measured_load_time_s)
    );
}
