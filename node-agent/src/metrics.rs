//! Per-GPU and per-replica series of the agent's `/metrics`, in Prometheus
//! conventions: base units in the names, `_total` counters, and one family
//! per reading with the GPU (`node`, `index`, `uuid`, `model`, `simulated`)
//! or the replica (`node`, `replica`, `model`) as labels, so a fleet's
//! dashboards select and aggregate by label. Built from the latest
//! inventory readings and replica states at each scrape: a scrape reads no
//! NVML.

use std::sync::atomic::AtomicU64;

use berth_common::ReplicaPhase;
use berth_common::gpu_health::{GpuFaults, GpuHealth, assess};
use berth_proto::v1;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

const MIB: f64 = 1024.0 * 1024.0;

/// Registers the per-GPU families of `inventory`'s GPUs.
pub fn register_gpus(registry: &mut Registry, node: &str, inventory: &v1::Inventory) {
    let gauges = || Family::<Labels, FloatGauge>::default();
    let (utilization, used, total, temperature, power, foreign) =
        (gauges(), gauges(), gauges(), gauges(), gauges(), gauges());
    let ecc = Family::<Labels, Gauge>::default();
    let xids = Family::<Labels, Counter>::default();
    let health = Family::<Labels, Gauge>::default();
    for g in &inventory.gpus {
        let labels: Labels = vec![
            ("node", node.to_string()),
            ("index", g.index.to_string()),
            ("uuid", g.uuid.clone()),
            ("model", g.model.clone()),
            ("simulated", g.simulated.to_string()),
        ];
        let with = |k: &'static str, v: &str| {
            let mut l = labels.clone();
            l.push((k, v.to_string()));
            l
        };
        if let Some(u) = g.utilization_percent {
            utilization.get_or_create(&labels).set(f64::from(u) / 100.0);
        }
        used.get_or_create(&labels)
            .set(g.memory_used_mib as f64 * MIB);
        total
            .get_or_create(&labels)
            .set(g.memory_total_mib as f64 * MIB);
        foreign
            .get_or_create(&labels)
            .set(g.foreign_memory_mib as f64 * MIB);
        if let Some(t) = g.temperature_c {
            temperature.get_or_create(&labels).set(f64::from(t));
        }
        if let Some(mw) = g.power_mw {
            power.get_or_create(&labels).set(f64::from(mw) / 1000.0);
        }
        let faults = GpuFaults::from(&g.faults.unwrap_or_default());
        if let Some(c) = g.ecc_errors_corrected {
            ecc.get_or_create(&with("type", "corrected"))
                .set(i64::try_from(c).unwrap_or(i64::MAX));
        }
        ecc.get_or_create(&with("type", "uncorrected")).set(
            i64::try_from(g.ecc_errors_uncorrected.unwrap_or(faults.ecc_uncorrected))
                .unwrap_or(i64::MAX),
        );
        for (class, n) in [
            ("unhealthy", faults.unhealthy_xids),
            ("degraded", faults.degraded_xids),
            ("application", faults.application_xids),
        ] {
            xids.get_or_create(&with("class", class)).inc_by(n);
        }
        let (state, _) = assess(&faults, &GpuFaults::default());
        for s in [
            GpuHealth::Healthy,
            GpuHealth::Degraded,
            GpuHealth::Unhealthy,
            GpuHealth::Lost,
        ] {
            health
                .get_or_create(&with("state", s.as_str()))
                .set(i64::from(s == state));
        }
    }
    registry.register_with_unit(
        "gpu_utilization",
        "GPU compute utilization over the driver's last sample period",
        Unit::Ratios,
        utilization,
    );
    registry.register_with_unit("gpu_memory_used", "GPU memory in use", Unit::Bytes, used);
    registry.register_with_unit("gpu_memory_total", "GPU memory", Unit::Bytes, total);
    registry.register_with_unit(
        "gpu_memory_foreign",
        "GPU memory held by processes Berth did not start",
        Unit::Bytes,
        foreign,
    );
    registry.register_with_unit(
        "gpu_temperature",
        "GPU core temperature",
        Unit::Celsius,
        temperature,
    );
    registry.register_with_unit(
        "gpu_power",
        "GPU power draw",
        Unit::Other("watts".into()),
        power,
    );
    registry.register(
        "gpu_ecc_errors",
        "Volatile ECC errors since the driver loaded, by type",
        ecc,
    );
    registry.register(
        "gpu_xid_events",
        "XID events since the agent started, by class (unhealthy and degraded count against the GPU; application faults do not)",
        xids,
    );
    registry.register(
        "gpu_health",
        "1 for the GPU's health state as its own readings show it (healthy, degraded, unhealthy, lost), 0 for the others",
        health,
    );
}

