//! Tests of the linearizability checker: hand-written histories it must
//! reject and accept, generated ones, and a brute-force cross-check.

use super::super::testkit::{Mix, fail, generate, info, ok, seeded, taped};
use super::*;
use proptest::prelude::*;

const M: &str = "model/a";
const D: &str = "deploy/d";

fn create(v: &str) -> Op {
    Op::ModelCreate { version: v.into() }
}

fn add(v: &str) -> Op {
    Op::ModelAddVersion { version: v.into() }
}

fn versions(vs: &[&str]) -> Value {
    Value::Versions {
        versions: vs.iter().map(|v| v.to_string()).collect(),
    }
}

fn replicas(r: u32) -> Value {
    Value::Replicas { replicas: r }
}

fn verdict(ops: &[Operation], key: &str) -> KeyVerdict {
    check_linearizable(ops, DEFAULT_BUDGET)
        .remove(key)
        .unwrap_or_else(|| panic!("no verdict for {key}"))
}

fn assert_linearizable(ops: &[Operation], key: &str) {
    let v = verdict(ops, key);
    assert_eq!(v.result, Verdict::Linearizable, "{key}: {v:?}");
}

/// Asserts a violation and returns its explanation.
fn assert_violation(ops: &[Operation], key: &str) -> String {
    match verdict(ops, key).result {
        Verdict::Violation { explanation } => explanation,
        other => panic!("{key}: expected a violation, got {other:?}"),
    }
}

#[test]
fn a_sequential_history_is_linearizable() {
    let ops = vec![
        ok(1, M, Op::ModelRead, 0, 1, Value::Missing),
        ok(1, M, create("v1"), 2, 3, Value::Done),
        ok(2, M, create("v9"), 4, 5, Value::Exists),
        ok(2, M, add("v2"), 6, 7, Value::Done),
        ok(3, M, add("v2"), 8, 9, Value::Exists),
        ok(1, M, Op::ModelRead, 10, 11, versions(&["v1", "v2"])),
        ok(1, M, Op::ModelDelete, 12, 13, Value::Done),
        ok(2, M, Op::ModelDelete, 14, 15, Value::Missing),
        ok(3, M, add("v3"), 16, 17, Value::Missing),
        ok(1, D, Op::DeployCreate { replicas: 2 }, 0, 1, Value::Done),
        ok(1, D, Op::DeployScale { replicas: 3 }, 2, 3, Value::Done),
        ok(2, D, Op::DeployRead, 4, 5, replicas(3)),
        ok(2, D, Op::DeployDelete, 6, 7, Value::Done),
        ok(2, D, Op::DeployScale { replicas: 1 }, 8, 9, Value::Missing),
    ];
    let all = check_linearizable(&ops, DEFAULT_BUDGET);
    assert_eq!(all.len(), 2);
    for v in all.values() {
        assert_eq!(v.result, Verdict::Linearizable, "{v:?}");
    }
    assert_eq!(all[M].operations, 9);
    assert_eq!(all[D].operations, 5);
}

#[test]
fn concurrent_operations_may_take_effect_in_either_order() {
    // Two overlapping creates: either may win.
    for (a, b) in [(Value::Done, Value::Exists), (Value::Exists, Value::Done)] {
        let ops = vec![
            ok(1, M, create("v1"), 0, 10, a.clone()),
            ok(2, M, create("v2"), 5, 15, b.clone()),
        ];
        assert_linearizable(&ops, M);
    }
    // A read overlapping a scale may see the value before or after it.
    for seen in [1, 2] {
        let ops = vec![
            ok(1, D, Op::DeployCreate { replicas: 1 }, 0, 1, Value::Done),
            ok(1, D, Op::DeployScale { replicas: 2 }, 10, 20, Value::Done),
            ok(2, D, Op::DeployRead, 12, 18, replicas(seen)),
        ];
        assert_linearizable(&ops, D);
    }
}

