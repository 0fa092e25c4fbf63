//! Action results on a replica: misses and writes go to the upstream (whose namespace policy
//! decides where a result is read from and stored), and what it answers is kept as a local copy.
//!
//! Results are mutable, so copies are only served while they can be trusted: while the watch
//! relay (`relay.rs`) is open, which drops every copy an upstream event may have made stale
//! (a result stored or invalidated for the action, in any namespace; a namespace invalidated or
//! dropped that a copy came from), or within `upstream.ac_max_staleness` of when it last was.
//! After that a lookup asks the upstream again, and fails with UNAVAILABLE if it cannot.
//!
//! A lookup that started before a drop must not store its (possibly older) answer after it:
//! each drop bumps a counter (one of [`DROP_SLOTS`] per action hash, one for whole
//! namespaces); a lookup reads them before asking, and stores its copy only if neither moved,
//! checking again after the write (a namespace sweep may have passed the record) and taking
//! it back if one did. The read-modify-write of an action's record, and the drops of one
//! action, hold that action's stripe lock, so two lookups cannot write back each other's
//! stale entries.
//!
//! Updates are forwarded after pushing upstream any blob the result references that the
//! upstream lacks and this replica holds: FindMissingBlobs here trusts local blobs, so a client
//! may not have uploaded a blob the upstream has since evicted (or a queued write-behind blob
//! not yet uploaded), and a result naming it would be a miss for everyone.
//!
//! Copies live in the local store's action records under one namespace, [`NAMESPACE`], one
//! record per action holding a copy per instance name it was asked under.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use tonic::Code;

use super::{Upstream, UpstreamCas};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::proto::hoard::store::v1::{ReplicaCopies, ReplicaCopy};
use crate::proto::reapi::action_cache_client::ActionCacheClient;
use crate::proto::reapi::{ActionResult, GetActionResultRequest, UpdateActionResultRequest};
use crate::store::{ActionRecord, ActionStore, Cas};

/// The local namespace copies are kept under (not an instance name a client can use: the
/// replica's action cache never reads local namespaces by instance).
pub const NAMESPACE: &str = "hoard.replica-copies";
/// The response header a hoard server names the namespace a hit came from in.
pub const NAMESPACE_HEADER: &str = "hoard-namespace";
const DROP_SLOTS: usize = 4096;
const LOCK_STRIPES: usize = 256;

/// A result as the replica answers it.
pub struct Found {
    pub result: ActionResult,
    /// Where upstream it was found, named as this replica's clients name it (for this
    /// server's own `hoard-namespace` header and read checks); empty if unknown.
    pub source_namespace: String,
    /// Just answered by the upstream (which checked that its blobs are there).
    pub forwarded: bool,
}

/// The replica's action results: upstream calls and local copies.
pub struct ActionCopies {
    upstream: Arc<Upstream>,
    store: Arc<dyn ActionStore>,
    /// The upstream's CAS, and the local one (the fast tier), for pushing what an update needs.
    upstream_cas: Arc<UpstreamCas>,
    local_cas: Arc<dyn Cas>,
    drops: Vec<AtomicU64>,
    namespace_drops: AtomicU64,
    locks: Vec<tokio::sync::Mutex<()>>,
}

/// The drop counters a lookup saw before it asked upstream.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Mark(u64, u64);

