//! The embedded default store: sled for the index, small blobs and the action cache; files for
//! large blobs (see [`super::files`]).
//!
//! sled layout:
//! - tree `cas`: `hash` (32 bytes) → index entry: 1 byte location (0 inline, 1 file), size (u64
//!   big-endian), then for inline blobs the id of their data, for files the XXH3-64 of the content
//!   (both u64 big-endian), the write time (u32), and for files an XXH3-64 per MiB
//!   ([`chunk_sums`], checked on every read; entries from before have none).
//! - tree `blobs`: data id (u64 big-endian) → the bytes of an inline blob. Ids only grow, so new
//!   blobs are appended at the end of the tree: keyed by hash they landed in random B-tree leaves
//!   that sled rewrote again and again (7× write amplification measured).
//!
//! An inline blob's data is written before its index entry, and a file blob is renamed into place
//! before its index entry, so the index never names data that is not there. (A crash in between
//! can leave unreferenced data behind, never a visible partial blob.)
//!
//! tree `ac`: `instance ‖ 0x00 ‖ hash ‖ size` → last use (u32 seconds, big-endian) ‖ epoch of
//! its namespace when stored (u64 BE) ‖ encoded ActionResult. A result whose epoch is older than
//! its namespace's (see [`namespaces`], tree `namespaces`) has been invalidated. Instance names cannot contain NUL ([`crate::namespace`]), so the key is
//! unambiguous and one instance is one prefix.
//!
//! tree `atime`: `hash` → last use of a blob (u32 seconds, big-endian), written in batches from
//! the in-memory index (see [`lifecycle`]), so recording a use never costs a disk write.
//!
//! Size bounds, eviction, expiry, the cleanup pass after a crash and `verify` live in
//! [`lifecycle`].

mod group_commit;
mod lifecycle;
mod namespaces;
mod snapshot;
mod space;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use parking_lot::{Mutex, MutexGuard, RwLock};
use xxhash_rust::xxh3::xxh3_64;

use super::chunk_sums;
use super::files::read::{Blob, Reads};
use super::files::upload::{open_upload_file, QueuedWriter, UploadHashes, WriteBudget};
use super::files::{BlobFiles, BlobWriter, Transfers};
use super::index::Index;
use super::{BlobStream, GcReport, NamespaceInfo, Store, StoreStats, Upload, VerifyReport};
use crate::config::{Config, NamespacesConfig};
use crate::digest::{verify, Digest, Verifier, HASH_LEN};
use crate::error::{Error, Result};

pub use super::files::MAX_TRANSFERS;

const INLINE: u8 = 0;
/// Room under max_size a large upload reserves ahead of the bytes it has sent.
const RESERVE_STEP: u64 = 64 << 20;
const FILE: u8 = 1;
/// Stripes of the lock that orders publishing a blob against evicting or dropping it.
const STRIPES: usize = 256;

/// How a store is set up; [`SledStore::from_config`] fills it from `[storage]` and
/// `[namespaces]`.
#[derive(Clone, Debug)]
pub struct Options {
    /// Blobs up to this size live inside sled.
    pub inline_threshold: u64,
    /// sled's page cache.
    pub cache_capacity: u64,
    /// Bound on stored bytes; 0 means 90% of what the file system can hold.
    pub max_size: u64,
    /// Eviction runs from this percentage of `max_size`...
    pub high_watermark: u8,
    /// ...down to this one.
    pub low_watermark: u8,
    /// Blobs used within this period are never evicted.
    pub min_retention: Duration,
    /// AC TTLs per instance name.
    pub namespaces: NamespacesConfig,
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
            max_size: s.max_size.0,
            high_watermark: s.high_watermark,
            low_watermark: s.low_watermark,
            min_retention: s.min_retention.0,
            namespaces: config.namespaces.clone(),
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
    atime: sled::Tree,
    files: BlobFiles,
    data_dir: PathBuf,
    /// In-memory copy of which blobs exist and when each was last used.
    index: Index,
    /// Size bounds, retention and the counters `stats` reports.
    life: lifecycle::Lifecycle,
    /// Epochs and last use of namespaces.
    namespaces: namespaces::Namespaces,
    /// Orders publishing a blob against evicting or dropping the same hash, so an eviction
    /// never deletes a copy that was just re-uploaded.
    stripes: Vec<Mutex<()>>,
    /// Held (shared) by inline writes from taking a data id until their index entry exists, so
    /// the cleanup pass can tell orphaned inline data from data about to be indexed.
    inline_gate: RwLock<()>,
    /// Held by eviction, cleanup and verify passes, and by `flush` before it marks a clean
    /// shutdown, so the mark never covers a pass cut off half-way.
    upkeep: Mutex<()>,
    /// Blobs up to this size live inside sled.
    inline_threshold: u64,
    /// Upload ids with a live writer, so two streams never append to one upload file.
    active_uploads: Mutex<HashSet<String>>,
    /// Shared by all uploads' queues.
    write_budget: WriteBudget,
    /// Permits for large-blob transfers (see `MAX_TRANSFERS`).
    transfers: Transfers,
    /// The read-ahead budget and stall timeout of file reads.
    reads: Reads,
    /// Flushes sled before writes are acknowledged, one flush per round of waiting writes.
    /// Last, so it is dropped (and its thread joined) after everything that writes.
    commit: group_commit::GroupCommit,
}

