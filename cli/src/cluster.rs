//! `berth cluster status|members|remove`.

use berth_proto::v1::{ClusterStatusRequest, ClusterStatusResponse, RemoveMemberRequest};
use clap::Subcommand;
use serde::Serialize;

use crate::client::{CliError, Client};
use crate::output::{OutputFormat, print_json, table};

/// Cluster subcommands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Leader, term and members.
    Status {
        /// Answer from the contacted member's local view without asking the leader.
        #[arg(long)]
        stale: bool,
    },
    /// The members and their roles.
    Members {
        /// Answer from the contacted member's local view.
        #[arg(long)]
        stale: bool,
    },
    /// Remove a member from the cluster (it stops being a voter).
    Remove {
        /// The member's id (see `berth cluster members`).
        id: u64,
    },
}

/// One member, as printed.
#[derive(Debug, Serialize)]
pub struct MemberView {
    /// Member id.
    pub id: u64,
    /// Advertised address.
    pub addr: String,
    /// leader, follower or learner.
    pub role: String,
    /// Seconds before its newest certificate expires; null in plaintext clusters.
    pub cert_expires_in_s: Option<i64>,
}

/// `cluster status` as printed.
#[derive(Debug, Serialize)]
pub struct StatusView {
    /// The leader's id; null when there is none.
    pub leader_id: Option<u64>,
    /// The leader's address; null when there is none.
    pub leader_addr: Option<String>,
    /// Current term.
    pub term: u64,
    /// Every member.
    pub members: Vec<MemberView>,
    /// The member that answered.
    pub answered_by: u64,
    /// Its last log index.
    pub last_log_index: u64,
    /// Its applied index.
    pub applied_index: u64,
}

impl From<ClusterStatusResponse> for StatusView {
    fn from(r: ClusterStatusResponse) -> Self {
        StatusView {
            leader_id: r.leader_id,
            leader_addr: r.leader_id.map(|_| r.leader_addr),
            term: r.term,
            members: r
                .members
                .into_iter()
                .map(|m| MemberView {
                    id: m.id,
                    addr: m.addr,
                    role: m.role,
                    cert_expires_in_s: crate::credentials::seconds_left(m.cert_expires_ms),
                })
                .collect(),
            answered_by: r.answered_by,
            last_log_index: r.last_log_index,
            applied_index: r.applied_index,
        }
    }
}

fn members_table(members: &[MemberView]) -> String {
    let mut t = table(&["ID", "ADDRESS", "ROLE", "CERTIFICATE"]);
    for m in members {
        crate::credentials::warn_expiry(&format!("member {}", m.id), m.cert_expires_in_s);
        t.add_row(vec![
            m.id.to_string(),
            m.addr.clone(),
            m.role.clone(),
            expiry_cell(m.cert_expires_in_s),
        ]);
    }
    t.to_string()
}

/// `expires in 19d` for a table cell.
pub(crate) fn expiry_cell(left_s: Option<i64>) -> String {
    match left_s {
        None => "-".into(),
        Some(s) if s <= 0 => "EXPIRED".into(),
        Some(s) => {
            let days = s / 86_400;
            let text = if days > 0 {
                format!("{days}d")
            } else if s >= 3600 {
                format!("{}h", s / 3600)
            } else if s >= 60 {
                format!("{}m", s / 60)
            } else {
                format!("{s}s")
            };
            format!("expires in {text}")
        }
    }
}

async fn fetch_status(client: &Client, stale: bool) -> Result<StatusView, CliError> {
    let r = client
        .admin(|mut c| async move {
            c.cluster_status(ClusterStatusRequest {
                stale,
                digest: false,
            })
            .await
        })
        .await?;
    Ok(r.into())
}

/// Runs a cluster subcommand.
pub async fn run(cmd: ClusterCommand, client: &Client, out: OutputFormat) -> Result<(), CliError> {
    match cmd {
        ClusterCommand::Status { stale } => {
            let view = fetch_status(client, stale).await?;
            match out {
                OutputFormat::Json => print_json(&view),
                OutputFormat::Table => {
                    match (&view.leader_id, &view.leader_addr) {
                        (Some(id), Some(addr)) => out!("leader: {id} ({addr})"),
                        _ => out!("leader: none (no leader elected; is a majority of members up?)"),
                    }
                    out!("term:   {}", view.term);
                    out!(
                        "answered by member {} (log index {}, applied {})",
                        view.answered_by,
                        view.last_log_index,
                        view.applied_index
                    );
                    out!("{}", members_table(&view.members));
                }
            }
        }
        ClusterCommand::Members { stale } => {
            let view = fetch_status(client, stale).await?;
            match out {
                OutputFormat::Json => print_json(&view.members),
                OutputFormat::Table => out!("{}", members_table(&view.members)),
            }
        }
        ClusterCommand::Remove { id } => {
            let r = client
                .admin(|mut c| async move { c.remove_member(RemoveMemberRequest { id }).await })
                .await?;
            let view = StatusView::from(r);
            match out {
                OutputFormat::Json => print_json(&view),
                OutputFormat::Table => {
                    eprintln!("removed member {id}");
                    out!("{}", members_table(&view.members));
                }
            }
        }
    }
    Ok(())
}
