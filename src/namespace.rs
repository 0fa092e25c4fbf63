//! Namespaces: the policy over instance names, above every backend.
//!
//! A REAPI instance name is a namespace with its own action cache (CAS content is shared,
//! being addressed by content). This module decides, for every backend alike:
//! - which namespaces an instance reads (itself, then e.g. `ci/main`) and where its writes go
//!   ([`Policy`], from the `[namespaces]` config, matched by [`glob_match`]);
//! - whether a stored action result is still visible ([`ActionResults`]): stored under the
//!   namespace's current epoch (an invalidation bumps it: O(1), whatever the namespace holds)
//!   and used within the namespace's TTL. Backends only keep records ([`ActionStore`]); a
//!   background sweep reclaims what this module judges dead;
//! - who wrote a result, when and through which instance name ([`Provenance`]): each record's
//!   bytes are a `hoard.store.v1.StoredActionResult` wrapping the encoded `ActionResult`, so
//!   backends stay ignorant of it.
//!
//! Epochs are saved durably when they change; last-use times of namespaces in memory, written
//! once a minute and at shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::RwLock;
use prost::Message;

use crate::config::{NamespaceRule, NamespacesConfig};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::proto::records::StoredActionResult;
use crate::store::{ActionRecord, ActionStore, GcReport, Housekeeping, NamespaceInfo, StoreStats};

/// How often last uses of namespaces are written.
const PERSIST_EVERY: Duration = Duration::from_secs(60);
/// How often dead action results (invalidated, or past their TTL) are swept away.
const SWEEP_EVERY: Duration = Duration::from_secs(600);

/// Read chains and write targets per instance name (the `[namespaces]` config).
#[derive(Clone, Debug, Default)]
pub struct Policy {
    config: NamespacesConfig,
}

impl Policy {
    pub fn new(config: &NamespacesConfig) -> Self {
        Policy {
            config: config.clone(),
        }
    }

    /// The first rule matching an instance name.
    pub fn rule(&self, instance: &str) -> Option<&NamespaceRule> {
        self.config
            .rules
            .iter()
            .find(|r| glob_match(&r.pattern, instance))
    }

    /// How long an action result of `instance` lives after its last use (zero: until its
    /// outputs are evicted).
    pub fn ac_ttl(&self, instance: &str) -> Duration {
        self.rule(instance)
            .and_then(|r| r.ac_ttl)
            .unwrap_or(self.config.default.ac_ttl)
            .0
    }

    /// The namespaces an instance's action-cache lookups try, in order: itself first, then its
    /// rule's `read` list (without repeats).
    pub fn read_chain<'a>(&'a self, instance: &'a str) -> Vec<&'a str> {
        let extra = match self.rule(instance).and_then(|r| r.read.as_ref()) {
            Some(read) => read,
            None => &self.config.default.read,
        };
        let mut chain = vec![instance];
        for name in extra {
            if !chain.contains(&name.as_str()) {
                chain.push(name);
            }
        }
        chain
    }

    /// The namespace whose write grant a CAS upload through `instance` needs: where the
    /// instance's results go (so a caller who may store its results may upload their
    /// outputs), or the instance itself when it is read-only.
    pub fn upload_namespace<'a>(&'a self, instance: &'a str) -> &'a str {
        self.write_target(instance).unwrap_or(instance)
    }

