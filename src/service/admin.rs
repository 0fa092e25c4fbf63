//! `hoard.admin.v1.Admin`: operating a running server. Stats, gc and verify for `hoard
//! stats|gc|verify --server`, each one store call; the conversions here are also what the CLI uses
//! to turn a reply back into the store's report, so both modes print the same thing.
//!
//! Invalidation (`hoard invalidate`, `hoard namespaces`, `hoard prune-namespaces`): validate the
//! request here, then run `crate::invalidation`'s workflow (change, announce, wait until
//! durable), naming the caller in its events. GetProvenance (`hoard provenance`): validate,
//! then ask `ActionResults::provenance`.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

use crate::auth::{Access, Caller};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::instance_name;
use crate::invalidation::{Invalidation, Target};
use crate::metrics::Metrics;
use crate::namespace::{ActionResults, Provenance};
use crate::proto::admin::{
    self, admin_server::Admin, GcRequest, GcResponse, GetProvenanceRequest, GetProvenanceResponse,
    InvalidateRequest, InvalidateResponse, ListNamespacesRequest, ListNamespacesResponse,
    PruneNamespacesRequest, PruneNamespacesResponse, StatsRequest, StatsResponse, VerifyRequest,
    VerifyResponse,
};
use crate::store::{GcReport, Housekeeping, NamespaceInfo, StoreStats, VerifyReport};

/// Longest reason accepted, in bytes: it is stored with the namespace and sent with each event.
pub const MAX_REASON_LEN: usize = 1024;
/// Longest namespace pattern accepted, in bytes (a pattern is no longer than the names it
/// matches).
pub const MAX_PATTERN_LEN: usize = instance_name::MAX_INSTANCE_NAME_LEN;
/// Most actions one Invalidate call may list. Each becomes a watch event, and the log keeps only
/// `watch.retained_events`: one call must not push every other invalidation out of it.
pub const MAX_ACTIONS: usize = 10_000;

/// Cheap to clone: invalidations run in a task of their own (see `Admin::invalidate`).
#[derive(Clone)]
pub struct AdminService {
    housekeeping: Arc<dyn Housekeeping>,
    /// Action results as namespaces see them (for their stats, sweeps and provenance).
    results: Arc<ActionResults>,
    invalidation: Arc<Invalidation>,
    /// Held by a running gc or verify: both walk the whole store, and a second pass at the same
    /// time would only double the I/O.
    maintenance: Arc<Mutex<()>>,
    /// The server's metrics, for Stats' per-namespace and request figures (fields 50+); without
    /// them those stay empty.
    metrics: Option<Arc<Metrics>>,
}

impl AdminService {
    pub fn new(
        housekeeping: Arc<dyn Housekeeping>,
        results: Arc<ActionResults>,
        invalidation: Arc<Invalidation>,
    ) -> Self {
        AdminService {
            housekeeping,
            results,
            invalidation,
            maintenance: Arc::new(Mutex::new(())),
            metrics: None,
        }
    }

    /// Stats also reports what `metrics` counted (lookups per namespace, calls, latency).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn begin_maintenance(&self, what: &str) -> Result<tokio::sync::MutexGuard<'_, ()>, Error> {
        self.maintenance.try_lock().map_err(|_| {
            Error::Aborted(format!(
                "cannot start {what}: a gc or verify is already running on this server; \
                 try again when it has finished"
            ))
        })
    }
}

/// What an Invalidate call is about.
enum Scope {
    Namespace(String),
    Pattern(String),
}

impl Scope {
    fn of(r: &InvalidateRequest) -> Result<Scope> {
        match (&r.namespace, r.namespace_pattern.is_empty()) {
            (Some(_), false) => Err(Error::InvalidArgument(
                "namespace and namespace_pattern are both set; set exactly one".into(),
            )),
            (None, true) => Err(Error::InvalidArgument(
                "neither namespace nor namespace_pattern is set; set exactly one \
                 (namespace_pattern \"*\" matches every namespace)"
                    .into(),
            )),
            (Some(name), true) => {
                instance_name::validate(name)
                    .map_err(|e| Error::InvalidArgument(format!("namespace: {e}")))?;
                Ok(Scope::Namespace(name.clone()))
            }
            (None, false) => {
                check_pattern(&r.namespace_pattern, "namespace_pattern")?;
                Ok(Scope::Pattern(r.namespace_pattern.clone()))
            }
        }
    }
}

