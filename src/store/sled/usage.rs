//! Usage accounting: every blob is charged against `max_size` (files by whole 4 KiB blocks,
//! inline blobs with their sled overhead; see [`charge`]), and so is every action result. A
//! write that would pass `max_size` is refused with RESOURCE_EXHAUSTED that says why; large
//! uploads reserve their room as they go ([`Reservation`]), so concurrent uploads cannot
//! overshoot together. Also `max_size` derived from the file system, the counters `stats`
//! reports, and noticing a full or read-only disk from write failures.
//!
//! Request paths only add to atomics here. Must not: evict or delete anything (it wakes the
//! upkeep loop instead).

use crate::store::segments::HEADER_LEN;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::space::{self, Unwritable};
use super::{Inner, Options};
use crate::error::{Error, Result};
use crate::store::refused::{Refusal, RefusedWrites};
use crate::store::StoreStats;

/// What a small blob costs beyond its bytes: its segment record header, plus its entry in the
/// index checkpoint, rounded up.
const INLINE_OVERHEAD: u64 = 64 + HEADER_LEN;

/// Bytes a blob of `size` counts against `max_size`.
pub(super) fn charge(size: u64, inline_threshold: u64) -> u64 {
    if size <= inline_threshold {
        size + INLINE_OVERHEAD
    } else {
        size.div_ceil(4096) * 4096
    }
}

/// Bytes stored and reserved, and the bound they live under. All atomics.
pub(super) struct Usage {
    inline_threshold: u64,
    /// `max_size` as configured (0: derive from the file system) and as in force.
    configured_max: u64,
    max_size: AtomicU64,
    high_pct: u64,
    low_pct: u64,
    /// Charged bytes of blobs and action results: what `max_size` bounds.
    used: AtomicU64,
    /// Room set aside by uploads in progress.
    reserved: AtomicU64,
    blob_bytes: AtomicU64,
    file_bytes: AtomicU64,
    small_records: AtomicU64,
    ac_count: AtomicU64,
    ac_bytes: AtomicU64,
    /// The last write failed because the disk is full (eviction then makes room below usage).
    pub(super) disk_full: AtomicBool,
    /// Wakes the maintenance loop early (usage past the high watermark, disk full).
    pub(super) wake: tokio::sync::Notify,
}

impl Usage {
    pub(super) fn new(options: &Options) -> Self {
        Usage {
            inline_threshold: options.inline_threshold,
            configured_max: options.max_size,
            max_size: AtomicU64::new(if options.max_size == 0 {
                u64::MAX
            } else {
                options.max_size
            }),
            high_pct: options.high_watermark as u64,
            low_pct: options.low_watermark as u64,
            used: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            blob_bytes: AtomicU64::new(0),
            file_bytes: AtomicU64::new(0),
            small_records: AtomicU64::new(0),
            ac_count: AtomicU64::new(0),
            ac_bytes: AtomicU64::new(0),
            disk_full: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        }
    }

    pub(super) fn blob_added(&self, size: u64, charge: u64) {
        self.blob_bytes.fetch_add(size, Relaxed);
        if size > self.inline_threshold {
            self.file_bytes.fetch_add(charge, Relaxed);
        } else {
            self.small_records.fetch_add(size + HEADER_LEN, Relaxed);
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
        } else {
            self.small_records.fetch_sub(size + HEADER_LEN, Relaxed);
        }
        self.used.fetch_sub(charge, Relaxed);
    }

    /// Bytes of the segment records of the small blobs stored (data dirs from before format 5
    /// count their inline blobs here too until they are moved).
    pub(super) fn small_records(&self) -> u64 {
        self.small_records.load(Relaxed)
    }

    pub(super) fn ac_changed(&self, added: Option<u64>, removed: Option<u64>) {
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

    pub(super) fn high(&self) -> u64 {
        (self.max_size() as u128 * self.high_pct as u128 / 100) as u64
    }

    pub(super) fn low(&self) -> u64 {
        (self.max_size() as u128 * self.low_pct as u128 / 100) as u64
    }

    /// Charged bytes of blobs and action results.
    pub(super) fn used(&self) -> u64 {
        self.used.load(Relaxed)
    }

    /// Charged bytes plus the room uploads in progress hold.
    pub(super) fn total(&self) -> u64 {
        self.used.load(Relaxed) + self.reserved.load(Relaxed)
    }
}

/// Refusals since start, by reason, for `stats`. (Lookups and hits are counted above the backend:
/// `store::counting` for the CAS, `namespace::ActionResults` for the action cache.)
#[derive(Default)]
pub(super) struct Counters {
    refused: RefusedWrites,
}

/// Room for one upload under `max_size`, given back when dropped. Large uploads grow theirs
/// as bytes arrive ([`Reservation::grow_to`]), so a client that declares a huge blob and then
/// stalls holds at most one step beyond what it sent, not the whole declared size.
pub(super) struct Reservation {
    store: Arc<Inner>,
    charge: u64,
}

impl Reservation {
    /// Room held now.
    pub(super) fn charge(&self) -> u64 {
        self.charge
    }

