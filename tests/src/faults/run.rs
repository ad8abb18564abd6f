//! One fault run, end to end: the hosts, a secure cluster across them,
//! agents with simulated GPUs running demo replicas that keep a GPU ledger,
//! the clients, the schedule's faults, healing, and the checks. Everything
//! the run made lives in its folder (history, schedule, logs, data dirs,
//! report), which is kept when a check fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use berth_cli::local::{AgentOptions, LocalAgent, LocalCluster, MemberOptions, Placement};
use berth_proto::v1 as pb;
use nix::sys::signal::Signal;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::check::{self, GpuHold, KeyState, MemberDigest, Verdict};
use super::history::{self, Op, Outcome, Value};
use super::membership::{self, Hosts};
use super::net::{Host, Topology};
use super::schedule::{Fault, Schedule, Step, agent_names, member_names};
use super::streams::{self, StreamFigures, Streams};
use super::workload::{self, Client, FINAL_READER, JANITOR, Recorder};

/// How a run is set up besides its schedule.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The run's folder (created; must not exist yet).
    pub dir: PathBuf,
    /// Clients per member.
    pub clients_per_member: usize,
    /// Steps the linearizability search may take per key.
    pub check_budget: u64,
    /// The members' `--snapshot-every`.
    pub snapshot_every: u64,
}

/// What a run measured and what its checks found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The schedule's seed.
    pub seed: u64,
    /// Members and agents.
    pub members: usize,
    /// Agents.
    pub agents: usize,
    /// Faults injected (steps run).
    pub faults: usize,
    /// Operations in the history (the final reads included).
    pub operations: usize,
    /// Writes acknowledged (Ok, Done).
    pub acknowledged_writes: usize,
    /// Operations whose outcome is unknown.
    pub unknown: usize,
    /// Acknowledged writes missing after healing.
    pub lost_writes: Vec<String>,
    /// Keys checked for linearizability, and how many were not linearizable
    /// or could not be decided within the budget.
    pub keys_checked: usize,
    /// Keys with a violation, with its explanation.
    pub violations: Vec<String>,
    /// Keys the search gave up on.
    pub undecided: Vec<String>,
    /// How long the linearizability check took, in milliseconds.
    pub check_ms: u64,
    /// Members' digests at equal applied indexes disagreed (or none was read).
    pub divergence: Option<String>,
    /// GPUs held by two replicas at once.
    pub double_bookings: Vec<String>,
    /// Replica processes started again without a fault that explains it.
    pub restarts: Vec<String>,
    /// Time from healing to a leader, in milliseconds (None: no leader).
    pub leader_after_heal_ms: Option<u64>,
    /// Time from healing to the first acknowledged write, or why none came.
    pub write_after_heal: Result<u64, String>,
    /// Log streams relayed by members from agents, held open through the faults.
    pub log_streams: StreamFigures,
    /// Time from healing to a log chunk through a member, or why none came.
    pub log_after_heal: Result<u64, String>,
    /// Panics and openraft fatal errors in the logs.
    pub fatal: Vec<String>,
    /// Members that kept running on a disk that failed every sync or
    /// write (they must stop instead).
    pub ignored_disk_faults: Vec<String>,
    /// The longest time without an acknowledged write while each kind of
    /// fault held, in milliseconds.
    pub unavailability_ms: BTreeMap<String, u64>,
    /// What the run left on the machine after its teardown.
    pub leftovers: Vec<String>,
    /// The run's folder.
    pub dir: PathBuf,
}

