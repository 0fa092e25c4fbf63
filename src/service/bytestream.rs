//! `google.bytestream.ByteStream`: streamed reads and writes of blobs of any size, the way Bazel
//! moves most CAS content.
//!
//! Writes are verified before the blob becomes visible. Large uncompressed uploads are persisted
//! as they arrive, so `QueryWriteStatus` can report progress and a new `Write` can resume at that
//! offset. `compressed-blobs/zstd/...` names are decompressed on write and compressed on read
//! ([`crate::compression`]); compressed uploads always start at offset 0.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::Limits;
use crate::auth::{Access, Caller};
use crate::compression::{self, ZstdUpload};
use crate::error::{echo, Error, Result};
use crate::metrics::Metrics;
use crate::namespace::Policy;
use crate::proto::bytestream::{
    byte_stream_server::ByteStream, QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest,
    ReadResponse, WriteRequest, WriteResponse,
};
use crate::resource_name::{Compression, ResourceName};
use crate::store::{BlobStream, Cas, Upload};

pub struct ByteStreamService {
    store: Arc<dyn Cas>,
    limits: Limits,
    /// Which namespace's write grant an upload needs.
    policy: Arc<Policy>,
    /// Counts upload resumes, if set (`with_metrics`).
    metrics: Option<Arc<Metrics>>,
}

/// `committed_size` for a compressed upload of a blob that was already stored, per REAPI.
const COMPRESSED_ALREADY_STORED: i64 = -1;

impl ByteStreamService {
    pub fn new(store: Arc<dyn Cas>, limits: Limits, policy: Arc<Policy>) -> Self {
        ByteStreamService {
            store,
            limits,
            policy,
            metrics: None,
        }
    }

    /// Counts resumed (and refused) uploads in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// A Write at a non-zero offset was resumed (`accepted`) or not.
    fn resume(&self, accepted: bool) {
        if let Some(m) = &self.metrics {
            m.upload_resume(accepted);
        }
    }

    /// The bytes a Read asks for, as the store streams them (compressed for
    /// `compressed-blobs/` names), after the request and the caller's access are checked. Both
    /// ways of serving a Read use it: the tonic handler below, and [`super::bytestream_read`],
    /// which frames the chunks without tonic's encode copy.
    pub(crate) async fn open_read(&self, caller: Caller, r: ReadRequest) -> Result<BlobStream> {
        let name = ResourceName::parse_read(&r.resource_name)?;
        record_name(&name);
        caller.require(Access::Read, &name.instance)?;
        let compressed = check_compression(&name, &r.resource_name)?;
        let digest = name.digest;
        if r.read_offset < 0 || r.read_offset as u64 > digest.size {
            return Err(Error::OutOfRange(format!(
                "read_offset {} is outside blob {digest} (0 to {})",
                r.read_offset, digest.size
            )));
        }
        if r.read_limit < 0 {
            return Err(Error::InvalidArgument(format!(
                "read_limit {} is negative",
                r.read_limit
            )));
        }
        if compressed && r.read_limit != 0 {
            return Err(Error::InvalidArgument(format!(
                "read_limit {} given for compressed read {}; compressed reads take no limit",
                r.read_limit,
                echo(&r.resource_name)
            )));
        }
        let limit = (r.read_limit > 0).then_some(r.read_limit as u64);
        let mut chunks = self
            .store
            .read(
                &digest,
                r.read_offset as u64,
                limit,
                self.limits.read_chunk_size,
            )
            .await?
            .ok_or_else(|| Error::NotFound(format!("blob {digest} is not in the CAS")))?;
        if compressed {
            chunks = compression::compress(chunks)?;
        }
        Ok(chunks)
    }

    /// Whether the blob is stored already. Only a shortcut: a store that cannot say (its
    /// object store is away) is asked to take the upload, which it may (write-behind).
    async fn is_stored(&self, name: &ResourceName) -> bool {
        match self.store.find_missing(&[name.digest]).await {
            Ok(missing) => missing.is_empty(),
            Err(e) => {
                tracing::debug!(digest = %name.digest, error = %e, "cannot tell if stored");
                false
            }
        }
    }

