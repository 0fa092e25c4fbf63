//! gRPC services. Each is thin: parse and validate the request, call the store
//! ([`crate::store::Cas`], [`crate::store::Housekeeping`]) or the namespace policy
//! ([`crate::namespace::ActionResults`]), shape the response. None of them touches sled or files
//! or names a backend.

pub mod action_cache;
pub mod admin;
pub mod asset;
pub mod bytestream;
pub mod bytestream_read;
pub mod capabilities;
pub mod cas;
pub mod cas_routes;
pub mod health;
pub(crate) mod unary;
pub mod watch;

use crate::config::LimitsConfig;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::proto::reapi;

/// Settings every service needs, derived once from the config.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest total blob size of one batch call, as announced in Capabilities.
    pub max_batch_total_size: u64,
    /// Chunk size of ByteStream reads.
    pub read_chunk_size: usize,
    /// Largest blob accepted; `None` for no limit.
    pub max_blob_size: Option<u64>,
    /// Largest gRPC message; also the largest blob read whole to decode it (trees, directories).
    pub max_message_size: u64,
    /// Longest wait for the next message of a ByteStream Write (or for a Read's client).
    pub write_idle_timeout: std::time::Duration,
    /// Slowest transfer allowed, in bytes per second over a `write_idle_timeout` window.
    pub min_transfer_rate: u64,
}

impl Limits {
    /// Refuses blobs above the configured maximum before any of their bytes are stored.
    pub fn check_blob_size(&self, digest: &Digest) -> Result<()> {
        match self.max_blob_size {
            Some(max) if digest.size > max => Err(Error::InvalidArgument(format!(
                "blob {digest} is larger than the {max} bytes this server accepts \
                 (max_cas_blob_size_bytes in GetCapabilities)"
            ))),
            _ => Ok(()),
        }
    }
}

impl From<&LimitsConfig> for Limits {
    fn from(c: &LimitsConfig) -> Self {
        Limits {
            max_batch_total_size: c.max_batch_total_size.0,
            read_chunk_size: c.read_chunk_size.0 as usize,
            max_blob_size: (c.max_blob_size.0 > 0).then_some(c.max_blob_size.0),
            max_message_size: c.max_message_size.0,
            write_idle_timeout: c.write_idle_timeout.0,
            min_transfer_rate: c.min_transfer_rate.0,
        }
    }
}

/// Parses a list of request digests; the error names the field and position of the bad one.
/// (The position is formatted only on error: this runs for thousands of digests per call.)
pub(crate) fn parse_digests(digests: &[reapi::Digest], field: &str) -> Result<Vec<Digest>> {
    // Sized up front: collecting a Result grows the Vec by doubling, a copy per step.
    let mut parsed = Vec::with_capacity(digests.len());
    for (i, d) in digests.iter().enumerate() {
        parsed.push(
            Digest::parse(&d.hash, d.size_bytes)
                .map_err(|e| Error::InvalidArgument(format!("{field}[{i}]: {e}")))?,
        );
    }
    Ok(parsed)
}

/// Total size of the blobs named by `digests`, checked against the batch limit.
pub(crate) fn check_batch_size(total: u64, limits: &Limits, what: &str) -> Result<()> {
    if total > limits.max_batch_total_size {
        return Err(Error::InvalidArgument(format!(
            "{what} totals {total} bytes, above the {} bytes this server allows per batch \
             (max_batch_total_size_bytes in GetCapabilities); use ByteStream for large blobs",
            limits.max_batch_total_size
        )));
    }
    Ok(())
}
