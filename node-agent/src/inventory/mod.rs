//! What this node has: GPUs (NVML, simulated, or none) and CPU, memory,
//! disks and network interfaces (sysinfo).
//!
//! `Inventory::open` decides the GPU source once: `--simulate-gpus` wins;
//! otherwise NVML if `libnvidia-ml` loads and finds GPUs; otherwise the node
//! is CPU-only, said once in the log. `refresh` takes fresh readings (a few
//! hundred microseconds: CPU and memory counters, mounts, interfaces, and one
//! NVML call per GPU reading) and returns the whole inventory as its wire
//! document; `registration` is the static part the control plane records.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use berth_common::{GpuDevice, GpuSource, NodeInventory};
use berth_proto::v1;

pub mod nvml;
pub mod simulated;
mod system;

use nvml::NvmlGpus;
use system::SystemReader;

/// Where GPU readings come from.
enum Gpus {
    Nvml(NvmlGpus),
    Simulated {
        spec: String,
        devices: Vec<GpuDevice>,
    },
    None {
        reason: String,
    },
}

/// GPU memory given to replicas, per GPU index: what simulated GPUs report as used.
pub type Allocations = Vec<(u32, u64)>;

/// The node's inventory source.
pub struct Inventory {
    node: String,
    gpus: Gpus,
    system: SystemReader,
    cgroups: String,
}

impl Inventory {
    /// Opens the GPU source and the system reader. `simulate` is the
    /// `--simulate-gpus` spec; `cgroups` says how limits are enforced.
    pub fn open(
        node: &str,
        simulate: Option<&str>,
        cgroups: String,
    ) -> Result<Self, berth_common::ValidationError> {
        let gpus = match simulate {
            Some(spec) => {
                let devices = simulated::parse_spec(spec, node)?;
                tracing::info!(
                    gpus = devices.len(),
                    spec,
                    "using SIMULATED GPUs (--simulate-gpus): no real GPU is used"
                );
                Gpus::Simulated {
                    spec: spec.to_string(),
                    devices,
                }
            }
            None => match NvmlGpus::open() {
                Ok(n) => {
                    tracing::info!(
                        gpus = n.devices.len(),
                        driver = %n.driver_version,
                        "found NVIDIA GPUs through NVML"
                    );
                    Gpus::Nvml(n)
                }
                Err(reason) => {
                    tracing::info!(%reason, "no GPUs: this node is CPU-only");
                    Gpus::None { reason }
                }
            },
        };
        Ok(Inventory {
            node: node.to_string(),
            gpus,
            system: SystemReader::open(),
            cgroups,
        })
    }

    /// The inventory of a hollow agent of `berth bench`: simulated GPUs
    /// (`gpus` as for `--simulate-gpus`), a made-up machine, and "hollow" in
    /// the GPU source, host name and OS, so every view shows it.
    pub fn hollow(
        node: &str,
        gpus: &str,
        cpus: u32,
        memory_mib: u64,
    ) -> Result<Self, berth_common::ValidationError> {
        Ok(Inventory {
            node: node.to_string(),
            gpus: Gpus::Simulated {
                spec: format!("{gpus}, hollow agent of berth bench"),
                devices: simulated::parse_spec(gpus, node)?,
            },
            system: SystemReader::hollow(cpus, memory_mib),
            cgroups: "none: hollow agent of berth bench, no processes".into(),
        })
    }

    /// The GPUs as registered.
    pub fn devices(&self) -> &[GpuDevice] {
        match &self.gpus {
            Gpus::Nvml(n) => &n.devices,
            Gpus::Simulated { devices, .. } => devices,
            Gpus::None { .. } => &[],
        }
    }

    /// Whether the GPUs are simulated.
    pub fn simulated(&self) -> bool {
        matches!(self.gpus, Gpus::Simulated { .. })
    }

    fn source(&self) -> GpuSource {
        match &self.gpus {
            Gpus::Nvml(n) => GpuSource::Nvml {
                driver_version: n.driver_version.clone(),
            },
            Gpus::Simulated { spec, .. } => GpuSource::Simulated { spec: spec.clone() },
            Gpus::None { reason } => GpuSource::None {
                reason: reason.clone(),
            },
        }
    }

