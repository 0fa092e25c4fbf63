//! The tiered backend (`storage.backend = "tiered"`): a local fast tier (sled or memory, with
//! its own `max_size` and LRU) in front of the bucket that every node shares.
//!
//! Only blobs are tiered. Action results and namespace records are mutable and shared, so
//! they are always read from and written to the bucket (`server.rs` gets the bucket's
//! `ActionStore`), and an invalidation through any node is seen by all.
//!
//! The rules, which ARCHITECTURE.md lists as invariants:
//! - Reads try the fast tier, then the bucket; a whole read from the bucket backfills the fast
//!   tier as it streams (verified there like any write, so a bad read stores nothing).
//! - Write-through (the default): a write is acknowledged once the bucket holds it; the fast
//!   tier gets a copy too (a refusal there loses nothing: it is a cache).
//! - Write-behind: a write is acknowledged once the fast tier holds it *and* a durable queue
//!   entry names it (the entry is written before the blob's commit and made durable by it, or
//!   earlier by another write's flush); a background task uploads it to the bucket and then
//!   drops the entry. A queued blob is pinned in the fast tier (retained) until uploaded.
//! - FindMissingBlobs (and so the action cache's completeness check) never takes the fast
//!   tier's word: a blob is present only if the bucket holds it (under the s3 backend's
//!   existence cache), or it waits in this node's queue and the fast tier holds it (an entry
//!   made durable early by a crash has no blob). So a blob the bucket lost is missing here
//!   even while the fast tier still has its bytes, and a client uploads it again.
//!
//! A replica (`[upstream]`, `crate::upstream`) is the same store with its upstream as the
//! slow tier ([`SlowTier`]; "bucket" below means whichever it is). There the fast tier's word
//! is taken ([`TieredStore::trusting_fast_tier`]): its blobs all came from the upstream or went
//! to it, and local hits must not wait for a round trip across regions.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::{BlobStream, Cas, GcReport, Housekeeping, StoreStats, Upload, VerifyReport};
use crate::digest::Digest;
use crate::error::Result;

/// Blobs the uploader takes from the queue per pass, and uploads at once.
const UPLOAD_BATCH: usize = 64;
const PARALLEL_UPLOADS: usize = 16;
/// Pause after the bucket failed an upload, doubling up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(200);
const MAX_PAUSE: Duration = Duration::from_secs(30);
/// A queued blob is retained in the fast tier this far ahead, renewed every [`PIN_RENEW`].
const PIN_AHEAD: u64 = 2 * 3600;
const PIN_RENEW: Duration = Duration::from_secs(1800);

/// The fast tier's faces (any backend; its action store is not used).
#[derive(Clone)]
pub struct FastTier {
    pub cas: Arc<dyn Cas>,
    pub housekeeping: Arc<dyn Housekeeping>,
}

/// What a fast tier sits in front of: the shared bucket (`BucketStore`), or the upstream of a
/// replica (`crate::upstream::UpstreamCas`).
pub trait SlowTier: Cas + Housekeeping {}
impl<T: Cas + Housekeeping> SlowTier for T {}

/// A fast tier in front of a slow one.
pub struct TieredStore {
    fast: FastTier,
    slow: Arc<dyn SlowTier>,
    queue: Option<Arc<Queue>>,
    /// A blob the fast tier holds counts as present (a replica: everything local came from
    /// the upstream or went to it). False for a bucket, which is the only truth.
    trust_fast: bool,
}

/// The write-behind queue: digests acknowledged and not yet in the bucket. The tree is in the
/// fast tier's sled database, so an entry is made durable by the same commit as its blob.
struct Queue {
    tree: sled::Tree,
    state: Mutex<QueueState>,
    wake: Notify,
}

struct QueueState {
    /// The entries whose blob the fast tier holds: what FindMissingBlobs claims and the
    /// uploader takes. An entry joins only once its write is done, so the uploader never
    /// mistakes a write in progress for a failed one.
    queued: HashSet<Digest>,
    /// Writes in progress per digest, so a failed one does not drop the entry that a
    /// concurrent write of the same blob still counts on.
    writing: HashMap<Digest, u32>,
}

fn queue_key(digest: &Digest) -> [u8; 40] {
    let mut key = [0u8; 40];
    key[..32].copy_from_slice(&digest.hash);
    key[32..].copy_from_slice(&digest.size.to_be_bytes());
    key
}

