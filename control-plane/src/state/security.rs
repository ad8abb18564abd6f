//! The replicated security ledger: tokens (only the SHA-256 of each
//! secret), the certificates the CA issued (identity, serial, expiry), and
//! revoked serials. The CA's key is never here: it lives in members' data
//! dirs only.

use std::collections::{BTreeMap, BTreeSet};

use berth_common::ValidationError;
use berth_common::security::{IssuedCert, TokenRecord, validate_token_id};
use serde::{Deserialize, Serialize};

use super::{ClusterState, ObjectKind, Outcome, Rejection};

/// Tokens, issued certificates and revocations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityState {
    /// Tokens by id.
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Certificates issued by the cluster's CA, by serial.
    pub certificates: BTreeMap<String, IssuedCert>,
    /// Serials no longer accepted.
    pub revoked: BTreeSet<String>,
    /// (token id, identity) pairs that may not buy a certificate again: the
    /// identity was removed, and the token that let it in cannot bring it back.
    pub blocked: BTreeSet<(String, String)>,
}

impl SecurityState {
    /// The expiry (unix ms) of each identity's newest certificate, by
    /// identity (`member 3`, `node gpu-1`).
    pub fn expiries(&self) -> std::collections::HashMap<&str, u64> {
        let mut out = std::collections::HashMap::new();
        for c in self.certificates.values() {
            let e = out.entry(c.identity.as_str()).or_insert(0);
            *e = (*e).max(c.not_after_ms);
        }
        out
    }
}

pub(super) fn create_token(
    state: &mut ClusterState,
    token: TokenRecord,
) -> Result<Outcome, Rejection> {
    validate_token_id("id", &token.id)?;
    if token.uses_left == Some(0) {
        return Err(ValidationError::new(
            "uses",
            0,
            "must be at least 1 (leave it out for unlimited)",
        )
        .into());
    }
    if state.security.tokens.contains_key(&token.id) {
        return Err(Rejection::AlreadyExists {
            kind: ObjectKind::Token,
            name: token.id,
        });
    }
    state
        .security
        .tokens
        .insert(token.id.clone(), token.clone());
    Ok(Outcome::Token(token))
}

pub(super) fn revoke_token(state: &mut ClusterState, id: &str) -> Result<Outcome, Rejection> {
    state
        .security
        .tokens
        .remove(id)
        .map(|_| Outcome::Deleted)
        .ok_or_else(|| Rejection::not_found(ObjectKind::Token, id))
}

/// Records a certificate; with `token`, spends one use of that join token
/// in the same step, so a token's last use buys exactly one certificate.
pub(super) fn issue(
    state: &mut ClusterState,
    token: Option<&str>,
    cert: IssuedCert,
    at_ms: u64,
) -> Result<Outcome, Rejection> {
    if let Some(id) = token
        && state
            .security
            .blocked
            .contains(&(id.to_string(), cert.identity.clone()))
    {
        return Err(Rejection::FailedPrecondition(format!(
            "token {id} cannot buy a certificate for {} again: it was removed from the cluster; an admin can make a new token (`berth token create`)",
            cert.identity
        )));
    }
    if let Some(id) = token {
        let refused = || {
            Rejection::FailedPrecondition(format!(
                "token {id} is unknown, expired or used up: ask an admin for a new one (`berth token create`)"
            ))
        };
        let t = state.security.tokens.get_mut(id).ok_or_else(refused)?;
        if !t.usable(at_ms) {
            return Err(refused());
        }
        if let Some(n) = t.uses_left.as_mut() {
            *n -= 1;
        }
    }
    if state.security.certificates.contains_key(&cert.serial) {
        return Err(Rejection::AlreadyExists {
            kind: ObjectKind::Certificate,
            name: cert.serial,
        });
    }
    // Forget certificates that expired long ago: the ledger would grow with every renewal.
    let horizon = at_ms.saturating_sub(24 * 3600 * 1000);
    let security = &mut state.security;
    security
        .certificates
        .retain(|_, c| c.not_after_ms > horizon);
    // A revoked serial whose certificate expired long ago needs no entry:
    // the handshake refuses it anyway.
    let certificates = &security.certificates;
    security.revoked.retain(|s| certificates.contains_key(s));
    let mut cert = cert;
    cert.token = token.map(str::to_string);
    security.certificates.insert(cert.serial.clone(), cert);
    Ok(Outcome::Noop)
}

