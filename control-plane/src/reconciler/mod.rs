//! Leader-only loops that compare what should be with what is and act.
//! Today: node liveness (`nodes`): heartbeats kept in the leader's memory,
//! `ready` → `down` after missed heartbeats, and back. Deployments and
//! placements join here with the deployments issue.

pub mod nodes;
