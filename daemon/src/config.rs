//! The daemon's configuration file: TOML, unknown keys refused, every key defaulted and
//! documented in `config/xferd.toml`. Relative paths are relative to the config file's folder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the daemon looks for its config when neither `--config` nor `$XFERD_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/xferd/xferd.toml";

/// Address used when the config names none: loopback only, so a fresh install is not exposed.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";

/// Why the config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config `{path}`: {source}")]
    Read {
        /// The config path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("parsing config `{path}`: {message}")]
    Parse {
        /// The config path.
        path: PathBuf,
        /// The parser's message, which names the key.
        message: String,
    },
    /// A key has a value out of range.
    #[error("config `{path}`: `{key}` {problem}")]
    Invalid {
        /// The config path.
        path: PathBuf,
        /// The offending key.
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

/// The config file as written on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Address and port to listen on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Storage root: one folder per user beneath it.
    #[serde(default = "default_root")]
    pub root: PathBuf,
    /// The users file (argon2id hashes and roles).
    #[serde(default = "default_users")]
    pub users_file: PathBuf,
    /// PEM certificate chain.
    #[serde(default = "default_cert")]
    pub cert: PathBuf,
    /// PEM private key (mode 0600).
    #[serde(default = "default_key")]
    pub key: PathBuf,
    /// Folder for state the daemon writes: sessions.
    #[serde(default = "default_state")]
    pub state_dir: PathBuf,
    /// Audit log (JSON lines); empty means `audit.log` in the state folder.
    #[serde(default)]
    pub audit_log: PathBuf,
    /// Limits and timeouts.
    #[serde(default)]
    pub limits: Limits,
    /// Session tokens.
    #[serde(default)]
    pub sessions: SessionSettings,
    /// Brute-force penalties.
    #[serde(default)]
    pub penalties: crate::penalty::PenaltySettings,
    /// Where users' files live: the local root or an S3-compatible object store.
    #[serde(default)]
    pub storage: StorageSettings,
    /// The secret (32 bytes, mode 0600) that signs session tokens in s3 mode, the same file
    /// on every node.
    #[serde(default = "default_session_key")]
    pub session_key_file: PathBuf,
    /// Default quotas, and how often s3 mode counts usage again.
    #[serde(default)]
    pub quota: QuotaSettings,
}

/// The `[quota]` section; each key is documented in `config/xferd.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaSettings {
    /// Bytes every account may store unless its record says otherwise (absent: unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_bytes: Option<u64>,
    /// Files every account may store unless its record says otherwise (absent: unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_files: Option<u64>,
    /// s3 mode: seconds after which a node counts a user's files again from a listing.
    pub recount_secs: u64,
}

impl Default for QuotaSettings {
    fn default() -> Self {
        QuotaSettings {
            default_bytes: None,
            default_files: None,
            recount_secs: 300,
        }
    }
}

fn default_listen() -> String {
    DEFAULT_LISTEN.into()
}
fn default_root() -> PathBuf {
    "storage".into()
}
fn default_users() -> PathBuf {
    "users.toml".into()
}
fn default_cert() -> PathBuf {
    "cert.pem".into()
}
fn default_key() -> PathBuf {
    "key.pem".into()
}
fn default_state() -> PathBuf {
    "state".into()
}
fn default_session_key() -> PathBuf {
    "session.key".into()
}

