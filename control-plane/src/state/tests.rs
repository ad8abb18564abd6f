//! State-machine tests: data-driven scenarios (`testdata/state/*.txt`,
//! refreshed with `UPDATE_EXPECT=1`), property tests over random command
//! sequences, and encoded fixtures that must stay readable.

use std::collections::BTreeMap;
use std::path::PathBuf;

use berth_common::units::{parse_cpu_milli, parse_size_mib};
use berth_common::{
    DeploymentRequest, GpuDevice, GpuSlice, GpuSource, HealthProbe, Labels, ModelVersionSpec,
    NodeAdmin, NodeInventory, PlacementPolicy, ReplicaIntent, ResourceOverrides, Resources,
    Runtime,
};
use proptest::prelude::*;

use super::*;

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

fn demo_spec(version: &str) -> ModelVersionSpec {
    ModelVersionSpec {
        version: version.into(),
        runtime: Runtime::Demo,
        source: "demo".into(),
        resources: Resources::default(),
        env: BTreeMap::new(),
        health: HealthProbe::Http {
            path: "/health".into(),
        },
        labels: Labels::new(),
    }
}

fn inventory(gpus: u32) -> NodeInventory {
    NodeInventory {
        gpu_source: GpuSource::Simulated {
            spec: format!("{gpus}xA100-80GB"),
        },
        gpus: (0..gpus)
            .map(|i| GpuDevice {
                index: i,
                uuid: format!("GPU-simulated-{i}"),
                model: "A100-80GB".into(),
                memory_mib: 80 * 1024,
                pci_bus_id: String::new(),
                locality: Some(0),
                mig_enabled: false,
            })
            .collect(),
        cpu_model: "test cpu".into(),
        cpu_milli: 16_000,
        memory_mib: 64 * 1024,
        hostname: "host".into(),
        os: "linux".into(),
        cgroups: "unavailable: test".into(),
        agent_version: "0.1.0".into(),
    }
}

fn registration(name: &str, instance: &str, gpus: u32) -> NodeRegistration {
    NodeRegistration {
        name: name.into(),
        addr: "127.0.0.1:7500".into(),
        labels: Labels::new(),
        inventory: inventory(gpus),
        instance: instance.into(),
    }
}

// ---- data-driven scenarios -------------------------------------------------

/// Splits a line into words; `"…"` keeps spaces inside one word.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Builds a version spec from `key=value` words, the way the CLI would.
fn spec_from_args(version: &str, args: &[String]) -> Result<ModelVersionSpec, String> {
    let mut runtime = "demo".to_string();
    let mut command = None;
    let mut spec = demo_spec(version);
    for a in args {
        let (k, v) = a.split_once('=').ok_or(format!("bad arg {a}"))?;
        let e = |e: ValidationError| e.to_string();
        match k {
            "runtime" => runtime = v.to_string(),
            "command" => command = Some(v.to_string()),
            "source" => spec.source = v.to_string(),
            "gpus" => spec.resources.gpus = v.parse().map_err(|_| "gpus")?,
            "gpu_memory" => spec.resources.gpu_memory_mib = parse_size_mib(k, v).map_err(e)?,
            "gpu_milli" => spec.resources.gpu_milli = v.parse().map_err(|_| "gpu_milli")?,
            "cpu" => spec.resources.cpu_milli = parse_cpu_milli(k, v).map_err(e)?,
            "memory" => spec.resources.memory_mib = parse_size_mib(k, v).map_err(e)?,
            "label" => {
                let (lk, lv) = v.split_once('=').ok_or("label needs k=v")?;
                spec.labels.insert(lk.into(), lv.into());
            }
            "env" => {
                let (ek, ev) = v.split_once('=').ok_or("env needs k=v")?;
                spec.env.insert(ek.into(), ev.into());
            }
            _ => return Err(format!("unknown arg {k}")),
        }
    }
    if spec.resources.gpus > 0 && spec.resources.gpu_milli == 0 {
        spec.resources.gpu_milli = 1000;
    }
    spec.runtime = Runtime::parse(&runtime, command.as_deref()).map_err(|e| e.to_string())?;
    Ok(spec)
}

fn render_state(state: &ClusterState) -> String {
    let mut out = String::new();
    for m in state.models.values() {
        out.push_str(&format!("model {} (created {})\n", m.name, m.created_at_ms));
        for v in m.versions.values() {
            let r = &v.spec.resources;
            out.push_str(&format!(
                "  {} runtime={} source={} cpu_milli={} memory_mib={} gpus={} gpu_memory_mib={} gpu_milli={} created={}\n",
                v.spec.version,
                v.spec.runtime,
                v.spec.source,
                r.cpu_milli,
                r.memory_mib,
                r.gpus,
                r.gpu_memory_mib,
                r.gpu_milli,
                v.created_at_ms
            ));
        }
    }
    for n in state.nodes.values() {
        let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!(
            "node {} state={} admin={} epoch={} instance={} addr={} gpus={} labels=[{}] registered={} since={}\n",
            n.name,
            n.state,
            n.admin.as_str(),
            n.epoch,
            n.instance,
            n.addr,
            n.inventory.gpus.len(),
            labels.join(","),
            n.registered_at_ms,
            n.state_since_ms
        ));
    }
    for d in state.deployments.values() {
        let s = &d.spec;
        out.push_str(&format!(
            "deployment {} {}:{} replicas={} revision={} cpu_milli={} memory_mib={} gpus={} gpu_memory_mib={} gpu_milli={} policy={} priority={}{}\n",
            d.name,
            s.model,
            s.version,
            s.replicas,
            d.revision,
            s.resources.cpu_milli,
            s.resources.memory_mib,
            s.resources.gpus,
            s.resources.gpu_memory_mib,
            s.resources.gpu_milli,
            s.policy,
            s.priority,
            d.paused
                .as_ref()
                .map(|p| format!(" paused=({p})"))
                .unwrap_or_default()
        ));
    }
    for r in state.replicas.values() {
        let gpus: Vec<String> = r
            .gpus
            .iter()
            .map(|g| format!("{}:{}:{}", g.index, g.milli, g.memory_mib))
            .collect();
        out.push_str(&format!(
            "replica {} {:?}{} rev={} node={} gpus=[{}] gen={} placed_at={}\n",
            r.id,
            r.intent,
            match (&r.replaces, r.evacuating) {
                (_, true) => " evacuating".to_string(),
                (Some(x), _) => format!(" replaces={x}"),
                _ => String::new(),
            },
            r.revision,
            r.node.as_deref().unwrap_or("-"),
            gpus.join(","),
            r.generation,
            r.placed_at
        ));
    }
    if out.is_empty() {
        out.push_str("(empty)\n");
    }
    out
}

/// `deploy NAME model=M [version=V] [replicas=N] [gpus=N] [gpu_memory=S] [gpu_milli=N] [cpu=C] [memory=S] [priority=P]`
fn deployment_from_args(args: &[String]) -> Result<DeploymentRequest, String> {
    let mut d = DeploymentRequest {
        model: String::new(),
        version: "v1".into(),
        replicas: 1,
        resources: ResourceOverrides::default(),
        policy: PlacementPolicy::Default,
        selector: Labels::new(),
        gpu_model: None,
        priority: 0,
        max_surge: 1,
        max_unavailable: 0,
    };
    for a in args {
        let (k, v) = a.split_once('=').ok_or(format!("bad arg {a}"))?;
        let e = |e: ValidationError| e.to_string();
        match k {
            "model" => d.model = v.into(),
            "version" => d.version = v.into(),
            "replicas" => d.replicas = v.parse().map_err(|_| "replicas")?,
            "gpus" => d.resources.gpus = Some(v.parse().map_err(|_| "gpus")?),
            "gpu_memory" => d.resources.gpu_memory_mib = Some(parse_size_mib(k, v).map_err(e)?),
            "gpu_milli" => d.resources.gpu_milli = Some(v.parse().map_err(|_| "gpu_milli")?),
            "cpu" => d.resources.cpu_milli = Some(parse_cpu_milli(k, v).map_err(e)?),
            "memory" => d.resources.memory_mib = Some(parse_size_mib(k, v).map_err(e)?),
            "priority" => d.priority = v.parse().map_err(|_| "priority")?,
            _ => return Err(format!("unknown arg {k}")),
        }
    }
    Ok(d)
}

