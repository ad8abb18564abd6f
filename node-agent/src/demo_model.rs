//! `demo-model`: a small, real HTTP model server for demos and tests. It
//! speaks enough of the OpenAI API to be used like a real one:
//! `GET /health`, `GET /v1/models`, `POST /v1/completions`,
//! `/v1/chat/completions` (deterministic toy text: the same prompt always
//! gives the same words; `"stream": true` sends server-sent events, one per
//! word, `--token-delay` apart) and `/v1/embeddings`, and `GET /metrics`
//! (requests running, served and cancelled by their client). It says it is
//! a demo everywhere. `--load-delay` mimics loading weights (health answers
//! 503 meanwhile); `--fail-health` makes it never healthy, for rollout tests.
//! Runtime `demo` in the registry runs it (`berth-agent demo-model`).
//! `--gpu-ledger DIR` (or `DEMO_GPU_LEDGER`, set through a model version's
//! env) locks and records the GPUs it was given, for fault-injection suites
//! (see `ledger`).

pub mod ledger;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Args;
use serde::Deserialize;
use serde_json::json;

/// `demo-model` options.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Port to listen on.
    #[arg(long, env = "BERTH_PORT")]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Model name it serves.
    #[arg(long, default_value = "demo", env = "BERTH_MODEL")]
    pub name: String,
    /// Pretend to load weights for this long before becoming healthy (e.g. 2s).
    #[arg(long, default_value = "0s", env = "BERTH_DEMO_LOAD_DELAY", value_parser = duration)]
    pub load_delay: Duration,
    /// Never become healthy (for testing failed rollouts).
    #[arg(long, env = "BERTH_DEMO_FAIL_HEALTH")]
    pub fail_health: bool,
    /// Time between two words of an answer (e.g. 20ms), like a model's decode step.
    #[arg(long, default_value = "0s", env = "BERTH_DEMO_TOKEN_DELAY", value_parser = duration)]
    pub token_delay: Duration,
    /// Requests generated at once; more wait in a queue, like an engine's
    /// batch slots (0: no limit).
    #[arg(long, default_value_t = 0, env = "BERTH_DEMO_MAX_CONCURRENCY")]
    pub max_concurrency: u32,
    /// Lock each GPU of BERTH_GPU_UUIDS in DIR and append start and stop
    /// lines to DIR/ledger.jsonl, so a fault-injection suite can check that
    /// no GPU is held twice (not a BERTH_ name: the agent strips those).
    #[arg(long, value_name = "DIR", env = "DEMO_GPU_LEDGER")]
    pub gpu_ledger: Option<PathBuf>,
}

fn duration(s: &str) -> Result<Duration, String> {
    berth_common::units::parse_duration("load_delay", s).map_err(|e| e.rule)
}

struct Demo {
    name: String,
    ready: AtomicBool,
    fail_health: bool,
    token_delay: Duration,
    /// Batch slots, when limited.
    slots: Option<Arc<tokio::sync::Semaphore>>,
    /// How many (0: unlimited).
    max_concurrency: u32,
    requests: AtomicU64,
    running: AtomicU64,
    waiting: AtomicU64,
    cancelled: AtomicU64,
}

/// One request holding a slot: counted as running until dropped.
struct Busy {
    demo: Arc<Demo>,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.demo.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits for a slot (counted as waiting meanwhile), then holds it.
async fn busy(demo: &Arc<Demo>) -> Busy {
    let slot = match &demo.slots {
        Some(slots) => {
            demo.waiting.fetch_add(1, Ordering::SeqCst);
            let permit = slots.clone().acquire_owned().await.ok();
            demo.waiting.fetch_sub(1, Ordering::SeqCst);
            permit
        }
        None => None,
    };
    demo.running.fetch_add(1, Ordering::SeqCst);
    Busy {
        demo: demo.clone(),
        _slot: slot,
    }
}

/// Runs the demo model server until SIGTERM or Ctrl-C.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    // First, so that a stop during start-up is graceful too.
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| anyhow::anyhow!("install the SIGTERM handler: {e}"))?;
    // Before loading or serving: the GPUs are this process's from its start.
    let ledger = match &args.gpu_ledger {
        Some(dir) => {
            let ledger = ledger::Ledger::start(dir, &ledger::ReplicaIdentity::from_env()?)?;
            for line in ledger.started().filter(|l| !l.locked) {
                eprintln!(
                    "warning: GPU {} is locked by another process (a double booking, recorded in {})",
                    line.gpu,
                    dir.join(ledger::LEDGER_FILE).display()
                );
            }
            Some(ledger)
        }
        None => None,
    };
    let served = serve(args, term).await;
    // Every exit that is not a kill closes the ledger, a failed bind included.
    let stopped = ledger.map_or(Ok(()), ledger::Ledger::stop);
    if let (Err(_), Err(e)) = (&served, &stopped) {
        // The serving error ends the process; this one is only reported.
        eprintln!("error: {e}");
    }
    served?;
    Ok(stopped?)
}

