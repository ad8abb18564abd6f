//! The one place that builds gRPC servers and channels, so that TLS and
//! tokens land in one spot. Every server gets `grpc.health.v1` and server
//! reflection.

use std::future::Future;
use std::time::Duration;

use berth_common::ValidationError;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};

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
    /// The server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves `routes` on `listener`, plus health and reflection, until `shutdown` resolves.
/// `services` are the fully qualified names reported as serving by the health service.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    services: &[&str],
    shutdown: impl Future<Output = ()>,
) -> Result<(), GrpcError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in services {
        reporter
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        .add_routes(routes)
        .add_service(health)
        .add_service(reflection)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// A lazily connecting channel to `addr` (`host:port`, or a full `http://` URL).
pub fn channel(addr: &str) -> Result<Channel, GrpcError> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(url).map_err(|source| GrpcError::BadAddress {
        addr: addr.to_string(),
        source,
    })?;
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// Turns a validation error into `InvalidArgument` carrying its message.
pub fn invalid_argument(e: &ValidationError) -> tonic::Status {
    tonic::Status::invalid_argument(e.to_string())
}
