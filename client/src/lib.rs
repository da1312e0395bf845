//! xfer: the client, as a library so the binary and the tests share every line.
//!
//! Map of the crate:
//! - [`error`]: every failure, each with the exit code the contract gives it, and
//!   [`error::Reported`], a failure already printed.
//! - [`verifier`]: the rustls certificate verifier that pins the server's key and still checks
//!   the handshake signature.
//! - [`state`]: the client's state folder: known servers (pins) and session tokens, 0600/0700,
//!   written atomically ([`xfer_util::fs`]).
//! - [`addr`]: parsing `USER@HOST[:PORT]` and `HOST[:PORT]`.
//! - [`keys`]: key login: `xfer keygen`, loading a private key, signing the challenge.
//! - [`conn`]: connecting (TCP, optional source address, TLS, hello) and every request.
//! - `context`: the connection context every command runs in (`Ctx`): the state folder, the
//!   global flags, connecting with the stored session and pin.
//! - [`put`]: batched upload of small files (protocol 3): read-ahead, pipelined `Put`s, one
//!   `Commit`.
//! - [`part`]: the `.part` file a download is staged in and resumed from.
//! - [`progress`]: progress bars on a terminal, silence elsewhere.
//! - `transfer`: multi-file upload, download and delete: their arguments, plan, run, report,
//!   summarize.
//! - [`cli`]: the command line: the grammar and dispatch (`cli/mod.rs`), the account commands
//!   (`cli/account.rs`: login, logout, whoami, shutdown, forget), and `xfer shell`
//!   (`cli/shell.rs`: its grammar and loop; `cli/shell/input.rs`: a line editor with history
//!   on a terminal, plain lines from a pipe).
//! - [`usage`]: the account's usage against its quotas (`Account`), and `xfer whoami`'s output.
//! - [`tokens`]: `xfer token ...`, and a token (`XFER_TOKEN`, `--token-file`) used instead of
//!   a stored session.
//!
//! Dependencies run one way: `cli` ──> `transfer` ──> `context` ──> `conn`, `state`; `cli`
//! also uses `context` directly. `transfer` and `context` never name `cli`.
#![forbid(unsafe_code)]

pub mod addr;
pub mod cli;
pub mod conn;
mod context;
pub mod error;
pub mod keys;
pub mod part;
pub mod progress;
pub mod put;
pub mod state;
pub mod tokens;
mod transfer;
pub mod usage;
pub mod verifier;

pub use error::ClientError;

/// Program name and version, sent in the protocol hello.
pub const AGENT: &str = concat!("xfer/", env!("CARGO_PKG_VERSION"));
