//! The registry's HTTP side on `oci_listen` (HTTP/1.1 and h2, TLS with `[tls]`): routing of
//! the Distribution API's paths, credentials (`[auth]` tokens as Basic passwords or bearer
//! tokens, mapped to grants on the repository's namespace), and the spec's error format
//! (`{"errors":[{"code","message","detail"}]}`).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ::http::{header, HeaderValue, Method, Request, Response, StatusCode};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::net::TcpListener;

use super::{
    digest_text, is_tag, manifest, parse_digest, validate_name, OciError, OciResult, Registry,
    StoredManifest,
};
use crate::auth::{Access, Caller};
use crate::connections::Peer;
use crate::digest::Digest;
use crate::error::{Error, Result};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

const CHUNK: usize = 1 << 20;

/// Serves the registry on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    handshake_timeout: Duration,
    tls: Option<Arc<crate::tls::Tls>>,
    max_blob: u64,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    use tonic::transport::server::Connected;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::internal("reading the OCI port's address", e))?;
    tracing::info!(oci_listen = %addr, "OCI registry front is serving /v2/");
    let incoming = crate::connections::incoming(listener, handshake_timeout, tls);
    tokio::pin!(incoming);
    tokio::pin!(shutdown);
    loop {
        let connection = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            next = incoming.next() => match next {
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "OCI port: a connection failed before serving");
                    continue;
                }
                None => return Ok(()),
            },
        };
        let peer = connection.connect_info();
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let registry = registry.clone();
                let peer = peer.clone();
                async move { Ok::<_, Infallible>(handle(&registry, &peer, request, max_blob).await) }
            });
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(hyper_util::rt::TokioIo::new(connection), service)
                .await
            {
                tracing::debug!(error = %e, "OCI connection ended with an error");
            }
        });
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn empty() -> Body {
    full(Bytes::new())
}

/// One request, answered; refusals in the spec's JSON.
async fn handle(
    registry: &Registry,
    peer: &Peer,
    request: Request<hyper::body::Incoming>,
    max_blob: u64,
) -> Response<Body> {
    let head = request.method() == Method::HEAD;
    let operation = operation(request.method(), request.uri().path());
    let mut response = match route(registry, peer, request, max_blob).await {
        Ok(r) => r,
        Err(e) => refusal(e, head),
    };
    registry
        .metrics
        .oci_request(operation, response.status().as_u16());
    response.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    response
}

fn refusal(e: OciError, head: bool) -> Response<Body> {
    let text = serde_json::json!({"errors": [{"code": e.code, "message": e.message}]}).to_string();
    let length = text.len();
    let mut response = Response::new(if head { empty() } else { full(text) });
    *response.status_mut() = e.status;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    if e.status == StatusCode::UNAUTHORIZED {
        h.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"hoard\""),
        );
    }
    response
}

fn unauthorized(message: impl Into<String>) -> OciError {
    OciError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message)
}

/// The `operation` label of a request (a fixed set, whatever the path).
pub fn operation(method: &Method, path: &str) -> &'static str {
    match (target(path), method) {
        (Some(Target::Base), _) => "base",
        (Some(Target::Blob(..)), &Method::HEAD) => "blob_head",
        (Some(Target::Blob(..)), &Method::GET) => "blob_get",
        (Some(Target::Uploads(..)), &Method::POST) => "upload_start",
        (Some(Target::Upload(..)), &Method::PATCH) => "upload_chunk",
        (Some(Target::Upload(..)), &Method::PUT) => "upload_finish",
        (Some(Target::Upload(..)), &Method::GET) => "upload_status",
        (Some(Target::Upload(..)), &Method::DELETE) => "upload_cancel",
        (Some(Target::Manifest(..)), &Method::GET) => "manifest_get",
        (Some(Target::Manifest(..)), &Method::HEAD) => "manifest_head",
        (Some(Target::Manifest(..)), &Method::PUT) => "manifest_put",
        (Some(Target::Manifest(..)), &Method::DELETE) => "manifest_delete",
        (Some(Target::Tags(..)), _) => "tags_list",
        _ => "other",
    }
}

