//! Sessions shared by several nodes: signed tokens ([`super::token`]) checked in memory, a
//! registry of live sessions and a list of revoked ones in the store.
//!
//! - Registry: one small JSON object per session, `.xfer/sessions/USER/ID.json` (user,
//!   generation, times, source), written at login, deleted at revocation. It serves
//!   `xferd session list`, `revoke --user` and `sessions.max_per_user`: after registering, a
//!   login lists its user's sessions and revokes the oldest beyond the limit (oldest by the
//!   store's time of the record, ties by id). Two logins at the limit on two nodes at the same
//!   moment may evict one session too many, or leave one too many until the user's next login
//!   (each lists before or after the other's record appears).
//! - Tokens (`xfer token create`): registered the same way under `.xfer/tokens/USER/ID.json`
//!   (with their name and scope), apart from logins so that a login's eviction never lists or
//!   ends them; `sessions.max_tokens_per_user` is checked against that folder before one is
//!   made (two made at once on two nodes may pass it by one). Their scope (read-only, path)
//!   is in the signed claims, so no node enforces it from anything the store says.
//! - Revocations: one object per revoked id, `.xfer/revoked/ID`, holding the token's expiry.
//!   Every node lists `.xfer/revoked/` every `sessions.sync_interval_ms` and keeps the ids in
//!   memory; the revoking node applies its own at once. The sweeper deletes revocations of
//!   expired tokens and the registry records of expired sessions, so the listing stays bounded
//!   by the revocations of one token lifetime.
//!
//! A token is accepted when its MAC holds, it has not expired, its generation is the
//! account's current one, and its id is not revoked: nothing on that path waits for the
//! network.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use futures::StreamExt;
use object_store::ObjectMeta;
use object_store::path::Path as Key;
use tokio::sync::Notify;

use super::token::{Claims, Scope, SessionKey};
use super::{SharedError, SharedStore, now};
use crate::config::SessionSettings;
use crate::sessions::{SessionRecord, TokenRefusal, TokenScope};

/// Folder of the registry.
const SESSIONS: &str = "sessions";

/// Folder of the long-lived tokens' registry.
const TOKENS: &str = "tokens";

/// Folder of the revocations.
const REVOKED: &str = "revoked";

/// Largest registry record or revocation read (they are about 200 bytes).
const MAX_RECORD: u64 = 4096;

/// Most revocations a listing holds in memory: far beyond what one token lifetime produces;
/// past it a poll fails (and is logged) rather than grow without bound.
pub const MAX_REVOKED: usize = 1_000_000;

/// Most registry records a listing holds (`session list`, `revoke`, the sweeper).
pub const MAX_LISTED: usize = 1_000_000;

/// Registry records read at once by `session list` and `revoke`.
const READ_AHEAD: usize = 16;

/// Polls between two sweeps of expired records.
const SWEEP_EVERY: u32 = 30;

/// What a revocation object holds.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Revocation {
    /// The revoked token's expiry: after it the object may go.
    expires: i64,
}

/// The registry and revocations in the store, without the token key: what `xferd session`
/// needs.
#[derive(Debug, Clone)]
pub struct SharedRegistry {
    /// The internal objects.
    store: SharedStore,
    /// `sessions.ttl_secs`: a record older than this is of an expired session.
    ttl_secs: u64,
    /// `sessions.token_max_days` in seconds: a token's record older than this is of an
    /// expired token (so the sweeper does not read every token's record every time).
    token_ttl_secs: u64,
}

impl SharedRegistry {
    /// The registry in `store`, for sessions that live `settings.ttl_secs`.
    pub fn new(store: SharedStore, settings: &SessionSettings) -> SharedRegistry {
        SharedRegistry {
            store,
            ttl_secs: settings.ttl_secs,
            token_ttl_secs: settings.token_max_secs(),
        }
    }

    fn record_key(&self, user: &str, id: &str, token: bool) -> Key {
        let folder = if token { TOKENS } else { SESSIONS };
        self.store.key(&[folder, user, &format!("{id}.json")])
    }

    fn revoked_key(&self, id: &str) -> Key {
        self.store.key(&[REVOKED, id])
    }

