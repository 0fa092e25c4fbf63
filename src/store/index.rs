//! An in-memory index of the blobs the store holds: size and last use, for existence checks and
//! eviction.
//!
//! FindMissingBlobs asks about thousands of digests per call and is the hottest call of a warm
//! build; answering it from sled costs a B-tree walk per digest. This index answers from memory
//! (about 60–100 bytes per blob) and is rebuilt from sled's persistent index at start-up. sled
//! stays the source of truth for what exists: every change to sled's index goes through the
//! store, which updates this index in the same call.
//!
//! Last use is recorded here only, as seconds in an atomic, so a read never becomes a disk
//! write; the store persists recently changed times in batches.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::digest::{Digest, HASH_LEN};

/// Shards, so concurrent writers rarely wait on one lock.
const SHARDS: usize = 64;

/// What the index knows of one blob.
struct Entry {
    size: u64,
    /// Last use, in seconds since the Unix epoch (see [`crate::store::sled`]'s clock).
    used: AtomicU32,
    /// The last use that is on disk; the store persists `used` when it is newer.
    persisted: AtomicU32,
}

type Shard = RwLock<HashMap<[u8; HASH_LEN], Entry, BuildHasherDefault<HashPrefix>>>;

/// Blob hash → size and last use, sharded by the hash's first byte.
pub struct Index {
    shards: Vec<Shard>,
}

/// A blob as eviction sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub used: u32,
    pub digest: Digest,
}

impl Index {
    pub fn new() -> Self {
        Self::with_capacity(0)
    }

    /// An index sized for `blobs` from the start, so a start does not build and copy every
    /// table several times over as it grows.
    pub fn with_capacity(blobs: usize) -> Self {
        let per_shard = blobs / SHARDS + blobs / SHARDS / 16;
        Index {
            shards: (0..SHARDS)
                .map(|_| {
                    RwLock::new(HashMap::with_capacity_and_hasher(
                        per_shard,
                        Default::default(),
                    ))
                })
                .collect(),
        }
    }

    fn shard(&self, hash: &[u8; HASH_LEN]) -> &Shard {
        &self.shards[hash[0] as usize % SHARDS]
    }

    fn read(
        shard: &Shard,
    ) -> RwLockReadGuard<'_, HashMap<[u8; HASH_LEN], Entry, BuildHasherDefault<HashPrefix>>> {
        shard.read()
    }

    fn write(
        shard: &Shard,
    ) -> RwLockWriteGuard<'_, HashMap<[u8; HASH_LEN], Entry, BuildHasherDefault<HashPrefix>>> {
        shard.write()
    }

    /// Whether a blob with this hash and size is stored.
    pub fn contains(&self, digest: &Digest) -> bool {
        Self::read(self.shard(&digest.hash))
            .get(&digest.hash)
            .is_some_and(|e| e.size == digest.size)
    }

    /// Like [`Index::contains`], and records a use at `now` if the blob is there. Only a
    /// changed second is stored, so hot blobs do not bounce a cache line between cores.
    pub fn touch(&self, digest: &Digest, now: u32) -> bool {
        let map = Self::read(self.shard(&digest.hash));
        match map.get(&digest.hash) {
            Some(e) if e.size == digest.size => {
                if e.used.load(Ordering::Relaxed) < now {
                    e.used.store(now, Ordering::Relaxed);
                }
                true
            }
            _ => false,
        }
    }

    /// Adds a blob last used at `used` (which is on disk already); returns false if it was
    /// already there, whose last use then only moves forward (a second upload of a blob must
    /// not undo a use recorded for a time to come by `Cas::retain`).
    pub fn insert(&self, digest: &Digest, used: u32) -> bool {
        let mut map = Self::write(self.shard(&digest.hash));
        if let Some(e) = map.get(&digest.hash).filter(|e| e.size == digest.size) {
            e.used.fetch_max(used, Ordering::Relaxed);
            return false;
        }
        map.insert(
            digest.hash,
            Entry {
                size: digest.size,
                used: AtomicU32::new(used),
                persisted: AtomicU32::new(used),
            },
        );
        true
    }

    /// Raises a blob's last use to `used` (as loaded from disk) if it is indexed.
    pub fn set_used(&self, hash: &[u8; HASH_LEN], used: u32) -> bool {
        match Self::read(self.shard(hash)).get(hash) {
            Some(e) => {
                e.used.fetch_max(used, Ordering::Relaxed);
                e.persisted.fetch_max(used, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Calls `f` with every blob used at least `step` seconds after its last persisted use, and
    /// marks that use persisted (the caller writes it). One shard's lock is held at a time.
    pub fn take_unpersisted(&self, step: u32, mut f: impl FnMut(&[u8; HASH_LEN], u32)) {
        let step = step.max(1);
        for shard in &self.shards {
            for (hash, e) in Self::read(shard).iter() {
                let used = e.used.load(Ordering::Relaxed);
                if used >= e.persisted.load(Ordering::Relaxed).saturating_add(step) {
                    e.persisted.store(used, Ordering::Relaxed);
                    f(hash, used);
                }
            }
        }
    }

    /// Removes a blob; returns its size if it was there.
    pub fn remove(&self, digest: &Digest) -> Option<u64> {
        let mut map = Self::write(self.shard(&digest.hash));
        match map.get(&digest.hash) {
            Some(e) if e.size == digest.size => map.remove(&digest.hash).map(|e| e.size),
            _ => None,
        }
    }

    /// Removes a blob only if it was last used before `cutoff`, checked under the shard's lock
    /// so a use racing with eviction either keeps the blob or comes after its removal.
    pub fn remove_if_unused_since(&self, digest: &Digest, cutoff: u32) -> bool {
        let mut map = Self::write(self.shard(&digest.hash));
        match map.get(&digest.hash) {
            Some(e) if e.size == digest.size && e.used.load(Ordering::Relaxed) < cutoff => {
                map.remove(&digest.hash);
                true
            }
            _ => false,
        }
    }

    /// Whether any blob with this hash is indexed, whatever its size.
    pub fn has_hash(&self, hash: &[u8; HASH_LEN]) -> bool {
        Self::read(self.shard(hash)).contains_key(hash)
    }

    /// Calls `f` with every blob, one shard at a time (a shard's lock is held while `f` runs on
    /// its blobs, so keep `f` cheap).
    pub fn for_each(&self, mut f: impl FnMut(Candidate)) {
        for shard in &self.shards {
            for (hash, e) in Self::read(shard).iter() {
                f(Candidate {
                    used: e.used.load(Ordering::Relaxed),
                    digest: Digest {
                        hash: *hash,
                        size: e.size,
                    },
                });
            }
        }
    }

    /// Number of blobs indexed.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| Self::read(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for Index {
    fn default() -> Self {
        Self::new()
    }
}

/// Keys are SHA-256 hashes, already uniformly distributed: their bytes are the hash. (SipHash
/// over 32 bytes would cost more than the rest of the lookup.)
#[derive(Default)]
struct HashPrefix(u64);

impl Hasher for HashPrefix {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Arrays hash their length first, then their contents; keep the content's bytes 8..16
        // (bytes 0.. pick the shard).
        if bytes.len() >= 16 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[8..16]);
            self.0 = u64::from_le_bytes(b);
        }
    }

    fn write_usize(&mut self, _: usize) {}
}

