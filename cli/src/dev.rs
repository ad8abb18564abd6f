//! `berth dev`: a whole local Berth in this process: a one-member control
//! plane, one agent with two simulated GPUs registered as node `dev-node`,
//! a gateway (the OpenAI-compatible endpoint), and the demo model deployed
//! with two replicas, for trying Berth on one machine.
//! The agent runs replicas through `berth shim` and the demo runtime
//! through `berth demo-model`, and stops them when dev stops.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use berth_control_plane::config::Config;
use berth_control_plane::server;
use berth_node_agent::config::Config as AgentConfig;
use berth_proto::v1 as pb;
use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::client::{CliError, Client};

/// `berth dev` options.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Keep data here (default: a temporary directory removed on exit).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// gRPC address of the dev control plane.
    #[arg(long, default_value = crate::DEFAULT_SERVER)]
    listen: SocketAddr,
    /// HTTP address for /health and /metrics.
    #[arg(long, default_value = "127.0.0.1:7401")]
    http: SocketAddr,
    /// gRPC address of the dev agent.
    #[arg(long, default_value = "127.0.0.1:7500")]
    agent: SocketAddr,
    /// HTTP address of the dev gateway (the OpenAI-compatible endpoint).
    #[arg(long, default_value = "127.0.0.1:8080")]
    gateway: SocketAddr,
    /// Simulated GPUs of the dev agent; `none` uses this machine's real GPUs through NVML.
    #[arg(long, default_value = "2xA100-80GB", value_name = "SPEC")]
    simulate_gpus: String,
    /// Log lines as text (colours on a terminal only) or json.
    #[arg(long, default_value = "text", value_name = "FORMAT")]
    log_format: berth_common::telemetry::LogFormat,
}

/// The dev agent's node name.
pub const DEV_NODE: &str = "dev-node";
/// The demo deployment `berth dev` creates.
pub const DEMO_DEPLOYMENT: &str = "demo";
/// Its replicas.
const DEMO_REPLICAS: u32 = 2;

/// Registers the demo model (a quarter of a GPU and 10 GiB of its memory
/// per replica, so two replicas share one GPU) and deploys it, unless a
/// kept data dir has them already.
async fn register_demo(client: &Client) -> Result<(), CliError> {
    let existing = client
        .admin(|mut c| async move { c.list_models(pb::ListModelsRequest { stale: false }).await })
        .await?;
    if !existing.models.iter().any(|m| m.name == "demo") {
        let req = pb::CreateModelRequest {
            name: "demo".into(),
            version: Some(pb::ModelVersionSpec {
                version: "v1".into(),
                runtime: "demo".into(),
                source: "builtin:demo".into(),
                resources: Some(pb::Resources {
                    cpu_milli: 250,
                    memory_mib: 256,
                    gpus: 1,
                    gpu_memory_mib: 10 * 1024,
                    gpu_milli: 250,
                }),
                ..Default::default()
            }),
        };
        client
            .admin(|mut c| {
                let req = req.clone();
                async move { c.create_model(req).await }
            })
            .await?;
    }
    let deployments = client
        .admin(|mut c| async move {
            c.list_deployments(pb::ListDeploymentsRequest { stale: false })
                .await
        })
        .await?;
    if !deployments
        .deployments
        .iter()
        .any(|d| d.name == DEMO_DEPLOYMENT)
    {
        let req = pb::CreateDeploymentRequest {
            name: DEMO_DEPLOYMENT.into(),
            model: "demo".into(),
            replicas: DEMO_REPLICAS,
            ..Default::default()
        };
        client
            .admin(|mut c| {
                let req = req.clone();
                async move { c.create_deployment(req).await }
            })
            .await?;
    }
    Ok(())
}

/// Starts the dev gateway with a gateway token of its own, as a real one runs.
async fn start_gateway(
    client: &Client,
    control: &str,
    listen: SocketAddr,
    shutdown: CancellationToken,
) -> Result<berth_gateway::Running, CliError> {
    let created = client
        .admin(|mut c| async move {
            c.create_token(pb::CreateTokenRequest {
                role: "gateway".into(),
                ttl_s: None,
                uses: None,
                description: "berth dev gateway".into(),
            })
            .await
        })
        .await?;
    let token = created
        .token
        .parse()
        .map_err(|e: berth_common::ValidationError| anyhow::anyhow!("the gateway token: {e}"))?;
    let mut config = berth_gateway::config::Config::new(
        listen,
        vec![control.to_string()],
        berth_gateway::config::ControlAccess::Token(token),
    );
    config.name = "dev-gateway".into();
    Ok(berth_gateway::start(config, shutdown)
        .await
        .with_context(|| {
            format!("start the dev gateway on {listen} (is another berth running? pick --gateway)")
        })?)
}

