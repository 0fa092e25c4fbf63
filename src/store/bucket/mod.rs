//! The object-store backend (`storage.backend = "s3"`): blobs, action results and namespace
//! records as objects in an S3-compatible bucket, which any number of hoard nodes may share.
//!
//! The bucket is the source of truth; a node keeps no state of its own that another node needs,
//! so a load balancer may send any call to any node. Layout, under `storage.s3.prefix`:
//! - `cas/<first two hex digits>/<hash>-<size>`: a blob's bytes. The shard keeps one listing
//!   page to one prefix, and the name alone says what the bytes must hash to.
//! - `ac/ns.<namespace>/<hash>-<size>`: an action record (`actions.rs`).
//! - `namespaces/ns.<namespace>`: a namespace record, JSON (`actions.rs`).
//! - `uploads/<upload id>-<hash>-<size>`: the state of a large upload, so a Write broken off
//!   on one node resumes on any (`upload.rs`).
//! - `events/<first sequence>`: a block of the watch event log all nodes share (`events.rs`,
//!   `crate::watch`).
//!
//! Promises, as for the other backends: a blob becomes visible only whole and verified (a
//! streamed upload goes to a multipart upload that is completed only once the bytes hash to
//! the digest, `upload.rs`; nothing is visible before that), and a whole read is checked
//! against the digest before its last chunk is sent. A ranged read is checked for length
//! only. There is no eviction: what the bucket keeps is its lifecycle rules' business
//! (README, "Scaling out").
//!
//! FindMissingBlobs asks the bucket (HEAD) only about digests this node has not seen there
//! within `storage.s3.existence_cache_age`. Only positive answers are remembered: a blob
//! uploaded through another node is found on the next call.

mod actions;
mod events;
mod upload;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, RetryConfig,
    UpdateVersion,
};
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};

use super::clock::Clock;
use super::existence::Existence;
use super::{BlobStream, Cas, GcReport, Housekeeping, StoreStats, Upload, VerifyReport};
use crate::config::{Config, Provider, S3Config};
use crate::digest::{verify, Digest};
use crate::error::{Error, Result};

/// Requests to the bucket one FindMissingBlobs (or verify) call has in flight at once.
const PARALLEL: usize = 32;
/// How often the background task lists the bucket for `stats` (never on a request path).
const COUNT_EVERY: Duration = Duration::from_secs(600);
/// How often the background task asks the bucket whether it answers (for `/readyz`)...
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// ...and how many failures in a row make it "down".
const PROBES_TO_FAIL: u32 = 2;

/// A bucket-backed store; cheap to clone (clones share everything).
#[derive(Clone)]
pub struct BucketStore {
    inner: Arc<Inner>,
}

struct Inner {
    bucket: Arc<dyn ObjectStore>,
    /// The same bucket's multipart API, for uploads that resume (`upload.rs`).
    parts: Arc<dyn MultipartStore>,
    /// `storage.s3.prefix` as a path (empty for none).
    root: Path,
    /// For messages: `s3://bucket/prefix`.
    name: String,
    seen: Existence,
    /// `storage.s3.epoch_refresh`.
    epoch_refresh: Duration,
    clock: Clock,
    /// What the last listing counted, for `stats`.
    counted: Mutex<Counted>,
    /// Why the bucket did not answer the last probe, while it does not.
    down: Mutex<Option<String>>,
}

#[derive(Clone, Copy, Default)]
struct Counted {
    blobs: u64,
    blob_bytes: u64,
    action_results: u64,
    action_result_bytes: u64,
}

