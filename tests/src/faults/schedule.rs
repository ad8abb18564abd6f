//! A fault schedule is a value: made from a seed, printed as JSON before
//! the run, and replayed from that file. Each step names a fault, how long
//! it lasts and the quiet gap after it. Faults that name "the leader" are
//! resolved when they are injected, and the history records which member
//! that was.

use serde::{Deserialize, Serialize};

/// One fault: what is injected, undone when its step ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Members split in two random halves (`minority` against the rest).
    PartitionHalves { minority: Vec<String> },
    /// The leader alone in the minority.
    IsolateLeader,
    /// The leader stays in the majority; `size` followers are cut off.
    LeaderInMajority { size: usize },
    /// Five members in a ring, each seeing only its two neighbours: every
    /// member has a majority, no two agree on it.
    Ring,
    /// `to` drops every packet from `from` (and so TCP between them stalls).
    OneWay { from: String, to: String },
    /// Delay and loss on what `host` receives.
    Netem {
        host: String,
        delay_ms: u32,
        jitter_ms: u32,
        loss_pct: u32,
    },
    /// kill -9 of one member; restarted when the step ends.
    KillMember { member: String },
    /// kill -9 of the leader; restarted when the step ends.
    KillLeader,
    /// kill -9 of every member at once; all restarted when the step ends.
    KillAllMembers,
    /// SIGSTOP of the leader; SIGCONT when the step ends.
    PauseLeader,
    /// kill -9 of an agent while its replicas run; restarted at the end.
    KillAgent { agent: String },
    /// An agent cut off from every member while its replicas run.
    PartitionAgent { agent: String },
    /// The member on host `member` leaves the voters (a Raft membership
    /// change) and is wiped; a fresh member with a new id joins on the same
    /// host (learner, then voter). Remove, add and replace in one step, one
    /// change at a time.
    ReplaceMember { member: String },
    /// As `ReplaceMember`, while a follower on another host is stopped
    /// with SIGSTOP (SIGCONT when the step ends): the change cannot finish
    /// until the follower is back when it needs that follower's vote.
    ReplaceWithPausedFollower { member: String },
    /// `member`'s Raft log keeps writes in memory until they are synced,
    /// then the member is killed with -9: a power loss that drops every
    /// write not yet synced (what was acknowledged must survive).
    DiskCrash { member: String },
    /// `member`'s disk fails `fsync` (EIO): the member must stop rather
    /// than carry on, and comes back once the disk is healthy.
    DiskSyncError { member: String },
    /// `member`'s disk is full (ENOSPC): a clear error, nothing
    /// acknowledged that was not stored, recovery once space returns.
    DiskFull { member: String },
}

/// One step: a fault, how long it holds, and the quiet time after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// The fault.
    pub fault: Fault,
    /// How long it holds, in milliseconds.
    pub duration_ms: u64,
    /// The quiet time after it is undone, in milliseconds.
    pub gap_ms: u64,
}

/// A whole run's faults and the topology they assume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// The seed it came from (also seeds the workload).
    pub seed: u64,
    /// Members ("m1".."mN").
    pub members: usize,
    /// Agents ("a1".."aN").
    pub agents: usize,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

/// The member host names of a topology of `n` members.
pub fn member_names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("m{i}")).collect()
}

/// The agent host names of a topology of `n` agents.
pub fn agent_names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("a{i}")).collect()
}

