//! GPU quarantine in the replicated state: which GPUs are out of placement,
//! why, and the fault counters an operator last released them at.
//!
//! A quarantined GPU takes no new replica (the scheduler's view leaves it
//! out, and `ApplyPlan` refuses a bind on it), and each replica holding it
//! moves away the way a drain moves replicas: a replacement first, then the
//! stop (`EvacuateReplica`, `FinishEvacuation`). The leader quarantines
//! from the agents' readings; only an operator releases.

use std::collections::BTreeMap;

use berth_common::Replica;
use berth_common::gpu_health::{GpuRecord, Quarantine};

use super::{ClusterState, ObjectKind, Outcome, Rejection};

/// The record of GPU `index` of `node`, if any.
pub fn record<'a>(state: &'a ClusterState, node: &str, index: u32) -> Option<&'a GpuRecord> {
    state.gpus.get(node)?.get(&index)
}

/// The quarantine of GPU `index` of `node`, if it is quarantined.
pub fn quarantine<'a>(state: &'a ClusterState, node: &str, index: u32) -> Option<&'a Quarantine> {
    record(state, node, index)?.quarantine.as_ref()
}

/// The quarantined GPU indices of each node.
pub fn quarantined(state: &ClusterState) -> BTreeMap<&str, Vec<u32>> {
    state
        .gpus
        .iter()
        .map(|(node, gpus)| {
            let q = gpus
                .iter()
                .filter(|(_, r)| r.quarantine.is_some())
                .map(|(i, _)| *i)
                .collect::<Vec<_>>();
            (node.as_str(), q)
        })
        .filter(|(_, q)| !q.is_empty())
        .collect()
}

/// Whether `r` is placed on a quarantined GPU.
pub fn on_quarantined_gpu(state: &ClusterState, r: &Replica) -> bool {
    let Some(node) = &r.node else { return false };
    r.gpus
        .iter()
        .any(|g| quarantine(state, node, g.index).is_some())
}

/// Takes GPU `gpu` of `node` out of placement.
pub(super) fn quarantine_gpu(
    state: &mut ClusterState,
    node: &str,
    gpu: u32,
    q: Quarantine,
) -> Result<Outcome, Rejection> {
    let n = state
        .nodes
        .get(node)
        .ok_or_else(|| Rejection::not_found(ObjectKind::Node, node))?;
    check_gpu(n, gpu)?;
    if let Some(existing) = quarantine(state, node, gpu) {
        return Err(Rejection::FailedPrecondition(format!(
            "gpu {gpu} of node {node} is already quarantined ({}, by {}): release it first to quarantine it again",
            existing.reason,
            existing.by.as_str()
        )));
    }
    let node_record = n.clone();
    state
        .gpus
        .entry(node.to_string())
        .or_default()
        .entry(gpu)
        .or_default()
        .quarantine = Some(q);
    Ok(Outcome::Node(Box::new(node_record)))
}

/// Returns GPU `gpu` of `node` to placement; the faults that led to the
/// quarantine become the baseline, so they do not quarantine it again.
pub(super) fn release_gpu(
    state: &mut ClusterState,
    node: &str,
    gpu: u32,
) -> Result<Outcome, Rejection> {
    let n = state
        .nodes
        .get(node)
        .ok_or_else(|| Rejection::not_found(ObjectKind::Node, node))?
        .clone();
    check_gpu(&n, gpu)?;
    let record = state
        .gpus
        .get_mut(node)
        .and_then(|gpus| gpus.get_mut(&gpu))
        .filter(|r| r.quarantine.is_some())
        .ok_or_else(|| {
            Rejection::FailedPrecondition(format!(
                "gpu {gpu} of node {node} is not quarantined: nothing to release"
            ))
        })?;
    if let Some(faults) = record.quarantine.take().and_then(|q| q.faults) {
        record.baseline = Some(faults);
    }
    Ok(Outcome::Node(Box::new(n)))
}

fn check_gpu(n: &berth_common::Node, gpu: u32) -> Result<(), Rejection> {
    if n.inventory.gpus.iter().any(|g| g.index == gpu) {
        return Ok(());
    }
    Err(Rejection::Invalid(berth_common::ValidationError::new(
        "gpu",
        gpu,
        format!(
            "must be the index of one of node {}'s {} GPUs (see `berth node show {}`)",
            n.name,
            n.inventory.gpus.len(),
            n.name
        ),
    )))
}