/// `gpu=INDEX:MILLI:MEMORY_MIB`
fn gpu_slices(args: &[String]) -> Vec<GpuSlice> {
    args.iter()
        .filter_map(|a| a.strip_prefix("gpu="))
        .map(|g| {
            let p: Vec<u64> = g
                .split(':')
                .map(|n| n.parse().expect("gpu=I:M:MEM"))
                .collect();
            GpuSlice {
                index: p[0] as u32,
                milli: p[1] as u32,
                memory_mib: p[2],
            }
        })
        .collect()
}

fn node_state(text: &str) -> NodeState {
    match text {
        "ready" => NodeState::Ready,
        "down" => NodeState::Down,
        other => panic!("unknown node state {other}"),
    }
}

/// `register-node NAME [instance=I] [addr=A] [gpus=N] [label=k=v]..`
fn registration_from_args(name: &str, args: &[String]) -> Result<NodeRegistration, String> {
    let mut r = registration(name, "i1", 2);
    for a in args {
        let (k, v) = a.split_once('=').ok_or(format!("bad arg {a}"))?;
        match k {
            "instance" => r.instance = v.into(),
            "addr" => r.addr = v.into(),
            "gpus" => r.inventory = inventory(v.parse().map_err(|_| "gpus")?),
            "gpu-index" => {
                let i: u32 = v.parse().map_err(|_| "gpu-index")?;
                if let Some(g) = r.inventory.gpus.first_mut() {
                    g.index = i;
                }
            }
            "label" => {
                let (lk, lv) = v.split_once('=').ok_or("label needs k=v")?;
                r.labels.insert(lk.into(), lv.into());
            }
            _ => return Err(format!("unknown arg {k}")),
        }
    }
    Ok(r)
}