/// A pattern from a request (the empty pattern is the caller's business: "all" or "unset").
pub(crate) fn check_pattern(pattern: &str, field: &str) -> Result<()> {
    if pattern.len() > MAX_PATTERN_LEN {
        return Err(Error::InvalidArgument(format!(
            "{field} is {} bytes long; at most {MAX_PATTERN_LEN} are allowed",
            pattern.len()
        )));
    }
    instance_name::validate_pattern(pattern)
        .map_err(|e| Error::InvalidArgument(format!("{field}: {e}")))
}

/// Reasons are required: the record of why results vanished is the point of recording them.
fn check_reason(reason: &str) -> Result<()> {
    if reason.trim().is_empty() {
        return Err(Error::InvalidArgument(
            "reason is empty; say why (it is recorded, logged and sent to watchers)".into(),
        ));
    }
    if reason.len() > MAX_REASON_LEN {
        return Err(Error::InvalidArgument(format!(
            "reason is {} bytes long; at most {MAX_REASON_LEN} are allowed",
            reason.len()
        )));
    }
    Ok(())
}

/// The caller's address for the log, as far as the transport knows it.
fn peer<T>(request: &Request<T>) -> String {
    crate::connections::Peer::addr_text(request.extensions().get::<crate::connections::Peer>())
}

/// `1209600` as `14d`, for the default prune reason: the largest unit that divides it exactly.
pub(crate) fn idle_text(secs: u64) -> String {
    match secs {
        s if s.is_multiple_of(86_400) => format!("{}d", s / 86_400),
        s if s.is_multiple_of(3600) => format!("{}h", s / 3600),
        s if s.is_multiple_of(60) => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn stats(
        &self,
        request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        Caller::of(&request).require_admin_everywhere()?;
        let mut stats = self.housekeeping.stats().await?;
        self.results.add_stats(&mut stats);
        let mut reply = StatsResponse::from(stats);
        if let Some(metrics) = &self.metrics {
            add_server_figures(&mut reply, metrics);
        }
        Ok(Response::new(reply))
    }

    async fn gc(&self, request: Request<GcRequest>) -> Result<Response<GcResponse>, Status> {
        Caller::of(&request).require_admin_everywhere()?;
        let target = request.into_inner().target_bytes;
        let _running = self.begin_maintenance("gc")?;
        match target {
            Some(t) => tracing::info!(target_bytes = t, "gc requested"),
            None => tracing::info!("gc requested (down to the low watermark)"),
        }
        let report = self.results.gc(self.housekeeping.as_ref(), target).await?;
        tracing::info!(?report, "gc finished");
        Ok(Response::new(report.into()))
    }

    async fn verify(
        &self,
        request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        Caller::of(&request).require_admin_everywhere()?;
        let _running = self.begin_maintenance("verify")?;
        tracing::info!("verify requested");
        let report = self.housekeeping.verify().await?;
        tracing::info!(
            checked_blobs = report.checked_blobs,
            corrupt = report.corrupt.len(),
            orphans_removed = report.orphans_removed,
            "verify finished"
        );
        Ok(Response::new(report.into()))
    }

    async fn invalidate(
        &self,
        request: Request<InvalidateRequest>,
    ) -> Result<Response<InvalidateResponse>, Status> {
        let peer = peer(&request);
        let caller = Caller::of(&request);
        let r = request.into_inner();
        // Admin over every namespace it would touch, checked before anything changes.
        match Scope::of(&r)? {
            Scope::Namespace(name) => caller.require(Access::Admin, &name)?,
            Scope::Pattern(pattern) => caller.require_all(Access::Admin, &pattern)?,
        }
        // In a task of its own: a client that goes away mid-call (Ctrl-C, a deadline) drops
        // this handler, and must not leave a store change made but never announced.
        let this = self.clone();
        tokio::spawn(async move {
            this.invalidate_now(r, caller.name().to_string(), peer)
                .await
        })
        .await
        .map_err(|e| Status::from(Error::internal("invalidation task", e)))?
    }

    async fn list_namespaces(
        &self,
        request: Request<ListNamespacesRequest>,
    ) -> Result<Response<ListNamespacesResponse>, Status> {
        let caller = Caller::of(&request);
        let pattern = request.into_inner().namespace_pattern;
        check_pattern(&pattern, "namespace_pattern")?;
        // Only the namespaces the caller may read are listed.
        let mut namespaces = self.invalidation.matching(&pattern);
        namespaces.retain(|ns| caller.may(Access::Read, &ns.name));
        Ok(Response::new(ListNamespacesResponse {
            namespaces: namespaces.into_iter().map(Into::into).collect(),
            now_unix_secs: self.invalidation.clock(),
        }))
    }

    async fn prune_namespaces(
        &self,
        request: Request<PruneNamespacesRequest>,
    ) -> Result<Response<PruneNamespacesResponse>, Status> {
        let peer = peer(&request);
        let caller = Caller::of(&request);
        let r = request.into_inner();
        // Checked before authorizing: the check bounds what `require_all` has to look at.
        check_pattern(&r.namespace_pattern, "namespace_pattern")?;
        caller.require_all(
            Access::Admin,
            crate::auth::pattern_or_everything(&r.namespace_pattern),
        )?;
        // In a task of its own, for the same reason as `invalidate`.
        let this = self.clone();
        tokio::spawn(async move { this.prune_now(r, caller.name().to_string(), peer).await })
            .await
            .map_err(|e| Status::from(Error::internal("pruning task", e)))?
    }

    async fn get_provenance(
        &self,
        request: Request<GetProvenanceRequest>,
    ) -> Result<Response<GetProvenanceResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        instance_name::validate(&r.instance_name)
            .map_err(|e| Error::InvalidArgument(format!("instance_name: {e}")))?;
        caller.require(Access::Read, &r.instance_name)?;
        let action = Digest::from_proto(r.action_digest.as_ref(), "action_digest")?;
        // As GetActionResult: the chain only through namespaces the caller may read.
        let readable = |ns: &str| caller.may(Access::Read, ns);
        match self
            .results
            .provenance_for(&r.instance_name, &action, readable)
            .await?
        {
            Some(found) => Ok(Response::new(found.into())),
            None => {
                let mut chain = self.results.policy().read_chain(&r.instance_name);
                chain.retain(|ns| caller.may(Access::Read, ns));
                let looked: Vec<String> = chain.iter().map(|n| format!("{n:?}")).collect();
                Err(Error::NotFound(format!(
                    "no visible action result for action {action} through instance {:?} \
                     (looked in {})",
                    r.instance_name,
                    looked.join(", ")
                ))
                .into())
            }
        }
    }
}

