//! `berth-agent`: the node agent (not built yet).

use clap::Parser;

/// Berth node agent (not implemented yet).
#[derive(Debug, Parser)]
#[command(name = "berth-agent", version, about = berth_node_agent::NOT_YET)]
struct Flags {}

fn main() -> std::process::ExitCode {
    let _ = Flags::parse();
    eprintln!("error: {}", berth_node_agent::NOT_YET);
    std::process::ExitCode::FAILURE
}