/// What a request's path names.
enum Target<'a> {
    Base,
    Blob(&'a str, &'a str),
    Uploads(&'a str),
    Upload(&'a str, &'a str),
    Manifest(&'a str, &'a str),
    Tags(&'a str),
}

fn target(path: &str) -> Option<Target<'_>> {
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some(Target::Base);
    }
    let rest = rest.strip_prefix('/')?;
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(Target::Tags(name));
    }
    if let Some(name) = rest
        .strip_suffix("/blobs/uploads/")
        .or_else(|| rest.strip_suffix("/blobs/uploads"))
    {
        return Some(Target::Uploads(name));
    }
    if let Some((name, id)) = rest.rsplit_once("/blobs/uploads/") {
        return Some(Target::Upload(name, id));
    }
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        return Some(Target::Manifest(name, reference));
    }
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        return Some(Target::Blob(name, digest));
    }
    None
}

/// The query's parameters, percent-decoded.
fn query(request: &Request<hyper::body::Incoming>) -> Vec<(String, String)> {
    let query = request.uri().query().unwrap_or("");
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The caller behind the request's credentials: an `[auth]` token as a Basic password (any
/// user name) or a bearer token.
fn caller(
    registry: &Registry,
    request: &Request<hyper::body::Incoming>,
    peer: &Peer,
) -> OciResult<Caller> {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    registry
        .auth
        .authenticate(authorization, Some(peer))
        .map_err(|e| unauthorized(e.to_string()))
}

/// `access` on repository `name`'s namespace; a refused anonymous caller is asked for
/// credentials (401 with a challenge), since most clients send them only then.
fn require(registry: &Registry, caller: &Caller, access: Access, name: &str) -> OciResult<()> {
    let namespace = registry.namespace(name);
    match caller.require(access, &namespace) {
        Ok(()) => Ok(()),
        Err(e) if caller.name() == crate::auth::ANONYMOUS && registry.auth.enabled() => Err(
            unauthorized(format!("{e}; log in with a token this server knows")),
        ),
        Err(e) => Err(e.into()),
    }
}

async fn route(
    registry: &Registry,
    peer: &Peer,
    request: Request<hyper::body::Incoming>,
    max_blob: u64,
) -> OciResult<Response<Body>> {
    let path = request.uri().path().to_string();
    let Some(target) = target(&path) else {
        return Err(OciError::new(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            format!(
                "{} is not a path of the OCI Distribution API",
                crate::error::echo(&path)
            ),
        ));
    };
    let method = request.method().clone();
    if let Target::Base = target {
        // skopeo and buildah decide from this answer whether to send credentials at all.
        if registry.auth.enabled() && !request.headers().contains_key(header::AUTHORIZATION) {
            return Err(unauthorized(
                "credentials are needed: a token this server knows, as the password",
            ));
        }
        caller(registry, &request, peer)?;
        return Ok(json(StatusCode::OK, "{}"));
    }
    let caller = caller(registry, &request, peer)?;
    let name = match &target {
        Target::Blob(n, _)
        | Target::Uploads(n)
        | Target::Upload(n, _)
        | Target::Manifest(n, _)
        | Target::Tags(n) => *n,
        Target::Base => "",
    };
    validate_name(name)?;
    registry.check_namespace(name)?;
    if let Target::Manifest(_, reference) = &target {
        check_reference(reference)?;
    }
    let params = query(&request);
    match (target, method) {
        (Target::Blob(name, digest), Method::GET | Method::HEAD) => {
            require(registry, &caller, Access::Read, name)?;
            get_blob(registry, digest, request).await
        }
        (Target::Blob(..), Method::DELETE) => Err(OciError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "blobs are shared content-addressed storage here: they go by eviction, not by DELETE",
        )),
        (Target::Uploads(name), Method::POST) => {
            require(registry, &caller, Access::Write, name)?;
            registry.check_writable(name)?;
            start_upload(registry, &caller, name, &params, request, max_blob).await
        }
        (Target::Upload(name, id), Method::PATCH) => {
            require(registry, &caller, Access::Write, name)?;
            patch_upload(registry, name, id, request, max_blob).await
        }
        (Target::Upload(name, id), Method::PUT) => {
            require(registry, &caller, Access::Write, name)?;
            let Some(digest) = param(&params, "digest").map(str::to_string) else {
                return Err(OciError::new(
                    StatusCode::BAD_REQUEST,
                    "DIGEST_INVALID",
                    "closing an upload needs ?digest=sha256:...",
                ));
            };
            finish_upload(registry, name, id, &digest, request, max_blob).await
        }
        (Target::Upload(name, id), Method::GET) => {
            require(registry, &caller, Access::Write, name)?;
            let session = registry.uploads.open(name, id).await?;
            Ok(upload_state(
                name,
                id,
                session.written,
                StatusCode::NO_CONTENT,
            ))
        }
        (Target::Upload(name, id), Method::DELETE) => {
            require(registry, &caller, Access::Write, name)?;
            registry.uploads.get(name, id)?;
            registry.uploads.remove(id).await;
            Ok(status(StatusCode::NO_CONTENT))
        }
        (Target::Manifest(name, reference), Method::GET | Method::HEAD) => {
            require(registry, &caller, Access::Read, name)?;
            let head = request.method() == Method::HEAD;
            let found = get_manifest(registry, &caller, name, reference, head).await;
            match &found {
                Ok(_) => registry
                    .metrics
                    .oci_manifest_lookup(&registry.namespace(name), true),
                Err(e) if e.status == StatusCode::NOT_FOUND => registry
                    .metrics
                    .oci_manifest_lookup(&registry.namespace(name), false),
                Err(_) => {}
            }
            found
        }
        (Target::Manifest(name, reference), Method::PUT) => {
            require(registry, &caller, Access::Write, name)?;
            registry.check_writable(name)?;
            put_manifest(registry, name, reference, request).await
        }
        (Target::Manifest(name, reference), Method::DELETE) => {
            require(registry, &caller, Access::Write, name)?;
            registry.check_writable(name)?;
            delete_manifest(registry, name, reference).await
        }
        (Target::Tags(name), Method::GET) => {
            require(registry, &caller, Access::Read, name)?;
            list_tags(registry, name, &params).await
        }
        (_, method) => Err(OciError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            format!("{method} is not allowed on {}", crate::error::echo(&path)),
        )),
    }
}

