//! Events: what an applied command did, in words. Pure: every member
//! derives the same events from the same log entries, so any member can
//! answer `berth events`. (The leader adds what it observes in heartbeats,
//! such as replica phase changes, outside this module.)

use serde::Serialize;

use super::{Command, Outcome, Rejection, Request};

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// When (ms since the Unix epoch; the leader's clock).
    pub at_ms: u64,
    /// `info` or `warning`.
    pub severity: &'static str,
    /// The kind of object: model, node, deployment, replica.
    pub kind: &'static str,
    /// Its name.
    pub object: String,
    /// What happened, for people.
    pub message: String,
}

fn event(at_ms: u64, kind: &'static str, object: &str, message: String) -> Event {
    Event {
        at_ms,
        severity: "info",
        kind,
        object: object.to_string(),
        message,
    }
}

/// The events of one applied request (none for a rejected command).
pub fn describe(request: &Request, outcome: &Result<Outcome, Rejection>) -> Vec<Event> {
    let mut out = Vec::new();
    describe_into(request.at_ms, &request.command, outcome, &mut out);
    out
}

fn describe_into(
    at: u64,
    command: &Command,
    outcome: &Result<Outcome, Rejection>,
    out: &mut Vec<Event>,
) {
    let Ok(outcome) = outcome else { return };
    match (command, outcome) {
        (Command::Batch(commands), Outcome::Batch(results)) => {
            for (c, r) in commands.iter().zip(results) {
                describe_into(at, c, r, out);
            }
        }
        (Command::CreateModel { name, version }, _) => out.push(event(
            at,
            "model",
            name,
            format!(
                "model {name} registered ({} runtime {})",
                version.version, version.runtime
            ),
        )),
        (Command::DeleteModel { name }, _) => {
            out.push(event(at, "model", name, format!("model {name} deleted")))
        }
        (Command::AddModelVersion { model, version }, _) => out.push(event(
            at,
            "model",
            model,
            format!("version {} added to model {model}", version.version),
        )),
        (Command::RemoveModelVersion { model, version }, _) => out.push(event(
            at,
            "model",
            model,
            format!("version {version} removed from model {model}"),
        )),
        (Command::RegisterNode(r), Outcome::Node(n)) => out.push(event(
            at,
            "node",
            &r.name,
            if n.epoch == 1 && n.registered_at_ms == at {
                format!(
                    "node {} registered: {} GPUs ({}), agent at {}",
                    r.name,
                    n.inventory.gpus.len(),
                    n.inventory.gpu_source,
                    n.addr
                )
            } else {
                format!("node {} registered again (epoch {})", r.name, n.epoch)
            },
        )),
        (Command::SetNodeState { name, to, .. }, _) => {
            let mut e = event(
                at,
                "node",
                name,
                match to {
                    berth_common::NodeState::Down => {
                        format!(
                            "node {name} is down: it missed its heartbeats past the grace period"
                        )
                    }
                    berth_common::NodeState::Ready => format!("node {name} is ready again"),
                },
            );
            if *to == berth_common::NodeState::Down {
                e.severity = "warning";
            }
            out.push(e);
        }
        (
            Command::QuarantineGpu {
                node,
                gpu,
                quarantine,
            },
            _,
        ) => {
            let mut e = event(
                at,
                "node",
                node,
                format!(
                    "gpu {gpu} of node {node} quarantined by {}: {}; its replicas move to other GPUs",
                    quarantine.by.as_str(),
                    quarantine.reason
                ),
            );
            e.severity = "warning";
            out.push(e);
        }
        (Command::ReleaseGpu { node, gpu }, _) => out.push(event(
            at,
            "node",
            node,
            format!("gpu {gpu} of node {node} released: replicas may be placed on it again"),
        )),
        (Command::SetNodeAdmin { name, admin }, _) => out.push(event(
            at,
            "node",
            name,
            match admin {
                berth_common::NodeAdmin::Active => format!("node {name} uncordoned"),
                other => format!("node {name} is {}", other.as_str()),
            },
        )),
        (Command::CreateDeployment { name, .. }, Outcome::Deployment(d)) => out.push(event(
            at,
            "deployment",
            name,
            format!(
                "deployment {name} created: {} replicas of {}:{}",
                d.spec.replicas, d.spec.model, d.spec.version
            ),
        )),
        (Command::ScaleDeployment { name, replicas }, _) => out.push(event(
            at,
            "deployment",
            name,
            format!("deployment {name} scaled to {replicas} replicas"),
        )),
        (Command::SetAutoscale { name, policy }, Outcome::Deployment(d)) => out.push(event(
            at,
            "deployment",
            name,
            match policy {
                Some(p) => format!(
                    "deployment {name} autoscaled: {}-{} replicas, target {} {} per replica, scale-down delay {} s{}; {} replicas now",
                    p.min,
                    p.max,
                    p.target.per_replica(),
                    p.target.metric(),
                    p.scale_down_delay_ms / 1000,
                    p.scale_to_zero_after_ms
                        .map(|z| format!(", to zero after {} s idle", z / 1000))
                        .unwrap_or_default(),
                    d.spec.replicas
                ),
                None => format!(
                    "deployment {name}: autoscaling off; the count stays at {}",
                    d.spec.replicas
                ),
            },
        )),
        (
            Command::Autoscale {
                name,
                from,
                to,
                reason,
                ..
            },
            _,
        ) => out.push(event(
            at,
            "deployment",
            name,
            format!("deployment {name} autoscaled from {from} to {to} replicas: {reason}"),
        )),
        (Command::DeleteDeployment { name }, _) => out.push(event(
            at,
            "deployment",
            name,
            format!("deployment {name} deleted; its replicas are stopped"),
        )),
        (Command::UpdateDeployment { name, .. }, Outcome::Deployment(d)) => out.push(event(
            at,
            "deployment",
            name,
            format!(
                "deployment {name} is at revision {} ({}:{})",
                d.revision, d.spec.model, d.spec.version
            ),
        )),
        (Command::RollbackDeployment { name, .. }, Outcome::Deployment(d)) => out.push(event(
            at,
            "deployment",
            name,
            format!(
                "deployment {name} rolled back to {}:{} as revision {}",
                d.spec.model, d.spec.version, d.revision
            ),
        )),
        (Command::ApplyPlan(binds), Outcome::Plan(results)) => {
            for (b, r) in binds.iter().zip(results) {
                if r.is_ok() {
                    let gpus: Vec<String> = b.gpus.iter().map(|g| g.index.to_string()).collect();
                    out.push(event(
                        at,
                        "replica",
                        &b.replica,
                        if gpus.is_empty() {
                            format!("replica {} placed on node {}", b.replica, b.node)
                        } else {
                            format!(
                                "replica {} placed on node {} (GPU {})",
                                b.replica,
                                b.node,
                                gpus.join(",")
                            )
                        },
                    ));
                }
            }
        }
        (Command::RemoveReplica { id }, _) => out.push(event(
            at,
            "replica",
            id,
            format!("replica {id} stopped and removed"),
        )),
        (Command::ReplaceLostReplicas { node }, _) => {
            let mut e = event(
                at,
                "node",
                node,
                format!("the replicas of node {node} are replaced elsewhere (the node is down)"),
            );
            e.severity = "warning";
            out.push(e);
        }
        (Command::RolloutAdd { name, count }, _) => out.push(event(
            at,
            "deployment",
            name,
            format!("deployment {name}: the rollout adds {count} replicas"),
        )),
        (Command::RolloutRetire { name, replicas }, _) => out.push(event(
            at,
            "deployment",
            name,
            format!(
                "deployment {name}: the rollout retires {}",
                replicas.join(", ")
            ),
        )),
        (Command::PauseRollout { name, reason }, _) => {
            let mut e = event(
                at,
                "deployment",
                name,
                format!("deployment {name}: rollout paused: {reason}"),
            );
            e.severity = "warning";
            out.push(e);
        }
        (Command::EvacuateReplica { id }, _) => out.push(event(
            at,
            "replica",
            id,
            format!(
                "replica {id} moves off its draining node or quarantined GPU: a replacement is added"
            ),
        )),
        (Command::FinishEvacuation { id }, _) => out.push(event(
            at,
            "replica",
            id,
            format!("replica {id} stops: its replacement took over (drain or GPU quarantine)"),
        )),
        (Command::ReplaceFailedReplica { id, reason }, _) => {
            let mut e = event(
                at,
                "replica",
                id,
                format!("replica {id} keeps failing ({reason}): replaced by a new replica"),
            );
            e.severity = "warning";
            out.push(e);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejected_commands_have_no_events_and_batches_have_each() {
        let req = Request {
            at_ms: 5,
            command: Command::Batch(vec![
                Command::DeleteModel { name: "a".into() },
                Command::ScaleDeployment {
                    name: "d".into(),
                    replicas: 3,
                },
            ]),
        };
        let outcome = Ok(Outcome::Batch(vec![
            Err(Rejection::FailedPrecondition("no".into())),
            Ok(Outcome::Noop),
        ]));
        let events = describe(&req, &outcome);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].message, "deployment d scaled to 3 replicas");
        assert_eq!(events[0].at_ms, 5);
        assert!(describe(&req, &Err(Rejection::FailedPrecondition("no".into()))).is_empty());
    }
}
