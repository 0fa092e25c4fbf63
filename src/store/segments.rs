//! The segment tier: small blobs appended to segment files (`data_dir/segments/<id>.seg`), the
//! log-structured layout of Bitcask and bb-storage's local blob store.
//!
//! sled kept small blobs as values at about 2.5× their bytes and never gave space back. Here a
//! blob costs its bytes plus a 40-byte record header, and the space of dead records comes back
//! when their segment is compacted or deleted whole (the index's business: it knows which
//! records are live; see `store/sled/compaction.rs`).
//!
//! A record is `magic (4) ‖ length u32 LE ‖ hash (32) ‖ data`. Writers reserve their region
//! under a short lock and write it with one `pwrite` outside it, so concurrent writers never wait
//! on each other's I/O. Each start opens a fresh active segment; older ones are never appended
//! to, so a write cut off by a crash can only be in a segment that was active then.
//!
//! Must not: decide what is live (the index does), or delete the active segment.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use crate::digest::{Digest, HASH_LEN};

/// Bytes of a record before its data.
pub const HEADER_LEN: u64 = 4 + 4 + HASH_LEN as u64;
const MAGIC: [u8; 4] = *b"hsg1";
/// A segment is sealed and a new one started once it holds this much.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;

/// Where a record is: segment id in the high 32 bits, offset in the low 32 (segments stay far
/// below 4 GiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Place(pub u64);

impl Place {
    fn new(segment: u32, offset: u32) -> Self {
        Place((segment as u64) << 32 | offset as u64)
    }
    pub fn segment(self) -> u32 {
        (self.0 >> 32) as u32
    }
    pub fn offset(self) -> u64 {
        self.0 & 0xffff_ffff
    }
}

/// What reading a record found.
pub enum Found {
    Data(Bytes),
    /// The segment is gone (compacted away since the index was read, or lost).
    Gone,
    /// The record is not the blob asked for (a wrong header, or cut short).
    Damaged(&'static str),
}

struct Active {
    id: u32,
    file: Arc<File>,
    len: u64,
    /// [`Segments::close`] was called.
    closed: bool,
}

/// The error of an append after [`Segments::close`] (shutdown has begun).
#[derive(Debug)]
pub struct Closed;

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the store is shutting down; retry against the next server")
    }
}

impl std::error::Error for Closed {}

/// The segment files of one data dir.
pub struct Segments {
    dir: PathBuf,
    roll_at: u64,
    files: RwLock<HashMap<u32, Arc<File>>>,
    active: Mutex<Active>,
    /// Segments written since the last [`Segments::sync`].
    unsynced: Mutex<HashMap<u32, Arc<File>>>,
    /// Bytes of all segment files.
    total: AtomicU64,
    /// Writers between appending a record and indexing it, per segment: compaction leaves
    /// those segments alone, since the scan it decides on may not see their entries yet.
    pending: Mutex<HashMap<u32, usize>>,
    /// Dead bytes the last compaction pass left (in segments still mostly live).
    left_dead: AtomicU64,
    /// An fdatasync failed: every later sync fails too.
    sync_failed: std::sync::atomic::AtomicBool,
    /// The highest id that existed when the store opened (0: none).
    last_before_open: u32,
    /// Bytes appended since the store opened (checkpoints are due after enough).
    appended: AtomicU64,
}

fn name(id: u32) -> String {
    format!("{id:08x}.seg")
}

