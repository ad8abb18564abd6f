//! One replica's life, as a task that owns it: start its shim, probe its
//! health, restart it with exponential back-off when it exits, stop it,
//! resize it, replace it with a newer generation. The task publishes a
//! `Status` on a watch channel and takes orders from a mailbox, so orders
//! for one replica never interleave.
//!
//! What must survive the agent is on disk in the replica's directory:
//! `replica.json` (the spec, whether it should run, its restart count) and
//! the shim's files (see `shim`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use berth_common::{ReplicaPhase, ReplicaSpec};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::shim::{
    self, EXIT_FILE, ExitFile, RUN_FILE, RunFile, SHIM_FILE, STOP_FILE, ShimFile, StopFile, now_ms,
    read_json, write_json, write_run_json,
};
use super::{Context, runtime};

/// The file holding a replica's `Record`.
pub const RECORD_FILE: &str = "replica.json";
/// Consecutive failed probes of a running replica before it is `failed`.
const UNHEALTHY_AFTER: u32 = 3;

/// Whether the replica should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    /// Keep it running (restart it when it exits).
    Running,
    /// Stopped on request.
    Stopped,
}

impl Desired {
    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Desired::Running => "running",
            Desired::Stopped => "stopped",
        }
    }
}

/// What the agent keeps on disk about a replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// What to run.
    pub spec: ReplicaSpec,
    /// The port it listens on (the spec's, or the one the agent picked).
    pub port: u16,
    /// Whether it should run.
    pub desired: Desired,
    /// How many times it was restarted after exiting.
    pub restarts: u32,
    /// When it was stopped, for forgetting it later.
    pub stopped_at_ms: Option<u64>,
}

/// A replica as the agent reports it.
#[derive(Debug, Clone)]
pub struct Status {
    /// The record.
    pub record: Record,
    /// Where it is in its life.
    pub phase: ReplicaPhase,
    /// Why, for people.
    pub reason: String,
    /// The model server's pid, while one runs.
    pub pid: Option<u32>,
    /// How the last run ended.
    pub last_exit: Option<ExitFile>,
    /// When the current run started.
    pub started_at_ms: u64,
    /// Whether the CPU and memory limits are enforced.
    pub limits_enforced: bool,
    /// The uuids of its GPUs.
    pub gpu_uuids: Vec<String>,
}

/// Orders for a replica's task.
pub enum Order {
    /// Stop it (SIGTERM, SIGKILL after `grace`).
    Stop {
        /// Time between SIGTERM and SIGKILL.
        grace: Duration,
        /// The status afterwards.
        reply: oneshot::Sender<Status>,
    },
    /// Change CPU and memory limits in place; the record carries the new generation.
    Resize {
        /// The new record.
        record: Box<Record>,
        /// The status afterwards.
        reply: oneshot::Sender<Status>,
    },
    /// Stop the current run and start this one.
    Replace {
        /// The new record.
        record: Box<Record>,
        /// The status once the new run started.
        reply: oneshot::Sender<Status>,
    },
}

/// A run in progress.
struct Run {
    ids: ShimFile,
    /// The shim, while it is this agent's child (not after an agent restart).
    child: Option<tokio::process::Child>,
}

