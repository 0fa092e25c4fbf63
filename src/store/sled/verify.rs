//! `verify` (every blob re-hashed with SHA-256, damaged ones dropped) and the removal of
//! orphans: blob files, segments and inline data that no index entry names, and stale temp
//! files. The orphan pass runs in the background after an unclean start (see
//! [`super::upkeep`]); only it and `verify` walk the blob files, start-up reads only the index.
//!
//! Must not: run on a cache request path (the admin `verify` and the upkeep loop call it); hold
//! the upkeep lock while hashing (hours on a big store).

use std::collections::HashSet;

use super::entry::{decode_entry, Location};
use super::Inner;
use crate::digest::{verify, Digest, HASH_LEN};
use crate::error::Result;
use crate::store::files::file_matches;
use crate::store::segments::{Found, Place};
use crate::store::VerifyReport;

impl Inner {
    /// Removes what no index entry names: blob files, inline data, last-use entries, and temp
    /// files from before the store opened. Returns (pieces, bytes) removed.
    pub(super) fn remove_orphans(&self) -> Result<(u64, u64)> {
        let _pass = self.upkeep.pass.lock();
        let (mut pieces, mut bytes) = (0u64, 0u64);
        // Temp files of whole-blob writes never outlive a process.
        for entry in std::fs::read_dir(self.files.uploads_dir())? {
            let entry = entry?;
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with("tmp-") {
                continue;
            }
            // The abandoned-upload sweep may remove the same files meanwhile.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.modified().is_ok_and(|m| m < self.upkeep.opened_at) {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => {
                        pieces += 1;
                        bytes += meta.len();
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        // Blob files: kept only if the index entry of their hash says "file".
        for shard in std::fs::read_dir(self.files.cas_dir())? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            self.upkeep.check_stopping()?;
            for entry in std::fs::read_dir(shard.path())? {
                let entry = entry?;
                let name = entry.file_name();
                let Some(hash) = crate::digest::parse_hex_hash(&name.to_string_lossy()) else {
                    continue;
                };
                let probe = Digest { hash, size: 0 };
                let _stripe = self.stripe(&probe);
                let is_file = matches!(
                    self.cas.get(hash)?.as_deref().and_then(decode_entry),
                    Some((Location::File { .. }, _))
                );
                if !is_file {
                    let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                    match std::fs::remove_file(entry.path()) {
                        Ok(()) => {
                            pieces += 1;
                            bytes += len;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        // Inline data (from before format 5; no new inline writes happen, and the upgrade's
        // move holds the pass lock too): any id no index entry names is an orphan.
        // Which segments may go is fixed before the scan: a writer between append and entry
        // marks its segment busy, so one that is not busy now is fully seen by the scan.
        // Sealed first, busy second: a sealed segment gets no new writer, so one not busy then
        // never will be again.
        let sealed = self.segments.sealed();
        let busy = self.segments.busy();
        let sealed: Vec<(u32, u64)> = sealed
            .into_iter()
            .filter(|(id, _)| !busy.contains(id))
            .collect();
        let mut named = HashSet::new();
        for entry in self.cas.iter() {
            let (_, value) = entry?;
            if let Some((Location::Inline { id }, _)) = decode_entry(&value) {
                named.insert(id);
            }
        }
        let mut live_segments = HashSet::new();
        self.index.for_each(|c| {
            if let Some(place) = c.place {
                live_segments.insert(Place(place).segment());
            }
        });
        for entry in self.blobs.iter() {
            let (key, value) = entry?;
            let Ok(id) = <[u8; 8]>::try_from(&key[..]).map(u64::from_be_bytes) else {
                continue;
            };
            if !named.contains(&id) && self.blobs.remove(&key)?.is_some() {
                pieces += 1;
                bytes += value.len() as u64;
            }
        }
        // Sealed segments the index places no blob in (busy ones may be about to be named).
        // Empty ones are the unused active segments of earlier runs, not lost data.
        let mut removed = Vec::new();
        for (id, len) in sealed {
            if !live_segments.contains(&id) {
                let gone = self.segments.remove(id);
                removed.push(id);
                if let Err(e) = gone {
                    self.forget_places_in(&removed);
                    return Err(e.into());
                }
                if len > 0 {
                    pieces += 1;
                    bytes += len;
                }
            }
        }
        self.forget_places_in(&removed);
        Ok((pieces, bytes))
    }

    /// Re-hashes every blob with SHA-256, drops the damaged ones, then removes orphans.
    pub(super) fn verify(&self) -> Result<VerifyReport> {
        // No `upkeep` lock while hashing (hours on a big store): eviction and shutdown go on;
        // `drop_damaged` takes the hash's stripe lock.
        let mut report = VerifyReport::default();
        let judge = |report: &mut VerifyReport, digest: Digest, location, sound: bool| {
            report.checked_blobs += 1;
            report.checked_bytes += digest.size;
            if !sound {
                self.drop_damaged(
                    &digest,
                    location,
                    "verify: content does not match its digest",
                );
                report.corrupt.push(digest.to_string());
            }
        };
        // Small blobs, a shard of the index at a time (no copy of the whole index).
        let mut placed = Vec::new();
        for shard in 0..self.index.shards() {
            self.upkeep.check_stopping()?;
            placed.clear();
            self.index.for_each_in(shard, |c| {
                if let Some(place) = c.place {
                    placed.push((c.digest, Place(place)));
                }
            });
            for &(digest, place) in &placed {
                let sound = matches!(
                    self.segments.read(place, &digest.hash, digest.size)?,
                    Found::Data(data) if verify(digest, &data).is_ok()
                );
                // Moved (compaction) or gone meanwhile: not this pass's to judge.
                if !sound && self.index.place(&digest) != Some(Some(place.0)) {
                    continue;
                }
                judge(&mut report, digest, Location::Segment { place }, sound);
            }
        }
        // File blobs (and inline ones of older data dirs): sled's entries.
        let mut buf = vec![0u8; 1 << 20];
        for entry in self.cas.iter() {
            self.upkeep.check_stopping()?;
            let (key, value) = entry?;
            let (Ok(hash), Some((location, size))) =
                (<[u8; HASH_LEN]>::try_from(&key[..]), decode_entry(&value))
            else {
                continue;
            };
            let digest = Digest { hash, size };
            let sound = match location {
                // Format 5's, not dropped yet: the index decides about segment blobs.
                Location::Segment { .. } => continue,
                Location::Inline { id } => self
                    .blobs
                    .get(id.to_be_bytes())?
                    .is_some_and(|data| verify(digest, &data).is_ok()),
                Location::File { .. } => {
                    file_matches(&self.files.blob_path(&digest), &digest, &mut buf)
                }
            };
            judge(&mut report, digest, location, sound);
        }
        let (pieces, bytes) = self.remove_orphans()?;
        report.orphans_removed = pieces;
        report.orphan_bytes_removed = bytes;
        Ok(report)
    }
}
