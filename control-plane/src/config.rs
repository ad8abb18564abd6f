//! `berth-control` configuration: flags, `BERTH_*` environment variables and
//! a TOML file (`--config`), merged in that order of precedence over the
//! defaults below, parsed into real types and validated before any port is
//! bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use berth_common::config::{address_list, duration, read_toml, validate_host_port};
use berth_common::telemetry::LogFormat;
use clap::Parser;
use serde::Deserialize;

/// Default gRPC address (Admin + Raft).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7400";
/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "berth-control-data";
/// Default minimum election timeout T (the maximum is 2T).
pub const DEFAULT_ELECTION_TIMEOUT: Duration = Duration::from_millis(150);
/// Default leader heartbeat interval.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(50);
/// Default number of log entries between snapshots.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 10_000;
/// Default time a request waits for a leader or a commit.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default number of threads that run a member's async work. One: a write's
/// path hands off between tasks a dozen times, and on one thread those
/// hand-offs wake no other thread (ARCHITECTURE.md, "One worker thread").
pub const DEFAULT_WORKER_THREADS: usize = 1;
/// The most worker threads `--worker-threads` accepts.
pub const MAX_WORKER_THREADS: usize = 256;
/// Default time `--join` keeps trying to reach the cluster.
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Default time a node may miss heartbeats before it is marked down.
pub const DEFAULT_NODE_GRACE: Duration = crate::reconciler::nodes::DEFAULT_NODE_GRACE;
/// Default lifetime of the leaf certificates this member signs.
pub const DEFAULT_CERT_LIFETIME: Duration = berth_proto::pki::DEFAULT_LEAF_LIFETIME;
/// Default time a new replica of a rollout has to become healthy.
pub const DEFAULT_PROGRESS_DEADLINE: Duration =
    crate::reconciler::replicas::DEFAULT_PROGRESS_DEADLINE;

