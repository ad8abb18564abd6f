//! `berth.v1.Admin`: cluster status and membership, the model registry.

use berth_common::Model;
use berth_common::names::validate_version;
use berth_proto::convert::version_spec_from_proto;
use berth_proto::grpc::invalid_argument;
use berth_proto::v1::admin_client::AdminClient;
use berth_proto::v1::admin_server::Admin;
use berth_proto::v1::{self as pb};
use futures::StreamExt;
use tonic::{Request, Response, Status};

use super::deployments::Deployments;
use super::{nodes, not_found, status, unexpected};
use crate::member::{Member, MemberError};
use crate::reconciler::autoscaler::Autoscaler;
use crate::reconciler::nodes::NodeTracker;
use crate::reconciler::replicas::Replicas;
use crate::state::{ClusterState, Command, ObjectKind, Outcome};

/// The Admin service of one member.
pub struct AdminService {
    member: Member,
    nodes: NodeTracker,
    replicas: Replicas,
    autoscaler: Autoscaler,
    signer: Option<std::sync::Arc<super::pki::Signer>>,
}

impl AdminService {
    /// Serves Admin calls through `member`; node calls through `nodes`;
    /// deployment calls wake `replicas`.
    /// `signer` is the cluster CA (None with `--insecure`: no tokens).
    pub fn new(
        member: Member,
        nodes: NodeTracker,
        autoscaler: Autoscaler,
        signer: Option<std::sync::Arc<super::pki::Signer>>,
    ) -> Self {
        Self {
            member,
            nodes,
            replicas: autoscaler.replicas().clone(),
            autoscaler,
            signer,
        }
    }

    fn deployments(&self) -> Deployments<'_> {
        Deployments {
            nodes: &self.nodes,
            replicas: &self.replicas,
            autoscaler: &self.autoscaler,
        }
    }

    fn status_response(&self, digest: bool) -> pb::ClusterStatusResponse {
        let v = self.member.view();
        let applied = self.member.state.read();
        let expiries = applied.state.security.expiries();
        // The digest and its index come from under one lock, so a reader
        // can compare members at the same index.
        let (applied_index, state_digest) = if digest {
            (
                applied.last_applied.map(|l| l.index).unwrap_or(0),
                Some(crate::raft::state_machine::state_digest(&applied.state)),
            )
        } else {
            (v.applied_index, None)
        };
        pb::ClusterStatusResponse {
            leader_id: v.leader.as_ref().map(|l| l.0),
            leader_addr: v.leader.map(|l| l.1).unwrap_or_default(),
            term: v.term,
            members: v
                .members
                .into_iter()
                .map(|(id, addr, role)| pb::Member {
                    id,
                    addr,
                    role: role.as_str().to_string(),
                    cert_expires_ms: expiries.get(format!("member {id}").as_str()).copied(),
                })
                .collect(),
            answered_by: self.member.id,
            last_log_index: v.last_log_index,
            applied_index,
            state_digest,
        }
    }

    async fn write_model(&self, command: Command) -> Result<Response<pb::Model>, Status> {
        match self.member.write(command).await.map_err(status)? {
            Outcome::Model(m) => Ok(Response::new((&m).into())),
            other => Err(unexpected(other)),
        }
    }

    /// Sets a node's admin state, then wakes the reconciler, which places
    /// around, evacuates or uses the node accordingly.
    async fn set_node_admin(
        &self,
        request: Request<pb::CordonNodeRequest>,
        admin: berth_common::NodeAdmin,
    ) -> Result<Response<pb::NodeSummary>, Status> {
        let summary = nodes::set_admin(&self.nodes, request.into_inner().name, admin).await?;
        self.replicas.wake();
        Ok(Response::new(summary))
    }

    async fn read_model(&self, name: &str, stale: bool) -> Result<pb::Model, Status> {
        self.member.read_barrier(stale).await.map_err(status)?;
        let applied = self.member.state.read();
        applied
            .state
            .models
            .get(name)
            .map(|m| model_proto(&applied.state, m))
            .ok_or_else(|| not_found(ObjectKind::Model, name))
    }
}

/// A model on the wire, with its measured load times.
fn model_proto(state: &ClusterState, m: &Model) -> pb::Model {
    let mut out: pb::Model = m.into();
    out.load_times = state
        .load_times
        .get(&m.name)
        .into_iter()
        .flatten()
        .map(|(class, t)| pb::LoadTime {
            node_class: class.clone(),
            estimate_ms: t.estimate_ms,
            max_ms: t.max_ms,
            last_ms: t.last_ms,
            samples: t.samples,
        })
        .collect();
    out
}

