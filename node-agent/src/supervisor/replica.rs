//! One replica's life, as a task that owns it: start its shim, probe its
//! health, restart it with exponential back-off when it exits, stop it,
//! resize it, replace it with a newer generation. The task publishes a
//! `Status` on a watch channel and takes orders from a mailbox, so orders
//! for one replica never interleave, and it checks every order's generation
//! against its own record (the caller's view may be stale by then).
//!
//! What must survive the agent is on disk in the replica's directory:
//! `replica.json` (the spec, whether it should run, its restart count) and
//! the shim's files (see `shim`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use berth_common::{ReplicaPhase, ReplicaSpec};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::procfs::kill_group;
use super::shim::{
    self, EXIT_FILE, ExitFile, RUN_FILE, RunFile, SHIM_FILE, STOP_FILE, ShimFile, StopFile, now_ms,
    read_json, write_json, write_run_json,
};
use super::{Context, SupervisorError, runtime};

/// The file holding a replica's `Record`.
pub const RECORD_FILE: &str = "replica.json";
/// Consecutive failed probes of a running replica before it is `failed`.
const UNHEALTHY_AFTER: u32 = 3;
/// How long adoption waits for a starting shim to say who runs.
const ADOPT_WAIT: Duration = Duration::from_secs(2);
/// Probes of a new run at `EARLY_PROBE` intervals, before the usual pace.
const EARLY_PROBES: u32 = 10;
const EARLY_PROBE: Duration = Duration::from_millis(100);

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
    /// What to run. After a stop with a higher generation, that generation
    /// (a tombstone: no older start may bring the replica back).
    pub spec: ReplicaSpec,
    /// The port it listens on (the spec's, or the one the agent picked).
    pub port: u16,
    /// Whether it should run.
    pub desired: Desired,
    /// How many times it was restarted after exiting.
    pub restarts: u32,
    /// When it was stopped, for forgetting it later.
    pub stopped_at_ms: Option<u64>,
    /// The control plane's state version when it was placed here (0: by hand).
    #[serde(default)]
    pub placed_at: u64,
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
    /// The model server (pid and start time; its pid is also its process
    /// group), while one runs.
    pub server: Option<super::procfs::ProcId>,
    /// How the last run ended.
    pub last_exit: Option<ExitFile>,
    /// When the current run started.
    pub started_at_ms: u64,
    /// Whether the CPU and memory limits are enforced.
    pub limits_enforced: bool,
    /// The uuids of its GPUs.
    pub gpu_uuids: Vec<String>,
    /// The engine's load from its metrics, while it runs and reports one.
    pub engine: Option<super::health::EngineLoad>,
    /// How long the current run took from spawn to its first passed probe
    /// (its load time), once it passed one.
    pub ready_after_ms: Option<u64>,
}

/// The answer to an order.
pub type Reply = oneshot::Sender<Result<Status, SupervisorError>>;

/// Orders for a replica's task.
pub enum Order {
    /// Stop it (SIGTERM, SIGKILL after `grace`). `generation` 0 means any;
    /// an older one is refused, a newer one is remembered.
    Stop {
        /// The generation the caller means.
        generation: u64,
        /// Time between SIGTERM and SIGKILL.
        grace: Duration,
        /// The answer.
        reply: Reply,
    },
    /// Change CPU and memory limits in place, as generation `generation`.
    Resize {
        /// The new generation, above the current one.
        generation: u64,
        /// New CPU, millicores.
        cpu_milli: u32,
        /// New memory, MiB.
        memory_mib: u64,
        /// The answer.
        reply: Reply,
    },
    /// Stop the current run and start `record`, whose generation must be
    /// above the current one (the same generation and spec is a no-op).
    Replace {
        /// The new record.
        record: Box<Record>,
        /// Whether a stopped replica may be started again this way (a start
        /// may; a GPU resize may not).
        revive: bool,
        /// The answer, once the new run started.
        reply: Reply,
    },
    /// The replica was forgotten: end the task.
    Forget,
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
    /// The generation of the run in progress, when it is not the record's
    /// (found at adoption): it is replaced before anything else.
    stale_run: bool,
    phase: ReplicaPhase,
    reason: String,
    last_exit: Option<ExitFile>,
    limits_enforced: bool,
    backoff: Duration,
    restart_at: Option<Instant>,
    failed_probes: u32,
    /// Quick probes made since the current run started.
    early_probes: u32,
    /// The engine's load at the last probe.
    engine: Option<super::health::EngineLoad>,
    /// The current run's time from spawn to ready, and the run it is of
    /// (its start time).
    ready_after: Option<(u64, u64)>,
    status: watch::Sender<Status>,
}

