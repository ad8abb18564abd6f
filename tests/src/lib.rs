//! Helpers for Berth's end-to-end tests: run the real `berth` CLI, wait on
//! conditions with generous deadlines (never bare sleeps), and talk gRPC to
//! a member. Clusters come from `berth_cli::local::LocalCluster`, which kills
//! its processes on drop; they run secure (mTLS, tokens), and the CLI and
//! the gRPC helpers use the admin credentials of the last cluster the test
//! started (one test per process under nextest).

pub mod faults;

use std::future::Future;
use std::process::Output;
use std::time::Duration;

use berth_cli::local::find_binary;
use berth_proto::grpc::Channel;
use berth_proto::v1::admin_client::AdminClient;
use tokio::time::Instant;

pub use berth_cli::local::{LocalCluster, MemberOptions};

/// A generous deadline for conditions that should hold within seconds.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Runs the `berth` CLI with `args` and returns its output.
pub async fn berth(args: &[&str]) -> Output {
    berth_command(args).output().await.expect("run berth")
}

/// The `berth` CLI with `args`, calling the last cluster this test started
/// with its admin credentials (or `--insecure` when that cluster is).
pub fn berth_command(args: &[&str]) -> tokio::process::Command {
    berth_provider();
    let bin = find_binary("berth").expect("berth binary (run `cargo build --bins` first)");
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .env_remove("BERTH_SERVER")
        .env_remove("BERTH_TOKEN");
    cmd.env_remove("BERTH_CONFIG");
    match berth_cli::local::current_cluster() {
        Some(berth_cli::local::CurrentCluster::Secure(conf)) => {
            cmd.env("BERTH_CONFIG", conf);
        }
        Some(berth_cli::local::CurrentCluster::Insecure) => {
            cmd.arg("--insecure");
        }
        None => {}
    }
    cmd
}

/// Runs `berth-control` with `args` to completion (for start-up errors).
pub async fn berth_control(args: &[&str]) -> Output {
    let bin = find_binary("berth-control").expect("berth-control binary");
    tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new(bin).args(args).output(),
    )
    .await
    .expect("berth-control exits")
    .expect("run berth-control")
}

/// Runs `berth-agent` with `args` to completion (for start-up errors).
pub async fn berth_agent(args: &[&str]) -> Output {
    let bin = find_binary("berth-agent").expect("berth-agent binary");
    tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new(bin).args(args).output(),
    )
    .await
    .expect("berth-agent exits")
    .expect("run berth-agent")
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs the CLI, asserts it succeeded, and parses its JSON stdout.
pub async fn berth_json(args: &[&str]) -> serde_json::Value {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--output", "json"]);
    let o = berth(&all).await;
    assert!(
        o.status.success(),
        "berth {args:?} failed: {}{}",
        stdout(&o),
        stderr(&o)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("berth {args:?}: bad JSON ({e}): {}", stdout(&o)))
}

/// Runs the CLI and parses its JSON stdout; `None` when it failed (for polling).
pub async fn try_berth_json(args: &[&str]) -> Option<serde_json::Value> {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--output", "json"]);
    let o = berth(&all).await;
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

/// Waits until process `pid` has ended (`what` names it in a timeout).
pub async fn wait_exited(pid: u32, what: &str) {
    wait_until(DEADLINE, what, || async { (!alive(pid)).then_some(()) }).await
}

/// Polls `condition` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match wait_until_or(timeout, condition).await {
        Ok(v) => v,
        Err(()) => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// As `wait_until`, but a timeout is an `Err` for the caller to report
/// (the fault suite counts it as a failed check, not a harness panic).
pub async fn wait_until_or<T, F, Fut>(timeout: Duration, mut condition: F) -> Result<T, ()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut ticks = poll_every(Duration::from_millis(50));
    loop {
        ticks.tick().await;
        if let Some(v) = condition().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(());
        }
    }
}

/// Runs `check` (which asserts an invariant and says whether it could look)
/// every `every` until `over()` says the watched period ended; returns how many
/// checks could look. Panics after `timeout` naming `what`, so a period that
/// never ends bounds the test instead of hanging it.
pub async fn check_until<F, Fut>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut over: impl FnMut() -> bool,
    mut check: F,
) -> usize
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    let mut ticks = poll_every(every);
    let mut looked = 0;
    loop {
        ticks.tick().await;
        // Decided before the check, so the last check sees the state at (or after) the end.
        let last = over();
        looked += usize::from(check().await);
        if last {
            return looked;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} watching {what}"
        );
    }
}

/// A poll cadence that does not bunch up ticks after a slow check.
fn poll_every(every: Duration) -> tokio::time::Interval {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}

/// Installs the process's crypto provider (ring), as every binary does first.
pub fn berth_provider() {
    berth_proto::tls::install_crypto_provider();
}

/// A gRPC Admin client for one member, as the admin of the last cluster started.
pub fn admin(addr: &str) -> AdminClient<Channel> {
    berth_provider();
    AdminClient::new(
        berth_cli::local::current_dialer()
            .channel(addr)
            .expect("channel"),
    )
}

