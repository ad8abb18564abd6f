//! `berth token create|list|revoke`: join tokens for agents and members,
//! API tokens for people and tools. A token's whole text is shown once, at
//! creation; the cluster keeps only a hash of its secret.

use berth_proto::v1::{CreateTokenRequest, ListTokensRequest, RevokeTokenRequest, TokenInfo};
use clap::Subcommand;
use serde::Serialize;

use crate::client::{CliError, Client};
use crate::output::{OutputFormat, print_json, table};

/// Token subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token; its text is printed once and stored nowhere.
    Create {
        /// admin, operator or viewer (API tokens), gateway (for `berth-gateway`), agent or member (join tokens).
        #[arg(long)]
        role: String,
        /// How long it works (24h, 30m, 7d); 0 or left out: until revoked (join tokens default to 24h).
        #[arg(long, value_parser = crate::args::duration)]
        ttl: Option<std::time::Duration>,
        /// How many joins it pays for (join tokens); left out: unlimited.
        #[arg(long)]
        uses: Option<u32>,
        /// A note saying what it is for.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Every token's id, role, expiry and uses left (never a secret).
    List,
    /// Revoke a token: it stops working at once.
    Revoke {
        /// The token's id (the third part of its text, or from `token list`).
        id: String,
    },
}

/// One token, as printed.
#[derive(Debug, Serialize)]
pub struct TokenView {
    id: String,
    role: String,
    created_ms: u64,
    expires_ms: Option<u64>,
    uses_left: Option<u32>,
    description: String,
}

impl From<TokenInfo> for TokenView {
    fn from(t: TokenInfo) -> Self {
        TokenView {
            id: t.id,
            role: t.role,
            created_ms: t.created_ms,
            expires_ms: t.expires_ms,
            uses_left: t.uses_left,
            description: t.description,
        }
    }
}

#[derive(Debug, Serialize)]
struct CreatedView {
    token: String,
    #[serde(flatten)]
    info: TokenView,
}

/// The default lifetime of a join token when `--ttl` is left out.
const JOIN_TOKEN_TTL_S: u64 = 24 * 3600;

/// Runs a token subcommand.
pub async fn run(
    command: TokenCommand,
    client: &Client,
    out: OutputFormat,
) -> Result<(), CliError> {
    match command {
        TokenCommand::Create {
            role,
            ttl,
            uses,
            description,
        } => {
            let role_parsed: berth_common::security::Role = role
                .parse()
                .map_err(|e: berth_common::ValidationError| CliError::Usage(e.to_string()))?;
            let ttl_s = match ttl {
                Some(t) => Some(t.as_secs()),
                None if role_parsed.joins() => Some(JOIN_TOKEN_TTL_S),
                None => None,
            };
            let r = client
                .admin(|mut c| {
                    let req = CreateTokenRequest {
                        role: role.clone(),
                        ttl_s,
                        uses,
                        description: description.clone(),
                    };
                    async move { c.create_token(req).await }
                })
                .await?;
            let info: TokenView = r.info.unwrap_or_default().into();
            match out {
                OutputFormat::Json => print_json(&CreatedView {
                    token: r.token,
                    info,
                }),
                OutputFormat::Table => {
                    out!("{}", r.token);
                    eprintln!(
                        "token {} (role {}) made; it is shown this once: keep it somewhere safe",
                        info.id, info.role
                    );
                }
            }
        }
        TokenCommand::List => {
            let r = client
                .admin(|mut c| async move { c.list_tokens(ListTokensRequest {}).await })
                .await?;
            let views: Vec<TokenView> = r.tokens.into_iter().map(Into::into).collect();
            match out {
                OutputFormat::Json => print_json(&views),
                OutputFormat::Table => {
                    let mut t = table(&["ID", "ROLE", "EXPIRES", "USES LEFT", "DESCRIPTION"]);
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    for v in &views {
                        t.add_row(vec![
                            v.id.clone(),
                            v.role.clone(),
                            v.expires_ms.map_or_else(
                                || "never".into(),
                                |e| {
                                    if e <= now {
                                        "expired".into()
                                    } else {
                                        format!(
                                            "in {}",
                                            humantime::format_duration(
                                                std::time::Duration::from_secs((e - now) / 1000)
                                            )
                                        )
                                    }
                                },
                            ),
                            v.uses_left
                                .map_or_else(|| "unlimited".into(), |u| u.to_string()),
                            v.description.clone(),
                        ]);
                    }
                    out!("{t}");
                }
            }
        }
        TokenCommand::Revoke { id } => {
            client
                .admin(|mut c| {
                    let id = id.clone();
                    async move { c.revoke_token(RevokeTokenRequest { id }).await }
                })
                .await?;
            eprintln!("token {id} revoked");
        }
    }
    Ok(())
}
