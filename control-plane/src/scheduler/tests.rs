//! Scheduler tests: data-driven scenarios (`testdata/scheduler/*.txt`,
//! refreshed with `UPDATE_EXPECT=1`) and property tests.

use std::collections::BTreeMap;

use berth_common::units::{parse_cpu_milli, parse_size_mib};
use proptest::prelude::*;

use super::*;

fn kv(text: &str) -> (String, String) {
    let (k, v) = text.split_once('=').expect("key=value");
    (k.to_string(), v.to_string())
}

/// `4xA100:80GiB`
fn parse_gpus(spec: &str) -> Vec<Gpu> {
    let (count, rest) = spec.split_once('x').expect("NxMODEL:MEM");
    let (model, mem) = rest.split_once(':').expect("NxMODEL:MEM");
    let mem = parse_size_mib("gpu", mem).unwrap();
    (0..count.parse::<u32>().unwrap())
        .map(|i| Gpu {
            index: i,
            model: model.into(),
            memory_mib: mem,
            locality: None,
            used: Default::default(),
        })
        .collect()
}

fn parse_node(words: &[&str]) -> Node {
    let mut node = Node {
        name: words[0].into(),
        schedulable: true,
        state: "ready".into(),
        labels: Labels::new(),
        cpu_milli: 32_000,
        memory_mib: 256 * 1024,
        gpus: Vec::new(),
        used_cpu_milli: 0,
        used_memory_mib: 0,
    };
    for w in &words[1..] {
        let (k, v) = kv(w);
        match k.as_str() {
            "cpu" => node.cpu_milli = u64::from(parse_cpu_milli(&k, &v).unwrap()),
            "mem" => node.memory_mib = parse_size_mib(&k, &v).unwrap(),
            "gpus" => node.gpus = parse_gpus(&v),
            "locality" => {
                for (g, l) in node.gpus.iter_mut().zip(v.split(',')) {
                    g.locality = Some(l.parse().unwrap());
                }
            }
            "label" => {
                let (lk, lv) = kv(&v);
                node.labels.insert(lk, lv);
            }
            "state" => {
                node.schedulable = v == "ready";
                node.state = v;
            }
            other => panic!("unknown node key {other}"),
        }
    }
    node
}

fn parse_request(words: &[&str]) -> Request {
    let mut r = Request {
        id: words[0].into(),
        resources: Resources {
            cpu_milli: 1000,
            memory_mib: 1024,
            gpus: 0,
            gpu_memory_mib: 0,
            gpu_milli: 0,
        },
        selector: Labels::new(),
        gpu_model: None,
        priority: 0,
        arrival: 0,
    };
    for w in &words[1..] {
        let (k, v) = kv(w);
        match k.as_str() {
            "gpus" => r.resources.gpus = v.parse().unwrap(),
            "gpu_mem" => r.resources.gpu_memory_mib = parse_size_mib(&k, &v).unwrap(),
            "share" => r.resources.gpu_milli = v.parse().unwrap(),
            "cpu" => r.resources.cpu_milli = parse_cpu_milli(&k, &v).unwrap(),
            "mem" => r.resources.memory_mib = parse_size_mib(&k, &v).unwrap(),
            "prio" => r.priority = v.parse().unwrap(),
            "at" => r.arrival = v.parse().unwrap(),
            "model" => r.gpu_model = Some(v),
            "sel" => {
                let (sk, sv) = kv(&v);
                r.selector.insert(sk, sv);
            }
            other => panic!("unknown request key {other}"),
        }
    }
    if r.resources.gpus > 0 && r.resources.gpu_milli == 0 {
        r.resources.gpu_milli = 1000;
    }
    r
}

fn render_bind(b: &Bind) -> String {
    let gpus: Vec<String> = b
        .gpus
        .iter()
        .map(|g| format!("{}:{}m/{}MiB", g.index, g.milli, g.memory_mib))
        .collect();
    if gpus.is_empty() {
        format!("bind {} -> {}\n", b.replica, b.node)
    } else {
        format!(
            "bind {} -> {} gpus [{}]\n",
            b.replica,
            b.node,
            gpus.join(" ")
        )
    }
}

#[derive(Default)]
struct World {
    cluster: Cluster,
    queued: Vec<Request>,
}