/// Where the index says a blob is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Location {
    /// In tree `blobs` under this id.
    Inline { id: u64 },
    /// A file, with the XXH3-64 of its content: re-checking SHA-256 on every read would cost
    /// about as much CPU as the rest of the read, while XXH3 catches bit rot and truncation at a
    /// small fraction of that.
    File { xxh3: u64 },
}

/// An index entry; `written_at` (store seconds) is the blob's first use, so a new blob needs no
/// separate last-use write.
fn encode_entry(location: Location, size: u64, written_at: u32) -> Vec<u8> {
    let (tag, extra) = match location {
        Location::Inline { id } => (INLINE, id),
        Location::File { xxh3 } => (FILE, xxh3),
    };
    let mut v = Vec::with_capacity(21);
    v.push(tag);
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&extra.to_be_bytes());
    v.extend_from_slice(&written_at.to_be_bytes());
    v
}

/// A file blob's index entry: the common part, then the checksum of every chunk (see
/// [`chunk_sums`]; entries written before those existed end after `written_at`).
fn encode_file_entry(xxh3: u64, size: u64, written_at: u32, sums: &[u64]) -> Vec<u8> {
    let mut v = encode_entry(Location::File { xxh3 }, size, written_at);
    v.reserve(sums.len() * 8);
    for sum in sums {
        v.extend_from_slice(&sum.to_be_bytes());
    }
    v
}

/// The chunk checksums of a file blob's entry, if it has them (and the right number of them).
fn entry_sums(v: &[u8], size: u64) -> Option<Vec<u64>> {
    let raw = v.get(21..)?;
    if raw.is_empty() || raw.len() != chunk_sums::count(size) * 8 {
        return None;
    }
    Some(
        raw.chunks_exact(8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
            .collect(),
    )
}

/// When an index entry was written (0 for entries from before it was recorded).
fn entry_written_at(v: &[u8]) -> u32 {
    v.get(17..21)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_be_bytes)
}

fn decode_entry(v: &[u8]) -> Option<(Location, u64)> {
    let size = u64::from_be_bytes(v.get(1..9)?.try_into().ok()?);
    let extra = u64::from_be_bytes(v.get(9..17)?.try_into().ok()?);
    let location = match *v.first()? {
        INLINE => Location::Inline { id: extra },
        FILE => Location::File { xxh3: extra },
        _ => return None,
    };
    Some((location, size))
}