/// Command-line flags of `berth-control`. Every flag but the hidden
/// `--test-disk-faults` can also be set in the `--config` TOML file under the
/// same name with `_` for `-`.
#[derive(Debug, Parser, Default)]
#[command(
    name = "berth-control",
    version,
    about = "Berth control-plane member: Raft-replicated model registry, deployments and placements",
    long_about = "Berth control-plane member. Start the first member of a new cluster with \
--bootstrap, add more with --join ADDR. A restarted member needs only --data-dir \
(its id and address are stored there on first start)."
)]
pub struct Flags {
    /// TOML config file; flags and BERTH_* variables override its keys.
    #[arg(long, env = "BERTH_CONTROL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This member's id, unique in the cluster (required on first start; stored in the data dir).
    #[arg(long, env = "BERTH_ID")]
    pub id: Option<u64>,
    /// gRPC address to listen on, for Admin and Raft [default: 127.0.0.1:7400].
    #[arg(long, env = "BERTH_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Address other members and clients reach this one at [default: the listen address].
    #[arg(long, env = "BERTH_ADVERTISE", value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Where the Raft log, snapshots and member identity live [default: ./berth-control-data].
    #[arg(long, env = "BERTH_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Start a new cluster with this member as its only voter.
    #[arg(long, env = "BERTH_BOOTSTRAP")]
    pub bootstrap: bool,
    /// Join an existing cluster through any of its members (comma-separated).
    #[arg(long, env = "BERTH_JOIN", value_name = "ADDR[,ADDR..]")]
    pub join: Option<String>,
    /// HTTP address for /health and /metrics (off unless given).
    #[arg(long, env = "BERTH_HTTP", value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// Development only: plaintext gRPC, no authentication, loopback addresses only.
    #[arg(long, env = "BERTH_INSECURE")]
    pub insecure: bool,
    /// With --insecure: allow listening on a non-loopback address (never on a shared network).
    #[arg(long, env = "BERTH_INSECURE_BIND_ANY")]
    pub insecure_bind_any: bool,
    /// Join token (berth1.…, from `berth token create --role member`); with --join on first start.
    #[arg(
        long,
        env = "BERTH_JOIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// With --bootstrap: use this CA certificate (PEM) instead of making one.
    #[arg(long, env = "BERTH_CA_CERT", value_name = "FILE", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// With --ca-cert: the CA's private key (PEM, mode 0600).
    #[arg(long, env = "BERTH_CA_KEY", value_name = "FILE", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Lifetime of the certificates this member signs for members and agents [default: 30d; at least 1m].
    #[arg(long, env = "BERTH_CERT_LIFETIME", value_name = "DURATION")]
    pub cert_lifetime: Option<String>,
    /// Minimum election timeout T; the maximum is 2T [default: 150ms].
    #[arg(long, env = "BERTH_ELECTION_TIMEOUT", value_name = "DURATION")]
    pub election_timeout: Option<String>,
    /// Leader heartbeat interval, at most a third of the election timeout [default: 50ms].
    #[arg(long, env = "BERTH_HEARTBEAT_INTERVAL", value_name = "DURATION")]
    pub heartbeat_interval: Option<String>,
    /// Build a snapshot and compact the log every N entries [default: 10000].
    #[arg(long, env = "BERTH_SNAPSHOT_EVERY", value_name = "N")]
    pub snapshot_every: Option<u64>,
    /// How long a request waits for a leader or a commit [default: 5s].
    #[arg(long, env = "BERTH_REQUEST_TIMEOUT", value_name = "DURATION")]
    pub request_timeout: Option<String>,
    /// How long --join keeps trying to reach the cluster [default: 15s].
    #[arg(long, env = "BERTH_JOIN_TIMEOUT", value_name = "DURATION")]
    pub join_timeout: Option<String>,
    /// How long a node may miss heartbeats before it is marked down [default: 5s].
    #[arg(long, env = "BERTH_NODE_GRACE", value_name = "DURATION")]
    pub node_grace: Option<String>,
    /// How long a new replica of a rollout has to become healthy before the rollout pauses [default: 10m].
    #[arg(long, env = "BERTH_PROGRESS_DEADLINE", value_name = "DURATION")]
    pub progress_deadline: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "BERTH_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Threads for gRPC, Raft and heartbeats; raise it for fleets of many thousands of nodes [default: 1].
    #[arg(long, env = "BERTH_WORKER_THREADS", value_name = "N")]
    pub worker_threads: Option<usize>,
    /// For the fault suite only: route the Raft log's file through the
    /// disk-fault backend, which fails or forgets writes as the file
    /// `disk-fault` in the data dir says (`raft::disk_faults`). Hidden, and
    /// a flag alone: no environment variable or config-file key can turn it
    /// on by accident.
    #[arg(long, hide = true)]
    pub test_disk_faults: bool,
}