fn status(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(empty());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    response
}

fn json(code: StatusCode, text: impl Into<String>) -> Response<Body> {
    let text = text.into();
    let mut response = Response::new(full(text.clone()));
    *response.status_mut() = code;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(text.len()));
    response
}

fn set(response: &mut Response<Body>, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, v);
    }
}

/// `bytes=START-END`, `bytes=START-` or `bytes=-SUFFIX` of a blob of `size` bytes →
/// (offset, length); `None` for a range this server does not take (the whole blob is sent).
fn byte_range(value: &str, size: u64) -> std::result::Result<Option<(u64, u64)>, ()> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None); // several ranges: the whole blob, as RFC 9110 allows
    }
    let (start, end) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (start.trim(), end.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size.saturating_sub(1))
        }
        (s, "") => (s.parse().map_err(|_| ())?, size.saturating_sub(1)),
        (s, e) => {
            let (s, e): (u64, u64) = (s.parse().map_err(|_| ())?, e.parse().map_err(|_| ())?);
            (s, e.min(size.saturating_sub(1)))
        }
    };
    if start >= size || end < start {
        return Err(());
    }
    Ok(Some((start, end - start + 1)))
}

async fn get_blob(
    registry: &Registry,
    digest_param: &str,
    request: Request<hyper::body::Incoming>,
) -> OciResult<Response<Body>> {
    let hash = parse_digest(digest_param)?;
    let unknown = || {
        OciError::new(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            format!("blob {} is not stored", crate::error::echo(digest_param)),
        )
    };
    let digest = registry.blob(&hash).await?.ok_or_else(unknown)?;
    let head = request.method() == Method::HEAD;
    let range = match request
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
    {
        Some(value) => match byte_range(value, digest.size) {
            Ok(r) => r,
            Err(()) => {
                let mut r = refusal(
                    OciError::new(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        "RANGE_INVALID",
                        format!(
                            "range {value:?} is outside the blob's {} bytes",
                            digest.size
                        ),
                    ),
                    head,
                );
                set(&mut r, "content-range", &format!("bytes */{}", digest.size));
                return Ok(r);
            }
        },
        None => None,
    };
    let (offset, length) = range.unwrap_or((0, digest.size));
    if !head {
        registry.metrics.oci_bytes(0, length);
    }
    let body = if head {
        empty()
    } else {
        let Some(stream) = registry
            .cas
            .read(&digest, offset, Some(length), CHUNK)
            .await?
        else {
            return Err(unknown());
        };
        let frames = stream.map(|chunk| {
            chunk
                .map(hyper::body::Frame::data)
                .map_err(std::io::Error::other)
        });
        BodyExt::boxed_unsync(StreamBody::new(frames))
    };
    let mut response = Response::new(body);
    if range.is_some() {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        set(
            &mut response,
            "content-range",
            &format!("bytes {}-{}/{}", offset, offset + length - 1, digest.size),
        );
    }
    let h = response.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    set(
        &mut response,
        "docker-content-digest",
        &digest_text(&digest.hash),
    );
    Ok(response)
}

