//! `ContentAddressableStorage`: existence checks, batch reads and writes of small blobs, and
//! directory trees. Large blobs go through ByteStream instead.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message;
use tonic::{Request, Response, Status};

use super::{check_batch_size, parse_digests, Limits};
use crate::digest::{self, Digest};
use crate::error::{ok_rpc_status, Error, Result};
use crate::namespace;
use crate::proto::reapi::{
    self, batch_read_blobs_response, batch_update_blobs_response, compressor,
    content_addressable_storage_server::ContentAddressableStorage, BatchReadBlobsRequest,
    BatchReadBlobsResponse, BatchUpdateBlobsRequest, BatchUpdateBlobsResponse,
    FindMissingBlobsRequest, FindMissingBlobsResponse, GetTreeRequest, GetTreeResponse,
};
use crate::store::Store;

/// Directories per GetTree page when the client does not say.
const DEFAULT_TREE_PAGE: usize = 1000;

pub struct CasService {
    store: Arc<dyn Store>,
    limits: Limits,
}

impl CasService {
    pub fn new(store: Arc<dyn Store>, limits: Limits) -> Self {
        CasService { store, limits }
    }

    async fn update_one(&self, r: reapi::batch_update_blobs_request::Request) -> Result<Digest> {
        let digest = Digest::from_proto(r.digest.as_ref(), "digest")?;
        self.limits.check_blob_size(&digest)?;
        if r.compressor != compressor::Value::Identity as i32 {
            return Err(Error::InvalidArgument(format!(
                "blob {digest}: compressor {} is not supported by this server; send it uncompressed",
                r.compressor
            )));
        }
        self.store.put(&digest, r.data).await?;
        Ok(digest)
    }

    /// Collects one page of the tree under `root`, breadth first, skipping the first `skip`
    /// directories. Returns the page and whether more directories follow.
    async fn tree_page(
        &self,
        root: Digest,
        skip: usize,
        page_size: usize,
    ) -> Result<(Vec<reapi::Directory>, bool)> {
        let mut queue = VecDeque::from([root]);
        let mut seen = HashSet::from([root]);
        let mut index = 0usize;
        let mut page = Vec::new();
        let mut page_bytes = 0u64;
        while let Some(d) = queue.pop_front() {
            let Some(bytes) = self.store.get(&d).await? else {
                if d == root {
                    return Err(Error::NotFound(format!(
                        "root directory {d} is not in the CAS"
                    )));
                }
                // The spec asks for the part of the tree that is present.
                continue;
            };
            let dir = reapi::Directory::decode(bytes.as_ref()).map_err(|e| {
                Error::InvalidArgument(format!("blob {d} in the tree is not a Directory: {e}"))
            })?;
            for child in &dir.directories {
                let c = Digest::from_proto(child.digest.as_ref(), "directory node digest")?;
                if seen.insert(c) {
                    queue.push_back(c);
                }
            }
            if index >= skip {
                if page.len() >= page_size
                    || page_bytes + d.size > self.limits.max_batch_total_size && !page.is_empty()
                {
                    return Ok((page, true));
                }
                page_bytes += d.size;
                page.push(dir);
            }
            index += 1;
        }
        Ok((page, false))
    }
}

