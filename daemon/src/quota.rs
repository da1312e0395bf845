//! Quotas: how many bytes and files each user holds, what their uploads in progress have
//! reserved, and the one check every upload path (`Upload`, a resumed upload, `Put`) goes
//! through before its body and again while it runs.
//!
//! What counts against a quota: the user's files (bytes and number), plus every upload in
//! progress at its declared size net of the file it replaces (reserved before its body, under
//! one lock, so racing uploads cannot together pass the quota: they are never over it, not
//! even by a chunk), plus interrupted uploads kept for resume that no running upload holds.
//! A commit turns a reservation into usage (using the size of the file actually replaced); a
//! refused or failed upload gives its reservation back; delete and rename update the count.
//!
//! Local storage: each user's count is a small record in `STATE_DIR/usage/USER.json`,
//! rewritten (atomically, not synced) at each change, so it survives restarts without a
//! rescan. A marker file says a daemon has the records open: found at start, the previous
//! daemon did not stop cleanly and its unsynced records are not trusted (each is rebuilt by
//! one scan of the user's tree when first needed). A record changed by another process
//! (`xferd user usage NAME --rescan`) is noticed by its stamp and read again; a missing one is
//! rebuilt by one scan. s3 mode: no record (other nodes change the same trees); each node
//! counts a user from a listing when first needed and again every `quota.recount_secs`, and
//! reserves its own uploads in progress only (see the README).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::accounts::{Accounts, QuotaSetting};
use crate::config::QuotaSettings;
use crate::fsutil::{FileStamp, file_stamp};
use crate::storage::{StorageError, Tree};

/// Folder under the state folder holding the usage records.
pub const USAGE_DIR: &str = "usage";

/// Present while a daemon has the records open; left behind by a crash.
const OPEN_MARKER: &str = ".open";

/// A user's usage as the record file keeps it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Bytes of the user's files.
    pub bytes: u64,
    /// Number of the user's files.
    pub files: u64,
}

/// The limits in force for one account; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    /// Most bytes.
    pub bytes: Option<u64>,
    /// Most files.
    pub files: Option<u64>,
}

impl Quota {
    /// The quota of `user` now: their own settings in the users file, else the config's
    /// defaults.
    pub fn of(accounts: &Accounts, defaults: &QuotaSettings, user: &str) -> Quota {
        let (bytes, files) = accounts.quota(user).unwrap_or((None, None));
        Quota {
            bytes: QuotaSetting::effective(bytes, defaults.default_bytes),
            files: QuotaSetting::effective(files, defaults.default_files),
        }
    }
}

/// Why an upload was refused: what is used of what (for the client's message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The bytes would pass the byte quota.
    #[error("quota exceeded: {} of {} used", human(*.used), human(*.quota))]
    Bytes {
        /// Bytes counted now (files, uploads in progress, kept partials).
        used: u64,
        /// The byte quota.
        quota: u64,
    },
    /// One more file would pass the file quota.
    #[error("quota exceeded: {used} of {quota} files used")]
    Files {
        /// Files counted now (with uploads in progress that add one).
        used: u64,
        /// The file quota.
        quota: u64,
    },
}

/// Bytes in binary units, one decimal where it says something ("9.8 GiB", "10 GiB").
pub fn human(bytes: u64) -> String {
    bytesize::ByteSize(bytes)
        .display()
        .iec()
        .to_string()
        .replacen(".0 ", " ", 1)
}

/// One user's counts.
#[derive(Debug, Default)]
struct Counted {
    /// Their files.
    stored: Record,
    /// Reserved by uploads in progress: bytes (net of what each replaces).
    reserved_bytes: u64,
    /// Reserved by uploads in progress that add a file.
    reserved_files: u64,
    /// The record file as last written or read here, to notice another writer.
    stamp: Option<FileStamp>,
    /// When `stored` was last counted or read (s3 mode recounts after a while).
    counted_at: Option<Instant>,
}

