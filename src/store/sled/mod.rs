//! The embedded default store: segment files for small blobs, files for large ones (see
//! [`super::files`]), sled for the action cache and the entries of large blobs, and the
//! in-memory index over all of them (persisted by its checkpoint, `checkpoint.rs`).
//!
//! sled layout:
//! - tree `cas`: `hash` (32 bytes) → index entry of a large blob: 1 byte location (1 file; 0
//!   inline for data dirs from before format 5), size (u64 big-endian), the XXH3-64 of the
//!   content (or the id of inline data), the write time (u32), and an XXH3-64 per MiB
//!   ([`crate::store::chunk_sums`], checked on every read; entries from before have none).
//! - tree `blobs`: data id (u64 big-endian) → the bytes of an inline blob (format 4; moved
//!   into segments in the background after an upgrade).
//!
//! Small blobs have no sled entry (format 6): their records in `segments/` are their durable
//! entries until a checkpoint lists them, and a start replays the records written since (see
//! `recover.rs`). A record is durable before the index names it, and a file blob is renamed
//! into place before its entry is written, so no index ever names data that is not there. (A
//! crash in between can leave unreferenced data behind, never a visible partial blob.)
//!
//! tree `ac`: action records (`action_results.rs`); tree `namespaces`: namespace records
//! (`namespaces.rs`). What they mean (epochs, TTL) is decided above, in `crate::namespace`.
//!
//! One concern a file; this one holds [`SledStore`], opening it, and the [`Cas`] and
//! [`Housekeeping`] impls, whose methods only delegate:
//! - `entry.rs`: the `cas` entry format, lookups, dropping damaged or unbacked blobs;
//! - `uploads.rs`: writes (whole blobs, resumable uploads, publishing) and the abandoned-upload
//!   sweep; the file tier ([`crate::store::files`]) does the file I/O;
//! - `reads.rs`: whole and streaming reads;
//! - `action_results.rs`: the [`ActionStore`](crate::store::ActionStore) impl: records of
//!   action results, conditional updates, the sweep;
//! - `usage.rs`: charging against `max_size`, reservations, refusals, the counters of `stats`;
//! - `eviction.rs`: LRU eviction and the retention promise;
//! - `verify.rs`: `verify` and the cleanup of orphans after a crash;
//! - `upkeep.rs`: the background loop, last-use persistence, the clean-shutdown mark, `flush`;
//! - `group_commit.rs` (acknowledged means durable), `space.rs` (keeping sled off a full disk),
//!   `namespaces.rs` (namespace records), `checkpoint.rs` (the index on disk), `recover.rs`
//!   (the index at start, and the upgrade of formats 4 and 5).

mod action_results;
mod checkpoint;
mod compaction;
mod entry;
mod eviction;
mod group_commit;
mod namespaces;
mod reads;
mod recover;
mod space;
mod upkeep;
mod uploads;
mod usage;
mod verify;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};

use super::clock::Clock;
use super::files::read::Reads;
use super::files::upload::WriteBudget;
use super::files::{BlobFiles, Transfers};
use super::index::Index;
use super::segments::Segments;
use super::{BlobStream, Cas, GcReport, Housekeeping, StoreStats, Upload, VerifyReport};
use crate::config::Config;
use crate::digest::Digest;
use crate::error::{Error, Result};
use eviction::Eviction;
use group_commit::GroupCommit;
use space::Space;
use upkeep::Upkeep;
use usage::{charge, Counters, Usage};

pub use super::files::MAX_TRANSFERS;

/// Stripes of the lock that orders publishing a blob against evicting or dropping it.
const STRIPES: usize = 256;

/// How a store is set up; [`SledStore::from_config`] fills it from `[storage]` and `[limits]`.
#[derive(Clone, Debug)]
pub struct Options {
    /// Blobs up to this size live inside sled.
    pub inline_threshold: u64,
    /// sled's page cache.
    pub cache_capacity: u64,
    /// A segment of small blobs is sealed at this size (`storage.segment_size`).
    pub segment_size: u64,
    /// Bound on stored bytes; 0 means 90% of what the file system can hold.
    pub max_size: u64,
    /// Eviction runs from this percentage of `max_size`...
    pub high_watermark: u8,
    /// ...down to this one.
    pub low_watermark: u8,
    /// Blobs used within this period are never evicted.
    pub min_retention: Duration,
    /// How long a download waits for its client to take the next chunk before it ends
    /// (`limits.write_idle_timeout`).
    pub stall: Duration,
}