type TreeStream = Pin<Box<dyn Stream<Item = Result<GetTreeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        let r = request.into_inner();
        namespace::validate(&r.instance_name)?;
        digest::check_function(r.digest_function)?;
        let digests = parse_digests(&r.blob_digests, "blob_digests")?;
        let missing = self.store.find_missing(&digests).await?;
        // The store answers in request order, so the client's own digest messages can be
        // handed back for the missing ones instead of formatting new ones.
        let mut missing = missing.into_iter().peekable();
        let missing_blob_digests = r
            .blob_digests
            .into_iter()
            .zip(digests)
            .filter(|(_, d)| missing.next_if_eq(d).is_some())
            .map(|(proto, _)| proto)
            .collect();
        Ok(Response::new(FindMissingBlobsResponse {
            missing_blob_digests,
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        let r = request.into_inner();
        namespace::validate(&r.instance_name)?;
        digest::check_function(r.digest_function)?;
        let total = r.requests.iter().map(|b| b.data.len() as u64).sum();
        check_batch_size(total, &self.limits, "BatchUpdateBlobs request")?;
        let results = futures::future::join_all(r.requests.into_iter().map(|b| {
            let echo = b.digest.clone();
            async move {
                let status = match self.update_one(b).await {
                    Ok(_) => ok_rpc_status(),
                    Err(e) => e.to_rpc_status(),
                };
                batch_update_blobs_response::Response {
                    digest: echo,
                    status: Some(status),
                }
            }
        }))
        .await;
        Ok(Response::new(BatchUpdateBlobsResponse {
            responses: results,
        }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        let r = request.into_inner();
        namespace::validate(&r.instance_name)?;
        digest::check_function(r.digest_function)?;
        let digests = parse_digests(&r.digests, "digests")?;
        let total = digests.iter().map(|d| d.size).sum();
        check_batch_size(total, &self.limits, "BatchReadBlobs request")?;
        let mut responses = Vec::with_capacity(digests.len());
        for d in digests {
            let (data, status) = match self.store.get(&d).await {
                Ok(Some(data)) => (data, ok_rpc_status()),
                Ok(None) => (
                    Default::default(),
                    Error::NotFound(format!("blob {d} is not in the CAS")).to_rpc_status(),
                ),
                Err(e) => (Default::default(), e.to_rpc_status()),
            };
            responses.push(batch_read_blobs_response::Response {
                digest: Some(d.to_proto()),
                data,
                compressor: compressor::Value::Identity as i32,
                status: Some(status),
            });
        }
        Ok(Response::new(BatchReadBlobsResponse { responses }))
    }

    // Split and splice are optional; Capabilities does not announce them, so clients never call.
    async fn split_blob(
        &self,
        _request: Request<reapi::SplitBlobRequest>,
    ) -> Result<Response<reapi::SplitBlobResponse>, Status> {
        Err(Status::unimplemented(
            "SplitBlob is not supported by this server (not announced in GetCapabilities)",
        ))
    }

    async fn splice_blob(
        &self,
        _request: Request<reapi::SpliceBlobRequest>,
    ) -> Result<Response<reapi::SpliceBlobResponse>, Status> {
        Err(Status::unimplemented(
            "SpliceBlob is not supported by this server (not announced in GetCapabilities)",
        ))
    }

    type GetTreeStream = TreeStream;

    async fn get_tree(
        &self,
        request: Request<GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        let r = request.into_inner();
        namespace::validate(&r.instance_name)?;
        digest::check_function(r.digest_function)?;
        let root = Digest::from_proto(r.root_digest.as_ref(), "root_digest")?;
        if r.page_size < 0 {
            return Err(
                Error::InvalidArgument(format!("page_size {} is negative", r.page_size)).into(),
            );
        }
        let page_size = match r.page_size {
            0 => DEFAULT_TREE_PAGE,
            n => n as usize,
        };
        let mut skip: usize = if r.page_token.is_empty() {
            0
        } else {
            r.page_token.parse().map_err(|_| {
                Error::InvalidArgument(format!(
                    "page_token {:?} is not one this server issued",
                    r.page_token
                ))
            })?
        };
        // Pages are computed up front, so the stream holds no reference to the service.
        let mut pages = Vec::new();
        loop {
            let (directories, more) = self.tree_page(root, skip, page_size).await?;
            skip += directories.len();
            let next_page_token = if more {
                skip.to_string()
            } else {
                String::new()
            };
            pages.push(Ok(GetTreeResponse {
                directories,
                next_page_token,
            }));
            if !more {
                break;
            }
        }
        Ok(Response::new(Box::pin(futures::stream::iter(pages))))
    }
}
