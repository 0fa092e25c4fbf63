//! An in-memory set of the blobs the store holds, for existence checks.
//!
//! FindMissingBlobs asks about thousands of digests per call and is the hottest call of a warm
//! build; answering it from sled costs a B-tree walk per digest. This index answers from memory
//! (about 60 bytes per blob) and is rebuilt from sled's persistent index at start-up. sled stays
//! the source of truth: every change to sled's index goes through the store, which updates this
//! set in the same call.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::RwLock;

use crate::digest::{Digest, HASH_LEN};

/// Shards, so concurrent writers rarely wait on one lock.
const SHARDS: usize = 64;

/// One shard: blob hash → size.
type Shard = RwLock<HashMap<[u8; HASH_LEN], u64, BuildHasherDefault<HashPrefix>>>;

/// Blob hash → size, sharded by the hash's first byte.
pub struct Index {
    shards: Vec<Shard>,
}

impl Index {
    pub fn new() -> Self {
        Index {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(HashMap::default()))
                .collect(),
        }
    }

    fn shard(&self, hash: &[u8; HASH_LEN]) -> &Shard {
        &self.shards[hash[0] as usize % SHARDS]
    }

    /// Whether a blob with this hash and size is stored.
    pub fn contains(&self, digest: &Digest) -> bool {
        match self.shard(&digest.hash).read() {
            Ok(map) => map.get(&digest.hash) == Some(&digest.size),
            Err(poisoned) => poisoned.into_inner().get(&digest.hash) == Some(&digest.size),
        }
    }

    pub fn insert(&self, digest: &Digest) {
        let mut map = match self.shard(&digest.hash).write() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.insert(digest.hash, digest.size);
    }

    pub fn remove(&self, digest: &Digest) {
        let mut map = match self.shard(&digest.hash).write() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.remove(&digest.hash);
    }

    /// Number of blobs indexed.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().map(|m| m.len()).unwrap_or(0))
            .sum()
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
    use super::*;

    #[test]
    fn tracks_hash_and_size() {
        let index = Index::new();
        let a = Digest::of(b"a");
        assert!(!index.contains(&a));
        index.insert(&a);
        assert!(index.contains(&a));
        assert!(!index.contains(&Digest { size: 2, ..a }));
        for i in 0..1000u32 {
            index.insert(&Digest::of(&i.to_le_bytes()));
        }
        assert_eq!(index.len(), 1001);
        index.remove(&a);
        assert!(!index.contains(&a));
        assert!(index.contains(&Digest::of(&7u32.to_le_bytes())));
    }
}
