//! Accounts: the users file (names, roles, argon2id hashes) and password verification.
//!
//! Hashes are PHC strings at OWASP's argon2id parameters. A weak or malformed hash stops the
//! load with a message naming the user, because a daemon that silently accepts a weak hash is
//! worse than one that refuses to start. Verification is CPU- and memory-heavy (19 MiB each), so
//! it runs on [`crate::password`]'s fixed pool of threads with a bounded queue, and unknown users
//! are verified against a dummy hash so that timing does not reveal which names exist.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use serde::{Deserialize, Serialize};
use xfer_proto::Role;
use xfer_proto::limits::{MAX_PASSWORD_LEN, MAX_USER_LEN};
use xfer_util::fs::{Mode, write_atomic};

use crate::fsutil::{FileStamp, file_stamp};
use crate::password::{Checked, DUMMY_HASH, PasswordPool, Verifier};

/// OWASP's recommended argon2id memory cost, in KiB.
pub const ARGON2_M_KIB: u32 = 19_456;
/// OWASP's recommended argon2id iteration count.
pub const ARGON2_T: u32 = 2;
/// OWASP's recommended argon2id parallelism.
pub const ARGON2_P: u32 = 1;

/// Why the users file or an account operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The users file could not be read or written.
    #[error("users file `{path}`: {source}")]
    Io {
        /// The users file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The users file is not valid TOML or has unknown keys.
    #[error("users file `{path}`: {message}")]
    Parse {
        /// The users file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A user's entry is unacceptable (bad name, weak or malformed hash).
    #[error("users file `{path}`: user `{user}`: {problem}")]
    BadUser {
        /// The users file.
        path: PathBuf,
        /// The user's name, as written.
        user: String,
        /// What is wrong.
        problem: String,
    },
    /// A user name that may not be used.
    #[error("invalid user name `{0}`: {1}")]
    BadName(String, &'static str),
    /// The account exists already.
    #[error("user `{0}` already exists")]
    Exists(String),
    /// No such account.
    #[error("no user named `{0}` (`xferd user list` shows the accounts)")]
    NoSuchUser(String),
    /// The password is unacceptable.
    #[error("{0}")]
    BadPassword(&'static str),
    /// Hashing failed.
    #[error("hashing the password failed: {0}")]
    Hash(String),
    /// The threads that check passwords could not be started.
    #[error("starting the password-check threads: {0}")]
    Threads(std::io::Error),
    /// `xferd user import` would replace the accounts already in the object store.
    #[error(
        "the object store already holds {0} account(s); pass --replace to overwrite them with the file's"
    )]
    StoreHasUsers(usize),
    /// The object store could not be read (in s3 mode).
    #[error("reading the accounts from the object store: {0}")]
    Store(String),
    /// The object store has no users object yet (in s3 mode).
    #[error(
        "the object store holds no accounts yet: put the local users file there with `xferd user import FILE`, or add one with `xferd user add NAME`"
    )]
    NoUsersInStore,
    /// A public key that cannot be a login key.
    #[error("bad public key: {0}")]
    BadKey(String),
    /// The account has this key already.
    #[error("user `{user}` already has key {id}")]
    KeyExists {
        /// The account.
        user: String,
        /// The key's fingerprint.
        id: String,
    },
    /// The account has no key with this ID.
    #[error("user `{user}` has no key {id} (`xferd user key list {user}` shows them)")]
    NoSuchKey {
        /// The account.
        user: String,
        /// The ID asked for.
        id: String,
    },
}

/// One account as stored in the users file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserRecord {
    /// `user` or `superuser`.
    #[serde(default)]
    pub role: Role,
    /// argon2id PHC string.
    pub hash: String,
    /// Bumped on every password or role change; sessions from older generations are revoked.
    /// A new account starts at [`first_generation`], so it never repeats one of an earlier
    /// account of the same name.
    #[serde(default)]
    pub generation: u64,
    /// Bytes this account may store, replacing `[quota] default_bytes` (absent: the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_bytes: Option<QuotaSetting>,
    /// Files this account may store, replacing `[quota] default_files` (absent: the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_files: Option<QuotaSetting>,
    /// Public keys that may log in as this account (`xferd user key add`); absent in files
    /// written before key login, which load as they are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<crate::keys::KeyRecord>,
}

