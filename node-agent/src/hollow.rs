//! Hollow agents, for `berth bench` only (as Kubernetes' kubemark does):
//! the real registration and heartbeat loop and the real Agent service,
//! over a replica runtime that records each start instead of spawning a
//! process, many agents in one process. Starting thousands of real
//! processes would measure the machine, not Berth.
//!
//! Everything a hollow agent registers says so: node names start with
//! `hollow-`, the label `berth.dev/hollow=true`, the GPU source ("…,
//! hollow agent of berth bench"), host name, OS and cgroups. No flag of
//! `berth-agent` starts one.
//!
//! Agents share listeners and control-plane connections (a few hundred
//! sockets for 10,000 agents, within the usual open-file limits): a shared
//! listener routes each Agent call by the node the control plane names in
//! its metadata (`berth_proto::grpc::NODE_KEY`).
//!
//! With `FleetOptions::tls` each agent instead holds its own node
//! certificate, minted from the cluster CA the bench was handed, and its
//! own mTLS connection to each member, like a real agent; its Agent
//! listener stays plaintext, so such a fleet measures registration and
//! heartbeats, not placement (the control plane cannot start replicas on it).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_common::{GpuDevice, Labels, ReplicaPhase, ReplicaSpec, ValidationError};
use berth_proto::grpc;
use berth_proto::v1::agent_server::{Agent, AgentServer};
use berth_proto::v1::{self as pb};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::Routes;
use tonic::{Request, Response, Status as GrpcStatus};

use crate::api::AgentService;
use crate::inventory::{Inventory, SharedInventory};
use crate::registration::{Clients, Counters, Registration, new_instance_id};
use crate::supervisor::replica::{Desired, Record, Status};
use crate::supervisor::{Replicas, SupervisorError};

/// A node certificate for hollow agent `name`, signed with `ca` directly
/// (the bench holds the CA key of a local cluster; nothing is recorded).
fn hollow_dialer(ca: &berth_proto::pki::Ca, name: &str) -> anyhow::Result<grpc::Dialer> {
    let request = berth_proto::pki::new_key_and_csr()?;
    let issued = ca.sign_csr(
        &request.csr_der,
        &berth_proto::pki::Identity::Node(name.to_string()),
        &[],
        Duration::from_secs(24 * 3600),
        std::time::SystemTime::now(),
    )?;
    let credentials = berth_proto::tls::Credentials::from_pem(
        ca.cert_pem(),
        &format!("{}{}", issued.cert_pem, ca.cert_pem()),
        &request.key_pem,
        name,
    )?;
    Ok(grpc::Dialer::with_credentials(credentials)?)
}

/// The label every hollow node carries.
pub const HOLLOW_LABEL: &str = "berth.dev/hollow";

/// What a fleet of hollow agents looks like.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Control-plane members.
    pub control: Vec<String>,
    /// How many agents.
    pub nodes: usize,
    /// Each node's simulated GPUs, as for `--simulate-gpus` (`8xH100-80GB`).
    pub gpus: String,
    /// Each node's CPUs.
    pub cpus: u32,
    /// Each node's memory, MiB.
    pub memory_mib: u64,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Agents behind one listening socket.
    pub agents_per_listener: usize,
    /// Agents sharing one connection to each control-plane member.
    pub agents_per_connection: usize,
    /// Agents started per second (a fleet comes up over time, not in one
    /// instant; 0 starts them all at once).
    pub start_rate: usize,
    /// The cluster CA (with its key): each agent gets its own node
    /// certificate and connections; None: plaintext, shared connections.
    pub tls: Option<Arc<berth_proto::pki::Ca>>,
}

/// When each replica's first start reached a hollow agent.
#[derive(Debug, Default)]
pub struct StartLog {
    first: Mutex<HashMap<String, Instant>>,
}

impl StartLog {
    fn record(&self, id: &str) {
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        first.entry(id.to_string()).or_insert_with(Instant::now);
    }