/// Runs the dev cluster until Ctrl-C.
pub async fn run(args: DevArgs) -> Result<(), CliError> {
    berth_common::telemetry::init(args.log_format, "warn,berth_control_plane=info");
    let temp = match &args.data_dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("berth-dev-")
                .tempdir()
                .context("create temp data dir")?,
        ),
    };
    let data_dir = args
        .data_dir
        .clone()
        .or_else(|| temp.as_ref().map(|t| t.path().to_path_buf()))
        .context("no data dir")?;
    let fresh = !data_dir.join("member.toml").exists();
    let mut config = Config::new(data_dir.clone(), args.listen);
    config.id = Some(1);
    config.bootstrap = fresh;
    // Secure like a real cluster: the CLI finds the credentials by itself
    // (ARCHITECTURE.md, "berth dev is secure").
    config.insecure = false;
    config.http = Some(args.http);
    let shutdown = CancellationToken::new();
    let running = server::start(config, shutdown.clone())
        .await
        .with_context(|| format!("start the dev control plane on {} (is another berth running? pick --listen and --http)", args.listen))?;
    let addr = running.grpc_addr.to_string();
    let admin_conf = data_dir.join(server::security::ADMIN_CONF);
    let dev_conf = DevCredentials::install(&admin_conf)?;
    let mut agent_config = AgentConfig::new(data_dir.join("agent"), args.agent, DEV_NODE);
    agent_config.control = vec![addr.clone()];
    agent_config.insecure = false;
    agent_config.token = std::fs::read_to_string(data_dir.join(server::security::AGENT_TOKEN))
        .ok()
        .and_then(|t| t.trim().parse().ok());
    agent_config.simulate_gpus =
        Some(args.simulate_gpus.clone()).filter(|s| s != "none" && !s.is_empty());
    agent_config.stop_replicas_on_exit = true;
    let agent_config_gpus = agent_config.simulate_gpus.clone();
    let agent = berth_node_agent::server::start(agent_config, shutdown.clone())
        .await
        .with_context(|| {
            format!(
                "start the dev agent on {} (is another berth running? pick --agent)",
                args.agent
            )
        })?;
    let dialer = crate::local::dialer_from(&admin_conf)?;
    let client = Client::new(&addr, &dialer);
    register_demo(&client).await?;
    let gateway = start_gateway(&client, &addr, args.gateway, shutdown.clone()).await?;
    let server_flag = if addr == crate::DEFAULT_SERVER {
        String::new()
    } else {
        format!(" --server {addr}")
    };
    out!(
        "berth dev: control plane member 1 serving on {addr} (health and metrics on http://{})",
        args.http
    );
    out!(
        "data dir: {}{}",
        data_dir.display(),
        if temp.is_some() {
            " (temporary, removed on exit)"
        } else {
            ""
        }
    );
    out!(
        "CLI credentials: {} (admin; the berth CLI reads it while this runs)",
        dev_conf.path.display()
    );
    match &agent_config_gpus {
        Some(spec) => out!(
            "node {DEV_NODE}: agent on {} with {spec} SIMULATED GPUs",
            agent.grpc_addr
        ),
        None => out!(
            "node {DEV_NODE}: agent on {} with this machine's GPUs (NVML; none if it has no NVIDIA driver)",
            agent.grpc_addr
        ),
    }
    eprintln!("deploying {DEMO_REPLICAS} replicas of the demo model…");
    crate::deploy::wait_ready(&client, DEMO_DEPLOYMENT, Duration::from_secs(120)).await?;
    let replicas = crate::deploy::list_replicas(&client, DEMO_DEPLOYMENT, "", false).await?;
    out!(
        "deployment {DEMO_DEPLOYMENT}: {} replicas of model demo (runtime demo), running:",
        replicas.len()
    );
    let mut first = None;
    for r in &replicas {
        let endpoint = r.endpoint.clone().unwrap_or_default();
        let gpus: Vec<String> = r.gpus.iter().map(u32::to_string).collect();
        out!(
            "  {}  on {} GPU {}  http://{endpoint}",
            r.id,
            r.node.as_deref().unwrap_or("-"),
            gpus.join(",")
        );
        first.get_or_insert(endpoint);
    }
    out!(
        "gateway: OpenAI-compatible endpoint on http://{}/v1 (models: curl http://{}/v1/models)",
        gateway.addr,
        gateway.addr
    );
    out!();
    out!("try, in another terminal:");
    out!(
        "  curl -s http://{}/v1/completions -H 'Content-Type: application/json' -d '{{\"model\":\"demo\",\"prompt\":\"hello\",\"max_tokens\":8}}'",
        gateway.addr
    );
    if let Some(e) = first {
        out!(
            "  curl -s http://{e}/v1/completions -d '{{\"prompt\":\"hello\",\"max_tokens\":8}}'   (one replica, directly)"
        );
    }
    out!("  berth{server_flag} replica list");
    out!("  berth{server_flag} deploy scale {DEMO_DEPLOYMENT} 3 --wait");
    out!("  berth{server_flag} node show {DEV_NODE}");
    out!("  berth{server_flag} model list");
    out!("  curl http://{}/metrics", args.http);
    out!();
    out!("Ctrl-C stops everything.");
    let stop = shutdown.clone();
    tokio::spawn(async move {
        server::wait_for_signal().await;
        eprintln!("stopping…");
        stop.cancel();
    });
    agent.wait().await?;
    gateway.wait().await;
    running.wait().await?;
    drop(dev_conf);
    drop(temp);
    Ok(())
}

/// The dev cluster's admin credentials where the CLI looks last
/// (`credentials::dev_path`), removed when `berth dev` stops, unless another
/// `berth dev` replaced them meanwhile.
struct DevCredentials {
    path: PathBuf,
    written: Vec<u8>,
}

impl DevCredentials {
    fn install(admin_conf: &std::path::Path) -> anyhow::Result<Self> {
        let path = crate::credentials::dev_path()
            .context("neither HOME nor XDG_CONFIG_HOME is set: cannot place the dev credentials")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let written =
            std::fs::read(admin_conf).with_context(|| format!("read {}", admin_conf.display()))?;
        berth_common::fsutil::write_private(&path, &written)
            .with_context(|| format!("write {}", path.display()))?;
        Ok(DevCredentials { path, written })
    }
}

impl Drop for DevCredentials {
    fn drop(&mut self) {
        if std::fs::read(&self.path).is_ok_and(|now| now == self.written) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
