//! The index checkpoint: a flat-file copy of the in-memory index (every blob's hash, size, last
//! use and, for small blobs, segment place), written every few minutes and at shutdown.
//!
//! Since format 6 small blobs have no entry in sled: sled kept one per blob, and at a million
//! blobs its pages, page table and cache alone took more memory than the whole store may use.
//! Their durable index is this checkpoint plus the segment files written since, which are the
//! journal: a start reads the checkpoint, then replays the records of every segment from the
//! checkpoint's `replay_from` on (each record verified before it counts), then forgets entries
//! whose segment is gone. So a checkpoint never has to be in step with the segments:
//! - a blob stored after it is found by the replay (its record is in a segment from
//!   `replay_from` on, since [`crate::store::segments::Segments::replay_floor`] is at or before the segment of every
//!   writer not yet indexed);
//! - a blob moved by compaction after it is found at its new place by the replay;
//! - a blob evicted after it comes back if its record is still there (a cache may keep what it
//!   meant to drop; its bytes are intact and verified), or is forgotten with its segment.
//!
//! File blobs keep their entries in sled (with their chunk sums), which every start reads; the
//! checkpoint gives their last uses.
//!
//! Layout: `HOARDIX3`, replay_from (u32 LE), taken at (u32 LE, store clock), then per blob hash
//! (32 bytes), size (u64 LE), last use (u32 LE), place (u64 LE, `u64::MAX` for none), then the
//! count (u64 LE) and the XXH3-64 of everything before it (u64 LE). Any doubt (missing, short,
//! wrong checksum) means no checkpoint: the start then replays every segment.

use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

use crate::digest::{Digest, HASH_LEN};
use crate::store::index::Index;

const MAGIC: &[u8; 8] = b"HOARDIX3";
const HEAD: usize = 8 + 4 + 4;
const ENTRY: usize = HASH_LEN + 8 + 4 + 8;
const TAIL: usize = 8 + 8;
const NAME: &str = "index.checkpoint";
const NO_PLACE: u64 = u64::MAX;

/// The checkpoint's file in a data dir.
pub(super) fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(NAME)
}

/// What a checkpoint says besides its entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Header {
    /// Records in segments from this id on may be missing from the entries.
    pub replay_from: u32,
    /// When it was taken (store clock): later last uses were lost if the store then crashed.
    pub taken_at: u32,
}

/// Writes a checkpoint of `index` (temp file, fsync, rename, fsync dir), a shard at a time, so
/// neither a copy of the whole index nor a long lock is held. Every last use written counts as
/// persisted. Returns the bytes written.
pub(super) fn write(data_dir: &Path, index: &Index, header: Header) -> std::io::Result<u64> {
    let tmp = data_dir.join(format!("{NAME}.tmp"));
    let written = write_to(&tmp, index, header);
    if written.is_err() {
        // Tens of MB at a million blobs, on a disk that may be full.
        let _ = std::fs::remove_file(&tmp);
    }
    let bytes = written?;
    std::fs::rename(&tmp, path(data_dir))?;
    std::fs::File::open(data_dir)?.sync_all()?;
    Ok(bytes)
}

fn write_to(tmp: &Path, index: &Index, header: Header) -> std::io::Result<u64> {
    let file = std::fs::File::create(tmp)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut sum = Xxh3::new();
    let mut head = Vec::with_capacity(HEAD);
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&header.replay_from.to_le_bytes());
    head.extend_from_slice(&header.taken_at.to_le_bytes());
    sum.update(&head);
    out.write_all(&head)?;
    let mut count = 0u64;
    let mut shard = Vec::new();
    for i in 0..index.shards() {
        shard.clear();
        index.persist_in(i, |c| {
            shard.extend_from_slice(&c.digest.hash);
            shard.extend_from_slice(&c.digest.size.to_le_bytes());
            shard.extend_from_slice(&c.used.to_le_bytes());
            shard.extend_from_slice(&c.place.unwrap_or(NO_PLACE).to_le_bytes());
            count += 1;
        });
        sum.update(&shard);
        out.write_all(&shard)?;
    }
    sum.update(&count.to_le_bytes());
    out.write_all(&count.to_le_bytes())?;
    out.write_all(&sum.digest().to_le_bytes())?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok((HEAD + TAIL) as u64 + count * ENTRY as u64)
}

/// Reads the checkpoint into a fresh index; `None` if there is no whole, intact one.
pub(super) fn read(data_dir: &Path) -> Option<(Header, Index)> {
    // Streamed, not read whole: a buffer the size of the file (52 MB at a million blobs) would
    // stay in the allocator's hands, and in RSS, after the start.
    let mut file = std::fs::File::open(path(data_dir)).ok()?;
    let len = file.metadata().ok()?.len();
    let mut tail = [0u8; TAIL];
    file.seek(SeekFrom::Start(len.checked_sub(TAIL as u64)?))
        .ok()?;
    file.read_exact(&mut tail).ok()?;
    let count = u64::from_le_bytes(tail[..8].try_into().ok()?);
    let body = count.checked_mul(ENTRY as u64)?;
    if len != (HEAD as u64).checked_add(body)?.checked_add(TAIL as u64)? {
        return None;
    }
    file.seek(SeekFrom::Start(0)).ok()?;
    let mut head = [0u8; HEAD];
    file.read_exact(&mut head).ok()?;
    if &head[..8] != MAGIC {
        return None;
    }
    let header = Header {
        replay_from: u32::from_le_bytes(head[8..12].try_into().ok()?),
        taken_at: u32::from_le_bytes(head[12..16].try_into().ok()?),
    };
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
            let used = u32::from_le_bytes(e[HASH_LEN + 8..HASH_LEN + 12].try_into().ok()?);
            let place = u64::from_le_bytes(e[HASH_LEN + 12..].try_into().ok()?);
            let digest = Digest { hash, size };
            index.insert_at(&digest, used, (place != NO_PLACE).then_some(place));
        }
        left -= n;
    }
    sum.update(&tail[..8]);
    if sum.digest() != u64::from_le_bytes(tail[8..].try_into().ok()?) {
        return None;
    }
    Some((header, index))
}

#[cfg(test)]
mod tests {
    use super::{path, read, write, Header};
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
        let header = Header {
            replay_from: 7,
            taken_at: 123,
        };
        write(tmp.path(), &index, header).unwrap();
        let (got, back) = read(tmp.path()).unwrap();
        assert_eq!(got, header);
        let mut a = Vec::new();
        index.for_each(|c| a.push(c));
        let mut b = Vec::new();
        back.for_each(|c| b.push(c));
        a.sort_by_key(|c| c.digest.hash);
        b.sort_by_key(|c| c.digest.hash);
        assert_eq!(a, b);
        // Every last use written counts as persisted.
        assert!(!index.uses_moved(1));
        // One flipped bit anywhere: not trusted.
        let p = path(tmp.path());
        let mut bytes = std::fs::read(&p).unwrap();
        for at in [3, 9, 500, bytes.len() - 12, bytes.len() - 1] {
            bytes[at] ^= 1;
            std::fs::write(&p, &bytes).unwrap();
            assert!(read(tmp.path()).is_none(), "bit {at}");
            bytes[at] ^= 1;
        }
        // Truncated: not trusted.
        std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
        assert!(read(tmp.path()).is_none());
        std::fs::remove_file(&p).unwrap();
        assert!(read(tmp.path()).is_none());
    }
}
