//! The replica supervisor: starts, stops, resizes and replaces replica
//! processes on this node, each through its own shim (`shim`), each owned
//! by one task (`replica`).
//!
//! Rules the Agent API relies on:
//! * Idempotent by id + generation: the same id and generation again starts
//!   nothing; a lower generation is refused; a higher one replaces the run.
//!   A stopped replica is not started again with the same generation (a
//!   late retry must not resurrect it).
//! * A GPU is never over-committed on this node, whatever the callers say:
//!   a start (or a restart on other GPUs) is refused while replicas whose
//!   processes may still run (any phase but `stopped`) hold more of one of
//!   its GPUs than is left. The control plane's placement should make this
//!   impossible; this is the last line when its view lags (a stale leader's
//!   start, a replica stopping late), and the caller retries.
//! * A bad spec starts nothing: unknown GPU index, port in use, missing
//!   executable, empty command are refused before any process exists.
//! * Replicas outlive the agent: at start-up every replica directory under
//!   `<data-dir>/replicas` is re-adopted (running ones keep their pid).
//!
//! Layout: `<data-dir>/replicas/<id>/` holds `replica.json`, the shim's
//! files and `logs/`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use berth_common::{GpuDevice, ReplicaPhase, ReplicaSpec, ValidationError};
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod cgroup;
mod health;
pub mod logs;
pub mod procfs;
pub mod replica;
pub mod runtime;
pub mod shim;

use cgroup::Cgroups;
use replica::{Desired, Order, Record, ReplicaTask, Status};

/// How long a stopped replica stays listed (with its logs) before it is forgotten.
pub const STOPPED_RETENTION: Duration = Duration::from_secs(3600);

/// Why an order was refused. `api` maps each to a gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// A field breaks a rule (InvalidArgument).
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// Valid, but not possible on this node now (FailedPrecondition).
    #[error("{0}")]
    Precondition(String),
    /// No such replica (NotFound).
    #[error("{0}")]
    NotFound(String),
    /// The agent itself failed (Internal).
    #[error("{0}")]
    Internal(String),
}

/// What every replica task shares.
pub struct Context {
    /// This executable: runs the shims and the demo runtime.
    pub agent_exe: PathBuf,
    /// The node's name.
    pub node: String,
    /// The node's GPUs.
    pub devices: Vec<GpuDevice>,
    /// How limits are applied.
    pub cgroups: Cgroups,
    /// Rotate logs at this size.
    pub log_max_bytes: u64,
    /// Rotated log files kept.
    pub log_keep: u32,
    /// First restart delay.
    pub backoff_base: Duration,
    /// Longest restart delay.
    pub backoff_max: Duration,
    /// A run this long resets the back-off.
    pub stable_after: Duration,
    /// Health probe interval while running (half of it while starting).
    pub probe_interval: Duration,
    /// Signalled when a replica's phase changes, so a heartbeat tells the
    /// control plane at once.
    pub changed: Arc<tokio::sync::Notify>,
}

impl Context {
    /// The uuids of GPUs by index.
    pub fn gpu_uuids(&self, gpus: &[u32]) -> Vec<String> {
        gpus.iter()
            .filter_map(|i| self.devices.iter().find(|d| d.index == *i))
            .map(|d| d.uuid.clone())
            .collect()
    }

    /// The memory of the smallest of these GPUs.
    pub fn gpu_memory_mib(&self, gpus: &[u32]) -> u64 {
        gpus.iter()
            .filter_map(|i| self.devices.iter().find(|d| d.index == *i))
            .map(|d| d.memory_mib)
            .min()
            .unwrap_or(0)
    }
}

/// Settings of the supervisor.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The agent's data directory.
    pub data_dir: PathBuf,
    /// Stop the replicas when the agent stops (`berth dev`); otherwise they keep running.
    pub stop_on_shutdown: bool,
}

struct Handle {
    orders: mpsc::Sender<Order>,
    status: watch::Receiver<Status>,
    dir: PathBuf,
}

