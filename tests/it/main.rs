//! Integration tests: every test talks gRPC to a real hoard server on 127.0.0.1.
//! One test binary with modules keeps link time low.

mod action_cache;
mod admin;
mod asset;
mod auth;
mod bytestream;
mod capabilities;
mod cas;
mod check_config;
mod common;
mod compression;
mod crash;
mod eviction;
mod faults;
mod health;
mod hooks;
mod integrity;
mod invalidate;
mod lifecycle;
mod memory;
mod metrics;
mod model;
mod namespaces;
mod oci;
mod ops;
mod otlp;
mod provenance;
mod refused;
mod replica;
mod s3;
mod segments;
mod tls;
mod top;
mod watch;
