//! Storage behind every service: small object-safe traits, their backends and decorators.
//!
//! - [`Cas`]: the content-addressable store on the request path (find-missing, ranged streaming
//!   reads, resumable uploads; whole-blob get/put are provided on top).
//! - [`ActionStore`]: encoded action results as stored records keyed by (namespace, action
//!   digest), plus the namespace records and the conditional updates that invalidation and TTL
//!   need. What a record *means* (epochs, TTL, read chains) is decided above, in
//!   `crate::namespace`.
//! - [`Housekeeping`]: stats, gc, verify, upkeep, flush: never on a request path.
//!
//! Backends: `sled` (the default, durable), `memory` (ephemeral) and `bucket` (an
//! S3-compatible object store that several nodes share). Decorators wrap a [`Cas`]
//! and live one per file (`counting.rs`). [`open`] builds the tree from the config, so the server
//! never names a backend. A store verifies every CAS write (hash and size, exactly once) before
//! the blob becomes visible, and always holds the empty blob.

pub mod bucket;
pub mod chunk_sums;
pub mod clock;
pub mod counting;
pub mod existence;
pub mod files;
pub mod index;
pub mod memory;
pub mod refused;
pub mod segments;
pub mod sled;
pub mod tiered;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};

use crate::config::{Backend, Config, FastTier};
use crate::digest::Digest;
use crate::error::Result;
use crate::watch::EventLog;

/// A blob's bytes as a stream of chunks.
pub type BlobStream = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;

/// Chunk size of the provided [`Cas::get`].
const GET_CHUNK: usize = 1 << 20;
/// Blobs [`Cas::get_many`] reads at once.
const PARALLEL_GETS: usize = 32;

/// The content-addressable store, as the request path sees it. Object safe, so decorators and
/// backends stack.
#[async_trait]
pub trait Cas: Send + Sync + 'static {
    /// The subset of `digests` that is not stored, in request order. Never includes the empty blob.
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>>;

    /// Like [`Cas::find_missing`], and each digest found counts as used at `until` (store clock,
    /// Unix seconds; a time to come), so eviction and the retention guarantee spare it until
    /// then and for `min_retention` after. For content something long-lived refers to: the
    /// blobs and trees of a Remote Asset, for as long as the asset lives. A later time never
    /// moves back.
    async fn retain(&self, digests: &[Digest], until: u64) -> Result<Vec<Digest>>;

    /// Streams `limit` bytes (all if `None`) of a blob from `offset`, in chunks of at most
    /// `chunk_size`; `None` if not stored. The caller has checked `offset <= digest.size`.
    async fn read(
        &self,
        digest: &Digest,
        offset: u64,
        limit: Option<u64>,
        chunk_size: usize,
    ) -> Result<Option<BlobStream>>;

    /// Starts an upload of `digest`, or resumes `upload_id` at `offset` if that many bytes of it
    /// are already persisted. `offset` 0 always starts afresh.
    async fn begin_upload(
        &self,
        upload_id: &str,
        digest: &Digest,
        offset: u64,
    ) -> Result<Box<dyn Upload>>;

    /// Bytes persisted so far for an unfinished upload, if the store knows of it.
    async fn upload_progress(&self, upload_id: &str, digest: &Digest) -> Result<Option<u64>>;

    /// A whole blob, for batch reads of small blobs; `None` if not stored.
    async fn get(&self, digest: &Digest) -> Result<Option<Bytes>> {
        let Some(mut chunks) = self.read(digest, 0, None, GET_CHUNK).await? else {
            return Ok(None);
        };
        let mut whole = BytesMut::with_capacity(digest.size as usize);
        while let Some(chunk) = chunks.next().await {
            whole.extend_from_slice(&chunk?);
        }
        Ok(Some(whole.freeze()))
    }

    /// Whole blobs, for one batch read: one result per digest, in order. Up to
    /// [`PARALLEL_GETS`] at once, so a backend with a round trip per blob (a bucket) takes
    /// about one round trip per that many, not one per blob.
    async fn get_many(&self, digests: &[Digest]) -> Vec<Result<Option<Bytes>>> {
        futures::stream::iter(digests.iter().copied())
            .map(|digest| async move { self.get(&digest).await })
            .buffered(PARALLEL_GETS)
            .collect()
            .await
    }

    /// Stores a whole blob after checking that `data` matches `digest`.
    async fn put(&self, digest: &Digest, data: Bytes) -> Result<()> {
        let id = format!("put-{}", uuid::Uuid::new_v4());
        let mut upload = self.begin_upload(&id, digest, 0).await?;
        upload.append(data).await?;
        upload.commit().await
    }

    /// Stores the blobs of one batch, each checked and stored as by [`Cas::put`]; one result
    /// per blob, in order. A backend that can share work across a batch (one write, one
    /// commit) overrides this.
    async fn put_many(&self, blobs: Vec<(Digest, Bytes)>) -> Vec<Result<()>> {
        futures::future::join_all(
            blobs
                .into_iter()
                .map(|(digest, data)| async move { self.put(&digest, data).await }),
        )
        .await
    }
}

