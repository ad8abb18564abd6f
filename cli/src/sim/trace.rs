//! Trace files for `berth sim`: reading them, every error naming file,
//! line and column (`generate` writes them).
//!
//! `cluster.csv`: `node,cpu_milli,memory_mib,gpus,gpu_model,gpu_memory_mib`.
//! `workload.csv`: `id,arrival_s,duration_s,cpu_milli,memory_mib,gpus,gpu_milli,gpu_memory_mib,priority,tenant`.

use std::collections::BTreeMap;
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
}