#[test]
fn a_stale_read_is_rejected() {
    let ops = vec![
        ok(1, M, create("v1"), 0, 10, Value::Done),
        ok(1, M, add("v2"), 20, 30, Value::Done),
        ok(2, M, Op::ModelRead, 40, 50, versions(&["v1"])),
    ];
    let why = assert_violation(&ops, M);
    assert!(why.contains("places 2 of them"), "{why}");
    assert!(
        why.contains("model/a model_read by client 2 via member 1"),
        "{why}"
    );
    assert!(why.contains("answered versions [v1]"), "{why}");
    assert!(
        why.contains("the model answers versions [v1, v2] here"),
        "{why}"
    );
    assert!(
        why.contains("state after it: model with versions [v1, v2]"),
        "{why}"
    );

    // Two reads that disagree about the order of the same write.
    let ops = vec![
        ok(1, D, Op::DeployCreate { replicas: 1 }, 0, 1, Value::Done),
        ok(1, D, Op::DeployScale { replicas: 2 }, 10, 100, Value::Done),
        ok(2, D, Op::DeployRead, 20, 30, replicas(2)),
        ok(3, D, Op::DeployRead, 40, 50, replicas(1)),
    ];
    assert_violation(&ops, D);
}

#[test]
fn a_read_of_a_value_never_written_is_rejected() {
    let ops = vec![
        ok(1, D, Op::DeployCreate { replicas: 1 }, 0, 10, Value::Done),
        ok(2, D, Op::DeployScale { replicas: 2 }, 5, 20, Value::Done),
        ok(3, D, Op::DeployRead, 2, 30, replicas(7)),
    ];
    let why = assert_violation(&ops, D);
    assert!(why.contains("answered replicas 7"), "{why}");
    let ops = vec![
        ok(1, M, create("v1"), 0, 10, Value::Done),
        ok(2, M, Op::ModelRead, 5, 30, versions(&["v1", "v3"])),
    ];
    assert_violation(&ops, M);
}

#[test]
fn an_unknown_write_may_take_effect_or_not() {
    // Its effect is seen later.
    let seen = vec![
        ok(1, D, Op::DeployCreate { replicas: 1 }, 0, 10, Value::Done),
        info(2, D, Op::DeployScale { replicas: 3 }, 20),
        ok(1, D, Op::DeployRead, 1_000, 1_010, replicas(3)),
    ];
    assert_linearizable(&seen, D);
    // It is never seen.
    let unseen = vec![
        ok(1, D, Op::DeployCreate { replicas: 1 }, 0, 10, Value::Done),
        info(2, D, Op::DeployScale { replicas: 3 }, 20),
        ok(1, D, Op::DeployRead, 1_000, 1_010, replicas(1)),
    ];
    assert_linearizable(&unseen, D);
    // Seen long after its client gave up (the answer came, as a timeout).
    let mut late = info(2, M, create("v1"), 0);
    late.complete_ns = Some(5);
    let ops = vec![
        late,
        ok(1, M, Op::ModelRead, 10, 11, Value::Missing),
        ok(1, M, Op::ModelRead, 20, 21, versions(&["v1"])),
    ];
    assert_linearizable(&ops, M);
}

#[test]
fn an_unknown_write_takes_effect_at_most_once_and_not_before_its_invocation() {
    // Seen, then unseen again: it cannot have happened twice.
    let ops = vec![
        ok(1, D, Op::DeployCreate { replicas: 1 }, 0, 10, Value::Done),
        info(2, D, Op::DeployScale { replicas: 3 }, 20),
        ok(1, D, Op::DeployRead, 30, 40, replicas(3)),
        ok(1, D, Op::DeployRead, 50, 60, replicas(1)),
    ];
    assert_violation(&ops, D);
    // Seen by a read that ended before it was invoked.
    let ops = vec![
        ok(1, D, Op::DeployCreate { replicas: 1 }, 0, 10, Value::Done),
        ok(1, D, Op::DeployRead, 12, 18, replicas(3)),
        info(2, D, Op::DeployScale { replicas: 3 }, 20),
    ];
    assert_violation(&ops, D);
}

#[test]
fn a_lost_write_is_rejected() {
    let ops = vec![
        ok(1, M, create("v1"), 0, 10, Value::Done),
        ok(2, M, Op::ModelRead, 20, 30, versions(&["v1"])),
        ok(3, M, Op::ModelRead, 40, 50, Value::Missing),
    ];
    let why = assert_violation(&ops, M);
    assert!(why.contains("client 3"), "{why}");
    assert!(
        why.contains("the model answers versions [v1] here"),
        "{why}"
    );
    // A concurrent delete would explain it.
    let mut with_delete = ops.clone();
    with_delete.push(info(4, M, Op::ModelDelete, 35));
    assert_linearizable(&with_delete, M);
}

