//! `berth-gateway` configuration: flags, `BERTH_*` environment variables and
//! a TOML file (`--config`), merged in that order of precedence over the
//! defaults below, and validated before any port is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use berth_common::config::{address_list, duration, read_toml, validate_host_port};
use berth_common::telemetry::LogFormat;
use berth_proto::auth::Token;
use berth_proto::pki::Secret;
use clap::Args;
use serde::Deserialize;

/// Default address of the OpenAI-compatible HTTP endpoint.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default most requests one replica is sent at once.
pub const DEFAULT_MAX_INFLIGHT: u32 = 128;
/// Default most requests that wait for a replica, per model.
pub const DEFAULT_QUEUE_SIZE: u32 = 1024;
/// Default longest wait for a replica.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default longest wait for a replica of a deployment scaled to zero, while
/// its model's load time is not known yet.
pub const DEFAULT_COLD_START_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the gateway reports its load to the control plane.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Default share of requests that may be retried (the retry budget).
pub const DEFAULT_RETRY_BUDGET: f64 = 0.2;
/// Default consecutive failures after which a replica is ejected.
pub const DEFAULT_EJECT_AFTER: u32 = 5;
/// Default first ejection; it doubles while the replica keeps failing.
pub const DEFAULT_EJECT_FOR: Duration = Duration::from_secs(5);
/// Default largest request body.
pub const DEFAULT_MAX_BODY_MIB: u64 = 32;
/// Time to open a connection to a replica before trying another.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Command-line flags of `berth-gateway`. Every flag can also be set in the
/// `--config` TOML file under the same name with `_` for `-`.
#[derive(Debug, Args, Default, Clone)]
pub struct Flags {
    /// TOML config file; flags and BERTH_* variables override its keys.
    #[arg(long, env = "BERTH_GATEWAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address of the OpenAI-compatible endpoint (also /health and /metrics) [default: 127.0.0.1:8080].
    #[arg(long, env = "BERTH_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Control-plane members (comma-separated); any member serves the endpoint watch.
    #[arg(long, env = "BERTH_CONTROL", value_name = "ADDR[,ADDR..]")]
    pub control: Option<String>,
    /// A gateway token (`berth token create --role gateway`); it also pins the cluster's CA.
    #[arg(
        long,
        env = "BERTH_GATEWAY_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// A credentials file like admin.conf (servers, CA, token) instead of --control and --token.
    #[arg(long, env = "BERTH_GATEWAY_CREDENTIALS", value_name = "FILE")]
    pub credentials: Option<PathBuf>,
    /// Development only: plaintext gRPC to control-plane members started with --insecure.
    #[arg(long, env = "BERTH_INSECURE")]
    pub insecure: bool,
    /// This gateway's name in the members' logs [default: the host name].
    #[arg(long, env = "BERTH_GATEWAY_NAME", value_name = "NAME")]
    pub name: Option<String>,
    /// Require `Authorization: Bearer KEY` from model clients.
    #[arg(
        long,
        env = "BERTH_GATEWAY_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// Most requests sent to one replica at once; more wait in the model's queue [default: 128].
    #[arg(long, env = "BERTH_MAX_INFLIGHT_PER_REPLICA", value_name = "N")]
    pub max_inflight_per_replica: Option<u32>,
    /// Most requests waiting for a replica, per model; past it: 429 [default: 1024].
    #[arg(long, env = "BERTH_QUEUE_SIZE", value_name = "N")]
    pub queue_size: Option<u32>,
    /// Longest wait for a replica; past it: 503 [default: 30s].
    #[arg(long, env = "BERTH_QUEUE_TIMEOUT", value_name = "DURATION")]
    pub queue_timeout: Option<String>,
    /// Longest wait for a deployment scaled to zero to start a replica, while its model's load time is unknown; once known: twice the load time + 10s [default: 300s].
    #[arg(long, env = "BERTH_COLD_START_TIMEOUT", value_name = "DURATION")]
    pub cold_start_timeout: Option<String>,
    /// Share of requests that may be retried on another replica, 0 to 1 [default: 0.2].
    #[arg(long, env = "BERTH_RETRY_BUDGET", value_name = "RATIO")]
    pub retry_budget: Option<f64>,
    /// Consecutive failures after which a replica gets no requests for a while [default: 5].
    #[arg(long, env = "BERTH_EJECT_AFTER", value_name = "N")]
    pub eject_after: Option<u32>,
    /// How long a failing replica is left out at first; doubles up to 8x [default: 5s].
    #[arg(long, env = "BERTH_EJECT_FOR", value_name = "DURATION")]
    pub eject_for: Option<String>,
    /// Largest request body, in MiB [default: 32].
    #[arg(long, env = "BERTH_MAX_BODY_MIB", value_name = "MIB")]
    pub max_body_mib: Option<u64>,
    /// Threads serving requests [default: one per core].
    #[arg(long, env = "BERTH_GATEWAY_THREADS", value_name = "N")]
    pub threads: Option<usize>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "BERTH_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    control: Option<String>,
    token: Option<String>,
    credentials: Option<PathBuf>,
    insecure: Option<bool>,
    name: Option<String>,
    api_key: Option<String>,
    max_inflight_per_replica: Option<u32>,
    queue_size: Option<u32>,
    queue_timeout: Option<String>,
    cold_start_timeout: Option<String>,
    retry_budget: Option<f64>,
    eject_after: Option<u32>,
    eject_for: Option<String>,
    max_body_mib: Option<u64>,
    threads: Option<usize>,
    log_format: Option<String>,
}

