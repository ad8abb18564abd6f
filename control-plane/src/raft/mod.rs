//! Raft plumbing around the pure state machine: openraft's type config, the
//! redb log store (`log_store`; `disk_faults` wraps its file for the fault
//! suite), the in-memory state machine with snapshot files
//! (`state_machine`) and the tonic network (`network`).
//!
//! Wire and disk formats are postcard encodings of openraft's serde types and
//! of `state::Request`; fixtures in `testdata/fixtures` pin them.

use std::io::Cursor;

use openraft::BasicNode;
use serde::{Deserialize, Serialize};

use crate::state::{Outcome, Rejection, Request};

pub mod disk_faults;
pub mod log_store;
pub mod network;
pub mod state_machine;

#[cfg(test)]
pub(crate) mod tests;

/// A Raft member id.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// Berth's openraft type configuration.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id (term, leader, index).
pub type LogId = openraft::LogId<NodeId>;
/// A vote.
pub type Vote = openraft::Vote<NodeId>;
/// The membership as of some log id.
pub type StoredMembership = openraft::StoredMembership<NodeId, BasicNode>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, BasicNode>;
/// A storage failure (stops the member).
pub type StorageError = openraft::StorageError<NodeId>;

/// What applying one log entry produced: the command's outcome or the reason
/// it was rejected. A rejection is a normal answer, never a storage error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response(pub Result<Outcome, Rejection>);

/// Encodes a value for the wire or the disk.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec(value)
}

/// Decodes a value from the wire or the disk.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}
