//! The memory backend (`storage.backend = "memory"`): blobs, action results and namespace
//! records in RAM, bounded by `storage.max_size`, gone at exit. For ephemeral CI runners and
//! tests. Same promises as the sled backend apart from durability: every write verified
//! before it is visible, least recently used blobs evicted first, and never a blob used within
//! `storage.min_retention` (writes are refused instead, saying why).
//!
//! Uploads in progress are kept (and resumable) while the process runs; their bytes count
//! against `max_size`, and a write that needs room takes it from abandoned ones (not being
//! written, oldest first) before it is refused.
//!
//! One lock for blobs and uploads, one for action results, one for namespace records; none is
//! held across an `.await` or while hashing. Eviction runs on the write that needs the room (a
//! scan of the blobs, fine at the sizes RAM holds) and in the background between the
//! watermarks. Every CAS call takes the one lock briefly: this backend is for ephemeral runners
//! and tests, not for a shared cache under heavy load (that is sled's job).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use parking_lot::Mutex;

use super::clock::Clock;
use super::refused::{Refusal, RefusedWrites};
use super::{
    ActionRecord, ActionStore, BlobStream, Cas, DeadRecord, GcReport, Housekeeping, NamespaceInfo,
    StoreStats, Upload, VerifyReport,
};
use crate::config::Config;
use crate::digest::{verify, Digest, Verifier};
use crate::error::{Error, Result};

/// `max_size` when the config leaves it at 0.
const DEFAULT_MAX_SIZE: u64 = 1 << 30;
/// What one stored action result costs beyond its key and bytes.
const AC_OVERHEAD: u64 = 12;
/// How often background eviction looks at the watermarks.
const TICK: Duration = Duration::from_secs(1);

/// An in-memory store; cheap to clone (clones share the data).
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    blobs: Mutex<Blobs>,
    /// (namespace, action) → record.
    actions: Mutex<BTreeMap<(String, Digest), ActionRecord>>,
    namespaces: Mutex<BTreeMap<String, NamespaceInfo>>,
    max_size: u64,
    high: u64,
    low: u64,
    min_retention: u32,
    clock: Clock,
    evicted_blobs: AtomicU64,
    evicted_bytes: AtomicU64,
    /// Seconds between last use and eviction of the most recently used blob evicted.
    youngest_evicted_age: AtomicU64,
    /// Writes refused, by reason (this backend has no disk: only `cache_full`, `too_large`).
    refused: RefusedWrites,
    /// The last eviction could not reach its target: the rest is within `min_retention`.
    retention_blocked: AtomicBool,
}

#[derive(Default)]
struct Blobs {
    map: HashMap<Digest, Stored>,
    /// Uploads in progress by id.
    uploads: HashMap<String, Partial>,
    /// Bytes of stored blobs plus action results.
    used: u64,
    /// Bytes held by uploads in progress (the sum of their `data`).
    reserved: u64,
    /// Claim tokens handed out so far.
    claims: u64,
}

impl Blobs {
    /// Forgets an upload and gives back the bytes it held.
    fn drop_upload(&mut self, id: &str) -> Option<Partial> {
        let gone = self.uploads.remove(id)?;
        self.reserved -= (gone.data.len() as u64).min(self.reserved);
        Some(gone)
    }

    /// Drops uploads nobody is writing, oldest first, until `room` more bytes fit under `max`.
    fn reclaim_abandoned(&mut self, room: u64, max: u64) {
        let mut idle: Vec<(Instant, String)> = self
            .uploads
            .iter()
            .filter(|(_, p)| p.claim.is_none())
            .map(|(id, p)| (p.touched, id.clone()))
            .collect();
        idle.sort_unstable();
        for (_, id) in idle {
            if self.used + self.reserved + room <= max {
                break;
            }
            self.drop_upload(&id);
        }
    }
}

struct Stored {
    data: Bytes,
    last_used: u32,
}

/// An upload's bytes so far.
struct Partial {
    digest: Digest,
    data: BytesMut,
    /// The token of the stream writing it, if one is.
    claim: Option<u64>,
    touched: Instant,
}

