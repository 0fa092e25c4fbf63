//! A streamed upload into the bucket, resumable on any node.
//!
//! Small blobs are collected and stored with one PUT at commit. Once a full [`PART`] has
//! arrived, the bytes go to a multipart upload of the blob's own key, a part at a time; after
//! each part, the upload's state (the multipart upload, its parts, the bytes they hold and the
//! SHA-256 state over them) is saved as `uploads/<upload id>-<hash>-<size>`. A Write that
//! breaks off resumes from there through any node: QueryWriteStatus reports the bytes in
//! saved parts, and a Write at that offset picks the state up. The multipart upload is
//! completed only at commit, and only if all the bytes hash to the digest, so S3 shows
//! nothing under the blob's key before that.
//!
//! Memory per upload: one part being filled, whatever the blob's size (parts are sent one at
//! a time, while the client's next bytes wait in the transport).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use object_store::multipart::PartId;
use object_store::path::Path;
use object_store::ObjectStoreExt;

use super::{blob_name, bucket_error, Inner};
use crate::digest::{Digest, ResumableSha256};
use crate::error::{Error, Result};
use crate::store::Upload;

/// Size of one part of a multipart upload (S3's least, but for the last part, is 5 MiB), and
/// the step in which uploads can be resumed. A multiple of 64, so the hash state is savable.
const PART: usize = 8 << 20;
/// S3 takes at most 10,000 parts: blobs above 9,000 parts of [`PART`] get larger parts.
const MAX_PARTS: u64 = 9_000;

/// The part size of a blob of `size` bytes: [`PART`], or whole MiB enough to stay within
/// [`MAX_PARTS`]. Follows from the size alone, so every node resuming an upload agrees.
fn part_size(size: u64) -> usize {
    let mib = 1u64 << 20;
    (size.div_ceil(MAX_PARTS).div_ceil(mib) * mib).max(PART as u64) as usize
}

/// What is saved of an upload after each part, for a resume on any node.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Saved {
    /// The blob, as `<hash>-<size>`.
    pub(super) blob: String,
    pub(super) multipart: String,
    /// The parts' ids, in order.
    parts: Vec<String>,
    /// SHA-256 over the bytes of those parts (`hashed` says how many there are).
    sha256: ResumableSha256,
}

pub(super) struct BucketUpload {
    inner: Arc<Inner>,
    digest: Digest,
    /// Where its state is saved.
    state: Path,
    /// Over the bytes in parts sent so far.
    hasher: ResumableSha256,
    /// Bytes after the last part sent (all of them, before the first part).
    pending: BytesMut,
    /// The multipart upload and its parts, once the bytes outgrew one part.
    multipart: Option<(String, Vec<PartId>)>,
    /// An append failed part-way: the bytes past the last saved part are lost, so nothing
    /// more is taken and nothing is committed (a resume starts from the saved state).
    failed: bool,
}

impl Inner {
    fn upload_state(&self, upload_id: &str, digest: &Digest) -> Path {
        self.root
            .clone()
            .join("uploads")
            .join(format!("{upload_id}-{}", blob_name(digest)))
    }

    /// The saved state of an upload, if there is one for this blob.
    async fn saved_upload(&self, upload_id: &str, digest: &Digest) -> Result<Option<Saved>> {
        Ok(self
            .saved_state(&self.upload_state(upload_id, digest))
            .await?
            .filter(|s| s.blob == blob_name(digest)))
    }

    /// The state saved at `path`, if any (and readable).
    pub(super) async fn saved_state(&self, path: &Path) -> Result<Option<Saved>> {
        let what = "reading an upload's state";
        Ok(self
            .fetch_bytes(path, what)
            .await?
            .and_then(|(bytes, _)| serde_json::from_slice::<Saved>(&bytes).ok()))
    }

    /// Bytes of an unfinished upload that a Write can resume after.
    pub(super) async fn upload_progress(
        &self,
        upload_id: &str,
        digest: &Digest,
    ) -> Result<Option<u64>> {
        Ok(self
            .saved_upload(upload_id, digest)
            .await?
            .map(|s| s.sha256.hashed()))
    }
}

