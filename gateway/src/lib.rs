//! `berth-gateway`: one OpenAI-compatible endpoint over the ready replicas
//! of a Berth cluster. It learns the endpoints from the control plane's
//! watch stream (`watch`), keeps the routing table and each replica's load
//! (`table`), and forwards, retries and streams requests (`proxy`). It
//! holds no state that matters: run one or many.

pub mod config;
pub mod proxy;
pub mod table;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::proxy::Gateway;
use crate::table::{Limits, Table};
use crate::watch::Link;

/// A started gateway.
#[derive(Debug)]
pub struct Running {
    /// The bound HTTP address.
    pub addr: SocketAddr,
    tasks: TaskTracker,
}

impl Running {
    /// Waits until the gateway stopped (after the shutdown token fired).
    pub async fn wait(self) {
        self.tasks.wait().await;
    }
}

/// Binds the HTTP address, starts watching the control plane and serves
/// until `shutdown`.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let (dialer, servers) = watch::dialer(&config)?;
    anyhow::ensure!(
        !servers.is_empty(),
        "no control-plane member to watch: give --control ADDRS"
    );
    let table = Arc::new(Table::new(Limits {
        max_inflight: config.max_inflight_per_replica,
        queue_size: config.queue_size,
        queue_timeout: config.queue_timeout,
        eject_after: config.eject_after,
        eject_for: config.eject_for,
        retry_budget: config.retry_budget,
        cold_start_timeout: config.cold_start_timeout,
    }));
    let link = Arc::new(Link::default());
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("bind {} (is the port in use? pick --listen)", config.listen))?;
    let addr = listener.local_addr().context("read the bound address")?;
    let tasks = TaskTracker::new();
    tasks.spawn(watch::report(
        dialer.clone(),
        servers.clone(),
        format!("{}-{:08x}", config.name, fastrand::u32(..)),
        table.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(watch::run(
        dialer,
        servers.clone(),
        config.name.clone(),
        table.clone(),
        link.clone(),
        shutdown.clone(),
    ));
    let app = Arc::new(Gateway::new(&config, table, link)).router();
    let stop = shutdown.clone();
    tasks.spawn(async move {
        // No Nagle: a streamed chunk goes out at once, not after the
        // client's delayed acknowledgement of the one before.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY");
            }
        });
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the HTTP server failed");
        }
    });
    tasks.close();
    tracing::info!(%addr, control = ?servers, "serving the OpenAI-compatible API");
    Ok(Running { addr, tasks })
}
