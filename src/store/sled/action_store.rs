//! The action cache in tree `ac`: `namespace ‖ 0x00 ‖ hash ‖ size` → last use (u32 BE) ‖ epoch
//! (u64 BE) ‖ encoded `ActionResult`. Records only: whether one is still visible (epoch, TTL)
//! is decided above, in `crate::namespace`. Instance names cannot contain NUL
//! (`crate::instance_name`), so the key is unambiguous and one namespace is one prefix.

use async_trait::async_trait;
use bytes::Bytes;

use super::lifecycle::AC_HEADER;
use super::{ac_key, namespaces, SledStore};
use crate::digest::Digest;
use crate::error::Result;
use crate::store::{ActionRecord, ActionStore, DeadRecord, NamespaceInfo};

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
        epoch: u64::from_be_bytes(value.get(4..12)?.try_into().ok()?),
        result: Bytes::copy_from_slice(value.get(AC_HEADER..)?),
    })
}

/// The namespace part of a key.
fn namespace_of(key: &[u8]) -> Option<String> {
    let sep = key.iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&key[..sep]).into_owned())
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
        let inner = &self.inner;
        let key = ac_key(namespace, action);
        let value = encode(&record);
        let charge = (key.len() + value.len()) as u64;
        let stored = async {
            inner.life.admit(charge)?;
            let old = inner.ac.insert(&key, value.clone())?;
            let old_len = old.as_ref().map(|o| (key.len() + o.len()) as u64);
            inner.life.ac_changed(Some(charge), old_len);
            if let Err(e) = inner.commit.durable().await {
                // Never acknowledged: put back what was there, unless a newer write replaced it.
                if inner
                    .ac
                    .compare_and_swap(&key, Some(value), old.clone())
                    .is_ok_and(|swapped| swapped.is_ok())
                {
                    inner.life.ac_changed(old_len, Some(charge));
                }
                return Err(e);
            }
            Ok(())
        }
        .await;
        inner.life.note_write(&stored);
        stored
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
            Some(new) => Ok(self
                .inner
                .ac
                .compare_and_swap(&key, Some(seen), Some(encode(&new)))?
                .is_ok()),
            None => self.inner.remove_action_result(&key, &seen.into()),
        }
    }

    async fn remove(&self, namespace: &str, actions: &[Digest]) -> Result<u64> {
        let mut removed = 0;
        for action in actions {
            let key = ac_key(namespace, action);
            if let Some(old) = self.inner.ac.remove(&key)? {
                self.inner
                    .life
                    .ac_changed(None, Some((key.len() + old.len()) as u64));
                removed += 1;
            }
        }
        self.inner.commit.durable().await?;
        Ok(removed)
    }

    async fn remove_namespace(&self, namespace: &str) -> Result<u64> {
        let mut prefix = namespace.as_bytes().to_vec();
        prefix.push(0);
        let mut removed = 0;
        // Keys first: no sled iterator is held across the removals' flush.
        let entries: Vec<(sled::IVec, sled::IVec)> = self
            .inner
            .ac
            .scan_prefix(&prefix)
            .collect::<std::result::Result<_, _>>()?;
        for (key, value) in entries {
            if self.inner.remove_action_result(&key, &value)? {
                removed += 1;
            }
        }
        namespaces::remove(&self.inner.namespaces, namespace)?;
        self.inner.commit.durable().await?;
        Ok(removed)
    }

    async fn sweep(&self, dead: &DeadRecord<'_>) -> Result<u64> {
        let mut removed = 0;
        for entry in self.inner.ac.iter() {
            let (key, value) = entry?;
            let gone = match (namespace_of(&key), decode(&value)) {
                (Some(namespace), Some(record)) => dead(&namespace, &record),
                _ => true,
            };
            if gone && self.inner.remove_action_result(&key, &value)? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn namespace_records(&self) -> Result<Vec<NamespaceInfo>> {
        namespaces::load(&self.inner.namespaces)
    }

    async fn save_namespaces(&self, records: &[NamespaceInfo], durable: bool) -> Result<()> {
        namespaces::save(&self.inner.namespaces, records)?;
        if durable {
            self.inner.commit.durable().await?;
        }
        Ok(())
    }

    fn clock(&self) -> u64 {
        self.inner.life.now() as u64
    }
}
