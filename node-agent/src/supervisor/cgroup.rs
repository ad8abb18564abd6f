//! CPU and memory limits through cgroup v2. Each replica gets a directory
//! under the agent's cgroup root (`<root>/replica-<id>`) with `cpu.max` and
//! `memory.max`; the replica's shim moves itself into `cgroup.procs` before
//! it starts the model server, so every process of the replica is inside.
//! Resizing rewrites the two files in place.
//!
//! Where the agent cannot create cgroups (cgroup v1 only, no permission),
//! limits are recorded but not enforced; the agent says so once in its log
//! and in its inventory.

use std::path::{Path, PathBuf};

/// The period of `cpu.max`, microseconds.
const CPU_PERIOD_US: u64 = 100_000;
/// The default root on a cgroup v2 machine.
pub const DEFAULT_ROOT: &str = "/sys/fs/cgroup/berth";

/// How limits are applied on this node.
#[derive(Debug, Clone)]
pub enum Cgroups {
    /// cgroup v2 under this directory.
    V2 {
        /// The agent's cgroup root.
        root: PathBuf,
    },
    /// Not enforced; why.
    Unavailable(String),
}

impl Cgroups {
    /// Sets up `root` (given by `--cgroup-root`) or the default on a cgroup
    /// v2 machine. Never fails: a problem makes limits unavailable, with why.
    pub fn detect(root: Option<&Path>) -> Self {
        let root = match root {
            Some(r) => r.to_path_buf(),
            None if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() => {
                PathBuf::from(DEFAULT_ROOT)
            }
            None => {
                return Cgroups::Unavailable(
                    "cgroup v2 is not mounted at /sys/fs/cgroup (this machine uses cgroup v1): CPU and memory limits are recorded, not enforced".into(),
                );
            }
        };
        if let Err(e) = std::fs::create_dir_all(&root) {
            return Cgroups::Unavailable(format!(
                "cannot create the cgroup {}: {e}; CPU and memory limits are recorded, not enforced",
                root.display()
            ));
        }
        // Child cgroups get the cpu and memory controllers only when the
        // parent delegates them.
        if let Err(e) = std::fs::write(root.join("cgroup.subtree_control"), "+cpu +memory") {
            return Cgroups::Unavailable(format!(
                "cannot enable the cpu and memory controllers in {}: {e}; CPU and memory limits are recorded, not enforced",
                root.display()
            ));
        }
        Cgroups::V2 { root }
    }

    /// A description for the inventory.
    pub fn describe(&self) -> String {
        match self {
            Cgroups::V2 { root } => format!("cgroup v2 at {}", root.display()),
            Cgroups::Unavailable(why) => format!("unavailable: {why}"),
        }
    }

    /// Whether limits are enforced.
    pub fn enforced(&self) -> bool {
        matches!(self, Cgroups::V2 { .. })
    }

    /// The directory of a replica's cgroup, when cgroups are available.
    pub fn dir(&self, replica: &str) -> Option<PathBuf> {
        match self {
            Cgroups::V2 { root } => Some(root.join(format!("replica-{replica}"))),
            Cgroups::Unavailable(_) => None,
        }
    }

    /// Creates (or updates) a replica's cgroup with these limits. Returns
    /// the directory, or None when limits are not enforced.
    pub fn apply(
        &self,
        replica: &str,
        cpu_milli: u32,
        memory_mib: u64,
    ) -> std::io::Result<Option<PathBuf>> {
        let Some(dir) = self.dir(replica) else {
            return Ok(None);
        };
        std::fs::create_dir_all(&dir)?;
        let cpu = if cpu_milli == 0 {
            format!("max {CPU_PERIOD_US}")
        } else {
            format!(
                "{} {CPU_PERIOD_US}",
                u64::from(cpu_milli) * CPU_PERIOD_US / 1000
            )
        };
        std::fs::write(dir.join("cpu.max"), cpu)?;
        let memory = if memory_mib == 0 {
            "max".to_string()
        } else {
            (memory_mib * 1024 * 1024).to_string()
        };
        std::fs::write(dir.join("memory.max"), memory)?;
        Ok(Some(dir))
    }

    /// Removes a replica's cgroup once its processes are gone. On a real
    /// cgroupfs only `rmdir` works; a plain directory (tests) keeps its files.
    pub fn remove(&self, replica: &str) {
        if let Some(dir) = self.dir(replica)
            && let Err(e) = std::fs::remove_dir(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::debug!(replica, error = %e, "cgroup not removed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_written_under_the_given_root() {
        let dir = tempfile::tempdir().unwrap();
        let cg = Cgroups::detect(Some(dir.path()));
        assert!(cg.enforced(), "{}", cg.describe());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("cgroup.subtree_control")).unwrap(),
            "+cpu +memory"
        );
        let d = cg.apply("r1", 1500, 2048).unwrap().unwrap();
        assert_eq!(
            std::fs::read_to_string(d.join("cpu.max")).unwrap(),
            "150000 100000"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("memory.max")).unwrap(),
            (2048u64 * 1024 * 1024).to_string()
        );
        cg.apply("r1", 0, 0).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.join("cpu.max")).unwrap(),
            "max 100000"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("memory.max")).unwrap(),
            "max"
        );
    }

    #[test]
    fn an_unwritable_root_makes_limits_unavailable() {
        let cg = Cgroups::detect(Some(Path::new("/proc/berth-cannot-exist")));
        assert!(!cg.enforced());
        assert!(cg.describe().starts_with("unavailable: "));
        assert_eq!(cg.apply("r1", 1000, 1024).unwrap(), None);
    }
}
