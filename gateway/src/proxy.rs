//! The HTTP side: the OpenAI-compatible routes, forwarding to a replica with
//! retries before the first byte, streaming answers through frame by frame,
//! `/health` and `/metrics`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use berth_proto::pki::Secret;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::config::Config;
use crate::table::{Inflight, NoReplica, Table};
use crate::watch::Link;

/// Attempts per request: the first and at most one retry on another replica.
const MAX_ATTEMPTS: usize = 2;

/// The response header naming the replica that answered.
pub const REPLICA_HEADER: &str = "x-berth-replica";

type Labels = Vec<(String, String)>;

/// The gateway's Prometheus series.
struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    retries: Family<Labels, Counter>,
    ejections: Family<Labels, Counter>,
    duration: Family<Labels, Histogram>,
    first_byte: Family<Labels, Histogram>,
    inflight: Family<Labels, Gauge>,
    replicas: Family<Labels, Gauge>,
    waiting: Family<Labels, Gauge>,
    connected: Gauge,
    cut: Family<Labels, Counter>,
    /// Each served name's series, looked up once per request instead of
    /// building label sets for every series it touches.
    by_name: RwLock<HashMap<String, Arc<Series>>>,
}

/// The series of one route name.
struct Series {
    first_byte: Histogram,
    duration: Histogram,
    cut: Counter,
    retries: Counter,
    /// By HTTP status.
    codes: RwLock<HashMap<u16, Counter>>,
}

impl Series {
    fn answered(&self, status: StatusCode) {
        let code = status.as_u16();
        if let Some(c) = self.codes.read().ok().and_then(|m| m.get(&code).cloned()) {
            c.inc();
            return;
        }
        if let Ok(mut m) = self.codes.write() {
            m.entry(code).or_default().inc();
        }
    }
}

impl Metrics {
    /// The series of `name` (`unknown` for names nothing serves: clients
    /// choose them, so they must not become labels).
    fn series(&self, name: &str) -> Arc<Series> {
        if let Some(s) = self.by_name.read().ok().and_then(|m| m.get(name).cloned()) {
            return s;
        }
        let labels = model_label(name);
        let series = Arc::new(Series {
            first_byte: self.first_byte.get_or_create(&labels).clone(),
            duration: self.duration.get_or_create(&labels).clone(),
            cut: self.cut.get_or_create(&labels).clone(),
            retries: self.retries.get_or_create(&labels).clone(),
            codes: RwLock::default(),
        });
        if let Ok(mut m) = self.by_name.write() {
            m.entry(name.to_string()).or_insert(series).clone()
        } else {
            series
        }
    }

    /// Moves the per-status counters into the `requests` family for export.
    fn export_codes(&self) {
        let Ok(names) = self.by_name.read() else {
            return;
        };
        for (name, series) in names.iter() {
            let Ok(codes) = series.codes.read() else {
                continue;
            };
            for (code, counter) in codes.iter() {
                let labels = vec![
                    ("model".to_string(), name.clone()),
                    ("code".to_string(), code.to_string()),
                ];
                let exported = self.requests.get_or_create(&labels);
                let delta = counter.get().saturating_sub(exported.get());
                exported.inc_by(delta);
            }
        }
    }
}

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 18))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("berth_gateway");
        let requests = Family::<Labels, Counter>::default();
        let retries = Family::<Labels, Counter>::default();
        let ejections = Family::<Labels, Counter>::default();
        let duration = Family::<Labels, Histogram>::new_with_constructor(
            seconds_histogram as fn() -> Histogram,
        );
        let first_byte = Family::<Labels, Histogram>::new_with_constructor(
            seconds_histogram as fn() -> Histogram,
        );
        let inflight = Family::<Labels, Gauge>::default();
        let replicas = Family::<Labels, Gauge>::default();
        let waiting = Family::<Labels, Gauge>::default();
        let connected = Gauge::default();
        let cut = Family::<Labels, Counter>::default();
        registry.register(
            "streams_cut",
            "Answers cut off by their replica after their first byte (the client sees a broken stream, never a clean end)",
            cut.clone(),
        );
        registry.register(
            "requests",
            "Requests answered, by model and HTTP status",
            requests.clone(),
        );
        registry.register(
            "retries",
            "Requests retried on another replica before their first byte",
            retries.clone(),
        );
        registry.register(
            "ejections",
            "Replicas left out for a while after failing in a row",
            ejections.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to the end of its answer",
            duration.clone(),
        );
        registry.register(
            "time_to_first_byte_seconds",
            "Time from a request's arrival to the first byte of its answer's body",
            first_byte.clone(),
        );
        registry.register(
            "inflight_requests",
            "Requests this gateway has sent to replicas and not finished, by route name",
            inflight.clone(),
        );
        registry.register(
            "ready_replicas",
            "Replicas that take requests, by route name",
            replicas.clone(),
        );
        registry.register(
            "queued_requests",
            "Requests waiting for a replica with room, by route name",
            waiting.clone(),
        );
        registry.register(
            "control_plane_connected",
            "1 while the endpoint watch is open",
            connected.clone(),
        );
        Metrics {
            registry,
            requests,
            retries,
            ejections,
            duration,
            first_byte,
            inflight,
            replicas,
            waiting,
            connected,
            cut,
            by_name: RwLock::default(),
        }
    }
}