/// A quota as the users file states it for one account: a number, or `"none"` for no limit
/// even when the config sets a default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaSetting {
    /// At most this many (bytes or files).
    Limit(u64),
    /// No limit.
    Unlimited,
}

impl QuotaSetting {
    /// The limit in force for an account with this setting (or none) under `default`.
    pub fn effective(setting: Option<QuotaSetting>, default: Option<u64>) -> Option<u64> {
        match setting {
            Some(QuotaSetting::Limit(n)) => Some(n),
            Some(QuotaSetting::Unlimited) => None,
            None => default,
        }
    }
}

impl Serialize for QuotaSetting {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            QuotaSetting::Limit(n) => s.serialize_u64(*n),
            QuotaSetting::Unlimited => s.serialize_str("none"),
        }
    }
}

impl<'de> Deserialize<'de> for QuotaSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(QuotaSetting::Limit(n)),
            Raw::Word(w) if w == "none" => Ok(QuotaSetting::Unlimited),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "quota `{w}` is neither a number nor \"none\""
            ))),
        }
    }
}

/// The whole users file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UsersFile {
    /// Accounts by name.
    #[serde(default)]
    pub users: BTreeMap<String, UserRecord>,
}

const USERS_HEADER: &str = "\
# xferd users file: one [users.NAME] table per account.
# Edit with `xferd user add|passwd|del`; the daemon picks up changes on its own (and on SIGHUP).
# hash: argon2id PHC string (m=19456,t=2,p=1 or stronger); role: \"reader\", \"user\" or
# \"superuser\"; quota_bytes / quota_files (optional): a number, or \"none\" for no limit
# (`xferd user quota NAME`); absent, the config's [quota] defaults apply.
# keys: login keys (`xferd user key add|list|del`), OpenSSH ssh-ed25519 public key lines.

";

/// The generation a new account starts at: the wall clock in microseconds since the epoch.
///
/// A session carries its account's generation, so a generation must never come back for a
/// name: a token of a deleted `dave` (stolen, or already revoked by `user passwd`) must not fit
/// a new `dave`. Counting from 1 did exactly that. The clock serves because an account's
/// generation moves by one per `xferd user passwd|role` run, each a separate process that
/// rewrites and fsyncs the users file and so takes far longer than a microsecond: no account
/// can count past the clock, and a later account of the same name starts above everything the
/// earlier one reached. (A record of retired generations would also work, but would have to
/// live in the users file forever and would be lost by a hand edit; the clock needs nothing
/// stored.) It fails only if the clock is set back by more than the time between the delete and
/// the new account, which is why `xferd user del` also revokes the account's sessions outright.
pub fn first_generation() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
        .unwrap_or(1)
        .max(1)
}

/// Checks a user name: 1 to 64 bytes, no `/`, `\\`, `..`, control characters, whitespace, `@`,
/// and not starting with `.` or `-` (it names a folder and appears in `USER@HOST`).
pub fn validate_name(name: &str) -> Result<(), AccountError> {
    let bad = |why| Err(AccountError::BadName(name.escape_debug().to_string(), why));
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_USER_LEN {
        return bad("it is longer than 64 bytes");
    }
    if name.contains("..") {
        return bad("it contains `..`");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("it starts with `.` or `-`");
    }
    if name
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '/' | '\\' | '@' | ':'))
    {
        return bad("it contains `/`, `\\`, `@`, `:`, whitespace or a control character");
    }
    Ok(())
}

/// Checks that a PHC string is argon2id at no less than OWASP's parameters.
pub fn check_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|e| format!("malformed hash ({e})"))?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err(format!(
            "hash uses `{}`; only argon2id is accepted",
            parsed.algorithm
        ));
    }
    let params = Params::try_from(&parsed).map_err(|e| format!("malformed hash ({e})"))?;
    if params.m_cost() < ARGON2_M_KIB {
        return Err(format!(
            "weak hash: m={} KiB is below the minimum {ARGON2_M_KIB}",
            params.m_cost()
        ));
    }
    if params.t_cost() < ARGON2_T {
        return Err(format!(
            "weak hash: t={} is below the minimum {ARGON2_T}",
            params.t_cost()
        ));
    }
    if parsed.salt.is_none() || parsed.hash.is_none() {
        return Err("malformed hash (no salt or output)".into());
    }
    Ok(())
}

