//! The upstream's CAS as the slow tier of the replica's `TieredStore`.
//!
//! Every call first checks that the upstream is reachable (else UNAVAILABLE at once). Reads are
//! ByteStream reads streamed through; a whole read is hashed as it passes and its last chunk is
//! held back unless the bytes match the digest, so a damaged answer never completes a client's
//! read (nor the backfill the tiered store makes of it). Uploads are ByteStream writes under the
//! client's upload id, so a client that resumes through this replica (QueryWriteStatus, then a
//! write from the offset) resumes the upstream's upload. FindMissingBlobs goes out in batches,
//! several at once, and only "present" answers are remembered (briefly).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use super::Upstream;
use crate::digest::{Digest, Verifier};
use crate::error::{Error, Result};
use crate::proto::bytestream::byte_stream_client::ByteStreamClient;
use crate::proto::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest, WriteResponse};
use crate::proto::reapi::batch_update_blobs_request::Request as BatchBlob;
use crate::proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use crate::proto::reapi::{BatchUpdateBlobsRequest, FindMissingBlobsRequest};
use crate::resource_name::ResourceName;
use crate::store::existence::Existence;
use crate::store::{BlobStream, Cas, GcReport, Housekeeping, StoreStats, Upload, VerifyReport};

/// Digests per FindMissingBlobs call upstream (about 80 bytes each: well inside a message),
/// and calls in flight at once.
const FIND_BATCH: usize = 4096;
const PARALLEL_FINDS: usize = 4;
/// How many "present" answers are remembered, and for how long: a blob can be evicted
/// upstream, and a replica may claim it only this long after.
const SEEN_ENTRIES: usize = 1 << 20;
const SEEN_AGE: Duration = Duration::from_secs(60);
/// WriteRequests queued towards the upstream per upload (bounded: a slow link slows the
/// client, it does not fill memory).
const WRITE_QUEUE: usize = 4;

/// The upstream's CAS.
pub struct UpstreamCas {
    upstream: Arc<Upstream>,
    seen: Existence,
}

impl UpstreamCas {
    pub fn new(upstream: Arc<Upstream>) -> Self {
        UpstreamCas {
            upstream,
            seen: Existence::new(SEEN_ENTRIES, SEEN_AGE),
        }
    }