/// Copies one blob from `from` to `to`, streamed in 1 MiB chunks (verified by `to` as any
/// write); `false` if `from` does not hold it. For a tiered store's queue and a replica pushing
/// what its upstream lacks.
pub async fn copy_blob(from: &dyn Cas, to: &dyn Cas, digest: &Digest) -> Result<bool> {
    let Some(mut chunks) = from.read(digest, 0, None, GET_CHUNK).await? else {
        return Ok(false);
    };
    let id = format!("copy-{}", uuid::Uuid::new_v4());
    let mut upload = to.begin_upload(&id, digest, 0).await?;
    while let Some(chunk) = chunks.next().await {
        upload.append(chunk?).await?;
    }
    upload.commit().await?;
    Ok(true)
}

/// An action result as an [`ActionStore`] keeps it: opaque bytes and what the namespace policy
/// judges it by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActionRecord {
    /// Last read or write (store clock, Unix seconds), for the TTL since last use.
    pub last_used: u32,
    /// The namespace's epoch when the result was stored; older than the namespace's current
    /// epoch means invalidated.
    pub epoch: u64,
    /// As the namespace policy gave it (an encoded `ActionResult` with its provenance, see
    /// `crate::namespace`); stores keep it byte for byte and never look inside.
    pub result: Bytes,
}

/// Judges a record of a namespace dead (for [`ActionStore::sweep`]).
pub type DeadRecord<'f> = dyn for<'a> Fn(&'a str, &'a ActionRecord) -> bool + Sync + 'f;