impl Schedule {
    /// `events` steps drawn from `seed` for `members` members and `agents`
    /// agents. The same arguments give the same schedule.
    pub fn generate(seed: u64, members: usize, agents: usize, events: usize) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        // Membership changes come from a stream of their own, so adding
        // them kept the other faults of every seed as they were.
        let mut changes = fastrand::Rng::with_seed(seed ^ 0x6d65_6d62_6572_7321);
        let names = member_names(members);
        let agent_hosts = agent_names(agents);
        let minority = (members - 1) / 2;
        let mut steps = Vec::with_capacity(events);
        while steps.len() < events {
            // Weights: partitions and process faults most, the slow ones
            // (a 30 s agent partition, pauses) less.
            let pick = rng.u32(0..100);
            let (fault, duration_ms) = match pick {
                0..=14 => {
                    let mut shuffled = names.clone();
                    rng.shuffle(&mut shuffled);
                    let mut m: Vec<String> = shuffled.into_iter().take(minority.max(1)).collect();
                    m.sort();
                    (
                        Fault::PartitionHalves { minority: m },
                        rng.u64(3_000..8_000),
                    )
                }
                15..=26 => (Fault::IsolateLeader, rng.u64(3_000..8_000)),
                27..=36 => (
                    Fault::LeaderInMajority {
                        size: minority.max(1),
                    },
                    rng.u64(3_000..8_000),
                ),
                37..=41 if members == 5 => (Fault::Ring, rng.u64(3_000..8_000)),
                37..=46 => {
                    let from = names[rng.usize(0..names.len())].clone();
                    let mut to = names[rng.usize(0..names.len())].clone();
                    while to == from {
                        to = names[rng.usize(0..names.len())].clone();
                    }
                    (Fault::OneWay { from, to }, rng.u64(3_000..8_000))
                }
                47..=54 => (
                    Fault::Netem {
                        host: names[rng.usize(0..names.len())].clone(),
                        delay_ms: rng.u32(20..200),
                        jitter_ms: rng.u32(0..50),
                        loss_pct: rng.u32(0..30),
                    },
                    rng.u64(3_000..8_000),
                ),
                55..=64 => (
                    Fault::KillMember {
                        member: names[rng.usize(0..names.len())].clone(),
                    },
                    rng.u64(1_000..5_000),
                ),
                65..=74 => (Fault::KillLeader, rng.u64(1_000..5_000)),
                75..=78 => (Fault::KillAllMembers, rng.u64(1_000..3_000)),
                79..=86 => (Fault::PauseLeader, rng.u64(5_000..15_000)),
                87..=94 if agents > 0 => (
                    Fault::KillAgent {
                        agent: agent_hosts[rng.usize(0..agent_hosts.len())].clone(),
                    },
                    rng.u64(1_000..5_000),
                ),
                95..=99 if agents > 0 => (
                    Fault::PartitionAgent {
                        agent: agent_hosts[rng.usize(0..agent_hosts.len())].clone(),
                    },
                    30_000,
                ),
                _ => continue,
            };
            steps.push(Step {
                fault,
                duration_ms,
                gap_ms: rng.u64(1_000..3_000),
            });
            let roll = changes.u32(0..100);
            if members >= 3 && steps.len() < events && roll < 20 {
                let member = names[changes.usize(0..names.len())].clone();
                let fault = match (roll < 12, changes.u32(0..3)) {
                    (true, 0) => Fault::ReplaceWithPausedFollower { member },
                    (true, _) => Fault::ReplaceMember { member },
                    (false, 0) => Fault::DiskCrash { member },
                    (false, 1) => Fault::DiskSyncError { member },
                    (false, _) => Fault::DiskFull { member },
                };
                steps.push(Step {
                    fault,
                    duration_ms: changes.u64(2_000..6_000),
                    gap_ms: changes.u64(1_000..3_000),
                });
            }
        }
        Schedule {
            seed,
            members,
            agents,
            steps,
        }
    }

    /// The schedule's total length with its gaps, in milliseconds.
    pub fn length_ms(&self) -> u64 {
        self.steps.iter().map(|s| s.duration_ms + s.gap_ms).sum()
    }

    /// Checks a schedule read from a file against its own topology, so a
    /// hand-edited replay fails before any namespace is made.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=7).contains(&self.members) {
            return Err(format!("members is {}: it must be 1 to 7", self.members));
        }
        if self.agents > 8 {
            return Err(format!("agents is {}: it must be at most 8", self.agents));
        }
        let members = member_names(self.members);
        let agents = agent_names(self.agents);
        let member = |n: &String, i: usize| -> Result<(), String> {
            if members.contains(n) {
                Ok(())
            } else {
                Err(format!("step {i}: member {n:?} is not one of {members:?}"))
            }
        };
        let agent = |n: &String, i: usize| -> Result<(), String> {
            if agents.contains(n) {
                Ok(())
            } else {
                Err(format!("step {i}: agent {n:?} is not one of {agents:?}"))
            }
        };
        for (i, s) in self.steps.iter().enumerate() {
            match &s.fault {
                Fault::PartitionHalves { minority } => {
                    for m in minority {
                        member(m, i)?;
                    }
                }
                Fault::OneWay { from, to } => {
                    member(from, i)?;
                    member(to, i)?;
                }
                Fault::Netem { host, loss_pct, .. } => {
                    member(host, i).or_else(|_| agent(host, i))?;
                    if *loss_pct > 100 {
                        return Err(format!("step {i}: loss_pct {loss_pct} is over 100"));
                    }
                }
                Fault::KillMember { member: m }
                | Fault::ReplaceMember { member: m }
                | Fault::ReplaceWithPausedFollower { member: m }
                | Fault::DiskCrash { member: m }
                | Fault::DiskSyncError { member: m }
                | Fault::DiskFull { member: m } => member(m, i)?,
                Fault::KillAgent { agent: a } | Fault::PartitionAgent { agent: a } => agent(a, i)?,
                Fault::Ring if self.members != 5 => {
                    return Err(format!(
                        "step {i}: a ring needs 5 members, not {}",
                        self.members
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let a = Schedule::generate(7, 5, 2, 50);
        assert_eq!(a, Schedule::generate(7, 5, 2, 50));
        assert_ne!(a, Schedule::generate(8, 5, 2, 50));
        assert_eq!(a.steps.len(), 50);
        a.validate().unwrap();
    }

    #[test]
    fn schedules_round_trip_and_stay_in_their_topology() {
        for seed in 0..20 {
            for members in [3, 5] {
                let s = Schedule::generate(seed, members, 2, 40);
                s.validate().unwrap();
                let text = serde_json::to_string(&s).unwrap();
                assert_eq!(serde_json::from_str::<Schedule>(&text).unwrap(), s);
                if members == 3 {
                    assert!(!s.steps.iter().any(|st| st.fault == Fault::Ring));
                }
            }
        }
    }

    #[test]
    fn membership_and_disk_faults_are_drawn_besides_the_others() {
        let mut kinds = std::collections::BTreeSet::new();
        for seed in 0..20 {
            for st in Schedule::generate(seed, 3, 2, 40).steps {
                let kind = serde_json::to_value(&st.fault).unwrap()["kind"].clone();
                kinds.insert(kind.as_str().unwrap().to_string());
            }
        }
        for kind in [
            "replace_member",
            "replace_with_paused_follower",
            "disk_crash",
            "disk_sync_error",
            "disk_full",
            "kill_leader",
        ] {
            assert!(kinds.contains(kind), "no {kind} in 20 schedules: {kinds:?}");
        }
        // The other faults of a seed are the same as before these were added.
        let steps = Schedule::generate(11, 3, 2, 35).steps;
        let first: Vec<&Fault> = steps
            .iter()
            .map(|s| &s.fault)
            .filter(|f| {
                !matches!(
                    f,
                    Fault::ReplaceMember { .. }
                        | Fault::ReplaceWithPausedFollower { .. }
                        | Fault::DiskCrash { .. }
                        | Fault::DiskSyncError { .. }
                        | Fault::DiskFull { .. }
                )
            })
            .take(2)
            .collect();
        assert_eq!(first, [&Fault::KillLeader, &Fault::PauseLeader]);
    }

    #[test]
    fn a_replay_naming_an_unknown_host_is_refused() {
        let mut s = Schedule::generate(1, 3, 1, 1);
        s.steps[0].fault = Fault::KillMember {
            member: "m9".into(),
        };
        let e = s.validate().unwrap_err();
        assert!(e.contains("\"m9\""), "{e}");
        s.steps[0].fault = Fault::Ring;
        assert!(s.validate().unwrap_err().contains("ring needs 5"));
    }
}
