//! A control-plane cluster of real `berth-control` processes on loopback,
//! for `berth bench failover` and the end-to-end tests: free ports,
//! temporary data dirs, logs in files, SIGKILL and restart. Processes are
//! killed when the cluster is dropped, even when a test fails.
//!
//! Secure by default, the way an operator runs it: member 1 bootstraps (CA,
//! `admin.conf`, `agent.token`), every other member joins with a member
//! token made through the admin API, agents join with the agent token.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use berth_proto::grpc::Dialer;
use berth_proto::tls::{ClientFile, Trust};
use berth_proto::v1::{ClusterStatusRequest, CreateTokenRequest};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::time::Instant;

use crate::client::Client;

/// Finds a Berth binary: `$BERTH_BIN_DIR`, next to this executable, or one
/// level up (test executables live in `target/<profile>/deps`).
pub fn find_binary(name: &str) -> anyhow::Result<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("BERTH_BIN_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        dirs.push(dir.to_path_buf());
        if let Some(up) = dir.parent() {
            dirs.push(up.to_path_buf());
        }
    }
    for d in &dirs {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "{name} not found in {:?}: build it first with `cargo build --release --bins` (or set BERTH_BIN_DIR)",
        dirs
    )
}

/// A free loopback port (bound, then released).
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(l.local_addr()?.port())
}

/// Where a process runs when it is not on this machine's loopback: a
/// network namespace and the address it has there (the fault suite's
/// separate hosts). It listens on a fixed port there: the namespace is its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The namespace (`ip netns exec` runs the process in it).
    pub netns: String,
    /// The process's address in it.
    pub ip: std::net::IpAddr,
}

/// The port a member listens on inside its own namespace.
pub const NETNS_MEMBER_PORT: u16 = 7000;
/// The port an agent listens on inside its own namespace.
pub const NETNS_AGENT_PORT: u16 = 7100;

/// Maps a member id to where it runs (None: loopback on a free port).
#[derive(Clone)]
pub struct HostMap(pub std::sync::Arc<dyn Fn(u64) -> Option<Placement> + Send + Sync>);

impl std::fmt::Debug for HostMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostMap")
    }
}

/// Where `placement` says, or a free loopback port, and the command that
/// starts `binary` there.
fn place(
    placement: Option<&Placement>,
    port: u16,
    binary: &Path,
) -> anyhow::Result<(String, Command)> {
    Ok(match placement {
        Some(p) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &p.netns]).arg(binary);
            (std::net::SocketAddr::new(p.ip, port).to_string(), c)
        }
        None => (format!("127.0.0.1:{}", free_port()?), Command::new(binary)),
    })
}

/// Options for the members' command lines.
#[derive(Debug, Clone)]
pub struct MemberOptions {
    /// `--election-timeout`.
    pub election_timeout: String,
    /// `--heartbeat-interval`.
    pub heartbeat_interval: String,
    /// `--snapshot-every`.
    pub snapshot_every: u64,
    /// More flags for every member.
    pub extra: Vec<String>,
    /// Plaintext without authentication (`--insecure`), for benchmarks
    /// that compare against it and for hollow agents.
    pub insecure: bool,
    /// Where each member runs (None: every member on loopback).
    pub hosts: Option<HostMap>,
    /// Give each member on loopback an `--http` address of its own
    /// (`LocalMember::http`), for benches that read `/metrics`.
    pub http: bool,
}

impl Default for MemberOptions {
    fn default() -> Self {
        Self {
            election_timeout: "150ms".into(),
            heartbeat_interval: "50ms".into(),
            snapshot_every: 10_000,
            extra: Vec::new(),
            insecure: false,
            hosts: None,
            http: false,
        }
    }
}

/// The last cluster this process started: the end-to-end tests run one
/// cluster per process and hand its credentials to the CLI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CurrentCluster {
    /// It runs `--insecure`.
    Insecure,
    /// Its admin credentials file.
    Secure(PathBuf),
}

static CURRENT: std::sync::Mutex<Option<CurrentCluster>> = std::sync::Mutex::new(None);

