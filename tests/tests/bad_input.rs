//! Bad input gets a clear error naming the field and rule, and changes
//! nothing: CLI arguments, the Admin API, config files and start-up flags.

use berth_tests::*;

async fn model_list(server: &str) -> serde_json::Value {
    berth_json(&["--server", server, "model", "list"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_refused_and_change_nothing() {
    let cluster = LocalCluster::start(3, MemberOptions::default())
        .await
        .unwrap();
    let s = cluster.servers();
    let ok = berth(&[
        "--server",
        &s,
        "model",
        "create",
        "llama",
        "--runtime",
        "vllm",
        "--source",
        "/m",
    ])
    .await;
    assert!(ok.status.success(), "{}", stderr(&ok));
    let before = model_list(&s).await;

    // (args, exit code, text the error must contain)
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &[
                "model",
                "create",
                "Bad_Name",
                "--runtime",
                "vllm",
                "--source",
                "/m",
            ],
            1,
            "name \"Bad_Name\" is invalid",
        ),
        (
            &[
                "model",
                "create",
                "x",
                "--runtime",
                "onnx",
                "--source",
                "/m",
            ],
            1,
            "runtime \"onnx\" is invalid: must be one of vllm",
        ),
        (
            &[
                "model",
                "create",
                "x",
                "--runtime",
                "command",
                "--source",
                "/m",
            ],
            1,
            "needs a command template",
        ),
        (
            &[
                "model",
                "create",
                "x",
                "--runtime",
                "vllm",
                "--source",
                "/m",
                "--gpus",
                "17",
            ],
            1,
            "gpus \"17\" is invalid: must be between 0 and 16",
        ),
        (
            &[
                "model",
                "create",
                "x",
                "--runtime",
                "vllm",
                "--source",
                "/m",
                "--gpus",
                "1",
                "--gpu-memory",
                "300GiB",
            ],
            1,
            "gpu_memory_mib",
        ),
        (
            &[
                "model",
                "create",
                "x",
                "--runtime",
                "vllm",
                "--source",
                "/m",
                "--cpu",
                "5000",
            ],
            1,
            "cpu_milli",
        ),
        (
            &[
                "model",
                "create",
                "x",
                "--runtime",
                "vllm",
                "--source",
                "/m",
                "--memory",
                "20GB",
            ],
            2,
            "--memory",
        ),
        (
            &[
                "model",
                "create",
                "x",
                "--runtime",
                "vllm",
                "--source",
                "/m",
                "--label",
                "bad key=x",
            ],
            2,
            "--label",
        ),
        (
            &[
                "model",
                "create",
                "llama",
                "--runtime",
                "vllm",
                "--source",
                "/m",
            ],
            1,
            "model \"llama\" already exists",
        ),
        (
            &[
                "model",
                "version",
                "add",
                "llama",
                "v1",
                "--runtime",
                "vllm",
                "--source",
                "/m",
            ],
            1,
            "model version \"llama:v1\" already exists",
        ),
        (
            &[
                "model",
                "version",
                "add",
                "llama",
                "bad version",
                "--runtime",
                "vllm",
                "--source",
                "/m",
            ],
            1,
            "version \"bad version\" is invalid",
        ),
        (
            &["model", "version", "remove", "llama", "v1"],
            1,
            "last version",
        ),
        (
            &["model", "show", "nosuch"],
            1,
            "model \"nosuch\" does not exist",
        ),
        (&["model", "delete", "nosuch"], 1, "does not exist"),
        (&["model", "create"], 2, "NAME"),
        (&["model", "frobnicate"], 2, "frobnicate"),
    ];
    for (args, code, text) in cases {
        let mut all = vec!["--server", s.as_str()];
        all.extend_from_slice(args);
        let o = berth(&all).await;
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(*code), "berth {args:?}: {err}");
        assert!(err.contains("error:"), "berth {args:?}: {err}");
        assert!(
            err.contains(text),
            "berth {args:?} should say {text:?}: {err}"
        );
    }
    assert_eq!(
        model_list(&s).await,
        before,
        "refused requests changed nothing"
    );

    // JSON output still reports errors on stderr with exit 1.
    let o = berth(&[
        "--server", &s, "--output", "json", "model", "show", "nosuch",
    ])
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).starts_with("error: "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_is_a_clear_error() {
    let port = berth_cli::local::free_port().unwrap();
    let server = format!("127.0.0.1:{port}");
    let fingerprint = "0".repeat(64);
    let o = berth(&[
        "--server",
        &server,
        "--ca-fingerprint",
        &fingerprint,
        "model",
        "list",
    ])
    .await;
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("error:") && err.contains("hint:") && err.contains(&server),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).display().to_string();
    let port = || format!("127.0.0.1:{}", berth_cli::local::free_port().unwrap());

    // Malformed TOML: the message names the file and the line.
    let cfg = dir.path().join("control.toml");
    std::fs::write(
        &cfg,
        "id = 1\nlisten = \"127.0.0.1:7400\"\nelection_timeout = \n",
    )
    .unwrap();
    let o = berth_control(&["--config", cfg.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("control.toml") && err.contains("line 3"),
        "{err}"
    );

    // Unknown key in the file, unknown flag.
    std::fs::write(&cfg, "id = 1\nelection_timeot = \"1s\"\n").unwrap();
    let o = berth_control(&["--config", cfg.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("election_timeot"), "{}", stderr(&o));
    let o = berth_control(&["--frobnicate"]).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--frobnicate"), "{}", stderr(&o));

    // --join where nothing answers.
    let nowhere = port();
    let o = berth_control(&[
        "--id",
        "2",
        "--listen",
        &port(),
        "--data-dir",
        &d("joiner"),
        "--join",
        &nowhere,
        "--join-timeout",
        "1s",
        "--token",
        &format!("berth1.{}.abcdef.{}", "0".repeat(64), "s".repeat(40)),
    ])
    .await;
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("could not join") && err.contains(&nowhere),
        "{err}"
    );

    // No --id on a fresh data dir; no --bootstrap nor --join.
    let o = berth_control(&["--listen", &port(), "--data-dir", &d("noid"), "--bootstrap"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--id is required"), "{}", stderr(&o));
    let o = berth_control(&["--id", "1", "--listen", &port(), "--data-dir", &d("lost")]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--bootstrap"), "{}", stderr(&o));

    // --bootstrap on a data dir that already holds a cluster.
    let mut cluster = LocalCluster::start(1, MemberOptions::default())
        .await
        .unwrap();
    let data_dir = cluster.members[0].data_dir.display().to_string();
    cluster.stop(1).await.unwrap();
    let o = berth_control(&["--listen", &port(), "--data-dir", &data_dir, "--bootstrap"]).await;
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("--bootstrap refused") && err.contains("already holds a cluster"),
        "{err}"
    );
    // ...and the member still starts normally afterwards.
    cluster.restart(1).unwrap();
    cluster.wait_for_leader(DEADLINE).await.unwrap();
}
