//! Login keys: the OpenSSH Ed25519 public keys kept on an account in the users file, their
//! IDs (the OpenSSH SHA-256 fingerprint), the edits `xferd user key ...` makes, and the one
//! check a key login passes or fails (spec §8).
//!
//! Keys are parsed with the `ssh-key` crate, so a line from `xfer keygen` and one from
//! `ssh-keygen -t ed25519` (`~/.ssh/id_ed25519.pub`) are alike; signatures are verified with
//! ring. Only Ed25519 is accepted: one algorithm, fixed-size keys and signatures, nothing to
//! negotiate.

use ring::signature::{ED25519, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use ssh_key::{HashAlg, PublicKey};
use xfer_proto::Role;
use xfer_proto::key_login::{PUBLIC_KEY_LEN, SIGNATURE_LEN};

use crate::accounts::{AccountError, UsersFile};

/// A public key that may log in as its account.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// The OpenSSH public key line: `ssh-ed25519 AAAA... comment`.
    pub key: String,
    /// When it was added, seconds since the Unix epoch.
    pub added: i64,
}

/// A parsed login key.
#[derive(Debug, Clone)]
pub struct LoginKey {
    /// The key as `ssh-key` reads it (for its comment and fingerprint).
    pub public: PublicKey,
    /// The raw Ed25519 public key, as a `KeyLogin` carries it.
    pub raw: [u8; PUBLIC_KEY_LEN],
}

impl LoginKey {
    /// Parses one OpenSSH public key line; anything but `ssh-ed25519` is refused.
    pub fn parse(line: &str) -> Result<LoginKey, String> {
        let public = PublicKey::from_openssh(line.trim())
            .map_err(|e| format!("not an OpenSSH public key line ({e})"))?;
        let raw = public
            .key_data()
            .ed25519()
            .ok_or_else(|| {
                format!(
                    "a {} key; only ssh-ed25519 keys can log in (make one with `xfer keygen` or `ssh-keygen -t ed25519`)",
                    public.algorithm()
                )
            })?
            .0;
        Ok(LoginKey { public, raw })
    }

    /// The key's ID: its OpenSSH SHA-256 fingerprint, `SHA256:` and unpadded base64, as
    /// `ssh-keygen -l` prints it.
    pub fn id(&self) -> String {
        self.public.fingerprint(HashAlg::Sha256).to_string()
    }
}

/// The ID of a raw Ed25519 public key, as [`LoginKey::id`] gives it (for the log).
pub fn id_of(raw: &[u8; PUBLIC_KEY_LEN]) -> String {
    PublicKey::new(
        ssh_key::public::KeyData::Ed25519(ssh_key::public::Ed25519PublicKey(*raw)),
        "",
    )
    .fingerprint(HashAlg::Sha256)
    .to_string()
}