    async fn write_stream(
        &self,
        caller: Caller,
        mut stream: Streaming<WriteRequest>,
    ) -> Result<WriteResponse> {
        // The idle limit covers the first message too: a stream that never sends one would
        // otherwise stay open for as long as its connection lives.
        let first = self.next_message(&mut stream, None).await?.ok_or_else(|| {
            Error::InvalidArgument("Write stream ended before its first message".into())
        })?;
        let resource = first.resource_name.clone();
        let name = ResourceName::parse_write(&resource)?;
        record_name(&name);
        // Before anything of the upload is looked at or kept.
        let target = self.policy.upload_namespace(&name.instance);
        caller.require_through(Access::Write, target, &name.instance)?;
        let compressed = check_compression(&name, &resource)?;
        let digest = name.digest;
        self.limits.check_blob_size(&digest)?;
        // The spec lets us acknowledge a blob we already hold without receiving it.
        if self.is_stored(&name).await {
            let committed_size = if compressed {
                COMPRESSED_ALREADY_STORED
            } else {
                digest.size as i64
            };
            return Ok(WriteResponse { committed_size });
        }
        if first.write_offset < 0 {
            return Err(Error::InvalidArgument(format!(
                "write_offset {} for {} is negative",
                first.write_offset,
                echo(&resource)
            )));
        }
        if compressed && first.write_offset != 0 {
            self.resume(false);
            return Err(Error::InvalidArgument(format!(
                "write_offset {} for {}: compressed uploads cannot be resumed; restart at \
                 offset 0",
                first.write_offset,
                echo(&resource)
            )));
        }
        let upload_id = name.upload_id.as_deref().unwrap_or_default();
        let upload = self
            .store
            .begin_upload(upload_id, &digest, first.write_offset as u64)
            .await;
        // A resume counts once the store takes it up (or turns it down), whatever follows.
        if first.write_offset > 0 {
            self.resume(upload.is_ok());
        }
        let upload = upload?;
        let mut upload: Box<dyn Upload> = if compressed {
            Box::new(ZstdUpload::new(upload, digest.size)?)
        } else {
            upload
        };
        match self
            .receive(&mut *upload, first, &resource, &mut stream)
            .await
        {
            Ok(()) => {
                // Uncompressed: the blob size. Compressed: the compressed bytes received,
                // which is what the write offsets counted.
                let committed_size = if compressed {
                    upload.committed() as i64
                } else {
                    digest.size as i64
                };
                upload.commit().await?;
                Ok(WriteResponse { committed_size })
            }
            Err(e) => {
                // Answer only once what was received is persisted, so a QueryWriteStatus
                // sent on this error sees the offset to resume at.
                upload.stop().await;
                Err(e)
            }
        }
    }

    /// Feeds the stream's data into `upload` until a message with `finish_write`.
    async fn receive(
        &self,
        upload: &mut dyn Upload,
        first: WriteRequest,
        resource: &str,
        stream: &mut Streaming<WriteRequest>,
    ) -> Result<()> {
        let mut msg = first;
        let mut pace = Pace::new(&self.limits, upload.committed());
        loop {
            if !msg.resource_name.is_empty() && msg.resource_name != resource {
                return Err(Error::InvalidArgument(format!(
                    "resource name changed mid-stream from {} to {}",
                    echo(resource),
                    echo(&msg.resource_name)
                )));
            }
            if msg.write_offset != upload.committed() as i64 {
                return Err(Error::InvalidArgument(format!(
                    "write_offset {} for {} does not follow the {} bytes received",
                    msg.write_offset,
                    echo(resource),
                    upload.committed()
                )));
            }
            upload.append(msg.data).await?;
            if msg.finish_write {
                return Ok(());
            }
            pace.check(upload.committed(), resource)?;
            msg = match self
                .next_message(stream, Some((resource, upload.committed())))
                .await?
            {
                Some(m) => m,
                None => {
                    return Err(Error::InvalidArgument(format!(
                        "Write stream for {} ended after {} bytes without finish_write; ask \
                         QueryWriteStatus and resume",
                        echo(resource),
                        upload.committed()
                    )))
                }
            };
        }
    }

