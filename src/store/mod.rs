//! Storage behind every service: the [`Store`] trait and its implementations.
//!
//! Services talk only to `Arc<dyn Store>`; they never see sled or files. A store verifies every CAS
//! write (hash and size, exactly once) before the blob becomes visible, and always holds the empty
//! blob. The action cache is keyed by (instance name, action digest) and holds the encoded
//! `ActionResult` as given.

pub mod chunk_sums;
pub mod files;
pub mod index;
pub mod sled;

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

use crate::digest::Digest;
use crate::error::Result;

/// A blob's bytes as a stream of chunks.
pub type BlobStream = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;

/// What a cache backend must provide. Object safe, so decorators and backends can be stacked.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The subset of `digests` that is not stored, in request order. Never includes the empty blob.
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>>;

    /// A whole blob, for batch reads of small blobs; `None` if not stored.
    async fn get(&self, digest: &Digest) -> Result<Option<Bytes>>;

    /// Stores a whole blob after checking that `data` matches `digest`.
    async fn put(&self, digest: &Digest, data: Bytes) -> Result<()>;

    /// Streams `limit` bytes (all if `None`) of a blob from `offset`, in chunks of at most
    /// `chunk_size`; `None` if not stored. The caller has checked `offset <= digest.size`.
    async fn read(
        &self,
        digest: &Digest,
        offset: u64,
        limit: Option<u64>,
        chunk_size: usize,
    ) -> Result<Option<BlobStream>>;

    /// Starts an upload of `digest`, or resumes `upload_id` at `offset` if that many bytes of it
    /// are already persisted. `offset` 0 always starts afresh.
    async fn begin_upload(
        &self,
        upload_id: &str,
        digest: &Digest,
        offset: u64,
    ) -> Result<Box<dyn Upload>>;

    /// Bytes persisted so far for an unfinished upload, if the store knows of it.
    async fn upload_progress(&self, upload_id: &str, digest: &Digest) -> Result<Option<u64>>;

    /// The encoded `ActionResult` stored for an action in an instance.
    async fn get_action_result(&self, instance: &str, action: &Digest) -> Result<Option<Bytes>>;

    /// Stores an encoded `ActionResult` for an action in an instance, replacing any earlier one.
    async fn put_action_result(&self, instance: &str, action: &Digest, result: Bytes)
        -> Result<()>;

    /// Deletes partial uploads nobody has written to for `max_age`; returns how many.
    async fn remove_abandoned_uploads(&self, max_age: Duration) -> Result<usize>;

    /// Makes everything written so far durable (called on shutdown).
    async fn flush(&self) -> Result<()>;

    /// Sizes, counts and hit rates, for `hoard stats`.
    async fn stats(&self) -> Result<StoreStats>;

    /// Evicts least-recently-used blobs (never one used within the retention period) until the
    /// stored bytes are at most `target` (the low watermark if `None`), and drops expired action
    /// results.
    async fn gc(&self, target: Option<u64>) -> Result<GcReport>;

    /// Re-hashes every stored blob, removes the ones that do not match their digest, and
    /// removes data no index entry names (left by a crash).
    async fn verify(&self) -> Result<VerifyReport>;

    /// Background upkeep for as long as the server runs: the cleanup pass after a crash,
    /// eviction between the watermarks, persisting last-use times, expiring action results.
    /// Never returns; the server aborts it on shutdown (before [`Store::flush`]).
    async fn maintain(&self);

    /// Why writes are refused right now (disk full, or cache full of blobs within their
    /// retention), if they are. Cheap: readiness probes ask it.
    fn write_refusal(&self) -> Option<String>;

    /// The namespaces (instance names) with action results or invalidations, with their epochs
    /// and last use. For pattern invalidation, pruning and `stats`.
    async fn namespaces(&self) -> Result<Vec<NamespaceInfo>>;

    /// Removes the listed action results of `instance`; returns how many there were.
    async fn invalidate_actions(&self, instance: &str, actions: &[Digest]) -> Result<u64>;

    /// Makes every action result stored in `instance` so far invisible at once, by bumping the
    /// namespace's epoch (O(1); the space is reclaimed by a later sweep). Records `reason`.
    /// Returns the new epoch.
    async fn invalidate_namespace(&self, instance: &str, reason: &str) -> Result<u64>;

    /// Deletes a namespace: its action results and its record. Returns how many results went.
    async fn drop_namespace(&self, instance: &str) -> Result<u64>;

    /// The store's clock in Unix seconds: the one `NamespaceInfo::last_used` is measured by, so
    /// "idle for N" is judged on the same clock (tests move a store's clock forward).
    fn clock(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// What the store knows of one namespace.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NamespaceInfo {
    pub name: String,
    /// Action results stored before the namespace's current epoch are invisible.
    pub epoch: u64,
    /// Last read or write of an action result in it (Unix seconds).
    pub last_used: u64,
    /// When it was last invalidated as a whole (Unix seconds), and why.
    pub invalidated_at: Option<u64>,
    pub reason: Option<String>,
}