fn upload_state(name: &str, id: &str, written: u64, code: StatusCode) -> Response<Body> {
    let mut response = status(code);
    upload_headers(&mut response, name, id, written);
    response
}

/// Where an upload stands: its Location, id and the bytes it holds ("0-0" for nothing yet, as
/// distribution answers).
fn upload_headers(response: &mut Response<Body>, name: &str, id: &str, written: u64) {
    set(
        response,
        "location",
        &format!("/v2/{name}/blobs/uploads/{id}"),
    );
    set(response, "docker-upload-uuid", id);
    set(
        response,
        "range",
        &format!("0-{}", written.saturating_sub(1)),
    );
}

fn blob_created(name: &str, digest: &Digest) -> Response<Body> {
    let mut response = status(StatusCode::CREATED);
    let text = digest_text(&digest.hash);
    set(
        &mut response,
        "location",
        &format!("/v2/{name}/blobs/{text}"),
    );
    set(&mut response, "docker-content-digest", &text);
    response
}

async fn start_upload(
    registry: &Registry,
    caller: &Caller,
    name: &str,
    params: &[(String, String)],
    request: Request<hyper::body::Incoming>,
    max_blob: u64,
) -> OciResult<Response<Body>> {
    // A cross-repository mount: the blob is already here (one CAS for every repository), if
    // the caller may read where it says it comes from. Otherwise a plain upload starts (202).
    if let Some(mount) = param(params, "mount") {
        let hash = parse_digest(mount)?;
        let from_readable = match param(params, "from") {
            Some(from) => {
                validate_name(from).is_ok() && caller.may(Access::Read, &registry.namespace(from))
            }
            None => true,
        };
        if from_readable {
            if let Some(digest) = registry.blob(&hash).await? {
                return Ok(blob_created(name, &digest));
            }
        }
    }
    let id = registry.uploads.start(name).await?;
    let mut session = registry.uploads.open(name, &id).await?;
    let outcome = async {
        let added = session.append(request.into_body(), max_blob).await?;
        registry.metrics.oci_bytes(added, 0);
        match param(params, "digest") {
            // Monolithic: the whole blob in the POST.
            Some(digest) => {
                let hash = parse_digest(digest)?;
                let stored = session.finish(hash, registry.cas.as_ref(), &id).await?;
                registry.remember_size(&stored).await?;
                Ok(Some(stored))
            }
            None => Ok(None),
        }
    }
    .await;
    match outcome {
        Ok(Some(stored)) => {
            drop(session);
            registry.uploads.remove(&id).await;
            Ok(blob_created(name, &stored))
        }
        Ok(None) => Ok(upload_state(
            name,
            &id,
            session.written,
            StatusCode::ACCEPTED,
        )),
        Err(e) => {
            drop(session);
            registry.uploads.remove(&id).await;
            Err(e)
        }
    }
}

