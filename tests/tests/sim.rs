//! `berth sim` from the command line: exact JSON keys, and malformed traces
//! refused with file, line and column.

use berth_tests::*;

const KEYS: [&str; 12] = [
    "tasks",
    "placed",
    "never_placed",
    "preemptions",
    "gpu_alloc_ratio_mean",
    "gpu_alloc_ratio_peak",
    "gpu_alloc_ratio_final",
    "queue_wait_p50_s",
    "queue_wait_p99_s",
    "decision_us_p50",
    "decision_us_p99",
    "wall_s",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_generates_replays_and_refuses_bad_traces() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().display().to_string();
    let o = berth(&[
        "sim",
        "generate",
        "--nodes",
        "12",
        "--gpus-per-node",
        "4",
        "--tasks",
        "200",
        "--seed",
        "3",
        "--out",
        &out,
    ])
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let cluster = dir.path().join("cluster.csv").display().to_string();
    let workload = dir.path().join("workload.csv").display().to_string();
    for extra in [
        &[][..],
        &["--no-departures", "--policy", "first-fit"][..],
        &["--preemption", "--queue", "smallest-first"][..],
    ] {
        let mut args = vec!["sim", "--cluster", &cluster, "--workload", &workload];
        args.extend_from_slice(extra);
        let report = berth_json(&args).await;
        let keys: Vec<&str> = report
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut want = KEYS.to_vec();
        want.sort_unstable();
        let mut got = keys.clone();
        got.sort_unstable();
        assert_eq!(got, want, "exactly the documented keys");
        assert_eq!(report["tasks"], 200);
    }

    // A negative size on line 3: exit 1, and the message says where.
    let text = std::fs::read_to_string(dir.path().join("workload.csv")).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let mut cells: Vec<String> = lines[2].split(',').map(String::from).collect();
    cells[4] = "-512".into();
    lines[2] = cells.join(",");
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, lines.join("\n")).unwrap();
    let o = berth(&[
        "sim",
        "--cluster",
        &cluster,
        "--workload",
        bad.to_str().unwrap(),
    ])
    .await;
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("bad.csv: line 3, column 5 (memory_mib)") && err.contains("negative"),
        "{err}"
    );

    // Missing flags are a usage error.
    let o = berth(&["sim", "--cluster", &cluster]).await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}
