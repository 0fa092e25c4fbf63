//! Storage behind every service: the [`Store`] trait and its implementations.
//!
//! Services talk only to `Arc<dyn Store>`; they never see sled or files. A store verifies every CAS
//! write (hash and size, exactly once) before the blob becomes visible, and always holds the empty
//! blob. The action cache is keyed by (instance name, action digest) and holds the encoded
//! `ActionResult` as given.

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
}