/// The last cluster this process started, if any.
pub fn current_cluster() -> Option<CurrentCluster> {
    CURRENT.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn set_current(c: CurrentCluster) {
    *CURRENT.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
}

/// How to dial the last cluster this process started (plaintext if none or insecure).
pub fn current_dialer() -> Dialer {
    match current_cluster() {
        Some(CurrentCluster::Secure(p)) => dialer_from(&p).unwrap_or(Dialer::Insecure),
        _ => Dialer::Insecure,
    }
}

/// A dialer with the trust and token of a credentials file.
pub fn dialer_from(admin_conf: &Path) -> anyhow::Result<Dialer> {
    let file = ClientFile::load(admin_conf)?;
    let trust = Trust::from_pem(&file.ca_pem, "admin.conf ca_pem")?;
    Ok(Dialer::tls(
        trust,
        None,
        file.token.map(berth_proto::pki::Secret::new),
    )?)
}

/// One member process.
pub struct LocalMember {
    /// Member id.
    pub id: u64,
    /// gRPC address.
    pub addr: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Where its stdout and stderr go.
    pub log_path: PathBuf,
    /// Where it runs (None: loopback).
    pub placement: Option<Placement>,
    /// Its `--http` address, when `MemberOptions::http` asked for one.
    pub http: Option<String>,
    child: Option<Child>,
}

impl LocalMember {
    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

/// A set of members plus the directory they live in.
pub struct LocalCluster {
    /// The members, by position (member id = position + 1 unless added later).
    pub members: Vec<LocalMember>,
    /// How to call the cluster as its admin.
    pub dialer: Dialer,
    admin_conf: Option<PathBuf>,
    binary: PathBuf,
    options: MemberOptions,
    root: Option<tempfile::TempDir>,
    root_path: PathBuf,
}

impl LocalCluster {
    /// Starts `n` members: the first bootstraps, the others join it.
    pub async fn start(n: usize, options: MemberOptions) -> anyhow::Result<Self> {
        let root = tempfile::Builder::new()
            .prefix("berth-cluster-")
            .tempdir()
            .context("create cluster dir")?;
        let path = root.path().to_path_buf();
        Self::start_at(n, options, path, Some(root)).await
    }

    /// Starts `n` members whose data dirs and logs live under `dir`, which
    /// outlives the cluster (the fault suite keeps a failed run's files).
    pub async fn start_in(dir: &Path, n: usize, options: MemberOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        Self::start_at(n, options, dir.to_path_buf(), None).await
    }

    async fn start_at(
        n: usize,
        options: MemberOptions,
        root_path: PathBuf,
        root: Option<tempfile::TempDir>,
    ) -> anyhow::Result<Self> {
        let binary = find_binary("berth-control")?;
        let mut cluster = LocalCluster {
            members: Vec::new(),
            dialer: Dialer::Insecure,
            admin_conf: None,
            binary,
            options,
            root_path,
            root,
        };
        for i in 0..n {
            let id = i as u64 + 1;
            let join = (i > 0).then(|| cluster.members[0].addr.clone());
            cluster.add_member(id, join.as_deref()).await?;
            if i == 0 {
                cluster.await_credentials(Duration::from_secs(30)).await?;
                cluster.wait_for_leader(Duration::from_secs(30)).await?;
            }
        }
        cluster.wait_for_voters(n, Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    /// The cluster's root directory.
    pub fn root(&self) -> &Path {
        self.root_path.as_path()
    }

    /// Waits for the bootstrap member's `admin.conf`, then calls as admin.
    async fn await_credentials(&mut self, timeout: Duration) -> anyhow::Result<()> {
        if self.options.insecure {
            set_current(CurrentCluster::Insecure);
            return Ok(());
        }
        let path = self.members[0].data_dir.join("admin.conf");
        let deadline = Instant::now() + timeout;
        while !path.is_file() {
            if Instant::now() > deadline {
                bail!(
                    "member 1 wrote no {} within {timeout:?}; logs in {}",
                    path.display(),
                    self.root_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.dialer = dialer_from(&path)?;
        set_current(CurrentCluster::Secure(path.clone()));
        self.admin_conf = Some(path);
        Ok(())
    }

    /// The admin credentials file bootstrap wrote (None when insecure).
    pub fn admin_conf(&self) -> Option<&Path> {
        self.admin_conf.as_deref()
    }

    /// The agent join token bootstrap wrote (None when insecure).
    pub fn agent_token(&self) -> Option<String> {
        if self.options.insecure {
            return None;
        }
        let path = self.members.first()?.data_dir.join("agent.token");
        std::fs::read_to_string(path)
            .ok()
            .map(|t| t.trim().to_string())
    }

    /// Options for an agent of node `node` with simulated `gpus` that joins
    /// this cluster (with the agent token, or plaintext when the cluster is).
    pub fn agent_options(&self, node: &str, gpus: &str) -> AgentOptions {
        AgentOptions {
            node: node.to_string(),
            simulate_gpus: Some(gpus.to_string()),
            control: Some(self.servers()),
            token: self.agent_token(),
            extra: Vec::new(),
            placement: None,
        }
    }

    /// A client of every member, as admin.
    pub fn client(&self) -> Client {
        Client::new(&self.servers(), &self.dialer)
    }

    /// A new token of `role` (`agent`, `member`, `viewer`, …), made through the admin API.
    pub async fn token(&self, role: &str) -> anyhow::Result<String> {
        let role = role.to_string();
        let r = self
            .client()
            .admin(|mut c| {
                let req = CreateTokenRequest {
                    role: role.clone(),
                    ttl_s: Some(3600),
                    uses: None,
                    description: "local cluster".into(),
                };
                async move { c.create_token(req).await }
            })
            .await
            .map_err(|e| anyhow::anyhow!("create a {role} token: {e}"))?;
        Ok(r.token)
    }

    /// Starts a new member process with `id`, bootstrapping when `join` is
    /// None; a joining member of a secure cluster gets a member token.
    pub async fn add_member(
        &mut self,
        id: u64,
        join: Option<&str>,
    ) -> anyhow::Result<&mut LocalMember> {
        let placement = self.options.hosts.as_ref().and_then(|h| (h.0)(id));
        let (addr, _) = place(placement.as_ref(), NETNS_MEMBER_PORT, &self.binary)?;
        let data_dir = self.root_path.as_path().join(format!("member-{id}"));
        let log_path = self.root_path.as_path().join(format!("member-{id}.log"));
        let mut args = vec![
            "--id".to_string(),
            id.to_string(),
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        match join {
            Some(j) => {
                args.extend(["--join".to_string(), j.to_string()]);
                if !self.options.insecure {
                    args.extend(["--token".to_string(), self.token("member").await?]);
                }
            }
            None => args.push("--bootstrap".into()),
        }
        let http = match (self.options.http, &placement) {
            (true, None) => Some(format!("127.0.0.1:{}", free_port()?)),
            _ => None,
        };
        if let Some(h) = &http {
            args.extend(["--http".to_string(), h.clone()]);
        }
        let mut member = LocalMember {
            id,
            addr,
            data_dir,
            log_path,
            placement,
            http,
            child: None,
        };
        member.child = Some(self.spawn(&member, &args)?);
        self.members.push(member);
        Ok(self.members.last_mut().expect("just pushed"))
    }

    fn spawn(&self, m: &LocalMember, extra: &[String]) -> anyhow::Result<Child> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&m.log_path)
            .with_context(|| format!("open {}", m.log_path.display()))?;
        let (_, mut cmd) = place(m.placement.as_ref(), NETNS_MEMBER_PORT, &self.binary)?;
        if self.options.insecure {
            cmd.arg("--insecure");
        }
        cmd.args(extra)
            .args([
                "--election-timeout",
                &self.options.election_timeout,
                "--heartbeat-interval",
                &self.options.heartbeat_interval,
                "--snapshot-every",
                &self.options.snapshot_every.to_string(),
            ])
            .args(&self.options.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        cmd.spawn()
            .with_context(|| format!("start {}", self.binary.display()))
    }

    /// The member with `id`.
    pub fn member(&mut self, id: u64) -> anyhow::Result<&mut LocalMember> {
        self.members
            .iter_mut()
            .find(|m| m.id == id)
            .with_context(|| format!("no member {id}"))
    }

    /// Every member's address, comma-separated (for `--server`).
    pub fn servers(&self) -> String {
        self.members
            .iter()
            .map(|m| m.addr.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every member's address but `id`'s, comma-separated.
    pub fn servers_except(&self, id: u64) -> String {
        self.members
            .iter()
            .filter(|m| m.id != id)
            .map(|m| m.addr.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// SIGKILLs a member and reaps it.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        let m = self.member(id)?;
        if let Some(mut c) = m.child.take() {
            c.kill().context("kill member")?;
            c.wait().context("reap member")?;
        }
        Ok(())
    }

    /// SIGKILLs a member and drops it from this cluster's list (after it
    /// was removed from the Raft membership); its data dir and log stay.
    pub fn forget(&mut self, id: u64) -> anyhow::Result<()> {
        self.kill(id)?;
        self.members.retain(|m| m.id != id);
        Ok(())
    }

    /// SIGTERMs a member and waits for it to exit.
    pub async fn stop(&mut self, id: u64) -> anyhow::Result<()> {
        let m = self.member(id)?;
        if let Some(mut c) = m.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if c.try_wait()?.is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    c.kill()?;
                    c.wait()?;
                    bail!("member {id} did not stop within 20s of SIGTERM");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// Restarts a stopped member with only `--data-dir` and `--listen`.
    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let idx = self
            .members
            .iter()
            .position(|m| m.id == id)
            .with_context(|| format!("no member {id}"))?;
        if self.members[idx].child.is_some() {
            bail!("member {id} is running");
        }
        let mut args = vec![
            "--listen".to_string(),
            self.members[idx].addr.clone(),
            "--data-dir".into(),
            self.members[idx].data_dir.display().to_string(),
        ];
        if let Some(h) = &self.members[idx].http {
            args.extend(["--http".to_string(), h.clone()]);
        }
        let child = self.spawn(&self.members[idx], &args)?;
        self.members[idx].child = Some(child);
        Ok(())
    }

    /// Asks every running member and returns the one that says it leads
    /// in the highest term (a restarted ex-leader may briefly claim an old
    /// term; a follower's idea of the leader may be stale right after a kill).
    pub async fn wait_for_leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut best: Option<(u64, u64)> = None;
            for m in &self.members {
                if m.child.is_none() {
                    continue;
                }
                let client = Client::new(&m.addr, &self.dialer);
                let status = client
                    .admin(|mut c| async move {
                        c.cluster_status(ClusterStatusRequest {
                            stale: true,
                            digest: false,
                        })
                        .await
                    })
                    .await;
                if let Ok(s) = status
                    && s.leader_id == Some(s.answered_by)
                    && best.is_none_or(|(term, _)| s.term > term)
                {
                    best = Some((s.term, s.answered_by));
                }
            }
            if let Some((_, id)) = best {
                return Ok(id);
            }
            if Instant::now() > deadline {
                bail!(
                    "no leader within {timeout:?}; logs in {}",
                    self.root_path.as_path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the leader reports `n` voters.
    pub async fn wait_for_voters(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let client = self.client();
            if let Ok(s) = client
                .admin(|mut c| async move {
                    c.cluster_status(ClusterStatusRequest {
                        stale: false,
                        digest: false,
                    })
                    .await
                })
                .await
            {
                let voters = s.members.iter().filter(|m| m.role != "learner").count();
                if voters == n && s.leader_id.is_some() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "cluster did not reach {n} voters within {timeout:?}; logs in {}",
                    self.root_path.as_path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::env::var_os("BERTH_KEEP_CLUSTER").is_some()
            && let Some(root) = self.root.take()
        {
            eprintln!("keeping cluster dir {}", root.keep().display());
        }
    }
}

/// A plain HTTP/1.1 request (`Connection: close`) with an optional JSON
/// body: status code and body. For tests and benches on loopback.
pub async fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// The CA of the standalone agents this process starts, and a member
/// credential it signed to call them with.
struct StandaloneTls {
    ca: berth_proto::pki::Ca,
    member: Dialer,
}

static STANDALONE: std::sync::OnceLock<Result<StandaloneTls, String>> = std::sync::OnceLock::new();
/// Standalone agents by address, for `standalone_channel`.
static STANDALONE_NODES: std::sync::Mutex<Vec<(String, String)>> =
    std::sync::Mutex::new(Vec::new());

fn standalone_tls() -> anyhow::Result<&'static StandaloneTls> {
    let made = STANDALONE.get_or_init(|| {
        let make = || -> anyhow::Result<StandaloneTls> {
            berth_proto::tls::install_crypto_provider();
            let ca = berth_proto::pki::Ca::generate("standalone", std::time::SystemTime::now())?;
            let request = berth_proto::pki::new_key_and_csr()?;
            let issued = ca.sign_csr(
                &request.csr_der,
                &berth_proto::pki::Identity::Member(1),
                &[],
                Duration::from_secs(7 * 24 * 3600),
                std::time::SystemTime::now(),
            )?;
            let credentials = berth_proto::tls::Credentials::from_pem(
                ca.cert_pem(),
                &format!("{}{}", issued.cert_pem, ca.cert_pem()),
                &request.key_pem,
                "standalone member",
            )?;
            Ok(StandaloneTls {
                member: Dialer::with_credentials(credentials)?,
                ca,
            })
        };
        make().map_err(|e| format!("{e:#}"))
    });
    made.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
}

/// Puts a node certificate for `node` from the standalone CA into the data
/// dir (unless one is there), and remembers which node serves `addr`.
fn provision_standalone(data_dir: &Path, node: &str, addr: &str) -> anyhow::Result<()> {
    let tls = standalone_tls()?;
    let files = berth_proto::tls::TlsFiles::under(data_dir);
    if !files.exist() {
        let request = berth_proto::pki::new_key_and_csr()?;
        let issued = tls.ca.sign_csr(
            &request.csr_der,
            &berth_proto::pki::Identity::Node(node.to_string()),
            &["127.0.0.1".to_string()],
            Duration::from_secs(7 * 24 * 3600),
            std::time::SystemTime::now(),
        )?;
        files.store(
            tls.ca.cert_pem(),
            &format!("{}{}", issued.cert_pem, tls.ca.cert_pem()),
            &request.key_pem,
        )?;
    }
    STANDALONE_NODES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((addr.to_string(), node.to_string()));
    Ok(())
}

/// A channel to the standalone agent this process started at `addr`, as a
/// member of its CA.
pub fn standalone_channel(addr: &str) -> anyhow::Result<berth_proto::grpc::Channel> {
    let node = STANDALONE_NODES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|(a, _)| a == addr)
        .map(|(_, n)| n.clone())
        .with_context(|| format!("no standalone agent was started at {addr}"))?;
    Ok(standalone_tls()?.member.agent_channel(addr, &node)?)
}

/// Options for a local agent's command line.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// `--node-name`.
    pub node: String,
    /// `--simulate-gpus`, if any.
    pub simulate_gpus: Option<String>,
    /// `--control` addresses (comma-separated); None: standalone.
    pub control: Option<String>,
    /// `--token` (a join token); None: `--insecure` (standalone agents, insecure clusters).
    pub token: Option<String>,
    /// More flags.
    pub extra: Vec<String>,
    /// Where it runs (None: loopback on a free port).
    pub placement: Option<Placement>,
}

impl AgentOptions {
    /// A standalone agent with two simulated A100s.
    pub fn standalone(node: &str) -> Self {
        AgentOptions {
            node: node.into(),
            simulate_gpus: Some("2xA100-80GB".into()),
            control: None,
            token: None,
            extra: Vec::new(),
            placement: None,
        }
    }
}

/// A real `berth-agent` process on a free loopback port with its own data
/// dir. Dropping it kills the agent and every replica it started (their
/// shims outlive the agent by design, so they are killed through the
/// replica directories).
pub struct LocalAgent {
    /// The node's name.
    pub node: String,
    /// The Agent gRPC address.
    pub addr: String,
    /// The data dir.
    pub data_dir: PathBuf,
    /// Where its output goes.
    pub log_path: PathBuf,
    args: Vec<String>,
    binary: PathBuf,
    placement: Option<Placement>,
    child: Option<Child>,
    _root: Option<tempfile::TempDir>,
}

impl LocalAgent {
    /// Starts an agent in a new temporary directory.
    pub fn start(options: AgentOptions) -> anyhow::Result<Self> {
        let root = tempfile::Builder::new()
            .prefix("berth-agent-")
            .tempdir()
            .context("create agent dir")?;
        let path = root.path().to_path_buf();
        let mut agent = Self::start_in(&path, options)?;
        agent._root = Some(root);
        Ok(agent)
    }

    /// Starts an agent whose data dir and log live under `dir`.
    pub fn start_in(dir: &Path, options: AgentOptions) -> anyhow::Result<Self> {
        let binary = find_binary("berth-agent")?;
        let (addr, _) = place(options.placement.as_ref(), NETNS_AGENT_PORT, &binary)?;
        let data_dir = dir.join(format!("agent-{}", options.node));
        let log_path = dir.join(format!("agent-{}.log", options.node));
        let mut args = vec![
            "--node-name".to_string(),
            options.node.clone(),
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        if let Some(g) = &options.simulate_gpus {
            args.extend(["--simulate-gpus".to_string(), g.clone()]);
        }
        if let Some(c) = &options.control {
            args.extend(["--control".to_string(), c.clone()]);
        }
        match (&options.token, &options.control) {
            (Some(t), _) => args.extend(["--token".to_string(), t.clone()]),
            // Standalone: a node certificate from this process's test CA,
            // placed in the data dir as an operator with their own PKI would.
            (None, None) => provision_standalone(&data_dir, &options.node, &addr)?,
            (None, Some(_)) => args.push("--insecure".into()),
        }
        args.extend(options.extra.iter().cloned());
        let mut agent = LocalAgent {
            node: options.node,
            addr,
            data_dir,
            log_path,
            args,
            binary,
            placement: options.placement,
            child: None,
            _root: None,
        };
        agent.restart()?;
        Ok(agent)
    }

    /// Starts the agent process again (after `kill` or `stop`).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("agent {} is running", self.node);
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("open {}", self.log_path.display()))?;
        let (_, mut cmd) = place(self.placement.as_ref(), NETNS_AGENT_PORT, &self.binary)?;
        let child = cmd
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Whether the agent process is running (reaped when it is not).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILLs the agent (its replicas keep running) and reaps it.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().context("kill agent")?;
            c.wait().context("reap agent")?;
        }
        Ok(())
    }

    /// Sends a signal to the agent process (SIGSTOP, SIGCONT, …).
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.pid().context("the agent is not running")?;
        kill(Pid::from_raw(pid as i32), signal).context("signal the agent")
    }

    /// Kills every replica process (server group and shim) under the data dir.
    pub fn kill_replicas(&self) {
        use berth_node_agent::supervisor::{procfs, replicas_dir, shim::ShimFile};
        let Ok(entries) = std::fs::read_dir(replicas_dir(&self.data_dir)) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(text) = std::fs::read(e.path().join("shim.json")) else {
                continue;
            };
            let Ok(ids) = serde_json::from_slice::<ShimFile>(&text) else {
                continue;
            };
            procfs::kill_group(ids.server);
            ids.shim.signal(Signal::SIGKILL);
        }
    }
}

impl Drop for LocalAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.kill_replicas();
        if std::env::var_os("BERTH_KEEP_CLUSTER").is_some()
            && let Some(root) = self._root.take()
        {
            eprintln!("keeping agent dir {}", root.keep().display());
        }
    }
}