impl AdminService {
    async fn invalidate_now(
        &self,
        r: InvalidateRequest,
        caller: String,
        peer: String,
    ) -> Result<Response<InvalidateResponse>, Status> {
        check_reason(&r.reason)?;
        let scope = Scope::of(&r)?;
        let mut actions = crate::service::parse_digests(&r.action_digests, "action_digests")?;
        if !actions.is_empty() && matches!(scope, Scope::Pattern(_)) {
            return Err(Error::InvalidArgument(
                "action_digests can only be given with namespace, not with namespace_pattern"
                    .into(),
            )
            .into());
        }
        if actions.len() > MAX_ACTIONS {
            return Err(Error::InvalidArgument(format!(
                "action_digests lists {} actions; at most {MAX_ACTIONS} per call are allowed",
                actions.len()
            ))
            .into());
        }
        let mut seen = HashSet::with_capacity(actions.len());
        actions.retain(|a| seen.insert(*a));
        let reason = r.reason.as_str();

        let target = match &scope {
            Scope::Namespace(name) if !actions.is_empty() => Target::Actions(name, &actions),
            Scope::Namespace(name) => Target::Namespace(name),
            Scope::Pattern(pattern) => Target::Pattern(pattern),
        };
        let done = self
            .invalidation
            .invalidate(target, reason, &caller, &peer)
            .await?;
        Ok(Response::new(InvalidateResponse { namespaces: done }))
    }

    async fn prune_now(
        &self,
        r: PruneNamespacesRequest,
        caller: String,
        peer: String,
    ) -> Result<Response<PruneNamespacesResponse>, Status> {
        if r.idle_seconds == 0 {
            return Err(Error::InvalidArgument(
                "idle_seconds is 0; give how long a namespace must have gone unused to be \
                 dropped (e.g. 1209600 for 14 days)"
                    .into(),
            )
            .into());
        }
        check_pattern(&r.namespace_pattern, "namespace_pattern")?;
        let reason = if r.reason.is_empty() {
            format!("idle for {}", idle_text(r.idle_seconds))
        } else {
            check_reason(&r.reason)?;
            r.reason
        };

        let now = self.invalidation.clock();
        let pruned = self
            .invalidation
            .prune(
                &r.namespace_pattern,
                r.idle_seconds,
                &reason,
                r.dry_run,
                &caller,
                &peer,
            )
            .await?;
        Ok(Response::new(PruneNamespacesResponse {
            namespaces: pruned,
            dry_run: r.dry_run,
            reason,
            now_unix_secs: now,
        }))
    }
}