impl BucketStore {
    pub fn from_config(config: &Config) -> Result<Self> {
        let s3 = &config.storage.s3;
        // reqwest's rustls has no crypto provider of its own in this build: ring, as everywhere.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(match s3.provider {
            Provider::S3 => Self::with_bucket(Arc::new(build_s3(s3)?), s3),
            Provider::Gcs => Self::with_bucket(Arc::new(build_gcs(s3)?), s3),
            Provider::Azure => Self::with_bucket(Arc::new(build_azure(s3)?), s3),
        })
    }

    /// A store over any object store with a multipart API (the S3 client of `from_config`).
    pub fn with_bucket<B: ObjectStore + MultipartStore>(bucket: Arc<B>, s3: &S3Config) -> Self {
        let root = Path::from(s3.prefix.as_str());
        let scheme = match s3.provider {
            Provider::S3 => "s3",
            Provider::Gcs => "gs",
            Provider::Azure => "az",
        };
        let name = match s3.prefix.as_str() {
            "" => format!("{scheme}://{}", s3.bucket),
            prefix => format!("{scheme}://{}/{prefix}", s3.bucket),
        };
        BucketStore {
            inner: Arc::new(Inner {
                bucket: bucket.clone(),
                parts: bucket,
                root,
                name,
                seen: Existence::new(s3.existence_cache_entries, s3.existence_cache_age.0),
                epoch_refresh: s3.epoch_refresh.0,
                clock: Clock::default(),
                counted: Mutex::new(Counted::default()),
                down: Mutex::new(None),
            }),
        }
    }
}

/// Every provider's HTTP settings: no limit on a whole request (a large blob read as slowly as
/// its client takes it would be cut off); a bucket that stops sending for `request_timeout`
/// is; `allow_http`. A builder's own `with_allow_http` would write into these, so it is not
/// called.
fn client_options(s3: &S3Config) -> ClientOptions {
    ClientOptions::new()
        .with_timeout_disabled()
        .with_read_timeout(s3.request_timeout.0)
        .with_connect_timeout(Duration::from_secs(5))
        .with_allow_http(s3.allow_http)
}

/// Every provider's retries: bounded, with backoff.
fn retry_config(s3: &S3Config) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: s3.max_retries,
        retry_timeout: s3.retry_timeout.0,
    }
}

/// Hands `storage.s3.options` to a provider's builder, each key as its client names it
/// (`K`, checked with the config already), then builds the client.
fn finish_client<B, K: std::str::FromStr, C>(
    s3: &S3Config,
    mut builder: B,
    set: impl Fn(B, K, &String) -> B,
    build: impl FnOnce(B) -> object_store::Result<C>,
) -> Result<C> {
    for (key, value) in &s3.options {
        let key = key.parse().map_err(|_| {
            Error::InvalidArgument(format!(
                "storage.s3.options: {key:?} is not a setting of the {:?} client",
                s3.provider
            ))
        })?;
        builder = set(builder, key, value);
    }
    build(builder).map_err(|e| {
        Error::InvalidArgument(format!(
            "storage.s3: cannot set up the {:?} client for bucket {}: {e}",
            s3.provider, s3.bucket
        ))
    })
}

/// The GCS client: credentials from `GOOGLE_SERVICE_ACCOUNT`/`GOOGLE_APPLICATION_CREDENTIALS`
/// (or `options`), else the metadata server; `endpoint` for an emulator.
fn build_gcs(s3: &S3Config) -> Result<object_store::gcp::GoogleCloudStorage> {
    let mut builder = GoogleCloudStorageBuilder::from_env()
        .with_client_options(client_options(s3))
        .with_bucket_name(&s3.bucket)
        .with_retry(retry_config(s3));
    if let Some(endpoint) = &s3.endpoint {
        builder = builder.with_base_url(endpoint);
    }
    finish_client(s3, builder, |b, k, v| b.with_config(k, v), |b| b.build())
}

/// The Azure Blob Storage client, for the container `bucket`: account and key (or SAS, or
/// a managed identity) from `AZURE_STORAGE_*` (or `options`); `endpoint` for Azurite or a
/// sovereign cloud.
fn build_azure(s3: &S3Config) -> Result<object_store::azure::MicrosoftAzure> {
    let mut builder = MicrosoftAzureBuilder::from_env()
        .with_client_options(client_options(s3))
        .with_container_name(&s3.bucket)
        .with_retry(retry_config(s3));
    if let Some(endpoint) = &s3.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    finish_client(s3, builder, |b, k, v| b.with_config(k, v), |b| b.build())
}

