//! `berth-agent` configuration: flags, `BERTH_*` environment variables and
//! a TOML file (`--config`), merged in that order of precedence over the
//! defaults below, parsed into real types and validated before any port is
//! bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use berth_common::Labels;
use berth_common::config::{address_list, duration, read_toml, validate_host_port};
use berth_common::names::{parse_label, validate_labels, validate_name};
use berth_common::telemetry::LogFormat;
use berth_common::units::parse_size_mib;
use clap::Args;
use serde::Deserialize;

/// Default gRPC address of the Agent service.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7500";
/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "berth-agent-data";
/// Default heartbeat interval.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Default inventory refresh interval.
pub const DEFAULT_INVENTORY_INTERVAL: Duration = Duration::from_secs(5);
/// Default size at which a replica's log file is rotated.
pub const DEFAULT_LOG_MAX_MIB: u64 = 10;
/// Default number of rotated log files kept per replica.
pub const DEFAULT_LOG_FILES: u32 = 3;
/// Default first restart delay.
pub const DEFAULT_RESTART_BACKOFF: Duration = Duration::from_secs(1);
/// Default longest restart delay.
pub const DEFAULT_RESTART_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Default health probe interval.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// The largest log rotation size.
pub const MAX_LOG_MAX_MIB: u64 = 1024 * 1024;
/// The longest interval or delay any duration setting may have.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Command-line flags of `berth-agent`. Every flag can also be set in the
/// `--config` TOML file under the same name with `_` for `-`.
#[derive(Debug, Args, Default, Clone)]
pub struct Flags {
    /// TOML config file; flags and BERTH_* variables override its keys.
    #[arg(long, env = "BERTH_AGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Control-plane members (comma-separated); the agent follows the leader.
    /// Without it the agent runs standalone (no registration).
    #[arg(long, env = "BERTH_CONTROL", value_name = "ADDR[,ADDR..]")]
    pub control: Option<String>,
    /// gRPC address of the Agent service [default: 127.0.0.1:7500].
    #[arg(long, env = "BERTH_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Address the control plane reaches this agent at [default: the listen address].
    #[arg(long, env = "BERTH_ADVERTISE", value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Where replica records, shims' files and logs live [default: ./berth-agent-data].
    #[arg(long, env = "BERTH_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// This node's unique name [default: the host name, up to its first dot, lowercased].
    #[arg(long, env = "BERTH_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// A label for scheduling selectors, key=value (repeatable).
    #[arg(long = "label", value_name = "K=V")]
    pub labels: Vec<String>,
    /// Development only: plaintext gRPC, no authentication, loopback addresses only.
    #[arg(long, env = "BERTH_INSECURE")]
    pub insecure: bool,
    /// With --insecure: allow listening on a non-loopback address (never on a shared network).
    #[arg(long, env = "BERTH_INSECURE_BIND_ANY")]
    pub insecure_bind_any: bool,
    /// Join token (berth1.…; bootstrap writes one to agent.token, or `berth token create --role agent`); needed on first start.
    #[arg(
        long,
        env = "BERTH_JOIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Simulated GPUs instead of NVML, e.g. 2xA100-80GB or 8xH100-80GB (shown as simulated).
    #[arg(long, env = "BERTH_SIMULATE_GPUS", value_name = "SPEC")]
    pub simulate_gpus: Option<String>,
    /// How often to heartbeat to the control plane [default: 1s].
    #[arg(long, env = "BERTH_HEARTBEAT_INTERVAL", value_name = "DURATION")]
    pub heartbeat_interval: Option<String>,
    /// How often to re-read GPU, CPU, memory, disk and network readings [default: 5s].
    #[arg(long, env = "BERTH_INVENTORY_INTERVAL", value_name = "DURATION")]
    pub inventory_interval: Option<String>,
    /// HTTP address for /health and /metrics (off unless given).
    #[arg(long, env = "BERTH_HTTP", value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// cgroup v2 directory for replica limits [default: /sys/fs/cgroup/berth on a cgroup v2 machine].
    #[arg(long, env = "BERTH_CGROUP_ROOT", value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,
    /// Rotate a replica's log file at this size [default: 10MiB].
    #[arg(long, env = "BERTH_LOG_MAX_SIZE", value_name = "SIZE")]
    pub log_max_size: Option<String>,
    /// Rotated log files kept per replica [default: 3].
    #[arg(long, env = "BERTH_LOG_FILES", value_name = "N")]
    pub log_files: Option<u32>,
    /// First delay before restarting a replica that exited; doubles each time [default: 1s].
    #[arg(long, env = "BERTH_RESTART_BACKOFF", value_name = "DURATION")]
    pub restart_backoff: Option<String>,
    /// Longest delay between restarts [default: 1m].
    #[arg(long, env = "BERTH_RESTART_BACKOFF_MAX", value_name = "DURATION")]
    pub restart_backoff_max: Option<String>,
    /// How often to probe a running replica's health [default: 1s].
    #[arg(long, env = "BERTH_PROBE_INTERVAL", value_name = "DURATION")]
    pub probe_interval: Option<String>,
    /// Stop every replica when the agent stops (default: leave them running to be re-adopted).
    #[arg(long, env = "BERTH_STOP_REPLICAS_ON_EXIT")]
    pub stop_replicas_on_exit: bool,
    /// Log format: text or json [default: text].
    #[arg(long, env = "BERTH_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
}