    /// The static inventory the control plane records.
    pub fn registration(&self) -> NodeInventory {
        let s = &self.system;
        NodeInventory {
            gpu_source: self.source(),
            gpus: self.devices().to_vec(),
            cpu_model: s.cpu_model.clone(),
            cpu_milli: u64::from(s.cpus) * 1000,
            memory_mib: s.memory_total_mib(),
            hostname: s.hostname.clone(),
            os: s.os.clone(),
            cgroups: self.cgroups.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// Takes fresh readings. Blocking (NVML, /proc): call it from a blocking thread.
    pub fn refresh(&mut self, allocations: &Allocations) -> v1::Inventory {
        let started = Instant::now();
        let gpus = match &self.gpus {
            Gpus::Nvml(n) => n.read(),
            Gpus::Simulated { devices, .. } => devices
                .iter()
                .map(|d| simulated_reading(d, allocations))
                .collect(),
            Gpus::None { .. } => Vec::new(),
        };
        let mut inv = self.system.refresh();
        inv.node = self.node.clone();
        inv.gpu_source = self.source().to_string();
        inv.simulated = self.simulated();
        inv.gpus = gpus;
        inv.cgroups = self.cgroups.clone();
        inv.agent_version = env!("CARGO_PKG_VERSION").to_string();
        inv.refreshed_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        inv.refresh_us = started.elapsed().as_micros() as u64;
        inv
    }
}

/// The inventory source behind a lock, plus its latest readings, shared by
/// the Agent service, the heartbeat loop and the refresh task.
pub struct SharedInventory {
    source: std::sync::Mutex<Inventory>,
    latest: std::sync::RwLock<v1::Inventory>,
    registration: NodeInventory,
}

impl SharedInventory {
    /// Wraps a source and takes a first reading.
    pub fn new(mut source: Inventory) -> std::sync::Arc<Self> {
        let first = source.refresh(&Vec::new());
        let registration = source.registration();
        std::sync::Arc::new(SharedInventory {
            source: std::sync::Mutex::new(source),
            latest: std::sync::RwLock::new(first),
            registration,
        })
    }

    /// The static inventory for registration.
    pub fn registration(&self) -> &NodeInventory {
        &self.registration
    }

    /// The latest readings.
    pub fn latest(&self) -> v1::Inventory {
        self.latest
            .read()
            .map(|l| l.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Takes fresh readings on a blocking thread and keeps them as the latest.
    pub async fn refresh(self: &std::sync::Arc<Self>, allocations: Allocations) -> v1::Inventory {
        let me = self.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut source = me.source.lock().unwrap_or_else(|p| p.into_inner());
            source.refresh(&allocations)
        })
        .await;
        match read {
            Ok(inv) => {
                if let Ok(mut l) = self.latest.write() {
                    *l = inv.clone();
                }
                inv
            }
            Err(e) => {
                tracing::warn!(error = %e, "inventory refresh failed");
                self.latest()
            }
        }
    }
}

fn simulated_reading(d: &GpuDevice, allocations: &Allocations) -> v1::Gpu {
    let used: u64 = allocations
        .iter()
        .filter(|(i, _)| *i == d.index)
        .map(|(_, m)| if *m == 0 { d.memory_mib } else { *m })
        .sum::<u64>()
        .min(d.memory_mib);
    v1::Gpu {
        index: d.index,
        uuid: d.uuid.clone(),
        model: d.model.clone(),
        memory_total_mib: d.memory_mib,
        memory_used_mib: used,
        memory_free_mib: d.memory_mib - used,
        mig_mode: "disabled".into(),
        locality: d.locality,
        simulated: true,
        health: "ok".into(),
        ..Default::default()
    }
}

/// The part of the readings a heartbeat carries.
pub fn heartbeat_readings(inv: &v1::Inventory) -> Vec<v1::GpuReading> {
    inv.gpus
        .iter()
        .map(|g| v1::GpuReading {
            index: g.index,
            memory_used_mib: g.memory_used_mib,
            utilization_percent: g.utilization_percent,
            temperature_c: g.temperature_c,
            health: g.health.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_inventory_is_marked_and_accounts_allocations() {
        let mut inv =
            Inventory::open("n1", Some("2xA100-80GB"), "unavailable: test".into()).expect("open");
        assert!(inv.simulated());
        let reg = inv.registration();
        assert!(reg.simulated());
        assert_eq!(reg.gpus.len(), 2);
        reg.validate().expect("a valid registration");
        let r = inv.refresh(&vec![(0, 20 * 1024), (0, 10 * 1024), (1, 0)]);
        assert!(r.simulated);
        assert!(r.gpu_source.starts_with("simulated"));
        assert_eq!(r.gpus[0].memory_used_mib, 30 * 1024);
        assert_eq!(r.gpus[0].memory_free_mib, 50 * 1024);
        assert_eq!(
            r.gpus[1].memory_free_mib, 0,
            "gpu_memory 0 takes the whole GPU"
        );
        assert!(r.gpus.iter().all(|g| g.simulated));
        assert_eq!(heartbeat_readings(&r).len(), 2);
    }

    #[test]
    fn bad_simulation_spec_is_refused() {
        let e = Inventory::open("n1", Some("lots"), String::new())
            .err()
            .expect("refused");
        assert_eq!(e.field, "simulate_gpus");
    }
}
