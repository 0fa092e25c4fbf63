//! `grpc.health.v1.Health`, for load balancers and Kubernetes probes.
//!
//! One state covers the whole server: SERVING once the store is open, NOT_SERVING as soon as
//! shutdown begins, so balancers drain us before calls are refused. Watch streams end after
//! reporting NOT_SERVING on shutdown; otherwise they would hold the graceful shutdown open.

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
    "build.bazel.remote.execution.v2.Capabilities",
    "build.bazel.remote.execution.v2.ContentAddressableStorage",
    "build.bazel.remote.execution.v2.ActionCache",
    "google.bytestream.ByteStream",
];

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
    serving: std::sync::Arc<watch::Sender<State>>,
}

impl HealthReporter {
    pub fn new() -> Self {
        HealthReporter {
            serving: std::sync::Arc::new(watch::channel(State::Starting).0),
        }
    }

    pub fn set(&self, state: State) {
        // Only changes are sent to watchers, as the health protocol asks.
        self.serving.send_if_modified(|current| {
            let changed = *current != state;
            *current = state;
            changed
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
    serving: watch::Receiver<State>,
}

fn response(state: State) -> HealthCheckResponse {
    let status = match state {
        State::Serving => ServingStatus::Serving,
        State::Starting | State::Draining => ServingStatus::NotServing,
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
        Ok(Response::new(response(*self.serving.borrow())))
    }

    async fn list(
        &self,
        _request: Request<HealthListRequest>,
    ) -> Result<Response<HealthListResponse>, Status> {
        let serving = *self.serving.borrow();
        let statuses: HashMap<String, HealthCheckResponse> = SERVICES
            .iter()
            .map(|s| (s.to_string(), response(serving)))
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
                let _ = states.wait_for(|s| *s == State::Draining).await;
            };
            let stream = futures::stream::once(async move { Ok(unknown) })
                .chain(futures::stream::pending())
                .take_until(until_draining);
            return Ok(Response::new(Box::pin(stream)));
        }
        // Report each state; stop after reporting Draining.
        let stream = WatchStream::new(self.serving.clone()).scan(false, |ended, state| {
            let item = (!*ended).then(|| Ok(response(state)));
            *ended = state == State::Draining;
            futures::future::ready(item)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
