//! A flat-file copy of the in-memory index, written at a clean shutdown, so the next start need
//! not walk sled's `cas` and `atime` trees (seconds at a million blobs, and their pages would
//! fill sled's cache).
//!
//! Trusted only together with the clean-shutdown mark, which is written after it; it is deleted
//! when read, so it can never describe a store that changed after it was written. Any doubt
//! (missing, short, wrong checksum) falls back to reading sled.
//!
//! Layout: `HOARDIX1`, count (u64 LE), then per blob hash (32 bytes), size (u64 LE), last use
//! (u32 LE), then the XXH3-64 of everything before (u64 LE).
//!
//! Segment places are not in it: reads trust a place without asking sled, so the index keeps
//! only places that sled's entries named in this process (a write, a move, the walk of sled
//! after a crash, or a read that went through sled). A blob the snapshot lists but sled lacks
//! is then forgotten at its first read, as before places existed. (Builds between 78535b7 and
//! this change wrote `HOARDIX2`, with places; it is not read, and that start walks sled.)

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

use crate::digest::{Digest, HASH_LEN};
use crate::store::index::Index;

const MAGIC: &[u8; 8] = b"HOARDIX1";
const ENTRY: usize = HASH_LEN + 8 + 4;
const NAME: &str = "index.snapshot";

fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(NAME)
}

/// Writes the snapshot (temp file, fsync, rename, fsync dir).
pub(super) fn write(data_dir: &Path, index: &Index) -> std::io::Result<()> {
    let tmp = data_dir.join(format!("{NAME}.tmp"));
    let file = std::fs::File::create(&tmp)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut sum = Xxh3::new();
    let mut put = |out: &mut BufWriter<std::fs::File>, bytes: &[u8]| -> std::io::Result<()> {
        sum.update(bytes);
        out.write_all(bytes)
    };
    let mut entries = Vec::with_capacity(index.len());
    index.for_each(|c| entries.push(c));
    put(&mut out, MAGIC)?;
    put(&mut out, &(entries.len() as u64).to_le_bytes())?;
    for c in &entries {
        put(&mut out, &c.digest.hash)?;
        put(&mut out, &c.digest.size.to_le_bytes())?;
        put(&mut out, &c.used.to_le_bytes())?;
    }
    out.write_all(&sum.digest().to_le_bytes())?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path(data_dir))?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// Removes any snapshot (at start-up, once it has been read or judged useless).
pub(super) fn remove(data_dir: &Path) {
    let _ = std::fs::remove_file(path(data_dir));
}

/// Reads the snapshot into a fresh index, calling `added(size)` per blob; `None` if there is no
/// whole, intact snapshot.
pub(super) fn read(data_dir: &Path, mut added: impl FnMut(u64)) -> Option<Index> {
    // Streamed, not read whole: a buffer the size of the file (44 MB at a million blobs) would
    // stay in the allocator's hands, and in RSS, after the start.
    let mut file = std::fs::File::open(path(data_dir)).ok()?;
    let len = file.metadata().ok()?.len();
    let mut head = [0u8; 16];
    file.read_exact(&mut head).ok()?;
    if &head[..8] != MAGIC {
        return None;
    }
    let count = u64::from_le_bytes(head[8..16].try_into().ok()?);
    let body = count.checked_mul(ENTRY as u64)?;
    if len != 16u64.checked_add(body)?.checked_add(8)? {
        return None;
    }
    let mut sum = Xxh3::new();
    sum.update(&head);
    let index = Index::with_capacity(count as usize);
    let mut chunk = vec![0u8; ENTRY * 16384];
    let mut left = body as usize;
    while left > 0 {
        let n = left.min(chunk.len());
        file.read_exact(&mut chunk[..n]).ok()?;
        sum.update(&chunk[..n]);
        for e in chunk[..n].chunks_exact(ENTRY) {
            let hash: [u8; HASH_LEN] = e[..HASH_LEN].try_into().ok()?;
            let size = u64::from_le_bytes(e[HASH_LEN..HASH_LEN + 8].try_into().ok()?);
            let used = u32::from_le_bytes(e[HASH_LEN + 8..].try_into().ok()?);
            index.insert(&Digest { hash, size }, used);
        }
        left -= n;
    }
    let mut want = [0u8; 8];
    file.read_exact(&mut want).ok()?;
    if sum.digest() != u64::from_le_bytes(want) {
        return None;
    }
    // Counted only once the whole file proved intact.
    index.for_each(|c| added(c.digest.size));
    Some(index)
}

#[cfg(test)]
mod tests {
    use super::{path, read, remove, write};
    use crate::digest::Digest;
    use crate::store::index::Index;

    #[test]
    fn round_trips_and_refuses_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let index = Index::new();
        for i in 0..1000u32 {
            let place = (i % 2 == 0).then_some(u64::from(i) << 32 | 40);
            index.insert_at(&Digest::of(&i.to_le_bytes()), 1_000 + i, place);
        }
        write(tmp.path(), &index).unwrap();
        let mut total = 0;
        let back = read(tmp.path(), |size| total += size).unwrap();
        assert_eq!(back.len(), 1000);
        assert_eq!(total, 4000);
        let mut a = Vec::new();
        index.for_each(|c| a.push(c));
        let mut b = Vec::new();
        back.for_each(|c| b.push(c));
        a.sort_by_key(|c| c.digest.hash);
        b.sort_by_key(|c| c.digest.hash);
        // Everything but the places, which only sled may vouch for.
        for c in &mut a {
            c.place = None;
        }
        assert_eq!(a, b);
        // One flipped bit anywhere: not trusted.
        let p = path(tmp.path());
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[500] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        assert!(read(tmp.path(), |_| {}).is_none());
        // Truncated: not trusted.
        bytes[500] ^= 1;
        std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
        assert!(read(tmp.path(), |_| {}).is_none());
        remove(tmp.path());
        assert!(read(tmp.path(), |_| {}).is_none());
    }
}