fn stale(id: &str, asked: u64, have: u64) -> SupervisorError {
    SupervisorError::Precondition(format!(
        "generation {asked} of replica {id} is stale: it is at generation {have}"
    ))
}

impl ReplicaTask {
    /// A task for `record`, living in `dir`.
    pub fn new(ctx: Arc<Context>, dir: PathBuf, record: Record) -> Self {
        let limits_enforced = ctx.cgroups.enforced();
        let status = watch::Sender::new(Status {
            record: record.clone(),
            phase: ReplicaPhase::Pending,
            reason: String::new(),
            server: None,
            last_exit: None,
            started_at_ms: 0,
            limits_enforced,
            gpu_uuids: ctx.gpu_uuids(&record.spec.gpus),
            engine: None,
            ready_after_ms: None,
        });
        let backoff = ctx.backoff_base;
        ReplicaTask {
            ctx,
            dir,
            record,
            run: None,
            stale_run: false,
            phase: ReplicaPhase::Pending,
            reason: String::new(),
            last_exit: None,
            limits_enforced,
            backoff,
            restart_at: None,
            failed_probes: 0,
            early_probes: 0,
            engine: None,
            ready_after: None,
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

    fn id(&self) -> &str {
        &self.record.spec.id
    }

    fn publish(&self) {
        let started_at_ms = self.run.as_ref().map_or(0, |r| r.ids.started_at_ms);
        self.status.send_replace(Status {
            record: self.record.clone(),
            phase: self.phase,
            reason: self.reason.clone(),
            server: self.run.as_ref().map(|r| r.ids.server),
            last_exit: self.last_exit.clone(),
            started_at_ms,
            limits_enforced: self.limits_enforced,
            gpu_uuids: self.ctx.gpu_uuids(&self.record.spec.gpus),
            engine: self.engine.filter(|_| self.phase == ReplicaPhase::Running),
            ready_after_ms: self
                .ready_after
                .filter(|(run, _)| *run == started_at_ms && started_at_ms > 0)
                .map(|(_, ms)| ms),
        });
    }

    fn set(&mut self, phase: ReplicaPhase, reason: impl Into<String>) {
        let reason = reason.into();
        if phase != self.phase {
            tracing::info!(replica = %self.id(), from = %self.phase, to = %phase, %reason, "replica phase");
            self.ctx.changed.notify_one();
        }
        self.phase = phase;
        self.reason = reason;
        self.publish();
    }

    /// Saves the record durably, off the agent's one thread.
    pub async fn persist(&self) -> Result<(), SupervisorError> {
        let path = self.dir.join(RECORD_FILE);
        let record = self.record.clone();
        let written = tokio::task::spawn_blocking(move || write_json(&path, &record)).await;
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SupervisorError::Internal(format!(
                "save the record of replica {}: {e}",
                self.id()
            ))),
            Err(e) => Err(SupervisorError::Internal(format!(
                "save the record of replica {}: {e}",
                self.id()
            ))),
        }
    }

    async fn persist_or_warn(&self) {
        if let Err(e) = self.persist().await {
            tracing::warn!(replica = %self.id(), error = %e, "cannot save the replica record");
        }
    }