impl Report {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.lost_writes.is_empty()
            && self.violations.is_empty()
            && self.divergence.is_none()
            && self.double_bookings.is_empty()
            && self.restarts.is_empty()
            && self.leader_after_heal_ms.is_some_and(|ms| ms <= 10_000)
            && self.write_after_heal.is_ok()
            && self.log_after_heal.is_ok()
            && self.fatal.is_empty()
            && self.ignored_disk_faults.is_empty()
            && self.leftovers.is_empty()
    }

    /// The failed checks, one line each.
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        for l in &self.lost_writes {
            f.push(format!("lost write: {l}"));
        }
        for v in &self.violations {
            f.push(format!("not linearizable: {v}"));
        }
        if let Some(d) = &self.divergence {
            f.push(format!("members diverged: {d}"));
        }
        for d in &self.double_bookings {
            f.push(format!("double-booked GPU: {d}"));
        }
        for r in &self.restarts {
            f.push(format!("unexplained restart: {r}"));
        }
        match self.leader_after_heal_ms {
            None => f.push("no leader after healing".into()),
            Some(ms) if ms > 10_000 => {
                f.push(format!("a leader only {ms} ms after healing (limit 10 s)"))
            }
            _ => {}
        }
        if let Err(e) = &self.write_after_heal {
            f.push(format!("no write after healing: {e}"));
        }
        if let Err(e) = &self.log_after_heal {
            f.push(format!("no log stream after healing: {e}"));
        }
        for l in &self.fatal {
            f.push(format!("fatal: {l}"));
        }
        for l in &self.ignored_disk_faults {
            f.push(format!("failing disk ignored: {l}"));
        }
        for l in &self.leftovers {
            f.push(format!("left behind: {l}"));
        }
        f
    }
}

/// Tears the topology down when the run ends, however it ends (an error,
/// a panic, or the harness being interrupted and the run future dropped).
struct TopologyGuard(Topology);

impl Drop for TopologyGuard {
    fn drop(&mut self) {
        self.0.teardown();
    }
}

