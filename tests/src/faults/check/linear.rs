//! Linearizability per key: is there one order of the operations on a key,
//! consistent with real time (an operation that answered before another was
//! invoked comes first), in which `model::step` gives every acknowledged
//! operation exactly the answer it got?
//!
//! The search is Wing and Gong's, with Lowe's just-in-time linearization
//! and memoized dead ends, as in porcupine's `checker.go`: events (calls
//! and returns) sit in a doubly linked list in time order; the operations
//! that may take effect next are those whose call comes before the first
//! return left in the list. Each try lifts one operation out of the list;
//! a dead end puts it back (dancing links) and tries the next one.
//!
//! Outcomes: a `Fail` operation certainly did not happen and is dropped; an
//! `Info` read tells nothing and is dropped; an `Info` write returns at
//! infinity and accepts any answer, so it may take effect at any moment
//! after its invocation, or never (equivalently, after everything else).
//!
//! Memo: a dead end is remembered as (acknowledged operations placed,
//! unknown-outcome writes placed, state). A configuration is pruned when a
//! remembered dead end has the same acknowledged set and state and a subset
//! of its unknown writes: whatever order completes the larger one completes
//! the smaller too, with the extra unknown writes moved to the end. This
//! keeps a history with many timeouts from blowing up.
//!
//! Reductions, each of which keeps the search complete (a test compares it
//! with trying every order on small histories):
//! * an acknowledged operation that fits and changes nothing (a read, a
//!   refused write) is placed at once and alone: moved to the front of any
//!   order that works from here, it still works;
//! * an unknown write that would change nothing is never placed, and one
//!   nobody could have seen (see `observable`) is dropped;
//! * identical unknown writes are interchangeable and placed in call order.
//!
//! Cost: a few steps per operation for histories like the fault suite's;
//! many clients on one key with many unknown outcomes can exhaust the
//! budget, which gives `Unknown`, never a wrong verdict.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::rc::Rc;

use super::describe::{describe, fmt_state, fmt_t, fmt_value};
use super::model::{KeyState, apply};
use crate::faults::history::{Op, Operation, Outcome, Value};

/// Search steps allowed per key by default: far above what a run's history
/// needs (a few per operation), and a bound on the memo's memory.
pub const DEFAULT_BUDGET: u64 = 2_000_000;

/// The judgement on one key's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Some order explains every acknowledged answer.
    Linearizable,
    /// No order does; the explanation shows how far the best order got.
    Violation {
        /// The longest linearizable prefix and what could not come next.
        explanation: String,
    },
    /// The search ran out of budget before it could decide.
    Unknown {
        /// How far it got.
        reason: String,
    },
}

/// The verdict for one key with the size of its search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVerdict {
    /// The key.
    pub key: String,
    /// Operations checked (after dropping failed ones and unknown reads).
    pub operations: usize,
    /// The judgement.
    pub result: Verdict,
    /// Search steps taken.
    pub steps: u64,
}

/// Checks each key's operations alone, allowing `budget` search steps per key.
pub fn check_linearizable(ops: &[Operation], budget: u64) -> BTreeMap<String, KeyVerdict> {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in ops {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    by_key
        .into_iter()
        .map(|(key, ops)| (key.to_string(), check_key(key, &ops, budget)))
        .collect()
}

/// One operation as the search sees it.
struct Entry<'a> {
    op: &'a Operation,
    call: u64,
    /// `u64::MAX` for an unknown outcome.
    ret: u64,
    /// The answer it must get; `None` accepts any (an unknown-outcome write).
    expect: Option<&'a Value>,
}

/// A fixed-size set of operation indexes.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }

    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }

    fn has(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }

    fn is_subset(&self, of: &Bits) -> bool {
        self.0.iter().zip(&of.0).all(|(a, b)| a & !b == 0)
    }
}

/// The operations placed so far: acknowledged ones (indexes below `split`)
/// and unknown-outcome writes (the rest) apart, as the memo compares them
/// differently.
struct Placed {
    acked: Bits,
    unknown: Bits,
    split: usize,
}

impl Placed {
    fn set(&mut self, i: usize) {
        if i < self.split {
            self.acked.set(i)
        } else {
            self.unknown.set(i - self.split)
        }
    }

    fn has(&self, i: usize) -> bool {
        if i < self.split {
            self.acked.has(i)
        } else {
            self.unknown.has(i - self.split)
        }
    }