/// Checks a chunk's `Content-Range: START-END` against what the session holds; out of order
/// is 416 (the client asks for the upload's state and goes on from there).
fn check_chunk(request: &Request<hyper::body::Incoming>, written: u64) -> OciResult<()> {
    let Some(value) = request.headers().get(header::CONTENT_RANGE) else {
        return Ok(());
    };
    let text = value.to_str().unwrap_or("");
    let bad = |why: String| {
        OciError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "BLOB_UPLOAD_INVALID",
            why,
        )
    };
    let spec = text.trim().strip_prefix("bytes ").unwrap_or(text.trim());
    let spec = spec.split('/').next().unwrap_or("");
    let parsed = spec
        .split_once('-')
        .and_then(|(s, e)| Some((s.trim().parse::<u64>().ok()?, e.trim().parse::<u64>().ok()?)));
    let Some((start, end)) = parsed.filter(|(s, e)| e >= s) else {
        return Err(bad(format!(
            "Content-Range {} is not START-END",
            crate::error::echo(text)
        )));
    };
    if start != written {
        return Err(bad(format!(
            "the chunk starts at byte {start}, but the upload holds {written} bytes: send from {written}"
        )));
    }
    let length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let span = (end - start).checked_add(1);
    if let (Some(length), Some(span)) = (length, span) {
        if length != span {
            return Err(OciError::new(
                StatusCode::BAD_REQUEST,
                "BLOB_UPLOAD_INVALID",
                format!(
                    "Content-Range {start}-{end} is {span} bytes, but Content-Length is {length}"
                ),
            ));
        }
    }
    Ok(())
}

async fn patch_upload(
    registry: &Registry,
    name: &str,
    id: &str,
    request: Request<hyper::body::Incoming>,
    max_blob: u64,
) -> OciResult<Response<Body>> {
    let mut session = registry.uploads.open(name, id).await?;
    if let Err(e) = check_chunk(&request, session.written) {
        let mut r = refusal(e, false);
        upload_headers(&mut r, name, id, session.written);
        return Ok(r);
    }
    let added = match session.append(request.into_body(), max_blob).await {
        Ok(added) => added,
        Err(e) => {
            // A failed or stalled chunk ends the upload (its bytes may be half in the spool).
            drop(session);
            registry.uploads.remove(id).await;
            return Err(e);
        }
    };
    registry.metrics.oci_bytes(added, 0);
    Ok(upload_state(
        name,
        id,
        session.written,
        StatusCode::ACCEPTED,
    ))
}

async fn finish_upload(
    registry: &Registry,
    name: &str,
    id: &str,
    digest: &str,
    request: Request<hyper::body::Incoming>,
    max_blob: u64,
) -> OciResult<Response<Body>> {
    let mut session = registry.uploads.open(name, id).await?;
    // A bad ?digest= or an out-of-order range leaves the upload as it was, to go on with.
    let hash = parse_digest(digest)?;
    check_chunk(&request, session.written)?;
    let outcome = async {
        let added = session.append(request.into_body(), max_blob).await?;
        registry.metrics.oci_bytes(added, 0);
        let stored = session.finish(hash, registry.cas.as_ref(), id).await?;
        registry.remember_size(&stored).await?;
        Ok(stored)
    }
    .await;
    drop(session);
    registry.uploads.remove(id).await;
    outcome.map(|stored| blob_created(name, &stored))
}

