//! The replicated state machine: `ClusterState`, the `Command`s that change
//! it and `apply`, which validates a command and either changes the state or
//! rejects the command and changes nothing.
//!
//! Pure: no I/O, no clock, no randomness. The leader stamps the time into a
//! `Request` before it is proposed, so every member computes the same state.
//! Maps are `BTreeMap` so iteration order is the same everywhere.
//!
//! The log format is forever: `Command`, `Outcome` and `Rejection` variants
//! are only appended, never renamed, removed or reordered (postcard encodes
//! variants by index); `testdata/` holds encoded fixtures that must stay readable.

use std::collections::BTreeMap;

use berth_common::gpu_health::{GpuRecord, Quarantine};
use berth_common::security::{IssuedCert, TokenRecord};
use berth_common::{
    AutoscalePolicy, Deployment, DeploymentRequest, Model, ModelVersion, ModelVersionSpec, Node,
    NodeAdmin, NodeRegistration, NodeState, Replica, ValidationError,
};
use serde::{Deserialize, Serialize};

pub mod capacity;
pub mod deployments;
pub mod events;
pub mod gpus;
pub mod legacy;
pub mod load_times;
mod nodes;
pub mod security;

pub use deployments::{DeploymentChange, PlanBind};
#[cfg(test)]
pub(crate) mod tests;

/// Everything the control plane agrees on: the model registry, the nodes,
/// the deployments and their replicas' placements. A new field here is a
/// new snapshot format (see `legacy`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Models by name.
    pub models: BTreeMap<String, Model>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Node>,
    /// Deployments by name.
    pub deployments: BTreeMap<String, Deployment>,
    /// Replicas (placements) by id.
    pub replicas: BTreeMap<String, Replica>,
    /// Bumped by every command that succeeds: agents compare the version of
    /// the desired set they hear with when their replicas were placed.
    pub version: u64,
    /// Tokens, issued certificates, revocations (snapshot format 3).
    pub security: security::SecurityState,
    /// Other names clients may use for a deployment: alias → deployment
    /// (snapshot format 4).
    pub aliases: BTreeMap<String, String>,
    /// Autoscaling policies by deployment (snapshot format 5).
    pub autoscale: BTreeMap<String, AutoscalePolicy>,
    /// Measured load times: model → node class → estimate (snapshot format 5).
    pub load_times: BTreeMap<String, BTreeMap<String, load_times::LoadTime>>,
    /// The next replica ordinal of each deleted deployment, by name
    /// (snapshot format 6): a deployment created again under a name goes on
    /// numbering where the old one stopped, so a replica id never names two
    /// replicas (a reused id would overwrite a record still holding its GPU,
    /// and agents refuse an id and generation they already stopped).
    pub retired_ordinals: BTreeMap<String, u64>,
    /// Quarantines and release baselines of GPUs, by node and GPU index
    /// (snapshot format 7); a GPU without a record was never quarantined.
    pub gpus: BTreeMap<String, BTreeMap<u32, GpuRecord>>,
}

