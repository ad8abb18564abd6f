//! The Raft log, vote and committed index: durable on redb, with the live
//! part of the log also held in memory.
//!
//! Tables: `log` (index → postcard `Entry`) and `meta` (`vote`, `committed`,
//! `last_purged` → postcard values).
//!
//! Group commit: every change is queued, in order, to one writer thread,
//! which drains whatever is queued, writes it in one redb transaction
//! committed with immediate durability (fsync), and only then tells
//! openraft the I/O completed (`LogFlushed`) or wakes the waiting caller.
//! So an entry is never acknowledged before it is on disk, and a burst of
//! writes costs one fsync instead of one each. The in-memory copy is
//! updated when a change is queued, so reads see the order openraft asked
//! for; it holds the entries after the last purge, which the snapshot
//! policy bounds (`snapshot_every` + the entries kept behind a snapshot).
//!
//! A failed write is reported to everyone waiting on its batch, never
//! acknowledged; openraft then stops, and so does the member. The fault
//! suite injects such failures through `disk_faults` (`--test-disk-faults`).

// openraft's storage errors are large by its design; they are rare and not boxed there.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader, StorageIOError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::disk_faults::{DiskFaults, EIO, ENOSPC};
use super::{Entry, LogId, NodeId, StorageError, TypeConfig, Vote, decode, encode};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";
/// Logged when a truncation reaches the committed index (a Raft safety bug).
pub const TRUNCATED_COMMITTED: &str =
    "raft safety violated: truncating log entries at or below the committed index";
/// The most queued changes one transaction takes.
const MAX_BATCH: usize = 4096;

/// The in-memory view, updated in queue order.
#[derive(Default)]
struct Cache {
    entries: BTreeMap<u64, Entry>,
    last_purged: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
}

/// One change for the writer thread.
enum Op {
    Append {
        entries: Vec<(u64, Vec<u8>)>,
        callback: LogFlushed<TypeConfig>,
    },
    Truncate {
        from: u64,
        done: oneshot::Sender<Result<(), String>>,
    },
    Purge {
        upto: u64,
        last_purged: Vec<u8>,
        done: oneshot::Sender<Result<(), String>>,
    },
    Vote {
        value: Vec<u8>,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// A committed index waits in `Shared::committed` (sent when it starts
    /// waiting, so an idle writer knows to store it in time).
    CommittedWaiting,
    /// Tests: the writer holds its batch, and so every later change, until
    /// the paired sender is dropped.
    #[cfg(test)]
    Hold(Receiver<()>),
}

struct Shared {
    cache: Mutex<Cache>,
    tx: Mutex<Sender<Op>>,
    /// The newest committed index not yet handed to the writer, encoded.
    committed: Arc<Mutex<Option<Vec<u8>>>>,
}

/// The redb-backed log store. Cloning shares it.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
}

fn io_err(e: impl std::error::Error + 'static) -> openraft::AnyError {
    openraft::AnyError::new(&e)
}

fn write_err(e: impl std::error::Error + 'static) -> StorageIOError<NodeId> {
    StorageIOError::write_logs(io_err(e))
}

fn read_err(e: impl std::error::Error + 'static) -> StorageIOError<NodeId> {
    StorageIOError::read_logs(io_err(e))
}