/// Writes between [`Queue::prepare`] and their end.
struct Writing<'a> {
    queue: &'a Queue,
    digests: &'a [Digest],
    open: bool,
}

impl Writing<'_> {
    /// The writes are done: `done` says which were acknowledged.
    fn finish(mut self, done: impl Fn(&Digest) -> bool) {
        self.open = false;
        self.queue.finish(self.digests, done);
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        if self.open {
            self.queue.finish(self.digests, |_| false);
        }
    }
}

impl Queue {
    fn open(tree: sled::Tree) -> Result<Self> {
        let mut queued = HashSet::new();
        for item in tree.iter().keys() {
            let key = item?;
            if key.len() == 40 {
                let mut hash = [0u8; 32];
                hash.copy_from_slice(&key[..32]);
                let mut size = [0u8; 8];
                size.copy_from_slice(&key[32..]);
                queued.insert(Digest {
                    hash,
                    size: u64::from_be_bytes(size),
                });
            }
        }
        if !queued.is_empty() {
            tracing::info!(
                blobs = queued.len(),
                "blobs wait to be uploaded to the slow tier (write-behind)"
            );
        }
        Ok(Queue {
            tree,
            state: Mutex::new(QueueState {
                queued,
                writing: HashMap::new(),
            }),
            wake: Notify::new(),
        })
    }

    /// Adds entries before their writes, durable with the fast tier's commit of them; the
    /// writes are ended by [`Writing::finish`], or as failed if dropped before (a request
    /// cancelled mid-write), so no count outlives its write.
    fn prepare<'a>(&'a self, digests: &'a [Digest]) -> Result<Writing<'a>> {
        let mut state = self.state.lock();
        for (i, d) in digests.iter().enumerate() {
            let fresh = !state.queued.contains(d) && !state.writing.contains_key(d);
            if fresh {
                if let Err(e) = self.tree.insert(queue_key(d), &[][..]) {
                    drop(state);
                    self.finish(&digests[..i], |_| false);
                    return Err(e.into());
                }
            }
            *state.writing.entry(*d).or_default() += 1;
        }
        Ok(Writing {
            queue: self,
            digests,
            open: true,
        })
    }

    /// Makes the entries durable even when their write needed no commit (the fast tier had
    /// the blob already).
    async fn persist(&self) -> Result<()> {
        self.tree.flush_async().await?;
        Ok(())
    }

    /// Ends writes of [`Queue::prepare`]: the acknowledged ones (`done`) are claimed and
    /// uploaded; the entry of a failed one is dropped unless another write or a queued blob
    /// needs it.
    fn finish(&self, digests: &[Digest], done: impl Fn(&Digest) -> bool) {
        let mut state = self.state.lock();
        let mut claimed = false;
        for d in digests {
            let left = match state.writing.get_mut(d) {
                Some(n) => {
                    *n = n.saturating_sub(1);
                    *n
                }
                None => 0,
            };
            if left == 0 {
                state.writing.remove(d);
            }
            if done(d) {
                claimed |= state.queued.insert(*d);
            } else if left == 0 && !state.queued.contains(d) {
                if let Err(e) = self.tree.remove(queue_key(d)) {
                    tracing::warn!(digest = %d, error = %e, "dropping the entry of a failed write");
                }
            }
        }
        drop(state);
        if claimed {
            self.wake.notify_one();
        }
    }

    /// The bucket holds the blob now.
    fn remove(&self, digest: &Digest) -> Result<()> {
        let mut state = self.state.lock();
        state.queued.remove(digest);
        // A write of it in progress keeps its entry (it will be confirmed and uploaded again).
        if !state.writing.contains_key(digest) {
            self.tree.remove(queue_key(digest))?;
        }
        Ok(())
    }

    fn len(&self) -> usize {
        self.state.lock().queued.len()
    }

    fn some(&self, n: usize) -> Vec<Digest> {
        self.state.lock().queued.iter().take(n).copied().collect()
    }

    fn all(&self) -> Vec<Digest> {
        self.state.lock().queued.iter().copied().collect()
    }
}

impl TieredStore {
    /// `queue`: the sled tree of the write-behind queue, if writes are acknowledged before the
    /// bucket holds them.
    pub fn new(fast: FastTier, slow: Arc<dyn SlowTier>, queue: Option<sled::Tree>) -> Result<Self> {
        let queue = match queue {
            Some(tree) => Some(Arc::new(Queue::open(tree)?)),
            None => None,
        };
        Ok(TieredStore {
            fast,
            slow,
            queue,
            trust_fast: false,
        })
    }

