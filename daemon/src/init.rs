//! `xferd init` and the first-run quickstart: a commented config, an empty users file, the
//! storage root, and a fresh key and self-signed certificate.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use argon2::password_hash::rand_core::{OsRng, RngCore};
use base64::Engine;
use xfer_proto::fingerprint::Fingerprint;
use xfer_util::fs::{Mode, write_atomic};

use crate::accounts::UsersFile;
use crate::config::DEFAULT_LISTEN;

/// The commented config that `init` writes; `config/xferd.toml` is this with the defaults.
pub const CONFIG_TEMPLATE: &str = r#"# xferd configuration. Every key is optional; the value shown is the default.
# Relative paths are relative to the folder holding this file.

# Address and port to listen on. The default is loopback only; use "0.0.0.0:7443" or
# "[::]:7443" to accept connections from other machines.
listen = "{listen}"

# Storage root: each user gets their own folder beneath it (created on first login).
root = "{root}"

# Users file: argon2id hashes and roles, managed with `xferd user ...`.
users_file = "users.toml"

# TLS certificate chain and private key (PEM). `xferd init` makes a self-signed pair;
# clients pin the key's fingerprint (`xferd fingerprint`).
cert = "cert.pem"
key = "key.pem"

# Folder for state the daemon writes (session tokens, hashed).
state_dir = "{state_dir}"

# Audit trail: one JSON line per operation (time, user, source, operation, path, bytes,
# digest, result), appended, mode 0600, reopened on SIGHUP for log rotation.
# Empty: audit.log in state_dir.
audit_log = ""

# With [storage] kind = "s3" (several nodes): a file of 32 random bytes, readable only by its
# owner (`xferd session keygen` makes one), that signs session tokens. While it does not
# exist, tokens are signed with a key derived from the TLS private key, which every node
# already shares, so any node accepts a token any other issued. With the file, every node
# needs the same one (deployed like the TLS key), and tokens can be rotated on their own.
# Unused with local storage.
session_key_file = "session.key"

