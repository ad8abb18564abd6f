//! Autoscaling end to end: a secure control plane, an agent with simulated
//! GPUs running real `berth demo-model` replicas that take 3 s to load, and
//! a real `berth-gateway` reporting its load. A load step through the
//! gateway scales the deployment up and the engines' queues drain; when the
//! load falls, it scales down after the delay with no failed request; a
//! deployment that scales to zero goes to zero without traffic, and its
//! next request is held through the cold start and answered.

use berth_tests::*;
use serde_json::Value;

/// The demo model: 3 s to load, words 100 ms apart, 2 requests at a time
/// per replica (more wait in its queue, which its metrics show).
fn model_flags() -> Vec<&'static str> {
    let mut flags = DEMO_MODEL.to_vec();
    flags.extend([
        "--env",
        "BERTH_DEMO_LOAD_DELAY=3s",
        "--env",
        "BERTH_DEMO_TOKEN_DELAY=100ms",
        "--env",
        "BERTH_DEMO_MAX_CONCURRENCY=2",
    ]);
    flags
}

/// A secure one-member cluster with one agent (4 simulated GPUs), the demo
/// model registered, deployment `chat` running one replica, and a gateway
/// watching it.
async fn setup() -> (LocalCluster, LocalAgent, Gateway, String) {
    let cluster = LocalCluster::start(1, MemberOptions::default())
        .await
        .expect("start the control plane");
    let servers = cluster.servers();
    let agent = LocalAgent::start_in(
        cluster.root(),
        cluster.agent_options("gpu-a", "4xA100-80GB"),
    )
    .expect("start agent");
    wait_until(DEADLINE, "the node ready", || async {
        let v = try_berth_json(&["--server", &servers, "node", "list"]).await?;
        v.as_array()?
            .iter()
            .any(|n| n["state"] == "ready")
            .then_some(())
    })
    .await;
    let mut create = vec!["--server", servers.as_str(), "model", "create", "demo"];
    create.extend(model_flags());
    berth_json(&create).await;
    berth_json(&[
        "--server",
        &servers,
        "deploy",
        "create",
        "chat",
        "--model",
        "demo",
        "--replicas",
        "1",
        "--wait",
    ])
    .await;
    let token = cluster.token("gateway").await.expect("a gateway token");
    let gateway = start_gateway(&["--control", &servers, "--token", &token]).await;
    (cluster, agent, gateway, servers)
}