/// How the gateway reaches the control plane.
#[derive(Debug, Clone)]
pub enum ControlAccess {
    /// A token: the CA is pinned by the token's fingerprint.
    Token(Token),
    /// A credentials file (servers, CA, token).
    Credentials(PathBuf),
    /// Plaintext, to members run with `--insecure`.
    Insecure,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The HTTP address.
    pub listen: SocketAddr,
    /// Control-plane members (may be empty with a credentials file).
    pub control: Vec<String>,
    /// How to authenticate to them.
    pub access: ControlAccess,
    /// This gateway's name.
    pub name: String,
    /// The key model clients must present, if any.
    pub api_key: Option<Secret>,
    /// Most requests per replica at once.
    pub max_inflight_per_replica: u32,
    /// Most waiting requests per model.
    pub queue_size: u32,
    /// Longest wait for a replica.
    pub queue_timeout: Duration,
    /// Longest wait for a cold deployment whose load time is unknown.
    pub cold_start_timeout: Duration,
    /// Share of requests that may be retried.
    pub retry_budget: f64,
    /// Consecutive failures before an ejection.
    pub eject_after: u32,
    /// The first ejection's length.
    pub eject_for: Duration,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Time to connect to a replica.
    pub connect_timeout: Duration,
    /// Worker threads (None: one per core).
    pub threads: Option<usize>,
    /// Log format.
    pub log_format: LogFormat,
}

impl Config {
    /// A configuration with the defaults, for embedding (`berth dev`, tests).
    pub fn new(listen: SocketAddr, control: Vec<String>, access: ControlAccess) -> Self {
        Config {
            listen,
            control,
            access,
            name: "gateway".into(),
            api_key: None,
            max_inflight_per_replica: DEFAULT_MAX_INFLIGHT,
            queue_size: DEFAULT_QUEUE_SIZE,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
            cold_start_timeout: DEFAULT_COLD_START_TIMEOUT,
            retry_budget: DEFAULT_RETRY_BUDGET,
            eject_after: DEFAULT_EJECT_AFTER,
            eject_for: DEFAULT_EJECT_FOR,
            max_body_bytes: (DEFAULT_MAX_BODY_MIB * 1024 * 1024) as usize,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            threads: None,
            log_format: LogFormat::Text,
        }
    }

