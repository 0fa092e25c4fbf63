//! The action cache in tree `ac`: get and put of encoded results with the namespace epoch and
//! TTL checks, invalidating listed actions, a whole namespace (epoch bump) or dropping one,
//! and the sweep that reclaims expired and invalidated results.
//!
//! Key `instance ‖ 0x00 ‖ hash ‖ size`; value last use (u32 seconds BE) ‖ epoch of the namespace
//! when stored (u64 BE) ‖ encoded `ActionResult`.
//!
//! Must not: hold a sled iterator across an `.await`; serve a result older than its
//! namespace's epoch or its TTL.

use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;

use super::Inner;
use crate::digest::{Digest, HASH_LEN};
use crate::error::Result;

/// Bytes before the encoded ActionResult in an `ac` value: last use (u32), epoch (u64).
const AC_HEADER: usize = 12;

fn ac_key(instance: &str, action: &Digest) -> Vec<u8> {
    let mut k = Vec::with_capacity(instance.len() + 1 + HASH_LEN + 8);
    k.extend_from_slice(instance.as_bytes());
    k.push(0);
    k.extend_from_slice(&action.hash);
    k.extend_from_slice(&action.size.to_be_bytes());
    k
}

/// Last use and epoch of an `ac` value.
fn ac_header(value: &[u8]) -> Option<(u32, u64)> {
    let used = u32::from_be_bytes(value.get(..4)?.try_into().ok()?);
    let epoch = u64::from_be_bytes(value.get(4..AC_HEADER)?.try_into().ok()?);
    Some((used, epoch))
}

impl Inner {
    pub(super) fn get_action_result(
        &self,
        instance: &str,
        action: &Digest,
    ) -> Result<Option<Bytes>> {
        self.counters.ac_lookups.fetch_add(1, Relaxed);
        let key = ac_key(instance, action);
        let Some(value) = self.ac.get(&key)? else {
            return Ok(None);
        };
        let Some((used, epoch)) = ac_header(&value) else {
            self.remove_action_result(&key, &value)?;
            return Ok(None);
        };
        let now = self.clock.now();
        if epoch < self.namespaces.epoch_and_touch(instance, now)? {
            // Invalidated with its whole namespace; the space is reclaimed right here.
            self.remove_action_result(&key, &value)?;
            return Ok(None);
        }
        let ttl = self.ttls.ac_ttl(instance).as_secs();
        let idle = now.saturating_sub(used) as u64;
        if ttl > 0 && idle > ttl {
            if self.remove_action_result(&key, &value)? {
                self.counters.expired_ac.fetch_add(1, Relaxed);
            }
            return Ok(None);
        }
        // Record the use, coarsely: a hit rewrites the entry at most every ttl/16 (≤ 1h).
        let coarse = if ttl > 0 {
            (ttl / 16).clamp(1, 3600)
        } else {
            3600
        };
        if idle >= coarse {
            let mut renewed = value.to_vec();
            renewed[..4].copy_from_slice(&now.to_be_bytes());
            // Losing the race to a concurrent update is fine: that one is newer.
            let _ = self
                .ac
                .compare_and_swap(&key, Some(&value), Some(renewed))?;
        }
        self.counters.ac_hits.fetch_add(1, Relaxed);
        Ok(Some(Bytes::copy_from_slice(&value[AC_HEADER..])))
    }

    /// Removes one action result if it still has `value`; true if it did.
    fn remove_action_result(&self, key: &[u8], value: &sled::IVec) -> Result<bool> {
        let removed = self
            .ac
            .compare_and_swap(key, Some(value), None as Option<&[u8]>)?
            .is_ok();
        if removed {
            self.usage
                .ac_changed(None, Some((key.len() + value.len()) as u64));
        }
        Ok(removed)
    }

    /// Stores an action result; returns once it is durable (taken back if it cannot be).
    pub(super) async fn put_action_result(
        &self,
        instance: &str,
        action: &Digest,
        result: &[u8],
    ) -> Result<()> {
        let r = self.try_put_action_result(instance, action, result).await;
        self.note_write(&r);
        r
    }