/// `pct` percent of `max`, without overflow or early rounding.
fn share(max: u64, pct: u8) -> u64 {
    (max as u128 * pct as u128 / 100) as u64
}

impl MemoryStore {
    pub fn from_config(config: &Config) -> Result<Self> {
        let s = &config.storage;
        let max_size = match s.max_size.0 {
            0 => DEFAULT_MAX_SIZE,
            n => n,
        };
        Ok(MemoryStore {
            inner: Arc::new(Inner {
                blobs: Mutex::new(Blobs::default()),
                actions: Mutex::new(BTreeMap::new()),
                namespaces: Mutex::new(BTreeMap::new()),
                max_size,
                high: share(max_size, s.high_watermark),
                low: share(max_size, s.low_watermark),
                min_retention: s.min_retention.0.as_secs().min(u32::MAX as u64) as u32,
                clock: Clock::default(),
                evicted_blobs: AtomicU64::new(0),
                evicted_bytes: AtomicU64::new(0),
                youngest_evicted_age: AtomicU64::new(u64::MAX),
                refused: RefusedWrites::default(),
                retention_blocked: AtomicBool::new(false),
            }),
        })
    }

    /// Moves the store's clock forward (tests of retention and TTL).
    pub fn advance_clock(&self, by: Duration) {
        self.inner.clock.advance(by);
    }
}

impl Inner {
    fn now(&self) -> u32 {
        self.clock.now()
    }

    /// The blob's bytes, recording a use.
    fn touch(&self, digest: &Digest) -> Option<Bytes> {
        let now = self.now();
        let mut blobs = self.blobs.lock();
        let stored = blobs.map.get_mut(digest)?;
        stored.last_used = stored.last_used.max(now);
        Some(stored.data.clone())
    }

    /// Makes room for `charge` more bytes (evicting blobs unused within `min_retention`, least
    /// recently used first) and takes it into `used` (or `reserved`), or refuses the write.
    fn admit(&self, blobs: &mut Blobs, charge: u64, reserve: bool) -> Result<()> {
        if blobs.used + blobs.reserved + charge > self.max_size {
            let target = self.max_size.saturating_sub(charge).min(self.low);
            self.evict(blobs, target);
        }
        if blobs.used + blobs.reserved + charge > self.max_size {
            blobs.reclaim_abandoned(charge, self.max_size);
        }
        if blobs.used + blobs.reserved + charge > self.max_size {
            let too_large = charge > self.max_size;
            self.refused.count(if too_large {
                Refusal::TooLarge
            } else {
                Refusal::CacheFull
            });
            let used = blobs.used + blobs.reserved;
            return Err(Error::ResourceExhausted(if too_large {
                format!(
                    "a write of {charge} bytes cannot fit: storage.max_size is {} bytes",
                    self.max_size
                )
            } else {
                format!(
                    "cache is full: {used} of max_size {} bytes are used and every stored blob \
                     was used within storage.min_retention ({}s), which hoard promises not to \
                     evict; raise storage.max_size or lower storage.min_retention",
                    self.max_size, self.min_retention
                )
            }));
        }
        if reserve {
            blobs.reserved += charge;
        } else {
            blobs.used += charge;
        }
        Ok(())
    }

    /// Evicts blobs unused within `min_retention`, least recently used first, until usage is
    /// at most `target`; returns (blobs, bytes) evicted.
    fn evict(&self, blobs: &mut Blobs, target: u64) -> (u64, u64) {
        let usage = |b: &Blobs| b.used + b.reserved;
        if usage(blobs) <= target {
            self.retention_blocked.store(false, Relaxed);
            return (0, 0);
        }
        let now = self.now();
        let cutoff = now.saturating_sub(self.min_retention);
        let mut victims: Vec<(u32, Digest)> = blobs
            .map
            .iter()
            .filter(|(_, s)| s.last_used < cutoff)
            .map(|(d, s)| (s.last_used, *d))
            .collect();
        victims.sort_unstable();
        let (mut count, mut bytes) = (0, 0);
        for (used, digest) in victims {
            if usage(blobs) <= target {
                break;
            }
            if let Some(gone) = blobs.map.remove(&digest) {
                let size = gone.data.len() as u64;
                blobs.used -= size;
                count += 1;
                bytes += size;
                let age = now.saturating_sub(used) as u64;
                self.youngest_evicted_age.fetch_min(age, Relaxed);
            }
        }
        self.evicted_blobs.fetch_add(count, Relaxed);
        self.evicted_bytes.fetch_add(bytes, Relaxed);
        self.retention_blocked.store(usage(blobs) > target, Relaxed);
        (count, bytes)
    }

