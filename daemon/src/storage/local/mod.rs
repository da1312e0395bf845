//! The local backend: users' trees in folders under the storage root, and every filesystem
//! operation on them, all through one resolver.
//!
//! [`UserTree::resolve`] is the only way from a remote path to a local one: it accepts only
//! normal components (via `xfer_proto::path`) and every operation then goes through
//! [`crate::beneath::Beneath`], which resolves them in the kernel beneath the user's folder
//! without following any symlink (openat2 `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), so a link
//! planted inside a tree cannot lead any operation outside it, not even by a race. Uploads
//! land in a partial file under `ROOT/.xfer-partial/USER` (kept for resume, see
//! [`partial`]) or a temp file under `ROOT/.xfer-tmp` (same filesystem), and become
//! visible only by rename after verification and fsync.

use std::collections::HashMap;
use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

pub mod digest_store;
pub mod partial;

use self::partial::{Opened, PartialBudget, PartialDir, Reservation};
use super::{Staging, StorageError};
use crate::beneath::{Beneath, Kind, Meta, Reach};

use xfer_proto::Digest;
use xfer_proto::limits::{MAX_PATH_DEPTH, MAX_PATH_LEN};
use xfer_proto::path::{PathError, components, named_components};
use xfer_proto::{Entry, EntryKind};

/// Most folders a batched upload keeps open while it stages files into them.
pub const MAX_OPEN_STAGING_DIRS: usize = 64;

/// Folder under the storage root that holds uploads in progress. User names cannot start
/// with `.`, so it never collides with a user's tree.
pub const TMP_DIR: &str = ".xfer-tmp";

/// The storage root shared by all users.
#[derive(Debug, Clone)]
pub struct Storage {
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

impl Storage {
    /// Creates the root and temp folder if needed and removes temp files left by uploads that
    /// were interrupted by a crash (they were never visible, so nothing is lost).
    pub fn open(root: &Path) -> std::io::Result<Storage> {
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
        Ok(Storage {
            root: root.to_path_buf(),
            tmp_dir: Arc::new(File::open(&tmp)?),
            tmp,
            partials: Default::default(),
            renames: Default::default(),
        })
    }

    /// Deletes partial uploads not touched for `ttl`; returns how many.
    pub fn sweep_partials(&self, ttl: Duration) -> std::io::Result<usize> {
        partial::sweep(&self.root, ttl)
    }

    /// A user's tree, created on first use.
    pub fn user_tree(&self, user: &str) -> std::io::Result<UserTree> {
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
        Ok(UserTree {
            dir,
            root: Arc::new(root),
            tmp: self.tmp.clone(),
            tmp_dir: self.tmp_dir.clone(),
            partials: PartialDir::new(&self.root, user, self.partials.clone()),
            rename_lock,
        })
    }

    /// Bytes `user`'s partial uploads count against their budget now (see
    /// [`PartialDir::usage`]): what a quota adds to the user's visible files.
    pub fn partial_usage(&self, user: &str) -> std::io::Result<u64> {
        PartialDir::new(&self.root, user, self.partials.clone()).usage()
    }
}

/// One user's view of storage: every path they give is resolved beneath their folder.
#[derive(Debug, Clone)]
pub struct UserTree {
    /// The user's folder, as a path (for messages and tests only; never joined with input).
    dir: PathBuf,
    /// The user's folder, open: all access goes through it.
    root: Arc<Beneath>,
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
pub struct Resolved {
    /// The checked components.
    pub parts: Vec<String>,
    /// Its metadata (not following links), if it exists.
    pub meta: Option<Meta>,
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
/// [`UserTree::commit`]. Dropping it (a broken connection, an abort, a shutdown) keeps a
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

    /// Drops what an earlier attempt left, to start from byte 0.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.held = 0;
        Ok(())
    }

