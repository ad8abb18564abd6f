//! Judgements on the registry as a whole after the faults healed: no
//! acknowledged write lost, members that applied the same log agree, and
//! writes get acknowledged again soon after healing.

use std::collections::BTreeMap;

use super::describe::{describe, fmt_state};
use super::model::KeyState;
use crate::faults::history::{Op, Operation, Outcome, Value};

/// One member's state digest at the log index it had applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberDigest {
    /// The member's Raft id.
    pub member: u64,
    /// The last log index it had applied when the digest was taken.
    pub applied_index: u64,
    /// Its state machine's digest at that index.
    pub digest: String,
}

/// Acknowledged writes missing from `finals` (each key's state read after
/// healing; keys absent from `finals` are not judged), one message each.
///
/// A version created or added with answer `Done` must still be there unless
/// a model delete that may have taken effect (answered `Done`, or unknown)
/// completed at or after the write's invocation. A deployment created or
/// scaled to `r` with answer `Done` must still have `r` replicas unless
/// another write on the key that may have taken effect completed at or
/// after its invocation. A write that answered `Exists` or `Missing`
/// changed nothing, so it excuses nothing; one with unknown outcome counts
/// as completing never (it may take effect after its client gave up).
pub fn lost_writes(ops: &[Operation], finals: &BTreeMap<String, Option<KeyState>>) -> Vec<String> {
    let mut lost = Vec::new();
    for (n, w) in ops.iter().enumerate() {
        if !matches!(&w.outcome, Outcome::Ok { value: Value::Done }) {
            continue;
        }
        let Some(fin) = finals.get(&w.key) else {
            continue;
        };
        // Whether `o` may have overwritten `w`: it may have taken effect,
        // and not certainly before `w` was invoked. An unknown outcome
        // counts as never completing: it may take effect after its client
        // gave up.
        let later = |o: &Operation| {
            o.key == w.key
                && may_have_taken_effect(o)
                && (matches!(o.outcome, Outcome::Info { .. })
                    || o.complete_ns.is_none_or(|c| c >= w.invoke_ns))
        };
        let kept = match &w.op {
            Op::ModelCreate { version } | Op::ModelAddVersion { version } => {
                matches!(fin, Some(KeyState::Model { versions }) if versions.contains(version))
                    || ops
                        .iter()
                        .any(|o| matches!(o.op, Op::ModelDelete) && later(o))
            }
            Op::DeployCreate { replicas } | Op::DeployScale { replicas } => {
                *fin == Some(KeyState::Deployment {
                    replicas: *replicas,
                }) || ops
                    .iter()
                    .enumerate()
                    .any(|(m, o)| m != n && o.op.is_write() && later(o))
            }
            _ => true,
        };
        if !kept {
            lost.push(format!(
                "{}: acknowledged write lost: {}; the final state is {} and nothing \
                 acknowledged or pending afterwards could have undone it",
                w.key,
                describe(w),
                fmt_state(fin)
            ));
        }
    }
    lost
}

/// Whether the operation may have changed its key.
fn may_have_taken_effect(o: &Operation) -> bool {
    o.op.is_write()
        && matches!(
            o.outcome,
            Outcome::Ok { value: Value::Done } | Outcome::Info { .. }
        )
}