impl From<NamespaceInfo> for admin::NamespaceInfo {
    fn from(ns: NamespaceInfo) -> Self {
        admin::NamespaceInfo {
            name: ns.name,
            epoch: ns.epoch,
            last_used_unix_secs: ns.last_used,
            invalidated_at_unix_secs: ns.invalidated_at,
            reason: ns.reason,
        }
    }
}

impl From<Provenance> for GetProvenanceResponse {
    fn from(p: Provenance) -> Self {
        GetProvenanceResponse {
            namespace: p.namespace,
            epoch: p.epoch,
            writer: p.writer,
            instance_name: p.instance_name,
            stored_at_unix_secs: p.stored_at,
        }
    }
}

/// Fields 50+ of Stats: what the serving process counted, not the store.
fn add_server_figures(reply: &mut StatsResponse, metrics: &Metrics) {
    reply.namespaces = metrics
        .namespace_stats()
        .into_iter()
        .map(|n| admin::NamespaceStats {
            namespace: n.namespace,
            ac_lookups: n.ac_lookups,
            ac_hits: n.ac_hits,
            cas_lookups: n.cas_lookups,
            cas_found: n.cas_found,
        })
        .collect();
    let requests = metrics.requests();
    reply.requests = requests.answered;
    reply.request_errors = requests.errors;
    reply.bytes_received = Some(requests.bytes_received);
    reply.bytes_sent = Some(requests.bytes_sent);
    let latency = metrics.latency();
    reply.latency_bounds_secs = latency.bounds_secs;
    reply.latency_cumulative = latency.cumulative;
    reply.server_version = env!("CARGO_PKG_VERSION").to_string();
    reply.uptime_secs = metrics.uptime().as_secs();
}

impl From<StoreStats> for StatsResponse {
    fn from(s: StoreStats) -> Self {
        StatsResponse {
            blobs: s.blobs,
            blob_bytes: s.blob_bytes,
            action_results: s.action_results,
            action_result_bytes: s.action_result_bytes,
            used_bytes: s.used_bytes,
            max_size: s.max_size,
            disk_bytes: s.disk_bytes,
            min_retention_secs: s.min_retention_secs,
            evicted_blobs: s.evicted_blobs,
            evicted_bytes: s.evicted_bytes,
            youngest_evicted_age_secs: s.youngest_evicted_age_secs,
            expired_action_results: s.expired_action_results,
            cas_lookups: s.cas_lookups,
            cas_hits: s.cas_hits,
            ac_lookups: s.ac_lookups,
            ac_hits: s.ac_hits,
            refused_writes: s.refused_writes,
            refused_cache_full: s.refused_cache_full,
            refused_too_large: s.refused_too_large,
            refused_disk_full: s.refused_disk_full,
            refused_read_only: s.refused_read_only,
            refused_database_failed: s.refused_database_failed,
            write_refusal: s.write_refusal,
            cleanup_pending: s.cleanup_pending,
            write_behind_queue: s.write_behind_queue,
            // The server's own figures (50+) are added by Stats, not kept by the store.
            ..Default::default()
        }
    }
}

// The reverse conversions leave fields the proto does not have yet at their defaults, so the store
// can grow a field before this file catches up; the round-trip test below names any such field.

impl From<StatsResponse> for StoreStats {
    #[allow(clippy::needless_update)]
    fn from(s: StatsResponse) -> Self {
        StoreStats {
            blobs: s.blobs,
            blob_bytes: s.blob_bytes,
            action_results: s.action_results,
            action_result_bytes: s.action_result_bytes,
            used_bytes: s.used_bytes,
            max_size: s.max_size,
            disk_bytes: s.disk_bytes,
            min_retention_secs: s.min_retention_secs,
            evicted_blobs: s.evicted_blobs,
            evicted_bytes: s.evicted_bytes,
            youngest_evicted_age_secs: s.youngest_evicted_age_secs,
            expired_action_results: s.expired_action_results,
            cas_lookups: s.cas_lookups,
            cas_hits: s.cas_hits,
            ac_lookups: s.ac_lookups,
            ac_hits: s.ac_hits,
            refused_writes: s.refused_writes,
            refused_cache_full: s.refused_cache_full,
            refused_too_large: s.refused_too_large,
            refused_disk_full: s.refused_disk_full,
            refused_read_only: s.refused_read_only,
            refused_database_failed: s.refused_database_failed,
            write_refusal: s.write_refusal,
            cleanup_pending: s.cleanup_pending,
            write_behind_queue: s.write_behind_queue,
            ..Default::default()
        }
    }
}

