//! Deployments end to end: a 3-member control plane and two agents with
//! simulated GPUs running real `berth demo-model` replicas. Deploy and reach
//! every replica over HTTP; scale up and down; SIGKILL the control-plane
//! leader (no replica restarts, reconciling goes on); SIGKILL an agent (its
//! replicas run on the other node); bad input.

use std::collections::BTreeMap;

use berth_tests::*;
use serde_json::Value;

async fn replicas(server: &str, deployment: &str) -> Option<Vec<Value>> {
    try_berth_json(&[
        "--server",
        server,
        "replica",
        "list",
        "--deployment",
        deployment,
    ])
    .await?
    .as_array()
    .cloned()
}

/// `deploy create web --model MODEL --replicas 2 --policy spread --wait EXTRA..`:
/// two replicas, one per node.
async fn create_web(server: &str, model: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "--server",
        server,
        "deploy",
        "create",
        "web",
        "--model",
        model,
        "--replicas",
        "2",
        "--policy",
        "spread",
        "--wait",
    ];
    args.extend_from_slice(extra);
    berth_json(&args).await
}

/// Waits until exactly `n` replicas should run, all running, none being removed.
async fn wait_running(server: &str, deployment: &str, n: usize) -> Vec<Value> {
    wait_until(
        DEADLINE,
        &format!("{n} replicas of {deployment} running"),
        || async {
            let rs = replicas(server, deployment).await?;
            (rs.len() == n
                && rs
                    .iter()
                    .all(|r| r["phase"] == "running" && r["intent"] == "run"))
            .then_some(rs)
        },
    )
    .await
}

fn pids(rs: &[Value]) -> BTreeMap<String, u64> {
    rs.iter()
        .map(|r| {
            (
                r["id"].as_str().expect("a string").to_string(),
                r["pid"].as_u64().expect("a number"),
            )
        })
        .collect()
}

