//! Nodes end to end: a 3-member control plane and two real agents with
//! simulated GPUs. They register and show as ready; a SIGKILLed agent goes
//! down after the grace period and comes back ready when restarted; killing
//! the control-plane leader marks no node down.

use std::time::{Duration, Instant};

use berth_tests::*;
use serde_json::Value;

fn node<'a>(nodes: &'a Value, name: &str) -> Option<&'a Value> {
    nodes.as_array()?.iter().find(|n| n["name"] == name)
}

async fn nodes(server: &str) -> Option<Value> {
    try_berth_json(&["--server", server, "node", "list"]).await
}

async fn wait_state(server: &str, name: &str, state: &str) -> Value {
    wait_until(DEADLINE, &format!("node {name} {state}"), || async {
        let all = nodes(server).await?;
        node(&all, name).filter(|n| n["state"] == state).cloned()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_register_go_down_come_back_and_survive_a_leader_change() {
    let mut cluster = LocalCluster::start(3, MemberOptions::default())
        .await
        .unwrap();
    let servers = cluster.servers();
    let start = |node: &str, gpus: &str, label: &str| {
        LocalAgent::start_in(
            cluster.root(),
            AgentOptions {
                extra: vec!["--label".into(), label.into()],
                ..cluster.agent_options(node, gpus)
            },
        )
        .expect("start agent")
    };
    let a = start("gpu-a", "2xA100-80GB", "zone=eu-1");
    let mut b = start("gpu-b", "8xH100-80GB", "zone=eu-2");

    // Both register and heartbeat; any member answers (followers ask the leader).
    let leader = cluster.wait_for_leader(DEADLINE).await.unwrap();
    let follower = cluster
        .members
        .iter()
        .find(|m| m.id != leader)
        .map(|m| m.addr.clone())
        .unwrap();
    let ready_a = wait_state(&follower, "gpu-a", "ready").await;
    let ready_b = wait_state(&follower, "gpu-b", "ready").await;
    assert_eq!(ready_a["simulated"], true);
    assert_eq!(ready_a["gpus"], 2);
    assert_eq!(ready_a["gpu_memory_total_mib"], 2 * 80 * 1024);
    assert_eq!(ready_a["labels"]["zone"], "eu-1");
    assert!(ready_a["cpus"].as_u64().unwrap() >= 1);
    assert!(ready_a["memory_mib"].as_u64().unwrap() > 0);
    assert_eq!(ready_b["gpus"], 8);
    wait_until(DEADLINE, "heartbeat readings", || async {
        let all = nodes(&follower).await?;
        let n = node(&all, "gpu-b")?;
        (n["gpu_memory_free_mib"] == 8 * 80 * 1024 && n["last_heartbeat_age_s"].as_f64()? < 5.0)
            .then_some(())
    })
    .await;

    // The table is for people; show has every GPU, read from the agent.
    let table = berth(&["--server", &servers, "node", "list"]).await;
    assert!(stdout(&table).contains("(simulated)"), "{}", stdout(&table));
    let shown = berth_json(&["--server", &servers, "node", "show", "gpu-a"]).await;
    let gpus = shown["inventory"]["gpus"].as_array().expect("live GPUs");
    assert_eq!(gpus.len(), 2);
    assert_eq!(gpus[1]["uuid"], "GPU-simulated-gpu-a-1");
    assert_eq!(gpus[1]["simulated"], true);
    assert!(
        shown["inventory"]["memory_total_mib"].as_u64().unwrap() > 0,
        "{shown}"
    );
    let missing = berth(&["--server", &servers, "node", "show", "nosuch"]).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("does not exist"),
        "{}",
        stderr(&missing)
    );

    // SIGKILL an agent: down after the grace period (a figure, not a check).
    b.kill().unwrap();
    let killed = Instant::now();
    let down = wait_state(&servers, "gpu-b", "down").await;
    eprintln!(
        "figure: agent SIGKILL -> node down in {:.1}s (grace 5s, heartbeat 1s)",
        killed.elapsed().as_secs_f64()
    );
    assert_eq!(down["epoch"], 1);
    assert_eq!(
        node(&nodes(&servers).await.unwrap(), "gpu-a").unwrap()["state"],
        "ready",
        "the other node is not affected"
    );

    // Restarted: ready again, a new epoch (a new agent process).
    b.restart().unwrap();
    let back = wait_state(&servers, "gpu-b", "ready").await;
    assert_eq!(back["epoch"], 2);

    // Kill the control-plane leader: the agents follow the new leader and no
    // node is marked down, not even briefly (its state would have changed).
    let before = nodes(&servers).await.unwrap();
    let since: Vec<Value> = ["gpu-a", "gpu-b"]
        .iter()
        .map(|n| node(&before, n).unwrap()["state_since_ms"].clone())
        .collect();
    let old_leader = cluster.wait_for_leader(DEADLINE).await.unwrap();
    cluster.kill(old_leader).unwrap();
    let survivors = cluster.servers_except(old_leader);
    let new_leader = cluster.wait_for_leader(DEADLINE).await.unwrap();
    assert_ne!(new_leader, old_leader);
    // Watch for longer than the grace period: every answer must show both ready.
    let watch_until = Instant::now() + Duration::from_secs(8);
    let answers = check_until(
        DEADLINE,
        Duration::from_millis(300),
        "both nodes stay ready across the grace period",
        || Instant::now() >= watch_until,
        || async {
            let Some(all) = nodes(&survivors).await else {
                return false;
            };
            for (i, n) in ["gpu-a", "gpu-b"].iter().enumerate() {
                let n = node(&all, n).expect("node listed");
                assert_eq!(n["state"], "ready", "after the leader change: {all}");
                assert_eq!(n["state_since_ms"], since[i], "no down/ready flip: {all}");
            }
            true
        },
    )
    .await;
    assert!(answers > 5, "the new leader answered only {answers} times");
    // And the new leader hears the heartbeats.
    wait_until(DEADLINE, "heartbeats reach the new leader", || async {
        let all = nodes(&survivors).await?;
        ["gpu-a", "gpu-b"]
            .iter()
            .all(|n| {
                node(&all, n)
                    .and_then(|n| n["last_heartbeat_age_s"].as_f64())
                    .is_some_and(|age| age < 3.0)
            })
            .then_some(())
    })
    .await;
    drop(a);
}
