//! Deployment and replica commands. A deployment's replica records are kept
//! at its replica count here, in `apply`, so the count and the records never
//! disagree: creating or scaling up adds pending replicas (`<name>-<n>`,
//! numbered by the deployment's counter); scaling down marks the newest for
//! removal (pending ones are dropped at once); a lost node's replicas are
//! dropped and replaced by new pending ones. Placements arrive as plans,
//! re-validated against what every node has left, so a stale plan can never
//! double-book a GPU.

use berth_common::deployment::{MAX_REVISIONS, validate_deployment_name};
use std::collections::BTreeMap;

use berth_common::{
    AutoscalePolicy, Deployment, DeploymentRequest, DeploymentSpec, GpuSlice, NodeAdmin, NodeState,
    Replica, ReplicaIntent, ResourceOverrides, Revision, ValidationError,
};
use serde::{Deserialize, Serialize};

use super::{ClusterState, ObjectKind, Outcome, Rejection, capacity};

/// What `UpdateDeployment` changes; absent fields stay.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentChange {
    /// A new model version.
    pub version: Option<String>,
    /// Resource fields to change.
    pub resources: ResourceOverrides,
    /// A new rollout surge.
    pub max_surge: Option<u32>,
    /// A new rollout unavailability.
    pub max_unavailable: Option<u32>,
}

/// One placement of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanBind {
    /// The pending replica.
    pub replica: String,
    /// Its node.
    pub node: String,
    /// Its GPUs there.
    pub gpus: Vec<GpuSlice>,
}

/// Creates a deployment at revision 1 with its pending replicas.
pub(super) fn create(
    state: &mut ClusterState,
    name: String,
    request: DeploymentRequest,
    at_ms: u64,
) -> Result<Outcome, Rejection> {
    validate_deployment_name(&name)?;
    if state.deployments.contains_key(&name) {
        return Err(Rejection::AlreadyExists {
            kind: ObjectKind::Deployment,
            name,
        });
    }
    refuse_alias(state, &name)?;
    let Some(model) = state.models.get(&request.model) else {
        return Err(Rejection::not_found(ObjectKind::Model, &request.model));
    };
    let mut request = request;
    if request.version.is_empty() {
        // The newest version (then the highest string, for equal times).
        if let Some(v) = model.versions.values().max_by(|a, b| {
            (a.created_at_ms, &a.spec.version).cmp(&(b.created_at_ms, &b.spec.version))
        }) {
            request.version = v.spec.version.clone();
        }
    }
    let Some(version) = model.versions.get(&request.version) else {
        return Err(Rejection::not_found(
            ObjectKind::ModelVersion,
            format!("{}:{}", request.model, request.version),
        ));
    };
    let spec = request.resolve(version.spec.resources);
    spec.validate()?;
    let deployment = Deployment {
        name: name.clone(),
        spec: spec.clone(),
        revision: 1,
        history: vec![Revision {
            revision: 1,
            spec,
            created_at_ms: at_ms,
        }],
        created_at_ms: at_ms,
        next_ordinal: state.retired_ordinals.remove(&name).unwrap_or(1),
        paused: None,
    };
    state.deployments.insert(name.clone(), deployment);
    keep_count(state, &name, at_ms);
    deployment_outcome(state, &name)
}

/// Sets a deployment's replica count.
pub(super) fn scale(
    state: &mut ClusterState,
    name: &str,
    replicas: u32,
    at_ms: u64,
) -> Result<Outcome, Rejection> {
    if let Some(p) = state.autoscale.get(name) {
        return Err(Rejection::FailedPrecondition(format!(
            "deployment {name:?} is autoscaled (min {}, max {}): the autoscaler sets its replica count; to set it by hand, turn autoscaling off first with `berth deploy autoscale {name} off`",
            p.min, p.max
        )));
    }
    set_count(state, name, replicas, at_ms, &[])
}

/// Sets the replica count, removing replicas in `prefer` first when it shrinks.
fn set_count(
    state: &mut ClusterState,
    name: &str,
    replicas: u32,
    at_ms: u64,
    prefer: &[String],
) -> Result<Outcome, Rejection> {
    let Some(d) = state.deployments.get_mut(name) else {
        return Err(Rejection::not_found(ObjectKind::Deployment, name));
    };
    let mut spec = d.spec.clone();
    spec.replicas = replicas;
    spec.validate()?;
    d.spec.replicas = replicas;
    // The count is not part of a revision: a rollback keeps the scale.
    if let Some(current) = d.history.last_mut() {
        current.spec.replicas = replicas;
    }
    keep_count_preferring(state, name, at_ms, prefer);
    deployment_outcome(state, name)
}