/// Runs one scenario line against `state` and describes what happened.
fn run_line(state: &mut ClusterState, at_ms: u64, line: &str) -> String {
    let w = words(line);
    let (cmd, rest) = w.split_first().expect("scenario line is not empty");
    let command = match cmd.as_str() {
        "state" => return render_state(state),
        "create" => {
            let (name, args) = rest.split_first().expect("create NAME");
            let mut version = "v1".to_string();
            let args: Vec<String> = args
                .iter()
                .filter(|a| match a.strip_prefix("version=") {
                    Some(v) => {
                        version = v.to_string();
                        false
                    }
                    None => true,
                })
                .cloned()
                .collect();
            match spec_from_args(&version, &args) {
                Ok(spec) => Command::CreateModel {
                    name: name.clone(),
                    version: spec,
                },
                Err(e) => return format!("input error: {e}\n"),
            }
        }
        "add-version" => match spec_from_args(&rest[1], &rest[2..]) {
            Ok(spec) => Command::AddModelVersion {
                model: rest[0].clone(),
                version: spec,
            },
            Err(e) => return format!("input error: {e}\n"),
        },
        "remove-version" => Command::RemoveModelVersion {
            model: rest[0].clone(),
            version: rest[1].clone(),
        },
        "delete" => Command::DeleteModel {
            name: rest[0].clone(),
        },
        "register-node" => match registration_from_args(&rest[0], &rest[1..]) {
            Ok(r) => Command::RegisterNode(r),
            Err(e) => return format!("input error: {e}\n"),
        },
        "node-state" => Command::SetNodeState {
            name: rest[0].clone(),
            from: node_state(&rest[1]),
            to: node_state(&rest[2]),
            instance: rest
                .get(3)
                .and_then(|a| a.strip_prefix("instance="))
                .unwrap_or("i1")
                .to_string(),
        },
        "deploy" => match deployment_from_args(&rest[1..]) {
            Ok(request) => Command::CreateDeployment {
                name: rest[0].clone(),
                request,
            },
            Err(e) => return format!("input error: {e}\n"),
        },
        "scale" => Command::ScaleDeployment {
            name: rest[0].clone(),
            replicas: rest[1].parse().expect("scale NAME N"),
        },
        "undeploy" => Command::DeleteDeployment {
            name: rest[0].clone(),
        },
        "bind" => Command::ApplyPlan(vec![PlanBind {
            replica: rest[0].clone(),
            node: rest[1].clone(),
            gpus: gpu_slices(&rest[2..]),
        }]),
        "remove-replica" => Command::RemoveReplica {
            id: rest[0].clone(),
        },
        "replace-lost" => Command::ReplaceLostReplicas {
            node: rest[0].clone(),
        },
        "update" => {
            let mut change = DeploymentChange::default();
            for a in &rest[1..] {
                let (k, v) = a.split_once('=').expect("k=v");
                match k {
                    "version" => change.version = Some(v.into()),
                    "cpu" => change.resources.cpu_milli = Some(parse_cpu_milli(k, v).expect("cpu")),
                    "memory" => {
                        change.resources.memory_mib = Some(parse_size_mib(k, v).expect("memory"))
                    }
                    "gpus" => change.resources.gpus = Some(v.parse().expect("gpus")),
                    "gpu_memory" => {
                        change.resources.gpu_memory_mib = Some(parse_size_mib(k, v).expect("size"))
                    }
                    "surge" => change.max_surge = Some(v.parse().expect("surge")),
                    "unavailable" => change.max_unavailable = Some(v.parse().expect("unavailable")),
                    _ => panic!("unknown update arg {k}"),
                }
            }
            Command::UpdateDeployment {
                name: rest[0].clone(),
                change,
            }
        }
        "rollback" => Command::RollbackDeployment {
            name: rest[0].clone(),
            to: rest.get(1).map(|r| r.parse().expect("a revision")),
        },
        "rollout-add" => Command::RolloutAdd {
            name: rest[0].clone(),
            count: rest[1].parse().expect("a count"),
        },
        "rollout-retire" => Command::RolloutRetire {
            name: rest[0].clone(),
            replicas: rest[1..].to_vec(),
        },
        "pause" => Command::PauseRollout {
            name: rest[0].clone(),
            reason: rest[1..].join(" "),
        },
        "cordon" => Command::SetNodeAdmin {
            name: rest[0].clone(),
            admin: NodeAdmin::Cordoned,
        },
        "drain" => Command::SetNodeAdmin {
            name: rest[0].clone(),
            admin: NodeAdmin::Draining,
        },
        "drained" => Command::SetNodeAdmin {
            name: rest[0].clone(),
            admin: NodeAdmin::Drained,
        },
        "evacuate" => Command::EvacuateReplica {
            id: rest[0].clone(),
        },
        "finish-evacuation" => Command::FinishEvacuation {
            id: rest[0].clone(),
        },
        "replace-failed" => Command::ReplaceFailedReplica {
            id: rest[0].clone(),
            reason: "test".into(),
        },
        "uncordon" => Command::SetNodeAdmin {
            name: rest[0].clone(),
            admin: NodeAdmin::Active,
        },
        other => panic!("unknown scenario command {other}"),
    };
    let before = state.clone();
    match apply(state, Request { at_ms, command }) {
        Ok(Outcome::Model(m)) => format!(
            "ok: model {} versions [{}]\n",
            m.name,
            m.versions.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
        Ok(Outcome::Node(n)) => {
            format!(
                "ok: node {} {} epoch={}\n",
                n.name,
                n.display_state(),
                n.epoch
            )
        }
        Ok(Outcome::Deployment(d)) => {
            let mut ids: Vec<&String> = state
                .replicas
                .values()
                .filter(|r| r.deployment == d.name && r.intent == ReplicaIntent::Run)
                .map(|r| &r.id)
                .collect();
            ids.sort();
            format!(
                "ok: deployment {} {}:{} revision {} replicas [{}]\n",
                d.name,
                d.spec.model,
                d.spec.version,
                d.revision,
                ids.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
        Ok(Outcome::Plan(results)) => results
            .iter()
            .map(|r| match r {
                Ok(()) => "ok: bound\n".to_string(),
                Err(e) => format!("refused: {e}\n"),
            })
            .collect(),
        Ok(o) => format!("ok: {o:?}\n"),
        Err(r) => {
            assert_eq!(&before, state, "a rejected command changed the state");
            format!("rejected: {r}\n")
        }
    }
}

/// Scenario state: the cluster state and the clock the lines advance.
struct Scenario {
    state: ClusterState,
    at_ms: u64,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            state: ClusterState::default(),
            at_ms: 1_000,
        }
    }
}

/// Runs `testdata/state/*.txt`; the invariants are checked after every line.
#[test]
fn scenarios() {
    crate::datadriven::check("state", |s: &mut Scenario, line| {
        let out = run_line(&mut s.state, s.at_ms, line);
        s.at_ms += 1_000;
        check_invariants(&s.state).unwrap();
        out
    });
}

// ---- property tests --------------------------------------------------------

fn arb_spec() -> impl Strategy<Value = ModelVersionSpec> {
    (
        prop::sample::select(vec!["v1", "v2", "v3", "bad version", ""]),
        prop::sample::select(vec!["vllm", "demo", "command", "onnx"]),
        prop::sample::select(vec!["/m/a", "", "hf:org/m"]),
        0u32..20,
        prop::sample::select(vec![0u64, 20 * 1024, 300 * 1024]),
        prop::sample::select(vec![0u32, 500, 1000, 1500]),
        prop::sample::select(vec!["gpu=a100", "bad key!=x", "zone=eu"]),
    )
        .prop_map(|(version, runtime, source, gpus, mem, milli, label)| {
            let (lk, lv) = label.split_once('=').unwrap();
            ModelVersionSpec {
                version: version.into(),
                runtime: Runtime::parse(runtime, Some("srv --port {port}")).unwrap_or(
                    Runtime::Command {
                        template: String::new(),
                    },
                ),
                source: source.into(),
                resources: Resources {
                    cpu_milli: 1000,
                    memory_mib: 1024,
                    gpus,
                    gpu_memory_mib: mem,
                    gpu_milli: milli,
                },
                env: BTreeMap::new(),
                health: HealthProbe::Tcp,
                labels: Labels::from([(lk.to_string(), lv.to_string())]),
            }
        })
}

fn arb_command() -> impl Strategy<Value = Command> {
    prop_oneof![
        6 => arb_single(),
        1 => prop::collection::vec(
            prop_oneof![4 => arb_single(), 1 => Just(Command::Batch(Vec::new()))],
            0..6
        )
        .prop_map(Command::Batch),
    ]
}

fn arb_single() -> impl Strategy<Value = Command> {
    let name = prop::sample::select(vec!["a", "b", "llama", "Bad_Name", ""]);
    let version = prop::sample::select(vec!["v1", "v2", "v3", "v9"]);
    prop_oneof![
        (name.clone(), arb_spec()).prop_map(|(n, s)| Command::CreateModel {
            name: n.into(),
            version: s
        }),
        name.clone()
            .prop_map(|n| Command::DeleteModel { name: n.into() }),
        (name.clone(), arb_spec()).prop_map(|(n, s)| Command::AddModelVersion {
            model: n.into(),
            version: s
        }),
        (name, version).prop_map(|(n, v)| Command::RemoveModelVersion {
            model: n.into(),
            version: v.into()
        }),
        arb_node_command(),
        arb_deployment_command(),
    ]
}

fn arb_deployment_command() -> impl Strategy<Value = Command> {
    let name = prop::sample::select(vec!["d", "e", "Bad_D"]);
    let replica = prop::sample::select(vec!["d-1", "d-2", "d-3", "e-1", "e-4", "x-1"]);
    let node = prop::sample::select(vec!["gpu-1", "gpu-2", "nosuch"]);
    let slice = (
        0u32..3,
        prop::sample::select(vec![500u32, 1000]),
        prop::sample::select(vec![0u64, 20 * 1024, 80 * 1024]),
    )
        .prop_map(|(index, milli, memory_mib)| GpuSlice {
            index,
            milli,
            memory_mib,
        });
    prop_oneof![
        (
            name.clone(),
            0u32..4,
            prop::option::of(0u32..3),
            prop::sample::select(vec!["llama", "a", "nosuch"])
        )
            .prop_map(|(n, replicas, gpus, model)| Command::CreateDeployment {
                name: n.into(),
                request: DeploymentRequest {
                    model: model.into(),
                    version: "v1".into(),
                    replicas,
                    resources: ResourceOverrides {
                        gpus,
                        ..ResourceOverrides::default()
                    },
                    policy: PlacementPolicy::Default,
                    selector: Labels::new(),
                    gpu_model: None,
                    priority: 0,
                    max_surge: 1,
                    max_unavailable: 0,
                },
            }),
        (name.clone(), 0u32..5).prop_map(|(n, replicas)| Command::ScaleDeployment {
            name: n.into(),
            replicas
        }),
        name.clone()
            .prop_map(|n| Command::DeleteDeployment { name: n.into() }),
        (
            name.clone(),
            prop::option::of(prop::sample::select(vec!["v1", "v2", "v9"])),
            prop::option::of(0u32..3),
            prop::option::of(0u32..3)
        )
            .prop_map(|(n, version, gpus, surge)| Command::UpdateDeployment {
                name: n.into(),
                change: DeploymentChange {
                    version: version.map(Into::into),
                    resources: ResourceOverrides {
                        gpus,
                        ..ResourceOverrides::default()
                    },
                    max_surge: surge,
                    max_unavailable: None,
                },
            }),
        (name.clone(), prop::option::of(1u64..5))
            .prop_map(|(n, to)| Command::RollbackDeployment { name: n.into(), to }),
        (name.clone(), 0u32..3).prop_map(|(n, count)| Command::RolloutAdd {
            name: n.into(),
            count,
        }),
        (name.clone(), prop::collection::vec(replica.clone(), 0..3)).prop_map(|(n, rs)| {
            Command::RolloutRetire {
                name: n.into(),
                replicas: rs.into_iter().map(Into::into).collect(),
            }
        }),
        name.prop_map(|n| Command::PauseRollout {
            name: n.into(),
            reason: "test".into(),
        }),
        replica
            .clone()
            .prop_map(|r| Command::EvacuateReplica { id: r.into() }),
        replica
            .clone()
            .prop_map(|r| Command::FinishEvacuation { id: r.into() }),
        replica.clone().prop_map(|r| Command::ReplaceFailedReplica {
            id: r.into(),
            reason: "failing".into(),
        }),
        prop::collection::vec(
            (
                replica.clone(),
                node.clone(),
                prop::collection::vec(slice, 0..3)
            )
                .prop_map(|(r, n, gpus)| PlanBind {
                    replica: r.into(),
                    node: n.into(),
                    gpus,
                }),
            1..4
        )
        .prop_map(Command::ApplyPlan),
        replica.prop_map(|r| Command::RemoveReplica { id: r.into() }),
        node.prop_map(|n| Command::ReplaceLostReplicas { node: n.into() }),
    ]
}

fn arb_node_command() -> impl Strategy<Value = Command> {
    let node = prop::sample::select(vec!["gpu-1", "gpu-2", "Bad_Node"]);
    let instance = prop::sample::select(vec!["i1", "i2", ""]);
    prop_oneof![
        (node.clone(), instance.clone(), 0u32..4, any::<bool>()).prop_map(|(n, i, g, bad)| {
            let mut r = registration(n, i, g);
            if bad && g > 0 {
                r.inventory.gpus[0].memory_mib = 0;
            }
            Command::RegisterNode(r)
        }),
        (node.clone(), 0u8..4).prop_map(|(n, a)| Command::SetNodeAdmin {
            name: n.into(),
            admin: match a {
                0 => NodeAdmin::Active,
                1 => NodeAdmin::Cordoned,
                2 => NodeAdmin::Draining,
                _ => NodeAdmin::Drained,
            },
        }),
        (node.clone(), 0u32..3, any::<bool>()).prop_map(|(n, gpu, release)| {
            if release {
                Command::ReleaseGpu {
                    node: n.into(),
                    gpu,
                }
            } else {
                Command::QuarantineGpu {
                    node: n.into(),
                    gpu,
                    quarantine: berth_common::gpu_health::Quarantine {
                        uuid: format!("GPU-simulated-{gpu}"),
                        reason: "test".into(),
                        by: berth_common::gpu_health::QuarantinedBy::Operator,
                        since_ms: 1,
                        faults: None,
                    },
                }
            }
        }),
        (node, instance, any::<bool>(), any::<bool>()).prop_map(|(n, i, down, from_down)| {
            let state = |d| if d { NodeState::Down } else { NodeState::Ready };
            Command::SetNodeState {
                name: n.into(),
                from: state(from_down),
                to: state(down),
                instance: i.into(),
            }
        }),
    ]
}

fn replay(log: &[Request]) -> (ClusterState, Vec<Result<Outcome, Rejection>>) {
    let mut state = ClusterState::default();
    let results = log.iter().map(|r| apply(&mut state, r.clone())).collect();
    (state, results)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random command sequences never break the invariants, and a rejected
    /// command leaves the state exactly as it was.
    #[test]
    fn invariants_hold(commands in prop::collection::vec(arb_command(), 1..60)) {
        let mut state = ClusterState::default();
        for (i, command) in commands.into_iter().enumerate() {
            let before = state.clone();
            let result = apply(&mut state, Request { at_ms: i as u64, command });
            if result.is_err() {
                prop_assert_eq!(&before, &state);
            }
            prop_assert_eq!(check_invariants(&state), Ok(()));
        }
    }

    /// A batch applies exactly like its commands one after another; a batch
    /// inside a batch is refused on its own.
    #[test]
    fn batch_equals_sequence(
        prefix in prop::collection::vec(arb_single(), 0..20),
        batch in prop::collection::vec(arb_single(), 0..10),
    ) {
        let mut a = ClusterState::default();
        for c in &prefix {
            let _ = apply(&mut a, Request { at_ms: 1, command: c.clone() });
        }
        let mut b = a.clone();
        let singles: Vec<_> = batch
            .iter()
            .map(|c| apply(&mut a, Request { at_ms: 2, command: c.clone() }))
            .collect();
        let mut with_nested = batch.clone();
        with_nested.push(Command::Batch(vec![]));
        let Ok(Outcome::Batch(mut results)) =
            apply(&mut b, Request { at_ms: 2, command: Command::Batch(with_nested) })
        else {
            panic!("a batch always has an outcome");
        };
        prop_assert!(matches!(results.pop(), Some(Err(Rejection::Invalid(_)))));
        prop_assert_eq!(results, singles);
        prop_assert_eq!(a, b);
    }

    /// Applying the same log twice gives the same state and the same answers.
    #[test]
    fn replay_is_deterministic(commands in prop::collection::vec(arb_command(), 1..60)) {
        let log: Vec<Request> = commands
            .into_iter()
            .enumerate()
            .map(|(i, command)| Request { at_ms: 1_000 + i as u64, command })
            .collect();
        let (a, ra) = replay(&log);
        let (b, rb) = replay(&log);
        prop_assert_eq!(a, b);
        prop_assert_eq!(ra, rb);
    }

    /// A snapshot (the encoded state) restored and then fed the rest of the
    /// log gives the same state as the whole log.
    #[test]
    fn snapshot_restores_state(
        commands in prop::collection::vec(arb_command(), 1..60),
        cut in 0usize..60,
    ) {
        let log: Vec<Request> = commands
            .into_iter()
            .enumerate()
            .map(|(i, command)| Request { at_ms: i as u64, command })
            .collect();
        let cut = cut.min(log.len());
        let (prefix, _) = replay(&log[..cut]);
        let bytes = postcard::to_stdvec(&prefix).unwrap();
        let mut restored: ClusterState = postcard::from_bytes(&bytes).unwrap();
        prop_assert_eq!(&restored, &prefix);
        for r in &log[cut..] {
            let _ = apply(&mut restored, r.clone());
        }
        let (whole, _) = replay(&log);
        prop_assert_eq!(restored, whole);
    }
}

// ---- unit tests ------------------------------------------------------------

#[test]
fn create_add_remove_delete() {
    let mut s = ClusterState::default();
    let create = |name: &str| Request {
        at_ms: 5,
        command: Command::CreateModel {
            name: name.into(),
            version: demo_spec("v1"),
        },
    };
    assert!(matches!(apply(&mut s, create("m")), Ok(Outcome::Model(_))));
    assert_eq!(s.models["m"].created_at_ms, 5);
    assert!(matches!(
        apply(&mut s, create("m")),
        Err(Rejection::AlreadyExists {
            kind: ObjectKind::Model,
            ..
        })
    ));
    let add = Request {
        at_ms: 6,
        command: Command::AddModelVersion {
            model: "m".into(),
            version: demo_spec("v2"),
        },
    };
    apply(&mut s, add.clone()).unwrap();
    assert!(matches!(
        apply(&mut s, add),
        Err(Rejection::AlreadyExists {
            kind: ObjectKind::ModelVersion,
            ..
        })
    ));
    let remove = |v: &str| Request {
        at_ms: 7,
        command: Command::RemoveModelVersion {
            model: "m".into(),
            version: v.into(),
        },
    };
    apply(&mut s, remove("v1")).unwrap();
    assert!(matches!(
        apply(&mut s, remove("v2")),
        Err(Rejection::FailedPrecondition(_))
    ));
    let delete = Request {
        at_ms: 8,
        command: Command::DeleteModel { name: "m".into() },
    };
    assert_eq!(apply(&mut s, delete.clone()), Ok(Outcome::Deleted));
    assert!(matches!(
        apply(&mut s, delete),
        Err(Rejection::NotFound { .. })
    ));
    assert!(s.models.is_empty());
}

// ---- fixtures --------------------------------------------------------------

/// One request of every command kind, as a fixed value.
pub(crate) fn fixture_requests() -> Vec<Request> {
    let mut gpu = demo_spec("v2");
    gpu.runtime = Runtime::Command {
        template: "server --port {port} --model {source} --gpus {gpus}".into(),
    };
    gpu.resources = Resources {
        cpu_milli: 4000,
        memory_mib: 32 * 1024,
        gpus: 2,
        gpu_memory_mib: 40 * 1024,
        gpu_milli: 1000,
    };
    gpu.env.insert("HF_HOME".into(), "/data/hf".into());
    gpu.labels.insert("family".into(), "llama".into());
    vec![
        Request {
            at_ms: 1_700_000_000_000,
            command: Command::CreateModel {
                name: "llama".into(),
                version: demo_spec("v1"),
            },
        },
        Request {
            at_ms: 1_700_000_001_000,
            command: Command::AddModelVersion {
                model: "llama".into(),
                version: gpu,
            },
        },
        Request {
            at_ms: 1_700_000_002_000,
            command: Command::RemoveModelVersion {
                model: "llama".into(),
                version: "v1".into(),
            },
        },
        Request {
            at_ms: 1_700_000_003_000,
            command: Command::CreateModel {
                name: "gone".into(),
                version: demo_spec("v1"),
            },
        },
        Request {
            at_ms: 1_700_000_004_000,
            command: Command::DeleteModel {
                name: "gone".into(),
            },
        },
    ]
}

/// Reads a fixture, or writes it when `BERTH_WRITE_FIXTURES=1` (only when
/// adding a new fixture: existing ones must never be rewritten).
pub(crate) fn fixture(name: &str, fresh: &[u8]) -> Vec<u8> {
    let path = testdata().join("fixtures").join(name);
    if std::env::var_os("BERTH_WRITE_FIXTURES").is_some() && !path.exists() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, fresh).unwrap();
    }
    std::fs::read(&path).unwrap_or_else(|e| panic!("read fixture {}: {e}", path.display()))
}