/// A change to the cluster state, as written to the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Registers a new model with its first version.
    CreateModel {
        /// The new model's name.
        name: String,
        /// Its first version.
        version: ModelVersionSpec,
    },
    /// Removes a model and all its versions.
    DeleteModel {
        /// The model to remove.
        name: String,
    },
    /// Adds a version to an existing model.
    AddModelVersion {
        /// The model.
        model: String,
        /// The new version.
        version: ModelVersionSpec,
    },
    /// Removes one version of a model.
    RemoveModelVersion {
        /// The model.
        model: String,
        /// The version to remove.
        version: String,
    },
    /// Several independent commands in one log entry, applied in order; each
    /// has its own outcome (the leader batches concurrent writes this way,
    /// one fsync for many). A batch may not contain a batch.
    Batch(Vec<Command>),
    /// Records a node as its agent registered it (new, or updated: address,
    /// labels, inventory; a new agent instance is a new epoch). A node that
    /// was down is ready again.
    RegisterNode(NodeRegistration),
    /// A node state transition observed by the leader (heartbeats missed
    /// past the grace period, or back). Refused when the node is no longer
    /// in state `from`, or `instance` is not its current agent: a stale
    /// observation changes nothing.
    SetNodeState {
        /// The node.
        name: String,
        /// The state the observation found it in.
        from: NodeState,
        /// The new state.
        to: NodeState,
        /// The agent instance the observation was about.
        instance: String,
    },
    /// Creates a deployment and its pending replicas.
    CreateDeployment {
        /// Its name.
        name: String,
        /// What it asks for (resources left out come from the model version).
        request: DeploymentRequest,
    },
    /// Sets a deployment's replica count.
    ScaleDeployment {
        /// The deployment.
        name: String,
        /// The new count.
        replicas: u32,
    },
    /// Deletes a deployment; its replicas are stopped and removed.
    DeleteDeployment {
        /// The deployment.
        name: String,
    },
    /// Places pending replicas (the scheduler's binds), each re-validated.
    ApplyPlan(Vec<PlanBind>),
    /// Forgets a replica being removed, once its agent stopped it.
    RemoveReplica {
        /// The replica.
        id: String,
    },
    /// Replaces the replicas of a node that is down with new pending ones.
    ReplaceLostReplicas {
        /// The node.
        node: String,
    },
    /// An operator's decision about a node: cordon (no new replicas) or back.
    SetNodeAdmin {
        /// The node.
        name: String,
        /// The decision.
        admin: NodeAdmin,
    },
    /// A new revision of a deployment: another model version, other
    /// resources, other rollout limits.
    UpdateDeployment {
        /// The deployment.
        name: String,
        /// What changes.
        change: DeploymentChange,
    },
    /// A new revision with an earlier revision's spec (default: the one
    /// before the current); the replica count stays.
    RollbackDeployment {
        /// The deployment.
        name: String,
        /// The revision to go back to.
        to: Option<u64>,
    },
    /// A rollout step: adds replicas of the current revision.
    RolloutAdd {
        /// The deployment.
        name: String,
        /// How many.
        count: u32,
    },
    /// A rollout step: retires replicas of older revisions.
    RolloutRetire {
        /// The deployment.
        name: String,
        /// The replicas.
        replicas: Vec<String>,
    },
    /// Pauses a rollout whose new replicas fail; the old ones keep serving.
    PauseRollout {
        /// The deployment.
        name: String,
        /// Why, for people.
        reason: String,
    },
    /// Starts moving a replica off its draining node or quarantined GPU: a
    /// replacement is added.
    EvacuateReplica {
        /// The replica.
        id: String,
    },
    /// Stops a replica that moved off its draining node or quarantined GPU.
    FinishEvacuation {
        /// The replica.
        id: String,
    },
    /// Gives up on a placed replica that keeps failing: it is removed (its
    /// agent stops it) and a new replica takes its place in the count.
    ReplaceFailedReplica {
        /// The replica.
        id: String,
        /// Why, for people.
        reason: String,
    },
    /// Records a new token (its secret's hash only).
    CreateToken(TokenRecord),
    /// Forgets a token: it stops working at once.
    RevokeToken {
        /// The token's id.
        id: String,
    },
    /// Records a certificate the CA signed; with `token`, spends a use of
    /// that join token (refused when it has none left).
    IssueCertificate {
        /// The join token that paid for it, if any.
        token: Option<String>,
        /// The certificate.
        cert: IssuedCert,
    },
    /// Revokes every certificate of an identity (`member 3`) and blocks the
    /// tokens that paid for them from buying it another (`cluster remove`).
    RevokeIdentity {
        /// The identity, as the ledger writes it.
        identity: String,
    },
    /// Forgets a node and revokes its certificates. Refused while replicas
    /// are placed there, unless `force`: then they are replaced elsewhere.
    RemoveNode {
        /// The node.
        name: String,
        /// Remove even with replicas placed there.
        force: bool,
    },
    /// Sets the other names a deployment answers to (replacing the ones it
    /// had; none clears them).
    SetDeploymentAliases {
        /// The deployment.
        name: String,
        /// Its aliases.
        aliases: Vec<String>,
    },
    /// Sets a deployment's autoscaling policy, or with `None` turns
    /// autoscaling off. A count outside the bounds is brought within them.
    SetAutoscale {
        /// The deployment.
        name: String,
        /// The policy.
        policy: Option<AutoscalePolicy>,
    },
    /// The autoscaler's decision. Refused when stale (the count is no
    /// longer `from`) or outside the policy.
    Autoscale {
        /// The deployment.
        name: String,
        /// The count the decision was made at.
        from: u32,
        /// The new count.
        to: u32,
        /// Replicas to remove first when scaling down (the idle ones).
        prefer: Vec<String>,
        /// The decision's inputs, for people (the event says it).
        reason: String,
    },
    /// Measured load times of replicas that became ready.
    RecordLoadTimes(Vec<load_times::LoadTimeSample>),
    /// Takes a GPU out of placement (the leader from its agent's readings,
    /// or an operator); its replicas move away. Refused when it is already.
    QuarantineGpu {
        /// The node.
        node: String,
        /// The GPU's index on the node.
        gpu: u32,
        /// Why, by whom, and the faults that led to it.
        quarantine: Quarantine,
    },
    /// Returns a quarantined GPU to placement (an operator's decision).
    ReleaseGpu {
        /// The node.
        node: String,
        /// The GPU's index on the node.
        gpu: u32,
    },
}

