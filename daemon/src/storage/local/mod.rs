//! The local backend: users' trees in folders under the storage root, and every filesystem
//! operation on them, all through one resolver.
//!
//! `TreeFs::resolve` is the only way from a remote path to a local one: it accepts only
//! normal components (via `xfer_proto::path`) and every operation then goes through
//! [`crate::beneath::Beneath`], which resolves them in the kernel beneath the user's folder
//! without following any symlink (openat2 `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), so a link
//! planted inside a tree cannot lead any operation outside it, not even by a race. Uploads
//! land in a partial file under `ROOT/.xfer-partial/USER` (kept for resume, see
//! [`partial`]) or a temp file under `ROOT/.xfer-tmp` (same filesystem), and become
//! visible only by rename after verification and fsync.
//!
//! The seam is async; this backend's work is blocking system calls, so [`LocalStore`] and
//! [`LocalTree`] are thin handles that run it on the blocking pool (a slow disk then holds a
//! blocking thread, never a runtime worker), and `TreeFs` does it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

pub mod digest_store;
pub mod partial;

use tokio::task::JoinHandle;
use xfer_proto::body::hash_prefix;

use self::partial::{Opened, PartialBudget, PartialDir, Reservation};
use super::{
    LIST_BATCH, Listing, ReadBody, ReadHandle, Staging, StorageError, WHOLE_READ_MAX,
    WHOLE_READ_ROOM,
};
use crate::beneath::{Beneath, Kind, Meta, Reach};

use xfer_proto::Digest;
use xfer_proto::limits::{MAX_PATH_DEPTH, MAX_PATH_LEN};
use xfer_proto::path::{PathError, named_components};
use xfer_proto::{Entry, EntryKind};

/// Most folders a batched upload keeps open while it stages files into them.
pub const MAX_OPEN_STAGING_DIRS: usize = 64;

/// Folder under the storage root that holds uploads in progress. User names cannot start
/// with `.`, so it never collides with a user's tree.
pub const TMP_DIR: &str = ".xfer-tmp";

/// The storage root shared by all users.
#[derive(Debug, Clone)]
pub struct LocalStore {
    /// The configured root.
    root: PathBuf,
    /// `root/.xfer-tmp`, where uploads that cannot resume are written before their commit.
    tmp: PathBuf,
    /// The temp folder, open: batched uploads link and rename through it.
    tmp_dir: Arc<File>,
    /// Bytes reserved by running resumable uploads, for every user's partial budget.
    partials: Arc<PartialBudget>,
    /// One lock per user that renames take, so two moves cannot each pass the depth check
    /// and together build a tree past it.
    renames: Arc<Mutex<HashMap<String, Arc<Mutex<()>>>>>,
}

impl LocalStore {
    /// Creates the root and temp folder if needed and removes temp files left by uploads that
    /// were interrupted by a crash (they were never visible, so nothing is lost).
    pub fn open(root: &Path) -> std::io::Result<LocalStore> {
        crate::fsutil::create_dir_with_mode(root, 0o700)?;
        let tmp = root.join(TMP_DIR);
        crate::fsutil::create_dir_with_mode(&tmp, 0o700)?;
        crate::fsutil::create_dir_with_mode(&root.join(partial::PARTIAL_DIR), 0o700)?;
        let mut removed = 0;
        for entry in std::fs::read_dir(&tmp)? {
            let entry = entry?;
            if entry.file_type()?.is_file() && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(
                removed,
                "removed temp files of uploads interrupted by an earlier stop"
            );
        }
        Ok(LocalStore {
            root: root.to_path_buf(),
            tmp_dir: Arc::new(File::open(&tmp)?),
            tmp,
            partials: Default::default(),
            renames: Default::default(),
        })
    }

    /// Deletes partial uploads not touched for `ttl`; returns how many.
    pub async fn sweep_partials(&self, ttl: Duration) -> std::io::Result<usize> {
        let root = self.root.clone();
        io_blocking(move || partial::sweep(&root, ttl)).await
    }

    /// A user's tree, created on first use.
    pub async fn user_tree(&self, user: &str) -> std::io::Result<LocalTree> {
        let (store, user) = (self.clone(), user.to_string());
        io_blocking(move || store.open_tree(&user)).await
    }

    fn open_tree(&self, user: &str) -> std::io::Result<LocalTree> {
        let dir = self.root.join(user);
        if std::fs::symlink_metadata(&dir).is_err() {
            crate::fsutil::create_dir_with_mode(&dir, 0o700)?;
        }
        if std::fs::symlink_metadata(&dir)?.file_type().is_symlink() {
            return Err(std::io::Error::other("user folder is a symlink"));
        }
        let root = Beneath::open(&dir)?;
        let rename_lock = self
            .renames
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(user.to_string())
            .or_default()
            .clone();
        Ok(LocalTree {
            fs: Arc::new(TreeFs {
                dir,
                root,
                tmp: self.tmp.clone(),
                tmp_dir: self.tmp_dir.clone(),
                partials: PartialDir::new(&self.root, user, self.partials.clone()),
                rename_lock,
            }),
        })
    }

    /// Bytes of `user`'s kept partials that no running upload of this daemon holds (see
    /// [`PartialDir::resting_usage`]).
    pub async fn resting_partial_usage(&self, user: &str) -> std::io::Result<u64> {
        let partials = PartialDir::new(&self.root, user, self.partials.clone());
        io_blocking(move || partials.resting_usage()).await
    }