/// Every user's counts, shared by all connections.
#[derive(Debug)]
pub struct Quotas {
    /// `STATE_DIR/usage`; `None` in s3 mode (nothing persisted).
    dir: Option<PathBuf>,
    /// s3 mode: how old a count may get before it is made again.
    recount: Duration,
    /// Counts by user; only users seen since the start have one.
    users: Mutex<HashMap<String, Counted>>,
    /// One scan at a time per user (a scan is a whole tree's walk): by user, while one runs.
    scans: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Bytes and a file reserved for one upload in progress; given back on drop unless
/// [`Quotas::commit`] turned it into usage.
#[derive(Debug)]
pub struct Reservation {
    /// The counts it belongs to.
    quotas: Arc<Quotas>,
    /// Whose it is.
    user: String,
    /// Bytes reserved.
    bytes: u64,
    /// Files reserved (0 or 1).
    files: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut users = self.quotas.lock();
        if let Some(c) = users.get_mut(&self.user) {
            c.reserved_bytes = c.reserved_bytes.saturating_sub(self.bytes);
            c.reserved_files = c.reserved_files.saturating_sub(self.files);
        }
    }
}

/// What one upload asks to reserve.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    /// Its declared size.
    pub size: u64,
    /// The size of the file it replaces, if known to be one.
    pub replaces: Option<u64>,
}

impl Ask {
    fn bytes(self) -> u64 {
        self.size.saturating_sub(self.replaces.unwrap_or(0))
    }
    fn files(self) -> u64 {
        u64::from(self.replaces.is_none())
    }
}

