//! Secure by default, end to end with real processes: roles decide what a
//! token may do, an agent's certificate speaks for its own node only and
//! cannot call Raft or Admin, a plaintext member cannot join, a used-up or
//! foreign token buys nothing, and bad credentials files give clear errors.

use std::time::Duration;

use berth_proto::grpc::{Dialer, LEADER_KEY};
use berth_proto::tls::{Credentials, TlsFiles};
use berth_proto::v1 as pb;
use berth_tests::*;

/// A one-member cluster and one agent that joined it with the agent token.
async fn cluster_with_agent(node: &str) -> (LocalCluster, LocalAgent) {
    let cluster = LocalCluster::start(1, MemberOptions::default())
        .await
        .expect("start the control plane");
    let agent = LocalAgent::start_in(cluster.root(), cluster.agent_options(node, "1xA100-80GB"))
        .expect("start the agent");
    let servers = cluster.servers();
    wait_until(DEADLINE, "the node is ready", || async {
        let v = try_berth_json(&["--server", &servers, "node", "list"]).await?;
        (v.as_array()?.first()?["state"] == "ready").then_some(())
    })
    .await;
    (cluster, agent)
}

/// Runs the CLI with `token` instead of the admin's.
async fn berth_as(token: &str, args: &[&str]) -> std::process::Output {
    berth_command(args)
        .env("BERTH_TOKEN", token)
        .output()
        .await
        .expect("run berth")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_what_a_token_may_do() {
    let cluster = LocalCluster::start(1, MemberOptions::default())
        .await
        .unwrap();
    let s = cluster.servers();
    let viewer = cluster.token("viewer").await.unwrap();
    let operator = cluster.token("operator").await.unwrap();

    // A viewer reads, and a write is refused before anything changes.
    let o = berth_as(&viewer, &["--server", &s, "model", "list", "-o", "json"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let create = [
        "--server",
        &s,
        "model",
        "create",
        "m1",
        "--runtime",
        "demo",
        "--source",
        "builtin:demo",
    ];
    let o = berth_as(&viewer, &create).await;
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("may not call") && err.contains("viewer"),
        "{err}"
    );
    let models = berth_json(&["--server", &s, "model", "list"]).await;
    assert_eq!(models.as_array().map(Vec::len), Some(0), "{models}");

    // An operator writes models but cannot make tokens.
    let o = berth_as(&operator, &create).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = berth_as(
        &operator,
        &["--server", &s, "token", "create", "--role", "admin"],
    )
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("operator"), "{}", stderr(&o));
    let tokens = berth_json(&["--server", &s, "token", "list"]).await;
    assert!(
        tokens
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["role"] != "admin" || t["description"] == "made at bootstrap"),
        "{tokens}"
    );

    // An unknown token and a wrong secret get the same answer.
    let mut parts: Vec<String> = viewer.split('.').map(String::from).collect();
    parts[3] = "x".repeat(64);
    let wrong_secret = parts.join(".");
    parts[2] = "nosuchid".into();
    let unknown_id = parts.join(".");
    let a = berth_as(&wrong_secret, &["--server", &s, "model", "list"]).await;
    let b = berth_as(&unknown_id, &["--server", &s, "model", "list"]).await;
    assert_eq!(a.status.code(), Some(1));
    assert_eq!(stderr(&a), stderr(&b));
    assert!(!stderr(&a).contains(&parts[3]), "the secret was echoed");

    // A revoked token stops working at once.
    let id = viewer.split('.').nth(2).unwrap().to_string();
    berth(&["--server", &s, "token", "revoke", &id]).await;
    let o = berth_as(&viewer, &["--server", &s, "model", "list"]).await;
    assert_eq!(o.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_certificate_speaks_for_its_own_node_only() {
    let (cluster, agent) = cluster_with_agent("node-a").await;
    let addr = cluster.members[0].addr.clone();
    // The agent's own credentials, as it stored them.
    let creds = Credentials::load(&TlsFiles::under(&agent.data_dir)).expect("agent credentials");
    let dialer = Dialer::with_credentials(creds).unwrap();
    let channel = dialer.channel(&addr).unwrap();

    let as_b = pb::HeartbeatRequest {
        node: "node-b".into(),
        ..Default::default()
    };
    let e = pb::node_registry_client::NodeRegistryClient::new(channel.clone())
        .heartbeat(as_b.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("node-b"), "{e:?}");
    assert!(e.metadata().get(LEADER_KEY).is_none());

    // On the heartbeat stream each message is judged alike: its own node
    // is answered, another node's is refused, and the refusal ends the stream.
    let as_a = pb::HeartbeatRequest {
        node: "node-a".into(),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(as_a).await.unwrap();
    tx.send(as_b.clone()).await.unwrap();
    let mut answers = pb::node_registry_client::NodeRegistryClient::new(channel.clone())
        .heartbeat_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = answers.message().await.unwrap().unwrap();
    assert!(!first.registered, "another instance id: {first:?}");
    let e = answers.message().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("node-b"), "{e:?}");
    drop(tx);
    assert!(matches!(answers.message().await, Ok(None) | Err(_)));

    let e = pb::raft_client::RaftClient::new(channel.clone())
        .read_index(pb::ReadIndexRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = pb::admin_client::AdminClient::new(channel)
        .list_models(pb::ListModelsRequest { stale: true })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    // The admin token cannot call an agent: agents accept members only.
    let e = pb::agent_client::AgentClient::new(
        cluster.dialer.agent_channel(&agent.addr, "node-a").unwrap(),
    )
    .list_replicas(pb::ListReplicasRequest {})
    .await
    .unwrap_err();
    assert!(
        matches!(
            e.code(),
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
        ),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_pin_the_ca_and_are_spent() {
    let cluster = LocalCluster::start(1, MemberOptions::default())
        .await
        .unwrap();
    let addr = cluster.members[0].addr.clone();
    let dir = tempfile::tempdir().unwrap();
    let agent_args = |name: &str, token: &str| -> Vec<String> {
        vec![
            "--node-name".into(),
            name.into(),
            "--control".into(),
            addr.clone(),
            "--listen".into(),
            format!("127.0.0.1:{}", berth_cli::local::free_port().unwrap()),
            "--data-dir".into(),
            dir.path().join(name).display().to_string(),
            "--simulate-gpus".into(),
            "1xA100-80GB".into(),
            "--token".into(),
            token.into(),
        ]
    };

    // A token whose pin names another CA: refused before the token is sent.
    let real = cluster.agent_token().unwrap();
    let mut parts: Vec<&str> = real.split('.').collect();
    let other = "ab".repeat(32);
    parts[1] = &other;
    let foreign = parts.join(".");
    let args = agent_args("pin", &foreign);
    let o = berth_agent(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("pinned fingerprint"), "{}", stderr(&o));

    // A one-use member token buys one certificate; the second join is refused.
    let o = berth(&[
        "--server", &addr, "token", "create", "--role", "agent", "--uses", "1", "-o", "json",
    ])
    .await;
    let once: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let once = once["token"].as_str().unwrap().to_string();
    let mut first = LocalAgent::start_in(
        dir.path(),
        AgentOptions {
            node: "once-1".into(),
            simulate_gpus: Some("1xA100-80GB".into()),
            control: Some(addr.clone()),
            token: Some(once.clone()),
            extra: Vec::new(),
            placement: None,
        },
    )
    .unwrap();
    wait_until(DEADLINE, "once-1 registers", || async {
        let v = try_berth_json(&["--server", &addr, "node", "list"]).await?;
        v.as_array()?
            .iter()
            .any(|n| n["name"] == "once-1")
            .then_some(())
    })
    .await;
    let args = agent_args("once-2", &once);
    let o = berth_agent(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("refused"), "{}", stderr(&o));
    let tokens = berth_json(&["--server", &addr, "token", "list"]).await;
    assert!(
        tokens
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["uses_left"] == 0),
        "{tokens}"
    );
    first.kill().unwrap();

    // A plaintext member cannot join a secure cluster.
    let o = berth_control(&[
        "--id",
        "2",
        "--listen",
        &format!("127.0.0.1:{}", berth_cli::local::free_port().unwrap()),
        "--data-dir",
        &dir.path().join("plain").display().to_string(),
        "--join",
        &addr,
        "--join-timeout",
        "2s",
        "--insecure",
    ])
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("could not join"), "{}", stderr(&o));
    let members = berth_json(&["--server", &addr, "cluster", "members"]).await;
    assert_eq!(members.as_array().map(Vec::len), Some(1), "{members}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_files_give_clear_errors() {
    let (cluster, mut agent) = cluster_with_agent("node-a").await;
    agent.kill().unwrap();
    let files = TlsFiles::under(&agent.data_dir);
    let start = |agent_addr: String| {
        let data = agent.data_dir.display().to_string();
        let control = cluster.servers();
        async move {
            berth_agent(&[
                "--node-name",
                "node-a",
                "--control",
                &control,
                "--listen",
                &agent_addr,
                "--data-dir",
                &data,
            ])
            .await
        }
    };
    let addr = || format!("127.0.0.1:{}", berth_cli::local::free_port().unwrap());

    // A key readable by others.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(files.key(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = start(addr()).await;
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("key.pem") && err.contains("chmod 600"),
        "{err}"
    );
    std::fs::set_permissions(files.key(), std::fs::Permissions::from_mode(0o600)).unwrap();

    // A truncated certificate.
    let pem = std::fs::read_to_string(files.cert()).unwrap();
    std::fs::write(files.cert(), &pem[..pem.len() / 3]).unwrap();
    let o = start(addr()).await;
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("cert.pem") && err.contains("truncated"),
        "{err}"
    );
    std::fs::write(files.cert(), &pem).unwrap();

    // A malformed token is a usage error naming the flag, never echoing it.
    let o = berth_agent(&[
        "--node-name",
        "x",
        "--control",
        "127.0.0.1:1",
        "--token",
        "berth1.secretvalue",
    ])
    .await;
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("--token") && !err.contains("secretvalue"),
        "{err}"
    );

    // Restored, the agent starts again with its stored certificate.
    agent.restart().unwrap();
    let servers = cluster.servers();
    wait_until(
        Duration::from_secs(60),
        "the agent heartbeats again",
        || async {
            let v = try_berth_json(&["--server", &servers, "node", "list"]).await?;
            let n = v.as_array()?.first()?.clone();
            (n["state"] == "ready" && n["last_heartbeat_age_s"].as_f64().is_some_and(|s| s < 2.0))
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_restarts_while_writes_and_heartbeats_flow() {
    use berth_proto::tls::{ClientFile, Expect};
    use std::collections::{BTreeMap, BTreeSet};
    // Leaves of 30 s: each process renews about every 20 s.
    let options = MemberOptions {
        extra: vec!["--cert-lifetime".into(), "30s".into()],
        ..MemberOptions::default()
    };
    let cluster = LocalCluster::start(3, options).await.unwrap();
    let servers = cluster.servers();
    let agents: Vec<LocalAgent> = ["rot-a", "rot-b"]
        .iter()
        .map(|node| {
            LocalAgent::start_in(cluster.root(), cluster.agent_options(node, "1xA100-80GB"))
                .unwrap()
        })
        .collect();
    let ready = || async {
        let v = try_berth_json(&["--server", &servers, "node", "list"]).await?;
        let n = v
            .as_array()?
            .iter()
            .filter(|n| n["state"] == "ready")
            .count();
        Some(n)
    };
    wait_until(DEADLINE, "both nodes ready", || async {
        (ready().await? == 2).then_some(())
    })
    .await;
    berth_json(&[
        "--server",
        &servers,
        "model",
        "create",
        "rot",
        "--runtime",
        "demo",
        "--source",
        "builtin:demo",
        "--gpus",
        "1",
        "--gpu-memory",
        "10GiB",
        "--gpu-share",
        "250",
    ])
    .await;
    berth_json(&[
        "--server",
        &servers,
        "deploy",
        "create",
        "rot",
        "--model",
        "rot",
        "--replicas",
        "2",
        "--policy",
        "spread",
        "--wait",
    ])
    .await;
    let running = |v: serde_json::Value| -> BTreeMap<String, (u64, u64)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["id"].as_str().unwrap().to_string(),
                    (
                        r["pid"].as_u64().unwrap_or(0),
                        r["restarts"].as_u64().unwrap_or(0),
                    ),
                )
            })
            .collect()
    };
    let before = running(berth_json(&["--server", &servers, "replica", "list"]).await);
    assert_eq!(before.len(), 2);

    let ca = ClientFile::load(cluster.admin_conf().unwrap())
        .unwrap()
        .ca_pem;
    let mut targets: Vec<(String, Expect)> = cluster
        .members
        .iter()
        .map(|m| (m.addr.clone(), Expect::Member))
        .collect();
    for a in &agents {
        targets.push((a.addr.clone(), Expect::Node(a.node.clone())));
    }
    let mut seen: Vec<BTreeSet<String>> = vec![BTreeSet::new(); targets.len()];
    let client = cluster.client();
    let mut writes = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    // Until every process has presented four certificates (three rotations),
    // a round of probes, a write and a look at the nodes every 250 ms.
    let mut rounds = tokio::time::interval(Duration::from_millis(250));
    while seen.iter().any(|s| s.len() < 4) {
        rounds.tick().await;
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every process rotated 3 times within 180 s: {seen:?}"
        );
        for (i, (addr, expect)) in targets.iter().enumerate() {
            if let Some(serial) = presented_serial(addr, &ca, expect.clone()).await {
                seen[i].insert(serial);
            }
        }
        // A write through any member: none may fail.
        let name = format!("w{writes}");
        client
            .admin(|mut c| {
                let req = pb::CreateModelRequest {
                    name: name.clone(),
                    version: Some(pb::ModelVersionSpec {
                        version: "v1".into(),
                        runtime: "demo".into(),
                        source: "builtin:demo".into(),
                        ..Default::default()
                    }),
                };
                async move { c.create_model(req).await }
            })
            .await
            .unwrap_or_else(|e| panic!("write {writes} failed during rotation: {e}"));
        writes += 1;
        // Heartbeats keep flowing: both nodes stay ready.
        assert_eq!(ready().await, Some(2), "a node left ready during rotation");
    }
    let after = running(berth_json(&["--server", &servers, "replica", "list"]).await);
    assert_eq!(
        before, after,
        "a replica restarted or moved during rotation"
    );
    // The ledger holds the renewals, and every process reports time left.
    let status = berth_json(&["--server", &servers, "cluster", "status"]).await;
    for m in status["members"].as_array().unwrap() {
        let left = m["cert_expires_in_s"].as_i64().unwrap();
        assert!((1..=30).contains(&left), "{m}");
    }
    assert!(writes > 10);
    drop(agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_is_cut_off_and_cannot_rejoin_with_its_old_token() {
    use berth_proto::tls::{Expect, client_config, connect};
    use tokio::io::AsyncReadExt;
    let (cluster, _agent) = cluster_with_agent("gone").await;
    let agent = &_agent;
    let addr = cluster.members[0].addr.clone();
    let s = cluster.servers();

    // A replica placed there: removal is refused until --force.
    berth_json(&[
        "--server",
        &s,
        "model",
        "create",
        "demo",
        "--runtime",
        "demo",
        "--source",
        "builtin:demo",
        "--gpus",
        "1",
        "--gpu-memory",
        "10GiB",
    ])
    .await;
    berth_json(&[
        "--server", &s, "deploy", "create", "one", "--model", "demo", "--wait",
    ])
    .await;
    let o = berth(&["--server", &s, "node", "remove", "gone"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("drain it first"), "{}", stderr(&o));

    // The node's credentials, an idle connection, and a call that works.
    let creds = Credentials::load(&TlsFiles::under(&agent.data_dir)).unwrap();
    let (host, port) = addr.rsplit_once(':').unwrap();
    let config = client_config(creds.trust(), Expect::Member, Some(creds.clone())).unwrap();
    let mut idle = connect(host, port.parse().unwrap(), config).await.unwrap();
    let mut registry = pb::node_registry_client::NodeRegistryClient::new(
        Dialer::with_credentials(creds)
            .unwrap()
            .channel(&addr)
            .unwrap(),
    );
    let heartbeat = || pb::HeartbeatRequest {
        node: "gone".into(),
        ..Default::default()
    };
    registry.heartbeat(heartbeat()).await.unwrap();

    let o = berth(&["--server", &s, "node", "remove", "gone", "--force"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let nodes = berth_json(&["--server", &s, "node", "list"]).await;
    assert_eq!(nodes.as_array().map(Vec::len), Some(0), "{nodes}");

    // Its next call fails, and its idle connection is closed by the server.
    let e = registry.heartbeat(heartbeat()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("revoked"), "{e:?}");
    // (The server's HTTP/2 settings arrive first; then the connection ends.)
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, idle.read_to_end(&mut sink)).await;
    assert!(
        closed.is_ok(),
        "the revoked node's open connection stayed open for {DEADLINE:?}"
    );

    // Its old token cannot bring it back, even with a fresh data dir.
    let dir = tempfile::tempdir().unwrap();
    let token = cluster.agent_token().unwrap();
    let data = dir.path().join("again").display().to_string();
    let listen = format!("127.0.0.1:{}", berth_cli::local::free_port().unwrap());
    let o = berth_agent(&[
        "--node-name",
        "gone",
        "--control",
        &addr,
        "--listen",
        &listen,
        "--data-dir",
        &data,
        "--simulate-gpus",
        "1xA100-80GB",
        "--token",
        &token,
    ])
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("removed"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_is_revoked() {
    let cluster = LocalCluster::start(3, MemberOptions::default())
        .await
        .unwrap();
    let s = cluster.servers_except(3);
    let third = cluster.members[2].data_dir.clone();
    let o = berth(&["--server", &s, "cluster", "remove", "3"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let creds = Credentials::load(&TlsFiles::under(&third)).unwrap();
    let dialer = Dialer::with_credentials(creds).unwrap();
    let e = pb::raft_client::RaftClient::new(dialer.channel(&cluster.members[0].addr).unwrap())
        .read_index(pb::ReadIndexRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("member 3"), "{e:?}");
}
