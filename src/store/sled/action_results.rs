//! The action cache in tree `ac`, as an [`ActionStore`]: records only. Whether one is still
//! visible (epoch, TTL) is decided above, in `crate::namespace`.
//!
//! Key `namespace ‖ 0x00 ‖ hash ‖ size`; value last use (u32 seconds BE) ‖ epoch of the
//! namespace when stored (u64 BE) ‖ the record's bytes (an encoded
//! `hoard.store.v1.StoredActionResult`: the `ActionResult` and its provenance, opaque here). Instance names cannot contain NUL
//! (`crate::instance_name`), so the key is unambiguous and one namespace is one prefix.
//! Namespace records are kept in tree `namespaces` (`namespaces.rs`).
//!
//! Must not: hold a sled iterator across an `.await`; acknowledge a put before it is durable.

use async_trait::async_trait;
use bytes::Bytes;

use std::ops::Bound::{Excluded, Unbounded};

use super::{namespaces, run_blocking, Inner, SledStore};
use crate::digest::{Digest, HASH_LEN};
use crate::error::Result;
use crate::store::{ActionRecord, ActionStore, DeadRecord, NamespaceInfo};

/// Bytes before the record's own bytes in an `ac` value: last use (u32), epoch (u64).
const AC_HEADER: usize = 12;
/// Records a sweep reads per trip to a blocking thread.
const SWEEP_BATCH: usize = 1024;

fn ac_key(namespace: &str, action: &Digest) -> Vec<u8> {
    let mut k = Vec::with_capacity(namespace.len() + 1 + HASH_LEN + 8);
    k.extend_from_slice(namespace.as_bytes());
    k.push(0);
    k.extend_from_slice(&action.hash);
    k.extend_from_slice(&action.size.to_be_bytes());
    k
}

fn encode(record: &ActionRecord) -> Vec<u8> {
    let mut value = Vec::with_capacity(AC_HEADER + record.result.len());
    value.extend_from_slice(&record.last_used.to_be_bytes());
    value.extend_from_slice(&record.epoch.to_be_bytes());
    value.extend_from_slice(&record.result);
    value
}

fn decode(value: &[u8]) -> Option<ActionRecord> {
    Some(ActionRecord {
        last_used: u32::from_be_bytes(value.get(0..4)?.try_into().ok()?),
        epoch: u64::from_be_bytes(value.get(4..AC_HEADER)?.try_into().ok()?),
        result: Bytes::copy_from_slice(value.get(AC_HEADER..)?),
    })
}

/// The namespace part of a key.
fn namespace_of(key: &[u8]) -> Option<String> {
    let sep = key.iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&key[..sep]).into_owned())
}

