//! The recorded history of a fault run: what each client invoked and how
//! it ended, and the faults injected, in one time line. Written as JSON
//! lines while the run goes on, read back by the checkers.
//!
//! Times are nanoseconds on the harness's monotonic clock since the run
//! started. An operation whose outcome is unknown (a timeout, a dropped
//! connection, "no leader") is `Info`: it may have taken effect at any
//! moment after its invocation, or never.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One operation on the registry, addressed to one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "snake_case")]
pub enum Op {
    /// Registers model `key` with its first version.
    ModelCreate { version: String },
    /// Adds a version to model `key`.
    ModelAddVersion { version: String },
    /// Deletes model `key`.
    ModelDelete,
    /// Reads model `key`'s versions.
    ModelRead,
    /// Creates deployment `key` with `replicas`.
    DeployCreate { replicas: u32 },
    /// Sets deployment `key`'s replica count.
    DeployScale { replicas: u32 },
    /// Deletes deployment `key`.
    DeployDelete,
    /// Reads deployment `key`'s replica count.
    DeployRead,
}

impl Op {
    /// Whether the operation can change the state (reads cannot).
    pub fn is_write(&self) -> bool {
        !matches!(self, Op::ModelRead | Op::DeployRead)
    }
}

/// What a completed operation answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "v", rename_all = "snake_case")]
pub enum Value {
    /// The write took effect.
    Done,
    /// Refused: the key (or the version) already exists.
    Exists,
    /// Refused, or read: the key does not exist.
    Missing,
    /// A model's versions, sorted.
    Versions { versions: Vec<String> },
    /// A deployment's replica count.
    Replicas { replicas: u32 },
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outcome {
    /// It completed with this answer.
    Ok { value: Value },
    /// It certainly did not take effect.
    Fail { error: String },
    /// Unknown: it may or may not have taken effect.
    Info { error: String },
}

/// One line of the history file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A client invoked `op` on `key` through `member`.
    Invoke {
        t_ns: u64,
        client: u32,
        member: u64,
        key: String,
        op: Op,
    },
    /// The client's pending operation ended.
    Complete {
        t_ns: u64,
        client: u32,
        outcome: Outcome,
    },
    /// A fault began or ended (`what` is the schedule's description).
    Fault {
        t_ns: u64,
        phase: String,
        what: serde_json::Value,
    },
}

/// An invocation paired with its completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// Which client ran it (a client runs one operation at a time).
    pub client: u32,
    /// The member it went to.
    pub member: u64,
    /// The key it addressed.
    pub key: String,
    /// What it asked.
    pub op: Op,
    /// When it was invoked.
    pub invoke_ns: u64,
    /// When its answer came; None when it never came (the run ended first).
    pub complete_ns: Option<u64>,
    /// How it ended; an operation that never completed is `Info`.
    pub outcome: Outcome,
}

impl Operation {
    /// Whether the operation completed with a known answer.
    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, Outcome::Ok { .. })
    }
}

/// Pairs invocations with completions, in invocation order. An invocation
/// left pending when the history ends is kept as `Info`.
pub fn operations(events: &[Event]) -> Result<Vec<Operation>, String> {
    let mut pending: BTreeMap<u32, usize> = BTreeMap::new();
    let mut out: Vec<Operation> = Vec::new();
    for (line, e) in events.iter().enumerate() {
        match e {
            Event::Invoke {
                t_ns,
                client,
                member,
                key,
                op,
            } => {
                if pending.contains_key(client) {
                    return Err(format!(
                        "line {}: client {client} invoked while an operation was pending",
                        line + 1
                    ));
                }
                pending.insert(*client, out.len());
                out.push(Operation {
                    client: *client,
                    member: *member,
                    key: key.clone(),
                    op: op.clone(),
                    invoke_ns: *t_ns,
                    complete_ns: None,
                    outcome: Outcome::Info {
                        error: "no answer before the run ended".into(),
                    },
                });
            }
            Event::Complete {
                t_ns,
                client,
                outcome,
            } => {
                let Some(i) = pending.remove(client) else {
                    return Err(format!(
                        "line {}: client {client} completed with nothing pending",
                        line + 1
                    ));
                };
                out[i].complete_ns = Some(*t_ns);
                out[i].outcome = outcome.clone();
            }
            Event::Fault { .. } => {}
        }
    }
    Ok(out)
}

/// Reads a history file (JSON lines); a torn last line (a run killed while
/// writing) is skipped.
pub fn read_history(path: &Path) -> anyhow::Result<Vec<Event>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("read history {}: {e}", path.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut events = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        match serde_json::from_str(l) {
            Ok(e) => events.push(e),
            Err(_) if i + 1 == lines.len() => break,
            Err(e) => anyhow::bail!("history {} line {}: {e}", path.display(), i + 1),
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_invocations_and_keeps_pending_ones_as_info() {
        let events = vec![
            Event::Invoke {
                t_ns: 1,
                client: 0,
                member: 1,
                key: "model/a".into(),
                op: Op::ModelCreate {
                    version: "v1".into(),
                },
            },
            Event::Invoke {
                t_ns: 2,
                client: 1,
                member: 2,
                key: "model/a".into(),
                op: Op::ModelRead,
            },
            Event::Complete {
                t_ns: 3,
                client: 0,
                outcome: Outcome::Ok { value: Value::Done },
            },
        ];
        let ops = operations(&events).unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0].complete_ns, Some(3));
        assert!(ops[0].is_ok());
        assert_eq!(ops[1].complete_ns, None);
        assert!(matches!(ops[1].outcome, Outcome::Info { .. }));
    }

    #[test]
    fn refuses_a_completion_without_an_invocation() {
        let events = vec![Event::Complete {
            t_ns: 3,
            client: 0,
            outcome: Outcome::Ok { value: Value::Done },
        }];
        assert!(operations(&events).is_err());
    }

    #[test]
    fn lines_round_trip() {
        let e = Event::Invoke {
            t_ns: 7,
            client: 2,
            member: 3,
            key: "deploy/d".into(),
            op: Op::DeployScale { replicas: 2 },
        };
        let line = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), e);
    }
}
