//! The fault suite: members and agents as separate hosts (network
//! namespaces), seeded nemeses, a client-side history, and the checkers
//! that judge it.

pub mod check;
pub mod history;
pub mod membership;
pub mod net;
pub mod run;
pub mod schedule;
pub mod streams;
pub mod workload;
