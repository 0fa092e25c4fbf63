//! Action results and namespace records as objects: `ac/ns.<namespace>/<hash>-<size>` holds a
//! record (last use u32 BE, epoch u64 BE, the result's bytes), `namespaces/ns.<namespace>` a
//! namespace record as JSON. The namespace is one path segment (object_store percent-encodes
//! its `/`), so one namespace's results are one listing prefix and never a child namespace's.
//!
//! Conditional updates use the object's ETag: a renewal (`replace`) is a PUT with `If-Match`,
//! so it never overwrites a newer result written through another node. A namespace record is
//! merged with what the bucket holds (the higher epoch and last use win) and written with
//! `If-Match` / `If-None-Match`, retried on a conflict, so no node lowers an epoch another
//! node raised; an invalidation writes an epoch above the bucket's, so two made at once through
//! two nodes stay two. Nodes re-read the records every `storage.s3.epoch_refresh`.

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, UpdateVersion};

use super::{blob_name, bucket_error, parse_blob_name, BucketStore, Inner, PARALLEL};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::store::{ActionRecord, ActionStore, DeadRecord, NamespaceInfo};

/// Bytes before the result in a record object.
const HEADER: usize = 12;
/// Tries of a conditional namespace write that keeps losing to other nodes.
const CONFLICT_TRIES: usize = 8;

fn encode(record: &ActionRecord) -> Bytes {
    let mut v = Vec::with_capacity(HEADER + record.result.len());
    v.extend_from_slice(&record.last_used.to_be_bytes());
    v.extend_from_slice(&record.epoch.to_be_bytes());
    v.extend_from_slice(&record.result);
    Bytes::from(v)
}

fn decode(value: &Bytes) -> Option<ActionRecord> {
    Some(ActionRecord {
        last_used: u32::from_be_bytes(value.get(0..4)?.try_into().ok()?),
        epoch: u64::from_be_bytes(value.get(4..HEADER)?.try_into().ok()?),
        result: value.slice(HEADER..),
    })
}

/// The path segment of a namespace (the empty instance name is a namespace too).
fn segment(namespace: &str) -> String {
    format!("ns.{namespace}")
}

/// The namespace a key segment names. Keys hold segments percent-encoded (object_store
/// encodes a namespace's `/` and other characters S3 keys should not carry), so the segment
/// is decoded first.
fn namespace_of(segment: &str) -> Option<String> {
    let raw = segment.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = std::str::from_utf8(raw.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .ok()?
        .strip_prefix("ns.")
        .map(str::to_string)
}

impl Inner {
    fn results_of(&self, namespace: &str) -> Path {
        self.root.clone().join("ac").join(segment(namespace))
    }

    fn result_path(&self, namespace: &str, action: &Digest) -> Path {
        self.results_of(namespace).join(blob_name(action))
    }

    fn namespace_path(&self, namespace: &str) -> Path {
        self.root
            .clone()
            .join("namespaces")
            .join(segment(namespace))
    }

    /// The record under `path` and its ETag; `None` if there is none (or it is unreadable,
    /// which is a miss too: the next update replaces it).
    async fn record_at(&self, path: &Path) -> Result<Option<(ActionRecord, UpdateVersion)>> {
        let got = self.fetch_bytes(path, "reading an action result").await?;
        Ok(got.and_then(|(bytes, etag)| decode(&bytes).map(|r| (r, etag))))
    }

    /// A PUT under a condition (`mode`); the caller judges a refused condition.
    async fn put_with(&self, path: &Path, bytes: Bytes, mode: PutMode) -> object_store::Result<()> {
        let options = PutOptions {
            mode,
            ..Default::default()
        };
        self.bucket
            .put_opts(path, bytes.into(), options)
            .await
            .map(drop)
    }

    /// Deletes one result; false if there was none.
    async fn remove_result(&self, path: &Path) -> Result<bool> {
        match self.bucket.head(path).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(bucket_error("removing action results", e)),
        }
        self.bucket
            .delete(path)
            .await
            .map_err(|e| bucket_error("removing action results", e))?;
        Ok(true)
    }

    /// Deletes the objects under `prefix` as the listing streams in; how many there were.
    async fn delete_all(&self, prefix: &Path) -> Result<u64> {
        let paths = self
            .bucket
            .list(Some(prefix))
            .map_ok(|meta| meta.location)
            .boxed();
        let mut deleted = self.bucket.delete_stream(paths);
        let mut count = 0;
        while let Some(done) = deleted.next().await {
            done.map_err(|e| bucket_error("deleting action results", e))?;
            count += 1;
        }
        Ok(count)
    }
}

/// A write that lands only if the object is still at `version` (S3's and Azure's `If-Match`
/// on the ETag, GCS's generation match); `None` if the store named no version.
fn if_match(version: UpdateVersion) -> Option<PutMode> {
    (version.e_tag.is_some() || version.version.is_some()).then_some(PutMode::Update(version))
}