/// The S3 client `[storage.s3]` describes: credentials from `credentials_file` or the standard
/// chain, bounded retries with backoff, a timeout per request.
fn build_s3(s3: &S3Config) -> Result<object_store::aws::AmazonS3> {
    let mut builder = AmazonS3Builder::from_env()
        .with_client_options(client_options(s3))
        .with_bucket_name(&s3.bucket)
        .with_retry(retry_config(s3));
    if let Some(region) = &s3.region {
        builder = builder.with_region(region);
    }
    if let Some(endpoint) = &s3.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    let path_style = s3.path_style.unwrap_or(s3.endpoint.is_some());
    builder = builder.with_virtual_hosted_style_request(!path_style);
    if let Some(file) = &s3.credentials_file {
        let keys = read_credentials(file, &s3.profile)?;
        builder = builder
            .with_access_key_id(keys.key_id)
            .with_secret_access_key(keys.secret);
        if let Some(token) = keys.token {
            builder = builder.with_token(token);
        }
    }
    finish_client(s3, builder, |b, k, v| b.with_config(k, v), |b| b.build())
}

struct Credentials {
    key_id: String,
    secret: String,
    token: Option<String>,
}

/// The keys of `profile` in an AWS shared-credentials file (INI: `[profile]`, `key = value`).
fn read_credentials(file: &std::path::Path, profile: &str) -> Result<Credentials> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        Error::InvalidArgument(format!(
            "storage.s3.credentials_file {}: {e}",
            file.display()
        ))
    })?;
    let (mut section, mut keys) = (String::new(), HashMap::new());
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
        } else if let (true, Some((k, v))) = (section == profile, line.split_once('=')) {
            keys.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    let mut take = |k: &str| keys.remove(k).filter(|v| !v.is_empty());
    match (take("aws_access_key_id"), take("aws_secret_access_key")) {
        (Some(key_id), Some(secret)) => Ok(Credentials {
            key_id,
            secret,
            token: take("aws_session_token"),
        }),
        _ => Err(Error::InvalidArgument(format!(
            "storage.s3.credentials_file {}: profile [{profile}] needs aws_access_key_id and \
             aws_secret_access_key",
            file.display()
        ))),
    }
}

/// A failed request to the bucket as a client should hear it: the bucket is away or slow
/// (UNAVAILABLE, which Bazel treats as "build locally"), or refuses hoard's credentials.
fn bucket_error(what: impl std::fmt::Display, e: object_store::Error) -> Error {
    match e {
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => Error::Unavailable(format!(
            "{what}: the object store refused hoard's credentials ({e}); check \
                 [storage.s3] and the bucket's policy"
        )),
        e => Error::Unavailable(format!("{what}: the object store did not answer: {e}")),
    }
}

fn blob_name(digest: &Digest) -> String {
    format!("{}-{}", hex::encode(digest.hash), digest.size)
}

impl Inner {
    fn blob_path(&self, digest: &Digest) -> Path {
        let name = blob_name(digest);
        self.root.clone().join("cas").join(&name[..2]).join(name)
    }