/// The keys of the TOML config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    control: Option<String>,
    listen: Option<SocketAddr>,
    advertise: Option<String>,
    data_dir: Option<PathBuf>,
    node_name: Option<String>,
    labels: Option<Labels>,
    insecure: Option<bool>,
    insecure_bind_any: Option<bool>,
    token: Option<String>,
    simulate_gpus: Option<String>,
    heartbeat_interval: Option<String>,
    inventory_interval: Option<String>,
    http: Option<SocketAddr>,
    cgroup_root: Option<PathBuf>,
    log_max_size: Option<String>,
    log_files: Option<u32>,
    restart_backoff: Option<String>,
    restart_backoff_max: Option<String>,
    probe_interval: Option<String>,
    stop_replicas_on_exit: Option<bool>,
    log_format: Option<String>,
}

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Control-plane members; empty: standalone.
    pub control: Vec<String>,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Advertised address, if given.
    pub advertise: Option<String>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// The node's name.
    pub node_name: String,
    /// Labels.
    pub labels: Labels,
    /// Plaintext, no authentication (development).
    pub insecure: bool,
    /// Plaintext on a non-loopback address allowed.
    pub insecure_bind_any: bool,
    /// The join token, on first start.
    pub token: Option<berth_proto::auth::Token>,
    /// Simulated GPU spec.
    pub simulate_gpus: Option<String>,
    /// Heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Inventory refresh interval.
    pub inventory_interval: Duration,
    /// HTTP health/metrics address.
    pub http: Option<SocketAddr>,
    /// cgroup root, if given.
    pub cgroup_root: Option<PathBuf>,
    /// Log rotation size, bytes.
    pub log_max_bytes: u64,
    /// Rotated log files kept.
    pub log_files: u32,
    /// First restart delay.
    pub restart_backoff: Duration,
    /// Longest restart delay.
    pub restart_backoff_max: Duration,
    /// Health probe interval.
    pub probe_interval: Duration,
    /// Stop replicas when the agent stops.
    pub stop_replicas_on_exit: bool,
    /// Log format.
    pub log_format: LogFormat,
    /// The executable that runs shims and the demo runtime (this one by default).
    pub agent_exe: Option<PathBuf>,
}