/// The keys of the TOML config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    id: Option<u64>,
    listen: Option<SocketAddr>,
    advertise: Option<String>,
    data_dir: Option<PathBuf>,
    bootstrap: Option<bool>,
    join: Option<String>,
    http: Option<SocketAddr>,
    insecure: Option<bool>,
    insecure_bind_any: Option<bool>,
    token: Option<String>,
    ca_cert: Option<PathBuf>,
    ca_key: Option<PathBuf>,
    cert_lifetime: Option<String>,
    election_timeout: Option<String>,
    heartbeat_interval: Option<String>,
    snapshot_every: Option<u64>,
    request_timeout: Option<String>,
    join_timeout: Option<String>,
    node_grace: Option<String>,
    progress_deadline: Option<String>,
    log_format: Option<String>,
    worker_threads: Option<usize>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Member id, if given (required on first start).
    pub id: Option<u64>,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Advertised address, if given.
    pub advertise: Option<String>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Start a new cluster.
    pub bootstrap: bool,
    /// Members to join through.
    pub join: Vec<String>,
    /// HTTP health/metrics address.
    pub http: Option<SocketAddr>,
    /// Plaintext, no authentication (development).
    pub insecure: bool,
    /// Plaintext on a non-loopback address allowed.
    pub insecure_bind_any: bool,
    /// The join token, on first start with `--join`.
    pub token: Option<berth_proto::auth::Token>,
    /// An operator's CA certificate and key, for `--bootstrap`.
    pub ca: Option<(PathBuf, PathBuf)>,
    /// Lifetime of the leaves this member signs.
    pub cert_lifetime: Duration,
    /// Minimum election timeout.
    pub election_timeout: Duration,
    /// Heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Entries between snapshots.
    pub snapshot_every: u64,
    /// Request deadline for leader waits and commits.
    pub request_timeout: Duration,
    /// How long `--join` keeps trying.
    pub join_timeout: Duration,
    /// How long a node may miss heartbeats before it is down.
    pub node_grace: Duration,
    /// How long a new replica of a rollout has to become healthy.
    pub progress_deadline: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Threads of the async runtime (`berth-control` only; `berth dev`
    /// runs members on its own runtime).
    pub worker_threads: usize,
    /// The fault suite only: inject disk faults into the Raft log
    /// (`--test-disk-faults`).
    pub test_disk_faults: bool,
}

impl Config {
    /// A configuration with every default, for `berth dev` and tests.
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> Self {
        Config {
            id: None,
            listen,
            advertise: None,
            data_dir,
            bootstrap: false,
            join: Vec::new(),
            http: None,
            insecure: true,
            insecure_bind_any: false,
            token: None,
            ca: None,
            cert_lifetime: DEFAULT_CERT_LIFETIME,
            election_timeout: DEFAULT_ELECTION_TIMEOUT,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            snapshot_every: DEFAULT_SNAPSHOT_EVERY,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            join_timeout: DEFAULT_JOIN_TIMEOUT,
            node_grace: DEFAULT_NODE_GRACE,
            progress_deadline: DEFAULT_PROGRESS_DEADLINE,
            log_format: LogFormat::Text,
            worker_threads: DEFAULT_WORKER_THREADS,
            test_disk_faults: false,
        }
    }