/// Revokes every certificate of `identity` (`node gpu-1`, `member 3`) and
/// blocks the tokens that paid for them from buying it another; returns how
/// many certificates it revoked.
pub(super) fn revoke_identity(state: &mut ClusterState, identity: &str) -> usize {
    let security = &mut state.security;
    let mut n = 0;
    for c in security.certificates.values() {
        if c.identity == identity {
            n += usize::from(security.revoked.insert(c.serial.clone()));
            if let Some(t) = &c.token {
                security.blocked.insert((t.clone(), identity.to_string()));
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, Request, apply};
    use berth_common::security::Role;

    fn token(id: &str, uses: Option<u32>, expires_ms: Option<u64>) -> TokenRecord {
        TokenRecord {
            id: id.into(),
            role: Role::Agent,
            secret_sha256: [7; 32],
            created_ms: 0,
            expires_ms,
            uses_left: uses,
            description: String::new(),
        }
    }

    fn cert(serial: &str) -> IssuedCert {
        IssuedCert {
            serial: serial.into(),
            identity: "node gpu-1".into(),
            not_after_ms: 10_000_000,
            issued_ms: 1,
            token: None,
        }
    }

    fn run(state: &mut ClusterState, at_ms: u64, command: Command) -> Result<Outcome, Rejection> {
        let before = state.clone();
        let r = apply(state, Request { at_ms, command });
        if r.is_err() {
            assert_eq!(*state, before, "a rejected command changed the state");
        }
        r
    }

    #[test]
    fn a_join_token_buys_as_many_certificates_as_it_has_uses_and_no_more() {
        let mut s = ClusterState::default();
        run(
            &mut s,
            1,
            Command::CreateToken(token("join01", Some(2), Some(1000))),
        )
        .unwrap();
        assert!(matches!(
            run(&mut s, 1, Command::CreateToken(token("join01", None, None))),
            Err(Rejection::AlreadyExists { .. })
        ));
        let issue = |serial: &str| Command::IssueCertificate {
            token: Some("join01".into()),
            cert: cert(serial),
        };
        run(&mut s, 2, issue("01")).unwrap();
        run(&mut s, 3, issue("02")).unwrap();
        let e = run(&mut s, 4, issue("03")).unwrap_err();
        assert!(e.to_string().contains("used up"), "{e}");
        assert_eq!(s.security.certificates.len(), 2);
        assert_eq!(s.security.tokens["join01"].uses_left, Some(0));
    }

    #[test]
    fn an_expired_or_revoked_token_buys_nothing() {
        let mut s = ClusterState::default();
        run(
            &mut s,
            1,
            Command::CreateToken(token("join02", None, Some(100))),
        )
        .unwrap();
        let issue = Command::IssueCertificate {
            token: Some("join02".into()),
            cert: cert("0a"),
        };
        assert!(run(&mut s, 100, issue.clone()).is_err());
        run(
            &mut s,
            50,
            Command::RevokeToken {
                id: "join02".into(),
            },
        )
        .unwrap();
        assert!(run(&mut s, 60, issue).is_err());
        assert!(matches!(
            run(
                &mut s,
                60,
                Command::RevokeToken {
                    id: "join02".into()
                }
            ),
            Err(Rejection::NotFound { .. })
        ));
    }

    #[test]
    fn a_removed_identity_is_revoked_and_its_token_cannot_bring_it_back() {
        let mut s = ClusterState::default();
        run(&mut s, 1, Command::CreateToken(token("join03", None, None))).unwrap();
        let issue = |serial: &str, identity: &str| Command::IssueCertificate {
            token: Some("join03".into()),
            cert: IssuedCert {
                identity: identity.into(),
                ..cert(serial)
            },
        };
        run(&mut s, 2, issue("01", "node gpu-1")).unwrap();
        run(&mut s, 3, issue("02", "node gpu-2")).unwrap();
        run(
            &mut s,
            4,
            Command::RevokeIdentity {
                identity: "node gpu-1".into(),
            },
        )
        .unwrap();
        assert!(s.security.revoked.contains("01"));
        assert!(!s.security.revoked.contains("02"));
        let e = run(&mut s, 5, issue("03", "node gpu-1")).unwrap_err();
        assert!(e.to_string().contains("removed"), "{e}");
        // The token still works for other names: revoking it is the admin's call.
        run(&mut s, 6, issue("04", "node gpu-3")).unwrap();
    }

    #[test]
    fn bad_tokens_are_refused() {
        let mut s = ClusterState::default();
        let e = run(&mut s, 1, Command::CreateToken(token("BAD", None, None))).unwrap_err();
        assert!(e.to_string().contains("id"), "{e}");
        let e = run(
            &mut s,
            1,
            Command::CreateToken(token("okokok", Some(0), None)),
        )
        .unwrap_err();
        assert!(e.to_string().contains("uses"), "{e}");
    }
}