#[test]
fn failed_operations_and_unknown_reads_are_dropped() {
    let ops = vec![
        fail(1, M, create("v1"), 0, 10),
        info(2, M, Op::ModelRead, 5),
        ok(3, M, Op::ModelRead, 20, 30, Value::Missing),
    ];
    let v = verdict(&ops, M);
    assert_eq!(v.result, Verdict::Linearizable);
    assert_eq!(v.operations, 1);
    // A failed write certainly did not happen: seeing it is a violation.
    let ops = vec![
        fail(1, M, create("v1"), 0, 10),
        ok(3, M, Op::ModelRead, 20, 30, versions(&["v1"])),
    ];
    assert_violation(&ops, M);
}

#[test]
fn keys_are_judged_alone() {
    let ops = vec![
        ok(1, M, create("v1"), 0, 10, Value::Done),
        ok(1, M, Op::ModelRead, 20, 30, Value::Missing),
        ok(2, "model/b", Op::ModelRead, 20, 30, Value::Missing),
    ];
    let all = check_linearizable(&ops, DEFAULT_BUDGET);
    assert!(matches!(all[M].result, Verdict::Violation { .. }));
    assert_eq!(all["model/b"].result, Verdict::Linearizable);
}

#[test]
fn the_search_gives_up_at_its_budget() {
    let (ops, _) = generate(
        &Mix {
            clients: 4,
            ops: 200,
            deploy: true,
            info_pct: 10,
            fail_pct: 0,
        },
        D,
        &mut seeded(7),
    );
    let v = check_linearizable(&ops, 10).remove(D).unwrap();
    assert_eq!(v.steps, 10);
    match v.result {
        Verdict::Unknown { reason } => assert!(reason.contains("budget"), "{reason}"),
        other => panic!("expected unknown, got {other:?}"),
    }
}

