//! The state machine store: `ClusterState` in memory, applied by the pure
//! `state::apply`, with snapshots written atomically to one file.
//!
//! Snapshot file format (also the bytes sent to a lagging follower):
//! `b"BERTHSNP"`, a little-endian `u32` format version, then the postcard
//! encoding of `SnapshotBody`. Version 2 added nodes, deployments and
//! replicas, version 3 the security ledger (tokens, issued certificates);
//! versions 1 (models only) and 2 are still read and converted. A reader refuses versions it does not know.
//! After a restart the snapshot is loaded and openraft re-applies the log
//! from there up to the committed index (saved by the log store).

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use berth_common::fsutil::write_atomic;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};

use super::{
    Entry, LogId, NodeId, Response, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
    decode, encode,
};
use crate::events::EventLog;
use crate::state::legacy::{
    ClusterStateV1, ClusterStateV2, ClusterStateV3, ClusterStateV4, ClusterStateV5, ClusterStateV6,
};
use crate::state::{self, ClusterState, Outcome};

/// First bytes of every snapshot.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"BERTHSNP";
/// The snapshot format this build writes (it also reads every earlier one).
pub const SNAPSHOT_FORMAT_VERSION: u32 = 7;
const SNAPSHOT_FILE: &str = "snapshot.bin";

/// What a snapshot holds after its header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotBody {
    /// Last log id included, membership, snapshot id.
    pub meta: SnapshotMeta,
    /// The state as of `meta.last_log_id`.
    pub state: ClusterState,
}

/// Format 1 of the body: a state without nodes.
#[derive(Debug, Clone, Deserialize)]
struct SnapshotBodyV1 {
    meta: SnapshotMeta,
    state: ClusterStateV1,
}

/// Format 2 of the body: a state without the security ledger.
#[derive(Debug, Clone, Deserialize)]
struct SnapshotBodyV2 {
    meta: SnapshotMeta,
    state: ClusterStateV2,
}

/// Format 3 of the body: a state without deployment aliases.
#[derive(Debug, Clone, Deserialize)]
struct SnapshotBodyV3 {
    meta: SnapshotMeta,
    state: ClusterStateV3,
}

/// Format 4 of the body: a state without autoscaling or load times.
#[derive(Debug, Clone, Deserialize)]
struct SnapshotBodyV4 {
    meta: SnapshotMeta,
    state: ClusterStateV4,
}

/// Format 6 of the body: a state without GPU quarantines.
#[derive(Debug, Clone, Deserialize)]
struct SnapshotBodyV6 {
    meta: SnapshotMeta,
    state: ClusterStateV6,
}

/// Format 5 of the body: a state without retired replica ordinals.
#[derive(Debug, Clone, Deserialize)]
struct SnapshotBodyV5 {
    meta: SnapshotMeta,
    state: ClusterStateV5,
}

/// Why a snapshot could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Not a Berth snapshot at all.
    #[error("not a berth snapshot (bad magic bytes)")]
    BadMagic,
    /// Written by a newer (or unknown) format.
    #[error(
        "snapshot format version {0} is unknown: this build reads versions 1 to {SNAPSHOT_FORMAT_VERSION}; upgrade berth-control"
    )]
    UnknownVersion(u32),
    /// The body does not decode.
    #[error("snapshot body is corrupt: {0}")]
    Corrupt(#[from] postcard::Error),
    /// The file could not be read or written.
    #[error("snapshot file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// Encodes a snapshot: header plus body.
pub fn encode_snapshot(body: &SnapshotBody) -> Result<Vec<u8>, postcard::Error> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&SNAPSHOT_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&encode(body)?);
    Ok(out)
}

/// Hex SHA-256 of the state's encoding: equal states give equal digests on
/// every member (the state holds ordered maps only), so members that applied
/// the same index can be compared. An encoding failure gives a digest that
/// says so, which then differs from every healthy member's.
pub fn state_digest(state: &ClusterState) -> String {
    match postcard::to_stdvec(state) {
        Ok(bytes) => {
            let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
            d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
        }
        Err(e) => format!("unencodable: {e}"),
    }
}