fn read_meta<T: serde::de::DeserializeOwned>(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>, StorageIOError<NodeId>> {
    match meta.get(key).map_err(read_err)? {
        Some(v) => Ok(Some(decode(v.value()).map_err(read_err)?)),
        None => Ok(None),
    }
}

impl LogStore {
    /// Opens (or creates) the log database at `path`, loads the live log
    /// into memory and starts the writer thread.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        Self::start(Database::create(path).map_err(write_err)?)
    }

    /// The fault suite only (`--test-disk-faults`): as [`Self::open`], but
    /// the file goes through [`DiskFaults`], which injects the fault named
    /// in `control` (see `disk_faults`).
    pub fn open_with_disk_faults(path: &Path, control: &Path) -> Result<Self, StorageError> {
        Self::open_on(DiskFaults::open(path, control).map_err(write_err)?)
    }

    /// Opens the log database on a fault-injecting backend the caller keeps
    /// a handle to (the tests crash it).
    pub(crate) fn open_on(backend: DiskFaults) -> Result<Self, StorageError> {
        let db = Database::builder()
            .create_with_backend(backend)
            .map_err(write_err)?;
        Self::start(db)
    }

    fn start(db: Database) -> Result<Self, StorageError> {
        let tx = db.begin_write().map_err(write_err)?;
        tx.open_table(LOG).map_err(write_err)?;
        tx.open_table(META).map_err(write_err)?;
        tx.commit().map_err(write_err)?;

        let mut cache = Cache::default();
        {
            let rtx = db.begin_read().map_err(read_err)?;
            let meta = rtx.open_table(META).map_err(read_err)?;
            // A restarted member never resumes leading the term it led
            // before: openraft would restart it as leader of that term on
            // a committed vote of its own, and a leader replicates entries
            // before its own flush completes (third_party/README.md), so
            // entries it sent but lost in the crash would be written again
            // with other contents under the same log ids, which followers
            // take for matching: the members diverge (the fault suite found
            // this). Uncommitted, the vote still holds its term and whom it
            // voted for, and the member comes back as a follower.
            cache.vote = read_meta::<Vote>(&meta, VOTE)?.map(|v| Vote {
                committed: false,
                ..v
            });
            cache.committed = read_meta::<Option<LogId>>(&meta, COMMITTED)?.flatten();
            cache.last_purged = read_meta(&meta, LAST_PURGED)?;
            let log = rtx.open_table(LOG).map_err(read_err)?;
            for item in log.iter().map_err(read_err)? {
                let (k, v) = item.map_err(read_err)?;
                let entry: Entry = decode(v.value()).map_err(read_err)?;
                cache.entries.insert(k.value(), entry);
            }
        }

        // The thread owns the database; it exits (closing it) once every
        // clone of this store is dropped.
        let (tx, rx) = channel();
        let committed = Arc::new(Mutex::new(None));
        let slot = committed.clone();
        std::thread::Builder::new()
            .name("berth-raft-log".into())
            .spawn(move || writer(&db, &rx, &slot))
            .map_err(write_err)?;
        Ok(Self {
            shared: Arc::new(Shared {
                cache: Mutex::new(cache),
                tx: Mutex::new(tx),
                committed,
            }),
        })
    }

    /// Whether this log has ever taken part in a cluster (a vote or an entry).
    pub fn has_state(&self) -> bool {
        let c = self.cache();
        c.vote.is_some() || c.last_purged.is_some() || !c.entries.is_empty()
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        // Every critical section is a few map operations that cannot panic
        // midway, so a poisoned lock still holds a consistent cache.
        self.shared
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn send(&self, op: Op) -> Result<(), StorageIOError<NodeId>> {
        self.shared
            .tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send(op)
            .map_err(|_| write_err(std::io::Error::other("raft log writer thread has stopped")))
    }

    /// Tests: nothing reaches the disk (and no append is reported flushed)
    /// until the returned sender is dropped; reads still see every change.
    #[cfg(test)]
    pub fn hold_writes(&self) -> Sender<()> {
        let (release, held) = channel();
        self.send(Op::Hold(held)).expect("log writer thread runs");
        release
    }

    async fn wait(done: oneshot::Receiver<Result<(), String>>) -> Result<(), StorageError> {
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(write_err(std::io::Error::other(e)).into()),
            Err(_) => {
                Err(write_err(std::io::Error::other("raft log writer thread has stopped")).into())
            }
        }
    }
}

/// How long a committed-index update may wait for a durable write to
/// travel with.
const COMMITTED_LINGER: Duration = Duration::from_millis(100);

