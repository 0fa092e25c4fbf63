//! Compiles our own `.proto` files with protox (a pure-Rust protobuf compiler), so building hoard
//! needs no system `protoc`.

use std::path::PathBuf;

/// Replies `hoard invalidate|namespaces|prune-namespaces --json` and `hoard watch` print as JSON:
/// serde derived from the proto, so the JSON has the proto's field names and follows the proto
/// when a field is added.
const SERIALIZED: &[&str] = &[
    ".hoard.admin.v1.InvalidateResponse",
    ".hoard.admin.v1.InvalidatedNamespace",
    ".hoard.admin.v1.ListNamespacesResponse",
    ".hoard.admin.v1.NamespaceInfo",
    ".hoard.admin.v1.PruneNamespacesResponse",
    ".hoard.admin.v1.PrunedNamespace",
    ".hoard.admin.v1.GetProvenanceResponse",
    // `hoard stats --json`'s per-namespace figures.
    ".hoard.admin.v1.NamespaceStats",
    ".hoard.watch.v1.Event",
    // Event.action_digest.
    ".build.bazel.remote.execution.v2.Digest",
];

const PROTOS: &[&str] = &[
    "build/bazel/remote/asset/v1/remote_asset.proto",
    "build/bazel/remote/execution/v2/remote_execution.proto",
    "build/bazel/semver/semver.proto",
    "google/bytestream/bytestream.proto",
    "google/rpc/status.proto",
    "grpc/health/v1/health.proto",
    "hoard/admin/v1/admin.proto",
    "hoard/store/v1/records.proto",
    "hoard/watch/v1/watch.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from("proto");
    println!("cargo:rerun-if-changed=proto");
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    let fds = protox::compile(&files, [&root])?;
    let mut builder = tonic_prost_build::configure()
        // Blob payloads are passed along without copying.
        .bytes(".")
        // An enum field is an i32 in prost; the JSON names the kind.
        .field_attribute(
            ".hoard.watch.v1.Event.kind",
            "#[serde(serialize_with = \"crate::proto::event_kind_name\")]",
        );
    for message in SERIALIZED {
        builder = builder.type_attribute(message, "#[derive(serde::Serialize)]");
    }
    builder.compile_fds(fds)?;
    Ok(())
}
