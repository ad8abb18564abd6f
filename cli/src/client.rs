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

/// Whether the status comes from the client's transport (nothing reached a server).
pub fn is_connect_error(status: &Status) -> bool {
    if !status.metadata().is_empty() {
        return false;
    }
    match status.code() {
        Code::Unavailable => true,
        // A host that does not answer at all (a stopped container's address):
        // the channel's one deadline is its connect timeout, so nothing was sent.
        Code::Unknown => {
            status.message() == "transport error"
                && berth_proto::grpc::describe(status).ends_with(CONNECT_DEADLINE)
        }
        _ => false,
    }
}

/// How a connect timeout's cause reads (tower's `Elapsed`).
const CONNECT_DEADLINE: &str = "deadline has elapsed";

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
    use std::sync::Arc;

    use super::*;

    #[derive(Debug)]
    struct Elapsed;

    impl std::fmt::Display for Elapsed {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(CONNECT_DEADLINE)
        }
    }

    impl std::error::Error for Elapsed {}

    #[test]
    fn a_member_that_does_not_answer_is_skipped_like_a_refused_connection() {
        assert!(is_connect_error(&Status::unavailable("connection refused")));
        let mut timed_out = Status::unknown("transport error");
        timed_out.set_source(Arc::new(Elapsed));
        assert!(is_connect_error(&timed_out));
        // Answers from a server are not: the next member would not do better.
        assert!(!is_connect_error(&Status::unknown("transport error")));
        assert!(!is_connect_error(&Status::deadline_exceeded(
            "timeout expired"
        )));
        let mut from_server = Status::unavailable("no leader");
        from_server
            .metadata_mut()
            .insert("berth-leader", "10.0.0.1:7000".parse().unwrap());
        assert!(!is_connect_error(&from_server));
    }
}