impl From<GcReport> for GcResponse {
    fn from(r: GcReport) -> Self {
        GcResponse {
            evicted_blobs: r.evicted_blobs,
            evicted_bytes: r.evicted_bytes,
            expired_action_results: r.expired_action_results,
            used_bytes: r.used_bytes,
            reached_target: r.reached_target,
        }
    }
}

impl From<GcResponse> for GcReport {
    #[allow(clippy::needless_update)]
    fn from(r: GcResponse) -> Self {
        GcReport {
            evicted_blobs: r.evicted_blobs,
            evicted_bytes: r.evicted_bytes,
            expired_action_results: r.expired_action_results,
            used_bytes: r.used_bytes,
            reached_target: r.reached_target,
            ..Default::default()
        }
    }
}

impl From<VerifyReport> for VerifyResponse {
    fn from(r: VerifyReport) -> Self {
        VerifyResponse {
            checked_blobs: r.checked_blobs,
            checked_bytes: r.checked_bytes,
            corrupt: r.corrupt,
            orphans_removed: r.orphans_removed,
            orphan_bytes_removed: r.orphan_bytes_removed,
        }
    }
}

impl From<VerifyResponse> for VerifyReport {
    #[allow(clippy::needless_update)]
    fn from(r: VerifyResponse) -> Self {
        VerifyReport {
            checked_blobs: r.checked_blobs,
            checked_bytes: r.checked_bytes,
            corrupt: r.corrupt,
            orphans_removed: r.orphans_removed,
            orphan_bytes_removed: r.orphan_bytes_removed,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::de::DeserializeOwned;
    use serde::Serialize;
    use serde_json::{json, Value};

    use super::*;

    /// A report with every field set to something other than its default, found through serde so
    /// that fields added to the store's reports later are covered too.
    fn filled<T: Default + Serialize + DeserializeOwned>() -> T {
        let mut value = serde_json::to_value(T::default()).unwrap();
        let names: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
        for (i, name) in names.iter().enumerate() {
            let n = i as u64 + 1;
            // A `None` does not say what it holds: try a number, then a string.
            let candidates = match &value[name] {
                Value::Bool(_) => vec![json!(true)],
                Value::Number(_) => vec![json!(n)],
                Value::String(_) => vec![json!(format!("{name}-{n}"))],
                Value::Array(_) => vec![json!([format!("{name}-{n}"), "x"]), json!([n, 1])],
                _ => vec![json!(n), json!(format!("{name}-{n}"))],
            };
            let fits = candidates.into_iter().find(|c| {
                let mut trial = value.clone();
                trial[name] = c.clone();
                serde_json::from_value::<T>(trial).is_ok()
            });
            value[name] = fits.unwrap_or_else(|| panic!("cannot fill field {name}"));
        }
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn default_prune_reasons_read_like_the_flag() {
        assert_eq!(idle_text(14 * 86_400), "14d");
        assert_eq!(idle_text(36 * 3600), "36h");
        assert_eq!(idle_text(90 * 60), "90m");
        assert_eq!(idle_text(61), "61s");
    }

    /// `--server` and `--data-dir` print the same report only if every field crosses the proto;
    /// a field the store gained but admin.proto lacks fails here.
    #[test]
    fn every_report_field_survives_the_proto() {
        let stats: StoreStats = filled();
        assert_ne!(stats, StoreStats::default());
        assert_eq!(StoreStats::from(StatsResponse::from(stats.clone())), stats);
        assert_eq!(
            StoreStats::from(StatsResponse::from(StoreStats::default())),
            StoreStats::default()
        );

        let gc: GcReport = filled();
        assert_eq!(GcReport::from(GcResponse::from(gc.clone())), gc);

        let verify: VerifyReport = filled();
        assert_eq!(verify.corrupt.len(), 2);
        assert_eq!(
            VerifyReport::from(VerifyResponse::from(verify.clone())),
            verify
        );
    }
}
