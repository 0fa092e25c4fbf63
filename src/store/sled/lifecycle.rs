//! What happens to stored data over time: the size bound and LRU eviction, the retention
//! promise, last-use bookkeeping, action-result expiry, the cleanup pass after a crash, and
//! `verify`.
//!
//! - **Size.** Every blob is charged against `max_size` (files by whole 4 KiB blocks, inline
//!   blobs with their sled overhead; see [`charge`]), and so is every action result. A write
//!   that would pass `max_size` is refused with RESOURCE_EXHAUSTED; large uploads reserve their
//!   room when they begin, so concurrent uploads cannot overshoot together.
//! - **Eviction** runs in the background ([`maintain`]) once usage passes the high watermark and
//!   evicts least recently used blobs until it is under the low one. It finds its victims with
//!   two passes over the in-memory index (a histogram of last-use times, then the blobs older
//!   than the threshold that frees enough), so it needs no ordered structure updated on every
//!   read, and it never holds a lock a request waits on for longer than one blob.
//! - **Retention.** A blob used within `min_retention` is never evicted. If nothing else can go,
//!   writes are refused, saying so, and `stats` shows how young the evicted blobs were.
//! - **Last use** lives in the in-memory index (an atomic per blob). Times that changed are
//!   written to tree `atime` once a minute and on shutdown; a crash loses at most that minute,
//!   which only makes those blobs look older than they are.
//! - **Crash cleanup.** A clean shutdown leaves a mark file; without it, the next start runs a
//!   cleanup pass in the background: blob files and inline data that no index entry names, stale
//!   temp files and last-use entries are removed. Only this pass (and `verify`) walks the blob
//!   files; start-up itself reads only the index.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::store::files::file_matches;
use crate::store::index::Candidate;

/// What an inline blob costs beyond its bytes: its index entry, data key and last-use entry in
/// sled, rounded up.
pub(super) const INLINE_OVERHEAD: u64 = 64;
/// Name of the file a clean shutdown leaves in the data dir.
const CLEAN_MARK: &str = "clean-shutdown";
/// How often changed last-use times are written to sled.
const PERSIST_USE_EVERY: Duration = Duration::from_secs(60);
/// Between shutdowns, a last use is written only once it moved this far (seconds): LRU order
/// needs no finer grain, and every use of every blob must not become a write.
const PERSIST_STEP: u32 = 600;
/// How often expired action results are swept (they are also refused when looked up).
const EXPIRE_AC_EVERY: Duration = Duration::from_secs(600);
/// How often the maintenance loop looks at usage when nobody wakes it.
const TICK: Duration = Duration::from_secs(1);

/// Key in tree `atime` (not 32 bytes long, so never a blob's) of the time of the last persist.
pub(super) const PERSISTED_AT: &[u8] = b"persisted-at";

/// Bytes a blob of `size` counts against `max_size`.
pub(super) fn charge(size: u64, inline_threshold: u64) -> u64 {
    if size <= inline_threshold {
        size + INLINE_OVERHEAD
    } else {
        size.div_ceil(4096) * 4096
    }
}

