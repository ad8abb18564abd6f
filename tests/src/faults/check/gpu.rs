//! Judgements on the demo replicas' GPU ledger: no GPU held by two live
//! processes at once, and no replica restarted without a fault to explain
//! it. The ledger lines are defined here as the checkers need them; the
//! harness converts what the demo replicas wrote.
//!
//! A GPU is named by its node and its name on that node; a process by its
//! node and pid. Times are wall-clock milliseconds (the replicas' clocks).

use std::collections::BTreeMap;

/// One ledger line: a replica process took (`start`) or gave back a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuHold {
    /// The GPU's name on its node.
    pub gpu: String,
    /// The replica id.
    pub replica: String,
    /// The node it ran on.
    pub node: String,
    /// The replica process.
    pub pid: u32,
    /// When the line was written, in Unix milliseconds.
    pub unix_ms: u64,
    /// A start line (`false`: a stop line).
    pub start: bool,
    /// Whether the process got the GPU's exclusive lock (start lines).
    pub locked: bool,
}

/// A period in which a node's replicas may restart because of a fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The node the fault hit.
    pub node: String,
    /// Start of the window, Unix milliseconds.
    pub from_ms: u64,
    /// End of the window (inclusive), Unix milliseconds.
    pub to_ms: u64,
    /// The fault, for messages.
    pub why: String,
}

/// Each GPU held by two processes at once, one message per finding.
///
/// A start line without the lock proves another live process held the GPU.
/// Besides, per GPU, the spans [start, stop] of processes with both lines
/// must not overlap (touching ends are fine); a process without a stop line
/// was killed at an unknown moment, so only its lock evidence counts.
pub fn double_bookings(lines: &[GpuHold]) -> Vec<String> {
    let mut found = Vec::new();
    for l in lines.iter().filter(|l| l.start && !l.locked) {
        found.push(format!(
            "node {} gpu {}: replica {} (pid {}) started at {} ms without the GPU's lock, \
             so another live process held it",
            l.node, l.gpu, l.replica, l.pid, l.unix_ms
        ));
    }
    // (node, gpu) -> (pid, replica) -> (first start, last stop)
    type Spans<'a> = BTreeMap<(u32, &'a str), (Option<u64>, Option<u64>)>;
    let mut gpus: BTreeMap<(&str, &str), Spans<'_>> = BTreeMap::new();
    for l in lines {
        let span = gpus
            .entry((l.node.as_str(), l.gpu.as_str()))
            .or_default()
            .entry((l.pid, l.replica.as_str()))
            .or_default();
        if l.start {
            span.0 = Some(span.0.map_or(l.unix_ms, |t| t.min(l.unix_ms)));
        } else {
            span.1 = Some(span.1.map_or(l.unix_ms, |t| t.max(l.unix_ms)));
        }
    }
    for ((node, gpu), spans) in &gpus {
        let mut closed: Vec<(u64, u64, u32, &str)> = spans
            .iter()
            .filter_map(|(&(pid, replica), &(start, stop))| {
                Some((start?, stop?, pid, replica)).filter(|s| s.0 <= s.1)
            })
            .collect();
        closed.sort_unstable();
        for (k, a) in closed.iter().enumerate() {
            for b in closed[k + 1..].iter().take_while(|b| b.0 < a.1) {
                found.push(format!(
                    "node {node} gpu {gpu}: replica {} (pid {}) held it from {} to {} ms \
                     while replica {} (pid {}) held it from {} to {} ms",
                    a.3, a.2, a.0, a.1, b.3, b.2, b.0, b.1
                ));
            }
        }
    }
    found
}

