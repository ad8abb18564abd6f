//! From a replica spec to a command line and environment: one place that
//! knows how each runtime is started, which executable it needs, and what
//! a replica sees in its environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use berth_common::{ReplicaSpec, Runtime};

/// What a replica process is started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// The whole environment.
    pub env: BTreeMap<String, String>,
}

/// Why a spec cannot be launched on this node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    /// The command template is empty or unparsable.
    #[error("command {0:?} is invalid: {1}")]
    BadCommand(String, String),
    /// The runtime's executable is not installed.
    #[error(
        "runtime {runtime} needs the executable {program:?}, which is not on this node (searched PATH={path}): install it, or use runtime command with a full path"
    )]
    Missing {
        /// The runtime.
        runtime: String,
        /// The program looked for.
        program: String,
        /// The PATH searched.
        path: String,
    },
}

/// Builds the command line and environment for `spec` on `port`.
/// `agent_exe` runs the demo runtime (`berth-agent demo-model`); `node` and
/// the GPUs' uuids and memory go into the environment.
pub fn launch(
    spec: &ReplicaSpec,
    port: u16,
    agent_exe: &Path,
    node: &str,
    gpu_uuids: &[String],
    gpu_memory_mib: u64,
) -> Result<Launch, LaunchError> {
    let p = port.to_string();
    let n = spec.gpus.len().to_string();
    let fraction = format!("{:.2}", spec.gpu_memory_fraction(gpu_memory_mib));
    let threads = spec.resources.cpu_milli.div_ceil(1000).max(1).to_string();
    let gpu_list = spec
        .gpus
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut argv = match &spec.runtime {
        Runtime::Demo => vec![
            agent_exe.display().to_string(),
            "demo-model".into(),
            "--host".into(),
            "0.0.0.0".into(),
            "--port".into(),
            p.clone(),
            "--name".into(),
            spec.model.clone(),
        ],
        Runtime::Vllm => {
            let mut a = s(&[
                "vllm",
                "serve",
                &spec.source,
                "--host",
                "0.0.0.0",
                "--port",
                &p,
                // Clients (and the gateway) name the model as Berth does.
                "--served-model-name",
                &spec.model,
                // On SIGTERM, finish in-flight requests for up to 4 s (its
                // default, 0, aborts them); within the agent's grace.
                "--shutdown-timeout",
                "4",
            ]);
            if !spec.gpus.is_empty() {
                a.extend(s(&[
                    "--tensor-parallel-size",
                    &n,
                    "--gpu-memory-utilization",
                    &fraction,
                ]));
            }
            a
        }
        Runtime::LlamaCpp => {
            let mut a = s(&[
                "llama-server",
                "--model",
                &spec.source,
                "--host",
                "0.0.0.0",
                "--port",
                &p,
                "--alias",
                &spec.model,
                // /metrics, for the queue the gateways weigh.
                "--metrics",
                // As many threads as the replica has cores: its default,
                // every core, spins against its neighbours on a shared node.
                "--threads",
                &threads,
            ]);
            if !spec.gpus.is_empty() {
                a.extend(s(&["--n-gpu-layers", "999"]));
            }
            a
        }
        Runtime::Tgi => {
            let mut a = s(&[
                "text-generation-launcher",
                "--model-id",
                &spec.source,
                "--hostname",
                "0.0.0.0",
                "--port",
                &p,
                // Its default, 90 s, outlasts the agent's stop grace.
                "--graceful-termination-timeout",
                "4",
            ]);
            if spec.gpus.len() > 1 {
                a.extend(s(&["--num-shard", &n]));
            }
            a
        }
        Runtime::Triton => s(&[
            "tritonserver",
            "--model-repository",
            &spec.source,
            "--http-port",
            &p,
            "--allow-grpc",
            "false",
            "--allow-metrics",
            "false",
            "--exit-timeout-secs",
            "4",
        ]),
        Runtime::Sglang => {
            let mut a = s(&[
                "python3",
                "-m",
                "sglang.launch_server",
                "--model-path",
                &spec.source,
                "--host",
                "0.0.0.0",
                "--port",
                &p,
                "--served-model-name",
                &spec.model,
                "--enable-metrics",
            ]);
            if !spec.gpus.is_empty() {
                a.extend(s(&["--tp-size", &n, "--mem-fraction-static", &fraction]));
            }
            a
        }
        Runtime::Command { template } => {
            // Split first, substitute after: a source with spaces or shell
            // characters stays one argument and is never interpreted.
            let words = shell_words::split(template)
                .map_err(|e| LaunchError::BadCommand(template.clone(), e.to_string()))?;
            words
                .into_iter()
                .map(|w| {
                    w.replace("{source}", &spec.source)
                        .replace("{port}", &p)
                        .replace("{gpus}", &gpu_list)
                        .replace("{gpu_memory_fraction}", &fraction)
                })
                .collect()
        }
    };
    if argv.first().is_none_or(|a| a.trim().is_empty()) {
        return Err(LaunchError::BadCommand(
            spec.runtime.template().unwrap_or_default().to_string(),
            "it is empty: give a program to run".into(),
        ));
    }

    // The agent's own environment minus its BERTH_* settings, then the
    // spec's, then what Berth tells every replica.
    let mut env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| !k.starts_with("BERTH_"))
        .collect();
    env.extend(spec.env.clone());
    let visible = if spec.gpus.is_empty() {
        // An empty list hides every GPU from a CPU-only replica.
        (String::new(), "none".to_string())
    } else {
        (gpu_list.clone(), gpu_list.clone())
    };
    env.insert("CUDA_VISIBLE_DEVICES".into(), visible.0);
    env.insert("NVIDIA_VISIBLE_DEVICES".into(), visible.1);
    // NVML numbers GPUs by PCI bus; CUDA, by default, fastest first.
    env.insert("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into());
    env.insert("BERTH_REPLICA_ID".into(), spec.id.clone());
    env.insert("BERTH_GENERATION".into(), spec.generation.to_string());
    env.insert("BERTH_MODEL".into(), spec.model.clone());
    env.insert("BERTH_SOURCE".into(), spec.source.clone());
    env.insert("BERTH_PORT".into(), p);
    env.insert("BERTH_NODE".into(), node.to_string());
    env.insert("BERTH_GPUS".into(), gpu_list);
    env.insert("BERTH_GPU_UUIDS".into(), gpu_uuids.join(","));

    let program = argv[0].clone();
    let path = env.get("PATH").cloned().unwrap_or_default();
    match resolve(&program, &path) {
        Some(full) => argv[0] = full.display().to_string(),
        None => {
            return Err(LaunchError::Missing {
                runtime: spec.runtime.name().to_string(),
                program,
                path,
            });
        }
    }
    Ok(Launch { argv, env })
}