/// The processes of a run, on the topology's hosts.
struct Fleet {
    cluster: LocalCluster,
    agents: Vec<LocalAgent>,
    /// Which member id runs on which member host.
    hosts: Hosts,
    /// The voters the cluster has between membership changes.
    voters: usize,
    /// The membership change in progress, if a step began one.
    change: Option<membership::Change>,
    /// The member whose disk fails now, and how.
    disk_fault: Option<(u64, &'static str)>,
    /// Logs of members whose disk failed on purpose: their fatal lines
    /// about that failure are expected.
    disk_failed_logs: std::collections::BTreeSet<PathBuf>,
    /// Members that did not stop on a failing disk.
    ignored_disk_faults: Vec<String>,
}

/// Runs `schedule`, then checks the history. Errors are harness failures
/// (a namespace that could not be made, a cluster that never started),
/// not check failures: those are in the report.
pub async fn run(schedule: &Schedule, options: &RunOptions) -> anyhow::Result<Report> {
    schedule
        .validate()
        .map_err(|e| anyhow::anyhow!("schedule: {e}"))?;
    berth_proto::tls::install_crypto_provider();
    // Absolute: the replicas, which run elsewhere, write the GPU ledger here.
    let dir = &std::path::absolute(&options.dir)
        .with_context(|| format!("resolve {}", options.dir.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::write(
        dir.join("schedule.json"),
        serde_json::to_vec_pretty(schedule)?,
    )?;
    let ledger_dir = dir.join("gpu-ledger");
    std::fs::create_dir_all(&ledger_dir)?;

    let members = member_names(schedule.members);
    let agents = agent_names(schedule.agents);
    let names: Vec<&str> = members.iter().chain(&agents).map(String::as_str).collect();
    let guard = TopologyGuard(Topology::create(&names)?);
    let topo = &guard.0;
    eprintln!(
        "faults: run {} on {}.{}.{}.0/24, {} members, {} agents, {} faults, {} s; folder {}",
        topo.run,
        topo.subnet[0],
        topo.subnet[1],
        topo.subnet[2],
        schedule.members,
        schedule.agents,
        schedule.steps.len(),
        schedule.length_ms() / 1000,
        dir.display()
    );

    let mut fleet = start_fleet(topo, schedule, options, &ledger_dir).await?;
    let recorder = Recorder::create(&dir.join("history.jsonl"))?;
    let started = Instant::now();
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut client_id = 0;
    for m in &fleet.cluster.members {
        for _ in 0..options.clients_per_member {
            let c = Client::new(
                client_id,
                m.id,
                &m.addr,
                &fleet.cluster.dialer,
                recorder.clone(),
            )?;
            tasks.spawn(workload::client_loop(
                c,
                schedule.seed,
                started,
                stop.clone(),
            ));
            client_id += 1;
        }
    }
    let first = &fleet.cluster.members[0];
    let janitor = Client::new(
        JANITOR,
        first.id,
        &first.addr,
        &fleet.cluster.dialer,
        recorder.clone(),
    )?;
    tasks.spawn(workload::janitor_loop(janitor, started, stop.clone()));
    let streams = Arc::new(Streams::default());
    for m in &fleet.cluster.members {
        let channel = fleet
            .cluster
            .dialer
            .channel(&m.addr)
            .map_err(|e| anyhow::anyhow!("channel to {}: {e}", m.addr))?;
        let r = recorder.clone();
        tasks.spawn(streams::follow_loop(
            channel,
            streams.clone(),
            move || r.now_ns(),
            stop.clone(),
        ));
    }

    // Some traffic before the first fault, so the keys have a history:
    // wait (60 s at most) until every client has completed a few operations.
    let wanted = 5 * u64::from(client_id);
    crate::wait_until(
        Duration::from_secs(60),
        "the clients' first operations",
        || async { (recorder.completed() >= wanted).then_some(()) },
    )
    .await;
    let mut windows: Vec<(String, u64, u64)> = Vec::new();
    for (i, step) in schedule.steps.iter().enumerate() {
        let from = recorder.now_ns();
        let what = inject(topo, &mut fleet, step).await?;
        eprintln!("faults: [{}/{}] {what}", i + 1, schedule.steps.len());
        recorder.fault(
            "start",
            serde_json::json!({"step": i, "fault": step.fault, "resolved": what}),
        );
        tokio::time::sleep(Duration::from_millis(step.duration_ms)).await;
        recover(topo, &mut fleet, step).await?;
        recorder.fault("end", serde_json::json!({"step": i}));
        windows.push((fault_kind(&step.fault), from, recorder.now_ns()));
        tokio::time::sleep(Duration::from_millis(step.gap_ms)).await;
    }

    // Heal everything, then measure how soon the cluster serves again.
    topo.heal()?;
    ensure_running(&mut fleet)?;
    let healed_ns = recorder.now_ns();
    recorder.fault("healed", serde_json::json!({}));
    let leader_after_heal_ms = fleet
        .cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .ok()
        .map(|_| (recorder.now_ns() - healed_ns) / 1_000_000);
    let log_after_heal = crate::wait_until_or(Duration::from_secs(30), || async {
        (streams.last_chunk_ns() > healed_ns).then_some(())
    })
    .await
    .map(|()| (recorder.now_ns() - healed_ns) / 1_000_000)
    .map_err(|()| "no log chunk reached a follower within 30 s of healing".to_string());
    // Let the clients run on after healing, to see writes succeed.
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.cancel();
    while tasks.join_next().await.is_some() {}

    let finals = final_reads(&fleet, &recorder, workload::generation(started.elapsed())).await;
    recorder.flush();
    let divergence = convergence(&fleet).await.err();
    let fatal = fatal_lines(dir, &fleet.disk_failed_logs);
    let ignored_disk_faults = std::mem::take(&mut fleet.ignored_disk_faults);
    drop(fleet);
    let run_id = guard.0.run.clone();
    drop(guard);

    let events = history::read_history(&dir.join("history.jsonl"))?;
    let ops = history::operations(&events).map_err(|e| anyhow::anyhow!("history: {e}"))?;
    let (verdicts, check_ms) = check_in_background(ops.clone(), options.check_budget).await?;
    let mut violations = Vec::new();
    let mut undecided = Vec::new();
    for v in verdicts.values() {
        match &v.result {
            Verdict::Linearizable => {}
            Verdict::Violation { explanation } => {
                violations.push(format!("{}: {explanation}", v.key))
            }
            Verdict::Unknown { reason } => undecided.push(format!("{}: {reason}", v.key)),
        }
    }
    let holds = read_ledger(&ledger_dir.join(berth_node_agent::demo_model::ledger::LEDGER_FILE))?;
    let report = Report {
        seed: schedule.seed,
        members: schedule.members,
        agents: schedule.agents,
        faults: schedule.steps.len(),
        operations: ops.len(),
        acknowledged_writes: ops
            .iter()
            .filter(|o| o.op.is_write() && matches!(o.outcome, Outcome::Ok { value: Value::Done }))
            .count(),
        unknown: ops
            .iter()
            .filter(|o| matches!(o.outcome, Outcome::Info { .. }))
            .count(),
        lost_writes: check::lost_writes(&ops, &finals),
        keys_checked: verdicts.len(),
        violations,
        undecided,
        check_ms,
        divergence,
        double_bookings: check::double_bookings(&holds),
        restarts: check::unexplained_restarts(&holds, &[]),
        leader_after_heal_ms,
        write_after_heal: check::liveness(&ops, healed_ns, 30_000_000_000).map(|ns| ns / 1_000_000),
        log_streams: streams.figures(),
        log_after_heal,
        fatal,
        ignored_disk_faults,
        unavailability_ms: unavailability(&ops, &windows),
        leftovers: super::net::leftovers_of(&run_id),
        dir: dir.clone(),
    };
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
    Ok(report)
}

/// Checks linearizability off the async threads (the search is CPU-bound
/// and must not keep the harness from answering SIGINT); with the time it took.
pub async fn check_in_background(
    ops: Vec<history::Operation>,
    budget: u64,
) -> anyhow::Result<(BTreeMap<String, check::KeyVerdict>, u64)> {
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let verdicts = check::check_linearizable(&ops, budget);
        (verdicts, started.elapsed().as_millis() as u64)
    })
    .await
    .context("the linearizability check panicked")
}

fn placement(h: &Host) -> Placement {
    Placement {
        netns: h.netns.clone(),
        ip: std::net::IpAddr::V4(h.ip),
    }
}

/// Starts the members and agents on their hosts and registers the demo model.
async fn start_fleet(
    topo: &Topology,
    schedule: &Schedule,
    run: &RunOptions,
    ledger_dir: &Path,
) -> anyhow::Result<Fleet> {
    let dir = &std::path::absolute(&run.dir)?;
    let topo_hosts = topo.hosts.clone();
    let hosts = Hosts::new(schedule.members);
    let map = hosts.host_map(move |name| topo_hosts.iter().find(|h| h.name == name).map(placement));
    // Longer timeouts than the loopback tests: netem adds up to a quarter
    // second, and two cores run the whole fleet.
    let options = MemberOptions {
        election_timeout: "1s".into(),
        heartbeat_interval: "200ms".into(),
        snapshot_every: run.snapshot_every,
        // Disk faults are injected through each member's control file.
        extra: vec!["--test-disk-faults".into()],
        hosts: Some(map),
        ..MemberOptions::default()
    };
    let cluster = LocalCluster::start_in(&dir.join("cluster"), schedule.members, options).await?;
    let mut env = std::collections::HashMap::new();
    env.insert(
        "DEMO_GPU_LEDGER".to_string(),
        ledger_dir.display().to_string(),
    );
    let spec = pb::ModelVersionSpec {
        version: "v1".into(),
        runtime: "demo".into(),
        source: "builtin:demo".into(),
        env,
        ..Default::default()
    };
    cluster
        .client()
        .admin(|mut c| {
            let req = pb::CreateModelRequest {
                name: workload::DEMO_MODEL.into(),
                version: Some(spec.clone()),
            };
            async move { c.create_model(req).await }
        })
        .await
        .map_err(|e| anyhow::anyhow!("register the demo model: {e}"))?;
    let source = pb::CreateDeploymentRequest {
        name: streams::LOG_SOURCE.into(),
        model: workload::DEMO_MODEL.into(),
        replicas: 1,
        resources: Some(pb::ResourceOverrides {
            cpu_milli: Some(100),
            memory_mib: Some(64),
            gpus: Some(0),
            gpu_memory_mib: Some(0),
            gpu_milli: Some(0),
        }),
        ..Default::default()
    };
    cluster
        .client()
        .admin(|mut c| {
            let req = source.clone();
            async move { c.create_deployment(req).await }
        })
        .await
        .map_err(|e| anyhow::anyhow!("deploy the log source: {e}"))?;
    let mut agents = Vec::new();
    std::fs::create_dir_all(dir.join("agents"))?;
    for name in agent_names(schedule.agents) {
        let host = topo.host(&name)?;
        agents.push(LocalAgent::start_in(
            &dir.join("agents"),
            AgentOptions {
                node: name.clone(),
                simulate_gpus: Some("2xA100-80GB".into()),
                control: Some(cluster.servers()),
                token: cluster.agent_token(),
                extra: Vec::new(),
                placement: Some(placement(host)),
            },
        )?);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let nodes = cluster
            .client()
            .admin(|mut c| async move { c.list_nodes(pb::ListNodesRequest { stale: false }).await })
            .await
            .map(|r| r.nodes.len())
            .unwrap_or(0);
        if nodes >= schedule.agents {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {nodes} of {} agents registered within 60 s; logs in {}",
            schedule.agents,
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(Fleet {
        cluster,
        agents,
        hosts,
        voters: schedule.members,
        change: None,
        disk_fault: None,
        disk_failed_logs: Default::default(),
        ignored_disk_faults: Vec::new(),
    })
}

/// The member that leads now (the first member when none answers in time).
async fn leader(fleet: &Fleet) -> (u64, bool) {
    match fleet.cluster.wait_for_leader(Duration::from_secs(5)).await {
        Ok(id) => (id, true),
        Err(_) => (fleet.cluster.members.first().map_or(1, |m| m.id), false),
    }
}

/// Injects `step`'s fault; says what it did, with "the leader" resolved.
async fn inject(topo: &Topology, fleet: &mut Fleet, step: &Step) -> anyhow::Result<String> {
    let member_hosts: Vec<&Host> = fleet
        .cluster
        .members
        .iter()
        .map(|m| topo.host(&fleet.hosts.host_of(m.id)?))
        .collect::<anyhow::Result<_>>()?;
    let hosts = fleet.hosts.clone();
    let name = |id: u64| hosts.host_of(id).unwrap_or_else(|_| format!("member {id}"));
    let resolved = |(id, known): (u64, bool)| {
        if known {
            name(id)
        } else {
            format!("{} (no leader answered: took the first member)", name(id))
        }
    };
    Ok(match &step.fault {
        Fault::PartitionHalves { minority } => {
            let (a, b): (Vec<&Host>, Vec<&Host>) = member_hosts
                .iter()
                .partition(|h| minority.contains(&h.name));
            topo.partition(&[a, b])?;
            format!("partition {minority:?} from the other members")
        }
        Fault::IsolateLeader => {
            let l = leader(fleet).await;
            let (a, b): (Vec<&Host>, Vec<&Host>) =
                member_hosts.iter().partition(|h| h.name == name(l.0));
            topo.partition(&[a, b])?;
            format!("isolate the leader {}", resolved(l))
        }
        Fault::LeaderInMajority { size } => {
            let l = leader(fleet).await;
            let lname = name(l.0);
            let cut: Vec<&Host> = member_hosts
                .iter()
                .copied()
                .filter(|h| h.name != lname)
                .take(*size)
                .collect();
            let rest: Vec<&Host> = member_hosts
                .iter()
                .copied()
                .filter(|h| !cut.iter().any(|c| c.name == h.name))
                .collect();
            let names: Vec<&str> = cut.iter().map(|h| h.name.as_str()).collect();
            topo.partition(&[cut.clone(), rest])?;
            format!(
                "cut {names:?} off, the leader {} in the majority",
                resolved(l)
            )
        }
        Fault::Ring => {
            let n = member_hosts.len();
            for i in 0..n {
                for j in 0..n {
                    let d = (i + n - j) % n;
                    if i != j && d != 1 && d != n - 1 {
                        topo.drop_from(member_hosts[i], member_hosts[j])?;
                    }
                }
            }
            "a ring: each member sees only its two neighbours".into()
        }
        Fault::OneWay { from, to } => {
            topo.drop_from(topo.host(to)?, topo.host(from)?)?;
            format!("{to} drops what {from} sends")
        }
        Fault::Netem {
            host,
            delay_ms,
            jitter_ms,
            loss_pct,
        } => {
            let applied = topo.netem(topo.host(host)?, *delay_ms, *jitter_ms, *loss_pct)?;
            format!("{host} receives with {applied}")
        }
        Fault::KillMember { member } => {
            fleet.cluster.kill(fleet.hosts.id_on(member)?)?;
            format!("kill -9 {member}")
        }
        Fault::KillLeader => {
            let l = leader(fleet).await;
            fleet.cluster.kill(l.0)?;
            format!("kill -9 the leader {}", resolved(l))
        }
        Fault::KillAllMembers => {
            let ids: Vec<u64> = fleet.cluster.members.iter().map(|m| m.id).collect();
            for id in ids {
                fleet.cluster.kill(id)?;
            }
            "kill -9 every member".into()
        }
        Fault::PauseLeader => {
            let l = leader(fleet).await;
            let pid = fleet
                .cluster
                .member(l.0)?
                .pid()
                .context("the leader is not running")?;
            signal(pid, Signal::SIGSTOP)?;
            format!("SIGSTOP the leader {}", resolved(l))
        }
        Fault::KillAgent { agent } => {
            agent_mut(fleet, agent)?.kill()?;
            format!("kill -9 agent {agent} (its replicas run on)")
        }
        Fault::PartitionAgent { agent } => {
            let a = topo.host(agent)?;
            topo.partition(&[vec![a], member_hosts.clone()])?;
            format!("cut agent {agent} off from every member")
        }
        Fault::ReplaceMember { member } => {
            let change = membership::begin(&fleet.cluster, &fleet.hosts, member)?;
            fleet.change = Some(change);
            format!(
                "replace the member on {member}: remove it from the voters, then a fresh one joins"
            )
        }
        Fault::DiskCrash { member } => {
            let id = fleet.hosts.id_on(member)?;
            set_disk_fault(fleet, id, DISK_LOSE_UNSYNCED)?;
            fleet.cluster.kill(id)?;
            format!(
                "{member}'s disk keeps writes in memory until synced, then kill -9 (a power loss)"
            )
        }
        Fault::DiskSyncError { member } => {
            set_disk_fault(fleet, fleet.hosts.id_on(member)?, DISK_SYNC_ERROR)?;
            format!("{member}'s disk fails every fsync (EIO)")
        }
        Fault::DiskFull { member } => {
            set_disk_fault(fleet, fleet.hosts.id_on(member)?, DISK_FULL)?;
            format!("{member}'s disk is full (ENOSPC)")
        }
        Fault::ReplaceWithPausedFollower { member } => {
            let (l, _) = leader(fleet).await;
            let follower = fleet
                .cluster
                .members
                .iter()
                .find(|m| m.id != l && name(m.id) != *member)
                .map(|m| (m.id, m.pid()));
            let paused = match follower {
                Some((id, Some(pid))) => {
                    signal(pid, Signal::SIGSTOP)?;
                    format!("SIGSTOP the follower {}", name(id))
                }
                _ => "no other follower to pause".to_string(),
            };
            let change = membership::begin(&fleet.cluster, &fleet.hosts, member)?;
            fleet.change = Some(change);
            format!("{paused}, and replace the member on {member} meanwhile")
        }
    })
}

fn agent_mut<'a>(fleet: &'a mut Fleet, name: &str) -> anyhow::Result<&'a mut LocalAgent> {
    fleet
        .agents
        .iter_mut()
        .find(|a| a.node == name)
        .with_context(|| format!("no agent {name}"))
}

fn signal(pid: u32, s: Signal) -> anyhow::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), s)
        .with_context(|| format!("send {s} to {pid}"))
}

