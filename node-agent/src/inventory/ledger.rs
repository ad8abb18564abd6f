//! The VRAM ledger: whose is the memory in use on each GPU. The supervisor
//! says which replicas run where and what they reserved (`Claim`s); the
//! GPU readings list the processes that hold memory (NVML's per-process
//! figures, or made-up ones on simulated GPUs). `attribute` matches each
//! process to the replica whose process group it is in (a model server is
//! its group's leader, and engines' workers inherit the group), and counts
//! the rest as foreign: held by processes Berth did not start.
//!
//! Memory that no listed process holds (the driver's own) is neither a
//! replica's nor foreign: it is in `memory_used_mib`, and on real GPUs it
//! is a few hundred MiB that every whole-GPU placement must not be refused
//! for. NVML lists processes by their pids in the host's namespace, so the
//! agent must see the host's processes (run it on the host, or with the
//! host's pid namespace) or every process looks foreign.
//!
//! `Ledger` remembers since when each replica has been above its
//! reservation, so that a short spike is not flagged: only a replica that
//! stays above for `OVER_RESERVATION_AFTER` is.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use berth_proto::v1;

use crate::supervisor::procfs::ProcId;

/// The environment variable through which a replica on simulated GPUs
/// declares the GPU memory it uses on each of its GPUs (MiB). Without it,
/// a replica on simulated GPUs uses exactly its reservation.
pub const SIMULATED_USE_ENV: &str = "BERTH_SIMULATED_GPU_MEMORY_MIB";

/// How long a replica must stay above its reservation to be flagged.
pub const OVER_RESERVATION_AFTER: Duration = Duration::from_secs(10);

/// What one replica holds, as the supervisor knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The replica.
    pub replica: String,
    /// Its model server, while one runs (its pid is the process group).
    pub server: Option<ProcId>,
    /// Its GPUs' indices.
    pub gpus: Vec<u32>,
    /// GPU memory reserved on each of its GPUs, MiB; 0 reserves each whole.
    pub reserved_mib: u64,
    /// On simulated GPUs: the use it declares per GPU ([`SIMULATED_USE_ENV`]).
    pub simulated_use_mib: Option<u64>,
}

impl Claim {
    /// The memory reserved on a GPU of `total_mib`.
    pub fn reserved_on(&self, total_mib: u64) -> u64 {
        reserved_per_gpu(self.reserved_mib, total_mib)
    }
}

/// What a reservation of `gpu_memory_mib` per GPU takes of a GPU of
/// `total_mib`: 0 reserves the GPU whole.
pub fn reserved_per_gpu(gpu_memory_mib: u64, total_mib: u64) -> u64 {
    if gpu_memory_mib == 0 {
        total_mib
    } else {
        gpu_memory_mib
    }
}

/// The use a claim declares through [`SIMULATED_USE_ENV`], if its value is
/// a number of MiB (anything else is ignored, and said in the agent's log).
pub fn simulated_use(replica: &str, env: &BTreeMap<String, String>) -> Option<u64> {
    let text = env.get(SIMULATED_USE_ENV)?;
    match text.trim().parse() {
        Ok(mib) => Some(mib),
        Err(_) => {
            tracing::warn!(%replica, value = %text, "{SIMULATED_USE_ENV} must be a number of MiB; ignoring it");
            None
        }
    }
}

/// One replica's GPU memory on one of its GPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuShareUse {
    /// The GPU's index.
    pub gpu: u32,
    /// Measured, MiB.
    pub used_mib: u64,
    /// Reserved, MiB.
    pub reserved_mib: u64,
}