fn model_label(model: &str) -> Labels {
    vec![("model".into(), model.to_string())]
}

/// Shared by every request.
pub struct Gateway {
    table: Arc<Table>,
    link: Arc<Link>,
    client: Client<HttpConnector, Full<Bytes>>,
    api_key: Option<Secret>,
    max_body: usize,
    metrics: Metrics,
}

impl Gateway {
    /// A gateway over `table`, configured by `config`.
    pub fn new(config: &Config, table: Arc<Table>, link: Arc<Link>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Gateway {
            table,
            link,
            client,
            api_key: config.api_key.clone(),
            max_body: config.max_body_bytes,
            metrics: Metrics::new(),
        }
    }

    /// The routes.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/v1/models", get(models))
            .route("/v1/completions", post(forward))
            .route("/v1/chat/completions", post(forward))
            .route("/v1/embeddings", post(forward))
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .fallback(unknown_path)
            .with_state(self)
    }

    /// `None` when the caller may go on; else the 401 to answer.
    fn refuse_unauthorized(&self, headers: &HeaderMap) -> Option<Response> {
        let key = self.api_key.as_ref()?;
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if bool::from(given.as_bytes().ct_eq(key.expose().as_bytes())) {
            None
        } else {
            Some(openai_error(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "missing or wrong API key: send `Authorization: Bearer KEY` with the gateway's --api-key",
            ))
        }
    }
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// An error in the OpenAI API's shape.
fn openai_error(status: StatusCode, code: &str, message: &str) -> Response {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    json_response(
        status,
        json!({"error": {"message": message, "type": kind, "code": code, "param": null}}),
    )
}

fn retry_after(mut response: Response, seconds: u32) -> Response {
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

async fn unknown_path(request: Request) -> Response {
    openai_error(
        StatusCode::NOT_FOUND,
        "unknown_url",
        &format!(
            "no route {} {}: the gateway serves GET /v1/models, POST /v1/completions, /v1/chat/completions and /v1/embeddings, GET /health and /metrics",
            request.method(),
            request.uri().path()
        ),
    )
}

async fn models(State(g): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if let Some(r) = g.refuse_unauthorized(&headers) {
        return r;
    }
    let data: Vec<serde_json::Value> = g
        .table
        .names()
        .into_iter()
        .map(|(name, replicas)| {
            json!({"id": name, "object": "model", "created": 0, "owned_by": "berth", "ready_replicas": replicas})
        })
        .collect();
    json_response(StatusCode::OK, json!({"object": "list", "data": data}))
}

async fn health(State(g): State<Arc<Gateway>>) -> Response {
    let endpoints = g.table.endpoint_count();
    if !g.link.synced() {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({
                "status": "starting",
                "reason": "no endpoint snapshot from the control plane yet",
                "endpoints": endpoints,
            }),
        );
    }
    let control_plane = if g.link.connected() {
        format!("watching (leader {})", g.link.leader())
    } else {
        format!(
            "unreachable: routing from what it last knew, {:.0}s ago",
            g.link.since_update().unwrap_or_default().as_secs_f64()
        )
    };
    json_response(
        StatusCode::OK,
        json!({
            "status": "ok",
            "control_plane": control_plane,
            "control_plane_connected": g.link.connected(),
            "endpoints": endpoints,
            "models": g.table.names().len(),
        }),
    )
}

async fn metrics(State(g): State<Arc<Gateway>>) -> Response {
    let m = &g.metrics;
    m.inflight.clear();
    m.replicas.clear();
    for (name, replicas, inflight) in g.table.load() {
        m.replicas
            .get_or_create(&model_label(&name))
            .set(replicas as i64);
        m.inflight
            .get_or_create(&model_label(&name))
            .set(inflight as i64);
    }
    m.waiting.clear();
    for (name, waiting) in g.table.waiting() {
        m.waiting
            .get_or_create(&model_label(&name))
            .set(waiting as i64);
    }
    m.connected.set(i64::from(g.link.connected()));
    m.export_codes();
    let mut text = String::new();
    if let Err(e) = encode(&mut text, &m.registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            berth_common::telemetry::PROMETHEUS_TEXT,
        )],
        berth_common::telemetry::prometheus_text(&text),
    )
        .into_response()
}

