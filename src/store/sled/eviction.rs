//! LRU eviction and the retention promise.
//!
//! Eviction runs in the background ([`super::upkeep::maintain`]) once usage passes the high
//! watermark and evicts least recently used blobs until it is under the low one. It finds its
//! victims with two passes over the in-memory index (a histogram of last-use times, then the
//! blobs older than the threshold that frees enough), so it needs no ordered structure updated
//! on every read, and it never holds a lock a request waits on for longer than one blob.
//!
//! **Retention.** A blob used within `min_retention` is never evicted. If nothing else can go,
//! writes are refused, saying so, and `stats` shows how young the evicted blobs were. After an
//! unclean start, nothing is evicted until `min_retention` has passed since the last persisted
//! last use (later ones were lost).
//!
//! Must not: evict a blob used within `min_retention`; run on a cache request path (the upkeep
//! loop and the admin `gc` call it).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use super::entry::{decode_entry, Location};
use super::upkeep::{CHECKPOINT_EVERY, PERSIST_STEP};
use super::{Inner, Options};
use crate::error::{Error, Result};
use crate::store::index::Candidate;

/// The retention promise and what eviction did so far.
pub(super) struct Eviction {
    /// Blobs used within this many seconds are never evicted.
    pub(super) min_retention: u32,
    /// After an unclean start: every blob counts as used at this second (the last checkpoint
    /// before the crash, plus its period), since later uses were lost. 0 if the start was
    /// clean.
    used_floor: AtomicU32,
    /// The last eviction could not reach its target without breaking the retention promise.
    pub(super) retention_blocked: AtomicBool,
    pub(super) evicted_blobs: AtomicU64,
    pub(super) evicted_bytes: AtomicU64,
    /// Age at eviction of the most recently used blob evicted so far (`u64::MAX`: none).
    pub(super) youngest_evicted_age: AtomicU64,
}

impl Eviction {
    pub(super) fn new(options: &Options) -> Self {
        Eviction {
            min_retention: options.min_retention.as_secs().min(u32::MAX as u64) as u32,
            used_floor: AtomicU32::new(0),
            retention_blocked: AtomicBool::new(false),
            evicted_blobs: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            youngest_evicted_age: AtomicU64::new(u64::MAX),
        }
    }

    /// After an unclean start, last uses after `persisted_at` (the last checkpoint before the
    /// crash) are lost: until `min_retention` has passed since then, no blob is evicted.
    pub(super) fn set_used_floor(&self, persisted_at: Option<u32>, now: u32) {
        let floor = match persisted_at {
            // A checkpoint comes a period after a change, and a use counts as one only once it
            // moved `PERSIST_STEP`: a use this long after the last checkpoint may be lost.
            Some(t) => t.saturating_add(CHECKPOINT_EVERY.as_secs() as u32 + PERSIST_STEP + 1),
            None => now,
        };
        self.used_floor.store(floor, Relaxed);
    }

    pub(super) fn used_floor(&self) -> u32 {
        self.used_floor.load(Relaxed)
    }
}

/// The outcome of one eviction run.
#[derive(Default)]
pub(super) struct Evicted {
    pub(super) blobs: u64,
    pub(super) bytes: u64,
    pub(super) reached: bool,
}

impl Inner {
    /// One round of upkeep: evict if usage passed the high watermark (or the disk is full).
    pub(super) fn evict_if_needed(&self) -> Result<()> {
        let usage = self.usage.total();
        let disk_full = self.usage.disk_full.load(Relaxed);
        if usage <= self.usage.high() && !disk_full {
            if usage <= self.usage.low() {
                self.eviction.retention_blocked.store(false, Relaxed);
            }
            return Ok(());
        }
        let mut target = self.usage.low();
        if disk_full {
            // Whatever the configured bound, the disk has less: make some room below usage.
            let margin = (usage / 50).max(64 << 20);
            target = target.min(usage.saturating_sub(margin));
        }
        let started = Instant::now();
        let _pass = self.upkeep.pass.lock();
        let evicted = self.evict(target)?;
        self.eviction
            .retention_blocked
            .store(!evicted.reached, Relaxed);
        if disk_full && evicted.blobs > 0 {
            self.usage.disk_full.store(false, Relaxed);
        }
        if evicted.blobs > 0 {
            tracing::info!(
                blobs = evicted.blobs,
                bytes = evicted.bytes,
                took_ms = started.elapsed().as_millis() as u64,
                "evicted least recently used blobs"
            );
        }
        if !evicted.reached {
            tracing::warn!(
                used = self.usage.used(),
                max_size = self.usage.max_size(),
                "cannot evict enough: every remaining blob was used within storage.min_retention"
            );
        }
        Ok(())
    }

