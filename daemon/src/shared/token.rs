//! Session tokens any node can check alone: `xfer1_` + base64url(payload || MAC), where the
//! payload is the user, the account generation, the creation and expiry times and 16 random
//! id bytes, followed for a long-lived token (`xfer token create`) by its scope (kind byte 1,
//! flags with bit 0 = read-only, u16 big-endian length of the path, the path), and the MAC is a keyed BLAKE3 of the payload under a key derived from the 32
//! secret bytes of `session_key_file`, which every node holds (deployed like the TLS key).
//!
//! The token is the only copy of the MAC: the store keeps only the id (registry, revocations),
//! so reading the bucket gives no usable token. Anyone with the key file can mint tokens for
//! any account, so it is as secret as the TLS key (mode 0600, refused otherwise).

use std::path::{Path, PathBuf};

use argon2::password_hash::rand_core::{OsRng, RngCore};
use base64::Engine;
use xfer_proto::limits::{MAX_PATH_LEN, MAX_USER_LEN};
use xfer_util::fs::{Mode, write_atomic};

use crate::sessions::TOKEN_PREFIX;

/// Bytes of secret in the key file.
pub const KEY_LEN: usize = 32;

/// Random bytes naming a session.
pub const ID_LEN: usize = 16;

/// Bytes of MAC at the end of a token.
const MAC_LEN: usize = 32;

/// The context the MAC key is derived under, so the file's bytes are used for nothing else.
const KEY_CONTEXT: &str = "xfer 2025-06 session token MAC v1";
/// BLAKE3 key-derivation context of a token key derived from the TLS private key (see
/// [`SessionKey::for_daemon`]): distinct from every other use of that key.
const TLS_KEY_CONTEXT: &str = "xfer 2026-12-03 session tokens from the TLS private key";

/// Payload bytes besides the user name: its length, generation, created, expires, id.
const FIXED: usize = 1 + 8 + 8 + 8 + ID_LEN;

/// Bytes of a token's scope besides its path: kind, flags, path length.
const SCOPE_FIXED: usize = 1 + 1 + 2;

/// The kind byte that starts a scope: a long-lived token.
const KIND_TOKEN: u8 = 1;

/// Flag bit: the token is read-only.
const FLAG_READ_ONLY: u8 = 1;

/// Why the session key could not be loaded or written. Never holds the key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error(
        "reading session key `{path}`: {source} (make one with `xferd session keygen`, then copy it to every node)"
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Group or others may read the file.
    #[error(
        "session key `{path}` can be read by other users (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Not 32 bytes (or 64 hex digits).
    #[error(
        "session key `{path}` must hold 32 random bytes (or 64 hex digits); it holds {len} bytes: make one with `xferd session keygen`"
    )]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// `keygen` would replace a key in use.
    #[error(
        "session key `{0}` already exists; pass --force to replace it (every token issued with it stops working)"
    )]
    Exists(PathBuf),
    /// The file could not be written.
    #[error("writing session key `{path}`: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The MAC key. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct SessionKey {
    /// Derived from the file's bytes under [`KEY_CONTEXT`].
    mac: [u8; 32],
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(<redacted>)")
    }
}

/// What a token says, once its MAC holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// Account name.
    pub user: String,
    /// The account's generation at login: a later password or role change ends the token.
    pub generation: u64,
    /// Login time, seconds since the epoch.
    pub created: i64,
    /// Expiry time, seconds since the epoch.
    pub expires: i64,
    /// Random bytes naming the session in the registry and in revocations.
    pub id: [u8; ID_LEN],
    /// Set on a long-lived token: what it may do. Under the MAC, so no node can be told
    /// otherwise.
    pub scope: Option<Scope>,
}

/// The part of a long-lived token's scope that is enforced, as its claims carry it (its
/// name lives only in the registry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// Every request that writes is refused.
    pub read_only: bool,
    /// The folder it is limited to, normalised (`a/b`); `""` for the whole tree.
    pub path: String,
}

