//! Separate hosts on one machine: a bridge on a /24 the harness owns, and
//! one network namespace per member or agent joined to it by a veth pair.
//! Network faults (partitions as iptables drops inside the namespaces,
//! delay and loss as netem on the bridge side of a host's veth, so the
//! sender's TCP stack cannot see it) act only on addresses inside the
//! subnet. Everything a run creates carries its run id: `teardown` removes
//! it, and `sweep` removes what an interrupted run (a SIGKILLed harness)
//! left behind, found through the run's state file.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// Where the runs' state files live (one per live topology).
pub const STATE_DIR: &str = "/run/berth-faults";
/// Every namespace, bridge and veth name a run makes starts with this.
pub const PREFIX: &str = "bf";

/// One host: a namespace and its address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// The host's name in the run ("m1", "a2").
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Its address on the run's subnet.
    pub ip: Ipv4Addr,
    /// The root-namespace end of its veth pair (on the bridge).
    pub veth: String,
}

impl Host {
    /// Host `i` of run `run`, named `name`.
    fn new(run: &str, subnet: [u8; 3], i: usize, name: &str) -> Self {
        Host {
            name: name.to_string(),
            netns: format!("{PREFIX}{run}-{name}"),
            ip: Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 10 + i as u8),
            veth: format!("{PREFIX}{run}{name}"),
        }
    }
}

/// A run's network: the bridge, the subnet and the hosts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Topology {
    /// The run id (4 hex digits), in every name.
    pub run: String,
    /// The first three octets of the /24.
    pub subnet: [u8; 3],
    /// The bridge's name.
    pub bridge: String,
    /// The hosts, in creation order.
    pub hosts: Vec<Host>,
    /// The harness's process id (a dead owner means the run was interrupted).
    pub owner_pid: u32,
}

/// Runs a command, failing with its stderr.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether this machine can make namespaces (root, iproute2, iptables).
pub fn available() -> Result<(), String> {
    if sh("id", &["-u"]).map(|u| u.trim() != "0").unwrap_or(true) {
        return Err("the fault suite needs root (network namespaces, iptables)".into());
    }
    for tool in ["ip", "iptables", "tc"] {
        if Command::new(tool).arg("-V").output().is_err()
            && Command::new(tool).arg("--version").output().is_err()
        {
            return Err(format!(
                "{tool} is missing (apt-get install iproute2 iptables)"
            ));
        }
    }
    Ok(())
}

impl Topology {
    /// Creates the bridge and `names.len()` hosts on a free /24, writing the
    /// state file first so an interrupted creation is swept too.
    pub fn create(names: &[&str]) -> anyhow::Result<Self> {
        sweep();
        let run = format!("{:04x}", fastrand_u16());
        let subnet = free_subnet()?;
        let topo = Topology {
            bridge: format!("{PREFIX}{run}br"),
            run: run.clone(),
            subnet,
            hosts: names
                .iter()
                .enumerate()
                .map(|(i, n)| Host::new(&run, subnet, i, n))
                .collect(),
            owner_pid: std::process::id(),
        };
        topo.save()?;
        if let Err(e) = topo.build() {
            topo.teardown();
            return Err(e);
        }
        Ok(topo)
    }

    fn state_file(&self) -> PathBuf {
        Path::new(STATE_DIR).join(format!("{}.json", self.run))
    }

    fn save(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(STATE_DIR).with_context(|| format!("create {STATE_DIR}"))?;
        let body = serde_json::to_vec_pretty(self)?;
        berth_common::fsutil::write_atomic(&self.state_file(), &body)
            .with_context(|| format!("write {}", self.state_file().display()))
    }