/// Sets (or, with `None`, removes) a deployment's autoscaling policy. A
/// count outside the new bounds is brought within them at once.
pub(super) fn set_autoscale(
    state: &mut ClusterState,
    name: &str,
    policy: Option<AutoscalePolicy>,
    at_ms: u64,
) -> Result<Outcome, Rejection> {
    let Some(d) = state.deployments.get(name) else {
        return Err(Rejection::not_found(ObjectKind::Deployment, name));
    };
    let Some(policy) = policy else {
        state.autoscale.remove(name);
        return deployment_outcome(state, name);
    };
    policy.validate()?;
    let replicas = policy.clamp(d.spec.replicas);
    state.autoscale.insert(name.to_string(), policy);
    set_count(state, name, replicas, at_ms, &[])
}

/// The autoscaler's decision: `from` → `to` replicas. Refused when the
/// deployment is not autoscaled, its count is no longer `from` (a stale
/// decision), or `to` is outside the policy's bounds.
pub(super) fn autoscale(
    state: &mut ClusterState,
    name: &str,
    from: u32,
    to: u32,
    prefer: &[String],
    at_ms: u64,
) -> Result<Outcome, Rejection> {
    let Some(d) = state.deployments.get(name) else {
        return Err(Rejection::not_found(ObjectKind::Deployment, name));
    };
    let Some(policy) = state.autoscale.get(name) else {
        return Err(Rejection::FailedPrecondition(format!(
            "deployment {name:?} is not autoscaled"
        )));
    };
    if d.spec.replicas != from {
        return Err(Rejection::FailedPrecondition(format!(
            "deployment {name:?} has {} replicas, not {from}: the decision is stale",
            d.spec.replicas
        )));
    }
    if policy.clamp(to) != to {
        return Err(Rejection::Invalid(ValidationError::new(
            "replicas",
            to,
            format!(
                "must be between {} and {} (the autoscaling policy)",
                policy.min, policy.max
            ),
        )));
    }
    set_count(state, name, to, at_ms, prefer)
}

/// Deletes a deployment; its replicas are removed (stopped first when placed).
pub(super) fn delete(state: &mut ClusterState, name: &str) -> Result<Outcome, Rejection> {
    let Some(deleted) = state.deployments.remove(name) else {
        return Err(Rejection::not_found(ObjectKind::Deployment, name));
    };
    state
        .retired_ordinals
        .insert(name.to_string(), deleted.next_ordinal);
    state.aliases.retain(|_, d| d != name);
    state.autoscale.remove(name);
    state
        .replicas
        .retain(|_, r| r.deployment != name || r.node.is_some());
    for r in state.replicas.values_mut() {
        if r.deployment == name {
            r.intent = ReplicaIntent::Remove;
        }
    }
    Ok(Outcome::Deleted)
}

/// Refuses a new model or deployment named like an alias: a request's
/// `model` must lead to one deployment.
pub(super) fn refuse_alias(state: &ClusterState, name: &str) -> Result<(), Rejection> {
    match state.aliases.get(name) {
        Some(owner) => Err(Rejection::FailedPrecondition(format!(
            "{name:?} is an alias of deployment {owner:?}; pick another name, or remove the alias first"
        ))),
        None => Ok(()),
    }
}

/// The most aliases one deployment may have.
pub const MAX_ALIASES: usize = 8;

