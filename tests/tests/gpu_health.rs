//! GPU health end to end: one control-plane member, two agents with two
//! simulated A100s each, real `berth demo-model` replicas on whole GPUs.
//! Faults are injected into the simulated GPUs through the CLI
//! (`berth node simulate-fault`), the way a demo would: an application's
//! XID changes nothing; XID 79 and uncorrected ECC errors quarantine the
//! GPU, its replica is replaced elsewhere before it stops (never fewer
//! running), nothing new lands on it, and a release returns it.
//!
//! And the VRAM ledger: simulated foreign processes and a replica that
//! declares more use than it reserved, measured by the agent and acted on
//! by the scheduler.

use std::time::Duration;

use berth_tests::*;
use serde_json::Value;

/// The replicas of `web` that should run and run, and whether all do.
async fn web(s: &str) -> Option<Vec<Value>> {
    let rs = try_berth_json(&["--server", s, "replica", "list", "--deployment", "web"]).await?;
    Some(rs.as_array()?.clone())
}

fn running(rs: &[Value]) -> Vec<&Value> {
    rs.iter()
        .filter(|r| r["phase"] == "running" && r["intent"] == "run")
        .collect()
}

/// (node, gpu index) of a replica.
fn place(r: &Value) -> (String, u64) {
    (
        r["node"].as_str().unwrap_or_default().to_string(),
        r["gpus"][0].as_u64().unwrap_or(u64::MAX),
    )
}

/// GPU `gpu` of `node` in `node list`.
async fn gpu(s: &str, node: &str, gpu: u64) -> Option<Value> {
    let nodes = try_berth_json(&["--server", s, "node", "list"]).await?;
    let n = nodes.as_array()?.iter().find(|n| n["name"] == node)?;
    n["gpu_health"]
        .as_array()?
        .iter()
        .find(|g| g["index"] == gpu)
        .cloned()
}

async fn inject(s: &str, node: &str, gpu: u64, fault: &[&str]) {
    let g = gpu.to_string();
    let mut args = vec!["--server", s, "node", "simulate-fault", node, "--gpu", &g];
    args.extend_from_slice(fault);
    let o = berth(&args).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("SIMULATED"), "{}", stderr(&o));
}

/// The value of the first series of `name` on a `/metrics` page whose
/// labels include all of `labels`.
fn series(page: &str, name: &str, labels: &[&str]) -> Option<String> {
    page.lines()
        .find(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next())
        .map(str::to_string)
}

