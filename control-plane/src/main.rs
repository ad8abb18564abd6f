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
    berth_proto::tls::install_crypto_provider();
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
    if let Some(b) = &running.bootstrapped {
        print_join_commands(b, &running.identity.advertise);
    }
    server::load::watch(shutdown.clone());
    let signal = shutdown.clone();
    tokio::spawn(async move {
        server::wait_for_signal().await;
        tracing::info!("shutting down");
        signal.cancel();
    });
    running.wait().await
}

/// What an operator needs after bootstrap. The tokens stay in their 0600
/// files: this output often ends up in a log.
fn print_join_commands(b: &server::security::Bootstrapped, advertise: &str) {
    let conf = std::path::absolute(&b.admin_conf).unwrap_or_else(|_| b.admin_conf.clone());
    let agent = std::path::absolute(&b.agent_token).unwrap_or_else(|_| b.agent_token.clone());
    let lines = [
        format!(
            "Berth cluster bootstrapped. CA fingerprint (sha256): {}",
            b.ca_fingerprint
        ),
        String::new(),
        format!("Admin credentials for the berth CLI: {}", conf.display()),
        format!(
            "  berth config import {}      # then: berth cluster status",
            conf.display()
        ),
        String::new(),
        format!(
            "Join a GPU machine (the agent token in {} works for 24 h):",
            agent.display()
        ),
        format!(
            "  berth-agent --control {advertise} --token \"$(cat {})\"",
            agent.display()
        ),
        String::new(),
        "Add a control-plane member:".to_string(),
        "  berth token create --role member --uses 1".to_string(),
        format!("  berth-control --id 2 --join {advertise} --token TOKEN --data-dir DIR"),
    ];
    println!("{}", lines.join("\n"));
}
