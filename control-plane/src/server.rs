//! Wiring of one member process: data dir and identity, Raft, the gRPC
//! server (Admin + Raft + health + reflection), bootstrap or join, the HTTP
//! health/metrics endpoint, and ordered shutdown.
//!
//! Data dir layout: `member.toml` (id, advertised address, whether the join
//! completed), `raft.redb` (log, vote, committed index), `snapshot.bin`,
//! `tls/` (CA bundle and key, this member's certificate and key), and after
//! bootstrap `admin.conf` and `agent.token` (see `security`). With the
//! hidden `--test-disk-faults` (the fault suite only), `disk-fault` names the
//! disk fault to inject into `raft.redb` (see `raft::disk_faults`).
//!
//! A member whose Raft stops on its own (a storage error: a failed or full
//! disk) stops too, and `Running::wait` returns the error: it exits rather
//! than keep answering without a working log.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use berth_proto::grpc;
use berth_proto::v1::JoinRequest;
use berth_proto::v1::admin_server::AdminServer;
use berth_proto::v1::node_registry_server::NodeRegistryServer;
use berth_proto::v1::pki_server::PkiServer;
use berth_proto::v1::raft_client::RaftClient;
use berth_proto::v1::raft_server::RaftServer;
use berth_proto::v1::serving_server::ServingServer;
use openraft::error::Fatal;
use openraft::{BasicNode, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::Routes;
use tracing::Instrument;

use crate::api::admin::AdminService;
use crate::api::pki::PkiService;
use crate::api::raft::RaftService;
use crate::api::registry::RegistryService;
use crate::api::serving::ServingService;
use crate::config::Config;
use crate::member::{Forwarder, Member, PeerClients, Proposer, detector};
use crate::raft::disk_faults;
use crate::raft::log_store::LogStore;
use crate::raft::network::Network;
use crate::raft::state_machine::StateMachineStore;
use crate::raft::{NodeId, Raft};
use crate::reconciler::autoscaler::Autoscaler;
use crate::reconciler::nodes::NodeTracker;
use crate::reconciler::replicas::Replicas;

mod http;
pub mod load;
pub mod security;

const IDENTITY_FILE: &str = "member.toml";

/// What a member stores about itself on first start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// The member id.
    pub id: NodeId,
    /// The address peers and clients use.
    pub advertise: String,
    /// Whether this member was accepted into a cluster (bootstrap or join).
    #[serde(default)]
    pub joined: bool,
}

impl Identity {
    fn path(dir: &Path) -> PathBuf {
        dir.join(IDENTITY_FILE)
    }

    fn load(dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = Self::path(dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(
                toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
        }
    }

    fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let text = toml::to_string(self).context("encode member identity")?;
        berth_common::fsutil::write_atomic(&Self::path(dir), text.as_bytes())
            .with_context(|| format!("write {}", Self::path(dir).display()))
    }
}

/// Resolves the member's identity from the data dir and the flags; the
/// stored one wins, and a flag that contradicts it is an error.
fn resolve_identity(config: &Config, listen: SocketAddr) -> anyhow::Result<Identity> {
    let dir = &config.data_dir;
    if let Some(stored) = Identity::load(dir)? {
        if let Some(id) = config.id
            && id != stored.id
        {
            bail!(
                "--id {id} contradicts the data dir {}, which belongs to member {}: drop --id, or use another --data-dir",
                dir.display(),
                stored.id
            );
        }
        if let Some(a) = &config.advertise
            && a != &stored.advertise
        {
            bail!(
                "--advertise {a} contradicts the data dir {}, where member {} advertises {}: drop --advertise (changing a member's address needs remove and re-join)",
                dir.display(),
                stored.id,
                stored.advertise
            );
        }
        return Ok(stored);
    }
    let Some(id) = config.id else {
        bail!(
            "--id is required on the first start of a member (data dir {} is new): pick a number unique in the cluster, e.g. --id 1",
            dir.display()
        );
    };
    let advertise = match &config.advertise {
        Some(a) => a.clone(),
        None if listen.ip().is_unspecified() => bail!(
            "--advertise is required when listening on {listen}: give the address other members reach this one at"
        ),
        None => listen.to_string(),
    };
    Ok(Identity {
        id,
        advertise,
        joined: false,
    })
}

fn raft_config(config: &Config) -> anyhow::Result<openraft::Config> {
    let et = config.election_timeout.as_millis() as u64;
    let c = openraft::Config {
        cluster_name: "berth".into(),
        heartbeat_interval: config.heartbeat_interval.as_millis() as u64,
        election_timeout_min: et,
        election_timeout_max: et * 2,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
        max_in_snapshot_log_to_keep: config.snapshot_every.min(1000),
        install_snapshot_timeout: 10_000,
        ..Default::default()
    };
    c.validate().context("raft timing configuration")
}