impl Inner {
    /// Removes one action result if it still has `value`; true if it did.
    fn remove_action_result(&self, key: &[u8], value: &[u8]) -> Result<bool> {
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

    /// Stores a record; returns once it is durable (taken back if it cannot be).
    async fn put_action_result(
        &self,
        namespace: &str,
        action: &Digest,
        record: &ActionRecord,
    ) -> Result<()> {
        let key = ac_key(namespace, action);
        let value = encode(record);
        let charge = (key.len() + value.len()) as u64;
        self.admit(charge)?;
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
}

#[async_trait]
impl ActionStore for SledStore {
    async fn get(&self, namespace: &str, action: &Digest) -> Result<Option<ActionRecord>> {
        let key = ac_key(namespace, action);
        let Some(value) = self.inner.ac.get(&key)? else {
            return Ok(None);
        };
        let record = decode(&value);
        if record.is_none() {
            self.inner.remove_action_result(&key, &value)?;
        }
        Ok(record)
    }

    async fn put(&self, namespace: &str, action: &Digest, record: ActionRecord) -> Result<()> {
        let r = self
            .inner
            .put_action_result(namespace, action, &record)
            .await;
        self.inner.note_write(&r);
        r
    }

    async fn replace(
        &self,
        namespace: &str,
        action: &Digest,
        seen: &ActionRecord,
        new: Option<ActionRecord>,
    ) -> Result<bool> {
        let key = ac_key(namespace, action);
        let seen = encode(seen);
        match new {
            // Only the last use changes: the same size, so no change in usage.
            Some(new) => Ok(self
                .inner
                .ac
                .compare_and_swap(&key, Some(seen), Some(encode(&new)))?
                .is_ok()),
            None => self.inner.remove_action_result(&key, &seen),
        }
    }

    async fn remove(&self, namespace: &str, actions: &[Digest]) -> Result<u64> {
        let (inner, keys) = (
            self.inner.clone(),
            actions
                .iter()
                .map(|a| ac_key(namespace, a))
                .collect::<Vec<_>>(),
        );
        let removed = run_blocking(move || {
            let mut removed = 0;
            for key in keys {
                if let Some(old) = inner.ac.remove(&key)? {
                    inner
                        .usage
                        .ac_changed(None, Some((key.len() + old.len()) as u64));
                    removed += 1;
                }
            }
            Ok(removed)
        })
        .await?;
        self.inner.commit.durable().await?;
        Ok(removed)
    }

    async fn remove_namespace(&self, namespace: &str) -> Result<u64> {
        let (inner, namespace) = (self.inner.clone(), namespace.to_string());
        let removed = run_blocking(move || {
            let mut prefix = namespace.as_bytes().to_vec();
            prefix.push(0);
            let mut removed = 0;
            for entry in inner.ac.scan_prefix(&prefix) {
                let (key, value) = entry?;
                if inner.remove_action_result(&key, &value)? {
                    removed += 1;
                }
            }
            namespaces::remove(&inner.namespaces, &namespace)?;
            Ok(removed)
        })
        .await?;
        self.inner.commit.durable().await?;
        Ok(removed)
    }

    async fn sweep(&self, dead: &DeadRecord<'_>) -> Result<u64> {
        // While the disk cannot take writes only eviction writes (see `space.rs`).
        self.inner.space.check()?;
        // In batches read off the async threads; `dead` (the policy) judges each on this side.
        let mut removed = 0;
        let mut after: Option<sled::IVec> = None;
        loop {
            let (inner, start) = (self.inner.clone(), after.take());
            let batch = run_blocking(move || {
                let entries = match start {
                    Some(key) => inner.ac.range((Excluded(key), Unbounded)),
                    None => inner.ac.iter(),
                };
                Ok(entries
                    .take(SWEEP_BATCH)
                    .collect::<std::result::Result<Vec<_>, _>>()?)
            })
            .await?;
            let Some((last, _)) = batch.last() else {
                return Ok(removed);
            };
            after = Some(last.clone());
            let gone: Vec<(sled::IVec, sled::IVec)> = batch
                .into_iter()
                .filter(|(key, value)| match (namespace_of(key), decode(value)) {
                    (Some(namespace), Some(record)) => dead(&namespace, &record),
                    _ => true,
                })
                .collect();
            let inner = self.inner.clone();
            removed += run_blocking(move || {
                let mut removed = 0;
                for (key, value) in gone {
                    if inner.remove_action_result(&key, &value)? {
                        removed += 1;
                    }
                }
                Ok(removed)
            })
            .await?;
        }
    }

    async fn namespace_records(&self) -> Result<Vec<NamespaceInfo>> {
        namespaces::load(&self.inner.namespaces)
    }

    async fn save_namespaces(&self, records: &[NamespaceInfo], durable: bool) -> Result<()> {
        // Refused up front like every other write while the disk cannot take them.
        self.inner.space.check()?;
        namespaces::save(&self.inner.namespaces, records)?;
        if durable {
            self.inner.commit.durable().await?;
        }
        Ok(())
    }

    fn clock(&self) -> u64 {
        self.inner.clock.now() as u64
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::ac_key;
    use crate::digest::Digest;
    use crate::store::sled::SledStore;
    use crate::store::{ActionRecord, ActionStore, Housekeeping};

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
        assert_eq!(store.get("", &action).await.unwrap(), None);
        let record = ActionRecord {
            last_used: 1,
            epoch: 0,
            result: Bytes::from_static(b"new"),
        };
        store.put("", &action, record.clone()).await.unwrap();
        store.flush().await.unwrap();
        drop(store);
        // Data of today's format is kept across restarts.
        let store = SledStore::open(tmp.path(), 64 << 10, 16 << 20).unwrap();
        assert_eq!(store.get("", &action).await.unwrap(), Some(record));
        assert_eq!(store.stats().await.unwrap().action_results, 1);
    }

    #[tokio::test]
    async fn action_results_without_provenance_are_dropped_on_upgrade() {
        let tmp = tempfile::tempdir().unwrap();
        let action = Digest::of(b"action");
        {
            let store = SledStore::open(tmp.path(), 64 << 10, 16 << 20).unwrap();
            // As format 3 wrote it: the header, then the bare ActionResult.
            let record = ActionRecord {
                last_used: 1,
                epoch: 0,
                result: Bytes::from_static(b"\x0a\x02hi"),
            };
            store.put("", &action, record).await.unwrap();
            store
                .inner
                .db
                .insert("format", &3u32.to_be_bytes())
                .unwrap();
            store.flush().await.unwrap();
        }
        let store = SledStore::open(tmp.path(), 64 << 10, 16 << 20).unwrap();
        assert_eq!(store.get("", &action).await.unwrap(), None);
        assert_eq!(store.stats().await.unwrap().action_results, 0);
    }
}
