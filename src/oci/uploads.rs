//! Blob upload sessions: an OCI client names the digest only at the end (the closing `PUT
//! ?digest=`), while a CAS write needs it first. So the bytes of a session are spooled to a
//! file of its own (hashed as they arrive); at the close the digest is checked and the file
//! streamed into the CAS, which verifies it again like any write. Nothing is visible before
//! that; a wrong digest stores nothing. Sessions idle for an hour are dropped with their file.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::http::StatusCode;
use bytes::Bytes;
use http_body_util::BodyExt;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{OciError, OciResult};
use crate::digest::Digest;
use crate::error::Error;
use crate::store::Cas;

/// A session untouched this long is dropped.
const IDLE: Duration = Duration::from_secs(3600);
/// A request body that sends nothing this long ends its upload.
const BODY_IDLE: Duration = Duration::from_secs(60);
/// Sessions open at once; past it, new ones are refused (429) until some finish or expire.
const MAX_SESSIONS: usize = 1024;

/// A session, locked by the request using it.
type Shared = Arc<tokio::sync::Mutex<Session>>;

/// The open sessions.
pub struct Uploads {
    dir: PathBuf,
    /// A temporary spool directory, removed with the registry.
    _temporary: Option<tempfile::TempDir>,
    /// Session id → its repository (checked without the session's lock) and the session.
    sessions: parking_lot::Mutex<HashMap<String, (String, Shared)>>,
}

pub struct Session {
    file: tokio::fs::File,
    path: PathBuf,
    /// Bytes received so far.
    pub written: u64,
    hasher: Sha256,
    touched: Instant,
    /// Set once the session is finished or failed: a request that waited on its lock sees it.
    closed: bool,
}

impl Uploads {
    /// Sessions spooled under `dir`, emptied first (sessions do not outlive the process), or
    /// with `None` under a temporary directory of their own.
    pub fn new(dir: Option<PathBuf>) -> crate::error::Result<Self> {
        let (dir, temporary) = match dir {
            Some(dir) => {
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir)
                    .map_err(|e| Error::internal(format!("creating {}", dir.display()), e))?;
                (dir, None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("hoard-oci-uploads-")
                    .tempdir()
                    .map_err(|e| {
                        Error::internal("creating a spool directory for OCI uploads", e)
                    })?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        Ok(Uploads {
            dir,
            _temporary: temporary,
            sessions: parking_lot::Mutex::new(HashMap::new()),
        })
    }

    /// Opens a session for `repository`; its id goes into the upload's Location.
    pub async fn start(&self, repository: &str) -> OciResult<String> {
        self.expire();
        if self.sessions.lock().len() >= MAX_SESSIONS {
            return Err(OciError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "TOOMANYREQUESTS",
                format!("{MAX_SESSIONS} uploads are open; finish or cancel some"),
            ));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let path = self.dir.join(&id);
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| Error::internal("creating an upload's spool file", e))?;
        let session = Session {
            file,
            path,
            written: 0,
            hasher: Sha256::new(),
            touched: Instant::now(),
            closed: false,
        };
        self.sessions.lock().insert(
            id.clone(),
            (
                repository.to_string(),
                Arc::new(tokio::sync::Mutex::new(session)),
            ),
        );
        Ok(id)
    }

    /// The session `id` of `repository`: BLOB_UPLOAD_UNKNOWN (404) if there is none.
    pub fn get(&self, repository: &str, id: &str) -> OciResult<Shared> {
        let unknown = || {
            OciError::new(
                StatusCode::NOT_FOUND,
                "BLOB_UPLOAD_UNKNOWN",
                format!(
                    "no upload {} in repository {repository:?} (finished, cancelled or expired)",
                    crate::error::echo(id)
                ),
            )
        };
        match self.sessions.lock().get(id) {
            Some((owner, session)) if owner == repository => Ok(session.clone()),
            _ => Err(unknown()),
        }
    }

    /// Session `id` of `repository`, locked for this request, if it is still open.
    pub async fn open(
        &self,
        repository: &str,
        id: &str,
    ) -> OciResult<tokio::sync::OwnedMutexGuard<Session>> {
        let session = self.get(repository, id)?.lock_owned().await;
        session.check_open(id)?;
        Ok(session)
    }

    /// Ends session `id` and deletes its file.
    pub async fn remove(&self, id: &str) {
        let session = self.sessions.lock().remove(id);
        if let Some((_, session)) = session {
            let mut s = session.lock().await;
            s.closed = true;
            let _ = tokio::fs::remove_file(&s.path).await;
        }
    }

    fn expire(&self) {
        let mut sessions = self.sessions.lock();
        let old: Vec<String> = sessions
            .iter()
            .filter(|(_, (_, s))| s.try_lock().is_ok_and(|s| s.touched.elapsed() > IDLE))
            .map(|(id, _)| id.clone())
            .collect();
        for id in old {
            if let Some((_, s)) = sessions.remove(&id) {
                if let Ok(mut s) = s.try_lock() {
                    s.closed = true;
                    let _ = std::fs::remove_file(&s.path);
                }
            }
        }
    }
}

impl Session {
    /// Refuses a session that was closed while the caller waited for it.
    pub fn check_open(&self, id: &str) -> OciResult<()> {
        match self.closed {
            true => Err(OciError::new(
                StatusCode::NOT_FOUND,
                "BLOB_UPLOAD_UNKNOWN",
                format!("upload {} is finished or cancelled", crate::error::echo(id)),
            )),
            false => Ok(()),
        }
    }