/// Log entries written by earlier versions still decode to the same commands.
#[test]
fn request_fixtures_stay_readable() {
    let requests = fixture_requests();
    let fresh = postcard::to_stdvec(&requests).unwrap();
    let stored = fixture("requests-v1.postcard", &fresh);
    let decoded: Vec<Request> = postcard::from_bytes(&stored).unwrap();
    assert_eq!(decoded, requests);
}

/// A state encoded in snapshot format 1 (models only) still decodes, into
/// the same models and no nodes.
#[test]
fn state_fixture_stays_readable() {
    let (state, _) = replay(&fixture_requests());
    assert_eq!(state.models.len(), 1);
    let fresh = postcard::to_stdvec(&legacy::ClusterStateV1 {
        models: state.models.clone(),
    })
    .unwrap();
    let stored = fixture("state-v1.postcard", &fresh);
    let decoded: legacy::ClusterStateV1 = postcard::from_bytes(&stored).unwrap();
    // Format 1 had no version counter: a converted state starts at 0.
    assert_eq!(
        ClusterState::from(decoded),
        ClusterState {
            version: 0,
            ..state
        }
    );
}

/// Node commands (appended in format 2), one of each kind and transition.
pub(crate) fn fixture_requests_v2() -> Vec<Request> {
    let mut labelled = registration("gpu-1", "a1", 2);
    labelled.labels.insert("zone".into(), "eu-1".into());
    vec![
        Request {
            at_ms: 1_700_000_010_000,
            command: Command::RegisterNode(labelled.clone()),
        },
        Request {
            at_ms: 1_700_000_011_000,
            command: Command::RegisterNode(registration("cpu-1", "c1", 0)),
        },
        Request {
            at_ms: 1_700_000_012_000,
            command: Command::SetNodeState {
                name: "gpu-1".into(),
                from: NodeState::Ready,
                to: NodeState::Down,
                instance: "a1".into(),
            },
        },
        Request {
            at_ms: 1_700_000_013_000,
            command: Command::RegisterNode(NodeRegistration {
                instance: "a2".into(),
                ..labelled
            }),
        },
        Request {
            at_ms: 1_700_000_014_000,
            command: Command::SetNodeState {
                name: "cpu-1".into(),
                from: NodeState::Ready,
                to: NodeState::Down,
                instance: "c1".into(),
            },
        },
        Request {
            at_ms: 1_700_000_015_000,
            command: Command::SetNodeAdmin {
                name: "cpu-1".into(),
                admin: NodeAdmin::Cordoned,
            },
        },
    ]
}

