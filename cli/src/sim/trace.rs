//! Trace files for `berth sim`: reading (every error names file, line and
//! column), writing, and generating synthetic traces.
//!
//! `cluster.csv`: `node,cpu_milli,memory_mib,gpus,gpu_model,gpu_memory_mib`.
//! `workload.csv`: `id,arrival_s,duration_s,cpu_milli,memory_mib,gpus,gpu_milli,gpu_memory_mib,priority,tenant`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use berth_common::{Labels, Resources};
use berth_control_plane::scheduler::{Gpu, Node};

/// The exact header of a cluster file.
pub const CLUSTER_HEADER: &str = "node,cpu_milli,memory_mib,gpus,gpu_model,gpu_memory_mib";
/// The exact header of a workload file.
pub const WORKLOAD_HEADER: &str =
    "id,arrival_s,duration_s,cpu_milli,memory_mib,gpus,gpu_milli,gpu_memory_mib,priority,tenant";

/// One row of a workload: a replica that arrives, runs, and leaves.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Unique id.
    pub id: String,
    /// Arrival, seconds from the start of the trace.
    pub arrival_s: f64,
    /// Run time once placed, seconds.
    pub duration_s: f64,
    /// What it needs.
    pub resources: Resources,
    /// Higher first; may preempt lower.
    pub priority: i32,
    /// Tenant (carried, not used by placement yet).
    pub tenant: String,
}

/// A malformed trace, with where.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct TraceError {
    file: String,
    message: String,
}

struct Row<'a> {
    file: &'a str,
    line: usize,
    cells: Vec<&'a str>,
    names: Vec<&'a str>,
}

impl Row<'_> {
    fn err(&self, col: usize, rule: &str) -> TraceError {
        TraceError {
            file: self.file.to_string(),
            message: format!(
                "line {}, column {} ({}): {:?} {rule}",
                self.line,
                col + 1,
                self.names[col],
                self.cells[col]
            ),
        }
    }

    fn text(&self, col: usize) -> Result<&str, TraceError> {
        let v = self.cells[col].trim();
        if v.is_empty() {
            return Err(self.err(col, "is empty"));
        }
        Ok(v)
    }

    fn uint(&self, col: usize) -> Result<u64, TraceError> {
        let v = self.cells[col].trim();
        if v.starts_with('-') {
            return Err(self.err(col, "is negative: sizes and counts must be 0 or more"));
        }
        v.parse()
            .map_err(|_| self.err(col, "is not a whole number"))
    }

    fn seconds(&self, col: usize) -> Result<f64, TraceError> {
        let v: f64 = self.cells[col]
            .trim()
            .parse()
            .map_err(|_| self.err(col, "is not a number of seconds"))?;
        if !v.is_finite() || v < 0.0 {
            return Err(self.err(col, "must be a finite number of seconds, 0 or more"));
        }
        Ok(v)
    }

    fn int(&self, col: usize) -> Result<i32, TraceError> {
        self.cells[col]
            .trim()
            .parse()
            .map_err(|_| self.err(col, "is not a whole number"))
    }
}

fn rows<'a>(file: &'a str, text: &'a str, header: &'a str) -> Result<Vec<Row<'a>>, TraceError> {
    let mut lines = text.lines().enumerate();
    let Some((_, first)) = lines.next() else {
        return Err(TraceError {
            file: file.into(),
            message: format!("is empty: the first line must be the header {header}"),
        });
    };
    if first.trim() != header {
        return Err(TraceError {
            file: file.into(),
            message: format!(
                "line 1: header is {:?}, it must be exactly {header}",
                first.trim()
            ),
        });
    }
    let names: Vec<&str> = header.split(',').collect();
    let mut out = Vec::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let cells: Vec<&str> = line.split(',').collect();
        if cells.len() != names.len() {
            return Err(TraceError {
                file: file.into(),
                message: format!(
                    "line {}: {} columns, the header has {} ({header})",
                    i + 1,
                    cells.len(),
                    names.len()
                ),
            });
        }
        out.push(Row {
            file,
            line: i + 1,
            cells,
            names: names.clone(),
        });
    }
    Ok(out)
}

fn read(path: &Path) -> Result<String, TraceError> {
    std::fs::read_to_string(path).map_err(|e| TraceError {
        file: path.display().to_string(),
        message: format!("cannot read: {e}"),
    })
}

