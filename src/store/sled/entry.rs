//! Tree `cas`: the format of an index entry (large blobs since format 6; every blob before),
//! lookups (small blobs from the in-memory index), loading entries into the in-memory index,
//! and taking out blobs that turned out damaged or unbacked.
//!
//! Must not: write blob data or files (`uploads.rs` does; this file only deletes what a damaged
//! entry names).

use std::sync::atomic::Ordering::Relaxed;

use super::Inner;
use crate::digest::{Digest, HASH_LEN};
use crate::error::{Error, Result};
use crate::store::chunk_sums;
use crate::store::clock::Clock;
use crate::store::index::Index;
use crate::store::segments::Place;

const INLINE: u8 = 0;
const FILE: u8 = 1;
const SEGMENT: u8 = 2;

/// Where the index says a blob is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Location {
    /// In tree `blobs` under this id (written by hoard before format 5; moved into segments in
    /// the background after an upgrade).
    Inline { id: u64 },
    /// A record in a segment file ([`crate::store::segments`]).
    Segment { place: Place },
    /// A file, with the XXH3-64 of its content: re-checking SHA-256 on every read would cost
    /// about as much CPU as the rest of the read, while XXH3 catches bit rot and truncation at a
    /// small fraction of that.
    File { xxh3: u64 },
}

impl Location {
    /// The segment place, which the in-memory index keeps so reads skip sled.
    pub(super) fn place(&self) -> Option<u64> {
        match self {
            Location::Segment { place } => Some(place.0),
            _ => None,
        }
    }
}

/// An index entry; `written_at` (store seconds) is the blob's first use, so a new blob needs no
/// separate last-use write.
pub(super) fn encode_entry(location: Location, size: u64, written_at: u32) -> Vec<u8> {
    let (tag, extra) = match location {
        Location::Inline { id } => (INLINE, id),
        Location::File { xxh3 } => (FILE, xxh3),
        Location::Segment { place } => (SEGMENT, place.0),
    };
    let mut v = Vec::with_capacity(21);
    v.push(tag);
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&extra.to_be_bytes());
    v.extend_from_slice(&written_at.to_be_bytes());
    v
}

/// A file blob's index entry: the common part, then the checksum of every chunk (see
/// [`chunk_sums`]; entries written before those existed end after `written_at`).
pub(super) fn encode_file_entry(xxh3: u64, size: u64, written_at: u32, sums: &[u64]) -> Vec<u8> {
    let mut v = encode_entry(Location::File { xxh3 }, size, written_at);
    v.reserve(sums.len() * 8);
    for sum in sums {
        v.extend_from_slice(&sum.to_be_bytes());
    }
    v
}

/// The chunk checksums of a file blob's entry, if it has them (and the right number of them).
pub(super) fn entry_sums(v: &[u8], size: u64) -> Option<Vec<u64>> {
    let raw = v.get(21..)?;
    if raw.is_empty() || raw.len() != chunk_sums::count(size) * 8 {
        return None;
    }
    Some(
        raw.chunks_exact(8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
            .collect(),
    )
}

/// When an index entry was written (0 for entries from before it was recorded).
fn entry_written_at(v: &[u8]) -> u32 {
    v.get(17..21)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_be_bytes)
}

pub(super) fn decode_entry(v: &[u8]) -> Option<(Location, u64)> {
    let size = u64::from_be_bytes(v.get(1..9)?.try_into().ok()?);
    let extra = u64::from_be_bytes(v.get(9..17)?.try_into().ok()?);
    let location = match *v.first()? {
        INLINE => Location::Inline { id: extra },
        FILE => Location::File { xxh3: extra },
        SEGMENT => Location::Segment {
            place: Place(extra),
        },
        _ => return None,
    };
    Some((location, size))
}

/// Key in tree `atime` of format 5 (not 32 bytes long, so never a blob's) of the number of
/// blobs at the last persist, to size the in-memory index before a rebuild.
const BLOB_COUNT: &[u8] = b"blob-count";

/// Builds the in-memory index from a format-4 or format-5 data dir: sled's entries of every
/// blob (with their segment places) and the last uses of tree `atime`. Reads keys and small
/// values only, never blob contents. Blobs without a recorded last use count as used when they
/// were written (or now, for entries from before that was recorded).
pub(super) fn load_v5_index(cas: &sled::Tree, atime: &sled::Tree, clock: &Clock) -> Result<Index> {
    // The count of the last persist, if any: a close guess of how many entries follow.
    let hint = atime
        .get(BLOB_COUNT)?
        .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
        .map_or(0, u64::from_be_bytes);
    let index = Index::with_capacity(hint as usize);
    load_sled_entries(cas, &index, clock, true, |_| None)?;
    for entry in atime.iter() {
        let (key, value) = entry?;
        let (Ok(hash), Ok(used)) = (
            <[u8; HASH_LEN]>::try_from(&key[..]),
            <[u8; 4]>::try_from(&value[..]),
        ) else {
            continue;
        };
        index.set_used(&hash, u32::from_be_bytes(used));
    }
    Ok(index)
}

/// Adds the blobs sled has entries for to `index`: file and inline blobs, and with
/// `segments` also segment blobs (format 5; since format 6 their entries are dropped). A blob's
/// last use is `used(hash)` if known, else when it was written.
pub(super) fn load_sled_entries(
    cas: &sled::Tree,
    index: &Index,
    clock: &Clock,
    segments: bool,
    used: impl Fn(&[u8; HASH_LEN]) -> Option<u32>,
) -> Result<()> {
    let now = clock.now();
    for entry in cas.iter() {
        let (key, value) = entry?;
        let Ok(hash) = <[u8; HASH_LEN]>::try_from(&key[..]) else {
            continue;
        };
        let Some((location, size)) = decode_entry(&value) else {
            continue;
        };
        if matches!(location, Location::Segment { .. }) && !segments {
            continue;
        }
        let at = used(&hash).unwrap_or(match entry_written_at(&value) {
            0 => now,
            t => t,
        });
        index.insert_at(&Digest { hash, size }, at, location.place());
    }
    Ok(())
}

