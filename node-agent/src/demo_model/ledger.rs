//! The demo model's GPU ledger (`--gpu-ledger DIR`): evidence for
//! fault-injection suites that no GPU is ever held by two replicas at once,
//! and that replicas do not restart unexpectedly.
//!
//! At start, a demo process takes an exclusive, non-blocking `flock` on
//! `DIR/<uuid>.lock` for each GPU the agent gave it (`BERTH_GPU_UUIDS`) and
//! keeps it for its whole life; then it appends one `start` line per GPU to
//! `DIR/ledger.jsonl`, saying whether it got the lock. `locked: false` means
//! another live process held that GPU: a double booking, recorded and
//! survived (the suite's checker judges). A graceful exit appends one `stop`
//! line per GPU *before* the locks are released, so on each GPU a `start`
//! with `locked: true` always follows the previous holder's `stop`. A killed
//! process writes no `stop` line; the kernel releases its locks.
//!
//! Invariants: each line is written by one `write` on a file opened with
//! `O_APPEND`, so lines from concurrent processes never interleave (a reader
//! racing a writer may see a torn last line, which `read_ledger` skips).
//! Lock files are never deleted: deleting one would let two processes lock
//! two different files of the same name. Simulated GPU uuids are unique
//! cluster-wide, so one DIR may be shared by every node.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// The ledger's file name inside `--gpu-ledger DIR`.
pub const LEDGER_FILE: &str = "ledger.jsonl";

/// What a ledger line records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerEvent {
    /// The process started and tried to lock the GPU.
    Start,
    /// The process exited gracefully (written before its lock is released).
    Stop,
}

/// One line of `ledger.jsonl`: one process, one GPU, one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuLedgerLine {
    /// Start or stop.
    pub event: LedgerEvent,
    /// `BERTH_REPLICA_ID` (empty when not started by an agent).
    pub replica: String,
    /// `BERTH_GENERATION` (0 when not started by an agent).
    pub generation: u64,
    /// `BERTH_NODE` (empty when not started by an agent).
    pub node: String,
    /// The GPU's uuid, from `BERTH_GPU_UUIDS`.
    pub gpu: String,
    /// The demo process's id.
    pub pid: u32,
    /// When the line was written, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// Whether this process holds the GPU's lock; false: another live
    /// process held it at start (a double booking). A stop line repeats
    /// its start line's value.
    pub locked: bool,
}

/// Why the ledger cannot be used or read.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// DIR cannot be created.
    #[error(
        "--gpu-ledger {path}: cannot create the directory: {error} (give a writable directory)"
    )]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// A file in DIR cannot be opened for writing.
    #[error("--gpu-ledger: cannot open {path} for writing: {error} (give a writable directory)")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// `flock` failed for another reason than a lock held elsewhere.
    #[error("--gpu-ledger: cannot lock {path}: {error} (the file system must support flock)")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        error: Errno,
    },
    /// A line could not be appended whole.
    #[error("--gpu-ledger: cannot append to {path}: {error}")]
    Append {
        /// The ledger file.
        path: PathBuf,
        /// The OS error, or the short write.
        error: std::io::Error,
    },
    /// A GPU uuid that cannot name a file in DIR.
    #[error(
        "--gpu-ledger: BERTH_GPU_UUIDS holds {uuid:?}, which cannot name a lock file (a uuid has no '/' and does not start with '.')"
    )]
    BadUuid {
        /// The uuid.
        uuid: String,
    },
    /// `BERTH_GENERATION` is not a number.
    #[error("--gpu-ledger: BERTH_GENERATION {value:?} is not a generation number")]
    BadGeneration {
        /// The value.
        value: String,
    },
    /// The ledger cannot be read.
    #[error("read the GPU ledger {path}: {error}")]
    Read {
        /// The ledger file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// A complete line of the ledger is not a ledger line.
    #[error("read the GPU ledger {path}: line {line} is not a ledger line: {error}")]
    Parse {
        /// The ledger file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// What is wrong with it.
        error: serde_json::Error,
    },
}

