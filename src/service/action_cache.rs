//! `ActionCache`: action results per instance name.
//!
//! Results are served only while every blob they reference is still in the CAS; otherwise Bazel
//! would fail mid-build with "lost inputs". Small outputs are inlined on request. The namespace
//! policy decides which namespaces a lookup tries (the instance, then e.g. `ci/main`) and where an
//! update is stored.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use tonic::{Request, Response, Status};

use super::Limits;
use crate::auth::{Access, Caller};
use crate::digest::{self, Digest};
use crate::error::{Error, Result};
use crate::instance_name;
use crate::metrics::Metrics;
use crate::namespace::ActionResults;
use crate::proto::reapi::{
    action_cache_server::ActionCache, ActionResult, GetActionResultRequest, Tree,
    UpdateActionResultRequest,
};
use crate::store::Cas;
use crate::telemetry;
use crate::upstream::ActionCopies;
use crate::watch::{Event, EventLog};

pub struct ActionCacheService {
    /// Where the blobs results reference are checked and read (for inlining).
    cas: Arc<dyn Cas>,
    /// Results as namespaces see them; also the read chains and write targets.
    results: Arc<ActionResults>,
    limits: Limits,
    /// Where stored results are announced (ACTION_RESULT_STORED), if watching is wired up.
    events: Option<Arc<EventLog>>,
    /// AC lookups and hits per namespace.
    metrics: Arc<Metrics>,
    /// On a replica: results come from the upstream (and its local copies), not `results`.
    replica: Option<Arc<ActionCopies>>,
}

