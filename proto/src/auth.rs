//! Authentication and authorization in one tower layer for every gRPC
//! service: the caller (its certificate's identity, or a bearer token) is
//! mapped to a [`Principal`], and each method is looked up in one static
//! table ([`access`]) of who may call it. A method missing from the table
//! is denied; a test walks every method of every service.
//!
//! Handlers never check roles. The one check left to a handler is about
//! data, not roles: an agent may only speak for its own node
//! ([`Principal::node`]).

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use berth_common::ValidationError;
use berth_common::security::{Role, validate_token_id};
use subtle::ConstantTimeEq;
use tonic::Status;

use crate::pki::{Identity, LeafInfo, Secret};

/// The version prefix of every Berth token.
pub const TOKEN_PREFIX: &str = "berth1";
/// Failed authentications a peer address may make per [`FAILURE_WINDOW`]
/// before its requests are refused without being checked.
pub const MAX_FAILURES: u32 = 10;
/// The window over which failed authentications are counted.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(10);

/// A token: `berth1.<ca-sha256>.<id>.<secret>`. The fingerprint pins the
/// cluster's CA (a joiner checks the server against it before it sends the
/// secret); the id is public; only a hash of the secret is stored.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// SHA-256 of the cluster CA's certificate, lowercase hex.
    pub ca_fingerprint: String,
    /// The public id.
    pub id: String,
    /// The secret.
    pub secret: Secret,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({})", self.id)
    }
}

impl Token {
    /// The whole token, to hand to its user once.
    pub fn reveal(&self) -> Secret {
        Secret::new(format!(
            "{TOKEN_PREFIX}.{}.{}.{}",
            self.ca_fingerprint,
            self.id,
            self.secret.expose()
        ))
    }

    /// SHA-256 of the secret, as stored.
    pub fn secret_sha256(&self) -> [u8; 32] {
        crate::pki::sha256(self.secret.expose().as_bytes())
    }

    /// Whether `stored` is the hash of this token's secret, in constant time.
    pub fn matches(&self, stored: &[u8; 32]) -> bool {
        self.secret_sha256().ct_eq(stored).into()
    }

    /// A new token for the CA with `ca_fingerprint`: a 12-character id and a
    /// 256-bit secret from the system's generator.
    pub fn generate(ca_fingerprint: &str) -> Result<Token, crate::pki::PkiError> {
        Ok(Token {
            ca_fingerprint: ca_fingerprint.to_string(),
            id: crate::pki::random_hex(6)?,
            secret: Secret::new(crate::pki::random_hex(32)?),
        })
    }
}

impl FromStr for Token {
    type Err = ValidationError;

    /// Parses a token; the error never repeats the secret.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |rule: &str| {
            ValidationError::new(
                "token",
                "[redacted]",
                format!(
                    "{rule}; a token looks like berth1.<64 hex>.<id>.<secret>: copy it again from `berth token create` or the bootstrap output"
                ),
            )
        };
        let mut parts = s.trim().split('.');
        let (Some(prefix), Some(fp), Some(id), Some(secret), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad("it must have 4 parts separated by dots"));
        };
        if prefix != TOKEN_PREFIX {
            return Err(bad(&format!("it must start with {TOKEN_PREFIX}.")));
        }
        if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(
                "its second part must be the CA's SHA-256 fingerprint, 64 hex digits",
            ));
        }
        validate_token_id("token id", id).map_err(|_| {
            bad("its third part (the id) must be 6 to 32 lowercase letters and digits")
        })?;
        if secret.len() < 32 || !secret.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(bad(
                "its fourth part (the secret) must be at least 32 letters and digits",
            ));
        }
        Ok(Token {
            ca_fingerprint: fp.to_ascii_lowercase(),
            id: id.to_string(),
            secret: Secret::new(secret),
        })
    }
}

/// How a caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// A client certificate signed by the cluster's CA.
    Certificate(Identity),
    /// An API token (admin, operator, viewer).
    Token(String),
    /// A join token: it may only ask for a certificate.
    JoinToken(String),
    /// Nothing: plaintext development mode, or an unauthenticated method.
    Nothing,
}