    /// Stores a verified blob (a no-op if it is there already, but for recording the use).
    fn insert(&self, digest: &Digest, data: Bytes) -> Result<()> {
        self.insert_locked(&mut self.blobs.lock(), digest, data)
    }

    /// [`Inner::insert`] under a lock the caller holds.
    fn insert_locked(&self, blobs: &mut Blobs, digest: &Digest, data: Bytes) -> Result<()> {
        let now = self.now();
        if let Some(stored) = blobs.map.get_mut(digest) {
            stored.last_used = stored.last_used.max(now);
            return Ok(());
        }
        self.admit(blobs, digest.size, false)?;
        blobs.map.insert(
            *digest,
            Stored {
                data,
                last_used: now,
            },
        );
        Ok(())
    }

    fn record_charge(namespace: &str, record: &ActionRecord) -> u64 {
        (namespace.len() + 32) as u64 + record.result.len() as u64 + AC_OVERHEAD
    }

    /// Gives back the bytes of removed action records.
    fn release(&self, bytes: u64) {
        let mut blobs = self.blobs.lock();
        blobs.used -= bytes.min(blobs.used);
    }
}

#[async_trait]
impl Cas for MemoryStore {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.retain(digests, 0).await
    }

    async fn retain(&self, digests: &[Digest], until: u64) -> Result<Vec<Digest>> {
        let now = self.inner.now().max(until.min(u32::MAX as u64) as u32);
        let mut blobs = self.inner.blobs.lock();
        Ok(digests
            .iter()
            .filter(|d| {
                if d.is_empty_blob() {
                    return false;
                }
                match blobs.map.get_mut(d) {
                    Some(s) => {
                        s.last_used = s.last_used.max(now);
                        false
                    }
                    None => true,
                }
            })
            .copied()
            .collect())
    }

    async fn read(
        &self,
        digest: &Digest,
        offset: u64,
        limit: Option<u64>,
        chunk_size: usize,
    ) -> Result<Option<BlobStream>> {
        if digest.is_empty_blob() {
            return Ok(Some(futures::stream::empty().boxed()));
        }
        let Some(data) = self.inner.touch(digest) else {
            return Ok(None);
        };
        let end = match limit {
            Some(l) => digest.size.min(offset.saturating_add(l)),
            None => digest.size,
        };
        let data = data.slice(offset.min(end) as usize..end as usize);
        let step = chunk_size.max(1);
        let chunks: Vec<Result<Bytes>> = (0..data.len())
            .step_by(step)
            .map(|at| Ok(data.slice(at..data.len().min(at + step))))
            .collect();
        Ok(Some(futures::stream::iter(chunks).boxed()))
    }

    async fn begin_upload(
        &self,
        upload_id: &str,
        digest: &Digest,
        offset: u64,
    ) -> Result<Box<dyn Upload>> {
        let mut blobs = self.inner.blobs.lock();
        let resumed = match blobs.uploads.get(upload_id) {
            Some(p) if p.claim.is_some() => {
                return Err(Error::Aborted(format!(
                    "upload {upload_id} is already being written by another stream; retry later"
                )))
            }
            Some(p) if offset > 0 && p.digest == *digest => {
                let have = p.data.len() as u64;
                if have != offset {
                    return Err(Error::InvalidArgument(format!(
                        "write_offset {offset} for upload {upload_id} of {digest} does not match \
                         the {have} bytes stored so far; resume at offset {have} or restart at 0"
                    )));
                }
                true
            }
            _ if offset > 0 => {
                return Err(Error::InvalidArgument(format!(
                    "write_offset {offset} for upload {upload_id} of {digest}: no bytes of it \
                     are stored, so the write must start at offset 0"
                )))
            }
            _ => false,
        };
        if !resumed {
            blobs.drop_upload(upload_id);
            if digest.size > self.inner.max_size {
                self.inner.refused.count(Refusal::TooLarge);
                return Err(Error::ResourceExhausted(format!(
                    "blob {digest} cannot fit: storage.max_size is {} bytes",
                    self.inner.max_size
                )));
            }
        }
        let mut verifier = Verifier::new(*digest);
        if let Some(p) = blobs.uploads.get(upload_id) {
            verifier.update(&p.data)?;
        }
        blobs.claims += 1;
        let claim = blobs.claims;
        let partial = blobs
            .uploads
            .entry(upload_id.to_string())
            .or_insert_with(|| Partial {
                digest: *digest,
                data: BytesMut::new(),
                claim: None,
                touched: Instant::now(),
            });
        partial.claim = Some(claim);
        partial.touched = Instant::now();
        Ok(Box::new(MemoryUpload {
            store: self.inner.clone(),
            id: upload_id.to_string(),
            claim,
            digest: *digest,
            verifier,
        }))
    }

    async fn upload_progress(&self, upload_id: &str, digest: &Digest) -> Result<Option<u64>> {
        let blobs = self.inner.blobs.lock();
        Ok(blobs
            .uploads
            .get(upload_id)
            .filter(|p| p.digest == *digest)
            .map(|p| p.data.len() as u64))
    }

    async fn get(&self, digest: &Digest) -> Result<Option<Bytes>> {
        if digest.is_empty_blob() {
            return Ok(Some(Bytes::new()));
        }
        Ok(self.inner.touch(digest))
    }

    async fn put(&self, digest: &Digest, data: Bytes) -> Result<()> {
        verify(*digest, &data)?;
        if digest.is_empty_blob() {
            return Ok(());
        }
        self.inner.insert(digest, data)
    }
}