    /// Merges flags over the config file over defaults, and validates.
    pub fn load(flags: Flags) -> Result<Self, String> {
        let file: FileConfig = read_toml(flags.config.as_deref())?;
        let config = Config {
            id: flags.id.or(file.id),
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
            bootstrap: flags.bootstrap || file.bootstrap.unwrap_or(false),
            join: address_list(flags.join.or(file.join)),
            http: flags.http.or(file.http),
            insecure: flags.insecure || file.insecure.unwrap_or(false),
            insecure_bind_any: flags.insecure_bind_any || file.insecure_bind_any.unwrap_or(false),
            token: flags
                .token
                .or(file.token)
                .map(|t| t.parse().map_err(|e: berth_common::ValidationError| format!("--token: {e}")))
                .transpose()?,
            ca: match (flags.ca_cert.or(file.ca_cert), flags.ca_key.or(file.ca_key)) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                _ => return Err("ca_cert and ca_key go together: give both, or neither to let --bootstrap make a CA".into()),
            },
            cert_lifetime: duration(
                "cert_lifetime",
                flags.cert_lifetime,
                file.cert_lifetime,
                DEFAULT_CERT_LIFETIME,
            )?,
            election_timeout: duration(
                "election_timeout",
                flags.election_timeout,
                file.election_timeout,
                DEFAULT_ELECTION_TIMEOUT,
            )?,
            heartbeat_interval: duration(
                "heartbeat_interval",
                flags.heartbeat_interval,
                file.heartbeat_interval,
                DEFAULT_HEARTBEAT_INTERVAL,
            )?,
            snapshot_every: flags
                .snapshot_every
                .or(file.snapshot_every)
                .unwrap_or(DEFAULT_SNAPSHOT_EVERY),
            request_timeout: duration(
                "request_timeout",
                flags.request_timeout,
                file.request_timeout,
                DEFAULT_REQUEST_TIMEOUT,
            )?,
            join_timeout: duration(
                "join_timeout",
                flags.join_timeout,
                file.join_timeout,
                DEFAULT_JOIN_TIMEOUT,
            )?,
            node_grace: duration(
                "node_grace",
                flags.node_grace,
                file.node_grace,
                DEFAULT_NODE_GRACE,
            )?,
            progress_deadline: duration(
                "progress_deadline",
                flags.progress_deadline,
                file.progress_deadline,
                DEFAULT_PROGRESS_DEADLINE,
            )?,
            log_format: flags
                .log_format
                .or(file.log_format)
                .map(|f| f.parse())
                .transpose()?
                .unwrap_or_default(),
            worker_threads: flags
                .worker_threads
                .or(file.worker_threads)
                .unwrap_or(DEFAULT_WORKER_THREADS),
            test_disk_faults: flags.test_disk_faults,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks rules that span fields.
    pub fn validate(&self) -> Result<(), String> {
        if self.id == Some(0) {
            return Err("id 0 is invalid: member ids start at 1".into());
        }
        if self.bootstrap && !self.join.is_empty() {
            return Err(
                "--bootstrap and --join exclude each other: bootstrap starts a new cluster, join enters an existing one"
                    .into(),
            );
        }
        if self.insecure && !self.insecure_bind_any {
            berth_proto::tls::check_loopback(self.listen, "--listen")?;
        }
        if self.insecure && (self.token.is_some() || self.ca.is_some()) {
            return Err("--insecure excludes --token, --ca-cert and --ca-key: a plaintext member has no certificates".into());
        }
        if self.ca.is_some() && !self.bootstrap {
            return Err("--ca-cert and --ca-key are for --bootstrap: a joining member receives the cluster's CA when it joins".into());
        }
        if self.token.is_some() && self.join.is_empty() {
            return Err("--token is for joining: give --join ADDR too".into());
        }
        if self.cert_lifetime < berth_proto::pki::MIN_LEAF_LIFETIME {
            return Err(format!(
                "cert_lifetime {:?} is invalid: it must be at least {:?}",
                self.cert_lifetime,
                berth_proto::pki::MIN_LEAF_LIFETIME
            ));
        }
        if self.heartbeat_interval.is_zero() {
            return Err("heartbeat_interval must be above 0".into());
        }
        if self.election_timeout < self.heartbeat_interval * 3 {
            return Err(format!(
                "election_timeout {:?} is invalid: it must be at least 3 heartbeat intervals ({:?})",
                self.election_timeout,
                self.heartbeat_interval * 3
            ));
        }
        if self.node_grace < Duration::from_millis(500) {
            return Err(format!(
                "node_grace {:?} is invalid: it must be at least 500ms (agents heartbeat every second by default)",
                self.node_grace
            ));
        }
        if self.snapshot_every == 0 {
            return Err("snapshot_every 0 is invalid: it must be at least 1 entry".into());
        }
        if !(1..=MAX_WORKER_THREADS).contains(&self.worker_threads) {
            return Err(format!(
                "worker_threads {} is invalid: it must be 1 to {MAX_WORKER_THREADS}",
                self.worker_threads
            ));
        }
        if let Some(a) = &self.advertise {
            validate_host_port("advertise", a)?;
        }
        for j in &self.join {
            validate_host_port("join", j)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("control.toml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn file_and_flags_merge() {
        let (_d, p) = write(
            "id = 3\nlisten = \"127.0.0.1:7410\"\nelection_timeout = \"1s\"\nsnapshot_every = 50\nworker_threads = 4\n",
        );
        let c = Config::load(Flags {
            config: Some(p),
            snapshot_every: Some(7),
            ..Flags::default()
        })
        .unwrap();
        assert_eq!(c.id, Some(3));
        assert_eq!(c.listen.port(), 7410);
        assert_eq!(c.election_timeout, Duration::from_secs(1));
        assert_eq!(c.snapshot_every, 7, "a flag beats the file");
        assert_eq!(c.heartbeat_interval, DEFAULT_HEARTBEAT_INTERVAL);
        assert_eq!(c.worker_threads, 4);
        let c = Config::load(Flags::default()).unwrap();
        assert_eq!(c.worker_threads, DEFAULT_WORKER_THREADS);
    }

    /// The annotated example in deploy/ stays valid.
    #[test]
    fn example_config_loads() {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/control.toml");
        let c = Config::load(Flags {
            config: Some(p),
            ..Flags::default()
        })
        .unwrap();
        assert_eq!(c.id, Some(1));
    }

    #[test]
    fn security_settings_are_checked() {
        let err = |f: Flags| Config::load(f).unwrap_err();
        let e = err(Flags {
            insecure: true,
            listen: Some("0.0.0.0:7400".parse().unwrap()),
            ..Flags::default()
        });
        assert!(
            e.contains("0.0.0.0:7400") && e.contains("--insecure-bind-any"),
            "{e}"
        );
        let e = err(Flags {
            join: Some("127.0.0.1:7400".into()),
            token: Some(format!("berth1.{}.abc.{}", "0".repeat(64), "s".repeat(40))),
            ..Flags::default()
        });
        assert!(e.contains("--token") && e.contains("id"), "{e}");
        let e = err(Flags {
            token: Some(format!(
                "berth1.{}.abcdef.{}",
                "0".repeat(64),
                "s".repeat(40)
            )),
            ..Flags::default()
        });
        assert!(e.contains("--join"), "{e}");
        let e = err(Flags {
            bootstrap: true,
            cert_lifetime: Some("10s".into()),
            ..Flags::default()
        });
        assert!(e.contains("cert_lifetime") && e.contains("at least"), "{e}");
        let e = err(Flags {
            ca_cert: Some("/tmp/ca.pem".into()),
            ca_key: Some("/tmp/ca.key".into()),
            ..Flags::default()
        });
        assert!(e.contains("--bootstrap"), "{e}");
    }

    #[test]
    fn malformed_file_names_file_and_line() {
        let (_d, p) = write("id = 1\nlisten = \n");
        let e = Config::load(Flags {
            config: Some(p.clone()),
            ..Flags::default()
        })
        .unwrap_err();
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(e.contains("line 2"), "{e}");
        let (_d, p) = write("id = 1\nbogus_key = 2\n");
        let e = Config::load(Flags {
            config: Some(p),
            ..Flags::default()
        })
        .unwrap_err();
        assert!(e.contains("bogus_key") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn bad_values_are_refused() {
        let bad = |f: Flags| Config::load(f).unwrap_err();
        assert!(
            bad(Flags {
                election_timeout: Some("soon".into()),
                ..Flags::default()
            })
            .contains("election_timeout")
        );
        assert!(
            bad(Flags {
                election_timeout: Some("100ms".into()),
                ..Flags::default()
            })
            .contains("heartbeat")
        );
        assert!(
            bad(Flags {
                bootstrap: true,
                join: Some("127.0.0.1:1".into()),
                ..Flags::default()
            })
            .contains("exclude")
        );
        assert!(
            bad(Flags {
                join: Some("nope".into()),
                ..Flags::default()
            })
            .contains("HOST:PORT")
        );
        assert!(
            bad(Flags {
                id: Some(0),
                ..Flags::default()
            })
            .contains("id 0")
        );
        for n in [0, MAX_WORKER_THREADS + 1] {
            let e = bad(Flags {
                worker_threads: Some(n),
                ..Flags::default()
            });
            assert!(
                e.contains(&format!("worker_threads {n}")) && e.contains("1 to"),
                "{e}"
            );
        }
    }
}