/// Registers the per-replica families: phase (a state set), restarts, and
/// the GPU memory reserved for it and measured (all its GPUs together), and
/// whether it stayed above its reservation.
pub fn register_replicas(
    registry: &mut Registry,
    node: &str,
    replicas: &[crate::supervisor::replica::Status],
    inventory: &crate::inventory::SharedInventory,
) {
    let phases = Family::<Labels, Gauge>::default();
    let restarts = Family::<Labels, Counter>::default();
    let reserved = Family::<Labels, FloatGauge>::default();
    let used = Family::<Labels, FloatGauge>::default();
    let over = Family::<Labels, Gauge>::default();
    for r in replicas {
        let spec = &r.record.spec;
        let labels: Labels = vec![
            ("node", node.to_string()),
            ("replica", spec.id.clone()),
            ("model", spec.model.clone()),
        ];
        for phase in [
            ReplicaPhase::Pending,
            ReplicaPhase::Starting,
            ReplicaPhase::Running,
            ReplicaPhase::Failed,
            ReplicaPhase::Stopped,
        ] {
            let mut l = labels.clone();
            l.push(("phase", phase.as_str().to_string()));
            phases.get_or_create(&l).set(i64::from(r.phase == phase));
        }
        restarts
            .get_or_create(&labels)
            .inc_by(u64::from(r.record.restarts));
        if !spec.gpus.is_empty() {
            let memory = inventory.memory_of(spec);
            reserved
                .get_or_create(&labels)
                .set(memory.reserved_mib as f64 * MIB);
            if let Some(mib) = memory.used_mib {
                used.get_or_create(&labels).set(mib as f64 * MIB);
            }
            over.get_or_create(&labels).set(i64::from(memory.over));
        }
    }
    registry.register(
        "replica_phase",
        "1 for the replica's phase (pending, starting, running, failed, stopped), 0 for the others",
        phases,
    );
    registry.register(
        "replica_restarts",
        "Restarts of the replica after it exited",
        restarts,
    );
    registry.register_with_unit(
        "replica_gpu_memory_reserved",
        "GPU memory reserved for the replica, over all its GPUs",
        Unit::Bytes,
        reserved,
    );
    registry.register_with_unit(
        "replica_gpu_memory_used",
        "GPU memory the replica's processes use, over all its GPUs (NVML per-process figures; declared on simulated GPUs)",
        Unit::Bytes,
        used,
    );
    registry.register(
        "replica_gpu_memory_over_reservation",
        "1 while the replica has stayed above its GPU memory reservation on one of its GPUs",
        over,
    );
}

/// How long runs take to start: from the supervisor beginning a run (the
/// command reached the replica) to the shim reporting the server spawned,
/// and from the spawn to the first passing health probe. Every run counts,
/// restarts included. Process-wide, like the gRPC call figures.
struct Starts {
    spawned: prometheus_client::metrics::histogram::Histogram,
    ready: prometheus_client::metrics::histogram::Histogram,
}

fn starts() -> &'static Starts {
    static STARTS: std::sync::OnceLock<Starts> = std::sync::OnceLock::new();
    STARTS.get_or_init(|| Starts {
        spawned: berth_proto::call_metrics::seconds_histogram(),
        ready: berth_proto::call_metrics::seconds_histogram(),
    })
}

/// A run's server was spawned `took` after its start began.
pub fn replica_spawned(took: std::time::Duration) {
    starts().spawned.observe(took.as_secs_f64());
}

/// A run passed its first health probe `took` after its server was spawned.
pub fn replica_ready(took: std::time::Duration) {
    starts().ready.observe(took.as_secs_f64());
}

/// Adds the start figures to `registry`.
pub fn register_starts(registry: &mut Registry) {
    let s = starts();
    registry.register(
        "replica_spawn_duration_seconds",
        "Runs of replicas started, and the seconds from the start of a run to its server spawned",
        s.spawned.clone(),
    );
    registry.register(
        "replica_ready_duration_seconds",
        "Runs of replicas that became ready, and the seconds from the spawn to the first passing health probe",
        s.ready.clone(),
    );
}