impl Segments {
    /// Opens the segments under `data_dir/segments` and starts a fresh active one.
    pub fn open(data_dir: &Path, roll_at: u64) -> io::Result<Self> {
        let dir = data_dir.join("segments");
        std::fs::create_dir_all(&dir)?;
        let mut files = HashMap::new();
        let mut total = 0;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name
                .strip_suffix(".seg")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
            else {
                continue;
            };
            let file = File::options().read(true).write(true).open(entry.path())?;
            total += file.metadata()?.len();
            files.insert(id, Arc::new(file));
        }
        let last_before_open = files.keys().copied().max().unwrap_or(0);
        let id = last_before_open + 1;
        let file = Arc::new(create(&dir, id)?);
        files.insert(id, file.clone());
        Ok(Segments {
            dir,
            roll_at: roll_at.clamp(1 << 20, 1 << 31),
            files: RwLock::new(files),
            active: Mutex::new(Active {
                id,
                file,
                len: 0,
                closed: false,
            }),
            unsynced: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            total: AtomicU64::new(total),
            left_dead: AtomicU64::new(0),
            sync_failed: std::sync::atomic::AtomicBool::new(false),
            last_before_open,
            appended: AtomicU64::new(0),
        })
    }

    /// Appends a record of `data` under `hash`; returns where. Durable after the next
    /// [`Segments::sync`] that starts after this returns. Hold the [`Appended`] until the
    /// record's index entry exists (or the write failed).
    pub fn append(&self, hash: &[u8; HASH_LEN], data: &[u8]) -> io::Result<Appended<'_>> {
        self.append_many(&[(hash, data)])?
            .pop()
            .ok_or_else(|| io::Error::other("no record appended"))
    }

    /// [`Segments::append`] for several records, in order: one `pwrite` for all those that fit
    /// in the active segment (a batch of small blobs is one write, not one per blob).
    pub fn append_many(
        &self,
        records: &[(&[u8; HASH_LEN], &[u8])],
    ) -> io::Result<Vec<Appended<'_>>> {
        let mut appended = Vec::with_capacity(records.len());
        let mut rest = records;
        while !rest.is_empty() {
            let sizes: Vec<u64> = rest
                .iter()
                .map(|(_, data)| {
                    u32::try_from(data.len())
                        .map(|len| HEADER_LEN + u64::from(len))
                        .map_err(|_| {
                            io::Error::new(io::ErrorKind::InvalidInput, "record too large")
                        })
                })
                .collect::<io::Result<_>>()?;
            let (id, file, start, taken) = {
                let mut active = self.active.lock();
                if active.closed {
                    return Err(io::Error::other(Closed));
                }
                if active.len > 0 && active.len + sizes[0] > self.roll_at {
                    let id = active.id + 1;
                    let file = Arc::new(create(&self.dir, id)?);
                    self.files.write().insert(id, file.clone());
                    *active = Active {
                        id,
                        file,
                        len: 0,
                        closed: false,
                    };
                }
                // As many as fit before the roll point; at least one (a fresh segment takes any).
                let mut need = sizes[0];
                let mut taken = 1;
                while taken < sizes.len() && active.len + need + sizes[taken] <= self.roll_at {
                    need += sizes[taken];
                    taken += 1;
                }
                let start = active.len;
                active.len += need;
                *self.pending.lock().entry(active.id).or_default() += taken;
                (active.id, active.file.clone(), start, taken)
            };
            let mut buf = Vec::with_capacity(sizes[..taken].iter().sum::<u64>() as usize);
            for (hash, data) in &rest[..taken] {
                appended.push(Appended {
                    segments: self,
                    place: Place::new(id, (start + buf.len() as u64) as u32),
                });
                buf.extend_from_slice(&MAGIC);
                buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
                buf.extend_from_slice(*hash);
                buf.extend_from_slice(data);
            }
            self.total.fetch_add(buf.len() as u64, Relaxed);
            self.appended.fetch_add(buf.len() as u64, Relaxed);
            file.write_all_at(&buf, start)?;
            self.unsynced.lock().insert(id, file);
            rest = &rest[taken..];
        }
        Ok(appended)
    }

    /// The first segment a checkpoint taken now must leave to replay: the active one, or an
    /// older one a writer has appended to and not yet indexed, so every record before it is
    /// indexed (or dead) by the time this returns. Once [`Segments::close`]d with no writer
    /// left, nothing can be appended any more: then none.
    pub fn replay_floor(&self) -> u32 {
        let active = self.active.lock();
        let pending = self.pending.lock();
        match pending.keys().copied().min() {
            Some(id) => id.min(active.id),
            None if active.closed => active.id + 1,
            None => active.id,
        }
    }

    /// Refuses every later append ([`Closed`]): the final checkpoint then needs no replay of
    /// the active segment (which would bring back the blobs evicted since it was begun).
    pub fn close(&self) {
        self.active.lock().closed = true;
    }

    /// Makes segment `id` durable (after a replay: its records may be only in the page cache,
    /// written by a process killed before its fdatasync).
    pub fn sync_segment(&self, id: u32) -> io::Result<()> {
        match self.files.read().get(&id).cloned() {
            Some(file) => file.sync_data(),
            None => Ok(()),
        }
    }

    /// Bytes appended since the store opened.
    pub fn appended(&self) -> u64 {
        self.appended.load(Relaxed)
    }

    /// Every segment's id and length, oldest first (the active one included); a length that
    /// cannot be read is `u64::MAX` (unknown, never judged too short).
    pub fn all(&self) -> Vec<(u32, u64)> {
        let files = self.files.read();
        let mut out: Vec<(u32, u64)> = files
            .iter()
            .map(|(id, f)| (*id, f.metadata().map_or(u64::MAX, |m| m.len())))
            .collect();
        out.sort_unstable();
        out
    }

    /// Calls `f` with every whole record of segment `id` whose data matches its hash (SHA-256),
    /// in order, with its place. Bytes that are not such a record (a write a crash cut short,
    /// or a hole left by a writer killed before its `pwrite` while a later one landed) are
    /// skipped up to the next record header. Returns the bytes skipped. For the replay after
    /// a crash: only verified records may become visible.
    pub fn scan(&self, id: u32, mut f: impl FnMut(Place, Digest)) -> io::Result<u64> {
        let Some(file) = self.files.read().get(&id).cloned() else {
            return Ok(0);
        };
        let len = file.metadata()?.len();
        let mut window = Window::new(&file, len, self.roll_at);
        let (mut at, mut skipped) = (0u64, 0u64);
        while at + HEADER_LEN <= len {
            if let Some(record) = window.record_at(at)? {
                f(Place::new(id, at as u32), record);
                at += HEADER_LEN + record.size;
                continue;
            }
            // Not a record here: look for the next header.
            let next = window.find_magic(at + 1)?.unwrap_or(len);
            skipped += next - at;
            at = next;
        }
        Ok(skipped + (len - at.min(len)))
    }

    /// Segments with a writer between append and index entry.
    pub fn busy(&self) -> Vec<u32> {
        self.pending.lock().keys().copied().collect()
    }

    /// Makes every record appended so far durable (one `fdatasync` per segment written to).
    pub fn sync(&self) -> io::Result<()> {
        if self.sync_failed.load(Relaxed) {
            return Err(io::Error::other(
                "an earlier fdatasync of a segment failed; restart hoard",
            ));
        }
        let written: Vec<(u32, Arc<File>)> = self.unsynced.lock().drain().collect();
        for (_, file) in &written {
            if let Err(e) = file.sync_data() {
                // The kernel may have dropped the dirty pages, and a retry would report
                // success: nothing written since can be promised durable until a restart.
                self.sync_failed.store(true, Relaxed);
                return Err(e);
            }
        }
        Ok(())
    }

    /// The record at `place`, if it is the blob `hash` of `size` bytes (its content is the
    /// caller's to verify).
    pub fn read(&self, place: Place, hash: &[u8; HASH_LEN], size: u64) -> io::Result<Found> {
        let Some(file) = self.files.read().get(&place.segment()).cloned() else {
            return Ok(Found::Gone);
        };
        let mut buf = vec![0u8; (HEADER_LEN + size) as usize];
        match file.read_exact_at(&mut buf, place.offset()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Ok(Found::Damaged("segment record is cut short"))
            }
            Err(e) => return Err(e),
        }
        if buf[..4] != MAGIC
            || buf[4..8] != (size as u32).to_le_bytes()
            || buf[8..HEADER_LEN as usize] != hash[..]
        {
            return Ok(Found::Damaged(
                "segment record header does not name this blob",
            ));
        }
        Ok(Found::Data(Bytes::from(buf).slice(HEADER_LEN as usize..)))
    }

    /// Dead bytes the last compaction pass left, so the next is due only once more died.
    pub fn left_dead(&self) -> u64 {
        self.left_dead.load(Relaxed)
    }

    pub fn set_left_dead(&self, bytes: u64) {
        self.left_dead.store(bytes, Relaxed);
    }

    /// Bytes of all segment files.
    pub fn total_bytes(&self) -> u64 {
        self.total.load(Relaxed)
    }

    /// The sealed segments (never appended to again) and their lengths, oldest first.
    pub fn sealed(&self) -> Vec<(u32, u64)> {
        let active = self.active.lock().id;
        let files = self.files.read();
        let mut out: Vec<(u32, u64)> = files
            .iter()
            .filter(|(id, _)| **id < active)
            .map(|(id, f)| (*id, f.metadata().map(|m| m.len()).unwrap_or(0)))
            .collect();
        out.sort_unstable();
        out
    }

    /// The highest segment id from before this process opened the store: a write cut off by
    /// a crash is most likely in it or the one before (a writer held up across several rolls
    /// can leave one further back; the replay skips it, and compaction reclaims it).
    pub fn last_before_open(&self) -> u32 {
        self.last_before_open
    }

    /// Deletes a sealed segment. Reads that already hold it finish; later ones find it gone.
    pub fn remove(&self, id: u32) -> io::Result<()> {
        if id >= self.active.lock().id {
            return Err(io::Error::other("the active segment is never removed"));
        }
        if let Some(file) = self.files.write().remove(&id) {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(self.dir.join(name(id)))?;
            self.total
                .fetch_sub(len.min(self.total.load(Relaxed)), Relaxed);
        }
        Ok(())
    }
}

