//! Trace replay through the real scheduler (`scheduler::place_one`), in
//! simulated time. The wall clock is read only to time each placement
//! decision.
//!
//! Events at one instant are handled as: departures, then arrivals, then a
//! scheduling cycle over the waiting queue in queue order. A cycle gives up
//! after `MAX_FAILED_PER_CYCLE` consecutive failures (a scheduler's attempt
//! budget per cycle; the rest wait for the next event). Evicted tasks go
//! back to the queue.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::Instant;

use berth_common::{Labels, Resources};
use berth_control_plane::scheduler::{self, Cluster, Config, Node, Request, Workload};
use serde::Serialize;

use super::trace::Task;

/// Failed placements in a row after which a cycle stops.
pub const MAX_FAILED_PER_CYCLE: usize = 64;

/// Replay settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Scheduler settings.
    pub config: Config,
    /// Tasks never leave; one that does not fit on arrival is never placed.
    pub no_departures: bool,
}

/// What a replay measured (the JSON of `berth sim --output json`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    /// Tasks in the workload.
    pub tasks: usize,
    /// Tasks placed at least once.
    pub placed: usize,
    /// Tasks never placed.
    pub never_placed: usize,
    /// Evictions.
    pub preemptions: usize,
    /// Allocated GPU share over total GPUs, time-weighted.
    pub gpu_alloc_ratio_mean: f64,
    /// Highest allocated share.
    pub gpu_alloc_ratio_peak: f64,
    /// Allocated share right after the last arrival was handled.
    pub gpu_alloc_ratio_final: f64,
    /// Median wait from arrival to placement, seconds.
    pub queue_wait_p50_s: f64,
    /// 99th percentile wait, seconds.
    pub queue_wait_p99_s: f64,
    /// Median wall time of one placement decision, µs.
    pub decision_us_p50: f64,
    /// 99th percentile decision time, µs.
    pub decision_us_p99: f64,
    /// Wall time of the whole replay, seconds.
    pub wall_s: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Time as integer microseconds, so events order exactly.
fn us(seconds: f64) -> u64 {
    (seconds * 1e6).round() as u64
}

fn request(task: &Task, index: usize) -> Request {
    Request {
        id: task.id.clone(),
        resources: Resources { ..task.resources },
        selector: Labels::new(),
        gpu_model: None,
        priority: task.priority,
        arrival: index as u64,
    }
}

