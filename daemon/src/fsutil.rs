//! The stamp that tells one written version of a file from the next, and folder creation.
//! Atomic writes are [`xfer_util::fs::write_atomic`], shared with the client.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::SystemTime;

/// One version of a file, to notice that another process replaced or rewrote it. The inode is
/// part of it because two versions written within one tick of the kernel's coarse file clock
/// have the same modification time; the size and the change time are, because an editor that
/// rewrites a file in place (truncate, then write) keeps the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    ino: u64,
    len: u64,
    modified: SystemTime,
    changed: (i64, i64),
}

impl FileStamp {
    /// True when the file changed so recently (within `window` of `now`) that a further change
    /// in the same tick of the file clock could leave this stamp as it is: a reader that saw
    /// such a stamp should look again later rather than trust it (as Git does with "racy" files).
    pub fn is_racy(&self, now: SystemTime, window: std::time::Duration) -> bool {
        now.duration_since(self.modified)
            .map(|age| age < window)
            // A modification time in the future: the clock moved, trust nothing.
            .unwrap_or(true)
    }
}

/// The stamp of the file at `path`; `None` when it cannot be read (for example, missing).
pub fn file_stamp(path: &Path) -> Option<FileStamp> {
    std::fs::metadata(path).ok().and_then(|m| stamp_of(&m))
}

/// The stamp of an already opened file's metadata.
pub fn stamp_of(m: &std::fs::Metadata) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    Some(FileStamp {
        ino: m.ino(),
        len: m.len(),
        modified: m.modified().ok()?,
        changed: (m.ctime(), m.ctime_nsec()),
    })
}

/// Creates a folder (and parents) with mode `mode` on the last one. A folder this call creates
/// gets the owner and group of its parent, so `xferd init` run as root under a service's
/// `/var/lib/xferd` leaves folders the service can use.
pub fn create_dir_with_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let existed = path.exists();
    std::fs::create_dir_all(path)?;
    if !existed && let Some(parent) = path.parent().and_then(|p| std::fs::metadata(p).ok()) {
        // Only root can give a folder away; anyone else already owns it.
        let _ = std::os::unix::fs::chown(path, Some(parent.uid()), Some(parent.gid()));
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[ignore = "needs root to give a folder away; .ci/run runs it as root"]
    fn new_folders_take_their_parents_owner() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("var-lib-xferd");
        std::fs::create_dir(&parent).unwrap();
        std::os::unix::fs::chown(&parent, Some(65534), Some(65534)).expect("chown (needs root)");
        let child = parent.join("storage");
        create_dir_with_mode(&child, 0o700).unwrap();
        let meta = std::fs::metadata(&child).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    }
}