impl BucketUpload {
    /// A new upload (`offset` 0) or the resume of a saved one at exactly its saved bytes.
    pub(super) async fn begin(
        inner: Arc<Inner>,
        upload_id: &str,
        digest: Digest,
        offset: u64,
    ) -> Result<Self> {
        let state = inner.upload_state(upload_id, &digest);
        let mut upload = BucketUpload {
            inner: inner.clone(),
            digest,
            state,
            hasher: ResumableSha256::default(),
            pending: BytesMut::new(),
            multipart: None,
            failed: false,
        };
        if offset == 0 {
            return Ok(upload);
        }
        let Some(saved) = inner.saved_upload(upload_id, &digest).await? else {
            return Err(Error::InvalidArgument(format!(
                "write_offset {offset} for upload {upload_id} of {digest}: no bytes of it are \
                 stored, so the write must start at offset 0"
            )));
        };
        let have = saved.sha256.hashed();
        if have != offset {
            return Err(Error::InvalidArgument(format!(
                "write_offset {offset} for upload {upload_id} of {digest} does not match the \
                 {have} bytes stored so far; resume at offset {have} or restart at 0"
            )));
        }
        upload.hasher = saved.sha256;
        upload.multipart = Some((
            saved.multipart,
            saved
                .parts
                .into_iter()
                .map(|content_id| PartId { content_id })
                .collect(),
        ));
        Ok(upload)
    }

    /// Bytes received so far: those in parts sent (hashed) and those pending.
    fn received(&self) -> u64 {
        self.hasher.hashed() + self.pending.len() as u64
    }

    fn path(&self) -> Path {
        self.inner.blob_path(&self.digest)
    }

    /// Sends the first `PART` pending bytes as the next part and saves the state.
    async fn send_part(&mut self) -> Result<()> {
        let what = || format!("uploading blob {}", self.digest);
        if self.multipart.is_none() {
            // A new upload under an id that has a saved state (a client restarting at 0): the
            // old multipart upload would otherwise be left to the lifecycle rule.
            if let Ok(Some(old)) = self.inner.saved_state(&self.state).await {
                let _ = self
                    .inner
                    .parts
                    .abort_multipart(&self.path(), &old.multipart)
                    .await;
            }
            let id = self
                .inner
                .parts
                .create_multipart(&self.path())
                .await
                .map_err(|e| bucket_error(what(), e))?;
            self.multipart = Some((id, Vec::new()));
        }
        let part = self.pending.split_to(part_size(self.digest.size)).freeze();
        let Some((id, parts)) = self.multipart.as_ref() else {
            return Err(Error::internal(what(), "no multipart upload"));
        };
        let sent = self
            .inner
            .parts
            .put_part(&self.path(), id, parts.len(), part.clone().into())
            .await;
        let sent = match sent {
            Ok(sent) => sent,
            Err(object_store::Error::NotFound { .. }) => return Err(self.gone().await),
            Err(e) => return Err(bucket_error(what(), e)),
        };
        // Whole parts are whole blocks: the state stays savable.
        if !self.hasher.update_blocks(&part) {
            return Err(Error::internal(
                what(),
                "a part is not whole SHA-256 blocks",
            ));
        }
        let Some((id, parts)) = self.multipart.as_mut() else {
            return Err(Error::internal(what(), "no multipart upload"));
        };
        parts.push(sent);
        let saved = Saved {
            blob: blob_name(&self.digest),
            multipart: id.clone(),
            parts: parts.iter().map(|p| p.content_id.clone()).collect(),
            sha256: self.hasher.clone(),
        };
        let json = serde_json::to_vec(&saved)
            .map_err(|e| Error::internal("encoding an upload's state", e))?;
        self.inner
            .bucket
            .put(&self.state, Bytes::from(json).into())
            .await
            .map_err(|e| bucket_error("saving an upload's state", e))?;
        Ok(())
    }

