//! Session tokens: 256 random bits handed to the client at login, stored on the server only as
//! a BLAKE3 hash, persisted (0600) so sessions survive a restart, expiring after the configured
//! time, at most `sessions.max_per_user` per account (the oldest is evicted), and revoked by
//! logout, by `xferd session revoke`, by a password or role change (the account's generation
//! moves on) and by deleting the account.
//!
//! Sessions persist in `sessions.jsonl`, an append-only journal: a header line, then one JSON
//! line per session created or revoked. A login appends one line (about 200 bytes) instead of
//! rewriting every session: with 10,000 sessions the old whole-file rewrite wrote 2.2 MB and
//! cost 6.5 ms per login on tmpfs (13.4 ms on disk); the append costs 0.1 to 0.3 ms on tmpfs
//! (see `figures_login_cost_with_10000_sessions`), on disk mostly its fsync. Once the journal holds more than twice the live
//! sessions (plus [`COMPACT_SLACK`] lines) it is compacted: rewritten atomically with only the
//! live ones. A crash can tear only the last line, which is ignored (and terminated before the
//! next append), never fatal. A `sessions.json` from an older version is read when there is no
//! journal, and replaced by one at the first change.
//!
//! With `[storage] kind = "s3"` sessions are shared by several nodes instead
//! ([`crate::shared::sessions`]): [`SessionStore`] is either, with one API for the daemon.

use std::collections::HashMap;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use argon2::password_hash::rand_core::{OsRng, RngCore};
use base64::Engine;
use serde::{Deserialize, Serialize};
use xfer_util::fs::{Mode, write_atomic};

use crate::config::SessionSettings;
use crate::fsutil::{FileStamp, file_stamp};

/// Prefix of every token, so a leaked one is recognisable (as GitHub does with `ghp_`).
pub const TOKEN_PREFIX: &str = "xfer1_";

/// The journal, in the state folder.
pub const JOURNAL_FILE: &str = "sessions.jsonl";

/// The whole-file store of older versions, read until the first change migrates it.
pub const LEGACY_FILE: &str = "sessions.json";

/// The lock file serialising writers across processes.
pub const LOCK_FILE: &str = "sessions.lock";

/// Lines the journal may hold beyond twice the live sessions before it is compacted, so that a
/// small store is not rewritten on every other login.
pub const COMPACT_SLACK: usize = 1024;

/// The journal format this code writes when no token is live; older versions read it.
const JOURNAL_FORMAT: u32 = 1;

/// The journal format written while a token is live: an older xferd, which would read a
/// token's line as a session with no scope, refuses the file instead of widening the token.
const JOURNAL_FORMAT_TOKENS: u32 = 2;

/// What a long-lived token (`xfer token create`) may do; `None` on a login's session.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenScope {
    /// The label given at creation (not known to the request path in s3 mode, where only
    /// the registry holds it).
    #[serde(default)]
    pub name: String,
    /// Whether every request that writes is refused.
    #[serde(default)]
    pub read_only: bool,
    /// The folder the token is limited to, normalised by the protocol's path rules (`a/b`);
    /// `""` for the whole tree.
    #[serde(default)]
    pub path: String,
}

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
    /// Set on a long-lived token: its label and scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<TokenScope>,
}

impl SessionRecord {
    /// "token" or "login", for listings.
    pub fn kind(&self) -> &'static str {
        if self.token.is_some() {
            "token"
        } else {
            "login"
        }
    }
}

/// The whole-file format of older versions.
#[derive(Default, Serialize, Deserialize)]
struct LegacyFile {
    /// Sessions keyed by the hex BLAKE3 of their token.
    sessions: HashMap<String, SessionRecord>,
}

/// One line of the journal.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Entry {
    /// The first line: says what the file is.
    Header {
        /// Journal format version.
        format: u32,
    },
    /// A session started.
    Create {
        /// Hex BLAKE3 of the token.
        id: String,
        /// Account name.
        user: String,
        /// Account generation at login.
        generation: u64,
        /// Login time, seconds since the epoch.
        created: i64,
        /// Expiry time, seconds since the epoch.
        expires: i64,
        /// Address the login came from.
        source: String,
        /// Set on a long-lived token.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<TokenScope>,
    },
    /// A session ended before its expiry (logout, revocation, eviction, account change).
    Revoke {
        /// Hex BLAKE3 of the token.
        id: String,
    },
}

impl Entry {
    fn create(id: &str, r: &SessionRecord) -> Entry {
        Entry::Create {
            id: id.into(),
            user: r.user.clone(),
            generation: r.generation,
            created: r.created,
            expires: r.expires,
            source: r.source.clone(),
            token: r.token.clone(),
        }
    }

    fn line(&self) -> Vec<u8> {
        // Serialising these plain fields cannot fail; an empty line would be skipped anyway.
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

/// A live session in memory: its record and its place in the order sessions were created
/// (the journal's order, the same in every process), which decides who is evicted first.
#[derive(Debug, Clone)]
struct Live {
    record: SessionRecord,
    seq: u64,
}

type Map = HashMap<String, Live>;

/// How far this process has read the journal.
#[derive(Debug, Clone, Copy, PartialEq)]
struct JournalPos {
    /// The journal file read (a compaction replaces it with a new inode).
    ino: u64,
    /// Bytes applied: always just after a newline (a torn last line is not consumed).
    offset: u64,
    /// The file's length when last read (beyond `offset` only by a torn last line).
    len: u64,
    /// Lines in the file up to `offset`, to decide when to compact.
    lines: usize,
    /// The format its header names: a token's line is only appended to a format that
    /// older versions refuse ([`JOURNAL_FORMAT_TOKENS`]).
    format: u32,
}

/// Where the sessions in memory came from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Source {
    /// The journal, read up to here.
    Journal(JournalPos),
    /// No journal: the legacy file with this stamp (`None`: it does not exist either).
    Legacy(Option<FileStamp>),
}

struct Loaded {
    sessions: Map,
    source: Source,
    /// Sequence number for the next session applied.
    next_seq: u64,
}

impl Loaded {
    fn empty() -> Loaded {
        Loaded {
            sessions: Map::new(),
            source: Source::Legacy(None),
            next_seq: 0,
        }
    }

