//! Whether the data dir's disk can take writes, and a cushion that keeps sled from running out.
//!
//! sled must never meet a full disk: when one of its log writes fails, it records the error
//! and refuses every later write until the database is reopened, so one filler process could
//! refuse writes for good. These measures keep it away from that (the floor is the one that
//! holds in every case: sled also writes large pages to files of their own under `blobs/`,
//! which no cushion covers, and may shrink its log, which drops the cushion until the next
//! top-up); if a flush fails anyway, writes are refused until a restart, saying so:
//! - **A cushion.** Room is preallocated past the end of sled's log file (`fallocate` with
//!   `KEEP_SIZE`), so sled's next writes land in blocks it already owns, whatever another
//!   process does to the free space. It is topped up after every flush and every second.
//! - **A reserve file** (`space-reserve`, as large as the cushion) in the data dir. sled
//!   writes a snapshot file when it opens, so a data dir on a disk that another process filled
//!   could not even be reopened; when the disk is that full at start, the reserve is deleted
//!   first, and it is recreated once space is back.
//! - **A gate.** When the cushion cannot be kept, free space falls under the floor (twice the
//!   cushion), or a write failed
//!   for lack of space (or on a read-only file system), the store is *unwritable*: every write
//!   is refused up front, before any byte is stored, with a message that says why. The same
//!   check that tops up the cushion lifts the refusal once space is back, within a second.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use parking_lot::Mutex;
use rustix::fs::FallocateFlags;

use crate::error::{Error, Result};

/// Largest cushion; smaller file systems get a 16th of their size.
const MAX_CUSHION: u64 = 32 << 20;
const MIN_CUSHION: u64 = 1 << 20;
/// While writes are refused, a write re-probes the disk at most this often (milliseconds).
const REPROBE_MS: u64 = 200;

/// Name of the reserve file in the data dir.
const RESERVE: &str = "space-reserve";

/// The cushion for a data dir (also the size of the reserve file).
fn cushion_for(data_dir: &Path) -> u64 {
    fs_size(data_dir)
        .map_or(MAX_CUSHION, |size| size / 16)
        .clamp(MIN_CUSHION, MAX_CUSHION)
}

/// Before sled opens: on a disk too full for sled's start-up snapshot, gives up the reserve.
pub(crate) fn before_open(data_dir: &Path) {
    let cushion = cushion_for(data_dir);
    if free_space(data_dir).is_some_and(|free| free < 2 * cushion)
        && std::fs::remove_file(data_dir.join(RESERVE)).is_ok()
    {
        tracing::warn!(
            "the data dir's disk is full: released the space reserve so the database can open"
        );
    }
}

/// Why the store cannot take writes right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Unwritable {
    /// No space left on the data dir's file system.
    Full,
    /// The data dir (or part of it) is read-only.
    ReadOnly,
}

pub(crate) struct Space {
    data_dir: PathBuf,
    /// sled's log file, kept open to preallocate past its end.
    log: Option<File>,
    /// Bytes kept preallocated past the end of the log.
    cushion: u64,
    /// Free space hoard never fills (twice the cushion): below it the disk counts as full, so
    /// that sled, the event log and deletions always find room.
    floor: u64,
    /// When the disk was last probed (milliseconds since `opened`), so a write that arrives
    /// while writes are refused can lift the refusal itself without probing on every call.
    probed_ms: AtomicU64,
    opened: Instant,
    /// Set while writes are refused; the reason is in `why`.
    unwritable: AtomicBool,
    why: Mutex<Option<Unwritable>>,
    /// A flush of sled failed: sled then refuses every later write until it is reopened, so
    /// writes are refused (and health says so) until hoard restarts. Never cleared.
    broken: Mutex<Option<String>>,
}

impl Space {
    pub(crate) fn open(data_dir: &Path) -> Self {
        let log = std::fs::OpenOptions::new()
            .write(true)
            .open(data_dir.join("sled").join("db"))
            .inspect_err(|e| {
                tracing::warn!(error = %e, "cannot open sled's log to keep a cushion past its end")
            })
            .ok();
        let cushion = cushion_for(data_dir);
        let space = Space {
            data_dir: data_dir.to_path_buf(),
            log,
            cushion,
            floor: 2 * cushion,
            probed_ms: AtomicU64::new(0),
            opened: Instant::now(),
            unwritable: AtomicBool::new(false),
            why: Mutex::new(None),
            broken: Mutex::new(None),
        };
        space.top_up();
        space
    }

    /// Refuses a write up front while the store is unwritable.
    pub(crate) fn check(&self) -> Result<()> {
        if !self.unwritable.load(Relaxed) {
            return Ok(());
        }
        // One caller at a time re-probes, at most every REPROBE_MS.
        let now = self.opened.elapsed().as_millis() as u64;
        let last = self.probed_ms.load(Relaxed);
        if now.saturating_sub(last) >= REPROBE_MS
            && self
                .probed_ms
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
            && self.top_up()
        {
            return Ok(());
        }
        Err(self.error())
    }

    /// A flush failed (see `broken`): refuse writes until restart.
    pub(crate) fn mark_broken(&self, error: &sled::Error) {
        let mut broken = self.broken.lock();
        if broken.is_none() {
            tracing::error!(%error, "the database failed to write; refusing writes until hoard is restarted");
            *broken = Some(error.to_string());
        }
        self.unwritable.store(true, Relaxed);
    }

    /// Why writes are refused until a restart, if they are.
    pub(crate) fn broken(&self) -> Option<String> {
        self.broken.lock().clone()
    }