    /// Counts a blob the fast tier holds as present, asking the slow tier only about the rest:
    /// for a replica, whose local blobs all came from its upstream or went to it.
    pub fn trusting_fast_tier(mut self) -> Self {
        self.trust_fast = true;
        self
    }

    async fn pin(&self, digests: &[Digest]) -> Result<()> {
        pin(&*self.fast.cas, digests).await
    }

    /// Uploads what the queue holds, for as long as the server runs.
    async fn upload_queued(&self, queue: &Queue) {
        let mut pause = FIRST_PAUSE;
        let mut pinned_at = std::time::Instant::now();
        loop {
            if pinned_at.elapsed() >= PIN_RENEW {
                let all = queue.all();
                if let Err(e) = self.pin(&all).await {
                    tracing::warn!(error = %e, "renewing the pins of queued blobs");
                }
                pinned_at = std::time::Instant::now();
            }
            let batch = queue.some(UPLOAD_BATCH);
            if batch.is_empty() {
                let _ = tokio::time::timeout(PIN_RENEW, queue.wake.notified()).await;
                continue;
            }
            let uploads = futures::stream::iter(batch)
                .map(|digest| async move { (digest, self.upload_one(&digest).await) })
                .buffer_unordered(PARALLEL_UPLOADS);
            let results: Vec<(Digest, Result<()>)> = uploads.collect().await;
            let mut failed = false;
            for (digest, result) in results {
                match result {
                    Ok(()) => {
                        if let Err(e) = queue.remove(&digest) {
                            tracing::warn!(%digest, error = %e, "dropping a write-behind entry");
                        }
                    }
                    Err(e) => {
                        if !failed {
                            tracing::warn!(%digest, error = %e, "uploading queued blobs; retrying");
                        }
                        failed = true;
                    }
                }
            }
            if failed {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
            } else {
                pause = FIRST_PAUSE;
            }
        }
    }

    /// Copies one queued blob from the fast tier to the bucket. A blob the fast tier does not
    /// have was never acknowledged (its write failed after the entry was added): nothing to do.
    async fn upload_one(&self, digest: &Digest) -> Result<()> {
        if !super::copy_blob(&*self.fast.cas, &*self.slow, digest).await? {
            tracing::warn!(%digest, "a queued blob is not in the fast tier: dropping its entry");
        }
        Ok(())
    }

    /// Stores a whole blob in the fast tier, as a cache fill: a refusal is only logged.
    async fn fill(&self, digest: &Digest, data: Bytes) {
        if let Err(e) = self.fast.cas.put(digest, data).await {
            tracing::debug!(%digest, error = %e, "not cached in the fast tier");
        }
    }
}

