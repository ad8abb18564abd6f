//! The control plane's side of security: `berth.v1.Pki` (a join token buys
//! a certificate; a certificate buys its renewal), the token calls of
//! `Admin`, and [`ClusterAuth`], which tells the authorization layer what a
//! token or a certificate is worth by looking at the replicated ledger.
//!
//! Every member holds the CA's key (`tls/ca.key`), so any member signs; the
//! certificate is recorded, and a join token's use spent, through Raft
//! before the certificate is handed out, so a used-up token never buys one.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_common::names::validate_name;
use berth_common::security::{IssuedCert, Role, TokenRecord};
use berth_proto::auth::{
    AuthError, Authenticate, BAD_TOKEN, CatchUp, Principal, Token, Via, caller, certificate_role,
};
use berth_proto::grpc::invalid_argument;
use berth_proto::pki::{Ca, Identity, LeafInfo};
use berth_proto::v1::pki_server::Pki;
use berth_proto::v1::{self as pb};
use tonic::{Request, Response, Status};

use super::{status, unexpected};
use crate::member::{Member, now_ms};
use crate::raft::state_machine::StateView;
use crate::state::{Command, Outcome};

/// The most extra names a certificate request may ask for.
const MAX_NAMES: usize = 16;

/// The cluster CA as a member holds it, and how long the leaves it signs last.
pub struct Signer {
    /// The CA, key included.
    pub ca: Ca,
    /// Lifetime of the leaf certificates it signs.
    pub lifetime: Duration,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("ca", &self.ca)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Signer {
    /// Signs `csr_der` for `identity`, records the certificate through Raft
    /// (spending a use of `token`, if given), and only then returns it.
    pub async fn issue(
        &self,
        member: &Member,
        csr_der: &[u8],
        identity: &Identity,
        names: &[String],
        token: Option<&str>,
    ) -> Result<berth_proto::pki::Issued, Status> {
        if names.len() > MAX_NAMES || names.iter().any(|n| n.is_empty() || n.len() > 253) {
            return Err(Status::invalid_argument(format!(
                "names must be at most {MAX_NAMES} DNS names or IP addresses of 1 to 253 characters"
            )));
        }
        let now = SystemTime::now();
        let issued = self
            .ca
            .sign_csr(csr_der, identity, names, self.lifetime, now)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let record = IssuedCert {
            serial: issued.serial.clone(),
            identity: identity.to_string(),
            not_after_ms: ms(issued.not_after),
            issued_ms: ms(now),
            token: None,
        };
        member
            .write(Command::IssueCertificate {
                token: token.map(str::to_string),
                cert: record,
            })
            .await
            .map_err(status)?;
        tracing::info!(identity = %identity, serial = %issued.serial, "issued a certificate");
        Ok(issued)
    }
}

/// The Pki service of one member.
pub struct PkiService {
    member: Member,
    signer: Arc<Signer>,
}

impl PkiService {
    /// Serves certificates signed by `signer`, recorded through `member`.
    pub fn new(member: Member, signer: Arc<Signer>) -> Self {
        PkiService { member, signer }
    }
}

#[tonic::async_trait]
impl Pki for PkiService {
    #[tracing::instrument(skip_all)]
    async fn join(
        &self,
        request: Request<pb::PkiJoinRequest>,
    ) -> Result<Response<pb::PkiJoinResponse>, Status> {
        let principal = caller(&request).cloned().ok_or_else(|| {
            Status::failed_precondition(
                "this member runs with --insecure: there is nothing to join with a token",
            )
        })?;
        let req = request.into_inner();
        let identity = match principal.role {
            Role::Agent => {
                validate_name("node_name", &req.node_name).map_err(|e| invalid_argument(&e))?;
                Identity::Node(req.node_name)
            }
            Role::Member if req.member_id > 0 => Identity::Member(req.member_id),
            Role::Member => {
                return Err(Status::invalid_argument(
                    "member_id must be given and above 0 with a member token",
                ));
            }
            other => {
                return Err(Status::permission_denied(format!(
                    "a {other} token cannot join: use an agent or member token"
                )));
            }
        };
        let issued = self
            .signer
            .issue(
                &self.member,
                &req.csr_der,
                &identity,
                &req.names,
                principal.token_id(),
            )
            .await?;
        Ok(Response::new(pb::PkiJoinResponse {
            cert_pem: format!("{}{}", issued.cert_pem, self.signer.ca.cert_pem()),
            ca_pem: self.signer.ca.cert_pem().to_string(),
            ca_key_pem: if matches!(identity, Identity::Member(_)) {
                self.signer.ca.key_pem().expose().to_string()
            } else {
                String::new()
            },
            not_after_ms: ms(issued.not_after),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn renew(
        &self,
        request: Request<pb::PkiRenewRequest>,
    ) -> Result<Response<pb::PkiRenewResponse>, Status> {
        let Some(Principal {
            via: Via::Certificate(identity),
            ..
        }) = caller(&request).cloned()
        else {
            return Err(Status::permission_denied(
                "renewal is paid for with the current certificate: call it over mTLS",
            ));
        };
        let req = request.into_inner();
        let issued = self
            .signer
            .issue(&self.member, &req.csr_der, &identity, &req.names, None)
            .await?;
        Ok(Response::new(pb::PkiRenewResponse {
            cert_pem: format!("{}{}", issued.cert_pem, self.signer.ca.cert_pem()),
            not_after_ms: ms(issued.not_after),
        }))
    }
}

/// What the ledger keeps of `token`: its id and the hash of its secret.
pub fn token_record(
    token: &Token,
    role: Role,
    ttl: Option<Duration>,
    uses: Option<u32>,
    description: String,
) -> TokenRecord {
    let now = now_ms();
    TokenRecord {
        id: token.id.clone(),
        role,
        secret_sha256: token.secret_sha256(),
        created_ms: now,
        expires_ms: ttl.map(|t| now.saturating_add(t.as_millis() as u64)),
        uses_left: uses,
        description,
    }
}

fn token_info(t: &TokenRecord) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id.clone(),
        role: t.role.to_string(),
        created_ms: t.created_ms,
        expires_ms: t.expires_ms,
        uses_left: t.uses_left,
        description: t.description.clone(),
    }
}

fn insecure() -> Status {
    Status::failed_precondition(
        "this cluster runs with --insecure: it has no CA and no tokens; start it without --insecure",
    )
}

/// `Admin.CreateToken`: makes the secret here, records only its hash.
pub async fn create_token(
    member: &Member,
    signer: Option<&Signer>,
    req: pb::CreateTokenRequest,
) -> Result<pb::CreateTokenResponse, Status> {
    let signer = signer.ok_or_else(insecure)?;
    let role: Role = req.role.parse().map_err(|e| invalid_argument(&e))?;
    if req.description.len() > 256 {
        return Err(Status::invalid_argument(
            "description must be at most 256 characters",
        ));
    }
    let token =
        Token::generate(&signer.ca.fingerprint()).map_err(|e| Status::internal(e.to_string()))?;
    let ttl = req
        .ttl_s
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s.min(u64::MAX / 1000)));
    let record = token_record(&token, role, ttl, req.uses, req.description);
    match member
        .write(Command::CreateToken(record))
        .await
        .map_err(status)?
    {
        Outcome::Token(t) => {
            tracing::info!(token = %t.id, role = %t.role, "created a token");
            Ok(pb::CreateTokenResponse {
                token: token.reveal().expose().to_string(),
                info: Some(token_info(&t)),
            })
        }
        other => Err(unexpected(other)),
    }
}

/// `Admin.ListTokens`.
pub fn list_tokens(member: &Member) -> pb::ListTokensResponse {
    let applied = member.state.read();
    pb::ListTokensResponse {
        tokens: applied
            .state
            .security
            .tokens
            .values()
            .map(token_info)
            .collect(),
    }
}

/// `Admin.RevokeToken`.
pub async fn revoke_token(member: &Member, id: String) -> Result<(), Status> {
    member
        .write(Command::RevokeToken { id: id.clone() })
        .await
        .map_err(status)?;
    tracing::info!(token = %id, "revoked a token");
    Ok(())
}

/// What tokens and certificates are worth, from the replicated ledger.
pub struct ClusterAuth {
    state: StateView,
    ca_fingerprint: String,
    /// The member whose state this is, once it runs: a refused token is
    /// judged again after a read barrier, because this member may not have
    /// applied a token the leader already acknowledged.
    member: Arc<OnceLock<Member>>,
}

impl ClusterAuth {
    /// Judges by `state`; tokens must pin the CA with `ca_fingerprint`;
    /// catches up through the member put in `member` once it exists.
    pub fn new(state: StateView, ca_fingerprint: String, member: Arc<OnceLock<Member>>) -> Self {
        ClusterAuth {
            state,
            ca_fingerprint,
            member,
        }
    }
}

impl Authenticate for ClusterAuth {
    fn token(&self, token: &Token) -> Result<Principal, AuthError> {
        let bad = || AuthError::Unauthenticated(BAD_TOKEN.into());
        let applied = self.state.read();
        let record = applied.state.security.tokens.get(&token.id);
        // Hash and compare even for an unknown id, so the time taken does not
        // tell an unknown id from a wrong secret.
        let stored = record.map_or([0u8; 32], |r| r.secret_sha256);
        let matches = token.matches(&stored);
        let record = record.ok_or_else(bad)?;
        if !matches || token.ca_fingerprint != self.ca_fingerprint || !record.usable(now_ms()) {
            return Err(bad());
        }
        Ok(Principal {
            role: record.role,
            via: if record.role.joins() {
                Via::JoinToken(record.id.clone())
            } else {
                Via::Token(record.id.clone())
            },
        })
    }

    fn catch_up(&self) -> Pin<Box<dyn Future<Output = CatchUp> + Send>> {
        let Some(member) = self.member.get().cloned() else {
            return Box::pin(std::future::ready(CatchUp::Current));
        };
        // Even a leader may not have applied all it committed (just elected).
        Box::pin(async move {
            match member.read_barrier(false).await {
                Ok(()) => CatchUp::CaughtUp,
                Err(e) => CatchUp::Failed(e.to_string()),
            }
        })
    }

    fn certificate(&self, leaf: &LeafInfo) -> Result<Principal, AuthError> {
        let identity = leaf.identity.clone().ok_or_else(|| {
            AuthError::Unauthenticated(
                "the client certificate carries no Berth identity (berth://member/ID, node/NAME or user/NAME)".into(),
            )
        })?;
        if self
            .state
            .read()
            .state
            .security
            .revoked
            .contains(&leaf.serial)
        {
            return Err(AuthError::Unauthenticated(format!(
                "the certificate of {identity} (serial {}) was revoked",
                leaf.serial
            )));
        }
        Ok(Principal {
            role: certificate_role(&identity),
            via: Via::Certificate(identity),
        })
    }
}
