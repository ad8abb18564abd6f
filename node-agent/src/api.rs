//! `berth.v1.Agent`: the gRPC face of the supervisor and the inventory.
//! Handlers turn protobuf into domain types (a bad field is
//! `InvalidArgument` naming it), call the supervisor, and map its errors to
//! status codes in one place (`status`).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::convert::replica_spec_from_proto;
use berth_proto::grpc::{self, invalid_argument};
use berth_proto::v1::agent_server::Agent;
use berth_proto::v1::{self as pb};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::inventory::SharedInventory;
use crate::supervisor::logs::{FOLLOW_POLL, Follower, tail};
use crate::supervisor::replica::Status as ReplicaState;
use crate::supervisor::shim::DEFAULT_GRACE;
use crate::supervisor::{Replicas, SupervisorError};

/// Lines of log sent first when a request does not say.
const DEFAULT_TAIL: u32 = 100;
/// The most lines of log one request may ask for.
const MAX_TAIL: u32 = 100_000;
/// The longest grace period a stop may ask for.
const MAX_GRACE_MS: u64 = 3600 * 1000;

/// The one mapping from supervisor errors to gRPC status codes.
pub fn status(e: SupervisorError) -> Status {
    match e {
        SupervisorError::Invalid(v) => invalid_argument(&v),
        SupervisorError::Precondition(m) => Status::failed_precondition(m),
        SupervisorError::NotFound(m) => Status::not_found(m),
        SupervisorError::Internal(m) => Status::internal(m),
    }
}

/// A replica's status on the wire, with its GPU memory from the ledger of
/// `inventory`.
pub fn replica_to_proto(s: &ReplicaState, inventory: &SharedInventory) -> pb::ReplicaStatus {
    let r = &s.record;
    let memory = inventory.memory_of(&r.spec);
    pb::ReplicaStatus {
        id: r.spec.id.clone(),
        generation: r.spec.generation,
        phase: s.phase.as_str().into(),
        reason: s.reason.clone(),
        pid: s.server.map_or(0, |p| p.pid),
        restarts: r.restarts,
        port: u32::from(r.port),
        gpus: r.spec.gpus.clone(),
        exit_code: s.last_exit.as_ref().and_then(|e| e.code),
        exit_signal: s.last_exit.as_ref().and_then(|e| e.signal),
        started_at_ms: s.started_at_ms,
        cpu_milli: r.spec.resources.cpu_milli,
        memory_mib: r.spec.resources.memory_mib,
        limits_enforced: s.limits_enforced,
        model: r.spec.model.clone(),
        runtime: r.spec.runtime.name().into(),
        desired: r.desired.as_str().into(),
        gpu_uuids: s.gpu_uuids.clone(),
        queue_depth: s.engine.map(|e| e.waiting),
        running_requests: s.engine.map(|e| e.running),
        kv_cache_milli: s.engine.and_then(|e| e.kv_cache_milli),
        ready_after_ms: s.ready_after_ms,
        gpu_memory_used_mib: memory.used_mib,
        gpu_memory_reserved_mib: memory.reserved_mib,
        over_gpu_memory_reservation: memory.over,
    }
}

/// The Agent service of this node.
pub struct AgentService {
    node: String,
    supervisor: Arc<dyn Replicas>,
    inventory: Arc<SharedInventory>,
    shutdown: CancellationToken,
}

impl AgentService {
    /// Serves Agent calls for `node`.
    pub fn new(
        node: &str,
        supervisor: Arc<dyn Replicas>,
        inventory: Arc<SharedInventory>,
        shutdown: CancellationToken,
    ) -> Self {
        AgentService {
            node: node.to_string(),
            supervisor,
            inventory,
            shutdown,
        }
    }

    /// Refuses a call the control plane meant for another node: its record
    /// of this address is stale (the address now belongs to this agent).
    fn check_node<T>(&self, request: &Request<T>) -> Result<(), Status> {
        match grpc::node_of(request) {
            Some(meant) if meant != self.node => Err(Status::failed_precondition(format!(
                "this agent runs node {:?}, but the call was meant for node {meant:?}: the control plane's address for {meant:?} is stale (has the node moved?)",
                self.node
            ))),
            _ => Ok(()),
        }
    }
}

