//! Tree `cas`: the format of an index entry, lookups, rebuilding the in-memory index from it,
//! and taking out blobs that turned out damaged or unbacked.
//!
//! Must not: write blob data or files (`uploads.rs` does; this file only deletes what a damaged
//! entry names).

use super::usage::{charge, Usage};
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

/// `entry` with its location replaced (same size, write time and anything after), for a blob
/// moved to another place.
pub(super) fn relocate(entry: &[u8], location: Location) -> Option<Vec<u8>> {
    let (_, size) = decode_entry(entry)?;
    let mut v = encode_entry(location, size, 0);
    v.truncate(17);
    v.extend_from_slice(entry.get(17..)?);
    Some(v)
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

/// Key in tree `atime` (not 32 bytes long, so never a blob's) of the number of blobs at the
/// last persist, to size the in-memory index before a rebuild.
pub(super) const BLOB_COUNT: &[u8] = b"blob-count";

/// Rebuilds the in-memory index from sled's index entries and last-use times. Reads keys and
/// small values only, never blob contents or blob files. Blobs without a recorded last use
/// (written shortly before a crash) count as used now, so they are not evicted first.
pub(super) fn load_index(
    cas: &sled::Tree,
    atime: &sled::Tree,
    clock: &Clock,
    usage: &Usage,
    inline_threshold: u64,
) -> Result<Index> {
    // The count of the last persist, if any: a close guess of how many entries follow.
    let hint = atime
        .get(BLOB_COUNT)?
        .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
        .map_or(0, u64::from_be_bytes);
    let index = Index::with_capacity(hint as usize);
    let now = clock.now();
    for entry in cas.iter() {
        let (key, value) = entry?;
        let Ok(hash) = <[u8; HASH_LEN]>::try_from(&key[..]) else {
            continue;
        };
        if let Some((location, size)) = decode_entry(&value) {
            let written_at = match entry_written_at(&value) {
                0 => now,
                t => t,
            };
            index.insert_at(&Digest { hash, size }, written_at, location.place());
            usage.blob_added(size, charge(size, inline_threshold));
        }
    }
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

impl Inner {
    /// The index entry for `digest`, if a blob with that hash *and size* is stored.
    pub(super) fn lookup(&self, digest: &Digest) -> Result<Option<Location>> {
        Ok(self.lookup_entry(digest)?.map(|(location, _)| location))
    }

    /// Like [`Inner::lookup`], with the raw entry (for what follows the common part: a file
    /// blob's chunk checksums), so a read decodes one sled get.
    pub(super) fn lookup_entry(&self, digest: &Digest) -> Result<Option<(Location, sled::IVec)>> {
        let Some(v) = self.cas.get(digest.hash)? else {
            return Ok(None);
        };
        match decode_entry(&v) {
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
        let _ = self.atime.remove(digest.hash);
        match self.cas.remove(digest.hash) {
            Ok(Some(entry)) => match decode_entry(&entry) {
                Some((Location::Inline { id }, _)) => {
                    if let Err(e) = self.blobs.remove(id.to_be_bytes()) {
                        tracing::error!(%digest, error = %e, "cannot drop inline data");
                    }
                }
                // The record is dead now; compaction reclaims it.
                Some((Location::Segment { .. }, _)) => {}
                _ => {}
            },
            Ok(None) => {}
            Err(e) => tracing::error!(%digest, error = %e, "cannot drop index entry"),
        }
        let _ = std::fs::remove_file(self.files.blob_path(digest));
    }

    /// The in-memory index listed a blob that sled does not have (e.g. removed during a
    /// shutdown after the index snapshot was taken): drop it, so FindMissingBlobs stops
    /// promising it.
    /// After segments `ids` were deleted: blobs the in-memory index still places in them are
    /// blobs sled has no entry for there (compaction moves every blob sled names), so reads
    /// could no longer find them. Each is looked up in sled: forgotten if sled lacks it (it
    /// was never stored, as far as the source of truth knows), else given sled's place.
    pub(super) fn forget_places_in(&self, ids: &[u32]) {
        if ids.is_empty() {
            return;
        }
        let ids: std::collections::HashSet<u32> = ids.iter().copied().collect();
        let mut placed = Vec::new();
        self.index.for_each(|c| {
            if c.place.is_some_and(|p| ids.contains(&Place(p).segment())) {
                placed.push(c.digest);
            }
        });
        for digest in placed {
            let _stripe = self.stripe(&digest);
            match self.lookup(&digest) {
                Ok(None) => {
                    if self.index.remove(&digest).is_some() {
                        tracing::warn!(%digest, "index listed a blob that is not stored; forgetting it");
                        self.usage
                            .blob_removed(digest.size, self.charge(digest.size));
                    }
                }
                Ok(Some(location)) => self.index.set_place(&digest, location.place()),
                Err(_) => self.index.set_place(&digest, None),
            }
        }
    }

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