    /// Where an instance's action results are stored; `None` if it is read-only.
    pub fn write_target<'a>(&'a self, instance: &'a str) -> Option<&'a str> {
        let write = match self.rule(instance).and_then(|r| r.write.as_ref()) {
            Some(w) => w,
            None => &self.config.default.write,
        };
        match write.as_str() {
            "self" => Some(instance),
            "none" => None,
            other => Some(other),
        }
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters (including `/`).
///
/// Hand-written rather than taken from a glob crate (`glob`, `globset`, `wildmatch`): here `*`
/// is the only wildcard, while those crates also read `?` (and `[...]`, or `{a,b}`) as one.
/// Patterns are checked by `instance_name::validate_pattern`, which refuses those characters,
/// so a pattern never means more than it says. It is twenty lines.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no '*': exact match
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// A full or read-only disk is reported by the store already; upkeep just tries again later.
fn log_upkeep_failure(what: &str, e: &Error) {
    match e {
        Error::StorageFull(_) | Error::StorageUnwritable(_) => {
            tracing::debug!(error = %e, "{what} waits for a writable disk")
        }
        _ => tracing::warn!(error = %e, "{what} failed"),
    }
}

/// One namespace's state in memory.
struct State {
    epoch: u64,
    last_used: AtomicU32,
    invalidated_at: u64,
    reason: String,
}

impl State {
    fn new(now: u32) -> Self {
        State {
            epoch: 0,
            last_used: AtomicU32::new(now),
            invalidated_at: 0,
            reason: String::new(),
        }
    }

    fn info(&self, name: &str) -> NamespaceInfo {
        NamespaceInfo {
            name: name.to_string(),
            epoch: self.epoch,
            last_used: self.last_used.load(Relaxed) as u64,
            invalidated_at: (self.invalidated_at > 0).then_some(self.invalidated_at),
            reason: (!self.reason.is_empty()).then(|| self.reason.clone()),
        }
    }
}

/// Who stored a visible action result, when, and where a lookup finds it: the audit trail for
/// a poisoned entry (`hoard provenance`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provenance {
    /// The namespace of the instance's read chain that holds the result.
    pub namespace: String,
    /// That namespace's current epoch (the result was stored under it, or it would be invisible).
    pub epoch: u64,
    /// The authenticated caller that stored it (`anonymous` without authentication).
    pub writer: String,
    /// The instance name its update came through.
    pub instance_name: String,
    /// When it was stored, on the store's clock (Unix seconds).
    pub stored_at: u64,
}

/// Action results as namespaces see them, over any [`ActionStore`]: lookups see only results
/// stored under the namespace's current epoch and used within its TTL; updates are stamped
/// with both. Also where invalidation changes things (`crate::invalidation` drives it).
pub struct ActionResults {
    store: Arc<dyn ActionStore>,
    policy: Arc<Policy>,
    /// Every namespace with results or an invalidation, loaded at start.
    states: RwLock<HashMap<String, State>>,
    /// Last-use times changed since they were last saved.
    dirty: AtomicBool,
    /// Held from reading a namespace's state to saving it: a save of an older state (a
    /// periodic persist, a first sight) must never land after a newer one (an epoch bump) and
    /// undo it, nor a dropped namespace be saved back.
    saving: tokio::sync::Mutex<()>,
    lookups: AtomicU64,
    hits: AtomicU64,
    /// Results dropped as dead (past their TTL on a lookup; dead by any rule in a sweep).
    expired: AtomicU64,
}

impl ActionResults {
    /// Loads the namespace records of `store`.
    pub async fn open(store: Arc<dyn ActionStore>, policy: Arc<Policy>) -> Result<Self> {
        let states = store
            .namespace_records()
            .await?
            .into_iter()
            .map(|info| {
                let state = State {
                    epoch: info.epoch,
                    last_used: AtomicU32::new(info.last_used as u32),
                    invalidated_at: info.invalidated_at.unwrap_or(0),
                    reason: info.reason.unwrap_or_default(),
                };
                (info.name, state)
            })
            .collect();
        Ok(ActionResults {
            store,
            policy,
            states: RwLock::new(states),
            dirty: AtomicBool::new(false),
            saving: tokio::sync::Mutex::new(()),
            lookups: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            expired: AtomicU64::new(0),
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The store's clock in Unix seconds (what `last_used` is measured by).
    pub fn clock(&self) -> u64 {
        self.store.clock()
    }

    fn now(&self) -> u32 {
        self.clock().min(u32::MAX as u64) as u32
    }

    /// The current epoch of `namespace` (0 if never invalidated), recording a use. A namespace
    /// seen for the first time gets a record, so it can be listed and pruned.
    async fn epoch_and_touch(&self, namespace: &str, now: u32) -> Result<u64> {
        if let Some(s) = self.states.read().get(namespace) {
            if s.last_used.load(Relaxed) < now {
                s.last_used.store(now, Relaxed);
                self.dirty.store(true, Relaxed);
            }
            return Ok(s.epoch);
        }
        let _saving = self.saving.lock().await;
        let info = self.change_state(namespace, now, |_| {});
        // Saved with the result's own durable write that follows (same database).
        self.store
            .save_namespaces(std::slice::from_ref(&info), false)
            .await?;
        Ok(info.epoch)
    }

    /// Applies `change` to the state of `namespace` (new if it has none) and returns the result.
    /// Callers hold `saving` until they have saved it.
    fn change_state(
        &self,
        namespace: &str,
        now: u32,
        change: impl FnOnce(&mut State),
    ) -> NamespaceInfo {
        let mut states = self.states.write();
        let state = states
            .entry(namespace.to_string())
            .or_insert_with(|| State::new(now));
        change(state);
        state.info(namespace)
    }

    /// The current epoch of `namespace`, without recording a use.
    fn epoch(&self, namespace: &str) -> u64 {
        self.states.read().get(namespace).map_or(0, |s| s.epoch)
    }

    /// Whether a record is dead at `now` under a TTL of `ttl` seconds (0: none) since last use.
    fn expired(ttl: u64, record: &ActionRecord, now: u32) -> bool {
        ttl > 0 && now.saturating_sub(record.last_used) as u64 > ttl
    }

    /// The wrapper in a record's bytes; `None` (logged) if they are not one, which only a bug
    /// or damage could cause: such a record is treated as absent, never served.
    fn stored_of(
        namespace: &str,
        action: &Digest,
        record: &ActionRecord,
    ) -> Option<StoredActionResult> {
        match StoredActionResult::decode(record.result.clone()) {
            Ok(stored) => Some(stored),
            Err(e) => {
                tracing::warn!(namespace, %action, error = %e, "an action record is not a StoredActionResult; treated as absent");
                None
            }
        }
    }

    /// The encoded `ActionResult` stored for `action` in `namespace`, if it is visible.
    pub async fn get(&self, namespace: &str, action: &Digest) -> Result<Option<Bytes>> {
        self.lookups.fetch_add(1, Relaxed);
        let Some(record) = self.visible(namespace, action).await? else {
            return Ok(None);
        };
        let Some(stored) = Self::stored_of(namespace, action, &record) else {
            self.store.replace(namespace, action, &record, None).await?;
            return Ok(None);
        };
        self.hits.fetch_add(1, Relaxed);
        Ok(Some(stored.result))
    }

    /// The record stored under `key` in `namespace` if it is visible (current epoch, within
    /// its TTL since last use), renewing its last use; a dead one is reclaimed on sight.
    async fn visible(&self, namespace: &str, key: &Digest) -> Result<Option<ActionRecord>> {
        let Some(record) = self.store.get(namespace, key).await? else {
            return Ok(None);
        };
        let now = self.now();
        if record.epoch < self.epoch_and_touch(namespace, now).await? {
            // Invalidated with its whole namespace; the space is reclaimed right here.
            self.store.replace(namespace, key, &record, None).await?;
            return Ok(None);
        }
        let ttl = self.policy.ac_ttl(namespace).as_secs();
        if Self::expired(ttl, &record, now) {
            if self.store.replace(namespace, key, &record, None).await? {
                self.expired.fetch_add(1, Relaxed);
            }
            return Ok(None);
        }
        // Record the use, coarsely: a hit rewrites the record at most every ttl/16 (≤ 1h).
        let coarse = if ttl > 0 {
            (ttl / 16).clamp(1, 3600)
        } else {
            3600
        };
        if now.saturating_sub(record.last_used) as u64 >= coarse {
            let renewed = ActionRecord {
                last_used: now,
                ..record.clone()
            };
            // Losing the race to a concurrent update is fine: that one is newer.
            self.store
                .replace(namespace, key, &record, Some(renewed))
                .await?;
        }
        Ok(Some(record))
    }

    /// The bytes of another kind of record (a Remote Asset, `crate::asset`) kept under `key`
    /// with the same visibility rules as action results: epochs, TTL since last use, pruning.
    /// The caller picks keys no action digest can take and owns the bytes' format.
    pub async fn get_record(&self, namespace: &str, key: &Digest) -> Result<Option<ActionRecord>> {
        self.visible(namespace, key).await
    }

    /// Deletes the record under `key` if it is still `seen` (one found dead by its owner, such
    /// as an asset whose content was evicted); a newer write under the key is kept.
    pub async fn drop_record(
        &self,
        namespace: &str,
        key: &Digest,
        seen: &ActionRecord,
    ) -> Result<bool> {
        self.store.replace(namespace, key, seen, None).await
    }

    /// Stores bytes under `key` in `namespace` at its current epoch (see
    /// [`ActionResults::get_record`]); durable on return.
    pub async fn put_record(&self, namespace: &str, key: &Digest, bytes: Bytes) -> Result<()> {
        let now = self.now();
        let epoch = self.epoch_and_touch(namespace, now).await?;
        let record = ActionRecord {
            last_used: now,
            epoch,
            result: bytes,
        };
        self.store.put(namespace, key, record).await
    }

    /// Stores an encoded `ActionResult` under the namespace's current epoch, with who wrote it
    /// (`writer`, see `crate::auth::Caller::name`) through which instance name and when (the
    /// store's clock); durable on return.
    pub async fn put(
        &self,
        namespace: &str,
        action: &Digest,
        result: Bytes,
        writer: &str,
        instance: &str,
    ) -> Result<()> {
        let now = self.now();
        let epoch = self.epoch_and_touch(namespace, now).await?;
        let stored = StoredActionResult {
            result,
            writer: writer.to_string(),
            stored_at_unix_secs: now as u64,
            instance_name: instance.to_string(),
        };
        let record = ActionRecord {
            last_used: now,
            epoch,
            result: Bytes::from(stored.encode_to_vec()),
        };
        self.store.put(namespace, action, record).await
    }

    /// The provenance of the result a lookup of `action` through `instance` would find: the
    /// first namespace of its read chain with a visible one (current epoch, within its TTL).
    /// Only looks: it renews no last use, reclaims nothing, and does not check that the
    /// result's outputs are still in the CAS (GetActionResult does, and may skip an incomplete
    /// result for one further down the chain). [`ActionResults::provenance_for`] skips
    /// namespaces a caller may not read.
    pub async fn provenance(&self, instance: &str, action: &Digest) -> Result<Option<Provenance>> {
        self.provenance_for(instance, action, |_| true).await
    }

    /// [`ActionResults::provenance`] over the namespaces of the chain `readable` accepts.
    pub async fn provenance_for(
        &self,
        instance: &str,
        action: &Digest,
        readable: impl Fn(&str) -> bool,
    ) -> Result<Option<Provenance>> {
        let now = self.now();
        for namespace in self.policy.read_chain(instance) {
            if !readable(namespace) {
                continue;
            }
            let Some(record) = self.store.get(namespace, action).await? else {
                continue;
            };
            let epoch = self.epoch(namespace);
            let ttl = self.policy.ac_ttl(namespace).as_secs();
            if record.epoch < epoch || Self::expired(ttl, &record, now) {
                continue;
            }
            let Some(stored) = Self::stored_of(namespace, action, &record) else {
                continue;
            };
            return Ok(Some(Provenance {
                namespace: namespace.to_string(),
                epoch,
                writer: stored.writer,
                instance_name: stored.instance_name,
                stored_at: stored.stored_at_unix_secs,
            }));
        }
        Ok(None)
    }

    /// Removes the listed results of `namespace`; returns how many there were. Durable.
    pub async fn remove(&self, namespace: &str, actions: &[Digest]) -> Result<u64> {
        self.store.remove(namespace, actions).await
    }

    /// Makes every result stored in `namespace` so far invisible at once by bumping its epoch,
    /// and records why. Durable on return; returns the new epoch.
    pub async fn bump_epoch(&self, namespace: &str, reason: &str) -> Result<u64> {
        let now = self.now();
        let _saving = self.saving.lock().await;
        let mut before = None;
        let info = self.change_state(namespace, now, |state| {
            before = Some((state.epoch, state.invalidated_at, state.reason.clone()));
            state.epoch += 1;
            state.invalidated_at = now as u64;
            state.reason = reason.to_string();
        });
        // A store shared with other nodes may raise it further (past what they saved).
        let saved = match self.store.bump_namespace(&info).await {
            Ok(saved) => saved,
            Err(e) => {
                // Not saved, so not done: the caller is told it failed, and this node must
                // not hide results the others (and this one after a restart) still serve.
                if let Some((epoch, at, why)) = before {
                    self.change_state(namespace, now, |state| {
                        if state.epoch == info.epoch {
                            state.epoch = epoch;
                            state.invalidated_at = at;
                            state.reason = why;
                        }
                    });
                }
                return Err(e);
            }
        };
        if saved.epoch > info.epoch {
            self.change_state(namespace, now, |state| {
                state.epoch = state.epoch.max(saved.epoch);
            });
        }
        Ok(saved.epoch)
    }

    /// Takes in what other nodes saved of the namespaces (a store shared with them): a higher
    /// epoch, with its reason, and a later last use. A namespace new to this node is added.
    pub async fn refresh(&self) -> Result<()> {
        let records = self.store.namespace_records().await?;
        let mut states = self.states.write();
        for info in records {
            let state = states
                .entry(info.name.clone())
                .or_insert_with(|| State::new(info.last_used as u32));
            if info.epoch > state.epoch {
                state.epoch = info.epoch;
                state.invalidated_at = info.invalidated_at.unwrap_or(0);
                state.reason = info.reason.unwrap_or_default();
            }
            state
                .last_used
                .fetch_max(info.last_used.min(u32::MAX as u64) as u32, Relaxed);
        }
        Ok(())
    }

    /// Deletes `namespace`: its results and its record. Returns how many results went.
    pub async fn drop_namespace(&self, namespace: &str) -> Result<u64> {
        let _saving = self.saving.lock().await;
        let removed = self.store.remove_namespace(namespace).await?;
        self.states.write().remove(namespace);
        Ok(removed)
    }

    /// Every known namespace, sorted by name.
    pub fn namespaces(&self) -> Vec<NamespaceInfo> {
        let states = self.states.read();
        let mut all: Vec<NamespaceInfo> = states.iter().map(|(n, s)| s.info(n)).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Saves changed last-use times (once a minute, and before the final flush).
    pub async fn persist(&self) -> Result<()> {
        let _saving = self.saving.lock().await;
        if !self.dirty.swap(false, Relaxed) {
            return Ok(());
        }
        let records = self.namespaces();
        if let Err(e) = self.store.save_namespaces(&records, false).await {
            self.dirty.store(true, Relaxed);
            return Err(e);
        }
        Ok(())
    }

    /// Deletes every result that is invalidated or past its TTL; returns how many.
    pub async fn sweep(&self) -> Result<u64> {
        let now = self.now();
        let dead = |namespace: &str, record: &ActionRecord| {
            record.epoch < self.epoch(namespace)
                || Self::expired(self.policy.ac_ttl(namespace).as_secs(), record, now)
        };
        let removed = self.store.sweep(&dead).await?;
        self.expired.fetch_add(removed, Relaxed);
        Ok(removed)
    }

    /// A whole gc: dead action results first (their bytes count against the target too), then
    /// the store's eviction down to `target`.
    pub async fn gc(
        &self,
        housekeeping: &dyn Housekeeping,
        target: Option<u64>,
    ) -> Result<GcReport> {
        let expired = match self.sweep().await {
            Ok(n) => n,
            // A full or read-only disk: eviction (which frees space) still runs.
            Err(e @ (Error::StorageFull(_) | Error::StorageUnwritable(_))) => {
                tracing::warn!(error = %e, "gc: dead action results not swept");
                0
            }
            Err(e) => return Err(e),
        };
        let mut report = housekeeping.gc(target).await?;
        report.expired_action_results = expired;
        Ok(report)
    }

    /// Writes last uses and sweeps dead results until `stop` completes (the server then calls
    /// [`ActionResults::persist`] once more). A pass under way finishes first.
    pub async fn upkeep(&self, stop: impl std::future::Future<Output = ()>) {
        let mut persist = tokio::time::interval(PERSIST_EVERY);
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        // Only a store other nodes share has anything to re-read.
        let shared = self.store.epoch_refresh();
        let mut refresh = tokio::time::interval(shared.unwrap_or(Duration::from_secs(3600)));
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        persist.tick().await;
        sweep.tick().await;
        refresh.tick().await;
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = refresh.tick(), if shared.is_some() => {
                    if let Err(e) = self.refresh().await {
                        log_upkeep_failure("re-reading namespace records", &e);
                    }
                }
                _ = persist.tick() => {
                    if let Err(e) = self.persist().await {
                        log_upkeep_failure("saving last uses of namespaces", &e);
                    }
                }
                _ = sweep.tick() => match self.sweep().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "swept dead action results"),
                    Err(e) => log_upkeep_failure("sweeping action results", &e),
                },
            }
        }
    }