    /// The session id a registry or revocation object names (32 hex digits), if it is one.
    fn id_of(meta: &ObjectMeta) -> Option<String> {
        let name = meta.location.filename()?;
        let id = name.strip_suffix(".json").unwrap_or(name);
        (id.len() == 2 * super::token::ID_LEN && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| id.to_ascii_lowercase())
    }

    /// Whether a record written at `meta.last_modified` can only be of an expired session.
    fn surely_expired(&self, meta: &ObjectMeta, now: i64) -> bool {
        meta.last_modified.timestamp() + self.ttl_secs as i64 + 60 < now
    }

    /// Writes the registry record of a new session.
    async fn register(&self, id: &str, record: &SessionRecord) -> Result<(), SharedError> {
        self.store
            .put_json(
                &self.record_key(&record.user, id, record.token.is_some()),
                record,
            )
            .await
    }

    /// Records `id` (of `user`, expiring at `expires`, a long-lived token if `token`) as
    /// revoked and drops its registry record.
    async fn revoke_id(
        &self,
        user: &str,
        id: &str,
        expires: i64,
        token: bool,
    ) -> Result<(), SharedError> {
        self.store
            .put_json(&self.revoked_key(id), &Revocation { expires })
            .await?;
        self.store.delete(&self.record_key(user, id, token)).await
    }

    /// The ids of every revocation in the store.
    async fn revoked_ids(&self) -> Result<HashSet<String>, SharedError> {
        let listed = self
            .store
            .list(&self.store.key(&[REVOKED]), MAX_REVOKED)
            .await?;
        Ok(listed.iter().filter_map(Self::id_of).collect())
    }

    /// The registry records under `prefix` with their ids and records, read a few at once;
    /// records that vanished meanwhile (revoked) are left out.
    async fn records(&self, prefix: &Key) -> Result<Vec<(String, SessionRecord)>, SharedError> {
        let listed = self.store.list(prefix, MAX_LISTED).await?;
        let reads = futures::stream::iter(listed.into_iter().filter_map(|meta| {
            let id = Self::id_of(&meta)?;
            Some(async move {
                let rec: Option<SessionRecord> =
                    self.store.get_json(&meta.location, MAX_RECORD).await?;
                Ok::<_, SharedError>(rec.map(|r| (id, r)))
            })
        }))
        .buffer_unordered(READ_AHEAD);
        let mut out = Vec::new();
        futures::pin_mut!(reads);
        while let Some(r) = reads.next().await {
            if let Some(found) = r? {
                out.push(found);
            }
        }
        Ok(out)
    }

    /// Live sessions and tokens as `(short id, record)`, oldest first (`xferd session list`).
    pub async fn list(&self) -> Result<Vec<(String, SessionRecord)>, SharedError> {
        let revoked = self.revoked_ids().await?;
        let t = now();
        let mut out: Vec<_> = self
            .records(&self.store.key(&[SESSIONS]))
            .await?
            .into_iter()
            .chain(self.records(&self.store.key(&[TOKENS])).await?)
            .filter(|(id, r)| r.expires > t && !revoked.contains(id))
            .collect();
        out.sort_by(|a, b| a.1.created.cmp(&b.1.created).then(a.0.cmp(&b.0)));
        Ok(out
            .into_iter()
            .map(|(id, r)| (crate::sessions::short_id(&id).to_string(), r))
            .collect())
    }

    /// Revokes every registered session or token whose id starts with `id_prefix` (`""`:
    /// all) or, with `user`, every one of that user; returns the ids revoked and their expiry.
    pub async fn revoke_matching(
        &self,
        id_prefix: Option<&str>,
        user: Option<&str>,
    ) -> Result<Vec<(String, i64)>, SharedError> {
        let mut done = Vec::new();
        for folder in [SESSIONS, TOKENS] {
            // One user's folder when only a user is named; else all of them.
            let prefix = match (id_prefix, user) {
                (None, Some(u)) => self.store.key(&[folder, u]),
                _ => self.store.key(&[folder]),
            };
            done.extend(
                self.revoke_records(&prefix, |id, rec| {
                    id_prefix.is_some_and(|p| id.starts_with(p))
                        || user.is_some_and(|u| rec.user == u)
                })
                .await?,
            );
        }
        Ok(done)
    }

