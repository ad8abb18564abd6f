//! The `berth` command: argument parsing, dispatch and exit codes
//! (0 success, 1 the request failed or was refused, 2 usage error).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Prints a line on stdout, ignoring a closed pipe (`berth model list | head`).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub mod bench;
pub mod client;
pub mod cluster;
pub mod credentials;
pub mod deploy;
pub mod dev;
pub mod events;
pub mod gpu;
pub mod local;
pub mod model;
pub mod node;
pub mod output;
pub mod sim;
pub mod token;

/// clap value parsers shared by the subcommands; a rejection states the rule
/// (clap names the flag and the value).
pub(crate) mod args {
    use std::time::Duration;

    use berth_common::names::parse_label;
    use berth_common::units::{parse_cpu_milli, parse_duration, parse_size_mib};

    /// A size in MiB: 512MiB, 8GiB.
    pub fn size(s: &str) -> Result<u64, String> {
        parse_size_mib("size", s).map_err(|e| e.rule)
    }

    /// CPU in millicores: 2, 1.5 or 500m.
    pub fn cpu(s: &str) -> Result<u32, String> {
        parse_cpu_milli("cpu", s).map_err(|e| e.rule)
    }

    /// A duration: 30s, 5m.
    pub fn duration(s: &str) -> Result<Duration, String> {
        parse_duration("duration", s).map_err(|e| e.rule)
    }

    /// A `k=v` label.
    pub fn label(s: &str) -> Result<(String, String), String> {
        parse_label("label", s).map_err(|e| e.rule)
    }
}

use client::{CliError, Client};
use output::OutputFormat;

/// Default control-plane address.
pub const DEFAULT_SERVER: &str = "127.0.0.1:7400";

#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version,
    about = "Berth: run model servers on a fleet of GPU machines",
    long_about = "Berth: run model servers on a fleet of GPU machines.\n\nStart a local cluster with `berth dev`, then try `berth cluster status` and `berth model list` in another terminal."
)]
struct Cli {
    /// Control-plane members to talk to; the next is tried when one is down [default: the config file's, else 127.0.0.1:7400].
    #[arg(
        long,
        global = true,
        env = "BERTH_SERVER",
        value_name = "ADDR[,ADDR..]"
    )]
    server: Option<String>,
    /// Credentials file (written by bootstrap as admin.conf) [default: ~/.config/berth/config].
    #[arg(long, global = true, env = "BERTH_CONFIG", value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Trust the cluster whose CA has this SHA-256 (bootstrap prints it), without a config file; pair it with BERTH_TOKEN.
    #[arg(long, global = true, value_name = "SHA256")]
    ca_fingerprint: Option<String>,
    /// The token to call with (overrides the config file's).
    #[arg(
        long = "token",
        global = true,
        env = "BERTH_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        hide = true
    )]
    token: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
    /// Talk plaintext gRPC to a development cluster started with --insecure.
    #[arg(long, global = true)]
    insecure: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Cluster membership and leadership.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// The model registry: models and their versions.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Nodes (GPU machines running berth-agent): state and inventory.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// Deployments: N replicas of a model version, placed and kept running.
    #[command(subcommand)]
    Deploy(deploy::DeployCommand),
    /// Replicas: where each runs and what it is doing.
    #[command(subcommand)]
    Replica(deploy::ReplicaCommand),
    /// What happened: changes to the cluster, and replica phase changes.
    Events(events::EventsArgs),
    /// Run the demo model server (a small real HTTP server that runtime demo starts).
    DemoModel(berth_node_agent::demo_model::DemoArgs),
    /// Internal: own one replica process (the agent runs this when it is `berth`, as in `berth dev`).
    #[command(hide = true)]
    Shim {
        /// The replica's directory.
        dir: std::path::PathBuf,
    },
    /// Run a local control plane in this process, with the demo model registered.
    Dev(dev::DevArgs),
    /// Load and failover benchmarks against a real cluster.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Replay a cluster and workload trace through the scheduler (`sim generate` makes one).
    Sim(sim::SimArgs),
    /// Join tokens for agents and members, API tokens for people and tools.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// The CLI's credentials file: import the admin.conf bootstrap wrote, or show which is used.
    #[command(subcommand)]
    Config(credentials::ConfigCommand),
}

/// Runs the CLI and returns the process exit code.
pub fn main() -> ExitCode {
    berth_proto::tls::install_crypto_provider();
    let cli = Cli::parse();
    if let Command::Shim { dir } = &cli.command {
        return berth_node_agent::supervisor::shim::main(dir);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: start async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = cli.output;
    let connect = credentials::ConnectArgs {
        server: cli.server.clone(),
        config: cli.config.clone(),
        ca_fingerprint: cli.ca_fingerprint.clone(),
        token: cli.token.clone(),
        insecure: cli.insecure,
    };
    let result = runtime.block_on(async move {
        // Commands that reach no cluster need no credentials.
        match cli.command {
            Command::DemoModel(a) => {
                return berth_node_agent::demo_model::run(a)
                    .await
                    .map_err(CliError::Other);
            }
            Command::Shim { .. } => return Ok(()),
            Command::Dev(a) => return dev::run(a).await,
            Command::Sim(a) => return sim::run(a, out),
            Command::Config(c) => return credentials::run(c, &connect, out),
            Command::Bench(c) => return bench::run(c, &connect, out).await,
            _ => {}
        }
        // Channels need the runtime: build the client inside it.
        let connection = connect.resolve()?;
        let client = Client::new(&connection.servers, &connection.dialer);
        match cli.command {
            Command::Cluster(c) => cluster::run(c, &client, out).await,
            Command::Model(c) => model::run(c, &client, out).await,
            Command::Node(c) => node::run(c, &client, out).await,
            Command::Deploy(c) => deploy::run(c, &client, out).await,
            Command::Replica(c) => deploy::run_replica(c, &client, out).await,
            Command::Events(a) => events::run(a, &client, out).await,
            Command::Token(c) => token::run(c, &client, out).await,
            Command::DemoModel(_)
            | Command::Shim { .. }
            | Command::Dev(_)
            | Command::Sim(_)
            | Command::Config(_)
            | Command::Bench(_) => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Usage(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
        Err(e) => {
            e.print();
            ExitCode::FAILURE
        }
    }
}