/// Hashes a password with argon2id at OWASP's parameters.
pub fn hash_password(password: &str) -> Result<String, AccountError> {
    check_password(password)?;
    let params = Params::new(ARGON2_M_KIB, ARGON2_T, ARGON2_P, None)
        .map_err(|e| AccountError::Hash(e.to_string()))?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let salt = SaltString::generate(&mut OsRng);
    argon
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AccountError::Hash(e.to_string()))
}

/// Refuses empty and over-long passwords.
pub fn check_password(password: &str) -> Result<(), AccountError> {
    if password.is_empty() {
        return Err(AccountError::BadPassword("the password is empty"));
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(AccountError::BadPassword(
            "the password is longer than 1024 bytes",
        ));
    }
    Ok(())
}

/// Verifies a password against a PHC hash once, in memory of its own (blocking: tools and
/// tests; the daemon checks on [`Accounts::verify`]'s pool, which reuses its memory).
pub fn verify_blocking(hash: &str, password: &str) -> bool {
    Verifier::default().verify(hash, password)
}

impl UsersFile {
    /// Loads and validates a users file; a missing file is an error.
    pub fn load(path: &Path) -> Result<UsersFile, AccountError> {
        let text = std::fs::read_to_string(path).map_err(|source| AccountError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates the text of a users file read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<UsersFile, AccountError> {
        let file: UsersFile = toml::from_str(text).map_err(|e| AccountError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })?;
        for (name, rec) in &file.users {
            let bad = |problem: String| AccountError::BadUser {
                path: path.to_path_buf(),
                user: name.escape_debug().to_string(),
                problem,
            };
            validate_name(name).map_err(|e| bad(e.to_string()))?;
            check_hash(&rec.hash).map_err(bad)?;
            crate::keys::check_keys(&rec.keys).map_err(bad)?;
        }
        Ok(file)
    }

    /// Writes the users file atomically with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), AccountError> {
        let io = |source| AccountError::Io {
            path: path.to_path_buf(),
            source,
        };
        let text = self.to_text().map_err(|e| io(std::io::Error::other(e)))?;
        write_atomic(path, text.as_bytes(), Mode::KeepOr(0o600)).map_err(io)
    }

    /// The file's text: the explaining header, then one table per account.
    pub fn to_text(&self) -> Result<String, toml::ser::Error> {
        Ok(format!("{USERS_HEADER}{}", toml::to_string(self)?))
    }

    /// Adds an account.
    pub fn add(&mut self, name: &str, role: Role, password: &str) -> Result<(), AccountError> {
        validate_name(name)?;
        if self.users.contains_key(name) {
            return Err(AccountError::Exists(name.into()));
        }
        let hash = hash_password(password)?;
        self.users.insert(
            name.into(),
            UserRecord {
                role,
                hash,
                generation: first_generation(),
                quota_bytes: None,
                quota_files: None,
                keys: Vec::new(),
            },
        );
        Ok(())
    }

    /// Changes a password, bumping the generation so existing sessions are revoked.
    pub fn set_password(&mut self, name: &str, password: &str) -> Result<(), AccountError> {
        let hash = hash_password(password)?;
        self.next_generation(name)?.hash = hash;
        Ok(())
    }

    /// Changes a role, bumping the generation so existing sessions are revoked.
    pub fn set_role(&mut self, name: &str, role: Role) -> Result<(), AccountError> {
        self.next_generation(name)?.role = role;
        Ok(())
    }

    /// Changes an account's quotas: `Some(x)` sets that one to `x` (`None` inside: back to the
    /// config's default), `None` leaves it. Sessions stay: a quota applies to the next upload,
    /// and to those running (they stop if the account is then over it).
    pub fn set_quota(
        &mut self,
        name: &str,
        bytes: Option<Option<QuotaSetting>>,
        files: Option<Option<QuotaSetting>>,
    ) -> Result<(), AccountError> {
        let rec = self
            .users
            .get_mut(name)
            .ok_or_else(|| AccountError::NoSuchUser(name.into()))?;
        if let Some(b) = bytes {
            rec.quota_bytes = b;
        }
        if let Some(f) = files {
            rec.quota_files = f;
        }
        Ok(())
    }