    /// Revokes the registered records under `prefix` for which `hit(id, record)` holds.
    async fn revoke_records(
        &self,
        prefix: &Key,
        hit: impl Fn(&str, &SessionRecord) -> bool,
    ) -> Result<Vec<(String, i64)>, SharedError> {
        let mut done = Vec::new();
        for (id, rec) in self.records(prefix).await? {
            if hit(&id, &rec) {
                self.revoke_id(&rec.user, &id, rec.expires, rec.token.is_some())
                    .await?;
                done.push((id, rec.expires));
            }
        }
        Ok(done)
    }

    /// `user`'s live, unrevoked tokens as `(full id, record)`, oldest first.
    async fn tokens_of(&self, user: &str) -> Result<Vec<(String, SessionRecord)>, SharedError> {
        let revoked = self.revoked_ids().await?;
        let t = now();
        let mut out: Vec<_> = self
            .records(&self.store.key(&[TOKENS, user]))
            .await?
            .into_iter()
            .filter(|(id, r)| r.user == user && r.expires > t && !revoked.contains(id))
            .collect();
        out.sort_by(|a, b| a.1.created.cmp(&b.1.created).then(a.0.cmp(&b.0)));
        Ok(out)
    }

    /// Deletes revocations of expired tokens and registry records of expired sessions;
    /// returns how many objects went. Only objects old enough to be expired are read.
    pub async fn sweep(&self) -> Result<usize, SharedError> {
        let t = now();
        let mut gone = 0;
        for (folder, revocation) in [(REVOKED, true), (SESSIONS, false), (TOKENS, false)] {
            let listed = self
                .store
                .list(&self.store.key(&[folder]), MAX_LISTED)
                .await?;
            for meta in listed {
                let old = match folder {
                    TOKENS => meta.last_modified.timestamp() + self.token_ttl_secs as i64 + 60 < t,
                    _ => self.surely_expired(&meta, t),
                };
                if !old {
                    // Registry records may still be of expired sessions when the ttl was
                    // shortened; they are read only past the ttl they were written under.
                    continue;
                }
                let expires = if revocation {
                    self.store
                        .get_json::<Revocation>(&meta.location, MAX_RECORD)
                        .await
                        .ok()
                        .flatten()
                        .map(|r| r.expires)
                } else {
                    self.store
                        .get_json::<SessionRecord>(&meta.location, MAX_RECORD)
                        .await
                        .ok()
                        .flatten()
                        .map(|r| r.expires)
                };
                // A damaged or unreadable object old enough to be expired goes too.
                if expires.is_none_or(|e| e <= t) {
                    self.store.delete(&meta.location).await?;
                    gone += 1;
                }
            }
        }
        Ok(gone)
    }
}

/// Ids revoked, as this node knows them.
#[derive(Debug, Default)]
struct Revoked {
    /// From the last complete listing of `.xfer/revoked/`.
    listed: HashSet<String>,
    /// Revoked by this node, with their expiry, until a listing shows them (or they expire):
    /// in force at once, whatever the store's listing says yet.
    pending: HashMap<String, i64>,
    /// Whether the last poll failed, so that failures and recovery are logged once.
    failing: bool,
}

impl Revoked {
    fn contains(&self, id: &str) -> bool {
        self.listed.contains(id) || self.pending.contains_key(id)
    }
}

/// What the poller and the request path share.
struct Inner {
    /// Registry and revocations in the store.
    registry: SharedRegistry,
    /// Signs and checks tokens.
    key: SessionKey,
    /// Seconds a token lives.
    ttl_secs: u64,
    /// Most live sessions per user.
    max_per_user: usize,
    /// The revoked ids in force.
    revoked: RwLock<Revoked>,
}

/// Sessions of a node that shares its users with other nodes through the object store.
pub struct SharedSessions {
    /// Shared with the background poller, which holds it weakly and stops once it is gone.
    inner: Arc<Inner>,
    /// Wakes the poller before its time (tests, SIGHUP).
    wake: Arc<Notify>,
}

impl std::fmt::Debug for SharedSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSessions")
            .field("registry", &self.inner.registry)
            .finish_non_exhaustive()
    }
}

