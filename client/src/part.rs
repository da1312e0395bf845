//! Where a download lands: a [`Dest`] beneath the local folder the user named, and the `.part`
//! file it is written to and resumed from (`NAME.part` beside the target, renamed over the
//! target only after the whole file's digest matched).
//!
//! Every local folder and file of a download is created through the folder's open descriptor
//! with the kernel's confinement ([`xfer_proto::beneath`]): names come from the server, and a
//! local folder swapped for a symlink during `download -r` must not let a file land outside
//! `--to`. The staging file is created and renamed inside its parent's open descriptor, so
//! the folder checked is the folder written.
//!
//! A download holds its `.part` locked ([`xfer_proto::staging`]), so two downloads to the
//! same target at once cannot write into one file: the second one finds it locked and writes
//! to a private temp file instead (it cannot resume, but it cannot corrupt either).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, OFlags};
use xfer_proto::beneath::Beneath;

/// A local file or folder a download creates: a checked relative path beneath a folder the
/// user named, which is opened once and never left.
#[derive(Debug, Clone)]
pub struct Dest {
    /// The folder the user named (`--to`, or the current folder), opened following links in
    /// its own path, as `cp` would.
    root: Arc<Beneath>,
    /// How the user wrote that folder, for messages.
    root_path: PathBuf,
    /// Names beneath the root, each a checked single component; the last is the file or
    /// folder itself.
    parts: Vec<String>,
}

/// Mode for folders a download creates: what `mkdir` gives, less the umask.
const DIR_MODE: u32 = 0o777;

impl Dest {
    /// `name` inside the folder `root`, which must exist.
    pub fn new(root: &Path, name: &str) -> std::io::Result<Dest> {
        xfer_proto::path::check_name(name).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("`{name}`: {e}"))
        })?;
        Ok(Dest {
            root: Arc::new(Beneath::open_following(root)?),
            root_path: root.to_path_buf(),
            parts: vec![name.to_string()],
        })
    }

    /// The entry `name` inside this folder (`name` must be a checked single component).
    pub fn child(&self, name: &str) -> Dest {
        let mut parts = self.parts.clone();
        parts.push(name.to_string());
        Dest {
            root: self.root.clone(),
            root_path: self.root_path.clone(),
            parts,
        }
    }

    /// The path as the user would write it, for messages.
    pub fn path(&self) -> PathBuf {
        let mut p = self.root_path.clone();
        p.extend(&self.parts);
        p
    }

    fn split(&self) -> (&str, Vec<&str>) {
        let (name, parents) = self.parts.split_last().expect("a Dest names something");
        (name, parents.iter().map(String::as_str).collect())
    }

    /// Creates this folder and any missing folder above it, never through a symlink.
    pub fn create_dir_all(&self) -> std::io::Result<()> {
        let names: Vec<&str> = self.parts.iter().map(String::as_str).collect();
        for i in 0..names.len() {
            match self.root.mkdir_mode(&names[..i], names[i], DIR_MODE) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    // A file, or a symlink, where the folder should be is refused here.
                    self.root.open_dir(&names[..=i])?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The open parent folder and the file's own name.
    fn parent(&self) -> std::io::Result<(OwnedFd, &str)> {
        let (name, parents) = self.split();
        Ok((self.root.open_dir(&parents)?, name))
    }
}

/// A fresh unpredictable number for a temp name (uniqueness comes from `O_EXCL`).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// Where a download to `target` is staged.
pub fn part_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    target.with_file_name(name)
}

/// A staged download.
#[derive(Debug)]
pub struct Part {
    /// The open file (locked if `resumable`).
    pub file: File,
    /// The folder it is in, open: the commit renames inside this very folder.
    dir: OwnedFd,
    /// Its name in that folder.
    name: String,
    /// Bytes already in it from an earlier attempt.
    pub held: u64,
    /// `NAME.part`, kept if the transfer breaks; else a private temp file, deleted.
    pub resumable: bool,
}