    /// The account about to change, its generation already moved on: every change to an
    /// account goes through here so that none can leave its old sessions valid.
    pub(crate) fn next_generation(&mut self, name: &str) -> Result<&mut UserRecord, AccountError> {
        let rec = self
            .users
            .get_mut(name)
            .ok_or_else(|| AccountError::NoSuchUser(name.into()))?;
        rec.generation += 1;
        Ok(rec)
    }

    /// Deletes an account.
    pub fn remove(&mut self, name: &str) -> Result<(), AccountError> {
        self.users
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| AccountError::NoSuchUser(name.into()))
    }
}

/// Why a password check did not succeed.
#[derive(Debug, PartialEq, Eq)]
pub enum VerifyOutcome {
    /// Name and password are right.
    Ok {
        /// The account's role.
        role: Role,
        /// The account's generation, recorded in the session.
        generation: u64,
    },
    /// Wrong name or password (indistinguishable on purpose).
    Denied,
    /// Too many verifications are waiting; try again later.
    Busy,
}

/// How long after a write a file's stamp is not trusted to show a further write: the kernel's
/// file clock ticks every few milliseconds, and some filesystems keep seconds (FAT: two).
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// How often a freshly written users file is read again while its stamp is not yet trusted.
pub const RECHECK_RACY: Duration = Duration::from_millis(100);

/// How long an empty or invalid users file is left before it is read again (sooner if it
/// changes).
pub const RETRY_UNUSABLE: Duration = Duration::from_secs(1);

/// What a read of the users file saw.
#[derive(Debug, Clone)]
struct Seen {
    /// The file's stamp when read.
    stamp: Option<FileStamp>,
    /// BLAKE3 of the bytes behind the accounts in force: the same bytes again change nothing.
    digest: blake3::Hash,
    /// Read again from then on, even if the stamp stays: the read was unusable, or so close
    /// to a write that another could hide behind the same stamp.
    recheck_at: Option<Instant>,
    /// Stamp of the last unusable version, so that each is logged once.
    unusable: Option<FileStamp>,
}