/// The writer thread: one transaction and one fsync per drained batch.
///
/// Committed-index updates do not need durability. They wait in `committed`
/// (not the queue, so they do not wake this thread on every commit) and
/// ride along with a durable batch at most once per `COMMITTED_LINGER`, or
/// are written alone after `COMMITTED_LINGER` of quiet. Writing the index
/// with every batch would add the `meta` table's pages to each commit; a
/// stale stored index only means a restarted member re-applies less from
/// its log and learns the rest from the leader.
fn writer(db: &Database, rx: &Receiver<Op>, committed: &Mutex<Option<Vec<u8>>>) {
    let mut committed_written = Instant::now();
    loop {
        let first = if lock(committed).is_some() {
            let wait = COMMITTED_LINGER.saturating_sub(committed_written.elapsed());
            match rx.recv_timeout(wait) {
                Ok(op) => Some(op),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match rx.recv() {
                Ok(op) => Some(op),
                Err(_) => return,
            }
        };
        // Taken before the queue is drained: the entries a committed index
        // covers were queued before it was set, so they are in this batch or
        // an earlier one, and the stored index never runs ahead of the log.
        let mut index = if committed_written.elapsed() >= COMMITTED_LINGER {
            lock(committed).take()
        } else {
            None
        };
        let mut batch: Vec<Op> = first.into_iter().collect();
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        if batch.len() == MAX_BATCH
            && let Some(value) = index.take()
        {
            // Entries it covers may still be queued: keep it for a later batch
            // (unless a newer index has arrived meanwhile).
            lock(committed).get_or_insert(value);
        }
        batch.retain(|op| !matches!(op, Op::CommittedWaiting));
        #[cfg(test)]
        hold_while_asked(&mut batch);
        if batch.is_empty() && index.is_none() {
            continue;
        }
        if index.is_some() {
            committed_written = Instant::now();
        }
        let result = write_batch(db, &batch, index.as_deref());
        finish(batch, result);
    }
}

/// Locks the committed-index slot. Its critical sections only move a value
/// in or out, so a poisoned lock still holds a consistent value.
fn lock(slot: &Mutex<Option<Vec<u8>>>) -> MutexGuard<'_, Option<Vec<u8>>> {
    slot.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Tests: blocks while any `Op::Hold` of the batch is held, then drops them.
#[cfg(test)]
fn hold_while_asked(batch: &mut Vec<Op>) {
    batch.retain(|op| match op {
        Op::Hold(release) => {
            // Returns once the test drops its sender.
            let _ = release.recv();
            false
        }
        _ => true,
    });
}

/// What a failed write means, for the person who reads the log and for
/// the error openraft stops with.
fn describe(e: &redb::Error) -> String {
    match e {
        redb::Error::Io(io) if io.raw_os_error() == Some(ENOSPC) => format!(
            "disk full (no space left on device): the raft log cannot grow; free space on the data dir's disk and restart this member: {e}"
        ),
        redb::Error::Io(io) if io.raw_os_error() == Some(EIO) => format!(
            "disk I/O error (EIO) on the raft log; check the disk and restart this member: {e}"
        ),
        redb::Error::PreviousIo => format!(
            "an earlier raft log write failed, and redb refuses writes until this member restarts: {e}"
        ),
        _ => format!("raft log write failed: {e}"),
    }
}

/// Reports a batch's result to everyone waiting on it.
fn finish(batch: Vec<Op>, result: Result<(), redb::Error>) {
    let result = result.map_err(|e| describe(&e));
    if let Err(e) = &result {
        // Nothing of the batch is acknowledged; openraft stops on the error
        // and the member process exits (`server`).
        tracing::error!(error = %e, "raft log write failed; this member will stop");
    }
    for op in batch {
        match op {
            Op::Append { callback, .. } => {
                callback.log_io_completed(result.clone().map_err(std::io::Error::other))
            }
            Op::Truncate { done, .. } | Op::Purge { done, .. } | Op::Vote { done, .. } => {
                let _ = done.send(result.clone());
            }
            Op::CommittedWaiting => {}
            #[cfg(test)]
            Op::Hold(_) => {}
        }
    }
}

/// Writes `batch`, plus the committed index if given, in one transaction:
/// durable (fsync) unless the committed index is all there is to write.
fn write_batch(db: &Database, batch: &[Op], committed: Option<&[u8]>) -> Result<(), redb::Error> {
    let mut tx = db.begin_write()?;
    if batch.is_empty() {
        // Only the committed index: the next durable commit persists it.
        tx.set_durability(Durability::None)?;
    }
    {
        let mut log = tx.open_table(LOG)?;
        // `meta` is opened only when written to: most batches are appends alone.
        let mut meta: Vec<(&str, &[u8])> = Vec::new();
        for op in batch {
            match op {
                Op::Append { entries, .. } => {
                    for (index, bytes) in entries {
                        log.insert(*index, bytes.as_slice())?;
                    }
                }
                Op::Truncate { from, .. } => {
                    log.retain_in::<u64, _>(*from.., |_, _| false)?;
                }
                Op::Purge {
                    upto, last_purged, ..
                } => {
                    meta.push((LAST_PURGED, last_purged));
                    log.retain_in::<u64, _>(..=*upto, |_, _| false)?;
                }
                Op::Vote { value, .. } => {
                    meta.push((VOTE, value));
                }
                Op::CommittedWaiting => {}
                #[cfg(test)]
                Op::Hold(_) => {}
            }
        }
        meta.extend(committed.map(|value| (COMMITTED, value)));
        if !meta.is_empty() {
            let mut table = tx.open_table(META)?;
            for (key, value) in meta {
                table.insert(key, value)?;
            }
        }
    }
    // Immediate durability (the default unless set above): commit returns after fsync.
    tx.commit()?;
    Ok(())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let c = self.cache();
        Ok(c.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let c = self.cache();
        let last = c
            .entries
            .last_key_value()
            .map(|(_, e)| e.log_id)
            .or(c.last_purged);
        Ok(LogState {
            last_purged_log_id: c.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let value = encode(vote).map_err(write_err)?;
        let (done, wait) = oneshot::channel();
        self.cache().vote = Some(*vote);
        self.send(Op::Vote { value, done })?;
        Self::wait(wait).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.cache().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not waited for: the committed index only spares re-applying after a
        // restart. The writer stores it at most every `COMMITTED_LINGER`,
        // never ahead of the stored log (see `writer`).
        let value = encode(&committed).map_err(write_err)?;
        self.cache().committed = committed;
        let was_waiting = lock(&self.shared.committed).replace(value).is_some();
        if !was_waiting {
            self.send(Op::CommittedWaiting)?;
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.cache().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        let mut cache = self.cache();
        for e in entries {
            encoded.push((e.log_id.index, encode(&e).map_err(write_err)?));
            cache.entries.insert(e.log_id.index, e);
        }
        // Queue while holding the cache lock so queue order = cache order.
        let sent = self.send(Op::Append {
            entries: encoded,
            callback,
        });
        drop(cache);
        sent.map_err(Into::into)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let (done, wait) = oneshot::channel();
        {
            let mut cache = self.cache();
            // Raft never removes a committed entry: if this happens, members
            // will diverge. Said loudly, so the fault suite's log check fails.
            if let Some(committed) = cache.committed.filter(|c| c.index >= log_id.index) {
                tracing::error!(from = %log_id, %committed, "{TRUNCATED_COMMITTED}");
            }
            cache.entries.split_off(&log_id.index);
            self.send(Op::Truncate {
                from: log_id.index,
                done,
            })?;
        }
        Self::wait(wait).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let last_purged = encode(&log_id).map_err(write_err)?;
        let (done, wait) = oneshot::channel();
        {
            let mut cache = self.cache();
            cache.entries = cache.entries.split_off(&(log_id.index + 1));
            cache.last_purged = Some(log_id);
            self.send(Op::Purge {
                upto: log_id.index,
                last_purged,
                done,
            })?;
        }
        Self::wait(wait).await
    }
}