/// The supervisor of this node's replicas.
pub struct Supervisor {
    ctx: Arc<Context>,
    settings: Settings,
    replicas: Mutex<BTreeMap<String, Handle>>,
    /// Replicas being stopped because the control plane no longer wants them.
    stopping: Mutex<HashSet<String>>,
    /// Held from a start's GPU check until its replica holds the GPUs, so
    /// two starts cannot both take the last of a GPU.
    admission: Mutex<()>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Supervisor {
    /// Opens the supervisor and re-adopts the replicas an earlier agent left.
    pub async fn open(
        ctx: Context,
        settings: Settings,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let root = replicas_dir(&settings.data_dir);
        std::fs::create_dir_all(&root)
            .map_err(|e| anyhow::anyhow!("create {}: {e}", root.display()))?;
        let sup = Arc::new(Supervisor {
            ctx: Arc::new(ctx),
            settings,
            replicas: Mutex::default(),
            stopping: Mutex::default(),
            admission: Mutex::default(),
            tasks,
            shutdown,
        });
        let mut found = 0;
        let entries = std::fs::read_dir(&root)
            .map_err(|e| anyhow::anyhow!("read {}: {e}", root.display()))?;
        for entry in entries.flatten() {
            let dir = entry.path();
            let Some(record) = replica::load_record(&dir) else {
                tracing::warn!(dir = %dir.display(), "ignoring a replica directory without a readable record");
                continue;
            };
            let mut task = ReplicaTask::new(sup.ctx.clone(), dir.clone(), record.clone());
            task.adopt().await;
            sup.launch(&mut *sup.replicas.lock().await, record.spec.id, dir, task);
            found += 1;
        }
        if found > 0 {
            tracing::info!(
                replicas = found,
                "re-adopted the replicas of an earlier agent"
            );
        }
        let me = sup.clone();
        sup.tasks.spawn(async move { me.forget_stopped().await });
        Ok(sup)
    }

    /// Runs a replica's task and files its handle in `replicas` (the
    /// supervisor's map, which the caller holds locked).
    fn launch(
        &self,
        replicas: &mut BTreeMap<String, Handle>,
        id: String,
        dir: PathBuf,
        task: ReplicaTask,
    ) {
        let (orders, rx) = mpsc::channel(8);
        let status = task.subscribe();
        let shutdown = self.shutdown.clone();
        let stop = self.settings.stop_on_shutdown;
        self.tasks.spawn(task.run(rx, shutdown, stop));
        replicas.insert(
            id,
            Handle {
                orders,
                status,
                dir,
            },
        );
    }

    /// Signalled when a replica's phase changes.
    pub fn changed(&self) -> Arc<tokio::sync::Notify> {
        self.ctx.changed.clone()
    }

    /// Every replica's status, by id.
    pub async fn list(&self) -> Vec<Status> {
        self.replicas
            .lock()
            .await
            .values()
            .map(|h| h.status.borrow().clone())
            .collect()
    }

    /// Where a replica's log files are.
    pub async fn log_dir(&self, id: &str) -> Result<PathBuf, SupervisorError> {
        self.replicas
            .lock()
            .await
            .get(id)
            .map(|h| h.dir.join(shim::LOGS_DIR))
            .ok_or_else(|| not_found(id))
    }

    fn check_gpus(&self, spec: &ReplicaSpec) -> Result<(), SupervisorError> {
        let have = self.ctx.devices.len() as u32;
        if let Some(bad) = spec.gpus.iter().find(|g| **g >= have) {
            let rule = if have == 0 {
                format!("node {} has no GPUs", self.ctx.node)
            } else {
                format!("node {} has GPUs 0-{}", self.ctx.node, have - 1)
            };
            return Err(ValidationError::new("gpus", bad, rule).into());
        }
        Ok(())
    }

    /// Refuses `spec` while other replicas whose processes may run hold
    /// too much of one of its GPUs (see the module's rules).
    async fn check_gpus_free(&self, spec: &ReplicaSpec) -> Result<(), SupervisorError> {
        let others = self.list().await;
        match gpu_conflict(spec, &others, &self.ctx.devices) {
            Some(why) => Err(SupervisorError::Precondition(format!(
                "node {}: {why}",
                self.ctx.node
            ))),
            None => Ok(()),
        }
    }

    /// Checks that `port` is free, or picks one when it is 0. `keep` is the
    /// port of the run being replaced, which may be reused.
    async fn port_for(
        &self,
        spec: &ReplicaSpec,
        keep: Option<u16>,
    ) -> Result<u16, SupervisorError> {
        let others: Vec<(String, u16)> = self
            .list()
            .await
            .into_iter()
            .filter(|s| s.record.desired == Desired::Running && s.record.spec.id != spec.id)
            .map(|s| (s.record.spec.id, s.record.port))
            .collect();
        if spec.port == 0 {
            if let Some(p) = keep {
                return Ok(p);
            }
            for _ in 0..20 {
                let port = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
                    .and_then(|l| l.local_addr())
                    .map_err(|e| SupervisorError::Internal(format!("pick a free port: {e}")))?
                    .port();
                if !others.iter().any(|(_, p)| *p == port) {
                    return Ok(port);
                }
            }
            return Err(SupervisorError::Internal(
                "could not pick a free port".into(),
            ));
        }
        let in_use = |why: String| {
            SupervisorError::Precondition(format!(
                "port {} is in use on node {} ({why}): pick another port, or 0 to let the agent pick",
                spec.port, self.ctx.node
            ))
        };
        if let Some((other, _)) = others.iter().find(|(_, p)| *p == spec.port) {
            return Err(in_use(format!("by replica {other}")));
        }
        if keep == Some(spec.port) {
            return Ok(spec.port);
        }
        for ip in [Ipv4Addr::UNSPECIFIED, Ipv4Addr::LOCALHOST] {
            TcpListener::bind((ip, spec.port)).map_err(|e| in_use(e.to_string()))?;
        }
        Ok(spec.port)
    }

    /// Checks that the spec can be launched here (executable, command).
    fn check_launch(&self, spec: &ReplicaSpec, port: u16) -> Result<(), SupervisorError> {
        runtime::launch(
            spec,
            port,
            &self.ctx.agent_exe,
            &self.ctx.node,
            &self.ctx.gpu_uuids(&spec.gpus),
            self.ctx.gpu_memory_mib(&spec.gpus),
        )
        .map(|_| ())
        .map_err(|e| match e {
            runtime::LaunchError::BadCommand(template, why) => {
                SupervisorError::Invalid(ValidationError::new("command", template, why))
            }
            e @ runtime::LaunchError::Missing { .. } => {
                SupervisorError::Precondition(e.to_string())
            }
        })
    }

    /// Starts a replica (see the module's rules), and answers once its
    /// process was spawned (or failed to). The work runs in a task of its
    /// own: a caller that gives up (an RPC deadline) cannot leave a process
    /// started but unrecorded.
    pub async fn start(
        self: &Arc<Self>,
        spec: ReplicaSpec,
        placed_at: u64,
    ) -> Result<Status, SupervisorError> {
        let me = self.clone();
        self.tasks
            .spawn(async move { me.start_now(spec, placed_at).await })
            .await
            .map_err(|e| SupervisorError::Internal(format!("start the replica: {e}")))?
    }

    async fn start_now(
        &self,
        spec: ReplicaSpec,
        placed_at: u64,
    ) -> Result<Status, SupervisorError> {
        spec.validate()?;
        self.check_gpus(&spec)?;
        let _admission = self.admission.lock().await;
        let existing = {
            let replicas = self.replicas.lock().await;
            replicas
                .get(&spec.id)
                .map(|h| (h.orders.clone(), h.status.borrow().clone()))
        };
        if let Some((orders, current)) = existing {
            let have = &current.record;
            if spec.generation < have.spec.generation {
                return Err(SupervisorError::Precondition(format!(
                    "generation {} of replica {} is stale: it runs generation {}",
                    spec.generation, spec.id, have.spec.generation
                )));
            }
            if spec.generation == have.spec.generation {
                // Port 0 asked the agent to pick: the picked port is the same spec.
                let asked = ReplicaSpec {
                    port: if spec.port == 0 {
                        have.spec.port
                    } else {
                        spec.port
                    },
                    ..spec.clone()
                };
                if asked != have.spec {
                    return Err(SupervisorError::Precondition(format!(
                        "replica {} generation {} was started with a different spec: bump the generation to change it",
                        spec.id, spec.generation
                    )));
                }
                if have.desired == Desired::Stopped {
                    return Err(SupervisorError::Precondition(format!(
                        "replica {} generation {} was stopped: start it with a higher generation",
                        spec.id, spec.generation
                    )));
                }
                return Ok(current);
            }
            self.check_gpus_free(&spec).await?;
            let keep = Some(have.port);
            let port = self.port_for(&spec, keep).await?;
            self.check_launch(&spec, port)?;
            let record = Record {
                restarts: 0,
                port,
                desired: Desired::Running,
                stopped_at_ms: None,
                placed_at,
                spec,
            };
            return self
                .ask(&orders, |reply| Order::Replace {
                    record: Box::new(record),
                    revive: true,
                    reply,
                })
                .await;
        }
        self.check_gpus_free(&spec).await?;
        let port = self.port_for(&spec, None).await?;
        self.check_launch(&spec, port)?;
        let mut replicas = self.replicas.lock().await;
        if replicas.contains_key(&spec.id) {
            return Err(SupervisorError::Precondition(format!(
                "replica {} is being started by another request; retry",
                spec.id
            )));
        }
        let dir = replicas_dir(&self.settings.data_dir).join(&spec.id);
        // The run files hold the replica's environment (tokens, keys): owner only.
        std::fs::create_dir_all(&dir)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|e| SupervisorError::Internal(format!("create {}: {e}", dir.display())))?;
        let record = Record {
            spec,
            port,
            desired: Desired::Running,
            restarts: 0,
            stopped_at_ms: None,
            placed_at,
        };
        let mut task = ReplicaTask::new(self.ctx.clone(), dir.clone(), record.clone());
        task.persist().await?;
        task.start().await;
        let status = task.status();
        self.launch(&mut replicas, record.spec.id, dir, task);
        Ok(status)
    }