/// An upload collected in the store's upload map, so a stream that breaks off can resume.
struct MemoryUpload {
    store: Arc<Inner>,
    id: String,
    /// This stream's claim on the id; another stream's later claim is not ours to release.
    claim: u64,
    digest: Digest,
    verifier: Verifier,
}

impl MemoryUpload {
    fn gone(&self) -> Error {
        Error::Aborted(format!(
            "upload {} was removed while it was written (abandoned, or its room was needed); \
             restart it at offset 0",
            self.id
        ))
    }
}

#[async_trait]
impl Upload for MemoryUpload {
    fn committed(&self) -> u64 {
        self.verifier.seen()
    }

    async fn append(&mut self, data: Bytes) -> Result<()> {
        self.verifier.update(&data)?;
        let mut blobs = self.store.blobs.lock();
        if blobs.uploads.get(&self.id).and_then(|p| p.claim) != Some(self.claim) {
            return Err(self.gone());
        }
        self.store.admit(&mut blobs, data.len() as u64, true)?;
        let Some(partial) = blobs.uploads.get_mut(&self.id) else {
            // Reclaimed to make room for this very append: cannot be ours (it is claimed),
            // but say so rather than lose the bytes silently.
            let held = data.len() as u64;
            blobs.reserved -= held.min(blobs.reserved);
            return Err(self.gone());
        };
        partial.data.extend_from_slice(&data);
        partial.touched = Instant::now();
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        let verifier = std::mem::replace(&mut self.verifier, Verifier::new(self.digest));
        let verified = verifier.finish();
        let mut blobs = self.store.blobs.lock();
        if blobs.uploads.get(&self.id).and_then(|p| p.claim) != Some(self.claim) {
            return Err(self.gone());
        }
        // Whatever the outcome the upload is over: bytes that do not match cannot be fixed by
        // resuming, and bytes that match become the blob.
        let partial = blobs.drop_upload(&self.id).ok_or_else(|| self.gone())?;
        verified?;
        if self.digest.is_empty_blob() {
            return Ok(());
        }
        // Under the same lock the room just given back is the room taken: a verified upload
        // is never refused for space that another write took in between.
        self.store
            .insert_locked(&mut blobs, &self.digest, partial.data.freeze())
    }
}

