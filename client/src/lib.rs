//! xfer: the client, as a library so the binary and the tests share every line.
//!
//! Map of the crate:
//! - [`error`]: every failure, each with the exit code the contract gives it.
//! - [`verifier`]: the rustls certificate verifier that pins the server's key and still checks
//!   the handshake signature.
//! - [`state`]: the client's state folder: known servers (pins) and session tokens, 0600/0700,
//!   written atomically.
//! - [`addr`]: parsing `USER@HOST[:PORT]` and `HOST[:PORT]`.
//! - [`keys`]: key login: `xfer keygen`, loading a private key, signing the challenge.
//! - [`conn`]: connecting (TCP, optional source address, TLS, hello) and every request.
//! - [`put`]: batched upload of small files (protocol 3): read-ahead, pipelined `Put`s, one
//!   `Commit`.
//! - [`part`]: the `.part` file a download is staged in and resumed from.
//! - [`progress`]: progress bars on a terminal, silence elsewhere.
//! - `transfer`: multi-file upload, download and delete: plan, run, report, summarize.
//! - [`cli`]: the command line.
//! - `shell`: where `xfer shell` reads its lines: a line editor with history on a terminal,
//!   plain lines from a pipe.
#![forbid(unsafe_code)]

pub mod addr;
pub mod cli;
pub mod conn;
pub mod error;
pub mod keys;
pub mod part;
pub mod progress;
pub mod put;
mod shell;
pub mod state;
mod transfer;
pub mod verifier;

pub use error::ClientError;

/// Program name and version, sent in the protocol hello.
pub const AGENT: &str = concat!("xfer/", env!("CARGO_PKG_VERSION"));