/// Action results and namespace records. Writes are durable when they return.
#[async_trait]
pub trait ActionStore: Send + Sync + 'static {
    /// The record stored for `action` in `namespace`.
    async fn get(&self, namespace: &str, action: &Digest) -> Result<Option<ActionRecord>>;

    /// Stores a record, replacing any earlier one (refused if the cache is full).
    async fn put(&self, namespace: &str, action: &Digest, record: ActionRecord) -> Result<()>;

    /// Replaces the record with `new` (deletes it if `None`) only if it is still `seen`; false if
    /// another write came first (that one is newer and wins). Not made durable: for refreshing a
    /// last use and dropping a record judged dead, which a crash may harmlessly undo.
    async fn replace(
        &self,
        namespace: &str,
        action: &Digest,
        seen: &ActionRecord,
        new: Option<ActionRecord>,
    ) -> Result<bool>;

    /// Deletes the listed results of `namespace`; returns how many there were.
    async fn remove(&self, namespace: &str, actions: &[Digest]) -> Result<u64>;

    /// Deletes every result of `namespace` and its record; returns how many results went.
    async fn remove_namespace(&self, namespace: &str) -> Result<u64>;

    /// Deletes every record `dead(namespace, record)` judges dead; returns how many. A
    /// background pass that reclaims space; visibility is decided on every read regardless.
    async fn sweep(&self, dead: &DeadRecord<'_>) -> Result<u64>;

    /// The namespace records saved so far (loaded once at start by the namespace policy).
    async fn namespace_records(&self) -> Result<Vec<NamespaceInfo>>;

    /// Saves namespace records; durable on return if `durable` (epoch bumps), otherwise with
    /// the next flush (last-use times).
    async fn save_namespaces(&self, records: &[NamespaceInfo], durable: bool) -> Result<()>;

    /// Makes `info` (a namespace whose epoch was just raised by one) durable and returns what
    /// was saved. A store other nodes share raises the epoch past whatever another node saved
    /// meanwhile, so two concurrent invalidations stay two; the default saves it as it is.
    async fn bump_namespace(&self, info: &NamespaceInfo) -> Result<NamespaceInfo> {
        self.save_namespaces(std::slice::from_ref(info), true)
            .await?;
        Ok(info.clone())
    }

    /// For a store other nodes share: how often to re-read the namespace records, so an
    /// invalidation made through another node is honoured here within that time. `None` (the
    /// default): this process is the only writer.
    fn epoch_refresh(&self) -> Option<Duration> {
        None
    }

    /// The store's clock in Unix seconds: the one `last_used` is measured by, so "idle for N"
    /// is judged on the same clock (tests move a store's clock forward).
    fn clock(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// What runs beside the request path: reports, passes over the whole store, upkeep, shutdown.
#[async_trait]
pub trait Housekeeping: Send + Sync + 'static {
    /// Sizes, counts and hit rates, for `hoard stats`.
    async fn stats(&self) -> Result<StoreStats>;

    /// Evicts least-recently-used blobs (never one used within the retention period) until the
    /// stored bytes are at most `target` (the low watermark if `None`).
    async fn gc(&self, target: Option<u64>) -> Result<GcReport>;

    /// Re-hashes every stored blob, removes the ones that do not match their digest, and
    /// removes data no index entry names (left by a crash).
    async fn verify(&self) -> Result<VerifyReport>;

    /// Background upkeep for as long as the server runs (eviction between the watermarks,
    /// persisting last uses, the cleanup pass after a crash). Never returns; the server aborts
    /// it on shutdown (before [`Housekeeping::flush`]).
    async fn maintain(&self);

    /// Deletes partial uploads nobody has written to for `max_age`; returns how many.
    async fn remove_abandoned_uploads(&self, max_age: Duration) -> Result<usize>;

    /// Why writes are refused right now (disk full, or cache full of blobs within their
    /// retention), if they are. Cheap: readiness probes ask it.
    fn write_refusal(&self) -> Option<String>;

    /// Why the store cannot serve at all right now (its object store does not answer), if it
    /// cannot: `/readyz` then answers 503 with this. Cheap. The default: always can.
    fn unavailable(&self) -> Option<String> {
        None
    }

    /// Makes everything written so far durable (called on shutdown).
    async fn flush(&self) -> Result<()>;
}

/// One store tree, as the server uses it: the three faces of the same backend (decorated).
#[derive(Clone)]
pub struct Stores {
    pub cas: Arc<dyn Cas>,
    pub actions: Arc<dyn ActionStore>,
    pub housekeeping: Arc<dyn Housekeeping>,
}

impl Stores {
    /// The faces of one backend, with the decorators every tree gets (lookup counting).
    pub fn of<B: Cas + ActionStore + Housekeeping>(backend: Arc<B>) -> Self {
        let counted = Arc::new(counting::Counting::new(backend.clone(), backend.clone()));
        Stores {
            cas: counted.clone(),
            actions: backend,
            housekeeping: counted,
        }
    }
}

impl<B: Cas + ActionStore + Housekeeping> From<Arc<B>> for Stores {
    fn from(backend: Arc<B>) -> Self {
        Stores::of(backend)
    }
}

/// A store tree opened from the config, and where its watch events are kept.
pub struct Opened {
    pub stores: Stores,
    pub events: Arc<EventLog>,
    /// With `[upstream]`: the replica's action results (the CAS in `stores` is already the
    /// upstream behind the local store).
    pub replica: Option<Arc<crate::upstream::ActionCopies>>,
}

/// Builds the store tree `config.storage.backend` names. Blocking (sled opens its files).
pub fn open(config: &Config) -> Result<Opened> {
    if let Some(upstream) = &config.upstream {
        return open_replica(config, upstream);
    }
    match config.storage.backend {
        Backend::Sled => {
            let store = sled::SledStore::from_config(config)?;
            // The watch event log lives in the store's database, so one flush covers both.
            let events = Arc::new(EventLog::open(|name| store.tree(name), &config.watch)?);
            Ok(Opened {
                stores: Stores::of(Arc::new(store)),
                events,
                replica: None,
            })
        }
        Backend::Memory => {
            let store = memory::MemoryStore::from_config(config)?;
            Ok(Opened {
                stores: Stores::of(Arc::new(store)),
                events: Arc::new(EventLog::temporary(&config.watch)?),
                replica: None,
            })
        }
        Backend::S3 => {
            let store = bucket::BucketStore::from_config(config)?;
            Ok(Opened {
                events: Arc::new(shared_events(&store, config)?),
                stores: Stores::of(Arc::new(store)),
                replica: None,
            })
        }
        Backend::Tiered => {
            let bucket = bucket::BucketStore::from_config(config)?;
            let tiered = &config.storage.tiered;
            let (fast, queue) = match tiered.fast {
                FastTier::Sled => {
                    let sled = Arc::new(sled::SledStore::from_config(config)?);
                    let queue = match tiered.write_behind {
                        true => Some(sled.tree("write-behind")?),
                        false => None,
                    };
                    let fast = tiered::FastTier {
                        cas: sled.clone(),
                        housekeeping: sled,
                    };
                    (fast, queue)
                }
                FastTier::Memory => {
                    let memory = Arc::new(memory::MemoryStore::from_config(config)?);
                    let fast = tiered::FastTier {
                        cas: memory.clone(),
                        housekeeping: memory,
                    };
                    (fast, None)
                }
            };
            let events = Arc::new(shared_events(&bucket, config)?);
            let store = Arc::new(tiered::TieredStore::new(
                fast,
                Arc::new(bucket.clone()),
                queue,
            )?);
            let counted = Arc::new(counting::Counting::new(store.clone(), store));
            Ok(Opened {
                stores: Stores {
                    cas: counted.clone(),
                    // Action results are shared and mutable: always the bucket's.
                    actions: Arc::new(bucket),
                    housekeeping: counted,
                },
                events,
                replica: None,
            })
        }
    }
}

/// A replica (`[upstream]`): the local backend (sled or memory) as the fast tier in front of
/// the upstream's CAS, its action store holding copies of the upstream's results, and its own
/// watch log, which the relay fills.
fn open_replica(config: &Config, upstream: &crate::config::UpstreamConfig) -> Result<Opened> {
    let remote = crate::upstream::Upstream::new(upstream)?;
    let slow = Arc::new(crate::upstream::UpstreamCas::new(remote.clone()));
    let (fast, actions, queue, events): (tiered::FastTier, Arc<dyn ActionStore>, _, _) =
        match config.storage.backend {
            Backend::Memory => {
                let memory = Arc::new(memory::MemoryStore::from_config(config)?);
                let fast = tiered::FastTier {
                    cas: memory.clone(),
                    housekeeping: memory.clone(),
                };
                let events = EventLog::temporary(&config.watch)?;
                (fast, memory, None, events)
            }
            _ => {
                let sled = Arc::new(sled::SledStore::from_config(config)?);
                let queue = match upstream.write_behind {
                    true => Some(sled.tree("write-behind")?),
                    false => None,
                };
                let events = EventLog::open(|name| sled.tree(name), &config.watch)?;
                let fast = tiered::FastTier {
                    cas: sled.clone(),
                    housekeeping: sled.clone(),
                };
                (fast, sled, queue, events)
            }
        };
    let local_cas = fast.cas.clone();
    let store = Arc::new(tiered::TieredStore::new(fast, slow.clone(), queue)?.trusting_fast_tier());
    let counted = Arc::new(counting::Counting::new(store.clone(), store));
    let copies = Arc::new(crate::upstream::ActionCopies::new(
        remote,
        actions.clone(),
        slow,
        local_cas,
    ));
    Ok(Opened {
        stores: Stores {
            cas: counted.clone(),
            actions,
            housekeeping: counted,
        },
        events: Arc::new(events),
        replica: Some(copies),
    })
}

/// The watch event log in the bucket, so every node numbers events alike.
fn shared_events(bucket: &bucket::BucketStore, config: &Config) -> Result<EventLog> {
    let s3 = &config.storage.s3;
    EventLog::shared(
        Arc::new(bucket.events()),
        &config.watch,
        s3.epoch_refresh.0,
        watch_delete_grace(s3),
    )
}

/// How long a bucket's watch block outlives its retention: far longer than any request of a
/// node (its retries included) between reading the log and recording a block, so no node
/// takes a deleted block's name again.
fn watch_delete_grace(s3: &crate::config::S3Config) -> Duration {
    Duration::from_secs(60).max(s3.retry_timeout.0 * 4)
}

/// What the store knows of one namespace.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NamespaceInfo {
    pub name: String,
    /// Action results stored before the namespace's current epoch are invisible.
    pub epoch: u64,
    /// Last read or write of an action result in it (Unix seconds).
    pub last_used: u64,
    /// When it was last invalidated as a whole (Unix seconds), and why.
    pub invalidated_at: Option<u64>,
    pub reason: Option<String>,
}