/// Pins queued blobs in the fast tier until well past the next renewal, so eviction spares
/// them until they are in the bucket.
async fn pin(fast: &dyn Cas, digests: &[Digest]) -> Result<()> {
    fast.retain(digests, now_secs() + PIN_AHEAD).await.map(drop)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[async_trait]
impl Cas for TieredStore {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        if self.trust_fast {
            let rest = self.fast.cas.find_missing(digests).await?;
            if rest.is_empty() {
                return Ok(rest);
            }
            return self.slow.find_missing(&rest).await;
        }
        let Some(queue) = &self.queue else {
            return self.slow.find_missing(digests).await;
        };
        let (queued, mut asked): (Vec<Digest>, Vec<Digest>) = {
            let state = queue.state.lock();
            digests.iter().partition(|d| state.queued.contains(d))
        };
        // A queue entry counts only while the fast tier holds its blob: after a crash an entry
        // can be on disk without the blob its write never committed.
        if !queued.is_empty() {
            asked.extend(self.fast.cas.find_missing(&queued).await?);
        }
        self.slow.find_missing(&asked).await
    }

    async fn retain(&self, digests: &[Digest], until: u64) -> Result<Vec<Digest>> {
        let _ = self.fast.cas.retain(digests, until).await;
        self.find_missing(digests).await
    }

    async fn read(
        &self,
        digest: &Digest,
        offset: u64,
        limit: Option<u64>,
        chunk_size: usize,
    ) -> Result<Option<BlobStream>> {
        match self.fast.cas.read(digest, offset, limit, chunk_size).await {
            Ok(Some(stream)) => return Ok(Some(stream)),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(%digest, error = %e, "fast tier read failed; asking the slow tier")
            }
        }
        let Some(stream) = self.slow.read(digest, offset, limit, chunk_size).await? else {
            return Ok(None);
        };
        let whole = offset == 0 && limit.is_none_or(|l| l >= digest.size);
        if !whole {
            return Ok(Some(stream));
        }
        let id = format!("backfill-{}", uuid::Uuid::new_v4());
        match self.fast.cas.begin_upload(&id, digest, 0).await {
            Ok(upload) => Ok(Some(backfilled(stream, upload))),
            Err(e) => {
                tracing::debug!(%digest, error = %e, "not cached in the fast tier");
                Ok(Some(stream))
            }
        }
    }

    async fn begin_upload(
        &self,
        upload_id: &str,
        digest: &Digest,
        offset: u64,
    ) -> Result<Box<dyn Upload>> {
        if let Some(queue) = &self.queue {
            let fast = self
                .fast
                .cas
                .begin_upload(upload_id, digest, offset)
                .await?;
            return Ok(Box::new(BehindUpload {
                fast,
                tier: self.fast.cas.clone(),
                digest: *digest,
                queue: queue.clone(),
            }));
        }
        let slow = self.slow.begin_upload(upload_id, digest, offset).await?;
        // A resumed upload's first bytes are in the bucket only: the fast tier gets the blob
        // at its first read instead.
        let fast = match offset {
            0 => self.fast.cas.begin_upload(upload_id, digest, 0).await.ok(),
            _ => None,
        };
        Ok(Box::new(ThroughUpload { slow, fast }))
    }

    async fn upload_progress(&self, upload_id: &str, digest: &Digest) -> Result<Option<u64>> {
        match &self.queue {
            Some(_) => self.fast.cas.upload_progress(upload_id, digest).await,
            None => self.slow.upload_progress(upload_id, digest).await,
        }
    }

    async fn get(&self, digest: &Digest) -> Result<Option<Bytes>> {
        match self.fast.cas.get(digest).await {
            Ok(Some(bytes)) => return Ok(Some(bytes)),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(%digest, error = %e, "fast tier read failed; asking the slow tier")
            }
        }
        let Some(bytes) = self.slow.get(digest).await? else {
            return Ok(None);
        };
        self.fill(digest, bytes.clone()).await;
        Ok(Some(bytes))
    }

    async fn put(&self, digest: &Digest, data: Bytes) -> Result<()> {
        if let Some(queue) = &self.queue {
            let one = std::slice::from_ref(digest);
            let writing = queue.prepare(one)?;
            let stored = self.fast.cas.put(digest, data).await;
            let durable = match stored {
                Ok(()) => self.pin(one).await.and(queue.persist().await),
                Err(e) => Err(e),
            };
            writing.finish(|_| durable.is_ok());
            return durable;
        }
        self.slow.put(digest, data.clone()).await?;
        self.fill(digest, data).await;
        Ok(())
    }

    async fn put_many(&self, blobs: Vec<(Digest, Bytes)>) -> Vec<Result<()>> {
        let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
        if let Some(queue) = &self.queue {
            let writing = match queue.prepare(&digests) {
                Ok(writing) => writing,
                Err(e) => return digests.iter().map(|_| Err(e.again())).collect(),
            };
            let results = self.fast.cas.put_many(blobs).await;
            let stored: HashSet<Digest> = digests
                .iter()
                .zip(&results)
                .filter(|(_, r)| r.is_ok())
                .map(|(d, _)| *d)
                .collect();
            let pinned: Vec<Digest> = stored.iter().copied().collect();
            if let Err(e) = self.pin(&pinned).await.and(queue.persist().await) {
                writing.finish(|_| false);
                return digests.iter().map(|_| Err(e.again())).collect();
            }
            writing.finish(|d| stored.contains(d));
            return results;
        }
        let results = self.slow.put_many(blobs.clone()).await;
        let stored: Vec<(Digest, Bytes)> = blobs
            .into_iter()
            .zip(&results)
            .filter(|(_, r)| r.is_ok())
            .map(|(b, _)| b)
            .collect();
        for (i, r) in self.fast.cas.put_many(stored).await.iter().enumerate() {
            if let Err(e) = r {
                tracing::debug!(blob = i, error = %e, "not cached in the fast tier");
            }
        }
        results
    }
}

