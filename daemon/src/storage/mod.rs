//! The storage seam: what the commands may ask of storage, and the only types they see.
//!
//! [`Store`] is the configured backend at the root level (a user's tree, the partial-upload
//! sweep, a user's partial usage); [`Tree`] is one user's view of it, the handle every
//! command works through: list, read from an offset, upload (begin, resume, commit, discard),
//! batched uploads (stage, commit a batch), delete, rename and mkdir. Both are enums with one
//! variant per backend, so adding a backend is adding a variant and its match arms, and the
//! compiler names every place that must learn of it. Every operation is async; a backend
//! whose work blocks (the [`local`] filesystem) moves it onto the blocking pool itself.
//!
//! Backends live in folders of their own beneath this one ([`local`]: folders under the
//! storage root, confined by openat2). What is shared lives here: [`StorageError`], which
//! knows nothing of the wire (the commands map it to an error code in one place), the
//! staging choice, and the handles a download reads from and an upload writes into. Those
//! data-path handles are still local files until the body pipeline takes a source and a sink.
//!
//! [`active`] is backend-independent bookkeeping: the resumable uploads this daemon runs.

pub mod active;
pub mod local;
pub mod object;
#[cfg(test)]
pub(crate) mod tests;

use std::fs::File;
use std::future::Future;
use std::io::ErrorKind;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use xfer_proto::limits::{CHUNK_LEN, MAX_PATH_DEPTH, MAX_PATH_LEN};
use xfer_proto::path::PathError;
use xfer_proto::{Digest, Entry};

/// Why a storage operation failed. Messages name the remote path, never a server path;
/// which wire code each becomes, and what the client is told, is the commands' business
/// (`cmd::errors`).
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
    /// Anything else; the message is for the server log only (the client is told only what
    /// failed, not why).
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
    /// Classifies an I/O error on `path` (a remote path) the one way every operation does.
    pub fn io(op: &'static str, path: &str, source: std::io::Error) -> Self {
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

/// Largest file [`Tree::open_read`] reads into memory when the whole file is wanted: the
/// caller then sends it with its header and trailer in one write. For many small files the
/// body pipeline's per-file cost (a second blocking task, buffer handoffs, three writes) was
/// most of the daemon's time; one pipeline buffer's worth keeps memory where the pipeline
/// bounds it.
pub const WHOLE_READ_MAX: u64 = CHUNK_LEN as u64;

/// Free bytes a whole read leaves before its data, and spare capacity after it, so the
/// caller can put a frame header and trailer around the data without moving it.
pub const WHOLE_READ_ROOM: usize = 64;

/// Most entries a listing hands over at once (see [`Listing`]).
pub const LIST_BATCH: usize = 128;

/// The configured storage backend: the root every user's tree lives in.
#[derive(Debug, Clone)]
pub enum Store {
    /// Folders under a local storage root.
    Local(local::LocalStore),
}

impl Store {
    /// Opens the backend `config` names (today always the local root `config.root`),
    /// creating what it needs and clearing what an earlier crash left.
    pub fn open(config: &crate::config::Config) -> std::io::Result<Store> {
        Ok(Store::Local(local::LocalStore::open(&config.root)?))
    }

    /// `user`'s tree, created on first use.
    pub async fn user_tree(&self, user: &str) -> std::io::Result<Tree> {
        match self {
            Store::Local(s) => Ok(Tree::Local(s.user_tree(user).await?)),
        }
    }

    /// Deletes partial uploads not touched for `ttl` that no upload holds; returns how many.
    pub async fn sweep_partials(&self, ttl: Duration) -> std::io::Result<usize> {
        match self {
            Store::Local(s) => s.sweep_partials(ttl).await,
        }
    }

    /// Bytes `user`'s partial uploads count against their budget now (kept ones at their
    /// size, running ones at their declared size): what a quota adds to their visible files.
    pub async fn partial_usage(&self, user: &str) -> std::io::Result<u64> {
        match self {
            Store::Local(s) => s.partial_usage(user).await,
        }
    }
}

/// One user's view of storage: every remote path is checked by `xfer_proto::path` and
/// confined to the user's tree. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Tree {
    /// A folder under the local storage root.
    Local(local::LocalTree),
}