#[tonic::async_trait]
impl Admin for AdminService {
    #[tracing::instrument(skip_all)]
    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        if !request.get_ref().stale {
            // Best effort: when there is no leader the answer says so
            // (leader_id absent) instead of failing.
            let _ = self.member.read_barrier(false).await;
        }
        Ok(Response::new(
            self.status_response(request.get_ref().digest),
        ))
    }

    #[tracing::instrument(skip_all, fields(member = request.get_ref().id))]
    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let id = request.get_ref().id;
        let view = self.member.view();
        match view.leader {
            Some((leader, _)) if leader == self.member.id => {
                self.member.remove(id).await.map_err(status)?;
                // Its certificates stop working on every member, and the token
                // it joined with cannot bring it back.
                self.member
                    .write(Command::RevokeIdentity {
                        identity: berth_proto::pki::Identity::Member(id).to_string(),
                    })
                    .await
                    .map_err(status)?;
                Ok(Response::new(self.status_response(false)))
            }
            Some((_, addr)) => {
                let channel = self
                    .member
                    .dialer
                    .channel(&addr)
                    .map_err(|e| Status::internal(e.to_string()))?;
                AdminClient::new(channel)
                    .remove_member(pb::RemoveMemberRequest { id })
                    .await
            }
            None => Err(status(MemberError::Unavailable(
                "no leader: cannot change membership now; retry in a moment".into(),
            ))),
        }
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().name))]
    async fn create_model(
        &self,
        request: Request<pb::CreateModelRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        let req = request.into_inner();
        Model::validate_name(&req.name).map_err(|e| invalid_argument(&e))?;
        let version = version_spec_from_proto(req.version).map_err(|e| invalid_argument(&e))?;
        self.write_model(Command::CreateModel {
            name: req.name,
            version,
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().name))]
    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        let req = request.get_ref();
        Ok(Response::new(self.read_model(&req.name, req.stale).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        self.member
            .read_barrier(request.get_ref().stale)
            .await
            .map_err(status)?;
        let applied = self.member.state.read();
        Ok(Response::new(pb::ListModelsResponse {
            models: applied
                .state
                .models
                .values()
                .map(|m| model_proto(&applied.state, m))
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().name))]
    async fn delete_model(
        &self,
        request: Request<pb::DeleteModelRequest>,
    ) -> Result<Response<pb::DeleteModelResponse>, Status> {
        let name = request.into_inner().name;
        self.member
            .write(Command::DeleteModel { name })
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteModelResponse {}))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().model))]
    async fn add_model_version(
        &self,
        request: Request<pb::AddModelVersionRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        let req = request.into_inner();
        let version = version_spec_from_proto(req.version).map_err(|e| invalid_argument(&e))?;
        self.write_model(Command::AddModelVersion {
            model: req.model,
            version,
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().model))]
    async fn remove_model_version(
        &self,
        request: Request<pb::RemoveModelVersionRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        let req = request.into_inner();
        validate_version("version", &req.version).map_err(|e| invalid_argument(&e))?;
        self.write_model(Command::RemoveModelVersion {
            model: req.model,
            version: req.version,
        })
        .await
    }

    #[tracing::instrument(skip_all)]
    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        nodes::list(&self.nodes, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(deployment = %request.get_ref().name))]
    async fn create_deployment(
        &self,
        request: Request<pb::CreateDeploymentRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        self.deployments()
            .create(request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(deployment = %request.get_ref().name))]
    async fn get_deployment(
        &self,
        request: Request<pb::GetDeploymentRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        self.deployments()
            .get(request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all)]
    async fn list_deployments(
        &self,
        request: Request<pb::ListDeploymentsRequest>,
    ) -> Result<Response<pb::ListDeploymentsResponse>, Status> {
        self.deployments()
            .list(request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(deployment = %request.get_ref().name))]
    async fn scale_deployment(
        &self,
        request: Request<pb::ScaleDeploymentRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        self.deployments()
            .scale(request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(deployment = %request.get_ref().name))]
    async fn update_deployment(
        &self,
        request: Request<pb::UpdateDeploymentRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        self.deployments()
            .update(request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(deployment = %request.get_ref().name))]
    async fn rollback_deployment(
        &self,
        request: Request<pb::RollbackDeploymentRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        self.deployments()
            .rollback(request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(deployment = %request.get_ref().name))]
    async fn set_autoscale(
        &self,
        request: Request<pb::SetAutoscaleRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        self.deployments()
            .set_autoscale(request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(deployment = %request.get_ref().name))]
    async fn set_deployment_aliases(
        &self,
        request: Request<pb::SetDeploymentAliasesRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        self.deployments()
            .set_aliases(request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(deployment = %request.get_ref().name))]
    async fn delete_deployment(
        &self,
        request: Request<pb::DeleteDeploymentRequest>,
    ) -> Result<Response<pb::DeleteDeploymentResponse>, Status> {
        self.deployments().delete(request.into_inner()).await?;
        Ok(Response::new(pb::DeleteDeploymentResponse {}))
    }

    #[tracing::instrument(skip_all, fields(deployment = %request.get_ref().name))]
    async fn explain_deployment(
        &self,
        request: Request<pb::ExplainDeploymentRequest>,
    ) -> Result<Response<pb::ExplainDeploymentResponse>, Status> {
        self.deployments()
            .explain(request.into_inner())
            .await
            .map(Response::new)
    }

    type EventsStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::Event, Status>> + Send + 'static>>;

    #[tracing::instrument(skip_all)]
    async fn events(
        &self,
        request: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let req = request.into_inner();
        let log = &self.member.events;
        // Subscribe first: nothing recorded in between is missed.
        let rx = req.follow.then(|| log.subscribe());
        let first = log.recent(req.tail.unwrap_or(100) as usize);
        let to_pb = |e: crate::events::Event| pb::Event {
            at_ms: e.at_ms,
            severity: e.severity.into(),
            kind: e.kind.into(),
            object: e.object,
            message: e.message,
        };
        let first = futures::stream::iter(first.into_iter().map(move |e| Ok(to_pb(e))));
        let Some(rx) = rx else {
            return Ok(Response::new(Box::pin(first)));
        };
        let follow = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |e| {
            std::future::ready(match e {
                Ok(e) => Some(Ok(to_pb(e))),
                // A follower that fell behind skips what it missed.
                Err(_) => None,
            })
        });
        Ok(Response::new(Box::pin(first.chain(follow))))
    }

    type ReplicaLogsStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::LogChunk, Status>> + Send + 'static>,
    >;

    #[tracing::instrument(skip_all, fields(replica = %request.get_ref().id))]
    async fn replica_logs(
        &self,
        request: Request<pb::ReplicaLogsRequest>,
    ) -> Result<Response<Self::ReplicaLogsStream>, Status> {
        let stream = self.deployments().logs(request.into_inner()).await?;
        Ok(Response::new(Box::pin(stream)))
    }

    #[tracing::instrument(skip_all)]
    async fn list_cluster_replicas(
        &self,
        request: Request<pb::ListClusterReplicasRequest>,
    ) -> Result<Response<pb::ListClusterReplicasResponse>, Status> {
        self.deployments()
            .replicas(request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %request.get_ref().name))]
    async fn cordon_node(
        &self,
        request: Request<pb::CordonNodeRequest>,
    ) -> Result<Response<pb::NodeSummary>, Status> {
        self.set_node_admin(request, berth_common::NodeAdmin::Cordoned)
            .await
    }

    #[tracing::instrument(skip_all, fields(node = %request.get_ref().node, gpu = request.get_ref().gpu))]
    async fn quarantine_gpu(
        &self,
        request: Request<pb::QuarantineGpuRequest>,
    ) -> Result<Response<pb::NodeSummary>, Status> {
        nodes::quarantine_gpu(&self.nodes, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %request.get_ref().node, gpu = request.get_ref().gpu))]
    async fn release_gpu(
        &self,
        request: Request<pb::ReleaseGpuRequest>,
    ) -> Result<Response<pb::NodeSummary>, Status> {
        nodes::release_gpu(&self.nodes, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %request.get_ref().node, gpu = request.get_ref().gpu))]
    async fn simulate_gpu_fault(
        &self,
        request: Request<pb::SimulateGpuFaultRequest>,
    ) -> Result<Response<pb::Gpu>, Status> {
        nodes::simulate_fault(&self.nodes, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = %request.get_ref().name))]
    async fn drain_node(
        &self,
        request: Request<pb::CordonNodeRequest>,
    ) -> Result<Response<pb::NodeSummary>, Status> {
        self.set_node_admin(request, berth_common::NodeAdmin::Draining)
            .await
    }

    #[tracing::instrument(skip_all, fields(node = %request.get_ref().name))]
    async fn uncordon_node(
        &self,
        request: Request<pb::CordonNodeRequest>,
    ) -> Result<Response<pb::NodeSummary>, Status> {
        self.set_node_admin(request, berth_common::NodeAdmin::Active)
            .await
    }

    #[tracing::instrument(skip_all, fields(node = %request.get_ref().name))]
    async fn get_node(
        &self,
        request: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::GetNodeResponse>, Status> {
        nodes::get(&self.nodes, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(role = %request.get_ref().role))]
    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        super::pki::create_token(&self.member, self.signer.as_deref(), request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_tokens(
        &self,
        _request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        Ok(Response::new(super::pki::list_tokens(&self.member)))
    }

    #[tracing::instrument(skip_all, fields(token = %request.get_ref().id))]
    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        super::pki::revoke_token(&self.member, request.into_inner().id).await?;
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    #[tracing::instrument(skip_all, fields(node = %request.get_ref().name))]
    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let pb::RemoveNodeRequest { name, force } = request.into_inner();
        berth_common::names::validate_name("name", &name).map_err(|e| invalid_argument(&e))?;
        self.member
            .write(Command::RemoveNode {
                name: name.clone(),
                force,
            })
            .await
            .map_err(status)?;
        tracing::info!(node = %name, force, "removed a node and revoked its certificates");
        self.replicas.wake();
        Ok(Response::new(pb::RemoveNodeResponse {}))
    }
}