[limits]
# Most connections at once of any kind, logged in or not: a safety net for file descriptors
# above the admission caps below (each connection may hold 4). Lowered at start, with a
# warning, if the open-file limit (raised to its hard limit at start) cannot hold it.
max_connections = 4096
# Seconds allowed for the TLS handshake.
handshake_timeout_secs = 10
# Seconds from connect until the client must be logged in.
login_timeout_secs = 30
# Seconds a logged-in connection may sit idle between requests.
idle_timeout_secs = 900
# Seconds a transfer or reply may go without any progress before the connection is dropped.
io_timeout_secs = 30
# Seconds allowed to receive the rest of a request once its first byte has arrived
# (a client trickling bytes is dropped).
frame_timeout_secs = 10
# Seconds in-flight transfers get to finish when the daemon shuts down; idle clients are
# disconnected at once.
shutdown_grace_secs = 10
# Failed logins allowed on one connection before it is closed.
max_auth_attempts = 3
# Password checks run at once (argon2id: 19 MiB and one core each). Default: number of cores.
# Each runs on its own thread, which allocates its argon2 memory on its first check and reuses
# it, so password checks hold at most this x 19 MiB however many logins arrive (x the largest
# m of the users' hashes, if an account was given stronger parameters). Needs a restart.
# max_concurrent_logins = 2
# Logins that may wait for a check; beyond this they are told the server is busy.
max_queued_logins = 32
# Largest upload in bytes; 0 means no limit beyond free disk space.
max_upload_bytes = 0
# Seconds the data of an interrupted upload is kept (invisible, under ROOT/.xfer-partial) so
# that the next upload of the same file resumes; 0 turns resume off (default: 24 hours).
partial_upload_ttl_secs = 86400
# Admission happens in two stages, like OpenSSH. Until a connection has logged in it is
# "unauthenticated", and these connections are capped in total with random early drop,
# START:RATE:FULL as OpenSSH's MaxStartups: below START all are accepted; from START on each
# new one is refused with a probability rising from RATE % to 100 % at FULL. A source's first
# waiting connection is exempt below FULL, and at FULL a newcomer from a source with at least
# two fewer waiting connections than the busiest source takes that source's oldest place, so
# a flood from a few addresses cannot keep users from elsewhere out.
max_startups = "10:30:100"
# Unauthenticated connections from one source. 10 is far more than one host needs at once
# (a handshake and a login take milliseconds, and the client retries a refusal a few times),
# and it takes 10 addresses to fill the pool of 100.
max_startups_per_source = 10
# What one source is: IPv4 and IPv6 prefix lengths (OpenSSH's PerSourceNetBlockSize). One
# host usually owns a whole IPv6 /64. Penalties ([penalties]) use the same sources.
per_source_net_block_size = "32:64"
# Once logged in, a connection leaves the unauthenticated pool and counts as a session:
# in total, and per user from any number of addresses (a backup job running 64 transfers in
# parallel fits). Strangers cannot push logged-in users out.
max_sessions = 1024
max_sessions_per_user = 128
# While unauthenticated connections exceed START, new ones get shorter handshake and login
# deadlines, down to this percentage of the ones above at FULL (never below 2 s for the
# handshake and 5 s for the login), so idling costs a flood more than the daemon.
pressure_deadline_percent = 25
# Uploads and downloads one user may run at once, over all their connections; more are
# answered "too many transfers in progress" (busy; `xfer` exits 7).
max_transfers_per_user = 64
# Least bytes per second a transfer must move, measured over each io_timeout_secs spent
# waiting for the client: a client trickling a few bytes is dropped after io_timeout_secs.
# 0 keeps only the no-progress deadline (io_timeout_secs).
min_transfer_rate = 1024
# Resume checks one user may run at once (each hashes the part of a file the client already
# has, up to the whole file); more wait their turn. A check stops when its client leaves.
max_prefix_hashes_per_user = 2
# Bytes of interrupted uploads kept for resume per user (default: 16 GiB), counting each
# running resumable upload at its full size. To make room, the user's oldest kept data is
# deleted; an upload that still does not fit (or is bigger) runs, but is not resumable.
max_partial_bytes_per_user = 17179869184
# Most entries a folder rename looks at to check that no path inside would pass 64 levels
# or 4096 bytes; moving a bigger folder deeper (or to a longer name) is refused.
max_rename_check_entries = 1000000
# Small files uploaded in one batch (protocol 3 `Put`) are staged invisibly and made durable
# and visible together, with one sync, at the client's commit. A connection that stages this
# many files or bytes is committed by the daemon at once, so staging stays bounded.
max_batch_files = 1024
max_batch_bytes = 67108864

[sessions]
# Seconds a session token stays valid after `xfer login` (default: 7 days).
ttl_secs = 604800
# Most live sessions (logins) per account; a login beyond it revokes that account's oldest
# session. Parallel commands with one login share one session.
max_per_user = 100
# With [storage] kind = "s3": milliseconds between two reads, by each node, of the accounts
# (PREFIX/.xfer/users.toml, read only when its ETag changed) and of the revoked sessions
# (PREFIX/.xfer/revoked/). A logout, revocation, password or role change on one node is in
# force on every node within twice this (the default keeps it under 5 s).
sync_interval_ms = 2000
# Longest life of a long-lived token (`xfer token create --expires`), in days. A token made
# without --expires lives 90 days, or this if it is shorter.
token_max_days = 365
# Most live tokens per account (they do not count against max_per_user, and a login never
# ends one); making one more is refused until one is revoked (`xfer token revoke ID`).
max_tokens_per_user = 32

[penalties]
# Brute-force defence, per source (limits.per_source_net_block_size). Each failed login, bad token or
# wrong shutdown password adds per_failure_secs to the source's penalty, up to max_secs; while
# the penalty exceeds threshold_secs, passwords from that source are refused unchecked, and an
# invalid token is refused (RateLimited) without adding more, so a guesser cannot push a shared
# NAT address towards max_secs; valid tokens from that source still work.
per_failure_secs = 5
threshold_secs = 15
max_secs = 600
# Most sources remembered; when full, the one closest to expiry is forgotten.
max_sources = 65536