/// What `hoard stats` reports. Sizes in bytes, ages in seconds.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoreStats {
    /// Blobs stored (the empty blob is not counted).
    pub blobs: u64,
    /// Their total size.
    pub blob_bytes: u64,
    /// Action results stored, over all instance names.
    pub action_results: u64,
    /// Their total encoded size.
    pub action_result_bytes: u64,
    /// The bytes `max_size` bounds: blobs (files rounded up to whole 4 KiB blocks) plus
    /// action results.
    pub used_bytes: u64,
    /// The configured bound on `used_bytes`.
    pub max_size: u64,
    /// What the data dir really takes on disk (sled's files plus blob files).
    pub disk_bytes: u64,
    /// Blobs used more recently than this are never evicted.
    pub min_retention_secs: u64,
    /// Blobs evicted since the server started, and their bytes.
    pub evicted_blobs: u64,
    pub evicted_bytes: u64,
    /// How long before its eviction the most recently used evicted blob was last used: if this
    /// nears `min_retention_secs`, the cache is too small for its traffic.
    pub youngest_evicted_age_secs: Option<u64>,
    /// Action results dropped because their TTL since last use passed.
    pub expired_action_results: u64,
    /// Blob existence checks (FindMissingBlobs digests, reads) and how many found the blob.
    pub cas_lookups: u64,
    pub cas_hits: u64,
    /// Action result lookups and how many found one.
    pub ac_lookups: u64,
    pub ac_hits: u64,
    /// Writes refused up front since start, for any reason: the sum of the `refused_*` below
    /// (before per-reason counts, this counted only a full cache; see `store/refused.rs`).
    pub refused_writes: u64,
    /// Of those: over `max_size` with nothing evictable, one write larger than `max_size`, the
    /// data dir's disk full, its file system read-only, the database failed (until restart).
    pub refused_cache_full: u64,
    pub refused_too_large: u64,
    pub refused_disk_full: u64,
    pub refused_read_only: u64,
    pub refused_database_failed: u64,
    /// Why writes are being refused right now, if they are.
    pub write_refusal: Option<String>,
    /// Whether the cleanup pass that follows an unclean shutdown has yet to finish.
    pub cleanup_pending: bool,
    /// Blobs acknowledged and not yet uploaded to the bucket (tiered backend with
    /// write-behind; absent otherwise).
    #[serde(default)]
    pub write_behind_queue: Option<u64>,
}