    fn apply(&mut self, entry: Entry, now: i64) {
        match entry {
            Entry::Header { .. } => {}
            Entry::Create {
                id,
                user,
                generation,
                created,
                expires,
                source,
                token,
            } => {
                // Expired sessions are left out so that memory holds only live ones.
                if expires > now {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    let record = SessionRecord {
                        user,
                        generation,
                        created,
                        expires,
                        source,
                        token,
                    };
                    self.sessions.insert(id, Live { record, seq });
                }
            }
            Entry::Revoke { id } => {
                self.sessions.remove(&id);
            }
        }
    }
}

/// The daemon's sessions: in the local state folder, or shared with other nodes through the
/// object store. Checking a token (`validate`) never waits for the network in either.
#[derive(Debug)]
pub enum SessionStore {
    /// The journal in `state_dir` (local mode).
    Local(LocalSessions),
    /// Signed tokens, shared registry and revocations (s3 mode).
    Shared(crate::shared::sessions::SharedSessions),
}

impl SessionStore {
    /// Opens the local sessions in `state_dir` (see [`LocalSessions::open`]).
    pub fn open(state_dir: &Path, settings: &SessionSettings) -> std::io::Result<Self> {
        LocalSessions::open(state_dir, settings).map(SessionStore::Local)
    }

    /// Starts a session for `user` and returns its token (the only copy of it) and record;
    /// the user's oldest sessions beyond `sessions.max_per_user` are revoked (in s3 mode in
    /// the background: see [`SessionStore::create_registered`]).
    pub fn create(&self, user: &str, generation: u64, source: &str) -> (String, SessionRecord) {
        match self {
            SessionStore::Local(s) => s.create(user, generation, source),
            SessionStore::Shared(s) => s.create(user, generation, source),
        }
    }

    /// [`SessionStore::create`], returning once the session is recorded everywhere it will
    /// be looked for (in s3 mode: registered in the store, the user's excess revoked).
    pub async fn create_registered(
        &self,
        user: &str,
        generation: u64,
        source: &str,
    ) -> std::io::Result<(String, SessionRecord)> {
        match self {
            SessionStore::Local(s) => Ok(s.create(user, generation, source)),
            SessionStore::Shared(s) => Ok(s.create_registered(user, generation, source).await?),
        }
    }

    /// The session for `token` if it is live and its account's current generation (from
    /// `current_generation`) matches; see [`LocalSessions::validate`] and
    /// [`crate::shared::sessions::SharedSessions::validate`].
    pub fn validate(
        &self,
        token: &str,
        current_generation: impl FnOnce(&str) -> Option<u64>,
    ) -> Option<SessionRecord> {
        match self {
            SessionStore::Local(s) => s.validate(token, current_generation),
            SessionStore::Shared(s) => s.validate(token, current_generation),
        }
    }

    /// Ends the session for `token` (at once here; in s3 mode on every node within two
    /// polls); true if there was one.
    pub fn revoke(&self, token: &str) -> bool {
        match self {
            SessionStore::Local(s) => s.revoke(token),
            SessionStore::Shared(s) => s.revoke(token),
        }
    }

    /// Ends every session whose id starts with `id_prefix` (at least 6 hex digits; `""` for
    /// all) or, with `user`, every session of that user. Returns how many ended.
    pub async fn revoke_matching(
        &self,
        id_prefix: Option<&str>,
        user: Option<&str>,
    ) -> std::io::Result<usize> {
        match self {
            SessionStore::Local(s) => s.revoke_matching(id_prefix, user),
            SessionStore::Shared(s) => Ok(s.revoke_matching(id_prefix, user).await?),
        }
    }

    /// Makes a long-lived token for `user` that lives `ttl_secs` and may do what `scope`
    /// says, unless they hold `max_tokens` live tokens already; returns the token (its only
    /// copy), its id as listings show it, and its record, once it is recorded everywhere it
    /// will be looked for.
    pub async fn create_token(
        &self,
        user: &str,
        generation: u64,
        source: &str,
        scope: TokenScope,
        ttl_secs: u64,
        max_tokens: usize,
    ) -> Result<(String, String, SessionRecord), TokenRefusal> {
        match self {
            SessionStore::Local(s) => {
                s.create_token(user, generation, source, scope, ttl_secs, max_tokens)
            }
            SessionStore::Shared(s) => {
                s.create_token(user, generation, source, scope, ttl_secs, max_tokens)
                    .await
            }
        }
    }

    /// `user`'s live tokens as `(short id, record)`, oldest first.
    pub async fn tokens_of(&self, user: &str) -> std::io::Result<Vec<(String, SessionRecord)>> {
        match self {
            SessionStore::Local(s) => Ok(s
                .list()
                .into_iter()
                .filter(|(_, r)| r.user == user && r.token.is_some())
                .collect()),
            SessionStore::Shared(s) => Ok(s.tokens_of(user).await?),
        }
    }

    /// Revokes `user`'s tokens whose id starts with `id_prefix` (never a login's session,
    /// never another user's); returns how many.
    pub async fn revoke_token(&self, user: &str, id_prefix: &str) -> std::io::Result<usize> {
        match self {
            SessionStore::Local(s) => s.revoke_where(|key, r| {
                r.user == user && r.token.is_some() && key.starts_with(id_prefix)
            }),
            SessionStore::Shared(s) => Ok(s.revoke_token(user, id_prefix).await?),
        }
    }