    /// Holds `charge` bytes in all (no-op if it holds that much already), or refuses.
    pub(super) fn grow_to(&mut self, charge: u64) -> Result<()> {
        if charge > self.charge {
            self.store.take_room(charge - self.charge)?;
            self.charge = charge;
        }
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.store.usage.reserved.fetch_sub(self.charge, Relaxed);
    }
}

impl Inner {
    /// Bytes a blob counts against `max_size` (see [`charge`]).
    pub(super) fn charge(&self, size: u64) -> u64 {
        charge(size, self.inline_threshold)
    }

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
        let usage = &self.usage;
        if let Err(e) = self.space.check_room(charge) {
            self.counters.refused.count(Refusal::of_unwritable(&e));
            // Only this write is refused (smaller ones may still fit); eviction makes room.
            usage.disk_full.store(true, Relaxed);
            usage.wake.notify_one();
            return Err(e);
        }
        let before = usage.reserved.fetch_add(charge, Relaxed);
        let total = usage.used.load(Relaxed) + before;
        if total.saturating_add(charge) > usage.max_size() {
            usage.reserved.fetch_sub(charge, Relaxed);
            return Err(self.refuse(charge));
        }
        Ok(())
    }

    /// Refuses a write of `charge` bytes that would pass `max_size`, or that the disk cannot
    /// take right now.
    pub(super) fn admit(&self, charge: u64) -> Result<()> {
        self.space
            .check()
            .inspect_err(|e| self.counters.refused.count(Refusal::of_unwritable(e)))?;
        if self.usage.total().saturating_add(charge) <= self.usage.max_size() {
            return Ok(());
        }
        Err(self.refuse(charge))
    }

    pub(super) fn refuse(&self, charge: u64) -> Error {
        let max = self.usage.max_size();
        if charge > max {
            // No eviction helps: not counted as a full cache, and nothing to wake.
            self.counters.refused.count(Refusal::TooLarge);
            return Error::ResourceExhausted(format!(
                "a write of {charge} bytes cannot fit: storage.max_size is {max} bytes"
            ));
        }
        self.counters.refused.count(Refusal::CacheFull);
        self.usage.wake.notify_one();
        let used = self.usage.total();
        let min_retention = self.eviction.min_retention;
        let floor = self.eviction.used_floor();
        let cutoff = self.clock.now().saturating_sub(min_retention);
        if floor >= cutoff && floor > 0 {
            Error::ResourceExhausted(format!(
                "cache is full: {used} of max_size {max} bytes are used, and after an unclean \
                 shutdown nothing is evicted for storage.min_retention ({}s, {}s from now) \
                 because last uses of the final minute before the crash were lost; raise \
                 storage.max_size or wait",
                min_retention,
                floor - cutoff
            ))
        } else if self.eviction.retention_blocked.load(Relaxed) {
            Error::ResourceExhausted(format!(
                "cache is full: {used} of max_size {max} bytes are used and every stored blob \
                 was used within storage.min_retention ({}s), which hoard promises not to \
                 evict; raise storage.max_size or lower storage.min_retention",
                min_retention
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
            Err(Error::StorageUnwritable(_)) => self.space.mark(Unwritable::ReadOnly),
            Err(Error::StorageFull(_)) => {
                self.space.mark(Unwritable::Full);
                if !self.usage.disk_full.swap(true, Relaxed) {
                    tracing::error!("the data dir's disk is full; evicting to make room");
                }
                self.usage.wake.notify_one();
            }
            Ok(_) => {
                if self.usage.disk_full.swap(false, Relaxed) {
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
            Some(Unwritable::Full) => {
                return Some("the data dir's disk is full; evicting to make room".into())
            }
            Some(Unwritable::ReadOnly) => {
                return Some("the data dir's file system is read-only".into())
            }
            None => {}
        }
        if self.eviction.retention_blocked.load(Relaxed) && self.usage.total() >= self.usage.high()
        {
            return Some(format!(
                "cache is full of blobs used within storage.min_retention ({}s)",
                self.eviction.min_retention
            ));
        }
        None
    }

    pub(super) fn stats(&self) -> StoreStats {
        let (u, c, e) = (&self.usage, &self.counters, &self.eviction);
        let youngest = e.youngest_evicted_age.load(Relaxed);
        let mut stats = StoreStats {
            blobs: self.index.len() as u64,
            blob_bytes: u.blob_bytes.load(Relaxed),
            action_results: u.ac_count.load(Relaxed),
            action_result_bytes: u.ac_bytes.load(Relaxed),
            used_bytes: u.used(),
            max_size: u.max_size(),
            disk_bytes: self.db.size_on_disk().unwrap_or(0)
                + u.file_bytes.load(Relaxed)
                + self.segments.total_bytes(),
            min_retention_secs: e.min_retention as u64,
            evicted_blobs: e.evicted_blobs.load(Relaxed),
            evicted_bytes: e.evicted_bytes.load(Relaxed),
            youngest_evicted_age_secs: (youngest != u64::MAX).then_some(youngest),
            write_refusal: self.write_refusal(),
            cleanup_pending: self.upkeep.cleanup_pending(),
            ..StoreStats::default()
        };
        c.refused.report(&mut stats);
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::{charge, INLINE_OVERHEAD};

    #[test]
    fn charges_whole_blocks_for_files_and_overhead_for_inline_blobs() {
        assert_eq!(charge(10, 64 << 10), 10 + INLINE_OVERHEAD);
        assert_eq!(charge(65 << 10, 64 << 10), 68 << 10);
        assert_eq!(charge(128 << 10, 64 << 10), 128 << 10);
    }
}