    /// Evicts least recently used blobs until usage is at most `target`, sparing every blob
    /// used within `min_retention`.
    pub(super) fn evict(&self, target: u64) -> Result<Evicted> {
        let mut out = Evicted::default();
        let usage = || self.usage.total();
        if usage() <= target {
            out.reached = true;
            return Ok(out);
        }
        let now = self.clock.now();
        let cutoff = now.saturating_sub(self.eviction.min_retention);
        if self.eviction.used_floor() >= cutoff {
            // Too soon after a crash: any blob may have been used in the lost final minute.
            return Ok(out);
        }
        // Pass 1: bytes per minute of last use, among blobs old enough to go.
        let mut by_minute: BTreeMap<u32, u64> = BTreeMap::new();
        self.index.for_each(|c| {
            if c.used < cutoff {
                *by_minute.entry(c.used / 60).or_default() += self.charge(c.digest.size);
            }
        });
        let need = usage().saturating_sub(target);
        let mut freed = 0u64;
        let mut last_minute = None;
        for (&minute, &bytes) in &by_minute {
            freed += bytes;
            last_minute = Some(minute);
            if freed >= need {
                break;
            }
        }
        // Pass 2: those blobs, oldest first.
        if let Some(last_minute) = last_minute {
            let mut victims: Vec<Candidate> = Vec::new();
            self.index.for_each(|c| {
                if c.used < cutoff && c.used / 60 <= last_minute {
                    victims.push(c);
                }
            });
            victims.sort_unstable_by_key(|c| c.used);
            for c in victims {
                if usage() <= target {
                    break;
                }
                if let Some(charge) = self.evict_one(&c, cutoff, now)? {
                    out.blobs += 1;
                    out.bytes += charge;
                }
            }
        }
        out.reached = usage() <= target;
        Ok(out)
    }

    /// Removes one blob if it is still unused since `cutoff`; returns its charge if it did.
    /// Index entry first (so it is invisible at once), then sled entries, then its data.
    fn evict_one(&self, c: &Candidate, cutoff: u32, now: u32) -> Result<Option<u64>> {
        let digest = c.digest;
        let _stripe = self.stripe(&digest);
        if !self.index.remove_if_unused_since(&digest, cutoff) {
            return Ok(None);
        }
        let charge = self.charge(digest.size);
        // Counted before usage drops, so whoever sees the room also sees why.
        let e = &self.eviction;
        e.evicted_blobs.fetch_add(1, Relaxed);
        e.evicted_bytes.fetch_add(charge, Relaxed);
        e.youngest_evicted_age
            .fetch_min(now.saturating_sub(c.used) as u64, Relaxed);
        self.usage.blob_removed(digest.size, charge);
        // A small blob's record is dead now (compaction reclaims it); it has no sled entry.
        if c.place.is_some() {
            return Ok(Some(charge));
        }
        match self
            .cas
            .remove(digest.hash)?
            .as_deref()
            .and_then(decode_entry)
        {
            Some((Location::Inline { id }, _)) => {
                self.blobs.remove(id.to_be_bytes())?;
            }
            Some((Location::Segment { .. }, _)) => {}
            Some((Location::File { .. }, _)) => {
                match std::fs::remove_file(self.files.blob_path(&digest)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::internal(format!("evicting {digest}"), e)),
                }
            }
            None => {}
        }
        Ok(Some(charge))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use crate::digest::Digest;
    use crate::store::sled::SledStore;
    use crate::store::{Cas as _, Housekeeping as _};

    #[tokio::test]
    async fn after_a_crash_nothing_is_evicted_until_lost_uses_are_past_retention() {
        let tmp = tempfile::tempdir().unwrap();
        let blob = Bytes::from(vec![7u8; 100_000]);
        let digest = Digest::of(&blob);
        {
            let store = SledStore::open(tmp.path(), 64 << 10, 16 << 20).unwrap();
            store.put(&digest, blob.clone()).await.unwrap();
            store.inner.checkpoint(true).unwrap();
            // A use after the last persist, then a crash (no flush, so no clean mark).
            store.advance_clock(Duration::from_secs(30));
            assert!(store.find_missing(&[digest]).await.unwrap().is_empty());
            store.inner.db.flush().unwrap();
        }
        let store = SledStore::open(tmp.path(), 64 << 10, 16 << 20).unwrap();
        assert!(store.stats().await.unwrap().cleanup_pending);
        // 3h retention: two hours on, the lost use might have been 2h ago: the blob stays.
        store.advance_clock(Duration::from_secs(2 * 3600));
        let report = store.gc(Some(0)).await.unwrap();
        assert_eq!(report.evicted_blobs, 0, "{report:?}");
        let err = store.put(&Digest::of(b"x"), Bytes::from_static(b"x")).await;
        assert!(err.is_ok(), "writes below max_size are unaffected: {err:?}");
        // Past retention from the last checkpoint (plus its period), it may go.
        store.advance_clock(Duration::from_secs(3600 + 960));
        let report = store.gc(Some(0)).await.unwrap();
        assert!(report.evicted_blobs >= 1, "{report:?}");
        assert_eq!(store.find_missing(&[digest]).await.unwrap(), vec![digest]);
    }
}
