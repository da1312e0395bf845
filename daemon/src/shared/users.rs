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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use xfer_proto::Role;

    use super::*;
    use crate::accounts::Accounts;

    fn bucket() -> UsersObject {
        UsersObject::new(SharedStore::new(
            Arc::new(object_store::memory::InMemory::new()),
            "",
        ))
    }

    #[tokio::test]
    async fn edits_create_then_change_the_object_and_a_concurrent_edit_is_not_lost() {
        let users = bucket();
        assert!(matches!(
            users.read(None).await.unwrap(),
            UsersRead::Missing
        ));
        users
            .edit(|u| u.add("alice", Role::User, "pw1"))
            .await
            .unwrap();
        let UsersRead::Found(first, Some(tag)) = users.read(None).await.unwrap() else {
            panic!("no users object");
        };
        assert!(matches!(
            users.read(Some(tag.clone())).await.unwrap(),
            UsersRead::NotModified
        ));
        // Another administrator writes while this edit is between its read and its write:
        // the edit starts over, and both changes stand.
        let other = users.clone();
        let mut calls = 0;
        users
            .edit(|u| {
                calls += 1;
                if calls == 1 {
                    // On a thread of its own: this closure is synchronous.
                    std::thread::scope(|s| {
                        s.spawn(|| {
                            tokio::runtime::Builder::new_current_thread()
                                .build()
                                .unwrap()
                                .block_on(other.edit(|v| v.add("bob", Role::User, "pw")))
                                .unwrap()
                        })
                        .join()
                        .unwrap()
                    });
                }
                u.set_role("alice", Role::Superuser)
            })
            .await
            .unwrap();
        assert_eq!(calls, 2);
        let UsersRead::Found(now, _) = users.read(Some(tag)).await.unwrap() else {
            panic!("the object did not change");
        };
        assert_eq!(now.users["alice"].role, Role::Superuser);
        assert_eq!(
            now.users["alice"].generation,
            first.users["alice"].generation + 1
        );
        assert!(now.users.contains_key("bob"));
        // A refused change writes nothing.
        assert!(users.edit(|u| u.remove("nobody")).await.is_err());
        // Import refuses to replace accounts unless asked.
        let mut file = UsersFile::default();
        file.add("carol", Role::User, "pw").unwrap();
        let err = users.import(&file, false).await.unwrap_err().to_string();
        assert!(err.contains("--replace"), "{err}");
        assert_eq!(users.import(&file, true).await.unwrap(), 1);
        let UsersRead::Found(now, _) = users.read(None).await.unwrap() else {
            panic!("gone");
        };
        assert_eq!(now, file);
    }

    #[tokio::test]
    async fn every_node_sees_a_password_change_and_keeps_the_last_good_accounts() {
        let users = bucket();
        users
            .edit(|u| u.add("alice", Role::User, "pw1"))
            .await
            .unwrap();
        let node = || Accounts::from_store(users.clone(), Duration::from_millis(20), 1, 1);
        let (a, b) = (node().await.unwrap(), node().await.unwrap());
        let (_, g1) = b.lookup("alice").unwrap();
        users
            .edit(|u| u.set_password("alice", "pw2"))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while [&a, &b]
            .iter()
            .any(|n| n.lookup("alice") != Some((Role::User, g1 + 1)))
        {
            assert!(Instant::now() < deadline, "the change never arrived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A damaged object (a hand edit) is not the truth: the accounts stay.
        users
            .store
            .put(
                &users.key,
                b"[users.x\n".to_vec(),
                object_store::PutMode::Overwrite,
            )
            .await
            .unwrap();
        b.reload().unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(b.lookup("alice"), Some((Role::User, g1 + 1)));
        // Nor is a missing one, and a node cannot start without accounts.
        users.store.delete(&users.key).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(a.lookup("alice"), Some((Role::User, g1 + 1)));
        let err = node().await.err().unwrap().to_string();
        assert!(err.contains("xferd user import"), "{err}");
    }
}
