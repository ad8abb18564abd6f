//! The fault harness's hygiene: its network faults work across real
//! namespaces, and nothing it makes outlives it, whether the run ends,
//! is interrupted (SIGINT), or the harness is SIGKILLed and a later run
//! sweeps up. Needs root, as the suite does (CI runs as root).

use std::process::Stdio;
use std::time::Duration;

use berth_cli::local::find_binary;
use berth_tests::faults::net::{self, Topology, leftovers_of, sh};
use berth_tests::{DEADLINE, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Whether `from`'s namespace reaches `to`'s address on `port` (a TCP
/// connect with a short timeout).
fn reaches(topo: &Topology, from: &str, to: &str, port: u16) -> bool {
    let from = topo.host(from).expect("a host of the topology");
    let to = topo.host(to).expect("a host of the topology");
    std::process::Command::new("ip")
        .args(["netns", "exec", &from.netns, "timeout", "2", "bash", "-c"])
        .arg(format!("exec 3<>/dev/tcp/{}/{port}", to.ip))
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn partitions_cut_and_heal_and_teardown_leaves_nothing() {
    net::available().expect("the fault suite needs root, ip, iptables and tc");
    let topo = Topology::create(&["h1", "h2", "h3"]).unwrap();
    // A listener in h2: a real socket to connect to.
    let h2 = topo.host("h2").unwrap().clone();
    let mut listener = std::process::Command::new("ip")
        .args(["netns", "exec", &h2.netns, "python3", "-c"])
        .arg("import socket,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',7000))\ns.listen(64)\nwhile True:\n  c,_=s.accept()\n  c.close()")
        .spawn()
        .unwrap();
    let ready = std::time::Instant::now() + DEADLINE;
    while !reaches(&topo, "h1", "h2", 7000) {
        assert!(std::time::Instant::now() < ready, "h1 never reached h2");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(reaches(&topo, "h3", "h2", 7000));

    let (h1, h3) = (topo.host("h1").unwrap(), topo.host("h3").unwrap());
    topo.partition(&[vec![h1], vec![&h2, h3]]).unwrap();
    assert!(!reaches(&topo, "h1", "h2", 7000), "h1 is cut off from h2");
    assert!(reaches(&topo, "h3", "h2", 7000), "h3 is on h2's side");
    topo.heal().unwrap();
    assert!(reaches(&topo, "h1", "h2", 7000), "healed");

    // One way: h2 drops what h3 sends; the connection from h3 stalls.
    topo.drop_from(&h2, h3).unwrap();
    assert!(!reaches(&topo, "h3", "h2", 7000));
    assert!(reaches(&topo, "h1", "h2", 7000));
    topo.heal().unwrap();

    // Delay on h2's veth (the bridge side): still reachable, just slower.
    // Without sch_netem in the kernel the fault is loss alone.
    let applied = topo.netem(&h2, 200, 0, 0).unwrap();
    if Topology::has_netem() {
        let t = std::time::Instant::now();
        assert!(reaches(&topo, "h1", "h2", 7000));
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "netem delays h2's inbound packets"
        );
    } else {
        assert!(applied.contains("no sch_netem"), "{applied}");
        let rules = sh(
            "ip",
            &["netns", "exec", &h2.netns, "iptables", "-w", "-S", "INPUT"],
        )
        .unwrap();
        assert!(rules.contains("statistic"), "random drops instead: {rules}");
    }
    topo.heal().unwrap();
    let rules = sh(
        "ip",
        &["netns", "exec", &h2.netns, "iptables", "-w", "-S", "INPUT"],
    )
    .unwrap();
    assert!(!rules.contains("DROP"), "healed: {rules}");

    let run = topo.run.clone();
    assert!(!leftovers_of(&run).is_empty(), "the topology is there");
    topo.teardown();
    let _ = listener.wait();
    let left = leftovers_of(&run);
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The newest run's id from the state files (the run the harness started).
fn running_run() -> Option<String> {
    let entries = std::fs::read_dir(net::STATE_DIR).ok()?;
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let modified = e.metadata().ok()?.modified().ok()?;
            Some((modified, name.strip_suffix(".json")?.to_string()))
        })
        .max()
        .map(|(_, run)| run)
}

/// Starts `berth-faults run` and waits until its cluster's processes run
/// in their namespaces; returns the child and the run id.
async fn start_harness(out: &std::path::Path) -> (tokio::process::Child, String) {
    let bin = find_binary("berth-faults").expect("berth-faults binary");
    let child = tokio::process::Command::new(bin)
        .args([
            "run",
            "--seed",
            "5",
            "--members",
            "3",
            "--agents",
            "1",
            "--events",
            "50",
            "--out",
        ])
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start berth-faults");
    let run = wait_until(DEADLINE, "the harness to start its members", || async {
        let run = running_run()?;
        let pids = sh("ip", &["netns", "pids", &format!("bf{run}-m3")]).ok()?;
        (!pids.trim().is_empty()).then_some(run)
    })
    .await;
    (child, run)
}

#[tokio::test]
async fn an_interrupted_run_cleans_up_after_itself() {
    net::available().expect("the fault suite needs root");
    let out = tempfile::tempdir().unwrap();
    let (mut child, run) = start_harness(out.path()).await;
    kill(Pid::from_raw(child.id().unwrap() as i32), Signal::SIGINT).unwrap();
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(130), "interrupted: exit 130");
    let left = leftovers_of(&run);
    assert!(left.is_empty(), "left behind after SIGINT: {left:?}");
}

#[tokio::test]
async fn a_killed_harness_is_swept_by_the_next_run() {
    net::available().expect("the fault suite needs root");
    let out = tempfile::tempdir().unwrap();
    let (mut child, run) = start_harness(out.path()).await;
    child.kill().await.unwrap();
    let left = leftovers_of(&run);
    assert!(
        left.iter().any(|l| l.starts_with("namespace"))
            && left.iter().any(|l| l.starts_with("process")),
        "a SIGKILLed harness leaves its hosts behind: {left:?}"
    );
    // What the next run does first (and `berth-faults cleanup` does).
    let swept = net::sweep_runs(false);
    assert!(swept.contains(&run), "swept {swept:?}");
    let left = leftovers_of(&run);
    assert!(left.is_empty(), "left behind after the sweep: {left:?}");
}