impl ActionCopies {
    pub fn new(
        upstream: Arc<Upstream>,
        store: Arc<dyn ActionStore>,
        upstream_cas: Arc<UpstreamCas>,
        local_cas: Arc<dyn Cas>,
    ) -> Self {
        ActionCopies {
            upstream,
            store,
            upstream_cas,
            local_cas,
            drops: (0..DROP_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            namespace_drops: AtomicU64::new(0),
            locks: (0..LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    fn lock(&self, action: &Digest) -> &tokio::sync::Mutex<()> {
        &self.locks[action.hash[2] as usize % LOCK_STRIPES]
    }

    fn slot(&self, action: &Digest) -> &AtomicU64 {
        let i = u16::from_be_bytes([action.hash[0], action.hash[1]]) as usize % DROP_SLOTS;
        &self.drops[i]
    }

    fn mark(&self, action: &Digest) -> Mark {
        Mark(
            self.slot(action).load(Ordering::SeqCst),
            self.namespace_drops.load(Ordering::SeqCst),
        )
    }

    fn client(&self) -> ActionCacheClient<crate::client::Connection> {
        ActionCacheClient::new(self.upstream.channel())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    async fn copies(&self, action: &Digest) -> Result<Option<(ActionRecord, ReplicaCopies)>> {
        let Some(record) = self.store.get(NAMESPACE, action).await? else {
            return Ok(None);
        };
        let copies = ReplicaCopies::decode(record.result.as_ref())
            .map_err(|e| Error::internal(format!("local copies of action {action}"), e))?;
        Ok(Some((record, copies)))
    }

    /// The result for `action` as instance `instance` sees it: a local copy while copies can be
    /// trusted, else the upstream's answer (kept as a copy). `None`: the upstream has none.
    pub async fn get(&self, instance: &str, action: &Digest) -> Result<Option<Found>> {
        let local = self.copies(action).await?;
        let copy = local
            .as_ref()
            .and_then(|(_, c)| c.copies.iter().find(|c| c.instance_name == instance));
        if let Some(copy) = copy {
            if self.upstream.copies_fresh() {
                let result = ActionResult::decode(copy.result.as_ref())
                    .map_err(|e| Error::internal(format!("local copy of action {action}"), e))?;
                return Ok(Some(Found {
                    result,
                    source_namespace: self.upstream.local_namespace(&copy.source_namespace),
                    forwarded: false,
                }));
            }
        }
        self.upstream.check()?;
        let mark = self.mark(action);
        let request = GetActionResultRequest {
            instance_name: self.upstream.instance(instance),
            action_digest: Some(action.to_proto()),
            inline_stdout: false,
            inline_stderr: false,
            inline_output_files: Vec::new(),
            digest_function: 0,
        };
        let reply = match self
            .client()
            .get_action_result(self.upstream.request(request))
            .await
        {
            Ok(reply) => reply,
            Err(s) if s.code() == Code::NotFound => {
                if copy.is_some() {
                    self.drop_action(action).await?;
                }
                return Ok(None);
            }
            Err(s) => return Err(self.upstream.failed("GetActionResult", s)),
        };
        let source_namespace = reply
            .metadata()
            .get(NAMESPACE_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let result = reply.into_inner();
        if let Err(e) = self
            .keep(instance, action, &result, &source_namespace, mark)
            .await
        {
            tracing::warn!(%action, error = %e, "could not keep a local copy of an action result");
        }
        Ok(Some(Found {
            result,
            source_namespace: self.upstream.local_namespace(&source_namespace),
            forwarded: true,
        }))
    }

    /// Stores the copy, then takes it back if a drop came while the upstream was asked.
    async fn keep(
        &self,
        instance: &str,
        action: &Digest,
        result: &ActionResult,
        source_namespace: &str,
        mark: Mark,
    ) -> Result<()> {
        let _locked = self.lock(action).lock().await;
        if self.mark(action) != mark {
            return Ok(());
        }
        let mut copies = self
            .copies(action)
            .await?
            .map(|(_, c)| c)
            .unwrap_or_default();
        copies.copies.retain(|c| c.instance_name != instance);
        copies.copies.push(ReplicaCopy {
            instance_name: instance.to_string(),
            source_namespace: source_namespace.to_string(),
            result: result.encode_to_vec().into(),
            fetched_at_unix_secs: self.store.clock(),
        });
        let record = ActionRecord {
            last_used: self.store.clock() as u32,
            // Never judged invalidated by the local namespace policy: the upstream's events
            // decide.
            epoch: u64::MAX,
            result: Bytes::from(copies.encode_to_vec()),
        };
        self.store.put(NAMESPACE, action, record).await?;
        if self.mark(action) != mark {
            self.store.remove(NAMESPACE, &[*action]).await?;
        }
        Ok(())
    }

    /// Stores `result` upstream (as the upstream's policy decides) and returns what it
    /// stored. The local copies of the action go at once, so this replica's next lookup sees
    /// the new result.
    pub async fn update(
        &self,
        instance: &str,
        action: &Digest,
        result: ActionResult,
        needed: &[Digest],
    ) -> Result<ActionResult> {
        self.upstream.check()?;
        for digest in self.upstream_cas.find_missing(needed).await? {
            if !crate::store::copy_blob(&*self.local_cas, &*self.upstream_cas, &digest).await? {
                tracing::debug!(%action, %digest, "an updated result names a blob nobody holds");
            }
        }
        let request = UpdateActionResultRequest {
            instance_name: self.upstream.instance(instance),
            action_digest: Some(action.to_proto()),
            action_result: Some(result),
            results_cache_policy: None,
            digest_function: 0,
        };
        let stored = self
            .client()
            .update_action_result(self.upstream.request(request))
            .await
            .map_err(|s| self.upstream.failed("UpdateActionResult", s))?
            .into_inner();
        self.drop_action(action).await?;
        Ok(stored)
    }

    /// Drops every copy of `action` (a result was stored or invalidated for it upstream).
    pub async fn drop_action(&self, action: &Digest) -> Result<()> {
        let _locked = self.lock(action).lock().await;
        self.slot(action).fetch_add(1, Ordering::SeqCst);
        self.store.remove(NAMESPACE, &[*action]).await.map(drop)
    }

    /// Drops every copy that came from one of `namespaces` (upstream names), or from a
    /// namespace nobody named: one pass over the copies for a whole burst of events.
    pub async fn drop_namespaces(&self, namespaces: &[String]) -> Result<u64> {
        self.namespace_drops.fetch_add(1, Ordering::SeqCst);
        let stale = |ns: &str, record: &ActionRecord| {
            ns == NAMESPACE
                && ReplicaCopies::decode(record.result.as_ref()).map_or(true, |copies| {
                    copies.copies.iter().any(|c| {
                        c.source_namespace.is_empty() || namespaces.contains(&c.source_namespace)
                    })
                })
        };
        self.store.sweep(&stale).await
    }

    /// Drops every copy (the relay lost events: nothing local can be trusted).
    pub async fn drop_all(&self) -> Result<u64> {
        self.namespace_drops.fetch_add(1, Ordering::SeqCst);
        self.store.remove_namespace(NAMESPACE).await
    }

    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }
}
