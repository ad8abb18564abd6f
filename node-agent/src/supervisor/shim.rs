//! The per-replica shim: `berth-agent shim DIR`, one small process per run
//! of a replica that owns the model server process, writes its output to
//! the rotated log files and its exit status to `exit.json`, and outlives
//! the agent (like containerd-shim or Nomad's executor). So an agent that
//! restarts, even after SIGKILL, finds its replicas running, their logs
//! still captured and, if they ended meanwhile, how they ended.
//!
//! Files in the replica's directory (each replaced atomically):
//! * `run.json` (agent → shim): command line, environment, cgroup, log limits.
//! * `shim.json` (shim → agent): the shim's and the server's process ids.
//! * `stop.json` (agent → shim): the grace period, written before SIGTERM.
//! * `exit.json` (shim → agent): how the server ended.
//!
//! The shim starts its own session (so a Ctrl-C in the agent's terminal
//! does not reach it) and the server in a process group of its own; on
//! SIGTERM it sends SIGTERM to that group and SIGKILL after the grace
//! period, and when the server exits it kills whatever is left in its group.
//! It tells the agent `started PID` or `failed REASON` on its stdout, once.
//! It holds an exclusive lock on `shim.lock` for its whole life, so the
//! agent never starts a second shim in a directory whose shim still runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_common::fsutil::{replace_atomic, write_atomic};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

use super::logs::RotatingWriter;
use super::procfs::ProcId;

/// The agent's instructions for one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunFile {
    /// The replica generation this run is of.
    pub generation: u64,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// The whole environment.
    pub env: BTreeMap<String, String>,
    /// The replica's cgroup, when limits are enforced.
    pub cgroup: Option<PathBuf>,
    /// Rotate the log at this size.
    pub log_max_bytes: u64,
    /// Rotated log files to keep.
    pub log_keep: u32,
}

/// Who runs: written by the shim once the server started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimFile {
    /// The shim.
    pub shim: ProcId,
    /// The model server (also its process group id).
    pub server: ProcId,
    /// When the server started, ms since the Unix epoch.
    pub started_at_ms: u64,
}

/// The grace period of a requested stop.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct StopFile {
    /// Milliseconds between SIGTERM and SIGKILL.
    pub grace_ms: u64,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitFile {
    /// The exit code, when the server exited.
    pub code: Option<i32>,
    /// The signal that ended it, when one did.
    pub signal: Option<i32>,
    /// Whether it ended because a stop was requested.
    pub stopped: bool,
    /// For people: "exited with code 1", "killed by signal 9 (SIGKILL)".
    pub reason: String,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
}

pub(crate) const RUN_FILE: &str = "run.json";
pub(crate) const SHIM_FILE: &str = "shim.json";
pub(crate) const STOP_FILE: &str = "stop.json";
pub(crate) const EXIT_FILE: &str = "exit.json";
pub(crate) const SHIM_LOG: &str = "shim.log";
pub(crate) const SHIM_LOCK: &str = "shim.lock";
/// The directory of the replica's output under its directory.
pub const LOGS_DIR: &str = "logs";
/// The grace period when a stop gives none.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// Reads a JSON file of the replica directory.
pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Replaces a JSON file of the replica directory atomically and durably.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    write_atomic(path, &bytes)
}

/// Replaces a JSON file atomically, not durably: for the files about one
/// run (`run.json`, `shim.json`, `stop.json`, `exit.json`), whose processes
/// a power loss ends anyway.
pub(crate) fn write_run_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    replace_atomic(path, &bytes)
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Describes how a process ended.
pub(crate) fn describe_exit(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => {
            let name = Signal::try_from(s).map(|s| s.as_str()).unwrap_or("unknown");
            format!("killed by signal {s} ({name})")
        }
        (None, None) => "ended for an unknown reason".into(),
    }
}

/// `berth-agent shim DIR`: runs one replica process to its end.
pub fn main(dir: &Path) -> ExitCode {
    // Leave the agent's session and process group: the shim must outlive
    // the agent and not get its terminal's signals.
    let _ = nix::unistd::setsid();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tell_agent(&format!("failed start the shim's runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(dir))
}

/// Tells the agent how the start went. The agent may be gone (its end of
/// the pipe closed): that is not an error here.
fn tell_agent(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Takes the directory's shim lock without waiting; None when another
/// process (a running shim) holds it.
pub(crate) fn try_lock(dir: &Path) -> Option<nix::fcntl::Flock<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(SHIM_LOCK))
        .ok()?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).ok()
}

fn fail(dir: &Path, reason: String) -> ExitCode {
    tell_agent(&format!("failed {reason}"));
    eprintln!("shim: {reason}");
    let _ = write_run_json(
        &dir.join(EXIT_FILE),
        &ExitFile {
            code: None,
            signal: None,
            stopped: false,
            reason,
            at_ms: now_ms(),
        },
    );
    ExitCode::FAILURE
}

