//! The routing table: which replicas serve which model name, and the
//! gateway's own view of each replica's load and health. Choosing a replica
//! is power of two choices on load (this gateway's requests in flight to
//! it, plus the requests its engine queues, as its agent last read them);
//! a replica at its in-flight cap is
//! skipped, and one that keeps failing is ejected for a while (passive
//! health checking). Requests that find no replica with room wait in the
//! model's queue, bounded in size and time. A deployment scaled to zero
//! (one whose autoscaling policy allows it) is "cold": its requests wait
//! while the autoscaler, which counts them in this gateway's load reports,
//! starts a replica — for longer than the model's measured load time.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::HeaderValue;
use axum::http::uri::Authority;
use berth_proto::v1 as pb;
use tokio::sync::Notify;

/// One replica as the gateway sees it.
#[derive(Debug)]
pub struct Replica {
    /// The replica id.
    pub id: String,
    /// `host:port` of its model server.
    pub address: String,
    /// The model it serves (for metrics).
    pub model: String,
    /// Its deployment (for load reports).
    pub deployment: String,
    /// `address`, parsed once (None when it does not parse: never chosen).
    pub authority: Option<Authority>,
    /// Its id as a header value, made once.
    pub header: Option<HeaderValue>,
    inflight: AtomicU32,
    /// The engine's queue, from the endpoint stream.
    queue_depth: AtomicU32,
    failures: AtomicU32,
    /// Milliseconds since the table's epoch until which it gets no new
    /// requests; 0 when it is not ejected.
    ejected_until_ms: AtomicU64,
    /// How many times in a row it was ejected (the next ejection doubles).
    ejections: AtomicU32,
}

impl Replica {
    fn new(endpoint: &pb::Endpoint) -> Self {
        Replica {
            id: endpoint.replica.clone(),
            address: endpoint.address.clone(),
            model: endpoint.model.clone(),
            deployment: endpoint.deployment.clone(),
            authority: endpoint.address.parse().ok(),
            header: HeaderValue::from_str(&endpoint.replica).ok(),
            inflight: AtomicU32::new(0),
            queue_depth: AtomicU32::new(endpoint.queue_depth),
            failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
        }
    }

    /// Requests this gateway has sent it that have not finished.
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// What the choice compares: this gateway's in-flight requests plus
    /// the engine's queue.
    pub fn load(&self) -> u32 {
        self.inflight()
            .saturating_add(self.queue_depth.load(Ordering::Relaxed))
    }
}

/// The routing settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most requests per replica at once.
    pub max_inflight: u32,
    /// Most waiting requests per model.
    pub queue_size: u32,
    /// Longest wait for a replica.
    pub queue_timeout: Duration,
    /// Consecutive failures before an ejection.
    pub eject_after: u32,
    /// The first ejection's length.
    pub eject_for: Duration,
    /// Share of requests that may be retried.
    pub retry_budget: f64,
    /// How long a request for a cold deployment may wait when its model's
    /// load time is not known yet.
    pub cold_start_timeout: Duration,
}

impl Limits {
    /// How long a request for a cold deployment waits: twice the model's
    /// measured load time and 10 s more (never less than the queue
    /// timeout), or `cold_start_timeout` while it is not known.
    pub fn cold_hold(&self, load_time_ms: u64) -> Duration {
        let hold = if load_time_ms == 0 {
            self.cold_start_timeout
        } else {
            Duration::from_millis(load_time_ms.saturating_mul(2)) + Duration::from_secs(10)
        };
        hold.max(self.queue_timeout)
    }
}

/// The replicas of every route name, rebuilt from each endpoint update.
#[derive(Debug, Default)]
struct Routes {
    /// Route name (model, `model:version`, deployment) → its replicas.
    by_name: BTreeMap<String, Vec<Arc<Replica>>>,
    /// Route name → its deployment (the load reports' key).
    deployment_of: HashMap<String, String>,
    /// Names of cold deployments (no ready replica, may scale from zero)
    /// → how long a request may wait for one.
    cold: BTreeMap<String, Duration>,
    /// Every deployment the control plane knows: reported even when idle,
    /// so that the autoscaler sees a fresh zero.
    deployments: Vec<String>,
}