/// Parses a cluster file's text.
pub fn parse_cluster(file: &str, text: &str) -> Result<Vec<Node>, TraceError> {
    let mut nodes = Vec::new();
    let mut seen = BTreeMap::new();
    for row in rows(file, text, CLUSTER_HEADER)? {
        let name = row.text(0)?.to_string();
        if let Some(first) = seen.insert(name.clone(), row.line) {
            return Err(row.err(0, &format!("repeats the node of line {first}")));
        }
        let gpus = row.uint(3)?;
        if gpus > 64 {
            return Err(row.err(3, "is more GPUs than a node has (at most 64)"));
        }
        let model = row.cells[4].trim().to_string();
        let gpu_memory_mib = row.uint(5)?;
        if gpus > 0 && (model.is_empty() || gpu_memory_mib == 0) {
            return Err(row.err(
                4,
                "must name the GPU model, with gpu_memory_mib above 0, when gpus > 0",
            ));
        }
        nodes.push(Node {
            name,
            schedulable: true,
            state: "ready".into(),
            labels: Labels::new(),
            cpu_milli: row.uint(1)?,
            memory_mib: row.uint(2)?,
            gpus: (0..gpus as u32)
                .map(|index| Gpu {
                    index,
                    model: model.clone(),
                    memory_mib: gpu_memory_mib,
                    // Pairs share a locality group, as on common 8-GPU boards.
                    locality: Some(index / 2),
                    used: Default::default(),
                })
                .collect(),
            used_cpu_milli: 0,
            used_memory_mib: 0,
        });
    }
    Ok(nodes)
}

/// Parses a workload file's text.
pub fn parse_workload(file: &str, text: &str) -> Result<Vec<Task>, TraceError> {
    let mut tasks = Vec::new();
    let mut seen = BTreeMap::new();
    for row in rows(file, text, WORKLOAD_HEADER)? {
        let id = row.text(0)?.to_string();
        if let Some(first) = seen.insert(id.clone(), row.line) {
            return Err(row.err(0, &format!("repeats the task of line {first}")));
        }
        let narrow =
            |col: usize, v: u64| u32::try_from(v).map_err(|_| row.err(col, "is too large"));
        let resources = Resources {
            cpu_milli: narrow(3, row.uint(3)?)?,
            memory_mib: row.uint(4)?,
            gpus: narrow(5, row.uint(5)?)?,
            gpu_milli: narrow(6, row.uint(6)?)?,
            gpu_memory_mib: row.uint(7)?,
        };
        if let Err(e) = resources.validate() {
            let col = row.names.iter().position(|n| *n == e.field).unwrap_or(5);
            return Err(row.err(col, &e.rule));
        }
        tasks.push(Task {
            id,
            arrival_s: row.seconds(1)?,
            duration_s: row.seconds(2)?,
            resources,
            priority: row.int(8)?,
            tenant: row.cells[9].trim().to_string(),
        });
    }
    Ok(tasks)
}

/// Reads and parses both files.
pub fn load(cluster: &Path, workload: &Path) -> Result<(Vec<Node>, Vec<Task>), TraceError> {
    let nodes = parse_cluster(&cluster.display().to_string(), &read(cluster)?)?;
    let tasks = parse_workload(&workload.display().to_string(), &read(workload)?)?;
    Ok((nodes, tasks))
}

/// SplitMix64: a tiny, fully specified generator, so a seed gives the same
/// trace on every machine and every version (a general-purpose RNG crate
/// may change its streams between releases).
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// GPU models of a generated cluster: name, memory per GPU (MiB), share of GPU nodes.
const GPU_MODELS: [(&str, u64, u64); 4] = [
    ("H100-80GB", 81_920, 30),
    ("A100-80GB", 81_920, 35),
    ("L40S-48GB", 49_152, 20),
    ("A10-24GB", 24_576, 15),
];