/// Serves until SIGTERM (`term`) or Ctrl-C.
async fn serve(args: DemoArgs, mut term: tokio::signal::unix::Signal) -> anyhow::Result<()> {
    let addr = SocketAddr::new(args.host, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("bind {addr}: {e} (is the port in use?)"))?;
    let demo = Arc::new(Demo {
        name: args.name.clone(),
        ready: AtomicBool::new(args.load_delay.is_zero()),
        fail_health: args.fail_health,
        token_delay: args.token_delay,
        max_concurrency: args.max_concurrency,
        slots: (args.max_concurrency > 0)
            .then(|| Arc::new(tokio::sync::Semaphore::new(args.max_concurrency as usize))),
        requests: AtomicU64::new(0),
        running: AtomicU64::new(0),
        waiting: AtomicU64::new(0),
        cancelled: AtomicU64::new(0),
    });
    println!(
        "berth demo model {:?} (a demo, not a real model) listening on http://{addr}",
        args.name
    );
    if !args.load_delay.is_zero() {
        println!("loading weights (simulated) for {:?}", args.load_delay);
        let d = demo.clone();
        tokio::spawn(async move {
            tokio::time::sleep(args.load_delay).await;
            d.ready.store(true, Ordering::SeqCst);
            println!("weights loaded (simulated); ready");
        });
    }
    let app = Router::new()
        .route("/", get(root))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/metrics", get(metrics))
        .with_state(demo);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            println!("shutting down");
        })
        .await?;
    println!("berth demo model stopped");
    Ok(())
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

async fn root(State(d): State<Arc<Demo>>) -> Response {
    format!(
        "berth demo model {:?}: a demo server, not a real model. Try GET /v1/models or POST /v1/completions.\n",
        d.name
    )
    .into_response()
}

async fn health(State(d): State<Arc<Demo>>) -> Response {
    if d.fail_health {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "failing", "demo": true, "reason": "--fail-health"}),
        );
    }
    if !d.ready.load(Ordering::SeqCst) {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "loading", "demo": true}),
        );
    }
    json_response(
        StatusCode::OK,
        json!({"status": "ok", "model": d.name, "demo": true}),
    )
}

async fn models(State(d): State<Arc<Demo>>) -> Response {
    json_response(
        StatusCode::OK,
        json!({
            "object": "list",
            "data": [{"id": d.name, "object": "model", "owned_by": "berth-demo", "demo": true}],
        }),
    )
}

#[derive(Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    stream: bool,
}

#[derive(Deserialize)]
struct ChatMessage {
    #[serde(default)]
    content: Option<String>,
}

/// The most tokens one completion returns.
const MAX_TOKENS: u32 = 512;

fn error(status: StatusCode, message: String) -> Response {
    json_response(
        status,
        json!({"error": {"message": message, "type": "invalid_request_error"}}),
    )
}

/// Checks readiness, the body and the model name; the request, or the answer to give.
fn admit(d: &Demo, body: &[u8]) -> Result<CompletionRequest, Box<Response>> {
    if !d.ready.load(Ordering::SeqCst) {
        return Err(Box::new(json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": {"message": "the model is still loading", "type": "unavailable"}}),
        )));
    }
    let req: CompletionRequest = serde_json::from_slice(body).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("the body is not a completion request: {e}"),
        ))
    })?;
    if let Some(m) = &req.model
        && m != &d.name
    {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            format!(
                "model {m:?} is not served here; this server serves {:?}",
                d.name
            ),
        )));
    }
    Ok(req)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |t| t.as_secs())
}

async fn completions(State(d): State<Arc<Demo>>, body: Bytes) -> Response {
    let req = match admit(&d, &body) {
        Ok(r) => r,
        Err(answer) => return *answer,
    };
    answer(d, req, Kind::Completion).await
}