/// Replaces a deployment's aliases. An alias follows the name rules and may
/// not be a model's or a deployment's name, or another deployment's alias:
/// a request's `model` must lead to one deployment.
pub(super) fn set_aliases(
    state: &mut ClusterState,
    name: &str,
    aliases: Vec<String>,
) -> Result<Outcome, Rejection> {
    let Some(deployment) = state.deployments.get(name) else {
        return Err(Rejection::not_found(ObjectKind::Deployment, name));
    };
    if aliases.len() > MAX_ALIASES {
        return Err(Rejection::Invalid(ValidationError::new(
            "aliases",
            aliases.join(","),
            format!("at most {MAX_ALIASES} aliases per deployment"),
        )));
    }
    for (i, alias) in aliases.iter().enumerate() {
        berth_common::names::validate_name("alias", alias).map_err(Rejection::Invalid)?;
        if aliases[..i].contains(alias) {
            return Err(Rejection::Invalid(ValidationError::new(
                "alias",
                alias,
                "is given twice",
            )));
        }
        if state.models.contains_key(alias) || state.deployments.contains_key(alias) {
            return Err(Rejection::FailedPrecondition(format!(
                "alias {alias:?} is the name of a model or deployment, which clients reach by that name already; pick another alias"
            )));
        }
        if let Some(owner) = state.aliases.get(alias).filter(|d| *d != name) {
            return Err(Rejection::FailedPrecondition(format!(
                "alias {alias:?} belongs to deployment {owner:?}; remove it there first (berth deploy alias {owner} …)"
            )));
        }
    }
    let deployment = deployment.clone();
    state.aliases.retain(|_, d| d != name);
    for alias in aliases {
        state.aliases.insert(alias, name.to_string());
    }
    Ok(Outcome::Deployment(Box::new(deployment)))
}

/// Places pending replicas. Each bind is checked on its own against the
/// current state; one that no longer fits is refused and the others apply.
pub(super) fn apply_plan(
    state: &mut ClusterState,
    binds: Vec<PlanBind>,
) -> Result<Outcome, Rejection> {
    let mut usage = capacity::usage(state.replicas.values());
    let mut results = Vec::with_capacity(binds.len());
    for b in binds {
        let result = (|| {
            let Some(replica) = state.replicas.get(&b.replica) else {
                return Err(Rejection::not_found(ObjectKind::Replica, &b.replica));
            };
            if !replica.pending() {
                return Err(Rejection::FailedPrecondition(format!(
                    "replica {} is not waiting for a place",
                    b.replica
                )));
            }
            let Some(node) = state.nodes.get(&b.node) else {
                return Err(Rejection::not_found(ObjectKind::Node, &b.node));
            };
            if !node.schedulable() {
                return Err(Rejection::FailedPrecondition(format!(
                    "node {} is {}: nothing new is placed there",
                    b.node,
                    node.display_state()
                )));
            }
            if let Some((index, q)) = b.gpus.iter().find_map(|g| {
                super::gpus::quarantine(state, &b.node, g.index).map(|q| (g.index, q))
            }) {
                return Err(Rejection::FailedPrecondition(format!(
                    "gpu {index} of node {} is quarantined ({}): nothing new is placed there",
                    b.node, q.reason
                )));
            }
            let node_use = usage.entry(b.node.clone()).or_default();
            if let Some(why) = node_use.refuse(node, replica, &b.gpus) {
                return Err(Rejection::FailedPrecondition(format!("stale plan: {why}")));
            }
            let mut placed = replica.clone();
            placed.node = Some(b.node.clone());
            placed.gpus = b.gpus.clone();
            // The first version whose state holds this placement: an
            // agent keeps a replica placed after the version its heartbeat
            // answer was read at, so an answer read just before this plan
            // cannot stop it.
            placed.placed_at = state.version + 1;
            node_use.add(&placed);
            state.replicas.insert(placed.id.clone(), placed);
            Ok(())
        })();
        results.push(result);
    }
    Ok(Outcome::Plan(results))
}

/// Forgets a replica that is being removed (its agent stopped it, or its
/// node is gone).
pub(super) fn remove_replica(state: &mut ClusterState, id: &str) -> Result<Outcome, Rejection> {
    let Some(r) = state.replicas.get(id) else {
        return Err(Rejection::not_found(ObjectKind::Replica, id));
    };
    if r.intent != ReplicaIntent::Remove {
        return Err(Rejection::FailedPrecondition(format!(
            "replica {id} should run: scale its deployment down or delete it instead"
        )));
    }
    state.replicas.remove(id);
    Ok(Outcome::Deleted)
}

/// Drops the replicas of a node that is down and replaces the ones that
/// should run with new pending replicas, placed elsewhere.
pub(super) fn replace_lost(
    state: &mut ClusterState,
    node: &str,
    at_ms: u64,
) -> Result<Outcome, Rejection> {
    let Some(n) = state.nodes.get(node) else {
        return Err(Rejection::not_found(ObjectKind::Node, node));
    };
    if n.state != NodeState::Down {
        return Err(Rejection::FailedPrecondition(format!(
            "node {node} is {}: only a down node's replicas are replaced",
            n.state
        )));
    }
    forget_replicas_on(state, node, at_ms);
    Ok(Outcome::Noop)
}