impl Options {
    pub fn from_config(config: &Config) -> Self {
        let s = &config.storage;
        Options {
            inline_threshold: s.inline_threshold.0,
            cache_capacity: s.sled_cache_capacity.0,
            segment_size: s.segment_size.0,
            max_size: s.max_size.0,
            high_watermark: s.high_watermark,
            low_watermark: s.low_watermark,
            min_retention: s.min_retention.0,
            stall: config.limits.write_idle_timeout.0,
        }
    }
}

/// The sled-backed store. Cheap to clone.
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    cas: sled::Tree,
    blobs: sled::Tree,
    ac: sled::Tree,
    /// Large blobs as files: paths and publishing.
    files: BlobFiles,
    data_dir: PathBuf,
    /// In-memory copy of which blobs exist and when each was last used.
    index: Index,
    /// The store's clock (tests move it).
    clock: Clock,
    /// Bytes charged against `max_size` and set aside for uploads.
    usage: Usage,
    /// Lookups, hits and refusals, for `stats`.
    counters: Counters,
    /// The retention promise and what eviction did so far.
    eviction: Eviction,
    /// State of the background passes (cleanup, verify, the final flush).
    upkeep: Upkeep,
    /// Whether the disk can take writes; every write is refused up front while it cannot.
    space: Arc<Space>,
    /// Namespace records (tree `namespaces`).
    namespaces: sled::Tree,
    /// Orders publishing a blob against evicting or dropping the same hash, so an eviction
    /// never deletes a copy that was just re-uploaded.
    stripes: Vec<Mutex<()>>,
    /// Blobs up to this size are segment records.
    inline_threshold: u64,
    /// `storage.segment_size`.
    segment_size: u64,
    /// Upload ids with a live writer, so two streams never append to one upload file.
    active_uploads: Mutex<HashSet<String>>,
    /// Shared by all uploads' queues.
    write_budget: WriteBudget,
    /// Permits for large-blob transfers (see `MAX_TRANSFERS`).
    transfers: Transfers,
    /// The read-ahead budget and stall timeout of file reads.
    reads: Reads,
    /// Small blobs' records (`data_dir/segments`).
    segments: Arc<Segments>,
    /// Flushes sled before writes are acknowledged, one flush per round of waiting writes.
    /// Last, so it is dropped (and its thread joined) after everything that writes.
    commit: GroupCommit,
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    run_blocking(move || f().map_err(Error::from)).await
}

/// Runs store work that returns our own errors off the async threads.
async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal("blocking task failed", e))?
}

impl SledStore {
    /// Opens (or creates) a store in `data_dir` with default lifecycle settings.
    pub fn open(data_dir: &Path, inline_threshold: u64, cache_capacity: u64) -> Result<Self> {
        let defaults = Options::from_config(&Config::default());
        Self::open_with(
            data_dir,
            Options {
                inline_threshold,
                cache_capacity,
                ..defaults
            },
        )
    }

    /// Pretends `by` more time has passed, for tests of expiry and retention
    /// (`ActionStore::clock` shows it).
    pub fn advance_clock(&self, by: Duration) {
        self.inner.clock.advance(by);
    }

    /// A sled tree of hoard's own metadata (the watch event log, namespace epochs), kept in the
    /// same database so it is flushed and locked together with the store.
    pub fn tree(&self, name: &str) -> Result<sled::Tree> {
        Ok(self.inner.db.open_tree(name)?)
    }

    /// Opens the store `config` describes (data dir, `[storage]`).
    pub fn from_config(config: &Config) -> Result<Self> {
        Self::open_with(&config.data_dir, Options::from_config(config))
    }

