//! Tower layers around every gRPC service. `server.rs` stacks them, outermost first: the
//! OUT_OF_RANGE → RESOURCE_EXHAUSTED mapping, [`AuthLayer`] (metadata bound, authentication),
//! [`ShedLayer`] (concurrency limit). Metrics go here next.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use tokio::sync::Semaphore;

use crate::auth::Authenticator;
use crate::connections::Peer;
use crate::error::Error;

/// tonic answers a request message above `limits.max_message_size` with OUT_OF_RANGE, where
/// gRPC's status-code table (and clients' retry logic) says RESOURCE_EXHAUSTED. The refusal
/// happens while decoding, before any handler runs, so it is mapped on the way out.
pub fn oversize_is_resource_exhausted<B>(mut response: Response<B>) -> Response<B> {
    let headers = response.headers_mut();
    let oversize = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(is_oversize_message);
    if oversize {
        headers.insert("grpc-status", HeaderValue::from_static("8"));
    }
    response
}

/// Whether a (percent-encoded) `grpc-message` is tonic's "decoded message length too large".
pub fn is_oversize_message(message: &str) -> bool {
    message.contains("decoded message length too large")
        || message.contains("decoded%20message%20length%20too%20large")
}

/// The global concurrency limit with load shedding (`limits.max_concurrent_requests`): a call
/// takes a permit when it arrives and holds it until its reply starts (for a ByteStream Write,
/// until the whole upload is received; a Read's or Watch's stream then runs on without one).
/// With none left the call is answered RESOURCE_EXHAUSTED "server overloaded" at once, which
/// clients treat as retryable, rather than queued: a queue would only turn overload into
/// timeouts. Health checks bypass the limit, so probes keep answering under a flood.
#[derive(Clone)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
}

impl ShedLayer {
    pub fn new(max_concurrent: u32) -> Self {
        ShedLayer {
            permits: Arc::new(Semaphore::new(max_concurrent as usize)),
        }
    }
}

impl<S> tower::Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Shed<S> {
        Shed {
            inner,
            permits: self.permits.clone(),
        }
    }
}

/// The service [`ShedLayer`] wraps around the router.
#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

/// gRPC paths that are never shed.
fn never_shed(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
}

impl<S, B, RB> tower::Service<Request<B>> for Shed<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if never_shed(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let reply = self.inner.call(request);
                Box::pin(async move {
                    let response = reply.await;
                    drop(permit);
                    response
                })
            }
            Err(_) => {
                let status = tonic::Status::resource_exhausted("server overloaded");
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// Authentication, and the bound on request metadata (`limits.max_metadata_size`): each call's
/// headers are measured (as HTTP/2 counts a header list) and refused RESOURCE_EXHAUSTED above
/// the bound; then its credentials become a [`crate::auth::Caller`] in the request's extensions, or the call
/// is answered UNAUTHENTICATED without reaching a service. It runs outside the concurrency
/// limit, so a flood of bad tokens takes no permits from good callers. Health checks pass
/// untouched (probes carry no credentials).
#[derive(Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
    max_metadata: usize,
}

impl AuthLayer {
    pub fn new(auth: Arc<Authenticator>, max_metadata: u64) -> Self {
        AuthLayer {
            auth,
            max_metadata: max_metadata as usize,
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Authenticate<S> {
        Authenticate {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the router.
#[derive(Clone)]
pub struct Authenticate<S> {
    inner: S,
    layer: AuthLayer,
}

/// The size of a header list as HTTP/2's SETTINGS_MAX_HEADER_LIST_SIZE counts it.
pub fn metadata_size(headers: &http::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum()
}

impl<S, B, RB> tower::Service<Request<B>> for Authenticate<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if never_shed(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        let size = metadata_size(request.headers());
        if size > self.layer.max_metadata {
            let status = tonic::Status::from(Error::ResourceExhausted(format!(
                "request metadata is {size} bytes; this server accepts at most {} \
                 (limits.max_metadata_size)",
                self.layer.max_metadata
            )));
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        let authorization = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        match self
            .layer
            .auth
            .authenticate(authorization, Peer::of(&request))
        {
            Ok(caller) => {
                let peer = Peer::of(&request).and_then(|p| p.addr);
                request.extensions_mut().insert(caller.from_peer(peer));
                Box::pin(self.inner.call(request))
            }
            Err(e) => {
                let status = tonic::Status::from(e);
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}
