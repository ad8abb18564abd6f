//! `berth-control`: one member of Berth's control plane.

use berth_control_plane::config::{Config, Flags};
use berth_control_plane::server;
use clap::Parser;
use tokio_util::sync::CancellationToken;

// glibc malloc spent about a quarter of the leader's CPU under write load
// (fragmentation: malloc_consolidate, unlink_chunk); mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let flags = Flags::parse();
    let config = match Config::load(flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    berth_common::telemetry::init(config.log_format, "info,openraft=warn");
    if let Err(e) = berth_common::fsutil::raise_open_files_limit() {
        tracing::warn!(error = %e, "cannot raise the open-files limit; a large fleet may exhaust it");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: start async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let running = server::start(config, shutdown.clone()).await?;
    server::load::watch(shutdown.clone());
    let signal = shutdown.clone();
    tokio::spawn(async move {
        server::wait_for_signal().await;
        tracing::info!("shutting down");
        signal.cancel();
    });
    running.wait().await
}
