//! An in-memory index of the blobs the store holds: size, last use and (for a small blob) its
//! segment place, for existence checks, eviction and reads that skip sled.
//!
//! FindMissingBlobs asks about thousands of digests per call and is the hottest call of a warm
//! build; answering it from sled costs a B-tree walk per digest. This index answers from memory
//! and is rebuilt at start-up from its checkpoint (see `store/sled/checkpoint.rs`). For small
//! blobs it is the only index: their records in segment files are the journal behind it. For
//! file blobs sled's entries are the source of truth, and the store updates both in one call.
//!
//! Last use is recorded here only, as seconds in an atomic, so a read never becomes a disk
//! write; the checkpoints persist it.
//!
//! The table is our own, because memory per blob is what bounds a cache of millions: a general
//! hash map doubles as it grows, so at a given count it is anywhere from 44% to 87% full, and at
//! a million blobs it was half empty (about 100 bytes per blob). Here each shard is one array of
//! fixed 56-byte slots, any length (not a power of two), grown by a quarter at 90% full and
//! shrunk when eviction leaves it a third full: 62–78 bytes per blob (briefly more, up to ~170,
//! just before a shrink). A slot also keeps where the store put the blob (a segment record),
//! so reading a small blob needs no lookup on disk. Probing is Robin Hood linear probing, which
//! keeps probe runs short at that load and lets a lookup of an absent blob stop early. Slots are
//! placed by a keyed mix of the hash (a per-process seed), so a client cannot craft blobs that
//! pile up in one run.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};

use parking_lot::{RwLock, RwLockReadGuard};

use crate::digest::{Digest, HASH_LEN};

/// Shards, so concurrent writers rarely wait on one lock and a shard's growth copies little.
const SHARDS: usize = 256;

/// A shard grows when more than 9/10 of its slots are taken.
const MAX_LOAD: (usize, usize) = (9, 10);

/// The fewest slots a shard has.
const MIN_SLOTS: usize = 8;

/// `size` of a free slot (no blob is that large).
const FREE: u64 = u64::MAX;

/// `place` of a blob whose place the store keeps elsewhere.
const NO_PLACE: u64 = u64::MAX;

/// What the index knows of one blob.
struct Slot {
    hash: [u8; HASH_LEN],
    /// The blob's size, or [`FREE`].
    size: u64,
    /// Where the store put the blob, as the store encodes it (a segment record's place), so a
    /// read need not look it up on disk; [`NO_PLACE`] if the store keeps that elsewhere.
    place: u64,
    /// Last use, in seconds since the Unix epoch (see [`crate::store::sled`]'s clock).
    used: AtomicU32,
    /// The last use that is on disk; the store persists `used` when it is newer.
    persisted: AtomicU32,
}

impl Slot {
    fn free() -> Self {
        Slot {
            hash: [0; HASH_LEN],
            size: FREE,
            place: NO_PLACE,
            used: AtomicU32::new(0),
            persisted: AtomicU32::new(0),
        }
    }

    fn is_free(&self) -> bool {
        self.size == FREE
    }

    fn candidate(&self) -> Candidate {
        Candidate {
            used: self.used.load(Ordering::Relaxed),
            digest: Digest {
                hash: self.hash,
                size: self.size,
            },
            place: place_of(self.place),
        }
    }
}

/// One shard: slots in Robin Hood order (every blob sits at or after its home slot, wrapping
/// at the end, and no blob is further from its home than the blobs it passed on the way).
struct Table {
    slots: Box<[Slot]>,
    len: usize,
}

/// Blob hash → size, last use and place.
pub struct Index {
    shards: Box<[RwLock<Table>]>,
    seed: u64,
}

/// A blob as eviction sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub used: u32,
    pub digest: Digest,
    /// Its place, if the index keeps one (see [`Index::insert_at`]).
    pub place: Option<u64>,
}

fn place_of(raw: u64) -> Option<u64> {
    (raw != NO_PLACE).then_some(raw)
}

