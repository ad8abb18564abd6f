//! The sequential specification of one registry key, as porcupine's
//! `Model` (`Init`, `Step`, `Equal`): every key starts absent (`None`), and
//! `step` says what an operation answers and leaves behind.
//!
//! A key's prefix ("model/" or "deploy/") fixes the kind of what it holds;
//! should an operation of the other kind reach it anyway (a harness bug),
//! creates answer `Exists` and every other operation sees the key as absent
//! and changes nothing.

use std::collections::BTreeSet;

use crate::faults::history::{Op, Value};

/// What one key holds while present.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyState {
    /// A model and its versions.
    Model {
        /// The registered versions.
        versions: BTreeSet<String>,
    },
    /// A deployment and its replica count.
    Deployment {
        /// The desired replica count.
        replicas: u32,
    },
}

/// The state after `op` on `state` and what `op` answers.
pub fn step(state: &Option<KeyState>, op: &Op) -> (Option<KeyState>, Value) {
    let (next, value) = apply(state, op);
    (next.unwrap_or_else(|| state.clone()), value)
}

/// Like `step`, but `None` when the state is unchanged (no clone).
pub(super) fn apply(state: &Option<KeyState>, op: &Op) -> (Option<Option<KeyState>>, Value) {
    let versions = match state {
        Some(KeyState::Model { versions }) => Some(versions),
        _ => None,
    };
    let replicas = match state {
        Some(KeyState::Deployment { replicas }) => Some(*replicas),
        _ => None,
    };
    match op {
        Op::ModelCreate { version } => match state {
            None => (
                Some(Some(KeyState::Model {
                    versions: BTreeSet::from([version.clone()]),
                })),
                Value::Done,
            ),
            Some(_) => (None, Value::Exists),
        },
        Op::ModelAddVersion { version } => match versions {
            None => (None, Value::Missing),
            Some(v) if v.contains(version) => (None, Value::Exists),
            Some(v) => {
                let mut v = v.clone();
                v.insert(version.clone());
                (Some(Some(KeyState::Model { versions: v })), Value::Done)
            }
        },
        Op::ModelDelete => match versions {
            None => (None, Value::Missing),
            Some(_) => (Some(None), Value::Done),
        },
        Op::ModelRead => match versions {
            None => (None, Value::Missing),
            Some(v) => (
                None,
                Value::Versions {
                    versions: v.iter().cloned().collect(),
                },
            ),
        },
        Op::DeployCreate { replicas: r } => match state {
            None => (
                Some(Some(KeyState::Deployment { replicas: *r })),
                Value::Done,
            ),
            Some(_) => (None, Value::Exists),
        },
        Op::DeployScale { replicas: r } => match replicas {
            None => (None, Value::Missing),
            Some(_) => (
                Some(Some(KeyState::Deployment { replicas: *r })),
                Value::Done,
            ),
        },
        Op::DeployDelete => match replicas {
            None => (None, Value::Missing),
            Some(_) => (Some(None), Value::Done),
        },
        Op::DeployRead => match replicas {
            None => (None, Value::Missing),
            Some(r) => (None, Value::Replicas { replicas: r }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(vs: &[&str]) -> Option<KeyState> {
        Some(KeyState::Model {
            versions: vs.iter().map(|v| v.to_string()).collect(),
        })
    }

    fn create(v: &str) -> Op {
        Op::ModelCreate { version: v.into() }
    }

    fn add(v: &str) -> Op {
        Op::ModelAddVersion { version: v.into() }
    }

    #[test]
    fn models_follow_the_specification() {
        let absent = None;
        assert_eq!(step(&absent, &create("v1")), (model(&["v1"]), Value::Done));
        assert_eq!(step(&absent, &add("v1")), (None, Value::Missing));
        assert_eq!(step(&absent, &Op::ModelDelete), (None, Value::Missing));
        assert_eq!(step(&absent, &Op::ModelRead), (None, Value::Missing));

        let m = model(&["v1"]);
        assert_eq!(step(&m, &create("v2")), (m.clone(), Value::Exists));
        assert_eq!(step(&m, &add("v1")), (m.clone(), Value::Exists));
        assert_eq!(step(&m, &add("v0")), (model(&["v0", "v1"]), Value::Done));
        assert_eq!(step(&m, &Op::ModelDelete), (None, Value::Done));
        let two = model(&["v2", "v1"]);
        assert_eq!(
            step(&two, &Op::ModelRead),
            (
                two.clone(),
                Value::Versions {
                    versions: vec!["v1".into(), "v2".into()]
                }
            )
        );
    }

    #[test]
    fn deployments_follow_the_specification() {
        let absent = None;
        let d = |r| Some(KeyState::Deployment { replicas: r });
        let op = |r| Op::DeployCreate { replicas: r };
        assert_eq!(step(&absent, &op(2)), (d(2), Value::Done));
        assert_eq!(
            step(&absent, &Op::DeployScale { replicas: 1 }),
            (None, Value::Missing)
        );
        assert_eq!(step(&absent, &Op::DeployDelete), (None, Value::Missing));
        assert_eq!(step(&absent, &Op::DeployRead), (None, Value::Missing));

        assert_eq!(step(&d(2), &op(3)), (d(2), Value::Exists));
        assert_eq!(
            step(&d(2), &Op::DeployScale { replicas: 5 }),
            (d(5), Value::Done)
        );
        assert_eq!(step(&d(2), &Op::DeployDelete), (None, Value::Done));
        assert_eq!(
            step(&d(2), &Op::DeployRead),
            (d(2), Value::Replicas { replicas: 2 })
        );
    }

    #[test]
    fn the_other_kind_sees_the_key_absent_but_cannot_create_over_it() {
        let d = Some(KeyState::Deployment { replicas: 2 });
        assert_eq!(step(&d, &create("v1")), (d.clone(), Value::Exists));
        assert_eq!(step(&d, &Op::ModelDelete), (d.clone(), Value::Missing));
        assert_eq!(step(&d, &Op::ModelRead), (d.clone(), Value::Missing));
        let m = model(&["v1"]);
        assert_eq!(
            step(&m, &Op::DeployCreate { replicas: 1 }),
            (m.clone(), Value::Exists)
        );
        assert_eq!(
            step(&m, &Op::DeployScale { replicas: 1 }),
            (m.clone(), Value::Missing)
        );
    }
}