impl SharedSessions {
    /// Reads the revocations once, then starts the background task that reads them again
    /// every `settings.sync_interval_ms` and sweeps expired records now and then. Must run
    /// inside a tokio runtime.
    pub async fn open(
        store: SharedStore,
        key: SessionKey,
        settings: &SessionSettings,
    ) -> Result<SharedSessions, SharedError> {
        let registry = SharedRegistry::new(store, settings);
        let listed = registry.revoked_ids().await?;
        let inner = Arc::new(Inner {
            registry,
            key,
            ttl_secs: settings.ttl_secs,
            max_per_user: settings.max_per_user.max(1),
            revoked: RwLock::new(Revoked {
                listed,
                ..Default::default()
            }),
        });
        let wake = Arc::new(Notify::new());
        tokio::spawn(poll(
            Arc::downgrade(&inner),
            wake.clone(),
            settings.sync_interval(),
        ));
        Ok(SharedSessions { inner, wake })
    }

    /// The registry, for listing and revoking.
    pub fn registry(&self) -> &SharedRegistry {
        &self.inner.registry
    }

    /// Starts a session: the signed token (valid on every node at once) and its record. Its
    /// registry record is written, and sessions beyond `max_per_user` evicted, in the
    /// background (errors are logged): the token does not depend on them. See
    /// [`SharedSessions::create_registered`] to wait for them.
    pub fn create(&self, user: &str, generation: u64, source: &str) -> (String, SessionRecord) {
        let (token, claims, record) = self.sign(user, generation, source);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let inner = self.inner.clone();
                let record = record.clone();
                rt.spawn(async move {
                    if let Err(e) = register(&inner, &claims, &record).await {
                        tracing::error!(user = %claims.user, error = %e, "cannot register the new session in the object store; it works, but `xferd session list` and the per-user limit do not see it");
                    }
                });
            }
            Err(_) => tracing::error!(user = %user, "no runtime to register the new session on"),
        }
        (token, record)
    }

    /// [`SharedSessions::create`], returning once the session is registered and the user's
    /// sessions beyond the limit are revoked.
    pub async fn create_registered(
        &self,
        user: &str,
        generation: u64,
        source: &str,
    ) -> Result<(String, SessionRecord), SharedError> {
        let (token, claims, record) = self.sign(user, generation, source);
        register(&self.inner, &claims, &record).await?;
        Ok((token, record))
    }

    fn sign(&self, user: &str, generation: u64, source: &str) -> (String, Claims, SessionRecord) {
        let created = now();
        let expires = created.saturating_add(self.inner.ttl_secs as i64);
        let claims = Claims::new(user, generation, created, expires);
        let record = SessionRecord {
            user: user.into(),
            generation,
            created,
            expires,
            source: source.into(),
            token: None,
        };
        (self.inner.key.sign(&claims), claims, record)
    }

    /// Makes a long-lived token for `user` living `ttl_secs` with `scope` in its signed
    /// claims, once the user's live tokens in the registry number fewer than `max_tokens`;
    /// returns it, its short id and its record once registered.
    pub async fn create_token(
        &self,
        user: &str,
        generation: u64,
        source: &str,
        scope: TokenScope,
        ttl_secs: u64,
        max_tokens: usize,
    ) -> Result<(String, String, SessionRecord), TokenRefusal> {
        let io = |e: SharedError| TokenRefusal::Io(e.into());
        let live = self.inner.registry.tokens_of(user).await.map_err(io)?;
        let live = {
            let r = self.inner.revoked.read().unwrap_or_else(|e| e.into_inner());
            live.iter().filter(|(id, _)| !r.contains(id)).count()
        };
        if live >= max_tokens {
            return Err(TokenRefusal::TooMany(max_tokens));
        }
        let created = now();
        let expires = created.saturating_add(ttl_secs as i64);
        let claims = Claims::new(user, generation, created, expires).with_scope(Scope {
            read_only: scope.read_only,
            path: scope.path.clone(),
        });
        let record = SessionRecord {
            user: user.into(),
            generation,
            created,
            expires,
            source: source.into(),
            token: Some(scope),
        };
        self.inner
            .registry
            .register(&claims.id_hex(), &record)
            .await
            .map_err(io)?;
        let id = crate::sessions::short_id(&claims.id_hex()).to_string();
        Ok((self.inner.key.sign(&claims), id, record))
    }

    /// `user`'s live tokens as `(short id, record)`, oldest first.
    pub async fn tokens_of(&self, user: &str) -> Result<Vec<(String, SessionRecord)>, SharedError> {
        let listed = self.inner.registry.tokens_of(user).await?;
        let r = self.inner.revoked.read().unwrap_or_else(|e| e.into_inner());
        Ok(listed
            .into_iter()
            .filter(|(id, _)| !r.contains(id))
            .map(|(id, rec)| (crate::sessions::short_id(&id).to_string(), rec))
            .collect())
    }

    /// Revokes `user`'s tokens whose id starts with `id_prefix`, in force on this node at
    /// once; returns how many.
    pub async fn revoke_token(&self, user: &str, id_prefix: &str) -> Result<usize, SharedError> {
        let registry = &self.inner.registry;
        let done = registry
            .revoke_records(&registry.store.key(&[TOKENS, user]), |id, rec| {
                rec.user == user && id.starts_with(id_prefix)
            })
            .await?;
        for (id, expires) in &done {
            self.inner.revoke_here(id, *expires);
        }
        Ok(done.len())
    }

    /// The session of `token` if its MAC holds, it has not expired, it is not revoked and its
    /// generation is the account's current one (`current_generation`). In memory only. The
    /// record's `source` is empty: the token does not carry it.
    pub fn validate(
        &self,
        token: &str,
        current_generation: impl FnOnce(&str) -> Option<u64>,
    ) -> Option<SessionRecord> {
        let claims = self.inner.key.verify(token)?;
        if claims.expires <= now() {
            return None;
        }
        if self.is_revoked(&claims.id_hex()) {
            return None;
        }
        // A newer generation (password or role changed) or a deleted account refuses it;
        // generations never repeat for a name, so the refusal lasts.
        if current_generation(&claims.user)? != claims.generation {
            return None;
        }
        Some(SessionRecord {
            user: claims.user,
            generation: claims.generation,
            created: claims.created,
            expires: claims.expires,
            source: String::new(),
            // The name is the registry's; what is enforced comes from the signed claims.
            token: claims.scope.map(|s| TokenScope {
                name: String::new(),
                read_only: s.read_only,
                path: s.path,
            }),
        })
    }

    fn is_revoked(&self, id: &str) -> bool {
        self.inner
            .revoked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }

    /// Ends the session of `token` on this node at once and on every node within two polls
    /// (the revocation is written in the background; errors are logged). True if it was live.
    pub fn revoke(&self, token: &str) -> bool {
        let Some(claims) = self.inner.key.verify(token) else {
            return false;
        };
        let id = claims.id_hex();
        if claims.expires <= now() || !self.inner.revoke_here(&id, claims.expires) {
            return false;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let inner = self.inner.clone();
                rt.spawn(async move {
                    if let Err(e) = inner
                        .registry
                        .revoke_id(&claims.user, &id, claims.expires, claims.scope.is_some())
                        .await
                    {
                        tracing::error!(user = %claims.user, error = %e, "cannot record a revoked session in the object store; other nodes still accept it");
                    }
                });
            }
            Err(_) => {
                tracing::error!(user = %claims.user, "no runtime to record a revoked session on")
            }
        }
        true
    }

    /// Revokes registered sessions by id prefix or user (see
    /// [`SharedRegistry::revoke_matching`]), in force on this node at once; returns how many.
    pub async fn revoke_matching(
        &self,
        id_prefix: Option<&str>,
        user: Option<&str>,
    ) -> Result<usize, SharedError> {
        let ids = self.inner.registry.revoke_matching(id_prefix, user).await?;
        for (id, expires) in &ids {
            self.inner.revoke_here(id, *expires);
        }
        Ok(ids.len())
    }

    /// Live sessions, oldest first (see [`SharedRegistry::list`]).
    pub async fn list(&self) -> Result<Vec<(String, SessionRecord)>, SharedError> {
        self.inner.registry.list().await
    }

    /// Reads the revocations now instead of at the next poll.
    pub async fn refresh(&self) -> Result<(), SharedError> {
        self.inner.refresh().await
    }

    /// Asks the background task to poll now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