/// Deployment commands (appended in format 2), one of each kind.
pub(crate) fn fixture_requests_v2_deployments() -> Vec<Request> {
    let request = DeploymentRequest {
        model: "llama".into(),
        version: "v2".into(),
        replicas: 2,
        resources: ResourceOverrides {
            gpus: Some(1),
            gpu_memory_mib: Some(20 * 1024),
            ..ResourceOverrides::default()
        },
        policy: PlacementPolicy::Spread,
        selector: Labels::from([("zone".to_string(), "eu-1".to_string())]),
        gpu_model: Some("A100-80GB".into()),
        priority: 10,
        max_surge: 1,
        max_unavailable: 1,
    };
    let at = |i: u64| 1_700_000_020_000 + i * 1000;
    let slice = |index| GpuSlice {
        index,
        milli: 1000,
        memory_mib: 20 * 1024,
    };
    let commands = vec![
        Command::CreateDeployment {
            name: "chat".into(),
            request,
        },
        Command::ApplyPlan(vec![
            PlanBind {
                replica: "chat-1".into(),
                node: "gpu-1".into(),
                gpus: vec![slice(1)],
            },
            PlanBind {
                replica: "chat-2".into(),
                node: "gpu-1".into(),
                gpus: vec![slice(0)],
            },
        ]),
        Command::UpdateDeployment {
            name: "chat".into(),
            change: DeploymentChange {
                resources: ResourceOverrides {
                    cpu_milli: Some(2000),
                    ..ResourceOverrides::default()
                },
                ..DeploymentChange::default()
            },
        },
        Command::AddModelVersion {
            model: "llama".into(),
            version: demo_spec("v3"),
        },
        Command::UpdateDeployment {
            name: "chat".into(),
            change: DeploymentChange {
                version: Some("v3".into()),
                ..DeploymentChange::default()
            },
        },
        Command::RolloutAdd {
            name: "chat".into(),
            count: 1,
        },
        Command::PauseRollout {
            name: "chat".into(),
            reason: "chat-3 failed its health probe".into(),
        },
        Command::RollbackDeployment {
            name: "chat".into(),
            to: None,
        },
        Command::RolloutRetire {
            name: "chat".into(),
            replicas: vec!["chat-3".into()],
        },
        Command::ScaleDeployment {
            name: "chat".into(),
            replicas: 1,
        },
        Command::RemoveReplica {
            id: "chat-2".into(),
        },
        Command::SetNodeState {
            name: "gpu-1".into(),
            from: NodeState::Ready,
            to: NodeState::Down,
            instance: "a2".into(),
        },
        Command::ReplaceLostReplicas {
            node: "gpu-1".into(),
        },
        Command::SetNodeState {
            name: "gpu-1".into(),
            from: NodeState::Down,
            to: NodeState::Ready,
            instance: "a2".into(),
        },
        Command::ApplyPlan(vec![PlanBind {
            replica: "chat-4".into(),
            node: "gpu-1".into(),
            gpus: vec![slice(0)],
        }]),
        Command::SetNodeAdmin {
            name: "gpu-1".into(),
            admin: NodeAdmin::Draining,
        },
        Command::EvacuateReplica {
            id: "chat-4".into(),
        },
        Command::FinishEvacuation {
            id: "chat-4".into(),
        },
        Command::RemoveReplica {
            id: "chat-4".into(),
        },
        Command::DeleteDeployment {
            name: "chat".into(),
        },
        Command::SetNodeAdmin {
            name: "gpu-1".into(),
            admin: NodeAdmin::Drained,
        },
    ];
    commands
        .into_iter()
        .enumerate()
        .map(|(i, command)| Request {
            at_ms: at(i as u64),
            command,
        })
        .collect()
}

/// Node log entries stay readable.
#[test]
fn node_request_fixtures_stay_readable() {
    let mut requests = fixture_requests_v2();
    requests.extend(fixture_requests_v2_deployments());
    let fresh = postcard::to_stdvec(&requests).unwrap();
    let stored = fixture("requests-v2.postcard", &fresh);
    let decoded: Vec<Request> = postcard::from_bytes(&stored).unwrap();
    assert_eq!(decoded, requests);
}