/// Limits on what clients may do; each key is documented in `config/xferd.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most simultaneous connections of any kind: the file-descriptor safety net above the
    /// admission caps (lowered at start if the open-file limit cannot hold it).
    pub max_connections: usize,
    /// Seconds allowed for the TLS handshake.
    pub handshake_timeout_secs: u64,
    /// Seconds from accept until the connection must be authenticated.
    pub login_timeout_secs: u64,
    /// Seconds an authenticated connection may sit idle between requests.
    pub idle_timeout_secs: u64,
    /// Seconds a read or write may go without progress during a transfer or reply.
    pub io_timeout_secs: u64,
    /// Seconds allowed to receive the rest of a control frame once it has started.
    pub frame_timeout_secs: u64,
    /// Seconds in-flight transfers get to finish when the daemon shuts down.
    pub shutdown_grace_secs: u64,
    /// Failed logins allowed on one connection before it is closed.
    pub max_auth_attempts: u32,
    /// Password verifications run at once (each argon2id run takes 19 MiB and a core); also
    /// the number of password-check threads, each keeping its 19 MiB for reuse.
    pub max_concurrent_logins: usize,
    /// Logins allowed to wait for a verification slot; beyond this they get "busy".
    pub max_queued_logins: usize,
    /// Largest file accepted by upload, in bytes (0: no limit beyond free disk space).
    pub max_upload_bytes: u64,
    /// Seconds an interrupted upload's data is kept for resume after its last write (0: not
    /// kept; every upload starts over).
    pub partial_upload_ttl_secs: u64,
    /// Unauthenticated connections: `start:rate:full` random early drop (OpenSSH MaxStartups).
    pub max_startups: crate::admission::Startups,
    /// Unauthenticated connections from one source (address or IPv6 prefix).
    pub max_startups_per_source: usize,
    /// Prefix lengths `V4:V6` that make one source, for admission and penalties.
    pub per_source_net_block_size: crate::admission::NetBlockSize,
    /// Authenticated connections in total.
    pub max_sessions: usize,
    /// Authenticated connections of one user (from any number of addresses).
    pub max_sessions_per_user: usize,
    /// Handshake and login deadlines when the unauthenticated pool is full, in percent of
    /// the configured ones (scaled linearly from the start level).
    pub pressure_deadline_percent: u32,
    /// Before version 0.2: connections per address; now read as `max_startups_per_source`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_source: Option<usize>,
    /// Uploads and downloads one user may run at once; more are answered `Busy`.
    pub max_transfers_per_user: usize,
    /// Least bytes per second a transfer body must move, measured over each
    /// `io_timeout_secs` of waiting for the client (0: only the no-progress deadline).
    pub min_transfer_rate: u64,
    /// Resume checks (hashing a held prefix of a file) one user may run at once; more wait.
    pub max_prefix_hashes_per_user: usize,
    /// Bytes of interrupted uploads kept for resume per user, counting each running
    /// resumable upload at its full size; an upload that does not fit is not resumable.
    pub max_partial_bytes_per_user: u64,
    /// Most entries a folder rename looks at to check that no path inside it would pass
    /// the depth or length limit; a bigger folder moved deeper is refused.
    pub max_rename_check_entries: u64,
    /// Files a connection may stage with `Put` before the daemon commits them by itself
    /// (protocol 3 batched uploads), bounding staged files per connection.
    pub max_batch_files: usize,
    /// Bytes a connection may stage with `Put` before the daemon commits them by itself.
    pub max_batch_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            handshake_timeout_secs: 10,
            login_timeout_secs: 30,
            idle_timeout_secs: 900,
            io_timeout_secs: 30,
            frame_timeout_secs: 10,
            shutdown_grace_secs: 10,
            max_auth_attempts: 3,
            max_concurrent_logins: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            max_queued_logins: 32,
            max_upload_bytes: 0,
            partial_upload_ttl_secs: 86400,
            max_startups: Default::default(),
            max_startups_per_source: 10,
            per_source_net_block_size: Default::default(),
            max_sessions: 1024,
            max_sessions_per_user: 128,
            pressure_deadline_percent: 25,
            max_connections_per_source: None,
            max_transfers_per_user: 64,
            min_transfer_rate: 1024,
            max_prefix_hashes_per_user: 2,
            max_partial_bytes_per_user: 16 << 30,
            max_rename_check_entries: 1_000_000,
            max_batch_files: 1024,
            max_batch_bytes: 64 << 20,
        }
    }
}

impl Limits {
    /// TLS handshake deadline.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }
    /// Deadline from accept to authentication.
    pub fn login_timeout(&self) -> Duration {
        Duration::from_secs(self.login_timeout_secs)
    }
    /// Idle deadline after authentication.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
    /// Per-read/write progress deadline.
    pub fn io_timeout(&self) -> Duration {
        Duration::from_secs(self.io_timeout_secs)
    }
    /// Deadline for the rest of a control frame.
    pub fn frame_timeout(&self) -> Duration {
        Duration::from_secs(self.frame_timeout_secs)
    }
    /// Shutdown grace period.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
    /// How long interrupted uploads stay resumable; `None` when resume is off.
    pub fn partial_upload_ttl(&self) -> Option<Duration> {
        (self.partial_upload_ttl_secs > 0)
            .then(|| Duration::from_secs(self.partial_upload_ttl_secs))
    }
}

