//! Namespaces (instance names) as the store sees them: an epoch per namespace, its last use, and
//! its last whole-namespace invalidation.
//!
//! Invalidating a namespace bumps its epoch: every action result stored under an older epoch is
//! invisible from that moment (O(1), whatever the namespace holds), and the sweep in
//! [`super::action_results`] reclaims the space later. Records live in tree `namespaces`
//! (`name` → [`Record`] bytes) and in memory; epochs are written and fsynced when they change,
//! last-use times with the blobs' once a minute.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

use parking_lot::RwLock;

use crate::error::Result;
use crate::store::NamespaceInfo;

/// One namespace's state in memory.
struct State {
    epoch: u64,
    last_used: AtomicU32,
    invalidated_at: u64,
    reason: String,
}

/// All namespaces, loaded at start-up.
pub(super) struct Namespaces {
    tree: sled::Tree,
    map: RwLock<HashMap<String, State>>,
    /// Last-use times changed since they were last written.
    dirty: std::sync::atomic::AtomicBool,
}

fn encode(s: &State) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + s.reason.len());
    v.extend_from_slice(&s.epoch.to_be_bytes());
    v.extend_from_slice(&s.last_used.load(Relaxed).to_be_bytes());
    v.extend_from_slice(&s.invalidated_at.to_be_bytes());
    v.extend_from_slice(s.reason.as_bytes());
    v
}

fn decode(v: &[u8]) -> Option<State> {
    Some(State {
        epoch: u64::from_be_bytes(v.get(0..8)?.try_into().ok()?),
        last_used: AtomicU32::new(u32::from_be_bytes(v.get(8..12)?.try_into().ok()?)),
        invalidated_at: u64::from_be_bytes(v.get(12..20)?.try_into().ok()?),
        reason: String::from_utf8_lossy(v.get(20..)?).into_owned(),
    })
}

impl Namespaces {
    pub(super) fn load(tree: sled::Tree) -> Result<Self> {
        let mut map = HashMap::new();
        for entry in tree.iter() {
            let (k, v) = entry?;
            if let Some(state) = decode(&v) {
                map.insert(String::from_utf8_lossy(&k).into_owned(), state);
            }
        }
        Ok(Namespaces {
            tree,
            map: RwLock::new(map),
            dirty: Default::default(),
        })
    }

    /// The current epoch of `name` (0 for a namespace never invalidated), recording a use.
    pub(super) fn epoch_and_touch(&self, name: &str, now: u32) -> Result<u64> {
        {
            let map = self.map.read();
            if let Some(s) = map.get(name) {
                if s.last_used.load(Relaxed) < now {
                    s.last_used.store(now, Relaxed);
                    self.dirty.store(true, Relaxed);
                }
                return Ok(s.epoch);
            }
        }
        // First sight of this namespace: record it, so it can be listed and pruned.
        let mut map = self.map.write();
        let state = map.entry(name.to_string()).or_insert_with(|| State {
            epoch: 0,
            last_used: AtomicU32::new(now),
            invalidated_at: 0,
            reason: String::new(),
        });
        self.tree.insert(name.as_bytes(), encode(state))?;
        Ok(state.epoch)
    }

    /// The current epoch of `name`, without recording a use.
    pub(super) fn epoch(&self, name: &str) -> u64 {
        let map = self.map.read();
        map.get(name).map_or(0, |s| s.epoch)
    }

    /// Bumps the epoch of `name` and records why; the caller makes it durable.
    pub(super) fn bump(&self, name: &str, now: u32, reason: &str) -> Result<u64> {
        let mut map = self.map.write();
        let state = map.entry(name.to_string()).or_insert_with(|| State {
            epoch: 0,
            last_used: AtomicU32::new(now),
            invalidated_at: 0,
            reason: String::new(),
        });
        state.epoch += 1;
        state.invalidated_at = now as u64;
        state.reason = reason.to_string();
        self.tree.insert(name.as_bytes(), encode(state))?;
        Ok(state.epoch)
    }

    /// Forgets `name` entirely.
    pub(super) fn remove(&self, name: &str) -> Result<()> {
        let mut map = self.map.write();
        map.remove(name);
        self.tree.remove(name.as_bytes())?;
        Ok(())
    }

    /// Writes changed last-use times (called with the blobs' once a minute and at shutdown).
    pub(super) fn persist(&self) -> Result<()> {
        if !self.dirty.swap(false, Relaxed) {
            return Ok(());
        }
        let map = self.map.read();
        let mut batch = sled::Batch::default();
        for (name, state) in map.iter() {
            batch.insert(name.as_bytes(), encode(state));
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    pub(super) fn list(&self) -> Vec<NamespaceInfo> {
        let map = self.map.read();
        let mut out: Vec<NamespaceInfo> = map
            .iter()
            .map(|(name, s)| NamespaceInfo {
                name: name.clone(),
                epoch: s.epoch,
                last_used: s.last_used.load(Relaxed) as u64,
                invalidated_at: (s.invalidated_at > 0).then_some(s.invalidated_at),
                reason: (!s.reason.is_empty()).then(|| s.reason.clone()),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}