/// What `hoard stats` reports. Sizes in bytes, ages in seconds.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoreStats {
    /// Blobs stored (the empty blob is not counted).
    pub blobs: u64,
    /// Their total size.
    pub blob_bytes: u64,
    /// Action results stored, over all instance names.
    pub action_results: u64,
    /// Their total encoded size.
    pub action_result_bytes: u64,
    /// The bytes `max_size` bounds: blobs (files rounded up to whole 4 KiB blocks) plus
    /// action results.
    pub used_bytes: u64,
    /// The configured bound on `used_bytes`.
    pub max_size: u64,
    /// What the data dir really takes on disk (sled's files plus blob files).
    pub disk_bytes: u64,
    /// Blobs used more recently than this are never evicted.
    pub min_retention_secs: u64,
    /// Blobs evicted since the server started, and their bytes.
    pub evicted_blobs: u64,
    pub evicted_bytes: u64,
    /// How long before its eviction the most recently used evicted blob was last used: if this
    /// nears `min_retention_secs`, the cache is too small for its traffic.
    pub youngest_evicted_age_secs: Option<u64>,
    /// Action results dropped because their TTL since last use passed.
    pub expired_action_results: u64,
    /// Blob existence checks (FindMissingBlobs digests, reads) and how many found the blob.
    pub cas_lookups: u64,
    pub cas_hits: u64,
    /// Action result lookups and how many found one.
    pub ac_lookups: u64,
    pub ac_hits: u64,
    /// Writes refused because the cache was full.
    pub refused_writes: u64,
    /// Why writes are being refused right now, if they are.
    pub write_refusal: Option<String>,
    /// Whether the cleanup pass that follows an unclean shutdown has yet to finish.
    pub cleanup_pending: bool,
}

/// What one `gc` pass did.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GcReport {
    pub evicted_blobs: u64,
    pub evicted_bytes: u64,
    pub expired_action_results: u64,
    /// `used_bytes` after the pass.
    pub used_bytes: u64,
    /// Whether `used_bytes` reached the target; if not, every remaining blob is within
    /// `min_retention`.
    pub reached_target: bool,
}

/// What one `verify` pass found.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    pub checked_blobs: u64,
    pub checked_bytes: u64,
    /// Blobs whose bytes did not match their digest (or were missing); all were removed.
    pub corrupt: Vec<String>,
    /// Pieces of data no index entry named (files and inline data left by a crash), removed.
    pub orphans_removed: u64,
    pub orphan_bytes_removed: u64,
}

/// An upload in progress: bytes are appended in order, then the whole blob is verified and made
/// visible by [`Upload::commit`]. Dropping an upload without committing leaves nothing visible.
#[async_trait]
pub trait Upload: Send {
    /// Bytes received so far, including any resumed prefix.
    fn committed(&self) -> u64;

    /// Appends the next bytes. Fails if they would exceed the digest's size.
    async fn append(&mut self, data: Bytes) -> Result<()>;

    /// Verifies the complete blob against its digest and makes it visible.
    async fn commit(self: Box<Self>) -> Result<()>;

    /// The upload ends without a commit: returns once every byte received is persisted (or
    /// known lost), so `upload_progress` asked right after reports the final figure.
    async fn stop(&mut self) {}
}
