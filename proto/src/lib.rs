//! Everything on the wire: the generated `berth.v1` code, conversions between
//! protobuf and the domain types of `berth-common`, and the one place that
//! builds gRPC servers and channels (`grpc`).
//!
//! A missing or malformed field becomes a `ValidationError` naming the field,
//! which callers turn into `InvalidArgument`.

pub mod auth;
pub mod call_metrics;
pub mod convert;
pub mod grpc;
pub mod pki;
pub mod tls;

/// Generated protobuf and gRPC code for package `berth.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("berth.v1");
}

/// The encoded descriptor set of every Berth proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/berth_descriptor.bin"));
