//! Berth's domain types and their validation, shared by every crate.
//!
//! Everything here is plain data plus pure checks: no I/O, no clock. A value
//! that passed `validate()` is safe to store in the replicated state.

pub mod autoscale;
pub mod config;
pub mod deployment;
pub mod error;
pub mod fsutil;
pub mod gpu_health;
pub mod model;
pub mod names;
pub mod node;
pub mod replica;
pub mod resources;
pub mod security;
pub mod telemetry;
pub mod units;

pub use autoscale::{AutoscalePolicy, AutoscaleTarget};
pub use deployment::{
    Deployment, DeploymentRequest, DeploymentSpec, GpuSlice, PlacementPolicy, Replica,
    ReplicaIntent, Revision,
};
pub use error::ValidationError;
pub use model::{HealthProbe, Model, ModelVersion, ModelVersionSpec, Runtime};
pub use names::Labels;
pub use node::{GpuDevice, GpuSource, Node, NodeAdmin, NodeInventory, NodeRegistration, NodeState};
pub use replica::{ReplicaPhase, ReplicaSpec};
pub use resources::{ResourceOverrides, Resources};

/// Id of a control-plane member (the Raft node id).
pub type MemberId = u64;