    /// Adds this layer's figures to a store's stats.
    pub fn add_stats(&self, stats: &mut StoreStats) {
        stats.ac_lookups = self.lookups.load(Relaxed);
        stats.ac_hits = self.hits.load(Relaxed);
        stats.expired_action_results = self.expired.load(Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match() {
        assert!(glob_match("ci/branches/*", "ci/branches/feature/x"));
        assert!(glob_match("ci/branches/*", "ci/branches/"));
        assert!(!glob_match("ci/branches/*", "ci/main"));
        assert!(glob_match("ci/main", "ci/main"));
        assert!(!glob_match("ci/main", "ci/main2"));
        assert!(glob_match("*-tmp", "a-tmp"));
        assert!(glob_match("a*b*c", "abxbc"));
        assert!(!glob_match("a*b*c", "acb"));
        assert!(glob_match("*", ""));
        assert!(glob_match("", ""));
        assert!(!glob_match("", "x"));
    }

    #[test]
    fn ac_ttl_follows_the_first_matching_rule() {
        let c = crate::config::Config::parse(
            "[namespaces.default]\nac_ttl = \"1d\"\n\
             [[namespaces.rule]]\npattern = \"ci/branches/*\"\nac_ttl = \"2h\"\n\
             [[namespaces.rule]]\npattern = \"ci/*\"\n",
        )
        .unwrap();
        let n = Policy::new(&c.namespaces);
        assert_eq!(n.ac_ttl("ci/branches/x"), Duration::from_secs(7200));
        assert_eq!(n.ac_ttl("ci/main"), Duration::from_secs(86_400));
        assert_eq!(n.ac_ttl("dev"), Duration::from_secs(86_400));
    }

    #[test]
    fn branches_read_main_and_write_themselves() {
        let config = crate::config::Config::parse(
            "[[namespaces.rule]]\npattern = \"ci/branches/*\"\nread = [\"ci/main\"]\n\
             [[namespaces.rule]]\npattern = \"ci/release\"\nwrite = \"none\"\n\
             read = [\"ci/main\", \"ci/release\"]\n",
        )
        .unwrap();
        let p = Policy::new(&config.namespaces);
        assert_eq!(p.read_chain("ci/branches/x"), ["ci/branches/x", "ci/main"]);
        assert_eq!(p.write_target("ci/branches/x"), Some("ci/branches/x"));
        assert_eq!(p.read_chain("ci/main"), ["ci/main"]);
        assert_eq!(p.write_target("ci/main"), Some("ci/main"));
        assert_eq!(p.read_chain("ci/release"), ["ci/release", "ci/main"]);
        assert_eq!(p.write_target("ci/release"), None);
        assert!(crate::config::Config::parse(
            "[[namespaces.rule]]\npattern = \"x\"\nread = [\"a/../b\"]\n"
        )
        .is_err());
    }
}

#[cfg(test)]
mod saving_order {
    use std::time::Duration;

    use async_trait::async_trait;

    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::DeadRecord;

    /// A memory store whose non-durable saves (last uses, first sights) take a while, as a
    /// disk's would: time for an epoch bump to come in between.
    /// A memory store whose namespace saves misbehave in one way.
    struct OddSaves(MemoryStore, Odd);

    #[derive(Clone, Copy)]
    enum Odd {
        /// Saves of last uses (not durable) take 50 ms.
        SlowPersists,
        /// Durable saves (epoch bumps) fail, as a bucket that stopped answering.
        FailingBumps,
    }

    #[async_trait]
    impl ActionStore for OddSaves {
        async fn get(&self, ns: &str, action: &Digest) -> Result<Option<ActionRecord>> {
            self.0.get(ns, action).await
        }
        async fn put(&self, ns: &str, action: &Digest, record: ActionRecord) -> Result<()> {
            self.0.put(ns, action, record).await
        }
        async fn replace(
            &self,
            ns: &str,
            action: &Digest,
            seen: &ActionRecord,
            new: Option<ActionRecord>,
        ) -> Result<bool> {
            self.0.replace(ns, action, seen, new).await
        }
        async fn remove(&self, ns: &str, actions: &[Digest]) -> Result<u64> {
            self.0.remove(ns, actions).await
        }
        async fn remove_namespace(&self, ns: &str) -> Result<u64> {
            self.0.remove_namespace(ns).await
        }
        async fn sweep(&self, dead: &DeadRecord<'_>) -> Result<u64> {
            self.0.sweep(dead).await
        }
        async fn namespace_records(&self) -> Result<Vec<NamespaceInfo>> {
            self.0.namespace_records().await
        }
        async fn save_namespaces(&self, records: &[NamespaceInfo], durable: bool) -> Result<()> {
            match (self.1, durable) {
                (Odd::SlowPersists, false) => tokio::time::sleep(Duration::from_millis(50)).await,
                (Odd::FailingBumps, true) => {
                    return Err(Error::Unavailable("the store did not answer".into()))
                }
                _ => {}
            }
            self.0.save_namespaces(records, durable).await
        }
    }

    #[tokio::test]
    async fn a_bump_that_could_not_be_saved_changes_nothing() {
        let config = crate::config::Config::default();
        let store = Arc::new(OddSaves(
            MemoryStore::from_config(&config).expect("memory store"),
            Odd::FailingBumps,
        ));
        let policy = Arc::new(Policy::new(&config.namespaces));
        let results = ActionResults::open(store.clone(), policy).await.unwrap();
        let action = Digest::of(b"action");
        results
            .put("ci/main", &action, Bytes::from_static(b"r"), "t", "ci/main")
            .await
            .unwrap();
        assert!(results.bump_epoch("ci/main", "test").await.is_err());
        assert_eq!(
            results.epoch("ci/main"),
            0,
            "the failed invalidation is not applied"
        );
        assert!(results.get("ci/main", &action).await.unwrap().is_some());
        results.dirty.store(true, Relaxed);
        results.persist().await.unwrap();
        let saved = store.namespace_records().await.unwrap();
        assert_eq!(saved.iter().map(|r| r.epoch).collect::<Vec<_>>(), [0]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_persist_never_writes_an_older_epoch_over_a_bump() {
        let config = crate::config::Config::default();
        let store = Arc::new(OddSaves(
            MemoryStore::from_config(&config).expect("memory store"),
            Odd::SlowPersists,
        ));
        let policy = Arc::new(Policy::new(&config.namespaces));
        let results = Arc::new(ActionResults::open(store.clone(), policy).await.unwrap());
        let action = Digest::of(b"action");
        results
            .put("ci/main", &action, Bytes::from_static(b"r"), "t", "ci/main")
            .await
            .unwrap();
        results.dirty.store(true, Relaxed);
        // A persist starts saving what it read (epoch 0); a bump lands meanwhile.
        let persisting = tokio::spawn({
            let results = results.clone();
            async move { results.persist().await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(results.bump_epoch("ci/main", "test").await.unwrap(), 1);
        persisting.await.unwrap().unwrap();
        let saved = store.namespace_records().await.unwrap();
        assert_eq!(
            saved
                .iter()
                .map(|r| (r.name.as_str(), r.epoch))
                .collect::<Vec<_>>(),
            [("ci/main", 1)],
            "the saved epoch is the bumped one"
        );
        // And a dropped namespace is not saved back by a persist that raced it.
        results.dirty.store(true, Relaxed);
        let persisting = tokio::spawn({
            let results = results.clone();
            async move { results.persist().await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        results.drop_namespace("ci/main").await.unwrap();
        persisting.await.unwrap().unwrap();
        assert!(store.namespace_records().await.unwrap().is_empty());
    }
}

#[cfg(test)]
mod provenance {
    use super::*;
    use crate::store::memory::MemoryStore;

    async fn open(config: &str) -> (Arc<MemoryStore>, ActionResults) {
        let config = crate::config::Config::parse(config).unwrap();
        let store = Arc::new(MemoryStore::from_config(&config).unwrap());
        let policy = Arc::new(Policy::new(&config.namespaces));
        let results = ActionResults::open(store.clone(), policy).await.unwrap();
        (store, results)
    }

    #[tokio::test]
    async fn a_lookup_returns_the_result_and_provenance_names_its_writer() {
        let (store, results) = open(
            "[[namespaces.rule]]\npattern = \"ci/branches/*\"\nread = [\"ci/main\"]\n\
             [[namespaces.rule]]\npattern = \"ci/release\"\nwrite = \"ci/main\"\n",
        )
        .await;
        let action = Digest::of(b"action");
        results
            .put(
                "ci/main",
                &action,
                Bytes::from_static(b"r"),
                "ci-bot",
                "ci/release",
            )
            .await
            .unwrap();
        assert_eq!(
            results.get("ci/main", &action).await.unwrap().as_deref(),
            Some(&b"r"[..]),
            "lookups see the ActionResult bytes, not the wrapper"
        );
        let before = store.get("ci/main", &action).await.unwrap().unwrap();
        store.advance_clock(Duration::from_secs(7200));
        let found = results
            .provenance("ci/branches/x", &action)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            found,
            Provenance {
                namespace: "ci/main".into(),
                epoch: 0,
                writer: "ci-bot".into(),
                instance_name: "ci/release".into(),
                stored_at: before.last_used as u64,
            }
        );
        assert_eq!(
            store.get("ci/main", &action).await.unwrap().unwrap(),
            before,
            "looking renews no last use"
        );
        assert_eq!(results.provenance("dev", &action).await.unwrap(), None);
    }

    #[tokio::test]
    async fn invalidated_and_expired_results_have_none() {
        let (store, results) = open("[namespaces.default]\nac_ttl = \"1h\"\n").await;
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        for action in [&a, &b] {
            results
                .put("ci", action, Bytes::from_static(b"r"), "w", "ci")
                .await
                .unwrap();
        }
        assert_eq!(results.bump_epoch("ci", "bad").await.unwrap(), 1);
        assert_eq!(results.provenance("ci", &a).await.unwrap(), None);
        assert_eq!(results.provenance("ci", &b).await.unwrap(), None);
        results
            .put("ci", &a, Bytes::from_static(b"r2"), "w2", "ci")
            .await
            .unwrap();
        let found = results.provenance("ci", &a).await.unwrap().unwrap();
        assert_eq!((found.epoch, found.writer.as_str()), (1, "w2"));
        store.advance_clock(Duration::from_secs(7200));
        assert_eq!(results.provenance("ci", &a).await.unwrap(), None);
    }
}