impl World {
    fn run(&mut self, line: &str) -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[0] {
            "node" => {
                let n = parse_node(&words[1..]);
                self.cluster.nodes.insert(n.name.clone(), n);
                String::new()
            }
            "req" => {
                self.queued.push(parse_request(&words[1..]));
                String::new()
            }
            "release" => {
                self.cluster.release(words[1]).expect("placed replica");
                format!("released {}\n", words[1])
            }
            "schedule" => {
                let mut config = Config::default();
                for w in &words[1..] {
                    let (k, v) = kv(w);
                    match (k.as_str(), v.as_str()) {
                        ("policy", "binpack") => config.policy = Policy::Binpack,
                        ("policy", "spread") => config.policy = Policy::Spread,
                        ("policy", "default") => config.policy = Policy::Default,
                        ("policy", "first-fit") => config.policy = Policy::FirstFit,
                        ("policy", "best-fit") => config.policy = Policy::BestFit,
                        ("queue", "fifo") => config.queue = QueueOrder::Fifo,
                        ("queue", "priority") => config.queue = QueueOrder::Priority,
                        ("queue", "smallest-first") => config.queue = QueueOrder::SmallestFirst,
                        ("preemption", "on") => config.preemption = true,
                        _ => panic!("unknown schedule option {w}"),
                    }
                }
                let requests = std::mem::take(&mut self.queued);
                let plan = schedule_in_place(&mut self.cluster, &requests, &config);
                let mut out = String::new();
                for e in &plan.evictions {
                    out.push_str(&format!(
                        "evict {} on {}: {}\n",
                        e.replica, e.node, e.reason
                    ));
                }
                for b in &plan.binds {
                    out.push_str(&render_bind(b));
                }
                for (id, why) in &plan.pending {
                    out.push_str(&format!("pending {id}: {why}\n"));
                }
                check_no_overcommit(&self.cluster).unwrap();
                out
            }
            other => panic!("unknown scenario command {other}"),
        }
    }
}

/// No GPU's share or memory, no node's CPU or memory over capacity.
fn check_no_overcommit(cluster: &Cluster) -> Result<(), String> {
    for n in cluster.nodes.values() {
        if n.used_cpu_milli > n.cpu_milli || n.used_memory_mib > n.memory_mib {
            return Err(format!("node {} over CPU or memory", n.name));
        }
        for g in &n.gpus {
            let u = g.used;
            if u.milli > WHOLE_GPU_MILLI || u.memory_mib > g.memory_mib {
                return Err(format!(
                    "node {} GPU {} over-committed: {u:?}",
                    n.name, g.index
                ));
            }
        }
    }
    Ok(())
}

/// Runs `testdata/scheduler/*.txt`.
#[test]
fn scenarios() {
    crate::datadriven::check("scheduler", |world: &mut World, line| world.run(line));
}

// ---- property tests --------------------------------------------------------

fn arb_node(i: usize) -> impl Strategy<Value = Node> {
    (
        prop::sample::select(vec![0usize, 1, 2, 4, 8]),
        prop::sample::select(vec!["A100", "H100"]),
        prop::sample::select(vec![40 * 1024u64, 80 * 1024]),
        prop::sample::select(vec![8_000u64, 32_000, 96_000]),
        prop::sample::select(vec![32 * 1024u64, 256 * 1024]),
        any::<bool>(),
    )
        .prop_map(move |(gpus, model, mem, cpu, ram, ready)| Node {
            name: format!("n{i:02}"),
            schedulable: ready,
            state: if ready { "ready" } else { "cordoned" }.into(),
            labels: Labels::from([(
                "zone".to_string(),
                if i.is_multiple_of(2) { "a" } else { "b" }.to_string(),
            )]),
            cpu_milli: cpu,
            memory_mib: ram,
            gpus: (0..gpus as u32)
                .map(|g| Gpu {
                    index: g,
                    model: model.into(),
                    memory_mib: mem,
                    locality: Some(g / 2),
                    used: Default::default(),
                })
                .collect(),
            used_cpu_milli: 0,
            used_memory_mib: 0,
        })
}

fn arb_cluster() -> impl Strategy<Value = Cluster> {
    arb_cluster_of(1..6)
}

