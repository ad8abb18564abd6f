//! `berth-agent`: the node agent (see the library).

use std::path::PathBuf;
use std::process::ExitCode;

use berth_node_agent::config::{Config, Flags};
use berth_node_agent::demo_model::{self, DemoArgs};
use berth_node_agent::server;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "berth-agent",
    version,
    about = "Berth node agent: reports this machine's GPUs and CPUs, runs model replicas on command",
    long_about = "Berth node agent. Registers this machine with the control plane (--control), \
heartbeats, and starts, stops and resizes model replicas when told to. Replicas keep running \
when the agent stops and are re-adopted when it starts again.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    flags: Flags,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Run the demo model server (what runtime `demo` starts).
    DemoModel(DemoArgs),
    /// Internal: own one replica process (started by the agent).
    #[command(hide = true)]
    Shim {
        /// The replica's directory.
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    berth_proto::tls::install_crypto_provider();
    let cli = Cli::parse();
    match cli.command {
        Some(Sub::Shim { dir }) => berth_node_agent::supervisor::shim::main(&dir),
        Some(Sub::DemoModel(args)) => {
            block_on(async move { demo_model::run(args).await.map_err(|e| format!("{e:#}")) })
        }
        None => {
            let config = match Config::load(cli.flags) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            berth_common::telemetry::init(config.log_format, "info");
            block_on(async move {
                let shutdown = CancellationToken::new();
                let running = server::start(config, shutdown.clone())
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                tokio::spawn(async move {
                    server::wait_for_signal().await;
                    shutdown.cancel();
                });
                running.wait().await.map_err(|e| format!("{e:#}"))
            })
        }
    }
}

/// Runs a future on a one-thread runtime: the agent is I/O-bound, and one
/// thread keeps its footprint small.
fn block_on(f: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: start async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