impl Tree {
    /// Lists a folder (or describes a single file), in no particular order, as a stream of
    /// batches: memory stays constant whatever the folder's size. An error (the path does
    /// not exist, is refused, or the walk failed) comes through the stream too, and ends it.
    pub fn list(&self, remote: &str) -> Listing {
        match self {
            Tree::Local(t) => t.list(remote),
        }
    }

    /// Opens a regular file for reading. With `whole` (the caller wants every byte from 0), a
    /// file of at most [`WHOLE_READ_MAX`] bytes is read at once and a bigger one comes with
    /// its stored digest when the backend kept a valid one.
    pub async fn open_read(&self, remote: &str, whole: bool) -> Result<ReadHandle, StorageError> {
        match self {
            Tree::Local(t) => t.open_read(remote, whole).await,
        }
    }

    /// Prepares an upload of `size` bytes to `remote`: the parent folder must exist, the
    /// target must not be a folder, `size` must be within `max_bytes` (0: no limit) and the
    /// store must have room. With [`Staging::Resumable`], what an interrupted attempt left
    /// is offered for resume ([`Upload::held`]).
    pub async fn begin_upload(
        &self,
        remote: &str,
        size: u64,
        max_bytes: u64,
        staging: Staging,
    ) -> Result<Upload, StorageError> {
        match self {
            Tree::Local(t) => Ok(Upload::Local(
                t.begin_upload(remote, size, max_bytes, staging).await?,
            )),
        }
    }

    /// Makes a verified upload visible under its path, durably, in one step: a reader sees
    /// the old version or the new one, complete. `digest` is the whole file's verified
    /// BLAKE3, kept by the backend where it can (so a whole download need not hash again).
    pub async fn commit(&self, upload: Upload, digest: &Digest) -> Result<(), StorageError> {
        match (self, upload) {
            (Tree::Local(t), Upload::Local(u)) => t.commit(u, digest).await,
        }
    }

    /// Starts staging a batched upload's verified `data` at `remote` (its missing folders
    /// are created, like `mkdir -p`), invisible until [`Tree::commit_batch`]. Runs in the
    /// background: the caller goes on reading while it runs, and awaits the task for the
    /// outcome. `cache` is what the backend keeps between stagings of one batch.
    pub fn stage(&self, remote: &str, data: Vec<u8>, cache: &StageCache) -> StageTask {
        let task = match self {
            Tree::Local(t) => StageWork::Local(t.stage(remote, data, &cache.local)),
        };
        StageTask {
            remote: remote.into(),
            task,
        }
    }

    /// Makes staged files visible, in order, durably: each target is afterwards old or new
    /// and complete, never partly written. Returns each file's outcome (a file that fails
    /// stays invisible and is deleted), or an error when the whole batch failed and nothing
    /// became visible.
    pub async fn commit_batch(&self, staged: Vec<Staged>) -> Result<Committed, StorageError> {
        match self {
            Tree::Local(t) => {
                let files = staged
                    .into_iter()
                    .map(|s| match s {
                        Staged::Local(f) => f,
                    })
                    .collect();
                let done = t.commit_batch(files).await?;
                Ok(done
                    .into_iter()
                    .map(|(f, r)| (Staged::Local(f), r))
                    .collect())
            }
        }
    }

    /// Deletes a file or an empty folder.
    pub async fn delete(&self, remote: &str) -> Result<(), StorageError> {
        match self {
            Tree::Local(t) => t.delete(remote).await,
        }
    }

