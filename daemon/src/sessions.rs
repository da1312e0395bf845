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
pub struct SessionStore {
    /// The JSON file sessions persist in.
    path: PathBuf,
    /// Live sessions by token hash; the lock is never held across an await.
    inner: Mutex<HashMap<String, SessionRecord>>,
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

impl SessionStore {
    /// Opens (or starts) the sessions file in `state_dir`, dropping expired sessions.
    pub fn open(state_dir: &Path, ttl_secs: u64) -> std::io::Result<Self> {
        crate::fsutil::create_dir_with_mode(state_dir, 0o700)?;
        let path = state_dir.join("sessions.json");
        let mut sessions = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice::<SessionsFile>(&bytes)
                    .map_err(|e| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("`{}` is corrupt: {e}", path.display()),
                        )
                    })?
                    .sessions
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(e),
        };
        let t = now();
        sessions.retain(|_, s| s.expires > t);
        Ok(SessionStore {
            path,
            inner: Mutex::new(sessions),
            ttl_secs,
        })
    }

    fn persist(&self, sessions: &HashMap<String, SessionRecord>) {
        let file = SessionsFile {
            sessions: sessions.clone(),
        };
        let result = serde_json::to_vec_pretty(&file)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::fsutil::write_atomic(&self.path, &bytes, 0o600));
        if let Err(e) = result {
            tracing::error!(path = %self.path.display(), error = %e, "cannot save sessions; they will not survive a restart");
        }
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
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, s| s.expires > created);
        map.insert(token_key(&token), record.clone());
        self.persist(&map);
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
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let record = map.get(&key)?.clone();
        let valid =
            record.expires > now() && current_generation(&record.user) == Some(record.generation);
        if !valid {
            map.remove(&key);
            self.persist(&map);
            return None;
        }
        Some(record)
    }

    /// Ends the session for `token`; true if there was one.
    pub fn revoke(&self, token: &str) -> bool {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let removed = map.remove(&token_key(token)).is_some();
        if removed {
            self.persist(&map);
        }
        removed
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when there are no sessions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    fn expired_sessions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = SessionStore::open(dir.path(), 3600).unwrap();
        let (t, _) = store.create("alice", 1, "x");
        {
            let mut map = store.inner.lock().unwrap();
            for rec in map.values_mut() {
                rec.expires = now() - 1;
            }
        }
        assert_eq!(store.validate(&t, |_| Some(1)), None);
    }
}