/// A read answer that no write ever produced.
fn never_written(v: &Value, deploy: bool) -> Value {
    match v {
        Value::Versions { versions } => {
            let mut vs = versions.clone();
            vs.push("never".into());
            Value::Versions { versions: vs }
        }
        _ if deploy => replicas(99),
        _ => versions(&["never"]),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn generated_histories_are_linearizable_and_a_forged_read_is_not(
        tape in proptest::collection::vec(any::<u32>(), 1..3000),
        clients in 1u32..6,
        deploy in any::<bool>(),
    ) {
        let key = if deploy { D } else { M };
        let mix = Mix { clients, ops: 300, deploy, info_pct: 8, fail_pct: 4 };
        let (mut ops, _) = generate(&mix, key, &mut taped(&tape));
        let v = verdict(&ops, key);
        prop_assert_eq!(&v.result, &Verdict::Linearizable, "{:?}", v);

        let read = ops.iter().position(|o| !o.op.is_write() && o.is_ok());
        if let Some(r) = read {
            if let Outcome::Ok { value } = &ops[r].outcome {
                let forged = never_written(value, deploy);
                ops[r].outcome = Outcome::Ok { value: forged };
            }
            let v = verdict(&ops, key);
            prop_assert!(matches!(v.result, Verdict::Violation { .. }), "{:?}", v);
        }
    }
}

/// Whether some order explains `ops` (one key), by trying them all.
fn brute_force(ops: &[Operation]) -> bool {
    struct E<'a> {
        call: u64,
        ret: u64,
        op: &'a Op,
        expect: Option<&'a Value>,
    }
    let entries: Vec<E<'_>> = ops
        .iter()
        .filter_map(|o| match &o.outcome {
            Outcome::Ok { value } => Some(E {
                call: o.invoke_ns,
                ret: o.complete_ns.unwrap_or(u64::MAX),
                op: &o.op,
                expect: Some(value),
            }),
            Outcome::Info { .. } if o.op.is_write() => Some(E {
                call: o.invoke_ns,
                ret: u64::MAX,
                op: &o.op,
                expect: None,
            }),
            _ => None,
        })
        .collect();
    fn go(e: &[E<'_>], placed: &mut Vec<bool>, state: &Option<KeyState>) -> bool {
        if (0..e.len()).all(|i| placed[i] || e[i].expect.is_none()) {
            return true;
        }
        for x in 0..e.len() {
            if placed[x] || (0..e.len()).any(|y| !placed[y] && e[y].ret < e[x].call) {
                continue;
            }
            let (next, answer) = super::super::model::step(state, e[x].op);
            if e[x].expect.is_some_and(|want| *want != answer) {
                continue;
            }
            placed[x] = true;
            if go(e, placed, &next) {
                return true;
            }
            placed[x] = false;
        }
        false
    }
    go(&entries, &mut vec![false; entries.len()], &None)
}

/// A small history with arbitrary answers, linearizable or not.
fn arbitrary_history(deploy: bool) -> impl Strategy<Value = Vec<Operation>> {
    let op = (0u64..30, 0u64..15, 0u32..8, 0u32..3, 0u32..10, 0usize..4);
    proptest::collection::vec(op, 1..9).prop_map(move |raw| {
        raw.into_iter()
            .enumerate()
            .map(|(c, (start, len, kind, p, roll, v))| {
                let key = if deploy { D } else { M };
                let version = format!("v{}", p % 2);
                let op = match (deploy, kind) {
                    (true, 0 | 1) => Op::DeployCreate { replicas: p },
                    (true, 2 | 3) => Op::DeployScale { replicas: p },
                    (true, 4) => Op::DeployDelete,
                    (true, _) => Op::DeployRead,
                    (false, 0 | 1) => Op::ModelCreate { version },
                    (false, 2 | 3) => Op::ModelAddVersion { version },
                    (false, 4) => Op::ModelDelete,
                    (false, _) => Op::ModelRead,
                };
                let value = match (op.is_write(), deploy) {
                    (true, _) => {
                        [Value::Done, Value::Exists, Value::Missing, Value::Done][v].clone()
                    }
                    (false, true) => {
                        [Value::Missing, replicas(0), replicas(1), replicas(2)][v].clone()
                    }
                    (false, false) => [
                        Value::Missing,
                        versions(&["v0"]),
                        versions(&["v1"]),
                        versions(&["v0", "v1"]),
                    ][v]
                        .clone(),
                };
                let c = c as u32;
                match roll {
                    0 => fail(c, key, op, start, start + len),
                    1 => info(c, key, op, start),
                    _ => ok(c, key, op, start, start + len, value),
                }
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn the_search_agrees_with_trying_every_order(
        (deploy, ops) in any::<bool>().prop_flat_map(|d| (Just(d), arbitrary_history(d))),
    ) {
        let key = if deploy { D } else { M };
        let fast = verdict(&ops, key).result;
        prop_assert!(!matches!(fast, Verdict::Unknown { .. }), "{:?}", fast);
        prop_assert_eq!(fast == Verdict::Linearizable, brute_force(&ops), "{:#?}", ops);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn the_search_agrees_with_trying_every_order_near_real_executions(
        tape in proptest::collection::vec(any::<u32>(), 1..200),
        n in 2usize..9,
        clients in 1u32..5,
        deploy in any::<bool>(),
        change in proptest::option::of((any::<proptest::sample::Index>(), 0usize..4)),
    ) {
        let key = if deploy { D } else { M };
        let mix = Mix { clients, ops: n, deploy, info_pct: 20, fail_pct: 10 };
        let (mut ops, _) = generate(&mix, key, &mut taped(&tape));
        if let Some((at, v)) = change {
            // One answer replaced by another plausible one.
            let i = at.index(ops.len());
            let write = ops[i].op.is_write();
            if let Outcome::Ok { value } = &mut ops[i].outcome {
                *value = match (write, deploy) {
                    (true, _) => [Value::Done, Value::Exists, Value::Missing, Value::Done][v]
                        .clone(),
                    (false, true) => [Value::Missing, replicas(0), replicas(1), replicas(3)][v]
                        .clone(),
                    (false, false) => [
                        Value::Missing,
                        versions(&["v0"]),
                        versions(&["v1"]),
                        versions(&["v0", "v1"]),
                    ][v]
                        .clone(),
                };
            }
        }
        let fast = verdict(&ops, key).result;
        prop_assert!(!matches!(fast, Verdict::Unknown { .. }), "{:?}", fast);
        prop_assert_eq!(fast == Verdict::Linearizable, brute_force(&ops), "{:#?}", ops);
    }
}

#[test]
fn a_generated_history_with_one_stale_read_is_rejected() {
    let mix = Mix {
        clients: 4,
        ops: 400,
        deploy: true,
        info_pct: 0,
        fail_pct: 0,
    };
    let (mut ops, _) = generate(&mix, D, &mut seeded(42));
    assert_linearizable(&ops, D);
    // A read and a value v it cannot see: every write of v ended before
    // some other acknowledged write began that itself ended before the
    // read began (this history has no failed or unknown operations).
    let done = |w: &Operation| w.outcome == (Outcome::Ok { value: Value::Done });
    let sets = |w: &Operation| match w.op {
        Op::DeployCreate { replicas } | Op::DeployScale { replicas } => Some(replicas),
        _ => None,
    };
    let end = |w: &Operation| w.complete_ns.unwrap_or(u64::MAX);
    let mut target = None;
    'reads: for (i, o) in ops.iter().enumerate() {
        let Outcome::Ok {
            value: Value::Replicas { replicas: seen },
        } = o.outcome
        else {
            continue;
        };
        for v in (0..5).filter(|&v| v != seen) {
            let last_v = ops
                .iter()
                .filter(|w| done(w) && sets(w) == Some(v))
                .map(end)
                .max();
            let Some(last_v) = last_v else { continue };
            let overwritten = ops.iter().any(|w| {
                done(w) && sets(w) != Some(v) && w.invoke_ns > last_v && end(w) < o.invoke_ns
            });
            if overwritten {
                target = Some((i, v));
                break 'reads;
            }
        }
    }
    let (i, stale) = target.expect("a read after a value was overwritten");
    ops[i].outcome = Outcome::Ok {
        value: replicas(stale),
    };
    let why = assert_violation(&ops, D);
    assert!(why.contains(&format!("answered replicas {stale}")), "{why}");
}

#[test]
fn unknown_writes_nobody_could_see_are_not_tried() {
    // Versions added with unknown outcome, each unique and never read:
    // trying each at every point would be exponential.
    let mut ops = vec![ok(0, M, create("v"), 0, 1, Value::Done)];
    for n in 0..200u64 {
        let t = 10 + 10 * n;
        ops.push(info(1 + (n % 5) as u32, M, add(&format!("u{n}")), t));
        ops.push(ok(9, M, Op::ModelRead, t + 1, t + 2, versions(&["v"])));
    }
    let v = verdict(&ops, M);
    assert_eq!(v.result, Verdict::Linearizable, "{v:?}");
    assert_eq!(v.operations, 401);
    assert!(v.steps < 10_000, "{v:?}");
    // One that was seen is tried, and must have taken effect in time.
    ops.push(ok(
        9,
        M,
        Op::ModelRead,
        5_000,
        5_001,
        versions(&["u7", "v"]),
    ));
    assert_linearizable(&ops, M);
    ops.push(ok(8, M, Op::ModelRead, 50, 51, versions(&["u7", "v"])));
    assert_violation(&ops, M);
}

#[test]
fn many_unknown_writes_stay_tractable() {
    let mix = Mix {
        clients: 5,
        ops: 600,
        deploy: true,
        info_pct: 30,
        fail_pct: 5,
    };
    let (ops, _) = generate(&mix, D, &mut seeded(3));
    let v = verdict(&ops, D);
    assert_eq!(v.result, Verdict::Linearizable, "{v:?}");
    eprintln!("600 operations, 30 % unknown: {} steps", v.steps);
}

#[test]
fn two_thousand_operations_from_four_clients_fit_the_default_budget() {
    for deploy in [true, false] {
        let key = if deploy { D } else { M };
        let mix = Mix {
            clients: 4,
            ops: 2_000,
            deploy,
            info_pct: 2,
            fail_pct: 0,
        };
        let (ops, _) = generate(&mix, key, &mut seeded(2_000));
        assert_eq!(ops.len(), 2_000);
        let started = std::time::Instant::now();
        let v = verdict(&ops, key);
        eprintln!(
            "{key}: {} operations ({} after dropping unknown reads) checked in {:?} ({} steps)",
            ops.len(),
            v.operations,
            started.elapsed(),
            v.steps
        );
        assert_eq!(v.result, Verdict::Linearizable, "{v:?}");
    }
}
