//! The streaming read of a blob file: a blocking thread reads whole MiB chunks, checks each
//! against the checksum recorded at write time before any of its bytes are sent, and hands
//! them to the client's stream through a bounded queue.
//!
//! Memory: a chunk read ahead takes its size from the server-wide read budget
//! (`READ_BUDGET_BYTES`) until the gRPC layer has encoded it; past the budget, a read holds
//! one chunk at a time (see `FileRead::read_chunk`); a read whose client takes nothing for
//! `stall` ends. So stalled readers cost the budget plus about a chunk each (plus what the
//! HTTP/2 layer holds for them), not a queue each.
//!
//! Must not: decide what a damaged blob means for the index; it reports it to its owner
//! through the `damaged` callback and tells the client NOT_FOUND.

use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use xxhash_rust::xxh3::Xxh3;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::store::chunk_sums::{self, SUM_CHUNK};
use crate::store::BlobStream;

/// Chunks a read may prepare ahead of the client (bounds memory per download).
const READ_AHEAD_CHUNKS: usize = 2;
/// Bytes all downloads together may hold in chunks read but not yet handed to the gRPC layer:
/// a server-wide memory bound that slow readers cannot push past.
const READ_BUDGET_BYTES: usize = 128 << 20;

/// What every file read shares: the read-ahead budget and the stall timeout.
pub struct Reads {
    /// Bytes of downloads read ahead of their clients (see [`READ_BUDGET_BYTES`]).
    budget: Arc<Semaphore>,
    /// How long a download may wait for its client to take the next chunk.
    stall: Duration,
}

/// One blob file to stream.
pub struct Blob {
    pub file: std::fs::File,
    pub digest: Digest,
    /// XXH3-64 of the whole file, for blobs stored before per-chunk checksums existed.
    pub xxh3: u64,
    /// Per-MiB checksums ([`chunk_sums`]), if the blob has them.
    pub sums: Option<Vec<u64>>,
}

impl Reads {
    pub fn new(stall: Duration) -> Self {
        Reads {
            budget: Arc::new(Semaphore::new(READ_BUDGET_BYTES)),
            stall,
        }
    }

    /// Streams `range` of `blob` in pieces of at most `chunk_size` from a blocking thread that
    /// holds `permit` (a transfer slot) while it runs. A blob found damaged is reported to
    /// `damaged` (with why) before the client gets NOT_FOUND. Call from a Tokio runtime.
    pub fn stream(
        &self,
        blob: Blob,
        range: Range<u64>,
        chunk_size: usize,
        permit: OwnedSemaphorePermit,
        damaged: impl FnOnce(&str) + Send + 'static,
    ) -> BlobStream {
        let (tx, rx) = mpsc::channel(READ_AHEAD_CHUNKS);
        let read = FileRead {
            budget: self.budget.clone(),
            digest: blob.digest,
            xxh3: blob.xxh3,
            tx,
            runtime: tokio::runtime::Handle::current(),
            stall: self.stall,
        };
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            read.run(blob.file, blob.sums, range, chunk_size, damaged)
        });
        ReceiverStream::new(rx).boxed()
    }
}

/// One read of a blob file, run on a blocking thread, sending chunks to the client's stream.
struct FileRead {
    budget: Arc<Semaphore>,
    digest: Digest,
    xxh3: u64,
    tx: mpsc::Sender<Result<Bytes>>,
    runtime: tokio::runtime::Handle,
    stall: Duration,
}

