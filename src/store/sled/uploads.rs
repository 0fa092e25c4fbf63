//! CAS writes: whole blobs (`put`), uploads that arrive in pieces (`begin_upload`: small ones
//! collected in memory, large ones appended to a resumable file by the file tier's writer),
//! publishing a blob (data, then index entry, then durable), the upload-id claim
//! ([`UploadGuard`]) and the sweep of abandoned uploads.
//!
//! Must not: make a blob visible (index entry, in-memory index) before its bytes are verified
//! and durable, or let two streams write one upload file.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use xxhash_rust::xxh3::xxh3_64;

use super::entry::encode_file_entry;
use super::usage::Reservation;
use super::{blocking, run_blocking, Inner};
use crate::digest::{verify, Digest, Verifier, HASH_LEN};
use crate::error::{Error, Result};
use crate::store::chunk_sums;
use crate::store::files::upload::{open_upload_file, QueuedWriter, UploadHashes};
use crate::store::files::BlobWriter;
use crate::store::Upload;

/// Room under max_size a large upload reserves ahead of the bytes it has sent.
const RESERVE_STEP: u64 = 64 << 20;

/// Bytes of a batch hashed on the async worker that received it; more go to a blocking thread.
const HASH_ON_WORKER_MAX: usize = 256 << 10;

impl Inner {
    pub(super) async fn put(self: &Arc<Self>, digest: &Digest, data: Bytes) -> Result<()> {
        verify(*digest, &data)?;
        self.put_verified(digest, data).await
    }