impl Part {
    /// Opens `NAME.part` for `dest`, keeping its content when `keep` (to resume) and emptying
    /// it otherwise; falls back to a private temp file when another download holds it.
    pub fn open(dest: &Dest, keep: bool) -> std::io::Result<Part> {
        let (dir, target) = dest.parent()?;
        let name = format!("{target}.part");
        if let Some(file) = xfer_proto::staging::open_locked_at(&dir, Path::new(&name))? {
            let mut held = file.metadata()?.len();
            if !keep && held > 0 {
                file.set_len(0)?;
                held = 0;
            }
            return Ok(Part {
                file,
                dir,
                name,
                held,
                resumable: true,
            });
        }
        // A fresh random name, created exclusively: never an existing file or a link.
        for _ in 0..8 {
            let name = format!(".{target}.{:016x}.xfer-part", random_u64());
            match rustix::fs::openat(
                &dir,
                name.as_str(),
                OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            ) {
                Ok(fd) => {
                    return Ok(Part {
                        file: File::from(fd),
                        dir,
                        name,
                        held: 0,
                        resumable: false,
                    });
                }
                Err(rustix::io::Errno::EXIST) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(std::io::Error::other("cannot find a free temporary name"))
    }

    /// Empties it for a fresh start.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.held = 0;
        Ok(())
    }

    /// Makes it the target: fsync, rename over the target in the same folder, fsync the folder.
    pub fn commit(self, dest: &Dest) -> std::io::Result<()> {
        self.file.sync_all()?;
        let (target, _) = dest.split();
        rustix::fs::renameat(&self.dir, self.name.as_str(), &self.dir, target)?;
        rustix::fs::fsync(&self.dir)?;
        Ok(())
    }

    /// Renames it over the target, in the same folder, without flushing anything: for a
    /// [`GroupCommit`], which made its data durable before and flushes the folder after.
    fn rename_into_place(&self, dest: &Dest) -> std::io::Result<()> {
        let (target, _) = dest.split();
        rustix::fs::renameat(&self.dir, self.name.as_str(), &self.dir, target)?;
        Ok(())
    }

    /// Ends a transfer that failed: a resumable `.part` stays when `keep`, anything else goes.
    pub fn abandon(self, keep: bool) {
        if !(keep && self.resumable) {
            let _ = rustix::fs::unlinkat(&self.dir, self.name.as_str(), AtFlags::empty());
        }
    }
}

/// Downloads staged together and committed together, for many small files: each is written
/// to its `.part` ([`Part::open`]), then one flush makes the data of all of them durable,
/// then each is renamed over its target, then each folder touched is flushed once. Nothing
/// takes its final name before its data is durable, so a crash leaves every target either
/// old or new and complete (and at worst some `.part` files, which the next download of
/// the same name empties). Two flushes per file (file and folder) become one per batch plus
/// one per folder.
pub struct GroupCommit<T> {
    /// What waits for the flush, in the order it was staged.
    staged: Vec<Staged<T>>,
}

/// One staged file of a [`GroupCommit`].
struct Staged<T> {
    part: Part,
    dest: Dest,
    /// The caller's note on it, given back with its outcome.
    tag: T,
}

impl<T> Default for GroupCommit<T> {
    fn default() -> Self {
        GroupCommit { staged: Vec::new() }
    }
}

/// Filesystems whose `syncfs` writes back every dirty page and inode and flushes the
/// device, as `fsync` of each file would (`statfs` magic numbers): ext2/3/4, XFS, Btrfs,
/// F2FS, and tmpfs (nothing to flush). Elsewhere (FUSE, network filesystems) `syncfs` may
/// not reach the storage, so each file gets its own `fdatasync`.
const SYNCFS_FLUSHES_ALL: [u32; 5] = [0xEF53, 0x5846_5342, 0x9123_683E, 0xF2F5_2010, 0x0102_1994];

/// Threads that `fdatasync` the files of a batch where `syncfs` is not trusted: flushes
/// issued together let the filesystem and the device batch them.
const FSYNC_THREADS: usize = 8;

impl<T> GroupCommit<T> {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Files staged and not yet committed.
    pub fn len(&self) -> usize {
        self.staged.len()
    }

    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.staged.is_empty()
    }