/// A manifest reference: a tag or a sha256 digest.
fn check_reference(reference: &str) -> OciResult<()> {
    if reference.contains(':') {
        parse_digest(reference).map(drop)
    } else if is_tag(reference) {
        Ok(())
    } else {
        Err(OciError::new(
            StatusCode::BAD_REQUEST,
            "MANIFEST_INVALID",
            format!(
                "{} is neither a tag ([a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}) nor a digest",
                crate::error::echo(reference)
            ),
        ))
    }
}

fn manifest_unknown(name: &str, reference: &str) -> OciError {
    OciError::new(
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
        format!(
            "repository {name:?} has no manifest {}",
            crate::error::echo(reference)
        ),
    )
}

/// The manifest digest `reference` (a tag or a digest) names in `repository`.
fn resolve<'r>(
    repository: &'r super::Repository,
    name: &str,
    reference: &str,
) -> OciResult<(String, &'r StoredManifest)> {
    let digest = if reference.contains(':') {
        parse_digest(reference)?;
        reference.to_string()
    } else if is_tag(reference) {
        repository
            .tags
            .get(reference)
            .cloned()
            .ok_or_else(|| manifest_unknown(name, reference))?
    } else {
        return Err(check_reference(reference)
            .err()
            .unwrap_or_else(|| manifest_unknown(name, reference)));
    };
    let stored = repository
        .manifests
        .get(&digest)
        .ok_or_else(|| manifest_unknown(name, reference))?;
    Ok((digest, stored))
}

/// The manifest `reference` names, looked up along the repository's read chain: the repository
/// itself, then the repositories its namespace rule's `read` list names (those the caller may
/// read), so a branch's cache falls back to main's for a client that imports one cache only.
async fn find_manifest(
    registry: &Registry,
    caller: &Caller,
    name: &str,
    reference: &str,
) -> OciResult<(String, StoredManifest, Vec<(String, u64)>)> {
    let namespace = registry.namespace(name);
    let chain: Vec<String> = registry
        .results
        .policy()
        .read_chain(&namespace)
        .into_iter()
        .map(str::to_string)
        .collect();
    for ns in &chain {
        let Some(repository_name) = registry.repository_of(ns) else {
            continue;
        };
        if *ns != namespace
            && (validate_name(repository_name).is_err() || !caller.may(Access::Read, ns))
        {
            continue;
        }
        let Some(repository) = registry.repository(repository_name).await? else {
            continue;
        };
        match resolve(&repository, repository_name, reference) {
            Ok((digest, stored)) => {
                // Nested manifests' content too: an index is a hit only if every image in it is.
                let content = repository.content_of(&stored.refs);
                return Ok((digest, stored.clone(), content));
            }
            Err(e) if e.status == StatusCode::NOT_FOUND => continue,
            Err(e) => return Err(e),
        }
    }
    Err(manifest_unknown(name, reference))
}

async fn get_manifest(
    registry: &Registry,
    caller: &Caller,
    name: &str,
    reference: &str,
    head: bool,
) -> OciResult<Response<Body>> {
    let (digest_text_, stored, content) = find_manifest(registry, caller, name, reference).await?;
    let stored = &stored;
    let digest = Digest {
        hash: parse_digest(&digest_text_)?,
        size: stored.size,
    };
    let bytes = registry
        .cas
        .get(&digest)
        .await?
        .ok_or_else(|| manifest_unknown(name, reference))?;
    // What a pulled manifest references counts as used, like a FindMissingBlobs hit.
    let refs: Vec<Digest> = content
        .iter()
        .filter_map(|(d, size)| {
            Some(Digest {
                hash: parse_digest(d).ok()?,
                size: *size,
            })
        })
        .collect();
    // A manifest whose content was evicted is a miss, never a hit a client cannot pull (as an
    // action result whose outputs are gone).
    if let Some(gone) = registry.cas.find_missing(&refs).await?.first() {
        return Err(OciError::new(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            format!(
                "manifest {} of repository {name:?} references {}, which was evicted; push it again",
                crate::error::echo(reference),
                digest_text(&gone.hash)
            ),
        ));
    }
    if !head {
        registry.metrics.oci_bytes(0, bytes.len() as u64);
    }
    let mut response = Response::new(if head { empty() } else { full(bytes) });
    set(&mut response, "content-type", &stored.media_type);
    set(&mut response, "docker-content-digest", &digest_text_);
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(stored.size));
    Ok(response)
}

