//! Nodes: the GPU machines that run replicas. A `Node` is what the control
//! plane records through Raft: the static part of its inventory (GPUs by
//! index with uuid, model and memory; CPU and memory capacity), its labels,
//! its address, and its state. Readings that change every second (GPU memory
//! in use, utilization, temperature) are not here: they travel in heartbeats
//! and stay in the leader's memory.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::names::{validate_labels, validate_name};
use crate::{Labels, ValidationError};

/// The most GPUs one node may report.
pub const MAX_NODE_GPUS: usize = 64;
/// The longest text field of an inventory (names, uuids, versions).
pub const MAX_INVENTORY_TEXT: usize = 256;

/// A GPU as registered: what does not change while the machine runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuDevice {
    /// Index on the node (what `CUDA_VISIBLE_DEVICES` uses).
    pub index: u32,
    /// NVML's uuid (`GPU-…`), or a made-up one for a simulated GPU.
    pub uuid: String,
    /// Model name as the driver reports it, e.g. `NVIDIA H100 80GB HBM3`.
    pub model: String,
    /// Total memory, MiB.
    pub memory_mib: u64,
    /// PCI bus id (`00000000:17:00.0`); empty when unknown.
    pub pci_bus_id: String,
    /// NUMA node of the GPU's PCI bus: GPUs sharing one talk fastest. `None` when unknown.
    pub locality: Option<u32>,
    /// Whether MIG mode is on (a MIG GPU is not shared or split by Berth).
    pub mig_enabled: bool,
}

/// Where a node's GPU list came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GpuSource {
    /// NVIDIA's management library, with the driver version.
    Nvml {
        /// The driver version NVML reports.
        driver_version: String,
    },
    /// `--simulate-gpus`: made-up GPUs for demos and tests.
    Simulated {
        /// The spec they were made from, e.g. `2xA100-80GB`.
        spec: String,
    },
    /// No GPUs: NVML did not load or found none; the text says why.
    None {
        /// Why there are no GPUs.
        reason: String,
    },
}

impl GpuSource {
    /// Whether the GPUs are simulated.
    pub fn is_simulated(&self) -> bool {
        matches!(self, GpuSource::Simulated { .. })
    }
}

impl fmt::Display for GpuSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuSource::Nvml { driver_version } => write!(f, "nvml (driver {driver_version})"),
            GpuSource::Simulated { spec } => write!(f, "simulated ({spec})"),
            GpuSource::None { reason } => write!(f, "none ({reason})"),
        }
    }
}

/// The static inventory of a node, as its agent registered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInventory {
    /// Where the GPU list came from.
    pub gpu_source: GpuSource,
    /// GPUs, by index.
    pub gpus: Vec<GpuDevice>,
    /// CPU model name.
    pub cpu_model: String,
    /// Logical CPUs, in millicores (cores × 1000).
    pub cpu_milli: u64,
    /// Physical memory, MiB.
    pub memory_mib: u64,
    /// The machine's host name.
    pub hostname: String,
    /// Operating system and kernel, for people.
    pub os: String,
    /// How CPU and memory limits are enforced: `cgroup v2 at DIR`, or why they are not.
    pub cgroups: String,
    /// The agent's version.
    pub agent_version: String,
}

impl NodeInventory {
    /// Whether the node's GPUs are simulated.
    pub fn simulated(&self) -> bool {
        self.gpu_source.is_simulated()
    }

    /// Total GPU memory over all GPUs, MiB.
    pub fn gpu_memory_mib(&self) -> u64 {
        self.gpus.iter().map(|g| g.memory_mib).sum()
    }

    /// Checks bounds and that GPU indices are unique and dense (0..n).
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.gpus.len() > MAX_NODE_GPUS {
            return Err(ValidationError::new(
                "inventory.gpus",
                self.gpus.len(),
                format!("a node may report at most {MAX_NODE_GPUS} GPUs"),
            ));
        }
        for (i, g) in self.gpus.iter().enumerate() {
            if g.index as usize != i {
                return Err(ValidationError::new(
                    "inventory.gpus.index",
                    g.index,
                    format!(
                        "GPUs must be listed by index 0..n; position {i} holds index {}",
                        g.index
                    ),
                ));
            }
            if g.uuid.is_empty() {
                return Err(ValidationError::new(
                    "inventory.gpus.uuid",
                    "",
                    format!("GPU {i} has no uuid"),
                ));
            }
            if g.memory_mib == 0 {
                return Err(ValidationError::new(
                    "inventory.gpus.memory_mib",
                    0,
                    format!("GPU {i} reports no memory"),
                ));
            }
            for (field, text) in [
                ("inventory.gpus.uuid", &g.uuid),
                ("inventory.gpus.model", &g.model),
                ("inventory.gpus.pci_bus_id", &g.pci_bus_id),
            ] {
                check_text(field, text)?;
            }
        }
        for (field, text) in [
            ("inventory.cpu_model", &self.cpu_model),
            ("inventory.hostname", &self.hostname),
            ("inventory.os", &self.os),
            ("inventory.cgroups", &self.cgroups),
            ("inventory.agent_version", &self.agent_version),
        ] {
            check_text(field, text)?;
        }
        let source_text = match &self.gpu_source {
            GpuSource::Nvml { driver_version } => driver_version,
            GpuSource::Simulated { spec } => spec,
            GpuSource::None { reason } => reason,
        };
        check_text("inventory.gpu_source", source_text)
    }
}

fn check_text(field: &str, text: &str) -> Result<(), ValidationError> {
    if text.len() > MAX_INVENTORY_TEXT || text.chars().any(char::is_control) {
        return Err(ValidationError::new(
            field,
            text.chars().take(40).collect::<String>(),
            format!("must be at most {MAX_INVENTORY_TEXT} bytes without control characters"),
        ));
    }
    Ok(())
}