    /// Refuses a file write of `bytes` that the disk cannot hold (besides the cushion).
    pub(crate) fn check_room(&self, bytes: u64) -> Result<()> {
        self.check()?;
        match free_space(&self.data_dir) {
            Some(free) if free < bytes.saturating_add(self.floor) => {
                Err(Error::StorageFull(format!(
                    "storage is full: {bytes} bytes do not fit in the {free} bytes free on the \
                     data dir's disk; retry shortly (hoard evicts least recently used blobs to \
                     make room)"
                )))
            }
            _ => Ok(()),
        }
    }

    fn error(&self) -> Error {
        if let Some(why) = self.broken() {
            return Error::Unavailable(format!(
                "storage cannot take writes until hoard is restarted: the database failed to \
                 write ({why})"
            ));
        }
        match self.reason() {
            Some(Unwritable::ReadOnly) => Error::StorageUnwritable(
                "storage cannot take writes: the data dir's file system is read-only".into(),
            ),
            _ => Error::StorageFull(
                "storage is full: the data dir's disk has no room left; writes resume by \
                 themselves within seconds of space being freed (hoard evicts least recently \
                 used blobs to make room); retry shortly"
                    .into(),
            ),
        }
    }

    pub(crate) fn reason(&self) -> Option<Unwritable> {
        if !self.unwritable.load(Relaxed) {
            return None;
        }
        self.why.lock().clone()
    }

    /// A write failed for lack of space or on a read-only file system: refuse writes until
    /// [`Space::top_up`] finds the disk writable again.
    pub(crate) fn mark(&self, why: Unwritable) {
        let mut current = self.why.lock();
        if current.as_ref() != Some(&why) {
            tracing::error!(
                ?why,
                "the data dir cannot take writes; refusing them until it can"
            );
        }
        *current = Some(why);
        self.unwritable.store(true, Relaxed);
    }

    /// Keeps the cushion past the end of sled's log, checks free space, and lifts a refusal
    /// once writes can succeed again. Blocking (a few system calls); returns whether the store
    /// is writable.
    pub(crate) fn top_up(&self) -> bool {
        self.probed_ms
            .store(self.opened.elapsed().as_millis() as u64, Relaxed);
        if self.broken().is_some() {
            return false;
        }
        let outcome = self.probe();
        let mut current = self.why.lock();
        match outcome {
            Ok(()) => {
                if current.take().is_some() {
                    tracing::info!("the data dir takes writes again");
                }
                self.unwritable.store(false, Relaxed);
                true
            }
            Err(Some(why)) => {
                if current.as_ref() != Some(&why) {
                    tracing::error!(?why, "the data dir cannot take writes; refusing them");
                }
                *current = Some(why);
                self.unwritable.store(true, Relaxed);
                false
            }
            // Not a sign of the disk (out of descriptors, say): the state stays as it was.
            Err(None) => current.is_none(),
        }
    }

    /// Tops up the cushion and the reserve, then checks the free space left: below the floor
    /// the disk is full (and while writes are refused, the floor plus one cushion must be free
    /// before they resume, so the state does not flap at the edge). `Err(None)`: a failure that
    /// says nothing about the disk.
    fn probe(&self) -> std::result::Result<(), Option<Unwritable>> {
        let refusing = self.unwritable.load(Relaxed);
        if let Some(log) = &self.log {
            preallocate(log, self.cushion).map_err(|e| classify(&e))?;
        }
        keep_reserve(&self.data_dir.join(RESERVE), self.cushion).map_err(|e| classify(&e))?;
        let needed = if refusing {
            self.floor + self.cushion
        } else {
            self.floor
        };
        if free_space(&self.data_dir).is_some_and(|free| free < needed) {
            return Err(Some(Unwritable::Full));
        }
        // After a refusal, prove the blob dirs take files again before lifting it.
        if refusing {
            for dir in ["uploads", "cas"] {
                let probe = self.data_dir.join(dir).join(".write-probe");
                let written = std::fs::write(&probe, b"probe");
                let _ = std::fs::remove_file(&probe);
                written.map_err(|e| classify(&e))?;
            }
        }
        Ok(())
    }
}

/// What a failed write says about the disk, if anything.
pub(crate) fn classify(e: &std::io::Error) -> Option<Unwritable> {
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => Some(Unwritable::Full),
        Some(libc::EROFS) => Some(Unwritable::ReadOnly),
        _ => None,
    }
}

/// Makes sure `cushion` bytes past the end of `file` are allocated (at least half of it, to
/// avoid a system call after every flush).
fn preallocate(file: &File, cushion: u64) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    let allocated = meta.blocks() * 512;
    if allocated >= meta.size() + cushion / 2 {
        return Ok(());
    }
    match rustix::fs::fallocate(file, FallocateFlags::KEEP_SIZE, meta.size(), cushion) {
        Ok(()) => Ok(()),
        // File systems without fallocate: nothing to keep, the free-space check still holds.
        Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Makes sure the reserve file exists with `size` bytes allocated.
fn keep_reserve(path: &Path, size: u64) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata(path).is_ok_and(|m| m.blocks() * 512 >= size) {
        return Ok(());
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    match rustix::fs::fallocate(&file, FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP) => file.set_len(size),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(e.into())
        }
    }
}

/// Bytes available to unprivileged users on the file system of `dir`.
pub(crate) fn free_space(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

fn fs_size(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_blocks.saturating_mul(st.f_frsize))
}