    /// Merges flags, environment and file, and checks every value.
    pub fn load(flags: Flags) -> Result<Self, String> {
        let file: FileConfig = read_toml(flags.config.as_deref())?;
        let control = address_list(flags.control.or(file.control));
        for c in &control {
            validate_host_port("control", c)?;
        }
        let insecure = flags.insecure || file.insecure.unwrap_or(false);
        let token = flags.token.or(file.token);
        let credentials = flags.credentials.or(file.credentials);
        let access = match (insecure, token, credentials) {
            (true, None, None) => ControlAccess::Insecure,
            (true, _, _) => {
                return Err(
                    "--insecure cannot be combined with --token or --credentials: plaintext carries no credentials"
                        .into(),
                );
            }
            (false, Some(_), Some(_)) => {
                return Err("give --token or --credentials, not both".into());
            }
            (false, Some(t), None) => ControlAccess::Token(
                t.parse()
                    .map_err(|e: berth_common::ValidationError| format!("--token: {e}"))?,
            ),
            (false, None, Some(path)) => ControlAccess::Credentials(path),
            (false, None, None) => {
                return Err("the gateway needs the control plane's credentials: give --control ADDRS --token TOKEN (make one with `berth token create --role gateway`), or --credentials FILE".into());
            }
        };
        if control.is_empty() && !matches!(access, ControlAccess::Credentials(_)) {
            return Err(
                "--control is required (the control-plane members, e.g. 10.0.0.5:7400,10.0.0.6:7400)"
                    .into(),
            );
        }
        let max_inflight_per_replica = flags
            .max_inflight_per_replica
            .or(file.max_inflight_per_replica)
            .unwrap_or(DEFAULT_MAX_INFLIGHT);
        if max_inflight_per_replica == 0 {
            return Err("max_inflight_per_replica 0 is invalid: it must be at least 1".into());
        }
        let retry_budget = flags
            .retry_budget
            .or(file.retry_budget)
            .unwrap_or(DEFAULT_RETRY_BUDGET);
        if !(0.0..=1.0).contains(&retry_budget) {
            return Err(format!(
                "retry_budget {retry_budget} is invalid: it must be between 0 and 1 (0.2 lets one request in five be retried)"
            ));
        }
        let max_body_mib = flags
            .max_body_mib
            .or(file.max_body_mib)
            .unwrap_or(DEFAULT_MAX_BODY_MIB);
        if !(1..=1024).contains(&max_body_mib) {
            return Err(format!(
                "max_body_mib {max_body_mib} is invalid: it must be between 1 and 1024"
            ));
        }
        let eject_after = flags
            .eject_after
            .or(file.eject_after)
            .unwrap_or(DEFAULT_EJECT_AFTER);
        if eject_after == 0 {
            return Err("eject_after 0 is invalid: it must be at least 1".into());
        }
        let threads = flags.threads.or(file.threads);
        if let Some(n) = threads
            && !(1..=1024).contains(&n)
        {
            return Err(format!(
                "threads {n} is invalid: it must be between 1 and 1024 (leave it out for one per core)"
            ));
        }
        let name = match flags.name.or(file.name) {
            Some(n) => n,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "gateway".into()),
        };
        Ok(Config {
            listen: flags.listen.or(file.listen).unwrap_or_else(|| {
                // A constant that parses: checked by a test.
                DEFAULT_LISTEN
                    .parse()
                    .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080)))
            }),
            control,
            access,
            name,
            api_key: flags.api_key.or(file.api_key).map(Secret::new),
            max_inflight_per_replica,
            queue_size: flags
                .queue_size
                .or(file.queue_size)
                .unwrap_or(DEFAULT_QUEUE_SIZE),
            queue_timeout: duration(
                "queue_timeout",
                flags.queue_timeout,
                file.queue_timeout,
                DEFAULT_QUEUE_TIMEOUT,
            )?,
            cold_start_timeout: duration(
                "cold_start_timeout",
                flags.cold_start_timeout,
                file.cold_start_timeout,
                DEFAULT_COLD_START_TIMEOUT,
            )?,
            retry_budget,
            eject_after,
            eject_for: duration(
                "eject_for",
                flags.eject_for,
                file.eject_for,
                DEFAULT_EJECT_FOR,
            )?,
            max_body_bytes: (max_body_mib * 1024 * 1024) as usize,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            threads,
            log_format: flags
                .log_format
                .or(file.log_format)
                .map(|f| f.parse())
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> Flags {
        Flags {
            control: Some("127.0.0.1:7400".into()),
            insecure: true,
            ..Default::default()
        }
    }

    #[test]
    fn defaults_parse() {
        let c = Config::load(flags()).expect("defaults are valid");
        assert_eq!(c.listen, DEFAULT_LISTEN.parse().expect("parses"));
        assert_eq!(c.max_inflight_per_replica, DEFAULT_MAX_INFLIGHT);
        assert!(matches!(c.access, ControlAccess::Insecure));
    }

    /// The annotated example in deploy/ stays valid.
    #[test]
    fn example_config_loads() {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/gateway.toml");
        let c = Config::load(Flags {
            config: Some(p),
            // The example leaves the token out (it belongs in a secret store).
            insecure: true,
            ..Flags::default()
        })
        .expect("the example loads");
        assert_eq!(c.control.len(), 3);
        assert_eq!(c.listen, "0.0.0.0:8080".parse().expect("parses"));
        assert_eq!(c.queue_timeout, Duration::from_secs(30));
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = Config::load(Flags {
            retry_budget: Some(1.5),
            ..flags()
        })
        .expect_err("refused");
        assert!(e.contains("retry_budget 1.5"), "{e}");
        let e = Config::load(Flags {
            control: Some("nohost".into()),
            ..flags()
        })
        .expect_err("refused");
        assert!(e.contains("control \"nohost\""), "{e}");
        let e = Config::load(Flags {
            token: Some("berth1.nope".into()),
            insecure: false,
            ..flags()
        })
        .expect_err("refused");
        assert!(e.contains("--token"), "{e}");
        let e = Config::load(Flags {
            insecure: false,
            ..flags()
        })
        .expect_err("refused");
        assert!(e.contains("--role gateway"), "{e}");
    }
}