/// Members at the same applied index must have the same digest; no
/// readings at all is a failure too (nothing was checked).
pub fn converged(readings: &[MemberDigest]) -> Result<(), String> {
    if readings.is_empty() {
        return Err("no member reported a state digest".into());
    }
    let mut at: BTreeMap<u64, BTreeMap<&str, Vec<u64>>> = BTreeMap::new();
    for r in readings {
        at.entry(r.applied_index)
            .or_default()
            .entry(r.digest.as_str())
            .or_default()
            .push(r.member);
    }
    let problems: Vec<String> = at
        .iter()
        .filter(|(_, digests)| digests.len() > 1)
        .map(|(index, digests)| {
            let sides: Vec<String> = digests
                .iter()
                .map(|(d, members)| {
                    let m: Vec<String> = members.iter().map(u64::to_string).collect();
                    format!("member(s) {} have {d}", m.join(", "))
                })
                .collect();
            format!(
                "members disagree at applied index {index}: {}",
                sides.join("; ")
            )
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

/// Nanoseconds from `healed_ns` to the first acknowledged write invoked at
/// or after it; an error when none was acknowledged within `limit_ns`.
pub fn liveness(ops: &[Operation], healed_ns: u64, limit_ns: u64) -> Result<u64, String> {
    let after: Vec<&Operation> = ops
        .iter()
        .filter(|o| o.op.is_write() && o.invoke_ns >= healed_ns)
        .collect();
    let first = after
        .iter()
        .filter(|o| o.is_ok())
        .filter_map(|o| o.complete_ns)
        .min();
    let secs = |ns: u64| ns as f64 / 1e9;
    match first {
        Some(c) if c.saturating_sub(healed_ns) <= limit_ns => Ok(c.saturating_sub(healed_ns)),
        Some(c) => Err(format!(
            "the first write acknowledged after healing came {:.3}s after it, over the \
             limit of {:.3}s",
            secs(c.saturating_sub(healed_ns)),
            secs(limit_ns)
        )),
        None => {
            let failed = after
                .iter()
                .filter(|o| matches!(o.outcome, Outcome::Fail { .. }))
                .count();
            Err(format!(
                "no write invoked after healing (at {:.3}s) was acknowledged: {} invoked, \
                 {failed} failed, {} with unknown outcome",
                secs(healed_ns),
                after.len(),
                after.len() - failed
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{Mix, fail, generate, info, ok, seeded};
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn model(vs: &[&str]) -> Option<KeyState> {
        Some(KeyState::Model {
            versions: vs.iter().map(|v| v.to_string()).collect::<BTreeSet<_>>(),
        })
    }

    fn deploy(r: u32) -> Option<KeyState> {
        Some(KeyState::Deployment { replicas: r })
    }

    fn finals(entries: &[(&str, Option<KeyState>)]) -> BTreeMap<String, Option<KeyState>> {
        entries
            .iter()
            .map(|(k, s)| (k.to_string(), s.clone()))
            .collect()
    }

    fn create(v: &str) -> Op {
        Op::ModelCreate { version: v.into() }
    }

    fn add(v: &str) -> Op {
        Op::ModelAddVersion { version: v.into() }
    }

    #[test]
    fn a_lost_acknowledged_version_is_reported() {
        let ops = vec![
            ok(1, "model/a", create("v1"), 10, 20, Value::Done),
            ok(2, "model/a", add("v2"), 30, 40, Value::Done),
        ];
        let lost = lost_writes(&ops, &finals(&[("model/a", model(&["v1"]))]));
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert!(lost[0].contains("model_add_version v2"), "{}", lost[0]);
        assert!(lost[0].contains("client 2"), "{}", lost[0]);
        assert!(lost[0].contains("member 1"), "{}", lost[0]);
        assert!(lost[0].contains("0.000000030s"), "{}", lost[0]);

        // The whole model vanished: both writes are lost.
        let lost = lost_writes(&ops, &finals(&[("model/a", None)]));
        assert_eq!(lost.len(), 2, "{lost:?}");
    }

    #[test]
    fn a_delete_that_may_have_come_later_excuses_a_missing_version() {
        let ops = vec![
            ok(1, "model/a", create("v1"), 10, 20, Value::Done),
            info(2, "model/a", Op::ModelDelete, 15),
        ];
        assert!(lost_writes(&ops, &finals(&[("model/a", None)])).is_empty());
        let ops = vec![
            ok(1, "model/a", create("v1"), 10, 20, Value::Done),
            ok(2, "model/a", Op::ModelDelete, 5, 12, Value::Done),
        ];
        assert!(lost_writes(&ops, &finals(&[("model/a", None)])).is_empty());
        // A delete that timed out before the create may still have taken
        // effect after it.
        let mut timed_out = fail(2, "model/a", Op::ModelDelete, 1, 5);
        timed_out.outcome = Outcome::Info {
            error: "timeout".into(),
        };
        let ops = vec![
            ok(1, "model/a", create("v1"), 10, 20, Value::Done),
            timed_out,
        ];
        assert!(lost_writes(&ops, &finals(&[("model/a", None)])).is_empty());
    }

    #[test]
    fn deletes_that_certainly_did_nothing_or_came_before_excuse_nothing() {
        let ops = vec![
            ok(2, "model/a", Op::ModelDelete, 1, 5, Value::Done),
            ok(1, "model/a", create("v1"), 10, 20, Value::Done),
            ok(3, "model/a", Op::ModelDelete, 30, 40, Value::Missing),
            fail(4, "model/a", Op::ModelDelete, 30, 40),
            ok(5, "model/b", Op::ModelDelete, 30, 40, Value::Done),
        ];
        let lost = lost_writes(&ops, &finals(&[("model/a", None)]));
        assert_eq!(lost.len(), 1, "{lost:?}");
    }

    #[test]
    fn an_overwritten_scale_is_not_lost() {
        let ops = vec![
            ok(
                1,
                "deploy/d",
                Op::DeployCreate { replicas: 1 },
                10,
                20,
                Value::Done,
            ),
            ok(
                1,
                "deploy/d",
                Op::DeployScale { replicas: 3 },
                30,
                40,
                Value::Done,
            ),
            info(2, "deploy/d", Op::DeployScale { replicas: 2 }, 35),
        ];
        assert!(lost_writes(&ops, &finals(&[("deploy/d", deploy(2))])).is_empty());
        // With the unknown scale gone, the acknowledged 3 was lost.
        let lost = lost_writes(&ops[..2], &finals(&[("deploy/d", deploy(2))]));
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert!(lost[0].contains("deploy_scale 3"), "{}", lost[0]);
    }

    #[test]
    fn a_lost_deployment_is_reported_and_unjudged_keys_are_skipped() {
        let ops = vec![
            ok(
                1,
                "deploy/d",
                Op::DeployCreate { replicas: 2 },
                10,
                20,
                Value::Done,
            ),
            ok(
                1,
                "deploy/e",
                Op::DeployCreate { replicas: 2 },
                10,
                20,
                Value::Done,
            ),
            ok(
                2,
                "deploy/d",
                Op::DeployScale { replicas: 4 },
                25,
                26,
                Value::Missing,
            ),
        ];
        let lost = lost_writes(&ops, &finals(&[("deploy/d", None)]));
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert!(lost[0].starts_with("deploy/d:"), "{}", lost[0]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn a_real_execution_loses_nothing(
            seed in any::<u64>(),
            clients in 1u32..6,
            deploy in any::<bool>(),
        ) {
            let key = if deploy { "deploy/d" } else { "model/a" };
            let mix = Mix { clients, ops: 300, deploy, info_pct: 10, fail_pct: 5 };
            let (ops, fin) = generate(&mix, key, &mut seeded(seed));
            prop_assert_eq!(lost_writes(&ops, &finals(&[(key, fin)])), Vec::<String>::new());
        }
    }

    fn digest(member: u64, applied_index: u64, digest: &str) -> MemberDigest {
        MemberDigest {
            member,
            applied_index,
            digest: digest.into(),
        }
    }

    #[test]
    fn members_at_the_same_index_must_agree() {
        assert!(converged(&[digest(1, 10, "aa"), digest(2, 10, "aa"), digest(3, 9, "bb")]).is_ok());
        let err = converged(&[
            digest(1, 10, "aa"),
            digest(2, 10, "ab"),
            digest(3, 10, "aa"),
        ])
        .unwrap_err();
        assert!(err.contains("applied index 10"), "{err}");
        assert!(err.contains("member(s) 1, 3 have aa"), "{err}");
        assert!(err.contains("member(s) 2 have ab"), "{err}");
        assert!(converged(&[]).is_err());
    }

    #[test]
    fn liveness_measures_the_first_acknowledged_write_after_healing() {
        let s = 1_000_000_000;
        let ops = vec![
            ok(
                1,
                "deploy/d",
                Op::DeployScale { replicas: 1 },
                s,
                3 * s,
                Value::Done,
            ),
            ok(
                2,
                "deploy/d",
                Op::DeployRead,
                11 * s,
                11 * s + 5,
                Value::Missing,
            ),
            fail(
                3,
                "deploy/d",
                Op::DeployScale { replicas: 2 },
                10 * s,
                11 * s,
            ),
            ok(
                3,
                "deploy/d",
                Op::DeployScale { replicas: 2 },
                12 * s,
                14 * s,
                Value::Missing,
            ),
            ok(
                4,
                "deploy/d",
                Op::DeployScale { replicas: 2 },
                11 * s,
                15 * s,
                Value::Done,
            ),
        ];
        assert_eq!(liveness(&ops, 10 * s, 5 * s), Ok(4 * s));
        let err = liveness(&ops, 10 * s, 3 * s).unwrap_err();
        assert!(err.contains("4.000s after it"), "{err}");
        let err = liveness(&ops[..3], 10 * s, 30 * s).unwrap_err();
        assert!(err.contains("1 invoked, 1 failed"), "{err}");
        // A write invoked before healing does not count, however late it answered.
        let late = vec![ok(
            1,
            "model/a",
            create("v"),
            9 * s,
            10 * s + 1,
            Value::Done,
        )];
        assert!(liveness(&late, 10 * s, 5 * s).is_err());
    }
}
