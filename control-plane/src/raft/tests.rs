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

pub(crate) fn fixture_entries() -> Vec<Entry> {
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
    // Format 2 kept no ordinals of deleted deployments (format 6 does).
    let mut expected = body;
    expected.state.retired_ordinals.clear();
    assert_eq!(decode_snapshot(&stored).unwrap(), expected);
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

/// Opens the log store at `path` again once the dropped one let go of it
/// (its writer thread closes the file after the store is dropped).
pub(crate) async fn reopen(path: &std::path::Path) -> LogStore {
    for _ in 0..100 {
        match LogStore::open(path) {
            Ok(log) => return log,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    LogStore::open(path).expect("reopen the log store")
}

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
    let mut log = reopen(&path).await;
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(entries[1].log_id));
    assert_eq!(state.last_log_id, Some(entries[4].log_id));
    let got = log.try_get_log_entries(0..100).await.unwrap();
    assert_eq!(format!("{got:?}"), format!("{:?}", &entries[2..5]));
    assert!(log.has_state());
}

/// A member that led when it stopped comes back as a follower: its vote
/// keeps its term and whom it voted for, but no longer counts as granted,
/// so it cannot lead that term again and reuse the log ids of entries it
/// sent before it flushed them (see `LogStore::open`).
#[tokio::test]
async fn a_restarted_leader_does_not_resume_its_term() {
    use openraft::Vote;
    use openraft::storage::RaftLogStorage;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    {
        let mut log = LogStore::open(&path).unwrap();
        log.save_vote(&Vote::new_committed(4, 1)).await.unwrap();
    }
    let mut log = reopen(&path).await;
    let vote = log.read_vote().await.unwrap().unwrap();
    assert_eq!(vote, Vote::new(4, 1));
    assert!(!vote.is_committed());
}

/// The committed index is not waited for, but once writes go quiet it is
/// stored, and a reopened store reads it back.
#[tokio::test]
async fn committed_index_is_stored_once_writes_go_quiet() {
    use openraft::storage::{RaftLogStorage, RaftLogStorageExt};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    let entries = fixture_entries();
    let committed = Some(entries[3].log_id);
    {
        let mut log = LogStore::open(&path).unwrap();
        log.blocking_append(entries.clone()).await.unwrap();
        log.save_committed(committed).await.unwrap();
        // Longer than the writer's linger for a lone committed index.
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    let mut log = reopen(&path).await;
    assert_eq!(log.read_committed().await.unwrap(), committed);
}

/// Three in-process Raft members on the real stores, wired by direct calls:
/// they pin the patched openraft's leader log I/O (third_party/README.md)
/// and serve the proposer's tests.
// openraft's RPC errors are large by its design.
#[allow(clippy::result_large_err)]
pub(crate) mod cluster {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
    use openraft::raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
        InstallSnapshotResponse, VoteRequest, VoteResponse,
    };
    use openraft::{BasicNode, Config, RaftLogReader};

    use super::super::log_store::LogStore;
    use super::super::state_machine::StateMachineStore;
    use super::super::{NodeId, Raft, TypeConfig};

    /// Who is up, and which members are cut off from everyone.
    #[derive(Clone, Default)]
    struct Net {
        rafts: Arc<Mutex<BTreeMap<NodeId, Raft>>>,
        isolated: Arc<Mutex<BTreeSet<NodeId>>>,
    }

    struct Factory {
        net: Net,
        from: NodeId,
    }

    struct Conn {
        net: Net,
        from: NodeId,
        target: NodeId,
    }

    type Rpc<T, E = openraft::error::Infallible> =
        Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

    impl Conn {
        fn peer<E: std::error::Error>(&self) -> Rpc<Raft, E> {
            let cut = self.net.isolated.lock().unwrap();
            let peer = self.net.rafts.lock().unwrap().get(&self.target).cloned();
            match peer {
                Some(raft) if !cut.contains(&self.from) && !cut.contains(&self.target) => Ok(raft),
                _ => Err(RPCError::Unreachable(Unreachable::new(
                    &std::io::Error::other("cut off"),
                ))),
            }
        }

        fn remote<T, E: std::error::Error>(&self, r: Result<T, RaftError<NodeId, E>>) -> Rpc<T, E> {
            r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
        }
    }

    impl RaftNetworkFactory<TypeConfig> for Factory {
        type Network = Conn;
        async fn new_client(&mut self, target: NodeId, _: &BasicNode) -> Conn {
            Conn {
                net: self.net.clone(),
                from: self.from,
                target,
            }
        }
    }

    impl RaftNetwork<TypeConfig> for Conn {
        async fn append_entries(
            &mut self,
            rpc: AppendEntriesRequest<TypeConfig>,
            _: RPCOption,
        ) -> Rpc<AppendEntriesResponse<NodeId>> {
            let raft = self.peer()?;
            self.remote(raft.append_entries(rpc).await)
        }

        async fn install_snapshot(
            &mut self,
            rpc: InstallSnapshotRequest<TypeConfig>,
            _: RPCOption,
        ) -> Rpc<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
            let raft = self.peer()?;
            self.remote(raft.install_snapshot(rpc).await)
        }

        async fn vote(
            &mut self,
            rpc: VoteRequest<NodeId>,
            _: RPCOption,
        ) -> Rpc<VoteResponse<NodeId>> {
            let raft = self.peer()?;
            self.remote(raft.vote(rpc).await)
        }
    }

    pub(crate) struct Cluster {
        net: Net,
        pub(crate) logs: BTreeMap<NodeId, LogStore>,
        pub(crate) leader: NodeId,
        _dirs: Vec<tempfile::TempDir>,
    }

    impl Cluster {
        pub(crate) async fn start() -> Cluster {
            let config = Arc::new(
                Config {
                    heartbeat_interval: 50,
                    election_timeout_min: 500,
                    election_timeout_max: 1000,
                    ..Default::default()
                }
                .validate()
                .unwrap(),
            );
            let net = Net::default();
            let (mut logs, mut dirs) = (BTreeMap::new(), Vec::new());
            for id in 1..=3 {
                let dir = tempfile::tempdir().unwrap();
                let log = LogStore::open(&dir.path().join("raft.redb")).unwrap();
                let sm = StateMachineStore::open(dir.path()).unwrap();
                let factory = Factory {
                    net: net.clone(),
                    from: id,
                };
                let raft = Raft::new(id, config.clone(), factory, log.clone(), sm)
                    .await
                    .unwrap();
                net.rafts.lock().unwrap().insert(id, raft);
                logs.insert(id, log);
                dirs.push(dir);
            }
            let members: BTreeMap<NodeId, BasicNode> = (1..=3)
                .map(|id| (id, BasicNode::new(format!("m{id}"))))
                .collect();
            let first = net.rafts.lock().unwrap()[&1].clone();
            first.initialize(members).await.unwrap();
            let leader = first
                .wait(Some(Duration::from_secs(30)))
                .metrics(|m| m.current_leader.is_some(), "a leader is elected")
                .await
                .unwrap()
                .current_leader
                .unwrap();
            Cluster {
                net,
                logs,
                leader,
                _dirs: dirs,
            }
        }

        pub(crate) fn raft(&self, id: NodeId) -> Raft {
            self.net.rafts.lock().unwrap()[&id].clone()
        }

        /// Cuts one follower off and holds the leader's log writer: the
        /// leader's own copy is then needed for a majority, so nothing commits
        /// until the returned sender is dropped.
        pub(crate) fn hold_commits(&self) -> std::sync::mpsc::Sender<()> {
            let cut = self.followers()[1];
            self.net.isolated.lock().unwrap().insert(cut);
            self.logs[&self.leader].hold_writes()
        }

        pub(crate) fn followers(&self) -> Vec<NodeId> {
            (1..=3).filter(|id| *id != self.leader).collect()
        }

        /// Starts a client write on the leader and returns its handle.
        fn write(&self) -> tokio::task::JoinHandle<u64> {
            let raft = self.raft(self.leader);
            let request = crate::state::tests::fixture_requests().remove(0);
            tokio::spawn(async move {
                raft.client_write(request)
                    .await
                    .expect("the write commits")
                    .log_id
                    .index
            })
        }

        pub(crate) async fn stop(self) {
            let rafts: Vec<Raft> = self.net.rafts.lock().unwrap().values().cloned().collect();
            for raft in rafts {
                let _ = raft.shutdown().await;
            }
        }
    }

    /// The leader sends its entries while its own flush is held, so two
    /// followers that stored them make the write committed.
    #[tokio::test]
    async fn leader_replicates_while_its_own_flush_is_held() {
        let cluster = Cluster::start().await;
        let held = cluster.logs[&cluster.leader].hold_writes();
        let write = cluster.write();
        let index = tokio::time::timeout(Duration::from_secs(30), write)
            .await
            .expect("committed by the two followers while the leader's flush is held")
            .unwrap();
        for id in cluster.followers() {
            let stored = cluster.logs[&id]
                .clone()
                .try_get_log_entries(index..=index)
                .await;
            assert_eq!(
                stored.unwrap().len(),
                1,
                "follower {id} holds entry {index}"
            );
        }
        drop(held);
        cluster.stop().await;
    }

    /// With one follower cut off, the leader's copy is needed for a majority:
    /// the write waits for the leader's own flush, and commits right after it.
    #[tokio::test]
    async fn leader_counts_itself_only_once_flushed() {
        let cluster = Cluster::start().await;
        let held = cluster.hold_commits();
        let mut write = cluster.write();
        // Bounded look for a violation: nothing may commit on one durable copy.
        let early = tokio::time::timeout(Duration::from_secs(1), &mut write).await;
        assert!(
            early.is_err(),
            "committed before the leader's own flush: {early:?}"
        );
        drop(held);
        tokio::time::timeout(Duration::from_secs(30), write)
            .await
            .expect("committed once the leader's flush completed")
            .unwrap();
        cluster.stop().await;
    }
}

/// Members that applied the same entries agree on the state digest; one
/// more entry changes it, and a state decoded from a snapshot keeps it.
#[test]
fn state_digest_follows_the_applied_state() {
    use super::state_machine::state_digest;
    let entries = fixture_entries();
    let all = snapshot_of(&entries, "a");
    let again = snapshot_of(&entries, "b");
    let fewer = snapshot_of(&entries[..entries.len() - 1], "c");
    assert_eq!(state_digest(&all.state), state_digest(&again.state));
    assert_ne!(state_digest(&all.state), state_digest(&fewer.state));
    assert_eq!(state_digest(&all.state).len(), 64);
    let decoded = decode_snapshot(&encode_snapshot(&all).unwrap()).unwrap();
    assert_eq!(state_digest(&decoded.state), state_digest(&all.state));
}