    /// Opens (or creates) a store in `data_dir`.
    pub fn open_with(data_dir: &Path, options: Options) -> Result<Self> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            Error::internal(format!("cannot create data dir {}", data_dir.display()), e)
        })?;
        let files = BlobFiles::open(data_dir).map_err(|e| {
            Error::internal(
                format!("cannot create blob dirs in {}", data_dir.display()),
                e,
            )
        })?;
        let fresh = !data_dir.join("sled").exists();
        space::before_open(data_dir);
        let db = sled::Config::new()
            .path(data_dir.join("sled"))
            .cache_capacity(options.cache_capacity)
            .open()
            .map_err(|e| match e {
                // sled reports the lock as a plain message wrapping EWOULDBLOCK.
                sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                    Error::Unavailable(format!(
                        "data dir {} is in use by another hoard process",
                        data_dir.display()
                    ))
                }
                e => Error::internal(format!("cannot open sled in {}", data_dir.display()), e),
            })?;
        let cas = db.open_tree("cas")?;
        let blobs = db.open_tree("blobs")?;
        let ac = db.open_tree("ac")?;
        let stored = check_format(&db, &ac)?;
        let namespaces = db.open_tree("namespaces")?;
        // A brand-new data dir has nothing to clean up either.
        let marked = upkeep::take_clean_shutdown_mark(data_dir)?;
        let clean = marked || fresh;
        let space = Arc::new(Space::open(data_dir));
        let segments = Arc::new(Segments::open(data_dir, options.segment_size).map_err(|e| {
            Error::internal(format!("cannot open segments in {}", data_dir.display()), e)
        })?);
        let commit = GroupCommit::start(db.clone(), segments.clone(), space.clone())?;
        let clock = Clock::default();
        let usage = Usage::new(&options);
        let eviction = Eviction::new(&options);
        let threshold = options.inline_threshold;
        let (index, lost_uses_after) = match stored {
            Some(v) if v < FORMAT => recover::upgrade(data_dir, &db, &cas, &segments, &clock)?,
            _ => recover::recover(data_dir, &db, &cas, &segments, &clock)?,
        };
        // Uses after the last checkpoint are lost after a crash; all of them if there is no
        // checkpoint to read (damaged, or a data dir restored without it), clean or not.
        if !clean || (!fresh && lost_uses_after.is_none()) {
            eviction.set_used_floor(lost_uses_after, clock.now());
        }
        index.for_each(|c| usage.blob_added(c.digest.size, charge(c.digest.size, threshold)));
        let indexed = index.len();
        usage.count_action_results(&ac)?;
        usage.settle_max_size(data_dir, true);
        Ok(SledStore {
            inner: Arc::new(Inner {
                db,
                cas,
                blobs,
                ac,
                files,
                data_dir: data_dir.to_path_buf(),
                index,
                clock,
                usage,
                counters: Counters::default(),
                eviction,
                upkeep: Upkeep::new(!clean, indexed),
                space,
                namespaces,
                stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
                inline_threshold: options.inline_threshold,
                segment_size: options.segment_size,
                active_uploads: Mutex::new(HashSet::new()),
                write_budget: WriteBudget::default(),
                transfers: Transfers::default(),
                reads: Reads::new(options.stall),
                segments,
                commit,
            }),
        })
    }
}

impl Inner {
    /// The lock stripe of a hash (see `Inner::stripes`).
    fn stripe(&self, digest: &Digest) -> MutexGuard<'_, ()> {
        self.stripes[digest.hash[1] as usize % STRIPES].lock()
    }
}

