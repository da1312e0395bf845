//! The xfer wire protocol, version 3: what `xferd` and `xfer` say to each other.
//!
//! Map of the crate:
//! - [`limits`]: every constant that bounds what the network may send (frame length, name length, ...).
//! - [`message`]: the request and response enums, carried one per frame.
//! - [`frame`]: the size-prefixed frame codec (u32 length + postcard body), pure and allocation-checked.
//! - [`connection`]: a stream that reads and writes frames and file bodies with deadlines.
//! - [`body`]: streaming a file body of known size through a bounded buffer pipeline with a BLAKE3 digest,
//!   from a source (a local file, any reader) and into a sink (a local file, any writer) on one blocking thread.
//! - `records`: body chunks read from the file straight into the slots of TLS records, which
//!   the TLS stream seals in place and sends without a copy.
//! - [`pagecache`]: write-behind and drop-behind, so big bodies do not fill the page cache.
//! - [`path`]: the one syntax check for remote paths that both sides apply.
//! - [`beneath`]: filesystem calls confined beneath a directory, never following a symlink (the
//!   daemon's user trees, the client's download folder).
//! - [`staging`]: locked staging files that resumable bodies are written into.
//! - [`tls`]: the TLS 1.3 crypto provider both sides use.
//! - [`tls_stream`]: TLS 1.3 as an async stream that copies a body's bytes at most once (none
//!   when sent from a file or received in large reads): rustls' handshake, then records
//!   sealed and opened in place in large buffers.
//! - [`key_login`]: the message a key login signs, bound to the TLS connection.
//! - [`fingerprint`]: the server identity that clients pin (SHA-256 of the certificate's public key).
//!
//! The full specification, precise enough to write another client from, is `proto/README.md`.
#![forbid(unsafe_code)]

pub mod beneath;
pub mod body;
pub mod connection;
pub mod fingerprint;
pub mod frame;
pub mod key_login;
pub mod limits;
pub mod message;
pub mod pagecache;
pub mod path;
mod records;
pub mod staging;
pub mod tls;
pub mod tls_stream;

pub use connection::Connection;
pub use message::{Digest, Entry, EntryKind, ErrorCode, Request, Response, Role, TokenInfo};

/// The protocol version carried in the hello; bumped whenever messages are added. Version 2
/// added resumable transfers (`UploadResume`, `UploadFrom`, `DownloadFrom`); version 3
/// batched uploads of small files (`Put`, `Commit`, `Committed`) and key login (`KeyLogin`,
/// `KeyProof`, `KeyChallenge`).
pub const PROTOCOL_VERSION: u16 = 3;

/// The oldest version a server still serves (without the features added since).
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// The ALPN identifier negotiated in the TLS handshake; a server refuses any other.
pub const ALPN: &[u8] = b"xfer/1";

/// The TCP port used when a server address names none.
pub const DEFAULT_PORT: u16 = 7443;

/// Start of the one plain-text line a server sends instead of a TLS ServerHello when it
/// refuses a connection at a limit (spec §1): the reason follows, then `\n`.
pub const REFUSAL_PREFIX: &str = "xfer-refused: ";

/// Longest refusal line, newline included; a client reads no further.
pub const MAX_REFUSAL_LINE: usize = 200;