    /// Live sessions as `(short id, record)`, oldest first.
    pub async fn list(&self) -> std::io::Result<Vec<(String, SessionRecord)>> {
        match self {
            SessionStore::Local(s) => Ok(s.list()),
            SessionStore::Shared(s) => Ok(s.list().await?),
        }
    }
}

/// The sessions of a daemon on its own state folder (local mode).
///
/// The journal is shared with `xferd session ...` and `xferd user ...` run by an administrator
/// while the daemon runs, and with other daemons on the same state folder: every change
/// happens under an exclusive `flock` on `sessions.lock`, first reads what other processes
/// appended, then appends. Lookups read new lines (or the whole file after a compaction) when
/// the journal's size or inode changed, so a revocation from the command line takes effect on
/// the next request.
pub struct LocalSessions {
    /// The journal.
    path: PathBuf,
    /// The whole-file store of older versions.
    legacy_path: PathBuf,
    /// The lock file serialising writers across processes.
    lock_path: PathBuf,
    /// Live sessions by token hash, and how far the journal has been read. The mutex is never
    /// held across an await.
    inner: Mutex<Loaded>,
    /// Lifetime of a new session, in seconds.
    ttl_secs: u64,
    /// Most live sessions per account; a login beyond it evicts the oldest.
    max_per_user: usize,
    /// Lines allowed beyond twice the live sessions before compacting ([`COMPACT_SLACK`];
    /// tests lower it to compact often).
    compact_slack: usize,
}

impl std::fmt::Debug for LocalSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSessions")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A new random token: [`TOKEN_PREFIX`] and 256 random bits.
fn new_token() -> String {
    let mut raw = [0u8; 32];
    OsRng.fill_bytes(&mut raw);
    format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    )
}

/// Why a long-lived token was not made.
#[derive(Debug, thiserror::Error)]
pub enum TokenRefusal {
    /// The user holds `sessions.max_tokens_per_user` live tokens already.
    #[error(
        "you have {0} live tokens, the most this server allows (sessions.max_tokens_per_user); revoke one with `xfer token revoke ID` first"
    )]
    TooMany(usize),
    /// The session store could not record it.
    #[error("cannot record the token: {0}")]
    Io(#[from] std::io::Error),
}

fn token_key(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!(
            "`{}` is corrupt ({what}); restore it from a backup, or delete it to end every session",
            path.display()
        ),
    )
}

fn read_legacy(path: &Path) -> std::io::Result<HashMap<String, SessionRecord>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(serde_json::from_slice::<LegacyFile>(&bytes)
            .map_err(|e| corrupt(path, e))?
            .sessions),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashMap::new()),
        Err(e) => Err(e),
    }
}

/// Applies the complete lines of `bytes`, which start at `pos.offset` of the journal, and
/// moves `pos` past them. Returns how many complete lines were damaged (skipped).
fn apply_lines(
    path: &Path,
    bytes: &[u8],
    pos: &mut JournalPos,
    loaded: &mut Loaded,
    now: i64,
) -> std::io::Result<usize> {
    let mut damaged = 0;
    let mut rest = bytes;
    while let Some(end) = rest.iter().position(|&b| b == b'\n') {
        let line = &rest[..end];
        rest = &rest[end + 1..];
        let parsed = serde_json::from_slice::<Entry>(line);
        if pos.offset == 0 {
            match parsed {
                Ok(Entry::Header { format })
                    if format == JOURNAL_FORMAT || format == JOURNAL_FORMAT_TOKENS =>
                {
                    pos.format = format;
                }
                Ok(Entry::Header { format }) => {
                    return Err(corrupt(
                        path,
                        format!(
                            "journal format {format}, this xferd reads {JOURNAL_FORMAT} and {JOURNAL_FORMAT_TOKENS}"
                        ),
                    ));
                }
                _ => return Err(corrupt(path, "not an xferd sessions journal")),
            }
        } else {
            match parsed {
                Ok(entry) => loaded.apply(entry, now),
                // A line torn by a crash and terminated by the next writer: skipped.
                Err(_) => damaged += 1,
            }
        }
        pos.offset += end as u64 + 1;
        pos.lines += 1;
    }
    Ok(damaged)
}

/// Reads the journal into `loaded`: only the lines appended since the last read, or all of it
/// on the first read and after a compaction replaced the file. `Ok(false)`: there is no
/// journal. On error `loaded` is as it was.
fn read_journal(path: &Path, loaded: &mut Loaded) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let (mut pos, mut fresh) = match loaded.source {
        Source::Journal(pos) if pos.ino == meta.ino() && pos.offset <= meta.len() => (pos, None),
        _ => {
            let pos = JournalPos {
                ino: meta.ino(),
                offset: 0,
                len: 0,
                lines: 0,
                format: JOURNAL_FORMAT,
            };
            let start = Loaded {
                sessions: Map::new(),
                source: Source::Journal(pos),
                next_seq: loaded.next_seq,
            };
            (pos, Some(start))
        }
    };
    let mut bytes = Vec::new();
    file.seek(std::io::SeekFrom::Start(pos.offset))?;
    file.read_to_end(&mut bytes)?;
    pos.len = pos.offset + bytes.len() as u64;
    let target = fresh.as_mut().unwrap_or(loaded);
    let damaged = apply_lines(path, &bytes, &mut pos, target, now())?;
    if damaged > 0 {
        tracing::warn!(path = %path.display(), lines = damaged, "skipped damaged lines in the sessions journal (a crash mid-write?)");
    }
    target.source = Source::Journal(pos);
    if let Some(fresh) = fresh {
        *loaded = fresh;
    }
    Ok(true)
}