/// Waits until `want` replicas of web run and none is being replaced,
/// asserting all along that never fewer than `floor` run.
async fn replaced_without_a_gap(s: &str, floor: usize, want: usize, off: &(String, u64)) {
    let done = std::sync::atomic::AtomicBool::new(false);
    check_until(
        DEADLINE,
        Duration::from_millis(100),
        "the replica on the quarantined GPU is replaced",
        || done.load(std::sync::atomic::Ordering::Relaxed),
        || async {
            let Some(rs) = web(s).await else { return false };
            let up = running(&rs);
            assert!(
                up.len() >= floor,
                "fewer than {floor} replicas ran while one moved off a quarantined GPU: {rs:?}"
            );
            let settled =
                rs.len() == want && up.len() == want && up.iter().all(|r| &place(r) != off);
            done.store(settled, std::sync::atomic::Ordering::Relaxed);
            true
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_gpu_is_quarantined_its_replicas_move_and_a_release_returns_it() {
    let port = || berth_cli::local::free_port().expect("a free port");
    let (member_http, agent_http) = (port(), [port(), port()]);
    let member_flag = format!("127.0.0.1:{member_http}");
    let agent_flags: Vec<Vec<String>> = agent_http
        .iter()
        .map(|p| vec!["--http".to_string(), format!("127.0.0.1:{p}")])
        .collect();
    let (_cluster, _agents, s) =
        demo_cluster_with(1, &["--http", &member_flag], &["n1", "n2"], &agent_flags).await;
    berth_json(&[
        "--server",
        &s,
        "deploy",
        "create",
        "web",
        "--model",
        "demo",
        "--replicas",
        "2",
        "--gpu-share",
        "1000",
        "--wait",
    ])
    .await;
    let before = wait_until(DEADLINE, "2 replicas of web running", || async {
        let rs = web(&s).await?;
        (running(&rs).len() == 2).then_some(rs)
    })
    .await;
    let victim = before[0].clone();
    let sick = place(&victim);
    let (node, index) = (sick.0.as_str(), sick.1);

    // An application's XID is not held against the GPU.
    inject(&s, node, index, &["--xid", "13"]).await;
    let seen = wait_until(DEADLINE, "the leader hears of the XID", || async {
        let g = gpu(&s, node, index).await?;
        (g["faults"]["application_xids"] == 1).then_some(g)
    })
    .await;
    assert_eq!(seen["health"], "healthy", "{seen}");
    assert_eq!(seen["quarantined"], false, "{seen}");
    let same = web(&s).await.expect("replicas");
    assert!(
        same.iter()
            .any(|r| r["id"] == victim["id"] && r["intent"] == "run"),
        "{same:?}"
    );

    // XID 79: quarantined by the control plane, its replica replaced first.
    inject(&s, node, index, &["--xid", "79"]).await;
    let quarantined = wait_until(DEADLINE, "the GPU quarantined", || async {
        let g = gpu(&s, node, index).await?;
        (g["quarantined"] == true).then_some(g)
    })
    .await;
    assert_eq!(quarantined["quarantined_by"], "health", "{quarantined}");
    assert_eq!(quarantined["health"], "unhealthy", "{quarantined}");
    let why = quarantined["quarantine_reason"]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains("XID 79"), "{why}");
    replaced_without_a_gap(&s, 2, 2, &sick).await;
    let events = stdout(&berth(&["--server", &s, "events", "--tail", "200"]).await);
    assert!(
        events.contains(&format!("gpu {index} of node {node} quarantined by health")),
        "{events}"
    );
    assert!(
        events.contains(&format!("gpu {index} of node {node} is unhealthy")),
        "{events}"
    );

    // Nothing new lands on it: of four whole-GPU replicas, three find a place.
    berth_json(&["--server", &s, "deploy", "scale", "web", "4"]).await;
    wait_until(DEADLINE, "3 of 4 replicas running", || async {
        let rs = web(&s).await?;
        (rs.len() == 4 && running(&rs).len() == 3).then_some(())
    })
    .await;
    let rs = web(&s).await.expect("replicas");
    assert!(rs.iter().all(|r| place(r) != sick), "{rs:?}");
    let shown = stdout(&berth(&["--server", &s, "node", "show", node]).await);
    assert!(shown.contains("by health"), "{shown}");

    // A release returns it: the fourth replica lands there. The XID that led
    // to the quarantine is not held against it again.
    let released = berth_json(&[
        "--server",
        &s,
        "node",
        "gpu",
        "release",
        node,
        &index.to_string(),
    ])
    .await;
    assert_eq!(released["gpu"]["quarantined"], false, "{released}");
    let rs = wait_until(DEADLINE, "4 replicas running", || async {
        let rs = web(&s).await?;
        (running(&rs).len() == 4).then_some(rs)
    })
    .await;
    assert!(rs.iter().any(|r| place(r) == sick), "{rs:?}");
    let g = gpu(&s, node, index).await.expect("the GPU");
    assert_eq!(g["health"], "healthy", "{g}");
    assert_eq!(g["quarantined"], false, "{g}");

    // Uncorrected ECC errors: the same as XID 79.
    berth_json(&["--server", &s, "deploy", "scale", "web", "3"]).await;
    let rs = wait_until(DEADLINE, "3 replicas running", || async {
        let rs = web(&s).await?;
        (rs.len() == 3 && running(&rs).len() == 3).then_some(rs)
    })
    .await;
    let ecc = place(&rs[0]);
    inject(&s, &ecc.0, ecc.1, &["--ecc-uncorrected", "2"]).await;
    let g = wait_until(DEADLINE, "the GPU with ECC errors quarantined", || async {
        let g = gpu(&s, &ecc.0, ecc.1).await?;
        (g["quarantined"] == true).then_some(g)
    })
    .await;
    let why = g["quarantine_reason"].as_str().unwrap_or_default();
    assert!(why.contains("2 uncorrected ECC errors"), "{why}");
    replaced_without_a_gap(&s, 3, 3, &ecc).await;

    // An operator quarantines by hand, and the CLI checks its input.
    let other = (0..2)
        .map(|i| ("n1".to_string(), i))
        .chain((0..2).map(|i| ("n2".to_string(), i)))
        .find(|p| *p != ecc)
        .expect("another GPU");
    let by_hand = berth_json(&[
        "--server",
        &s,
        "node",
        "gpu",
        "quarantine",
        &other.0,
        &other.1.to_string(),
        "--reason",
        "fan noise",
    ])
    .await;
    assert_eq!(by_hand["gpu"]["quarantined_by"], "operator", "{by_hand}");
    assert_eq!(
        by_hand["gpu"]["quarantine_reason"], "fan noise",
        "{by_hand}"
    );
    let o = berth(&["--server", &s, "node", "gpu", "quarantine", "n1", "9"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("gpu"), "{}", stderr(&o));
    let o = berth(&["--server", &s, "node", "simulate-fault", "n1", "--gpu", "0"]).await;
    assert_eq!(o.status.code(), Some(2), "no fault given: {}", stderr(&o));

    // The agents' per-GPU series say what happened, and every page passes
    // promtool's checks.
    let sick_agent = agent_http[if node == "n1" { 0 } else { 1 }];
    let (_, page) = http_get(u32::from(sick_agent), "/metrics")
        .await
        .expect("the agent's /metrics");
    let series = |name: &str, labels: &[&str]| series(&page, name, labels);
    let gpu_label = format!("index=\"{index}\"");
    assert_eq!(
        series(
            "berth_agent_gpu_xid_events_total",
            &[&gpu_label, "class=\"unhealthy\""]
        ),
        Some("1".into()),
        "{page}"
    );
    assert_eq!(
        series(
            "berth_agent_gpu_xid_events_total",
            &[&gpu_label, "class=\"application\""]
        ),
        Some("1".into()),
        "{page}"
    );
    assert_eq!(
        series(
            "berth_agent_gpu_health",
            &[&gpu_label, "state=\"unhealthy\""]
        ),
        Some("1".into()),
        "{page}"
    );
    assert!(page.contains("simulated=\"true\""), "{page}");
    assert!(
        series("berth_agent_gpu_memory_total_bytes", &[&gpu_label])
            .is_some_and(|v| v.starts_with("85899345920")),
        "{page}"
    );
    // And each replica's phase and reservation (10 GiB, the demo model's).
    let (_, pages) = http_get(u32::from(agent_http[0]), "/metrics")
        .await
        .expect("the agent's /metrics");
    let (_, other_page) = http_get(u32::from(agent_http[1]), "/metrics")
        .await
        .expect("the agent's /metrics");
    let both = format!("{pages}{other_page}");
    let running_now = both
        .lines()
        .filter(|l| {
            l.starts_with("berth_agent_replica_phase{")
                && l.contains("phase=\"running\"")
                && l.ends_with(" 1")
        })
        .count();
    // Three run, or two while the one on the GPU quarantined by hand waits
    // for a place that two quarantined GPUs of four cannot give it.
    assert!(running_now >= 2, "web replicas run:\n{both}");
    assert!(
        both.lines().any(
            |l| l.starts_with("berth_agent_replica_gpu_memory_reserved_bytes{")
                && l.ends_with(" 10737418240.0")
        ),
        "{both}"
    );
    for (what, port) in [
        ("agent n1", agent_http[0]),
        ("agent n2", agent_http[1]),
        ("member", member_http),
    ] {
        let (code, page) = http_get(u32::from(port), "/metrics")
            .await
            .unwrap_or_else(|| panic!("the {what}'s /metrics"));
        assert_eq!(code, 200, "{what}: {page}");
        if let Err(e) = promtool_check(&page).await {
            panic!("promtool check metrics on the {what}'s /metrics: {e}\n{page}");
        }
    }
    // The member's and the agents' own figures counted what this test did.
    let (_, member) = http_get(u32::from(member_http), "/metrics")
        .await
        .expect("the member's /metrics");
    let (_, agent) = http_get(u32::from(agent_http[0]), "/metrics")
        .await
        .expect("the agent's /metrics");
    let positive = |page: &str, parts: &[&str]| {
        page.lines().any(|l| {
            parts.iter().all(|p| l.contains(p))
                && l.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|v| v > 0.0)
        })
    };
    for parts in [
        &[
            "berth_grpc_server_handling_seconds_count",
            r#"service="berth.v1.Admin""#,
            r#"method="CreateDeployment""#,
            r#"code="OK""#,
        ][..],
        &[
            "berth_grpc_server_handling_seconds_count",
            r#"method="HeartbeatStream""#,
        ],
        &["berth_write_duration_seconds_count", r#"result="applied""#],
        &["berth_heartbeats_received_total"],
        &["berth_reconciler_pass_duration_seconds_count"],
        &["berth_scheduler_requests_total"],
        &["berth_deployment_replicas_desired", r#"deployment="web""#],
        &["berth_deployment_replicas_running", r#"deployment="web""#],
        &["berth_deployment_replicas_updated", r#"deployment="web""#],
    ] {
        assert!(
            positive(&member, parts),
            "{parts:?} on the member:\n{member}"
        );
    }
    for parts in [
        &[
            "berth_agent_grpc_server_handling_seconds_count",
            r#"method="StartReplica""#,
            r#"code="OK""#,
        ][..],
        &["berth_agent_replica_spawn_duration_seconds_count"],
        &["berth_agent_replica_ready_duration_seconds_count"],
    ] {
        assert!(positive(&agent, parts), "{parts:?} on agent n1:\n{agent}");
    }
}

/// The replica of `deployment` (the first), once it is pending with the
/// scheduler's explanation: a pass looked at it and found no place.
async fn pending_with_reason(s: &str, deployment: &str) -> Value {
    wait_until(
        DEADLINE,
        "the replica pending with the scheduler's reason",
        || async {
            let rs =
                try_berth_json(&["--server", s, "replica", "list", "--deployment", deployment])
                    .await?;
            let r = rs.as_array()?.first()?.clone();
            (r["phase"] == "pending"
                && r["node"].is_null()
                && r["reason"].as_str()?.contains("GPU"))
            .then_some(r)
        },
    )
    .await
}

/// The VRAM ledger, on one node with two simulated 80 GiB A100s: memory
/// that processes Berth did not start hold keeps a request off a GPU whose
/// measured free memory is too small, though the reservations leave room; a
/// replica that uses more than it reserved is measured and shown, flagged
/// (event and metric) once it stays above, and its excess counts as taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vram_ledger_measures_replicas_and_keeps_requests_off_memory_in_use() {
    let agent_http = berth_cli::local::free_port().expect("a free port");
    let agent_flags = vec![vec![
        "--http".to_string(),
        format!("127.0.0.1:{agent_http}"),
    ]];
    let (_cluster, _agents, s) = demo_cluster_with(1, &[], &["n1"], &agent_flags).await;

    // Foreign processes hold 70 GiB of each GPU: 10 GiB are really free.
    for gpu in 0..2 {
        inject(&s, "n1", gpu, &["--foreign-memory", "70GiB"]).await;
    }
    wait_until(
        DEADLINE,
        "the leader hears of the foreign memory",
        || async {
            let nodes = try_berth_json(&["--server", &s, "node", "list"]).await?;
            let gpus = nodes.as_array()?.first()?["gpu_health"].as_array()?.clone();
            gpus.iter()
                .all(|g| g["foreign_memory_mib"] == 70 * 1024)
                .then_some(())
        },
    )
    .await;

    // Replicas that reserve 20 GiB of one GPU and use 30 GiB.
    berth_json(&[
        "--server",
        &s,
        "model",
        "create",
        "hungry",
        "--runtime",
        "demo",
        "--source",
        "builtin:demo",
        "--gpus",
        "1",
        "--gpu-memory",
        "20GiB",
        "--gpu-share",
        "500",
        "--env",
        "BERTH_SIMULATED_GPU_MEMORY_MIB=30720",
    ])
    .await;
    berth_json(&[
        "--server",
        &s,
        "deploy",
        "create",
        "hungry",
        "--model",
        "hungry",
        "--replicas",
        "1",
    ])
    .await;
    let waiting = pending_with_reason(&s, "hungry").await;
    assert_eq!(waiting["gpu_memory_used_mib"], Value::Null, "{waiting}");

    // GPU 1's foreign process goes: the replica lands there, not on GPU 0.
    inject(&s, "n1", 1, &["--foreign-memory", "0"]).await;
    let r = wait_until(DEADLINE, "the replica running", || async {
        let rs =
            try_berth_json(&["--server", &s, "replica", "list", "--deployment", "hungry"]).await?;
        let r = rs.as_array()?.first()?.clone();
        (r["phase"] == "running" && r["gpu_memory_used_mib"] == 30 * 1024).then_some(r)
    })
    .await;
    assert_eq!(place(&r), ("n1".to_string(), 1), "{r}");
    assert_eq!(r["gpu_memory_reserved_mib"], 20 * 1024, "{r}");

    // It stays above its reservation: flagged, with an event.
    let r = wait_until(
        DEADLINE,
        "the replica flagged over its reservation",
        || async {
            let rs = try_berth_json(&["--server", &s, "replica", "list", "--deployment", "hungry"])
                .await?;
            let r = rs.as_array()?.first()?.clone();
            (r["over_gpu_memory_reservation"] == true).then_some(r)
        },
    )
    .await;
    let id = r["id"].as_str().expect("an id").to_string();
    let events = stdout(&berth(&["--server", &s, "events", "--tail", "200"]).await);
    assert!(
        events.contains(&format!(
            "replica {id} on node n1 stays above its GPU memory reservation: it uses 30720 MiB of the 20480 MiB it reserved"
        )),
        "{events}"
    );
    let table = stdout(&berth(&["--server", &s, "replica", "list"]).await);
    assert!(table.contains("30GiB/20GiB OVER"), "{table}");
    let shown = berth_json(&["--server", &s, "node", "show", "n1"]).await;
    let gpus = shown["inventory"]["gpus"].as_array().expect("gpus").clone();
    assert_eq!(gpus[0]["foreign_memory_mib"], 70 * 1024, "{shown}");
    assert_eq!(gpus[1]["over_reservation_mib"], 10 * 1024, "{shown}");
    assert_eq!(gpus[1]["processes"][0]["replica"], id.as_str(), "{shown}");
    assert_eq!(gpus[0]["processes"][0]["replica"], Value::Null, "{shown}");
    let mine = &shown["replica_list"][0];
    assert_eq!(mine["gpu_memory_used_mib"], 30 * 1024, "{shown}");
    assert_eq!(mine["over_gpu_memory_reservation"], true, "{shown}");

    // Its excess counts as taken: 55 GiB fit in GPU 1's reservations (60
    // GiB left) but not in what it really has free (50 GiB).
    berth_json(&[
        "--server",
        &s,
        "deploy",
        "create",
        "big",
        "--model",
        "hungry",
        "--replicas",
        "1",
        "--gpu-memory",
        "55GiB",
    ])
    .await;
    let big = pending_with_reason(&s, "big").await;
    assert_eq!(big["gpu_memory_reserved_mib"], 0, "{big}");

    // The agent's series say the same, and pass promtool's checks.
    let (_, page) = http_get(u32::from(agent_http), "/metrics")
        .await
        .expect("the agent's /metrics");
    let series = |name: &str, labels: &[&str]| series(&page, name, labels);
    let replica_label = format!("replica=\"{id}\"");
    assert_eq!(
        series(
            "berth_agent_replica_gpu_memory_used_bytes",
            &[&replica_label]
        ),
        Some("32212254720.0".into()),
        "{page}"
    );
    assert_eq!(
        series(
            "berth_agent_replica_gpu_memory_over_reservation",
            &[&replica_label]
        ),
        Some("1".into()),
        "{page}"
    );
    assert_eq!(
        series("berth_agent_gpu_memory_foreign_bytes", &["index=\"0\""]),
        Some("75161927680.0".into()),
        "{page}"
    );
    if let Err(e) = promtool_check(&page).await {
        panic!("promtool check metrics on the agent's /metrics: {e}\n{page}");
    }
}