impl Run {
    /// Resolves when the shim has exited. Cancel-safe.
    async fn exited(&mut self) {
        match self.child.as_mut() {
            Some(c) => {
                let _ = c.wait().await;
            }
            None => {
                while self.ids.shim.alive() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// The task that owns one replica.
pub struct ReplicaTask {
    ctx: Arc<Context>,
    dir: PathBuf,
    record: Record,
    run: Option<Run>,
    phase: ReplicaPhase,
    reason: String,
    last_exit: Option<ExitFile>,
    limits_enforced: bool,
    backoff: Duration,
    restart_at: Option<Instant>,
    failed_probes: u32,
    status: watch::Sender<Status>,
}

impl ReplicaTask {
    /// A task for `record`, living in `dir`.
    pub fn new(ctx: Arc<Context>, dir: PathBuf, record: Record) -> Self {
        let limits_enforced = ctx.cgroups.enforced();
        let status = watch::Sender::new(Status {
            record: record.clone(),
            phase: ReplicaPhase::Pending,
            reason: String::new(),
            pid: None,
            last_exit: None,
            started_at_ms: 0,
            limits_enforced,
            gpu_uuids: ctx.gpu_uuids(&record.spec.gpus),
        });
        let backoff = ctx.backoff_base;
        ReplicaTask {
            ctx,
            dir,
            record,
            run: None,
            phase: ReplicaPhase::Pending,
            reason: String::new(),
            last_exit: None,
            limits_enforced,
            backoff,
            restart_at: None,
            failed_probes: 0,
            status,
        }
    }

    /// The status channel.
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    fn publish(&self) {
        let started_at_ms = self.run.as_ref().map_or(0, |r| r.ids.started_at_ms);
        self.status.send_replace(Status {
            record: self.record.clone(),
            phase: self.phase,
            reason: self.reason.clone(),
            pid: self.run.as_ref().map(|r| r.ids.server.pid),
            last_exit: self.last_exit.clone(),
            started_at_ms,
            limits_enforced: self.limits_enforced,
            gpu_uuids: self.ctx.gpu_uuids(&self.record.spec.gpus),
        });
    }

    fn set(&mut self, phase: ReplicaPhase, reason: impl Into<String>) {
        let reason = reason.into();
        if phase != self.phase {
            tracing::info!(replica = %self.record.spec.id, from = %self.phase, to = %phase, %reason, "replica phase");
        }
        self.phase = phase;
        self.reason = reason;
        self.publish();
    }

    /// Saves the record.
    pub fn persist(&self) -> std::io::Result<()> {
        write_json(&self.dir.join(RECORD_FILE), &self.record)
    }

    /// Picks up a run left by an earlier agent: a live shim is adopted as is;
    /// a finished one has its exit read; a shim that died without saying
    /// how leaves its server killed, so a restart never runs two.
    pub fn adopt(&mut self) {
        let ids = read_json::<ShimFile>(&self.dir.join(SHIM_FILE));
        match ids {
            Some(ids) if ids.shim.alive() => {
                tracing::info!(replica = %self.record.spec.id, pid = ids.server.pid, "re-adopted a running replica");
                self.run = Some(Run { ids, child: None });
                let reason = if self.record.desired == Desired::Running {
                    "re-adopted after an agent restart; waiting for the health probe"
                } else {
                    "re-adopted while stopping"
                };
                self.set(ReplicaPhase::Starting, reason);
            }
            Some(ids) => {
                if ids.server.alive() {
                    let _ = killpg(Pid::from_raw(ids.server.pid as i32), Signal::SIGKILL);
                }
                self.finished(read_json(&self.dir.join(EXIT_FILE)), Some(ids));
            }
            None => {
                let exit = read_json::<ExitFile>(&self.dir.join(EXIT_FILE));
                if self.record.desired == Desired::Stopped {
                    self.last_exit = exit;
                    self.set(ReplicaPhase::Stopped, "stopped on request");
                }
            }
        }
    }

    /// Starts a run: cgroup, `run.json`, the shim. On failure the replica
    /// is `failed` and a restart is scheduled.
    pub async fn start(&mut self) {
        self.restart_at = None;
        let spec = &self.record.spec;
        let launch = match runtime::launch(
            spec,
            self.record.port,
            &self.ctx.agent_exe,
            &self.ctx.node,
            &self.ctx.gpu_uuids(&spec.gpus),
            self.ctx.gpu_memory_mib(&spec.gpus),
        ) {
            Ok(l) => l,
            Err(e) => return self.failed_to_start(e.to_string()),
        };
        let cgroup = match self.ctx.cgroups.apply(
            &spec.id,
            spec.resources.cpu_milli,
            spec.resources.memory_mib,
        ) {
            Ok(dir) => dir,
            Err(e) => {
                tracing::warn!(replica = %spec.id, error = %e, "cannot set the replica's cgroup limits; running without them");
                None
            }
        };
        self.limits_enforced = cgroup.is_some();
        let run = RunFile {
            argv: launch.argv,
            env: launch.env,
            cgroup,
            log_max_bytes: self.ctx.log_max_bytes,
            log_keep: self.ctx.log_keep,
        };
        if let Err(e) = write_run_json(&self.dir.join(RUN_FILE), &run) {
            return self.failed_to_start(format!("write {RUN_FILE}: {e}"));
        }
        match shim::spawn(&self.ctx.agent_exe, &self.dir).await {
            Ok(s) => {
                self.run = Some(Run {
                    ids: s.ids,
                    child: Some(s.child),
                });
                self.failed_probes = 0;
                let probe = self.record.spec.health.to_string();
                let port = self.record.port;
                self.set(
                    ReplicaPhase::Starting,
                    format!("waiting for the health probe ({probe} on port {port})"),
                );
            }
            Err(reason) => self.failed_to_start(reason),
        }
    }

    fn failed_to_start(&mut self, reason: String) {
        tracing::warn!(replica = %self.record.spec.id, %reason, "replica did not start");
        self.schedule_restart(&format!("did not start: {reason}"), 0);
    }

    /// Marks the replica failed and schedules its next run after the back-off.
    fn schedule_restart(&mut self, what: &str, ran_ms: u64) {
        if ran_ms >= self.ctx.stable_after.as_millis() as u64 {
            self.backoff = self.ctx.backoff_base;
        }
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(self.ctx.backoff_max);
        self.record.restarts += 1;
        if let Err(e) = self.persist() {
            tracing::warn!(replica = %self.record.spec.id, error = %e, "cannot save the replica record");
        }
        self.restart_at = Some(Instant::now() + delay);
        self.set(
            ReplicaPhase::Failed,
            format!(
                "{what}; restarting in {:?} (restart {})",
                delay, self.record.restarts
            ),
        );
    }

    /// Handles the end of a run.
    fn finished(&mut self, exit: Option<ExitFile>, ids: Option<ShimFile>) {
        let ran_ms = ids.map_or(0, |i| now_ms().saturating_sub(i.started_at_ms));
        let exit = exit.unwrap_or_else(|| ExitFile {
            code: None,
            signal: None,
            stopped: false,
            reason: "its shim ended without recording how (killed?)".into(),
            at_ms: now_ms(),
        });
        let reason = exit.reason.clone();
        self.last_exit = Some(exit);
        self.run = None;
        match self.record.desired {
            Desired::Running => {
                tracing::warn!(replica = %self.record.spec.id, %reason, "replica exited");
                self.schedule_restart(&reason, ran_ms);
            }
            Desired::Stopped => {
                self.ctx.cgroups.remove(&self.record.spec.id);
                self.set(ReplicaPhase::Stopped, "stopped on request");
            }
        }
    }

    /// Ends the current run: SIGTERM through the shim, SIGKILL after `grace`.
    async fn stop_run(&mut self, grace: Duration) {
        let Some(mut run) = self.run.take() else {
            return;
        };
        let _ = write_run_json(
            &self.dir.join(STOP_FILE),
            &StopFile {
                grace_ms: grace.as_millis() as u64,
            },
        );
        if run.ids.shim.alive() {
            let _ = kill(Pid::from_raw(run.ids.shim.pid as i32), Signal::SIGTERM);
        }
        // The shim sends SIGKILL itself after the grace; this bound only
        // covers a shim that is itself stuck or gone.
        let bound = grace + Duration::from_secs(5);
        if tokio::time::timeout(bound, run.exited()).await.is_err() {
            tracing::warn!(replica = %self.record.spec.id, "the shim did not end after the grace period; killing it and the server");
            let _ = killpg(Pid::from_raw(run.ids.server.pid as i32), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(run.ids.shim.pid as i32), Signal::SIGKILL);
            run.exited().await;
        } else if run.ids.server.alive() {
            let _ = killpg(Pid::from_raw(run.ids.server.pid as i32), Signal::SIGKILL);
        }
        self.last_exit = read_json(&self.dir.join(EXIT_FILE));
    }

    async fn probe(&mut self) {
        let result = super::health::probe(&self.record.spec.health, self.record.port).await;
        match (result, self.phase) {
            (Ok(()), ReplicaPhase::Running) => self.failed_probes = 0,
            (Ok(()), _) => {
                self.failed_probes = 0;
                self.set(ReplicaPhase::Running, "");
            }
            (Err(e), ReplicaPhase::Running | ReplicaPhase::Failed) => {
                self.failed_probes += 1;
                if self.failed_probes >= UNHEALTHY_AFTER {
                    self.set(
                        ReplicaPhase::Failed,
                        format!(
                            "health probe failed {} times in a row: {e}",
                            self.failed_probes
                        ),
                    );
                }
            }
            (Err(e), _) => {
                let reason = format!("waiting for the health probe: {e}");
                if reason != self.reason {
                    self.reason = reason;
                    self.publish();
                }
            }
        }
    }

    async fn order(&mut self, order: Order) {
        match order {
            Order::Stop { grace, reply } => {
                self.record.desired = Desired::Stopped;
                self.record.stopped_at_ms = Some(now_ms());
                self.restart_at = None;
                if let Err(e) = self.persist() {
                    tracing::warn!(replica = %self.record.spec.id, error = %e, "cannot save the replica record");
                }
                self.stop_run(grace).await;
                self.ctx.cgroups.remove(&self.record.spec.id);
                self.set(ReplicaPhase::Stopped, "stopped on request");
                let _ = reply.send(self.status());
            }
            Order::Resize { record, reply } => {
                let r = &record.spec.resources;
                if let Some(dir) = self.ctx.cgroups.dir(&record.spec.id)
                    && let Err(e) =
                        self.ctx
                            .cgroups
                            .apply(&record.spec.id, r.cpu_milli, r.memory_mib)
                {
                    tracing::warn!(replica = %record.spec.id, cgroup = %dir.display(), error = %e, "cannot change the cgroup limits");
                }
                self.record = *record;
                if let Err(e) = self.persist() {
                    tracing::warn!(replica = %self.record.spec.id, error = %e, "cannot save the replica record");
                }
                self.publish();
                let _ = reply.send(self.status());
            }
            Order::Replace { record, reply } => {
                self.stop_run(shim::DEFAULT_GRACE).await;
                self.record = *record;
                self.backoff = self.ctx.backoff_base;
                if let Err(e) = self.persist() {
                    tracing::warn!(replica = %self.record.spec.id, error = %e, "cannot save the replica record");
                }
                self.start().await;
                let _ = reply.send(self.status());
            }
        }
    }

    /// Runs the replica until the agent shuts down. With `stop_on_shutdown`
    /// the process is stopped then; otherwise it is left running for the
    /// next agent to adopt.
    pub async fn run(
        mut self,
        mut orders: mpsc::Receiver<Order>,
        shutdown: CancellationToken,
        stop_on_shutdown: bool,
    ) {
        loop {
            if self.record.desired == Desired::Stopped && self.run.is_some() {
                // An earlier agent died while stopping it: finish the stop.
                self.stop_run(shim::DEFAULT_GRACE).await;
                self.ctx.cgroups.remove(&self.record.spec.id);
                self.set(ReplicaPhase::Stopped, "stopped on request");
            }
            if self.record.desired == Desired::Running
                && self.run.is_none()
                && self.restart_at.is_none()
            {
                self.start().await;
            }
            let probe_every = if self.phase == ReplicaPhase::Running {
                self.ctx.probe_interval
            } else {
                self.ctx.probe_interval / 2
            };
            let has_run = self.run.is_some();
            let restart_at = self.restart_at;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    if stop_on_shutdown && self.run.is_some() {
                        self.stop_run(shim::DEFAULT_GRACE).await;
                        self.ctx.cgroups.remove(&self.record.spec.id);
                    }
                    return;
                }
                order = orders.recv() => match order {
                    Some(o) => self.order(o).await,
                    None => return,
                },
                _ = wait_exit(self.run.as_mut()), if has_run => {
                    let ids = self.run.as_ref().map(|r| r.ids);
                    let exit = read_json(&self.dir.join(EXIT_FILE));
                    if let Some(ids) = ids && exit.is_none() && ids.server.alive() {
                        // The shim died but left the server: do not run two.
                        let _ = killpg(Pid::from_raw(ids.server.pid as i32), Signal::SIGKILL);
                    }
                    self.finished(exit, ids);
                }
                _ = sleep_until(restart_at), if restart_at.is_some() => {
                    self.restart_at = None;
                }
                _ = tokio::time::sleep(probe_every), if has_run => self.probe().await,
            }
        }
    }
}

async fn wait_exit(run: Option<&mut Run>) {
    match run {
        Some(r) => r.exited().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Reads a replica's record from its directory.
pub fn load_record(dir: &Path) -> Option<Record> {
    read_json(&dir.join(RECORD_FILE))
}