    /// Deletes the staged data now (bad digest, failed write): nothing to resume from.
    pub fn discard(mut self) {
        self.keep = false;
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
/// [`UserTree::commit_batch`]; dropped uncommitted, the data is deleted.
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

impl UserTree {
    /// The user's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn fail(&self, op: &'static str, remote: &str, e: std::io::Error) -> StorageError {
        if crate::beneath::is_symlink_refusal(&e) {
            StorageError::Symlink(remote.into())
        } else {
            StorageError::io(op, remote, e)
        }
    }

    /// Resolves `remote` beneath the user's folder: only normal components, and no symlink
    /// anywhere, including the last component.
    pub fn resolve(&self, remote: &str, need_name: bool) -> Result<Resolved, StorageError> {
        let bad = |source| StorageError::BadPath {
            path: remote.into(),
            source,
        };
        let parts = if need_name {
            named_components(remote).map_err(bad)?
        } else {
            components(remote).map_err(bad)?
        };
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

    /// Lists a folder (or describes a single file), sorted by name.
    pub fn list(&self, remote: &str) -> Result<Vec<Entry>, StorageError> {
        let mut out = Vec::new();
        self.list_each(remote, |e| {
            out.push(e);
            true
        })?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Hands each entry of a folder (or the one entry of a file) to `f`, in directory order;
    /// `f` returns false to stop early. Memory stays constant whatever the folder's size.
    pub fn list_each(
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
    pub fn open_for_download(&self, remote: &str) -> Result<(File, u64, i64), StorageError> {
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

    /// Prepares an upload of `size` bytes to `remote`: the parent folder must exist, the
    /// target must not be a folder, and the disk must have room.
    pub fn begin_upload(
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
                    up.restart()
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
    pub fn commit(&self, mut upload: PendingUpload, digest: &Digest) -> Result<(), StorageError> {
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
    /// it holds [`MAX_OPEN_STAGING_DIRS`]). [`UserTree::commit_batch`] makes the file
    /// visible, resolving its folder again by path.
    pub fn stage(
        &self,
        remote: &str,
        data: &[u8],
        dirs: &mut HashMap<String, OwnedFd>,
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
    pub fn commit_batch(
        &self,
        files: Vec<StagedFile>,
    ) -> Vec<(StagedFile, Result<(), StorageError>)> {
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
    pub fn delete(&self, remote: &str) -> Result<(), StorageError> {
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
    pub fn rename(&self, from: &str, to: &str, max_check: u64) -> Result<String, StorageError> {
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
    pub fn mkdir(&self, remote: &str) -> Result<(), StorageError> {
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
    use super::*;
    use std::io::Write;
    use xfer_proto::ErrorCode;

    fn tree() -> (tempfile::TempDir, Storage, UserTree) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(&dir.path().join("root")).unwrap();
        let tree = storage.user_tree("alice").unwrap();
        (dir, storage, tree)
    }

    fn put(tree: &UserTree, remote: &str, data: &[u8]) {
        let up = tree
            .begin_upload(remote, data.len() as u64, 0, Staging::Temp)
            .unwrap();
        up.file().write_all(data).unwrap();
        tree.commit(up, blake3::hash(data).as_bytes()).unwrap();
    }

    #[test]
    fn upload_commit_list_download_delete() {
        let (_d, _s, t) = tree();
        put(&t, "a.txt", b"hello");
        t.mkdir("sub/deeper").unwrap();
        put(&t, "sub/b", b"");
        let names: Vec<_> = t.list("").unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, vec!["a.txt", "sub"]);
        let (_, size, _) = t.open_for_download("a.txt").unwrap();
        assert_eq!(size, 5);
        assert!(matches!(t.delete("sub"), Err(StorageError::NotEmpty(_))));
        t.delete("a.txt").unwrap();
        assert!(matches!(
            t.open_for_download("a.txt"),
            Err(StorageError::NotFound(_))
        ));
    }

    #[test]
    fn a_committed_big_upload_carries_its_digest_wherever_xattrs_work() {
        let data: Vec<u8> = (0..(1usize << 20) + 3).map(|i| (i % 253) as u8).collect();
        let digest = *blake3::hash(&data).as_bytes();
        // The test's own disk, and tmpfs, which may or may not keep user attributes.
        let shm = std::path::Path::new("/dev/shm");
        let mut roots = vec![tempfile::tempdir().unwrap()];
        if shm.is_dir() {
            roots.push(tempfile::tempdir_in(shm).unwrap());
        }
        for dir in roots {
            let storage = Storage::open(&dir.path().join("root")).unwrap();
            let t = storage.user_tree("alice").unwrap();
            put(&t, "big", &data);
            put(&t, "small", b"tiny");
            let (f, size, _) = t.open_for_download("big").unwrap();
            assert_eq!(size, data.len() as u64);
            let probe = File::create(dir.path().join("probe")).unwrap();
            let keeps_xattrs =
                rustix::fs::fsetxattr(&probe, "user.probe", b"1", rustix::fs::XattrFlags::empty())
                    .is_ok();
            let want = keeps_xattrs.then_some(digest);
            assert_eq!(digest_store::stored(&f), want, "{:?}", dir.path());
            let (small, _, _) = t.open_for_download("small").unwrap();
            assert_eq!(digest_store::stored(&small), None);
        }
    }

    #[test]
    fn an_uncommitted_upload_leaves_the_old_version_and_no_temp() {
        let (d, _s, t) = tree();
        put(&t, "f", b"old");
        {
            let up = t.begin_upload("f", 3, 0, Staging::Temp).unwrap();
            up.file().write_all(b"ne").unwrap();
        }
        assert_eq!(std::fs::read(t.dir().join("f")).unwrap(), b"old");
        let tmp = d.path().join("root").join(TMP_DIR);
        assert_eq!(std::fs::read_dir(tmp).unwrap().count(), 0);
    }

    #[test]
    fn an_interrupted_resumable_upload_is_kept_apart_and_offered_again() {
        let (d, _s, t) = tree();
        let resume = |up_to| Staging::Resumable {
            up_to,
            ttl: Duration::from_secs(60),
            max_bytes: 1 << 20,
        };
        t.mkdir("d").unwrap();
        put(&t, "d/f", b"old");
        {
            let up = t.begin_upload("d/f", 6, 0, resume(6)).unwrap();
            assert_eq!(up.held(), 0);
            up.file().write_all(b"new").unwrap();
        }
        // Invisible: the old version is still there and nothing else in the tree.
        assert_eq!(std::fs::read(t.dir().join("d/f")).unwrap(), b"old");
        assert_eq!(t.list("d").unwrap().len(), 1);
        // The same file under another spelling of its path.
        let mut up = t.begin_upload("d//f", 6, 0, resume(6)).unwrap();
        assert_eq!(up.held(), 3);
        use std::io::{Seek, SeekFrom};
        up.file.seek(SeekFrom::Start(3)).unwrap();
        up.file().write_all(b"abc").unwrap();
        t.commit(up, blake3::hash(b"newabc").as_bytes()).unwrap();
        assert_eq!(std::fs::read(t.dir().join("d/f")).unwrap(), b"newabc");
        let partials = d
            .path()
            .join("root")
            .join(partial::PARTIAL_DIR)
            .join("alice");
        assert_eq!(std::fs::read_dir(&partials).unwrap().count(), 0);
        // Asking to start over, or a file smaller than what is held, empties it.
        {
            let up = t.begin_upload("g", 10, 0, resume(10)).unwrap();
            up.file().write_all(b"12345").unwrap();
        }
        assert_eq!(t.begin_upload("g", 10, 0, resume(0)).unwrap().held(), 0);
        {
            let up = t.begin_upload("g", 10, 0, resume(10)).unwrap();
            up.file().write_all(b"12345").unwrap();
        }
        assert_eq!(t.begin_upload("g", 4, 0, resume(4)).unwrap().held(), 0);
        // A discarded one is gone.
        {
            let up = t.begin_upload("h", 10, 0, resume(10)).unwrap();
            up.file().write_all(b"12345").unwrap();
            up.discard();
        }
        assert_eq!(t.begin_upload("h", 10, 0, resume(10)).unwrap().held(), 0);
    }

    #[test]
    fn leftover_temp_files_are_removed_at_open() {
        let (d, _s, _t) = tree();
        let tmp = d.path().join("root").join(TMP_DIR);
        std::fs::write(tmp.join("upload-crashed"), b"partial").unwrap();
        Storage::open(&d.path().join("root")).unwrap();
        assert_eq!(std::fs::read_dir(tmp).unwrap().count(), 0);
    }

    #[test]
    fn symlinks_inside_the_tree_lead_nowhere() {
        let (d, _s, t) = tree();
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(&outside, t.dir().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), t.dir().join("flink")).unwrap();
        assert!(matches!(t.list("link"), Err(StorageError::Symlink(_))));
        let r = t.open_for_download("link/secret");
        assert!(matches!(r, Err(StorageError::Symlink(_))), "{:?}", r.err());
        assert!(matches!(
            t.open_for_download("link/secret"),
            Err(StorageError::Symlink(_))
        ));
        assert!(matches!(
            t.open_for_download("flink"),
            Err(StorageError::Symlink(_))
        ));
        assert!(t.begin_upload("link/new", 1, 0, Staging::Temp).is_err());
        assert!(t.begin_upload("flink", 1, 0, Staging::Temp).is_err());
        assert!(t.delete("link/secret").is_err());
        assert!(t.rename("flink", "x", 100).is_err());
        assert!(t.mkdir("link/sub").is_err());
        assert!(outside.join("secret").exists());
        assert!(!outside.join("sub").exists());
    }

    #[test]
    fn rename_moves_into_folders_and_refuses_loops() {
        let (_d, _s, t) = tree();
        put(&t, "f", b"1");
        t.mkdir("d").unwrap();
        assert_eq!(t.rename("f", "d", 100).unwrap(), "d/f");
        assert!(t.dir().join("d/f").exists());
        assert!(t.rename("d", "d/inner", 100).is_err());
        assert_eq!(t.rename("d/f", "g", 100).unwrap(), "g");
        assert!(matches!(
            t.rename("missing", "x", 100),
            Err(StorageError::NotFound(_))
        ));
    }

    /// `name/1/2/.../n`: a folder whose deepest entry is `n` levels below it.
    fn chain(t: &UserTree, name: &str, n: usize) -> String {
        let mut path = name.to_string();
        for i in 1..=n {
            path.push_str(&format!("/{i}"));
        }
        t.mkdir(&path).unwrap();
        path
    }

    #[test]
    fn renames_never_build_paths_past_the_depth_limit() {
        let (_d, _s, t) = tree();
        // `deep` reaches 60 levels below the root (depth 1 + 59 below it).
        chain(&t, "deep", MAX_PATH_DEPTH - 5);
        let five = chain(&t, "b", 4);
        // Into a folder 5 levels down: its deepest entry would be 65 levels deep.
        let err = t.rename("deep", &five, 1000).unwrap_err();
        assert!(
            matches!(err, StorageError::TooDeep { depth: 65, .. }),
            "{err}"
        );
        assert_eq!(err.code(), ErrorCode::InvalidPath);
        assert!(err.to_string().contains("64 levels"), "{err}");
        assert!(t.dir().join("deep").is_dir(), "nothing moved");
        // One level less is fine, and so is moving it back up (with no walk).
        assert_eq!(t.rename("deep", "b/1/2/3", 1000).unwrap(), "b/1/2/3/deep");
        assert_eq!(t.rename("b/1/2/3/deep", "deep", 1000).unwrap(), "deep");
    }

    #[test]
    fn renames_never_build_paths_past_the_length_limit() {
        let (_d, _s, t) = tree();
        // 16 levels of 250-byte names: a path of 4,015 bytes, within the 4,096 limit.
        let names: Vec<String> = (0..16)
            .map(|i| char::from(b'a' + i).to_string().repeat(250))
            .collect();
        t.mkdir(&names.join("/")).unwrap();
        let q = "q".repeat(250);
        t.mkdir(&q).unwrap();
        // Inside `q`, the deepest path would be 251 bytes longer: 4,266.
        let err = t.rename(&names[0], &q, 1000).unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::TooDeep {
                    depth: 17,
                    len: 4266,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("4096 bytes"), "{err}");
        // A shorter name at the same level is fine.
        assert_eq!(t.rename(&names[0], "s", 1000).unwrap(), "s");
    }

    #[test]
    fn a_folder_too_big_to_check_is_not_moved_deeper() {
        let (_d, _s, t) = tree();
        t.mkdir("big/sub").unwrap();
        for i in 0..10 {
            put(&t, &format!("big/sub/f{i}"), b"");
        }
        t.mkdir("into").unwrap();
        let err = t.rename("big", "into", 5).unwrap_err();
        assert!(
            matches!(err, StorageError::TooBigToCheck { max: 5, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("subfolders separately"), "{err}");
        // A move that makes nothing deeper or longer needs no walk at all.
        assert_eq!(t.rename("big", "bag", 5).unwrap(), "bag");
        assert_eq!(t.rename("bag", "into", 20).unwrap(), "into/bag");
    }

    #[test]
    fn bad_paths_are_refused_with_invalid_path() {
        let (_d, _s, t) = tree();
        for bad in ["..", "../x", "/etc/passwd", "a/../../x", "x\0y"] {
            let err = t.resolve(bad, true).unwrap_err();
            assert_eq!(err.code(), ErrorCode::InvalidPath, "{bad}");
        }
        assert!(t.delete("").is_err(), "the root itself cannot be deleted");
    }
}