    /// Bytes `user`'s partial uploads count against their budget now (see
    /// [`PartialDir::usage`]): what a quota adds to the user's visible files.
    pub async fn partial_usage(&self, user: &str) -> std::io::Result<u64> {
        let partials = PartialDir::new(&self.root, user, self.partials.clone());
        io_blocking(move || partials.usage()).await
    }
}

/// Runs filesystem work on the blocking pool, so that a slow disk holds a blocking thread,
/// never a runtime worker (and the connections it serves).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(StorageError::Io {
            op: "running",
            path: String::new(),
            source: std::io::Error::other(e.to_string()),
        })
    })
}

/// [`blocking`] for work that fails with a plain I/O error.
async fn io_blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
}

/// One user's tree on the local filesystem: a cheap handle whose operations run on the
/// blocking pool (see `TreeFs` for what they do).
#[derive(Debug, Clone)]
pub struct LocalTree {
    /// The tree's folders and the work on them.
    fs: Arc<TreeFs>,
}

/// One user's view of the filesystem, and every blocking operation on it: every path they
/// give is resolved beneath their folder.
#[derive(Debug)]
struct TreeFs {
    /// The user's folder, as a path (for debugging and tests only; never joined with input).
    #[cfg_attr(not(test), allow(dead_code))]
    dir: PathBuf,
    /// The user's folder, open: all access goes through it.
    root: Beneath,
    /// Where uploads that cannot resume are staged.
    tmp: PathBuf,
    /// The same folder, open.
    tmp_dir: Arc<File>,
    /// Where uploads that can resume are staged.
    partials: PartialDir,
    /// Held by a rename from its check to its end (shared by all of the user's trees).
    rename_lock: Arc<Mutex<()>>,
}

/// A remote path resolved beneath the user's folder.
#[derive(Debug)]
struct Resolved {
    /// The checked components.
    parts: Vec<String>,
    /// Its metadata (not following links), if it exists.
    meta: Option<Meta>,
}

impl Resolved {
    fn split(&self) -> (Vec<&str>, &str) {
        let parts: Vec<&str> = self.parts.iter().map(String::as_str).collect();
        let (last, parent) = parts
            .split_last()
            .map(|(l, p)| (*l, p.to_vec()))
            .unwrap_or(("", Vec::new()));
        (parent, last)
    }

    fn all(&self) -> Vec<&str> {
        self.parts.iter().map(String::as_str).collect()
    }
}

/// An upload in progress: staged data that becomes the target only through
/// [`LocalTree::commit`]. Dropping it (a broken connection, an abort, a shutdown) keeps a
/// resumable partial for the next attempt and deletes a plain temp file;
/// [`PendingUpload::discard`] deletes either.
#[derive(Debug)]
pub struct PendingUpload {
    /// The staged data, positioned anywhere (bodies seek).
    file: File,
    /// The folder holding it.
    dir: PathBuf,
    /// Its name in that folder.
    name: String,
    /// The remote path, for messages and the commit.
    remote: String,
    /// The canonical remote path (`a/b`), which names its partial.
    key: String,
    /// Bytes already staged by an interrupted attempt, offered for resume.
    held: u64,
    /// Kept on drop (a resumable partial) or deleted (a temp file, or discarded).
    keep: bool,
    /// Renamed into place: nothing left to clean up.
    committed: bool,
    /// Staged in a temp file because another upload of the same path holds its partial.
    held_elsewhere: bool,
    /// A resumable upload's share of the user's partial budget, given back when it ends.
    _reservation: Option<Reservation>,
}

impl PendingUpload {
    /// The staged file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The canonical remote path (`a//b` and `a/b` are one upload).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Bytes held from an interrupted attempt (0 for a fresh start).
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Whether an interruption now would leave data to resume from.
    pub fn resumable(&self) -> bool {
        self.keep
    }

    /// Whether it is staged apart because another upload of the same path holds the partial
    /// (not because resume is off or the partial budget is full).
    pub fn held_elsewhere(&self) -> bool {
        self.held_elsewhere
    }

    /// Drops what an earlier attempt left, to start from byte 0 (on the blocking pool:
    /// freeing a big partial's blocks takes a while).
    pub async fn restart(&mut self) -> std::io::Result<()> {
        let file = self.file.try_clone()?;
        io_blocking(move || file.set_len(0)).await?;
        self.held = 0;
        Ok(())
    }

    fn restart_blocking(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.held = 0;
        Ok(())
    }

    /// Deletes the staged data now (bad digest, failed write): nothing to resume from.
    /// Done when this returns, so an answer sent after it that says "nothing was saved" is
    /// already true.
    pub async fn discard(mut self) {
        self.keep = false;
        // The unlink runs on the blocking pool: a big file's blocks are freed there.
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
    }

    /// BLAKE3 of the bytes held from an interrupted attempt, as a hasher that can go on with
    /// the rest (see [`hash_prefix`]): what the resume offer says and the body continues.
    pub async fn prefix_hasher(&self) -> std::io::Result<blake3::Hasher> {
        hash_prefix(&self.file, self.held).await
    }
}

impl Drop for PendingUpload {
    fn drop(&mut self) {
        if !self.committed && !self.keep {
            let _ = std::fs::remove_file(self.dir.join(&self.name));
        }
    }
}