    fn clear(&mut self, i: usize) {
        if i < self.split {
            self.acked.clear(i)
        } else {
            self.unknown.clear(i - self.split)
        }
    }
}

/// A configuration known to lead nowhere.
struct DeadEnd {
    acked: Bits,
    unknown: Bits,
    state: Rc<Option<KeyState>>,
}

/// Dead ends by hash of (acknowledged set, state).
#[derive(Default)]
struct Memo(HashMap<u64, Vec<DeadEnd>>);

impl Memo {
    fn hash(acked: &Bits, state: &Option<KeyState>) -> u64 {
        let mut h = DefaultHasher::new();
        acked.hash(&mut h);
        state.hash(&mut h);
        h.finish()
    }

    /// Whether a remembered dead end makes this configuration one too: the
    /// same acknowledged operations and state, and a subset of its unknown
    /// writes.
    fn dominated(&self, placed: &Placed, state: &Option<KeyState>) -> bool {
        self.0
            .get(&Self::hash(&placed.acked, state))
            .is_some_and(|v| {
                v.iter().any(|d| {
                    d.acked == placed.acked
                        && *d.state == *state
                        && d.unknown.is_subset(&placed.unknown)
                })
            })
    }

    fn insert(&mut self, placed: &Placed, state: &Rc<Option<KeyState>>) {
        self.0
            .entry(Self::hash(&placed.acked, state))
            .or_default()
            .push(DeadEnd {
                acked: placed.acked.clone(),
                unknown: placed.unknown.clone(),
                state: Rc::clone(state),
            });
    }
}

const HEAD: usize = 0;

/// The event list: node 0 is the head, 1..=2n the calls and returns in
/// time order, 2n+1 the tail.
struct Events {
    next: Vec<usize>,
    prev: Vec<usize>,
    /// Per node: the entry it belongs to and whether it is a return.
    what: Vec<(usize, bool)>,
    call_node: Vec<usize>,
    ret_node: Vec<usize>,
    tail: usize,
}

