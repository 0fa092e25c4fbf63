//! A streamed upload into the bucket. Small blobs are collected and stored with one PUT at
//! commit; once more than [`PART`] has arrived, the bytes go to a multipart upload of the
//! blob's own key, a part at a time, and the upload is completed only at commit and only if
//! the bytes hash to the digest. Until then S3 shows nothing under the key, so a partial or
//! wrong upload never becomes visible; a dropped one is aborted.
//!
//! Memory per upload: the part being filled plus [`IN_FLIGHT`] parts being sent, whatever the
//! blob's size.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use object_store::{ObjectStoreExt, WriteMultipart};

use super::{bucket_error, Inner};
use crate::digest::{Digest, Verifier};
use crate::error::Result;
use crate::store::Upload;

/// Size of one part of a multipart upload (S3's least, but for the last part, is 5 MiB).
const PART: usize = 8 << 20;
/// Parts one upload may have on their way to the bucket at once.
const IN_FLIGHT: usize = 2;

pub(super) struct BucketUpload {
    inner: Arc<Inner>,
    digest: Digest,
    verifier: Verifier,
    received: u64,
    /// Bytes so far, while they fit in one part.
    small: BytesMut,
    /// The multipart upload, once the bytes outgrew one part.
    multipart: Option<WriteMultipart>,
    /// An append failed: bytes may be missing from the bucket's copy, so nothing more is
    /// taken and nothing is committed.
    failed: bool,
}

impl BucketUpload {
    pub(super) fn new(inner: Arc<Inner>, digest: Digest) -> Self {
        BucketUpload {
            inner,
            digest,
            verifier: Verifier::new(digest),
            received: 0,
            small: BytesMut::new(),
            multipart: None,
            failed: false,
        }
    }

    /// Ends a multipart upload that will not be completed, in the background.
    fn abort(&mut self) {
        if let Some(writer) = self.multipart.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = writer.abort().await;
                });
            }
        }
    }
}

#[async_trait]
impl Upload for BucketUpload {
    fn committed(&self) -> u64 {
        self.received
    }

    async fn append(&mut self, data: Bytes) -> Result<()> {
        if self.failed {
            return Err(self.broken());
        }
        let result = self.try_append(data).await;
        if result.is_err() {
            self.failed = true;
            self.abort();
        }
        result
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        if self.failed {
            return Err(self.broken());
        }
        self.try_commit().await
    }
}

impl BucketUpload {
    fn broken(&self) -> crate::error::Error {
        crate::error::Error::Aborted(format!(
            "upload of {} failed part-way; start it again at offset 0",
            self.digest
        ))
    }

    async fn try_append(&mut self, data: Bytes) -> Result<()> {
        // Refuses bytes beyond the declared size.
        self.verifier.update(&data)?;
        self.received += data.len() as u64;
        if self.multipart.is_none() && self.small.len() + data.len() <= PART {
            self.small.extend_from_slice(&data);
            return Ok(());
        }
        if self.multipart.is_none() {
            let path = self.inner.blob_path(&self.digest);
            let upload = self
                .inner
                .bucket
                .put_multipart(&path)
                .await
                .map_err(|e| bucket_error(format!("uploading blob {}", self.digest), e))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
            writer.put(self.small.split().freeze());
            self.multipart = Some(writer);
        }
        if let Some(writer) = self.multipart.as_mut() {
            writer.put(data);
            if let Err(e) = writer.wait_for_capacity(IN_FLIGHT).await {
                return Err(bucket_error(format!("uploading blob {}", self.digest), e));
            }
        }
        Ok(())
    }

    async fn try_commit(mut self: Box<Self>) -> Result<()> {
        let verifier = std::mem::replace(&mut self.verifier, Verifier::new(self.digest));
        if let Err(e) = verifier.finish() {
            self.abort();
            return Err(e);
        }
        match self.multipart.take() {
            Some(writer) => {
                writer
                    .finish()
                    .await
                    .map_err(|e| bucket_error(format!("storing blob {}", self.digest), e))?;
                self.inner.seen.insert(self.digest);
                Ok(())
            }
            None => {
                let data = self.small.split().freeze();
                self.inner.put_verified(&self.digest, data).await
            }
        }
    }
}

impl Drop for BucketUpload {
    fn drop(&mut self) {
        self.abort();
    }
}
