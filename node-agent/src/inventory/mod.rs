//! What this node has: GPUs (NVML, simulated, or none) and CPU, memory,
//! disks and network interfaces (sysinfo).
//!
//! `Inventory::open` decides the GPU source once: `--simulate-gpus` wins;
//! otherwise NVML if `libnvidia-ml` loads and finds GPUs; otherwise the node
//! is CPU-only, said once in the log. `refresh` takes fresh readings (a few
//! hundred microseconds: CPU and memory counters, mounts, interfaces, and one
//! NVML call per GPU reading) and returns the whole inventory as its wire
//! document; `registration` is the static part the control plane records.
//! Each refresh also settles the VRAM ledger (`ledger`): which replica's,
//! or nobody's, is each GPU's memory.

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use berth_common::gpu_health::{GpuFaults, GpuHealth, assess};
use berth_common::{GpuDevice, GpuSource, NodeInventory};
use berth_proto::v1;

pub mod ledger;
pub mod nvml;
pub mod simulated;
mod system;

use ledger::{Claim, GpuShareUse, Ledger, ReplicaMemory};
use nvml::NvmlGpus;
use system::SystemReader;

/// Where GPU readings come from.
enum Gpus {
    Nvml(NvmlGpus),
    Simulated {
        spec: String,
        devices: Vec<GpuDevice>,
        /// Injected faults, by position in `devices`.
        faults: Vec<GpuFaults>,
        /// Memory that simulated processes Berth did not start hold, MiB,
        /// by position in `devices`.
        foreign: Vec<u64>,
    },
    None {
        reason: String,
    },
}

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
                    faults: vec![GpuFaults::default(); devices.len()],
                    foreign: vec![0; devices.len()],
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
            gpus: {
                let devices = simulated::parse_spec(gpus, node)?;
                Gpus::Simulated {
                    spec: format!("{gpus}, hollow agent of berth bench"),
                    faults: vec![GpuFaults::default(); devices.len()],
                    foreign: vec![0; devices.len()],
                    devices,
                }
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

    /// Injects a fault into a simulated GPU; refused for real GPUs and for
    /// an index the node does not have. The next readings show it.
    pub fn simulate_fault(&mut self, req: &v1::SimulateGpuFaultRequest) -> Result<(), String> {
        let Gpus::Simulated {
            devices,
            faults,
            foreign,
            ..
        } = &mut self.gpus
        else {
            return Err(format!(
                "node {}'s GPUs are not simulated ({}): faults can only be injected into simulated GPUs (berth-agent --simulate-gpus)",
                self.node,
                self.source()
            ));
        };
        let Some(i) = devices.iter().position(|d| d.index == req.gpu) else {
            return Err(format!(
                "gpu {} does not exist on node {}: it has {} GPUs (indices 0-{})",
                req.gpu,
                self.node,
                devices.len(),
                devices.len().saturating_sub(1)
            ));
        };
        let total = devices[i].memory_mib;
        if let Some(mib) = req.foreign_memory_mib.filter(|m| *m > total) {
            // Checked before anything changes: a refused request changes nothing.
            return Err(format!(
                "foreign_memory_mib {mib} is more than gpu {}'s memory of {total} MiB: give at most {total}",
                req.gpu
            ));
        }
        let f = &mut faults[i];
        if req.clear {
            *f = GpuFaults::default();
        }
        if let Some(xid) = req.xid {
            f.record_xid(xid);
        }
        f.ecc_uncorrected = f.ecc_uncorrected.saturating_add(req.ecc_uncorrected);
        f.remap_pending |= req.remap_pending;
        f.lost |= req.lost;
        if let Some(mib) = req.foreign_memory_mib {
            foreign[i] = mib;
            tracing::warn!(
                gpu = req.gpu,
                mib,
                "SIMULATED foreign process GPU memory set"
            );
        }
        if req.xid.is_some()
            || req.ecc_uncorrected > 0
            || req.remap_pending
            || req.lost
            || req.clear
        {
            tracing::warn!(gpu = req.gpu, faults = ?f, "SIMULATED GPU fault injected");
        }
        Ok(())
    }

    /// Takes fresh readings, and settles the ledger of `claims` (each
    /// replica's use per GPU). Blocking (NVML, /proc): call it from a
    /// blocking thread.
    pub fn refresh(
        &mut self,
        claims: &[Claim],
    ) -> (v1::Inventory, BTreeMap<String, Vec<GpuShareUse>>) {
        let started = Instant::now();
        let mut gpus = match &self.gpus {
            Gpus::Nvml(n) => n.read(),
            Gpus::Simulated {
                devices,
                faults,
                foreign,
                ..
            } => devices
                .iter()
                .zip(faults)
                .zip(foreign)
                .map(|((d, f), foreign)| simulated_reading(d, f, *foreign, claims))
                .collect(),
            Gpus::None { .. } => Vec::new(),
        };
        let uses = ledger::attribute(&mut gpus, claims, crate::supervisor::procfs::in_group);
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
        (inv, uses)
    }
}

