//! Filesystem access confined beneath a directory, with no symlink followed anywhere.
//!
//! Every path is resolved by the kernel relative to an open directory: `openat2(2)` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` where the kernel has it (Linux 5.6+), otherwise a
//! walk that opens one component at a time with `O_NOFOLLOW | O_DIRECTORY`. Either way the check
//! and the use are one step, so a symlink swapped in between cannot redirect an operation
//! outside the tree (no time-of-check/time-of-use gap). Final components are acted on with the
//! `*at` calls (`statat` without following, `unlinkat`, `renameat`, `mkdirat`), which never
//! follow a final symlink either.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

/// Set once `openat2` turns out to be unavailable (old kernel, seccomp), to stop trying it.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// A directory that operations cannot leave.
#[derive(Debug)]
pub struct Beneath {
    /// The directory, opened without following a symlink.
    root: OwnedFd,
}

/// What kind of thing a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link (never followed).
    Symlink,
    /// Anything else.
    Other,
}

/// Metadata of an entry, read without following links.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    /// Its kind.
    pub kind: Kind,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub modified: i64,
}

impl From<&Stat> for Meta {
    fn from(st: &Stat) -> Meta {
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        };
        Meta {
            kind,
            size: st.st_size as u64,
            modified: st.st_mtime,
        }
    }
}

fn join(parts: &[&str]) -> Vec<u8> {
    if parts.is_empty() {
        return b".".to_vec();
    }
    parts.join("/").into_bytes()
}

