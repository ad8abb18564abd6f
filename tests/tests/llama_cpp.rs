//! A real model server through Berth: llama.cpp's `llama-server` (built by
//! `scripts/llama-server.sh`, which `scripts/test.sh` runs first) serving a
//! tiny random-weight GGUF model that the test writes itself
//! (`scripts/tiny-gguf.py`), on CPU. Two replicas are deployed through a
//! secure control plane and an agent, and reached through a real
//! `berth-gateway`: readiness from `/health`, completions, chat, streaming,
//! the queue and running gauges read from its `/metrics`, and a scale-down
//! under load (drain, then SIGTERM) that fails no request.

use std::path::PathBuf;

use berth_tests::*;
use serde_json::Value;

/// The llama.cpp build the scripts make, and the Python that writes models.
fn llama_tools() -> (PathBuf, PathBuf) {
    let cache = std::env::var_os("BERTH_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/berth")))
        .expect("HOME or BERTH_CACHE")
        .join("llama-server-0.3.36");
    let server = std::env::var_os("BERTH_LLAMA_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache.join("bin/llama-server"));
    let python = std::env::var_os("BERTH_LLAMA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache.join("venv/bin/python"));
    assert!(
        server.is_file() && python.is_file(),
        "llama-server ({}) or its Python ({}) is missing: run scripts/llama-server.sh once (about 9 minutes on 2 cores; scripts/test.sh does it)",
        server.display(),
        python.display()
    );
    (server, python)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository")
        .to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_server_replicas_serve_through_the_gateway() {
    let (server, python) = llama_tools();
    let cluster = LocalCluster::start(1, MemberOptions::default())
        .await
        .expect("start the control plane");
    let servers = cluster.servers();
    let model = cluster.root().join("tiny.gguf");
    let wrote = tokio::process::Command::new(&python)
        .arg(repo().join("scripts/tiny-gguf.py"))
        .arg(&model)
        .output()
        .await
        .expect("run tiny-gguf.py");
    assert!(
        wrote.status.success(),
        "tiny-gguf.py: {}",
        String::from_utf8_lossy(&wrote.stderr)
    );
    let _agent = LocalAgent::start_in(
        cluster.root(),
        cluster.agent_options("cpu-a", "1xA100-80GB"),
    )
    .expect("start the agent");
    wait_until(DEADLINE, "the node ready", || async {
        let v = try_berth_json(&["--server", &servers, "node", "list"]).await?;
        (v.as_array()?.iter().any(|n| n["state"] == "ready")).then_some(())
    })
    .await;

    // The agent finds `llama-server` on the replica's PATH.
    let bin_dir = server.parent().expect("the binary's directory");
    let path = format!(
        "PATH={}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let model_arg = model.display().to_string();
    berth_json(&[
        "--server",
        &servers,
        "model",
        "create",
        "tiny",
        "--runtime",
        "llama-cpp",
        "--source",
        &model_arg,
        "--gpus",
        "0",
        "--cpu",
        "500m",
        "--memory",
        "256MiB",
        "--env",
        &path,
    ])
    .await;
    let created = berth_json(&[
        "--server",
        &servers,
        "deploy",
        "create",
        "tiny",
        "--model",
        "tiny",
        "--replicas",
        "2",
        "--wait",
        "--timeout",
        "60s",
    ])
    .await;
    assert_eq!(created["replicas_running"], 2, "{created}");

    // Its agent reads llama.cpp's own gauges (the preset turns --metrics on).
    wait_until(DEADLINE, "the engine's load reported", || async {
        let rs = deployment_replicas(&servers, "tiny").await;
        (rs.len() == 2
            && rs
                .iter()
                .all(|r| r["queue_depth"] == 0 && r["running_requests"].is_u64()))
        .then_some(())
    })
    .await;

    let token = cluster.token("gateway").await.expect("a gateway token");
    let gateway = start_gateway(&["--control", &servers, "--token", &token]).await;
    let port = gateway.port;
    wait_until(DEADLINE, "both replicas routable", || async {
        let (_, body) = http_get(port, "/v1/models").await?;
        let v: Value = serde_json::from_str(&body).ok()?;
        v["data"]
            .as_array()?
            .iter()
            .any(|m| m["id"] == "tiny" && m["ready_replicas"] == 2)
            .then_some(())
    })
    .await;

    // Completions and chat, whole and streamed; the model is named as
    // Berth names it (the preset passes --alias), or by version.
    let (code, headers, body) = http_full(
        port,
        "POST",
        "/v1/completions",
        r#"{"model":"tiny","prompt":"hello","max_tokens":8}"#,
    )
    .await
    .expect("an answer");
    assert_eq!(code, 200, "{body}");
    assert!(headers.contains_key("x-berth-replica"), "{headers:?}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert!(v["choices"][0]["text"].is_string(), "{body}");
    // Random weights may end early on an end-of-text token.
    assert!(
        v["usage"]["completion_tokens"]
            .as_u64()
            .is_some_and(|n| (1..=8).contains(&n)),
        "{body}"
    );
    let (code, _, body) = http_full(
        port,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"tiny:v1","messages":[{"role":"user","content":"hi"}],"max_tokens":8}"#,
    )
    .await
    .expect("an answer");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"chat.completion\""), "{body}");
    let (code, headers, body) = http_full(
        port,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":8,"stream":true}"#,
    )
    .await
    .expect("an answer");
    assert_eq!(code, 200, "{body}");
    assert!(
        headers
            .get("content-type")
            .is_some_and(|c| c.contains("text/event-stream")),
        "{headers:?}"
    );
    assert!(body.matches("data: ").count() >= 3, "{body}");
    assert!(body.contains("data: [DONE]"), "{body}");

    // Scale down under load: the removed replica is drained, then stopped
    // by SIGTERM; no request fails.
    let before = deployment_replicas(&servers, "tiny").await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(async move {
        let mut ok = 0u32;
        let mut failures = Vec::new();
        while !*stopped.borrow() {
            let answer = http_full(
                port,
                "POST",
                "/v1/completions",
                r#"{"model":"tiny","prompt":"the tide","max_tokens":16}"#,
            )
            .await;
            match answer {
                Some((200, _, _)) => ok += 1,
                other => failures.push(format!("{other:?}")),
            }
        }
        (ok, failures)
    });
    berth_json(&[
        "--server", &servers, "deploy", "scale", "tiny", "1", "--wait",
    ])
    .await;
    let removed: Vec<u64> = wait_until(DEADLINE, "one replica left", || async {
        let now = deployment_replicas(&servers, "tiny").await;
        (now.len() == 1).then(|| {
            before
                .iter()
                .filter(|r| !now.iter().any(|n| n["id"] == r["id"]))
                .filter_map(|r| r["pid"].as_u64())
                .collect()
        })
    })
    .await;
    stop.send(true).expect("stop the load");
    let (ok, failures) = load.await.expect("the load");
    assert!(
        failures.is_empty(),
        "requests failed while scaling down: {failures:?}"
    );
    assert!(ok > 0, "the load ran");
    assert_eq!(removed.len(), 1, "{before:?}");
    for pid in removed {
        wait_exited(pid as u32, "the removed llama-server").await;
    }
}
