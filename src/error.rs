//! The crate's one error type, and the only place that knows how errors become gRPC statuses.
//!
//! Stores and services return [`Error`]; its variant says what went wrong and its message names the
//! offending digest, resource name or field, so a client can act on it without reading our logs.

use crate::proto::google::rpc;

/// What went wrong, in the terms a client can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The thing asked for is not stored (or no longer complete).
    #[error("{0}")]
    NotFound(String),
    /// The request itself is wrong: bad digest, resource name, size, field.
    #[error("{0}")]
    InvalidArgument(String),
    /// An offset or range lies outside the resource.
    #[error("{0}")]
    OutOfRange(String),
    /// The request is well formed but the state does not allow it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller sent no credentials where they are required, or credentials nobody knows.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do this here (e.g. update a read-only namespace).
    #[error("{0}")]
    PermissionDenied(String),
    /// A concurrent operation conflicts with this one; retrying later may succeed.
    #[error("{0}")]
    Aborted(String),
    /// A limit (space, size) is reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The disk under the data dir is full (as opposed to the configured `max_size`): the
    /// store reacts by evicting, clients see RESOURCE_EXHAUSTED.
    #[error("{0}")]
    StorageFull(String),
    /// The data dir cannot be written (a read-only file system): clients see
    /// RESOURCE_EXHAUSTED, and the store refuses writes up front until it can write again.
    #[error("{0}")]
    StorageUnwritable(String),
    /// The server cannot serve right now (shutting down, storage offline).
    #[error("{0}")]
    Unavailable(String),
    /// The client's request stream failed (cancelled, undecodable, too large): passed on as is.
    #[error("{}", .0.message())]
    Stream(tonic::Status),
    /// Something failed on our side; `context` says what we were doing.
    #[error("{context}: {source}")]
    Internal {
        context: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps a lower-level failure with what we were doing when it happened.
    pub fn internal(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Internal {
            context: context.into(),
            source: source.into(),
        }
    }

    pub fn code(&self) -> tonic::Code {
        match self {
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Error::OutOfRange(_) => tonic::Code::OutOfRange,
            Error::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Error::Aborted(_) => tonic::Code::Aborted,
            Error::PermissionDenied(_) => tonic::Code::PermissionDenied,
            Error::Unauthenticated(_) => tonic::Code::Unauthenticated,
            Error::ResourceExhausted(_) | Error::StorageFull(_) | Error::StorageUnwritable(_) => {
                tonic::Code::ResourceExhausted
            }
            Error::Unavailable(_) => tonic::Code::Unavailable,
            Error::Stream(status) => status.code(),
            Error::Internal { .. } => tonic::Code::Internal,
        }
    }

    /// The same failure again, for each of the blobs of a batch that one failed step (a write,
    /// a commit) failed together.
    pub fn again(&self) -> Error {
        match self {
            Error::NotFound(m) => Error::NotFound(m.clone()),
            Error::InvalidArgument(m) => Error::InvalidArgument(m.clone()),
            Error::OutOfRange(m) => Error::OutOfRange(m.clone()),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(m.clone()),
            Error::Unauthenticated(m) => Error::Unauthenticated(m.clone()),
            Error::PermissionDenied(m) => Error::PermissionDenied(m.clone()),
            Error::Aborted(m) => Error::Aborted(m.clone()),
            Error::ResourceExhausted(m) => Error::ResourceExhausted(m.clone()),
            Error::StorageFull(m) => Error::StorageFull(m.clone()),
            Error::StorageUnwritable(m) => Error::StorageUnwritable(m.clone()),
            Error::Unavailable(m) => Error::Unavailable(m.clone()),
            Error::Stream(status) => Error::Stream(status.clone()),
            Error::Internal { context, source } => {
                Error::internal(context.clone(), source.to_string())
            }
        }
    }

    /// The per-item status used inside batch responses.
    pub fn to_rpc_status(&self) -> rpc::Status {
        if let Error::Internal { .. } = self {
            tracing::error!(error = %self, "internal error");
        }
        rpc::Status {
            code: self.code() as i32,
            message: client_message(self),
            details: Vec::new(),
        }
    }
}

/// Longest piece of a request that an error message quotes back.
const ECHO_MAX: usize = 200;
/// Longest error message sent: it travels in `grpc-message` metadata, and clients with gRPC's
/// default 8 KiB metadata limit would see RESOURCE_EXHAUSTED instead of the real error.
const MESSAGE_MAX: usize = 2048;

/// A client-supplied value (name, field) as an error message quotes it: debug-quoted, and
/// cut to `ECHO_MAX` (200) bytes with a "…" so a 100 KiB name cannot make the reply unreadable.
pub fn echo(value: &str) -> String {
    let quoted = format!("{value:?}");
    if quoted.len() <= ECHO_MAX {
        return quoted;
    }
    format!("{}… ({} bytes)", cut(&quoted, ECHO_MAX), value.len())
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The message a client sees, capped at [`MESSAGE_MAX`] bytes.
fn client_message(e: &Error) -> String {
    let message = e.to_string();
    if message.len() <= MESSAGE_MAX {
        return message;
    }
    format!("{}…", cut(&message, MESSAGE_MAX))
}

/// The "everything went well" status for batch items.
pub fn ok_rpc_status() -> rpc::Status {
    rpc::Status {
        code: tonic::Code::Ok as i32,
        message: String::new(),
        details: Vec::new(),
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        if let Error::Internal { .. } = e {
            tracing::error!(error = %e, "internal error");
        }
        tonic::Status::new(e.code(), client_message(&e))
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        // A streamed message above the size limit: RESOURCE_EXHAUSTED per gRPC's code table,
        // not tonic's OUT_OF_RANGE (see `layers`).
        if status.code() == tonic::Code::OutOfRange
            && crate::layers::is_oversize_message(status.message())
        {
            return Error::ResourceExhausted(status.message().to_string());
        }
        Error::Stream(status)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                return Error::StorageFull(format!(
                    "storage is full: {e}; hoard is evicting least recently used blobs to make \
                     room, retry shortly"
                ));
            }
            // Writes cannot succeed until an operator acts (evicting would not help); reads go on.
            std::io::ErrorKind::ReadOnlyFilesystem => {
                return Error::StorageUnwritable(format!(
                    "storage cannot take writes: {e} (the data dir's file system is read-only)"
                ));
            }
            _ => {}
        }
        if e.get_ref()
            .is_some_and(|inner| inner.is::<crate::store::segments::Closed>())
        {
            return Error::Unavailable(e.to_string());
        }
        Error::internal("I/O error", e)
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::ReadOnlyFilesystem
                ) =>
            {
                io.into()
            }
            e => Error::internal("sled", e),
        }
    }
}
