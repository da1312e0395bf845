//! Users' storage trees and every filesystem operation on them, all through one resolver.
//!
//! [`UserTree::resolve`] is the only way from a remote path to a local one: it accepts only
//! normal components (via `xfer_proto::path`), joins them beneath the user's folder and walks
//! them with `symlink_metadata`, refusing any symlink on the way, so no operation can be led out
//! of the tree by a link planted inside it. Uploads land in a temp file under `ROOT/.xfer-tmp`
//! (same filesystem), and become visible only by rename after verification and fsync.

use std::fs::{File, Metadata};
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use xfer_proto::path::{PathError, components, named_components};
use xfer_proto::{Entry, EntryKind, ErrorCode};

/// Folder under the storage root that holds uploads in progress. User names cannot start
/// with `.`, so it never collides with a user's tree.
pub const TMP_DIR: &str = ".xfer-tmp";

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

    fn io(op: &'static str, path: &str, source: std::io::Error) -> Self {
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

/// The storage root shared by all users.
#[derive(Debug, Clone)]
pub struct Storage {
    /// The configured root.
    root: PathBuf,
    /// `root/.xfer-tmp`, where uploads are written before they are committed.
    tmp: PathBuf,
}

impl Storage {
    /// Creates the root and temp folder if needed and removes temp files left by uploads that
    /// were interrupted by a crash (they were never visible, so nothing is lost).
    pub fn open(root: &Path) -> std::io::Result<Storage> {
        crate::fsutil::create_dir_with_mode(root, 0o700)?;
        let tmp = root.join(TMP_DIR);
        crate::fsutil::create_dir_with_mode(&tmp, 0o700)?;
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
            tmp,
        })
    }

    /// The storage root.
    pub fn root(&self) -> &Path {
        &self.root
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
        Ok(UserTree {
            dir,
            tmp: self.tmp.clone(),
        })
    }
}

/// One user's view of storage: every path they give is resolved beneath `dir`.
#[derive(Debug, Clone)]
pub struct UserTree {
    /// The user's folder.
    dir: PathBuf,
    /// Where uploads are staged.
    tmp: PathBuf,
}

/// A remote path resolved to a local one.
#[derive(Debug)]
pub struct Resolved {
    /// The local path.
    pub path: PathBuf,
    /// Its metadata (not following links), if it exists.
    pub meta: Option<Metadata>,
}

/// An upload in progress: a temp file that becomes the target only through [`UserTree::commit`].
/// Dropping it (error, abort, shutdown) deletes the temp file.
pub struct PendingUpload {
    /// The staged data.
    pub temp: tempfile::NamedTempFile,
    /// Where it goes on commit.
    target: PathBuf,
    /// The remote path, for messages.
    pub remote: String,
}

fn modified_secs(meta: &Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn entry_of(name: String, meta: &Metadata) -> Entry {
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        EntryKind::File
    } else if ft.is_dir() {
        EntryKind::Dir
    } else {
        EntryKind::Other
    };
    Entry {
        name,
        kind,
        size: if kind == EntryKind::File {
            meta.len()
        } else {
            0
        },
        modified: modified_secs(meta),
    }
}

