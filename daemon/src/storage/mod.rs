//! The storage seam: what the commands may ask of storage, and the types they see. Each
//! backend lives in a folder of its own beneath this one ([`local`]: a filesystem under the
//! storage root); commands never reach into a backend.

pub mod local;

use std::io::ErrorKind;
use std::time::Duration;

use xfer_proto::ErrorCode;
use xfer_proto::limits::{MAX_PATH_DEPTH, MAX_PATH_LEN};
use xfer_proto::path::PathError;

/// Why a storage operation failed. Messages name the remote path, never a server path.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The path is not a valid remote path.
    #[error("refused path `{path}`: {source}")]
    BadPath {
        /// The remote path as given.
        path: String,
        /// Why.
        source: PathError,
    },
    /// A symlink was met while resolving.
    #[error("refused path `{0}`: it goes through a symbolic link")]
    Symlink(String),
    /// Nothing there.
    #[error("`{0}` does not exist")]
    NotFound(String),
    /// A file where a folder is needed, or the reverse.
    #[error("`{0}` is {1}")]
    WrongKind(String, &'static str),
    /// The target exists.
    #[error("`{0}` already exists")]
    AlreadyExists(String),
    /// A folder to delete has content.
    #[error("folder `{0}` is not empty")]
    NotEmpty(String),
    /// The disk is full.
    #[error("no space left on the server")]
    NoSpace,
    /// The upload is bigger than the configured limit.
    #[error("file is larger than the server's {0}-byte upload limit")]
    TooLarge(u64),
    /// Moving a folder would put something inside it past the path limits.
    #[error(
        "moving `{from}` to `{to}` would put an entry inside it {depth} levels deep, in a path of {len} bytes; paths are limited to {MAX_PATH_DEPTH} levels and {MAX_PATH_LEN} bytes: move it less deep, or move what is inside it separately"
    )]
    TooDeep {
        /// The folder being moved.
        from: String,
        /// Where it would go.
        to: String,
        /// Depth the deepest (or first too long) entry would have.
        depth: usize,
        /// Length its path would have.
        len: usize,
    },
    /// A folder too big to check that moving it keeps every path within the limits.
    #[error(
        "`{from}` holds more than {max} entries, too many to check that moving it keeps every path within {MAX_PATH_DEPTH} levels and {MAX_PATH_LEN} bytes; move its subfolders separately"
    )]
    TooBigToCheck {
        /// The folder being moved.
        from: String,
        /// Most entries a rename looks at.
        max: u64,
    },
    /// Anything else; the message is for the server log only.
    #[error("{op} `{path}`: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The remote path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

impl StorageError {
    /// The wire error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            StorageError::BadPath { .. } => ErrorCode::InvalidPath,
            StorageError::Symlink(_) => ErrorCode::PermissionDenied,
            StorageError::NotFound(_) => ErrorCode::NotFound,
            StorageError::WrongKind(..) => ErrorCode::WrongKind,
            StorageError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            StorageError::NotEmpty(_) => ErrorCode::NotEmpty,
            StorageError::NoSpace => ErrorCode::NoSpace,
            StorageError::TooLarge(_) => ErrorCode::PermissionDenied,
            StorageError::TooDeep { .. } | StorageError::TooBigToCheck { .. } => {
                ErrorCode::InvalidPath
            }
            StorageError::Io { source, .. } if source.kind() == ErrorKind::PermissionDenied => {
                ErrorCode::PermissionDenied
            }
            StorageError::Io { .. } => ErrorCode::Internal,
        }
    }

    /// The message to send to the client: internal I/O detail stays in the server log.
    pub fn client_message(&self) -> String {
        match self {
            StorageError::Io { op, path, .. } => format!("{op} `{path}` failed on the server"),
            other => other.to_string(),
        }
    }

    /// Classifies an I/O error on `path` (a remote path) the one way every operation does.
    pub(crate) fn io(op: &'static str, path: &str, source: std::io::Error) -> Self {
        match source.kind() {
            ErrorKind::NotFound => StorageError::NotFound(path.into()),
            ErrorKind::AlreadyExists => StorageError::AlreadyExists(path.into()),
            ErrorKind::DirectoryNotEmpty => StorageError::NotEmpty(path.into()),
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded => StorageError::NoSpace,
            ErrorKind::IsADirectory => StorageError::WrongKind(path.into(), "a folder"),
            ErrorKind::NotADirectory => StorageError::WrongKind(path.into(), "not a folder"),
            _ => StorageError::Io {
                op,
                path: path.into(),
                source,
            },
        }
    }
}

/// How an upload may use the partial-upload store.
#[derive(Debug, Clone, Copy)]
pub enum Staging {
    /// A plain temp file, deleted if the upload does not complete (resume is off, or the
    /// client cannot resume).
    Temp,
    /// A partial kept on interruption; `up_to` is the most the client will skip (0: start
    /// over), `ttl` how long an untouched partial stays usable, `max_bytes` the most all of
    /// the user's partials may hold.
    Resumable {
        /// Largest offset the client accepts.
        up_to: u64,
        /// Expiry of untouched partials.
        ttl: Duration,
        /// The user's partial budget in bytes.
        max_bytes: u64,
    },
}