/// A file staged by a batched upload (`Put`): its data in a temp file, invisible until
/// [`LocalTree::commit_batch`]; dropped uncommitted, the data is deleted.
#[derive(Debug)]
pub struct StagedFile {
    /// The temp folder holding it.
    tmp: PathBuf,
    /// Its name there.
    name: String,
    /// The target's checked components.
    parts: Vec<String>,
    /// The remote path as the client gave it, for messages and the audit trail.
    remote: String,
    /// Renamed into place: nothing left to delete.
    committed: bool,
}

impl StagedFile {
    /// The remote path as the client gave it.
    pub fn remote(&self) -> &str {
        &self.remote
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(self.tmp.join(&self.name));
        }
    }
}

/// The folders a batch has made sure of, open, by canonical path (see `TreeFs::stage`).
pub type OpenDirs = HashMap<String, OwnedFd>;

impl LocalTree {
    /// The user's folder (for tests that look at what is on disk).
    #[cfg(test)]
    pub(crate) fn dir(&self) -> &Path {
        &self.fs.dir
    }

    /// See [`crate::storage::Tree::list`]: the walk runs on a blocking thread and hands over
    /// batches as they fill.
    pub fn list(&self, remote: &str) -> Listing {
        let (tx, listing) = Listing::channel();
        let (fs, remote) = (self.fs.clone(), remote.to_string());
        tokio::task::spawn_blocking(move || {
            let mut batch = Vec::with_capacity(LIST_BATCH);
            let walked = fs.list_each(&remote, |e| {
                batch.push(e);
                batch.len() < LIST_BATCH || tx.blocking_send(Ok(std::mem::take(&mut batch))).is_ok()
            });
            // The reader may be gone: nothing to tell it then.
            let _ = match walked {
                Ok(()) if batch.is_empty() => Ok(()),
                Ok(()) => tx.blocking_send(Ok(batch)),
                Err(e) => tx.blocking_send(Err(e)),
            };
        });
        listing
    }

    /// See [`crate::storage::Tree::open_read`].
    pub async fn open_read(&self, remote: &str, whole: bool) -> Result<ReadHandle, StorageError> {
        let (fs, remote) = (self.fs.clone(), remote.to_string());
        blocking(move || fs.open_read(&remote, whole)).await
    }

    /// See [`crate::storage::Tree::file_size`].
    pub async fn file_size(&self, remote: &str) -> Result<Option<u64>, StorageError> {
        let (fs, remote) = (self.fs.clone(), remote.to_string());
        blocking(move || {
            let meta = match fs.resolve(&remote, true) {
                Ok(r) => r.meta,
                Err(StorageError::NotFound(_)) => None,
                Err(e) => return Err(e),
            };
            Ok(meta.filter(|m| m.kind == Kind::File).map(|m| m.size))
        })
        .await
    }

    /// See [`crate::storage::Tree::file_sizes`].
    pub async fn file_sizes(&self, remotes: Vec<String>) -> Vec<Option<u64>> {
        let fs = self.fs.clone();
        let n = remotes.len();
        tokio::task::spawn_blocking(move || {
            remotes
                .iter()
                .map(|r| {
                    let meta = fs.resolve(r, true).ok()?.meta?;
                    (meta.kind == Kind::File).then_some(meta.size)
                })
                .collect()
        })
        .await
        .unwrap_or_else(|_| vec![None; n])
    }

    /// See [`crate::storage::Tree::begin_upload`].
    pub async fn begin_upload(
        &self,
        remote: &str,
        size: u64,
        max_bytes: u64,
        staging: Staging,
    ) -> Result<PendingUpload, StorageError> {
        let (fs, remote) = (self.fs.clone(), remote.to_string());
        blocking(move || fs.begin_upload(&remote, size, max_bytes, staging)).await
    }

    /// See [`crate::storage::Tree::commit`] and `TreeFs::commit`.
    pub async fn commit(&self, upload: PendingUpload, digest: &Digest) -> Result<(), StorageError> {
        let (fs, digest) = (self.fs.clone(), *digest);
        blocking(move || fs.commit(upload, &digest)).await
    }

    /// Starts `TreeFs::stage` on the blocking pool.
    pub fn stage(
        &self,
        remote: &str,
        data: Vec<u8>,
        dirs: &Arc<Mutex<OpenDirs>>,
    ) -> JoinHandle<Result<StagedFile, StorageError>> {
        let (fs, remote, dirs) = (self.fs.clone(), remote.to_string(), dirs.clone());
        tokio::task::spawn_blocking(move || {
            let mut dirs = dirs.lock().unwrap_or_else(|e| e.into_inner());
            fs.stage(&remote, &data, &mut dirs)
        })
    }

    /// See [`crate::storage::Tree::commit_batch`] and `TreeFs::commit_batch`.
    pub async fn commit_batch(
        &self,
        files: Vec<StagedFile>,
    ) -> Result<Vec<(StagedFile, Result<(), StorageError>)>, StorageError> {
        let fs = self.fs.clone();
        blocking(move || Ok(fs.commit_batch(files))).await
    }

    /// See [`crate::storage::Tree::delete`].
    pub async fn delete(&self, remote: &str) -> Result<(), StorageError> {
        let (fs, remote) = (self.fs.clone(), remote.to_string());
        blocking(move || fs.delete(&remote)).await
    }

    /// See [`crate::storage::Tree::rename`].
    pub async fn rename(
        &self,
        from: &str,
        to: &str,
        max_check: u64,
    ) -> Result<String, StorageError> {
        let (fs, from, to) = (self.fs.clone(), from.to_string(), to.to_string());
        blocking(move || fs.rename(&from, &to, max_check)).await
    }

