//! `berth-gateway`: the OpenAI-compatible endpoint (see the library).

use std::process::ExitCode;

use berth_gateway::config::{Config, Flags};
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "berth-gateway",
    version,
    about = "Berth gateway: one OpenAI-compatible endpoint that routes each request by its model to a ready replica",
    long_about = "Berth gateway. Watches the control plane (--control, --token) for the replicas that are \
ready, and serves /v1/models, /v1/completions, /v1/chat/completions and /v1/embeddings, routing each \
request by its \"model\" (a model name, name:version, or a deployment name) to the less loaded of two \
ready replicas. Retries on another replica before the first byte, streams answers through, and keeps \
routing from what it last knew while the control plane is away. Stateless: run one or many."
)]
struct Cli {
    #[command(flatten)]
    flags: Flags,
}

fn main() -> ExitCode {
    berth_proto::tls::install_crypto_provider();
    let cli = Cli::parse();
    let config = match Config::load(cli.flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    berth_common::telemetry::init(config.log_format, "info");
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.threads {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let running = match berth_gateway::start(config, shutdown.clone()).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        println!("berth-gateway: serving http://{}", running.addr);
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: install the SIGTERM handler: {e}");
                    return ExitCode::FAILURE;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping");
        shutdown.cancel();
        running.wait().await;
        ExitCode::SUCCESS
    })
}
