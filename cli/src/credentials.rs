//! Where the CLI finds its cluster and credentials, like kubectl: `--config
//! FILE`, else `BERTH_CONFIG`, else `~/.config/berth/config`, else the
//! credentials of a running `berth dev` (`~/.config/berth/dev`); `BERTH_TOKEN`
//! overrides the file's token; `--ca-fingerprint` trusts a cluster without a
//! file. There is no way to skip verifying the server. Also `berth config
//! import|show`.

use std::path::{Path, PathBuf};

use berth_proto::grpc::Dialer;
use berth_proto::pki::Secret;
use berth_proto::tls::{ClientFile, Trust};
use clap::Subcommand;
use serde::Serialize;

use crate::client::CliError;
use crate::output::{OutputFormat, print_json};

/// The file `berth config import` writes and the CLI reads by default.
pub fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("berth").join("config"))
}

/// Below this, `cluster status` and `node list` warn about a certificate.
pub const EXPIRY_WARNING: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Seconds from now until `expires_ms` (negative once past).
pub fn seconds_left(expires_ms: Option<u64>) -> Option<i64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    expires_ms.map(|e| (e as i64 - now) / 1000)
}

/// Prints a warning on stderr for `what` (e.g. `member 2`) when its
/// certificate has less than [`EXPIRY_WARNING`] left.
pub fn warn_expiry(what: &str, left_s: Option<i64>) {
    let Some(left) = left_s else { return };
    if left < EXPIRY_WARNING.as_secs() as i64 {
        let when = if left <= 0 {
            "has expired".to_string()
        } else {
            format!(
                "expires in {}",
                humantime::format_duration(std::time::Duration::from_secs(left as u64))
            )
        };
        eprintln!(
            "warning: the certificate of {what} {when}; it renews itself at two thirds of its lifetime, so renewal is failing: check that process's log"
        );
    }
}

/// Where a running `berth dev` puts its admin credentials.
pub fn dev_path() -> Option<PathBuf> {
    default_path().map(|p| p.with_file_name("dev"))
}

/// The file the CLI reads when `--config` and `BERTH_CONFIG` are not given.
fn found_path() -> Option<PathBuf> {
    default_path()
        .filter(|p| p.is_file())
        .or_else(|| dev_path().filter(|p| p.is_file()))
}

/// How the CLI was told to connect.
#[derive(Debug, Default, Clone)]
pub struct ConnectArgs {
    /// `--server`, if given.
    pub server: Option<String>,
    /// `--config` or `BERTH_CONFIG`, if given.
    pub config: Option<PathBuf>,
    /// `--ca-fingerprint`, if given.
    pub ca_fingerprint: Option<String>,
    /// `BERTH_TOKEN`, if set.
    pub token: Option<String>,
    /// `--insecure`.
    pub insecure: bool,
}

/// Where to connect and how.
#[derive(Debug, Clone)]
pub struct Connection {
    /// Member addresses, comma-separated.
    pub servers: String,
    /// TLS trust and token, or plaintext.
    pub dialer: Dialer,
}

impl ConnectArgs {
    /// Resolves the servers, trust and token; errors say what to do.
    pub fn resolve(&self) -> Result<Connection, CliError> {
        if self.insecure {
            return Ok(Connection {
                servers: self
                    .server
                    .clone()
                    .unwrap_or_else(|| crate::DEFAULT_SERVER.to_string()),
                dialer: Dialer::Insecure,
            });
        }
        let path = self.config.clone().or_else(found_path);
        let file = path
            .as_deref()
            .map(ClientFile::load)
            .transpose()
            .map_err(|e| CliError::Usage(e.to_string()))?;
        let token = self
            .token
            .clone()
            .filter(|t| !t.trim().is_empty())
            .or_else(|| file.as_ref().and_then(|f| f.token.clone()));
        if let Some(t) = &token {
            t.parse::<berth_proto::auth::Token>()
                .map_err(|e| CliError::Usage(format!("BERTH_TOKEN or the config file: {e}")))?;
        }
        let trust = match (&self.ca_fingerprint, &file) {
            (Some(fp), _) => {
                if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(CliError::Usage(format!(
                        "--ca-fingerprint {fp:?} is invalid: it must be the CA's SHA-256, 64 hex digits (bootstrap prints it)"
                    )));
                }
                Trust::pinned(fp)
            }
            (None, Some(f)) => Trust::from_pem(&f.ca_pem, "config ca_pem")
                .map_err(|e| CliError::Usage(e.to_string()))?,
            (None, None) => {
                return Err(CliError::Usage(format!(
                    "no cluster credentials: import the admin.conf that bootstrap wrote (`berth config import FILE`), or pass --config FILE (or BERTH_CONFIG), or --ca-fingerprint with BERTH_TOKEN; {} does not exist. A development cluster started with --insecure needs --insecure here too",
                    default_path().map_or_else(
                        || "~/.config/berth/config".into(),
                        |p| p.display().to_string()
                    )
                )));
            }
        };
        let servers = self
            .server
            .clone()
            .or_else(|| file.as_ref().map(|f| f.servers.join(",")))
            .unwrap_or_else(|| crate::DEFAULT_SERVER.to_string());
        let dialer = Dialer::tls(trust, None, token.map(Secret::new))
            .map_err(|e| CliError::Usage(e.to_string()))?;
        Ok(Connection { servers, dialer })
    }
}