#[derive(Deserialize)]
struct ModelField {
    model: Option<String>,
}

/// Headers that belong to one connection, not to the request (parsed
/// names, so that removing them parses nothing per request).
const HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HOST,
];

/// Whether an upstream answer means "this replica cannot take it now",
/// which is safe to retry elsewhere: nothing was generated.
fn retryable(status: StatusCode) -> bool {
    status == StatusCode::BAD_GATEWAY || status == StatusCode::SERVICE_UNAVAILABLE
}

async fn forward(State(g): State<Arc<Gateway>>, request: Request) -> Response {
    let started = Instant::now();
    if let Some(r) = g.refuse_unauthorized(request.headers()) {
        return r;
    }
    let (parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, g.max_body).await {
        Ok(b) => b,
        Err(_) => {
            return openai_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                &format!(
                    "the request body is over {} MiB (the gateway's --max-body-mib)",
                    g.max_body / (1024 * 1024)
                ),
            );
        }
    };
    let model = match serde_json::from_slice::<ModelField>(&bytes) {
        Ok(ModelField { model: Some(m) }) if !m.is_empty() => m,
        Ok(_) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                "model_missing",
                "the request has no \"model\" field: name a model (GET /v1/models lists them)",
            );
        }
        Err(e) => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                &format!("the request body is not a JSON object: {e}"),
            );
        }
    };
    // Clients choose the name: only names the table knows become labels.
    let series = if g.table.serves(&model) {
        g.metrics.series(&model)
    } else {
        g.metrics.series("unknown")
    };
    let response = g.route(&parts, bytes, &model, &series, started).await;
    series.answered(response.status());
    response
}

