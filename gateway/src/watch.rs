//! Keeps the routing table in step with the control plane: watches the
//! ready endpoints on one member after another until one answers, applies
//! the snapshot and the changes, and watches again when the stream ends.
//! While no member answers, the table keeps what it last knew, so requests
//! go on being served when the control plane is away.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use berth_proto::grpc::{self, Dialer};
use berth_proto::tls::{ClientFile, Trust};
use berth_proto::v1 as pb;
use berth_proto::v1::serving_client::ServingClient;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ControlAccess};
use crate::table::Table;

/// What the gateway knows about its link to the control plane.
#[derive(Debug, Default)]
pub struct Link {
    connected: AtomicBool,
    synced: AtomicBool,
    leader: AtomicU64,
    last_update: Mutex<Option<Instant>>,
}

impl Link {
    /// Whether a watch stream is open now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Whether a snapshot ever arrived (the table means something).
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// The member that produced the last update.
    pub fn leader(&self) -> u64 {
        self.leader.load(Ordering::Relaxed)
    }

    /// How long ago the last update arrived.
    pub fn since_update(&self) -> Option<Duration> {
        match self.last_update.lock() {
            Ok(t) => t.map(|t| t.elapsed()),
            Err(_) => None,
        }
    }

    fn updated(&self, leader: u64) {
        self.synced.store(true, Ordering::Relaxed);
        self.leader.store(leader, Ordering::Relaxed);
        if let Ok(mut t) = self.last_update.lock() {
            *t = Some(Instant::now());
        }
    }
}

/// The dialer and member addresses for `config`'s credentials.
pub fn dialer(config: &Config) -> anyhow::Result<(Dialer, Vec<String>)> {
    match &config.access {
        ControlAccess::Insecure => Ok((Dialer::Insecure, config.control.clone())),
        ControlAccess::Token(token) => {
            let dialer = Dialer::tls(
                Trust::pinned(&token.ca_fingerprint),
                None,
                Some(token.reveal()),
            )?;
            Ok((dialer, config.control.clone()))
        }
        ControlAccess::Credentials(path) => {
            let file = ClientFile::load(path)?;
            let token = file.token.clone().with_context(|| {
                format!(
                    "{}: the file has no token; add one made with `berth token create --role gateway`",
                    path.display()
                )
            })?;
            let trust = Trust::from_pem(&file.ca_pem, &format!("{} ca_pem", path.display()))?;
            let dialer = Dialer::tls(trust, None, Some(berth_proto::pki::Secret::new(token)))?;
            let servers = if config.control.is_empty() {
                file.servers
            } else {
                config.control.clone()
            };
            Ok((dialer, servers))
        }
    }
}

/// Watches until `shutdown`, trying `servers` in turn.
pub async fn run(
    dialer: Dialer,
    servers: Vec<String>,
    name: String,
    table: Arc<Table>,
    link: Arc<Link>,
    shutdown: CancellationToken,
) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(200);
    const MAX_BACKOFF: Duration = Duration::from_secs(2);
    let mut backoff = FIRST_BACKOFF;
    for addr in servers.iter().cycle() {
        let watched = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = watch_once(&dialer, addr, &name, &table, &link) => r,
        };
        link.connected.store(false, Ordering::Relaxed);
        match watched {
            Ok(true) => {
                backoff = FIRST_BACKOFF;
                tracing::info!(member = %addr, "the endpoint watch ended; watching again");
            }
            Ok(false) => {}
            Err(status) if grpc::is_pin_mismatch(&status) => {
                tracing::error!(member = %addr, "{}: the member's CA is not the one the gateway token pins (a token from another cluster?)", grpc::describe(&status));
            }
            Err(status) => {
                tracing::warn!(member = %addr, error = %grpc::describe(&status), routing_from_last_known = link.synced(), "cannot watch the endpoints here; trying the next member");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Reports this gateway's load per deployment every second, for the
/// autoscaler: to the member that took the last report, else the next.
/// Reports are best effort: a lost one is replaced by the next.
pub async fn report(
    dialer: Dialer,
    servers: Vec<String>,
    instance: String,
    table: Arc<Table>,
    shutdown: CancellationToken,
) {
    let mut at = 0usize;
    let mut failing_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(crate::config::REPORT_EVERY) => {}
            _ = table.cold_request.notified() => {}
        }
        let report = pb::LoadReport {
            gateway: instance.clone(),
            deployments: table.report(),
        };
        let Some(addr) = servers.get(at % servers.len().max(1)) else {
            return;
        };
        let sent = match dialer.channel(addr) {
            Ok(channel) => ServingClient::new(channel)
                .report_load(report)
                .await
                .map(|_| ()),
            Err(e) => Err(tonic::Status::internal(e.to_string())),
        };
        match sent {
            Ok(()) => failing_since = None,
            Err(status) => {
                at += 1;
                let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                // Once per outage, not once a second.
                if since.elapsed() < crate::config::REPORT_EVERY {
                    tracing::warn!(member = %addr, error = %grpc::describe(&status), "cannot report load here; trying the next member (the autoscaler holds while no report arrives)");
                }
            }
        }
    }
}

/// One watch on one member; `Ok(true)` when it delivered a snapshot.
async fn watch_once(
    dialer: &Dialer,
    addr: &str,
    name: &str,
    table: &Table,
    link: &Link,
) -> Result<bool, tonic::Status> {
    let channel = dialer
        .channel(addr)
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let mut stream = ServingClient::new(channel)
        .watch_endpoints(pb::WatchEndpointsRequest {
            gateway: name.to_string(),
        })
        .await?
        .into_inner();
    link.connected.store(true, Ordering::Relaxed);
    let mut known: BTreeMap<String, pb::Endpoint> = BTreeMap::new();
    let mut routes: Vec<pb::Route> = Vec::new();
    let mut synced = false;
    loop {
        let update = match stream.message().await {
            Ok(Some(u)) => u,
            Ok(None) => return Ok(synced),
            Err(status) if synced => {
                tracing::info!(member = %addr, reason = %grpc::describe(&status), "the endpoint watch ended");
                return Ok(true);
            }
            Err(status) => return Err(status),
        };
        if update.snapshot {
            known.clear();
            synced = true;
            tracing::info!(member = %addr, leader = update.leader_id, term = update.term, endpoints = update.upsert.len(), "endpoint snapshot");
        } else if !synced {
            continue;
        }
        for id in &update.remove {
            known.remove(id);
        }
        for e in update.upsert {
            known.insert(e.replica.clone(), e);
        }
        if update.routes_present {
            routes = update.routes;
        }
        table.replace(&known, &routes);
        link.updated(update.leader_id);
    }
}
