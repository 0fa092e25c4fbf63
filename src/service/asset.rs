//! Remote Asset API v1: `Fetch` (FetchBlob, FetchDirectory) and `Push` (PushBlob,
//! PushDirectory), over [`crate::asset::Assets`].
//!
//! A request without URIs is INVALID_ARGUMENT before anything else is looked at: BuildStream
//! probes a server with exactly that at start and takes any other answer as "no Remote Asset
//! service". A fetch that finds nothing, or whose download from origin fails, is answered
//! with that error as the call's own status (NOT_FOUND, ABORTED, ...), not inside an OK reply:
//! Bazel 4.2's remote downloader never reads the reply's `status` and would take the empty
//! digest of a failed reply for the download (BuildStream treats both forms alike). A reply is
//! only ever sent with `status` OK and a digest.

use std::sync::Arc;

use prost_types::Timestamp;
use tonic::{Request, Response, Status};

use crate::asset::{check_uris, Assets, Found, Kind, OriginRequest, Push, Qualifiers};
use crate::auth::{Access, Caller};
use crate::digest::{self, Digest};
use crate::error::{ok_rpc_status, Error, Result};
use crate::instance_name;
use crate::proto::asset::{
    fetch_server::Fetch, push_server::Push as PushApi, FetchBlobRequest, FetchBlobResponse,
    FetchDirectoryRequest, FetchDirectoryResponse, PushBlobRequest, PushBlobResponse,
    PushDirectoryRequest, PushDirectoryResponse, Qualifier,
};
use crate::proto::reapi::{self, digest_function};
use crate::telemetry;

/// `build.bazel.remote.asset.v1.Fetch`.
pub struct FetchService {
    assets: Arc<Assets>,
}

impl FetchService {
    pub fn new(assets: Arc<Assets>) -> Self {
        FetchService { assets }
    }
}

/// `build.bazel.remote.asset.v1.Push`.
pub struct PushService {
    assets: Arc<Assets>,
}

impl PushService {
    pub fn new(assets: Arc<Assets>) -> Self {
        PushService { assets }
    }
}

/// What FetchBlob and FetchDirectory share, checked.
struct FetchArgs {
    instance: String,
    uris: Vec<String>,
    qualifiers: Qualifiers,
    oldest: Option<u64>,
}

impl FetchArgs {
    fn check(
        instance: String,
        uris: Vec<String>,
        qualifiers: Vec<Qualifier>,
        oldest: Option<Timestamp>,
        function: i32,
    ) -> Result<Self> {
        check_uris(&uris)?;
        instance_name::validate(&instance)?;
        telemetry::record_namespace(&instance);
        digest::check_function(function)?;
        let qualifiers = Qualifiers::new(qualifiers.into_iter().map(|q| (q.name, q.value)))?;
        Ok(FetchArgs {
            instance,
            uris,
            qualifiers,
            oldest: oldest.map(|t| t.seconds.max(0) as u64),
        })
    }

    async fn run(&self, assets: &Assets, kind: Kind, caller: &Caller) -> Result<Option<Found>> {
        caller.require(Access::Read, &self.instance)?;
        let found = assets
            .fetch(
                kind,
                &self.instance,
                &self.uris,
                &self.qualifiers,
                self.oldest,
                |ns| caller.may(Access::Read, ns),
            )
            .await?;
        if let Some(found) = &found {
            telemetry::record_digest(&found.digest);
        }
        Ok(found)
    }

    /// The NOT_FOUND of a miss, naming what was looked for.
    fn not_found(&self, assets: &Assets, kind: Kind, caller: &Caller) -> Error {
        Error::NotFound(self.miss(assets, kind, caller))
    }

    /// What a miss looked for, and where (the namespaces the caller may read).
    fn miss(&self, assets: &Assets, kind: Kind, caller: &Caller) -> String {
        let mut chain = assets.results().policy().read_chain(&self.instance);
        chain.retain(|ns| caller.may(Access::Read, ns));
        let chain = chain.join("\", \"");
        let what = match kind {
            Kind::Blob => "blob",
            Kind::Directory => "directory",
        };
        format!(
            "no {what} asset for {} with these {} qualifiers in namespace \"{chain}\"",
            uri_list(&self.uris),
            self.qualifiers.pairs().len()
        )
    }
}

