//! GPUs through NVML (nvml-wrapper, which loads `libnvidia-ml.so.1` at run
//! time: nothing of CUDA is needed to build). One thread owns the `Nvml`
//! handle and its XID event set (both borrow from it) and answers reading
//! requests; between requests it drains critical XID events so none is lost.
//!
//! Every per-GPU reading that a GPU does not support is `None`, never an
//! error: consumer GPUs have no ECC, MIG or power readings.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use berth_common::GpuDevice;
use berth_common::gpu_health::{GpuFaults, classify_xid, xid_name};
use berth_proto::v1;
use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;

use super::health_text;

const MIB: u64 = 1024 * 1024;

type Reply = std::sync::mpsc::Sender<Vec<v1::Gpu>>;

/// A handle to the NVML owner thread.
pub struct NvmlGpus {
    requests: mpsc::Sender<Reply>,
    /// The GPUs as found at start-up.
    pub devices: Vec<GpuDevice>,
    /// The driver version.
    pub driver_version: String,
}

impl NvmlGpus {
    /// Loads NVML and lists the GPUs. `Err` says why there are none: the
    /// library is missing (a CPU-only machine), or it found no GPU.
    pub fn open() -> Result<Self, String> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (requests, rx) = mpsc::channel::<Reply>();
        std::thread::Builder::new()
            .name("nvml".into())
            .spawn(move || owner(rx, ready_tx))
            .map_err(|e| format!("start the NVML thread: {e}"))?;
        let (devices, driver_version) = ready_rx
            .recv()
            .map_err(|_| "the NVML thread stopped".to_string())??;
        Ok(NvmlGpus {
            requests,
            devices,
            driver_version,
        })
    }

    /// Reads every GPU now. Blocking: call it from a blocking thread.
    pub fn read(&self) -> Vec<v1::Gpu> {
        let (tx, rx) = mpsc::channel();
        if self.requests.send(tx).is_err() {
            return Vec::new();
        }
        rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default()
    }
}

fn describe(e: &NvmlError) -> String {
    match e {
        NvmlError::LibloadingError(inner) => {
            format!("the NVIDIA management library (libnvidia-ml.so.1) did not load: {inner}")
        }
        NvmlError::DriverNotLoaded => "the NVIDIA driver is not loaded".into(),
        other => format!("NVML failed: {other}"),
    }
}

type Ready = Result<(Vec<GpuDevice>, String), String>;

