//! gRPC services of a member: `Admin` (for people and tools), `NodeRegistry`
//! (for agents) and `Raft` (member to member). Handlers translate protobuf to domain types, call
//! `Member`, and map errors to status codes in one place (`status`).

use berth_proto::grpc;
use berth_proto::grpc::Channel;
use berth_proto::v1::admin_client::AdminClient;
use tonic::Status;

use crate::member::MemberError;
use crate::reconciler::nodes::{NodeTracker, NotHere};
use crate::state::{ObjectKind, Outcome, Rejection};

pub mod admin;
mod deployments;
mod nodes;
pub mod pki;
pub mod raft;
pub mod registry;
pub mod serving;

/// The one mapping from Berth errors to gRPC status codes.
pub fn status(e: MemberError) -> Status {
    match e {
        MemberError::Rejected(r) => match &r {
            Rejection::Invalid(_) => Status::invalid_argument(r.to_string()),
            Rejection::NotFound { .. } => Status::not_found(r.to_string()),
            Rejection::AlreadyExists { .. } => Status::already_exists(r.to_string()),
            Rejection::FailedPrecondition(_) => Status::failed_precondition(r.to_string()),
        },
        MemberError::Unavailable(m) => Status::unavailable(m),
        MemberError::NotFound(m) => Status::not_found(m),
        MemberError::FailedPrecondition(m) => Status::failed_precondition(m),
        MemberError::InvalidArgument(m) => Status::invalid_argument(m),
        MemberError::Internal(m) => Status::internal(m),
    }
}

/// NOT_FOUND for a `kind` named `name`, worded as the state machine words it.
fn not_found(kind: ObjectKind, name: &str) -> Status {
    status(MemberError::Rejected(Rejection::not_found(kind, name)))
}

/// A write answered with an outcome of another kind than its command's: a bug.
fn unexpected(outcome: Outcome) -> Status {
    Status::internal(format!("unexpected outcome {outcome:?}"))
}

/// Yields whether the leader's readings are available here, or returns the
/// leader's answer to `$req` through its Admin `$method` (see [`route`]).
macro_rules! here_or_leader {
    ($nodes:expr, $stale:expr, $req:ident, $method:ident) => {
        match super::route($nodes, $stale).await? {
            super::Route::Here { readings } => readings,
            super::Route::Leader(addr) => {
                return super::leader_client(&$nodes.member.dialer, &addr)?
                    .$method($req)
                    .await
                    .map(tonic::Response::into_inner);
            }
        }
    };
}
use here_or_leader;

/// Where a read that needs the leader's observations (heartbeats, the
/// scheduler's explanations) is answered.
enum Route {
    /// Here: with readings when this member leads, without when `stale`.
    Here {
        /// Whether the leader's observations are available.
        readings: bool,
    },
    /// At the leader, at this address.
    Leader(String),
}

async fn route(nodes: &NodeTracker, stale: bool) -> Result<Route, Status> {
    if stale {
        return Ok(Route::Here { readings: false });
    }
    match nodes.leader_here() {
        Ok(_) => {
            nodes.member.read_barrier(false).await.map_err(status)?;
            Ok(Route::Here { readings: true })
        }
        Err(NotHere::Leader(addr)) => Ok(Route::Leader(addr)),
        Err(e) => Err(registry::redirect(e)),
    }
}

fn leader_client(dialer: &grpc::Dialer, addr: &str) -> Result<AdminClient<Channel>, Status> {
    dialer
        .channel(addr)
        .map(AdminClient::new)
        .map_err(|e| Status::internal(e.to_string()))
}