/// Forgets the replicas placed on `node`; their deployments get new pending
/// replicas in their place. Returns how many were forgotten.
pub(super) fn forget_replicas_on(state: &mut ClusterState, node: &str, at_ms: u64) -> usize {
    let lost: Vec<String> = state
        .replicas
        .values()
        .filter(|r| r.node.as_deref() == Some(node))
        .map(|r| r.id.clone())
        .collect();
    let count = lost.len();
    let mut deployments: Vec<String> = Vec::new();
    for id in lost {
        if let Some(r) = state.replicas.remove(&id)
            && !deployments.contains(&r.deployment)
        {
            deployments.push(r.deployment);
        }
    }
    for d in deployments {
        keep_count(state, &d, at_ms);
    }
    count
}

/// Unplaces replicas that a node's new inventory can no longer hold (a GPU
/// gone from the bus): they wait for a place again, under a new generation.
pub(super) fn evict_unfit(state: &mut ClusterState, node: &str) {
    let Some(n) = state.nodes.get(node).cloned() else {
        return;
    };
    let mut on_node: Vec<Replica> = state
        .replicas
        .values()
        .filter(|r| r.node.as_deref() == Some(node))
        .cloned()
        .collect();
    on_node.sort_by_key(|r| r.placed_at);
    let mut kept = capacity::NodeUse::default();
    for r in on_node {
        if kept.refuse(&n, &r, &r.gpus).is_none() {
            kept.add(&r);
            continue;
        }
        if let Some(x) = state.replicas.get_mut(&r.id) {
            if x.intent == ReplicaIntent::Remove {
                state.replicas.remove(&r.id);
            } else {
                x.node = None;
                x.gpus.clear();
                x.generation += 1;
            }
        }
    }
}

/// A new revision with `spec` (unless it is the current spec already):
/// replicas that already run that process adopt it, replicas that differ
/// only in CPU and memory are resized in place where their node has room
/// (a new generation: the reconciler tells their agent), and the rest are
/// left for the rollout to replace. Returns whether a revision was made.
fn new_revision(state: &mut ClusterState, name: &str, spec: DeploymentSpec, at_ms: u64) -> bool {
    let Some(d) = state.deployments.get_mut(name) else {
        return false;
    };
    if d.spec == spec {
        return false;
    }
    let revision = d.history.iter().map(|h| h.revision).max().unwrap_or(0) + 1;
    d.history.push(Revision {
        revision,
        spec: spec.clone(),
        created_at_ms: at_ms,
    });
    d.spec = spec.clone();
    d.revision = revision;
    d.paused = None;
    let old_specs: BTreeMap<u64, DeploymentSpec> = d
        .history
        .iter()
        .map(|h| (h.revision, h.spec.clone()))
        .collect();
    let ids: Vec<String> = state
        .replicas
        .values()
        .filter(|r| {
            r.deployment == name && r.intent == ReplicaIntent::Run && r.revision != revision
        })
        .map(|r| r.id.clone())
        .collect();
    for id in ids {
        let Some(r) = state.replicas.get(&id).cloned() else {
            continue;
        };
        let Some(old) = old_specs.get(&r.revision) else {
            continue;
        };
        if old.same_process(&spec) {
            if let Some(x) = state.replicas.get_mut(&id) {
                x.revision = revision;
            }
            continue;
        }
        if !old.resizable_to(&spec) {
            continue;
        }
        let mut resized = r.clone();
        resized.resources = spec.resources;
        let fits = match r.node.as_ref().and_then(|n| state.nodes.get(n)) {
            None => true,
            Some(node) => {
                let usage = capacity::usage(state.replicas.values().filter(|x| x.id != id));
                let node_use = usage.get(&node.name).cloned().unwrap_or_default();
                node_use.refuse(node, &resized, &resized.gpus).is_none()
            }
        };
        if fits {
            resized.revision = revision;
            if resized.node.is_some() {
                resized.generation += 1;
            }
            state.replicas.insert(id, resized);
        }
    }
    trim_history(state, name);
    // Tighter rollout limits than the replicas in flight: back to the count.
    let (_, total) = counts(state, name, revision);
    let want = spec.replicas as usize;
    let floor = want.saturating_sub(spec.max_unavailable as usize);
    if total > want + spec.max_surge as usize || total < floor {
        keep_count(state, name, at_ms);
    }
    true
}