/// A started member.
pub struct Running {
    /// The member (Raft + state).
    pub member: Member,
    /// The identity it runs as.
    pub identity: Identity,
    /// The bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// The bound HTTP address, if any.
    pub http_addr: Option<SocketAddr>,
    /// What `--bootstrap` made for people (admin credentials, agent token).
    pub bootstrapped: Option<security::Bootstrapped>,
    /// This member's TLS identity (None with `--insecure`).
    pub credentials: Option<Arc<berth_proto::tls::Credentials>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Why Raft stopped on its own, if it did (`stop_on_raft_fatal`).
    raft_fatal: Arc<Mutex<Option<String>>>,
}

impl Running {
    /// Waits for `shutdown`, then stops: gRPC first, then Raft. An error if
    /// Raft had stopped on its own (a storage error).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.shutdown.cancelled().await;
        self.tasks.close();
        // After a fatal storage error nothing is left to finish cleanly:
        // exit at once, so clients and agents move to another member (and a
        // supervisor restarts this one) instead of waiting on open streams.
        let failed = self
            .raft_fatal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some();
        let grace = if failed {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(?grace, "servers did not stop in time; stopping raft anyway");
        }
        self.member
            .raft
            .shutdown()
            .await
            .map_err(|e| anyhow::anyhow!("stop raft: {e}"))?;
        let fatal = self
            .raft_fatal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(e) = fatal {
            bail!("raft stopped: {e}");
        }
        tracing::info!(member = self.identity.id, "stopped");
        Ok(())
    }
}