    /// See [`crate::storage::Tree::mkdir`].
    pub async fn mkdir(&self, remote: &str) -> Result<(), StorageError> {
        let (fs, remote) = (self.fs.clone(), remote.to_string());
        blocking(move || fs.mkdir(&remote)).await
    }
}

fn entry_of(name: String, meta: &Meta) -> Entry {
    let kind = match meta.kind {
        Kind::File => EntryKind::File,
        Kind::Dir => EntryKind::Dir,
        Kind::Symlink | Kind::Other => EntryKind::Other,
    };
    Entry {
        name,
        kind,
        size: if kind == EntryKind::File {
            meta.size
        } else {
            0
        },
        modified: meta.modified,
    }
}

impl TreeFs {
    fn fail(&self, op: &'static str, remote: &str, e: std::io::Error) -> StorageError {
        if crate::beneath::is_symlink_refusal(&e) {
            StorageError::Symlink(remote.into())
        } else {
            StorageError::io(op, remote, e)
        }
    }

    /// Resolves `remote` beneath the user's folder: only normal components, and no symlink
    /// anywhere, including the last component.
    fn resolve(&self, remote: &str, need_name: bool) -> Result<Resolved, StorageError> {
        let parts = super::checked_parts(remote, need_name)?;
        let meta = match self.root.stat(&parts) {
            Ok(m) => m,
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOENT.raw_os_error()) => {
                return Err(StorageError::NotFound(
                    parts[..parts.len().saturating_sub(1)].join("/"),
                ));
            }
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error()) => {
                // A parent is not a folder: say whether it is a link (refused) or a file.
                for depth in 1..parts.len() {
                    if let Ok(Some(m)) = self.root.stat(&parts[..depth]) {
                        if m.kind == Kind::Symlink {
                            return Err(StorageError::Symlink(remote.into()));
                        }
                        if m.kind != Kind::Dir {
                            return Err(StorageError::WrongKind(
                                parts[..depth].join("/"),
                                "not a folder",
                            ));
                        }
                    }
                }
                return Err(StorageError::WrongKind(
                    remote.into(),
                    "not inside a folder",
                ));
            }
            Err(e) => return Err(self.fail("resolving", remote, e)),
        };
        if meta.is_some_and(|m| m.kind == Kind::Symlink) {
            return Err(StorageError::Symlink(remote.into()));
        }
        Ok(Resolved {
            parts: parts.into_iter().map(String::from).collect(),
            meta,
        })
    }

    /// Hands each entry of a folder (or the one entry of a file) to `f`, in directory order;
    /// `f` returns false to stop early. Memory stays constant whatever the folder's size.
    fn list_each(
        &self,
        remote: &str,
        mut f: impl FnMut(Entry) -> bool,
    ) -> Result<(), StorageError> {
        let r = self.resolve(remote, false)?;
        let meta = r
            .meta
            .ok_or_else(|| StorageError::NotFound(remote.into()))?;
        if meta.kind != Kind::Dir {
            let name = r.parts.last().cloned().unwrap_or_default();
            f(entry_of(name, &meta));
            return Ok(());
        }
        self.root
            .read_dir_each(&r.all(), |name, meta| {
                f(entry_of(String::from_utf8_lossy(&name).into_owned(), &meta))
            })
            .map_err(|e| self.fail("listing", remote, e))
    }

    /// Opens a regular file for download: the file, its size and modification time.
    fn open_for_download(&self, remote: &str) -> Result<(File, u64, i64), StorageError> {
        let r = self.resolve(remote, true)?;
        let meta = r
            .meta
            .ok_or_else(|| StorageError::NotFound(remote.into()))?;
        match meta.kind {
            Kind::Dir => return Err(StorageError::WrongKind(remote.into(), "a folder")),
            Kind::File => {}
            _ => return Err(StorageError::WrongKind(remote.into(), "not a regular file")),
        }
        let file = self
            .root
            .open_file(&r.all())
            .map_err(|e| self.fail("opening", remote, e))?;
        let meta = file
            .metadata()
            .map_err(|e| StorageError::io("opening", remote, e))?;
        if !meta.is_file() {
            return Err(StorageError::WrongKind(remote.into(), "not a regular file"));
        }
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        Ok((file, meta.len(), modified))
    }

    /// Opens `remote` for reading; when the whole file is wanted, reads a small one at once
    /// (with its digest) or finds a big one's stored digest (see [`digest_store`]).
    fn open_read(&self, remote: &str, whole: bool) -> Result<ReadHandle, StorageError> {
        let (mut file, size, modified) = self.open_for_download(remote)?;
        if !whole || size > WHOLE_READ_MAX {
            let stored = if whole && size >= digest_store::MIN_SIZE {
                digest_store::stored(&file)
            } else {
                None
            };
            return Ok(ReadHandle {
                size,
                modified,
                stored,
                body: ReadBody::File(file),
            });
        }
        let mut buf = Vec::with_capacity(WHOLE_READ_ROOM + size as usize + WHOLE_READ_ROOM);
        buf.resize(WHOLE_READ_ROOM + size as usize, 0);
        // Shorter than its size a moment ago: refused before anything is promised.
        file.read_exact(&mut buf[WHOLE_READ_ROOM..])
            .map_err(|e| StorageError::io("reading", remote, e))?;
        let digest = *blake3::hash(&buf[WHOLE_READ_ROOM..]).as_bytes();
        Ok(ReadHandle {
            size,
            modified,
            stored: None,
            body: ReadBody::Whole { buf, digest },
        })
    }

    /// Prepares an upload of `size` bytes to `remote`: the parent folder must exist, the
    /// target must not be a folder, and the disk must have room.
    fn begin_upload(
        &self,
        remote: &str,
        size: u64,
        max_bytes: u64,
        staging: Staging,
    ) -> Result<PendingUpload, StorageError> {
        if max_bytes > 0 && size > max_bytes {
            return Err(StorageError::TooLarge(max_bytes));
        }
        let r = self.resolve(remote, true)?;
        if let Some(m) = &r.meta
            && m.kind != Kind::File
        {
            return Err(StorageError::WrongKind(remote.into(), "a folder"));
        }
        // Keyed by the canonical path, so `a//b` and `a/b` share one partial.
        let key = r.parts.join("/");
        let (partial, held_elsewhere) = match staging {
            Staging::Resumable {
                up_to,
                ttl,
                max_bytes,
            } => match self
                .partials
                .open(&key, ttl, size, max_bytes)
                .map_err(|e| StorageError::io("staging", remote, e))?
            {
                Opened::Partial(p) => (Some((p, up_to)), false),
                Opened::Held => (None, true),
                Opened::OverBudget => {
                    tracing::info!(path = %remote, size, max_bytes, "partial-upload budget full; this upload is not resumable");
                    (None, false)
                }
            },
            Staging::Temp => (None, false),
        };
        let pending = match partial {
            Some((p, up_to)) => {
                let mut up = PendingUpload {
                    file: p.file,
                    dir: p.dir,
                    name: p.name,
                    remote: remote.into(),
                    key,
                    held: p.held,
                    keep: true,
                    committed: false,
                    held_elsewhere: false,
                    _reservation: Some(p.reservation),
                };
                if up.held > up_to.min(size) {
                    up.restart_blocking()
                        .map_err(|e| StorageError::io("staging", remote, e))?;
                }
                up
            }
            // Resume is off, the budget is full, or another upload of this path holds its
            // partial.
            None => {
                let (file, path) = tempfile::Builder::new()
                    .prefix("upload-")
                    .tempfile_in(&self.tmp)
                    .map_err(|e| StorageError::io("creating a temp file for", remote, e))?
                    .into_parts();
                let path = path
                    .keep()
                    .map_err(|e| StorageError::io("staging", remote, e.error))?;
                PendingUpload {
                    file,
                    dir: self.tmp.clone(),
                    name: path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or_default()
                        .to_string(),
                    remote: remote.into(),
                    key,
                    held: 0,
                    keep: false,
                    committed: false,
                    held_elsewhere,
                    _reservation: None,
                }
            }
        };
        if let Ok(st) = rustix::fs::statvfs(&self.tmp) {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            if size - pending.held > free {
                // Dropping a partial keeps it: the space it holds is not what is missing.
                return Err(StorageError::NoSpace);
            }
        }
        Ok(pending)
    }

    /// Makes a verified upload visible: record its `digest` on a big file (see
    /// [`digest_store`]), fsync the data, re-check the target, rename over it (from the
    /// temp folder into the user's tree, by directory handles), fsync the folder. Until the
    /// rename the old version is untouched.
    fn commit(&self, mut upload: PendingUpload, digest: &Digest) -> Result<(), StorageError> {
        let remote = upload.remote.clone();
        // Before the fsync, so the record is as durable as the data it describes.
        digest_store::record(&upload.file, digest);
        upload
            .file
            .sync_all()
            .map_err(|e| StorageError::io("syncing", &remote, e))?;
        // The tree may have changed during the transfer (a folder or link put in the way).
        let r = self.resolve(&remote, true)?;
        if let Some(m) = &r.meta
            && m.kind != Kind::File
        {
            return Err(StorageError::WrongKind(remote, "a folder"));
        }
        let staged_dir = std::fs::File::open(&upload.dir)
            .map_err(|e| StorageError::io("committing", &remote, e))?;
        let (parent, name) = r.split();
        self.root
            .rename_into(&staged_dir, &upload.name, &parent, name)
            .map_err(|e| self.fail("committing", &remote, e))?;
        upload.committed = true;
        Ok(())
    }

    /// Stages a batched upload (`Put`): creates the missing folders of `remote` (like
    /// `mkdir -p`), refuses a folder or link at the target, and writes `data` to a new
    /// staged file, invisible and not yet synced. `dirs` keeps the folders this batch has
    /// made sure of, open, so a tree upload resolves each folder once (it is cleared when
    /// it holds [`MAX_OPEN_STAGING_DIRS`]). `TreeFs::commit_batch` makes the file
    /// visible, resolving its folder again by path.
    fn stage(
        &self,
        remote: &str,
        data: &[u8],
        dirs: &mut OpenDirs,
    ) -> Result<StagedFile, StorageError> {
        let parts = named_components(remote).map_err(|source| StorageError::BadPath {
            path: remote.into(),
            source,
        })?;
        let (name, parent_parts) = parts.split_last().ok_or_else(|| StorageError::BadPath {
            path: remote.into(),
            source: PathError::Empty,
        })?;
        let parent = parent_parts.join("/");
        if !dirs.contains_key(&parent) {
            if !parent.is_empty() {
                self.mkdir(&parent)?;
            }
            let fd = self
                .root
                .open_dir(parent_parts)
                .map_err(|e| self.fail("opening", &parent, e))?;
            if dirs.len() >= MAX_OPEN_STAGING_DIRS {
                dirs.clear();
            }
            dirs.insert(parent.clone(), fd);
        }
        let dir = &dirs[&parent];
        match rustix::fs::statat(dir, *name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(self.fail("resolving", remote, e.into())),
            Ok(st) => match Meta::from(&st).kind {
                Kind::File => {}
                Kind::Symlink => return Err(StorageError::Symlink(remote.into())),
                _ => return Err(StorageError::WrongKind(remote.into(), "a folder")),
            },
        }
        let (file, staged_name) = match self.create_staged(dir) {
            Ok(x) => x,
            Err(e) => {
                // The folder may have been deleted since it was opened: resolve it anew next
                // time.
                dirs.remove(&parent);
                return Err(self.fail("creating a temp file for", remote, e));
            }
        };
        let staged = StagedFile {
            tmp: self.tmp.clone(),
            name: staged_name,
            parts: parts.iter().map(|p| p.to_string()).collect(),
            remote: remote.into(),
            committed: false,
        };
        use std::io::Write;
        (&file)
            .write_all(data)
            .map_err(|e| StorageError::io("writing", remote, e))?;
        Ok(staged)
    }

    /// Creates a staged file for a target in the folder `dir`, named in the temp folder;
    /// returns it open for writing and its name there.
    ///
    /// Its inode is allocated in the target's folder (`O_TMPFILE`, then linked into the temp
    /// folder by name), not in the temp folder: ext4 without a journal skips inodes freed in
    /// the last minute when it allocates, scanning the group's bitmap from its start, and a
    /// temp folder that took every upload's inode made each create scan past every file
    /// deleted lately (measured: 45% of the daemon's CPU in `recently_deleted` during a
    /// batch of 1,000 files). Where `O_TMPFILE` or `/proc` is missing, a plain temp file.
    fn create_staged(&self, dir: &OwnedFd) -> std::io::Result<(File, String)> {
        use std::os::fd::AsRawFd;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmpfile = rustix::fs::openat(
            dir,
            ".",
            rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o600),
        );
        if let Ok(fd) = tmpfile {
            let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
            for _ in 0..16 {
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let name = format!("put-{}-{n}", std::process::id());
                match rustix::fs::linkat(
                    rustix::fs::CWD,
                    proc_path.as_str(),
                    &*self.tmp_dir,
                    name.as_str(),
                    rustix::fs::AtFlags::SYMLINK_FOLLOW,
                ) {
                    Ok(()) => return Ok((File::from(fd), name)),
                    // Left by an earlier daemon with the same process id.
                    Err(rustix::io::Errno::EXIST) => continue,
                    Err(_) => break,
                }
            }
        }
        let (file, path) = tempfile::Builder::new()
            .prefix("put-")
            .tempfile_in(&self.tmp)?
            .into_parts();
        let path = path.keep().map_err(|e| e.error)?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        Ok((file, name))
    }

    /// Commits staged files, in order: one `syncfs` makes their data (and the folders
    /// `stage` created) durable, then each is renamed over its target, then a second
    /// `syncfs` makes the renames durable. Nothing becomes visible before its data is on
    /// disk, so a crash leaves each target old or new and complete. Returns each file's
    /// outcome; a file whose rename fails stays invisible and is deleted.
    ///
    /// Why `syncfs` and not an fsync per file and folder: each fsync waits for a device flush
    /// of its own (and on a journalled ext4, a commit of its own). For 1,000 files of 4 KiB
    /// on the bench VM, `fdatasync` one after another took 0.28-1.4 s, from 8 threads
    /// 0.12 s, one `syncfs` 25-63 ms (measured for the client's group commit, which makes
    /// the same choice; docs/PERFORMANCE.md). It also flushes other dirty data of the same
    /// filesystem, which a dedicated storage filesystem keeps small.
    fn commit_batch(&self, files: Vec<StagedFile>) -> Vec<(StagedFile, Result<(), StorageError>)> {
        let tmp_dir = &*self.tmp_dir;
        if let Err(e) = rustix::fs::syncfs(tmp_dir) {
            tracing::error!(error = %e, "cannot sync staged uploads");
            return files
                .into_iter()
                .map(|f| {
                    let err = StorageError::io("syncing", &f.remote, e.into());
                    (f, Err(err))
                })
                .collect();
        }
        let mut parents: HashMap<Vec<String>, std::io::Result<std::os::fd::OwnedFd>> =
            HashMap::new();
        let mut out = Vec::with_capacity(files.len());
        for mut f in files {
            let (parent, name) = f.parts.split_at(f.parts.len() - 1);
            let dir = parents.entry(parent.to_vec()).or_insert_with(|| {
                let p: Vec<&str> = parent.iter().map(String::as_str).collect();
                self.root.open_dir(&p)
            });
            let r = match dir {
                Ok(dir) => rustix::fs::renameat(tmp_dir, f.name.as_str(), &*dir, name[0].as_str())
                    .map_err(|e| self.fail("committing", &f.remote, e.into())),
                Err(e) => Err(self.fail(
                    "committing",
                    &f.remote,
                    std::io::Error::new(e.kind(), e.to_string()),
                )),
            };
            if r.is_ok() {
                f.committed = true;
            }
            out.push((f, r));
        }
        if let Err(e) = rustix::fs::syncfs(tmp_dir) {
            tracing::error!(error = %e, "cannot sync committed uploads");
            for (f, r) in &mut out {
                if r.is_ok() {
                    *r = Err(StorageError::io("syncing", &f.remote, e.into()));
                }
            }
        }
        out
    }

    /// Deletes a file or an empty folder.
    fn delete(&self, remote: &str) -> Result<(), StorageError> {
        let r = self.resolve(remote, true)?;
        let meta = r
            .meta
            .ok_or_else(|| StorageError::NotFound(remote.into()))?;
        let (parent, name) = r.split();
        self.root
            .remove(&parent, name, meta.kind == Kind::Dir)
            .map_err(|e| self.fail("deleting", remote, e))?;
        self.root
            .sync_dir(&parent)
            .map_err(|e| self.fail("syncing the folder of", remote, e))
    }

    /// Renames `from` to `to`; if `to` is an existing folder, moves `from` into it. An
    /// existing file at the target is replaced (as `mv` does); a folder never is. A folder is
    /// only moved if every path inside it stays within the path limits afterwards (checked by
    /// looking at up to `max_check` entries; a bigger folder moved deeper is refused).
    fn rename(&self, from: &str, to: &str, max_check: u64) -> Result<String, StorageError> {
        // Refuse a bad target before saying anything about the source.
        named_components(to).map_err(|source| StorageError::BadPath {
            path: to.into(),
            source,
        })?;
        let _one_at_a_time = self.rename_lock.lock().unwrap_or_else(|e| e.into_inner());
        let src = self.resolve(from, true)?;
        let Some(src_meta) = src.meta else {
            return Err(StorageError::NotFound(from.into()));
        };
        let mut to_remote = to.trim_end_matches('/').to_string();
        let mut dst = self.resolve(&to_remote, true)?;
        if dst.meta.is_some_and(|m| m.kind == Kind::Dir) {
            let base = src.parts.last().cloned().unwrap_or_default();
            to_remote = xfer_proto::path::join(&to_remote, &base);
            dst = self.resolve(&to_remote, true)?;
        }
        if dst.parts == src.parts {
            return Ok(to_remote);
        }
        if dst.meta.is_some_and(|m| m.kind == Kind::Dir) {
            return Err(StorageError::AlreadyExists(to_remote));
        }
        // Said here, or rename(2)'s ENOTDIR would blame the folder being moved.
        if src.meta.is_some_and(|m| m.kind == Kind::Dir) && dst.meta.is_some() {
            return Err(StorageError::WrongKind(
                to_remote,
                "a file; a folder cannot replace it",
            ));
        }
        if dst.parts.starts_with(&src.parts) {
            return Err(StorageError::WrongKind(
                to_remote,
                "inside the folder being moved",
            ));
        }
        if src_meta.kind == Kind::Dir {
            self.check_reach(from, &src, &to_remote, &dst, max_check)?;
        }
        let (sp, sn) = src.split();
        let (dp, dn) = dst.split();
        self.root
            .rename(&sp, sn, &dp, dn)
            .map_err(|e| self.fail("renaming", from, e))?;
        Ok(to_remote)
    }

    /// Refuses to move the folder `src` to `dst` if a path inside it would then pass
    /// [`MAX_PATH_DEPTH`] or [`MAX_PATH_LEN`]: such entries could no longer be named, and
    /// repeated moves would build trees of any depth.
    fn check_reach(
        &self,
        from: &str,
        src: &Resolved,
        to: &str,
        dst: &Resolved,
        max_check: u64,
    ) -> Result<(), StorageError> {
        let depth = |r: &Resolved| r.parts.len();
        let len = |r: &Resolved| {
            r.parts.iter().map(String::len).sum::<usize>() + depth(r).saturating_sub(1)
        };
        // Everything inside moves by the same amount: a move that makes the folder's own
        // path neither deeper nor longer cannot push anything inside it past a limit it was
        // within before, so the common renames need no walk.
        if depth(dst) <= depth(src) && len(dst) <= len(src) {
            return Ok(());
        }
        let reach = self.root.reach(
            &src.all(),
            MAX_PATH_DEPTH.saturating_sub(depth(dst)),
            MAX_PATH_LEN.saturating_sub(len(dst)),
            max_check,
        );
        match reach.map_err(|e| self.fail("checking", from, e))? {
            Reach::Within => Ok(()),
            Reach::Beyond { depth: d, len: l } => Err(StorageError::TooDeep {
                from: from.into(),
                to: to.into(),
                depth: depth(dst) + d,
                len: len(dst) + l,
            }),
            Reach::TooMany => Err(StorageError::TooBigToCheck {
                from: from.into(),
                max: max_check,
            }),
        }
    }

    /// Creates a folder and any missing parents (like `mkdir -p`); an existing folder is fine.
    fn mkdir(&self, remote: &str) -> Result<(), StorageError> {
        let parts = named_components(remote).map_err(|source| StorageError::BadPath {
            path: remote.into(),
            source,
        })?;
        for depth in 1..=parts.len() {
            let sub = parts[..depth].join("/");
            let r = self.resolve(&sub, true)?;
            match r.meta.map(|m| m.kind) {
                Some(Kind::Dir) => continue,
                Some(_) => return Err(StorageError::WrongKind(sub, "a file")),
                None => {
                    let (parent, name) = r.split();
                    match self.root.mkdir(&parent, name) {
                        Ok(()) => {}
                        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(self.fail("creating folder", &sub, e)),
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! What only this backend can show; everything else is tested through the seam, on
    //! every backend, in `storage/tests.rs`.

    use std::io::Write;

    use super::*;
    use crate::storage::tests::{Backend, fixture, put, read};
    use crate::storage::{StageCache, Tree};

    fn local(t: &Tree) -> &LocalTree {
        match t {
            Tree::Local(t) => t,
            other => panic!("not a local tree: {other:?}"),
        }
    }

    /// Files in the root's temp folder (uploads in progress or leftovers).
    fn temp_files(t: &Tree) -> usize {
        std::fs::read_dir(&local(t).fs.tmp).unwrap().count()
    }

    #[tokio::test]
    async fn a_committed_big_upload_carries_its_digest_wherever_xattrs_work() {
        let data: Vec<u8> = (0..(1usize << 20) + 3).map(|i| (i % 253) as u8).collect();
        let digest = *blake3::hash(&data).as_bytes();
        // The test's own disk, and tmpfs, which may or may not keep user attributes.
        let shm = std::path::Path::new("/dev/shm");
        let mut roots = vec![tempfile::tempdir().unwrap()];
        if shm.is_dir() {
            roots.push(tempfile::tempdir_in(shm).unwrap());
        }
        for dir in roots {
            let storage = LocalStore::open(&dir.path().join("root")).unwrap();
            let t = Tree::Local(storage.user_tree("alice").await.unwrap());
            put(&t, "big", &data).await;
            put(&t, "small", b"tiny").await;
            let h = t.open_read("big", true).await.unwrap();
            assert_eq!(h.size, data.len() as u64);
            let probe = File::create(dir.path().join("probe")).unwrap();
            let keeps_xattrs =
                rustix::fs::fsetxattr(&probe, "user.probe", b"1", rustix::fs::XattrFlags::empty())
                    .is_ok();
            let want = keeps_xattrs.then_some(digest);
            assert_eq!(h.stored, want, "{:?}", dir.path());
            let ReadBody::File(f) = h.body else {
                panic!("a big file is read as a file")
            };
            assert_eq!(digest_store::stored(&f), want, "{:?}", dir.path());
            let small = t.open_read("small", false).await.unwrap();
            let ReadBody::File(f) = small.body else {
                panic!("a read from an offset is read as a file")
            };
            assert_eq!(digest_store::stored(&f), None);
        }
    }

    #[tokio::test]
    async fn uploads_that_end_uncommitted_leave_no_temp_file() {
        let fx = fixture(Backend::Local).await;
        let t = fx.tree.clone();
        put(&t, "f", b"old").await;
        {
            let up = t.begin_upload("f", 3, 0, Staging::Temp).await.unwrap();
            up.file().unwrap().write_all(b"ne").unwrap();
            assert_eq!(temp_files(&t), 1);
        }
        assert_eq!(temp_files(&t), 0);
        let up = t.begin_upload("f", 3, 0, Staging::Temp).await.unwrap();
        up.discard().await;
        assert_eq!(temp_files(&t), 0);
        let cache = StageCache::default();
        let staged = t.stage("g", b"1".to_vec(), &cache).await.unwrap();
        assert_eq!(temp_files(&t), 1);
        drop(staged);
        assert_eq!(temp_files(&t), 0);
        assert_eq!(std::fs::read(local(&t).dir().join("f")).unwrap(), b"old");
    }

    #[tokio::test]
    async fn leftover_temp_files_are_removed_at_open() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        LocalStore::open(&root).unwrap();
        let tmp = root.join(TMP_DIR);
        std::fs::write(tmp.join("upload-crashed"), b"partial").unwrap();
        LocalStore::open(&root).unwrap();
        assert_eq!(std::fs::read_dir(tmp).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn symlinks_inside_the_tree_lead_nowhere() {
        let d = tempfile::tempdir().unwrap();
        let storage = LocalStore::open(&d.path().join("root")).unwrap();
        let t = Tree::Local(storage.user_tree("alice").await.unwrap());
        let dir = local(&t).dir().to_path_buf();
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), dir.join("flink")).unwrap();
        let r = crate::storage::tests::list(&t, "link").await;
        assert!(matches!(r, Err(StorageError::Symlink(_))), "{r:?}");
        for path in ["link/secret", "flink"] {
            let r = read(&t, path).await;
            assert!(matches!(r, Err(StorageError::Symlink(_))), "{path}: {r:?}");
        }
        let cache = StageCache::default();
        assert!(
            t.begin_upload("link/new", 1, 0, Staging::Temp)
                .await
                .is_err()
        );
        assert!(t.begin_upload("flink", 1, 0, Staging::Temp).await.is_err());
        assert!(t.stage("link/new", b"1".to_vec(), &cache).await.is_err());
        assert!(t.stage("flink", b"1".to_vec(), &cache).await.is_err());
        assert!(t.delete("link/secret").await.is_err());
        assert!(t.rename("flink", "x", 100).await.is_err());
        assert!(t.mkdir("link/sub").await.is_err());
        assert!(outside.join("secret").exists());
        assert!(!outside.join("sub").exists());
        assert!(!outside.join("new").exists());
    }

    #[tokio::test]
    async fn a_user_folder_that_is_a_symlink_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let storage = LocalStore::open(&d.path().join("root")).unwrap();
        std::fs::create_dir(d.path().join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(d.path().join("elsewhere"), d.path().join("root/bob")).unwrap();
        assert!(storage.user_tree("bob").await.is_err());
    }
}