/// The names a request may use for a deployment.
fn route_names(model: &str, version: &str, deployment: &str, aliases: &[String]) -> Vec<String> {
    let mut names = vec![model.to_string(), format!("{model}:{version}")];
    if deployment != model {
        names.push(deployment.to_string());
    }
    names.extend(aliases.iter().cloned());
    names
}

/// Per-model waiting line.
#[derive(Debug, Default)]
struct Queue {
    waiting: AtomicU32,
    freed: Notify,
}

/// Why no replica was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoReplica {
    /// No ready replica serves this name.
    Unknown,
    /// Every replica is at its cap and the queue is full.
    QueueFull,
    /// Waited this long without a replica freeing up (or starting).
    Timeout(Duration),
    /// The deployment is cold and its queue is full: retry after about
    /// this many seconds (its load time).
    ColdQueueFull(u32),
}

/// The gateway's routing state: shared by every request.
#[derive(Debug)]
pub struct Table {
    routes: RwLock<Arc<Routes>>,
    queues: Mutex<HashMap<String, Arc<Queue>>>,
    /// Requests waiting in any queue: a finished request takes the queues'
    /// lock to wake one only when some request waits.
    waiting_total: AtomicU32,
    limits: Limits,
    epoch: Instant,
    /// Retry tokens, in thousandths: each request adds `retry_budget`, each
    /// retry takes one whole token.
    retry_tokens: AtomicU64,
    endpoints: AtomicU64,
    /// Woken when a request starts waiting for a cold deployment: the
    /// load report goes out at once instead of at the next second.
    pub cold_request: Notify,
}

/// Most retry tokens saved up (in thousandths): a burst of failures can
/// retry at most this many requests before the budget limits it.
const MAX_RETRY_TOKENS: u64 = 10_000;

impl Table {
    /// An empty table.
    pub fn new(limits: Limits) -> Self {
        Table {
            routes: RwLock::new(Arc::default()),
            queues: Mutex::new(HashMap::new()),
            waiting_total: AtomicU32::new(0),
            limits,
            epoch: Instant::now(),
            retry_tokens: AtomicU64::new(MAX_RETRY_TOKENS),
            endpoints: AtomicU64::new(0),
            cold_request: Notify::new(),
        }
    }

    /// The settings.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Replaces the endpoints and the deployments' routes. A replica that
    /// is still there at the same address keeps its counters, so that
    /// in-flight requests stay counted.
    pub fn replace(&self, endpoints: &BTreeMap<String, pb::Endpoint>, deployments: &[pb::Route]) {
        let before: HashMap<String, Arc<Replica>> = self
            .current()
            .by_name
            .values()
            .flatten()
            .map(|r| (r.id.clone(), r.clone()))
            .collect();
        let mut by_name: BTreeMap<String, Vec<Arc<Replica>>> = BTreeMap::new();
        let mut deployment_of: HashMap<String, String> = HashMap::new();
        for e in endpoints.values() {
            let replica = match before.get(&e.replica) {
                Some(r) if r.address == e.address => {
                    r.queue_depth.store(e.queue_depth, Ordering::Relaxed);
                    r.clone()
                }
                _ => Arc::new(Replica::new(e)),
            };
            for name in route_names(&e.model, &e.version, &e.deployment, &e.aliases) {
                deployment_of
                    .entry(name.clone())
                    .or_insert_with(|| e.deployment.clone());
                by_name.entry(name).or_default().push(replica.clone());
            }
        }
        let served: std::collections::HashSet<&str> =
            endpoints.values().map(|e| e.deployment.as_str()).collect();
        let mut cold = BTreeMap::new();
        for r in deployments {
            let names = route_names(&r.model, &r.version, &r.deployment, &r.aliases);
            let is_cold = r.scales_from_zero && !served.contains(r.deployment.as_str());
            for name in names {
                if is_cold && !by_name.contains_key(&name) {
                    cold.insert(name.clone(), self.limits.cold_hold(r.load_time_ms));
                }
                deployment_of
                    .entry(name)
                    .or_insert_with(|| r.deployment.clone());
            }
        }
        self.endpoints
            .store(endpoints.len() as u64, Ordering::Relaxed);
        let routes = Arc::new(Routes {
            by_name,
            deployment_of,
            cold,
            deployments: deployments.iter().map(|r| r.deployment.clone()).collect(),
        });
        match self.routes.write() {
            Ok(mut r) => *r = routes,
            Err(p) => *p.into_inner() = routes,
        }
        // New replicas may give waiting requests a place.
        if let Ok(queues) = self.queues.lock() {
            for q in queues.values() {
                q.freed.notify_waiters();
            }
        }
    }