/// Session token settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionSettings {
    /// Seconds a session token stays valid after login.
    pub ttl_secs: u64,
    /// Most live sessions per account; a login beyond it revokes that account's oldest.
    pub max_per_user: usize,
    /// In s3 mode, milliseconds between two reads of the shared accounts and revocations:
    /// a change on one node is in force on every node within twice this.
    pub sync_interval_ms: u64,
    /// Longest life of a long-lived token (`xfer token create --expires`), in days; the
    /// default life is 90 days or this, whichever is shorter.
    pub token_max_days: u64,
    /// Most live long-lived tokens per account; creating one more is refused (`Busy`).
    pub max_tokens_per_user: usize,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            ttl_secs: 7 * 24 * 3600,
            max_per_user: 100,
            sync_interval_ms: 2000,
            token_max_days: 365,
            max_tokens_per_user: 32,
        }
    }
}

impl SessionSettings {
    /// The longest a token may live, in seconds.
    pub fn token_max_secs(&self) -> u64 {
        self.token_max_days.saturating_mul(86_400)
    }

    /// How long a token lives when its creator names no time: 90 days, or the cap if lower.
    pub fn token_default_secs(&self) -> u64 {
        (90 * 86_400).min(self.token_max_secs())
    }

    /// Time between two reads of the shared state (s3 mode).
    pub fn sync_interval(&self) -> Duration {
        Duration::from_millis(self.sync_interval_ms)
    }
}

/// The loaded, validated configuration with absolute paths.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was loaded from.
    pub path: PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Storage root.
    pub root: PathBuf,
    /// Users file.
    pub users_file: PathBuf,
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// State folder.
    pub state_dir: PathBuf,
    /// Audit log file.
    pub audit_log: PathBuf,
    /// Limits and timeouts.
    pub limits: Limits,
    /// Session settings.
    pub sessions: SessionSettings,
    /// Brute-force penalties.
    pub penalties: crate::penalty::PenaltySettings,
    /// Storage backend (`credentials_file` made absolute).
    pub storage: StorageSettings,
    /// Session token key (s3 mode).
    pub session_key_file: PathBuf,
    /// Default quotas.
    pub quota: QuotaSettings,
    /// Deprecated keys found and what became of them, for the daemon to log.
    pub warnings: Vec<String>,
}

impl Config {
    /// Reads, parses and validates the config at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_str(path, &text)
    }

    /// Parses and validates config text as if read from `path`.
    pub fn from_str(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string()
                + &e.span()
                    .map(|s| format!(" (at line {})", line_of(text, s.start)))
                    .unwrap_or_default(),
        })?;
        let base = xfer_util::fs::parent_dir(path);
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
        let invalid = |key, problem: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            problem,
        };
        let listen: SocketAddr = file.listen.parse().map_err(|_| {
            invalid(
                "listen",
                format!(
                    "`{}` is not an ADDRESS:PORT such as 127.0.0.1:7443",
                    file.listen
                ),
            )
        })?;
        let mut file = file;
        let mut warnings = Vec::new();
        if let Some(old) = file.limits.max_connections_per_source.take() {
            // Every config `xferd init` wrote before two-stage admission names this key, so
            // it stays readable: what it limited for strangers is now max_startups_per_source.
            let explicit = toml::from_str::<toml::Table>(text)
                .ok()
                .and_then(|t| t.get("limits")?.get("max_startups_per_source").cloned())
                .is_some();
            if explicit {
                return Err(invalid(
                    "limits.max_connections_per_source",
                    "is replaced by `limits.max_startups_per_source`; remove it".into(),
                ));
            }
            file.limits.max_startups_per_source = old;
            warnings.push(format!(
                "`limits.max_connections_per_source` is deprecated: read as `limits.max_startups_per_source = {old}` (it now counts only connections not yet logged in; logged-in ones count against `limits.max_sessions_per_user`); rename it"
            ));
        }
        let l = &file.limits;
        for (key, value) in [
            ("limits.max_connections", l.max_connections as u64),
            (
                "limits.max_startups_per_source",
                l.max_startups_per_source as u64,
            ),
            ("limits.max_sessions", l.max_sessions as u64),
            (
                "limits.max_sessions_per_user",
                l.max_sessions_per_user as u64,
            ),
            ("limits.frame_timeout_secs", l.frame_timeout_secs),
            ("penalties.max_sources", file.penalties.max_sources as u64),
            ("limits.handshake_timeout_secs", l.handshake_timeout_secs),
            ("limits.login_timeout_secs", l.login_timeout_secs),
            ("limits.idle_timeout_secs", l.idle_timeout_secs),
            ("limits.io_timeout_secs", l.io_timeout_secs),
            ("limits.max_auth_attempts", l.max_auth_attempts as u64),
            (
                "limits.max_concurrent_logins",
                l.max_concurrent_logins as u64,
            ),
            ("sessions.ttl_secs", file.sessions.ttl_secs),
            ("sessions.max_per_user", file.sessions.max_per_user as u64),
            ("sessions.sync_interval_ms", file.sessions.sync_interval_ms),
            ("sessions.token_max_days", file.sessions.token_max_days),
            (
                "sessions.max_tokens_per_user",
                file.sessions.max_tokens_per_user as u64,
            ),
            (
                "limits.max_transfers_per_user",
                l.max_transfers_per_user as u64,
            ),
            (
                "limits.max_prefix_hashes_per_user",
                l.max_prefix_hashes_per_user as u64,
            ),
            (
                "limits.max_partial_bytes_per_user",
                l.max_partial_bytes_per_user,
            ),
            ("limits.max_batch_files", l.max_batch_files as u64),
            ("limits.max_batch_bytes", l.max_batch_bytes),
            ("quota.recount_secs", file.quota.recount_secs),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0".into()));
            }
        }
        if l.pressure_deadline_percent == 0 || l.pressure_deadline_percent > 100 {
            return Err(invalid(
                "limits.pressure_deadline_percent",
                "must be between 1 and 100".into(),
            ));
        }
        let mut storage = file.storage;
        storage
            .validate()
            .map_err(|(key, problem)| invalid(key, problem))?;
        if let Some(f) = &storage.credentials_file {
            storage.credentials_file = Some(base.join(f));
        }
        let abs = |p: &Path| base.join(p);
        Ok(Config {
            path: path.to_path_buf(),
            listen,
            root: abs(&file.root),
            users_file: abs(&file.users_file),
            cert: abs(&file.cert),
            key: abs(&file.key),
            state_dir: abs(&file.state_dir),
            audit_log: if file.audit_log.as_os_str().is_empty() {
                abs(&file.state_dir).join("audit.log")
            } else {
                abs(&file.audit_log)
            },
            limits: file.limits,
            sessions: file.sessions,
            penalties: file.penalties,
            storage,
            session_key_file: abs(&file.session_key_file),
            quota: file.quota,
            warnings,
        })
    }
}