/// Reads and validates the users file, unless its bytes are `unchanged` (the digest of the
/// accounts in force): then `Ok((None, seen))`. With `running`, an empty file is refused like
/// an invalid one: the daemon already has accounts, and an empty read is an editor's
/// truncation far more often than an administrator's intent (`xferd user del` keeps the
/// header).
fn read_users(
    path: &Path,
    running: bool,
    unchanged: Option<blake3::Hash>,
) -> Result<(Option<UsersFile>, Seen), AccountError> {
    let before = file_stamp(path);
    let bytes = std::fs::read(path).map_err(|source| AccountError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let after = file_stamp(path);
    // A write during the read, or one too recent to be sure of: look again soon.
    let settled = before == after
        && after.is_some_and(|s| !s.is_racy(std::time::SystemTime::now(), RACY_WINDOW));
    let seen = Seen {
        stamp: after,
        digest: blake3::hash(&bytes),
        recheck_at: (!settled).then(|| Instant::now() + RECHECK_RACY),
        unusable: None,
    };
    // Re-reads of a settling (or future-dated) file are frequent: skip the parse.
    if unchanged == Some(seen.digest) {
        return Ok((None, seen));
    }
    let text = String::from_utf8(bytes).map_err(|_| AccountError::Parse {
        path: path.to_path_buf(),
        message: "the file is not UTF-8".into(),
    })?;
    if running && text.trim().is_empty() {
        return Err(AccountError::Parse {
            path: path.to_path_buf(),
            message: "the file is empty (being rewritten?)".into(),
        });
    }
    Ok((Some(UsersFile::parse(path, &text)?), seen))
}

/// The accounts the running daemon serves, reloaded when the users file (or, in s3 mode, the
/// users object in the store) changes.
pub struct Accounts {
    /// Where the accounts come from.
    origin: Origin,
    /// Current contents; swapped whole on reload so readers never see a half-applied file.
    /// Shared with the store's poller in s3 mode.
    current: Arc<RwLock<Arc<UsersFile>>>,
    /// Runs password checks: one thread and one argon2 buffer per permitted concurrent
    /// check, and a bounded queue, so logins cannot grow memory or CPU use beyond them.
    checks: PasswordPool,
}

/// Where the accounts come from.
enum Origin {
    /// The local users file, looked at (one `stat`) on every lookup.
    File {
        /// Where the users file lives.
        path: PathBuf,
        /// What the last look at the file saw, to notice `xferd user ...` edits.
        seen: Mutex<Seen>,
    },
    /// The users object in the object store, read again by a background task whenever its
    /// ETag moves: lookups never wait for the network.
    Store {
        /// Wakes the task at once (SIGHUP).
        wake: Arc<tokio::sync::Notify>,
    },
}

impl Accounts {
    /// Loads the users file, failing on any invalid entry, and starts `max_concurrent`
    /// password-check threads that admit `max_queued` waiting logins.
    pub fn load(
        path: &Path,
        max_concurrent: usize,
        max_queued: usize,
    ) -> Result<Self, AccountError> {
        let (file, seen) = read_users(path, false, None)?;
        let file = file.unwrap_or_default();
        let checks =
            PasswordPool::start(max_concurrent, max_queued).map_err(AccountError::Threads)?;
        Ok(Accounts {
            origin: Origin::File {
                path: path.to_path_buf(),
                seen: Mutex::new(seen),
            },
            current: Arc::new(RwLock::new(Arc::new(file))),
            checks,
        })
    }

    /// The accounts of the store's users object (s3 mode): read once now (failing if it is
    /// missing or invalid), then again by a background task every `interval` when its ETag
    /// moved. An unreadable or invalid object keeps the accounts in force, and is logged
    /// once until it reads well again. Must run inside a tokio runtime.
    pub async fn from_store(
        users: crate::shared::users::UsersObject,
        interval: Duration,
        max_concurrent: usize,
        max_queued: usize,
    ) -> Result<Self, AccountError> {
        use crate::shared::users::UsersRead;
        let (file, e_tag) = match users.read(None).await {
            Ok(UsersRead::Found(file, e_tag)) => (file, e_tag),
            Ok(_) => return Err(AccountError::NoUsersInStore),
            Err(crate::shared::SharedError::Account(e)) => return Err(e),
            Err(e) => return Err(AccountError::Store(e.to_string())),
        };
        let checks =
            PasswordPool::start(max_concurrent, max_queued).map_err(AccountError::Threads)?;
        let current = Arc::new(RwLock::new(Arc::new(file)));
        let wake = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(poll_store(
            users,
            e_tag,
            Arc::downgrade(&current),
            wake.clone(),
            interval,
        ));
        Ok(Accounts {
            origin: Origin::Store { wake },
            current,
            checks,
        })
    }

    /// Re-reads the users file (SIGHUP); on error the old accounts stay in force. In s3 mode
    /// the background task is asked to read the store's users object now, and the accounts
    /// in force are counted.
    pub fn reload(&self) -> Result<usize, AccountError> {
        match &self.origin {
            Origin::File { path, seen } => {
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                self.read_again(path, &mut seen)
                    .map(|_| self.current_file().users.len())
            }
            Origin::Store { wake } => {
                wake.notify_one();
                Ok(self.current_file().users.len())
            }
        }
    }

    fn current_file(&self) -> Arc<UsersFile> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the file and swaps its accounts in if it is usable and differs from those in
    /// force; `Ok(true)` when it swapped. On error nothing changes but the retry time.
    fn read_again(&self, path: &Path, seen: &mut Seen) -> Result<bool, AccountError> {
        match read_users(path, true, Some(seen.digest)) {
            Ok((None, fresh)) => {
                *seen = fresh;
                Ok(false)
            }
            Ok((Some(file), fresh)) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(file);
                *seen = fresh;
                Ok(true)
            }
            Err(e) => {
                seen.stamp = file_stamp(path);
                seen.recheck_at = Some(Instant::now() + RETRY_UNUSABLE);
                Err(e)
            }
        }
    }

    /// The current accounts, reading the file again first if it changed on disk.
    ///
    /// An editor that rewrites the file in place empties it, then writes it: a read in between
    /// sees nothing, or half an account. Such a read is never taken for the truth: an empty or
    /// invalid file leaves the accounts in force and is read again when it changes or after
    /// [`RETRY_UNUSABLE`]; and a file written so recently that a further write could leave its
    /// stamp unchanged is read again after [`RECHECK_RACY`] until it has settled.
    pub fn snapshot(&self) -> Arc<UsersFile> {
        if let Origin::File { path, seen } = &self.origin {
            // The per-request `stat`, outside the lock so that requests do not queue behind
            // each other's: a stamp that another thread has since moved past costs one read.
            let stamp = file_stamp(path);
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            let due = stamp != seen.stamp || seen.recheck_at.is_some_and(|t| Instant::now() >= t);
            if due {
                match self.read_again(path, &mut seen) {
                    Ok(true) => tracing::info!(
                        users = self.current_file().users.len(),
                        "users file changed on disk; reloaded"
                    ),
                    Ok(false) => {}
                    // Logged once per version of the file, not per request.
                    Err(e) if seen.unusable != seen.stamp => {
                        tracing::error!(error = %e, "users file changed but is unusable; keeping the previous accounts until it is fixed");
                        seen.unusable = seen.stamp;
                    }
                    Err(_) => {}
                }
            }
        }
        self.current_file()
    }

    /// Looks up an account's role and generation.
    pub fn lookup(&self, name: &str) -> Option<(Role, u64)> {
        self.snapshot()
            .users
            .get(name)
            .map(|r| (r.role, r.generation))
    }

    /// An account's own quota settings (bytes, files), `None` for an unknown account.
    pub fn quota(&self, name: &str) -> Option<(Option<QuotaSetting>, Option<QuotaSetting>)> {
        self.snapshot()
            .users
            .get(name)
            .map(|r| (r.quota_bytes, r.quota_files))
    }

    /// Verifies a password on the password-check pool; `Busy` at once if its queue is full.
    pub async fn verify(&self, name: &str, password: &str) -> VerifyOutcome {
        if password.len() > MAX_PASSWORD_LEN || name.len() > MAX_USER_LEN {
            return VerifyOutcome::Denied;
        }
        // An unknown name is checked too, against a hash of the default cost, so that the
        // answer takes as long as for a known name with a wrong password.
        let (found, hash) = match self.snapshot().users.get(name) {
            Some(r) => (Some((r.role, r.generation)), r.hash.clone()),
            None => (None, DUMMY_HASH.to_string()),
        };
        match (self.checks.check(hash, password.to_string()).await, found) {
            (Checked::Match, Some((role, generation))) => VerifyOutcome::Ok { role, generation },
            (Checked::Busy, _) => VerifyOutcome::Busy,
            _ => VerifyOutcome::Denied,
        }
    }
}