fn cpath(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

impl Beneath {
    /// Opens `dir` (which must not itself be a symlink) as the confinement root.
    pub fn open(dir: &Path) -> std::io::Result<Beneath> {
        let root = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Beneath { root })
    }

    /// Opens `dir` as the confinement root, following symlinks in the path to it: for a folder
    /// the local user named (`xfer download --to ~/dl`, where `~/dl` may be a link), beneath
    /// which nothing is followed.
    pub fn open_following(dir: &Path) -> std::io::Result<Beneath> {
        let root = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Beneath { root })
    }

    /// Opens `parts` (already checked to be normal names) beneath the root with `flags`.
    fn open_at(&self, parts: &[&str], flags: OFlags, mode: Mode) -> std::io::Result<OwnedFd> {
        let flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            let path = join(parts);
            match rustix::fs::openat2(
                &self.root,
                cpath(&path),
                flags,
                mode,
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
            ) {
                Err(Errno::NOSYS) | Err(Errno::PERM) => {
                    // Seccomp filters may answer EPERM for unknown syscalls; fall back for good.
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                }
                Err(Errno::AGAIN) => return self.walk(parts, flags, mode),
                other => return other.map_err(Into::into),
            }
        }
        self.walk(parts, flags, mode)
    }

    /// The portable resolution: one component at a time, never following a link.
    fn walk(&self, parts: &[&str], flags: OFlags, mode: Mode) -> std::io::Result<OwnedFd> {
        let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let Some((last, dirs)) = parts.split_last() else {
            return Ok(rustix::fs::openat(&self.root, ".", flags, mode)?);
        };
        let mut cur: Option<OwnedFd> = None;
        for d in dirs {
            let base = cur.as_ref().map(|f| f.as_fd()).unwrap_or(self.root.as_fd());
            cur = Some(rustix::fs::openat(base, *d, dir_flags, Mode::empty())?);
        }
        let base = cur.as_ref().map(|f| f.as_fd()).unwrap_or(self.root.as_fd());
        Ok(rustix::fs::openat(base, *last, flags, mode)?)
    }

    /// Opens the directory `parts` for reading or as a base for `*at` calls.
    pub fn open_dir(&self, parts: &[&str]) -> std::io::Result<OwnedFd> {
        self.open_at(parts, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
    }

    /// Opens the regular file `parts` for reading.
    pub fn open_file(&self, parts: &[&str]) -> std::io::Result<File> {
        Ok(File::from(self.open_at(
            parts,
            OFlags::RDONLY,
            Mode::empty(),
        )?))
    }

    /// Metadata of `parts` without following a final link; `None` if it does not exist.
    /// A symlink in a parent component is an error (`ELOOP`).
    pub fn stat(&self, parts: &[&str]) -> std::io::Result<Option<Meta>> {
        let Some((last, dirs)) = parts.split_last() else {
            return Ok(Some(Meta::from(&rustix::fs::fstat(&self.root)?)));
        };
        let parent = self.open_dir(dirs)?;
        match rustix::fs::statat(&parent, *last, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(Meta::from(&st))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Hands each entry of directory `parts` (without `.` and `..`) to `f` in directory order,
    /// so a huge folder is never held in memory; `f` returns false to stop early.
    pub fn read_dir_each(
        &self,
        parts: &[&str],
        mut f: impl FnMut(Vec<u8>, Meta) -> bool,
    ) -> std::io::Result<()> {
        let fd = self.open_dir(parts)?;
        let mut dir = rustix::fs::Dir::read_from(&fd)?;
        while let Some(entry) = dir.read() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            match rustix::fs::statat(&fd, entry.file_name(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => {
                    if !f(name.to_vec(), Meta::from(&st)) {
                        return Ok(());
                    }
                }
                // Removed between listing and stat: simply not there any more.
                Err(Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Creates directory `name` inside directory `parent`, mode 0700.
    pub fn mkdir(&self, parent: &[&str], name: &str) -> std::io::Result<()> {
        self.mkdir_mode(parent, name, 0o700)
    }

    /// Creates directory `name` inside directory `parent` with `mode` (less the umask).
    pub fn mkdir_mode(&self, parent: &[&str], name: &str, mode: u32) -> std::io::Result<()> {
        let dir = self.open_dir(parent)?;
        rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(mode))?;
        Ok(())
    }

    /// Removes the file (or, with `dir`, the empty directory) `name` inside `parent`.
    pub fn remove(&self, parent: &[&str], name: &str, dir: bool) -> std::io::Result<()> {
        let base = self.open_dir(parent)?;
        let flags = if dir {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        rustix::fs::unlinkat(&base, name, flags)?;
        Ok(())
    }

    /// Renames `from_name` in directory `from_dir` (any open directory on the same filesystem)
    /// to `to_name` in directory `to_parent` beneath this root.
    pub fn rename_into(
        &self,
        from_dir: impl AsFd,
        from_name: &str,
        to_parent: &[&str],
        to_name: &str,
    ) -> std::io::Result<()> {
        let to = self.open_dir(to_parent)?;
        rustix::fs::renameat(from_dir, from_name, &to, to_name)?;
        rustix::fs::fsync(&to)?;
        Ok(())
    }

    /// Renames within the root, then syncs both directories.
    pub fn rename(
        &self,
        from_parent: &[&str],
        from_name: &str,
        to_parent: &[&str],
        to_name: &str,
    ) -> std::io::Result<()> {
        let from = self.open_dir(from_parent)?;
        self.rename_into(&from, from_name, to_parent, to_name)?;
        rustix::fs::fsync(&from)?;
        Ok(())
    }

    /// Flushes directory `parts` (makes a rename or unlink inside it durable).
    pub fn sync_dir(&self, parts: &[&str]) -> std::io::Result<()> {
        let fd = self.open_dir(parts)?;
        rustix::fs::fsync(&fd)?;
        Ok(())
    }
}

/// How far the contents of a folder reach below it (see [`Beneath::reach`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Every entry is within the depth and length asked about.
    Within,
    /// An entry lies `depth` levels below the folder, its path below it (with a leading `/`)
    /// `len` bytes long, past what was asked about.
    Beyond {
        /// Levels below the folder (1 for its own entries).
        depth: usize,
        /// Bytes of `/name/name...` below the folder.
        len: usize,
    },
    /// The folder holds more entries than the walk was allowed to look at.
    TooMany,
}

impl Beneath {
    /// Checks that every entry inside the folder `parts` lies at most `max_depth` levels
    /// below it, with a path below it of at most `max_len` bytes, looking at no more than
    /// `budget` entries. Descends without following links, and never deeper than
    /// `max_depth + 1` levels, so a tree made absurdly deep costs no more than a shallow one.
    pub fn reach(
        &self,
        parts: &[&str],
        max_depth: usize,
        max_len: usize,
        budget: u64,
    ) -> std::io::Result<Reach> {
        let dir = rustix::fs::Dir::new(self.open_dir(parts)?)?;
        let mut left = budget;
        reach_below(dir, 1, 0, max_depth, max_len, &mut left)
    }
}

/// [`Beneath::reach`] for the folder `dir`, whose entries lie `depth` levels below the
/// starting folder, at the end of a path of `base_len` bytes below it.
fn reach_below(
    mut dir: rustix::fs::Dir,
    depth: usize,
    base_len: usize,
    max_depth: usize,
    max_len: usize,
    left: &mut u64,
) -> std::io::Result<Reach> {
    while let Some(entry) = dir.read() {
        let entry = entry?;
        let name = entry.file_name();
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        if *left == 0 {
            return Ok(Reach::TooMany);
        }
        *left -= 1;
        let len = base_len + 1 + bytes.len();
        if depth > max_depth || len > max_len {
            return Ok(Reach::Beyond { depth, len });
        }
        let is_dir = match entry.file_type() {
            FileType::Directory => true,
            FileType::Unknown => rustix::fs::statat(dir.fd()?, name, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory),
            _ => false,
        };
        if !is_dir {
            continue;
        }
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let sub = match rustix::fs::openat(dir.fd()?, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            // Gone or replaced (by a link, say) since it was listed: nothing of it to count.
            Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => continue,
            Err(e) => return Err(e.into()),
        };
        match reach_below(
            rustix::fs::Dir::new(sub)?,
            depth + 1,
            len,
            max_depth,
            max_len,
            left,
        )? {
            Reach::Within => {}
            other => return Ok(other),
        }
    }
    Ok(Reach::Within)
}

/// True when an error means "a symlink was in the way".
pub fn is_symlink_refusal(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(Errno::LOOP.raw_os_error())
        || e.raw_os_error() == Some(Errno::XDEV.raw_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Beneath) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/f"), b"inside").unwrap();
        std::fs::create_dir(t.path().join("outside")).unwrap();
        std::fs::write(t.path().join("outside/secret"), b"secret").unwrap();
        std::os::unix::fs::symlink(t.path().join("outside"), root.join("dirlink")).unwrap();
        std::os::unix::fs::symlink(t.path().join("outside/secret"), root.join("filelink")).unwrap();
        std::os::unix::fs::symlink("sub", root.join("rellink")).unwrap();
        let b = Beneath::open(&root).unwrap();
        (t, b)
    }

    fn read_dir(b: &Beneath, parts: &[&str]) -> std::io::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        b.read_dir_each(parts, |name, _| {
            out.push(name);
            true
        })?;
        Ok(out)
    }

    fn check_all(b: &Beneath) {
        assert!(b.open_file(&["sub", "f"]).is_ok());
        for parts in [&["dirlink", "secret"][..], &["filelink"], &["rellink", "f"]] {
            let err = b.open_file(parts).unwrap_err();
            assert!(is_symlink_refusal(&err), "{parts:?}: {err}");
        }
        assert!(read_dir(b, &["dirlink"]).is_err());
        assert!(b.mkdir(&["dirlink"], "x").is_err());
        assert!(b.remove(&["dirlink"], "secret", false).is_err());
        assert_eq!(b.stat(&["filelink"]).unwrap().unwrap().kind, Kind::Symlink);
        assert!(b.stat(&["dirlink", "secret"]).is_err());
        assert_eq!(read_dir(b, &[]).unwrap().len(), 4);
    }

    #[test]
    fn links_are_never_followed_with_openat2() {
        let (t, b) = setup();
        check_all(&b);
        assert!(t.path().join("outside/secret").exists());
    }

    #[test]
    fn reach_finds_the_deepest_and_longest_entries_within_a_budget() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("top/a/b/c")).unwrap();
        std::fs::write(root.join("top/a/b/c/file"), b"").unwrap();
        std::fs::write(root.join("top/x"), b"").unwrap();
        // A link to a deep tree outside is an entry, never followed.
        std::fs::create_dir_all(t.path().join("deep/1/2/3/4/5/6")).unwrap();
        std::os::unix::fs::symlink(t.path().join("deep"), root.join("top/link")).unwrap();
        let b = Beneath::open(&root).unwrap();
        // Entries below top: x, link, a (1), a/b (2), a/b/c (3), a/b/c/file (4 levels,
        // "/a/b/c/file" = 11 bytes).
        assert_eq!(b.reach(&["top"], 4, 11, 100).unwrap(), Reach::Within);
        assert_eq!(
            b.reach(&["top"], 3, 100, 100).unwrap(),
            Reach::Beyond { depth: 4, len: 11 }
        );
        assert!(matches!(
            b.reach(&["top"], 10, 10, 100).unwrap(),
            Reach::Beyond { len: 11, .. }
        ));
        assert_eq!(b.reach(&["top"], 10, 100, 3).unwrap(), Reach::TooMany);
        assert_eq!(b.reach(&["top"], 10, 100, 6).unwrap(), Reach::Within);
    }

    #[test]
    fn links_are_never_followed_by_the_fallback_walk() {
        let (_t, b) = setup();
        let dir = OFlags::RDONLY | OFlags::DIRECTORY;
        assert!(b.walk(&["dirlink"], dir, Mode::empty()).is_err());
        assert!(b.walk(&["rellink"], dir, Mode::empty()).is_err());
        assert!(
            b.walk(
                &["filelink"],
                OFlags::RDONLY | OFlags::NOFOLLOW,
                Mode::empty()
            )
            .is_err()
        );
        assert!(
            b.walk(
                &["sub", "f"],
                OFlags::RDONLY | OFlags::NOFOLLOW,
                Mode::empty()
            )
            .is_ok()
        );
    }
}