    async fn try_put_action_result(
        &self,
        instance: &str,
        action: &Digest,
        result: &[u8],
    ) -> Result<()> {
        let key = ac_key(instance, action);
        let charge = (key.len() + AC_HEADER + result.len()) as u64;
        self.admit(charge)?;
        let now = self.clock.now();
        let epoch = self.namespaces.epoch_and_touch(instance, now)?;
        let mut value = Vec::with_capacity(AC_HEADER + result.len());
        value.extend_from_slice(&now.to_be_bytes());
        value.extend_from_slice(&epoch.to_be_bytes());
        value.extend_from_slice(result);
        let old = self.ac.insert(&key, value.clone())?;
        let old_len = old.as_ref().map(|o| (key.len() + o.len()) as u64);
        self.usage.ac_changed(Some(charge), old_len);
        if let Err(e) = self.commit.durable().await {
            // Never acknowledged: put back what was there, unless a newer write replaced it.
            if self
                .ac
                .compare_and_swap(&key, Some(value), old.clone())
                .is_ok_and(|swapped| swapped.is_ok())
            {
                self.usage.ac_changed(old_len, Some(charge));
            }
            return Err(e);
        }
        Ok(())
    }

    /// Removes the listed action results of `instance`; returns how many there were.
    pub(super) fn invalidate_actions(&self, instance: &str, actions: &[Digest]) -> Result<u64> {
        let mut removed = 0;
        for action in actions {
            let key = ac_key(instance, action);
            if let Some(old) = self.ac.remove(&key)? {
                self.usage
                    .ac_changed(None, Some((key.len() + old.len()) as u64));
                removed += 1;
            }
        }
        self.db.flush()?;
        Ok(removed)
    }

    /// Bumps the epoch of `instance` and makes it durable before returning.
    pub(super) fn invalidate_namespace(&self, instance: &str, reason: &str) -> Result<u64> {
        let epoch = self.namespaces.bump(instance, self.clock.now(), reason)?;
        self.db.flush()?;
        Ok(epoch)
    }

    /// Deletes every action result of `instance` and its record.
    pub(super) fn drop_namespace(&self, instance: &str) -> Result<u64> {
        let mut prefix = instance.as_bytes().to_vec();
        prefix.push(0);
        let mut removed = 0;
        for entry in self.ac.scan_prefix(&prefix) {
            let (key, value) = entry?;
            if self.remove_action_result(&key, &value)? {
                removed += 1;
            }
        }
        self.namespaces.remove(instance)?;
        self.db.flush()?;
        Ok(removed)
    }

    /// Drops action results unused for longer than their instance's TTL, or invalidated by an
    /// epoch bump; returns how many. A background sweep (lookups refuse them already).
    pub(super) fn expire_action_results(&self) -> Result<u64> {
        let now = self.clock.now();
        let mut expired = 0;
        for entry in self.ac.iter() {
            let (key, value) = entry?;
            let Some(sep) = key.iter().position(|&b| b == 0) else {
                continue;
            };
            let instance = String::from_utf8_lossy(&key[..sep]);
            let ttl = self.ttls.ac_ttl(&instance).as_secs();
            let stale = match ac_header(&value) {
                Some((used, epoch)) => {
                    (ttl > 0 && now.saturating_sub(used) as u64 > ttl)
                        || epoch < self.namespaces.epoch(&instance)
                }
                None => true,
            };
            if stale && self.remove_action_result(&key, &value)? {
                expired += 1;
            }
        }
        self.counters.expired_ac.fetch_add(expired, Relaxed);
        Ok(expired)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::ac_key;
    use crate::digest::Digest;
    use crate::store::sled::SledStore;
    use crate::store::Store;

    #[tokio::test]
    async fn action_results_of_the_old_format_are_dropped_not_misread() {
        let tmp = tempfile::tempdir().unwrap();
        let action = Digest::of(b"action");
        {
            let store = SledStore::open(tmp.path(), 64 << 10, 16 << 20).unwrap();
            // As format 1 wrote it: the encoded result without the last-use prefix.
            store
                .inner
                .ac
                .insert(ac_key("", &action), &b"\x0a\x02hi"[..])
                .unwrap();
            store.inner.db.remove("format").unwrap();
            store.flush().await.unwrap();
        }
        let store = SledStore::open(tmp.path(), 64 << 10, 16 << 20).unwrap();
        assert_eq!(store.get_action_result("", &action).await.unwrap(), None);
        store
            .put_action_result("", &action, Bytes::from_static(b"new"))
            .await
            .unwrap();
        store.flush().await.unwrap();
        drop(store);
        // Format 2 data is kept across restarts.
        let store = SledStore::open(tmp.path(), 64 << 10, 16 << 20).unwrap();
        assert_eq!(
            store.get_action_result("", &action).await.unwrap(),
            Some(Bytes::from_static(b"new"))
        );
        assert_eq!(store.stats().await.unwrap().action_results, 1);
    }
}