/// What one `gc` pass did.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GcReport {
    pub evicted_blobs: u64,
    pub evicted_bytes: u64,
    pub expired_action_results: u64,
    /// `used_bytes` after the pass.
    pub used_bytes: u64,
    /// Whether `used_bytes` reached the target; if not, every remaining blob is within
    /// `min_retention`.
    pub reached_target: bool,
}

/// What one `verify` pass found.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    pub checked_blobs: u64,
    pub checked_bytes: u64,
    /// Blobs whose bytes did not match their digest (or were missing); all were removed.
    pub corrupt: Vec<String>,
    /// Pieces of data no index entry named (files and inline data left by a crash), removed.
    pub orphans_removed: u64,
    pub orphan_bytes_removed: u64,
}

/// An upload in progress: bytes are appended in order, then the whole blob is verified and made
/// visible by [`Upload::commit`]. Dropping an upload without committing leaves nothing visible.
#[async_trait]
pub trait Upload: Send {
    /// Bytes received so far, including any resumed prefix.
    fn committed(&self) -> u64;

    /// Appends the next bytes. Fails if they would exceed the digest's size.
    async fn append(&mut self, data: Bytes) -> Result<()>;

    /// Verifies the complete blob against its digest and makes it visible.
    async fn commit(self: Box<Self>) -> Result<()>;

    /// The upload ends without a commit: returns once every byte received is persisted (or
    /// known lost), so `upload_progress` asked right after reports the final figure.
    async fn stop(&mut self) {}
}