    /// Renames `from` to `to`; if `to` is an existing folder, moves `from` into it. An
    /// existing file at the target is replaced (as `mv` does); a folder never is. A folder is
    /// only moved if every path inside it stays within the path limits afterwards (checked
    /// by looking at up to `max_check` entries). Returns where the entry now is.
    pub async fn rename(
        &self,
        from: &str,
        to: &str,
        max_check: u64,
    ) -> Result<String, StorageError> {
        match self {
            Tree::Local(t) => t.rename(from, to, max_check).await,
        }
    }

    /// Creates a folder and any missing parents (like `mkdir -p`); an existing folder is fine.
    pub async fn mkdir(&self, remote: &str) -> Result<(), StorageError> {
        match self {
            Tree::Local(t) => t.mkdir(remote).await,
        }
    }
}

/// A listing under way (see [`Tree::list`]): batches of at most [`LIST_BATCH`] entries, in
/// the order the backend found them. Dropping it stops the walk.
#[derive(Debug)]
pub struct Listing {
    /// Batches from the walk; an error ends it.
    rx: mpsc::Receiver<Result<Vec<Entry>, StorageError>>,
}

impl Listing {
    /// A listing and the sender its walk fills: two batches in flight at most, so a slow
    /// reader holds the walk back instead of letting it fill memory.
    pub(crate) fn channel() -> (mpsc::Sender<Result<Vec<Entry>, StorageError>>, Listing) {
        let (tx, rx) = mpsc::channel(2);
        (tx, Listing { rx })
    }

    /// The next batch; `None` once the listing is complete. After an error, nothing follows.
    pub async fn next(&mut self) -> Option<Result<Vec<Entry>, StorageError>> {
        self.rx.recv().await
    }
}

/// A file opened for reading (see [`Tree::open_read`]).
#[derive(Debug)]
pub struct ReadHandle {
    /// Its size in bytes when it was opened.
    pub size: u64,
    /// Its modification time, seconds since the epoch.
    pub modified: i64,
    /// The BLAKE3 its upload stored, still valid: only for a whole read of a big file.
    pub stored: Option<Digest>,
    /// Where its bytes come from.
    pub body: ReadBody,
}

/// Where a download's bytes come from.
#[derive(Debug)]
pub enum ReadBody {
    /// A local file, read from any offset.
    File(File),
    /// The whole file, read already: its bytes are `buf[WHOLE_READ_ROOM..]`, with
    /// [`WHOLE_READ_ROOM`] bytes free before them and spare capacity after, and `digest` is
    /// their BLAKE3.
    Whole {
        /// Free room, then the file's bytes.
        buf: Vec<u8>,
        /// BLAKE3 of the file's bytes.
        digest: Digest,
    },
}

impl ReadHandle {
    /// BLAKE3 of the first `len` bytes, as a hasher that can go on with the rest: what a
    /// resumed download compares with the client's prefix and then continues. Fails if the
    /// file is shorter than `len`; dropping the future stops the hashing soon.
    pub async fn prefix_hasher(&self, len: u64) -> std::io::Result<blake3::Hasher> {
        match &self.body {
            ReadBody::File(f) => xfer_proto::body::hash_prefix(f, len).await,
            ReadBody::Whole { buf, .. } => {
                let data = &buf[WHOLE_READ_ROOM..];
                let len = usize::try_from(len)
                    .ok()
                    .filter(|&n| n <= data.len())
                    .ok_or_else(|| std::io::Error::from(ErrorKind::UnexpectedEof))?;
                let mut h = blake3::Hasher::new();
                h.update(&data[..len]);
                Ok(h)
            }
        }
    }
}

/// An upload in progress (see [`Tree::begin_upload`]): staged data that becomes visible only
/// through [`Tree::commit`]. Dropping it (a broken connection, a shutdown) keeps what can be
/// resumed and deletes the rest; [`Upload::discard`] deletes it all.
#[derive(Debug)]
pub enum Upload {
    /// Staged in a partial or temp file under the local root.
    Local(local::PendingUpload),
}