impl Claims {
    /// New claims with a fresh random id.
    pub fn new(user: &str, generation: u64, created: i64, expires: i64) -> Claims {
        let mut id = [0u8; ID_LEN];
        OsRng.fill_bytes(&mut id);
        Claims {
            user: user.into(),
            generation,
            created,
            expires,
            id,
            scope: None,
        }
    }

    /// These claims for a long-lived token limited by `scope` (its path at most
    /// [`MAX_PATH_LEN`] bytes, as every valid path is).
    pub fn with_scope(self, scope: Scope) -> Claims {
        Claims {
            scope: Some(scope),
            ..self
        }
    }

    /// The id as 32 hex digits (object names, `xferd session list`).
    pub fn id_hex(&self) -> String {
        super::hex(&self.id)
    }

    fn payload(&self) -> Vec<u8> {
        let user = self.user.as_bytes();
        let mut out = Vec::with_capacity(FIXED + user.len());
        // User names are at most 64 bytes (checked at account creation and in `verify`).
        out.push(user.len().min(255) as u8);
        out.extend_from_slice(&user[..user.len().min(255)]);
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.extend_from_slice(&self.created.to_be_bytes());
        out.extend_from_slice(&self.expires.to_be_bytes());
        out.extend_from_slice(&self.id);
        if let Some(scope) = &self.scope {
            // Paths are at most MAX_PATH_LEN bytes (checked before a token is made).
            let path = &scope.path.as_bytes()[..scope.path.len().min(MAX_PATH_LEN)];
            out.push(KIND_TOKEN);
            out.push(if scope.read_only { FLAG_READ_ONLY } else { 0 });
            out.extend_from_slice(&(path.len() as u16).to_be_bytes());
            out.extend_from_slice(path);
        }
        out
    }
}

impl SessionKey {
    /// A key from the file's 32 secret bytes.
    pub fn from_bytes(secret: &[u8; KEY_LEN]) -> SessionKey {
        SessionKey {
            mac: blake3::derive_key(KEY_CONTEXT, secret),
        }
    }

    /// The key a daemon signs with: `session_key_file` when it exists, else one derived from
    /// the TLS private key (`key`), which every node of a cluster already shares, so several
    /// daemons with the same key and certificate accept each other's tokens with nothing more
    /// to deploy. A key file of its own lets the tokens be rotated apart from the TLS key.
    pub fn for_daemon(session_key_file: &Path, tls_key: &Path) -> Result<SessionKey, KeyError> {
        if session_key_file.exists() {
            return SessionKey::load(session_key_file);
        }
        let pem = std::fs::read(tls_key).map_err(|source| KeyError::Read {
            path: tls_key.to_path_buf(),
            source,
        })?;
        Ok(SessionKey {
            mac: blake3::derive_key(TLS_KEY_CONTEXT, &pem),
        })
    }