    /// How many replicas were started.
    pub fn len(&self) -> usize {
        self.first.lock().map_or(0, |f| f.len())
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every replica started, with when its first start came.
    pub fn snapshot(&self) -> Vec<(String, Instant)> {
        self.first
            .lock()
            .map(|f| f.iter().map(|(id, at)| (id.clone(), *at)).collect())
            .unwrap_or_default()
    }

    /// When the latest first start came.
    pub fn last(&self) -> Option<Instant> {
        self.first.lock().ok()?.values().max().copied()
    }
}

/// Hollow agents running in this process.
pub struct Fleet {
    /// The nodes' names.
    pub nodes: Vec<String>,
    /// Every start the agents received.
    pub starts: Arc<StartLog>,
    counters: Vec<Arc<Counters>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Fleet {
    /// Starts `options.nodes` hollow agents, registering with `options.control`.
    pub async fn start(options: &FleetOptions) -> anyhow::Result<Fleet> {
        anyhow::ensure!(options.nodes > 0, "a fleet needs at least one node");
        anyhow::ensure!(
            !options.control.is_empty(),
            "hollow agents need a control-plane address"
        );
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let starts = Arc::new(StartLog::default());
        let width = options.nodes.to_string().len().max(4);
        let nodes: Vec<String> = (0..options.nodes)
            .map(|i| format!("hollow-{i:0width$}"))
            .collect();
        let per_listener = options.agents_per_listener.max(1);
        let per_connection = options.agents_per_connection.max(1);
        let mut counters = Vec::with_capacity(nodes.len());
        let mut clients: Clients = Clients::default();
        for (group, names) in nodes.chunks(per_listener).enumerate() {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?.to_string();
            let mut router = Router::default();
            for (i, name) in names.iter().enumerate() {
                let index = group * per_listener + i;
                let inventory = SharedInventory::new(
                    Inventory::hollow(name, &options.gpus, options.cpus, options.memory_mib)
                        .map_err(|e| anyhow::anyhow!("{e}"))?,
                );
                let replicas: Arc<dyn Replicas> = Arc::new(HollowReplicas {
                    devices: inventory.registration().gpus.clone(),
                    node: name.clone(),
                    replicas: Mutex::default(),
                    changed: Arc::default(),
                    starts: starts.clone(),
                    next_port: AtomicU16::new(10_000),
                });
                router.agents.insert(
                    name.clone(),
                    AgentService::new(name, replicas.clone(), inventory.clone(), shutdown.clone()),
                );
                let dialer = match &options.tls {
                    Some(ca) => hollow_dialer(ca, name)?,
                    None => grpc::Dialer::Insecure,
                };
                if options.tls.is_some() || index.is_multiple_of(per_connection) {
                    clients = Clients::default();
                }
                let c = Arc::new(Counters::default());
                counters.push(c.clone());
                let registration = Registration {
                    control: options.control.clone(),
                    node: name.clone(),
                    addr: addr.clone(),
                    labels: Labels::from([(HOLLOW_LABEL.to_string(), "true".to_string())]),
                    instance: new_instance_id(),
                    interval: options.heartbeat,
                    inventory,
                    supervisor: replicas,
                    counters: c,
                    clients: clients.clone(),
                    dialer,
                };
                let delay = if options.start_rate == 0 {
                    Duration::ZERO
                } else {
                    Duration::from_secs_f64(index as f64 / options.start_rate as f64)
                };
                let stop = shutdown.clone();
                tasks.spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    registration.run(stop).await;
                });
            }
            let stop = shutdown.clone();
            tasks.spawn(async move {
                let routes = Routes::new(AgentServer::new(router));
                if let Err(e) = grpc::serve(
                    listener,
                    routes,
                    &["berth.v1.Agent"],
                    &grpc::ServerSecurity::Insecure,
                    stop.clone().cancelled_owned(),
                )
                .await
                {
                    tracing::error!(error = %e, "a hollow agents' listener failed");
                }
            });
        }
        Ok(Fleet {
            nodes,
            starts,
            counters,
            shutdown,
            tasks,
        })
    }

    /// How many agents had a heartbeat accepted.
    pub fn heartbeating(&self) -> usize {
        self.counters
            .iter()
            .filter(|c| c.heartbeats.load(Ordering::Relaxed) > 0)
            .count()
    }

    /// How many agents are registered with the current leader.
    pub fn registered(&self) -> usize {
        self.counters
            .iter()
            .filter(|c| c.registered.load(Ordering::Relaxed))
            .count()
    }

    /// Heartbeats the leader accepted, over all agents.
    pub fn heartbeats(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.heartbeats.load(Ordering::Relaxed))
            .sum()
    }

    /// Stops every agent (their nodes go down once the grace runs out).
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Routes each Agent call to the hollow agent of the node it names.
#[derive(Default)]
struct Router {
    agents: HashMap<String, AgentService>,
}

