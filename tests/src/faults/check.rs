//! The fault suite's checkers: pure functions over what a run recorded (the
//! client history, final reads, state digests, GPU ledger lines, logs) that
//! say whether the run kept Berth's promises. They do no I/O and read no
//! clock, so each is tested on hand-written histories it must reject and
//! ones it must accept.
//!
//! * `model`: the sequential specification of one registry key.
//! * `describe`: operations, answers and states as messages print them.
//! * `linear`: linearizability per key against that model.
//! * `registry`: lost acknowledged writes, convergence of members, progress
//!   after healing.
//! * `gpu`: GPU double-booking and unexplained replica restarts.
//! * `logs`: panics and openraft fatal errors in member logs.

mod describe;
mod gpu;
mod linear;
mod logs;
mod model;
mod registry;
#[cfg(test)]
mod testkit;

pub use describe::describe;
pub use gpu::{Explanation, GpuHold, double_bookings, unexplained_restarts};
pub use linear::{DEFAULT_BUDGET, KeyVerdict, Verdict, check_linearizable};
pub use logs::{fatal_lines, reports_disk_failure};
pub use model::{KeyState, step};
pub use registry::{MemberDigest, converged, liveness, lost_writes};