fn owner(requests: mpsc::Receiver<Reply>, ready: mpsc::Sender<Ready>) {
    let nvml = match Nvml::init() {
        Ok(n) => n,
        Err(e) => {
            let _ = ready.send(Err(describe(&e)));
            return;
        }
    };
    let devices = match list(&nvml) {
        Ok(d) if d.is_empty() => {
            let _ = ready.send(Err("NVML found no GPU on this machine".into()));
            return;
        }
        Ok(d) => d,
        Err(e) => {
            let _ = ready.send(Err(describe(&e)));
            return;
        }
    };
    let driver = nvml
        .sys_driver_version()
        .unwrap_or_else(|_| "unknown".into());
    // XID events by GPU, counted by class (berth_common::gpu_health).
    let mut xids = vec![GpuFaults::default(); devices.len()];
    let uuids: Vec<String> = devices.iter().map(|d| d.uuid.clone()).collect();
    let _ = ready.send(Ok((devices, driver)));

    // Critical XID events, where the GPUs support them (not on every GPU,
    // and not inside some containers): best effort.
    // A failed registration releases the whole set, so only GPUs that say
    // they support the event are registered.
    let mut events = nvml.create_event_set().ok();
    for i in 0..uuids.len() as u32 {
        let Ok(device) = nvml.device_by_index(i) else {
            continue;
        };
        let supported = device
            .supported_event_types()
            .is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR));
        if let (true, Some(set)) = (supported, events.take()) {
            events = device
                .register_events(EventTypes::CRITICAL_XID_ERROR, set)
                .ok();
        }
    }
    loop {
        if let Some(set) = &events {
            while let Ok(event) = set.wait(0) {
                let Ok(uuid) = event.device.uuid() else {
                    continue;
                };
                if let Some(i) = uuids.iter().position(|u| *u == uuid) {
                    match event.event_data {
                        Some(XidError::Value(code)) => {
                            tracing::warn!(gpu = i, %uuid, xid = code, kind = ?classify_xid(code), "XID event: {}", xid_name(code));
                            xids[i].record_xid(code);
                        }
                        // The driver could not say which: count it as the application's.
                        _ => xids[i].application_xids += 1,
                    }
                }
            }
        }
        match requests.recv_timeout(Duration::from_millis(500)) {
            Ok(reply) => {
                let _ = reply.send(read_all(&nvml, &xids));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn list(nvml: &Nvml) -> Result<Vec<GpuDevice>, NvmlError> {
    let count = nvml.device_count()?;
    let mut out = Vec::with_capacity(count as usize);
    for index in 0..count {
        let d = nvml.device_by_index(index)?;
        let pci_bus_id = d.pci_info().map(|p| p.bus_id).unwrap_or_default();
        out.push(GpuDevice {
            index,
            uuid: d.uuid()?,
            model: d.name().unwrap_or_else(|_| "unknown NVIDIA GPU".into()),
            memory_mib: d.memory_info()?.total / MIB,
            locality: numa_node(&pci_bus_id),
            pci_bus_id,
            mig_enabled: d.mig_mode().is_ok_and(|m| m.current == 1),
        });
    }
    Ok(out)
}

/// The NUMA node of a PCI device, from sysfs. NVML's bus id has an 8-digit
/// domain (`00000000:17:00.0`); sysfs uses 4 digits, lowercase.
fn numa_node(bus_id: &str) -> Option<u32> {
    let short = bus_id.get(bus_id.len().checked_sub(12)?..)?.to_lowercase();
    let text = std::fs::read_to_string(
        Path::new("/sys/bus/pci/devices")
            .join(short)
            .join("numa_node"),
    )
    .ok()?;
    // -1 means the platform does not say.
    text.trim()
        .parse::<i64>()
        .ok()
        .and_then(|n| u32::try_from(n).ok())
}

fn read_all(nvml: &Nvml, xids: &[GpuFaults]) -> Vec<v1::Gpu> {
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .map(|index| {
            let mut faults = xids.get(index as usize).copied().unwrap_or_default();
            let Ok(d) = nvml.device_by_index(index) else {
                faults.lost = true;
                return v1::Gpu {
                    index,
                    health: health_text(&faults),
                    faults: Some((&faults).into()),
                    ..Default::default()
                };
            };
            let memory = d.memory_info().ok();
            let total = memory.as_ref().map(|m| m.total / MIB).unwrap_or(0);
            let used = memory.as_ref().map(|m| m.used / MIB).unwrap_or(0);
            let ecc = |kind| d.total_ecc_errors(kind, EccCounter::Volatile).ok();
            let uncorrected = ecc(MemoryError::Uncorrected);
            faults.ecc_uncorrected = uncorrected.unwrap_or(0);
            // A failed row remap arrives as XID 64 (unhealthy).
            faults.retired_pages_pending = d.are_pages_pending_retired().unwrap_or(false);
            faults.remap_pending = remap_pending(nvml, &d).unwrap_or(false);
            let xid_events = faults.unhealthy_xids + faults.degraded_xids + faults.application_xids;
            let pci_bus_id = d.pci_info().map(|p| p.bus_id).unwrap_or_default();
            v1::Gpu {
                index,
                uuid: d.uuid().unwrap_or_default(),
                model: d.name().unwrap_or_default(),
                memory_total_mib: total,
                memory_used_mib: used,
                memory_free_mib: total.saturating_sub(used),
                utilization_percent: d.utilization_rates().ok().map(|u| u.gpu),
                temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
                power_mw: d.power_usage().ok(),
                mig_mode: match d.mig_mode() {
                    Ok(m) if m.current == 1 => "enabled",
                    Ok(_) => "disabled",
                    Err(_) => "unsupported",
                }
                .into(),
                locality: numa_node(&pci_bus_id),
                pci_bus_id,
                ecc_errors_corrected: ecc(MemoryError::Corrected),
                ecc_errors_uncorrected: uncorrected,
                xid_events,
                last_xid: faults.last_xid,
                processes: d
                    .running_compute_processes()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|p| v1::GpuProcess {
                        pid: p.pid,
                        used_memory_mib: match p.used_gpu_memory {
                            UsedGpuMemory::Used(b) => b / MIB,
                            UsedGpuMemory::Unavailable => 0,
                        },
                        // Settled by the ledger.
                        replica: String::new(),
                    })
                    .collect(),
                simulated: false,
                health: health_text(&faults),
                faults: Some((&faults).into()),
                // Settled by the ledger.
                foreign_memory_mib: 0,
                over_reservation_mib: 0,
            }
        })
        .collect()
}

/// Whether row remaps wait for a GPU reset (Ampere and later; `None` where
/// the GPU or the driver cannot say). nvml-wrapper 0.13 has no wrapper for
/// `nvmlDeviceGetRemappedRows`, so it is called through the library
/// nvml-wrapper loaded, and only when the driver exports it (the raw
/// binding panics on a missing symbol).
#[allow(unsafe_code)]
fn remap_pending(nvml: &Nvml, device: &nvml_wrapper::Device<'_>) -> Option<bool> {
    let lib = nvml.lib();
    lib.nvmlDeviceGetRemappedRows.as_ref().ok()?;
    let (mut correctable, mut uncorrectable, mut pending, mut failed) = (0, 0, 0, 0);
    // SAFETY: the symbol is loaded (checked above); the handle belongs to a
    // device borrowed from this live `Nvml`, used on the thread that owns
    // it; the four out-pointers are to locals that outlive the call.
    let code = unsafe {
        lib.nvmlDeviceGetRemappedRows(
            device.handle(),
            &mut correctable,
            &mut uncorrectable,
            &mut pending,
            &mut failed,
        )
    };
    nvml_wrapper::error::nvml_try(code).ok()?;
    Some(pending != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without the NVIDIA library the open fails with a reason, never a panic.
    /// (On a GPU machine it lists the GPUs instead; both are fine here.)
    #[test]
    fn open_degrades_cleanly() {
        match NvmlGpus::open() {
            Ok(g) => assert!(!g.devices.is_empty()),
            Err(reason) => assert!(
                reason.contains("NVIDIA") || reason.contains("NVML"),
                "{reason}"
            ),
        }
    }

    #[test]
    fn numa_node_of_unknown_bus_is_none() {
        assert_eq!(numa_node(""), None);
        assert_eq!(numa_node("00000000:ff:1f.7"), None);
    }
}