/// Waits until the member at `addr` holds model `name` in its local state.
pub async fn wait_for_model(addr: &str, name: &str, what: &str) {
    wait_until(DEADLINE, what, || async {
        local_models(addr)
            .await
            .filter(|m| m.iter().any(|n| n == name))
    })
    .await;
}

/// Model names on one member, read from its local state (stale read).
pub async fn local_models(addr: &str) -> Option<Vec<String>> {
    let r = admin(addr)
        .list_models(berth_proto::v1::ListModelsRequest { stale: true })
        .await
        .ok()?;
    Some(r.into_inner().models.into_iter().map(|m| m.name).collect())
}

pub use berth_cli::local::{AgentOptions, LocalAgent};
use berth_proto::v1::agent_client::AgentClient;
use std::collections::HashMap;

/// A gRPC Agent client for a standalone agent this test started (mTLS, as
/// a member of the CA that signed the agent's certificate).
pub fn agent(addr: &str) -> AgentClient<Channel> {
    AgentClient::new(berth_cli::local::standalone_channel(addr).expect("standalone agent channel"))
}

/// A spec running the demo model server on simulated GPU `gpu` (or none).
pub fn demo_spec(id: &str, generation: u64, gpu: Option<u32>) -> berth_proto::v1::ReplicaSpec {
    berth_proto::v1::ReplicaSpec {
        id: id.into(),
        generation,
        model: "demo".into(),
        runtime: "demo".into(),
        source: "builtin:demo".into(),
        gpus: gpu.into_iter().collect(),
        resources: Some(berth_proto::v1::Resources {
            cpu_milli: 500,
            memory_mib: 256,
            gpus: u32::from(gpu.is_some()),
            gpu_memory_mib: if gpu.is_some() { 10 * 1024 } else { 0 },
            gpu_milli: if gpu.is_some() { 250 } else { 0 },
        }),
        ..Default::default()
    }
}

/// A spec running `template` (runtime command, TCP health probe).
pub fn command_spec(id: &str, generation: u64, template: &str) -> berth_proto::v1::ReplicaSpec {
    berth_proto::v1::ReplicaSpec {
        id: id.into(),
        generation,
        model: "cmd".into(),
        runtime: "command".into(),
        command: template.into(),
        source: "none".into(),
        health: "tcp".into(),
        ..Default::default()
    }
}

/// Starts a replica, panicking with the status message on failure.
pub async fn start_replica(
    addr: &str,
    spec: berth_proto::v1::ReplicaSpec,
) -> berth_proto::v1::ReplicaStatus {
    try_start_replica(addr, spec)
        .await
        .unwrap_or_else(|s| panic!("start replica: {:?}: {}", s.code(), s.message()))
}

