//! Membership changes as faults: a member host's member leaves the voters
//! and a fresh one, with a new id and an empty data dir, joins on the same
//! host (so the clients that talk to that address keep their member). The
//! removal runs in the background while the step holds (another fault, a
//! paused follower, may keep it from committing); the step's recovery
//! waits for it, then starts the new member and waits until it votes.
//!
//! Which id runs on which host is kept in `Hosts`, shared with the
//! cluster's `HostMap`, so a new id is placed on the host it replaces.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use berth_cli::client::{CliError, Client};
use berth_cli::local::{HostMap, LocalCluster, Placement};
use berth_proto::v1 as pb;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long a removal may take once every fault is undone.
const CHANGE_DEADLINE: Duration = Duration::from_secs(60);
/// How long one removal request may wait for its answer.
const ATTEMPT: Duration = Duration::from_secs(10);

/// Member id → the host (namespace) it runs on.
#[derive(Clone, Default)]
pub struct Hosts(Arc<Mutex<BTreeMap<u64, String>>>);

impl Hosts {
    /// Members 1..=n on hosts m1..mn.
    pub fn new(n: usize) -> Self {
        let map = (1..=n as u64).map(|id| (id, format!("m{id}"))).collect();
        Hosts(Arc::new(Mutex::new(map)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, String>> {
        // A panic while holding this map ends the run anyway.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The host of member `id`.
    pub fn host_of(&self, id: u64) -> anyhow::Result<String> {
        self.lock()
            .get(&id)
            .cloned()
            .with_context(|| format!("member {id} has no host"))
    }

    /// The member that runs on `host` now (the newest id placed there).
    pub fn id_on(&self, host: &str) -> anyhow::Result<u64> {
        self.lock()
            .iter()
            .rev()
            .find(|(_, h)| *h == host)
            .map(|(id, _)| *id)
            .with_context(|| format!("no member runs on host {host:?}"))
    }

    /// The cluster's placement of ids, through `place` (host name → placement).
    pub fn host_map(
        &self,
        place: impl Fn(&str) -> Option<Placement> + Send + Sync + 'static,
    ) -> HostMap {
        let hosts = self.clone();
        HostMap(Arc::new(move |id| place(&hosts.host_of(id).ok()?)))
    }

    fn assign(&self, id: u64, host: &str) {
        self.lock().insert(id, host.to_string());
    }

    fn next_id(&self) -> u64 {
        self.lock().keys().next_back().map_or(1, |id| id + 1)
    }
}

/// A replacement in progress: `old` is being removed from the voters.
pub struct Change {
    old: u64,
    host: String,
    removal: JoinHandle<Result<(), String>>,
}

/// Starts removing the member on `host` from the voters, in the background.
pub fn begin(cluster: &LocalCluster, hosts: &Hosts, host: &str) -> anyhow::Result<Change> {
    let old = hosts.id_on(host)?;
    // Not through the member being removed: once out, it may still think
    // it leads and never answer.
    let client = Client::new(&cluster.servers_except(old), &cluster.dialer);
    let removal = tokio::spawn(async move {
        let deadline = Instant::now() + CHANGE_DEADLINE * 2;
        loop {
            let req = pb::RemoveMemberRequest { id: old };
            // Bounded: a leader deposed (or removed) during its own change
            // may never answer; the retry asks whoever leads then.
            let res = tokio::time::timeout(
                ATTEMPT,
                client.admin(|mut c| async move { c.remove_member(req).await }),
            )
            .await
            .unwrap_or_else(|_| {
                Err(CliError::Other(anyhow::anyhow!(
                    "no answer within {ATTEMPT:?}"
                )))
            });
            match res {
                Ok(_) => return Ok(()),
                // A retry after a removal that committed but was not answered.
                Err(e) if e.to_string().contains("not in the cluster") => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("remove member {old}: {e}"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
    });
    Ok(Change {
        old,
        host: host.to_string(),
        removal,
    })
}

/// Waits for the removal, drops the old member's process, starts a fresh
/// member on its host and waits until the cluster has `voters` voters again.
/// Returns the new member's id.
pub async fn finish(
    cluster: &mut LocalCluster,
    hosts: &Hosts,
    change: Change,
    voters: usize,
) -> anyhow::Result<u64> {
    let removed = tokio::time::timeout(CHANGE_DEADLINE, change.removal)
        .await
        .with_context(|| {
            format!(
                "member {} was not removed within {CHANGE_DEADLINE:?} of healing",
                change.old
            )
        })?
        .context("the removal task")?;
    removed.map_err(|e| anyhow::anyhow!(e))?;
    cluster.forget(change.old)?;
    let id = hosts.next_id();
    hosts.assign(id, &change.host);
    // Through the leader: a follower that has not yet applied the new
    // member token refuses it as unknown (see the session note).
    let leader = cluster
        .wait_for_leader(CHANGE_DEADLINE)
        .await
        .context("no leader to join through")?;
    let join = cluster.member(leader)?.addr.clone();
    cluster
        .add_member(id, Some(&join))
        .await
        .with_context(|| format!("start member {id} on {}", change.host))?;
    cluster
        .wait_for_voters(voters, CHANGE_DEADLINE)
        .await
        .with_context(|| format!("member {id} did not become a voter"))?;
    Ok(id)
}
