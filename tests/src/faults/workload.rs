//! The clients of a fault run and the history they write. Each client talks
//! to its own member over its own channel (no retries, no failover: an
//! error is an answer), runs one operation at a time on a small set of keys
//! shared with the other clients, and records invoke and completion. Keys
//! rotate every `GENERATION` so that no key's history grows past what the
//! linearizability checker can search; a janitor deletes the deployments of
//! past generations (recorded like any client) so their GPUs come back.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_proto::grpc::{Channel, Dialer};
use berth_proto::v1 as pb;
use berth_proto::v1::admin_client::AdminClient;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::history::{Event, Op, Outcome, Value};

/// How long one operation may take before its outcome counts as unknown.
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a key set is used before the clients move to fresh keys.
pub const GENERATION: Duration = Duration::from_secs(20);
/// Model keys per generation.
const MODEL_KEYS: usize = 3;
/// Deployment keys per generation.
const DEPLOY_KEYS: usize = 2;
/// The model every workload deployment runs (created before the run).
pub const DEMO_MODEL: &str = "demo";
/// The client id of the final reads after healing.
pub const FINAL_READER: u32 = 1_000;
/// The client id of the janitor.
pub const JANITOR: u32 = 1_001;

/// Appends history lines to a file, stamping them with the run's clock.
#[derive(Clone)]
pub struct Recorder {
    out: Arc<Mutex<BufWriter<File>>>,
    start: Instant,
    completed: Arc<std::sync::atomic::AtomicU64>,
}

impl Recorder {
    /// A recorder writing to `path`, its clock starting now.
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let f = File::create(path)
            .map_err(|e| anyhow::anyhow!("create history {}: {e}", path.display()))?;
        Ok(Recorder {
            out: Arc::new(Mutex::new(BufWriter::new(f))),
            start: Instant::now(),
            completed: Arc::default(),
        })
    }

    /// Nanoseconds since the run started.
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// How many operations have completed so far.
    pub fn completed(&self) -> u64 {
        self.completed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes one event.
    pub fn record(&self, e: &Event) {
        if matches!(e, Event::Complete { .. }) {
            self.completed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        // A history line that cannot be written makes the run's verdict
        // worthless; the check reads the file back and fails on a gap.
        let _ = serde_json::to_writer(&mut *out, e);
        let _ = out.write_all(b"\n");
    }

    /// Records a fault's beginning or end.
    pub fn fault(&self, phase: &str, what: serde_json::Value) {
        self.record(&Event::Fault {
            t_ns: self.now_ns(),
            phase: phase.to_string(),
            what,
        });
    }

    /// Flushes what was recorded to the file.
    pub fn flush(&self) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = out.flush();
    }
}

/// The keys of generation `g`.
pub fn keys(g: u64) -> Vec<String> {
    let mut k: Vec<String> = (0..MODEL_KEYS)
        .map(|i| format!("model/fm-{g}-{i}"))
        .collect();
    k.extend((0..DEPLOY_KEYS).map(|i| format!("deploy/fd-{g}-{i}")));
    k
}

/// One client: its id, the member it calls and a channel to it.
pub struct Client {
    /// The client's id in the history.
    pub id: u32,
    /// The member it calls.
    pub member: u64,
    admin: AdminClient<Channel>,
    recorder: Recorder,
}

impl Client {
    /// A client of the member at `addr`.
    pub fn new(
        id: u32,
        member: u64,
        addr: &str,
        dialer: &Dialer,
        recorder: Recorder,
    ) -> anyhow::Result<Self> {
        let channel = dialer
            .channel(addr)
            .map_err(|e| anyhow::anyhow!("channel to {addr}: {e}"))?;
        Ok(Client {
            id,
            member,
            admin: AdminClient::new(channel)
                .max_decoding_message_size(berth_proto::grpc::MAX_MESSAGE_BYTES),
            recorder,
        })
    }

    /// Runs `op` on `key`, recording invoke and completion; returns the outcome.
    pub async fn run(&mut self, key: &str, op: Op) -> Outcome {
        self.recorder.record(&Event::Invoke {
            t_ns: self.recorder.now_ns(),
            client: self.id,
            member: self.member,
            key: key.to_string(),
            op: op.clone(),
        });
        let outcome = match tokio::time::timeout(OP_TIMEOUT, call(&mut self.admin, key, &op)).await
        {
            Ok(o) => o,
            Err(_) => Outcome::Info {
                error: format!("no answer within {OP_TIMEOUT:?}"),
            },
        };
        self.recorder.record(&Event::Complete {
            t_ns: self.recorder.now_ns(),
            client: self.id,
            outcome: outcome.clone(),
        });
        outcome
    }
}