/// Whether the last shutdown was clean; removes the mark, so a crash from now on is noticed.
pub(super) fn take_clean_shutdown_mark(data_dir: &Path) -> Result<bool> {
    match std::fs::remove_file(data_dir.join(CLEAN_MARK)) {
        // The removal must survive a power loss, or a crash from now on would look clean.
        Ok(()) => std::fs::File::open(data_dir)
            .and_then(|d| d.sync_all())
            .map(|()| true)
            .map_err(|e| Error::internal(format!("syncing {}", data_dir.display()), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::internal(
            format!("removing {}", data_dir.join(CLEAN_MARK).display()),
            e,
        )),
    }
}

/// Records that everything is flushed and no cleanup is needed at the next start.
pub(super) fn mark_clean_shutdown(data_dir: &Path) -> Result<()> {
    let path = data_dir.join(CLEAN_MARK);
    std::fs::File::create(&path)
        .and_then(|f| f.sync_all())
        .and_then(|()| std::fs::File::open(data_dir)?.sync_all())
        .map_err(|e| Error::internal(format!("writing {}", path.display()), e))
}

/// Sizes, bounds and counters. Lives in the store's `Inner`; all fields are atomics so request
/// paths only ever add to them.
pub(super) struct Lifecycle {
    inline_threshold: u64,
    /// `max_size` as configured (0: derive from the file system) and as in force.
    configured_max: u64,
    max_size: AtomicU64,
    high_pct: u64,
    low_pct: u64,
    min_retention: u32,
    namespaces: NamespacesConfig,
    /// Added to the wall clock; only tests move it.
    clock_offset: AtomicU64,
    /// Charged bytes of blobs and action results: what `max_size` bounds.
    used: AtomicU64,
    /// Room set aside by uploads in progress.
    reserved: AtomicU64,
    blob_bytes: AtomicU64,
    file_bytes: AtomicU64,
    ac_count: AtomicU64,
    ac_bytes: AtomicU64,
    cas_lookups: AtomicU64,
    cas_hits: AtomicU64,
    ac_lookups: AtomicU64,
    ac_hits: AtomicU64,
    evicted_blobs: AtomicU64,
    evicted_bytes: AtomicU64,
    expired_ac: AtomicU64,
    refused_writes: AtomicU64,
    /// Age at eviction of the most recently used blob evicted so far (`u64::MAX`: none).
    youngest_evicted_age: AtomicU64,
    /// The last eviction could not reach its target without breaking the retention promise.
    retention_blocked: AtomicBool,
    /// The last write failed because the disk is full.
    disk_full: AtomicBool,
    /// Wakes the maintenance loop early (usage past the high watermark, disk full).
    wake: tokio::sync::Notify,
    /// The start was unclean and the cleanup pass has not finished yet.
    cleanup_pending: AtomicBool,
    /// Temp files older than this are left from before the start and can go.
    opened_at: std::time::SystemTime,
    /// After an unclean start: every blob counts as used at this second (the last persist of
    /// last-use times before the crash, plus its period), since later uses were lost. 0 if the
    /// start was clean.
    used_floor: AtomicU32,
    /// Set by the final flush: long passes stop early instead of holding up the shutdown.
    stopping: AtomicBool,
    /// Whether the disk can take writes; every write is refused up front while it cannot.
    pub(super) space: Arc<space::Space>,
}

impl Lifecycle {
    pub(super) fn new(options: &Options, unclean: bool, space: Arc<space::Space>) -> Self {
        Lifecycle {
            inline_threshold: options.inline_threshold,
            configured_max: options.max_size,
            max_size: AtomicU64::new(if options.max_size == 0 {
                u64::MAX
            } else {
                options.max_size
            }),
            high_pct: options.high_watermark as u64,
            low_pct: options.low_watermark as u64,
            min_retention: options.min_retention.as_secs().min(u32::MAX as u64) as u32,
            namespaces: options.namespaces.clone(),
            clock_offset: AtomicU64::new(0),
            used: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            blob_bytes: AtomicU64::new(0),
            file_bytes: AtomicU64::new(0),
            ac_count: AtomicU64::new(0),
            ac_bytes: AtomicU64::new(0),
            cas_lookups: AtomicU64::new(0),
            cas_hits: AtomicU64::new(0),
            ac_lookups: AtomicU64::new(0),
            ac_hits: AtomicU64::new(0),
            evicted_blobs: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            expired_ac: AtomicU64::new(0),
            refused_writes: AtomicU64::new(0),
            youngest_evicted_age: AtomicU64::new(u64::MAX),
            retention_blocked: AtomicBool::new(false),
            disk_full: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
            cleanup_pending: AtomicBool::new(unclean),
            opened_at: SystemTime::now(),
            used_floor: AtomicU32::new(0),
            stopping: AtomicBool::new(false),
            space,
        }
    }

    /// The store's clock: Unix seconds (plus the test offset).
    pub(super) fn now(&self) -> u32 {
        let wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        (wall + self.clock_offset.load(Relaxed)).min(u32::MAX as u64) as u32
    }

    pub(super) fn advance_clock(&self, by: Duration) {
        self.clock_offset.fetch_add(by.as_secs(), Relaxed);
    }

    pub(super) fn blob_added(&self, size: u64, charge: u64) {
        self.blob_bytes.fetch_add(size, Relaxed);
        if size > self.inline_threshold {
            self.file_bytes.fetch_add(charge, Relaxed);
        }
        let used = self.used.fetch_add(charge, Relaxed) + charge;
        if used > self.high() {
            self.wake.notify_one();
        }
    }

    pub(super) fn blob_removed(&self, size: u64, charge: u64) {
        self.blob_bytes.fetch_sub(size, Relaxed);
        if size > self.inline_threshold {
            self.file_bytes.fetch_sub(charge, Relaxed);
        }
        self.used.fetch_sub(charge, Relaxed);
    }

    fn ac_changed(&self, added: Option<u64>, removed: Option<u64>) {
        if let Some(n) = added {
            self.ac_count.fetch_add(1, Relaxed);
            self.ac_bytes.fetch_add(n, Relaxed);
            self.used.fetch_add(n, Relaxed);
        }
        if let Some(n) = removed {
            self.ac_count.fetch_sub(1, Relaxed);
            self.ac_bytes.fetch_sub(n, Relaxed);
            self.used.fetch_sub(n, Relaxed);
        }
    }

    /// Counts the action results already stored (at start-up).
    pub(super) fn count_action_results(&self, ac: &sled::Tree) -> Result<()> {
        for entry in ac.iter() {
            let (k, v) = entry?;
            self.ac_changed(Some((k.len() + v.len()) as u64), None);
        }
        Ok(())
    }

    /// Derives `max_size` from the file system if it was not configured: 90% of what the data
    /// dir's file system could hold for hoard (its free space plus what hoard already uses).
    /// Re-derived every upkeep tick, so a start on a disk that was full at that moment does not
    /// shrink the cache for good (ticks only raise it); `announce` sets and logs it (at start).
    pub(super) fn settle_max_size(&self, data_dir: &Path, announce: bool) {
        if self.configured_max != 0 {
            return;
        }
        let Some(free) = space::free_space(data_dir) else {
            if announce {
                tracing::warn!(
                    "cannot tell the data dir's free space; storage.max_size is unbounded"
                );
            }
            return;
        };
        let max = (free.saturating_add(self.used.load(Relaxed))) / 10 * 9;
        if announce {
            self.max_size.store(max, Relaxed);
        } else {
            // Later ticks only raise it: a disk filled by others is handled as a full disk,
            // and bytes of uploads in flight (on disk, not yet in `used`) must not shrink it.
            self.max_size.fetch_max(max, Relaxed);
        }
        if announce {
            tracing::info!(
                max_size = max,
                "storage.max_size not set: using 90% of what the data dir's file system can hold"
            );
        }
    }

    pub(super) fn max_size(&self) -> u64 {
        self.max_size.load(Relaxed)
    }

    fn high(&self) -> u64 {
        (self.max_size() as u128 * self.high_pct as u128 / 100) as u64
    }

    fn low(&self) -> u64 {
        (self.max_size() as u128 * self.low_pct as u128 / 100) as u64
    }

    /// Refuses a write of `charge` bytes that would pass `max_size`, or that the disk cannot
    /// take right now.
    pub(super) fn admit(&self, charge: u64) -> Result<()> {
        self.space.check()?;
        let total = self.used.load(Relaxed) + self.reserved.load(Relaxed);
        if total.saturating_add(charge) <= self.max_size() {
            return Ok(());
        }
        Err(self.refuse(charge))
    }

    fn refuse(&self, charge: u64) -> Error {
        self.refused_writes.fetch_add(1, Relaxed);
        self.wake.notify_one();
        let used = self.used.load(Relaxed) + self.reserved.load(Relaxed);
        let max = self.max_size();
        let floor = self.used_floor.load(Relaxed);
        let cutoff = self.now().saturating_sub(self.min_retention);
        if floor >= cutoff && floor > 0 {
            Error::ResourceExhausted(format!(
                "cache is full: {used} of max_size {max} bytes are used, and after an unclean \
                 shutdown nothing is evicted for storage.min_retention ({}s, {}s from now) \
                 because last uses of the final minute before the crash were lost; raise \
                 storage.max_size or wait",
                self.min_retention,
                floor - cutoff
            ))
        } else if self.retention_blocked.load(Relaxed) {
            Error::ResourceExhausted(format!(
                "cache is full: {used} of max_size {max} bytes are used and every stored blob \
                 was used within storage.min_retention ({}s), which hoard promises not to \
                 evict; raise storage.max_size or lower storage.min_retention",
                self.min_retention
            ))
        } else {
            Error::ResourceExhausted(format!(
                "cache is full: {used} of max_size {max} bytes are used and {charge} more were \
                 asked for; eviction is making room, retry shortly"
            ))
        }
    }

    /// Notices disk-full failures (to evict and report not-ready) and their end.
    pub(super) fn note_write<T>(&self, result: &Result<T>) {
        match result {
            Err(Error::StorageUnwritable(_)) => self.space.mark(space::Unwritable::ReadOnly),
            Err(Error::StorageFull(_)) => {
                self.space.mark(space::Unwritable::Full);
                if !self.disk_full.swap(true, Relaxed) {
                    tracing::error!("the data dir's disk is full; evicting to make room");
                }
                self.wake.notify_one();
            }
            Ok(_) => {
                if self.disk_full.swap(false, Relaxed) {
                    tracing::info!("writes succeed again after the disk was full");
                }
            }
            Err(_) => {}
        }
    }

    pub(super) fn write_refusal(&self) -> Option<String> {
        if let Some(why) = self.space.broken() {
            return Some(format!(
                "the database failed to write ({why}); restart hoard to take writes again"
            ));
        }
        match self.space.reason() {
            Some(space::Unwritable::Full) => {
                return Some("the data dir's disk is full; evicting to make room".into())
            }
            Some(space::Unwritable::ReadOnly) => {
                return Some("the data dir's file system is read-only".into())
            }
            None => {}
        }
        let total = self.used.load(Relaxed) + self.reserved.load(Relaxed);
        if self.retention_blocked.load(Relaxed) && total >= self.high() {
            return Some(format!(
                "cache is full of blobs used within storage.min_retention ({}s)",
                self.min_retention
            ));
        }
        None
    }

    pub(super) fn cleanup_pending(&self) -> bool {
        self.cleanup_pending.load(Relaxed)
    }

    /// After an unclean start, last uses after `persisted_at` (the last persist before the
    /// crash) are lost: until `min_retention` has passed since then, no blob is evicted.
    pub(super) fn set_used_floor(&self, persisted_at: Option<u32>) {
        let floor = match persisted_at {
            Some(t) => t.saturating_add(PERSIST_USE_EVERY.as_secs() as u32 + 1),
            None => self.now(),
        };
        self.used_floor.store(floor, Relaxed);
    }

    /// Asks long passes (cleanup, verify) to stop at the next blob.
    pub(super) fn stop(&self) {
        self.stopping.store(true, Relaxed);
    }

    fn check_stopping(&self) -> Result<()> {
        if self.stopping.load(Relaxed) {
            return Err(Error::Unavailable(
                "the store is shutting down; the pass will run again".into(),
            ));
        }
        Ok(())
    }

    pub(super) fn count_cas_lookups(&self, asked: u64, found: u64) {
        self.cas_lookups.fetch_add(asked, Relaxed);
        self.cas_hits.fetch_add(found, Relaxed);
    }
}

/// Room for one upload under `max_size`, given back when dropped. Large uploads grow theirs
/// as bytes arrive ([`Reservation::grow_to`]), so a client that declares a huge blob and then
/// stalls holds at most one step beyond what it sent, not the whole declared size.
pub(crate) struct Reservation {
    store: Arc<Inner>,
    charge: u64,
}

impl Reservation {
    /// Room held now.
    pub(crate) fn charge(&self) -> u64 {
        self.charge
    }

    /// Holds `charge` bytes in all (no-op if it holds that much already), or refuses.
    pub(crate) fn grow_to(&mut self, charge: u64) -> Result<()> {
        if charge > self.charge {
            self.store.take_room(charge - self.charge)?;
            self.charge = charge;
        }
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.store.life.reserved.fetch_sub(self.charge, Relaxed);
    }
}

/// The outcome of one eviction run.
#[derive(Default)]
struct Evicted {
    blobs: u64,
    bytes: u64,
    reached: bool,
}

impl Inner {
    /// Sets aside room for a blob file about to be written, or refuses it.
    pub(super) fn reserve(self: &Arc<Self>, charge: u64) -> Result<Reservation> {
        self.take_room(charge)?;
        Ok(Reservation {
            store: self.clone(),
            charge,
        })
    }

    /// Adds `charge` to the reserved bytes if it fits under `max_size` and on the disk.
    fn take_room(&self, charge: u64) -> Result<()> {
        let life = &self.life;
        if let Err(e) = life.space.check_room(charge) {
            // Only this write is refused (smaller ones may still fit); eviction makes room.
            life.disk_full.store(true, Relaxed);
            life.wake.notify_one();
            return Err(e);
        }
        let before = life.reserved.fetch_add(charge, Relaxed);
        let total = life.used.load(Relaxed) + before;
        if total.saturating_add(charge) > life.max_size() {
            life.reserved.fetch_sub(charge, Relaxed);
            return Err(life.refuse(charge));
        }
        Ok(())
    }

    pub(super) fn get_action_result(
        &self,
        instance: &str,
        action: &Digest,
    ) -> Result<Option<Bytes>> {
        let life = &self.life;
        life.ac_lookups.fetch_add(1, Relaxed);
        let key = ac_key(instance, action);
        let Some(value) = self.ac.get(&key)? else {
            return Ok(None);
        };
        let Some((used, epoch)) = ac_header(&value) else {
            self.remove_action_result(&key, &value)?;
            return Ok(None);
        };
        let now = life.now();
        if epoch < self.namespaces.epoch_and_touch(instance, now)? {
            // Invalidated with its whole namespace; the space is reclaimed right here.
            self.remove_action_result(&key, &value)?;
            return Ok(None);
        }
        let ttl = life.namespaces.ac_ttl(instance).as_secs();
        let idle = now.saturating_sub(used) as u64;
        if ttl > 0 && idle > ttl {
            if self.remove_action_result(&key, &value)? {
                life.expired_ac.fetch_add(1, Relaxed);
            }
            return Ok(None);
        }
        // Record the use, coarsely: a hit rewrites the entry at most every ttl/16 (≤ 1h).
        let coarse = if ttl > 0 {
            (ttl / 16).clamp(1, 3600)
        } else {
            3600
        };
        if idle >= coarse {
            let mut renewed = value.to_vec();
            renewed[..4].copy_from_slice(&now.to_be_bytes());
            // Losing the race to a concurrent update is fine: that one is newer.
            let _ = self
                .ac
                .compare_and_swap(&key, Some(&value), Some(renewed))?;
        }
        life.ac_hits.fetch_add(1, Relaxed);
        Ok(Some(Bytes::copy_from_slice(&value[AC_HEADER..])))
    }

    /// Removes one action result if it still has `value`; true if it did.
    fn remove_action_result(&self, key: &[u8], value: &sled::IVec) -> Result<bool> {
        let removed = self
            .ac
            .compare_and_swap(key, Some(value), None as Option<&[u8]>)?
            .is_ok();
        if removed {
            self.life
                .ac_changed(None, Some((key.len() + value.len()) as u64));
        }
        Ok(removed)
    }

    /// Stores an action result; returns once it is durable (taken back if it cannot be).
    pub(super) async fn put_action_result(
        &self,
        instance: &str,
        action: &Digest,
        result: &[u8],
    ) -> Result<()> {
        let key = ac_key(instance, action);
        let charge = (key.len() + AC_HEADER + result.len()) as u64;
        self.life.admit(charge)?;
        let now = self.life.now();
        let epoch = self.namespaces.epoch_and_touch(instance, now)?;
        let mut value = Vec::with_capacity(AC_HEADER + result.len());
        value.extend_from_slice(&now.to_be_bytes());
        value.extend_from_slice(&epoch.to_be_bytes());
        value.extend_from_slice(result);
        let old = self.ac.insert(&key, value.clone())?;
        let old_len = old.as_ref().map(|o| (key.len() + o.len()) as u64);
        self.life.ac_changed(Some(charge), old_len);
        if let Err(e) = self.commit.durable().await {
            // Never acknowledged: put back what was there, unless a newer write replaced it.
            if self
                .ac
                .compare_and_swap(&key, Some(value), old.clone())
                .is_ok_and(|swapped| swapped.is_ok())
            {
                self.life.ac_changed(old_len, Some(charge));
            }
            return Err(e);
        }
        Ok(())
    }

    /// Removes the listed action results of `instance`; returns how many there were.
    pub(super) fn invalidate_actions(&self, instance: &str, actions: &[Digest]) -> Result<u64> {
        let mut removed = 0;
        for action in actions {
            let key = ac_key(instance, action);
            if let Some(old) = self.ac.remove(&key)? {
                self.life
                    .ac_changed(None, Some((key.len() + old.len()) as u64));
                removed += 1;
            }
        }
        self.db.flush()?;
        Ok(removed)
    }

    /// Bumps the epoch of `instance` and makes it durable before returning.
    pub(super) fn invalidate_namespace(&self, instance: &str, reason: &str) -> Result<u64> {
        let epoch = self.namespaces.bump(instance, self.life.now(), reason)?;
        self.db.flush()?;
        Ok(epoch)
    }

    /// Deletes every action result of `instance` and its record.
    pub(super) fn drop_namespace(&self, instance: &str) -> Result<u64> {
        let mut prefix = instance.as_bytes().to_vec();
        prefix.push(0);
        let mut removed = 0;
        for entry in self.ac.scan_prefix(&prefix) {
            let (key, value) = entry?;
            if self.remove_action_result(&key, &value)? {
                removed += 1;
            }
        }
        self.namespaces.remove(instance)?;
        self.db.flush()?;
        Ok(removed)
    }

    /// Writes last-use times newer than the ones on disk to tree `atime`: every one at shutdown
    /// (`all`), otherwise only those that moved by [`PERSIST_STEP`] or more. One insert at a
    /// time: sled's `apply_batch` takes a process-wide write lock that stalls every other read
    /// and write (and its memory grows with the batch), measured at 300 ms stalls and GBs of RSS
    /// after a million blobs were touched. Coarse periodic writes are safe: after a crash,
    /// nothing is evicted until `min_retention` has passed since the last persist anyway.
    pub(super) fn persist_use(&self, all: bool) -> Result<()> {
        let mut changed = Vec::new();
        let step = if all { 1 } else { PERSIST_STEP };
        self.index
            .take_unpersisted(step, |hash, used| changed.push((*hash, used)));
        for (hash, used) in changed {
            self.atime.insert(hash, &used.to_be_bytes())?;
        }
        // When last uses were last persisted: after a crash, later ones are known to be lost.
        self.atime
            .insert(PERSISTED_AT, &self.life.now().to_be_bytes())?;
        self.namespaces.persist()?;
        Ok(())
    }

    /// Evicts least recently used blobs until usage is at most `target`, sparing every blob
    /// used within `min_retention`.
    fn evict(&self, target: u64) -> Result<Evicted> {
        let life = &self.life;
        let mut out = Evicted::default();
        let usage = || life.used.load(Relaxed) + life.reserved.load(Relaxed);
        if usage() <= target {
            out.reached = true;
            return Ok(out);
        }
        let now = life.now();
        let cutoff = now.saturating_sub(life.min_retention);
        if life.used_floor.load(Relaxed) >= cutoff {
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
        let life = &self.life;
        life.evicted_blobs.fetch_add(1, Relaxed);
        life.evicted_bytes.fetch_add(charge, Relaxed);
        life.youngest_evicted_age
            .fetch_min(now.saturating_sub(c.used) as u64, Relaxed);
        life.blob_removed(digest.size, charge);
        self.atime.remove(digest.hash)?;
        match self
            .cas
            .remove(digest.hash)?
            .as_deref()
            .and_then(decode_entry)
        {
            Some((Location::Inline { id }, _)) => {
                self.blobs.remove(id.to_be_bytes())?;
            }
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

    /// Drops action results unused for longer than their instance's TTL; returns how many.
    fn expire_action_results(&self) -> Result<u64> {
        let now = self.life.now();
        let mut expired = 0;
        for entry in self.ac.iter() {
            let (key, value) = entry?;
            let Some(sep) = key.iter().position(|&b| b == 0) else {
                continue;
            };
            let instance = String::from_utf8_lossy(&key[..sep]);
            let ttl = self.life.namespaces.ac_ttl(&instance).as_secs();
            let stale = match ac_header(&value) {
                Some((used, epoch)) => {
                    (ttl > 0 && now.saturating_sub(used) as u64 > ttl)
                        || epoch < self.namespaces.epoch(&instance)
                }
                None => true,
            };
            if stale && self.remove_action_result(&key, &value)? {
                expired += 1;
            }
        }
        self.life.expired_ac.fetch_add(expired, Relaxed);
        Ok(expired)
    }

    /// Removes what no index entry names: blob files, inline data, last-use entries, and temp
    /// files from before the store opened. Returns (pieces, bytes) removed.
    fn remove_orphans(&self) -> Result<(u64, u64)> {
        let _pass = self.upkeep.lock();
        let (mut pieces, mut bytes) = (0u64, 0u64);
        // Temp files of whole-blob writes never outlive a process.
        for entry in std::fs::read_dir(self.files.uploads_dir())? {
            let entry = entry?;
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with("tmp-") {
                continue;
            }
            // The abandoned-upload sweep may remove the same files meanwhile.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.modified().is_ok_and(|m| m < self.life.opened_at) {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => {
                        pieces += 1;
                        bytes += meta.len();
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        // Blob files: kept only if the index entry of their hash says "file".
        for shard in std::fs::read_dir(self.files.cas_dir())? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            self.life.check_stopping()?;
            for entry in std::fs::read_dir(shard.path())? {
                let entry = entry?;
                let name = entry.file_name();
                let Some(hash) = crate::digest::parse_hex_hash(&name.to_string_lossy()) else {
                    continue;
                };
                let probe = Digest { hash, size: 0 };
                let _stripe = self.stripe(&probe);
                let is_file = matches!(
                    self.cas.get(hash)?.as_deref().and_then(decode_entry),
                    Some((Location::File { .. }, _))
                );
                if !is_file {
                    let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                    match std::fs::remove_file(entry.path()) {
                        Ok(()) => {
                            pieces += 1;
                            bytes += len;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        // Inline data: ids taken before this point belong to finished writes (the gate waits
        // for writes in progress), so any of them no index entry names is an orphan.
        let first_unsettled = {
            let _all_settled = self.inline_gate.write();
            self.db.generate_id()?
        };
        let mut named = HashSet::new();
        for entry in self.cas.iter() {
            let (_, value) = entry?;
            if let Some((Location::Inline { id }, _)) = decode_entry(&value) {
                named.insert(id);
            }
        }
        for entry in self.blobs.range(..first_unsettled.to_be_bytes()) {
            let (key, value) = entry?;
            let Ok(id) = <[u8; 8]>::try_from(&key[..]).map(u64::from_be_bytes) else {
                continue;
            };
            if !named.contains(&id) && self.blobs.remove(&key)?.is_some() {
                pieces += 1;
                bytes += value.len() as u64;
            }
        }
        // Last-use entries of blobs that are gone.
        for entry in self.atime.iter() {
            let (key, _) = entry?;
            if let Ok(hash) = <[u8; HASH_LEN]>::try_from(&key[..]) {
                if !self.index.has_hash(&hash) {
                    self.atime.remove(&key)?;
                }
            }
        }
        Ok((pieces, bytes))
    }

    /// Re-hashes every blob with SHA-256, drops the damaged ones, then removes orphans.
    pub(super) fn verify(&self) -> Result<VerifyReport> {
        // No `upkeep` lock while hashing (hours on a big store): eviction and shutdown go on;
        // `drop_damaged` takes the hash's stripe lock.
        let mut report = VerifyReport::default();
        let mut buf = vec![0u8; 1 << 20];
        for entry in self.cas.iter() {
            self.life.check_stopping()?;
            let (key, value) = entry?;
            let (Ok(hash), Some((location, size))) =
                (<[u8; HASH_LEN]>::try_from(&key[..]), decode_entry(&value))
            else {
                continue;
            };
            let digest = Digest { hash, size };
            let sound = match location {
                Location::Inline { id } => self
                    .blobs
                    .get(id.to_be_bytes())?
                    .is_some_and(|data| verify(digest, &data).is_ok()),
                Location::File { .. } => {
                    file_matches(&self.files.blob_path(&digest), &digest, &mut buf)
                }
            };
            report.checked_blobs += 1;
            report.checked_bytes += size;
            if !sound {
                self.drop_damaged(
                    &digest,
                    location,
                    "verify: content does not match its digest",
                );
                report.corrupt.push(digest.to_string());
            }
        }
        let (pieces, bytes) = self.remove_orphans()?;
        report.orphans_removed = pieces;
        report.orphan_bytes_removed = bytes;
        Ok(report)
    }

    /// Evicts down to `target` (the low watermark if `None`) and expires action results.
    pub(super) fn gc(&self, target: Option<u64>) -> Result<GcReport> {
        let _pass = self.upkeep.lock();
        let expired = self.expire_action_results()?;
        let evicted = self.evict(target.unwrap_or_else(|| self.life.low()))?;
        self.life.retention_blocked.store(!evicted.reached, Relaxed);
        Ok(GcReport {
            evicted_blobs: evicted.blobs,
            evicted_bytes: evicted.bytes,
            expired_action_results: expired,
            used_bytes: self.life.used.load(Relaxed),
            reached_target: evicted.reached,
        })
    }

    pub(super) fn stats(&self) -> StoreStats {
        let l = &self.life;
        let youngest = l.youngest_evicted_age.load(Relaxed);
        StoreStats {
            blobs: self.index.len() as u64,
            blob_bytes: l.blob_bytes.load(Relaxed),
            action_results: l.ac_count.load(Relaxed),
            action_result_bytes: l.ac_bytes.load(Relaxed),
            used_bytes: l.used.load(Relaxed),
            max_size: l.max_size(),
            disk_bytes: self.db.size_on_disk().unwrap_or(0) + l.file_bytes.load(Relaxed),
            min_retention_secs: l.min_retention as u64,
            evicted_blobs: l.evicted_blobs.load(Relaxed),
            evicted_bytes: l.evicted_bytes.load(Relaxed),
            youngest_evicted_age_secs: (youngest != u64::MAX).then_some(youngest),
            expired_action_results: l.expired_ac.load(Relaxed),
            cas_lookups: l.cas_lookups.load(Relaxed),
            cas_hits: l.cas_hits.load(Relaxed),
            ac_lookups: l.ac_lookups.load(Relaxed),
            ac_hits: l.ac_hits.load(Relaxed),
            refused_writes: l.refused_writes.load(Relaxed),
            write_refusal: l.write_refusal(),
            cleanup_pending: l.cleanup_pending.load(Relaxed),
        }
    }

    /// One round of upkeep: evict if usage passed the high watermark (or the disk is full).
    fn evict_if_needed(&self) -> Result<()> {
        let life = &self.life;
        let usage = life.used.load(Relaxed) + life.reserved.load(Relaxed);
        let disk_full = life.disk_full.load(Relaxed);
        if usage <= life.high() && !disk_full {
            if usage <= life.low() {
                life.retention_blocked.store(false, Relaxed);
            }
            return Ok(());
        }
        let mut target = life.low();
        if disk_full {
            // Whatever the configured bound, the disk has less: make some room below usage.
            let margin = (usage / 50).max(64 << 20);
            target = target.min(usage.saturating_sub(margin));
        }
        let started = Instant::now();
        let _pass = self.upkeep.lock();
        let evicted = self.evict(target)?;
        life.retention_blocked.store(!evicted.reached, Relaxed);
        if disk_full && evicted.blobs > 0 {
            life.disk_full.store(false, Relaxed);
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
                used = life.used.load(Relaxed),
                max_size = life.max_size(),
                "cannot evict enough: every remaining blob was used within storage.min_retention"
            );
        }
        Ok(())
    }
}

/// Bytes before the encoded ActionResult in an `ac` value: last use (u32), epoch (u64).
pub(super) const AC_HEADER: usize = 12;

/// Last use and epoch of an `ac` value.
fn ac_header(value: &[u8]) -> Option<(u32, u64)> {
    let used = u32::from_be_bytes(value.get(..4)?.try_into().ok()?);
    let epoch = u64::from_be_bytes(value.get(4..AC_HEADER)?.try_into().ok()?);
    Some((used, epoch))
}

/// The store's background upkeep (see [`Store::maintain`]).
pub(super) async fn maintain(inner: Arc<Inner>) {
    if inner.life.cleanup_pending.load(Relaxed) {
        let store = inner.clone();
        let started = Instant::now();
        match run_blocking(move || store.remove_orphans()).await {
            Ok((pieces, bytes)) => {
                inner.life.cleanup_pending.store(false, Relaxed);
                tracing::info!(
                    pieces,
                    bytes,
                    took_ms = started.elapsed().as_millis() as u64,
                    "cleanup after an unclean shutdown: removed unreferenced data"
                )
            }
            Err(e) => tracing::error!(
                error = %e,
                "cleanup after an unclean shutdown failed; it runs again at the next start"
            ),
        }
    }
    let mut last_persist = Instant::now();
    let mut last_expiry = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = inner.life.wake.notified() => {}
        }
        let store = inner.clone();
        let persist = last_persist.elapsed() >= PERSIST_USE_EVERY;
        let expire = last_expiry.elapsed() >= EXPIRE_AC_EVERY;
        let result = run_blocking(move || {
            // Keeps sled's cushion, and lifts a write refusal within a tick of space coming back.
            // While the disk cannot take writes, only eviction (which frees space) writes.
            let writable = store.life.space.top_up();
            store.life.settle_max_size(&store.data_dir, false);
            store.evict_if_needed()?;
            if !writable {
                return Ok(());
            }
            if persist {
                store.persist_use(false)?;
            }
            if expire {
                let _pass = store.upkeep.lock();
                store.expire_action_results()?;
            }
            Ok(())
        })
        .await;
        if persist {
            last_persist = Instant::now();
        }
        if expire {
            last_expiry = Instant::now();
        }
        if let Err(e) = result {
            tracing::warn!(error = %e, "storage upkeep failed; retrying");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[tokio::test]
    async fn action_results_of_the_old_format_are_dropped_not_misread() {
        let tmp = tempfile::tempdir().unwrap();
        let action = Digest::of(b"action");
        {
            let store = SledStore::open(tmp.path(), 64 << 10, 16 << 20).unwrap();
            // As format 1 wrote it: the encoded result without the last-use prefix.
            store
                .inner
                .ac
                .insert(ac_key("", &action), &b"\x0a\x02hi"[..])
                .unwrap();
            store.inner.db.remove("format").unwrap();
            store.flush().await.unwrap();
        }
        let store = SledStore::open(tmp.path(), 64 << 10, 16 << 20).unwrap();
        assert_eq!(store.get_action_result("", &action).await.unwrap(), None);
        store
            .put_action_result("", &action, Bytes::from_static(b"new"))
            .await
            .unwrap();
        store.flush().await.unwrap();
        drop(store);
        // Format 2 data is kept across restarts.
        let store = SledStore::open(tmp.path(), 64 << 10, 16 << 20).unwrap();
        assert_eq!(
            store.get_action_result("", &action).await.unwrap(),
            Some(Bytes::from_static(b"new"))
        );
        assert_eq!(store.stats().await.unwrap().action_results, 1);
    }

    #[tokio::test]
    async fn after_a_crash_nothing_is_evicted_until_lost_uses_are_past_retention() {
        let tmp = tempfile::tempdir().unwrap();
        let blob = Bytes::from(vec![7u8; 100_000]);
        let digest = Digest::of(&blob);
        {
            let store = SledStore::open(tmp.path(), 64 << 10, 16 << 20).unwrap();
            store.put(&digest, blob.clone()).await.unwrap();
            store.inner.persist_use(true).unwrap();
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
        // Past retention from the last persist (plus its period), it may go.
        store.advance_clock(Duration::from_secs(3600 + 120));
        let report = store.gc(Some(0)).await.unwrap();
        assert!(report.evicted_blobs >= 1, "{report:?}");
        assert_eq!(store.find_missing(&[digest]).await.unwrap(), vec![digest]);
    }

    #[tokio::test]
    async fn a_clean_restart_reads_the_index_snapshot_and_forgets_what_sled_lacks() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (
            Bytes::from(vec![1u8; 1000]),
            Bytes::from(vec![2u8; 100_000]),
        );
        let (da, db) = (Digest::of(&a), Digest::of(&b));
        {
            let store = SledStore::open(tmp.path(), 64 << 10, 16 << 20).unwrap();
            store.put(&da, a).await.unwrap();
            store.put(&db, b).await.unwrap();
            store.flush().await.unwrap();
        }
        assert!(tmp.path().join("index.snapshot").exists());
        // Behind the snapshot's back, sled loses blob a's index entry.
        {
            let db = sled::open(tmp.path().join("sled")).unwrap();
            db.open_tree("cas").unwrap().remove(da.hash).unwrap();
            db.flush().unwrap();
        }
        let store = SledStore::open(tmp.path(), 64 << 10, 16 << 20).unwrap();
        assert!(
            !tmp.path().join("index.snapshot").exists(),
            "a snapshot is read once"
        );
        let stats = store.stats().await.unwrap();
        assert_eq!((stats.blobs, stats.blob_bytes), (2, 101_000), "{stats:?}");
        // The snapshot says a is there; the first read finds it is not, and forgets it.
        assert_eq!(store.get(&da).await.unwrap(), None);
        assert_eq!(store.find_missing(&[da, db]).await.unwrap(), vec![da]);
        assert_eq!(
            store.get(&db).await.unwrap().map(|d| d.len()),
            Some(100_000)
        );
        assert_eq!(store.stats().await.unwrap().blob_bytes, 100_000);
    }

    #[test]
    fn charges_whole_blocks_for_files_and_overhead_for_inline_blobs() {
        assert_eq!(charge(10, 64 << 10), 10 + INLINE_OVERHEAD);
        assert_eq!(charge(65 << 10, 64 << 10), 68 << 10);
        assert_eq!(charge(128 << 10, 64 << 10), 128 << 10);
    }
}
