//! Hollow agents (`berth bench` only): the real registration, heartbeats
//! and Agent service over a runtime that records starts. Against a real
//! control plane they register, get replicas placed and started, and show
//! as hollow wherever a person looks; `berth bench place` reports its figures.

use berth_node_agent::hollow::{Fleet, FleetOptions, HOLLOW_LABEL};
use berth_tests::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hollow_agents_take_replicas_and_show_as_hollow() {
    // Hollow agents share connections, so they hold no node certificates.
    let options = MemberOptions {
        insecure: true,
        ..MemberOptions::default()
    };
    let cluster = LocalCluster::start(1, options).await.unwrap();
    cluster.wait_for_leader(DEADLINE).await.unwrap();
    let servers = cluster.servers();
    let fleet = Fleet::start(&FleetOptions {
        control: vec![servers.clone()],
        nodes: 3,
        gpus: "2xH100-80GB".into(),
        cpus: 16,
        memory_mib: 64 * 1024,
        heartbeat: std::time::Duration::from_millis(500),
        agents_per_listener: 2,
        agents_per_connection: 2,
        start_rate: 0,
        tls: None,
    })
    .await
    .unwrap();
    let nodes = wait_until(DEADLINE, "3 hollow nodes ready", || async {
        let nodes = try_berth_json(&["--server", &servers, "node", "list"]).await?;
        let ready = nodes
            .as_array()?
            .iter()
            .filter(|n| n["state"] == "ready")
            .count();
        (ready == 3).then_some(nodes)
    })
    .await;
    for n in nodes.as_array().unwrap() {
        let name = n["name"].as_str().unwrap();
        assert!(name.starts_with("hollow-"), "{n}");
        assert_eq!(n["labels"][HOLLOW_LABEL], "true", "{n}");
    }
    let shown = berth(&["--server", &servers, "node", "show", "hollow-0001"]).await;
    assert!(shown.status.success(), "{}", stderr(&shown));
    let text = stdout(&shown);
    assert!(text.contains("hollow agent of berth bench"), "{text}");

    let ok = berth(&[
        "--server",
        &servers,
        "model",
        "create",
        "hm",
        "--runtime",
        "demo",
        "--source",
        "builtin:demo",
        "--gpus",
        "1",
        "--gpu-memory",
        "4GiB",
    ])
    .await;
    assert!(ok.status.success(), "{}", stderr(&ok));
    let ok = berth(&[
        "--server",
        &servers,
        "deploy",
        "create",
        "hd",
        "--model",
        "hm",
        "--replicas",
        "6",
        "--gpu-share",
        "500",
        "--wait",
        "--timeout",
        "60s",
    ])
    .await;
    assert!(ok.status.success(), "{}", stderr(&ok));
    let replicas = berth_json(&["--server", &servers, "replica", "list"]).await;
    let replicas = replicas.as_array().unwrap();
    assert_eq!(replicas.len(), 6);
    for r in replicas {
        assert_eq!(r["phase"], "running", "{r}");
        assert!(r["node"].as_str().unwrap().starts_with("hollow-"), "{r}");
        assert!(r["pid"].is_null() || r["pid"] == 0, "no process: {r}");
    }
    let ids: Vec<&str> = replicas.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(fleet.starts.len(), 6, "each start recorded once");
    let started: Vec<String> = fleet
        .starts
        .snapshot()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    for id in &ids {
        assert!(started.iter().any(|s| s == id), "{id} was started");
    }
    let logs = berth(&["--server", &servers, "replica", "logs", ids[0]]).await;
    assert!(!logs.status.success());
    assert!(stderr(&logs).contains("hollow"), "{}", stderr(&logs));

    // Scaling down stops replicas on their hollow agents, and the records go.
    let ok = berth(&["--server", &servers, "deploy", "scale", "hd", "2", "--wait"]).await;
    assert!(ok.status.success(), "{}", stderr(&ok));
    wait_until(DEADLINE, "2 replicas left", || async {
        let all: Value = try_berth_json(&["--server", &servers, "replica", "list"]).await?;
        (all.as_array()?.len() == 2).then_some(())
    })
    .await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_place_reports_its_figures() {
    let out = berth(&[
        "bench",
        "place",
        "--local",
        "--nodes",
        "5",
        "--replicas",
        "40",
        "--per-deployment",
        "10",
        "--idle",
        "1s",
        "--output",
        "json",
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["placements"], 40, "{report}");
    assert_eq!(report["deployments"], 4, "{report}");
    assert_eq!(report["nodes"], 5, "{report}");
    for key in [
        "placements_per_sec",
        "p50_ms",
        "p99_ms",
        "leader_cpu_idle_cores",
    ] {
        assert!(
            report[key].as_f64().is_some_and(|v| v > 0.0),
            "{key}: {report}"
        );
    }
    let usage = berth(&["bench", "place", "--nodes", "0"]).await;
    assert_eq!(usage.status.code(), Some(2), "{}", stderr(&usage));
    assert!(stderr(&usage).contains("--nodes"), "{}", stderr(&usage));
}

/// With the cluster's CA, each hollow agent holds its own node certificate
/// and connection: the fleet registers and heartbeats over mTLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hollow_agents_heartbeat_over_mtls_with_their_own_certificates() {
    let cluster = LocalCluster::start(1, MemberOptions::default())
        .await
        .unwrap();
    let files = berth_proto::tls::TlsFiles::under(&cluster.members[0].data_dir);
    let ca = berth_proto::pki::Ca::from_pem(
        &std::fs::read_to_string(files.ca()).unwrap(),
        &berth_proto::pki::read_private(&files.ca_key()).unwrap(),
        "test",
    )
    .unwrap();
    let servers = cluster.servers();
    let fleet = Fleet::start(&FleetOptions {
        control: vec![servers.clone()],
        nodes: 4,
        gpus: "2xH100-80GB".into(),
        cpus: 16,
        memory_mib: 64 * 1024,
        heartbeat: std::time::Duration::from_millis(500),
        agents_per_listener: 2,
        agents_per_connection: 2,
        start_rate: 0,
        tls: Some(std::sync::Arc::new(ca)),
    })
    .await
    .unwrap();
    wait_until(DEADLINE, "4 hollow nodes ready over mTLS", || async {
        let nodes = try_berth_json(&["--server", &servers, "node", "list"]).await?;
        let ready = nodes
            .as_array()?
            .iter()
            .filter(|n| n["state"] == "ready")
            .count();
        (ready == 4).then_some(())
    })
    .await;
    wait_until(DEADLINE, "4 hollow agents heartbeating", || async {
        (fleet.heartbeating() == 4).then_some(())
    })
    .await;
}
