//! The watch relay: the upstream's event stream, applied to the replica's action-result copies
//! and appended to the replica's own log, in upstream order.
//!
//! Where to resume is durable with the events themselves (each relayed event carries its
//! upstream sequence; `EventLog::relayed_through`), so after a restart of either side the
//! stream resumes with `start_after` and nothing is lost or repeated. An event is applied to the
//! copies before it is appended, so a watcher that sees it and then asks this replica gets the
//! new answer. After a reconnect, copies are vouched for again only once the relay has applied
//! the upstream's newest event as of the reconnect (`ActionCopies` forwards lookups until then).
//! If the upstream no longer holds the events after that position (OUT_OF_RANGE),
//! the relay starts over from the upstream's newest event, drops every copy, and marks a gap in
//! the local log, which tells this server's watchers to resync.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tonic::Code;

use super::ActionCopies;
use crate::digest::Digest;
use crate::error::Result;
use crate::proto::watch::watch_client::WatchClient;
use crate::proto::watch::{Event, EventKind, WatchRequest};
use crate::service::watch::START_AFTER_HEADER;
use crate::watch::EventLog;

const FIRST_PAUSE: Duration = Duration::from_millis(200);
/// Events applied together at most.
const BATCH: usize = 256;
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// Relays for as long as the server runs.
pub async fn relay(copies: Arc<ActionCopies>, events: Arc<EventLog>) {
    let upstream = copies.upstream().clone();
    let mut pause = FIRST_PAUSE;
    let mut resync = false;
    loop {
        if upstream.check().is_err() {
            // The probe notices its return within a second.
            tokio::time::sleep(FIRST_PAUSE).await;
            continue;
        }
        let ended = relay_once(&copies, &events, resync).await;
        upstream.set_relay_open(false);
        match ended {
            Ok(()) => {
                resync = false;
                pause = FIRST_PAUSE;
            }
            Err(status) if status.code() == Code::OutOfRange => {
                tracing::warn!(
                    upstream = %upstream.uri(),
                    error = %status.message(),
                    "the upstream's watch log no longer holds what this replica needs: dropping \
                     local action-result copies and telling watchers to resync"
                );
                resync = true;
                pause = FIRST_PAUSE;
                continue;
            }
            Err(status) => {
                tracing::info!(
                    upstream = %upstream.uri(),
                    code = ?status.code(),
                    error = %crate::client::status_text(&status),
                    "upstream watch stream ended; resuming"
                );
                if status.code() != Code::Unavailable {
                    // Not an outage the probe sees (refused, internal): do not spin.
                    pause = (pause * 2).min(MAX_PAUSE);
                }
            }
        }
        tokio::time::sleep(pause).await;
    }
}

/// One stream, until it ends. `Ok` if the upstream closed it cleanly.
async fn relay_once(
    copies: &ActionCopies,
    events: &EventLog,
    resync: bool,
) -> std::result::Result<(), tonic::Status> {
    let upstream = copies.upstream();
    let position = events
        .relayed_through()
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    // Never relayed anything nor marked where to start: a first start.
    let fresh = resync || position.is_none();
    let position = position.unwrap_or(0);
    // Resuming: copies are vouched for only once the events up to the upstream's newest at
    // this moment are applied (after a long pause, catching up takes a moment).
    let caught_up_at = match fresh {
        true => 0,
        false => start_after(&open(upstream, 0, true).await?)?,
    };
    let opened = open(upstream, position, fresh).await?;
    if fresh {
        let start = start_after(&opened)?;
        // Everything before `start` is unknown here: no copy can be trusted.
        local(copies.drop_all().await)?;
        if resync {
            local(events.relay_gap(start).await)?;
        } else {
            local(events.relay_from(start).await)?;
        }
        tracing::info!(upstream = %upstream.uri(), start, resync, "relaying the upstream's watch events");
    } else {
        tracing::info!(upstream = %upstream.uri(), after = position, "resuming the upstream's watch events");
    }
    let mut current = position >= caught_up_at;
    upstream.set_relay_open(current);
    let mut stream = opened.into_inner();
    while let Some(first) = stream.message().await? {
        // What has already arrived goes as one batch (a burst of namespace invalidations is
        // then one pass over the copies, not one each).
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match stream.message().now_or_never() {
                Some(Ok(Some(event))) => batch.push(event),
                Some(Ok(None)) | None => break,
                Some(Err(status)) => return Err(status),
            }
        }
        if let Err(e) = apply(copies, &batch).await {
            // A copy that could not be dropped must not be served.
            tracing::warn!(error = %e, "applying upstream events failed: dropping every copy");
            local(copies.drop_all().await)?;
        }
        for event in batch {
            let sequence = event.sequence;
            local(events.relay(strip_prefix(upstream, event)).map(drop))?;
            if !current && sequence >= caught_up_at {
                current = true;
                upstream.set_relay_open(true);
            }
        }
    }
    Ok(())
}

/// Opens the upstream's watch stream of every kind and namespace, after `position` or (with
/// `from_now`) after its newest event. The call's start is bounded by the deadline; the stream
/// itself lives on (HTTP/2 keepalive notices a dead link).
async fn open(
    upstream: &super::Upstream,
    position: u64,
    from_now: bool,
) -> std::result::Result<tonic::Response<tonic::Streaming<Event>>, tonic::Status> {
    let request = WatchRequest {
        namespace_pattern: String::new(),
        start_after: if from_now { 0 } else { position },
        from_now,
        kinds: vec![
            EventKind::ActionInvalidated as i32,
            EventKind::NamespaceInvalidated as i32,
            EventKind::NamespaceDropped as i32,
            EventKind::ActionResultStored as i32,
        ],
    };
    tokio::time::timeout(
        upstream.timeout,
        WatchClient::new(upstream.channel()).watch(request),
    )
    .await
    .map_err(|_| tonic::Status::unavailable("no answer to Watch within the deadline"))?
}

/// Where the stream `opened` starts, as the upstream says.
fn start_after(
    opened: &tonic::Response<tonic::Streaming<Event>>,
) -> std::result::Result<u64, tonic::Status> {
    opened
        .metadata()
        .get(START_AFTER_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            tonic::Status::internal(format!(
                "the upstream's Watch answer has no {START_AFTER_HEADER} header (is it hoard?)"
            ))
        })
}

fn local<T>(r: Result<T>) -> std::result::Result<T, tonic::Status> {
    r.map_err(|e| tonic::Status::internal(format!("relaying to the local log: {e}")))
}

/// Drops the copies `events` may have made stale: each action's at once, the namespaces' in
/// one pass over the copies for the whole batch.
async fn apply(copies: &ActionCopies, events: &[Event]) -> Result<()> {
    let mut namespaces: Vec<String> = Vec::new();
    for event in events {
        match event.kind() {
            EventKind::ActionInvalidated | EventKind::ActionResultStored => {
                let action =
                    Digest::from_proto(event.action_digest.as_ref(), "event action_digest")?;
                copies.drop_action(&action).await?;
            }
            EventKind::NamespaceInvalidated | EventKind::NamespaceDropped => {
                if !namespaces.contains(&event.namespace) {
                    namespaces.push(event.namespace.clone());
                }
            }
            EventKind::Unspecified => {}
        }
    }
    if !namespaces.is_empty() {
        copies.drop_namespaces(&namespaces).await?;
    }
    Ok(())
}

/// The event as this replica's clients name things: without `upstream.instance_prefix`.
fn strip_prefix(upstream: &super::Upstream, mut event: Event) -> Event {
    event.namespace = upstream.local_namespace(&event.namespace);
    event
}