impl Config {
    /// A configuration with every default, for `berth dev` and tests.
    pub fn new(data_dir: PathBuf, listen: SocketAddr, node_name: &str) -> Self {
        Config {
            control: Vec::new(),
            listen,
            advertise: None,
            data_dir,
            node_name: node_name.to_string(),
            labels: Labels::new(),
            insecure: true,
            insecure_bind_any: false,
            token: None,
            simulate_gpus: None,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            inventory_interval: DEFAULT_INVENTORY_INTERVAL,
            http: None,
            cgroup_root: None,
            log_max_bytes: DEFAULT_LOG_MAX_MIB * 1024 * 1024,
            log_files: DEFAULT_LOG_FILES,
            restart_backoff: DEFAULT_RESTART_BACKOFF,
            restart_backoff_max: DEFAULT_RESTART_BACKOFF_MAX,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            stop_replicas_on_exit: false,
            log_format: LogFormat::Text,
            agent_exe: None,
        }
    }

    /// Merges flags over the config file over defaults, and validates.
    pub fn load(flags: Flags) -> Result<Self, String> {
        let file: FileConfig = read_toml(flags.config.as_deref())?;
        let mut labels = file.labels.unwrap_or_default();
        for l in &flags.labels {
            let (k, v) = parse_label("label", l).map_err(|e| e.to_string())?;
            labels.insert(k, v);
        }
        let node_name = match flags.node_name.or(file.node_name) {
            Some(n) => n,
            None => default_node_name()?,
        };
        let log_max_bytes = match flags.log_max_size.or(file.log_max_size) {
            Some(text) => {
                let mib = parse_size_mib("log_max_size", &text).map_err(|e| e.to_string())?;
                if mib > MAX_LOG_MAX_MIB {
                    return Err(format!(
                        "log_max_size {text:?} is invalid: it must be at most {MAX_LOG_MAX_MIB}MiB"
                    ));
                }
                mib * 1024 * 1024
            }
            None => DEFAULT_LOG_MAX_MIB * 1024 * 1024,
        };
        let config = Config {
            control: address_list(flags.control.or(file.control)),
            listen: flags.listen.or(file.listen).unwrap_or_else(|| {
                DEFAULT_LISTEN
                    .parse()
                    .expect("default listen address parses")
            }),
            advertise: flags.advertise.or(file.advertise),
            data_dir: flags
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            node_name,
            labels,
            insecure: flags.insecure || file.insecure.unwrap_or(false),
            insecure_bind_any: flags.insecure_bind_any || file.insecure_bind_any.unwrap_or(false),
            token: flags
                .token
                .or(file.token)
                .map(|t| {
                    t.parse()
                        .map_err(|e: berth_common::ValidationError| format!("--token: {e}"))
                })
                .transpose()?,
            simulate_gpus: flags.simulate_gpus.or(file.simulate_gpus),
            heartbeat_interval: duration(
                "heartbeat_interval",
                flags.heartbeat_interval,
                file.heartbeat_interval,
                DEFAULT_HEARTBEAT_INTERVAL,
            )?,
            inventory_interval: duration(
                "inventory_interval",
                flags.inventory_interval,
                file.inventory_interval,
                DEFAULT_INVENTORY_INTERVAL,
            )?,
            http: flags.http.or(file.http),
            cgroup_root: flags.cgroup_root.or(file.cgroup_root),
            log_max_bytes,
            log_files: flags
                .log_files
                .or(file.log_files)
                .unwrap_or(DEFAULT_LOG_FILES),
            restart_backoff: duration(
                "restart_backoff",
                flags.restart_backoff,
                file.restart_backoff,
                DEFAULT_RESTART_BACKOFF,
            )?,
            restart_backoff_max: duration(
                "restart_backoff_max",
                flags.restart_backoff_max,
                file.restart_backoff_max,
                DEFAULT_RESTART_BACKOFF_MAX,
            )?,
            probe_interval: duration(
                "probe_interval",
                flags.probe_interval,
                file.probe_interval,
                DEFAULT_PROBE_INTERVAL,
            )?,
            stop_replicas_on_exit: flags.stop_replicas_on_exit
                || file.stop_replicas_on_exit.unwrap_or(false),
            log_format: flags
                .log_format
                .or(file.log_format)
                .map(|f| f.parse())
                .transpose()?
                .unwrap_or_default(),
            agent_exe: None,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks rules that span fields.
    pub fn validate(&self) -> Result<(), String> {
        validate_name("node_name", &self.node_name).map_err(|e| {
            format!("{e}; set --node-name to a name unique in the cluster, e.g. gpu-01")
        })?;
        validate_labels("label", &self.labels).map_err(|e| e.to_string())?;
        if self.insecure && !self.insecure_bind_any {
            berth_proto::tls::check_loopback(self.listen, "--listen")?;
        }
        if self.insecure && self.token.is_some() {
            return Err("--insecure excludes --token: a plaintext agent has no certificate".into());
        }
        if self.token.is_some() && self.control.is_empty() {
            return Err("--token is for joining a cluster: give --control ADDR too".into());
        }
        for (field, d) in [
            ("heartbeat_interval", self.heartbeat_interval),
            ("inventory_interval", self.inventory_interval),
            ("restart_backoff", self.restart_backoff),
            ("restart_backoff_max", self.restart_backoff_max),
            ("probe_interval", self.probe_interval),
        ] {
            if d < Duration::from_millis(10) || d > MAX_DURATION {
                return Err(format!(
                    "{field} {d:?} is invalid: it must be between 10ms and 24h"
                ));
            }
        }
        if self.restart_backoff_max < self.restart_backoff {
            return Err(format!(
                "restart_backoff_max {:?} is invalid: it must be at least restart_backoff ({:?})",
                self.restart_backoff_max, self.restart_backoff
            ));
        }
        if self.log_max_bytes == 0 {
            return Err(
                "log_max_size 0 is invalid: it must be at least 1MiB (a plain number means MiB)"
                    .into(),
            );
        }
        if let Some(a) = &self.advertise {
            validate_host_port("advertise", a)?;
        }
        for c in &self.control {
            validate_host_port("control", c)?;
        }
        if let Some(spec) = &self.simulate_gpus {
            crate::inventory::simulated::parse_spec(spec, &self.node_name)
                .map_err(|e| e.to_string())?;
        }
        if self.advertise.is_none() && self.listen.ip().is_unspecified() && !self.control.is_empty()
        {
            return Err(format!(
                "--advertise is required when listening on {}: give the address the control plane reaches this agent at",
                self.listen
            ));
        }
        Ok(())
    }

    /// The address the control plane reaches this agent at.
    pub fn advertised(&self, bound: SocketAddr) -> String {
        self.advertise.clone().unwrap_or_else(|| bound.to_string())
    }
}

/// The host name up to its first dot, lowercased: a node name if it fits the rules.
fn default_node_name() -> Result<String, String> {
    let host = sysinfo::System::host_name().unwrap_or_default();
    let name = host.split('.').next().unwrap_or("").to_lowercase();
    validate_name("node_name", &name).map_err(|_| {
        format!(
            "the host name {host:?} is not a valid node name (lowercase letters, digits and '-', at most 63): set --node-name"
        )
    })?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> Flags {
        Flags {
            node_name: Some("gpu-1".into()),
            insecure: true,
            ..Flags::default()
        }
    }

    #[test]
    fn security_settings_are_checked() {
        let err = |f: Flags| Config::load(f).unwrap_err();
        let e = err(Flags {
            insecure: false,
            token: Some(format!(
                "berth1.{}.abcdef.{}",
                "0".repeat(64),
                "s".repeat(40)
            )),
            ..flags()
        });
        assert!(e.contains("--token") && e.contains("--control"), "{e}");
        let e = err(Flags {
            listen: Some("0.0.0.0:7500".parse().unwrap()),
            ..flags()
        });
        assert!(
            e.contains("0.0.0.0:7500") && e.contains("--insecure-bind-any"),
            "{e}"
        );
        assert!(
            Config::load(Flags {
                listen: Some("0.0.0.0:7500".parse().unwrap()),
                insecure_bind_any: true,
                ..flags()
            })
            .is_ok()
        );
        let e = err(Flags {
            insecure: false,
            control: Some("127.0.0.1:7400".into()),
            token: Some("berth1.nope".into()),
            ..flags()
        });
        assert!(
            e.contains("--token") && e.contains("4 parts") && !e.contains("nope"),
            "{e}"
        );
    }

    #[test]
    fn file_and_flags_merge() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(
            &p,
            "control = \"10.0.0.1:7400,10.0.0.2:7400\"\nsimulate_gpus = \"2xA100-80GB\"\nheartbeat_interval = \"2s\"\n[labels]\nzone = \"a\"\n",
        )
        .unwrap();
        let c = Config::load(Flags {
            config: Some(p),
            labels: vec!["rack=r1".into()],
            heartbeat_interval: Some("500ms".into()),
            ..flags()
        })
        .unwrap();
        assert_eq!(c.control, ["10.0.0.1:7400", "10.0.0.2:7400"]);
        assert_eq!(
            c.heartbeat_interval,
            Duration::from_millis(500),
            "a flag beats the file"
        );
        assert_eq!(c.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(c.labels.get("rack").map(String::as_str), Some("r1"));
        assert_eq!(c.simulate_gpus.as_deref(), Some("2xA100-80GB"));
        assert_eq!(c.log_max_bytes, 10 * 1024 * 1024);
    }

    /// The annotated example in deploy/ stays valid.
    #[test]
    fn example_config_loads() {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/agent.toml");
        let c = Config::load(Flags {
            config: Some(p),
            ..Flags::default()
        })
        .unwrap();
        assert_eq!(c.node_name, "gpu-01");
        assert_eq!(c.control.len(), 3);
        assert_eq!(c.labels.get("rack").map(String::as_str), Some("r12"));
    }

    #[test]
    fn bad_values_name_the_setting() {
        let bad = |f: Flags| Config::load(f).unwrap_err();
        assert!(
            bad(Flags {
                node_name: Some("GPU_1".into()),
                ..flags()
            })
            .contains("--node-name")
        );
        assert!(
            bad(Flags {
                simulate_gpus: Some("lots".into()),
                ..flags()
            })
            .contains("simulate_gpus")
        );
        assert!(
            bad(Flags {
                labels: vec!["novalue".into()],
                ..flags()
            })
            .contains("label")
        );
        assert!(
            bad(Flags {
                control: Some("nope".into()),
                ..flags()
            })
            .contains("HOST:PORT")
        );
        assert!(
            bad(Flags {
                heartbeat_interval: Some("soon".into()),
                ..flags()
            })
            .contains("heartbeat_interval")
        );
        assert!(
            bad(Flags {
                log_max_size: Some("1KiB".into()),
                ..flags()
            })
            .contains("log_max_size")
        );
        assert!(
            bad(Flags {
                log_max_size: Some("0".into()),
                ..flags()
            })
            .contains("log_max_size")
        );
        assert!(
            bad(Flags {
                log_max_size: Some("17592186044416".into()),
                ..flags()
            })
            .contains("log_max_size")
        );
        assert!(
            bad(Flags {
                restart_backoff: Some("500000000000y".into()),
                ..flags()
            })
            .contains("restart_backoff")
        );
        assert!(
            bad(Flags {
                listen: Some("0.0.0.0:7500".parse().unwrap()),
                control: Some("10.0.0.1:7400".into()),
                insecure: false,
                ..flags()
            })
            .contains("--advertise")
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, "node_name = \"a\"\nbogus = 1\n").unwrap();
        let e = bad(Flags {
            config: Some(p.clone()),
            ..Flags::default()
        });
        assert!(
            e.contains("bogus") && e.contains("line 2") && e.contains(&p.display().to_string()),
            "{e}"
        );
    }
}
