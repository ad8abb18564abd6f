//! `demo-model`: a small, real HTTP model server for demos and tests. It
//! speaks enough of the OpenAI API to be used like a real one:
//! `GET /health`, `GET /v1/models`, `POST /v1/completions` (deterministic
//! toy text: the same prompt always gives the same words). It says it is a
//! demo everywhere. `--load-delay` mimics loading weights (health answers
//! 503 meanwhile); `--fail-health` makes it never healthy, for rollout tests.
//! Runtime `demo` in the registry runs it (`berth-agent demo-model`).

use std::net::SocketAddr;
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
}

fn duration(s: &str) -> Result<Duration, String> {
    berth_common::units::parse_duration("load_delay", s).map_err(|e| e.rule)
}

struct Demo {
    name: String,
    ready: AtomicBool,
    fail_health: bool,
    requests: AtomicU64,
}

/// Runs the demo model server until SIGTERM or Ctrl-C.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    // First, so that a stop during start-up is graceful too.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| anyhow::anyhow!("install the SIGTERM handler: {e}"))?;
    let addr = SocketAddr::new(args.host, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("bind {addr}: {e} (is the port in use?)"))?;
    let demo = Arc::new(Demo {
        name: args.name.clone(),
        ready: AtomicBool::new(args.load_delay.is_zero()),
        fail_health: args.fail_health,
        requests: AtomicU64::new(0),
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
    max_tokens: Option<u32>,
}

/// The most tokens one completion returns.
const MAX_TOKENS: u32 = 512;

async fn completions(State(d): State<Arc<Demo>>, body: Bytes) -> Response {
    if !d.ready.load(Ordering::SeqCst) {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": {"message": "the model is still loading", "type": "unavailable"}}),
        );
    }
    let req: CompletionRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": {"message": format!("the body is not a completion request: {e}"), "type": "invalid_request_error"}}),
            );
        }
    };
    if let Some(m) = &req.model
        && m != &d.name
    {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({"error": {"message": format!("model {m:?} is not served here; this server serves {:?}", d.name), "type": "invalid_request_error"}}),
        );
    }
    let prompt = req.prompt.unwrap_or_default();
    let tokens = req.max_tokens.unwrap_or(16).clamp(1, MAX_TOKENS);
    let text = generate(&prompt, tokens);
    let n = d.requests.fetch_add(1, Ordering::Relaxed) + 1;
    println!("POST /v1/completions 200 ({tokens} tokens, request {n})");
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |t| t.as_secs());
    json_response(
        StatusCode::OK,
        json!({
            "id": format!("cmpl-demo-{n}"),
            "object": "text_completion",
            "created": created,
            "model": d.name,
            "demo": true,
            "choices": [{"text": text, "index": 0, "finish_reason": "length", "logprobs": null}],
            "usage": {
                "prompt_tokens": prompt.split_whitespace().count(),
                "completion_tokens": tokens,
                "total_tokens": prompt.split_whitespace().count() as u32 + tokens,
            },
        }),
    )
}

const WORDS: [&str; 32] = [
    "berth", "harbor", "tide", "anchor", "vessel", "cargo", "quay", "pilot", "current", "beacon",
    "signal", "voyage", "mooring", "crane", "dock", "sail", "keel", "port", "channel", "lantern",
    "compass", "harbour", "swell", "gull", "rope", "deck", "mast", "helm", "wake", "ferry", "buoy",
    "horizon",
];

/// Deterministic toy text: an FNV-1a hash of the prompt seeds a xorshift.
pub fn generate(prompt: &str, tokens: u32) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in prompt.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut x = h | 1;
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
}
