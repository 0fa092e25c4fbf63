//! `hoard.watch.v1.Watch`: streams the event log to clients.
//!
//! Thin: turns the request into a [`Subscription`], hands the [`crate::watch::EventLog`]'s
//! cursor to tonic, and adds the resume points as metadata so clients need not parse messages.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::auth::{Access, Caller};
use crate::metrics::Metrics;
use crate::proto::watch::{watch_server, Event, WatchRequest};
use crate::watch::{EventLog, Start, Subscription, WatchError};

/// Response header: the sequence the stream starts after (what `start_after`, 0 or `from_now`
/// resolved to). A client that receives no event resumes from here.
pub const START_AFTER_HEADER: &str = "hoard-start-after";
/// Trailer on RESOURCE_EXHAUSTED (fell behind) and UNAVAILABLE (shutdown): reconnect with
/// `start_after` set to it.
pub const RESUME_AFTER_TRAILER: &str = "hoard-resume-after";
/// Trailer on OUT_OF_RANGE: the log holds every event from this sequence on.
pub const OLDEST_AVAILABLE_TRAILER: &str = "hoard-oldest-available";

pub struct WatchService {
    events: Arc<EventLog>,
    /// Open streams (`hoard_watchers`).
    metrics: Arc<Metrics>,
}

impl WatchService {
    pub fn new(events: Arc<EventLog>, metrics: Arc<Metrics>) -> Self {
        WatchService { events, metrics }
    }
}

/// The status a watch stream ends with, carrying its resume point as a trailer.
fn status(e: WatchError) -> Status {
    let mut status = Status::from(e.error);
    let trailers = [
        (RESUME_AFTER_TRAILER, e.resume_after),
        (OLDEST_AVAILABLE_TRAILER, e.oldest_available),
    ];
    for (key, value) in trailers {
        if let Some(n) = value {
            status.metadata_mut().insert(key, MetadataValue::from(n));
        }
    }
    status
}

type Events = Pin<Box<dyn Stream<Item = Result<Event, Status>> + Send>>;

#[tonic::async_trait]
impl watch_server::Watch for WatchService {
    type WatchStream = Events;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        // Read over everything the stream may carry (the empty pattern: every namespace).
        crate::service::admin::check_pattern(&r.namespace_pattern, "namespace_pattern")?;
        caller.require_all(
            Access::Read,
            crate::auth::pattern_or_everything(&r.namespace_pattern),
        )?;
        let start = if r.from_now {
            Start::Now
        } else {
            Start::After(r.start_after)
        };
        let subscription = Subscription::new(r.namespace_pattern, start, &r.kinds)?;
        let watcher = self.events.watch(subscription).await.map_err(status)?;
        let start_after = watcher.start_after();
        // The guard lives as long as the stream: counted open until it is dropped.
        let open = self.metrics.watcher();
        let stream: Events = Box::pin(watcher.into_stream().map(move |item| {
            let _open = &open;
            item.map_err(status)
        }));
        let mut response = Response::new(stream);
        response
            .metadata_mut()
            .insert(START_AFTER_HEADER, MetadataValue::from(start_after));
        Ok(response)
    }
}