    /// Stores the blobs of one batch. The small ones share the work: one append of all their
    /// records and one commit round, instead of a write and a round per blob (each round an
    /// fdatasync, with every blob's task parked and woken). Large ones are stored as by [`Inner::put`], alongside.
    pub(super) async fn put_many(self: &Arc<Self>, blobs: Vec<(Digest, Bytes)>) -> Vec<Result<()>> {
        let bytes: usize = blobs.iter().map(|(_, data)| data.len()).sum();
        let checked: Vec<Result<()>> = if bytes > HASH_ON_WORKER_MAX {
            // Milliseconds of SHA-256: not on an async worker, which other calls share.
            let batch = blobs.clone();
            run_blocking(move || Ok(batch.iter().map(|(d, data)| verify(*d, data)).collect()))
                .await
                .unwrap_or_else(|e| blobs.iter().map(|_| Err(e.again())).collect())
        } else {
            blobs.iter().map(|(d, data)| verify(*d, data)).collect()
        };
        let mut results: Vec<Option<Result<()>>> = blobs.iter().map(|_| None).collect();
        let (mut small, mut large) = (Vec::new(), Vec::new());
        let now = self.clock.now();
        for (i, ((digest, _), check)) in blobs.iter().zip(checked).enumerate() {
            if let Err(e) = check {
                results[i] = Some(Err(e));
            } else if digest.is_empty_blob() || self.index.touch(digest, now) {
                results[i] = Some(Ok(()));
            } else if digest.size <= self.inline_threshold {
                small.push(i);
            } else {
                large.push(i);
            }
        }
        let large_done = futures::future::join_all(
            large
                .iter()
                .map(|&i| self.put_verified(&blobs[i].0, blobs[i].1.clone())),
        );
        let (small_done, large_done) =
            tokio::join!(self.put_small_batch(&blobs, &small), large_done);
        for (i, result) in small.into_iter().zip(small_done) {
            results[i] = Some(result);
        }
        for (i, result) in large.into_iter().zip(large_done) {
            results[i] = Some(result);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::internal("a batch", "blob left unanswered"))))
            .collect()
    }

    /// The small blobs `which` of `blobs` (verified, not stored yet), stored together; one
    /// result per blob of `which`, in order.
    async fn put_small_batch(&self, blobs: &[(Digest, Bytes)], which: &[usize]) -> Vec<Result<()>> {
        let mut out: Vec<Option<Result<()>>> = which.iter().map(|_| None).collect();
        let mut admitted = Vec::with_capacity(which.len());
        for (k, &i) in which.iter().enumerate() {
            match self.admit(self.charge(blobs[i].0.size)) {
                Ok(()) => admitted.push(k),
                Err(e) => out[k] = Some(Err(e)),
            }
        }
        // Nothing to write (all refused): no commit round to wait for.
        if !admitted.is_empty() {
            let records: Vec<(&[u8; HASH_LEN], &[u8])> = admitted
                .iter()
                .map(|&k| (&blobs[which[k]].0.hash, &blobs[which[k]].1[..]))
                .collect();
            let appended = self.segments.append_many(&records).map_err(Error::from);
            // As in `try_put_small`: records durable before any entry names them.
            let ready = match appended {
                Ok(appended) => self.commit.durable().await.map(|()| appended),
                Err(e) => Err(e),
            };
            match ready {
                Err(e) => {
                    for &k in &admitted {
                        out[k] = Some(Err(e.again()));
                    }
                }
                Ok(appended) => {
                    // Durable: visible now. If a concurrent writer stored a blob first, its
                    // copy stays and this record is dead (compaction reclaims it).
                    for (&k, record) in admitted.iter().zip(&appended) {
                        let digest = &blobs[which[k]].0;
                        let _stripe = self.stripe(digest);
                        self.added(digest, Some(record.place));
                        out[k] = Some(Ok(()));
                    }
                    drop(appended);
                }
            }
        }
        out.into_iter()
            .map(|r| {
                let r =
                    r.unwrap_or_else(|| Err(Error::internal("a batch", "blob left unanswered")));
                self.note_write(&r);
                r
            })
            .collect()
    }

    /// [`Inner::put`] of a blob whose bytes are checked already.
    async fn put_verified(self: &Arc<Self>, digest: &Digest, data: Bytes) -> Result<()> {
        if digest.is_empty_blob() || self.index.touch(digest, self.clock.now()) {
            return Ok(());
        }
        if digest.size <= self.inline_threshold {
            return self.put_inline(digest, &data).await;
        }
        let _reserved = self.reserve(self.charge(digest.size))?;
        let tmp = self.files.temp_path();
        let path = tmp.clone();
        let written = blocking(move || {
            let mut w = BlobWriter::create(&path)?;
            w.write(&data)?;
            w.flush()?;
            Ok((xxh3_64(&data), chunk_sums::of(&data)))
        })
        .await;
        match written {
            Ok((xxh3, sums)) => self.publish_file(tmp, *digest, xxh3, sums).await,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                let result = Err(e);
                self.note_write(&result);
                result
            }
        }
    }

    /// Stores a small blob in a segment; returns once it is durable.
    async fn put_inline(&self, digest: &Digest, data: &[u8]) -> Result<()> {
        let result = self.try_put_small(digest, data).await;
        self.note_write(&result);
        result
    }

    async fn try_put_small(&self, digest: &Digest, data: &[u8]) -> Result<()> {
        self.admit(self.charge(digest.size))?;
        let appended = self.segments.append(&digest.hash, data)?;
        // Visible to FindMissingBlobs (the in-memory index) only once durable: "present" is a
        // promise, and clients skip their own upload on it. The record is the blob's only
        // entry until the next checkpoint lists it (see `checkpoint.rs`).
        self.commit.durable().await?;
        let _stripe = self.stripe(digest);
        self.added(digest, Some(appended.place));
        Ok(())
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
            let entry = encode_file_entry(xxh3, digest.size, inner.clock.now(), &sums);
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
            inner.added(&digest, None);
            Ok(())
        })
        .await;
        self.note_write(&result);
        result
    }

    pub(super) async fn begin_upload(
        self: &Arc<Self>,
        upload_id: &str,
        digest: &Digest,
        offset: u64,
    ) -> Result<Box<dyn Upload>> {
        if digest.size <= self.inline_threshold {
            // Small uploads are buffered in memory: cheap to resend, so not resumable.
            if offset != 0 {
                return Err(Error::InvalidArgument(format!(
                    "write_offset {offset} for upload {upload_id} of {digest}: no bytes of it are \
                     stored, so the write must start at offset 0"
                )));
            }
            return Ok(Box::new(MemoryUpload {
                store: self.clone(),
                digest: *digest,
                verifier: Verifier::new(*digest),
                buf: BytesMut::with_capacity(digest.size as usize),
            }));
        }
        // A blob that can never fit is refused now, not after a step of its bytes.
        let whole = self.charge(digest.size);
        if whole > self.usage.max_size() {
            return Err(self.refuse(whole));
        }
        // Room is set aside before bytes are accepted, so concurrent uploads cannot together
        // overshoot max_size; a step at a time, so a stalled upload holds little.
        let reservation = self.reserve(self.charge(digest.size.min(offset + RESERVE_STEP)))?;
        // Shared by the handler and the writer thread: the id stays claimed until the upload is
        // published (or abandoned) and its writer has stopped touching the file.
        let guard = Arc::new(UploadGuard::claim(self, upload_id)?);
        let path = self.files.upload_path(upload_id, digest);
        let expected = *digest;
        let opened = blocking(move || open_upload_file(&path, expected, offset)).await;
        // A read-only or full disk shows here first: health and refusals must know of it.
        self.note_write(&opened);
        let (file, hashes) = opened?.map_err(|have| {
            Error::InvalidArgument(format!(
                "write_offset {offset} for upload {upload_id} of {digest} does not match the \
                     {have} bytes stored so far; resume at offset {have} or restart at 0"
            ))
        })?;
        // The handler hashes; a blocking writer writes. Disk writes overlap with receiving and
        // hashing the next bytes, within the file tier's queue bounds.
        let permit = self.transfers.permit()?;
        let writer = self.write_budget.start(file, permit, guard.clone());
        Ok(Box::new(FileUpload {
            store: self.clone(),
            digest: *digest,
            path: self.files.upload_path(upload_id, digest),
            received: offset,
            hashes,
            writer,
            _guard: guard,
            reservation,
        }))
    }

    pub(super) async fn upload_progress(
        &self,
        upload_id: &str,
        digest: &Digest,
    ) -> Result<Option<u64>> {
        if digest.size <= self.inline_threshold {
            return Ok(None);
        }
        let path = self.files.upload_path(upload_id, digest);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::internal(format!("upload {upload_id}"), e)),
        }
    }

    /// Deletes upload files untouched for `max_age`; returns how many. Blocking.
    pub(super) fn remove_abandoned_uploads(
        self: &Arc<Self>,
        max_age: Duration,
    ) -> std::io::Result<usize> {
        let cutoff = SystemTime::now()
            .checked_sub(max_age)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut removed = 0;
        for entry in std::fs::read_dir(self.files.uploads_dir())? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // `{upload id}-{hash}-{size}`; the id itself may contain '-'.
            let upload_id = name.rsplitn(3, '-').nth(2).unwrap_or(&name);
            // Claim the id while deciding, so no stream can resume it meanwhile.
            let Ok(_claimed) = UploadGuard::claim(self, upload_id) else {
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
    }
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

/// A small upload collected in memory and written to a segment in one piece.
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
        // Storing a blob that is there already is a use of it (as `put` and file uploads count
        // it): it must not be evicted within `min_retention` of this write.
        let now = self.store.clock.now();
        if self.digest.is_empty_blob() || self.store.index.touch(&self.digest, now) {
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
    reservation: Reservation,
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

#[async_trait]
impl Upload for FileUpload {
    fn committed(&self) -> u64 {
        self.received
    }

    async fn append(&mut self, data: Bytes) -> Result<()> {
        let result = self.try_append(data).await;
        if let Err(e) = &result {
            self.failed(e).await;
            self.store.note_write(&result);
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
            self.store.note_write(&result);
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