async fn put_manifest(
    registry: &Registry,
    name: &str,
    reference: &str,
    request: Request<hyper::body::Incoming>,
) -> OciResult<Response<Body>> {
    check_reference(reference)?;
    let media_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
        .unwrap_or_default();
    let bytes = http_body_util::Limited::new(request.into_body(), super::MAX_MANIFEST)
        .collect()
        .await
        .map_err(
            |e| match e.downcast_ref::<http_body_util::LengthLimitError>() {
                Some(_) => OciError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "MANIFEST_INVALID",
                    format!(
                        "the manifest is larger than {} MiB",
                        super::MAX_MANIFEST >> 20
                    ),
                ),
                None => OciError::new(
                    StatusCode::BAD_REQUEST,
                    "MANIFEST_INVALID",
                    format!("reading the manifest: {e}"),
                ),
            },
        )?
        .to_bytes();
    registry.metrics.oci_bytes(bytes.len() as u64, 0);
    // No Content-Type, or plain JSON: the body's own mediaType says, as distribution reads it.
    let media_type = match media_type.as_str() {
        "" | "application/json" => manifest::declared_type(&bytes).unwrap_or(media_type),
        _ => media_type,
    };
    let refs = manifest::references(&media_type, &bytes)?;
    let missing = registry.cas.find_missing(&refs).await?;
    if let Some(first) = missing.first() {
        return Err(OciError::new(
            StatusCode::BAD_REQUEST,
            "MANIFEST_BLOB_UNKNOWN",
            format!(
                "the manifest references {} ({} bytes), which is not stored{}: push it first",
                digest_text(&first.hash),
                first.size,
                match missing.len() {
                    1 => String::new(),
                    n => format!(", nor {} more", n - 1),
                }
            ),
        ));
    }
    let digest = Digest::of(&bytes);
    let text = digest_text(&digest.hash);
    if reference.contains(':') && parse_digest(reference)? != digest.hash {
        return Err(OciError::new(
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
            format!("the manifest's digest is {text}, not {reference}"),
        ));
    }
    {
        let _lock = registry.lock(name).lock().await;
        let mut repository = registry.repository(name).await?.unwrap_or_default();
        if manifest::is_index(&media_type) {
            for child in manifest::child_manifests(&bytes) {
                if !repository.manifests.contains_key(&child) {
                    return Err(OciError::new(
                        StatusCode::BAD_REQUEST,
                        "MANIFEST_BLOB_UNKNOWN",
                        format!(
                            "the index names manifest {child}, which repository {name:?} does not hold: push it here first"
                        ),
                    ));
                }
            }
        }
        // Checked before anything is stored: a refused manifest stores nothing.
        registry.cas.put(&digest, bytes).await?;
        registry.remember_size(&digest).await?;
        repository.mark_live(registry.results.clock());
        repository.manifests.insert(
            text.clone(),
            StoredManifest {
                media_type,
                size: digest.size,
                refs: refs
                    .iter()
                    .map(|d| (digest_text(&d.hash), d.size))
                    .collect(),
                live_at: registry.results.clock(),
            },
        );
        if is_tag(reference) {
            repository.tags.insert(reference.to_string(), text.clone());
        }
        registry.save(name, &mut repository).await?;
    }
    let mut response = status(StatusCode::CREATED);
    set(
        &mut response,
        "location",
        &format!("/v2/{name}/manifests/{text}"),
    );
    set(&mut response, "docker-content-digest", &text);
    Ok(response)
}