/// The inventory source behind a lock, plus its latest readings, shared by
/// the Agent service, the heartbeat loop and the refresh task.
pub struct SharedInventory {
    source: std::sync::Mutex<Inventory>,
    latest: std::sync::RwLock<v1::Inventory>,
    ledger: std::sync::Mutex<Ledger>,
    registration: NodeInventory,
}

impl SharedInventory {
    /// Wraps a source and takes a first reading.
    pub fn new(mut source: Inventory) -> std::sync::Arc<Self> {
        let (first, _) = source.refresh(&[]);
        let registration = source.registration();
        std::sync::Arc::new(SharedInventory {
            source: std::sync::Mutex::new(source),
            latest: std::sync::RwLock::new(first),
            ledger: Default::default(),
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

    /// Injects a fault into a simulated GPU (see [`Inventory::simulate_fault`]).
    pub fn simulate_fault(&self, req: &v1::SimulateGpuFaultRequest) -> Result<(), String> {
        self.source
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .simulate_fault(req)
    }

    /// What `spec`'s replica reserves and was last measured to use.
    pub fn memory_of(&self, spec: &berth_common::ReplicaSpec) -> ReplicaMemory {
        let reserved_mib = {
            let latest = self.latest.read().unwrap_or_else(|p| p.into_inner());
            spec.gpus
                .iter()
                .map(|i| {
                    let total = latest
                        .gpus
                        .iter()
                        .find(|g| g.index == *i)
                        .map_or(0, |g| g.memory_total_mib);
                    ledger::reserved_per_gpu(spec.resources.gpu_memory_mib, total)
                })
                .sum()
        };
        self.ledger
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .of(&spec.id, reserved_mib)
    }

    /// Takes fresh readings and settles the ledger of `claims` on a
    /// blocking thread, and keeps both as the latest.
    pub async fn refresh(self: &std::sync::Arc<Self>, claims: Vec<Claim>) -> v1::Inventory {
        let me = self.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut source = me.source.lock().unwrap_or_else(|p| p.into_inner());
            source.refresh(&claims)
        })
        .await;
        match read {
            Ok((inv, uses)) => {
                self.ledger
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .update(uses, std::time::Instant::now());
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

/// The `health` text of a reading: "ok", or the state and why.
pub fn health_text(faults: &GpuFaults) -> String {
    match assess(faults, &GpuFaults::default()) {
        (GpuHealth::Healthy, _) => "ok".into(),
        (health, reason) => format!("{health}: {reason}"),
    }
}

/// A simulated GPU's reading: each running replica on it is a process
/// using what it declares ([`ledger::SIMULATED_USE_ENV`]) or else its
/// reservation, and `foreign` MiB are held by a process Berth did not start
/// (pid 0, which no replica has).
fn simulated_reading(d: &GpuDevice, faults: &GpuFaults, foreign: u64, claims: &[Claim]) -> v1::Gpu {
    let mut processes: Vec<v1::GpuProcess> = claims
        .iter()
        .filter(|c| c.gpus.contains(&d.index))
        .filter_map(|c| {
            Some(v1::GpuProcess {
                pid: c.server?.pid,
                used_memory_mib: c
                    .simulated_use_mib
                    .unwrap_or_else(|| c.reserved_on(d.memory_mib)),
                replica: String::new(),
            })
        })
        .collect();
    if foreign > 0 {
        processes.push(v1::GpuProcess {
            pid: 0,
            used_memory_mib: foreign,
            replica: String::new(),
        });
    }
    let used = processes
        .iter()
        .map(|p| p.used_memory_mib)
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
        health: health_text(faults),
        faults: Some(faults.into()),
        processes,
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
            faults: g.faults,
            foreign_memory_mib: g.foreign_memory_mib,
            over_reservation_mib: g.over_reservation_mib,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(replica: &str, pid: u32, gpus: &[u32], reserved_mib: u64) -> Claim {
        Claim {
            replica: replica.into(),
            server: Some(crate::supervisor::procfs::ProcId {
                pid,
                start_ticks: 1,
            }),
            gpus: gpus.to_vec(),
            reserved_mib,
            simulated_use_mib: None,
        }
    }

    #[test]
    fn simulated_inventory_is_marked_and_accounts_running_replicas() {
        let mut inv =
            Inventory::open("n1", Some("2xA100-80GB"), "unavailable: test".into()).expect("open");
        assert!(inv.simulated());
        let reg = inv.registration();
        assert!(reg.simulated());
        assert_eq!(reg.gpus.len(), 2);
        reg.validate().expect("a valid registration");
        let not_running = Claim {
            server: None,
            ..claim("c", 0, &[0], 5 * 1024)
        };
        let (r, uses) = inv.refresh(&[
            claim("a", 101, &[0], 20 * 1024),
            claim("b", 102, &[0], 10 * 1024),
            claim("whole", 103, &[1], 0),
            not_running,
        ]);
        assert!(r.simulated);
        assert!(r.gpu_source.starts_with("simulated"));
        assert_eq!(r.gpus[0].memory_used_mib, 30 * 1024, "c runs no process");
        assert_eq!(r.gpus[0].memory_free_mib, 50 * 1024);
        assert_eq!(
            r.gpus[1].memory_free_mib, 0,
            "gpu_memory 0 takes the whole GPU"
        );
        assert!(r.gpus.iter().all(|g| g.simulated));
        let owners: Vec<&str> = r.gpus[0]
            .processes
            .iter()
            .map(|p| p.replica.as_str())
            .collect();
        assert_eq!(owners, ["a", "b"]);
        assert_eq!(r.gpus[0].foreign_memory_mib, 0);
        assert_eq!(uses["a"][0].used_mib, 20 * 1024);
        assert!(!uses.contains_key("c"), "not measured while nothing runs");
        assert_eq!(heartbeat_readings(&r).len(), 2);
    }

    /// A declared use above the reservation and foreign memory show in the
    /// readings, the heartbeat and the ledger.
    #[test]
    fn simulated_use_and_foreign_memory_reach_the_ledger() {
        let mut inv =
            Inventory::open("n1", Some("2xA100-80GB"), "unavailable: test".into()).expect("open");
        inv.simulate_fault(&v1::SimulateGpuFaultRequest {
            node: "n1".into(),
            gpu: 1,
            foreign_memory_mib: Some(60 * 1024),
            ..Default::default()
        })
        .expect("set");
        let hungry = Claim {
            simulated_use_mib: Some(30 * 1024),
            ..claim("hungry", 101, &[0], 20 * 1024)
        };
        let (r, uses) = inv.refresh(&[hungry]);
        assert_eq!(r.gpus[0].memory_used_mib, 30 * 1024);
        assert_eq!(r.gpus[0].over_reservation_mib, 10 * 1024);
        assert_eq!(r.gpus[1].memory_used_mib, 60 * 1024);
        assert_eq!(r.gpus[1].foreign_memory_mib, 60 * 1024);
        assert_eq!(r.gpus[1].processes[0].replica, "");
        let beat = heartbeat_readings(&r);
        assert_eq!(beat[0].over_reservation_mib, 10 * 1024);
        assert_eq!(beat[1].foreign_memory_mib, 60 * 1024);

        let mut ledger = Ledger::default();
        let t0 = std::time::Instant::now();
        ledger.update(uses.clone(), t0);
        let m = ledger.of("hungry", 20 * 1024);
        assert_eq!(m.used_mib, Some(30 * 1024));
        assert!(!m.over, "not flagged at once");
        ledger.update(uses, t0 + ledger::OVER_RESERVATION_AFTER);
        assert!(
            ledger.of("hungry", 20 * 1024).over,
            "flagged once it stayed above"
        );

        let e = inv
            .simulate_fault(&v1::SimulateGpuFaultRequest {
                node: "n1".into(),
                gpu: 1,
                foreign_memory_mib: Some(81 * 1024),
                ..Default::default()
            })
            .expect_err("more than the GPU has");
        assert!(e.contains("foreign_memory_mib 82944"), "{e}");
        let e = inv
            .simulate_fault(&v1::SimulateGpuFaultRequest {
                node: "n1".into(),
                gpu: 1,
                xid: Some(79),
                foreign_memory_mib: Some(81 * 1024),
                ..Default::default()
            })
            .expect_err("refused as a whole");
        assert!(e.contains("at most 81920"), "{e}");
        let (r, _) = inv.refresh(&[]);
        assert_eq!(
            r.gpus[1].health, "ok",
            "the XID of a refused request was not recorded"
        );
        assert_eq!(r.gpus[1].foreign_memory_mib, 60 * 1024);
    }

    /// Faults go into simulated GPUs only, show in the readings and the
    /// heartbeat, and a clear resets them (a GPU reset).
    #[test]
    fn faults_are_injected_into_simulated_gpus_only() {
        let mut inv =
            Inventory::open("n1", Some("2xA100-80GB"), "unavailable: test".into()).expect("open");
        let fault = |gpu, xid| v1::SimulateGpuFaultRequest {
            node: "n1".into(),
            gpu,
            xid,
            ..Default::default()
        };
        inv.simulate_fault(&fault(1, Some(79))).expect("injected");
        let (r, _) = inv.refresh(&[]);
        assert_eq!(r.gpus[0].health, "ok");
        assert!(
            r.gpus[1]
                .health
                .starts_with("unhealthy: 1 critical XID events, last XID 79"),
            "{}",
            r.gpus[1].health
        );
        let beat = heartbeat_readings(&r);
        assert_eq!(beat[1].faults.map(|f| f.unhealthy_xids), Some(1));
        let e = inv
            .simulate_fault(&fault(2, Some(79)))
            .expect_err("no gpu 2");
        assert!(e.contains("gpu 2 does not exist on node n1"), "{e}");
        inv.simulate_fault(&v1::SimulateGpuFaultRequest {
            clear: true,
            ..fault(1, None)
        })
        .expect("cleared");
        assert_eq!(inv.refresh(&[]).0.gpus[1].health, "ok");

        // This machine has no NVML: a CPU-only node, whose GPUs are not simulated.
        let mut real = Inventory::open("n2", None, "unavailable: test".into()).expect("open");
        assert!(!real.simulated());
        let e = real
            .simulate_fault(&fault(0, Some(79)))
            .expect_err("refused");
        assert!(e.contains("not simulated"), "{e}");
    }

    #[test]
    fn bad_simulation_spec_is_refused() {
        let e = Inventory::open("n1", Some("lots"), String::new())
            .err()
            .expect("refused");
        assert_eq!(e.field, "simulate_gpus");
    }
}