/// A chunk's bytes together with the share of the read budget they hold.
struct Budgeted {
    data: Vec<u8>,
    _permit: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Budgeted {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

/// How a read ended early.
enum Stop {
    /// The client went away or stalled; nothing more to say.
    Gone,
    /// The blob is damaged (why); it is removed and the client told.
    Damaged(String),
    /// Another failure, passed to the client.
    Failed(Error),
}

impl FileRead {
    fn failed(&self, e: std::io::Error) -> Stop {
        Stop::Failed(Error::internal(format!("reading blob {}", self.digest), e))
    }

    /// Sends `range` of the blob and reports how the read ended.
    fn run(
        &self,
        file: std::fs::File,
        sums: Option<Vec<u64>>,
        range: Range<u64>,
        chunk_size: usize,
        damaged: impl FnOnce(&str),
    ) {
        let outcome = match file.metadata() {
            Err(e) => Err(self.failed(e)),
            Ok(m) if m.len() != self.digest.size => {
                Err(Stop::Damaged("blob file has the wrong length".into()))
            }
            Ok(_) => match sums {
                Some(sums) => self.verified_chunks(file, &sums, range, chunk_size),
                None => self.whole_checksum(file, range, chunk_size),
            },
        };
        let error = match outcome {
            Ok(()) | Err(Stop::Gone) => return,
            Err(Stop::Failed(e)) => e,
            Err(Stop::Damaged(why)) => {
                damaged(&why);
                Error::NotFound(format!(
                    "blob {} was damaged on disk and has been removed; upload it again",
                    self.digest
                ))
            }
        };
        let _ = self
            .runtime
            .block_on(tokio::time::timeout(self.stall, self.tx.send(Err(error))));
    }

    /// Reads the chunks that cover `range` whole, checks each against its recorded checksum
    /// before any of its bytes are sent, and sends the part of each that lies in `range`.
    fn verified_chunks(
        &self,
        mut file: std::fs::File,
        sums: &[u64],
        range: Range<u64>,
        chunk_size: usize,
    ) -> Result<(), Stop> {
        let mut index = (range.start / SUM_CHUNK) as usize;
        let mut at = index as u64 * SUM_CHUNK;
        if at > 0 {
            file.seek(SeekFrom::Start(at)).map_err(|e| self.failed(e))?;
        }
        while at < range.end {
            let len = (self.digest.size - at).min(SUM_CHUNK);
            let chunk = self.read_chunk(&mut file, len)?;
            if !chunk_sums::matches(sums, index, &chunk) {
                return Err(Stop::Damaged(format!(
                    "chunk {index} of the blob file does not match its checksum"
                )));
            }
            let from = (range.start.max(at) - at) as usize;
            let to = (range.end.min(at + len) - at) as usize;
            let mut piece = from;
            while piece < to {
                let end = to.min(piece + chunk_size.max(1));
                self.send(chunk.slice(piece..end))?;
                piece = end;
            }
            at += len;
            index += 1;
        }
        Ok(())
    }

    /// For blobs stored before chunk checksums existed: a whole read is hashed on the way and
    /// its last chunk held back until the hash matches; a ranged read checks the length only.
    fn whole_checksum(
        &self,
        mut file: std::fs::File,
        range: Range<u64>,
        chunk_size: usize,
    ) -> Result<(), Stop> {
        let mut checksum = (range.start == 0 && range.end == self.digest.size).then(Xxh3::new);
        if range.start > 0 {
            file.seek(SeekFrom::Start(range.start))
                .map_err(|e| self.failed(e))?;
        }
        let mut held: Option<Bytes> = None;
        let mut at = range.start;
        while at < range.end {
            let want = (range.end - at).min(chunk_size as u64);
            let chunk = self.read_chunk(&mut file, want)?;
            at += want;
            if let Some(c) = checksum.as_mut() {
                c.update(&chunk);
            }
            if let Some(prev) = held.replace(chunk) {
                self.send(prev)?;
            }
        }
        if checksum.is_some_and(|c| c.digest() != self.xxh3) {
            return Err(Stop::Damaged(
                "blob file does not match its checksum".into(),
            ));
        }
        match held {
            Some(last) => self.send(last),
            None => Ok(()),
        }
    }

    /// Reads the next `len` bytes. Read-ahead comes from the server-wide budget; when that is
    /// spent (by slow readers), this read first waits until its client has taken every chunk
    /// queued, so a stalled read then holds one chunk outside the budget and never starves
    /// the others.
    fn read_chunk(&self, file: &mut std::fs::File, len: u64) -> Result<Bytes, Stop> {
        let cost = len.clamp(1, READ_BUDGET_BYTES as u64) as u32;
        let permit = match self.budget.clone().try_acquire_many_owned(cost) {
            Ok(permit) => Some(permit),
            Err(_) => {
                let drained = self.tx.reserve_many(READ_AHEAD_CHUNKS);
                match self
                    .runtime
                    .block_on(tokio::time::timeout(self.stall, drained))
                {
                    Ok(Ok(_slots)) => None,
                    Ok(Err(_)) => return Err(Stop::Gone),
                    Err(_) => {
                        tracing::debug!(digest = %self.digest, "ending a read whose client stopped reading");
                        return Err(Stop::Gone);
                    }
                }
            }
        };
        // read_to_end fills spare capacity without zeroing it first.
        let mut data = Vec::with_capacity(len as usize);
        match file.take(len).read_to_end(&mut data) {
            Ok(n) if n as u64 == len => {}
            Ok(_) => return Err(Stop::Damaged("blob file ended early".into())),
            Err(e) => return Err(Stop::Damaged(format!("blob file could not be read: {e}"))),
        }
        Ok(match permit {
            Some(permit) => Bytes::from_owner(Budgeted {
                data,
                _permit: permit,
            }),
            None => Bytes::from(data),
        })
    }

    /// Hands a chunk to the client's stream; a client that takes nothing for `stall` is
    /// treated as gone, so it stops holding this thread and the transfer slot.
    fn send(&self, chunk: Bytes) -> Result<(), Stop> {
        match self
            .runtime
            .block_on(tokio::time::timeout(self.stall, self.tx.send(Ok(chunk))))
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Stop::Gone),
            Err(_) => {
                tracing::debug!(digest = %self.digest, stall = ?self.stall, "ending a read whose client stopped reading");
                Err(Stop::Gone)
            }
        }
    }
}
