//! Background upkeep and the store's end: the maintenance loop ([`maintain`]: the cleanup pass
//! after an unclean start, eviction between the watermarks, the index checkpoint every few
//! minutes, `max_size` and disk-cushion upkeep, segment compaction once enough died, the
//! upgrade's move of inline blobs), `gc`, and `flush` with the clean-shutdown mark. (Dead
//! action results are swept by the namespace policy, `crate::namespace`.)
//!
//! - **Last use** lives in the in-memory index (an atomic per blob) and is persisted by the
//!   checkpoint ([`super::checkpoint`]); a crash loses the uses since the last one, which only
//!   makes those blobs look older than they are (and the retention floor covers them).
//! - **Crash cleanup.** A clean shutdown leaves a mark file; without it, the next start runs
//!   the cleanup pass ([`super::verify`]) in the background.
//!
//! Must not: run on a cache request path (besides the loop, only `flush` at shutdown and the
//! admin `gc` call in).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use super::{checkpoint, run_blocking, Inner};
use crate::error::{Error, Result};
use crate::store::GcReport;

/// Name of the file a clean shutdown leaves in the data dir.
const CLEAN_MARK: &str = "clean-shutdown";
/// A checkpoint is due this long after the last one, if anything changed since.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_secs(300);
/// ...or once this many bytes were appended to segments since (they are what a crash start
/// replays and verifies).
const CHECKPOINT_AFTER_BYTES: u64 = 512 << 20;
/// Between checkpoints, a last use counts as a change only once it moved this far (seconds):
/// LRU order needs no finer grain, and every use of every blob must not become a write.
pub(super) const PERSIST_STEP: u32 = 600;
/// How often the maintenance loop looks at usage when nobody wakes it.
const TICK: Duration = Duration::from_secs(1);

/// State of the long passes (eviction, cleanup, verify) and the final flush.
pub(super) struct Upkeep {
    /// Held by eviction, cleanup and verify passes, and by `flush` before it marks a clean
    /// shutdown, so the mark never covers a pass cut off half-way.
    pub(super) pass: Mutex<()>,
    /// The start was unclean and the cleanup pass has not finished yet.
    cleanup_pending: AtomicBool,
    /// Temp files older than this are left from before the start and can go.
    pub(super) opened_at: SystemTime,
    /// Set by the final flush: long passes stop early instead of holding up the shutdown.
    stopping: AtomicBool,
    /// What the last checkpoint saw (held while one is written, so two never race).
    checkpointed: Mutex<Checkpointed>,
    /// Set when a blob was dropped as damaged: the next pass writes a checkpoint.
    pub(super) checkpoint_soon: AtomicBool,
}

/// The state of the store at the last checkpoint, to tell whether another is due.
struct Checkpointed {
    at: Instant,
    appended: u64,
    blobs: usize,
    evicted: u64,
    /// The start changed the index from what the checkpoint on disk says (a replay, or an
    /// upgrade): the first pass writes one.
    dirty: bool,
    /// The last write failed.
    failed: bool,
}

impl Upkeep {
    pub(super) fn new(unclean: bool, blobs: usize) -> Self {
        Upkeep {
            pass: Mutex::new(()),
            cleanup_pending: AtomicBool::new(unclean),
            opened_at: SystemTime::now(),
            stopping: AtomicBool::new(false),
            checkpointed: Mutex::new(Checkpointed {
                at: Instant::now(),
                appended: 0,
                blobs,
                evicted: 0,
                dirty: unclean,
                failed: false,
            }),
            checkpoint_soon: AtomicBool::new(false),
        }
    }

    pub(super) fn cleanup_pending(&self) -> bool {
        self.cleanup_pending.load(Relaxed)
    }

    /// Asks long passes (cleanup, verify) to stop at the next blob.
    pub(super) fn stop(&self) {
        self.stopping.store(true, Relaxed);
    }

