//! The partial-upload store: data of interrupted uploads, kept invisible under
//! `ROOT/.xfer-partial/USER/` so that the next upload of the same path resumes instead of
//! starting over, and deleted when it expires.
//!
//! One file per (user, remote path), named by the BLAKE3 of the path, so nothing a user
//! chooses becomes a file name here. The upload that owns a partial holds it locked
//! ([`xfer_proto::staging`]); a second upload of the same path at the same time finds it
//! locked and stages an ordinary temp file instead.
//!
//! Partials are not fsynced: after a power loss one may hold garbage, which is harmless,
//! because a resume only happens when the client's digest of its own prefix equals the
//! server's digest of what it holds.
//!
//! Each user's partials are bounded in number ([`MAX_PARTIALS_PER_USER`]) and in bytes
//! (`limits.max_partial_bytes_per_user`, see [`PartialBudget`]): a running resumable upload
//! reserves its whole declared size, since that is what its partial may grow to, and a kept
//! one counts its size on disk. The user's oldest kept partials make room for a new upload;
//! one that still does not fit runs in a plain temp file, not resumable. So at rest a user's
//! partials never hold more than the budget, and [`PartialDir::usage`] is the figure a quota
//! adds to the user's visible files.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use xfer_proto::staging::{open_locked, still_named, try_lock};

/// Folder under the storage root that holds partial uploads. User names cannot start with
/// `.`, so it never collides with a user's tree.
pub const PARTIAL_DIR: &str = ".xfer-partial";

/// Most partial uploads kept per user; starting one more deletes that user's oldest.
pub const MAX_PARTIALS_PER_USER: usize = 64;

/// A user's folder of partial uploads.
#[derive(Debug, Clone)]
pub struct PartialDir {
    /// `ROOT/.xfer-partial/USER`.
    dir: PathBuf,
    /// Reservations of running uploads (all users of the root).
    budget: Arc<PartialBudget>,
}

/// A partial upload opened and locked by this process.
#[derive(Debug)]
pub struct Partial {
    /// The data; the `flock` lives as long as this handle (and its clones).
    pub file: File,
    /// Its folder (for the commit's rename).
    pub dir: PathBuf,
    /// Its name in that folder.
    pub name: String,
    /// Bytes it holds that may be resumed (0 after expiry or a reset).
    pub held: u64,
    /// Its share of the user's byte budget, given back when the upload ends.
    pub reservation: Reservation,
}

/// What [`PartialDir::open`] found.
#[derive(Debug)]
pub enum Opened {
    /// The partial, locked and counted in the budget.
    Partial(Partial),
    /// Another upload of the same path holds it.
    Held,
    /// Keeping this upload's data would pass the user's byte budget, even after deleting
    /// their older partials: it must run unresumable.
    OverBudget,
}

/// Bytes reserved by running resumable uploads, by partial file, shared by every user's
/// [`PartialDir`] of one storage root. The lock also makes a user's check-and-reserve one
/// step, so two uploads starting at once cannot both take the last room.
#[derive(Debug, Default)]
pub struct PartialBudget {
    /// Declared size of each running resumable upload, by its partial's path.
    reserved: Mutex<HashMap<PathBuf, u64>>,
}

impl PartialBudget {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, u64>> {
        self.reserved.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running upload's share of its user's partial budget; given back on drop.
#[derive(Debug)]
pub struct Reservation {
    /// The budget it was taken from.
    budget: Arc<PartialBudget>,
    /// The partial it is for.
    path: PathBuf,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.lock().remove(&self.path);
    }
}

/// One of a user's partials as the budget sees it.
struct Counted {
    /// Last write (eviction order: oldest first).
    modified: SystemTime,
    /// Its path.
    path: PathBuf,
    /// Bytes it counts: the reservation of a running upload, else its size on disk.
    bytes: u64,
    /// Whether nobody holds it, so it may be deleted to make room. [`PartialDir::counted`]
    /// only rules out running uploads of ours; [`PartialDir::open`] checks the file locks
    /// when it needs room.
    resting: bool,
}

fn is_expired(meta: &std::fs::Metadata, ttl: Duration) -> bool {
    meta.modified()
        .ok()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .is_some_and(|age| age > ttl)
}

impl PartialDir {
    /// The partial-upload folder of `user` under the storage `root` (created on first use),
    /// counted against `budget`.
    pub fn new(root: &Path, user: &str, budget: Arc<PartialBudget>) -> PartialDir {
        PartialDir {
            dir: root.join(PARTIAL_DIR).join(user),
            budget,
        }
    }