/// Matches each process on `gpus` to a replica of `claims`, by process
/// group (`in_group(pid, server)` says whether `pid` belongs to the group
/// `server` leads); fills in each process's replica and each GPU's foreign
/// and over-reservation memory; returns each claim's use per GPU.
pub fn attribute(
    gpus: &mut [v1::Gpu],
    claims: &[Claim],
    in_group: impl Fn(u32, &ProcId) -> bool,
) -> BTreeMap<String, Vec<GpuShareUse>> {
    let mut uses: BTreeMap<String, Vec<GpuShareUse>> = BTreeMap::new();
    for gpu in gpus.iter_mut() {
        let mut foreign = 0u64;
        let mut by_replica: HashMap<&str, u64> = HashMap::new();
        for p in &mut gpu.processes {
            let owner = claims.iter().find(|c| {
                c.gpus.contains(&gpu.index) && c.server.is_some_and(|s| in_group(p.pid, &s))
            });
            match owner {
                Some(c) => {
                    p.replica = c.replica.clone();
                    *by_replica.entry(c.replica.as_str()).or_default() += p.used_memory_mib;
                }
                None => {
                    p.replica.clear();
                    foreign += p.used_memory_mib;
                }
            }
        }
        let mut over = 0u64;
        for c in claims
            .iter()
            .filter(|c| c.server.is_some() && c.gpus.contains(&gpu.index))
        {
            let used_mib = by_replica.get(c.replica.as_str()).copied().unwrap_or(0);
            let reserved_mib = c.reserved_on(gpu.memory_total_mib);
            over += used_mib.saturating_sub(reserved_mib);
            uses.entry(c.replica.clone())
                .or_default()
                .push(GpuShareUse {
                    gpu: gpu.index,
                    used_mib,
                    reserved_mib,
                });
        }
        gpu.foreign_memory_mib = foreign;
        gpu.over_reservation_mib = over;
    }
    uses
}

/// A replica's GPU memory, over all its GPUs, as the agent reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaMemory {
    /// Reserved, MiB.
    pub reserved_mib: u64,
    /// Measured, MiB; `None` while it is not measured (no server runs).
    pub used_mib: Option<u64>,
    /// Whether it has stayed above its reservation on one of its GPUs for
    /// [`OVER_RESERVATION_AFTER`].
    pub over: bool,
}

/// Each running replica's measured use, and since when it has been above
/// its reservation.
#[derive(Debug, Default)]
pub struct Ledger {
    uses: HashMap<String, Vec<GpuShareUse>>,
    over_since: HashMap<String, Instant>,
    /// When the last reading was made.
    now: Option<Instant>,
}

impl Ledger {
    /// Takes the uses of one reading, made at `now`. Replicas left out of
    /// it (stopped) are forgotten.
    pub fn update(&mut self, uses: BTreeMap<String, Vec<GpuShareUse>>, now: Instant) {
        self.over_since.retain(|id, _| uses.contains_key(id));
        for (id, shares) in &uses {
            if let Some(s) = shares.iter().find(|s| s.used_mib > s.reserved_mib) {
                if !self.over_since.contains_key(id) {
                    tracing::info!(replica = %id, gpu = s.gpu, used_mib = s.used_mib, reserved_mib = s.reserved_mib, "replica uses more GPU memory than it reserved");
                    self.over_since.insert(id.clone(), now);
                }
            } else {
                self.over_since.remove(id);
            }
        }
        self.uses = uses.into_iter().collect();
        self.now = Some(now);
    }

