//! The serving path end to end: a secure 3-member control plane, two agents
//! with simulated GPUs running real `berth demo-model` replicas, and a real
//! `berth-gateway` that watches a follower (which relays the leader's
//! stream). Requests reach both replicas by model, `model:version` and
//! deployment name; bad input is refused before anything goes upstream; an
//! overloaded model answers 429 with `Retry-After`; SSE streams through,
//! and a client that leaves cancels the generation on the replica; a
//! replica killed mid-stream breaks that stream (never a clean end) and
//! fails no other request; under steady load, kill -9 of one of three
//! replicas, a rolling update, a node drain and a scale-down fail none; with
//! every member gone the gateway keeps routing, and it picks up changes
//! when they return.

use std::collections::{BTreeSet, HashMap};

use berth_tests::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The demo model, with words 50 ms apart so that a stream is still going
/// when its client leaves.
fn model_flags() -> Vec<&'static str> {
    let mut flags = DEMO_MODEL.to_vec();
    flags.extend(["--env", "BERTH_DEMO_TOKEN_DELAY=50ms"]);
    flags
}

fn port_of(endpoint: &str) -> u32 {
    endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("host:port")
}

/// A completion through the gateway: status, the replica that answered, body.
async fn complete(port: u32, model: &str) -> (u16, String, String) {
    let body = format!(r#"{{"model":"{model}","prompt":"hello","max_tokens":3}}"#);
    match http_full(port, "POST", "/v1/completions", &body).await {
        Some((code, headers, body)) => (
            code,
            headers.get("x-berth-replica").cloned().unwrap_or_default(),
            body,
        ),
        None => (0, String::new(), "no answer".into()),
    }
}

/// Requests answered by every replica of `chat`, from their `/metrics`.
async fn upstream_requests(servers: &str) -> u64 {
    let mut total = 0;
    for r in deployment_replicas(servers, "chat").await {
        let port = port_of(r["endpoint"].as_str().expect("an endpoint"));
        total += demo_metric(port, "berth_demo:requests_total")
            .await
            .expect("a replica's metrics");
    }
    total
}

/// Opens a streamed chat completion through the gateway and reads until
/// `events` events arrived: the connection and what it read.
async fn open_stream(port: u32, events: usize) -> (tokio::net::TcpStream, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port as u16))
        .await
        .expect("connect to the gateway");
    let body = r#"{"model":"demo","messages":[{"role":"user","content":"hi"}],"max_tokens":200,"stream":true}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send");
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while got.matches("data: ").count() < events {
        let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
            .await
            .expect("events arrive")
            .expect("read");
        assert!(n > 0, "the stream ended early: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    (s, got)
}

fn replica_header(head: &str) -> String {
    head.lines()
        .find_map(|l| l.strip_prefix("x-berth-replica: "))
        .expect("the replica header")
        .trim()
        .to_string()
}

/// Sends completions back to back until `stop`; (answered 200, failures).
async fn steady_load(port: u32, stop: tokio::sync::watch::Receiver<bool>) -> (u64, Vec<String>) {
    let mut ok = 0;
    let mut failures = Vec::new();
    while !*stop.borrow() {
        let (code, replica, body) = complete(port, "chat").await;
        if code == 200 {
            ok += 1;
        } else {
            failures.push(format!("{code} from {replica:?}: {body}"));
        }
    }
    (ok, failures)
}

/// Waits until the gateway routes `name` to `n` replicas.
async fn wait_routable(port: u32, name: &str, n: u64) {
    wait_until(
        DEADLINE,
        &format!("{n} replicas of {name} routable"),
        || async {
            let (_, body) = http_get(port, "/v1/models").await?;
            let v: Value = serde_json::from_str(&body).ok()?;
            v["data"]
                .as_array()?
                .iter()
                .any(|m| m["id"] == name && m["ready_replicas"] == n)
                .then_some(())
        },
    )
    .await;
}

/// A demo replica's own counter, read from its `/metrics`.
async fn demo_metric(port: u32, name: &str) -> Option<u64> {
    let (_, text) = http_get(port, "/metrics").await?;
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_routes_streams_retries_and_outlives_the_control_plane() {
    let mut cluster = LocalCluster::start(3, MemberOptions::default())
        .await
        .expect("start the control plane");
    let servers = cluster.servers();
    let _agents: Vec<LocalAgent> = ["gpu-a", "gpu-b"]
        .iter()
        .map(|node| {
            LocalAgent::start_in(cluster.root(), cluster.agent_options(node, "2xA100-80GB"))
                .expect("start agent")
        })
        .collect();
    wait_until(DEADLINE, "both nodes ready", || async {
        let v = try_berth_json(&["--server", &servers, "node", "list"]).await?;
        (v.as_array()?
            .iter()
            .filter(|n| n["state"] == "ready")
            .count()
            == 2)
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
        "2",
        "--policy",
        "spread",
        "--wait",
    ])
    .await;

    // The gateway watches one follower only: it relays the leader's stream.
    let status = berth_json(&["--server", &servers, "cluster", "status"]).await;
    let follower = status["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["role"] == "follower")
        .and_then(|m| m["addr"].as_str())
        .expect("a follower")
        .to_string();
    let token = cluster.token("gateway").await.expect("a gateway token");
    let gateway = start_gateway(&[
        "--control",
        &follower,
        "--token",
        &token,
        "--max-body-mib",
        "1",
    ])
    .await;
    let port = gateway.port;

    let models = wait_until(DEADLINE, "both replicas routable", || async {
        let (code, body) = http_get(port, "/v1/models").await?;
        let v: Value = serde_json::from_str(&body).ok()?;
        let ready: HashMap<String, u64> = v["data"]
            .as_array()?
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap_or("").to_string(),
                    m["ready_replicas"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        (code == 200 && ready.get("demo") == Some(&2)).then_some(ready)
    })
    .await;
    assert_eq!(models.get("demo:v1"), Some(&2), "{models:?}");
    assert_eq!(
        models.get("chat"),
        Some(&2),
        "the deployment name routes too: {models:?}"
    );
    let (code, body) = http_get(port, "/health").await.expect("health");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"control_plane_connected\":true"), "{body}");

    // Every name reaches the replicas, and both replicas get requests.
    let mut seen = BTreeSet::new();
    for (i, name) in ["demo", "demo:v1", "chat"]
        .iter()
        .cycle()
        .take(24)
        .enumerate()
    {
        let (code, replica, body) = complete(port, name).await;
        assert_eq!(code, 200, "request {i} for {name}: {body}");
        assert!(body.contains("\"model\":\"demo\""), "{body}");
        seen.insert(replica);
    }
    assert_eq!(seen.len(), 2, "both replicas served: {seen:?}");
    let (code, _, body) = complete(port, "no-such-model").await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("model_not_found"), "{body}");
    assert!(body.contains("served now: chat, demo, demo:v1"), "{body}");

    // An alias set on the deployment routes too, with the model's own name upstream.
    let aliased = berth_json(&["--server", &servers, "deploy", "alias", "chat", "assistant"]).await;
    assert_eq!(
        aliased["aliases"],
        serde_json::json!(["assistant"]),
        "{aliased}"
    );
    wait_routable(port, "assistant", 2).await;
    let (code, _, body) = complete(port, "assistant").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"model\":\"demo\""), "{body}");
    let refused = berth(&["--server", &servers, "deploy", "alias", "chat", "demo"]).await;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("name of a model or deployment"),
        "{}",
        stderr(&refused)
    );

    // Bad input is refused at the gateway: nothing reaches a replica.
    let before = upstream_requests(&servers).await;
    let bad = http_full(port, "POST", "/v1/completions", "{not json")
        .await
        .expect("answer");
    assert_eq!(bad.0, 400, "{}", bad.2);
    assert!(bad.2.contains("invalid_json"), "{}", bad.2);
    let bad = http_full(port, "POST", "/v1/chat/completions", r#"{"messages":[]}"#)
        .await
        .expect("answer");
    assert_eq!(bad.0, 400, "{}", bad.2);
    assert!(bad.2.contains("no \\\"model\\\" field"), "{}", bad.2);
    let huge = format!(
        r#"{{"model":"demo","prompt":"{}"}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    let bad = http_full(port, "POST", "/v1/completions", &huge)
        .await
        .expect("answer");
    assert_eq!(bad.0, 413, "{}", bad.2);
    assert!(bad.2.contains("--max-body-mib"), "{}", bad.2);
    assert_eq!(
        upstream_requests(&servers).await,
        before,
        "nothing was sent upstream"
    );

    // Overload: a gateway that lets one request per replica in, and queues none.
    let strict = start_gateway(&[
        "--control",
        &servers,
        "--token",
        &token,
        "--max-inflight-per-replica",
        "1",
        "--queue-size",
        "0",
    ])
    .await;
    wait_until(DEADLINE, "the strict gateway routes", || async {
        let (code, _, _) = complete(strict.port, "demo").await;
        (code == 200).then_some(())
    })
    .await;
    let held = [
        open_stream(strict.port, 2).await,
        open_stream(strict.port, 2).await,
    ];
    assert_ne!(
        replica_header(&held[0].1),
        replica_header(&held[1].1),
        "one stream per replica"
    );
    let (code, headers, body) = http_full(
        strict.port,
        "POST",
        "/v1/completions",
        r#"{"model":"demo","prompt":"hi"}"#,
    )
    .await
    .expect("answer");
    assert_eq!(code, 429, "{body}");
    assert_eq!(
        headers.get("retry-after").map(String::as_str),
        Some("1"),
        "{headers:?}"
    );
    drop(held);
    drop(strict);

    // Streaming: events arrive one by one; leaving cancels the generation.
    // (The strict gateway's streams were cancelled too: count from here.)
    let rs = deployment_replicas(&servers, "chat").await;
    let port_of_replica = |id: &str| {
        rs.iter()
            .find(|r| r["id"] == id)
            .and_then(|r| r["endpoint"].as_str())
            .map(port_of)
            .expect("the replica's endpoint")
    };
    let mut cancelled_before = HashMap::new();
    for r in &rs {
        let id = r["id"].as_str().expect("an id").to_string();
        let port = port_of_replica(&id);
        let settled = wait_until(DEADLINE, "no stream running", || async {
            let running = demo_metric(port, "berth_demo:requests_running").await?;
            let cancelled = demo_metric(port, "berth_demo:requests_cancelled_total").await?;
            (running == 0).then_some(cancelled)
        })
        .await;
        cancelled_before.insert(id, settled);
    }
    let (s, got) = open_stream(port, 3).await;
    assert!(got.contains("text/event-stream"), "{got}");
    assert!(
        !got.contains("[DONE]"),
        "200 words at 50 ms each cannot be done yet: {got}"
    );
    let streamed_by = replica_header(&got);
    drop(s);
    let streamer = port_of_replica(&streamed_by);
    let before = cancelled_before[&streamed_by];
    wait_until(
        DEADLINE,
        "the replica stops generating for the gone client",
        || async {
            let cancelled = demo_metric(streamer, "berth_demo:requests_cancelled_total").await?;
            let running = demo_metric(streamer, "berth_demo:requests_running").await?;
            (cancelled == before + 1 && running == 0).then_some(())
        },
    )
    .await;

    // SIGKILL the model server of a stream in progress: that stream breaks
    // (no [DONE], no clean end of the chunked body); requests that follow
    // while the replica is dead are retried on the other one, none fails.
    let (mut s, mut got) = open_stream(port, 2).await;
    let victim_id = replica_header(&got);
    // Its agent reads the engine's load from its metrics and reports it.
    wait_until(
        DEADLINE,
        "the stream shows in the engine's load",
        || async {
            let rs = deployment_replicas(&servers, "chat").await;
            let r = rs.iter().find(|r| r["id"] == victim_id.as_str())?;
            (r["running_requests"] == 1 && r["queue_depth"] == 0).then_some(())
        },
    )
    .await;
    let victim = rs
        .iter()
        .find(|r| r["id"] == victim_id.as_str())
        .expect("the victim");
    let pid = victim["pid"].as_u64().expect("a pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the replica");
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(DEADLINE, s.read(&mut buf))
            .await
            .expect("the stream ends")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => got.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    assert!(
        !got.contains("[DONE]"),
        "a cut stream must not look finished: {got}"
    );
    assert!(
        !got.ends_with("0\r\n\r\n"),
        "a cut stream must not end cleanly: {got}"
    );
    for i in 0..40 {
        let (code, _, body) = complete(port, "demo").await;
        assert_eq!(code, 200, "request {i} after the kill: {body}");
    }
    let (_, metrics) = http_get(port, "/metrics").await.expect("metrics");
    let sum = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        sum("berth_gateway_streams_cut_total") >= 1.0,
        "the cut stream is counted:\n{metrics}"
    );
    if let Err(e) = promtool_check(&metrics).await {
        panic!("promtool check metrics on the gateway's /metrics: {e}\n{metrics}");
    }
    // The agent restarts it; the gateway routes to it again.
    wait_until(DEADLINE, "the restarted replica serves again", || async {
        let (code, replica, _) = complete(port, "demo").await;
        (code == 200 && replica == victim_id).then_some(())
    })
    .await;

    // A request whose replica dies before its answer began is retried on
    // the other one: the client gets a whole answer, from the survivor.
    let retries_before = sum("berth_gateway_retries_total");
    let long = tokio::spawn(async move {
        http_full(
            port,
            "POST",
            "/v1/completions",
            r#"{"model":"demo","prompt":"slow","max_tokens":60}"#,
        )
        .await
    });
    let rs = deployment_replicas(&servers, "chat").await;
    let (busy_id, busy_pid) = wait_until(DEADLINE, "the long request at a replica", || async {
        for r in &rs {
            let port = port_of(r["endpoint"].as_str()?);
            if demo_metric(port, "berth_demo:requests_running").await? == 1 {
                return Some((r["id"].as_str()?.to_string(), r["pid"].as_u64()? as i32));
            }
        }
        None
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(busy_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the busy replica");
    let (code, headers, body) = long.await.expect("the long request").expect("an answer");
    assert_eq!(code, 200, "{body}");
    assert_ne!(
        headers.get("x-berth-replica"),
        Some(&busy_id),
        "answered by the survivor"
    );
    let (_, metrics) = http_get(port, "/metrics").await.expect("metrics");
    let retries_after: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("berth_gateway_retries_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        retries_after > retries_before,
        "the request was retried:\n{metrics}"
    );
    wait_until(DEADLINE, "both replicas running again", || async {
        let rs = deployment_replicas(&servers, "chat").await;
        (rs.len() == 2
            && rs
                .iter()
                .all(|r| r["phase"] == "running" && r["pid"] != busy_pid))
        .then_some(())
    })
    .await;
    wait_routable(port, "chat", 2).await;

    // Under steady load from two clients: scale to 3, kill -9 one of the 3,
    // a rolling update, a node drain, and a scale-down. Replicas that go are
    // drained (gateways stop choosing them before they are stopped); a
    // request cut by the kill before its answer began is retried elsewhere.
    // No request fails.
    let mut v2 = vec![
        "--server",
        servers.as_str(),
        "model",
        "version",
        "add",
        "demo",
        "v2",
    ];
    v2.extend(model_flags());
    berth_json(&v2).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let loaders: Vec<_> = (0..2)
        .map(|_| tokio::spawn(steady_load(port, stopped.clone())))
        .collect();
    berth_json(&[
        "--server", &servers, "deploy", "scale", "chat", "3", "--wait",
    ])
    .await;
    wait_routable(port, "chat", 3).await;
    let three = deployment_replicas(&servers, "chat").await;
    let victim = three[1]["pid"].as_u64().expect("a pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill a replica under load");
    wait_until(DEADLINE, "the killed replica back", || async {
        let rs = deployment_replicas(&servers, "chat").await;
        (rs.len() == 3
            && rs
                .iter()
                .all(|r| r["phase"] == "running" && r["pid"] != victim))
        .then_some(())
    })
    .await;
    wait_routable(port, "chat", 3).await;
    berth_json(&[
        "--server",
        &servers,
        "deploy",
        "update",
        "chat",
        "--version",
        "v2",
        "--wait",
    ])
    .await;
    wait_routable(port, "demo:v2", 3).await;
    let drained = berth(&[
        "--server",
        &servers,
        "node",
        "drain",
        "gpu-a",
        "--wait",
        "--timeout",
        "60s",
    ])
    .await;
    assert!(drained.status.success(), "{}", stderr(&drained));
    wait_until(DEADLINE, "every replica on gpu-b", || async {
        let rs = deployment_replicas(&servers, "chat").await;
        (rs.len() == 3 && rs.iter().all(|r| r["node"] == "gpu-b")).then_some(())
    })
    .await;
    wait_routable(port, "chat", 3).await;
    berth_json(&[
        "--server", &servers, "deploy", "scale", "chat", "1", "--wait",
    ])
    .await;
    wait_until(DEADLINE, "the removed replicas stopped", || async {
        (deployment_replicas(&servers, "chat").await.len() == 1).then_some(())
    })
    .await;
    stop.send(true).expect("stop the load");
    let mut answered = 0;
    for l in loaders {
        let (ok, failures) = l.await.expect("a loader");
        assert!(
            failures.is_empty(),
            "requests failed under kill -9, rollout, drain or scale-down: {failures:?}"
        );
        answered += ok;
    }
    assert!(answered > 50, "the load ran: {answered} requests");
    berth_json(&["--server", &servers, "node", "uncordon", "gpu-a"]).await;

    // Every member gone: the gateway routes from what it last knew.
    for id in [1, 2, 3] {
        cluster.kill(id).expect("kill a member");
    }
    wait_until(DEADLINE, "the gateway notices", || async {
        let (_, body) = http_get(port, "/health").await?;
        body.contains("\"control_plane_connected\":false")
            .then_some(())
    })
    .await;
    for i in 0..10 {
        let (code, _, body) = complete(port, "chat").await;
        assert_eq!(code, 200, "request {i} without a control plane: {body}");
    }

    // The members return: the gateway watches again and sees a change.
    for id in [1, 2, 3] {
        cluster.restart(id).expect("restart a member");
    }
    wait_until(DEADLINE, "the gateway watches again", || async {
        let (_, body) = http_get(port, "/health").await?;
        body.contains("\"control_plane_connected\":true")
            .then_some(())
    })
    .await;
    berth_json(&[
        "--server", &servers, "deploy", "scale", "chat", "2", "--wait",
    ])
    .await;
    wait_routable(port, "chat", 2).await;
}