fn ac_key(instance: &str, action: &Digest) -> Vec<u8> {
    let mut k = Vec::with_capacity(instance.len() + 1 + HASH_LEN + 8);
    k.extend_from_slice(instance.as_bytes());
    k.push(0);
    k.extend_from_slice(&action.hash);
    k.extend_from_slice(&action.size.to_be_bytes());
    k
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

    /// Pretends `by` more time has passed, for tests of expiry and retention (`Store::clock`
    /// shows it).
    pub fn advance_clock(&self, by: Duration) {
        self.inner.life.advance_clock(by);
    }

    /// A sled tree of hoard's own metadata (the watch event log, namespace epochs), kept in the
    /// same database so it is flushed and locked together with the store.
    pub fn tree(&self, name: &str) -> Result<sled::Tree> {
        Ok(self.inner.db.open_tree(name)?)
    }

    /// Opens the store `config` describes (data dir, `[storage]` and `[namespaces]`).
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
        let atime = db.open_tree("atime")?;
        upgrade_format(&db, &ac)?;
        let namespaces = namespaces::Namespaces::load(db.open_tree("namespaces")?)?;
        // A brand-new data dir has nothing to clean up either.
        let marked = lifecycle::take_clean_shutdown_mark(data_dir)?;
        let clean = marked || fresh;
        let space = Arc::new(space::Space::open(data_dir));
        let commit = group_commit::GroupCommit::start(db.clone(), space.clone())?;
        let life = lifecycle::Lifecycle::new(&options, !clean, space);
        if !clean {
            let persisted_at = atime
                .get(lifecycle::PERSISTED_AT)?
                .and_then(|v| <[u8; 4]>::try_from(&v[..]).ok())
                .map(u32::from_be_bytes);
            life.set_used_floor(persisted_at);
        }
        // After a clean shutdown the index comes from its snapshot (one file read); otherwise
        // from sled's trees. The snapshot goes either way: it describes only that shutdown.
        let threshold = options.inline_threshold;
        let from_snapshot = if marked {
            snapshot::read(data_dir, |size| {
                life.blob_added(size, lifecycle::charge(size, threshold))
            })
        } else {
            None
        };
        snapshot::remove(data_dir);
        let index = match from_snapshot {
            Some(index) => index,
            None => load_index(&cas, &atime, &life, threshold)?,
        };
        life.count_action_results(&ac)?;
        life.settle_max_size(data_dir, true);
        Ok(SledStore {
            inner: Arc::new(Inner {
                db,
                cas,
                blobs,
                ac,
                atime,
                files,
                data_dir: data_dir.to_path_buf(),
                index,
                life,
                namespaces,
                stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
                inline_gate: RwLock::new(()),
                upkeep: Mutex::new(()),
                inline_threshold: options.inline_threshold,
                active_uploads: Mutex::new(HashSet::new()),
                write_budget: WriteBudget::default(),
                transfers: Transfers::default(),
                reads: Reads::new(options.stall),
                commit,
            }),
        })
    }
}

impl Inner {
    /// The index entry for `digest`, if a blob with that hash *and size* is stored.
    fn lookup(&self, digest: &Digest) -> Result<Option<Location>> {
        Ok(self.lookup_entry(digest)?.map(|(location, _)| location))
    }

    /// Like [`Inner::lookup`], with the raw entry (for what follows the common part: a file
    /// blob's chunk checksums), so a read decodes one sled get.
    fn lookup_entry(&self, digest: &Digest) -> Result<Option<(Location, sled::IVec)>> {
        let Some(v) = self.cas.get(digest.hash)? else {
            return Ok(None);
        };
        match decode_entry(&v) {
            Some((location, size)) if size == digest.size => Ok(Some((location, v))),
            Some(_) => Ok(None),
            None => Err(Error::internal(
                format!("index entry of {digest}"),
                "corrupt index entry",
            )),
        }
    }