/// Finds an executable: a path with '/' as given, else on PATH.
fn resolve(program: &str, path: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| executable(p))
}

#[cfg(test)]
mod tests {
    use berth_common::{HealthProbe, Resources};

    use super::*;

    fn spec(runtime: Runtime, gpus: Vec<u32>) -> ReplicaSpec {
        ReplicaSpec {
            id: "r1".into(),
            generation: 3,
            model: "llama".into(),
            runtime,
            source: "/models/my model".into(),
            port: 0,
            resources: Resources {
                gpus: gpus.len() as u32,
                gpu_milli: if gpus.is_empty() { 0 } else { 1000 },
                gpu_memory_mib: if gpus.is_empty() { 0 } else { 20 * 1024 },
                ..Resources::default()
            },
            gpus,
            env: BTreeMap::from([("HF_HOME".into(), "/data".into())]),
            health: HealthProbe::Tcp,
        }
    }

    #[test]
    fn command_template_is_split_then_substituted() {
        let s = spec(
            Runtime::Command {
                template: "sh -c 'exec sleep 60' {source} --port {port} --gpus {gpus} --mem {gpu_memory_fraction}".into(),
            },
            vec![0, 1],
        );
        let l = launch(
            &s,
            8000,
            Path::new("/x/berth-agent"),
            "n1",
            &["GPU-a".into(), "GPU-b".into()],
            80 * 1024,
        )
        .unwrap();
        assert!(l.argv[0].ends_with("/sh"), "{:?}", l.argv);
        assert_eq!(
            &l.argv[1..],
            [
                "-c",
                "exec sleep 60",
                "/models/my model",
                "--port",
                "8000",
                "--gpus",
                "0,1",
                "--mem",
                "0.25"
            ]
        );
        assert_eq!(l.env["CUDA_VISIBLE_DEVICES"], "0,1");
        assert_eq!(l.env["NVIDIA_VISIBLE_DEVICES"], "0,1");
        assert_eq!(l.env["BERTH_PORT"], "8000");
        assert_eq!(l.env["BERTH_GPU_UUIDS"], "GPU-a,GPU-b");
        assert_eq!(l.env["BERTH_REPLICA_ID"], "r1");
        assert_eq!(l.env["HF_HOME"], "/data");
    }