/// A format-2 state (models and nodes) stays readable.
#[test]
fn state_v2_fixture_stays_readable() {
    let mut log = fixture_requests();
    log.extend(fixture_requests_v2());
    log.extend(fixture_requests_v2_deployments());
    let (state, outcomes) = replay(&log);
    let failed: Vec<_> = outcomes.iter().filter(|o| !o.is_ok()).collect();
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(state.version, log.len() as u64);
    assert!(state.deployments.is_empty() && state.replicas.is_empty());
    assert_eq!(state.nodes.len(), 2);
    assert_eq!(state.nodes["gpu-1"].epoch, 2);
    assert_eq!(
        state.nodes["gpu-1"].state,
        NodeState::Ready,
        "lost, then back"
    );
    assert_eq!(state.nodes["gpu-1"].admin, NodeAdmin::Drained);
    assert_eq!(state.nodes["cpu-1"].state, NodeState::Down);
    let fresh = postcard::to_stdvec(&legacy::ClusterStateV2 {
        models: state.models.clone(),
        nodes: state.nodes.clone(),
        deployments: state.deployments.clone(),
        replicas: state.replicas.clone(),
        version: state.version,
    })
    .unwrap();
    let stored = fixture("state-v2.postcard", &fresh);
    // Format 2 had no security ledger: a converted state starts with none.
    let decoded: legacy::ClusterStateV2 = postcard::from_bytes(&stored).unwrap();
    // Nor the ordinals of deleted deployments (format 6).
    let mut expected = state;
    expected.retired_ordinals.clear();
    assert_eq!(ClusterState::from(decoded), expected);
}

/// Security commands (appended in format 3), one of each kind.
pub(crate) fn fixture_requests_v3() -> Vec<Request> {
    use berth_common::security::{IssuedCert, Role, TokenRecord};
    let token = |id: &str, role, uses| TokenRecord {
        id: id.into(),
        role,
        secret_sha256: [0xab; 32],
        created_ms: 1_700_000_100_000,
        expires_ms: Some(1_700_086_400_000),
        uses_left: uses,
        description: "fixture".into(),
    };
    vec![
        Request {
            at_ms: 1_700_000_100_000,
            command: Command::CreateToken(token("admin0", Role::Admin, None)),
        },
        Request {
            at_ms: 1_700_000_101_000,
            command: Command::CreateToken(token("agent0", Role::Agent, Some(2))),
        },
        Request {
            at_ms: 1_700_000_102_000,
            command: Command::IssueCertificate {
                token: Some("agent0".into()),
                cert: IssuedCert {
                    serial: "0a1b2c".into(),
                    identity: "node gpu-1".into(),
                    not_after_ms: 1_702_592_102_000,
                    issued_ms: 1_700_000_102_000,
                    token: None,
                },
            },
        },
        Request {
            at_ms: 1_700_000_103_000,
            command: Command::RevokeToken {
                id: "admin0".into(),
            },
        },
        Request {
            at_ms: 1_700_000_104_000,
            command: Command::RevokeIdentity {
                identity: "member 9".into(),
            },
        },
        Request {
            at_ms: 1_700_000_105_000,
            command: Command::RegisterNode(registration("gone-1", "g1", 0)),
        },
        Request {
            at_ms: 1_700_000_106_000,
            command: Command::RemoveNode {
                name: "gone-1".into(),
                force: false,
            },
        },
        Request {
            at_ms: 1_700_000_107_000,
            command: Command::RevokeIdentity {
                identity: "node gpu-1".into(),
            },
        },
    ]
}

/// Log entries of the security commands, and a state that holds them
/// (snapshot format 3), stay readable.
#[test]
fn security_fixtures_stay_readable() {
    let requests = fixture_requests_v3();
    let fresh = postcard::to_stdvec(&requests).unwrap();
    let stored = fixture("requests-v3.postcard", &fresh);
    let decoded: Vec<Request> = postcard::from_bytes(&stored).unwrap();
    assert_eq!(decoded, requests);
    let (state, results) = replay(&requests);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(state.security.tokens.len(), 1);
    assert_eq!(state.security.tokens["agent0"].uses_left, Some(1));
    assert_eq!(state.security.certificates.len(), 1);
    assert!(state.nodes.is_empty());
    assert_eq!(state.security.revoked.len(), 1);
    assert_eq!(state.security.blocked.len(), 1);
    let stored = fixture("state-v3.postcard", &[]);
    let decoded: legacy::ClusterStateV3 = postcard::from_bytes(&stored).unwrap();
    assert_eq!(ClusterState::from(decoded), state);
}

/// Aliases (appended in format 4): the command's log entry and a state
/// that holds them stay readable; the rules hold.
#[test]
fn alias_fixtures_stay_readable_and_aliases_follow_the_rules() {
    let mut requests = fixture_requests();
    requests.push(Request {
        at_ms: 1_700_000_190_000,
        command: Command::CreateDeployment {
            name: "chat".into(),
            request: deployment_from_args(&[
                "model=llama".into(),
                "version=v2".into(),
                "replicas=0".into(),
            ])
            .expect("a request"),
        },
    });
    requests.push(Request {
        at_ms: 1_700_000_200_000,
        command: Command::SetDeploymentAliases {
            name: "chat".into(),
            aliases: vec!["assistant".into(), "chat-next".into()],
        },
    });
    let fresh = postcard::to_stdvec(&requests).unwrap();
    let stored = fixture("requests-v4.postcard", &fresh);
    let decoded: Vec<Request> = postcard::from_bytes(&stored).unwrap();
    assert_eq!(decoded, requests);
    let (mut state, results) = replay(&requests);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(
        state.aliases.get("assistant").map(String::as_str),
        Some("chat")
    );
    let stored = fixture("state-v4.postcard", &[]);
    let decoded: legacy::ClusterStateV4 = postcard::from_bytes(&stored).unwrap();
    assert_eq!(ClusterState::from(decoded), state);

    let set = |state: &mut ClusterState, name: &str, aliases: &[&str]| {
        apply(
            state,
            Request {
                at_ms: 1_700_000_300_000,
                command: Command::SetDeploymentAliases {
                    name: name.into(),
                    aliases: aliases.iter().map(|a| a.to_string()).collect(),
                },
            },
        )
    };
    let before = state.clone();
    for (aliases, rule) in [
        (vec!["Bad_Name"], "is invalid"),
        (vec!["x", "x"], "given twice"),
        (vec!["chat"], "name of a model or deployment"),
        (vec!["llama"], "name of a model or deployment"),
    ] {
        let e = set(&mut state, "chat", &aliases).expect_err("refused");
        assert!(e.to_string().contains(rule), "{aliases:?}: {e}");
        assert_eq!(state, before, "a refused command changes nothing");
    }
    assert!(set(&mut state, "nope", &["x"]).is_err());
    // Another deployment cannot take it; a new one cannot be named like it.
    let create = |name: &str| Request {
        at_ms: 1_700_000_400_000,
        command: Command::CreateDeployment {
            name: name.into(),
            request: deployment_from_args(&[
                "model=llama".into(),
                "version=v2".into(),
                "replicas=0".into(),
            ])
            .expect("a request"),
        },
    };
    let e = apply(&mut state, create("assistant")).expect_err("an alias's name");
    assert!(e.to_string().contains("alias of deployment"), "{e}");
    apply(&mut state, create("other")).expect("another deployment");
    let e = set(&mut state, "other", &["assistant"]).expect_err("taken");
    assert!(e.to_string().contains("belongs to deployment"), "{e}");
    // Setting replaces; deleting the deployment drops its aliases.
    set(&mut state, "chat", &["assistant"]).expect("replaced");
    assert!(!state.aliases.contains_key("chat-next"));
    apply(
        &mut state,
        Request {
            at_ms: 1_700_000_500_000,
            command: Command::DeleteDeployment {
                name: "chat".into(),
            },
        },
    )
    .expect("deleted");
    assert!(state.aliases.is_empty());
}