    /// The lock stripe of a hash (see `Inner::stripes`).
    fn stripe(&self, digest: &Digest) -> MutexGuard<'_, ()> {
        self.stripes[digest.hash[1] as usize % STRIPES].lock()
    }

    /// Stores a small blob in sled; returns once it is durable.
    async fn put_inline(&self, digest: &Digest, data: &[u8]) -> Result<()> {
        let result = self.try_put_inline(digest, data).await;
        self.life.note_write(&result);
        result
    }

    async fn try_put_inline(&self, digest: &Digest, data: &[u8]) -> Result<()> {
        self.life.admit(self.charge(digest.size))?;
        let ours = {
            let _gate = self.inline_gate.read();
            let id = self.db.generate_id()?;
            self.blobs.insert(id.to_be_bytes(), data)?;
            let entry = encode_entry(Location::Inline { id }, digest.size, self.life.now());
            let _stripe = self.stripe(digest);
            let swapped = self.cas.compare_and_swap(
                digest.hash,
                None as Option<&[u8]>,
                Some(entry.clone()),
            )?;
            if swapped.is_err() {
                // A concurrent writer stored the same blob first; keep theirs (and wait for
                // it to be durable like our own).
                self.blobs.remove(id.to_be_bytes())?;
                None
            } else {
                Some((id, entry))
            }
        };
        // Visible to FindMissingBlobs (the in-memory index) only once durable: "present" is a
        // promise too, and clients skip their own upload on it.
        if let Err(e) = self.commit.durable().await {
            if let Some((id, entry)) = ours {
                let _stripe = self.stripe(digest);
                let _ = self
                    .cas
                    .compare_and_swap(digest.hash, Some(entry), None as Option<&[u8]>);
                let _ = self.blobs.remove(id.to_be_bytes());
            }
            return Err(e);
        }
        if ours.is_none() {
            self.still_stored(digest)?;
        }
        self.added(digest);
        Ok(())
    }

    /// After waiting for a concurrent writer's copy to be durable: that copy is still there
    /// (its writer takes it back if its flush failed).
    fn still_stored(&self, digest: &Digest) -> Result<()> {
        match self.lookup(digest)? {
            Some(_) => Ok(()),
            None => Err(Error::Unavailable(format!(
                "blob {digest} was being stored by another call that failed; retry"
            ))),
        }
    }

    /// Counts a blob that just became visible (and is used now).
    fn added(&self, digest: &Digest) {
        if self.index.insert(digest, self.life.now()) {
            self.life.blob_added(digest.size, self.charge(digest.size));
        }
    }

    /// Bytes a blob counts against `max_size` (see [`lifecycle::charge`]).
    fn charge(&self, size: u64) -> u64 {
        lifecycle::charge(size, self.inline_threshold)
    }

    /// Drops a blob that is gone or damaged on disk, so clients see it as missing and upload it
    /// again instead of being served bad bytes.
    ///
    /// `judged` is the entry that was found damaged: if the blob was evicted and stored again
    /// meanwhile (another entry now), the fresh copy is left alone.
    fn drop_damaged(&self, digest: &Digest, judged: Location, why: &str) {
        let _stripe = self.stripe(digest);
        match self.lookup(digest) {
            Ok(Some(current)) if current == judged => {}
            Ok(_) => return, // gone already, or replaced by a fresh copy
            Err(e) => tracing::error!(%digest, error = %e, "cannot read index entry"),
        }
        tracing::error!(%digest, why, "stored blob is damaged; removing it");
        if self.index.remove(digest).is_some() {
            self.life
                .blob_removed(digest.size, self.charge(digest.size));
        }
        let _ = self.atime.remove(digest.hash);
        match self.cas.remove(digest.hash) {
            Ok(Some(entry)) => {
                if let Some((Location::Inline { id }, _)) = decode_entry(&entry) {
                    if let Err(e) = self.blobs.remove(id.to_be_bytes()) {
                        tracing::error!(%digest, error = %e, "cannot drop inline data");
                    }
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!(%digest, error = %e, "cannot drop index entry"),
        }
        let _ = std::fs::remove_file(self.files.blob_path(digest));
    }

    /// The in-memory index listed a blob that sled does not have (e.g. removed during a
    /// shutdown after the index snapshot was taken): drop it, so FindMissingBlobs stops
    /// promising it.
    fn forget_if_unbacked(&self, digest: &Digest, indexed: bool) {
        if !indexed {
            return;
        }
        let _stripe = self.stripe(digest);
        if matches!(self.lookup(digest), Ok(None)) && self.index.remove(digest).is_some() {
            tracing::warn!(%digest, "index listed a blob that is not stored; forgetting it");
            self.life
                .blob_removed(digest.size, self.charge(digest.size));
        }
    }

    /// An inline blob's bytes, verified against its digest.
    fn inline_data(&self, digest: &Digest, id: u64) -> Result<Option<Bytes>> {
        let Some(v) = self.blobs.get(id.to_be_bytes())? else {
            self.drop_damaged(digest, Location::Inline { id }, "inline data is missing");
            return Ok(None);
        };
        if verify(*digest, &v).is_err() {
            self.drop_damaged(
                digest,
                Location::Inline { id },
                "inline data does not match its digest",
            );
            return Ok(None);
        }
        Ok(Some(Bytes::copy_from_slice(&v)))
    }

    /// Renames a verified file into place and indexes it, under the hash's stripe lock, and
    /// returns once the index entry is durable. If the blob is stored already, `written` is
    /// deleted instead: replacing a durable copy would put it at risk if this write failed.
    async fn publish_file(
        self: &Arc<Self>,
        written: PathBuf,
        digest: Digest,
        xxh3: u64,
        sums: Vec<u64>,
    ) -> Result<()> {
        let inner = self.clone();
        let result = run_blocking(move || {
            let entry = encode_file_entry(xxh3, digest.size, inner.life.now(), &sums);
            let ours = {
                let _stripe = inner.stripe(&digest);
                if inner.lookup(&digest)?.is_some() {
                    let _ = std::fs::remove_file(&written);
                    false
                } else {
                    if let Err(e) = inner.files.publish(&written, &digest) {
                        let _ = std::fs::remove_file(&written);
                        return Err(e.into());
                    }
                    if let Err(e) = inner.cas.insert(digest.hash, entry.clone()) {
                        let _ = std::fs::remove_file(inner.files.blob_path(&digest));
                        return Err(e.into());
                    }
                    true
                }
            };
            if let Err(e) = inner.commit.durable_blocking() {
                if ours {
                    // Never acknowledged: take it back, file and all, so nothing is left behind.
                    let _stripe = inner.stripe(&digest);
                    let _ =
                        inner
                            .cas
                            .compare_and_swap(digest.hash, Some(entry), None as Option<&[u8]>);
                    let _ = std::fs::remove_file(inner.files.blob_path(&digest));
                }
                return Err(e);
            }
            if !ours {
                inner.still_stored(&digest)?;
            }
            inner.added(&digest);
            Ok(())
        })
        .await;
        self.life.note_write(&result);
        result
    }
}

#[async_trait]
impl Store for SledStore {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let now = self.inner.life.now();
        let missing: Vec<Digest> = digests
            .iter()
            .filter(|d| !d.is_empty_blob() && !self.inner.index.touch(d, now))
            .copied()
            .collect();
        self.inner
            .life
            .count_cas_lookups(digests.len() as u64, (digests.len() - missing.len()) as u64);
        Ok(missing)
    }

    async fn get(&self, digest: &Digest) -> Result<Option<Bytes>> {
        if digest.is_empty_blob() {
            return Ok(Some(Bytes::new()));
        }
        let found = self.inner.index.touch(digest, self.inner.life.now());
        self.inner.life.count_cas_lookups(1, found as u64);
        match self.inner.lookup(digest)? {
            None => {
                self.inner.forget_if_unbacked(digest, found);
                Ok(None)
            }
            Some(Location::Inline { id }) => self.inner.inline_data(digest, id),
            Some(Location::File { xxh3 }) => {
                let path = self.inner.files.blob_path(digest);
                let data = match tokio::fs::read(&path).await {
                    Ok(data) => Bytes::from(data),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        self.inner.drop_damaged(
                            digest,
                            Location::File { xxh3 },
                            "blob file is missing",
                        );
                        return Ok(None);
                    }
                    Err(e) => return Err(Error::internal(format!("reading blob {digest}"), e)),
                };
                if data.len() as u64 != digest.size || xxh3_64(&data) != xxh3 {
                    self.inner.drop_damaged(
                        digest,
                        Location::File { xxh3 },
                        "blob file does not match its checksum",
                    );
                    return Ok(None);
                }
                Ok(Some(data))
            }
        }
    }

    async fn put(&self, digest: &Digest, data: Bytes) -> Result<()> {
        verify(*digest, &data)?;
        if digest.is_empty_blob() || self.inner.index.touch(digest, self.inner.life.now()) {
            return Ok(());
        }
        if digest.size <= self.inner.inline_threshold {
            return self.inner.put_inline(digest, &data).await;
        }
        let _reserved = self.inner.reserve(self.inner.charge(digest.size))?;
        let tmp = self.inner.files.temp_path();
        let path = tmp.clone();
        let written = blocking(move || {
            let mut w = BlobWriter::create(&path)?;
            w.write(&data)?;
            w.flush()?;
            Ok((xxh3_64(&data), chunk_sums::of(&data)))
        })
        .await;
        match written {
            Ok((xxh3, sums)) => self.inner.publish_file(tmp, *digest, xxh3, sums).await,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                let result = Err(e);
                self.inner.life.note_write(&result);
                result
            }
        }
    }

    async fn read(
        &self,
        digest: &Digest,
        offset: u64,
        limit: Option<u64>,
        chunk_size: usize,
    ) -> Result<Option<BlobStream>> {
        let end = match limit {
            Some(l) => digest.size.min(offset.saturating_add(l)),
            None => digest.size,
        };
        if digest.is_empty_blob() {
            return Ok(Some(futures::stream::empty().boxed()));
        }
        let found = self.inner.index.touch(digest, self.inner.life.now());
        self.inner.life.count_cas_lookups(1, found as u64);
        match self.inner.lookup_entry(digest)? {
            None => {
                self.inner.forget_if_unbacked(digest, found);
                Ok(None)
            }
            Some((Location::Inline { id }, _)) => {
                let Some(data) = self.inner.inline_data(digest, id)? else {
                    return Ok(None);
                };
                let data = data.slice(offset as usize..end as usize);
                let chunks: Vec<Result<Bytes>> = (0..data.len())
                    .step_by(chunk_size.max(1))
                    .map(|at| Ok(data.slice(at..data.len().min(at + chunk_size))))
                    .collect();
                Ok(Some(futures::stream::iter(chunks).boxed()))
            }
            Some((Location::File { xxh3 }, entry)) => {
                let path = self.inner.files.blob_path(digest);
                let file = match std::fs::File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        self.inner.drop_damaged(
                            digest,
                            Location::File { xxh3 },
                            "blob file is missing",
                        );
                        return Ok(None);
                    }
                    Err(e) => return Err(Error::internal(format!("opening blob {digest}"), e)),
                };
                let digest = *digest;
                let blob = Blob {
                    file,
                    digest,
                    xxh3,
                    sums: entry_sums(&entry, digest.size),
                };
                let permit = self.inner.transfers.permit()?;
                let store = self.inner.clone();
                let damaged =
                    move |why: &str| store.drop_damaged(&digest, Location::File { xxh3 }, why);
                Ok(Some(self.inner.reads.stream(
                    blob,
                    offset..end,
                    chunk_size,
                    permit,
                    damaged,
                )))
            }
        }
    }

    async fn begin_upload(
        &self,
        upload_id: &str,
        digest: &Digest,
        offset: u64,
    ) -> Result<Box<dyn Upload>> {
        if digest.size <= self.inner.inline_threshold {
            // Small uploads are buffered in memory: cheap to resend, so not resumable.
            if offset != 0 {
                return Err(Error::InvalidArgument(format!(
                    "write_offset {offset} for upload {upload_id} of {digest}: no bytes of it are \
                     stored, so the write must start at offset 0"
                )));
            }
            return Ok(Box::new(MemoryUpload {
                store: self.inner.clone(),
                digest: *digest,
                verifier: Verifier::new(*digest),
                buf: BytesMut::with_capacity(digest.size as usize),
            }));
        }
        // Room is set aside before bytes are accepted, so concurrent uploads cannot together
        // overshoot max_size; a step at a time, so a stalled upload holds little.
        let reservation = self
            .inner
            .reserve(self.inner.charge(digest.size.min(offset + RESERVE_STEP)))?;
        // Shared by the handler and the writer thread: the id stays claimed until the upload is
        // published (or abandoned) and its writer has stopped touching the file.
        let guard = Arc::new(UploadGuard::claim(&self.inner, upload_id)?);
        let path = self.inner.files.upload_path(upload_id, digest);
        let expected = *digest;
        let opened = blocking(move || open_upload_file(&path, expected, offset)).await;
        // A read-only or full disk shows here first: health and refusals must know of it.
        self.inner.life.note_write(&opened);
        let (file, hashes) = opened?.map_err(|have| {
            Error::InvalidArgument(format!(
                "write_offset {offset} for upload {upload_id} of {digest} does not match the \
                     {have} bytes stored so far; resume at offset {have} or restart at 0"
            ))
        })?;
        // The handler hashes; a blocking writer writes. Disk writes overlap with receiving and
        // hashing the next bytes, within the file tier's queue bounds.
        let permit = self.inner.transfers.permit()?;
        let writer = self.inner.write_budget.start(file, permit, guard.clone());
        Ok(Box::new(FileUpload {
            store: self.inner.clone(),
            digest: *digest,
            path: self.inner.files.upload_path(upload_id, digest),
            received: offset,
            hashes,
            writer,
            _guard: guard,
            reservation,
        }))
    }

    async fn upload_progress(&self, upload_id: &str, digest: &Digest) -> Result<Option<u64>> {
        if digest.size <= self.inner.inline_threshold {
            return Ok(None);
        }
        let path = self.inner.files.upload_path(upload_id, digest);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::internal(format!("upload {upload_id}"), e)),
        }
    }

    async fn get_action_result(&self, instance: &str, action: &Digest) -> Result<Option<Bytes>> {
        self.inner.get_action_result(instance, action)
    }

    async fn put_action_result(
        &self,
        instance: &str,
        action: &Digest,
        result: Bytes,
    ) -> Result<()> {
        let r = self
            .inner
            .put_action_result(instance, action, &result)
            .await;
        self.inner.life.note_write(&r);
        r
    }

    async fn remove_abandoned_uploads(&self, max_age: Duration) -> Result<usize> {
        let inner = self.inner.clone();
        blocking(move || {
            let cutoff = SystemTime::now()
                .checked_sub(max_age)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let mut removed = 0;
            for entry in std::fs::read_dir(inner.files.uploads_dir())? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                // `{upload id}-{hash}-{size}`; the id itself may contain '-'.
                let upload_id = name.rsplitn(3, '-').nth(2).unwrap_or(&name);
                // Claim the id while deciding, so no stream can resume it meanwhile.
                let Ok(_claimed) = UploadGuard::claim(&inner, upload_id) else {
                    continue; // being written right now
                };
                let stale = match entry.metadata().and_then(|m| m.modified()) {
                    Ok(modified) => modified < cutoff,
                    Err(_) => false, // renamed away by a finishing upload meanwhile
                };
                if stale {
                    match std::fs::remove_file(entry.path()) {
                        Ok(()) => removed += 1,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok(removed)
        })
        .await
    }

    async fn flush(&self) -> Result<()> {
        let inner = self.inner.clone();
        // A cleanup or verify pass still running stops at its next blob (and runs again later).
        self.inner.life.stop();
        run_blocking(move || {
            let _no_pass_running = inner.upkeep.lock();
            // Every acknowledged write is durable already (group commit). On a disk that cannot
            // take writes, what is left (last uses, the snapshot, the clean mark) is skipped:
            // the next start then counts as unclean, which keeps the retention promise.
            if !inner.life.space.top_up() {
                tracing::warn!(
                    "the data dir cannot take writes: last uses are not saved, and the next \
                     start runs the cleanup pass"
                );
                if let Err(e) = inner.db.flush() {
                    tracing::warn!(error = %e, "final flush failed; acknowledged writes were already durable");
                }
                return Ok(());
            }
            inner.persist_use(true)?;
            inner.db.flush()?;
            if !inner.life.cleanup_pending() {
                // The snapshot first: the mark vouches for it.
                if let Err(e) = snapshot::write(&inner.data_dir, &inner.index) {
                    tracing::warn!(error = %e, "cannot write the index snapshot; the next start reads sled");
                    snapshot::remove(&inner.data_dir);
                }
                lifecycle::mark_clean_shutdown(&inner.data_dir)?;
            }
            Ok(())
        })
        .await
    }

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
        lifecycle::maintain(self.inner.clone()).await
    }

    fn write_refusal(&self) -> Option<String> {
        self.inner.life.write_refusal()
    }

    fn clock(&self) -> u64 {
        self.inner.life.now() as u64
    }

    async fn namespaces(&self) -> Result<Vec<NamespaceInfo>> {
        Ok(self.inner.namespaces.list())
    }

    async fn invalidate_actions(&self, instance: &str, actions: &[Digest]) -> Result<u64> {
        let (inner, instance, actions) =
            (self.inner.clone(), instance.to_string(), actions.to_vec());
        run_blocking(move || inner.invalidate_actions(&instance, &actions)).await
    }

    async fn invalidate_namespace(&self, instance: &str, reason: &str) -> Result<u64> {
        let (inner, instance, reason) =
            (self.inner.clone(), instance.to_string(), reason.to_string());
        run_blocking(move || inner.invalidate_namespace(&instance, &reason)).await
    }

    async fn drop_namespace(&self, instance: &str) -> Result<u64> {
        let (inner, instance) = (self.inner.clone(), instance.to_string());
        run_blocking(move || inner.drop_namespace(&instance)).await
    }
}

