//! Node inventories and registrations on the wire.

use berth_common::{GpuDevice, GpuSource, NodeInventory, NodeRegistration, ValidationError};

use crate::v1;

/// The GPU source names used on the wire.
const NVML: &str = "nvml";
const SIMULATED: &str = "simulated";
const NONE: &str = "none";

impl From<&NodeInventory> for v1::NodeInventory {
    fn from(inv: &NodeInventory) -> Self {
        let (source, spec, detail) = match &inv.gpu_source {
            GpuSource::Nvml { driver_version } => (NVML, "", driver_version.as_str()),
            GpuSource::Simulated { spec } => (SIMULATED, spec.as_str(), ""),
            GpuSource::None { reason } => (NONE, "", reason.as_str()),
        };
        let simulated = inv.simulated();
        v1::NodeInventory {
            gpu_source: source.into(),
            simulated_spec: spec.into(),
            gpu_source_detail: detail.into(),
            gpus: inv
                .gpus
                .iter()
                .map(|g| v1::Gpu {
                    index: g.index,
                    uuid: g.uuid.clone(),
                    model: g.model.clone(),
                    memory_total_mib: g.memory_mib,
                    memory_free_mib: g.memory_mib,
                    mig_mode: if g.mig_enabled { "enabled" } else { "disabled" }.into(),
                    pci_bus_id: g.pci_bus_id.clone(),
                    locality: g.locality,
                    simulated,
                    health: "ok".into(),
                    ..Default::default()
                })
                .collect(),
            cpu_model: inv.cpu_model.clone(),
            cpu_milli: inv.cpu_milli,
            memory_mib: inv.memory_mib,
            hostname: inv.hostname.clone(),
            os: inv.os.clone(),
            cgroups: inv.cgroups.clone(),
            agent_version: inv.agent_version.clone(),
        }
    }
}

/// Builds a validated static inventory.
pub fn inventory_from_proto(
    inv: Option<v1::NodeInventory>,
) -> Result<NodeInventory, ValidationError> {
    let Some(inv) = inv else {
        return Err(ValidationError::new("inventory", "", "is required"));
    };
    let gpu_source = match inv.gpu_source.as_str() {
        NVML => GpuSource::Nvml {
            driver_version: inv.gpu_source_detail,
        },
        SIMULATED => GpuSource::Simulated {
            spec: inv.simulated_spec,
        },
        NONE => GpuSource::None {
            reason: inv.gpu_source_detail,
        },
        other => {
            return Err(ValidationError::new(
                "inventory.gpu_source",
                other,
                "must be nvml, simulated or none",
            ));
        }
    };
    let out = NodeInventory {
        gpu_source,
        gpus: inv
            .gpus
            .into_iter()
            .map(|g| GpuDevice {
                index: g.index,
                uuid: g.uuid,
                model: g.model,
                memory_mib: g.memory_total_mib,
                pci_bus_id: g.pci_bus_id,
                locality: g.locality,
                mig_enabled: g.mig_mode == "enabled",
            })
            .collect(),
        cpu_model: inv.cpu_model,
        cpu_milli: inv.cpu_milli,
        memory_mib: inv.memory_mib,
        hostname: inv.hostname,
        os: inv.os,
        cgroups: inv.cgroups,
        agent_version: inv.agent_version,
    };
    out.validate()?;
    Ok(out)
}

/// Builds a validated registration.
pub fn registration_from_proto(
    req: v1::RegisterRequest,
) -> Result<NodeRegistration, ValidationError> {
    let out = NodeRegistration {
        name: req.node,
        addr: req.addr,
        labels: req.labels.into_iter().collect(),
        inventory: inventory_from_proto(req.inventory)?,
        instance: req.instance,
    };
    out.validate()?;
    Ok(out)
}

impl From<&berth_common::gpu_health::GpuFaults> for v1::GpuFaults {
    fn from(f: &berth_common::gpu_health::GpuFaults) -> Self {
        v1::GpuFaults {
            unhealthy_xids: f.unhealthy_xids,
            degraded_xids: f.degraded_xids,
            application_xids: f.application_xids,
            last_xid: f.last_xid,
            ecc_uncorrected: f.ecc_uncorrected,
            remap_pending: f.remap_pending,
            retired_pages_pending: f.retired_pages_pending,
            lost: f.lost,
        }
    }
}

impl From<&v1::GpuFaults> for berth_common::gpu_health::GpuFaults {
    fn from(f: &v1::GpuFaults) -> Self {
        berth_common::gpu_health::GpuFaults {
            unhealthy_xids: f.unhealthy_xids,
            degraded_xids: f.degraded_xids,
            application_xids: f.application_xids,
            last_xid: f.last_xid,
            ecc_uncorrected: f.ecc_uncorrected,
            remap_pending: f.remap_pending,
            retired_pages_pending: f.retired_pages_pending,
            lost: f.lost,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inventory() -> NodeInventory {
        NodeInventory {
            gpu_source: GpuSource::Simulated {
                spec: "1xA100-80GB".into(),
            },
            gpus: vec![GpuDevice {
                index: 0,
                uuid: "GPU-sim-0".into(),
                model: "A100-80GB".into(),
                memory_mib: 81920,
                pci_bus_id: String::new(),
                locality: Some(0),
                mig_enabled: false,
            }],
            cpu_model: "cpu".into(),
            cpu_milli: 2000,
            memory_mib: 4096,
            hostname: "h".into(),
            os: "linux".into(),
            cgroups: "unavailable".into(),
            agent_version: "0.1.0".into(),
        }
    }

    #[test]
    fn inventories_round_trip() {
        let inv = inventory();
        assert_eq!(inventory_from_proto(Some((&inv).into())).unwrap(), inv);
        let mut nvml = inventory();
        nvml.gpu_source = GpuSource::Nvml {
            driver_version: "550.54".into(),
        };
        nvml.gpus[0].mig_enabled = true;
        assert_eq!(inventory_from_proto(Some((&nvml).into())).unwrap(), nvml);
    }

    #[test]
    fn bad_inventories_name_the_field() {
        let mut p: v1::NodeInventory = (&inventory()).into();
        p.gpu_source = "cuda".into();
        assert_eq!(
            inventory_from_proto(Some(p)).unwrap_err().field,
            "inventory.gpu_source"
        );
        assert_eq!(inventory_from_proto(None).unwrap_err().field, "inventory");
        let req = v1::RegisterRequest {
            node: "Bad".into(),
            addr: "127.0.0.1:7500".into(),
            inventory: Some((&inventory()).into()),
            instance: "x".into(),
            ..Default::default()
        };
        assert_eq!(registration_from_proto(req).unwrap_err().field, "node");
    }
}
