//! Building the in-memory index at start-up: the checkpoint, sled's entries of file blobs, then
//! the replay of the segments written since the checkpoint (see `checkpoint.rs` for why that
//! is enough); and the upgrade of data dirs of formats 4 and 5, whose small blobs had entries
//! in sled.
//!
//! Must not: make a segment record visible before its bytes are verified (the replay checks
//! each one's SHA-256), or name a segment that is gone.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use super::checkpoint::{self, Header};
use super::entry::{decode_entry, load_sled_entries, load_v5_index, Location};
use super::{DROPPING_V5, FORMAT};
use crate::error::{Error, Result};
use crate::store::clock::Clock;
use crate::store::index::Index;
use crate::store::segments::{Place, Segments, HEADER_LEN};

/// Key in tree `atime` of format 5 of the time of the last persist of last uses.
const V5_PERSISTED_AT: &[u8] = b"persisted-at";

/// The index of a format-6 data dir, and when its last uses were last persisted (the
/// checkpoint's time; `None` if there is none).
pub(super) fn recover(
    data_dir: &Path,
    db: &sled::Db,
    cas: &sled::Tree,
    segments: &Segments,
    clock: &Clock,
) -> Result<(Index, Option<u32>)> {
    if db.contains_key(DROPPING_V5)? {
        drop_v5_entries(db, cas)?;
    }
    let started = Instant::now();
    let found = checkpoint::read(data_dir);
    let lost_uses_after = found.as_ref().map(|(h, _)| h.taken_at);
    let (header, index) = found.unwrap_or_else(|| {
        tracing::info!("no index checkpoint: replaying every segment");
        (
            Header {
                replay_from: 0,
                taken_at: 0,
            },
            Index::new(),
        )
    });
    // sled's entries decide which file (and inline) blobs exist, even after a clean shutdown
    // (a call still running past the drain may have written one after the checkpoint); the
    // checkpoint only knows when each was last used.
    {
        let mut used = HashMap::new();
        index.for_each(|c| {
            if c.place.is_none() {
                used.insert(c.digest, c.used);
            }
        });
        for digest in used.keys() {
            index.remove(digest);
        }
        let used: HashMap<_, _> = used.into_iter().map(|(d, u)| (d.hash, u)).collect();
        load_sled_entries(cas, &index, clock, false, |hash| used.get(hash).copied())?;
    }
    // Blobs new to the index were written (or evicted, and come back) after the checkpoint:
    // they count as used then, and the retention floor after a crash covers the rest.
    let used = lost_uses_after.unwrap_or_else(|| clock.now());
    let replayed = replay(segments, &index, header.replay_from, used)?;
    let forgotten = forget_unbacked(segments, &index);
    tracing::info!(
        blobs = index.len(),
        replayed_records = replayed.0,
        skipped_bytes = replayed.1,
        forgotten,
        from_checkpoint = lost_uses_after.is_some(),
        took_ms = started.elapsed().as_millis() as u64,
        "index loaded"
    );
    Ok((index, lost_uses_after))
}

/// Adds every verified record of the segments from `from` on to `index` (new ones used at
/// `used`), and makes those segments durable: a process killed between its `pwrite` and its
/// fdatasync leaves records only in the page cache. Returns (records new to the index, bytes
/// skipped).
fn replay(segments: &Segments, index: &Index, from: u32, used: u32) -> Result<(u64, u64)> {
    let (mut added, mut skipped) = (0, 0);
    for (id, _) in segments.all() {
        if id < from {
            continue;
        }
        skipped += segments
            .scan(id, |place, digest| {
                if index.replayed(&digest, used, place.0) {
                    added += 1;
                }
            })
            .and_then(|skipped| segments.sync_segment(id).map(|()| skipped))
            .map_err(|e| Error::internal(format!("replaying segment {id}"), e))?;
    }
    if skipped > 0 {
        tracing::warn!(
            skipped,
            "segments hold bytes that are no whole record (writes a crash cut off); skipped"
        );
    }
    Ok((added, skipped))
}

/// Drops index entries whose record cannot be there: its segment is gone (compacted after the
/// checkpoint) or ends before it. Returns how many.
fn forget_unbacked(segments: &Segments, index: &Index) -> u64 {
    let lens: HashMap<u32, u64> = segments.all().into_iter().collect();
    let mut gone = Vec::new();
    index.for_each(|c| {
        if let Some(place) = c.place.map(Place) {
            let fits = lens
                .get(&place.segment())
                .is_some_and(|len| place.offset() + HEADER_LEN + c.digest.size <= *len);
            if !fits {
                gone.push(c.digest);
            }
        }
    });
    for digest in &gone {
        index.remove(digest);
    }
    gone.len() as u64
}

