//! Leader-only loops that compare what should be with what is and act:
//! node liveness (`nodes`: heartbeats kept in the leader's memory, `ready`
//! → `down` after missed heartbeats, and back) and replicas (`replicas`:
//! place pending ones through the scheduler (`placement`), start and stop
//! them on their agents, replace those of lost nodes).

pub mod autoscale;
pub mod autoscaler;
pub mod nodes;
pub mod placement;
pub mod replicas;
