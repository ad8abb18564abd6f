//! `berth demo-model`: a real HTTP model server. Health is 503 while it
//! "loads weights", then 200; it lists its model, completes deterministically,
//! says it is a demo, and refuses bad requests clearly.

use std::process::Stdio;

use berth_cli::local::{find_binary, free_port};
use berth_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_model_loads_then_serves_deterministic_completions() {
    let port = free_port().unwrap();
    let _server = tokio::process::Command::new(find_binary("berth").unwrap())
        .args([
            "demo-model",
            "--port",
            &port.to_string(),
            "--name",
            "tiny",
            "--load-delay",
            "1s",
        ])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let port = u32::from(port);
    let (code, body) = wait_until(DEADLINE, "the server answers", || async {
        http_get(port, "/health").await
    })
    .await;
    assert_eq!(code, 503, "loading: {body}");
    assert!(body.contains("loading"), "{body}");
    wait_until(DEADLINE, "weights loaded", || async {
        http_get(port, "/health").await.filter(|(c, _)| *c == 200)
    })
    .await;

    let (code, body) = http_get(port, "/v1/models").await.unwrap();
    assert_eq!(code, 200);
    let models: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["demo"], true);

    let complete = |prompt: &'static str| async move {
        let body = format!(r#"{{"model":"tiny","prompt":"{prompt}","max_tokens":6}}"#);
        let (code, body) = http(port, "POST", "/v1/completions", &body).await.unwrap();
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["demo"], true);
        assert_eq!(v["usage"]["completion_tokens"], 6);
        v["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let a = complete("hello berth").await;
    assert_eq!(a.split(' ').count(), 6);
    assert_eq!(complete("hello berth").await, a, "same prompt, same text");
    assert_ne!(complete("hello harbor").await, a);

    let (code, body) = http(port, "POST", "/v1/completions", "not json")
        .await
        .unwrap();
    assert_eq!(code, 400, "{body}");
    let (code, body) = http(port, "POST", "/v1/completions", r#"{"model":"other"}"#)
        .await
        .unwrap();
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("tiny"), "{body}");
}