impl UserTree {
    /// The user's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Resolves `remote` beneath the user's folder: only normal components, no symlinks
    /// anywhere along the path, and every existing ancestor a folder.
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
        let mut path = self.dir.clone();
        let mut meta = std::fs::symlink_metadata(&path).ok();
        for (i, part) in parts.iter().enumerate() {
            match &meta {
                Some(m) if m.is_dir() => {}
                Some(_) => {
                    return Err(StorageError::WrongKind(
                        parts[..i].join("/"),
                        "not a folder",
                    ));
                }
                None => {
                    return Err(StorageError::NotFound(parts[..i].join("/")));
                }
            }
            path.push(part);
            meta = match std::fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(StorageError::Symlink(remote.into()));
                }
                Ok(m) => Some(m),
                Err(e) if e.kind() == ErrorKind::NotFound => None,
                Err(e) => return Err(StorageError::io("resolving", remote, e)),
            };
        }
        Ok(Resolved { path, meta })
    }

    /// Lists a folder (or describes a single file), sorted by name.
    pub fn list(&self, remote: &str) -> Result<Vec<Entry>, StorageError> {
        let r = self.resolve(remote, false)?;
        let meta = r
            .meta
            .ok_or_else(|| StorageError::NotFound(remote.into()))?;
        if !meta.is_dir() {
            let name = r
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            return Ok(vec![entry_of(name, &meta)]);
        }
        let mut out = Vec::new();
        let iter =
            std::fs::read_dir(&r.path).map_err(|e| StorageError::io("listing", remote, e))?;
        for entry in iter {
            let entry = entry.map_err(|e| StorageError::io("listing", remote, e))?;
            let Ok(meta) = entry.metadata() else { continue };
            out.push(entry_of(
                entry.file_name().to_string_lossy().into_owned(),
                &meta,
            ));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Opens a regular file for download: the file, its size and modification time.
    pub fn open_for_download(&self, remote: &str) -> Result<(File, u64, i64), StorageError> {
        let r = self.resolve(remote, true)?;
        let meta = r
            .meta
            .ok_or_else(|| StorageError::NotFound(remote.into()))?;
        if meta.is_dir() {
            return Err(StorageError::WrongKind(remote.into(), "a folder"));
        }
        if !meta.is_file() {
            return Err(StorageError::WrongKind(remote.into(), "not a regular file"));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&r.path)
            .map_err(|e| StorageError::io("opening", remote, e))?;
        let meta = file
            .metadata()
            .map_err(|e| StorageError::io("opening", remote, e))?;
        Ok((file, meta.len(), modified_secs(&meta)))
    }

    /// Prepares an upload of `size` bytes to `remote`: the parent folder must exist, the
    /// target must not be a folder, and the disk must have room.
    pub fn begin_upload(
        &self,
        remote: &str,
        size: u64,
        max_bytes: u64,
    ) -> Result<PendingUpload, StorageError> {
        if max_bytes > 0 && size > max_bytes {
            return Err(StorageError::TooLarge(max_bytes));
        }
        let r = self.resolve(remote, true)?;
        if let Some(m) = &r.meta
            && !m.is_file()
        {
            return Err(StorageError::WrongKind(remote.into(), "a folder"));
        }
        if let Ok(st) = rustix::fs::statvfs(&self.tmp) {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            if size > free {
                return Err(StorageError::NoSpace);
            }
        }
        let temp = tempfile::Builder::new()
            .prefix("upload-")
            .tempfile_in(&self.tmp)
            .map_err(|e| StorageError::io("creating a temp file for", remote, e))?;
        Ok(PendingUpload {
            temp,
            target: r.path,
            remote: remote.into(),
        })
    }

    /// Makes a verified upload visible: fsync the data, re-check the target, rename over it,
    /// fsync the folder. Until the rename the old version is untouched.
    pub fn commit(&self, upload: PendingUpload) -> Result<(), StorageError> {
        let remote = upload.remote.clone();
        upload
            .temp
            .as_file()
            .sync_all()
            .map_err(|e| StorageError::io("syncing", &remote, e))?;
        // The tree may have changed during the transfer (a folder or link put in the way).
        let r = self.resolve(&remote, true)?;
        if let Some(m) = &r.meta
            && !m.is_file()
        {
            return Err(StorageError::WrongKind(remote, "a folder"));
        }
        debug_assert_eq!(r.path, upload.target);
        upload
            .temp
            .persist(&r.path)
            .map_err(|e| StorageError::io("committing", &remote, e.error))?;
        crate::fsutil::sync_dir(crate::fsutil::parent_dir(&r.path))
            .map_err(|e| StorageError::io("syncing the folder of", &remote, e))
    }

    /// Deletes a file or an empty folder.
    pub fn delete(&self, remote: &str) -> Result<(), StorageError> {
        let r = self.resolve(remote, true)?;
        let meta = r
            .meta
            .ok_or_else(|| StorageError::NotFound(remote.into()))?;
        let result = if meta.is_dir() {
            std::fs::remove_dir(&r.path)
        } else {
            std::fs::remove_file(&r.path)
        };
        result.map_err(|e| StorageError::io("deleting", remote, e))?;
        crate::fsutil::sync_dir(crate::fsutil::parent_dir(&r.path))
            .map_err(|e| StorageError::io("syncing the folder of", remote, e))
    }

    /// Renames `from` to `to`; if `to` is an existing folder, moves `from` into it. An
    /// existing file at the target is replaced (as `mv` does); a folder never is.
    pub fn rename(&self, from: &str, to: &str) -> Result<String, StorageError> {
        // Refuse a bad target before saying anything about the source.
        named_components(to).map_err(|source| StorageError::BadPath {
            path: to.into(),
            source,
        })?;
        let src = self.resolve(from, true)?;
        if src.meta.is_none() {
            return Err(StorageError::NotFound(from.into()));
        }
        let mut to_remote = to.trim_end_matches('/').to_string();
        let mut dst = self.resolve(&to_remote, true)?;
        if dst.meta.as_ref().is_some_and(|m| m.is_dir()) {
            let base = from
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or(from);
            to_remote = xfer_proto::path::join(&to_remote, base);
            dst = self.resolve(&to_remote, true)?;
        }
        if dst.path == src.path {
            return Ok(to_remote);
        }
        if dst.meta.as_ref().is_some_and(|m| m.is_dir()) {
            return Err(StorageError::AlreadyExists(to_remote));
        }
        if dst.path.starts_with(&src.path) {
            return Err(StorageError::WrongKind(
                to_remote,
                "inside the folder being moved",
            ));
        }
        std::fs::rename(&src.path, &dst.path).map_err(|e| StorageError::io("renaming", from, e))?;
        for dir in [
            crate::fsutil::parent_dir(&src.path),
            crate::fsutil::parent_dir(&dst.path),
        ] {
            crate::fsutil::sync_dir(dir)
                .map_err(|e| StorageError::io("syncing the folder of", &to_remote, e))?;
        }
        Ok(to_remote)
    }

    /// Creates a folder and any missing parents (like `mkdir -p`); an existing folder is fine.
    pub fn mkdir(&self, remote: &str) -> Result<(), StorageError> {
        let parts = named_components(remote).map_err(|source| StorageError::BadPath {
            path: remote.into(),
            source,
        })?;
        // Create one level at a time through the resolver, so no link is followed.
        for depth in 1..=parts.len() {
            let sub = parts[..depth].join("/");
            let r = self.resolve(&sub, true)?;
            match r.meta {
                Some(m) if m.is_dir() => continue,
                Some(_) => return Err(StorageError::WrongKind(sub, "a file")),
                None => match std::fs::create_dir(&r.path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(StorageError::io("creating folder", &sub, e)),
                },
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tree() -> (tempfile::TempDir, Storage, UserTree) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(&dir.path().join("root")).unwrap();
        let tree = storage.user_tree("alice").unwrap();
        (dir, storage, tree)
    }

    fn put(tree: &UserTree, remote: &str, data: &[u8]) {
        let mut up = tree.begin_upload(remote, data.len() as u64, 0).unwrap();
        up.temp.write_all(data).unwrap();
        tree.commit(up).unwrap();
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
    fn an_uncommitted_upload_leaves_the_old_version_and_no_temp() {
        let (d, _s, t) = tree();
        put(&t, "f", b"old");
        {
            let mut up = t.begin_upload("f", 3, 0).unwrap();
            up.temp.write_all(b"ne").unwrap();
        }
        assert_eq!(std::fs::read(t.dir().join("f")).unwrap(), b"old");
        let tmp = d.path().join("root").join(TMP_DIR);
        assert_eq!(std::fs::read_dir(tmp).unwrap().count(), 0);
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
        assert!(matches!(
            t.open_for_download("link/secret"),
            Err(StorageError::Symlink(_))
        ));
        assert!(matches!(
            t.open_for_download("flink"),
            Err(StorageError::Symlink(_))
        ));
        assert!(t.begin_upload("link/new", 1, 0).is_err());
        assert!(t.begin_upload("flink", 1, 0).is_err());
        assert!(t.delete("link/secret").is_err());
        assert!(t.rename("flink", "x").is_err());
        assert!(t.mkdir("link/sub").is_err());
        assert!(outside.join("secret").exists());
        assert!(!outside.join("sub").exists());
    }

    #[test]
    fn rename_moves_into_folders_and_refuses_loops() {
        let (_d, _s, t) = tree();
        put(&t, "f", b"1");
        t.mkdir("d").unwrap();
        assert_eq!(t.rename("f", "d").unwrap(), "d/f");
        assert!(t.dir().join("d/f").exists());
        assert!(t.rename("d", "d/inner").is_err());
        assert_eq!(t.rename("d/f", "g").unwrap(), "g");
        assert!(matches!(
            t.rename("missing", "x"),
            Err(StorageError::NotFound(_))
        ));
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