/// Version of the layout described at the top of this file, kept under `format` in the
/// default tree. 1: action results without a last-use prefix (before eviction existed); 2:
/// without an epoch (before invalidation existed).
const FORMAT: u32 = 3;

/// Brings a data dir written by an older hoard up to [`FORMAT`]. Action results of older formats
/// lack part of today's header; read as today's they would be served with their first bytes cut
/// off, so they are dropped (a cache may forget, never serve wrong data).
fn upgrade_format(db: &sled::Db, ac: &sled::Tree) -> Result<()> {
    let stored = db
        .get("format")?
        .and_then(|v| <[u8; 4]>::try_from(&v[..]).ok())
        .map(u32::from_be_bytes);
    match stored {
        Some(FORMAT) => return Ok(()),
        Some(v) if v > FORMAT => {
            return Err(Error::FailedPrecondition(format!(
                "the data dir was written by a newer hoard (format {v}, this one reads {FORMAT})"
            )))
        }
        Some(_) | None if !ac.is_empty() => {
            tracing::warn!(
                results = ac.len(),
                "dropping action results stored by an older hoard"
            );
            ac.clear()?;
        }
        _ => {}
    }
    db.insert("format", &FORMAT.to_be_bytes())?;
    Ok(())
}

/// Rebuilds the in-memory index from sled's index entries and last-use times. Reads keys and
/// small values only, never blob contents or blob files. Blobs without a recorded last use
/// (written shortly before a crash) count as used now, so they are not evicted first.
fn load_index(
    cas: &sled::Tree,
    atime: &sled::Tree,
    life: &lifecycle::Lifecycle,
    inline_threshold: u64,
) -> Result<Index> {
    let index = Index::new();
    let now = life.now();
    for entry in cas.iter() {
        let (key, value) = entry?;
        let Ok(hash) = <[u8; HASH_LEN]>::try_from(&key[..]) else {
            continue;
        };
        if let Some((_, size)) = decode_entry(&value) {
            let written_at = match entry_written_at(&value) {
                0 => now,
                t => t,
            };
            index.insert(&Digest { hash, size }, written_at);
            life.blob_added(size, lifecycle::charge(size, inline_threshold));
        }
    }
    for entry in atime.iter() {
        let (key, value) = entry?;
        let (Ok(hash), Ok(used)) = (
            <[u8; HASH_LEN]>::try_from(&key[..]),
            <[u8; 4]>::try_from(&value[..]),
        ) else {
            continue;
        };
        index.set_used(&hash, u32::from_be_bytes(used));
    }
    Ok(index)
}

