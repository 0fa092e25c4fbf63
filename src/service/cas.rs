//! `ContentAddressableStorage`: existence checks, batch reads and writes of small blobs, and
//! directory trees. Large blobs go through ByteStream instead.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{check_batch_size, parse_digests, Limits};
use crate::auth::{Access, Caller};
use crate::digest::{self, Digest};
use crate::error::{ok_rpc_status, Error, Result};
use crate::instance_name;
use crate::metrics::Metrics;
use crate::namespace::Policy;
use crate::proto::reapi::{
    self, batch_read_blobs_response, batch_update_blobs_response, compressor,
    content_addressable_storage_server::ContentAddressableStorage, BatchReadBlobsRequest,
    BatchReadBlobsResponse, BatchUpdateBlobsRequest, BatchUpdateBlobsResponse,
    FindMissingBlobsRequest, FindMissingBlobsResponse, GetTreeRequest, GetTreeResponse,
};
use crate::store::Cas;
use crate::telemetry;

/// Directories per GetTree page when the client does not say.
const DEFAULT_TREE_PAGE: usize = 1000;

pub struct CasService {
    store: Arc<dyn Cas>,
    limits: Limits,
    /// Which namespace's write grant an upload needs.
    policy: Arc<Policy>,
    /// FindMissingBlobs digests asked and found, per namespace.
    metrics: Arc<Metrics>,
}

impl CasService {
    pub fn new(
        store: Arc<dyn Cas>,
        limits: Limits,
        policy: Arc<Policy>,
        metrics: Arc<Metrics>,
    ) -> Self {
        CasService {
            store,
            limits,
            policy,
            metrics,
        }
    }

    /// What FindMissingBlobs checks before it parses the digests (shared with
    /// [`super::cas_routes`], which parses them itself).
    pub(crate) fn check_find_missing(
        &self,
        caller: &Caller,
        instance_name: &str,
        digest_function: i32,
    ) -> Result<()> {
        instance_name::validate(instance_name)?;
        telemetry::record_namespace(instance_name);
        caller.require(Access::Read, instance_name)?;
        digest::check_function(digest_function)
    }

    /// The missing ones among `digests`, in request order (as the store answers), counted.
    pub(crate) async fn find_missing(
        &self,
        instance_name: &str,
        digests: &[Digest],
    ) -> Result<Vec<Digest>> {
        let missing = self.store.find_missing(digests).await?;
        self.metrics.cas_lookup(
            instance_name,
            digests.len(),
            digests.len().saturating_sub(missing.len()),
        );
        Ok(missing)
    }

    fn check_one(&self, r: &reapi::batch_update_blobs_request::Request) -> Result<Digest> {
        let digest = Digest::from_proto(r.digest.as_ref(), "digest")?;
        self.limits.check_blob_size(&digest)?;
        if r.compressor != compressor::Value::Identity as i32 {
            return Err(Error::InvalidArgument(format!(
                "blob {digest}: compressor {} is not supported by this server; send it uncompressed",
                r.compressor
            )));
        }
        Ok(digest)
    }
}

/// The items of `asked` (one per digest of `digests`, in the same order) whose digest is in
/// `missing`, a subsequence of `digests` in order (duplicates included), as stores answer.
pub(crate) fn missing_in_order<'a, T>(
    asked: impl IntoIterator<Item = T> + 'a,
    digests: &'a [Digest],
    missing: Vec<Digest>,
) -> impl Iterator<Item = T> + 'a {
    let mut missing = missing.into_iter().peekable();
    asked
        .into_iter()
        .zip(digests.iter())
        .filter(move |(_, d)| missing.next_if_eq(d).is_some())
        .map(|(item, _)| item)
}

