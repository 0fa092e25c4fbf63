//! Tower layers around every gRPC service. `server.rs` stacks them, outermost first:
//! [`MetricsLayer`] (requests by method and code, durations), the OUT_OF_RANGE →
//! RESOURCE_EXHAUSTED mapping, [`AuthLayer`] (metadata bound, authentication), [`ShedLayer`]
//! (concurrency limit).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::auth::Authenticator;
use crate::connections::Peer;
use crate::error::Error;
use crate::metrics::Metrics;

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
    metrics: Arc<Metrics>,
}

impl ShedLayer {
    pub fn new(max_concurrent: u32, metrics: Arc<Metrics>) -> Self {
        ShedLayer {
            permits: Arc::new(Semaphore::new(max_concurrent as usize)),
            metrics,
        }
    }
}

impl<S> tower::Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Shed<S> {
        Shed {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`ShedLayer`] wraps around the router.
#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    layer: ShedLayer,
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
        match self.layer.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let reply = self.inner.call(request);
                Box::pin(async move {
                    let response = reply.await;
                    drop(permit);
                    response
                })
            }
            Err(_) => {
                self.layer.metrics.shed();
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
    metrics: Arc<Metrics>,
}

impl AuthLayer {
    pub fn new(auth: Arc<Authenticator>, max_metadata: u64, metrics: Arc<Metrics>) -> Self {
        AuthLayer {
            auth,
            max_metadata: max_metadata as usize,
            metrics,
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
        match self.layer.auth.check(authorization, Peer::of(&request)) {
            Ok(caller) => {
                let peer = Peer::of(&request).and_then(|p| p.addr);
                request.extensions_mut().insert(caller.from_peer(peer));
                Box::pin(self.inner.call(request))
            }
            Err((reason, e)) => {
                self.layer.metrics.auth_failure(reason);
                let status = tonic::Status::from(e);
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// Counts every call but health checks (`hoard_requests_total` by service, method and gRPC
/// code), times it from arrival until its reply ends (`hoard_request_duration_seconds`), so a
/// streamed Read or Watch counts its whole stream, counts the bytes of its request and reply
/// bodies, and runs it in its span (`telemetry::rpc_span`: request id, client's traceparent).
/// Outermost, so it also sees the calls the layers inside refuse. The code of a streamed reply
/// is only known from its trailers, so the reply body is wrapped to read them; a trailers-only
/// reply carries it in its headers. Health checks are left out: probes every few seconds would
/// dominate the request rate.
#[derive(Clone)]
pub struct MetricsLayer {
    metrics: Arc<Metrics>,
}

impl MetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        MetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = Measure<S>;

    fn layer(&self, inner: S) -> Measure<S> {
        Measure {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`MetricsLayer`] wraps around the router.
#[derive(Clone)]
pub struct Measure<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, RB> tower::Service<Request<B>> for Measure<S>
where
    S: tower::Service<Request<tonic::body::Body>, Response = Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
    RB: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
    RB::Error: Into<tonic::codegen::StdError>,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if never_shed(request.uri().path()) {
            let reply = self.inner.call(request.map(tonic::body::Body::new));
            return Box::pin(async move { Ok(reply.await?.map(tonic::body::Body::new)) });
        }
        let (service, method) = crate::metrics::service_and_method(request.uri().path());
        let span = crate::telemetry::rpc_span(service, method, request.headers());
        let received = Arc::new(AtomicU64::new(0));
        let request = request.map(|inner| {
            tonic::body::Body::new(Counted {
                inner,
                count: received.clone(),
            })
        });
        // Entered while the router and the layers inside it start the call, and (below)
        // whenever the handler's future or its reply stream runs, so what they log carries
        // the request id and what they record lands on this span.
        let reply = span.in_scope(|| self.inner.call(request));
        let record = Record {
            metrics: self.metrics.clone(),
            service,
            method,
            started: Instant::now(),
            code: None,
            span: span.clone(),
            received,
            sent: 0,
        };
        Box::pin(
            async move {
                let response = reply.await?;
                if let Some(code) = grpc_status(response.headers()) {
                    // Trailers-only (refusals, errors of unary calls): the code is known now,
                    // and recording before the reply leaves keeps the count exact for whoever
                    // reads `/metrics` next.
                    record.finish(code);
                    return Ok(response.map(tonic::body::Body::new));
                }
                Ok(response.map(|inner| {
                    tonic::body::Body::new(Measured {
                        inner,
                        record: Some(record),
                    })
                }))
            }
            .instrument(span),
        )
    }
}

/// The `grpc-status` in `headers`, if there is one.
fn grpc_status(headers: &HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
}

/// A request body that counts the bytes of its data frames (the gRPC-framed messages) as the
/// handler reads them.
struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> http_body::Body for Counted<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// What is recorded once a reply ends.
struct Record {
    metrics: Arc<Metrics>,
    service: &'static str,
    method: &'static str,
    started: Instant,
    /// Never known before the trailers (a trailers-only reply is recorded at once); kept for
    /// a body that ends without trailers.
    code: Option<tonic::Code>,
    span: tracing::Span,
    /// The request body's bytes, counted as the handler reads them.
    received: Arc<AtomicU64>,
    /// The reply body's bytes so far.
    sent: u64,
}

impl Record {
    fn finish(self, fallback: tonic::Code) {
        let code = self.code.unwrap_or(fallback);
        let elapsed = self.started.elapsed();
        let received = self.received.load(Ordering::Relaxed);
        self.metrics.request(
            self.service,
            self.method,
            code,
            elapsed,
            received,
            self.sent,
        );
        crate::telemetry::finish_rpc_span(&self.span, code, received, self.sent);
        self.span.in_scope(|| {
            tracing::debug!(
                code = ?code,
                seconds = elapsed.as_secs_f64(),
                bytes_received = received,
                bytes_sent = self.sent,
                "call finished"
            );
        });
    }
}

/// A reply body that records its call when it ends: at its trailers, at its end without any
/// (the code from the headers, else UNKNOWN), or when dropped before the end (the client went
/// away: CANCELLED unless a code was already known). It counts the bytes it carries and polls
/// the reply inside the call's span, so a streaming handler's work is part of it.
struct Measured<B> {
    inner: B,
    record: Option<Record>,
}

impl<B> http_body::Body for Measured<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = match &this.record {
            Some(record) => {
                let _entered = record.span.enter();
                Pin::new(&mut this.inner).poll_frame(cx)
            }
            None => Pin::new(&mut this.inner).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(record) = this.record.as_mut() {
                        record.sent += data.len() as u64;
                    }
                }
                if let Some(trailers) = frame.trailers_ref() {
                    if let Some(mut record) = this.record.take() {
                        record.code = grpc_status(trailers).or(record.code);
                        record.finish(tonic::Code::Unknown);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(record) = this.record.take() {
                    record.finish(tonic::Code::Internal);
                }
            }
            Poll::Ready(None) => {
                if let Some(record) = this.record.take() {
                    record.finish(tonic::Code::Unknown);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Measured<B> {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            record.finish(tonic::Code::Cancelled);
        }
    }
}