type LogStream = Pin<Box<dyn Stream<Item = Result<pb::LogChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    #[tracing::instrument(skip_all, fields(replica = request.get_ref().spec.as_ref().map(|s| s.id.as_str()).unwrap_or("")))]
    async fn start_replica(
        &self,
        request: Request<pb::StartReplicaRequest>,
    ) -> Result<Response<pb::ReplicaStatus>, Status> {
        self.check_node(&request)?;
        let req = request.into_inner();
        let spec = replica_spec_from_proto(req.spec).map_err(|e| invalid_argument(&e))?;
        let s = self
            .supervisor
            .start(spec, req.placed_at)
            .await
            .map_err(status)?;
        Ok(Response::new(replica_to_proto(&s, &self.inventory)))
    }

    #[tracing::instrument(skip_all, fields(replica = %request.get_ref().id))]
    async fn stop_replica(
        &self,
        request: Request<pb::StopReplicaRequest>,
    ) -> Result<Response<pb::ReplicaStatus>, Status> {
        self.check_node(&request)?;
        let req = request.into_inner();
        if let Some(g) = req.grace_ms.filter(|g| *g > MAX_GRACE_MS) {
            return Err(Status::invalid_argument(format!(
                "grace_ms {g:?} is invalid: must be at most {MAX_GRACE_MS} (one hour)"
            )));
        }
        let grace = req.grace_ms.map_or(DEFAULT_GRACE, Duration::from_millis);
        let s = self
            .supervisor
            .stop(&req.id, req.generation, grace)
            .await
            .map_err(status)?;
        Ok(Response::new(replica_to_proto(&s, &self.inventory)))
    }

    #[tracing::instrument(skip_all, fields(replica = %request.get_ref().id))]
    async fn resize_replica(
        &self,
        request: Request<pb::ResizeReplicaRequest>,
    ) -> Result<Response<pb::ReplicaStatus>, Status> {
        self.check_node(&request)?;
        let req = request.into_inner();
        let gpus = req.gpus.map(|g| (g.indices, g.gpu_memory_mib, g.gpu_milli));
        let s = self
            .supervisor
            .resize(&req.id, req.generation, req.cpu_milli, req.memory_mib, gpus)
            .await
            .map_err(status)?;
        Ok(Response::new(replica_to_proto(&s, &self.inventory)))
    }

    async fn list_replicas(
        &self,
        request: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, Status> {
        self.check_node(&request)?;
        let replicas = self.supervisor.list().await;
        Ok(Response::new(pb::ListReplicasResponse {
            replicas: replicas
                .iter()
                .map(|r| replica_to_proto(r, &self.inventory))
                .collect(),
        }))
    }

    async fn get_inventory(
        &self,
        request: Request<pb::GetInventoryRequest>,
    ) -> Result<Response<pb::Inventory>, Status> {
        self.check_node(&request)?;
        let claims = self.supervisor.claims().await;
        Ok(Response::new(self.inventory.refresh(claims).await))
    }

    #[tracing::instrument(skip_all, fields(gpu = request.get_ref().gpu))]
    async fn simulate_gpu_fault(
        &self,
        request: Request<pb::SimulateGpuFaultRequest>,
    ) -> Result<Response<pb::Gpu>, Status> {
        self.check_node(&request)?;
        let req = request.into_inner();
        if req.node != self.node {
            return Err(Status::invalid_argument(format!(
                "node {:?} is not this agent's node {:?}",
                req.node, self.node
            )));
        }
        self.inventory
            .simulate_fault(&req)
            .map_err(Status::failed_precondition)?;
        // Read now, so the next heartbeat carries the fault.
        let claims = self.supervisor.claims().await;
        let inventory = self.inventory.refresh(claims).await;
        inventory
            .gpus
            .into_iter()
            .find(|g| g.index == req.gpu)
            .map(Response::new)
            .ok_or_else(|| Status::internal(format!("gpu {} vanished from the readings", req.gpu)))
    }

    type StreamLogsStream = LogStream;

    #[tracing::instrument(skip_all, fields(replica = %request.get_ref().id))]
    async fn stream_logs(
        &self,
        request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        self.check_node(&request)?;
        let req = request.into_inner();
        let lines = req.tail.unwrap_or(DEFAULT_TAIL);
        if lines > MAX_TAIL {
            return Err(Status::invalid_argument(format!(
                "tail {lines:?} is invalid: must be at most {MAX_TAIL} lines"
            )));
        }
        let dir = self.supervisor.log_dir(&req.id).await.map_err(status)?;
        // Start following before reading the tail, so nothing written in
        // between is lost (it may be sent twice at worst).
        let mut follower = req.follow.then(|| Follower::at_end(&dir));
        let read_dir = dir.clone();
        // Off the agent's one thread: a tail may read rotated files.
        let first = tokio::task::spawn_blocking(move || tail(&read_dir, lines as usize))
            .await
            .map_err(|e| Status::internal(format!("read the log of {}: {e}", req.id)))?
            .map_err(|e| Status::internal(format!("read the log of {}: {e}", req.id)))?;
        let (tx, rx) = mpsc::channel(16);
        if !first.is_empty() {
            let _ = tx.send(Ok(pb::LogChunk { data: first })).await;
        }
        if let Some(mut follower) = follower.take() {
            let shutdown = self.shutdown.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep(FOLLOW_POLL) => {}
                    }
                    match follower.poll() {
                        Ok(data) if data.is_empty() => {}
                        Ok(data) => {
                            if tx.send(Ok(pb::LogChunk { data })).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx
                                .send(Err(Status::internal(format!("follow the log: {e}"))))
                                .await;
                            return;
                        }
                    }
                }
            });
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