    /// The object at `path`, or `None` if the bucket has none; any other failure is `what`
    /// failing, as [`bucket_error`] says it.
    async fn fetch(
        &self,
        path: &Path,
        options: GetOptions,
        what: &str,
    ) -> Result<Option<object_store::GetResult>> {
        match self.bucket.get_opts(path, options).await {
            Ok(got) => Ok(Some(got)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(bucket_error(what, e)),
        }
    }

    /// [`Inner::fetch`] of a whole small object (a record, a state): its bytes and version
    /// (ETag, and GCS's generation), for a conditional write over it.
    async fn fetch_bytes(&self, path: &Path, what: &str) -> Result<Option<(Bytes, UpdateVersion)>> {
        let Some(got) = self.fetch(path, GetOptions::default(), what).await? else {
            return Ok(None);
        };
        let version = UpdateVersion {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        let bytes = got.bytes().await.map_err(|e| bucket_error(what, e))?;
        Ok(Some((bytes, version)))
    }

    /// A blob's object (`range` of it, or all), `None` if the bucket has none or one of
    /// another size (deleted as damaged). Either way the existence cache learns the answer.
    async fn blob_object(
        &self,
        digest: &Digest,
        range: Option<GetRange>,
    ) -> Result<Option<object_store::GetResult>> {
        let options = GetOptions {
            range,
            ..Default::default()
        };
        let what = format!("reading blob {digest}");
        let Some(got) = self.fetch(&self.blob_path(digest), options, &what).await? else {
            self.seen.remove(digest);
            return Ok(None);
        };
        if got.meta.size != digest.size {
            self.drop_damaged(digest, "object has the wrong size").await;
            return Ok(None);
        }
        self.seen.insert(*digest);
        Ok(Some(got))
    }

    /// Whether the bucket holds the blob, from the existence cache or a HEAD.
    async fn exists(&self, digest: &Digest) -> Result<bool> {
        if digest.is_empty_blob() || self.seen.contains(digest) {
            return Ok(true);
        }
        match self.bucket.head(&self.blob_path(digest)).await {
            Ok(meta) if meta.size == digest.size => {
                self.seen.insert(*digest);
                Ok(true)
            }
            // Another size under the same name: not this blob (and never served as one).
            Ok(_) => Ok(false),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(bucket_error(format!("looking for blob {digest}"), e)),
        }
    }

    /// Stores verified bytes. Always written, never skipped on the existence cache's word: a
    /// client uploads a blob because it was told it is missing (another node may have found
    /// it damaged, a lifecycle rule may have expired it), and a PUT of a small blob costs
    /// what a HEAD would. Writing it again also renews its age for the bucket's lifecycle.
    async fn put_verified(&self, digest: &Digest, data: Bytes) -> Result<()> {
        self.bucket
            .put(&self.blob_path(digest), data.into())
            .await
            .map_err(|e| bucket_error(format!("storing blob {digest}"), e))?;
        self.seen.insert(*digest);
        Ok(())
    }

    /// A damaged object is deleted, so the next upload stores it afresh.
    async fn drop_damaged(&self, digest: &Digest, why: &str) {
        tracing::warn!(%digest, why, "blob in the object store is damaged; deleting it");
        self.seen.remove(digest);
        if let Err(e) = self.bucket.delete(&self.blob_path(digest)).await {
            tracing::warn!(%digest, error = %e, "cannot delete the damaged blob; every read of it will fail until it is uploaded again");
        }
    }
}

#[async_trait]
impl Cas for BucketStore {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let lookups: Vec<_> = digests
            .iter()
            .map(|d| {
                let (inner, d) = (self.inner.clone(), *d);
                async move { inner.exists(&d).await }
            })
            .collect();
        let found: Vec<bool> = futures::stream::iter(lookups)
            .buffered(PARALLEL)
            .try_collect()
            .await?;
        Ok(digests
            .iter()
            .zip(found)
            .filter(|(_, found)| !found)
            .map(|(d, _)| *d)
            .collect())
    }

    /// The bucket has no last use to move: what it keeps is up to its lifecycle rules.
    async fn retain(&self, digests: &[Digest], _until: u64) -> Result<Vec<Digest>> {
        self.find_missing(digests).await
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
        let end = match limit {
            Some(l) => digest.size.min(offset.saturating_add(l)),
            None => digest.size,
        };
        if offset >= end {
            // Nothing to send, but the blob must exist for the read to succeed.
            return Ok(self
                .inner
                .exists(digest)
                .await?
                .then(|| futures::stream::empty().boxed()));
        }
        let range = Some(GetRange::Bounded(offset..end));
        let Some(got) = self.inner.blob_object(digest, range).await? else {
            return Ok(None);
        };
        let whole = offset == 0 && end == digest.size;
        let inner = self.inner.clone();
        Ok(Some(
            checked_chunks(
                inner,
                *digest,
                got.into_stream(),
                whole,
                end - offset,
                chunk_size,
            )
            .boxed(),
        ))
    }

    async fn begin_upload(
        &self,
        upload_id: &str,
        digest: &Digest,
        offset: u64,
    ) -> Result<Box<dyn Upload>> {
        let upload =
            upload::BucketUpload::begin(self.inner.clone(), upload_id, *digest, offset).await?;
        Ok(Box::new(upload))
    }

    async fn upload_progress(&self, upload_id: &str, digest: &Digest) -> Result<Option<u64>> {
        self.inner.upload_progress(upload_id, digest).await
    }

    async fn get(&self, digest: &Digest) -> Result<Option<Bytes>> {
        if digest.is_empty_blob() {
            return Ok(Some(Bytes::new()));
        }
        let Some(got) = self.inner.blob_object(digest, None).await? else {
            return Ok(None);
        };
        let data = got
            .bytes()
            .await
            .map_err(|e| bucket_error(format!("reading blob {digest}"), e))?;
        if verify(*digest, &data).is_err() {
            self.inner
                .drop_damaged(digest, "object does not match its digest")
                .await;
            return Ok(None);
        }
        Ok(Some(data))
    }

    async fn put(&self, digest: &Digest, data: Bytes) -> Result<()> {
        verify(*digest, &data)?;
        if digest.is_empty_blob() {
            return Ok(());
        }
        self.inner.put_verified(digest, data).await
    }
}

/// State of [`checked_chunks`].
struct Reading {
    inner: Arc<Inner>,
    digest: Digest,
    body: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
    /// Hashing a whole read; `None` for a ranged one (checked for length only).
    hasher: Option<Sha256>,
    pending: BytesMut,
    received: u64,
    len: u64,
    step: usize,
    done: bool,
}

/// The object's `len` bytes re-cut into pieces of at most `chunk_size`. A whole read is hashed
/// on the way and its last piece held back until the hash matches; a mismatch (or a wrong
/// length) deletes the object and ends the stream with NOT_FOUND, so the client uploads it
/// again instead of building with wrong bytes.
fn checked_chunks(
    inner: Arc<Inner>,
    digest: Digest,
    body: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
    whole: bool,
    len: u64,
    chunk_size: usize,
) -> impl futures::Stream<Item = Result<Bytes>> + Send {
    let state = Reading {
        inner,
        digest,
        body,
        hasher: whole.then(Sha256::new),
        pending: BytesMut::new(),
        received: 0,
        len,
        step: chunk_size.max(1),
        done: false,
    };
    futures::stream::unfold(state, |mut r| async move {
        if r.done {
            return None;
        }
        loop {
            // A whole read keeps more than a piece back, so what is left at the end is one
            // piece at most, sent only once the hash is known.
            let ready = match r.hasher {
                Some(_) => r.pending.len() > r.step,
                None => r.pending.len() >= r.step,
            };
            if ready {
                let piece = r.pending.split_to(r.step).freeze();
                return Some((Ok(piece), r));
            }
            let why = match r.body.next().await {
                Some(Ok(bytes)) => {
                    r.received += bytes.len() as u64;
                    if r.received > r.len {
                        "object is longer than its digest says"
                    } else {
                        if let Some(h) = r.hasher.as_mut() {
                            h.update(&bytes);
                        }
                        r.pending.extend_from_slice(&bytes);
                        continue;
                    }
                }
                Some(Err(e)) => {
                    r.done = true;
                    let e = bucket_error(format!("reading blob {}", r.digest), e);
                    return Some((Err(e), r));
                }
                None if r.received != r.len => "object is shorter than its digest says",
                None => {
                    let good = r
                        .hasher
                        .take()
                        .is_none_or(|h| h.finalize()[..] == r.digest.hash[..]);
                    if good {
                        r.done = true;
                        if r.pending.is_empty() {
                            return None;
                        }
                        let rest = r.pending.split().freeze();
                        return Some((Ok(rest), r));
                    }
                    "object does not match its digest"
                }
            };
            r.done = true;
            r.inner.drop_damaged(&r.digest, why).await;
            let e = damaged(&r.digest);
            return Some((Err(e), r));
        }
    })
}

fn damaged(digest: &Digest) -> Error {
    Error::NotFound(format!(
        "blob {digest} was damaged in the object store and has been removed; upload it again"
    ))
}

#[async_trait]
impl Housekeeping for BucketStore {
    async fn stats(&self) -> Result<StoreStats> {
        let c = *self.inner.counted.lock();
        Ok(StoreStats {
            blobs: c.blobs,
            blob_bytes: c.blob_bytes,
            action_results: c.action_results,
            action_result_bytes: c.action_result_bytes,
            used_bytes: c.blob_bytes + c.action_result_bytes,
            write_refusal: self.unavailable(),
            ..StoreStats::default()
        })
    }