impl Inner {
    /// Puts `id` in force here; false if it already was.
    fn revoke_here(&self, id: &str, expires: i64) -> bool {
        let mut r = self.revoked.write().unwrap_or_else(|e| e.into_inner());
        if r.contains(id) {
            return false;
        }
        r.pending.insert(id.to_string(), expires);
        true
    }

    /// Replaces the listed ids by a fresh listing; drops pending ones it shows or that
    /// expired. On error nothing changes.
    async fn refresh(&self) -> Result<(), SharedError> {
        let listed = self.registry.revoked_ids().await?;
        let t = now();
        let mut r = self.revoked.write().unwrap_or_else(|e| e.into_inner());
        r.pending.retain(|id, exp| *exp > t && !listed.contains(id));
        r.listed = listed;
        Ok(())
    }
}

/// Registers a new session and revokes its user's oldest beyond the limit.
async fn register(
    inner: &Inner,
    claims: &Claims,
    record: &SessionRecord,
) -> Result<(), SharedError> {
    let id = claims.id_hex();
    let registry = &inner.registry;
    registry.register(&id, record).await?;
    let t = now();
    let mut theirs: Vec<(ObjectMeta, String)> = registry
        .store
        .list(&registry.store.key(&[SESSIONS, &claims.user]), MAX_LISTED)
        .await?
        .into_iter()
        .filter(|m| !registry.surely_expired(m, t))
        .filter_map(|m| {
            let id = SharedRegistry::id_of(&m)?;
            Some((m, id))
        })
        .collect();
    {
        let r = inner.revoked.read().unwrap_or_else(|e| e.into_inner());
        theirs.retain(|(_, other)| !r.contains(other));
    }
    if theirs.len() <= inner.max_per_user {
        return Ok(());
    }
    theirs.sort_by(|a, b| (a.0.last_modified, &a.1).cmp(&(b.0.last_modified, &b.1)));
    let evict = theirs.len() - inner.max_per_user;
    let mut evicted = 0;
    for (meta, other) in theirs.iter().filter(|(_, other)| *other != id).take(evict) {
        let expires = registry
            .store
            .get_json::<SessionRecord>(&meta.location, MAX_RECORD)
            .await
            .ok()
            .flatten()
            .map(|r| r.expires)
            .unwrap_or_else(|| meta.last_modified.timestamp() + inner.ttl_secs as i64);
        inner.revoke_here(other, expires);
        registry
            .revoke_id(&claims.user, other, expires, false)
            .await?;
        evicted += 1;
    }
    tracing::info!(user = %claims.user, evicted, max = inner.max_per_user, "session limit reached; oldest sessions revoked");
    Ok(())
}

