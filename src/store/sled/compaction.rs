//! Giving back the space of dead segment records: a sealed segment with no live record is
//! deleted; one mostly dead has its live records copied to the active segment, then is
//! deleted. The same move takes inline blobs of data dirs from before format 5 out of sled.
//!
//! A move is: copy the record, make it durable, move the in-memory index from the old place to
//! the new (only if it is still at the old one, under the hash's stripe lock, so a blob evicted
//! or dropped meanwhile stays gone), and only then delete the old segment. After a crash the
//! start finds the copy by replaying the segments written since the last checkpoint (the copy
//! is in one of them), so every blob keeps a whole, durable record; what a crash leaves behind
//! is dead records, which a later pass reclaims.
//!
//! Must not: touch a segment that a writer has appended to but not yet indexed
//! ([`Segments::busy`]), or the active one.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;

use super::entry::{decode_entry, Location};
use super::Inner;
use crate::digest::{verify, Digest, HASH_LEN};
use crate::error::Result;
use crate::store::segments::{Found, Place, HEADER_LEN};

/// Bytes of records a rewrite copies per append and commit round.
const MOVE_BATCH: usize = 4 << 20;

/// A sealed segment is rewritten once less than this share (per cent) of it is live.
const LIVE_PERCENT: u64 = 75;

/// Where a blob to move is.
enum Source {
    Segment(Place),
    /// Inline in sled (data dirs from before format 5), with its entry as read.
    Inline {
        id: u64,
        entry: sled::IVec,
    },
}

/// What a pass did.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Compacted {
    pub segments_removed: u64,
    pub records_moved: u64,
    pub bytes_freed: u64,
}

impl Inner {
    /// Whether enough died since the last pass to make one worthwhile: dead bytes are what
    /// the segments hold beyond the records of indexed blobs (so they are known after a
    /// restart too), less what the last pass chose to leave.
    pub(super) fn compaction_due(&self) -> bool {
        let total = self.segments.total_bytes();
        let dead = total.saturating_sub(self.usage.small_records());
        let new = dead.saturating_sub(self.segments.left_dead());
        new > 0 && new >= self.segment_size.max(total / 10)
    }

    /// One pass over the sealed segments: deletes those without live records and rewrites
    /// those less than [`LIVE_PERCENT`] live, and every one in `force` (the segments a crash
    /// may have left unindexed records in). Blocking; stops early when the store shuts down.
    pub(super) fn compact(&self, force: &[u32]) -> Result<Compacted> {
        let _pass = self.upkeep.pass.lock();
        let mut removed = Vec::new();
        let done = self.compact_locked(force, &mut removed);
        self.forget_places_in(&removed);
        let done = done?;
        let left = self
            .segments
            .total_bytes()
            .saturating_sub(self.usage.small_records());
        self.segments.set_left_dead(left);
        Ok(done)
    }

    fn compact_locked(&self, force: &[u32], removed: &mut Vec<u32>) -> Result<Compacted> {
        // Sealed first, busy second: a sealed segment gets no new appends, so one without a
        // writer between append and entry after it was sealed never gets one again.
        let sealed = self.segments.sealed();
        let busy: HashSet<u32> = self.segments.busy().into_iter().collect();
        let sealed: HashMap<u32, u64> = sealed
            .into_iter()
            .filter(|(id, _)| !busy.contains(id))
            .collect();
        if sealed.is_empty() {
            return Ok(Compacted::default());
        }
        let mut live: HashMap<u32, u64> = HashMap::new();
        self.index.for_each(|c| {
            if let Some(place) = c.place.map(Place) {
                if sealed.contains_key(&place.segment()) {
                    *live.entry(place.segment()).or_default() += HEADER_LEN + c.digest.size;
                }
            }
        });
        // No removal needs to be durable first: after a crash the checkpoint may list blobs of
        // a deleted segment, and the start forgets them (`recover.rs`).
        let mut done = Compacted::default();
        let mut rewrite = HashSet::new();
        let mut ids: Vec<_> = sealed.iter().map(|(id, len)| (*id, *len)).collect();
        ids.sort_unstable();
        for (id, len) in ids {
            let alive = live.get(&id).copied().unwrap_or(0);
            if alive == 0 {
                // Counted before the result: a failed removal may already have taken the
                // segment out of reads.
                removed.push(id);
                self.segments.remove(id)?;
                done.segments_removed += 1;
                done.bytes_freed += len;
            } else if alive * 100 < len * LIVE_PERCENT || force.contains(&id) {
                rewrite.insert(id);
            }
        }
        if rewrite.is_empty() {
            return Ok(done);
        }
        // The blobs placed in the segments to rewrite, grouped by segment.
        let mut named: HashMap<u32, Vec<(Digest, Place)>> = HashMap::new();
        self.index.for_each(|c| {
            if let Some(place) = c.place.map(Place) {
                if rewrite.contains(&place.segment()) {
                    named
                        .entry(place.segment())
                        .or_default()
                        .push((c.digest, place));
                }
            }
        });
        let mut order: Vec<u32> = rewrite.into_iter().collect();
        order.sort_unstable();
        for id in order {
            self.upkeep.check_stopping()?;
            let len = sealed.get(&id).copied().unwrap_or(0);
            let entries = named.remove(&id).unwrap_or_default();
            // A batch at a time, so a pass holds a few MiB of records, not a segment's worth
            // (twice: the copies and the buffer of their append).
            let (mut moved, mut batch_bytes) = (Vec::new(), 0);
            for (digest, place) in entries {
                match self.segments.read(place, &digest.hash, digest.size)? {
                    Found::Data(data) if verify(digest, &data).is_ok() => {
                        batch_bytes += data.len();
                        moved.push((digest, Source::Segment(place), data));
                    }
                    _ => self.drop_damaged(
                        &digest,
                        Location::Segment { place },
                        "compaction: segment record does not match its digest",
                    ),
                }
                if batch_bytes >= MOVE_BATCH {
                    done.records_moved += self.move_small(std::mem::take(&mut moved))?;
                    batch_bytes = 0;
                }
            }
            done.records_moved += self.move_small(moved)?;
            removed.push(id);
            self.segments.remove(id)?;
            done.segments_removed += 1;
            done.bytes_freed += len;
        }
        Ok(done)
    }