/// Who is calling, as the layer established it; handlers read it from the
/// request's extensions with [`caller`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// What it may do.
    pub role: Role,
    /// How it proved it.
    pub via: Via,
}

impl Principal {
    /// The node an agent certificate speaks for.
    pub fn node(&self) -> Option<&str> {
        match &self.via {
            Via::Certificate(Identity::Node(n)) => Some(n),
            _ => None,
        }
    }

    /// The token id, for join and API tokens.
    pub fn token_id(&self) -> Option<&str> {
        match &self.via {
            Via::Token(id) | Via::JoinToken(id) => Some(id),
            _ => None,
        }
    }
}

/// The principal the layer attached to `request`; `None` in plaintext
/// development mode, where there is no authentication.
pub fn caller<T>(request: &tonic::Request<T>) -> Option<&Principal> {
    request.extensions().get::<Principal>()
}

/// Who may call a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Callers with one of these roles, by certificate or API token.
    Roles(&'static [Role]),
    /// Holders of a join token (agent or member), and nobody else.
    JoinToken,
    /// Anyone who completed the TLS handshake, even without credentials
    /// (health checks).
    Anyone,
}

const ADMIN: &[Role] = &[Role::Admin];
/// A follower forwards a membership change to the leader as itself.
const ADMIN_FORWARDED: &[Role] = &[Role::Admin, Role::Member];
const OPERATOR: &[Role] = &[Role::Admin, Role::Operator];
/// Reads: people and tools, and members (a follower asks the leader on a caller's behalf).
const VIEWER: &[Role] = &[Role::Admin, Role::Operator, Role::Viewer, Role::Member];
const AGENT: &[Role] = &[Role::Agent];
const MEMBER: &[Role] = &[Role::Member];
const HOLDER: &[Role] = &[Role::Agent, Role::Member, Role::Admin];
/// Who may report serving load: gateways, and members (a follower relays
/// a gateway's report to the leader).
const REPORTER: &[Role] = &[Role::Gateway, Role::Member];
/// The serving path's watchers: gateways, people and tools that read, and
/// members (a follower relays the leader's stream).
const WATCHER: &[Role] = &[
    Role::Gateway,
    Role::Admin,
    Role::Operator,
    Role::Viewer,
    Role::Member,
];