    fn current(&self) -> Arc<Routes> {
        match self.routes.read() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// How many endpoints the table holds.
    pub fn endpoint_count(&self) -> u64 {
        self.endpoints.load(Ordering::Relaxed)
    }

    /// Whether some replica serves `name`, or it names a cold deployment.
    pub fn serves(&self, name: &str) -> bool {
        let routes = self.current();
        routes.by_name.contains_key(name) || routes.cold.contains_key(name)
    }

    /// Every route name with its replica count (0 for a cold deployment's), sorted.
    pub fn names(&self) -> Vec<(String, usize)> {
        let routes = self.current();
        let mut names: Vec<(String, usize)> = routes
            .by_name
            .iter()
            .map(|(n, r)| (n.clone(), r.len()))
            .chain(routes.cold.keys().map(|n| (n.clone(), 0)))
            .collect();
        names.sort();
        names
    }

    /// This gateway's load per deployment it knows: requests in flight to
    /// its replicas, and requests waiting for one (for the autoscaler).
    pub fn report(&self) -> Vec<pb::DeploymentLoad> {
        let routes = self.current();
        let mut out: BTreeMap<&str, pb::DeploymentLoad> = routes
            .deployments
            .iter()
            .map(|d| {
                (
                    d.as_str(),
                    pb::DeploymentLoad {
                        deployment: d.clone(),
                        ..Default::default()
                    },
                )
            })
            .collect();
        let mut counted = std::collections::HashSet::new();
        for r in routes.by_name.values().flatten() {
            if counted.insert(r.id.as_str())
                && let Some(d) = out.get_mut(r.deployment.as_str())
            {
                d.inflight += r.inflight();
            }
        }
        for (name, waiting) in self.waiting() {
            if let Some(d) = routes
                .deployment_of
                .get(&name)
                .and_then(|d| out.get_mut(d.as_str()))
            {
                d.queued += waiting;
            }
        }
        out.into_values().collect()
    }

    /// How long a request for `name` may wait for a replica to start, when
    /// it names a cold deployment.
    fn cold_hold(&self, name: &str) -> Option<Duration> {
        self.current().cold.get(name).copied()
    }

    /// Per route name: replicas and the requests in flight to them.
    pub fn load(&self) -> Vec<(String, usize, u32)> {
        self.current()
            .by_name
            .iter()
            .map(|(n, r)| (n.clone(), r.len(), r.iter().map(|x| x.inflight()).sum()))
            .collect()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Picks a replica for `name` now, not one of `tried`: two at random
    /// among those with room, the less loaded of the two. Ejected replicas
    /// are left out, unless every replica with room is ejected (then
    /// trying one is better than failing the request). `Err(Unknown)` when
    /// no replica serves the name; `Ok(None)` when all are at their cap.
    /// Allocates nothing: it runs for every request.
    fn pick(&self, name: &str, tried: &[String]) -> Result<Option<Arc<Replica>>, NoReplica> {
        let routes = self.current();
        let Some(all) = routes.by_name.get(name) else {
            return Err(NoReplica::Unknown);
        };
        let now = self.now_ms();
        let untried = |r: &&Arc<Replica>| !tried.contains(&r.id) && r.authority.is_some();
        if !all.iter().any(|r| untried(&r)) {
            return Err(NoReplica::Unknown);
        }
        let room = |r: &&Arc<Replica>| untried(r) && r.inflight() < self.limits.max_inflight;
        let healthy = |r: &&Arc<Replica>| r.ejected_until_ms.load(Ordering::Relaxed) <= now;
        let two = two_at_random(all.iter().filter(|r| room(r) && healthy(r)))
            .or_else(|| two_at_random(all.iter().filter(room)));
        Ok(two.map(|(a, b)| match b {
            Some(b) if b.load() < a.load() => b.clone(),
            _ => a.clone(),
        }))
    }

    fn queue(&self, name: &str) -> Arc<Queue> {
        let mut queues = match self.queues.lock() {
            Ok(q) => q,
            Err(p) => p.into_inner(),
        };
        queues.entry(name.to_string()).or_default().clone()
    }

    /// A replica for `name`, waiting in the model's queue while every
    /// replica is at its cap. The returned guard counts the request as in
    /// flight until it is dropped.
    pub async fn acquire(
        self: &Arc<Self>,
        name: &str,
        tried: &[String],
    ) -> Result<Inflight, NoReplica> {
        // A cold deployment's first requests wait here while a replica
        // starts (only first attempts: a retry has a replica to avoid).
        let cold = || tried.is_empty().then(|| self.cold_hold(name)).flatten();
        let hold = match self.pick(name, tried) {
            Ok(Some(r)) => return Ok(self.start(name, r)),
            Ok(None) => self.limits.queue_timeout,
            Err(NoReplica::Unknown) => cold().ok_or(NoReplica::Unknown)?,
            Err(e) => return Err(e),
        };
        // A cold deployment has one line whatever name its requests use.
        let queue = match cold() {
            Some(_) => match self.current().deployment_of.get(name) {
                Some(d) => self.queue(d),
                None => self.queue(name),
            },
            None => self.queue(name),
        };
        if queue.waiting.fetch_add(1, Ordering::SeqCst) >= self.limits.queue_size {
            queue.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(match cold() {
                Some(hold) => NoReplica::ColdQueueFull(
                    u32::try_from(hold.as_secs().div_ceil(2).max(1)).unwrap_or(u32::MAX),
                ),
                None => NoReplica::QueueFull,
            });
        }
        self.waiting_total.fetch_add(1, Ordering::SeqCst);
        if cold().is_some() {
            self.cold_request.notify_one();
        }
        let deadline = tokio::time::Instant::now() + hold;
        let result = loop {
            let freed = queue.freed.notified();
            tokio::pin!(freed);
            // Registered before looking, so that a release in between wakes us.
            freed.as_mut().enable();
            match self.pick(name, tried) {
                Ok(Some(r)) => break Ok(self.start(name, r)),
                Ok(None) => {}
                Err(NoReplica::Unknown) if cold().is_some() => {}
                Err(e) => break Err(e),
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                break Err(NoReplica::Timeout(hold));
            }
        };
        queue.waiting.fetch_sub(1, Ordering::SeqCst);
        self.waiting_total.fetch_sub(1, Ordering::SeqCst);
        result
    }

    fn start(self: &Arc<Self>, name: &str, replica: Arc<Replica>) -> Inflight {
        replica.inflight.fetch_add(1, Ordering::SeqCst);
        Inflight {
            table: self.clone(),
            name: name.to_string(),
            replica,
        }
    }

    /// Requests waiting for a replica, per route name.
    pub fn waiting(&self) -> Vec<(String, u32)> {
        match self.queues.lock() {
            Ok(q) => q
                .iter()
                .map(|(n, q)| (n.clone(), q.waiting.load(Ordering::Relaxed)))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Records a request that reached a replica and got an answer.
    pub fn succeeded(&self, replica: &Replica) {
        replica.failures.store(0, Ordering::Relaxed);
        replica.ejections.store(0, Ordering::Relaxed);
    }

    /// Records a failure of `replica` (no connection, reset, 502, 503).
    /// Returns true when this failure ejected it.
    pub fn failed(&self, replica: &Replica) -> bool {
        let failures = replica.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.limits.eject_after {
            return false;
        }
        replica.failures.store(0, Ordering::Relaxed);
        // Doubles with each ejection in a row, up to 8 times the first.
        let times = replica.ejections.fetch_add(1, Ordering::Relaxed).min(3);
        let length = self.limits.eject_for.saturating_mul(1 << times);
        replica
            .ejected_until_ms
            .store(self.now_ms() + length.as_millis() as u64, Ordering::Relaxed);
        true
    }

    /// Adds a first attempt's share to the retry budget.
    pub fn deposit(&self) {
        let add = (self.limits.retry_budget * 1000.0) as u64;
        let _ = self
            .retry_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some((t + add).min(MAX_RETRY_TOKENS))
            });
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        self.retry_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                t.checked_sub(1000)
            })
            .is_ok()
    }
}