/// A bucket read that also fills the fast tier: each chunk is appended to `upload` as it
/// passes, committed (verified) at the end. A failed append or an unfinished read stores
/// nothing; the client's read goes on either way.
fn backfilled(stream: BlobStream, upload: Box<dyn Upload>) -> BlobStream {
    let state = (stream, Some(upload));
    Box::pin(futures::stream::unfold(
        state,
        |(mut stream, mut upload)| async move {
            match stream.next().await {
                Some(Ok(chunk)) => {
                    if let Some(u) = upload.as_mut() {
                        if u.append(chunk.clone()).await.is_err() {
                            upload = None;
                        }
                    }
                    Some((Ok(chunk), (stream, upload)))
                }
                Some(Err(e)) => Some((Err(e), (stream, None))),
                None => {
                    if let Some(u) = upload.take() {
                        if let Err(e) = u.commit().await {
                            tracing::debug!(error = %e, "backfill of the fast tier not stored");
                        }
                    }
                    None
                }
            }
        },
    ))
}

/// Write-through: every byte to the bucket (which decides), a copy to the fast tier.
struct ThroughUpload {
    slow: Box<dyn Upload>,
    fast: Option<Box<dyn Upload>>,
}

#[async_trait]
impl Upload for ThroughUpload {
    fn committed(&self) -> u64 {
        self.slow.committed()
    }

    async fn append(&mut self, data: Bytes) -> Result<()> {
        self.slow.append(data.clone()).await?;
        if let Some(fast) = self.fast.as_mut() {
            if fast.append(data).await.is_err() {
                self.fast = None;
            }
        }
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        let ThroughUpload { slow, fast } = *self;
        slow.commit().await?;
        if let Some(fast) = fast {
            if let Err(e) = fast.commit().await {
                tracing::debug!(error = %e, "not cached in the fast tier");
            }
        }
        Ok(())
    }

    async fn stop(&mut self) {
        self.slow.stop().await;
        if let Some(fast) = self.fast.as_mut() {
            fast.stop().await;
        }
    }
}

/// Write-behind: the fast tier decides; the queue entry is added before the commit that makes
/// the blob durable, so it is durable with it.
struct BehindUpload {
    fast: Box<dyn Upload>,
    /// The fast tier, to pin the blob in.
    tier: Arc<dyn Cas>,
    digest: Digest,
    queue: Arc<Queue>,
}

#[async_trait]
impl Upload for BehindUpload {
    fn committed(&self) -> u64 {
        self.fast.committed()
    }

    async fn append(&mut self, data: Bytes) -> Result<()> {
        self.fast.append(data).await
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        let BehindUpload {
            fast,
            tier,
            digest,
            queue,
        } = *self;
        let one = std::slice::from_ref(&digest);
        let writing = queue.prepare(one)?;
        let durable = match fast.commit().await {
            Ok(()) => pin(&*tier, one).await.and(queue.persist().await),
            Err(e) => Err(e),
        };
        writing.finish(|_| durable.is_ok());
        durable
    }

    async fn stop(&mut self) {
        self.fast.stop().await;
    }
}

#[async_trait]
impl Housekeeping for TieredStore {
    /// The fast tier's figures (the bucket is counted by the s3 backend alone), and the queue.
    async fn stats(&self) -> Result<StoreStats> {
        let mut stats = self.fast.housekeeping.stats().await?;
        stats.write_behind_queue = self.queue.as_ref().map(|q| q.len() as u64);
        stats.write_refusal = self.write_refusal();
        Ok(stats)
    }

    async fn gc(&self, target: Option<u64>) -> Result<GcReport> {
        self.fast.housekeeping.gc(target).await
    }

    async fn verify(&self) -> Result<VerifyReport> {
        self.fast.housekeeping.verify().await
    }

    async fn maintain(&self) {
        let uploads = async {
            match &self.queue {
                Some(queue) => self.upload_queued(queue).await,
                None => futures::future::pending().await,
            }
        };
        tokio::join!(
            self.fast.housekeeping.maintain(),
            self.slow.maintain(),
            uploads
        );
    }

    async fn remove_abandoned_uploads(&self, max_age: Duration) -> Result<usize> {
        let fast = self
            .fast
            .housekeeping
            .remove_abandoned_uploads(max_age)
            .await?;
        let slow = self.slow.remove_abandoned_uploads(max_age).await?;
        Ok(fast + slow)
    }

    /// Write-through: the bucket decides. Write-behind: the fast tier does.
    fn write_refusal(&self) -> Option<String> {
        match &self.queue {
            Some(_) => self.fast.housekeeping.write_refusal(),
            None => self.slow.write_refusal(),
        }
    }