/// Who this process is, as the agent told it in its environment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplicaIdentity {
    /// `BERTH_REPLICA_ID` (empty when unset).
    pub replica: String,
    /// `BERTH_GENERATION` (0 when unset).
    pub generation: u64,
    /// `BERTH_NODE` (empty when unset).
    pub node: String,
    /// `BERTH_GPU_UUIDS`, split on commas (none for a CPU-only replica).
    pub gpus: Vec<String>,
}

impl ReplicaIdentity {
    /// Reads the identity from this process's environment.
    pub fn from_env() -> Result<Self, LedgerError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the identity from `lookup` (an environment).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, LedgerError> {
        let generation = match lookup("BERTH_GENERATION") {
            None => 0,
            Some(v) if v.trim().is_empty() => 0,
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| LedgerError::BadGeneration { value: v.clone() })?,
        };
        let gpus = lookup("BERTH_GPU_UUIDS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect::<Vec<_>>();
        if let Some(uuid) = gpus
            .iter()
            .find(|u| u.contains('/') || u.starts_with('.') || u.contains('\0'))
        {
            return Err(LedgerError::BadUuid { uuid: uuid.clone() });
        }
        Ok(Self {
            replica: lookup("BERTH_REPLICA_ID").unwrap_or_default(),
            generation,
            node: lookup("BERTH_NODE").unwrap_or_default(),
            gpus,
        })
    }
}

/// One GPU as this process recorded it.
struct Held {
    /// Its start line (the stop line copies it).
    line: GpuLedgerLine,
    /// The lock, held until dropped; `None` when another process held it.
    _lock: Option<Flock<File>>,
}

/// A process's place in the ledger: the locks it holds and the open
/// ledger file. Dropping it releases the locks without a `stop` line (as a
/// crash would); `stop` is the graceful way out.
pub struct Ledger {
    path: PathBuf,
    file: File,
    held: Vec<Held>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.path)
            .field(
                "held",
                &self.held.iter().map(|h| &h.line).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Ledger {
    /// Creates `dir` if needed, locks each of `who`'s GPUs and appends one
    /// `start` line per GPU. A GPU locked by another process is recorded
    /// with `locked: false`, not refused.
    pub fn start(dir: &Path, who: &ReplicaIdentity) -> Result<Self, LedgerError> {
        std::fs::create_dir_all(dir).map_err(|error| LedgerError::CreateDir {
            path: dir.to_path_buf(),
            error,
        })?;
        let path = dir.join(LEDGER_FILE);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|error| LedgerError::Open {
                path: path.clone(),
                error,
            })?;
        let mut ledger = Self {
            path,
            file,
            held: Vec::with_capacity(who.gpus.len()),
        };
        for gpu in &who.gpus {
            let lock = match lock(&dir.join(format!("{gpu}.lock"))) {
                Ok(lock) => lock,
                Err(e) => {
                    // An exit, not a crash: close the lines already written.
                    // The error that ends the process is the lock's, so a
                    // failure to write these lines is secondary.
                    let _ = ledger.stop();
                    return Err(e);
                }
            };
            let line = GpuLedgerLine {
                event: LedgerEvent::Start,
                replica: who.replica.clone(),
                generation: who.generation,
                node: who.node.clone(),
                gpu: gpu.clone(),
                pid: std::process::id(),
                unix_ms: unix_ms(),
                locked: lock.is_some(),
            };
            // Locked before its line is written, so the line never claims
            // a GPU this process does not hold yet.
            ledger.append(&line)?;
            ledger.held.push(Held { line, _lock: lock });
        }
        Ok(ledger)
    }

    /// The lines this process wrote at start, one per GPU.
    pub fn started(&self) -> impl Iterator<Item = &GpuLedgerLine> {
        self.held.iter().map(|h| &h.line)
    }

    /// Appends one `stop` line per GPU, then releases the locks.
    pub fn stop(self) -> Result<(), LedgerError> {
        for held in &self.held {
            let line = GpuLedgerLine {
                event: LedgerEvent::Stop,
                unix_ms: unix_ms(),
                ..held.line.clone()
            };
            self.append(&line)?;
        }
        // Dropping `self` now releases the locks, after the stop lines.
        Ok(())
    }

    /// Appends `line` with a single `write` (`O_APPEND`: never interleaved).
    fn append(&self, line: &GpuLedgerLine) -> Result<(), LedgerError> {
        let mut buf =
            serde_json::to_vec(line).expect("a struct of strings, numbers and bools serializes");
        buf.push(b'\n');
        let written = (&self.file)
            .write(&buf)
            .map_err(|error| LedgerError::Append {
                path: self.path.clone(),
                error,
            })?;
        if written != buf.len() {
            return Err(LedgerError::Append {
                path: self.path.clone(),
                error: std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    format!("short write: {written} of {} bytes", buf.len()),
                ),
            });
        }
        Ok(())
    }
}

