//! Test helpers: operation builders and a generator of concurrent histories
//! from a real sequential execution (so they are linearizable by
//! construction), driven by a tape of random numbers.

use super::model::{KeyState, step};
use crate::faults::history::{Op, Operation, Outcome, Value};

/// An operation that completed with `value` (member 1).
pub(crate) fn ok(
    client: u32,
    key: &str,
    op: Op,
    invoke: u64,
    complete: u64,
    value: Value,
) -> Operation {
    Operation {
        client,
        member: 1,
        key: key.into(),
        op,
        invoke_ns: invoke,
        complete_ns: Some(complete),
        outcome: Outcome::Ok { value },
    }
}

/// An operation with unknown outcome that never answered.
pub(crate) fn info(client: u32, key: &str, op: Op, invoke: u64) -> Operation {
    Operation {
        client,
        member: 1,
        key: key.into(),
        op,
        invoke_ns: invoke,
        complete_ns: None,
        outcome: Outcome::Info {
            error: "timeout".into(),
        },
    }
}

/// An operation that certainly failed.
pub(crate) fn fail(client: u32, key: &str, op: Op, invoke: u64, complete: u64) -> Operation {
    Operation {
        client,
        member: 1,
        key: key.into(),
        op,
        invoke_ns: invoke,
        complete_ns: Some(complete),
        outcome: Outcome::Fail {
            error: "not leader".into(),
        },
    }
}

/// What to generate.
pub(crate) struct Mix {
    pub clients: u32,
    pub ops: usize,
    /// A deployment key (else a model key).
    pub deploy: bool,
    /// Percent of operations with unknown outcome.
    pub info_pct: u32,
    /// Percent of operations that fail.
    pub fail_pct: u32,
}

/// A draw function over a seed (splitmix64).
pub(crate) fn seeded(seed: u64) -> impl FnMut() -> u32 {
    let mut x = seed;
    move || {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 32) as u32
    }
}

/// A draw function over a tape (cycled; zeros when empty).
pub(crate) fn taped(tape: &[u32]) -> impl FnMut() -> u32 + '_ {
    let mut k = 0;
    move || {
        let v = if tape.is_empty() {
            0
        } else {
            tape[k % tape.len()]
        };
        k += 1;
        v
    }
}

fn random_op(deploy: bool, draw: &mut dyn FnMut() -> u32) -> Op {
    let roll = draw() % 10;
    let n = draw();
    match (deploy, roll) {
        (false, 0 | 1) => Op::ModelCreate {
            version: format!("v{}", n % 4),
        },
        (false, 2 | 3) => Op::ModelAddVersion {
            version: format!("v{}", n % 6),
        },
        (false, 4) => Op::ModelDelete,
        (false, _) => Op::ModelRead,
        (true, 0 | 1) => Op::DeployCreate { replicas: n % 5 },
        (true, 2 | 3) => Op::DeployScale { replicas: n % 5 },
        (true, 4) => Op::DeployDelete,
        (true, _) => Op::DeployRead,
    }
}

/// A concurrent history of `mix.ops` operations on `key` and the true
/// final state. Each operation takes effect at one instant between its
/// invocation and its answer; an unknown one takes effect then, later
/// (even after its client gave up), or never.
pub(crate) fn generate(
    mix: &Mix,
    key: &str,
    draw: &mut dyn FnMut() -> u32,
) -> (Vec<Operation>, Option<KeyState>) {
    #[derive(Clone, Copy)]
    enum Slot {
        Idle,
        Pending { i: usize, applied: bool },
    }
    let mut state: Option<KeyState> = None;
    let mut out: Vec<Operation> = Vec::new();
    let mut slots = vec![Slot::Idle; mix.clients as usize];
    let mut limbo: Vec<usize> = Vec::new();
    let mut t = 0u64;
    loop {
        let more = out.len() < mix.ops;
        if !more && slots.iter().all(|s| matches!(s, Slot::Idle)) {
            break;
        }
        t += 1 + u64::from(draw() % 10);
        if !limbo.is_empty() && draw().is_multiple_of(8) {
            let i = limbo.swap_remove(draw() as usize % limbo.len());
            state = step(&state, &out[i].op).0;
            continue;
        }
        let mut c = draw() as usize % slots.len();
        if !more {
            // Only pending clients can move: pick the next one.
            while matches!(slots[c], Slot::Idle) {
                c = (c + 1) % slots.len();
            }
        }
        match slots[c] {
            Slot::Idle => {
                if more {
                    out.push(Operation {
                        client: c as u32,
                        member: 1 + u64::from(draw() % 3),
                        key: key.into(),
                        op: random_op(mix.deploy, draw),
                        invoke_ns: t,
                        complete_ns: None,
                        outcome: Outcome::Info {
                            error: "pending".into(),
                        },
                    });
                    slots[c] = Slot::Pending {
                        i: out.len() - 1,
                        applied: false,
                    };
                }
            }
            Slot::Pending { i, applied: false } => {
                let roll = draw() % 100;
                if roll < mix.fail_pct {
                    out[i].outcome = Outcome::Fail {
                        error: "not leader".into(),
                    };
                    out[i].complete_ns = Some(t);
                    slots[c] = Slot::Idle;
                } else if roll < mix.fail_pct + mix.info_pct {
                    match draw() % 3 {
                        0 => state = step(&state, &out[i].op).0,
                        1 => limbo.push(i),
                        _ => {}
                    }
                    out[i].outcome = Outcome::Info {
                        error: "timeout".into(),
                    };
                    out[i].complete_ns = Some(t);
                    slots[c] = Slot::Idle;
                } else {
                    let (next, value) = step(&state, &out[i].op);
                    state = next;
                    out[i].outcome = Outcome::Ok { value };
                    slots[c] = Slot::Pending { i, applied: true };
                }
            }
            Slot::Pending { i, applied: true } => {
                out[i].complete_ns = Some(t);
                slots[c] = Slot::Idle;
            }
        }
    }
    (out, state)
}
