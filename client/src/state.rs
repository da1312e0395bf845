//! The client's state folder: `known_servers` (pinned keys, like OpenSSH's known_hosts) and
//! `sessions.toml` (user and token per server, and which server is current). The folder is
//! 0700, the files 0600, every write is atomic. The password is never stored.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xfer_proto::Role;
use xfer_proto::fingerprint::Fingerprint;

use crate::error::ClientError;

/// File of pinned server keys.
pub const KNOWN_SERVERS: &str = "known_servers";
/// File of session tokens.
pub const SESSIONS: &str = "sessions.toml";

/// The default state folder: `$XFER_CONFIG_DIR`, else `$XDG_CONFIG_HOME/xfer`, else
/// `~/.config/xfer`.
pub fn default_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("XFER_CONFIG_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("xfer"));
    }
    std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .map(|h| PathBuf::from(h).join(".config").join("xfer"))
}

/// The state folder.
#[derive(Debug, Clone)]
pub struct StateDir {
    /// Its path.
    dir: PathBuf,
}

/// Replaces `path` with `contents`: 0600 whatever it was, atomic and durable (see
/// [`xfer_util::fs`]).
fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), ClientError> {
    xfer_util::write_private(path, contents)
        .map_err(|e| ClientError::local(format!("writing `{}`", path.display()), e))
}

impl StateDir {
    /// Opens (creating if needed) the folder, with mode 0700.
    pub fn open(dir: &Path) -> Result<StateDir, ClientError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| ClientError::local(format!("creating `{}`", dir.display()), e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| ClientError::local(format!("securing `{}`", dir.display()), e))?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    /// The folder's path.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Path of the known-servers file.
    pub fn known_servers_path(&self) -> PathBuf {
        self.dir.join(KNOWN_SERVERS)
    }

    /// Reads the pins.
    pub fn known_servers(&self) -> Result<KnownServers, ClientError> {
        let path = self.known_servers_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(ClientError::local(
                    format!("reading `{}`", path.display()),
                    e,
                ));
            }
        };
        KnownServers::parse(&text).map_err(|(line, why)| {
            ClientError::Other(format!(
                "`{}` line {line}: {why} - correct or delete that line",
                path.display()
            ))
        })
    }

    /// Path of the sessions file.
    fn sessions_path(&self) -> PathBuf {
        self.dir.join(SESSIONS)
    }

    /// Writes the pins.
    pub fn save_known_servers(&self, known: &KnownServers) -> Result<(), ClientError> {
        write_atomic(&self.known_servers_path(), known.render().as_bytes())
    }

    /// Reads the sessions.
    pub fn sessions(&self) -> Result<Sessions, ClientError> {
        let path = self.sessions_path();
        match std::fs::read_to_string(&path) {
            Ok(t) => toml::from_str(&t).map_err(|e| {
                ClientError::Other(format!(
                    "`{}` is damaged ({}); delete it and log in again",
                    path.display(),
                    e.message()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Sessions::default()),
            Err(e) => Err(ClientError::local(
                format!("reading `{}`", path.display()),
                e,
            )),
        }
    }

    /// Writes the sessions.
    pub fn save_sessions(&self, sessions: &Sessions) -> Result<(), ClientError> {
        let text = toml::to_string(sessions).map_err(|e| ClientError::Other(e.to_string()))?;
        write_atomic(
            &self.sessions_path(),
            format!(
                "# xfer sessions: tokens are secrets; this file must stay private (0600).\n{text}"
            )
            .as_bytes(),
        )
    }
}

/// Pinned keys, in file order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KnownServers {
    /// `(server, fingerprint)` pairs; a server appears at most once.
    entries: Vec<(String, Fingerprint)>,
}

impl KnownServers {
    /// Parses `SERVER FINGERPRINT` lines; `#` starts a comment. Errors give the line number.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(server), Some(fp), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err((i + 1, "expected `SERVER FINGERPRINT`".into()));
            };
            let fp = Fingerprint::parse(fp).map_err(|e| (i + 1, e.to_string()))?;
            entries.push((server.to_string(), fp));
        }
        Ok(KnownServers { entries })
    }

    /// The file text.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# xfer known servers: SERVER FINGERPRINT (SHA-256 of the server's public key)\n",
        );
        for (s, fp) in &self.entries {
            out.push_str(&format!("{s} {fp}\n"));
        }
        out
    }

    /// The pin for `server`.
    pub fn get(&self, server: &str) -> Option<Fingerprint> {
        self.entries
            .iter()
            .find(|(s, _)| s == server)
            .map(|(_, f)| *f)
    }

    /// Pins `server` to `fp`, replacing any old pin.
    pub fn set(&mut self, server: &str, fp: Fingerprint) {
        self.remove(server);
        self.entries.push((server.to_string(), fp));
    }

    /// Removes the pin for `server`; true if there was one.
    pub fn remove(&mut self, server: &str) -> bool {
        let before = self.entries.len();
        self.entries.retain(|(s, _)| s != server);
        before != self.entries.len()
    }

    /// 1-based line of `server` in the rendered file (for the OpenSSH-style warning).
    pub fn line_of(&self, server: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|(s, _)| s == server)
            .map(|i| i + 2)
    }
}

