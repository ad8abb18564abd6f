//! GPU health: what an agent's fault counters say about a GPU, and the
//! quarantine record the control plane keeps for a GPU taken out of
//! placement.
//!
//! Pure. The agent counts faults (XID events by class, volatile uncorrected
//! ECC errors, pending row remaps and page retirements, NVML losing the
//! device); `assess` turns the counters into a state and a reason, against
//! a baseline: the counters at which an operator last released the GPU, so
//! the faults that led to a quarantine do not quarantine it again, while
//! any new one does.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What a GPU's readings say, worst first when compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum GpuHealth {
    /// Nothing wrong.
    Healthy,
    /// Works, but needs attention (a reset to apply pending row remaps, a
    /// high rate of corrected errors); placement goes on.
    Degraded,
    /// Faulty: quarantined, its replicas move away.
    Unhealthy,
    /// NVML cannot reach it (fallen off the bus, driver gone): quarantined.
    Lost,
}

impl GpuHealth {
    /// The state's name in the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            GpuHealth::Healthy => "healthy",
            GpuHealth::Degraded => "degraded",
            GpuHealth::Unhealthy => "unhealthy",
            GpuHealth::Lost => "lost",
        }
    }

    /// Whether a GPU in this state is taken out of placement.
    pub fn quarantines(self) -> bool {
        matches!(self, GpuHealth::Unhealthy | GpuHealth::Lost)
    }
}

impl fmt::Display for GpuHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an XID counts, after NVIDIA's XID catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XidClass {
    /// A hardware or driver fault that makes the GPU unfit to run work.
    Unhealthy,
    /// A hardware condition that wants attention (a reset) but lets work run.
    Degraded,
    /// An application's fault (bad memory access, a killed context), or a
    /// code the catalog does not tie to the GPU: not held against it.
    Application,
}

/// The class of XID `code`. Unhealthy: 48 (double-bit ECC error), 61/62
/// (internal micro-controller halt), 64 (row remapping failed), 74 (NVLink
/// error), 79 (fell off the bus), 95 (uncontained ECC error), 119/120 (GSP
/// errors). Degraded: 63 (a row remap is pending a reset), 92 (high
/// single-bit ECC rate), 94 (contained ECC error: the affected application
/// dies, the GPU wants a reset). Everything else, such as 13 (graphics
/// engine exception), 31 (MMU fault) and 43 (a channel stopped), is the
/// application's.
pub fn classify_xid(code: u64) -> XidClass {
    match code {
        48 | 61 | 62 | 64 | 74 | 79 | 95 | 119 | 120 => XidClass::Unhealthy,
        63 | 92 | 94 => XidClass::Degraded,
        _ => XidClass::Application,
    }
}

/// One GPU's fault counters, as its agent reports them. Counters run from
/// the agent's start (NVML's volatile ECC counters from the driver's load).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuFaults {
    /// XID events of class `Unhealthy`.
    pub unhealthy_xids: u64,
    /// XID events of class `Degraded`.
    pub degraded_xids: u64,
    /// XID events of class `Application` (shown, never held against the GPU).
    pub application_xids: u64,
    /// The last XID that was not the application's, if any.
    pub last_xid: Option<u64>,
    /// Volatile uncorrected ECC errors.
    pub ecc_uncorrected: u64,
    /// Row remaps waiting for a GPU reset.
    pub remap_pending: bool,
    /// Retired pages waiting for a GPU reset.
    pub retired_pages_pending: bool,
    /// NVML cannot reach the device.
    pub lost: bool,
}

impl GpuFaults {
    /// Counts one XID event of `code`.
    pub fn record_xid(&mut self, code: u64) {
        match classify_xid(code) {
            XidClass::Unhealthy => {
                self.unhealthy_xids += 1;
                self.last_xid = Some(code);
            }
            XidClass::Degraded => {
                self.degraded_xids += 1;
                self.last_xid = Some(code);
            }
            XidClass::Application => self.application_xids += 1,
        }
    }
}

/// The state of a GPU with `faults`, counting only what exceeds `baseline`
/// (the counters at its last release; zero when never released), and why.
pub fn assess(faults: &GpuFaults, baseline: &GpuFaults) -> (GpuHealth, String) {
    let xid = || {
        faults.last_xid.map_or_else(
            || "unknown".to_string(),
            |x| format!("{x} ({})", xid_name(x)),
        )
    };
    if faults.lost {
        return (
            GpuHealth::Lost,
            "NVML cannot reach the GPU (fallen off the bus or driver gone)".into(),
        );
    }
    let mut unhealthy = Vec::new();
    let new_xids = faults
        .unhealthy_xids
        .saturating_sub(baseline.unhealthy_xids);
    if new_xids > 0 {
        unhealthy.push(format!(
            "{new_xids} critical XID events, last XID {}",
            xid()
        ));
    }
    let new_ecc = faults
        .ecc_uncorrected
        .saturating_sub(baseline.ecc_uncorrected);
    if new_ecc > 0 {
        unhealthy.push(format!("{new_ecc} uncorrected ECC errors"));
    }
    if !unhealthy.is_empty() {
        return (GpuHealth::Unhealthy, unhealthy.join("; "));
    }
    let mut degraded = Vec::new();
    let new_degraded = faults.degraded_xids.saturating_sub(baseline.degraded_xids);
    if new_degraded > 0 {
        degraded.push(format!("{new_degraded} XID events, last XID {}", xid()));
    }
    if faults.remap_pending {
        degraded.push("row remaps pending a GPU reset".into());
    }
    if faults.retired_pages_pending {
        degraded.push("retired pages pending a GPU reset".into());
    }
    if !degraded.is_empty() {
        return (GpuHealth::Degraded, degraded.join("; "));
    }
    (GpuHealth::Healthy, String::new())
}