    fn unavailable(&self) -> Option<String> {
        self.slow.unavailable()
    }

    async fn flush(&self) -> Result<()> {
        self.fast.housekeeping.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::bucket::BucketStore;

    fn queue() -> Queue {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .expect("temporary sled");
        Queue::open(db.open_tree("write-behind").expect("tree")).expect("queue")
    }

    fn digest(n: u8) -> Digest {
        Digest {
            hash: [n; 32],
            size: u64::from(n),
        }
    }

    fn on_disk(q: &Queue, d: &Digest) -> bool {
        q.tree.contains_key(queue_key(d)).expect("read tree")
    }

    #[test]
    fn a_failed_write_keeps_the_entry_a_concurrent_write_of_the_blob_needs() {
        let q = queue();
        let d = [digest(1)];
        let first = q.prepare(&d).expect("first write");
        let second = q.prepare(&d).expect("second write");
        first.finish(|_| false);
        assert!(
            on_disk(&q, &d[0]),
            "the failed write dropped the other's entry"
        );
        second.finish(|_| true);
        assert!(on_disk(&q, &d[0]));
        assert_eq!(q.all(), d.to_vec());
    }

    #[test]
    fn a_failed_write_alone_leaves_no_entry_and_a_queued_blob_keeps_its_own() {
        let q = queue();
        let (a, b) = (digest(1), digest(2));
        q.prepare(&[a]).expect("write a").finish(|_| false);
        assert!(!on_disk(&q, &a));
        assert!(q.all().is_empty());

        q.prepare(&[b]).expect("write b").finish(|_| true);
        q.prepare(&[b]).expect("write b again").finish(|_| false);
        assert!(
            on_disk(&q, &b),
            "a failed rewrite dropped a queued blob's entry"
        );
        assert_eq!(q.all(), vec![b]);
    }

    #[test]
    fn an_upload_during_a_rewrite_keeps_the_rewrites_entry() {
        let q = queue();
        let d = [digest(3)];
        q.prepare(&d).expect("write").finish(|_| true);
        let rewrite = q.prepare(&d).expect("rewrite");
        q.remove(&d[0]).expect("uploaded");
        assert!(on_disk(&q, &d[0]));
        rewrite.finish(|_| true);
        assert_eq!(q.all(), d.to_vec(), "the rewrite is uploaded again");
        q.remove(&d[0]).expect("uploaded again");
        assert!(!on_disk(&q, &d[0]));
        assert!(q.all().is_empty());
    }

    #[test]
    fn a_write_dropped_midway_ends_as_failed() {
        let q = queue();
        let d = [digest(6)];
        drop(q.prepare(&d).expect("write, then its request is cancelled"));
        assert!(!on_disk(&q, &d[0]));
        q.prepare(&d).expect("written again").finish(|_| true);
        q.remove(&d[0]).expect("uploaded");
        assert!(
            !on_disk(&q, &d[0]),
            "a count left by the dropped write kept the entry"
        );
    }

    #[tokio::test]
    async fn a_queue_entry_whose_blob_never_landed_is_not_claimed() {
        // After a crash: the entry reached the disk (another write's flush), the blob did not.
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .expect("temporary sled");
        let tree = db.open_tree("write-behind").expect("tree");
        let lost = Digest::of(b"never committed");
        tree.insert(queue_key(&lost), &[][..]).expect("entry");
        let fast = Arc::new(
            crate::store::memory::MemoryStore::from_config(&crate::config::Config::default())
                .expect("memory tier"),
        );
        let bucket = BucketStore::with_bucket(
            Arc::new(object_store::memory::InMemory::new()),
            &crate::config::S3Config::default(),
        );
        let tier = FastTier {
            cas: fast.clone(),
            housekeeping: fast,
        };
        let store = TieredStore::new(tier, Arc::new(bucket), Some(tree)).expect("tiered");
        assert_eq!(store.find_missing(&[lost]).await.expect("asked"), [lost]);
    }

    #[test]
    fn the_queue_survives_reopening() {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .expect("temporary sled");
        let tree = db.open_tree("write-behind").expect("tree");
        let q = Queue::open(tree.clone()).expect("queue");
        let both = [digest(4), digest(5)];
        q.prepare(&both).expect("writes").finish(|d| d.size == 4);
        drop(q);
        let again = Queue::open(tree).expect("reopen");
        assert_eq!(again.all(), vec![digest(4)]);
    }
}