    /// The file name for a remote path (its canonical `a/b/c` form).
    pub fn name_for(remote: &str) -> String {
        blake3::hash(remote.as_bytes()).to_hex().to_string()
    }

    /// Opens (creating if needed) and locks the partial for `remote`, for an upload of `size`
    /// bytes, within `max_bytes` for all of this user's partials (see the module notes). A
    /// partial older than `ttl` is emptied first.
    pub fn open(
        &self,
        remote: &str,
        ttl: Duration,
        size: u64,
        max_bytes: u64,
    ) -> std::io::Result<Opened> {
        if size > max_bytes {
            // It could never fit: do not delete anything for it.
            return Ok(Opened::OverBudget);
        }
        crate::fsutil::create_dir_with_mode(&self.dir, 0o700)?;
        let name = Self::name_for(remote);
        let path = self.dir.join(&name);
        if !path.exists() {
            self.make_room()?;
        }
        let Some(file) = open_locked(&path)? else {
            return Ok(Opened::Held);
        };
        let meta = file.metadata()?;
        let mut held = meta.len();
        if held > 0 && is_expired(&meta, ttl) {
            file.set_len(0)?;
            held = 0;
        }
        let mut reserved = self.budget.lock();
        let mut others = self.counted(&reserved, &path)?;
        let mut used: u64 = others.iter().map(|c| c.bytes).sum();
        if used.saturating_add(size) > max_bytes {
            // Only now is it worth knowing which kept ones nobody holds (an open and a lock
            // try each).
            for c in others.iter_mut().filter(|c| c.resting) {
                c.resting = !is_locked(&c.path);
            }
        }
        let evictable: u64 = others.iter().filter(|c| c.resting).map(|c| c.bytes).sum();
        if (used - evictable).saturating_add(size) > max_bytes {
            // Running uploads alone leave no room: deleting kept data would not help.
            return Ok(Opened::OverBudget);
        }
        others.sort_by_key(|c| c.modified);
        for old in others.iter().filter(|c| c.resting) {
            if used.saturating_add(size) <= max_bytes {
                break;
            }
            if remove_if_unlocked(&old.path, |_| true)? {
                used -= old.bytes;
            }
        }
        if used.saturating_add(size) > max_bytes {
            return Ok(Opened::OverBudget);
        }
        reserved.insert(path.clone(), size);
        drop(reserved);
        Ok(Opened::Partial(Partial {
            file,
            dir: self.dir.clone(),
            name,
            held,
            reservation: Reservation {
                budget: self.budget.clone(),
                path,
            },
        }))
    }

    /// Every partial of this user but `except`, as the budget counts it.
    fn counted(
        &self,
        reserved: &HashMap<PathBuf, u64>,
        except: &Path,
    ) -> std::io::Result<Vec<Counted>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(it) => it,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for e in entries.filter_map(|e| e.ok()) {
            let path = e.path();
            if path == except {
                continue;
            }
            let Ok(meta) = e.metadata() else { continue };
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            let (bytes, resting) = match reserved.get(&path) {
                Some(&r) => (r.max(meta.len()), false),
                // Held by no upload of ours: resting, unless another process (or a dying
                // upload's writer) still has it locked, which is checked only when needed.
                None => (meta.len(), true),
            };
            out.push(Counted {
                modified,
                path,
                bytes,
                resting,
            });
        }
        Ok(out)
    }

    /// Bytes this user's partials count against the budget now: kept ones at their size,
    /// running uploads at their declared size. What a quota adds to the user's files.
    pub fn usage(&self) -> std::io::Result<u64> {
        let reserved = self.budget.lock();
        Ok(self
            .counted(&reserved, Path::new(""))?
            .iter()
            .map(|c| c.bytes)
            .sum())
    }