/// The background task of s3 mode: a conditional GET of the users object every `interval`
/// (or when woken); a changed, valid object replaces the accounts in force. Stops once the
/// accounts are dropped.
async fn poll_store(
    users: crate::shared::users::UsersObject,
    mut e_tag: Option<String>,
    current: std::sync::Weak<RwLock<Arc<UsersFile>>>,
    wake: Arc<tokio::sync::Notify>,
    interval: Duration,
) {
    use crate::shared::users::UsersRead;
    // The last failure logged, so that each is logged once, and recovery too.
    let mut failing: Option<String> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = wake.notified() => {}
        }
        let read = users.read(e_tag.clone()).await;
        let Some(current) = current.upgrade() else {
            return;
        };
        let problem = match read {
            Ok(UsersRead::NotModified) => None,
            Ok(UsersRead::Found(file, tag)) => {
                let n = file.users.len();
                *current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(file);
                e_tag = tag;
                tracing::info!(
                    users = n,
                    "users object changed in the object store; reloaded"
                );
                None
            }
            // Deleted by hand: not the truth for a cluster serving accounts (as an empty local
            // file is not); keep them until it is put back.
            Ok(UsersRead::Missing) => Some(AccountError::NoUsersInStore.to_string()),
            Err(e) => Some(e.to_string()),
        };
        match problem {
            Some(p) if failing.as_ref() != Some(&p) => {
                tracing::error!(error = %p, "cannot use the users object in the object store; keeping the previous accounts until it is fixed");
                failing = Some(p);
            }
            Some(_) => {}
            None if failing.take().is_some() => {
                tracing::info!("users object in the object store readable again");
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["alice", "bob.smith", "ünïcode", "a_b-c", &"x".repeat(64)] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            "..",
            "a..b",
            ".hidden",
            "-x",
            "a/b",
            "a\\b",
            "a b",
            "a\nb",
            "a@b",
            "a\0",
            &"x".repeat(65),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hashes_are_owasp_argon2id_and_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        check_hash(&h).unwrap();
        assert!(verify_blocking(&h, "correct horse"));
        assert!(!verify_blocking(&h, "wrong horse"));
    }

    #[test]
    fn weak_and_malformed_hashes_are_refused() {
        let good = hash_password("pw").unwrap();
        let salt_and_out = good.rsplitn(3, '$').take(2).collect::<Vec<_>>();
        let tail = format!("{}${}", salt_and_out[1], salt_and_out[0]);
        let weak_m = format!("$argon2id$v=19$m=4096,t=2,p=1${tail}");
        let weak_t = format!("$argon2id$v=19$m=19456,t=1,p=1${tail}");
        let argon2i = format!("$argon2i$v=19$m=19456,t=2,p=1${tail}");
        assert!(check_hash(&weak_m).unwrap_err().contains("m=4096"));
        assert!(check_hash(&weak_t).unwrap_err().contains("t=1"));
        assert!(check_hash(&argon2i).unwrap_err().contains("argon2i"));
        assert!(check_hash("plaintext").unwrap_err().contains("malformed"));
    }

    #[test]
    fn load_names_the_bad_user() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("users.toml");
        std::fs::write(
            &p,
            "[users.mallory]\nrole = \"user\"\nhash = \"$argon2i$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo\"\n",
        )
        .unwrap();
        let err = UsersFile::load(&p).unwrap_err().to_string();
        assert!(err.contains("mallory"), "{err}");
    }

    #[test]
    fn add_passwd_del_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("users.toml");
        let mut f = UsersFile::default();
        f.add("alice", Role::Superuser, "pw1").unwrap();
        assert!(matches!(
            f.add("alice", Role::User, "pw"),
            Err(AccountError::Exists(_))
        ));
        f.save(&p).unwrap();
        let mut g = UsersFile::load(&p).unwrap();
        assert_eq!(g, f);
        let first = g.users["alice"].generation;
        g.set_password("alice", "pw2").unwrap();
        assert_eq!(g.users["alice"].generation, first + 1);
        assert!(verify_blocking(&g.users["alice"].hash, "pw2"));
        g.remove("alice").unwrap();
        assert!(g.users.is_empty());
    }

    #[test]
    fn quotas_round_trip_through_the_file_and_keep_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("users.toml");
        let mut f = UsersFile::default();
        f.add("alice", Role::Reader, "pw").unwrap();
        let generation = f.users["alice"].generation;
        f.set_quota(
            "alice",
            Some(Some(QuotaSetting::Limit(10 << 30))),
            Some(Some(QuotaSetting::Unlimited)),
        )
        .unwrap();
        assert_eq!(f.users["alice"].generation, generation, "sessions stay");
        f.save(&p).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("role = \"reader\""), "{text}");
        assert!(text.contains("quota_bytes = 10737418240"), "{text}");
        assert!(text.contains("quota_files = \"none\""), "{text}");
        let g = UsersFile::load(&p).unwrap();
        assert_eq!(g, f);
        let rec = &g.users["alice"];
        assert_eq!(
            QuotaSetting::effective(rec.quota_bytes, Some(5)),
            Some(10 << 30)
        );
        assert_eq!(QuotaSetting::effective(rec.quota_files, Some(5)), None);
        assert_eq!(QuotaSetting::effective(None, Some(5)), Some(5));
        // Back to the default: the key goes.
        let mut h = g.clone();
        h.set_quota("alice", Some(None), None).unwrap();
        assert!(!h.to_text().unwrap().contains("quota_bytes ="));
        let bad = text.replace("\"none\"", "\"lots\"");
        let err = UsersFile::parse(&p, &bad).unwrap_err().to_string();
        assert!(err.contains("lots"), "{err}");
    }

    #[test]
    fn a_new_account_never_reuses_a_generation_of_an_earlier_one_of_its_name() {
        let mut f = UsersFile::default();
        f.add("dave", Role::User, "pw1").unwrap();
        let first = f.users["dave"].generation;
        f.set_password("dave", "pw2").unwrap();
        f.set_role("dave", Role::Superuser).unwrap();
        let last = f.users["dave"].generation;
        assert_eq!(last, first + 2);
        f.remove("dave").unwrap();
        f.add("dave", Role::User, "pw3").unwrap();
        assert!(
            f.users["dave"].generation > last,
            "{} after {first}..={last}",
            f.users["dave"].generation
        );
    }

    /// A users file holding `name` with password `password`, saved in a fresh folder.
    fn saved_with(name: &str, password: &str) -> (tempfile::TempDir, PathBuf, UsersFile) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("users.toml");
        let mut f = UsersFile::default();
        f.add(name, Role::User, password).unwrap();
        f.save(&p).unwrap();
        (dir, p, f)
    }

    #[test]
    fn an_edit_within_one_tick_of_the_file_clock_is_still_noticed() {
        let (_dir, p, mut f) = saved_with("alice", "pw");
        let acc = Accounts::load(&p, 1, 1).unwrap();
        let first = std::fs::metadata(&p).unwrap().modified().unwrap();
        f.add("bob", Role::User, "pw").unwrap();
        f.save(&p).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(first)
            .unwrap();
        assert!(acc.lookup("bob").is_some());
    }

    #[test]
    fn an_empty_or_torn_users_file_keeps_the_accounts_in_force() {
        use std::io::Write;
        let (_dir, p, mut f) = saved_with("alice", "pw");
        let good = std::fs::read(&p).unwrap();
        let acc = Accounts::load(&p, 1, 1).unwrap();
        let alice = acc.lookup("alice");
        assert!(alice.is_some());
        // An editor's rewrite in place: truncated, half written, then whole again.
        let rewrite = |bytes: &[u8]| {
            let mut file = std::fs::File::options()
                .write(true)
                .truncate(true)
                .open(&p)
                .unwrap();
            file.write_all(bytes).unwrap();
        };
        rewrite(b"");
        assert_eq!(acc.lookup("alice"), alice, "empty is not the truth");
        assert!(acc.reload().is_err(), "nor on SIGHUP");
        rewrite(&good[..good.len() - 20]);
        assert_eq!(acc.lookup("alice"), alice, "torn is not the truth");
        rewrite(&good);
        assert_eq!(acc.lookup("alice"), alice);
        assert_eq!(acc.reload().unwrap(), 1);
        // A real change in place is taken.
        f.remove("alice").unwrap();
        f.add("bob", Role::User, "pw").unwrap();
        rewrite(format!("{USERS_HEADER}{}", toml::to_string(&f).unwrap()).as_bytes());
        assert!(acc.lookup("bob").is_some());
        assert_eq!(acc.lookup("alice"), None);
    }

    #[tokio::test]
    async fn unknown_users_and_wrong_passwords_are_denied_alike() {
        let (_dir, p, _) = saved_with("alice", "right");
        let acc = Accounts::load(&p, 2, 4).unwrap();
        assert!(matches!(
            acc.verify("alice", "right").await,
            VerifyOutcome::Ok { .. }
        ));
        assert_eq!(acc.verify("alice", "wrong").await, VerifyOutcome::Denied);
        assert_eq!(acc.verify("nobody", "right").await, VerifyOutcome::Denied);
        assert_eq!(
            acc.verify("alice", &"x".repeat(2000)).await,
            VerifyOutcome::Denied
        );
    }
}