impl Router {
    fn route<T>(&self, request: &Request<T>) -> Result<&AgentService, GrpcStatus> {
        let node = grpc::node_of(request).ok_or_else(|| {
            GrpcStatus::invalid_argument(format!(
                "metadata {:?} is missing: hollow agents share a listener and need the node's name",
                grpc::NODE_KEY
            ))
        })?;
        self.agents.get(node).ok_or_else(|| {
            GrpcStatus::not_found(format!("no hollow agent of node {node:?} listens here"))
        })
    }
}

#[tonic::async_trait]
impl Agent for Router {
    async fn start_replica(
        &self,
        request: Request<pb::StartReplicaRequest>,
    ) -> Result<Response<pb::ReplicaStatus>, GrpcStatus> {
        self.route(&request)?.start_replica(request).await
    }

    async fn stop_replica(
        &self,
        request: Request<pb::StopReplicaRequest>,
    ) -> Result<Response<pb::ReplicaStatus>, GrpcStatus> {
        self.route(&request)?.stop_replica(request).await
    }

    async fn resize_replica(
        &self,
        request: Request<pb::ResizeReplicaRequest>,
    ) -> Result<Response<pb::ReplicaStatus>, GrpcStatus> {
        self.route(&request)?.resize_replica(request).await
    }