/// Undoes every fault at once: whatever the step did, the network is
/// healed, paused members continue and dead processes start again.
async fn recover(topo: &Topology, fleet: &mut Fleet, _step: &Step) -> anyhow::Result<()> {
    topo.heal()?;
    clear_disk_fault(fleet).await?;
    ensure_running(fleet)?;
    if let Some(change) = fleet.change.take() {
        membership::finish(&mut fleet.cluster, &fleet.hosts, change, fleet.voters).await?;
    }
    Ok(())
}

/// The words of `berth-control --test-disk-faults`'s control file.
const DISK_LOSE_UNSYNCED: &str = "lose-unsynced";
const DISK_SYNC_ERROR: &str = "sync-error";
const DISK_FULL: &str = "enospc";

/// Makes member `id`'s Raft log disk fail as `word` says, once the member
/// has read its control file (it does every `RECHECK`).
fn set_disk_fault(fleet: &mut Fleet, id: u64, word: &'static str) -> anyhow::Result<()> {
    use berth_control_plane::raft::disk_faults::{CONTROL_FILE, RECHECK};
    let m = fleet.cluster.member(id)?;
    let control = m.data_dir.join(CONTROL_FILE);
    std::fs::write(&control, word).with_context(|| format!("write {}", control.display()))?;
    if word != DISK_LOSE_UNSYNCED {
        fleet.disk_failed_logs.insert(m.log_path.clone());
    }
    fleet.disk_fault = Some((id, word));
    std::thread::sleep(RECHECK * 3);
    Ok(())
}

