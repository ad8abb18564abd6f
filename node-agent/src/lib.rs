//! Berth's node agent: GPU/CPU inventory, registration and heartbeats, and
//! the replica supervisor. Not built yet (see the issue "Node agent"); the
//! crate exists so the workspace has its final shape and the binary tells
//! an operator so plainly instead of doing nothing.

/// What `berth-agent` says until it is built.
pub const NOT_YET: &str = "berth-agent is not implemented yet: this Berth build runs the control plane only (berth-control, berth dev)";