/// The access table: every method of every service Berth serves. A method
/// not listed here is denied.
pub const TABLE: &[(&str, Access)] = &[
    ("/berth.v1.Admin/ClusterStatus", Access::Roles(VIEWER)),
    (
        "/berth.v1.Admin/RemoveMember",
        Access::Roles(ADMIN_FORWARDED),
    ),
    ("/berth.v1.Admin/CreateModel", Access::Roles(OPERATOR)),
    ("/berth.v1.Admin/GetModel", Access::Roles(VIEWER)),
    ("/berth.v1.Admin/ListModels", Access::Roles(VIEWER)),
    ("/berth.v1.Admin/DeleteModel", Access::Roles(OPERATOR)),
    ("/berth.v1.Admin/AddModelVersion", Access::Roles(OPERATOR)),
    (
        "/berth.v1.Admin/RemoveModelVersion",
        Access::Roles(OPERATOR),
    ),
    ("/berth.v1.Admin/ListNodes", Access::Roles(VIEWER)),
    ("/berth.v1.Admin/GetNode", Access::Roles(VIEWER)),
    ("/berth.v1.Admin/CordonNode", Access::Roles(OPERATOR)),
    ("/berth.v1.Admin/UncordonNode", Access::Roles(OPERATOR)),
    ("/berth.v1.Admin/DrainNode", Access::Roles(OPERATOR)),
    ("/berth.v1.Admin/QuarantineGpu", Access::Roles(OPERATOR)),
    ("/berth.v1.Admin/ReleaseGpu", Access::Roles(OPERATOR)),
    ("/berth.v1.Admin/SimulateGpuFault", Access::Roles(OPERATOR)),
    ("/berth.v1.Admin/CreateDeployment", Access::Roles(OPERATOR)),
    ("/berth.v1.Admin/GetDeployment", Access::Roles(VIEWER)),
    ("/berth.v1.Admin/ListDeployments", Access::Roles(VIEWER)),
    ("/berth.v1.Admin/ScaleDeployment", Access::Roles(OPERATOR)),
    ("/berth.v1.Admin/UpdateDeployment", Access::Roles(OPERATOR)),
    (
        "/berth.v1.Admin/RollbackDeployment",
        Access::Roles(OPERATOR),
    ),
    ("/berth.v1.Admin/DeleteDeployment", Access::Roles(OPERATOR)),
    (
        "/berth.v1.Admin/SetDeploymentAliases",
        Access::Roles(OPERATOR),
    ),
    ("/berth.v1.Admin/SetAutoscale", Access::Roles(OPERATOR)),
    ("/berth.v1.Admin/ExplainDeployment", Access::Roles(VIEWER)),
    ("/berth.v1.Admin/ListClusterReplicas", Access::Roles(VIEWER)),
    ("/berth.v1.Admin/ReplicaLogs", Access::Roles(VIEWER)),
    ("/berth.v1.Admin/Events", Access::Roles(VIEWER)),
    ("/berth.v1.Admin/CreateToken", Access::Roles(ADMIN)),
    ("/berth.v1.Admin/ListTokens", Access::Roles(ADMIN)),
    ("/berth.v1.Admin/RevokeToken", Access::Roles(ADMIN)),
    ("/berth.v1.Admin/RemoveNode", Access::Roles(ADMIN)),
    ("/berth.v1.NodeRegistry/Register", Access::Roles(AGENT)),
    ("/berth.v1.NodeRegistry/Heartbeat", Access::Roles(AGENT)),
    (
        "/berth.v1.NodeRegistry/HeartbeatStream",
        Access::Roles(AGENT),
    ),
    ("/berth.v1.Pki/Join", Access::JoinToken),
    ("/berth.v1.Pki/Renew", Access::Roles(HOLDER)),
    ("/berth.v1.Raft/AppendEntries", Access::Roles(MEMBER)),
    ("/berth.v1.Raft/AppendStream", Access::Roles(MEMBER)),
    ("/berth.v1.Raft/Vote", Access::Roles(MEMBER)),
    ("/berth.v1.Raft/InstallSnapshot", Access::Roles(MEMBER)),
    ("/berth.v1.Raft/Propose", Access::Roles(MEMBER)),
    ("/berth.v1.Raft/ReadIndex", Access::Roles(MEMBER)),
    ("/berth.v1.Raft/Join", Access::Roles(MEMBER)),
    ("/berth.v1.Agent/StartReplica", Access::Roles(MEMBER)),
    ("/berth.v1.Agent/StopReplica", Access::Roles(MEMBER)),
    ("/berth.v1.Agent/ResizeReplica", Access::Roles(MEMBER)),
    ("/berth.v1.Agent/ListReplicas", Access::Roles(MEMBER)),
    ("/berth.v1.Agent/GetInventory", Access::Roles(MEMBER)),
    ("/berth.v1.Agent/StreamLogs", Access::Roles(MEMBER)),
    ("/berth.v1.Agent/SimulateGpuFault", Access::Roles(MEMBER)),
    ("/berth.v1.Serving/WatchEndpoints", Access::Roles(WATCHER)),
    ("/berth.v1.Serving/ReportLoad", Access::Roles(REPORTER)),
    ("/grpc.health.v1.Health/Check", Access::Anyone),
    ("/grpc.health.v1.Health/Watch", Access::Anyone),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        Access::Roles(VIEWER),
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        Access::Roles(VIEWER),
    ),
];

/// Who may call `path`; `None`: nobody (not in the table).
pub fn access(path: &str) -> Option<Access> {
    TABLE.iter().find(|(p, _)| *p == path).map(|(_, a)| *a)
}

/// `path` as the table spells it, when the table has it: a label value
/// that costs nothing and that no caller can multiply.
pub fn known_method(path: &str) -> Option<&'static str> {
    TABLE.iter().find(|(p, _)| *p == path).map(|(p, _)| *p)
}