/// `berth config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Copy a credentials file (the admin.conf bootstrap wrote) to where the CLI looks by default.
    Import {
        /// The file.
        file: PathBuf,
        /// Write here instead of ~/.config/berth/config.
        #[arg(long, value_name = "PATH")]
        to: Option<PathBuf>,
    },
    /// Which file the CLI reads, and what it says (never the token).
    Show,
}

#[derive(Debug, Serialize)]
struct ConfigView {
    path: Option<String>,
    servers: Vec<String>,
    ca_fingerprint: Option<String>,
    token_id: Option<String>,
    token_from: Option<&'static str>,
}

/// Runs a `berth config` subcommand.
pub fn run(command: ConfigCommand, args: &ConnectArgs, out: OutputFormat) -> Result<(), CliError> {
    match command {
        ConfigCommand::Import { file, to } => {
            let parsed = ClientFile::load(&file).map_err(|e| CliError::Usage(e.to_string()))?;
            let target = to.or_else(default_path).ok_or_else(|| {
                CliError::Usage("neither HOME nor XDG_CONFIG_HOME is set: give --to PATH".into())
            })?;
            if let Some(dir) = target.parent() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    CliError::Other(anyhow::anyhow!("create {}: {e}", dir.display()))
                })?;
            }
            parsed
                .save(&target)
                .map_err(|e| CliError::Other(anyhow::anyhow!("{e}")))?;
            eprintln!(
                "imported {} into {} (cluster CA {})",
                file.display(),
                target.display(),
                parsed.ca_fingerprint
            );
            Ok(())
        }
        ConfigCommand::Show => {
            let path = args.config.clone().or_else(found_path);
            let file = path
                .as_deref()
                .map(ClientFile::load)
                .transpose()
                .map_err(|e| CliError::Usage(e.to_string()))?;
            let (token, from) = match (&args.token, file.as_ref().and_then(|f| f.token.clone())) {
                (Some(t), _) => (Some(t.clone()), Some("BERTH_TOKEN")),
                (None, Some(t)) => (Some(t), Some("config file")),
                _ => (None, None),
            };
            let view = ConfigView {
                path: path.as_deref().map(Path::display).map(|d| d.to_string()),
                servers: file.as_ref().map(|f| f.servers.clone()).unwrap_or_default(),
                ca_fingerprint: file.as_ref().map(|f| f.ca_fingerprint.clone()),
                token_id: token
                    .and_then(|t| t.parse::<berth_proto::auth::Token>().ok())
                    .map(|t| t.id),
                token_from: from,
            };
            match out {
                OutputFormat::Json => print_json(&view),
                OutputFormat::Table => {
                    out!(
                        "config:         {}",
                        view.path.as_deref().unwrap_or("(none)")
                    );
                    out!("servers:        {}", view.servers.join(","));
                    out!(
                        "ca fingerprint: {}",
                        view.ca_fingerprint.as_deref().unwrap_or("-")
                    );
                    out!(
                        "token:          {}",
                        match (&view.token_id, view.token_from) {
                            (Some(id), Some(from)) => format!("{id} (from {from})"),
                            _ => "-".into(),
                        }
                    );
                }
            }
            Ok(())
        }
    }
}