/// Brings `loaded` up to date with the files: new journal lines, a compacted journal, or
/// (without a journal) a changed legacy file.
fn refresh_from(path: &Path, legacy_path: &Path, loaded: &mut Loaded) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    // One stat in the common case, where nothing changed.
    if let Source::Journal(pos) = loaded.source
        && let Ok(meta) = std::fs::metadata(path)
        && meta.ino() == pos.ino
        && meta.len() == pos.len
    {
        return Ok(());
    }
    if read_journal(path, loaded)? {
        return Ok(());
    }
    let stamp = file_stamp(legacy_path);
    if loaded.source == Source::Legacy(stamp) {
        return Ok(());
    }
    let t = now();
    let mut sessions: Vec<_> = read_legacy(legacy_path)?
        .into_iter()
        .filter(|(_, r)| r.expires > t)
        .collect();
    // The legacy file has no order: oldest first, ties by id, the same in every process.
    sessions.sort_by(|a, b| a.1.created.cmp(&b.1.created).then(a.0.cmp(&b.0)));
    loaded.sessions.clear();
    for (id, record) in sessions {
        let seq = loaded.next_seq;
        loaded.next_seq += 1;
        loaded.sessions.insert(id, Live { record, seq });
    }
    loaded.source = Source::Legacy(stamp);
    Ok(())
}

/// Checks that the sessions in `state_dir`, if any, are readable and valid; returns how many
/// live sessions there are (for `xferd check`, which must not create or change anything).
pub fn check_file(state_dir: &Path) -> std::io::Result<usize> {
    let mut loaded = Loaded::empty();
    refresh_from(
        &state_dir.join(JOURNAL_FILE),
        &state_dir.join(LEGACY_FILE),
        &mut loaded,
    )?;
    let t = now();
    Ok(loaded
        .sessions
        .values()
        .filter(|l| l.record.expires > t)
        .count())
}

/// A short, stable identifier of a session for listings: the first 12 hex digits of its
/// token's hash (never the token).
pub fn short_id(key: &str) -> &str {
    &key[..key.len().min(12)]
}

impl LocalSessions {
    /// Opens the sessions in `state_dir` (creating the folder), reading the journal, or the
    /// legacy file when there is none.
    pub fn open(state_dir: &Path, settings: &SessionSettings) -> std::io::Result<Self> {
        crate::fsutil::create_dir_with_mode(state_dir, 0o700)?;
        let store = LocalSessions {
            path: state_dir.join(JOURNAL_FILE),
            legacy_path: state_dir.join(LEGACY_FILE),
            lock_path: state_dir.join(LOCK_FILE),
            inner: Mutex::new(Loaded::empty()),
            ttl_secs: settings.ttl_secs,
            max_per_user: settings.max_per_user.max(1),
            compact_slack: COMPACT_SLACK,
        };
        {
            let mut loaded = store.lock_inner();
            refresh_from(&store.path, &store.legacy_path, &mut loaded)?;
        }
        Ok(store)
    }