/// Watches Raft: if its core stops on its own (openraft stops on any
/// storage error, e.g. a failed fsync or a full disk, and never restarts),
/// the member cannot take writes any more. It then logs why, keeps the
/// reason for `Running::wait` and cancels `shutdown`, so the process exits
/// non-zero instead of lingering half-alive.
fn stop_on_raft_fatal(
    raft: &Raft,
    id: NodeId,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> Arc<Mutex<Option<String>>> {
    let fatal = Arc::new(Mutex::new(None));
    let slot = fatal.clone();
    let mut metrics = raft.metrics();
    tasks.spawn(
        async move {
            loop {
                let stopped = match &metrics.borrow_and_update().running_state {
                    Ok(()) | Err(Fatal::Stopped) => None,
                    Err(e) => Some(e.to_string()),
                };
                if let Some(e) = stopped {
                    tracing::error!(error = %e, "raft stopped on a fatal error; this member exits");
                    *slot
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
                    shutdown.cancel();
                    return;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    changed = metrics.changed() => if changed.is_err() { return },
                }
            }
        }
        .instrument(tracing::info_span!("raft_watch", member = id)),
    );
    fatal
}

/// Starts a member and returns once it serves and has bootstrapped or joined.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create data dir {}", config.data_dir.display()))?;
    let mut identity = resolve_identity(&config, config.listen)?;
    let log_path = config.data_dir.join("raft.redb");
    let log = if config.test_disk_faults {
        let control = config.data_dir.join(disk_faults::CONTROL_FILE);
        tracing::warn!(control = %control.display(), "--test-disk-faults: the raft log goes through the disk-fault backend (for the fault suite only)");
        LogStore::open_with_disk_faults(&log_path, &control)
    } else {
        LogStore::open(&log_path)
    }
    .with_context(|| format!("open raft log in {}", config.data_dir.display()))?;
    let has_state = log.has_state();
    if config.bootstrap && (has_state || identity.joined) {
        bail!(
            "--bootstrap refused: data dir {} already holds a cluster (member {}); restart without --bootstrap to rejoin it, or give an empty --data-dir to start a new cluster",
            config.data_dir.display(),
            identity.id
        );
    }
    if !config.bootstrap && config.join.is_empty() && !has_state {
        bail!(
            "data dir {} holds no cluster: start the first member with --bootstrap, or add this one to a running cluster with --join ADDR",
            config.data_dir.display()
        );
    }
    let sm = StateMachineStore::open(&config.data_dir)
        .with_context(|| format!("load snapshot in {}", config.data_dir.display()))?;
    let state = sm.view();
    let events = sm.events();
    let security = security::prepare(&config, &identity, state.clone()).await?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("bind gRPC address {}", config.listen))?;
    let grpc_addr = listener.local_addr().context("read bound address")?;
    identity.save(&config.data_dir)?;

    let timing = raft_config(&config)?;
    let lease = Duration::from_millis(timing.election_timeout_max);
    let network = Network::new(security.dialer.clone());
    let raft = Raft::new(identity.id, Arc::new(timing), network, log, sm)
        .await
        .context("start raft")?;
    let tasks = TaskTracker::new();
    let raft_fatal = stop_on_raft_fatal(&raft, identity.id, &tasks, shutdown.clone());
    let peers = PeerClients::new(security.dialer.clone());
    let member = Member {
        id: identity.id,
        raft: raft.clone(),
        state,
        request_timeout: config.request_timeout,
        membership_lock: Arc::default(),
        peers: peers.clone(),
        proposer: Proposer::start(raft.clone(), &tasks, shutdown.clone()),
        forwarder: Forwarder::start(peers, &tasks, shutdown.clone()),
        contact: Default::default(),
        events,
        dialer: security.dialer.clone(),
    };
    // The authorization layer catches up through it before refusing a token.
    let _ = security.member.set(member.clone());
    detector::start(
        member.clone(),
        lease,
        config.heartbeat_interval,
        &tasks,
        shutdown.clone(),
    );

    let nodes = NodeTracker::new(member.clone(), config.node_grace);
    nodes.start(&tasks, shutdown.clone());
    let replicas = Replicas::new(member.clone(), nodes.clone(), config.progress_deadline);
    replicas.start(&tasks, shutdown.clone());
    let autoscaler = Autoscaler::new(nodes.clone(), replicas.clone());
    autoscaler.start(&tasks, shutdown.clone());
    let mut routes = Routes::new(AdminServer::new(AdminService::new(
        member.clone(),
        nodes.clone(),
        autoscaler.clone(),
        security.signer.clone(),
    )))
    .add_service(ServingServer::new(ServingService::new(
        nodes.clone(),
        autoscaler,
        shutdown.clone(),
    )))
    .add_service(NodeRegistryServer::new(RegistryService::new(
        nodes.clone(),
        shutdown.clone(),
    )))
    .add_service(
        RaftServer::new(RaftService::new(member.clone(), shutdown.clone()))
            .max_decoding_message_size(grpc::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(grpc::MAX_MESSAGE_BYTES),
    );
    let mut services = vec![
        "berth.v1.Admin",
        "berth.v1.NodeRegistry",
        "berth.v1.Raft",
        "berth.v1.Serving",
    ];
    if let Some(signer) = &security.signer {
        routes = routes.add_service(PkiServer::new(PkiService::new(
            member.clone(),
            signer.clone(),
        )));
        services.push("berth.v1.Pki");
    }
    let stop = shutdown.clone();
    let server_security = security.server.clone();
    tasks.spawn(async move {
        if let Err(e) = grpc::serve(
            listener,
            routes,
            &services,
            &server_security,
            stop.clone().cancelled_owned(),
        )
        .await
        {
            tracing::error!(error = %e, "gRPC server failed; stopping");
            stop.cancel();
        }
    });
    tracing::info!(member = identity.id, addr = %grpc_addr, advertise = %identity.advertise, "serving gRPC");

    let mut bootstrapped = None;
    if config.bootstrap {
        let nodes = BTreeMap::from([(identity.id, BasicNode::new(identity.advertise.clone()))]);
        raft.initialize(nodes)
            .await
            .context("bootstrap the cluster")?;
        tracing::info!(member = identity.id, "bootstrapped a new cluster");
        identity.joined = true;
        identity.save(&config.data_dir)?;
        bootstrapped =
            security::after_bootstrap(&member, &security, &config.data_dir, &identity.advertise)
                .await?;
    } else if !config.join.is_empty() && !identity.joined {
        if let Err(e) = join(&config, &identity, &security.dialer).await {
            shutdown.cancel();
            let _ = raft.shutdown().await;
            return Err(e);
        }
        identity.joined = true;
        identity.save(&config.data_dir)?;
    }

    security::cut_revoked(member.state.clone(), &security, &tasks, shutdown.clone());
    security::keep_renewed(
        &member,
        &security,
        &config.data_dir,
        &identity,
        &tasks,
        shutdown.clone(),
    );
    let http_addr = match config.http {
        Some(addr) => Some(
            http::serve(
                addr,
                member.clone(),
                nodes,
                security.credentials.clone(),
                &tasks,
                shutdown.clone(),
            )
            .await?,
        ),
        None => None,
    };
    Ok(Running {
        member,
        identity,
        grpc_addr,
        http_addr,
        bootstrapped,
        credentials: security.credentials,
        shutdown,
        tasks,
        raft_fatal,
    })
}

/// Asks the cluster, through any of `config.join`, to add this member.
async fn join(config: &Config, identity: &Identity, dialer: &grpc::Dialer) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + config.join_timeout;
    let mut last_error = String::new();
    loop {
        for addr in &config.join {
            let channel = dialer.channel(addr)?;
            let mut req = tonic::Request::new(JoinRequest {
                id: identity.id,
                addr: identity.advertise.clone(),
            });
            req.set_timeout(Duration::from_secs(60));
            match RaftClient::new(channel).join(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    tracing::info!(member = identity.id, leader = r.leader_id, voters = ?r.voters, "joined the cluster");
                    return Ok(());
                }
                Err(s) if grpc::is_refusal(&s) => {
                    bail!("join through {addr} refused: {}", s.message())
                }
                Err(s) => last_error = format!("{addr}: {}", grpc::describe(&s)),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "could not join the cluster through {} within {:?}: nothing answered ({last_error}); check the address and that a member runs there (a member started with --insecure cannot join a secure cluster)",
                config.join.join(","),
                config.join_timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
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
