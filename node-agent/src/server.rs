//! Wiring of the agent process: data-dir lock, cgroups, inventory, the
//! supervisor (re-adopting replicas left by an earlier agent), the Agent
//! gRPC server, registration and heartbeats, the inventory refresh, the
//! HTTP health/metrics endpoint, and ordered shutdown.
//!
//! Shutdown leaves replicas running (the data plane never depends on the
//! agent being up) unless `stop_replicas_on_exit` is set.

use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, bail};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use berth_common::ReplicaPhase;
use berth_proto::grpc;
use berth_proto::v1::agent_server::AgentServer;
use nix::fcntl::{Flock, FlockArg};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::Routes;

use crate::api::AgentService;
use crate::config::Config;
use crate::inventory::{Inventory, SharedInventory};
use crate::registration::{Counters, Registration, new_instance_id};
use crate::supervisor::cgroup::Cgroups;
use crate::supervisor::{Context, Replicas, Settings, Supervisor};

/// How long shutdown waits for replica tasks (stopping replicas takes their grace period).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(30);

/// A started agent.
pub struct Running {
    /// The node's name.
    pub node: String,
    /// The bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// The address the control plane reaches it at.
    pub advertised: String,
    /// The bound HTTP address, if any.
    pub http_addr: Option<SocketAddr>,
    /// The supervisor.
    pub supervisor: Arc<Supervisor>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    _lock: Flock<File>,
}

impl Running {
    /// Waits for `shutdown`, then stops serving and waits for the tasks.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.shutdown.cancelled().await;
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_WAIT, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("agent tasks did not stop within {SHUTDOWN_WAIT:?}");
        }
        tracing::info!(node = %self.node, "agent stopped");
        Ok(())
    }
}

#[derive(Clone)]
struct Shared {
    node: String,
    supervisor: Arc<Supervisor>,
    inventory: Arc<SharedInventory>,
    counters: Arc<Counters>,
    standalone: bool,
    credentials: Option<Arc<berth_proto::tls::Credentials>>,
}

/// Starts the agent and returns once it serves.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create data dir {}", config.data_dir.display()))?;
    let lock = lock_data_dir(&config.data_dir)?;
    let cgroups = Cgroups::detect(config.cgroup_root.as_deref());
    match &cgroups {
        Cgroups::V2 { root } => {
            tracing::info!(root = %root.display(), "replica CPU and memory limits through cgroup v2")
        }
        Cgroups::Unavailable(why) => tracing::warn!("{why}"),
    }
    let inventory = Inventory::open(
        &config.node_name,
        config.simulate_gpus.as_deref(),
        cgroups.describe(),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let inventory = SharedInventory::new(inventory);

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("bind gRPC address {}", config.listen))?;
    let grpc_addr = listener.local_addr().context("read bound address")?;
    let advertised = config.advertised(grpc_addr);
    let security = crate::security::prepare(&config, &advertised).await?;

    let agent_exe = match &config.agent_exe {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("find this executable (it runs the shims)")?,
    };
    let tasks = TaskTracker::new();
    let ctx = Context {
        agent_exe,
        node: config.node_name.clone(),
        devices: inventory.registration().gpus.clone(),
        cgroups,
        log_max_bytes: config.log_max_bytes,
        log_keep: config.log_files,
        backoff_base: config.restart_backoff,
        backoff_max: config.restart_backoff_max,
        stable_after: Duration::from_secs(30),
        probe_interval: config.probe_interval,
        changed: Default::default(),
    };
    let settings = Settings {
        data_dir: config.data_dir.clone(),
        stop_on_shutdown: config.stop_replicas_on_exit,
    };
    let supervisor = Supervisor::open(ctx, settings, tasks.clone(), shutdown.clone()).await?;

    let service = AgentService::new(
        &config.node_name,
        Arc::new(supervisor.clone()),
        inventory.clone(),
        shutdown.clone(),
    );
    let routes = Routes::new(AgentServer::new(service));
    let stop = shutdown.clone();
    let server_security = security.server.clone();
    tasks.spawn(async move {
        if let Err(e) = grpc::serve(
            listener,
            routes,
            &["berth.v1.Agent"],
            &server_security,
            stop.clone().cancelled_owned(),
        )
        .await
        {
            tracing::error!(error = %e, "gRPC server failed; stopping");
            stop.cancel();
        }
    });
    tracing::info!(node = %config.node_name, addr = %grpc_addr, advertise = %advertised, "serving the Agent API");

    // Inventory readings: refreshed on their own cadence, read by heartbeats.
    {
        let inventory = inventory.clone();
        let supervisor = supervisor.clone();
        let stop = shutdown.clone();
        let every = config.inventory_interval;
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let claims = supervisor.claims().await;
                inventory.refresh(claims).await;
            }
        });
    }

    let counters = Arc::new(Counters::default());
    if config.control.is_empty() {
        tracing::warn!(
            "no --control given: running standalone, not registered with any control plane"
        );
    } else {
        let registration = Registration {
            control: config.control.clone(),
            node: config.node_name.clone(),
            addr: advertised.clone(),
            labels: config.labels.clone(),
            instance: new_instance_id(),
            interval: config.heartbeat_interval,
            inventory: inventory.clone(),
            supervisor: Arc::new(supervisor.clone()),
            counters: counters.clone(),
            clients: Default::default(),
            dialer: security.dialer.clone(),
        };
        tasks.spawn(registration.run(shutdown.clone()));
        crate::security::keep_renewed(&security, &config, &advertised, &tasks, shutdown.clone());
    }

    let shared = Shared {
        node: config.node_name.clone(),
        supervisor: supervisor.clone(),
        inventory,
        counters,
        standalone: config.control.is_empty(),
        credentials: security.credentials.clone(),
    };
    let http_addr = match config.http {
        Some(addr) => Some(serve_http(addr, shared, &tasks, shutdown.clone()).await?),
        None => None,
    };
    Ok(Running {
        node: config.node_name,
        grpc_addr,
        advertised,
        http_addr,
        supervisor,
        shutdown,
        tasks,
        _lock: lock,
    })
}

