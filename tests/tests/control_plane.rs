//! End-to-end tests of the replicated control plane: three (or four) real
//! `berth-control` processes on loopback, driven through the `berth` CLI and
//! through gRPC.

use berth_proto::v1 as pb;
use berth_tests::*;

fn demo_version(version: &str) -> pb::ModelVersionSpec {
    pb::ModelVersionSpec {
        version: version.into(),
        runtime: "demo".into(),
        source: "builtin:demo".into(),
        ..Default::default()
    }
}

async fn create_grpc(addr: &str, name: &str) -> Result<pb::Model, tonic::Status> {
    admin(addr)
        .create_model(pb::CreateModelRequest {
            name: name.into(),
            version: Some(demo_version("v1")),
        })
        .await
        .map(|r| r.into_inner())
}

/// Follower ids, given the leader.
fn followers(cluster: &LocalCluster, leader: u64) -> Vec<u64> {
    cluster
        .members
        .iter()
        .map(|m| m.id)
        .filter(|id| *id != leader)
        .collect()
}

fn addr(cluster: &LocalCluster, id: u64) -> String {
    cluster
        .members
        .iter()
        .find(|m| m.id == id)
        .map(|m| m.addr.clone())
        .expect("member exists")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_replicate_and_survive_leader_kill() {
    let mut cluster = LocalCluster::start(3, MemberOptions::default())
        .await
        .unwrap();
    let leader = cluster.wait_for_leader(DEADLINE).await.unwrap();
    let f = followers(&cluster, leader);

    // Through the CLI on one follower, through gRPC on the other.
    let a1 = addr(&cluster, f[0]);
    let created = berth_json(&[
        "--server",
        &a1,
        "model",
        "create",
        "llama",
        "--runtime",
        "vllm",
        "--source",
        "/models/llama",
        "--gpus",
        "1",
        "--gpu-memory",
        "20GiB",
        "--label",
        "family=llama",
    ])
    .await;
    assert_eq!(created["name"], "llama");
    assert_eq!(created["versions"][0]["gpu_memory_mib"], 20480);
    let a2 = addr(&cluster, f[1]);
    create_grpc(&a2, "mistral")
        .await
        .expect("write sent to a follower succeeds");

    // A linearizable read on any member sees both.
    for m in &cluster.members {
        let list = berth_json(&["--server", &m.addr, "model", "list"]).await;
        let names: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["llama", "mistral"], "on member {}", m.id);
    }

    // Kill the leader: a new one is elected and writes continue.
    cluster.kill(leader).unwrap();
    let new_leader = cluster.wait_for_leader(DEADLINE).await.unwrap();
    assert_ne!(new_leader, leader);
    let servers = cluster.servers();
    let o = berth(&[
        "--server",
        &servers,
        "model",
        "create",
        "after-kill",
        "--runtime",
        "demo",
        "--source",
        "x",
    ])
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let status = berth_json(&["--server", &a1, "cluster", "status"]).await;
    assert_eq!(status["leader_id"], new_leader);
    assert_eq!(status["members"].as_array().unwrap().len(), 3);

    // The killed member restarts with only --data-dir and --listen and catches up.
    cluster.restart(leader).unwrap();
    let back = addr(&cluster, leader);
    wait_for_model(&back, "after-kill", "the restarted member to catch up").await;
    cluster.wait_for_voters(3, DEADLINE).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_member_catches_up_through_a_snapshot() {
    let options = MemberOptions {
        snapshot_every: 10,
        ..MemberOptions::default()
    };
    let mut cluster = LocalCluster::start(3, options).await.unwrap();
    let leader = cluster.wait_for_leader(DEADLINE).await.unwrap();
    let lagging = followers(&cluster, leader)[0];
    cluster.kill(lagging).unwrap();

    let servers = cluster.servers();
    let leader_addr = addr(&cluster, leader);
    for i in 0..60 {
        create_grpc(&leader_addr, &format!("m{i:02}"))
            .await
            .unwrap();
    }
    // The leader compacted its log: a snapshot file exists.
    let leader_dir = cluster.member(leader).unwrap().data_dir.clone();
    assert!(
        leader_dir.join("snapshot.bin").exists(),
        "leader wrote a snapshot"
    );

    cluster.restart(lagging).unwrap();
    let lag_addr = addr(&cluster, lagging);
    let models = wait_until(DEADLINE, "the lagging member to catch up", || async {
        local_models(&lag_addr).await.filter(|m| m.len() == 60)
    })
    .await;
    assert_eq!(models.first().map(String::as_str), Some("m00"));
    let log = std::fs::read_to_string(&cluster.member(lagging).unwrap().log_path).unwrap();
    assert!(
        log.contains("snapshot installed"),
        "the lagging member installed a snapshot:\n{log}"
    );
    let o = berth(&["--server", &servers, "model", "show", "m59"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_killing_every_member() {
    let mut cluster = LocalCluster::start(3, MemberOptions::default())
        .await
        .unwrap();
    let servers = cluster.servers();
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        let name = format!("durable-{i}");
        let member = &cluster.members[i % 3].addr;
        create_grpc(member, &name).await.unwrap();
        acknowledged.push(name);
    }
    for id in [1, 2, 3] {
        cluster.kill(id).unwrap();
    }
    for id in [1, 2, 3] {
        cluster.restart(id).unwrap();
    }
    cluster.wait_for_leader(DEADLINE).await.unwrap();
    let list = berth_json(&["--server", &servers, "model", "list"]).await;
    let names: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect();
    let mut expected = acknowledged.clone();
    expected.sort();
    assert_eq!(names, expected);
}

/// A follower stops on SIGTERM while its leader replicates to it over a
/// long-lived stream: the member ends that stream itself, so its graceful
/// stop does not sit out the 5 s server deadline; restarted, it catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_stops_cleanly_while_its_leader_streams_to_it() {
    let mut cluster = LocalCluster::start(3, MemberOptions::default())
        .await
        .unwrap();
    let leader = cluster.wait_for_leader(DEADLINE).await.unwrap();
    let leader_addr = addr(&cluster, leader);
    let follower = followers(&cluster, leader)[0];
    create_grpc(&leader_addr, "before-stop").await.unwrap();

    cluster.stop(follower).await.unwrap();
    let member = cluster.members.iter().find(|m| m.id == follower).unwrap();
    let log = std::fs::read_to_string(&member.log_path).unwrap();
    assert!(log.contains("stopped"), "{log}");
    assert!(!log.contains("servers did not stop"), "{log}");

    create_grpc(&leader_addr, "while-stopped").await.unwrap();
    cluster.restart(follower).unwrap();
    let follower_addr = addr(&cluster, follower);
    wait_for_model(
        &follower_addr,
        "while-stopped",
        "the restarted follower to catch up",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_joins_and_member_is_removed() {
    let mut cluster = LocalCluster::start(3, MemberOptions::default())
        .await
        .unwrap();
    let first = addr(&cluster, 1);
    create_grpc(&first, "before-join").await.unwrap();

    cluster.add_member(4, Some(&first)).await.unwrap();
    cluster.wait_for_voters(4, DEADLINE).await.unwrap();
    let fourth = addr(&cluster, 4);
    wait_for_model(
        &fourth,
        "before-join",
        "the new member to have the old data",
    )
    .await;
    let members = berth_json(&["--server", &fourth, "cluster", "members"]).await;
    assert_eq!(members.as_array().unwrap().len(), 4);

    // Remove a member that is not the leader, through the CLI on another one.
    let leader = cluster.wait_for_leader(DEADLINE).await.unwrap();
    let victim = followers(&cluster, leader)
        .into_iter()
        .find(|id| *id != 4)
        .unwrap();
    let o = berth(&[
        "--server",
        &fourth,
        "cluster",
        "remove",
        &victim.to_string(),
    ])
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    cluster.kill(victim).unwrap();
    cluster.members.retain(|m| m.id != victim);
    cluster.wait_for_voters(3, DEADLINE).await.unwrap();
    let status = berth_json(&["--server", &fourth, "cluster", "status"]).await;
    let ids: Vec<u64> = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert!(!ids.contains(&victim), "{ids:?}");
    create_grpc(&fourth, "after-remove")
        .await
        .expect("writes go on with 3 voters");

    // Removing an unknown member is a clear NotFound.
    let o = berth(&["--server", &fourth, "cluster", "remove", "99"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("member 99 is not in the cluster"),
        "{}",
        stderr(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer_on_every_member() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let cluster = LocalCluster::start(1, MemberOptions::default())
        .await
        .unwrap();
    let channel = berth_cli::local::current_dialer()
        .channel(&cluster.members[0].addr)
        .unwrap();
    for service in ["", "berth.v1.Admin", "berth.v1.Raft"] {
        let r = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            ServingStatus::Serving as i32,
            "service {service:?}"
        );
    }
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream
        .message()
        .await
        .unwrap()
        .expect("one reflection reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["berth.v1.Admin", "berth.v1.Raft", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
}
