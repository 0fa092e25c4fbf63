//! [`BlobWriter`]: a blob's bytes appended to a file, bypassing the page cache where it can.

use std::fs;
use std::io;
use std::path::Path;

/// Alignment O_DIRECT needs for buffer addresses, file offsets and lengths.
const DIRECT_ALIGN: usize = 4096;

/// Bytes collected before one write reaches the disk.
const STAGING: usize = 2 << 20;

/// Appends a blob's bytes to a file, bypassing the page cache where the file system allows.
///
/// A buffered write costs a kernel copy into the page cache (on the machines measured, more CPU
/// than hashing the bytes); O_DIRECT writes go from our aligned staging buffer to the device.
/// Unaligned pieces (a resumed upload's start, a blob's tail) are written through a normal file
/// descriptor; file systems without O_DIRECT (tmpfs on older kernels) get buffered writes only.
/// Blocking; use from a blocking thread.
pub struct BlobWriter {
    buffered: fs::File,
    direct: Option<fs::File>,
    /// Over-allocated so that an aligned window of `STAGING` bytes exists inside it.
    storage: Vec<u8>,
    /// Start of the aligned window in `storage`.
    start: usize,
    /// Bytes staged in the window.
    staged: usize,
    /// File offset of the first staged byte.
    pos: u64,
}

impl BlobWriter {
    /// Creates (or truncates) `path` for a new blob.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Self::new(file, path, 0))
    }

    /// Continues `file` (open for writing at `path`, `offset` bytes long) at its end.
    pub fn append(file: fs::File, path: &Path, offset: u64) -> io::Result<Self> {
        Ok(Self::new(file, path, offset))
    }

    fn new(buffered: fs::File, path: &Path, pos: u64) -> Self {
        // Opened by path after `buffered`, so both name the same file unless it was replaced
        // in between; a stale direct descriptor is only an optimisation lost, as the guard in
        // the store keeps others away from an upload's file while it is written.
        let direct = {
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .ok()
        };
        let storage = vec![0u8; STAGING + DIRECT_ALIGN];
        let start = storage.as_ptr().align_offset(DIRECT_ALIGN);
        BlobWriter {
            buffered,
            direct,
            storage,
            start,
            staged: 0,
            pos,
        }
    }

    /// How many bytes to stage before writing: a full window when the file offset is aligned,
    /// otherwise just enough to reach the next aligned offset.
    fn window(&self) -> usize {
        match self.pos as usize % DIRECT_ALIGN {
            0 => STAGING,
            misaligned => DIRECT_ALIGN - misaligned,
        }
    }

    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let room = self.window() - self.staged;
            let n = room.min(data.len());
            let at = self.start + self.staged;
            self.storage[at..at + n].copy_from_slice(&data[..n]);
            self.staged += n;
            data = &data[n..];
            if self.staged == self.window() {
                self.write_staged()?;
            }
        }
        Ok(())
    }

    /// Writes the staged bytes at `pos`, directly when offset and length are aligned.
    fn write_staged(&mut self) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let bytes = &self.storage[self.start..self.start + self.staged];
        let aligned = (self.pos as usize).is_multiple_of(DIRECT_ALIGN)
            && bytes.len().is_multiple_of(DIRECT_ALIGN);
        let mut written = false;
        if let (true, Some(direct)) = (aligned, &self.direct) {
            match direct.write_all_at(bytes, self.pos) {
                Ok(()) => written = true,
                // The file system refuses O_DIRECT after all: stay buffered from now on.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.direct = None,
                Err(e) => return Err(e),
            }
        }
        if !written {
            self.buffered.write_all_at(bytes, self.pos)?;
        }
        self.pos += self.staged as u64;
        self.staged = 0;
        Ok(())
    }

    /// Writes whatever is staged, so the file holds every byte given so far.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.staged > 0 {
            self.write_staged()?;
        }
        Ok(())
    }
}
