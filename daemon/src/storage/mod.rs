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
//! storage root, confined by openat2; [`object`]: an S3-compatible bucket that several
//! daemons share). What is shared lives here: [`StorageError`], which knows nothing of the
//! wire (the commands map it to an error code in one place), the staging choice, and the
//! handles a download reads from and an upload writes into.
//!
//! [`active`] is backend-independent bookkeeping: the resumable uploads this daemon runs.

pub mod active;
pub mod body;
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
    /// The data does not hash to the digest it came with: nothing was saved.
    #[error("`{0}` arrived corrupted (digest mismatch); nothing was saved")]
    Corrupted(String),
    /// The storage service failed or refused (an object store that cannot be reached, a
    /// damaged resume record, an upload another attempt took over).
    #[error("{detail}")]
    Service {
        /// What the client is told: the operation and its path, never the store's details.
        message: String,
        /// For the server log only (never a credential: the store's errors hold none).
        detail: String,
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

impl StorageError {
    /// A handle of one backend given to another: a bug, answered as an internal error
    /// rather than a panic.
    fn mismatched(what: &str) -> Self {
        StorageError::Service {
            message: "the server's storage failed".into(),
            detail: format!("{what}: a handle of one storage backend was given to another"),
        }
    }
}

/// The components of `remote` under the path rules every backend shares (see
/// [`xfer_proto::path`]); `need_name` refuses the root. Both backends check a path here before
/// they touch anything.
pub(crate) fn checked_parts(remote: &str, need_name: bool) -> Result<Vec<&str>, StorageError> {
    let parts = if need_name {
        xfer_proto::path::named_components(remote)
    } else {
        xfer_proto::path::components(remote)
    };
    parts.map_err(|source| StorageError::BadPath {
        path: remote.into(),
        source,
    })
}

impl From<object::ObjectError> for StorageError {
    fn from(e: object::ObjectError) -> Self {
        use object::ObjectError as O;
        match e {
            O::Tree(e) => e,
            O::DigestMismatch(p) => StorageError::Corrupted(p),
            other @ (O::SizeMismatch { .. }
            | O::TakenOver(_)
            | O::Store { .. }
            | O::Record { .. }) => StorageError::Service {
                message: other.client_message(),
                detail: other.to_string(),
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
    /// A bucket on an S3-compatible object store.
    Object(object::ObjectStore),
}

impl Store {
    /// Opens the backend `config.storage.kind` names: the local root `config.root` (created
    /// if needed, with what an earlier crash left cleared) or the bucket `[storage]`
    /// describes, with credentials from `storage.credentials_file` or the environment. Makes
    /// no request to a bucket: [`Store::check`] does.
    pub fn open(config: &crate::config::Config) -> anyhow::Result<Store> {
        use anyhow::Context;
        match config.storage.kind {
            crate::config::StorageKind::Local => Ok(Store::Local(
                local::LocalStore::open(&config.root)
                    .with_context(|| format!("opening storage root `{}`", config.root.display()))?,
            )),
            crate::config::StorageKind::S3 => {
                let creds = object::Credentials::load(&config.storage)?;
                Ok(Store::Object(object::ObjectStore::open(
                    &config.storage,
                    creds,
                )?))
            }
        }
    }

    /// Checks that the backend answers (a bucket that exists, at an endpoint that can be
    /// reached, with credentials it accepts): the daemon checks it before it serves, so a
    /// wrong `[storage]` fails at start with what to check, not at the first upload.
    pub async fn check(&self) -> anyhow::Result<()> {
        match self {
            Store::Local(_) => Ok(()),
            Store::Object(s) => s.check().await.map_err(|e| {
                anyhow::anyhow!(
                    "the object store does not answer: {e}; check that storage.endpoint can be reached from this host, that the bucket storage.bucket exists, that storage.region is the store's, and that the credentials (storage.credentials_file, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY) are valid for that bucket"
                )
            }),
        }
    }

    /// `user`'s tree, created on first use (an object store's tree exists once something
    /// is stored in it).
    pub async fn user_tree(&self, user: &str) -> std::io::Result<Tree> {
        match self {
            Store::Local(s) => Ok(Tree::Local(s.user_tree(user).await?)),
            Store::Object(s) => Ok(Tree::Object(s.user_tree(user))),
        }
    }

    /// Deletes partial uploads not touched for `ttl` that no upload holds; returns how many.
    /// (Object store: aborts their multipart uploads and deletes their resume records,
    /// whichever node started them.)
    pub async fn sweep_partials(&self, ttl: Duration) -> std::io::Result<usize> {
        match self {
            Store::Local(s) => s.sweep_partials(ttl).await,
            Store::Object(s) => s.sweep_partials(ttl).await.map_err(std::io::Error::other),
        }
    }

    /// Bytes of `user`'s partial uploads that no running upload of this daemon holds: what a
    /// quota adds to the user's files and to the reservations of their uploads in progress
    /// (which count those they hold). Local: kept partials at their size; object store: the
    /// parts every interrupted or running upload has stored (those of this node's running
    /// uploads are then counted twice, which errs on the side of the quota).
    pub async fn resting_partial_usage(&self, user: &str) -> std::io::Result<u64> {
        match self {
            Store::Local(s) => s.resting_partial_usage(user).await,
            Store::Object(s) => s.partial_usage(user).await.map_err(std::io::Error::other),
        }
    }

    /// Bytes `user`'s partial uploads count against their budget now: what a quota adds to
    /// their visible files. Local: kept ones at their size, running ones at their declared
    /// size; object store: the parts each interrupted or running upload has stored.
    pub async fn partial_usage(&self, user: &str) -> std::io::Result<u64> {
        match self {
            Store::Local(s) => s.partial_usage(user).await,
            Store::Object(s) => s.partial_usage(user).await.map_err(std::io::Error::other),
        }
    }
}

/// One user's view of storage: every remote path is checked by `xfer_proto::path` and
/// confined to the user's tree. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Tree {
    /// A folder under the local storage root.
    Local(local::LocalTree),
    /// The keys under `PREFIX/USER/` in the bucket.
    Object(object::ObjectTree),
}

impl Tree {
    /// Lists a folder (or describes a single file), in no particular order, as a stream of
    /// batches: memory stays constant whatever the folder's size. An error (the path does
    /// not exist, is refused, or the walk failed) comes through the stream too, and ends it.
    pub fn list(&self, remote: &str) -> Listing {
        match self {
            Tree::Local(t) => t.list(remote),
            Tree::Object(t) => {
                let (tx, listing) = Listing::channel();
                let mut pages = t.list_pages(remote);
                tokio::spawn(async move {
                    while let Some(page) = pages.next_page().await {
                        let mut entries = match page {
                            Ok(entries) => entries.into_iter(),
                            Err(e) => {
                                let _ = tx.send(Err(e.into())).await;
                                return;
                            }
                        };
                        loop {
                            let batch: Vec<Entry> = entries.by_ref().take(LIST_BATCH).collect();
                            // A reader that went away stops the walk.
                            if batch.is_empty() || tx.send(Ok(batch)).await.is_err() {
                                break;
                            }
                        }
                        if tx.is_closed() {
                            return;
                        }
                    }
                });
                listing
            }
        }
    }

    /// The size of the file at `remote`; `None` when there is none (nothing, or a folder).
    /// What an upload, a delete or a rename changes a quota's count by.
    pub async fn file_size(&self, remote: &str) -> Result<Option<u64>, StorageError> {
        match self {
            Tree::Local(t) => t.file_size(remote).await,
            Tree::Object(t) => match t.stat(remote).await? {
                Some(object::Stat::File { size, .. }) => Ok(Some(size)),
                _ => Ok(None),
            },
        }
    }

    /// [`Tree::file_size`] of each of `remotes` (`None` also where it cannot be looked at):
    /// what a batch's commit replaces. The local backend looks at all of them in one task on
    /// the blocking pool.
    pub async fn file_sizes(&self, remotes: Vec<String>) -> Vec<Option<u64>> {
        match self {
            Tree::Local(t) => t.file_sizes(remotes).await,
            Tree::Object(_) => {
                let mut out = Vec::with_capacity(remotes.len());
                for r in &remotes {
                    out.push(self.file_size(r).await.ok().flatten());
                }
                out
            }
        }
    }

    /// Counts the files in the whole tree and their bytes: the walk that rebuilds a quota's
    /// record. One listing per folder; memory is one folder's batch and the folders still
    /// to visit. A folder that vanishes during the walk is skipped.
    pub async fn scan_usage(&self) -> Result<(u64, u64), StorageError> {
        let (mut bytes, mut files) = (0u64, 0u64);
        let mut folders = vec![String::new()];
        while let Some(dir) = folders.pop() {
            let mut listing = self.list(&dir);
            while let Some(batch) = listing.next().await {
                let batch = match batch {
                    Ok(b) => b,
                    Err(StorageError::NotFound(_)) if !dir.is_empty() => break,
                    Err(e) => return Err(e),
                };
                for e in batch {
                    match e.kind {
                        xfer_proto::EntryKind::File => {
                            bytes = bytes.saturating_add(e.size);
                            files += 1;
                        }
                        xfer_proto::EntryKind::Dir => {
                            folders.push(xfer_proto::path::join(&dir, &e.name))
                        }
                        xfer_proto::EntryKind::Other => {}
                    }
                }
            }
        }
        Ok((bytes, files))
    }

    /// Opens a regular file for reading. With `whole` (the caller wants every byte from 0), a
    /// file of at most [`WHOLE_READ_MAX`] bytes is read at once and a bigger one comes with
    /// its stored digest when the backend kept a valid one.
    pub async fn open_read(&self, remote: &str, whole: bool) -> Result<ReadHandle, StorageError> {
        match self {
            Tree::Local(t) => t.open_read(remote, whole).await,
            Tree::Object(t) => {
                let head = t.head(remote).await?;
                if whole && head.size <= WHOLE_READ_MAX {
                    return read_whole_object(t, &head).await;
                }
                Ok(ReadHandle {
                    size: head.size,
                    modified: head.modified,
                    stored: if whole { head.stored } else { None },
                    body: ReadBody::Object(object::ObjectBody::new(t.clone(), head)),
                })
            }
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
            Tree::Object(t) => {
                let resume = match staging {
                    Staging::Temp => None,
                    // A file of one part is stored in one PUT at the commit: nothing to keep.
                    Staging::Resumable { up_to, ttl, .. } if size <= t.part_size_for(size) => {
                        Some(object::Resume { up_to, ttl })
                    }
                    // The partial budget as the local backend keeps it: the user's other
                    // interrupted uploads, plus this one at its full size.
                    Staging::Resumable {
                        up_to,
                        ttl,
                        max_bytes,
                    } => {
                        let used = t.partial_usage_except(remote).await?;
                        (used.saturating_add(size) <= max_bytes)
                            .then_some(object::Resume { up_to, ttl })
                    }
                };
                let up = t.begin_upload(remote, size, max_bytes, resume).await?;
                Ok(Upload::Object(object::ObjectPending::new(up)))
            }
        }
    }

    /// Makes a verified upload visible under its path, durably, in one step: a reader sees
    /// the old version or the new one, complete. `digest` is the whole file's verified
    /// BLAKE3, kept by the backend where it can (so a whole download need not hash again).
    pub async fn commit(&self, upload: Upload, digest: &Digest) -> Result<(), StorageError> {
        match (self, upload) {
            (Tree::Local(t), Upload::Local(u)) => t.commit(u, digest).await,
            (Tree::Object(t), Upload::Object(u)) => {
                let key = u.key().to_string();
                let Some(up) = u.take().await else {
                    return Err(object::ObjectError::TakenOver(key).into());
                };
                Ok(t.commit(up, digest).await?)
            }
            (_, upload) => {
                upload.discard().await;
                Err(StorageError::mismatched("committing an upload"))
            }
        }
    }

    /// Starts staging a batched upload's verified `data` at `remote` (its missing folders
    /// are created, like `mkdir -p`), invisible until [`Tree::commit_batch`]. Runs in the
    /// background: the caller goes on reading while it runs, and awaits the task for the
    /// outcome. `cache` is what the backend keeps between stagings of one batch.
    pub fn stage(&self, remote: &str, data: Vec<u8>, cache: &StageCache) -> StageTask {
        let task = match self {
            Tree::Local(t) => StageWork::Local(t.stage(remote, data, &cache.local)),
            Tree::Object(t) => {
                let (t, remote) = (t.clone(), remote.to_string());
                StageWork::Object(tokio::spawn(async move {
                    Ok(object::ObjectStaged::stage(&t, &remote, data).await?)
                }))
            }
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
                let mut files = Vec::with_capacity(staged.len());
                for s in staged {
                    match s {
                        Staged::Local(f) => files.push(f),
                        Staged::Object(_) => {
                            return Err(StorageError::mismatched("committing a batch"));
                        }
                    }
                }
                let done = t.commit_batch(files).await?;
                Ok(done
                    .into_iter()
                    .map(|(f, r)| (Staged::Local(f), r))
                    .collect())
            }
            // One PUT per file, in order: each is atomic on its own (old or new, complete).
            Tree::Object(t) => {
                let mut done = Vec::with_capacity(staged.len());
                for s in staged {
                    let r = match &s {
                        Staged::Object(o) => o.commit(t).await.map_err(StorageError::from),
                        Staged::Local(_) => Err(StorageError::mismatched("committing a batch")),
                    };
                    done.push((s, r));
                }
                Ok(done)
            }
        }
    }

    /// Deletes a file or an empty folder.
    pub async fn delete(&self, remote: &str) -> Result<(), StorageError> {
        match self {
            Tree::Local(t) => t.delete(remote).await,
            Tree::Object(t) => Ok(t.delete(remote).await?),
        }
    }

    /// Renames `from` to `to`; if `to` is an existing folder, moves `from` into it. An
    /// existing file at the target is replaced (as `mv` does); a folder never is. A folder is
    /// only moved if every path inside it stays within the path limits afterwards (checked
    /// by looking at up to `max_check` entries). Returns where the entry now is. Atomic on
    /// the local backend; a copy then a delete on an object store (see [`object`]).
    pub async fn rename(
        &self,
        from: &str,
        to: &str,
        max_check: u64,
    ) -> Result<String, StorageError> {
        match self {
            Tree::Local(t) => t.rename(from, to, max_check).await,
            Tree::Object(t) => Ok(t.rename(from, to, max_check).await?),
        }
    }

    /// Creates a folder and any missing parents (like `mkdir -p`); an existing folder is fine.
    pub async fn mkdir(&self, remote: &str) -> Result<(), StorageError> {
        match self {
            Tree::Local(t) => t.mkdir(remote).await,
            Tree::Object(t) => Ok(t.mkdir(remote).await?),
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
    /// An object, read with ranged GETs of the version opened.
    Object(object::ObjectBody),
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
            ReadBody::Object(o) => o.prefix_hasher(len).await,
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
    /// A multipart upload to the final key (or, for one part, held for one PUT).
    Object(object::ObjectPending),
}

impl Upload {
    /// The staged file the body is written into, on the local backend.
    pub fn file(&self) -> Option<&File> {
        match self {
            Upload::Local(u) => Some(u.file()),
            Upload::Object(_) => None,
        }
    }

    /// A blocking writer that appends to the staged data after the held bytes (use it on a
    /// blocking thread only: an object store's writer waits there for parts in flight).
    pub fn writer(&self) -> std::io::Result<UploadWriter> {
        match self {
            Upload::Local(u) => {
                let mut f = u.file().try_clone()?;
                std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(u.held()))?;
                Ok(UploadWriter::Local(f))
            }
            Upload::Object(u) => Ok(UploadWriter::Object(u.writer())),
        }
    }

    /// The canonical remote path (`a//b` and `a/b` are one upload).
    pub fn key(&self) -> &str {
        match self {
            Upload::Local(u) => u.key(),
            Upload::Object(u) => u.key(),
        }
    }

    /// Bytes held from an interrupted attempt, offered for resume (0 for a fresh start).
    pub fn held(&self) -> u64 {
        match self {
            Upload::Local(u) => u.held(),
            Upload::Object(u) => u.held(),
        }
    }

    /// Whether an interruption now would leave data to resume from.
    pub fn resumable(&self) -> bool {
        match self {
            Upload::Local(u) => u.resumable(),
            Upload::Object(u) => u.resumable(),
        }
    }

    /// Whether it is staged apart because another upload of the same path holds the partial
    /// (not because resume is off or the partial budget is full).
    pub fn held_elsewhere(&self) -> bool {
        match self {
            Upload::Local(u) => u.held_elsewhere(),
            Upload::Object(u) => u.held_elsewhere(),
        }
    }

    /// The resume offer for the held bytes: their BLAKE3, and a hasher that has absorbed
    /// them when the body's hashing must go on from it. The local backend hashes the partial
    /// (slow for a big one: run it in a hashing slot) and hands the hasher on to
    /// [`Upload::sink`]; an object upload rebuilds the digest from its parts' chaining
    /// values, reading nothing, and needs no hasher (it hashes its parts itself).
    pub async fn resume_offer(&self) -> std::io::Result<(Digest, Option<blake3::Hasher>)> {
        match self {
            Upload::Local(u) => {
                let h = u.prefix_hasher().await?;
                Ok((*h.finalize().as_bytes(), Some(h)))
            }
            Upload::Object(u) => match u.held_digest() {
                Some(d) => Ok((d, None)),
                None if u.held() == 0 => Ok((*blake3::hash(b"").as_bytes(), None)),
                None => Err(std::io::Error::other("the held parts' hashes do not fit")),
            },
        }
    }

    /// BLAKE3 of the held bytes (see [`Upload::resume_offer`]).
    pub async fn held_digest(&self) -> std::io::Result<Digest> {
        Ok(self.resume_offer().await?.0)
    }

    /// Drops what an earlier attempt left, to start from byte 0. On failure the upload must
    /// not go on: old bytes past the new body's end would remain.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        match self {
            Upload::Local(u) => u.restart().await,
            Upload::Object(u) => u.restart().await.map_err(std::io::Error::other),
        }
    }

    /// Deletes the staged data (bad digest, failed write, ended session): nothing to resume
    /// from. Done when this returns.
    pub async fn discard(self) {
        match self {
            Upload::Local(u) => u.discard().await,
            Upload::Object(u) => u.discard().await,
        }
    }

    /// Stops it as a broken connection would: what can be resumed is kept (an object
    /// upload's claim on its record is released, so any node may resume it at once), the
    /// rest deleted. Done when this returns.
    pub async fn interrupt(self) {
        match self {
            Upload::Local(u) => drop(u),
            Upload::Object(u) => u.interrupt().await,
        }
    }
}

/// The blocking writer of an upload's body (see [`Upload::writer`]).
#[derive(Debug)]
pub enum UploadWriter {
    /// The staged file, at the end of the held bytes.
    Local(File),
    /// Parts cut and sent as they fill.
    Object(object::ObjectWriter),
}

impl std::io::Write for UploadWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            UploadWriter::Local(f) => f.write(buf),
            UploadWriter::Object(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            UploadWriter::Local(f) => f.flush(),
            UploadWriter::Object(w) => w.flush(),
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
    /// Held in memory until its PUT.
    Object(object::ObjectStaged),
}

impl Staged {
    /// The remote path as the client gave it.
    pub fn remote(&self) -> &str {
        match self {
            Staged::Local(f) => f.remote(),
            Staged::Object(f) => f.remote(),
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
    /// Checks and folders on the object store, as a task.
    Object(JoinHandle<Result<object::ObjectStaged, StorageError>>),
}

impl StageTask {
    /// Whether the staging has ended (awaiting it then returns at once).
    pub fn is_finished(&self) -> bool {
        match &self.task {
            StageWork::Local(h) => h.is_finished(),
            StageWork::Object(h) => h.is_finished(),
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
            StageWork::Object(h) => Pin::new(h).poll(cx).map(|r| match r {
                Ok(staged) => staged.map(Staged::Object),
                Err(e) => Err(failed(e, &this.remote)),
            }),
        }
    }
}

/// Reads a small object whole, as [`Tree::open_read`] hands it over: [`WHOLE_READ_ROOM`] free
/// bytes, then the data, with room after it, and the data's BLAKE3.
async fn read_whole_object(
    t: &object::ObjectTree,
    head: &object::ObjectHead,
) -> Result<ReadHandle, StorageError> {
    use futures::StreamExt;
    let mut stream = t.read(head, 0, None).await?.into_stream();
    // `head.size` is at most WHOLE_READ_MAX, so this is bounded.
    let mut buf = Vec::with_capacity(head.size as usize + 2 * WHOLE_READ_ROOM);
    buf.resize(WHOLE_READ_ROOM, 0);
    while let Some(piece) = stream.next().await {
        let piece = piece?;
        if (buf.len() - WHOLE_READ_ROOM + piece.len()) as u64 > head.size {
            break;
        }
        buf.extend_from_slice(&piece);
    }
    if (buf.len() - WHOLE_READ_ROOM) as u64 != head.size {
        return Err(object::ObjectError::SizeMismatch {
            path: head.remote().into(),
            declared: head.size,
            got: (buf.len() - WHOLE_READ_ROOM) as u64,
        }
        .into());
    }
    let digest = *blake3::hash(&buf[WHOLE_READ_ROOM..]).as_bytes();
    Ok(ReadHandle {
        size: head.size,
        modified: head.modified,
        stored: None,
        body: ReadBody::Whole { buf, digest },
    })
}