impl Gateway {
    /// Sends the request to a replica of `model`, and to another one if the
    /// first fails before answering.
    async fn route(
        &self,
        parts: &axum::http::request::Parts,
        body: Bytes,
        model: &str,
        series: &Arc<Series>,
        started: Instant,
    ) -> Response {
        self.table.deposit();
        let mut tried: Vec<String> = Vec::new();
        let mut last_failure = String::new();
        for attempt in 1..=MAX_ATTEMPTS {
            let inflight = match self.table.acquire(model, &tried).await {
                Ok(i) => i,
                Err(NoReplica::Unknown) if attempt == 1 => {
                    let served: Vec<String> =
                        self.table.names().into_iter().map(|(n, _)| n).collect();
                    return openai_error(
                        StatusCode::NOT_FOUND,
                        "model_not_found",
                        &format!(
                            "no ready replica serves model {model:?}: it is not deployed, or none of its replicas is ready yet; served now: {}",
                            if served.is_empty() {
                                "nothing".to_string()
                            } else {
                                served.join(", ")
                            }
                        ),
                    );
                }
                Err(NoReplica::Unknown) => break,
                Err(NoReplica::QueueFull) => {
                    return retry_after(
                        openai_error(
                            StatusCode::TOO_MANY_REQUESTS,
                            "queue_full",
                            &format!(
                                "every replica of {model:?} is at its in-flight cap and {} requests already wait: retry later",
                                self.table.limits().queue_size
                            ),
                        ),
                        1,
                    );
                }
                Err(NoReplica::Timeout(waited)) => {
                    return retry_after(
                        openai_error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "queue_timeout",
                            &format!(
                                "no replica of {model:?} had room (or started) within {waited:?}: retry later"
                            ),
                        ),
                        5,
                    );
                }
                Err(NoReplica::ColdQueueFull(after_s)) => {
                    return retry_after(
                        openai_error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "cold_start",
                            &format!(
                                "{model:?} has no replica yet (scaled to zero; one is starting) and {} requests already wait for it: retry in about {after_s} s",
                                self.table.limits().queue_size
                            ),
                        ),
                        after_s,
                    );
                }
            };
            let replica = inflight.replica.clone();
            tried.push(replica.id.clone());
            let strip_auth = self.api_key.is_some();
            // The server knows its model by its Berth name, not by the
            // version or deployment the client may have named.
            let sent = if replica.model == model {
                body.clone()
            } else {
                with_model(&body, &replica.model)
            };
            let upstream = match upstream_request(parts, &replica, sent, strip_auth) {
                Ok(r) => r,
                Err(e) => {
                    return openai_error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        &format!("cannot forward this request: {e}"),
                    );
                }
            };
            let can_retry = attempt < MAX_ATTEMPTS;
            match self.client.request(upstream).await {
                Ok(answer) if retryable(answer.status()) && can_retry && self.table.withdraw() => {
                    last_failure = format!(
                        "replica {} answered {}",
                        replica.id,
                        answer.status().as_u16()
                    );
                    self.failure(&replica, &last_failure);
                    series.retries.inc();
                }
                Ok(answer) => {
                    if retryable(answer.status()) {
                        self.failure(&replica, "answered 502 or 503");
                    } else {
                        self.table.succeeded(&replica);
                    }
                    return self.stream_back(answer, inflight, series, started);
                }
                Err(e) => {
                    last_failure = format!("replica {} at {}: {e}", replica.id, replica.address);
                    if let Some(cause) = std::error::Error::source(&e) {
                        last_failure.push_str(&format!(" ({cause})"));
                    }
                    self.failure(&replica, &last_failure);
                    if !(can_retry && self.table.withdraw()) {
                        break;
                    }
                    series.retries.inc();
                }
            }
        }
        openai_error(
            StatusCode::BAD_GATEWAY,
            "upstream_failed",
            &format!("no replica of {model:?} could take the request: {last_failure}"),
        )
    }

    fn failure(&self, replica: &crate::table::Replica, why: &str) {
        let ejected = self.table.failed(replica);
        tracing::warn!(replica = %replica.id, address = %replica.address, ejected, "{why}");
        if ejected {
            self.metrics
                .ejections
                .get_or_create(&model_label(&replica.model))
                .inc();
        }
    }

    /// The replica's answer, streamed back frame by frame; the request
    /// counts as in flight until its last frame is sent or the client goes
    /// away (then the upstream connection is dropped, which cancels the
    /// request on the model server).
    fn stream_back(
        &self,
        answer: hyper::Response<hyper::body::Incoming>,
        inflight: Inflight,
        series: &Arc<Series>,
        started: Instant,
    ) -> Response {
        let (mut parts, body) = answer.into_parts();
        for name in &HOP_BY_HOP {
            parts.headers.remove(name);
        }
        if let Some(v) = &inflight.replica.header {
            parts.headers.insert(REPLICA_HEADER, v.clone());
        }
        let mut meter = Meter {
            started,
            first: false,
            first_byte: series.first_byte.clone(),
            duration: series.duration.clone(),
            inflight,
        };
        let cut = series.cut.clone();
        let replica = meter.inflight.replica.id.clone();
        // An upstream error mid-answer reaches hyper as a body error: it
        // aborts the response, so the client sees the stream break.
        let body = body
            .map_frame(move |frame| {
                meter.frame();
                frame
            })
            .map_err(move |e| {
                cut.inc();
                tracing::warn!(%replica, error = %e, "the replica broke off its answer");
                e
            });
        Response::from_parts(parts, Body::new(body))
    }
}

/// Times one answer; dropping it (answer sent, or client gone) ends it.
struct Meter {
    started: Instant,
    first: bool,
    first_byte: Histogram,
    duration: Histogram,
    inflight: Inflight,
}

impl Meter {
    fn frame(&mut self) {
        if !self.first {
            self.first = true;
            self.first_byte
                .observe(self.started.elapsed().as_secs_f64());
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.duration.observe(self.started.elapsed().as_secs_f64());
    }
}

/// `body` (a JSON object) with its `model` replaced.
fn with_model(body: &Bytes, model: &str) -> Bytes {
    match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body) {
        Ok(mut object) => {
            object.insert("model".into(), serde_json::Value::String(model.to_string()));
            serde_json::to_vec(&object).map_or_else(|_| body.clone(), Bytes::from)
        }
        Err(_) => body.clone(),
    }
}

/// The request for `replica`: the client's method, path and headers (less
/// the hop-by-hop ones), built from parsed parts, not from text.
fn upstream_request(
    parts: &axum::http::request::Parts,
    replica: &crate::table::Replica,
    body: Bytes,
    strip_auth: bool,
) -> Result<hyper::Request<Full<Bytes>>, axum::http::Error> {
    let mut uri = axum::http::uri::Parts::default();
    uri.scheme = Some(axum::http::uri::Scheme::HTTP);
    uri.authority = replica.authority.clone();
    uri.path_and_query = parts.uri.path_and_query().cloned();
    let mut request = hyper::Request::new(Full::new(body));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = axum::http::Uri::from_parts(uri)?;
    let mut headers = parts.headers.clone();
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    // The body sets its own length.
    headers.remove(header::CONTENT_LENGTH);
    // The gateway's own API key is not the model server's business.
    if strip_auth {
        headers.remove(header::AUTHORIZATION);
    }
    *request.headers_mut() = headers;
    Ok(request)
}
