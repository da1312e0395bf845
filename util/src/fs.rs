//! Atomic file replacement: a reader sees the old file or the new one, never a mix, and a crash
//! leaves one of the two. The new contents are written into a temp file in the same folder (so
//! the rename cannot cross filesystems) that is 0600 from its first byte, fsynced, given its
//! final mode, renamed over the target, and the folder is fsynced so the rename itself is
//! durable before the caller reports success.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Prefix of the temp files, so a leftover from a crash is recognisable.
const TMP_PREFIX: &str = ".xfer-tmp";

/// Which permissions the written file ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Always this mode, whatever the file had: for secrets (the client's tokens and pins),
    /// where permissions someone loosened are tightened back on the next write.
    Exactly(u32),
    /// This mode for a new file; a replaced file keeps its mode, owner and group, so an
    /// administrator's `chown root:xferd; chmod 640` survives the daemon's edits.
    KeepOr(u32),
}

/// Replaces `path` with `contents` atomically and durably, with the permissions `mode` says.
/// The folder fsync is part of success: an error there is returned, not ignored, since the
/// caller may report the write as done.
pub fn write_atomic(path: &Path, contents: &[u8], mode: Mode) -> std::io::Result<()> {
    let dir = parent_dir(path);
    let existing = match mode {
        Mode::Exactly(_) => None,
        Mode::KeepOr(_) => std::fs::metadata(path).ok(),
    };
    let final_mode = match (mode, &existing) {
        (Mode::Exactly(m), _) => m,
        (Mode::KeepOr(_), Some(m)) => m.permissions().mode() & 0o7777,
        (Mode::KeepOr(m), None) => m,
    };
    // Private while the contents go in, whatever the final mode: nobody can open the temp
    // file early and keep reading a secret, nor watch a half-written file.
    let mut tmp = tempfile::Builder::new()
        .prefix(TMP_PREFIX)
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    tmp.write_all(contents)?;
    if let Some(m) = &existing {
        // Only root can give a file away; for anyone else the owner is already right.
        let _ = std::os::unix::fs::fchown(tmp.as_file(), Some(m.uid()), Some(m.gid()));
    }
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(final_mode))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)
}

/// [`write_atomic`] for a private file: always 0600.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_atomic(path, contents, Mode::Exactly(0o600))
}

/// Flushes a folder's entries (a rename is only durable once its folder is synced).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The folder holding `path` (`.` for a bare file name, where [`Path::parent`] gives "").
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn entries(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn keep_or_gives_a_new_file_its_mode_and_a_replaced_one_keeps_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", Mode::KeepOr(0o600)).unwrap();
        assert_eq!(mode_of(&p), 0o600);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&p, b"two", Mode::KeepOr(0o600)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(mode_of(&p), 0o640, "an existing file keeps its mode");
        assert_eq!(entries(dir.path()), 1, "no temp file left behind");
    }

    #[test]
    fn keep_or_applies_a_public_mode_to_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cert.pem");
        write_atomic(&p, b"cert", Mode::KeepOr(0o644)).unwrap();
        assert_eq!(mode_of(&p), 0o644);
    }

    #[test]
    fn exactly_tightens_a_loosened_file_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sessions.toml");
        write_private(&p, b"one").unwrap();
        assert_eq!(mode_of(&p), 0o600);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            mode_of(&p),
            0o600,
            "a secret is private again after each write"
        );
        assert_eq!(entries(dir.path()), 1);
    }

    #[test]
    fn replacing_a_file_makes_a_new_inode_so_an_open_reader_keeps_the_old_contents() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_private(&p, b"old").unwrap();
        let before = std::fs::File::open(&p).unwrap();
        write_private(&p, b"new").unwrap();
        let mut old = String::new();
        std::io::Read::read_to_string(&mut &before, &mut old).unwrap();
        assert_eq!(old, "old");
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
    }

    #[test]
    fn a_missing_folder_is_an_error_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing").join("f");
        let e = write_private(&p, b"x").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        assert_eq!(entries(dir.path()), 0);
    }

    #[test]
    fn parent_of_a_bare_name_is_the_current_folder() {
        assert_eq!(parent_dir(Path::new("f")), Path::new("."));
        assert_eq!(parent_dir(Path::new("/a/b")), Path::new("/a"));
        assert_eq!(parent_dir(Path::new("a/b")), Path::new("a"));
    }
}
