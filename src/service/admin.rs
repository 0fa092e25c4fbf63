//! `hoard.admin.v1.Admin`: stats, gc and verify of a running server, for `hoard stats|gc|verify
//! --server`. Each call is one store call; the conversions here are also what the CLI uses to
//! turn a reply back into the store's report, so both modes print the same thing.

use std::sync::Arc;

use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::proto::admin::{
    admin_server::Admin, GcRequest, GcResponse, StatsRequest, StatsResponse, VerifyRequest,
    VerifyResponse,
};
use crate::store::{GcReport, Store, StoreStats, VerifyReport};

pub struct AdminService {
    store: Arc<dyn Store>,
    /// Held by a running gc or verify: both walk the whole store, and a second pass at the same
    /// time would only double the I/O.
    maintenance: Mutex<()>,
}

impl AdminService {
    pub fn new(store: Arc<dyn Store>) -> Self {
        AdminService {
            store,
            maintenance: Mutex::new(()),
        }
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

#[tonic::async_trait]
impl Admin for AdminService {
    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let stats = self.store.stats().await?;
        Ok(Response::new(stats.into()))
    }

    async fn gc(&self, request: Request<GcRequest>) -> Result<Response<GcResponse>, Status> {
        let target = request.into_inner().target_bytes;
        let _running = self.begin_maintenance("gc")?;
        match target {
            Some(t) => tracing::info!(target_bytes = t, "gc requested"),
            None => tracing::info!("gc requested (down to the low watermark)"),
        }
        let report = self.store.gc(target).await?;
        tracing::info!(?report, "gc finished");
        Ok(Response::new(report.into()))
    }

    async fn verify(&self, _: Request<VerifyRequest>) -> Result<Response<VerifyResponse>, Status> {
        let _running = self.begin_maintenance("verify")?;
        tracing::info!("verify requested");
        let report = self.store.verify().await?;
        tracing::info!(
            checked_blobs = report.checked_blobs,
            corrupt = report.corrupt.len(),
            orphans_removed = report.orphans_removed,
            "verify finished"
        );
        Ok(Response::new(report.into()))
    }
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
            write_refusal: s.write_refusal,
            cleanup_pending: s.cleanup_pending,
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
            write_refusal: s.write_refusal,
            cleanup_pending: s.cleanup_pending,
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