/// Which storage backend holds users' files.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// Folders under `root` on this machine (one daemon per root).
    #[default]
    Local,
    /// An S3-compatible object store, which several daemons can share.
    S3,
}

/// The `[storage]` section; each key is documented in `config/xferd.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    /// `local` (the root folder) or `s3`.
    pub kind: StorageKind,
    /// Bucket name (s3).
    pub bucket: String,
    /// Endpoint URL; empty means AWS for `region`.
    pub endpoint: String,
    /// Region the requests are signed for.
    pub region: String,
    /// Whether a plain `http://` endpoint is accepted (a store on loopback or a private link).
    pub allow_http: bool,
    /// TOML file (mode 0600) with `access_key_id` and `secret_access_key`; without it the
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` environment variables.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// Key prefix for everything the daemon stores, so a bucket can hold other data too.
    pub prefix: String,
    /// Bytes per part of a multipart upload: a power of two, raised for files that would
    /// need more than 10,000 parts.
    pub part_size: u64,
    /// Parts of one upload sent at once; memory per upload is part_size x (this + 1).
    pub parts_in_flight: usize,
    /// Seconds allowed to connect to the store.
    pub connect_timeout_secs: u64,
    /// Seconds a request to the store may go without progress.
    pub request_timeout_secs: u64,
    /// Retries of a failed request (with exponential backoff) before giving up.
    pub max_retries: usize,
    /// Seconds an upload's claim on its resume record lasts without renewal: a node that
    /// finds a fresher claim by another node does not take the upload over.
    pub upload_lease_secs: u64,
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            kind: StorageKind::Local,
            bucket: String::new(),
            endpoint: String::new(),
            region: "us-east-1".into(),
            allow_http: false,
            credentials_file: None,
            prefix: String::new(),
            part_size: 8 << 20,
            parts_in_flight: 2,
            connect_timeout_secs: 5,
            request_timeout_secs: 30,
            max_retries: 3,
            upload_lease_secs: 10,
        }
    }
}

/// The smallest part an S3 store accepts (all but the last part of an upload).
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// The largest part an S3 store accepts.
pub const MAX_PART_SIZE: u64 = 5 << 30;

impl StorageSettings {
    /// Checks the keys the chosen backend needs; on failure the key and what to do.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.kind == StorageKind::Local {
            return Ok(());
        }
        if self.bucket.is_empty() {
            return Err((
                "storage.bucket",
                "is required with kind = \"s3\": name the bucket (create it first, for example with `garage bucket create NAME`)".into(),
            ));
        }
        if self.region.is_empty() {
            return Err((
                "storage.region",
                "is required with kind = \"s3\": use the store's region (\"garage\" for a default Garage, \"us-east-1\" for most others)".into(),
            ));
        }
        if self.endpoint.starts_with("http://") && !self.allow_http {
            return Err((
                "storage.endpoint",
                "is plain http: use https, or set `storage.allow_http = true` for a store reached over loopback or a private link".into(),
            ));
        }
        if !self.endpoint.is_empty()
            && !self.endpoint.starts_with("http://")
            && !self.endpoint.starts_with("https://")
        {
            return Err((
                "storage.endpoint",
                format!(
                    "`{}` is not a URL such as https://s3.example.com or http://127.0.0.1:3900",
                    self.endpoint
                ),
            ));
        }
        if self.prefix.starts_with('/') || self.prefix.ends_with('/') || self.prefix.contains("//")
        {
            return Err((
                "storage.prefix",
                "must not start or end with `/` or contain `//`: write it as `a` or `a/b`".into(),
            ));
        }
        if !self.part_size.is_power_of_two()
            || self.part_size < MIN_PART_SIZE
            || self.part_size > MAX_PART_SIZE
        {
            return Err((
                "storage.part_size",
                format!(
                    "must be a power of two from 8388608 (8 MiB) to 4294967296 (4 GiB), the range S3 stores accept; {} is not",
                    self.part_size
                ),
            ));
        }
        for (key, value) in [
            ("storage.parts_in_flight", self.parts_in_flight as u64),
            ("storage.connect_timeout_secs", self.connect_timeout_secs),
            ("storage.request_timeout_secs", self.request_timeout_secs),
            ("storage.upload_lease_secs", self.upload_lease_secs),
        ] {
            if value == 0 {
                return Err((key, "must be greater than 0".into()));
            }
        }
        Ok(())
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_an_empty_file_and_paths_are_relative_to_it() {
        let c = Config::from_str(Path::new("/etc/xferd/xferd.toml"), "").unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.root, PathBuf::from("/etc/xferd/storage"));
        assert_eq!(c.users_file, PathBuf::from("/etc/xferd/users.toml"));
        assert_eq!(c.limits, Limits::default());
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_str(Path::new("x.toml"), "listne = \"1.2.3.4:5\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listne"), "{err}");
        let err = Config::from_str(Path::new("x.toml"), "[limits]\nmax_conections = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_conections"), "{err}");
    }

    #[test]
    fn the_old_per_source_key_still_loads_as_max_startups_per_source() {
        let c = Config::from_str(
            Path::new("x.toml"),
            "[limits]\nmax_connections = 256\nmax_connections_per_source = 20\n",
        )
        .unwrap();
        assert_eq!(c.limits.max_startups_per_source, 20);
        assert_eq!(c.limits.max_connections, 256);
        assert!(c.warnings[0].contains("max_connections_per_source"));
        let err = Config::from_str(
            Path::new("x.toml"),
            "[limits]\nmax_connections_per_source = 20\nmax_startups_per_source = 5\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("limits.max_connections_per_source"), "{err}");
        let fresh = Config::from_str(Path::new("x.toml"), "").unwrap();
        assert!(fresh.warnings.is_empty());
    }

    #[test]
    fn admission_values_are_checked_and_named() {
        for (text, key) in [
            ("max_startups = \"10:30\"", "limits.max_startups"),
            ("max_startups = \"20:30:10\"", "limits.max_startups"),
            (
                "per_source_net_block_size = \"32:200\"",
                "limits.per_source_net_block_size",
            ),
            ("max_sessions_per_user = 0", "limits.max_sessions_per_user"),
            (
                "pressure_deadline_percent = 0",
                "limits.pressure_deadline_percent",
            ),
        ] {
            let err = Config::from_str(Path::new("x.toml"), &format!("[limits]\n{text}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
        let c = Config::from_str(
            Path::new("x.toml"),
            "[limits]\nmax_startups = \"5:50:20\"\nper_source_net_block_size = \"24:48\"\n",
        )
        .unwrap();
        assert_eq!(c.limits.max_startups.full, 20);
        assert_eq!(c.limits.per_source_net_block_size.v6, 48);
    }

    #[test]
    fn bad_values_are_named() {
        let err = Config::from_str(Path::new("x.toml"), "listen = \"nowhere\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`listen`"), "{err}");
        let err = Config::from_str(Path::new("x.toml"), "[limits]\nio_timeout_secs = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.io_timeout_secs"), "{err}");
    }
}