impl Upload {
    /// The staged file the body is written into (a local file until the body pipeline takes
    /// a sink).
    pub fn file(&self) -> &File {
        match self {
            Upload::Local(u) => u.file(),
        }
    }

    /// The canonical remote path (`a//b` and `a/b` are one upload).
    pub fn key(&self) -> &str {
        match self {
            Upload::Local(u) => u.key(),
        }
    }

    /// Bytes held from an interrupted attempt, offered for resume (0 for a fresh start).
    pub fn held(&self) -> u64 {
        match self {
            Upload::Local(u) => u.held(),
        }
    }

    /// Whether an interruption now would leave data to resume from.
    pub fn resumable(&self) -> bool {
        match self {
            Upload::Local(u) => u.resumable(),
        }
    }

    /// Whether it is staged apart because another upload of the same path holds the partial
    /// (not because resume is off or the partial budget is full).
    pub fn held_elsewhere(&self) -> bool {
        match self {
            Upload::Local(u) => u.held_elsewhere(),
        }
    }

    /// BLAKE3 of the held bytes, as a hasher that can go on with the rest (the resume
    /// offer's digest, and the start of the body's).
    pub async fn prefix_hasher(&self) -> std::io::Result<blake3::Hasher> {
        match self {
            Upload::Local(u) => u.prefix_hasher().await,
        }
    }

    /// Drops what an earlier attempt left, to start from byte 0. On failure the upload must
    /// not go on: old bytes past the new body's end would remain.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        match self {
            Upload::Local(u) => u.restart().await,
        }
    }

    /// Deletes the staged data (bad digest, failed write, ended session): nothing to resume
    /// from. Done when this returns.
    pub async fn discard(self) {
        match self {
            Upload::Local(u) => u.discard().await,
        }
    }
}

/// What a backend keeps between the stagings of one batch (the local backend: the folders
/// it has opened). A fresh one for each session: nothing in it may outlive the user's.
#[derive(Debug, Clone, Default)]
pub struct StageCache {
    /// The local backend's open folders.
    local: Arc<Mutex<local::OpenDirs>>,
}

/// A file staged by a batched upload, invisible until [`Tree::commit_batch`]; dropped
/// uncommitted, its data is deleted.
#[derive(Debug)]
pub enum Staged {
    /// A temp file under the local root.
    Local(local::StagedFile),
}

impl Staged {
    /// The remote path as the client gave it.
    pub fn remote(&self) -> &str {
        match self {
            Staged::Local(f) => f.remote(),
        }
    }
}

/// Each staged file with its commit's outcome, in the order given.
pub type Committed = Vec<(Staged, Result<(), StorageError>)>;

/// A staging started by [`Tree::stage`]; await it for the staged file. Dropped before it
/// ends, the work still finishes and its file is deleted.
#[derive(Debug)]
pub struct StageTask {
    /// The remote path, for an error should the work itself fail.
    remote: String,
    /// The work under way.
    task: StageWork,
}

/// The backend's work behind a [`StageTask`].
#[derive(Debug)]
enum StageWork {
    /// On the blocking pool.
    Local(JoinHandle<Result<local::StagedFile, StorageError>>),
}

impl StageTask {
    /// Whether the staging has ended (awaiting it then returns at once).
    pub fn is_finished(&self) -> bool {
        match &self.task {
            StageWork::Local(h) => h.is_finished(),
        }
    }
}

impl Future for StageTask {
    type Output = Result<Staged, StorageError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let failed = |e: tokio::task::JoinError, remote: &str| StorageError::Io {
            op: "staging",
            path: remote.into(),
            source: std::io::Error::other(e.to_string()),
        };
        match &mut this.task {
            StageWork::Local(h) => Pin::new(h).poll(cx).map(|r| match r {
                Ok(staged) => staged.map(Staged::Local),
                Err(e) => Err(failed(e, &this.remote)),
            }),
        }
    }
}