    /// Picks up a run left by an earlier agent: a live shim is adopted as is
    /// (or replaced, if it runs an older generation than the record); a
    /// finished one has its exit read; a shim that died without saying how
    /// has its server's group killed, so a restart never runs two.
    pub async fn adopt(&mut self) {
        let mut ids = read_json::<ShimFile>(&self.dir.join(SHIM_FILE));
        if ids.is_none() && shim::try_lock(&self.dir).is_none() {
            // A shim is starting: it writes shim.json in a moment.
            let deadline = Instant::now() + ADOPT_WAIT;
            while ids.is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
                ids = read_json::<ShimFile>(&self.dir.join(SHIM_FILE));
            }
        }
        match ids {
            Some(ids) if ids.shim.alive() => {
                let run_generation =
                    read_json::<RunFile>(&self.dir.join(RUN_FILE)).map(|r| r.generation);
                self.run = Some(Run { ids, child: None });
                if run_generation != Some(self.record.spec.generation) {
                    tracing::info!(replica = %self.id(), "a run of an older generation survived the agent; replacing it");
                    self.stale_run = true;
                    return;
                }
                tracing::info!(replica = %self.id(), pid = ids.server.pid, "re-adopted a running replica");
                let reason = if self.record.desired == Desired::Running {
                    "re-adopted after an agent restart; waiting for the health probe"
                } else {
                    "re-adopted while stopping"
                };
                self.set(ReplicaPhase::Starting, reason);
            }
            Some(ids) => {
                kill_group(ids.server);
                self.finished(read_json(&self.dir.join(EXIT_FILE)), Some(ids))
                    .await;
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
        let began = std::time::Instant::now();
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
            Err(e) => return self.failed_to_start(e.to_string()).await,
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
            generation: spec.generation,
            argv: launch.argv,
            env: launch.env,
            cgroup,
            log_max_bytes: self.ctx.log_max_bytes,
            log_keep: self.ctx.log_keep,
        };
        if let Err(e) = write_run_json(&self.dir.join(RUN_FILE), &run) {
            return self.failed_to_start(format!("write {RUN_FILE}: {e}")).await;
        }
        match shim::spawn(&self.ctx.agent_exe, &self.dir).await {
            Ok(s) => {
                crate::metrics::replica_spawned(began.elapsed());
                self.run = Some(Run {
                    ids: s.ids,
                    child: Some(s.child),
                });
                self.failed_probes = 0;
                self.early_probes = 0;
                let probe = self.record.spec.health.to_string();
                let port = self.record.port;
                self.set(
                    ReplicaPhase::Starting,
                    format!("waiting for the health probe ({probe} on port {port})"),
                );
            }
            Err(reason) => self.failed_to_start(reason).await,
        }
    }

    async fn failed_to_start(&mut self, reason: String) {
        tracing::warn!(replica = %self.id(), %reason, "replica did not start");
        self.schedule_restart(&format!("did not start: {reason}"), 0)
            .await;
    }