/// Takes an exclusive lock on `path` without waiting; `None` when another
/// open file (another process) holds it.
fn lock(path: &Path) -> Result<Option<Flock<File>>, LedgerError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|error| LedgerError::Open {
            path: path.to_path_buf(),
            error,
        })?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, error)) => Err(LedgerError::Lock {
            path: path.to_path_buf(),
            error,
        }),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
}

/// Reads a ledger file (`DIR/ledger.jsonl`). An unterminated last line that
/// does not parse is a write still in flight and is skipped; any other line
/// that does not parse is an error naming it.
pub fn read_ledger(path: &Path) -> Result<Vec<GpuLedgerLine>, LedgerError> {
    let text = std::fs::read_to_string(path).map_err(|error| LedgerError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    parse_ledger(&text).map_err(|(line, error)| LedgerError::Parse {
        path: path.to_path_buf(),
        line,
        error,
    })
}

/// Parses a ledger's text; on error, the line number (from 1) and why.
fn parse_ledger(text: &str) -> Result<Vec<GpuLedgerLine>, (usize, serde_json::Error)> {
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(l) => out.push(l),
            Err(_) if i + 1 == lines.len() && !complete => {}
            Err(e) => return Err((i + 1, e)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(replica: &str, gpus: &[&str]) -> ReplicaIdentity {
        ReplicaIdentity {
            replica: replica.into(),
            generation: 3,
            node: "n1".into(),
            gpus: gpus.iter().map(|g| g.to_string()).collect(),
        }
    }

    #[test]
    fn a_line_round_trips_in_the_documented_shape() {
        let line = GpuLedgerLine {
            event: LedgerEvent::Start,
            replica: "r1".into(),
            generation: 2,
            node: "n1".into(),
            gpu: "GPU-simulated-n1-0".into(),
            pid: 42,
            unix_ms: 1_700_000_000_000,
            locked: false,
        };
        let text = serde_json::to_string(&line).unwrap();
        assert_eq!(
            text,
            r#"{"event":"start","replica":"r1","generation":2,"node":"n1","gpu":"GPU-simulated-n1-0","pid":42,"unix_ms":1700000000000,"locked":false}"#
        );
        assert_eq!(serde_json::from_str::<GpuLedgerLine>(&text).unwrap(), line);
        let stop = text.replace("\"start\"", "\"stop\"");
        assert_eq!(
            serde_json::from_str::<GpuLedgerLine>(&stop).unwrap().event,
            LedgerEvent::Stop
        );
    }

    #[test]
    fn reading_skips_only_a_torn_last_line() {
        let a = r#"{"event":"start","replica":"a","generation":1,"node":"n","gpu":"GPU-x","pid":1,"unix_ms":5,"locked":true}"#;
        let lines = parse_ledger(&format!("{a}\n{a}\n{}", &a[..30])).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].replica, "a");
        // A whole last line that only lacks its newline still counts.
        assert_eq!(parse_ledger(&format!("{a}\n{a}")).unwrap().len(), 2);
        assert_eq!(parse_ledger("").unwrap(), vec![]);
        // A torn line followed by others is corruption, not a write in flight.
        let (line, _) = parse_ledger(&format!("{a}\n{}\n{a}\n", &a[..30])).unwrap_err();
        assert_eq!(line, 2);
    }

    #[test]
    fn identity_comes_from_the_agents_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let id = ReplicaIdentity::from_lookup(env(&[
            ("BERTH_REPLICA_ID", "r1"),
            ("BERTH_GENERATION", "7"),
            ("BERTH_NODE", "n1"),
            ("BERTH_GPU_UUIDS", "GPU-a,GPU-b"),
        ]))
        .unwrap();
        assert_eq!(id.replica, "r1");
        assert_eq!(id.generation, 7);
        assert_eq!(id.gpus, ["GPU-a", "GPU-b"]);
        let cpu_only = ReplicaIdentity::from_lookup(env(&[("BERTH_GPU_UUIDS", "")])).unwrap();
        assert_eq!(cpu_only, ReplicaIdentity::default());
        let e = ReplicaIdentity::from_lookup(env(&[("BERTH_GPU_UUIDS", "../etc")])).unwrap_err();
        assert!(e.to_string().contains("\"../etc\""), "{e}");
        let e = ReplicaIdentity::from_lookup(env(&[("BERTH_GENERATION", "x")])).unwrap_err();
        assert!(e.to_string().contains("BERTH_GENERATION"), "{e}");
    }

    #[test]
    fn a_second_holder_is_recorded_as_unlocked_and_stop_lines_follow() {
        let dir = tempfile::tempdir().unwrap();
        let ledger_dir = dir.path().join("ledger");
        // flock locks belong to an open file, so two opens in one process
        // conflict as two processes would.
        let first = Ledger::start(&ledger_dir, &who("a", &["GPU-x"])).unwrap();
        let second = Ledger::start(&ledger_dir, &who("b", &["GPU-x", "GPU-y"])).unwrap();
        let started: Vec<_> = second
            .started()
            .map(|l| (l.gpu.clone(), l.locked))
            .collect();
        assert_eq!(started, [("GPU-x".into(), false), ("GPU-y".into(), true)]);
        first.stop().unwrap();
        second.stop().unwrap();
        // Released by the stops: a third process gets the lock.
        let third = Ledger::start(&ledger_dir, &who("c", &["GPU-x"])).unwrap();
        assert!(third.started().all(|l| l.locked));
        drop(third);

        let lines = read_ledger(&ledger_dir.join(LEDGER_FILE)).unwrap();
        let seen: Vec<_> = lines
            .iter()
            .map(|l| (l.event, l.replica.as_str(), l.gpu.as_str(), l.locked))
            .collect();
        use LedgerEvent::{Start, Stop};
        assert_eq!(
            seen,
            [
                (Start, "a", "GPU-x", true),
                (Start, "b", "GPU-x", false),
                (Start, "b", "GPU-y", true),
                (Stop, "a", "GPU-x", true),
                (Stop, "b", "GPU-x", false),
                (Stop, "b", "GPU-y", true),
                (Start, "c", "GPU-x", true),
            ]
        );
        assert!(
            lines
                .iter()
                .all(|l| l.pid == std::process::id() && l.node == "n1" && l.generation == 3)
        );
    }

    #[test]
    fn an_unusable_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        let bad = file.join("ledger");
        let e = Ledger::start(&bad, &who("a", &["GPU-x"])).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("--gpu-ledger "), "{text}");
        assert!(text.contains(&bad.display().to_string()), "{text}");
        assert!(text.contains("Not a directory"), "{text}");
    }
}