    /// The bridge's own address (the harness reaches the hosts through it).
    pub fn gateway_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], 1)
    }

    fn build(&self) -> anyhow::Result<()> {
        let br = self.bridge.as_str();
        sh("ip", &["link", "add", br, "type", "bridge"])?;
        sh(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", self.gateway_ip()),
                "dev",
                br,
            ],
        )?;
        sh("ip", &["link", "set", br, "up"])?;
        // Docker sets FORWARD's policy to DROP, and bridged frames pass
        // through it when br_netfilter is loaded: let the bridge forward.
        let mut insert = vec!["-w".to_string(), "-I".into(), "FORWARD".into(), "1".into()];
        insert.extend(self.forward_rule());
        sh(
            "iptables",
            &insert.iter().map(String::as_str).collect::<Vec<_>>(),
        )?;
        for h in &self.hosts {
            self.build_host(h)?;
        }
        Ok(())
    }

    fn build_host(&self, h: &Host) -> anyhow::Result<()> {
        sh("ip", &["netns", "add", &h.netns])?;
        sh(
            "ip",
            &[
                "link", "add", &h.veth, "type", "veth", "peer", "name", "eth0", "netns", &h.netns,
            ],
        )?;
        sh(
            "ip",
            &["link", "set", &h.veth, "master", &self.bridge, "up"],
        )?;
        sh("ip", &["-n", &h.netns, "link", "set", "lo", "up"])?;
        sh(
            "ip",
            &[
                "-n",
                &h.netns,
                "addr",
                "add",
                &format!("{}/24", h.ip),
                "dev",
                "eth0",
            ],
        )?;
        sh("ip", &["-n", &h.netns, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// Adds one more host (a member that joins later).
    pub fn add_host(&mut self, name: &str) -> anyhow::Result<Host> {
        let i = self.hosts.len();
        let h = Host::new(&self.run, self.subnet, i, name);
        self.hosts.push(h.clone());
        self.save()?;
        self.build_host(&h)?;
        Ok(h)
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> anyhow::Result<&Host> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .with_context(|| format!("no host {name} in run {}", self.run))
    }

    /// The FORWARD rule that lets the bridge forward (after -I/-D).
    fn forward_rule(&self) -> Vec<String> {
        [
            "-i",
            &self.bridge,
            "-o",
            &self.bridge,
            "-m",
            "comment",
            "--comment",
            &self.comment(),
            "-j",
            "ACCEPT",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    }

    fn comment(&self) -> String {
        format!("berth-faults-{}", self.run)
    }

    /// Refuses any address outside this run's subnet: a fault must never
    /// touch the machine's own network.
    fn guard(&self, ip: Ipv4Addr) -> anyhow::Result<()> {
        let o = ip.octets();
        if o[..3] != self.subnet || o[3] < 10 {
            bail!(
                "refusing a fault on {ip}: outside the run's hosts ({}.{}.{}.10-254)",
                self.subnet[0],
                self.subnet[1],
                self.subnet[2]
            );
        }
        Ok(())
    }

    fn owned(&self, h: &Host) -> anyhow::Result<()> {
        self.guard(h.ip)?;
        if !h.netns.starts_with(&format!("{PREFIX}{}-", self.run)) {
            bail!("refusing a fault in namespace {}: not this run's", h.netns);
        }
        Ok(())
    }

    /// Drops every packet `to` receives from `from` (one way; TCP between
    /// them stalls both ways, since acknowledgements are lost too).
    pub fn drop_from(&self, to: &Host, from: &Host) -> anyhow::Result<()> {
        self.owned(to)?;
        self.guard(from.ip)?;
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &to.netns,
                "iptables",
                "-w",
                "-A",
                "INPUT",
                "-s",
                &from.ip.to_string(),
                "-j",
                "DROP",
            ],
        )?;
        Ok(())
    }

    /// Cuts every pair of hosts in different groups, both ways.
    pub fn partition(&self, groups: &[Vec<&Host>]) -> anyhow::Result<()> {
        for (i, a) in groups.iter().enumerate() {
            for (j, b) in groups.iter().enumerate() {
                if i == j {
                    continue;
                }
                for ha in a {
                    for hb in b {
                        self.drop_from(ha, hb)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Delays and drops what `host` receives: netem on the bridge end of
    /// its veth, so the loss is on the wire, not reported to the sender.
    /// Kernels built without `sch_netem` (some VM kernels) get the loss
    /// alone, as random drops in the host's INPUT chain; the answer says
    /// which was applied.
    pub fn netem(
        &self,
        host: &Host,
        delay_ms: u32,
        jitter_ms: u32,
        loss_pct: u32,
    ) -> anyhow::Result<String> {
        self.owned(host)?;
        let netem = sh(
            "tc",
            &[
                "qdisc",
                "replace",
                "dev",
                &host.veth,
                "root",
                "netem",
                "delay",
                &format!("{delay_ms}ms"),
                &format!("{jitter_ms}ms"),
                "loss",
                &format!("{loss_pct}%"),
            ],
        );
        match netem {
            Ok(_) => Ok(format!(
                "{delay_ms}±{jitter_ms} ms delay and {loss_pct} % loss (netem)"
            )),
            Err(e) if e.to_string().contains("qdisc kind is unknown") => {
                let p = format!("{:.2}", f64::from(loss_pct.max(5)) / 100.0);
                sh(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &host.netns,
                        "iptables",
                        "-w",
                        "-A",
                        "INPUT",
                        "-s",
                        &format!(
                            "{}.{}.{}.0/24",
                            self.subnet[0], self.subnet[1], self.subnet[2]
                        ),
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        &p,
                        "-j",
                        "DROP",
                    ],
                )?;
                Ok(format!(
                    "{}% loss only (this kernel has no sch_netem, so no delay)",
                    loss_pct.max(5)
                ))
            }
            Err(e) => Err(e),
        }
    }

    /// Whether this kernel has netem (delay faults need it).
    pub fn has_netem() -> bool {
        let out = Command::new("tc")
            .args(["qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms"])
            .output();
        let ok = out.is_ok_and(|o| o.status.success());
        if ok {
            let _ = sh("tc", &["qdisc", "del", "dev", "lo", "root"]);
        }
        ok
    }

    /// Removes every network fault: drops in every namespace, netem on every veth.
    pub fn heal(&self) -> anyhow::Result<()> {
        for h in &self.hosts {
            self.owned(h)?;
            sh(
                "ip",
                &["netns", "exec", &h.netns, "iptables", "-w", "-F", "INPUT"],
            )?;
            // No netem is not an error.
            let _ = sh("tc", &["qdisc", "del", "dev", &h.veth, "root"]);
        }
        Ok(())
    }

    /// A command that runs `program` inside `host`'s namespace (`ip netns
    /// exec` execs it, so the child's pid is the program's).
    pub fn command_in(&self, host: &Host, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &host.netns]).arg(program);
        c
    }

    /// Removes everything this run made, killing what still runs in its
    /// namespaces. Never fails: what cannot be removed shows in `leftovers`.
    pub fn teardown(&self) {
        for h in &self.hosts {
            kill_namespace_processes(&h.netns);
            let _ = sh("ip", &["netns", "del", &h.netns]);
            let _ = sh("ip", &["link", "del", &h.veth]);
        }
        let _ = sh("ip", &["link", "del", &self.bridge]);
        let mut delete = vec!["-w".to_string(), "-D".into(), "FORWARD".into()];
        delete.extend(self.forward_rule());
        let delete: Vec<&str> = delete.iter().map(String::as_str).collect();
        while sh("iptables", &delete).is_ok() {}
        let _ = std::fs::remove_file(self.state_file());
    }

    /// What of this run is still on the machine: namespaces, links, rules,
    /// processes. Empty after a clean teardown.
    pub fn leftovers(&self) -> Vec<String> {
        leftovers_of(&self.run)
    }
}

/// What is left of run `run` (or of every run, with `run` empty).
pub fn leftovers_of(run: &str) -> Vec<String> {
    let mut out = Vec::new();
    let tag = format!("{PREFIX}{run}");
    if let Ok(list) = sh("ip", &["netns", "list"]) {
        for l in list.lines() {
            let name = l.split_whitespace().next().unwrap_or("");
            if name.starts_with(&tag) && is_run_name(name) {
                out.push(format!("namespace {name}"));
                for pid in namespace_pids(name) {
                    out.push(format!("process {pid} in {name}"));
                }
            }
        }
    }
    if let Ok(links) = sh("ip", &["-o", "link", "show"]) {
        for l in links.lines() {
            let name = l
                .split(':')
                .nth(1)
                .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
                .unwrap_or_default();
            if name.starts_with(&tag) && is_run_name(&name) {
                out.push(format!("link {name}"));
            }
        }
    }
    let comment = format!("berth-faults-{run}");
    if let Ok(rules) = sh("iptables", &["-w", "-S", "FORWARD"]) {
        for l in rules.lines().filter(|l| l.contains(&comment)) {
            out.push(format!("iptables rule {l}"));
        }
    }
    let state = Path::new(STATE_DIR);
    if let Ok(entries) = std::fs::read_dir(state) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(run) {
                out.push(format!("state file {}", e.path().display()));
            }
        }
    }
    out
}

/// A run's names are the prefix, 4 hex digits, then the rest.
fn is_run_name(name: &str) -> bool {
    name.strip_prefix(PREFIX)
        .and_then(|r| r.get(..4))
        .is_some_and(|id| id.chars().all(|c| c.is_ascii_hexdigit()))
}

fn namespace_pids(netns: &str) -> Vec<i32> {
    sh("ip", &["netns", "pids", netns])
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn kill_namespace_processes(netns: &str) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    // Processes can fork while we kill (a shim restarting its server): go
    // round until none is left, a bounded number of times.
    for _ in 0..20 {
        let pids = namespace_pids(netns);
        if pids.is_empty() {
            return;
        }
        for p in pids {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Tears down the topologies of runs whose harness is gone (killed, or the
/// machine's last run was interrupted); `all` also takes live ones.
pub fn sweep_runs(all: bool) -> Vec<String> {
    let mut swept = Vec::new();
    let Ok(entries) = std::fs::read_dir(STATE_DIR) else {
        return swept;
    };
    for e in entries.flatten() {
        let Ok(text) = std::fs::read(e.path()) else {
            continue;
        };
        let Ok(topo) = serde_json::from_slice::<Topology>(&text) else {
            let _ = std::fs::remove_file(e.path());
            continue;
        };
        let alive = topo.owner_pid != std::process::id()
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(topo.owner_pid as i32), None)
                .is_ok();
        if all || !alive {
            topo.teardown();
            swept.push(topo.run);
        }
    }
    swept
}

fn sweep() {
    for run in sweep_runs(false) {
        eprintln!("faults: removed what interrupted run {run} left behind");
    }
}

/// A /24 in 10.213.0.0/16 that no interface of this machine uses.
fn free_subnet() -> anyhow::Result<[u8; 3]> {
    let used = sh("ip", &["-4", "-o", "addr", "show"]).unwrap_or_default();
    let start = (std::process::id() % 200) as u8;
    for k in 0..250u16 {
        let third = ((start as u16 + k) % 250) as u8 + 1;
        let needle = format!(" 10.213.{third}.");
        if !used.contains(&needle) {
            return Ok([10, 213, third]);
        }
    }
    bail!("no free /24 in 10.213.0.0/16 for the fault suite")
}

fn fastrand_u16() -> u16 {
    // Distinct runs on one machine differ by pid and time; the id only
    // keeps names apart, it is not part of any schedule.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    ((t ^ std::process::id().wrapping_mul(2_654_435_761)) & 0xffff) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo() -> Topology {
        Topology {
            run: "abcd".into(),
            subnet: [10, 213, 7],
            bridge: "bfabcdbr".into(),
            hosts: vec![Host {
                name: "m1".into(),
                netns: "bfabcd-m1".into(),
                ip: Ipv4Addr::new(10, 213, 7, 10),
                veth: "bfabcdm1".into(),
            }],
            owner_pid: 1,
        }
    }

    #[test]
    fn faults_touch_only_the_runs_hosts() {
        let t = topo();
        assert!(t.guard(Ipv4Addr::new(10, 213, 7, 10)).is_ok());
        let e = t
            .guard(Ipv4Addr::new(10, 213, 8, 10))
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside the run's hosts"), "{e}");
        assert!(
            t.guard(Ipv4Addr::new(10, 213, 7, 1)).is_err(),
            "the bridge itself"
        );
        assert!(t.guard(Ipv4Addr::new(127, 0, 0, 1)).is_err());
        let stranger = Host {
            name: "x".into(),
            netns: "default".into(),
            ip: Ipv4Addr::new(10, 213, 7, 11),
            veth: "eth0".into(),
        };
        assert!(t.owned(&stranger).is_err());
    }

    #[test]
    fn names_fit_in_an_interface_name() {
        let t = topo();
        for h in &t.hosts {
            assert!(h.veth.len() <= 15, "{}", h.veth);
        }
        assert!(t.bridge.len() <= 15);
        assert!(is_run_name("bfabcd-m1"));
        assert!(!is_run_name("bfzz-m1"));
    }
}
