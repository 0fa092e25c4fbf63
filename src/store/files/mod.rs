//! The file tier: large blobs as plain files under the data dir, outside the index (sled
//! amplifies large values). Any index can keep its large blobs here; the tier knows nothing of
//! the index beyond what its callers hand it (a digest, the checksums recorded at write time,
//! and a callback for a blob found damaged).
//!
//! Layout: `cas/{first two hex chars}/{hash}` for complete blobs, `uploads/` for uploads in
//! progress. A blob file appears under `cas/` only by rename after its bytes were verified and
//! fsynced, so a crash leaves either no file or a complete one.
//!
//! - [`writer`]: [`BlobWriter`], appending with O_DIRECT from an aligned staging buffer.
//! - [`upload`]: an upload's file opened at an offset with its hashes rebuilt, and the
//!   blocking writer thread fed by a bounded queue.
//! - [`read`]: the streaming read of a blob file, checked per MiB before bytes are sent.
//!
//! Must not: know the index's format or take its locks (the owner publishes and drops entries).

pub mod read;
pub mod upload;
pub mod writer;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use writer::BlobWriter;

use crate::digest::Digest;
use crate::error::{Error, Result};

/// Large-blob transfers (file uploads and reads) in progress at once. Each holds a blocking
/// thread while it lasts; past this, new ones get RESOURCE_EXHAUSTED instead of starving the
/// thread pool (the runtime is built with room for them).
pub const MAX_TRANSFERS: usize = 1024;

/// Permits for large-blob transfers (see [`MAX_TRANSFERS`]).
pub struct Transfers(Arc<Semaphore>);

impl Default for Transfers {
    fn default() -> Self {
        Transfers(Arc::new(Semaphore::new(MAX_TRANSFERS)))
    }
}

impl Transfers {
    /// Admits one more large-blob transfer, or says the server is at its limit.
    pub fn permit(&self) -> Result<OwnedSemaphorePermit> {
        self.0.clone().try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted(format!(
                "{MAX_TRANSFERS} large-blob transfers are already in progress; retry shortly"
            ))
        })
    }
}

/// Where blob files live.
#[derive(Clone, Debug)]
pub struct BlobFiles {
    cas: PathBuf,
    uploads: PathBuf,
}

impl BlobFiles {
    /// Creates the directories under `data_dir` if needed.
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        let files = BlobFiles {
            cas: data_dir.join("cas"),
            uploads: data_dir.join("uploads"),
        };
        fs::create_dir_all(&files.cas)?;
        fs::create_dir_all(&files.uploads)?;
        Ok(files)
    }

    /// The final path of a stored blob.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.cas.join(&hex[..2]).join(hex)
    }

    /// The file that collects a client's upload, named so that it survives a restart and can be
    /// resumed by the same upload id.
    pub fn upload_path(&self, upload_id: &str, digest: &Digest) -> PathBuf {
        self.uploads
            .join(format!("{upload_id}-{}-{}", digest.hex(), digest.size))
    }

    /// The directory of stored blob files (one subdirectory per hash prefix).
    pub fn cas_dir(&self) -> &Path {
        &self.cas
    }

    /// The directory of uploads in progress.
    pub fn uploads_dir(&self) -> &Path {
        &self.uploads
    }

    /// A fresh temporary path for a blob written in one piece.
    pub fn temp_path(&self) -> PathBuf {
        self.uploads.join(format!("tmp-{}", uuid::Uuid::new_v4()))
    }

    /// Makes a verified, fully written file the stored copy of `digest`: fsync, rename, fsync the
    /// directory. Blocking; call from a blocking context.
    pub fn publish(&self, written: &Path, digest: &Digest) -> io::Result<()> {
        fs::File::open(written)?.sync_all()?;
        let dest = self.blob_path(digest);
        let dir = dest.parent().unwrap_or(&self.cas);
        if !dir.exists() {
            fs::create_dir_all(dir)?;
            // A new shard directory must itself survive a crash.
            fs::File::open(&self.cas)?.sync_all()?;
        }
        fs::rename(written, &dest)?;
        fs::File::open(dir)?.sync_all()
    }
}

/// Whether a blob file holds exactly the bytes of `digest` (full SHA-256). Blocking.
pub fn file_matches(path: &Path, digest: &Digest, buf: &mut [u8]) -> bool {
    use sha2::Digest as _;
    use std::io::Read as _;
    let Ok(mut file) = fs::File::open(path) else {
        return false;
    };
    let mut sha = sha2::Sha256::new();
    let mut len = 0u64;
    loop {
        match file.read(buf) {
            Ok(0) => break,
            Ok(n) => {
                sha.update(&buf[..n]);
                len += n as u64;
            }
            Err(_) => return false,
        }
    }
    len == digest.size && sha.finalize()[..] == digest.hash[..]
}
