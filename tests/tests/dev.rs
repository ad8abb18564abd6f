//! `berth dev`: brings up a working, secure control plane with the demo
//! model and a node with simulated GPUs; the CLI finds its credentials by
//! itself; SIGTERM (like Ctrl-C) stops it cleanly and removes its temporary
//! data and the credentials it placed.

use std::process::Stdio;

use berth_cli::local::{find_binary, free_port};
use berth_tests::*;
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_serves_the_demo_model_and_cleans_up() {
    let grpc = format!("127.0.0.1:{}", free_port().unwrap());
    let http = format!("127.0.0.1:{}", free_port().unwrap());
    let agent = format!("127.0.0.1:{}", free_port().unwrap());
    // The CLI's config directory, private to this test: `berth dev` puts its
    // credentials there and the CLI finds them with no flag.
    let home = tempfile::tempdir().unwrap();
    let xdg = home.path().display().to_string();
    let cli = |args: &'static [&'static str], grpc: String| {
        let xdg = xdg.clone();
        async move {
            let mut all = vec!["--server", grpc.as_str()];
            all.extend_from_slice(args);
            all.extend(["--output", "json"]);
            let o = berth_command(&all)
                .env("XDG_CONFIG_HOME", &xdg)
                .output()
                .await
                .expect("run berth");
            assert!(o.status.success(), "berth {all:?}: {}", stderr(&o));
            serde_json::from_slice::<serde_json::Value>(&o.stdout).expect("JSON")
        }
    };
    let mut child = tokio::process::Command::new(find_binary("berth").unwrap())
        .args(["dev", "--listen", &grpc, "--http", &http, "--agent", &agent])
        .env("XDG_CONFIG_HOME", &xdg)
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

    let dev_conf = home.path().join("berth").join("dev");
    assert!(dev_conf.is_file(), "berth dev placed the CLI's credentials");
    let models = cli(&["model", "list"], grpc.clone()).await;
    assert_eq!(models[0]["name"], "demo");
    assert_eq!(models[0]["versions"][0]["runtime"], "demo");
    let status = cli(&["cluster", "status"], grpc.clone()).await;
    assert_eq!(status["leader_id"], 1);
    let node = wait_until(DEADLINE, "the dev node is ready", || async {
        let nodes = cli(&["node", "list"], grpc.clone()).await;
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
    let replicas = cli(&["replica", "list"], grpc.clone()).await;
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
    assert!(!dev_conf.exists(), "the dev credentials were removed");
    for pid in pids {
        assert!(
            !alive(pid),
            "replica process {pid} was stopped with berth dev"
        );
    }
}