impl Command {
    /// The command's name, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::CreateModel { .. } => "create_model",
            Command::DeleteModel { .. } => "delete_model",
            Command::AddModelVersion { .. } => "add_model_version",
            Command::RemoveModelVersion { .. } => "remove_model_version",
            Command::Batch(_) => "batch",
            Command::RegisterNode(_) => "register_node",
            Command::SetNodeState { .. } => "set_node_state",
            Command::CreateDeployment { .. } => "create_deployment",
            Command::ScaleDeployment { .. } => "scale_deployment",
            Command::DeleteDeployment { .. } => "delete_deployment",
            Command::ApplyPlan(_) => "apply_plan",
            Command::RemoveReplica { .. } => "remove_replica",
            Command::ReplaceLostReplicas { .. } => "replace_lost_replicas",
            Command::SetNodeAdmin { .. } => "set_node_admin",
            Command::UpdateDeployment { .. } => "update_deployment",
            Command::RollbackDeployment { .. } => "rollback_deployment",
            Command::RolloutAdd { .. } => "rollout_add",
            Command::RolloutRetire { .. } => "rollout_retire",
            Command::PauseRollout { .. } => "pause_rollout",
            Command::EvacuateReplica { .. } => "evacuate_replica",
            Command::FinishEvacuation { .. } => "finish_evacuation",
            Command::ReplaceFailedReplica { .. } => "replace_failed_replica",
            Command::CreateToken(_) => "create_token",
            Command::RevokeToken { .. } => "revoke_token",
            Command::IssueCertificate { .. } => "issue_certificate",
            Command::RevokeIdentity { .. } => "revoke_identity",
            Command::RemoveNode { .. } => "remove_node",
            Command::SetDeploymentAliases { .. } => "set_deployment_aliases",
            Command::SetAutoscale { .. } => "set_autoscale",
            Command::Autoscale { .. } => "autoscale",
            Command::RecordLoadTimes(_) => "record_load_times",
            Command::QuarantineGpu { .. } => "quarantine_gpu",
            Command::ReleaseGpu { .. } => "release_gpu",
        }
    }
}

/// A command with the leader's time stamp: the payload of a Raft log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Milliseconds since the Unix epoch, read by the leader when it proposed.
    pub at_ms: u64,
    /// The change.
    pub command: Command,
}

/// What an applied command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// An entry with no command (a leader's blank entry, a membership change).
    Noop,
    /// The model as it is after the command.
    Model(Model),
    /// The object was deleted.
    Deleted,
    /// The outcome of each command of a `Command::Batch`, in order.
    Batch(Vec<Result<Outcome, Rejection>>),
    /// The node as it is after the command (boxed: it is large; the
    /// encoding is the same as unboxed).
    Node(Box<Node>),
    /// The deployment as it is after the command.
    Deployment(Box<Deployment>),
    /// The result of each bind of a plan, in order.
    Plan(Vec<Result<(), Rejection>>),
    /// The token as recorded.
    Token(TokenRecord),
}

/// The kinds of object a rejection can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectKind {
    /// A model.
    Model,
    /// A version of a model.
    ModelVersion,
    /// A node.
    Node,
    /// A deployment.
    Deployment,
    /// A replica.
    Replica,
    /// A revision of a deployment.
    Revision,
    /// A token.
    Token,
    /// An issued certificate.
    Certificate,
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ObjectKind::Model => "model",
            ObjectKind::ModelVersion => "model version",
            ObjectKind::Node => "node",
            ObjectKind::Deployment => "deployment",
            ObjectKind::Replica => "replica",
            ObjectKind::Revision => "revision",
            ObjectKind::Token => "token",
            ObjectKind::Certificate => "certificate",
        })
    }
}

