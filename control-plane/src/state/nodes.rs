//! Node commands: registration and state transitions.

use berth_common::{Node, NodeAdmin, NodeRegistration, NodeState};

use super::{ClusterState, ObjectKind, Outcome, Rejection};

/// Records a node, or updates it. A new agent instance bumps the epoch; a
/// node that was down is ready again (its agent is talking).
pub(super) fn register(
    state: &mut ClusterState,
    registration: NodeRegistration,
    at_ms: u64,
) -> Result<Outcome, Rejection> {
    registration.validate()?;
    let NodeRegistration {
        name,
        addr,
        labels,
        inventory,
        instance,
    } = registration;
    let node = match state.nodes.get_mut(&name) {
        Some(node) => {
            if node.instance != instance {
                node.epoch += 1;
                node.instance = instance;
            }
            if node.state == NodeState::Down {
                node.state = NodeState::Ready;
                node.state_since_ms = at_ms;
            }
            node.addr = addr;
            node.labels = labels;
            node.inventory = inventory;
            node.clone()
        }
        None => {
            let node = Node {
                name: name.clone(),
                addr,
                labels,
                inventory,
                instance,
                epoch: 1,
                state: NodeState::Ready,
                admin: NodeAdmin::Active,
                registered_at_ms: at_ms,
                state_since_ms: at_ms,
            };
            state.nodes.insert(name, node.clone());
            node
        }
    };
    Ok(Outcome::Node(Box::new(node)))
}

/// Moves a node from `from` to `to`, if it is still in `from` and
/// `instance` is still its agent.
pub(super) fn set_state(
    state: &mut ClusterState,
    name: &str,
    from: NodeState,
    to: NodeState,
    instance: &str,
    at_ms: u64,
) -> Result<Outcome, Rejection> {
    let Some(node) = state.nodes.get_mut(name) else {
        return Err(Rejection::not_found(ObjectKind::Node, name));
    };
    if node.instance != instance {
        return Err(Rejection::FailedPrecondition(format!(
            "node {name:?} has a newer agent instance than the one observed; the observation is stale"
        )));
    }
    if node.state != from {
        return Err(Rejection::FailedPrecondition(format!(
            "node {name:?} is {}, not {from}: the observation is stale",
            node.state
        )));
    }
    node.state = to;
    node.state_since_ms = at_ms;
    Ok(Outcome::Node(Box::new(node.clone())))
}

/// Records an operator's decision about a node (cordon, drain, uncordon),
/// or the reconciler's (drained, once no replica is left there).
pub(super) fn set_admin(
    state: &mut ClusterState,
    name: &str,
    admin: NodeAdmin,
    at_ms: u64,
) -> Result<Outcome, Rejection> {
    let Some(node) = state.nodes.get(name) else {
        return Err(Rejection::not_found(ObjectKind::Node, name));
    };
    let was = node.admin;
    if admin == NodeAdmin::Drained {
        let left = state
            .replicas
            .values()
            .filter(|r| r.node.as_deref() == Some(name))
            .count();
        if left > 0 || was != NodeAdmin::Draining {
            return Err(Rejection::FailedPrecondition(format!(
                "node {name} is {} with {left} replicas: only a draining node with none left is drained",
                was.as_str()
            )));
        }
    }
    if was == NodeAdmin::Draining && admin != NodeAdmin::Draining && admin != NodeAdmin::Drained {
        super::deployments::stop_evacuations(state, name, at_ms);
    }
    let Some(node) = state.nodes.get_mut(name) else {
        return Err(Rejection::not_found(ObjectKind::Node, name));
    };
    node.admin = admin;
    Ok(Outcome::Node(Box::new(node.clone())))
}

/// Node invariants: keyed by name, every record valid.
/// `RemoveNode`: see `Command::RemoveNode`.
pub(super) fn remove(
    state: &mut ClusterState,
    name: &str,
    force: bool,
    at_ms: u64,
) -> Result<Outcome, Rejection> {
    if !state.nodes.contains_key(name) {
        return Err(Rejection::not_found(ObjectKind::Node, name));
    }
    let placed = state
        .replicas
        .values()
        .filter(|r| r.node.as_deref() == Some(name))
        .count();
    if placed > 0 && !force {
        return Err(Rejection::FailedPrecondition(format!(
            "node {name} has {placed} replicas placed on it: drain it first (`berth node drain {name} --wait`), or pass --force to replace them elsewhere"
        )));
    }
    super::deployments::forget_replicas_on(state, name, at_ms);
    state.nodes.remove(name);
    state.gpus.remove(name);
    super::security::revoke_identity(state, &format!("node {name}"));
    Ok(Outcome::Deleted)
}

pub(super) fn check_invariants(state: &ClusterState) -> Result<(), String> {
    for (name, node) in &state.nodes {
        if name != &node.name {
            return Err(format!("node key {name:?} holds node {:?}", node.name));
        }
        if node.epoch == 0 {
            return Err(format!("node {name:?} has epoch 0"));
        }
        let registration = NodeRegistration {
            name: node.name.clone(),
            addr: node.addr.clone(),
            labels: node.labels.clone(),
            inventory: node.inventory.clone(),
            instance: node.instance.clone(),
        };
        registration
            .validate()
            .map_err(|e| format!("node {name:?}: {e}"))?;
    }
    for node in state.gpus.keys() {
        if !state.nodes.contains_key(node) {
            return Err(format!("gpu records of node {node:?}, which is not a node"));
        }
    }
    Ok(())
}
