//! The invalidation workflow, one for every front (the Admin service today; webhooks and
//! replicas later): serialize, change the store, announce each change on the watch log, and
//! return once the announcements are durable.
//!
//! The store change comes first and is durable when it returns, so a watcher never hears of an
//! invalidation a crash could undo; changes are serialized, so events follow their order (two
//! bumps of one namespace never announce epoch 3 before 2); the caller's reply names sequences
//! that survive a crash. Requests are validated by the front, which also says who asked: the
//! caller is named in every event and log line (the audit trail).

use std::sync::Arc;

use tokio::sync::Mutex;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::metrics::{Invalidated, Metrics};
use crate::namespace::{glob_match, ActionResults};
use crate::proto::admin::{InvalidatedNamespace, PrunedNamespace};
use crate::store::NamespaceInfo;
use crate::watch::{Event, EventLog};

/// What to invalidate.
pub enum Target<'a> {
    /// The listed action results of one namespace.
    Actions(&'a str, &'a [Digest]),
    /// All of one namespace (an epoch bump).
    Namespace(&'a str),
    /// Every known namespace whose name matches the pattern.
    Pattern(&'a str),
}

/// Invalidates and prunes namespaces, announcing every change.
pub struct Invalidation {
    results: Arc<ActionResults>,
    events: Arc<EventLog>,
    /// Held while a change is made and announced.
    serial: Mutex<()>,
    /// Each change counted (`hoard_invalidations_total`).
    metrics: Arc<Metrics>,
    /// On a replica, the upstream: changes are made there (and relayed back), never here.
    replica_of: Option<String>,
}

impl Invalidation {
    pub fn new(results: Arc<ActionResults>, events: Arc<EventLog>, metrics: Arc<Metrics>) -> Self {
        Invalidation {
            results,
            events,
            serial: Mutex::new(()),
            metrics,
            replica_of: None,
        }
    }

    /// On a replica: refuses every change, naming the upstream to make it at.
    pub fn on_replica_of(mut self, upstream: &str) -> Self {
        self.replica_of = Some(upstream.to_string());
        self
    }

    fn refuse_on_replica(&self) -> Result<()> {
        match &self.replica_of {
            Some(upstream) => Err(crate::error::Error::FailedPrecondition(format!(
                "this server is a replica of {upstream}: invalidate and prune there; the \
                 change reaches this replica through its watch relay"
            ))),
            None => Ok(()),
        }
    }

    /// The clock namespaces' last uses are measured by (Unix seconds).
    pub fn clock(&self) -> u64 {
        self.results.clock()
    }

    /// Known namespaces whose names match `pattern` (all of them for "").
    pub fn matching(&self, pattern: &str) -> Vec<NamespaceInfo> {
        let mut all = self.results.namespaces();
        if !pattern.is_empty() {
            all.retain(|ns| glob_match(pattern, &ns.name));
        }
        all
    }

    /// Invalidates `target` on behalf of `caller` (named in the events and the log, see
    /// `crate::auth::Caller::name`), recording `reason`; `peer` is for the log.
    pub async fn invalidate(
        &self,
        target: Target<'_>,
        reason: &str,
        caller: &str,
        peer: &str,
    ) -> Result<Vec<InvalidatedNamespace>> {
        self.refuse_on_replica()?;
        let _serial = self.serial.lock().await;
        let mut done = Vec::new();
        match target {
            Target::Actions(name, actions) => {
                done.push(
                    self.invalidate_actions(name, actions, reason, caller, peer)
                        .await?,
                );
                self.metrics.invalidation(Invalidated::Actions);
            }
            Target::Namespace(name) => {
                done.push(
                    self.invalidate_namespace(name, reason, caller, peer)
                        .await?,
                );
                self.metrics.invalidation(Invalidated::Namespace);
            }
            Target::Pattern(pattern) => {
                let names: Vec<String> = self
                    .matching(pattern)
                    .into_iter()
                    .map(|ns| ns.name)
                    .collect();
                tracing::info!(
                    pattern,
                    matched = names.len(),
                    reason,
                    caller,
                    peer,
                    "invalidating the namespaces matching a pattern"
                );
                for name in &names {
                    match self.invalidate_namespace(name, reason, caller, peer).await {
                        Ok(one) => {
                            self.metrics.invalidation(Invalidated::Namespace);
                            done.push(one)
                        }
                        // The ones before stay invalidated (and announced): say which.
                        Err(e) => {
                            let before: Vec<&str> = done.iter().map(|d| d.name.as_str()).collect();
                            return Err(Error::internal(
                                format!(
                                    "invalidating {name:?} (after invalidating {before:?} of the \
                                     {} namespaces matching {pattern:?})",
                                    names.len()
                                ),
                                e,
                            ));
                        }
                    }
                }
            }
        }
        Ok(done)
    }

    /// Drops the namespaces matching `pattern` unused for `idle_secs` or more (only lists
    /// them if `dry_run`) on behalf of `caller`, recording `reason`.
    pub async fn prune(
        &self,
        pattern: &str,
        idle_secs: u64,
        reason: &str,
        dry_run: bool,
        caller: &str,
        peer: &str,
    ) -> Result<Vec<PrunedNamespace>> {
        self.prune_unless(pattern, idle_secs, reason, dry_run, caller, peer, &|_| {
            false
        })
        .await
    }

    /// The scheduled prune (`namespaces.prune_idle_after`): every namespace idle for
    /// `idle_secs`, except those a `protected` pattern matches.
    pub async fn prune_idle(
        &self,
        idle_secs: u64,
        protected: &[String],
    ) -> Result<Vec<PrunedNamespace>> {
        let reason = format!(
            "idle for {} (namespaces.prune_idle_after)",
            crate::service::admin::idle_text(idle_secs)
        );
        let keep = |name: &str| protected.iter().any(|p| glob_match(p, name));
        self.prune_unless("", idle_secs, &reason, false, "hoard", "schedule", &keep)
            .await
    }

    /// Drops every namespace matching `pattern`, however recently used, except those a
    /// `protected` pattern matches (a deleted branch's namespace, from a webhook).
    pub async fn prune_except(
        &self,
        pattern: &str,
        reason: &str,
        caller: &str,
        peer: &str,
        protected: &[String],
    ) -> Result<Vec<PrunedNamespace>> {
        let keep = |name: &str| protected.iter().any(|p| glob_match(p, name));
        self.prune_unless(pattern, 0, reason, false, caller, peer, &keep)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn prune_unless(
        &self,
        pattern: &str,
        idle_secs: u64,
        reason: &str,
        dry_run: bool,
        caller: &str,
        peer: &str,
        keep: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Vec<PrunedNamespace>> {
        self.refuse_on_replica()?;
        let _serial = self.serial.lock().await;
        let now = self.clock();
        // A namespace used between this listing and its drop is dropped all the same; its
        // results are then computed again, which a cache may always ask of its clients.
        let idle: Vec<NamespaceInfo> = self
            .matching(pattern)
            .into_iter()
            .filter(|ns| now.saturating_sub(ns.last_used) >= idle_secs && !keep(&ns.name))
            .collect();
        tracing::info!(
            idle_seconds = idle_secs,
            pattern,
            matched = idle.len(),
            dry_run,
            reason,
            caller,
            peer,
            "pruning idle namespaces"
        );
        let mut pruned = Vec::with_capacity(idle.len());
        for ns in idle {
            let mut one = PrunedNamespace {
                name: ns.name,
                last_used_unix_secs: ns.last_used,
                removed: 0,
                event_sequence: 0,
            };
            if !dry_run {
                let name = one.name.as_str();
                one.removed = self.results.drop_namespace(name).await?;
                tracing::info!(
                    namespace = name,
                    removed = one.removed,
                    reason,
                    caller,
                    peer,
                    "namespace dropped"
                );
                let change = format!("namespace {name:?} was dropped");
                one.event_sequence = self
                    .announce_one(Event::namespace_dropped(name, reason, caller), &change)
                    .await?;
                self.metrics.invalidation(Invalidated::Dropped);
            }
            pruned.push(one);
        }
        Ok(pruned)
    }

    /// Invalidates `actions` of `name`: one store call, then one event per action.
    async fn invalidate_actions(
        &self,
        name: &str,
        actions: &[Digest],
        reason: &str,
        caller: &str,
        peer: &str,
    ) -> Result<InvalidatedNamespace> {
        let removed = self.results.remove(name, actions).await?;
        tracing::info!(
            namespace = name,
            actions = actions.len(),
            removed,
            reason,
            caller,
            peer,
            "action results invalidated"
        );
        let change = format!(
            "{} actions of namespace {name:?} were invalidated",
            actions.len()
        );
        let events = actions
            .iter()
            .map(|a| Event::action_invalidated(name, *a, reason, caller))
            .collect();
        let event_sequences = self.announce(events, &change).await?;
        Ok(InvalidatedNamespace {
            name: name.to_string(),
            epoch: 0,
            removed,
            event_sequences,
        })
    }

    /// Bumps the epoch of `name`, then announces it.
    async fn invalidate_namespace(
        &self,
        name: &str,
        reason: &str,
        caller: &str,
        peer: &str,
    ) -> Result<InvalidatedNamespace> {
        let epoch = self.results.bump_epoch(name, reason).await?;
        tracing::info!(
            namespace = name,
            epoch,
            reason,
            caller,
            peer,
            "namespace invalidated"
        );
        let change = format!("namespace {name:?} was invalidated (epoch {epoch})");
        let seq = self
            .announce_one(
                Event::namespace_invalidated(name, epoch, reason, caller),
                &change,
            )
            .await?;
        Ok(InvalidatedNamespace {
            name: name.to_string(),
            epoch,
            removed: 0,
            event_sequences: vec![seq],
        })
    }

    /// Publishes the events of a change the store has already made durable, and returns
    /// their sequences once they survive a crash (the reply names them).
    async fn announce(&self, events: Vec<Event>, change: &str) -> Result<Vec<u64>> {
        self.events.announce(events).await.map_err(|e| match e {
            Error::Unavailable(why) => Error::Unavailable(format!(
                "{change}, but its watch event is not recorded yet: {why}"
            )),
            e => Error::internal(
                format!("{change}, but its watch event could not be recorded"),
                e,
            ),
        })
    }

    async fn announce_one(&self, event: Event, change: &str) -> Result<u64> {
        let sequences = self.announce(vec![event], change).await?;
        sequences
            .first()
            .copied()
            .ok_or_else(|| Error::internal(change.to_string(), "no sequence for its event"))
    }
}