    fn cas(&self) -> ContentAddressableStorageClient<crate::client::Connection> {
        ContentAddressableStorageClient::new(self.upstream.channel())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    fn bytestream(&self) -> ByteStreamClient<crate::client::Connection> {
        ByteStreamClient::new(self.upstream.channel())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    fn blob_name(&self, digest: &Digest) -> String {
        ResourceName::read(self.upstream.cas_instance(), *digest).to_string()
    }

    fn upload_name(&self, upload_id: &str, digest: &Digest) -> String {
        ResourceName::write(self.upstream.cas_instance(), upload_id, *digest).to_string()
    }

    async fn find_batch(&self, digests: Vec<Digest>) -> Result<Vec<Digest>> {
        let request = FindMissingBlobsRequest {
            instance_name: self.upstream.cas_instance().to_string(),
            blob_digests: digests.iter().map(|d| d.to_proto()).collect(),
            digest_function: 0,
        };
        let reply = self
            .cas()
            .find_missing_blobs(self.upstream.request(request))
            .await
            .map_err(|s| self.upstream.failed("FindMissingBlobs", s))?
            .into_inner();
        let missing = crate::service::parse_digests(&reply.missing_blob_digests, "upstream reply")?;
        let absent: std::collections::HashSet<&Digest> = missing.iter().collect();
        for d in &digests {
            if !absent.contains(d) {
                self.seen.insert(*d);
            }
        }
        Ok(missing)
    }

    /// Whole blobs in BatchUpdateBlobs calls within the upstream's batch limit; one result per
    /// blob. Blobs too large for a batch go as single uploads.
    async fn put_batches(&self, blobs: Vec<(Digest, Bytes)>) -> Vec<Result<()>> {
        let limit = self.upstream.batch_limit();
        let mut results: Vec<Option<Result<()>>> = (0..blobs.len()).map(|_| None).collect();
        let mut batch: Vec<(usize, Digest, Bytes)> = Vec::new();
        let mut batch_bytes = 0u64;
        let mut batches = Vec::new();
        for (i, (digest, data)) in blobs.into_iter().enumerate() {
            if digest.size > limit {
                results[i] = Some(self.put_one(&digest, data).await);
                continue;
            }
            if batch_bytes + digest.size > limit && !batch.is_empty() {
                batches.push(std::mem::take(&mut batch));
                batch_bytes = 0;
            }
            batch_bytes += digest.size;
            batch.push((i, digest, data));
        }
        if !batch.is_empty() {
            batches.push(batch);
        }
        for batch in batches {
            let request = BatchUpdateBlobsRequest {
                instance_name: self.upstream.cas_instance().to_string(),
                requests: batch
                    .iter()
                    .map(|(_, d, data)| BatchBlob {
                        digest: Some(d.to_proto()),
                        data: data.clone(),
                        compressor: 0,
                    })
                    .collect(),
                digest_function: 0,
            };
            match self
                .cas()
                .batch_update_blobs(self.upstream.request(request))
                .await
            {
                Ok(reply) => {
                    let answers = reply.into_inner().responses;
                    for (i, d, _) in &batch {
                        let answer = answers
                            .iter()
                            .find(|r| r.digest.as_ref() == Some(&d.to_proto()));
                        results[*i] = Some(match answer.and_then(|r| r.status.as_ref()) {
                            Some(s) if s.code == 0 => {
                                self.seen.insert(*d);
                                Ok(())
                            }
                            Some(s) => Err(Error::Stream(tonic::Status::new(
                                Code::from(s.code),
                                format!(
                                    "upstream {} stored not {d}: {}",
                                    self.upstream.uri, s.message
                                ),
                            ))),
                            None => Err(Error::Unavailable(format!(
                                "upstream {} did not answer for blob {d}",
                                self.upstream.uri
                            ))),
                        });
                    }
                }
                Err(status) => {
                    let e = self.upstream.failed("BatchUpdateBlobs", status);
                    for (i, _, _) in &batch {
                        results[*i] = Some(Err(e.again()));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::internal("batch upload", "no result"))))
            .collect()
    }

    async fn put_one(&self, digest: &Digest, data: Bytes) -> Result<()> {
        let id = uuid::Uuid::new_v4().to_string();
        let mut upload = self.begin_upload(&id, digest, 0).await?;
        upload.append(data).await?;
        upload.commit().await
    }
}

#[async_trait]
impl Cas for UpstreamCas {
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let asked: Vec<Digest> = digests
            .iter()
            .filter(|d| !d.is_empty_blob() && !self.seen.contains(d))
            .copied()
            .collect();
        if asked.is_empty() {
            return Ok(Vec::new());
        }
        self.upstream.check()?;
        let chunks: Vec<Vec<Digest>> = asked.chunks(FIND_BATCH).map(<[Digest]>::to_vec).collect();
        let answers: Vec<Result<Vec<Digest>>> = futures::stream::iter(chunks)
            .map(|chunk| self.find_batch(chunk))
            .buffered(PARALLEL_FINDS)
            .collect()
            .await;
        let mut missing = std::collections::HashSet::new();
        for answer in answers {
            missing.extend(answer?);
        }
        // In request order, as the trait promises.
        Ok(asked.into_iter().filter(|d| missing.contains(d)).collect())
    }

    /// The upstream cannot be asked to keep a blob: this is find-missing only.
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
            return Ok(Some(Box::pin(futures::stream::empty())));
        }
        self.upstream.check()?;
        let request = tonic::Request::new(ReadRequest {
            resource_name: self.blob_name(digest),
            read_offset: offset as i64,
            read_limit: limit.unwrap_or(0) as i64,
        });
        // The deadline covers the answer's start; the body is bounded by progress (below).
        let mut client = self.bytestream();
        let started = tokio::time::timeout(self.upstream.timeout, client.read(request));
        let stream = match started.await {
            Err(_) => {
                let why = format!("no answer to a read within {:?}", self.upstream.timeout);
                self.upstream.mark_down(&why);
                return Err(Error::Unavailable(format!(
                    "upstream {}: {why}",
                    self.upstream.uri
                )));
            }
            Ok(Ok(reply)) => reply.into_inner(),
            Ok(Err(s)) if s.code() == Code::NotFound => return Ok(None),
            Ok(Err(s)) => return Err(self.upstream.failed("Read", s)),
        };
        let whole = offset == 0 && limit.is_none_or(|l| l >= digest.size);
        let mut state = ReadState {
            stream,
            verifier: whole.then(|| Verifier::new(*digest)),
            held: None,
            upstream: self.upstream.clone(),
            chunk_size,
            done: false,
        };
        // The first message says whether the blob is there at all (a streamed reply's error
        // comes with it).
        match state.next_message().await {
            Err(e) if e.code() == Code::NotFound => Ok(None),
            Err(e) => Err(e),
            Ok(first) => {
                state.held = first;
                Ok(Some(Box::pin(futures::stream::unfold(
                    state,
                    |mut s| async move { s.next_chunk().await.map(|item| (item, s)) },
                ))))
            }
        }
    }