#[cfg(test)]
mod tests {
    use super::{Candidate, Index};
    use crate::digest::Digest;

    #[test]
    fn tracks_hash_and_size() {
        let index = Index::new();
        let a = Digest::of(b"a");
        assert!(!index.contains(&a));
        assert!(index.insert(&a, 1));
        assert!(!index.insert(&a, 1));
        assert!(index.contains(&a));
        assert!(!index.contains(&Digest { size: 2, ..a }));
        for i in 0..1000u32 {
            index.insert(&Digest::of(&i.to_le_bytes()), 1);
        }
        assert_eq!(index.len(), 1001);
        assert_eq!(index.remove(&Digest { size: 2, ..a }), None);
        assert_eq!(index.remove(&a), Some(1));
        assert!(!index.contains(&a));
        assert!(index.contains(&Digest::of(&7u32.to_le_bytes())));
    }

    #[test]
    fn storing_a_blob_again_never_moves_its_last_use_back() {
        let index = Index::new();
        let a = Digest::of(b"held");
        index.insert(&a, 100);
        // Held until 10_000 (Cas::retain), then uploaded again at 200.
        assert!(index.touch(&a, 10_000));
        assert!(!index.insert(&a, 200));
        assert!(!index.remove_if_unused_since(&a, 5_000), "still held");
        let mut seen = Vec::new();
        index.for_each(|c| seen.push(c.used));
        assert_eq!(seen, vec![10_000]);
    }

    #[test]
    fn eviction_spares_blobs_used_since_the_cutoff() {
        let index = Index::new();
        let (old, new) = (Digest::of(b"old"), Digest::of(b"new"));
        index.insert(&old, 100);
        index.insert(&new, 100);
        assert!(index.touch(&new, 200));
        assert!(!index.touch(&Digest { size: 9, ..new }, 300));
        assert!(!index.remove_if_unused_since(&new, 150));
        assert!(index.remove_if_unused_since(&old, 150));
        assert!(!index.contains(&old) && index.contains(&new));
        let mut seen = Vec::new();
        index.for_each(|c| seen.push(c));
        assert_eq!(
            seen,
            vec![Candidate {
                used: 200,
                digest: new
            }]
        );
    }
}
