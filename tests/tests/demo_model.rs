//! `berth demo-model`: a real HTTP model server. Health is 503 while it
//! "loads weights", then 200; it lists its model, completes deterministically,
//! says it is a demo, and refuses bad requests clearly.

use std::process::Stdio;

use berth_cli::local::{find_binary, free_port};
use berth_node_agent::demo_model::ledger::{self, GpuLedgerLine, LedgerEvent};
use berth_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_model_loads_then_serves_deterministic_completions() {
    let port = free_port().unwrap();
    let _server = tokio::process::Command::new(find_binary("berth").unwrap())
        .args([
            "demo-model",
            "--port",
            &port.to_string(),
            "--name",
            "tiny",
            "--load-delay",
            "1s",
        ])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let port = u32::from(port);
    let (code, body) = wait_until(DEADLINE, "the server answers", || async {
        http_get(port, "/health").await
    })
    .await;
    assert_eq!(code, 503, "loading: {body}");
    assert!(body.contains("loading"), "{body}");
    wait_until(DEADLINE, "weights loaded", || async {
        http_get(port, "/health").await.filter(|(c, _)| *c == 200)
    })
    .await;

    let (code, body) = http_get(port, "/v1/models").await.unwrap();
    assert_eq!(code, 200);
    let models: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["demo"], true);

    let complete = |prompt: &'static str| async move {
        let body = format!(r#"{{"model":"tiny","prompt":"{prompt}","max_tokens":6}}"#);
        let (code, body) = http(port, "POST", "/v1/completions", &body).await.unwrap();
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["demo"], true);
        assert_eq!(v["usage"]["completion_tokens"], 6);
        v["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let a = complete("hello berth").await;
    assert_eq!(a.split(' ').count(), 6);
    assert_eq!(complete("hello berth").await, a, "same prompt, same text");
    assert_ne!(complete("hello harbor").await, a);

    let (code, body) = http(port, "POST", "/v1/completions", "not json")
        .await
        .unwrap();
    assert_eq!(code, 400, "{body}");
    let (code, body) = http(port, "POST", "/v1/completions", r#"{"model":"other"}"#)
        .await
        .unwrap();
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("tiny"), "{body}");
}

/// `berth demo-model` on a free port as replica `replica` holding `gpus`,
/// with `ledger` as its GPU ledger (by flag, or by `DEMO_GPU_LEDGER` when
/// `by_env`); its port and the command to start.
fn demo_with_ledger(
    ledger: &std::path::Path,
    replica: &str,
    gpus: &str,
    by_env: bool,
) -> (u32, tokio::process::Command) {
    let port = free_port().expect("a free port");
    let bin = find_binary("berth").expect("berth binary (run `cargo build --bins` first)");
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(["demo-model", "--port", &port.to_string()])
        .env_remove("DEMO_GPU_LEDGER")
        .env("BERTH_GPU_UUIDS", gpus)
        .env("BERTH_REPLICA_ID", replica)
        .env("BERTH_GENERATION", "1")
        .env("BERTH_NODE", "n1")
        .stdout(Stdio::null())
        .kill_on_drop(true);
    if by_env {
        cmd.env("DEMO_GPU_LEDGER", ledger);
    } else {
        cmd.arg("--gpu-ledger").arg(ledger);
    }
    (u32::from(port), cmd)
}

/// Starts `demo_with_ledger`'s command.
fn start_with_ledger(
    ledger: &std::path::Path,
    replica: &str,
    gpus: &str,
    by_env: bool,
) -> (u32, tokio::process::Child) {
    let (port, mut cmd) = demo_with_ledger(ledger, replica, gpus, by_env);
    (port, cmd.spawn().expect("start berth demo-model"))
}

/// The ledger's line for `replica`'s `event`, once written.
async fn ledger_line(dir: &std::path::Path, replica: &str, event: LedgerEvent) -> GpuLedgerLine {
    let path = dir.join(ledger::LEDGER_FILE);
    wait_until(
        DEADLINE,
        &format!("{replica}'s {event:?} line in {}", path.display()),
        || async {
            ledger::read_ledger(&path)
                .ok()?
                .into_iter()
                .find(|l| l.replica == replica && l.event == event)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_ledger_records_double_bookings_and_graceful_stops() {
    let tmp = tempfile::tempdir().unwrap();
    // Not there yet: the first process creates it.
    let dir = tmp.path().join("ledger");

    let (a_port, mut a) = start_with_ledger(&dir, "a", "GPU-x", false);
    let a_start = ledger_line(&dir, "a", LedgerEvent::Start).await;
    assert!(a_start.locked, "{a_start:?}");
    assert_eq!(
        (
            a_start.gpu.as_str(),
            a_start.generation,
            a_start.node.as_str()
        ),
        ("GPU-x", 1, "n1")
    );
    assert_eq!(a_start.pid, a.id().unwrap());

    // Same GPU while a holds it: recorded as a double booking, and b still serves.
    let (b_port, _b) = start_with_ledger(&dir, "b", "GPU-x", true);
    let b_start = ledger_line(&dir, "b", LedgerEvent::Start).await;
    assert!(!b_start.locked, "a holds GPU-x: {b_start:?}");
    wait_until(DEADLINE, "b serves despite the double booking", || async {
        http_get(b_port, "/health").await.filter(|(c, _)| *c == 200)
    })
    .await;

    // Another GPU: locked.
    let (_, _c) = start_with_ledger(&dir, "c", "GPU-y", false);
    let c_start = ledger_line(&dir, "c", LedgerEvent::Start).await;
    assert!(c_start.locked, "{c_start:?}");
    assert_eq!(c_start.gpu, "GPU-y");

    // A graceful stop writes a stop line repeating the start's fields.
    wait_until(DEADLINE, "a serves", || async {
        http_get(a_port, "/health").await.filter(|(c, _)| *c == 200)
    })
    .await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(a.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(DEADLINE, a.wait())
        .await
        .expect("a exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "a exits cleanly: {status}");
    let a_stop = ledger_line(&dir, "a", LedgerEvent::Stop).await;
    assert_eq!(
        a_stop,
        GpuLedgerLine {
            event: LedgerEvent::Stop,
            unix_ms: a_stop.unix_ms,
            ..a_start.clone()
        }
    );
    assert!(a_stop.unix_ms >= a_start.unix_ms);
    let lines = ledger::read_ledger(&dir.join(ledger::LEDGER_FILE)).unwrap();
    assert_eq!(lines.len(), 4, "three starts and a's stop: {lines:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_ledger_that_cannot_be_used_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let bad = file.join("ledger");
    let (_, mut cmd) = demo_with_ledger(&bad, "a", "GPU-x", false);
    let out = tokio::time::timeout(DEADLINE, cmd.output())
        .await
        .expect("it exits")
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("--gpu-ledger"), "{err}");
    assert!(err.contains(&bad.display().to_string()), "{err}");
    assert!(err.contains("Not a directory"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