/// Why a caller was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials, or credentials that do not check out. One message for
    /// an unknown token id and a wrong secret, so neither can be probed.
    #[error("{0}")]
    Unauthenticated(String),
    /// Known caller, not allowed.
    #[error("{0}")]
    PermissionDenied(String),
}

/// The word of one unauthenticated refusal, the same for every cause.
pub const BAD_TOKEN: &str = "the token is not valid for this cluster (unknown, wrong, expired, used up or revoked): ask an admin for a new one (`berth token create`)";

/// What the layer needs from the process it guards: tokens and revocations
/// live in the control plane's replicated state; an agent knows neither.
pub trait Authenticate: Send + Sync + 'static {
    /// The principal of a bearer token.
    fn token(&self, token: &Token) -> Result<Principal, AuthError>;
    /// The principal of a verified client certificate (its chain and dates
    /// were checked in the handshake).
    fn certificate(&self, leaf: &LeafInfo) -> Result<Principal, AuthError>;
    /// Called before a token is refused: a server whose view of the tokens
    /// may lag (a follower that has not applied a token the leader already
    /// acknowledged) catches up, so a fresh token works on every member.
    fn catch_up(&self) -> Pin<Box<dyn std::future::Future<Output = CatchUp> + Send>> {
        Box::pin(std::future::ready(CatchUp::Current))
    }
}

/// What [`Authenticate::catch_up`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatchUp {
    /// The view was already current: the refusal stands.
    Current,
    /// The view caught up: judge the token again.
    CaughtUp,
    /// The view could not be brought up to date (no leader): the token can
    /// be judged neither way now; the text says why.
    Failed(String),
}

/// The role a certificate's identity carries.
pub fn certificate_role(identity: &Identity) -> Role {
    match identity {
        Identity::Member(_) => Role::Member,
        Identity::Node(_) => Role::Agent,
        Identity::User(_) => Role::Admin,
    }
}

/// What a server learned about the peer of one connection; tonic puts it
/// in every request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The peer's address.
    pub addr: SocketAddr,
    /// Its verified client certificate, if it sent one.
    pub leaf: Option<Arc<LeafInfo>>,
}

#[derive(Default)]
struct Failures {
    by_ip: HashMap<IpAddr, (Instant, u32)>,
}

impl Failures {
    /// Whether `ip` is over its failure budget now.
    fn limited(&mut self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let (start, n) = self.by_ip.get(&ip)?;
        let left = FAILURE_WINDOW.saturating_sub(now.duration_since(*start));
        if left.is_zero() {
            self.by_ip.remove(&ip);
            return None;
        }
        (*n >= MAX_FAILURES).then_some(left)
    }

    fn record(&mut self, ip: IpAddr, now: Instant) {
        if self.by_ip.len() > 10_000 {
            self.by_ip
                .retain(|_, (start, _)| now.duration_since(*start) < FAILURE_WINDOW);
        }
        let e = self.by_ip.entry(ip).or_insert((now, 0));
        if now.duration_since(e.0) >= FAILURE_WINDOW {
            *e = (now, 0);
        }
        e.1 += 1;
    }
}

/// How the message of a call refused for its address's failed
/// authentications starts; the caller may retry after the wait it names.
pub const RATE_LIMITED: &str = "too many failed authentications from";

/// Whether `status` refused a call because its address failed to
/// authenticate too often (temporary: retry after the wait it names).
pub fn is_rate_limited(status: &Status) -> bool {
    status.code() == tonic::Code::Unauthenticated && status.message().starts_with(RATE_LIMITED)
}

/// The decision for one request, before any handler runs.
pub struct Gate {
    auth: Arc<dyn Authenticate>,
    failures: Mutex<Failures>,
}

impl Gate {
    /// A gate that asks `auth` about credentials.
    pub fn new(auth: Arc<dyn Authenticate>) -> Arc<Self> {
        Arc::new(Gate {
            auth,
            failures: Mutex::default(),
        })
    }

