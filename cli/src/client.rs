//! A client for any number of control-plane members: it tries each address
//! in turn while the connection fails, and turns gRPC errors into messages
//! with a hint.

use std::future::Future;

use berth_proto::grpc::{Channel, Dialer};
use berth_proto::v1::admin_client::AdminClient;
use tonic::{Code, Status};

/// Errors the CLI reports.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A request failed or was refused.
    #[error("{}", .status.message())]
    Request {
        /// The gRPC status.
        status: Status,
        /// The addresses tried.
        servers: String,
    },
    /// Bad command-line input (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// Anything else (local I/O, a failed benchmark).
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

impl CliError {
    /// Prints `error: …` and a hint to stderr.
    pub fn print(&self) {
        eprintln!("error: {self}");
        if let Some(hint) = self.hint() {
            eprintln!("hint: {hint}");
        }
    }

    fn hint(&self) -> Option<String> {
        let CliError::Request { status, servers } = self else {
            return None;
        };
        Some(match status.code() {
            Code::Unavailable if is_connect_error(status) => format!(
                "no control-plane member answered at {servers}; is berth-control running? set --server or BERTH_SERVER (start one with `berth dev`)"
            ),
            Code::Unavailable => "the cluster may be electing a leader or have lost a majority; retry, and check `berth cluster status`".into(),
            Code::NotFound => "list what exists with `berth model list`, `berth node list` or `berth cluster members`".into(),
            Code::AlreadyExists => "pick another name or version, or inspect it with `berth model show NAME`".into(),
            Code::InvalidArgument => "fix the named field and retry; `berth <command> --help` lists the rules".into(),
            Code::FailedPrecondition => "the request is valid but the cluster's state does not allow it now".into(),
            Code::Unauthenticated => "check the credentials: `berth config show` says which file and token the CLI uses; BERTH_TOKEN overrides the file's token".into(),
            Code::PermissionDenied => "this token's role may not do that: ask an admin for a token with a wider role (`berth token create --role operator`)".into(),
            _ => return None,
        })
    }
}

/// Whether the call failed before anything reached a server (refused,
/// unreachable, TLS refused, connect timeout), so the next member may be
/// tried. A call cut after it was sent is not retried elsewhere: a write
/// could then be applied twice.
pub fn is_connect_error(status: &Status) -> bool {
    status.metadata().is_empty() && berth_proto::grpc::never_sent(status)
}

/// Talks to the control plane through any of several members. Each
/// member's channel is created once (connecting lazily) and reused, so
/// repeated calls share one HTTP/2 connection per member.
#[derive(Debug, Clone)]
pub struct Client {
    members: Vec<(String, Result<Channel, String>)>,
    servers: String,
}

impl Client {
    /// A client for a comma-separated address list, dialling through `dialer`.
    pub fn new(servers: &str, dialer: &Dialer) -> Self {
        let members = servers
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| (a.to_string(), dialer.channel(a).map_err(|e| e.to_string())))
            .collect();
        Self {
            members,
            servers: servers.to_string(),
        }
    }

    /// The addresses, as given.
    pub fn servers(&self) -> &str {
        &self.servers
    }

    /// Calls `f` on each member in turn until one answers.
    pub async fn admin<T, F, Fut>(&self, f: F) -> Result<T, CliError>
    where
        F: Fn(AdminClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut last = Status::unavailable("no server address given");
        for (addr, channel) in &self.members {
            let channel = channel.clone().map_err(CliError::Usage)?;
            match f(AdminClient::new(channel)).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if is_connect_error(&s) => last = s,
                Err(status) => {
                    return Err(CliError::Request {
                        status,
                        servers: addr.clone(),
                    });
                }
            }
        }
        Err(CliError::Request {
            status: last,
            servers: self.servers.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_call_that_never_left_moves_on_to_the_next_member() {
        berth_proto::tls::install_crypto_provider();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let dialer =
            Dialer::tls(berth_proto::tls::Trust::pinned(&"0".repeat(64)), None, None).unwrap();
        let client = Client::new(&closed, &dialer);
        let err = client
            .admin(|mut c| async move {
                c.cluster_status(berth_proto::v1::ClusterStatusRequest::default())
                    .await
            })
            .await
            .unwrap_err();
        let CliError::Request { status, .. } = err else {
            panic!("not a request error: {err:?}")
        };
        assert!(is_connect_error(&status), "{status:?}");
        // Statuses without a transport cause: from a server, or a call cut
        // after it was sent. The next member would not do better, or could
        // apply a write twice.
        assert!(!is_connect_error(&Status::unknown("transport error")));
        assert!(!is_connect_error(&Status::unavailable(
            "keep-alive timed out"
        )));
        let mut from_server = Status::unavailable("no leader");
        from_server
            .metadata_mut()
            .insert("berth-leader", "10.0.0.1:7000".parse().unwrap());
        assert!(!is_connect_error(&from_server));
    }
}
