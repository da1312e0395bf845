//! xferd: the xfer daemon, as a library so that tests and the binary share every line.
//!
//! Map of the crate:
//! - [`config`]: the TOML config file, its defaults and validation.
//! - [`accounts`]: the users file (argon2id hashes, roles) and password verification on the blocking pool.
//! - [`penalty`]: per-source penalties for failed logins (brute-force defence).
//! - [`audit`]: the JSON-lines audit trail of every operation.
//! - [`sessions`]: session tokens, persisted so they survive a restart, revocable and expiring.
//! - [`tls`]: certificate generation (rcgen), loading, the TLS 1.3 server config and the fingerprint.
//! - [`beneath`]: filesystem calls confined beneath a directory, never following a symlink.
//! - [`storage`]: the one path resolver and every filesystem operation on a user's tree.
//! - [`partial`]: interrupted uploads kept invisible for resume, locked, bounded and expiring.
//! - [`usage`]: each user's transfers and resume checks in progress, against per-user caps.
//! - [`server`]: the accept loop, connection cap and the one shutdown mechanism.
//! - [`handler`]: one connection's state machine: hello, authentication, the role check, dispatch.
//! - [`cmd`]: one module per request kind.
//! - [`init`]: `xferd init` and the first-run quickstart.
//! - [`cli`]: the command line.
//! - [`fsutil`]: atomic file writes.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod audit;
pub mod beneath;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod fsutil;
pub mod handler;
pub mod init;
pub mod partial;
pub mod penalty;
pub mod server;
pub mod sessions;
pub mod storage;
pub mod tls;
pub mod usage;

pub use config::Config;
pub use server::{Daemon, run};

/// Program name and version, sent in the protocol hello and shown by `--version`.
pub const AGENT: &str = concat!("xferd/", env!("CARGO_PKG_VERSION"));