[storage]
# Where users' files live. "local": folders under `root` on this machine (the default).
# "s3": an S3-compatible object store (AWS S3, Garage, MinIO, ...), which several daemons with
# the same [storage], users file, key and certificate can share. Keys in the bucket are
# PREFIX/USER/PATH; resume records live under PREFIX/.xfer/.
kind = "local"
# The bucket (create it first). Required with kind = "s3".
bucket = ""
# The store's URL, e.g. "https://s3.example.com" or "http://127.0.0.1:3900" (Garage); empty
# means AWS S3 for `region`.
endpoint = ""
# The region requests are signed for ("garage" for a default Garage).
region = "us-east-1"
# Accept a plain http:// endpoint: only for a store on loopback or a private link.
allow_http = false
# Credentials: a TOML file with `access_key_id = "..."` and `secret_access_key = "..."`,
# refused unless only its owner can read it (chmod 600). Without it, the environment
# variables AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY. Never logged.
# credentials_file = "s3-credentials.toml"
# Key prefix for everything xferd stores, so the bucket can hold other data ("" = none).
prefix = ""
# Uploads stream as multipart uploads in parts of this many bytes (a power of two, 8 MiB to
# 4 GiB; raised for a file that would need more than 10,000 parts). At most parts_in_flight
# parts of one upload are sent at once, so an upload holds at most
# part_size x (parts_in_flight + 1) bytes of memory. An interrupted upload resumes, on any
# node, from its last whole part.
part_size = 8388608
parts_in_flight = 2
# Seconds to connect to the store; seconds a request may go without progress; retries of a
# failed request (exponential backoff) before the operation fails.
connect_timeout_secs = 5
request_timeout_secs = 30
max_retries = 3
# Seconds an upload's claim on its resume record lasts unless renewed (it is renewed while the
# upload runs): another node finding a fresher claim does not take the upload over.
upload_lease_secs = 10

[quota]
# Default quotas of every account; a user's own `quota_bytes` / `quota_files` in the users file
# (`xferd user quota NAME`) replaces them. Absent: unlimited. Counted: the bytes and number of
# the user's files, plus uploads in progress (at their declared size, net of the file each
# replaces) and interrupted uploads kept for resume. An upload that would pass a quota is
# refused before its body (`xfer` exits 9). Usage is kept in STATE_DIR/usage and survives
# restarts; `xferd user usage NAME --rescan` counts a user's files again.
# default_bytes = 10737418240
# default_files = 100000
# With [storage] kind = "s3": seconds after which a node counts a user's files again from a
# listing of the store (other nodes' changes show up then; each node reserves its own uploads
# in progress). Unused with local storage.
recount_secs = 300
"#;

/// Options for `xferd init`.
#[derive(Debug, Clone, Default)]
pub struct InitOptions {
    /// Config file to write.
    pub config: PathBuf,
    /// Listen address to write (default 127.0.0.1:7443).
    pub listen: Option<String>,
    /// Storage root to write (default `storage`, relative to the config).
    pub root: Option<PathBuf>,
    /// State folder to write (default `state`, relative to the config).
    pub state_dir: Option<PathBuf>,
    /// Extra certificate names.
    pub hostnames: Vec<String>,
    /// Overwrite an existing config and key.
    pub force: bool,
}

/// What `init` made.
#[derive(Debug)]
pub struct InitReport {
    /// The config file.
    pub config: PathBuf,
    /// The new certificate's fingerprint.
    pub fingerprint: Fingerprint,
}

fn toml_string(p: &Path) -> String {
    p.display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
}

/// Renders the config template.
pub fn render_config(listen: &str, root: &Path, state_dir: &Path) -> String {
    CONFIG_TEMPLATE
        .replace("{listen}", listen)
        .replace("{root}", &toml_string(root))
        .replace("{state_dir}", &toml_string(state_dir))
}

