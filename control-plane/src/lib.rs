//! Berth's control plane: the replicated state machine (`state`), its Raft
//! plumbing (`raft`), the gRPC services (`api`) and the wiring of a member
//! process (`server`).

pub mod state;
