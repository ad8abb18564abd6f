//! CPU, memory, disks and network interfaces through sysinfo. Only the
//! counters the inventory shows are refreshed (no process table), so a
//! refresh stays cheap.

use berth_proto::v1;
use sysinfo::{CpuRefreshKind, Disks, MemoryRefreshKind, Networks, RefreshKind, System};

const MIB: u64 = 1024 * 1024;

/// Reads the machine's CPU, memory, disks and interfaces.
pub struct SystemReader {
    /// None when sysinfo cannot read this platform (then zeros are reported).
    system: Option<System>,
    disks: Option<Disks>,
    networks: Option<Networks>,
    /// The CPU model name.
    pub cpu_model: String,
    /// Logical CPUs.
    pub cpus: u32,
    physical_cores: u32,
    /// The host name.
    pub hostname: String,
    /// OS and kernel.
    pub os: String,
    /// Memory of a hollow agent's made-up machine (`berth bench`); None for a real one.
    hollow_memory_mib: Option<u64>,
}

impl SystemReader {
    /// Reads what does not change and prepares the counters.
    pub fn open() -> Self {
        let kind = RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing().with_usage())
            .with_memory(MemoryRefreshKind::nothing().with_ram());
        let system = match System::new_with_specifics(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read CPU and memory counters; reporting zeros");
                None
            }
        };
        let (cpu_model, cpus) = system
            .as_ref()
            .map(|s| {
                let model = s
                    .cpus()
                    .first()
                    .map(|c| c.brand().trim().to_string())
                    .unwrap_or_default();
                (model, s.cpus().len() as u32)
            })
            .unwrap_or_default();
        let cpus = if cpus == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
        } else {
            cpus
        };
        let os = format!(
            "{} (kernel {})",
            System::long_os_version().unwrap_or_else(|_| "unknown OS".into()),
            System::kernel_version().unwrap_or_else(|_| "unknown".into())
        );
        SystemReader {
            system,
            disks: Disks::new_with_refreshed_list().ok(),
            networks: Networks::new_with_refreshed_list().ok(),
            cpu_model: if cpu_model.is_empty() {
                "unknown CPU".into()
            } else {
                cpu_model
            },
            cpus,
            physical_cores: System::physical_core_count().map_or(0, |n| n as u32),
            hostname: System::host_name().unwrap_or_default(),
            os,
            hollow_memory_mib: None,
        }
    }

    /// A made-up machine for a hollow agent of `berth bench`: fixed CPU and
    /// memory, nothing read from this machine, named hollow wherever shown.
    pub fn hollow(cpus: u32, memory_mib: u64) -> Self {
        SystemReader {
            system: None,
            disks: None,
            networks: None,
            cpu_model: "hollow CPU (berth bench)".into(),
            cpus,
            physical_cores: cpus,
            hostname: "hollow".into(),
            os: "hollow agent of berth bench: no machine, no processes".into(),
            hollow_memory_mib: Some(memory_mib),
        }
    }

    /// Physical memory, MiB.
    pub fn memory_total_mib(&self) -> u64 {
        match (&self.system, self.hollow_memory_mib) {
            (_, Some(m)) => m,
            (Some(s), None) => s.total_memory() / MIB,
            (None, None) => 0,
        }
    }

    /// Takes fresh readings of everything but the GPUs.
    pub fn refresh(&mut self) -> v1::Inventory {
        let mut inv = v1::Inventory {
            cpu_model: self.cpu_model.clone(),
            cpus: self.cpus,
            physical_cores: self.physical_cores,
            hostname: self.hostname.clone(),
            os: self.os.clone(),
            ..Default::default()
        };
        if let Some(m) = self.hollow_memory_mib {
            inv.memory_total_mib = m;
            inv.memory_available_mib = m;
            return inv;
        }
        if let Some(s) = self.system.as_mut() {
            s.refresh_cpu_usage();
            s.refresh_memory();
            inv.cpu_usage_percent = s.global_cpu_usage();
            inv.memory_total_mib = s.total_memory() / MIB;
            inv.memory_available_mib = s.available_memory() / MIB;
        }
        if let Ok(load) = System::load_average() {
            inv.load_1m = load.one;
            inv.load_5m = load.five;
            inv.load_15m = load.fifteen;
        }
        if let Some(disks) = self.disks.as_mut() {
            disks.refresh(true);
            inv.disks = disks
                .iter()
                .map(|d| v1::Disk {
                    mount_point: d.mount_point().display().to_string(),
                    file_system: d.file_system().to_string_lossy().into_owned(),
                    total_mib: d.total_space() / MIB,
                    available_mib: d.available_space() / MIB,
                })
                .collect();
        }
        if let Some(networks) = self.networks.as_mut() {
            networks.refresh(true);
            let mut nics: Vec<v1::NetworkInterface> = networks
                .iter()
                .map(|(name, data)| v1::NetworkInterface {
                    name: name.to_string_lossy().into_owned(),
                    mac: data.mac_address().to_string(),
                    addresses: data
                        .ip_networks()
                        .iter()
                        .map(|n| format!("{}/{}", n.addr, n.prefix))
                        .collect(),
                    received_bytes: data.total_received(),
                    transmitted_bytes: data.total_transmitted(),
                })
                .collect();
            nics.sort_by(|a, b| a.name.cmp(&b.name));
            inv.networks = nics;
        }
        inv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The readings of this machine are sane: CPUs, memory, a root disk, loopback.
    #[test]
    fn readings_are_sane() {
        let mut r = SystemReader::open();
        assert!(r.cpus >= 1);
        assert!(!r.cpu_model.is_empty());
        let inv = r.refresh();
        assert!(inv.memory_total_mib > 64, "{} MiB", inv.memory_total_mib);
        assert!(inv.memory_available_mib <= inv.memory_total_mib);
        assert!((0.0..=100.0).contains(&inv.cpu_usage_percent));
        assert!(inv.load_1m >= 0.0);
        assert!(
            inv.disks.iter().any(|d| d.total_mib > 0),
            "no disk with a size: {:?}",
            inv.disks
        );
        assert!(
            inv.networks.iter().any(|n| n.name == "lo"),
            "no loopback: {:?}",
            inv.networks
        );
    }
}