    /// Bytes of this user's kept partials that no running upload of this process holds: what
    /// a quota adds to the reservations of the uploads in progress, which count their own.
    pub fn resting_usage(&self) -> std::io::Result<u64> {
        let reserved = self.budget.lock();
        Ok(self
            .counted(&reserved, Path::new(""))?
            .iter()
            .filter(|c| c.resting)
            .map(|c| c.bytes)
            .sum())
    }

    /// Keeps the folder under [`MAX_PARTIALS_PER_USER`] by deleting the oldest unlocked ones.
    fn make_room(&self) -> std::io::Result<()> {
        let mut entries: Vec<(SystemTime, PathBuf)> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((m.modified().ok()?, e.path()))
            })
            .collect();
        if entries.len() < MAX_PARTIALS_PER_USER {
            return Ok(());
        }
        entries.sort();
        let excess = entries.len() + 1 - MAX_PARTIALS_PER_USER;
        for (_, path) in entries.into_iter().take(excess) {
            remove_if_unlocked(&path, |_| true)?;
        }
        Ok(())
    }
}

/// Whether some open handle (any process) holds the lock on `path`; a file that cannot be
/// opened counts as not locked (there is nothing to protect).
fn is_locked(path: &Path) -> bool {
    OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .and_then(|f| try_lock(&f))
        .is_ok_and(|free| !free)
}

/// Deletes `path` if no upload holds it and `pred` agrees; true if it was deleted.
fn remove_if_unlocked(
    path: &Path,
    pred: impl Fn(&std::fs::Metadata) -> bool,
) -> std::io::Result<bool> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if !try_lock(&file)? || !still_named(&file, path)? || !pred(&file.metadata()?) {
        return Ok(false);
    }
    std::fs::remove_file(path)?;
    Ok(true)
}