    /// Adds a fully written, verified `.part` for `dest`; `tag` comes back with its outcome.
    pub fn push(&mut self, part: Part, dest: Dest, tag: T) {
        self.staged.push(Staged { part, dest, tag });
    }

    /// Makes every staged file durable, renames each into place, flushes each folder once;
    /// returns each tag with its outcome, in the order staged. A file that fails leaves no
    /// `.part` behind. Blocks on the disk: run it off the async threads.
    pub fn commit(self) -> Vec<(T, std::io::Result<()>)> {
        let staged = self.staged;
        let files: Vec<&File> = staged.iter().map(|s| &s.part.file).collect();
        let mut results = make_durable(&files);
        for (s, r) in staged.iter().zip(results.iter_mut()) {
            if r.is_ok() {
                *r = s.part.rename_into_place(&s.dest);
            }
        }
        // Each folder once: its first file's open descriptor stands for it.
        let mut folders: std::collections::HashMap<&[String], Option<std::io::ErrorKind>> =
            std::collections::HashMap::new();
        for (s, r) in staged.iter().zip(results.iter_mut()) {
            if r.is_err() {
                continue;
            }
            let parents = &s.dest.parts[..s.dest.parts.len() - 1];
            let flushed = folders.entry(parents).or_insert_with(|| {
                rustix::fs::fsync(&s.part.dir)
                    .err()
                    .map(|e| std::io::Error::from(e).kind())
            });
            if let Some(kind) = flushed {
                *r = Err(std::io::Error::new(*kind, "flushing the folder failed"));
            }
        }
        staged
            .into_iter()
            .zip(results)
            .map(|(s, r)| {
                if r.is_err() {
                    // Not renamed (a rename that happened is kept: the file is complete).
                    s.part.abandon(false);
                }
                (s.tag, r)
            })
            .collect()
    }
}