/// Keeps at most `MAX_REVISIONS` revisions, never one a replica still runs.
fn trim_history(state: &mut ClusterState, name: &str) {
    let used: Vec<u64> = state
        .replicas
        .values()
        .filter(|r| r.deployment == name)
        .map(|r| r.revision)
        .collect();
    let Some(d) = state.deployments.get_mut(name) else {
        return;
    };
    while d.history.len() > MAX_REVISIONS {
        let Some(pos) = d
            .history
            .iter()
            .position(|h| h.revision != d.revision && !used.contains(&h.revision))
        else {
            break;
        };
        d.history.remove(pos);
    }
}

/// Changes a deployment's model version, resources or rollout limits: a
/// new revision, rolled out by the reconciler.
pub(super) fn update(
    state: &mut ClusterState,
    name: &str,
    change: DeploymentChange,
    at_ms: u64,
) -> Result<Outcome, Rejection> {
    let Some(d) = state.deployments.get(name) else {
        return Err(Rejection::not_found(ObjectKind::Deployment, name));
    };
    let mut spec = d.spec.clone();
    if let Some(v) = change.version {
        let model = state
            .models
            .get(&spec.model)
            .ok_or_else(|| Rejection::not_found(ObjectKind::Model, &spec.model))?;
        if !model.versions.contains_key(&v) {
            return Err(Rejection::not_found(
                ObjectKind::ModelVersion,
                format!("{}:{v}", spec.model),
            ));
        }
        spec.version = v;
    }
    spec.resources = change.resources.over(spec.resources);
    if let Some(s) = change.max_surge {
        spec.max_surge = s;
    }
    if let Some(u) = change.max_unavailable {
        spec.max_unavailable = u;
    }
    spec.validate()?;
    new_revision(state, name, spec, at_ms);
    deployment_outcome(state, name)
}

/// Rolls a deployment back to an earlier revision's spec (by default the
/// one before the current), as a new revision; the replica count stays.
pub(super) fn rollback(
    state: &mut ClusterState,
    name: &str,
    to: Option<u64>,
    at_ms: u64,
) -> Result<Outcome, Rejection> {
    let Some(d) = state.deployments.get(name) else {
        return Err(Rejection::not_found(ObjectKind::Deployment, name));
    };
    let target = match to {
        Some(r) => d.history.iter().find(|h| h.revision == r).ok_or_else(|| {
            let kept: Vec<String> = d.history.iter().map(|h| h.revision.to_string()).collect();
            Rejection::NotFound {
                kind: ObjectKind::Revision,
                name: format!("{name}:{r} (kept: {})", kept.join(", ")),
            }
        })?,
        None => d
            .history
            .iter()
            .rev()
            .find(|h| h.revision < d.revision)
            .ok_or_else(|| {
                Rejection::FailedPrecondition(format!(
                    "deployment {name} has no revision before {}: nothing to roll back to",
                    d.revision
                ))
            })?,
    };
    let mut spec = target.spec.clone();
    spec.replicas = d.spec.replicas;
    if spec == d.spec {
        return Err(Rejection::FailedPrecondition(format!(
            "revision {} of {name} is what runs already",
            target.revision
        )));
    }
    let version_exists = state
        .models
        .get(&spec.model)
        .is_some_and(|m| m.versions.contains_key(&spec.version));
    if !version_exists {
        return Err(Rejection::not_found(
            ObjectKind::ModelVersion,
            format!("{}:{}", spec.model, spec.version),
        ));
    }
    new_revision(state, name, spec, at_ms);
    deployment_outcome(state, name)
}

/// Adds `count` pending replicas of the current revision, within the
/// rollout's limits: no more than `replicas` of the current revision, no
/// more than `replicas + max_surge` in all.
pub(super) fn rollout_add(
    state: &mut ClusterState,
    name: &str,
    count: u32,
    at_ms: u64,
) -> Result<Outcome, Rejection> {
    let Some(d) = state.deployments.get(name) else {
        return Err(Rejection::not_found(ObjectKind::Deployment, name));
    };
    if let Some(why) = &d.paused {
        return Err(Rejection::FailedPrecondition(format!(
            "the rollout of {name} is paused ({why}): roll back, or update to another version"
        )));
    }
    let (current, total) = counts(state, name, d.revision);
    let (want, surge) = (d.spec.replicas as usize, d.spec.max_surge as usize);
    let count = count as usize;
    if count == 0 || current + count > want || total + count > want + surge {
        return Err(Rejection::FailedPrecondition(format!(
            "adding {count} replicas to {name} would exceed its rollout limits ({current} of revision {} and {total} in all; {want} replicas, max surge {surge})",
            d.revision
        )));
    }
    add_replicas(state, name, count, at_ms);
    deployment_outcome(state, name)
}