    /// Authenticates and authorizes one call of `path` from what this
    /// server knows now.
    pub fn check(
        &self,
        path: &str,
        peer: Option<&PeerInfo>,
        bearer: Option<&str>,
    ) -> Result<Principal, Status> {
        self.throttle(peer)?;
        let result = self.decide(path, peer, bearer);
        self.count(peer, &result);
        result
    }

    /// Like [`Gate::check`], but a refused token is judged again once the
    /// server caught up (see [`Authenticate::catch_up`]).
    pub async fn check_caught_up(
        &self,
        path: &str,
        peer: Option<&PeerInfo>,
        bearer: Option<&str>,
    ) -> Result<Principal, Status> {
        self.throttle(peer)?;
        let mut result = self.decide(path, peer, bearer);
        if bearer.is_some()
            && let Err(e) = &result
            && e.code() == tonic::Code::Unauthenticated
        {
            match self.auth.catch_up().await {
                CatchUp::Current => {}
                CatchUp::CaughtUp => result = self.decide(path, peer, bearer),
                CatchUp::Failed(why) => {
                    return Err(Status::unavailable(format!(
                        "cannot check the token now: this member may not know it yet and could not catch up ({why}); retry, or call another member"
                    )));
                }
            }
        }
        self.count(peer, &result);
        result
    }

    /// Refuses a caller whose address failed too often lately.
    fn throttle(&self, peer: Option<&PeerInfo>) -> Result<(), Status> {
        let Some(ip) = peer.map(|p| p.addr.ip()) else {
            return Ok(());
        };
        match self.lock().limited(ip, Instant::now()) {
            Some(wait) => Err(Status::unauthenticated(format!(
                "{RATE_LIMITED} {ip}: wait {}s",
                wait.as_secs().max(1)
            ))),
            None => Ok(()),
        }
    }