    /// Loads the key file: 32 raw bytes, or 64 hex digits (and optional whitespace) for
    /// deployment tools that carry only text; refused if group or others may read it.
    pub fn load(path: &Path) -> Result<SessionKey, KeyError> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let read = |source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read)?;
        let mode = file.metadata().map_err(read)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut bytes = Vec::new();
        // A little more than the longest accepted form, so a wrong file is not read whole.
        file.take(256).read_to_end(&mut bytes).map_err(read)?;
        let malformed = || KeyError::Malformed {
            path: path.to_path_buf(),
            len: bytes.len(),
        };
        let mut secret = [0u8; KEY_LEN];
        if bytes.len() == KEY_LEN {
            secret.copy_from_slice(&bytes);
        } else {
            let text = std::str::from_utf8(&bytes).map_err(|_| malformed())?.trim();
            if text.len() != 2 * KEY_LEN {
                return Err(malformed());
            }
            for (i, out) in secret.iter_mut().enumerate() {
                *out = text
                    .get(2 * i..2 * i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(malformed)?;
            }
        }
        Ok(SessionKey::from_bytes(&secret))
    }

    /// Writes a new random key file (mode 0600, atomically); refuses to replace one unless
    /// `force`.
    pub fn generate(path: &Path, force: bool) -> Result<(), KeyError> {
        if path.exists() {
            if !force {
                return Err(KeyError::Exists(path.to_path_buf()));
            }
            // A replaced file would keep its old mode, which may let others read the new key.
            std::fs::remove_file(path).map_err(|source| KeyError::Write {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let mut secret = [0u8; KEY_LEN];
        OsRng.fill_bytes(&mut secret);
        write_atomic(path, &secret, Mode::KeepOr(0o600)).map_err(|source| KeyError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    fn mac(&self, payload: &[u8]) -> blake3::Hash {
        blake3::keyed_hash(&self.mac, payload)
    }

    /// The token for `claims`.
    pub fn sign(&self, claims: &Claims) -> String {
        let mut bytes = claims.payload();
        let mac = self.mac(&bytes);
        bytes.extend_from_slice(mac.as_bytes());
        format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )
    }

    /// The claims of `token` if its MAC holds under this key (expiry and revocation are the
    /// caller's to check). The comparison takes the same time wherever the MACs differ.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        let body = token.strip_prefix(TOKEN_PREFIX)?;
        let longest = FIXED + MAX_USER_LEN + SCOPE_FIXED + MAX_PATH_LEN + MAC_LEN;
        if body.len() > longest.div_ceil(3) * 4 {
            return None;
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .ok()?;
        let user_len = *bytes.first()? as usize;
        if user_len == 0 || user_len > MAX_USER_LEN || bytes.len() < FIXED + user_len + MAC_LEN {
            return None;
        }
        let (payload, mac) = bytes.split_at(bytes.len() - MAC_LEN);
        let mac: [u8; MAC_LEN] = mac.try_into().ok()?;
        // `blake3::Hash`'s equality is constant-time.
        if self.mac(payload) != blake3::Hash::from(mac) {
            return None;
        }
        let user = std::str::from_utf8(&payload[1..1 + user_len]).ok()?;
        let rest = &payload[1 + user_len..];
        let int = |at: usize| -> Option<[u8; 8]> { rest.get(at..at + 8)?.try_into().ok() };
        let scope = match rest.get(24 + ID_LEN..)? {
            [] => None,
            [KIND_TOKEN, flags, len_hi, len_lo, path @ ..]
                if *flags & !FLAG_READ_ONLY == 0
                    && usize::from(u16::from_be_bytes([*len_hi, *len_lo])) == path.len()
                    && path.len() <= MAX_PATH_LEN =>
            {
                Some(Scope {
                    read_only: flags & FLAG_READ_ONLY != 0,
                    path: std::str::from_utf8(path).ok()?.to_string(),
                })
            }
            _ => return None,
        };
        Some(Claims {
            user: user.to_string(),
            generation: u64::from_be_bytes(int(0)?),
            created: i64::from_be_bytes(int(8)?),
            expires: i64::from_be_bytes(int(16)?),
            id: rest.get(24..24 + ID_LEN)?.try_into().ok()?,
            scope,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SessionKey {
        SessionKey::from_bytes(&[byte; KEY_LEN])
    }

    #[test]
    fn a_token_round_trips_and_fits_the_wire_limit() {
        let k = key(7);
        let long = "x".repeat(MAX_USER_LEN);
        for user in ["a", "alice", "ünïcode", long.as_str()] {
            let c = Claims::new(user, u64::MAX - 3, 1_700_000_000, i64::MAX - 1);
            let t = k.sign(&c);
            assert!(t.starts_with(TOKEN_PREFIX));
            assert!(t.len() <= xfer_proto::limits::MAX_TOKEN_LEN, "{}", t.len());
            assert_eq!(k.verify(&t), Some(c));
        }
        // Fresh ids: two logins never share a token.
        let a = Claims::new("alice", 1, 5, 6);
        let b = Claims::new("alice", 1, 5, 6);
        assert_ne!(a.id, b.id);
        assert_ne!(k.sign(&a), k.sign(&b));
        assert_eq!(a.id_hex().len(), 32);
    }

    #[test]
    fn a_scoped_token_round_trips_and_its_scope_cannot_be_changed() {
        let k = key(7);
        let long_user = "u".repeat(MAX_USER_LEN);
        let long_path = "p/".repeat(MAX_PATH_LEN / 2 - 1) + "pp";
        assert_eq!(long_path.len(), MAX_PATH_LEN);
        for (user, read_only, path) in [
            ("alice", true, ""),
            ("alice", false, "backups/host1"),
            ("bob", true, "ünï/cödé"),
            (long_user.as_str(), true, long_path.as_str()),
        ] {
            let scope = Scope {
                read_only,
                path: path.into(),
            };
            let c = Claims::new(user, 4, 100, 200).with_scope(scope);
            let t = k.sign(&c);
            assert!(t.len() <= xfer_proto::limits::MAX_TOKEN_LEN, "{}", t.len());
            assert_eq!(k.verify(&t), Some(c.clone()));
            // The login token with the same fields is a different token: neither can be
            // turned into the other.
            let login = Claims { scope: None, ..c };
            assert_ne!(k.sign(&login), t);
        }
        // Every way of widening the scope without the key is refused: dropping it (a token
        // of the login's shape), clearing read-only, shortening or changing the path.
        let c = Claims::new("alice", 4, 100, 200).with_scope(Scope {
            read_only: true,
            path: "backups/host1".into(),
        });
        let t = k.sign(&c);
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(t.strip_prefix(TOKEN_PREFIX).unwrap())
            .unwrap();
        let encode = |b: &[u8]| {
            format!(
                "{TOKEN_PREFIX}{}",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
            )
        };
        let mac_at = bytes.len() - MAC_LEN;
        let scope_at = FIXED + "alice".len();
        let mut unscoped = bytes[..scope_at].to_vec();
        unscoped.extend_from_slice(&bytes[mac_at..]);
        assert!(k.verify(&encode(&unscoped)).is_none(), "scope dropped");
        let mut writable = bytes.clone();
        writable[scope_at + 1] = 0;
        assert!(k.verify(&encode(&writable)).is_none(), "read-only cleared");
        let mut shorter = bytes[..scope_at + SCOPE_FIXED + "backups".len()].to_vec();
        shorter[scope_at + 3] = "backups".len() as u8;
        shorter.extend_from_slice(&bytes[mac_at..]);
        assert!(k.verify(&encode(&shorter)).is_none(), "path widened");
        // A well-formed scope signed with the right key but unknown flags is refused too.
        let mut odd = c.payload();
        odd[scope_at + 1] = 0x80;
        let mac = k.mac(&odd);
        odd.extend_from_slice(mac.as_bytes());
        assert!(k.verify(&encode(&odd)).is_none(), "unknown flag");
    }

    #[test]
    fn any_change_to_a_token_or_another_key_is_refused() {
        let k = key(7);
        let t = k.sign(&Claims::new("alice", 3, 10, 20));
        assert!(key(8).verify(&t).is_none(), "another cluster's key");
        let body = t.strip_prefix(TOKEN_PREFIX).unwrap();
        let mut bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .unwrap();
        for i in 0..bytes.len() {
            for bit in [0x01, 0x80] {
                bytes[i] ^= bit;
                let forged = format!(
                    "{TOKEN_PREFIX}{}",
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes)
                );
                assert!(k.verify(&forged).is_none(), "byte {i} bit {bit:#x}");
                bytes[i] ^= bit;
            }
        }
        // Cut or extended, and tokens of the local store's shape.
        assert!(k.verify(&t[..t.len() - 2]).is_none());
        assert!(k.verify(&format!("{t}AA")).is_none());
        assert!(
            k.verify("xfer1_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
                .is_none()
        );
        assert!(k.verify("").is_none());
        assert!(k.verify(&"xfer1_".repeat(100)).is_none());
    }

    #[test]
    fn without_a_key_file_nodes_sharing_the_tls_key_sign_alike() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, other) = (
            dir.path().join("a.pem"),
            dir.path().join("b.pem"),
            dir.path().join("other.pem"),
        );
        std::fs::write(
            &a,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        std::fs::copy(&a, &b).unwrap();
        std::fs::write(
            &other,
            "-----BEGIN PRIVATE KEY-----\nBBBB\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let missing = dir.path().join("session.key");
        let on_a = SessionKey::for_daemon(&missing, &a).unwrap();
        let t = on_a.sign(&Claims::new("alice", 1, 10, 20));
        assert!(
            SessionKey::for_daemon(&missing, &b)
                .unwrap()
                .verify(&t)
                .is_some()
        );
        assert!(
            SessionKey::for_daemon(&missing, &other)
                .unwrap()
                .verify(&t)
                .is_none()
        );
        // Not the key a file of the same bytes would give: the two are never confused.
        let mut pem = [0u8; KEY_LEN];
        pem.copy_from_slice(&std::fs::read(&a).unwrap()[..KEY_LEN]);
        assert!(SessionKey::from_bytes(&pem).verify(&t).is_none());
        // A key file, once there, is what signs.
        SessionKey::generate(&missing, false).unwrap();
        let with_file = SessionKey::for_daemon(&missing, &a).unwrap();
        assert!(with_file.verify(&t).is_none());
        assert!(
            SessionKey::load(&missing)
                .unwrap()
                .verify(&with_file.sign(&Claims::new("bob", 1, 1, 2)))
                .is_some()
        );
    }

    #[test]
    fn the_key_file_must_be_private_and_well_formed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("session.key");
        SessionKey::generate(&p, false).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::read(&p).unwrap().len(), KEY_LEN);
        let k = SessionKey::load(&p).unwrap();
        let t = k.sign(&Claims::new("alice", 1, 1, 2));
        assert!(matches!(
            SessionKey::generate(&p, false),
            Err(KeyError::Exists(_))
        ));
        assert!(
            SessionKey::load(&p).unwrap().verify(&t).is_some(),
            "unchanged"
        );
        SessionKey::generate(&p, true).unwrap();
        assert!(
            SessionKey::load(&p).unwrap().verify(&t).is_none(),
            "a new key"
        );
        for mode in [0o640, 0o604, 0o644] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = SessionKey::load(&p).unwrap_err();
            assert!(matches!(err, KeyError::Exposed { .. }), "{mode:o}");
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        // Hex text serves too, and names the same key as its bytes.
        let secret = std::fs::read(&p).unwrap();
        let hex_path = dir.path().join("hex.key");
        write_atomic(
            &hex_path,
            format!("{}\n", super::super::hex(&secret)).as_bytes(),
            Mode::KeepOr(0o600),
        )
        .unwrap();
        let t = SessionKey::load(&p)
            .unwrap()
            .sign(&Claims::new("bob", 1, 1, 2));
        assert!(SessionKey::load(&hex_path).unwrap().verify(&t).is_some());
        for bad in [&b"short"[..], &[0u8; 33][..], &[b'g'; 64][..]] {
            write_atomic(&hex_path, bad, Mode::KeepOr(0o600)).unwrap();
            assert!(matches!(
                SessionKey::load(&hex_path),
                Err(KeyError::Malformed { .. })
            ));
        }
        let err = SessionKey::load(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("xferd session keygen"), "{err}");
        // The key never shows in debug output.
        assert_eq!(format!("{k:?}"), "SessionKey(<redacted>)");
    }
}