/// Retires replicas of older revisions (pending ones go at once), keeping
/// at least `replicas - max_unavailable` that should run.
pub(super) fn rollout_retire(
    state: &mut ClusterState,
    name: &str,
    ids: &[String],
) -> Result<Outcome, Rejection> {
    let Some(d) = state.deployments.get(name) else {
        return Err(Rejection::not_found(ObjectKind::Deployment, name));
    };
    for id in ids {
        let ok = state
            .replicas
            .get(id)
            .is_some_and(|r| r.deployment == name && r.counts() && r.revision != d.revision);
        if !ok {
            return Err(Rejection::FailedPrecondition(format!(
                "replica {id} is not a running replica of an older revision of {name}"
            )));
        }
    }
    let (_, total) = counts(state, name, d.revision);
    let floor = (d.spec.replicas as usize).saturating_sub(d.spec.max_unavailable as usize);
    if total.saturating_sub(ids.len()) < floor {
        return Err(Rejection::FailedPrecondition(format!(
            "retiring {} replicas of {name} would leave fewer than {floor} (replicas - max unavailable)",
            ids.len()
        )));
    }
    for id in ids {
        let pending = state.replicas.get(id).is_some_and(|r| r.node.is_none());
        if pending {
            state.replicas.remove(id);
        } else if let Some(r) = state.replicas.get_mut(id) {
            r.intent = ReplicaIntent::Remove;
        }
    }
    deployment_outcome(state, name)
}

/// Pauses a rollout in progress; the old replicas keep serving.
pub(super) fn pause(
    state: &mut ClusterState,
    name: &str,
    reason: String,
) -> Result<Outcome, Rejection> {
    let Some(d) = state.deployments.get(name) else {
        return Err(Rejection::not_found(ObjectKind::Deployment, name));
    };
    let (current, total) = counts(state, name, d.revision);
    if current == total {
        return Err(Rejection::FailedPrecondition(format!(
            "deployment {name} has no rollout in progress"
        )));
    }
    if let Some(d) = state.deployments.get_mut(name) {
        d.paused = Some(reason);
    }
    deployment_outcome(state, name)
}

/// (replicas of `revision` that count, replicas that count in all): those
/// that should run and are not moving off a draining node.
fn counts(state: &ClusterState, name: &str, revision: u64) -> (usize, usize) {
    let run = state
        .replicas
        .values()
        .filter(|r| r.deployment == name && r.counts());
    run.fold((0, 0), |(c, t), r| {
        (c + usize::from(r.revision == revision), t + 1)
    })
}

/// Adds `count` pending replicas of the current revision; returns their ids.
fn add_replicas(state: &mut ClusterState, name: &str, count: usize, at_ms: u64) -> Vec<String> {
    let mut added = Vec::new();
    let Some(d) = state.deployments.get_mut(name) else {
        return added;
    };
    for _ in 0..count {
        let id = format!("{name}-{}", d.next_ordinal);
        d.next_ordinal += 1;
        added.push(id.clone());
        state.replicas.insert(
            id.clone(),
            Replica {
                id,
                deployment: name.to_string(),
                revision: d.revision,
                generation: 1,
                resources: d.spec.resources,
                node: None,
                gpus: Vec::new(),
                intent: ReplicaIntent::Run,
                placed_at: 0,
                created_at_ms: at_ms,
                evacuating: false,
                replaces: None,
            },
        );
    }
    added
}