impl ActionCacheService {
    pub fn new(
        cas: Arc<dyn Cas>,
        results: Arc<ActionResults>,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Self {
        ActionCacheService {
            cas,
            results,
            limits,
            events: None,
            metrics,
            replica: None,
        }
    }

    /// Serves results through the upstream of a replica (`[upstream]`).
    pub fn with_replica(mut self, copies: Arc<ActionCopies>) -> Self {
        self.replica = Some(copies);
        self
    }

    /// Publishes an ACTION_RESULT_STORED event for every result stored.
    pub fn with_events(mut self, events: Arc<EventLog>) -> Self {
        self.events = Some(events);
        self
    }

    /// The result stored for `action` in namespace `ns` if it can be served: `Err(None)` if there
    /// is none, `Err(Some(why))` if there is one that cannot be served (outputs evicted, ...).
    async fn servable(
        &self,
        ns: &str,
        action: &Digest,
    ) -> Result<Result<ActionResult, Option<String>>> {
        let Some(bytes) = self.results.get(ns, action).await? else {
            return Ok(Err(None));
        };
        let result = ActionResult::decode(bytes.as_ref())
            .map_err(|e| Error::internal(format!("stored action result of {action}"), e))?;
        self.complete(ns, action, result).await
    }

    /// `result` if every blob it references is in the CAS, else why not.
    async fn complete(
        &self,
        ns: &str,
        action: &Digest,
        result: ActionResult,
    ) -> Result<Result<ActionResult, Option<String>>> {
        let needed = match self.referenced_blobs(&result).await? {
            Ok(needed) => needed,
            Err(why) => {
                tracing::warn!(%action, ns, why, "stored action result cannot be served");
                return Ok(Err(Some(why)));
            }
        };
        let missing = self.cas.find_missing(&needed).await?;
        if let Some(m) = missing.first() {
            tracing::debug!(%action, ns, missing = %m, "action result is incomplete");
            return Ok(Err(Some(format!(
                "it references blob {m}, which is no longer in the CAS"
            ))));
        }
        Ok(Ok(result))
    }

    /// Every CAS blob the result needs, including the files inside output directory trees.
    /// `Err(why)` if the result cannot be served at all (a tree that is too large, not a Tree,
    /// or names malformed digests): the client should treat it as a miss and run the action.
    async fn referenced_blobs(&self, result: &ActionResult) -> Result<Result<Vec<Digest>, String>> {
        let (mut blobs, trees) = direct_digests(result)?;
        for t in trees {
            blobs.push(t);
            if t.size > self.limits.max_message_size {
                return Ok(Err(format!("its output tree {t} is larger than a message")));
            }
            let Some(bytes) = self.cas.get(&t).await? else {
                continue; // reported missing by the caller
            };
            let Ok(tree) = Tree::decode(bytes.as_ref()) else {
                return Ok(Err(format!("its output tree {t} is not a Tree")));
            };
            for dir in tree.root.iter().chain(tree.children.iter()) {
                for f in &dir.files {
                    match Digest::from_proto(f.digest.as_ref(), "tree file digest") {
                        Ok(d) => blobs.push(d),
                        Err(e) => return Ok(Err(format!("its output tree {t}: {e}"))),
                    }
                }
            }
        }
        Ok(Ok(blobs))
    }

    /// Fills `stdout_raw`, `stderr_raw` and output file `contents` as asked, within the batch
    /// size budget (the spec lets a server inline less than asked, never more than fits).
    async fn inline(
        &self,
        result: &mut ActionResult,
        request: &GetActionResultRequest,
    ) -> Result<()> {
        // The whole reply must fit clients' message limit, not just the inlined bytes.
        let mut budget = self
            .limits
            .max_batch_total_size
            .saturating_sub(result.encoded_len() as u64);
        let mut take = |d: &Option<crate::proto::reapi::Digest>| -> Option<Digest> {
            let d = Digest::from_proto(d.as_ref(), "digest").ok()?;
            if d.size > budget {
                return None;
            }
            budget -= d.size;
            Some(d)
        };
        if request.inline_stdout && result.stdout_raw.is_empty() {
            if let Some(d) = take(&result.stdout_digest) {
                result.stdout_raw = self.cas.get(&d).await?.unwrap_or_default();
            }
        }
        if request.inline_stderr && result.stderr_raw.is_empty() {
            if let Some(d) = take(&result.stderr_digest) {
                result.stderr_raw = self.cas.get(&d).await?.unwrap_or_default();
            }
        }
        for f in result.output_files.iter_mut() {
            if request.inline_output_files.contains(&f.path) && f.contents.is_empty() {
                if let Some(d) = take(&f.digest) {
                    f.contents = self.cas.get(&d).await?.unwrap_or_default();
                }
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        instance_name::validate(&r.instance_name)?;
        telemetry::record_namespace(&r.instance_name);
        caller.require(Access::Read, &r.instance_name)?;
        digest::check_function(r.digest_function)?;
        let action = Digest::from_proto(r.action_digest.as_ref(), "action_digest")?;
        telemetry::record_digest(&action);
        if let Some(copies) = &self.replica {
            return self
                .get_through_upstream(copies, &caller, &r, &action)
                .await;
        }
        // The first namespace in the chain with a servable result wins; an incomplete one (its
        // outputs evicted) does not hide a complete one further down the chain.
        // Namespaces further down the chain count only where the caller may read them too.
        let mut chain = self.results.policy().read_chain(&r.instance_name);
        chain.retain(|ns| caller.may(Access::Read, ns));
        let mut why_not = Vec::new();
        for ns in &chain {
            match self.servable(ns, &action).await? {
                Ok(mut result) => {
                    self.inline(&mut result, &r).await?;
                    self.metrics.ac_lookup(&r.instance_name, true);
                    return Ok(with_namespace(Response::new(result), ns));
                }
                Err(Some(why)) => why_not.push(format!("in {ns:?}: {why}")),
                Err(None) => {}
            }
        }
        self.metrics.ac_lookup(&r.instance_name, false);
        let looked = chain
            .iter()
            .map(|n| format!("{n:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut message = format!("no action result for action {action} in instance {looked}");
        if !why_not.is_empty() {
            message = format!("{message} that can be served ({})", why_not.join("; "));
        }
        Err(Error::NotFound(message).into())
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        instance_name::validate(&r.instance_name)?;
        telemetry::record_namespace(&r.instance_name);
        digest::check_function(r.digest_function)?;
        let action = Digest::from_proto(r.action_digest.as_ref(), "action_digest")?;
        telemetry::record_digest(&action);
        // Who may not even read the instance learns nothing about it.
        caller.require(Access::Read, &r.instance_name)?;
        let Some(target) = self.results.policy().write_target(&r.instance_name) else {
            return Err(Error::PermissionDenied(format!(
                "instance {:?} is read-only (namespaces config: write = \"none\"); its action \
                 results cannot be updated",
                r.instance_name
            ))
            .into());
        };
        if self.replica.is_none() {
            caller.require_through(Access::Write, target, &r.instance_name)?;
        } else {
            caller.require(Access::Write, &r.instance_name)?;
        }
        let result = r
            .action_result
            .ok_or_else(|| Error::InvalidArgument("action_result is missing".into()))?;
        // Reject digests that could never be satisfied, so a bad entry never reaches a build.
        direct_digests(&result)?;
        // Our ActionResult models every upstream field, so re-encoding keeps all the client sent.
        let encoded = Bytes::from(result.encode_to_vec());
        // Never store an entry a client with the default 4 MiB receive limit could not fetch.
        let limit = self.limits.max_batch_total_size;
        if encoded.len() as u64 > limit {
            return Err(Error::InvalidArgument(format!(
                "action result for {action} is {} bytes encoded, above the {limit} bytes this \
                 server stores per result (max_batch_total_size_bytes in GetCapabilities); put \
                 large stdout, stderr and output contents in the CAS and reference them by digest",
                encoded.len()
            ))
            .into());
        }
        if let Some(copies) = &self.replica {
            // The upstream's policy decides where it goes; its watch event comes back through
            // the relay.
            // What it references, for pushing upstream whatever the upstream lacks.
            let needed = match self.referenced_blobs(&result).await? {
                Ok(needed) => needed,
                Err(_) => direct_digests(&result)?.0,
            };
            let stored = copies
                .update(&r.instance_name, &action, result, &needed)
                .await?;
            return Ok(Response::new(stored));
        }
        // Recorded with the result: who wrote it and through which instance (provenance).
        self.results
            .put(target, &action, encoded, caller.name(), &r.instance_name)
            .await?;
        if let Some(events) = &self.events {
            // Not waiting for the event's fsync: watchers get it after the next group commit.
            events.publish(Event::action_result_stored(target, action, caller.name()))?;
        }
        Ok(Response::new(result))
    }
}

impl ActionCacheService {
    /// GetActionResult on a replica: the local copy or the upstream's answer, served only if
    /// complete here (its blobs locally or upstream), named by the namespace it came from.
    async fn get_through_upstream(
        &self,
        copies: &ActionCopies,
        caller: &Caller,
        r: &GetActionResultRequest,
        action: &Digest,
    ) -> Result<Response<ActionResult>, Status> {
        let Some(found) = copies.get(&r.instance_name, action).await? else {
            self.metrics.ac_lookup(&r.instance_name, false);
            return Err(Error::NotFound(format!(
                "no action result for action {action} in instance {:?} (upstream {})",
                r.instance_name,
                copies.upstream().uri()
            ))
            .into());
        };
        // Found further down the upstream's read chain: only for a caller who may read there
        // too, as the upstream itself would decide for that caller.
        if !found.source_namespace.is_empty() && !caller.may(Access::Read, &found.source_namespace)
        {
            self.metrics.ac_lookup(&r.instance_name, false);
            return Err(Error::NotFound(format!(
                "no action result for action {action} in instance {:?} that this caller may read",
                r.instance_name
            ))
            .into());
        }
        // The upstream just checked that its blobs are there (and every one of them is
        // readable through here); a local copy is checked like any result.
        let complete = match found.forwarded {
            true => Ok(found.result),
            false => {
                self.complete(&r.instance_name, action, found.result)
                    .await?
            }
        };
        match complete {
            Ok(mut result) => {
                self.inline(&mut result, r).await?;
                self.metrics.ac_lookup(&r.instance_name, true);
                Ok(with_namespace(
                    Response::new(result),
                    &found.source_namespace,
                ))
            }
            Err(why) => {
                self.metrics.ac_lookup(&r.instance_name, false);
                Err(Error::NotFound(format!(
                    "the action result for action {action} in instance {:?} cannot be served: {}",
                    r.instance_name,
                    why.unwrap_or_default()
                ))
                .into())
            }
        }
    }
}

/// Names the namespace a hit came from (`hoard-namespace`), so a replica in front of this
/// server can tell which of its copies an invalidation of that namespace makes stale.
fn with_namespace(mut response: Response<ActionResult>, namespace: &str) -> Response<ActionResult> {
    if !namespace.is_empty() {
        if let Ok(value) = namespace.parse() {
            response
                .metadata_mut()
                .insert(crate::upstream::NAMESPACE_HEADER, value);
        }
    }
    response
}

/// The blobs an action result names directly: (stdout, stderr and output files; output directory
/// trees). Fails on a malformed digest, naming the field.
fn direct_digests(result: &ActionResult) -> Result<(Vec<Digest>, Vec<Digest>)> {
    let mut blobs = Vec::with_capacity(result.output_files.len() + 2);
    for (d, what) in [
        (&result.stdout_digest, "stdout_digest"),
        (&result.stderr_digest, "stderr_digest"),
    ] {
        if d.is_some() {
            blobs.push(Digest::from_proto(d.as_ref(), what)?);
        }
    }
    for f in &result.output_files {
        let what = format!("output file {:?} digest", f.path);
        blobs.push(Digest::from_proto(f.digest.as_ref(), &what)?);
    }
    let trees = result
        .output_directories
        .iter()
        .map(|d| {
            let what = format!("output directory {:?} tree_digest", d.path);
            Digest::from_proto(d.tree_digest.as_ref(), &what)
        })
        .collect::<Result<_>>()?;
    Ok((blobs, trees))
}
