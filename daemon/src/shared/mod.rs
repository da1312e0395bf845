//! What several daemons on one object store share besides users' files: the accounts
//! ([`users`]), signed session tokens ([`token`]) and the session registry and revocations
//! ([`sessions`]), all under the hidden prefix `PREFIX/.xfer/` of the bucket.
//!
//! The design: a token carries its own claims under a MAC keyed by a secret every node holds
//! (`session_key_file`), so any node verifies any node's token without asking the store; what
//! must be shared is only what ends a token early (its id under `.xfer/revoked/`, or a newer
//! account generation in `.xfer/users.toml`). Each node polls both every
//! `sessions.sync_interval_ms` (2 s) and keeps them in memory, so checking a token on the
//! request path never waits for the network, and a change made on one node is in force on
//! every node within two polls.
//!
//! [`SharedStore`] is the thin, limited client all three use. [`open`] builds the daemon's
//! accounts and session store for `[storage] kind = "s3"`.

pub mod sessions;
pub mod token;
pub mod users;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::{Path as Key, PathPart};
use object_store::{
    GetOptions, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
};

use crate::config::Config;

/// The hidden prefix (under the configured one) of everything daemons keep for themselves.
pub const INTERNAL: &str = crate::storage::object::INTERNAL;

/// Why a request to the shared store failed. Names the internal object, never a credential.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// The store failed or refused.
    #[error("{op} `{key}` on the object store: {source}")]
    Store {
        /// What was being done.
        op: &'static str,
        /// The internal object concerned.
        key: String,
        /// The store's error.
        source: object_store::Error,
    },
    /// An object is bigger than anything the daemon writes there.
    #[error("`{key}` on the object store holds {size} bytes, more than the {max} allowed")]
    TooBig {
        /// The internal object.
        key: String,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// A listing returned more entries than the limit.
    #[error("`{key}` on the object store lists more than {max} entries")]
    TooMany {
        /// The prefix listed.
        key: String,
        /// The limit.
        max: usize,
    },
    /// An object is not the JSON the daemon writes there.
    #[error("`{key}` on the object store is damaged: {source}")]
    Damaged {
        /// The internal object.
        key: String,
        /// Why.
        source: serde_json::Error,
    },
    /// Another writer changed the object on every one of several attempts.
    #[error(
        "`{0}` kept changing under this edit (another administrator or node writing it); try again"
    )]
    Conflict(String),
    /// The change itself was refused (bad name, no such user, ...).
    #[error(transparent)]
    Account(#[from] crate::accounts::AccountError),
}

impl From<SharedError> for std::io::Error {
    fn from(e: SharedError) -> Self {
        std::io::Error::other(e)
    }
}

/// What a read of an internal object found.
#[derive(Debug)]
pub enum Fetched {
    /// Nothing there.
    Missing,
    /// The ETag given is still current.
    NotModified,
    /// The object's bytes and ETag.
    Found {
        /// The whole object.
        bytes: Bytes,
        /// Its version tag (for conditional reads and writes).
        e_tag: Option<String>,
    },
}

/// A client for the internal objects `PREFIX/.xfer/...` of the bucket.
#[derive(Clone)]
pub struct SharedStore {
    /// The client (its `Debug` redacts credentials).
    s3: Arc<dyn ObjectStore>,
    /// Path parts of `PREFIX/.xfer`.
    root: Vec<PathPart<'static>>,
}

impl std::fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStore")
            .field("root", &self.key(&[]).to_string())
            .finish_non_exhaustive()
    }
}

impl SharedStore {
    /// Internal objects of `s3` under `PREFIX/.xfer/` (`prefix` as `[storage] prefix`).
    pub fn new(s3: Arc<dyn ObjectStore>, prefix: &str) -> SharedStore {
        let mut root: Vec<PathPart<'static>> = prefix
            .split('/')
            .filter(|p| !p.is_empty())
            .map(|p| PathPart::from(p.to_string()))
            .collect();
        root.push(PathPart::from(INTERNAL));
        SharedStore { s3, root }
    }

    /// The internal objects of the daemon's object store.
    pub fn of(store: &crate::storage::object::ObjectStore) -> SharedStore {
        let (s3, prefix) = store.internal();
        SharedStore::new(s3, &prefix)
    }

    /// The store as configured in `[storage]` (kind = "s3"), with its credentials.
    pub fn from_config(config: &Config) -> anyhow::Result<SharedStore> {
        let creds = crate::storage::object::Credentials::load(&config.storage)?;
        let store = crate::storage::object::ObjectStore::open(&config.storage, creds)?;
        Ok(SharedStore::of(&store))
    }

    /// The key `PREFIX/.xfer/PART/...`; each part is escaped by `object_store`, so a user name
    /// with unusual characters stays one part.
    pub fn key(&self, parts: &[&str]) -> Key {
        Key::from_iter(
            self.root
                .iter()
                .cloned()
                .chain(parts.iter().map(|p| PathPart::from(p.to_string()))),
        )
    }