async fn chat_completions(State(d): State<Arc<Demo>>, body: Bytes) -> Response {
    let req = match admit(&d, &body) {
        Ok(r) => r,
        Err(answer) => return *answer,
    };
    answer(d, req, Kind::Chat).await
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

/// Answers a completion or chat request, whole or streamed.
async fn answer(d: Arc<Demo>, req: CompletionRequest, kind: Kind) -> Response {
    let prompt = match kind {
        Kind::Completion => req.prompt.clone().unwrap_or_default(),
        Kind::Chat => req
            .messages
            .iter()
            .flatten()
            .filter_map(|m| m.content.clone())
            .collect::<Vec<_>>()
            .join("\n"),
    };
    let tokens = req.max_tokens.unwrap_or(16).clamp(1, MAX_TOKENS);
    let words: Vec<String> = generate(&prompt, tokens)
        .split(' ')
        .map(String::from)
        .collect();
    let n = d.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let id = match kind {
        Kind::Completion => format!("cmpl-demo-{n}"),
        Kind::Chat => format!("chatcmpl-demo-{n}"),
    };
    let path = match kind {
        Kind::Completion => "/v1/completions",
        Kind::Chat => "/v1/chat/completions",
    };
    let slot = busy(&d).await;
    if req.stream {
        println!("POST {path} 200 (streaming {tokens} tokens, request {n})");
        return stream(d, id, words, kind, slot);
    }
    // Generated at the same pace as a stream (a client that leaves
    // meanwhile drops this future, and with it the slot).
    if !d.token_delay.is_zero() {
        // (A zero sleep still waits for the timer's next millisecond.)
        tokio::time::sleep(d.token_delay.saturating_mul(tokens)).await;
    }
    drop(slot);
    println!("POST {path} 200 ({tokens} tokens, request {n})");
    let text = words.join(" ");
    let prompt_tokens = prompt.split_whitespace().count() as u32;
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": tokens,
        "total_tokens": prompt_tokens + tokens,
    });
    let body = match kind {
        Kind::Completion => json!({
            "id": id,
            "object": "text_completion",
            "created": unix_now(),
            "model": d.name,
            "demo": true,
            "choices": [{"text": text, "index": 0, "finish_reason": "length", "logprobs": null}],
            "usage": usage,
        }),
        Kind::Chat => json!({
            "id": id,
            "object": "chat.completion",
            "created": unix_now(),
            "model": d.name,
            "demo": true,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
            "usage": usage,
        }),
    };
    json_response(StatusCode::OK, body)
}

/// Server-sent events, one per word, `token_delay` apart, then `[DONE]`.
/// A client that goes away stops the generation (counted as cancelled).
fn stream(d: Arc<Demo>, id: String, words: Vec<String>, kind: Kind, slot: Busy) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(1);
    tokio::spawn(async move {
        let _slot = slot;
        let created = unix_now();
        let total = words.len();
        let mut events = Vec::with_capacity(total + 2);
        if kind == Kind::Chat {
            events.push(json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": d.name,
                "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": null}]}));
        }
        for (i, w) in words.iter().enumerate() {
            let text = if i == 0 { w.clone() } else { format!(" {w}") };
            let finish = if i + 1 == total {
                json!("length")
            } else {
                json!(null)
            };
            events.push(match kind {
                Kind::Completion => json!({"id": id, "object": "text_completion", "created": created, "model": d.name,
                    "choices": [{"text": text, "index": 0, "finish_reason": finish, "logprobs": null}]}),
                Kind::Chat => json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": d.name,
                    "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}),
            });
        }
        let mut sent = 0;
        let mut cancelled = false;
        for event in events {
            if !d.token_delay.is_zero() {
                tokio::time::sleep(d.token_delay).await;
            }
            if tx.send(Ok(format!("data: {event}\n\n"))).await.is_err() {
                cancelled = true;
                break;
            }
            sent += 1;
        }
        if !cancelled && tx.send(Ok("data: [DONE]\n\n".into())).await.is_err() {
            cancelled = true;
        }
        if cancelled {
            d.cancelled.fetch_add(1, Ordering::SeqCst);
            println!("{id}: the client went away after {sent} events; generation stopped");
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(axum::body::Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap_or_else(|e| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("build the stream: {e}"),
            )
        })
}

#[derive(Deserialize)]
struct EmbeddingRequest {
    #[serde(default)]
    model: Option<String>,
    input: serde_json::Value,
}

