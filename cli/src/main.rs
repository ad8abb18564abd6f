//! `berth`: the admin CLI, the local dev cluster and the benchmarks.

// The same allocator as berth-control: `berth dev` runs the control plane in
// this process, and the benchmarks should not measure glibc malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    berth_cli::main()
}