fn autoscale_requests() -> Vec<Request> {
    use berth_common::{AutoscalePolicy, AutoscaleTarget};
    use load_times::LoadTimeSample;
    let mut requests = fixture_requests();
    let at = |i: u64| 1_700_000_600_000 + i * 1000;
    let commands = vec![
        Command::CreateDeployment {
            name: "chat".into(),
            request: deployment_from_args(&[
                "model=llama".into(),
                "version=v2".into(),
                "replicas=0".into(),
            ])
            .expect("a request"),
        },
        Command::SetAutoscale {
            name: "chat".into(),
            policy: Some(AutoscalePolicy {
                min: 1,
                max: 4,
                target: AutoscaleTarget::Inflight(4),
                scale_down_delay_ms: 300_000,
                scale_to_zero_after_ms: Some(900_000),
            }),
        },
        Command::Autoscale {
            name: "chat".into(),
            from: 0,
            to: 2,
            prefer: vec![],
            reason: "load 7.5 in flight, target 4 per replica".into(),
        },
        Command::RecordLoadTimes(vec![LoadTimeSample {
            model: "llama".into(),
            node_class: "A100-80GB".into(),
            ms: 42_000,
        }]),
    ];
    requests.extend(
        commands
            .into_iter()
            .enumerate()
            .map(|(i, command)| Request {
                at_ms: at(i as u64),
                command,
            }),
    );
    requests
}

/// Autoscaling and load times (appended in format 5): the commands' log
/// entries and a state that holds them stay readable.
#[test]
fn autoscale_fixtures_stay_readable() {
    let requests = autoscale_requests();
    let fresh = postcard::to_stdvec(&requests).unwrap();
    let stored = fixture("requests-v5.postcard", &fresh);
    let decoded: Vec<Request> = postcard::from_bytes(&stored).unwrap();
    assert_eq!(decoded, requests);
    let (state, results) = replay(&requests);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    // The policy scales to zero, so 0 replicas stayed 0; the decision took it to 2.
    assert_eq!(state.deployments["chat"].spec.replicas, 2);
    assert_eq!(state.load_times["llama"]["A100-80GB"].estimate_ms, 42_000);
    assert_eq!(load_times::estimate_ms(&state, "llama"), Some(42_000));
    let fresh = postcard::to_stdvec(&state).unwrap();
    let stored = fixture("state-v5.postcard", &fresh);
    let decoded: legacy::ClusterStateV5 = postcard::from_bytes(&stored).unwrap();
    assert_eq!(ClusterState::from(decoded), state);
}

/// A deployment deleted and created again under its name numbers its
/// replicas on from where the old one stopped: a replica still being
/// removed keeps its record (and its GPU), and no agent is asked to start
/// an id and generation it already stopped. Found by the fault suite (a
/// re-created deployment's replica overwrote one still stopping, and a
/// second replica was placed on its GPU). The state that holds the retired
/// ordinals (format 6) stays readable.
#[test]
fn a_deployment_created_again_never_reuses_a_replica_id() {
    let mut state = ClusterState::default();
    for r in fixture_requests() {
        let _ = apply(&mut state, r);
    }
    let run = |state: &mut ClusterState, command| {
        apply(
            state,
            Request {
                at_ms: 1_700_000_000_000,
                command,
            },
        )
        .unwrap()
    };
    let first = DeploymentRequest {
        model: "llama".into(),
        version: "v2".into(),
        replicas: 2,
        resources: ResourceOverrides::default(),
        policy: PlacementPolicy::Default,
        selector: Labels::new(),
        gpu_model: None,
        priority: 0,
        max_surge: 1,
        max_unavailable: 0,
    };
    run(
        &mut state,
        Command::CreateDeployment {
            name: "again".into(),
            request: first.clone(),
        },
    );
    let ids = |state: &ClusterState| -> Vec<String> {
        state
            .replicas
            .values()
            .filter(|r| r.deployment == "again")
            .map(|r| r.id.clone())
            .collect()
    };
    assert_eq!(ids(&state), ["again-1", "again-2"]);
    run(
        &mut state,
        Command::DeleteDeployment {
            name: "again".into(),
        },
    );
    run(
        &mut state,
        Command::CreateDeployment {
            name: "again".into(),
            request: first,
        },
    );
    let now = ids(&state);
    assert!(
        !now.iter().any(|id| id == "again-1" || id == "again-2"),
        "{now:?}"
    );
    assert!(now.contains(&"again-3".to_string()), "{now:?}");
    assert!(
        state.retired_ordinals.is_empty(),
        "taken back by the new deployment"
    );
    run(
        &mut state,
        Command::DeleteDeployment {
            name: "again".into(),
        },
    );
    assert_eq!(state.retired_ordinals["again"], 5);
    let fresh = postcard::to_stdvec(&state).unwrap();
    let stored = fixture("state-v6.postcard", &fresh);
    let decoded: legacy::ClusterStateV6 = postcard::from_bytes(&stored).unwrap();
    assert_eq!(ClusterState::from(decoded), state);
}

/// An autoscaled deployment's count belongs to the autoscaler: a person's
/// scale is refused with what to do; a stale or out-of-bounds decision
/// changes nothing; the named idle replica goes first; off hands the count
/// back; deleting the deployment drops the policy.
#[test]
fn the_autoscaler_owns_the_count_of_an_autoscaled_deployment() {
    let (mut state, results) = replay(&autoscale_requests());
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let run = |state: &mut ClusterState, command| {
        apply(
            state,
            Request {
                at_ms: 1_700_000_700_000,
                command,
            },
        )
    };
    let before = state.clone();
    let e = run(
        &mut state,
        Command::ScaleDeployment {
            name: "chat".into(),
            replicas: 3,
        },
    )
    .expect_err("refused");
    assert!(
        e.to_string().contains("berth deploy autoscale chat off"),
        "{e}"
    );
    let mut ids: Vec<String> = state
        .replicas
        .values()
        .filter(|r| r.deployment == "chat")
        .map(|r| r.id.clone())
        .collect();
    ids.sort_by_key(|id| deployments::ordinal(id));
    assert_eq!(ids.len(), 2);
    // Without a preference the newest would go; the oldest is named.
    let oldest = ids[0].clone();
    let decide = |from, to| Command::Autoscale {
        name: "chat".into(),
        from,
        to,
        prefer: vec![oldest.clone()],
        reason: "test".into(),
    };
    let e = run(&mut state, decide(1, 3)).expect_err("stale");
    assert!(e.to_string().contains("stale"), "{e}");
    let e = run(&mut state, decide(2, 5)).expect_err("above max");
    assert!(e.to_string().contains("between 1 and 4"), "{e}");
    assert_eq!(state, before, "refused decisions change nothing");
    // Scale-down removes the preferred replica (pending replicas go at once).
    run(&mut state, decide(2, 1)).expect("down");
    let left: Vec<&String> = state
        .replicas
        .values()
        .filter(|r| r.deployment == "chat")
        .map(|r| &r.id)
        .collect();
    assert_eq!(left, [&ids[1]]);
    let bad = run(
        &mut state,
        Command::SetAutoscale {
            name: "chat".into(),
            policy: Some(berth_common::AutoscalePolicy {
                min: 3,
                max: 2,
                target: berth_common::AutoscaleTarget::Inflight(4),
                scale_down_delay_ms: 0,
                scale_to_zero_after_ms: None,
            }),
        },
    )
    .expect_err("max below min");
    assert!(bad.to_string().contains("max"), "{bad}");
    run(
        &mut state,
        Command::SetAutoscale {
            name: "chat".into(),
            policy: None,
        },
    )
    .expect("off");
    run(
        &mut state,
        Command::ScaleDeployment {
            name: "chat".into(),
            replicas: 3,
        },
    )
    .expect("scaled by hand once autoscaling is off");
    run(
        &mut state,
        Command::SetAutoscale {
            name: "chat".into(),
            policy: before.autoscale.get("chat").cloned(),
        },
    )
    .expect("on again");
    run(
        &mut state,
        Command::DeleteDeployment {
            name: "chat".into(),
        },
    )
    .expect("deleted");
    assert!(state.autoscale.is_empty());
}