/// Flushes the data of every staged file, with one `syncfs` per filesystem where that is
/// trusted and one `fdatasync` per file elsewhere; one outcome per file.
fn make_durable(staged: &[&File]) -> Vec<std::io::Result<()>> {
    use std::os::unix::fs::MetadataExt;
    let mut results: Vec<std::io::Result<()>> = (0..staged.len()).map(|_| Ok(())).collect();
    let mut by_fs: Vec<(u64, Vec<usize>)> = Vec::new();
    for (i, file) in staged.iter().enumerate() {
        match file.metadata() {
            Ok(m) => match by_fs.iter_mut().find(|(dev, _)| *dev == m.dev()) {
                Some((_, files)) => files.push(i),
                None => by_fs.push((m.dev(), vec![i])),
            },
            Err(e) => results[i] = Err(e),
        }
    }
    for (_, files) in by_fs {
        let first = staged[files[0]];
        let trusted = rustix::fs::fstatfs(first)
            .is_ok_and(|st| SYNCFS_FLUSHES_ALL.contains(&(st.f_type as u32)));
        if trusted {
            if let Err(e) = rustix::fs::syncfs(first) {
                for &i in &files {
                    results[i] = Err(e.into());
                }
            }
            continue;
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let outcomes: Vec<(usize, std::io::Result<()>)> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..FSYNC_THREADS.min(files.len()))
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&i) = files.get(k) else { break done };
                            done.push((i, staged[i].sync_data()));
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_else(|_| vec![]))
                .collect()
        });
        let mut flushed = vec![false; staged.len()];
        for (i, r) in outcomes {
            flushed[i] = true;
            results[i] = r;
        }
        for &i in &files {
            if !flushed[i] {
                results[i] = Err(std::io::Error::other("flushing the file failed"));
            }
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_part_is_kept_locked_and_resumed() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("f.bin");
        let dest = Dest::new(d.path(), "f.bin").unwrap();
        assert_eq!(dest.path(), target);
        assert_eq!(part_path(&target), d.path().join("f.bin.part"));
        let mut p = Part::open(&dest, true).unwrap();
        assert!(p.resumable);
        p.file.write_all(b"abc").unwrap();
        // A second download of the same target meanwhile gets a private file.
        let other = Part::open(&dest, true).unwrap();
        assert!(!other.resumable);
        other.abandon(true);
        p.abandon(true);
        let p = Part::open(&dest, true).unwrap();
        assert_eq!(p.held, 3);
        p.commit(&dest).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"abc");
        assert!(!part_path(&target).exists());
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // Not keeping empties it.
        let mut p = Part::open(&dest, true).unwrap();
        p.file.write_all(b"xyz").unwrap();
        p.abandon(true);
        assert_eq!(Part::open(&dest, false).unwrap().held, 0);
    }

    #[test]
    fn a_folder_swapped_for_a_symlink_is_never_followed() {
        let d = tempfile::tempdir().unwrap();
        let to = d.path().join("to");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(&to).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let sub = Dest::new(&to, "sub").unwrap();
        sub.create_dir_all().unwrap();
        let file = sub.child("f");
        // Between planning and writing, someone replaces `to/sub` with a link outwards.
        std::fs::remove_dir(to.join("sub")).unwrap();
        std::os::unix::fs::symlink(&outside, to.join("sub")).unwrap();
        assert!(Part::open(&file, true).is_err());
        assert!(sub.create_dir_all().is_err());
        assert!(sub.child("deeper").create_dir_all().is_err());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        // A folder the user named may itself be a link: that one is followed, as `cp` does.
        let link = d.path().join("link-to-outside");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let f = Dest::new(&link, "g").unwrap();
        Part::open(&f, false).unwrap().commit(&f).unwrap();
        assert!(outside.join("g").exists());
    }

    #[test]
    fn a_group_commit_renames_what_it_can_and_leaves_no_part_behind() {
        let d = tempfile::tempdir().unwrap();
        let top = Dest::new(d.path(), "top").unwrap();
        top.child("sub").create_dir_all().unwrap();
        // A folder where one file should land: its rename fails, the others go on.
        std::fs::create_dir(d.path().join("top/blocked")).unwrap();
        std::fs::write(d.path().join("top/sub/b"), b"old").unwrap();
        let mut batch = GroupCommit::new();
        for (i, name) in ["a", "blocked", "sub/b", "sub/empty"].iter().enumerate() {
            let dest = name.split('/').fold(top.clone(), |d, n| d.child(n));
            let mut part = Part::open(&dest, false).unwrap();
            if !name.ends_with("empty") {
                part.file.write_all(name.as_bytes()).unwrap();
            }
            batch.push(part, dest, i);
        }
        assert_eq!(batch.len(), 4);
        let outcomes: Vec<(usize, bool)> = batch
            .commit()
            .into_iter()
            .map(|(i, r)| (i, r.is_ok()))
            .collect();
        assert_eq!(outcomes, [(0, true), (1, false), (2, true), (3, true)]);
        assert_eq!(std::fs::read(d.path().join("top/a")).unwrap(), b"a");
        assert_eq!(std::fs::read(d.path().join("top/sub/b")).unwrap(), b"sub/b");
        assert_eq!(std::fs::read(d.path().join("top/sub/empty")).unwrap(), b"");
        assert!(d.path().join("top/blocked").is_dir());
        let mut names: Vec<_> = std::fs::read_dir(d.path().join("top"))
            .unwrap()
            .chain(std::fs::read_dir(d.path().join("top/sub")).unwrap())
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["a", "b", "blocked", "empty", "sub"]);
    }

    #[test]
    fn names_with_a_slash_are_refused() {
        let d = tempfile::tempdir().unwrap();
        assert!(Dest::new(d.path(), "trail/").is_err());
        assert!(Dest::new(d.path(), "..").is_err());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