    async fn gc(&self, _target: Option<u64>) -> Result<GcReport> {
        Err(Error::FailedPrecondition(format!(
            "gc: the s3 backend does not evict; {} keeps what its lifecycle rules keep \
             (README, \"Scaling out\")",
            self.inner.name
        )))
    }

    /// Re-hashes every blob as it streams (never a whole blob in memory), a few at a time,
    /// and deletes the ones that do not match their name. Objects under `cas/` whose names are
    /// not `<hash>-<size>` are not ours: they are logged and left alone.
    async fn verify(&self) -> Result<VerifyReport> {
        let inner = &self.inner;
        let mut listing = inner
            .bucket
            .list(Some(&inner.root.clone().join("cas")))
            .chunks(PARALLEL / 4);
        let mut report = VerifyReport::default();
        while let Some(metas) = listing.next().await {
            let mut batch = Vec::with_capacity(metas.len());
            for meta in metas {
                let meta = meta.map_err(|e| bucket_error("verify: listing the blobs", e))?;
                let name = meta.location.filename().unwrap_or_default().to_string();
                match parse_blob_name(&name) {
                    Some(digest) => batch.push((meta.location, name, digest)),
                    None => {
                        tracing::warn!(path = %meta.location, "verify: not a blob of ours; left alone")
                    }
                }
            }
            let checks =
                batch.into_iter().map(|(path, name, digest)| async move {
                    let what = format!("verify: reading {name}");
                    let Some(got) = inner.fetch(&path, GetOptions::default(), &what).await? else {
                        return Ok(None);
                    };
                    let mut body = got.into_stream();
                    let mut hasher = Sha256::new();
                    let mut len = 0u64;
                    while let Some(chunk) = body.next().await {
                        let chunk = chunk.map_err(|e| bucket_error(&what, e))?;
                        len += chunk.len() as u64;
                        hasher.update(&chunk);
                    }
                    let ok = len == digest.size && hasher.finalize()[..] == digest.hash[..];
                    if !ok {
                        inner.bucket.delete(&path).await.map_err(|e| {
                            bucket_error(format!("verify: deleting damaged {name}"), e)
                        })?;
                        inner.seen.remove(&digest);
                    }
                    Ok::<_, Error>(Some((name, digest.size, ok)))
                });
            for checked in futures::future::try_join_all(checks)
                .await?
                .into_iter()
                .flatten()
            {
                let (name, size, ok) = checked;
                report.checked_blobs += 1;
                report.checked_bytes += size;
                if !ok {
                    report.corrupt.push(name);
                }
            }
        }
        Ok(report)
    }