    async fn begin_upload(
        &self,
        upload_id: &str,
        digest: &Digest,
        offset: u64,
    ) -> Result<Box<dyn Upload>> {
        self.upstream.check()?;
        let resource = self.upload_name(upload_id, digest);
        let (tx, rx) = mpsc::channel::<WriteRequest>(WRITE_QUEUE);
        let mut client = self.bytestream();
        // No deadline over the whole stream: a large blob takes as long as it takes (each
        // message must get through within the deadline, see `send`).
        let request = tonic::Request::new(ReceiverStream::new(rx));
        let call = tokio::spawn(async move { client.write(request).await.map(|r| r.into_inner()) });
        Ok(Box::new(UpstreamUpload {
            upstream: self.upstream.clone(),
            resource,
            digest: *digest,
            offset,
            tx: Some(tx),
            call: Some(call),
            finished_early: false,
            first: true,
        }))
    }

    async fn upload_progress(&self, upload_id: &str, digest: &Digest) -> Result<Option<u64>> {
        self.upstream.check()?;
        let request = QueryWriteStatusRequest {
            resource_name: self.upload_name(upload_id, digest),
        };
        match self
            .bytestream()
            .query_write_status(self.upstream.request(request))
            .await
        {
            Ok(reply) => Ok(Some(reply.into_inner().committed_size.max(0) as u64)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(self.upstream.failed("QueryWriteStatus", s)),
        }
    }

    async fn put(&self, digest: &Digest, data: Bytes) -> Result<()> {
        let mut results = self.put_many(vec![(*digest, data)]).await;
        results
            .pop()
            .unwrap_or_else(|| Err(Error::internal("upload", "no result")))
    }

    async fn put_many(&self, blobs: Vec<(Digest, Bytes)>) -> Vec<Result<()>> {
        if let Err(e) = self.upstream.check() {
            return blobs.iter().map(|_| Err(e.again())).collect();
        }
        self.put_batches(blobs).await
    }
}

/// A read from the upstream in progress.
struct ReadState {
    stream: tonic::Streaming<crate::proto::bytestream::ReadResponse>,
    /// For a whole read: the bytes so far, checked before the last chunk is handed out.
    verifier: Option<Verifier>,
    /// The message read ahead (the first, or the one held back until the next is seen).
    held: Option<Bytes>,
    upstream: Arc<Upstream>,
    chunk_size: usize,
    done: bool,
}

impl ReadState {
    /// The next message's data; `None` at the end. A silence longer than the deadline is a
    /// failure (the link is gone), not a wait forever.
    async fn next_message(&mut self) -> Result<Option<Bytes>> {
        loop {
            let idle = self.upstream.timeout;
            let next = tokio::time::timeout(idle, self.stream.next())
                .await
                .map_err(|_| {
                    Error::Unavailable(format!(
                        "upstream {} sent nothing for {:?} during a read",
                        self.upstream.uri, idle
                    ))
                })?;
            match next {
                None => return Ok(None),
                Some(Ok(m)) if m.data.is_empty() => continue,
                Some(Ok(m)) => {
                    if let Some(v) = self.verifier.as_mut() {
                        v.update(&m.data).map_err(|e| damaged(&self.upstream, e))?;
                    }
                    return Ok(Some(m.data));
                }
                Some(Err(s)) => return Err(self.upstream.failed("Read", s)),
            }
        }
    }

    /// The next chunk for the client: the held message is handed out once the one after it
    /// is read, and the last only after the whole blob checked out.
    async fn next_chunk(&mut self) -> Option<Result<Bytes>> {
        if self.done {
            return None;
        }
        let Some(mut held) = self.held.take() else {
            self.done = true;
            return self.finish().map(Err);
        };
        // Re-cut to the caller's chunk size.
        if held.len() > self.chunk_size {
            let head = held.split_to(self.chunk_size);
            self.held = Some(held);
            return Some(Ok(head));
        }
        match self.next_message().await {
            Ok(Some(next)) => {
                self.held = Some(next);
                Some(Ok(held))
            }
            Ok(None) => {
                self.done = true;
                match self.finish() {
                    Some(e) => Some(Err(e)),
                    None => Some(Ok(held)),
                }
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }

    /// At the end of a whole read: the error if the bytes were not the blob.
    fn finish(&mut self) -> Option<Error> {
        let v = self.verifier.take()?;
        v.finish().err().map(|e| damaged(&self.upstream, e))
    }
}

fn damaged(upstream: &Upstream, e: Error) -> Error {
    Error::Unavailable(format!(
        "upstream {} sent a blob that does not match its digest: {e}",
        upstream.uri
    ))
}

/// An upload streamed to the upstream as it arrives.
struct UpstreamUpload {
    upstream: Arc<Upstream>,
    resource: String,
    digest: Digest,
    /// Bytes sent so far, including a resumed prefix.
    offset: u64,
    tx: Option<mpsc::Sender<WriteRequest>>,
    call: Option<JoinHandle<std::result::Result<WriteResponse, tonic::Status>>>,
    /// The upstream answered before the end: it already has the blob.
    finished_early: bool,
    first: bool,
}

impl UpstreamUpload {
    fn request(&mut self, data: Bytes, finish: bool) -> WriteRequest {
        let resource_name = match std::mem::replace(&mut self.first, false) {
            true => self.resource.clone(),
            false => String::new(),
        };
        WriteRequest {
            resource_name,
            write_offset: self.offset as i64,
            finish_write: finish,
            data,
        }
    }

    /// The call's outcome, once the request stream is closed or the upstream ended it.
    async fn outcome(&mut self) -> Result<WriteResponse> {
        self.tx = None;
        let Some(mut call) = self.call.take() else {
            return Err(Error::internal("upstream upload", "already finished"));
        };
        // An upstream that is there but stuck must not hold the client's Write forever.
        match tokio::time::timeout(self.upstream.timeout, &mut call).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(status))) => Err(self.upstream.failed("Write", status)),
            Ok(Err(e)) => Err(Error::internal("upstream upload task", e)),
            Err(_) => {
                call.abort();
                Err(Error::Unavailable(format!(
                    "upstream {} did not answer an upload of {} within {:?}",
                    self.upstream.uri, self.digest, self.upstream.timeout
                )))
            }
        }
    }

