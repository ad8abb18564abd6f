//! The one place that builds gRPC servers and channels, so that TLS and
//! tokens land in one spot. Every server gets `grpc.health.v1` and server
//! reflection.

use std::future::Future;
use std::time::Duration;

use std::sync::Arc;

use berth_common::ValidationError;
use tokio::net::TcpListener;
use tonic::Status;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};

use crate::auth::{AuthLayer, Gate};
use crate::pki::Secret;
use crate::tls::{self, Credentials, Expect, Trust};

/// The largest message a Berth server or client accepts (snapshots travel in one message).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;
/// How long a client waits for a TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The metadata key in which a member that does not lead names the leader's address.
pub const LEADER_KEY: &str = "berth-leader";
/// The metadata key in which the control plane names the node an Agent call
/// is meant for: an agent serving another node refuses it (an address that
/// moved to another machine must not receive that node's replicas).
pub const NODE_KEY: &str = "berth-node";

/// `request` with the node it is meant for in its metadata (`NODE_KEY`).
pub fn for_node<T>(node: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(v) = tonic::metadata::MetadataValue::try_from(node) {
        request.metadata_mut().insert(NODE_KEY, v);
    }
    request
}

/// The node a request names in its metadata, if it names one.
pub fn node_of<T>(request: &tonic::Request<T>) -> Option<&str> {
    request.metadata().get(NODE_KEY)?.to_str().ok()
}

/// Errors building a server or channel.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    /// The address cannot be turned into an endpoint.
    #[error("address {addr:?} is invalid: {source}")]
    BadAddress {
        /// What was given.
        addr: String,
        /// Why it was refused.
        source: tonic::transport::Error,
    },
    /// Reflection could not be set up.
    #[error("build reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// TLS could not be set up.
    #[error("tls: {0}")]
    Tls(String),
    /// The server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// How a server guards its port.
#[derive(Clone)]
pub enum ServerSecurity {
    /// Plaintext and no authentication (`--insecure`, loopback only).
    Insecure,
    /// TLS with the process's credentials, and the authorization layer.
    Tls {
        /// The server's certificate and trusted CAs.
        credentials: Arc<Credentials>,
        /// Decides who may call what.
        gate: Arc<Gate>,
        /// Open connections, for cutting those of revoked certificates.
        connections: tls::Connections,
    },
}

impl std::fmt::Debug for ServerSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerSecurity::Insecure => f.write_str("Insecure"),
            ServerSecurity::Tls { credentials, .. } => write!(f, "Tls({:?})", credentials.leaf()),
        }
    }
}

/// Serves `routes` on `listener`, plus health and reflection (v1 and
/// v1alpha), until `shutdown` resolves. `services` are the fully qualified
/// names reported as serving by the health service.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    services: &[&str],
    security: &ServerSecurity,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GrpcError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in services {
        reporter
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let gate = match security {
        ServerSecurity::Insecure => None,
        ServerSecurity::Tls { gate, .. } => Some(gate.clone()),
    };
    let router = Server::builder()
        .layer(crate::call_metrics::CallMetricsLayer)
        .layer(AuthLayer(gate))
        .add_routes(routes)
        .add_service(health)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);
    match security {
        ServerSecurity::Insecure => {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await?
        }
        ServerSecurity::Tls {
            credentials,
            connections,
            ..
        } => {
            let config = credentials
                .server_config()
                .map_err(|e| GrpcError::Tls(e.to_string()))?;
            let incoming = tls::incoming(listener, config, connections.clone());
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await?
        }
    }
    Ok(())
}

/// How a process dials other Berth processes: plaintext, or TLS with the
/// cluster's trust, its own certificate (members, agents) and/or a token
/// (the CLI). Cheap to clone.
#[derive(Clone)]
pub enum Dialer {
    /// Plaintext (`--insecure`).
    Insecure,
    /// TLS.
    Tls {
        /// What the server must chain to.
        trust: Trust,
        /// The client certificate, if any.
        identity: Option<Arc<Credentials>>,
        /// The bearer token, if any.
        token: Option<Secret>,
        /// The configuration for members, made once.
        member: Arc<rustls::ClientConfig>,
    },
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dialer::Insecure => f.write_str("Insecure"),
            Dialer::Tls {
                trust, identity, ..
            } => write!(
                f,
                "Tls({trust:?}, {:?})",
                identity.as_ref().map(|c| c.leaf())
            ),
        }
    }
}

impl Dialer {
    /// A TLS dialer.
    pub fn tls(
        trust: Trust,
        identity: Option<Arc<Credentials>>,
        token: Option<Secret>,
    ) -> Result<Self, GrpcError> {
        let member = tls::client_config(trust.clone(), Expect::Member, identity.clone())
            .map_err(|e| GrpcError::Tls(e.to_string()))?;
        Ok(Dialer::Tls {
            trust,
            identity,
            token,
            member,
        })
    }

    /// A dialer presenting `credentials` and trusting their CAs.
    pub fn with_credentials(credentials: Arc<Credentials>) -> Result<Self, GrpcError> {
        Self::tls(credentials.trust(), Some(credentials), None)
    }

    /// A lazily connecting channel to a control-plane member at `addr`
    /// (`host:port`, or a full URL).
    pub fn channel(&self, addr: &str) -> Result<Channel, GrpcError> {
        match self {
            Dialer::Insecure => self.build(addr, None),
            Dialer::Tls { member, .. } => self.build(addr, Some(member.clone())),
        }
    }

