//! The users file of several nodes: one object, `PREFIX/.xfer/users.toml`, in the same TOML
//! as the local users file. Nodes read it again when its ETag moves (a conditional GET every
//! `sessions.sync_interval_ms`, see [`crate::accounts::Accounts::from_store`]); `xferd user
//! ...` edits it: read, change, write back.
//!
//! The write back is conditional (`If-Match` on the ETag read, or `If-None-Match: *` for the
//! first) and retried on a conflict, on stores that honour conditional writes (AWS S3,
//! MinIO, R2). Garage 2.5 does not check those headers on PutObject (its `put.rs` has no
//! precondition handling), so there the edit checks the ETag again just before writing:
//! two edits that both pass that check within the same few milliseconds still race, and the
//! later write wins (the earlier change is lost, never half applied).

use std::path::PathBuf;

use object_store::path::Path as Key;
use object_store::{PutMode, UpdateVersion};

use super::{Fetched, SharedError, SharedStore};
use crate::accounts::{AccountError, UsersFile};

/// Name of the users object under `PREFIX/.xfer/`.
pub const USERS_OBJECT: &str = "users.toml";

/// Largest users object read (about 7,000 bytes per 50 accounts: room for 100,000).
pub const MAX_USERS_BYTES: u64 = 16 << 20;

/// Attempts of one edit before it gives up on a store that keeps changing under it.
const EDIT_ATTEMPTS: usize = 8;

/// The users object of a bucket.
#[derive(Debug, Clone)]
pub struct UsersObject {
    /// The internal objects.
    store: SharedStore,
    /// `PREFIX/.xfer/users.toml`.
    key: Key,
}

/// A read of the users object.
#[derive(Debug)]
pub enum UsersRead {
    /// No users object yet.
    Missing,
    /// Its ETag is the one given.
    NotModified,
    /// The accounts and the ETag they were read at.
    Found(UsersFile, Option<String>),
}

impl UsersObject {
    /// The users object in `store`.
    pub fn new(store: SharedStore) -> UsersObject {
        let key = store.key(&[USERS_OBJECT]);
        UsersObject { store, key }
    }

    /// How messages name it (as a path, the way the users file is named in local mode).
    pub fn label(&self) -> PathBuf {
        PathBuf::from(format!("object store: {}", self.key))
    }

    /// Reads and validates the accounts, unless the ETag is still `if_none_match`.
    pub async fn read(&self, if_none_match: Option<String>) -> Result<UsersRead, SharedError> {
        match self
            .store
            .get(&self.key, if_none_match, MAX_USERS_BYTES)
            .await?
        {
            Fetched::Missing => Ok(UsersRead::Missing),
            Fetched::NotModified => Ok(UsersRead::NotModified),
            Fetched::Found { bytes, e_tag } => {
                let text = std::str::from_utf8(&bytes).map_err(|_| AccountError::Parse {
                    path: self.label(),
                    message: "the object is not UTF-8".into(),
                })?;
                Ok(UsersRead::Found(
                    UsersFile::parse(&self.label(), text)?,
                    e_tag,
                ))
            }
        }
    }

    /// Reads the accounts (none if there is no users object yet), lets `change` edit them,
    /// and writes them back unless someone else wrote in between (then starts over, up to
    /// [`EDIT_ATTEMPTS`] times). `change` may run more than once.
    pub async fn edit<T>(
        &self,
        mut change: impl FnMut(&mut UsersFile) -> Result<T, AccountError>,
    ) -> Result<T, SharedError> {
        for _ in 0..EDIT_ATTEMPTS {
            let (mut users, e_tag) = match self.read(None).await? {
                UsersRead::Found(users, e_tag) => (users, e_tag),
                UsersRead::Missing | UsersRead::NotModified => (UsersFile::default(), None),
            };
            let out = change(&mut users)?;
            // For stores that ignore conditional writes: the narrowest check we can make.
            if self.store.e_tag(&self.key).await? != e_tag {
                continue;
            }
            let mode = match e_tag {
                Some(e_tag) => PutMode::Update(UpdateVersion {
                    e_tag: Some(e_tag),
                    version: None,
                }),
                None => PutMode::Create,
            };
            match self.write(&users, mode).await {
                Ok(()) => return Ok(out),
                Err(SharedError::Store {
                    source:
                        object_store::Error::Precondition { .. }
                        | object_store::Error::AlreadyExists { .. },
                    ..
                }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(SharedError::Conflict(self.key.to_string()))
    }

    /// Puts `users` in the store as they are (`xferd user import`): refused when the store
    /// holds accounts already, unless `replace`.
    pub async fn import(&self, users: &UsersFile, replace: bool) -> Result<usize, SharedError> {
        self.edit(|current| {
            if !replace && !current.users.is_empty() {
                return Err(AccountError::StoreHasUsers(current.users.len()));
            }
            *current = users.clone();
            Ok(users.users.len())
        })
        .await
    }

    async fn write(&self, users: &UsersFile, mode: PutMode) -> Result<(), SharedError> {
        let text = users.to_text().map_err(|e| AccountError::Io {
            path: self.label(),
            source: std::io::Error::other(e),
        })?;
        self.store
            .put(&self.key, text.into_bytes(), mode)
            .await
            .map(|_| ())
            .map_err(|source| SharedError::Store {
                op: "writing",
                key: self.key.to_string(),
                source,
            })
    }
}