impl Drop for MemoryUpload {
    fn drop(&mut self) {
        let mut blobs = self.store.blobs.lock();
        if let Some(p) = blobs.uploads.get_mut(&self.id) {
            if p.claim == Some(self.claim) {
                p.claim = None;
            }
        }
    }
}

#[async_trait]
impl ActionStore for MemoryStore {
    async fn get(&self, namespace: &str, action: &Digest) -> Result<Option<ActionRecord>> {
        let actions = self.inner.actions.lock();
        Ok(actions.get(&(namespace.to_string(), *action)).cloned())
    }

    async fn put(&self, namespace: &str, action: &Digest, record: ActionRecord) -> Result<()> {
        let charge = Inner::record_charge(namespace, &record);
        {
            let mut blobs = self.inner.blobs.lock();
            self.inner.admit(&mut blobs, charge, false)?;
        }
        let old = self
            .inner
            .actions
            .lock()
            .insert((namespace.to_string(), *action), record);
        if let Some(old) = old {
            self.inner.release(Inner::record_charge(namespace, &old));
        }
        Ok(())
    }

    async fn replace(
        &self,
        namespace: &str,
        action: &Digest,
        seen: &ActionRecord,
        new: Option<ActionRecord>,
    ) -> Result<bool> {
        let key = (namespace.to_string(), *action);
        let mut actions = self.inner.actions.lock();
        if actions.get(&key) != Some(seen) {
            return Ok(false);
        }
        let before = Inner::record_charge(namespace, seen);
        match new {
            // Only the last use changes: same size.
            Some(record) => {
                actions.insert(key, record);
            }
            None => {
                actions.remove(&key);
                drop(actions);
                self.inner.release(before);
            }
        }
        Ok(true)
    }

    async fn remove(&self, namespace: &str, actions: &[Digest]) -> Result<u64> {
        let mut freed = 0;
        let mut removed = 0;
        {
            let mut map = self.inner.actions.lock();
            for action in actions {
                if let Some(old) = map.remove(&(namespace.to_string(), *action)) {
                    freed += Inner::record_charge(namespace, &old);
                    removed += 1;
                }
            }
        }
        self.inner.release(freed);
        Ok(removed)
    }

    async fn remove_namespace(&self, namespace: &str) -> Result<u64> {
        let mut freed = 0;
        let mut removed = 0;
        {
            let mut map = self.inner.actions.lock();
            map.retain(|(ns, _), record| {
                if ns != namespace {
                    return true;
                }
                freed += Inner::record_charge(ns, record);
                removed += 1;
                false
            });
        }
        self.inner.release(freed);
        self.inner.namespaces.lock().remove(namespace);
        Ok(removed)
    }

    async fn sweep(&self, dead: &DeadRecord<'_>) -> Result<u64> {
        let mut freed = 0;
        let mut removed = 0;
        {
            let mut map = self.inner.actions.lock();
            map.retain(|(ns, _), record| {
                if !dead(ns, record) {
                    return true;
                }
                freed += Inner::record_charge(ns, record);
                removed += 1;
                false
            });
        }
        self.inner.release(freed);
        Ok(removed)
    }

    async fn namespace_records(&self) -> Result<Vec<NamespaceInfo>> {
        Ok(self.inner.namespaces.lock().values().cloned().collect())
    }

    async fn save_namespaces(&self, records: &[NamespaceInfo], _durable: bool) -> Result<()> {
        let mut map = self.inner.namespaces.lock();
        for r in records {
            map.insert(r.name.clone(), r.clone());
        }
        Ok(())
    }

    fn clock(&self) -> u64 {
        self.inner.now() as u64
    }
}