/// Upgrades a data dir of format 4 or 5: the index from sled's entries and tree `atime`, the
/// first checkpoint, then the format marked and sled's segment entries and `atime` dropped.
/// Returns as [`recover`] does (the time of format 5's last persist of last uses).
pub(super) fn upgrade(
    data_dir: &Path,
    db: &sled::Db,
    cas: &sled::Tree,
    segments: &Segments,
    clock: &Clock,
) -> Result<(Index, Option<u32>)> {
    let started = Instant::now();
    let atime = db.open_tree("atime")?;
    let persisted_at = atime
        .get(V5_PERSISTED_AT)?
        .and_then(|v| <[u8; 4]>::try_from(&v[..]).ok())
        .map(u32::from_be_bytes);
    let index = load_v5_index(cas, &atime, clock)?;
    drop(atime);
    // The checkpoint first: once the format says 6, it (not sled) lists the small blobs. The
    // floor is the active segment, which no record was written to yet.
    let header = Header {
        replay_from: segments.replay_floor(),
        taken_at: clock.now(),
    };
    checkpoint::write(data_dir, &index, header)
        .map_err(|e| Error::internal("upgrade: writing the first index checkpoint", e))?;
    let mut batch = sled::Batch::default();
    batch.insert("format", &FORMAT.to_be_bytes());
    batch.insert(DROPPING_V5, &[]);
    db.apply_batch(batch)?;
    db.flush()?;
    let dropped = drop_v5_entries(db, cas)?;
    // Format 5's snapshot at a clean shutdown; the checkpoint replaces it.
    let _ = std::fs::remove_file(data_dir.join("index.snapshot"));
    tracing::info!(
        blobs = index.len(),
        dropped_entries = dropped,
        took_ms = started.elapsed().as_millis() as u64,
        "upgrade to format {FORMAT}: small blobs are indexed by the checkpoint and their segments, not sled"
    );
    Ok((index, persisted_at))
}

/// Drops sled's entries of segment blobs and tree `atime` (format 5), then the mark that this
/// is under way. Returns how many entries went.
fn drop_v5_entries(db: &sled::Db, cas: &sled::Tree) -> Result<u64> {
    let mut dropped = 0;
    for entry in cas.iter() {
        let (key, value) = entry?;
        if matches!(decode_entry(&value), Some((Location::Segment { .. }, _))) {
            cas.remove(&key)?;
            dropped += 1;
        }
    }
    db.drop_tree("atime")?;
    db.remove(DROPPING_V5)?;
    db.flush()?;
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::digest::Digest;

    #[test]
    fn replay_finds_records_after_a_hole_and_a_torn_write_and_skips_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let segments = Segments::open(tmp.path(), 1 << 20).unwrap();
        let blobs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1000 + i as usize]).collect();
        let places: Vec<Place> = blobs
            .iter()
            .map(|b| segments.append(&Digest::of(b).hash, b).unwrap().place)
            .collect();
        let id = places[0].segment();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(tmp.path().join(format!("segments/{id:08x}.seg")))
            .unwrap();
        // Record 1: a writer killed before its pwrite while later ones landed (a hole).
        file.write_all_at(&vec![0u8; 1040 + 1], places[1].offset())
            .unwrap();
        // Record 3: its data damaged.
        file.write_all_at(b"x", places[3].offset() + 100).unwrap();
        // A torn record at the end: a header and part of its data.
        let torn = places[4].offset() + 1044;
        file.write_all_at(b"hsg1\xe8\x03\x00\x00", torn).unwrap();
        file.write_all_at(&[9u8; 100], torn + 40).unwrap();
        let index = Index::new();
        let (added, skipped) = replay(&segments, &index, 0, 5).unwrap();
        assert_eq!(added, 3);
        assert_eq!(skipped, 1041 + 1043 + 140);
        for i in [0, 2, 4] {
            let d = Digest::of(&blobs[i]);
            assert_eq!(index.place(&d), Some(Some(places[i].0)), "blob {i}");
        }
        for i in [1, 3] {
            assert_eq!(index.place(&Digest::of(&blobs[i])), None, "blob {i}");
        }
        // A later copy of a blob wins; an earlier one does not move it back.
        let again = segments
            .append(&Digest::of(&blobs[0]).hash, &blobs[0])
            .unwrap()
            .place;
        drop(segments);
        let segments = Segments::open(tmp.path(), 1 << 20).unwrap();
        let (added, _) = replay(&segments, &index, 0, 5).unwrap();
        assert_eq!(added, 0);
        assert_eq!(index.place(&Digest::of(&blobs[0])), Some(Some(again.0)));
        // Entries in segments that are gone, or past a segment's end, are forgotten.
        index.insert_at(&Digest::of(b"elsewhere"), 5, Some(99u64 << 32));
        index.insert_at(
            &Digest::of(b"past the end"),
            5,
            Some((id as u64) << 32 | 1 << 20),
        );
        assert_eq!(forget_unbacked(&segments, &index), 2);
        assert_eq!(index.len(), 3);
    }
}