/// `a`'s fields raised to `b`'s where `b` is further along: the later epoch (with its reason)
/// and the later last use.
fn merged(mut a: NamespaceInfo, b: &NamespaceInfo) -> NamespaceInfo {
    if b.epoch > a.epoch {
        a.epoch = b.epoch;
        a.invalidated_at = b.invalidated_at;
        a.reason = b.reason.clone();
    }
    a.last_used = a.last_used.max(b.last_used);
    a
}

#[async_trait]
impl ActionStore for BucketStore {
    async fn get(&self, namespace: &str, action: &Digest) -> Result<Option<ActionRecord>> {
        let path = self.inner.result_path(namespace, action);
        Ok(self.inner.record_at(&path).await?.map(|(r, _)| r))
    }

    async fn put(&self, namespace: &str, action: &Digest, record: ActionRecord) -> Result<()> {
        let path = self.inner.result_path(namespace, action);
        self.inner
            .bucket
            .put(&path, encode(&record).into())
            .await
            .map_err(|e| bucket_error(format!("storing the result of action {action}"), e))?;
        Ok(())
    }

    async fn replace(
        &self,
        namespace: &str,
        action: &Digest,
        seen: &ActionRecord,
        new: Option<ActionRecord>,
    ) -> Result<bool> {
        let path = self.inner.result_path(namespace, action);
        let Some((now, etag)) = self.inner.record_at(&path).await? else {
            return Ok(false);
        };
        if now != *seen {
            return Ok(false);
        }
        match new {
            Some(new) => {
                let Some(mode) = if_match(etag) else {
                    return Ok(false);
                };
                match self.inner.put_with(&path, encode(&new), mode).await {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::Precondition { .. })
                    | Err(object_store::Error::NotFound { .. }) => Ok(false),
                    Err(e) => Err(bucket_error("renewing an action result", e)),
                }
            }
            // S3 has no conditional delete everywhere: a result written between the read and
            // this delete is lost, which costs one cache miss, never a wrong hit.
            None => match self.inner.bucket.delete(&path).await {
                Ok(()) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(bucket_error("dropping an action result", e)),
            },
        }
    }

    async fn remove(&self, namespace: &str, actions: &[Digest]) -> Result<u64> {
        let removals: Vec<_> = actions
            .iter()
            .map(|a| {
                let (inner, path) = (self.inner.clone(), self.inner.result_path(namespace, a));
                async move { inner.remove_result(&path).await }
            })
            .collect();
        let removed: Vec<bool> = futures::stream::iter(removals)
            .buffered(PARALLEL)
            .try_collect()
            .await?;
        Ok(removed.into_iter().filter(|r| *r).count() as u64)
    }

    async fn remove_namespace(&self, namespace: &str) -> Result<u64> {
        let removed = self
            .inner
            .delete_all(&self.inner.results_of(namespace))
            .await?;
        match self
            .inner
            .bucket
            .delete(&self.inner.namespace_path(namespace))
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(removed),
            Err(e) => Err(bucket_error("removing a namespace record", e)),
        }
    }

    /// Reads every record (a listing, then a GET each): fine for a sweep every few minutes of
    /// a cache's results, and what keeps `ac_ttl` and invalidation reclaiming space.
    async fn sweep(&self, dead: &DeadRecord<'_>) -> Result<u64> {
        let inner = &self.inner;
        // Streamed: a page of the listing at a time, never the whole `ac/` in memory.
        let mut listing = inner
            .bucket
            .list(Some(&inner.root.clone().join("ac")))
            .chunks(PARALLEL);
        let mut removed = 0;
        while let Some(metas) = listing.next().await {
            let paths = metas
                .into_iter()
                .map(|m| m.map(|m| m.location))
                .collect::<object_store::Result<Vec<_>>>()
                .map_err(|e| bucket_error("sweep: listing action results", e))?;
            let records = futures::future::try_join_all(paths.into_iter().map(|path| async {
                let record = inner.record_at(&path).await?;
                Ok::<_, Error>((path, record))
            }))
            .await?;
            for (path, record) in records {
                let parts: Vec<_> = path.parts().collect();
                let namespace = parts
                    .len()
                    .checked_sub(2)
                    .and_then(|i| namespace_of(parts[i].as_ref()));
                let name_ok = path.filename().and_then(parse_blob_name).is_some();
                let is_dead = match (&namespace, &record) {
                    (Some(ns), Some((r, _))) if name_ok => dead(ns, r),
                    // Not a record of ours (or unreadable): nothing can ever read it.
                    _ => true,
                };
                if is_dead {
                    match inner.bucket.delete(&path).await {
                        Ok(()) => removed += 1,
                        Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(bucket_error("sweep: deleting a result", e)),
                    }
                }
            }
        }
        Ok(removed)
    }

    async fn namespace_records(&self) -> Result<Vec<NamespaceInfo>> {
        let inner = &self.inner;
        let listed: Vec<_> = inner
            .bucket
            .list(Some(&inner.root.clone().join("namespaces")))
            .try_collect()
            .await
            .map_err(|e| bucket_error("listing namespace records", e))?;
        let mut records = Vec::with_capacity(listed.len());
        for meta in listed {
            let what = "reading a namespace record";
            let Some((bytes, _)) = inner.fetch_bytes(&meta.location, what).await? else {
                continue;
            };
            match serde_json::from_slice::<NamespaceInfo>(&bytes) {
                Ok(info) => records.push(info),
                Err(e) => {
                    tracing::warn!(path = %meta.location, error = %e, "skipping an unreadable namespace record")
                }
            }
        }
        Ok(records)
    }

    /// Every write is durable in the bucket when it returns, so `durable` changes nothing.
    async fn save_namespaces(&self, records: &[NamespaceInfo], _durable: bool) -> Result<()> {
        for record in records {
            self.save_namespace(record, false).await?;
        }
        Ok(())
    }

    async fn bump_namespace(&self, info: &NamespaceInfo) -> Result<NamespaceInfo> {
        self.save_namespace(info, true).await
    }

    fn epoch_refresh(&self) -> Option<std::time::Duration> {
        Some(self.inner.epoch_refresh)
    }

    fn clock(&self) -> u64 {
        self.inner.clock.now() as u64
    }
}