    #[test]
    fn cpu_only_replicas_see_no_gpu() {
        let s = spec(
            Runtime::Command {
                template: "sleep 1".into(),
            },
            vec![],
        );
        let l = launch(&s, 1, Path::new("/x"), "n1", &[], 0).unwrap();
        assert_eq!(l.env["CUDA_VISIBLE_DEVICES"], "");
        assert_eq!(l.env["NVIDIA_VISIBLE_DEVICES"], "none");
    }

    #[test]
    fn missing_executables_and_empty_commands_are_refused() {
        let e = launch(
            &spec(Runtime::Vllm, vec![0]),
            1,
            Path::new("/x"),
            "n1",
            &[],
            0,
        )
        .unwrap_err();
        assert!(
            matches!(&e, LaunchError::Missing { program, .. } if program == "vllm"),
            "{e}"
        );
        assert!(e.to_string().contains("runtime vllm"), "{e}");
        let e = launch(
            &spec(
                Runtime::Command {
                    template: "''".into(),
                },
                vec![],
            ),
            1,
            Path::new("/x"),
            "n1",
            &[],
            0,
        )
        .unwrap_err();
        assert!(matches!(e, LaunchError::BadCommand(..)), "{e}");
        let e = launch(
            &spec(
                Runtime::Command {
                    template: "echo 'unclosed".into(),
                },
                vec![],
            ),
            1,
            Path::new("/x"),
            "n1",
            &[],
            0,
        )
        .unwrap_err();
        assert!(matches!(e, LaunchError::BadCommand(..)), "{e}");
    }

    /// The presets' flags, as checked against each server's source (README,
    /// "Runtime presets"); the servers are stand-in files on a PATH here.
    #[test]
    fn presets_pass_the_flags_checked_against_each_server() {
        use std::os::unix::fs::PermissionsExt;
        let bin = tempfile::tempdir().unwrap();
        for program in [
            "vllm",
            "llama-server",
            "text-generation-launcher",
            "tritonserver",
            "python3",
        ] {
            let p = bin.path().join(program);
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let argv = |runtime: Runtime, gpus: Vec<u32>| {
            let mut s = spec(runtime, gpus);
            s.env
                .insert("PATH".into(), bin.path().display().to_string());
            let l = launch(&s, 8000, Path::new("/x"), "n1", &[], 80 * 1024).unwrap();
            l.argv[1..].join(" ")
        };
        let has = |line: &str, flags: &[&str]| {
            for f in flags {
                assert!(line.contains(f), "{f:?} missing from {line:?}");
            }
        };
        has(
            &argv(Runtime::Vllm, vec![0, 1]),
            &[
                "serve /models/my model",
                "--port 8000",
                "--tensor-parallel-size 2",
                "--gpu-memory-utilization 0.25",
                "--served-model-name llama",
                "--shutdown-timeout 4",
            ],
        );
        has(
            &argv(Runtime::LlamaCpp, vec![0]),
            &[
                "--model /models/my model",
                "--alias llama",
                "--metrics",
                "--threads 1",
                "--n-gpu-layers 999",
            ],
        );
        has(
            &argv(Runtime::Tgi, vec![0, 1]),
            &[
                "--hostname 0.0.0.0",
                "--num-shard 2",
                "--graceful-termination-timeout 4",
            ],
        );
        has(
            &argv(Runtime::Sglang, vec![0, 1]),
            &[
                "-m sglang.launch_server",
                "--model-path /models/my model",
                "--served-model-name llama",
                "--enable-metrics",
                "--tp-size 2",
                "--mem-fraction-static 0.25",
            ],
        );
        has(
            &argv(Runtime::Triton, vec![0]),
            &[
                "--model-repository /models/my model",
                "--http-port 8000",
                "--exit-timeout-secs 4",
            ],
        );
    }

    #[test]
    fn demo_runs_the_agent_binary() {
        let exe = std::env::current_exe().unwrap();
        let l = launch(&spec(Runtime::Demo, vec![0]), 9000, &exe, "n1", &[], 0).unwrap();
        assert_eq!(l.argv[0], exe.display().to_string());
        assert_eq!(&l.argv[1..4], ["demo-model", "--host", "0.0.0.0"]);
        assert!(l.argv.contains(&"9000".to_string()));
    }
}