/// How long a member whose disk fails every sync or write may take to
/// exit (Raft stops at once; the process then shuts its tasks down).
const DISK_FAULT_EXIT: Duration = Duration::from_secs(15);

/// Heals the failing disk, after noting whether its member stopped as it
/// must when every sync or write fails.
async fn clear_disk_fault(fleet: &mut Fleet) -> anyhow::Result<()> {
    use berth_control_plane::raft::disk_faults::CONTROL_FILE;
    let Some((id, word)) = fleet.disk_fault.take() else {
        return Ok(());
    };
    let host = fleet.hosts.host_of(id)?;
    let m = fleet.cluster.member(id)?;
    if word != DISK_LOSE_UNSYNCED {
        let deadline = Instant::now() + DISK_FAULT_EXIT;
        while m.is_running() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if m.is_running() {
            fleet.ignored_disk_faults.push(format!(
                "member {id} on {host} still ran {DISK_FAULT_EXIT:?} after its {word} fault ended"
            ));
        }
    }
    let control = m.data_dir.join(CONTROL_FILE);
    match std::fs::remove_file(&control) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("remove {}", control.display()))
        }
        _ => Ok(()),
    }
}

/// Continues paused members and restarts members and agents that are down.
fn ensure_running(fleet: &mut Fleet) -> anyhow::Result<()> {
    let ids: Vec<u64> = fleet.cluster.members.iter().map(|m| m.id).collect();
    for id in ids {
        let m = fleet.cluster.member(id)?;
        if let Some(pid) = m.pid() {
            let _ = signal(pid, Signal::SIGCONT);
        }
        if !m.is_running() {
            // Reap a member that died by itself before starting it again.
            fleet.cluster.kill(id)?;
            fleet.cluster.restart(id)?;
        }
    }
    for a in &mut fleet.agents {
        if !a.is_running() {
            a.kill()?;
            a.restart()?;
        }
    }
    Ok(())
}