    /// A lazily connecting channel to the agent of `node` at `addr`: the
    /// server must prove it is that node's agent.
    pub fn agent_channel(&self, addr: &str, node: &str) -> Result<Channel, GrpcError> {
        match self {
            Dialer::Insecure => self.build(addr, None),
            Dialer::Tls {
                trust, identity, ..
            } => {
                let config = tls::client_config(
                    trust.clone(),
                    Expect::Node(node.to_string()),
                    identity.clone(),
                )
                .map_err(|e| GrpcError::Tls(e.to_string()))?;
                self.build(addr, Some(config))
            }
        }
    }

    fn build(
        &self,
        addr: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Channel, GrpcError> {
        let url = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let bad = |source| GrpcError::BadAddress {
            addr: addr.to_string(),
            source,
        };
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(bad)?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let bearer = match self {
            Dialer::Tls { token: Some(t), .. } => {
                let v = tonic::metadata::MetadataValue::try_from(format!("Bearer {}", t.expose()))
                    .map_err(|_| {
                        GrpcError::Tls("the token holds characters a header cannot carry".into())
                    })?;
                // Not marked sensitive, so HPACK indexes it: later calls on
                // the connection send a table index instead of ~150 bytes
                // of Huffman-coded text (decision 072). HPACK matches whole
                // values only, so a compression oracle cannot guess a
                // 256-bit secret piece by piece; `Bearer`'s Debug redacts
                // it, and the server takes it out before any handler runs.
                Some(v)
            }
            _ => None,
        };
        let channel = match tls {
            None => endpoint.connect_lazy(),
            Some(config) => {
                let uri: http::Uri = url
                    .parse()
                    .map_err(|_| GrpcError::Tls(format!("address {addr:?} is not host:port")))?;
                let host = uri.host().unwrap_or("127.0.0.1").to_string();
                let port = uri.port_u16().unwrap_or(443);
                let connector = tower::service_fn(move |_: http::Uri| {
                    let config = config.clone();
                    let host = host.clone();
                    async move {
                        let stream = tls::connect(&host, port, config).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                });
                endpoint.connect_with_connector_lazy(connector)
            }
        };
        Ok(InterceptedService::new(channel, Bearer(bearer)))
    }
}

/// A channel that adds the dialer's bearer token, if any, to every call.
pub type Channel = InterceptedService<tonic::transport::Channel, Bearer>;

/// Adds `authorization: Bearer …` to each request.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer([redacted])"
        } else {
            "Bearer(None)"
        })
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A plaintext channel to `addr` (development mode; `Dialer::channel` for the rest).
pub fn channel(addr: &str) -> Result<Channel, GrpcError> {
    Dialer::Insecure.channel(addr)
}

/// Turns a validation error into `InvalidArgument` carrying its message.
pub fn invalid_argument(e: &ValidationError) -> tonic::Status {
    tonic::Status::invalid_argument(e.to_string())
}

/// A status with its chain of causes: a transport error says only
/// "transport error" and keeps the reason (a refused certificate, a pin
/// mismatch) in its sources.
pub fn describe(status: &Status) -> String {
    let mut text = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// Whether a call failed before any of it was sent: the connection could
/// not be made (refused, unreachable, TLS handshake refused, or the connect
/// timeout passed). Only then may a non-idempotent call be retried
/// elsewhere. Any other failure, `Unavailable` included (a keep-alive
/// timeout, a reset connection), may come after the server received the
/// call, so its outcome is unknown.
pub fn never_sent(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        // The connect timeout wraps the whole connector (TCP and TLS) in an
        // `io::Error` whose inner error is tokio's `Elapsed`.
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<tokio::time::error::Elapsed>())
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// Whether a call failed because the server's CA is not the pinned one
/// (retrying cannot help: the token names another cluster).
pub fn is_pin_mismatch(status: &Status) -> bool {
    describe(status).contains(tls::PIN_MISMATCH)
}

/// Whether a handler answered with a refusal (bad request, bad or spent
/// credentials), as opposed to a transport failure or an unavailable
/// cluster, which a retry may get past. A caller throttled for its
/// address's failed authentications is not refused: it may retry later
/// (a member that joins on the address of a removed one, for example).
pub fn is_refusal(status: &Status) -> bool {
    use tonic::Code::*;
    !crate::auth::is_rate_limited(status)
        && matches!(
            status.code(),
            InvalidArgument
                | FailedPrecondition
                | PermissionDenied
                | Unauthenticated
                | AlreadyExists
                | NotFound
        )
}

/// Buys a certificate with a join token: tries each of `addrs` in turn
/// until `timeout`, each time over TLS that trusts only the CA the token
/// pins, so the token is never sent to another cluster. A refusal (bad or
/// spent token, bad request) or a pin mismatch ends it at once; anything
/// else (nothing listening, no leader) is retried. Errors say what to do.
pub async fn join_with_token(
    addrs: &[String],
    token: &crate::auth::Token,
    request: crate::v1::PkiJoinRequest,
    timeout: Duration,
) -> Result<crate::v1::PkiJoinResponse, String> {
    let dialer = Dialer::tls(
        Trust::pinned(&token.ca_fingerprint),
        None,
        Some(token.reveal()),
    )
    .map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error = String::from("no address given");
    loop {
        for addr in addrs {
            let channel = dialer.channel(addr).map_err(|e| e.to_string())?;
            let mut req = tonic::Request::new(request.clone());
            req.set_timeout(Duration::from_secs(30));
            match crate::v1::pki_client::PkiClient::new(channel)
                .join(req)
                .await
            {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if is_pin_mismatch(&s) => {
                    return Err(format!(
                        "refused to send the token to {addr}: {}",
                        describe(&s)
                    ));
                }
                Err(s) if is_refusal(&s) => {
                    return Err(format!("join through {addr} refused: {}", s.message()));
                }
                Err(s) => last_error = format!("{addr}: {}", describe(&s)),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "could not join the cluster through {} within {timeout:?}: no member gave a certificate ({last_error}); check the address and that a member runs there",
                addrs.join(",")
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