    async fn try_append(&mut self, data: Bytes) -> Result<()> {
        let through = self.received() + data.len() as u64;
        if through > self.digest.size {
            return Err(Error::InvalidArgument(format!(
                "blob {} received {through} bytes, more than its declared size",
                self.digest
            )));
        }
        self.pending.extend_from_slice(&data);
        while self.pending.len() >= part_size(self.digest.size)
            && self.received() < self.digest.size
        {
            self.send_part().await?;
        }
        Ok(())
    }

    async fn try_commit(mut self) -> Result<()> {
        if self.received() != self.digest.size {
            return Err(Error::InvalidArgument(format!(
                "blob {} received {} bytes, but its digest says {}",
                self.digest,
                self.received(),
                self.digest.size
            )));
        }
        let tail = self.pending.split().freeze();
        let hash = std::mem::take(&mut self.hasher).finish(&tail);
        if hash != self.digest.hash {
            self.forget().await;
            return Err(Error::InvalidArgument(format!(
                "blob {} does not match its digest: the bytes hash to {}",
                self.digest,
                hex::encode(hash)
            )));
        }
        let Some((id, mut parts)) = self.multipart.take() else {
            return self.inner.put_verified(&self.digest, tail).await;
        };
        let what = || format!("storing blob {}", self.digest);
        if !tail.is_empty() {
            let sent = self
                .inner
                .parts
                .put_part(&self.path(), &id, parts.len(), tail.into())
                .await;
            match sent {
                Ok(sent) => parts.push(sent),
                Err(object_store::Error::NotFound { .. }) => return Err(self.gone().await),
                Err(e) => return Err(bucket_error(what(), e)),
            }
        }
        match self
            .inner
            .parts
            .complete_multipart(&self.path(), &id, parts)
            .await
        {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => return Err(self.gone().await),
            Err(e) => return Err(bucket_error(what(), e)),
        }
        self.inner.seen.insert(self.digest);
        let _ = self.inner.bucket.delete(&self.state).await;
        Ok(())
    }

    /// The multipart upload is gone from the bucket (a lifecycle rule aborted it, or another
    /// stream on this upload id completed or dropped it): its state goes too, and the client
    /// is told to start again (ABORTED, which clients retry: QueryWriteStatus then says 0).
    async fn gone(&mut self) -> Error {
        self.multipart = None;
        let _ = self.inner.bucket.delete(&self.state).await;
        Error::Aborted(format!(
            "the bucket no longer has the upload of {} (expired, or finished by another \
             stream); start it again at offset 0",
            self.digest
        ))
    }

    /// Drops what was sent: the bytes are wrong, and resuming cannot fix them.
    async fn forget(&mut self) {
        if let Some((id, _)) = self.multipart.take() {
            let _ = self.inner.parts.abort_multipart(&self.path(), &id).await;
        }
        let _ = self.inner.bucket.delete(&self.state).await;
    }
}

#[async_trait]
impl Upload for BucketUpload {
    fn committed(&self) -> u64 {
        self.received()
    }

    async fn append(&mut self, data: Bytes) -> Result<()> {
        if self.failed {
            return Err(broken(&self.digest));
        }
        let result = self.try_append(data).await;
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        if self.failed {
            return Err(broken(&self.digest));
        }
        self.try_commit().await
    }
}

fn broken(digest: &Digest) -> Error {
    Error::Aborted(format!(
        "upload of {digest} failed part-way; ask QueryWriteStatus where to resume"
    ))
}

#[cfg(test)]
mod tests {
    use super::{part_size, MAX_PARTS, PART};

    #[test]
    fn every_blob_fits_in_s3s_part_limit() {
        assert_eq!(part_size(1 << 20), PART);
        assert_eq!(part_size(70 << 30), PART, "8 MiB parts up to ~70 GiB");
        for size in [80u64 << 30, 1 << 40, 5 << 40] {
            let part = part_size(size) as u64;
            assert!(size.div_ceil(part) <= MAX_PARTS, "{size}");
            assert_eq!(part % (1 << 20), 0, "whole MiB, so whole SHA-256 blocks");
        }
    }
}