/// Two distinct items drawn uniformly from `items` in one pass (reservoir
/// sampling of size two); the second is None when there is only one.
fn two_at_random<'a>(
    items: impl Iterator<Item = &'a Arc<Replica>>,
) -> Option<(&'a Arc<Replica>, Option<&'a Arc<Replica>>)> {
    let mut slots: (Option<&Arc<Replica>>, Option<&Arc<Replica>>) = (None, None);
    for (seen, item) in items.enumerate() {
        match seen {
            0 => slots.0 = Some(item),
            1 => slots.1 = Some(item),
            n => {
                // Keep item with probability 2/(n+1), in a random slot.
                let k = fastrand::usize(..=n);
                if k == 0 {
                    slots.0 = Some(item);
                } else if k == 1 {
                    slots.1 = Some(item);
                }
            }
        }
    }
    // The slots fill in order: swap at random, so that ties go either way.
    match slots {
        (Some(a), Some(b)) if fastrand::bool() => Some((b, Some(a))),
        (Some(a), b) => Some((a, b)),
        (None, _) => None,
    }
}

/// A request in flight to a replica; dropping it ends the request's count
/// and lets a waiting request in.
#[derive(Debug)]
pub struct Inflight {
    table: Arc<Table>,
    name: String,
    /// The replica.
    pub replica: Arc<Replica>,
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.replica.inflight.fetch_sub(1, Ordering::SeqCst);
        // A waiter counts itself before it looks for a replica, and this
        // count dropped before this read: either it sees the freed slot, or
        // this sees it waiting and wakes it.
        if self.table.waiting_total.load(Ordering::SeqCst) == 0 {
            return;
        }
        let queues = match self.table.queues.lock() {
            Ok(q) => q,
            Err(p) => p.into_inner(),
        };
        if let Some(q) = queues.get(&self.name) {
            q.freed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_inflight: 2,
            queue_size: 1,
            queue_timeout: Duration::from_millis(200),
            eject_after: 2,
            eject_for: Duration::from_secs(60),
            retry_budget: 0.2,
            cold_start_timeout: Duration::from_secs(30),
        }
    }

    fn endpoints(list: &[(&str, &str, &str)]) -> BTreeMap<String, pb::Endpoint> {
        list.iter()
            .map(|(id, deployment, addr)| {
                (
                    id.to_string(),
                    pb::Endpoint {
                        replica: id.to_string(),
                        deployment: deployment.to_string(),
                        model: "llama".into(),
                        version: "v2".into(),
                        address: addr.to_string(),
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    fn replica(t: &Table, id: &str) -> Arc<Replica> {
        t.current()
            .by_name
            .get("llama")
            .and_then(|r| r.iter().find(|x| x.id == id).cloned())
            .expect("the replica")
    }

    fn table(list: &[(&str, &str, &str)]) -> Arc<Table> {
        let t = Arc::new(Table::new(limits()));
        t.replace(&endpoints(list), &[]);
        t
    }

    #[test]
    fn routes_by_model_version_and_deployment() {
        let t = table(&[("chat-1", "chat", "h:1"), ("llama-1", "llama", "h:2")]);
        let names: Vec<(String, usize)> = t.names();
        assert_eq!(
            names,
            [
                ("chat".to_string(), 1),
                ("llama".to_string(), 2),
                ("llama:v2".to_string(), 2)
            ]
        );
    }

    #[tokio::test]
    async fn prefers_the_less_loaded_and_respects_the_cap() {
        let t = table(&[("a", "llama", "h:1"), ("b", "llama", "h:2")]);
        let none: Vec<String> = Vec::new();
        let first = t.acquire("llama", &none).await.expect("a replica");
        // With two candidates, p2c always compares both: the idle one wins.
        let second = t.acquire("llama", &none).await.expect("a replica");
        assert_ne!(first.replica.id, second.replica.id);
        let third = t.acquire("llama", &none).await.expect("a replica");
        let fourth = t.acquire("llama", &none).await.expect("a replica");
        assert_ne!(third.replica.id, fourth.replica.id);
        // Both at the cap of 2: the next one waits; one more overflows the queue.
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.acquire("llama", &[]).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            t.acquire("llama", &none).await.err(),
            Some(NoReplica::QueueFull)
        );
        let freed = first.replica.id.clone();
        drop(first);
        let got = waiter
            .await
            .expect("joins")
            .expect("a replica once one frees");
        assert_eq!(got.replica.id, freed);
        // Nothing frees now: a waiter times out.
        assert_eq!(
            t.acquire("llama", &none).await.err(),
            Some(NoReplica::Timeout(Duration::from_millis(200)))
        );
    }

    #[tokio::test]
    async fn ties_go_either_way() {
        let t = table(&[
            ("a", "llama", "h:1"),
            ("b", "llama", "h:2"),
            ("c", "llama", "h:3"),
        ]);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..100 {
            // Sequential: every replica is idle each time.
            seen.insert(
                t.acquire("llama", &[])
                    .await
                    .expect("a replica")
                    .replica
                    .id
                    .clone(),
            );
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
    }

    #[tokio::test]
    async fn skips_tried_and_unknown_names() {
        let t = table(&[("a", "llama", "h:1"), ("b", "llama", "h:2")]);
        let tried = ["a".to_string()];
        let got = t.acquire("llama", &tried).await.expect("b");
        assert_eq!(got.replica.id, "b");
        let both = ["a".to_string(), "b".to_string()];
        assert_eq!(
            t.acquire("llama", &both).await.err(),
            Some(NoReplica::Unknown)
        );
        assert_eq!(
            t.acquire("mistral", &[]).await.err(),
            Some(NoReplica::Unknown)
        );
    }

    #[tokio::test]
    async fn a_failing_replica_is_ejected_unless_it_is_the_last() {
        let t = table(&[("a", "llama", "h:1"), ("b", "llama", "h:2")]);
        let none: Vec<String> = Vec::new();
        let a = replica(&t, "a");
        assert!(!t.failed(&a));
        assert!(t.failed(&a), "second failure in a row ejects");
        for _ in 0..20 {
            let got = t.acquire("llama", &none).await.expect("b");
            assert_eq!(got.replica.id, "b");
        }
        // With b tried, the ejected a is still better than nothing.
        let tried = ["b".to_string()];
        assert_eq!(t.acquire("llama", &tried).await.expect("a").replica.id, "a");
    }

    #[tokio::test]
    async fn a_deep_engine_queue_steers_requests_away() {
        let t = table(&[("a", "llama", "h:1"), ("b", "llama", "h:2")]);
        let mut update = endpoints(&[("a", "llama", "h:1"), ("b", "llama", "h:2")]);
        if let Some(a) = update.get_mut("a") {
            a.queue_depth = 10;
        }
        t.replace(&update, &[]);
        let none: Vec<String> = Vec::new();
        for _ in 0..20 {
            let got = t.acquire("llama", &none).await.expect("a replica");
            assert_eq!(got.replica.id, "b", "a has 10 queued");
        }
        // The queue weighs in the choice, not in the cap: with b at its
        // cap of 2, the next request goes to a.
        let first = t.acquire("llama", &none).await.expect("b");
        let second = t.acquire("llama", &none).await.expect("b");
        assert_eq!(
            (first.replica.id.as_str(), second.replica.id.as_str()),
            ("b", "b")
        );
        let third = t.acquire("llama", &none).await.expect("a");
        assert_eq!(third.replica.id, "a");
    }

    #[test]
    fn counters_survive_an_update_when_the_address_stays() {
        let t = table(&[("a", "llama", "h:1")]);
        let held = futures::executor::block_on(t.acquire("llama", &[])).expect("a");
        t.replace(
            &endpoints(&[("a", "llama", "h:1"), ("b", "llama", "h:2")]),
            &[],
        );
        let a = replica(&t, "a");
        assert_eq!(a.inflight(), 1);
        assert!(Arc::ptr_eq(&a, &held.replica));
        t.replace(&endpoints(&[("a", "llama", "h:9")]), &[]);
        let moved = t.current().by_name["llama"][0].clone();
        assert_eq!(moved.inflight(), 0, "a new address is a new process");
    }

    fn route(deployment: &str, from_zero: bool, load_time_ms: u64) -> pb::Route {
        pb::Route {
            deployment: deployment.into(),
            model: "llama".into(),
            version: "v2".into(),
            aliases: vec!["assistant".into()],
            scales_from_zero: from_zero,
            load_time_ms,
        }
    }

    #[tokio::test]
    async fn a_cold_deployment_holds_requests_until_a_replica_is_ready() {
        let t = Arc::new(Table::new(limits()));
        let routes = [route("chat", true, 3_000)];
        t.replace(&BTreeMap::new(), &routes);
        assert!(t.serves("assistant") && t.serves("chat") && t.serves("llama"));
        assert!(!t.serves("other"));
        assert_eq!(t.cold_hold("chat"), Some(Duration::from_secs(16)));
        // A deployment that does not scale from zero is just unknown.
        t.replace(&BTreeMap::new(), &[route("chat", false, 0)]);
        assert_eq!(t.acquire("chat", &[]).await.err(), Some(NoReplica::Unknown));
        t.replace(&BTreeMap::new(), &routes);
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.acquire("assistant", &[]).await })
        };
        // The waiting request is reported as the deployment's load.
        let mut reported = Vec::new();
        for _ in 0..100 {
            reported = t.report();
            if reported.first().is_some_and(|d| d.queued == 1) {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(
            reported,
            [pb::DeploymentLoad {
                deployment: "chat".into(),
                inflight: 0,
                queued: 1
            }]
        );
        // The queue holds 1: the next request is told to come back.
        assert_eq!(
            t.acquire("chat", &[]).await.err(),
            Some(NoReplica::ColdQueueFull(8))
        );
        let mut warm = endpoints(&[("chat-1", "chat", "h:1")]);
        for e in warm.values_mut() {
            e.aliases = vec!["assistant".into()];
        }
        t.replace(&warm, &routes);
        let got = waiter.await.expect("joins").expect("the new replica");
        assert_eq!(got.replica.id, "chat-1");
        assert_eq!(t.report()[0].inflight, 1);
        assert!(!t.current().cold.contains_key("chat"), "warm now");
    }

    #[test]
    fn the_retry_budget_is_a_share_of_requests() {
        let t = table(&[]);
        for _ in 0..10 {
            assert!(t.withdraw(), "the saved-up burst");
        }
        assert!(!t.withdraw());
        for _ in 0..10 {
            t.deposit();
        }
        assert!(t.withdraw(), "ten requests at 0.2 pay for two retries");
        assert!(t.withdraw());
        assert!(!t.withdraw());
    }
}