/// A short name for the XIDs Berth acts on, for people.
pub fn xid_name(code: u64) -> &'static str {
    match code {
        13 => "graphics engine exception",
        31 => "GPU memory page fault",
        43 => "GPU stopped processing",
        48 => "double-bit ECC error",
        61 | 62 => "internal micro-controller halt",
        63 => "row remapping pending",
        64 => "row remapping failure",
        74 => "NVLink error",
        79 => "GPU has fallen off the bus",
        92 => "high single-bit ECC error rate",
        94 => "contained ECC error",
        95 => "uncontained ECC error",
        119 | 120 => "GSP error",
        _ => "see NVIDIA's XID catalog",
    }
}

/// Who took a GPU out of placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QuarantinedBy {
    /// The leader, from the agent's readings.
    Health,
    /// An operator (`berth node gpu quarantine`).
    Operator,
}

impl QuarantinedBy {
    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            QuarantinedBy::Health => "health",
            QuarantinedBy::Operator => "operator",
        }
    }
}

/// A GPU out of placement: nothing new lands on it and its replicas move
/// away. Only an operator releases it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    /// The GPU's uuid when it was quarantined (indices can change when a
    /// machine's GPUs change).
    pub uuid: String,
    /// Why, for people.
    pub reason: String,
    /// Who.
    pub by: QuarantinedBy,
    /// When (ms since the Unix epoch, leader's clock).
    pub since_ms: u64,
    /// The agent instance whose counters led to it, and the counters; a
    /// release makes them the baseline.
    pub faults: Option<(String, GpuFaults)>,
}

/// What the control plane keeps about one GPU beyond its inventory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuRecord {
    /// Set while the GPU is out of placement.
    pub quarantine: Option<Quarantine>,
    /// The agent instance and counters at the last release: faults up to
    /// these were already judged by an operator.
    pub baseline: Option<(String, GpuFaults)>,
}

impl GpuRecord {
    /// The baseline that applies to readings from agent `instance` (a new
    /// agent instance counts from zero).
    pub fn baseline_for(&self, instance: &str) -> GpuFaults {
        match &self.baseline {
            Some((i, faults)) if i == instance => *faults,
            _ => GpuFaults::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xids_are_held_against_the_gpu_by_class() {
        for code in [48, 64, 74, 79, 95] {
            assert_eq!(classify_xid(code), XidClass::Unhealthy, "xid {code}");
        }
        for code in [63, 92, 94] {
            assert_eq!(classify_xid(code), XidClass::Degraded, "xid {code}");
        }
        for code in [13, 31, 43, 45, 0, 9999] {
            assert_eq!(classify_xid(code), XidClass::Application, "xid {code}");
        }
    }

    #[test]
    fn health_counts_what_exceeds_the_baseline() {
        let none = GpuFaults::default();
        assert_eq!(assess(&none, &none).0, GpuHealth::Healthy);

        let mut app = GpuFaults::default();
        app.record_xid(13);
        app.record_xid(43);
        assert_eq!(assess(&app, &none), (GpuHealth::Healthy, String::new()));
        assert_eq!(app.last_xid, None);

        let mut bus = GpuFaults::default();
        bus.record_xid(79);
        let (health, reason) = assess(&bus, &none);
        assert_eq!(health, GpuHealth::Unhealthy);
        assert!(
            reason.contains("XID 79 (GPU has fallen off the bus)"),
            "{reason}"
        );
        // Released at these counters: healthy again, until a new fault.
        assert_eq!(assess(&bus, &bus).0, GpuHealth::Healthy);
        let mut again = bus;
        again.record_xid(48);
        assert_eq!(assess(&again, &bus).0, GpuHealth::Unhealthy);

        let ecc = GpuFaults {
            ecc_uncorrected: 2,
            ..GpuFaults::default()
        };
        let (health, reason) = assess(&ecc, &none);
        assert_eq!(health, GpuHealth::Unhealthy);
        assert_eq!(reason, "2 uncorrected ECC errors");

        let remap = GpuFaults {
            remap_pending: true,
            ..GpuFaults::default()
        };
        assert_eq!(assess(&remap, &none).0, GpuHealth::Degraded);
        let mut contained = GpuFaults::default();
        contained.record_xid(94);
        assert_eq!(assess(&contained, &none).0, GpuHealth::Degraded);

        let lost = GpuFaults {
            lost: true,
            ..GpuFaults::default()
        };
        assert_eq!(assess(&lost, &lost).0, GpuHealth::Lost);
        assert!(GpuHealth::Lost.quarantines() && GpuHealth::Unhealthy.quarantines());
        assert!(!GpuHealth::Degraded.quarantines());
    }

    #[test]
    fn a_baseline_holds_only_for_the_agent_instance_it_was_taken_from() {
        let mut faults = GpuFaults::default();
        faults.record_xid(79);
        let record = GpuRecord {
            quarantine: None,
            baseline: Some(("agent-a".into(), faults)),
        };
        assert_eq!(record.baseline_for("agent-a"), faults);
        assert_eq!(record.baseline_for("agent-b"), GpuFaults::default());
    }
}