/// Why a command was refused. A rejected command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// A field breaks a rule.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The object does not exist.
    #[error("{kind} {name:?} does not exist")]
    NotFound {
        /// What kind of object.
        kind: ObjectKind,
        /// Its name (`model` or `model:version`).
        name: String,
    },
    /// An object of that name exists already.
    #[error("{kind} {name:?} already exists")]
    AlreadyExists {
        /// What kind of object.
        kind: ObjectKind,
        /// Its name.
        name: String,
    },
    /// The command is valid but the state does not allow it now.
    #[error("{0}")]
    FailedPrecondition(String),
}

impl Rejection {
    /// The `kind` named `name` does not exist.
    pub fn not_found(kind: ObjectKind, name: impl Into<String>) -> Self {
        Rejection::NotFound {
            kind,
            name: name.into(),
        }
    }
}

/// Applies `command` at time `at_ms`. On `Err` the state is unchanged.
pub fn apply(state: &mut ClusterState, request: Request) -> Result<Outcome, Rejection> {
    let batch = matches!(request.command, Command::Batch(_));
    let outcome = apply_one(state, request);
    // A batch's commands count one by one.
    if outcome.is_ok() && !batch {
        state.version += 1;
    }
    outcome
}

fn apply_one(state: &mut ClusterState, request: Request) -> Result<Outcome, Rejection> {
    let at_ms = request.at_ms;
    match request.command {
        Command::CreateModel { name, version } => {
            Model::validate_name(&name)?;
            deployments::refuse_alias(state, &name)?;
            version.validate()?;
            if state.models.contains_key(&name) {
                return Err(Rejection::AlreadyExists {
                    kind: ObjectKind::Model,
                    name,
                });
            }
            let model = Model {
                name: name.clone(),
                versions: BTreeMap::from([(
                    version.version.clone(),
                    ModelVersion {
                        spec: version,
                        created_at_ms: at_ms,
                    },
                )]),
                created_at_ms: at_ms,
            };
            state.models.insert(name, model.clone());
            Ok(Outcome::Model(model))
        }
        Command::DeleteModel { name } => {
            let users = deployments::users_of_model(state, &name, None);
            if !state.models.contains_key(&name) {
                return Err(Rejection::NotFound {
                    kind: ObjectKind::Model,
                    name,
                });
            }
            if !users.is_empty() {
                return Err(in_use(&name, &users));
            }
            state.models.remove(&name);
            state.load_times.remove(&name);
            Ok(Outcome::Deleted)
        }
        Command::AddModelVersion { model, version } => {
            version.validate()?;
            let Some(m) = state.models.get_mut(&model) else {
                return Err(Rejection::NotFound {
                    kind: ObjectKind::Model,
                    name: model,
                });
            };
            if m.versions.contains_key(&version.version) {
                return Err(Rejection::AlreadyExists {
                    kind: ObjectKind::ModelVersion,
                    name: format!("{model}:{}", version.version),
                });
            }
            m.versions.insert(
                version.version.clone(),
                ModelVersion {
                    spec: version,
                    created_at_ms: at_ms,
                },
            );
            Ok(Outcome::Model(m.clone()))
        }
        Command::Batch(commands) => Ok(Outcome::Batch(
            commands
                .into_iter()
                .map(|command| match command {
                    Command::Batch(_) => Err(Rejection::Invalid(ValidationError::new(
                        "command",
                        "batch",
                        "a batch may not contain a batch",
                    ))),
                    command => apply(state, Request { at_ms, command }),
                })
                .collect(),
        )),
        Command::RegisterNode(registration) => {
            let name = registration.name.clone();
            let outcome = nodes::register(state, registration, at_ms)?;
            deployments::evict_unfit(state, &name);
            Ok(outcome)
        }
        Command::CreateDeployment { name, request } => {
            deployments::create(state, name, request, at_ms)
        }
        Command::ScaleDeployment { name, replicas } => {
            deployments::scale(state, &name, replicas, at_ms)
        }
        Command::DeleteDeployment { name } => deployments::delete(state, &name),
        Command::ApplyPlan(binds) => deployments::apply_plan(state, binds),
        Command::RemoveReplica { id } => deployments::remove_replica(state, &id),
        Command::ReplaceLostReplicas { node } => deployments::replace_lost(state, &node, at_ms),
        Command::SetNodeAdmin { name, admin } => nodes::set_admin(state, &name, admin, at_ms),
        Command::EvacuateReplica { id } => deployments::evacuate(state, &id, at_ms),
        Command::FinishEvacuation { id } => deployments::finish_evacuation(state, &id),
        Command::ReplaceFailedReplica { id, .. } => deployments::replace_failed(state, &id, at_ms),
        Command::UpdateDeployment { name, change } => {
            deployments::update(state, &name, change, at_ms)
        }
        Command::RollbackDeployment { name, to } => deployments::rollback(state, &name, to, at_ms),
        Command::RolloutAdd { name, count } => deployments::rollout_add(state, &name, count, at_ms),
        Command::RolloutRetire { name, replicas } => {
            deployments::rollout_retire(state, &name, &replicas)
        }
        Command::PauseRollout { name, reason } => deployments::pause(state, &name, reason),
        Command::CreateToken(token) => security::create_token(state, token),
        Command::RevokeToken { id } => security::revoke_token(state, &id),
        Command::IssueCertificate { token, cert } => {
            security::issue(state, token.as_deref(), cert, at_ms)
        }
        Command::RevokeIdentity { identity } => {
            security::revoke_identity(state, &identity);
            Ok(Outcome::Noop)
        }
        Command::RemoveNode { name, force } => nodes::remove(state, &name, force, at_ms),
        Command::SetDeploymentAliases { name, aliases } => {
            deployments::set_aliases(state, &name, aliases)
        }
        Command::SetAutoscale { name, policy } => {
            deployments::set_autoscale(state, &name, policy, at_ms)
        }
        Command::Autoscale {
            name,
            from,
            to,
            prefer,
            ..
        } => deployments::autoscale(state, &name, from, to, &prefer, at_ms),
        Command::RecordLoadTimes(samples) => load_times::record(state, samples),
        Command::QuarantineGpu {
            node,
            gpu,
            quarantine,
        } => gpus::quarantine_gpu(state, &node, gpu, quarantine),
        Command::ReleaseGpu { node, gpu } => gpus::release_gpu(state, &node, gpu),
        Command::SetNodeState {
            name,
            from,
            to,
            instance,
        } => nodes::set_state(state, &name, from, to, &instance, at_ms),
        Command::RemoveModelVersion { model, version } => {
            let users = deployments::users_of_model(state, &model, Some(&version));
            let Some(m) = state.models.get_mut(&model) else {
                return Err(Rejection::NotFound {
                    kind: ObjectKind::Model,
                    name: model,
                });
            };
            if !m.versions.contains_key(&version) {
                return Err(Rejection::NotFound {
                    kind: ObjectKind::ModelVersion,
                    name: format!("{model}:{version}"),
                });
            }
            if m.versions.len() == 1 {
                return Err(Rejection::FailedPrecondition(format!(
                    "version {version:?} is the last version of model {model:?}: a model keeps at least one version; delete the model instead"
                )));
            }
            if !users.is_empty() {
                return Err(in_use(&format!("{model}:{version}"), &users));
            }
            m.versions.remove(&version);
            Ok(Outcome::Model(m.clone()))
        }
    }
}

fn in_use(what: &str, users: &[String]) -> Rejection {
    Rejection::FailedPrecondition(format!(
        "{what} is used by deployments {}: delete or update them first",
        users.join(", ")
    ))
}

/// Checks the invariants that must hold after every apply. Returns the first
/// broken one. Used by tests and by the state-machine store in debug builds.
pub fn check_invariants(state: &ClusterState) -> Result<(), String> {
    for (name, model) in &state.models {
        if name != &model.name {
            return Err(format!("model key {name:?} holds model {:?}", model.name));
        }
        Model::validate_name(name).map_err(|e| e.to_string())?;
        if model.versions.is_empty() {
            return Err(format!("model {name:?} has no versions"));
        }
        for (v, mv) in &model.versions {
            if v != &mv.spec.version {
                return Err(format!(
                    "model {name:?}: key {v:?} holds version {:?}",
                    mv.spec.version
                ));
            }
            mv.spec
                .validate()
                .map_err(|e| format!("model {name:?} version {v:?}: {e}"))?;
        }
    }
    nodes::check_invariants(state)?;
    deployments::check_invariants(state)
}