    /// Marks the replica failed and schedules its next run after the back-off.
    async fn schedule_restart(&mut self, what: &str, ran_ms: u64) {
        if ran_ms >= self.ctx.stable_after.as_millis() as u64 {
            self.backoff = self.ctx.backoff_base;
        }
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(self.ctx.backoff_max);
        self.record.restarts += 1;
        self.persist_or_warn().await;
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
    async fn finished(&mut self, exit: Option<ExitFile>, ids: Option<ShimFile>) {
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
                tracing::warn!(replica = %self.id(), %reason, "replica exited");
                self.schedule_restart(&reason, ran_ms).await;
            }
            Desired::Stopped => {
                self.ctx.cgroups.remove(&self.record.spec.id);
                self.set(ReplicaPhase::Stopped, "stopped on request");
            }
        }
    }

    /// Before a stop: waits, at most `bound`, until the engine has no
    /// request running or waiting (gateways stopped sending new ones), so
    /// that SIGTERM cuts nothing even on a server that aborts requests on
    /// it. Returns the time spent. A runtime without metrics, or a server
    /// that does not answer them, is not waited for.
    async fn drain(&mut self, bound: Duration) -> Duration {
        let started = Instant::now();
        if self.run.is_none() || self.phase != ReplicaPhase::Running {
            return Duration::ZERO;
        }
        let mut said = false;
        while started.elapsed() < bound {
            match self.engine_load().await {
                Some(load) if load.running + load.waiting > 0 => {
                    if !said {
                        said = true;
                        tracing::info!(replica = %self.id(), running = load.running, waiting = load.waiting, "waiting for in-flight requests before stopping");
                    }
                }
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if said {
            tracing::info!(replica = %self.id(), waited_ms = started.elapsed().as_millis() as u64, "drained; stopping");
        }
        started.elapsed()
    }

    /// Ends the current run: SIGTERM through the shim, SIGKILL after `grace`.
    async fn stop_run(&mut self, grace: Duration) {
        let Some(mut run) = self.run.take() else {
            return;
        };
        self.stale_run = false;
        let _ = write_run_json(
            &self.dir.join(STOP_FILE),
            &StopFile {
                grace_ms: grace.as_millis() as u64,
            },
        );
        run.ids.shim.signal(Signal::SIGTERM);
        // The shim sends SIGKILL itself after the grace; this bound only
        // covers a shim that is itself stuck or gone.
        let bound = grace + Duration::from_secs(5);
        if tokio::time::timeout(bound, run.exited()).await.is_err() {
            tracing::warn!(replica = %self.id(), "the shim did not end after the grace period; killing it and the server");
            kill_group(run.ids.server);
            run.ids.shim.signal(Signal::SIGKILL);
            run.exited().await;
        }
        // Whatever the shim could not clean up (it was killed) goes now.
        kill_group(run.ids.server);
        self.last_exit = read_json(&self.dir.join(EXIT_FILE));
    }

    /// The engine's load now, if its runtime reports one and it answers.
    async fn engine_load(&self) -> Option<super::health::EngineLoad> {
        let metrics = self.record.spec.runtime.engine_metrics()?;
        super::health::scrape(&metrics, self.record.port).await.ok()
    }

    async fn probe(&mut self) {
        let result = super::health::probe(&self.record.spec.health, self.record.port).await;
        match (result, self.phase) {
            (Ok(()), ReplicaPhase::Running) => {
                self.failed_probes = 0;
                // Read at each probe and sent with the next heartbeat: the
                // gateways add the queue to their own in-flight counts.
                let engine = self.engine_load().await;
                if engine != self.engine {
                    self.engine = engine;
                    self.publish();
                }
            }
            (Ok(()), _) => {
                self.failed_probes = 0;
                if let Some(run) = &self.run {
                    let started = run.ids.started_at_ms;
                    if self.ready_after.is_none_or(|(r, _)| r != started) {
                        let ready_ms = now_ms().saturating_sub(started);
                        self.ready_after = Some((started, ready_ms));
                        crate::metrics::replica_ready(Duration::from_millis(ready_ms));
                    }
                }
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

    async fn stop(&mut self, generation: u64, grace: Duration) -> Result<Status, SupervisorError> {
        let have = self.record.spec.generation;
        if generation > 0 && generation < have {
            return Err(stale(self.id(), generation, have));
        }
        if self.record.desired == Desired::Stopped && self.run.is_none() {
            if generation > have {
                self.record.spec.generation = generation;
                self.persist().await?;
                self.publish();
            }
            return Ok(self.status());
        }
        self.record.desired = Desired::Stopped;
        self.record.stopped_at_ms = Some(now_ms());
        self.record.spec.generation = have.max(generation);
        self.restart_at = None;
        self.persist().await?;
        let waited = self.drain(grace / 2).await;
        self.stop_run(grace.saturating_sub(waited)).await;
        self.ctx.cgroups.remove(&self.record.spec.id);
        self.set(ReplicaPhase::Stopped, "stopped on request");
        Ok(self.status())
    }

    async fn resize(
        &mut self,
        generation: u64,
        cpu_milli: u32,
        memory_mib: u64,
    ) -> Result<Status, SupervisorError> {
        let have = self.record.spec.generation;
        let r = self.record.spec.resources;
        if generation == have && r.cpu_milli == cpu_milli && r.memory_mib == memory_mib {
            return Ok(self.status());
        }
        if generation <= have {
            return Err(SupervisorError::Precondition(format!(
                "a resize needs a generation above the current {have} of replica {} (got {generation})",
                self.id()
            )));
        }
        if self.record.desired == Desired::Stopped {
            return Err(SupervisorError::Precondition(format!(
                "replica {} is stopped: start it again with a new generation instead",
                self.id()
            )));
        }
        self.record.spec.generation = generation;
        self.record.spec.resources.cpu_milli = cpu_milli;
        self.record.spec.resources.memory_mib = memory_mib;
        if let Some(dir) = self.ctx.cgroups.dir(self.id())
            && let Err(e) = self.ctx.cgroups.apply(self.id(), cpu_milli, memory_mib)
        {
            tracing::warn!(replica = %self.id(), cgroup = %dir.display(), error = %e, "cannot change the cgroup limits");
        }
        self.persist().await?;
        self.publish();
        Ok(self.status())
    }

    async fn replace(&mut self, record: Record, revive: bool) -> Result<Status, SupervisorError> {
        let have = &self.record;
        if record.spec.generation < have.spec.generation
            || (record.spec.generation == have.spec.generation && record.spec != have.spec)
        {
            return Err(stale(
                self.id(),
                record.spec.generation,
                have.spec.generation,
            ));
        }
        if record.spec.generation == have.spec.generation {
            return Ok(self.status());
        }
        if have.desired == Desired::Stopped && !revive {
            return Err(SupervisorError::Precondition(format!(
                "replica {} is stopped: start it again with a new generation instead",
                self.id()
            )));
        }
        // The new record first: an agent that dies during the stop finds
        // the old run's generation in run.json and replaces it.
        self.record = record;
        self.backoff = self.ctx.backoff_base;
        self.persist().await?;
        self.stop_run(shim::DEFAULT_GRACE).await;
        self.start().await;
        Ok(self.status())
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
            if self.stale_run || (self.record.desired == Desired::Stopped && self.run.is_some()) {
                // A run of another generation, or a stop an earlier agent
                // did not finish.
                self.stop_run(shim::DEFAULT_GRACE).await;
                if self.record.desired == Desired::Stopped {
                    self.ctx.cgroups.remove(&self.record.spec.id);
                    self.set(ReplicaPhase::Stopped, "stopped on request");
                }
            }
            if self.record.desired == Desired::Running
                && self.run.is_none()
                && self.restart_at.is_none()
            {
                self.start().await;
            }
            // A new run is probed quickly at first: most servers that start
            // fast are seen running within a tenth of a second.
            let probe_every = if self.phase == ReplicaPhase::Running {
                self.ctx.probe_interval
            } else if self.early_probes < EARLY_PROBES {
                self.early_probes += 1;
                EARLY_PROBE.min(self.ctx.probe_interval / 2)
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
                    Some(Order::Stop { generation, grace, reply }) => {
                        let _ = reply.send(self.stop(generation, grace).await);
                    }
                    Some(Order::Resize { generation, cpu_milli, memory_mib, reply }) => {
                        let _ = reply.send(self.resize(generation, cpu_milli, memory_mib).await);
                    }
                    Some(Order::Replace { record, revive, reply }) => {
                        let _ = reply.send(self.replace(*record, revive).await);
                    }
                    Some(Order::Forget) | None => return,
                },
                _ = wait_exit(self.run.as_mut()), if has_run => {
                    let ids = self.run.as_ref().map(|r| r.ids);
                    let exit = read_json(&self.dir.join(EXIT_FILE));
                    if let Some(ids) = ids {
                        // Whatever the shim could not clean up (it was killed).
                        kill_group(ids.server);
                    }
                    self.finished(exit, ids).await;
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
