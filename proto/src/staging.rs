//! Staging files that resumable bodies are written into (the server's partial uploads, the
//! client's `.part` downloads): created 0600 without following a symlink, and held under an
//! exclusive `flock` so two transfers never write one file.
//!
//! A lock is trusted only while the name still leads to the locked inode: between our open
//! and our lock, the previous holder may have committed the file (renamed it into place) or
//! discarded it (unlinked it), and locking that orphan would let us write into a finished file.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

/// Takes `file`'s exclusive lock without waiting; `Ok(false)` when someone else holds it.
pub fn try_lock(file: &File) -> std::io::Result<bool> {
    match rustix::fs::flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// True when `path` still names the inode `file` has open.
pub fn still_named(file: &File, path: &Path) -> std::io::Result<bool> {
    still_named_at(file, rustix::fs::CWD, path)
}

/// True when `name` in directory `dir` still names the inode `file` has open.
pub fn still_named_at(file: &File, dir: impl AsFd, name: &Path) -> std::io::Result<bool> {
    let held = file.metadata()?;
    Ok(
        match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st.st_ino == held.ino() && st.st_dev == held.dev(),
            Err(Errno::NOENT) => false,
            Err(e) => return Err(e.into()),
        },
    )
}

/// Opens (creating, mode 0600, never through a symlink) and locks the staging file at `path`;
/// `None` when another transfer holds it. The file is left as it is: the caller decides
/// whether its content can be resumed from.
pub fn open_locked(path: &Path) -> std::io::Result<Option<File>> {
    open_locked_at(rustix::fs::CWD, path)
}

/// [`open_locked`] for `name` inside the open directory `dir`, so a folder swapped for a
/// symlink after `dir` was opened cannot redirect the file.
pub fn open_locked_at(dir: impl AsFd, name: &Path) -> std::io::Result<Option<File>> {
    let dir = dir.as_fd();
    // Each retry means the holder committed or discarded it between our open and our lock;
    // the next open finds or creates the right file.
    for _ in 0..4 {
        let file = File::from(rustix::fs::openat(
            dir,
            name,
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?);
        if !try_lock(&file)? {
            return Ok(None);
        }
        if !still_named_at(&file, dir, name)? {
            continue;
        }
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other(format!(
                "`{}` is not a regular file",
                name.display()
            )));
        }
        return Ok(Some(file));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_never_an_orphan() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("f.part");
        let held = open_locked(&path).unwrap().unwrap();
        assert!(open_locked(&path).unwrap().is_none(), "locked");
        // As a commit would: the name now leads elsewhere.
        std::fs::rename(&path, d.path().join("committed")).unwrap();
        drop(held);
        let fresh = open_locked(&path).unwrap().unwrap();
        assert!(still_named(&fresh, &path).unwrap());
        assert_eq!(fresh.metadata().unwrap().len(), 0);
        std::os::unix::fs::symlink(d.path().join("committed"), d.path().join("link")).unwrap();
        assert!(open_locked(&d.path().join("link")).is_err(), "no symlinks");
    }
}
