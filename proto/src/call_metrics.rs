//! Every gRPC server of the process records each call it answers: its
//! service, method and status code, and how long it took until the
//! response started (for a stream: until it was opened). One histogram
//! family per process, shown on the process's `/metrics` page as
//! `<prefix>_grpc_server_handling_seconds` (`berth_` on members,
//! `berth_agent_` on agents). Labels come from the access table
//! (`auth::known_method`), so a caller cannot add series by calling
//! made-up methods: those are counted as `unknown`.

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The labels of one kind of call.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    service: &'static str,
    method: &'static str,
    code: &'static str,
}

type Calls = Family<CallLabels, Histogram, fn() -> Histogram>;

/// A latency histogram in seconds, from 100 µs to 10 s: a read answered
/// from memory up to a write that waited out a leader election. Shared by
/// the processes' own latency figures.
pub fn seconds_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ])
}

fn calls() -> &'static Calls {
    static CALLS: OnceLock<Calls> = OnceLock::new();
    CALLS.get_or_init(|| Family::new_with_constructor(seconds_histogram as fn() -> Histogram))
}

/// Adds this process's call figures to `registry`.
pub fn register(registry: &mut Registry) {
    registry.register(
        "grpc_server_handling_seconds",
        "gRPC calls this process answered, by service, method and status code, and the seconds until the response started",
        calls().clone(),
    );
}

/// The status code's name as gRPC spells it (`OK`, `UNAVAILABLE`, ...).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The code a response starts with: a refusal or an error comes as a
/// trailers-only response, with `grpc-status` among the headers; without
/// it the call is under way and counted as `OK` (a stream that fails
/// later is not counted again).
fn response_code<B>(response: &http::Response<B>) -> &'static str {
    match response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
    {
        Some(code) => code_name(tonic::Code::from_i32(code)),
        None if response.status() == http::StatusCode::OK => "OK",
        None => "UNKNOWN",
    }
}

fn record(path: &str, code: &'static str, took: std::time::Duration) {
    let (service, method) = crate::auth::known_method(path)
        .and_then(|p| p.strip_prefix('/'))
        .and_then(|p| p.split_once('/'))
        .unwrap_or(("unknown", "unknown"));
    calls()
        .get_or_create(&CallLabels {
            service,
            method,
            code,
        })
        .observe(took.as_secs_f64());
}

/// The tower layer that records each call (outermost, so that calls the
/// authorization layer refuses are counted with their codes).
#[derive(Clone, Copy, Debug, Default)]
pub struct CallMetricsLayer;

impl<S> tower::Layer<S> for CallMetricsLayer {
    type Service = CallMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallMetrics { inner }
    }
}

/// See [`CallMetricsLayer`].
#[derive(Clone, Debug)]
pub struct CallMetrics<S> {
    inner: S,
}

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for CallMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let path = request.uri().path().to_string();
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await;
            let code = match &result {
                Ok(response) => response_code(response),
                Err(_) => "UNKNOWN",
            };
            record(&path, code, started.elapsed());
            result
        })
    }
}

/// The figures of this process's calls, as `/metrics` shows them (tests).
pub fn encoded() -> String {
    let mut registry = Registry::with_prefix("berth");
    register(&mut registry);
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_labelled_from_the_table_and_unknown_paths_share_one_series() {
        // Codes no other test of this process produces: the family is global.
        let ms = std::time::Duration::from_millis(3);
        record("/berth.v1.Admin/ListModels", "DATA_LOSS", ms);
        record("/berth.v1.Admin/ListModels", "OUT_OF_RANGE", ms);
        record("/made.up.Service/Anything", "ABORTED", ms);
        record("/another/madeup", "ABORTED", ms);
        let text = encoded();
        assert!(
            text.contains(
                r#"berth_grpc_server_handling_seconds_count{service="berth.v1.Admin",method="ListModels",code="DATA_LOSS"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"method="ListModels",code="OUT_OF_RANGE"} 1"#));
        assert!(
            text.contains(
                r#"berth_grpc_server_handling_seconds_count{service="unknown",method="unknown",code="ABORTED"} 2"#
            ),
            "{text}"
        );
        assert!(!text.contains("made.up"), "{text}");
    }

    #[test]
    fn the_code_comes_from_a_trailers_only_response() {
        let mut refused = http::Response::new(());
        refused
            .headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("7"));
        assert_eq!(response_code(&refused), "PERMISSION_DENIED");
        assert_eq!(response_code(&http::Response::new(())), "OK");
        let mut broken = http::Response::new(());
        *broken.status_mut() = http::StatusCode::BAD_GATEWAY;
        assert_eq!(response_code(&broken), "UNKNOWN");
    }
}