fn arb_cluster_of(sizes: std::ops::Range<usize>) -> impl Strategy<Value = Cluster> {
    sizes
        .prop_flat_map(|n| (0..n).map(arb_node).collect::<Vec<_>>())
        .prop_map(|nodes| Cluster {
            nodes: nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
            placed: BTreeMap::new(),
            scan_from: None,
            workload: Workload::default(),
        })
}

fn arb_request(i: usize) -> impl Strategy<Value = Request> {
    (
        prop::sample::select(vec![0u32, 1, 1, 1, 2, 4, 8]),
        prop::sample::select(vec![250u32, 500, 1000]),
        prop::sample::select(vec![0u64, 10 * 1024, 30 * 1024, 60 * 1024]),
        prop::sample::select(vec![500u32, 2000, 16_000]),
        prop::sample::select(vec![512u64, 8 * 1024, 64 * 1024]),
        -2i32..3,
        prop::option::of(prop::sample::select(vec!["A100", "H100"])),
        any::<bool>(),
    )
        .prop_map(
            move |(gpus, milli, gmem, cpu, mem, prio, model, sel)| Request {
                id: format!("r{i:03}"),
                resources: Resources {
                    cpu_milli: cpu,
                    memory_mib: mem,
                    gpus,
                    gpu_memory_mib: if gpus == 0 { 0 } else { gmem },
                    gpu_milli: match gpus {
                        0 => 0,
                        1 => milli,
                        _ => 1000,
                    },
                },
                selector: if sel {
                    Labels::from([("zone".to_string(), "a".to_string())])
                } else {
                    Labels::new()
                },
                gpu_model: model.filter(|_| gpus > 0).map(String::from),
                priority: prio,
                arrival: i as u64,
            },
        )
}

fn arb_requests() -> impl Strategy<Value = Vec<Request>> {
    (0usize..30).prop_flat_map(|n| (0..n).map(arb_request).collect::<Vec<_>>())
}

/// Requests in runs of the same shape, as deployments of several replicas
/// produce them.
fn arb_runs() -> impl Strategy<Value = Vec<Request>> {
    prop::collection::vec((arb_request(0), 1usize..12), 0..8).prop_map(|runs| {
        let mut out = Vec::new();
        for (template, count) in runs {
            for _ in 0..count {
                let i = out.len();
                out.push(Request {
                    id: format!("r{i:03}"),
                    arrival: i as u64,
                    ..template.clone()
                });
            }
        }
        out
    })
}