impl Quotas {
    /// The counts for a daemon with state folder `state_dir`: records there (`Some`, local
    /// storage) or none (s3 mode, recounting after `recount`). Marks the records open; if a
    /// previous daemon left them open (a crash), they are dropped, to be rebuilt by a scan.
    pub fn open(state_dir: Option<&Path>, recount: Duration) -> std::io::Result<Quotas> {
        let dir = match state_dir {
            Some(state) => {
                let dir = state.join(USAGE_DIR);
                crate::fsutil::create_dir_with_mode(&dir, 0o700)?;
                let marker = dir.join(OPEN_MARKER);
                if marker.exists() {
                    let mut dropped = 0;
                    for e in std::fs::read_dir(&dir)?.flatten() {
                        if e.file_name() != OPEN_MARKER && std::fs::remove_file(e.path()).is_ok() {
                            dropped += 1;
                        }
                    }
                    if dropped > 0 {
                        tracing::warn!(
                            records = dropped,
                            "usage records left by a daemon that did not stop cleanly; each is counted again when first needed"
                        );
                    }
                }
                xfer_util::fs::write_private(&marker, b"")?;
                Some(dir)
            }
            None => None,
        };
        Ok(Quotas {
            dir,
            recount,
            users: Mutex::new(HashMap::new()),
            scans: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Counted>> {
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the records durable and marks them closed: the next start trusts them. Called
    /// once connections have ended.
    pub fn close(&self) {
        let Some(dir) = &self.dir else { return };
        let synced = std::fs::File::open(dir).and_then(|d| {
            rustix::fs::syncfs(&d)?;
            Ok(())
        });
        let closed = synced
            .and_then(|()| std::fs::remove_file(dir.join(OPEN_MARKER)))
            .and_then(|()| xfer_util::fs::sync_dir(dir));
        if let Err(e) = closed {
            tracing::warn!(error = %e, "cannot close the usage records; they are counted again at the next start");
        }
    }

    /// Where `user`'s record lives (local storage).
    pub fn record_path(dir: &Path, user: &str) -> PathBuf {
        dir.join(format!("{user}.json"))
    }

    /// Makes sure `user` has a count that can be trusted: read from their record, or made
    /// by one scan of `tree` (record missing or unreadable; s3 mode: none yet, or older than
    /// `quota.recount_secs`). Returns the count.
    pub async fn ensure(&self, user: &str, tree: &Tree) -> Result<Record, StorageError> {
        if let Some(stored) = self.trusted(user) {
            return Ok(stored);
        }
        let gate = self
            .scans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(user.to_string())
            .or_default()
            .clone();
        let counted = {
            let _one = gate.lock().await;
            self.count(user, tree).await
        };
        let mut scans = self.scans.lock().unwrap_or_else(|e| e.into_inner());
        // The last one out removes the gate (the map holds one reference, `gate` another).
        if Arc::strong_count(&gate) <= 2 {
            scans.remove(user);
        }
        counted
    }

    /// [`Quotas::ensure`] once this task is the only one counting `user`.
    async fn count(&self, user: &str, tree: &Tree) -> Result<Record, StorageError> {
        // Another task may have counted meanwhile.
        if let Some(stored) = self.trusted(user) {
            return Ok(stored);
        }
        if let Some(dir) = &self.dir {
            let path = Self::record_path(dir, user);
            let stamp = file_stamp(&path);
            if let Some(record) = read_record(&path) {
                let mut users = self.lock();
                let c = users.entry(user.to_string()).or_default();
                c.stored = record;
                c.stamp = stamp;
                c.counted_at = Some(Instant::now());
                return Ok(record);
            }
        }
        let started = Instant::now();
        let (bytes, files) = tree.scan_usage().await?;
        let record = Record { bytes, files };
        tracing::info!(user = %user, bytes, files, secs = format_args!("{:.3}", started.elapsed().as_secs_f64()), "counted the user's files for their quota");
        let mut users = self.lock();
        let c = users.entry(user.to_string()).or_default();
        c.stored = record;
        c.counted_at = Some(Instant::now());
        self.persist(user, c);
        Ok(record)
    }

    /// `user`'s count if it is in memory and still the truth (its record unchanged on disk,
    /// or in s3 mode recent enough).
    fn trusted(&self, user: &str) -> Option<Record> {
        let mut users = self.lock();
        let c = users.get_mut(user)?;
        let fresh = match &self.dir {
            Some(dir) => {
                c.counted_at.is_some() && file_stamp(&Self::record_path(dir, user)) == c.stamp
            }
            None => c.counted_at.is_some_and(|t| t.elapsed() < self.recount),
        };
        if !fresh {
            c.counted_at = None;
            return None;
        }
        Some(c.stored)
    }

    /// Writes `user`'s record (local storage): atomically, unsynced (see the module notes).
    fn persist(&self, user: &str, c: &mut Counted) {
        let Some(dir) = &self.dir else { return };
        let path = Self::record_path(dir, user);
        match write_record(&path, &c.stored) {
            Ok(()) => c.stamp = file_stamp(&path),
            Err(e) => {
                // Counted again from the tree when next needed.
                tracing::warn!(user = %user, error = %e, "cannot write the usage record");
                c.counted_at = None;
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Reserves room for one upload of `user` under `quota`, or says what is used of what.
    /// `resting` is what their kept partials hold (not held by a running upload). The check
    /// and the reservation are one step under one lock. An upload that adds nothing (a
    /// replacement no bigger than the file it replaces) always passes. Call
    /// [`Quotas::ensure`] first.
    pub fn reserve(
        self: &Arc<Self>,
        user: &str,
        quota: Quota,
        ask: Ask,
        resting: u64,
    ) -> Result<Reservation, Refusal> {
        let (bytes, files) = (ask.bytes(), ask.files());
        let mut users = self.lock();
        let c = users.entry(user.to_string()).or_default();
        let used_bytes = c
            .stored
            .bytes
            .saturating_add(c.reserved_bytes)
            .saturating_add(resting);
        if let Some(max) = quota.bytes
            && bytes > 0
            && used_bytes.saturating_add(bytes) > max
        {
            return Err(Refusal::Bytes {
                used: used_bytes,
                quota: max,
            });
        }
        let used_files = c.stored.files.saturating_add(c.reserved_files);
        if let Some(max) = quota.files
            && files > 0
            && used_files.saturating_add(files) > max
        {
            return Err(Refusal::Files {
                used: used_files,
                quota: max,
            });
        }
        c.reserved_bytes += bytes;
        c.reserved_files += files;
        Ok(Reservation {
            quotas: self.clone(),
            user: user.to_string(),
            bytes,
            files,
        })
    }

    /// Whether `user` is now over `quota` with their files and the uploads in progress (the
    /// quota was lowered, or files came another way), in a way the upload holding `held`
    /// adds to: a running upload re-checks this, and stops. One that adds nothing (a
    /// replacement no bigger than its file) is let finish, as it was let start.
    pub fn over(&self, user: &str, quota: Quota, held: &Reservation) -> Option<Refusal> {
        let users = self.lock();
        let c = users.get(user)?;
        let bytes = c.stored.bytes.saturating_add(c.reserved_bytes);
        let files = c.stored.files.saturating_add(c.reserved_files);
        if let Some(max) = quota.bytes
            && held.bytes > 0
            && bytes > max
        {
            return Some(Refusal::Bytes {
                used: bytes,
                quota: max,
            });
        }
        if let Some(max) = quota.files
            && held.files > 0
            && files > max
        {
            return Some(Refusal::Files {
                used: files,
                quota: max,
            });
        }
        None
    }

    /// Turns `reservation` into usage: a file of `size` bytes now stored, replacing one of
    /// `replaced` bytes (`None`: a new file).
    pub fn commit(&self, reservation: Reservation, size: u64, replaced: Option<u64>) {
        self.commit_all(vec![(reservation, size, replaced)]);
    }

    /// [`Quotas::commit`] for the files of one batch (all of one user), with one write of
    /// their record.
    pub fn commit_all(&self, done: Vec<(Reservation, u64, Option<u64>)>) {
        let Some((first, _, _)) = done.first() else {
            return;
        };
        let user = first.user.clone();
        self.changed(&user, |r| {
            for (_, size, replaced) in &done {
                r.bytes = r
                    .bytes
                    .saturating_add(*size)
                    .saturating_sub(replaced.unwrap_or(0));
                if replaced.is_none() {
                    r.files += 1;
                }
            }
        });
        // Dropped after the change, so the room is never counted twice nor free twice.
        drop(done);
    }

    /// A file of `size` bytes of `user`'s is gone (deleted, or replaced by a rename).
    pub fn removed(&self, user: &str, size: u64) {
        self.changed(user, |r| {
            r.bytes = r.bytes.saturating_sub(size);
            r.files = r.files.saturating_sub(1);
        });
    }

    /// Applies `f` to `user`'s count and writes it, if the count is in memory; otherwise
    /// their record is dropped, to be rebuilt by a scan (it no longer says the truth).
    fn changed(&self, user: &str, f: impl FnOnce(&mut Record)) {
        let mut users = self.lock();
        match users.get_mut(user) {
            Some(c) if c.counted_at.is_some() => {
                f(&mut c.stored);
                self.persist(user, c);
            }
            _ => {
                if let Some(dir) = &self.dir {
                    let _ = std::fs::remove_file(Self::record_path(dir, user));
                }
            }
        }
    }

    /// `user`'s usage as a quota counts it: their files plus the uploads in progress
    /// (`resting`: their kept partials), for `Account` and `xferd user usage`.
    pub fn used(&self, user: &str, resting: u64) -> Record {
        let users = self.lock();
        users.get(user).map_or(Record::default(), |c| Record {
            bytes: c
                .stored
                .bytes
                .saturating_add(c.reserved_bytes)
                .saturating_add(resting),
            files: c.stored.files.saturating_add(c.reserved_files),
        })
    }
}

/// An account's usage and quota as `xferd user` shows them.
#[derive(Debug, Clone, Copy)]
pub struct AdminUsage {
    /// The account's files (not what uploads in progress hold: that is the daemon's).
    pub used: Record,
    /// The quota in force.
    pub quota: Quota,
}

impl AdminUsage {
    /// "used 1.2 GiB of 10.0 GiB, 312 of 10000 files" (no "of" part where unlimited).
    pub fn text(&self) -> String {
        let bytes = match self.quota.bytes {
            Some(q) => format!("{} of {}", human(self.used.bytes), human(q)),
            None => format!("{} (no byte quota)", human(self.used.bytes)),
        };
        let files = match self.quota.files {
            Some(q) => format!("{} of {q} files", self.used.files),
            None => format!("{} files (no file quota)", self.used.files),
        };
        format!("used {bytes}, {files}")
    }

    /// The JSON `xferd user usage --json` prints (and `user list --json` per account).
    pub fn to_json(&self, name: &str) -> serde_json::Value {
        serde_json::json!({
            "name": name,
            "used_bytes": self.used.bytes,
            "used_files": self.used.files,
            "quota_bytes": self.quota.bytes,
            "quota_files": self.quota.files,
        })
    }
}

/// `name`'s usage for `xferd user`: local storage reads their record (counting their folder
/// and writing the record when it is missing, or with `rescan`); s3 mode counts from a
/// listing of the store.
pub async fn admin_usage(
    config: &crate::config::Config,
    users: &crate::accounts::UsersFile,
    name: &str,
    rescan: bool,
) -> anyhow::Result<AdminUsage> {
    use anyhow::Context;
    let (bytes, files) = users
        .users
        .get(name)
        .map_or((None, None), |r| (r.quota_bytes, r.quota_files));
    let quota = Quota {
        bytes: QuotaSetting::effective(bytes, config.quota.default_bytes),
        files: QuotaSetting::effective(files, config.quota.default_files),
    };
    let used = if config.storage.kind == crate::config::StorageKind::S3 {
        let store = crate::storage::Store::open(config)?;
        let tree = store
            .user_tree(name)
            .await
            .with_context(|| format!("opening the files of `{name}`"))?;
        let (bytes, files) = tree
            .scan_usage()
            .await
            .with_context(|| format!("counting the files of `{name}` in the object store"))?;
        Record { bytes, files }
    } else {
        let dir = config.state_dir.join(USAGE_DIR);
        let path = Quotas::record_path(&dir, name);
        match read_record(&path).filter(|_| !rescan) {
            Some(r) => r,
            None => {
                let folder = config.root.join(name);
                let counted = tokio::task::spawn_blocking(move || scan_folder(&folder))
                    .await?
                    .with_context(|| format!("counting the files of `{name}`"))?;
                if config.state_dir.is_dir() {
                    crate::fsutil::create_dir_with_mode(&dir, 0o700)?;
                    write_record(&path, &counted)
                        .with_context(|| format!("writing `{}`", path.display()))?;
                }
                counted
            }
        }
    };
    Ok(AdminUsage { used, quota })
}

/// Counts the regular files under a user's local folder and their bytes, following no
/// link (what the daemon's listing counts): for `xferd user`, which must not open the
/// storage root as the daemon does (that clears its temp files).
pub fn scan_folder(folder: &Path) -> std::io::Result<Record> {
    let mut record = Record::default();
    let mut folders = vec![folder.to_path_buf()];
    while let Some(dir) = folders.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(it) => it,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in entries {
            let e = e?;
            let meta = match std::fs::symlink_metadata(e.path()) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if meta.is_dir() {
                folders.push(e.path());
            } else if meta.is_file() {
                record.bytes = record.bytes.saturating_add(meta.len());
                record.files += 1;
            }
        }
    }
    Ok(record)
}

/// Reads a record; `None` if it is missing or unreadable (then it is counted again).
pub fn read_record(path: &Path) -> Option<Record> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes a record atomically (a temp file renamed over it), without syncing: the open
/// marker covers a crash (see the module notes).
pub fn write_record(path: &Path, record: &Record) -> std::io::Result<()> {
    use std::io::Write;
    let dir = xfer_util::fs::parent_dir(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(".usage-tmp")
        .tempfile_in(dir)?;
    tmp.write_all(serde_json::to_string(record)?.as_bytes())?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quotas() -> (tempfile::TempDir, Arc<Quotas>) {
        let dir = tempfile::tempdir().unwrap();
        let q = Quotas::open(Some(dir.path()), Duration::from_secs(300)).unwrap();
        (dir, Arc::new(q))
    }

    fn loaded(q: &Quotas, user: &str, record: Record) {
        let mut users = q.lock();
        let c = users.entry(user.into()).or_default();
        c.stored = record;
        c.counted_at = Some(Instant::now());
    }

    #[test]
    fn racing_reservations_never_pass_the_quota_together() {
        let (_d, q) = quotas();
        loaded(
            &q,
            "alice",
            Record {
                bytes: 90,
                files: 1,
            },
        );
        let quota = Quota {
            bytes: Some(100),
            files: None,
        };
        let ask = Ask {
            size: 6,
            replaces: None,
        };
        let first = q.reserve("alice", quota, ask, 0).unwrap();
        let second = q.reserve("alice", quota, ask, 0).unwrap_err();
        assert_eq!(
            second,
            Refusal::Bytes {
                used: 96,
                quota: 100
            }
        );
        assert_eq!(second.to_string(), "quota exceeded: 96 B of 100 B used");
        // A failed upload gives its room back; a committed one turns it into usage.
        drop(first);
        let again = q.reserve("alice", quota, ask, 0).unwrap();
        q.commit(again, 6, None);
        assert_eq!(
            q.used("alice", 0),
            Record {
                bytes: 96,
                files: 2
            }
        );
        // Kept partials count too; a replacement that adds nothing always passes.
        assert!(
            q.reserve(
                "alice",
                quota,
                Ask {
                    size: 1,
                    replaces: None
                },
                4
            )
            .is_err()
        );
        q.reserve(
            "alice",
            quota,
            Ask {
                size: 6,
                replaces: Some(6),
            },
            4,
        )
        .unwrap();
    }

    #[test]
    fn the_file_count_is_a_quota_of_its_own() {
        let (_d, q) = quotas();
        loaded(&q, "bob", Record { bytes: 0, files: 2 });
        let quota = Quota {
            bytes: None,
            files: Some(3),
        };
        let new = Ask {
            size: 1,
            replaces: None,
        };
        let held = q.reserve("bob", quota, new, 0).unwrap();
        let e = q.reserve("bob", quota, new, 0).unwrap_err();
        assert_eq!(e.to_string(), "quota exceeded: 3 of 3 files used");
        // Replacing a file adds none.
        q.reserve(
            "bob",
            quota,
            Ask {
                size: 1,
                replaces: Some(0),
            },
            0,
        )
        .unwrap();
        drop(held);
        q.removed("bob", 0);
        assert_eq!(q.used("bob", 0).files, 1);
    }

    #[test]
    fn records_survive_a_clean_stop_and_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let q = Quotas::open(Some(dir.path()), Duration::from_secs(1)).unwrap();
        loaded(&q, "alice", Record::default());
        let q = Arc::new(q);
        let r = q
            .reserve(
                "alice",
                Quota::default(),
                Ask {
                    size: 5,
                    replaces: None,
                },
                0,
            )
            .unwrap();
        q.commit(r, 5, None);
        let path = Quotas::record_path(&dir.path().join(USAGE_DIR), "alice");
        assert_eq!(read_record(&path), Some(Record { bytes: 5, files: 1 }));
        q.close();
        // A clean start keeps it.
        let q = Quotas::open(Some(dir.path()), Duration::from_secs(1)).unwrap();
        assert_eq!(read_record(&path), Some(Record { bytes: 5, files: 1 }));
        // A start after a crash (the marker still there) drops it.
        drop(q);
        Quotas::open(Some(dir.path()), Duration::from_secs(1)).unwrap();
        assert_eq!(read_record(&path), None);
    }

    #[test]
    fn a_lowered_quota_is_noticed_by_running_uploads() {
        let (_d, q) = quotas();
        loaded(
            &q,
            "alice",
            Record {
                bytes: 10,
                files: 1,
            },
        );
        let r = q
            .reserve(
                "alice",
                Quota::default(),
                Ask {
                    size: 50,
                    replaces: None,
                },
                0,
            )
            .unwrap();
        let lowered = Quota {
            bytes: Some(40),
            files: None,
        };
        assert_eq!(
            q.over("alice", lowered, &r),
            Some(Refusal::Bytes {
                used: 60,
                quota: 40
            })
        );
        assert_eq!(q.over("alice", Quota::default(), &r), None);
        // A replacement that adds nothing goes on.
        let same = q
            .reserve(
                "alice",
                lowered,
                Ask {
                    size: 5,
                    replaces: Some(5),
                },
                0,
            )
            .unwrap();
        assert_eq!(q.over("alice", lowered, &same), None);
    }

    /// Stores `data` at `remote` in `tree` as a batch of one.
    async fn put(tree: &Tree, remote: &str, data: &[u8]) {
        let cache = crate::storage::StageCache::default();
        let staged = tree.stage(remote, data.to_vec(), &cache).await.unwrap();
        for (_, r) in tree.commit_batch(vec![staged]).await.unwrap() {
            r.unwrap();
        }
    }

    #[tokio::test]
    async fn a_count_is_made_once_then_kept_and_made_again_when_its_record_goes() {
        use crate::storage::tests::{BACKENDS, fixture};
        for &b in BACKENDS {
            let fx = fixture(b).await;
            let t = &fx.tree;
            put(t, "a", &[1; 100]).await;
            put(t, "d/e/b", &[2; 20]).await;
            t.mkdir("empty").await.unwrap();
            assert_eq!(t.scan_usage().await.unwrap(), (120, 2), "{b:?}");
            assert_eq!(t.file_size("d/e/b").await.unwrap(), Some(20), "{b:?}");
            assert_eq!(t.file_size("d").await.unwrap(), None, "{b:?}");
            assert_eq!(t.file_size("nothing").await.unwrap(), None, "{b:?}");
            assert_eq!(
                t.file_sizes(vec!["a".into(), "zz/y".into()]).await,
                vec![Some(100), None],
                "{b:?}"
            );
            let state = tempfile::tempdir().unwrap();
            let q = Quotas::open(Some(state.path()), Duration::from_secs(300)).unwrap();
            let first = q.ensure("alice", t).await.unwrap();
            assert_eq!(
                first,
                Record {
                    bytes: 120,
                    files: 2
                },
                "{b:?}"
            );
            // Kept: a file added behind the daemon's back is not seen...
            put(t, "c", &[3; 5]).await;
            assert_eq!(q.ensure("alice", t).await.unwrap(), first, "{b:?}");
            // ...until the record goes (or is rewritten, as `--rescan` does).
            std::fs::remove_file(Quotas::record_path(&state.path().join(USAGE_DIR), "alice"))
                .unwrap();
            assert_eq!(
                q.ensure("alice", t).await.unwrap(),
                Record {
                    bytes: 125,
                    files: 3
                },
                "{b:?}"
            );
            // s3 mode keeps nothing on disk and counts again after `recount`.
            let q = Quotas::open(None, Duration::ZERO).unwrap();
            assert_eq!(q.ensure("alice", t).await.unwrap().files, 3, "{b:?}");
            put(t, "f", &[4; 1]).await;
            assert_eq!(q.ensure("alice", t).await.unwrap().files, 4, "{b:?}");
        }
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(10 << 30), "10 GiB");
        assert_eq!(human(9_800_000_000), "9.1 GiB");
    }
}