/// Marks an upload id as being written, for as long as the guard lives.
struct UploadGuard {
    store: Arc<Inner>,
    id: String,
}

impl UploadGuard {
    fn claim(store: &Arc<Inner>, id: &str) -> Result<Self> {
        let mut active = store.active_uploads.lock();
        if !active.insert(id.to_string()) {
            return Err(Error::Aborted(format!(
                "upload {id} is already being written by another stream; retry later"
            )));
        }
        Ok(UploadGuard {
            store: store.clone(),
            id: id.to_string(),
        })
    }
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        self.store.active_uploads.lock().remove(&self.id);
    }
}

/// A small upload collected in memory and written to sled in one batch.
struct MemoryUpload {
    store: Arc<Inner>,
    digest: Digest,
    verifier: Verifier,
    buf: BytesMut,
}

#[async_trait]
impl Upload for MemoryUpload {
    fn committed(&self) -> u64 {
        self.verifier.seen()
    }

    async fn append(&mut self, data: Bytes) -> Result<()> {
        self.verifier.update(&data)?;
        self.buf.extend_from_slice(&data);
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        self.verifier.finish()?;
        if self.digest.is_empty_blob() || self.store.index.contains(&self.digest) {
            return Ok(());
        }
        self.store.put_inline(&self.digest, &self.buf).await
    }
}