/// A 64-bit finalizer (MurmurHash3's): every bit of the output depends on every bit of the
/// input, so the seed scatters placement.
fn fmix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

impl Table {
    fn with_slots(n: usize) -> Self {
        Table {
            slots: (0..n.max(MIN_SLOTS)).map(|_| Slot::free()).collect(),
            len: 0,
        }
    }

    /// The home slot of a key whose mixed hash is `mixed`: the top bits scaled to the length.
    fn home(&self, mixed: u64) -> usize {
        ((u128::from(mixed << 8) * self.slots.len() as u128) >> 64) as usize
    }

    /// How far the blob in slot `pos` is from its home.
    fn distance(&self, pos: usize, seed: u64) -> usize {
        let home = self.home(mix(&self.slots[pos].hash, seed));
        (pos + self.slots.len() - home) % self.slots.len()
    }

    fn next(&self, pos: usize) -> usize {
        if pos + 1 == self.slots.len() {
            0
        } else {
            pos + 1
        }
    }

    /// The slot holding `hash`, if any.
    fn find(&self, hash: &[u8; HASH_LEN], mixed: u64, seed: u64) -> Option<usize> {
        let mut pos = self.home(mixed);
        let mut dist = 0;
        loop {
            let slot = &self.slots[pos];
            if slot.is_free() {
                return None;
            }
            if slot.hash == *hash {
                return Some(pos);
            }
            // A blob with this hash would have taken this slot from one nearer its home.
            if self.distance(pos, seed) < dist {
                return None;
            }
            pos = self.next(pos);
            dist += 1;
        }
    }

    fn get(&self, hash: &[u8; HASH_LEN], mixed: u64, seed: u64) -> Option<&Slot> {
        self.find(hash, mixed, seed).map(|pos| &self.slots[pos])
    }

    /// Places a blob known not to be in the table (which has room for it).
    fn place(&mut self, mut carried: Slot, seed: u64) {
        let mut pos = self.home(mix(&carried.hash, seed));
        let mut dist = 0;
        loop {
            if self.slots[pos].is_free() {
                self.slots[pos] = carried;
                self.len += 1;
                return;
            }
            let theirs = self.distance(pos, seed);
            if theirs < dist {
                std::mem::swap(&mut self.slots[pos], &mut carried);
                dist = theirs;
            }
            pos = self.next(pos);
            dist += 1;
        }
    }

    /// Empties slot `pos`, shifting the run after it back by one (no tombstones, so lookups
    /// never slow down with churn).
    fn take(&mut self, pos: usize, seed: u64) -> Slot {
        let taken = std::mem::replace(&mut self.slots[pos], Slot::free());
        let mut hole = pos;
        loop {
            let next = self.next(hole);
            if self.slots[next].is_free() || self.distance(next, seed) == 0 {
                break;
            }
            self.slots.swap(hole, next);
            hole = next;
        }
        self.len -= 1;
        taken
    }

    /// Rebuilds the table with `n` slots.
    fn resize(&mut self, n: usize, seed: u64) {
        let old = std::mem::replace(self, Table::with_slots(n));
        for slot in old.slots.into_vec() {
            if !slot.is_free() {
                self.place(slot, seed);
            }
        }
    }

    /// Makes room for one more blob.
    fn reserve_one(&mut self, seed: u64) {
        let n = self.slots.len();
        if (self.len + 1) * MAX_LOAD.1 > n * MAX_LOAD.0 {
            self.resize(n + n / 4 + 1, seed);
        }
    }

    /// Gives memory back once eviction has left the table a third full.
    fn shrink_if_sparse(&mut self, seed: u64) {
        let n = self.slots.len();
        if n > MIN_SLOTS && self.len * 3 < n {
            self.resize(self.len + self.len / 3 + 1, seed);
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter().filter(|s| !s.is_free())
    }
}

/// The keyed mix of a blob hash that places it: bytes 8..16 (bytes of a SHA-256 are uniform;
/// SipHash over 32 bytes would cost more than the rest of the lookup).
fn mix(hash: &[u8; HASH_LEN], seed: u64) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&hash[8..16]);
    fmix64(u64::from_le_bytes(b) ^ seed)
}

