//! Session tokens: 256 random bits handed to the client at login, stored on the server only as
//! a BLAKE3 hash, persisted (0600, atomic) so sessions survive a restart, expiring after the
//! configured time and revoked by logout, by a password or role change (the account's
//! generation moves on) and by deleting the account.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use argon2::password_hash::rand_core::{OsRng, RngCore};
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::fsutil::{FileStamp, file_stamp};

/// Prefix of every token, so a leaked one is recognisable (as GitHub does with `ghp_`).
pub const TOKEN_PREFIX: &str = "xfer1_";

/// One live session as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionRecord {
    /// Account name.
    pub user: String,
    /// Account generation at login; a later password or role change revokes the session.
    pub generation: u64,
    /// Login time, seconds since the epoch.
    pub created: i64,
    /// Expiry time, seconds since the epoch.
    pub expires: i64,
    /// Address the login came from, for `session list` and audits.
    pub source: String,
}

#[derive(Default, Serialize, Deserialize)]
struct SessionsFile {
    /// Sessions keyed by the hex BLAKE3 of their token.
    sessions: HashMap<String, SessionRecord>,
}

/// The daemon's sessions.
///
/// The file is shared with `xferd session ...` run by an administrator while the daemon runs:
/// every change happens under an exclusive `flock` on `sessions.lock`, re-reads the file if
/// another process replaced it (compared by inode and modification time), applies the change
/// and writes the file atomically. Lookups re-read the file when it changed, so a revocation
/// from the command line takes effect on the next request.
pub struct SessionStore {
    /// The JSON file sessions persist in.
    path: PathBuf,
    /// The lock file serialising writers across processes.
    lock_path: PathBuf,
    /// Live sessions by token hash, and the stamp of the file they came from. The mutex is
    /// never held across an await.
    inner: Mutex<Loaded>,
    /// Lifetime of a new session, in seconds.
    ttl_secs: u64,
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn token_key(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

struct Loaded {
    sessions: HashMap<String, SessionRecord>,
    stamp: Option<FileStamp>,
}

fn read_file(path: &Path) -> std::io::Result<HashMap<String, SessionRecord>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(serde_json::from_slice::<SessionsFile>(&bytes)
            .map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "`{}` is corrupt ({e}); restore it from a backup, or delete it to end every session",
                        path.display()
                    ),
                )
            })?
            .sessions),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashMap::new()),
        Err(e) => Err(e),
    }
}

/// Checks that the sessions file in `state_dir`, if any, is readable and valid; returns how
/// many sessions it holds (for `xferd check`, which must not create anything).
pub fn check_file(state_dir: &Path) -> std::io::Result<usize> {
    Ok(read_file(&state_dir.join("sessions.json"))?.len())
}

/// A short, stable identifier of a session for listings: the first 12 hex digits of its
/// token's hash (never the token).
pub fn short_id(key: &str) -> &str {
    &key[..key.len().min(12)]
}

impl SessionStore {
    /// Opens (or starts) the sessions file in `state_dir`, dropping expired sessions.
    pub fn open(state_dir: &Path, ttl_secs: u64) -> std::io::Result<Self> {
        crate::fsutil::create_dir_with_mode(state_dir, 0o700)?;
        let path = state_dir.join("sessions.json");
        let stamp = file_stamp(&path);
        let mut sessions = read_file(&path)?;
        let t = now();
        sessions.retain(|_, s| s.expires > t);
        Ok(SessionStore {
            lock_path: state_dir.join("sessions.lock"),
            path,
            inner: Mutex::new(Loaded { sessions, stamp }),
            ttl_secs,
        })
    }

    /// Re-reads the file if another process replaced it.
    fn refresh(&self, loaded: &mut Loaded) {
        let stamp = file_stamp(&self.path);
        if stamp == loaded.stamp {
            return;
        }
        match read_file(&self.path) {
            Ok(sessions) => {
                loaded.sessions = sessions;
                loaded.stamp = stamp;
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot re-read sessions; keeping the ones in memory");
                loaded.stamp = stamp;
            }
        }
    }

