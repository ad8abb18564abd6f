//! Generates Berth's gRPC code with protox (no protoc needed) and writes the
//! encoded descriptor set for server reflection.

use std::path::PathBuf;

use prost::Message;

const PROTOS: [&str; 7] = [
    "berth/v1/types.proto",
    "berth/v1/admin.proto",
    "berth/v1/agent.proto",
    "berth/v1/registry.proto",
    "berth/v1/raft.proto",
    "berth/v1/pki.proto",
    "berth/v1/serving.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("berth_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
