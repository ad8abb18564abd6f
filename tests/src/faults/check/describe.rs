//! Operations, answers and states printed for people, as the checkers'
//! messages show them. Times are seconds since the run started.

use super::model::KeyState;
use crate::faults::history::{Op, Operation, Outcome, Value};

/// One operation for a person: key, what, who, when, and how it ended.
pub fn describe(op: &Operation) -> String {
    let at = op.complete_ns.map_or_else(|| "never".to_string(), fmt_t);
    let end = match (&op.outcome, op.complete_ns) {
        (Outcome::Ok { value }, _) => format!("answered {} at {at}", fmt_value(value)),
        (Outcome::Fail { error }, _) => format!("failed at {at} ({error})"),
        (Outcome::Info { error }, Some(_)) => format!("outcome unknown at {at} ({error})"),
        (Outcome::Info { error }, None) => format!("outcome unknown, never answered ({error})"),
    };
    format!(
        "{} {} by client {} via member {}, invoked at {}, {end}",
        op.key,
        fmt_op(&op.op),
        op.client,
        op.member,
        fmt_t(op.invoke_ns)
    )
}

pub(super) fn fmt_t(ns: u64) -> String {
    if ns == u64::MAX {
        return "never".into();
    }
    format!("{}.{:09}s", ns / 1_000_000_000, ns % 1_000_000_000)
}

pub(super) fn fmt_op(op: &Op) -> String {
    match op {
        Op::ModelCreate { version } => format!("model_create {version}"),
        Op::ModelAddVersion { version } => format!("model_add_version {version}"),
        Op::ModelDelete => "model_delete".into(),
        Op::ModelRead => "model_read".into(),
        Op::DeployCreate { replicas } => format!("deploy_create {replicas}"),
        Op::DeployScale { replicas } => format!("deploy_scale {replicas}"),
        Op::DeployDelete => "deploy_delete".into(),
        Op::DeployRead => "deploy_read".into(),
    }
}

pub(super) fn fmt_value(v: &Value) -> String {
    match v {
        Value::Done => "done".into(),
        Value::Exists => "exists".into(),
        Value::Missing => "missing".into(),
        Value::Versions { versions } => format!("versions [{}]", versions.join(", ")),
        Value::Replicas { replicas } => format!("replicas {replicas}"),
    }
}

pub(super) fn fmt_state(s: &Option<KeyState>) -> String {
    match s {
        None => "absent".into(),
        Some(KeyState::Model { versions }) => format!(
            "model with versions [{}]",
            versions.iter().cloned().collect::<Vec<_>>().join(", ")
        ),
        Some(KeyState::Deployment { replicas }) => format!("deployment with {replicas} replicas"),
    }
}