/// The first URIs, for messages.
fn uri_list(uris: &[String]) -> String {
    let mut s = uris
        .iter()
        .take(3)
        .map(|u| format!("{:?}", u.chars().take(200).collect::<String>()))
        .collect::<Vec<_>>()
        .join(", ");
    if uris.len() > 3 {
        s.push_str(&format!(" and {} more URIs", uris.len() - 3));
    }
    s
}

fn qualifiers_of(pairs: Vec<(String, String)>) -> Vec<Qualifier> {
    pairs
        .into_iter()
        .map(|(name, value)| Qualifier { name, value })
        .collect()
}

fn timestamp(unix_secs: u64) -> Timestamp {
    Timestamp {
        seconds: unix_secs.min(i64::MAX as u64) as i64,
        nanos: 0,
    }
}

#[tonic::async_trait]
impl Fetch for FetchService {
    async fn fetch_blob(
        &self,
        request: Request<FetchBlobRequest>,
    ) -> Result<Response<FetchBlobResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        let r_timeout = r.timeout;
        let args = FetchArgs::check(
            r.instance_name,
            r.uris,
            r.qualifiers,
            r.oldest_content_accepted,
            r.digest_function,
        )?;
        let blob = |found: Found| FetchBlobResponse {
            status: Some(ok_rpc_status()),
            uri: found.uri,
            qualifiers: qualifiers_of(found.qualifiers),
            expires_at: Some(timestamp(found.expires_at)),
            blob_digest: Some(found.digest.to_proto()),
            digest_function: digest_function::Value::Sha256 as i32,
        };
        if let Some(found) = args.run(&self.assets, Kind::Blob, &caller).await? {
            return Ok(Response::new(blob(found)));
        }
        if !self.assets.fetches_from_origin() {
            return Err(args.not_found(&self.assets, Kind::Blob, &caller).into());
        }
        // A miss, and fetching from origin is on. Only http(s) URIs of allowed hosts are
        // downloaded; with none (BuildStream's urn: keys, say) the miss stays a miss.
        let fetchable: Vec<String> = args
            .uris
            .iter()
            .filter(|u| self.assets.may_fetch(u))
            .cloned()
            .collect();
        if fetchable.is_empty() {
            let message = args.miss(&self.assets, Kind::Blob, &caller);
            return Err(Error::NotFound(format!(
                "{message}; none of the URIs is an http(s) URL on a host in \
                 asset.fetch.allowed_hosts, so nothing was fetched from origin"
            ))
            .into());
        }
        // Qualifiers a download cannot honour are the request's error; the download is
        // stored, so it needs write access where it goes.
        let origin = OriginRequest::new(&args.qualifiers)?;
        let policy = self.assets.results().policy();
        let target = policy
            .write_target(&args.instance)
            .filter(|t| caller.may(Access::Write, t));
        let Some(target) = target else {
            return Err(Error::PermissionDenied(format!(
                "not in the cache, and fetching from origin stores the download, which needs \
                 write access to the namespace instance {:?} writes to",
                args.instance
            ))
            .into());
        };
        let timeout = r_timeout.and_then(|t| {
            (t.seconds > 0 || t.nanos > 0)
                .then(|| std::time::Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32))
        });
        let fetched = self
            .assets
            .fetch_from_origin(
                target,
                &args.instance,
                caller.name(),
                &fetchable,
                &args.qualifiers,
                &origin,
                timeout,
            )
            .await?;
        match fetched {
            Ok(found) => {
                telemetry::record_digest(&found.digest);
                Ok(Response::new(blob(found)))
            }
            Err((_, failure)) => Err(Status::new(failure.code, failure.message)),
        }
    }

    async fn fetch_directory(
        &self,
        request: Request<FetchDirectoryRequest>,
    ) -> Result<Response<FetchDirectoryResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        let args = FetchArgs::check(
            r.instance_name,
            r.uris,
            r.qualifiers,
            r.oldest_content_accepted,
            r.digest_function,
        )?;
        let reply = match args.run(&self.assets, Kind::Directory, &caller).await? {
            Some(found) => FetchDirectoryResponse {
                status: Some(ok_rpc_status()),
                uri: found.uri,
                qualifiers: qualifiers_of(found.qualifiers),
                expires_at: Some(timestamp(found.expires_at)),
                root_directory_digest: Some(found.digest.to_proto()),
                digest_function: digest_function::Value::Sha256 as i32,
            },
            None => {
                return Err(args
                    .not_found(&self.assets, Kind::Directory, &caller)
                    .into())
            }
        };
        Ok(Response::new(reply))
    }
}