    async fn list_replicas(
        &self,
        request: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, GrpcStatus> {
        self.route(&request)?.list_replicas(request).await
    }

    async fn get_inventory(
        &self,
        request: Request<pb::GetInventoryRequest>,
    ) -> Result<Response<pb::Inventory>, GrpcStatus> {
        self.route(&request)?.get_inventory(request).await
    }

    async fn simulate_gpu_fault(
        &self,
        request: Request<pb::SimulateGpuFaultRequest>,
    ) -> Result<Response<pb::Gpu>, GrpcStatus> {
        self.route(&request)?.simulate_gpu_fault(request).await
    }

    type StreamLogsStream = <AgentService as Agent>::StreamLogsStream;

    async fn stream_logs(
        &self,
        request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, GrpcStatus> {
        self.route(&request)?.stream_logs(request).await
    }
}

/// The replica runtime of a hollow agent: a start is recorded and reported
/// running at once; no process, no files.
struct HollowReplicas {
    node: String,
    devices: Vec<GpuDevice>,
    replicas: Mutex<BTreeMap<String, Status>>,
    changed: Arc<tokio::sync::Notify>,
    starts: Arc<StartLog>,
    next_port: AtomicU16,
}

impl HollowReplicas {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Status>> {
        self.replicas.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn hollow_not_found(id: &str) -> SupervisorError {
    SupervisorError::NotFound(format!("replica {id:?} is not on this hollow node"))
}

#[tonic::async_trait]
impl Replicas for HollowReplicas {
    async fn start(&self, spec: ReplicaSpec, placed_at: u64) -> Result<Status, SupervisorError> {
        spec.validate()?;
        if let Some(bad) = spec
            .gpus
            .iter()
            .find(|g| **g as usize >= self.devices.len())
        {
            return Err(ValidationError::new(
                "gpus",
                bad,
                format!("hollow node {} has {} GPUs", self.node, self.devices.len()),
            )
            .into());
        }
        let mut map = self.map();
        if let Some(have) = map.get(&spec.id) {
            let g = have.record.spec.generation;
            if spec.generation < g {
                return Err(SupervisorError::Precondition(format!(
                    "generation {} of replica {} is stale: it runs generation {g}",
                    spec.generation, spec.id
                )));
            }
            if spec.generation == g {
                return Ok(have.clone());
            }
        }
        let gpu_uuids = spec
            .gpus
            .iter()
            .filter_map(|i| self.devices.get(*i as usize))
            .map(|d| d.uuid.clone())
            .collect();
        let port = if spec.port == 0 {
            self.next_port.fetch_add(1, Ordering::Relaxed)
        } else {
            spec.port
        };
        let status = Status {
            ready_after_ms: None,
            record: Record {
                spec,
                port,
                desired: Desired::Running,
                restarts: 0,
                stopped_at_ms: None,
                placed_at,
            },
            phase: ReplicaPhase::Running,
            reason: "hollow: the start was recorded; no process runs".into(),
            server: None,
            last_exit: None,
            started_at_ms: crate::supervisor::shim::now_ms(),
            limits_enforced: false,
            gpu_uuids,
            engine: None,
        };
        self.starts.record(&status.record.spec.id);
        map.insert(status.record.spec.id.clone(), status.clone());
        self.changed.notify_one();
        Ok(status)
    }

    async fn stop(
        &self,
        id: &str,
        generation: u64,
        _grace: Duration,
    ) -> Result<Status, SupervisorError> {
        let mut map = self.map();
        let have = map.get(id).ok_or_else(|| hollow_not_found(id))?;
        if generation > 0 && generation < have.record.spec.generation {
            return Err(SupervisorError::Precondition(format!(
                "generation {generation} of replica {id} is stale: it runs generation {}",
                have.record.spec.generation
            )));
        }
        let mut status = map.remove(id).ok_or_else(|| hollow_not_found(id))?;
        status.record.desired = Desired::Stopped;
        status.phase = ReplicaPhase::Stopped;
        self.changed.notify_one();
        Ok(status)
    }

    async fn resize(
        &self,
        id: &str,
        generation: u64,
        cpu_milli: u32,
        memory_mib: u64,
        gpus: Option<(Vec<u32>, u64, u32)>,
    ) -> Result<Status, SupervisorError> {
        let mut map = self.map();
        let have = map.get_mut(id).ok_or_else(|| hollow_not_found(id))?;
        if generation < have.record.spec.generation {
            return Err(SupervisorError::Precondition(format!(
                "generation {generation} of replica {id} is stale"
            )));
        }
        let spec = &mut have.record.spec;
        spec.generation = generation;
        spec.resources.cpu_milli = cpu_milli;
        spec.resources.memory_mib = memory_mib;
        if let Some((indices, memory, milli)) = gpus {
            spec.resources.gpus = indices.len() as u32;
            spec.gpus = indices;
            spec.resources.gpu_memory_mib = memory;
            spec.resources.gpu_milli = milli;
        }
        Ok(have.clone())
    }

    async fn list(&self) -> Vec<Status> {
        self.map().values().cloned().collect()
    }

    async fn log_dir(&self, id: &str) -> Result<PathBuf, SupervisorError> {
        Err(SupervisorError::Precondition(format!(
            "replica {id} runs on a hollow agent of berth bench: no process, no logs"
        )))
    }

    async fn converge(&self, desired: &HashMap<String, u64>, version: u64) {
        let mut map = self.map();
        let before = map.len();
        map.retain(|id, s| desired.contains_key(id) || s.record.placed_at > version);
        if map.len() != before {
            self.changed.notify_one();
        }
    }

    fn changed(&self) -> Arc<tokio::sync::Notify> {
        self.changed.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use berth_common::{HealthProbe, Resources, Runtime};

    use super::*;

    fn hollow() -> HollowReplicas {
        let inv = Inventory::hollow("hollow-0001", "2xH100-80GB", 8, 64 * 1024).expect("spec");
        HollowReplicas {
            node: "hollow-0001".into(),
            devices: inv.devices().to_vec(),
            replicas: Mutex::default(),
            changed: Arc::default(),
            starts: Arc::default(),
            next_port: AtomicU16::new(10_000),
        }
    }

    fn spec(id: &str, generation: u64, gpu: u32) -> ReplicaSpec {
        ReplicaSpec {
            id: id.into(),
            generation,
            model: "m".into(),
            runtime: Runtime::Demo,
            source: "builtin:demo".into(),
            port: 0,
            gpus: vec![gpu],
            resources: Resources {
                gpus: 1,
                gpu_milli: 500,
                gpu_memory_mib: 1024,
                cpu_milli: 100,
                memory_mib: 128,
            },
            env: Default::default(),
            health: HealthProbe::Tcp,
        }
    }

    #[tokio::test]
    async fn starts_are_recorded_once_and_follow_the_generation_rules() {
        let h = hollow();
        let s = h.start(spec("r-1", 1, 0), 5).await.expect("start");
        assert_eq!(s.phase, ReplicaPhase::Running);
        assert!(s.server.is_none(), "no process runs");
        assert!(s.reason.contains("hollow"), "{}", s.reason);
        assert_eq!(s.gpu_uuids, ["GPU-simulated-hollow-0001-0"]);
        // The same generation again is the same replica; an older one is refused.
        h.start(spec("r-1", 1, 0), 5).await.expect("idempotent");
        h.start(spec("r-1", 3, 1), 6)
            .await
            .expect("newer generation");
        let stale = h.start(spec("r-1", 2, 0), 6).await.expect_err("stale");
        assert!(matches!(stale, SupervisorError::Precondition(_)), "{stale}");
        assert_eq!(h.starts.len(), 1, "the first start of r-1 is what counts");
        let bad = h.start(spec("r-2", 1, 2), 6).await.expect_err("GPU 2 of 2");
        assert!(
            matches!(bad, SupervisorError::Invalid(ref e) if e.field == "gpus"),
            "{bad}"
        );
        assert!(
            h.log_dir("r-1").await.is_err(),
            "hollow replicas have no logs"
        );

        let stopped = h.stop("r-1", 0, Duration::ZERO).await.expect("stop");
        assert_eq!(stopped.phase, ReplicaPhase::Stopped);
        assert!(h.list().await.is_empty());
        assert!(matches!(
            h.stop("r-1", 0, Duration::ZERO).await,
            Err(SupervisorError::NotFound(_))
        ));
    }

    /// A member of an older version: it knows `Heartbeat` but not
    /// `HeartbeatStream`. Counts what it was asked.
    #[derive(Default, Clone)]
    struct OldMember {
        unary: Arc<AtomicU64>,
        streams: Arc<AtomicU64>,
    }

    #[tonic::async_trait]
    impl pb::node_registry_server::NodeRegistry for OldMember {
        async fn register(
            &self,
            _: tonic::Request<pb::RegisterRequest>,
        ) -> Result<tonic::Response<pb::RegisterResponse>, tonic::Status> {
            Ok(tonic::Response::new(pb::RegisterResponse {
                epoch: 1,
                state: "ready".into(),
                leader_addr: String::new(),
            }))
        }
        async fn heartbeat(
            &self,
            _: tonic::Request<pb::HeartbeatRequest>,
        ) -> Result<tonic::Response<pb::HeartbeatResponse>, tonic::Status> {
            self.unary.fetch_add(1, Ordering::Relaxed);
            Ok(tonic::Response::new(pb::HeartbeatResponse {
                registered: true,
                epoch: 1,
                desired: Vec::new(),
                state_version: 1,
            }))
        }
        type HeartbeatStreamStream =
            tokio_stream::Empty<Result<pb::HeartbeatResponse, tonic::Status>>;
        async fn heartbeat_stream(
            &self,
            _: tonic::Request<tonic::Streaming<pb::HeartbeatRequest>>,
        ) -> Result<tonic::Response<Self::HeartbeatStreamStream>, tonic::Status> {
            self.streams.fetch_add(1, Ordering::Relaxed);
            Err(tonic::Status::unimplemented("an older member"))
        }
    }

    #[tokio::test]
    async fn a_member_without_the_heartbeat_stream_gets_unary_heartbeats() {
        let member = OldMember::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let stop = CancellationToken::new();
        let routes = Routes::new(pb::node_registry_server::NodeRegistryServer::new(
            member.clone(),
        ));
        let server = tokio::spawn(grpc::serve(
            listener,
            routes,
            &["berth.v1.NodeRegistry"],
            &grpc::ServerSecurity::Insecure,
            stop.clone().cancelled_owned(),
        ));
        let fleet = Fleet::start(&FleetOptions {
            control: vec![addr],
            nodes: 1,
            gpus: "1xH100-80GB".into(),
            cpus: 8,
            memory_mib: 1024,
            heartbeat: Duration::from_millis(50),
            agents_per_listener: 1,
            agents_per_connection: 1,
            start_rate: 0,
            tls: None,
        })
        .await
        .expect("fleet");
        let deadline = Instant::now() + Duration::from_secs(30);
        while fleet.heartbeats() < 5 {
            assert!(Instant::now() < deadline, "no heartbeats were accepted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(member.unary.load(Ordering::Relaxed) >= 5);
        assert_eq!(
            member.streams.load(Ordering::Relaxed),
            1,
            "the stream is tried once, then the member gets unary calls"
        );
        drop(fleet);
        stop.cancel();
        let _ = server.await;
    }

    #[tokio::test]
    async fn converge_keeps_what_is_desired_or_placed_later() {
        let h = hollow();
        h.start(spec("a", 1, 0), 3).await.expect("a");
        h.start(spec("b", 1, 0), 3).await.expect("b");
        h.start(spec("c", 1, 1), 9).await.expect("c");
        let desired = HashMap::from([("a".to_string(), 1)]);
        h.converge(&desired, 5).await;
        let mut left: Vec<String> = h
            .list()
            .await
            .into_iter()
            .map(|s| s.record.spec.id)
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["a", "c"],
            "b was moved away; c was placed after version 5"
        );
    }
}
