//! The disk-fault backend on real files: its overlay against a model, redb
//! on it through a simulated crash, the log store under each fault, and a
//! member that stops when its disk fails.

use std::path::PathBuf;
use std::time::Duration;

use openraft::RaftLogReader;
use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use redb::{Database, Durability, ReadableDatabase, StorageBackend, TableDefinition};

use super::{CONTROL_FILE, DiskFaults, Fault, PAGE};
use crate::raft::log_store::LogStore;
use crate::raft::tests::{fixture_entries, reopen};

struct Files {
    _dir: tempfile::TempDir,
    db: PathBuf,
    control: PathBuf,
}

fn files(fault: &str) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("raft.redb");
    let control = dir.path().join(CONTROL_FILE);
    std::fs::write(&control, fault).unwrap();
    Files {
        _dir: dir,
        db,
        control,
    }
}

/// Waits (bounded) until `faults` has read `fault` from its control file.
async fn wait_for(faults: &DiskFaults, fault: Fault) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while faults.fault() != fault {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the backend never read {fault:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn control_file_words() {
    assert_eq!(Fault::parse(""), Some(Fault::None));
    assert_eq!(Fault::parse("lose-unsynced\n"), Some(Fault::LoseUnsynced));
    assert_eq!(Fault::parse(" sync-error "), Some(Fault::SyncError));
    assert_eq!(Fault::parse("enospc"), Some(Fault::Enospc));
    assert_eq!(Fault::parse("power-cut"), None);
    let f = files("power-cut");
    let faults = DiskFaults::open(&f.db, &f.control).unwrap();
    assert_eq!(
        faults.fault(),
        Fault::None,
        "an unknown word injects nothing"
    );
    std::fs::remove_file(&f.control).unwrap();
    assert_eq!(faults.fault(), Fault::None);
}

/// A small deterministic generator (xorshift), so a failure replays.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Under `lose-unsynced`, random writes, shrinks and growths read back as a
/// plain byte vector would; the file holds exactly the vector as of the last
/// sync, and a crash leaves exactly that.
#[test]
fn overlay_matches_a_byte_vector_and_a_crash_keeps_the_last_sync() {
    let f = files("lose-unsynced");
    let faults = DiskFaults::open(&f.db, &f.control).unwrap();
    let mut model: Vec<u8> = Vec::new();
    let mut synced: Vec<u8> = Vec::new();
    let mut rng = Rng(0x5eed_2024);
    for step in 0..400u32 {
        match rng.below(10) {
            0..=5 => {
                let offset = rng.below(6 * PAGE);
                let len = 1 + rng.below(2 * PAGE) as usize;
                let data: Vec<u8> = (0..len).map(|i| (step as usize + i) as u8 | 1).collect();
                faults.write(offset, &data).unwrap();
                let end = offset as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[offset as usize..end].copy_from_slice(&data);
            }
            6 | 7 => {
                let len = rng.below(7 * PAGE) as usize;
                faults.set_len(len as u64).unwrap();
                model.resize(len, 0);
            }
            _ => {
                faults.sync_data().unwrap();
                synced = model.clone();
                assert!(
                    std::fs::read(&f.db).unwrap() == synced,
                    "step {step}: file after sync"
                );
            }
        }
        assert_eq!(faults.len().unwrap(), model.len() as u64, "step {step}");
        let mut all = vec![0; model.len()];
        faults.read(0, &mut all).unwrap();
        assert!(all == model, "step {step}: reads see every write");
        assert!(
            std::fs::read(&f.db).unwrap() == synced,
            "step {step}: nothing unsynced on the file"
        );
    }
    let mut past_end = [0u8; 1];
    assert!(faults.read(model.len() as u64, &mut past_end).is_err());
    faults.crash();
    assert!(faults.write(0, b"x").is_err() && faults.sync_data().is_err());
    assert!(std::fs::read(&f.db).unwrap() == synced);
}

/// Without a fault the backend writes straight through to the file.
#[test]
fn no_fault_writes_through() {
    let f = files("");
    let faults = DiskFaults::open(&f.db, &f.control).unwrap();
    faults.write(0, b"abc").unwrap();
    assert_eq!(std::fs::read(&f.db).unwrap(), b"abc");
}

const KV: TableDefinition<u64, &str> = TableDefinition::new("kv");

fn put(db: &Database, key: u64, durability: Durability) -> Result<(), redb::Error> {
    let mut tx = db.begin_write()?;
    tx.set_durability(durability)?;
    tx.open_table(KV)?.insert(key, "v")?;
    tx.commit()?;
    Ok(())
}

fn keys(db: &Database) -> Vec<u64> {
    let tx = db.begin_read().unwrap();
    let table = tx.open_table(KV).unwrap();
    redb::ReadableTable::iter(&table)
        .unwrap()
        .map(|kv| kv.unwrap().0.value())
        .collect()
}

/// redb on the backend, `lose-unsynced`: a synced commit survives a crash;
/// a non-durable one and one whose sync never happened (its pages written,
/// which the page cache would have kept) do not.
#[test]
fn redb_keeps_only_synced_commits_through_a_crash() {
    let f = files("lose-unsynced");
    let faults = DiskFaults::open(&f.db, &f.control).unwrap();
    let db = Database::builder()
        .create_with_backend(faults.clone())
        .unwrap();
    put(&db, 1, Durability::Immediate).unwrap();
    put(&db, 2, Durability::None).unwrap();
    faults.crash_at_next_sync();
    assert!(put(&db, 3, Durability::Immediate).is_err());
    assert!(faults.discarded() > 0, "the commit reached the backend");
    drop(db);
    let db = Database::create(&f.db).unwrap();
    assert_eq!(keys(&db), [1]);
}

/// `lose-unsynced` with the log store: what `append` acknowledged survives a
/// crash; an append whose fsync never ran is reported failed and is gone.
#[tokio::test]
async fn acknowledged_appends_survive_a_crash() {
    let f = files("lose-unsynced");
    let entries = fixture_entries();
    let faults = DiskFaults::open(&f.db, &f.control).unwrap();
    let mut log = LogStore::open_on(faults.clone()).unwrap();
    log.blocking_append(entries[..4].to_vec()).await.unwrap();
    faults.crash_at_next_sync();
    assert!(log.blocking_append(entries[4..].to_vec()).await.is_err());
    assert!(faults.discarded() > 0, "the append reached the backend");
    drop(log);
    let mut log = reopen(&f.db).await;
    let got = log.try_get_log_entries(0..100).await.unwrap();
    assert_eq!(format!("{got:?}"), format!("{:?}", &entries[..4]));
}

/// Opens the store through the fault backend again once the dropped one
/// let go of the file (its writer thread closes it after the drop).
async fn reopen_faulty(f: &Files) -> LogStore {
    for _ in 0..100 {
        match LogStore::open_with_disk_faults(&f.db, &f.control) {
            Ok(log) => return log,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    LogStore::open_with_disk_faults(&f.db, &f.control).expect("reopen the log store")
}

async fn stored(log: &mut LogStore) -> Vec<openraft::LogId<u64>> {
    let got = log.try_get_log_entries(0..100).await.unwrap();
    got.iter().map(|e| e.log_id).collect()
}

/// `sync-error`: the append is reported failed (EIO), so is every later
/// change, and after a restart the entry is not there.
#[tokio::test]
async fn sync_error_acknowledges_nothing() {
    let f = files("");
    let entries = fixture_entries();
    let faults = DiskFaults::open(&f.db, &f.control).unwrap();
    let mut log = LogStore::open_on(faults.clone()).unwrap();
    log.blocking_append(entries[..3].to_vec()).await.unwrap();
    std::fs::write(&f.control, "sync-error").unwrap();
    wait_for(&faults, Fault::SyncError).await;
    let e = log
        .blocking_append(entries[3..5].to_vec())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("EIO"), "{e}");
    std::fs::write(&f.control, "").unwrap();
    wait_for(&faults, Fault::None).await;
    let e = log.save_vote(&openraft::Vote::new(9, 1)).await.unwrap_err();
    assert!(e.to_string().contains("restarts"), "{e}");
    drop(log);
    let ids: Vec<_> = entries[..3].iter().map(|e| e.log_id).collect();
    assert_eq!(stored(&mut reopen_faulty(&f).await).await, ids);
}

/// `enospc`: the append fails with "no space left on device"; redb stays
/// failed in-process even once space returns, and a restart recovers with
/// everything acknowledged and takes writes again.
#[tokio::test]
async fn enospc_fails_clearly_and_a_restart_recovers() {
    let f = files("");
    let entries = fixture_entries();
    let faults = DiskFaults::open(&f.db, &f.control).unwrap();
    let mut log = LogStore::open_on(faults.clone()).unwrap();
    log.blocking_append(entries[..3].to_vec()).await.unwrap();
    std::fs::write(&f.control, "enospc").unwrap();
    wait_for(&faults, Fault::Enospc).await;
    let e = log
        .blocking_append(entries[3..5].to_vec())
        .await
        .unwrap_err();
    let e = e.to_string();
    assert!(
        e.contains("disk full") && e.contains("No space left on device"),
        "{e}"
    );
    std::fs::write(&f.control, "").unwrap();
    wait_for(&faults, Fault::None).await;
    assert!(
        log.blocking_append(entries[3..5].to_vec()).await.is_err(),
        "redb does not recover in-process"
    );
    drop(log);
    let mut log = reopen_faulty(&f).await;
    let ids: Vec<_> = entries[..3].iter().map(|e| e.log_id).collect();
    assert_eq!(stored(&mut log).await, ids, "nothing acknowledged was lost");
    log.blocking_append(entries[3..].to_vec()).await.unwrap();
    drop(log);
    let ids: Vec<_> = entries.iter().map(|e| e.log_id).collect();
    assert_eq!(stored(&mut reopen_faulty(&f).await).await, ids);
}

/// A member with `--test-disk-faults` whose disk starts failing fsyncs:
/// writes commit until the backend sees the fault, the first write it hits
/// is not acknowledged, and the member stops with the disk error.
#[tokio::test]
async fn a_member_stops_when_its_disk_fails() {
    berth_proto::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let mut config =
        crate::config::Config::new(dir.path().to_path_buf(), "127.0.0.1:0".parse().unwrap());
    config.id = Some(1);
    config.bootstrap = true;
    config.test_disk_faults = true;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = crate::server::start(config, shutdown.clone())
        .await
        .unwrap();
    let raft = running.member.raft.clone();
    raft.wait(Some(Duration::from_secs(30)))
        .metrics(|m| m.current_leader == Some(1), "member 1 leads")
        .await
        .unwrap();
    std::fs::write(dir.path().join(CONTROL_FILE), "sync-error").unwrap();
    let request = crate::state::tests::fixture_requests().remove(0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        match raft.client_write(request.clone()).await {
            Ok(_) => assert!(
                tokio::time::Instant::now() < deadline,
                "writes still acknowledged 10s after the fault"
            ),
            Err(e) => break e,
        }
    };
    assert!(refused.to_string().contains("EIO"), "{refused}");
    let e = tokio::time::timeout(Duration::from_secs(30), running.wait())
        .await
        .expect("the member stops by itself")
        .unwrap_err();
    assert!(
        e.to_string().contains("raft stopped") && e.to_string().contains("EIO"),
        "{e:#}"
    );
    assert!(shutdown.is_cancelled());
}
