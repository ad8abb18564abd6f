//! `berth`: the admin CLI, the local dev cluster and the benchmarks.

fn main() -> std::process::ExitCode {
    berth_cli::main()
}
