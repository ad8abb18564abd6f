//! The monitoring files shipped in deploy/prometheus: the alert rules pass
//! `promtool check rules` and their unit tests (`promtool test rules`,
//! series named as the binaries export them; `gpu_health.rs` checks the
//! exported pages themselves), and the Grafana dashboard is valid JSON whose
//! every panel queries Berth's series.

use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

fn promtool(args: &[&str]) -> std::process::Output {
    let promtool = std::env::var("BERTH_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    std::process::Command::new(&promtool)
        .args(args)
        .current_dir(dir())
        .output()
        .unwrap_or_else(|e| {
            panic!("run {promtool} ({e}): run scripts/promtool.sh once (scripts/test.sh does it)")
        })
}

#[test]
fn the_alert_rules_check_and_pass_their_unit_tests() {
    for args in [
        &["check", "rules", "berth-alerts.yml"][..],
        &["test", "rules", "berth-alerts.test.yml"][..],
    ] {
        let o = promtool(args);
        assert!(
            o.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[test]
fn the_dashboard_is_valid_and_queries_berth_series() {
    let text = std::fs::read_to_string(dir().join("berth-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6, "{} panels", panels.len());
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"].as_array().expect("every panel has targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(expr.contains("berth_"), "panel {}: {expr:?}", p["title"]);
        }
    }
}