/// Decodes a snapshot, checking its header.
pub fn decode_snapshot(bytes: &[u8]) -> Result<SnapshotBody, SnapshotError> {
    let rest = bytes
        .strip_prefix(SNAPSHOT_MAGIC.as_slice())
        .ok_or(SnapshotError::BadMagic)?;
    let (version, body) = rest.split_at_checked(4).ok_or(SnapshotError::BadMagic)?;
    let version = u32::from_le_bytes([version[0], version[1], version[2], version[3]]);
    match version {
        1 => {
            let v1: SnapshotBodyV1 = decode(body)?;
            Ok(SnapshotBody {
                meta: v1.meta,
                state: v1.state.into(),
            })
        }
        2 => {
            let v2: SnapshotBodyV2 = decode(body)?;
            Ok(SnapshotBody {
                meta: v2.meta,
                state: v2.state.into(),
            })
        }
        3 => {
            let v3: SnapshotBodyV3 = decode(body)?;
            Ok(SnapshotBody {
                meta: v3.meta,
                state: v3.state.into(),
            })
        }
        4 => {
            let v4: SnapshotBodyV4 = decode(body)?;
            Ok(SnapshotBody {
                meta: v4.meta,
                state: v4.state.into(),
            })
        }
        5 => {
            let v5: SnapshotBodyV5 = decode(body)?;
            Ok(SnapshotBody {
                meta: v5.meta,
                state: v5.state.into(),
            })
        }
        6 => {
            let v6: SnapshotBodyV6 = decode(body)?;
            Ok(SnapshotBody {
                meta: v6.meta,
                state: v6.state.into(),
            })
        }
        SNAPSHOT_FORMAT_VERSION => Ok(decode(body)?),
        _ => Err(SnapshotError::UnknownVersion(version)),
    }
}

/// The applied state and where it stands in the log.
#[derive(Debug, Default)]
pub struct Applied {
    /// The last log id applied.
    pub last_applied: Option<LogId>,
    /// The membership in effect.
    pub membership: StoredMembership,
    /// The replicated state.
    pub state: ClusterState,
}

struct Shared {
    applied: RwLock<Applied>,
    dir: PathBuf,
    current: Mutex<Option<(SnapshotMeta, Arc<Vec<u8>>)>>,
    builds: AtomicU64,
    events: EventLog,
}

/// The state machine store given to openraft. Cloning shares it.
#[derive(Clone)]
pub struct StateMachineStore {
    shared: Arc<Shared>,
}

/// A read-only view of the applied state, for the API.
#[derive(Clone)]
pub struct StateView {
    shared: Arc<Shared>,
}

impl StateView {
    /// Reads the applied state. Never hold the guard across an `.await`.
    pub fn read(&self) -> RwLockReadGuard<'_, Applied> {
        // A poisoned lock means an apply panicked: the state may be half
        // changed, so stop serving rather than answer from it.
        self.shared
            .applied
            .read()
            .expect("state machine lock poisoned by a panic during apply")
    }
}