async fn run(dir: &Path) -> ExitCode {
    let Some(_lock) = try_lock(dir) else {
        return fail(dir, format!("another shim still runs in {}", dir.display()));
    };
    // Installed before the server starts: a stop that comes at once still
    // gets its grace period.
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => return fail(dir, format!("install the SIGTERM handler: {e}")),
    };
    let Some(run) = read_json::<RunFile>(&dir.join(RUN_FILE)) else {
        return fail(dir, format!("cannot read {}", dir.join(RUN_FILE).display()));
    };
    let Some(program) = run.argv.first() else {
        return fail(dir, "the command line is empty".into());
    };
    if let Some(cg) = &run.cgroup
        && let Err(e) = std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string())
    {
        eprintln!(
            "shim: could not join cgroup {} ({e}): limits are not enforced for this run",
            cg.display()
        );
    }
    let writer = match RotatingWriter::open(&dir.join(LOGS_DIR), run.log_max_bytes, run.log_keep) {
        Ok(w) => Arc::new(Mutex::new(w)),
        Err(e) => return fail(dir, format!("open the log in {}: {e}", dir.display())),
    };
    let mut child = match Command::new(program)
        .args(&run.argv[1..])
        .env_clear()
        .envs(&run.env)
        .current_dir(dir)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return fail(dir, format!("start {program}: {e}")),
    };
    let Some(pid) = child.id() else {
        return fail(dir, "the model server exited at once".into());
    };
    let ids = ProcId::of(std::process::id()).zip(ProcId::of(pid));
    let Some((shim, server)) = ids else {
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        return fail(dir, "the model server exited at once".into());
    };
    let record = ShimFile {
        shim,
        server,
        started_at_ms: now_ms(),
    };
    if let Err(e) = write_run_json(&dir.join(SHIM_FILE), &record) {
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        return fail(dir, format!("write {SHIM_FILE}: {e}"));
    }
    tell_agent(&format!("started {pid}"));

    let mut copies = Vec::new();
    if let Some(out) = child.stdout.take() {
        copies.push(tokio::spawn(copy(out, writer.clone())));
    }
    if let Some(err) = child.stderr.take() {
        copies.push(tokio::spawn(copy(err, writer.clone())));
    }
    let group = Pid::from_raw(pid as i32);
    let (status, stopped) = tokio::select! {
        s = child.wait() => (s, false),
        _ = term.recv() => (stop(dir, &mut child, group).await, true),
    };
    // Whatever the server left in its group (workers) goes with it.
    super::procfs::kill_group(server);
    for c in copies {
        let _ = tokio::time::timeout(Duration::from_secs(2), c).await;
    }
    let (code, signal) = match &status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            (s.code(), s.signal())
        }
        Err(_) => (None, None),
    };
    let mut reason = describe_exit(code, signal);
    if stopped {
        reason = format!("stopped on request ({reason})");
    }
    let exit = ExitFile {
        code,
        signal,
        stopped,
        reason,
        at_ms: now_ms(),
    };
    if let Err(e) = write_run_json(&dir.join(EXIT_FILE), &exit) {
        eprintln!("shim: write {EXIT_FILE}: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// SIGTERM to the server's group, SIGKILL after the grace period.
async fn stop(
    dir: &Path,
    child: &mut Child,
    group: Pid,
) -> std::io::Result<std::process::ExitStatus> {
    let grace = read_json::<StopFile>(&dir.join(STOP_FILE))
        .map_or(DEFAULT_GRACE, |s| Duration::from_millis(s.grace_ms));
    let _ = killpg(group, Signal::SIGTERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            eprintln!("shim: the model server ignored SIGTERM for {grace:?}; sending SIGKILL");
            let _ = killpg(group, Signal::SIGKILL);
            child.wait().await
        }
    }
}

async fn copy(mut from: impl AsyncRead + Unpin, to: Arc<Mutex<RotatingWriter>>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Ok(mut w) = to.lock()
                    && let Err(e) = w.write(&buf[..n])
                {
                    eprintln!("shim: write the log: {e}");
                }
            }
        }
    }
}

/// A started shim, as the agent sees it.
pub struct Spawned {
    /// The shim process (the agent's child until the agent restarts).
    pub child: Child,
    /// The shim's and the server's ids.
    pub ids: ShimFile,
}

/// Starts `agent_exe shim DIR` (after `run.json` was written) and waits for
/// its answer: the server's pid, or why it could not start.
pub async fn spawn(agent_exe: &Path, dir: &Path) -> Result<Spawned, String> {
    if try_lock(dir).is_none() {
        return Err(format!(
            "a shim of an earlier run still runs in {}",
            dir.display()
        ));
    }
    for stale in [SHIM_FILE, EXIT_FILE, STOP_FILE] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(SHIM_LOG))
        .map_err(|e| format!("open {}: {e}", dir.join(SHIM_LOG).display()))?;
    let mut child = Command::new(agent_exe)
        .arg("shim")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("start the shim {}: {e}", agent_exe.display()))?;
    let Some(stdout) = child.stdout.take() else {
        return Err("the shim has no stdout".into());
    };
    let mut line = String::new();
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await;
    let line = line.trim();
    if let Some(reason) = line.strip_prefix("failed ") {
        let _ = child.wait().await;
        return Err(reason.to_string());
    }
    if read.is_err() || !line.starts_with("started ") {
        // The server may run already: never leave it without its shim.
        if let Some(ids) = read_json::<ShimFile>(&dir.join(SHIM_FILE)) {
            super::procfs::kill_group(ids.server);
        }
        let _ = child.start_kill();
        let _ = child.wait().await;
        return Err(format!(
            "the shim did not start the model server (said {line:?}); see {}",
            dir.join(SHIM_LOG).display()
        ));
    }
    let ids = read_json::<ShimFile>(&dir.join(SHIM_FILE))
        .ok_or_else(|| format!("the shim started but {SHIM_FILE} is unreadable"))?;
    Ok(Spawned { child, ids })
}
