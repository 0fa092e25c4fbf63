//! `grpc.health.v1.Health`, for load balancers and Kubernetes probes.
//!
//! One state covers the whole server: SERVING once the store is open, NOT_SERVING as soon as
//! shutdown begins, so balancers drain us before calls are refused. Watch streams end after
//! reporting NOT_SERVING on shutdown; otherwise they would hold the graceful shutdown open.
//!
//! [`WRITES`] is the exception: it is NOT_SERVING while the store refuses writes (disk full, or
//! cache full of blobs within their retention) although reads are still served. Deployments with
//! several replicas can use it as the readiness check; "" stays the liveness check.
//!
//! Written here rather than taken from `tonic-health` (0.14): that crate has no `List`, answers
//! `Watch` of an unknown service with NOT_FOUND where the protocol says SERVICE_UNKNOWN and keep
//! the call open, never ends its watch streams (they would hold graceful shutdown open), and
//! keeps one status per service set by hand, where every status here follows from one state
//! and the store's writability.

use std::collections::HashMap;
use std::pin::Pin;

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use crate::proto::health::{
    health_check_response::ServingStatus, health_server::Health, HealthCheckRequest,
    HealthCheckResponse, HealthListRequest, HealthListResponse,
};

/// The services whose health can be asked for by name ("" is the server as a whole).
pub const SERVICES: &[&str] = &[
    "",
    WRITES,
    "build.bazel.remote.execution.v2.Capabilities",
    "build.bazel.remote.execution.v2.ContentAddressableStorage",
    "build.bazel.remote.execution.v2.ActionCache",
    "google.bytestream.ByteStream",
    "build.bazel.remote.asset.v1.Fetch",
    "build.bazel.remote.asset.v1.Push",
];

/// The health name that reports whether writes are accepted.
pub const WRITES: &str = "hoard.Writes";

/// The server's life cycle as health reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Starting,
    Serving,
    /// Shutting down: NOT_SERVING, and watch streams end.
    Draining,
}

/// Sets the server's state; cheap to clone.
#[derive(Clone)]
pub struct HealthReporter {
    serving: std::sync::Arc<watch::Sender<Condition>>,
    /// Why the store cannot serve right now (`Housekeeping::unavailable`), for `/readyz`.
    degraded: std::sync::Arc<parking_lot::Mutex<Option<String>>>,
}

/// What health reports are derived from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Condition {
    state: State,
    /// Whether the store accepts writes.
    writable: bool,
}

impl HealthReporter {
    pub fn new() -> Self {
        HealthReporter {
            serving: std::sync::Arc::new(
                watch::channel(Condition {
                    state: State::Starting,
                    writable: true,
                })
                .0,
            ),
            degraded: Default::default(),
        }
    }

    /// Records why the store cannot serve, or `None` once it can again.
    pub fn set_degraded(&self, why: Option<String>) {
        *self.degraded.lock() = why;
    }

    /// Why the store cannot serve right now, if it cannot (for `/readyz`).
    pub fn degraded(&self) -> Option<String> {
        self.degraded.lock().clone()
    }

    pub fn set(&self, state: State) {
        self.update(|s| s.state = state);
    }

    /// The server's state now (for `/readyz`).
    pub fn state(&self) -> State {
        self.serving.borrow().state
    }

    /// Records whether the store accepts writes (reported under [`WRITES`]).
    pub fn set_writable(&self, writable: bool) {
        self.update(|s| s.writable = writable);
    }

    fn update(&self, change: impl FnOnce(&mut Condition)) {
        // Only changes are sent to watchers, as the health protocol asks.
        self.serving.send_if_modified(|current| {
            let before = *current;
            change(current);
            *current != before
        });
    }

    pub fn service(&self) -> HealthService {
        HealthService {
            serving: self.serving.subscribe(),
        }
    }
}

impl Default for HealthReporter {
    fn default() -> Self {
        Self::new()
    }
}

pub struct HealthService {
    serving: watch::Receiver<Condition>,
}

fn response(service: &str, status: Condition) -> HealthCheckResponse {
    let status = match status.state {
        State::Serving if service != WRITES || status.writable => ServingStatus::Serving,
        State::Serving | State::Starting | State::Draining => ServingStatus::NotServing,
    };
    HealthCheckResponse {
        status: status as i32,
    }
}

type WatchResponses = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        if !SERVICES.contains(&service.as_str()) {
            return Err(Status::not_found(format!(
                "unknown service {service:?}; known: {}",
                SERVICES[1..].join(", ")
            )));
        }
        Ok(Response::new(response(&service, *self.serving.borrow())))
    }

    async fn list(
        &self,
        _request: Request<HealthListRequest>,
    ) -> Result<Response<HealthListResponse>, Status> {
        let serving = *self.serving.borrow();
        let statuses: HashMap<String, HealthCheckResponse> = SERVICES
            .iter()
            .map(|s| (s.to_string(), response(s, serving)))
            .collect();
        Ok(Response::new(HealthListResponse { statuses }))
    }

    type WatchStream = WatchResponses;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = request.into_inner().service;
        if !SERVICES.contains(&service.as_str()) {
            // The protocol says: report SERVICE_UNKNOWN and keep the call open.
            let unknown = HealthCheckResponse {
                status: ServingStatus::ServiceUnknown as i32,
            };
            let mut states = self.serving.clone();
            let until_draining = async move {
                let _ = states.wait_for(|s| s.state == State::Draining).await;
            };
            let stream = futures::stream::once(async move { Ok(unknown) })
                .chain(futures::stream::pending())
                .take_until(until_draining);
            return Ok(Response::new(Box::pin(stream)));
        }
        // Report each change of this service's status; stop after reporting Draining.
        let mut last = None;
        let stream = WatchStream::new(self.serving.clone())
            .scan(false, move |ended, status| {
                let item = (!*ended).then(|| response(&service, status));
                *ended = status.state == State::Draining;
                futures::future::ready(item)
            })
            .filter_map(move |r| {
                let changed = last != Some(r.status);
                last = Some(r.status);
                futures::future::ready(changed.then_some(Ok(r)))
            });
        Ok(Response::new(Box::pin(stream)))
    }
}