impl BucketStore {
    /// Writes one namespace record merged with the bucket's (see the module doc) and returns
    /// what was written. `bump`: `record` raised its epoch by one over what this node knew;
    /// the epoch written is then above the bucket's too, whatever another node wrote meanwhile,
    /// so two invalidations never collapse into one epoch.
    async fn save_namespace(&self, record: &NamespaceInfo, bump: bool) -> Result<NamespaceInfo> {
        let path = self.inner.namespace_path(&record.name);
        for _ in 0..CONFLICT_TRIES {
            let what = "reading a namespace record";
            let (value, mode) = match self.inner.fetch_bytes(&path, what).await? {
                Some((bytes, etag)) => {
                    let theirs = serde_json::from_slice::<NamespaceInfo>(&bytes).ok();
                    let value = match &theirs {
                        Some(theirs) if bump && theirs.epoch >= record.epoch => NamespaceInfo {
                            epoch: theirs.epoch + 1,
                            last_used: record.last_used.max(theirs.last_used),
                            ..record.clone()
                        },
                        Some(theirs) => merged(record.clone(), theirs),
                        None => record.clone(),
                    };
                    if let Some(theirs) = theirs.filter(|t| *t == value) {
                        return Ok(theirs);
                    }
                    (value, if_match(etag).unwrap_or(PutMode::Overwrite))
                }
                None => (record.clone(), PutMode::Create),
            };
            let json = serde_json::to_vec(&value)
                .map_err(|e| Error::internal("encoding a namespace record", e))?;
            match self.inner.put_with(&path, Bytes::from(json), mode).await {
                Ok(_) => return Ok(value),
                // Another node wrote it meanwhile: merge with that and try again.
                Err(object_store::Error::Precondition { .. })
                | Err(object_store::Error::AlreadyExists { .. }) => continue,
                Err(e) => return Err(bucket_error("saving a namespace record", e)),
            }
        }
        Err(Error::Aborted(format!(
            "saving namespace {:?}: other nodes kept writing it; try again",
            record.name
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::{decode, encode, merged};
    use crate::store::{ActionRecord, NamespaceInfo};
    use bytes::Bytes;

    #[test]
    fn a_namespace_survives_its_trip_through_a_key() {
        for ns in [
            "",
            "ci/main",
            "projects/x/instances/default",
            "a b+c=d@e~f,g%h",
        ] {
            let path = object_store::path::Path::from("ac").join(super::segment(ns));
            let part = path.parts().next_back().unwrap();
            assert_eq!(
                super::namespace_of(part.as_ref()).as_deref(),
                Some(ns),
                "{path}"
            );
        }
        assert_eq!(super::namespace_of("other"), None);
    }

    #[test]
    fn records_round_trip() {
        let r = ActionRecord {
            last_used: 7,
            epoch: 3,
            result: Bytes::from_static(b"result"),
        };
        assert_eq!(decode(&encode(&r)), Some(r));
        assert_eq!(decode(&Bytes::from_static(b"short")), None);
    }

    #[test]
    fn a_merge_keeps_the_later_epoch_and_last_use() {
        let ours = NamespaceInfo {
            name: "ci".into(),
            epoch: 2,
            last_used: 100,
            invalidated_at: Some(50),
            reason: Some("ours".into()),
        };
        let theirs = NamespaceInfo {
            epoch: 3,
            last_used: 90,
            invalidated_at: Some(60),
            reason: Some("theirs".into()),
            ..ours.clone()
        };
        let m = merged(ours.clone(), &theirs);
        assert_eq!((m.epoch, m.last_used), (3, 100));
        assert_eq!(m.reason.as_deref(), Some("theirs"));
        let m = merged(theirs, &ours);
        assert_eq!((m.epoch, m.last_used), (3, 100));
    }
}