/// Every method delegates to the file of its concern.
#[async_trait]
impl Cas for SledStore {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        Ok(self.inner.find_missing(digests))
    }

    async fn retain(&self, digests: &[Digest], until: u64) -> Result<Vec<Digest>> {
        let until = until.min(u32::MAX as u64) as u32;
        Ok(self.inner.find_missing_used_at(digests, until))
    }

    async fn read(
        &self,
        digest: &Digest,
        offset: u64,
        limit: Option<u64>,
        chunk_size: usize,
    ) -> Result<Option<BlobStream>> {
        self.inner.read(digest, offset, limit, chunk_size)
    }

    async fn begin_upload(
        &self,
        upload_id: &str,
        digest: &Digest,
        offset: u64,
    ) -> Result<Box<dyn Upload>> {
        self.inner.begin_upload(upload_id, digest, offset).await
    }

    async fn upload_progress(&self, upload_id: &str, digest: &Digest) -> Result<Option<u64>> {
        self.inner.upload_progress(upload_id, digest).await
    }

    async fn get(&self, digest: &Digest) -> Result<Option<Bytes>> {
        self.inner.get(digest).await
    }

    async fn put(&self, digest: &Digest, data: Bytes) -> Result<()> {
        self.inner.put(digest, data).await
    }

    async fn put_many(&self, blobs: Vec<(Digest, Bytes)>) -> Vec<Result<()>> {
        self.inner.put_many(blobs).await
    }
}

#[async_trait]
impl Housekeeping for SledStore {
    async fn stats(&self) -> Result<StoreStats> {
        let inner = self.inner.clone();
        run_blocking(move || Ok(inner.stats())).await
    }

    async fn gc(&self, target: Option<u64>) -> Result<GcReport> {
        let inner = self.inner.clone();
        run_blocking(move || inner.gc(target)).await
    }

    async fn verify(&self) -> Result<VerifyReport> {
        let inner = self.inner.clone();
        run_blocking(move || inner.verify()).await
    }

    async fn maintain(&self) {
        upkeep::maintain(self.inner.clone()).await
    }

    async fn remove_abandoned_uploads(&self, max_age: Duration) -> Result<usize> {
        let inner = self.inner.clone();
        blocking(move || inner.remove_abandoned_uploads(max_age)).await
    }

    fn write_refusal(&self) -> Option<String> {
        self.inner.write_refusal()
    }

    async fn flush(&self) -> Result<()> {
        // A cleanup or verify pass still running stops at its next blob (and runs again later).
        self.inner.upkeep.stop();
        let inner = self.inner.clone();
        run_blocking(move || inner.final_flush()).await
    }
}

/// Version of the layout described at the top of this file, kept under `format` in the
/// default tree. 1: action results without a last-use prefix (before eviction existed); 2:
/// without an epoch (before invalidation existed); 3: the bare `ActionResult` after the header,
/// not yet wrapped with its provenance (`hoard.store.v1.StoredActionResult`); 4: small blobs
/// inline in tree `blobs` (still read; moved into segments in the background after an upgrade);
/// 5: small blobs in segments, each with an entry in tree `cas`, last uses in tree `atime`
/// (upgraded at the first start: entries read once into the checkpoint, then dropped).
const FORMAT: u32 = 6;

/// Key in the default tree while the entries of format 5 are being dropped after an upgrade.
const DROPPING_V5: &[u8] = b"dropping-format-5-entries";

/// The format a data dir was written in (`None`: a new one, now marked as [`FORMAT`]). Action
/// results of formats before 4 lack part of today's record; read as today's they would be
/// served cut or misparsed (a bare `ActionResult` may well decode as a wrapper), so they are
/// dropped (a cache may forget, never serve wrong data). The blob index of formats 4 and 5 is
/// upgraded by `recover::upgrade`, which marks the data dir as [`FORMAT`] once it is done.
fn check_format(db: &sled::Db, ac: &sled::Tree) -> Result<Option<u32>> {
    let stored = db
        .get("format")?
        .and_then(|v| <[u8; 4]>::try_from(&v[..]).ok())
        .map(u32::from_be_bytes);
    match stored {
        Some(FORMAT) => {}
        Some(v) if v > FORMAT => {
            return Err(Error::FailedPrecondition(format!(
                "the data dir was written by a newer hoard (format {v}, this one reads {FORMAT})"
            )))
        }
        Some(4 | 5) => {}
        Some(_) | None if !ac.is_empty() => {
            tracing::warn!(
                results = ac.len(),
                "dropping action results stored by an older hoard"
            );
            ac.clear()?;
        }
        _ => {}
    }
    if stored.is_none() {
        db.insert("format", &FORMAT.to_be_bytes())?;
    }
    Ok(stored)
}