/// A node's state. Only transitions are written to the log; heartbeats stay
/// in the leader's memory. Variants are only appended (the log format is forever).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Heartbeating; new replicas may land here.
    Ready,
    /// Missed heartbeats for longer than the grace period.
    Down,
}

impl NodeState {
    /// The state's name in the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Down => "down",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an operator decided about a node, apart from whether it is alive.
/// Variants are only appended (the log format is forever).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeAdmin {
    /// New replicas may land here.
    #[default]
    Active,
    /// No new replicas land here; the ones running stay.
    Cordoned,
    /// Its replicas are moving away (each replaced before it stops).
    Draining,
    /// Drained: no replica is left; nothing new lands here.
    Drained,
}

impl NodeAdmin {
    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeAdmin::Active => "active",
            NodeAdmin::Cordoned => "cordoned",
            NodeAdmin::Draining => "draining",
            NodeAdmin::Drained => "drained",
        }
    }
}

/// What an agent says about its node when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistration {
    /// The node's unique name.
    pub name: String,
    /// Where the control plane reaches the agent's gRPC service (`host:port`).
    pub addr: String,
    /// Labels for selectors.
    pub labels: Labels,
    /// The static inventory.
    pub inventory: NodeInventory,
    /// A new value each time the agent process starts: a registration with a
    /// new instance is a new epoch of the node.
    pub instance: String,
}

impl NodeRegistration {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_name("node", &self.name)?;
        match self.addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
            _ => {
                return Err(ValidationError::new(
                    "addr",
                    &self.addr,
                    "must be HOST:PORT where the control plane reaches the agent, e.g. 10.0.0.7:7500",
                ));
            }
        }
        check_text("addr", &self.addr)?;
        if self.instance.is_empty() || self.instance.len() > 64 {
            return Err(ValidationError::new(
                "instance",
                &self.instance,
                "must be 1-64 characters identifying this agent process",
            ));
        }
        validate_labels("label", &self.labels)?;
        self.inventory.validate()
    }
}

/// A node as the control plane records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// The node's unique name.
    pub name: String,
    /// The agent's gRPC address.
    pub addr: String,
    /// Labels for selectors.
    pub labels: Labels,
    /// The static inventory.
    pub inventory: NodeInventory,
    /// The agent process that registered last.
    pub instance: String,
    /// Bumped each time a new agent instance registers.
    pub epoch: u64,
    /// Alive or not (heartbeats).
    pub state: NodeState,
    /// What the operator decided (cordon).
    pub admin: NodeAdmin,
    /// When the node first registered (ms since the Unix epoch, leader's clock).
    pub registered_at_ms: u64,
    /// When the state last changed.
    pub state_since_ms: u64,
}

impl Node {
    /// The state people see: `down` when it is, else the operator's
    /// decision (`cordoned`, `draining`, `drained`), else `ready`.
    pub fn display_state(&self) -> &'static str {
        match (self.state, self.admin) {
            (NodeState::Down, _) => "down",
            (NodeState::Ready, NodeAdmin::Active) => "ready",
            (NodeState::Ready, admin) => admin.as_str(),
        }
    }

    /// Whether new replicas may be placed here.
    pub fn schedulable(&self) -> bool {
        self.state == NodeState::Ready && self.admin == NodeAdmin::Active
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn inventory(gpus: u32) -> NodeInventory {
        NodeInventory {
            gpu_source: GpuSource::Simulated {
                spec: format!("{gpus}xA100-80GB"),
            },
            gpus: (0..gpus)
                .map(|i| GpuDevice {
                    index: i,
                    uuid: format!("GPU-sim-{i}"),
                    model: "A100-80GB".into(),
                    memory_mib: 80 * 1024,
                    pci_bus_id: String::new(),
                    locality: Some(0),
                    mig_enabled: false,
                })
                .collect(),
            cpu_model: "cpu".into(),
            cpu_milli: 8000,
            memory_mib: 64 * 1024,
            hostname: "h".into(),
            os: "linux".into(),
            cgroups: "unavailable".into(),
            agent_version: "0.1.0".into(),
        }
    }

    fn registration() -> NodeRegistration {
        NodeRegistration {
            name: "gpu-1".into(),
            addr: "127.0.0.1:7500".into(),
            labels: Labels::new(),
            inventory: inventory(2),
            instance: "abc".into(),
        }
    }

    #[test]
    fn registrations_are_checked() {
        assert!(registration().validate().is_ok());
        let bad = |f: fn(&mut NodeRegistration)| {
            let mut r = registration();
            f(&mut r);
            r.validate().unwrap_err().field
        };
        assert_eq!(bad(|r| r.name = "GPU_1".into()), "node");
        assert_eq!(bad(|r| r.addr = "nohost".into()), "addr");
        assert_eq!(bad(|r| r.addr = "h:0".into()), "addr");
        assert_eq!(bad(|r| r.instance = String::new()), "instance");
        assert_eq!(
            bad(|r| r.inventory.gpus[1].index = 5),
            "inventory.gpus.index"
        );
        assert_eq!(
            bad(|r| r.inventory.gpus[0].memory_mib = 0),
            "inventory.gpus.memory_mib"
        );
        assert_eq!(
            bad(|r| r.inventory.hostname = "a\nb".into()),
            "inventory.hostname"
        );
        assert_eq!(
            bad(|r| r
                .labels
                .insert("bad key".into(), "v".into())
                .map(|_| ())
                .unwrap_or(())),
            "label"
        );
    }
}