    fn lock_inner(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads what changed on disk; on error the sessions in memory stay.
    fn refresh(&self, loaded: &mut Loaded) -> std::io::Result<()> {
        refresh_from(&self.path, &self.legacy_path, loaded).inspect_err(|e| {
            tracing::error!(path = %self.path.display(), error = %e, "cannot read sessions; keeping the ones in memory");
        })
    }

    /// Takes the cross-process lock (released when the file closes).
    fn flock(&self) -> std::io::Result<std::fs::File> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)?;
        // An administrator (root) creating the lock file gives it to the folder's owner, so
        // the daemon's user can still take it.
        give_to_folder_owner(&f, &self.lock_path);
        loop {
            match rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive) {
                Err(rustix::io::Errno::INTR) => continue,
                result => break result?,
            }
        }
        Ok(f)
    }

    /// Under the cross-process lock and up to date with the journal, lets `change` decide
    /// which entries to record, then applies them in memory and records them on disk. The
    /// change always takes effect in this process; the error says it could not be recorded
    /// (other processes will not see it, and it will not survive a restart).
    fn modify<T>(&self, change: impl FnOnce(&Map) -> (T, Vec<Entry>)) -> (T, std::io::Result<()>) {
        let mut loaded = self.lock_inner();
        let lock = self.flock();
        let read = self.refresh(&mut loaded);
        let (out, entries) = change(&loaded.sessions);
        if entries.is_empty() {
            return (out, Ok(()));
        }
        let t = now();
        let count = entries.len();
        let lines_add_token = entries
            .iter()
            .any(|e| matches!(e, Entry::Create { token: Some(_), .. }));
        let mut lines = Vec::new();
        for entry in entries {
            lines.extend_from_slice(&entry.line());
            loaded.apply(entry, t);
        }
        if let Err(e) = lock {
            // Writing unlocked could interleave with another process: keep it in memory.
            return (out, Err(e));
        }
        match read {
            Ok(()) => {}
            // A damaged journal is replaced by what this process knows, as a damaged legacy
            // file was; anything else (out of file descriptors, say) may pass, and rewriting
            // from a stale view could bring back what another process revoked.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return (out, self.compact(&mut loaded));
            }
            Err(e) => return (out, Err(e)),
        }
        let live = loaded.sessions.len();
        let result = match loaded.source {
            Source::Journal(pos)
                if pos.lines + count <= 2 * live + self.compact_slack
                    && (pos.format == JOURNAL_FORMAT_TOKENS || !lines_add_token) =>
            {
                self.append(pos, &lines).map(|pos| {
                    loaded.source = Source::Journal(pos);
                })
            }
            // Without a journal (the first change, or a legacy file to migrate), when it has
            // grown past the bound, or for a first token in a journal older versions read:
            // write it whole from memory.
            _ => self.compact(&mut loaded),
        };
        (out, result)
    }

    /// Appends whole lines after `pos` (terminating a torn last line first) and syncs them.
    fn append(&self, mut pos: JournalPos, lines: &[u8]) -> std::io::Result<JournalPos> {
        let mut file = std::fs::OpenOptions::new().append(true).open(&self.path)?;
        let mut buf = Vec::with_capacity(lines.len() + 1);
        if pos.len > pos.offset {
            // A crash tore the last line: end it so that ours starts on a line of its own.
            buf.push(b'\n');
            pos.lines += 1;
        }
        buf.extend_from_slice(lines);
        file.write_all(&buf)?;
        // A revocation that a crash could undo would bring a revoked token back.
        file.sync_data()?;
        pos.len += buf.len() as u64;
        pos.offset = pos.len;
        pos.lines += lines.iter().filter(|&&b| b == b'\n').count();
        Ok(pos)
    }

    /// Rewrites the journal atomically with only the live sessions, oldest first, and retires
    /// the legacy file.
    fn compact(&self, loaded: &mut Loaded) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let t = now();
        loaded.sessions.retain(|_, l| l.record.expires > t);
        let mut live: Vec<_> = loaded.sessions.iter().collect();
        live.sort_by_key(|(_, l)| l.seq);
        let format = if live.iter().any(|(_, l)| l.record.token.is_some()) {
            JOURNAL_FORMAT_TOKENS
        } else {
            JOURNAL_FORMAT
        };
        let mut bytes = Entry::Header { format }.line();
        for (id, l) in &live {
            bytes.extend_from_slice(&Entry::create(id, &l.record).line());
        }
        let existed = self.path.exists();
        write_atomic(&self.path, &bytes, Mode::KeepOr(0o600))?;
        let file = std::fs::File::open(&self.path)?;
        if !existed {
            give_to_folder_owner(&file, &self.path);
        }
        let meta = file.metadata()?;
        loaded.source = Source::Journal(JournalPos {
            ino: meta.ino(),
            offset: bytes.len() as u64,
            len: bytes.len() as u64,
            lines: live.len() + 1,
            format,
        });
        match std::fs::remove_file(&self.legacy_path) {
            Ok(()) => xfer_util::fs::sync_dir(xfer_util::fs::parent_dir(&self.path))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // The journal wins over it from now on; a leftover only takes space.
            Err(e) => {
                tracing::warn!(path = %self.legacy_path.display(), error = %e, "cannot remove the old sessions file")
            }
        }
        Ok(())
    }

    /// Starts a session for `user` (evicting their oldest beyond `sessions.max_per_user`) and
    /// returns its token (the only copy of it) and record.
    pub fn create(&self, user: &str, generation: u64, source: &str) -> (String, SessionRecord) {
        let created = now();
        let record = SessionRecord {
            user: user.into(),
            generation,
            created,
            expires: created.saturating_add(self.ttl_secs as i64),
            source: source.into(),
            token: None,
        };
        let token = new_token();
        let key = token_key(&token);
        let max = self.max_per_user;
        let ((), result) = self.modify(|map| {
            // Logins evict logins only: a login must never end a long-lived token.
            let mut theirs: Vec<_> = map
                .iter()
                .filter(|(_, l)| {
                    l.record.user == user && l.record.token.is_none() && l.record.expires > created
                })
                .map(|(id, l)| (l.seq, id))
                .collect();
            let mut entries = Vec::new();
            if theirs.len() >= max {
                let evict = theirs.len() + 1 - max;
                // The `evict` oldest first, without sorting the rest.
                theirs.select_nth_unstable(evict - 1);
                for (_, id) in &theirs[..evict] {
                    entries.push(Entry::Revoke {
                        id: (*id).clone(),
                    });
                }
                tracing::info!(user = %user, evicted = evict, max, "session limit reached; oldest sessions revoked");
            }
            entries.push(Entry::create(&key, &record));
            ((), entries)
        });
        if let Err(e) = result {
            tracing::error!(path = %self.path.display(), error = %e, "cannot save the new session; other processes will not see it and it will not survive a restart");
        }
        (token, record)
    }

    /// Starts a long-lived token session for `user`, living `ttl_secs`, unless they hold
    /// `max_tokens` live tokens already. Unlike a login, it fails when it cannot be recorded:
    /// a token that would not survive a restart is worse than none. Returns the token, its
    /// short id and its record.
    pub fn create_token(
        &self,
        user: &str,
        generation: u64,
        source: &str,
        scope: TokenScope,
        ttl_secs: u64,
        max_tokens: usize,
    ) -> Result<(String, String, SessionRecord), TokenRefusal> {
        let created = now();
        let record = SessionRecord {
            user: user.into(),
            generation,
            created,
            expires: created.saturating_add(ttl_secs as i64),
            source: source.into(),
            token: Some(scope),
        };
        let token = new_token();
        let key = token_key(&token);
        let (allowed, result) = self.modify(|map| {
            let theirs = map
                .values()
                .filter(|l| {
                    l.record.user == user && l.record.token.is_some() && l.record.expires > created
                })
                .count();
            if theirs >= max_tokens {
                return (false, vec![]);
            }
            (true, vec![Entry::create(&key, &record)])
        });
        if !allowed {
            return Err(TokenRefusal::TooMany(max_tokens));
        }
        if let Err(e) = result {
            // In memory it was recorded: take it back so it is not usable until a restart.
            self.lock_inner().sessions.remove(&key);
            return Err(TokenRefusal::Io(e));
        }
        Ok((token, short_id(&key).to_string(), record))
    }

    /// The session for `token` if it exists, has not expired and its account's current
    /// generation (from `current_generation`) matches.
    ///
    /// Only a newer generation revokes the session for good. An account that cannot be found
    /// (`None`) or that looks older than the session (a users file read before another process
    /// changed it) only refuses this request: a half-written users file must never end
    /// sessions. Deleting an account revokes its sessions explicitly (`xferd user del`).
    pub fn validate(
        &self,
        token: &str,
        current_generation: impl FnOnce(&str) -> Option<u64>,
    ) -> Option<SessionRecord> {
        let key = token_key(token);
        let record = {
            let mut loaded = self.lock_inner();
            let _ = self.refresh(&mut loaded);
            loaded.sessions.get(&key)?.record.clone()
        };
        if record.expires <= now() {
            return None;
        }
        match current_generation(&record.user) {
            Some(g) if g == record.generation => Some(record),
            Some(g) if g > record.generation => {
                let ((), revoked) = self.modify(|map| {
                    let entries = match map.contains_key(&key) {
                        true => vec![Entry::Revoke { id: key.clone() }],
                        false => vec![],
                    };
                    ((), entries)
                });
                if let Err(e) = revoked {
                    tracing::error!(path = %self.path.display(), error = %e, "cannot record a revoked session; it stays refused");
                }
                None
            }
            _ => None,
        }
    }

    /// Ends the session for `token`; true if there was one.
    pub fn revoke(&self, token: &str) -> bool {
        let key = token_key(token);
        let (found, result) = self.modify(|map| match map.contains_key(&key) {
            true => (true, vec![Entry::Revoke { id: key.clone() }]),
            false => (false, vec![]),
        });
        if let Err(e) = result {
            tracing::error!(path = %self.path.display(), error = %e, "cannot record a revoked session; other processes and a restart may still accept it");
        }
        found
    }

    /// Ends every session whose id starts with `id_prefix` (at least 6 hex digits; `""` for
    /// all) or, with `user`, every session of that user. Returns how many ended.
    pub fn revoke_matching(
        &self,
        id_prefix: Option<&str>,
        user: Option<&str>,
    ) -> std::io::Result<usize> {
        self.revoke_where(|key, r| {
            id_prefix.is_some_and(|p| key.starts_with(p)) || user.is_some_and(|u| r.user == u)
        })
    }

    /// Ends every session for which `hit(full id, record)` holds; returns how many ended.
    pub fn revoke_where(
        &self,
        hit: impl Fn(&str, &SessionRecord) -> bool,
    ) -> std::io::Result<usize> {
        let (n, result) = self.modify(|map| {
            let entries: Vec<_> = map
                .iter()
                .filter(|(key, l)| hit(key, &l.record))
                .map(|(key, _)| Entry::Revoke { id: key.clone() })
                .collect();
            (entries.len(), entries)
        });
        result.map(|()| n)
    }

    /// Live sessions as `(id, record)`, oldest first.
    pub fn list(&self) -> Vec<(String, SessionRecord)> {
        let mut loaded = self.lock_inner();
        let _ = self.refresh(&mut loaded);
        let t = now();
        let mut out: Vec<_> = loaded
            .sessions
            .iter()
            .filter(|(_, l)| l.record.expires > t)
            .map(|(k, l)| (l.seq, short_id(k).to_string(), l.record.clone()))
            .collect();
        out.sort_by_key(|(seq, ..)| *seq);
        out.into_iter().map(|(_, id, r)| (id, r)).collect()
    }
}