    /// Appends a request body; returns how many bytes it held.
    pub async fn append<B>(&mut self, body: B, max: u64) -> OciResult<u64>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let mut body = body;
        let mut added = 0u64;
        loop {
            let next = tokio::time::timeout(BODY_IDLE, body.frame()).await;
            let Ok(next) = next else {
                self.closed = true;
                return Err(OciError::new(
                    StatusCode::BAD_REQUEST,
                    "BLOB_UPLOAD_INVALID",
                    format!("no bytes for {}s: the upload is ended", BODY_IDLE.as_secs()),
                ));
            };
            let Some(frame) = next else {
                break;
            };
            let frame = frame.map_err(|e| {
                OciError::new(
                    StatusCode::BAD_REQUEST,
                    "BLOB_UPLOAD_INVALID",
                    format!("reading the request body: {e}"),
                )
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if max > 0 && self.written + data.len() as u64 > max {
                return Err(OciError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "SIZE_INVALID",
                    format!("the blob is larger than limits.max_blob_size ({max} bytes)"),
                ));
            }
            if let Err(e) = self.file.write_all(&data).await {
                // Part of the chunk may be in the file: the session cannot go on.
                self.closed = true;
                return Err(Error::internal("spooling an upload", e).into());
            }
            self.hasher.update(&data);
            self.written += data.len() as u64;
            added += data.len() as u64;
        }
        self.touched = Instant::now();
        Ok(added)
    }

    /// Checks the bytes against `expected` and stores them in the CAS; the session is done
    /// either way.
    pub async fn finish(
        &mut self,
        expected: [u8; 32],
        cas: &dyn Cas,
        id: &str,
    ) -> OciResult<Digest> {
        self.closed = true;
        let got: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
        if got != expected {
            return Err(OciError::new(
                StatusCode::BAD_REQUEST,
                "DIGEST_INVALID",
                format!(
                    "the uploaded {} bytes have digest {}, not {}; nothing was stored",
                    self.written,
                    super::digest_text(&got),
                    super::digest_text(&expected)
                ),
            ));
        }
        let digest = Digest {
            hash: got,
            size: self.written,
        };
        if cas.find_missing(&[digest]).await?.is_empty() {
            return Ok(digest);
        }
        self.file
            .flush()
            .await
            .map_err(|e| Error::internal("spooling an upload", e))?;
        let mut file = tokio::fs::File::open(&self.path)
            .await
            .map_err(|e| Error::internal("reopening an upload's spool file", e))?;
        let mut upload = cas.begin_upload(&format!("oci-{id}"), &digest, 0).await?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buf)
                .await
                .map_err(|e| Error::internal("reading an upload's spool file", e))?;
            if n == 0 {
                break;
            }
            upload.append(Bytes::copy_from_slice(&buf[..n])).await?;
        }
        upload.commit().await?;
        Ok(digest)
    }
}
