//! Helpers for Berth's end-to-end tests: run the real `berth` CLI, wait on
//! conditions with generous deadlines (never bare sleeps), and talk gRPC to
//! a member. Clusters come from `berth_cli::local::LocalCluster`, which kills
//! its processes on drop.

use std::future::Future;
use std::process::Output;
use std::time::Duration;

use berth_cli::local::find_binary;
use berth_proto::v1::admin_client::AdminClient;
use tokio::time::Instant;
use tonic::transport::Channel;

pub use berth_cli::local::{LocalCluster, MemberOptions};

/// A generous deadline for conditions that should hold within seconds.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Runs the `berth` CLI with `args` and returns its output.
pub async fn berth(args: &[&str]) -> Output {
    let bin = find_binary("berth").expect("berth binary (run `cargo build --bins` first)");
    tokio::process::Command::new(bin)
        .args(args)
        .env_remove("BERTH_SERVER")
        .output()
        .await
        .expect("run berth")
}

/// Runs `berth-control` with `args` to completion (for start-up errors).
pub async fn berth_control(args: &[&str]) -> Output {
    let bin = find_binary("berth-control").expect("berth-control binary");
    tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new(bin).args(args).output(),
    )
    .await
    .expect("berth-control exits")
    .expect("run berth-control")
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs the CLI, asserts it succeeded, and parses its JSON stdout.
pub async fn berth_json(args: &[&str]) -> serde_json::Value {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--output", "json"]);
    let o = berth(&all).await;
    assert!(
        o.status.success(),
        "berth {args:?} failed: {}{}",
        stdout(&o),
        stderr(&o)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("berth {args:?}: bad JSON ({e}): {}", stdout(&o)))
}

/// Polls `condition` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = condition().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A gRPC Admin client for one member.
pub fn admin(addr: &str) -> AdminClient<Channel> {
    AdminClient::new(berth_proto::grpc::channel(addr).expect("channel"))
}

/// Model names on one member, read from its local state (stale read).
pub async fn local_models(addr: &str) -> Option<Vec<String>> {
    let r = admin(addr)
        .list_models(berth_proto::v1::ListModelsRequest { stale: true })
        .await
        .ok()?;
    Some(r.into_inner().models.into_iter().map(|m| m.name).collect())
}