/// A completion through the gateway: its status and body.
async fn complete(port: u32, model: &str) -> (u16, String) {
    let body = format!(r#"{{"model":"{model}","prompt":"hello","max_tokens":3}}"#);
    match http_full(port, "POST", "/v1/completions", &body).await {
        Some((code, _, body)) => (code, body),
        None => (0, "no answer".into()),
    }
}

/// Sends completions back to back until `stop`; (answered, failures).
async fn client(port: u32, stop: tokio::sync::watch::Receiver<bool>) -> (u64, Vec<String>) {
    let mut ok = 0;
    let mut failures = Vec::new();
    while !*stop.borrow() {
        match complete(port, "chat").await {
            (200, _) => ok += 1,
            (code, body) => failures.push(format!("{code}: {body}")),
        }
    }
    (ok, failures)
}

/// Every event's message, a line each.
async fn events(servers: &str) -> String {
    let v = berth_json(&["--server", servers, "events", "--tail", "1000"]).await;
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["message"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

async fn deployment(servers: &str, name: &str) -> Option<Value> {
    try_berth_json(&["--server", servers, "deploy", "show", name]).await
}

/// Waits until `name` asks for `n` replicas and `n` of them run.
async fn wait_running(servers: &str, name: &str, n: u64, deadline: std::time::Duration) {
    wait_until(
        deadline,
        &format!("{name} at {n} running replicas"),
        || async {
            let d = deployment(servers, name).await?;
            let running = d["replicas"]
                .as_array()?
                .iter()
                .filter(|r| r["phase"] == "running" && r["intent"] != "remove")
                .count() as u64;
            (d["deployment"]["replicas"] == n && running == n).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoscaling_follows_load_through_the_gateway_and_fails_nothing() {
    let (_cluster, _agent, gateway, servers) = setup().await;
    let port = gateway.port;

    // Bad policies are refused, naming the field; nothing changes.
    let bad = berth(&[
        "--server",
        &servers,
        "deploy",
        "autoscale",
        "chat",
        "--min",
        "3",
        "--max",
        "2",
        "--target-inflight",
        "2",
    ])
    .await;
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("max"), "{}", stderr(&bad));
    let d = deployment(&servers, "chat").await.expect("the deployment");
    assert!(d["deployment"]["autoscale"].is_null(), "{d}");

    let set = berth_json(&[
        "--server",
        &servers,
        "deploy",
        "autoscale",
        "chat",
        "--min",
        "1",
        "--max",
        "4",
        "--target-inflight",
        "2",
        "--scale-down-delay",
        "5s",
    ])
    .await;
    assert_eq!(set["autoscale"]["max"], 4, "{set}");
    assert_eq!(set["autoscale"]["metric"], "inflight", "{set}");
    // The count is the autoscaler's now: a person's scale is refused, saying what to do.
    let refused = berth(&["--server", &servers, "deploy", "scale", "chat", "3"]).await;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("berth deploy autoscale chat off"),
        "{}",
        stderr(&refused)
    );

    // A step to 8 clients: 1 replica carries 2 at a time, the rest queue.
    wait_until(DEADLINE, "chat routable", || async {
        (complete(port, "chat").await.0 == 200).then_some(())
    })
    .await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (stop_light, stopped_light) = tokio::sync::watch::channel(false);
    let mut heavy = Vec::new();
    for _ in 0..7 {
        heavy.push(tokio::spawn(client(port, stopped.clone())));
    }
    let light = tokio::spawn(client(port, stopped_light));
    wait_running(&servers, "chat", 4, std::time::Duration::from_secs(90)).await;
    // The engines' queues drain once the new replicas take requests.
    wait_until(
        DEADLINE,
        "the engines' queues empty under the load",
        || async {
            let replicas = deployment_replicas(&servers, "chat").await;
            // The demo's simulated KV cache is reported beside the queue.
            (replicas.len() == 4
                && replicas
                    .iter()
                    .all(|r| r["queue_depth"] == 0 && r["kv_cache_pct"].is_number()))
            .then_some(())
        },
    )
    .await;
    let d = deployment(&servers, "chat").await.expect("the deployment");
    let status = d["deployment"]["autoscale_status"].as_str().unwrap_or("");
    assert!(!status.is_empty(), "the autoscaler says what it did: {d}");
    let log = events(&servers).await;
    assert!(
        log.contains("autoscaled from 1 to 2"),
        "each change is an event with its inputs: {log}"
    );
    assert!(log.contains("in flight"), "{log}");

    // The step down: one client stays. After the delay the count follows,
    // through the gateway's drain, failing nothing.
    stop.send(true).expect("stop the heavy clients");
    let mut ok = 0;
    let mut failures = Vec::new();
    for h in heavy {
        let (n, f) = h.await.expect("a client");
        ok += n;
        failures.extend(f);
    }
    wait_running(&servers, "chat", 1, std::time::Duration::from_secs(120)).await;
    stop_light.send(true).expect("stop the light client");
    let (n, f) = light.await.expect("the light client");
    ok += n;
    failures.extend(f);
    assert!(
        failures.is_empty(),
        "{} failed of {}: {failures:?}",
        failures.len(),
        ok
    );
    assert!(ok > 50, "the clients got answers: {ok}");

    // The load time was measured on the node and kept per model.
    let model = berth_json(&["--server", &servers, "model", "show", "demo"]).await;
    let load = &model["load_times"][0];
    assert_eq!(load["node_class"], "A100-80GB (simulated)", "{model}");
    assert!(load["estimate_s"].as_f64().unwrap_or(0.0) >= 3.0, "{model}");

    // Off hands the count back.
    let off = berth_json(&["--server", &servers, "deploy", "autoscale", "chat", "off"]).await;
    assert!(off["autoscale"].is_null(), "{off}");
    berth_json(&["--server", &servers, "deploy", "scale", "chat", "2"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_scaled_to_zero_answers_its_first_request_after_the_cold_start() {
    let (_cluster, _agent, gateway, servers) = setup().await;
    let port = gateway.port;
    berth_json(&[
        "--server",
        &servers,
        "deploy",
        "autoscale",
        "chat",
        "--max",
        "2",
        "--target-inflight",
        "4",
        "--scale-down-delay",
        "1s",
        "--scale-to-zero-after",
        "4s",
    ])
    .await;
    // No traffic: to zero, and no replica is left.
    wait_until(DEADLINE, "chat at zero replicas", || async {
        let d = deployment(&servers, "chat").await?;
        (d["deployment"]["replicas"] == 0 && d["replicas"].as_array()?.is_empty()).then_some(())
    })
    .await;
    let log = events(&servers).await;
    assert!(log.contains("scale to zero"), "{log}");
    // The gateway still lists it, with no ready replica, and holds its next request.
    wait_until(DEADLINE, "the cold deployment listed", || async {
        let (_, body) = http_get(port, "/v1/models").await?;
        let v: Value = serde_json::from_str(&body).ok()?;
        v["data"]
            .as_array()?
            .iter()
            .any(|m| m["id"] == "chat" && m["ready_replicas"] == 0)
            .then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    let (code, body) = complete(port, "chat").await;
    let waited = started.elapsed();
    assert_eq!(
        code, 200,
        "the first request after zero is answered: {body}"
    );
    assert!(body.contains("\"model\":\"demo\""), "{body}");
    // It waited for a replica to load (3 s), not for a lucky warm one.
    assert!(
        waited >= std::time::Duration::from_secs(3),
        "answered after {waited:?}"
    );
    let log = events(&servers).await;
    assert!(log.contains("autoscaled from 0 to 1"), "{log}");
}