/// A sliding read buffer over one segment file, for [`Segments::scan`].
struct Window<'f> {
    file: &'f File,
    len: u64,
    /// No record is larger (a segment is at least 4 × `storage.inline_threshold`), so a
    /// damaged header cannot make the scan read a huge one.
    max_record: u64,
    start: u64,
    buf: Vec<u8>,
}

/// What a scan reads at once.
const WINDOW: usize = 4 << 20;

impl<'f> Window<'f> {
    fn new(file: &'f File, len: u64, max_record: u64) -> Self {
        Window {
            file,
            len,
            max_record,
            start: 0,
            buf: Vec::new(),
        }
    }

    /// Bytes `at..at + n` (fewer at the end of the file).
    fn bytes(&mut self, at: u64, n: usize) -> io::Result<&[u8]> {
        let end = (at + n as u64).min(self.len);
        if at < self.start || end > self.start + self.buf.len() as u64 {
            let want = (end - at).max(WINDOW as u64).min(self.len - at) as usize;
            self.buf.resize(want, 0);
            self.file.read_exact_at(&mut self.buf, at)?;
            self.start = at;
        }
        let from = (at - self.start) as usize;
        Ok(&self.buf[from..from + (end - at) as usize])
    }

    /// The record at `at`, if a whole one whose data matches its hash starts there.
    fn record_at(&mut self, at: u64) -> io::Result<Option<Digest>> {
        let head = self.bytes(at, HEADER_LEN as usize)?;
        if head.len() < HEADER_LEN as usize || head[..4] != MAGIC {
            return Ok(None);
        }
        let size = u64::from(u32::from_le_bytes([head[4], head[5], head[6], head[7]]));
        let mut hash = [0u8; HASH_LEN];
        hash.copy_from_slice(&head[8..]);
        if size > self.max_record || at + HEADER_LEN + size > self.len {
            return Ok(None);
        }
        let digest = Digest { hash, size };
        let data = self.bytes(at + HEADER_LEN, size as usize)?;
        Ok(crate::digest::verify(digest, data)
            .is_ok()
            .then_some(digest))
    }