/// Writes a synthetic cluster and workload: 10 % CPU-only nodes, the rest
/// with `gpus_per_node` GPUs of mixed models; tasks 20 % CPU-only, 30 %
/// GPU shares of 100–750 thousandths, 30 % one whole GPU, 12 % two, 6 %
/// four, 2 % eight; priorities 0–3; 70 % short (1–10 min) and 30 % long
/// (1–10 h) runs; Poisson arrivals over one hour.
pub fn generate(nodes: usize, gpus_per_node: u32, tasks: usize, seed: u64) -> (String, String) {
    let mut rng = SplitMix64::new(seed);
    let mut cluster = format!("{CLUSTER_HEADER}\n");
    for i in 0..nodes {
        let cpu_only = rng.below(10) == 0;
        if cpu_only || gpus_per_node == 0 {
            let _ = writeln!(cluster, "cpu-{i:05},64000,262144,0,,0");
            continue;
        }
        let mut pick = rng.below(100);
        let (model, mem, _) = GPU_MODELS
            .iter()
            .find(|(_, _, share)| {
                if pick < *share {
                    true
                } else {
                    pick -= share;
                    false
                }
            })
            .copied()
            .unwrap_or(GPU_MODELS[0]);
        let cpu = 16_000 * u64::from(gpus_per_node).max(1);
        let ram = 131_072 * u64::from(gpus_per_node).max(1);
        let _ = writeln!(
            cluster,
            "gpu-{i:05},{cpu},{ram},{gpus_per_node},{model},{mem}"
        );
    }
    // Arrivals spread over one hour: with 30 % of tasks running for hours,
    // a trace larger than the cluster builds a queue (replay mode) and
    // fills it (fill mode).
    let rate = tasks as f64 / 3_600.0;
    let mut workload = format!("{WORKLOAD_HEADER}\n");
    let mut t = 0.0f64;
    for i in 0..tasks {
        t += -(1.0 - rng.unit()).ln() / rate;
        let duration = if rng.below(10) < 7 {
            60.0 + rng.unit() * 540.0
        } else {
            3_600.0 + rng.unit() * 32_400.0
        };
        let kind = rng.below(100);
        let (gpus, milli, gmem, cpu, mem) = match kind {
            0..20 => (
                0,
                0,
                0,
                500 + 500 * rng.below(8),
                1_024 * (1 + rng.below(16)),
            ),
            20..50 => {
                let milli = [100u64, 250, 500, 750][rng.below(4) as usize];
                (
                    1,
                    milli,
                    24_576 * milli / 1000,
                    1_000 + 1_000 * rng.below(4),
                    8_192,
                )
            }
            50..80 => (1, 1000, 0, 4_000 + 2_000 * rng.below(4), 32_768),
            80..92 => (2, 1000, 0, 8_000 + 4_000 * rng.below(2), 65_536),
            92..98 => (4, 1000, 0, 16_000 + 8_000 * rng.below(2), 131_072),
            _ => (8, 1000, 0, 32_000 + 16_000 * rng.below(2), 262_144),
        };
        let gpus = if gpus > u64::from(gpus_per_node) {
            0
        } else {
            gpus
        };
        let (milli, gmem) = if gpus == 0 { (0, 0) } else { (milli, gmem) };
        let priority = [0, 0, 0, 1, 1, 2, 3][rng.below(7) as usize];
        let tenant = format!("team-{}", rng.below(5));
        let _ = writeln!(
            workload,
            "t{i:06},{t:.3},{duration:.1},{cpu},{mem},{gpus},{milli},{gmem},{priority},{tenant}"
        );
    }
    (cluster, workload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wl(rows: &str) -> String {
        format!("{WORKLOAD_HEADER}\n{rows}")
    }

    #[test]
    fn malformed_rows_name_line_and_column() {
        let cases = [
            ("t1,0,10,1000,1024,0,0,0,0", "line 2: 9 columns"),
            (
                "t1,0,-5,1000,1024,0,0,0,0,a",
                "line 2, column 3 (duration_s)",
            ),
            (
                "t1,0,10,-1000,1024,0,0,0,0,a",
                "line 2, column 4 (cpu_milli): \"-1000\" is negative",
            ),
            (
                "t1,0,10,1000,lots,0,0,0,0,a",
                "line 2, column 5 (memory_mib): \"lots\" is not a whole number",
            ),
            ("t1,0,10,1000,1024,2,500,0,0,a", "column 7 (gpu_milli)"),
            ("t1,0,10,1000,1024,17,1000,0,0,a", "column 6 (gpus)"),
            (
                "t1,x,10,1000,1024,0,0,0,0,a",
                "column 2 (arrival_s): \"x\" is not a number",
            ),
        ];
        for (row, want) in cases {
            let e = parse_workload("w.csv", &wl(row)).unwrap_err().to_string();
            assert!(e.starts_with("w.csv: "), "{e}");
            assert!(e.contains(want), "{row}: {e}");
        }
        let e = parse_workload("w.csv", "id,arrival\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1: header"), "{e}");
        let e = parse_cluster("c.csv", &format!("{CLUSTER_HEADER}\nn1,1000,1024,2,,0\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2, column 5 (gpu_model)"), "{e}");
    }

    #[test]
    fn generated_traces_parse_and_repeat() {
        let (c, w) = generate(20, 8, 300, 7);
        assert_eq!((c.clone(), w.clone()), generate(20, 8, 300, 7));
        let nodes = parse_cluster("c", &c).unwrap();
        let tasks = parse_workload("w", &w).unwrap();
        assert_eq!((nodes.len(), tasks.len()), (20, 300));
        assert!(tasks.iter().any(|t| t.resources.gpus == 0));
        assert!(
            tasks
                .iter()
                .any(|t| t.resources.gpus == 1 && t.resources.gpu_milli < 1000)
        );
        assert!(tasks.iter().any(|t| t.resources.gpus >= 2));
    }
}