type TreeStream = Pin<Box<dyn Stream<Item = Result<GetTreeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        self.check_find_missing(&caller, &r.instance_name, r.digest_function)?;
        let digests = parse_digests(&r.blob_digests, "blob_digests")?;
        let missing = self.find_missing(&r.instance_name, &digests).await?;
        // The client's own digest messages are handed back for the missing ones instead of
        // formatting new ones.
        let missing_blob_digests = missing_in_order(r.blob_digests, &digests, missing).collect();
        Ok(Response::new(FindMissingBlobsResponse {
            missing_blob_digests,
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        instance_name::validate(&r.instance_name)?;
        telemetry::record_namespace(&r.instance_name);
        let target = self.policy.upload_namespace(&r.instance_name);
        caller.require_through(Access::Write, target, &r.instance_name)?;
        digest::check_function(r.digest_function)?;
        let total = r.requests.iter().map(|b| b.data.len() as u64).sum();
        check_batch_size(total, &self.limits, "BatchUpdateBlobs request")?;
        // Each blob is checked alone; the valid ones go to the store as one batch.
        let mut statuses: Vec<Option<Result<()>>> = Vec::with_capacity(r.requests.len());
        let mut echoes = Vec::with_capacity(r.requests.len());
        let mut valid = Vec::with_capacity(r.requests.len());
        for b in r.requests {
            match self.check_one(&b) {
                Ok(digest) => {
                    statuses.push(None);
                    valid.push((digest, b.data));
                }
                Err(e) => statuses.push(Some(Err(e))),
            }
            echoes.push(b.digest);
        }
        let mut stored = self.store.put_many(valid).await.into_iter();
        let responses = echoes
            .into_iter()
            .zip(statuses)
            .map(|(digest, checked)| {
                let result = checked.or_else(|| stored.next()).unwrap_or_else(|| {
                    Err(Error::internal(
                        "BatchUpdateBlobs",
                        "the store left a blob unanswered",
                    ))
                });
                batch_update_blobs_response::Response {
                    digest,
                    status: Some(match result {
                        Ok(()) => ok_rpc_status(),
                        Err(e) => e.to_rpc_status(),
                    }),
                }
            })
            .collect();
        Ok(Response::new(BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        instance_name::validate(&r.instance_name)?;
        telemetry::record_namespace(&r.instance_name);
        caller.require(Access::Read, &r.instance_name)?;
        digest::check_function(r.digest_function)?;
        let digests = parse_digests(&r.digests, "digests")?;
        // Sizes come from the client: add without overflowing.
        let total = digests.iter().fold(0u64, |t, d| t.saturating_add(d.size));
        check_batch_size(total, &self.limits, "BatchReadBlobs request")?;
        let got = self.store.get_many(&digests).await;
        let mut responses = Vec::with_capacity(digests.len());
        for (d, got) in digests.into_iter().zip(got) {
            let (data, status) = match got {
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
        let caller = Caller::of(&request);
        let r = request.into_inner();
        instance_name::validate(&r.instance_name)?;
        telemetry::record_namespace(&r.instance_name);
        caller.require(Access::Read, &r.instance_name)?;
        digest::check_function(r.digest_function)?;
        let root = Digest::from_proto(r.root_digest.as_ref(), "root_digest")?;
        telemetry::record_digest(&root);
        if r.page_size < 0 {
            return Err(
                Error::InvalidArgument(format!("page_size {} is negative", r.page_size)).into(),
            );
        }
        let page_size = match r.page_size {
            0 => DEFAULT_TREE_PAGE,
            n => n as usize,
        };
        let skip: usize = if r.page_token.is_empty() {
            0
        } else {
            r.page_token.parse().map_err(|_| {
                Error::InvalidArgument(format!(
                    "page_token {:?} is not one this server issued",
                    r.page_token
                ))
            })?
        };
        // The root is fetched here so that a missing root is the call's own NOT_FOUND.
        let walk = TreeWalk {
            store: self.store.clone(),
            max_directory: self.limits.max_message_size,
            page_size,
            page_bytes: self.limits.max_batch_total_size,
        };
        let root_dir = walk
            .directory(root)
            .await?
            .ok_or_else(|| Error::NotFound(format!("root directory {root} is not in the CAS")))?;
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            if let Err(e) = walk.run(root, root_dir, skip, &tx).await {
                let _ = tx.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One GetTree call: walks the tree breadth first, once, and streams it page by page through a
/// bounded channel, so neither time nor memory grows with more than the page in hand. A page
/// token is the number of directories before the page; resuming from one walks past them again.
struct TreeWalk {
    store: Arc<dyn Cas>,
    /// Larger directory blobs are refused instead of read whole.
    max_directory: u64,
    /// Directories per page.
    page_size: usize,
    /// Encoded bytes per page, to stay under clients' message limits.
    page_bytes: u64,
}

impl TreeWalk {
    /// A directory blob, decoded; `None` if it is not stored.
    async fn directory(&self, d: Digest) -> Result<Option<reapi::Directory>> {
        if d.size > self.max_directory {
            return Err(Error::InvalidArgument(format!(
                "directory {d} is larger than the {} bytes a message may carry",
                self.max_directory
            )));
        }
        let Some(bytes) = self.store.get(&d).await? else {
            return Ok(None);
        };
        reapi::Directory::decode(bytes.as_ref())
            .map(Some)
            .map_err(|e| {
                Error::InvalidArgument(format!("blob {d} in the tree is not a Directory: {e}"))
            })
    }

    async fn run(
        &self,
        root: Digest,
        root_dir: reapi::Directory,
        skip: usize,
        tx: &mpsc::Sender<Result<GetTreeResponse, Status>>,
    ) -> Result<()> {
        let mut queue = VecDeque::from([(root, Some(root_dir))]);
        let mut seen = HashSet::from([root]);
        let mut index = 0usize;
        let mut page = Vec::new();
        let mut bytes = 0u64;
        while let Some((d, known)) = queue.pop_front() {
            let dir = match known {
                Some(dir) => dir,
                // The spec asks for the part of the tree that is present.
                None => match self.directory(d).await? {
                    Some(dir) => dir,
                    None => continue,
                },
            };
            for child in &dir.directories {
                let c = Digest::from_proto(child.digest.as_ref(), "directory node digest")?;
                if seen.insert(c) {
                    queue.push_back((c, None));
                }
            }
            index += 1;
            if index <= skip {
                continue;
            }
            if !page.is_empty()
                && (page.len() >= self.page_size || bytes + d.size > self.page_bytes)
            {
                let directories = std::mem::take(&mut page);
                let next_page_token = (index - 1).to_string();
                if tx
                    .send(Ok(GetTreeResponse {
                        directories,
                        next_page_token,
                    }))
                    .await
                    .is_err()
                {
                    return Ok(()); // the client went away
                }
                bytes = 0;
            }
            bytes += d.size;
            page.push(dir);
        }
        let _ = tx
            .send(Ok(GetTreeResponse {
                directories: page,
                next_page_token: String::new(),
            }))
            .await;
        Ok(())
    }
}