/// `SHA256:...` for an ID given with or without its prefix.
fn normal_id(id: &str) -> String {
    let id = id.trim();
    match id.strip_prefix("SHA256:") {
        Some(_) => id.to_string(),
        None => format!("SHA256:{id}"),
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl UsersFile {
    /// Adds a login key to an account; returns its ID. The account's sessions stay: a new
    /// key takes nothing away.
    pub fn add_key(&mut self, name: &str, line: &str) -> Result<String, AccountError> {
        let key = LoginKey::parse(line).map_err(AccountError::BadKey)?;
        let id = key.id();
        let rec = self
            .users
            .get_mut(name)
            .ok_or_else(|| AccountError::NoSuchUser(name.into()))?;
        if rec
            .keys
            .iter()
            .any(|k| LoginKey::parse(&k.key).is_ok_and(|k| k.raw == key.raw))
        {
            return Err(AccountError::KeyExists {
                user: name.into(),
                id,
            });
        }
        // Stored as ssh-key writes it back: one line, whatever spacing it came with.
        let line = key
            .public
            .to_openssh()
            .map_err(|e| AccountError::BadKey(format!("cannot write the key back out ({e})")))?;
        rec.keys.push(KeyRecord {
            key: line,
            added: now_secs(),
        });
        Ok(id)
    }

    /// Removes a login key by ID (with or without `SHA256:`), bumping the generation so that
    /// the account's sessions end: one of them may have been opened with that key.
    pub fn remove_key(&mut self, name: &str, id: &str) -> Result<(), AccountError> {
        let want = normal_id(id);
        let rec = self
            .users
            .get(name)
            .ok_or_else(|| AccountError::NoSuchUser(name.into()))?;
        let at = rec
            .keys
            .iter()
            .position(|k| LoginKey::parse(&k.key).is_ok_and(|k| k.id() == want))
            .ok_or_else(|| AccountError::NoSuchKey {
                user: name.into(),
                id: want,
            })?;
        self.next_generation(name)?.keys.remove(at);
        Ok(())
    }
}

/// Checks every key line of a users file's account (at load: a bad line names its user).
pub fn check_keys(keys: &[KeyRecord]) -> Result<(), String> {
    for k in keys {
        LoginKey::parse(&k.key).map_err(|e| format!("key `{}`: {e}", k.key))?;
    }
    Ok(())
}

/// The one check of a key login: the signature verifies under `public_key` over `message`,
/// and `public_key` is one of `user`'s keys. Returns the account's role and generation; `None`
/// for an unknown user, an unknown key and a bad signature alike. The signature is verified
/// first, whoever the user is, so the three take the same work.
pub fn check_key_login(
    users: &UsersFile,
    user: &str,
    public_key: &[u8; PUBLIC_KEY_LEN],
    message: Option<&[u8]>,
    signature: &[u8],
) -> Option<(Role, u64)> {
    let signed = signature.len() == SIGNATURE_LEN
        && message.is_some_and(|m| {
            UnparsedPublicKey::new(&ED25519, public_key)
                .verify(m, signature)
                .is_ok()
        });
    let rec = users.users.get(user)?;
    let known = rec
        .keys
        .iter()
        .any(|k| LoginKey::parse(&k.key).is_ok_and(|k| k.raw == *public_key));
    (signed && known).then_some((rec.role, rec.generation))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    /// An Ed25519 key pair from a fixed seed, and its OpenSSH public line.
    fn key(seed: u8, comment: &str) -> (Ed25519KeyPair, String) {
        let pair = Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap();
        let raw: [u8; 32] = pair.public_key().as_ref().try_into().unwrap();
        let public = PublicKey::new(
            ssh_key::public::KeyData::Ed25519(ssh_key::public::Ed25519PublicKey(raw)),
            comment,
        );
        (pair, public.to_openssh().unwrap())
    }

    fn users_with_alice() -> UsersFile {
        let mut f = UsersFile::default();
        f.add("alice", Role::User, "pw").unwrap();
        f
    }

    #[test]
    fn keys_are_added_listed_by_fingerprint_and_deleted_with_or_without_the_prefix() {
        let mut f = users_with_alice();
        let (_, line) = key(1, "alice@laptop");
        let id = f.add_key("alice", &line).unwrap();
        assert!(id.starts_with("SHA256:"), "{id}");
        assert!(matches!(
            f.add_key("alice", &line.replace("alice@laptop", "other")),
            Err(AccountError::KeyExists { .. })
        ));
        assert!(matches!(
            f.add_key("nobody", &line),
            Err(AccountError::NoSuchUser(_))
        ));
        assert!(matches!(
            f.add_key("alice", "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ x"),
            Err(AccountError::BadKey(_))
        ));
        let (pair, second) = key(2, "");
        let id2 = f.add_key("alice", &second).unwrap();
        assert_eq!(
            id_of(&pair.public_key().as_ref().try_into().unwrap()),
            id2,
            "the log names keys as key list does"
        );
        let generation = f.users["alice"].generation;
        f.remove_key("alice", id.strip_prefix("SHA256:").unwrap())
            .unwrap();
        assert_eq!(f.users["alice"].generation, generation + 1);
        assert!(matches!(
            f.remove_key("alice", &id),
            Err(AccountError::NoSuchKey { .. })
        ));
        assert_eq!(f.users["alice"].keys.len(), 1);
        assert_eq!(
            LoginKey::parse(&f.users["alice"].keys[0].key).unwrap().id(),
            id2
        );
    }

    #[test]
    fn only_a_registered_key_with_a_good_signature_passes() {
        let mut f = users_with_alice();
        let (pair, line) = key(1, "");
        f.add_key("alice", &line).unwrap();
        let raw: [u8; 32] = pair.public_key().as_ref().try_into().unwrap();
        let msg = b"the message";
        let sig = pair.sign(msg);
        assert!(check_key_login(&f, "alice", &raw, Some(msg), sig.as_ref()).is_some());
        // Wrong message, wrong signature length, unknown user, unknown key.
        assert!(check_key_login(&f, "alice", &raw, Some(b"other"), sig.as_ref()).is_none());
        assert!(check_key_login(&f, "alice", &raw, Some(msg), &sig.as_ref()[..63]).is_none());
        assert!(check_key_login(&f, "alice", &raw, None, sig.as_ref()).is_none());
        assert!(check_key_login(&f, "bob", &raw, Some(msg), sig.as_ref()).is_none());
        let (other, _) = key(2, "");
        let other_raw: [u8; 32] = other.public_key().as_ref().try_into().unwrap();
        let other_sig = other.sign(msg);
        assert!(check_key_login(&f, "alice", &other_raw, Some(msg), other_sig.as_ref()).is_none());
    }

    #[test]
    fn keys_survive_the_users_file_and_an_old_file_without_keys_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("users.toml");
        // A users file as written before keys existed.
        let mut old = users_with_alice();
        let alice = &old.users["alice"];
        let text = format!(
            "# xferd users file\n\n[users.alice]\nrole = \"user\"\nhash = \"{}\"\ngeneration = {}\n",
            alice.hash, alice.generation
        );
        std::fs::write(&p, &text).unwrap();
        assert_eq!(UsersFile::load(&p).unwrap(), old);
        assert!(
            !old.to_text().unwrap().contains("[[users"),
            "no keys, no key tables"
        );
        let (_, line) = key(3, "ci");
        old.add_key("alice", &line).unwrap();
        old.save(&p).unwrap();
        let back = UsersFile::load(&p).unwrap();
        assert_eq!(back, old);
        // A bad key line stops the load, naming the user.
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("ssh-ed25519 ", "ssh-ed25519 !!");
        std::fs::write(&p, text).unwrap();
        let err = UsersFile::load(&p).unwrap_err().to_string();
        assert!(err.contains("alice") && err.contains("key"), "{err}");
    }
}