/// Starts moving a replica off its draining node or quarantined GPU: it stops counting toward
/// its deployment and a replacement is added (placed elsewhere); the
/// replica itself stops once `FinishEvacuation` says so.
pub(super) fn evacuate(
    state: &mut ClusterState,
    id: &str,
    at_ms: u64,
) -> Result<Outcome, Rejection> {
    let Some(r) = state.replicas.get(id) else {
        return Err(Rejection::not_found(ObjectKind::Replica, id));
    };
    let on_draining = r
        .node
        .as_ref()
        .and_then(|n| state.nodes.get(n))
        .is_some_and(|n| n.admin == NodeAdmin::Draining);
    let must_move = on_draining || super::gpus::on_quarantined_gpu(state, r);
    if !must_move || !r.counts() {
        return Err(Rejection::FailedPrecondition(format!(
            "replica {id} is not a running replica on a draining node or a quarantined GPU"
        )));
    }
    let deployment = r.deployment.clone();
    if !state.deployments.contains_key(&deployment) {
        return Err(Rejection::not_found(ObjectKind::Deployment, &deployment));
    }
    if let Some(r) = state.replicas.get_mut(id) {
        r.evacuating = true;
    }
    for new in add_replicas(state, &deployment, 1, at_ms) {
        if let Some(r) = state.replicas.get_mut(&new) {
            r.replaces = Some(id.to_string());
        }
    }
    Ok(Outcome::Noop)
}

/// Stops a replica moving off a draining node (its replacement runs, or
/// could not be placed in time).
pub(super) fn finish_evacuation(state: &mut ClusterState, id: &str) -> Result<Outcome, Rejection> {
    let Some(r) = state.replicas.get_mut(id) else {
        return Err(Rejection::not_found(ObjectKind::Replica, id));
    };
    if !r.evacuating || r.intent != ReplicaIntent::Run {
        return Err(Rejection::FailedPrecondition(format!(
            "replica {id} is not moving off a draining node"
        )));
    }
    r.intent = ReplicaIntent::Remove;
    Ok(Outcome::Noop)
}

/// Removes a placed replica that keeps failing and adds one in its place
/// (the scheduler places it like any other). Only a replica of the current
/// revision outside a rollout: a failing rollout pauses instead.
pub(super) fn replace_failed(
    state: &mut ClusterState,
    id: &str,
    at_ms: u64,
) -> Result<Outcome, Rejection> {
    let Some(r) = state.replicas.get(id) else {
        return Err(Rejection::not_found(ObjectKind::Replica, id));
    };
    if !r.counts() || r.node.is_none() {
        return Err(Rejection::FailedPrecondition(format!(
            "replica {id} is not a placed replica that should run"
        )));
    }
    let deployment = r.deployment.clone();
    let Some(d) = state.deployments.get(&deployment) else {
        return Err(Rejection::not_found(ObjectKind::Deployment, &deployment));
    };
    if d.paused.is_some() || d.rolling(state.replicas.values()) || r.revision != d.revision {
        return Err(Rejection::FailedPrecondition(format!(
            "deployment {deployment} has a rollout in progress or paused: a failing replica pauses it instead of being replaced"
        )));
    }
    if let Some(r) = state.replicas.get_mut(id) {
        r.intent = ReplicaIntent::Remove;
    }
    keep_count(state, &deployment, at_ms);
    Ok(Outcome::Noop)
}

/// A node stops draining (uncordoned or cordoned): its replicas that were
/// moving away stay (unless a quarantined GPU still sends them away), and
/// each deployment goes back to its count.
pub(super) fn stop_evacuations(state: &mut ClusterState, node: &str, at_ms: u64) {
    let mut deployments = Vec::new();
    let quarantined: Vec<String> = state
        .replicas
        .values()
        .filter(|r| super::gpus::on_quarantined_gpu(state, r))
        .map(|r| r.id.clone())
        .collect();
    for r in state.replicas.values_mut() {
        if r.node.as_deref() == Some(node)
            && r.evacuating
            && r.intent == ReplicaIntent::Run
            && !quarantined.contains(&r.id)
        {
            r.evacuating = false;
            if !deployments.contains(&r.deployment) {
                deployments.push(r.deployment.clone());
            }
        }
    }
    for d in deployments {
        keep_count(state, &d, at_ms);
    }
}

/// Brings a deployment's replicas that should run to its count: adds
/// pending ones of the current revision, or removes replicas of older
/// revisions first, then the newest (pending first).
fn keep_count(state: &mut ClusterState, name: &str, at_ms: u64) {
    keep_count_preferring(state, name, at_ms, &[]);
}