impl Events {
    fn new(entries: &[Entry<'_>]) -> Self {
        let mut order: Vec<(u64, bool, usize)> = Vec::with_capacity(entries.len() * 2);
        for (i, e) in entries.iter().enumerate() {
            order.push((e.call, false, i));
            order.push((e.ret, true, i));
        }
        // A call at the same instant as a return counts as concurrent with it.
        order.sort_unstable();
        let tail = order.len() + 1;
        let mut what = vec![(usize::MAX, true); tail + 1];
        let mut call_node = vec![0; entries.len()];
        let mut ret_node = vec![0; entries.len()];
        for (k, &(_, is_ret, i)) in order.iter().enumerate() {
            let node = k + 1;
            what[node] = (i, is_ret);
            if is_ret {
                ret_node[i] = node;
            } else {
                call_node[i] = node;
            }
        }
        Events {
            next: (1..=tail + 1).collect(),
            prev: (0..=tail).map(|n| n.saturating_sub(1)).collect(),
            what,
            call_node,
            ret_node,
            tail,
        }
    }

    fn unlink(&mut self, n: usize) {
        let (p, q) = (self.prev[n], self.next[n]);
        self.next[p] = q;
        self.prev[q] = p;
    }

    fn relink(&mut self, n: usize) {
        let (p, q) = (self.prev[n], self.next[n]);
        self.next[p] = n;
        self.prev[q] = n;
    }

    fn lift(&mut self, i: usize) {
        self.unlink(self.call_node[i]);
        self.unlink(self.ret_node[i]);
    }

    /// Undoes the last `lift`, which must have been of `i`.
    fn unlift(&mut self, i: usize) {
        self.relink(self.ret_node[i]);
        self.relink(self.call_node[i]);
    }

    /// The next candidate from `cursor`, by pass: acknowledged operations
    /// that would leave the state as it is (`FREE`), all acknowledged ones
    /// (`ACKED`), unknown-outcome writes (`UNKNOWN`); `None` when the last
    /// pass reached the first return, or at once from `DEAD`.
    fn candidate(&self, cursor: &mut (u8, usize), acked: usize) -> Option<usize> {
        loop {
            let (pass, node) = *cursor;
            if pass == DEAD {
                return None;
            }
            if node == self.tail || self.what[node].1 {
                if pass == UNKNOWN {
                    return None;
                }
                let next = if pass == FREE { ACKED } else { UNKNOWN };
                *cursor = (next, self.next[HEAD]);
                continue;
            }
            cursor.1 = self.next[node];
            let i = self.what[node].0;
            if (i < acked) == (pass != UNKNOWN) {
                return Some(i);
            }
        }
    }
}

/// Search passes over the candidates (see `Events::candidate`).
const FREE: u8 = 0;
const ACKED: u8 = 1;
const UNKNOWN: u8 = 2;
/// A cursor with nothing left to try.
const DEAD: u8 = 3;

/// One placed operation on the search stack.
struct Frame {
    entry: usize,
    before: Rc<Option<KeyState>>,
    resume: (u8, usize),
}

fn check_key(key: &str, ops: &[&Operation], budget: u64) -> KeyVerdict {
    let mut entries: Vec<Entry<'_>> = Vec::with_capacity(ops.len());
    let mut unknown: Vec<Entry<'_>> = Vec::new();
    for op in ops {
        match &op.outcome {
            Outcome::Ok { value } => entries.push(Entry {
                op,
                call: op.invoke_ns,
                ret: op.complete_ns.unwrap_or(u64::MAX),
                expect: Some(value),
            }),
            Outcome::Info { .. } if op.op.is_write() => unknown.push(Entry {
                op,
                call: op.invoke_ns,
                ret: u64::MAX,
                expect: None,
            }),
            Outcome::Info { .. } | Outcome::Fail { .. } => {}
        }
    }
    let operations = entries.len() + unknown.len();
    unknown.retain(|u| observable(&u.op.op, &entries));
    // Acknowledged operations take indexes 0..acked, unknown writes the
    // rest in call order (which `same_before` relies on).
    let acked = entries.len();
    unknown.sort_by_key(|u| u.call);
    entries.append(&mut unknown);
    let (result, steps) = search(&entries, acked, budget);
    KeyVerdict {
        key: key.to_string(),
        operations,
        result,
        steps,
    }
}

/// Whether an unknown-outcome write can matter. Adding a version that no
/// acknowledged read shows and no acknowledged add of it found existing,
/// or scaling to a count no acknowledged read shows, cannot: taking such a
/// write out of any valid order leaves every acknowledged answer as it was
/// (the state differs only in what nobody saw, until something overwrites
/// it), so it is dropped rather than tried everywhere.
fn observable(op: &Op, acked: &[Entry<'_>]) -> bool {
    match op {
        Op::ModelAddVersion { version } => acked.iter().any(|e| match (&e.op.op, e.expect) {
            (Op::ModelRead, Some(Value::Versions { versions })) => versions.contains(version),
            (Op::ModelAddVersion { version: v }, Some(Value::Exists)) => v == version,
            _ => false,
        }),
        Op::DeployScale { replicas } => acked.iter().any(|e| {
            e.expect
                == Some(&Value::Replicas {
                    replicas: *replicas,
                })
        }),
        _ => true,
    }
}

/// For each unknown-outcome write (index from `acked`), the nearest earlier
/// one with the very same operation. Identical unknown writes that may both
/// take effect are interchangeable, so they are placed in call order only.
fn same_before(entries: &[Entry<'_>], acked: usize) -> Vec<Option<usize>> {
    let mut last: Vec<(&Op, usize)> = Vec::new();
    (acked..entries.len())
        .map(|i| {
            let op = &entries[i].op.op;
            match last.iter_mut().find(|(o, _)| *o == op) {
                Some(slot) => Some(std::mem::replace(&mut slot.1, i)),
                None => {
                    last.push((op, i));
                    None
                }
            }
        })
        .collect()
}

fn search(entries: &[Entry<'_>], acked: usize, budget: u64) -> (Verdict, u64) {
    if acked == 0 {
        return (Verdict::Linearizable, 0);
    }
    let mut events = Events::new(entries);
    let same_before = same_before(entries, acked);
    let mut memo = Memo::default();
    let mut placed = Placed {
        acked: Bits::new(acked),
        unknown: Bits::new(entries.len() - acked),
        split: acked,
    };
    let mut state: Rc<Option<KeyState>> = Rc::new(None);
    let mut stack: Vec<Frame> = Vec::new();
    let mut done = 0usize;
    let mut best: (usize, Vec<usize>, Rc<Option<KeyState>>) = (0, Vec::new(), Rc::clone(&state));
    let mut cursor = (FREE, events.next[HEAD]);
    let mut steps = 0u64;
    loop {
        if steps >= budget {
            let reason = format!(
                "gave up after {steps} search steps (the budget); the deepest order tried \
                 placed {} of {acked} acknowledged operations; raise the budget or check a \
                 shorter run",
                best.0
            );
            return (Verdict::Unknown { reason }, steps);
        }
        steps += 1;
        if let Some(i) = events.candidate(&mut cursor, acked) {
            if i >= acked && same_before[i - acked].is_some_and(|j| !placed.has(j)) {
                continue;
            }
            let e = &entries[i];
            let (changed, answer) = apply(&state, &e.op.op);
            match (e.expect, &changed) {
                (Some(want), _) if *want != answer => continue,
                (None, None) => continue,
                (Some(_), Some(_)) if cursor.0 == FREE => continue,
                _ => {}
            }
            // An acknowledged operation that fits and changes nothing can
            // go first in any order that works from here (it is a candidate,
            // so nothing pending had to precede it), so it is the only one
            // tried: if nothing works after it, nothing works from here.
            let free = cursor.0 == FREE;
            let next = changed.map_or_else(|| Rc::clone(&state), Rc::new);
            placed.set(i);
            if memo.dominated(&placed, &next) {
                placed.clear(i);
                if free {
                    cursor = (DEAD, HEAD);
                }
                continue;
            }
            events.lift(i);
            stack.push(Frame {
                entry: i,
                before: std::mem::replace(&mut state, next),
                resume: if free { (DEAD, HEAD) } else { cursor },
            });
            cursor = (FREE, events.next[HEAD]);
            if i < acked {
                done += 1;
                if done == acked {
                    // Unknown writes still pending can take effect after all.
                    return (Verdict::Linearizable, steps);
                }
                if done > best.0 {
                    best = (
                        done,
                        stack.iter().map(|f| f.entry).collect(),
                        Rc::clone(&state),
                    );
                }
            }
        } else {
            let Some(frame) = stack.pop() else {
                let explanation = explain(entries, acked, &best.1, &best.2);
                return (Verdict::Violation { explanation }, steps);
            };
            memo.insert(&placed, &state);
            let i = frame.entry;
            events.unlift(i);
            placed.clear(i);
            if i < acked {
                done -= 1;
            }
            state = frame.before;
            cursor = frame.resume;
        }
    }
}

/// How many operations of the best prefix an explanation lists.
const SHOWN: usize = 12;

fn explain(
    entries: &[Entry<'_>],
    acked: usize,
    prefix: &[usize],
    state: &Option<KeyState>,
) -> String {
    let mut s = String::new();
    let placed_acked = prefix.iter().filter(|&&i| i < acked).count();
    let _ = writeln!(
        s,
        "no order explains all {acked} acknowledged operations; the longest linearizable \
         prefix places {placed_acked} of them ({} operations in all):",
        prefix.len()
    );
    let skip = prefix.len().saturating_sub(SHOWN);
    if skip > 0 {
        let _ = writeln!(s, "  ... {skip} earlier operations");
    }
    for (n, &i) in prefix.iter().enumerate().skip(skip) {
        let _ = writeln!(s, "  {}. {}", n + 1, describe(entries[i].op));
    }
    let _ = writeln!(s, "state after it: {}", fmt_state(state));
    let mut placed = vec![false; entries.len()];
    for &i in prefix {
        placed[i] = true;
    }
    let first_ret = (0..acked)
        .filter(|&i| !placed[i])
        .min_by_key(|&i| (entries[i].ret, entries[i].call));
    if let Some(f) = first_ret {
        let _ = writeln!(
            s,
            "one of these had to come next (client {}'s answer at {} is the earliest left):",
            entries[f].op.client,
            fmt_t(entries[f].ret)
        );
        for i in (0..acked).filter(|&i| !placed[i] && entries[i].call <= entries[f].ret) {
            let (_, answer) = apply(state, &entries[i].op.op);
            let why = if Some(&answer) == entries[i].expect {
                "fits here, but nothing linearizes after it".to_string()
            } else {
                format!("the model answers {} here", fmt_value(&answer))
            };
            let _ = writeln!(s, "  - {}: {why}", describe(entries[i].op));
        }
    }
    let pending = (acked..entries.len())
        .filter(|&i| !placed[i] && entries[i].call <= first_ret.map_or(0, |f| entries[f].ret))
        .count();
    if pending > 0 {
        let _ = writeln!(
            s,
            "({pending} writes with unknown outcome could also take effect there; all were tried)"
        );
    }
    s
}

#[cfg(test)]
mod tests;