    /// Asks the bucket whether it answers every [`PROBE_EVERY`] (for `/readyz` and the
    /// `hoard.Writes` health status; [`PROBES_TO_FAIL`] failures in a row before it counts as
    /// down, so one lost request does not drain every node), and, in a task of its own, counts
    /// what it holds for `stats` every [`COUNT_EVERY`].
    async fn maintain(&self) {
        let counter = self.clone();
        let counting = tokio::spawn(async move {
            loop {
                match counter.count().await {
                    Ok(c) => *counter.inner.counted.lock() = c,
                    Err(e) => tracing::warn!(error = %e, "cannot list the object store for stats"),
                }
                tokio::time::sleep(COUNT_EVERY).await;
            }
        });
        // Ends the counting task when the server aborts this one.
        struct AbortOnDrop(tokio::task::JoinHandle<()>);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _counting = AbortOnDrop(counting);
        let mut failures = 0;
        loop {
            match self.probe().await {
                None => {
                    failures = 0;
                    if self.inner.down.lock().take().is_some() {
                        tracing::info!("the object store answers again");
                    }
                }
                Some(why) => {
                    failures += 1;
                    if failures >= PROBES_TO_FAIL {
                        let mut down = self.inner.down.lock();
                        if down.is_none() {
                            tracing::warn!(why, "the object store does not answer");
                        }
                        *down = Some(why);
                    }
                }
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    }

    /// Uploads whose saved state nobody has moved on for `max_age`: their multipart uploads
    /// are aborted and their states deleted. (Uploads that never saved a state, because a node
    /// died before their first part was sent, are the bucket's to expire: an
    /// `AbortIncompleteMultipartUpload` lifecycle rule, README.)
    async fn remove_abandoned_uploads(&self, max_age: Duration) -> Result<usize> {
        let inner = &self.inner;
        let cutoff = i64::from(inner.clock.now()) - max_age.as_secs() as i64;
        let mut listing = inner.bucket.list(Some(&inner.root.clone().join("uploads")));
        let mut removed = 0;
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| bucket_error("listing uploads", e))?;
            if meta.last_modified.timestamp() > cutoff {
                continue;
            }
            // Its multipart upload is aborted if the state says which (else the lifecycle
            // rule's); the state goes either way.
            let saved = inner.saved_state(&meta.location).await.ok().flatten();
            if let Some((saved, digest)) =
                saved.and_then(|s| parse_blob_name(&s.blob).map(|d| (s, d)))
            {
                let path = inner.blob_path(&digest);
                let _ = inner.parts.abort_multipart(&path, &saved.multipart).await;
            }
            match inner.bucket.delete(&meta.location).await {
                Ok(()) => removed += 1,
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(bucket_error("deleting an abandoned upload", e)),
            }
        }
        Ok(removed)
    }

