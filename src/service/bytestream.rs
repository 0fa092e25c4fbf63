//! `google.bytestream.ByteStream`: streamed reads and writes of blobs of any size, the way Bazel
//! moves most CAS content.
//!
//! Writes are verified before the blob becomes visible. Large uploads are persisted as they
//! arrive, so `QueryWriteStatus` can report progress and a new `Write` can resume at that offset.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::Limits;
use crate::error::{Error, Result};
use crate::proto::bytestream::{
    byte_stream_server::ByteStream, QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest,
    ReadResponse, WriteRequest, WriteResponse,
};
use crate::resource_name::{Compression, ResourceName};
use crate::store::Store;

pub struct ByteStreamService {
    store: Arc<dyn Store>,
    limits: Limits,
}

impl ByteStreamService {
    pub fn new(store: Arc<dyn Store>, limits: Limits) -> Self {
        ByteStreamService { store, limits }
    }

    async fn is_stored(&self, name: &ResourceName) -> Result<bool> {
        Ok(self.store.find_missing(&[name.digest]).await?.is_empty())
    }

    async fn write_stream(&self, mut stream: Streaming<WriteRequest>) -> Result<WriteResponse> {
        let first = stream.message().await?.ok_or_else(|| {
            Error::InvalidArgument("Write stream ended before its first message".into())
        })?;
        let resource = first.resource_name.clone();
        let name = ResourceName::parse_write(&resource)?;
        require_identity(&name, &resource)?;
        let digest = name.digest;
        let done = WriteResponse {
            committed_size: digest.size as i64,
        };
        // The spec lets us acknowledge a blob we already hold without receiving it.
        if self.is_stored(&name).await? {
            return Ok(done);
        }
        if first.write_offset < 0 {
            return Err(Error::InvalidArgument(format!(
                "write_offset {} for {resource:?} is negative",
                first.write_offset
            )));
        }
        let upload_id = name.upload_id.as_deref().unwrap_or_default();
        let mut upload = self
            .store
            .begin_upload(upload_id, &digest, first.write_offset as u64)
            .await?;
        let mut msg = first;
        loop {
            if !msg.resource_name.is_empty() && msg.resource_name != resource {
                return Err(Error::InvalidArgument(format!(
                    "resource name changed mid-stream from {resource:?} to {:?}",
                    msg.resource_name
                )));
            }
            if msg.write_offset != upload.committed() as i64 {
                return Err(Error::InvalidArgument(format!(
                    "write_offset {} for {resource:?} does not follow the {} bytes received",
                    msg.write_offset,
                    upload.committed()
                )));
            }
            upload.append(msg.data).await?;
            if msg.finish_write {
                upload.commit().await?;
                return Ok(done);
            }
            msg = match stream.message().await? {
                Some(m) => m,
                None => {
                    return Err(Error::InvalidArgument(format!(
                        "Write stream for {resource:?} ended after {} bytes without \
                         finish_write; ask QueryWriteStatus and resume",
                        upload.committed()
                    )))
                }
            };
        }
    }
}

/// Compressed transfers are not served yet; say so instead of storing compressed bytes.
fn require_identity(name: &ResourceName, resource: &str) -> Result<()> {
    if name.compression != Compression::Identity {
        return Err(Error::InvalidArgument(format!(
            "resource name {resource:?} asks for {:?} compression, which this server does not \
             support; use blobs/ instead of compressed-blobs/",
            name.compression
        )));
    }
    Ok(())
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let r = request.into_inner();
        let name = ResourceName::parse_read(&r.resource_name)?;
        require_identity(&name, &r.resource_name)?;
        let digest = name.digest;
        if r.read_offset < 0 || r.read_offset as u64 > digest.size {
            return Err(Error::OutOfRange(format!(
                "read_offset {} is outside blob {digest} (0 to {})",
                r.read_offset, digest.size
            ))
            .into());
        }
        if r.read_limit < 0 {
            return Err(
                Error::InvalidArgument(format!("read_limit {} is negative", r.read_limit)).into(),
            );
        }
        let limit = (r.read_limit > 0).then_some(r.read_limit as u64);
        let chunks = self
            .store
            .read(
                &digest,
                r.read_offset as u64,
                limit,
                self.limits.read_chunk_size,
            )
            .await?
            .ok_or_else(|| Error::NotFound(format!("blob {digest} is not in the CAS")))?;
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
            self.write_stream(request.into_inner()).await?,
        ))
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let resource = request.into_inner().resource_name;
        let name = ResourceName::parse_write(&resource)?;
        require_identity(&name, &resource)?;
        if self.is_stored(&name).await? {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size: name.digest.size as i64,
                complete: true,
            }));
        }
        let upload_id = name.upload_id.as_deref().unwrap_or_default();
        match self.store.upload_progress(upload_id, &name.digest).await? {
            Some(committed) => Ok(Response::new(QueryWriteStatusResponse {
                committed_size: committed as i64,
                complete: false,
            })),
            None => Err(Error::NotFound(format!(
                "no upload in progress for {resource:?}; start a Write at offset 0"
            ))
            .into()),
        }
    }
}
