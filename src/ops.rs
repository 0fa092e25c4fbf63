//! The plaintext operations port (`ops_listen`): `grpc.health.v1` for Kubernetes gRPC probes
//! (which cannot speak TLS, so they need a port without it), plus HTTP/1.1 `GET /healthz`
//! (200 while the process runs) and `GET /readyz` (200 only while health is SERVING: 503 while
//! the store opens and while draining), and `GET /metrics` (Prometheus text, `metrics.rs`).
//! It serves no cache data.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::proto::health::health_server::HealthServer;
use crate::service::health::{HealthReporter, State};

/// The content type of Prometheus' text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves the ops port on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    health: HealthReporter,
    metrics: Arc<Metrics>,
    handshake_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let addr = listener
        .local_addr()
        .map_err(|e| Error::internal("reading the ops port's address", e))?;
    tracing::info!(
        ops_listen = %addr,
        "ops port is serving /healthz, /readyz, /metrics and grpc.health.v1"
    );
    // Never TLS: Kubernetes probes cannot speak it.
    let incoming = crate::connections::incoming(listener, handshake_timeout, None);
    tonic::transport::Server::builder()
        // `/healthz` and `/readyz` are plain HTTP/1.1 requests (curl, kubelet's httpGet).
        .accept_http1(true)
        .layer(tower::layer::layer_fn({
            let health = health.clone();
            move |inner| Probes {
                inner,
                health: health.clone(),
                metrics: metrics.clone(),
            }
        }))
        .add_service(HealthServer::new(health.service()))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| Error::internal("ops port", e))
}

/// Answers `/healthz`, `/readyz` and `/metrics` itself and passes everything else (gRPC
/// health) on.
#[derive(Clone)]
struct Probes<S> {
    inner: S,
    health: HealthReporter,
    metrics: Arc<Metrics>,
}

type Reply<E> = Pin<Box<dyn Future<Output = Result<Response<tonic::body::Body>, E>> + Send>>;

impl<S, B> tower::Service<Request<B>> for Probes<S>
where
    S: tower::Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Reply<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if matches!(request.method(), &Method::GET | &Method::HEAD)
            && request.uri().path() == "/metrics"
            && self.metrics.enabled()
        {
            let metrics = self.metrics.clone();
            return Box::pin(async move {
                let mut response = Response::new(tonic::body::Body::new(metrics.render().await));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(PROMETHEUS_TEXT),
                );
                Ok(response)
            });
        }
        let probe = match (request.method(), request.uri().path()) {
            (&Method::GET | &Method::HEAD, "/healthz") => Some((StatusCode::OK, "ok\n".into())),
            (&Method::GET | &Method::HEAD, "/metrics") => Some((
                StatusCode::NOT_FOUND,
                "not found: metrics are off (telemetry.metrics = false)\n".into(),
            )),
            (&Method::GET | &Method::HEAD, "/readyz") => Some(match self.health.state() {
                State::Serving => match self.health.degraded() {
                    None => (StatusCode::OK, "ready\n".into()),
                    Some(why) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("degraded: {why}\n"),
                    ),
                },
                State::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting\n".into()),
                State::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining\n".into()),
            }),
            // gRPC calls go on (health answers; anything else is UNIMPLEMENTED there).
            _ if is_grpc(&request) => None,
            _ => Some((
                StatusCode::NOT_FOUND,
                "not found: the ops port serves /healthz, /readyz, /metrics and grpc.health.v1\n"
                    .into(),
            )),
        };
        match probe {
            Some((status, text)) => Box::pin(std::future::ready(Ok(plain(status, text)))),
            None => Box::pin(self.inner.call(request)),
        }
    }
}

fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

fn plain(status: StatusCode, text: String) -> Response<tonic::body::Body> {
    let mut response = Response::new(tonic::body::Body::new(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