    /// The offset of the next record magic at or after `from`, if any.
    fn find_magic(&mut self, from: u64) -> io::Result<Option<u64>> {
        let mut at = from;
        while at + MAGIC.len() as u64 <= self.len {
            let chunk = self.bytes(at, WINDOW)?;
            if let Some(i) = chunk.windows(MAGIC.len()).position(|w| w == MAGIC) {
                return Ok(Some(at + i as u64));
            }
            // The magic may straddle the end of this chunk.
            at += (chunk.len() - MAGIC.len() + 1) as u64;
        }
        Ok(None)
    }
}

/// A record appended and not yet indexed; see [`Segments::append`].
pub struct Appended<'a> {
    segments: &'a Segments,
    pub place: Place,
}

impl Drop for Appended<'_> {
    fn drop(&mut self) {
        let mut pending = self.segments.pending.lock();
        let id = self.place.segment();
        if let Some(n) = pending.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                pending.remove(&id);
            }
        }
    }
}

/// Creates segment `id`, durably (the directory entry too), before anything points into it.
fn create(dir: &Path, id: u32) -> io::Result<File> {
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join(name(id)))?;
    File::open(dir)?.sync_all()?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_and_segments_roll_and_go() {
        let tmp = tempfile::tempdir().unwrap();
        let segs = Segments::open(tmp.path(), 1 << 20).unwrap();
        let a = segs.append(&[1; 32], &[7u8; 600_000]).unwrap().place;
        let b = segs.append(&[2; 32], &[8u8; 600_000]).unwrap().place;
        assert!(segs.busy().is_empty());
        assert_ne!(a.segment(), b.segment(), "the second record rolls over");
        segs.sync().unwrap();
        assert!(
            matches!(segs.read(a, &[1; 32], 600_000).unwrap(), Found::Data(d) if d[..] == [7u8; 600_000][..])
        );
        assert!(matches!(
            segs.read(a, &[9; 32], 600_000).unwrap(),
            Found::Damaged(_)
        ));
        assert_eq!(
            segs.sealed().iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![a.segment()]
        );
        assert!(segs.remove(b.segment()).is_err(), "active stays");
        segs.remove(a.segment()).unwrap();
        assert!(matches!(
            segs.read(a, &[1; 32], 600_000).unwrap(),
            Found::Gone
        ));
        drop(segs);
        let segs = Segments::open(tmp.path(), 1 << 20).unwrap();
        assert_eq!(segs.last_before_open(), b.segment());
        assert!(matches!(
            segs.read(b, &[2; 32], 600_000).unwrap(),
            Found::Data(_)
        ));
    }
}