/// The background task: reads the revocations every `interval` (or when woken), sweeps now
/// and then, and stops once the sessions are dropped.
async fn poll(inner: Weak<Inner>, wake: Arc<Notify>, interval: Duration) {
    let mut polls: u32 = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = wake.notified() => {}
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let result = inner.refresh().await;
        {
            let mut r = inner.revoked.write().unwrap_or_else(|e| e.into_inner());
            match result {
                Ok(()) if r.failing => {
                    r.failing = false;
                    tracing::info!("revoked sessions read from the object store again");
                }
                Ok(()) => {}
                Err(e) if !r.failing => {
                    r.failing = true;
                    tracing::error!(error = %e, "cannot read the revoked sessions from the object store; keeping the ones known (revocations by other nodes wait until it answers)");
                }
                Err(_) => {}
            }
        }
        polls = polls.wrapping_add(1);
        if polls % SWEEP_EVERY == 0 {
            match inner.registry.sweep().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    removed = n,
                    "expired sessions and revocations swept from the object store"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot sweep expired sessions from the object store")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::shared::token::KEY_LEN;

    fn settings(max_per_user: usize) -> SessionSettings {
        SessionSettings {
            ttl_secs: 3600,
            max_per_user,
            sync_interval_ms: 50,
            ..Default::default()
        }
    }

    /// Two nodes on one (in-memory) bucket, with the same key.
    async fn two_nodes(max_per_user: usize) -> (SharedSessions, SharedSessions) {
        let bucket: Arc<dyn object_store::ObjectStore> =
            Arc::new(object_store::memory::InMemory::new());
        let node = || async {
            SharedSessions::open(
                SharedStore::new(bucket.clone(), "pre/fix"),
                SessionKey::from_bytes(&[9; KEY_LEN]),
                &settings(max_per_user),
            )
            .await
            .unwrap()
        };
        (node().await, node().await)
    }

    /// Waits until `cond` holds, failing after a generous deadline (never a fixed sleep).
    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "never happened: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_token_from_one_node_works_on_the_other_until_revoked() {
        let (a, b) = two_nodes(10).await;
        let (t, rec) = a.create_registered("alice", 7, "10.0.0.1:5").await.unwrap();
        let on_b = b.validate(&t, |u| (u == "alice").then_some(7)).unwrap();
        assert_eq!((on_b.user.as_str(), on_b.expires), ("alice", rec.expires));
        // The account's generation moved (password or role change), or it is gone.
        assert!(b.validate(&t, |_| Some(8)).is_none());
        assert!(b.validate(&t, |_| None).is_none());
        assert!(
            b.validate(&t, |_| Some(7)).is_some(),
            "only refused, not revoked"
        );
        // Listed with its source, by either node.
        let listed = b.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].1.source, "10.0.0.1:5");
        assert_eq!(listed[0].0.len(), 12);
        // Revoked on A: refused there at once, on B once its poller has read it.
        assert!(a.revoke(&t));
        assert!(a.validate(&t, |_| Some(7)).is_none());
        assert!(!a.revoke(&t), "already revoked");
        eventually("B refuses the revoked token", || {
            b.validate(&t, |_| Some(7)).is_none()
        })
        .await;
        b.refresh().await.unwrap();
        assert!(b.validate(&t, |_| Some(7)).is_none());
    }

    #[tokio::test]
    async fn a_scoped_token_is_enforced_from_its_claims_on_every_node() {
        let (a, b) = two_nodes(1).await;
        let scope = TokenScope {
            name: "nightly".into(),
            read_only: true,
            path: "backups/h1".into(),
        };
        let (t, id, rec) = a
            .create_token("alice", 3, "x", scope.clone(), 90 * 86400, 2)
            .await
            .unwrap();
        assert_eq!(rec.expires - rec.created, 90 * 86400);
        // B reads the scope from the signed token, not from the store.
        let on_b = b.validate(&t, |_| Some(3)).unwrap();
        assert_eq!(
            on_b.token,
            Some(TokenScope {
                name: String::new(),
                ..scope.clone()
            })
        );
        // Logins do not evict it (max_per_user is 1 here), and it is not a login.
        let (l1, _) = b.create_registered("alice", 3, "x").await.unwrap();
        let (l2, _) = b.create_registered("alice", 3, "x").await.unwrap();
        assert!(b.validate(&l1, |_| Some(3)).is_none());
        assert!(b.validate(&l2, |_| Some(3)).is_some());
        assert!(a.validate(&t, |_| Some(3)).is_some());
        // Listed with its name and scope, by user and by the administrator.
        let mine = b.tokens_of("alice").await.unwrap();
        assert_eq!(mine.len(), 1);
        assert_eq!(
            (mine[0].0.as_str(), mine[0].1.token.as_ref()),
            (id.as_str(), Some(&scope))
        );
        assert!(b.tokens_of("bob").await.unwrap().is_empty());
        let all = a.list().await.unwrap();
        assert_eq!(all.iter().filter(|(_, r)| r.token.is_some()).count(), 1);
        // The cap counts tokens only.
        a.create_token("alice", 3, "x", scope.clone(), 60, 2)
            .await
            .unwrap();
        assert!(matches!(
            b.create_token("alice", 3, "x", scope.clone(), 60, 2).await,
            Err(TokenRefusal::TooMany(2))
        ));
        // Another user cannot revoke it; its owner can, from any node.
        assert_eq!(b.revoke_token("bob", &id).await.unwrap(), 0);
        assert_eq!(b.revoke_token("alice", &id).await.unwrap(), 1);
        assert!(b.validate(&t, |_| Some(3)).is_none());
        eventually("A refuses the revoked token", || {
            a.validate(&t, |_| Some(3)).is_none()
        })
        .await;
        assert_eq!(b.tokens_of("alice").await.unwrap().len(), 1);
        assert!(b.validate(&l2, |_| Some(3)).is_some(), "the login stays");
    }

    #[tokio::test]
    async fn expired_forged_and_foreign_tokens_are_refused() {
        let (a, _) = two_nodes(10).await;
        let key = SessionKey::from_bytes(&[9; KEY_LEN]);
        let t = now();
        let expired = key.sign(&Claims::new("alice", 1, t - 100, t - 1));
        assert!(a.validate(&expired, |_| Some(1)).is_none());
        assert!(!a.revoke(&expired));
        let live = key.sign(&Claims::new("alice", 1, t, t + 100));
        assert!(a.validate(&live, |_| Some(1)).is_some());
        let foreign =
            SessionKey::from_bytes(&[8; KEY_LEN]).sign(&Claims::new("alice", 1, t, t + 100));
        assert!(a.validate(&foreign, |_| Some(1)).is_none());
        assert!(!a.revoke(&foreign), "a forged token revokes nothing");
    }

    #[tokio::test]
    async fn the_per_user_limit_holds_across_nodes_oldest_first() {
        let (a, b) = two_nodes(2).await;
        let (t1, _) = a.create_registered("alice", 1, "x").await.unwrap();
        let (t2, _) = b.create_registered("alice", 1, "x").await.unwrap();
        let (bob, _) = b.create_registered("bob", 1, "x").await.unwrap();
        let (t3, _) = a.create_registered("alice", 1, "x").await.unwrap();
        // A evicted t1 at once; B learns it from the store.
        assert!(a.validate(&t1, |_| Some(1)).is_none());
        eventually("B refuses the evicted token", || {
            b.validate(&t1, |_| Some(1)).is_none()
        })
        .await;
        for s in [&a, &b] {
            for t in [&t2, &t3, &bob] {
                assert!(s.validate(t, |_| Some(1)).is_some());
            }
        }
        let (t4, _) = b.create_registered("alice", 1, "x").await.unwrap();
        eventually("A refuses the next evicted token", || {
            a.validate(&t2, |_| Some(1)).is_none()
        })
        .await;
        assert!(a.validate(&t3, |_| Some(1)).is_some());
        assert!(a.validate(&t4, |_| Some(1)).is_some());
        let alice = a
            .list()
            .await
            .unwrap()
            .into_iter()
            .filter(|(_, r)| r.user == "alice")
            .count();
        assert_eq!(alice, 2);
    }

    #[tokio::test]
    async fn revoke_by_user_or_id_reaches_every_node() {
        let (a, b) = two_nodes(10).await;
        let (t1, _) = a.create_registered("alice", 1, "x").await.unwrap();
        let (t2, _) = b.create_registered("alice", 1, "y").await.unwrap();
        let (t3, _) = b.create_registered("bob", 1, "z").await.unwrap();
        // What `xferd session revoke --user alice` does: a registry without the key.
        let admin = a.registry().clone();
        assert_eq!(
            admin
                .revoke_matching(None, Some("alice"))
                .await
                .unwrap()
                .len(),
            2
        );
        eventually("both nodes refuse alice's tokens", || {
            [&a, &b].iter().all(|s| {
                s.validate(&t1, |_| Some(1)).is_none() && s.validate(&t2, |_| Some(1)).is_none()
            })
        })
        .await;
        assert!(a.validate(&t3, |_| Some(1)).is_some());
        let listed = admin.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        let bob_id = listed[0].0.clone();
        assert_eq!(a.revoke_matching(Some(&bob_id), None).await.unwrap(), 1);
        assert!(
            a.validate(&t3, |_| Some(1)).is_none(),
            "at once on the revoking node"
        );
        eventually("B refuses bob's token", || {
            b.validate(&t3, |_| Some(1)).is_none()
        })
        .await;
        assert!(admin.list().await.unwrap().is_empty());
        assert_eq!(admin.sweep().await.unwrap(), 0, "nothing expired yet");
    }
}