    /// Counts a failed authentication against the caller's address.
    fn count(&self, peer: Option<&PeerInfo>, result: &Result<Principal, Status>) {
        if let (Err(e), Some(peer)) = (result, peer)
            && e.code() == tonic::Code::Unauthenticated
        {
            self.lock().record(peer.addr.ip(), Instant::now());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Failures> {
        // A panic while counting cannot leave the map inconsistent.
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn decide(
        &self,
        path: &str,
        peer: Option<&PeerInfo>,
        bearer: Option<&str>,
    ) -> Result<Principal, Status> {
        let Some(access) = access(path) else {
            return Err(Status::permission_denied(format!(
                "{path} is not in the access table: nobody may call it"
            )));
        };
        let principal = match (bearer, peer.and_then(|p| p.leaf.as_deref())) {
            (Some(b), _) => {
                let token: Token = b
                    .parse()
                    .map_err(|e: ValidationError| Status::unauthenticated(e.to_string()))?;
                self.auth.token(&token)
            }
            (None, Some(leaf)) => self.auth.certificate(leaf),
            (None, None) => Ok(Principal {
                role: Role::Viewer,
                via: Via::Nothing,
            }),
        }
        .map_err(|e| match e {
            AuthError::Unauthenticated(m) => Status::unauthenticated(m),
            AuthError::PermissionDenied(m) => Status::permission_denied(m),
        })?;
        let allowed = match (access, &principal.via) {
            (Access::Anyone, _) => true,
            (_, Via::Nothing) => {
                return Err(Status::unauthenticated(format!(
                    "{path} needs credentials: a client certificate of the cluster, or a token (`authorization: Bearer berth1...`; the CLI reads its config file or BERTH_TOKEN)"
                )));
            }
            (Access::JoinToken, via) => matches!(via, Via::JoinToken(_)),
            (Access::Roles(_), Via::JoinToken(_)) => false,
            (Access::Roles(roles), _) => roles.contains(&principal.role),
        };
        if allowed {
            Ok(principal)
        } else {
            Err(Status::permission_denied(format!(
                "{} may not call {path}{}",
                describe(&principal),
                match access {
                    Access::Roles(roles) => format!(
                        " (allowed: {})",
                        roles
                            .iter()
                            .map(|r| r.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    Access::JoinToken => " (only a join token may)".into(),
                    Access::Anyone => String::new(),
                }
            )))
        }
    }
}

fn describe(p: &Principal) -> String {
    match &p.via {
        Via::Certificate(id) => format!("{id} (role {})", p.role),
        Via::Token(id) => format!("token {id} (role {})", p.role),
        Via::JoinToken(id) => format!("join token {id} (role {})", p.role),
        Via::Nothing => "an anonymous caller".into(),
    }
}

/// The tower layer that puts a [`Gate`] in front of every service; `None`
/// lets everything through (plaintext development mode).
#[derive(Clone)]
pub struct AuthLayer(pub Option<Arc<Gate>>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            gate: self.0.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    gate: Option<Arc<Gate>>,
}

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone took the readiness of `self.inner`; keep the ready one for this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(gate) = self.gate.clone() else {
            return Box::pin(inner.call(request));
        };
        // Taken out of the request, so that no handler (nor anything that
        // logs a request) ever holds the token.
        let authorization = request.headers_mut().remove(http::header::AUTHORIZATION);
        let peer = request.extensions().get::<PeerInfo>().cloned();
        Box::pin(async move {
            let bearer = authorization
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim());
            let path = request.uri().path();
            match gate.check_caught_up(path, peer.as_ref(), bearer).await {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                    inner.call(request).await
                }
                Err(status) => {
                    tracing::debug!(%path, code = ?status.code(), "refused");
                    Ok(status.into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_errors_never_show_the_secret() {
        let fp = "ab".repeat(32);
        let t: Token = format!("berth1.{fp}.abc123def456.{}", "s".repeat(40))
            .parse()
            .unwrap();
        assert_eq!(t.id, "abc123def456");
        assert_eq!(
            t.reveal().expose(),
            format!("berth1.{fp}.abc123def456.{}", "s".repeat(40))
        );
        assert!(t.matches(&t.secret_sha256()));
        assert!(!t.matches(&[0; 32]));
        assert_eq!(format!("{t:?}"), "Token(abc123def456)");
        let secret = "topsecretvalue".repeat(4);
        for bad in [
            format!("berth2.{fp}.abc123.{secret}"),
            format!("berth1.{}.abc123.{secret}", "ab".repeat(10)),
            format!("berth1.{fp}.AB.{secret}"),
            format!("berth1.{fp}.abc123.short"),
            format!("berth1.{fp}.abc123"),
            "garbage".to_string(),
        ] {
            let e = bad.parse::<Token>().unwrap_err().to_string();
            assert!(e.starts_with("token"), "{e}");
            assert!(!e.contains("topsecret"), "{e}");
        }
    }

    struct Fixed;
    impl Authenticate for Fixed {
        fn token(&self, token: &Token) -> Result<Principal, AuthError> {
            match token.id.as_str() {
                "viewer1" => Ok(Principal {
                    role: Role::Viewer,
                    via: Via::Token(token.id.clone()),
                }),
                "agentjoin" => Ok(Principal {
                    role: Role::Agent,
                    via: Via::JoinToken(token.id.clone()),
                }),
                _ => Err(AuthError::Unauthenticated(BAD_TOKEN.into())),
            }
        }
        fn certificate(&self, leaf: &LeafInfo) -> Result<Principal, AuthError> {
            let id = leaf
                .identity
                .clone()
                .ok_or_else(|| AuthError::Unauthenticated("no identity".into()))?;
            Ok(Principal {
                role: certificate_role(&id),
                via: Via::Certificate(id),
            })
        }
    }

    fn token(id: &str) -> String {
        format!("berth1.{}.{id}.{}", "ab".repeat(32), "s".repeat(40))
    }

    fn peer(identity: Option<Identity>) -> PeerInfo {
        PeerInfo {
            addr: "10.0.0.1:5000".parse().unwrap(),
            leaf: identity.map(|identity| {
                Arc::new(LeafInfo {
                    identity: Some(identity),
                    serial: "01".into(),
                    not_before: std::time::SystemTime::now(),
                    not_after: std::time::SystemTime::now(),
                })
            }),
        }
    }

    /// Whether the handler saw a token, and the role the layer attached.
    type Sight = Option<(bool, Option<Role>)>;

    /// The handler behind the layer: records what it saw.
    #[derive(Clone, Default)]
    struct Seen(Arc<std::sync::Mutex<Sight>>);

    impl tower::Service<http::Request<()>> for Seen {
        type Response = http::Response<()>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<http::Response<()>, Self::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, r: http::Request<()>) -> Self::Future {
            *self.0.lock().unwrap() = Some((
                r.headers().contains_key(http::header::AUTHORIZATION),
                r.extensions().get::<Principal>().map(|p| p.role),
            ));
            std::future::ready(Ok(http::Response::new(())))
        }
    }

    #[tokio::test]
    async fn the_layer_takes_the_token_out_before_the_handler() {
        use tower::{Layer, Service};
        let seen = Seen::default();
        let mut service = AuthLayer(Some(Gate::new(Arc::new(Fixed)))).layer(seen.clone());
        let request = http::Request::builder()
            .uri("/berth.v1.Admin/ListModels")
            .header("authorization", format!("Bearer {}", token("viewer1")))
            .extension(peer(None))
            .body(())
            .unwrap();
        let response = service.call(request).await.unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
        assert_eq!(*seen.0.lock().unwrap(), Some((false, Some(Role::Viewer))));
    }

    #[test]
    fn the_table_decides_by_role() {
        let gate = Gate::new(Arc::new(Fixed));
        let anon = peer(None);
        let code = |path: &str, peer: &PeerInfo, bearer: Option<&str>| {
            gate.check(path, Some(peer), bearer).err().map(|s| s.code())
        };
        use tonic::Code::*;
        let viewer = token("viewer1");
        assert_eq!(
            code("/berth.v1.Admin/ListModels", &anon, Some(&viewer)),
            None
        );
        assert_eq!(
            code("/berth.v1.Admin/CreateModel", &anon, Some(&viewer)),
            Some(PermissionDenied)
        );
        assert_eq!(
            code("/berth.v1.Admin/ListModels", &anon, None),
            Some(Unauthenticated)
        );
        assert_eq!(code("/grpc.health.v1.Health/Check", &anon, None), None);
        // Serving load comes from gateways (and relaying members), not from readers.
        assert_eq!(
            code("/berth.v1.Serving/ReportLoad", &anon, Some(&viewer)),
            Some(PermissionDenied)
        );
        assert_eq!(
            code("/berth.v1.Admin/NoSuchMethod", &anon, Some(&viewer)),
            Some(PermissionDenied)
        );
        // A join token buys a certificate and nothing else.
        let join = token("agentjoin");
        assert_eq!(code("/berth.v1.Pki/Join", &anon, Some(&join)), None);
        assert_eq!(
            code("/berth.v1.NodeRegistry/Heartbeat", &anon, Some(&join)),
            Some(PermissionDenied)
        );
        assert_eq!(
            code("/berth.v1.Pki/Join", &anon, Some(&viewer)),
            Some(PermissionDenied)
        );
        // Certificates: an agent's cannot call Raft or Admin; a member's can call Raft.
        let agent = peer(Some(Identity::Node("n1".into())));
        assert_eq!(code("/berth.v1.NodeRegistry/Heartbeat", &agent, None), None);
        assert_eq!(
            code("/berth.v1.Raft/AppendEntries", &agent, None),
            Some(PermissionDenied)
        );
        assert_eq!(
            code("/berth.v1.Admin/ListModels", &agent, None),
            Some(PermissionDenied)
        );
        assert_eq!(
            code("/berth.v1.Agent/StartReplica", &agent, None),
            Some(PermissionDenied)
        );
        let member = peer(Some(Identity::Member(2)));
        assert_eq!(code("/berth.v1.Raft/AppendEntries", &member, None), None);
        assert_eq!(code("/berth.v1.Agent/StartReplica", &member, None), None);
        assert_eq!(
            code("/berth.v1.Admin/CreateToken", &member, None),
            Some(PermissionDenied)
        );
    }

    #[test]
    fn unknown_and_wrong_tokens_get_the_same_answer_and_repeated_failures_are_limited() {
        let gate = Gate::new(Arc::new(Fixed));
        let anon = peer(None);
        let bad = token("nosuch1");
        let first = gate
            .check("/berth.v1.Admin/ListModels", Some(&anon), Some(&bad))
            .unwrap_err();
        assert_eq!(first.code(), tonic::Code::Unauthenticated);
        assert_eq!(first.message(), BAD_TOKEN);
        for _ in 1..MAX_FAILURES {
            gate.check("/berth.v1.Admin/ListModels", Some(&anon), Some(&bad))
                .unwrap_err();
        }
        // Over the budget even a good token waits: guessing cannot go fast.
        let e = gate
            .check(
                "/berth.v1.Admin/ListModels",
                Some(&anon),
                Some(&token("viewer1")),
            )
            .unwrap_err();
        assert!(e.message().contains("too many failed"), "{e:?}");
        // A joiner or an agent waits and tries again instead of giving up.
        assert!(is_rate_limited(&e));
        assert!(!crate::grpc::is_refusal(&e));
        assert!(crate::grpc::is_refusal(&Status::unauthenticated(
            "bad token"
        )));
        // Another address is not affected.
        let mut other = peer(None);
        other.addr = "10.0.0.2:1".parse().unwrap();
        assert!(
            gate.check(
                "/berth.v1.Admin/ListModels",
                Some(&other),
                Some(&token("viewer1"))
            )
            .is_ok()
        );
    }

    /// A member that lags behind the leader: it knows token "fresh1" only
    /// after catching up, and catching up may fail (no leader).
    struct Lagging {
        caught_up: std::sync::atomic::AtomicBool,
        can_catch_up: bool,
    }
    impl Authenticate for Lagging {
        fn token(&self, token: &Token) -> Result<Principal, AuthError> {
            let known = self.caught_up.load(std::sync::atomic::Ordering::SeqCst);
            if token.id == "fresh1" && known {
                Ok(Principal {
                    role: Role::Viewer,
                    via: Via::Token(token.id.clone()),
                })
            } else {
                Err(AuthError::Unauthenticated(BAD_TOKEN.into()))
            }
        }
        fn certificate(&self, _: &LeafInfo) -> Result<Principal, AuthError> {
            Err(AuthError::Unauthenticated("no".into()))
        }
        fn catch_up(&self) -> Pin<Box<dyn std::future::Future<Output = CatchUp> + Send>> {
            if !self.can_catch_up {
                return Box::pin(std::future::ready(CatchUp::Failed("no leader".into())));
            }
            let was = self
                .caught_up
                .swap(true, std::sync::atomic::Ordering::SeqCst);
            Box::pin(std::future::ready(if was {
                CatchUp::Current
            } else {
                CatchUp::CaughtUp
            }))
        }
    }

    #[tokio::test]
    async fn a_token_the_member_has_not_applied_yet_is_judged_after_catching_up() {
        let path = "/berth.v1.Admin/ListModels";
        let anon = peer(None);
        let lagging = |can_catch_up| {
            Gate::new(Arc::new(Lagging {
                caught_up: false.into(),
                can_catch_up,
            }))
        };

        let gate = lagging(true);
        assert!(
            gate.check(path, Some(&anon), Some(&token("fresh1")))
                .is_err()
        );
        let principal = gate
            .check_caught_up(path, Some(&anon), Some(&token("fresh1")))
            .await
            .unwrap();
        assert_eq!(principal.via, Via::Token("fresh1".into()));
        // Caught up, an unknown token is still refused, and counts.
        let e = gate
            .check_caught_up(path, Some(&anon), Some(&token("nosuch1")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert_eq!(e.message(), BAD_TOKEN);
        assert_eq!(gate.lock().by_ip.get(&anon.addr.ip()).map(|f| f.1), Some(2));

        // A member that cannot catch up says so instead of refusing a token
        // that may be good, and does not count it as a failure.
        let gate = lagging(false);
        for _ in 0..MAX_FAILURES + 1 {
            let e = gate
                .check_caught_up(path, Some(&anon), Some(&token("fresh1")))
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
            assert!(e.message().contains("no leader"), "{e:?}");
        }
    }
}