/// The shard of a mixed hash: its top byte (the slot within it comes from the rest).
fn shard_of(mixed: u64) -> usize {
    (mixed >> 56) as usize % SHARDS
}

/// Cache lines a probe from its home slot reads first: the slot and the lines after it, where
/// the probe for an absent blob goes on until Robin Hood order says it is not there.
const PREFETCH_LINES: usize = 3;

/// Asks the CPU to bring in the lines a probe from `home` reads first, without waiting for
/// them (a load would hold the CPU's window until it arrives).
#[inline]
fn prefetch_run(slots: &[Slot], home: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let start = std::ptr::from_ref(&slots[home]).cast::<i8>();
        for line in 0..PREFETCH_LINES {
            // SAFETY: SSE is part of x86_64's baseline, and a prefetch only hints the cache:
            // it never faults or reads into the program, so a line past the table's end is
            // harmless.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(line * 64)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    std::hint::black_box(slots[home].size);
}

/// [`Index::touch`] within a table already locked.
fn touch_in(table: &Table, digest: &Digest, mixed: u64, now: u32, seed: u64) -> bool {
    touch_slot(table, digest, mixed, now, seed).is_some()
}

/// The slot of `digest` (hash and size), its use recorded at `now`.
fn touch_slot<'t>(
    table: &'t Table,
    digest: &Digest,
    mixed: u64,
    now: u32,
    seed: u64,
) -> Option<&'t Slot> {
    match table.get(&digest.hash, mixed, seed) {
        Some(s) if s.size == digest.size => {
            if s.used.load(Ordering::Relaxed) < now {
                s.used.store(now, Ordering::Relaxed);
            }
            Some(s)
        }
        _ => None,
    }
}

impl Index {
    pub fn new() -> Self {
        Self::with_capacity(0)
    }

