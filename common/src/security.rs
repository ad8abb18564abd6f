//! Security domain types: roles, the tokens the cluster records (only a
//! hash of each secret), and the issued-certificate ledger. Pure data and
//! checks; the cryptography lives in `berth-proto`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// What a caller may do. `Agent` and `Member` tokens are join tokens: they
/// only buy a certificate; the certificate then carries the role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// Everything, including tokens and membership.
    Admin,
    /// Models, deployments, cordon and drain.
    Operator,
    /// Reads.
    Viewer,
    /// A node's agent: registration and heartbeats for its own node.
    Agent,
    /// A control-plane member: Raft and forwarding.
    Member,
    /// A `berth-gateway`: watches the ready endpoints (appended: roles are
    /// stored by index).
    Gateway,
}

impl Role {
    /// Every role, in order.
    pub const ALL: [Role; 6] = [
        Role::Admin,
        Role::Operator,
        Role::Viewer,
        Role::Agent,
        Role::Member,
        Role::Gateway,
    ];

    /// The lowercase name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::Agent => "agent",
            Role::Member => "member",
            Role::Gateway => "gateway",
        }
    }

    /// Whether a token of this role is a join token (it buys a certificate
    /// and nothing else) rather than an API token.
    pub fn joins(self) -> bool {
        matches!(self, Role::Agent | Role::Member)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                ValidationError::new(
                    "role",
                    s,
                    "must be one of admin, operator, viewer, agent, member, gateway",
                )
            })
    }
}

/// A token as the cluster records it: never the secret, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The public id (the third part of the token).
    pub id: String,
    /// What the token grants.
    pub role: Role,
    /// SHA-256 of the secret.
    pub secret_sha256: [u8; 32],
    /// When it was made (unix ms).
    pub created_ms: u64,
    /// When it stops working (unix ms); `None`: never.
    pub expires_ms: Option<u64>,
    /// Joins left; `None`: unlimited. Counted for join tokens only.
    pub uses_left: Option<u32>,
    /// A note from whoever made it.
    pub description: String,
}

impl TokenRecord {
    /// Whether the token may still be used at `now_ms`.
    pub fn usable(&self, now_ms: u64) -> bool {
        self.expires_ms.is_none_or(|e| now_ms < e) && self.uses_left != Some(0)
    }
}

/// A certificate the cluster's CA issued, as recorded through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCert {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Who holds it: `member 3`, `node gpu-1`, `user admin`.
    pub identity: String,
    /// When it expires (unix ms).
    pub not_after_ms: u64,
    /// When it was issued (unix ms).
    pub issued_ms: u64,
    /// The join token that paid for it (None: bootstrap or a renewal).
    pub token: Option<String>,
}

/// A token id: 6 to 32 lowercase letters and digits.
pub fn validate_token_id(field: &str, id: &str) -> Result<(), ValidationError> {
    let ok = (6..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            id,
            "must be 6 to 32 lowercase letters and digits",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_and_print() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        let e = "root".parse::<Role>().unwrap_err().to_string();
        assert!(
            e.contains("role") && e.contains("root") && e.contains("viewer"),
            "{e}"
        );
    }

    #[test]
    fn a_token_is_usable_until_it_expires_or_runs_out() {
        let mut t = TokenRecord {
            id: "abcdef".into(),
            role: Role::Agent,
            secret_sha256: [0; 32],
            created_ms: 0,
            expires_ms: Some(100),
            uses_left: Some(1),
            description: String::new(),
        };
        assert!(t.usable(99));
        assert!(!t.usable(100));
        t.uses_left = Some(0);
        assert!(!t.usable(0));
        t.expires_ms = None;
        t.uses_left = None;
        assert!(t.usable(u64::MAX));
    }

    #[test]
    fn token_ids_are_checked() {
        assert!(validate_token_id("id", "a1b2c3").is_ok());
        for bad in ["abc", "ABCDEF", "abc-def", &"a".repeat(33)] {
            assert!(validate_token_id("id", bad).is_err(), "{bad}");
        }
    }
}
