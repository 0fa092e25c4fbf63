//! hoard: a remote build cache that speaks Bazel's Remote Execution API v2 over gRPC.
//!
//! Layout (see ARCHITECTURE.md for the full map and its invariants):
//! - [`server`] wires services to a store and runs them until shutdown.
//! - [`service`] holds one thin module per gRPC service: parse, validate, call the store.
//! - [`store`] is the storage interface and its implementations (sled + files by default).
//! - [`digest`], [`resource_name`] and [`namespace`] parse and validate what clients send.
//! - [`compression`] adapts zstd ByteStream transfers to the store's uncompressed blobs.
//! - [`config`] is the TOML configuration; [`error`] the one error type and its gRPC mapping.
//! - [`proto`] is the code generated from `proto/`.
//! - [`cli`] holds the operator subcommands (`hoard stats`, `gc`, `verify`) `main.rs` calls;
//!   [`client`] is how they (and the `hoard-bench` load generator in `bench/`) connect.
//! - [`watch`] is the persisted event log behind the watch stream.
//! - [`connections`] accepts sockets (descriptor back-off, handshake deadline, the TLS
//!   handshake with [`tls`]'s reloadable config); [`layers`] holds the tower layers around every
//!   service; [`metrics`] the instruments they and the services record into (`/metrics`);
//!   [`telemetry`] the logs and the span of each call (OTLP traces).

pub mod asset;
pub mod auth;
pub mod cli;
pub mod client;
pub mod compression;
pub mod config;
pub mod connections;
pub mod digest;
pub mod error;
pub mod hooks;
pub mod instance_name;
pub mod invalidation;
pub mod layers;
pub mod metrics;
pub mod namespace;
pub mod oci;
pub mod ops;
pub mod origin;
pub mod proto;
pub mod resource_name;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod throttle;
pub mod tls;
pub mod upstream;
pub mod watch;