/// Deletes every partial upload under `root` older than `ttl` that no upload holds; returns
/// how many it deleted. Run at start and then periodically.
pub fn sweep(root: &Path, ttl: Duration) -> std::io::Result<usize> {
    let base = root.join(PARTIAL_DIR);
    let users = match std::fs::read_dir(&base) {
        Ok(it) => it,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for user in users.filter_map(|e| e.ok()) {
        if !user.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(files) = std::fs::read_dir(user.path()) else {
            continue;
        };
        for f in files.filter_map(|e| e.ok()) {
            match remove_if_unlocked(&f.path(), |m| is_expired(m, ttl)) {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot expire a partial upload"),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const DAY: Duration = Duration::from_secs(86400);
    const NO_LIMIT: u64 = u64::MAX;

    fn dir(root: &Path, user: &str) -> PartialDir {
        PartialDir::new(root, user, Default::default())
    }

    impl Opened {
        fn partial(self) -> Option<Partial> {
            match self {
                Opened::Partial(p) => Some(p),
                _ => None,
            }
        }
    }

    impl PartialDir {
        /// The old call: any size, no byte limit.
        fn open_any(&self, remote: &str, ttl: Duration) -> Option<Partial> {
            self.open(remote, ttl, 0, NO_LIMIT).unwrap().partial()
        }
    }

    #[test]
    fn a_partial_survives_its_handle_and_is_found_again() {
        let d = tempfile::tempdir().unwrap();
        let pd = dir(d.path(), "alice");
        let mut p = pd.open_any("a/b", DAY).unwrap();
        assert_eq!(p.held, 0);
        p.file.write_all(b"12345").unwrap();
        // Locked while held: a second upload of the same path gets nothing.
        assert!(pd.open_any("a/b", DAY).is_none());
        drop(p);
        let p = pd.open_any("a/b", DAY).unwrap();
        assert_eq!(p.held, 5);
        // Another path is another partial.
        assert_eq!(pd.open_any("a/c", DAY).unwrap().held, 0);
    }

    #[test]
    fn expired_partials_are_emptied_on_open_and_swept() {
        let d = tempfile::tempdir().unwrap();
        let pd = dir(d.path(), "alice");
        let mut p = pd.open_any("f", DAY).unwrap();
        p.file.write_all(b"old data").unwrap();
        drop(p);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(pd.open_any("f", Duration::from_millis(1)).unwrap().held, 0);
        let mut p = pd.open_any("g", DAY).unwrap();
        p.file.write_all(b"x").unwrap();
        // Held ones are never swept, whatever their age.
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(sweep(d.path(), Duration::from_millis(1)).unwrap(), 1);
        drop(p);
        assert_eq!(sweep(d.path(), Duration::from_millis(1)).unwrap(), 1);
        assert_eq!(sweep(d.path(), DAY).unwrap(), 0);
    }

    #[test]
    fn each_user_keeps_a_bounded_number() {
        let d = tempfile::tempdir().unwrap();
        let pd = dir(d.path(), "alice");
        for i in 0..MAX_PARTIALS_PER_USER + 5 {
            drop(pd.open_any(&format!("f{i}"), DAY).unwrap());
        }
        let n = std::fs::read_dir(d.path().join(PARTIAL_DIR).join("alice"))
            .unwrap()
            .count();
        assert_eq!(n, MAX_PARTIALS_PER_USER);
    }

    /// Opens `remote` for an upload of `size` and writes `written` bytes into it, as an
    /// interrupted upload would, then lets go.
    fn interrupted(pd: &PartialDir, remote: &str, size: u64, written: usize, max: u64) {
        let mut p = pd.open(remote, DAY, size, max).unwrap().partial().unwrap();
        p.file.write_all(&vec![1u8; written]).unwrap();
    }

    fn kept(root: &Path, user: &str) -> (usize, u64) {
        let files: Vec<_> = std::fs::read_dir(root.join(PARTIAL_DIR).join(user))
            .unwrap()
            .flatten()
            .collect();
        let bytes = files.iter().map(|e| e.metadata().unwrap().len()).sum();
        (files.len(), bytes)
    }

    #[test]
    fn each_user_keeps_a_bounded_number_of_bytes_oldest_evicted_first() {
        let d = tempfile::tempdir().unwrap();
        let pd = dir(d.path(), "alice");
        let max = 1000;
        interrupted(&pd, "a", 400, 400, max);
        std::thread::sleep(Duration::from_millis(20));
        interrupted(&pd, "b", 400, 300, max);
        assert_eq!(pd.usage().unwrap(), 700);
        // 500 more do not fit beside 700: the oldest ("a") goes, "b" stays.
        std::thread::sleep(Duration::from_millis(20));
        interrupted(&pd, "c", 500, 500, max);
        assert_eq!(kept(d.path(), "alice"), (2, 800));
        assert_eq!(pd.open_any("b", DAY).unwrap().held, 300);
        // Bigger than the whole budget: never resumable, and nothing is deleted for it.
        assert!(matches!(
            pd.open("huge", DAY, max + 1, max).unwrap(),
            Opened::OverBudget
        ));
        assert_eq!(kept(d.path(), "alice"), (2, 800));
        // Another user's budget is their own.
        let bob = PartialDir::new(d.path(), "bob", pd.budget.clone());
        interrupted(&bob, "a", 1000, 1000, max);
        assert_eq!(kept(d.path(), "alice"), (2, 800));
    }

    #[test]
    fn running_uploads_count_at_their_declared_size_and_are_never_evicted() {
        let d = tempfile::tempdir().unwrap();
        let pd = dir(d.path(), "alice");
        let max = 1000;
        // Running: 10 bytes on disk so far, but it may grow to 600.
        let running = pd.open("a", DAY, 600, max).unwrap().partial().unwrap();
        running.file.set_len(10).unwrap();
        assert_eq!(pd.usage().unwrap(), 600);
        // A kept one, resting.
        interrupted(&pd, "kept", 300, 300, max);
        // 500 more would pass the budget even without the kept one, and the running one
        // cannot make room: nothing is deleted for nothing.
        assert!(matches!(
            pd.open("b", DAY, 500, max).unwrap(),
            Opened::OverBudget
        ));
        assert_eq!(pd.usage().unwrap(), 900);
        std::fs::remove_file(pd.dir.join(PartialDir::name_for("kept"))).unwrap();
        assert!(pd.open("b", DAY, 400, max).unwrap().partial().is_some());
        // Once it ends, only what it wrote counts.
        drop(running);
        assert_eq!(pd.usage().unwrap(), 10);
    }
}
