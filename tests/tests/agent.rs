//! The replica supervisor with real child processes, through a real
//! standalone `berth-agent` (simulated GPUs) and its gRPC Agent API: start,
//! idempotent start, stale generations, stop, SIGKILL after the grace
//! period, restart with back-off, log capture and rotation, cgroup limits
//! and resize, re-adoption after the agent is SIGKILLed, and bad specs.

use std::time::Duration;

use berth_proto::v1 as pb;
use berth_tests::*;
use tokio_stream::StreamExt;

fn standalone(node: &str, extra: &[&str]) -> LocalAgent {
    let mut o = AgentOptions::standalone(node);
    o.extra = extra.iter().map(|s| s.to_string()).collect();
    LocalAgent::start(o).expect("start the agent")
}

async fn wait_serving(a: &LocalAgent) {
    wait_until(DEADLINE, "the agent serves", || async {
        agent(&a.addr)
            .list_replicas(pb::ListReplicasRequest {})
            .await
            .ok()
    })
    .await;
}

async fn stop(addr: &str, id: &str, grace_ms: u64) -> pb::ReplicaStatus {
    agent(addr)
        .stop_replica(pb::StopReplicaRequest {
            id: id.into(),
            generation: 0,
            grace_ms: Some(grace_ms),
        })
        .await
        .expect("stop")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_is_idempotent_stale_generations_are_refused_and_stop_ends_the_process() {
    let a = standalone("sup-1", &[]);
    wait_serving(&a).await;

    let first = start_replica(&a.addr, demo_spec("web-1", 1, Some(1))).await;
    assert!(first.pid > 0, "{first:?}");
    assert!(alive(first.pid));
    assert!(first.port > 0, "the agent picked a port");
    assert_eq!(first.gpu_uuids, ["GPU-simulated-sup-1-1"]);

    // The same id and generation again: the same process, nothing new.
    let again = start_replica(&a.addr, demo_spec("web-1", 1, Some(1))).await;
    assert_eq!(again.pid, first.pid);
    assert_eq!(again.port, first.port);

    // It serves, in its own process group, with its GPU in its environment.
    let running = wait_replica(&a.addr, "web-1", "running", |r| r.phase == "running").await;
    assert_eq!(running.pid, first.pid);
    let (code, body) = http(
        first.port,
        "POST",
        "/v1/completions",
        r#"{"model":"demo","prompt":"hello","max_tokens":5}"#,
    )
    .await
    .expect("the replica answers");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"demo\":true"), "{body}");
    let env = environ(first.pid);
    assert_eq!(
        env.get("CUDA_VISIBLE_DEVICES").map(String::as_str),
        Some("1")
    );
    assert_eq!(
        env.get("NVIDIA_VISIBLE_DEVICES").map(String::as_str),
        Some("1")
    );
    assert_eq!(
        env.get("BERTH_REPLICA_ID").map(String::as_str),
        Some("web-1")
    );
    assert_eq!(
        env.get("BERTH_PORT").map(String::as_str),
        Some(first.port.to_string().as_str())
    );
    assert_eq!(
        nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(first.pid as i32)))
            .unwrap()
            .as_raw(),
        first.pid as i32,
        "the replica leads its own process group"
    );

    // A different spec under the same generation, and an older generation, are refused.
    let mut changed = demo_spec("web-1", 1, Some(0));
    changed.port = 0;
    let e = try_start_replica(&a.addr, changed).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let second = start_replica(&a.addr, demo_spec("web-1", 2, Some(0))).await;
    assert_ne!(
        second.pid, first.pid,
        "a higher generation replaces the process"
    );
    assert!(!alive(first.pid), "the old process is gone");
    let e = try_start_replica(&a.addr, demo_spec("web-1", 1, Some(0)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("stale"), "{}", e.message());

    // Stop: SIGTERM, the demo server exits cleanly.
    wait_replica(&a.addr, "web-1", "generation 2 running", |r| {
        r.generation == 2 && r.phase == "running"
    })
    .await;
    let stopped = stop(&a.addr, "web-1", 10_000).await;
    assert_eq!(stopped.phase, "stopped");
    assert_eq!(stopped.pid, 0);
    assert_eq!(stopped.exit_code, Some(0), "{stopped:?}");
    assert!(!alive(second.pid));
    // A late retry of the same start must not bring it back.
    let e = try_start_replica(&a.addr, demo_spec("web-1", 2, Some(0)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let a = standalone("sup-2", &[]);
    wait_serving(&a).await;
    let s = start_replica(
        &a.addr,
        command_spec(
            "stubborn",
            1,
            "sh -c 'trap \"\" TERM; echo ignoring-sigterm; while true; do sleep 0.1; done'",
        ),
    )
    .await;
    assert!(alive(s.pid));
    // Wait until the shell installed its trap (it says so in its log).
    wait_until(DEADLINE, "the trap is set", || async {
        logs(&a.addr, "stubborn", 10)
            .await
            .contains("ignoring-sigterm")
            .then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    let stopped = stop(&a.addr, "stubborn", 700).await;
    let took = started.elapsed();
    assert_eq!(stopped.phase, "stopped");
    assert_eq!(
        stopped.exit_signal,
        Some(9),
        "SIGKILL ended it: {stopped:?}"
    );
    assert!(!alive(s.pid));
    // Not a speed check: it cannot have been killed before the grace ended.
    assert!(took >= Duration::from_millis(700), "stopped after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_process_restarts_with_growing_back_off() {
    let a = standalone("sup-3", &["--restart-backoff", "200ms"]);
    wait_serving(&a).await;
    let first = start_replica(
        &a.addr,
        command_spec("crashy", 1, "sh -c 'echo up; sleep 0.2; exit 3'"),
    )
    .await;
    let after_one = wait_replica(&a.addr, "crashy", "a first restart", |r| r.restarts >= 1).await;
    assert_eq!(after_one.exit_code, Some(3), "{after_one:?}");
    let r = wait_replica(&a.addr, "crashy", "three restarts", |r| {
        r.restarts >= 3 && r.phase == "failed"
    })
    .await;
    assert_eq!(r.exit_code, Some(3));
    assert!(r.reason.contains("exited with code 3"), "{}", r.reason);
    // The delay doubles: restart n waits 200ms × 2^(n-1), as the reason says.
    let expected = format!(
        "restarting in {:?} (restart {})",
        Duration::from_millis(200) * 2u32.pow(r.restarts - 1),
        r.restarts
    );
    assert!(r.reason.contains(&expected), "{} vs {expected}", r.reason);
    // Each restart is a new process.
    let later = wait_replica(&a.addr, "crashy", "a new process", |r| {
        r.pid != 0 && r.pid != first.pid
    })
    .await;
    assert_ne!(later.pid, first.pid);
    stop(&a.addr, "crashy", 1000).await;
}

async fn logs(addr: &str, id: &str, tail: u32) -> String {
    let mut stream = agent(addr)
        .stream_logs(pb::StreamLogsRequest {
            id: id.into(),
            tail: Some(tail),
            follow: false,
        })
        .await
        .expect("stream logs")
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend(chunk.expect("log chunk").data);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_captured_rotated_and_followed() {
    let a = standalone("sup-4", &["--log-max-size", "1MiB", "--log-files", "2"]);
    wait_serving(&a).await;
    // ~2.8 MB of output in lines of 100 bytes, then a tick every 100ms.
    let s = start_replica(
        &a.addr,
        command_spec(
            "chatty",
            1,
            "sh -c 'i=0; while [ $i -lt 28000 ]; do echo line-$i-padding-padding-padding-padding-padding-padding-padding-padding-padding-pad; i=$((i+1)); done; echo to-stderr >&2; while true; do echo tick; sleep 0.1; done'",
        ),
    )
    .await;
    let dir = a.data_dir.join("replicas").join("chatty").join("logs");
    wait_until(DEADLINE, "the log rotated twice", || async {
        (dir.join("replica.log.2").exists() && logs(&a.addr, "chatty", 5).await.contains("tick"))
            .then_some(())
    })
    .await;
    assert!(
        !dir.join("replica.log.3").exists(),
        "only 2 rotated files are kept"
    );
    for f in ["replica.log", "replica.log.1", "replica.log.2"] {
        let len = std::fs::metadata(dir.join(f)).unwrap().len();
        assert!(len <= 1024 * 1024, "{f} is {len} bytes");
    }
    let tail = logs(&a.addr, "chatty", 3000).await;
    assert_eq!(tail.lines().count(), 3000);
    assert!(
        tail.contains("line-27999-"),
        "the last line before the ticks"
    );
    assert!(tail.contains("to-stderr"), "stderr is captured too");

    // Follow: new output arrives on the open stream.
    let mut stream = agent(&a.addr)
        .stream_logs(pb::StreamLogsRequest {
            id: "chatty".into(),
            tail: Some(0),
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let followed = tokio::time::timeout(DEADLINE, async {
        let mut seen = String::new();
        while let Some(chunk) = stream.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk.unwrap().data));
            if seen.matches("tick").count() >= 3 {
                return seen;
            }
        }
        seen
    })
    .await
    .expect("followed output arrives");
    assert!(followed.matches("tick").count() >= 3, "{followed}");
    assert!(alive(s.pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_written_to_cgroups_and_resized_in_place() {
    let root = tempfile::tempdir().unwrap();
    let root_arg = root.path().display().to_string();
    let a = standalone("sup-5", &["--cgroup-root", &root_arg]);
    wait_serving(&a).await;
    let mut spec = demo_spec("limited", 1, Some(0));
    spec.resources = Some(pb::Resources {
        cpu_milli: 1500,
        memory_mib: 512,
        gpus: 1,
        gpu_memory_mib: 20 * 1024,
        gpu_milli: 500,
    });
    let s = start_replica(&a.addr, spec).await;
    assert!(s.limits_enforced, "{s:?}");
    let cg = root.path().join("replica-limited");
    let read = |f: &str| std::fs::read_to_string(cg.join(f)).unwrap_or_default();
    assert_eq!(read("cpu.max"), "150000 100000");
    assert_eq!(read("memory.max"), (512u64 << 20).to_string());
    // The shim joined the cgroup before it started the server (which inherits it).
    let member: u32 = read("cgroup.procs")
        .trim()
        .parse()
        .expect("a pid in cgroup.procs");
    assert!(alive(member));
    assert_eq!(
        std::fs::read_to_string(root.path().join("cgroup.subtree_control")).unwrap(),
        "+cpu +memory"
    );

    // CPU and memory change in place: same process.
    let resized = agent(&a.addr)
        .resize_replica(pb::ResizeReplicaRequest {
            id: "limited".into(),
            generation: 2,
            cpu_milli: 2000,
            memory_mib: 1024,
            gpus: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resized.pid, s.pid, "no restart for CPU and memory");
    assert_eq!(resized.generation, 2);
    assert_eq!(read("cpu.max"), "200000 100000");
    assert_eq!(read("memory.max"), (1024u64 << 20).to_string());

    // Other GPUs mean another process, on those GPUs.
    let moved = agent(&a.addr)
        .resize_replica(pb::ResizeReplicaRequest {
            id: "limited".into(),
            generation: 3,
            cpu_milli: 2000,
            memory_mib: 1024,
            gpus: Some(pb::GpuAssignment {
                indices: vec![1],
                gpu_memory_mib: 20 * 1024,
                gpu_milli: 500,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(moved.pid, s.pid);
    assert_eq!(moved.gpus, [1]);
    assert_eq!(
        environ(moved.pid)
            .get("CUDA_VISIBLE_DEVICES")
            .map(String::as_str),
        Some("1")
    );
    // An older generation is refused.
    let e = agent(&a.addr)
        .resize_replica(pb::ResizeReplicaRequest {
            id: "limited".into(),
            generation: 2,
            cpu_milli: 1000,
            memory_mib: 1024,
            gpus: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_survive_an_agent_sigkill_and_are_readopted() {
    let mut a = standalone("sup-6", &[]);
    wait_serving(&a).await;
    let s = start_replica(&a.addr, demo_spec("survivor", 1, Some(0))).await;
    wait_replica(&a.addr, "survivor", "running", |r| r.phase == "running").await;

    a.kill().unwrap();
    // The data plane does not depend on the agent.
    assert!(alive(s.pid));
    let (code, _) = http_get(s.port, "/health")
        .await
        .expect("serves without its agent");
    assert_eq!(code, 200);
    // Output written while the agent is down is still captured (by the shim).
    http(
        s.port,
        "POST",
        "/v1/completions",
        r#"{"prompt":"while the agent is down"}"#,
    )
    .await
    .expect("completion");

    a.restart().unwrap();
    wait_serving(&a).await;
    let back = wait_replica(&a.addr, "survivor", "running again", |r| {
        r.phase == "running"
    })
    .await;
    assert_eq!(back.pid, s.pid, "re-adopted, not restarted");
    assert_eq!(back.restarts, 0);
    let log = logs(&a.addr, "survivor", 50).await;
    assert!(log.contains("POST /v1/completions 200"), "{log}");

    // Killed while the agent is down: the exit is known afterwards, and it restarts.
    a.kill().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(s.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    a.restart().unwrap();
    wait_serving(&a).await;
    let r = wait_replica(&a.addr, "survivor", "restarted", |r| {
        r.restarts >= 1 && r.pid != 0 && r.pid != s.pid
    })
    .await;
    assert_eq!(r.exit_signal, Some(9), "{r:?}");

    // Killed while the agent watches an adopted run: noticed and restarted too.
    let adopted = wait_replica(&a.addr, "survivor", "running", |r| r.phase == "running").await;
    a.kill().unwrap();
    a.restart().unwrap();
    wait_serving(&a).await;
    wait_replica(&a.addr, "survivor", "re-adopted", |r| {
        r.pid == adopted.pid && r.phase == "running"
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(adopted.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_replica(&a.addr, "survivor", "restarted after a kill", |r| {
        r.pid != 0 && r.pid != adopted.pid
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_are_refused_and_start_nothing() {
    let a = standalone("sup-7", &[]);
    wait_serving(&a).await;
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();

    let mut unknown = demo_spec("bad-1", 1, None);
    unknown.runtime = "onnx".into();
    let mut in_use = demo_spec("bad-2", 1, None);
    in_use.port = u32::from(busy_port);
    let no_gpu = demo_spec("bad-3", 1, Some(5));
    let empty = command_spec("bad-4", 1, "   ");
    let quotes = command_spec("bad-5", 1, "''");
    let mut missing = demo_spec("bad-6", 1, None);
    missing.runtime = "vllm".into();
    let cases = [
        (unknown, tonic::Code::InvalidArgument, "runtime"),
        (in_use, tonic::Code::FailedPrecondition, "in use"),
        (no_gpu, tonic::Code::InvalidArgument, "gpus"),
        (empty, tonic::Code::InvalidArgument, "command"),
        (quotes, tonic::Code::InvalidArgument, "command"),
        (missing, tonic::Code::FailedPrecondition, "vllm"),
    ];
    for (spec, code, says) in cases {
        let id = spec.id.clone();
        let e = try_start_replica(&a.addr, spec).await.expect_err(&id);
        assert_eq!(e.code(), code, "{id}: {}", e.message());
        assert!(e.message().contains(says), "{id}: {}", e.message());
    }
    // A call the control plane meant for another node (a stale address) is refused.
    let e = agent(&a.addr)
        .start_replica(berth_proto::grpc::for_node(
            "some-other-node",
            pb::StartReplicaRequest {
                spec: Some(demo_spec("bad-7", 1, None)),
                placed_at: 0,
            },
        ))
        .await
        .expect_err("meant for another node");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message().contains("sup-7") && e.message().contains("some-other-node"),
        "{}",
        e.message()
    );
    let listed = agent(&a.addr)
        .list_replicas(berth_proto::grpc::for_node(
            "sup-7",
            pb::ListReplicasRequest {},
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.replicas.is_empty(), "{listed:?}");
    let dirs = std::fs::read_dir(a.data_dir.join("replicas"))
        .unwrap()
        .count();
    assert_eq!(dirs, 0, "nothing was created for a refused spec");
    drop(busy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_start_up_errors_are_clear() {
    let bin = berth_cli::local::find_binary("berth-agent").unwrap();
    let run = |args: Vec<String>| {
        let bin = bin.clone();
        async move {
            tokio::time::timeout(
                DEADLINE,
                tokio::process::Command::new(bin).args(args).output(),
            )
            .await
            .expect("berth-agent exits")
            .expect("run berth-agent")
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let base = |extra: &[&str]| {
        let mut v: Vec<String> = ["--node-name", "n1", "--data-dir", &data]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    for (args, says) in [
        (base(&["--simulate-gpus", "lots"]), "simulate_gpus"),
        (base(&["--node-name", "Bad_Name"]), "--node-name"),
        (base(&["--label", "novalue"]), "label"),
        (base(&["--control", "nowhere"]), "HOST:PORT"),
        (
            base(&["--heartbeat-interval", "soon"]),
            "heartbeat_interval",
        ),
        (base(&["--bogus-flag"]), "--bogus-flag"),
    ] {
        let o = run(args.clone()).await;
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
    // One agent per data dir: a second one is refused, naming the dir.
    let first = LocalAgent::start_in(dir.path(), AgentOptions::standalone("n1")).unwrap();
    wait_serving(&first).await;
    let port = berth_cli::local::free_port().unwrap().to_string();
    let o = run(vec![
        "--node-name".into(),
        "n1".into(),
        "--data-dir".into(),
        first.data_dir.display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
    ])
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("in use by another berth-agent"),
        "{}",
        stderr(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_are_checked_by_the_replica_itself() {
    let mut a = standalone("sup-8", &[]);
    wait_serving(&a).await;
    start_replica(&a.addr, demo_spec("gen", 2, None)).await;

    // A stop that names a newer generation leaves it as a tombstone: no
    // start of that generation or older brings the replica back.
    let stopped = agent(&a.addr)
        .stop_replica(pb::StopReplicaRequest {
            id: "gen".into(),
            generation: 5,
            grace_ms: Some(5000),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.phase, "stopped");
    assert_eq!(stopped.generation, 5);
    for g in [3, 5] {
        let e = try_start_replica(&a.addr, demo_spec("gen", g, None))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "generation {g}");
    }
    // A stopped replica is not resized back to life.
    let e = agent(&a.addr)
        .resize_replica(pb::ResizeReplicaRequest {
            id: "gen".into(),
            generation: 6,
            cpu_milli: 1000,
            memory_mib: 512,
            gpus: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("stopped"), "{}", e.message());
    // A newer start does.
    let back = start_replica(&a.addr, demo_spec("gen", 6, None)).await;
    assert!(back.pid > 0 && alive(back.pid));

    // An agent that died while replacing a run (new record saved, old run
    // still going) replaces the old run when it starts again.
    a.kill().unwrap();
    let record = a.data_dir.join("replicas/gen/replica.json");
    let mut r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    r["spec"]["generation"] = 7.into();
    std::fs::write(&record, serde_json::to_vec(&r).unwrap()).unwrap();
    a.restart().unwrap();
    wait_serving(&a).await;
    let replaced = wait_replica(&a.addr, "gen", "the old run replaced", |s| {
        s.pid != 0 && s.pid != back.pid && s.phase == "running"
    })
    .await;
    assert_eq!(replaced.generation, 7);
    assert!(!alive(back.pid), "the old generation's process is gone");
}