/// One stored session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredSession {
    /// Account name.
    pub user: String,
    /// Role at login.
    pub role: Role,
    /// The session token (secret).
    pub token: String,
    /// Expiry, seconds since the epoch.
    pub expires: i64,
}

/// All stored sessions.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Sessions {
    /// The server of the last login, used when `--server` is not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    /// Sessions by server (`host:port`).
    #[serde(default)]
    pub servers: BTreeMap<String, StoredSession>,
    /// Who last logged in to each server (kept after logout, for "run `xfer login alice@...`").
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub last_user: BTreeMap<String, String>,
}

impl Sessions {
    /// Picks the server to use: `--server` if given (it must be logged in), else the current.
    pub fn select(&self, wanted: Option<&str>) -> Result<(String, StoredSession), ClientError> {
        let server = match wanted {
            Some(s) => s.to_string(),
            None => self.current.clone().ok_or(ClientError::NotLoggedIn {
                server: None,
                user: None,
            })?,
        };
        let session =
            self.servers
                .get(&server)
                .cloned()
                .ok_or_else(|| ClientError::NotLoggedIn {
                    user: self.last_user.get(&server).cloned(),
                    server: Some(server.clone()),
                })?;
        Ok((server, session))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_servers_round_trip_and_replace() {
        let mut k = KnownServers::default();
        let a = Fingerprint([1; 32]);
        let b = Fingerprint([2; 32]);
        k.set("127.0.0.1:7443", a);
        k.set("[::1]:7443", b);
        let back = KnownServers::parse(&k.render()).unwrap();
        assert_eq!(back, k);
        assert_eq!(back.get("[::1]:7443"), Some(b));
        k.set("127.0.0.1:7443", b);
        assert_eq!(k.get("127.0.0.1:7443"), Some(b));
        assert!(k.remove("127.0.0.1:7443"));
        assert_eq!(k.get("127.0.0.1:7443"), None);
        assert!(KnownServers::parse("host\n").is_err());
        assert_eq!(KnownServers::parse("a b c\n").unwrap_err().0, 1);
    }

    #[test]
    fn files_are_private_and_folder_is_0700() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("xfer");
        let st = StateDir::open(&dir).unwrap();
        let mut s = Sessions {
            current: Some("h:1".into()),
            ..Default::default()
        };
        s.servers.insert(
            "h:1".into(),
            StoredSession {
                user: "u".into(),
                role: Role::User,
                token: "t".into(),
                expires: 5,
            },
        );
        st.save_sessions(&s).unwrap();
        st.save_known_servers(&KnownServers::default()).unwrap();
        assert_eq!(st.sessions().unwrap(), s);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(SESSIONS)), 0o600);
        assert_eq!(mode(&dir.join(KNOWN_SERVERS)), 0o600);
    }

    #[test]
    fn select_prefers_the_flag_then_current() {
        let mut s = Sessions::default();
        assert!(matches!(
            s.select(None),
            Err(ClientError::NotLoggedIn { server: None, .. })
        ));
        s.current = Some("a:1".into());
        s.servers.insert(
            "a:1".into(),
            StoredSession {
                user: "u".into(),
                role: Role::User,
                token: "t".into(),
                expires: 0,
            },
        );
        assert_eq!(s.select(None).unwrap().0, "a:1");
        assert!(matches!(
            s.select(Some("b:2")),
            Err(ClientError::NotLoggedIn {
                server: Some(_),
                user: None
            })
        ));
    }
}