    fn write_refusal(&self) -> Option<String> {
        self.unavailable()
    }

    fn unavailable(&self) -> Option<String> {
        self.inner.down.lock().clone()
    }

    /// Every acknowledged write is in the bucket already.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}

impl BucketStore {
    /// `None` if the bucket answers (a HEAD of a key that need not exist), else why not.
    async fn probe(&self) -> Option<String> {
        let key = self.inner.root.clone().join("health-probe");
        match self.inner.bucket.head(&key).await {
            // Without s3:ListBucket, S3 answers a missing key with 403: it answered.
            Ok(_)
            | Err(object_store::Error::NotFound { .. })
            | Err(object_store::Error::PermissionDenied { .. }) => None,
            Err(e) => Some(format!(
                "the object store {} does not answer: {e}",
                self.inner.name
            )),
        }
    }

    async fn count(&self) -> Result<Counted> {
        let inner = &self.inner;
        let mut c = Counted::default();
        let mut blobs = inner.bucket.list(Some(&inner.root.clone().join("cas")));
        while let Some(meta) = blobs.next().await {
            let meta = meta.map_err(|e| bucket_error("listing the blobs", e))?;
            c.blobs += 1;
            c.blob_bytes += meta.size;
        }
        let mut results = inner.bucket.list(Some(&inner.root.clone().join("ac")));
        while let Some(meta) = results.next().await {
            let meta = meta.map_err(|e| bucket_error("listing the action results", e))?;
            c.action_results += 1;
            c.action_result_bytes += meta.size;
        }
        Ok(c)
    }
}

/// `<hash>-<size>` back into a digest.
fn parse_blob_name(name: &str) -> Option<Digest> {
    let (hash, size) = name.split_once('-')?;
    let hash: [u8; 32] = hex::decode(hash).ok()?.try_into().ok()?;
    Some(Digest {
        hash,
        size: size.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::{parse_blob_name, read_credentials};
    use crate::digest::Digest;

    #[test]
    fn blob_names_round_trip() {
        let d = Digest::of(b"hello");
        let name = super::blob_name(&d);
        assert_eq!(parse_blob_name(&name), Some(d));
        assert_eq!(parse_blob_name("zz-5"), None);
        assert_eq!(parse_blob_name("nohyphen"), None);
    }

    #[test]
    fn credentials_come_from_the_named_profile() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("credentials");
        std::fs::write(
            &file,
            "[other]\naws_access_key_id = A\naws_secret_access_key = B\n\n# comment\n\
             [ci]\naws_access_key_id=KEY\naws_secret_access_key = SECRET\naws_session_token = T\n",
        )
        .unwrap();
        let keys = read_credentials(&file, "ci").unwrap();
        assert_eq!(
            (
                keys.key_id.as_str(),
                keys.secret.as_str(),
                keys.token.as_deref()
            ),
            ("KEY", "SECRET", Some("T"))
        );
        let e = read_credentials(&file, "default")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("profile [default] needs"), "{e}");
    }
}
