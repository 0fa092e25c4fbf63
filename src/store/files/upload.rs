//! The file side of a large upload: its file opened at an offset (hashes rebuilt from the bytes
//! already there), and a blocking writer thread fed by a bounded queue, so disk writes overlap
//! with receiving and hashing the next bytes.
//!
//! Memory: an upload queues at most `WRITE_QUEUE_BYTES` ahead of its writer, all uploads
//! together at most `WRITE_QUEUE_BYTES_TOTAL`.
//!
//! Must not: publish the blob or account for its size (the owner does both).

use std::any::Any;
use std::io::Read as _;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use xxhash_rust::xxh3::Xxh3;

use super::BlobWriter;
use crate::digest::{Digest, Verifier};
use crate::error::{Error, Result};
use crate::store::chunk_sums::ChunkSums;

/// Bytes an upload may queue ahead of its writer thread: enough to keep receiving while the
/// writer waits for one staged write to reach the disk, and a bound on memory per upload.
const WRITE_QUEUE_BYTES: usize = 32 << 20;
/// Bytes all uploads together may queue ahead of their writers: a server-wide memory bound.
const WRITE_QUEUE_BYTES_TOTAL: usize = 256 << 20;

/// The hashes an upload keeps while its bytes arrive: SHA-256 to verify the digest, XXH3 to
/// record for cheap integrity checks on later reads.
pub struct UploadHashes {
    pub sha256: Verifier,
    pub xxh3: Xxh3,
    pub sums: ChunkSums,
}

impl UploadHashes {
    fn new(digest: Digest) -> Self {
        UploadHashes {
            sha256: Verifier::new(digest),
            xxh3: Xxh3::new(),
            sums: ChunkSums::new(),
        }
    }

    pub fn update(&mut self, data: &[u8]) -> Result<()> {
        self.sha256.update(data)?;
        self.xxh3.update(data);
        self.sums.update(data);
        Ok(())
    }
}

/// Opens an upload file at `offset`: 0 truncates, anything else must equal the bytes already in
/// the file, whose hash state is rebuilt by reading them back. `Err(have)` reports a mismatch.
/// Blocking.
pub fn open_upload_file(
    path: &Path,
    digest: Digest,
    offset: u64,
) -> std::io::Result<std::result::Result<(BlobWriter, UploadHashes), u64>> {
    let mut hashes = UploadHashes::new(digest);
    if offset == 0 {
        return Ok(Ok((BlobWriter::create(path)?, hashes)));
    }
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Err(0)),
        Err(e) => return Err(e),
    };
    let have = file.metadata()?.len();
    if have != offset {
        return Ok(Err(have));
    }
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if hashes.update(&buf[..n]).is_err() {
            // More bytes on disk than the blob has: the file is useless; start over.
            return Ok(Err(0));
        }
    }
    // Appends through the descriptor just hashed, so a file swept or renamed meanwhile cannot
    // be silently recreated with a hole where its prefix was.
    Ok(Ok((BlobWriter::append(file, path, offset)?, hashes)))
}

/// The queue budget all uploads share (see `WRITE_QUEUE_BYTES_TOTAL`).
pub struct WriteBudget(Arc<Semaphore>);

impl Default for WriteBudget {
    fn default() -> Self {
        WriteBudget(Arc::new(Semaphore::new(WRITE_QUEUE_BYTES_TOTAL)))
    }
}

impl WriteBudget {
    /// Starts the blocking writer of one upload, which holds `permit` (a transfer slot) and
    /// `keep` (whatever must live until it stops touching the file) while it runs.
    pub fn start(
        &self,
        file: BlobWriter,
        permit: OwnedSemaphorePermit,
        keep: impl Any + Send,
    ) -> QueuedWriter {
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        let queue = Arc::new(Semaphore::new(WRITE_QUEUE_BYTES));
        let budgets = Budgets {
            upload: queue.clone(),
            total: self.0.clone(),
        };
        let writer = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            write_upload(keep, file, rx, budgets)
        });
        QueuedWriter {
            queue,
            total: self.0.clone(),
            tx: Some(tx),
            writer: Some(writer),
        }
    }
}

/// The handler's end of an upload's writer thread.
pub struct QueuedWriter {
    /// Bytes this upload's writer may still fall behind by.
    queue: Arc<Semaphore>,
    /// The server-wide budget.
    total: Arc<Semaphore>,
    tx: Option<mpsc::UnboundedSender<Bytes>>,
    /// `None` once waited for.
    writer: Option<tokio::task::JoinHandle<Result<()>>>,
}

impl QueuedWriter {
    /// Queues `data` for the writer, waiting while this upload (or all of them) are too far
    /// ahead of the disk. If the writer stopped, its error.
    pub async fn push(&mut self, data: Bytes) -> Result<()> {
        let cost = queue_cost(&data) as u32;
        // Given back by the writer once the bytes are written; closed if the writer stops.
        let room = self.queue.acquire_many(cost).await.map(|p| p.forget());
        if room.is_err() {
            return Err(self.stopped().await);
        }
        self.total
            .acquire_many(cost)
            .await
            .map_err(|e| Error::internal("upload budget", e))?
            .forget();
        if let Some(Err(unsent)) = self.tx.as_ref().map(|tx| tx.send(data)) {
            self.total.add_permits(queue_cost(&unsent.0));
            return Err(self.stopped().await);
        }
        Ok(())
    }

    /// Closes the queue and waits until the writer has written everything.
    pub async fn finish(&mut self) -> Result<()> {
        self.tx = None;
        match self.writer.take() {
            Some(writer) => writer
                .await
                .map_err(|e| Error::internal("upload writer", e))?,
            None => Ok(()),
        }
    }

    /// The writer stopped before the upload ended: its result says why.
    async fn stopped(&mut self) -> Error {
        match self.finish().await {
            Err(e) => e,
            Ok(()) => Error::internal("upload writer", "stopped unexpectedly"),
        }
    }
}

/// The queue budgets one upload's chunks take until written: its own, and the server-wide one.
struct Budgets {
    upload: Arc<Semaphore>,
    total: Arc<Semaphore>,
}

impl Budgets {
    fn release(&self, chunk: &[u8]) {
        self.upload.add_permits(queue_cost(chunk));
        self.total.add_permits(queue_cost(chunk));
    }
}

/// The blocking side of a [`QueuedWriter`]: appends queued chunks to the upload file until the
/// handler drops the sender, releasing each chunk's budget once written. Whatever was received
/// is in the file when it returns, so an interrupted upload can be resumed. On any exit it
/// closes the upload's budget (so a handler waiting for room wakes up and learns why) and
/// returns the server-wide budget of chunks it will never write.
fn write_upload(
    _keep: impl Any,
    mut file: BlobWriter,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    budgets: Budgets,
) -> Result<()> {
    let mut written = || -> Result<()> {
        while let Some(chunk) = rx.blocking_recv() {
            file.write(&chunk)?;
            budgets.release(&chunk);
        }
        file.flush()?;
        Ok(())
    };
    let result = written();
    budgets.upload.close();
    rx.close();
    while let Ok(chunk) = rx.try_recv() {
        budgets.release(&chunk);
    }
    result
}

/// Queue budget a chunk takes (at least 1, at most an upload's whole budget).
fn queue_cost(chunk: &[u8]) -> usize {
    chunk.len().clamp(1, WRITE_QUEUE_BYTES)
}