    /// An index sized for `blobs` from the start (about 83% full then), so a start does not
    /// rebuild every shard several times as it fills.
    pub fn with_capacity(blobs: usize) -> Self {
        let per_shard = blobs / SHARDS + blobs / SHARDS / 5;
        Index {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(Table::with_slots(per_shard)))
                .collect(),
            seed: std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish(),
        }
    }

    /// The shard and mixed hash of a blob hash.
    fn locate(&self, hash: &[u8; HASH_LEN]) -> (&RwLock<Table>, u64) {
        let mixed = mix(hash, self.seed);
        (&self.shards[shard_of(mixed)], mixed)
    }

    /// Whether a blob with this hash and size is stored.
    pub fn contains(&self, digest: &Digest) -> bool {
        let (shard, mixed) = self.locate(&digest.hash);
        shard
            .read()
            .get(&digest.hash, mixed, self.seed)
            .is_some_and(|s| s.size == digest.size)
    }

    /// Like [`Index::contains`], and records a use at `now` if the blob is there. Only a
    /// changed second is stored, so hot blobs do not bounce a cache line between cores.
    pub fn touch(&self, digest: &Digest, now: u32) -> bool {
        let (shard, mixed) = self.locate(&digest.hash);
        touch_in(&shard.read(), digest, mixed, now, self.seed)
    }

    /// [`Index::touch`] that also gives the blob's place: `None` if not indexed, `Some(None)`
    /// if indexed without a place.
    pub fn touch_place(&self, digest: &Digest, now: u32) -> Option<Option<u64>> {
        let (shard, mixed) = self.locate(&digest.hash);
        touch_slot(&shard.read(), digest, mixed, now, self.seed).map(|s| place_of(s.place))
    }

    /// [`Index::touch`] of many digests (FindMissingBlobs): whether each is stored, in order.
    ///
    /// In a table of tens of MiB each lookup is a cache miss, and one lookup at a time waits
    /// for each in turn. Here the digests are taken a window of shards at a time (each window's
    /// shards read-locked together, in shard order, so a writer waits for an eighth of a call
    /// at most), and each group of digests first prefetches the lines where each one's probe
    /// starts, so the CPU has all their misses in flight at once; the probes that follow find
    /// those lines in cache.
    pub fn touch_all(&self, digests: &[Digest], now: u32) -> Vec<bool> {
        const GROUP: usize = 32;
        const WINDOW: usize = SHARDS / 8;
        if digests.len() < SHARDS / 4 {
            return digests.iter().map(|d| self.touch(d, now)).collect();
        }
        // Each digest's mixed hash, and the digests ordered by window (a counting sort).
        let mixed: Vec<u64> = digests.iter().map(|d| mix(&d.hash, self.seed)).collect();
        let window_of = |m: u64| shard_of(m) / WINDOW;
        let mut starts = [0usize; SHARDS / WINDOW + 1];
        for &m in &mixed {
            starts[window_of(m) + 1] += 1;
        }
        for w in 1..starts.len() {
            starts[w] += starts[w - 1];
        }
        let mut order = vec![0usize; digests.len()];
        let mut next = starts;
        for (i, &m) in mixed.iter().enumerate() {
            let w = window_of(m);
            order[next[w]] = i;
            next[w] += 1;
        }
        let mut found = vec![false; digests.len()];
        for w in 0..SHARDS / WINDOW {
            let members = &order[starts[w]..starts[w + 1]];
            if members.is_empty() {
                continue;
            }
            let first = w * WINDOW;
            let tables: Vec<RwLockReadGuard<'_, Table>> = self.shards[first..first + WINDOW]
                .iter()
                .map(|s| s.read())
                .collect();
            for group in members.chunks(GROUP) {
                // Where each probe starts, computed apart from the prefetches, so the loop of
                // prefetches is short and issues all of them at once.
                let mut at = [(0, 0); GROUP];
                for (a, &i) in at.iter_mut().zip(group) {
                    let table = shard_of(mixed[i]) - first;
                    *a = (table, tables[table].home(mixed[i]));
                }
                for &(table, home) in &at[..group.len()] {
                    prefetch_run(&tables[table].slots, home);
                }
                for (&i, &(table, _)) in group.iter().zip(&at) {
                    found[i] = touch_in(&tables[table], &digests[i], mixed[i], now, self.seed);
                }
            }
        }
        found
    }

    /// Adds a blob last used at `used` (which is on disk already); returns false if it was
    /// already there, whose last use then only moves forward (a second upload of a blob must
    /// not undo a use recorded for a time to come by `Cas::retain`). A blob with the same hash
    /// and another size is replaced.
    pub fn insert(&self, digest: &Digest, used: u32) -> bool {
        self.insert_at(digest, used, None)
    }

    /// [`Index::insert`] with the blob's place, kept for reads (a blob already indexed keeps
    /// the place it has, or takes this one if it had none). Reads trust a place: it must name
    /// a durable record of this blob.
    pub fn insert_at(&self, digest: &Digest, used: u32, place: Option<u64>) -> bool {
        let place = place.unwrap_or(NO_PLACE);
        let (shard, mixed) = self.locate(&digest.hash);
        let mut table = shard.write();
        if let Some(pos) = table.find(&digest.hash, mixed, self.seed) {
            let slot = &mut table.slots[pos];
            if slot.size == digest.size {
                slot.used.fetch_max(used, Ordering::Relaxed);
                if slot.place == NO_PLACE {
                    slot.place = place;
                }
                return false;
            }
            slot.size = digest.size;
            slot.place = place;
            slot.used = AtomicU32::new(used);
            slot.persisted = AtomicU32::new(used);
            return true;
        }
        table.reserve_one(self.seed);
        table.place(
            Slot {
                hash: digest.hash,
                size: digest.size,
                place,
                used: AtomicU32::new(used),
                persisted: AtomicU32::new(used),
            },
            self.seed,
        );
        true
    }

    /// Records a blob's new place (its store moved it), if it is indexed.
    pub fn set_place(&self, digest: &Digest, place: Option<u64>) {
        let (shard, mixed) = self.locate(&digest.hash);
        let mut table = shard.write();
        if let Some(pos) = table.find(&digest.hash, mixed, self.seed) {
            let slot = &mut table.slots[pos];
            if slot.size == digest.size {
                slot.place = place.unwrap_or(NO_PLACE);
            }
        }
    }

    /// The blob's place without recording a use: `None` if not indexed (with this size),
    /// `Some(None)` if indexed without a place.
    pub fn place(&self, digest: &Digest) -> Option<Option<u64>> {
        let (shard, mixed) = self.locate(&digest.hash);
        shard
            .read()
            .get(&digest.hash, mixed, self.seed)
            .filter(|s| s.size == digest.size)
            .map(|s| place_of(s.place))
    }

    /// Moves a blob from place `from` to `to`, only if it is still at `from` (compaction: a
    /// blob evicted, dropped or moved meanwhile stays as it is). Returns whether it moved.
    pub fn move_place(&self, digest: &Digest, from: u64, to: u64) -> bool {
        let (shard, mixed) = self.locate(&digest.hash);
        let mut table = shard.write();
        match table.find(&digest.hash, mixed, self.seed) {
            Some(pos) if table.slots[pos].size == digest.size && table.slots[pos].place == from => {
                table.slots[pos].place = to;
                true
            }
            _ => false,
        }
    }

    /// A record found when segments are replayed after a crash: adds the blob if it is not
    /// indexed (returns true), or moves it to `place` if that is later than the place it has
    /// (records are appended in order, so the later copy is the one compaction keeps).
    pub fn replayed(&self, digest: &Digest, used: u32, place: u64) -> bool {
        let (shard, mixed) = self.locate(&digest.hash);
        let mut table = shard.write();
        if let Some(pos) = table.find(&digest.hash, mixed, self.seed) {
            let slot = &mut table.slots[pos];
            if slot.size == digest.size {
                if slot.place == NO_PLACE || slot.place < place {
                    slot.place = place;
                }
                return false;
            }
        }
        drop(table);
        self.insert_at(digest, used, Some(place))
    }

    /// Raises a blob's last use to `used` (as loaded from disk) if it is indexed.
    pub fn set_used(&self, hash: &[u8; HASH_LEN], used: u32) -> bool {
        let (shard, mixed) = self.locate(hash);
        match shard.read().get(hash, mixed, self.seed) {
            Some(s) => {
                s.used.fetch_max(used, Ordering::Relaxed);
                s.persisted.fetch_max(used, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Removes the blob with this hash if `keep` does not hold for it; returns its size if it
    /// was removed.
    fn remove_unless(&self, digest: &Digest, keep: impl FnOnce(&Slot) -> bool) -> Option<u64> {
        let (shard, mixed) = self.locate(&digest.hash);
        let mut table = shard.write();
        let pos = table.find(&digest.hash, mixed, self.seed)?;
        let slot = &table.slots[pos];
        if slot.size != digest.size || keep(slot) {
            return None;
        }
        let size = table.take(pos, self.seed).size;
        table.shrink_if_sparse(self.seed);
        Some(size)
    }

    /// Removes a blob; returns its size if it was there.
    pub fn remove(&self, digest: &Digest) -> Option<u64> {
        self.remove_unless(digest, |_| false)
    }

    /// Removes a blob only if it was last used before `cutoff`, checked under the shard's lock
    /// so a use racing with eviction either keeps the blob or comes after its removal.
    pub fn remove_if_unused_since(&self, digest: &Digest, cutoff: u32) -> bool {
        self.remove_unless(digest, |s| s.used.load(Ordering::Relaxed) >= cutoff)
            .is_some()
    }

    /// Calls `f` with every blob, one shard at a time (a shard's lock is held while `f` runs on
    /// its blobs, so keep `f` cheap).
    pub fn for_each(&self, mut f: impl FnMut(Candidate)) {
        for shard in 0..self.shards.len() {
            self.for_each_in(shard, &mut f);
        }
    }

    /// Whether some blob's last use moved `step` seconds or more past the one last persisted.
    pub fn uses_moved(&self, step: u32) -> bool {
        self.shards.iter().any(|shard| {
            shard.read().iter().any(|s| {
                s.used.load(Ordering::Relaxed)
                    >= s.persisted.load(Ordering::Relaxed).saturating_add(step)
            })
        })
    }

    /// [`Index::for_each_in`] for a checkpoint: each blob's last use counts as persisted.
    pub fn persist_in(&self, shard: usize, mut f: impl FnMut(Candidate)) {
        let Some(shard) = self.shards.get(shard) else {
            return;
        };
        for s in shard.read().iter() {
            let c = s.candidate();
            s.persisted.store(c.used, Ordering::Relaxed);
            f(c);
        }
    }

    /// Number of shards, for [`Index::for_each_in`].
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// [`Index::for_each`] of one shard, so a long pass can work a shard at a time without
    /// holding a lock or copying the whole index.
    pub fn for_each_in(&self, shard: usize, mut f: impl FnMut(Candidate)) {
        let Some(shard) = self.shards.get(shard) else {
            return;
        };
        for s in shard.read().iter() {
            f(s.candidate());
        }
    }

    /// Number of blobs indexed.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of slots the index holds (taken or free), for memory figures.
    pub fn slot_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().slots.len() * std::mem::size_of::<Slot>())
            .sum()
    }
}

impl Default for Index {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::{Candidate, Index, MAX_LOAD, MIN_SLOTS};
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
                digest: new,
                place: None,
            }]
        );
    }

    /// Every slot after the first free one respects Robin Hood order, so lookups are sound.
    fn assert_ordered(index: &Index) {
        for shard in index.shards.iter() {
            let t = shard.read();
            assert_eq!(t.iter().count(), t.len);
            assert!(t.len * MAX_LOAD.1 <= t.slots.len() * MAX_LOAD.0 || t.slots.len() == MIN_SLOTS);
            for pos in 0..t.slots.len() {
                if t.slots[pos].is_free() {
                    continue;
                }
                let d = t.distance(pos, index.seed);
                // Every slot between home and here is taken (no gap in a run).
                for back in 1..=d {
                    let p = (pos + t.slots.len() - back) % t.slots.len();
                    assert!(!t.slots[p].is_free(), "gap before a displaced blob");
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Random inserts and removals (of a small key space, so the same blobs come and go),
        /// through growth and shrinking, agree with a plain map.
        #[test]
        fn agrees_with_a_map(ops in proptest::collection::vec((0u16..3000, 0u8..4, 1u64..3), 1..6000)) {
            let index = Index::with_capacity(0);
            let mut model = std::collections::HashMap::new();
            for (key, op, size) in ops {
                let d = Digest { size, ..Digest::of(&key.to_le_bytes()) };
                match op {
                    0 | 1 => {
                        let fresh = model.get(&d.hash) != Some(&size);
                        proptest::prop_assert_eq!(index.insert(&d, 7), fresh);
                        model.insert(d.hash, size);
                    }
                    2 => {
                        let had = model.get(&d.hash) == Some(&size);
                        proptest::prop_assert_eq!(index.remove(&d), had.then_some(size));
                        if had {
                            model.remove(&d.hash);
                        }
                    }
                    _ => {
                        // Remove most of what is there, to make shards shrink.
                        let keys: Vec<_> = model.iter().map(|(h, s)| (*h, *s)).collect();
                        for (hash, size) in keys.into_iter().filter(|(h, _)| h[1] % 8 != 0) {
                            let gone = index.remove_if_unused_since(&Digest { hash, size }, 8);
                            proptest::prop_assert!(gone);
                            model.remove(&hash);
                        }
                    }
                }
                proptest::prop_assert_eq!(index.contains(&d), model.get(&d.hash) == Some(&d.size));
            }
            assert_ordered(&index);
            proptest::prop_assert_eq!(index.len(), model.len());
            for (hash, size) in &model {
                let there = index.contains(&Digest { hash: *hash, size: *size });
                proptest::prop_assert!(there);
            }
            let mut seen = 0;
            index.for_each(|c| {
                assert_eq!(model.get(&c.digest.hash), Some(&c.digest.size));
                seen += 1;
            });
            proptest::prop_assert_eq!(seen, model.len());
        }
    }

    #[test]
    fn a_place_is_kept_moved_and_dropped_with_its_blob() {
        let index = Index::new();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        index.insert_at(&a, 1, Some(7));
        index.insert(&b, 1);
        assert_eq!(index.touch_place(&a, 2), Some(Some(7)));
        assert_eq!(index.touch_place(&b, 2), Some(None));
        assert_eq!(index.touch_place(&Digest { size: 5, ..a }, 2), None);
        // Stored again: the place it has stays.
        assert!(!index.insert_at(&a, 3, Some(9)));
        assert_eq!(index.touch_place(&a, 3), Some(Some(7)));
        index.set_place(&a, Some(11));
        index.set_place(&Digest { size: 5, ..b }, Some(12));
        assert_eq!(index.touch_place(&a, 3), Some(Some(11)));
        assert_eq!(index.touch_place(&b, 3), Some(None));
        index.remove(&a);
        assert_eq!(index.touch_place(&a, 4), None);
    }

    #[test]
    fn touching_many_at_once_agrees_with_one_at_a_time() {
        let index = Index::new();
        let stored: Vec<Digest> = (0..3000u32).map(|i| Digest::of(&i.to_le_bytes())).collect();
        for d in &stored {
            index.insert(d, 1);
        }
        // Stored, absent, and stored under another size, interleaved.
        let asked: Vec<Digest> = (0..3000u32)
            .map(|i| match i % 3 {
                0 => stored[i as usize],
                1 => Digest::of(&(i + 10_000).to_le_bytes()),
                _ => Digest {
                    size: 99,
                    ..stored[i as usize]
                },
            })
            .collect();
        let found = index.touch_all(&asked, 5);
        let one_by_one: Vec<bool> = asked.iter().map(|d| index.contains(d)).collect();
        assert_eq!(found, one_by_one);
        assert_eq!(found.iter().filter(|f| **f).count(), 1000);
        let mut used = std::collections::HashMap::new();
        index.for_each(|c| {
            used.insert(c.digest.hash, c.used);
        });
        for (i, d) in stored.iter().enumerate() {
            assert_eq!(used[&d.hash], if i % 3 == 0 { 5 } else { 1 }, "blob {i}");
        }
        assert_eq!(index.touch_all(&asked[..10], 6), one_by_one[..10].to_vec());
    }

    #[test]
    fn a_million_blobs_fit_in_about_seventy_bytes_each() {
        let index = Index::with_capacity(0);
        for i in 0..1_000_000u64 {
            // Uniform hashes without the cost of SHA-256 in a debug build.
            let mut hash = [0u8; 32];
            hash[..8].copy_from_slice(&super::fmix64(i).to_le_bytes());
            hash[8..16].copy_from_slice(&super::fmix64(!i).to_le_bytes());
            index.insert(&Digest { hash, size: 1 }, 1);
        }
        assert_eq!(index.len(), 1_000_000);
        let per_blob = index.slot_bytes() / 1_000_000;
        assert!((62..=79).contains(&per_blob), "{per_blob} bytes per blob");
        let sized = Index::with_capacity(1_000_000);
        assert!(sized.slot_bytes() / 1_000_000 <= 70);
    }
}