/// Reads every key the clients used, linearizably, through the leader,
/// recording the reads in the history; returns the state they saw.
async fn final_reads(
    fleet: &Fleet,
    recorder: &Recorder,
    last_generation: u64,
) -> BTreeMap<String, Option<KeyState>> {
    let mut finals = BTreeMap::new();
    let (l, _) = leader(fleet).await;
    let Some(m) = fleet.cluster.members.iter().find(|m| m.id == l) else {
        return finals;
    };
    let Ok(mut client) = Client::new(
        FINAL_READER,
        m.id,
        &m.addr,
        &fleet.cluster.dialer,
        recorder.clone(),
    ) else {
        return finals;
    };
    for g in 0..=last_generation {
        for key in workload::keys(g) {
            let op = if key.starts_with("model/") {
                Op::ModelRead
            } else {
                Op::DeployRead
            };
            for _ in 0..10 {
                if let Outcome::Ok { value } = client.run(&key, op.clone()).await {
                    let state = match value {
                        Value::Versions { versions } => Some(KeyState::Model {
                            versions: versions.into_iter().collect(),
                        }),
                        Value::Replicas { replicas } => Some(KeyState::Deployment { replicas }),
                        _ => None,
                    };
                    finals.insert(key.clone(), state);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    finals
}

/// Reads every member's applied index and state digest until one index has
/// been read on all of them (30 s at most), then compares.
async fn convergence(fleet: &Fleet) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut readings: Vec<MemberDigest> = Vec::new();
    let n = fleet.cluster.members.len();
    loop {
        for m in &fleet.cluster.members {
            let Ok(channel) = fleet.cluster.dialer.channel(&m.addr) else {
                continue;
            };
            let mut admin = pb::admin_client::AdminClient::new(channel);
            let req = pb::ClusterStatusRequest {
                stale: true,
                digest: true,
            };
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_secs(2), admin.cluster_status(req)).await
            {
                let r = r.into_inner();
                if let Some(digest) = r.state_digest {
                    readings.push(MemberDigest {
                        member: m.id,
                        applied_index: r.applied_index,
                        digest,
                    });
                }
            }
        }
        let mut by_index: BTreeMap<u64, std::collections::BTreeSet<u64>> = BTreeMap::new();
        for r in &readings {
            by_index
                .entry(r.applied_index)
                .or_default()
                .insert(r.member);
        }
        if by_index.values().any(|s| s.len() == n) {
            return check::converged(&readings);
        }
        if Instant::now() > deadline {
            check::converged(&readings)?;
            return Err(format!(
                "no applied index was read on all {n} members within 30 s ({} readings)",
                readings.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Panics and openraft fatal errors in every member's and agent's log; in
/// `disk_failed` logs, not the ones that report the injected disk failure.
fn fatal_lines(dir: &Path, disk_failed: &std::collections::BTreeSet<PathBuf>) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["cluster", "agents"] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log")
                && let Ok(text) = std::fs::read_to_string(&p)
            {
                for l in check::fatal_lines(&text) {
                    if disk_failed.contains(&p) && check::reports_disk_failure(&l) {
                        continue;
                    }
                    out.push(format!("{}: {l}", p.display()));
                }
            }
        }
    }
    out
}

/// The demo replicas' GPU ledger (empty when no replica ever ran).
fn read_ledger(path: &Path) -> anyhow::Result<Vec<GpuHold>> {
    use berth_node_agent::demo_model::ledger::{LedgerEvent, read_ledger};
    if !path.exists() {
        return Ok(Vec::new());
    }
    Ok(read_ledger(path)?
        .into_iter()
        .map(|l| GpuHold {
            gpu: l.gpu,
            replica: l.replica,
            node: l.node,
            pid: l.pid,
            unix_ms: l.unix_ms,
            start: l.event == LedgerEvent::Start,
            locked: l.locked,
        })
        .collect())
}

/// The family a fault belongs to, for the unavailability figures.
fn fault_kind(f: &Fault) -> String {
    match f {
        Fault::PartitionHalves { .. }
        | Fault::IsolateLeader
        | Fault::LeaderInMajority { .. }
        | Fault::Ring
        | Fault::OneWay { .. } => "partition",
        Fault::Netem { .. } => "netem",
        Fault::KillMember { .. } | Fault::KillLeader | Fault::KillAllMembers => "kill",
        Fault::PauseLeader => "pause",
        Fault::KillAgent { .. } | Fault::PartitionAgent { .. } => "agent",
        Fault::ReplaceMember { .. } | Fault::ReplaceWithPausedFollower { .. } => "membership",
        Fault::DiskCrash { .. } | Fault::DiskSyncError { .. } | Fault::DiskFull { .. } => "disk",
    }
    .to_string()
}

/// Per fault family, the longest time within one of its windows without an
/// acknowledged write completing.
fn unavailability(
    ops: &[history::Operation],
    windows: &[(String, u64, u64)],
) -> BTreeMap<String, u64> {
    let mut acks: Vec<u64> = ops
        .iter()
        .filter(|o| o.op.is_write() && o.is_ok())
        .filter_map(|o| o.complete_ns)
        .collect();
    acks.sort_unstable();
    let mut out: BTreeMap<String, u64> = BTreeMap::new();
    for (kind, from, to) in windows {
        let mut last = *from;
        let mut longest = 0;
        for &t in acks.iter().filter(|&&t| t >= *from && t <= *to) {
            longest = longest.max(t - last);
            last = t;
        }
        longest = longest.max(to - last);
        let e = out.entry(kind.clone()).or_default();
        *e = (*e).max(longest / 1_000_000);
    }
    out
}