/// Writes config, users file, storage root, state folder, key and certificate.
pub fn init(opts: &InitOptions) -> anyhow::Result<InitReport> {
    let listen = opts.listen.clone().unwrap_or_else(|| DEFAULT_LISTEN.into());
    listen.parse::<std::net::SocketAddr>().with_context(|| {
        format!("--listen `{listen}` is not an ADDRESS:PORT such as 0.0.0.0:7443")
    })?;
    let root = opts.root.clone().unwrap_or_else(|| "storage".into());
    let state_dir = opts.state_dir.clone().unwrap_or_else(|| "state".into());
    let text = render_config(&listen, &root, &state_dir);
    // The paths below come from the config as the daemon will read it, so they cannot drift
    // from what the template says.
    let config = crate::config::Config::from_str(&opts.config, &text)
        .context("the generated config is invalid")?;
    let dir = xfer_util::fs::parent_dir(&opts.config);
    std::fs::create_dir_all(dir).with_context(|| format!("creating `{}`", dir.display()))?;
    if !opts.force {
        for existing in [&opts.config, &config.key] {
            if existing.exists() {
                bail!(
                    "`{}` already exists; pass --force to replace it (clients that pinned the old key will refuse the new one)",
                    existing.display()
                );
            }
        }
    }
    let id = crate::tls::generate(&opts.hostnames)?;
    write_atomic(&config.key, id.key_pem.as_bytes(), Mode::KeepOr(0o600))
        .with_context(|| format!("writing `{}`", config.key.display()))?;
    write_atomic(&config.cert, id.cert_pem.as_bytes(), Mode::KeepOr(0o644))
        .with_context(|| format!("writing `{}`", config.cert.display()))?;
    if !config.users_file.exists() {
        UsersFile::default().save(&config.users_file)?;
    }
    crate::fsutil::create_dir_with_mode(&config.root, 0o700)
        .with_context(|| format!("creating storage root `{}`", config.root.display()))?;
    crate::fsutil::create_dir_with_mode(&config.state_dir, 0o700)
        .with_context(|| format!("creating state folder `{}`", config.state_dir.display()))?;
    write_atomic(&opts.config, text.as_bytes(), Mode::KeepOr(0o644))
        .with_context(|| format!("writing `{}`", opts.config.display()))?;
    Ok(InitReport {
        config: opts.config.clone(),
        fingerprint: id.fingerprint,
    })
}

/// A random password for the first superuser: 144 bits, URL-safe characters.
pub fn random_password() -> String {
    let mut raw = [0u8; 18];
    OsRng.fill_bytes(&mut raw);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode_of(path: &Path) -> std::io::Result<u32> {
        Ok(std::fs::metadata(path)?.permissions().mode() & 0o7777)
    }

    #[test]
    fn example_config_matches_the_template() {
        let example = include_str!("../../config/xferd.toml");
        assert_eq!(
            example,
            render_config(DEFAULT_LISTEN, Path::new("storage"), Path::new("state"))
        );
    }

    #[test]
    fn init_writes_everything_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("etc/xferd.toml");
        let opts = InitOptions {
            config: cfg.clone(),
            listen: Some("127.0.0.1:0".into()),
            ..Default::default()
        };
        let report = init(&opts).unwrap();
        let config = crate::config::Config::load(&cfg).unwrap();
        assert_eq!(mode_of(&config.key).unwrap(), 0o600);
        assert_eq!(mode_of(&config.users_file).unwrap(), 0o600);
        // No token key of its own: nodes made by separate inits sign alike once they share the
        // TLS key (the config's `session_key_file` is for rotating tokens apart from it).
        assert!(!config.session_key_file.exists());
        crate::shared::token::SessionKey::for_daemon(&config.session_key_file, &config.key)
            .unwrap();
        assert!(config.root.is_dir());
        assert_eq!(
            crate::tls::fingerprint_of(&config.cert).unwrap(),
            report.fingerprint
        );
        let err = init(&opts).unwrap_err().to_string();
        assert!(err.contains("--force"), "{err}");
        let again = init(&InitOptions {
            force: true,
            ..opts
        })
        .unwrap();
        assert_ne!(again.fingerprint, report.fingerprint);
    }
}