/// Batched log entries (appended as a new `Command` variant) stay readable.
#[test]
fn batch_fixture_stays_readable() {
    let commands: Vec<Command> = fixture_requests().into_iter().map(|r| r.command).collect();
    let batch = Request {
        at_ms: 1_700_000_005_000,
        command: Command::Batch(commands),
    };
    let fresh = postcard::to_stdvec(&batch).unwrap();
    let stored = fixture("request-batch-v1.postcard", &fresh);
    let decoded: Request = postcard::from_bytes(&stored).unwrap();
    assert_eq!(decoded, batch);
    let mut state = ClusterState::default();
    let Ok(Outcome::Batch(results)) = apply(&mut state, decoded) else {
        panic!("a batch has a batch outcome");
    };
    assert_eq!(results.len(), 5);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(state.models.len(), 1);
}

/// GPU quarantine (appended in format 7): a quarantined GPU takes no new
/// replica (a stale plan's bind on it is refused, and the scheduler's view
/// leaves it out), its replica moves away like one on a draining node (a
/// replacement first, then the stop), a second quarantine is refused, and a
/// release makes the faults that led to it the baseline. The commands and a
/// state holding a quarantine stay readable.
#[test]
fn a_quarantined_gpu_takes_nothing_new_and_its_replicas_move_away() {
    use berth_common::gpu_health::{GpuFaults, Quarantine, QuarantinedBy};
    let mut requests = fixture_requests();
    requests.push(Request {
        at_ms: 1_700_000_800_000,
        command: Command::RegisterNode(registration("gpu-1", "i1", 2)),
    });
    requests.push(Request {
        at_ms: 1_700_000_801_000,
        command: Command::CreateDeployment {
            name: "chat".into(),
            request: DeploymentRequest {
                model: "llama".into(),
                version: "v2".into(),
                replicas: 1,
                resources: ResourceOverrides {
                    gpus: Some(1),
                    gpu_memory_mib: Some(20 * 1024),
                    ..ResourceOverrides::default()
                },
                policy: PlacementPolicy::Default,
                selector: Labels::new(),
                gpu_model: None,
                priority: 0,
                max_surge: 1,
                max_unavailable: 0,
            },
        },
    });
    let bind = |replica: &str, gpu: u32| PlanBind {
        replica: replica.into(),
        node: "gpu-1".into(),
        gpus: vec![GpuSlice {
            index: gpu,
            milli: 1000,
            memory_mib: 20 * 1024,
        }],
    };
    requests.push(Request {
        at_ms: 1_700_000_802_000,
        command: Command::ApplyPlan(vec![bind("chat-1", 0)]),
    });
    let mut xid79 = GpuFaults::default();
    xid79.record_xid(79);
    let quarantine = Quarantine {
        uuid: "GPU-simulated-0".into(),
        reason: "unhealthy: 1 critical XID events, last XID 79".into(),
        by: QuarantinedBy::Health,
        since_ms: 1_700_000_803_000,
        faults: Some(("i1".into(), xid79)),
    };
    let gpu_commands = vec![
        Command::QuarantineGpu {
            node: "gpu-1".into(),
            gpu: 0,
            quarantine: quarantine.clone(),
        },
        Command::ReleaseGpu {
            node: "gpu-1".into(),
            gpu: 0,
        },
    ];
    let fresh = postcard::to_stdvec(&gpu_commands).unwrap();
    let stored = fixture("requests-v6.postcard", &fresh);
    let decoded: Vec<Command> = postcard::from_bytes(&stored).unwrap();
    assert_eq!(decoded, gpu_commands);

    let (mut state, results) = replay(&requests);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let run = |state: &mut ClusterState, command| {
        let r = apply(
            state,
            Request {
                at_ms: 1_700_000_810_000,
                command,
            },
        );
        check_invariants(state).expect("invariants hold");
        r
    };
    let e = run(
        &mut state,
        Command::EvacuateReplica {
            id: "chat-1".into(),
        },
    )
    .expect_err("nothing to move away from yet");
    assert!(e.to_string().contains("quarantined GPU"), "{e}");
    run(&mut state, gpu_commands[0].clone()).expect("quarantined");
    assert!(gpus::on_quarantined_gpu(&state, &state.replicas["chat-1"]));
    let view = crate::reconciler::placement::cluster(&state, &Default::default());
    let left: Vec<u32> = view.nodes["gpu-1"].gpus.iter().map(|g| g.index).collect();
    assert_eq!(left, [1], "the scheduler does not see the quarantined GPU");
    let e = run(&mut state, gpu_commands[0].clone()).expect_err("already");
    assert!(e.to_string().contains("already quarantined"), "{e}");
    let e = run(
        &mut state,
        Command::QuarantineGpu {
            node: "gpu-1".into(),
            gpu: 7,
            quarantine: quarantine.clone(),
        },
    )
    .expect_err("no such GPU");
    assert!(
        e.to_string().contains("gpu") && e.to_string().contains('7'),
        "{e}"
    );

    run(
        &mut state,
        Command::EvacuateReplica {
            id: "chat-1".into(),
        },
    )
    .expect("moves away");
    let replacement = state
        .replicas
        .values()
        .find(|r| r.replaces.as_deref() == Some("chat-1"))
        .expect("a replacement")
        .id
        .clone();
    let plan = |gpu| Command::ApplyPlan(vec![bind(&replacement, gpu)]);
    match run(&mut state, plan(0)).expect("a plan is an answer") {
        Outcome::Plan(results) => {
            let e = results[0].clone().expect_err("not on the quarantined GPU");
            assert!(e.to_string().contains("quarantined"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    match run(&mut state, plan(1)).expect("a plan is an answer") {
        Outcome::Plan(results) => assert!(results[0].is_ok(), "{results:?}"),
        other => panic!("{other:?}"),
    }
    run(
        &mut state,
        Command::FinishEvacuation {
            id: "chat-1".into(),
        },
    )
    .expect("stops once replaced");
    assert_eq!(state.replicas["chat-1"].intent, ReplicaIntent::Remove);

    let fresh = postcard::to_stdvec(&state).unwrap();
    let stored = fixture("state-v7.postcard", &fresh);
    let decoded: ClusterState = postcard::from_bytes(&stored).unwrap();
    assert_eq!(decoded, state);

    run(&mut state, gpu_commands[1].clone()).expect("released");
    let record = gpus::record(&state, "gpu-1", 0).expect("a record");
    assert!(record.quarantine.is_none());
    assert_eq!(record.baseline_for("i1"), xid79);
    let e = run(&mut state, gpu_commands[1].clone()).expect_err("not quarantined");
    assert!(e.to_string().contains("not quarantined"), "{e}");
    run(
        &mut state,
        Command::RemoveNode {
            name: "gpu-1".into(),
            force: true,
        },
    )
    .expect("removed");
    assert!(
        state.gpus.is_empty(),
        "a removed node's GPU records go with it"
    );
}
