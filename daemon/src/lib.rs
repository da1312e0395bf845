//! xferd: the xfer daemon, as a library so that tests and the binary share every line.
//!
//! Map of the crate:
//! - [`config`]: the TOML config file, its defaults and validation.
//! - [`accounts`]: the users file (argon2id hashes, roles) and password verification.
//! - [`keys`]: login keys on accounts (OpenSSH Ed25519 public keys) and the key login check.
//! - [`admission`]: two-stage admission (unauthenticated pool, then sessions) and refusals that say why.
//! - [`password`]: password checks on a fixed pool of threads, each with its argon2 memory allocated once.
//! - [`penalty`]: per-source penalties for failed logins (brute-force defence).
//! - [`audit`]: the JSON-lines audit trail of every operation.
//! - [`sessions`]: session tokens, persisted so they survive a restart, revocable and expiring.
//! - [`shared`]: what several nodes on one object store share: accounts, signed tokens, revocations.
//! - [`tls`]: certificate generation (rcgen), loading, the TLS 1.3 server config and the fingerprint.
//! - [`beneath`]: filesystem calls confined beneath a directory (from `xfer-proto`, which the
//!   client's downloads share).
//! - [`storage`]: the seam between the commands and where files live: [`storage::Store`] (the
//!   configured backend) and [`storage::Tree`] (one user's view), async, one enum variant per
//!   backend; [`storage::active`] (the resumable uploads this daemon runs, for takeover).
//!   - [`storage::local`]: the local filesystem backend: the one path resolver and every
//!     filesystem operation on a user's tree, with [`storage::local::partial`] (interrupted
//!     uploads kept invisible for resume, locked, bounded and expiring) and
//!     [`storage::local::digest_store`] (a big upload's verified digest, kept on the file).
//!   - [`storage::object`]: the S3-compatible object store backend (multipart uploads verified
//!     before completion, resume records any node can take over, ranged reads), and
//!     [`storage::object::handles`], its handles as the seam hands them out.
//!   - [`storage::body`]: the storage ends of a transfer body (an upload's sink, a download's
//!     source) for every backend, so the commands have one upload and one download path.
//! - [`quota`]: per-user byte and file quotas: usage kept across restarts, reservations of
//!   uploads in progress, the one check every upload path makes.
//! - [`usage`]: each user's transfers and resume checks in progress, against per-user caps.
//! - [`state`]: the shared state every connection reads (config, limits, accounts, sessions,
//!   storage, audit, admission), its reload, and the one shutdown signal.
//! - [`server`]: the accept loop and the one shutdown mechanism.
//! - [`handler`]: one connection's loop: TLS, deadlines, reading requests, shutdown notices.
//! - [`cmd`]: what a request does: the role check and dispatch, one module per request kind,
//!   the per-connection context commands are given ([`cmd::Ctx`]), and `cmd::errors`, the
//!   one mapping from storage failures to wire error codes.
//! - [`init`]: `xferd init` and the first-run quickstart.
//! - [`cli`]: the command line.
//! - [`logging`]: the stderr log, and the one place that escapes and cuts client-supplied text in it.
//! - [`fsutil`]: file stamps (to notice another process's edit) and folder creation; atomic
//!   writes are [`xfer_util::fs`], shared with the client.
//!
//! Dependencies run one way, from the accept loop down to storage (checked with a grep of
//! `crate::` paths; `cli` sits above `server`):
//!
//! ```text
//! server ──> handler ──> cmd ──> state ──> storage ──> beneath, fsutil, config
//!   │           │         │        │
//!   │           │         │        └──> accounts, sessions, admission, penalty, audit, usage, tls
//!   │           │         └──> storage, accounts, admission, audit, usage
//!   │           └──> state, admission
//!   └──> state, config
//! ```
//!
//! Nothing below `server` names it, nothing below `handler` names it, and `cmd` never names
//! `handler` or `server`: a command gets what it needs as arguments (the connection's
//! [`cmd::Ctx`], which holds the shared [`state::State`], and the connection to answer on).
#![forbid(unsafe_code)]

pub mod accounts;
pub mod admission;
pub mod audit;
pub use xfer_proto::beneath;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod fsutil;
pub mod handler;
pub mod init;
pub mod keys;
pub mod logging;
pub mod password;
pub mod penalty;
pub mod quota;
pub mod server;
pub mod sessions;
pub mod shared;
pub mod state;
pub mod storage;
pub mod tls;
pub mod usage;

pub use config::Config;
pub use server::{Daemon, run};

/// Program name and version, sent in the protocol hello and shown by `--version`.
pub const AGENT: &str = concat!("xferd/", env!("CARGO_PKG_VERSION"));
