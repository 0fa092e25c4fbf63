//! Background upkeep and the store's end: the maintenance loop ([`maintain`]: the cleanup pass
//! after an unclean start, eviction between the watermarks, last-use persistence every minute,
//! `max_size` and disk-cushion upkeep, segment compaction once enough died, the upgrade's move
//! of inline blobs), `gc`, and `flush` with the clean-shutdown mark. (Dead
//! action results are swept by the namespace policy, `crate::namespace`.)
//!
//! - **Last use** lives in the in-memory index (an atomic per blob). Times that changed are
//!   written to tree `atime` once a minute and on shutdown; a crash loses at most that minute,
//!   which only makes those blobs look older than they are.
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

use super::{run_blocking, snapshot, Inner};
use crate::error::{Error, Result};
use crate::store::GcReport;

/// Name of the file a clean shutdown leaves in the data dir.
const CLEAN_MARK: &str = "clean-shutdown";
/// How often changed last-use times are written to sled.
pub(super) const PERSIST_USE_EVERY: Duration = Duration::from_secs(60);
/// Between shutdowns, a last use is written only once it moved this far (seconds): LRU order
/// needs no finer grain, and every use of every blob must not become a write.
const PERSIST_STEP: u32 = 600;
/// How often the maintenance loop looks at usage when nobody wakes it.
const TICK: Duration = Duration::from_secs(1);

/// Key in tree `atime` (not 32 bytes long, so never a blob's) of the time of the last persist.
pub(super) const PERSISTED_AT: &[u8] = b"persisted-at";

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
}

impl Upkeep {
    pub(super) fn new(unclean: bool) -> Self {
        Upkeep {
            pass: Mutex::new(()),
            cleanup_pending: AtomicBool::new(unclean),
            opened_at: SystemTime::now(),
            stopping: AtomicBool::new(false),
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
            .insert(PERSISTED_AT, &self.clock.now().to_be_bytes())?;
        self.atime.insert(
            super::entry::BLOB_COUNT,
            &(self.index.len() as u64).to_be_bytes(),
        )?;
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

    /// The last write of a shutdown: last uses, sled, the index snapshot and the clean mark.
    /// Blocking; long passes were asked to stop first ([`Upkeep::stop`]).
    pub(super) fn final_flush(&self) -> Result<()> {
        let _no_pass_running = self.upkeep.pass.lock();
        // Every acknowledged write is durable already (group commit). On a disk that cannot
        // take writes, what is left (last uses, the snapshot, the clean mark) is skipped:
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
        self.persist_use(true)?;
        self.db.flush()?;
        if !self.upkeep.cleanup_pending() {
            // The snapshot first: the mark vouches for it.
            if let Err(e) = snapshot::write(&self.data_dir, &self.index) {
                tracing::warn!(error = %e, "cannot write the index snapshot; the next start reads sled");
                snapshot::remove(&self.data_dir);
            }
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
    let mut last_persist = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = inner.usage.wake.notified() => {}
        }
        let store = inner.clone();
        let persist = last_persist.elapsed() >= PERSIST_USE_EVERY;
        let result = run_blocking(move || {
            // Keeps sled's cushion, and lifts a write refusal within a tick of space coming back.
            // While the disk cannot take writes, only eviction (which frees space) writes.
            let writable = store.space.top_up();
            store.usage.settle_max_size(&store.data_dir, false);
            store.evict_if_needed()?;
            if !writable {
                return Ok(());
            }
            if persist {
                store.persist_use(false)?;
            }
            if store.compaction_due() {
                store.compact_logged(&[])?;
            }
            Ok(())
        })
        .await;
        if persist {
            last_persist = Instant::now();
        }
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
    async fn a_clean_restart_reads_the_index_snapshot_and_forgets_what_sled_lacks() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            Bytes::from(vec![1u8; 1000]),
            Bytes::from(vec![2u8; 100_000]),
            Bytes::from(vec![3u8; 500]),
        );
        let (da, db, dc) = (Digest::of(&a), Digest::of(&b), Digest::of(&c));
        {
            let store = SledStore::open(tmp.path(), 64 << 10, 16 << 20).unwrap();
            store.put(&da, a).await.unwrap();
            store.put(&db, b).await.unwrap();
            store.put(&dc, c).await.unwrap();
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
        assert_eq!((stats.blobs, stats.blob_bytes), (3, 101_500), "{stats:?}");
        // The snapshot brings no places, so the first read of a goes through sled, which
        // lacks it: a is forgotten, though its record is intact in its segment.
        assert_eq!(store.get(&da).await.unwrap(), None);
        assert_eq!(store.find_missing(&[da, db, dc]).await.unwrap(), vec![da]);
        assert_eq!(store.stats().await.unwrap().blob_bytes, 100_500);
        // c's first read goes through sled too, which names its place: later reads skip sled.
        assert_eq!(store.inner.index.touch_place(&dc, 0), Some(None));
        assert_eq!(store.get(&dc).await.unwrap().map(|d| d.len()), Some(500));
        assert!(matches!(
            store.inner.index.touch_place(&dc, 0),
            Some(Some(_))
        ));
        assert_eq!(store.get(&dc).await.unwrap().map(|d| d.len()), Some(500));
        assert_eq!(
            store.get(&db).await.unwrap().map(|d| d.len()),
            Some(100_000)
        );
    }
}