async fn complete(endpoint: &str) -> (u16, String) {
    let port: u32 = endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("host:port");
    http(
        port,
        "POST",
        "/v1/completions",
        r#"{"prompt":"hello","max_tokens":3}"#,
    )
    .await
    .unwrap_or((0, String::new()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_place_run_scale_and_survive_leader_and_node_loss() {
    let (mut cluster, agents, servers) = demo_cluster(3, &[], &["gpu-a", "gpu-b"]).await;
    let mut agents = agents.into_iter();
    let _a = agents.next().expect("agent a");
    let mut b = agents.next().expect("agent b");

    // Deploy, wait, and reach every replica over HTTP.
    let created = create_web(&servers, "demo", &["--timeout", "60s"]).await;
    assert_eq!(created["replicas_running"], 2, "{created}");
    let rs = wait_running(&servers, "web", 2).await;
    assert_ne!(rs[0]["node"], rs[1]["node"], "spread: one per node");
    for r in &rs {
        assert_eq!(r["gpus"].as_array().unwrap().len(), 1);
        assert!(
            r["gpu_uuids"][0]
                .as_str()
                .unwrap()
                .starts_with("GPU-simulated-")
        );
        let (code, body) = complete(r["endpoint"].as_str().expect("a string")).await;
        assert_eq!(code, 200, "{r}: {body}");
        assert!(body.contains("\"demo\":true"));
        // Its output, streamed from its agent through any member.
        let id = r["id"].as_str().expect("a string");
        let logs = berth(&["--server", &servers, "replica", "logs", id, "--tail", "20"]).await;
        assert!(logs.status.success(), "{}", stderr(&logs));
        assert!(
            stdout(&logs).contains("POST /v1/completions 200"),
            "{}",
            stdout(&logs)
        );
    }

    // Cordon gpu-b, scale up: the new replicas all land on gpu-a, the
    // running one stays. Then scale down: the newest go, their processes end.
    let cordoned = berth_json(&["--server", &servers, "node", "cordon", "gpu-b"]).await;
    assert_eq!(cordoned["state"], "cordoned");
    berth_json(&[
        "--server", &servers, "deploy", "scale", "web", "4", "--wait",
    ])
    .await;
    let four = wait_running(&servers, "web", 4).await;
    for r in &four {
        if r["id"] == "web-3" || r["id"] == "web-4" {
            assert_eq!(r["node"], "gpu-a", "nothing new on a cordoned node: {r}");
        }
    }
    assert_eq!(
        four.iter().filter(|r| r["node"] == "gpu-b").count(),
        1,
        "the replica already on gpu-b stays"
    );
    let back = berth_json(&["--server", &servers, "node", "uncordon", "gpu-b"]).await;
    assert_eq!(back["state"], "ready");
    berth_json(&[
        "--server", &servers, "deploy", "scale", "web", "2", "--wait",
    ])
    .await;
    let two = wait_running(&servers, "web", 2).await;
    let kept: Vec<&str> = two
        .iter()
        .map(|r| r["id"].as_str().expect("a string"))
        .collect();
    assert_eq!(kept, ["web-1", "web-2"], "the newest were removed");
    for r in four
        .iter()
        .filter(|r| !kept.contains(&r["id"].as_str().expect("a string")))
    {
        let pid = r["pid"].as_u64().expect("a number") as u32;
        wait_exited(pid, "a removed replica's process ends").await;
    }

    // SIGKILL the control-plane leader: no replica restarts, and a new
    // leader keeps reconciling.
    let before = pids(&two);
    let leader = cluster.wait_for_leader(DEADLINE).await.unwrap();
    cluster.kill(leader).unwrap();
    let survivors = cluster.servers_except(leader);
    cluster.wait_for_leader(DEADLINE).await.unwrap();
    berth_json(&[
        "--server", &survivors, "deploy", "scale", "web", "3", "--wait",
    ])
    .await;
    let three = wait_running(&survivors, "web", 3).await;
    let after = pids(&three);
    for (id, pid) in &before {
        assert_eq!(after.get(id), Some(pid), "replica {id} kept its process");
        let r = three.iter().find(|r| r["id"] == id.as_str()).unwrap();
        assert_eq!(r["restarts"], 0, "{r}");
    }

    // SIGKILL an agent: its replicas are replaced on the other node.
    let on_b: Vec<String> = three
        .iter()
        .filter(|r| r["node"] == "gpu-b")
        .map(|r| r["id"].as_str().expect("a string").to_string())
        .collect();
    assert!(
        !on_b.is_empty(),
        "replicas are spread over both nodes: {three:?}"
    );
    b.kill().unwrap();
    let moved = wait_until(DEADLINE, "replicas of gpu-b running on gpu-a", || async {
        let rs = replicas(&survivors, "web").await?;
        (rs.len() == 3
            && rs
                .iter()
                .all(|r| r["node"] == "gpu-a" && r["phase"] == "running"))
        .then_some(rs)
    })
    .await;
    for r in &moved {
        assert!(
            !on_b.contains(&r["id"].as_str().expect("a string").to_string()),
            "replaced under new ids"
        );
        assert_eq!(
            complete(r["endpoint"].as_str().expect("a string")).await.0,
            200
        );
    }
    b.kill_replicas();

    // Bad input.
    let huge = berth_json(&[
        "--server", &survivors, "deploy", "create", "huge", "--model", "demo", "--gpus", "9",
    ])
    .await;
    assert_eq!(huge["replicas_pending"], 1);
    let why = wait_until(DEADLINE, "an explanation", || async {
        let v = berth_json(&["--server", &survivors, "deploy", "explain", "huge"]).await;
        let why = v[0]["why"].as_str()?.to_string();
        why.contains("fewer GPUs").then_some(why)
    })
    .await;
    assert!(why.contains("node"), "{why}");
    let o = berth(&["--server", &survivors, "replica", "logs", "huge-1"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("pending"), "{}", stderr(&o));
    for (args, code, says) in [
        (
            vec!["deploy", "create", "x", "--model", "nosuch"],
            1,
            "does not exist",
        ),
        (
            vec!["deploy", "create", "x", "--model", "demo:v9"],
            1,
            "does not exist",
        ),
        (
            vec![
                "deploy",
                "create",
                "x",
                "--model",
                "demo",
                "--gpu-memory",
                "20XB",
            ],
            2,
            "--gpu-memory",
        ),
        (
            vec!["deploy", "create", "x", "--model", "demo", "--cpu", "lots"],
            2,
            "--cpu",
        ),
        (vec!["deploy", "scale", "web", "-1"], 2, "-1"),
        (
            vec!["deploy", "create", "Bad_Name", "--model", "demo"],
            1,
            "name",
        ),
        (vec!["model", "delete", "demo"], 1, "used by deployments"),
    ] {
        let mut all = vec!["--server", survivors.as_str()];
        all.extend(args.iter());
        let o = berth(&all).await;
        assert_eq!(o.status.code(), Some(code), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
    // Nothing changed: still three running replicas of web, no deployment x.
    wait_running(&survivors, "web", 3).await;
    let list = berth_json(&["--server", &survivors, "deploy", "list"]).await;
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().expect("a string"))
        .collect();
    assert_eq!(names, ["huge", "web"]);

    // Events: every member tells what happened, from the changes it applied.
    let events = berth_json(&["--server", &survivors, "events", "--tail", "500"]).await;
    let messages: Vec<&str> = events
        .as_array()
        .expect("a list")
        .iter()
        .map(|e| e["message"].as_str().expect("a message"))
        .collect();
    for expected in [
        "deployment web created: 2 replicas of demo:v1",
        "replica web-1 placed on node",
        "deployment web scaled to 4 replicas",
        "node gpu-b is down",
        "the replicas of node gpu-b are replaced elsewhere",
        "node gpu-b is cordoned",
    ] {
        assert!(
            messages.iter().any(|m| m.contains(expected)),
            "no event {expected:?} in {messages:?}"
        );
    }
    // Following: a new change arrives on the open stream. The member
    // subscribes before it sends the tail, so once the last event has
    // arrived the stream is open and the change cannot slip in before it.
    let mut follow = berth_command(&[
        "--server", &survivors, "events", "--tail", "1", "-f", "-o", "json",
    ])
    .stdout(std::process::Stdio::piped())
    .kill_on_drop(true)
    .spawn()
    .expect("berth events -f");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
        follow.stdout.take().expect("stdout"),
    ));
    tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("the tail arrives")
        .expect("read")
        .expect("the last event");
    berth_json(&["--server", &survivors, "deploy", "scale", "huge", "0"]).await;
    let line = tokio::time::timeout(DEADLINE, async {
        loop {
            let line = lines.next_line().await.expect("read").expect("a line");
            if line.contains("huge scaled to 0") {
                return line;
            }
        }
    })
    .await
    .expect("the event arrives while following");
    let e: Value = serde_json::from_str(&line).expect("one JSON object a line");
    assert_eq!(e["kind"], "deployment");
    drop(follow);

    // Delete: every replica process ends.
    let last = pids(&moved);
    berth(&["--server", &survivors, "deploy", "delete", "web"]).await;
    for pid in last.values() {
        let pid = *pid as u32;
        wait_exited(pid, "a deleted deployment's process ends").await;
    }
    wait_until(DEADLINE, "the replica records are gone", || async {
        let o = berth(&["--server", &survivors, "replica", "list", "-o", "json"]).await;
        let v: Value = serde_json::from_slice(&o.stdout).ok()?;
        v.as_array()?
            .iter()
            .all(|r| r["deployment"] == "huge")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_back_from_a_freeze_stops_the_replicas_moved_away() {
    let (_cluster, agents, servers) = demo_cluster(1, &[], &["frozen", "other"]).await;
    let a = &agents[0];
    create_web(&servers, "demo", &[]).await;
    let rs = wait_running(&servers, "web", 2).await;
    let frozen: Vec<(String, u32)> = rs
        .iter()
        .filter(|r| r["node"] == "frozen")
        .map(|r| {
            (
                r["id"].as_str().expect("a string").to_string(),
                r["pid"].as_u64().expect("a number") as u32,
            )
        })
        .collect();
    assert_eq!(frozen.len(), 1, "{rs:?}");

    // The agent stops (as if cut off) past the grace: its replica is replaced
    // elsewhere, while its old process keeps running.
    a.signal(nix::sys::signal::Signal::SIGSTOP).unwrap();
    wait_until(
        DEADLINE,
        "the replica replaced on the other node",
        || async {
            let rs = replicas(&servers, "web").await?;
            (rs.len() == 2
                && rs
                    .iter()
                    .all(|r| r["node"] == "other" && r["phase"] == "running"))
            .then_some(())
        },
    )
    .await;
    assert!(alive(frozen[0].1), "the frozen node's replica still runs");

    // Back: its heartbeat answer no longer lists the replica; it stops it.
    a.signal(nix::sys::signal::Signal::SIGCONT).unwrap();
    wait_exited(frozen[0].1, "the moved-away replica stopped").await;
    // Its next heartbeat (early ones are at least 250 ms apart) reports none.
    wait_until(
        DEADLINE,
        "the node ready again, with no replica",
        || async {
            let v = berth_json(&["--server", &servers, "node", "list"]).await;
            v.as_array()?
                .iter()
                .find(|n| n["name"] == "frozen" && n["state"] == "ready" && n["replicas"] == 0)
                .cloned()
        },
    )
    .await;
}

async fn deployment(server: &str, name: &str) -> Value {
    berth_json(&["--server", server, "deploy", "show", name]).await["deployment"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_rollback_failed_rollout_and_resize() {
    let (_cluster, _agents, s) =
        demo_cluster(1, &["--progress-deadline", "4s"], &["roll-a", "roll-b"]).await;
    for (v, env) in [
        ("v2", "BERTH_DEMO_LOAD_DELAY=300ms"),
        ("v3", "BERTH_DEMO_FAIL_HEALTH=true"),
    ] {
        let mut args = vec!["--server", s.as_str(), "model", "version", "add", "demo", v];
        args.extend(DEMO_MODEL);
        args.extend(["--env", env]);
        berth_json(&args).await;
    }
    create_web(
        &s,
        "demo:v1",
        &["--max-surge", "1", "--max-unavailable", "1"],
    )
    .await;
    let v1 = wait_running(&s, "web", 2).await;

    // Rolling update to v2: never fewer than replicas - max_unavailable running.
    let started = berth_json(&["--server", &s, "deploy", "update", "web", "--version", "v2"]).await;
    assert_eq!(started["revision"], 2);
    wait_until(DEADLINE, "every replica at v2", || async {
        let d = deployment(&s, "web").await;
        assert!(
            d["replicas_running"].as_u64()? >= 1,
            "availability fell below replicas - max_unavailable: {d}"
        );
        let rs = replicas(&s, "web").await?;
        (rs.len() == 2
            && rs
                .iter()
                .all(|r| r["version"] == "v2" && r["phase"] == "running"))
        .then_some(())
    })
    .await;
    for r in &v1 {
        let pid = r["pid"].as_u64().expect("a pid") as u32;
        wait_exited(pid, "a v1 process ends").await;
    }

    // Rollback (to the revision before): v1 again, as revision 3.
    let back = berth_json(&["--server", &s, "deploy", "rollback", "web", "--wait"]).await;
    assert_eq!(back["revision"], 3);
    assert_eq!(back["version"], "v1");
    let v1_again = wait_running(&s, "web", 2).await;
    assert!(v1_again.iter().all(|r| r["version"] == "v1"));

    // A version that never becomes healthy: the rollout pauses, the old
    // replicas keep serving; --wait fails naming the pause.
    let o = berth(&[
        "--server",
        &s,
        "deploy",
        "update",
        "web",
        "--version",
        "v3",
        "--wait",
        "--timeout",
        "60s",
    ])
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("paused"), "{}", stderr(&o));
    let d = deployment(&s, "web").await;
    assert!(
        d["paused"]
            .as_str()
            .expect("a reason")
            .contains("not healthy"),
        "{d}"
    );
    let rs = replicas(&s, "web").await.expect("replicas");
    let serving: Vec<&Value> = rs
        .iter()
        .filter(|r| r["version"] == "v1" && r["phase"] == "running")
        .collect();
    assert!(!serving.is_empty(), "old replicas keep serving: {rs:?}");
    for r in &serving {
        assert_eq!(
            complete(r["endpoint"].as_str().expect("an endpoint"))
                .await
                .0,
            200
        );
    }
    let before = pids(&serving.iter().map(|r| (*r).clone()).collect::<Vec<_>>());
    // Rolling back adopts the v1 replicas as they are: no restart.
    berth_json(&["--server", &s, "deploy", "rollback", "web", "--wait"]).await;
    let after = pids(&wait_running(&s, "web", 2).await);
    for (id, pid) in &before {
        assert_eq!(
            after.get(id),
            Some(pid),
            "{id} was not restarted by the rollback"
        );
    }

    // Resize CPU and memory: in place, same processes, a new generation.
    let resized = berth_json(&[
        "--server", &s, "deploy", "resize", "web", "--memory", "256MiB", "--wait",
    ])
    .await;
    assert_eq!(resized["memory_mib"], 256);
    let rs = wait_until(DEADLINE, "resized in place", || async {
        let rs = replicas(&s, "web").await?;
        (rs.len() == 2
            && rs
                .iter()
                .all(|r| r["generation"] == 2 && r["phase"] == "running"))
        .then_some(rs)
    })
    .await;
    assert_eq!(pids(&rs), after, "no restart for CPU and memory");

    // Resize GPUs: another process per replica, rolled out one at a time.
    berth_json(&[
        "--server", &s, "deploy", "resize", "web", "--gpus", "2", "--wait",
    ])
    .await;
    let two = wait_running(&s, "web", 2).await;
    for r in &two {
        assert_eq!(r["gpus"].as_array().expect("gpus").len(), 2, "{r}");
        assert!(
            !after.contains_key(r["id"].as_str().expect("an id")),
            "replaced: {r}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_replaces_each_replica_before_stopping_it() {
    let (_cluster, _agents, s) = demo_cluster(1, &[], &["keep", "leave"]).await;
    create_web(&s, "demo", &[]).await;
    let before = wait_running(&s, "web", 2).await;
    let leaving: Vec<u32> = before
        .iter()
        .filter(|r| r["node"] == "leave")
        .map(|r| r["pid"].as_u64().expect("a pid") as u32)
        .collect();
    assert_eq!(leaving.len(), 1, "{before:?}");

    // Drain in the background; meanwhile, at least 2 replicas always run.
    let drain = {
        let s = s.clone();
        tokio::spawn(async move {
            berth(&[
                "--server",
                &s,
                "node",
                "drain",
                "leave",
                "--wait",
                "--timeout",
                "60s",
            ])
            .await
        })
    };
    check_until(
        // Past the drain's own 60 s timeout, so its error is the one reported.
        DEADLINE + std::time::Duration::from_secs(30),
        std::time::Duration::from_millis(100),
        "two replicas running while the node drains",
        || drain.is_finished(),
        || async {
            let Some(rs) = replicas(&s, "web").await else {
                return false;
            };
            let running = rs.iter().filter(|r| r["phase"] == "running").count();
            assert!(
                running >= 2,
                "a replica stopped before its replacement ran: {rs:?}"
            );
            true
        },
    )
    .await;
    let o = drain.await.expect("the drain command");
    assert!(o.status.success(), "{}", stderr(&o));
    let after = wait_running(&s, "web", 2).await;
    assert!(after.iter().all(|r| r["node"] == "keep"), "{after:?}");
    for pid in leaving {
        wait_exited(pid, "the drained replica's process ends").await;
    }
    let nodes = berth_json(&["--server", &s, "node", "list"]).await;
    let leave = nodes
        .as_array()
        .expect("a list")
        .iter()
        .find(|n| n["name"] == "leave")
        .expect("the node");
    assert_eq!(leave["state"], "drained");
    let back = berth_json(&["--server", &s, "node", "uncordon", "leave"]).await;
    assert_eq!(back["state"], "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_keeps_failing_is_replaced() {
    let (_cluster, _agents, s) = demo_cluster(1, &[], &["n1", "n2"]).await;
    berth_json(&[
        "--server",
        &s,
        "model",
        "create",
        "crashy",
        "--runtime",
        "command",
        "--source",
        "/nowhere",
        "--command",
        "sh -c 'echo crashing; exit 3'",
        "--cpu",
        "100m",
        "--memory",
        "128MiB",
    ])
    .await;
    let ok = berth(&[
        "--server",
        &s,
        "deploy",
        "create",
        "crashy",
        "--model",
        "crashy",
        "--replicas",
        "1",
    ])
    .await;
    assert!(ok.status.success(), "{}", stderr(&ok));
    // The agent restarts it with back-off; after 3 restarts not running, the
    // control plane gives up on it: crashy-1 goes and crashy-2 takes its place.
    let replaced = wait_until(DEADLINE, "crashy-1 replaced by crashy-2", || async {
        let rs = replicas(&s, "crashy").await?;
        let ids: Vec<&str> = rs.iter().filter_map(|r| r["id"].as_str()).collect();
        (ids.contains(&"crashy-2") && !ids.contains(&"crashy-1")).then_some(rs)
    })
    .await;
    assert_eq!(
        replaced.len(),
        1,
        "still one replica in the count: {replaced:?}"
    );
    let events = berth(&["--server", &s, "events"]).await;
    let text = stdout(&events);
    assert!(
        text.contains("crashy-1 keeps failing") && text.contains("restarted 3 times"),
        "{text}"
    );
    // The deployment itself is unchanged: still one replica asked for.
    let d = deployment(&s, "crashy").await;
    assert_eq!(d["replicas"], 1, "{d}");
}