/// Dimensions of the demo's embeddings.
const EMBEDDING_DIMS: usize = 8;

async fn embeddings(State(d): State<Arc<Demo>>, body: Bytes) -> Response {
    if !d.ready.load(Ordering::SeqCst) {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": {"message": "the model is still loading", "type": "unavailable"}}),
        );
    }
    let req: EmbeddingRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not an embeddings request: {e}"),
            );
        }
    };
    if let Some(m) = &req.model
        && m != &d.name
    {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "model {m:?} is not served here; this server serves {:?}",
                d.name
            ),
        );
    }
    let inputs: Vec<String> = match &req.input {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(items) if items.iter().all(|i| i.is_string()) => items
            .iter()
            .filter_map(|i| i.as_str().map(String::from))
            .collect(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "input must be a string or an array of strings".into(),
            );
        }
    };
    d.requests.fetch_add(1, Ordering::Relaxed);
    let data: Vec<serde_json::Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| json!({"object": "embedding", "index": i, "embedding": embed(text)}))
        .collect();
    let tokens: usize = inputs.iter().map(|t| t.split_whitespace().count()).sum();
    json_response(
        StatusCode::OK,
        json!({"object": "list", "data": data, "model": d.name, "demo": true,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
    )
}

/// A deterministic unit vector from the text's hash.
fn embed(text: &str) -> Vec<f32> {
    let mut x = fnv(text) | 1;
    let raw: Vec<f32> = (0..EMBEDDING_DIMS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 2001) as f32 / 1000.0 - 1.0
        })
        .collect();
    let norm = raw
        .iter()
        .map(|v| v * v)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    raw.iter().map(|v| v / norm).collect()
}

async fn metrics(State(d): State<Arc<Demo>>) -> Response {
    // A simulated KV cache: each running request holds an equal share of
    // it, full when every batch slot is taken (only with --max-concurrency).
    let kv = if d.max_concurrency > 0 {
        format!(
            "# HELP berth_demo:kv_cache_usage_ratio Simulated KV cache use: running requests over batch slots.\n# TYPE berth_demo:kv_cache_usage_ratio gauge\nberth_demo:kv_cache_usage_ratio {}\n",
            d.running.load(Ordering::SeqCst) as f64 / f64::from(d.max_concurrency)
        )
    } else {
        String::new()
    };
    let mut text = format!(
        "# HELP berth_demo:requests_running Requests being generated.\n# TYPE berth_demo:requests_running gauge\nberth_demo:requests_running {}\n\
         # HELP berth_demo:requests_waiting Requests waiting for a slot (--max-concurrency).\n# TYPE berth_demo:requests_waiting gauge\nberth_demo:requests_waiting {}\n\
         # HELP berth_demo:requests_total Requests answered.\n# TYPE berth_demo:requests_total counter\nberth_demo:requests_total {}\n\
         # HELP berth_demo:requests_cancelled_total Streams stopped because their client went away.\n# TYPE berth_demo:requests_cancelled_total counter\nberth_demo:requests_cancelled_total {}\n",
        d.running.load(Ordering::SeqCst),
        d.waiting.load(Ordering::SeqCst),
        d.requests.load(Ordering::SeqCst),
        d.cancelled.load(Ordering::SeqCst),
    );
    text.push_str(&kv);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

const WORDS: [&str; 32] = [
    "berth", "harbor", "tide", "anchor", "vessel", "cargo", "quay", "pilot", "current", "beacon",
    "signal", "voyage", "mooring", "crane", "dock", "sail", "keel", "port", "channel", "lantern",
    "compass", "harbour", "swell", "gull", "rope", "deck", "mast", "helm", "wake", "ferry", "buoy",
    "horizon",
];

/// FNV-1a.
fn fnv(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Deterministic toy text: an FNV-1a hash of the prompt seeds a xorshift.
pub fn generate(prompt: &str, tokens: u32) -> String {
    let mut x = fnv(prompt) | 1;
    (0..tokens)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            WORDS[(x % WORDS.len() as u64) as usize]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic() {
        assert_eq!(generate("hello", 8), generate("hello", 8));
        assert_ne!(generate("hello", 8), generate("hullo", 8));
        assert_eq!(generate("x", 5).split(' ').count(), 5);
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embed("hello");
        assert_eq!(a, embed("hello"));
        assert_ne!(a, embed("hullo"));
        let norm: f32 = a.iter().map(|v| v * v).sum();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    }
}
