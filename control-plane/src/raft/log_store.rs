//! The Raft log, vote and committed index on redb.
//!
//! Tables: `log` (index → postcard `Entry`) and `meta` (`vote`, `committed`,
//! `last_purged` → postcard values). Every write is its own redb transaction
//! committed with immediate durability (fsync) before openraft is told the
//! I/O completed, so an acknowledged entry survives a crash. redb is
//! synchronous, so every call runs on the blocking thread pool; openraft
//! calls the store sequentially, so order is kept.

// openraft's storage errors are large by its design; they are rare and not boxed there.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader, StorageIOError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Entry, LogId, NodeId, StorageError, TypeConfig, Vote, decode, encode};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// The redb-backed log store. Cloning shares the database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

type IoResult<T> = Result<T, StorageIOError<NodeId>>;

fn io_err(e: impl std::error::Error + 'static) -> openraft::AnyError {
    openraft::AnyError::new(&e)
}

fn write_err(e: impl std::error::Error + 'static) -> StorageIOError<NodeId> {
    StorageIOError::write_logs(io_err(e))
}

fn read_err(e: impl std::error::Error + 'static) -> StorageIOError<NodeId> {
    StorageIOError::read_logs(io_err(e))
}

impl LogStore {
    /// Opens (or creates) the log database at `path`.
    pub fn open(path: &Path) -> Result<Self, redb::Error> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(LOG)?;
        tx.open_table(META)?;
        tx.commit()?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Whether this log has ever taken part in a cluster (a vote or an entry).
    pub fn has_state(&self) -> Result<bool, redb::Error> {
        let tx = self.db.begin_read()?;
        let meta = tx.open_table(META)?;
        let log = tx.open_table(LOG)?;
        Ok(meta.get(VOTE)?.is_some() || meta.get(LAST_PURGED)?.is_some() || log.last()?.is_some())
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> IoResult<T> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StorageIOError::write(io_err(e)))?
            .map_err(StorageError::from)
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        db: &Database,
        key: &str,
        err: fn(openraft::AnyError) -> StorageIOError<NodeId>,
    ) -> IoResult<Option<T>> {
        let tx = db.begin_read().map_err(|e| err(io_err(e)))?;
        let t = tx.open_table(META).map_err(|e| err(io_err(e)))?;
        match t.get(key).map_err(|e| err(io_err(e)))? {
            Some(v) => Ok(Some(decode(v.value()).map_err(|e| err(io_err(e)))?)),
            None => Ok(None),
        }
    }

    fn write_meta<T: serde::Serialize>(
        db: &Database,
        key: &str,
        value: &T,
        err: fn(openraft::AnyError) -> StorageIOError<NodeId>,
    ) -> IoResult<()> {
        Self::write_meta_with(db, key, value, err, Durability::Immediate)
    }

    fn write_meta_with<T: serde::Serialize>(
        db: &Database,
        key: &str,
        value: &T,
        err: fn(openraft::AnyError) -> StorageIOError<NodeId>,
        durability: Durability,
    ) -> IoResult<()> {
        let bytes = encode(value).map_err(|e| err(io_err(e)))?;
        let mut tx = db.begin_write().map_err(|e| err(io_err(e)))?;
        tx.set_durability(durability).map_err(|e| err(io_err(e)))?;
        {
            let mut t = tx.open_table(META).map_err(|e| err(io_err(e)))?;
            t.insert(key, bytes.as_slice())
                .map_err(|e| err(io_err(e)))?;
        }
        tx.commit().map_err(|e| err(io_err(e)))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(read_err)?;
            let t = tx.open_table(LOG).map_err(read_err)?;
            let iter = t.range::<u64>((start, end)).map_err(read_err)?;
            let mut out = Vec::new();
            for item in iter {
                let (_, v) = item.map_err(read_err)?;
                out.push(decode(v.value()).map_err(read_err)?);
            }
            Ok(out)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.blocking(|db| {
            let last_purged: Option<LogId> =
                Self::read_meta(db, LAST_PURGED, StorageIOError::read_logs)?;
            let tx = db.begin_read().map_err(read_err)?;
            let t = tx.open_table(LOG).map_err(read_err)?;
            let last = match t.last().map_err(read_err)? {
                Some((_, v)) => {
                    let e: Entry = decode(v.value()).map_err(read_err)?;
                    Some(e.log_id)
                }
                None => last_purged,
            };
            Ok(LogState {
                last_purged_log_id: last_purged,
                last_log_id: last,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        self.blocking(move |db| Self::write_meta(db, VOTE, &vote, StorageIOError::write_vote))
            .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.blocking(|db| Self::read_meta(db, VOTE, StorageIOError::read_vote))
            .await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not fsynced: the committed index only spares re-applying after a
        // restart, and the next append's durable commit persists it too.
        self.blocking(move |db| {
            Self::write_meta_with(
                db,
                COMMITTED,
                &committed,
                StorageIOError::write_logs,
                Durability::None,
            )
        })
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.blocking(|db| {
            Ok(
                Self::read_meta::<Option<LogId>>(db, COMMITTED, StorageIOError::read_logs)?
                    .flatten(),
            )
        })
        .await
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
        for e in entries {
            let bytes = encode(&e).map_err(write_err)?;
            encoded.push((e.log_id.index, bytes));
        }
        let result = self
            .blocking(move |db| {
                let tx = db.begin_write().map_err(write_err)?;
                {
                    let mut t = tx.open_table(LOG).map_err(write_err)?;
                    for (index, bytes) in &encoded {
                        t.insert(*index, bytes.as_slice()).map_err(write_err)?;
                    }
                }
                // Immediate durability is redb's default: commit returns after fsync.
                tx.commit().map_err(write_err)
            })
            .await;
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(write_err)?;
            {
                let mut t = tx.open_table(LOG).map_err(write_err)?;
                t.retain_in::<u64, _>(log_id.index.., |_, _| false)
                    .map_err(write_err)?;
            }
            tx.commit().map_err(write_err)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.blocking(move |db| {
            let bytes = encode(&log_id).map_err(write_err)?;
            let tx = db.begin_write().map_err(write_err)?;
            {
                let mut meta = tx.open_table(META).map_err(write_err)?;
                meta.insert(LAST_PURGED, bytes.as_slice())
                    .map_err(write_err)?;
                let mut t = tx.open_table(LOG).map_err(write_err)?;
                t.retain_in::<u64, _>(..=log_id.index, |_, _| false)
                    .map_err(write_err)?;
            }
            tx.commit().map_err(write_err)
        })
        .await
    }
}