/// What PushBlob and PushDirectory send, before checking.
struct PushArgs {
    instance: String,
    uris: Vec<String>,
    qualifiers: Vec<Qualifier>,
    expire_at: Option<Timestamp>,
    digest: Option<reapi::Digest>,
    references_blobs: Vec<reapi::Digest>,
    references_directories: Vec<reapi::Digest>,
    function: i32,
}

impl PushService {
    async fn push(&self, caller: &Caller, kind: Kind, r: PushArgs) -> Result<()> {
        check_uris(&r.uris)?;
        instance_name::validate(&r.instance)?;
        telemetry::record_namespace(&r.instance);
        digest::check_function(r.function)?;
        let qualifiers = Qualifiers::new(r.qualifiers.into_iter().map(|q| (q.name, q.value)))?;
        let field = match kind {
            Kind::Blob => "blob_digest",
            Kind::Directory => "root_directory_digest",
        };
        let digest = Digest::from_proto(r.digest.as_ref(), field)?;
        telemetry::record_digest(&digest);
        let parse = |list: &[reapi::Digest], what: &str| -> Result<Vec<Digest>> {
            if list.len() > crate::asset::MAX_CONTENT {
                return Err(Error::InvalidArgument(format!(
                    "{what} lists {} digests; at most {} are accepted",
                    list.len(),
                    crate::asset::MAX_CONTENT
                )));
            }
            list.iter()
                .enumerate()
                .map(|(i, d)| Digest::from_proto(Some(d), &format!("{what}[{i}]")))
                .collect()
        };
        let references_blobs = parse(&r.references_blobs, "references_blobs")?;
        let references_directories = parse(&r.references_directories, "references_directories")?;
        // Who may not even read the instance learns nothing about it.
        caller.require(Access::Read, &r.instance)?;
        let policy = self.assets.results().policy();
        let Some(target) = policy.write_target(&r.instance) else {
            return Err(Error::PermissionDenied(format!(
                "instance {:?} is read-only (namespaces config: write = \"none\"); assets cannot \
                 be pushed to it",
                r.instance
            )));
        };
        caller.require_through(Access::Write, target, &r.instance)?;
        // A time at or before the epoch (or a negative one) still means "already expired".
        let expire_at = r.expire_at.map(|t| t.seconds.max(1) as u64);
        self.assets
            .push(
                target,
                Push {
                    kind,
                    digest,
                    uris: &r.uris,
                    qualifiers,
                    expire_at,
                    references_blobs,
                    references_directories,
                    writer: caller.name(),
                    instance: &r.instance,
                },
            )
            .await
    }
}

#[tonic::async_trait]
impl PushApi for PushService {
    async fn push_blob(
        &self,
        request: Request<PushBlobRequest>,
    ) -> Result<Response<PushBlobResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        let args = PushArgs {
            instance: r.instance_name,
            uris: r.uris,
            qualifiers: r.qualifiers,
            expire_at: r.expire_at,
            digest: r.blob_digest,
            references_blobs: r.references_blobs,
            references_directories: r.references_directories,
            function: r.digest_function,
        };
        self.push(&caller, Kind::Blob, args).await?;
        Ok(Response::new(PushBlobResponse {}))
    }

    async fn push_directory(
        &self,
        request: Request<PushDirectoryRequest>,
    ) -> Result<Response<PushDirectoryResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        let args = PushArgs {
            instance: r.instance_name,
            uris: r.uris,
            qualifiers: r.qualifiers,
            expire_at: r.expire_at,
            digest: r.root_directory_digest,
            references_blobs: r.references_blobs,
            references_directories: r.references_directories,
            function: r.digest_function,
        };
        self.push(&caller, Kind::Directory, args).await?;
        Ok(Response::new(PushDirectoryResponse {}))
    }
}