/// Asks the agent at `addr` to start `spec`; its answer, refusal included.
pub async fn try_start_replica(
    addr: &str,
    spec: berth_proto::v1::ReplicaSpec,
) -> Result<berth_proto::v1::ReplicaStatus, tonic::Status> {
    agent(addr)
        .start_replica(berth_proto::v1::StartReplicaRequest {
            spec: Some(spec),
            placed_at: 0,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// One replica's status as the agent lists it (None if the agent does not answer).
pub async fn replica_status(addr: &str, id: &str) -> Option<berth_proto::v1::ReplicaStatus> {
    agent(addr)
        .list_replicas(berth_proto::v1::ListReplicasRequest {})
        .await
        .ok()?
        .into_inner()
        .replicas
        .into_iter()
        .find(|r| r.id == id)
}

/// Waits until the replica's status satisfies `ok`.
pub async fn wait_replica(
    addr: &str,
    id: &str,
    what: &str,
    ok: impl Fn(&berth_proto::v1::ReplicaStatus) -> bool,
) -> berth_proto::v1::ReplicaStatus {
    wait_until(DEADLINE, &format!("replica {id}: {what}"), || async {
        replica_status(addr, id).await.filter(|r| ok(r))
    })
    .await
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// A process's environment.
pub fn environ(pid: u32) -> HashMap<String, String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// An HTTP GET on 127.0.0.1:port: status code and body.
pub async fn http_get(port: u32, path: &str) -> Option<(u16, String)> {
    http(port, "GET", path, "").await
}

/// An HTTP request on 127.0.0.1:port with a JSON body: status code and body.
pub async fn http(port: u32, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    berth_cli::local::http_request(&format!("127.0.0.1:{port}"), method, path, body).await
}

/// The serial of the certificate the process at `addr` presents now (a
/// fresh TLS handshake, verified against `ca_pem` and `expect`).
pub async fn presented_serial(
    addr: &str,
    ca_pem: &str,
    expect: berth_proto::tls::Expect,
) -> Option<String> {
    berth_provider();
    let trust = berth_proto::tls::Trust::from_pem(ca_pem, "ca").ok()?;
    let config = berth_proto::tls::client_config(trust, expect, None).ok()?;
    let (host, port) = addr.rsplit_once(':')?;
    let stream = berth_proto::tls::connect(host, port.parse().ok()?, config)
        .await
        .ok()?;
    let der = stream.get_ref().1.peer_certificates()?.first()?.clone();
    Some(berth_proto::pki::leaf_info(&der).ok()?.serial)
}

/// The model every test deploys: the demo server, a quarter of a GPU and
/// 10 GiB of its memory, 100m CPU and 128 MiB per replica.
pub const DEMO_MODEL: [&str; 14] = [
    "--runtime",
    "demo",
    "--source",
    "builtin:demo",
    "--gpus",
    "1",
    "--gpu-memory",
    "10GiB",
    "--gpu-share",
    "250",
    "--cpu",
    "100m",
    "--memory",
    "128MiB",
];

/// The replicas of `deployment` (`berth replica list --deployment`); none
/// while the CLI fails (a member may be electing).
pub async fn deployment_replicas(servers: &str, deployment: &str) -> Vec<serde_json::Value> {
    try_berth_json(&[
        "--server",
        servers,
        "replica",
        "list",
        "--deployment",
        deployment,
    ])
    .await
    .and_then(|v| v.as_array().cloned())
    .unwrap_or_default()
}

/// A control plane of `members` (with `extra` flags each), one agent with
/// two simulated A100s per name in `nodes`, every node ready, and model
/// `demo` registered. Returns the cluster, its agents and `--server`.
pub async fn demo_cluster(
    members: usize,
    extra: &[&str],
    nodes: &[&str],
) -> (LocalCluster, Vec<LocalAgent>, String) {
    demo_cluster_with(members, extra, nodes, &[]).await
}

/// `demo_cluster`, each agent also started with `agent_extra` (same order as `nodes`).
pub async fn demo_cluster_with(
    members: usize,
    extra: &[&str],
    nodes: &[&str],
    agent_extra: &[Vec<String>],
) -> (LocalCluster, Vec<LocalAgent>, String) {
    let options = MemberOptions {
        extra: extra.iter().map(|x| x.to_string()).collect(),
        ..MemberOptions::default()
    };
    let cluster = LocalCluster::start(members, options)
        .await
        .expect("start the control plane");
    let servers = cluster.servers();
    let agents: Vec<LocalAgent> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let mut options = cluster.agent_options(node, "2xA100-80GB");
            options.extra = agent_extra.get(i).cloned().unwrap_or_default();
            LocalAgent::start_in(cluster.root(), options).expect("start agent")
        })
        .collect();
    wait_until(DEADLINE, "every node ready", || async {
        let v = berth_json(&["--server", &servers, "node", "list"]).await;
        let ready = v
            .as_array()?
            .iter()
            .filter(|n| n["state"] == "ready")
            .count();
        (ready == nodes.len()).then_some(())
    })
    .await;
    let mut create = vec!["--server", servers.as_str(), "model", "create", "demo"];
    create.extend(DEMO_MODEL);
    berth_json(&create).await;
    (cluster, agents, servers)
}

/// Checks a `/metrics` page with `promtool check metrics` (BERTH_PROMTOOL,
/// else `promtool` on the PATH; scripts/promtool.sh installs it): `Err`
/// holds what promtool objects to.
pub async fn promtool_check(page: &str) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let promtool = std::env::var("BERTH_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let mut child = tokio::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("run {promtool} ({e}): run scripts/promtool.sh once (scripts/test.sh does it)")
        });
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(page.as_bytes())
        .await
        .expect("write to promtool");
    drop(stdin);
    let o = child.wait_with_output().await.expect("promtool ends");
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

/// A `berth-gateway` process, killed on drop.
pub struct Gateway {
    /// Its HTTP port on 127.0.0.1.
    pub port: u32,
    /// The process.
    pub child: tokio::process::Child,
}

/// Starts `berth-gateway --listen 127.0.0.1:0 ARGS` and reads the port it
/// bound from its first line of output.
pub async fn start_gateway(args: &[&str]) -> Gateway {
    use tokio::io::AsyncBufReadExt;
    let bin = find_binary("berth-gateway").expect("berth-gateway binary");
    let mut child = tokio::process::Command::new(bin)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start berth-gateway");
    let out = child.stdout.take().expect("piped stdout");
    let mut lines = tokio::io::BufReader::new(out).lines();
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("berth-gateway prints its address")
        .expect("read its output")
        .expect("a line before it exits");
    let port = line
        .rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    // Keep draining its output so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Gateway { port, child }
}

/// One HTTP/1.1 request (`Connection: close`) read to its end: status,
/// headers (lowercase names) and body.
pub async fn http_full(
    port: u32,
    method: &str,
    path: &str,
    body: &str,
) -> Option<(u16, HashMap<String, String>, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port as u16))
        .await
        .ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let code = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    Some((code, headers, body.to_string()))
}