    async fn ask(
        &self,
        orders: &mpsc::Sender<Order>,
        order: impl FnOnce(replica::Reply) -> Order,
    ) -> Result<Status, SupervisorError> {
        let gone = || {
            SupervisorError::Internal(
                "the replica's task has ended (the agent is shutting down, or the replica was forgotten); retry".into(),
            )
        };
        let (tx, rx) = oneshot::channel();
        orders.send(order(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    fn handle(
        replicas: &BTreeMap<String, Handle>,
        id: &str,
    ) -> Result<(mpsc::Sender<Order>, Status), SupervisorError> {
        let h = replicas.get(id).ok_or_else(|| not_found(id))?;
        Ok((h.orders.clone(), h.status.borrow().clone()))
    }

    /// Stops a replica: SIGTERM, then SIGKILL after `grace`. A `generation`
    /// above 0 must not be older than the replica's.
    pub async fn stop(
        &self,
        id: &str,
        generation: u64,
        grace: Duration,
    ) -> Result<Status, SupervisorError> {
        let (orders, _) = Self::handle(&*self.replicas.lock().await, id)?;
        // The replica's task checks the generation against its own record.
        self.ask(&orders, |reply| Order::Stop {
            generation,
            grace,
            reply,
        })
        .await
    }

    /// Changes CPU and memory limits in place, or restarts on other GPUs.
    pub async fn resize(
        &self,
        id: &str,
        generation: u64,
        cpu_milli: u32,
        memory_mib: u64,
        gpus: Option<(Vec<u32>, u64, u32)>,
    ) -> Result<Status, SupervisorError> {
        let (orders, current) = Self::handle(&*self.replicas.lock().await, id)?;
        let have = &current.record;
        let mut spec = have.spec.clone();
        spec.generation = generation;
        spec.resources.cpu_milli = cpu_milli;
        spec.resources.memory_mib = memory_mib;
        let gpu_change = match gpus {
            Some((indices, memory, milli)) => {
                let changed = indices != spec.gpus
                    || memory != spec.resources.gpu_memory_mib
                    || milli != spec.resources.gpu_milli;
                spec.resources.gpus = indices.len() as u32;
                spec.gpus = indices;
                spec.resources.gpu_memory_mib = memory;
                spec.resources.gpu_milli = if milli == 0 && spec.resources.gpus > 0 {
                    berth_common::resources::WHOLE_GPU_MILLI
                } else {
                    milli
                };
                changed
            }
            None => false,
        };
        spec.validate()?;
        self.check_gpus(&spec)?;
        if !gpu_change {
            // The replica's task checks the generation against its own record.
            return self
                .ask(&orders, |reply| Order::Resize {
                    generation,
                    cpu_milli,
                    memory_mib,
                    reply,
                })
                .await;
        }
        // Other GPUs mean another process: restart it on them.
        let _admission = self.admission.lock().await;
        self.check_gpus_free(&spec).await?;
        let record = Record {
            spec,
            restarts: 0,
            ..have.clone()
        };
        self.ask(&orders, |reply| Order::Replace {
            record: Box::new(record),
            revive: false,
            reply,
        })
        .await
    }

    /// Stops the replicas that run here but are not in the control plane's
    /// desired set of state version `version` (moved away or removed while
    /// this node was cut off). A replica placed after `version` is kept: the
    /// answer may predate its placement.
    pub async fn converge(self: &Arc<Self>, desired: &HashMap<String, u64>, version: u64) {
        for s in self.list().await {
            let r = &s.record;
            if r.desired != Desired::Running
                || desired.contains_key(&r.spec.id)
                || r.placed_at > version
            {
                continue;
            }
            let id = r.spec.id.clone();
            if !self.stopping.lock().await.insert(id.clone()) {
                continue;
            }
            tracing::info!(replica = %id, "the control plane no longer wants this replica here (moved away or removed); stopping it");
            let me = self.clone();
            self.tasks.spawn(async move {
                if let Err(e) = me.stop(&id, 0, shim::DEFAULT_GRACE).await {
                    tracing::warn!(replica = %id, error = %e, "could not stop an unwanted replica");
                }
                me.stopping.lock().await.remove(&id);
            });
        }
    }

    /// Forgets replicas stopped longer than `STOPPED_RETENTION` ago.
    async fn forget_stopped(&self) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
            let now = shim::now_ms();
            let mut replicas = self.replicas.lock().await;
            let old: Vec<String> = replicas
                .iter()
                .filter(|(_, h)| {
                    let s = h.status.borrow();
                    s.phase == ReplicaPhase::Stopped
                        && s.record.stopped_at_ms.is_some_and(|t| {
                            now.saturating_sub(t) > STOPPED_RETENTION.as_millis() as u64
                        })
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in old {
                if let Some(h) = replicas.remove(&id) {
                    tracing::info!(replica = %id, "forgetting a replica stopped over an hour ago");
                    // The task ends on Forget even if a caller still holds
                    // a sender; its directory goes while the map is locked,
                    // so a new replica of that id cannot lose its own.
                    let _ = h.orders.send(Order::Forget).await;
                    let dir = h.dir.clone();
                    let removed =
                        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
                    if let Ok(Err(e)) = removed {
                        tracing::warn!(replica = %id, error = %e, "cannot remove the replica directory");
                    }
                }
            }
        }
    }
}

/// What runs this node's replicas, as the Agent API and the heartbeats see
/// it: the supervisor (real processes), or, only inside `berth bench`, the
/// hollow recorder of `crate::hollow`.
#[tonic::async_trait]
pub trait Replicas: Send + Sync + 'static {
    /// Starts a replica (idempotent by id + generation).
    async fn start(&self, spec: ReplicaSpec, placed_at: u64) -> Result<Status, SupervisorError>;
    /// Stops a replica; a `generation` above 0 must not be older than its own.
    async fn stop(
        &self,
        id: &str,
        generation: u64,
        grace: Duration,
    ) -> Result<Status, SupervisorError>;
    /// Changes CPU and memory in place, or moves the replica to other GPUs.
    async fn resize(
        &self,
        id: &str,
        generation: u64,
        cpu_milli: u32,
        memory_mib: u64,
        gpus: Option<(Vec<u32>, u64, u32)>,
    ) -> Result<Status, SupervisorError>;
    /// Every replica's status, by id.
    async fn list(&self) -> Vec<Status>;
    /// Where a replica's log files are.
    async fn log_dir(&self, id: &str) -> Result<PathBuf, SupervisorError>;
    /// Stops what the control plane's desired set of `version` no longer holds.
    async fn converge(&self, desired: &HashMap<String, u64>, version: u64);
    /// Signalled when a replica's phase changes.
    fn changed(&self) -> Arc<tokio::sync::Notify>;

    /// What each replica with GPUs holds, for the VRAM ledger: a replica
    /// being stopped still holds its memory until its processes are gone.
    async fn claims(&self) -> Vec<crate::inventory::ledger::Claim> {
        self.list()
            .await
            .into_iter()
            .filter(|s| !s.record.spec.gpus.is_empty())
            .map(|s| {
                let spec = s.record.spec;
                crate::inventory::ledger::Claim {
                    simulated_use_mib: crate::inventory::ledger::simulated_use(&spec.id, &spec.env),
                    replica: spec.id,
                    server: s.server,
                    gpus: spec.gpus,
                    reserved_mib: spec.resources.gpu_memory_mib,
                }
            })
            .collect()
    }
}

#[tonic::async_trait]
impl Replicas for Arc<Supervisor> {
    async fn start(&self, spec: ReplicaSpec, placed_at: u64) -> Result<Status, SupervisorError> {
        Supervisor::start(self, spec, placed_at).await
    }
    async fn stop(
        &self,
        id: &str,
        generation: u64,
        grace: Duration,
    ) -> Result<Status, SupervisorError> {
        Supervisor::stop(self, id, generation, grace).await
    }
    async fn resize(
        &self,
        id: &str,
        generation: u64,
        cpu_milli: u32,
        memory_mib: u64,
        gpus: Option<(Vec<u32>, u64, u32)>,
    ) -> Result<Status, SupervisorError> {
        Supervisor::resize(self, id, generation, cpu_milli, memory_mib, gpus).await
    }
    async fn list(&self) -> Vec<Status> {
        Supervisor::list(self).await
    }
    async fn log_dir(&self, id: &str) -> Result<PathBuf, SupervisorError> {
        Supervisor::log_dir(self, id).await
    }
    async fn converge(&self, desired: &HashMap<String, u64>, version: u64) {
        Supervisor::converge(self, desired, version).await;
    }
    fn changed(&self) -> Arc<tokio::sync::Notify> {
        Supervisor::changed(self)
    }
}

fn not_found(id: &str) -> SupervisorError {
    SupervisorError::NotFound(format!(
        "replica {id:?} is not on this node; list them with ListReplicas"
    ))
}

/// The data directory's replica folder (for tests and tools).
pub fn replicas_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("replicas")
}

/// Why `spec` cannot have its GPUs now: another replica in `others` whose
/// process may run (any phase but `stopped`) holds a share of one of them
/// that, with the spec's, is over the GPU's compute (1000 milli) or its
/// memory. None when every GPU has room.
fn gpu_conflict(spec: &ReplicaSpec, others: &[Status], devices: &[GpuDevice]) -> Option<String> {
    let share = |s: &ReplicaSpec| {
        let milli = match s.resources.gpu_milli {
            0 => berth_common::resources::WHOLE_GPU_MILLI,
            m => m,
        };
        (milli, s.resources.gpu_memory_mib)
    };
    let (milli, memory) = share(spec);
    for gpu in &spec.gpus {
        let holders: Vec<&Status> = others
            .iter()
            .filter(|o| o.record.spec.id != spec.id && o.phase != ReplicaPhase::Stopped)
            .filter(|o| o.record.spec.gpus.contains(gpu))
            .collect();
        let (used_milli, used_memory) = holders.iter().fold((0u32, 0u64), |(m, mem), o| {
            let (om, omem) = share(&o.record.spec);
            (m.saturating_add(om), mem.saturating_add(omem))
        });
        let total_memory = devices
            .iter()
            .find(|d| d.index == *gpu)
            .map_or(u64::MAX, |d| d.memory_mib);
        let over_compute =
            used_milli.saturating_add(milli) > berth_common::resources::WHOLE_GPU_MILLI;
        let over_memory = memory > 0 && used_memory.saturating_add(memory) > total_memory;
        if over_compute || over_memory {
            let held: Vec<String> = holders
                .iter()
                .map(|o| format!("{} ({})", o.record.spec.id, o.phase.as_str()))
                .collect();
            return Some(format!(
                "gpu {gpu} is still held by replica {}: replica {} cannot have it until that one stopped; retry",
                held.join(", "),
                spec.id
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use berth_common::Resources;

    use super::*;

    fn spec(id: &str, gpus: &[u32], milli: u32, memory_mib: u64) -> ReplicaSpec {
        ReplicaSpec {
            id: id.into(),
            generation: 1,
            model: "m".into(),
            runtime: berth_common::Runtime::Demo,
            source: "builtin:demo".into(),
            port: 0,
            gpus: gpus.to_vec(),
            resources: Resources {
                gpus: gpus.len() as u32,
                gpu_milli: milli,
                gpu_memory_mib: memory_mib,
                ..Resources::default()
            },
            env: Default::default(),
            health: berth_common::HealthProbe::Tcp,
        }
    }

    fn status(spec: ReplicaSpec, phase: ReplicaPhase) -> Status {
        Status {
            record: Record {
                spec,
                port: 1,
                desired: Desired::Running,
                restarts: 0,
                stopped_at_ms: None,
                placed_at: 0,
            },
            phase,
            reason: String::new(),
            server: None,
            last_exit: None,
            started_at_ms: 0,
            limits_enforced: false,
            gpu_uuids: Vec::new(),
            engine: None,
            ready_after_ms: None,
        }
    }

    fn devices() -> Vec<GpuDevice> {
        (0..2)
            .map(|index| GpuDevice {
                index,
                uuid: format!("GPU-{index}"),
                model: "sim".into(),
                memory_mib: 1000,
                pci_bus_id: String::new(),
                locality: None,
                mig_enabled: false,
            })
            .collect()
    }

    #[test]
    fn a_gpu_held_by_a_live_replica_is_refused_until_that_one_stopped() {
        let new = spec("b", &[0], 1000, 0);
        for phase in [
            ReplicaPhase::Pending,
            ReplicaPhase::Starting,
            ReplicaPhase::Running,
            ReplicaPhase::Failed,
        ] {
            let others = [status(spec("a", &[0], 1000, 0), phase)];
            let why = gpu_conflict(&new, &others, &devices()).expect("refused");
            assert!(why.contains("gpu 0") && why.contains("a ("), "{why}");
        }
        let stopped = [status(spec("a", &[0], 1000, 0), ReplicaPhase::Stopped)];
        assert_eq!(gpu_conflict(&new, &stopped, &devices()), None);
        let elsewhere = [status(spec("a", &[1], 1000, 0), ReplicaPhase::Running)];
        assert_eq!(gpu_conflict(&new, &elsewhere, &devices()), None);
        // A replica restarting on other GPUs does not conflict with itself.
        let itself = [status(spec("b", &[0], 1000, 0), ReplicaPhase::Running)];
        assert_eq!(gpu_conflict(&new, &itself, &devices()), None);
    }

    #[test]
    fn shares_of_a_gpu_fit_while_their_compute_and_memory_sums_do() {
        let others = [status(spec("a", &[0], 500, 600), ReplicaPhase::Running)];
        assert_eq!(
            gpu_conflict(&spec("b", &[0], 500, 400), &others, &devices()),
            None
        );
        assert!(gpu_conflict(&spec("b", &[0], 600, 100), &others, &devices()).is_some());
        assert!(gpu_conflict(&spec("b", &[0], 300, 500), &others, &devices()).is_some());
        // A multi-GPU replica needs every one of its GPUs.
        assert!(gpu_conflict(&spec("b", &[1, 0], 1000, 0), &others, &devices()).is_some());
    }
}