    /// Reads a whole object of at most `max` bytes; with `if_none_match`, only if its ETag moved.
    pub async fn get(
        &self,
        key: &Key,
        if_none_match: Option<String>,
        max: u64,
    ) -> Result<Fetched, SharedError> {
        let store = |source| SharedError::Store {
            op: "reading",
            key: key.to_string(),
            source,
        };
        let got = match self
            .s3
            .get_opts(
                key,
                GetOptions {
                    if_none_match,
                    ..Default::default()
                },
            )
            .await
        {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(Fetched::Missing),
            Err(object_store::Error::NotModified { .. }) => return Ok(Fetched::NotModified),
            Err(e) => return Err(store(e)),
        };
        // Checked before the body is read, so a huge object costs nothing.
        if got.meta.size > max {
            return Err(SharedError::TooBig {
                key: key.to_string(),
                size: got.meta.size,
                max,
            });
        }
        let e_tag = got.meta.e_tag.clone();
        let bytes = got.bytes().await.map_err(store)?;
        if bytes.len() as u64 > max {
            return Err(SharedError::TooBig {
                key: key.to_string(),
                size: bytes.len() as u64,
                max,
            });
        }
        Ok(Fetched::Found { bytes, e_tag })
    }

    /// Reads a small JSON object; `None` if it is missing.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &Key,
        max: u64,
    ) -> Result<Option<T>, SharedError> {
        match self.get(key, None, max).await? {
            Fetched::Found { bytes, .. } => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| SharedError::Damaged {
                        key: key.to_string(),
                        source,
                    })
            }
            _ => Ok(None),
        }
    }

    /// Writes an object (one PUT: atomic per object) in `mode`; returns its new ETag.
    pub async fn put(
        &self,
        key: &Key,
        bytes: Vec<u8>,
        mode: PutMode,
    ) -> Result<Option<String>, object_store::Error> {
        self.s3
            .put_opts(
                key,
                PutPayload::from(bytes),
                PutOptions {
                    mode,
                    ..Default::default()
                },
            )
            .await
            .map(|r| r.e_tag)
    }

    /// Writes a small JSON object, replacing any.
    pub async fn put_json<T: serde::Serialize>(
        &self,
        key: &Key,
        value: &T,
    ) -> Result<(), SharedError> {
        // Serialising the daemon's own plain records cannot fail.
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        self.put(key, bytes, PutMode::Overwrite)
            .await
            .map(|_| ())
            .map_err(|source| SharedError::Store {
                op: "writing",
                key: key.to_string(),
                source,
            })
    }

    /// The current ETag of an object, `None` if it is missing.
    pub async fn e_tag(&self, key: &Key) -> Result<Option<String>, SharedError> {
        match self.s3.head(key).await {
            Ok(meta) => Ok(meta.e_tag),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(SharedError::Store {
                op: "looking at",
                key: key.to_string(),
                source,
            }),
        }
    }

    /// Deletes an object; one already gone is fine.
    pub async fn delete(&self, key: &Key) -> Result<(), SharedError> {
        match self.s3.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(SharedError::Store {
                op: "deleting",
                key: key.to_string(),
                source,
            }),
        }
    }

    /// Every object under `prefix` at any depth (paginated by the store), at most `max`.
    pub async fn list(&self, prefix: &Key, max: usize) -> Result<Vec<ObjectMeta>, SharedError> {
        let mut out = Vec::new();
        let mut stream = self.s3.list(Some(prefix));
        while let Some(item) = stream.next().await {
            let meta = item.map_err(|source| SharedError::Store {
                op: "listing",
                key: prefix.to_string(),
                source,
            })?;
            if out.len() >= max {
                return Err(SharedError::TooMany {
                    key: prefix.to_string(),
                    max,
                });
            }
            out.push(meta);
        }
        Ok(out)
    }
}

/// The accounts and session store of a daemon with `[storage] kind = "s3"`: accounts from
/// the store's users object, tokens signed with `session_key_file`, revocations shared.
/// Reads the users object and the revocations once before returning, so a (re)started node
/// serves nothing before it knows them; then keeps both fresh in the background.
pub async fn open(
    config: &Config,
) -> anyhow::Result<(crate::accounts::Accounts, crate::sessions::SessionStore)> {
    use anyhow::Context;
    let store = SharedStore::from_config(config)?;
    let key = token::SessionKey::for_daemon(&config.session_key_file, &config.key)?;
    let interval = config.sessions.sync_interval();
    let users = users::UsersObject::new(store.clone());
    seed_accounts(&users, &config.users_file).await?;
    let accounts = crate::accounts::Accounts::from_store(
        users,
        interval,
        config.limits.max_concurrent_logins,
        config.limits.max_queued_logins,
    )
    .await?;
    let sessions = sessions::SharedSessions::open(store, key, &config.sessions)
        .await
        .context("reading the revoked sessions from the object store")?;
    Ok((accounts, crate::sessions::SessionStore::Shared(sessions)))
}

/// Puts the local users file in the store when the store has no accounts yet, so that
/// daemons started with the same users file (as a first deployment has) serve those users
/// with no `xferd user import` step. Once the store holds accounts they are the ones in force
/// and the local file is not read again.
async fn seed_accounts(users: &users::UsersObject, users_file: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    if !matches!(users.read(None).await?, users::UsersRead::Missing) || !users_file.exists() {
        return Ok(());
    }
    let local = crate::accounts::UsersFile::load(users_file)?;
    if local.users.is_empty() {
        return Ok(());
    }
    match users.import(&local, false).await {
        Ok(n) => {
            tracing::info!(accounts = n, file = %users_file.display(), "the object store had no accounts: seeded them from the users file");
            Ok(())
        }
        // Another node seeded it first: its accounts stand.
        Err(SharedError::Account(crate::accounts::AccountError::StoreHasUsers(_))) => Ok(()),
        Err(e) => Err(e).context("seeding the object store's accounts from the users file"),
    }
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Seconds since the epoch.
pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
