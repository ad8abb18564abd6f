//! What each node has left: capacity from its registered inventory minus
//! what the replicas placed on it hold (every placed replica, whether it
//! should run or is being removed: it holds its resources until it is gone).
//! Used to re-validate plans in `apply` and by the invariant checks.

use std::collections::BTreeMap;

use berth_common::{GpuSlice, Node, Replica};

use berth_common::resources::WHOLE_GPU_MILLI;

/// One GPU's use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuUse {
    /// Compute share held, thousandths.
    pub milli: u32,
    /// Memory held, MiB.
    pub memory_mib: u64,
}

/// One node's use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeUse {
    /// CPU held, millicores.
    pub cpu_milli: u64,
    /// Memory held, MiB.
    pub memory_mib: u64,
    /// Per GPU index.
    pub gpus: BTreeMap<u32, GpuUse>,
}

impl NodeUse {
    /// Adds what `replica` holds.
    pub fn add(&mut self, replica: &Replica) {
        self.cpu_milli += u64::from(replica.resources.cpu_milli);
        self.memory_mib += replica.resources.memory_mib;
        for g in &replica.gpus {
            let u = self.gpus.entry(g.index).or_default();
            u.milli += g.milli;
            u.memory_mib += g.memory_mib;
        }
    }

    /// Why `replica` with `gpus` does not fit on `node` beside this use, if it does not.
    pub fn refuse(&self, node: &Node, replica: &Replica, gpus: &[GpuSlice]) -> Option<String> {
        let inv = &node.inventory;
        let r = &replica.resources;
        if self.cpu_milli + u64::from(r.cpu_milli) > inv.cpu_milli {
            return Some(format!(
                "node {} has {}m CPU free, {} needs {}m",
                node.name,
                inv.cpu_milli.saturating_sub(self.cpu_milli),
                replica.id,
                r.cpu_milli
            ));
        }
        if self.memory_mib + r.memory_mib > inv.memory_mib {
            return Some(format!(
                "node {} has {} MiB memory free, {} needs {}",
                node.name,
                inv.memory_mib.saturating_sub(self.memory_mib),
                replica.id,
                r.memory_mib
            ));
        }
        if gpus.len() != r.gpus as usize {
            return Some(format!(
                "{} needs {} GPUs, the plan gives {}",
                replica.id,
                r.gpus,
                gpus.len()
            ));
        }
        let mut seen = Vec::new();
        for g in gpus {
            if seen.contains(&g.index) {
                return Some(format!("the plan gives GPU {} twice", g.index));
            }
            seen.push(g.index);
            let Some(device) = inv.gpus.iter().find(|d| d.index == g.index) else {
                return Some(format!("node {} has no GPU {}", node.name, g.index));
            };
            let want_memory = if r.gpu_memory_mib == 0 {
                device.memory_mib
            } else {
                r.gpu_memory_mib
            };
            if g.milli != r.gpu_milli || g.memory_mib != want_memory {
                return Some(format!(
                    "{} needs {} thousandths and {} MiB of each GPU, the plan gives {} and {} on GPU {}",
                    replica.id, r.gpu_milli, want_memory, g.milli, g.memory_mib, g.index
                ));
            }
            let used = self.gpus.get(&g.index).copied().unwrap_or_default();
            if used.milli + g.milli > WHOLE_GPU_MILLI
                || used.memory_mib + g.memory_mib > device.memory_mib
            {
                return Some(format!(
                    "GPU {} of node {} has {} thousandths and {} MiB free",
                    g.index,
                    node.name,
                    WHOLE_GPU_MILLI.saturating_sub(used.milli),
                    device.memory_mib.saturating_sub(used.memory_mib)
                ));
            }
        }
        None
    }
}

/// The use of every node that has replicas, by node name.
pub fn usage<'a>(replicas: impl Iterator<Item = &'a Replica>) -> BTreeMap<String, NodeUse> {
    let mut out: BTreeMap<String, NodeUse> = BTreeMap::new();
    for r in replicas {
        if let Some(node) = &r.node {
            out.entry(node.clone()).or_default().add(r);
        }
    }
    out
}

/// Whether any node or GPU holds more than it has.
pub fn check(
    nodes: &BTreeMap<String, Node>,
    usage: &BTreeMap<String, NodeUse>,
) -> Result<(), String> {
    for (name, u) in usage {
        let Some(node) = nodes.get(name) else {
            return Err(format!("replicas are placed on unknown node {name:?}"));
        };
        let inv = &node.inventory;
        if u.cpu_milli > inv.cpu_milli || u.memory_mib > inv.memory_mib {
            return Err(format!("node {name:?} is over-committed: {u:?}"));
        }
        for (index, g) in &u.gpus {
            let Some(d) = inv.gpus.iter().find(|d| d.index == *index) else {
                return Err(format!("node {name:?} has no GPU {index}"));
            };
            if g.milli > WHOLE_GPU_MILLI || g.memory_mib > d.memory_mib {
                return Err(format!(
                    "GPU {index} of node {name:?} is over-committed: {g:?}"
                ));
            }
        }
    }
    Ok(())
}