    /// Runs `change` on the current sessions under the cross-process lock, then saves them
    /// if it returns true.
    fn modify<T>(
        &self,
        change: impl FnOnce(&mut HashMap<String, SessionRecord>) -> (T, bool),
    ) -> T {
        let mut loaded = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path);
        if let Ok(f) = &lock {
            // An administrator (root) creating the lock file gives it to the folder's owner,
            // so the daemon's user can still take it.
            use std::os::unix::fs::MetadataExt;
            if let Some(dir) = self
                .lock_path
                .parent()
                .and_then(|d| std::fs::metadata(d).ok())
            {
                let _ = std::os::unix::fs::fchown(f, Some(dir.uid()), Some(dir.gid()));
            }
            let _ = rustix::fs::flock(f, rustix::fs::FlockOperation::LockExclusive);
        }
        self.refresh(&mut loaded);
        let (out, changed) = change(&mut loaded.sessions);
        if changed {
            let file = SessionsFile {
                sessions: loaded.sessions.clone(),
            };
            let result = serde_json::to_vec_pretty(&file)
                .map_err(std::io::Error::other)
                .and_then(|bytes| crate::fsutil::write_atomic(&self.path, &bytes, 0o600));
            match result {
                Ok(()) => loaded.stamp = file_stamp(&self.path),
                Err(e) => {
                    tracing::error!(path = %self.path.display(), error = %e, "cannot save sessions; they will not survive a restart")
                }
            }
        }
        // The flock is released when `lock` drops.
        drop(lock);
        out
    }

    /// Starts a session and returns its token (the only copy of it) and record.
    pub fn create(&self, user: &str, generation: u64, source: &str) -> (String, SessionRecord) {
        let mut raw = [0u8; 32];
        OsRng.fill_bytes(&mut raw);
        let token = format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
        );
        let created = now();
        let record = SessionRecord {
            user: user.into(),
            generation,
            created,
            expires: created.saturating_add(self.ttl_secs as i64),
            source: source.into(),
        };
        let key = token_key(&token);
        let rec = record.clone();
        self.modify(move |map| {
            map.retain(|_, s| s.expires > created);
            map.insert(key, rec);
            ((), true)
        });
        (token, record)
    }

    /// The session for `token` if it exists, has not expired and its account's current
    /// generation (from `current_generation`) still matches.
    pub fn validate(
        &self,
        token: &str,
        current_generation: impl FnOnce(&str) -> Option<u64>,
    ) -> Option<SessionRecord> {
        let key = token_key(token);
        let record = {
            let mut loaded = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            self.refresh(&mut loaded);
            loaded.sessions.get(&key)?.clone()
        };
        let valid =
            record.expires > now() && current_generation(&record.user) == Some(record.generation);
        if !valid {
            self.modify(|map| ((), map.remove(&key).is_some()));
            return None;
        }
        Some(record)
    }

    /// Ends the session for `token`; true if there was one.
    pub fn revoke(&self, token: &str) -> bool {
        let key = token_key(token);
        self.modify(|map| {
            let removed = map.remove(&key).is_some();
            (removed, removed)
        })
    }

    /// Ends every session whose id starts with `id_prefix` (at least 6 hex digits) or, with
    /// `user`, every session of that user. Returns how many ended.
    pub fn revoke_matching(&self, id_prefix: Option<&str>, user: Option<&str>) -> usize {
        self.modify(|map| {
            let before = map.len();
            map.retain(|key, s| {
                let id_match = id_prefix.is_some_and(|p| key.starts_with(p));
                let user_match = user.is_some_and(|u| s.user == u);
                !(id_match || user_match)
            });
            let n = before - map.len();
            (n, n > 0)
        })
    }

    /// Live sessions as `(id, record)`, oldest first.
    pub fn list(&self) -> Vec<(String, SessionRecord)> {
        let mut loaded = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.refresh(&mut loaded);
        let t = now();
        let mut out: Vec<_> = loaded
            .sessions
            .iter()
            .filter(|(_, s)| s.expires > t)
            .map(|(k, s)| (short_id(k).to_string(), s.clone()))
            .collect();
        out.sort_by(|a, b| a.1.created.cmp(&b.1.created).then(a.0.cmp(&b.0)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_validate_survive_reopen_and_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let store = SessionStore::open(dir.path(), 3600).unwrap();
        let (token, rec) = store.create("alice", 1, "127.0.0.1:5");
        assert!(token.starts_with(TOKEN_PREFIX));
        assert!(token.len() >= TOKEN_PREFIX.len() + 43);
        assert_eq!(store.validate(&token, |_| Some(1)), Some(rec.clone()));
        // The token itself never reaches the disk.
        let on_disk = std::fs::read_to_string(dir.path().join("sessions.json")).unwrap();
        assert!(!on_disk.contains(&token[TOKEN_PREFIX.len()..]));
        let reopened = SessionStore::open(dir.path(), 3600).unwrap();
        assert_eq!(reopened.validate(&token, |_| Some(1)), Some(rec));
        assert!(reopened.revoke(&token));
        assert_eq!(reopened.validate(&token, |_| Some(1)), None);
        assert_eq!(store.validate("xfer1_nonsense", |_| Some(1)), None);
    }

    #[test]
    fn a_new_generation_or_missing_user_revokes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SessionStore::open(dir.path(), 3600).unwrap();
        let (t1, _) = store.create("alice", 1, "x");
        assert_eq!(store.validate(&t1, |_| Some(2)), None);
        assert_eq!(store.validate(&t1, |_| Some(1)), None, "stays revoked");
        let (t2, _) = store.create("bob", 1, "x");
        assert_eq!(store.validate(&t2, |_| None), None);
    }

    #[test]
    fn a_second_process_sees_and_revokes_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = SessionStore::open(dir.path(), 3600).unwrap();
        let (t1, _) = daemon.create("alice", 1, "a");
        let (t2, _) = daemon.create("bob", 1, "b");
        // What `xferd session` does: its own store on the same folder.
        let admin = SessionStore::open(dir.path(), 3600).unwrap();
        let listed = admin.list();
        assert_eq!(listed.len(), 2);
        let alice_id = listed
            .iter()
            .find(|(_, s)| s.user == "alice")
            .unwrap()
            .0
            .clone();
        assert_eq!(alice_id.len(), 12);
        assert!(!alice_id.contains("xfer1_"));
        assert_eq!(admin.revoke_matching(Some(&alice_id), None), 1);
        // The daemon notices the file changed.
        assert_eq!(daemon.validate(&t1, |_| Some(1)), None);
        assert!(daemon.validate(&t2, |_| Some(1)).is_some());
        // And a session the daemon creates later does not resurrect the revoked one.
        let (t3, _) = daemon.create("carol", 1, "c");
        assert_eq!(admin.revoke_matching(None, Some("bob")), 1);
        assert_eq!(daemon.validate(&t2, |_| Some(1)), None);
        assert!(daemon.validate(&t3, |_| Some(1)).is_some());
        assert_eq!(daemon.validate(&t1, |_| Some(1)), None);
    }

    #[test]
    fn expired_sessions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = SessionStore::open(dir.path(), 3600).unwrap();
        let (t, _) = store.create("alice", 1, "x");
        {
            let mut loaded = store.inner.lock().unwrap();
            for rec in loaded.sessions.values_mut() {
                rec.expires = now() - 1;
            }
        }
        assert_eq!(store.validate(&t, |_| Some(1)), None);
    }
}
