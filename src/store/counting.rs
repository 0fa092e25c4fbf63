//! A decorator that counts CAS lookups and hits for `hoard stats` (and, later, metrics). It
//! wraps any [`Cas`] and its [`Housekeeping`], so every backend reports the same figures
//! without counting them itself.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{BlobStream, Cas, GcReport, Housekeeping, StoreStats, Upload, VerifyReport};
use crate::digest::Digest;
use crate::error::Result;

/// Blob existence checks (FindMissingBlobs digests, reads) and how many found the blob.
pub struct Counting<C: ?Sized, H: ?Sized> {
    cas: Arc<C>,
    housekeeping: Arc<H>,
    lookups: AtomicU64,
    hits: AtomicU64,
}

impl<C: ?Sized, H: ?Sized> Counting<C, H> {
    pub fn new(cas: Arc<C>, housekeeping: Arc<H>) -> Self {
        Counting {
            cas,
            housekeeping,
            lookups: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        }
    }

    fn count(&self, asked: usize, found: usize) {
        self.lookups.fetch_add(asked as u64, Relaxed);
        self.hits.fetch_add(found as u64, Relaxed);
    }
}

#[async_trait]
impl<C: Cas + ?Sized, H: Housekeeping + ?Sized> Cas for Counting<C, H> {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let missing = self.cas.find_missing(digests).await?;
        self.count(digests.len(), digests.len() - missing.len());
        Ok(missing)
    }

    /// Not counted: these are the server's own checks of asset content, not clients' lookups.
    async fn retain(&self, digests: &[Digest], until: u64) -> Result<Vec<Digest>> {
        self.cas.retain(digests, until).await
    }

    async fn read(
        &self,
        digest: &Digest,
        offset: u64,
        limit: Option<u64>,
        chunk_size: usize,
    ) -> Result<Option<BlobStream>> {
        let stream = self.cas.read(digest, offset, limit, chunk_size).await?;
        if !digest.is_empty_blob() {
            self.count(1, stream.is_some() as usize);
        }
        Ok(stream)
    }

    async fn begin_upload(
        &self,
        upload_id: &str,
        digest: &Digest,
        offset: u64,
    ) -> Result<Box<dyn Upload>> {
        self.cas.begin_upload(upload_id, digest, offset).await
    }

    async fn upload_progress(&self, upload_id: &str, digest: &Digest) -> Result<Option<u64>> {
        self.cas.upload_progress(upload_id, digest).await
    }

    async fn get(&self, digest: &Digest) -> Result<Option<Bytes>> {
        let blob = self.cas.get(digest).await?;
        // The empty blob is always there and never looked up (as the backends always did).
        if !digest.is_empty_blob() {
            self.count(1, blob.is_some() as usize);
        }
        Ok(blob)
    }

    async fn put(&self, digest: &Digest, data: Bytes) -> Result<()> {
        self.cas.put(digest, data).await
    }

    async fn put_many(&self, blobs: Vec<(Digest, Bytes)>) -> Vec<Result<()>> {
        self.cas.put_many(blobs).await
    }
}

#[async_trait]
impl<C: Cas + ?Sized, H: Housekeeping + ?Sized> Housekeeping for Counting<C, H> {
    async fn stats(&self) -> Result<StoreStats> {
        let mut stats = self.housekeeping.stats().await?;
        stats.cas_lookups = self.lookups.load(Relaxed);
        stats.cas_hits = self.hits.load(Relaxed);
        Ok(stats)
    }

    async fn gc(&self, target: Option<u64>) -> Result<GcReport> {
        self.housekeeping.gc(target).await
    }

    async fn verify(&self) -> Result<VerifyReport> {
        self.housekeeping.verify().await
    }

    async fn maintain(&self) {
        self.housekeeping.maintain().await
    }

    async fn remove_abandoned_uploads(&self, max_age: Duration) -> Result<usize> {
        self.housekeeping.remove_abandoned_uploads(max_age).await
    }

    fn write_refusal(&self) -> Option<String> {
        self.housekeeping.write_refusal()
    }

    fn unavailable(&self) -> Option<String> {
        self.housekeeping.unavailable()
    }

    async fn flush(&self) -> Result<()> {
        self.housekeeping.flush().await
    }
}