/// Calls the member and maps its answer to the history's terms: answers
/// that come from the state machine are definite, everything else unknown.
async fn call(admin: &mut AdminClient<Channel>, key: &str, op: &Op) -> Outcome {
    let (kind, name) = key.split_once('/').unwrap_or(("", key));
    let name = name.to_string();
    let result: Result<Value, tonic::Status> = match (kind, op) {
        ("model", Op::ModelCreate { version }) => admin
            .create_model(pb::CreateModelRequest {
                name,
                version: Some(version_spec(version)),
            })
            .await
            .map(|_| Value::Done),
        ("model", Op::ModelAddVersion { version }) => admin
            .add_model_version(pb::AddModelVersionRequest {
                model: name,
                version: Some(version_spec(version)),
            })
            .await
            .map(|_| Value::Done),
        ("model", Op::ModelDelete) => admin
            .delete_model(pb::DeleteModelRequest { name })
            .await
            .map(|_| Value::Done),
        ("model", Op::ModelRead) => admin
            .get_model(pb::GetModelRequest { name, stale: false })
            .await
            .map(|m| {
                let mut versions: Vec<String> = m
                    .into_inner()
                    .versions
                    .into_iter()
                    .filter_map(|v| v.spec.map(|s| s.version))
                    .collect();
                versions.sort();
                Value::Versions { versions }
            }),
        ("deploy", Op::DeployCreate { replicas }) => admin
            .create_deployment(deployment_request(&name, *replicas))
            .await
            .map(|_| Value::Done),
        ("deploy", Op::DeployScale { replicas }) => admin
            .scale_deployment(pb::ScaleDeploymentRequest {
                name,
                replicas: *replicas,
            })
            .await
            .map(|_| Value::Done),
        ("deploy", Op::DeployDelete) => admin
            .delete_deployment(pb::DeleteDeploymentRequest { name })
            .await
            .map(|_| Value::Done),
        ("deploy", Op::DeployRead) => admin
            .get_deployment(pb::GetDeploymentRequest { name, stale: false })
            .await
            .map(|d| Value::Replicas {
                replicas: d.into_inner().spec.map(|s| s.replicas).unwrap_or(0),
            }),
        _ => {
            return Outcome::Fail {
                error: format!("{op:?} does not apply to key {key}"),
            };
        }
    };
    match result {
        Ok(value) => Outcome::Ok { value },
        Err(s) => match s.code() {
            Code::AlreadyExists => Outcome::Ok {
                value: Value::Exists,
            },
            Code::NotFound => Outcome::Ok {
                value: Value::Missing,
            },
            // Refused by validation, or by a member's authentication layer
            // (the client's token, or a forwarding member's certificate),
            // before anything was proposed. A member that has just joined
            // and not yet caught up does not know the token yet, and a
            // member throttles an address after failed authentications.
            Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::Unauthenticated => Outcome::Fail {
                error: format!("{:?}: {}", s.code(), s.message()),
            },
            // The connection to the member was never made (it is down): the
            // request was not sent. A refusal further on (the member
            // forwarding to its leader) stays unknown.
            Code::Unavailable if s.message().starts_with("Connection refused") => Outcome::Fail {
                error: format!("{:?}: {}", s.code(), s.message()),
            },
            _ => Outcome::Info {
                error: format!("{:?}: {}", s.code(), s.message()),
            },
        },
    }
}

fn version_spec(version: &str) -> pb::ModelVersionSpec {
    pb::ModelVersionSpec {
        version: version.to_string(),
        runtime: "demo".into(),
        source: "builtin:demo".into(),
        ..Default::default()
    }
}

/// A deployment of the demo model on one whole GPU per replica, so the
/// demo's per-GPU flock can prove no GPU is shared.
fn deployment_request(name: &str, replicas: u32) -> pb::CreateDeploymentRequest {
    pb::CreateDeploymentRequest {
        name: name.to_string(),
        model: DEMO_MODEL.into(),
        replicas,
        resources: Some(pb::ResourceOverrides {
            cpu_milli: Some(100),
            memory_mib: Some(64),
            gpus: Some(1),
            gpu_memory_mib: Some(0),
            gpu_milli: Some(1000),
        }),
        ..Default::default()
    }
}

/// Draws a client's next operation.
fn next_op(rng: &mut fastrand::Rng, client: u32, seq: &mut u64, g: u64) -> (String, Op) {
    let keys = keys(g);
    let key = keys[rng.usize(0..keys.len())].clone();
    *seq += 1;
    let version = format!("v{client}-{seq}");
    let op = if key.starts_with("model/") {
        match rng.u32(0..10) {
            0..=1 => Op::ModelCreate { version },
            2..=4 => Op::ModelAddVersion { version },
            5 => Op::ModelDelete,
            _ => Op::ModelRead,
        }
    } else {
        match rng.u32(0..10) {
            0..=1 => Op::DeployCreate {
                replicas: rng.u32(0..=2),
            },
            2..=4 => Op::DeployScale {
                replicas: rng.u32(0..=2),
            },
            5 => Op::DeployDelete,
            _ => Op::DeployRead,
        }
    };
    (key, op)
}

/// The generation at `elapsed` into the run.
pub fn generation(elapsed: Duration) -> u64 {
    elapsed.as_secs() / GENERATION.as_secs()
}

/// Runs `client` until `stop`, with `seed` choosing its operations and a
/// short think time between them.
pub async fn client_loop(mut client: Client, seed: u64, started: Instant, stop: CancellationToken) {
    let mut rng = fastrand::Rng::with_seed(seed ^ (client.id as u64).wrapping_mul(0x9e37_79b9));
    let mut seq = 0;
    while !stop.is_cancelled() {
        let g = generation(started.elapsed());
        let (key, op) = next_op(&mut rng, client.id, &mut seq, g);
        client.run(&key, op).await;
        let think = Duration::from_millis(rng.u64(10..40));
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(think) => {}
        }
    }
}

/// Deletes the deployments of past generations until each is gone, so
/// their replicas release their GPUs; every call goes into the history.
pub async fn janitor_loop(mut client: Client, started: Instant, stop: CancellationToken) {
    let mut cleaned = 0u64;
    while !stop.is_cancelled() {
        let g = generation(started.elapsed());
        while cleaned + 1 < g && !stop.is_cancelled() {
            for key in keys(cleaned)
                .into_iter()
                .filter(|k| k.starts_with("deploy/"))
            {
                delete_until_gone(&mut client, &key, &stop).await;
            }
            cleaned += 1;
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Deletes a deployment key until it answers Done or Missing (or `stop`).
pub async fn delete_until_gone(client: &mut Client, key: &str, stop: &CancellationToken) {
    loop {
        if let Outcome::Ok { .. } = client.run(key, Op::DeployDelete).await {
            return;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}