    pub(super) fn check_stopping(&self) -> Result<()> {
        if self.stopping.load(Relaxed) {
            return Err(Error::Unavailable(
                "the store is shutting down; the pass will run again".into(),
            ));
        }
        Ok(())
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
fn mark_clean_shutdown(data_dir: &Path) -> Result<()> {
    let path = data_dir.join(CLEAN_MARK);
    std::fs::File::create(&path)
        .and_then(|f| f.sync_all())
        .and_then(|()| std::fs::File::open(data_dir)?.sync_all())
        .map_err(|e| Error::internal(format!("writing {}", path.display()), e))
}

impl Inner {
    /// Writes the index checkpoint ([`super::checkpoint`]) if one is due: always when
    /// `closing` (then no writer is left, so nothing needs replaying after it), else after
    /// [`CHECKPOINT_EVERY`] if blobs came, went or moved, or last uses moved by
    /// [`PERSIST_STEP`], or after [`CHECKPOINT_AFTER_BYTES`] of appends.
    pub(super) fn checkpoint(&self, closing: bool) -> Result<()> {
        let mut last = self.upkeep.checkpointed.lock();
        let appended = self.segments.appended();
        let (len, evicted) = (self.index.len(), self.eviction.evicted_blobs.load(Relaxed));
        if !closing {
            let by_bytes = appended.saturating_sub(last.appended) >= CHECKPOINT_AFTER_BYTES;
            let by_time = last.at.elapsed() >= CHECKPOINT_EVERY;
            // A blob dropped as damaged must not be promised again after a crash.
            let soon = self.upkeep.checkpoint_soon.swap(false, Relaxed);
            if !(last.dirty || soon || by_bytes || by_time) {
                return Ok(());
            }
            let changed = last.dirty
                || soon
                || last.failed
                || appended != last.appended
                || len != last.blobs
                || evicted != last.evicted
                || self.index.uses_moved(PERSIST_STEP);
            if !changed {
                // Nothing to save: look again a period from now.
                last.at = Instant::now();
                return Ok(());
            }
        }
        let started = Instant::now();
        let header = checkpoint::Header {
            replay_from: self.segments.replay_floor(),
            taken_at: self.clock.now(),
        };
        let bytes = match checkpoint::write(&self.data_dir, &self.index, header) {
            Ok(bytes) => bytes,
            Err(e) => {
                // The uses it marked saved were not: the next period writes one whatever changed.
                last.failed = true;
                last.at = Instant::now();
                return Err(Error::internal("writing the index checkpoint", e));
            }
        };
        *last = Checkpointed {
            at: Instant::now(),
            appended,
            blobs: len,
            evicted,
            dirty: false,
            failed: false,
        };
        tracing::debug!(
            bytes,
            replay_from = header.replay_from,
            took_ms = started.elapsed().as_millis() as u64,
            "index checkpoint written"
        );
        Ok(())
    }

    /// Evicts down to `target` (the low watermark if `None`). Dead action results are swept
    /// by the namespace policy (`crate::namespace`), which the Admin service runs first.
    pub(super) fn gc(&self, target: Option<u64>) -> Result<GcReport> {
        let evicted = {
            let _pass = self.upkeep.pass.lock();
            self.evict(target.unwrap_or_else(|| self.usage.low()))?
        };
        self.eviction
            .retention_blocked
            .store(!evicted.reached, Relaxed);
        // The disk space of what was evicted comes back now too.
        if self.compaction_due() {
            self.compact_logged(&[])?;
        }
        Ok(GcReport {
            evicted_blobs: evicted.blobs,
            evicted_bytes: evicted.bytes,
            expired_action_results: 0,
            used_bytes: self.usage.used(),
            reached_target: evicted.reached,
        })
    }

    /// [`Inner::compact`], with a log line when it did something.
    pub(super) fn compact_logged(&self, force: &[u32]) -> Result<()> {
        let started = Instant::now();
        let done = self.compact(force)?;
        if done.segments_removed > 0 {
            tracing::info!(
                segments = done.segments_removed,
                moved = done.records_moved,
                freed_bytes = done.bytes_freed,
                took_ms = started.elapsed().as_millis() as u64,
                "compacted segments of small blobs"
            );
        }
        Ok(())
    }

    /// The last write of a shutdown: sled, the index checkpoint and the clean mark.
    /// Blocking; long passes were asked to stop first ([`Upkeep::stop`]).
    pub(super) fn final_flush(&self) -> Result<()> {
        let _no_pass_running = self.upkeep.pass.lock();
        // Every acknowledged write is durable already (group commit). On a disk that cannot
        // take writes, what is left (last uses, the checkpoint, the clean mark) is skipped:
        // the next start then counts as unclean, which keeps the retention promise.
        if !self.space.top_up() {
            tracing::warn!(
                "the data dir cannot take writes: last uses are not saved, and the next \
                 start runs the cleanup pass"
            );
            if let Err(e) = self.db.flush() {
                tracing::warn!(error = %e, "final flush failed; acknowledged writes were already durable");
            }
            return Ok(());
        }
        self.db.flush()?;
        // No append after the final checkpoint (a call still running past the drain gets
        // UNAVAILABLE), so it needs no replay. The checkpoint before the mark: the mark vouches
        // for it; without it the next start counts as unclean and replays from the last one.
        self.segments.close();
        self.checkpoint(true)?;
        if !self.upkeep.cleanup_pending() {
            mark_clean_shutdown(&self.data_dir)?;
        }
        Ok(())
    }
}

/// The store's background upkeep (see [`crate::store::Housekeeping::maintain`]).
pub(super) async fn maintain(inner: Arc<Inner>) {
    if inner.upkeep.cleanup_pending() {
        let store = inner.clone();
        let started = Instant::now();
        // Writes cut off by the crash can only be in the segments that were active then;
        // rewriting them leaves no record that no entry names.
        let cleanup = move || {
            let removed = store.remove_orphans()?;
            let last = store.segments.last_before_open();
            store.compact_logged(&[last, last.saturating_sub(1)])?;
            Ok(removed)
        };
        match run_blocking(cleanup).await {
            Ok((pieces, bytes)) => {
                inner.upkeep.cleanup_pending.store(false, Relaxed);
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
    if !inner.blobs.is_empty() {
        let store = inner.clone();
        let started = Instant::now();
        match run_blocking(move || store.migrate_inline()).await {
            Ok(moved) => tracing::info!(
                moved,
                took_ms = started.elapsed().as_millis() as u64,
                "upgrade: small blobs moved from sled into segment files"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "upgrade: moving small blobs into segments stopped; it goes on at the next start")
            }
        }
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = inner.usage.wake.notified() => {}
        }
        let store = inner.clone();
        let result = run_blocking(move || {
            // Keeps sled's cushion, and lifts a write refusal within a tick of space coming back.
            // While the disk cannot take writes, only eviction (which frees space) writes.
            let writable = store.space.top_up();
            store.usage.settle_max_size(&store.data_dir, false);
            store.evict_if_needed()?;
            if !writable {
                return Ok(());
            }
            store.checkpoint(false)?;
            if store.compaction_due() {
                store.compact_logged(&[])?;
            }
            Ok(())
        })
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "storage upkeep failed; retrying");
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::digest::Digest;
    use crate::store::sled::SledStore;
    use crate::store::{Cas as _, Housekeeping as _};

    #[tokio::test]
    async fn restarts_find_every_blob_from_the_checkpoint_and_after_a_crash_from_the_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let blobs: Vec<Bytes> = [(1u8, 1000), (2, 100_000), (3, 500), (4, 700), (5, 90_000)]
            .iter()
            .map(|&(b, n)| Bytes::from(vec![b; n]))
            .collect();
        let digests: Vec<Digest> = blobs.iter().map(|b| Digest::of(b)).collect();
        let late_blob = Bytes::from(vec![6u8; 300]);
        let late = Digest::of(&late_blob);
        {
            let store = SledStore::open(tmp.path(), 64 << 10, 16 << 20).unwrap();
            for i in 0..3 {
                store.put(&digests[i], blobs[i].clone()).await.unwrap();
            }
            store.flush().await.unwrap();
            // A call still running past the drain is refused (nothing may follow the final
            // checkpoint), with UNAVAILABLE, so its client retries elsewhere.
            let refused = store.put(&late, late_blob.clone()).await;
            assert!(
                matches!(refused, Err(crate::error::Error::Unavailable(_))),
                "{refused:?}"
            );
        }
        assert!(tmp.path().join("index.checkpoint").exists());
        {
            // A clean start takes every blob from the checkpoint, small ones with their place,
            // so their first read needs no lookup.
            let store = SledStore::open(tmp.path(), 64 << 10, 16 << 20).unwrap();
            let stats = store.stats().await.unwrap();
            assert_eq!((stats.blobs, stats.blob_bytes), (3, 101_500), "{stats:?}");
            assert!(!stats.cleanup_pending);
            assert_eq!(store.get(&late).await.unwrap(), None);
            assert!(matches!(
                store.inner.index.touch_place(&digests[2], 0),
                Some(Some(_))
            ));
            for i in 0..3 {
                assert_eq!(
                    store.get(&digests[i]).await.unwrap().as_ref(),
                    Some(&blobs[i])
                );
            }
            // Two more, then a crash: no checkpoint after them, no clean mark.
            store.put(&digests[3], blobs[3].clone()).await.unwrap();
            store.put(&digests[4], blobs[4].clone()).await.unwrap();
        }
        let store = SledStore::open(tmp.path(), 64 << 10, 16 << 20).unwrap();
        let stats = store.stats().await.unwrap();
        assert!(stats.cleanup_pending);
        // The small one from the replay of its segment, the file one from sled's entry.
        assert_eq!((stats.blobs, stats.blob_bytes), (5, 192_200), "{stats:?}");
        assert!(store.find_missing(&digests).await.unwrap().is_empty());
        for (d, b) in digests.iter().zip(&blobs) {
            assert_eq!(store.get(d).await.unwrap().as_ref(), Some(b));
        }
    }
}
