//! openraft's storage test suite against the redb log store and the
//! snapshot-file state machine, plus fixtures of the on-disk formats.

use std::collections::BTreeMap;

use openraft::testing::{StoreBuilder, Suite};
use openraft::{BasicNode, CommittedLeaderId, EntryPayload, Membership};

use super::log_store::LogStore;
use super::state_machine::{SnapshotBody, StateMachineStore, decode_snapshot, encode_snapshot};
use super::*;
use crate::state::tests::fixture;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("create temp dir");
        let log = LogStore::open(&dir.path().join("raft.redb")).expect("open log store");
        let sm = StateMachineStore::open(dir.path()).expect("open state machine");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("openraft storage suite");
}

fn fixture_entries() -> Vec<Entry> {
    let log_id = |term, index| LogId::new(CommittedLeaderId::new(term, 1), index);
    let nodes = BTreeMap::from([
        (1, BasicNode::new("127.0.0.1:7400")),
        (2, BasicNode::new("127.0.0.1:7410")),
    ]);
    let membership = Membership::new(vec![[1u64, 2].into()], nodes);
    let mut out = vec![
        Entry {
            log_id: log_id(1, 1),
            payload: EntryPayload::Blank,
        },
        Entry {
            log_id: log_id(1, 2),
            payload: EntryPayload::Membership(membership),
        },
    ];
    for (i, r) in crate::state::tests::fixture_requests()
        .into_iter()
        .enumerate()
    {
        out.push(Entry {
            log_id: log_id(2, 3 + i as u64),
            payload: EntryPayload::Normal(r),
        });
    }
    out
}

/// Raft log entries written by earlier versions stay readable.
#[test]
fn log_entry_fixtures_stay_readable() {
    let entries = fixture_entries();
    let fresh = encode(&entries).unwrap();
    let stored = fixture("raft-entries-v1.postcard", &fresh);
    let decoded: Vec<Entry> = decode(&stored).unwrap();
    assert_eq!(format!("{decoded:?}"), format!("{entries:?}"));
}

/// The snapshot of the state a log leads to.
fn snapshot_of(entries: &[Entry], snapshot_id: &str) -> SnapshotBody {
    let mut state = crate::state::ClusterState::default();
    let mut membership = StoredMembership::default();
    for e in entries {
        match &e.payload {
            EntryPayload::Normal(r) => {
                let _ = crate::state::apply(&mut state, r.clone());
            }
            EntryPayload::Membership(m) => {
                membership = StoredMembership::new(Some(e.log_id), m.clone())
            }
            EntryPayload::Blank => {}
        }
    }
    SnapshotBody {
        meta: SnapshotMeta {
            last_log_id: entries.last().map(|e| e.log_id),
            last_membership: membership,
            snapshot_id: snapshot_id.into(),
        },
        state,
    }
}

/// Snapshots written in format 1 (models only) stay readable.
#[test]
fn snapshot_fixture_stays_readable() {
    let body = snapshot_of(&fixture_entries(), "2-7-0");
    // Only read: format 1 is never written again.
    let stored = fixture("snapshot-v1.bin", &[]);
    assert_eq!(&stored[8..12], &1u32.to_le_bytes());
    // Format 1 had no version counter: a converted state starts at 0.
    let mut expected = body;
    expected.state.version = 0;
    assert_eq!(decode_snapshot(&stored).unwrap(), expected);
}

/// Snapshots in format 2 (models, nodes, deployments, replicas) stay readable.
#[test]
fn snapshot_v2_fixture_stays_readable() {
    let mut entries = fixture_entries();
    let next = entries.len() as u64 + 1;
    let mut v2 = crate::state::tests::fixture_requests_v2();
    v2.extend(crate::state::tests::fixture_requests_v2_deployments());
    for (i, r) in v2.into_iter().enumerate() {
        entries.push(Entry {
            log_id: LogId::new(CommittedLeaderId::new(3, 1), next + i as u64),
            payload: EntryPayload::Normal(r),
        });
    }
    let body = snapshot_of(&entries, "3-12-0");
    assert_eq!(body.state.nodes.len(), 2);
    let fresh = encode_snapshot(&body).unwrap();
    let stored = fixture("snapshot-v2.bin", &fresh);
    assert_eq!(&stored[8..12], &2u32.to_le_bytes());
    assert_eq!(decode_snapshot(&stored).unwrap(), body);
}

#[test]
fn snapshot_header_is_checked() {
    assert!(decode_snapshot(b"nope").is_err());
    let mut bytes = SNAPSHOT_MAGIC_FOR_TEST.to_vec();
    bytes.extend_from_slice(&99u32.to_le_bytes());
    let e = decode_snapshot(&bytes).unwrap_err();
    assert!(e.to_string().contains("version 99"), "{e}");
}

const SNAPSHOT_MAGIC_FOR_TEST: &[u8] = state_machine::SNAPSHOT_MAGIC;

/// What the log store acknowledged is on disk: a store reopened from the
/// same file has the vote, the entries and the purge point.
#[tokio::test]
async fn log_store_survives_reopen() {
    use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
    use openraft::{RaftLogReader, Vote};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    let entries = fixture_entries();
    {
        let mut log = LogStore::open(&path).unwrap();
        log.save_vote(&Vote::new(3, 1)).await.unwrap();
        log.blocking_append(entries.clone()).await.unwrap();
        log.purge(entries[1].log_id).await.unwrap();
        log.truncate(entries[5].log_id).await.unwrap();
    }
    // The writer thread closes the file once the store is dropped.
    let mut reopened = None;
    for _ in 0..100 {
        match LogStore::open(&path) {
            Ok(l) => {
                reopened = Some(l);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    let mut log = reopened.expect("reopen the log store");
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(entries[1].log_id));
    assert_eq!(state.last_log_id, Some(entries[4].log_id));
    let got = log.try_get_log_entries(0..100).await.unwrap();
    assert_eq!(format!("{got:?}"), format!("{:?}", &entries[2..5]));
    assert!(log.has_state());
}