/// A large upload appended to a file under `uploads/` as it arrives, so it survives a disconnect
/// or restart and can be resumed.
struct FileUpload {
    store: Arc<Inner>,
    digest: Digest,
    path: PathBuf,
    /// Bytes received, counted here so excess bytes are refused before they are queued.
    received: u64,
    hashes: UploadHashes,
    /// The file tier's writer thread and its queue.
    writer: QueuedWriter,
    /// Held until the blob is published, so no other stream can touch the file before that.
    _guard: Arc<UploadGuard>,
    /// The blob's room under max_size, grown as bytes arrive, held until it is published or
    /// the upload is dropped.
    reservation: lifecycle::Reservation,
}

impl FileUpload {
    /// After a failed write: a write the disk refused leaves nothing behind (the partial file
    /// would only hold the space that is lacking); other failures keep it for a resume.
    async fn failed(&mut self, error: &Error) {
        if matches!(error, Error::StorageFull(_) | Error::StorageUnwritable(_)) {
            let _ = self.writer.finish().await;
            let _ = tokio::fs::remove_file(&self.path).await;
        }
    }
}

#[async_trait]
impl Upload for FileUpload {
    fn committed(&self) -> u64 {
        self.received
    }

    async fn append(&mut self, data: Bytes) -> Result<()> {
        let result = self.try_append(data).await;
        if let Err(e) = &result {
            self.failed(e).await;
            self.store.life.note_write(&result);
        }
        result
    }

    async fn stop(&mut self) {
        let _ = self.writer.finish().await;
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        if let Err(e) = self.writer.finish().await {
            self.failed(&e).await;
            let result = Err(e);
            self.store.life.note_write(&result);
            return result;
        }
        let this = *self;
        if let Err(e) = this.hashes.sha256.finish() {
            // The bytes are wrong: resuming cannot fix them.
            let _ = tokio::fs::remove_file(&this.path).await;
            return Err(e);
        }
        // `this._guard` lives until the file is renamed into place and indexed.
        let xxh3 = this.hashes.xxh3.digest();
        this.store
            .publish_file(
                this.path.clone(),
                this.digest,
                xxh3,
                this.hashes.sums.finish(),
            )
            .await
    }
}

impl FileUpload {
    async fn try_append(&mut self, data: Bytes) -> Result<()> {
        self.hashes.update(&data)?; // refuses bytes beyond the declared size
        let through = self.received + data.len() as u64;
        if self.store.charge(through) > self.reservation.charge() {
            let next = self.digest.size.min(through + RESERVE_STEP);
            self.reservation.grow_to(self.store.charge(next))?;
        }
        let len = data.len() as u64;
        self.writer.push(data).await?;
        self.received += len;
        Ok(())
    }
}
