//! Berth's control plane: the replicated state machine (`state`), its Raft
//! plumbing (`raft`), the rules for serving any call on any member
//! (`member`), the leader's loops (`reconciler`: node liveness), the gRPC
//! services (`api`), configuration (`config`) and the wiring of a member
//! process (`server`).

pub mod api;
pub mod config;
#[cfg(test)]
mod datadriven;
pub mod events;
pub mod member;
pub mod metrics;
pub mod raft;
pub mod reconciler;
pub mod scheduler;
pub mod server;
pub mod state;