async fn delete_manifest(
    registry: &Registry,
    name: &str,
    reference: &str,
) -> OciResult<Response<Body>> {
    let _lock = registry.lock(name).lock().await;
    let mut repository = registry
        .repository(name)
        .await?
        .ok_or_else(|| manifest_unknown(name, reference))?;
    repository.mark_live(registry.results.clock());
    if reference.contains(':') {
        parse_digest(reference)?;
        if repository.manifests.remove(reference).is_none() {
            return Err(manifest_unknown(name, reference));
        }
        repository.tags.retain(|_, d| d != reference);
    } else if repository.tags.remove(reference).is_none() {
        return Err(manifest_unknown(name, reference));
    }
    registry.save(name, &mut repository).await?;
    Ok(status(StatusCode::ACCEPTED))
}

async fn list_tags(
    registry: &Registry,
    name: &str,
    params: &[(String, String)],
) -> OciResult<Response<Body>> {
    let repository = registry
        .repository(name)
        .await?
        .ok_or_else(|| OciError::name_unknown(name))?;
    let n = match param(params, "n") {
        Some(n) => Some(n.parse::<usize>().map_err(|_| {
            OciError::new(
                StatusCode::BAD_REQUEST,
                "PAGINATION_NUMBER_INVALID",
                format!("n={} is not a number", crate::error::echo(n)),
            )
        })?),
        None => None,
    };
    let last = param(params, "last");
    let after: Vec<&String> = repository
        .tags
        .keys()
        .filter(|t| last.is_none_or(|l| t.as_str() > l))
        .collect();
    let page: Vec<&String> = after
        .iter()
        .take(n.unwrap_or(usize::MAX))
        .copied()
        .collect();
    let more = n.is_some_and(|n| n > 0 && after.len() > n);
    let body = serde_json::json!({"name": name, "tags": page}).to_string();
    let mut response = json(StatusCode::OK, body);
    if let (true, Some(n), Some(last)) = (more, n, page.last()) {
        set(
            &mut response,
            "link",
            &format!("</v2/{name}/tags/list?last={last}&n={n}>; rel=\"next\""),
        );
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_repository_even_with_slashes() {
        assert!(matches!(target("/v2/"), Some(Target::Base)));
        assert!(matches!(target("/v2"), Some(Target::Base)));
        assert!(matches!(
            target("/v2/cache/app/main/tags/list"),
            Some(Target::Tags("cache/app/main"))
        ));
        assert!(matches!(
            target("/v2/a/b/blobs/uploads/"),
            Some(Target::Uploads("a/b"))
        ));
        assert!(matches!(
            target("/v2/a/b/blobs/uploads/123"),
            Some(Target::Upload("a/b", "123"))
        ));
        assert!(matches!(
            target("/v2/a/manifests/latest"),
            Some(Target::Manifest("a", "latest"))
        ));
        assert!(matches!(
            target("/v2/a/blobs/sha256:00"),
            Some(Target::Blob("a", "sha256:00"))
        ));
        assert!(target("/v3/a").is_none());
        assert!(target("/v2/a").is_none());
    }

    #[test]
    fn byte_ranges_follow_rfc_9110() {
        assert_eq!(byte_range("bytes=0-3", 10), Ok(Some((0, 4))));
        assert_eq!(byte_range("bytes=2-", 10), Ok(Some((2, 8))));
        assert_eq!(byte_range("bytes=-3", 10), Ok(Some((7, 3))));
        assert_eq!(byte_range("bytes=5-100", 10), Ok(Some((5, 5))));
        assert_eq!(byte_range("bytes=10-", 10), Err(()));
        assert_eq!(byte_range("bytes=4-2", 10), Err(()));
        assert_eq!(byte_range("items=1-2", 10), Ok(None));
        assert_eq!(byte_range("bytes=0-1,4-5", 10), Ok(None));
    }
}