fn arb_config() -> impl Strategy<Value = Config> {
    (
        prop::sample::select(vec![Policy::Default, Policy::Binpack, Policy::Spread]),
        prop::sample::select(vec![
            QueueOrder::Priority,
            QueueOrder::Fifo,
            QueueOrder::SmallestFirst,
        ]),
        any::<bool>(),
    )
        .prop_map(|(policy, queue, preemption)| Config {
            policy,
            queue,
            weights: Weights::default(),
            preemption,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Nothing is ever over-committed, every replica is bound or explained
    /// exactly once, and a multi-GPU replica gets all its GPUs on one node.
    #[test]
    fn plans_never_overcommit(cluster in arb_cluster(), requests in arb_requests(), config in arb_config()) {
        let mut after = cluster.clone();
        let plan = schedule_in_place(&mut after, &requests, &config);
        for b in &plan.binds {
            let r = requests.iter().find(|r| r.id == b.replica).unwrap();
            prop_assert_eq!(b.gpus.len(), r.resources.gpus as usize, "all or nothing");
            let mut idx: Vec<u32> = b.gpus.iter().map(|g| g.index).collect();
            idx.sort_unstable();
            idx.dedup();
            prop_assert_eq!(idx.len(), b.gpus.len(), "distinct GPUs");
            let node = &cluster.nodes[&b.node];
            prop_assert!(node.schedulable);
            for (k, v) in &r.selector {
                prop_assert_eq!(node.labels.get(k), Some(v));
            }
        }
        prop_assert_eq!(check_no_overcommit(&after), Ok(()));
        prop_assert_eq!(plan.binds.len() + plan.pending.len(), requests.len());
        // Evictions only ever hit lower priorities, and the evicted are gone.
        for e in &plan.evictions {
            prop_assert!(!after.placed.contains_key(&e.replica));
        }
        // The usage the nodes record is exactly the sum of the placed replicas.
        let mut rebuilt = cluster.clone();
        for p in after.placed.values() {
            rebuilt.apply(&p.request, &p.bind);
        }
        prop_assert_eq!(&rebuilt.nodes, &after.nodes);
    }

    /// The same input gives the same plan.
    #[test]
    fn deterministic(cluster in arb_cluster(), requests in arb_requests(), config in arb_config()) {
        prop_assert_eq!(schedule(&cluster, &requests, &config), schedule(&cluster, &requests, &config));
    }

    /// A batch gives the plan (and leaves the cluster) that it gives
    /// without the memo of same-shaped runs: the memo changes nothing but
    /// the work.
    #[test]
    fn batches_place_as_one_at_a_time(cluster in arb_cluster(), requests in arb_runs(), config in arb_config()) {
        let (mut batch, mut single) = (cluster.clone(), cluster);
        let plan = schedule_in_place(&mut batch, &requests, &config);
        prop_assert_eq!(&plan, &schedule_batch(&mut single, &requests, &config, false));
        prop_assert_eq!(batch, single);
    }

    /// The same on clusters past the scoring bound, where each decision
    /// scans a window of nodes from where the last one stopped.
    #[test]
    fn batches_place_as_one_at_a_time_on_large_clusters(
        cluster in arb_cluster_of(90..260),
        requests in arb_runs(),
        config in arb_config(),
    ) {
        let (mut batch, mut single) = (cluster.clone(), cluster);
        let plan = schedule_in_place(&mut batch, &requests, &config);
        prop_assert_eq!(&plan, &schedule_batch(&mut single, &requests, &config, false));
        prop_assert_eq!(batch, single);
    }

    /// Preemption evicts only lower priorities and only when the request
    /// fits nowhere without it.
    #[test]
    fn preemption_is_a_last_resort(cluster in arb_cluster(), requests in arb_requests(), late in arb_request(999)) {
        let config = Config { preemption: true, ..Config::default() };
        let mut work = cluster.clone();
        schedule_in_place(&mut work, &requests, &Config::default());
        let fits_without = work.nodes.values().any(|n| fit(n, &late, config.policy).is_ok());
        let before = work.clone();
        let plan = schedule_in_place(&mut work, std::slice::from_ref(&late), &config);
        if fits_without {
            prop_assert!(plan.evictions.is_empty());
        }
        for e in &plan.evictions {
            let victim = &before.placed[&e.replica];
            prop_assert!(victim.request.priority < late.priority, "{}", e.reason);
        }
        prop_assert_eq!(check_no_overcommit(&work), Ok(()));
    }

    /// A replica that fits some empty, ready node is never reported
    /// unplaceable on an empty cluster.
    #[test]
    fn fits_empty_is_placed(cluster in arb_cluster(), request in arb_request(0), config in arb_config()) {
        let fits_somewhere = cluster.nodes.values().any(|n| fit(n, &request, config.policy).is_ok());
        let plan = schedule(&cluster, std::slice::from_ref(&request), &config);
        prop_assert_eq!(plan.binds.len() == 1, fits_somewhere);
        if !fits_somewhere {
            let (_, why) = &plan.pending[0];
            let excluded: u32 = why.excluded.values().sum();
            prop_assert_eq!(excluded as usize, cluster.nodes.len(), "every node is accounted for");
        }
    }
}

#[test]
fn gpu_models_match_by_name_or_by_words_in_order() {
    assert!(gpu_model_matches("A100-80GB", "A100-80GB"));
    assert!(gpu_model_matches("NVIDIA A100-SXM4-80GB", "A100-80GB"));
    assert!(gpu_model_matches("NVIDIA H100 80GB HBM3", "h100"));
    assert!(!gpu_model_matches("A100-80GB", "A10"));
    assert!(!gpu_model_matches("NVIDIA A100-SXM4-40GB", "A100-80GB"));
    assert!(
        !gpu_model_matches("80GB A100", "A100-80GB"),
        "words in order"
    );
    assert!(!gpu_model_matches("A100-80GB", ""));
}