/// Gives a file that this process just created in the state folder to the folder's owner: an
/// administrator running `xferd session`/`xferd user` as root must not leave files the
/// daemon's own user cannot open. Only root can give a file away; for anyone else the owner is
/// already right.
fn give_to_folder_owner(file: &std::fs::File, path: &Path) {
    use std::os::unix::fs::MetadataExt;
    if let Ok(dir) = std::fs::metadata(xfer_util::fs::parent_dir(path)) {
        let _ = std::os::unix::fs::fchown(file, Some(dir.uid()), Some(dir.gid()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(max_per_user: usize) -> SessionSettings {
        SessionSettings {
            ttl_secs: 3600,
            max_per_user,
            ..Default::default()
        }
    }

    fn open(dir: &Path) -> LocalSessions {
        LocalSessions::open(dir, &settings(100)).unwrap()
    }

    fn journal(dir: &Path) -> String {
        std::fs::read_to_string(dir.join(JOURNAL_FILE)).unwrap()
    }

    #[test]
    fn tokens_validate_survive_reopen_and_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (token, rec) = store.create("alice", 1, "127.0.0.1:5");
        assert!(token.starts_with(TOKEN_PREFIX));
        assert!(token.len() >= TOKEN_PREFIX.len() + 43);
        assert_eq!(store.validate(&token, |_| Some(1)), Some(rec.clone()));
        // The token itself never reaches the disk.
        assert!(!journal(dir.path()).contains(&token[TOKEN_PREFIX.len()..]));
        let reopened = open(dir.path());
        assert_eq!(reopened.validate(&token, |_| Some(1)), Some(rec));
        assert!(reopened.revoke(&token));
        assert_eq!(reopened.validate(&token, |_| Some(1)), None);
        assert_eq!(open(dir.path()).validate(&token, |_| Some(1)), None);
        assert_eq!(store.validate("xfer1_nonsense", |_| Some(1)), None);
    }

    #[test]
    fn a_newer_generation_revokes_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (t1, _) = store.create("alice", 1, "x");
        assert_eq!(store.validate(&t1, |_| Some(2)), None);
        assert_eq!(store.validate(&t1, |_| Some(1)), None, "stays revoked");
        assert_eq!(open(dir.path()).validate(&t1, |_| Some(1)), None);
    }

    #[test]
    fn a_missing_account_or_an_older_generation_refuses_without_revoking() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (t, _) = store.create("bob", 5, "x");
        // A users file read half-written (bob missing), or one older than the session.
        assert_eq!(store.validate(&t, |_| None), None);
        assert_eq!(store.validate(&t, |_| Some(4)), None);
        // Once the file reads whole again, the session is still there.
        assert!(store.validate(&t, |_| Some(5)).is_some());
        assert!(
            store
                .validate(&t, |_| Some(5))
                .is_some_and(|r| r.user == "bob")
        );
        assert!(store.validate(&t, |_| Some(6)).is_none());
        assert!(store.validate(&t, |_| Some(5)).is_none(), "revoked by 6");
    }

    #[test]
    fn a_second_process_sees_and_revokes_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = open(dir.path());
        let (t1, _) = daemon.create("alice", 1, "a");
        let (t2, _) = daemon.create("bob", 1, "b");
        // What `xferd session` does: its own store on the same folder.
        let admin = open(dir.path());
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
        assert_eq!(admin.revoke_matching(Some(&alice_id), None).unwrap(), 1);
        // The daemon notices the journal grew.
        assert_eq!(daemon.validate(&t1, |_| Some(1)), None);
        assert!(daemon.validate(&t2, |_| Some(1)).is_some());
        // And a session the daemon creates later does not resurrect the revoked one.
        let (t3, _) = daemon.create("carol", 1, "c");
        assert_eq!(admin.revoke_matching(None, Some("bob")).unwrap(), 1);
        assert_eq!(daemon.validate(&t2, |_| Some(1)), None);
        assert!(daemon.validate(&t3, |_| Some(1)).is_some());
        assert_eq!(daemon.validate(&t1, |_| Some(1)), None);
        assert!(admin.validate(&t3, |_| Some(1)).is_some(), "admin sees t3");
    }

    #[test]
    fn two_daemons_agree_across_appends_and_compactions() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let small = |dir: &Path| LocalSessions {
            compact_slack: 8,
            ..LocalSessions::open(dir, &settings(10_000)).unwrap()
        };
        let a = small(dir.path());
        let b = small(dir.path());
        let mut tokens = Vec::new();
        let mut compactions = 0;
        let mut ino = 0;
        // Enough churn that both compact several times, each behind the other's back.
        for i in 0..300 {
            let (store, other) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
            let (t, _) = store.create(&format!("u{}", i % 7), 1, "x");
            assert!(other.validate(&t, |_| Some(1)).is_some(), "{i}");
            if i % 3 != 0 {
                assert!(other.revoke(&t));
                assert!(store.validate(&t, |_| Some(1)).is_none(), "{i}");
            } else {
                tokens.push(t);
            }
            let now_ino = std::fs::metadata(dir.path().join(JOURNAL_FILE))
                .unwrap()
                .ino();
            compactions += usize::from(now_ino != ino);
            ino = now_ino;
        }
        assert!(compactions > 5, "{compactions}");
        let lines = journal(dir.path()).lines().count();
        assert!(lines <= 2 * tokens.len() + 8 + 3, "compacted: {lines}");
        for t in &tokens {
            assert!(a.validate(t, |_| Some(1)).is_some());
            assert!(b.validate(t, |_| Some(1)).is_some());
        }
        assert_eq!(a.list().len(), tokens.len());
        assert_eq!(
            a.list()
                .iter()
                .map(|(id, _)| id.clone())
                .collect::<Vec<_>>(),
            b.list()
                .iter()
                .map(|(id, _)| id.clone())
                .collect::<Vec<_>>(),
            "same sessions in the same order"
        );
        assert_eq!(open(dir.path()).list().len(), tokens.len());
        assert_eq!(check_file(dir.path()).unwrap(), tokens.len());
    }

    #[test]
    fn sessions_per_user_are_capped_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalSessions::open(dir.path(), &settings(3)).unwrap();
        let tokens: Vec<_> = (0..5).map(|_| store.create("alice", 1, "x").0).collect();
        let (bob, _) = store.create("bob", 1, "x");
        let alive: Vec<_> = tokens
            .iter()
            .map(|t| store.validate(t, |_| Some(1)).is_some())
            .collect();
        assert_eq!(alive, [false, false, true, true, true]);
        assert!(store.validate(&bob, |_| Some(1)).is_some());
        assert_eq!(store.list().len(), 4);
        // Another process agrees on who was evicted.
        let other = LocalSessions::open(dir.path(), &settings(3)).unwrap();
        assert!(other.validate(&tokens[1], |_| Some(1)).is_none());
        assert!(other.validate(&tokens[2], |_| Some(1)).is_some());
        other.create("alice", 1, "y");
        assert!(store.validate(&tokens[2], |_| Some(1)).is_none());
        assert!(store.validate(&tokens[3], |_| Some(1)).is_some());
    }

    #[test]
    fn a_login_appends_a_line_instead_of_rewriting_the_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.create("alice", 1, "x");
        let ino = std::fs::metadata(dir.path().join(JOURNAL_FILE))
            .unwrap()
            .ino();
        for _ in 0..50 {
            store.create("alice", 1, "x");
        }
        let meta = std::fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap();
        assert_eq!(meta.ino(), ino, "appended in place, not replaced");
        assert_eq!(journal(dir.path()).lines().count(), 1 + 51);
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_terminated_by_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (t1, _) = store.create("alice", 1, "x");
        // A crash in the middle of an append.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(JOURNAL_FILE))
            .unwrap();
        f.write_all(br#"{"op":"revoke","id":"#).unwrap();
        drop(f);
        let reopened = open(dir.path());
        assert!(reopened.validate(&t1, |_| Some(1)).is_some());
        assert_eq!(check_file(dir.path()).unwrap(), 1);
        let (t2, _) = reopened.create("bob", 1, "x");
        for s in [&store, &reopened, &open(dir.path())] {
            assert!(s.validate(&t1, |_| Some(1)).is_some());
            assert!(s.validate(&t2, |_| Some(1)).is_some());
        }
        assert!(store.revoke(&t2));
        assert!(open(dir.path()).validate(&t2, |_| Some(1)).is_none());
    }

    #[test]
    fn a_legacy_sessions_json_is_read_and_migrated_on_the_first_write() {
        let dir = tempfile::tempdir().unwrap();
        let token = "xfer1_legacy";
        let mut sessions = HashMap::new();
        sessions.insert(
            token_key(token),
            SessionRecord {
                user: "alice".into(),
                generation: 3,
                created: now(),
                expires: now() + 100,
                source: "x".into(),
                token: None,
            },
        );
        let legacy = dir.path().join(LEGACY_FILE);
        std::fs::write(
            &legacy,
            serde_json::to_vec(&LegacyFile { sessions }).unwrap(),
        )
        .unwrap();
        assert_eq!(check_file(dir.path()).unwrap(), 1);
        let store = open(dir.path());
        assert!(store.validate(token, |_| Some(3)).is_some());
        store.create("bob", 1, "x");
        assert!(!legacy.exists(), "migrated");
        assert_eq!(check_file(dir.path()).unwrap(), 2);
        assert!(open(dir.path()).validate(token, |_| Some(3)).is_some());
        // A damaged legacy file stops the start with a message, as before.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LEGACY_FILE), b"{ not json").unwrap();
        let err = LocalSessions::open(dir.path(), &settings(1)).err().unwrap();
        assert!(err.to_string().contains("delete it"), "{err}");
    }

    #[test]
    fn a_foreign_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(JOURNAL_FILE), b"hello\n").unwrap();
        assert!(check_file(dir.path()).is_err());
        assert!(LocalSessions::open(dir.path(), &settings(1)).is_err());
    }

    fn scope(read_only: bool, path: &str) -> TokenScope {
        TokenScope {
            name: "nightly".into(),
            read_only,
            path: path.into(),
        }
    }

    #[test]
    fn tokens_keep_their_scope_across_processes_and_have_their_own_cap() {
        let dir = tempfile::tempdir().unwrap();
        // One login per user: tokens neither count against it nor get evicted by logins.
        let store = LocalSessions::open(dir.path(), &settings(1)).unwrap();
        let (login, _) = store.create("alice", 1, "x");
        let (t1, id1, rec) = store
            .create_token("alice", 1, "x", scope(true, "backups/h1"), 90 * 86400, 2)
            .unwrap();
        assert_eq!(rec.expires - rec.created, 90 * 86400);
        assert_eq!(id1.len(), 12);
        let (t2, _, _) = store
            .create_token("alice", 1, "x", scope(false, ""), 60, 2)
            .unwrap();
        assert!(matches!(
            store.create_token("alice", 1, "x", scope(false, ""), 60, 2),
            Err(TokenRefusal::TooMany(2))
        ));
        // Another user has a cap of their own.
        assert!(
            store
                .create_token("bob", 1, "x", scope(false, ""), 60, 2)
                .is_ok()
        );
        let (login2, _) = store.create("alice", 1, "x");
        assert!(store.validate(&login, |_| Some(1)).is_none(), "evicted");
        assert!(store.validate(&login2, |_| Some(1)).is_some());
        for s in [&store, &open(dir.path())] {
            let got = s.validate(&t1, |_| Some(1)).unwrap();
            assert_eq!(got.token, Some(scope(true, "backups/h1")));
            assert_eq!(got.kind(), "token");
            assert!(s.validate(&t2, |_| Some(1)).is_some());
        }
        // A journal holding a token is one older versions refuse rather than misread.
        let text = journal(dir.path());
        assert!(text.starts_with(r#"{"op":"header","format":2}"#), "{text}");
        // Only the owner's token revokes, and only a token.
        let other = open(dir.path());
        let login_id = &token_key(&login2)[..12];
        assert_eq!(
            other
                .revoke_where(|k, r| r.user == "alice"
                    && r.token.is_some()
                    && k.starts_with(login_id))
                .unwrap(),
            0
        );
        assert_eq!(
            other
                .revoke_where(|k, r| r.user == "bob" && r.token.is_some() && k.starts_with(&id1))
                .unwrap(),
            0
        );
        assert_eq!(
            other
                .revoke_where(|k, r| r.user == "alice" && r.token.is_some() && k.starts_with(&id1))
                .unwrap(),
            1
        );
        assert!(store.validate(&t1, |_| Some(1)).is_none(), "revoked");
        assert!(store.validate(&login2, |_| Some(1)).is_some());
        // A password change ends tokens as it ends logins.
        assert!(store.validate(&t2, |_| Some(2)).is_none());
        assert!(store.validate(&t2, |_| Some(1)).is_none());
    }

    #[test]
    fn a_token_added_to_an_old_format_journal_rewrites_it_in_the_new_format() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.create("alice", 1, "x");
        assert!(journal(dir.path()).starts_with(r#"{"op":"header","format":1}"#));
        let (t, _, _) = store
            .create_token("alice", 1, "x", scope(true, ""), 60, 5)
            .unwrap();
        assert!(journal(dir.path()).starts_with(r#"{"op":"header","format":2}"#));
        assert!(open(dir.path()).validate(&t, |_| Some(1)).is_some());
        assert_eq!(check_file(dir.path()).unwrap(), 2);
    }

    #[test]
    fn expired_sessions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (t, _) = store.create("alice", 1, "x");
        for live in store.lock_inner().sessions.values_mut() {
            live.record.expires = now() - 1;
        }
        assert_eq!(store.validate(&t, |_| Some(1)), None);
    }

    /// Login cost with 10,000 live sessions: `cargo test --release -p xferd --lib
    /// figures_login_cost -- --ignored --nocapture` (TMPDIR picks the filesystem).
    #[test]
    #[ignore = "prints FIGURES; run by hand"]
    fn figures_login_cost_with_10000_sessions() {
        let dir = tempfile::tempdir().unwrap();
        for (label, users) in [("one user", 1), ("100 users", 100)] {
            let store = LocalSessions::open(dir.path(), &settings(10_000)).unwrap();
            store.revoke_matching(Some(""), None).unwrap();
            for i in 0..10_000 {
                store.create(&format!("u{}", i % users), 1, "127.0.0.1:5555");
            }
            let n = 200;
            let t = std::time::Instant::now();
            for i in 0..n {
                store.create(&format!("u{}", i % users), 1, "127.0.0.1:5555");
            }
            let per_login = t.elapsed().as_secs_f64() * 1000.0 / n as f64;
            let (token, _) = store.create("u0", 1, "127.0.0.1:5555");
            let t = std::time::Instant::now();
            for _ in 0..1000 {
                assert!(store.validate(&token, |_| Some(1)).is_some());
            }
            let per_check = t.elapsed().as_secs_f64() * 1e6 / 1000.0;
            let bytes = std::fs::metadata(dir.path().join(JOURNAL_FILE))
                .unwrap()
                .len();
            println!(
                "FIGURES sessions={} ({label}) dir={} per_login_ms={per_login:.3} per_token_check_us={per_check:.1} journal_bytes={bytes}",
                store.list().len(),
                dir.path().display()
            );
        }
    }
}