/// Restarts no fault explains, one message each: a replica whose start
/// lines come from several processes restarted, and each process after the
/// first must have started inside an explanation window on its node. (A
/// replica on several GPUs writes one start line per GPU, all with one pid.)
pub fn unexplained_restarts(lines: &[GpuHold], explained: &[Explanation]) -> Vec<String> {
    // replica -> (node, pid) -> first start
    let mut replicas: BTreeMap<&str, BTreeMap<(&str, u32), u64>> = BTreeMap::new();
    for l in lines.iter().filter(|l| l.start) {
        let first = replicas
            .entry(l.replica.as_str())
            .or_default()
            .entry((l.node.as_str(), l.pid))
            .or_insert(l.unix_ms);
        *first = (*first).min(l.unix_ms);
    }
    let mut found = Vec::new();
    for (replica, procs) in &replicas {
        let mut starts: Vec<(u64, &str, u32)> = procs
            .iter()
            .map(|(&(node, pid), &t)| (t, node, pid))
            .collect();
        starts.sort_unstable();
        let Some(&(t0, node0, pid0)) = starts.first() else {
            continue;
        };
        for &(t, node, pid) in &starts[1..] {
            let ok = explained
                .iter()
                .any(|x| x.node == node && x.from_ms <= t && t <= x.to_ms);
            if !ok {
                found.push(format!(
                    "replica {replica} restarted without a fault to explain it: pid {pid} \
                     started on node {node} at {t} ms (first pid {pid0} started on node \
                     {node0} at {t0} ms)"
                ));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(gpu: &str, replica: &str, pid: u32, ms: u64, start: bool) -> GpuHold {
        GpuHold {
            gpu: gpu.into(),
            replica: replica.into(),
            node: "n1".into(),
            pid,
            unix_ms: ms,
            start,
            locked: start,
        }
    }

    #[test]
    fn a_start_without_the_lock_is_a_double_booking() {
        let mut second = line("gpu-0", "r2", 20, 150, true);
        second.locked = false;
        let lines = vec![line("gpu-0", "r1", 10, 100, true), second];
        let found = double_bookings(&lines);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("replica r2 (pid 20)"), "{}", found[0]);
    }

    #[test]
    fn overlapping_closed_spans_are_a_double_booking() {
        let lines = vec![
            line("gpu-0", "r1", 10, 100, true),
            line("gpu-0", "r2", 20, 150, true),
            line("gpu-0", "r1", 10, 200, false),
            line("gpu-0", "r2", 20, 250, false),
        ];
        let found = double_bookings(&lines);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("from 100 to 200"), "{}", found[0]);
        assert!(found[0].contains("from 150 to 250"), "{}", found[0]);
        // A span inside another one counts too.
        let lines = vec![
            line("gpu-0", "r1", 10, 100, true),
            line("gpu-0", "r1", 10, 400, false),
            line("gpu-0", "r2", 20, 150, true),
            line("gpu-0", "r2", 20, 160, false),
            line("gpu-0", "r3", 30, 300, true),
            line("gpu-0", "r3", 30, 310, false),
        ];
        assert_eq!(double_bookings(&lines).len(), 2);
    }

    #[test]
    fn sequential_holders_and_other_gpus_are_fine() {
        let mut other_node = line("gpu-0", "r4", 40, 120, true);
        other_node.node = "n2".into();
        let lines = vec![
            line("gpu-0", "r1", 10, 100, true),
            line("gpu-0", "r1", 10, 200, false),
            line("gpu-0", "r2", 20, 200, true),
            line("gpu-0", "r2", 20, 300, false),
            line("gpu-1", "r3", 30, 150, true),
            other_node,
            // Killed without a stop line: its span is unknown, its lock was held.
            line("gpu-0", "r5", 50, 400, true),
            line("gpu-0", "r6", 60, 900, true),
        ];
        assert_eq!(double_bookings(&lines), Vec::<String>::new());
    }

    fn window(node: &str, from_ms: u64, to_ms: u64) -> Explanation {
        Explanation {
            node: node.into(),
            from_ms,
            to_ms,
            why: "kill agent".into(),
        }
    }

    #[test]
    fn a_restart_outside_any_window_is_reported() {
        let lines = vec![
            line("gpu-0", "r1", 10, 100, true),
            line("gpu-0", "r1", 10, 200, false),
            line("gpu-0", "r1", 11, 500, true),
        ];
        let found = unexplained_restarts(&lines, &[window("n1", 0, 400), window("n2", 0, 900)]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("pid 11"), "{}", found[0]);
        assert!(found[0].contains("500 ms"), "{}", found[0]);
    }

    #[test]
    fn a_restart_inside_a_window_on_its_node_is_explained() {
        let lines = vec![
            line("gpu-0", "r1", 10, 100, true),
            line("gpu-0", "r1", 11, 500, true),
            line("gpu-0", "r1", 12, 700, true),
        ];
        let windows = [window("n1", 450, 500), window("n1", 650, 800)];
        assert!(unexplained_restarts(&lines, &windows).is_empty());
        assert_eq!(unexplained_restarts(&lines, &windows[..1]).len(), 1);
    }

    #[test]
    fn one_process_on_several_gpus_is_not_a_restart() {
        let lines = vec![
            line("gpu-0", "r1", 10, 100, true),
            line("gpu-1", "r1", 10, 101, true),
            line("gpu-0", "r2", 20, 300, true),
        ];
        assert!(unexplained_restarts(&lines, &[]).is_empty());
    }
}