    /// What `replica` holds, reserving `reserved_mib` in all (the whole
    /// reservation is known from its spec even before it is measured).
    pub fn of(&self, replica: &str, reserved_mib: u64) -> ReplicaMemory {
        let measured = self.uses.get(replica).filter(|u| !u.is_empty());
        ReplicaMemory {
            reserved_mib,
            used_mib: measured.map(|u| u.iter().map(|s| s.used_mib).sum()),
            over: self
                .over_since
                .get(replica)
                .zip(self.now)
                .is_some_and(|(since, now)| now.duration_since(*since) >= OVER_RESERVATION_AFTER),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(pid: u32) -> Option<ProcId> {
        Some(ProcId {
            pid,
            start_ticks: 7,
        })
    }

    fn gpu(index: u32, processes: &[(u32, u64)]) -> v1::Gpu {
        v1::Gpu {
            index,
            memory_total_mib: 80 * 1024,
            memory_used_mib: processes.iter().map(|p| p.1).sum(),
            processes: processes
                .iter()
                .map(|&(pid, used_memory_mib)| v1::GpuProcess {
                    pid,
                    used_memory_mib,
                    replica: "stale".into(),
                })
                .collect(),
            ..Default::default()
        }
    }

    /// Workers in a replica's process group count as the replica's; other
    /// processes are foreign; a whole-GPU reservation is never exceeded.
    #[test]
    fn processes_are_matched_by_process_group() {
        // pid 11 and 12 are workers of server 10; 99 is someone else's.
        let groups: HashMap<u32, u32> = [(10, 10), (11, 10), (12, 10), (20, 20), (99, 99)].into();
        let in_group = |pid: u32, s: &ProcId| groups.get(&pid) == Some(&s.pid);
        let claims = [
            Claim {
                replica: "tp".into(),
                server: server(10),
                gpus: vec![0, 1],
                reserved_mib: 20 * 1024,
                simulated_use_mib: None,
            },
            Claim {
                replica: "whole".into(),
                server: server(20),
                gpus: vec![2],
                reserved_mib: 0,
                simulated_use_mib: None,
            },
            Claim {
                replica: "starting".into(),
                server: None,
                gpus: vec![2],
                reserved_mib: 1024,
                simulated_use_mib: None,
            },
        ];
        let mut gpus = vec![
            gpu(0, &[(11, 25 * 1024), (99, 4 * 1024)]),
            gpu(1, &[(12, 15 * 1024)]),
            gpu(2, &[(20, 79 * 1024)]),
        ];
        let uses = attribute(&mut gpus, &claims, in_group);
        assert_eq!(gpus[0].processes[0].replica, "tp");
        assert_eq!(gpus[0].processes[1].replica, "", "a stale owner is cleared");
        assert_eq!(gpus[0].foreign_memory_mib, 4 * 1024);
        assert_eq!(gpus[0].over_reservation_mib, 5 * 1024);
        assert_eq!(gpus[1].over_reservation_mib, 0);
        assert_eq!(
            gpus[2].over_reservation_mib, 0,
            "a whole GPU is all reserved"
        );
        assert_eq!(
            uses["tp"],
            [
                GpuShareUse {
                    gpu: 0,
                    used_mib: 25 * 1024,
                    reserved_mib: 20 * 1024
                },
                GpuShareUse {
                    gpu: 1,
                    used_mib: 15 * 1024,
                    reserved_mib: 20 * 1024
                },
            ]
        );
        assert_eq!(uses["whole"][0].reserved_mib, 80 * 1024);
        assert!(!uses.contains_key("starting"));
    }

    /// A replica is flagged only after it stayed above its reservation for
    /// the whole tolerance; dropping below, or stopping, resets the clock.
    #[test]
    fn only_a_replica_that_stays_above_is_flagged() {
        let over = |used| {
            BTreeMap::from([(
                "r".to_string(),
                vec![GpuShareUse {
                    gpu: 0,
                    used_mib: used,
                    reserved_mib: 100,
                }],
            )])
        };
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut l = Ledger::default();
        l.update(over(150), at(0));
        assert!(!l.of("r", 100).over);
        l.update(over(150), at(5));
        assert!(!l.of("r", 100).over);
        l.update(over(90), at(8));
        l.update(over(150), at(9));
        l.update(over(150), at(15));
        assert!(!l.of("r", 100).over, "the dip restarted the clock");
        l.update(over(150), at(19));
        let m = l.of("r", 100);
        assert!(m.over);
        assert_eq!(m.used_mib, Some(150));
        l.update(BTreeMap::new(), at(20));
        assert_eq!(
            l.of("r", 100),
            ReplicaMemory {
                reserved_mib: 100,
                used_mib: None,
                over: false
            },
            "a stopped replica is forgotten"
        );
    }

    #[test]
    fn a_declared_use_must_be_a_number() {
        let env = |v: &str| BTreeMap::from([(SIMULATED_USE_ENV.to_string(), v.to_string())]);
        assert_eq!(simulated_use("r", &env("30720")), Some(30720));
        assert_eq!(simulated_use("r", &env("30GiB")), None);
        assert_eq!(simulated_use("r", &BTreeMap::new()), None);
    }
}