/// `keep_count`, removing the replicas in `prefer` (in that order) before
/// others of the same revision and node state: the autoscaler names the
/// idle ones.
fn keep_count_preferring(state: &mut ClusterState, name: &str, at_ms: u64, prefer: &[String]) {
    let Some(d) = state.deployments.get(name) else {
        return;
    };
    let want = d.spec.replicas as usize;
    let mut running: Vec<&Replica> = state
        .replicas
        .values()
        .filter(|r| r.deployment == name && r.counts())
        .collect();
    if running.len() > want {
        // Older revisions first, then those on draining nodes, then
        // pending before placed, newest first.
        let current = d.revision;
        let draining = |r: &Replica| {
            r.node
                .as_ref()
                .and_then(|n| state.nodes.get(n))
                .is_some_and(|n| n.admin == NodeAdmin::Draining)
        };
        let rank = |r: &Replica| {
            prefer
                .iter()
                .position(|p| *p == r.id)
                .unwrap_or(prefer.len())
        };
        running.sort_by_key(|r| {
            (
                r.revision == current,
                !draining(r),
                r.node.is_some(),
                rank(r),
                std::cmp::Reverse(ordinal(&r.id)),
            )
        });
        let extra: Vec<(String, bool)> = running[..running.len() - want]
            .iter()
            .map(|r| (r.id.clone(), r.node.is_none()))
            .collect();
        for (id, pending) in extra {
            if pending {
                state.replicas.remove(&id);
            } else if let Some(r) = state.replicas.get_mut(&id) {
                r.intent = ReplicaIntent::Remove;
            }
        }
        return;
    }
    add_replicas(state, name, want - running.len(), at_ms);
}

/// The number at the end of a replica id.
pub fn ordinal(id: &str) -> u64 {
    id.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn deployment_outcome(state: &ClusterState, name: &str) -> Result<Outcome, Rejection> {
    state
        .deployments
        .get(name)
        .map(|d| Outcome::Deployment(Box::new(d.clone())))
        .ok_or_else(|| Rejection::not_found(ObjectKind::Deployment, name))
}

/// Deployments that use a model, or one version of it.
pub(super) fn users_of_model(
    state: &ClusterState,
    model: &str,
    version: Option<&str>,
) -> Vec<String> {
    state
        .deployments
        .values()
        .filter(|d| {
            d.history
                .iter()
                .any(|r| r.spec.model == model && version.is_none_or(|v| r.spec.version == v))
        })
        .map(|d| d.name.clone())
        .collect()
}

/// Deployment and replica invariants.
pub(super) fn check_invariants(state: &ClusterState) -> Result<(), String> {
    for (name, d) in &state.deployments {
        if name != &d.name {
            return Err(format!("deployment key {name:?} holds {:?}", d.name));
        }
        d.spec
            .validate()
            .map_err(|e| format!("deployment {name:?}: {e}"))?;
        if !d
            .history
            .iter()
            .any(|h| h.revision == d.revision && h.spec == d.spec)
        {
            return Err(format!(
                "deployment {name:?}: the current revision is not in its history"
            ));
        }
        let (current, total) = counts(state, name, d.revision);
        let want = d.spec.replicas as usize;
        let floor = want.saturating_sub(d.spec.max_unavailable as usize);
        let ceiling = want + d.spec.max_surge as usize;
        if current > want || total < floor.min(want) || total > ceiling.max(want) {
            return Err(format!(
                "deployment {name:?} wants {want} replicas and has {total} that should run ({current} of revision {})",
                d.revision
            ));
        }
        if current == total && total != want {
            return Err(format!(
                "deployment {name:?} wants {want} replicas and has {total} that should run"
            ));
        }
        for r in state.replicas.values().filter(|r| &r.deployment == name) {
            if !d.history.iter().any(|h| h.revision == r.revision) {
                return Err(format!(
                    "replica {:?} runs revision {} which {name:?} no longer keeps",
                    r.id, r.revision
                ));
            }
        }
    }
    for (id, r) in &state.replicas {
        if id != &r.id {
            return Err(format!("replica key {id:?} holds {:?}", r.id));
        }
        if r.intent == ReplicaIntent::Run && !state.deployments.contains_key(&r.deployment) {
            return Err(format!(
                "replica {id:?} should run but its deployment is gone"
            ));
        }
        if r.node.is_none() && r.intent == ReplicaIntent::Remove {
            return Err(format!(
                "replica {id:?} is being removed but was never placed"
            ));
        }
        if r.node.is_none() && !r.gpus.is_empty() {
            return Err(format!("replica {id:?} holds GPUs but no node"));
        }
        if r.evacuating && r.node.is_none() {
            return Err(format!("replica {id:?} moves off a node but has none"));
        }
    }
    capacity::check(&state.nodes, &capacity::usage(state.replicas.values()))
}