    /// Sends one message; if the upstream already ended the call, learns why.
    async fn send(&mut self, message: WriteRequest) -> Result<()> {
        let Some(tx) = &self.tx else {
            return Err(Error::internal("upstream upload", "closed"));
        };
        let sent = tokio::time::timeout(self.upstream.timeout, tx.send(message)).await;
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => {
                let reply = self.outcome().await?;
                if reply.committed_size as u64 == self.digest.size {
                    self.finished_early = true;
                    return Ok(());
                }
                Err(Error::Unavailable(format!(
                    "upstream {} ended the upload of {} at {} bytes",
                    self.upstream.uri, self.digest, reply.committed_size
                )))
            }
            Err(_) => Err(Error::Unavailable(format!(
                "upstream {} took no data for {:?} during an upload",
                self.upstream.uri, self.upstream.timeout
            ))),
        }
    }
}

#[async_trait]
impl Upload for UpstreamUpload {
    fn committed(&self) -> u64 {
        self.offset
    }

    async fn append(&mut self, data: Bytes) -> Result<()> {
        if self.finished_early {
            return Ok(());
        }
        let len = data.len() as u64;
        if self.offset + len > self.digest.size {
            return Err(Error::InvalidArgument(format!(
                "blob {} received {} bytes, more than its declared size",
                self.digest,
                self.offset + len
            )));
        }
        let message = self.request(data, false);
        self.send(message).await?;
        self.offset += len;
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        if !self.finished_early {
            let message = self.request(Bytes::new(), true);
            self.send(message).await?;
        }
        if self.finished_early {
            return Ok(());
        }
        let reply = self.outcome().await?;
        if reply.committed_size as u64 != self.digest.size {
            return Err(Error::Unavailable(format!(
                "upstream {} committed {} of the {} bytes of {}",
                self.upstream.uri, reply.committed_size, self.digest.size, self.digest
            )));
        }
        Ok(())
    }

    /// Ends the request stream without finish_write, and waits for the upstream's answer: it
    /// then holds every byte sent, so a QueryWriteStatus through this replica reports them.
    async fn stop(&mut self) {
        self.tx = None;
        if let Some(mut call) = self.call.take() {
            if tokio::time::timeout(self.upstream.timeout, &mut call)
                .await
                .is_err()
            {
                call.abort();
            }
        }
    }
}

impl Drop for UpstreamUpload {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.abort();
        }
    }
}

/// The upstream's CAS has no housekeeping here (the upstream does its own); what this face
/// reports is whether it can be reached.
#[async_trait]
impl Housekeeping for UpstreamCas {
    async fn stats(&self) -> Result<StoreStats> {
        Ok(StoreStats::default())
    }

    async fn gc(&self, _target: Option<u64>) -> Result<GcReport> {
        Ok(GcReport::default())
    }

    async fn verify(&self) -> Result<VerifyReport> {
        Ok(VerifyReport::default())
    }

    async fn maintain(&self) {
        self.upstream.clone().probe().await
    }

    async fn remove_abandoned_uploads(&self, _max_age: Duration) -> Result<usize> {
        Ok(0)
    }

    fn write_refusal(&self) -> Option<String> {
        self.upstream.unavailable()
    }

    fn unavailable(&self) -> Option<String> {
        self.upstream.unavailable()
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}
