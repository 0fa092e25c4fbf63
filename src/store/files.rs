//! Large blobs as plain files under the data dir, outside sled (which amplifies large values).
//!
//! Layout: `cas/{first two hex chars}/{hash}` for complete blobs, `uploads/` for uploads in
//! progress. A blob file appears under `cas/` only by rename after its bytes were verified and
//! fsynced, so a crash leaves either no file or a complete one.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::digest::Digest;

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
        fs::create_dir_all(dir)?;
        fs::rename(written, &dest)?;
        fs::File::open(dir)?.sync_all()
    }
}