impl StateMachineStore {
    /// Opens the store in `dir`, loading the snapshot there if any.
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
        let path = dir.join(SNAPSHOT_FILE);
        let (applied, current) = match std::fs::read(&path) {
            Ok(bytes) => {
                let body = decode_snapshot(&bytes)?;
                let applied = Applied {
                    last_applied: body.meta.last_log_id,
                    membership: body.meta.last_membership.clone(),
                    state: body.state,
                };
                (applied, Some((body.meta, Arc::new(bytes))))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Applied::default(), None),
            Err(source) => return Err(SnapshotError::Io { path, source }),
        };
        Ok(Self {
            shared: Arc::new(Shared {
                applied: RwLock::new(applied),
                dir: dir.to_path_buf(),
                current: Mutex::new(current),
                builds: AtomicU64::new(0),
                events: EventLog::default(),
            }),
        })
    }

    /// The events of the commands this member applies.
    pub fn events(&self) -> EventLog {
        self.shared.events.clone()
    }

    /// A read-only view for the API.
    pub fn view(&self) -> StateView {
        StateView {
            shared: self.shared.clone(),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Applied> {
        self.shared
            .applied
            .write()
            .expect("state machine lock poisoned by a panic during apply")
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Option<(SnapshotMeta, Arc<Vec<u8>>)>> {
        self.shared
            .current
            .lock()
            .expect("snapshot lock poisoned by a panic")
    }

    async fn persist(&self, bytes: Arc<Vec<u8>>, meta: &SnapshotMeta) -> Result<(), StorageError> {
        let path = self.shared.dir.join(SNAPSHOT_FILE);
        let data = bytes.clone();
        tokio::task::spawn_blocking(move || write_atomic(&path, &data))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        *self.current() = Some((meta.clone(), bytes));
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let body = {
            let a = self.view().read().clone_for_snapshot();
            let n = self.shared.builds.fetch_add(1, Ordering::Relaxed);
            let id = match a.0 {
                Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, n),
                None => format!("0-0-{n}"),
            };
            SnapshotBody {
                meta: SnapshotMeta {
                    last_log_id: a.0,
                    last_membership: a.1,
                    snapshot_id: id,
                },
                state: a.2,
            }
        };
        let bytes = Arc::new(
            encode_snapshot(&body)
                .map_err(|e| StorageIOError::write_snapshot(Some(body.meta.signature()), &e))?,
        );
        self.persist(bytes.clone(), &body.meta).await?;
        tracing::info!(snapshot = %body.meta.snapshot_id, bytes = bytes.len(), "snapshot built");
        Ok(Snapshot {
            meta: body.meta,
            snapshot: Box::new(Cursor::new(bytes.to_vec())),
        })
    }
}

impl Applied {
    fn clone_for_snapshot(&self) -> (Option<LogId>, StoredMembership, ClusterState) {
        (
            self.last_applied,
            self.membership.clone(),
            self.state.clone(),
        )
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let a = self.view();
        let a = a.read();
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut applied = self.write();
        let mut out = Vec::new();
        let mut events = Vec::new();
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => Ok(Outcome::Noop),
                EntryPayload::Normal(request) => {
                    let described = request.clone();
                    let result = state::apply(&mut applied.state, request);
                    events.extend(state::events::describe(&described, &result));
                    result
                }
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    Ok(Outcome::Noop)
                }
            };
            out.push(Response(result));
        }
        drop(applied);
        self.shared.events.extend(events);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let body = decode_snapshot(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        if body.meta.last_log_id != meta.last_log_id {
            let e = std::io::Error::other(format!(
                "snapshot body is at {:?} but its metadata says {:?}",
                body.meta.last_log_id, meta.last_log_id
            ));
            return Err(StorageIOError::read_snapshot(Some(meta.signature()), &e).into());
        }
        self.persist(Arc::new(bytes), meta).await?;
        let mut applied = self.write();
        applied.last_applied = meta.last_log_id;
        applied.membership = meta.last_membership.clone();
        applied.state = body.state;
        tracing::info!(snapshot = %meta.snapshot_id, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.current().as_ref().map(|(meta, bytes)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(bytes.to_vec())),
        }))
    }
}

/// Ids of the voters and learners in a membership, for status answers.
pub fn members(m: &StoredMembership) -> Vec<(NodeId, String, bool)> {
    let voters: std::collections::BTreeSet<NodeId> = m.membership().voter_ids().collect();
    m.membership()
        .nodes()
        .map(|(id, node)| (*id, node.addr.clone(), voters.contains(id)))
        .collect()
}
