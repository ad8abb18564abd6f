//! Berth's node agent: reports what the machine has (`inventory`: GPUs
//! through NVML or simulated, CPU, memory, disks, network through sysinfo),
//! registers and heartbeats to the control plane (`registration`), and runs
//! model replicas (`supervisor`, each through a shim that outlives the
//! agent) on orders from the Agent gRPC service (`api`). `demo_model` is the
//! small real HTTP model server behind runtime `demo`. `hollow` runs many
//! process-less agents in one process, for `berth bench` only.

pub mod api;
pub mod config;
pub mod demo_model;
pub mod hollow;
pub mod inventory;
pub mod metrics;
pub mod registration;
pub mod security;
pub mod server;
pub mod supervisor;
