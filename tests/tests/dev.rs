//! `berth dev`: brings up a working control plane with the demo model and a
//! node with simulated GPUs, and SIGTERM (like Ctrl-C) stops it cleanly and
//! removes its temporary data.

use std::process::Stdio;

use berth_cli::local::{find_binary, free_port};
use berth_tests::*;
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_serves_the_demo_model_and_cleans_up() {
    let grpc = format!("127.0.0.1:{}", free_port().unwrap());
    let http = format!("127.0.0.1:{}", free_port().unwrap());
    let agent = format!("127.0.0.1:{}", free_port().unwrap());
    let mut child = tokio::process::Command::new(find_binary("berth").unwrap())
        .args(["dev", "--listen", &grpc, "--http", &http, "--agent", &agent])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut data_dir = None;
    let mut printed = Vec::new();
    let ready = tokio::time::timeout(DEADLINE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            printed.push(line.clone());
            if let Some(rest) = line.strip_prefix("data dir: ") {
                data_dir = rest.split(" (").next().map(std::path::PathBuf::from);
            }
            if line.starts_with("Ctrl-C stops everything") {
                return;
            }
        }
        panic!("berth dev exited before it was ready");
    })
    .await;
    assert!(ready.is_ok(), "berth dev did not become ready");
    let data_dir = data_dir.expect("berth dev prints its data dir");
    assert!(data_dir.join("member.toml").exists());

    let models = berth_json(&["--server", &grpc, "model", "list"]).await;
    assert_eq!(models[0]["name"], "demo");
    assert_eq!(models[0]["versions"][0]["runtime"], "demo");
    let status = berth_json(&["--server", &grpc, "cluster", "status"]).await;
    assert_eq!(status["leader_id"], 1);
    let node = wait_until(DEADLINE, "the dev node is ready", || async {
        let nodes = berth_json(&["--server", &grpc, "node", "list"]).await;
        nodes
            .as_array()
            .and_then(|n| n.first())
            .filter(|n| n["state"] == "ready")
            .cloned()
    })
    .await;
    assert_eq!(node["name"], "dev-node");
    assert_eq!(node["simulated"], true);
    assert_eq!(node["gpus"], 2);
    // Two demo replicas run and answer (dev printed their endpoints once they ran).
    let replicas = berth_json(&["--server", &grpc, "replica", "list"]).await;
    let replicas = replicas.as_array().expect("a list");
    assert_eq!(replicas.len(), 2, "{replicas:?}");
    let mut pids = Vec::new();
    for r in replicas {
        assert_eq!(r["phase"], "running", "{r}");
        let port = r["port"].as_u64().unwrap() as u32;
        let (code, body) = berth_tests::http(port, "POST", "/v1/completions", r#"{"prompt":"hi"}"#)
            .await
            .expect("the replica answers");
        assert_eq!(code, 200, "{body}");
        pids.push(r["pid"].as_u64().unwrap() as u32);
    }
    assert!(
        printed.iter().any(|l| l.contains("/v1/completions")),
        "{printed:?}"
    );

    let pid = child.id().expect("running") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "berth dev exited with {status}");
    assert!(
        !data_dir.exists(),
        "temporary data dir {} was removed",
        data_dir.display()
    );
    for pid in pids {
        assert!(
            !alive(pid),
            "replica process {pid} was stopped with berth dev"
        );
    }
}