impl Inner {
    /// The index entry for `digest`, if a blob with that hash *and size* is stored.
    pub(super) fn lookup(&self, digest: &Digest) -> Result<Option<Location>> {
        Ok(self.lookup_entry(digest)?.map(|(location, _)| location))
    }

    /// Like [`Inner::lookup`], with the raw entry (for what follows the common part: a file
    /// blob's chunk checksums), so a read decodes one sled get. A small blob's place is the
    /// in-memory index's (the only index of segment blobs); other blobs are sled's entries.
    pub(super) fn lookup_entry(&self, digest: &Digest) -> Result<Option<(Location, sled::IVec)>> {
        if let Some(Some(place)) = self.index.place(digest) {
            let location = Location::Segment {
                place: Place(place),
            };
            let entry = encode_entry(location, digest.size, 0);
            return Ok(Some((location, entry.into())));
        }
        let Some(v) = self.cas.get(digest.hash)? else {
            return Ok(None);
        };
        match decode_entry(&v) {
            // A format-5 entry an upgrade has not dropped yet: the index decides.
            Some((Location::Segment { .. }, _)) => Ok(None),
            Some((location, size)) if size == digest.size => Ok(Some((location, v))),
            Some(_) => Ok(None),
            None => Err(Error::internal(
                format!("index entry of {digest}"),
                "corrupt index entry",
            )),
        }
    }

    /// After waiting for a concurrent writer's copy to be durable: that copy is still there
    /// (its writer takes it back if its flush failed).
    pub(super) fn still_stored(&self, digest: &Digest) -> Result<()> {
        match self.lookup(digest)? {
            Some(_) => Ok(()),
            None => Err(Error::Unavailable(format!(
                "blob {digest} was being stored by another call that failed; retry"
            ))),
        }
    }

    /// Counts a blob that just became visible (and is used now), with the segment place its
    /// entry names if it is a small blob this call stored.
    pub(super) fn added(&self, digest: &Digest, place: Option<Place>) {
        if self
            .index
            .insert_at(digest, self.clock.now(), place.map(|p| p.0))
        {
            self.usage.blob_added(digest.size, self.charge(digest.size));
        }
    }

    /// Drops a blob that is gone or damaged on disk, so clients see it as missing and upload it
    /// again instead of being served bad bytes.
    ///
    /// `judged` is the entry that was found damaged: if the blob was evicted and stored again
    /// meanwhile (another entry now), the fresh copy is left alone.
    pub(super) fn drop_damaged(&self, digest: &Digest, judged: Location, why: &str) {
        let _stripe = self.stripe(digest);
        match self.lookup(digest) {
            Ok(Some(current)) if current == judged => {}
            Ok(_) => return, // gone already, or replaced by a fresh copy
            Err(e) => tracing::error!(%digest, error = %e, "cannot read index entry"),
        }
        tracing::error!(%digest, why, "stored blob is damaged; removing it");
        if self.index.remove(digest).is_some() {
            self.usage
                .blob_removed(digest.size, self.charge(digest.size));
        }
        // A segment record is dead once the index forgets it; compaction reclaims it (after a
        // crash before the next checkpoint it may be indexed again, and found damaged again).
        if matches!(judged, Location::Segment { .. }) {
            self.upkeep.checkpoint_soon.store(true, Relaxed);
            return;
        }
        match self.cas.remove(digest.hash) {
            Ok(Some(entry)) => {
                if let Some((Location::Inline { id }, _)) = decode_entry(&entry) {
                    if let Err(e) = self.blobs.remove(id.to_be_bytes()) {
                        tracing::error!(%digest, error = %e, "cannot drop inline data");
                    }
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!(%digest, error = %e, "cannot drop index entry"),
        }
        let _ = std::fs::remove_file(self.files.blob_path(digest));
    }

    /// After segments `ids` were deleted: blobs the index still places in them are lost
    /// (compaction moves every live record before it deletes a segment, so these are blobs a
    /// race left behind), and forgotten, so FindMissingBlobs stops promising them.
    pub(super) fn forget_places_in(&self, ids: &[u32]) {
        if ids.is_empty() {
            return;
        }
        let ids: std::collections::HashSet<u32> = ids.iter().copied().collect();
        let mut placed = Vec::new();
        self.index.for_each(|c| {
            if let Some(p) = c.place.filter(|p| ids.contains(&Place(*p).segment())) {
                placed.push((c.digest, p));
            }
        });
        for (digest, place) in placed {
            let _stripe = self.stripe(&digest);
            // Only if it is still there (not moved or stored anew meanwhile).
            if self.index.place(&digest) == Some(Some(place))
                && self.index.remove(&digest).is_some()
            {
                tracing::warn!(%digest, "index placed a blob in a deleted segment; forgetting it");
                self.usage
                    .blob_removed(digest.size, self.charge(digest.size));
            }
        }
    }

    /// The in-memory index listed a blob that its store does not have: drop it, so
    /// FindMissingBlobs stops promising it.
    pub(super) fn forget_if_unbacked(&self, digest: &Digest, indexed: bool) {
        if !indexed {
            return;
        }
        let _stripe = self.stripe(digest);
        if matches!(self.lookup(digest), Ok(None)) && self.index.remove(digest).is_some() {
            tracing::warn!(%digest, "index listed a blob that is not stored; forgetting it");
            self.usage
                .blob_removed(digest.size, self.charge(digest.size));
        }
    }
}
