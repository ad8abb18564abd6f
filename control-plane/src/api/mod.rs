//! gRPC services of a member: `Admin` (for people and tools), `NodeRegistry`
//! (for agents) and `Raft` (member to member). Handlers translate protobuf to domain types, call
//! `Member`, and map errors to status codes in one place (`status`).

use tonic::Status;

use crate::member::MemberError;
use crate::state::Rejection;

pub mod admin;
mod nodes;
pub mod raft;
pub mod registry;

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