    /// The next message of a Write, or ABORTED if none comes within `write_idle_timeout`: a
    /// client that stops sending without closing its stream would otherwise hold the upload
    /// (and a writer thread) until its connection dies.
    async fn next_message(
        &self,
        stream: &mut Streaming<WriteRequest>,
        upload: Option<(&str, u64)>,
    ) -> Result<Option<WriteRequest>> {
        let idle = self.limits.write_idle_timeout;
        match tokio::time::timeout(idle, stream.message()).await {
            Ok(next) => Ok(next?),
            Err(_) => Err(Error::Aborted(match upload {
                Some((resource, received)) => format!(
                    "no data for {} in {idle:?} after {received} bytes; ask QueryWriteStatus \
                     and resume",
                    echo(resource)
                ),
                None => format!("no first message of the Write stream in {idle:?}"),
            })),
        }
    }
}

/// The minimum transfer rate (`limits.min_transfer_rate`), judged over windows of
/// `limits.write_idle_timeout`: the idle timeout alone lets a client that sends one byte per
/// interval hold an upload for ever.
pub(crate) struct Pace {
    window: std::time::Duration,
    /// Bytes a window must move.
    floor: u64,
    started: std::time::Instant,
    at_start: u64,
}

impl Pace {
    pub(crate) fn new(limits: &Limits, moved: u64) -> Self {
        let window = limits.write_idle_timeout;
        Pace {
            window,
            floor: limits
                .min_transfer_rate
                .saturating_mul(window.as_secs().max(1)),
            started: std::time::Instant::now(),
            at_start: moved,
        }
    }

    /// Ends a transfer that moved too little in the window that just closed.
    pub(crate) fn check(&mut self, moved: u64, resource: &str) -> Result<()> {
        if self.started.elapsed() < self.window {
            return Ok(());
        }
        let in_window = moved - self.at_start;
        if in_window < self.floor {
            return Err(Error::Aborted(format!(
                "transfer of {} is too slow: {in_window} bytes in the last {:?}, below \
                 limits.min_transfer_rate ({} bytes per second); resume at offset {moved}",
                echo(resource),
                self.window,
                self.floor / self.window.as_secs().max(1)
            )));
        }
        self.started = std::time::Instant::now();
        self.at_start = moved;
        Ok(())
    }
}

/// Whether the transfer is zstd-compressed; refuses compressors we do not serve.
fn check_compression(name: &ResourceName, resource: &str) -> Result<bool> {
    match name.compression {
        Compression::Identity => Ok(false),
        Compression::Zstd => Ok(true),
        other => Err(Error::InvalidArgument(format!(
            "resource name {} asks for {other:?} compression, which this server does not \
             support; it supports zstd (see GetCapabilities)",
            echo(resource)
        ))),
    }
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let caller = Caller::of(&request);
        let chunks = self.open_read(caller, request.into_inner()).await?;
        let responses = chunks.map(|chunk| match chunk {
            Ok(data) => Ok(ReadResponse { data }),
            Err(e) => Err(Status::from(e)),
        });
        Ok(Response::new(Box::pin(responses)))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        Ok(Response::new(
            self.write_stream(Caller::of(&request), request.into_inner())
                .await?,
        ))
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let caller = Caller::of(&request);
        let resource = request.into_inner().resource_name;
        let name = ResourceName::parse_write(&resource)?;
        record_name(&name);
        // Upload progress is the uploader's business.
        let target = self.policy.upload_namespace(&name.instance);
        caller.require_through(Access::Write, target, &name.instance)?;
        let compressed = check_compression(&name, &resource)?;
        if self.is_stored(&name).await {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size: if compressed {
                    COMPRESSED_ALREADY_STORED
                } else {
                    name.digest.size as i64
                },
                complete: true,
            }));
        }
        let upload_id = name.upload_id.as_deref().unwrap_or_default();
        let progress = if compressed {
            None // compressed uploads are not resumable
        } else {
            self.store.upload_progress(upload_id, &name.digest).await?
        };
        match progress {
            Some(committed) => Ok(Response::new(QueryWriteStatusResponse {
                committed_size: committed as i64,
                complete: false,
            })),
            None => Err(Error::NotFound(format!(
                "no resumable upload in progress for {}; start a Write at offset 0",
                echo(&resource)
            ))
            .into()),
        }
    }
}

/// The instance name and digest a ByteStream call is about, on its span.
fn record_name(name: &ResourceName) {
    crate::telemetry::record_namespace(&name.instance);
    crate::telemetry::record_digest(&name.digest);
}