#[async_trait]
impl Housekeeping for MemoryStore {
    async fn stats(&self) -> Result<StoreStats> {
        let inner = &self.inner;
        let (action_results, action_result_bytes) = {
            let map = inner.actions.lock();
            (
                map.len() as u64,
                map.values().map(|r| r.result.len() as u64).sum(),
            )
        };
        let write_refusal = self.write_refusal();
        let blobs = inner.blobs.lock();
        let youngest = inner.youngest_evicted_age.load(Relaxed);
        let mut stats = StoreStats {
            blobs: blobs.map.len() as u64,
            blob_bytes: blobs.map.values().map(|s| s.data.len() as u64).sum(),
            action_results,
            action_result_bytes,
            used_bytes: blobs.used,
            max_size: inner.max_size,
            disk_bytes: 0,
            min_retention_secs: inner.min_retention as u64,
            evicted_blobs: inner.evicted_blobs.load(Relaxed),
            evicted_bytes: inner.evicted_bytes.load(Relaxed),
            youngest_evicted_age_secs: (youngest != u64::MAX).then_some(youngest),
            write_refusal,
            ..StoreStats::default()
        };
        inner.refused.report(&mut stats);
        Ok(stats)
    }

    async fn gc(&self, target: Option<u64>) -> Result<GcReport> {
        let mut blobs = self.inner.blobs.lock();
        let target = target.unwrap_or(self.inner.low);
        let (evicted_blobs, evicted_bytes) = self.inner.evict(&mut blobs, target);
        Ok(GcReport {
            evicted_blobs,
            evicted_bytes,
            expired_action_results: 0,
            used_bytes: blobs.used,
            reached_target: blobs.used + blobs.reserved <= target,
        })
    }

    async fn verify(&self) -> Result<VerifyReport> {
        // Hashed off the lock and off the async threads; a blob is removed only if it still
        // holds the bytes that failed.
        let all: Vec<(Digest, Bytes)> = {
            let blobs = self.inner.blobs.lock();
            blobs
                .map
                .iter()
                .map(|(d, s)| (*d, s.data.clone()))
                .collect()
        };
        let (checked_blobs, checked_bytes, corrupt) = tokio::task::spawn_blocking(move || {
            let bytes: u64 = all.iter().map(|(_, b)| b.len() as u64).sum();
            let count = all.len() as u64;
            let bad: Vec<(Digest, Bytes)> = all
                .into_iter()
                .filter(|(d, b)| verify(*d, b).is_err())
                .collect();
            (count, bytes, bad)
        })
        .await
        .map_err(|e| Error::internal("verifying the memory store", e))?;
        let mut report = VerifyReport {
            checked_blobs,
            checked_bytes,
            ..VerifyReport::default()
        };
        let mut blobs = self.inner.blobs.lock();
        for (digest, bytes) in corrupt {
            if blobs.map.get(&digest).is_some_and(|s| s.data == bytes) {
                if let Some(gone) = blobs.map.remove(&digest) {
                    blobs.used -= (gone.data.len() as u64).min(blobs.used);
                }
                report.corrupt.push(digest.to_string());
            }
        }
        Ok(report)
    }

    async fn maintain(&self) {
        let mut ticks = tokio::time::interval(TICK);
        loop {
            ticks.tick().await;
            let mut blobs = self.inner.blobs.lock();
            if blobs.used + blobs.reserved > self.inner.high {
                self.inner.evict(&mut blobs, self.inner.low);
            }
        }
    }

    async fn remove_abandoned_uploads(&self, max_age: Duration) -> Result<usize> {
        let mut blobs = self.inner.blobs.lock();
        let stale: Vec<String> = blobs
            .uploads
            .iter()
            .filter(|(_, p)| p.claim.is_none() && p.touched.elapsed() >= max_age)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &stale {
            blobs.drop_upload(id);
        }
        Ok(stale.len())
    }

    fn write_refusal(&self) -> Option<String> {
        let blobs = self.inner.blobs.lock();
        (self.inner.retention_blocked.load(Relaxed)
            && blobs.used + blobs.reserved >= self.inner.high)
            .then(|| {
                format!(
                    "cache is full of blobs used within storage.min_retention ({}s)",
                    self.inner.min_retention
                )
            })
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}