/// One agent per data dir: two would adopt the same replicas.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<Flock<File>> {
    let path: PathBuf = dir.join("agent.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, errno)) => bail!(
            "data dir {} is in use by another berth-agent ({errno}): stop it, or give this one another --data-dir",
            dir.display()
        ),
    }
}

async fn serve_http(
    addr: SocketAddr,
    shared: Shared,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind HTTP address {addr}"))?;
    let bound = listener.local_addr().context("read bound HTTP address")?;
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(shared);
    tasks.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "HTTP server stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /health and /metrics");
    Ok(bound)
}

async fn health(State(s): State<Shared>) -> impl IntoResponse {
    let replicas = s.supervisor.list().await;
    let body = serde_json::json!({
        "status": "ok",
        "node": s.node,
        "standalone": s.standalone,
        "registered": s.counters.registered.load(Ordering::Relaxed),
        "replicas": replicas.len(),
        "simulated": s.inventory.registration().simulated(),
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    let replicas = s.supervisor.list().await;
    let latest = s.inventory.latest();
    let mut registry = Registry::with_prefix("berth_agent");
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: i64| {
        let g: Gauge = Gauge::default();
        g.set(value);
        registry.register(name, help, g);
    };
    let counter = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let c: Counter = Counter::default();
        c.inc_by(value);
        registry.register(name, help, c);
    };
    let by_phase = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
    for phase in [
        ReplicaPhase::Pending,
        ReplicaPhase::Starting,
        ReplicaPhase::Running,
        ReplicaPhase::Failed,
        ReplicaPhase::Stopped,
    ] {
        let n = replicas.iter().filter(|r| r.phase == phase).count() as i64;
        by_phase
            .get_or_create(&vec![("phase", phase.as_str())])
            .set(n);
    }
    registry.register("replicas", "Replicas on this node, by phase", by_phase);
    gauge(
        &mut registry,
        "gpus",
        "GPUs on this node",
        latest.gpus.len() as i64,
    );
    crate::metrics::register_gpus(&mut registry, &s.node, &latest);
    crate::metrics::register_replicas(&mut registry, &s.node, &replicas, &s.inventory);
    counter(
        &mut registry,
        "heartbeats",
        "Heartbeats accepted by the leader",
        s.counters.heartbeats.load(Ordering::Relaxed),
    );
    counter(
        &mut registry,
        "heartbeat_failures",
        "Heartbeat rounds that reached no leader",
        s.counters.failures.load(Ordering::Relaxed),
    );
    gauge(
        &mut registry,
        "registered",
        "1 when registered with the leader",
        i64::from(s.counters.registered.load(Ordering::Relaxed)),
    );
    if let Some(c) = &s.credentials {
        gauge(
            &mut registry,
            "tls_certificate_expiry_seconds",
            "Seconds before this agent's TLS certificate expires (renewed at two thirds of its lifetime)",
            c.leaf().left(std::time::SystemTime::now()).as_secs() as i64,
        );
    }
    let refresh: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
    refresh.set(latest.refresh_us as f64 / 1e6);
    registry.register_with_unit(
        "inventory_refresh",
        "Duration of the last inventory refresh",
        prometheus_client::registry::Unit::Seconds,
        refresh,
    );
    let mut out = String::new();
    crate::metrics::register_starts(&mut registry);
    berth_proto::call_metrics::register(&mut registry);
    match encode(&mut out, &registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                berth_common::telemetry::PROMETHEUS_TEXT,
            )],
            berth_common::telemetry::prometheus_text(&out),
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("encode metrics: {e}"),
        ),
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
