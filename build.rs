//! Compiles our own `.proto` files with protox (a pure-Rust protobuf compiler), so building hoard
//! needs no system `protoc`.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "build/bazel/remote/execution/v2/remote_execution.proto",
    "build/bazel/semver/semver.proto",
    "google/bytestream/bytestream.proto",
    "google/rpc/status.proto",
    "grpc/health/v1/health.proto",
    "hoard/admin/v1/admin.proto",
    "hoard/watch/v1/watch.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from("proto");
    println!("cargo:rerun-if-changed=proto");
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    let fds = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        // Blob payloads are passed along without copying.
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