/// Replays `tasks` on `nodes`; `progress(done, total)` is called as arrivals are handled.
pub fn replay(
    nodes: Vec<Node>,
    tasks: &[Task],
    options: Options,
    mut progress: impl FnMut(usize, usize),
) -> Report {
    let started = Instant::now();
    let mut cluster = Cluster {
        nodes: nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
        placed: BTreeMap::new(),
        scan_from: None,
        workload: Workload::default(),
    };
    let total_gpus: u64 = cluster.nodes.values().map(|n| n.gpus.len() as u64).sum();
    let mut order: Vec<usize> = (0..tasks.len()).collect();
    order.sort_by_key(|&i| (us(tasks[i].arrival_s), i));
    let requests: Vec<Request> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| request(t, i))
        .collect();
    let by_id: BTreeMap<&str, usize> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.id.as_str(), i))
        .collect();

    // Departures: (time, generation, task); a stale generation was evicted.
    let mut departures: BinaryHeap<Reverse<(u64, u64, usize)>> = BinaryHeap::new();
    let mut generation = vec![0u64; tasks.len()];
    let mut waiting: Vec<usize> = Vec::new();
    let mut ever_placed = vec![false; tasks.len()];
    let mut waits = Vec::new();
    let mut decisions = Vec::new();
    let mut preemptions = 0usize;
    let mut allocated_milli: u64 = 0;
    let ratio = |milli: u64| {
        if total_gpus == 0 {
            0.0
        } else {
            milli as f64 / (total_gpus as f64 * 1000.0)
        }
    };
    let gpu_milli = |t: &Task| u64::from(t.resources.gpus) * u64::from(t.resources.gpu_milli);

    let mut next = 0usize;
    let start = order.first().map(|&i| us(tasks[i].arrival_s)).unwrap_or(0);
    let last_arrival = order.last().map(|&i| us(tasks[i].arrival_s)).unwrap_or(0);
    let mut now = start;
    let mut area = 0.0f64;
    let mut peak = 0.0f64;
    let mut final_ratio = 0.0f64;
    loop {
        let next_arrival = order.get(next).map(|&i| us(tasks[i].arrival_s));
        let next_departure = departures.peek().map(|Reverse((t, _, _))| *t);
        let t = match (next_arrival, next_departure) {
            (None, None) => break,
            (Some(a), None) => a,
            (None, Some(d)) => d,
            (Some(a), Some(d)) => a.min(d),
        };
        area += ratio(allocated_milli) * (t - now) as f64;
        now = t;
        while let Some(Reverse((dt, g, i))) = departures.peek().copied() {
            if dt != now {
                break;
            }
            departures.pop();
            if g == generation[i] && cluster.release(&tasks[i].id).is_some() {
                allocated_milli -= gpu_milli(&tasks[i]);
            }
        }
        while next < order.len() && us(tasks[order[next]].arrival_s) == now {
            // The default policy's target workload: the requests seen so far.
            cluster.workload.observe(&tasks[order[next]].resources, 1);
            waiting.push(order[next]);
            next += 1;
        }
        // One scheduling cycle over the queue, in queue order.
        let mut queue: Vec<&Request> = waiting.iter().map(|&i| &requests[i]).collect();
        scheduler::sort_queue(&mut queue, options.config.queue);
        let queue: Vec<usize> = queue.iter().map(|r| by_id[r.id.as_str()]).collect();
        let mut failed_in_row = 0usize;
        let mut still_waiting = Vec::new();
        for (pos, &i) in queue.iter().enumerate() {
            if !options.no_departures && failed_in_row >= MAX_FAILED_PER_CYCLE {
                still_waiting.extend_from_slice(&queue[pos..]);
                break;
            }
            let t0 = Instant::now();
            let result = scheduler::place_one(&mut cluster, &requests[i], &options.config);
            decisions.push(t0.elapsed().as_secs_f64() * 1e6);
            match result {
                Ok((_, evictions)) => {
                    failed_in_row = 0;
                    allocated_milli += gpu_milli(&tasks[i]);
                    if !ever_placed[i] {
                        ever_placed[i] = true;
                        waits.push((now - us(tasks[i].arrival_s)) as f64 / 1e6);
                    }
                    if !options.no_departures {
                        departures.push(Reverse((now + us(tasks[i].duration_s), generation[i], i)));
                    }
                    for e in evictions {
                        let v = by_id[e.replica.as_str()];
                        preemptions += 1;
                        generation[v] += 1;
                        allocated_milli -= gpu_milli(&tasks[v]);
                        still_waiting.push(v);
                    }
                }
                Err(_) => {
                    failed_in_row += 1;
                    // Fill mode: nothing will ever leave, so it never fits.
                    if !options.no_departures {
                        still_waiting.push(i);
                    }
                }
            }
        }
        waiting = still_waiting;
        let r = ratio(allocated_milli);
        peak = peak.max(r);
        if now == last_arrival && next == order.len() {
            final_ratio = r;
        }
        progress(next, order.len());
    }
    let end = if options.no_departures {
        last_arrival
    } else {
        now
    };
    let span = end.saturating_sub(start) as f64;
    waits.sort_by(f64::total_cmp);
    decisions.sort_by(f64::total_cmp);
    let placed = ever_placed.iter().filter(|p| **p).count();
    Report {
        tasks: tasks.len(),
        placed,
        never_placed: tasks.len() - placed,
        preemptions,
        gpu_alloc_ratio_mean: if span > 0.0 {
            area / span
        } else {
            ratio(allocated_milli)
        },
        gpu_alloc_ratio_peak: peak,
        gpu_alloc_ratio_final: final_ratio,
        queue_wait_p50_s: percentile(&waits, 0.5),
        queue_wait_p99_s: percentile(&waits, 0.99),
        decision_us_p50: percentile(&decisions, 0.5),
        decision_us_p99: percentile(&decisions, 0.99),
        wall_s: started.elapsed().as_secs_f64(),
    }
}