    /// Copies small blobs to the active segment and points the index there; each is
    /// `(digest, where it was when read, bytes)`. Returns how many moved (a blob evicted,
    /// dropped or moved meanwhile is not). Blocking.
    fn move_small(&self, blobs: Vec<(Digest, Source, Bytes)>) -> Result<u64> {
        if blobs.is_empty() {
            return Ok(0);
        }
        let mut appended = Vec::with_capacity(blobs.len());
        for (digest, _, data) in &blobs {
            appended.push(self.segments.append(&digest.hash, data)?);
        }
        // The copies are durable before the index names them.
        self.commit.durable_blocking()?;
        let mut moved = 0;
        let mut inline = Vec::new();
        for ((digest, source, _), held) in blobs.iter().zip(&appended) {
            let _stripe = self.stripe(digest);
            let swapped = match source {
                // Reads go to the new place from now on (the old one still serves a read that
                // took it before, until its segment is deleted).
                Source::Segment(old) => self.index.move_place(digest, old.0, held.place.0),
                // An inline blob is indexed without a place while sled has its entry.
                Source::Inline { id, entry } => {
                    let ours = self.index.place(digest) == Some(None)
                        && self
                            .cas
                            .compare_and_swap(digest.hash, Some(entry), None as Option<&[u8]>)?
                            .is_ok();
                    if ours {
                        self.index.set_place(digest, Some(held.place.0));
                        inline.push(*id);
                    }
                    ours
                }
            };
            moved += u64::from(swapped);
        }
        if !inline.is_empty() {
            // Inline data goes once no durable entry names it.
            self.commit.durable_blocking()?;
            for id in inline {
                self.blobs.remove(id.to_be_bytes())?;
            }
        }
        Ok(moved)
    }

    /// Moves the inline blobs of a data dir from before format 5 into segments, a batch at a
    /// time; returns how many moved. Blocking; stops early when the store shuts down.
    pub(super) fn migrate_inline(&self) -> Result<u64> {
        const BATCH: usize = 1000;
        let _pass = self.upkeep.pass.lock();
        let mut total = 0;
        let mut batch = Vec::with_capacity(BATCH);
        // One walk: sled's iterator goes on past the entries the moves rewrite.
        for entry in self.cas.iter() {
            let (key, value) = entry?;
            let Ok(hash) = <[u8; HASH_LEN]>::try_from(&key[..]) else {
                continue;
            };
            let Some((Location::Inline { id }, size)) = decode_entry(&value) else {
                continue;
            };
            let digest = Digest { hash, size };
            if matches!(self.index.place(&digest), Some(Some(_))) {
                // Moved already (a crash came between the copy and the entry's removal, and
                // the start's replay found the copy): only the entry and data are left.
                let _stripe = self.stripe(&digest);
                if self
                    .cas
                    .compare_and_swap(hash, Some(&value), None as Option<&[u8]>)?
                    .is_ok()
                {
                    self.commit.durable_blocking()?;
                    self.blobs.remove(id.to_be_bytes())?;
                }
                continue;
            }
            match self.blobs.get(id.to_be_bytes())? {
                Some(data) if verify(digest, &data).is_ok() => batch.push((
                    digest,
                    Source::Inline { id, entry: value },
                    Bytes::copy_from_slice(&data),
                )),
                _ => self.drop_damaged(
                    &digest,
                    Location::Inline { id },
                    "upgrade: inline data does not match its digest",
                ),
            }
            if batch.len() == BATCH {
                self.upkeep.check_stopping()?;
                total += self.move_small(std::mem::take(&mut batch))?;
            }
        }
        total += self.move_small(batch)?;
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::digest::Digest;
    use crate::store::sled::{Options, SledStore};
    use crate::store::Cas as _;

    fn small(i: u32) -> Bytes {
        Bytes::from(format!("blob {i} ").repeat(300))
    }

    #[tokio::test]
    async fn a_forced_pass_rewrites_live_records_and_removes_the_old_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let options = Options {
            segment_size: 1 << 20,
            ..Options::from_config(&crate::config::Config::default())
        };
        let store = SledStore::open_with(tmp.path(), options.clone()).unwrap();
        let blobs: Vec<Bytes> = (0..100).map(small).collect();
        for b in &blobs {
            store.put(&Digest::of(b), b.clone()).await.unwrap();
        }
        drop(store);
        // Reopened: the segment written to is sealed now, as after a crash.
        let store = SledStore::open_with(tmp.path(), options).unwrap();
        let crashed = store.inner.segments.last_before_open();
        let inner = store.inner.clone();
        let done = tokio::task::spawn_blocking(move || inner.compact(&[crashed]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (done.segments_removed, done.records_moved),
            (1, 100),
            "{done:?}"
        );
        assert!(!store
            .inner
            .segments
            .sealed()
            .iter()
            .any(|(id, _)| *id == crashed));
        for b in &blobs {
            assert_eq!(store.get(&Digest::of(b)).await.unwrap().as_ref(), Some(b));
        }
        // Nothing else to do: the rewritten records are in the active segment.
        let inner = store.inner.clone();
        let again = tokio::task::spawn_blocking(move || inner.compact(&[]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.records_moved, 0, "{again:?}");
    }
}
